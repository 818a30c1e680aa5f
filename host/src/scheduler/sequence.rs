//! One request inside the scheduler: its prefill while it runs, then one [`Choice`] per `n`,
//! each decoding on its own copy of the prompt's cache.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::SchedulerStats;
use super::request::{Event, FinishReason, TokenEvent, Usage};
use crate::blend::{CacheMode, Prefill, Prefilling};
use crate::engine::sampling::{self, Sampler, SamplingParams};
use crate::engine::tokenizer::TextStream;
use crate::engine::{KvCache, Tokenizer};
use crate::policy::RequestPolicy;

/// A request admitted or waiting: what to prefill and how, and where its events go.
pub(super) struct Admitted {
    /// Arrival order.
    pub seq: u64,
    pub submitted: Instant,
    /// When its prefill began (its first slice), and how many later requests had begun before.
    pub started: Option<(Instant, usize)>,
    pub prefill: Prefilling,
    /// The plugin versions serving when it was admitted (`None`: built-in policies).
    pub policy: Option<RequestPolicy>,
    pub mode: CacheMode,
    pub prompt_tokens: usize,
    /// The prompt's token ids (echo scores them).
    pub ids: Vec<u32>,
    /// `Some((from, logprobs))`: echo the prompt, scored from token `from` on.
    pub echo: Option<(usize, Option<usize>)>,
    /// Whether what the prompt brings new is stored.
    pub store: bool,
    pub decode: DecodeParams,
    pub events: UnboundedSender<Event>,
    /// KV bytes held against the scheduler's budget.
    pub reserved: u64,
    /// The request's id (its log lines carry it).
    pub request_id: std::sync::Arc<str>,
}

/// How the choices of a request decode.
#[derive(Clone)]
pub(super) struct DecodeParams {
    pub n: usize,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    pub ignore_eos: bool,
}

/// One choice of a request, decoding.
pub(super) struct Choice {
    /// The request's arrival number.
    pub seq: u64,
    pub index: usize,
    pub events: UnboundedSender<Event>,
    pub cache: KvCache,
    /// The token to feed next, at `pos`.
    pub next: u32,
    pub pos: u32,
    sampler: Sampler,
    stops: StopStrings,
    text: TextStream,
    usage: Usage,
    params: DecodeParams,
    decode_started: Instant,
    /// KV bytes held against the scheduler's budget.
    pub reserved: u64,
}

/// What a choice needs after seeing a distribution.
pub(super) enum Next {
    /// Feed this token (at `pos`) in the next decode step.
    Feed,
    /// The choice ended (its `Done` was sent), or its client left.
    Ended,
}

impl Choice {
    /// The choices of a finished prefill; `n` copies of its cache.
    pub fn fork(a: &Admitted, prefill: Prefill, usage: Usage) -> Vec<(Choice, Vec<f32>)> {
        let n = a.decode.n.max(1);
        let reserved = a.reserved / n as u64;
        let Prefill { cache, logits, .. } = prefill;
        let pos = cache.len() as u32;
        let mut caches = vec![cache];
        while caches.len() < n {
            caches.push(caches[0].clone());
        }
        caches
            .into_iter()
            .enumerate()
            .map(|(index, cache)| {
                let mut sampling = a.decode.sampling.clone();
                // Choices of one request differ: each its own seed from the request's.
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(index as u64));
                let choice = Choice {
                    seq: a.seq,
                    index,
                    events: a.events.clone(),
                    cache,
                    next: 0,
                    pos,
                    sampler: Sampler::new(sampling),
                    stops: StopStrings::new(&a.decode.stop),
                    text: TextStream::default(),
                    usage,
                    params: a.decode.clone(),
                    decode_started: Instant::now(),
                    reserved,
                };
                (choice, logits.clone())
            })
            .collect()
    }

    /// Samples the next token from `logits` and sends it; whether the choice goes on.
    pub fn advance(&mut self, logits: &[f32], tokenizer: &Tokenizer, stats: &SchedulerStats) -> Next {
        if self.usage.completion_tokens == self.params.max_tokens {
            return self.finish(FinishReason::Length);
        }
        let id = self.sampler.sample(logits);
        let logprob = self.params.logprobs.map(|n| sampling::logprobs(logits, id, n));
        self.usage.completion_tokens += 1;
        stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if !self.params.ignore_eos && tokenizer.is_end_of_generation(id) {
            return self.finish(FinishReason::Stop);
        }
        let (out, stopped) = self.stops.push(&self.text.push(tokenizer.token_bytes(id)));
        let token = TokenEvent { id, text: out, logprob };
        if self.events.send(Event::Token { index: self.index, token }).is_err() {
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return Next::Ended; // the client is gone
        }
        if stopped {
            return self.finish(FinishReason::Stop);
        }
        if self.usage.completion_tokens == self.params.max_tokens {
            return self.finish(FinishReason::Length);
        }
        self.next = id;
        Next::Feed
    }

    /// The token was fed: the next one sits one position on.
    pub fn fed(&mut self) {
        self.pos += 1;
    }

    fn finish(&mut self, reason: FinishReason) -> Next {
        self.usage.decode_seconds = self.decode_started.elapsed().as_secs_f64();
        let rest = match reason == FinishReason::Stop && self.stops.stopped {
            true => String::new(),
            false => self.stops.finish(&self.text.finish()),
        };
        let done = Event::Done { index: self.index, text: rest, finish_reason: reason, usage: self.usage };
        let _ = self.events.send(done);
        Next::Ended
    }
}

/// Holds back generated text that might be the start of a stop string.
pub(super) struct StopStrings {
    stops: Vec<String>,
    held: String,
    pub stopped: bool,
}

impl StopStrings {
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new(), stopped: false }
    }

    /// Adds text; returns what is safe to emit and whether a stop string was hit
    /// (the stop string itself is never emitted).
    pub fn push(&mut self, text: &str) -> (String, bool) {
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
    pub fn finish(&mut self, tail: &str) -> String {
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
