//! A prompt's prefill as resumable work, in any cache mode.
//!
//! The scheduler runs prefills a slice at a time between decode steps, so that running
//! streams keep flowing while a long prompt starts. A [`Prefilling`] holds everything a
//! prefill needs between slices (the cache, the hidden states of compose's check pass, what
//! reuse found) and [`Prefilling::step`] advances it by at most a given amount of work,
//! counted in token-layers (one token through one layer).
//!
//! Stages, each in position order so that every token sees exactly the rows at positions `≤`
//! its own as they will be when the prefill completes:
//!
//! - `Start`: the lookup and the splice (compose: the span index; prefix: the prefix tree).
//! - `Extend`: the tokens from a row on through every layer (`off`, the part of a `prefix`
//!   prompt past its stored prefix, compose with nothing to reuse).
//! - `Check` (compose): layers `0..check_layer` and the K/V at `check_layer` over every
//!   token; then the deviations, the attention from the prompt's last tokens, and the
//!   selector's choice.
//! - `Recompute` (compose): layers `check_layer..` over the chosen reused tokens and every
//!   token no stored run covered; with a taper, in stretches of layers between which the
//!   reused tokens narrow.
//!
//! Kernels are batch-invariant (a row's result does not depend on the rows beside it), so a
//! prefill run in slices is bit for bit the prefill run at once.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use super::chunk::ChunkKey;
use super::select;
use super::{
    ATTENTION_QUERIES, BlendOptions, CacheMode, CutInput, KnownStates, Policy, Prefill, ReuseReport, SelectInput,
    extract, gaps, micros, pieces, splice,
};
use crate::engine::{EngineError, KvCache, Model};
use crate::store::{ChunkKv, ChunkStore, Scope, SpanMatch, Use};

/// What a finished prefill stores.
enum Keep {
    Nothing,
    /// Compose: what no stored run covered.
    Compose {
        uncovered: Vec<Range<usize>>,
    },
    /// Prefix: everything from `from` on, continuing the tree from `parent`.
    Prefix {
        from: usize,
        parent: ChunkKey,
    },
}

/// Compose's check pass in progress.
struct Check {
    spans: Vec<SpanMatch>,
    reused: Vec<usize>,
    uncovered: Vec<Range<usize>>,
    /// Hidden states of every token entering the check layer (once done).
    x: Vec<f32>,
    /// The spliced K and V of each reused token at the check layer, before the pass.
    spliced: Vec<(Vec<f32>, Vec<f32>)>,
    /// Hidden states entering the check layer of the prompt's last tokens (the attention probe).
    queries: Vec<f32>,
    done: usize,
}

/// Compose's recompute pass in progress, in stretches of layers between the taper's
/// narrowings (one stretch without a taper).
struct Recompute {
    /// Cache rows the stretch recomputes, in position order (the last row of the prompt last).
    rows: Vec<usize>,
    /// Which of `rows` are reused tokens (the taper may drop them; the others run every layer).
    reused: Vec<bool>,
    /// Hidden states of `rows` entering `layer` (of the rows `..done`: leaving the stretch of
    /// layers up to the next narrowing).
    xs: Vec<f32>,
    /// The first layer of the stretch the rows are going through.
    layer: usize,
    /// Rows through the stretch.
    done: usize,
    /// Reused rows recomputed at each layer from the check layer on.
    keep: Vec<usize>,
    /// K+V deviation of each of `rows` from its spliced values at the stretch's last layer
    /// (reused rows, when the layer after it keeps fewer).
    deviations: Vec<f32>,
    /// The attention each of `rows` received at the check layer from the prompt's last tokens.
    attention: Vec<f32>,
    logits: Vec<f32>,
}

impl Recompute {
    /// Reused rows recomputed at `layer` (counted from the check layer).
    fn keeps(&self, layer: usize, check: usize) -> usize {
        self.keep.get(layer - check).copied().unwrap_or(0)
    }

    /// The end of the stretch of layers from `layer`: the next layer that keeps fewer rows.
    fn stretch_end(&self, check: usize, layers: usize) -> usize {
        (self.layer + 1..layers).find(|&u| self.keeps(u, check) < self.keeps(u - 1, check)).unwrap_or(layers)
    }

    /// Rows that run every layer: the new tokens and the last.
    fn fresh(&self) -> usize {
        self.reused.iter().filter(|&&r| !r).count()
    }

    /// Keeps `keep` of the reused rows, as the default selector chose them: half the most read
    /// at the check layer, half those that deviated most at the layer just done; and every
    /// other row.
    fn narrow(&mut self, keep: usize, hidden: usize) {
        let reused: Vec<usize> = (0..self.rows.len()).filter(|&i| self.reused[i]).collect();
        let deviations: Vec<f32> = reused.iter().map(|&i| self.deviations[i]).collect();
        let attention: Vec<f32> = reused.iter().map(|&i| self.attention[i]).collect();
        let mut stay: Vec<bool> = self.reused.iter().map(|&r| !r).collect();
        for k in select::attention_then_deviation(&deviations, &attention, keep, select::attention_share(keep)) {
            stay[reused[k as usize]] = true;
        }
        let mut xs = Vec::with_capacity(self.xs.len());
        for (row, _) in self.xs.chunks_exact(hidden).zip(&stay).filter(|(_, s)| **s) {
            xs.extend_from_slice(row);
        }
        self.xs = xs;
        self.rows = kept(&self.rows, &stay);
        self.reused = kept(&self.reused, &stay);
        self.attention = kept(&self.attention, &stay);
        self.deviations = vec![0.0; self.rows.len()];
    }
}

enum Stage {
    Start,
    Extend { done: usize, logits: Vec<f32> },
    Check(Box<Check>),
    Recompute(Box<Recompute>),
    Done,
}

/// A prompt's prefill, run a slice at a time.
pub struct Prefilling {
    ids: Vec<u32>,
    /// For the chunker: byte offsets of the tokens in `text`, and message starts.
    offsets: Vec<u32>,
    text: String,
    segment_starts: Vec<usize>,
    mode: CacheMode,
    opts: BlendOptions,
    cache: KvCache,
    stage: Stage,
    keep: Keep,
    report: ReuseReport,
    /// The namespaces read from and written to.
    scope: Scope,
    /// The last layer's hidden states known so far, kept in every mode but `off` (whose
    /// chunks are not stored) and whenever the finished prefill hands them on.
    states: States,
    /// The finished prefill hands its states on ([`Prefilling::keeping_hidden`]).
    keep_hidden: bool,
}

/// The last layer's hidden state of each row of a prompt, where known: rows the prefill ran
/// through every layer, and reused rows whose chunk stored its states.
struct States {
    /// `rows × hidden`, allocated at the first state set.
    x: Vec<f32>,
    known: Vec<Known>,
    /// The chunks states were read from.
    chunks: Vec<(ChunkKey, Arc<ChunkKv>)>,
    hidden: usize,
}

/// Whether a row's state is known, and from where.
#[derive(Clone, Copy, PartialEq)]
enum Known {
    No,
    Computed,
    /// Read from row `row` of `chunks[chunk]`.
    Stored {
        chunk: usize,
        row: usize,
    },
}

impl States {
    fn new(rows: usize, hidden: usize) -> Self {
        Self { x: Vec::new(), known: vec![Known::No; rows], chunks: Vec::new(), hidden }
    }

    /// Row `row`'s state and the rows' after it, computed: `x` (whole rows).
    fn set(&mut self, row: usize, x: &[f32]) {
        self.write(row, x);
        let n = x.len() / self.hidden;
        self.known[row..row + n].iter_mut().for_each(|k| *k = Known::Computed);
    }

    /// The states of chunk `kv`'s rows `from..` as those of `rows`.
    fn read(&mut self, key: ChunkKey, kv: &Arc<ChunkKv>, from: usize, rows: Range<usize>) {
        let h = self.hidden;
        self.write(rows.start, &kv.hidden[from * h..(from + rows.len()) * h]);
        let chunk = self.chunks.len();
        self.chunks.push((key, kv.clone()));
        for (i, k) in self.known[rows].iter_mut().enumerate() {
            *k = Known::Stored { chunk, row: from + i };
        }
    }

    fn write(&mut self, row: usize, x: &[f32]) {
        if self.x.is_empty() {
            self.x = vec![0.0; self.known.len() * self.hidden];
        }
        self.x[row * self.hidden..row * self.hidden + x.len()].copy_from_slice(x);
    }

    /// The states of `rows`, if every one is known.
    fn rows(&self, rows: Range<usize>) -> Option<&[f32]> {
        self.known[rows.clone()]
            .iter()
            .all(|&k| k != Known::No)
            .then(|| &self.x[rows.start * self.hidden..rows.end * self.hidden])
    }

    /// From the first row on which every state is known to the end.
    fn tail(mut self) -> Option<KnownStates> {
        let first = self.known.iter().rposition(|&k| k == Known::No).map_or(0, |r| r + 1);
        if self.x.is_empty() || first == self.known.len() {
            return None;
        }
        let stored = self.known[first..]
            .iter()
            .map(|k| match *k {
                Known::Stored { chunk, row } => Some((chunk, row)),
                _ => None,
            })
            .collect();
        Some(KnownStates { first, x: self.x.split_off(first * self.hidden), stored, chunks: self.chunks })
    }
}

impl Prefilling {
    /// A prefill of `prompt` in `mode`, not started.
    pub fn new(model: &Model, prompt: &CutInput, mode: CacheMode, opts: &BlendOptions) -> Self {
        Self {
            ids: prompt.ids.to_vec(),
            offsets: prompt.offsets.to_vec(),
            text: prompt.text.to_string(),
            segment_starts: prompt.segment_starts.to_vec(),
            mode,
            opts: opts.clone(),
            cache: model.new_cache(),
            stage: Stage::Start,
            keep: Keep::Nothing,
            report: ReuseReport::default(),
            scope: Scope::default(),
            states: States::new(prompt.ids.len(), model.config().hidden),
            keep_hidden: false,
        }
    }

    /// The same prefill handing on the last layer's hidden states it knows ([`Prefill::hidden`]):
    /// of the rows it runs through every layer, and of the reused rows whose chunks stored
    /// theirs. A request that scores its prompt reads them instead of running the rows again.
    pub fn keeping_hidden(mut self) -> Self {
        self.keep_hidden = true;
        self
    }

    /// The same prefill reading and writing chunks of `scope`'s namespaces only.
    pub fn in_scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// The stored states of the chunk rows `from..` spliced at `rows`, when it has them and
    /// the finished prefill hands states on (only chunks to store need the others).
    fn reuse_states(&mut self, key: ChunkKey, kv: &Arc<ChunkKv>, from: usize, rows: Range<usize>) {
        if self.keep_hidden && kv.hidden.len() == kv.tokens.len() * self.states.hidden {
            self.states.read(key, kv, from, rows);
        }
    }

    /// Whether the prefill keeps the hidden states it learns.
    fn tracks_states(&self) -> bool {
        self.mode != CacheMode::Off || self.keep_hidden
    }

    /// Token-layers left before the prefill completes (an estimate before the lookup).
    pub fn remaining_work(&self, layers: usize) -> usize {
        let n = self.ids.len();
        match &self.stage {
            Stage::Start => n * layers,
            Stage::Extend { done, .. } => (n - done) * layers,
            Stage::Check(c) => (n - c.done) * (self.opts.check_layer + 1) + (n - c.reused.len()) * layers,
            Stage::Recompute(r) => {
                let check = self.opts.check_layer.min(layers - 1);
                let until = r.stretch_end(check, layers);
                let fresh = r.fresh();
                let later: usize = (until..layers).map(|l| r.keeps(l, check) + fresh).sum();
                (r.rows.len() - r.done) * (until - r.layer) + later
            }
            Stage::Done => 0,
        }
    }

    /// Advances the prefill by about `work` token-layers (at least one token of the current
    /// stage); returns the finished prefill once the last token's logits exist.
    pub fn step(
        &mut self,
        model: &Model,
        store: &dyn ChunkStore,
        policy: &dyn Policy,
        work: usize,
    ) -> Result<Option<Prefill>, EngineError> {
        if self.ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let layers = model.config().layers;
        let check = self.opts.check_layer.min(layers - 1);
        let mut left = work.max(1);
        loop {
            match std::mem::replace(&mut self.stage, Stage::Done) {
                Stage::Start => self.stage = self.start(model, store, check)?,
                Stage::Extend { done, logits } => {
                    let n = self.ids.len();
                    let take = (left / layers).clamp(1, n - done);
                    let started = Instant::now();
                    let logits = self.extend(model, done..done + take).map(|l| l.unwrap_or(logits))?;
                    self.report.timings.compute_us += micros(started);
                    left = left.saturating_sub(take * layers);
                    if done + take < n {
                        self.stage = Stage::Extend { done: done + take, logits };
                    } else {
                        return Ok(Some(self.finish(model, store, policy, logits)));
                    }
                }
                Stage::Check(mut c) => {
                    let n = self.ids.len();
                    let take = (left / (check + 1)).clamp(1, n - c.done);
                    let started = Instant::now();
                    let rows = c.done..c.done + take;
                    self.check_slice(model, &mut c, rows, check)?;
                    c.done += take;
                    self.report.timings.check_us += micros(started);
                    left = left.saturating_sub(take * (check + 1));
                    self.stage = match c.done < n {
                        true => Stage::Check(c),
                        false => self.select(model, policy, *c, check)?,
                    };
                }
                Stage::Recompute(mut r) => {
                    let started = Instant::now();
                    let done = self.recompute_slice(model, &mut r, left, check)?;
                    self.report.timings.compute_us += micros(started);
                    left = left.saturating_sub(done);
                    if r.layer < layers {
                        self.stage = Stage::Recompute(r);
                    } else {
                        let logits = std::mem::take(&mut r.logits);
                        return Ok(Some(self.finish(model, store, policy, logits)));
                    }
                }
                Stage::Done => return Err(EngineError::Internal("a finished prefill was stepped again".into())),
            }
            if left == 0 {
                return Ok(None);
            }
        }
    }

    /// The lookup and the splice; the stage that follows.
    fn start(&mut self, model: &Model, store: &dyn ChunkStore, check: usize) -> Result<Stage, EngineError> {
        let n = self.ids.len();
        let layers = model.config().layers;
        let started = Instant::now();
        let stage = match self.mode {
            CacheMode::Off => Stage::Extend { done: 0, logits: Vec::new() },
            CacheMode::Prefix => {
                // The last token is always computed: its logits start generation.
                // The longest stored prefix in any namespace read.
                let read = self.scope.read_ids();
                let (root, path) = self
                    .scope
                    .read
                    .iter()
                    .map(|ns| ChunkKey::prefix(&ChunkKey::space(model.fingerprint(), ns), &[]))
                    .map(|root| (root, store.longest_prefix(&root, &self.ids[..n - 1], &read)))
                    .max_by_key(|(_, path)| path.last().map_or(0, |m| m.prompt.end))
                    .expect("a scope reads at least one namespace");
                self.report.timings.lookup_us = micros(started);
                let (mut hit_end, mut parent, mut from) = (0, root, 0);
                for m in &path {
                    let used = if m.is_partial() { Use::Part } else { Use::Whole };
                    let Some(kv) = store.fetch(&m.key, used) else { break };
                    let exact = kv.rotated_at == Some(m.prompt.start as u32)
                        && kv.tokens.get(..m.len()) == Some(&self.ids[m.prompt.clone()]);
                    if !exact {
                        break;
                    }
                    let positions: Vec<u32> = (m.prompt.start as u32..m.prompt.end as u32).collect();
                    let rows = self.cache.push_rows(&positions);
                    splice(model, &mut self.cache, &kv, 0, rows);
                    self.reuse_states(m.key, &kv, 0, m.prompt.clone());
                    hit_end = m.prompt.end;
                    self.report.spans += 1;
                    self.report.chunks_hit += 1;
                    if m.is_partial() {
                        self.report.partial_spans += 1;
                        break;
                    }
                    (parent, from) = (m.key, m.prompt.end);
                }
                self.report.reused_tokens = hit_end;
                self.keep = Keep::Prefix { from, parent };
                Stage::Extend { done: hit_end, logits: Vec::new() }
            }
            CacheMode::Compose => {
                let found = store.find_spans(&self.ids[..n - 1], &self.scope.read_ids());
                self.report.timings.lookup_us = micros(started);
                let positions: Vec<u32> = (0..n as u32).collect();
                self.cache.push_rows(&positions);
                let mut spans: Vec<SpanMatch> = Vec::with_capacity(found.len());
                for m in found {
                    let used = if m.is_partial() { Use::Part } else { Use::Whole };
                    let Some(kv) = store.fetch(&m.key, used) else { continue };
                    // The index found the run by its tokens; the chunk as loaded must agree.
                    if kv.tokens.get(m.offset..m.offset + m.len()) != Some(&self.ids[m.prompt.clone()]) {
                        continue;
                    }
                    splice(model, &mut self.cache, &kv, m.offset, m.prompt.clone());
                    self.reuse_states(m.key, &kv, m.offset, m.prompt.clone());
                    spans.push(m);
                }
                let reused: Vec<usize> = spans.iter().flat_map(|m| m.prompt.clone()).collect();
                let uncovered = gaps(spans.iter().map(|m| m.prompt.clone()), n);
                self.keep = Keep::Compose { uncovered: uncovered.clone() };
                if reused.is_empty() || check + 1 >= layers {
                    // Nothing to reuse (or no layer left to skip): a plain prefill.
                    self.cache = model.new_cache();
                    Stage::Extend { done: 0, logits: Vec::new() }
                } else {
                    self.report.reused_tokens = reused.len();
                    self.report.spans = spans.len();
                    self.report.partial_spans = spans.iter().filter(|m| m.is_partial()).count();
                    self.report.chunks_hit = spans.iter().map(|m| m.key).collect::<HashSet<_>>().len();
                    let d = self.cache.kv_dim();
                    let at = &self.cache.layers()[check];
                    let spliced = reused
                        .iter()
                        .map(|&r| (at.k[r * d..(r + 1) * d].to_vec(), at.v[r * d..(r + 1) * d].to_vec()))
                        .collect();
                    let x = model.embed(&self.ids, &positions)?;
                    Stage::Check(Box::new(Check { spans, reused, uncovered, x, spliced, queries: Vec::new(), done: 0 }))
                }
            }
        };
        self.report.timings.splice_us += micros(started).saturating_sub(self.report.timings.lookup_us);
        Ok(stage)
    }

    /// Rows `rows` (all pushed or to push in order) through every layer; the last row's logits
    /// when `rows` ends the prompt.
    fn extend(&mut self, model: &Model, rows: Range<usize>) -> Result<Option<Vec<f32>>, EngineError> {
        let positions: Vec<u32> = (rows.start as u32..rows.end as u32).collect();
        let mut x = model.embed(&self.ids[rows.clone()], &positions)?;
        let cache_rows: Vec<usize> = self.cache.push_rows(&positions).collect();
        // The prefill weights whatever the count: a short slice computes exactly what a full prefill would.
        model.run_layers(
            0..model.config().layers,
            &mut x,
            &positions,
            &cache_rows,
            &mut self.cache,
            model.prefill_weights(),
        )?;
        if self.tracks_states() {
            self.states.set(rows.start, &x);
        }
        match rows.end == self.ids.len() {
            true => Ok(Some(model.logits(&x, &[rows.len() - 1])?)),
            false => Ok(None),
        }
    }

    /// Layers `0..check` over the tokens `rows` and their K/V at `check` (the layer's output
    /// waits for the recompute pass: only the tokens recomputed need it); keeps the probe's
    /// inputs.
    fn check_slice(
        &mut self,
        model: &Model,
        c: &mut Check,
        rows: Range<usize>,
        check: usize,
    ) -> Result<(), EngineError> {
        let hidden = model.config().hidden;
        let positions: Vec<u32> = (rows.start as u32..rows.end as u32).collect();
        let cache_rows: Vec<usize> = rows.clone().collect();
        let x = &mut c.x[rows.start * hidden..rows.end * hidden];
        model.run_layers(0..check, x, &positions, &cache_rows, &mut self.cache, model.prefill_weights())?;
        let first_query = self.ids.len().saturating_sub(ATTENTION_QUERIES);
        if rows.end > first_query {
            let from = rows.start.max(first_query) - rows.start;
            c.queries.extend_from_slice(&x[from * hidden..]);
        }
        model.write_kv(check, x, &positions, &cache_rows, &mut self.cache)
    }

    /// After the check pass: deviations, attention, the selector's choice; the recompute pass.
    fn select(&mut self, model: &Model, policy: &dyn Policy, c: Check, check: usize) -> Result<Stage, EngineError> {
        let started = Instant::now();
        let n = self.ids.len();
        let d = self.cache.kv_dim();
        let hidden = model.config().hidden;
        let first_query = n.saturating_sub(ATTENTION_QUERIES);
        let query_positions: Vec<u32> = (first_query as u32..n as u32).collect();
        let mass = model.attention_mass(check, &c.queries, &query_positions, &self.cache)?;
        let at = &self.cache.layers()[check];
        let deviations: Vec<f32> = c
            .reused
            .iter()
            .zip(&c.spliced)
            .map(|(&r, (k, v))| sq_dist(&at.k[r * d..(r + 1) * d], k) + sq_dist(&at.v[r * d..(r + 1) * d], v))
            .collect();
        let attention: Vec<f32> = c.reused.iter().map(|&r| mass[r]).collect();
        let mut chunk_starts = Vec::with_capacity(c.spans.len());
        let mut offset = 0u32;
        for m in &c.spans {
            chunk_starts.push(offset);
            offset += m.len() as u32;
        }
        let budget =
            ((self.opts.recompute_budget.clamp(0.0, 1.0) * c.reused.len() as f32).round() as usize).min(c.reused.len());
        let layers = model.config().layers;
        let (ask, counts) = super::taper_schedule(budget, c.reused.len(), self.opts.recompute_taper, layers - check);
        let positions: Vec<u32> = c.reused.iter().map(|&r| r as u32).collect();
        let selected = policy.select(&SelectInput {
            deviations: &deviations,
            positions: &positions,
            chunk_starts: &chunk_starts,
            attention: &attention,
            budget: ask,
        });
        // A selector that chose fewer than it was asked for narrows in proportion; more (a
        // failed plugin's fallback: every token) is kept at every layer.
        let keep: Vec<usize> = match selected.len().cmp(&ask) {
            Ordering::Equal => counts,
            Ordering::Less => counts.iter().map(|&k| (k * selected.len()).div_ceil(ask)).collect(),
            Ordering::Greater => vec![selected.len(); counts.len()],
        };
        self.report.recomputed_tokens = (keep.iter().sum::<usize>() as f64 / keep.len().max(1) as f64).round() as usize;
        let mut rows: Vec<(usize, bool, f32)> =
            selected.iter().map(|&i| (c.reused[i as usize], true, attention[i as usize])).collect();
        rows.extend(c.uncovered.iter().flat_map(|r| r.clone()).map(|r| (r, false, 0.0)));
        rows.sort_unstable_by_key(|&(r, _, _)| r);
        let xs = rows.iter().flat_map(|&(r, _, _)| c.x[r * hidden..(r + 1) * hidden].iter().copied()).collect();
        self.report.timings.check_us += micros(started);
        Ok(Stage::Recompute(Box::new(Recompute {
            deviations: vec![0.0; rows.len()],
            reused: rows.iter().map(|&(_, reused, _)| reused).collect(),
            attention: rows.iter().map(|&(_, _, a)| a).collect(),
            rows: rows.into_iter().map(|(r, _, _)| r).collect(),
            xs,
            layer: check,
            done: 0,
            keep,
            logits: Vec::new(),
        })))
    }

    /// About `work` token-layers of the recompute pass: the next rows through the layers from
    /// the current one up to where the taper narrows next (all the rest without a taper); once
    /// every row is through them, the rows narrowed (or, after the last layer, the logits).
    /// Returns the token-layers done.
    fn recompute_slice(
        &mut self,
        model: &Model,
        r: &mut Recompute,
        work: usize,
        check: usize,
    ) -> Result<usize, EngineError> {
        let (hidden, d, layers) = (model.config().hidden, self.cache.kv_dim(), model.config().layers);
        let l = r.layer;
        let until = r.stretch_end(check, layers);
        // The deviations at the stretch's last layer choose the rows that go on past it.
        let measured = until - 1;
        let take = (work / (until - l)).clamp(1, r.rows.len() - r.done);
        let slice = r.done..r.done + take;
        let rows = &r.rows[slice.clone()];
        let spliced: Vec<(usize, Vec<f32>, Vec<f32>)> = match until < layers {
            true => {
                let at = &self.cache.layers()[measured];
                (slice.clone())
                    .filter(|&i| r.reused[i])
                    .map(|i| {
                        let row = r.rows[i];
                        (i, at.k[row * d..(row + 1) * d].to_vec(), at.v[row * d..(row + 1) * d].to_vec())
                    })
                    .collect()
            }
            false => Vec::new(),
        };
        let positions: Vec<u32> = rows.iter().map(|&row| self.cache.positions[row]).collect();
        let xs = &mut r.xs[slice.start * hidden..slice.end * hidden];
        model.run_layers(l..until, xs, &positions, rows, &mut self.cache, model.prefill_weights())?;
        let at = &self.cache.layers()[measured];
        for (i, k, v) in spliced {
            let row = r.rows[i];
            r.deviations[i] = sq_dist(&at.k[row * d..(row + 1) * d], &k) + sq_dist(&at.v[row * d..(row + 1) * d], &v);
        }
        r.done += take;
        if r.done == r.rows.len() {
            match until == layers {
                true => {
                    r.logits = model.logits(&r.xs[(r.rows.len() - 1) * hidden..], &[0])?;
                    for (&row, x) in r.rows.iter().zip(r.xs.chunks_exact(hidden)) {
                        self.states.set(row, x);
                    }
                }
                false => r.narrow(r.keeps(until, check), hidden),
            }
            (r.layer, r.done) = (until, 0);
        }
        Ok(take * (until - l))
    }

    /// Stores what the prompt brought new; the finished prefill.
    fn finish(&mut self, model: &Model, store: &dyn ChunkStore, policy: &dyn Policy, logits: Vec<f32>) -> Prefill {
        let started = Instant::now();
        let n = self.ids.len();
        self.report.computed_tokens = n - self.report.reused_tokens;
        let t = &self.report.timings;
        let cost_per_token =
            (t.check_us + t.compute_us) / (self.report.computed_tokens + self.report.recomputed_tokens).max(1) as u64;
        let input = CutInput {
            ids: &self.ids,
            offsets: &self.offsets,
            text: &self.text,
            segment_starts: &self.segment_starts,
            chunk_tokens: self.opts.chunk_tokens,
        };
        let space = ChunkKey::space(model.fingerprint(), &self.scope.write);
        let fp = space.as_str();
        match std::mem::replace(&mut self.keep, Keep::Nothing) {
            Keep::Nothing => {}
            Keep::Compose { uncovered } => {
                let runs: Vec<_> = uncovered.into_iter().filter(|r| r.len() >= self.opts.min_span).collect();
                let cuts = if runs.is_empty() { Vec::new() } else { policy.cut(&input) };
                for run in runs {
                    for piece in pieces(run, &cuts, self.opts.min_span) {
                        let key = ChunkKey::compose(fp, &self.ids[piece.clone()]);
                        if !store.contains(&key) {
                            let states = self.states.rows(piece.clone());
                            let mut kv = extract(model, &self.cache, &self.ids, piece.clone(), false, states);
                            kv.namespace = self.scope.write.clone();
                            store.put(key, Arc::new(kv), cost_per_token * piece.len() as u64);
                            self.report.chunks_stored += 1;
                        }
                    }
                }
            }
            Keep::Prefix { from, mut parent } => {
                for piece in pieces(from..n, &policy.cut(&input), 1) {
                    let key = ChunkKey::prefix(fp, &self.ids[..piece.end]);
                    if !store.contains(&key) {
                        let states = self.states.rows(piece.clone());
                        let mut kv = extract(model, &self.cache, &self.ids, piece.clone(), true, states);
                        kv.parent = Some(parent);
                        kv.namespace = self.scope.write.clone();
                        store.put(key, Arc::new(kv), cost_per_token * piece.len() as u64);
                        self.report.chunks_stored += 1;
                    }
                    parent = key;
                }
            }
        }
        self.report.timings.store_us = micros(started);
        if self.mode == CacheMode::Compose {
            tracing::debug!(report = ?self.report, "compose prefill");
        }
        let cache = std::mem::replace(&mut self.cache, model.new_cache());
        let states = std::mem::replace(&mut self.states, States::new(0, 0));
        let hidden = if self.keep_hidden { states.tail() } else { None };
        Prefill { cache, logits, report: self.report, hidden }
    }
}

/// Squared Euclidean distance.
fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The items of `v` whose `stay` is set.
fn kept<T: Copy>(v: &[T], stay: &[bool]) -> Vec<T> {
    v.iter().zip(stay).filter(|(_, s)| **s).map(|(x, _)| *x).collect()
}
