//! `kvgate bench spans`: what a span lookup costs as the store and the prompt grow.
//!
//! Synthetic chunks (random tokens of the model's vocabulary size, `chunk_tokens` each) go
//! into a [`SpanIndex`] as the store would post them; prompts of each length are made half of
//! runs copied from stored chunks (at random offsets, 32–64 tokens, so the lookup has to
//! extend anchor hits and choose among them) and half of new tokens. Reported per store size
//! and prompt length: the median time of `find` (µs) and per 1 000 prompt tokens, and the
//! share of the prompt it covered (to show the lookup did its work, not just ran).

use std::time::Instant;

use serde::Serialize;

use crate::store::span::Tier;
use crate::store::{ChunkKey, SpanIndex};

/// One (store size, prompt length) point.
#[derive(Debug, Clone, Serialize)]
pub struct SpanPoint {
    pub chunks: usize,
    pub prompt_tokens: usize,
    pub median_us: f64,
    pub us_per_1k_tokens: f64,
    /// Share of the prompt's tokens the matches covered (half were copied from the store).
    pub covered: f64,
}

/// A small deterministic generator (xorshift), so every run draws the same chunks.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const VOCAB: usize = 49_152;

fn key(i: usize) -> ChunkKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64).to_le_bytes());
    k[8] = 0x5a;
    ChunkKey(k)
}

/// Runs the benchmark: the index grows through `sizes` (ascending) and, at each, every
/// prompt length in `lengths` is looked up `reps` times.
pub fn run(
    sizes: &[usize],
    lengths: &[usize],
    chunk_tokens: usize,
    min_span: usize,
    reps: usize,
    progress: impl Fn(&str),
) -> anyhow::Result<Vec<SpanPoint>> {
    if sizes.is_empty() || lengths.is_empty() || chunk_tokens < 64 || reps == 0 {
        anyhow::bail!("bench spans needs store sizes, prompt lengths, --chunk-tokens >= 64 and --reps >= 1");
    }
    let mut sizes = sizes.to_vec();
    sizes.sort_unstable();
    let mut index = SpanIndex::new(min_span);
    let mut chunks: Vec<Vec<u32>> = Vec::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut points = Vec::new();
    for &n in &sizes {
        progress(&format!("indexing {n} chunks of {chunk_tokens} tokens"));
        while chunks.len() < n {
            let tokens: Vec<u32> = (0..chunk_tokens).map(|_| rng.below(VOCAB) as u32).collect();
            index.held(key(chunks.len()), &tokens, None, Tier::Ram, 0);
            chunks.push(tokens);
        }
        for &len in lengths {
            let mut times = Vec::with_capacity(reps);
            let mut covered = 0usize;
            for _ in 0..reps {
                let mut prompt = Vec::with_capacity(len + 64);
                while prompt.len() < len {
                    let run = 32 + rng.below(33);
                    let c = &chunks[rng.below(chunks.len())];
                    let at = rng.below(chunk_tokens - run + 1);
                    prompt.extend_from_slice(&c[at..at + run]);
                    prompt.extend((0..run).map(|_| rng.below(VOCAB) as u32));
                }
                prompt.truncate(len);
                let t = Instant::now();
                let found = index.find(&prompt, &[0]);
                times.push(t.elapsed().as_secs_f64() * 1e6);
                covered += found.iter().map(|m| m.len()).sum::<usize>();
            }
            times.sort_by(f64::total_cmp);
            let median_us = times[times.len() / 2];
            points.push(SpanPoint {
                chunks: n,
                prompt_tokens: len,
                median_us,
                us_per_1k_tokens: median_us * 1000.0 / len as f64,
                covered: covered as f64 / (reps * len) as f64,
            });
        }
    }
    Ok(points)
}

/// The points as a table.
pub fn table(points: &[SpanPoint]) -> String {
    let mut s = String::from("chunks     prompt tokens  median µs  µs per 1k tokens  covered\n");
    for p in points {
        s += &format!(
            "{:>9}  {:>13}  {:>9.1}  {:>16.1}  {:>6.0} %\n",
            p.chunks,
            p.prompt_tokens,
            p.median_us,
            p.us_per_1k_tokens,
            100.0 * p.covered
        );
    }
    s
}
