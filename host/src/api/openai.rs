//! The OpenAI request and response shapes, and their validation.
//!
//! Owns turning a client's JSON into a [`GenerateRequest`] — every field a client can get
//! wrong is checked here and answered with a 400 that names it — and turning engine events
//! back into OpenAI's JSON (whole responses and SSE chunks). Unknown fields are ignored, as
//! OpenAI-compatible servers do, so that stock clients work.

use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::engine::{ChatMessage, SamplingParams, TokenLogprob, Tokenizer};
use crate::scheduler::{GenerateRequest, Prompt, Usage};

/// Largest `top_logprobs` / `logprobs` accepted (vLLM's default limit).
const MAX_TOP_LOGPROBS: usize = 20;

/// Most choices one request may ask for (`n`): they share one prefill, each decodes.
const MAX_CHOICES: usize = 16;

/// Fields shared by both endpoints.
#[derive(Debug, Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    #[serde(default)]
    ignore_eos: bool,
    /// vLLM's: tokens in logprobs as `token_id:<id>` instead of their text.
    #[serde(default)]
    return_tokens_as_token_ids: bool,
    /// kvgate's own options: `{"cache": "off|prefix|compose", "recompute_budget": 0.15}`.
    kvgate: Option<KvgateOptions>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KvgateOptions {
    cache: Option<String>,
    recompute_budget: Option<f64>,
    /// With `echo` and `logprobs`: score the prompt's tokens from this index on only (the
    /// earlier ones come back with `null` logprobs), so scoring an answer after a long prompt
    /// costs what the answer costs.
    score_from: Option<usize>,
    /// `false`: reuse what the chunk store holds, but store nothing from this request.
    store: Option<bool>,
    /// A shared namespace (declared by the operator) to store this request's new chunks in,
    /// instead of the tenant's own.
    namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    #[serde(flatten)]
    common: Common,
    messages: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    #[serde(flatten)]
    common: Common,
    prompt: Option<Value>,
    logprobs: Option<i64>,
    echo: Option<bool>,
    suffix: Option<Value>,
    best_of: Option<i64>,
}

/// Which endpoint a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// A validated request and how to answer it.
#[derive(Debug)]
pub struct ParsedRequest {
    pub endpoint: Endpoint,
    pub generate: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    /// Tokens in logprobs as `token_id:<id>`.
    pub token_ids: bool,
    /// The shared namespace asked to store in (`kvgate.namespace`), checked by the caller.
    pub namespace: Option<String>,
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(ApiError::malformed_json)?;
    if !value.is_object() {
        return Err(ApiError::invalid(None, "the request body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::invalid(None, format!("invalid request: {e}")))
}

/// Parses and validates a `/v1/chat/completions` or `/v1/completions` body.
pub fn parse(endpoint: Endpoint, body: &[u8], served_model: &str) -> Result<ParsedRequest, ApiError> {
    let (common, prompt, logprobs, echo) = match endpoint {
        Endpoint::Chat => {
            let b: ChatBody = parse_json(body)?;
            let messages = parse_messages(b.messages)?;
            let logprobs = match (b.logprobs.unwrap_or(false), b.top_logprobs) {
                (false, None) => None,
                (false, Some(_)) => {
                    return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
                }
                (true, top) => Some(count("top_logprobs", top.unwrap_or(0), MAX_TOP_LOGPROBS)?),
            };
            (b.common, Prompt::Chat(messages), logprobs, false)
        }
        Endpoint::Completion => {
            let b: CompletionBody = parse_json(body)?;
            if b.suffix.as_ref().is_some_and(|s| !s.is_null()) {
                return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
            }
            if b.best_of.is_some_and(|n| n != 1) {
                return Err(ApiError::invalid("best_of", "only `best_of: 1` is supported"));
            }
            let logprobs = b.logprobs.map(|n| count("logprobs", n, MAX_TOP_LOGPROBS)).transpose()?;
            (b.common, parse_prompt(b.prompt)?, logprobs, b.echo.unwrap_or(false))
        }
    };
    if let Some(model) = &common.model {
        if model != served_model {
            return Err(ApiError::model_not_found(model, served_model));
        }
    }
    let n = match common.n {
        None => 1,
        Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
        Some(n) => return Err(ApiError::invalid("n", format!("`n` must be between 1 and {MAX_CHOICES}, got {n}"))),
    };
    if echo && n > 1 {
        return Err(ApiError::invalid("n", "`echo` is supported with `n: 1` only"));
    }
    let max_tokens = match common.max_completion_tokens.or(common.max_tokens) {
        None => None,
        // Scoring a prompt (lm-evaluation-harness' log-likelihoods) generates nothing.
        Some(0) if echo => Some(0),
        Some(n) if n < 1 => {
            let also = if endpoint == Endpoint::Completion { " (0 is allowed with `echo`)" } else { "" };
            return Err(ApiError::invalid("max_tokens", format!("`max_tokens` must be at least 1{also}, got {n}")));
        }
        Some(n) => Some(n as usize),
    };
    let temperature = range("temperature", common.temperature, 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = range("top_p", common.top_p, 0.0, 1.0)?.unwrap_or(1.0);
    if top_p <= 0.0 {
        return Err(ApiError::invalid("top_p", "`top_p` must be greater than 0"));
    }
    let top_k = match common.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(ApiError::invalid("top_k", format!("`top_k` must be -1 (off) or positive, got {k}"))),
    };
    let presence_penalty = range("presence_penalty", common.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let frequency_penalty = range("frequency_penalty", common.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let stop = parse_stop(common.stop)?;
    let kv = common.kvgate.unwrap_or_default();
    let cache_mode = kv.cache.as_deref().map(parse_cache_mode).transpose()?;
    let recompute_budget = kv.recompute_budget.map(parse_budget).transpose()?;
    if kv.score_from.is_some() && !(echo && logprobs.is_some()) {
        return Err(ApiError::invalid("kvgate.score_from", "`score_from` needs `echo: true` and `logprobs`"));
    }
    let include_usage = match (&common.stream_options, common.stream) {
        (Some(_), false) => {
            return Err(ApiError::invalid("stream_options", "`stream_options` is only allowed with `stream: true`"));
        }
        (Some(o), true) => o.include_usage,
        (None, _) => false,
    };
    Ok(ParsedRequest {
        endpoint,
        generate: GenerateRequest {
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k,
                seed: common.seed.map(|s| s as u64),
                presence_penalty: presence_penalty as f32,
                frequency_penalty: frequency_penalty as f32,
            },
            stop,
            logprobs,
            echo,
            score_from: kv.score_from.unwrap_or(1),
            n,
            store: kv.store.unwrap_or(true),
            ignore_eos: common.ignore_eos,
            cache_mode,
            recompute_budget,
            scope: Default::default(),
            request_id: "".into(),
        },
        stream: common.stream,
        include_usage,
        token_ids: common.return_tokens_as_token_ids,
        namespace: kv.namespace,
    })
}

#[derive(Debug, Deserialize)]
struct TokenizeBody {
    model: Option<String>,
    prompt: Option<Value>,
    messages: Option<Value>,
    add_special_tokens: Option<bool>,
}

/// Parses a `/tokenize` body (vLLM's shape): `prompt` (text, or `[text]`) or `messages` (a
/// conversation, rendered with the chat template and its generation prompt, as
/// `/v1/chat/completions` renders it); and whether a prompt gets the model's special tokens
/// (its BOS, when it asks for one; `add_special_tokens`, default true).
pub fn parse_tokenize(body: &[u8], served_model: &str) -> Result<(Prompt, bool), ApiError> {
    let b: TokenizeBody = parse_json(body)?;
    if let Some(model) = b.model.as_deref().filter(|m| *m != served_model) {
        return Err(ApiError::model_not_found(model, served_model));
    }
    let prompt = match (b.prompt, b.messages) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("messages", "give either `prompt` or `messages`, not both"));
        }
        (None, Some(m)) => Prompt::Chat(parse_messages(Some(m))?),
        (p, None) => match parse_prompt(p)? {
            Prompt::Tokens(_) => return Err(ApiError::invalid("prompt", "`prompt` must be text to tokenize")),
            prompt => prompt,
        },
    };
    Ok((prompt, b.add_special_tokens.unwrap_or(true)))
}

/// Parses a `/detokenize` body: `{"tokens": [ids]}`.
pub fn parse_detokenize(body: &[u8]) -> Result<Vec<u32>, ApiError> {
    let v: Value = parse_json(body)?;
    let bad = || ApiError::invalid("tokens", "`tokens` must be an array of token ids");
    let items = v.get("tokens").and_then(Value::as_array).ok_or_else(bad)?;
    items.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(bad)).collect()
}

/// `off`, `prefix` or `compose` (the `x-kvgate-cache` header or `kvgate.cache`).
pub fn parse_cache_mode(s: &str) -> Result<crate::blend::CacheMode, ApiError> {
    s.trim().parse().map_err(|e: String| ApiError::invalid("kvgate.cache", e))
}

/// A share of reused tokens to recompute, 0..=1 (`x-kvgate-recompute-budget` or
/// `kvgate.recompute_budget`).
pub fn parse_budget(b: f64) -> Result<f32, ApiError> {
    if !(0.0..=1.0).contains(&b) {
        return Err(ApiError::invalid(
            "kvgate.recompute_budget",
            format!("the recompute budget must be between 0 and 1, got {b}"),
        ));
    }
    Ok(b as f32)
}

/// The `kvgate` object of responses: what the chunk cache did.
pub fn kvgate_json(u: &Usage) -> Value {
    let r = &u.reuse;
    json!({
        "mode": u.mode.map(|m| m.as_str()),
        "reused_tokens": r.reused_tokens,
        "recomputed_tokens": r.recomputed_tokens,
        "computed_tokens": r.computed_tokens,
        "spans": r.spans,
        "partial_spans": r.partial_spans,
        "chunks_hit": r.chunks_hit,
        "chunks_stored": r.chunks_stored,
        "timings": r.timings,
    })
}

fn range(param: &'static str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => {
            Err(ApiError::invalid(param, format!("`{param}` must be between {lo} and {hi}, got {x}")))
        }
        v => Ok(v),
    }
}

fn count(param: &'static str, n: i64, max: usize) -> Result<usize, ApiError> {
    if n < 0 || n as usize > max {
        return Err(ApiError::invalid(param, format!("`{param}` must be between 0 and {max}, got {n}")));
    }
    Ok(n as usize)
}

fn parse_messages(v: Option<Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(items)) = v else {
        return Err(ApiError::invalid("messages", "`messages` must be a non-empty array"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must be a non-empty array"));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid("messages", format!("messages[{i}] has no string `role`")))?;
            if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(ApiError::invalid("messages", format!("messages[{i}] has an unknown role `{role}`")));
            }
            let content = match m.get("content") {
                None | Some(Value::Null) if role == "assistant" => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t),
                        (kind, _) => Err(ApiError::invalid(
                            "messages",
                            format!("messages[{i}]: content part of type {kind:?} is not supported (text only)"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                _ => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("messages[{i}] needs `content` as a string or an array of text parts"),
                    ));
                }
            };
            // "developer" is OpenAI's new name for the system role.
            let role = if role == "developer" { "system" } else { role };
            Ok(ChatMessage { role: role.to_string(), content })
        })
        .collect()
}

fn parse_prompt(v: Option<Value>) -> Result<Prompt, ApiError> {
    let bad =
        || ApiError::invalid("prompt", "`prompt` must be a string, an array of one string, or an array of token ids");
    match v {
        Some(Value::String(s)) => Ok(Prompt::Text(s)),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [] => Err(ApiError::invalid("prompt", "the prompt is empty")),
            items if items.iter().all(Value::is_u64) => {
                Ok(Prompt::Tokens(items.iter().map(|x| x.as_u64().unwrap_or(0) as u32).collect()))
            }
            // One tokenized prompt in a batch of one (lm-evaluation-harness sends this).
            [Value::Array(ids)] if !ids.is_empty() && ids.iter().all(Value::is_u64) => {
                Ok(Prompt::Tokens(ids.iter().map(|x| x.as_u64().unwrap_or(0) as u32).collect()))
            }
            items if items.iter().all(Value::is_array) => {
                Err(ApiError::invalid("prompt", "batched prompts are not supported: send one prompt per request"))
            }
            items if items.iter().all(Value::is_string) => {
                Err(ApiError::invalid("prompt", "batched prompts are not supported: send one prompt per request"))
            }
            _ => Err(bad()),
        },
        None => Err(ApiError::invalid("prompt", "`prompt` is required")),
        _ => Err(bad()),
    }
}

fn parse_stop(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s]),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|s| match s {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid("stop", "`stop` must be a string or an array of strings")),
            })
            .collect(),
        Some(_) => Err(ApiError::invalid("stop", "`stop` must be a string or an array of strings")),
    }
}

/// The `usage` object.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// A token's logprob and the most likely tokens at its position.
type Scored = (TokenLogprob, Vec<TokenLogprob>);

/// Log-probability entries of tokens (generated, or echoed from the prompt), accumulated for
/// one response or chunk.
#[derive(Default)]
pub struct Logprobs {
    /// Each token, and its logprob and top alternatives (`None`: an echoed prompt token that
    /// was not scored).
    entries: Vec<(u32, Option<Scored>)>,
    /// Tokens as `token_id:<id>` (vLLM's `return_tokens_as_token_ids`).
    pub token_ids: bool,
}

impl Logprobs {
    pub fn new(token_ids: bool) -> Self {
        Self { entries: Vec::new(), token_ids }
    }

    pub fn push(&mut self, lp: Scored) {
        self.entries.push((lp.0.id, Some(lp)));
    }

    /// A prompt token (without a logprob when it is the first).
    pub fn push_prompt(&mut self, id: u32, lp: Option<Scored>) {
        self.entries.push((id, lp));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn token(&self, tok: &Tokenizer, id: u32) -> String {
        match self.token_ids {
            true => format!("token_id:{id}"),
            false => String::from_utf8_lossy(tok.token_bytes(id)).into_owned(),
        }
    }

    /// Chat shape: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
    pub fn chat_json(&self, tok: &Tokenizer) -> Value {
        let entry = |t: &TokenLogprob| json!({"token": self.token(tok, t.id), "logprob": t.logprob, "bytes": tok.token_bytes(t.id)});
        let content: Vec<Value> = self
            .entries
            .iter()
            .filter_map(|(_, lp)| lp.as_ref())
            .map(|(chosen, top)| {
                let mut e = entry(chosen);
                e["top_logprobs"] = Value::Array(top.iter().map(entry).collect());
                e
            })
            .collect();
        json!({"content": content})
    }

    /// Completions shape: parallel arrays, `top_logprobs` as token → logprob maps (`null` for
    /// an echoed prompt's first token). `offset` is the text offset of the first token.
    pub fn completion_json(&self, tok: &Tokenizer, mut offset: usize) -> Value {
        let mut tokens = Vec::new();
        let mut token_logprobs = Vec::new();
        let mut top_logprobs = Vec::new();
        let mut text_offset = Vec::new();
        for (id, lp) in &self.entries {
            text_offset.push(offset);
            offset += tok.token_bytes(*id).len();
            tokens.push(self.token(tok, *id));
            match lp {
                Some((chosen, top)) => {
                    token_logprobs.push(json!(chosen.logprob));
                    let map: serde_json::Map<String, Value> =
                        top.iter().map(|t| (self.token(tok, t.id), json!(t.logprob))).collect();
                    top_logprobs.push(Value::Object(map));
                }
                None => {
                    token_logprobs.push(Value::Null);
                    top_logprobs.push(Value::Null);
                }
            }
        }
        json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ParsedRequest, ApiError> {
        parse(Endpoint::Chat, body.as_bytes(), "m")
    }

    #[test]
    fn minimal_chat_request_gets_defaults() {
        let p = chat(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert!(!p.stream);
        assert_eq!(p.generate.max_tokens, None);
        assert_eq!(p.generate.sampling.temperature, 1.0);
        assert!(p.generate.logprobs.is_none());
    }

    #[test]
    fn each_bad_field_is_named() {
        for (body, param) in [
            (r#"{"messages":[]}"#, "messages"),
            (r#"{"messages":[{"role":"wizard","content":"x"}]}"#, "messages"),
            (r#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#, "temperature"),
            (r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#, "top_p"),
            (r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, "max_tokens"),
            (r#"{"messages":[{"role":"user","content":"x"}],"n":0}"#, "n"),
            (r#"{"messages":[{"role":"user","content":"x"}],"n":17}"#, "n"),
            (r#"{"messages":[{"role":"user","content":"x"}],"stop":7}"#, "stop"),
            (r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":50}"#, "top_logprobs"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
                "stream_options",
            ),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    #[test]
    fn wrong_model_is_404_and_bad_json_is_400() {
        let e = chat(r#"{"model":"gpt-4","messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.status, 404);
        assert_eq!(chat("{not json").unwrap_err().code, "invalid_json");
        assert_eq!(chat("[1,2]").unwrap_err().status, 400);
        assert_eq!(chat(r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#).unwrap_err().status, 400);
    }

    #[test]
    fn completion_prompt_forms() {
        let p = |b: &str| parse(Endpoint::Completion, b.as_bytes(), "m");
        assert!(matches!(p(r#"{"prompt":"a"}"#).unwrap().generate.prompt, Prompt::Text(_)));
        assert!(matches!(p(r#"{"prompt":["a"]}"#).unwrap().generate.prompt, Prompt::Text(_)));
        assert!(matches!(p(r#"{"prompt":[1,2,3]}"#).unwrap().generate.prompt, Prompt::Tokens(_)));
        assert_eq!(p(r#"{"prompt":["a","b"]}"#).unwrap_err().param.as_deref(), Some("prompt"));
        assert!(p(r#"{"prompt":"a","echo":true,"max_tokens":0}"#).unwrap().generate.echo);
        assert!(matches!(p(r#"{"prompt":[[1,2]]}"#).unwrap().generate.prompt, Prompt::Tokens(_)));
        assert_eq!(p(r#"{"prompt":[[1],[2]]}"#).unwrap_err().param.as_deref(), Some("prompt"));
        assert_eq!(p(r#"{"prompt":"a","logprobs":-1}"#).unwrap_err().param.as_deref(), Some("logprobs"));
        assert_eq!(p("{}").unwrap_err().param.as_deref(), Some("prompt"));
    }

    #[test]
    fn content_parts_are_joined() {
        let p =
            chat(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#)
                .unwrap();
        let Prompt::Chat(m) = p.generate.prompt else { panic!() };
        assert_eq!(m[0].content, "ab");
        let e = chat(r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#).unwrap_err();
        assert!(e.message.contains("image_url"));
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Any JSON value, nested a few levels.
        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    proptest::collection::hash_map("[a-z_]{1,8}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        const FIELDS: [&str; 24] = [
            "model",
            "messages",
            "prompt",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "top_k",
            "seed",
            "stop",
            "stream",
            "stream_options",
            "n",
            "presence_penalty",
            "frequency_penalty",
            "logprobs",
            "top_logprobs",
            "echo",
            "suffix",
            "best_of",
            "ignore_eos",
            "kvgate",
            "return_tokens_as_token_ids",
            "user",
        ];

        /// A request object whose fields are the real ones, with any values.
        fn request() -> impl Strategy<Value = Value> {
            proptest::collection::vec((proptest::sample::select(&FIELDS[..]), json_value()), 0..10)
                .prop_map(|fields| Value::Object(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

            /// Whatever the body, parsing answers Ok or an OpenAI-shaped 4xx — never a panic.
            #[test]
            fn any_bytes_are_answered(body in proptest::collection::vec(any::<u8>(), 0..300)) {
                for endpoint in [Endpoint::Chat, Endpoint::Completion] {
                    if let Err(e) = parse(endpoint, &body, "m") {
                        prop_assert!(e.status.is_client_error());
                    }
                }
                let _ = parse_tokenize(&body, "m");
                let _ = parse_detokenize(&body);
            }

            #[test]
            fn any_field_values_are_answered(body in request()) {
                let bytes = body.to_string().into_bytes();
                for endpoint in [Endpoint::Chat, Endpoint::Completion] {
                    match parse(endpoint, &bytes, "m") {
                        Ok(p) => prop_assert!(p.generate.n >= 1),
                        Err(e) => {
                            prop_assert!(e.status.is_client_error(), "{e:?}");
                            prop_assert!(!e.message.is_empty());
                        }
                    }
                }
                let _ = parse_tokenize(&bytes, "m");
            }
        }
    }
}
