//! Compositional reuse: cached chunks spliced into new prompts at new positions, with a
//! selected set of tokens recomputed to stitch them together (CacheBlend-style).
//!
//! Owns the prefill of a prompt given what the chunk store holds. Uses `engine`'s
//! layer-level forward and a [`ChunkStore`]; knows nothing of HTTP or of how the store keeps
//! its bytes or finds runs of tokens (`store` does). Three modes, selectable per request so
//! they can be compared on one server:
//!
//! - `off`: full prefill, nothing read or written.
//! - `prefix`: classic prefix caching, to the token: the longest prefix of the prompt that a
//!   stored prompt shares is reused exactly (K as rotated, f32, nothing recomputed), the rest
//!   computed and stored as a continuation of the tree of stored prefixes.
//! - `compose`: reuse wherever a run sits. The store's span index covers the prompt with the
//!   longest runs (at least `min_span` tokens) that equal runs inside stored chunks — a whole
//!   chunk or any part of one, cut however it was cut. The runs are spliced in (K rotated from
//!   pre-RoPE to the new positions, V as is); layers `0..check_layer` run over the whole
//!   prompt and its K/V at `check_layer` are projected, the deviation of each reused token's
//!   K/V there is measured, the selector picks the tokens to recompute, and layers
//!   `check_layer..` run only over those plus every token no run covered (with a taper,
//!   fewer of those at each layer: [`BlendOptions::recompute_taper`]). Every recomputed
//!   token attends to exactly the keys at positions `≤` its own.
//!
//! The last token is always computed (its logits start generation). What no run covered is
//! stored as new chunks, cut where the chunker says, with the KV computed in this prompt's
//! context (pre-RoPE K and the policy's element type for compose; rotated f32 for prefix).
//!
//! - [`chunk`]: cutting prompts into chunks, chunk keys.
//! - [`select`]: the recompute selection (attention, then top deviation).
//! - [`task`]: a prefill in any mode as resumable work ([`Prefilling`]), so the scheduler can
//!   run it a slice at a time between decode steps.

pub mod chunk;
pub mod select;
mod task;

pub use task::Prefilling;

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::{EngineError, KvCache, Model};
use crate::store::{ChunkKey, ChunkKv, ChunkStore};

/// How a request may use the chunk cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    Off,
    Prefix,
    Compose,
}

impl CacheMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Off => "off",
            CacheMode::Prefix => "prefix",
            CacheMode::Compose => "compose",
        }
    }
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(CacheMode::Off),
            "prefix" => Ok(CacheMode::Prefix),
            "compose" => Ok(CacheMode::Compose),
            _ => Err(format!("unknown cache mode `{s}` (off, prefix or compose)")),
        }
    }
}

/// Tuning of compositional reuse.
#[derive(Debug, Clone, PartialEq)]
pub struct BlendOptions {
    /// Tokens per chunk inside a segment (the built-in cutter).
    pub chunk_tokens: usize,
    /// Share of reused tokens recomputed, 0..=1 (averaged over the layers past the check
    /// layer when `recompute_taper` > 1).
    pub recompute_budget: f32,
    /// CacheBlend's gradual filtering: the selector picks `recompute_taper` times as many
    /// tokens for the check layer as stay recomputed at the last layer, and between layers the
    /// recomputed reused tokens narrow (the dropped keep their spliced K/V) to half the most
    /// read at the check layer, half the most deviating at the layer just done, so that the
    /// mean count per layer is the budget's. 1: no taper.
    /// 2 by measurement (`kvgate bench denoise --tapers 1,2,4`, budget 15 %, check layer 2,
    /// teacher-forced KL with 1 / 2 / 4, 24 prompts each: joined passages under bracket labels
    /// 0.0190 / 0.0156 / 0.0168, agent turns 0.0311 / 0.0300 / 0.0227, memory 0.0121 / 0.0122 /
    /// 0.0133; the first token agreeing on 83 / 88 / 83 % and 96 / 100 / 100 % of the bracket
    /// and memory prompts). 4 gains more where the question reads few tokens and loses where it
    /// reads many; 2 never lost more than noise.
    pub recompute_taper: f32,
    /// Layer at which deviations and attention are measured; layers before it run over every
    /// token. 2 by measurement (`kvgate bench denoise`, check 1 against 2 at 15 %: agent
    /// traces' teacher-forced KL 0.064 -> 0.028, joined passages 0.014 -> 0.012).
    pub check_layer: usize,
    /// Tokens at the head of every reused chunk recomputed first (EPIC), within the budget.
    pub chunk_head_tokens: usize,
    /// Shortest run reused in compose mode, and shortest new chunk stored; the store's span
    /// index is built for the same value.
    pub min_span: usize,
}

impl Default for BlendOptions {
    fn default() -> Self {
        Self {
            chunk_tokens: 256,
            recompute_budget: 0.15,
            recompute_taper: 2.0,
            check_layer: 2,
            chunk_head_tokens: 0,
            min_span: 16,
        }
    }
}

/// What reuse did for one prompt (reported in responses and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ReuseReport {
    /// Prompt tokens whose KV came from the cache.
    pub reused_tokens: usize,
    /// Of those, recomputed in the later layers (averaged over those layers: with a taper,
    /// more at the check layer, fewer at the last).
    pub recomputed_tokens: usize,
    /// Prompt tokens computed from scratch (those no stored run covered, and the last).
    pub computed_tokens: usize,
    /// Runs spliced from stored chunks.
    pub spans: usize,
    /// Of those, runs inside a chunk rather than a whole chunk.
    pub partial_spans: usize,
    /// Distinct stored chunks the runs came from.
    pub chunks_hit: usize,
    /// New chunks stored from this prompt.
    pub chunks_stored: usize,
    /// Where the prefill's time went.
    pub timings: Timings,
}

/// Phases of one prefill, microseconds (what `kvgate bench rag` breaks TTFT into).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Finding the stored runs (the span index or the prefix tree).
    pub lookup_us: u64,
    /// Fetching them and splicing them in (rotation included).
    pub splice_us: u64,
    /// Layers `0..check_layer` and the K/V at `check_layer` over every token, the deviations,
    /// the attention probe and the selection (compose).
    pub check_us: u64,
    /// The remaining layers over the recomputed and new tokens (or the whole forward).
    pub compute_us: u64,
    /// Cutting and storing new chunks.
    pub store_us: u64,
    /// Echo's scoring of the prompt after the prefill (LM head and log-softmax of the rows
    /// not remembered); 0 without `echo` and `logprobs`.
    pub score_us: u64,
}

/// A prompt as the chunker sees it.
pub struct CutInput<'a> {
    pub ids: &'a [u32],
    /// Byte offset in `text` where each token starts.
    pub offsets: &'a [u32],
    pub text: &'a str,
    /// Token indices where chat messages begin.
    pub segment_starts: &'a [usize],
    /// Target chunk size, tokens.
    pub chunk_tokens: usize,
}

/// The reused tokens as the selector sees them.
pub struct SelectInput<'a> {
    pub deviations: &'a [f32],
    /// Each reused token's position in the prompt.
    pub positions: &'a [u32],
    /// Index into `deviations` where each reused chunk begins.
    pub chunk_starts: &'a [u32],
    /// Per reused token, the attention it receives at the check layer from the prompt's last
    /// tokens (averaged over heads and tokens): how much the question reads it.
    pub attention: &'a [f32],
    pub budget: usize,
}

/// The prompt's last tokens whose attention weighs the reused ones ([`SelectInput::attention`]).
pub const ATTENTION_QUERIES: usize = 32;

/// The policy seams of a prefill: where to cut, what to recompute. `policy` answers them with
/// plugins; [`BuiltinPolicy`] is the in-process default.
pub trait Policy {
    /// Non-empty contiguous ranges covering the prompt, never spanning a segment start.
    fn cut(&self, input: &CutInput) -> Vec<Range<usize>>;
    /// Indices into the reused tokens to recompute, ascending.
    fn select(&self, input: &SelectInput) -> Vec<u32>;
}

/// Fixed-size cuts within segments; half the budget to the most-read tokens, half to the
/// largest deviations (or, with `chunk_head_tokens`, EPIC-style chunk heads then the largest
/// deviations).
#[derive(Debug, Clone, Copy, Default)]
pub struct BuiltinPolicy {
    pub chunk_head_tokens: usize,
}

impl Policy for BuiltinPolicy {
    fn cut(&self, input: &CutInput) -> Vec<Range<usize>> {
        chunk::fixed_cuts(input.ids.len(), input.segment_starts, input.chunk_tokens)
    }

    fn select(&self, i: &SelectInput) -> Vec<u32> {
        match self.chunk_head_tokens {
            0 => {
                select::attention_then_deviation(i.deviations, i.attention, i.budget, select::attention_share(i.budget))
            }
            head => select::chunk_heads_then_deviation(i.deviations, i.chunk_starts, i.budget, head),
        }
    }
}

/// A prompt's prefill: the filled cache, the last token's logits and what reuse did.
pub struct Prefill {
    pub cache: KvCache,
    pub logits: Vec<f32>,
    pub report: ReuseReport,
    /// When asked for ([`Prefilling::keeping_hidden`]): the last layer's hidden states the
    /// prefill knows, what scoring the prompt reads instead of running the layers again.
    pub hidden: Option<KnownStates>,
}

/// The last layer's hidden states of a prompt's rows from `first` on to its end, as far as a
/// prefill knows them all, and where each came from. A row's state is the one it was
/// computed with: this prefill's, or that of the stored chunk it came from — which, like the
/// chunk's K/V, saw the chunk's first context.
pub struct KnownStates {
    pub first: usize,
    /// `(prompt rows − first) × hidden`.
    pub x: Vec<f32>,
    /// Per row from `first`: `None` when the prefill computed its state, or the chunk (an
    /// index in `chunks`) and the chunk's row it was read from.
    pub stored: Vec<Option<(usize, usize)>>,
    pub chunks: Vec<(ChunkKey, Arc<ChunkKv>)>,
}

/// Prefills `ids` (cut at `segment_starts`) in `mode` with the built-in policies, reading
/// and extending `store`.
pub fn prefill(
    model: &Model,
    ids: &[u32],
    segment_starts: &[usize],
    mode: CacheMode,
    opts: &BlendOptions,
    store: &dyn ChunkStore,
) -> Result<Prefill, EngineError> {
    let input = CutInput { ids, offsets: &[], text: "", segment_starts, chunk_tokens: opts.chunk_tokens };
    prefill_with(model, &input, mode, opts, store, &BuiltinPolicy { chunk_head_tokens: opts.chunk_head_tokens })
}

/// Prefills a prompt in `mode`, cutting and selecting through `policy`, in one go.
pub fn prefill_with(
    model: &Model,
    prompt: &CutInput,
    mode: CacheMode,
    opts: &BlendOptions,
    store: &dyn ChunkStore,
    policy: &dyn Policy,
) -> Result<Prefill, EngineError> {
    let mut task = Prefilling::new(model, prompt, mode, opts);
    loop {
        if let Some(done) = task.step(model, store, policy, usize::MAX)? {
            return Ok(done);
        }
    }
}

/// The taper of compose's recompute pass over `layers` layers (the check layer first) for a
/// `budget` of the `reused` tokens: how many tokens the selector is asked for, and how many of
/// those stay recomputed at each layer — falling linearly from the ask to the last layer's
/// count, `taper` times fewer, their mean the budget's (or as near as `reused` allows).
pub(crate) fn taper_schedule(budget: usize, reused: usize, taper: f32, layers: usize) -> (usize, Vec<usize>) {
    let budget = budget.min(reused);
    if taper <= 1.0 || layers < 2 || budget == 0 {
        return (budget, vec![budget; layers]);
    }
    let t = taper as f64;
    let ask = ((budget as f64 * 2.0 * t / (1.0 + t)).round() as usize).min(reused);
    let last = (2 * budget).saturating_sub(ask) as f64;
    let counts = (0..layers)
        .map(|j| (ask as f64 + (last - ask as f64) * j as f64 / (layers - 1) as f64).round() as usize)
        .collect();
    (ask, counts)
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros() as u64
}

/// Writes the stored chunk's rows `from..` into cache rows `rows` (which sit at their own
/// positions): K rotated to those positions, V as is.
fn splice(model: &Model, cache: &mut KvCache, kv: &ChunkKv, from: usize, rows: Range<usize>) {
    let d = cache.kv_dim();
    let positions = cache.positions[rows.clone()].to_vec();
    let stored_at: Option<Vec<u32>> = kv.rotated_at.map(|p| (p + from as u32..).take(rows.len()).collect());
    let src = from * d..(from + rows.len()) * d;
    for (l, layer) in cache.rows_mut(rows.start).iter_mut().enumerate() {
        let k = &mut layer.k[rows.start * d..rows.end * d];
        k.copy_from_slice(&kv.k[l][src.clone()]);
        match &stored_at {
            None => model.rope().rotate(k, &positions, 1.0),
            Some(at) if *at == positions => {} // exact: already rotated for these positions
            Some(at) => model.rope().rerotate(k, at, &positions),
        }
        layer.v[rows.start * d..rows.end * d].copy_from_slice(&kv.v[l][src.clone()]);
    }
}

/// The chunk at `rows` of `cache` for the store: K before RoPE (`rotated = false`) or as
/// rotated in the cache, with the rows' last-layer hidden states when known (else none).
fn extract(
    model: &Model,
    cache: &KvCache,
    ids: &[u32],
    rows: Range<usize>,
    rotated: bool,
    hidden: Option<&[f32]>,
) -> ChunkKv {
    let d = cache.kv_dim();
    let k = match rotated {
        true => cache.layers().iter().map(|l| l.k[rows.start * d..rows.end * d].to_vec()).collect(),
        false => cache.pre_rope_k(rows.clone(), model.rope()),
    };
    ChunkKv {
        tokens: ids[rows.clone()].to_vec(),
        rotated_at: rotated.then(|| cache.positions[rows.start]),
        parent: None,
        namespace: Default::default(),
        k,
        v: cache.layers().iter().map(|l| l.v[rows.start * d..rows.end * d].to_vec()).collect(),
        hidden: hidden.map(<[f32]>::to_vec).unwrap_or_default(),
    }
}

/// `run` cut where the chunker cut the prompt (`cuts`), pieces shorter than `min_len`
/// joined to the piece before them (or after, for the first).
pub(crate) fn pieces(run: Range<usize>, cuts: &[Range<usize>], min_len: usize) -> Vec<Range<usize>> {
    let mut bounds: Vec<usize> = vec![run.start];
    bounds.extend(cuts.iter().map(|c| c.start).filter(|&s| s > run.start && s < run.end));
    bounds.push(run.end);
    let mut out: Vec<Range<usize>> = Vec::new();
    for w in bounds.windows(2) {
        match out.last_mut() {
            Some(last) if w[1] - w[0] < min_len || last.len() < min_len => last.end = w[1],
            _ => out.push(w[0]..w[1]),
        }
    }
    out
}

/// The parts of `0..n` that no range of `covered` (sorted, disjoint) covers.
pub(crate) fn gaps(covered: impl Iterator<Item = Range<usize>>, n: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in covered {
        if r.start > at {
            out.push(at..r.start);
        }
        at = at.max(r.end);
    }
    if at < n {
        out.push(at..n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_follow_the_cuts_and_join_short_ones() {
        let cuts = [0..10, 10..40, 40..43, 43..100];
        assert_eq!(pieces(5..100, &cuts, 8), vec![5..43, 43..100]);
        assert_eq!(pieces(0..100, &cuts, 1), vec![0..10, 10..40, 40..43, 43..100]);
        assert_eq!(pieces(12..20, &cuts, 16), vec![12..20], "a run shorter than min_len stays one piece");
        assert_eq!(pieces(0..12, &cuts, 8), vec![0..12], "a short first piece takes the next");
    }

    #[test]
    fn a_taper_spends_the_budget_on_average_and_narrows_to_the_last_layer() {
        assert_eq!(taper_schedule(30, 200, 1.0, 28), (30, vec![30; 28]), "no taper: the budget at every layer");
        let (ask, counts) = taper_schedule(30, 200, 4.0, 28);
        assert_eq!((ask, counts[0], *counts.last().unwrap()), (48, 48, 12));
        assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
        let mean = counts.iter().sum::<usize>() as f64 / counts.len() as f64;
        assert!((mean - 30.0).abs() < 0.5, "mean {mean}");
        let (ask, counts) = taper_schedule(200, 200, 4.0, 28);
        assert_eq!((ask, counts), (200, vec![200; 28]), "a budget of everything stays everything");
        assert_eq!(taper_schedule(0, 200, 4.0, 28), (0, vec![0; 28]));
        assert_eq!(taper_schedule(30, 200, 4.0, 1), (30, vec![30]));
    }

    #[test]
    fn gaps_are_what_no_range_covers() {
        assert_eq!(gaps([2..5, 5..7, 9..10].into_iter(), 12), vec![0..2, 7..9, 10..12]);
        assert_eq!(gaps(std::iter::empty(), 3), vec![0..3]);
        assert_eq!(gaps([0..3].into_iter(), 3), Vec::<Range<usize>>::new());
    }
}
