//! An example `selector`: EPIC-style chunk heads, then the largest deviations.
//!
//! A chunk computed on its own puts much of its attention on its first tokens (an attention
//! sink); spliced into a longer prompt, those tokens are the likeliest to be wrong. EPIC
//! therefore always recomputes the first [`HEAD_TOKENS`] of every reused chunk; what is left of
//! the budget goes to the tokens whose deviation is largest (CacheBlend), ties to the lower index.

// Generates the `Guest` trait for the `selector` world, the `export!` macro, and the world's
// types (`PluginInfo`, `SelectRequest`). `path` points at kvgate's `wit/` directory.
wit_bindgen::generate!({ path: "../../../wit", world: "selector" });

/// Tokens recomputed at the head of every reused chunk.
pub const HEAD_TOKENS: usize = 4;

/// The policy: indices into `deviations`, ascending, at most `budget`.
pub fn select(deviations: &[f32], chunk_starts: &[u32], budget: usize) -> Vec<u32> {
    let n = deviations.len();
    let mut chosen = vec![false; n];
    let mut left = budget;
    for (i, &start) in chunk_starts.iter().enumerate() {
        let start = (start as usize).min(n);
        let end = chunk_starts.get(i + 1).map_or(n, |&e| (e as usize).clamp(start, n));
        for slot in chosen[start..(start + HEAD_TOKENS).min(end)].iter_mut() {
            if left > 0 && !*slot {
                *slot = true;
                left -= 1;
            }
        }
    }
    // The rest of the budget: largest deviation first, ties to the lower index.
    let mut rest: Vec<usize> = (0..n).filter(|&t| !chosen[t]).collect();
    rest.sort_by(|&a, &b| deviations[b].total_cmp(&deviations[a]).then(a.cmp(&b)));
    for &t in rest.iter().take(left) {
        chosen[t] = true;
    }
    (0..n as u32).filter(|&t| chosen[t as usize]).collect()
}

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }

    /// Run once by the host when it loads the component; an `Err` keeps the old selector.
    fn self_test() -> Result<(), String> {
        let got = select(&[0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0], &[0], 5);
        if got == [0, 1, 2, 3, 5] { Ok(()) } else { Err(format!("canned selection: {got:?}")) }
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
    fn chunk_heads_first_then_deviations() {
        let d = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 5.0];
        // Chunks [0, 6) and [6, 12): heads 0..4 and 6..10, then the largest deviation left (11).
        assert_eq!(select(&d, &[0, 6], 9), vec![0, 1, 2, 3, 6, 7, 8, 9, 11]);
        // A budget smaller than the heads stops in the first chunk.
        assert_eq!(select(&d, &[0, 6], 3), vec![0, 1, 2]);
        // Chunks shorter than the head are taken whole.
        assert_eq!(select(&d, &[0, 2, 4], 4), vec![0, 1, 2, 3]);
        assert_eq!(select(&d, &[0], 100).len(), d.len());
        assert_eq!(select(&[], &[0], 4), Vec::<u32>::new());
    }

    #[test]
    fn self_test_passes() {
        assert_eq!(Component::self_test(), Ok(()));
    }
}
