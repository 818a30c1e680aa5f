//! The remote tier: chunk KV shared by every node of a fleet through Redis (or anything that
//! speaks its protocol: Valkey, a Redis Cluster proxy).
//!
//! Owns the Redis side of the store: one self-describing value per chunk (a checksummed
//! header naming the chunk's namespace, then the chunk's payload with its own checksum) under
//! a key namespaced by model, element type and tenant, and a stream of chunk events that
//! every node tails into its span index, so that matching a prompt needs no round trip and a
//! passage one node computed is found by every other, as a whole chunk or a run inside one.
//! A GET that misses is the authority: the entry leaves the index and the miss is announced.
//! Events name the node that sent them, and nodes also announce what their local tiers gain
//! (`have`: a remote hit kept) and lose (`drop`: evicted locally), so that a router following
//! the stream ([`crate::fleet`]) knows which node holds which chunk in RAM or on disk.
//!
//! Redis is never on a request's critical path for longer than `timeout`: writes go through
//! a queue to a writer thread (full queue or open breaker: the chunk is not shared), reads
//! happen on a RAM and disk miss only, and after `failures_to_open` failures in a row a
//! circuit breaker stops trying for `open_for` — the tailer keeps probing in the background
//! and closes it once Redis answers again. Redis evicting a chunk is a miss, never an error.
//!
//! Must never: serve a value it has not verified (key, model, layout, namespace, checksums),
//! or block a request on a reconnect.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::payload::{self, Layout};
use super::{ChunkKey, ChunkKv, Namespace};

const MAGIC: &[u8; 8] = b"KVGATERV";
const VERSION: u16 = 1;

/// How to reach the shared tier.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteOptions {
    /// `redis://[user:password@]host:port[/db]` or `unix:///path/to/socket`.
    pub url: String,
    /// Longest a request waits on Redis (connect, read or write) before serving without it.
    pub timeout: Duration,
    /// Failures in a row that open the circuit breaker.
    pub failures_to_open: u32,
    /// How long an open breaker skips Redis before a request tries it again.
    pub open_for: Duration,
    /// Chunks waiting to be written; beyond it a chunk is not shared.
    pub write_queue: usize,
    /// Lifetime of a chunk value, seconds: with `maxmemory-policy volatile-lru` (or any
    /// `volatile-*` policy) Redis evicts only chunk values, never the event stream.
    pub ttl_secs: u64,
    /// Events the stream keeps (approximately; older ones are trimmed): a node that starts
    /// replays what is left, so this bounds what a new node can learn of older chunks.
    pub stream_len: usize,
    /// This node's name on the event stream (what a router knows it by).
    pub node: String,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout: Duration::from_millis(250),
            failures_to_open: 2,
            open_for: Duration::from_secs(2),
            write_queue: 64,
            ttl_secs: 7 * 24 * 3600,
            stream_len: 200_000,
            node: String::new(),
        }
    }
}

/// Whether `url` names a Redis server this build can reach (a readable reason if not).
pub fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("rediss://") {
        return Err("rediss:// (TLS) is not built into this kvgate; use redis:// behind a TLS tunnel".into());
    }
    redis::Client::open(url).map(|_| ()).map_err(|e| format!("not a Redis URL ({e}); e.g. redis://127.0.0.1:6379"))
}

/// What `/metrics` shows of the remote tier.
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// 1 when a remote tier is configured.
    pub enabled: AtomicU64,
    /// 1 while Redis answers; 0 while it fails (down, hung, refusing).
    pub up: AtomicU64,
    /// 1 while the circuit breaker skips Redis.
    pub breaker_open: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Commands that failed or timed out.
    pub errors: AtomicU64,
    /// Values that failed their checks (deleted, served as misses).
    pub corruptions: AtomicU64,
    pub writes: AtomicU64,
    /// Chunks not shared: queue full, breaker open, or the write failed.
    pub writes_skipped: AtomicU64,
    /// Value bytes read.
    pub bytes_read: AtomicU64,
    /// Events of the stream applied to the span index.
    pub events: AtomicU64,
}

/// A chunk event of the stream, and the node that sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEvent {
    /// `""` for events of a node that gave no name.
    pub node: String,
    pub event: Event,
}

/// What happened to a chunk (of the namespace with this [`Namespace::id`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The node computed and stored the chunk (in Redis and its local tiers).
    Put { key: ChunkKey, namespace: u64, tokens: Vec<u32> },
    /// The node found it missing or corrupt in Redis, or removed it: no tier should hold it.
    Gone { key: ChunkKey, namespace: u64 },
    /// The node read it from Redis and keeps it in its local tiers.
    Have { key: ChunkKey, namespace: u64 },
    /// The node's local tiers no longer hold it (Redis still may).
    Drop { key: ChunkKey, namespace: u64 },
}

/// Local holdings a node announces (`have` / `drop` events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    Have,
    Drop,
}

/// What a remote read found.
pub enum Fetched {
    Hit(ChunkKv),
    Miss,
    /// Present but failed its checks.
    Corrupt,
    /// Redis did not answer (or the breaker is open): nothing is known.
    Unavailable,
}

/// Consecutive failures and whether the breaker is open.
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// The Redis side of the store; shared by the store (reads), its remote writer and its tailer.
pub struct RemoteTier {
    client: redis::Client,
    options: RemoteOptions,
    pub(super) layout: Layout,
    /// `kvgate:<model>-<dtype>`: one fleet's keys (nodes of another model or element type
    /// never read them).
    prefix: String,
    /// The read path's connection (requests fetch one chunk at a time through it).
    reads: Mutex<Option<redis::Connection>>,
    breaker: Mutex<Breaker>,
    stats: Arc<RemoteStats>,
    /// Set when the store closes: the tailer stops.
    pub(crate) closing: AtomicBool,
}

impl RemoteTier {
    /// A tier for `options.url` (no connection is made yet: Redis may come up later).
    pub fn new(options: &RemoteOptions, layout: Layout) -> Result<Self, String> {
        check_url(&options.url)?;
        let client = redis::Client::open(options.url.as_str()).map_err(|e| e.to_string())?;
        let model: String = layout.model[..8].iter().map(|b| format!("{b:02x}")).collect();
        let prefix = format!("kvgate:{model}-{}", layout.dtype.name());
        let stats = Arc::new(RemoteStats::default());
        stats.enabled.store(1, Ordering::Relaxed);
        Ok(Self {
            client,
            options: options.clone(),
            layout,
            prefix,
            reads: Mutex::new(None),
            breaker: Mutex::new(Breaker::default()),
            stats,
            closing: AtomicBool::new(false),
        })
    }

    pub fn stats(&self) -> &Arc<RemoteStats> {
        &self.stats
    }

    pub fn options(&self) -> &RemoteOptions {
        &self.options
    }

    /// The Redis key of a chunk value.
    pub fn value_key(&self, key: &ChunkKey, namespace: u64) -> String {
        format!("{}:chunk:{namespace:016x}:{}", self.prefix, key.to_hex())
    }

    /// The Redis key of the event stream.
    pub fn events_key(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// A fresh connection with this tier's timeouts (reads may wait `read` at most).
    pub(crate) fn connect(&self, read: Duration) -> redis::RedisResult<redis::Connection> {
        let conn = self.client.get_connection_with_timeout(self.options.timeout)?;
        conn.set_read_timeout(Some(read))?;
        // Values are megabytes; writing one may take longer than a read's round trip.
        conn.set_write_timeout(Some(self.options.timeout.max(Duration::from_secs(1))))?;
        Ok(conn)
    }

    /// Whether the breaker lets a request try Redis now.
    pub fn allowed(&self) -> bool {
        let b = self.breaker.lock().unwrap();
        b.open_until.is_none_or(|t| Instant::now() >= t)
    }

    /// Records that Redis answered.
    pub(crate) fn succeeded(&self) {
        let mut b = self.breaker.lock().unwrap();
        if b.open_until.is_some() || self.stats.up.load(Ordering::Relaxed) == 0 {
            tracing::info!(url = %self.redacted_url(), "remote tier: Redis answers; sharing resumed");
        }
        *b = Breaker::default();
        self.stats.up.store(1, Ordering::Relaxed);
        self.stats.breaker_open.store(0, Ordering::Relaxed);
    }

    /// Records a failure; opens the breaker after enough in a row.
    pub(crate) fn failed(&self, error: &redis::RedisError) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let mut b = self.breaker.lock().unwrap();
        b.failures += 1;
        if self.stats.up.swap(0, Ordering::Relaxed) == 1 || b.failures == 1 {
            tracing::warn!(url = %self.redacted_url(), %error, "remote tier: Redis failed; serving from local tiers");
        }
        if b.failures >= self.options.failures_to_open {
            b.open_until = Some(Instant::now() + self.options.open_for);
            self.stats.breaker_open.store(1, Ordering::Relaxed);
        }
    }

    /// The URL without its password (for logs).
    fn redacted_url(&self) -> String {
        redact(&self.options.url)
    }

    /// Runs `f` on `slot`'s connection, opening one if there is none. A connection found
    /// dropped (Redis restarted since) is replaced and `f` tried once more; a timeout is not
    /// retried (a hung Redis would cost twice).
    pub(crate) fn run<T>(
        &self,
        slot: &mut Option<redis::Connection>,
        read: Duration,
        f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        if let Some(conn) = slot.as_mut() {
            match f(conn) {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_timeout() && (e.is_connection_dropped() || e.is_io_error()) => *slot = None,
                Err(e) => {
                    *slot = None;
                    return Err(e);
                }
            }
        }
        let conn = slot.insert(self.connect(read)?);
        let result = f(conn);
        if result.is_err() {
            // It may hold half a reply: start afresh next time.
            *slot = None;
        }
        result
    }

    /// Runs `f` on the read path's connection within the breaker; `None` if Redis is skipped
    /// or fails.
    fn on_reads<T>(&self, f: impl Fn(&mut redis::Connection) -> redis::RedisResult<T>) -> Option<T> {
        if !self.allowed() {
            return None;
        }
        let mut slot = self.reads.lock().unwrap();
        match self.run(&mut slot, self.options.timeout, f) {
            Ok(v) => {
                self.succeeded();
                Some(v)
            }
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }

    /// Reads and verifies the chunk `key` of namespace `namespace`. A value that fails its
    /// checks is the caller's to delete (the store announces it gone, which deletes it off the
    /// request path).
    pub fn fetch(&self, key: &ChunkKey, namespace: u64) -> Fetched {
        let rkey = self.value_key(key, namespace);
        let Some(value) = self.on_reads(|c| redis::cmd("GET").arg(&rkey).query::<Option<Vec<u8>>>(c)) else {
            return Fetched::Unavailable;
        };
        let Some(bytes) = value else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Fetched::Miss;
        };
        self.stats.bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        match decode_value(&bytes, key, &self.layout) {
            Ok(kv) if kv.namespace.id() == namespace => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                Fetched::Hit(kv)
            }
            other => {
                let why = other.err().unwrap_or_else(|| "value of another namespace".into());
                tracing::warn!(key = ?key, error = %why, "remote tier: corrupt value, served as a miss");
                self.stats.corruptions.fetch_add(1, Ordering::Relaxed);
                Fetched::Corrupt
            }
        }
    }

    /// Stores a chunk and announces it, atomically (no node sees the event before the value).
    pub(crate) fn put(&self, conn: &mut redis::Connection, key: &ChunkKey, kv: &ChunkKv) -> redis::RedisResult<()> {
        self.put_pipeline(key, kv).query(conn)
    }

    /// What [`RemoteTier::put`] sends: the value and its `put` event in one MULTI / EXEC, so a
    /// writer that dies at any byte of it leaves neither (Redis discards a transaction, or a
    /// command, that its connection did not finish).
    pub fn put_pipeline(&self, key: &ChunkKey, kv: &ChunkKv) -> redis::Pipeline {
        let value = encode_value(key, kv, &self.layout);
        let tokens: Vec<u8> = kv.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let ns = kv.namespace.id();
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("SET").arg(self.value_key(key, ns)).arg(value).arg("EX").arg(self.options.ttl_secs.max(1));
        self.event(pipe.ignore(), "put", key, ns).arg("tokens").arg(tokens).ignore();
        pipe
    }

    /// Deletes a chunk's value and announces that it is gone.
    pub(crate) fn gone(&self, conn: &mut redis::Connection, key: &ChunkKey, namespace: u64) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(self.value_key(key, namespace));
        self.event(pipe.ignore(), "gone", key, namespace).ignore().query(conn)
    }

    /// Announces what this node's local tiers gained or lost.
    pub(crate) fn holding(
        &self,
        conn: &mut redis::Connection,
        what: Holding,
        key: &ChunkKey,
        namespace: u64,
    ) -> redis::RedisResult<()> {
        let op = match what {
            Holding::Have => "have",
            Holding::Drop => "drop",
        };
        let mut pipe = redis::pipe();
        self.event(&mut pipe, op, key, namespace).ignore().query(conn)
    }

    /// Adds an `op` event of `key` to `pipe` (its fields so far: more may follow).
    fn event<'p>(&self, pipe: &'p mut redis::Pipeline, op: &str, key: &ChunkKey, ns: u64) -> &'p mut redis::Pipeline {
        pipe.cmd("XADD")
            .arg(self.events_key())
            .arg("MAXLEN")
            .arg("~")
            .arg(self.options.stream_len.max(1))
            .arg("*")
            .arg("op")
            .arg(op)
            .arg("key")
            .arg(key.to_hex())
            .arg("ns")
            .arg(format!("{ns:016x}"))
            .arg("node")
            .arg(&self.options.node)
    }
}

/// Follows the stream `events_key` on the Redis at `url` after the event `from` (`"0"`:
/// from the oldest the stream keeps), on a thread of its own (`name`): each batch read goes
/// to `apply` with the cursor after it, each read's outcome to `status`; reconnects (and so
/// probes a Redis that failed) every half second while Redis is away; stops once `go_on`
/// says no. A cursor older than what the stream kept reads all it kept.
pub fn follow(
    url: &str,
    name: &str,
    events_key: String,
    from: String,
    apply: impl Fn(&[NodeEvent], &str) + Send + 'static,
    status: impl Fn(Result<(), redis::RedisError>) + Send + 'static,
    go_on: impl Fn() -> bool + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, String> {
    const BLOCK: Duration = Duration::from_millis(500);
    check_url(url)?;
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let connect = move || -> redis::RedisResult<redis::Connection> {
        let c = client.get_connection_with_timeout(BLOCK)?;
        c.set_read_timeout(Some(BLOCK * 2))?;
        Ok(c)
    };
    let tail = move || {
        let mut cursor = from;
        let mut conn: Option<redis::Connection> = None;
        while go_on() {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match connect() {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        status(Err(e));
                        std::thread::sleep(BLOCK);
                        continue;
                    }
                },
            };
            match read_events(c, &events_key, &cursor, BLOCK) {
                Ok((events, next)) => {
                    status(Ok(()));
                    if next != cursor {
                        apply(&events, &next);
                    }
                    cursor = next;
                }
                Err(e) => {
                    status(Err(e));
                    conn = None;
                    std::thread::sleep(BLOCK);
                }
            }
        }
    };
    std::thread::Builder::new().name(name.into()).spawn(tail).map_err(|e| e.to_string())
}

/// Events of the stream `events_key` after `cursor` (`"0"`: from the oldest kept), waiting
/// up to `block` for one; and the cursor after them.
pub fn read_events(
    conn: &mut redis::Connection,
    events_key: &str,
    cursor: &str,
    block: Duration,
) -> redis::RedisResult<(Vec<NodeEvent>, String)> {
    let reply: redis::Value = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(1024)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(events_key)
        .arg(cursor)
        .query(conn)?;
    let mut events = Vec::new();
    let mut next = cursor.to_string();
    for (id, fields) in stream_entries(reply) {
        if let Some(e) = parse_event(&fields) {
            events.push(e);
        }
        next = id;
    }
    Ok((events, next))
}

/// `url` with any password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((auth, host)) = rest.rsplit_once('@') else { return url.to_string() };
    let user = auth.split_once(':').map_or(auth, |(u, _)| u);
    format!("{scheme}://{user}:***@{host}")
}

/// The value stored for a chunk:
///
/// ```text
///   0  magic "KVGATERV"     12  namespace name (UTF-8)
///   8  version u16 = 1      ..  crc32 u32 of the bytes before it
///  10  namespace length u16 ..  the chunk's payload (store::payload: header, K/V, crc32)
/// ```
pub fn encode_value(key: &ChunkKey, kv: &ChunkKv, layout: &Layout) -> Vec<u8> {
    let ns = kv.namespace.name().as_bytes();
    let (payload, _) = payload::encode(key, kv, layout);
    let mut out = Vec::with_capacity(16 + ns.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(ns.len() as u16).to_le_bytes());
    out.extend_from_slice(ns);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes and verifies a value read for `key`.
pub fn decode_value(bytes: &[u8], key: &ChunkKey, layout: &Layout) -> Result<ChunkKv, String> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err("not a kvgate chunk value".into());
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(format!("value version {version}, this kvgate reads {VERSION}"));
    }
    let ns_len = u16::from_le_bytes([bytes[10], bytes[11]]) as usize;
    let head = 12 + ns_len;
    let Some(crc) = bytes.get(head..head + 4) else { return Err("truncated header".into()) };
    if crc32fast::hash(&bytes[..head]) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("header checksum mismatch".into());
    }
    let ns = std::str::from_utf8(&bytes[12..head]).map_err(|_| "namespace is not UTF-8".to_string())?;
    let mut kv = payload::decode(&bytes[head + 4..], key, layout).map_err(|e| e.to_string())?;
    kv.namespace = Namespace::new(ns);
    Ok(kv)
}

/// (id, fields) of every entry of an XREAD reply (RESP2 arrays or RESP3 maps).
fn stream_entries(reply: redis::Value) -> Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)> {
    use redis::Value;
    let streams: Vec<Value> = match reply {
        Value::Array(s) => {
            s.into_iter().filter_map(|s| if let Value::Array(mut kv) = s { kv.pop() } else { None }).collect()
        }
        Value::Map(m) => m.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let bytes = |v: Value| match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else { continue };
        for entry in entries {
            let Value::Array(mut parts) = entry else { continue };
            if parts.len() != 2 {
                continue;
            }
            let fields = parts.pop().expect("two parts");
            let Some(id) = parts.pop().and_then(bytes).and_then(|b| String::from_utf8(b).ok()) else { continue };
            let flat: Vec<Vec<u8>> = match fields {
                Value::Array(f) => f.into_iter().filter_map(bytes).collect(),
                Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).filter_map(bytes).collect(),
                _ => Vec::new(),
            };
            let pairs = flat.chunks_exact(2).map(|p| (p[0].clone(), p[1].clone())).collect();
            out.push((id, pairs));
        }
    }
    out
}

/// An event from its stream fields; `None` for anything malformed (skipped, never trusted).
fn parse_event(fields: &[(Vec<u8>, Vec<u8>)]) -> Option<NodeEvent> {
    let get = |name: &str| fields.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| v.as_slice());
    let node = match get("node") {
        Some(n) => std::str::from_utf8(n).ok()?.to_string(),
        None => String::new(),
    };
    parse_chunk_event(&get).map(|event| NodeEvent { node, event })
}

fn parse_chunk_event<'f>(get: &impl Fn(&str) -> Option<&'f [u8]>) -> Option<Event> {
    let key = ChunkKey::from_hex(std::str::from_utf8(get("key")?).ok()?)?;
    let namespace = u64::from_str_radix(std::str::from_utf8(get("ns")?).ok()?, 16).ok()?;
    match get("op")? {
        b"put" => {
            let raw = get("tokens")?;
            if raw.len() % 4 != 0 || raw.is_empty() {
                return None;
            }
            let tokens = raw.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
            Some(Event::Put { key, namespace, tokens })
        }
        b"gone" => Some(Event::Gone { key, namespace }),
        b"have" => Some(Event::Have { key, namespace }),
        b"drop" => Some(Event::Drop { key, namespace }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::KvDtype;

    fn kv(ns: &str) -> ChunkKv {
        ChunkKv {
            tokens: vec![5, 6, 7],
            rotated_at: None,
            parent: None,
            namespace: Namespace::new(ns),
            k: vec![vec![0.5; 3 * 4]; 2],
            v: vec![vec![-0.25; 3 * 4]; 2],
            hidden: vec![0.75; 3 * 3],
        }
    }

    #[test]
    fn a_value_round_trips_and_any_flipped_byte_is_refused() {
        let layout = Layout::new("model", 2, 1, 4, 3, KvDtype::F16);
        let key = ChunkKey([9; 32]);
        let bytes = encode_value(&key, &kv("tenant-a"), &layout);
        assert_eq!(decode_value(&bytes, &key, &layout).unwrap(), kv("tenant-a"));
        for i in [0, 9, 11, 13, 20, 40, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode_value(&bad, &key, &layout).is_err(), "byte {i} flipped was accepted");
        }
        assert!(decode_value(&bytes[..bytes.len() - 3], &key, &layout).is_err(), "a truncated value");
        assert!(decode_value(&bytes, &ChunkKey([8; 32]), &layout).is_err(), "under another key");
        let other = Layout::new("other model", 2, 1, 4, 3, KvDtype::F16);
        assert!(decode_value(&bytes, &key, &other).is_err(), "for another model");
    }

    #[test]
    fn logged_urls_keep_no_password() {
        assert_eq!(redact("redis://:s3cret@10.0.0.5:6379/0"), "redis://:***@10.0.0.5:6379/0");
        assert_eq!(redact("redis://kv:s3cret@host"), "redis://kv:***@host");
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }

    #[test]
    fn malformed_events_are_skipped() {
        let f = |pairs: &[(&str, &[u8])]| -> Vec<(Vec<u8>, Vec<u8>)> {
            pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect()
        };
        let hex = ChunkKey([1; 32]).to_hex();
        let put = f(&[("op", b"put"), ("key", hex.as_bytes()), ("ns", b"0a"), ("tokens", &[1, 0, 0, 0, 2, 0, 0, 0])]);
        let put = parse_event(&put).unwrap();
        assert_eq!(put.event, Event::Put { key: ChunkKey([1; 32]), namespace: 10, tokens: vec![1, 2] });
        assert_eq!(put.node, "", "an event of a node without a name");
        let have = f(&[("op", b"have"), ("key", hex.as_bytes()), ("ns", b"0a"), ("node", b"n1")]);
        let have = parse_event(&have).unwrap();
        assert_eq!((have.node.as_str(), have.event), ("n1", Event::Have { key: ChunkKey([1; 32]), namespace: 10 }));
        let drop = f(&[("op", b"drop"), ("key", hex.as_bytes()), ("ns", b"0a"), ("node", &[0xff])]);
        assert_eq!(parse_event(&drop), None, "a node name that is not UTF-8");
        assert_eq!(parse_event(&f(&[("op", b"gone"), ("key", hex.as_bytes()), ("ns", b"x")])), None, "a bad namespace");
        assert_eq!(
            parse_event(&f(&[("op", b"put"), ("key", hex.as_bytes()), ("ns", b"a"), ("tokens", &[1, 0])])),
            None
        );
        assert_eq!(parse_event(&f(&[("op", b"put"), ("key", b"zz"), ("ns", b"a"), ("tokens", &[1, 0, 0, 0])])), None);
        assert_eq!(parse_event(&f(&[("op", b"flush"), ("key", hex.as_bytes()), ("ns", b"a")])), None);
    }
}
