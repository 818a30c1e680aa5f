//! Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.
//!
//! Also computes the log-probabilities the API reports. They are those of the model's own
//! distribution (log-softmax of the raw logits, before temperature), as vLLM reports them,
//! so that quality comparisons see the model and not the sampler.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, seed: None, presence_penalty: 0.0, frequency_penalty: 0.0 }
    }
}

/// A token and its log-probability under the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
}

/// Draws tokens for one request.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token was generated, for the penalties.
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng, counts: Default::default() }
    }

    /// Picks a token from one row of logits and remembers it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let id = if self.counts.is_empty()
            || (self.params.presence_penalty == 0.0 && self.params.frequency_penalty == 0.0)
        {
            self.pick(logits)
        } else {
            let mut penalised = logits.to_vec();
            for (&t, &c) in &self.counts {
                if let Some(l) = penalised.get_mut(t as usize) {
                    *l -= self.params.presence_penalty + self.params.frequency_penalty * c as f32;
                }
            }
            self.pick(&penalised)
        };
        *self.counts.entry(id).or_default() += 1;
        id
    }

    /// A token drawn from `softmax(logits / temperature)`, cut to the `top_k` most likely and
    /// then to the smallest most-likely set holding `top_p` of the mass. Only the candidates
    /// a cut needs are ordered (a vocabulary sort costs a millisecond a token): none without
    /// cuts, the `top_k`, or for `top_p` alone the most likely 256 and then as many more as
    /// the missing mass needs at least, until they hold it.
    fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 || logits.is_empty() {
            return argmax(logits);
        }
        let (inv_t, max) = (1.0 / p.temperature, lane_max(logits));
        // Each token's weight relative to the most likely one's, in vocabulary order.
        let mut cand: Vec<(f32, u32)> =
            logits.iter().enumerate().map(|(i, &l)| (exp_nonpositive((l - max) * inv_t), i as u32)).collect();
        if p.top_k == 0 && p.top_p >= 1.0 {
            let total: f32 = cand.iter().map(|c| c.0).sum();
            return draw(&mut self.rng, cand.iter().map(|&(w, i)| (i, w)), total);
        }
        let n = cand.len();
        let k = if p.top_k > 0 { p.top_k.min(n) } else { n };
        // The first m in order: heaviest first, ties to the lower id.
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let first = |cand: &mut Vec<(f32, u32)>, m: usize| {
            if m < cand.len() {
                cand.select_nth_unstable_by(m - 1, order);
            }
            cand[..m].sort_unstable_by(order);
        };
        // The mass the nucleus is a share of: the top k's (all of it without top_k).
        let total: f32 = match k < n {
            true => {
                first(&mut cand, k);
                cand.truncate(k);
                cand.iter().map(|c| c.0).sum()
            }
            false => cand.iter().map(|c| c.0).sum(),
        };
        let keep = match p.top_p < 1.0 {
            false => k,
            true => {
                let goal = p.top_p * total;
                let mut m = k.min(NUCLEUS_FIRST);
                loop {
                    if k == n {
                        first(&mut cand, m);
                    }
                    let mut acc = 0.0;
                    let cut = cand[..m].iter().position(|c| {
                        acc += c.0;
                        acc >= goal
                    });
                    match cut {
                        Some(i) => break i + 1,
                        None if m == k => break k,
                        // Every further candidate weighs at most the m-th: at least this many more.
                        None => {
                            m = (m + ((goal - acc) / cand[m - 1].0.max(f32::MIN_POSITIVE)) as usize).max(8 * m).min(k)
                        }
                    }
                }
            }
        };
        let kept = &cand[..keep];
        let total: f32 = kept.iter().map(|c| c.0).sum();
        draw(&mut self.rng, kept.iter().map(|&(w, i)| (i, w)), total)
    }
}

/// One of `items` (token, weight) drawn in proportion to its weight, `total` their sum; the
/// last with any weight where rounding leaves the draw past the end.
fn draw(rng: &mut StdRng, items: impl Iterator<Item = (u32, f32)>, total: f32) -> u32 {
    let mut r = rng.random::<f32>() * total;
    let mut last = 0;
    for (i, w) in items {
        if w > 0.0 {
            last = i;
            r -= w;
            if r <= 0.0 {
                return i;
            }
        }
    }
    last
}

/// Candidates the nucleus is first looked for among (then at least eight times as many, and
/// so on).
const NUCLEUS_FIRST: usize = 256;

/// Index of the largest logit (the first one on ties; NaNs never win): the maximum by lanes,
/// then where it first occurs.
pub fn argmax(logits: &[f32]) -> u32 {
    first_equal(logits, lane_max(logits)).unwrap_or(0) as u32
}

/// The logprob of token `id` and the `top` most likely tokens (sorted, most likely first; ties
/// to the lower id) under `logits`, without sorting the vocabulary.
///
/// The row is taken a [`SEGMENT`] of logits at a time ([`score_segment`]: its largest logit,
/// the sum of exp over it relative to that, its top tokens), and the segments combined in
/// order ([`combine`]). Echo's fused LM head ([`super::amx::Bf16Matrix::matmul_by_segments`])
/// scores the same segments as they come out of the product, in any order and on any
/// thread, and combines them the same way: the same logits give the same logprobs bit for
/// bit either way.
pub fn logprobs(logits: &[f32], id: u32, top: usize) -> (TokenLogprob, Vec<TokenLogprob>) {
    let segments = logits.len().div_ceil(SEGMENT);
    let mut parts = Vec::with_capacity(segments);
    let mut tops = vec![TokenLogprob { id: 0, logprob: 0.0 }; segments * top];
    for (s, seg) in logits.chunks(SEGMENT).enumerate() {
        parts.push(score_segment(seg, s * SEGMENT, &mut tops[s * top..(s + 1) * top]));
    }
    combine(&parts, &tops, logits[id as usize], id, top)
}

/// Logits per segment of a row: a multiple of the AMX product's 32 outputs; 512 of them
/// (2 KiB) stay in L1 over the segment's three passes.
pub const SEGMENT: usize = 512;

/// What one segment of a row's logits contributes to its logprobs.
#[derive(Debug, Clone, Copy, Default)]
pub struct SegmentScore {
    /// The segment's largest logit.
    max: f32,
    /// Σ exp(l − max) over the segment.
    sum: f32,
    /// How many of its top tokens were kept (≤ `top`).
    kept: u32,
}

/// The segment `logits` of a row (its logits from id `first` on): its largest logit, its sum
/// of exps, and its `top.len()` most likely tokens (raw logits) in `top`, sorted. Three passes:
/// the maximum of every strip of [`TOP_STRIP`] logits, the sum of `exp(l − max)` (with
/// [`exp_nonpositive`]'s polynomial, not a libm call per logit), and the top tokens: the strip
/// of the maximum first, then every other strip whose maximum would enter them. The first two
/// run in AVX-512 registers where the CPU has them (a segment of 512: 450 → 170 ns, one
/// thread), else in [`LANES`]-wide strips the compiler vectorizes; one form per process.
pub fn score_segment(logits: &[f32], first: usize, top: &mut [TokenLogprob]) -> SegmentScore {
    const STRIPS: usize = SEGMENT / TOP_STRIP;
    let strips = logits.len().div_ceil(TOP_STRIP).min(STRIPS);
    let mut strip_max = [f32::NEG_INFINITY; STRIPS];
    #[cfg(target_arch = "x86_64")]
    let wide = *super::HAS_AVX512;
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    for (m, strip) in strip_max.iter_mut().zip(logits.chunks(TOP_STRIP)) {
        *m = match (wide, strip.len()) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512F (checked above); the strip is TOP_STRIP long.
            (true, TOP_STRIP) => unsafe { strip_max_avx512(strip) },
            _ => lane_max(strip),
        };
    }
    let max = strip_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = match wide {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F (checked above).
        true => unsafe { exp_sum_avx512(logits, max) },
        _ => exp_sum(logits, max),
    };
    // The strip holding the maximum first, then the others in order, each skipped once `top`
    // is full and its maximum is below the last entry.
    let best = strip_max.iter().position(|&m| m == max).unwrap_or(0);
    let best_strip = &logits[(best * TOP_STRIP).min(logits.len())..((best + 1) * TOP_STRIP).min(logits.len())];
    if let (1, Some(i)) = (top.len(), first_equal(best_strip, max)) {
        // One top token: the first of the largest, found without a scan of insertions.
        top[0] = TokenLogprob { id: (first + best * TOP_STRIP + i) as u32, logprob: max };
        return SegmentScore { max, sum, kept: 1 };
    }
    // The top tokens are all at least the top.len()-th largest maximum of the strips (that
    // many strips hold a value that large): only the logits from it up are candidates, found
    // 16 comparisons at a time in the strips that reach it. For more top tokens than strips,
    // the same with the maxima of every 16 logits.
    let mut chunk_max = [f32::NEG_INFINITY; SEGMENT / LANES];
    let (maxima, width) = match top.len() <= strips {
        true => (&strip_max[..strips], TOP_STRIP),
        false => {
            let chunks = logits.len().div_ceil(LANES).min(SEGMENT / LANES);
            for (m, chunk) in chunk_max.iter_mut().zip(logits.chunks(LANES)) {
                *m = lane_max(chunk);
            }
            (&chunk_max[..chunks], LANES)
        }
    };
    if (2..=maxima.len()).contains(&top.len()) {
        let mut sorted = [f32::NEG_INFINITY; SEGMENT / LANES];
        let sorted = &mut sorted[..maxima.len()];
        sorted.copy_from_slice(maxima);
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let floor = sorted[top.len() - 1];
        if floor.is_finite() {
            return SegmentScore { max, sum, kept: top_from(logits, first, maxima, width, floor, top) };
        }
    }
    SegmentScore { max, sum, kept: top_by_strips(logits, first, &strip_max[..strips], best, top) }
}

/// The `top.len()` most likely of `logits` (ids from `first`) into `top`, sorted, their count
/// returned: the strip `best` (holding the maximum) scanned first, then every other strip
/// whose maximum (`strip_max`) would enter them. What [`top_from`] gives, for any input.
fn top_by_strips(logits: &[f32], first: usize, strip_max: &[f32], best: usize, top: &mut [TokenLogprob]) -> u32 {
    let mut kept = 0;
    for s in std::iter::once(best).chain((0..strip_max.len()).filter(|&s| s != best)) {
        if kept == top.len() && (kept == 0 || strip_max[s] < top[kept - 1].logprob) {
            continue;
        }
        let strip = &logits[s * TOP_STRIP..((s + 1) * TOP_STRIP).min(logits.len())];
        for (i, &l) in strip.iter().enumerate() {
            if kept < top.len() || l >= top[kept - 1].logprob {
                insert(top, &mut kept, TokenLogprob { id: (first + s * TOP_STRIP + i) as u32, logprob: l });
            }
        }
    }
    kept as u32
}

/// The `top.len()` most likely of `logits` (ids from `first`) into `top`, sorted, their count
/// returned: every logit at least `floor` inserted (for NaN-free logits, what
/// [`top_by_strips`] gives), of the groups of `width` logits whose
/// maximum (`maxima`) reaches it (`floor` at most the top's last value, so none is missed).
fn top_from(logits: &[f32], first: usize, maxima: &[f32], width: usize, floor: f32, top: &mut [TokenLogprob]) -> u32 {
    let mut kept = 0;
    for (s, _) in maxima.iter().enumerate().filter(|&(_, &m)| m >= floor) {
        let strip = &logits[s * width..((s + 1) * width).min(logits.len())];
        let mut consider = |i: usize| {
            if kept < top.len() || strip[i] >= top[kept - 1].logprob {
                insert(top, &mut kept, TokenLogprob { id: (first + s * width + i) as u32, logprob: strip[i] });
            }
        };
        let lanes = strip.chunks_exact(LANES);
        let tail = strip.len() - lanes.remainder().len();
        for (i, _) in lanes.remainder().iter().enumerate().filter(|&(_, &v)| v >= floor) {
            consider(tail + i);
        }
        for (c, lane) in lanes.enumerate() {
            let mut hits = 0u32;
            for (i, &v) in lane.iter().enumerate() {
                hits |= ((v >= floor) as u32) << i;
            }
            while hits != 0 {
                consider(c * LANES + hits.trailing_zeros() as usize);
                hits &= hits - 1;
            }
        }
    }
    kept as u32
}

/// Σ exp(l − max) over `logits` (`max` their largest), in [`LANES`] sums of every
/// [`LANES`]-th logit, then the lanes summed and the remainder added.
fn exp_sum(logits: &[f32], max: f32) -> f32 {
    let mut sums = [0f32; LANES];
    let lanes = logits.chunks_exact(LANES);
    let tail: f32 = lanes.remainder().iter().map(|&l| exp_nonpositive(l - max)).sum();
    for strip in lanes {
        for (s, &l) in sums.iter_mut().zip(strip) {
            *s += exp_nonpositive(l - max);
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// [`lane_max`] of one strip of [`TOP_STRIP`] logits in four AVX-512 registers (the same
/// value: a maximum does not depend on the order it is taken in, and NaNs are skipped alike).
///
/// # Safety
/// The CPU has AVX-512F; `strip` is [`TOP_STRIP`] long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn strip_max_avx512(strip: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert_eq!(strip.len(), TOP_STRIP);
    // SAFETY: four 16-wide loads inside the strip (the caller's contract).
    unsafe {
        let p = strip.as_ptr();
        let m = |i: usize| _mm512_loadu_ps(p.add(i * LANES));
        // max_ps(x, m) gives m where x is NaN, as lane_max keeps its maximum.
        let a = _mm512_max_ps(m(1), _mm512_max_ps(m(0), _mm512_set1_ps(f32::NEG_INFINITY)));
        let b = _mm512_max_ps(m(3), _mm512_max_ps(m(2), _mm512_set1_ps(f32::NEG_INFINITY)));
        _mm512_reduce_max_ps(_mm512_max_ps(a, b))
    }
}

/// [`exp_sum`] sixteen logits per AVX-512 register, in two accumulators, with the
/// polynomial of [`exp_nonpositive`] in fused multiply-adds (so its last bits may differ from
/// the portable form's; one form runs per process, for every logprob).
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sum_avx512(logits: &[f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn exp(d: __m512) -> __m512 {
        // SAFETY: register arithmetic only; the caller has AVX-512F.
        unsafe {
            let c = _mm512_min_ps(_mm512_max_ps(d, _mm512_set1_ps(-87.0)), _mm512_setzero_ps());
            let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
                c,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
                _mm512_set1_ps(0.5),
            ));
            let y = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_359_4), c);
            let y = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.121_944_4e-4), y);
            let mut p = _mm512_set1_ps(1.0 / 5040.0);
            for coefficient in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
                p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(coefficient));
            }
            let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)));
            let e = _mm512_mul_ps(_mm512_castsi512_ps(scale), p);
            // Below −87 (never a NaN) the value is 0, as in exp_nonpositive.
            let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(d, _mm512_set1_ps(-87.0));
            _mm512_mask_blend_ps(under, e, _mm512_setzero_ps())
        }
    }
    // SAFETY: every load is 16 values inside `logits`; the rest is register arithmetic.
    unsafe {
        let m = _mm512_set1_ps(max);
        let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let pairs = logits.chunks_exact(2 * LANES);
        let rest = pairs.remainder();
        for pair in pairs {
            let p = pair.as_ptr();
            a = _mm512_add_ps(a, exp(_mm512_sub_ps(_mm512_loadu_ps(p), m)));
            b = _mm512_add_ps(b, exp(_mm512_sub_ps(_mm512_loadu_ps(p.add(LANES)), m)));
        }
        let tail: f32 = rest.iter().map(|&l| exp_nonpositive(l - max)).sum();
        _mm512_reduce_add_ps(_mm512_add_ps(a, b)) + tail
    }
}

/// The index of the first of `xs` equal to `x`, a [`LANES`]-wide comparison at a time.
fn first_equal(xs: &[f32], x: f32) -> Option<usize> {
    let lanes = xs.chunks_exact(LANES);
    let rest = lanes.remainder();
    for (c, strip) in lanes.enumerate() {
        let mut hits = 0u32;
        for (i, &v) in strip.iter().enumerate() {
            hits |= ((v == x) as u32) << i;
        }
        if hits != 0 {
            return Some(c * LANES + hits.trailing_zeros() as usize);
        }
    }
    rest.iter().position(|&v| v == x).map(|i| xs.len() - rest.len() + i)
}

/// Puts `t` into the sorted `best[..*kept]` (most likely first, a tie to the lower id), dropping
/// the last when `best` is full: the same entries whatever order they come in.
fn insert(best: &mut [TokenLogprob], kept: &mut usize, t: TokenLogprob) {
    let pos = best[..*kept].partition_point(|b| b.logprob > t.logprob || (b.logprob == t.logprob && b.id < t.id));
    if pos == best.len() {
        return;
    }
    *kept = (*kept + 1).min(best.len());
    best.copy_within(pos..*kept - 1, pos + 1);
    best[pos] = t;
}

/// A row's logprobs from its segments' scores, in order (`tops`: `top` entries per segment),
/// and the logit of the token scored.
pub fn combine(
    parts: &[SegmentScore],
    tops: &[TokenLogprob],
    chosen: f32,
    id: u32,
    top: usize,
) -> (TokenLogprob, Vec<TokenLogprob>) {
    let max = parts.iter().map(|p| p.max).fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = parts.iter().map(|p| p.sum * exp_nonpositive(p.max - max)).sum();
    let lse = max + sum.ln();
    let mut best = vec![TokenLogprob { id: 0, logprob: 0.0 }; top];
    let mut kept = 0;
    for (s, p) in parts.iter().enumerate() {
        for &t in &tops[s * top..][..p.kept as usize] {
            insert(&mut best, &mut kept, t);
        }
    }
    best.truncate(kept);
    best.iter_mut().for_each(|b| b.logprob -= lse);
    (TokenLogprob { id, logprob: chosen - lse }, best)
}

/// Width of the strips [`logprobs`] works in: one AVX-512 register of f32.
const LANES: usize = 16;
/// Logits per strip whose maximum the first pass keeps, for the top tokens' pass to skip by.
const TOP_STRIP: usize = 4 * LANES;

/// The largest value of `xs` (−∞ if empty), by lanes.
fn lane_max(xs: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let strips = xs.chunks_exact(LANES);
    let tail = strips.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for strip in strips {
        for (m, &x) in m.iter_mut().zip(strip) {
            *m = if x > *m { x } else { *m };
        }
    }
    m.iter().copied().fold(tail, f32::max)
}

/// `exp(x)` for `x ≤ 0` in branch-free arithmetic that vectorizes: `2^k · e^y` with
/// `k = round(x·log2 e)` put into the exponent bits, `y = x − k·ln 2` (ln 2 split in two so that
/// `k·ln 2` is exact: `|y| ≤ ½ ln 2` to f32 precision) and `e^y` from its Taylor series to
/// degree 7 (relative error below 3e-7). Below −87 it returns 0, where `exp` is under f32's
/// smallest normal number anyway.
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 355/512: k·LN2_HI is exact for |k| < 2^15
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Clamped to [−87, 0] (a NaN to −87), k is a whole number in [−126, 0].
    let c = x.max(-87.0).min(0.0);
    let k = (c * std::f32::consts::LOG2_E + 0.5).floor();
    let y = (c - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + y * (1.0
            + y * (1.0 / 2.0
                + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0 + y * (1.0 / 5040.0)))))));
    // `as i32` saturates, which the vectorizer turns into a scalar conversion per lane; k is
    // in range, where the plain conversion gives the same.
    // SAFETY: k is finite and in [−126, 0] (above), inside i32.
    let k = unsafe { k.to_int_unchecked::<i32>() };
    let scale = f32::from_bits(((k + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { scale * p }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, ..Default::default() });
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_p_cuts_the_tail() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = SamplingParams { temperature: 1.0, top_p: 0.9, seed: Some(7), ..Default::default() };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        let mut s = Sampler::new(SamplingParams { top_p: 0.01, ..p });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), argmax(&logits));
        }
    }

    /// Draws follow the softmax at the temperature, cut to the top k and to the nucleus:
    /// frequencies over 40 000 seeded draws against the probabilities computed directly.
    #[test]
    fn draws_follow_the_cut_softmax() {
        let logits: Vec<f32> =
            (0..300).map(|i| ((i * 37 % 101) as f32 * 0.061).sin() * 4.0 - (i % 7) as f32 * 0.3).collect();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        for (t, top_k, top_p) in
            [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (0.8, 0, 0.5), (1.2, 40, 0.8), (1.5, 0, 0.97)]
        {
            // The expected distribution: the top k in order, then the nucleus, renormalised.
            let k = if top_k > 0 { top_k } else { logits.len() };
            let w: Vec<f64> = order[..k].iter().map(|&i| ((logits[i] - logits[order[0]]) as f64 / t).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut acc = 0.0;
            let keep = w.iter().position(|x| {
                acc += x / total;
                acc >= top_p as f64
            });
            let keep = if top_p < 1.0 { keep.map_or(k, |i| i + 1) } else { k };
            let kept: f64 = w[..keep].iter().sum();
            let mut want = vec![0f64; logits.len()];
            for (j, &i) in order[..keep].iter().enumerate() {
                want[i] = w[j] / kept;
            }
            let params = SamplingParams { temperature: t as f32, top_k, top_p, seed: Some(11), ..Default::default() };
            let mut s = Sampler::new(params);
            let draws = 40_000;
            let mut got = vec![0f64; logits.len()];
            for _ in 0..draws {
                got[s.sample(&logits) as usize] += 1.0 / draws as f64;
            }
            for i in 0..logits.len() {
                assert!(
                    (got[i] - want[i]).abs() < 0.01,
                    "t {t}, top_k {top_k}, top_p {top_p}: token {i} drawn {} vs {}",
                    got[i],
                    want[i]
                );
                assert!(
                    want[i] > 0.0 || got[i] == 0.0,
                    "t {t}, top_k {top_k}, top_p {top_p}: token {i} is cut yet drawn"
                );
            }
        }
    }

    /// The greedy pick is the first index of the largest logit, as a plain scan finds it.
    #[test]
    fn argmax_is_the_first_largest() {
        let scan = |xs: &[f32]| (0..xs.len()).fold(0, |b, i| if xs[i] > xs[b] { i } else { b }) as u32;
        for len in [1, 15, 16, 17, 1000, 49152] {
            for seed in 0..4 {
                let mut xs: Vec<f32> =
                    (0..len).map(|i| (((i * 7919 + seed * 104729) % 1009) as f32 * 0.01).floor()).collect();
                assert_eq!(argmax(&xs), scan(&xs), "len {len}, seed {seed}");
                xs[len / 2] = f32::NAN;
                assert_eq!(argmax(&xs), scan(&xs), "len {len}, seed {seed}, a NaN inside");
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn frequency_penalty_moves_greedy_off_a_repeated_token() {
        let logits = [1.0f32, 1.5, 0.0];
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, frequency_penalty: 1.0, ..Default::default() });
        assert_eq!(s.sample(&logits), 1);
        assert_eq!(s.sample(&logits), 0);
    }

    #[test]
    fn logprobs_are_normalised_and_sorted() {
        let logits = [1.0f32, 2.0, 3.0, 0.5];
        let (chosen, top) = logprobs(&logits, 2, 3);
        assert_eq!(top.iter().map(|t| t.id).collect::<Vec<_>>(), vec![2, 1, 0]);
        assert_eq!(chosen, top[0]);
        let total: f32 = logits.iter().enumerate().map(|(i, _)| logprobs(&logits, i as u32, 0).0.logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn logprobs_of_a_vocabulary_row_match_the_plain_computation() {
        // 1000 logits (not a multiple of the strip width) with ties and a far outlier.
        let logits: Vec<f32> =
            (0..1000).map(|i| ((i * 7919) % 997) as f32 * 0.013 - 6.0 + if i == 3 { 30.0 } else { 0.0 }).collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let (chosen, top) = logprobs(&logits, 500, 20);
        assert!((chosen.logprob - (logits[500] - lse)).abs() < 1e-5, "{} vs {}", chosen.logprob, logits[500] - lse);
        let want: Vec<f32> = order[..20].iter().map(|&i| logits[i] - lse).collect();
        let got: Vec<f32> = top.iter().map(|t| t.logprob).collect();
        assert_eq!(got.len(), 20);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        assert_eq!(top[0].id, 3);
        // Every top list is the sort's first ids, ties to the lower id.
        for k in [1, 2, 5, 20, 40] {
            let ids: Vec<u32> = logprobs(&logits, 500, k).1.iter().map(|t| t.id).collect();
            let want: Vec<u32> = order[..k].iter().map(|&i| i as u32).collect();
            assert_eq!(ids, want, "top {k}");
        }
    }

    /// Segments scored in any order (as the fused LM head's threads take them) and combined in
    /// order give a row's logprobs; the top tokens cross segments, a tie (inside a strip,
    /// between two segments) going to the lower id, with one top token or several.
    #[test]
    fn segments_scored_in_any_order_combine_to_the_rows_logprobs() {
        let mut logits: Vec<f32> = (0..2000).map(|i| ((i * 7919) % 997) as f32 * 0.011 - 5.0).collect();
        (logits[1700], logits[1710], logits[100], logits[600]) = (9.0, 9.0, 8.0, 8.0);
        for top in [0, 1, 3, 20] {
            let segments = logits.len().div_ceil(SEGMENT);
            let mut parts = vec![SegmentScore::default(); segments];
            let mut tops = vec![TokenLogprob { id: 0, logprob: 0.0 }; segments * top];
            for s in (0..segments).rev() {
                let seg = &logits[s * SEGMENT..((s + 1) * SEGMENT).min(logits.len())];
                parts[s] = score_segment(seg, s * SEGMENT, &mut tops[s * top..(s + 1) * top]);
            }
            let want = logprobs(&logits, 42, top);
            assert_eq!(combine(&parts, &tops, logits[42], 42, top), want, "top {top}");
            let ids: Vec<u32> = want.1.iter().take(4).map(|t| t.id).collect();
            assert_eq!(ids, [1700, 1710, 100, 600][..top.min(4)], "top {top}");
            assert_eq!(want.1.len(), top);
        }
    }

    #[test]
    fn the_vector_exp_is_within_3e7_of_libm() {
        for i in 0..=20_000 {
            let x = -90.0 * i as f32 / 20_000.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            let tolerance = if x < -87.0 { want } else { 3e-7 * want };
            assert!((got - want).abs() <= tolerance, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    /// Top tokens found from a floor (the k-th largest maximum of the strips, or of every 16
    /// logits) are those of the scan of strips: the same ids and values in the same order, ties
    /// to the lower id, for 2..20 tokens, whole and short segments, rows of ties.
    #[test]
    fn top_tokens_from_a_floor_are_the_scans() {
        let mut segments: Vec<Vec<f32>> = (0..40)
            .map(|seed| (0..SEGMENT).map(|i| ((((i * 7919 + seed * 104_729) % 211) as f32) / 10.0).floor()).collect())
            .collect();
        segments.push(vec![1.0; SEGMENT]);
        segments.push((0..SEGMENT - 37).map(|i| (i as f32 * 0.37).sin()).collect());
        segments.push((0..100).map(|i| (i % 7) as f32).collect());
        for (n, seg) in segments.iter().enumerate() {
            let strip_max: Vec<f32> = seg.chunks(TOP_STRIP).map(lane_max).collect();
            let max = strip_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let best = strip_max.iter().position(|&m| m == max).unwrap();
            for k in 2..=20 {
                let mut want = vec![TokenLogprob { id: 0, logprob: 0.0 }; k];
                let kept = top_by_strips(seg, 512, &strip_max, best, &mut want) as usize;
                let mut got = vec![TokenLogprob { id: 0, logprob: 0.0 }; k];
                let score = score_segment(seg, 512, &mut got);
                assert_eq!(score.kept as usize, kept, "segment {n}, top {k}");
                let pairs =
                    |t: &[TokenLogprob]| t[..kept].iter().map(|t| (t.id, t.logprob.to_bits())).collect::<Vec<_>>();
                assert_eq!(pairs(&got), pairs(&want), "segment {n}, top {k}");
            }
        }
    }

    /// The AVX-512 passes give the portable ones' strip maxima exactly (NaNs skipped, a strip
    /// of −∞ and NaN at −∞) and their sums of exps within 2⁻²⁰, and each sum is within 1e-6 of
    /// f64's: segments of spread logits, of ties, of values far below the maximum, and with
    /// a tail not a multiple of the registers' width.
    #[test]
    fn the_avx512_passes_agree_with_the_portable_ones() {
        #[cfg(target_arch = "x86_64")]
        if *super::super::HAS_AVX512 {
            let mut segments: Vec<Vec<f32>> = (0..50)
                .map(|seed| {
                    (0..SEGMENT).map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 100.0) - 10.0).collect()
                })
                .collect();
            segments.push(vec![3.5; SEGMENT]);
            segments.push((0..SEGMENT).map(|i| if i == 300 { 0.0 } else { -200.0 + i as f32 * 0.1 }).collect());
            segments.push((0..SEGMENT - 7).map(|i| (i as f32 * 0.37).sin() * 12.0).collect());
            let mut odd: Vec<f32> = (0..SEGMENT).map(|i| -(i as f32)).collect();
            odd[5] = f32::NAN;
            odd[64..128].fill(f32::NEG_INFINITY);
            odd[130] = f32::NAN;
            odd[131..192].fill(f32::NEG_INFINITY);
            odd[128] = f32::NEG_INFINITY;
            odd[129] = f32::NEG_INFINITY;
            segments.push(odd);
            for (n, seg) in segments.iter().enumerate() {
                for strip in seg.chunks_exact(TOP_STRIP) {
                    // SAFETY: AVX-512F checked above; the strip is TOP_STRIP long.
                    let (got, want) = (unsafe { strip_max_avx512(strip) }, lane_max(strip));
                    assert_eq!(got.to_bits(), want.to_bits(), "segment {n}: strip max {got} vs {want}");
                }
                let max = seg.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let finite: Vec<f32> = seg.iter().copied().filter(|v| !v.is_nan()).collect();
                if finite.len() < seg.len() {
                    continue;
                }
                // SAFETY: AVX-512F checked above.
                let got = unsafe { exp_sum_avx512(seg, max) } as f64;
                let portable = exp_sum(seg, max) as f64;
                let exact: f64 = seg.iter().map(|&l| ((l - max) as f64).exp()).sum();
                assert!((got - portable).abs() <= portable * 2f64.powi(-20), "segment {n}: {got} vs {portable}");
                assert!((got - exact).abs() <= exact * 1e-6, "segment {n}: {got} vs f64 {exact}");
            }
        }
    }
}
