//! `kvgate bench rag`: a RAG workload against a running server, over HTTP, streaming.
//!
//! Every request is a system prompt, `k` passages drawn by Zipf popularity in random order
//! (one chat message each), and a question. The same measured prompts run in every cache
//! configuration — `off`, `prefix`, and `compose` at each recompute budget — each after a
//! flush of the chunk store and a warm-up on other prompts from the same distribution, so
//! configurations do not feed each other. `off` is run twice: its second run is the noise
//! floor of the quality figures.
//!
//! Quality against `off` on the same prompt (greedy): first-token agreement, identical first
//! `max_tokens` tokens, and the mean KL divergence of the next-token distribution over the
//! steps where both runs still agree (from the top-20 log-probabilities; the mass outside the
//! top 20 is one bucket).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};

/// What to run.
#[derive(Debug, Clone)]
pub struct RagOptions {
    /// Base URL of a running `kvgate serve`.
    pub url: String,
    /// Directory of .txt/.md/.html files.
    pub corpus: PathBuf,
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
    /// All passages in one user message, separated by blank lines (instead of a message
    /// each): chunk boundaries then come from the chunker alone.
    pub joined: bool,
}

/// One request's measurements.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    ttft_s: f64,
    prompt_tokens: usize,
    reused_tokens: usize,
    recomputed_tokens: usize,
    /// Generated tokens (their bytes).
    tokens: Vec<Vec<u8>>,
    /// Per step, top-20 (token bytes, logprob).
    tops: Vec<Vec<(Vec<u8>, f64)>>,
}

/// Figures of one configuration.
#[derive(Debug, Clone, Serialize)]
pub struct ModeFigures {
    pub label: String,
    pub mode: String,
    pub budget: Option<f32>,
    pub ttft_p50_s: f64,
    pub ttft_p95_s: f64,
    pub token_hit_rate: f64,
    pub recompute_ratio: f64,
    pub first_token_agreement: f64,
    pub identical_first_n: f64,
    pub mean_kl: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct RagReport {
    pub requests: usize,
    pub k: usize,
    pub mean_prompt_tokens: f64,
    pub max_tokens: usize,
    pub results: Vec<ModeFigures>,
}

/// Text of the corpus, cut into passages of about `words` words.
pub fn passages(dir: &Path, words: usize) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let raw = std::fs::read_to_string(&f).unwrap_or_default();
        let text = if f.extension().is_some_and(|e| e == "html" || e == "htm") { html_text(&raw) } else { raw };
        let mut current: Vec<&str> = Vec::new();
        for para in text.split("\n\n") {
            let w: Vec<&str> = para.split_whitespace().collect();
            if w.len() < 8 {
                continue; // headings, navigation, code fragments
            }
            current.extend(w);
            if current.len() >= words {
                out.push(current[..words].join(" "));
                current.clear();
            }
        }
    }
    anyhow::ensure!(out.len() >= 8, "the corpus {} gave only {} passages of {words} words", dir.display(), out.len());
    Ok(out)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("cannot read corpus {}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out)?;
        } else if p.extension().is_some_and(|x| ["txt", "md", "html", "htm"].iter().any(|y| x == *y)) {
            out.push(p);
        }
    }
    Ok(())
}

/// The readable text of an HTML page: its `<main>` if it has one, tags dropped, paragraphs
/// kept apart.
fn html_text(html: &str) -> String {
    let body = match (html.find("<main"), html.rfind("</main>")) {
        (Some(a), Some(b)) if a < b => &html[a..b],
        _ => html,
    };
    let mut out = String::with_capacity(body.len());
    let mut in_tag = false;
    let mut tag = String::new();
    let mut skip = false;
    for c in body.chars() {
        match (in_tag, c) {
            (false, '<') => {
                in_tag = true;
                tag.clear();
            }
            (true, '>') => {
                in_tag = false;
                let name = tag.trim_start_matches('/').split_whitespace().next().unwrap_or("").to_ascii_lowercase();
                if name == "pre" || name == "script" || name == "style" {
                    skip = !tag.starts_with('/');
                }
                if matches!(name.as_str(), "p" | "h1" | "h2" | "h3" | "li" | "pre" | "div") && tag.starts_with('/') {
                    out.push_str("\n\n");
                }
            }
            (true, c) => tag.push(c),
            (false, c) if !skip => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&#39;", "'")
}

/// Draws passage indices by Zipf popularity (rank r with weight 1 / r^s).
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let cdf = (1..=n)
            .map(|r| {
                acc += 1.0 / (r as f64).powf(s);
                acc
            })
            .collect::<Vec<_>>();
        let total = acc;
        Self { cdf: cdf.into_iter().map(|c| c / total).collect() }
    }

    fn draw(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// `n` chat requests of `k` distinct passages each.
/// `n` chat requests (`{"messages": …}`) drawn as the benchmark draws them.
pub fn prompts(passages: &[String], opts: &RagOptions, n: usize, seed: u64) -> Vec<Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = opts.pool.min(passages.len());
    // Popularity ranks over a shuffled pool, so rank does not follow file order.
    let mut ranked: Vec<usize> = (0..passages.len()).collect();
    ranked.shuffle(&mut StdRng::seed_from_u64(opts.seed));
    let zipf = Zipf::new(pool, opts.zipf_s);
    (0..n)
        .map(|_| {
            let mut chosen: Vec<usize> = Vec::new();
            while chosen.len() < opts.k.min(pool) {
                let p = ranked[zipf.draw(&mut rng)];
                if !chosen.contains(&p) {
                    chosen.push(p);
                }
            }
            chosen.shuffle(&mut rng);
            let about = &passages[chosen[rng.random_range(0..chosen.len())]];
            let topic: String = about.split_whitespace().take(6).collect::<Vec<_>>().join(" ");
            let mut messages = vec![json!({"role": "system", "content":
                "You are a helpful assistant. Answer the question using only the passages the user gives you."})];
            if opts.joined {
                let joined: Vec<&str> = chosen.iter().map(|&i| passages[i].as_str()).collect();
                messages.push(json!({"role": "user", "content": format!("Passages:\n\n{}", joined.join("\n\n"))}));
            } else {
                messages.extend(chosen.iter().map(|&i| json!({"role": "user", "content": format!("Passage:\n{}", passages[i])})));
            }
            messages.push(json!({"role": "user", "content": format!("Question: what does the passage that begins \"{topic}\" explain?")}));
            json!({"messages": messages})
        })
        .collect()
}

/// Sends one streaming request and measures it.
fn run_one(url: &str, prompt: &Value, mode: &str, budget: Option<f32>, max_tokens: usize) -> anyhow::Result<Sample> {
    let mut body = prompt.clone();
    body["temperature"] = json!(0);
    body["max_tokens"] = json!(max_tokens);
    body["stream"] = json!(true);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(20);
    let mut req = ureq::post(&format!("{url}/v1/chat/completions")).set("x-kvgate-cache", mode);
    if let Some(b) = budget {
        req = req.set("x-kvgate-recompute-budget", &b.to_string());
    }
    let started = Instant::now();
    let resp = req.send_string(&body.to_string()).map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
    let mut sample = Sample {
        ttft_s: 0.0,
        prompt_tokens: 0,
        reused_tokens: 0,
        recomputed_tokens: 0,
        tokens: Vec::new(),
        tops: Vec::new(),
    };
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if v.get("error").is_some() {
            anyhow::bail!("server error: {data}");
        }
        if let Some(content) = v["choices"][0]["logprobs"]["content"].as_array() {
            for c in content {
                if sample.tokens.is_empty() {
                    sample.ttft_s = started.elapsed().as_secs_f64();
                }
                sample.tokens.push(bytes_of(&c["bytes"]));
                let top = c["top_logprobs"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                sample
                    .tops
                    .push(top.iter().map(|t| (bytes_of(&t["bytes"]), t["logprob"].as_f64().unwrap_or(0.0))).collect());
            }
        }
        if let Some(k) = v.get("kvgate") {
            sample.reused_tokens = k["reused_tokens"].as_u64().unwrap_or(0) as usize;
            sample.recomputed_tokens = k["recomputed_tokens"].as_u64().unwrap_or(0) as usize;
            sample.prompt_tokens =
                (k["reused_tokens"].as_u64().unwrap_or(0) + k["computed_tokens"].as_u64().unwrap_or(0)) as usize;
        }
    }
    if sample.tokens.is_empty() {
        sample.ttft_s = started.elapsed().as_secs_f64();
    }
    Ok(sample)
}

fn bytes_of(v: &Value) -> Vec<u8> {
    v.as_array().map(|a| a.iter().map(|b| b.as_u64().unwrap_or(0) as u8).collect()).unwrap_or_default()
}

/// KL(p || q) of one step from two top-k lists; the rest of the mass is one bucket.
fn step_kl(p: &[(Vec<u8>, f64)], q: &[(Vec<u8>, f64)]) -> f64 {
    // A token missing from q's top list has at most q's smallest listed logprob.
    let qf = q.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
    let mut kl = 0.0;
    let (mut pm, mut qm) = (0.0, 0.0);
    for (tok, lp) in p {
        let lq = q.iter().find(|x| &x.0 == tok).map(|x| x.1).unwrap_or(qf);
        let pp = lp.exp();
        kl += pp * (lp - lq);
        pm += pp;
        qm += lq.exp();
    }
    let (pr, qr) = ((1.0 - pm).max(1e-9), (1.0 - qm).max(1e-9));
    (kl + pr * (pr / qr).ln()).max(0.0)
}

fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

fn figures(label: &str, mode: &str, budget: Option<f32>, runs: &[Sample], reference: &[Sample]) -> ModeFigures {
    let ttft: Vec<f64> = runs.iter().map(|s| s.ttft_s).collect();
    let prompt: usize = runs.iter().map(|s| s.prompt_tokens).sum();
    let reused: usize = runs.iter().map(|s| s.reused_tokens).sum();
    let recomputed: usize = runs.iter().map(|s| s.recomputed_tokens).sum();
    let n = runs.len().max(1) as f64;
    let mut first = 0.0;
    let mut identical = 0.0;
    let mut kls = Vec::new();
    for (a, r) in runs.iter().zip(reference) {
        if a.tokens.first() == r.tokens.first() {
            first += 1.0;
        }
        if a.tokens == r.tokens {
            identical += 1.0;
        }
        for (i, (ta, tr)) in a.tops.iter().zip(&r.tops).enumerate() {
            kls.push(step_kl(tr, ta));
            if a.tokens.get(i) != r.tokens.get(i) {
                break; // past a divergence the two runs condition on different text
            }
        }
    }
    ModeFigures {
        label: label.to_string(),
        mode: mode.to_string(),
        budget,
        ttft_p50_s: percentile(&ttft, 0.5),
        ttft_p95_s: percentile(&ttft, 0.95),
        token_hit_rate: if prompt > 0 { reused as f64 / prompt as f64 } else { 0.0 },
        recompute_ratio: if reused > 0 { recomputed as f64 / reused as f64 } else { 0.0 },
        first_token_agreement: first / n,
        identical_first_n: identical / n,
        mean_kl: if kls.is_empty() { 0.0 } else { kls.iter().sum::<f64>() / kls.len() as f64 },
    }
}

fn flush(url: &str) -> anyhow::Result<()> {
    ureq::delete(&format!("{url}/admin/chunks"))
        .call()
        .map_err(|e| anyhow::anyhow!("flushing the chunk store: {e}"))?;
    Ok(())
}

/// Runs the whole benchmark; `progress` is told each configuration as it starts.
pub fn run(opts: &RagOptions, mut progress: impl FnMut(&str)) -> anyhow::Result<RagReport> {
    let passages = passages(&opts.corpus, opts.passage_words)?;
    let measured = prompts(&passages, opts, opts.requests, opts.seed ^ 0x5eed);
    let warmup = prompts(&passages, opts, opts.warmup, opts.seed ^ 0x3a3a);
    let measure = |mode: &str, budget: Option<f32>, progress: &mut dyn FnMut(&str)| -> anyhow::Result<Vec<Sample>> {
        progress(&format!("{mode} {}", budget.map(|b| format!("{:.0}%", b * 100.0)).unwrap_or_default()));
        flush(&opts.url)?;
        if mode != "off" {
            for p in &warmup {
                run_one(&opts.url, p, mode, budget, 1)?;
            }
        }
        measured.iter().map(|p| run_one(&opts.url, p, mode, budget, opts.max_tokens)).collect()
    };
    let off = measure("off", None, &mut progress)?;
    let off_again = measure("off", None, &mut progress)?;
    let mut results =
        vec![figures("off", "off", None, &off, &off), figures("off (noise floor)", "off", None, &off_again, &off)];
    let prefix = measure("prefix", None, &mut progress)?;
    results.push(figures("prefix", "prefix", None, &prefix, &off));
    for &b in &opts.budgets {
        let runs = measure("compose", Some(b), &mut progress)?;
        results.push(figures(&format!("compose {:.0}%", b * 100.0), "compose", Some(b), &runs, &off));
    }
    let mean_prompt_tokens = off.iter().map(|s| s.prompt_tokens as f64).sum::<f64>() / off.len().max(1) as f64;
    Ok(RagReport { requests: opts.requests, k: opts.k, mean_prompt_tokens, max_tokens: opts.max_tokens, results })
}

/// The report as a table.
pub fn table(r: &RagReport) -> String {
    let mut out = format!(
        "{} requests, k={} passages, {:.0} prompt tokens on average, {} generated tokens each\n",
        r.requests, r.k, r.mean_prompt_tokens, r.max_tokens
    );
    out.push_str(&format!(
        "{:<18} {:>9} {:>9} {:>8} {:>9} {:>8} {:>9} {:>9}\n",
        "config", "TTFT p50", "TTFT p95", "hit", "recomp", "1st tok", "first-N", "mean KL"
    ));
    let base = r.results.first().map(|f| f.ttft_p50_s).unwrap_or(1.0);
    for f in &r.results {
        out.push_str(&format!(
            "{:<18} {:>8.0}ms {:>8.0}ms {:>7.1}% {:>8.1}% {:>7.0}% {:>8.0}% {:>9.4}   ({:.1}x)\n",
            f.label,
            f.ttft_p50_s * 1e3,
            f.ttft_p95_s * 1e3,
            f.token_hit_rate * 100.0,
            f.recompute_ratio * 100.0,
            f.first_token_agreement * 100.0,
            f.identical_first_n * 100.0,
            f.mean_kl,
            base / f.ttft_p50_s.max(1e-9),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_text_keeps_prose_and_drops_code() {
        let t = html_text(
            "<nav>menu</nav><main><h1>Title</h1><p>Some &amp; text.</p><pre>let x = 1;</pre><p>More.</p></main>",
        );
        assert!(t.contains("Some & text.") && t.contains("More."));
        assert!(!t.contains("let x") && !t.contains("menu"));
    }

    #[test]
    fn kl_is_zero_for_equal_tops_and_positive_otherwise() {
        let a = vec![(b"a".to_vec(), -0.1f64), (b"b".to_vec(), -2.5)];
        let b = vec![(b"a".to_vec(), -1.0f64), (b"b".to_vec(), -0.6)];
        assert!(step_kl(&a, &a) < 1e-9);
        assert!(step_kl(&a, &b) > 0.1);
    }

    #[test]
    fn zipf_favours_low_ranks() {
        let z = Zipf::new(100, 1.0);
        let mut rng = StdRng::seed_from_u64(1);
        let draws: Vec<usize> = (0..2000).map(|_| z.draw(&mut rng)).collect();
        let low = draws.iter().filter(|&&d| d < 10).count();
        assert!(low > 2000 / 3, "{low}");
    }
}
