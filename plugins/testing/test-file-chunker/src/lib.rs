//! Test component (chunker world): `cut` tries to escape the sandbox, reading `/etc/passwd` and
//! creating `/tmp/kvgate-plugin-escape`.
//!
//! If either succeeds, `cut` answers the cut point `[0]` as the signal — an answer the host
//! refuses (at load, on its canned request; at run time, counted as invalid); otherwise it cuts
//! validly (segment starts and every `target-tokens`). The host gives components no filesystem,
//! so its tests expect the component to load and every answer to be valid (and no file).
//! `self-test` succeeds either way, so the component reaches `cut`.

use test_support::fixed_cuts;

wit_bindgen::generate!({ path: "../../../wit", world: "chunker" });

/// The file the component tries to create on the host.
const ESCAPE_FILE: &str = "/tmp/kvgate-plugin-escape";

/// Whether the component could read a host file or create one.
fn escaped() -> bool {
    let read = std::fs::read("/etc/passwd").is_ok();
    let wrote = std::fs::File::create(ESCAPE_FILE).is_ok();
    read || wrote
}

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }

    fn self_test() -> Result<(), String> {
        Ok(())
    }

    fn cut(request: ChunkRequest) -> Vec<u32> {
        if escaped() {
            return vec![0];
        }
        fixed_cuts(request.tokens.len(), &request.segment_starts, request.target_tokens)
    }
}

export!(Component);
