//! `kvgate bench policies`: what the policy plugins cost and what they win, in this process.
//!
//! - Call overhead: each plugin's call on a realistic request (a ~1100-token RAG prompt,
//!   ~900 reused tokens, 1000 eviction candidates) against the built-in it replaces, µs.
//! - Chunking: the token hit rate of compositional reuse when new content is cut by the
//!   `cdc-chunker` plugin or by fixed-size cuts, on every trace shape of `kvgate bench rag`,
//!   beside the oracle (what a perfect matcher could reuse). Reuse needs only equal tokens, so
//!   the store is replayed as the span index over token ids alone: exact, and fast enough for
//!   hundreds of requests.
//! - Eviction: the real RAM tier under a budget of 30 % of the working set, replaying the same
//!   kind of trace with least-recently-used and with the `evictor` plugin, with and without a
//!   scan of one-off passages mixed in.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::oracle::Oracle;
use super::trace::{self, Label, Shape, TraceOptions};
use crate::blend::{BuiltinPolicy, CutInput, Policy, SelectInput};
use crate::engine::{ChatMessage, LoadedModel};
use crate::policy::{PluginKind, Policies};
use crate::store::span::Tier;
use crate::store::{
    Candidate, ChunkKey, ChunkKv, ChunkStore, Evictor, LeastRecentlyUsed, SpanIndex, Store, StoreOptions,
};

#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    pub kind: &'static str,
    pub plugin: Option<String>,
    pub builtin_us: f64,
    pub plugin_us: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HitRate {
    pub layout: &'static str,
    pub chunker: String,
    pub chunk_tokens: usize,
    pub token_hit_rate: f64,
    /// What a perfect matcher could reuse of the same prompts.
    pub oracle_hit_rate: f64,
    /// New chunks stored per request.
    pub mean_chunks: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvictionRate {
    pub trace: &'static str,
    pub evictor: String,
    pub budget_share: f64,
    pub token_hit_rate: f64,
    pub evictions: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyFigures {
    pub overhead: Vec<Overhead>,
    pub chunking: Vec<HitRate>,
    pub eviction: Vec<EvictionRate>,
}

/// A tokenized request: ids, message starts, text and offsets.
struct Tokenized {
    ids: Vec<u32>,
    starts: Vec<usize>,
    text: String,
    offsets: Vec<u32>,
}

fn tokenize(m: &LoadedModel, prompt: &Value) -> anyhow::Result<Tokenized> {
    let msgs: Vec<ChatMessage> = prompt["messages"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("a prompt without messages"))?
        .iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap_or("user").into(),
            content: m["content"].as_str().unwrap_or("").into(),
        })
        .collect();
    let (ids, starts) = m.encode_chat(&msgs)?;
    let (text, offsets) = m.token_text(&ids);
    Ok(Tokenized { ids, starts, text, offsets })
}

impl Tokenized {
    fn input(&self, chunk_tokens: usize) -> CutInput<'_> {
        CutInput {
            ids: &self.ids,
            offsets: &self.offsets,
            text: &self.text,
            segment_starts: &self.starts,
            chunk_tokens,
        }
    }
}

fn median_us(mut f: impl FnMut(), reps: usize) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Runs all three parts with the components in `plugins` (and `examples`, when given, for
/// extra evictors).
pub fn run(
    m: &LoadedModel,
    plugins: &Arc<Policies>,
    corpus: &Path,
    requests: usize,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<PolicyFigures> {
    let passages = trace::passages(corpus, 200)?;
    let opts = |shape, seed| TraceOptions { shape, k: 4, pool: 40, zipf_s: 1.0, seed };
    let status = plugins.status();
    let name = |k: PluginKind| status.iter().find(|s| s.kind == k).and_then(|s| s.name.clone());

    progress("call overhead");
    let sample = tokenize(m, &trace::prompts(&passages, &opts(Shape::Joined(Label::Passage), 1), 1)[0].body)?;
    let plugin = plugins.for_request(0);
    let builtin = BuiltinPolicy::default();
    let mut overhead = Vec::new();
    let input = sample.input(256);
    overhead.push(Overhead {
        kind: "chunker",
        plugin: name(PluginKind::Chunker),
        builtin_us: median_us(|| drop(builtin.cut(&input)), 201),
        plugin_us: name(PluginKind::Chunker).map(|_| median_us(|| drop(plugin.cut(&input)), 201)),
    });
    let n = sample.ids.len() * 4 / 5;
    let deviations: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 10.0).collect();
    let positions: Vec<u32> = (0..n as u32).collect();
    let chunk_starts: Vec<u32> = (0..n as u32).step_by(260).collect();
    let sel = SelectInput {
        deviations: &deviations,
        positions: &positions,
        chunk_starts: &chunk_starts,
        attention: &deviations,
        budget: n * 15 / 100,
    };
    overhead.push(Overhead {
        kind: "selector",
        plugin: name(PluginKind::Selector),
        builtin_us: median_us(|| drop(builtin.select(&sel)), 201),
        plugin_us: name(PluginKind::Selector).map(|_| median_us(|| drop(plugin.select(&sel)), 201)),
    });
    let cands: Vec<Candidate> = (0..1000u64)
        .map(|i| Candidate {
            bytes: 10_000 + (i * 37 % 100) * 100,
            tokens: 200,
            created_ms: 1_000_000 + i,
            last_access_ms: 2_000_000 + (i * 7919) % 100_000,
            hits: (i % 5) as u32,
            cost_us: 400_000,
        })
        .collect();
    let evictor = plugins.evictor();
    overhead.push(Overhead {
        kind: "evictor",
        plugin: name(PluginKind::Evictor),
        builtin_us: median_us(|| drop(LeastRecentlyUsed.victims(&cands, 200_000, 3_000_000)), 201),
        plugin_us: name(PluginKind::Evictor)
            .map(|_| median_us(|| drop(evictor.victims(&cands, 200_000, 3_000_000)), 201)),
    });

    progress("chunking hit rates");
    let mut chunking = Vec::new();
    let min_span = crate::blend::BlendOptions::default().min_span;
    for shape in Shape::ALL {
        let trace: Vec<Tokenized> = trace::prompts(&passages, &opts(shape, 11), requests)
            .iter()
            .map(|p| tokenize(m, &p.body))
            .collect::<anyhow::Result<_>>()?;
        let oracle = replay_oracle(&trace, min_span);
        for chunk_tokens in [256, 64] {
            let mut chunkers: Vec<(String, &dyn Policy)> = vec![("fixed-size (built-in)".into(), &builtin)];
            if let Some(n) = name(PluginKind::Chunker) {
                chunkers.push((n, &plugin));
            }
            for (label, policy) in chunkers {
                let (rate, chunks) = replay_chunking(m, &trace, policy, chunk_tokens, min_span);
                chunking.push(HitRate {
                    layout: shape.name(),
                    chunker: label,
                    chunk_tokens,
                    token_hit_rate: rate,
                    oracle_hit_rate: oracle,
                    mean_chunks: chunks,
                });
            }
        }
    }

    progress("eviction hit rates");
    let mut eviction = Vec::new();
    let trace: Vec<Tokenized> = trace::prompts(&passages, &opts(Shape::Messages, 13), requests)
        .iter()
        .map(|p| tokenize(m, &p.body))
        .collect::<anyhow::Result<_>>()?;
    // The same trace with every third request replaced by four passages seen once only.
    let one_off: Vec<Tokenized> = (0..requests / 3)
        .map(|i| {
            let chosen: Vec<&String> = passages.iter().skip(40 + 4 * i).take(4).collect();
            let mut msgs = vec![serde_json::json!({"role": "system", "content": "Answer from the passages."})];
            msgs.extend(
                chosen.iter().map(|p| serde_json::json!({"role": "user", "content": format!("Passage:\n{p}")})),
            );
            msgs.push(serde_json::json!({"role": "user", "content": "Question: what is this about?"}));
            tokenize(m, &serde_json::json!({ "messages": msgs }))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut scanned: Vec<&Tokenized> = Vec::new();
    let mut scans = one_off.iter();
    for (i, t) in trace.iter().enumerate() {
        match (i % 3 == 2).then(|| scans.next()).flatten() {
            Some(s) => scanned.push(s),
            None => scanned.push(t),
        }
    }
    let plain: Vec<&Tokenized> = trace.iter().collect();
    let mut evictors: Vec<(String, Arc<dyn Evictor>)> =
        vec![("least recently used (built-in)".into(), Arc::new(LeastRecentlyUsed))];
    if let Some(n) = name(PluginKind::Evictor) {
        evictors.push((n, evictor.clone()));
    }
    for (label, trace) in [("Zipf", &plain), ("Zipf + one-off scans", &scanned)] {
        for (name, e) in &evictors {
            let (rate, evictions) = replay_eviction(m, trace, e.clone(), 0.3);
            eviction.push(EvictionRate {
                trace: label,
                evictor: name.clone(),
                budget_share: 0.3,
                token_hit_rate: rate,
                evictions,
            });
        }
    }
    Ok(PolicyFigures { overhead, chunking, eviction })
}

/// Token hit rate of compose-mode reuse over `trace` with an unbounded store, skipping the
/// first quarter (warm-up): the span index replayed as the server runs it (the last token
/// always computed; what no stored run covers cut by `policy` and stored); and the mean
/// number of chunks stored per request.
fn replay_chunking(
    m: &LoadedModel,
    trace: &[Tokenized],
    policy: &dyn Policy,
    chunk_tokens: usize,
    min_span: usize,
) -> (f64, f64) {
    let mut index = SpanIndex::new(min_span);
    let (mut reused, mut total, mut chunks) = (0usize, 0usize, 0usize);
    let warm = trace.len() / 4;
    for (i, t) in trace.iter().enumerate() {
        let n = t.ids.len();
        let found = index.find(&t.ids[..n - 1], &[0]);
        if i >= warm {
            reused += found.iter().map(|s| s.len()).sum::<usize>();
            total += n;
        }
        let runs: Vec<_> = crate::blend::gaps(found.iter().map(|s| s.prompt.clone()), n)
            .into_iter()
            .filter(|r| r.len() >= min_span)
            .collect();
        if runs.is_empty() {
            continue;
        }
        let cuts = policy.cut(&t.input(chunk_tokens));
        for run in runs {
            for piece in crate::blend::pieces(run, &cuts, min_span) {
                let tokens = &t.ids[piece];
                index.held(ChunkKey::compose(m.model.fingerprint(), tokens), tokens, None, Tier::Ram, 0);
                chunks += 1;
            }
        }
    }
    (reused as f64 / total.max(1) as f64, chunks as f64 / trace.len().max(1) as f64)
}

/// The oracle hit rate of `trace` after the same warm-up.
fn replay_oracle(trace: &[Tokenized], min_span: usize) -> f64 {
    let mut oracle = Oracle::new(min_span);
    let warm = trace.len() / 4;
    let (mut spans, mut total) = (0, 0);
    for (i, t) in trace.iter().enumerate() {
        let r = oracle.observe(&t.ids);
        if i >= warm {
            (spans, total) = (spans + r.spans, total + r.tokens);
        }
    }
    spans as f64 / total.max(1) as f64
}

/// Token hit rate of the real RAM tier under `share` of the trace's working set, evicting
/// through `evictor`; and the evictions it made.
fn replay_eviction(m: &LoadedModel, trace: &[&Tokenized], evictor: Arc<dyn Evictor>, share: f64) -> (f64, u64) {
    let fp = m.model.fingerprint();
    let chunks = |t: &Tokenized| crate::blend::chunk::fixed_cuts(t.ids.len(), &t.starts, 256);
    // Working set: every distinct chunk's bytes (KV of one value per token here: the budget
    // is a share, so only relative sizes matter).
    let mut distinct: HashSet<ChunkKey> = HashSet::new();
    let mut working = 0u64;
    for t in trace {
        let cuts = chunks(t);
        for c in &cuts[..cuts.len() - 1] {
            if distinct.insert(ChunkKey::compose(fp, &t.ids[c.clone()])) {
                working += c.len() as u64 * 8;
            }
        }
    }
    let store = Store::with_disk(
        &StoreOptions { ram_budget_bytes: (working as f64 * share) as u64, ..Default::default() },
        None,
    );
    store.set_evictor(evictor);
    let (mut reused, mut total) = (0usize, 0usize);
    let warm = trace.len() / 4;
    for (i, t) in trace.iter().enumerate() {
        let cuts = chunks(t);
        for c in &cuts[..cuts.len() - 1] {
            let key = ChunkKey::compose(fp, &t.ids[c.clone()]);
            let hit = store.get(&key).is_some();
            if hit && i >= warm {
                reused += c.len();
            }
            if !hit {
                let kv = ChunkKv {
                    tokens: t.ids[c.clone()].to_vec(),
                    rotated_at: None,
                    parent: None,
                    namespace: Default::default(),
                    k: vec![vec![0.0; c.len()]],
                    v: vec![vec![0.0; c.len()]],
                    hidden: Vec::new(),
                };
                // What recomputing it costs: ~2 ms per token on the 2-core machine.
                store.put(key, Arc::new(kv), c.len() as u64 * 2_000);
            }
        }
        if i >= warm {
            total += t.ids.len();
        }
        // Distinct milliseconds per request, so recency is well defined.
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let evictions = store.stats().ram.evictions.load(std::sync::atomic::Ordering::Relaxed);
    (reused as f64 / total.max(1) as f64, evictions)
}

/// The figures as tables.
pub fn table(f: &PolicyFigures) -> String {
    let mut out = String::from("call overhead per request (median µs)\n");
    out += &format!("  {:<9} {:<22} {:>10} {:>10}\n", "kind", "plugin", "built-in", "plugin");
    for o in &f.overhead {
        let p = o.plugin_us.map_or("-".into(), |u| format!("{u:.1}"));
        out += &format!(
            "  {:<9} {:<22} {:>10.1} {:>10}\n",
            o.kind,
            o.plugin.as_deref().unwrap_or("(none)"),
            o.builtin_us,
            p
        );
    }
    out += "\ntoken hit rate by chunker (compose, unbounded store, after warm-up), beside the oracle\n";
    for h in &f.chunking {
        out += &format!(
            "  {:<16} chunk_tokens {:>3}  {:<24} {:>6.1}% of {:>5.1}% ({:>3.0}% of the oracle, {:.1} chunks stored/request)\n",
            h.layout,
            h.chunk_tokens,
            h.chunker,
            h.token_hit_rate * 100.0,
            h.oracle_hit_rate * 100.0,
            h.token_hit_rate / h.oracle_hit_rate.max(1e-9) * 100.0,
            h.mean_chunks
        );
    }
    out += "\ntoken hit rate by evictor (RAM tier at 30% of the working set)\n";
    for e in &f.eviction {
        out += &format!(
            "  {:<22} {:<32} {:>6.1}%  ({} evictions)\n",
            e.trace,
            e.evictor,
            e.token_hit_rate * 100.0,
            e.evictions
        );
    }
    out
}
