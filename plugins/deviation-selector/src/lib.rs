//! kvgate's default `selector`: recompute the reused tokens whose KV deviates most.
//!
//! CacheBlend's observation: when chunks computed apart are stitched together, the tokens
//! whose K and V at an early layer deviate most from a full recompute are the ones whose
//! cross-chunk attention matters; recomputing just those in the later layers recovers most
//! of the quality. So the policy is the `budget` largest deviations (ties to the lower index,
//! so the answer is deterministic), returned ascending as the WIT contract asks.
//!
//! EPIC adds "the first few tokens of every chunk" (where a chunk computed alone put its
//! attention sink) before the deviations. [`CHUNK_HEAD_TOKENS`] keeps that path, set to 0:
//! in kvgate's RAG benchmark it showed no clear quality gain over pure deviation at the same
//! budget, and it spends budget the deviations would have used.
//!
//! Layout: [`select`] is the policy as a plain function (tested natively); [`top_deviation`]
//! and [`chunk_heads_then_deviation`] are its two parts; `Component` only adapts the WIT types.

use std::cmp::Ordering;

// Brings `Guest`, `export!` and the world's `use`d types (`PluginInfo`, `SelectRequest`) into scope.
wit_bindgen::generate!({ path: "../../wit", world: "selector" });

/// Tokens at the head of every reused chunk recomputed before any deviation (EPIC-style).
/// 0 = off; measured: no clear gain (see the crate doc).
pub const CHUNK_HEAD_TOKENS: usize = 0;

/// The policy: indices into `deviations`, strictly ascending, at most `budget` of them.
pub fn select(deviations: &[f32], chunk_starts: &[u32], budget: usize) -> Vec<u32> {
    if CHUNK_HEAD_TOKENS == 0 {
        top_deviation(deviations, budget)
    } else {
        chunk_heads_then_deviation(deviations, chunk_starts, budget, CHUNK_HEAD_TOKENS)
    }
}

/// The `budget` largest `deviations` (ties to the lower index), as ascending indices.
/// A NaN deviation (a broken measurement) ranks below every number.
pub fn top_deviation(deviations: &[f32], budget: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..deviations.len() as u32).collect();
    let budget = budget.min(order.len());
    if budget < order.len() {
        order.select_nth_unstable_by(budget, |&a, &b| larger_first(deviations, a, b));
    }
    order.truncate(budget);
    order.sort_unstable();
    order
}

/// EPIC-style: the first `head` tokens of every chunk (in chunk order, while the budget lasts),
/// then the largest deviations among the other tokens for the rest of the budget.
pub fn chunk_heads_then_deviation(deviations: &[f32], chunk_starts: &[u32], budget: usize, head: usize) -> Vec<u32> {
    let n = deviations.len();
    let mut chosen = vec![false; n];
    let mut picked = 0;
    for (i, &start) in chunk_starts.iter().enumerate() {
        let start = (start as usize).min(n);
        let end = chunk_starts.get(i + 1).map_or(n, |&e| (e as usize).clamp(start, n));
        for slot in &mut chosen[start..(start + head).min(end)] {
            if picked == budget {
                break;
            }
            picked += !std::mem::replace(slot, true) as usize;
        }
    }
    let rest: Vec<u32> = (0..n as u32).filter(|&t| !chosen[t as usize]).collect();
    let rest_deviations: Vec<f32> = rest.iter().map(|&t| deviations[t as usize]).collect();
    for i in top_deviation(&rest_deviations, budget - picked) {
        chosen[rest[i as usize] as usize] = true;
    }
    (0..n as u32).filter(|&t| chosen[t as usize]).collect()
}

/// Orders token `a` before `b` when its deviation is larger, or equal with a lower index.
fn larger_first(deviations: &[f32], a: u32, b: u32) -> Ordering {
    let key = |t: u32| {
        let d = deviations[t as usize];
        if d.is_nan() { f32::NEG_INFINITY } else { d }
    };
    key(b).total_cmp(&key(a)).then(a.cmp(&b))
}

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }

    fn self_test() -> Result<(), String> {
        let got = select(&[0.1, 5.0, 0.3, 9.0, 0.0], &[0, 3], 2);
        if got == [1, 3] { Ok(()) } else { Err(format!("top 2 of a canned case: got {got:?}, want [1, 3]")) }
    }

    fn select(request: SelectRequest) -> Vec<u32> {
        select(&request.deviations, &request.chunk_starts, request.budget as usize)
    }
}

export!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_largest_deviations_ascending() {
        let d = [0.1, 5.0, 0.3, 9.0, 0.0];
        assert_eq!(select(&d, &[0], 2), vec![1, 3]);
        assert_eq!(select(&d, &[0], 3), vec![1, 2, 3]);
    }

    #[test]
    fn budget_zero_or_beyond_the_tokens() {
        let d = [0.1, 5.0, 0.3];
        assert_eq!(select(&d, &[0], 0), Vec::<u32>::new());
        assert_eq!(select(&d, &[0], 10), vec![0, 1, 2]);
        assert_eq!(select(&[], &[0], 4), Vec::<u32>::new());
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let d = [1.0, 2.0, 2.0, 2.0, 0.5];
        assert_eq!(select(&d, &[0], 2), vec![1, 2]);
        assert_eq!(select(&[3.0; 6], &[0], 3), vec![0, 1, 2]);
    }

    #[test]
    fn nan_ranks_below_every_number() {
        let d = [f32::NAN, -1.0, f32::NAN, 0.0];
        assert_eq!(select(&d, &[0], 2), vec![1, 3]);
    }

    #[test]
    fn chunk_heads_come_first_then_deviations() {
        let d = [0.0, 0.0, 9.0, 0.0, 0.0, 5.0, 1.0];
        assert_eq!(chunk_heads_then_deviation(&d, &[0, 3], 3, 1), vec![0, 2, 3]);
        assert_eq!(chunk_heads_then_deviation(&d, &[0, 3], 1, 2), vec![0]);
        assert_eq!(chunk_heads_then_deviation(&d, &[0, 3], 7, 2), (0..7).collect::<Vec<u32>>());
        // A head longer than its chunk stops at the next chunk.
        assert_eq!(chunk_heads_then_deviation(&d, &[0, 1, 2], 3, 5), vec![0, 1, 2]);
        // Malformed chunk starts (out of range, descending) select nothing twice.
        assert_eq!(chunk_heads_then_deviation(&d, &[0, 99, 3], 3, 1), vec![0, 2, 3]);
    }

    #[test]
    fn self_test_passes() {
        assert_eq!(Component::self_test(), Ok(()));
    }
}
