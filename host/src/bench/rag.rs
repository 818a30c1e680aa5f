//! `kvgate bench rag`: request traces shaped like real clients', against a running server,
//! over HTTP, streaming.
//!
//! For each trace shape (see [`super::trace`]: passages joined under labels, one message
//! each, agent turns, memory), the same prompts run in every cache configuration — `off`,
//! `prefix`, and `compose` at each recompute budget (with each selector plugin, when given) —
//! each after a flush of the chunk store. The first `warmup` prompts of the trace fill the
//! store (1 token generated each), the next `requests` are measured; later measured prompts
//! reuse what earlier ones stored, as on a server in its steady state.
//!
//! Each configuration runs the measured prompts twice, each time after a flush and the
//! warm-up: streamed chat requests (TTFT, free-running quality, planted facts), then — with
//! `teacher_forced` — `off`'s answers scored by `echo` (teacher-forced KL, Δ log-likelihood).
//! Beside them stand the floors: `off` run again (noise) and, with a `floor_url` server
//! whose prefix chunks are rounded to f16, prefix reuse with f16 KV (the rounding production
//! servers accept); and what a perfect cache could reuse of the same prompts
//! ([`super::oracle`]).

use std::path::PathBuf;

use serde::Serialize;

use super::client::{self, Forced, Mode, Sample};
use super::oracle::Oracle;
use super::quality::{self, ModeFigures, Runs};
use super::trace::{self, Fact, Request, Shape, TraceOptions};

/// What to run.
#[derive(Debug, Clone)]
pub struct RagOptions {
    /// Base URL of a running `kvgate serve`.
    pub url: String,
    /// A second server started with `--prefix-kv-dtype f16`: its prefix mode is the f16 floor.
    pub floor_url: Option<String>,
    /// Directory of .txt/.md/.html files.
    pub corpus: PathBuf,
    /// Trace shapes to run, each on its own.
    pub shapes: Vec<Shape>,
    /// Passages per request.
    pub k: usize,
    /// Words per passage (about 1.3 tokens each for English prose).
    pub passage_words: usize,
    /// Passages drawn from (the most frequent ones per Zipf).
    pub pool: usize,
    pub zipf_s: f64,
    pub warmup: usize,
    pub requests: usize,
    pub max_tokens: usize,
    pub budgets: Vec<f32>,
    pub seed: u64,
    /// The server's `min_span`: what the oracle counts as a reusable run.
    pub min_span: usize,
    /// Run `off` again (noise floor) and `prefix` too.
    pub baselines: bool,
    /// Score `off`'s answers under each configuration (`echo`).
    pub teacher_forced: bool,
    /// Selector components to swap in, in turn, for the compose runs (needs `plugins_dir`).
    pub selectors: Vec<PathBuf>,
    /// The plugins directory of the server at `url`.
    pub plugins_dir: Option<PathBuf>,
}

/// One trace shape's run.
#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    pub shape: String,
    pub requests: usize,
    pub mean_prompt_tokens: f64,
    /// Share of the measured prompts' tokens in runs of ≥ `min_span` seen in an earlier prompt.
    pub oracle_hit_rate: f64,
    /// Share of the measured prompts' tokens in the longest prefix shared with an earlier prompt.
    pub prefix_oracle_rate: f64,
    pub results: Vec<ModeFigures>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct RagReport {
    pub k: usize,
    pub max_tokens: usize,
    pub min_span: usize,
    pub traces: Vec<TraceReport>,
}

/// One trace, tokenized, split into warm-up and measured requests.
struct Trace {
    warmup: Vec<Request>,
    measured: Vec<Request>,
    /// Token ids of the measured prompts.
    measured_ids: Vec<Vec<u32>>,
    facts: Vec<Option<Fact>>,
}

impl Trace {
    fn fill(&self, mode: &Mode) -> anyhow::Result<()> {
        client::flush(mode.url)?;
        if mode.cache != "off" {
            for r in &self.warmup {
                client::chat(mode, &r.body, 1)?;
            }
        }
        Ok(())
    }

    /// The measured prompts, streamed (after a flush and the warm-up).
    fn chat(&self, mode: &Mode, max_tokens: usize) -> anyhow::Result<Vec<Sample>> {
        self.fill(mode)?;
        self.measured.iter().map(|r| client::chat(mode, &r.body, max_tokens)).collect()
    }

    /// `answers` scored after each measured prompt (after a flush and the warm-up); before
    /// that, a prompt with a planted fact has its candidate answers ranked.
    fn force(&self, mode: &Mode, answers: &[Sample]) -> anyhow::Result<Vec<Forced>> {
        self.fill(mode)?;
        let mut out = Vec::with_capacity(answers.len());
        for ((ids, a), fact) in self.measured_ids.iter().zip(answers).zip(&self.facts) {
            let chose_right = match fact {
                Some(f) => {
                    let mut candidates = vec![client::tokenize_text(mode.url, &format!("{} {}.", f.lead, f.answer))?];
                    for d in &f.distractors {
                        candidates.push(client::tokenize_text(mode.url, &format!("{} {d}.", f.lead))?);
                    }
                    Some(client::choose(mode, ids, &candidates)? == 0)
                }
                None => None,
            };
            out.push(Forced { chose_right, ..client::force(mode, ids, &a.tokens)? });
        }
        Ok(out)
    }
}

/// Runs the whole benchmark; `progress` is told each trace and configuration as it starts.
pub fn run(opts: &RagOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<RagReport> {
    anyhow::ensure!(
        opts.selectors.is_empty() || opts.plugins_dir.is_some(),
        "--selectors needs --plugins-dir (the directory the server loads its plugins from)"
    );
    let passages = trace::passages(&opts.corpus, opts.passage_words)?;
    let mut traces = Vec::new();
    for &shape in &opts.shapes {
        let topts = TraceOptions { shape, k: opts.k, pool: opts.pool, zipf_s: opts.zipf_s, seed: opts.seed };
        let mut all = trace::prompts(&passages, &topts, opts.warmup + opts.requests);
        let measured = all.split_off(opts.warmup.min(all.len()));
        // What a perfect cache could reuse of the measured prompts, given all before them.
        let mut oracle = Oracle::new(opts.min_span);
        let (mut tokens, mut spans, mut prefix) = (0, 0, 0);
        for r in &all {
            oracle.observe(&client::tokenize(&opts.url, &r.body)?);
        }
        let mut measured_ids = Vec::new();
        for r in &measured {
            let ids = client::tokenize(&opts.url, &r.body)?;
            let seen = oracle.observe(&ids);
            (tokens, spans, prefix) = (tokens + seen.tokens, spans + seen.spans, prefix + seen.prefix);
            measured_ids.push(ids);
        }
        let facts = measured.iter().map(|r| r.fact.clone()).collect();
        let t = Trace { warmup: all, measured, measured_ids, facts };

        let name = shape.name();
        let mode = |url, cache, budget| Mode { url, cache, budget };
        let off_mode = mode(opts.url.as_str(), "off", None);
        progress(&format!("{name} off"));
        let off = t.chat(&off_mode, opts.max_tokens)?;
        let off_forced = match opts.teacher_forced {
            true => Some(t.force(&off_mode, &off)?),
            false => None,
        };
        let mut results = Vec::new();
        let mut measure = |label: &str, m: Mode, selector: Option<String>, progress: &mut dyn FnMut(&str)| {
            progress(&format!("{name} {label}"));
            let samples = t.chat(&m, opts.max_tokens)?;
            let forced = match (opts.teacher_forced, m.cache) {
                (true, "off") => off_forced.clone(), // deterministic: the same prefill
                (true, _) => Some(t.force(&m, &off)?),
                (false, _) => None,
            };
            let runs = Runs {
                samples: &samples,
                forced: forced.as_deref(),
                reference: &off,
                reference_forced: off_forced.as_deref(),
                facts: &t.facts,
            };
            results.push(quality::figures(label, m.cache, m.budget, selector, &runs));
            anyhow::Ok(())
        };
        if opts.baselines {
            measure("off (noise floor)", off_mode.clone(), None, &mut progress)?;
            measure("prefix", mode(opts.url.as_str(), "prefix", None), None, &mut progress)?;
        }
        if let Some(floor) = &opts.floor_url {
            measure("prefix f16 (floor)", mode(floor.as_str(), "prefix", None), None, &mut progress)?;
        }
        let selectors: Vec<Option<&PathBuf>> =
            if opts.selectors.is_empty() { vec![None] } else { opts.selectors.iter().map(Some).collect() };
        for component in selectors {
            let selector = match (component, &opts.plugins_dir) {
                (Some(c), Some(dir)) => Some(client::install_selector(&opts.url, dir, c)?),
                _ => None,
            };
            for &b in &opts.budgets {
                let label = match &selector {
                    Some(s) => format!("compose {:.0}% {s}", b * 100.0),
                    None => format!("compose {:.0}%", b * 100.0),
                };
                measure(&label, mode(opts.url.as_str(), "compose", Some(b)), selector.clone(), &mut progress)?;
            }
        }
        let off_runs = Runs {
            samples: &off,
            forced: off_forced.as_deref(),
            reference: &off,
            reference_forced: off_forced.as_deref(),
            facts: &t.facts,
        };
        results.insert(0, quality::figures("off", "off", None, None, &off_runs));
        let share = |x: usize| x as f64 / tokens.max(1) as f64;
        traces.push(TraceReport {
            shape: name.to_string(),
            requests: t.measured.len(),
            mean_prompt_tokens: tokens as f64 / t.measured.len().max(1) as f64,
            oracle_hit_rate: share(spans),
            prefix_oracle_rate: share(prefix),
            results,
        });
    }
    Ok(RagReport { k: opts.k, max_tokens: opts.max_tokens, min_span: opts.min_span, traces })
}

/// The report as tables, one per trace shape.
pub fn table(r: &RagReport) -> String {
    let mut out = String::new();
    let opt = |x: Option<f64>, digits: usize| x.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    for t in &r.traces {
        out.push_str(&format!(
            "\n{}: {} requests, {:.0} prompt tokens on average, {} generated tokens each\n\
             oracle: {:.1}% of prompt tokens in runs of >= {} tokens seen before; prefix oracle {:.1}%\n",
            t.shape,
            t.requests,
            t.mean_prompt_tokens,
            r.max_tokens,
            t.oracle_hit_rate * 100.0,
            r.min_span,
            t.prefix_oracle_rate * 100.0
        ));
        out.push_str(&format!(
            "{:<30} {:>8} {:>8} {:>6} {:>7} {:>5} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>9} {:>6}\n",
            "config",
            "TTFT p50",
            "p95",
            "reused",
            "/oracle",
            "spans",
            "recomp",
            "1st",
            "first-N",
            "free KL",
            "TF KL",
            "TF dLL",
            "facts",
            "lookup"
        ));
        let base = t.results.first().map(|f| f.ttft_p50_s).unwrap_or(1.0);
        for f in &t.results {
            let pct = |x: Option<f64>| x.map_or("-".to_string(), |a| format!("{:.0}%", a * 100.0));
            let facts = format!("{}/{}", pct(f.fact_accuracy), pct(f.fact_choice_accuracy));
            out.push_str(&format!(
                "{:<30} {:>6.0}ms {:>6.0}ms {:>5.1}% {:>6.0}% {:>5.1} {:>5.1}% {:>5.0}% {:>6.0}% {:>7.4} {:>7} {:>7} {:>9} {:>4.0}us  ({:.1}x)\n",
                f.label,
                f.ttft_p50_s * 1e3,
                f.ttft_p95_s * 1e3,
                f.token_hit_rate * 100.0,
                f.token_hit_rate / t.oracle_hit_rate.max(1e-9) * 100.0,
                f.mean_spans,
                f.recompute_ratio * 100.0,
                f.first_token_agreement * 100.0,
                f.identical_first_n * 100.0,
                f.mean_kl,
                opt(f.tf_kl, 4),
                opt(f.tf_dll, 3),
                facts,
                f.lookup_us_p50,
                base / f.ttft_p50_s.max(1e-9),
            ));
        }
        for f in t.results.iter().filter(|f| !f.first_token_flip_margins.is_empty()) {
            let margins: Vec<String> = f.first_token_flip_margins.iter().map(|m| format!("{m:.2}")).collect();
            out.push_str(&format!(
                "  {}: first token differs on {} prompt(s); off's top-2 margin there: {} nats\n",
                f.label,
                margins.len(),
                margins.join(", ")
            ));
        }
        if let Some(c) = t.results.iter().rev().find(|f| f.mode == "compose") {
            let m = &c.mean_timings;
            out.push_str(&format!(
                "  {} prefill, mean ms: lookup {:.2}, splice {:.1}, check {:.1}, compute {:.1}, store {:.1}\n",
                c.label,
                m.lookup_us / 1e3,
                m.splice_us / 1e3,
                m.check_us / 1e3,
                m.compute_us / 1e3,
                m.store_us / 1e3
            ));
        }
        if let Some(n) = t.results.first().map(|f| f.fact_questions).filter(|&n| n > 0) {
            out.push_str(&format!(
                "  facts: on the {n} measured prompts that ask for a planted fact, share answered right \
                 (greedy) / share whose right answer is the likeliest of four (teacher-forced)\n"
            ));
        }
    }
    out
}
