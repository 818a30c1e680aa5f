//! Compose mode: every stored run that a prompt repeats is spliced in wherever it sits, and a
//! selected share of it is recomputed to stitch it to its new context (CacheBlend-style).

use std::collections::HashSet;
use std::time::Instant;

use super::{
    ATTENTION_QUERIES, BlendOptions, CutInput, Policy, Prefill, ReuseReport, SelectInput, Timings, extract, gaps,
    micros, pieces, splice,
};
use crate::blend::chunk::ChunkKey;
use crate::engine::{EngineError, Model, Weights};
use crate::store::{ChunkStore, SpanMatch, Use};

pub(super) fn prefill(
    model: &Model,
    prompt: &CutInput,
    opts: &BlendOptions,
    store: &dyn ChunkStore,
    policy: &dyn Policy,
) -> Result<Prefill, EngineError> {
    let ids = prompt.ids;
    let n = ids.len();
    let layers = model.config().layers;
    let positions: Vec<u32> = (0..n as u32).collect();
    let mut t = Timings::default();

    // The stored runs this prompt repeats; the last token is always computed.
    let started = Instant::now();
    let found = store.find_spans(&ids[..n - 1]);
    t.lookup_us = micros(started);

    let started = Instant::now();
    let mut cache = model.new_cache();
    let all_rows: Vec<usize> = cache.push_rows(&positions).collect();
    let mut spans: Vec<SpanMatch> = Vec::with_capacity(found.len());
    for m in found {
        let used = if m.is_partial() { Use::Part } else { Use::Whole };
        let Some(kv) = store.fetch(&m.key, used) else { continue };
        // The index found the run by its tokens; the chunk as loaded must agree, or it is a miss.
        if kv.tokens.get(m.offset..m.offset + m.len()) != Some(&ids[m.prompt.clone()]) {
            continue;
        }
        splice(model, &mut cache, &kv, m.offset, m.prompt.clone());
        spans.push(m);
    }
    let reused: Vec<usize> = spans.iter().flat_map(|m| m.prompt.clone()).collect();
    let uncovered = gaps(spans.iter().map(|m| m.prompt.clone()), n);
    t.splice_us = micros(started);

    let check = opts.check_layer.min(layers - 1);
    let started = Instant::now();
    let mut x = model.embed(ids, &positions)?;
    let (logits, selected) = if reused.is_empty() || check + 1 >= layers {
        // Nothing to reuse (or no layer left to skip): a plain prefill.
        model.run_layers(0..layers, &mut x, &positions, &all_rows, &mut cache, Weights::F32)?;
        t.compute_us = micros(started);
        (model.logits(&x, &[n - 1])?, 0)
    } else {
        // Layers 0..=check over every token; how far the reused K/V at `check` are from what
        // this context gives.
        let d = cache.kv_dim();
        let spliced: Vec<(Vec<f32>, Vec<f32>)> = reused
            .iter()
            .map(|&r| {
                (cache.layers[check].k[r * d..(r + 1) * d].to_vec(), cache.layers[check].v[r * d..(r + 1) * d].to_vec())
            })
            .collect();
        model.run_layers(0..check, &mut x, &positions, &all_rows, &mut cache, Weights::F32)?;
        let hidden = model.config().hidden;
        let queries = n.saturating_sub(ATTENTION_QUERIES)..n;
        let xq = x[queries.start * hidden..].to_vec();
        model.run_layers(check..check + 1, &mut x, &positions, &all_rows, &mut cache, Weights::F32)?;
        let mass = model.attention_mass(check, &xq, &positions[queries], &cache)?;
        let attention: Vec<f32> = reused.iter().map(|&r| mass[r]).collect();
        let deviations: Vec<f32> = reused
            .iter()
            .zip(&spliced)
            .map(|(&r, (k, v))| {
                let sq = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>();
                sq(&cache.layers[check].k[r * d..(r + 1) * d], k) + sq(&cache.layers[check].v[r * d..(r + 1) * d], v)
            })
            .collect();
        t.check_us = micros(started);
        let mut chunk_starts = Vec::with_capacity(spans.len());
        let mut offset = 0u32;
        for m in &spans {
            chunk_starts.push(offset);
            offset += m.len() as u32;
        }
        let budget = ((opts.recompute_budget.clamp(0.0, 1.0) * reused.len() as f32).round() as usize).min(reused.len());
        let reused_positions: Vec<u32> = reused.iter().map(|&r| positions[r]).collect();
        let selected = policy.select(&SelectInput {
            deviations: &deviations,
            positions: &reused_positions,
            chunk_starts: &chunk_starts,
            attention: &attention,
            budget,
        });

        // The remaining layers over the selected reused tokens and every uncovered one, in
        // position order.
        let started = Instant::now();
        let mut recompute: Vec<usize> = selected.iter().map(|&i| reused[i as usize]).collect();
        recompute.extend(uncovered.iter().flat_map(|r| r.clone()));
        recompute.sort_unstable();
        let mut xs: Vec<f32> =
            recompute.iter().flat_map(|&r| x[r * hidden..(r + 1) * hidden].iter().copied()).collect();
        let sub_positions: Vec<u32> = recompute.iter().map(|&r| positions[r]).collect();
        model.run_layers(check + 1..layers, &mut xs, &sub_positions, &recompute, &mut cache, Weights::F32)?;
        t.compute_us = micros(started);
        (model.logits(&xs, &[recompute.len() - 1])?, selected.len())
    };

    // What no stored run covered becomes new chunks, cut where the chunker says.
    let started = Instant::now();
    let computed = n - reused.len();
    let cost_per_token = (t.check_us + t.compute_us) / (computed + selected).max(1) as u64;
    let runs: Vec<_> = uncovered.iter().filter(|r| r.len() >= opts.min_span).collect();
    let cuts = if runs.is_empty() { Vec::new() } else { policy.cut(prompt) };
    let mut stored = 0;
    for run in runs {
        for piece in pieces(run.clone(), &cuts, opts.min_span) {
            let key = ChunkKey::compose(model.fingerprint(), &ids[piece.clone()]);
            if store.contains(&key) {
                continue;
            }
            let kv = extract(model, &cache, ids, piece.clone(), false);
            store.put(key, std::sync::Arc::new(kv), cost_per_token * piece.len() as u64);
            stored += 1;
        }
    }
    t.store_us = micros(started);
    let chunks_hit = spans.iter().map(|m| m.key).collect::<HashSet<_>>().len();
    let report = ReuseReport {
        reused_tokens: reused.len(),
        recomputed_tokens: selected,
        computed_tokens: computed,
        spans: spans.len(),
        partial_spans: spans.iter().filter(|m| m.is_partial()).count(),
        chunks_hit,
        chunks_stored: stored,
        timings: t,
    };
    tracing::debug!(?report, "compose prefill");
    Ok(Prefill { cache, logits, report })
}
