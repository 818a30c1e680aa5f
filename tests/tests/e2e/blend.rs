//! Compositional reuse on the real model: splicing, rotation, selective recompute, modes.

use kvgate::blend::{self, BlendOptions, CacheMode, Prefill};
use kvgate::engine::{ChatMessage, Engine, EngineOptions, GenerateRequest, Prompt, SamplingParams, sampling};

use kvgate::store::{Store, StoreOptions};

use crate::util::model;

const PASSAGES: [&str; 3] = [
    "The Rust borrow checker enforces that references never outlive the data they point to, and that mutable references are unique.",
    "Cargo is the Rust package manager: it builds code, downloads dependencies from crates.io, runs tests and publishes packages.",
    "Traits define shared behaviour in Rust, much like interfaces in other languages, and generic functions are bounded by them.",
];

fn rag(order: &[usize], question: &str) -> Vec<ChatMessage> {
    let mut m = vec![ChatMessage { role: "system".into(), content: "Answer using the passages.".into() }];
    m.extend(order.iter().map(|&i| ChatMessage { role: "user".into(), content: PASSAGES[i].into() }));
    m.push(ChatMessage { role: "user".into(), content: question.into() });
    m
}

/// Token ids and token segment starts of a conversation, as the engine computes them.
fn tokens(msgs: &[ChatMessage]) -> (Vec<u32>, Vec<usize>) {
    let m = model();
    let text = m.template.render(msgs).unwrap();
    let enc = m.tokenizer.encode(&text).unwrap();
    let starts = kvgate::engine::template::segment_starts(&m.template, msgs)
        .into_iter()
        .map(|b| enc.offsets.partition_point(|o| o.0 < b))
        .collect();
    (enc.ids, starts)
}

/// A RAM-only store (f32, so reuse is measured without rounding).
fn ram(budget: u64) -> Store {
    Store::with_disk(&StoreOptions { ram_budget_bytes: budget, ..Default::default() }, None)
}

fn run(msgs: &[ChatMessage], mode: CacheMode, budget: f32, store: &Store) -> Prefill {
    let (ids, starts) = tokens(msgs);
    let opts = BlendOptions { recompute_budget: budget, ..Default::default() };
    blend::prefill(&model().model, &ids, &starts, mode, &opts, store).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn messages_become_chunks_and_reordered_chunks_are_hits() {
    let store = ram(1 << 30);
    let first = run(&rag(&[0, 1, 2], "What does Cargo do?"), CacheMode::Compose, 0.15, &store);
    // system + 3 passages looked up (the question is the final chunk, always computed).
    assert_eq!(first.report.chunks_total, 4);
    assert_eq!(first.report.chunks_hit, 0);
    let again = run(&rag(&[2, 0, 1], "What are traits?"), CacheMode::Compose, 0.15, &store);
    assert_eq!(again.report.chunks_hit, 4, "{:?}", again.report);
    assert_eq!(
        again.report.computed_tokens + again.report.reused_tokens,
        tokens(&rag(&[2, 0, 1], "What are traits?")).0.len()
    );
    let budget = (0.15 * again.report.reused_tokens as f32).round() as usize;
    assert_eq!(again.report.recomputed_tokens, budget);
}

#[test]
fn full_recompute_budget_equals_off() {
    let store = ram(1 << 30);
    run(&rag(&[0, 1, 2], "What does Cargo do?"), CacheMode::Compose, 0.15, &store);
    let msgs = rag(&[1, 2, 0], "What does the borrow checker enforce?");
    let off = run(&msgs, CacheMode::Off, 0.0, &ram(0));
    let full = run(&msgs, CacheMode::Compose, 1.0, &store);
    assert_eq!(full.report.recomputed_tokens, full.report.reused_tokens);
    assert!(full.report.reused_tokens > 0);
    assert_eq!(sampling::argmax(&full.logits), sampling::argmax(&off.logits));
    // Batch-invariant kernels: recomputing everything is bit-for-bit a full prefill.
    assert_eq!(full.logits, off.logits);
}

#[test]
fn budget_zero_recomputes_nothing_reused_and_is_still_close() {
    let store = ram(1 << 30);
    run(&rag(&[0, 1, 2], "What does Cargo do?"), CacheMode::Compose, 0.15, &store);
    let msgs = rag(&[2, 1, 0], "What does Cargo do?");
    let zero = run(&msgs, CacheMode::Compose, 0.0, &store);
    assert_eq!(zero.report.recomputed_tokens, 0);
    assert!(zero.report.reused_tokens > 0);
    let off = run(&msgs, CacheMode::Off, 0.0, &ram(0));
    let d = max_diff(&zero.logits, &off.logits);
    assert!(d > 1e-3, "with nothing recomputed the reused KV must differ from full recompute");
}

/// A chunk cached at one position and reused at another, with nothing recomputed but the
/// final chunk: it equals full recompute exactly when the chunk's context is the same (here,
/// the same preceding system prompt), so the rotation to its new position is right.
#[test]
fn a_chunk_reused_at_a_new_position_is_rotated_correctly() {
    let store = ram(1 << 30);
    // Cache passage 0 right after the system prompt (the passage sees only the system prompt).
    run(&rag(&[0], "What does Cargo do?"), CacheMode::Compose, 0.0, &store);
    // Reuse it at a position shifted by a long question: same context before it, so the
    // prefix mode and `off` must agree with compose.
    let msgs = rag(&[0], "Please answer briefly: what does the borrow checker enforce?");
    let reused = run(&msgs, CacheMode::Compose, 0.0, &store);
    assert_eq!(reused.report.chunks_hit, 2);
    let off = run(&msgs, CacheMode::Off, 0.0, &ram(0));
    let d = max_diff(&reused.logits, &off.logits);
    assert!(d < 1e-2, "reused chunk at the same context differs from off by {d}");
}

#[test]
fn prefix_mode_reuses_exact_prefixes_only() {
    let store = ram(1 << 30);
    let msgs = rag(&[0, 1, 2], "What does Cargo do?");
    run(&msgs, CacheMode::Prefix, 0.0, &store);
    let same_prefix = run(&rag(&[0, 1, 2], "What are traits?"), CacheMode::Prefix, 0.0, &store);
    assert_eq!(same_prefix.report.chunks_hit, 4);
    let off = run(&rag(&[0, 1, 2], "What are traits?"), CacheMode::Off, 0.0, &ram(0));
    // Exact reuse is exact: bit-for-bit the logits of a full prefill.
    assert_eq!(same_prefix.logits, off.logits);
    let reordered = run(&rag(&[1, 0, 2], "What are traits?"), CacheMode::Prefix, 0.0, &store);
    assert_eq!(reordered.report.chunks_hit, 1, "only the system prompt is a common prefix");
}

/// Through the engine's queue, as the server runs it: the cache mode and budget per request.
#[test]
fn engine_reports_reuse_per_request() {
    let engine = Engine::start(model(), EngineOptions::default(), std::sync::Arc::new(ram(1 << 30)), None);
    let ask = |order: &[usize], mode| {
        let req = GenerateRequest {
            prompt: Prompt::Chat(rag(order, "What does Cargo do?")),
            max_tokens: Some(4),
            sampling: SamplingParams { temperature: 0.0, ..Default::default() },
            stop: vec![],
            logprobs: None,
            ignore_eos: false,
            cache_mode: Some(mode),
            recompute_budget: None,
        };
        let mut rx = engine.submit(engine.prepare(req).unwrap()).unwrap();
        loop {
            match rx.blocking_recv().unwrap() {
                kvgate::engine::Event::Done { usage, .. } => return usage,
                kvgate::engine::Event::Error(e) => panic!("{e}"),
                _ => {}
            }
        }
    };
    assert_eq!(ask(&[0, 1, 2], CacheMode::Compose).reuse.chunks_hit, 0);
    let u = ask(&[2, 1, 0], CacheMode::Compose);
    assert_eq!(u.reuse.chunks_hit, 4);
    assert_eq!(u.cached_tokens, u.reuse.reused_tokens);
    assert_eq!(ask(&[2, 1, 0], CacheMode::Off).reuse.chunks_hit, 0);
}
