//! The RAM tier: decoded chunks, ready to splice, under a byte budget.

use std::collections::HashMap;
use std::sync::Arc;

use super::evict::{self, Candidate, Evictor};
use super::{ChunkKey, ChunkKv, ChunkStats, Namespace, TierStats, Use};

struct Entry {
    kv: Arc<ChunkKv>,
    stats: ChunkStats,
}

/// Chunks in memory. Not synchronised: the [`super::Store`] holds it under a lock.
pub struct RamTier {
    entries: HashMap<ChunkKey, Entry>,
    bytes: u64,
    budget: u64,
    /// Bytes per namespace id, and what one namespace may hold.
    namespace_bytes: HashMap<u64, u64>,
    namespace_budget: u64,
}

impl RamTier {
    /// A tier of `budget` bytes, of which one namespace may fill `share`.
    pub fn new(budget: u64, share: f64) -> Self {
        let namespace_budget = (budget as f64 * share.clamp(0.0, 1.0)) as u64;
        Self { entries: HashMap::new(), bytes: 0, budget, namespace_bytes: HashMap::new(), namespace_budget }
    }

    /// The chunk, if held; counts the hit.
    pub fn get(&mut self, key: &ChunkKey, now_ms: u64, used: Use) -> Option<Arc<ChunkKv>> {
        let e = self.entries.get_mut(key)?;
        e.stats.last_access_ms = now_ms;
        e.stats.hits += 1;
        e.stats.partial_hits += (used == Use::Part) as u32;
        Some(e.kv.clone())
    }

    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Keeps a chunk, first evicting through `evictor` until it fits: its namespace's own
    /// chunks while the namespace would be over its share, then any. A chunk larger than
    /// its namespace's share is not kept. Returns the chunks evicted.
    pub fn insert(
        &mut self,
        key: ChunkKey,
        kv: Arc<ChunkKv>,
        mut stats: ChunkStats,
        evictor: &dyn Evictor,
        tier: &TierStats,
    ) -> Vec<ChunkKey> {
        let size = kv.bytes() as u64;
        stats.bytes = size;
        let ns = stats.namespace;
        self.remove(&key);
        if size > self.budget.min(self.namespace_budget) {
            return Vec::new();
        }
        let mut evicted = Vec::new();
        let own = self.namespace_bytes.get(&ns).copied().unwrap_or(0);
        let over = (own + size).saturating_sub(self.namespace_budget);
        self.evict(|s| s.namespace == ns, over, &stats, evictor, tier, &mut evicted);
        let over = (self.bytes + size).saturating_sub(self.budget);
        self.evict(|_| true, over, &stats, evictor, tier, &mut evicted);
        self.bytes += size;
        *self.namespace_bytes.entry(ns).or_default() += size;
        self.entries.insert(key, Entry { kv, stats });
        evicted
    }

    /// Evicts at least `over` bytes of the chunks `among` admits.
    fn evict(
        &mut self,
        among: impl Fn(&ChunkStats) -> bool,
        over: u64,
        incoming: &ChunkStats,
        evictor: &dyn Evictor,
        tier: &TierStats,
        evicted: &mut Vec<ChunkKey>,
    ) {
        if over == 0 {
            return;
        }
        let keys: Vec<ChunkKey> = self.entries.iter().filter(|(_, e)| among(&e.stats)).map(|(k, _)| *k).collect();
        let cands: Vec<Candidate> = keys.iter().map(|k| self.entries[k].stats.candidate()).collect();
        for i in evict::choose(evictor, &cands, over, incoming.last_access_ms, &tier.evictor_fallbacks) {
            if self.remove(&keys[i]) {
                evicted.push(keys[i]);
            }
        }
    }

    pub fn remove(&mut self, key: &ChunkKey) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                self.bytes -= e.stats.bytes;
                if let Some(b) = self.namespace_bytes.get_mut(&e.stats.namespace) {
                    *b -= e.stats.bytes;
                    if *b == 0 {
                        self.namespace_bytes.remove(&e.stats.namespace);
                    }
                }
                true
            }
            None => false,
        }
    }

    pub fn clear(&mut self) -> Vec<ChunkKey> {
        self.bytes = 0;
        self.namespace_bytes.clear();
        self.entries.drain().map(|(k, _)| k).collect()
    }

    pub fn usage(&self) -> (usize, u64) {
        (self.entries.len(), self.bytes)
    }

    /// Every chunk's statistics and namespace.
    pub fn stats(&self) -> impl Iterator<Item = (&ChunkKey, &ChunkStats, &Namespace)> {
        self.entries.iter().map(|(k, e)| (k, &e.stats, &e.kv.namespace))
    }
}
