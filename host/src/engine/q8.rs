//! Q8_0 matrix products for decode-sized batches, on int8 dot products.
//!
//! A decode step multiplies a handful of rows — one per running sequence — by every weight
//! matrix. The weights are held as Q8_0 (int8, one scale per block of 32 values), so a step
//! reads a quarter of the f32 bytes; each input row is quantized the same way. The products
//! run on int8 dot-product instructions: AVX-512 VNNI where the CPU has it, AVX2 otherwise,
//! portable code elsewhere.
//!
//! Layout: a row's blocks are taken sixteen at a time (a *group*; the last may be shorter)
//! and stored step-major — the first 4 bytes of each of the sixteen blocks, then the next 4,
//! and so on. One 64-byte load then holds 4 bytes of sixteen blocks, and a `vpdpbusd` adds
//! their products into sixteen lanes, one per block: eight loads and dot products give
//! sixteen blocks' integer sums in one register, scaled with one multiply-add against the
//! sixteen scales, which are contiguous. Inputs are quantized into the same layout.
//!
//! Each weight row is loaded once for up to four input rows, and outputs are computed a few
//! at a time, so a batch of eight sequences costs little more than one: the weights' bytes,
//! not the arithmetic, bound a decode step.
//!
//! A weight block's scale is stored as f16, as in GGUF's Q8_0, beside the sum of its values:
//! activations are shifted to unsigned (`q + 128`) for VNNI's unsigned × signed product, and
//! the `128 · Σw` this adds is taken off each block's integer sum exactly. Per 32 weights a
//! row reads 36 bytes — what candle and llama.cpp read for Q8_0 (34) and little more.
//!
//! Batch invariance: a row goes through the same operations in the same order whatever rows
//! share the call or however outputs are tiled and spread over threads (one kernel per
//! process, chosen once), so a sequence decodes the same alone or in any batch.

use half::f16;

use super::OutPtr;

const BLOCK: usize = 32;
/// Blocks whose sums one register holds, a lane each.
const GROUP: usize = 16;
/// 4-byte steps a block is cut into.
const STEPS: usize = BLOCK / 4;
/// Input rows multiplied against each weight row while it is loaded.
const MAX_ROWS: usize = 4;
/// Outputs a tile computes at most.
const MAX_OUTS: usize = 8;
/// Outputs handed to a thread at a time: a multiple of every tile width, and few enough rows
/// of weights (≤ 36 KiB) to stay in L1 while each block of input rows passes over them.
const STRIPE: usize = 24;
/// Multiply-adds below which a product stays on the calling thread: waking the pool costs
/// more than it.
const PARALLEL_MIN_WORK: usize = 256 << 10;

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
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
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

    /// Outputs per tile for `rows` input rows: as many as registers hold accumulators for.
    fn outs(self, rows: usize) -> usize {
        match (self, rows) {
            (Kernel::Vnni512, 1) => 8,
            (Kernel::Vnni512, 2) => 6,
            (Kernel::Vnni512, _) => 3,
            _ => 1,
        }
    }
}

/// Where value `c` of a row (`blocks` blocks long) is stored in the grouped layout.
fn position(c: usize, blocks: usize) -> usize {
    let (b, byte) = (c / BLOCK, c % BLOCK);
    let g0 = b / GROUP * GROUP;
    let width = 4 * (blocks - g0).min(GROUP);
    g0 * BLOCK + byte / 4 * width + (b - g0) * 4 + byte % 4
}

/// Quantizes one block to int8; returns its scale.
/// Written so that it vectorizes (eight running maxima; rounding half to even, which the
/// CPU does in one instruction): a decode step quantizes every input row of every matmul.
pub(super) fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let mut m = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, v) in m.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = m.iter().fold(0f32, |a, &b| a.max(b));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// A weight matrix (`rows` outputs × `cols` inputs) in Q8_0, grouped layout.
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// `rows × cols` int8 values, each row in the grouped layout.
    q: Vec<i8>,
    /// Per row and block: the scale.
    scale: Vec<f16>,
    /// Per row and block: the sum of its values (`|Σq| ≤ 32 · 127`).
    sum: Vec<i16>,
    kernel: Kernel,
}

/// Input rows quantized per block, in the grouped layout: unsigned values (`q + 128`), and
/// per row and block the scale.
struct Quantized {
    u: Vec<u8>,
    scale: Vec<f32>,
}

impl Q8Matrix {
    /// Quantizes `w` (`rows × cols`, row-major; `cols` a multiple of 32) to Q8_0.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return Err(format!("a {rows} × {cols} matrix cannot be held in blocks of {BLOCK}"));
        }
        let blocks = cols / BLOCK;
        let mut q = vec![0i8; rows * cols];
        let mut scale = vec![f16::ZERO; rows * blocks];
        let mut sum = vec![0i16; rows * blocks];
        let mut tmp = [0i8; BLOCK];
        for r in 0..rows {
            for b in 0..blocks {
                let d = quantize_block(&w[r * cols + b * BLOCK..][..BLOCK], &mut tmp);
                scale[r * blocks + b] = f16::from_f32(d);
                sum[r * blocks + b] = tmp.iter().map(|&v| v as i16).sum();
                for (c, &v) in tmp.iter().enumerate() {
                    q[r * cols + position(b * BLOCK + c, blocks)] = v;
                }
            }
        }
        Ok(Self { rows, cols, q, scale, sum, kernel: Kernel::detect() })
    }

    /// The same matrix computed with another kernel (tests compare them).
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Bytes a product reads from this matrix (values, scales and sums).
    pub fn bytes(&self) -> usize {
        self.q.len() + 2 * self.scale.len() + 2 * self.sum.len()
    }

    /// `x · Wᵀ` for the `n` rows of `x` (`n × cols`): `out` is `n × rows`.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "q8 matmul: input size");
        assert_eq!(out.len(), n * self.rows, "q8 matmul: output size");
        thread_local! {
            static QUANTIZED: std::cell::RefCell<Quantized> =
                const { std::cell::RefCell::new(Quantized { u: Vec::new(), scale: Vec::new() }) };
        }
        QUANTIZED.with(|cell| {
            let xq = &mut *cell.borrow_mut();
            self.quantize_input(x, n, xq);
            let xq = &*xq;
            let dst = OutPtr(out.as_mut_ptr());
            let stripes = self.rows.div_ceil(STRIPE);
            let run = |range: std::ops::Range<usize>| {
                for s in range {
                    let end = ((s + 1) * STRIPE).min(self.rows);
                    for r0 in (0..n).step_by(MAX_ROWS) {
                        let rows = (n - r0).min(MAX_ROWS);
                        let width = self.kernel.outs(rows);
                        let mut o0 = s * STRIPE;
                        while o0 < end {
                            let outs = (end - o0).min(width);
                            let mut res: Tile = [[0.0; MAX_ROWS]; MAX_OUTS];
                            self.tile(o0, outs, xq, r0, rows, &mut res);
                            for (j, col) in res[..outs].iter().enumerate() {
                                for (i, v) in col[..rows].iter().enumerate() {
                                    // SAFETY: (r0 + i, o0 + j) is inside `out` (n × rows, checked
                                    // above); stripes are disjoint in outputs, so no two tasks
                                    // write one element.
                                    unsafe { *dst.at((r0 + i) * self.rows + o0 + j) = *v };
                                }
                            }
                            o0 += outs;
                        }
                    }
                }
            };
            if n * self.rows * self.cols < PARALLEL_MIN_WORK {
                run(0..stripes)
            } else {
                // candle's barrier pool: workers that spin between calls, so dispatch costs
                // little against a decode step's many small products.
                candle_core::utils::barrier_pool().execute_chunked(stripes, run)
            }
        });
    }

    /// Quantizes the `n` rows of `x` into `xq`, in the grouped layout.
    fn quantize_input(&self, x: &[f32], n: usize, xq: &mut Quantized) {
        let blocks = self.cols / BLOCK;
        xq.u.resize(n * self.cols, 0);
        xq.scale.resize(n * blocks, 0.0);
        let mut tmp = [0i8; BLOCK];
        for r in 0..n {
            for b in 0..blocks {
                xq.scale[r * blocks + b] = quantize_block(&x[r * self.cols + b * BLOCK..][..BLOCK], &mut tmp);
                let g0 = b / GROUP * GROUP;
                let width = 4 * (blocks - g0).min(GROUP);
                let base = r * self.cols + g0 * BLOCK + (b - g0) * 4;
                for (k, four) in tmp.chunks_exact(4).enumerate() {
                    // q + 128 as u8 flips the sign bit.
                    let shifted: [u8; 4] = std::array::from_fn(|t| four[t] as u8 ^ 0x80);
                    xq.u[base + k * width..][..4].copy_from_slice(&shifted);
                }
            }
        }
    }

    /// Outputs `o0..o0 + outs` for input rows `r0..r0 + rows`.
    fn tile(&self, o0: usize, outs: usize, x: &Quantized, r0: usize, rows: usize, res: &mut Tile) {
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: chosen only when the CPU has these features (Kernel::detect); the tile
            // is inside the matrix and the input (the callers' loops).
            Kernel::Vnni512 => unsafe {
                // Monomorphised per shape, so that the accumulators live in registers.
                match (outs, rows) {
                    (8, 1) => self.tile_vnni512::<8, 1>(o0, x, r0, res),
                    (6, 2) => self.tile_vnni512::<6, 2>(o0, x, r0, res),
                    (3, 3) => self.tile_vnni512::<3, 3>(o0, x, r0, res),
                    (3, 4) => self.tile_vnni512::<3, 4>(o0, x, r0, res),
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

    /// The reference: per block the integer dot product of the signed values, times both
    /// scales, summed in block order.
    fn dot_portable(&self, o: usize, x: &Quantized, r0: usize, rows: usize, res: &mut [f32; MAX_ROWS]) {
        let blocks = self.cols / BLOCK;
        let w = &self.q[o * self.cols..][..self.cols];
        for (i, out) in res.iter_mut().enumerate().take(rows) {
            let r = r0 + i;
            let u = &x.u[r * self.cols..][..self.cols];
            let mut acc = 0f32;
            for b in 0..blocks {
                let dot: i32 = (b * BLOCK..(b + 1) * BLOCK)
                    .map(|c| position(c, blocks))
                    .map(|p| w[p] as i32 * (u[p] as i32 - 128))
                    .sum();
                acc += x.scale[r * blocks + b] * (self.scale[o * blocks + b].to_f32() * dot as f32);
            }
            *out = acc;
        }
    }

    /// Outputs `o0..o0 + O` for input rows `r0..r0 + R`: per group, each step's weights loaded
    /// once for all `R` rows and each input's once for all `O` outputs.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile_vnni512<const O: usize, const R: usize>(&self, o0: usize, x: &Quantized, r0: usize, res: &mut Tile) {
        // SAFETY: the caller checked the CPU features; every load is masked to its group,
        // which lies within its row (`o0 + O ≤ self.rows`, `r0 + R ≤ n`).
        unsafe {
            use std::arch::x86_64::*;
            let (cols, blocks) = (self.cols, self.cols / BLOCK);
            let mut acc = [[_mm512_setzero_ps(); R]; O];
            let mut g0 = 0;
            while g0 < blocks {
                let gb = (blocks - g0).min(GROUP);
                let width = 4 * gb;
                let bytes: u64 = if gb == GROUP { u64::MAX } else { (1u64 << width) - 1 };
                let lanes: u16 = if gb == GROUP { u16::MAX } else { (1u16 << gb) - 1 };
                let mut sums = [[_mm512_setzero_si512(); R]; O];
                for k in 0..STEPS {
                    let off = g0 * BLOCK + k * width;
                    let w: [__m512i; O] = std::array::from_fn(|j| {
                        _mm512_maskz_loadu_epi8(bytes, self.q.as_ptr().add((o0 + j) * cols + off))
                    });
                    // The next tile's weights, on their way from memory while this one runs
                    // (a hint: past the matrix's end it is dropped, never dereferenced).
                    for j in 0..O {
                        let ahead = self.q.as_ptr().wrapping_add((o0 + 2 * O + j) * cols + off);
                        _mm_prefetch::<_MM_HINT_T0>(ahead);
                    }
                    for i in 0..R {
                        let u = _mm512_maskz_loadu_epi8(bytes, x.u.as_ptr().add((r0 + i) * cols + off) as *const i8);
                        for j in 0..O {
                            sums[j][i] = _mm512_dpbusd_epi32(sums[j][i], u, w[j]);
                        }
                    }
                }
                for j in 0..O {
                    let at = (o0 + j) * blocks + g0;
                    let ws =
                        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, self.scale.as_ptr().add(at) as *const i16));
                    let shift = _mm512_slli_epi32::<7>(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(
                        lanes,
                        self.sum.as_ptr().add(at),
                    )));
                    for i in 0..R {
                        let xs = _mm512_maskz_loadu_ps(lanes, x.scale.as_ptr().add((r0 + i) * blocks + g0));
                        let dot = _mm512_sub_epi32(sums[j][i], shift);
                        let t = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), ws);
                        acc[j][i] = _mm512_fmadd_ps(t, xs, acc[j][i]);
                    }
                }
                g0 += gb;
            }
            for j in 0..O {
                for i in 0..R {
                    res[j][i] = _mm512_reduce_add_ps(acc[j][i]);
                }
            }
        }
    }

    /// One output for input rows `r0..r0 + rows`: as the VNNI kernel, a group's sixteen lanes
    /// in two halves of eight, with the sign trick for the signed × signed products.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(&self, o: usize, x: &Quantized, r0: usize, rows: usize, res: &mut [f32; MAX_ROWS]) {
        // SAFETY: the caller checked the CPU features; every load is masked (by 32-bit lanes)
        // to its group, which lies within its row (`o < self.rows`, `r0 + rows ≤ n`).
        unsafe {
            use std::arch::x86_64::*;
            let (cols, blocks) = (self.cols, self.cols / BLOCK);
            let ones = _mm256_set1_epi16(1);
            let bias = _mm256_set1_epi8(-128);
            let lane_mask = |n: usize| {
                let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
            };
            let mut acc = [[_mm256_setzero_ps(); 2]; MAX_ROWS];
            let mut g0 = 0;
            while g0 < blocks {
                let gb = (blocks - g0).min(GROUP);
                let width = 4 * gb;
                let masks = [lane_mask(gb.min(8)), lane_mask(gb.saturating_sub(8))];
                let halves = if gb > 8 { 2 } else { 1 };
                let mut scales = [0f32; GROUP];
                for (d, s) in scales.iter_mut().zip(&self.scale[o * blocks + g0..][..gb]) {
                    *d = s.to_f32();
                }
                for i in 0..rows {
                    let r = r0 + i;
                    for h in 0..halves {
                        let mut sum = _mm256_setzero_si256();
                        for k in 0..STEPS {
                            let off = g0 * BLOCK + k * width + h * 32;
                            let w = _mm256_maskload_epi32(self.q.as_ptr().add(o * cols + off) as *const i32, masks[h]);
                            let u = _mm256_maskload_epi32(x.u.as_ptr().add(r * cols + off) as *const i32, masks[h]);
                            // |q| ≤ 127 and |w| ≤ 127, so a pair of products fits in i16.
                            let q = _mm256_add_epi8(u, bias);
                            let prod = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(w, q));
                            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(prod, ones));
                        }
                        let at = g0 + h * 8;
                        let ws = _mm256_loadu_ps(scales[h * 8..].as_ptr());
                        let xs = _mm256_maskload_ps(x.scale.as_ptr().add(r * blocks + at), masks[h]);
                        let t = _mm256_mul_ps(_mm256_cvtepi32_ps(sum), ws);
                        acc[i][h] = _mm256_fmadd_ps(t, xs, acc[i][h]);
                    }
                }
                g0 += gb;
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
#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..rows * cols).map(|i| (((i * 7919 + seed) % 2003) as f32 / 1001.0 - 1.0) * 0.1).collect()
    }

    /// Every kernel this CPU runs computes what the portable reference does (up to float
    /// summation order), and all are close to the f32 product.
    #[test]
    fn kernels_agree_with_the_reference_and_with_f32() {
        // 18 blocks: a full group and a short one; 70 outputs: stripes and tiles with tails.
        let (rows, cols, n) = (70, 576, 6);
        let w = matrix(rows, cols, 1);
        let x = matrix(n, cols, 5);
        let reference = Q8Matrix::quantize(&w, rows, cols).unwrap().with_kernel(Kernel::Portable);
        let mut want = vec![0f32; n * rows];
        reference.matmul(&x, n, &mut want);
        for r in 0..n {
            for o in 0..rows {
                let exact: f32 = (0..cols).map(|c| x[r * cols + c] * w[o * cols + c]).sum();
                assert!((want[r * rows + o] - exact).abs() < 1e-2, "{r},{o}: {} vs {exact}", want[r * rows + o]);
            }
        }
        let mut kernels = vec![Kernel::detect()];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            kernels.push(Kernel::Avx2);
        }
        for k in kernels {
            let m = Q8Matrix::quantize(&w, rows, cols).unwrap().with_kernel(k);
            let mut got = vec![0f32; n * rows];
            m.matmul(&x, n, &mut got);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{k:?} at {i}: {a} vs {b}");
            }
        }
    }

    /// A row's result does not depend on the rows beside it (batch invariance), whether the
    /// product runs on the calling thread or spread over the pool.
    #[test]
    fn a_row_gets_the_same_result_alone_or_in_a_batch() {
        for (rows, cols) in [(33, 576), (301, 1536)] {
            let w = matrix(rows, cols, 3);
            let x = matrix(9, cols, 11);
            let m = Q8Matrix::quantize(&w, rows, cols).unwrap();
            let mut all = vec![0f32; 9 * rows];
            m.matmul(&x, 9, &mut all);
            for r in 0..9 {
                for n in [1, 2, 3] {
                    let mut some = vec![0f32; n * rows];
                    let mut input = x[r * cols..(r + 1) * cols].to_vec();
                    input.extend(x.iter().take((n - 1) * cols));
                    m.matmul(&input, n, &mut some);
                    assert!(some[..rows] == all[r * rows..(r + 1) * rows], "{rows}×{cols}: row {r} with {n}");
                }
            }
        }
    }
}
