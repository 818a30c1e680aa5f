//! Where chunk KV lives between requests: the [`ChunkStore`] seam and its RAM tier.
//!
//! A stored chunk holds its tokens, K **before RoPE** (so it can be rotated to any new
//! position) and V, per layer. The persistent store (sled + disk segments) implements the
//! same trait later; [`RamStore`] is the in-memory tier with a byte budget and LRU eviction.

use std::collections::HashMap;
use std::sync::Arc;

use super::chunk::ChunkKey;

/// The KV of one chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkKv {
    pub tokens: Vec<u32>,
    /// `None`: `k` is before RoPE (compositional reuse rotates it to wherever the chunk goes).
    /// `Some(p)`: `k` is rotated for positions `p..`, as computed — prefix-cache entries,
    /// which only ever return to the same positions, keep K exact this way (a rotation and
    /// its inverse are not bit-exact in f32).
    pub rotated_at: Option<u32>,
    /// Per layer, `tokens × kv_dim` K.
    pub k: Vec<Vec<f32>>,
    /// Per layer, `tokens × kv_dim` V.
    pub v: Vec<Vec<f32>>,
}

impl ChunkKv {
    /// Bytes of KV payload held.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|l| l.len() * 4).sum()
    }
}

/// A place to keep chunk KV by key.
pub trait ChunkStore: Send {
    /// The chunk, if held (a hit counts as a use).
    fn get(&mut self, key: &ChunkKey) -> Option<Arc<ChunkKv>>;
    /// Keeps a chunk, evicting others if the budget requires.
    fn put(&mut self, key: ChunkKey, kv: Arc<ChunkKv>);
    /// Entries and bytes held.
    fn usage(&self) -> (usize, usize);
    /// Drops everything.
    fn clear(&mut self);
}

struct Entry {
    kv: Arc<ChunkKv>,
    last_used: u64,
}

/// In-memory chunk store under a byte budget, least-recently-used out first.
pub struct RamStore {
    entries: HashMap<ChunkKey, Entry>,
    bytes: usize,
    budget: usize,
    /// Logical clock for recency.
    tick: u64,
}

impl RamStore {
    pub fn new(budget_bytes: usize) -> Self {
        Self { entries: HashMap::new(), bytes: 0, budget: budget_bytes, tick: 0 }
    }
}

impl ChunkStore for RamStore {
    fn get(&mut self, key: &ChunkKey) -> Option<Arc<ChunkKv>> {
        self.tick += 1;
        let e = self.entries.get_mut(key)?;
        e.last_used = self.tick;
        Some(e.kv.clone())
    }

    fn put(&mut self, key: ChunkKey, kv: Arc<ChunkKv>) {
        let size = kv.bytes();
        if size > self.budget {
            return;
        }
        self.tick += 1;
        if let Some(old) = self.entries.insert(key, Entry { kv, last_used: self.tick }) {
            self.bytes -= old.kv.bytes();
        }
        self.bytes += size;
        while self.bytes > self.budget {
            let Some((&victim, _)) = self.entries.iter().filter(|(k, _)| **k != key).min_by_key(|(_, e)| e.last_used)
            else {
                break;
            };
            if let Some(e) = self.entries.remove(&victim) {
                self.bytes -= e.kv.bytes();
            }
        }
    }

    fn usage(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(n: usize) -> Arc<ChunkKv> {
        Arc::new(ChunkKv { tokens: vec![0; n], rotated_at: None, k: vec![vec![0.0; n]], v: vec![vec![0.0; n]] })
    }

    #[test]
    fn lru_eviction_keeps_the_budget() {
        let mut s = RamStore::new(100);
        let key = |i: u32| ChunkKey::compose("m", &[i]);
        s.put(key(1), kv(5)); // 40 bytes
        s.put(key(2), kv(5));
        assert!(s.get(&key(1)).is_some()); // 1 is now more recent than 2
        s.put(key(3), kv(5));
        assert!(s.usage().1 <= 100);
        assert!(s.get(&key(2)).is_none(), "least recently used goes first");
        assert!(s.get(&key(1)).is_some() && s.get(&key(3)).is_some());
        s.put(key(4), kv(50)); // larger than the budget: not kept
        assert!(s.get(&key(4)).is_none());
    }
}
