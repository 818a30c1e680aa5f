//! Prefix mode: classic prefix caching, to the token, as llama.cpp's server and vLLM do it.
//!
//! Stored prompts form a tree: each prefix-cache chunk knows the chunk before it, and its key
//! hashes everything up to its end. The longest stored prefix of a prompt — down to the token,
//! the last chunk perhaps used in part — is spliced in exactly (K as rotated, f32) and the rest
//! computed, which is bit for bit a full prefill. What follows the last whole stored chunk is
//! then stored as its continuation.

use std::sync::Arc;
use std::time::Instant;

use super::{CutInput, Policy, Prefill, ReuseReport, Timings, extend, extract, micros, pieces, splice};
use crate::blend::chunk::ChunkKey;
use crate::engine::{EngineError, Model};
use crate::store::{ChunkStore, Use};

pub(super) fn prefill(
    model: &Model,
    prompt: &CutInput,
    store: &dyn ChunkStore,
    policy: &dyn Policy,
) -> Result<Prefill, EngineError> {
    let ids = prompt.ids;
    let n = ids.len();
    let fp = model.fingerprint();
    let positions: Vec<u32> = (0..n as u32).collect();
    let mut t = Timings::default();
    let root = ChunkKey::prefix(fp, &[]);

    // The last token is always computed: its logits start generation.
    let started = Instant::now();
    let path = store.longest_prefix(&root, &ids[..n - 1]);
    t.lookup_us = micros(started);

    let started = Instant::now();
    let mut cache = model.new_cache();
    let (mut hit_end, mut spans, mut partial) = (0, 0, 0);
    // The last chunk used whole: new chunks continue the tree from it.
    let (mut parent, mut store_from) = (root, 0);
    for m in &path {
        let used = if m.is_partial() { Use::Part } else { Use::Whole };
        let Some(kv) = store.fetch(&m.key, used) else { break };
        let exact =
            kv.rotated_at == Some(m.prompt.start as u32) && kv.tokens.get(..m.len()) == Some(&ids[m.prompt.clone()]);
        if !exact {
            break;
        }
        let rows = cache.push_rows(&positions[m.prompt.clone()]);
        splice(model, &mut cache, &kv, 0, rows);
        hit_end = m.prompt.end;
        spans += 1;
        if m.is_partial() {
            partial += 1;
            break;
        }
        (parent, store_from) = (m.key, m.prompt.end);
    }
    t.splice_us = micros(started);

    let started = Instant::now();
    let logits = extend(model, &ids[hit_end..], &positions[hit_end..], &mut cache)?;
    t.compute_us = micros(started);
    let cost_per_token = t.compute_us / (n - hit_end) as u64;

    let started = Instant::now();
    let mut stored = 0;
    for piece in pieces(store_from..n, &policy.cut(prompt), 1) {
        let key = ChunkKey::prefix(fp, &ids[..piece.end]);
        if !store.contains(&key) {
            let mut kv = extract(model, &cache, ids, piece.clone(), true);
            kv.parent = Some(parent);
            store.put(key, Arc::new(kv), cost_per_token * piece.len() as u64);
            stored += 1;
        }
        parent = key;
    }
    t.store_us = micros(started);
    let report = ReuseReport {
        reused_tokens: hit_end,
        recomputed_tokens: 0,
        computed_tokens: n - hit_end,
        spans,
        partial_spans: partial,
        chunks_hit: spans,
        chunks_stored: stored,
        timings: t,
    };
    Ok(Prefill { cache, logits, report })
}
