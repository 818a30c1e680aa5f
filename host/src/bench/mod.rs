//! `kvgate bench`: workloads that measure what users feel.
//!
//! - `engine` (here) times the inference core alone: prefill tokens per second at given
//!   prompt lengths and decode tokens per second, on the real model, in this process.
//! - [`rag`] drives a running server over HTTP with traces shaped like real clients' and
//!   compares cache modes, beside what a perfect cache could reuse ([`oracle`]).
//! - [`trace`] draws those traces: RAG (passages joined under labels, or one message each),
//!   agent turns, memory.
//! - [`store`] times loading a chunk from each store tier against recomputing it.
//! - [`policies`] measures the policy plugins: call overhead, chunking and eviction hit rates.
//! - [`load`] runs many streaming clients at once against any OpenAI-compatible server:
//!   TTFT, inter-token latency and throughput per concurrency.
//! - [`spans`] times the span index's lookup as the store (10³–10⁶ chunks) and the prompt grow.
//! - [`cluster`] runs a fleet on loopback (Redis, N nodes, the router) and compares round
//!   robin and cache-aware routing, own caches and the shared tier.
//! - [`gateway`] soaks the gateway: many clients for minutes over local and upstream models,
//!   with over-limit clients beside them; failures, latency and resident memory.

pub mod client;
pub mod cluster;
pub mod denoise;
pub mod gateway;
pub mod load;
pub mod oracle;
pub mod policies;
pub mod quality;
pub mod rag;
pub mod spans;
pub mod store;
pub mod trace;

use std::time::Instant;

use crate::engine::{LoadedModel, LogitsFor, sampling};

/// Throughput figures of one engine benchmark run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineFigures {
    /// (prompt tokens, tokens per second), best of the repetitions.
    pub prefill: Vec<(usize, f64)>,
    /// Decode tokens per second after a prompt of `decode_context` tokens.
    pub decode_tok_s: f64,
    pub decode_context: usize,
    pub decode_tokens: usize,
    /// (sequences, total tokens per second) of batched decode steps, best of the repetitions.
    pub batched_decode: Vec<(usize, f64)>,
    /// What those rates reach against this machine's measured peaks.
    pub roofline: Roofline,
}

/// The machine's measured peaks and what each phase reaches of them: prefill is counted in
/// operations per second (it is compute-bound; 2 per multiply-add, f32 or int8 as the
/// engine's prefill runs), decode in bytes/s of weights read (memory-bound).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Roofline {
    /// f32 matrix product (1024³, the threads the engine uses), GFLOP/s.
    pub peak_gflops: f64,
    /// Independent `vpdpbusd` on registers on the engine's threads, GOP/s (CPUs with VNNI).
    pub peak_int8_gops: Option<f64>,
    /// bf16 products on AMX tiles (512 rows by a 2048² matrix, the engine's threads), GFLOP/s
    /// (CPUs with AMX).
    pub peak_bf16_gflops: Option<f64>,
    /// The peak prefill is placed against: that of the weights prefill runs on.
    pub prefill_peak: f64,
    /// `bf16`, `int8` or `f32`.
    pub prefill_weights: &'static str,
    /// Reading a 512 MiB buffer, GB/s.
    pub peak_gbps: f64,
    /// (prompt tokens, GOP/s reached) of each prefill length.
    pub prefill_gflops: Vec<(usize, f64)>,
    /// Weight bytes one decode step reads (the layers' int8 matrices and the LM head), and
    /// the GB/s one stream reaches.
    pub decode_bytes_per_token: f64,
    pub decode_gbps: f64,
    /// (sequences, GOP/s reached) of each batched decode count: two operations per weight
    /// per token (the attention over the short caches left out), against the int8 peak,
    /// which batched steps are bound by once the weights they read are shared.
    pub batched_decode_gops: Vec<(usize, f64)>,
    /// The peak batched decode is placed against, and which: `int8`, else `f32`.
    pub decode_peak: f64,
    pub decode_peak_kind: &'static str,
}

impl Roofline {
    /// Measures the peaks and places `prefill` and `decode_tok_s` of `m` against them.
    fn measure(m: &LoadedModel, prefill: &[(usize, f64)], decode_tok_s: f64, batched: &[(usize, f64)]) -> Self {
        let c = m.model.config();
        let (h, kv, f) = (c.hidden as f64, c.kv_dim() as f64, c.ffn as f64);
        let per_layer = h * (h + 2.0 * kv) + h * h + 3.0 * h * f;
        let layers = c.layers as f64 * per_layer;
        // 2 FLOP per weight per token, the causal attention's QK and AV (n²/2 pairs, 2 products
        // of `hidden` each per layer), and the last token's LM head.
        let prefill_flop =
            |n: f64| 2.0 * n * layers + 2.0 * 2.0 * c.layers as f64 * h * n * n / 2.0 + 2.0 * h * c.vocab as f64;
        let prefill_gflops =
            prefill.iter().map(|&(n, tps)| (n, prefill_flop(n as f64) * tps / n as f64 / 1e9)).collect();
        let decode_bytes_per_token = m.model.decode_bytes() as f64;
        let decode_op = 2.0 * (layers + h * c.vocab as f64);
        let batched_decode_gops = batched.iter().map(|&(b, tps)| (b, decode_op * tps / 1e9)).collect();
        let peak_gflops = peak_gflops();
        let peak_int8_gops = crate::engine::int8::peak_int8_gops(rayon::current_num_threads());
        let peak_bf16_gflops = crate::engine::amx::peak_bf16_gflops();
        use crate::engine::Weights;
        let (prefill_peak, prefill_weights) = match m.model.prefill_weights() {
            Weights::Bf16 => (peak_bf16_gflops.unwrap_or(peak_gflops), "bf16"),
            Weights::Int8 => (peak_int8_gops.unwrap_or(peak_gflops), "int8"),
            Weights::F32 => (peak_gflops, "f32"),
        };
        Self {
            peak_gflops,
            peak_int8_gops,
            peak_bf16_gflops,
            prefill_peak,
            prefill_weights,
            peak_gbps: peak_gbps(),
            prefill_gflops,
            decode_bytes_per_token,
            decode_gbps: decode_bytes_per_token * decode_tok_s / 1e9,
            batched_decode_gops,
            decode_peak: peak_int8_gops.unwrap_or(peak_gflops),
            decode_peak_kind: if peak_int8_gops.is_some() { "int8" } else { "f32" },
        }
    }
}

/// Best of five f32 1024³ matrix products with the engine's kernel and threads, GFLOP/s.
fn peak_gflops() -> f64 {
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        // SAFETY: three n×n row-major buffers of this size.
        unsafe {
            crate::engine::attention::gemm_rows(
                (n, n, n),
                c.as_mut_ptr(),
                n,
                a.as_ptr(),
                n,
                b.as_ptr(),
                (n, 1),
                1.0,
                threads,
            )
        };
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// Best of five parallel sums over a 512 MiB buffer, GB/s read.
fn peak_gbps() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1u64; 64 << 20];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = buf.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x))).sum();
        std::hint::black_box(sum);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (buf.len() * 8) as f64 / best / 1e9
}

/// A deterministic prompt of `n` ordinary tokens (no specials).
fn prompt(m: &LoadedModel, n: usize) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog while the cache keeps every chunk it has seen. ";
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(m.tokenizer.encode(text).map(|e| e.ids).unwrap_or_default());
    }
    ids.truncate(n);
    ids
}

/// Times prefill at each length in `lengths` (best of `reps`), `decode_tokens` decode steps
/// after a 16-token prompt, and as many batched decode steps of each count in `batches`.
pub fn engine(
    m: &LoadedModel,
    lengths: &[usize],
    batches: &[usize],
    reps: usize,
    decode_tokens: usize,
) -> anyhow::Result<EngineFigures> {
    let mut prefill = Vec::new();
    for &n in lengths {
        let ids = prompt(m, n);
        let pos: Vec<u32> = (0..n as u32).collect();
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            let mut cache = m.model.new_cache();
            let t = Instant::now();
            m.model.forward(&ids, &pos, &mut cache, &LogitsFor::Last, false)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        prefill.push((n, n as f64 / best));
    }
    // Decode as llama-bench's `tg` test: a short prompt, then `decode_tokens` greedy steps;
    // best of `reps`, since a shared machine only ever adds time.
    let ctx = 16;
    let ids = prompt(m, ctx);
    let pos: Vec<u32> = (0..ctx as u32).collect();
    let mut decode_tok_s = 0f64;
    for _ in 0..reps.max(1) {
        let mut cache = m.model.new_cache();
        let mut logits = m.model.forward(&ids, &pos, &mut cache, &LogitsFor::Last, false)?.logits;
        let t = Instant::now();
        for i in 0..decode_tokens {
            let id = sampling::argmax(&logits);
            logits = m.model.forward(&[id], &[(ctx + i) as u32], &mut cache, &LogitsFor::Last, false)?.logits;
        }
        decode_tok_s = decode_tok_s.max(decode_tokens as f64 / t.elapsed().as_secs_f64());
    }
    // The scheduler's decode: every running sequence one token per step, in one batch.
    let mut batched_decode = Vec::new();
    for &b in batches {
        let mut best = 0f64;
        for _ in 0..reps.max(1) {
            let mut caches: Vec<crate::engine::KvCache> = Vec::new();
            let mut next = Vec::new();
            for s in 0..b {
                let mut cache = m.model.new_cache();
                // Sequences differ (a token of their own), as a server's do.
                let mut own = ids.clone();
                own[ctx - 1] = ids[s % ctx];
                let logits = m.model.forward(&own, &pos, &mut cache, &LogitsFor::Last, false)?.logits;
                next.push(sampling::argmax(&logits));
                caches.push(cache);
            }
            let vocab = m.model.config().vocab;
            let t = Instant::now();
            for i in 0..decode_tokens {
                let positions = vec![(ctx + i) as u32; b];
                let mut refs: Vec<&mut crate::engine::KvCache> = caches.iter_mut().collect();
                let logits = m.model.decode_batch(&next, &positions, &mut refs)?;
                next = logits.chunks_exact(vocab).map(sampling::argmax).collect();
            }
            best = best.max((b * decode_tokens) as f64 / t.elapsed().as_secs_f64());
        }
        batched_decode.push((b, best));
    }
    let roofline = Roofline::measure(m, &prefill, decode_tok_s, &batched_decode);
    Ok(EngineFigures { prefill, decode_tok_s, decode_context: ctx, decode_tokens, batched_decode, roofline })
}
