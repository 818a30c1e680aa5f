//! `kvgate bench denoise`: ways of choosing the tokens compose mode recomputes, compared in
//! this process on the real model and a client-shaped trace.
//!
//! For each measured prompt: `off` (a full prefill) and its greedy answer; then compose with
//! every strategy, budget and check layer against the same store contents (a frozen view:
//! nothing a strategy run computes is stored, so every run sees the same reuse). Quality is
//! measured exactly, over the whole vocabulary: the KL(off ‖ compose) of the first token, and
//! teacher-forced, of each token of `off`'s answer. Beside it the floor: the prompt's KV
//! rounded to f16 (what production servers keep). The store is extended after each prompt
//! as a server would extend it.
//!
//! It also says where the stitching error lives: the true deviation of the reused tokens'
//! K/V in the layers after the check layer (against `off`'s), by the token's offset in its
//! span, and how well the check layer's deviation ranks it (Spearman).

use std::cell::RefCell;
use std::path::PathBuf;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use super::trace::{self, Shape, TraceOptions};
use crate::blend::{self, BlendOptions, CacheMode, CutInput, Policy, Prefill, SelectInput};
use crate::engine::{ChatMessage, KvCache, LoadedModel, LogitsFor, sampling};
use crate::store::{ReadOnly, Store, StoreOptions};

/// A way to choose the reused tokens to recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// CacheBlend: the largest K+V deviation at the check layer.
    Deviation,
    /// Evenly spaced over the reused tokens, ignoring deviations.
    Even,
    /// Uniformly at random (seeded).
    Random,
    /// The first `n` tokens of every span, then the largest deviation (EPIC-style).
    Heads(usize),
    /// Every span's first tokens, the budget shared out by span length.
    SpanStarts,
    /// The largest true deviation after the check layer (needs `off`: an upper reference).
    Oracle,
    /// The most attention from the prompt's last tokens at the check layer.
    Attention,
    /// The largest deviation × attention: the error the question would read.
    Impact,
    /// The largest true deviation × attention (needs `off`).
    ImpactOracle,
    /// A share (percent) of the budget to the most attended tokens, the rest to the
    /// largest deviations.
    Mix(u32),
    /// The same, the rest to the largest deviation × attention.
    MixImpact(u32),
    /// The `n` most attended tokens (within the budget), the rest to the largest deviations.
    AttentionFirst(usize),
    /// Whole spans, those with the largest mean check-layer deviation first.
    Spans,
    /// Whole spans, those with the largest mean true deviation first (needs `off`).
    SpansOracle,
    /// Every token whose check-layer deviation exceeds the threshold (in thousandths), the
    /// largest first, up to the budget: an easy prompt recomputes less, a hard one more.
    Adaptive(u32),
    /// The `n` most attended among the tokens that deviate more than the median, then the
    /// largest deviations.
    AttentionDeviating(usize),
    /// The smallest sum of a token's rank by deviation and its rank by attention.
    RankSum,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deviation" => Ok(Strategy::Deviation),
            "even" => Ok(Strategy::Even),
            "random" => Ok(Strategy::Random),
            "starts" => Ok(Strategy::SpanStarts),
            "oracle" => Ok(Strategy::Oracle),
            "spans" => Ok(Strategy::Spans),
            "attention" => Ok(Strategy::Attention),
            "impact" => Ok(Strategy::Impact),
            "impact-oracle" => Ok(Strategy::ImpactOracle),
            "spans-oracle" => Ok(Strategy::SpansOracle),
            "rank-sum" => Ok(Strategy::RankSum),
            _ => {
                let arg = |prefix: &str| s.strip_prefix(prefix).and_then(|n| n.parse().ok());
                if let Some(n) = arg("heads:") {
                    Ok(Strategy::Heads(n))
                } else if let Some(n) = arg("mix:") {
                    Ok(Strategy::Mix(n as u32))
                } else if let Some(n) = arg("mix-impact:") {
                    Ok(Strategy::MixImpact(n as u32))
                } else if let Some(n) = arg("attn-first:") {
                    Ok(Strategy::AttentionFirst(n))
                } else if let Some(n) = arg("attn-dev:") {
                    Ok(Strategy::AttentionDeviating(n))
                } else if let Some(x) = s.strip_prefix("adaptive:").and_then(|x| x.parse::<f64>().ok()) {
                    Ok(Strategy::Adaptive((x * 1000.0).round() as u32))
                } else {
                    Err(format!(
                        "unknown strategy `{s}` (deviation, even, random, heads:N, starts, oracle, attention, \
                         impact, impact-oracle, mix:PCT, mix-impact:PCT, spans, spans-oracle, adaptive:THRESHOLD)"
                    ))
                }
            }
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Strategy::Deviation => write!(f, "deviation"),
            Strategy::Even => write!(f, "even"),
            Strategy::Random => write!(f, "random"),
            Strategy::Heads(n) => write!(f, "heads:{n}"),
            Strategy::SpanStarts => write!(f, "starts"),
            Strategy::Oracle => write!(f, "oracle"),
            Strategy::Spans => write!(f, "spans"),
            Strategy::Attention => write!(f, "attention"),
            Strategy::Mix(p) => write!(f, "mix:{p}"),
            Strategy::MixImpact(p) => write!(f, "mix-impact:{p}"),
            Strategy::AttentionFirst(n) => write!(f, "attn-first:{n}"),
            Strategy::Impact => write!(f, "impact"),
            Strategy::ImpactOracle => write!(f, "impact-oracle"),
            Strategy::SpansOracle => write!(f, "spans-oracle"),
            Strategy::Adaptive(t) => write!(f, "adaptive:{}", *t as f64 / 1000.0),
            Strategy::AttentionDeviating(n) => write!(f, "attn-dev:{n}"),
            Strategy::RankSum => write!(f, "rank-sum"),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DenoiseOptions {
    pub corpus: PathBuf,
    pub shape: Shape,
    pub warmup: usize,
    pub requests: usize,
    pub budgets: Vec<f32>,
    pub strategies: Vec<Strategy>,
    pub check_layers: Vec<usize>,
    /// Recompute tapers (CacheBlend's gradual filtering; 1: none).
    pub tapers: Vec<f32>,
    /// Tokens of `off`'s answer scored teacher-forced.
    pub answer_tokens: usize,
    pub seed: u64,
}

/// One configuration's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub strategy: String,
    pub check_layer: usize,
    pub budget: f32,
    pub taper: f32,
    pub first_token_kl: f64,
    pub first_token_agreement: f64,
    pub tf_kl: f64,
    pub recomputed: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DenoiseReport {
    pub shape: String,
    pub requests: usize,
    pub reused_share: f64,
    pub floor_first_token_kl: f64,
    pub floor_tf_kl: f64,
    /// Mean true deviation by offset in span: (offsets, mean).
    pub deviation_by_offset: Vec<(String, f64)>,
    /// Mean Spearman correlation of the check layer's deviation with the true one, per check layer.
    pub spearman: Vec<(usize, f64)>,
    /// The check layer's deviations of every reused token, pooled: (check layer, p50, p90, p99)
    /// — the scale an adaptive selector's threshold is set on.
    pub deviation_quantiles: Vec<(usize, f64, f64, f64)>,
    pub rows: Vec<Row>,
}

/// A strategy as the compose prefill's policy; remembers what the selector was shown.
struct Chooser {
    strategy: Strategy,
    /// True deviation per prompt position (the oracle's input).
    truth: Vec<f32>,
    seed: u64,
    seen: RefCell<Option<(Vec<f32>, Vec<u32>, Vec<u32>)>>,
}

impl Policy for Chooser {
    fn cut(&self, input: &CutInput) -> Vec<std::ops::Range<usize>> {
        blend::chunk::fixed_cuts(input.ids.len(), input.segment_starts, input.chunk_tokens)
    }

    fn select(&self, i: &SelectInput) -> Vec<u32> {
        *self.seen.borrow_mut() = Some((i.deviations.to_vec(), i.positions.to_vec(), i.chunk_starts.to_vec()));
        let n = i.deviations.len();
        let top = |score: &[f32], budget: usize| blend::select::top_deviation(score, &[], budget);
        match self.strategy {
            Strategy::Deviation => top(i.deviations, i.budget),
            Strategy::Even => (0..i.budget).map(|k| ((k * n + n / 2) / i.budget.max(1)) as u32).collect(),
            Strategy::Random => {
                let mut all: Vec<u32> = (0..n as u32).collect();
                all.shuffle(&mut StdRng::seed_from_u64(self.seed));
                all.truncate(i.budget);
                all.sort_unstable();
                all
            }
            Strategy::Heads(h) => blend::select::chunk_heads_then_deviation(i.deviations, i.chunk_starts, i.budget, h),
            Strategy::SpanStarts => {
                // Each span gets its share of the budget, spent on its first tokens.
                let mut out = Vec::new();
                for (k, &s) in i.chunk_starts.iter().enumerate() {
                    let end = i.chunk_starts.get(k + 1).copied().unwrap_or(n as u32);
                    let share = ((end - s) as usize * i.budget).div_ceil(n.max(1));
                    out.extend(s..(s + share as u32).min(end));
                }
                out.truncate(i.budget);
                out
            }
            Strategy::Oracle => {
                let score: Vec<f32> = i.positions.iter().map(|&p| self.truth[p as usize]).collect();
                top(&score, i.budget)
            }
            Strategy::Attention => top(i.attention, i.budget),
            Strategy::Mix(_) | Strategy::MixImpact(_) | Strategy::AttentionFirst(_) => {
                let first = match self.strategy {
                    Strategy::AttentionFirst(k) => k.min(i.budget),
                    Strategy::Mix(p) | Strategy::MixImpact(p) => (i.budget * p as usize).div_ceil(100).min(i.budget),
                    _ => unreachable!(),
                };
                let mut chosen = vec![false; n];
                top(i.attention, first).into_iter().for_each(|t| chosen[t as usize] = true);
                let rest: Vec<f32> = (0..n)
                    .map(|t| match (chosen[t], self.strategy) {
                        (true, _) => f32::NEG_INFINITY,
                        (false, Strategy::MixImpact(_)) => i.deviations[t] * i.attention[t],
                        (false, _) => i.deviations[t],
                    })
                    .collect();
                top(&rest, i.budget - first).into_iter().for_each(|t| chosen[t as usize] = true);
                (0..n as u32).filter(|&t| chosen[t as usize]).collect()
            }
            Strategy::AttentionDeviating(k) => {
                let mut sorted = i.deviations.to_vec();
                sorted.sort_by(|a, b| a.total_cmp(b));
                let median = sorted.get(n / 2).copied().unwrap_or(0.0);
                let read: Vec<f32> =
                    (0..n).map(|t| if i.deviations[t] > median { i.attention[t] } else { f32::NEG_INFINITY }).collect();
                blend::select::attention_then_deviation(i.deviations, &read, i.budget, k)
            }
            Strategy::RankSum => {
                let rank = |score: &[f32]| {
                    let mut order: Vec<usize> = (0..n).collect();
                    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
                    let mut r = vec![0f32; n];
                    order.iter().enumerate().for_each(|(k, &t)| r[t] = k as f32);
                    r
                };
                let (rd, ra) = (rank(i.deviations), rank(i.attention));
                let score: Vec<f32> = rd.iter().zip(&ra).map(|(a, b)| -(a + b)).collect();
                top(&score, i.budget)
            }
            Strategy::Adaptive(t) => {
                let over = i.deviations.iter().filter(|&&d| d as f64 * 1000.0 > t as f64).count();
                top(i.deviations, over.min(i.budget))
            }
            Strategy::Impact => {
                let score: Vec<f32> = i.deviations.iter().zip(i.attention).map(|(d, a)| d * a).collect();
                top(&score, i.budget)
            }
            Strategy::ImpactOracle => {
                let score: Vec<f32> =
                    i.positions.iter().zip(i.attention).map(|(&p, a)| self.truth[p as usize] * a).collect();
                top(&score, i.budget)
            }
            Strategy::Spans | Strategy::SpansOracle => {
                let score: Vec<f32> = match self.strategy {
                    Strategy::Spans => i.deviations.to_vec(),
                    _ => i.positions.iter().map(|&p| self.truth[p as usize]).collect(),
                };
                let mut spans: Vec<(f32, u32, u32)> = (0..i.chunk_starts.len())
                    .map(|k| {
                        let (s, e) = (i.chunk_starts[k], i.chunk_starts.get(k + 1).copied().unwrap_or(n as u32));
                        let mean = score[s as usize..e as usize].iter().sum::<f32>() / (e - s) as f32;
                        (mean, s, e)
                    })
                    .collect();
                spans.sort_by(|a, b| b.0.total_cmp(&a.0));
                let mut out = Vec::new();
                for (_, s, e) in spans {
                    let room = i.budget - out.len();
                    out.extend(s..e.min(s + room as u32));
                    if out.len() == i.budget {
                        break;
                    }
                }
                out.sort_unstable();
                out
            }
        }
    }
}

fn kl(p: &[f32], q: &[f32]) -> f64 {
    let lse = |r: &[f32]| {
        let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        m as f64 + r.iter().map(|x| ((x - m) as f64).exp()).sum::<f64>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter().zip(q).map(|(&a, &b)| (a as f64 - lp).exp() * ((a as f64 - lp) - (b as f64 - lq))).sum::<f64>().max(0.0)
}

/// Logits of the rows that predict each answer token: the prefill's last row, then the
/// answer fed after the prompt (all but its last token).
fn answer_rows(m: &LoadedModel, prefill: &Prefill, answer: &[u32]) -> anyhow::Result<Vec<Vec<f32>>> {
    let vocab = m.model.config().vocab;
    let mut cache = prefill.cache.clone();
    let n = cache.len() as u32;
    let feed = &answer[..answer.len() - 1];
    let positions: Vec<u32> = (n..n + feed.len() as u32).collect();
    let mut rows = vec![prefill.logits.clone()];
    if !feed.is_empty() {
        let out = m.model.forward(feed, &positions, &mut cache, &LogitsFor::All, false)?;
        rows.extend(out.logits.chunks_exact(vocab).map(<[f32]>::to_vec));
    }
    Ok(rows)
}

/// Greedy answer of `answer_tokens` tokens after a prefill.
fn greedy(m: &LoadedModel, prefill: &Prefill, answer_tokens: usize) -> anyhow::Result<Vec<u32>> {
    let mut cache = prefill.cache.clone();
    let mut logits = prefill.logits.clone();
    let mut out = Vec::new();
    for _ in 0..answer_tokens {
        let id = sampling::argmax(&logits);
        out.push(id);
        let pos = cache.len() as u32;
        logits = m.model.forward(&[id], &[pos], &mut cache, &LogitsFor::Last, false)?.logits;
    }
    Ok(out)
}

/// Sum over layers after `check` of each row's squared K+V difference between two caches.
fn true_deviation(a: &KvCache, b: &KvCache, check: usize) -> Vec<f32> {
    let d = a.kv_dim();
    (0..a.len())
        .map(|r| {
            a.layers()[check + 1..]
                .iter()
                .zip(&b.layers()[check + 1..])
                .map(|(la, lb)| {
                    let sq = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum::<f32>();
                    sq(&la.k[r * d..(r + 1) * d], &lb.k[r * d..(r + 1) * d])
                        + sq(&la.v[r * d..(r + 1) * d], &lb.v[r * d..(r + 1) * d])
                })
                .sum()
        })
        .collect()
}

fn spearman(a: &[f32], b: &[f32]) -> f64 {
    let rank = |x: &[f32]| {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
        let mut r = vec![0f64; x.len()];
        idx.iter().enumerate().for_each(|(k, &i)| r[i] = k as f64);
        r
    };
    let (ra, rb) = (rank(a), rank(b));
    let n = a.len() as f64;
    let mean = (n - 1.0) / 2.0;
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - mean) * (y - mean)).sum();
    let var: f64 = ra.iter().map(|x| (x - mean) * (x - mean)).sum();
    if var == 0.0 { 0.0 } else { cov / var }
}

const OFFSET_BUCKETS: [(usize, usize, &str); 8] = [
    (0, 1, "0"),
    (1, 2, "1"),
    (2, 4, "2-3"),
    (4, 8, "4-7"),
    (8, 16, "8-15"),
    (16, 32, "16-31"),
    (32, 64, "32-63"),
    (64, usize::MAX, "64+"),
];

/// Runs the comparison; `progress` is told each prompt.
pub fn run(m: &LoadedModel, o: &DenoiseOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<DenoiseReport> {
    let passages = trace::passages(&o.corpus, 200)?;
    let topts = TraceOptions { shape: o.shape, k: 4, pool: 40, zipf_s: 1.0, seed: o.seed };
    let requests = trace::prompts(&passages, &topts, o.warmup + o.requests);
    let store = Store::with_disk(
        &StoreOptions { ram_budget_bytes: 8 << 30, dtype: crate::store::KvDtype::F16, ..Default::default() },
        None,
    );
    let encode = |r: &trace::Request| -> anyhow::Result<(Vec<u32>, Vec<usize>)> {
        let msgs: Vec<ChatMessage> = r.body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| ChatMessage {
                role: x["role"].as_str().unwrap_or("user").into(),
                content: x["content"].as_str().unwrap_or("").into(),
            })
            .collect();
        Ok(m.encode_chat(&msgs)?)
    };
    let base = BlendOptions::default();
    let fill = |ids: &[u32], starts: &[usize]| -> anyhow::Result<()> {
        blend::prefill(
            &m.model,
            ids,
            starts,
            CacheMode::Compose,
            &BlendOptions { recompute_budget: 1.0, ..base.clone() },
            &store,
        )?;
        Ok(())
    };
    for (i, r) in requests[..o.warmup].iter().enumerate() {
        progress(&format!("warm-up {}/{}", i + 1, o.warmup));
        let (ids, starts) = encode(r)?;
        fill(&ids, &starts)?;
    }
    let configs: Vec<(usize, Strategy, f32, f32)> = o
        .check_layers
        .iter()
        .flat_map(|&c| {
            o.strategies
                .iter()
                .flat_map(move |&s| o.budgets.iter().flat_map(move |&b| o.tapers.iter().map(move |&t| (c, s, b, t))))
        })
        .collect();
    let mut sums = vec![(0f64, 0f64, 0f64, 0f64); configs.len()];
    let (mut floor_first, mut floor_tf, mut reused, mut total) = (0f64, 0f64, 0usize, 0usize);
    let mut by_offset = vec![(0f64, 0usize); OFFSET_BUCKETS.len()];
    let mut rho: Vec<(f64, usize)> = vec![(0.0, 0); o.check_layers.len()];
    let mut pooled: Vec<Vec<f32>> = vec![Vec::new(); o.check_layers.len()];
    let measured = &requests[o.warmup..];
    for (i, r) in measured.iter().enumerate() {
        progress(&format!("prompt {}/{}", i + 1, measured.len()));
        let (ids, starts) = encode(r)?;
        let frozen = ReadOnly(&store);
        let off = blend::prefill(&m.model, &ids, &starts, CacheMode::Off, &base, &frozen)?;
        let answer = greedy(m, &off, o.answer_tokens)?;
        let off_rows = answer_rows(m, &off, &answer)?;
        // The floor: every prompt token's KV but the last rounded to f16, the last recomputed.
        let mut rounded = off.cache.clone();
        rounded.truncate(ids.len() - 1);
        for l in rounded.rows_mut(0) {
            crate::store::KvDtype::F16.round(&mut l.k);
            crate::store::KvDtype::F16.round(&mut l.v);
        }
        let last =
            m.model.forward(&ids[ids.len() - 1..], &[ids.len() as u32 - 1], &mut rounded, &LogitsFor::Last, false)?;
        let floor = Prefill { cache: rounded, logits: last.logits, report: Default::default(), hidden: None };
        let floor_rows = answer_rows(m, &floor, &answer)?;
        floor_first += kl(&off_rows[0], &floor_rows[0]);
        floor_tf += off_rows.iter().zip(&floor_rows).map(|(a, b)| kl(a, b)).sum::<f64>() / off_rows.len() as f64;

        for (ci, &check) in o.check_layers.iter().enumerate() {
            let opts = BlendOptions { recompute_budget: 0.0, check_layer: check, ..base.clone() };
            let probe = Chooser { strategy: Strategy::Deviation, truth: Vec::new(), seed: 0, seen: RefCell::new(None) };
            let input = CutInput {
                ids: &ids,
                offsets: &[],
                text: "",
                segment_starts: &starts,
                chunk_tokens: base.chunk_tokens,
            };
            let zero = blend::prefill_with(&m.model, &input, CacheMode::Compose, &opts, &frozen, &probe)?;
            let truth = true_deviation(&zero.cache, &off.cache, check);
            if ci == 0 {
                (reused, total) = (reused + zero.report.reused_tokens, total + ids.len());
            }
            if let Some((dev, pos, span_starts)) = probe.seen.borrow().as_ref() {
                let t: Vec<f32> = pos.iter().map(|&p| truth[p as usize]).collect();
                rho[ci] = (rho[ci].0 + spearman(dev, &t), rho[ci].1 + 1);
                pooled[ci].extend_from_slice(dev);
                if ci == 0 {
                    for (k, &p) in pos.iter().enumerate() {
                        let start = span_starts.iter().rev().find(|&&s| s as usize <= k).copied().unwrap_or(0) as usize;
                        let b =
                            OFFSET_BUCKETS.iter().position(|&(lo, hi, _)| (lo..hi).contains(&(k - start))).unwrap_or(0);
                        by_offset[b] = (by_offset[b].0 + truth[p as usize] as f64, by_offset[b].1 + 1);
                    }
                }
            }
            for (k, &(c, strategy, budget, taper)) in configs.iter().enumerate().filter(|(_, c)| c.0 == check) {
                let chooser =
                    Chooser { strategy, truth: truth.clone(), seed: o.seed + i as u64, seen: RefCell::new(None) };
                let opts =
                    BlendOptions { recompute_budget: budget, recompute_taper: taper, check_layer: c, ..base.clone() };
                let p = blend::prefill_with(&m.model, &input, CacheMode::Compose, &opts, &frozen, &chooser)?;
                let rows = answer_rows(m, &p, &answer)?;
                let s = &mut sums[k];
                s.0 += kl(&off_rows[0], &rows[0]);
                s.1 += (sampling::argmax(&rows[0]) == sampling::argmax(&off_rows[0])) as u8 as f64;
                s.2 += off_rows.iter().zip(&rows).map(|(a, b)| kl(a, b)).sum::<f64>() / rows.len() as f64;
                s.3 += p.report.recomputed_tokens as f64;
            }
        }
        fill(&ids, &starts)?; // the server stores what this prompt brought
    }
    let n = measured.len().max(1) as f64;
    let rows = configs
        .iter()
        .zip(&sums)
        .map(|(&(c, s, b, t), sum)| Row {
            strategy: s.to_string(),
            check_layer: c,
            budget: b,
            taper: t,
            first_token_kl: sum.0 / n,
            first_token_agreement: sum.1 / n,
            tf_kl: sum.2 / n,
            recomputed: sum.3 / n,
        })
        .collect();
    Ok(DenoiseReport {
        shape: o.shape.name().to_string(),
        requests: measured.len(),
        reused_share: reused as f64 / total.max(1) as f64,
        floor_first_token_kl: floor_first / n,
        floor_tf_kl: floor_tf / n,
        deviation_by_offset: OFFSET_BUCKETS
            .iter()
            .zip(&by_offset)
            .map(|(b, (sum, count))| (b.2.to_string(), if *count > 0 { sum / *count as f64 } else { 0.0 }))
            .collect(),
        spearman: o.check_layers.iter().zip(&rho).map(|(&c, (sum, k))| (c, sum / (*k).max(1) as f64)).collect(),
        deviation_quantiles: o
            .check_layers
            .iter()
            .zip(&mut pooled)
            .map(|(&c, d)| {
                d.sort_by(|a, b| a.total_cmp(b));
                let q = |p: f64| d.get(((d.len() as f64 - 1.0) * p) as usize).map_or(0.0, |&x| x as f64);
                (c, q(0.5), q(0.9), q(0.99))
            })
            .collect(),
        rows,
    })
}

/// The report as a table.
pub fn table(r: &DenoiseReport) -> String {
    let mut out = format!(
        "{}: {} prompts, {:.1}% of prompt tokens reused\nfloor (prompt KV rounded to f16): first-token KL {:.4}, teacher-forced KL {:.4}\n",
        r.shape,
        r.requests,
        r.reused_share * 100.0,
        r.floor_first_token_kl,
        r.floor_tf_kl
    );
    out += "true K/V deviation after the check layer, by offset in span: ";
    out += &r.deviation_by_offset.iter().map(|(b, v)| format!("{b}: {v:.1}")).collect::<Vec<_>>().join(", ");
    out += "\nSpearman(check-layer deviation, true deviation): ";
    out += &r.spearman.iter().map(|(c, v)| format!("layer {c}: {v:.2}")).collect::<Vec<_>>().join(", ");
    out += "\ncheck-layer deviation p50 / p90 / p99: ";
    out += &r
        .deviation_quantiles
        .iter()
        .map(|(c, a, b, d)| format!("layer {c}: {a:.3} / {b:.3} / {d:.3}"))
        .collect::<Vec<_>>()
        .join(", ");
    out += &format!(
        "\n{:<12} {:>5} {:>6} {:>5} {:>10} {:>8} {:>10} {:>8}\n",
        "strategy", "check", "budget", "taper", "1st KL", "1st =", "TF KL", "recomp"
    );
    for row in &r.rows {
        out += &format!(
            "{:<12} {:>5} {:>5.0}% {:>5} {:>10.4} {:>7.0}% {:>10.4} {:>8.1}   ({:.1}x floor)\n",
            row.strategy,
            row.check_layer,
            row.budget * 100.0,
            row.taper,
            row.first_token_kl,
            row.first_token_agreement * 100.0,
            row.tf_kl,
            row.recomputed,
            row.tf_kl / r.floor_tf_kl.max(1e-12)
        );
    }
    out
}
