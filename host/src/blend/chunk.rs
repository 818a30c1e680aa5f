//! Cutting a prompt into chunks and naming chunks by their content.
//!
//! The built-in cutter (the fallback of the future `chunker` plugin) cuts at every segment
//! start (chat message boundary) and every `chunk_tokens` tokens inside a segment, so a
//! message produces the same chunks wherever it appears in a prompt.

use std::ops::Range;

use sha2::{Digest, Sha256};

pub use crate::store::ChunkKey;
use crate::store::Namespace;

impl ChunkKey {
    /// Position-independent key of a chunk for compositional reuse.
    pub fn compose(model: &str, tokens: &[u32]) -> Self {
        Self::hash(model, b"compose", tokens)
    }

    /// Key of a chunk *with everything before it* (classic prefix caching): `tokens` is the
    /// whole prompt up to the end of the chunk.
    pub fn prefix(model: &str, tokens: &[u32]) -> Self {
        Self::hash(model, b"prefix", tokens)
    }

    /// The `model` argument of keys of namespace `ns` for the model with this fingerprint:
    /// the fingerprint itself in the empty namespace (so keys stay what they were before
    /// namespaces), both otherwise.
    pub fn space(fingerprint: &str, ns: &Namespace) -> String {
        match ns.name() {
            "" => fingerprint.to_string(),
            name => format!("{fingerprint}\u{0}namespace:{name}"),
        }
    }

    fn hash(model: &str, namespace: &[u8], tokens: &[u32]) -> Self {
        let mut h = Sha256::new();
        h.update(model.as_bytes());
        h.update([0]);
        h.update(namespace);
        h.update([0]);
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        Self(h.finalize().into())
    }
}

/// Cuts `n` tokens into chunks: at every segment start, and every `chunk_tokens` inside a
/// segment. Returns non-empty, contiguous ranges covering `0..n`.
pub fn fixed_cuts(n: usize, segment_starts: &[usize], chunk_tokens: usize) -> Vec<Range<usize>> {
    let chunk_tokens = chunk_tokens.max(1);
    let mut bounds: Vec<usize> = segment_starts.iter().copied().filter(|&s| s > 0 && s < n).collect();
    bounds.push(0);
    bounds.push(n);
    bounds.sort_unstable();
    bounds.dedup();
    let mut chunks = Vec::new();
    for w in bounds.windows(2) {
        let mut start = w[0];
        while start < w[1] {
            let end = (start + chunk_tokens).min(w[1]);
            chunks.push(start..end);
            start = end;
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_segments_and_every_chunk_tokens() {
        let c = fixed_cuts(25, &[0, 4, 14], 6);
        assert_eq!(c, vec![0..4, 4..10, 10..14, 14..20, 20..25]);
        assert_eq!(fixed_cuts(3, &[0, 7], 6), vec![0..3]);
    }

    #[test]
    fn the_same_segment_gets_the_same_chunks_anywhere() {
        let a = fixed_cuts(30, &[0, 10], 8);
        let b = fixed_cuts(35, &[0, 15], 8);
        let rel = |c: &[Range<usize>], s: usize| -> Vec<usize> {
            c.iter().filter(|r| r.start >= s).map(|r| r.len()).collect()
        };
        assert_eq!(rel(&a, 10), rel(&b, 15));
    }

    #[test]
    fn keys_depend_on_content_model_and_namespace() {
        assert_eq!(ChunkKey::compose("m", &[1, 2]), ChunkKey::compose("m", &[1, 2]));
        assert_ne!(ChunkKey::compose("m", &[1, 2]), ChunkKey::compose("m", &[2, 1]));
        assert_ne!(ChunkKey::compose("m", &[1, 2]), ChunkKey::compose("n", &[1, 2]));
        assert_ne!(ChunkKey::compose("m", &[1, 2]), ChunkKey::prefix("m", &[1, 2]));
        let (a, b) = (Namespace::new("a"), Namespace::new("b"));
        assert_eq!(ChunkKey::space("m", &Namespace::default()), "m");
        assert_ne!(ChunkKey::compose(&ChunkKey::space("m", &a), &[1, 2]), ChunkKey::compose("m", &[1, 2]));
        assert_ne!(
            ChunkKey::compose(&ChunkKey::space("m", &a), &[1, 2]),
            ChunkKey::compose(&ChunkKey::space("m", &b), &[1, 2])
        );
    }
}
