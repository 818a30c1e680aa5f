//! kvgate's default `chunker`: content-defined cuts (FastCDC) that prefer paragraph breaks.
//!
//! Compositional reuse finds a chunk by hashing its tokens, so a chunk is reused only if the
//! same passage is cut the same way in every prompt it appears in. Fixed-size cuts achieve that
//! only while the passage starts where it started before: one token inserted near the top of a
//! message shifts every later cut and nothing after it is found again. Content-defined chunking
//! places cuts where the content says so (a rolling hash over the last few tokens hits a mask),
//! so an edit moves only the cuts near it and the rest of the passage is cut as before.
//!
//! How a prompt is cut:
//! - Each segment (chat message, `[segment-starts[i], segment-starts[i+1])`) is cut on its own,
//!   so a passage's cuts depend only on its tokens, not on where it sits or what precedes it.
//!   Segment starts are returned as cuts as well (the host would add them anyway).
//! - Inside a segment, FastCDC 2020 runs over the token ids as little-endian bytes with
//!   min/avg/max chunk sizes of target/4, target and 2×target tokens. FastCDC needs an
//!   average of at least 256 bytes and a maximum of at least 1024, so for targets under 128
//!   tokens each token's 4 bytes are repeated (see [`Sizes`]) rather than clamping the sizes,
//!   which would silently turn small targets into big chunks.
//! - Each FastCDC cut is snapped to the nearest token boundary and then moved to just after a
//!   paragraph break (a token whose text contains "\n\n") if one lies within target/8 tokens:
//!   a chunk that ends with a paragraph is more likely to recur on its own (retrieved passages
//!   are paragraphs) and keeps the text a selector sees in one piece.
//! - The next chunk is hashed from the final cut, so min/max hold for the chunks returned.
//!
//! Layout: [`cut`] is the policy as a plain function over the request's fields (tested
//! natively), [`cut_passage`] cuts one segment, [`check_cuts`] is the WIT contract that
//! `self-test` and the tests check; `Component` only adapts the WIT types.

use std::ops::Range;

use fastcdc::v2020;

// Brings `Guest`, `export!` and the world's `use`d types (`PluginInfo`, `ChunkRequest`) into scope.
wit_bindgen::generate!({ path: "../../wit", world: "chunker" });

/// Cut points for a prompt: token indices where a new chunk begins, strictly ascending, each in
/// `1..tokens.len()`, including every segment start in that range.
///
/// `offsets[i]` is the byte in `text` where token `i` starts; offsets or segment starts that are
/// out of range or out of order are tolerated (they only cost the paragraph preference).
pub fn cut(tokens: &[u32], offsets: &[u32], text: &str, segment_starts: &[u32], target_tokens: u32) -> Vec<u32> {
    let breaks = paragraph_breaks(tokens.len(), offsets, text.as_bytes());
    let mut cuts = Vec::new();
    for segment in segments(tokens.len(), segment_starts) {
        if segment.start > 0 {
            cuts.push(segment.start as u32);
        }
        let within = cut_passage(&tokens[segment.clone()], &breaks[segment.clone()], target_tokens);
        cuts.extend(within.into_iter().map(|c| (segment.start + c) as u32));
    }
    cuts
}

/// Cuts one passage: offsets relative to its start, strictly ascending, in `1..passage.len()`.
/// `breaks[i]` (same length as `passage`) says token `i`'s text holds a paragraph break.
pub fn cut_passage(passage: &[u32], breaks: &[bool], target_tokens: u32) -> Vec<usize> {
    let sizes = Sizes::for_target(target_tokens);
    let bytes: Vec<u8> = passage.iter().flat_map(|t| t.to_le_bytes().repeat(sizes.token_repeats)).collect();
    let cdc = v2020::FastCDC::new(&bytes, sizes.min, sizes.avg, sizes.max);
    let bytes_per_token = 4 * sizes.token_repeats;
    let reach = (target_tokens / 8) as usize;
    let mut cuts = Vec::new();
    let mut start = 0;
    while start < passage.len() {
        let (_, end) = cdc.cut(start * bytes_per_token, (passage.len() - start) * bytes_per_token);
        let snapped = (end + bytes_per_token / 2) / bytes_per_token;
        if snapped >= passage.len() {
            break;
        }
        let cut = after_nearby_break(snapped.max(start + 1), start, passage.len(), breaks, reach);
        cuts.push(cut);
        start = cut;
    }
    cuts
}

/// FastCDC's sizes in bytes for a target in tokens, and how often each token's 4 bytes repeat
/// so that those sizes stay within FastCDC's limits (average ≥ 256 B, maximum ≥ 1024 B).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizes {
    /// Copies of a token's 4 little-endian bytes in the hashed stream (1 for targets ≥ 128).
    pub token_repeats: usize,
    /// FastCDC's minimum, average and maximum chunk sizes, bytes (target/4, target, 2×target).
    pub min: u32,
    /// See `min`.
    pub avg: u32,
    /// See `min`.
    pub max: u32,
}

impl Sizes {
    /// The sizes for `target_tokens` (0 is taken as 1).
    pub fn for_target(target_tokens: u32) -> Self {
        let target = target_tokens.max(1) as u64;
        // 2 × target × 4 × repeats ≥ 1024 makes every size reach FastCDC's floor.
        let token_repeats = 128u64.div_ceil(target);
        let avg = target * 4 * token_repeats;
        let clamp = |v: u64, lo: u32, hi: u32| v.clamp(lo as u64, hi as u64) as u32;
        Self {
            token_repeats: token_repeats as usize,
            min: clamp(avg / 4, v2020::MINIMUM_MIN, v2020::MINIMUM_MAX),
            avg: clamp(avg, v2020::AVERAGE_MIN, v2020::AVERAGE_MAX),
            max: clamp(avg * 2, v2020::MAXIMUM_MIN, v2020::MAXIMUM_MAX),
        }
    }
}

/// `cut`, or the cut just after the paragraph break closest to it within `reach` tokens
/// (ties to the earlier one), keeping the cut in `start+1..len`.
fn after_nearby_break(cut: usize, start: usize, len: usize, breaks: &[bool], reach: usize) -> usize {
    let candidates = cut.saturating_sub(reach).max(start + 1)..=(cut + reach).min(len - 1);
    candidates.filter(|&c| breaks[c - 1]).min_by_key(|&c| (c.abs_diff(cut), c)).unwrap_or(cut)
}

/// Per token: does its text (from its offset to the next token's) contain "\n\n"?
fn paragraph_breaks(len: usize, offsets: &[u32], text: &[u8]) -> Vec<bool> {
    (0..len)
        .map(|i| {
            let at = |j: usize| offsets.get(j).map_or(text.len(), |&o| (o as usize).min(text.len()));
            let (from, to) = (at(i), at(i + 1));
            from < to && text[from..to].windows(2).any(|w| w == b"\n\n")
        })
        .collect()
}

/// The segments of a prompt of `len` tokens: non-empty ranges covering `0..len`.
fn segments(len: usize, segment_starts: &[u32]) -> Vec<Range<usize>> {
    let mut bounds: Vec<usize> = segment_starts.iter().map(|&s| s as usize).filter(|&s| s > 0 && s < len).collect();
    bounds.extend([0, len]);
    bounds.sort_unstable();
    bounds.dedup();
    bounds.windows(2).map(|w| w[0]..w[1]).collect()
}

/// The WIT contract of `cut`: strictly ascending, each in `1..len`.
pub fn check_cuts(cuts: &[u32], len: usize) -> Result<(), String> {
    if let Some(&c) = cuts.iter().find(|&&c| c == 0 || c as usize >= len) {
        return Err(format!("cut {c} outside 1..{len}"));
    }
    if let Some(w) = cuts.windows(2).find(|w| w[0] >= w[1]) {
        return Err(format!("cuts not strictly ascending: {} then {}", w[0], w[1]));
    }
    Ok(())
}

struct Component;

impl Guest for Component {
    fn info() -> PluginInfo {
        PluginInfo { name: env!("CARGO_PKG_NAME").into(), version: env!("CARGO_PKG_VERSION").into() }
    }

    /// A passage behind two different openings must be cut the same way, within the contract.
    fn self_test() -> Result<(), String> {
        let passage: Vec<u32> = (0..400u32).map(|i| i.wrapping_mul(2_654_435_761) % 50_000).collect();
        let mut relative_cuts = Vec::new();
        for opening in [&[1u32, 2, 3][..], &[9; 40][..]] {
            let tokens = [opening, &passage].concat();
            let starts = [0, opening.len() as u32];
            let cuts = cut(&tokens, &[], "", &starts, 32);
            check_cuts(&cuts, tokens.len())?;
            if !cuts.contains(&starts[1]) {
                return Err(format!("segment start {} not cut", starts[1]));
            }
            relative_cuts.push(cuts.iter().filter(|&&c| c > starts[1]).map(|&c| c - starts[1]).collect::<Vec<_>>());
        }
        if relative_cuts[0] != relative_cuts[1] || relative_cuts[0].len() < 3 {
            return Err(format!("passage cut differently by position: {relative_cuts:?}"));
        }
        Ok(())
    }

    fn cut(request: ChunkRequest) -> Vec<u32> {
        cut(&request.tokens, &request.offsets, &request.text, &request.segment_starts, request.target_tokens)
    }
}

export!(Component);

#[cfg(test)]
mod tests {
    use super::*;

    /// Token ids of a deterministic pseudo-random passage (a vocabulary of 50k).
    fn passage(seed: u64, len: usize) -> Vec<u32> {
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((state >> 33) % 50_000) as u32
            })
            .collect()
    }

    /// A prompt of segments, with the text of token `t` being "w{t} " (or "\n\n" where `is_break`).
    fn prompt(segments: &[&[u32]], is_break: impl Fn(u32) -> bool) -> (Vec<u32>, Vec<u32>, String, Vec<u32>) {
        let (mut tokens, mut offsets, mut text, mut starts) = (vec![], vec![], String::new(), vec![]);
        for segment in segments {
            starts.push(tokens.len() as u32);
            for &t in *segment {
                offsets.push(text.len() as u32);
                text += &if is_break(t) { "\n\n".to_string() } else { format!("w{t} ") };
                tokens.push(t);
            }
        }
        (tokens, offsets, text, starts)
    }

    fn cuts_of(segments: &[&[u32]], target: u32, is_break: impl Fn(u32) -> bool) -> (Vec<u32>, usize) {
        let (tokens, offsets, text, starts) = prompt(segments, is_break);
        let cuts = cut(&tokens, &offsets, &text, &starts, target);
        check_cuts(&cuts, tokens.len()).unwrap();
        (cuts, tokens.len())
    }

    /// The cuts inside `range`, relative to its start.
    fn within(cuts: &[u32], range: Range<usize>) -> Vec<u32> {
        cuts.iter()
            .filter(|&&c| range.start < c as usize && (c as usize) < range.end)
            .map(|&c| c - range.start as u32)
            .collect()
    }

    #[test]
    fn a_passage_is_cut_the_same_wherever_it_appears() {
        let p = passage(1, 3000);
        let no_breaks = |_| false;
        for target in [16, 64, 256] {
            let alone = within(&cuts_of(&[&p], target, no_breaks).0, 0..p.len());
            let (a, _) = cuts_of(&[&passage(2, 37), &p], target, no_breaks);
            let (b, _) = cuts_of(&[&[5, 5, 5], &passage(3, 500), &p, &passage(4, 90)], target, no_breaks);
            assert_eq!(within(&a, 37..37 + p.len()), alone, "target {target}");
            assert_eq!(within(&b, 503..503 + p.len()), alone, "target {target}");
            // Content-defined, not fixed-size: the chunks vary in length around the target.
            let lengths: Vec<u32> = alone.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(lengths.len() as u32 >= 3000 / target / 2, "target {target}: {lengths:?}");
            assert!(lengths.iter().any(|&l| l != lengths[0]), "target {target}: {lengths:?}");
        }
    }

    #[test]
    fn same_passage_with_the_same_paragraph_breaks_is_cut_the_same() {
        let p = passage(5, 2000);
        let is_break = |t: u32| t.is_multiple_of(29);
        let alone = within(&cuts_of(&[&p], 128, is_break).0, 0..p.len());
        for opening in [11, 301] {
            let (after, _) = cuts_of(&[&passage(6, opening), &p], 128, is_break);
            assert_eq!(within(&after, opening..opening + p.len()), alone, "after {opening} tokens");
        }
    }

    #[test]
    fn an_insertion_moves_only_the_cuts_near_it() {
        let p = passage(7, 4000);
        let mut edited = p.clone();
        edited.splice(1000..1000, [11, 12, 13]);
        let before = within(&cuts_of(&[&p], 64, |_| false).0, 0..p.len());
        let after = within(&cuts_of(&[&edited], 64, |_| false).0, 0..edited.len());
        let early = |c: &Vec<u32>| c.iter().copied().filter(|&c| c < 1000).collect::<Vec<_>>();
        assert_eq!(early(&before), early(&after));
        // Past the edit the cuts fall back in step (shifted by the 3 tokens) within a few chunks.
        let late =
            |c: &Vec<u32>, shift: u32| c.iter().filter(|&&c| c > 1400 + shift).map(|&c| c - shift).collect::<Vec<_>>();
        assert_eq!(late(&before, 0), late(&after, 3));
    }

    #[test]
    fn cuts_move_to_just_after_a_nearby_paragraph_break() {
        let p = passage(8, 2000);
        let plain = within(&cuts_of(&[&p], 128, |_| false).0, 0..p.len());
        // Make the token 5 before the first cut a paragraph break (within 128/8 = 16 tokens).
        let first = plain[0] as usize;
        let marked = p[first - 5];
        let (moved, _) = cuts_of(&[&p], 128, |t| t == marked);
        let first_break = p.iter().position(|&t| t == marked).unwrap();
        assert_eq!(first_break, first - 5, "the marker token must not occur earlier");
        assert_eq!(moved[0] as usize, first - 4);
        // A break farther than target/8 leaves the cut where FastCDC put it.
        let far = p[first - 40];
        if p[..first - 40].iter().all(|&t| t != far) {
            assert_eq!(cuts_of(&[&p], 128, |t| t == far).0[0], plain[0]);
        }
    }

    #[test]
    fn chunk_sizes_stay_near_the_target() {
        for target in [1, 2, 7, 16, 64, 256, 1000] {
            let p = passage(9, 5000);
            let (cuts, len) = cuts_of(&[&p], target, |t| t.is_multiple_of(17));
            let bounds: Vec<u32> = [0].into_iter().chain(cuts).chain([len as u32]).collect();
            let reach = target / 8;
            for w in bounds.windows(2) {
                assert!(w[1] - w[0] <= 2 * target.max(1) + reach, "target {target}: chunk {w:?}");
            }
            let mean = len as f64 / (bounds.len() - 1) as f64;
            assert!(mean >= target as f64 / 4.0 && mean <= 2.0 * target as f64 + 1.0, "target {target}: mean {mean}");
        }
    }

    #[test]
    fn contract_holds_on_odd_input() {
        let p = passage(10, 700);
        let cases: [(&[u32], &[u32], u32); 8] = [
            (&[], &[0], 64),
            (&p[..1], &[0], 64),
            (&p[..2], &[0, 1], 0),
            (&p, &[0], 0),
            (&p, &[], 32),
            (&p, &[0, 0, 699, 700, 5_000, 3, 3], 16),
            (&p, &[0, 350], u32::MAX),
            (&p, &(0..700).collect::<Vec<u32>>(), 8),
        ];
        for (tokens, starts, target) in cases {
            let cuts = cut(tokens, &[7, 3, 1_000_000], "a\n\nb", starts, target);
            check_cuts(&cuts, tokens.len()).unwrap_or_else(|e| panic!("{e}: {starts:?}, target {target}"));
            for &s in starts.iter().filter(|&&s| s > 0 && (s as usize) < tokens.len()) {
                assert!(cuts.contains(&s), "segment start {s} missing");
            }
        }
    }

    #[test]
    fn check_cuts_rejects_broken_answers() {
        assert!(check_cuts(&[1, 5, 9], 10).is_ok());
        assert!(check_cuts(&[0, 5], 10).is_err());
        assert!(check_cuts(&[5, 10], 10).is_err());
        assert!(check_cuts(&[5, 5], 10).is_err());
        assert!(check_cuts(&[6, 5], 10).is_err());
    }

    #[test]
    fn self_test_passes() {
        assert_eq!(Component::self_test(), Ok(()));
    }
}
