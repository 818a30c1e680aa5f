//! Test component (selector world): `select` never returns when `budget == 7`.
//!
//! The host must stop it (epoch deadline / fuel) and fall back to recomputing everything.
//! `info` and `self-test` return at once, and `select` answers any other budget validly
//! (top deviation), because the host runs both on canned input when it loads a component.
//! The host's tests send budget 7 ([`test_support::MISBEHAVE_BUDGET`]).

use std::hint::black_box;

use test_support::{MISBEHAVE_BUDGET, top_deviation};

wit_bindgen::generate!({ path: "../../../wit", world: "selector" });

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }

    fn self_test() -> Result<(), String> {
        Ok(())
    }

    fn select(request: SelectRequest) -> Vec<u32> {
        if request.budget == MISBEHAVE_BUDGET {
            // black_box hides the counter from the optimiser, so the loop stays a loop of work.
            let mut spins = 0u64;
            loop {
                spins = black_box(spins.wrapping_add(1));
            }
        }
        top_deviation(&request.deviations, request.budget)
    }
}

export!(Component);
