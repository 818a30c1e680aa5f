//! Rotary embeddings and causal attention over explicit positions.
//!
//! Owns the two kernels that candle's stock llama gets wrong for compositional reuse:
//! RoPE at arbitrary (not necessarily contiguous) positions, in either direction, and
//! attention whose mask is position-based — a query at position `p` sees exactly the keys
//! at positions `≤ p`, wherever they sit in the cache.
//!
//! Attention never materialises the full score matrix: queries are processed in blocks of
//! [`QUERY_BLOCK`] rows per head, each block a `gemm` for `QKᵀ`, a fused masked softmax and
//! a `gemm` for `PV`, and a block only reads the keys up to the last position it can see
//! (when cache positions are sorted, as they are after an in-order prefill). Blocks run in
//! parallel on rayon with single-threaded `gemm`s.

use rayon::prelude::*;

use super::OutPtr;

/// Query rows per attention block. At most 64 on purpose: gemm picks its k-blocking for the
/// `PV` product (k = keys) from the shape, and with ≤ 64 rows and a 64-wide head it always
/// takes the same one (512-key blocks from key 0). A row's output therefore does not depend on
/// which other rows share its block, so reusing a prefix gives bit-for-bit the same result
/// as computing it (batch invariance), and quality comparisons see only real differences.
const QUERY_BLOCK: usize = 64;

/// The fewest keys a query block multiplies. gemm sums a `PV` product over k ≤ 4 keys in
/// another order than over more (measured: a row with ≤ 4 visible keys gave other bits when
/// its block reached 2, 3-4 or ≥ 5 keys; with ≥ 5 visible keys every block agreed), so every
/// block takes at least 8 (of a cache holding 8 or more), the masked ones adding exact zeros.
const MIN_KEYS: usize = 8;

/// Below this many (query, key) pairs per head, waking the thread pool costs more than the
/// work: decode steps run on the calling thread.
const SEQUENTIAL_MAX_WORK: usize = 32 * 1024;

/// Up to this many query rows, attention uses dot products instead of gemm.
const VECTOR_MAX_ROWS: usize = 4;

/// Precomputed RoPE tables for positions `0..max_positions`.
pub struct Rope {
    /// `cos[p * half + i]` = cos(p · θᵢ).
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    max_positions: usize,
}

impl Rope {
    /// Tables for `head_dim`-wide heads, frequency base `base`, covering `max_positions`.
    pub fn new(head_dim: usize, base: f32, max_positions: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> =
            (0..half).map(|i| 1.0 / (base as f64).powf(2.0 * i as f64 / head_dim as f64)).collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self { cos, sin, half, max_positions }
    }

    /// Positions this table covers.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates `x` (one row per position, each row `heads × head_dim`) in place by its
    /// position, using interleaved pairs (`rope_i`, as GGUF llama weights expect).
    /// `sign = -1.0` rotates back (un-RoPE).
    ///
    /// Panics if a position is beyond the table: callers check the context length first.
    pub fn rotate(&self, x: &mut [f32], positions: &[u32], sign: f32) {
        let row = x.len() / positions.len().max(1);
        let hd = self.half * 2;
        for (r, &p) in x.chunks_exact_mut(row).zip(positions) {
            let p = p as usize;
            assert!(p < self.max_positions, "position {p} beyond the RoPE table");
            let cos = &self.cos[p * self.half..(p + 1) * self.half];
            let sin = &self.sin[p * self.half..(p + 1) * self.half];
            for head in r.chunks_exact_mut(hd) {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (a, b) = (pair[0], pair[1]);
                    let (c, s) = (cos[i], sign * sin[i]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        }
    }

    /// Moves rows already rotated to `from` so that they are rotated to `to` instead.
    pub fn rerotate(&self, x: &mut [f32], from: &[u32], to: &[u32]) {
        self.rotate(x, from, -1.0);
        self.rotate(x, to, 1.0);
    }
}

/// The attention each key receives from a few queries, summed over heads and queries and
/// divided by their count: softmax(q·k / √d) over the keys at positions `≤` each query's.
/// A probe, not a kernel: plain loops, for a handful of query rows.
pub fn attention_mass(heads: Heads, q: &[f32], q_pos: &[u32], keys: &Keys<'_>) -> Vec<f32> {
    let Heads { q_heads, kv_heads, head_dim: hd } = heads;
    let (t, group, scale) = (keys.positions.len(), q_heads / kv_heads, 1.0 / (hd as f32).sqrt());
    let mut mass = vec![0f32; t];
    let mut scores = vec![0f32; t];
    for (i, &p) in q_pos.iter().enumerate() {
        for h in 0..q_heads {
            let qh = &q[(i * q_heads + h) * hd..][..hd];
            let g = h / group;
            let mut max = f32::NEG_INFINITY;
            for (r, s) in scores.iter_mut().enumerate() {
                *s = match keys.positions[r] <= p {
                    true => {
                        let k = &keys.k[(r * kv_heads + g) * hd..][..hd];
                        qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                    }
                    false => f32::NEG_INFINITY,
                };
                max = max.max(*s);
            }
            let sum: f32 = scores.iter().map(|s| (s - max).exp()).sum();
            for (m, s) in mass.iter_mut().zip(&scores) {
                *m += (s - max).exp() / sum;
            }
        }
    }
    let n = (q_pos.len() * q_heads).max(1) as f32;
    mass.iter_mut().for_each(|m| *m /= n);
    mass
}

/// Head layout of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Keys and values one attention call reads: `t` rows of `kv_heads × head_dim` each, in f32
/// or (decode's copy of a cache, [`KvCache`](super::model::KvCache)) f16.
pub struct Keys<'a, T = f32> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub positions: &'a [u32],
    /// Whether `positions` is non-decreasing: lets a query block stop at its last visible key.
    pub sorted: bool,
}

/// An element type attention reads K and V in.
pub trait Elem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// Sixteen elements from `p`, as f32.
    ///
    /// # Safety
    /// The CPU has AVX-512F and sixteen elements are readable from `p`; inlined into a caller
    /// compiled for AVX-512 (the intrinsics then inline too).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Elem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (16 f16 are 32 bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

/// `dst = scale · lhs · rhs` for row-major `dst` (m × n, rows `dst_rs` apart) and `lhs`
/// (m × k, rows `lhs_rs` apart); `rhs` element (i, j) is at `rhs[i · rhs_rs + j · rhs_cs]`,
/// so a transposed operand is just other strides. The one shape of gemm call kvgate makes.
///
/// # Safety
/// Every view described by the sizes and strides must be in bounds, and `dst` must not
/// overlap the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    scale: f32,
    threads: usize,
) {
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            1,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A block task's scratch space.
#[derive(Default)]
struct BlockBuffers {
    scores: Vec<f32>,
    q_pad: Vec<f32>,
    out_pad: Vec<f32>,
}

/// Causal attention of `q` (n rows of `q_heads × head_dim`, already rotated, at `q_pos`)
/// over `keys`, written to `out` (n rows of `q_heads × head_dim`).
///
/// `decode` allows the dot-product path for a few rows, which sums in another order than
/// the blocked path: prefill passes `false` so that its results never depend on batch size.
pub fn attention(heads: Heads, q: &[f32], q_pos: &[u32], keys: &Keys<'_>, out: &mut [f32], decode: bool) {
    let Heads { q_heads, kv_heads, head_dim: hd } = heads;
    let n = q_pos.len();
    let q_stride = q_heads * hd;
    let kv_stride = kv_heads * hd;
    let t = keys.positions.len();
    assert_eq!(q.len(), n * q_stride);
    assert_eq!(out.len(), n * q_stride);
    assert_eq!(keys.k.len(), t * kv_stride);
    assert_eq!(keys.v.len(), t * kv_stride);
    let group = q_heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let blocks = n.div_ceil(QUERY_BLOCK);
    let out_ptr = OutPtr(out.as_mut_ptr());

    // Every block is computed as a full QUERY_BLOCK-row block (short ones padded with zero
    // rows), so gemm sees the same shapes, picks the same kernels and sums in the same order
    // for a row whatever else is in the batch: see QUERY_BLOCK.
    let block = |bufs: &mut BlockBuffers, task: usize| {
        let (h, b) = (task / blocks, task % blocks);
        let g = h / group;
        let r0 = b * QUERY_BLOCK;
        let r1 = (r0 + QUERY_BLOCK).min(n);
        let rows = r1 - r0;
        let block_max = q_pos[r0..r1].iter().copied().max().unwrap_or(0);
        // At least MIN_KEYS keys (masked past each row's own): gemm multiplies a product with
        // fewer in another order, and a row's result would depend on its block's other rows.
        let kend = match keys.sorted {
            true => keys.positions.partition_point(|&p| p <= block_max).max(MIN_KEYS.min(t)),
            false => t,
        };
        if kend == 0 {
            for r in r0..r1 {
                // SAFETY: row r, head h belongs to this task only; in bounds by the asserts.
                unsafe { std::ptr::write_bytes(out_ptr.at(r * q_stride + h * hd), 0, hd) };
            }
            return;
        }
        let BlockBuffers { scores, q_pad, out_pad } = bufs;
        q_pad.clear();
        q_pad.resize(QUERY_BLOCK * hd, 0.0);
        for i in 0..rows {
            q_pad[i * hd..(i + 1) * hd].copy_from_slice(&q[(r0 + i) * q_stride + h * hd..][..hd]);
        }
        scores.resize(QUERY_BLOCK * kend, 0.0);
        out_pad.resize(QUERY_BLOCK * hd, 0.0);
        // SAFETY: all pointers and strides describe in-bounds views checked by the asserts
        // above; the buffers are this task's own: q_pad and out_pad QUERY_BLOCK × hd, scores
        // QUERY_BLOCK × kend.
        unsafe {
            gemm_rows(
                (QUERY_BLOCK, kend, hd),
                scores.as_mut_ptr(),
                kend,
                q_pad.as_ptr(),
                hd,
                keys.k.as_ptr().add(g * hd),
                (1, kv_stride),
                scale,
                1,
            );
        }
        for (i, row) in scores.chunks_exact_mut(kend).enumerate() {
            if i >= rows {
                row.fill(0.0);
                continue;
            }
            let qp = q_pos[r0 + i];
            if keys.sorted {
                let lim = keys.positions[..kend].partition_point(|&p| p <= qp);
                softmax_prefix(row, lim);
            } else {
                for (s, &p) in row.iter_mut().zip(keys.positions) {
                    if p > qp {
                        *s = f32::NEG_INFINITY;
                    }
                }
                softmax_prefix(row, kend);
            }
        }
        // SAFETY: as above.
        unsafe {
            gemm_rows(
                (QUERY_BLOCK, hd, kend),
                out_pad.as_mut_ptr(),
                hd,
                scores.as_ptr(),
                kend,
                keys.v.as_ptr().add(g * hd),
                (kv_stride, 1),
                1.0,
                1,
            );
        }
        for i in 0..rows {
            // SAFETY: row r0 + i, head h belongs to this task only; in bounds by the asserts.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.at((r0 + i) * q_stride + h * hd), hd) };
            o.copy_from_slice(&out_pad[i * hd..(i + 1) * hd]);
        }
    };
    let tasks = q_heads * blocks;
    if decode && n <= VECTOR_MAX_ROWS {
        // Decode: a handful of query rows. gemm pads such thin products to its tile size, so
        // plain dot products are several times faster here.
        // Decode runs between the Q8_0 matmuls, whose barrier-pool workers are still
        // spinning: handing them the heads costs nothing, waking rayon would.
        candle_core::utils::barrier_pool().execute_chunked(n * q_heads, |tasks| {
            let mut scores = Vec::new();
            tasks.for_each(|task| {
                let (i, h) = (task / q_heads, task % q_heads);
                // SAFETY: row i, head h belongs to this task only; in bounds by the asserts.
                let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(i * q_stride + h * hd), hd) };
                decode_heads(heads, &q[i * q_stride..][..q_stride], q_pos[i], keys, h, &mut scores, o);
            });
        });
    } else if n * t < SEQUENTIAL_MAX_WORK {
        let mut bufs = BlockBuffers::default();
        (0..tasks).for_each(|task| block(&mut bufs, task));
    } else {
        (0..tasks).into_par_iter().for_each_init(BlockBuffers::default, block);
    }
}

/// One decode query per sequence, each against its own keys (`keys[i]` for row `i` of `q`,
/// at `q_pos[i]`): the heads of every sequence in one dispatch to the pool. Each row's result
/// is exactly what [`attention`] computes for it alone in decode.
pub fn attention_decode_batch<T: Elem>(heads: Heads, q: &[f32], q_pos: &[u32], keys: &[Keys<'_, T>], out: &mut [f32]) {
    let Heads { q_heads, head_dim: hd, .. } = heads;
    let q_stride = q_heads * hd;
    let n = q_pos.len();
    assert_eq!(q.len(), n * q_stride);
    assert_eq!(out.len(), n * q_stride);
    assert_eq!(keys.len(), n);
    for k in keys {
        let kv_stride = heads.kv_heads * hd;
        assert_eq!(k.k.len(), k.positions.len() * kv_stride);
        assert_eq!(k.v.len(), k.positions.len() * kv_stride);
    }
    // A task per (row, KV head) when they are enough to keep the threads busy: the group's
    // query heads share one pass over its keys. A head's arithmetic is the same either way.
    let group = q_heads / heads.kv_heads;
    let per_task = if n * heads.kv_heads >= GROUPED_MIN_TASKS { group } else { 1 };
    let tasks = q_heads / per_task;
    let out_ptr = OutPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(n * tasks, |range| {
        let mut scores = Vec::new();
        range.for_each(|task| {
            let (i, h) = (task / tasks, task % tasks * per_task);
            // SAFETY: row i, heads h..h + per_task belong to this task only; in bounds by the
            // asserts.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(i * q_stride + h * hd), per_task * hd) };
            decode_heads(heads, &q[i * q_stride..][..q_stride], q_pos[i], &keys[i], h, &mut scores, o);
        });
    });
}

/// (Row, KV head) tasks of a decode batch at least, for the heads of a group to share a task.
const GROUPED_MIN_TASKS: usize = 8;

/// Heads `h..h + o.len() / head_dim` (of one KV group) of one decode query row `q` (all
/// heads) at `qp` against `keys`, into `o`.
fn decode_heads<T: Elem>(
    heads: Heads,
    q: &[f32],
    qp: u32,
    keys: &Keys<'_, T>,
    h: usize,
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    let Heads { q_heads, kv_heads, head_dim: hd } = heads;
    let count = o.len() / hd;
    let (kv_stride, g) = (kv_heads * hd, h / (q_heads / kv_heads));
    assert_eq!(g, (h + count - 1) / (q_heads / kv_heads), "heads of one KV group");
    let scale = 1.0 / (hd as f32).sqrt();
    let t = keys.positions.len();
    let lim = if keys.sorted { keys.positions.partition_point(|&p| p <= qp) } else { t };
    let qh = &q[h * hd..][..count * hd];
    let (k, v) = (&keys.k[g * hd..], &keys.v[g * hd..]);
    let visible = |j: usize| keys.sorted || keys.positions[j] <= qp;
    #[cfg(target_arch = "x86_64")]
    if hd == 64 && *super::HAS_AVX512 {
        // SAFETY: the CPU has AVX-512F (checked); keys 0..lim lie within k and v (lim ≤ t
        // rows of kv_stride, head g's 64 values at g · 64 inside each row).
        unsafe {
            match count {
                1 => attend_avx512::<1, T>(qh, k, v, kv_stride, lim, scale, visible, scores, o),
                2 => attend_avx512::<2, T>(qh, k, v, kv_stride, lim, scale, visible, scores, o),
                3 => attend_avx512::<3, T>(qh, k, v, kv_stride, lim, scale, visible, scores, o),
                4 => attend_avx512::<4, T>(qh, k, v, kv_stride, lim, scale, visible, scores, o),
                _ => (0..count).for_each(|c| {
                    let (qc, oc) = (&qh[c * hd..][..hd], &mut o[c * hd..][..hd]);
                    attend_avx512::<1, T>(qc, k, v, kv_stride, lim, scale, visible, scores, oc)
                }),
            }
        }
        return;
    }
    for c in 0..count {
        let (qc, oc) = (&qh[c * hd..][..hd], &mut o[c * hd..][..hd]);
        match hd {
            64 => attend_one::<64, T>(qc, k, v, kv_stride, lim, scale, visible, scores, oc),
            128 => attend_one::<128, T>(qc, k, v, kv_stride, lim, scale, visible, scores, oc),
            _ => attend_one_dyn(qc, k, v, kv_stride, lim, scale, visible, scores, oc),
        }
    }
}

/// One query row of one head against keys `0..lim` (rows `stride` apart), head dim `HD`
/// known at compile time so that the dot products and the weighted sum stay in registers.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_one<const HD: usize, T: Elem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    stride: usize,
    lim: usize,
    scale: f32,
    visible: impl Fn(usize) -> bool,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let q: &[f32; HD] = q.try_into().expect("head dim");
    scores.clear();
    scores.extend((0..lim).map(|j| {
        if !visible(j) {
            return f32::NEG_INFINITY;
        }
        let kr: &[T; HD] = k[j * stride..][..HD].try_into().expect("head dim");
        let mut acc = [0f32; HD];
        for d in 0..HD {
            acc[d] = q[d] * kr[d].to_f32();
        }
        // Pairwise halving: a serial sum would be one long chain of dependent adds.
        let mut w = HD;
        while w > 1 {
            w /= 2;
            for d in 0..w {
                acc[d] += acc[d + w];
            }
        }
        acc[0] * scale
    }));
    softmax_prefix(scores, lim);
    let mut acc = [0f32; HD];
    for (j, &p) in scores.iter().enumerate() {
        let vr: &[T; HD] = v[j * stride..][..HD].try_into().expect("head dim");
        for d in 0..HD {
            acc[d] += p * vr[d].to_f32();
        }
    }
    out.copy_from_slice(&acc);
}

/// [`attend_one`] for head dim 64 on AVX-512, for `G` query heads of one KV group at once
/// (`q`, `out`: `G × 64`): sixteen keys' dot products a head in sixteen registers and one
/// [`lane_sums`](super::lane_sums) (the portable form's halving sums spill to the stack), the
/// weighted sums of V in four accumulators a head, each key's values loaded once for the `G`
/// heads. A head's arithmetic does not depend on `G`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx512<const G: usize, T: Elem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    stride: usize,
    lim: usize,
    scale: f32,
    visible: impl Fn(usize) -> bool,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(q.len() == G * 64 && out.len() == G * 64);
    assert!(lim == 0 || ((lim - 1) * stride + 64 <= k.len() && (lim - 1) * stride + 64 <= v.len()));
    // Each head's scores rounded up to whole blocks of sixteen.
    let span = lim.next_multiple_of(16);
    scores.clear();
    scores.resize(G * span, 0.0);
    // SAFETY: the caller checked the CPU; every row read is inside k / v (asserted above),
    // every store inside `scores` (G · span) and `out`.
    unsafe {
        for j0 in (0..lim).step_by(16) {
            let keys = (lim - j0).min(16);
            for c in 0..G {
                let qv = [0, 16, 32, 48].map(|d| _mm512_loadu_ps(q.as_ptr().add(c * 64 + d)));
                let dots: [__m512; 16] = std::array::from_fn(|e| {
                    if e >= keys {
                        return _mm512_setzero_ps();
                    }
                    let kr = k.as_ptr().add((j0 + e) * stride);
                    let a = _mm512_mul_ps(qv[0], T::load16(kr));
                    let a = _mm512_fmadd_ps(qv[1], T::load16(kr.add(16)), a);
                    let a = _mm512_fmadd_ps(qv[2], T::load16(kr.add(32)), a);
                    _mm512_fmadd_ps(qv[3], T::load16(kr.add(48)), a)
                });
                let s = _mm512_mul_ps(super::lane_sums(dots), _mm512_set1_ps(scale));
                _mm512_storeu_ps(scores.as_mut_ptr().add(c * span + j0), s);
            }
        }
        for c in 0..G {
            let row = &mut scores[c * span..][..lim];
            for (j, s) in row.iter_mut().enumerate() {
                if !visible(j) {
                    *s = f32::NEG_INFINITY;
                }
            }
            softmax_prefix(row, lim);
        }
        let mut acc = [[_mm512_setzero_ps(); 4]; G];
        for j in 0..lim {
            let vr = v.as_ptr().add(j * stride);
            let vv = [0, 16, 32, 48].map(|d| T::load16(vr.add(d)));
            for (c, a) in acc.iter_mut().enumerate() {
                let p = _mm512_set1_ps(*scores.get_unchecked(c * span + j));
                for (a, v) in a.iter_mut().zip(vv) {
                    *a = _mm512_fmadd_ps(p, v, *a);
                }
            }
        }
        for (c, a) in acc.iter().enumerate() {
            for (d, a) in a.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(c * 64 + 16 * d), *a);
            }
        }
    }
}

/// [`attend_one`] for head dims without a specialisation.
#[allow(clippy::too_many_arguments)]
fn attend_one_dyn<T: Elem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    stride: usize,
    lim: usize,
    scale: f32,
    visible: impl Fn(usize) -> bool,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len();
    scores.clear();
    scores.extend((0..lim).map(|j| {
        if !visible(j) {
            return f32::NEG_INFINITY;
        }
        q.iter().zip(&k[j * stride..][..hd]).map(|(a, b)| a * b.to_f32()).sum::<f32>() * scale
    }));
    softmax_prefix(scores, lim);
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        for (o, x) in out.iter_mut().zip(&v[j * stride..][..hd]) {
            *o += p * x.to_f32();
        }
    }
}

/// Softmax over `row[..lim]` in place; `row[lim..]` becomes 0. `-inf` entries become 0.
fn softmax_prefix(row: &mut [f32], lim: usize) {
    let (live, dead) = row.split_at_mut(lim);
    dead.fill(0.0);
    if live.is_empty() {
        return;
    }
    let max = max_of(live);
    if max == f32::NEG_INFINITY {
        live.fill(0.0);
        return;
    }
    for x in live.iter_mut() {
        *x = fast_exp(*x - max);
    }
    let inv = 1.0 / sum_of(live);
    for x in live.iter_mut() {
        *x *= inv;
    }
}

const LANES: usize = 16;

fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = tail.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for a in acc {
        m = m.max(a);
    }
    m
}

fn sum_of(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `exp(x)`, relative error < 1e-6, branch-free so that loops over it vectorise.
/// Inputs are clamped to [-87, 88], where f32's exp under- or overflows anyway.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Below this exp underflows to 0 in f32 anyway. Clamped with max/min, a NaN becomes −87
    // here (and is given back below), so that n is always finite.
    let c = x.max(-87.0).min(88.0);
    // Round to nearest with the 1.5·2²³ trick (no branches, no libm call).
    const SHIFT: f32 = 12_582_912.0;
    let n = (c * LOG2E + SHIFT) - SHIFT;
    let r = c - n * LN2_HI - n * LN2_LO;
    // exp(r) on [-ln2/2, ln2/2]: degree-6 Taylor/minimax polynomial.
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // `as i32` saturates, which the vectorizer turns into a scalar conversion per lane (it did:
    // softmax_prefix extracted every lane); n is a whole number in [−126, 127], where the plain
    // conversion gives the same.
    // SAFETY: n is finite and in range (c is clamped above).
    let n = unsafe { n.to_int_unchecked::<i32>() };
    let e = p * f32::from_bits(((n + 127) as u32) << 23);
    if x.is_nan() { x } else { e }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's attention output does not depend on the other rows of its block: a block's
    /// last visible key moves with them (from the row's own up to 200 keys on), the row's bits
    /// stay — also for the first rows of a prompt, which see fewer keys than gemm's small-k
    /// path takes.
    #[test]
    fn a_row_does_not_depend_on_how_far_its_block_reaches() {
        let heads = Heads { q_heads: 9, kv_heads: 3, head_dim: 64 };
        let (t, width) = (256, 3 * 64);
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        let k: Vec<f32> = (0..t * width).map(|_| rnd()).collect();
        let v: Vec<f32> = (0..t * width).map(|_| rnd()).collect();
        let q: Vec<f32> = (0..9 * 64).map(|_| rnd()).collect();
        let positions: Vec<u32> = (0..t as u32).collect();
        let keys = Keys { k: &k, v: &v, positions: &positions, sorted: true };
        for own in [0u32, 1, 2, 3, 4, 5, 9, 17] {
            let mut first: Option<Vec<f32>> = None;
            for reach in [0u32, 1, 2, 3, 4, 5, 7, 8, 15, 63, 64, 95, 200] {
                // A block of two rows: ours at `own`, the other `reach` positions later.
                let mut out = vec![0f32; 2 * q.len()];
                attention(heads, &[q.clone(), q.clone()].concat(), &[own, own + reach], &keys, &mut out, false);
                let mine = out[..q.len()].to_vec();
                match &first {
                    None => first = Some(mine),
                    Some(f) => assert!(*f == mine, "row at {own}: other bits when its block reaches {}", own + reach),
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f32;
        for i in 0..=80_000 {
            let x = -(i as f32) / 1000.0;
            let rel = (fast_exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(fast_exp(-200.0), fast_exp(-87.0));
        assert!(fast_exp(-200.0) < 1e-37);
        assert_eq!(fast_exp(200.0), fast_exp(88.0));
        assert!(fast_exp(f32::NAN).is_nan(), "a NaN is given back, not clamped into a number");
    }

    #[test]
    fn rope_round_trips_and_rerotates() {
        let rope = Rope::new(8, 10_000.0, 64);
        let orig: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut x = orig.clone();
        rope.rotate(&mut x, &[3, 17], 1.0);
        assert!(x.iter().zip(&orig).any(|(a, b)| (a - b).abs() > 1e-3));
        let mut y = orig.clone();
        rope.rotate(&mut y, &[40, 41], 1.0);
        rope.rerotate(&mut y, &[40, 41], &[3, 17]);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
        rope.rotate(&mut x, &[3, 17], -1.0);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    /// Plain attention with an explicit position mask, for comparison.
    fn naive(heads: Heads, q: &[f32], q_pos: &[u32], k: &[f32], v: &[f32], k_pos: &[u32]) -> Vec<f32> {
        let Heads { q_heads, kv_heads, head_dim: hd } = heads;
        let mut out = vec![0.0; q.len()];
        for (i, &qp) in q_pos.iter().enumerate() {
            for h in 0..q_heads {
                let g = h / (q_heads / kv_heads);
                let qv = &q[i * q_heads * hd + h * hd..][..hd];
                let mut w: Vec<f64> = k_pos
                    .iter()
                    .enumerate()
                    .map(|(j, &kp)| {
                        if kp > qp {
                            return f64::NEG_INFINITY;
                        }
                        let kv = &k[j * kv_heads * hd + g * hd..][..hd];
                        qv.iter().zip(kv).map(|(a, b)| (a * b) as f64).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let m = w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                w.iter_mut().for_each(|x| *x = (*x - m).exp());
                let s: f64 = w.iter().sum();
                for d in 0..hd {
                    out[i * q_heads * hd + h * hd + d] = w
                        .iter()
                        .enumerate()
                        .map(|(j, wj)| wj / s * v[j * kv_heads * hd + g * hd + d] as f64)
                        .sum::<f64>() as f32;
                }
            }
        }
        out
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn blocked_attention_matches_naive_with_sorted_and_scattered_positions() {
        let heads = Heads { q_heads: 6, kv_heads: 2, head_dim: 8 };
        let t = 300;
        let k = pseudo(t * 16, 1);
        let v = pseudo(t * 16, 2);
        let sorted_pos: Vec<u32> = (0..t as u32).map(|p| p * 2).collect();
        // Queries: the last 200 keys' positions, i.e. a prefill that spans two query blocks.
        let q_pos: Vec<u32> = sorted_pos[100..].to_vec();
        let q = pseudo(q_pos.len() * 48, 3);
        for sorted in [true, false] {
            let mut k_pos = sorted_pos.clone();
            let (mut k2, mut v2) = (k.clone(), v.clone());
            if !sorted {
                // Reverse the cache order: the mask must follow positions, not indices.
                k_pos.reverse();
                k2 = k.chunks(16).rev().flatten().copied().collect();
                v2 = v.chunks(16).rev().flatten().copied().collect();
            }
            let keys = Keys { k: &k2, v: &v2, positions: &k_pos, sorted };
            let mut out = vec![0.0; q.len()];
            attention(heads, &q, &q_pos, &keys, &mut out, false);
            let want = naive(heads, &q, &q_pos, &k2, &v2, &k_pos);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "sorted={sorted}: {a} vs {b}");
            }
        }
    }

    /// Decode attention over f16 K and V gives bit for bit what it gives over their values in
    /// f32 (a load widens them exactly), in every kernel shape: grouped heads and one head
    /// a task, sorted and scattered positions.
    #[test]
    fn f16_keys_give_what_their_f32_values_give() {
        let heads = Heads { q_heads: 9, kv_heads: 3, head_dim: 64 };
        for n in [1usize, 3, 8] {
            let lens: Vec<usize> = (0..n).map(|i| 5 + 23 * i).collect();
            let half: Vec<(Vec<half::f16>, Vec<half::f16>, Vec<u32>)> = lens
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    let mut pos: Vec<u32> = (0..t as u32).collect();
                    if i % 2 == 1 {
                        pos.swap(0, t - 1);
                    }
                    let h = |seed| pseudo(t * 192, seed).into_iter().map(half::f16::from_f32).collect();
                    (h(30 + i as u32), h(40 + i as u32), pos)
                })
                .collect();
            let wide: Vec<(Vec<f32>, Vec<f32>)> = half
                .iter()
                .map(|(k, v, _)| (k.iter().map(|x| x.to_f32()).collect(), v.iter().map(|x| x.to_f32()).collect()))
                .collect();
            let sorted = |p: &[u32]| p.windows(2).all(|w| w[0] <= w[1]);
            let hk: Vec<Keys<'_, half::f16>> =
                half.iter().map(|(k, v, p)| Keys { k, v, positions: p, sorted: sorted(p) }).collect();
            let fk: Vec<Keys<'_>> = wide
                .iter()
                .zip(&half)
                .map(|((k, v), (_, _, p))| Keys { k, v, positions: p, sorted: sorted(p) })
                .collect();
            let q = pseudo(n * 576, 7);
            let q_pos: Vec<u32> = lens.iter().map(|&t| t as u32 - 2).collect();
            let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            attention_decode_batch(heads, &q, &q_pos, &hk, &mut a);
            attention_decode_batch(heads, &q, &q_pos, &fk, &mut b);
            assert!(a == b, "{n} rows: f16 vs f32 keys");
        }
    }

    /// A decode batch's row gets what it gets alone — its KV group's heads in one task in the
    /// batch, a task a head alone, and the single-row `attention` — and what plain attention
    /// computes; key counts around a block of sixteen, sorted and scattered positions.
    #[test]
    fn a_decode_row_gets_the_same_result_alone_or_in_a_batch() {
        let heads = Heads { q_heads: 9, kv_heads: 3, head_dim: 64 };
        let stride = 3 * 64;
        let lens = [1usize, 15, 16, 17, 40, 63, 64, 200];
        let caches: Vec<(Vec<f32>, Vec<f32>, Vec<u32>)> = lens
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let mut pos: Vec<u32> = (0..t as u32).collect();
                if i % 2 == 1 {
                    pos.reverse();
                }
                (pseudo(t * stride, 10 + i as u32), pseudo(t * stride, 20 + i as u32), pos)
            })
            .collect();
        let keys: Vec<Keys<'_>> =
            caches.iter().map(|(k, v, p)| Keys { k, v, positions: p, sorted: p.len() < 2 || p[0] < p[1] }).collect();
        let n = lens.len();
        let q = pseudo(n * 9 * 64, 5);
        // Each row's query sits a few positions before its last key: the last keys are masked.
        let q_pos: Vec<u32> = lens.iter().map(|&t| (t as u32).saturating_sub(3)).collect();
        let mut batch = vec![0.0; q.len()];
        attention_decode_batch(heads, &q, &q_pos, &keys, &mut batch);
        for i in 0..n {
            let row = &q[i * 576..][..576];
            let mut alone = vec![0.0; 576];
            attention_decode_batch(heads, row, &q_pos[i..=i], &keys[i..=i], &mut alone);
            assert!(alone[..] == batch[i * 576..][..576], "row {i}: alone vs batch");
            let mut single = vec![0.0; 576];
            attention(heads, row, &q_pos[i..=i], &keys[i], &mut single, true);
            assert!(single == alone, "row {i}: single-row attention vs batch of one");
            let (k, v, p) = &caches[i];
            let want = naive(heads, row, &q_pos[i..=i], k, v, p);
            for (a, b) in alone.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "row {i}: {a} vs {b}");
            }
        }
    }
}

#[cfg(test)]
mod gemm_rows_tests {
    use super::*;

    /// The property batch invariance rests on: a row's product does not depend on how many
    /// rows share the gemm call — except a lone row, which gemm multiplies on a matrix-vector
    /// path (the linear layers never hand it one: see `Linear::forward`). Checked on the
    /// default model's linear shapes (in × out: QKV, output, gate+up, down).
    #[test]
    fn a_rows_product_does_not_depend_on_the_row_count_but_for_one_row() {
        let rows = 40;
        for (k, n) in [(576usize, 960usize), (576, 576), (576, 3072), (1536, 576)] {
            let lhs: Vec<f32> = (0..rows * k).map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0).collect();
            let rhs: Vec<f32> = (0..n * k).map(|i| (i * 104729 % 997) as f32 / 498.0 - 1.0).collect();
            let run = |m: usize| {
                let mut out = vec![0f32; m * n];
                // SAFETY: lhs is m × k (m ≤ rows), rhs is n × k read as its transpose, out is m × n.
                unsafe { gemm_rows((m, n, k), out.as_mut_ptr(), n, lhs.as_ptr(), k, rhs.as_ptr(), (1, k), 1.0, 2) };
                out
            };
            let full = run(rows);
            for m in 2..rows {
                assert!(run(m)[..] == full[..m * n], "{k} × {n}: {m} rows");
            }
        }
    }
}
