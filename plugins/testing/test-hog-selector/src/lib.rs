//! Test component (selector world): `select` allocates memory without bound when `budget == 7`.
//!
//! It keeps 1 MiB blocks, each written so the pages are really used, until the host's memory
//! limit makes growing the linear memory fail (the allocation then aborts: a trap). The host
//! must survive that and fall back to recomputing everything. `info`, `self-test` and any other
//! budget behave (top deviation), because the host runs them on canned input at load. The
//! host's tests send budget 7 ([`test_support::MISBEHAVE_BUDGET`]).

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
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![0xA5; 1 << 20]);
                black_box(&mut hoard);
            }
        }
        top_deviation(&request.deviations, request.budget)
    }
}

export!(Component);
