//! Q4_0 / Q4_1 matrix products on int8 dot products, for decode and prefill alike.
//!
//! Owns the layout of 4-bit weights taken as the GGUF ships them (no re-quantization: the
//! products use exactly the weights the f32 path dequantizes) and the kernels that multiply
//! them by int8-quantized inputs. A decode step reads 20 bytes per 32 weights instead of the
//! 36 of [`super::q8`]; a prefill runs the same kernels in larger register tiles, where the
//! CPU's int8 dot products do 64 multiply-adds per instruction against f32's 16.
//!
//! Layout. A weight's value `q` is 0..15 (`w = d·q + m`; Q4_0 is `m = −8d`). A row's blocks
//! of 32 are taken sixteen at a time (a *group*) into sixteen 4-byte lanes: in a full group
//! a lane is one block and holds its values in 8 *steps* of 4 bytes. The last group of a row
//! whose block count is not a multiple of 16 spreads each block over several lanes (2, 4 or
//! 8 steps each), so that a 576-wide row costs 9 steps' work, not 16. Unused lanes hold zero
//! values and zero scales, so every load is a full 64 bytes. Two steps share 64 bytes, one in
//! the low nibbles and one in the high: a load and two masks give two steps of sixteen lanes.
//! An input row is quantized per block (as Q8_0) into the same lanes, signed, unpacked.
//!
//! Per group, `vpdpbusd` adds 4 products of unsigned weight and signed input bytes into each
//! lane (exact, in i32); the group's lanes are then scaled by the weight's `d` and the
//! input's scale and the min term `m · d_x · Σx` added, in f32; the sixteen lanes are summed
//! once at the end. A lane's integer sum does not depend on the order of its products, and
//! the f32 steps run in the same order for every output whatever the tile, batch or thread
//! split — so a row's result does not depend on the rows beside it (batch invariance), and
//! a slice of a prompt gets the same result as the whole prompt.

use half::f16;

use super::OutPtr;
use super::q8::{Kernel, quantize_block};

const BLOCK: usize = 32;
/// Lanes of a group: one 512-bit register of i32 sums.
const LANES: usize = 16;
/// 4-byte steps of a block.
const BLOCK_STEPS: usize = BLOCK / 4;
/// Input rows of a tile at most.
const MAX_ROWS: usize = 4;
/// Outputs of a tile at most.
const MAX_OUTS: usize = 8;
/// Outputs handed to a thread at a time: a multiple of every tile width; 24 rows of 4-bit
/// weights (≤ 20 KiB for rows 1536 wide) stay in L1 while every block of input rows passes.
const STRIPE: usize = 24;
/// Input rows of a work item: a multiple of MAX_ROWS; 64 rows of input (≤ 96 KiB unpacked)
/// and of output stay in L2 while the item's stripe of weights passes over them.
const ROW_BLOCK: usize = 64;
/// Multiply-adds below which a product stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 256 << 10;

type Tile = [[f32; MAX_ROWS]; MAX_OUTS];

/// The 4-bit GGUF formats taken as shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q4Format {
    /// `d` (f16), 16 bytes of nibbles; `w = d·(q − 8)`.
    Q4_0,
    /// `d`, `m` (f16), 16 bytes of nibbles; `w = d·q + m`.
    Q4_1,
}

impl Q4Format {
    /// Bytes of one GGUF block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Q4Format::Q4_0 => 18,
            Q4Format::Q4_1 => 20,
        }
    }
}

/// Sixteen lanes over `blocks` blocks of a row.
#[derive(Debug, Clone, Copy)]
struct Group {
    first: usize,
    blocks: usize,
    /// Steps each lane holds: 8 (a lane per block), or 4 or 2 in a short last group.
    steps: usize,
    /// Offset of the group in a packed weight row.
    packed: usize,
    /// Offset of the group in a quantized input row.
    unpacked: usize,
}

impl Group {
    /// Lanes one block spreads over.
    fn lanes_per_block(&self) -> usize {
        BLOCK_STEPS / self.steps
    }

    /// Where value `e` of local block `b` sits: (step, byte offset within the step's 64).
    fn slot(&self, b: usize, e: usize) -> (usize, usize) {
        let s = e / 4;
        let lane = b * self.lanes_per_block() + s / self.steps;
        (s % self.steps, lane * 4 + e % 4)
    }
}

/// The groups of a row of `blocks` blocks.
fn groups(blocks: usize) -> Vec<Group> {
    let mut out = Vec::new();
    let (mut first, mut packed, mut unpacked) = (0, 0, 0);
    while first < blocks {
        let n = (blocks - first).min(LANES);
        // The fewest steps (an even number: steps are packed in pairs) whose lanes hold n blocks.
        let steps = match n {
            0..=4 => 2,
            5..=8 => 4,
            _ => 8,
        };
        out.push(Group { first, blocks: n, steps, packed, unpacked });
        packed += steps / 2 * 64;
        unpacked += steps * 64;
        first += n;
    }
    out
}

/// A weight matrix (`rows` outputs × `cols` inputs) of 4-bit GGUF blocks, in the lane layout.
pub struct Q4Matrix {
    rows: usize,
    cols: usize,
    groups: Vec<Group>,
    /// Bytes of one packed weight row, of one quantized input row.
    packed_row: usize,
    unpacked_row: usize,
    /// `rows × packed_row`: nibble pairs.
    q: Vec<u8>,
    /// Per row and lane (`groups · 16` lanes): the weight scale and the min of the lane's block.
    d: Vec<f16>,
    m: Vec<f16>,
    kernel: Kernel,
}

/// Input rows quantized per block, in the lane layout: signed values, and per row and lane
/// the block's scale and `scale · Σ` of the lane's values (for the min term).
struct Quantized {
    q: Vec<i8>,
    d: Vec<f32>,
    dm: Vec<f32>,
}

impl Q4Matrix {
    /// Takes `raw`, `rows × cols / 32` GGUF blocks of `format` (row-major, as in the file).
    pub fn from_blocks(format: Q4Format, raw: &[u8], rows: usize, cols: usize) -> Result<Self, String> {
        let bs = format.block_bytes();
        if !cols.is_multiple_of(BLOCK) || raw.len() != rows * cols / BLOCK * bs {
            return Err(format!("{} bytes are not a {rows} × {cols} {format:?} matrix", raw.len()));
        }
        let blocks = cols / BLOCK;
        let groups = groups(blocks);
        let last = groups.last().copied().unwrap_or(Group { first: 0, blocks: 0, steps: 2, packed: 0, unpacked: 0 });
        let (packed_row, unpacked_row) = (last.packed + last.steps / 2 * 64, last.unpacked + last.steps * 64);
        let lanes = groups.len() * LANES;
        let mut q = vec![0u8; rows * packed_row];
        let (mut d, mut m) = (vec![f16::ZERO; rows * lanes], vec![f16::ZERO; rows * lanes]);
        let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
        for r in 0..rows {
            for (gi, g) in groups.iter().enumerate() {
                for lb in 0..g.blocks {
                    let block = &raw[(r * blocks + g.first + lb) * bs..][..bs];
                    let scale = half(block, 0);
                    let min = match format {
                        Q4Format::Q4_0 => f16::from_f32(-8.0 * scale.to_f32()),
                        Q4Format::Q4_1 => half(block, 2),
                    };
                    if !min.is_finite() || !scale.is_finite() {
                        return Err(format!("row {r}, block {}: a scale beyond f16", g.first + lb));
                    }
                    let nibbles = &block[bs - 16..];
                    for e in 0..BLOCK {
                        let v = if e < 16 { nibbles[e] & 0x0F } else { nibbles[e - 16] >> 4 };
                        let (step, at) = g.slot(lb, e);
                        q[r * packed_row + g.packed + step / 2 * 64 + at] |= v << (4 * (step % 2));
                    }
                    for l in 0..g.lanes_per_block() {
                        let lane = r * lanes + gi * LANES + lb * g.lanes_per_block() + l;
                        d[lane] = scale;
                        m[lane] = min;
                    }
                }
            }
        }
        Ok(Self { rows, cols, groups, packed_row, unpacked_row, q, d, m, kernel: Kernel::detect() })
    }

    /// The same matrix computed with another kernel (tests compare them).
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Bytes a product reads from this matrix (values and scales).
    pub fn bytes(&self) -> usize {
        self.q.len() + 2 * 2 * self.d.len()
    }

    /// `x · Wᵀ` for the `n` rows of `x` (`n × cols`): `out` is `n × rows`.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "q4 matmul: input size");
        assert_eq!(out.len(), n * self.rows, "q4 matmul: output size");
        thread_local! {
            static QUANTIZED: std::cell::RefCell<Quantized> =
                const { std::cell::RefCell::new(Quantized { q: Vec::new(), d: Vec::new(), dm: Vec::new() }) };
        }
        QUANTIZED.with(|cell| {
            let xq = &mut *cell.borrow_mut();
            self.quantize_input(x, n, xq);
            let xq = &*xq;
            let dst = OutPtr(out.as_mut_ptr());
            // Work items are (block of input rows, stripe of outputs), row blocks outermost: the
            // threads share a block's input and write one band of the output at a time, which
            // stays in cache instead of every stripe sweeping a prefill's whole output.
            let stripes = self.rows.div_ceil(STRIPE);
            let run = |range: std::ops::Range<usize>| {
                for item in range {
                    let (block, s) = (item / stripes, item % stripes);
                    let end = ((s + 1) * STRIPE).min(self.rows);
                    let block_rows = block * ROW_BLOCK..((block + 1) * ROW_BLOCK).min(n);
                    for r0 in block_rows.clone().step_by(MAX_ROWS) {
                        let rows = (block_rows.end - r0).min(MAX_ROWS);
                        let width = self.outs(rows);
                        let mut o0 = s * STRIPE;
                        while o0 < end {
                            let outs = (end - o0).min(width);
                            let mut res: Tile = [[0.0; MAX_ROWS]; MAX_OUTS];
                            self.tile(o0, outs, xq, r0, rows, &mut res);
                            for (j, col) in res[..outs].iter().enumerate() {
                                for (i, v) in col[..rows].iter().enumerate() {
                                    // SAFETY: (r0 + i, o0 + j) is inside `out` (n × rows, checked
                                    // above); stripes are disjoint in outputs.
                                    unsafe { *dst.at((r0 + i) * self.rows + o0 + j) = *v };
                                }
                            }
                            o0 += outs;
                        }
                    }
                }
            };
            let items = n.div_ceil(ROW_BLOCK) * stripes;
            if n * self.rows * self.cols < PARALLEL_MIN_WORK {
                run(0..items)
            } else {
                candle_core::utils::barrier_pool().execute_chunked(items, run)
            }
        });
    }

    /// Outputs per tile for `rows` input rows: as many as the registers hold sums for.
    fn outs(&self, rows: usize) -> usize {
        match (self.kernel, rows) {
            (Kernel::Vnni512, 1) => 8,
            (Kernel::Vnni512, 2) => 6,
            (Kernel::Vnni512, _) => 4,
            _ => 1,
        }
    }

    /// Quantizes the `n` rows of `x` into `xq`, in the lane layout; a prefill's rows spread
    /// over the pool (each row is written by one task, the same way whatever the split).
    fn quantize_input(&self, x: &[f32], n: usize, xq: &mut Quantized) {
        let lanes = self.groups.len() * LANES;
        xq.q.clear();
        xq.q.resize(n * self.unpacked_row, 0);
        xq.d.clear();
        xq.d.resize(n * lanes, 0.0);
        xq.dm.clear();
        xq.dm.resize(n * lanes, 0.0);
        let (q, d, dm) = (OutPtr(xq.q.as_mut_ptr()), OutPtr(xq.d.as_mut_ptr()), OutPtr(xq.dm.as_mut_ptr()));
        let run = |rows: std::ops::Range<usize>| {
            for r in rows {
                // SAFETY: row r's regions of the three buffers (sized above) are written by
                // this task alone.
                let (q, d, dm) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(q.at(r * self.unpacked_row), self.unpacked_row),
                        std::slice::from_raw_parts_mut(d.at(r * lanes), lanes),
                        std::slice::from_raw_parts_mut(dm.at(r * lanes), lanes),
                    )
                };
                self.quantize_row(&x[r * self.cols..][..self.cols], q, d, dm);
            }
        };
        if n * self.cols < PARALLEL_MIN_WORK / 8 {
            run(0..n)
        } else {
            candle_core::utils::barrier_pool().execute_chunked(n, run)
        }
    }

    /// One input row into its lane layout (`q`), lane scales (`d`) and `scale · Σ` (`dm`).
    fn quantize_row(&self, x: &[f32], q: &mut [i8], d: &mut [f32], dm: &mut [f32]) {
        let mut tmp = [0i8; BLOCK];
        for (gi, g) in self.groups.iter().enumerate() {
            let lpb = g.lanes_per_block();
            for lb in 0..g.blocks {
                let scale = quantize_block(&x[(g.first + lb) * BLOCK..][..BLOCK], &mut tmp);
                for s in 0..BLOCK_STEPS {
                    let (k, lane) = (s % g.steps, lb * lpb + s / g.steps);
                    q[g.unpacked + k * 64 + lane * 4..][..4].copy_from_slice(&tmp[4 * s..4 * s + 4]);
                }
                let span = 4 * g.steps;
                for l in 0..lpb {
                    let sum: i32 = tmp[l * span..(l + 1) * span].iter().map(|&v| v as i32).sum();
                    let lane = gi * LANES + lb * lpb + l;
                    d[lane] = scale;
                    dm[lane] = scale * sum as f32;
                }
            }
        }
    }

    fn tile(&self, o0: usize, outs: usize, x: &Quantized, r0: usize, rows: usize, res: &mut Tile) {
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: chosen only when the CPU has these features (Kernel::detect); the tile is
            // inside the matrix and the input (the callers' loops).
            Kernel::Vnni512 => unsafe {
                match (outs, rows) {
                    (8, 1) => self.tile_vnni512::<8, 1>(o0, x, r0, res),
                    (6, 2) => self.tile_vnni512::<6, 2>(o0, x, r0, res),
                    (4, 3) => self.tile_vnni512::<4, 3>(o0, x, r0, res),
                    (4, 4) => self.tile_vnni512::<4, 4>(o0, x, r0, res),
                    // A stripe's last, narrower tile: one output at a time.
                    _ => {
                        for j in 0..outs {
                            let mut one: Tile = [[0.0; MAX_ROWS]; MAX_OUTS];
                            match rows {
                                1 => self.tile_vnni512::<1, 1>(o0 + j, x, r0, &mut one),
                                2 => self.tile_vnni512::<1, 2>(o0 + j, x, r0, &mut one),
                                3 => self.tile_vnni512::<1, 3>(o0 + j, x, r0, &mut one),
                                _ => self.tile_vnni512::<1, 4>(o0 + j, x, r0, &mut one),
                            }
                            res[j] = one[0];
                        }
                    }
                }
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx2 => (0..outs).for_each(|j| unsafe { self.dot_avx2(o0 + j, x, r0, rows, &mut res[j]) }),
            _ => (0..outs).for_each(|j| self.dot_portable(o0 + j, x, r0, rows, &mut res[j])),
        }
    }

    /// The reference: per lane the integer dot product, scaled and min-corrected, lanes summed.
    fn dot_portable(&self, o: usize, x: &Quantized, r0: usize, rows: usize, res: &mut [f32; MAX_ROWS]) {
        let lanes = self.groups.len() * LANES;
        for (i, out) in res.iter_mut().enumerate().take(rows) {
            let r = r0 + i;
            let mut acc = [0f32; LANES];
            for (gi, g) in self.groups.iter().enumerate() {
                for (lane, a) in acc.iter_mut().enumerate() {
                    let mut dot = 0i32;
                    for step in 0..g.steps {
                        for byte in 0..4 {
                            let at = lane * 4 + byte;
                            let w =
                                self.q[o * self.packed_row + g.packed + step / 2 * 64 + at] >> (4 * (step % 2)) & 0x0F;
                            let v = x.q[r * self.unpacked_row + g.unpacked + step * 64 + at];
                            dot += w as i32 * v as i32;
                        }
                    }
                    let (wl, xl) = (o * lanes + gi * LANES + lane, r * lanes + gi * LANES + lane);
                    *a += dot as f32 * self.d[wl].to_f32() * x.d[xl];
                    *a += self.m[wl].to_f32() * x.dm[xl];
                }
            }
            *out = acc.iter().sum();
        }
    }

    /// Outputs `o0..o0 + O` for input rows `r0..r0 + R`: per pair of steps, each output's
    /// weights loaded and unpacked once for all `R` rows, each row's input once for all `O`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn tile_vnni512<const O: usize, const R: usize>(&self, o0: usize, x: &Quantized, r0: usize, res: &mut Tile) {
        // SAFETY: the caller checked the CPU features; every row holds its groups' full 64-byte
        // steps and 16 lanes each (`o0 + O ≤ self.rows`, `r0 + R ≤ n`).
        unsafe {
            use std::arch::x86_64::*;
            let lanes = self.groups.len() * LANES;
            let nibble = _mm512_set1_epi8(0x0F);
            let mut acc = [[_mm512_setzero_ps(); R]; O];
            for (gi, g) in self.groups.iter().enumerate() {
                let mut sums = [[_mm512_setzero_si512(); R]; O];
                for t in 0..g.steps / 2 {
                    let off = g.packed + t * 64;
                    let w: [(__m512i, __m512i); O] = std::array::from_fn(|j| {
                        let p = _mm512_loadu_si512(self.q.as_ptr().add((o0 + j) * self.packed_row + off) as *const _);
                        (_mm512_and_si512(p, nibble), _mm512_and_si512(_mm512_srli_epi16::<4>(p), nibble))
                    });
                    // The next tile's weights, on their way while this one runs (a hint: past
                    // the matrix's end it is dropped, never dereferenced).
                    for j in 0..O {
                        let ahead = self.q.as_ptr().wrapping_add((o0 + O + j) * self.packed_row + off);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                    for i in 0..R {
                        let xp = x.q.as_ptr().add((r0 + i) * self.unpacked_row + g.unpacked + 2 * t * 64);
                        let lo = _mm512_loadu_si512(xp as *const _);
                        let hi = _mm512_loadu_si512(xp.add(64) as *const _);
                        for j in 0..O {
                            sums[j][i] = _mm512_dpbusd_epi32(sums[j][i], w[j].0, lo);
                            sums[j][i] = _mm512_dpbusd_epi32(sums[j][i], w[j].1, hi);
                        }
                    }
                }
                for j in 0..O {
                    let at = (o0 + j) * lanes + gi * LANES;
                    let wd = _mm512_cvtph_ps(_mm256_loadu_si256(self.d.as_ptr().add(at) as *const _));
                    let wm = _mm512_cvtph_ps(_mm256_loadu_si256(self.m.as_ptr().add(at) as *const _));
                    for i in 0..R {
                        let xl = (r0 + i) * lanes + gi * LANES;
                        let xd = _mm512_loadu_ps(x.d.as_ptr().add(xl));
                        let xm = _mm512_loadu_ps(x.dm.as_ptr().add(xl));
                        let t = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[j][i]), wd);
                        acc[j][i] = _mm512_fmadd_ps(t, xd, acc[j][i]);
                        acc[j][i] = _mm512_fmadd_ps(wm, xm, acc[j][i]);
                    }
                }
            }
            for j in 0..O {
                for i in 0..R {
                    res[j][i] = _mm512_reduce_add_ps(acc[j][i]);
                }
            }
        }
    }

    /// One output for input rows `r0..r0 + rows`: the VNNI kernel's lanes in two halves of
    /// eight, with `vpmaddubsw` (pairs of 4-bit × int8 products fit in i16) for `vpdpbusd`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2(&self, o: usize, x: &Quantized, r0: usize, rows: usize, res: &mut [f32; MAX_ROWS]) {
        // SAFETY: the caller checked the CPU features; loads stay inside the rows' groups.
        unsafe {
            use std::arch::x86_64::*;
            let lanes = self.groups.len() * LANES;
            let nibble = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [[_mm256_setzero_ps(); 2]; MAX_ROWS];
            for (gi, g) in self.groups.iter().enumerate() {
                for h in 0..2 {
                    let mut sums = [_mm256_setzero_si256(); MAX_ROWS];
                    for t in 0..g.steps / 2 {
                        let p = _mm256_loadu_si256(
                            self.q.as_ptr().add(o * self.packed_row + g.packed + t * 64 + h * 32) as *const _,
                        );
                        let (wlo, whi) =
                            (_mm256_and_si256(p, nibble), _mm256_and_si256(_mm256_srli_epi16::<4>(p), nibble));
                        for (i, sum) in sums.iter_mut().enumerate().take(rows) {
                            let xp = x.q.as_ptr().add((r0 + i) * self.unpacked_row + g.unpacked + 2 * t * 64 + h * 32);
                            let lo = _mm256_loadu_si256(xp as *const _);
                            let hi = _mm256_loadu_si256(xp.add(64) as *const _);
                            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(_mm256_maddubs_epi16(wlo, lo), ones));
                            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(_mm256_maddubs_epi16(whi, hi), ones));
                        }
                    }
                    let at = o * lanes + gi * LANES + h * 8;
                    let wd = _mm256_cvtph_ps(_mm_loadu_si128(self.d.as_ptr().add(at) as *const _));
                    let wm = _mm256_cvtph_ps(_mm_loadu_si128(self.m.as_ptr().add(at) as *const _));
                    for i in 0..rows {
                        let xl = (r0 + i) * lanes + gi * LANES + h * 8;
                        let xd = _mm256_loadu_ps(x.d.as_ptr().add(xl));
                        let xm = _mm256_loadu_ps(x.dm.as_ptr().add(xl));
                        let t = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[i]), wd);
                        acc[i][h] = _mm256_fmadd_ps(t, xd, acc[i][h]);
                        acc[i][h] = _mm256_fmadd_ps(wm, xm, acc[i][h]);
                    }
                }
            }
            for i in 0..rows {
                let v = _mm256_add_ps(acc[i][0], acc[i][1]);
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                res[i] = _mm_cvtss_f32(s);
            }
        }
    }
}

/// The machine's int8 dot-product peak, GOP/s (2 per multiply-add) on `threads` threads: a
/// loop of independent `vpdpbusd` on registers, or `None` without AVX-512 VNNI.
pub fn peak_int8_gops(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if Kernel::detect() == Kernel::Vnni512 {
        const ITERS: usize = 1 << 22;
        const CHAINS: usize = 12;
        let start = std::time::Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                // SAFETY: the CPU has AVX-512 VNNI (checked above).
                s.spawn(|| std::hint::black_box(unsafe { spin_vnni512::<CHAINS>(ITERS) }));
            }
        });
        let ops = (threads.max(1) * ITERS * CHAINS * 64 * 2) as f64;
        return Some(ops / start.elapsed().as_secs_f64() / 1e9);
    }
    let _ = threads;
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn spin_vnni512<const CHAINS: usize>(iters: usize) -> i32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_epi8(1), _mm512_set1_epi8(std::hint::black_box(1)));
    let mut acc = [_mm512_setzero_si512(); CHAINS];
    for _ in 0..iters {
        for c in acc.iter_mut() {
            *c = _mm512_dpbusd_epi32(*c, a, b);
        }
    }
    acc.iter().map(|&c| _mm512_reduce_add_epi32(c)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q4_1 blocks of a pseudo-random matrix, and the f32 weights they stand for.
    pub(crate) fn q4_1(rows: usize, cols: usize, seed: usize) -> (Vec<u8>, Vec<f32>) {
        let (mut raw, mut w) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for b in 0..cols / BLOCK {
                let i = (r * cols / BLOCK + b) * 2654435761 + seed;
                let d = f16::from_f32(0.002 + (i % 97) as f32 * 1e-4);
                let m = f16::from_f32(-((i % 13) as f32) * 0.003);
                raw.extend_from_slice(&d.to_le_bytes());
                raw.extend_from_slice(&m.to_le_bytes());
                let q: Vec<u8> = (0..BLOCK).map(|e| ((i / 7 + e * 5 + e * e) % 16) as u8).collect();
                raw.extend((0..16).map(|e| q[e] | q[e + 16] << 4));
                w.extend(q.iter().map(|&q| d.to_f32() * q as f32 + m.to_f32()));
            }
        }
        (raw, w)
    }

    fn input(n: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..n * cols).map(|i| (((i * 7919 + seed) % 2003) as f32 / 1001.0 - 1.0) * 0.5).collect()
    }

    fn kernels() -> Vec<Kernel> {
        let mut out = vec![Kernel::detect()];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            out.push(Kernel::Avx2);
        }
        out.push(Kernel::Portable);
        out.dedup();
        out
    }

    /// Every kernel computes what the portable reference does (up to f32 summation order),
    /// which is close to the f32 product of the weights the blocks stand for; for widths
    /// whose last group is full, short (2..16 blocks) or spread over 2, 4 or 8 steps.
    #[test]
    fn kernels_agree_with_the_reference_and_with_f32() {
        for cols in [576, 1536, 32, 96, 224, 416] {
            let (rows, n) = (37, 6);
            let (raw, w) = q4_1(rows, cols, cols);
            let x = input(n, cols, 5);
            let reference =
                Q4Matrix::from_blocks(Q4Format::Q4_1, &raw, rows, cols).unwrap().with_kernel(Kernel::Portable);
            let mut want = vec![0f32; n * rows];
            reference.matmul(&x, n, &mut want);
            for r in 0..n {
                for o in 0..rows {
                    let exact: f32 = (0..cols).map(|c| x[r * cols + c] * w[o * cols + c]).sum();
                    let scale: f32 = (0..cols).map(|c| (x[r * cols + c] * w[o * cols + c]).abs()).sum();
                    let got = want[r * rows + o];
                    assert!((got - exact).abs() <= 0.01 * scale + 1e-4, "{cols}: {r},{o}: {got} vs {exact}");
                }
            }
            for k in kernels() {
                let m = Q4Matrix::from_blocks(Q4Format::Q4_1, &raw, rows, cols).unwrap().with_kernel(k);
                let mut got = vec![0f32; n * rows];
                m.matmul(&x, n, &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{cols} {k:?} at {i}: {a} vs {b}");
                }
            }
        }
    }

    /// Q4_0 blocks are `d · (q − 8)`: the same products as Q4_1 blocks with `m = −8d`.
    #[test]
    fn q4_0_blocks_are_q4_1_with_the_min_at_minus_eight_scales() {
        let (rows, cols) = (9, 96);
        let (q41, _) = q4_1(rows, cols, 2);
        let mut q40 = Vec::new();
        let mut as41 = Vec::new();
        for b in q41.chunks_exact(20) {
            q40.extend_from_slice(&b[..2]);
            q40.extend_from_slice(&b[4..]);
            let d = f16::from_le_bytes([b[0], b[1]]);
            as41.extend_from_slice(&b[..2]);
            as41.extend_from_slice(&f16::from_f32(-8.0 * d.to_f32()).to_le_bytes());
            as41.extend_from_slice(&b[4..]);
        }
        let x = input(3, cols, 1);
        let (mut a, mut b) = (vec![0f32; 3 * rows], vec![0f32; 3 * rows]);
        Q4Matrix::from_blocks(Q4Format::Q4_0, &q40, rows, cols).unwrap().matmul(&x, 3, &mut a);
        Q4Matrix::from_blocks(Q4Format::Q4_1, &as41, rows, cols).unwrap().matmul(&x, 3, &mut b);
        assert_eq!(a, b);
        assert!(Q4Matrix::from_blocks(Q4Format::Q4_0, &q40[1..], rows, cols).is_err());
    }

    /// A row's result does not depend on the rows beside it or on how many there are —
    /// decode tiles, prefill tiles, the calling thread or the pool.
    #[test]
    fn a_row_gets_the_same_result_alone_or_in_a_batch() {
        for (rows, cols) in [(33, 576), (301, 1536), (200, 576)] {
            let (raw, _) = q4_1(rows, cols, 3);
            let m = Q4Matrix::from_blocks(Q4Format::Q4_1, &raw, rows, cols).unwrap();
            let big = 37;
            let x = input(big, cols, 11);
            let mut all = vec![0f32; big * rows];
            m.matmul(&x, big, &mut all);
            for r in [0, 5, 36] {
                for n in [1, 2, 3, 4, 9] {
                    let mut some = vec![0f32; n * rows];
                    let mut rowsx = x[r * cols..(r + 1) * cols].to_vec();
                    rowsx.extend(x.iter().take((n - 1) * cols));
                    m.matmul(&rowsx, n, &mut some);
                    assert!(some[..rows] == all[r * rows..(r + 1) * rows], "{rows}×{cols}: row {r} with {n}");
                }
            }
        }
    }
}
