//! kvgate: an LLM cache gateway that reuses KV cache beyond the prefix.
//!
//! # Layout
//! - [`engine`]: the candle inference core — GGUF model, our llama forward with explicit
//!   positions, tokenizer, chat template, sampling, the request worker. Never async.
//! - [`api`]: the hyper server — OpenAI-compatible endpoints, SSE, health, metrics. The
//!   only module that knows hyper.
//! - [`blend`]: compositional reuse — chunking, splicing cached KV at new positions,
//!   selective recompute.
//! - [`store`]: the chunk store — RAM tier, sled-indexed disk tier, eviction, recovery. The
//!   only module that knows sled.
//! - [`policy`]: the wasmtime host — chunker, selector and evictor components, sandboxed,
//!   validated, hot-reloaded, with safe fallbacks. The only module that knows wasmtime.
//! - [`config`]: the `kvgate.toml` / env / flag configuration.
//! - [`metrics`]: counters and histograms in Prometheus text format.
//! - [`bench`]: `kvgate bench` workloads.

pub mod api;
pub mod bench;
pub mod blend;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod policy;
pub mod store;
