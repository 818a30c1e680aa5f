//! Choosing victims when a tier is over its budget: the [`Evictor`] seam.
//!
//! A tier hands the evictor every candidate's statistics, how many bytes must go and the
//! time, once per eviction round. The built-in [`LeastRecentlyUsed`] is the safe behaviour;
//! the `evictor` plugin takes the seam over. Whatever an evictor answers, [`choose`] makes
//! the round correct: indices out of range or repeated are ignored, and if the victims do not
//! free enough, least-recently-used tops them up (and the round counts as a fallback).

use std::sync::atomic::{AtomicU64, Ordering};

/// What a tier knows of an eviction candidate (the WIT `candidate` record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub bytes: u64,
    pub tokens: u32,
    pub created_ms: u64,
    pub last_access_ms: u64,
    pub hits: u32,
    pub cost_us: u64,
}

/// A policy for which chunks leave a tier.
pub trait Evictor: Send + Sync {
    /// Indices into `candidates` to evict, whose bytes add up to at least `bytes_to_free`.
    fn victims(&self, candidates: &[Candidate], bytes_to_free: u64, now_ms: u64) -> Vec<u32>;
}

/// Oldest access first; among equals, the oldest chunk.
pub struct LeastRecentlyUsed;

impl Evictor for LeastRecentlyUsed {
    fn victims(&self, candidates: &[Candidate], bytes_to_free: u64, _now_ms: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..candidates.len() as u32).collect();
        order.sort_by_key(|&i| {
            let c = &candidates[i as usize];
            (c.last_access_ms, c.created_ms)
        });
        let mut freed = 0;
        order
            .into_iter()
            .take_while(|&i| {
                let more = freed < bytes_to_free;
                freed += candidates[i as usize].bytes;
                more
            })
            .collect()
    }
}

/// Runs one eviction round through `evictor` and makes its answer correct: the returned
/// indices are unique, in range, and free at least `bytes_to_free` (or are every candidate).
/// `fallbacks` counts rounds the evictor's answer had to be corrected.
pub fn choose(
    evictor: &dyn Evictor,
    candidates: &[Candidate],
    bytes_to_free: u64,
    now_ms: u64,
    fallbacks: &AtomicU64,
) -> Vec<usize> {
    if bytes_to_free == 0 || candidates.is_empty() {
        return Vec::new();
    }
    let mut taken = vec![false; candidates.len()];
    let mut out = Vec::new();
    let mut freed = 0;
    let mut sound = true;
    for i in evictor.victims(candidates, bytes_to_free, now_ms) {
        match taken.get_mut(i as usize) {
            Some(t) if !*t => {
                *t = true;
                freed += candidates[i as usize].bytes;
                out.push(i as usize);
            }
            _ => sound = false,
        }
    }
    if freed < bytes_to_free {
        sound &= out.len() == candidates.len();
        let rest: Vec<usize> = (0..candidates.len()).filter(|&i| !taken[i]).collect();
        let rest_c: Vec<Candidate> = rest.iter().map(|&i| candidates[i]).collect();
        for j in LeastRecentlyUsed.victims(&rest_c, bytes_to_free - freed, now_ms) {
            out.push(rest[j as usize]);
        }
    }
    if !sound {
        fallbacks.fetch_add(1, Ordering::Relaxed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(bytes: u64, last: u64) -> Candidate {
        Candidate { bytes, tokens: 1, created_ms: 0, last_access_ms: last, hits: 0, cost_us: 1 }
    }

    #[test]
    fn lru_frees_just_enough_oldest_first() {
        let cands = [c(10, 5), c(10, 1), c(10, 3)];
        assert_eq!(LeastRecentlyUsed.victims(&cands, 15, 9), vec![1, 2]);
        assert_eq!(LeastRecentlyUsed.victims(&cands, 10, 9), vec![1]);
    }

    struct Answer(Vec<u32>);
    impl Evictor for Answer {
        fn victims(&self, _: &[Candidate], _: u64, _: u64) -> Vec<u32> {
            self.0.clone()
        }
    }

    #[test]
    fn a_wrong_answer_is_corrected_and_counted() {
        let cands = [c(10, 5), c(10, 1), c(10, 3)];
        let fallbacks = AtomicU64::new(0);
        assert_eq!(choose(&Answer(vec![0]), &cands, 10, 9, &fallbacks), vec![0]);
        assert_eq!(fallbacks.load(Ordering::Relaxed), 0);
        // Out of range and repeated indices are dropped; too little freed is topped up by LRU.
        assert_eq!(choose(&Answer(vec![7, 0, 0]), &cands, 15, 9, &fallbacks), vec![0, 1]);
        assert_eq!(fallbacks.load(Ordering::Relaxed), 1);
        assert_eq!(choose(&Answer(vec![]), &cands, 100, 9, &fallbacks), vec![1, 2, 0]);
        assert_eq!(fallbacks.load(Ordering::Relaxed), 2);
    }
}
