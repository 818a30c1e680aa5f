//! The span index: where, inside the stored chunks, a run of tokens has been seen before.
//!
//! KV is per token, so any run of a new prompt that equals a run inside a stored chunk can be
//! spliced from that chunk, whole chunk or not. The index keeps, for every chunk the store
//! holds, its tokens and a set of content-defined anchors: a rolling hash over every window of
//! [`ANCHOR_TOKENS`] tokens, thinned by winnowing (the smallest hash of every `min_span -
//! ANCHOR_TOKENS + 1` consecutive windows is kept). Anchors depend only on content, never on
//! where a chunk was cut, and winnowing guarantees that every run of `min_span` tokens inside a
//! chunk holds at least one. A lookup hashes every window of the prompt, extends each anchor
//! hit left and right against the stored tokens, and covers the prompt with the longest
//! non-overlapping runs of at least `min_span` tokens. Hits are verified token by token, so a
//! hash collision costs a comparison, never a wrong splice.
//!
//! It also keeps the tree of prefix-cache chunks (each knows the chunk before it), so prefix
//! reuse finds the longest stored prefix of a prompt to the token.
//!
//! Every chunk belongs to a namespace (see [`super::Namespace`]): its anchors are posted
//! under hashes mixed with the namespace's id, a lookup probes only the namespaces it may
//! read, and a posting of another namespace is skipped even where mixed hashes collide — so
//! one tenant's lookups neither find nor spend time on another's chunks.
//!
//! Owns no KV and does no I/O: the [`super::Store`] keeps it in step with its tiers (a chunk
//! is indexed while some tier holds it) and rebuilds it from the disk tier when it opens.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::sync::Arc;

use super::ChunkKey;

/// Tokens per hashed window. Runs shorter than this are never found, so `min_span` is at
/// least this.
pub const ANCHOR_TOKENS: usize = 8;

/// Postings kept per anchor hash: the same window in more chunks than this is boilerplate,
/// and a long run has many other anchors to be found by.
const MAX_POSTINGS: usize = 8;

/// A run of a prompt that equals a run inside a stored chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanMatch {
    /// Where it sits in the prompt.
    pub prompt: Range<usize>,
    pub key: ChunkKey,
    /// Where it starts inside the chunk.
    pub offset: usize,
    /// Tokens in the chunk (the match is partial when shorter).
    pub chunk_tokens: usize,
}

impl SpanMatch {
    pub fn len(&self) -> usize {
        self.prompt.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompt.is_empty()
    }

    /// Whether only a run inside the chunk matched, not the whole chunk.
    pub fn is_partial(&self) -> bool {
        self.len() < self.chunk_tokens
    }
}

/// Which tiers hold an indexed chunk (it leaves the index when none does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Ram,
    Disk,
    /// The fleet's shared tier (Redis), as its event stream tells.
    Remote,
}

impl Tier {
    fn bit(self) -> u8 {
        match self {
            Tier::Ram => 1,
            Tier::Disk => 2,
            Tier::Remote => 4,
        }
    }
}

struct Indexed {
    key: ChunkKey,
    /// Its namespace's id.
    namespace: u64,
    tokens: Arc<[u32]>,
    /// The anchor hashes this chunk posted (to take them back out).
    anchors: Vec<u64>,
    /// The prefix-cache chunk before this one, for prefix-cache chunks.
    parent: Option<ChunkKey>,
    tiers: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Posting {
    slot: u32,
    offset: u32,
}

/// Anchors and tokens of every held chunk, and the prefix tree.
pub struct SpanIndex {
    min_span: usize,
    /// The window hash (a parameter so that tests can force collisions).
    hash: fn(&[u32]) -> u64,
    slots: Vec<Option<Indexed>>,
    free: Vec<u32>,
    by_key: HashMap<ChunkKey, u32>,
    anchors: HashMap<u64, Vec<Posting>, BuildHasherDefault<Premixed>>,
    /// Prefix-cache chunks by the chunk before them.
    children: HashMap<ChunkKey, Vec<ChunkKey>>,
}

/// A hasher for keys that are already well-mixed hashes (the anchors): the key is its own
/// hash, sparing SipHash on every probe.
#[derive(Default)]
struct Premixed(u64);

impl Hasher for Premixed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// The hash of one window: a polynomial hash over the token ids, mixed so that its low and
/// high bits are both usable (winnowing compares whole values).
pub fn window_hash(window: &[u32]) -> u64 {
    let mut h = 0u64;
    for &t in window {
        h = h.wrapping_mul(0x100_0000_01b3).wrapping_add(t as u64 + 1);
    }
    // splitmix64's finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The anchor hash `h` as posted in namespace `ns` (unchanged in the empty namespace).
fn in_namespace(h: u64, ns: u64) -> u64 {
    match ns {
        0 => h,
        _ => h ^ window_hash(&[ns as u32, (ns >> 32) as u32]),
    }
}

impl SpanIndex {
    /// An empty index finding runs of at least `min_span` tokens (at least [`ANCHOR_TOKENS`]).
    pub fn new(min_span: usize) -> Self {
        Self::with_hash(min_span, window_hash)
    }

    /// The same with another window hash (tests force collisions with it).
    pub fn with_hash(min_span: usize, hash: fn(&[u32]) -> u64) -> Self {
        Self {
            min_span: min_span.max(ANCHOR_TOKENS),
            hash,
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            anchors: HashMap::default(),
            children: HashMap::new(),
        }
    }

    pub fn min_span(&self) -> usize {
        self.min_span
    }

    /// Chunks indexed.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// The namespace id of an indexed chunk.
    pub fn namespace_of(&self, key: &ChunkKey) -> Option<u64> {
        let slot = *self.by_key.get(key)?;
        self.slots[slot as usize].as_ref().map(|c| c.namespace)
    }

    /// Whether `tier` holds the indexed chunk `key`.
    pub fn in_tier(&self, key: &ChunkKey, tier: Tier) -> bool {
        let Some(&slot) = self.by_key.get(key) else { return false };
        self.slots[slot as usize].as_ref().is_some_and(|c| c.tiers & tier.bit() != 0)
    }

    /// The namespace id of `key` if `tier` is the only one holding it.
    pub fn only_in(&self, key: &ChunkKey, tier: Tier) -> Option<u64> {
        let slot = *self.by_key.get(key)?;
        self.slots[slot as usize].as_ref().filter(|c| c.tiers == tier.bit()).map(|c| c.namespace)
    }

    /// The keys of every indexed chunk.
    pub fn keys(&self) -> impl Iterator<Item = &ChunkKey> {
        self.by_key.keys()
    }

    /// Records that `tier` holds the chunk `key` of namespace `namespace` (an id; with these
    /// tokens; a prefix-cache chunk names the chunk before it). Indexes it if it was not.
    pub fn held(&mut self, key: ChunkKey, tokens: &[u32], parent: Option<ChunkKey>, tier: Tier, namespace: u64) {
        if let Some(&slot) = self.by_key.get(&key) {
            if let Some(c) = self.slots[slot as usize].as_mut() {
                c.tiers |= tier.bit();
            }
            return;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let anchors: Vec<(u64, usize)> =
            self.winnow(tokens).into_iter().map(|(h, o)| (in_namespace(h, namespace), o)).collect();
        for &(h, offset) in &anchors {
            let list = self.anchors.entry(h).or_default();
            if list.len() == MAX_POSTINGS {
                list.remove(0);
            }
            list.push(Posting { slot, offset: offset as u32 });
        }
        if let Some(p) = parent {
            self.children.entry(p).or_default().push(key);
        }
        self.slots[slot as usize] = Some(Indexed {
            key,
            namespace,
            tokens: tokens.into(),
            anchors: anchors.into_iter().map(|(h, _)| h).collect(),
            parent,
            tiers: tier.bit(),
        });
        self.by_key.insert(key, slot);
    }

    /// Records that `tier` no longer holds `key`; the chunk leaves the index when no tier does.
    pub fn dropped(&mut self, key: &ChunkKey, tier: Tier) {
        let Some(&slot) = self.by_key.get(key) else { return };
        let Some(c) = self.slots[slot as usize].as_mut() else { return };
        c.tiers &= !tier.bit();
        if c.tiers == 0 {
            self.remove(key);
        }
    }

    /// Takes `key` out of the index whatever holds it (a chunk found missing or corrupt).
    pub fn remove(&mut self, key: &ChunkKey) {
        let Some(slot) = self.by_key.remove(key) else { return };
        let Some(c) = self.slots[slot as usize].take() else { return };
        for h in &c.anchors {
            if let Some(list) = self.anchors.get_mut(h) {
                list.retain(|p| p.slot != slot);
                if list.is_empty() {
                    self.anchors.remove(h);
                }
            }
        }
        if let Some(p) = c.parent {
            if let Some(kids) = self.children.get_mut(&p) {
                kids.retain(|k| k != key);
                if kids.is_empty() {
                    self.children.remove(&p);
                }
            }
        }
        self.free.push(slot);
    }

    pub fn clear(&mut self) {
        *self = Self::with_hash(self.min_span, self.hash);
    }

    /// The anchors of `tokens`: (hash, offset) of the smallest window hash in every run of
    /// `min_span - ANCHOR_TOKENS + 1` consecutive windows (the rightmost on ties), each once.
    fn winnow(&self, tokens: &[u32]) -> Vec<(u64, usize)> {
        if tokens.len() < ANCHOR_TOKENS {
            return Vec::new();
        }
        let hashes: Vec<u64> = tokens.windows(ANCHOR_TOKENS).map(self.hash).collect();
        let w = (self.min_span - ANCHOR_TOKENS + 1).min(hashes.len());
        let mut out: Vec<(u64, usize)> = Vec::new();
        for start in 0..=hashes.len() - w {
            let (i, &h) = hashes[start..start + w]
                .iter()
                .enumerate()
                .rev()
                .min_by_key(|(_, h)| **h)
                .map(|(i, h)| (start + i, h))
                .expect("a window of at least one hash");
            if out.last().is_none_or(|&(_, o)| o != i) {
                out.push((h, i));
            }
        }
        out
    }

    /// Covers `prompt` with the longest non-overlapping runs of at least `min_span` tokens that
    /// equal runs inside indexed chunks of the namespaces `read` (ids); sorted by position in
    /// the prompt.
    pub fn find(&self, prompt: &[u32], read: &[u64]) -> Vec<SpanMatch> {
        let n = prompt.len();
        if n < self.min_span || self.anchors.is_empty() {
            return Vec::new();
        }
        // Maximal runs, one per (chunk, diagonal): a run found from one anchor is not extended
        // again from the next anchor on the same diagonal.
        let mut runs: Vec<(Range<usize>, u32, usize)> = Vec::new();
        let mut reach: HashMap<(u32, i64), usize> = HashMap::new();
        // Only the prompt's own winnowed windows are probed: every run of `min_span` tokens
        // holds a group of consecutive windows whose smallest hash both sides chose by the
        // same rule, so no run is missed, and a lookup probes about a fifth of the windows
        // (each probe is a cache miss once the index outgrows the CPU's caches).
        for (h, i) in self.winnow(prompt) {
            let postings = read.iter().filter_map(|&ns| Some((ns, self.anchors.get(&in_namespace(h, ns))?)));
            for (ns, p) in postings.flat_map(|(ns, list)| list.iter().map(move |p| (ns, p))) {
                let diagonal = p.offset as i64 - i as i64;
                if reach.get(&(p.slot, diagonal)).is_some_and(|&end| i < end) {
                    continue;
                }
                let Some(c) = self.slots[p.slot as usize].as_ref().filter(|c| c.namespace == ns) else { continue };
                let t = &c.tokens;
                let o = p.offset as usize;
                if t.get(o..o + ANCHOR_TOKENS) != Some(&prompt[i..i + ANCHOR_TOKENS]) {
                    continue; // a collision: the window's tokens differ
                }
                let back = prompt[..i].iter().rev().zip(t[..o].iter().rev()).take_while(|(a, b)| a == b).count();
                let ahead = prompt[i..].iter().zip(&t[o..]).take_while(|(a, b)| a == b).count();
                reach.insert((p.slot, diagonal), i + ahead);
                if back + ahead >= self.min_span {
                    runs.push((i - back..i + ahead, p.slot, o - back));
                }
            }
        }
        self.cover(runs)
    }

    /// The longest runs first; a run overlapping chosen ones keeps its longest free part if
    /// that is still at least `min_span` long.
    fn cover(&self, mut runs: Vec<(Range<usize>, u32, usize)>) -> Vec<SpanMatch> {
        let mut chosen: Vec<(Range<usize>, u32, usize)> = Vec::new();
        while !runs.is_empty() {
            // Longest first; among equals the earliest in the prompt, then the earliest found.
            let best = (0..runs.len())
                .min_by_key(|&i| (std::cmp::Reverse(runs[i].0.len()), runs[i].0.start, i))
                .expect("runs is not empty");
            let (r, slot, offset) = runs.swap_remove(best);
            let free = free_part(&r, &chosen);
            if free == r {
                chosen.push((r, slot, offset));
            } else if free.len() >= self.min_span {
                let shift = free.start - r.start;
                runs.push((free, slot, offset + shift));
            }
        }
        chosen.sort_by_key(|(r, _, _)| r.start);
        chosen
            .into_iter()
            .filter_map(|(prompt, slot, offset)| {
                let c = self.slots[slot as usize].as_ref()?;
                Some(SpanMatch { prompt, key: c.key, offset, chunk_tokens: c.tokens.len() })
            })
            .collect()
    }

    /// The longest prefix of `prompt` held by prefix-cache chunks of the namespaces `read`
    /// chained from `root`: the chunks in order, the last one perhaps only in part.
    pub fn longest_prefix(&self, root: &ChunkKey, prompt: &[u32], read: &[u64]) -> Vec<SpanMatch> {
        let mut out = Vec::new();
        let (mut at, mut parent) = (0, *root);
        while at < prompt.len() {
            let Some(kids) = self.children.get(&parent) else { break };
            let best = kids
                .iter()
                .filter_map(|k| self.slots[*self.by_key.get(k)? as usize].as_ref())
                .filter(|c| read.contains(&c.namespace))
                .map(|c| (c, c.tokens.iter().zip(&prompt[at..]).take_while(|(a, b)| a == b).count()))
                .max_by_key(|(_, common)| *common);
            let Some((c, common)) = best.filter(|(_, common)| *common > 0) else { break };
            out.push(SpanMatch { prompt: at..at + common, key: c.key, offset: 0, chunk_tokens: c.tokens.len() });
            if common < c.tokens.len() {
                break;
            }
            at += common;
            parent = c.key;
        }
        out
    }

    /// Checks the index's own consistency (tests): every posting and child points at a live
    /// chunk that posted it.
    pub fn check(&self) -> Result<(), String> {
        for (h, list) in &self.anchors {
            for p in list {
                let c = self.slots.get(p.slot as usize).and_then(Option::as_ref);
                let c = c.ok_or_else(|| format!("anchor {h:x} points at an empty slot {}", p.slot))?;
                if !c.anchors.contains(h) || self.by_key.get(&c.key) != Some(&p.slot) {
                    return Err(format!("anchor {h:x} points at {:?}, which did not post it", c.key));
                }
            }
        }
        for (parent, kids) in &self.children {
            for k in kids {
                if !self.by_key.contains_key(k) {
                    return Err(format!("child {k:?} of {parent:?} is not indexed"));
                }
            }
        }
        Ok(())
    }
}

/// The longest part of `r` that overlaps none of `chosen`.
fn free_part(r: &Range<usize>, chosen: &[(Range<usize>, u32, usize)]) -> Range<usize> {
    let mut cuts: Vec<Range<usize>> =
        chosen.iter().map(|(c, _, _)| c.start.max(r.start)..c.end.min(r.end)).filter(|c| c.start < c.end).collect();
    cuts.sort_by_key(|c| c.start);
    let mut best = r.start..r.start;
    let mut at = r.start;
    for c in cuts.iter().chain(std::iter::once(&(r.end..r.end))) {
        if c.start > at && c.start - at > best.len() {
            best = at..c.start;
        }
        at = at.max(c.end);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> ChunkKey {
        ChunkKey([i; 32])
    }

    /// Distinct token runs: `run(seed, n)`.
    fn run(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 10_000 + i).collect()
    }

    /// A chunk is found by lookups that read its namespace and by no other, even when every
    /// window hashes alike (then mixed hashes collide across namespaces too); the prefix tree
    /// is filtered the same way.
    #[test]
    fn a_chunk_is_found_only_in_its_namespace() {
        for hash in [window_hash as fn(&[u32]) -> u64, |_: &[u32]| 42] {
            let mut ix = SpanIndex::with_hash(16, hash);
            ix.held(key(1), &run(1, 40), None, Tier::Ram, 5);
            let prompt = [run(9, 3), run(1, 40)].concat();
            assert!(ix.find(&prompt, &[0]).is_empty());
            assert!(ix.find(&prompt, &[7]).is_empty());
            assert_eq!(ix.find(&prompt, &[5])[0].key, key(1));
            assert_eq!(ix.find(&prompt, &[0, 5])[0].key, key(1));
            let root = key(9);
            ix.held(key(2), &run(2, 10), Some(root), Tier::Ram, 5);
            assert!(ix.longest_prefix(&root, &run(2, 10), &[0]).is_empty());
            assert_eq!(ix.longest_prefix(&root, &run(2, 10), &[5]).len(), 1);
        }
    }

    #[test]
    fn a_run_inside_a_chunk_is_found_at_any_offset() {
        let mut ix = SpanIndex::new(16);
        let chunk: Vec<u32> = [run(1, 30), run(2, 50), run(3, 20)].concat();
        ix.held(key(1), &chunk, None, Tier::Ram, 0);
        // The middle passage under a new label, at a new position.
        let prompt: Vec<u32> = [vec![7, 7, 7], run(9, 5), run(2, 50), run(8, 4)].concat();
        let m = ix.find(&prompt, &[0]);
        assert_eq!(m, vec![SpanMatch { prompt: 8..58, key: key(1), offset: 30, chunk_tokens: 100 }]);
        assert!(m[0].is_partial());
    }

    #[test]
    fn runs_shorter_than_min_span_are_not_matches() {
        let mut ix = SpanIndex::new(16);
        ix.held(key(1), &run(1, 40), None, Tier::Ram, 0);
        let prompt: Vec<u32> = [run(1, 15), run(5, 10)].concat();
        assert!(ix.find(&prompt, &[0]).is_empty());
        let prompt: Vec<u32> = [run(5, 3), run(1, 16)].concat();
        assert_eq!(ix.find(&prompt, &[0]).len(), 1);
    }

    /// Winnowing keeps at least one anchor in every run of `min_span` tokens: every run of
    /// exactly `min_span` tokens of a chunk is found, wherever it starts.
    #[test]
    fn every_run_of_min_span_tokens_is_found() {
        let mut ix = SpanIndex::new(16);
        let chunk: Vec<u32> = (0..200u32).map(|i| (i * 7919) % 1009).collect();
        ix.held(key(1), &chunk, None, Tier::Disk, 0);
        for start in 0..=chunk.len() - 16 {
            let mut prompt = vec![5000, 5001];
            prompt.extend_from_slice(&chunk[start..start + 16]);
            prompt.push(6000);
            let m = ix.find(&prompt, &[0]);
            assert_eq!(m.len(), 1, "run at {start}");
            assert_eq!((m[0].prompt.clone(), m[0].offset), (2..18, start));
        }
    }

    #[test]
    fn the_longest_runs_cover_the_prompt_without_overlap() {
        let mut ix = SpanIndex::new(16);
        let a: Vec<u32> = [run(1, 40), run(2, 40)].concat();
        let b: Vec<u32> = [run(2, 40), run(3, 60)].concat();
        ix.held(key(1), &a, None, Tier::Ram, 0);
        ix.held(key(2), &b, None, Tier::Ram, 0);
        let prompt: Vec<u32> = [run(1, 40), run(2, 40), run(3, 60)].concat();
        let m = ix.find(&prompt, &[0]);
        // b's 100 tokens win; a keeps its first 40 (its overlap with b goes to b).
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!((m[0].prompt.clone(), m[0].key, m[0].offset), (0..40, key(1), 0));
        assert_eq!((m[1].prompt.clone(), m[1].key, m[1].offset), (40..140, key(2), 0));
    }

    /// A hash under which window `i` of every run collides with window `i` of every other:
    /// every anchor is a collision, yet only equal tokens match.
    #[test]
    fn a_hash_collision_never_matches_other_tokens() {
        let mut ix = SpanIndex::with_hash(16, |w| (w[0] % 10_000) as u64);
        ix.held(key(1), &run(1, 64), None, Tier::Ram, 0);
        ix.held(key(2), &run(2, 64), None, Tier::Ram, 0);
        let prompt: Vec<u32> = [run(3, 20), run(2, 30), run(4, 20)].concat();
        let m = ix.find(&prompt, &[0]);
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!((m[0].prompt.clone(), m[0].key), (20..50, key(2)));
        assert!(ix.find(&run(5, 100), &[0]).is_empty(), "nothing equal, nothing found");
    }

    #[test]
    fn a_chunk_leaves_when_no_tier_holds_it_and_takes_its_anchors() {
        let mut ix = SpanIndex::new(16);
        ix.held(key(1), &run(1, 64), None, Tier::Ram, 0);
        ix.held(key(1), &run(1, 64), None, Tier::Disk, 0);
        ix.held(key(2), &run(2, 64), None, Tier::Ram, 0);
        ix.dropped(&key(1), Tier::Ram);
        assert!(ix.contains(&key(1)), "still on disk");
        ix.dropped(&key(1), Tier::Disk);
        assert!(!ix.contains(&key(1)));
        assert!(ix.find(&run(1, 64), &[0]).is_empty());
        ix.check().unwrap();
        // Its slot is reused without stale postings.
        ix.held(key(3), &run(3, 64), None, Tier::Ram, 0);
        ix.check().unwrap();
        assert_eq!(ix.find(&run(3, 64), &[0])[0].key, key(3));
        assert!(ix.find(&run(1, 64), &[0]).is_empty());
    }

    #[test]
    fn the_longest_stored_prefix_to_the_token() {
        let mut ix = SpanIndex::new(16);
        let root = key(0);
        ix.held(key(1), &run(1, 10), Some(root), Tier::Ram, 0);
        ix.held(key(2), &run(2, 10), Some(key(1)), Tier::Ram, 0);
        ix.held(key(3), &run(3, 10), Some(key(1)), Tier::Ram, 0);
        let mut prompt: Vec<u32> = [run(1, 10), run(3, 4)].concat();
        prompt.extend([1, 2, 3]);
        let m = ix.longest_prefix(&root, &prompt, &[0]);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].prompt.clone(), m[0].key), (0..10, key(1)));
        assert_eq!((m[1].prompt.clone(), m[1].key), (10..14, key(3)));
        assert!(m[1].is_partial());
        assert!(ix.longest_prefix(&root, &run(4, 10), &[0]).is_empty());
        ix.remove(&key(3));
        assert_eq!(ix.longest_prefix(&root, &prompt, &[0]).len(), 1);
        ix.check().unwrap();
    }

    #[test]
    fn free_part_is_the_longest_gap() {
        let chosen = vec![(10..20, 0, 0), (30..35, 0, 0)];
        assert_eq!(free_part(&(0..50), &chosen), 35..50);
        assert_eq!(free_part(&(12..33), &chosen), 20..30);
        assert_eq!(free_part(&(12..18), &chosen).len(), 0);
    }
}
