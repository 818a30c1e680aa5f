//! The request queue and the generation loop.
//!
//! One worker thread takes prepared requests from a bounded queue (full → the API answers
//! 429), prefills, then decodes token by token, sending each token's text over an unbounded
//! tokio channel so that the engine never waits on a client. A request whose receiver is
//! gone (the client disconnected) is abandoned at the next token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::sampling::{self, Sampler, SamplingParams, TokenLogprob};
use super::template::ChatMessage;
use super::tokenizer::TextStream;
use super::{EngineError, LoadedModel, LogitsFor};
use crate::blend::{self, BlendOptions, CacheMode, CutInput, ReuseReport};
use crate::policy::Policies;
use crate::store::Store;

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
}

/// A request that has been tokenized and checked against the context.
pub struct Prepared {
    request: GenerateRequest,
    ids: Vec<u32>,
    /// Token indices where chat messages start: chunks never straddle them.
    segment_starts: Vec<usize>,
    max_tokens: usize,
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

/// What the engine sends back for a request.
#[derive(Debug)]
pub enum Event {
    /// The prompt, when echo was asked for; before any token.
    Prompt(Vec<PromptToken>),
    Token(TokenEvent),
    /// Text left over at the end, then the reason and the counts. Always the last event.
    Done {
        text: String,
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(EngineError),
}

/// Tuning of the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Requests that may wait for the worker; one more is refused with 429.
    pub queue_capacity: usize,
    /// Cache mode of requests that do not choose one.
    pub cache_mode: CacheMode,
    /// Chunking and recompute defaults.
    pub blend: BlendOptions,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { queue_capacity: 64, cache_mode: CacheMode::Compose, blend: BlendOptions::default() }
    }
}

/// What the engine itself counts (the API counts what it answers).
pub struct EngineStats {
    /// Tokens generated, including those of requests abandoned by their client.
    pub generated_tokens: AtomicU64,
    /// Requests dropped because their client went away.
    pub cancelled: AtomicU64,
    /// Prompt tokens looked up in the cache (prefix and compose modes), as vLLM counts them.
    pub cache_queried_tokens: AtomicU64,
    /// Runs spliced from stored chunks: whole chunks, and runs inside one.
    pub spans_whole: AtomicU64,
    pub spans_partial: AtomicU64,
    /// New chunks stored.
    pub chunks_stored: AtomicU64,
    /// Time to find the stored runs of a prompt.
    pub lookup_seconds: crate::metrics::Histogram,
    /// Prompt tokens whose KV came from the cache, and those of them recomputed.
    pub prompt_tokens_cached: AtomicU64,
    pub prompt_tokens_recomputed: AtomicU64,
}

const LOOKUP_BOUNDS: &[f64] = &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05];

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            generated_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            cache_queried_tokens: AtomicU64::new(0),
            spans_whole: AtomicU64::new(0),
            spans_partial: AtomicU64::new(0),
            chunks_stored: AtomicU64::new(0),
            lookup_seconds: crate::metrics::Histogram::new(LOOKUP_BOUNDS),
            prompt_tokens_cached: AtomicU64::new(0),
            prompt_tokens_recomputed: AtomicU64::new(0),
        }
    }
}

/// Work for the engine thread, in queue order.
enum Job {
    Generate { prepared: Prepared, events: UnboundedSender<Event> },
}

/// Handle to the running engine. Dropping every handle stops the worker after the
/// requests already queued.
pub struct Engine {
    model: Arc<LoadedModel>,
    stats: Arc<EngineStats>,
    store: Arc<Store>,
    policies: Option<Arc<Policies>>,
    queue: Option<SyncSender<Job>>,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the worker thread over `store`, with the plugin policies when given (else the
    /// built-in ones).
    pub fn start(
        model: Arc<LoadedModel>,
        options: EngineOptions,
        store: Arc<Store>,
        policies: Option<Arc<Policies>>,
    ) -> Self {
        let (tx, rx) = sync_channel(options.queue_capacity);
        let (m, stats) = (model.clone(), Arc::new(EngineStats::default()));
        let (st, chunks, pol) = (stats.clone(), store.clone(), policies.clone());
        let worker = std::thread::Builder::new()
            .name("kvgate-engine".into())
            .spawn(move || Worker { model: m, stats: st, store: chunks, policies: pol, options }.run(rx))
            .expect("spawn the engine thread");
        Self { model, stats, store, policies, queue: Some(tx), worker: Some(worker) }
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The chunk store the engine reads and extends.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The plugin policies, when the engine runs with them.
    pub fn policies(&self) -> Option<&Arc<Policies>> {
        self.policies.as_ref()
    }

    /// The token ids of a prompt, as a request with it would be prefilled.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        Ok(self.encode(prompt)?.0)
    }

    /// Token ids and the token indices where chat messages start.
    fn encode(&self, prompt: &Prompt) -> Result<(Vec<u32>, Vec<usize>), EngineError> {
        let m = &self.model;
        match prompt {
            Prompt::Text(t) => Ok((m.tokenizer.encode_prompt(t)?.ids, vec![0])),
            Prompt::Chat(msgs) => m.encode_chat(msgs),
            Prompt::Tokens(ids) => {
                let vocab = m.tokenizer.vocab_size();
                if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(EngineError::InvalidToken { id: bad, vocab });
                }
                Ok((ids.clone(), vec![0]))
            }
        }
    }

    /// Renders and tokenizes a request and checks that it fits in the context.
    pub fn prepare(&self, request: GenerateRequest) -> Result<Prepared, EngineError> {
        let m = &self.model;
        let (ids, segment_starts) = self.encode(&request.prompt)?;
        if ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let limit = m.model.config().context_length;
        let max_tokens = match request.max_tokens {
            Some(n) => n,
            None => limit.saturating_sub(ids.len()),
        };
        if ids.len() + max_tokens > limit || ids.len() >= limit {
            return Err(EngineError::ContextOverflow { prompt: ids.len(), completion: max_tokens, limit });
        }
        if let Some(b) = request.recompute_budget {
            if !(0.0..=1.0).contains(&b) {
                return Err(EngineError::InvalidOption(format!("recompute budget must be between 0 and 1, got {b}")));
            }
        }
        Ok(Prepared { request, ids, segment_starts, max_tokens })
    }

    /// Queues a prepared request; its events arrive on the returned channel.
    pub fn submit(&self, prepared: Prepared) -> Result<UnboundedReceiver<Event>, EngineError> {
        let (tx, rx) = unbounded_channel();
        self.enqueue(Job::Generate { prepared, events: tx })?;
        Ok(rx)
    }

    fn enqueue(&self, job: Job) -> Result<(), EngineError> {
        let queue = self.queue.as_ref().ok_or(EngineError::Stopped)?;
        match queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(EngineError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Stopped),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the queue ends the worker's loop once it has drained what was queued.
        self.queue.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The engine thread's state: the model, its counters, the chunk store.
struct Worker {
    model: Arc<LoadedModel>,
    stats: Arc<EngineStats>,
    store: Arc<Store>,
    policies: Option<Arc<Policies>>,
    options: EngineOptions,
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            match job {
                Job::Generate { events, .. } if events.is_closed() => {
                    self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                Job::Generate { prepared, events } => {
                    if let Err(e) = self.generate(prepared, &events) {
                        tracing::error!(error = %e, "generation failed");
                        let _ = events.send(Event::Error(e));
                    }
                }
            }
        }
    }

    /// Prefills the prompt (with whatever reuse its mode allows) and decodes until a stop
    /// condition, streaming events.
    fn generate(&mut self, p: Prepared, events: &UnboundedSender<Event>) -> Result<(), EngineError> {
        let m = self.model.clone();
        let stats = self.stats.clone();
        let Prepared { request, ids, segment_starts, max_tokens } = p;
        let mode = request.cache_mode.unwrap_or(self.options.cache_mode);
        let mut opts = self.options.blend.clone();
        if let Some(b) = request.recompute_budget {
            opts.recompute_budget = b;
        }
        let started = Instant::now();
        // The text is for a chunker plugin; no plugins or no cache, no text.
        let (text, offsets) = match (&self.policies, mode) {
            (Some(_), CacheMode::Prefix | CacheMode::Compose) => m.token_text(&ids),
            _ => (String::new(), Vec::new()),
        };
        let input = CutInput {
            ids: &ids,
            offsets: &offsets,
            text: &text,
            segment_starts: &segment_starts,
            chunk_tokens: opts.chunk_tokens,
        };
        let read_only = crate::store::ReadOnly(&*self.store);
        let store: &dyn crate::store::ChunkStore = if request.store { &*self.store } else { &read_only };
        let prefill = match &self.policies {
            // The versions serving now stay with this request whatever reloads meanwhile.
            Some(p) => {
                blend::prefill_with(&m.model, &input, mode, &opts, store, &p.for_request(opts.chunk_head_tokens))?
            }
            None => blend::prefill(&m.model, &ids, &segment_starts, mode, &opts, store)?,
        };
        let mut usage = Usage {
            prompt_tokens: ids.len(),
            cached_tokens: prefill.report.reused_tokens,
            reuse: prefill.report,
            mode: Some(mode),
            prefill_seconds: started.elapsed().as_secs_f64(),
            ..Usage::default()
        };
        if mode != CacheMode::Off {
            self.record(&prefill.report);
        }
        let (mut cache, mut logits) = (prefill.cache, prefill.logits);
        if request.echo {
            let from = request.score_from.clamp(1, ids.len());
            let scored = match request.logprobs {
                Some(top) => m.model.score(&ids, from, &cache, top)?,
                None => Vec::new(),
            };
            let mut scored = scored.into_iter();
            let prompt = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| PromptToken { id, logprob: if i < from { None } else { scored.next() } })
                .collect();
            if events.send(Event::Prompt(prompt)).is_err() {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        let decode_started = Instant::now();

        let mut sampler = Sampler::new(request.sampling.clone());
        let mut stops = StopStrings::new(&request.stop);
        let mut text = TextStream::default();
        let mut finish = FinishReason::Length;
        let mut pos = ids.len() as u32;
        for step in 0..max_tokens {
            let id = sampler.sample(&logits);
            let logprob = request.logprobs.map(|n| sampling::logprobs(&logits, id, n));
            usage.completion_tokens += 1;
            stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            if !request.ignore_eos && m.tokenizer.is_end_of_generation(id) {
                finish = FinishReason::Stop;
                break;
            }
            let (out, stopped) = stops.push(&text.push(m.tokenizer.token_bytes(id)));
            if events.send(Event::Token(TokenEvent { id, text: out, logprob })).is_err() {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                return Ok(()); // the client is gone
            }
            if stopped {
                finish = FinishReason::Stop;
                break;
            }
            if step + 1 == max_tokens {
                break;
            }
            logits = m.model.forward(&[id], &[pos], &mut cache, &LogitsFor::Last, false)?.logits;
            pos += 1;
        }
        usage.decode_seconds = decode_started.elapsed().as_secs_f64();
        let rest =
            if finish == FinishReason::Stop && stops.stopped { String::new() } else { stops.finish(&text.finish()) };
        let _ = events.send(Event::Done { text: rest, finish_reason: finish, usage });
        Ok(())
    }

    fn record(&self, r: &ReuseReport) {
        let s = &self.stats;
        s.cache_queried_tokens.fetch_add((r.reused_tokens + r.computed_tokens) as u64, Ordering::Relaxed);
        s.spans_whole.fetch_add((r.spans - r.partial_spans) as u64, Ordering::Relaxed);
        s.spans_partial.fetch_add(r.partial_spans as u64, Ordering::Relaxed);
        s.chunks_stored.fetch_add(r.chunks_stored as u64, Ordering::Relaxed);
        s.lookup_seconds.observe(r.timings.lookup_us as f64 * 1e-6);
        s.prompt_tokens_cached.fetch_add(r.reused_tokens as u64, Ordering::Relaxed);
        s.prompt_tokens_recomputed.fetch_add(r.recomputed_tokens as u64, Ordering::Relaxed);
    }
}

/// Holds back generated text that might be the start of a stop string.
struct StopStrings {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopStrings {
    fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new(), stopped: false }
    }

    /// Adds text; returns what is safe to emit and whether a stop string was hit
    /// (the stop string itself is never emitted).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // The longest suffix of `held` that is a proper prefix of some stop string stays held.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        (out, false)
    }

    /// Flushes what was held (generation ended without completing a stop string).
    fn finish(&mut self, tail: &str) -> String {
        let (mut out, stopped) = self.push(tail);
        if !stopped {
            out.push_str(&std::mem::take(&mut self.held));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_hold_back_prefixes_and_cut_at_the_match() {
        let mut s = StopStrings::new(&["\n\nUser:".to_string()]);
        assert_eq!(s.push("Hello"), ("Hello".into(), false));
        assert_eq!(s.push(" world\n"), (" world".into(), false));
        assert_eq!(s.push("\nUs"), ("".into(), false));
        assert_eq!(s.push("er: hi"), ("".into(), true));
    }

    #[test]
    fn held_text_is_released_when_the_stop_string_does_not_complete() {
        let mut s = StopStrings::new(&["END".to_string()]);
        assert_eq!(s.push("the EN"), ("the ".into(), false));
        assert_eq!(s.push("D"), ("".into(), true));
        let mut s = StopStrings::new(&["END".to_string()]);
        assert_eq!(s.push("the EN"), ("the ".into(), false));
        assert_eq!(s.finish(""), "EN");
    }

    #[test]
    fn no_stop_strings_pass_everything_through() {
        let mut s = StopStrings::new(&[]);
        assert_eq!(s.push("é and more"), ("é and more".into(), false));
    }
}
