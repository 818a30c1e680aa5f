//! Test component (selector world of `kvgate:policy@0.1.0`): a valid selector that ignores the
//! deviations and picks the first `budget` tokens (`0..budget`).
//!
//! Its answers differ from the default selector's on any input whose largest deviations are not
//! at the front, which lets the host's hot-swap tests see which selector served a request. Built
//! against the previous WIT version on purpose: the host keeps loading 0.1.0 components.

wit_bindgen::generate!({ path: "../../../wit/v0.1.0", world: "selector" });

/// The policy: `0..min(budget, tokens)`.
fn first_tokens(tokens: usize, budget: u32) -> Vec<u32> {
    (0..(budget as usize).min(tokens) as u32).collect()
}

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }

    fn self_test() -> Result<(), String> {
        if first_tokens(5, 2) == [0, 1] { Ok(()) } else { Err("first 2 of 5 tokens".into()) }
    }

    fn select(request: SelectRequest) -> Vec<u32> {
        first_tokens(request.deviations.len(), request.budget)
    }
}

export!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_first_tokens_within_the_budget() {
        assert_eq!(first_tokens(5, 2), vec![0, 1]);
        assert_eq!(first_tokens(2, 9), vec![0, 1]);
        assert_eq!(first_tokens(0, 3), Vec::<u32>::new());
    }
}
