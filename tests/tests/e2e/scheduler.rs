//! The scheduler on the real model: batched decode, sliced prefill, first-come admission.

use std::sync::Arc;

use kvgate::blend::{self, BlendOptions, CacheMode, CutInput, Prefilling};
use kvgate::engine::{ChatMessage, KvCache, LogitsFor};
use kvgate::scheduler::{Event, Events, GenerateRequest, Prompt, Scheduler, SchedulerOptions, Usage};
use kvgate::store::{Store, StoreOptions};

use crate::util::model;

fn ram() -> Arc<Store> {
    Arc::new(Store::with_disk(&StoreOptions { ram_budget_bytes: 1 << 30, ..Default::default() }, None))
}

fn question(i: usize) -> Prompt {
    let topics = ["hash maps", "borrowing", "traits", "closures", "iterators", "lifetimes", "enums", "macros"];
    Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: format!("Explain {} in Rust in two sentences.", topics[i % topics.len()]),
    }])
}

/// Every event of a request until its choices are done: the generated ids and the usage.
fn collect(mut rx: Events) -> (Vec<u32>, Usage) {
    let mut ids = Vec::new();
    loop {
        match rx.blocking_recv().expect("the scheduler answers") {
            Event::Token { token, .. } => ids.push(token.id),
            Event::Done { usage, .. } => return (ids, usage),
            Event::Error(e) => panic!("{e}"),
            Event::Prompt(_) => {}
        }
    }
}

fn request(i: usize, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        cache_mode: Some(CacheMode::Off),
        ..GenerateRequest::new(question(i))
    }
}

/// One decode step of several sequences gives each the logits it gets decoded alone (a step of
/// one), bit for bit (the int8 matmul works row by row, attention sequence by sequence).
#[test]
fn a_batched_decode_step_equals_decoding_alone() {
    let m = model();
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| {
            let Prompt::Chat(msgs) = question(i) else { unreachable!() };
            m.encode_chat(&msgs).unwrap().0
        })
        .collect();
    let prefill = |p: &[u32]| {
        let mut c = m.model.new_cache();
        let pos: Vec<u32> = (0..p.len() as u32).collect();
        m.model.forward(p, &pos, &mut c, &LogitsFor::Last, false).unwrap();
        c
    };
    let mut alone = Vec::new();
    for p in &prompts {
        let mut c = prefill(p);
        alone.push(m.model.decode_batch(&[p[0]], &[p.len() as u32], &mut [&mut c]).unwrap());
    }
    let mut caches: Vec<_> = prompts.iter().map(|p| prefill(p)).collect();
    let tokens: Vec<u32> = prompts.iter().map(|p| p[0]).collect();
    let positions: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut refs: Vec<&mut _> = caches.iter_mut().collect();
    let batched = m.model.decode_batch(&tokens, &positions, &mut refs).unwrap();
    let vocab = m.model.config().vocab;
    for (i, row) in batched.chunks_exact(vocab).enumerate() {
        assert!(row == alone[i].as_slice(), "sequence {i} decodes differently in a batch");
    }
}

/// Decode attends over a copy of the cache it keeps from step to step (f16, on AVX-512): rows
/// changed after a step (compose writing recomputed rows, a splice, a truncation) are read
/// anew, so the cache decodes bit for bit as a copy of it that never decoded.
#[test]
fn a_cache_changed_after_a_decode_step_decodes_as_a_fresh_copy() {
    let m = model();
    let Prompt::Chat(msgs) = question(0) else { unreachable!() };
    let p = m.encode_chat(&msgs).unwrap().0;
    let pos: Vec<u32> = (0..p.len() as u32).collect();
    let mut cache = m.model.new_cache();
    m.model.forward(&p, &pos, &mut cache, &LogitsFor::Last, false).unwrap();
    let n = p.len() as u32;
    m.model.decode_batch(&[p[1]], &[n], &mut [&mut cache]).unwrap();
    let fresh = |c: &KvCache| {
        let mut f = m.model.new_cache();
        f.push_rows(&c.positions);
        f.rows_mut(0).clone_from_slice(c.layers());
        f
    };
    let step = |c: &mut KvCache| m.model.decode_batch(&[p[2]], &[c.len() as u32], &mut [c]).unwrap();
    // Row 3's K and V changed in every layer.
    let d = cache.kv_dim();
    for l in cache.rows_mut(3) {
        l.k[3 * d..4 * d].iter_mut().for_each(|x| *x = -*x);
        l.v[3 * d..4 * d].iter_mut().for_each(|x| *x *= 2.0);
    }
    let mut copy = fresh(&cache);
    assert!(step(&mut cache) == step(&mut copy), "after a change of row 3");
    // The last two rows (decoded ones) dropped, a step taken at their place.
    cache.truncate(cache.len() - 2);
    let mut copy = fresh(&cache);
    assert!(step(&mut cache) == step(&mut copy), "after a truncation");
}

/// Eight requests decoded together give each the tokens it gets alone (greedy), and they were
/// decoded together: decode steps advanced several sequences at once.
#[test]
fn a_sequence_decodes_the_same_alone_and_in_a_batch_of_eight() {
    let scheduler = Scheduler::start(model(), SchedulerOptions::default(), ram(), None);
    let alone: Vec<Vec<u32>> =
        (0..8).map(|i| collect(scheduler.submit(scheduler.prepare(request(i, 24)).unwrap()).unwrap()).0).collect();
    let steps_before = scheduler.stats().decode_steps.load(std::sync::atomic::Ordering::Relaxed);
    let rows_before = scheduler.stats().decode_rows.load(std::sync::atomic::Ordering::Relaxed);
    let receivers: Vec<_> =
        (0..8).map(|i| scheduler.submit(scheduler.prepare(request(i, 24)).unwrap()).unwrap()).collect();
    let together: Vec<Vec<u32>> = receivers.into_iter().map(|rx| collect(rx).0).collect();
    for i in 0..8 {
        assert_eq!(alone[i], together[i], "request {i}");
    }
    let steps = scheduler.stats().decode_steps.load(std::sync::atomic::Ordering::Relaxed) - steps_before;
    let rows = scheduler.stats().decode_rows.load(std::sync::atomic::Ordering::Relaxed) - rows_before;
    assert!(rows as f64 / steps as f64 > 4.0, "{rows} rows in {steps} steps: the sequences were not batched");
}

/// A prefill run a slice at a time between decode steps is bit for bit the prefill run at once,
/// in every mode (compose's check and recompute passes sliced too).
#[test]
fn a_prefill_in_slices_equals_one_in_one_go() {
    let m = model();
    let passages = [
        "Cargo builds Rust code, fetches crates from the registry and runs the tests of a package.",
        "Traits define shared behaviour in Rust; generic functions are bounded by them at compile time.",
        "The borrow checker forbids dangling references and data races before a program ever runs.",
    ];
    let chat = |order: [usize; 3]| -> Vec<ChatMessage> {
        let mut msgs = vec![ChatMessage { role: "system".into(), content: "Answer from the passages.".into() }];
        msgs.extend(order.iter().map(|&i| ChatMessage { role: "user".into(), content: passages[i].into() }));
        msgs.push(ChatMessage { role: "user".into(), content: "What does Cargo do?".into() });
        msgs
    };
    let default_taper = BlendOptions::default().recompute_taper;
    for (mode, taper) in [
        (CacheMode::Off, 1.0),
        (CacheMode::Prefix, 1.0),
        (CacheMode::Compose, 1.0),
        (CacheMode::Compose, default_taper),
        (CacheMode::Compose, 4.0),
    ] {
        let (whole_store, sliced_store) = (ram(), ram());
        let opts = BlendOptions { recompute_taper: taper, ..Default::default() };
        let policy = blend::BuiltinPolicy::default();
        for order in [[0, 1, 2], [2, 0, 1]] {
            let (ids, starts) = m.encode_chat(&chat(order)).unwrap();
            let input = CutInput { ids: &ids, offsets: &[], text: "", segment_starts: &starts, chunk_tokens: 256 };
            let whole = blend::prefill_with(&m.model, &input, mode, &opts, &*whole_store, &policy).unwrap();
            let mut task = Prefilling::new(&m.model, &input, mode, &opts);
            let mut slices = 0;
            let sliced = loop {
                slices += 1;
                if let Some(done) = task.step(&m.model, &*sliced_store, &policy, 7 * 30).unwrap() {
                    break done;
                }
            };
            assert!(slices > 3, "{mode:?}: {slices} slices");
            assert_eq!(whole.report.reused_tokens, sliced.report.reused_tokens, "{mode:?}");
            assert!(whole.logits == sliced.logits, "{mode:?} {order:?}: logits differ");
            let d = m.model.config().kv_dim();
            for (l, (a, b)) in whole.cache.layers().iter().zip(sliced.cache.layers()).enumerate() {
                let rows: Vec<usize> = (0..ids.len())
                    .filter(|&r| {
                        a.k[r * d..(r + 1) * d] != b.k[r * d..(r + 1) * d]
                            || a.v[r * d..(r + 1) * d] != b.v[r * d..(r + 1) * d]
                    })
                    .collect();
                assert!(
                    rows.is_empty(),
                    "{mode:?} {order:?}: layer {l} differs at rows {rows:?} of {}; report {:?} vs {:?}",
                    ids.len(),
                    whole.report,
                    sliced.report
                );
            }
        }
    }
}

/// 64 requests queued at once all finish, and none was overtaken by a later one (first come,
/// first served: the starvation bound is the work queued ahead).
#[test]
fn sixty_four_queued_requests_all_finish_and_none_is_overtaken() {
    let options = SchedulerOptions { queue_capacity: 64, max_running: 4, ..Default::default() };
    let scheduler = Scheduler::start(model(), options, ram(), None);
    let receivers: Vec<_> =
        (0..64).map(|i| scheduler.submit(scheduler.prepare(request(i, 3)).unwrap()).unwrap()).collect();
    let usages: Vec<Usage> = receivers.into_iter().map(|rx| collect(rx).1).collect();
    assert_eq!(usages.len(), 64);
    for (i, u) in usages.iter().enumerate() {
        assert_eq!(u.completion_tokens, 3, "request {i}");
        assert_eq!(u.overtaken, 0, "request {i} was overtaken by {} later ones", u.overtaken);
    }
    // Later requests waited longer: the queue is served in order.
    assert!(usages[63].queued_seconds >= usages[0].queued_seconds);
    assert_eq!(scheduler.stats().waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// `n` choices share one prefill: the prompt is computed once, each choice decodes.
#[test]
fn choices_share_one_prefill() {
    let scheduler = Scheduler::start(model(), SchedulerOptions::default(), ram(), None);
    let mut req = request(0, 6);
    req.n = 3;
    req.sampling.temperature = 1.0;
    req.sampling.seed = Some(7);
    let mut rx = scheduler.submit(scheduler.prepare(req).unwrap()).unwrap();
    let (mut tokens, mut done) = (vec![Vec::new(); 3], 0);
    while done < 3 {
        match rx.blocking_recv().unwrap() {
            Event::Token { index, token } => tokens[index].push(token.id),
            Event::Done { index, usage, .. } => {
                done += 1;
                assert_eq!((usage.completion_tokens, tokens[index].len()), (6, 6));
            }
            e => panic!("{e:?}"),
        }
    }
    assert!(tokens[0] != tokens[1] || tokens[1] != tokens[2], "three seeds, three samples: {tokens:?}");
    assert_eq!(scheduler.stats().generated_tokens.load(std::sync::atomic::Ordering::Relaxed), 18);
}
