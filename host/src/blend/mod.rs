//! Compositional reuse: cached chunks spliced into new prompts at new positions, with a
//! selected set of tokens recomputed to stitch them together (CacheBlend-style).
//!
//! Owns the prefill of a prompt given what the chunk store holds. Uses `engine`'s
//! layer-level forward and a [`ChunkStore`]; knows nothing of HTTP or of how the store keeps
//! its bytes (`store` does). Three modes, selectable per request so they can be compared on one server:
//!
//! - `off`: full prefill, nothing read or written.
//! - `prefix`: classic prefix caching — chunks are keyed by everything before them too, so
//!   only an exact prefix is reused (exact KV, nothing recomputed).
//! - `compose`: every chunk is keyed by its content alone. Hits are spliced in (K rotated
//!   from pre-RoPE to the chunk's new positions, V as is); layers `0..=check_layer` run over
//!   the whole prompt, the deviation of each reused token's K/V at `check_layer` is measured,
//!   the selector picks the tokens to recompute, and the remaining layers run only over those
//!   plus every token of a missed chunk and the final chunk. Every recomputed token attends
//!   to exactly the keys at positions `≤` its own.
//!
//! New chunks are stored with the KV computed in this prompt's context (pre-RoPE K, V).
//!
//! - [`chunk`]: cutting prompts into chunks, chunk keys.
//! - [`select`]: the recompute selection (top deviation).

pub mod chunk;
pub mod select;

use std::ops::Range;
use std::sync::Arc;

use crate::engine::{EngineError, KvCache, Model, Weights};
use crate::store::{ChunkKv, ChunkStore};
use chunk::ChunkKey;

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
    /// Share of reused tokens recomputed, 0..=1.
    pub recompute_budget: f32,
    /// Layer at which deviations are measured; layers up to it run over every token.
    pub check_layer: usize,
    /// Tokens at the head of every reused chunk recomputed first (EPIC), within the budget.
    pub chunk_head_tokens: usize,
}

impl Default for BlendOptions {
    fn default() -> Self {
        Self { chunk_tokens: 256, recompute_budget: 0.15, check_layer: 1, chunk_head_tokens: 0 }
    }
}

/// What reuse did for one prompt (reported in responses and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ReuseReport {
    /// Prompt tokens whose KV came from the cache.
    pub reused_tokens: usize,
    /// Of those, recomputed in the later layers.
    pub recomputed_tokens: usize,
    /// Prompt tokens computed from scratch (missed chunks and the final chunk).
    pub computed_tokens: usize,
    pub chunks_hit: usize,
    /// Chunks looked up (every chunk but the final one).
    pub chunks_total: usize,
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
    pub budget: usize,
}

/// The policy seams of a prefill: where to cut, what to recompute. `policy` answers them with
/// plugins; [`BuiltinPolicy`] is the in-process default.
pub trait Policy {
    /// Non-empty contiguous ranges covering the prompt, never spanning a segment start.
    fn cut(&self, input: &CutInput) -> Vec<Range<usize>>;
    /// Indices into the reused tokens to recompute, ascending.
    fn select(&self, input: &SelectInput) -> Vec<u32>;
}

/// Fixed-size cuts within segments; top deviation (optionally after EPIC-style chunk heads).
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
            0 => select::top_deviation(i.deviations, i.chunk_starts, i.budget),
            head => select::chunk_heads_then_deviation(i.deviations, i.chunk_starts, i.budget, head),
        }
    }
}

/// A prompt's prefill: the filled cache, the last token's logits and what reuse did.
pub struct Prefill {
    pub cache: KvCache,
    pub logits: Vec<f32>,
    pub report: ReuseReport,
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

/// Prefills a prompt in `mode`, cutting and selecting through `policy`.
pub fn prefill_with(
    model: &Model,
    prompt: &CutInput,
    mode: CacheMode,
    opts: &BlendOptions,
    store: &dyn ChunkStore,
    policy: &dyn Policy,
) -> Result<Prefill, EngineError> {
    let ids = prompt.ids;
    let positions: Vec<u32> = (0..ids.len() as u32).collect();
    let chunks = match mode {
        CacheMode::Off => Vec::new(),
        _ => policy.cut(prompt),
    };
    match mode {
        CacheMode::Off => {
            let looked_up = chunk::fixed_cuts(ids.len(), prompt.segment_starts, opts.chunk_tokens).len();
            full(model, ids, &positions, looked_up)
        }
        CacheMode::Prefix => prefix(model, ids, &positions, &chunks, store),
        CacheMode::Compose => compose(model, ids, &positions, &chunks, opts, store, policy),
    }
}

fn full(model: &Model, ids: &[u32], positions: &[u32], chunks: usize) -> Result<Prefill, EngineError> {
    let mut cache = model.new_cache();
    let logits = extend(model, ids, positions, &mut cache)?;
    let report =
        ReuseReport { computed_tokens: ids.len(), chunks_total: chunks.saturating_sub(1), ..Default::default() };
    Ok(Prefill { cache, logits, report })
}

/// Prefills `ids` at `positions` after what `cache` holds, with the f32 weights whatever the
/// count (so a short remainder after a reused prefix computes exactly what a full prefill
/// would); returns the last token's logits.
fn extend(model: &Model, ids: &[u32], positions: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, EngineError> {
    let mut x = model.embed(ids, positions)?;
    let rows: Vec<usize> = cache.push_rows(positions).collect();
    model.run_layers(0..model.config().layers, &mut x, positions, &rows, cache, Weights::F32)?;
    model.logits(&x, &[ids.len() - 1])
}

/// Writes a stored chunk into cache rows `rows` (which sit at `positions`).
fn splice(model: &Model, cache: &mut KvCache, kv: &ChunkKv, rows: Range<usize>) {
    let d = cache.kv_dim();
    let positions = cache.positions[rows.clone()].to_vec();
    let stored_at: Option<Vec<u32>> = kv.rotated_at.map(|p| (p..p + rows.len() as u32).collect());
    for (l, layer) in cache.layers.iter_mut().enumerate() {
        let k = &mut layer.k[rows.start * d..rows.end * d];
        k.copy_from_slice(&kv.k[l]);
        match &stored_at {
            None => model.rope().rotate(k, &positions, 1.0),
            Some(from) if *from == positions => {} // exact: already rotated for these positions
            Some(from) => model.rope().rerotate(k, from, &positions),
        }
        layer.v[rows.start * d..rows.end * d].copy_from_slice(&kv.v[l]);
    }
}

/// The chunk at `rows` of `cache` for the store: K before RoPE (`rotated = false`) or as
/// rotated in the cache.
fn extract(model: &Model, cache: &KvCache, ids: &[u32], rows: Range<usize>, rotated: bool) -> Arc<ChunkKv> {
    let d = cache.kv_dim();
    let k = match rotated {
        true => cache.layers.iter().map(|l| l.k[rows.start * d..rows.end * d].to_vec()).collect(),
        false => cache.pre_rope_k(rows.clone(), model.rope()),
    };
    Arc::new(ChunkKv {
        tokens: ids[rows.clone()].to_vec(),
        rotated_at: rotated.then(|| cache.positions[rows.start]),
        k,
        v: cache.layers.iter().map(|l| l.v[rows.start * d..rows.end * d].to_vec()).collect(),
    })
}

/// Microseconds per token of the computation that started at `since` over `tokens` tokens.
fn cost_per_token(since: std::time::Instant, tokens: usize) -> u64 {
    since.elapsed().as_micros() as u64 / tokens.max(1) as u64
}

fn prefix(
    model: &Model,
    ids: &[u32],
    positions: &[u32],
    chunks: &[Range<usize>],
    store: &dyn ChunkStore,
) -> Result<Prefill, EngineError> {
    let started = std::time::Instant::now();
    let fp = model.fingerprint();
    let mut cache = model.new_cache();
    let looked_up = &chunks[..chunks.len() - 1];
    let mut hit_end = 0;
    let mut chunks_hit = 0;
    for c in looked_up {
        let Some(kv) = store.get(&ChunkKey::prefix(fp, &ids[..c.end])) else { break };
        if kv.tokens != ids[c.clone()] {
            break; // a hash collision would be a wrong answer: treat it as a miss
        }
        let rows = cache.push_rows(&positions[c.clone()]);
        splice(model, &mut cache, &kv, rows);
        hit_end = c.end;
        chunks_hit += 1;
    }
    let logits = extend(model, &ids[hit_end..], &positions[hit_end..], &mut cache)?;
    let cost = cost_per_token(started, ids.len() - hit_end);
    for c in looked_up.iter().filter(|c| c.start >= hit_end) {
        let kv = extract(model, &cache, ids, c.clone(), true);
        store.put(ChunkKey::prefix(fp, &ids[..c.end]), kv, cost * c.len() as u64);
    }
    let report = ReuseReport {
        reused_tokens: hit_end,
        recomputed_tokens: 0,
        computed_tokens: ids.len() - hit_end,
        chunks_hit,
        chunks_total: looked_up.len(),
    };
    Ok(Prefill { cache, logits, report })
}

fn compose(
    model: &Model,
    ids: &[u32],
    positions: &[u32],
    chunks: &[Range<usize>],
    opts: &BlendOptions,
    store: &dyn ChunkStore,
    policy: &dyn Policy,
) -> Result<Prefill, EngineError> {
    let fp = model.fingerprint();
    let n = ids.len();
    let layers = model.config().layers;
    let t0 = std::time::Instant::now();
    let looked_up = &chunks[..chunks.len() - 1];
    let mut cache = model.new_cache();
    let all_rows: Vec<usize> = cache.push_rows(positions).collect();

    // Splice every hit; remember which chunks missed.
    let mut hits: Vec<Range<usize>> = Vec::new();
    let mut misses: Vec<Range<usize>> = Vec::new();
    for c in looked_up {
        match store.get(&ChunkKey::compose(fp, &ids[c.clone()])) {
            Some(kv) if kv.tokens == ids[c.clone()] => {
                splice(model, &mut cache, &kv, c.clone());
                hits.push(c.clone());
            }
            _ => misses.push(c.clone()),
        }
    }
    let reused: Vec<usize> = hits.iter().flat_map(|c| c.clone()).collect();
    let t_splice = t0.elapsed();
    let check = opts.check_layer.min(layers - 1);
    if reused.is_empty() || check + 1 >= layers {
        // Nothing to reuse (or no layer left to skip): a plain prefill, storing every chunk.
        let mut x = model.embed(ids, positions)?;
        model.run_layers(0..layers, &mut x, positions, &all_rows, &mut cache, Weights::F32)?;
        let logits = model.logits(&x, &[n - 1])?;
        let cost = cost_per_token(t0, n);
        for c in &misses {
            let kv = extract(model, &cache, ids, c.clone(), false);
            store.put(ChunkKey::compose(fp, &ids[c.clone()]), kv, cost * c.len() as u64);
        }
        let report = ReuseReport { computed_tokens: n, chunks_total: looked_up.len(), ..Default::default() };
        return Ok(Prefill { cache, logits, report });
    }

    // Layers 0..=check over every token; measure how far the reused K/V at `check` are from
    // what this context gives.
    let d = cache.kv_dim();
    let spliced_k: Vec<f32> = reused.iter().flat_map(|&r| cache.layers[check].k[r * d..(r + 1) * d].to_vec()).collect();
    let spliced_v: Vec<f32> = reused.iter().flat_map(|&r| cache.layers[check].v[r * d..(r + 1) * d].to_vec()).collect();
    let mut x = model.embed(ids, positions)?;
    model.run_layers(0..check + 1, &mut x, positions, &all_rows, &mut cache, Weights::F32)?;
    let deviations: Vec<f32> = reused
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let fresh_k = &cache.layers[check].k[r * d..(r + 1) * d];
            let fresh_v = &cache.layers[check].v[r * d..(r + 1) * d];
            let dk: f32 = fresh_k.iter().zip(&spliced_k[i * d..(i + 1) * d]).map(|(a, b)| (a - b) * (a - b)).sum();
            let dv: f32 = fresh_v.iter().zip(&spliced_v[i * d..(i + 1) * d]).map(|(a, b)| (a - b) * (a - b)).sum();
            dk + dv
        })
        .collect();
    let t_check = t0.elapsed();
    let mut chunk_starts = Vec::with_capacity(hits.len());
    let mut offset = 0u32;
    for c in &hits {
        chunk_starts.push(offset);
        offset += c.len() as u32;
    }
    let budget = ((opts.recompute_budget.clamp(0.0, 1.0) * reused.len() as f32).round() as usize).min(reused.len());
    let reused_positions: Vec<u32> = reused.iter().map(|&r| positions[r]).collect();
    let selected = policy.select(&SelectInput {
        deviations: &deviations,
        positions: &reused_positions,
        chunk_starts: &chunk_starts,
        budget,
    });

    // The remaining layers over the selected reused tokens, every missed token and the final
    // chunk, in position order.
    let mut recompute: Vec<usize> = selected.iter().map(|&i| reused[i as usize]).collect();
    recompute.extend(misses.iter().flat_map(|c| c.clone()));
    recompute.extend(chunks[chunks.len() - 1].clone());
    recompute.sort_unstable();
    let hidden = model.config().hidden;
    let mut xs: Vec<f32> = recompute.iter().flat_map(|&r| x[r * hidden..(r + 1) * hidden].iter().copied()).collect();
    let sub_positions: Vec<u32> = recompute.iter().map(|&r| positions[r]).collect();
    model.run_layers(check + 1..layers, &mut xs, &sub_positions, &recompute, &mut cache, Weights::F32)?;
    let logits = model.logits(&xs, &[recompute.len() - 1])?;
    let t_recompute = t0.elapsed();

    // What a missed chunk cost: its share of the layers run over every token, plus its share
    // of the recomputed ones.
    let cost = (t_check - t_splice).as_micros() as u64 / n as u64
        + (t_recompute - t_check).as_micros() as u64 / recompute.len() as u64;
    for c in &misses {
        let kv = extract(model, &cache, ids, c.clone(), false);
        store.put(ChunkKey::compose(fp, &ids[c.clone()]), kv, cost * c.len() as u64);
    }
    let report = ReuseReport {
        reused_tokens: reused.len(),
        recomputed_tokens: selected.len(),
        computed_tokens: n - reused.len(),
        chunks_hit: hits.len(),
        chunks_total: looked_up.len(),
    };
    tracing::debug!(
        splice_ms = t_splice.as_secs_f64() * 1e3,
        check_ms = (t_check - t_splice).as_secs_f64() * 1e3,
        recompute_ms = (t_recompute - t_check).as_secs_f64() * 1e3,
        store_ms = (t0.elapsed() - t_recompute).as_secs_f64() * 1e3,
        recomputed = recompute.len(),
        "compose prefill"
    );
    Ok(Prefill { cache, logits, report })
}
