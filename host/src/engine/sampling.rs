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

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The log-probability of `id` and the `top` most likely tokens, from one row of logits.
/// Three passes over the row, each written in [`LANES`]-wide strips the compiler turns into
/// vector code: the maximum of every strip of [`TOP_STRIP`] logits, the sum of `exp(l - max)`
/// (with [`exp_nonpositive`], not a libm call per logit), and the top tokens, skipping every
/// strip whose maximum would not enter them.
pub fn logprobs(logits: &[f32], id: u32, top: usize) -> (TokenLogprob, Vec<TokenLogprob>) {
    let strip_max: Vec<f32> = logits.chunks(TOP_STRIP).map(lane_max).collect();
    let max = strip_max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; LANES];
    let strips = logits.chunks_exact(LANES);
    let tail: f32 = strips.remainder().iter().map(|&l| exp_nonpositive(l - max)).sum();
    for strip in strips {
        for (s, &l) in sums.iter_mut().zip(strip) {
            *s += exp_nonpositive(l - max);
        }
    }
    let lse = max + (sums.iter().sum::<f32>() + tail).ln();
    let chosen = TokenLogprob { id, logprob: logits[id as usize] - lse };
    let mut best: Vec<TokenLogprob> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (s, (strip, &m)) in logits.chunks(TOP_STRIP).zip(&strip_max).enumerate() {
            if best.len() == top && m <= best[top - 1].logprob {
                continue;
            }
            for (i, &l) in strip.iter().enumerate() {
                if best.len() < top || l > best[best.len() - 1].logprob {
                    let pos = best.partition_point(|b| b.logprob >= l);
                    best.insert(pos, TokenLogprob { id: (s * TOP_STRIP + i) as u32, logprob: l });
                    best.truncate(top);
                }
            }
        }
    }
    best.iter_mut().for_each(|b| b.logprob -= lse);
    (chosen, best)
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
}
