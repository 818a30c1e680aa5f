//! The benchmarks' side of the wire: requests to a running kvgate as a client sends them.
//!
//! Owns the HTTP calls `kvgate bench rag` makes — tokenizing, streaming a chat request and
//! timing its first token, scoring a prompt with `echo` (teacher forcing), flushing the chunk
//! store, swapping the selector plugin — and parsing their answers into [`Sample`] and
//! [`Forced`].

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

/// One streamed chat request, measured.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub ttft_s: f64,
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub recomputed_tokens: usize,
    pub spans: usize,
    /// The server's account of the prefill (`kvgate.timings`), µs.
    pub timings: Timings,
    /// Generated token ids (the end-of-turn token excluded).
    pub tokens: Vec<u32>,
    /// Per generated token, its top-20 (id, logprob).
    pub tops: Vec<Vec<(u32, f64)>>,
    pub text: String,
    /// The node that answered, when a router named it (`x-kvgate-node`).
    pub node: Option<String>,
}

/// Phases of the server's prefill, µs (`kvgate.timings`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Timings {
    pub lookup_us: f64,
    pub splice_us: f64,
    pub check_us: f64,
    pub compute_us: f64,
    pub store_us: f64,
}

/// A teacher-forced answer: per answer token, its logprob and the top-20 (id, logprob) at its
/// position, given the prompt and the answer before it.
#[derive(Debug, Clone, Default)]
pub struct Forced {
    pub steps: Vec<(f64, Vec<(u32, f64)>)>,
    /// For a prompt with a planted fact: whether the right answer was the most likely of the
    /// candidates.
    pub chose_right: Option<bool>,
}

/// How a configuration talks to the server.
#[derive(Debug, Clone)]
pub struct Mode<'a> {
    pub url: &'a str,
    /// `off`, `prefix` or `compose`.
    pub cache: &'a str,
    pub budget: Option<f32>,
}

impl Mode<'_> {
    fn post(&self, path: &str) -> ureq::Request {
        let mut req = ureq::post(&format!("{}{path}", self.url)).set("x-kvgate-cache", self.cache);
        if let Some(b) = self.budget {
            req = req.set("x-kvgate-recompute-budget", &b.to_string());
        }
        req
    }
}

/// `token_id:<n>` → n (vLLM's `return_tokens_as_token_ids`).
fn id_of(v: &Value) -> u32 {
    v.as_str().and_then(|t| t.strip_prefix("token_id:")).and_then(|n| n.parse().ok()).unwrap_or(u32::MAX)
}

/// The token ids the server prefills for a chat request body (`POST /tokenize`).
pub fn tokenize(url: &str, body: &Value) -> anyhow::Result<Vec<u32>> {
    let resp: Value = ureq::post(&format!("{url}/tokenize"))
        .send_string(&json!({"messages": body["messages"]}).to_string())
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
        .into_json()?;
    let ids = resp["tokens"].as_array().ok_or_else(|| anyhow::anyhow!("/tokenize answered {resp}"))?;
    Ok(ids.iter().map(|t| t.as_u64().unwrap_or(0) as u32).collect())
}

/// Sends one streaming, greedy chat request and measures it.
pub fn chat(mode: &Mode, body: &Value, max_tokens: usize) -> anyhow::Result<Sample> {
    let mut body = body.clone();
    body["temperature"] = json!(0);
    body["max_tokens"] = json!(max_tokens);
    body["stream"] = json!(true);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(20);
    body["return_tokens_as_token_ids"] = json!(true);
    let started = Instant::now();
    let resp = mode
        .post("/v1/chat/completions")
        .send_string(&body.to_string())
        .map_err(|e| anyhow::anyhow!("request failed: {e}"))?;
    let mut sample = Sample { node: resp.header("x-kvgate-node").map(str::to_string), ..Sample::default() };
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
        sample.text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        for c in v["choices"][0]["logprobs"]["content"].as_array().into_iter().flatten() {
            if sample.tokens.is_empty() {
                sample.ttft_s = started.elapsed().as_secs_f64();
            }
            sample.tokens.push(id_of(&c["token"]));
            let top = c["top_logprobs"].as_array().into_iter().flatten();
            sample.tops.push(top.map(|t| (id_of(&t["token"]), t["logprob"].as_f64().unwrap_or(0.0))).collect());
        }
        if let Some(k) = v.get("kvgate") {
            sample.spans = k["spans"].as_u64().unwrap_or(0) as usize;
            sample.timings = serde_json::from_value(k["timings"].clone()).unwrap_or_default();
            sample.reused_tokens = k["reused_tokens"].as_u64().unwrap_or(0) as usize;
            sample.recomputed_tokens = k["recomputed_tokens"].as_u64().unwrap_or(0) as usize;
            sample.prompt_tokens = sample.reused_tokens + k["computed_tokens"].as_u64().unwrap_or(0) as usize;
        }
    }
    if sample.tokens.is_empty() {
        sample.ttft_s = started.elapsed().as_secs_f64();
    }
    Ok(sample)
}

/// Teacher forcing: `prompt` then `answer` scored with `echo` and `max_tokens: 0` on
/// `/v1/completions` (the protocol of lm-evaluation-harness' log-likelihoods); the answer's
/// tokens' logprobs and top-20.
pub fn force(mode: &Mode, prompt: &[u32], answer: &[u32]) -> anyhow::Result<Forced> {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(answer);
    let body = json!({"prompt": ids, "echo": true, "max_tokens": 0, "logprobs": 20, "temperature": 0,
                      "return_tokens_as_token_ids": true, "kvgate": {"score_from": prompt.len()}});
    let v: Value = mode
        .post("/v1/completions")
        .send_string(&body.to_string())
        .map_err(|e| anyhow::anyhow!("scoring failed: {e}"))?
        .into_json()?;
    let lp = &v["choices"][0]["logprobs"];
    let (chosen, tops) = (lp["token_logprobs"].as_array(), lp["top_logprobs"].as_array());
    let (Some(chosen), Some(tops)) = (chosen, tops) else { anyhow::bail!("no logprobs in {v}") };
    let steps = (prompt.len()..ids.len())
        .map(|i| {
            let top = tops[i]
                .as_object()
                .map(|m| m.iter().map(|(t, l)| (id_of(&json!(t)), l.as_f64().unwrap_or(0.0))).collect());
            (chosen[i].as_f64().unwrap_or(f64::NEG_INFINITY), top.unwrap_or_default())
        })
        .collect();
    Ok(Forced { steps, chose_right: None })
}

/// Token ids of a raw text, without special tokens (`POST /tokenize`).
pub fn tokenize_text(url: &str, text: &str) -> anyhow::Result<Vec<u32>> {
    let resp: Value = ureq::post(&format!("{url}/tokenize"))
        .send_string(&json!({"prompt": text, "add_special_tokens": false}).to_string())
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
        .into_json()?;
    let ids = resp["tokens"].as_array().ok_or_else(|| anyhow::anyhow!("/tokenize answered {resp}"))?;
    Ok(ids.iter().map(|t| t.as_u64().unwrap_or(0) as u32).collect())
}

/// Which of `answers` (token ids of whole answers) the model finds most likely after
/// `prompt`, by the log-likelihood of the tokens where they differ — multiple choice the way
/// evaluation harnesses score it. Nothing is stored (`store: false`), so every candidate
/// sees the same cache.
pub fn choose(mode: &Mode, prompt: &[u32], answers: &[Vec<u32>]) -> anyhow::Result<usize> {
    let common = answers
        .iter()
        .skip(1)
        .fold(answers[0].len(), |n, a| n.min(a.iter().zip(&answers[0]).take_while(|(x, y)| x == y).count()));
    let mut best = (f64::NEG_INFINITY, 0);
    for (i, a) in answers.iter().enumerate() {
        let mut ids = prompt.to_vec();
        ids.extend_from_slice(a);
        let body = json!({"prompt": ids, "echo": true, "max_tokens": 0, "logprobs": 0, "temperature": 0,
                          "kvgate": {"score_from": prompt.len() + common, "store": false}});
        let v: Value = mode
            .post("/v1/completions")
            .send_string(&body.to_string())
            .map_err(|e| anyhow::anyhow!("scoring failed: {e}"))?
            .into_json()?;
        let lps = v["choices"][0]["logprobs"]["token_logprobs"].as_array().cloned().unwrap_or_default();
        let ll: f64 = lps.iter().skip(prompt.len() + common).filter_map(Value::as_f64).sum();
        if ll > best.0 {
            best = (ll, i);
        }
    }
    Ok(best.1)
}

/// Empties the server's chunk store.
pub fn flush(url: &str) -> anyhow::Result<()> {
    ureq::delete(&format!("{url}/admin/chunks"))
        .call()
        .map_err(|e| anyhow::anyhow!("flushing the chunk store: {e}"))?;
    Ok(())
}

/// Installs `component` as the selector of a server that loads `plugins_dir` (written aside,
/// renamed in, then reloaded) and returns the name it serves under.
pub fn install_selector(url: &str, plugins_dir: &Path, component: &Path) -> anyhow::Result<String> {
    let tmp = plugins_dir.join(".selector.wasm.bench");
    std::fs::copy(component, &tmp).map_err(|e| anyhow::anyhow!("copying {}: {e}", component.display()))?;
    std::fs::rename(&tmp, plugins_dir.join("selector.wasm"))?;
    let reload: Value = ureq::post(&format!("{url}/admin/plugins/reload")).call()?.into_json()?;
    let listed: Value = ureq::get(&format!("{url}/admin/plugins")).call()?.into_json()?;
    let selector = listed["data"].as_array().into_iter().flatten().find(|p| p["kind"] == "selector");
    let sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(std::fs::read(component)?).iter().map(|b| format!("{b:02x}")).collect()
    };
    match selector {
        Some(s) if s["sha256"] == sha.as_str() => Ok(s["name"].as_str().unwrap_or("?").to_string()),
        _ => anyhow::bail!("{} did not load as the selector: {reload}", component.display()),
    }
}
