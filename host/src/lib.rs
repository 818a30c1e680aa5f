//! kvgate: an LLM cache gateway that reuses KV cache beyond the prefix.
//!
//! # Layout
//! - [`engine`]: the candle inference core — GGUF model, our llama forward with explicit
//!   positions (batched decode, read-only scoring), tokenizer, chat template, sampling.
//!   Never async.
//! - [`api`]: the hyper server — OpenAI-compatible endpoints, SSE, health, metrics. The
//!   only module that knows hyper.
//! - [`scheduler`]: admission, batched decode of every running sequence, prefills sliced
//!   between decode steps; above `engine` and `blend`, the one place that decides what runs.
//! - [`blend`]: compositional reuse — finding stored runs, splicing cached KV at new
//!   positions, selective recompute; one prompt's prefill as resumable work.
//! - [`store`]: the chunk store — RAM tier, sled-indexed disk tier, eviction, recovery. The
//!   only module that knows sled.
//! - [`policy`]: the wasmtime host — chunker, selector and evictor components, sandboxed,
//!   validated, hot-reloaded, with safe fallbacks. The only module that knows wasmtime.
//! - [`fleet`]: routing between the nodes of a fleet — the fleet's chunks learnt from the
//!   shared tier's event stream, and the choice of a node per request.
//! - [`config`]: the `kvgate.toml` / env / flag configuration.
//! - [`metrics`]: counters and histograms in Prometheus text format.
//! - [`bench`]: `kvgate bench` workloads.

pub mod api;
pub mod bench;
pub mod blend;
pub mod config;
pub mod engine;
pub mod fleet;
pub mod metrics;
pub mod policy;
pub mod scheduler;
pub mod store;
