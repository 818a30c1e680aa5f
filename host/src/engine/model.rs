//! A llama-architecture model loaded from GGUF, with our own forward.
//!
//! Owns the weights and the forward pass. Unlike candle's `quantized_llama::ModelWeights`,
//! the forward takes explicit absolute positions (any, not necessarily contiguous), reads
//! and extends a [`KvCache`] the caller owns, masks attention by position, computes logits
//! only for the rows asked for, and can hand back the new tokens' K before RoPE — the
//! position-independent form compositional reuse stores.
//!
//! Weights are held two or three times: f32 (dequantized) for the reference path, the int8
//! form the kernels multiply — the GGUF's own blocks where it ships Q4_0 / Q4_1 / Q8_0,
//! Q8_0 otherwise ([`super::int8`]) — and, on CPUs with AMX, bf16 in the tile layout
//! ([`super::amx`]). Decode always runs on the int8 kernels (it is memory-bound: a token
//! reads the 4-bit bytes); prefill runs on AMX tiles where there are some, on the int8
//! kernels on CPUs with AVX-512 VNNI (where int8 dot products outrun f32 gemm several
//! times), and on f32 gemm elsewhere ([`Model::prefill_weights`]). Every row goes through
//! the same kernel in the same order whatever rows share a call, so slices, batches and
//! reuse paths agree bit for bit.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Storage, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use sha2::{Digest, Sha256};

use super::amx::{self, Bf16Matrix};
use super::attention::{self, Heads, Keys, Rope};
use super::int8::{Format, Int8Matrix, Kernel};
use super::sampling::{self, TokenLogprob};
use super::{EngineError, OutPtr};

/// `Model::forward` batches of at most this many rows are decode steps: int8 weights and the
/// dot-product attention path. Larger ones are prefills, on [`Model::prefill_weights`].
/// Prefill paths that must match a full prefill exactly (reuse) ask for the prefill weights
/// whatever their size.
const DECODE_MAX_ROWS: usize = 8;

/// Which copy of the weights a pass multiplies with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The dequantized weights in f32, gemm: the reference, and prefill without VNNI.
    F32,
    /// The int8 kernels: the GGUF's 4-bit blocks (or Q8_0) by per-block int8 inputs.
    Int8,
    /// AMX tiles: the f32 weights rounded to bf16 by bf16 inputs, f32 sums; prefill on CPUs
    /// with AMX ([`super::amx::available`]).
    Bf16,
}

/// Shape and constants of a llama model, read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub layers: usize,
    pub hidden: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
}

impl ModelConfig {
    fn from_gguf(ct: &gguf_file::Content) -> Result<Self, EngineError> {
        let arch = get(ct, "general.architecture")?.to_string().map_err(|e| EngineError::Model(e.to_string()))?.clone();
        if arch != "llama" {
            return Err(EngineError::Model(format!("architecture `{arch}` is not supported (only `llama`)")));
        }
        let u = |k: &str| -> Result<usize, EngineError> {
            get(ct, &format!("llama.{k}"))?
                .to_u32()
                .map(|v| v as usize)
                .map_err(|e| EngineError::Model(format!("llama.{k}: {e}")))
        };
        let f = |k: &str, default: f32| -> Result<f32, EngineError> {
            match ct.metadata.get(&format!("llama.{k}")) {
                Some(v) => v.to_f32().map_err(|e| EngineError::Model(format!("llama.{k}: {e}"))),
                None => Ok(default),
            }
        };
        let hidden = u("embedding_length")?;
        let q_heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(q_heads);
        if q_heads == 0 || kv_heads == 0 || hidden % q_heads != 0 || q_heads % kv_heads != 0 {
            return Err(EngineError::Model(format!(
                "inconsistent heads: hidden {hidden}, heads {q_heads}, kv heads {kv_heads}"
            )));
        }
        let head_dim = hidden / q_heads;
        if let Ok(d) = u("rope.dimension_count") {
            if d != head_dim {
                return Err(EngineError::Model(format!(
                    "partial RoPE (rope.dimension_count {d} < head dim {head_dim}) is not supported"
                )));
            }
        }
        Ok(Self {
            layers: u("block_count")?,
            hidden,
            q_heads,
            kv_heads,
            head_dim,
            ffn: u("feed_forward_length")?,
            vocab: 0, // filled in from the embedding
            context_length: u("context_length").unwrap_or(4096),
            rope_base: f("rope.freq_base", 10_000.0)?,
            rms_eps: f("attention.layer_norm_rms_epsilon", 1e-5)?,
        })
    }

    /// Width of one token's K (or V) in one layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    fn heads(&self) -> Heads {
        Heads { q_heads: self.q_heads, kv_heads: self.kv_heads, head_dim: self.head_dim }
    }
}

fn get<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, EngineError> {
    ct.metadata.get(key).ok_or_else(|| EngineError::Model(format!("GGUF metadata has no `{key}`")))
}

/// A weight matrix (out × in) in both of the forms the forward uses.
struct Linear {
    f32: Tensor,
    /// The GGUF's own Q4_0 / Q4_1 / Q8_0 blocks, or a Q8_0 quantization of weights shipped
    /// in another format.
    int8: Int8Matrix,
    /// The f32 weights in bf16, where the CPU has AMX.
    bf16: Option<Bf16Matrix>,
}

impl Linear {
    /// The matrix stacked (by rows) from `parts`, each a GGUF tensor (out × in).
    fn new(parts: &[QTensor]) -> Result<Self, EngineError> {
        let dequantized = parts.iter().map(|p| p.dequantize(&Device::Cpu)).collect::<Result<Vec<_>, _>>()?;
        Self::with_f32(parts, Tensor::cat(&dequantized, 0)?)
    }

    /// As [`Linear::new`], with `w` the parts already dequantized and stacked.
    fn with_f32(parts: &[QTensor], w: Tensor) -> Result<Self, EngineError> {
        let (out_dim, in_dim) = w.dims2()?;
        let format = match parts[0].dtype() {
            GgmlDType::Q4_0 => Some(Format::Q4_0),
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        };
        let shipped = match format {
            Some(f) if parts.iter().all(|p| p.dtype() == parts[0].dtype()) => {
                let mut raw = Vec::new();
                for p in parts {
                    raw.extend_from_slice(&p.data()?);
                }
                Int8Matrix::from_blocks(f, &raw, out_dim, in_dim).ok()
            }
            _ => None,
        };
        let int8 = match shipped {
            Some(m) => m,
            None => with_slice(&w, |v| Int8Matrix::quantize(v, out_dim, in_dim))?.map_err(EngineError::Model)?,
        };
        let bf16 = match amx::available() {
            true => Some(with_slice(&w, |v| Bf16Matrix::from_f32(v, out_dim, in_dim))?.map_err(EngineError::Model)?),
            false => None,
        };
        Ok(Self { f32: w, int8, bf16 })
    }

    /// `x · Wᵀ` for `rows` rows of `x`; `f` sees the result (rows × out) in place.
    ///
    /// Both paths write into `THREAD_OUT`, a buffer reused across calls: prefill-sized outputs
    /// are tens of MB, and fresh ones cost page faults every layer. It only grows: every path
    /// writes each value of the output, so values an earlier call left are never read, and a
    /// decode step's outputs (its LM head's megabytes among them) are not zeroed every call.
    fn forward<R>(&self, x: &[f32], rows: usize, w: Weights, f: impl FnOnce(&[f32]) -> R) -> Result<R, EngineError> {
        thread_local! {
            static THREAD_OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (out_dim, in_dim) = self.f32.dims2()?;
        if x.len() != rows * in_dim {
            return Err(EngineError::Internal(format!("linear: {} inputs for {rows} × {in_dim}", x.len())));
        }
        if w != Weights::F32 {
            let bf16 = match w {
                Weights::Bf16 => {
                    Some(self.bf16.as_ref().ok_or_else(|| EngineError::Internal("bf16 weights without AMX".into()))?)
                }
                _ => None,
            };
            return Ok(THREAD_OUT.with(|cell| {
                let mut out = cell.borrow_mut();
                let out = super::grown(&mut out, rows * out_dim);
                match bf16 {
                    Some(m) => m.matmul(x, rows, out),
                    None => self.int8.matmul(x, rows, out),
                }
                f(out)
            }));
        }
        // gemm takes a matrix-vector path for a single row, which sums in another order: a lone
        // row is multiplied as two (itself twice), so that a row's result never depends on how
        // many rows share the call (measured: every other count agrees bit for bit).
        let doubled;
        let (x, m) = match rows {
            1 => {
                doubled = [x, x].concat();
                (doubled.as_slice(), 2)
            }
            _ => (x, rows),
        };
        let threads = candle_core::utils::get_num_threads();
        with_slice(&self.f32, |w| {
            THREAD_OUT.with(|cell| {
                let mut out = cell.borrow_mut();
                let out = super::grown(&mut out, m * out_dim);
                // SAFETY: x is rows × in_dim, w is out_dim × in_dim (read as its transpose),
                // out is rows × out_dim, all row-major and checked above.
                unsafe {
                    attention::gemm_rows(
                        (m, out_dim, in_dim),
                        out.as_mut_ptr(),
                        out_dim,
                        x.as_ptr(),
                        in_dim,
                        w.as_ptr(),
                        (1, in_dim),
                        1.0,
                        threads,
                    );
                }
                f(&out[..rows * out_dim])
            })
        })
    }
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K and V stacked: one matmul instead of three.
    qkv: Linear,
    out: Linear,
    ffn_norm: Tensor,
    /// Gate and up stacked.
    gate_up: Linear,
    down: Linear,
}

/// The K and V of one layer for every token in a sequence, rows in cache order.
#[derive(Clone, Default)]
pub struct LayerKv {
    /// Rotated K, `tokens × kv_dim`.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// A sequence's K and V of one layer in f16: what decode attention reads (half the bytes of
/// f32; the AVX-512 kernel widens them as it loads).
#[derive(Clone, Default)]
struct HalfKv {
    k: Vec<f16>,
    v: Vec<f16>,
}

/// A sequence's KV cache: per layer K (rotated) and V, and each row's position.
///
/// Decode keeps an f16 copy of the rows (on CPUs with AVX-512, where its attention reads it):
/// rows `0..half_rows` of `half` are those of `layers` rounded, an invariant every change of
/// a row keeps by going through [`KvCache::rows_mut`] (or `truncate`), which drops the copy
/// from the first row that may change. A decode step brings the copy up to date first.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    pub positions: Vec<u32>,
    kv_dim: usize,
    half: Vec<HalfKv>,
    half_rows: usize,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig) -> Self {
        Self {
            layers: vec![LayerKv::default(); cfg.layers],
            positions: Vec::new(),
            kv_dim: cfg.kv_dim(),
            half: vec![HalfKv::default(); cfg.layers],
            half_rows: 0,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Width of one row of one layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Per layer, K and V of every row.
    pub fn layers(&self) -> &[LayerKv] {
        &self.layers
    }

    /// Per layer, K and V to change in rows `from..` (earlier rows must stay as they are).
    pub fn rows_mut(&mut self, from: usize) -> &mut [LayerKv] {
        self.half_rows = self.half_rows.min(from);
        &mut self.layers
    }

    /// Drops every row from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.positions.truncate(len);
        self.half_rows = self.half_rows.min(len);
        for l in &mut self.layers {
            l.k.truncate(len * self.kv_dim);
            l.v.truncate(len * self.kv_dim);
        }
    }

    /// Appends rows at `positions` (K/V zero until a layer writes them); returns their indices.
    pub fn push_rows(&mut self, positions: &[u32]) -> std::ops::Range<usize> {
        let start = self.len();
        self.positions.extend_from_slice(positions);
        let len = self.len() * self.kv_dim;
        for l in &mut self.layers {
            l.k.resize(len, 0.0);
            l.v.resize(len, 0.0);
        }
        start..self.len()
    }

    /// Brings the f16 copy up to the rows held (decode, before its step appends a row).
    fn sync_half(&mut self) {
        let (from, to) = (self.half_rows * self.kv_dim, self.len() * self.kv_dim);
        for (h, l) in self.half.iter_mut().zip(&self.layers) {
            for (h, f) in [(&mut h.k, &l.k), (&mut h.v, &l.v)] {
                h.truncate(from);
                h.resize(to, f16::ZERO);
                h[from..].convert_from_f32_slice(&f[from..to]);
            }
        }
        self.half_rows = self.len();
    }

    /// Per layer, K of rows `rows` turned back to before RoPE (position-independent).
    pub fn pre_rope_k(&self, rows: std::ops::Range<usize>, rope: &Rope) -> Vec<Vec<f32>> {
        let d = self.kv_dim;
        self.layers
            .iter()
            .map(|l| {
                let mut k = l.k[rows.start * d..rows.end * d].to_vec();
                rope.rotate(&mut k, &self.positions[rows.clone()], -1.0);
                k
            })
            .collect()
    }

    /// Whether positions never decrease along the rows (lets attention skip ahead).
    pub fn sorted(&self) -> bool {
        self.positions.windows(2).all(|w| w[0] <= w[1])
    }
}

/// Which rows of a forward produce logits.
#[derive(Debug, Clone)]
pub enum LogitsFor {
    /// Only the last row (prefill, decode).
    Last,
    /// Every row.
    All,
    /// These rows.
    Rows(Vec<usize>),
}

/// What one forward returns.
pub struct ForwardOutput {
    /// `rows × vocab` logits for the rows asked for, in that order.
    pub logits: Vec<f32>,
    /// Per layer, the new tokens' K before RoPE (`n × kv_dim`), when asked for.
    pub pre_rope_k: Option<Vec<Vec<f32>>>,
}

/// A loaded model.
pub struct Model {
    cfg: ModelConfig,
    /// `vocab × hidden`, looked up by token id.
    embed: Tensor,
    layers: Vec<Layer>,
    out_norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    /// sha256 of the GGUF file: identifies the weights in cache keys.
    fingerprint: String,
    /// What prefill multiplies with on this CPU.
    prefill: Weights,
}

impl Model {
    /// Loads a llama GGUF; returns the model and the parsed GGUF header (for the tokenizer).
    pub fn load(path: &Path) -> Result<(Self, gguf_file::Content), EngineError> {
        let fingerprint = sha256_file(path)?;
        let mut file =
            File::open(path).map_err(|e| EngineError::Model(format!("cannot open {}: {e}", path.display())))?;
        let ct = gguf_file::Content::read(&mut file)
            .map_err(|e| EngineError::Model(format!("{} is not a GGUF file: {e}", path.display())))?;
        let mut cfg = ModelConfig::from_gguf(&ct)?;
        let device = Device::Cpu;
        let mut raw = |name: &str| -> Result<QTensor, EngineError> {
            ct.tensor(&mut file, name, &device).map_err(|e| EngineError::Model(format!("tensor `{name}`: {e}")))
        };
        let embed_q = raw("token_embd.weight")?;
        let embed = embed_q.dequantize(&device)?;
        cfg.vocab = embed.dim(0)?;
        if embed.dim(1)? != cfg.hidden {
            return Err(EngineError::Model("token_embd.weight does not match embedding_length".into()));
        }
        let out_norm = raw("output_norm.weight")?.dequantize(&device)?;
        let lm_head = match ct.tensor_infos.contains_key("output.weight") {
            true => Linear::new(&[raw("output.weight")?])?,
            false => Linear::with_f32(&[embed_q], embed.clone())?,
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mut part = |name: &str| raw(&format!("blk.{i}.{name}.weight"));
            layers.push(Layer {
                attn_norm: part("attn_norm")?.dequantize(&device)?,
                qkv: Linear::new(&[part("attn_q")?, part("attn_k")?, part("attn_v")?])?,
                out: Linear::new(&[part("attn_output")?])?,
                ffn_norm: part("ffn_norm")?.dequantize(&device)?,
                gate_up: Linear::new(&[part("ffn_gate")?, part("ffn_up")?])?,
                down: Linear::new(&[part("ffn_down")?])?,
            });
        }
        let rope = Rope::new(cfg.head_dim, cfg.rope_base, cfg.context_length);
        // Prefill on AMX tiles where there are some, else int8 only where the int8 kernel
        // outruns f32 gemm (measured: `kvgate bench engine`).
        let prefill = match (amx::available(), Kernel::detect()) {
            (true, _) => Weights::Bf16,
            (false, Kernel::Vnni512) => Weights::Int8,
            _ => Weights::F32,
        };
        let model = Self { cfg, embed, layers, out_norm, lm_head, rope, fingerprint, prefill };
        Ok((model, ct))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The weights prefills (every pass of more than a decode step's rows) multiply with:
    /// bf16 on CPUs with AMX, int8 on CPUs with AVX-512 VNNI, f32 elsewhere.
    pub fn prefill_weights(&self) -> Weights {
        self.prefill
    }

    /// Bytes of weights one decode step reads: every layer's int8 matrices and the LM head.
    pub fn decode_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.int8.bytes() + l.out.int8.bytes() + l.gate_up.int8.bytes() + l.down.int8.bytes())
            .sum();
        layers + self.lm_head.int8.bytes()
    }

    /// A short description of the int8 weights (`kvgate bench engine`): the layers' and LM head's formats.
    pub fn int8_formats(&self) -> String {
        let layer = self.layers.first().map_or("none".to_string(), |l| format!("{:?}", l.qkv.int8.format()));
        format!("layers {layer}, LM head {:?}", self.lm_head.int8.format())
    }

    /// sha256 of the weights file.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Bytes of KV one token of a decoding sequence holds: its f32 rows, and the f16 copy
    /// decode attends over where the CPU has AVX-512.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let elements = (self.cfg.layers * 2 * self.cfg.kv_dim()) as u64;
        elements * if *super::HAS_AVX512 { 4 + 2 } else { 4 }
    }

    /// An empty cache shaped for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(&self.cfg)
    }

    /// Runs `tokens` at `positions` against `cache`, appending their K/V to it.
    ///
    /// Each new token attends to every cached or new key whose position is `≤` its own.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache,
        logits_for: &LogitsFor,
        want_pre_rope_k: bool,
    ) -> Result<ForwardOutput, EngineError> {
        let w = if tokens.len() <= DECODE_MAX_ROWS { Weights::Int8 } else { self.prefill };
        self.forward_inner(w, None, tokens, positions, cache, logits_for, want_pre_rope_k)
    }

    /// [`Model::forward`] on the weights `w` for every row and the logits: tests and quality
    /// benchmarks compare the f32 and int8 paths on the same tokens.
    pub fn forward_on(
        &self,
        w: Weights,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache,
        logits_for: &LogitsFor,
        want_pre_rope_k: bool,
    ) -> Result<ForwardOutput, EngineError> {
        self.forward_inner(w, Some(w), tokens, positions, cache, logits_for, want_pre_rope_k)
    }

    /// The forward on `w`, logits on `lm` (`None`: as [`Model::logits`] picks).
    #[allow(clippy::too_many_arguments)]
    fn forward_inner(
        &self,
        w: Weights,
        lm: Option<Weights>,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache,
        logits_for: &LogitsFor,
        want_pre_rope_k: bool,
    ) -> Result<ForwardOutput, EngineError> {
        let mut x = self.embed(tokens, positions)?;
        let rows: Vec<usize> = cache.push_rows(positions).collect();
        let decode = w == Weights::Int8 && tokens.len() <= DECODE_MAX_ROWS;
        let access = CacheAccess::Write { cache, rows: &rows };
        self.layers(0..self.cfg.layers, &mut x, positions, access, w, decode)?;
        let n = tokens.len();
        let wanted: Vec<usize> = match logits_for {
            LogitsFor::Last => vec![n - 1],
            LogitsFor::All => (0..n).collect(),
            LogitsFor::Rows(r) => r.clone(),
        };
        let logits = match lm {
            Some(lm) => self.logits_with(&x, &wanted, lm)?,
            None => self.logits(&x, &wanted)?,
        };
        let pre_rope_k = want_pre_rope_k.then(|| cache.pre_rope_k(rows[0]..rows[n - 1] + 1, &self.rope));
        Ok(ForwardOutput { logits, pre_rope_k })
    }

    /// The hidden states entering layer 0 for `tokens`, after checking tokens and positions.
    pub fn embed(&self, tokens: &[u32], positions: &[u32]) -> Result<Vec<f32>, EngineError> {
        let n = tokens.len();
        if n == 0 || positions.len() != n {
            return Err(EngineError::Internal(format!("forward: {n} tokens with {} positions", positions.len())));
        }
        if let Some(&p) = positions.iter().max() {
            if p as usize >= self.rope.max_positions() {
                return Err(EngineError::Internal(format!(
                    "position {p} beyond the context of {}",
                    self.rope.max_positions()
                )));
            }
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(EngineError::Internal(format!("token id {bad} beyond the vocabulary")));
        }
        let hidden = self.cfg.hidden;
        let mut x = Vec::with_capacity(n * hidden);
        with_slice(&self.embed, |e| {
            for &t in tokens {
                x.extend_from_slice(&e[t as usize * hidden..][..hidden]);
            }
        })?;
        Ok(x)
    }

    /// Runs `layers` over hidden states `x` (one row per token at `positions`), writing each
    /// token's rotated K and its V into cache row `rows[i]` before attending, so that the
    /// tokens see each other and every other cache row at a position `≤` theirs.
    ///
    /// This is the primitive of selective recompute: `rows` may be any subset of the cache.
    pub fn run_layers(
        &self,
        layers: std::ops::Range<usize>,
        x: &mut [f32],
        positions: &[u32],
        rows: &[usize],
        cache: &mut KvCache,
        w: Weights,
    ) -> Result<(), EngineError> {
        if rows.len() != positions.len() || rows.iter().any(|&r| r >= cache.len()) {
            return Err(EngineError::Internal("run_layers: rows and hidden states do not match".into()));
        }
        self.layers(layers, x, positions, CacheAccess::Write { cache, rows }, w, false)
    }

    /// Log-probabilities of every token of a prompt but the first, given the tokens before it,
    /// as the model sees them with the KV that `cache` holds for the prompt (row `i` at
    /// position `i`, however it got there: computed, or spliced from the chunk store). A
    /// forward pass over every token that reads the cache and writes nothing to it, on the
    /// prefill weights, in blocks so that logits never exceed a block's rows × vocabulary. Entry
    /// `i` is token `from + i`'s logprob and the `top` most likely tokens at its position
    /// (`from` ≥ 1: nothing predicts the first token).
    pub fn score(
        &self,
        tokens: &[u32],
        from: usize,
        cache: &KvCache,
        top: usize,
    ) -> Result<Vec<(TokenLogprob, Vec<TokenLogprob>)>, EngineError> {
        let n = tokens.len();
        if cache.len() < n || cache.positions[..n].iter().enumerate().any(|(i, &p)| p as usize != i) {
            return Err(EngineError::Internal("score: the cache does not hold the prompt in order".into()));
        }
        let mut out = Vec::with_capacity(n.saturating_sub(from));
        for start in (from.max(1) - 1..n.saturating_sub(1)).step_by(SCORE_BLOCK) {
            let end = (start + SCORE_BLOCK).min(n - 1);
            let positions: Vec<u32> = (start as u32..end as u32).collect();
            let mut x = self.embed(&tokens[start..end], &positions)?;
            self.layers(0..self.cfg.layers, &mut x, &positions, CacheAccess::Read(cache), self.prefill, false)?;
            self.score_block(&x, &tokens[start + 1..end + 1], top, &mut out)?;
        }
        Ok(out)
    }

    /// What [`Model::score`] returns, from the last layer's hidden states the prefill already
    /// computed (`hidden`: rows `first..`, in order): only the LM head and the log-softmax
    /// run. The same logits as scoring with another pass, since a row's hidden state does not
    /// depend on the rows computed with it.
    pub fn score_hidden(
        &self,
        tokens: &[u32],
        from: usize,
        first: usize,
        hidden: &[f32],
        top: usize,
    ) -> Result<Vec<(TokenLogprob, Vec<TokenLogprob>)>, EngineError> {
        let (n, h) = (tokens.len(), self.cfg.hidden);
        let start = from.max(1) - 1;
        if start < first || first + hidden.len() / h < n {
            return Err(EngineError::Internal("score_hidden: the states do not cover the rows scored".into()));
        }
        let end = n.saturating_sub(1).max(start);
        self.score_rows(&hidden[(start - first) * h..(end - first) * h], &tokens[start + 1..end + 1], top)
    }

    /// The logprob of `next[i]` and the `top` most likely tokens after the row whose last
    /// layer's hidden state is row `i` of `x`, for every row: the LM head and the log-softmax,
    /// in blocks. A row's result does not depend on the rows scored with it.
    pub fn score_rows(
        &self,
        x: &[f32],
        next: &[u32],
        top: usize,
    ) -> Result<Vec<(TokenLogprob, Vec<TokenLogprob>)>, EngineError> {
        let h = self.cfg.hidden;
        if x.len() != next.len() * h {
            return Err(EngineError::Internal("score_rows: states and tokens differ in number".into()));
        }
        let mut out = Vec::with_capacity(next.len());
        for (x, next) in x.chunks(SCORE_ROWS * h).zip(next.chunks(SCORE_ROWS)) {
            self.score_block(x, next, top, &mut out)?;
        }
        Ok(out)
    }

    /// Logprobs of the tokens `next` after the rows of hidden states `x`, appended to `out`.
    /// On bf16 weights the LM head hands its sums over a segment at a time to the log-softmax
    /// ([`Bf16Matrix::matmul_by_segments`]), which scores them while they are in cache; else
    /// the logits of [`SCORE_BLOCK`] rows at a time are written out and scored a row at a time.
    /// Both take the same segments ([`sampling::SEGMENT`]) in the same way: the same logits
    /// give the same logprobs.
    fn score_block(
        &self,
        x: &[f32],
        next: &[u32],
        top: usize,
        out: &mut Vec<(TokenLogprob, Vec<TokenLogprob>)>,
    ) -> Result<(), EngineError> {
        let (hidden, vocab, n) = (self.cfg.hidden, self.cfg.vocab, next.len());
        if x.len() != n * hidden {
            return Err(EngineError::Internal("score: states and tokens differ in number".into()));
        }
        if let Some(&bad) = next.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::Internal(format!("score: token {bad} outside the vocabulary")));
        }
        let head = match (self.prefill, &self.lm_head.bf16) {
            (Weights::Bf16, Some(head)) => head,
            _ => {
                for (x, next) in x.chunks(SCORE_BLOCK * hidden).zip(next.chunks(SCORE_BLOCK)) {
                    self.score_logits(x, next, top, out)?;
                }
                return Ok(());
            }
        };
        let mut normed = vec![0f32; x.len()];
        rms_norm(x, &self.out_norm, self.cfg.rms_eps, &mut normed);
        let segments = vocab.div_ceil(sampling::SEGMENT);
        let mut parts = vec![sampling::SegmentScore::default(); n * segments];
        let mut tops = vec![TokenLogprob { id: 0, logprob: 0.0 }; n * segments * top];
        let mut chosen = vec![0f32; n];
        let (p, t, c) = (OutPtr(parts.as_mut_ptr()), OutPtr(tops.as_mut_ptr()), OutPtr(chosen.as_mut_ptr()));
        head.matmul_by_segments(&normed, n, sampling::SEGMENT, |rows, outs, sums| {
            let s = outs.start / sampling::SEGMENT;
            for (i, r) in rows.enumerate() {
                let logits = &sums[i * sampling::SEGMENT..][..outs.len()];
                // SAFETY: row r's entries for segment s (its score, its `top` tokens) are written
                // by this call alone (a call per rows × segment), and lie inside the buffers
                // (r < n, s < segments); row r's chosen logit comes from the one segment that
                // holds its token.
                unsafe {
                    let kept = std::slice::from_raw_parts_mut(t.at((r * segments + s) * top), top);
                    *p.at(r * segments + s) = sampling::score_segment(logits, outs.start, kept);
                    if outs.contains(&(next[r] as usize)) {
                        *c.at(r) = logits[next[r] as usize - outs.start];
                    }
                }
            }
        });
        out.extend((0..n).map(|r| {
            let tops = &tops[r * segments * top..(r + 1) * segments * top];
            sampling::combine(&parts[r * segments..(r + 1) * segments], tops, chosen[r], next[r], top)
        }));
        Ok(())
    }

    /// [`Model::score_block`] from logits written out, at most [`SCORE_BLOCK`] rows.
    fn score_logits(
        &self,
        x: &[f32],
        next: &[u32],
        top: usize,
        out: &mut Vec<(TokenLogprob, Vec<TokenLogprob>)>,
    ) -> Result<(), EngineError> {
        let rows: Vec<usize> = (0..next.len()).collect();
        let scored: Vec<std::sync::OnceLock<(TokenLogprob, Vec<TokenLogprob>)>> =
            rows.iter().map(|_| std::sync::OnceLock::new()).collect();
        self.with_logits(x, &rows, self.prefill, |logits| {
            // Rows are independent: the engine's threads take them in turn.
            candle_core::utils::barrier_pool().execute_chunked(rows.len(), |range| {
                for i in range {
                    let row = &logits[i * self.cfg.vocab..(i + 1) * self.cfg.vocab];
                    let _ = scored[i].set(sampling::logprobs(row, next[i], top));
                }
            });
        })?;
        out.extend(scored.into_iter().map(|s| s.into_inner().expect("every row is scored")));
        Ok(())
    }

    /// One decode step of several sequences at once: `tokens[i]` at `positions[i]` is appended
    /// to `caches[i]`; returns `tokens.len() × vocab` logits. The linear layers multiply every
    /// row in one pass over the int8 weights (decode is memory-bound: the weights are read
    /// once for the whole batch); attention runs per sequence over its own cache, all heads of
    /// all sequences in one dispatch. A row's
    /// result does not depend on the other rows — the quantized matmul quantizes and dots each
    /// row on its own, and logits are always int8 here — so a sequence decodes the same alone
    /// or in any batch.
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        positions: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<f32>, EngineError> {
        let cfg = &self.cfg;
        let (hidden, kv_dim, ffn) = (cfg.hidden, cfg.kv_dim(), cfg.ffn);
        let b = tokens.len();
        if positions.len() != b || caches.len() != b {
            return Err(EngineError::Internal("decode_batch: tokens, positions and caches differ in number".into()));
        }
        let mut x = self.embed(tokens, positions)?;
        // Attention reads the caches' f16 copies where the CPU widens them as it loads.
        let half = *super::HAS_AVX512;
        // Each cache brought up to date and given its new row on a task of its own.
        let mut rows = vec![0usize; b];
        let (cp, rp) = (OutPtr(caches.as_mut_ptr()), OutPtr(rows.as_mut_ptr()));
        per_row(b, |i| {
            // SAFETY: caches[i] and rows[i] are this task's alone (one task a row).
            let (c, row) = unsafe { (&mut **cp.at(i), &mut *rp.at(i)) };
            if half {
                c.sync_half();
            }
            *row = c.push_rows(&positions[i..=i]).start;
        });
        let sorted: Vec<bool> = caches.iter().map(|c| c.sorted()).collect();
        let (mut h, mut q) = (vec![0f32; b * hidden], vec![0f32; b * hidden]);
        let mut attn = vec![0f32; b * hidden];
        let mut act = vec![0f32; b * ffn];
        let row = hidden + 2 * kv_dim;
        // A new row into a cache (rotated to `rotate` for K) and (`half`) its f16 copy, which
        // holds the rows before it.
        let put = |f: &mut Vec<f32>, h: &mut Vec<f16>, at: usize, new: &[f32], rotate: Option<u32>| {
            let slot = &mut f[at * kv_dim..(at + 1) * kv_dim];
            slot.copy_from_slice(new);
            if let Some(p) = rotate {
                self.rope.rotate(slot, &[p], 1.0);
            }
            if half {
                h.resize((at + 1) * kv_dim, f16::ZERO);
                h[at * kv_dim..].convert_from_f32_slice(slot);
            }
        };
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, cfg.rms_eps, &mut h);
            layer.qkv.forward(&h, b, Weights::Int8, |qkv| {
                // A sequence's share on a task of its own: its query row rotated, its K
                // rotated and its V put into its cache (and the copy).
                let (qp, cp) = (OutPtr(q.as_mut_ptr()), OutPtr(caches.as_mut_ptr()));
                let one = |i: usize| {
                    let r = &qkv[i * row..(i + 1) * row];
                    // SAFETY: row i of q and caches[i] are this task's alone (one task a row).
                    let (qi, c) =
                        unsafe { (std::slice::from_raw_parts_mut(qp.at(i * hidden), hidden), &mut **cp.at(i)) };
                    qi.copy_from_slice(&r[..hidden]);
                    self.rope.rotate(qi, &positions[i..=i], 1.0);
                    let (kv, half) = (&mut c.layers[l], &mut c.half[l]);
                    put(&mut kv.k, &mut half.k, rows[i], &r[hidden..hidden + kv_dim], Some(positions[i]));
                    put(&mut kv.v, &mut half.v, rows[i], &r[hidden + kv_dim..], None);
                };
                per_row(b, one);
            })?;
            let at = caches.iter().zip(&sorted);
            match half {
                true => {
                    let keys: Vec<Keys<f16>> = at
                        .map(|(c, &sorted)| Keys { k: &c.half[l].k, v: &c.half[l].v, positions: &c.positions, sorted })
                        .collect();
                    attention::attention_decode_batch(cfg.heads(), &q, positions, &keys, &mut attn);
                }
                false => {
                    let keys: Vec<Keys> = at
                        .map(|(c, &sorted)| Keys {
                            k: &c.layers[l].k,
                            v: &c.layers[l].v,
                            positions: &c.positions,
                            sorted,
                        })
                        .collect();
                    attention::attention_decode_batch(cfg.heads(), &q, positions, &keys, &mut attn);
                }
            }
            layer.out.forward(&attn, b, Weights::Int8, |o| add_assign(&mut x, o))?;
            rms_norm(&x, &layer.ffn_norm, cfg.rms_eps, &mut h);
            layer.gate_up.forward(&h, b, Weights::Int8, |gu| silu_rows(gu, &mut act, ffn))?;
            layer.down.forward(&act, b, Weights::Int8, |d| add_assign(&mut x, d))?;
        }
        if half {
            caches.iter_mut().for_each(|c| c.half_rows = c.len());
        }
        let all: Vec<usize> = (0..b).collect();
        self.logits_with(&x, &all, Weights::Int8)
    }

    /// How much attention each cache row receives at `layer` from the tokens whose hidden
    /// states entering that layer are `x` (at `positions`), averaged over heads and tokens —
    /// what the selector of compose mode may weigh deviations by. The cache's K at `layer`
    /// must be filled for every row that should count.
    pub fn attention_mass(
        &self,
        layer: usize,
        x: &[f32],
        positions: &[u32],
        cache: &KvCache,
    ) -> Result<Vec<f32>, EngineError> {
        let cfg = &self.cfg;
        let n = positions.len();
        let mut h = vec![0f32; x.len()];
        rms_norm(x, &self.layers[layer].attn_norm, cfg.rms_eps, &mut h);
        let row = cfg.hidden + 2 * cfg.kv_dim();
        let mut q = Vec::with_capacity(n * cfg.hidden);
        self.layers[layer].qkv.forward(&h, n, self.prefill, |qkv| {
            qkv.chunks_exact(row).for_each(|r| q.extend_from_slice(&r[..cfg.hidden]));
        })?;
        self.rope.rotate(&mut q, positions, 1.0);
        let kv = &cache.layers[layer];
        let keys = Keys { k: &kv.k, v: &kv.v, positions: &cache.positions, sorted: false };
        Ok(attention::attention_mass(cfg.heads(), &q, positions, &keys))
    }

    /// Layer `layer`'s K and V of the tokens whose hidden states entering it are `x` (at
    /// `positions`), written into the cache rows `rows`: what [`Model::run_layers`] writes there,
    /// without the attention and the MLP that make the layer's output. Compose's check pass
    /// needs the check layer's K/V of every token, its output only of the tokens recomputed.
    pub fn write_kv(
        &self,
        layer: usize,
        x: &[f32],
        positions: &[u32],
        rows: &[usize],
        cache: &mut KvCache,
    ) -> Result<(), EngineError> {
        let (n, hidden, kv_dim) = (positions.len(), self.cfg.hidden, self.cfg.kv_dim());
        if rows.len() != n || x.len() != n * hidden || rows.iter().any(|&r| r >= cache.len()) {
            return Err(EngineError::Internal("write_kv: rows and hidden states do not match".into()));
        }
        let (mut h, mut q, mut k) = (vec![0f32; n * hidden], vec![0f32; n * hidden], vec![0f32; n * kv_dim]);
        let mut access = CacheAccess::Write { cache, rows };
        self.project(layer, x, positions, (&mut h, &mut q, &mut k), &mut access, self.prefill)
    }

    /// Layer `l`'s attention inputs: `x` normed into `h`, the rotated Q and K into `q` and `k`;
    /// with `Write`, K and V into the cache rows.
    fn project(
        &self,
        l: usize,
        x: &[f32],
        positions: &[u32],
        (h, q, k): (&mut [f32], &mut [f32], &mut [f32]),
        access: &mut CacheAccess,
        w: Weights,
    ) -> Result<(), EngineError> {
        let (hidden, kv_dim) = (self.cfg.hidden, self.cfg.kv_dim());
        let layer = &self.layers[l];
        let row = hidden + 2 * kv_dim;
        // The rows written change: decode's f16 copy goes from the first of them on.
        if let CacheAccess::Write { cache, rows } = access {
            let first = rows.iter().copied().min().unwrap_or(cache.len());
            cache.rows_mut(first);
        }
        rms_norm(x, &layer.attn_norm, self.cfg.rms_eps, h);
        layer.qkv.forward(h, positions.len(), w, |qkv| {
            for (i, r) in qkv.chunks_exact(row).enumerate() {
                q[i * hidden..(i + 1) * hidden].copy_from_slice(&r[..hidden]);
                k[i * kv_dim..(i + 1) * kv_dim].copy_from_slice(&r[hidden..hidden + kv_dim]);
                if let CacheAccess::Write { cache, rows } = access {
                    let v = &mut cache.layers[l].v;
                    v[rows[i] * kv_dim..(rows[i] + 1) * kv_dim].copy_from_slice(&r[hidden + kv_dim..]);
                }
            }
        })?;
        self.rope.rotate(q, positions, 1.0);
        self.rope.rotate(k, positions, 1.0);
        if let CacheAccess::Write { cache, rows } = access {
            let kv = &mut cache.layers[l].k;
            for (i, &r) in rows.iter().enumerate() {
                kv[r * kv_dim..(r + 1) * kv_dim].copy_from_slice(&k[i * kv_dim..(i + 1) * kv_dim]);
            }
        }
        Ok(())
    }

    /// The layer loop: each token's rotated K and its V go into its cache row before it
    /// attends (`Write`), or the cache is read as it is (`Read`: the tokens already sit in it).
    fn layers(
        &self,
        layers: std::ops::Range<usize>,
        x: &mut [f32],
        positions: &[u32],
        mut access: CacheAccess,
        w: Weights,
        decode: bool,
    ) -> Result<(), EngineError> {
        let cfg = &self.cfg;
        let (hidden, kv_dim, ffn) = (cfg.hidden, cfg.kv_dim(), cfg.ffn);
        let n = positions.len();
        if x.len() != n * hidden {
            return Err(EngineError::Internal("run_layers: rows and hidden states do not match".into()));
        }
        let sorted = access.cache().sorted();
        let mut h = vec![0f32; n * hidden];
        let mut q = vec![0f32; n * hidden];
        let mut k = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * hidden];
        let mut act = vec![0f32; n * ffn];
        for l in layers {
            let layer = &self.layers[l];
            self.project(l, x, positions, (&mut h, &mut q, &mut k), &mut access, w)?;
            let cache = access.cache();
            let kv = &cache.layers[l];
            let keys = Keys { k: &kv.k, v: &kv.v, positions: &cache.positions, sorted };
            attention::attention(cfg.heads(), &q, positions, &keys, &mut attn, decode);
            layer.out.forward(&attn, n, w, |o| add_assign(x, o))?;
            rms_norm(x, &layer.ffn_norm, cfg.rms_eps, &mut h);
            layer.gate_up.forward(&h, n, w, |gu| silu_rows(gu, &mut act, ffn))?;
            layer.down.forward(&act, n, w, |d| add_assign(x, d))?;
        }
        Ok(())
    }

    /// Logits (`rows.len() × vocab`) of the hidden states `x` at `rows`.
    pub fn logits(&self, x: &[f32], rows: &[usize]) -> Result<Vec<f32>, EngineError> {
        // One row of logits is a matrix-vector product: int8, whatever produced the row.
        self.logits_with(x, rows, if rows.len() <= DECODE_MAX_ROWS { Weights::Int8 } else { self.prefill })
    }

    fn logits_with(&self, x: &[f32], rows: &[usize], w: Weights) -> Result<Vec<f32>, EngineError> {
        self.with_logits(x, rows, w, <[f32]>::to_vec)
    }

    /// `f` of the logits (`rows.len() × vocab`) of `rows` of the hidden states `x`, seen in
    /// the LM head's output buffer (a block of prompt rows' logits is tens of MB: a copy of
    /// them costs as much as reading them).
    fn with_logits<R>(
        &self,
        x: &[f32],
        rows: &[usize],
        w: Weights,
        f: impl FnOnce(&[f32]) -> R,
    ) -> Result<R, EngineError> {
        let hidden = self.cfg.hidden;
        let n = x.len() / hidden;
        if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
            return Err(EngineError::Internal(format!("logits row {bad} of {n}")));
        }
        if rows.is_empty() {
            return Ok(f(&[]));
        }
        let picked: Vec<f32> = rows.iter().flat_map(|&r| x[r * hidden..(r + 1) * hidden].iter().copied()).collect();
        let mut normed = vec![0f32; picked.len()];
        rms_norm(&picked, &self.out_norm, self.cfg.rms_eps, &mut normed);
        self.lm_head.forward(&normed, rows.len(), w, f)
    }
}

/// Rows whose logits are written out at once: never more than this many rows × the vocabulary.
const SCORE_BLOCK: usize = 128;

/// Rows [`Model::score_rows`] hands the LM head at once: on bf16 weights the head's weights are
/// read once per this many rows (their bf16 inputs, 1.1 MiB at 576 wide, stay in L2), and
/// what is kept per row is a score per segment, not its logits.
const SCORE_ROWS: usize = 1024;

/// How a pass of the layers uses the cache.
enum CacheAccess<'a> {
    /// The tokens' K/V are written into these rows, then attended to with the rest.
    Write { cache: &'a mut KvCache, rows: &'a [usize] },
    /// The tokens already sit in the cache; it is only read.
    Read(&'a KvCache),
}

impl CacheAccess<'_> {
    fn cache(&self) -> &KvCache {
        match self {
            CacheAccess::Write { cache, .. } => cache,
            CacheAccess::Read(cache) => cache,
        }
    }
}

/// Calls `f` with the contents of a contiguous f32 CPU tensor, without copying.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, EngineError> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(EngineError::Internal("tensor is not on the CPU".into()));
    };
    let all = cpu.as_slice::<f32>()?;
    if !layout.is_contiguous() {
        return Err(EngineError::Internal("tensor is not contiguous".into()));
    }
    let start = layout.start_offset();
    Ok(f(&all[start..start + layout.shape().elem_count()]))
}

/// `out = x / rms(x) * w`, row by row.
fn rms_norm(x: &[f32], w: &Tensor, eps: f32, out: &mut [f32]) {
    let _ = with_slice(w, |w| {
        let d = w.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            // Sixteen running sums (one register's lanes), added in a fixed order: the same
            // mean square for a row wherever it is, at a sixteenth of a serial sum's latency.
            let mut lanes = [0f32; 16];
            let whole = xr.chunks_exact(16);
            let rest = whole.remainder().iter().map(|v| v * v).sum::<f32>();
            for c in whole {
                for (s, v) in lanes.iter_mut().zip(c) {
                    *s += v * v;
                }
            }
            let ms = (lanes.iter().sum::<f32>() + rest) / d as f32;
            let scale = 1.0 / (ms + eps).sqrt();
            for ((o, &v), &wi) in or.iter_mut().zip(xr).zip(w) {
                *o = v * scale * wi;
            }
        }
    });
}

/// `act` (rows × `ffn`) = SiLU(gate) · up of each row of `gu` (rows × 2·`ffn`: gate, then up),
/// the rows on the engine's threads (each row the same arithmetic wherever it runs).
fn silu_rows(gu: &[f32], act: &mut [f32], ffn: usize) {
    let out = OutPtr(act.as_mut_ptr());
    per_row(gu.len() / (2 * ffn), |i| {
        // SAFETY: row i of `act` is this task's alone (one task a row).
        let a = unsafe { std::slice::from_raw_parts_mut(out.at(i * ffn), ffn) };
        let (gate, up) = gu[i * 2 * ffn..(i + 1) * 2 * ffn].split_at(ffn);
        for ((a, &g), &u) in a.iter_mut().zip(gate).zip(up) {
            *a = g / (1.0 + attention::fast_exp(-g)) * u;
        }
    });
}

/// Runs `f` for rows `0..n`, on the engine's threads when there are two rows or more.
fn per_row(n: usize, f: impl Fn(usize) + Sync) {
    match n {
        0 | 1 => (0..n).for_each(f),
        _ => candle_core::utils::barrier_pool().execute_chunked(n, |rows| rows.for_each(&f)),
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn sha256_file(path: &Path) -> Result<String, EngineError> {
    let mut f = File::open(path).map_err(|e| EngineError::Model(format!("cannot open {}: {e}", path.display())))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| EngineError::Model(format!("reading {}: {e}", path.display())))?;
    Ok(format!("{:x}", h.finalize()))
}
