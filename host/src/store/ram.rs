//! The RAM tier: decoded chunks, ready to splice, under a byte budget.

use std::collections::HashMap;
use std::sync::Arc;

use super::evict::{self, Candidate, Evictor};
use super::{ChunkKey, ChunkKv, ChunkStats, TierStats, Use};

struct Entry {
    kv: Arc<ChunkKv>,
    stats: ChunkStats,
}

/// Chunks in memory. Not synchronised: the [`super::Store`] holds it under a lock.
pub struct RamTier {
    entries: HashMap<ChunkKey, Entry>,
    bytes: u64,
    budget: u64,
}

impl RamTier {
    pub fn new(budget: u64) -> Self {
        Self { entries: HashMap::new(), bytes: 0, budget }
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

    /// Keeps a chunk, first evicting through `evictor` until it fits. A chunk larger than
    /// the whole budget is not kept. Returns the chunks evicted.
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
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.stats.bytes;
        }
        if size > self.budget {
            return Vec::new();
        }
        let over = (self.bytes + size).saturating_sub(self.budget);
        let mut evicted = Vec::new();
        if over > 0 {
            let keys: Vec<ChunkKey> = self.entries.keys().copied().collect();
            let cands: Vec<Candidate> = keys.iter().map(|k| self.entries[k].stats.candidate()).collect();
            for i in evict::choose(evictor, &cands, over, stats.last_access_ms, &tier.evictor_fallbacks) {
                if let Some(e) = self.entries.remove(&keys[i]) {
                    self.bytes -= e.stats.bytes;
                    evicted.push(keys[i]);
                }
            }
        }
        self.bytes += size;
        self.entries.insert(key, Entry { kv, stats });
        evicted
    }

    pub fn remove(&mut self, key: &ChunkKey) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                self.bytes -= e.stats.bytes;
                true
            }
            None => false,
        }
    }

    pub fn clear(&mut self) -> Vec<ChunkKey> {
        self.bytes = 0;
        self.entries.drain().map(|(k, _)| k).collect()
    }

    pub fn usage(&self) -> (usize, u64) {
        (self.entries.len(), self.bytes)
    }

    pub fn stats(&self) -> impl Iterator<Item = (&ChunkKey, &ChunkStats)> {
        self.entries.iter().map(|(k, e)| (k, &e.stats))
    }
}
