//! Test component (chunker world): passes the host's load-time check and then breaks the WIT
//! contract on real prompts.
//!
//! The host's canned check at load sends exactly 300 tokens; on that request this chunker
//! answers valid fixed-size cuts, on any other it answers out-of-range cut points
//! (`[0, len + 5]`). So it loads, and every real call must be caught by the host's run-time
//! validation and fall back to fixed-size cuts.

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
        let n = request.tokens.len() as u32;
        if n == 300 {
            let step = request.target_tokens.max(1);
            return (1..n).filter(|c| c % step == 0).collect();
        }
        vec![0, n + 5]
    }
}

export!(Component);
