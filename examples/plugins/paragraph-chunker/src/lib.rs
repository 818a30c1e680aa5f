//! An example `chunker`: one chunk per paragraph, long paragraphs split at 2 × target.
//!
//! Retrieved passages are paragraphs, so a chunk that is exactly a paragraph is found again
//! whenever that paragraph comes back, whatever surrounds it. A paragraph ends with a token
//! whose text contains "\n\n"; the next chunk starts right after it. Each chat message
//! (segment) is cut on its own, and a chunk never grows past 2 × `target-tokens`.

use std::ops::Range;

// Generates the `Guest` trait for the `chunker` world, the `export!` macro, and the world's
// types (`PluginInfo`, `ChunkRequest`). `path` points at kvgate's `wit/` directory.
wit_bindgen::generate!({ path: "../../../wit", world: "chunker" });

/// The policy: cut points, strictly ascending, in `1..tokens`; `offsets[i]` is where token `i`
/// starts in `text`.
pub fn cut(tokens: usize, offsets: &[u32], text: &str, segment_starts: &[u32], target_tokens: u32) -> Vec<u32> {
    let cap = 2 * target_tokens.max(1) as usize;
    let mut cuts = Vec::new();
    for segment in segments(tokens, segment_starts) {
        let mut chunk_start = segment.start;
        if chunk_start > 0 {
            cuts.push(chunk_start as u32);
        }
        for t in segment.clone() {
            let after_break = t > chunk_start && ends_paragraph(t - 1, offsets, text.as_bytes());
            if after_break || t - chunk_start == cap {
                cuts.push(t as u32);
                chunk_start = t;
            }
        }
    }
    cuts
}

/// Whether token `t`'s text (from its offset to the next token's) contains "\n\n".
fn ends_paragraph(t: usize, offsets: &[u32], text: &[u8]) -> bool {
    let at = |i: usize| offsets.get(i).map_or(text.len(), |&o| (o as usize).min(text.len()));
    let (from, to) = (at(t), at(t + 1));
    from < to && text[from..to].windows(2).any(|w| w == b"\n\n")
}

/// The chat messages: non-empty ranges covering `0..tokens`.
fn segments(tokens: usize, segment_starts: &[u32]) -> Vec<Range<usize>> {
    let mut bounds: Vec<usize> = segment_starts.iter().map(|&s| s as usize).filter(|&s| s < tokens).collect();
    bounds.extend([0, tokens]);
    bounds.sort_unstable();
    bounds.dedup();
    bounds.windows(2).map(|w| w[0]..w[1]).collect()
}

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }

    /// Run once by the host when it loads the component; an `Err` keeps the old chunker.
    fn self_test() -> Result<(), String> {
        // Tokens "a", "\n\n", "b", "c": a paragraph break after token 1.
        let got = cut(4, &[0, 1, 3, 4], "a\n\nbc", &[0], 16);
        if got == [2] { Ok(()) } else { Err(format!("canned cut: {got:?}, want [2]")) }
    }

    fn cut(request: ChunkRequest) -> Vec<u32> {
        cut(request.tokens.len(), &request.offsets, &request.text, &request.segment_starts, request.target_tokens)
    }
}

export!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets and text of tokens given as strings.
    fn prompt(tokens: &[&str]) -> (Vec<u32>, String) {
        let mut offsets = Vec::new();
        let mut text = String::new();
        for t in tokens {
            offsets.push(text.len() as u32);
            text += t;
        }
        (offsets, text)
    }

    #[test]
    fn cuts_after_each_paragraph_break_and_at_segments() {
        let tokens = ["One", " two", ".\n\n", "Three", "\n\n", "Four", " five", "Six", "\n\n", "Seven"];
        let (offsets, text) = prompt(&tokens);
        assert_eq!(cut(tokens.len(), &offsets, &text, &[0], 100), vec![3, 5, 9]);
        // A segment start is a cut, and paragraphs count again from there.
        assert_eq!(cut(tokens.len(), &offsets, &text, &[0, 7], 100), vec![3, 5, 7, 9]);
    }

    #[test]
    fn long_paragraphs_are_capped_at_twice_the_target() {
        let tokens = ["w"; 10];
        let (offsets, text) = prompt(&tokens);
        assert_eq!(cut(10, &offsets, &text, &[0], 2), vec![4, 8]);
        assert_eq!(cut(10, &offsets, &text, &[0, 3], 1), vec![2, 3, 5, 7, 9]);
    }

    #[test]
    fn never_cuts_outside_the_prompt() {
        let (offsets, text) = prompt(&["\n\n", "\n\n"]);
        assert_eq!(cut(2, &offsets, &text, &[0], 8), vec![1]);
        assert_eq!(cut(0, &[], "", &[0], 8), Vec::<u32>::new());
        assert_eq!(cut(1, &offsets, &text, &[0, 5], 0), Vec::<u32>::new());
    }

    #[test]
    fn self_test_passes() {
        assert_eq!(Component::self_test(), Ok(()));
    }
}
