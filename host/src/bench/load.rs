//! `kvgate bench load`: many clients at once, against any OpenAI-compatible server.
//!
//! At each concurrency C, C clients run closed loops — each sends a streaming chat request,
//! reads it to the end, sends the next — over one shared list of prompts, until the list is
//! used up. The first `warmup` requests of a level are not counted: they fill the cache and
//! spread the clients out, so that what is measured is the steady state, not the first burst
//! of C requests arriving at once. Per request it records when the first token arrived and the
//! gap before every later one; per level, TTFT and inter-token latency percentiles, and
//! requests/s and output tokens/s from the first counted request's start to the last one's
//! end. The prompts are a RAG trace ([`super::trace`]) or short
//! questions (decode throughput). Nothing in the requests is kvgate's own, so the same run
//! measures llama.cpp's server or vLLM; the chunk store is flushed before each level when the
//! server is kvgate (`flush`).

use std::io::{BufRead, BufReader};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use super::trace::{self, Shape, TraceOptions};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Base URL of the server.
    pub url: String,
    /// Directory of .txt/.md/.html files (RAG traces).
    pub corpus: Option<std::path::PathBuf>,
    /// The trace, or `None` for short questions.
    pub shape: Option<Shape>,
    /// Concurrency levels.
    pub clients: Vec<usize>,
    /// Requests counted per level; 0: four per client, at least 16.
    pub requests: usize,
    /// Requests run first at each level and not counted; `None`: one per client.
    pub warmup: Option<usize>,
    pub max_tokens: usize,
    /// Generate `max_tokens` whatever the model says (`ignore_eos`).
    pub ignore_eos: bool,
    /// Passages per RAG request, words per passage.
    pub k: usize,
    pub passage_words: usize,
    pub seed: u64,
    /// Empty kvgate's chunk store before each level.
    pub flush: bool,
    /// Extra headers on every request (e.g. `x-kvgate-cache: off`).
    pub headers: Vec<(String, String)>,
    /// Name of the configuration, for the report and plots.
    pub label: String,
}

/// One request, as its client saw it.
#[derive(Debug, Clone)]
pub(super) struct Timed {
    pub started: Instant,
    pub ended: Instant,
    pub ttft_s: f64,
    /// Gaps between successive token-carrying events, s.
    pub gaps: Vec<f64>,
    pub tokens: usize,
}

/// One concurrency level.
#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub clients: usize,
    pub requests: usize,
    pub warmup: usize,
    pub failed: usize,
    pub wall_s: f64,
    pub ttft_p50_s: f64,
    pub ttft_p95_s: f64,
    pub ttft_p99_s: f64,
    pub itl_p50_s: f64,
    pub itl_p99_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub mean_prompt_chars: f64,
    pub mean_output_tokens: f64,
    /// The first failure's message, if any.
    pub error: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub label: String,
    pub url: String,
    pub trace: String,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub levels: Vec<Level>,
}

/// `n` chat request bodies: the RAG trace `shape` drawn from `corpus` (`k` passages of
/// `passage_words` each), or short questions when `shape` is `None`.
pub(super) fn prompt_bodies(
    shape: Option<Shape>,
    corpus: Option<&std::path::Path>,
    k: usize,
    passage_words: usize,
    seed: u64,
    n: usize,
) -> anyhow::Result<Vec<Value>> {
    let Some(shape) = shape else { return Ok(short_prompts(n)) };
    let dir = corpus.ok_or_else(|| anyhow::anyhow!("a RAG trace needs --corpus DIR"))?;
    let passages = trace::passages(dir, passage_words)?;
    let topts = TraceOptions { shape, k, pool: 40.min(passages.len()), zipf_s: 1.0, seed };
    Ok(trace::prompts(&passages, &topts, n).into_iter().map(|r| r.body).collect())
}

/// Short questions, each different (a prefix cache cannot answer them): the decode shape.
fn short_prompts(n: usize) -> Vec<Value> {
    const TOPICS: [&str; 8] = ["rivers", "bridges", "owls", "glass", "tides", "maps", "bread", "comets"];
    (0..n)
        .map(|i| {
            let question = format!("Tell me a story about {} number {i}.", TOPICS[i % TOPICS.len()]);
            json!({"messages": [{"role": "user", "content": question}]})
        })
        .collect()
}

/// The value at quantile `q` (nearest rank) of `v`, sorted in place; 0 when empty.
pub(super) fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Why a request failed: the server's status (and `Retry-After`, s) or anything else.
#[derive(Debug)]
pub(super) enum Failure {
    Status { code: u16, retry_after_s: Option<u64>, body: String },
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status { code, body, .. } => write!(f, "status {code}: {body}"),
            Failure::Other(e) => f.write_str(e),
        }
    }
}

/// The request body `o` sends for `body`: streaming, greedy, `max_tokens`, usage at the end.
pub(super) fn streaming_body(body: &Value, max_tokens: usize, ignore_eos: bool) -> Value {
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["max_tokens"] = json!(max_tokens);
    body["temperature"] = json!(0);
    body["stream_options"] = json!({"include_usage": true});
    if ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    body
}

/// Sends one streaming chat request to `url` and times its tokens.
pub(super) fn stream(url: &str, headers: &[(String, String)], body: &Value) -> Result<Timed, Failure> {
    let other = |e: &dyn std::fmt::Display| Failure::Other(e.to_string());
    let mut req = ureq::post(&format!("{url}/v1/chat/completions"));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let started = Instant::now();
    let resp = match req.send_string(&body.to_string()) {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let retry_after_s = r.header("retry-after").and_then(|v| v.trim().parse().ok());
            return Err(Failure::Status { code, retry_after_s, body: r.into_string().unwrap_or_default() });
        }
        Err(e) => return Err(Failure::Other(format!("request failed: {e}"))),
    };
    let mut timed = Timed { started, ended: started, ttft_s: 0.0, gaps: Vec::new(), tokens: 0 };
    let (mut last, mut events, mut usage) = (None::<Instant>, 0usize, None);
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|e| other(&e))?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| other(&e))?;
        if v.get("error").is_some() {
            return Err(Failure::Other(format!("server error: {data}")));
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            usage = Some(n as usize);
        }
        let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if content.is_empty() {
            continue;
        }
        let now = Instant::now();
        match last {
            None => timed.ttft_s = (now - started).as_secs_f64(),
            Some(t) => timed.gaps.push((now - t).as_secs_f64()),
        }
        last = Some(now);
        events += 1;
    }
    if last.is_none() {
        timed.ttft_s = started.elapsed().as_secs_f64();
    }
    timed.tokens = usage.unwrap_or(events);
    timed.ended = Instant::now();
    Ok(timed)
}

/// Runs every level; `progress` hears what is running.
pub fn run(o: &LoadOptions, progress: impl Fn(&str)) -> anyhow::Result<LoadReport> {
    if o.clients.is_empty() || o.clients.contains(&0) {
        anyhow::bail!("--clients needs one or more counts of at least 1");
    }
    let most = o.clients.iter().copied().max().unwrap_or(1);
    let per_level = |c: usize| if o.requests > 0 { o.requests } else { (4 * c).max(16) };
    let warmup = |c: usize| o.warmup.unwrap_or(c);
    let needed = o.clients.iter().map(|&c| warmup(c) + per_level(c)).max().unwrap_or(16).max(most);
    let bodies = prompt_bodies(o.shape, o.corpus.as_deref(), o.k, o.passage_words, o.seed, needed)?;
    let mut levels = Vec::new();
    for &c in &o.clients {
        if o.flush {
            super::client::flush(&o.url)?;
        }
        let (n, w) = (per_level(c), warmup(c));
        progress(&format!("{c} clients, {w} warm-up + {n} counted requests"));
        let next = AtomicUsize::new(0);
        let done: Mutex<Vec<Result<Timed, String>>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..c {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= w + n {
                            break;
                        }
                        let body = streaming_body(&bodies[i], o.max_tokens, o.ignore_eos);
                        let r = stream(&o.url, &o.headers, &body).map_err(|e| e.to_string());
                        if i >= w {
                            done.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                        }
                    }
                });
            }
        });
        let results = done.into_inner().unwrap_or_else(|p| p.into_inner());
        let error = results.iter().find_map(|r| r.as_ref().err().cloned());
        let ok: Vec<Timed> = results.into_iter().filter_map(Result::ok).collect();
        let wall_s = match (ok.iter().map(|t| t.started).min(), ok.iter().map(|t| t.ended).max()) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => f64::NAN,
        };
        let mut ttft: Vec<f64> = ok.iter().map(|t| t.ttft_s).collect();
        let mut gaps: Vec<f64> = ok.iter().flat_map(|t| t.gaps.iter().copied()).collect();
        let tokens: usize = ok.iter().map(|t| t.tokens).sum();
        let chars: usize = bodies[w..w + n].iter().map(|b| b["messages"].to_string().len()).sum();
        levels.push(Level {
            clients: c,
            requests: ok.len(),
            warmup: w,
            failed: n - ok.len(),
            wall_s,
            ttft_p50_s: quantile(&mut ttft, 0.5),
            ttft_p95_s: quantile(&mut ttft, 0.95),
            ttft_p99_s: quantile(&mut ttft, 0.99),
            itl_p50_s: quantile(&mut gaps, 0.5),
            itl_p99_s: quantile(&mut gaps, 0.99),
            requests_per_s: ok.len() as f64 / wall_s,
            output_tokens_per_s: tokens as f64 / wall_s,
            mean_prompt_chars: chars as f64 / n as f64,
            mean_output_tokens: tokens as f64 / ok.len().max(1) as f64,
            error,
        });
    }
    let trace = o.shape.map_or("short", |s| s.name()).to_string();
    Ok(LoadReport {
        label: o.label.clone(),
        url: o.url.clone(),
        trace,
        max_tokens: o.max_tokens,
        ignore_eos: o.ignore_eos,
        levels,
    })
}

/// The report as a table.
pub fn table(r: &LoadReport) -> String {
    let mut s = format!(
        "{} — {} trace, {} output tokens{}\n",
        r.label,
        r.trace,
        r.max_tokens,
        if r.ignore_eos { " (ignore_eos)" } else { "" }
    );
    s += "clients  requests  TTFT p50   p95      p99      ITL p50  p99      req/s   out tok/s\n";
    for l in &r.levels {
        s += &format!(
            "{:>7}  {:>8}  {:>7.0}ms {:>6.0}ms {:>6.0}ms {:>6.1}ms {:>6.1}ms {:>6.2}  {:>9.1}{}\n",
            l.clients,
            l.requests,
            1e3 * l.ttft_p50_s,
            1e3 * l.ttft_p95_s,
            1e3 * l.ttft_p99_s,
            1e3 * l.itl_p50_s,
            1e3 * l.itl_p99_s,
            l.requests_per_s,
            l.output_tokens_per_s,
            match (&l.error, l.failed) {
                (Some(e), f) => format!("  ({f} failed: {e})"),
                _ => String::new(),
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&mut v, 0.5), 3.0);
        assert_eq!(quantile(&mut v, 0.95), 5.0);
        assert_eq!(quantile(&mut v, 0.0), 1.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }
}
