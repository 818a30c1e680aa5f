//! The disk tier: a sled index over payload extents in segment files.
//!
//! Invariants:
//! - A payload is written and `fdatasync`ed before the index entry that points to it is
//!   inserted, so an entry never points at bytes that were not on disk first.
//! - An evicted entry leaves the index (flushed) before its space is freed for reuse.
//! - Every read is checked (header, key, layout, CRC) before it is served; a mismatch is a
//!   miss, counted, logged, and the entry is removed — never a wrong answer.
//! - Recovery on open drops entries whose payload is missing or torn, and gives back every
//!   byte of segment space that no entry points at (orphans of a crash mid-write).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::evict::{self, Evictor};
use super::payload::{self, HEADER_LEN, Layout};
use super::segment::{Extent, Extents, Release, SegmentFiles};
use super::{ChunkKey, ChunkKv, ChunkStats, Namespace, StoreError, TierStats, Use, namespace_id};

/// One index entry (sled value, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IndexEntry {
    extent: Extent,
    /// CRC-32 of the payload (its trailer).
    checksum: u32,
    /// sha256 of the model fingerprint, hex.
    model: String,
    tokens: u32,
    created_ms: u64,
    last_access_ms: u64,
    hits: u32,
    /// Hits that used only a run inside the chunk.
    #[serde(default)]
    partial_hits: u32,
    cost_us: u64,
    /// For a prefix-cache chunk, the key (hex) of the chunk before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    /// Its namespace (absent: the empty one).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    namespace: String,
}

impl IndexEntry {
    fn stats(&self) -> ChunkStats {
        ChunkStats {
            tokens: self.tokens,
            bytes: self.extent.len,
            created_ms: self.created_ms,
            last_access_ms: self.last_access_ms,
            hits: self.hits,
            partial_hits: self.partial_hits,
            cost_us: self.cost_us,
            namespace: namespace_id(&self.namespace),
        }
    }

    fn parent(&self) -> Option<ChunkKey> {
        self.parent.as_deref().and_then(ChunkKey::from_hex)
    }

    fn record_hit(&mut self, now_ms: u64, used: Use) {
        self.last_access_ms = now_ms;
        self.hits += 1;
        self.partial_hits += (used == Use::Part) as u32;
    }
}

/// What recovery found when the tier opened.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub entries: usize,
    /// Entries dropped: payload missing, torn, overlapping or unreadable.
    pub dropped: usize,
    /// Segment bytes no entry pointed at, given back to the filesystem.
    pub reclaimed_bytes: u64,
}

/// The result of a lookup.
pub enum Lookup {
    Hit(ChunkKv, ChunkStats),
    Miss,
    /// The payload failed its checks; the entry is gone.
    Corrupt,
}

struct State {
    entries: HashMap<ChunkKey, IndexEntry>,
    extents: Extents,
    bytes: u64,
    /// Bytes per namespace id.
    namespace_bytes: HashMap<u64, u64>,
}

impl State {
    fn account(&mut self, e: &IndexEntry, add: bool) {
        let b = self.namespace_bytes.entry(namespace_id(&e.namespace)).or_default();
        match add {
            true => *b += e.extent.len,
            false => *b -= e.extent.len,
        }
    }
}

/// A chunk as the span index is rebuilt from it.
pub struct IndexedChunk {
    pub key: ChunkKey,
    pub tokens: Vec<u32>,
    pub parent: Option<ChunkKey>,
    pub namespace: String,
}

/// The sled tree of what the fleet's event stream said (chunk keys are 32 bytes; the two
/// other keys are shorter, so they never clash).
const FLEET_TREE: &str = "fleet";
const CURSOR_KEY: &[u8] = b"cursor";
const STREAM_KEY: &[u8] = b"stream";

/// Chunks on local disk.
pub struct DiskTier {
    index: sled::Db,
    files: Box<dyn SegmentFiles>,
    pub(super) layout: Layout,
    model_hex: String,
    budget: u64,
    /// What one namespace may hold.
    namespace_budget: u64,
    state: Mutex<State>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl DiskTier {
    /// Opens (or creates) the tier in `dir` and recovers it.
    pub fn open(
        dir: &Path,
        files: Box<dyn SegmentFiles>,
        layout: Layout,
        budget: u64,
        segment_bytes: u64,
    ) -> Result<(Self, Recovery), StoreError> {
        let index =
            sled::Config::new().path(dir.join("index")).cache_capacity(64 << 20).flush_every_ms(Some(500)).open()?;
        let model_hex = hex(&layout.model);
        let lengths: HashMap<u32, u64> =
            files.list().map_err(StoreError::io("listing segments"))?.into_iter().collect();
        let mut rec = Recovery::default();
        let mut entries: HashMap<ChunkKey, IndexEntry> = HashMap::new();
        let mut header = vec![0u8; HEADER_LEN];
        for item in index.iter() {
            let (k, v) = item?;
            let parsed = <[u8; 32]>::try_from(&k[..]).ok().zip(serde_json::from_slice::<IndexEntry>(&v).ok());
            let sound = parsed.as_ref().is_some_and(|(key, e)| {
                let x = e.extent;
                let inside = lengths.get(&x.segment).is_some_and(|&l| x.offset + x.len <= l);
                // A payload of another model cannot be checked against this layout; its
                // bounds are all we can see (it is never served to this model anyway).
                inside
                    && (e.model != model_hex
                        || (files.read_at(x.segment, x.offset, &mut header).is_ok()
                            && payload::header(&header, &layout)
                                .is_ok_and(|h| h.key.0 == *key && h.total_len == x.len)))
            });
            match parsed {
                Some((key, e)) if sound => {
                    entries.insert(ChunkKey(key), e);
                }
                _ => {
                    index.remove(&k)?;
                    rec.dropped += 1;
                }
            }
        }
        // Two entries over the same bytes cannot both be right: keep the first.
        let mut by_place: Vec<(Extent, ChunkKey)> = entries.iter().map(|(k, e)| (e.extent, *k)).collect();
        by_place.sort_unstable_by_key(|(x, _)| (x.segment, x.offset));
        let mut reach: Option<(u32, u64)> = None;
        for (x, key) in by_place {
            if reach.is_some_and(|(s, end)| s == x.segment && x.offset < end) {
                entries.remove(&key);
                index.remove(key.0)?;
                rec.dropped += 1;
            } else {
                reach = Some((x.segment, x.offset + x.len));
            }
        }
        let used: Vec<Extent> = entries.values().map(|e| e.extent).collect();
        let (extents, gaps) = Extents::rebuild(segment_bytes, used);
        for g in gaps {
            files.release(g.segment, g.offset, g.len).map_err(StoreError::io("releasing orphaned space"))?;
            rec.reclaimed_bytes += g.len;
        }
        let ends: HashMap<u32, u64> = extents.ends().collect();
        for (&segment, &len) in &lengths {
            match ends.get(&segment) {
                None => files.remove(segment).map_err(StoreError::io("removing an empty segment"))?,
                Some(&end) if end < len => files.truncate(segment, end).map_err(StoreError::io("truncating"))?,
                Some(_) => continue,
            }
            rec.reclaimed_bytes += len - ends.get(&segment).copied().unwrap_or(0);
        }
        index.flush()?;
        rec.entries = entries.len();
        let bytes = entries.values().map(|e| e.extent.len).sum();
        let mut state = State { entries: HashMap::new(), extents, bytes, namespace_bytes: HashMap::new() };
        for e in entries.values() {
            state.account(e, true);
        }
        state.entries = entries;
        let state = Mutex::new(state);
        Ok((Self { index, files, layout, model_hex, budget, namespace_budget: budget, state }, rec))
    }

    /// Lets one namespace fill `share` of the budget only (see [`super::StoreOptions`]).
    pub fn set_namespace_share(&mut self, share: f64) {
        self.namespace_budget = (self.budget as f64 * share.clamp(0.0, 1.0)) as u64;
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.state.lock().unwrap().entries.contains_key(key)
    }

    /// Every chunk of this model with its tokens, parent and namespace (what the span index
    /// is rebuilt from). The tokens are read without the checksum: a payload that fails it
    /// later is a miss then, and a hit is checked token by token before it is used.
    pub fn indexed(&self) -> Vec<IndexedChunk> {
        let entries: Vec<(ChunkKey, IndexEntry)> =
            self.state.lock().unwrap().entries.iter().map(|(k, e)| (*k, e.clone())).collect();
        let mut out = Vec::with_capacity(entries.len());
        for (key, e) in entries.into_iter().filter(|(_, e)| e.model == self.model_hex) {
            let mut buf = vec![0u8; HEADER_LEN + 4 * e.tokens as usize];
            if self.files.read_at(e.extent.segment, e.extent.offset, &mut buf).is_err() {
                continue;
            }
            if let Ok(tokens) = payload::tokens(&buf, &key, &self.layout) {
                out.push(IndexedChunk { key, tokens, parent: e.parent(), namespace: e.namespace });
            }
        }
        out
    }

    /// Reads and verifies a chunk; a hit updates its statistics.
    pub fn get(&self, key: &ChunkKey, now_ms: u64, used: Use) -> Lookup {
        let Some(entry) = self.state.lock().unwrap().entries.get(key).cloned() else { return Lookup::Miss };
        let x = entry.extent;
        let mut buf = vec![0u8; x.len as usize];
        let read = self.files.read_at(x.segment, x.offset, &mut buf).map_err(|e| e.to_string());
        let decoded = read.and_then(|()| payload::decode(&buf, key, &self.layout).map_err(|e| e.to_string()));
        let mut st = self.state.lock().unwrap();
        let still_there = st.entries.get(key).is_some_and(|e| e.extent == x);
        match decoded {
            Ok(mut kv) if still_there => {
                let e = st.entries.get_mut(key).unwrap();
                e.record_hit(now_ms, used);
                kv.parent = e.parent();
                kv.namespace = Namespace::new(&e.namespace);
                let stats = e.stats();
                let _ = self.index.insert(key.0, serde_json::to_vec(&*e).unwrap());
                Lookup::Hit(kv, stats)
            }
            // Evicted (and its space perhaps reused) while we read: an ordinary miss.
            _ if !still_there => Lookup::Miss,
            Ok(_) => unreachable!(),
            Err(why) => {
                tracing::warn!(chunk = ?key, segment = x.segment, offset = x.offset, %why, "corrupt chunk payload dropped");
                self.remove_locked(&mut st, key);
                let _ = self.index.flush();
                Lookup::Corrupt
            }
        }
    }

    /// Records a use served from a faster tier.
    pub fn touch(&self, key: &ChunkKey, now_ms: u64, used: Use) {
        let mut st = self.state.lock().unwrap();
        if let Some(e) = st.entries.get_mut(key) {
            e.record_hit(now_ms, used);
            let _ = self.index.insert(key.0, serde_json::to_vec(&*e).unwrap());
        }
    }

    /// Writes a chunk, evicting through `evictor` first if the budget requires. Returns the
    /// chunks evicted. A chunk already held, or larger than the whole budget, is skipped.
    pub fn put(
        &self,
        key: ChunkKey,
        kv: &ChunkKv,
        stats: ChunkStats,
        evictor: &dyn Evictor,
        tier: &TierStats,
    ) -> Result<Vec<ChunkKey>, StoreError> {
        if self.contains(&key) {
            return Ok(Vec::new());
        }
        let (bytes, checksum) = payload::encode(&key, kv, &self.layout);
        let len = bytes.len() as u64;
        if len > self.budget.min(self.namespace_budget) {
            return Ok(Vec::new());
        }
        let ns = stats.namespace;
        let (extent, evicted) = {
            let mut st = self.state.lock().unwrap();
            let mut evicted = Vec::new();
            // Its namespace's own chunks while the namespace would be over its share, then any.
            let own = st.namespace_bytes.get(&ns).copied().unwrap_or(0);
            let over = (own + len).saturating_sub(self.namespace_budget);
            self.evict(&mut st, |e| e.namespace == ns, over, &stats, evictor, tier, &mut evicted)?;
            let over = (st.bytes + len).saturating_sub(self.budget);
            self.evict(&mut st, |_| true, over, &stats, evictor, tier, &mut evicted)?;
            let extent = st.extents.allocate(len);
            st.bytes += len;
            *st.namespace_bytes.entry(ns).or_default() += len;
            (extent, evicted)
        };
        let written = self
            .files
            .write_at(extent.segment, extent.offset, &bytes)
            .and_then(|()| self.files.sync(extent.segment))
            .map_err(StoreError::io("writing a chunk payload"));
        let entry = IndexEntry {
            extent,
            checksum,
            model: self.model_hex.clone(),
            tokens: stats.tokens,
            created_ms: stats.created_ms,
            last_access_ms: stats.last_access_ms,
            hits: 0,
            partial_hits: 0,
            cost_us: stats.cost_us,
            parent: kv.parent.map(|p| p.to_hex()),
            namespace: kv.namespace.name().to_string(),
        };
        // The entry is flushed too: a chunk counted on disk survives a crash (this runs on the
        // writer thread, never on a request's path).
        let indexed = written.and_then(|()| {
            self.index.insert(key.0, serde_json::to_vec(&entry).unwrap())?;
            Ok(self.index.flush()?)
        });
        let mut st = self.state.lock().unwrap();
        match indexed {
            Ok(_) => {
                st.entries.insert(key, entry);
                Ok(evicted)
            }
            Err(e) => {
                st.bytes -= len;
                *st.namespace_bytes.entry(ns).or_default() -= len;
                self.release(&mut st, extent);
                Err(e)
            }
        }
    }

    /// Evicts at least `over` bytes of the chunks `among` admits; the removals are durable
    /// before their space can be reused.
    #[allow(clippy::too_many_arguments)]
    fn evict(
        &self,
        st: &mut State,
        among: impl Fn(&ChunkStats) -> bool,
        over: u64,
        incoming: &ChunkStats,
        evictor: &dyn Evictor,
        tier: &TierStats,
        evicted: &mut Vec<ChunkKey>,
    ) -> Result<(), StoreError> {
        if over == 0 {
            return Ok(());
        }
        let keys: Vec<ChunkKey> = st.entries.iter().filter(|(_, e)| among(&e.stats())).map(|(k, _)| *k).collect();
        let cands: Vec<_> = keys.iter().map(|k| st.entries[k].stats().candidate()).collect();
        let victims = evict::choose(evictor, &cands, over, incoming.created_ms, &tier.evictor_fallbacks);
        let mut freed = Vec::new();
        for i in victims {
            if let Some(e) = st.entries.remove(&keys[i]) {
                self.index.remove(keys[i].0)?;
                st.bytes -= e.extent.len;
                st.account(&e, false);
                freed.push(e.extent);
                evicted.push(keys[i]);
            }
        }
        self.index.flush()?;
        for x in freed {
            self.release(st, x);
        }
        Ok(())
    }

    fn release(&self, st: &mut State, x: Extent) {
        let done = match st.extents.free(x) {
            Release::Hole { offset, len } => self.files.release(x.segment, offset, len),
            Release::Truncate(len) => self.files.truncate(x.segment, len),
            Release::Remove => self.files.remove(x.segment),
        };
        if let Err(e) = done {
            tracing::warn!(segment = x.segment, error = %e, "could not give freed chunk space back");
        }
    }

    fn remove_locked(&self, st: &mut State, key: &ChunkKey) -> bool {
        let Some(e) = st.entries.remove(key) else { return false };
        let _ = self.index.remove(key.0);
        st.bytes -= e.extent.len;
        st.account(&e, false);
        self.release(st, e.extent);
        true
    }

    pub fn remove(&self, key: &ChunkKey) -> bool {
        let mut st = self.state.lock().unwrap();
        let removed = self.remove_locked(&mut st, key);
        let _ = self.index.flush();
        removed
    }

    /// Drops every chunk; returns their keys.
    pub fn clear(&self) -> Vec<ChunkKey> {
        let mut st = self.state.lock().unwrap();
        let keys: Vec<ChunkKey> = st.entries.keys().copied().collect();
        for k in &keys {
            self.remove_locked(&mut st, k);
        }
        let _ = self.index.flush();
        keys
    }

    pub fn usage(&self) -> (usize, u64) {
        let st = self.state.lock().unwrap();
        (st.entries.len(), st.bytes)
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Every chunk's statistics and namespace.
    pub fn stats(&self) -> Vec<(ChunkKey, ChunkStats, String)> {
        self.state.lock().unwrap().entries.iter().map(|(k, e)| (*k, e.stats(), e.namespace.clone())).collect()
    }

    /// Bytes the segment files occupy on the device.
    pub fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.files.allocated_bytes()
    }

    /// Drops the payloads from the page cache (cold-read benchmarks).
    pub fn evict_from_page_cache(&self) -> std::io::Result<()> {
        let segments: Vec<u32> = self.state.lock().unwrap().extents.ends().map(|(s, _)| s).collect();
        segments.into_iter().try_for_each(|s| self.files.evict_from_page_cache(s))
    }

    /// What the fleet's event stream said, as last kept ([`DiskTier::keep_fleet`]): the cursor
    /// after the last event applied, and every chunk the shared tier held then (key,
    /// namespace id, tokens). A restarted node resumes the stream there instead of replaying it.
    pub fn fleet(&self, events_key: &str) -> (String, Vec<(ChunkKey, u64, Vec<u32>)>) {
        let Ok(tree) = self.index.open_tree(FLEET_TREE) else { return ("0".into(), Vec::new()) };
        if tree.get(STREAM_KEY).ok().flatten().as_deref() != Some(events_key.as_bytes()) {
            // Another stream (another Redis database, model or element type): start afresh.
            let _ = tree.clear();
            let _ = tree.insert(STREAM_KEY, events_key.as_bytes());
            return ("0".into(), Vec::new());
        }
        let cursor = tree
            .get(CURSOR_KEY)
            .ok()
            .flatten()
            .and_then(|c| String::from_utf8(c.to_vec()).ok())
            .unwrap_or_else(|| "0".into());
        let chunks = tree
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, v)| {
                let key = ChunkKey(<[u8; 32]>::try_from(&k[..]).ok()?);
                if v.len() < 8 || (v.len() - 8) % 4 != 0 {
                    return None;
                }
                let ns = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
                let tokens =
                    v[8..].chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
                Some((key, ns, tokens))
            })
            .collect();
        (cursor, chunks)
    }

    /// Keeps what a batch of the stream said (chunks the shared tier gained and lost) and the
    /// cursor after it, in one atomic batch.
    pub fn keep_fleet(&self, puts: &[(ChunkKey, u64, &[u32])], gone: &[ChunkKey], cursor: &str) {
        let Ok(tree) = self.index.open_tree(FLEET_TREE) else { return };
        let mut batch = sled::Batch::default();
        for (key, ns, tokens) in puts {
            let mut v = ns.to_le_bytes().to_vec();
            v.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
            batch.insert(&key.0[..], v);
        }
        for key in gone {
            batch.remove(&key.0[..]);
        }
        batch.insert(CURSOR_KEY, cursor.as_bytes());
        if let Err(e) = tree.apply_batch(batch) {
            tracing::warn!(error = %e, "chunk index: keeping the fleet's stream cursor failed");
        }
    }

    /// Makes the index durable (on shutdown; otherwise sled flushes every 500 ms).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.index.flush()?;
        Ok(())
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        if let Err(e) = self.index.flush() {
            tracing::error!(error = %e, "chunk index flush on shutdown failed");
        }
    }
}
