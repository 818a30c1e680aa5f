//! Shared helpers: the model, the reference outputs, a server on a free port.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use kvgate::engine::LoadedModel;

/// The GGUF the tests run on: `$KVGATE_MODEL`, else the file `make model` fetches.
pub fn model_path() -> PathBuf {
    let p = match std::env::var_os("KVGATE_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/kvgate/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(p.exists(), "model {} is missing: run `make model` (or `make test`)", p.display());
    p
}

/// The model, loaded once per test binary.
pub fn model() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL.get_or_init(|| LoadedModel::load(&model_path(), Some("smollm2")).expect("model loads")).clone()
}

/// llama.cpp's outputs for the default model.
pub fn reference() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/llamacpp-smollm2-135m.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference file")).expect("reference JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}
