//! The tokenizer, built from GGUF metadata.
//!
//! Owns text ⇄ token ids for `gpt2`-style (byte-level BPE) vocabularies. The
//! pre-tokenizer follows llama.cpp for SmolLM2's `smollm` pre-type: digits are
//! split one by one and byte-level BPE runs with no prefix space. Control and
//! user-defined tokens (`<|im_start|>`, `<|im_end|>`, …) are parsed as
//! specials wherever they appear, as in a rendered chat template.
//!
//! Decoding is ours, not the `tokenizers` crate's: streaming needs bytes per
//! token so that a UTF-8 character split across tokens is only emitted whole.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer as HfTokenizer};

use super::EngineError;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Token texts that end a turn for chat models whose GGUF `eos` is something else
/// (SmolLM2's `eos_token_id` is `<|im_start|>`, yet its turns end with `<|im_end|>`).
const END_OF_GENERATION_TEXTS: &[&str] =
    &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>"];

/// Text ⇄ ids for one model.
pub struct Tokenizer {
    /// Does the BPE work on the text between specials.
    inner: HfTokenizer,
    /// Bytes each id stands for (specials: their literal text).
    token_bytes: Vec<Vec<u8>>,
    /// Ids that are control/user-defined tokens.
    is_special: Vec<bool>,
    /// Ids that end generation.
    end_of_generation: Vec<u32>,
    bos: Option<u32>,
    add_bos: bool,
    bos_text: String,
    eos_text: String,
}

/// One encoded text: ids and, per id, the byte range of the text it came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

fn metadata<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, EngineError> {
    ct.metadata.get(key).ok_or_else(|| EngineError::Model(format!("GGUF metadata has no `{key}`")))
}

fn bad(key: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Model(format!("GGUF metadata `{key}`: {e}"))
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, EngineError> {
        let model = metadata(ct, "tokenizer.ggml.model")?.to_string().map_err(|e| bad("tokenizer.ggml.model", e))?;
        if model != "gpt2" {
            return Err(EngineError::Model(format!(
                "tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"
            )));
        }
        let pre = ct.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let tokens: Vec<String> = metadata(ct, "tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(|e| bad("tokenizer.ggml.tokens", e))?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<Result<_, _>>()
            .map_err(|e| bad("tokenizer.ggml.tokens", e))?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| bad("tokenizer.ggml.token_type", e))?
                .iter()
                .map(|v| v.to_i32())
                .collect::<Result<_, _>>()
                .map_err(|e| bad("tokenizer.ggml.token_type", e))?,
            None => vec![1; tokens.len()],
        };
        let merges: Vec<(String, String)> = metadata(ct, "tokenizer.ggml.merges")?
            .to_vec()
            .map_err(|e| bad("tokenizer.ggml.merges", e))?
            .iter()
            .map(|v| {
                let m = v.to_string().map_err(|e| bad("tokenizer.ggml.merges", e))?;
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad("tokenizer.ggml.merges", format!("merge `{m}` has no space")))
            })
            .collect::<Result<_, _>>()?;
        let id_of = |key: &str| ct.metadata.get(key).and_then(|v| v.to_u32().ok());
        let bos = id_of("tokenizer.ggml.bos_token_id");
        let eos = id_of("tokenizer.ggml.eos_token_id");
        let eot = id_of("tokenizer.ggml.eot_token_id");
        let add_bos = ct.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        Self::new(&tokens, &types, merges, &pre, bos, eos, eot, add_bos)
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        tokens: &[String],
        types: &[i32],
        merges: Vec<(String, String)>,
        pre: &str,
        bos: Option<u32>,
        eos: Option<u32>,
        eot: Option<u32>,
        add_bos: bool,
    ) -> Result<Self, EngineError> {
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| EngineError::Model(format!("BPE vocabulary: {e}")))?;
        let mut inner = HfTokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, false, true);
        // llama.cpp's `smollm` (and `starcoder`, `qwen2`, …) pre-types split digits one by one;
        // the plain gpt2 regex keeps runs of digits together.
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" | "starcoder" | "refact" | "command-r" | "qwen2" | "deepseek-llm" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            _ => byte_level.into(),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));

        let is_special: Vec<bool> = (0..tokens.len())
            .map(|i| matches!(types.get(i), Some(&TOKEN_TYPE_CONTROL) | Some(&TOKEN_TYPE_USER_DEFINED)))
            .collect();
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&is_special)
            .filter(|(t, s)| **s && !t.is_empty())
            .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        inner.add_special_tokens(&specials);

        let unicode_to_byte = byte_level_decoder();
        let token_bytes = tokens
            .iter()
            .zip(&is_special)
            .map(|(t, &special)| {
                if special {
                    return t.as_bytes().to_vec();
                }
                t.chars()
                    .map(|c| unicode_to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    // A token that is not byte-level encoded stands for its own text.
                    .unwrap_or_else(|| t.as_bytes().to_vec())
            })
            .collect();

        let mut end_of_generation: Vec<u32> = eos.into_iter().chain(eot).collect();
        for (i, t) in tokens.iter().enumerate() {
            if is_special[i] && END_OF_GENERATION_TEXTS.contains(&t.as_str()) {
                end_of_generation.push(i as u32);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        let text_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned().unwrap_or_default();
        Ok(Self {
            inner,
            token_bytes,
            is_special,
            end_of_generation,
            bos,
            add_bos,
            bos_text: text_of(bos),
            eos_text: text_of(eos),
        })
    }

    /// Encodes `text`, parsing special tokens; no BOS is added.
    ///
    /// Offsets are the running sum of each token's bytes: byte-level BPE has no normaliser,
    /// so the tokens' bytes spell the text exactly (the tokenizer test checks the round trip).
    pub fn encode(&self, text: &str) -> Result<Encoded, EngineError> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let ids = enc.get_ids().to_vec();
        let mut at = 0;
        let offsets = ids
            .iter()
            .map(|&id| {
                let start = at;
                at += self.token_bytes(id).len();
                (start, at)
            })
            .collect();
        Ok(Encoded { ids, offsets })
    }

    /// Encodes a raw completion prompt the way llama.cpp's server does: a BOS first when the
    /// model asks for one and the text does not already begin with it.
    pub fn encode_prompt(&self, text: &str) -> Result<Encoded, EngineError> {
        let mut enc = self.encode(text)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            if enc.ids.first() != Some(&bos) {
                enc.ids.insert(0, bos);
                enc.offsets.insert(0, (0, 0));
            }
        }
        Ok(enc)
    }

    /// The bytes one token stands for.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Decodes ids to text; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i).iter().copied()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether `id` ends a generated turn.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// Whether `id` is a control token (not text).
    pub fn is_special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Text of the BOS token, for chat templates.
    pub fn bos_text(&self) -> &str {
        &self.bos_text
    }

    /// Text of the EOS token, for chat templates.
    pub fn eos_text(&self) -> &str {
        &self.eos_text
    }
}

/// Turns the bytes of a stream of tokens into text, holding back an incomplete
/// UTF-8 character until the token that completes it arrives.
#[derive(Default)]
pub struct TextStream {
    pending: Vec<u8>,
}

impl TextStream {
    /// Adds one token's bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Invalid (not merely incomplete) bytes: emit them lossily rather than stall.
            Err(_) => self.pending.len(),
        };
        let out: Vec<u8> = self.pending.drain(..valid).collect();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Whatever is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let out = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// GPT-2's byte-level alphabet, reversed: the printable character → the byte it encodes.
fn byte_level_decoder() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = printable.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable.into_iter().zip(chars).map(|(b, c)| (char::from_u32(c).expect("valid char"), b as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_covers_every_byte_once() {
        let map = byte_level_decoder();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'a'], b'a');
    }

    #[test]
    fn text_stream_holds_back_a_split_character() {
        let mut s = TextStream::default();
        let e = "é".as_bytes();
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..]), "é");
        assert_eq!(s.push(b"ab"), "ab");
        assert_eq!(s.push(&[0xE2, 0x82]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }
}
