//! The on-disk form of one chunk: a versioned header, the token ids, K and V per layer in the
//! configured element type, optionally the last layer's hidden state of every token (what
//! scoring a prompt that reuses the chunk reads instead of running those rows again), and a
//! CRC-32 trailer over everything before it.
//!
//! ```text
//!   0  magic "KVGATEKV"          40  chunk key (32 bytes)
//!   8  version u16 = 1           72  sha256 of the model fingerprint (32 bytes)
//!  10  dtype u8 (0 f32, 1 f16, 2 bf16)
//!  11  flags u8 (bit 0: K rotated, bit 1: hidden states)   104..128 reserved (zero)
//!  12  rotated_at u32            128  tokens × u32
//!  16  layers, kv_heads, head_dim, hidden u16 ×4   then per layer: K, V (tokens × kv_dim
//!  24  tokens u32                      elements); with bit 1, tokens × hidden elements
//!                                end  crc32 u32 of bytes 0..end
//!  32  total length u64
//! ```
//!
//! Everything little-endian. Decoding checks every field against what the reader expects, so
//! a payload of another model, another layout, or torn by a crash is refused, never served.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use sha2::{Digest, Sha256};

use super::{ChunkKey, ChunkKv};

const MAGIC: &[u8; 8] = b"KVGATEKV";
const VERSION: u16 = 1;
/// Bytes before the token ids.
pub const HEADER_LEN: usize = 128;
const TRAILER_LEN: usize = 4;

/// Element type of stored K and V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }

    /// The name it is configured by (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
        }
    }

    fn code(self) -> u8 {
        match self {
            KvDtype::F32 => 0,
            KvDtype::F16 => 1,
            KvDtype::Bf16 => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        [KvDtype::F32, KvDtype::F16, KvDtype::Bf16].into_iter().find(|d| d.code() == code)
    }

    /// Rounds `values` to this type and back, so that a chunk served from RAM equals the same
    /// chunk served from disk.
    pub fn round(self, values: &mut [f32]) {
        match self {
            KvDtype::F32 => {}
            KvDtype::F16 => {
                let mut h = vec![f16::ZERO; values.len()];
                h.convert_from_f32_slice(values);
                h.convert_to_f32_slice(values);
            }
            KvDtype::Bf16 => {
                let mut h = vec![bf16::ZERO; values.len()];
                h.convert_from_f32_slice(values);
                h.convert_to_f32_slice(values);
            }
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            "bf16" => Ok(KvDtype::Bf16),
            _ => Err(format!("unknown KV element type `{s}` (f32, f16 or bf16)")),
        }
    }
}

/// What every payload of one store must agree on. `dtype` is the element type of
/// compositional-reuse chunks; prefix-cache chunks (K already rotated) are `prefix_dtype`,
/// f32 unless told otherwise: their whole point is reuse that is exactly a full prefill, which
/// rounding would break (f16 prefix chunks measure what that rounding costs — the floor every
/// production server accepts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// sha256 of the model fingerprint.
    pub model: [u8; 32],
    pub layers: u16,
    pub kv_heads: u16,
    pub head_dim: u16,
    /// The model's hidden size: the width of a token's stored hidden state.
    pub hidden: u16,
    pub dtype: KvDtype,
    pub prefix_dtype: KvDtype,
}

impl Layout {
    pub fn new(
        fingerprint: &str,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        hidden: usize,
        dtype: KvDtype,
    ) -> Self {
        Self {
            model: Sha256::digest(fingerprint.as_bytes()).into(),
            layers: layers as u16,
            kv_heads: kv_heads as u16,
            head_dim: head_dim as u16,
            hidden: hidden as u16,
            dtype,
            prefix_dtype: KvDtype::F32,
        }
    }

    /// The same layout with prefix-cache chunks stored as `dtype`.
    pub fn with_prefix_dtype(mut self, dtype: KvDtype) -> Self {
        self.prefix_dtype = dtype;
        self
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads as usize * self.head_dim as usize
    }

    /// The element type a chunk is stored in: `dtype`, or `prefix_dtype` for prefix-cache chunks.
    pub fn dtype_for(&self, kv: &ChunkKv) -> KvDtype {
        if kv.rotated_at.is_some() { self.prefix_dtype } else { self.dtype }
    }

    /// Payload bytes of a compositional-reuse chunk of `tokens` tokens, with its hidden states.
    pub fn payload_len(&self, tokens: usize) -> usize {
        self.payload_len_as(tokens, self.dtype, true)
    }

    fn payload_len_as(&self, tokens: usize, dtype: KvDtype, hidden: bool) -> usize {
        let width = 2 * self.layers as usize * self.kv_dim() + if hidden { self.hidden as usize } else { 0 };
        HEADER_LEN + tokens * 4 + tokens * width * dtype.size() + TRAILER_LEN
    }
}

/// Why a payload was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PayloadError {
    #[error("payload too short ({0} bytes)")]
    Short(usize),
    #[error("bad magic")]
    Magic,
    #[error("unsupported payload version {0}")]
    Version(u16),
    #[error("payload belongs to another chunk")]
    Key,
    #[error("payload of another model or layout")]
    Layout,
    #[error("payload length {found} does not match its header ({expected})")]
    Length { found: usize, expected: usize },
    #[error("checksum mismatch")]
    Checksum,
}

/// The fields of a header that recovery checks without reading the whole payload.
#[derive(Debug, PartialEq)]
pub struct Header {
    pub key: ChunkKey,
    pub total_len: u64,
    pub tokens: u32,
    pub dtype: KvDtype,
    /// The payload holds the tokens' hidden states.
    pub hidden: bool,
}

/// Encodes a chunk; returns the bytes and their checksum (the trailer).
/// A chunk's hidden states are kept when it has one per token of the layout's width.
pub fn encode(key: &ChunkKey, kv: &ChunkKv, layout: &Layout) -> (Vec<u8>, u32) {
    let n = kv.tokens.len();
    let dtype = layout.dtype_for(kv);
    let hidden = layout.hidden > 0 && kv.hidden.len() == n * layout.hidden as usize;
    let total = layout.payload_len_as(n, dtype, hidden);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(dtype.code());
    out.push(kv.rotated_at.is_some() as u8 | (hidden as u8) << 1);
    out.extend_from_slice(&kv.rotated_at.unwrap_or(0).to_le_bytes());
    for v in [layout.layers, layout.kv_heads, layout.head_dim, if hidden { layout.hidden } else { 0 }] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(total as u64).to_le_bytes());
    out.extend_from_slice(&key.0);
    out.extend_from_slice(&layout.model);
    out.resize(HEADER_LEN, 0);
    for t in &kv.tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for (k, v) in kv.k.iter().zip(&kv.v) {
        put_values(&mut out, k, dtype);
        put_values(&mut out, v, dtype);
    }
    if hidden {
        put_values(&mut out, &kv.hidden, dtype);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len(), total);
    (out, crc)
}

fn put_values(out: &mut Vec<u8>, values: &[f32], dtype: KvDtype) {
    match dtype {
        KvDtype::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        KvDtype::F16 => {
            let mut h = vec![f16::ZERO; values.len()];
            h.convert_from_f32_slice(values);
            h.iter().for_each(|v| out.extend_from_slice(&v.to_bits().to_le_bytes()));
        }
        KvDtype::Bf16 => {
            let mut h = vec![bf16::ZERO; values.len()];
            h.convert_from_f32_slice(values);
            h.iter().for_each(|v| out.extend_from_slice(&v.to_bits().to_le_bytes()));
        }
    }
}

/// Reads the fixed header fields (no checksum: that needs the whole payload).
pub fn header(bytes: &[u8], layout: &Layout) -> Result<Header, PayloadError> {
    if bytes.len() < HEADER_LEN {
        return Err(PayloadError::Short(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(PayloadError::Magic);
    }
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let version = u16_at(8);
    if version != VERSION {
        return Err(PayloadError::Version(version));
    }
    let dtype =
        KvDtype::from_code(bytes[10]).filter(|&d| d == layout.dtype || d == layout.prefix_dtype || d == KvDtype::F32);
    let hidden = bytes[11] & 2 != 0;
    let same_layout = u16_at(16) == layout.layers
        && u16_at(18) == layout.kv_heads
        && u16_at(20) == layout.head_dim
        && u16_at(22) == if hidden { layout.hidden } else { 0 }
        && bytes[11] & !3 == 0
        && bytes[72..104] == layout.model;
    let (true, Some(dtype)) = (same_layout, dtype) else {
        return Err(PayloadError::Layout);
    };
    let tokens = u32_at(24);
    let total_len = u64::from_le_bytes(bytes[32..40].try_into().unwrap());
    let expected = layout.payload_len_as(tokens as usize, dtype, hidden) as u64;
    if total_len != expected {
        return Err(PayloadError::Length { found: total_len as usize, expected: expected as usize });
    }
    Ok(Header { key: ChunkKey(bytes[40..72].try_into().unwrap()), total_len, tokens, dtype, hidden })
}

/// Decodes and verifies a whole payload read for `key`. A prefix-cache chunk's `parent` is
/// not part of the payload (the disk index keeps it), so it comes back `None` here.
pub fn decode(bytes: &[u8], key: &ChunkKey, layout: &Layout) -> Result<ChunkKv, PayloadError> {
    let h = header(bytes, layout)?;
    if h.key != *key {
        return Err(PayloadError::Key);
    }
    if bytes.len() as u64 != h.total_len {
        return Err(PayloadError::Length { found: bytes.len(), expected: h.total_len as usize });
    }
    let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    if crc32fast::hash(body) != u32::from_le_bytes(trailer.try_into().unwrap()) {
        return Err(PayloadError::Checksum);
    }
    let n = h.tokens as usize;
    let rotated_at = (bytes[11] & 1 == 1).then(|| u32::from_le_bytes(bytes[12..16].try_into().unwrap()));
    let tokens = body[HEADER_LEN..HEADER_LEN + n * 4]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let per = n * layout.kv_dim();
    let width = per * h.dtype.size();
    let mut at = HEADER_LEN + n * 4;
    let (mut k, mut v) = (Vec::with_capacity(layout.layers as usize), Vec::with_capacity(layout.layers as usize));
    for _ in 0..layout.layers {
        k.push(get_values(&body[at..at + width], h.dtype));
        v.push(get_values(&body[at + width..at + 2 * width], h.dtype));
        at += 2 * width;
    }
    let hidden = match h.hidden {
        true => get_values(&body[at..at + n * layout.hidden as usize * h.dtype.size()], h.dtype),
        false => Vec::new(),
    };
    Ok(ChunkKv { tokens, rotated_at, parent: None, namespace: Default::default(), k, v, hidden })
}

/// The token ids of the payload for `key`, from its header and token section alone (no
/// checksum: that needs the whole payload).
pub fn tokens(bytes: &[u8], key: &ChunkKey, layout: &Layout) -> Result<Vec<u32>, PayloadError> {
    let h = header(bytes, layout)?;
    if h.key != *key {
        return Err(PayloadError::Key);
    }
    let end = HEADER_LEN + 4 * h.tokens as usize;
    let section = bytes.get(HEADER_LEN..end).ok_or(PayloadError::Short(bytes.len()))?;
    Ok(section.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect())
}

fn get_values(bytes: &[u8], dtype: KvDtype) -> Vec<f32> {
    match dtype {
        KvDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        KvDtype::F16 => {
            let h: Vec<f16> = bytes.chunks_exact(2).map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect();
            let mut out = vec![0.0; h.len()];
            h.convert_to_f32_slice(&mut out);
            out
        }
        KvDtype::Bf16 => {
            let h: Vec<bf16> =
                bytes.chunks_exact(2).map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect();
            let mut out = vec![0.0; h.len()];
            h.convert_to_f32_slice(&mut out);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize, layout: &Layout) -> ChunkKv {
        let d = layout.kv_dim();
        let vals = |s: f32| (0..n * d).map(|i| (i as f32 * 0.37 + s).sin()).collect::<Vec<f32>>();
        ChunkKv {
            tokens: (0..n as u32).collect(),
            rotated_at: None,
            parent: None,
            namespace: Default::default(),
            k: (0..layout.layers).map(|l| vals(l as f32)).collect(),
            v: (0..layout.layers).map(|l| vals(-(l as f32))).collect(),
            hidden: (0..n * layout.hidden as usize).map(|i| (i as f32 * 0.29 + 0.5).cos()).collect(),
        }
    }

    #[test]
    fn round_trips_in_every_dtype() {
        for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
            let layout = Layout::new("model", 3, 2, 4, 5, dtype);
            let key = ChunkKey([7; 32]);
            let mut kv = chunk(5, &layout);
            kv.k.iter_mut().chain(kv.v.iter_mut()).chain([&mut kv.hidden]).for_each(|l| dtype.round(l));
            let (bytes, _) = encode(&key, &kv, &layout);
            assert_eq!(bytes.len(), layout.payload_len(5));
            assert_eq!(decode(&bytes, &key, &layout).unwrap(), kv, "{dtype:?}: rounded values survive exactly");
        }
    }

    #[test]
    fn prefix_chunks_stay_exact_in_f32() {
        let layout = Layout::new("model", 2, 1, 4, 5, KvDtype::F16);
        let key = ChunkKey([3; 32]);
        let mut kv = chunk(5, &layout);
        kv.rotated_at = Some(17);
        let (bytes, _) = encode(&key, &kv, &layout);
        assert_eq!(bytes.len(), layout.payload_len_as(5, KvDtype::F32, true));
        assert_eq!(decode(&bytes, &key, &layout).unwrap(), kv, "not rounded");
    }

    #[test]
    fn hidden_states_are_optional_and_of_the_layouts_width() {
        let layout = Layout::new("model", 2, 1, 4, 5, KvDtype::F32);
        let key = ChunkKey([4; 32]);
        let mut kv = chunk(3, &layout);
        kv.hidden.clear();
        let (bytes, _) = encode(&key, &kv, &layout);
        assert_eq!(bytes.len(), layout.payload_len_as(3, KvDtype::F32, false));
        assert_eq!(decode(&bytes, &key, &layout).unwrap(), kv, "a chunk without states comes back without");
        let with = encode(&key, &chunk(3, &layout), &layout).0;
        assert_eq!(with.len(), layout.payload_len(3));
        let wider = Layout::new("model", 2, 1, 4, 6, KvDtype::F32);
        assert_eq!(decode(&with, &key, &wider), Err(PayloadError::Layout));
        assert!(decode(&bytes, &key, &wider).is_ok(), "no states: the width does not matter");
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let layout = Layout::new("model", 2, 1, 4, 5, KvDtype::F16);
        let key = ChunkKey([1; 32]);
        let (bytes, _) = encode(&key, &chunk(3, &layout), &layout);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode(&b, &key, &layout).is_err(), "flip at byte {i} went unnoticed");
        }
        assert!(decode(&bytes[..bytes.len() - 1], &key, &layout).is_err(), "a torn payload");
        assert_eq!(decode(&bytes, &ChunkKey([2; 32]), &layout), Err(PayloadError::Key));
        let other = Layout::new("other model", 2, 1, 4, 5, KvDtype::F16);
        assert_eq!(decode(&bytes, &key, &other), Err(PayloadError::Layout));
    }
}
