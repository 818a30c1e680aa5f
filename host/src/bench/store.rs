//! `kvgate bench store`: when does loading a chunk beat recomputing it?
//!
//! For one real chunk (its KV computed by the model), times: recomputing it (a prefill of
//! its tokens), a RAM-tier hit, a disk hit with the payload in the page cache, and a cold
//! disk hit (pages dropped with `posix_fadvise(DONTNEED)` before every read), per element
//! type. Medians of `reps` runs, with the payload throughput.

use std::path::Path;
use std::time::Instant;

use crate::blend::{self, BlendOptions, CacheMode};
use crate::engine::LoadedModel;
use crate::store::{ChunkKey, ChunkStore, KvDtype, Layout, Store, StoreOptions};

/// One way of getting a chunk's KV.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadRow {
    pub source: String,
    pub dtype: Option<KvDtype>,
    pub median_ms: f64,
    /// Stored payload bytes read, checked and decoded per second (disk rows).
    pub gb_per_s: Option<f64>,
    /// Recompute time ÷ this time.
    pub speedup: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreFigures {
    pub tokens: usize,
    pub rows: Vec<LoadRow>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the comparison for a chunk of `tokens` tokens; store files go under `dir`.
pub fn run(m: &LoadedModel, tokens: usize, reps: usize, dir: &Path) -> anyhow::Result<StoreFigures> {
    let reps = reps.max(1);
    // The chunk, then one more token as the final (never stored) chunk.
    let ids = super::prompt(m, tokens + 1);
    let starts = [0, tokens];
    let opts = BlendOptions { chunk_tokens: tokens, ..Default::default() };
    let ram_only = Store::with_disk(&StoreOptions { ram_budget_bytes: 0, ..Default::default() }, None);
    let mut recompute = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        blend::prefill(&m.model, &ids[..tokens], &[0], CacheMode::Off, &opts, &ram_only)?;
        recompute.push(t.elapsed().as_secs_f64());
    }
    let recompute = median(recompute);
    let mut rows = vec![LoadRow {
        source: "recompute".into(),
        dtype: None,
        median_ms: recompute * 1e3,
        gb_per_s: None,
        speedup: 1.0,
    }];
    let key = ChunkKey::compose(m.model.fingerprint(), &ids[..tokens]);
    let cfg = m.model.config();
    for dtype in [KvDtype::F32, KvDtype::F16, KvDtype::Bf16] {
        let data = dir.join(format!("{dtype:?}").to_lowercase());
        let _ = std::fs::remove_dir_all(&data);
        let layout = Layout::new(m.model.fingerprint(), cfg.layers, cfg.kv_heads, cfg.head_dim, cfg.hidden, dtype);
        let options =
            StoreOptions { ram_budget_bytes: 1 << 30, data_dir: Some(data.clone()), dtype, ..StoreOptions::default() };
        {
            let store = Store::open(&options, layout.clone());
            anyhow::ensure!(store.disk().is_some(), "cannot open a store in {}", data.display());
            blend::prefill(&m.model, &ids, &starts, CacheMode::Compose, &opts, &store)?;
            store.sync();
            store.get(&key).ok_or_else(|| anyhow::anyhow!("the chunk was not stored"))?;
            let times: Vec<f64> = (0..reps * 100)
                .map(|_| {
                    let t = Instant::now();
                    let got = store.get(&key);
                    let s = t.elapsed().as_secs_f64();
                    assert!(got.is_some());
                    s
                })
                .collect();
            let t = median(times);
            rows.push(LoadRow {
                source: "RAM tier".into(),
                dtype: Some(dtype),
                median_ms: t * 1e3,
                gb_per_s: None, // a hit hands out the decoded chunk: nothing is copied
                speedup: recompute / t,
            });
        }
        // A store with no RAM to promote into: every get reads the disk.
        let options = StoreOptions { ram_budget_bytes: 0, ..options };
        let store = Store::open(&options, layout.clone());
        let disk = store.disk().ok_or_else(|| anyhow::anyhow!("cannot reopen {}", data.display()))?;
        let payload = layout.payload_len(tokens) as f64;
        for cold in [false, true] {
            let mut times = Vec::new();
            for _ in 0..reps {
                if cold {
                    disk.evict_from_page_cache()?;
                }
                let t = Instant::now();
                let got = store.get(&key);
                times.push(t.elapsed().as_secs_f64());
                anyhow::ensure!(got.is_some(), "the chunk did not load from disk");
            }
            let t = median(times);
            rows.push(LoadRow {
                source: if cold { "disk, cold page cache" } else { "disk, page cache" }.into(),
                dtype: Some(dtype),
                median_ms: t * 1e3,
                gb_per_s: Some(payload / t / 1e9),
                speedup: recompute / t,
            });
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&data);
    }
    Ok(StoreFigures { tokens, rows })
}

/// The figures as a table.
pub fn table(f: &StoreFigures) -> String {
    let mut out = format!("chunk of {} tokens\n", f.tokens);
    out += &format!("{:<24} {:>6} {:>11} {:>9} {:>12}\n", "source", "dtype", "median ms", "GB/s", "vs recompute");
    for r in &f.rows {
        let dtype = r.dtype.map_or("-".to_string(), |d| format!("{d:?}").to_lowercase());
        let gbs = r.gb_per_s.map_or("-".to_string(), |g| format!("{g:.2}"));
        out += &format!("{:<24} {:>6} {:>11.3} {:>9} {:>11.0}x\n", r.source, dtype, r.median_ms, gbs, r.speedup);
    }
    out
}
