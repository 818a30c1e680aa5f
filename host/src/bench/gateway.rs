//! `kvgate bench gateway`: the gateway under sustained load, as an operator runs it.
//!
//! `clients` streaming clients run closed loops for `warmup_s + duration_s` seconds, each
//! request for the next model of `models` in turn (local and upstream ones mixed), with the
//! normal clients' headers (their API key). Beside them `over_limit_clients` send as fast as
//! a careless client would (100 ms after each refusal, `Retry-After` ignored) with a key the
//! server limits: their 429s are the deliberate ones. Every other failure — a 429 on a normal
//! key, a 5xx, a broken stream — counts against the server. Latency (TTFT, and the whole
//! request) is reported per model for requests started after the warm-up; the resident memory
//! of each watched server (`process_resident_memory_bytes` on its `/metrics`) is sampled
//! throughout beside what its chunk store's RAM tier holds, so that growth after the warm-up
//! shows, and shows whether it is the cache filling up to its budget or anything else.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::load::{Failure, Timed, prompt_bodies, quantile, stream, streaming_body};
use super::trace::Shape;

/// What to run.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub url: String,
    pub corpus: Option<PathBuf>,
    /// The RAG trace, or `None` for short questions.
    pub shape: Option<Shape>,
    pub clients: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    /// Model ids, one per request in turn.
    pub models: Vec<String>,
    /// Headers of the normal clients (e.g. their `authorization`).
    pub headers: Vec<(String, String)>,
    pub over_limit_clients: usize,
    pub over_limit_headers: Vec<(String, String)>,
    pub max_tokens: usize,
    pub k: usize,
    pub passage_words: usize,
    pub seed: u64,
    /// Servers whose resident memory is sampled (their base URLs).
    pub watch: Vec<String>,
    pub sample_every_s: f64,
    pub label: String,
}

/// Latency of one model's requests started after the warm-up.
#[derive(Debug, Clone, Serialize)]
pub struct ModelFigures {
    pub model: String,
    pub requests: usize,
    pub failed: usize,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
    pub output_tokens: usize,
}

/// What the over-limit clients got.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OverLimitFigures {
    pub sent: usize,
    pub served: usize,
    pub rejected_429: usize,
    /// 429s that said when to come back.
    pub with_retry_after: usize,
    pub failed: usize,
}

/// One memory sample of a watched server.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MemorySample {
    /// Seconds since the start.
    pub t_s: f64,
    pub resident_bytes: u64,
    /// KV held by the chunk store's RAM tier (0 when the server does not say).
    pub ram_tier_bytes: u64,
}

/// One watched server's memory, and how much of its prompts it served from cache.
#[derive(Debug, Clone, Serialize)]
pub struct RssFigures {
    pub url: String,
    pub samples: Vec<MemorySample>,
    pub after_warmup: MemorySample,
    pub max_after_warmup_bytes: u64,
    pub end: MemorySample,
    /// `kvgate:prompt_tokens_cached_total / kvgate:prompt_tokens_total` at the end.
    pub prompt_tokens_cached_share: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayReport {
    pub label: String,
    pub url: String,
    pub trace: String,
    pub clients: usize,
    pub over_limit_clients: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub models: Vec<ModelFigures>,
    pub over_limit: OverLimitFigures,
    pub rss: Vec<RssFigures>,
    /// Failures besides the over-limit clients' 429s, warm-up included.
    pub failures: usize,
    /// The first few failures' messages.
    pub errors: Vec<String>,
    pub requests_per_s: f64,
}

/// A normal client's request, finished.
struct Done {
    model: usize,
    counted: bool,
    result: Result<Timed, String>,
}

/// The value of the sample named `name` (labels included) in `url`'s `/metrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn metrics_text(url: &str) -> Option<String> {
    ureq::get(&format!("{url}/metrics")).call().ok()?.into_string().ok()
}

/// Resident memory and the RAM tier's bytes, as `url`'s `/metrics` reports them.
fn memory(url: &str, t_s: f64) -> Option<MemorySample> {
    let text = metrics_text(url)?;
    Some(MemorySample {
        t_s,
        resident_bytes: metric(&text, "process_resident_memory_bytes")? as u64,
        ram_tier_bytes: metric(&text, "kvgate:chunk_store_bytes{tier=\"ram\"}").unwrap_or(0.0) as u64,
    })
}

/// Runs the soak; `progress` hears what is running.
pub fn run(o: &GatewayOptions, progress: impl Fn(&str) + Sync) -> anyhow::Result<GatewayReport> {
    if o.clients == 0 || o.models.is_empty() || o.duration_s <= 0.0 {
        anyhow::bail!("bench gateway needs --clients ≥ 1, a --duration and at least one --model");
    }
    // Enough prompts that the clients seldom send one twice; they cycle past the end.
    let bodies = prompt_bodies(o.shape, o.corpus.as_deref(), o.k, o.passage_words, o.seed, 4096)?;
    let body_for = |i: usize, model: &str| {
        let mut b = streaming_body(&bodies[i % bodies.len()], o.max_tokens, false);
        b["model"] = json!(model);
        b
    };
    let start = Instant::now();
    let warm_until = start + Duration::from_secs_f64(o.warmup_s);
    let until = warm_until + Duration::from_secs_f64(o.duration_s);
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Done>> = Mutex::new(Vec::new());
    let over = Mutex::new(OverLimitFigures::default());
    let over_errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    // Clients still running; the memory sampler stops when none is.
    let active = AtomicUsize::new(o.clients + o.over_limit_clients);
    let samples: Mutex<Vec<Vec<MemorySample>>> = Mutex::new(vec![Vec::new(); o.watch.len()]);
    progress(&format!(
        "{} clients + {} over the limit, {:.0} s warm-up then {:.0} s counted, models {}",
        o.clients,
        o.over_limit_clients,
        o.warmup_s,
        o.duration_s,
        o.models.join(", ")
    ));
    std::thread::scope(|s| {
        for _ in 0..o.clients {
            s.spawn(|| {
                while Instant::now() < until {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let model = i % o.models.len();
                    let counted = Instant::now() >= warm_until;
                    let result = stream(&o.url, &o.headers, &body_for(i, &o.models[model])).map_err(|e| e.to_string());
                    done.lock().unwrap_or_else(|p| p.into_inner()).push(Done { model, counted, result });
                }
                active.fetch_sub(1, Ordering::Relaxed);
            });
        }
        for _ in 0..o.over_limit_clients {
            s.spawn(|| {
                while Instant::now() < until {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let r = stream(&o.url, &o.over_limit_headers, &body_for(i, &o.models[i % o.models.len()]));
                    let mut f = over.lock().unwrap_or_else(|p| p.into_inner());
                    f.sent += 1;
                    match r {
                        Ok(_) => f.served += 1,
                        Err(Failure::Status { code: 429, retry_after_s, .. }) => {
                            f.rejected_429 += 1;
                            f.with_retry_after += usize::from(retry_after_s.is_some());
                            drop(f);
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(e) => {
                            f.failed += 1;
                            over_errors
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(format!("over-limit client: {e}"));
                        }
                    }
                }
                active.fetch_sub(1, Ordering::Relaxed);
            });
        }
        s.spawn(|| {
            let mut announced = false;
            loop {
                let last = active.load(Ordering::Relaxed) == 0;
                let t = start.elapsed().as_secs_f64();
                let mut all = samples.lock().unwrap_or_else(|p| p.into_inner());
                for (w, url) in o.watch.iter().enumerate() {
                    if let Some(m) = memory(url, t) {
                        all[w].push(m);
                    }
                }
                drop(all);
                if !announced && Instant::now() >= warm_until {
                    progress("warm-up over: counting");
                    announced = true;
                }
                if last {
                    break;
                }
                let wake = Instant::now() + Duration::from_secs_f64(o.sample_every_s.max(0.1));
                while Instant::now() < wake && active.load(Ordering::Relaxed) > 0 {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
    });
    let end_s = start.elapsed().as_secs_f64();
    let done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    let over = over.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut errors: Vec<String> = done.iter().filter_map(|d| d.result.as_ref().err().cloned()).collect();
    errors.extend(over_errors.into_inner().unwrap_or_else(|p| p.into_inner()));
    let failures = errors.len();
    errors.truncate(5);
    let counted: Vec<&Done> = done.iter().filter(|d| d.counted).collect();
    let models = o
        .models
        .iter()
        .enumerate()
        .map(|(m, name)| {
            let ok: Vec<&Timed> =
                counted.iter().filter(|d| d.model == m).filter_map(|d| d.result.as_ref().ok()).collect();
            let mut ttft: Vec<f64> = ok.iter().map(|t| t.ttft_s).collect();
            let mut total: Vec<f64> = ok.iter().map(|t| (t.ended - t.started).as_secs_f64()).collect();
            ModelFigures {
                model: name.clone(),
                requests: ok.len(),
                failed: counted.iter().filter(|d| d.model == m && d.result.is_err()).count(),
                ttft_p50_s: quantile(&mut ttft, 0.5),
                ttft_p99_s: quantile(&mut ttft, 0.99),
                latency_p50_s: quantile(&mut total, 0.5),
                latency_p99_s: quantile(&mut total, 0.99),
                output_tokens: ok.iter().map(|t| t.tokens).sum(),
            }
        })
        .collect();
    let served = counted.iter().filter(|d| d.result.is_ok()).count();
    let samples = samples.into_inner().unwrap_or_else(|p| p.into_inner());
    let rss = o
        .watch
        .iter()
        .zip(samples)
        .map(|(url, samples)| {
            let after: Vec<MemorySample> = samples.iter().filter(|m| m.t_s >= o.warmup_s).copied().collect();
            let none = MemorySample { t_s: 0.0, resident_bytes: 0, ram_tier_bytes: 0 };
            let text = metrics_text(url).unwrap_or_default();
            let cached = metric(&text, "kvgate:prompt_tokens_cached_total").unwrap_or(0.0);
            let total = metric(&text, "kvgate:prompt_tokens_total").unwrap_or(0.0);
            RssFigures {
                url: url.clone(),
                after_warmup: after.first().copied().unwrap_or(none),
                max_after_warmup_bytes: after.iter().map(|m| m.resident_bytes).max().unwrap_or(0),
                end: after.last().copied().unwrap_or(none),
                prompt_tokens_cached_share: cached / total.max(1.0),
                samples,
            }
        })
        .collect();
    Ok(GatewayReport {
        label: o.label.clone(),
        url: o.url.clone(),
        trace: o.shape.map_or("short", |s| s.name()).to_string(),
        clients: o.clients,
        over_limit_clients: o.over_limit_clients,
        warmup_s: o.warmup_s,
        duration_s: o.duration_s,
        models,
        over_limit: over,
        rss,
        failures,
        errors,
        requests_per_s: served as f64 / (end_s - o.warmup_s).max(1e-9),
    })
}

/// The report as text.
pub fn table(r: &GatewayReport) -> String {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut s = format!(
        "{} — {} clients + {} over the limit, {} trace, {:.0} s after {:.0} s warm-up, {:.2} req/s\n",
        r.label, r.clients, r.over_limit_clients, r.trace, r.duration_s, r.warmup_s, r.requests_per_s
    );
    s += "model                      requests  failed  TTFT p50   p99      latency p50  p99      out tokens\n";
    for m in &r.models {
        s += &format!(
            "{:<26} {:>8}  {:>6}  {:>7.0}ms {:>7.0}ms  {:>9.0}ms {:>7.0}ms  {:>9}\n",
            m.model,
            m.requests,
            m.failed,
            1e3 * m.ttft_p50_s,
            1e3 * m.ttft_p99_s,
            1e3 * m.latency_p50_s,
            1e3 * m.latency_p99_s,
            m.output_tokens
        );
    }
    let ol = &r.over_limit;
    if r.over_limit_clients > 0 {
        s += &format!(
            "over-limit key: {} sent, {} refused with 429 ({} with Retry-After), {} served, {} failed otherwise\n",
            ol.sent, ol.rejected_429, ol.with_retry_after, ol.served, ol.failed
        );
    }
    for w in &r.rss {
        let (a, e) = (&w.after_warmup, &w.end);
        let rest = |m: &MemorySample| mib(m.resident_bytes.saturating_sub(m.ram_tier_bytes));
        s += &format!(
            "{}: resident {:.0} MiB after warm-up, at most {:.0}, {:.0} at the end; RAM tier {:.0} -> {:.0} MiB; \
             the rest {:.0} -> {:.0} MiB; prompt tokens from cache {:.0} %\n",
            w.url,
            mib(a.resident_bytes),
            mib(w.max_after_warmup_bytes),
            mib(e.resident_bytes),
            mib(a.ram_tier_bytes),
            mib(e.ram_tier_bytes),
            rest(a),
            rest(e),
            100.0 * w.prompt_tokens_cached_share
        );
    }
    s += &format!("failures besides the deliberate 429s: {}\n", r.failures);
    for e in &r.errors {
        s += &format!("  {e}\n");
    }
    s
}
