//! An example `evictor`: least frequently used first, then least recently used.
//!
//! The chunks served from the store most often are the ones worth keeping; among chunks with
//! as many hits, the one used longest ago goes first. Victims are taken in that order until
//! `bytes-to-free` is reached (or every candidate is taken).

// Generates the `Guest` trait for the `evictor` world, the `export!` macro, and the world's
// types (`PluginInfo`, `EvictRequest`). `path` points at kvgate's `wit/` directory.
wit_bindgen::generate!({ path: "../../../wit", world: "evictor" });

use kvgate::policy::types::Candidate;

/// The policy: indices into `candidates` whose bytes add up to at least `bytes_to_free`.
pub fn victims(candidates: &[Candidate], bytes_to_free: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..candidates.len() as u32).collect();
    order.sort_by_key(|&i| {
        let c = &candidates[i as usize];
        (c.hits, c.last_access_ms, i)
    });
    let mut freed = 0u64;
    order
        .into_iter()
        .take_while(|&i| {
            let more = freed < bytes_to_free;
            freed = freed.saturating_add(candidates[i as usize].bytes);
            more
        })
        .collect()
}

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }

    /// Run once by the host when it loads the component; an `Err` keeps the old evictor.
    fn self_test() -> Result<(), String> {
        let chunk =
            |hits, last_access_ms| Candidate { bytes: 10, tokens: 1, created_ms: 0, last_access_ms, hits, cost_us: 1 };
        let got = victims(&[chunk(5, 1), chunk(1, 9), chunk(1, 3)], 15);
        if got == [2, 1] { Ok(()) } else { Err(format!("canned eviction: {got:?}, want [2, 1]")) }
    }

    fn victims(request: EvictRequest) -> Vec<u32> {
        victims(&request.candidates, request.bytes_to_free)
    }
}

export!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(bytes: u64, hits: u32, last_access_ms: u64) -> Candidate {
        Candidate { bytes, tokens: 1, created_ms: 0, last_access_ms, hits, cost_us: 1 }
    }

    #[test]
    fn fewest_hits_then_oldest_access_until_enough_is_freed() {
        let c = [chunk(10, 3, 1), chunk(10, 0, 50), chunk(10, 0, 20), chunk(10, 1, 0)];
        assert_eq!(victims(&c, 15), vec![2, 1]);
        assert_eq!(victims(&c, 30), vec![2, 1, 3]);
        assert_eq!(victims(&c, 1_000), vec![2, 1, 3, 0]);
        assert_eq!(victims(&c, 0), Vec::<u32>::new());
    }

    #[test]
    fn self_test_passes() {
        assert_eq!(Component::self_test(), Ok(()));
    }
}
