//! A fleet: stores and servers sharing chunks through a real `redis-server` (started on a
//! free loopback port, killed, paused and restarted by the tests). What one node puts,
//! another finds — as a whole chunk or a run inside one — and no fault of Redis fails a
//! lookup or a request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvgate::store::remote::encode_value;
use kvgate::store::{
    ChunkKey, ChunkKv, ChunkStore, KvDtype, Layout, Namespace, RemoteOptions, Store, StoreOptions, Use, namespace_id,
};

use crate::store::joined;
use crate::util::{Redis, Server};

const LAYERS: usize = 2;
const HEAD_DIM: usize = 64;
const HIDDEN: usize = 16;

fn layout() -> Layout {
    Layout::new("test-model", LAYERS, 1, HEAD_DIM, HIDDEN, KvDtype::F16)
}

/// Chunk `i` of `tokens` tokens, derived from `i` alone, already rounded to f16 as stored.
fn chunk(i: u32, tokens: usize) -> (ChunkKey, Arc<ChunkKv>) {
    let ids: Vec<u32> = (0..tokens as u32).map(|t| i * 1000 + t).collect();
    let layer = |l: usize, s: f32| -> Vec<f32> {
        let mut v: Vec<f32> =
            (0..tokens * HEAD_DIM).map(|j| ((j as f32 + 1.0) * 0.01 * (i as f32 + 1.0) + s + l as f32).sin()).collect();
        KvDtype::F16.round(&mut v);
        v
    };
    let kv = ChunkKv {
        tokens: ids.clone(),
        rotated_at: None,
        parent: None,
        namespace: Namespace::default(),
        k: (0..LAYERS).map(|l| layer(l, 0.5)).collect(),
        v: (0..LAYERS).map(|l| layer(l, -0.5)).collect(),
        hidden: layer(LAYERS, 1.5)[..tokens * HIDDEN].to_vec(),
    };
    (ChunkKey::compose("test-model", &ids), Arc::new(kv))
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// A RAM-only store sharing through `redis`.
fn node(redis: &Redis) -> Store {
    let options = StoreOptions {
        ram_budget_bytes: 64 << 20,
        dtype: KvDtype::F16,
        remote: Some(RemoteOptions {
            url: redis.url(),
            timeout: Duration::from_millis(200),
            open_for: Duration::from_secs(60),
            ..RemoteOptions::default()
        }),
        ..StoreOptions::default()
    };
    Store::open(&options, layout())
}

/// Waits (up to 30 s) until `done` holds.
fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A prompt with `inner` between tokens no chunk holds.
fn prompt_around(inner: &[u32]) -> Vec<u32> {
    let mut p: Vec<u32> = (900_000..900_040).collect();
    p.extend_from_slice(inner);
    p.extend(800_000..800_030);
    p
}

fn in_namespace(i: u32, ns: &str) -> (ChunkKey, Arc<ChunkKv>) {
    let (_, kv) = chunk(i, 64);
    let mut kv = (*kv).clone();
    kv.namespace = Namespace::new(ns);
    (ChunkKey::compose(&format!("test-model/{ns}"), &kv.tokens), Arc::new(kv))
}

#[test]
fn a_chunk_stored_on_one_node_is_found_by_another_as_a_run_inside_it() {
    let redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    let (key, kv) = chunk(1, 64);
    a.put(key, kv.clone(), 10);
    a.sync();
    eventually("node b hears of the chunk", || b.contains(&key));
    let inner = &kv.tokens[10..50];
    let found = b.find_spans(&prompt_around(inner), &[0]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].is_partial() && found[0].offset == 10 && found[0].prompt == (40..80), "{:?}", found[0]);
    assert_eq!(b.fetch(&key, Use::Part).as_deref(), Some(&*kv), "node b reads exactly what node a stored");
    assert_eq!(get(&b.stats().remote.hits), 1);
    assert!(b.holds(&key), "promoted to node b's RAM");
    b.fetch(&key, Use::Whole);
    assert_eq!(get(&b.stats().remote.hits), 1, "the second read is a RAM hit");
}

#[test]
fn a_node_started_later_learns_what_others_stored() {
    let redis = Redis::start();
    let a = node(&redis);
    let (key, kv) = chunk(2, 64);
    a.put(key, kv.clone(), 10);
    a.sync();
    let late = node(&redis);
    eventually("the late node replays the stream", || late.contains(&key));
    assert_eq!(late.fetch(&key, Use::Whole).as_deref(), Some(&*kv));
}

/// A node with a disk tier keeps its place in the stream: restarted, it knows what the
/// stream told it before (even once the stream lost those events) and reads on from there.
#[test]
fn a_restarted_node_resumes_the_stream_where_it_left_off() {
    let redis = Redis::start();
    let dir = crate::util::temp_dir("cursor");
    let with_disk = || {
        let options = StoreOptions {
            ram_budget_bytes: 64 << 20,
            data_dir: Some(dir.path().to_path_buf()),
            dtype: KvDtype::F16,
            remote: Some(RemoteOptions { url: redis.url(), ..RemoteOptions::default() }),
            ..StoreOptions::default()
        };
        Store::open(&options, layout())
    };
    let a = node(&redis);
    let (k1, kv1) = chunk(31, 64);
    a.put(k1, kv1.clone(), 10);
    a.sync();
    let b = with_disk();
    eventually("node b hears of the first chunk", || b.contains(&k1));
    drop(b);
    // While b is down the stream is lost (trimmed, or deleted by an operator).
    let events = kvgate::store::remote::RemoteTier::new(
        &RemoteOptions { url: redis.url(), ..RemoteOptions::default() },
        layout(),
    )
    .unwrap()
    .events_key();
    redis::cmd("DEL").arg(&events).query::<()>(&mut redis.conn().unwrap()).unwrap();
    let b = with_disk();
    assert!(b.contains(&k1), "known from its disk, not from the stream");
    assert_eq!(get(&b.stats().remote.events), 0, "nothing replayed");
    let (k2, kv2) = chunk(32, 64);
    a.put(k2, kv2.clone(), 10);
    a.sync();
    eventually("node b reads on from its cursor", || b.contains(&k2));
    assert_eq!(get(&b.stats().remote.events), 1, "only the new event");
    let m = b.find_spans(&prompt_around(&kv1.tokens[5..50]), &[0]);
    assert_eq!(m.len(), 1, "found as a run inside the chunk: {m:?}");
    assert_eq!(b.fetch(&k1, Use::Part).as_deref(), Some(&*kv1), "read from Redis");
}

#[test]
fn a_tenant_never_reads_another_tenants_chunks_through_the_shared_tier() {
    let redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    let (key, kv) = in_namespace(3, "tenant-a");
    a.put(key, kv.clone(), 10);
    a.sync();
    eventually("node b hears of the chunk", || b.contains(&key));
    let prompt = prompt_around(&kv.tokens);
    assert!(b.find_spans(&prompt, &[namespace_id("tenant-b"), 0]).is_empty(), "tenant b found tenant a's chunk");
    assert_eq!(b.find_spans(&prompt, &[namespace_id("tenant-a")]).len(), 1, "tenant a finds its own");
    let keys: Vec<String> = redis::cmd("KEYS").arg("kvgate:*:chunk:*").query(&mut redis.conn().unwrap()).unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].contains(&format!("{:016x}", namespace_id("tenant-a"))), "{keys:?}");
}

#[test]
fn a_corrupt_or_truncated_value_is_a_miss_and_is_deleted() {
    let redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    let mut conn = redis.conn().unwrap();
    for (i, damage) in [(4u32, "truncated"), (5, "flipped"), (6, "another key's")] {
        let (key, kv) = chunk(i, 64);
        a.put(key, kv.clone(), 10);
        a.sync();
        eventually("node b hears of the chunk", || b.contains(&key));
        let rkey: String = redis::cmd("KEYS")
            .arg(format!("kvgate:*:chunk:*:{}", key.to_hex()))
            .query::<Vec<String>>(&mut conn)
            .unwrap()
            .remove(0);
        let mut value: Vec<u8> = redis::cmd("GET").arg(&rkey).query(&mut conn).unwrap();
        match damage {
            "truncated" => value.truncate(value.len() / 2),
            "flipped" => {
                let at = value.len() - 100;
                value[at] ^= 1;
            }
            _ => value = encode_value(&chunk(99, 64).0, &chunk(99, 64).1, &layout()),
        }
        let () = redis::cmd("SET").arg(&rkey).arg(value).query(&mut conn).unwrap();
        let before = get(&b.stats().remote.corruptions);
        assert!(b.fetch(&key, Use::Whole).is_none(), "a {damage} value was served");
        assert_eq!(get(&b.stats().remote.corruptions), before + 1);
        assert!(!b.contains(&key), "the span index forgets a {damage} value");
        b.sync();
        let exists: i64 = redis::cmd("EXISTS").arg(&rkey).query(&mut conn).unwrap();
        assert_eq!(exists, 0, "a {damage} value is deleted");
    }
}

#[test]
fn redis_hung_or_down_is_a_miss_within_the_timeout_and_the_breaker_stops_paying_it() {
    let mut redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    let (key, kv) = chunk(7, 64);
    a.put(key, kv.clone(), 10);
    a.sync();
    eventually("node b hears of the chunk", || b.contains(&key));
    redis.signal(libc::SIGSTOP);
    assert!(b.fetch(&key, Use::Whole).is_none(), "nothing is served from a hung Redis");
    eventually("the breaker opens", || get(&b.stats().remote.breaker_open) == 1);
    let errors = get(&b.stats().remote.errors);
    for _ in 0..5 {
        assert!(b.fetch(&key, Use::Whole).is_none());
    }
    // The tailer's own probes may fail meanwhile; reads must not be among the failures.
    assert!(get(&b.stats().remote.errors) <= errors + 2, "an open breaker still tried Redis on reads");
    assert!(b.contains(&key), "an unavailable Redis may still hold the chunk: the index keeps it");
    a.put(chunk(8, 64).0, chunk(8, 64).1, 10); // writes skip an open breaker, never block
    redis.signal(libc::SIGCONT);
    eventually("Redis is seen up again", || get(&b.stats().remote.up) == 1 && get(&b.stats().remote.breaker_open) == 0);
    assert_eq!(b.fetch(&key, Use::Whole).as_deref(), Some(&*kv), "served again once Redis answers");

    redis.restart_empty();
    let (key2, kv2) = chunk(9, 64);
    eventually("node a reconnects", || get(&a.stats().remote.up) == 1 && get(&a.stats().remote.breaker_open) == 0);
    assert!(a.fetch(&key2, Use::Whole).is_none());
    a.put(key2, kv2.clone(), 10);
    a.sync();
    eventually("node b hears of a chunk stored after the restart", || b.contains(&key2));
    assert_eq!(b.fetch(&key2, Use::Whole).as_deref(), Some(&*kv2));
    let (key3, _) = chunk(10, 64);
    assert!(b.fetch(&key3, Use::Whole).is_none());
}

#[test]
fn a_chunk_redis_evicted_is_a_miss_that_every_node_forgets() {
    let redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    let (key, kv) = chunk(11, 64);
    a.put(key, kv, 10);
    a.sync();
    eventually("node b hears of the chunk", || b.contains(&key));
    let mut conn = redis.conn().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("kvgate:*:chunk:*").query(&mut conn).unwrap();
    let _: i64 = redis::cmd("DEL").arg(&keys).query(&mut conn).unwrap();
    assert!(b.fetch(&key, Use::Whole).is_none());
    assert_eq!(get(&b.stats().remote.misses), 1);
    assert_eq!(get(&b.stats().remote.errors), 0, "an evicted chunk is a miss, never an error");
    let c = node(&redis);
    eventually("a third node replays put and gone", || get(&c.stats().remote.events) >= 2);
    assert!(!c.contains(&key), "a gone chunk is not indexed");
}

/// Waits (up to 30 s) until `server`'s metric `name` reaches `at_least`.
fn metric_reaches(server: &Server, name: &str, at_least: f64) {
    eventually(&format!("{name} >= {at_least}"), || server.metric(name) >= at_least);
}

/// Two servers sharing one Redis: passages node A computed, joined under one kind of label,
/// are found by node B inside a prompt that orders and labels them differently; with Redis
/// killed, node B still answers from what it holds.
#[test]
fn passages_computed_on_one_server_are_reused_by_another_through_redis() {
    let redis = Redis::start();
    let url = redis.url();
    let args = ["--remote-url", url.as_str(), "--disk-budget-bytes", "0"];
    let (a, b) = (Server::start(&args), Server::start(&args));
    eventually("node b's /ready says the shared tier is up", || {
        crate::store::get(&b, "/ready", None).1["remote_tier"] == "up"
    });
    let (st, r) = a.post("/v1/chat/completions", &joined([0, 1, 2], "Passage", "What does Cargo do?"));
    assert_eq!(st, 200, "{r}");
    let stored = r["kvgate"]["chunks_stored"].as_u64().unwrap();
    assert!(stored >= 1, "{r}");
    metric_reaches(&a, "kvgate:chunk_store_remote_writes_total", stored as f64);
    metric_reaches(&b, "kvgate:chunk_store_remote_events_total", stored as f64);

    let (st, r) = b.post("/v1/chat/completions", &joined([2, 0, 1], "Document", "What are traits?"));
    assert_eq!(st, 200, "{r}");
    let k = &r["kvgate"];
    assert!(k["partial_spans"].as_u64().unwrap() >= 2, "node b found the passages inside node a's chunk: {k}");
    assert!(k["reused_tokens"].as_u64().unwrap() >= 45, "{k}");
    assert!(b.metric("kvgate:chunk_store_remote_hits_total") >= 1.0, "they came through Redis");

    drop(redis);
    let (st, r) = b.post("/v1/chat/completions", &joined([1, 2, 0], "Source", "What does the borrow checker do?"));
    assert_eq!(st, 200, "Redis down fails no request: {r}");
    assert!(r["kvgate"]["reused_tokens"].as_u64().unwrap() >= 45, "served from node b's RAM: {r}");
    let (st, r) = a.post("/v1/chat/completions", &joined([0, 2, 1], "Passage", "Name a Rust tool."));
    assert_eq!(st, 200, "{r}");
    eventually("the servers see Redis down", || {
        crate::store::get(&a, "/ready", None).1["remote_tier"] == "down"
            && b.metric("kvgate:chunk_store_remote_up") == 0.0
    });
}

/// A writer that dies at any byte of a chunk's write (the MULTI holding the value and its
/// `put` event) leaves nothing another node could read or index; the whole write leaves both.
#[test]
fn a_writer_killed_mid_write_leaves_nothing_readable() {
    use std::io::Write;
    let redis = Redis::start();
    let options = RemoteOptions { url: redis.url(), ..RemoteOptions::default() };
    let tier = kvgate::store::remote::RemoteTier::new(&options, layout()).unwrap();
    let (key, kv) = chunk(21, 64);
    let bytes = tier.put_pipeline(&key, &kv).get_packed_pipeline();
    let value_key = tier.value_key(&key, 0);
    let mut c = redis.conn().unwrap();
    let held = |c: &mut redis::Connection| -> (bool, u64) {
        let exists: bool = redis::cmd("EXISTS").arg(&value_key).query(c).unwrap();
        let events: u64 = redis::cmd("XLEN").arg(tier.events_key()).query(c).unwrap();
        (exists, events)
    };
    let cuts = [1, 20, bytes.len() / 3, bytes.len() / 2, bytes.len() - 40, bytes.len() - 1];
    for cut in cuts {
        let mut s = redis.tcp();
        s.write_all(&bytes[..cut]).unwrap();
        drop(s); // the writer dies here
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(held(&mut c), (false, 0), "a write cut after {cut} of {} bytes left something", bytes.len());
    }
    let reader = node(&redis);
    let mut whole = redis.tcp();
    whole.write_all(&bytes).unwrap();
    eventually("the whole write is there", || held(&mut redis.conn().unwrap()) == (true, 1));
    eventually("a node indexes it", || reader.contains(&key));
    assert_eq!(*reader.get(&key).expect("a node reads it"), *kv);
}

/// The router sends a prompt to the node holding its passages in RAM; when that node is
/// overloaded, to another; when a node is down, to the one left; a request already routed is
/// refused instead of going round.
#[test]
fn routing_follows_the_cache_unless_the_holder_is_overloaded() {
    let redis = Redis::start();
    let url = redis.url();
    let node = |name: &str| {
        Server::start(&[
            "--remote-url",
            url.as_str(),
            "--disk-budget-bytes",
            "0",
            "--node-id",
            name,
            "--max-running",
            "8",
        ])
    };
    let (a, mut b) = (node("a"), node("b"));
    let router = crate::util::Router::start(&[&a, &b], &["--remote-url", url.as_str()]);
    eventually("the router knows both nodes", || {
        router.ready()["nodes"].as_array().is_some_and(|n| n.iter().all(|n| n["up"] == true))
    });
    let (st, r) = a.post("/v1/chat/completions", &joined([0, 1, 2], "Passage", "What does Cargo do?"));
    assert_eq!(st, 200, "{r}");
    let stored = r["kvgate"]["chunks_stored"].as_u64().unwrap();
    eventually("the router's index has node a's chunks", || {
        router.metric("kvgate:router_index_chunks") >= stored as f64
    });
    // Its polls must also have seen that request end (a node's load is as fresh as its poll).
    eventually("the router sees both nodes idle", || {
        router.ready()["nodes"].as_array().is_some_and(|n| n.iter().all(|n| n["running"] == 0 && n["waiting"] == 0))
    });

    let (st, by, r) = router.post("/v1/chat/completions", &joined([2, 0, 1], "Document", "What are traits?"), &[]);
    assert_eq!((st, by.as_str()), (200, "a"), "the holder answers: {r}");
    assert!(r["kvgate"]["reused_tokens"].as_u64().unwrap() >= 45, "{r}");
    assert_eq!(a.metric("kvgate:chunk_store_remote_hits_total"), 0.0, "from node a's own RAM");
    assert_eq!(router.metric("kvgate:router_decisions_total{reason=\"cache\"}"), 1.0);

    // Node a busy with four long streams sent to it directly (another router's, say).
    let long = serde_json::json!({"messages": [{"role": "user", "content": "Count to a thousand."}],
                                  "max_tokens": 400, "ignore_eos": true, "temperature": 0});
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let (u, body) = (a.url("/v1/chat/completions"), long.to_string());
            std::thread::spawn(move || ureq::post(&u).send_string(&body).map(|r| r.status()).unwrap_or(0))
        })
        .collect();
    eventually("the router sees node a's load", || {
        let n = router.ready()["nodes"][0].clone();
        n["running"].as_u64().unwrap_or(0) + n["waiting"].as_u64().unwrap_or(0) >= 4
    });
    let (st, by, r) = router.post("/v1/chat/completions", &joined([1, 0, 2], "Source", "What is Cargo?"), &[]);
    assert_eq!((st, by.as_str()), (200, "b"), "an overloaded holder is passed over: {r}");
    assert!(r["kvgate"]["reused_tokens"].as_u64().unwrap() >= 45, "node b fetched the passages from Redis: {r}");
    assert_eq!(router.metric("kvgate:router_decisions_total{reason=\"balance\"}"), 1.0);
    for t in busy {
        assert_eq!(t.join().unwrap(), 200);
    }

    let (st, _, r) =
        router.post("/v1/chat/completions", &joined([0, 1, 2], "Passage", "Hi"), &[("x-kvgate-routed-by", "r2")]);
    assert_eq!((st, r["error"]["code"].as_str()), (508, Some("loop_detected")), "{r}");

    b.stop();
    for q in ["What are traits?", "What is the borrow checker?"] {
        let (st, by, r) = router.post("/v1/chat/completions", &joined([2, 1, 0], "Passage", q), &[]);
        assert_eq!((st, by.as_str()), (200, "a"), "node b is down: {r}");
    }
}

/// `kvgate route` refuses what it cannot use, saying what is wrong.
#[test]
fn the_router_refuses_a_bad_node_list() {
    for (args, says) in [
        (&["--node", "ftp://10.0.0.5"][..], "router.nodes"),
        (&["--node", "http://127.0.0.1:1", "--node", "http://127.0.0.1:1"][..], "listed twice"),
        (&[][..], "no nodes"),
    ] {
        let out = std::process::Command::new(crate::util::kvgate_bin())
            .args(["route", "--listen", "127.0.0.1:0", "--model"])
            .arg(crate::util::model_path())
            .args(args)
            .env_remove("KVGATE_ROUTER_NODES")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
}
