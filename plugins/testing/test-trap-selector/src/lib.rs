//! Test component (selector world): `select` panics when `budget == 7`, which in a wasm32-wasip2
//! component is a trap the host must catch and answer by recomputing everything.
//!
//! `info`, `self-test` and any other budget behave (top deviation), because the host runs them
//! on canned input at load. The host's tests send budget 7
//! ([`test_support::MISBEHAVE_BUDGET`]).

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
            panic!("test-trap-selector: budget {MISBEHAVE_BUDGET} asks for a trap");
        }
        top_deviation(&request.deviations, request.budget)
    }
}

export!(Component);
