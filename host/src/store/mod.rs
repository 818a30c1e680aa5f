//! The chunk store: where chunk KV lives between requests and across restarts.
//!
//! Two local tiers, each under its own byte budget, and an optional shared one. The RAM tier
//! holds decoded chunks ready to splice; the disk tier keeps every chunk it has room for in
//! segment files on local disk, indexed by sled; the remote tier ([`remote`]) shares compose
//! chunks with every node of a fleet through Redis. Tiers are inclusive: a put goes to RAM at
//! once and to disk and Redis behind the request (writer threads, so neither fsync nor the
//! network ever delays a token); a lookup reads RAM, then disk, then Redis, and a hit below
//! RAM is promoted (a remote hit to RAM and disk).
//! Over a budget, a tier asks its [`Evictor`] for victims (least recently used until the
//! `evictor` plugin takes the seam over).
//!
//! Failures never fail a request: a torn or corrupt payload is a miss (counted, logged,
//! removed); a full or read-only disk degrades to serving without storing, counted, and the
//! writer tries again after a pause, so the store recovers when space returns.
//!
//! Only this module knows sled and Redis.
//!
//! - [`payload`]: the versioned, checksummed on-disk form of a chunk.
//! - [`segment`]: segment files behind an I/O seam, and the extent allocator.
//! - [`disk`]: the sled-indexed disk tier, its recovery.
//! - [`ram`]: the RAM tier.
//! - [`remote`]: the shared tier on Redis, its value format and event stream.
//! - [`evict`]: the eviction seam and least-recently-used.
//! - [`span`]: the span index — which stored chunk holds a run of tokens, wherever it sits
//!   — and the tree of prefix-cache chunks.

pub mod disk;
pub mod evict;
pub mod payload;
mod ram;
pub mod remote;
pub mod segment;
pub mod span;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::metrics::Histogram;
use disk::{DiskTier, Lookup};
pub use evict::{Candidate, Evictor, LeastRecentlyUsed};
pub use payload::{KvDtype, Layout};
use ram::RamTier;
use remote::{Fetched, Holding, RemoteTier};
pub use remote::{RemoteOptions, RemoteStats};
use span::Tier;
pub use span::{SpanIndex, SpanMatch};

/// Whose chunks these are. A request finds only chunks of the namespaces it may read (its
/// tenant's own and the shared ones), and what it brings new goes to the one it writes: no
/// tenant can hit — or time — another's chunks. The empty name is the namespace of an open
/// server (no API keys) and of the `default` tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace(Arc<str>);

impl Namespace {
    pub fn new(name: &str) -> Self {
        Self(name.into())
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// A stable 64-bit id of the name (what the span index and the tiers keep); 0 for the
    /// empty name.
    pub fn id(&self) -> u64 {
        namespace_id(&self.0)
    }
}

/// [`Namespace::id`] of a name.
pub fn namespace_id(name: &str) -> u64 {
    if name.is_empty() {
        return 0;
    }
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes")).max(1)
}

/// Where one request reads chunks from and writes new ones to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub write: Namespace,
    /// Always holds `write`.
    pub read: Vec<Namespace>,
}

impl Default for Scope {
    fn default() -> Self {
        Self::own(Namespace::default())
    }
}

impl Scope {
    /// Reads and writes `ns` only.
    pub fn own(ns: Namespace) -> Self {
        Self { read: vec![ns.clone()], write: ns }
    }

    /// The ids of the namespaces read.
    pub fn read_ids(&self) -> Vec<u64> {
        self.read.iter().map(Namespace::id).collect()
    }
}

/// A chunk's identity: a hash of the model fingerprint, a namespace and token ids (see
/// `blend::chunk` for how keys are made).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(pub [u8; 32]);

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl ChunkKey {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

/// The KV of one chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkKv {
    pub tokens: Vec<u32>,
    /// `None`: `k` is before RoPE (compositional reuse rotates it to wherever the chunk goes).
    /// `Some(p)`: `k` is rotated for positions `p..`, as computed — prefix-cache entries,
    /// which only ever return to the same positions, keep K exact this way (a rotation and
    /// its inverse are not bit-exact in f32).
    pub rotated_at: Option<u32>,
    /// For a prefix-cache chunk, the chunk before it (the tree prefix reuse walks).
    pub parent: Option<ChunkKey>,
    /// Whose chunk it is.
    pub namespace: Namespace,
    /// Per layer, `tokens × kv_dim` K.
    pub k: Vec<Vec<f32>>,
    /// Per layer, `tokens × kv_dim` V.
    pub v: Vec<Vec<f32>>,
    /// The last layer's hidden state of every token as computed with the chunk (`tokens ×
    /// hidden`), or empty: what scoring a prompt that reuses the chunk reads for its rows.
    pub hidden: Vec<f32>,
}

impl ChunkKv {
    /// Bytes of KV (and hidden states) held in memory.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).chain([&self.hidden]).map(|l| l.len() * 4).sum()
    }
}

/// What a tier knows of a chunk besides its KV (what eviction decides on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChunkStats {
    pub tokens: u32,
    /// Bytes the chunk occupies in that tier.
    pub bytes: u64,
    pub created_ms: u64,
    pub last_access_ms: u64,
    /// Times served from the tier.
    pub hits: u32,
    /// Of those, times only a run inside it was used.
    pub partial_hits: u32,
    /// What computing it cost, microseconds.
    pub cost_us: u64,
    /// [`Namespace::id`] of its namespace (per-namespace budgets).
    #[serde(skip)]
    pub namespace: u64,
}

impl ChunkStats {
    fn candidate(&self) -> Candidate {
        Candidate {
            bytes: self.bytes,
            tokens: self.tokens,
            created_ms: self.created_ms,
            last_access_ms: self.last_access_ms,
            hits: self.hits,
            cost_us: self.cost_us,
        }
    }
}

/// How much of a chunk a hit uses (kept in its statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Whole,
    /// A run inside it.
    Part,
}

/// Where chunk KV is kept by key: the seam `blend` reads and extends.
pub trait ChunkStore: Send + Sync {
    /// The chunk, if held; counts the hit as `used`.
    fn fetch(&self, key: &ChunkKey, used: Use) -> Option<Arc<ChunkKv>>;
    /// The chunk, if held (a whole-chunk hit).
    fn get(&self, key: &ChunkKey) -> Option<Arc<ChunkKv>> {
        self.fetch(key, Use::Whole)
    }
    /// Keeps a chunk that cost `cost_us` to compute, evicting others if a budget requires.
    fn put(&self, key: ChunkKey, kv: Arc<ChunkKv>, cost_us: u64);
    /// Covers `prompt` with the longest runs that equal runs inside held chunks of the
    /// namespaces `read` (ids; see [`SpanIndex::find`]).
    fn find_spans(&self, prompt: &[u32], read: &[u64]) -> Vec<SpanMatch>;
    /// The longest prefix of `prompt` held by prefix-cache chunks of the namespaces `read`
    /// chained from `root`.
    fn longest_prefix(&self, root: &ChunkKey, prompt: &[u32], read: &[u64]) -> Vec<SpanMatch>;
    /// Whether some tier holds `key`.
    fn contains(&self, key: &ChunkKey) -> bool;
}

/// A store read through and never written: a request that must not add to the cache (and
/// benchmarks that compare runs on the same contents).
pub struct ReadOnly<'a>(pub &'a dyn ChunkStore);

impl ChunkStore for ReadOnly<'_> {
    fn fetch(&self, key: &ChunkKey, used: Use) -> Option<Arc<ChunkKv>> {
        self.0.fetch(key, used)
    }
    fn put(&self, _: ChunkKey, _: Arc<ChunkKv>, _: u64) {}
    fn find_spans(&self, prompt: &[u32], read: &[u64]) -> Vec<SpanMatch> {
        self.0.find_spans(prompt, read)
    }
    fn longest_prefix(&self, root: &ChunkKey, prompt: &[u32], read: &[u64]) -> Vec<SpanMatch> {
        self.0.longest_prefix(root, prompt, read)
    }
    fn contains(&self, key: &ChunkKey) -> bool {
        self.0.contains(key)
    }
}

/// Errors of the store's own I/O; callers log them, requests never see them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("chunk index: {0}")]
    Index(#[from] sled::Error),
}

impl StoreError {
    fn io(what: &'static str) -> impl Fn(std::io::Error) -> StoreError {
        move |source| StoreError::Io { what, source }
    }

    /// Whether the device is out of space (the store degrades and retries).
    pub fn is_out_of_space(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            StoreError::Index(sled::Error::Io(e)) => e.raw_os_error() == Some(libc::ENOSPC),
            StoreError::Index(_) => false,
        }
    }
}

/// Counters of one tier.
#[derive(Debug, Default)]
pub struct TierStats {
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
    pub budget: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    /// Eviction rounds whose evictor answer had to be corrected (or fell back to LRU).
    pub evictor_fallbacks: AtomicU64,
}

/// What `/metrics` shows of the store.
pub struct StoreStats {
    pub ram: TierStats,
    pub disk: TierStats,
    /// Payloads that failed their checks on read.
    pub corruptions: AtomicU64,
    /// Disk writes that failed (full disk, read-only directory, I/O error).
    pub write_errors: AtomicU64,
    /// Chunks not written to disk: writer queue full, or disk degraded.
    pub writes_skipped: AtomicU64,
    /// 1 while disk writes are failing; 0 when healthy (or no disk tier).
    pub degraded: AtomicU64,
    /// 1 when the disk tier is open.
    pub disk_enabled: AtomicU64,
    /// Time to read, check and decode one chunk from disk.
    pub disk_load_seconds: Histogram,
    /// The shared tier's (zeros when none is configured).
    pub remote: Arc<RemoteStats>,
}

const LOAD_BOUNDS: &[f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0];

impl Default for StoreStats {
    fn default() -> Self {
        Self {
            ram: TierStats::default(),
            disk: TierStats::default(),
            corruptions: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            writes_skipped: AtomicU64::new(0),
            degraded: AtomicU64::new(0),
            disk_enabled: AtomicU64::new(0),
            disk_load_seconds: Histogram::new(LOAD_BOUNDS),
            remote: Arc::default(),
        }
    }
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub ram_budget_bytes: u64,
    /// `None`: RAM only.
    pub data_dir: Option<PathBuf>,
    pub disk_budget_bytes: u64,
    /// Appending to a segment file stops at this size.
    pub segment_bytes: u64,
    /// Element type of stored K/V of compose chunks (also applied to RAM copies, so tiers agree).
    pub dtype: KvDtype,
    /// Element type of prefix-cache chunks (f32: exact).
    pub prefix_dtype: KvDtype,
    /// Chunks waiting for the disk writer; beyond it a chunk is not written.
    pub write_queue: usize,
    /// After a failed write, how long the disk is left alone before the next attempt.
    pub retry_after: Duration,
    /// Shortest run of tokens the span index finds.
    pub min_span: usize,
    /// Share of each tier's budget one namespace may fill (1: no limit of its own); a
    /// namespace over it evicts its own chunks, never another's.
    pub namespace_share: f64,
    /// The fleet's shared tier, if any.
    pub remote: Option<RemoteOptions>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            ram_budget_bytes: 2 << 30,
            data_dir: None,
            disk_budget_bytes: 16 << 30,
            segment_bytes: 256 << 20,
            dtype: KvDtype::F32,
            prefix_dtype: KvDtype::F32,
            write_queue: 64,
            retry_after: Duration::from_secs(2),
            min_span: 16,
            namespace_share: 1.0,
            remote: None,
        }
    }
}

/// One chunk of `GET /admin/chunks`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChunkInfo {
    pub key: String,
    /// Its namespace (empty: the open server's / the `default` tenant's).
    pub namespace: String,
    /// Tiers holding it: `ram`, `disk`.
    pub tiers: Vec<&'static str>,
    #[serde(flatten)]
    pub stats: ChunkStats,
}

enum WriteJob {
    Put(ChunkKey, Arc<ChunkKv>, ChunkStats),
    /// Answers once every job before it is done.
    Barrier(std::sync::mpsc::Sender<()>),
}

/// What the remote writer does (off the request path).
enum RemoteJob {
    Put(ChunkKey, Arc<ChunkKv>),
    /// Deleted and announced (of the namespace with this id).
    Gone(ChunkKey, u64),
    /// What this node's local tiers gained or lost, announced.
    Holding(Holding, ChunkKey, u64),
    /// Answers once every job before it is done.
    Barrier(std::sync::mpsc::Sender<()>),
}

/// The shared tier and the threads that write to it and tail its events.
struct Remote {
    tier: Arc<RemoteTier>,
    /// The remote writer's queue.
    jobs: RemoteJobs,
    threads: Vec<JoinHandle<()>>,
}

/// The remote writer's queue: chunks to share, and news for the fleet of what this node's
/// tiers gained or lost, off the request path. A full queue drops the job (counted): the
/// chunk is not shared, or a router knows less, never a request fails.
#[derive(Clone)]
struct RemoteJobs {
    jobs: SyncSender<RemoteJob>,
    stats: Arc<RemoteStats>,
}

impl RemoteJobs {
    fn send(&self, job: RemoteJob) {
        if self.jobs.try_send(job).is_err() {
            self.stats.writes_skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Announces the chunks of `keys` that `spans` now knows only in the shared tier.
    fn left_local(&self, spans: &SpanIndex, keys: &[ChunkKey]) {
        for k in keys {
            if let Some(ns) = spans.only_in(k, Tier::Remote) {
                self.send(RemoteJob::Holding(Holding::Drop, *k, ns));
            }
        }
    }
}

/// The tiers and their writers.
pub struct Store {
    ram: Mutex<RamTier>,
    disk: Option<Arc<DiskTier>>,
    writer: Option<(SyncSender<WriteJob>, JoinHandle<()>)>,
    remote: Option<Remote>,
    evictor: Arc<RwLock<Arc<dyn Evictor>>>,
    dtype: KvDtype,
    prefix_dtype: KvDtype,
    /// The width of a token's hidden state the payloads keep ([`Layout::hidden`]), when a
    /// tier writes payloads.
    hidden: Option<usize>,
    stats: Arc<StoreStats>,
    /// Every chunk some tier holds, by content (shared with the writer, which reports what
    /// reaches and leaves the disk).
    spans: Arc<RwLock<SpanIndex>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Opens the store. A disk tier that cannot open (read-only or missing directory, another
    /// process holding the index) is logged and left out: the store serves from RAM.
    pub fn open(options: &StoreOptions, layout: Layout) -> Self {
        let files = |dir: &std::path::Path| -> Result<Box<dyn segment::SegmentFiles>, StoreError> {
            Ok(Box::new(segment::FsSegments::open(&dir.join("segments")).map_err(StoreError::io("opening segments"))?))
        };
        let disk = options.data_dir.as_ref().filter(|_| options.disk_budget_bytes > 0).and_then(|dir| {
            let opened = std::fs::create_dir_all(dir)
                .map_err(StoreError::io("creating the data directory"))
                .and_then(|()| files(dir))
                .and_then(|f| DiskTier::open(dir, f, layout.clone(), options.disk_budget_bytes, options.segment_bytes));
            match opened {
                Ok((tier, rec)) => {
                    tracing::info!(
                        dir = %dir.display(), entries = rec.entries, dropped = rec.dropped,
                        reclaimed_bytes = rec.reclaimed_bytes, "chunk store opened"
                    );
                    Some(tier)
                }
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "chunk store: disk tier unavailable, serving from RAM only");
                    None
                }
            }
        });
        let wanted = options.data_dir.is_some() && options.disk_budget_bytes > 0;
        let unavailable = wanted && disk.is_none();
        let remote = options.remote.as_ref().and_then(|r| match RemoteTier::new(r, layout.clone()) {
            Ok(tier) => Some(tier),
            Err(e) => {
                tracing::error!(error = %e, "chunk store: remote tier unavailable, serving from local tiers only");
                None
            }
        });
        let store = Self::with_tiers(options, disk, remote);
        if unavailable {
            // Visible on /metrics as well as in the log.
            store.stats.write_errors.fetch_add(1, Ordering::Relaxed);
            store.stats.degraded.store(1, Ordering::Relaxed);
        }
        store
    }

    /// A store over an already opened disk tier (tests put their own I/O behind it).
    pub fn with_disk(options: &StoreOptions, disk: Option<DiskTier>) -> Self {
        Self::with_tiers(options, disk, None)
    }

    /// A store over an already opened disk tier and a remote tier.
    fn with_tiers(options: &StoreOptions, disk: Option<DiskTier>, remote: Option<RemoteTier>) -> Self {
        let mut stats = StoreStats::default();
        if let Some(r) = &remote {
            stats.remote = r.stats().clone();
        }
        let stats = Arc::new(stats);
        let hidden =
            disk.as_ref().map(|d| d.layout.hidden).or(remote.as_ref().map(|r| r.layout.hidden)).map(usize::from);
        stats.ram.budget.store(options.ram_budget_bytes, Ordering::Relaxed);
        let evictor: Arc<RwLock<Arc<dyn Evictor>>> = Arc::new(RwLock::new(Arc::new(LeastRecentlyUsed)));
        let mut index = SpanIndex::new(options.min_span);
        if let Some(d) = &disk {
            // The index is rebuilt from what the disk holds, so a restart keeps every hit.
            for c in d.indexed() {
                index.held(c.key, &c.tokens, c.parent, Tier::Disk, namespace_id(&c.namespace));
            }
        }
        let spans = Arc::new(RwLock::new(index));
        let disk = disk.map(|mut d| {
            d.set_namespace_share(options.namespace_share);
            Arc::new(d)
        });
        let remote = remote.map(|tier| {
            let tier = Arc::new(tier);
            let (jobs, rx) = sync_channel(tier.options().write_queue.max(1));
            let writer = {
                let tier = tier.clone();
                std::thread::Builder::new()
                    .name("kvgate-remote-writer".into())
                    .spawn(move || remote_writer(&tier, rx))
                    .expect("spawn the remote writer")
            };
            // The tailer applies the fleet's events from where this node's disk says it left
            // off (else from the oldest the stream keeps), and its reconnects probe a Redis
            // that failed (closing the breaker once it answers).
            let from = match &disk {
                Some(d) => {
                    let (cursor, chunks) = d.fleet(&tier.events_key());
                    let mut index = spans.write().unwrap();
                    for (key, ns, tokens) in &chunks {
                        index.held(*key, tokens, None, Tier::Remote, *ns);
                    }
                    cursor
                }
                None => "0".to_string(),
            };
            let (t1, t2, t3, index, d) = (tier.clone(), tier.clone(), tier.clone(), spans.clone(), disk.clone());
            let tailer = remote::follow(
                &tier.options().url,
                "kvgate-remote-tailer",
                tier.events_key(),
                from,
                move |events, next| apply_events(&t1, &index, d.as_deref(), events, next),
                move |r| match r {
                    Ok(()) => t2.succeeded(),
                    Err(e) => t2.failed(&e),
                },
                move || !t3.closing.load(Ordering::Relaxed),
            )
            .expect("spawn the remote tailer");
            let jobs = RemoteJobs { jobs, stats: tier.stats().clone() };
            Remote { tier, jobs, threads: vec![writer, tailer] }
        });
        let writer = disk.as_ref().map(|d| {
            stats.disk_enabled.store(1, Ordering::Relaxed);
            stats.disk.budget.store(d.budget(), Ordering::Relaxed);
            let (tx, rx) = sync_channel(options.write_queue.max(1));
            let w = Writer {
                disk: d.clone(),
                stats: stats.clone(),
                evictor: evictor.clone(),
                retry_after: options.retry_after,
                spans: spans.clone(),
                announce: remote.as_ref().map(|r| r.jobs.clone()),
            };
            let handle = std::thread::Builder::new()
                .name("kvgate-store-writer".into())
                .spawn(move || w.run(rx))
                .expect("spawn the store writer");
            (tx, handle)
        });
        let store = Self {
            ram: Mutex::new(RamTier::new(options.ram_budget_bytes, options.namespace_share)),
            disk,
            writer,
            remote,
            evictor,
            dtype: options.dtype,
            prefix_dtype: options.prefix_dtype,
            hidden,
            stats,
            spans,
        };
        store.refresh_gauges();
        store
    }

    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.stats
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Replaces the eviction policy of both tiers.
    pub fn set_evictor(&self, evictor: Arc<dyn Evictor>) {
        *self.evictor.write().unwrap() = evictor;
    }

    fn evictor(&self) -> Arc<dyn Evictor> {
        self.evictor.read().unwrap().clone()
    }

    /// Waits until every chunk handed to the writers before this call is on disk and in
    /// Redis (or failed).
    pub fn sync(&self) {
        if let Some((tx, _)) = &self.writer {
            let (done, wait) = std::sync::mpsc::channel();
            if tx.send(WriteJob::Barrier(done)).is_ok() {
                let _ = wait.recv();
            }
        }
        if let Some(r) = &self.remote {
            let (done, wait) = std::sync::mpsc::channel();
            if r.jobs.jobs.send(RemoteJob::Barrier(done)).is_ok() {
                let _ = wait.recv();
            }
        }
        if let Some(d) = &self.disk {
            let _ = d.flush();
        }
    }

    /// Drops every chunk of both local tiers (after pending writes); returns how many chunks
    /// went. The fleet's shared tier keeps its chunks, and the index its entries of them.
    pub fn clear(&self) -> usize {
        self.sync();
        let mut keys = self.ram.lock().unwrap().clear();
        if let Some(d) = &self.disk {
            keys.extend(d.clear());
        }
        keys.sort_unstable();
        keys.dedup();
        let mut spans = self.spans.write().unwrap();
        match &self.remote {
            None => spans.clear(),
            Some(r) => {
                for k in &keys {
                    spans.dropped(k, Tier::Ram);
                    spans.dropped(k, Tier::Disk);
                }
                r.jobs.left_local(&spans, &keys);
            }
        }
        drop(spans);
        self.refresh_gauges();
        keys.len()
    }

    /// Drops one chunk from every tier (the shared one included: the fleet is told); whether
    /// it was held.
    pub fn remove(&self, key: &ChunkKey) -> bool {
        self.sync();
        let (namespace, in_remote) = {
            let spans = self.spans.read().unwrap();
            (spans.namespace_of(key), spans.in_tier(key, Tier::Remote))
        };
        let in_ram = self.ram.lock().unwrap().remove(key);
        let on_disk = self.disk.as_ref().is_some_and(|d| d.remove(key));
        if let (Some(r), Some(ns)) = (&self.remote, namespace) {
            r.jobs.send(RemoteJob::Gone(*key, ns));
        }
        self.spans.write().unwrap().remove(key);
        self.refresh_gauges();
        in_ram || on_disk || in_remote
    }

    /// Chunks in key order after `after`, at most `limit` (of `namespace` only, when given);
    /// and whether more follow.
    pub fn list(&self, after: Option<&ChunkKey>, limit: usize, namespace: Option<&str>) -> (Vec<ChunkInfo>, bool) {
        let mut all: std::collections::BTreeMap<ChunkKey, ChunkInfo> = std::collections::BTreeMap::new();
        let wanted = |ns: &str| namespace.is_none_or(|w| w == ns);
        if let Some(d) = &self.disk {
            for (k, stats, ns) in d.stats().into_iter().filter(|(_, _, ns)| wanted(ns)) {
                all.insert(k, ChunkInfo { key: k.to_hex(), namespace: ns, tiers: vec!["disk"], stats });
            }
        }
        for (k, s, ns) in self.ram.lock().unwrap().stats().filter(|(_, _, ns)| wanted(ns.name())) {
            let info = all.entry(*k).or_insert_with(|| ChunkInfo {
                key: k.to_hex(),
                namespace: ns.name().to_string(),
                tiers: vec![],
                stats: *s,
            });
            info.tiers.insert(0, "ram");
            info.stats.last_access_ms = info.stats.last_access_ms.max(s.last_access_ms);
        }
        let mut page: Vec<ChunkInfo> = match after {
            Some(a) => {
                all.range((std::ops::Bound::Excluded(*a), std::ops::Bound::Unbounded)).map(|(_, i)| i.clone()).collect()
            }
            None => all.into_values().collect(),
        };
        let more = page.len() > limit;
        page.truncate(limit);
        (page, more)
    }

    /// Whether some tier holds `key` (RAM, or disk when it is open).
    pub fn holds(&self, key: &ChunkKey) -> bool {
        self.ram.lock().unwrap().contains(key) || self.disk.as_ref().is_some_and(|d| d.contains(key))
    }

    /// The span index (tests check it against the tiers).
    pub fn spans(&self) -> std::sync::RwLockReadGuard<'_, SpanIndex> {
        self.spans.read().unwrap()
    }

    /// Reports chunks a tier evicted to the span index (and to the fleet, those no local
    /// tier holds any more).
    fn evicted(&self, keys: &[ChunkKey], tier: Tier) {
        if !keys.is_empty() {
            let mut spans = self.spans.write().unwrap();
            keys.iter().for_each(|k| spans.dropped(k, tier));
            if let Some(r) = &self.remote {
                r.jobs.left_local(&spans, keys);
            }
        }
    }

    /// The disk tier, if open.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_deref()
    }

    fn refresh_gauges(&self) {
        let (n, b) = self.ram.lock().unwrap().usage();
        self.stats.ram.entries.store(n as u64, Ordering::Relaxed);
        self.stats.ram.bytes.store(b, Ordering::Relaxed);
        if let Some(d) = &self.disk {
            let (n, b) = d.usage();
            self.stats.disk.entries.store(n as u64, Ordering::Relaxed);
            self.stats.disk.bytes.store(b, Ordering::Relaxed);
        }
    }
}

impl Store {
    /// Puts a chunk read from a lower tier into RAM.
    fn promote(&self, key: &ChunkKey, kv: &Arc<ChunkKv>, stats: ChunkStats) {
        let evicted = self.ram.lock().unwrap().insert(*key, kv.clone(), stats, &*self.evictor(), &self.stats.ram);
        self.stats.ram.evictions.fetch_add(evicted.len() as u64, Ordering::Relaxed);
        self.spans.write().unwrap().held(*key, &kv.tokens, kv.parent, Tier::Ram, kv.namespace.id());
        self.evicted(&evicted, Tier::Ram);
        self.refresh_gauges();
    }

    /// The shared tier's event stream (what a router follows): `None` without a shared tier.
    pub fn remote_events_key(&self) -> Option<String> {
        self.remote.as_ref().map(|r| r.tier.events_key())
    }

    /// Whether the remote tier is configured and answering (for `/ready`): `None` without one.
    pub fn remote_up(&self) -> Option<bool> {
        self.remote.as_ref().map(|r| r.tier.stats().up.load(Ordering::Relaxed) == 1)
    }
}

/// The remote writer thread: shares chunks and news of gone ones, off the request path. A
/// job that finds the breaker open is dropped (the chunk stays local); a failed one drops
/// the connection, which the next job opens afresh.
fn remote_writer(tier: &RemoteTier, jobs: Receiver<RemoteJob>) {
    let mut conn: Option<redis::Connection> = None;
    let stats = tier.stats().clone();
    while let Ok(job) = jobs.recv() {
        if let RemoteJob::Barrier(done) = job {
            let _ = done.send(());
            continue;
        }
        if !tier.allowed() {
            stats.writes_skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let result = tier.run(&mut conn, tier.options().timeout, |c| match &job {
            RemoteJob::Put(key, kv) => tier.put(c, key, kv),
            RemoteJob::Gone(key, ns) => tier.gone(c, key, *ns),
            RemoteJob::Holding(what, key, ns) => tier.holding(c, *what, key, *ns),
            RemoteJob::Barrier(_) => unreachable!("answered above"),
        });
        match result {
            Ok(()) => {
                if matches!(job, RemoteJob::Put(..)) {
                    stats.writes.fetch_add(1, Ordering::Relaxed);
                }
                tier.succeeded();
            }
            Err(e) => {
                stats.writes_skipped.fetch_add(1, Ordering::Relaxed);
                tier.failed(&e);
            }
        }
    }
}

/// Applies the fleet's events to the span index (the remote tailer's work), and keeps them
/// with the cursor `next` after them on the disk tier, if there is one.
fn apply_events(
    tier: &RemoteTier,
    spans: &RwLock<SpanIndex>,
    disk: Option<&DiskTier>,
    events: &[remote::NodeEvent],
    next: &str,
) {
    let mut index = spans.write().unwrap();
    let (mut puts, mut gone) = (Vec::new(), Vec::new());
    for e in events {
        match &e.event {
            remote::Event::Put { key, namespace, tokens } => {
                index.held(*key, tokens, None, Tier::Remote, *namespace);
                puts.push((*key, *namespace, tokens.as_slice()));
            }
            remote::Event::Gone { key, .. } => {
                index.dropped(key, Tier::Remote);
                gone.push(*key);
            }
            // Other nodes' local tiers: a router's business.
            remote::Event::Have { .. } | remote::Event::Drop { .. } => {}
        }
    }
    // Counted while the index is held: whoever sees an event's chunk sees it counted.
    tier.stats().events.fetch_add(events.len() as u64, Ordering::Relaxed);
    drop(index);
    if let Some(d) = disk {
        d.keep_fleet(&puts, &gone, next);
    }
}

impl ChunkStore for Store {
    fn fetch(&self, key: &ChunkKey, used: Use) -> Option<Arc<ChunkKv>> {
        let now = now_ms();
        let s = &self.stats;
        if let Some(kv) = self.ram.lock().unwrap().get(key, now, used) {
            s.ram.hits.fetch_add(1, Ordering::Relaxed);
            if let Some(d) = &self.disk {
                d.touch(key, now, used);
            }
            return Some(kv);
        }
        s.ram.misses.fetch_add(1, Ordering::Relaxed);
        if let Some(disk) = self.disk.as_ref() {
            let started = Instant::now();
            match disk.get(key, now, used) {
                Lookup::Hit(kv, stats) => {
                    s.disk_load_seconds.observe(started.elapsed().as_secs_f64());
                    s.disk.hits.fetch_add(1, Ordering::Relaxed);
                    let kv = Arc::new(kv);
                    self.promote(key, &kv, stats);
                    return Some(kv);
                }
                Lookup::Miss => {
                    s.disk.misses.fetch_add(1, Ordering::Relaxed);
                }
                Lookup::Corrupt => {
                    s.disk.misses.fetch_add(1, Ordering::Relaxed);
                    s.corruptions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let Some(r) = &self.remote else {
            // Whatever the index believed, no tier holds it.
            self.spans.write().unwrap().remove(key);
            self.refresh_gauges();
            return None;
        };
        let Some(ns) = self.spans.read().unwrap().namespace_of(key) else { return None };
        match r.tier.fetch(key, ns) {
            Fetched::Hit(kv) => {
                let stats = ChunkStats {
                    tokens: kv.tokens.len() as u32,
                    created_ms: now,
                    last_access_ms: now,
                    hits: 1,
                    partial_hits: (used == Use::Part) as u32,
                    namespace: ns,
                    ..ChunkStats::default()
                };
                let kv = Arc::new(kv);
                self.promote(key, &kv, stats);
                r.jobs.send(RemoteJob::Holding(Holding::Have, *key, ns));
                // Kept on local disk too: the node serves it while Redis is away.
                if let Some((tx, _)) = &self.writer {
                    if let Err(TrySendError::Full(_)) = tx.try_send(WriteJob::Put(*key, kv.clone(), stats)) {
                        s.writes_skipped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(kv)
            }
            Fetched::Miss | Fetched::Corrupt => {
                // The GET is the authority: no node should look for it again (the `gone` job
                // also deletes a corrupt value).
                self.spans.write().unwrap().remove(key);
                r.jobs.send(RemoteJob::Gone(*key, ns));
                self.refresh_gauges();
                None
            }
            Fetched::Unavailable => {
                // Redis may still hold it: keep what the stream said, try again later.
                let mut spans = self.spans.write().unwrap();
                spans.dropped(key, Tier::Ram);
                spans.dropped(key, Tier::Disk);
                drop(spans);
                self.refresh_gauges();
                None
            }
        }
    }

    fn find_spans(&self, prompt: &[u32], read: &[u64]) -> Vec<SpanMatch> {
        self.spans.read().unwrap().find(prompt, read)
    }

    fn longest_prefix(&self, root: &ChunkKey, prompt: &[u32], read: &[u64]) -> Vec<SpanMatch> {
        self.spans.read().unwrap().longest_prefix(root, prompt, read)
    }

    fn contains(&self, key: &ChunkKey) -> bool {
        self.spans.read().unwrap().contains(key)
    }

    fn put(&self, key: ChunkKey, kv: Arc<ChunkKv>, cost_us: u64) {
        // Chunks are rounded to the stored type now, so RAM and disk serve the same values;
        // prefix-cache chunks stay exact unless told otherwise (see `Layout::dtype_for`).
        // Hidden states of another width than payloads keep are dropped here, not at the disk.
        let mut kv = kv;
        if self.hidden.is_some_and(|h| !kv.hidden.is_empty() && kv.hidden.len() != kv.tokens.len() * h) {
            Arc::make_mut(&mut kv).hidden = Vec::new();
        }
        let dtype = if kv.rotated_at.is_some() { self.prefix_dtype } else { self.dtype };
        if dtype != KvDtype::F32 {
            // In place when the caller handed over its only reference (blend does).
            let owned = Arc::make_mut(&mut kv);
            owned.k.iter_mut().chain(owned.v.iter_mut()).chain([&mut owned.hidden]).for_each(|l| dtype.round(l));
        }
        let now = now_ms();
        let stats = ChunkStats {
            tokens: kv.tokens.len() as u32,
            bytes: 0,
            created_ms: now,
            last_access_ms: now,
            hits: 0,
            partial_hits: 0,
            cost_us,
            namespace: kv.namespace.id(),
        };
        let evicted = self.ram.lock().unwrap().insert(key, kv.clone(), stats, &*self.evictor(), &self.stats.ram);
        self.stats.ram.evictions.fetch_add(evicted.len() as u64, Ordering::Relaxed);
        if self.ram.lock().unwrap().contains(&key) {
            self.spans.write().unwrap().held(key, &kv.tokens, kv.parent, Tier::Ram, kv.namespace.id());
        }
        self.evicted(&evicted, Tier::Ram);
        if let Some(r) = &self.remote {
            // Compose chunks are what other nodes can place anywhere; prefix chunks stay local.
            if kv.rotated_at.is_none() {
                r.jobs.send(RemoteJob::Put(key, kv.clone()));
            }
        }
        if let Some((tx, _)) = &self.writer {
            if let Err(TrySendError::Full(_)) = tx.try_send(WriteJob::Put(key, kv, stats)) {
                self.stats.writes_skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.refresh_gauges();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what was handed to it, then stop.
        if let Some((tx, handle)) = self.writer.take() {
            drop(tx);
            let _ = handle.join();
        }
        if let Some(r) = self.remote.take() {
            r.tier.closing.store(true, Ordering::Relaxed);
            drop(r.jobs);
            r.threads.into_iter().for_each(|t| {
                let _ = t.join();
            });
        }
    }
}

/// The disk writer thread: takes chunks off the request path and onto disk.
struct Writer {
    disk: Arc<DiskTier>,
    stats: Arc<StoreStats>,
    evictor: Arc<RwLock<Arc<dyn Evictor>>>,
    retry_after: Duration,
    spans: Arc<RwLock<SpanIndex>>,
    /// With a shared tier: tells the fleet what the disk evicted.
    announce: Option<RemoteJobs>,
}

impl Writer {
    fn run(self, jobs: Receiver<WriteJob>) {
        let mut failing_since: Option<Instant> = None;
        while let Ok(job) = jobs.recv() {
            let (key, kv, stats) = match job {
                WriteJob::Put(key, kv, stats) => (key, kv, stats),
                WriteJob::Barrier(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            if failing_since.is_some_and(|t| t.elapsed() < self.retry_after) {
                self.stats.writes_skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let evictor = self.evictor.read().unwrap().clone();
            match self.disk.put(key, &kv, stats, &*evictor, &self.stats.disk) {
                Ok(evicted) => {
                    self.stats.disk.evictions.fetch_add(evicted.len() as u64, Ordering::Relaxed);
                    let mut spans = self.spans.write().unwrap();
                    if self.disk.contains(&key) {
                        spans.held(key, &kv.tokens, kv.parent, Tier::Disk, kv.namespace.id());
                    }
                    evicted.iter().for_each(|k| spans.dropped(k, Tier::Disk));
                    if let Some(a) = &self.announce {
                        a.left_local(&spans, &evicted);
                    }
                    drop(spans);
                    if failing_since.take().is_some() {
                        self.stats.degraded.store(0, Ordering::Relaxed);
                        tracing::info!("chunk store: disk writes succeed again; storing resumed");
                    }
                }
                Err(e) => {
                    self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    if failing_since.is_none() {
                        self.stats.degraded.store(1, Ordering::Relaxed);
                        tracing::error!(
                            error = %e, out_of_space = e.is_out_of_space(),
                            "chunk store: disk write failed; serving without storing to disk, retrying every {:?}",
                            self.retry_after
                        );
                    }
                    failing_since = Some(Instant::now());
                }
            }
            let (n, b) = self.disk.usage();
            self.stats.disk.entries.store(n as u64, Ordering::Relaxed);
            self.stats.disk.bytes.store(b, Ordering::Relaxed);
        }
    }
}
