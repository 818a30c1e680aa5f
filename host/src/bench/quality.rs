//! How a configuration's answers compare with full recompute's on the same prompts.
//!
//! - First-token agreement and identical first-N tokens (greedy, free-running): reported, but
//!   chaotic on a small model — one near-tie sends two correct runs down different texts.
//! - Free-running KL: the mean KL of the next-token distribution over the steps where both
//!   runs still agree.
//! - Teacher-forced KL and Δ log-likelihood: `off`'s answer scored token by token under each
//!   configuration (`echo`), so every step conditions on the same text; KL(off ‖ mode) from
//!   the top-20 with the rest of the mass as one bucket, and the mean change in the answer
//!   tokens' logprobs.
//! - Planted-fact accuracy: the share of fact questions whose answer contains the fact.

use serde::Serialize;

use super::client::{Forced, Sample, Timings};
use super::trace::Fact;

/// Figures of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct ModeFigures {
    pub label: String,
    pub mode: String,
    pub budget: Option<f32>,
    /// The selector plugin that served (compose), when the run swapped selectors.
    pub selector: Option<String>,
    pub ttft_p50_s: f64,
    pub ttft_p95_s: f64,
    pub token_hit_rate: f64,
    pub recompute_ratio: f64,
    pub first_token_agreement: f64,
    /// Where the first token differs from the reference's: the reference's margin there between
    /// its two likeliest first tokens (nats). A flip at a near-tie is rounding, not reuse.
    pub first_token_flip_margins: Vec<f64>,
    pub identical_first_n: f64,
    /// Free-running mean KL (steps where both runs still agree).
    pub mean_kl: f64,
    /// Teacher-forced mean KL(off ‖ this) per answer token.
    pub tf_kl: Option<f64>,
    /// Teacher-forced mean change of the answer tokens' logprobs (this − off), nats per token.
    pub tf_dll: Option<f64>,
    /// Share of fact questions answered with the fact (greedy, free-running).
    pub fact_accuracy: Option<f64>,
    /// Share of fact questions whose right answer is the most likely of four candidates
    /// (log-likelihood, teacher-forced).
    pub fact_choice_accuracy: Option<f64>,
    pub fact_questions: usize,
    /// Mean spans spliced per request.
    pub mean_spans: f64,
    /// Median time to find the stored runs of a prompt, µs.
    pub lookup_us_p50: f64,
    /// Mean of each prefill phase, µs.
    pub mean_timings: Timings,
}

/// KL(p ‖ q) of one step from two top-k lists; the rest of the mass is one bucket.
pub fn step_kl(p: &[(u32, f64)], q: &[(u32, f64)]) -> f64 {
    // A token missing from q's top list has at most q's smallest listed logprob.
    let qf = q.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
    let mut kl = 0.0;
    let (mut pm, mut qm) = (0.0, 0.0);
    for (tok, lp) in p {
        let lq = q.iter().find(|x| x.0 == *tok).map(|x| x.1).unwrap_or(qf);
        let pp = lp.exp();
        kl += pp * (lp - lq);
        pm += pp;
        qm += lq.exp();
    }
    let (pr, qr) = ((1.0 - pm).max(1e-9), (1.0 - qm).max(1e-9));
    (kl + pr * (pr / qr).ln()).max(0.0)
}

pub fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// What one configuration ran: its free-running samples and, when teacher forcing ran, the
/// scored answers; and the reference (`off`) of both.
pub struct Runs<'a> {
    pub samples: &'a [Sample],
    pub forced: Option<&'a [Forced]>,
    pub reference: &'a [Sample],
    pub reference_forced: Option<&'a [Forced]>,
    pub facts: &'a [Option<Fact>],
}

pub fn figures(label: &str, mode: &str, budget: Option<f32>, selector: Option<String>, r: &Runs) -> ModeFigures {
    let runs = r.samples;
    let n = runs.len().max(1) as f64;
    let prompt: usize = runs.iter().map(|s| s.prompt_tokens).sum();
    let reused: usize = runs.iter().map(|s| s.reused_tokens).sum();
    let recomputed: usize = runs.iter().map(|s| s.recomputed_tokens).sum();
    let mut first = 0.0;
    let mut identical = 0.0;
    let mut kls = Vec::new();
    let mut flips = Vec::new();
    for (a, o) in runs.iter().zip(r.reference) {
        first += (a.tokens.first() == o.tokens.first()) as u8 as f64;
        if a.tokens.first() != o.tokens.first() {
            let mut top = o.tops.first().map(|t| t.iter().map(|x| x.1).collect::<Vec<_>>()).unwrap_or_default();
            top.sort_by(|a, b| b.total_cmp(a));
            flips.push(match top[..] {
                [a, b, ..] => a - b,
                _ => f64::NAN,
            });
        }
        identical += (a.tokens == o.tokens) as u8 as f64;
        for (i, (ta, to)) in a.tops.iter().zip(&o.tops).enumerate() {
            kls.push(step_kl(to, ta));
            if a.tokens.get(i) != o.tokens.get(i) {
                break; // past a divergence the two runs condition on different text
            }
        }
    }
    let (tf_kl, tf_dll) = match (r.forced, r.reference_forced) {
        (Some(f), Some(o)) => {
            let pairs = || f.iter().zip(o).flat_map(|(a, b)| a.steps.iter().zip(&b.steps));
            (Some(mean(pairs().map(|(a, b)| step_kl(&b.1, &a.1)))), Some(mean(pairs().map(|(a, b)| a.0 - b.0))))
        }
        _ => (None, None),
    };
    let asked: Vec<(&Sample, &Fact)> = runs.iter().zip(r.facts).filter_map(|(s, f)| Some((s, f.as_ref()?))).collect();
    let right = asked.iter().filter(|(s, f)| s.text.contains(&f.answer)).count();
    let phase = |f: fn(&Timings) -> f64| mean(runs.iter().map(|s| f(&s.timings)));
    ModeFigures {
        label: label.to_string(),
        mode: mode.to_string(),
        budget,
        selector,
        ttft_p50_s: percentile(&runs.iter().map(|s| s.ttft_s).collect::<Vec<_>>(), 0.5),
        ttft_p95_s: percentile(&runs.iter().map(|s| s.ttft_s).collect::<Vec<_>>(), 0.95),
        token_hit_rate: if prompt > 0 { reused as f64 / prompt as f64 } else { 0.0 },
        recompute_ratio: if reused > 0 { recomputed as f64 / reused as f64 } else { 0.0 },
        first_token_agreement: first / n,
        first_token_flip_margins: flips,
        identical_first_n: identical / n,
        mean_kl: mean(kls.into_iter()),
        tf_kl,
        tf_dll,
        fact_accuracy: (!asked.is_empty()).then(|| right as f64 / asked.len() as f64),
        fact_choice_accuracy: r.forced.and_then(|f| {
            let chosen: Vec<bool> = f.iter().filter_map(|x| x.chose_right).collect();
            (!chosen.is_empty()).then(|| chosen.iter().filter(|&&c| c).count() as f64 / chosen.len() as f64)
        }),
        fact_questions: asked.len(),
        mean_spans: runs.iter().map(|s| s.spans as f64).sum::<f64>() / n,
        lookup_us_p50: percentile(&runs.iter().map(|s| s.timings.lookup_us).collect::<Vec<_>>(), 0.5),
        mean_timings: Timings {
            lookup_us: phase(|t| t.lookup_us),
            splice_us: phase(|t| t.splice_us),
            check_us: phase(|t| t.check_us),
            compute_us: phase(|t| t.compute_us),
            store_us: phase(|t| t.store_us),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_tops_and_positive_otherwise() {
        let a = vec![(1, -0.1f64), (2, -2.5)];
        let b = vec![(1, -1.0f64), (2, -0.6)];
        assert!(step_kl(&a, &a) < 1e-9);
        assert!(step_kl(&a, &b) > 0.1);
    }

    #[test]
    fn teacher_forced_figures_compare_the_same_steps() {
        let forced = |lp: f64| Forced { steps: vec![(lp, vec![(7, lp), (8, -3.0)])], chose_right: Some(lp > -0.3) };
        let sample = |t: u32, text: &str| Sample {
            tokens: vec![t],
            tops: vec![vec![(t, -0.1)]],
            text: text.into(),
            ..Default::default()
        };
        let off = [sample(7, "it is 4817")];
        let (a, o) = ([forced(-0.5)], [forced(-0.1)]);
        let facts = [Some(Fact { question: "q".into(), answer: "4817".into(), lead: "l".into(), distractors: vec![] })];
        let r = Runs {
            samples: &[sample(7, "4817!")],
            forced: Some(&a),
            reference: &off,
            reference_forced: Some(&o),
            facts: &facts,
        };
        let f = figures("x", "compose", Some(0.1), None, &r);
        assert!((f.tf_dll.unwrap() + 0.4).abs() < 1e-9);
        assert!(f.tf_kl.unwrap() > 0.0);
        assert_eq!((f.fact_accuracy, f.fact_questions, f.first_token_agreement), (Some(1.0), 1, 1.0));
        assert_eq!(f.fact_choice_accuracy, Some(0.0));
        assert!(f.first_token_flip_margins.is_empty());
    }

    #[test]
    fn a_first_token_flip_reports_the_reference_margin() {
        let sample = |t: u32, tops: Vec<(u32, f64)>| Sample { tokens: vec![t], tops: vec![tops], ..Default::default() };
        let off = [sample(7, vec![(8, -1.2), (7, -0.3)]), sample(5, vec![(5, -0.1), (6, -2.0)])];
        let runs = [sample(8, vec![(8, -0.5), (7, -0.6)]), sample(5, vec![(5, -0.1), (6, -2.0)])];
        let r = Runs { samples: &runs, forced: None, reference: &off, reference_forced: None, facts: &[None, None] };
        let f = figures("x", "compose", Some(0.1), None, &r);
        assert_eq!(f.first_token_agreement, 0.5);
        assert_eq!(f.first_token_flip_margins.len(), 1);
        assert!((f.first_token_flip_margins[0] - 0.9).abs() < 1e-9, "{:?}", f.first_token_flip_margins);
    }
}
