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

fn layout() -> Layout {
    Layout::new("test-model", LAYERS, 1, HEAD_DIM, KvDtype::F16)
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
