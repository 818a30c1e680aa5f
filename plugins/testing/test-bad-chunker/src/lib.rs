//! Test component (chunker world): `cut` always answers out-of-range cut points (`[0, len + 5]`),
//! breaking the WIT contract (`1..len`, strictly ascending).
//!
//! The host validates `cut` on canned input at load, so it must reject this component there and
//! keep the chunker it had. `info` and `self-test` succeed: only the answers are wrong.

wit_bindgen::generate!({ path: "../../../wit", world: "chunker" });

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }

    fn self_test() -> Result<(), String> {
        Ok(())
    }

    fn cut(request: ChunkRequest) -> Vec<u32> {
        vec![0, request.tokens.len() as u32 + 5]
    }
}

export!(Component);
