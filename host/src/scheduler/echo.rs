//! Scoring an echoed prompt from the hidden states its prefill knows, keeping what reused
//! chunks' rows scored for the next prompt that reuses them.
//!
//! A row read from a stored chunk whose next row comes from the chunk's next row scores the
//! same every time: its state is the chunk's, and the token it predicts is the chunk's next
//! token. [`ScoreMemo`] keeps those rows' logprobs beside the chunk they belong to (tied to
//! that very copy of the chunk: a chunk computed again, in another context, starts afresh),
//! so that scoring prompts which share passages — a harness scoring each choice after the
//! same context, RAG prompts retrieving the same documents — runs the LM head over the new
//! rows only.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use crate::blend::KnownStates;
use crate::engine::sampling::TokenLogprob;
use crate::engine::{EngineError, Model};
use crate::store::{ChunkKey, ChunkKv};

/// A row's logprob and its most likely tokens.
pub type Scored = (TokenLogprob, Vec<TokenLogprob>);

/// What the rows of stored chunks scored, within a byte budget (least recently used first out).
pub struct ScoreMemo {
    entries: HashMap<ChunkKey, Entry>,
    budget: usize,
    /// Bytes held (an estimate: the rows' vectors).
    bytes: usize,
    clock: u64,
}

struct Entry {
    /// The copy of the chunk the rows were scored from.
    chunk: Weak<ChunkKv>,
    /// How many top tokens each row keeps.
    top: usize,
    rows: Vec<Option<Scored>>,
    bytes: usize,
    used: u64,
}

impl Entry {
    /// Whether its rows are those of this copy of the chunk, with at least `top` top tokens.
    fn serves(&self, chunk: &Arc<ChunkKv>, top: usize) -> bool {
        self.top >= top && std::ptr::eq(self.chunk.as_ptr(), Arc::as_ptr(chunk))
    }
}

/// How the rows of one scoring were had.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scoring {
    /// Rows through the LM head.
    pub computed: usize,
    /// Rows taken from the memo.
    pub remembered: usize,
}

impl ScoreMemo {
    pub fn new(budget: usize) -> Self {
        Self { entries: HashMap::new(), budget, bytes: 0, clock: 0 }
    }

    /// The logprobs of `ids[from..]` (`from ≥ 1`, `states.first < from`) and the `top` most
    /// likely tokens at each, from `states`: the rows the memo holds are taken from it, the
    /// others go through the LM head, and those read from a chunk are remembered. What
    /// scoring every row through the LM head returns, bit for bit.
    pub fn score(
        &mut self,
        model: &Model,
        ids: &[u32],
        from: usize,
        states: &KnownStates,
        top: usize,
    ) -> Result<(Vec<Scored>, Scoring), EngineError> {
        let h = model.config().hidden;
        let (n, first) = (ids.len(), states.first);
        if from == 0 || from > n || first >= from || states.stored.len() != n - first {
            return Err(EngineError::Internal("echo: the states do not cover the rows scored".into()));
        }
        self.clock += 1;
        let rows = from - 1..n - 1;
        // The chunk row whose score row `r`'s is: it and the next row read from one chunk, in order.
        let slot = |r: usize| match (states.stored[r - first], states.stored[r + 1 - first]) {
            (Some((c, o)), Some((c2, o2))) if c == c2 && o2 == o + 1 => Some((c, o)),
            _ => None,
        };
        let mut out: Vec<Option<Scored>> = Vec::with_capacity(rows.len());
        let mut missing = Vec::new();
        for r in rows.clone() {
            let had = slot(r).and_then(|(c, o)| self.get(&states.chunks[c], o, top));
            if had.is_none() {
                missing.push(r);
            }
            out.push(had);
        }
        let x: Vec<f32> =
            missing.iter().flat_map(|&r| &states.x[(r - first) * h..(r + 1 - first) * h]).copied().collect();
        let next: Vec<u32> = missing.iter().map(|&r| ids[r + 1]).collect();
        let scored = model.score_rows(&x, &next, top)?;
        for (&r, s) in missing.iter().zip(scored) {
            if let Some((c, o)) = slot(r) {
                self.put(&states.chunks[c], o, top, &s);
            }
            out[r - rows.start] = Some(s);
        }
        self.trim();
        let scoring = Scoring { computed: missing.len(), remembered: rows.len() - missing.len() };
        Ok((out.into_iter().map(|s| s.expect("every row is scored")).collect(), scoring))
    }

    /// Row `row` of `chunk` with its `top` most likely tokens, if remembered from that copy
    /// of the chunk with at least as many.
    fn get(&mut self, (key, chunk): &(ChunkKey, Arc<ChunkKv>), row: usize, top: usize) -> Option<Scored> {
        let e = self.entries.get_mut(key).filter(|e| e.serves(chunk, top))?;
        e.used = self.clock;
        let (chosen, best) = e.rows.get(row)?.as_ref()?;
        Some((*chosen, best[..top.min(best.len())].to_vec()))
    }

    /// Remembers row `row` of `chunk` scored with its `top` most likely tokens. An entry of
    /// another copy of the chunk, or with fewer top tokens, starts afresh; one with more
    /// keeps its rows.
    fn put(&mut self, (key, chunk): &(ChunkKey, Arc<ChunkKv>), row: usize, top: usize, scored: &Scored) {
        if !self.entries.get(key).is_some_and(|e| e.serves(chunk, top)) {
            if let Some(old) = self.entries.remove(key) {
                self.bytes -= old.bytes;
            }
            let rows = vec![None; chunk.tokens.len()];
            let bytes = rows.len() * std::mem::size_of::<Option<Scored>>();
            self.bytes += bytes;
            let e = Entry { chunk: Arc::downgrade(chunk), top, rows, bytes, used: self.clock };
            self.entries.insert(*key, e);
        }
        let e = self.entries.get_mut(key).expect("inserted above");
        if e.top != top || row >= e.rows.len() || e.rows[row].is_some() {
            return;
        }
        let kept = scored.clone();
        let added = kept.1.capacity() * std::mem::size_of::<TokenLogprob>();
        e.rows[row] = Some(kept);
        e.bytes += added;
        e.used = self.clock;
        self.bytes += added;
    }

    /// Drops the entries of chunks no longer held anywhere, then the least recently used,
    /// while over the budget.
    fn trim(&mut self) {
        if self.bytes <= self.budget {
            return;
        }
        self.entries.retain(|_, e| {
            let live = e.chunk.strong_count() > 0;
            if !live {
                self.bytes -= e.bytes;
            }
            live
        });
        if self.bytes <= self.budget {
            return;
        }
        let mut by_age: Vec<(u64, ChunkKey)> = self.entries.iter().map(|(k, e)| (e.used, *k)).collect();
        by_age.sort_unstable();
        for (_, key) in by_age {
            if self.bytes <= self.budget {
                break;
            }
            let e = self.entries.remove(&key).expect("listed above");
            self.bytes -= e.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(tokens: usize) -> Arc<ChunkKv> {
        Arc::new(ChunkKv {
            tokens: vec![1; tokens],
            rotated_at: None,
            parent: None,
            namespace: Default::default(),
            k: Vec::new(),
            v: Vec::new(),
            hidden: Vec::new(),
        })
    }

    fn scored(id: u32, top: usize) -> Scored {
        let best = (0..top as u32).map(|i| TokenLogprob { id: i, logprob: -(i as f32) - 1.0 }).collect();
        (TokenLogprob { id, logprob: -0.5 }, best)
    }

    #[test]
    fn rows_come_back_for_the_same_copy_of_a_chunk_with_as_many_top_tokens_or_fewer() {
        let mut memo = ScoreMemo::new(1 << 20);
        let (key, kv) = (ChunkKey([7; 32]), chunk(4));
        let c = (key, kv.clone());
        memo.put(&c, 2, 5, &scored(9, 5));
        assert_eq!(memo.get(&c, 2, 5), Some(scored(9, 5)));
        assert_eq!(memo.get(&c, 2, 3).unwrap().1, scored(9, 5).1[..3], "fewer top tokens: the first ones");
        assert_eq!(memo.get(&c, 2, 6), None, "more top tokens than remembered");
        assert_eq!(memo.get(&c, 1, 5), None, "another row");
        // The same key, another copy (the chunk computed again elsewhere): not its rows.
        let again = (key, chunk(4));
        assert_eq!(memo.get(&again, 2, 5), None);
        memo.put(&again, 1, 5, &scored(3, 5));
        assert_eq!(memo.get(&c, 2, 5), None, "the new copy replaced the old");
        assert_eq!(memo.get(&again, 1, 5), Some(scored(3, 5)));
        // More top tokens start the entry afresh.
        memo.put(&again, 0, 8, &scored(4, 8));
        assert_eq!(memo.get(&again, 1, 5), None);
        assert_eq!(memo.get(&again, 0, 8), Some(scored(4, 8)));
    }

    #[test]
    fn over_its_budget_the_memo_drops_dead_chunks_then_the_least_recently_used() {
        let one = {
            let mut m = ScoreMemo::new(usize::MAX);
            m.put(&(ChunkKey([0; 32]), chunk(4)), 0, 5, &scored(1, 5));
            m.bytes
        };
        let mut memo = ScoreMemo::new(2 * one);
        let chunks: Vec<(ChunkKey, Arc<ChunkKv>)> = (0..3).map(|i| (ChunkKey([i; 32]), chunk(4))).collect();
        memo.put(&chunks[0], 0, 5, &scored(1, 5));
        memo.clock += 1;
        memo.put(&chunks[1], 0, 5, &scored(1, 5));
        memo.clock += 1;
        assert!(memo.get(&chunks[0], 0, 5).is_some()); // 0 is now the most recently used
        memo.put(&chunks[2], 0, 5, &scored(1, 5));
        memo.trim();
        assert!(memo.bytes <= 2 * one);
        assert!(memo.get(&chunks[1], 0, 5).is_none(), "the least recently used went");
        assert!(memo.get(&chunks[0], 0, 5).is_some() && memo.get(&chunks[2], 0, 5).is_some());
        // A chunk no one holds goes first, however recent.
        let mut chunks = chunks;
        let dropped = chunks.pop().unwrap();
        let k2 = dropped.0;
        drop(dropped);
        memo.put(&chunks[1], 0, 5, &scored(1, 5));
        memo.trim();
        assert!(!memo.entries.contains_key(&k2), "the dropped chunk's rows went");
        assert!(memo.get(&chunks[0], 0, 5).is_some() && memo.get(&chunks[1], 0, 5).is_some());
    }
}
