//! kvgate's default `evictor`: one-hit chunks leave first, then the cheapest to lose (GDSF).
//!
//! Two observations decide the order in which candidates leave:
//! - **Scan resistance** (S3-FIFO's insight): most chunks are never served again after they
//!   were stored. A RAG workload that retrieves many distinct passages once would flush a
//!   recency-ordered cache of the few passages every request shares. So candidates with
//!   `hits == 0` go first, oldest last access first, before any chunk that has been reused.
//! - **Cost awareness** (GreedyDual-Size-Frequency): among reused chunks, keep the ones that save
//!   the most compute per byte of store. Priority = (hits + 1) × cost-us ÷ bytes, and the lowest
//!   priority goes first.
//!
//! GDSF ages entries with an inflation clock carried between evictions; a component keeps no
//! state between calls, so age comes from the request instead: priority is divided by
//! `1 + age_hours` (age = now − last access). A chunk that was hot an hour ago counts half as
//! much as one hot now, so a once-popular chunk cannot stay forever on its old hit count,
//! while an hour is long enough that a working set with minutes between requests keeps it.
//!
//! Victims are taken in that order until `bytes-to-free` is reached; if all candidates
//! together hold less, all are returned (the WIT contract).
//!
//! Layout: [`victims`] is the policy as a plain function (tested natively), [`priority`] the
//! GDSF score; `Component` only adapts the WIT types.

use std::cmp::Ordering;

// Brings `Guest`, `export!` and the world's `use`d types (`PluginInfo`, `EvictRequest`,
// `Candidate`) into scope.
wit_bindgen::generate!({ path: "../../wit", world: "evictor" });

use kvgate::policy::types::Candidate;

/// Milliseconds of age that halve a reused chunk's priority (the aging term's scale).
pub const AGE_HALVING_MS: f64 = 3_600_000.0;

/// Indices into `candidates`, in eviction order, whose bytes add up to at least `bytes_to_free`
/// (or every candidate when they hold less).
pub fn victims(candidates: &[Candidate], bytes_to_free: u64, now_ms: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..candidates.len() as u32).collect();
    order.sort_by(|&a, &b| leaves_first(&candidates[a as usize], &candidates[b as usize], now_ms).then(a.cmp(&b)));
    let mut freed = 0u64;
    let taken = order
        .iter()
        .take_while(|&&i| {
            let more = freed < bytes_to_free;
            freed = freed.saturating_add(candidates[i as usize].bytes);
            more
        })
        .count();
    order.truncate(taken);
    order
}

/// GDSF priority of a chunk at `now_ms`: compute saved per byte, weighted by use, aged.
pub fn priority(c: &Candidate, now_ms: u64) -> f64 {
    let age_ms = now_ms.saturating_sub(c.last_access_ms) as f64;
    (c.hits as f64 + 1.0) * c.cost_us as f64 / c.bytes.max(1) as f64 / (1.0 + age_ms / AGE_HALVING_MS)
}

/// Whether `a` is evicted before `b`: one-hit chunks (oldest access first), then lowest priority
/// (ties to the older access).
fn leaves_first(a: &Candidate, b: &Candidate, now_ms: u64) -> Ordering {
    let reused = |c: &Candidate| c.hits > 0;
    reused(a).cmp(&reused(b)).then_with(|| {
        let by_priority = if reused(a) { priority(a, now_ms).total_cmp(&priority(b, now_ms)) } else { Ordering::Equal };
        by_priority.then(a.last_access_ms.cmp(&b.last_access_ms)).then(a.created_ms.cmp(&b.created_ms))
    })
}

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }

    fn self_test() -> Result<(), String> {
        let chunk = |hits, last_access_ms| Candidate {
            bytes: 100,
            tokens: 10,
            created_ms: 0,
            last_access_ms,
            hits,
            cost_us: 1_000,
        };
        let got = victims(&[chunk(3, 50), chunk(0, 40), chunk(1, 60), chunk(0, 30)], 150, 100);
        if got == [3, 1] { Ok(()) } else { Err(format!("canned eviction: got {got:?}, want [3, 1]")) }
    }

    fn victims(request: EvictRequest) -> Vec<u32> {
        victims(&request.candidates, request.bytes_to_free, request.now_ms)
    }
}

export!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;
    const NOW: u64 = 100 * HOUR;

    fn chunk(bytes: u64, hits: u32, cost_us: u64, last_access_ms: u64) -> Candidate {
        Candidate {
            bytes,
            tokens: (bytes / 1000) as u32,
            created_ms: last_access_ms / 2,
            last_access_ms,
            hits,
            cost_us,
        }
    }

    fn freed(candidates: &[Candidate], victims: &[u32]) -> u64 {
        victims.iter().map(|&i| candidates[i as usize].bytes).sum()
    }

    #[test]
    fn a_scan_of_one_hit_chunks_does_not_evict_the_hot_set() {
        // The hot set: reused, and (being shared) last touched a while ago.
        let mut candidates: Vec<Candidate> =
            (0..10).map(|i| chunk(10_000, 5 + i, 50_000, NOW - HOUR + i as u64)).collect();
        // A scan: 100 distinct passages each stored once, all newer than the hot set (so LRU
        // would evict the hot set) and dearer to compute (so would GDSF's priority alone).
        candidates.extend((0..100).map(|i| chunk(10_000, 0, 500_000, NOW - 1000 + i)));
        assert!(priority(&candidates[10], NOW) > priority(&candidates[9], NOW));
        let v = victims(&candidates, 500_000, NOW);
        assert!(freed(&candidates, &v) >= 500_000);
        assert!(v.iter().all(|&i| i >= 10), "a hot chunk was evicted: {v:?}");
        // Oldest of the scan first.
        assert_eq!(&v[..3], &[10, 11, 12]);
    }

    #[test]
    fn among_reused_chunks_the_cheapest_per_byte_goes_first() {
        let candidates = [
            chunk(1_000, 1, 10_000, NOW),      // 2 × 10 µs/B = 20
            chunk(1_000, 1, 1_000, NOW),       // 2 × 1 µs/B = 2
            chunk(10_000, 1, 10_000, NOW - 1), // 2 × 1 µs/B = 2, aged by 1 ms: just below [1]
            chunk(1_000, 9, 1_000, NOW),       // 10 × 1 µs/B = 10: frequency counts
        ];
        assert_eq!(victims(&candidates, u64::MAX, NOW), vec![2, 1, 3, 0]);
        assert_eq!(victims(&candidates, 10_500, NOW), vec![2, 1]);
    }

    #[test]
    fn age_wears_down_a_stale_hot_chunk() {
        let stale = chunk(1_000, 9, 1_000, NOW - 20 * HOUR); // 10 µs/B ÷ 21
        let fresh = chunk(1_000, 1, 1_000, NOW); // 2 µs/B
        assert_eq!(victims(&[fresh, stale], 1, NOW), vec![1]);
        // Without the age, the hits would have kept it.
        assert_eq!(victims(&[fresh, chunk(1_000, 9, 1_000, NOW)], 1, NOW), vec![0]);
        assert!((priority(&chunk(1_000, 0, 1_000, NOW - HOUR), NOW) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn frees_enough_and_no_more_than_needed() {
        let candidates: Vec<Candidate> = (0..5).map(|i| chunk(100, 0, 1, i)).collect();
        assert_eq!(victims(&candidates, 0, NOW), Vec::<u32>::new());
        assert_eq!(victims(&candidates, 1, NOW), vec![0]);
        assert_eq!(victims(&candidates, 100, NOW), vec![0]);
        assert_eq!(victims(&candidates, 101, NOW), vec![0, 1]);
        // More than everything: every candidate, each once.
        assert_eq!(victims(&candidates, 10_000, NOW), vec![0, 1, 2, 3, 4]);
        assert_eq!(victims(&[], 10, NOW), Vec::<u32>::new());
    }

    #[test]
    fn degenerate_candidates_do_not_break_the_order() {
        // Zero bytes, zero cost, access in the future, overflowing sizes.
        let candidates = [chunk(0, 1, 0, NOW + HOUR), chunk(u64::MAX, 2, u64::MAX, 0), chunk(u64::MAX, 0, 5, NOW)];
        // The one-hit chunk goes first and alone frees "everything" (sizes saturate).
        assert_eq!(victims(&candidates, u64::MAX, NOW), vec![2]);
        // Among the reused: zero cost per byte first, whatever its age.
        assert_eq!(victims(&candidates[..2], u64::MAX, NOW), vec![0, 1]);
    }

    #[test]
    fn self_test_passes() {
        assert_eq!(Component::self_test(), Ok(()));
    }
}
