//! What a request is on its way through the scheduler: what the API hands over, and what
//! comes back — events, usage, why generation ended.

use crate::blend::{CacheMode, ReuseReport};
use crate::engine::{ChatMessage, EngineError, SamplingParams, TokenLogprob};
use crate::store::Scope;

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A raw completion prompt (`/v1/completions`).
    Text(String),
    /// A conversation, rendered with the chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// One generation request, as the API hands it over.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    /// `None`: up to the end of the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// `Some(n)`: report each token's log-probability and the `n` most likely tokens.
    pub logprobs: Option<usize>,
    /// Send the prompt's tokens back first ([`Event::Prompt`]), with their log-probabilities
    /// when `logprobs` is set (`/v1/completions`' `echo`).
    pub echo: bool,
    /// With `echo`, the first prompt token whose logprob is computed (earlier: `None`).
    pub score_from: usize,
    /// Whether what this prompt brings new is stored in the chunk cache.
    pub store: bool,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// How this request may use the chunk cache (`None`: the server's defaults).
    pub cache_mode: Option<CacheMode>,
    /// Share of reused tokens to recompute, 0..=1 (`None`: the server's default).
    pub recompute_budget: Option<f32>,
    /// Choices to generate from the one prefill (OpenAI's `n`).
    pub n: usize,
    /// The chunk-store namespaces it reads and writes (its tenant's; see [`Scope`]).
    pub scope: Scope,
    /// Its id (`x-request-id`), carried by its log lines.
    pub request_id: std::sync::Arc<str>,
}

impl GenerateRequest {
    /// A request for `prompt` with the defaults: greedy, up to the end of the context, one
    /// choice, the server's cache mode and budget, no logprobs, nothing echoed.
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            max_tokens: None,
            sampling: SamplingParams { temperature: 0.0, ..Default::default() },
            stop: Vec::new(),
            logprobs: None,
            echo: false,
            score_from: 1,
            store: true,
            ignore_eos: false,
            cache_mode: None,
            recompute_budget: None,
            n: 1,
            scope: Scope::default(),
            request_id: "".into(),
        }
    }
}

/// A request that has been tokenized and checked against the context.
pub struct Prepared {
    pub(super) request: GenerateRequest,
    pub(super) ids: Vec<u32>,
    /// Token indices where chat messages start: chunks never straddle them.
    pub(super) segment_starts: Vec<usize>,
    pub(super) max_tokens: usize,
}

impl Prepared {
    pub fn prompt_tokens(&self) -> usize {
        self.ids.len()
    }
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from cache.
    pub cached_tokens: usize,
    /// Time spent in prefill, seconds.
    pub prefill_seconds: f64,
    /// Time spent decoding after the first token, seconds.
    pub decode_seconds: f64,
    /// What the chunk cache did for the prompt.
    pub reuse: ReuseReport,
    pub mode: Option<CacheMode>,
    /// Time from submission to the start of the prefill, seconds.
    pub queued_seconds: f64,
    /// Requests submitted after this one whose prefill started before it did (0 under the
    /// scheduler's first-come order; the tests hold it to that).
    pub overtaken: usize,
}

/// One generated token.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub id: u32,
    /// Text that became final with this token (may be empty while a stop string or a
    /// UTF-8 character is incomplete).
    pub text: String,
    /// The token's log-probability and the most likely alternatives, when asked for.
    pub logprob: Option<(TokenLogprob, Vec<TokenLogprob>)>,
}

/// A prompt token as echoed back: its log-probability given the tokens before it and the
/// most likely alternatives, as the model sees them with the KV the cache mode gave it
/// (`None` for the first token, and when no logprobs were asked for).
#[derive(Debug, Clone)]
pub struct PromptToken {
    pub id: u32,
    pub logprob: Option<(TokenLogprob, Vec<TokenLogprob>)>,
}

/// What the scheduler sends back for a request. With `n` choices, `Token` and `Done` say
/// which (`index`); the request ends when every choice is done.
#[derive(Debug)]
pub enum Event {
    /// The prompt, when echo was asked for; before any token.
    Prompt(Vec<PromptToken>),
    Token {
        index: usize,
        token: TokenEvent,
    },
    /// Text left over at the end of a choice, then the reason and its counts. A choice's last
    /// event.
    Done {
        index: usize,
        text: String,
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(EngineError),
}
