//! Matrix products on int8 dot products for the GGUF's Q4_0, Q4_1 and Q8_0 blocks, for
//! decode and prefill alike.
//!
//! Owns the layout of quantized weights taken as the GGUF ships them (no re-quantization: the
//! products use exactly the weights the f32 path dequantizes), the kernels that multiply them
//! by int8-quantized inputs (AVX-512 VNNI, AVX2, portable code; one chosen per process), and
//! the quantization of inputs. A decode step reads 20 bytes per 32 weights of Q4_1 (34 of
//! Q8_0); a prefill runs the same kernels in larger register tiles, where the CPU's int8 dot
//! products do 64 multiply-adds per instruction against f32's 16.
//!
//! Layout. A 4-bit weight's value `q` is 0..15 (`w = d·q + m`; Q4_0 is `m = −8d`); an 8-bit
//! one is stored as `q + 128`, 0..255 (`w = d·q`). A row's blocks of 32 are taken sixteen at
//! a time (a *group*) into sixteen 4-byte lanes: in a full group a lane is one block and
//! holds its values in 8 *steps* of 4 bytes. The last group of a row whose block count is not
//! a multiple of 16 spreads each block over several lanes (2, 4 or 8 steps each), so that a
//! 576-wide row costs 9 steps' work, not 16; a last group of one or two blocks (two steps
//! each, four lanes a block) is eight lanes wide, so that it is stored and read at 32 bytes a
//! step, not 64. Unused lanes hold zero values and zero scales, so every load is a full
//! step. Steps come in pairs: 4-bit weights share a step's bytes, one step in the low
//! nibbles and one in the high (a load and two masks give two steps of the group's lanes);
//! 8-bit weights take a byte a value. An input row is quantized per block (as Q8_0) into the
//! same lanes, signed, unpacked.
//!
//! Per group, `vpdpbusd` adds 4 products of unsigned weight and signed input bytes into each
//! lane (exact, in i32). For 4-bit weights the group's lanes are then scaled by the weight's
//! `d` and the input's scale and the min term `m · d_x · Σx` added, in f32; for 8-bit ones
//! the `128 · Σx` the stored offset adds is taken off each lane's integer sum exactly before
//! scaling (the offset is made when the input is quantized). The sixteen lanes are summed
//! once at the end, a tile's sums all in one tree of shuffles. A lane's integer sum does not
//! depend on the order of its products, and the f32 steps run in the same order for every
//! output whatever the tile, batch or thread split — so a row's result does not depend on the
//! rows beside it (batch invariance), and a slice of a prompt gets the same result as the
//! whole prompt.

use half::f16;

use super::OutPtr;

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

/// Weight lines on their way into L2, a share at a time: a hint, which changes no result.
struct Ahead {
    /// Per region (values, scales, mins): its next line, the lines left and those of a share.
    regions: [(*const u8, usize, usize); 3],
}

impl Ahead {
    /// Asks for the next share of every region's lines (the rows come in order in each, as
    /// the tiles need them).
    fn share(&mut self) {
        for (p, left, per_share) in &mut self.regions {
            let n = (*per_share).min(*left);
            for _ in 0..n {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: prefetching reads nothing; the addresses lie inside the matrix anyway.
                unsafe {
                    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
                    _mm_prefetch::<_MM_HINT_T1>(p.cast());
                }
                *p = p.wrapping_add(64);
            }
            *left -= n;
        }
    }
}

/// Results of a tile: `[output][input row]`.
type Tile = [[f32; MAX_ROWS]; MAX_OUTS];

/// The kernel this process runs, chosen once from the CPU's features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Vnni512,
    Avx2,
    Portable,
}

impl Kernel {
    /// The best kernel this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") && has!("f16c") {
                return Kernel::Vnni512;
            }
            if has!("avx2") && has!("fma") && has!("f16c") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Vnni512 => "AVX-512 VNNI int8 dot products",
            Kernel::Avx2 => "AVX2 int8 dot products",
            Kernel::Portable => "portable int8 dot products",
        }
    }
}

/// The GGUF block formats taken as shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `d` (f16), 16 bytes of nibbles; `w = d·(q − 8)`.
    Q4_0,
    /// `d`, `m` (f16), 16 bytes of nibbles; `w = d·q + m`.
    Q4_1,
    /// `d` (f16), 32 signed bytes; `w = d·q`.
    Q8_0,
}

impl Format {
    /// Bytes of one GGUF block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }

    /// A value takes a byte (else a nibble).
    fn wide(self) -> bool {
        self == Format::Q8_0
    }
}

/// Quantizes one block to int8 (as Q8_0); returns its scale: `d = max|x| / 127`, each value
/// `x / d` rounded half to even. A decode step quantizes every input row of every matmul;
/// the AVX-512 form gets the same bytes as the portable one.
pub(super) fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    assert!(x.len() == BLOCK && q.len() == BLOCK, "quantize_block: a block of {BLOCK}");
    #[cfg(target_arch = "x86_64")]
    if *super::HAS_AVX512 {
        // SAFETY: the CPU has AVX-512F; both slices hold a block (asserted).
        return unsafe { quantize_block_avx512(x, q) };
    }
    quantize_block_portable(x, q)
}

/// [`quantize_block`] in plain code, written so that it vectorizes (eight running maxima).
fn quantize_block_portable(x: &[f32], q: &mut [i8]) -> f32 {
    let mut m = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, v) in m.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = m.iter().fold(0f32, |a, &b| a.max(b));
    let (d, inv) = block_scale(amax);
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// The scale of a block whose largest magnitude is `amax`, and its inverse (0 for a block of
/// zeros).
fn block_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// [`quantize_block`] in two registers: the CPU's conversion rounds half to even.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: the caller checked the CPU and that x and q hold 32 values.
    unsafe {
        let (a, b) = (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16)));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let (d, inv) = block_scale(amax);
        let inv = _mm512_set1_ps(inv);
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        for (half, v) in [a, b].into_iter().enumerate() {
            let r = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), lo), hi);
            _mm_storeu_si128(q.as_mut_ptr().add(16 * half) as *mut __m128i, _mm512_cvtepi32_epi8(r));
        }
        d
    }
}

/// Sixteen lanes (eight in a last group of one or two blocks) over `blocks` blocks of a row.
#[derive(Debug, Clone, Copy)]
struct Group {
    first: usize,
    blocks: usize,
    /// Steps each lane holds: 8 (a lane per block), or 4 or 2 in a short last group.
    steps: usize,
    /// Lanes: 16, or 8.
    width: usize,
    /// The group's first lane in a row's scales.
    lane0: usize,
    /// Offset of the group in a weight row.
    packed: usize,
    /// Offset of the group in a quantized input row.
    unpacked: usize,
}

impl Group {
    /// Bytes of one step of the group's lanes (4 per lane).
    fn step_bytes(&self) -> usize {
        4 * self.width
    }

    /// Lanes one block spreads over.
    fn lanes_per_block(&self) -> usize {
        BLOCK_STEPS / self.steps
    }

    /// Where value `e` of local block `b` sits: (step, byte offset within the step).
    fn slot(&self, b: usize, e: usize) -> (usize, usize) {
        let s = e / 4;
        let lane = b * self.lanes_per_block() + s / self.steps;
        (s % self.steps, lane * 4 + e % 4)
    }
}

/// The groups of a row of `blocks` blocks; `wide` values take a byte, others a nibble.
fn groups(blocks: usize, wide: bool) -> Vec<Group> {
    let mut out = Vec::new();
    let (mut first, mut packed, mut unpacked, mut lane0) = (0, 0, 0, 0);
    while first < blocks {
        let n = (blocks - first).min(LANES);
        // The fewest steps (an even number: steps are packed in pairs) whose lanes hold n blocks.
        let steps = match n {
            0..=4 => 2,
            5..=8 => 4,
            _ => 8,
        };
        let width = if n * BLOCK_STEPS / steps <= LANES / 2 { LANES / 2 } else { LANES };
        let g = Group { first, blocks: n, steps, width, lane0, packed, unpacked };
        packed += if wide { steps * g.step_bytes() } else { steps / 2 * g.step_bytes() };
        unpacked += steps * g.step_bytes();
        lane0 += width;
        first += n;
        out.push(g);
    }
    out
}

/// A weight matrix (`rows` outputs × `cols` inputs) of GGUF blocks, in the lane layout.
pub struct Int8Matrix {
    format: Format,
    rows: usize,
    cols: usize,
    groups: Vec<Group>,
    /// Lanes of a row (the groups' widths summed).
    lanes: usize,
    /// Bytes of one weight row, of one quantized input row.
    packed_row: usize,
    unpacked_row: usize,
    /// `rows × packed_row`: nibble pairs, or bytes (`q + 128`) of 8-bit formats.
    q: Vec<u8>,
    /// Per row and lane (`lanes` of them): the weight scale and (4-bit formats) the min
    /// of the lane's block.
    d: Vec<f16>,
    m: Vec<f16>,
    kernel: Kernel,
}

/// Input rows quantized per block, in the lane layout: signed values, and per row and lane
/// the block's scale, `128 · Σ` of the lane's values (what 8-bit weights' stored `+ 128` adds
/// to the lane's integer sum), and `scale · Σ` (for 4-bit weights' min term).
struct Quantized {
    q: Vec<i8>,
    d: Vec<f32>,
    offset: Vec<i32>,
    dm: Vec<f32>,
}

/// One row's parts of a [`Quantized`].
struct Row<'a> {
    q: &'a mut [i8],
    d: &'a mut [f32],
    offset: &'a mut [i32],
    dm: &'a mut [f32],
}

impl Int8Matrix {
    /// Takes `raw`, `rows × cols / 32` GGUF blocks of `format` (row-major, as in the file).
    pub fn from_blocks(format: Format, raw: &[u8], rows: usize, cols: usize) -> Result<Self, String> {
        let bs = format.block_bytes();
        if !cols.is_multiple_of(BLOCK) || raw.len() != rows * cols / BLOCK * bs {
            return Err(format!("{} bytes are not a {rows} × {cols} {format:?} matrix", raw.len()));
        }
        let wide = format.wide();
        let blocks = cols / BLOCK;
        let groups = groups(blocks, wide);
        let empty = Group { first: 0, blocks: 0, steps: 2, width: 0, lane0: 0, packed: 0, unpacked: 0 };
        let last = groups.last().copied().unwrap_or(empty);
        let sb = last.step_bytes();
        let packed_row = last.packed + if wide { last.steps * sb } else { last.steps / 2 * sb };
        let unpacked_row = last.unpacked + last.steps * sb;
        let lanes = last.lane0 + last.width;
        let mut q = vec![0u8; rows * packed_row];
        let mut d = vec![f16::ZERO; rows * lanes];
        let mut m = vec![f16::ZERO; if wide { 0 } else { rows * lanes }];
        let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
        for r in 0..rows {
            for g in &groups {
                for lb in 0..g.blocks {
                    let block = &raw[(r * blocks + g.first + lb) * bs..][..bs];
                    let scale = half(block, 0);
                    let min = match format {
                        Format::Q4_0 => f16::from_f32(-8.0 * scale.to_f32()),
                        Format::Q4_1 => half(block, 2),
                        Format::Q8_0 => f16::ZERO,
                    };
                    if !min.is_finite() || !scale.is_finite() {
                        return Err(format!("row {r}, block {}: a scale beyond f16", g.first + lb));
                    }
                    let values = &block[bs - if wide { BLOCK } else { BLOCK / 2 }..];
                    for e in 0..BLOCK {
                        let (step, at) = g.slot(lb, e);
                        let row = r * packed_row + g.packed + at;
                        if wide {
                            // q + 128 as u8 flips the sign bit.
                            q[row + step * g.step_bytes()] = values[e] ^ 0x80;
                        } else {
                            let v = if e < 16 { values[e] & 0x0F } else { values[e - 16] >> 4 };
                            q[row + step / 2 * g.step_bytes()] |= v << (4 * (step % 2));
                        }
                    }
                    for l in 0..g.lanes_per_block() {
                        let lane = g.lane0 + lb * g.lanes_per_block() + l;
                        d[r * lanes + lane] = scale;
                        if !wide {
                            m[r * lanes + lane] = min;
                        }
                    }
                }
            }
        }
        Ok(Self { format, rows, cols, groups, lanes, packed_row, unpacked_row, q, d, m, kernel: Kernel::detect() })
    }

    /// Quantizes `w` (`rows × cols`, row-major; `cols` a multiple of 32) to Q8_0, as GGUF's
    /// quantizer does (for weights shipped in no format of [`Format`]).
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return Err(format!("a {rows} × {cols} matrix cannot be held in blocks of {BLOCK}"));
        }
        let mut raw = Vec::with_capacity(rows * cols / BLOCK * Format::Q8_0.block_bytes());
        let mut tmp = [0i8; BLOCK];
        for block in w.chunks_exact(BLOCK) {
            let d = quantize_block(block, &mut tmp);
            raw.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            raw.extend(tmp.iter().map(|&v| v as u8));
        }
        Self::from_blocks(Format::Q8_0, &raw, rows, cols)
    }

    pub fn format(&self) -> Format {
        self.format
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
        assert_eq!(x.len(), n * self.cols, "int8 matmul: input size");
        assert_eq!(out.len(), n * self.rows, "int8 matmul: output size");
        thread_local! {
            static QUANTIZED: std::cell::RefCell<Quantized> =
                const { std::cell::RefCell::new(Quantized { q: Vec::new(), d: Vec::new(), offset: Vec::new(), dm: Vec::new() }) };
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
                    // The next stripe's weights on their way into L2 while this one is worked,
                    // a share before each tile: a decode step streams every weight from memory
                    // once, and a stripe's rows are too short for the hardware to see the
                    // stream; asked for all at once, they would stall the core until most came.
                    let next = end..(end + STRIPE).min(self.rows);
                    let tiles: usize = block_rows
                        .clone()
                        .step_by(MAX_ROWS)
                        .map(|r0| (end - s * STRIPE).div_ceil(self.outs((block_rows.end - r0).min(MAX_ROWS))))
                        .sum();
                    let mut ahead = self.ahead(next, tiles);
                    for r0 in block_rows.clone().step_by(MAX_ROWS) {
                        let rows = (block_rows.end - r0).min(MAX_ROWS);
                        let width = self.outs(rows);
                        let mut o0 = s * STRIPE;
                        while o0 < end {
                            let outs = (end - o0).min(width);
                            ahead.share();
                            // SAFETY: rows r0.. and outputs o0.. of the tile are inside `out`
                            // (n × rows, checked above); stripes are disjoint in outputs.
                            unsafe { self.tile(o0, outs, xq, r0, rows, dst) };
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

    /// The lines of weight rows `rows` (their values and scales), to be asked into L2 over
    /// `tiles` tiles.
    fn ahead(&self, rows: std::ops::Range<usize>, tiles: usize) -> Ahead {
        let lanes = self.lanes;
        let q = &self.q[rows.start * self.packed_row..rows.end * self.packed_row];
        let d = &self.d[rows.start * lanes..rows.end * lanes];
        let m = self.m.get(rows.start * lanes..rows.end * lanes).unwrap_or_default();
        let region = |p: *const u8, bytes: usize| {
            let lines = bytes.div_ceil(64);
            (p, lines, lines.div_ceil(tiles.max(1)))
        };
        Ahead {
            regions: [
                region(q.as_ptr(), q.len()),
                region(d.as_ptr().cast(), 2 * d.len()),
                region(m.as_ptr().cast(), 2 * m.len()),
            ],
        }
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
        let lanes = self.lanes;
        xq.q.clear();
        xq.q.resize(n * self.unpacked_row, 0);
        xq.d.clear();
        xq.d.resize(n * lanes, 0.0);
        xq.offset.clear();
        xq.offset.resize(n * lanes, 0);
        xq.dm.clear();
        xq.dm.resize(n * lanes, 0.0);
        let (q, d) = (OutPtr(xq.q.as_mut_ptr()), OutPtr(xq.d.as_mut_ptr()));
        let (offset, dm) = (OutPtr(xq.offset.as_mut_ptr()), OutPtr(xq.dm.as_mut_ptr()));
        let run = |rows: std::ops::Range<usize>| {
            for r in rows {
                // SAFETY: row r's regions of the four buffers (sized above) are written by
                // this task alone.
                let row = unsafe {
                    Row {
                        q: std::slice::from_raw_parts_mut(q.at(r * self.unpacked_row), self.unpacked_row),
                        d: std::slice::from_raw_parts_mut(d.at(r * lanes), lanes),
                        offset: std::slice::from_raw_parts_mut(offset.at(r * lanes), lanes),
                        dm: std::slice::from_raw_parts_mut(dm.at(r * lanes), lanes),
                    }
                };
                self.quantize_row(&x[r * self.cols..][..self.cols], row);
            }
        };
        if n * self.cols < PARALLEL_MIN_WORK / 8 {
            run(0..n)
        } else {
            candle_core::utils::barrier_pool().execute_chunked(n, run)
        }
    }

    /// One input row into its lane layout.
    fn quantize_row(&self, x: &[f32], Row { q, d, offset, dm }: Row) {
        let mut tmp = [0i8; BLOCK];
        for g in &self.groups {
            let lpb = g.lanes_per_block();
            for lb in 0..g.blocks {
                let scale = quantize_block(&x[(g.first + lb) * BLOCK..][..BLOCK], &mut tmp);
                for s in 0..BLOCK_STEPS {
                    let (k, lane) = (s % g.steps, lb * lpb + s / g.steps);
                    q[g.unpacked + k * g.step_bytes() + lane * 4..][..4].copy_from_slice(&tmp[4 * s..4 * s + 4]);
                }
                let span = 4 * g.steps;
                for l in 0..lpb {
                    let sum: i32 = tmp[l * span..(l + 1) * span].iter().map(|&v| v as i32).sum();
                    let lane = g.lane0 + lb * lpb + l;
                    d[lane] = scale;
                    offset[lane] = 128 * sum;
                    dm[lane] = scale * sum as f32;
                }
            }
        }
    }

    /// Outputs `o0..o0 + outs` of input rows `r0..r0 + rows`, written into `dst` (the product's
    /// `n × self.rows` output).
    ///
    /// # Safety
    /// The tile must be inside the matrix, the input and `dst`, in a region only this task writes.
    unsafe fn tile(&self, o0: usize, outs: usize, x: &Quantized, r0: usize, rows: usize, dst: OutPtr<f32>) {
        let mut res: Tile = [[0.0; MAX_ROWS]; MAX_OUTS];
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: chosen only when the CPU has these features (Kernel::detect); the tile is
            // inside the matrix, the input and `dst` (the caller's contract).
            Kernel::Vnni512 => unsafe {
                return match self.format.wide() {
                    false => self.tile_vnni512_shaped::<false>(o0, outs, x, r0, rows, dst),
                    true => self.tile_vnni512_shaped::<true>(o0, outs, x, r0, rows, dst),
                };
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx2 => (0..outs).for_each(|j| unsafe {
                match self.format.wide() {
                    false => self.dot_avx2::<false>(o0 + j, x, r0, rows, &mut res[j]),
                    true => self.dot_avx2::<true>(o0 + j, x, r0, rows, &mut res[j]),
                }
            }),
            _ => (0..outs).for_each(|j| self.dot_portable(o0 + j, x, r0, rows, &mut res[j])),
        }
        for (j, col) in res[..outs].iter().enumerate() {
            for (i, v) in col[..rows].iter().enumerate() {
                // SAFETY: (r0 + i, o0 + j) is inside `dst`, written by this task alone (the
                // caller's contract).
                unsafe { *dst.at((r0 + i) * self.rows + o0 + j) = *v };
            }
        }
    }

    /// The VNNI tile of this shape, monomorphised so that its sums live in registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn tile_vnni512_shaped<const WIDE: bool>(
        &self,
        o0: usize,
        outs: usize,
        x: &Quantized,
        r0: usize,
        rows: usize,
        dst: OutPtr<f32>,
    ) {
        // SAFETY: as in `tile`.
        unsafe {
            match (outs, rows) {
                (8, 1) => self.tile_vnni512::<8, 1, WIDE>(o0, x, r0, dst),
                (6, 2) => self.tile_vnni512::<6, 2, WIDE>(o0, x, r0, dst),
                (4, 3) => self.tile_vnni512::<4, 3, WIDE>(o0, x, r0, dst),
                (4, 4) => self.tile_vnni512::<4, 4, WIDE>(o0, x, r0, dst),
                // A stripe's last, narrower tile: one output at a time.
                _ => {
                    for j in 0..outs {
                        match rows {
                            1 => self.tile_vnni512::<1, 1, WIDE>(o0 + j, x, r0, dst),
                            2 => self.tile_vnni512::<1, 2, WIDE>(o0 + j, x, r0, dst),
                            3 => self.tile_vnni512::<1, 3, WIDE>(o0 + j, x, r0, dst),
                            _ => self.tile_vnni512::<1, 4, WIDE>(o0 + j, x, r0, dst),
                        }
                    }
                }
            }
        }
    }

    /// The reference: per lane the integer dot product, offset- or min-corrected and scaled,
    /// lanes summed.
    fn dot_portable(&self, o: usize, x: &Quantized, r0: usize, rows: usize, res: &mut [f32; MAX_ROWS]) {
        let lanes = self.lanes;
        for (i, out) in res.iter_mut().enumerate().take(rows) {
            let r = r0 + i;
            let mut acc = [0f32; LANES];
            for g in &self.groups {
                let sb = g.step_bytes();
                for (lane, a) in acc.iter_mut().enumerate().take(g.width) {
                    let mut dot = 0i32;
                    let wide = self.format.wide();
                    for step in 0..g.steps {
                        for byte in 0..4 {
                            let at = o * self.packed_row + g.packed + lane * 4 + byte;
                            let w = match wide {
                                true => self.q[at + step * sb],
                                false => self.q[at + step / 2 * sb] >> (4 * (step % 2)) & 0x0F,
                            };
                            let v = x.q[r * self.unpacked_row + g.unpacked + step * sb + lane * 4 + byte];
                            dot += w as i32 * v as i32;
                        }
                    }
                    let (wl, xl) = (o * lanes + g.lane0 + lane, r * lanes + g.lane0 + lane);
                    if wide {
                        *a += (dot - x.offset[xl]) as f32 * self.d[wl].to_f32() * x.d[xl];
                    } else {
                        *a += dot as f32 * self.d[wl].to_f32() * x.d[xl];
                        *a += self.m[wl].to_f32() * x.dm[xl];
                    }
                }
            }
            *out = acc.iter().sum();
        }
    }

    /// Outputs `o0..o0 + O` for input rows `r0..r0 + R`: per pair of steps, each output's
    /// weights loaded and unpacked once for all `R` rows, each row's input once for all `O`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn tile_vnni512<const O: usize, const R: usize, const WIDE: bool>(
        &self,
        o0: usize,
        x: &Quantized,
        r0: usize,
        dst: OutPtr<f32>,
    ) {
        // SAFETY: the caller checked the CPU features; every row holds its groups' full steps
        // (64 bytes and 16 lanes, or 32 and 8 in `half_group_vnni`) (`o0 + O ≤ self.rows`,
        // `r0 + R ≤ n`); the tile's outputs in `dst` are this task's.
        unsafe {
            use std::arch::x86_64::*;
            let lanes = self.lanes;
            let nibble = _mm512_set1_epi8(0x0F);
            let mut acc = [[_mm512_setzero_ps(); R]; O];
            // An eight-lane group's sums, in 256-bit registers (on CPUs that split 512-bit
            // operations in two, half the work), added to the sixteen lanes' at the end.
            let mut low = [[_mm256_setzero_ps(); R]; O];
            for g in &self.groups {
                if g.width < LANES {
                    self.half_group_vnni::<O, R, WIDE>(g, o0, x, r0, &mut low);
                    continue;
                }
                let mut sums = [[_mm512_setzero_si512(); R]; O];
                for t in 0..g.steps / 2 {
                    let off = g.packed + if WIDE { t * 128 } else { t * 64 };
                    let w: [(__m512i, __m512i); O] = std::array::from_fn(|j| {
                        let p = self.q.as_ptr().add((o0 + j) * self.packed_row + off);
                        if WIDE {
                            (_mm512_loadu_si512(p as *const _), _mm512_loadu_si512(p.add(64) as *const _))
                        } else {
                            let p = _mm512_loadu_si512(p as *const _);
                            (_mm512_and_si512(p, nibble), _mm512_and_si512(_mm512_srli_epi16::<4>(p), nibble))
                        }
                    });
                    // The next tile's weights, on their way while this one runs (a hint: past
                    // the matrix's end it is dropped, never dereferenced).
                    for j in 0..O {
                        let ahead = self.q.as_ptr().wrapping_add((o0 + O + j) * self.packed_row + off);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                        if WIDE {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64) as *const i8);
                        }
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
                    let at = (o0 + j) * lanes + g.lane0;
                    let wd = _mm512_cvtph_ps(_mm256_loadu_si256(self.d.as_ptr().add(at) as *const _));
                    for i in 0..R {
                        let xl = (r0 + i) * lanes + g.lane0;
                        let xd = _mm512_loadu_ps(x.d.as_ptr().add(xl));
                        if WIDE {
                            let offset = _mm512_loadu_si512(x.offset.as_ptr().add(xl) as *const _);
                            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums[j][i], offset)), wd);
                            acc[j][i] = _mm512_fmadd_ps(t, xd, acc[j][i]);
                        } else {
                            let wm = _mm512_cvtph_ps(_mm256_loadu_si256(self.m.as_ptr().add(at) as *const _));
                            let xm = _mm512_loadu_ps(x.dm.as_ptr().add(xl));
                            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[j][i]), wd);
                            acc[j][i] = _mm512_fmadd_ps(t, xd, acc[j][i]);
                            acc[j][i] = _mm512_fmadd_ps(wm, xm, acc[j][i]);
                        }
                    }
                }
            }
            const { assert!(O * R <= 16, "a tile's sums fit one lane_sums") };
            // Row-major sums: a row's O outputs are adjacent lanes, moved down and stored in one.
            let mut all = [_mm512_setzero_ps(); 16];
            for j in 0..O {
                for i in 0..R {
                    all[i * O + j] = _mm512_add_ps(acc[j][i], _mm512_zextps256_ps512(low[j][i]));
                }
            }
            let sums = super::lane_sums(all);
            let row = ((1u32 << O) - 1) as u16;
            for i in 0..R {
                let v = _mm512_maskz_compress_ps(row << (i * O), sums);
                _mm512_mask_storeu_ps(dst.at((r0 + i) * self.rows + o0), row, v);
            }
        }
    }

    /// An eight-lane group (one pair of steps, 32 bytes each) of outputs `o0..o0 + O` for
    /// input rows `r0..r0 + R`, its scaled lanes added into `low`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn half_group_vnni<const O: usize, const R: usize, const WIDE: bool>(
        &self,
        g: &Group,
        o0: usize,
        x: &Quantized,
        r0: usize,
        low: &mut [[std::arch::x86_64::__m256; R]; O],
    ) {
        // SAFETY: as in `tile_vnni512`: the group's 32-byte steps and eight lanes lie inside
        // every row read.
        unsafe {
            use std::arch::x86_64::*;
            let nibble = _mm256_set1_epi8(0x0F);
            let w: [(__m256i, __m256i); O] = std::array::from_fn(|j| {
                let p = self.q.as_ptr().add((o0 + j) * self.packed_row + g.packed);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(O * self.packed_row) as *const i8);
                if WIDE {
                    (_mm256_loadu_si256(p as *const _), _mm256_loadu_si256(p.add(32) as *const _))
                } else {
                    let p = _mm256_loadu_si256(p as *const _);
                    (_mm256_and_si256(p, nibble), _mm256_and_si256(_mm256_srli_epi16::<4>(p), nibble))
                }
            });
            for (j, low) in low.iter_mut().enumerate() {
                let at = (o0 + j) * self.lanes + g.lane0;
                let wd = _mm256_cvtph_ps(_mm_loadu_si128(self.d.as_ptr().add(at) as *const _));
                let wm = match WIDE {
                    true => _mm256_setzero_ps(),
                    false => _mm256_cvtph_ps(_mm_loadu_si128(self.m.as_ptr().add(at) as *const _)),
                };
                for (i, low) in low.iter_mut().enumerate() {
                    let xp = x.q.as_ptr().add((r0 + i) * self.unpacked_row + g.unpacked);
                    let sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[j].0, _mm256_loadu_si256(xp as *const _));
                    let sum = _mm256_dpbusd_epi32(sum, w[j].1, _mm256_loadu_si256(xp.add(32) as *const _));
                    let xl = (r0 + i) * self.lanes + g.lane0;
                    let xd = _mm256_loadu_ps(x.d.as_ptr().add(xl));
                    if WIDE {
                        let offset = _mm256_loadu_si256(x.offset.as_ptr().add(xl) as *const _);
                        let t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sum, offset)), wd);
                        *low = _mm256_fmadd_ps(t, xd, *low);
                    } else {
                        let xm = _mm256_loadu_ps(x.dm.as_ptr().add(xl));
                        let t = _mm256_mul_ps(_mm256_cvtepi32_ps(sum), wd);
                        *low = _mm256_fmadd_ps(t, xd, *low);
                        *low = _mm256_fmadd_ps(wm, xm, *low);
                    }
                }
            }
        }
    }

    /// One output for input rows `r0..r0 + rows`: the VNNI kernel's lanes in two halves of
    /// eight, with `vpmaddubsw` for `vpdpbusd`. Pairs of 4-bit × int8 products fit in its i16;
    /// 8-bit weights are taken back to signed and multiplied by sign (`|w| · ±x`, as llama.cpp
    /// does), which gives the offset-corrected integer sum directly.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_avx2<const WIDE: bool>(
        &self,
        o: usize,
        x: &Quantized,
        r0: usize,
        rows: usize,
        res: &mut [f32; MAX_ROWS],
    ) {
        // SAFETY: the caller checked the CPU features; loads stay inside the rows' groups.
        unsafe {
            use std::arch::x86_64::*;
            let lanes = self.lanes;
            let nibble = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let sign_bit = _mm256_set1_epi8(-128);
            let mut acc = [[_mm256_setzero_ps(); 2]; MAX_ROWS];
            for g in &self.groups {
                let sb = g.step_bytes();
                for h in 0..g.width / 8 {
                    let mut sums = [_mm256_setzero_si256(); MAX_ROWS];
                    for t in 0..g.steps / 2 {
                        let p = self.q.as_ptr().add(o * self.packed_row + g.packed + h * 32);
                        let (wlo, whi) = if WIDE {
                            let p = p.add(t * 2 * sb);
                            let lo = _mm256_xor_si256(_mm256_loadu_si256(p as *const _), sign_bit);
                            let hi = _mm256_xor_si256(_mm256_loadu_si256(p.add(sb) as *const _), sign_bit);
                            (lo, hi)
                        } else {
                            let p = _mm256_loadu_si256(p.add(t * sb) as *const _);
                            (_mm256_and_si256(p, nibble), _mm256_and_si256(_mm256_srli_epi16::<4>(p), nibble))
                        };
                        for (i, sum) in sums.iter_mut().enumerate().take(rows) {
                            let xp = x.q.as_ptr().add((r0 + i) * self.unpacked_row + g.unpacked + 2 * t * sb + h * 32);
                            let lo = _mm256_loadu_si256(xp as *const _);
                            let hi = _mm256_loadu_si256(xp.add(sb) as *const _);
                            for (w, v) in [(wlo, lo), (whi, hi)] {
                                // |w| ≤ 128 and |v| ≤ 127: a pair of products fits in i16.
                                let (w, v) =
                                    if WIDE { (_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w)) } else { (w, v) };
                                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(_mm256_maddubs_epi16(w, v), ones));
                            }
                        }
                    }
                    let at = o * lanes + g.lane0 + h * 8;
                    let wd = _mm256_cvtph_ps(_mm_loadu_si128(self.d.as_ptr().add(at) as *const _));
                    for i in 0..rows {
                        let xl = (r0 + i) * lanes + g.lane0 + h * 8;
                        let xd = _mm256_loadu_ps(x.d.as_ptr().add(xl));
                        let t = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[i]), wd);
                        acc[i][h] = _mm256_fmadd_ps(t, xd, acc[i][h]);
                        if !WIDE {
                            let wm = _mm256_cvtph_ps(_mm_loadu_si128(self.m.as_ptr().add(at) as *const _));
                            let xm = _mm256_loadu_ps(x.dm.as_ptr().add(xl));
                            acc[i][h] = _mm256_fmadd_ps(wm, xm, acc[i][h]);
                        }
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
/// loop of independent `vpdpbusd` on registers, best of five (as the other peaks are), or
/// `None` without AVX-512 VNNI.
pub fn peak_int8_gops(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if Kernel::detect() == Kernel::Vnni512 {
        const ITERS: usize = 1 << 22;
        const CHAINS: usize = 12;
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads.max(1) {
                    // SAFETY: the CPU has AVX-512 VNNI (checked above).
                    s.spawn(|| std::hint::black_box(unsafe { spin_vnni512::<CHAINS>(ITERS) }));
                }
            });
            best = best.min(start.elapsed().as_secs_f64());
        }
        let ops = (threads.max(1) * ITERS * CHAINS * 64 * 2) as f64;
        return Some(ops / best / 1e9);
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

    /// Q8_0 blocks of a pseudo-random matrix (every value −128..127 occurs), and the f32
    /// weights they stand for.
    fn q8_0(rows: usize, cols: usize, seed: usize) -> (Vec<u8>, Vec<f32>) {
        let (mut raw, mut w) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for b in 0..cols / BLOCK {
                let i = (r * cols / BLOCK + b) * 2654435761 + seed;
                let d = f16::from_f32(0.0002 + (i % 89) as f32 * 1e-5);
                raw.extend_from_slice(&d.to_le_bytes());
                let q: Vec<i8> = (0..BLOCK).map(|e| ((i / 7 + e * 37 + e * e * 11) % 256) as u8 as i8).collect();
                raw.extend(q.iter().map(|&v| v as u8));
                w.extend(q.iter().map(|&q| d.to_f32() * q as f32));
            }
        }
        (raw, w)
    }

    /// Blocks of `format` for a pseudo-random matrix, and the f32 weights they stand for.
    fn blocks(format: Format, rows: usize, cols: usize, seed: usize) -> (Vec<u8>, Vec<f32>) {
        match format {
            Format::Q8_0 => q8_0(rows, cols, seed),
            _ => q4_1(rows, cols, seed),
        }
    }

    fn input(n: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..n * cols).map(|i| (((i * 7919 + seed) % 2003) as f32 / 1001.0 - 1.0) * 0.5).collect()
    }

    /// `got` (`n × rows`) is `x · wᵀ` within 1% of the sum of the products' magnitudes, plus `slack`.
    fn assert_near_f32(x: &[f32], w: &[f32], got: &[f32], cols: usize, slack: f32, what: &str) {
        let (n, rows) = (x.len() / cols, w.len() / cols);
        for r in 0..n {
            for o in 0..rows {
                let exact: f32 = (0..cols).map(|c| x[r * cols + c] * w[o * cols + c]).sum();
                let scale: f32 = (0..cols).map(|c| (x[r * cols + c] * w[o * cols + c]).abs()).sum();
                let got = got[r * rows + o];
                assert!((got - exact).abs() <= 0.01 * scale + slack, "{what}: {r},{o}: {got} vs {exact}");
            }
        }
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
        for (format, cols) in
            [576, 1536, 32, 96, 224, 416].into_iter().flat_map(|c| [(Format::Q4_1, c), (Format::Q8_0, c)])
        {
            let (rows, n) = (37, 6);
            let (raw, w) = blocks(format, rows, cols, cols);
            let x = input(n, cols, 5);
            let reference = Int8Matrix::from_blocks(format, &raw, rows, cols).unwrap().with_kernel(Kernel::Portable);
            let mut want = vec![0f32; n * rows];
            reference.matmul(&x, n, &mut want);
            assert_near_f32(&x, &w, &want, cols, 1e-4, &format!("{format:?} {cols}"));
            for k in kernels() {
                let m = Int8Matrix::from_blocks(format, &raw, rows, cols).unwrap().with_kernel(k);
                let mut got = vec![0f32; n * rows];
                m.matmul(&x, n, &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{format:?} {cols} {k:?} at {i}: {a} vs {b}");
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
        Int8Matrix::from_blocks(Format::Q4_0, &q40, rows, cols).unwrap().matmul(&x, 3, &mut a);
        Int8Matrix::from_blocks(Format::Q4_1, &as41, rows, cols).unwrap().matmul(&x, 3, &mut b);
        assert_eq!(a, b);
        assert!(Int8Matrix::from_blocks(Format::Q4_0, &q40[1..], rows, cols).is_err());
    }

    /// Weights shipped in another format are quantized to Q8_0 blocks as GGUF's quantizer
    /// does: a block's largest value maps to ±127, and the product is close to the f32 one.
    #[test]
    fn quantized_weights_are_q8_0_blocks_close_to_f32() {
        let (rows, cols, n) = (70, 576, 3);
        let w = input(rows, cols, 1);
        let x = input(n, cols, 5);
        let m = Int8Matrix::quantize(&w, rows, cols).unwrap();
        assert_eq!(m.format(), Format::Q8_0);
        let mut got = vec![0f32; n * rows];
        m.matmul(&x, n, &mut got);
        assert_near_f32(&x, &w, &got, cols, 0.0, "quantized");
        assert!(Int8Matrix::quantize(&w[1..], rows, cols).is_err());
        assert!(Int8Matrix::quantize(&w[..rows * 20], rows, 20).is_err());
    }

    /// The quantizer's kernel gets the portable form's scale and bytes: blocks of zeros, of
    /// halves that round to even, of one outlier, of pseudo-random values.
    #[test]
    fn the_input_quantizer_agrees_with_the_portable_form() {
        let mut blocks: Vec<Vec<f32>> = vec![vec![0.0; BLOCK], (0..BLOCK).map(|e| e as f32 - 15.5).collect()];
        blocks.push((0..BLOCK).map(|e| if e == 7 { -300.0 } else { (e as f32 * 0.37).sin() }).collect());
        // max 127: each value's quotient is itself, halves included.
        blocks.push((0..BLOCK).map(|e| if e == 0 { 127.0 } else { e as f32 * 2.5 - 40.0 }).collect());
        blocks.extend((0..200).map(|seed| input(1, BLOCK, seed)));
        for (i, x) in blocks.iter().enumerate() {
            let (mut a, mut b) = ([0i8; BLOCK], [0i8; BLOCK]);
            let da = quantize_block(x, &mut a);
            let db = quantize_block_portable(x, &mut b);
            assert!(da.to_bits() == db.to_bits() && a == b, "block {i}: {da} {a:?} vs {db} {b:?}");
        }
    }

    /// A row's result does not depend on the rows beside it or on how many there are —
    /// decode tiles, prefill tiles, the calling thread or the pool.
    #[test]
    fn a_row_gets_the_same_result_alone_or_in_a_batch() {
        for (format, rows, cols) in [(Format::Q4_1, 33, 576), (Format::Q4_1, 301, 1536), (Format::Q8_0, 200, 576)] {
            let (raw, _) = blocks(format, rows, cols, 3);
            let m = Int8Matrix::from_blocks(format, &raw, rows, cols).unwrap();
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
                    assert!(
                        some[..rows] == all[r * rows..(r + 1) * rows],
                        "{format:?} {rows}×{cols}: row {r} with {n}"
                    );
                }
            }
        }
    }

    /// Every kernel's product is the blocks' own arithmetic — per block `d·d_x·Σ q·q_x` (and
    /// `m·d_x·Σ q_x` for 4-bit weights), the input quantized per block — to f32 rounding: for
    /// full groups, short ones spread over lanes and eight-lane ones alike.
    #[test]
    fn products_are_the_block_arithmetic_exactly() {
        for (format, cols) in
            [576, 32, 64, 96, 224, 1536].into_iter().flat_map(|c| [(Format::Q4_1, c), (Format::Q8_0, c)])
        {
            let (rows, n, per_row, bs) = (29, 9, cols / BLOCK, format.block_bytes());
            let (raw, _) = blocks(format, rows, cols, 7);
            let x = input(n, cols, 13);
            for k in kernels() {
                let m = Int8Matrix::from_blocks(format, &raw, rows, cols).unwrap().with_kernel(k);
                let mut out = vec![0f32; n * rows];
                m.matmul(&x, n, &mut out);
                for (r, o) in (0..n).flat_map(|r| (0..rows).map(move |o| (r, o))) {
                    let (mut exact, mut size) = (0f64, 0f64);
                    for b in 0..per_row {
                        let mut qx = [0i8; BLOCK];
                        let dx = quantize_block(&x[r * cols + b * BLOCK..][..BLOCK], &mut qx) as f64;
                        let block = &raw[(o * per_row + b) * bs..][..bs];
                        let d = f16::from_le_bytes([block[0], block[1]]).to_f64();
                        let (min, values) = match format {
                            Format::Q8_0 => (0.0, &block[2..]),
                            _ => (f16::from_le_bytes([block[2], block[3]]).to_f64(), &block[4..]),
                        };
                        let (mut dot, mut sum) = (0i64, 0i64);
                        for (e, &v) in qx.iter().enumerate() {
                            let q = match format {
                                Format::Q8_0 => values[e] as i8 as i64,
                                _ => (if e < 16 { values[e] & 0x0F } else { values[e - 16] >> 4 }) as i64,
                            };
                            dot += q * v as i64;
                            sum += v as i64;
                        }
                        let term = d * dx * dot as f64 + min * dx * sum as f64;
                        exact += term;
                        size += term.abs();
                    }
                    let got = out[r * rows + o] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * size + 1e-6,
                        "{format:?} {cols} {k:?} ({r}, {o}): {got} vs {exact}"
                    );
                }
            }
        }
    }
}
