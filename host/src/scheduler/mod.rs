//! The scheduler: admits requests, advances every running sequence one token per step in one
//! batched forward, and slices prefills — compose's recompute included — between those steps.
//! The one place that decides what runs next.
//!
//! Sits above `engine` (the model) and `blend` (one prompt's prefill, resumable); it knows the
//! chunk store and the policy plugins only to hand them to `blend`. One thread runs the loop
//! and never awaits; events go back over unbounded channels, so a slow client never stalls it.
//!
//! Each turn of the loop:
//! 1. new requests are taken from the bounded queue (full: the API answers 429);
//! 2. requests and choices whose client left are dropped (counted);
//! 3. waiting requests are admitted in arrival order while the running ones are fewer than
//!    `max_running` and their KV fits the budget (`kv_budget_bytes`; a request that fits on
//!    its own is never refused for good: it waits until the others leave room);
//! 4. one decode step for every decoding choice, one batched forward (Q8_0 weights read once
//!    for the batch);
//! 5. one slice of prefill work (`prefill_slice` token-layers, about that many tokens through
//!    one layer) on the oldest admitted request still prefilling.
//!
//! Starvation: requests start their prefill in arrival order and prefill runs first-come, so
//! no request is ever overtaken (each reports how many were: 0); its wait is bounded by the
//! prefill work ahead of it, shared with decode steps.
//!
//! - [`request`]: what the API hands over and what comes back.
//! - [`sequence`]: a request inside the scheduler, and its choices.

mod echo;
pub mod request;
mod sequence;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::blend::{BlendOptions, BuiltinPolicy, CacheMode, CutInput, Policy, Prefill, Prefilling, ReuseReport};
use crate::engine::template::ChatTemplate;
use crate::engine::tokenizer::Tokenizer;
use crate::engine::{EngineError, KvCache, LoadedModel};
use crate::policy::Policies;
use crate::store::{ChunkStore, ReadOnly, Store};
pub use request::{Event, FinishReason, GenerateRequest, Prepared, Prompt, PromptToken, TokenEvent, Usage};
use sequence::{Admitted, Choice, DecodeParams, Next};

/// How often the loop hands free heap memory back to the system.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Gives the heap's free pages back to the system. Sequences allocate and free KV of every
/// size; glibc keeps what they free inside its arenas (its mmap threshold rises past the
/// sizes in play), so without this the resident size climbs to the high-water mark of the
/// whole run and stays there — measured, 16 clients for 100 s: 2.6 GiB without this, 2.0 GiB
/// with it, for ~3 % fewer requests/s. (mimalloc held 2.6 GiB too, and was slower.)
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tuning of the scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Requests that may wait for admission (submitted, not yet running); one more is refused
    /// with 429.
    pub queue_capacity: usize,
    /// Cache mode of requests that do not choose one.
    pub cache_mode: CacheMode,
    /// Chunking and recompute defaults.
    pub blend: BlendOptions,
    /// Requests running at once (prefilling or decoding).
    pub max_running: usize,
    /// KV bytes the running requests may hold (each reserves its prompt plus up to
    /// `reserve_tokens` generated tokens, per choice).
    pub kv_budget_bytes: u64,
    /// Generated tokens a request reserves KV for at admission.
    pub reserve_tokens: usize,
    /// Tokens of prefill per loop turn (through every layer; compose's cheaper passes take
    /// more tokens for the same work): bounds how long decode steps wait. 0: whole prompts.
    pub prefill_chunk_tokens: usize,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            cache_mode: CacheMode::Compose,
            blend: BlendOptions::default(),
            max_running: 16,
            kv_budget_bytes: 4 << 30,
            reserve_tokens: 512,
            prefill_chunk_tokens: 256,
        }
    }
}

/// A prompt's token ids, as a request with it is prefilled, and the token indices where chat
/// messages start (a router tokenizes with the model's tokenizer alone).
pub fn encode_prompt(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    prompt: &Prompt,
) -> Result<(Vec<u32>, Vec<usize>), EngineError> {
    match prompt {
        Prompt::Text(t) => Ok((tokenizer.encode_prompt(t)?.ids, vec![0])),
        Prompt::Chat(msgs) => crate::engine::encode_chat(tokenizer, template, msgs),
        Prompt::Tokens(ids) => {
            let vocab = tokenizer.vocab_size();
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(EngineError::InvalidToken { id: bad, vocab });
            }
            Ok((ids.clone(), vec![0]))
        }
    }
}

/// What the scheduler counts (the API counts what it answers).
pub struct SchedulerStats {
    /// Tokens generated, including those of requests abandoned by their client.
    pub generated_tokens: AtomicU64,
    /// Requests (or choices) dropped because their client went away.
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
    /// Requests waiting for admission, and running (prefilling or decoding).
    pub waiting: AtomicU64,
    pub running: AtomicU64,
    /// Decode steps, and the choices they advanced (their ratio: the mean batch).
    pub decode_steps: AtomicU64,
    pub decode_rows: AtomicU64,
    /// Echoed prompt rows scored: through the LM head, and taken from what the same stored
    /// chunk's rows scored before.
    pub scored_rows_computed: AtomicU64,
    pub scored_rows_remembered: AtomicU64,
}

/// What the memo of echoed chunk rows' logprobs may hold: some 800 000 rows at five top tokens.
const SCORE_MEMO_BYTES: usize = 64 << 20;

const LOOKUP_BOUNDS: &[f64] = &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05];

impl Default for SchedulerStats {
    fn default() -> Self {
        let zero = || AtomicU64::new(0);
        Self {
            generated_tokens: zero(),
            cancelled: zero(),
            cache_queried_tokens: zero(),
            spans_whole: zero(),
            spans_partial: zero(),
            chunks_stored: zero(),
            lookup_seconds: crate::metrics::Histogram::new(LOOKUP_BOUNDS),
            prompt_tokens_cached: zero(),
            prompt_tokens_recomputed: zero(),
            waiting: zero(),
            running: zero(),
            decode_steps: zero(),
            decode_rows: zero(),
            scored_rows_computed: zero(),
            scored_rows_remembered: zero(),
        }
    }
}

impl SchedulerStats {
    fn record(&self, r: &ReuseReport) {
        self.cache_queried_tokens.fetch_add((r.reused_tokens + r.computed_tokens) as u64, Ordering::Relaxed);
        self.spans_whole.fetch_add((r.spans - r.partial_spans) as u64, Ordering::Relaxed);
        self.spans_partial.fetch_add(r.partial_spans as u64, Ordering::Relaxed);
        self.chunks_stored.fetch_add(r.chunks_stored as u64, Ordering::Relaxed);
        self.lookup_seconds.observe(r.timings.lookup_us as f64 * 1e-6);
        self.prompt_tokens_cached.fetch_add(r.reused_tokens as u64, Ordering::Relaxed);
        self.prompt_tokens_recomputed.fetch_add(r.recomputed_tokens as u64, Ordering::Relaxed);
    }
}

/// Where a submitted request's events arrive.
pub type Events = UnboundedReceiver<Event>;

/// A prepared request and where its events go.
struct Job {
    prepared: Prepared,
    events: UnboundedSender<Event>,
    submitted: Instant,
}

/// Handle to the running scheduler. Dropping it stops the loop after the requests already
/// queued and running.
pub struct Scheduler {
    model: Arc<LoadedModel>,
    stats: Arc<SchedulerStats>,
    store: Arc<Store>,
    policies: Option<Arc<Policies>>,
    queue: Option<Sender<Job>>,
    /// Requests submitted and not yet admitted (bounded by `queue_capacity`).
    pending: Arc<AtomicUsize>,
    capacity: usize,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the loop thread over `store`, with the plugin policies when given (else the
    /// built-in ones).
    pub fn start(
        model: Arc<LoadedModel>,
        options: SchedulerOptions,
        store: Arc<Store>,
        policies: Option<Arc<Policies>>,
    ) -> Self {
        let (tx, rx) = channel();
        let stats = Arc::new(SchedulerStats::default());
        let pending = Arc::new(AtomicUsize::new(0));
        let capacity = options.queue_capacity.max(1);
        let run = Loop::new(model.clone(), stats.clone(), store.clone(), policies.clone(), options, pending.clone());
        let thread = std::thread::Builder::new()
            .name("kvgate-scheduler".into())
            .spawn(move || run.run(rx))
            .expect("spawn the scheduler thread");
        Self { model, stats, store, policies, queue: Some(tx), pending, capacity, thread: Some(thread) }
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// The chunk store prefills read and extend.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The plugin policies, when the scheduler runs with them.
    pub fn policies(&self) -> Option<&Arc<Policies>> {
        self.policies.as_ref()
    }

    /// The token ids of a prompt, as a request with it would be prefilled.
    pub fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        Ok(self.encode(prompt)?.0)
    }

    /// Token ids and the token indices where chat messages start.
    fn encode(&self, prompt: &Prompt) -> Result<(Vec<u32>, Vec<usize>), EngineError> {
        encode_prompt(&self.model.tokenizer, &self.model.template, prompt)
    }

    /// Renders and tokenizes a request and checks that it fits in the context.
    pub fn prepare(&self, request: GenerateRequest) -> Result<Prepared, EngineError> {
        let (ids, segment_starts) = self.encode(&request.prompt)?;
        if ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let limit = self.model.model.config().context_length;
        let max_tokens = request.max_tokens.unwrap_or(limit.saturating_sub(ids.len()));
        if ids.len() + max_tokens > limit || ids.len() >= limit {
            return Err(EngineError::ContextOverflow { prompt: ids.len(), completion: max_tokens, limit });
        }
        if let Some(b) = request.recompute_budget.filter(|b| !(0.0..=1.0).contains(b)) {
            return Err(EngineError::InvalidOption(format!("recompute budget must be between 0 and 1, got {b}")));
        }
        Ok(Prepared { request, ids, segment_starts, max_tokens })
    }

    /// Queues a prepared request; its events arrive on the returned channel.
    pub fn submit(&self, prepared: Prepared) -> Result<Events, EngineError> {
        let (tx, rx) = unbounded_channel();
        let queue = self.queue.as_ref().ok_or(EngineError::Stopped)?;
        if self.pending.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull);
        }
        queue.send(Job { prepared, events: tx, submitted: Instant::now() }).map_err(|_| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            EngineError::Stopped
        })?;
        Ok(rx)
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // Closing the queue ends the loop once what was queued has finished.
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The loop's state: who waits, who prefills, who decodes.
struct Loop {
    model: Arc<LoadedModel>,
    stats: Arc<SchedulerStats>,
    store: Arc<Store>,
    policies: Option<Arc<Policies>>,
    options: SchedulerOptions,
    /// Submitted, not admitted; arrival order.
    waiting: VecDeque<Admitted>,
    /// Admitted, prefill not finished; arrival order (the front gets the slices).
    prefilling: VecDeque<Admitted>,
    decoding: Vec<Choice>,
    /// KV bytes reserved by the admitted requests.
    reserved: u64,
    next_seq: u64,
    /// Arrival numbers of requests whose prefill began while an earlier one had not (to
    /// count overtaking honestly; stays empty under first-come order).
    started_early: BTreeSet<u64>,
    /// Submitted and not admitted, shared with the handle (which refuses beyond capacity).
    pending: Arc<AtomicUsize>,
    /// What echoed prompts' rows read from stored chunks scored.
    memo: echo::ScoreMemo,
}

impl Loop {
    fn new(
        model: Arc<LoadedModel>,
        stats: Arc<SchedulerStats>,
        store: Arc<Store>,
        policies: Option<Arc<Policies>>,
        options: SchedulerOptions,
        pending: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            pending,
            model,
            stats,
            store,
            policies,
            options,
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            decoding: Vec::new(),
            reserved: 0,
            next_seq: 0,
            started_early: BTreeSet::new(),
            memo: echo::ScoreMemo::new(SCORE_MEMO_BYTES),
        }
    }

    fn run(mut self, jobs: Receiver<Job>) {
        let mut open = true;
        let mut trimmed = Instant::now();
        while open || !self.idle() {
            if trimmed.elapsed() >= TRIM_EVERY {
                release_free_memory();
                trimmed = Instant::now();
            }
            if self.idle() {
                match jobs.recv() {
                    Ok(job) => self.take(job),
                    Err(_) => break,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => self.take(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            self.drop_abandoned();
            self.admit();
            self.decode_step();
            self.prefill_slice();
            self.stats.waiting.store(self.waiting.len() as u64, Ordering::Relaxed);
            self.stats.running.store((self.prefilling.len() + self.running_requests()) as u64, Ordering::Relaxed);
        }
    }

    fn idle(&self) -> bool {
        self.waiting.is_empty() && self.prefilling.is_empty() && self.decoding.is_empty()
    }

    /// Requests whose choices are decoding (counted once per request).
    fn running_requests(&self) -> usize {
        self.decoding.iter().map(|c| c.seq).collect::<BTreeSet<_>>().len()
    }

    /// A new request: into the waiting line.
    fn take(&mut self, job: Job) {
        let Job { prepared, events, submitted } = job;
        let Prepared { request, ids, segment_starts, max_tokens } = prepared;
        let mode = request.cache_mode.unwrap_or(self.options.cache_mode);
        let mut opts = self.options.blend.clone();
        if let Some(b) = request.recompute_budget {
            opts.recompute_budget = b;
        }
        let m = &self.model;
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
        let mut prefill = Prefilling::new(&m.model, &input, mode, &opts).in_scope(request.scope.clone());
        if request.echo && request.logprobs.is_some() {
            prefill = prefill.keeping_hidden();
        }
        let n = request.n.max(1);
        let per_token = m.model.kv_bytes_per_token();
        let reserved = (ids.len() + max_tokens.min(self.options.reserve_tokens)) as u64 * n as u64 * per_token;
        let decode = DecodeParams {
            n,
            max_tokens,
            sampling: request.sampling.clone(),
            stop: request.stop.clone(),
            logprobs: request.logprobs,
            ignore_eos: request.ignore_eos,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.waiting.push_back(Admitted {
            seq,
            submitted,
            started: None,
            prefill,
            policy: None,
            mode,
            prompt_tokens: ids.len(),
            decode,
            events,
            reserved,
            echo: request.echo.then_some((request.score_from, request.logprobs)),
            store: request.store,
            ids,
            request_id: request.request_id.clone(),
        });
    }

    /// Requests and choices whose client has gone: dropped, their KV released.
    fn drop_abandoned(&mut self) {
        let stats = &self.stats;
        let mut freed = 0;
        let mut gone = |a: &Admitted| {
            let closed = a.events.is_closed();
            if closed {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                freed += a.reserved;
            }
            !closed
        };
        let before = self.waiting.len();
        self.waiting.retain(|a| gone(a));
        self.pending.fetch_sub(before - self.waiting.len(), Ordering::SeqCst);
        self.prefilling.retain(|a| gone(a));
        self.decoding.retain(|c| {
            let closed = c.events.is_closed();
            if closed {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                freed += c.reserved;
            }
            !closed
        });
        self.reserved -= freed.min(self.reserved);
    }

    /// Waiting requests in arrival order, while there is room.
    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            let running = self.prefilling.len() + self.running_requests();
            let fits = self.reserved + front.reserved <= self.options.kv_budget_bytes;
            // Nothing running: admit whatever its size, or it would wait for ever.
            if running > 0 && (running >= self.options.max_running || !fits) {
                break;
            }
            let mut a = self.waiting.pop_front().expect("front exists");
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.reserved += a.reserved;
            a.policy = self.policies.as_ref().map(|p| p.for_request(self.options.blend.chunk_head_tokens));
            self.prefilling.push_back(a);
        }
    }

    /// One decode step for every decoding choice, in one batched forward.
    fn decode_step(&mut self) {
        if self.decoding.is_empty() {
            return;
        }
        let m = self.model.clone();
        let tokens: Vec<u32> = self.decoding.iter().map(|c| c.next).collect();
        let positions: Vec<u32> = self.decoding.iter().map(|c| c.pos).collect();
        let mut caches: Vec<&mut KvCache> = self.decoding.iter_mut().map(|c| &mut c.cache).collect();
        let out = m.model.decode_batch(&tokens, &positions, &mut caches);
        self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.stats.decode_rows.fetch_add(tokens.len() as u64, Ordering::Relaxed);
        let logits = match out {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "decode step failed");
                for c in self.decoding.drain(..) {
                    let _ = c.events.send(Event::Error(EngineError::Internal(e.to_string())));
                }
                self.reserved = self.prefilling.iter().map(|a| a.reserved).sum();
                return;
            }
        };
        let vocab = m.model.config().vocab;
        let mut freed = 0;
        let mut i = 0;
        self.decoding.retain_mut(|c| {
            c.fed();
            let row = &logits[i * vocab..(i + 1) * vocab];
            i += 1;
            match c.advance(row, &m.tokenizer, &self.stats) {
                Next::Feed => true,
                Next::Ended => {
                    freed += c.reserved;
                    false
                }
            }
        });
        self.reserved -= freed.min(self.reserved);
    }

    /// One slice of prefill work on the oldest admitted request still prefilling.
    fn prefill_slice(&mut self) {
        let Some(a) = self.prefilling.front_mut() else { return };
        if a.started.is_none() {
            let overtaken = self.started_early.range(a.seq + 1..).count();
            a.started = Some((Instant::now(), overtaken));
            // Did it start before an earlier request? Kept while any earlier one has not started.
            let unstarted = self.waiting.iter().chain(self.prefilling.iter()).filter(|x| x.started.is_none());
            let oldest_unstarted = unstarted.map(|x| x.seq).min();
            let a = self.prefilling.front().expect("front exists");
            if oldest_unstarted.is_some_and(|o| o < a.seq) {
                self.started_early.insert(a.seq);
            }
            self.started_early.retain(|&s| oldest_unstarted.is_some_and(|o| s > o));
        }
        let a = self.prefilling.front_mut().expect("front exists");
        let _span = tracing::info_span!("request", id = %a.request_id).entered();
        let m = self.model.clone();
        let read_only;
        let store: &dyn ChunkStore = match a.store {
            true => &*self.store,
            false => {
                read_only = ReadOnly(&*self.store);
                &read_only
            }
        };
        let builtin = BuiltinPolicy { chunk_head_tokens: self.options.blend.chunk_head_tokens };
        let policy: &dyn Policy = match &a.policy {
            Some(p) => p,
            None => &builtin,
        };
        // Slices are for the streams that wait on them: with none decoding, a prefill runs in
        // slices eight times larger (each slice multiplies by every weight matrix once, and
        // with the f32 weights that costs about 25 ms whatever the slice's size: measured, a
        // prompt in 128-token slices took 28 % longer than at once).
        let work = match (self.options.prefill_chunk_tokens, self.decoding.is_empty()) {
            (0, _) => usize::MAX,
            (t, true) => 8 * t * m.model.config().layers,
            (t, false) => t * m.model.config().layers,
        };
        let mut done = match a.prefill.step(&m.model, store, policy, work) {
            Ok(None) => return,
            Ok(Some(done)) => done,
            Err(e) => {
                let a = self.prefilling.pop_front().expect("front exists");
                tracing::error!(error = %e, "prefill failed");
                let _ = a.events.send(Event::Error(e));
                self.reserved -= a.reserved.min(self.reserved);
                return;
            }
        };
        let a = self.prefilling.pop_front().expect("front exists");
        if a.mode != CacheMode::Off {
            self.stats.record(&done.report);
        }
        let (started, overtaken) = a.started.expect("set above");
        let prefill_seconds = started.elapsed().as_secs_f64();
        if let Some((from, logprobs)) = a.echo {
            let scoring = Instant::now();
            if let Err(e) = self.echo(&a, &done, from, logprobs) {
                let _ = a.events.send(Event::Error(e));
                self.reserved -= a.reserved.min(self.reserved);
                return;
            }
            done.report.timings.score_us = scoring.elapsed().as_micros() as u64;
        }
        let usage = Usage {
            prompt_tokens: a.prompt_tokens,
            cached_tokens: done.report.reused_tokens,
            reuse: done.report,
            mode: Some(a.mode),
            prefill_seconds,
            queued_seconds: (started - a.submitted).as_secs_f64(),
            overtaken,
            ..Usage::default()
        };
        for (mut choice, logits) in Choice::fork(&a, done, usage) {
            if let Next::Feed = choice.advance(&logits, &m.tokenizer, &self.stats) {
                self.decoding.push(choice);
            } else {
                self.reserved -= choice.reserved.min(self.reserved);
            }
        }
    }

    /// The prompt echoed back, scored from token `from` on when logprobs were asked for.
    /// Scored from the hidden states the prefill knows (its own rows', and those reused chunks
    /// stored) with the LM head alone, and only for the rows the memo does not hold; a prompt
    /// with a row of unknown state before `from` (a chunk stored without states) takes another
    /// pass over the cache.
    fn echo(&mut self, a: &Admitted, done: &Prefill, from: usize, logprobs: Option<usize>) -> Result<(), EngineError> {
        let from = from.clamp(1, a.ids.len());
        let model = &self.model.model;
        let scored = match (logprobs, &done.hidden) {
            (Some(top), Some(states)) if states.first < from => {
                let (scored, how) = self.memo.score(model, &a.ids, from, states, top)?;
                self.stats.scored_rows_computed.fetch_add(how.computed as u64, Ordering::Relaxed);
                self.stats.scored_rows_remembered.fetch_add(how.remembered as u64, Ordering::Relaxed);
                scored
            }
            (Some(top), _) => {
                let scored = model.score(&a.ids, from, &done.cache, top)?;
                self.stats.scored_rows_computed.fetch_add(scored.len() as u64, Ordering::Relaxed);
                scored
            }
            (None, _) => Vec::new(),
        };
        let mut scored = scored.into_iter();
        let prompt = a
            .ids
            .iter()
            .enumerate()
            .map(|(i, &id)| PromptToken { id, logprob: if i < from { None } else { scored.next() } })
            .collect();
        let _ = a.events.send(Event::Prompt(prompt));
        Ok(())
    }
}
