//! Compositional reuse on the real model: splicing, rotation, selective recompute, modes.

use kvgate::blend::{self, BlendOptions, CacheMode, Prefill};
use kvgate::engine::{ChatMessage, sampling};
use kvgate::scheduler::{Event, GenerateRequest, Prompt, Scheduler, SchedulerOptions};

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

/// KL(p ‖ q) of two next-token distributions given as logits.
fn kl(p: &[f32], q: &[f32]) -> f32 {
    let lse = |r: &[f32]| {
        let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        max + r.iter().map(|x| (x - max).exp()).sum::<f32>().ln()
    };
    let (lp, lq) = (lse(p), lse(q));
    p.iter().zip(q).map(|(a, b)| (a - lp).exp() * ((a - lp) - (b - lq))).sum()
}

#[test]
fn messages_become_chunks_and_reordered_chunks_are_hits() {
    let store = ram(1 << 30);
    let first = run(&rag(&[0, 1, 2], "What does Cargo do?"), CacheMode::Compose, 0.15, &store);
    assert_eq!((first.report.spans, first.report.reused_tokens), (0, 0));
    assert!(first.report.chunks_stored >= 3, "{:?}", first.report);
    let msgs = rag(&[2, 0, 1], "What are traits?");
    let again = run(&msgs, CacheMode::Compose, 0.15, &store);
    // Each passage is found again, and everything but the new question is reused.
    assert!(again.report.spans >= 3, "{:?}", again.report);
    let question = tokens(&[ChatMessage { role: "user".into(), content: "What are traits?".into() }]).0.len();
    assert!(again.report.computed_tokens <= question + 4, "{:?}", again.report);
    assert_eq!(again.report.computed_tokens + again.report.reused_tokens, tokens(&msgs).0.len());
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

/// Gradual filtering: with a taper the check layer's recomputed set narrows layer by layer,
/// spending the budget on average; everything recomputed is still everything.
#[test]
fn a_taper_narrows_the_recomputed_tokens_layer_by_layer() {
    let store = ram(1 << 30);
    run(&rag(&[0, 1, 2], "What does Cargo do?"), CacheMode::Compose, 0.15, &store);
    let msgs = rag(&[2, 0, 1], "What does the borrow checker enforce?");
    let (ids, starts) = tokens(&msgs);
    let m = model();
    let with = |budget: f32, taper: f32| {
        let opts = BlendOptions { recompute_budget: budget, recompute_taper: taper, ..Default::default() };
        blend::prefill(&m.model, &ids, &starts, CacheMode::Compose, &opts, &store).unwrap()
    };
    let zero = with(0.0, 1.0);
    let d = m.model.config().kv_dim();
    // Rows whose K/V at `layer` differ from those of a prefill recomputing nothing reused.
    let differ_at = |p: &Prefill, layer: usize| -> Vec<usize> {
        let (a, b) = (&p.cache.layers()[layer], &zero.cache.layers()[layer]);
        (0..ids.len()).filter(|&r| a.k[r * d..(r + 1) * d] != b.k[r * d..(r + 1) * d]).collect()
    };
    let check = BlendOptions::default().check_layer;
    let last = m.model.config().layers - 1;
    // Right after the check layer only the recomputed reused tokens differ (the new tokens' K/V
    // there depend on the check layer's, which every token had computed); of those, the ones
    // still recomputed at the last layer differ there too.
    let flat = with(0.3, 1.0);
    let budget = (0.3 * flat.report.reused_tokens as f32).round() as usize;
    let kept_at = |p: &Prefill, from: &[usize], layer: usize| -> Vec<usize> {
        differ_at(p, layer).into_iter().filter(|r| from.contains(r)).collect()
    };
    let selected = differ_at(&flat, check + 1);
    assert_eq!(selected.len(), budget);
    assert_eq!(kept_at(&flat, &selected, last), selected, "no taper: the same tokens at every layer");
    let tapered = with(0.3, 4.0);
    let early = differ_at(&tapered, check + 1);
    let late = kept_at(&tapered, &early, last);
    assert!(tapered.report.recomputed_tokens.abs_diff(budget) <= 1, "{:?}, budget {budget}", tapered.report);
    assert!(early.len() > budget && late.len() < budget, "{} then {} of budget {budget}", early.len(), late.len());
    let off = blend::prefill(&m.model, &ids, &starts, CacheMode::Off, &BlendOptions::default(), &ram(0)).unwrap();
    for taper in [1.0, 4.0] {
        let full = with(1.0, taper);
        assert!(full.logits == off.logits, "taper {taper}: everything recomputed must be a full prefill");
    }
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
    assert!(reused.report.reused_tokens >= tokens(&rag(&[0], "")).0.len() - 8, "{:?}", reused.report);
    let off = run(&msgs, CacheMode::Off, 0.0, &ram(0));
    // Rotation rounds differently from computing at the position, and the int8 kernels'
    // input quantization can turn that into a step: judged by the distribution (a wrong
    // rotation moves it by nats), and exactly on the f32 path's scale only without VNNI. With
    // int8 prefill (VNNI, no AMX) the step alone measured KL 0.0008 and, after a change of
    // summation order only, 0.0012: the bound sits at int8's own mean KL from f32 (0.005,
    // `int8_paths_match_the_f32_path_teacher_forced`), far under a wrong rotation's.
    let (d, kl) = (max_diff(&reused.logits, &off.logits), kl(&off.logits, &reused.logits));
    eprintln!("reused at the same context: logits differ from off by {d:.4}, KL {kl:.6}");
    assert!(kl < 5e-3, "reused chunk at the same context differs from off by KL {kl} (logits by {d})");
}

/// Tokens two sequences share from the start.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Prefix mode reuses a stored prompt's longest common prefix to the token, as llama.cpp's
/// server does, and that reuse is bit for bit a full prefill.
#[test]
fn prefix_mode_reuses_the_longest_common_prefix_to_the_token() {
    let store = ram(1 << 30);
    let stored = tokens(&rag(&[0, 1, 2], "What does Cargo do?")).0;
    run(&rag(&[0, 1, 2], "What does Cargo do?"), CacheMode::Prefix, 0.0, &store);
    let msgs = rag(&[0, 1, 2], "What are traits?");
    let same_prefix = run(&msgs, CacheMode::Prefix, 0.0, &store);
    let lcp = common_prefix(&stored, &tokens(&msgs).0);
    assert!(lcp > tokens(&rag(&[0, 1, 2], "")).0.len() - 8, "the passages and more are shared");
    assert_eq!(same_prefix.report.reused_tokens, lcp, "{:?}", same_prefix.report);
    let off = run(&msgs, CacheMode::Off, 0.0, &ram(0));
    // Exact reuse is exact: bit-for-bit the logits of a full prefill.
    assert_eq!(same_prefix.logits, off.logits);
    let reordered_msgs = rag(&[1, 0, 2], "What are traits?");
    let reordered = run(&reordered_msgs, CacheMode::Prefix, 0.0, &store);
    let lcp = common_prefix(&stored, &tokens(&reordered_msgs).0)
        .max(common_prefix(&tokens(&msgs).0, &tokens(&reordered_msgs).0));
    assert_eq!(reordered.report.reused_tokens, lcp, "only the system prompt and what follows it to the token");
    // The whole prompt again: everything but the last token (its logits start generation).
    let again = run(&msgs, CacheMode::Prefix, 0.0, &store);
    assert_eq!(again.report.reused_tokens, tokens(&msgs).0.len() - 1);
    assert_eq!(again.logits, off.logits);
}

/// Through the scheduler, as the server runs it: the cache mode and budget per request.
#[test]
fn the_scheduler_reports_reuse_per_request() {
    let scheduler = Scheduler::start(model(), SchedulerOptions::default(), std::sync::Arc::new(ram(1 << 30)), None);
    let ask = |order: &[usize], mode| {
        let req = GenerateRequest {
            max_tokens: Some(4),
            cache_mode: Some(mode),
            ..GenerateRequest::new(Prompt::Chat(rag(order, "What does Cargo do?")))
        };
        let mut rx = scheduler.submit(scheduler.prepare(req).unwrap()).unwrap();
        loop {
            match rx.blocking_recv().unwrap() {
                Event::Done { usage, .. } => return usage,
                Event::Error(e) => panic!("{e}"),
                _ => {}
            }
        }
    };
    assert_eq!(ask(&[0, 1, 2], CacheMode::Compose).reuse.chunks_hit, 0);
    let u = ask(&[2, 1, 0], CacheMode::Compose);
    assert!(u.reuse.spans >= 3, "{:?}", u.reuse);
    assert_eq!(u.cached_tokens, u.reuse.reused_tokens);
    assert_eq!(ask(&[2, 1, 0], CacheMode::Off).reuse.chunks_hit, 0);
}

/// What RAG frameworks send: one user message, the passages under numbered labels in
/// retrieval order, the question after them.
fn joined(order: &[usize], label: fn(usize) -> String, question: &str) -> Vec<ChatMessage> {
    let body: Vec<String> =
        order.iter().enumerate().map(|(i, &p)| format!("{}{}", label(i + 1), PASSAGES[p])).collect();
    vec![
        ChatMessage { role: "system".into(), content: "Answer using the passages.".into() },
        ChatMessage { role: "user".into(), content: format!("{}\n\nQuestion: {question}", body.join("\n\n")) },
    ]
}

fn passage_label(i: usize) -> String {
    format!("Passage {i}:\n")
}

fn bracket_label(i: usize) -> String {
    format!("[{i}] ")
}

/// Passages joined under labels are found again inside the chunk they were stored in, under
/// other labels, in another order: all but a few tokens around each label are reused.
#[test]
fn passages_joined_under_labels_are_reused_from_inside_stored_chunks() {
    let store = ram(1 << 30);
    run(&joined(&[0, 1, 2], passage_label, "What does Cargo do?"), CacheMode::Compose, 0.15, &store);
    let msgs = joined(&[2, 0], bracket_label, "What are traits?");
    let r = run(&msgs, CacheMode::Compose, 0.15, &store);
    assert!(r.report.spans >= 2 && r.report.partial_spans >= 2, "{:?}", r.report);
    let passage_tokens: usize = [2, 0].iter().map(|&p| model().tokenizer.encode(PASSAGES[p]).unwrap().ids.len()).sum();
    assert!(r.report.reused_tokens + 8 >= passage_tokens, "{:?}: {passage_tokens} passage tokens", r.report);
}

/// A run reused from inside a stored chunk it was never cut out of, at a new position and
/// under a new label, gives exactly what splicing the same KV as a whole chunk gives.
#[test]
fn a_run_inside_a_stored_chunk_splices_like_a_whole_chunk() {
    use kvgate::blend::chunk::ChunkKey;
    use kvgate::store::{ChunkKv, ChunkStore};
    let m = model();
    let a = ram(1 << 30);
    run(&joined(&[0, 1, 2], passage_label, "What does Cargo do?"), CacheMode::Compose, 0.15, &a);
    let msgs = joined(&[2, 0], bracket_label, "What are traits?");
    let ids = tokens(&msgs).0;
    let found = a.find_spans(&ids[..ids.len() - 1], &[0]);
    assert!(found.iter().any(|s| s.is_partial()), "{found:?}");
    // The same KV, each run a chunk of its own.
    let b = ram(1 << 30);
    let (d, h) = (m.model.config().kv_dim(), m.model.config().hidden);
    for s in &found {
        let kv = a.get(&s.key).unwrap();
        let rows = s.offset * d..(s.offset + s.len()) * d;
        let part = ChunkKv {
            tokens: kv.tokens[s.offset..s.offset + s.len()].to_vec(),
            rotated_at: None,
            parent: None,
            namespace: Default::default(),
            k: kv.k.iter().map(|l| l[rows.clone()].to_vec()).collect(),
            v: kv.v.iter().map(|l| l[rows.clone()].to_vec()).collect(),
            hidden: kv.hidden[s.offset * h..(s.offset + s.len()) * h].to_vec(),
        };
        b.put(ChunkKey::compose(m.model.fingerprint(), &ids[s.prompt.clone()]), std::sync::Arc::new(part), 1);
    }
    let inside = run(&msgs, CacheMode::Compose, 0.15, &a);
    let whole = run(&msgs, CacheMode::Compose, 0.15, &b);
    assert!(
        inside.report.partial_spans >= 1 && whole.report.partial_spans == 0,
        "{:?} {:?}",
        inside.report,
        whole.report
    );
    assert_eq!(
        (inside.report.reused_tokens, inside.report.recomputed_tokens),
        (whole.report.reused_tokens, whole.report.recomputed_tokens)
    );
    assert_eq!(inside.logits, whole.logits, "a run inside a chunk is spliced exactly as the whole chunk");
}

/// Scoring a prompt from the hidden states its prefill kept (sliced as the scheduler slices)
/// gives bit for bit what another pass over the cache gives. A compose prefill that reused
/// chunks knows every row's state too: the rows it computed score as another pass scores
/// them, and the reused rows carry the states their chunks stored (here computed after the
/// same text at the same positions, in f32: bit for bit what `off` computes), except the rows
/// compose recomputed, which carry their new states.
#[test]
fn scoring_from_the_prefills_hidden_states_equals_another_pass() {
    let m = model();
    let opts = BlendOptions::default();
    let policy = blend::BuiltinPolicy { chunk_head_tokens: 0 };
    let prefill = |ids: &[u32], starts: &[usize], mode: CacheMode, store: &Store| {
        let input = blend::CutInput { ids, offsets: &[], text: "", segment_starts: starts, chunk_tokens: 256 };
        let mut task = blend::Prefilling::new(&m.model, &input, mode, &opts).keeping_hidden();
        loop {
            // About 7 tokens' worth of layers a step: slices, as the scheduler runs them.
            if let Some(done) = task.step(&m.model, store, &policy, 7 * m.model.config().layers).unwrap() {
                return done;
            }
        }
    };
    let (ids, starts) = tokens(&rag(&[0, 1, 2], "What does Cargo do?"));
    let store = ram(1 << 30);
    let off = prefill(&ids, &starts, CacheMode::Off, &store);
    let states = off.hidden.as_ref().expect("off keeps every row's state");
    assert_eq!(states.first, 0);
    assert!(states.stored.iter().all(|s| s.is_none()), "off computes every row");
    for from in [1, 9] {
        let again = m.model.score(&ids, from, &off.cache, 5).unwrap();
        assert_eq!(m.model.score_hidden(&ids, from, 0, &states.x, 5).unwrap(), again, "from {from}");
    }
    prefill(&ids, &starts, CacheMode::Compose, &store); // stores the prompt's chunks
    let question = "Which of the passages above says how a crate gets published, and to which registry?";
    let (ids, starts) = tokens(&rag(&[0, 1, 2], question));
    let (off, blended) =
        (prefill(&ids, &starts, CacheMode::Off, &store), prefill(&ids, &starts, CacheMode::Compose, &store));
    assert!(blended.report.reused_tokens > 100, "{:?}", blended.report);
    let states = blended.hidden.as_ref().expect("every row's state is known");
    assert_eq!(states.first, 0);
    let scored = m.model.score_hidden(&ids, 1, 0, &states.x, 5).unwrap();
    let reference = m.model.score(&ids, 1, &off.cache, 5).unwrap();
    // The passages: the rows before the new question (scored token i + 1 at entry i).
    let shared = ids.iter().zip(&tokens(&rag(&[0, 1, 2], "What does Cargo do?")).0).take_while(|(a, b)| a == b).count();
    let diffs: Vec<f32> = (0..shared - 1).map(|i| (scored[i].0.logprob - reference[i].0.logprob).abs()).collect();
    let exact = diffs.iter().filter(|&&d| d == 0.0).count();
    let recomputed = (opts.recompute_budget * blended.report.reused_tokens as f32).round() as usize;
    assert!(exact + recomputed >= diffs.len(), "{exact} of {} rows exact, {recomputed} recomputed", diffs.len());
    let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
    assert!(mean < 0.01, "mean |Δ logprob| {mean} over the reused rows");
    // The question: computed by this prefill.
    let again = m.model.score(&ids, shared + 1, &blended.cache, 5).unwrap();
    assert_eq!(scored[shared..], again[..], "the rows compose computed score as another pass does");
}
