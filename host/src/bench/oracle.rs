//! What a perfect cache could reuse from a trace: the yardsticks of `kvgate bench rag`.
//!
//! - The **oracle hit rate** of a prompt: the share of its tokens lying in runs of at least
//!   `min_span` tokens that appeared in any earlier prompt (what a perfect matcher over an
//!   unbounded store could reuse).
//! - The **prefix oracle**: the longest prefix it shares with any earlier prompt, to the
//!   token (what a perfect prefix cache could reuse; llama.cpp's server with one slot keeps
//!   only the previous prompt, so it reuses at most this).
//!
//! Exact: windows are kept as token vectors, not hashes.

use std::collections::HashSet;

/// The prompts seen so far.
pub struct Oracle {
    min_span: usize,
    windows: HashSet<Vec<u32>>,
    earlier: Vec<Vec<u32>>,
}

/// What an oracle says of one prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reusable {
    pub tokens: usize,
    /// Tokens in runs of at least `min_span` seen before.
    pub spans: usize,
    /// The longest prefix shared with an earlier prompt.
    pub prefix: usize,
}

impl Oracle {
    pub fn new(min_span: usize) -> Self {
        Self { min_span: min_span.max(1), windows: HashSet::new(), earlier: Vec::new() }
    }

    /// What of `ids` was seen before; then remembers `ids`.
    pub fn observe(&mut self, ids: &[u32]) -> Reusable {
        let l = self.min_span;
        let mut covered = vec![false; ids.len()];
        if ids.len() >= l {
            for start in 0..=ids.len() - l {
                if self.windows.contains(&ids[start..start + l]) {
                    covered[start..start + l].iter_mut().for_each(|c| *c = true);
                }
            }
        }
        let prefix =
            self.earlier.iter().map(|e| e.iter().zip(ids).take_while(|(a, b)| a == b).count()).max().unwrap_or(0);
        if ids.len() >= l {
            self.windows.extend(ids.windows(l).map(<[u32]>::to_vec));
        }
        self.earlier.push(ids.to_vec());
        Reusable { tokens: ids.len(), spans: covered.iter().filter(|&&c| c).count(), prefix }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_seen_before_count_and_short_ones_do_not() {
        let mut o = Oracle::new(4);
        assert_eq!(o.observe(&[1, 2, 3, 4, 5, 6, 7, 8]), Reusable { tokens: 8, spans: 0, prefix: 0 });
        // 3..=7 is a run of 5 seen before; 1, 2 is too short; the prefix is [1, 2].
        let r = o.observe(&[1, 2, 9, 3, 4, 5, 6, 7, 0]);
        assert_eq!(r, Reusable { tokens: 9, spans: 5, prefix: 2 });
        assert_eq!(o.observe(&[1, 2, 9, 3]).prefix, 4);
    }
}
