//! The inference core: model, tokenizer, chat template, sampling.
//!
//! Owns turning text into tokens and tokens into logits: the GGUF model and its forward (one
//! prompt, a batch of decode steps, a read-only scoring pass), the tokenizer, the chat
//! template, sampling. Knows no cache store, no plugins, no HTTP and no scheduling (the
//! `scheduler` decides what runs; `blend` drives prefills). It never awaits.
//!
//! Layout:
//! - [`model`]: GGUF loading and our llama forward (explicit positions, caller-owned KV).
//! - [`attention`]: RoPE at any position and blocked, position-masked attention.
//! - [`amx`]: prefill's matrix products on AMX tiles (bf16), where the CPU has them.
//! - [`int8`]: Q4_0 / Q4_1 / Q8_0 matrix products on int8 dot products (decode and prefill).
//! - [`cpu`]: which SIMD paths the kernels take on this CPU (`kvgate info`).
//! - [`tokenizer`]: byte-level BPE from GGUF metadata, streaming detokenizer.
//! - [`template`]: the GGUF chat template.
//! - [`sampling`]: greedy / temperature / top-k / top-p, log-probabilities.

pub mod amx;
pub mod attention;
pub mod cpu;
pub mod int8;
pub mod model;
pub mod sampling;
pub mod template;
pub mod tokenizer;

use std::path::Path;
use std::sync::Arc;

pub use model::{ForwardOutput, KvCache, LogitsFor, Model, ModelConfig, Weights};
pub use sampling::{SamplingParams, TokenLogprob};
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::Tokenizer;

/// Whether this CPU has AVX-512F (decode attention's and the input quantizer's kernels).
#[cfg(target_arch = "x86_64")]
static HAS_AVX512: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::arch::is_x86_feature_detected!("avx512f"));

/// `len` values of `T` in whole 64-byte lines from a line boundary, so that a 64-byte vector
/// load or AMX tile row taken at a multiple of 64 bytes is one cache line, never two. The AMX
/// products' weights, inputs and tile sums live in these: measured on their loop, rows
/// straddling two lines halve the product's speed. (The int8 kernels' buffers gained nothing
/// measurable from it: their 64-byte loads hit L1, and the tiles are bound by their arithmetic.)
struct Aligned<T: Zeroed> {
    lines: Vec<CacheLine>,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([u8; 64]);

/// Plain values for which all-zero bytes are a valid value (zero).
///
/// # Safety
/// Implemented only for types whose every bit pattern of their size is valid, without padding.
unsafe trait Zeroed: Copy {}
// SAFETY: plain numbers, every bit pattern valid.
unsafe impl Zeroed for u8 {}
// SAFETY: as above.
unsafe impl Zeroed for u16 {}
// SAFETY: as above.
unsafe impl Zeroed for f32 {}

impl<T: Zeroed> Aligned<T> {
    const fn new() -> Self {
        Self { lines: Vec::new(), len: 0, _values: std::marker::PhantomData }
    }

    /// `len` zeros.
    fn zeroed(len: usize) -> Self {
        let mut a = Self::new();
        a.resize(len);
        a
    }

    /// Makes this `len` values, reusing the allocation: those it held stay, those added are
    /// zeros (callers that refill it overwrite every value they read).
    fn resize(&mut self, len: usize) {
        self.lines.resize((len * std::mem::size_of::<T>()).div_ceil(64), CacheLine([0; 64]));
        self.len = len;
    }
}

impl<T: Zeroed> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the lines hold at least `len` values of T (size rounded up to lines), T's
        // alignment divides 64, and every bit pattern is a T (`Zeroed`).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Zeroed> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

/// The first `len` values of `buf`, grown (with default values) to hold them if it is
/// shorter: a buffer reused across calls whose every value each call writes before reading,
/// so that neither is it zeroed every call nor its pages faulted in afresh.
fn grown<T: Clone + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    &mut buf[..len]
}

/// An output buffer shared by the parallel tasks of one kernel (attention blocks, matrix
/// product stripes, quantized input rows), each of which writes only its own disjoint elements.
struct OutPtr<T>(*mut T);
// SAFETY: the tasks holding it write disjoint elements only.
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// The element at `i` (a method, so that closures capture the whole `Send` wrapper).
    ///
    /// # Safety
    /// `i` must be inside the output, in a region only the calling task writes.
    unsafe fn at(self, i: usize) -> *mut T {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(i) }
    }
}

/// What can go wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file is unusable (the server does not start).
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template refused the conversation (a client error).
    #[error("chat template: {0}")]
    Template(String),
    /// The prompt plus the tokens asked for do not fit in the context.
    #[error(
        "this model's maximum context length is {limit} tokens, but {} tokens were requested \
         ({prompt} in the prompt, {completion} for the completion)",
        prompt + completion
    )]
    ContextOverflow { prompt: usize, completion: usize, limit: usize },
    /// A prompt token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    InvalidToken { id: u32, vocab: usize },
    /// A request option out of range.
    #[error("{0}")]
    InvalidOption(String),
    /// Nothing to generate from.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The request queue is full.
    #[error("the server is busy: the request queue is full")]
    QueueFull,
    /// The engine has stopped (shutdown).
    #[error("the engine is shutting down")]
    Stopped,
    #[error("internal: {0}")]
    Internal(String),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Internal(e.to_string())
    }
}

/// The tokenizer and chat template of a GGUF model, read from its metadata alone (no weights:
/// what a router needs to see prompts as the nodes do).
pub fn load_prompting(path: &Path) -> Result<(Tokenizer, ChatTemplate), EngineError> {
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::Model(format!("{}: {e}", path.display())))?;
    let ct = candle_core::quantized::gguf_file::Content::read(&mut file)
        .map_err(|e| EngineError::Model(format!("{}: not a GGUF file: {e}", path.display())))?;
    prompting(&ct)
}

fn prompting(ct: &candle_core::quantized::gguf_file::Content) -> Result<(Tokenizer, ChatTemplate), EngineError> {
    let tokenizer = Tokenizer::from_gguf(ct)?;
    let source = ct.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok());
    let template = ChatTemplate::new(source.map(String::as_str), tokenizer.bos_text(), tokenizer.eos_text())?;
    Ok((tokenizer, template))
}

/// Renders and tokenizes a conversation; also returns the token index where each message
/// begins (0 first).
pub fn encode_chat(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<(Vec<u32>, Vec<usize>), EngineError> {
    let enc = tokenizer.encode(&template.render(messages)?)?;
    let mut segment_starts = vec![0];
    // Message starts in bytes → the first token at or after each.
    for b in template::segment_starts(template, messages) {
        let t = enc.offsets.partition_point(|o| o.0 < b);
        if t < enc.ids.len() && segment_starts.last() != Some(&t) {
            segment_starts.push(t);
        }
    }
    Ok((enc.ids, segment_starts))
}

/// A model with its tokenizer and chat template: everything needed to turn a request
/// into tokens and back.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// The name clients use for it (`model` in requests).
    pub name: String,
}

impl LoadedModel {
    /// Loads the GGUF at `path`; `name` defaults to the file stem.
    pub fn load(path: &Path, name: Option<&str>) -> Result<Arc<Self>, EngineError> {
        let (model, ct) = Model::load(path)?;
        let (tokenizer, template) = prompting(&ct)?;
        if tokenizer.vocab_size() != model.config().vocab {
            return Err(EngineError::Model(format!(
                "tokenizer has {} tokens but the embedding has {} rows",
                tokenizer.vocab_size(),
                model.config().vocab
            )));
        }
        let name = match name {
            Some(n) => n.to_string(),
            None => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
        };
        Ok(Arc::new(Self { model, tokenizer, template, name }))
    }

    /// Renders and tokenizes a conversation; also returns the token index where each message
    /// begins (0 first).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<(Vec<u32>, Vec<usize>), EngineError> {
        encode_chat(&self.tokenizer, &self.template, messages)
    }

    /// The text the tokens spell and the byte offset of each token in it (what the chunker
    /// sees). Bytes that are not UTF-8 on their own are replaced per token, so the offsets
    /// always index the returned text.
    pub fn token_text(&self, ids: &[u32]) -> (String, Vec<u32>) {
        let (mut text, mut offsets) = (String::new(), Vec::with_capacity(ids.len()));
        for &id in ids {
            offsets.push(text.len() as u32);
            text.push_str(&String::from_utf8_lossy(self.tokenizer.token_bytes(id)));
        }
        (text, offsets)
    }
}

/// The sums of the sixteen lanes of each of sixteen vectors, in one vector (lane `k`: vector
/// `k`'s), by a tree of in-lane shuffles and adds: 45 instructions where one reduction per
/// vector takes 8 each (decode attention's scores). Every vector's lanes are added in the
/// same order whatever its place.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn lane_sums(v: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Vectors a, b → per 128-bit quarter [a0 + a2, b0 + b2, a1 + a3, b1 + b3].
    let pairs: [__m512; 8] = std::array::from_fn(|k| {
        _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]))
    });
    // Two of those → per quarter the four vectors' sums over it.
    let quads: [__m512; 4] = std::array::from_fn(|k| {
        let (a, b) = (_mm512_castps_pd(pairs[2 * k]), _mm512_castps_pd(pairs[2 * k + 1]));
        _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)))
    });
    // Quarters added in pairs, then the pairs: lane k ends with vector k's total.
    let halves: [__m512; 2] = std::array::from_fn(|k| {
        let (a, b) = (quads[2 * k], quads[2 * k + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
    });
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(halves[0], halves[1]),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(halves[0], halves[1]),
    )
}
