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
//! Layout. Outputs are taken sixteen at a time, a *panel* (the last one padded with zero
//! weights and scales), one output a lane of a 512-bit register. A panel's blocks follow each
//! other, and each holds, for its sixteen outputs, the block's values in 4-byte *steps* (step
//! `s` of output `j` at bytes `64·s + 4·j`: values `4s..4s + 4`), then the sixteen scales
//! `d` and (4-bit formats) the sixteen mins `m`, as f16. A 4-bit weight's value `q` is 0..15
//! (`w = d·q + m`; Q4_0 is `m = −8d`) and steps come in pairs sharing 64 bytes, the even step
//! in the low nibbles and the odd one in the high: 320 bytes a block (five cache lines). An
//! 8-bit one is stored as `q + 128`, 0..255 (`w = d·q`): 544 bytes a block. A product walks
//! a panel's bytes in order, and the panels follow each other: one stream through memory.
//! An input row is quantized per block (as Q8_0), its values signed and in order.
//!
//! Per block, `vpdpbusd` adds 4 products of a step's unsigned weight bytes and the same four
//! input bytes (broadcast to every lane) into each output's lane (exact, in i32). The lanes
//! are then scaled by the outputs' `d` and the input block's scale, and for 4-bit weights the
//! min term `m · d_x · Σx` added, in f32; for 8-bit ones the `128 · Σx` the stored offset
//! adds is taken off each integer sum exactly before scaling. So an output's sum runs over
//! its blocks in order, one f32 step per block, in the same order whatever the tile, batch or
//! thread split — a row's result does not depend on the rows beside it (batch invariance),
//! and a slice of a prompt gets the same result as the whole prompt — and no lanes are summed
//! across: a tile's outputs are stored as they stand.

use half::f16;

use super::{Aligned, OutPtr};

const BLOCK: usize = 32;
/// Outputs of a panel: one 512-bit register of i32 sums.
const PANEL: usize = 16;
/// 4-byte steps of a block.
const BLOCK_STEPS: usize = BLOCK / 4;
/// Input rows of a tile at most.
const MAX_ROWS: usize = 8;
/// Panels handed to a thread at a time: a multiple of every tile's panels; four panels of
/// 4-bit weights (≤ 60 KiB for rows 1536 wide) stay in L2 while a block of input rows passes.
const STRIPE: usize = 4;
/// Input rows of a work item: a multiple of MAX_ROWS; 64 rows of input (≤ 96 KiB) and of
/// output stay in L2 while the item's panels pass over them.
const ROW_BLOCK: usize = 64;
/// Multiply-adds below which a product stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 256 << 10;
/// Bytes ahead of a tile in each panel's stream that it asks into L2: the hardware's own
/// prefetch leaves a decode step's stream of weights short of what the products take (paired
/// against none: one stream 5–7% faster, eight batched 11–13%; 8 KiB did as well, into L1 worse).
const PREFETCH_AHEAD: usize = 4096;

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

    /// Panels of a tile of `rows` input rows: as many as the registers hold sums for (every
    /// kernel but VNNI's takes one at a time).
    fn panels(self, rows: usize) -> usize {
        match (self, rows) {
            (Kernel::Vnni512, 1) => 4,
            (Kernel::Vnni512, 2..=4) => 2,
            _ => 1,
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

/// Bytes of a panel's values of one block: 8 steps of 64 bytes, two steps a byte in 4-bit formats.
const fn values_bytes(wide: bool) -> usize {
    if wide { BLOCK_STEPS * 64 } else { BLOCK_STEPS / 2 * 64 }
}

/// Bytes of a panel's block: values, the sixteen `d`, and (4-bit) the sixteen `m`.
const fn panel_block_bytes(wide: bool) -> usize {
    values_bytes(wide) + if wide { 32 } else { 64 }
}

/// Quantizes one block to int8 (as Q8_0); returns its scale: `d = max|x| / 127`, each value
/// `x / d` rounded half to even. A decode step quantizes every input row of every matmul;
/// the AVX-512 form gets the same bytes as the portable one.
pub(super) fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    assert!(x.len() == BLOCK && q.len() == BLOCK, "quantize_block: a block of {BLOCK}");
    #[cfg(target_arch = "x86_64")]
    if *super::HAS_AVX512 {
        // SAFETY: the CPU has AVX-512F; both slices hold a block (asserted).
        return unsafe { quantize_block_avx512(x.as_ptr(), q.as_mut_ptr()).0 };
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

/// [`quantize_block`] in two registers (the CPU's conversion rounds half to even), and the
/// sum of the block's values.
///
/// # Safety
/// The CPU has AVX-512F; `x` points at 32 values, `q` at room for 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_block_avx512(x: *const f32, q: *mut i8) -> (f32, i32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let (a, b) = (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let (d, inv) = block_scale(amax);
        let inv = _mm512_set1_ps(inv);
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        let round = |v| _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)), lo), hi);
        let (ra, rb) = (round(a), round(b));
        _mm_storeu_si128(q as *mut __m128i, _mm512_cvtepi32_epi8(ra));
        _mm_storeu_si128(q.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(rb));
        (d, _mm512_reduce_add_epi32(_mm512_add_epi32(ra, rb)))
    }
}

/// [`Int8Matrix::quantize_row`] on AVX-512: every block in one call, their sums taken from the
/// registers the values were rounded in.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_row_avx512(x: &[f32], Row { q, d, offset, dm }: Row) {
    let blocks = x.len() / BLOCK;
    assert!(q.len() == x.len() && d.len() == blocks && offset.len() == blocks && dm.len() == blocks);
    for b in 0..blocks {
        // SAFETY: the CPU has AVX-512F (the caller's contract); block b of x and q is inside
        // them (asserted).
        let (scale, sum) = unsafe { quantize_block_avx512(x.as_ptr().add(b * BLOCK), q.as_mut_ptr().add(b * BLOCK)) };
        d[b] = scale;
        offset[b] = 128 * sum;
        dm[b] = scale * sum as f32;
    }
}

/// A weight matrix (`rows` outputs × `cols` inputs) of GGUF blocks, in panels.
pub struct Int8Matrix {
    format: Format,
    rows: usize,
    cols: usize,
    /// Blocks of a row: `cols / 32`.
    blocks: usize,
    /// `rows.div_ceil(16) × blocks` panel blocks, 64-byte aligned.
    panels: Aligned<u8>,
    kernel: Kernel,
}

/// Input rows quantized per block: signed values (`n × cols`, in order), and per row and
/// block the scale, `128 · Σ` of the block's values (what 8-bit weights' stored `+ 128` adds
/// to a block's integer sum), and `scale · Σ` (for 4-bit weights' min term).
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
        let (vb, pb) = (values_bytes(wide), panel_block_bytes(wide));
        let mut panels = Aligned::<u8>::zeroed(rows.div_ceil(PANEL) * blocks * pb);
        let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]);
        for r in 0..rows {
            let (panel, lane) = (r / PANEL, r % PANEL);
            for b in 0..blocks {
                let block = &raw[(r * blocks + b) * bs..][..bs];
                let scale = half(block, 0);
                let min = match format {
                    Format::Q4_0 => f16::from_f32(-8.0 * scale.to_f32()),
                    Format::Q4_1 => half(block, 2),
                    Format::Q8_0 => f16::ZERO,
                };
                if !min.is_finite() || !scale.is_finite() {
                    return Err(format!("row {r}, block {b}: a scale beyond f16"));
                }
                let at = (panel * blocks + b) * pb;
                let values = &block[bs - if wide { BLOCK } else { BLOCK / 2 }..];
                for e in 0..BLOCK {
                    let (step, byte) = (e / 4, lane * 4 + e % 4);
                    if wide {
                        // q + 128 as u8 flips the sign bit.
                        panels[at + step * 64 + byte] = values[e] ^ 0x80;
                    } else {
                        let v = if e < 16 { values[e] & 0x0F } else { values[e - 16] >> 4 };
                        panels[at + step / 2 * 64 + byte] |= v << (4 * (step % 2));
                    }
                }
                panels[at + vb + 2 * lane..][..2].copy_from_slice(&scale.to_le_bytes());
                if !wide {
                    panels[at + vb + 32 + 2 * lane..][..2].copy_from_slice(&min.to_le_bytes());
                }
            }
        }
        Ok(Self { format, rows, cols, blocks, panels, kernel: Kernel::detect() })
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
        self.panels.len()
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
            // Work items are (block of input rows, stripe of panels), row blocks outermost: the
            // threads share a block's input and write one band of the output at a time, which
            // stays in cache instead of every stripe sweeping a prefill's whole output.
            let panels = self.rows.div_ceil(PANEL);
            let stripes = panels.div_ceil(STRIPE);
            let run = |range: std::ops::Range<usize>| {
                for item in range {
                    let (block, s) = (item / stripes, item % stripes);
                    let stripe = s * STRIPE..((s + 1) * STRIPE).min(panels);
                    let block_rows = block * ROW_BLOCK..((block + 1) * ROW_BLOCK).min(n);
                    // A tile's panels outermost: their weights stay in L1 while the block's
                    // rows pass over them.
                    let width = self.kernel.panels((block_rows.end - block_rows.start).min(MAX_ROWS));
                    for p0 in stripe.clone().step_by(width) {
                        let tile_panels = (stripe.end - p0).min(width);
                        for r0 in block_rows.clone().step_by(MAX_ROWS) {
                            let rows = (block_rows.end - r0).min(MAX_ROWS);
                            // SAFETY: rows r0.. and panels p0.. of the tile are inside the
                            // input and `out` (n × rows, checked above); items are disjoint.
                            unsafe { self.tile(p0, tile_panels, xq, r0, rows, dst) };
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

    /// Quantizes the `n` rows of `x` into `xq`; a prefill's rows spread over the pool (each
    /// row is written by one task, the same way whatever the split).
    fn quantize_input(&self, x: &[f32], n: usize, xq: &mut Quantized) {
        let blocks = self.blocks;
        // Every value a product reads is written below (the buffers are the thread's, reused).
        let (q, d) = (super::grown(&mut xq.q, n * self.cols), super::grown(&mut xq.d, n * blocks));
        let (q, d) = (OutPtr(q.as_mut_ptr()), OutPtr(d.as_mut_ptr()));
        let offset = OutPtr(super::grown(&mut xq.offset, n * blocks).as_mut_ptr());
        let dm = OutPtr(super::grown(&mut xq.dm, n * blocks).as_mut_ptr());
        let run = |rows: std::ops::Range<usize>| {
            for r in rows {
                // SAFETY: row r's regions of the four buffers (sized above) are written by
                // this task alone.
                let row = unsafe {
                    Row {
                        q: std::slice::from_raw_parts_mut(q.at(r * self.cols), self.cols),
                        d: std::slice::from_raw_parts_mut(d.at(r * blocks), blocks),
                        offset: std::slice::from_raw_parts_mut(offset.at(r * blocks), blocks),
                        dm: std::slice::from_raw_parts_mut(dm.at(r * blocks), blocks),
                    }
                };
                Self::quantize_row(&x[r * self.cols..][..self.cols], row);
            }
        };
        if n * self.cols < PARALLEL_MIN_WORK / 8 {
            run(0..n)
        } else {
            candle_core::utils::barrier_pool().execute_chunked(n, run)
        }
    }

    /// One input row, block by block: its values, and per block the scale, `128 · Σ` and
    /// `scale · Σ`.
    fn quantize_row(x: &[f32], row: Row) {
        #[cfg(target_arch = "x86_64")]
        if *super::HAS_AVX512 {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { quantize_row_avx512(x, row) };
        }
        let Row { q, d, offset, dm } = row;
        for (b, (x, q)) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).enumerate() {
            let scale = quantize_block(x, q);
            let sum: i32 = q.iter().map(|&v| v as i32).sum();
            d[b] = scale;
            offset[b] = 128 * sum;
            dm[b] = scale * sum as f32;
        }
    }

    /// Panels `p0..p0 + panels` of input rows `r0..r0 + rows`, written into `dst` (the
    /// product's `n × self.rows` output; outputs past `self.rows` are not written).
    ///
    /// # Safety
    /// The tile must be inside the matrix, the input and `dst`, in a region only this task writes.
    unsafe fn tile(&self, p0: usize, panels: usize, x: &Quantized, r0: usize, rows: usize, dst: OutPtr<f32>) {
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: chosen only when the CPU has these features (Kernel::detect); the tile is
            // inside the matrix, the input and `dst` (the caller's contract).
            Kernel::Vnni512 => unsafe {
                match self.format.wide() {
                    false => self.tile_vnni512_shaped::<false>(p0, panels, x, r0, rows, dst),
                    true => self.tile_vnni512_shaped::<true>(p0, panels, x, r0, rows, dst),
                }
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Kernel::Avx2 => unsafe {
                for p in p0..p0 + panels {
                    for r in (r0..r0 + rows).step_by(AVX2_ROWS) {
                        let rows = (r0 + rows - r).min(AVX2_ROWS);
                        match self.format.wide() {
                            false => self.tile_avx2::<false>(p, x, r, rows, dst),
                            true => self.tile_avx2::<true>(p, x, r, rows, dst),
                        }
                    }
                }
            },
            _ => {
                let mut res = [0f32; PANEL];
                for (p, r) in (p0..p0 + panels).flat_map(|p| (r0..r0 + rows).map(move |r| (p, r))) {
                    self.panel_portable(p, x, r, &mut res);
                    for (j, v) in res.iter().enumerate().take(self.rows.saturating_sub(p * PANEL)) {
                        // SAFETY: (r, p·16 + j) is inside `dst`, written by this task alone
                        // (the caller's contract).
                        unsafe { *dst.at(r * self.rows + p * PANEL + j) = *v };
                    }
                }
            }
        }
    }

    /// Weight value `e` (0..32) of lane `lane` in the panel block at `at`, as stored (`q`, or
    /// `q + 128` for 8-bit formats).
    fn stored(&self, at: usize, lane: usize, e: usize) -> u8 {
        let (step, byte) = (e / 4, lane * 4 + e % 4);
        match self.format.wide() {
            true => self.panels[at + step * 64 + byte],
            false => self.panels[at + step / 2 * 64 + byte] >> (4 * (step % 2)) & 0x0F,
        }
    }

    /// The reference: the sixteen outputs of panel `p` for input row `r`, block by block the
    /// integer dot product, offset- or min-corrected and scaled, added in order.
    fn panel_portable(&self, p: usize, x: &Quantized, r: usize, res: &mut [f32; PANEL]) {
        let wide = self.format.wide();
        let (vb, pb) = (values_bytes(wide), panel_block_bytes(wide));
        let scale = |at: usize| f16::from_le_bytes([self.panels[at], self.panels[at + 1]]).to_f32();
        *res = [0.0; PANEL];
        for b in 0..self.blocks {
            let at = (p * self.blocks + b) * pb;
            let xl = r * self.blocks + b;
            let xv = &x.q[r * self.cols + b * BLOCK..][..BLOCK];
            for (lane, acc) in res.iter_mut().enumerate() {
                let dot: i32 = (0..BLOCK).map(|e| self.stored(at, lane, e) as i32 * xv[e] as i32).sum();
                let d = scale(at + vb + 2 * lane);
                if wide {
                    *acc += (dot - x.offset[xl]) as f32 * d * x.d[xl];
                } else {
                    *acc += dot as f32 * d * x.d[xl];
                    *acc += scale(at + vb + 32 + 2 * lane) * x.dm[xl];
                }
            }
        }
    }

    /// The VNNI tile of this shape, monomorphised so that its sums live in registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn tile_vnni512_shaped<const WIDE: bool>(
        &self,
        p0: usize,
        panels: usize,
        x: &Quantized,
        r0: usize,
        rows: usize,
        dst: OutPtr<f32>,
    ) {
        // SAFETY: as in `tile`.
        unsafe {
            match (panels, rows) {
                (4, 1) => self.tile_vnni512::<4, 1, WIDE>(p0, x, r0, dst),
                (2, 2) => self.tile_vnni512::<2, 2, WIDE>(p0, x, r0, dst),
                (2, 3) => self.tile_vnni512::<2, 3, WIDE>(p0, x, r0, dst),
                (2, 4) => self.tile_vnni512::<2, 4, WIDE>(p0, x, r0, dst),
                // Rows 5..8, and a stripe's last, narrower tiles: a panel at a time.
                _ => {
                    for p in p0..p0 + panels {
                        match rows {
                            1 => self.tile_vnni512::<1, 1, WIDE>(p, x, r0, dst),
                            2 => self.tile_vnni512::<1, 2, WIDE>(p, x, r0, dst),
                            3 => self.tile_vnni512::<1, 3, WIDE>(p, x, r0, dst),
                            4 => self.tile_vnni512::<1, 4, WIDE>(p, x, r0, dst),
                            5 => self.tile_vnni512::<1, 5, WIDE>(p, x, r0, dst),
                            6 => self.tile_vnni512::<1, 6, WIDE>(p, x, r0, dst),
                            7 => self.tile_vnni512::<1, 7, WIDE>(p, x, r0, dst),
                            _ => self.tile_vnni512::<1, 8, WIDE>(p, x, r0, dst),
                        }
                    }
                }
            }
        }
    }

    /// Panels `p0..p0 + P` for input rows `r0..r0 + R`: per step, each panel's weights loaded
    /// (and unpacked) once for all `R` rows, each row's four input bytes broadcast once for
    /// all `P` panels.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn tile_vnni512<const P: usize, const R: usize, const WIDE: bool>(
        &self,
        p0: usize,
        x: &Quantized,
        r0: usize,
        dst: OutPtr<f32>,
    ) {
        // SAFETY: the caller checked the CPU features; panels p0..p0 + P are inside the matrix
        // and rows r0..r0 + R inside the input (every panel block is whole, padding
        // included); the tile's outputs in `dst` are this task's, those past `self.rows` masked.
        unsafe {
            use std::arch::x86_64::*;
            let (blocks, vb, pb) = (self.blocks, values_bytes(WIDE), panel_block_bytes(WIDE));
            let nibble = _mm512_set1_epi8(0x0F);
            // An input row as 4-byte steps.
            let xq = x.q.as_ptr() as *const i32;
            let row_steps = self.cols / 4;
            let mut acc = [[_mm512_setzero_ps(); R]; P];
            for b in 0..blocks {
                // The bytes PREFETCH_AHEAD on in each panel's stream, on their way into L2 (a
                // hint: past the matrix's end it is dropped, never dereferenced).
                for p in 0..P {
                    let ahead = self.panels.as_ptr().wrapping_add(((p0 + p) * blocks + b) * pb + PREFETCH_AHEAD);
                    for line in 0..pb.div_ceil(64) {
                        _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64 * line) as *const i8);
                    }
                }
                let at: [*const u8; P] =
                    std::array::from_fn(|p| self.panels.as_ptr().add(((p0 + p) * blocks + b) * pb));
                let mut sums = [[_mm512_setzero_si512(); R]; P];
                let step = |i: usize, s: usize| {
                    _mm512_set1_epi32(xq.add((r0 + i) * row_steps + b * BLOCK_STEPS + s).read_unaligned())
                };
                if WIDE {
                    for s in 0..BLOCK_STEPS {
                        let w: [__m512i; P] =
                            std::array::from_fn(|p| _mm512_loadu_si512(at[p].add(64 * s) as *const _));
                        for i in 0..R {
                            let v = step(i, s);
                            for p in 0..P {
                                sums[p][i] = _mm512_dpbusd_epi32(sums[p][i], w[p], v);
                            }
                        }
                    }
                } else {
                    for t in 0..BLOCK_STEPS / 2 {
                        let w: [(__m512i, __m512i); P] = std::array::from_fn(|p| {
                            let v = _mm512_loadu_si512(at[p].add(64 * t) as *const _);
                            (_mm512_and_si512(v, nibble), _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble))
                        });
                        for i in 0..R {
                            let (lo, hi) = (step(i, 2 * t), step(i, 2 * t + 1));
                            for p in 0..P {
                                sums[p][i] = _mm512_dpbusd_epi32(sums[p][i], w[p].0, lo);
                                sums[p][i] = _mm512_dpbusd_epi32(sums[p][i], w[p].1, hi);
                            }
                        }
                    }
                }
                for p in 0..P {
                    let wd = _mm512_cvtph_ps(_mm256_loadu_si256(at[p].add(vb) as *const _));
                    for i in 0..R {
                        let xl = (r0 + i) * blocks + b;
                        let xd = _mm512_set1_ps(*x.d.get_unchecked(xl));
                        if WIDE {
                            let offset = _mm512_set1_epi32(*x.offset.get_unchecked(xl));
                            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums[p][i], offset)), wd);
                            acc[p][i] = _mm512_fmadd_ps(t, xd, acc[p][i]);
                        } else {
                            let wm = _mm512_cvtph_ps(_mm256_loadu_si256(at[p].add(vb + 32) as *const _));
                            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(sums[p][i]), wd);
                            acc[p][i] = _mm512_fmadd_ps(t, xd, acc[p][i]);
                            acc[p][i] = _mm512_fmadd_ps(wm, _mm512_set1_ps(*x.dm.get_unchecked(xl)), acc[p][i]);
                        }
                    }
                }
            }
            for p in 0..P {
                let o = (p0 + p) * PANEL;
                let mask = match self.rows - o {
                    left if left < PANEL => ((1u32 << left) - 1) as u16,
                    _ => u16::MAX,
                };
                for i in 0..R {
                    _mm512_mask_storeu_ps(dst.at((r0 + i) * self.rows + o), mask, acc[p][i]);
                }
            }
        }
    }

    /// Half a panel (eight outputs, `h` the half) at a time for input rows `r0..r0 + rows`
    /// (`rows ≤ AVX2_ROWS`): the VNNI kernel's steps with `vpmaddubsw` for `vpdpbusd`. Pairs
    /// of 4-bit × int8 products fit in its i16; 8-bit weights are taken back to signed and
    /// multiplied by sign (`|w| · ±x`, as llama.cpp does), which gives the offset-corrected
    /// integer sum directly.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<const WIDE: bool>(&self, p: usize, x: &Quantized, r0: usize, rows: usize, dst: OutPtr<f32>) {
        // SAFETY: the caller checked the CPU features; loads stay inside panel p's blocks and
        // rows r0..r0 + rows of the input; outputs past `self.rows` are not written.
        unsafe {
            use std::arch::x86_64::*;
            let (blocks, vb, pb) = (self.blocks, values_bytes(WIDE), panel_block_bytes(WIDE));
            let nibble = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let sign_bit = _mm256_set1_epi8(-128);
            let xq = x.q.as_ptr() as *const i32;
            let row_steps = self.cols / 4;
            for h in 0..2 {
                let mut acc = [_mm256_setzero_ps(); AVX2_ROWS];
                for b in 0..blocks {
                    let at = self.panels.as_ptr().add((p * blocks + b) * pb);
                    let mut sums = [_mm256_setzero_si256(); AVX2_ROWS];
                    let step = |i: usize, s: usize| {
                        _mm256_set1_epi32(xq.add((r0 + i) * row_steps + b * BLOCK_STEPS + s).read_unaligned())
                    };
                    for s in (0..BLOCK_STEPS).step_by(2) {
                        let (wlo, whi) = if WIDE {
                            let lo = _mm256_loadu_si256(at.add(64 * s + 32 * h) as *const _);
                            let hi = _mm256_loadu_si256(at.add(64 * (s + 1) + 32 * h) as *const _);
                            (_mm256_xor_si256(lo, sign_bit), _mm256_xor_si256(hi, sign_bit))
                        } else {
                            let v = _mm256_loadu_si256(at.add(32 * s + 32 * h) as *const _);
                            (_mm256_and_si256(v, nibble), _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble))
                        };
                        for (i, sum) in sums.iter_mut().enumerate().take(rows) {
                            for (w, v) in [(wlo, step(i, s)), (whi, step(i, s + 1))] {
                                // |w| ≤ 128 and |v| ≤ 127: a pair of products fits in i16.
                                let (w, v) =
                                    if WIDE { (_mm256_sign_epi8(w, w), _mm256_sign_epi8(v, w)) } else { (w, v) };
                                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(_mm256_maddubs_epi16(w, v), ones));
                            }
                        }
                    }
                    let wd = _mm256_cvtph_ps(_mm_loadu_si128(at.add(vb + 16 * h) as *const _));
                    for i in 0..rows {
                        let xl = (r0 + i) * blocks + b;
                        let t = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[i]), wd);
                        acc[i] = _mm256_fmadd_ps(t, _mm256_set1_ps(*x.d.get_unchecked(xl)), acc[i]);
                        if !WIDE {
                            let wm = _mm256_cvtph_ps(_mm_loadu_si128(at.add(vb + 32 + 16 * h) as *const _));
                            acc[i] = _mm256_fmadd_ps(wm, _mm256_set1_ps(*x.dm.get_unchecked(xl)), acc[i]);
                        }
                    }
                }
                let o = p * PANEL + 8 * h;
                let mut out = [0f32; 8];
                for (i, acc) in acc.iter().enumerate().take(rows) {
                    _mm256_storeu_ps(out.as_mut_ptr(), *acc);
                    for (j, v) in out.iter().enumerate().take(self.rows.saturating_sub(o)) {
                        *dst.at((r0 + i) * self.rows + o + j) = *v;
                    }
                }
            }
        }
    }
}

/// Input rows of an AVX2 tile: its sixteen registers hold eight outputs' sums of four rows.
const AVX2_ROWS: usize = 4;

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
