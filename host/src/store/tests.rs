//! The store against real files, a real sled index and real crashes (a child process killed
//! with SIGKILL); a full disk is simulated behind the store's own I/O seam.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::segment::{FsSegments, SegmentFiles};
use super::*;

const LAYERS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 64;
const HIDDEN: usize = 32;

fn layout() -> Layout {
    Layout::new("test-model", LAYERS, KV_HEADS, HEAD_DIM, HIDDEN, KvDtype::F16)
}

/// A fresh directory, removed when dropped.
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("kvgate-store-{name}-")).tempdir().unwrap()
}

/// Chunk `i`: its key and its KV, both derived from `i` alone (so any reader can check what
/// it got), already rounded to f16 as the store keeps it.
fn chunk(i: u32, tokens: usize) -> (ChunkKey, Arc<ChunkKv>) {
    let ids: Vec<u32> = (0..tokens as u32).map(|t| i * 1000 + t).collect();
    let d = KV_HEADS * HEAD_DIM;
    let layer = |l: usize, s: f32| -> Vec<f32> {
        let mut v: Vec<f32> =
            (0..tokens * d).map(|j| ((j as f32 + 1.0) * 0.01 * (i as f32 + 1.0) + s + l as f32).sin()).collect();
        KvDtype::F16.round(&mut v);
        v
    };
    let kv = ChunkKv {
        tokens: ids.clone(),
        rotated_at: None,
        parent: None,
        namespace: Default::default(),
        k: (0..LAYERS).map(|l| layer(l, 0.5)).collect(),
        v: (0..LAYERS).map(|l| layer(l, -0.5)).collect(),
        hidden: layer(LAYERS, 1.5)[..tokens * HIDDEN].to_vec(),
    };
    (ChunkKey::compose("test-model", &ids), Arc::new(kv))
}

fn options(dir: &Path, ram: u64, disk: u64) -> StoreOptions {
    StoreOptions {
        ram_budget_bytes: ram,
        data_dir: Some(dir.to_path_buf()),
        disk_budget_bytes: disk,
        segment_bytes: 1 << 20,
        dtype: KvDtype::F16,
        write_queue: 1024,
        retry_after: Duration::from_millis(20),
        min_span: 16,
        prefix_dtype: KvDtype::F32,
        namespace_share: 1.0,
        remote: None,
    }
}

fn open_with(dir: &Path, ram: u64, disk: u64, files: Box<dyn SegmentFiles>) -> (Store, disk::Recovery) {
    let (tier, rec) = DiskTier::open(dir, files, layout(), disk, 1 << 20).unwrap();
    (Store::with_disk(&options(dir, ram, disk), Some(tier)), rec)
}

fn open(dir: &Path, ram: u64, disk: u64) -> (Store, disk::Recovery) {
    // sled's flusher thread can hold the index's file lock for a moment after the store that
    // used it was dropped (within one process: a process that exits releases it at once).
    let started = std::time::Instant::now();
    let (tier, rec) = loop {
        let files = Box::new(FsSegments::open(&dir.join("segments")).unwrap());
        match DiskTier::open(dir, files, layout(), disk, 1 << 20) {
            Err(e)
                if e.to_string().contains("could not acquire lock") && started.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => break r.unwrap(),
        }
    };
    (Store::with_disk(&options(dir, ram, disk), Some(tier)), rec)
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[test]
fn chunks_survive_a_reopen_and_load_from_disk() {
    let tmp = temp_dir("reopen");
    let dir = tmp.path();
    {
        let (s, _) = open(dir, 1 << 30, 1 << 30);
        for i in 0..5 {
            let (k, kv) = chunk(i, 40);
            s.put(k, kv, 1000);
        }
        s.sync();
    }
    let (s, rec) = open(dir, 1 << 30, 1 << 30);
    assert_eq!((rec.entries, rec.dropped), (5, 0));
    for i in 0..5 {
        let (k, kv) = chunk(i, 40);
        assert_eq!(s.get(&k).as_deref(), Some(&*kv), "chunk {i}");
    }
    assert_eq!(get(&s.stats().disk.hits), 5);
    // Promoted: the second read comes from RAM.
    assert!(s.get(&chunk(0, 40).0).is_some());
    assert_eq!(get(&s.stats().ram.hits), 1);
    let (listed, more) = s.list(None, 10, None);
    assert_eq!((listed.len(), more), (5, false));
    // The span index came back with them: a run inside chunk 3 is found from the disk alone.
    let (k3, kv3) = chunk(3, 40);
    let found = s.find_spans(&[&[9, 9][..], &kv3.tokens[10..30]].concat(), &[0]);
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].key, found[0].offset, found[0].prompt.clone()), (k3, 10, 2..22));
    assert!(listed.iter().all(|c| c.tiers == ["ram", "disk"] && c.stats.cost_us == 1000 && c.stats.tokens == 40));
}

#[test]
fn a_flipped_byte_is_a_counted_miss_and_the_chunk_is_stored_again() {
    let tmp = temp_dir("flip");
    let dir = tmp.path();
    let (k, kv) = chunk(7, 40);
    {
        let (s, _) = open(dir, 1 << 30, 1 << 30);
        s.put(k, kv.clone(), 10);
        s.sync();
    }
    let seg = dir.join("segments/00000000.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();

    let (s, rec) = open(dir, 1 << 30, 1 << 30);
    assert_eq!(rec.entries, 1, "the header is intact, so recovery keeps the entry");
    assert_eq!(s.get(&k), None, "a corrupt payload is never served");
    assert_eq!(get(&s.stats().corruptions), 1);
    assert_eq!(s.disk().unwrap().usage().0, 0, "the entry is removed");
    s.put(k, kv.clone(), 10);
    s.sync();
    drop(s);
    let (s, _) = open(dir, 1 << 30, 1 << 30);
    assert_eq!(s.get(&k).as_deref(), Some(&*kv), "repaired by the next put");
}

#[test]
fn recovery_drops_torn_and_dangling_entries_and_reclaims_orphans() {
    let tmp = temp_dir("recover");
    let dir = tmp.path();
    {
        let (s, _) = open(dir, 1 << 30, 1 << 30);
        for i in 0..3 {
            let (k, kv) = chunk(i, 40);
            s.put(k, kv, 10);
        }
        s.sync();
    }
    // Tear the last payload (as a crash mid-write would), and leave orphaned bytes in a
    // segment no entry points at.
    let seg = dir.join("segments/00000000.seg");
    let len = std::fs::metadata(&seg).unwrap().len();
    let one = layout().payload_len(40) as u64;
    assert_eq!(len, 3 * one);
    std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - one / 2).unwrap();
    std::fs::write(dir.join("segments/00000009.seg"), vec![7u8; 5000]).unwrap();

    let (s, rec) = open(dir, 1 << 30, 1 << 30);
    assert_eq!((rec.entries, rec.dropped), (2, 1));
    assert_eq!(rec.reclaimed_bytes, (one - one / 2) + 5000);
    assert!(!dir.join("segments/00000009.seg").exists());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 2 * one, "the torn tail is cut off");
    assert!(s.get(&chunk(0, 40).0).is_some() && s.get(&chunk(1, 40).0).is_some());
    assert_eq!(s.get(&chunk(2, 40).0), None);
    assert_eq!(get(&s.stats().corruptions), 0);
}

#[test]
fn budgets_hold_in_ram_and_on_disk() {
    let tmp = temp_dir("budgets");
    let dir = tmp.path();
    let one_ram = chunk(0, 40).1.bytes() as u64;
    let one_disk = layout().payload_len(40) as u64;
    let (ram_budget, disk_budget) = (3 * one_ram + one_ram / 2, 5 * one_disk + one_disk / 2);
    let (s, _) = open(dir, ram_budget, disk_budget);
    for i in 0..30 {
        let (k, kv) = chunk(i, 40);
        s.put(k, kv, 10);
        s.sync();
        let (ram_n, ram_bytes) = s.ram.lock().unwrap().usage();
        let (disk_n, disk_bytes) = s.disk().unwrap().usage();
        assert!(ram_bytes <= ram_budget && ram_n <= 3, "RAM over budget after {i}: {ram_bytes}");
        assert!(disk_bytes <= disk_budget && disk_n <= 5, "disk over budget after {i}: {disk_bytes}");
        // What the files really occupy (holes punched for freed space), within one chunk
        // and a filesystem block per segment.
        let on_device = s.disk().unwrap().allocated_bytes().unwrap();
        assert!(on_device <= disk_budget + one_disk + 2 * 4096, "{on_device} bytes on the device after {i}");
    }
    assert!(get(&s.stats().ram.evictions) >= 26 && get(&s.stats().disk.evictions) >= 24);
    // Least recently used went first: the newest chunks are the ones left.
    assert!(s.get(&chunk(29, 40).0).is_some() && s.get(&chunk(0, 40).0).is_none());
}

/// A namespace over its share evicts its own chunks, in both tiers, never another's; its
/// chunks are found only by lookups that read it, after a reopen too.
#[test]
fn a_namespace_over_its_share_evicts_only_its_own_chunks() {
    let tmp = temp_dir("namespaces");
    let dir = tmp.path();
    let one_ram = chunk(0, 40).1.bytes() as u64;
    let one_disk = layout().payload_len(40) as u64;
    let (ram_budget, disk_budget) = (8 * one_ram, 8 * one_disk);
    let mut o = options(dir, ram_budget, disk_budget);
    o.namespace_share = 0.5;
    let (alpha, beta) = (Namespace::new("alpha"), Namespace::new("beta"));
    let put = |s: &Store, i: u32, ns: &Namespace| {
        let (_, kv) = chunk(i, 40);
        let mut kv = (*kv).clone();
        kv.namespace = ns.clone();
        let key = ChunkKey::compose(&ChunkKey::space("test-model", ns), &kv.tokens);
        s.put(key, Arc::new(kv), 10);
        key
    };
    {
        let s = Store::open(&o, layout());
        let mine: Vec<ChunkKey> = (0..3).map(|i| put(&s, i, &alpha)).collect();
        for i in 100..130 {
            put(&s, i, &beta);
            s.sync();
        }
        let (listed, _) = s.list(None, 1000, Some("beta"));
        let ram: u64 = listed.iter().filter(|c| c.tiers.contains(&"ram")).map(|c| c.stats.bytes).sum();
        assert!(ram <= ram_budget / 2, "beta holds {ram} bytes of RAM");
        assert!(listed.iter().filter(|c| c.tiers.contains(&"disk")).count() <= 4);
        assert!(mine.iter().all(|k| s.holds(k)), "alpha's chunks were evicted by beta's");
        assert!(s.list(None, 1000, Some("alpha")).0.iter().all(|c| c.tiers == ["ram", "disk"]));
        let probe = chunk(1, 40).1.tokens.clone();
        assert!(s.find_spans(&probe, &[beta.id()]).is_empty());
        assert_eq!(s.find_spans(&probe, &[alpha.id()])[0].key, mine[1]);
    }
    // The namespace survives a restart: on disk, and in the rebuilt index.
    let s = Store::open(&o, layout());
    let probe = chunk(2, 40).1.tokens.clone();
    assert!(s.find_spans(&probe, &[0, beta.id()]).is_empty());
    let found = s.find_spans(&probe, &[alpha.id()]);
    assert_eq!(s.get(&found[0].key).expect("loads from disk").namespace, alpha);
}

/// Evictions from either tier keep the span index exact: it names every chunk some tier
/// holds and no other, and no anchor points at a missing chunk.
#[test]
fn evictions_leave_no_anchor_pointing_at_a_missing_chunk() {
    let tmp = temp_dir("span-evictions");
    let dir = tmp.path();
    let one_ram = chunk(0, 40).1.bytes() as u64;
    let one_disk = layout().payload_len(40) as u64;
    let (s, _) = open(dir, 3 * one_ram, 6 * one_disk);
    for i in 0..40 {
        let (k, kv) = chunk(i, 40);
        s.put(k, kv, 10);
        if i % 4 == 3 {
            s.get(&chunk(i / 2, 40).0); // promotions from disk evict from RAM too
        }
    }
    s.sync();
    let spans = s.spans();
    spans.check().unwrap();
    let mut held = 0;
    for i in 0..40 {
        let (k, kv) = chunk(i, 40);
        let found = spans.find(&kv.tokens[..39], &[0]);
        match s.holds(&k) {
            true => {
                held += 1;
                assert!(spans.contains(&k) && found.iter().any(|m| m.key == k), "chunk {i} is held but not found");
            }
            false => assert!(!spans.contains(&k) && found.is_empty(), "chunk {i} is gone but still indexed"),
        }
    }
    assert_eq!(spans.len(), held);
    assert!((6..=9).contains(&held), "{held} chunks held");
}
#[test]
fn concurrent_readers_and_writers_lose_nothing() {
    let tmp = temp_dir("concurrent");
    let dir = tmp.path();
    let (s, _) = open(dir, 1 << 30, 1 << 30);
    let s = Arc::new(s);
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..25 {
                    let (k, kv) = chunk(t * 100 + i, 24);
                    s.put(k, kv, 10);
                    // Read a chunk of every writer; whatever comes back must be exact.
                    for other in 0..4 {
                        let (k, kv) = chunk(other * 100 + i / 2, 24);
                        if let Some(got) = s.get(&k) {
                            assert_eq!(*got, *kv);
                        }
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    s.sync();
    assert_eq!(s.disk().unwrap().usage().0, 100, "every chunk reached the disk");
    drop(s);
    let (s, _) = open(dir, 1 << 30, 1 << 30);
    for t in 0..4 {
        for i in 0..25 {
            let (k, kv) = chunk(t * 100 + i, 24);
            assert_eq!(s.get(&k).as_deref(), Some(&*kv));
        }
    }
}

/// Real segment files, with a switch that makes every write fail as a full disk does.
struct FullDisk {
    inner: FsSegments,
    full: Arc<AtomicBool>,
}

impl SegmentFiles for FullDisk {
    fn list(&self) -> io::Result<Vec<(u32, u64)>> {
        self.inner.list()
    }
    fn write_at(&self, segment: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.full.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write_at(segment, offset, data)
    }
    fn sync(&self, segment: u32) -> io::Result<()> {
        self.inner.sync(segment)
    }
    fn read_at(&self, segment: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(segment, offset, buf)
    }
    fn release(&self, segment: u32, offset: u64, len: u64) -> io::Result<()> {
        self.inner.release(segment, offset, len)
    }
    fn truncate(&self, segment: u32, len: u64) -> io::Result<()> {
        self.inner.truncate(segment, len)
    }
    fn remove(&self, segment: u32) -> io::Result<()> {
        self.inner.remove(segment)
    }
    fn evict_from_page_cache(&self, segment: u32) -> io::Result<()> {
        self.inner.evict_from_page_cache(segment)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

#[test]
fn a_full_disk_degrades_to_ram_and_recovers_when_space_returns() {
    let tmp = temp_dir("enospc");
    let dir = tmp.path();
    let full = Arc::new(AtomicBool::new(false));
    let files = FullDisk { inner: FsSegments::open(&dir.join("segments")).unwrap(), full: full.clone() };
    let (s, _) = open_with(dir, 1 << 30, 1 << 30, Box::new(files));
    let (k0, kv0) = chunk(0, 40);
    s.put(k0, kv0, 10);
    s.sync();
    full.store(true, Ordering::Relaxed);
    let (k1, kv1) = chunk(1, 40);
    s.put(k1, kv1.clone(), 10);
    s.sync();
    assert_eq!(get(&s.stats().write_errors), 1);
    assert_eq!(get(&s.stats().degraded), 1);
    assert_eq!(s.get(&k1).as_deref(), Some(&*kv1), "still served from RAM");
    assert!(!s.disk().unwrap().contains(&k1));
    assert_eq!(s.disk().unwrap().usage().0, 1, "the failed write left no entry");

    full.store(false, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(30)); // past retry_after
    let (k2, kv2) = chunk(2, 40);
    s.put(k2, kv2, 10);
    s.sync();
    assert_eq!(get(&s.stats().degraded), 0, "recovered");
    assert!(s.disk().unwrap().contains(&k2));
    drop(s);
    let (s, rec) = open(dir, 1 << 30, 1 << 30);
    assert_eq!((rec.entries, rec.dropped), (2, 0));
    assert!(s.get(&k0).is_some() && s.get(&k2).is_some() && s.get(&k1).is_none());
}

#[test]
fn an_unusable_data_dir_leaves_a_ram_only_store() {
    let tmp = temp_dir("readonly");
    let dir = tmp.path();
    let file = dir.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let s = Store::open(&options(&file, 1 << 30, 1 << 30), layout());
    assert!(s.disk().is_none());
    assert_eq!(get(&s.stats().disk_enabled), 0);
    assert_eq!((get(&s.stats().write_errors), get(&s.stats().degraded)), (1, 1), "visible on /metrics");
    let (k, kv) = chunk(0, 8);
    s.put(k, kv.clone(), 1);
    assert_eq!(s.get(&k).as_deref(), Some(&*kv));
}

/// Chunk `i` of the crash test: large (≈1 MB payloads), so that a kill lands mid-write.
fn crash_chunk(i: u32) -> (ChunkKey, Arc<ChunkKv>) {
    chunk(i, 2000 + (i % 7) as usize * 100)
}

/// Environment variable naming the data directory of [`crash_writer_child`].
const CHILD_DIR: &str = "KVGATE_STORE_CRASH_DIR";

/// Not a test on its own: the child process of
/// [`sigkill_mid_write_never_leaves_torn_data`], which writes chunks until killed and prints
/// the number of each chunk once it is durable.
#[test]
#[ignore = "run by sigkill_mid_write_never_leaves_torn_data as its child process"]
fn crash_writer_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else { return };
    let (s, _) = open(Path::new(&dir), 1 << 30, 1 << 30);
    let start: u32 = std::env::var("KVGATE_STORE_CRASH_START").unwrap().parse().unwrap();
    for i in start.. {
        let (k, kv) = crash_chunk(i);
        s.put(k, kv, 10);
        if i % 3 == 0 {
            s.sync();
            println!("durable {i}");
        }
    }
}

#[test]
fn sigkill_mid_write_never_leaves_torn_data() {
    use std::io::BufRead;
    let tmp = temp_dir("sigkill");
    let dir = tmp.path();
    // Per crash: the first chunk the child wrote and the last it reported durable.
    let mut rounds: Vec<(u32, u32)> = Vec::new();
    let mut start = 0;
    // Three crashes, each after a different number of durable writes, with more in flight.
    for (kill_after, delay_ms) in [(3, 0), (6, 3), (4, 11)] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::tests::crash_writer_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir)
            .env("KVGATE_STORE_CRASH_START", start.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut durable = None;
        let mut seen = 0;
        for line in out.lines() {
            if let Some(i) = line.unwrap().strip_prefix("durable ") {
                durable = Some(i.parse::<u32>().unwrap());
                seen += 1;
                if seen == kill_after {
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL, with puts still queued and being written
        child.wait().unwrap();
        let durable = durable.expect("the child reported durable chunks");
        rounds.push((start, durable));
        start = durable + 100; // the next child writes chunks no earlier one touched

        let (s, rec) = open(dir, 1 << 30, 1 << 30);
        eprintln!("after crash {}: {rec:?}", rounds.len());
        let mut found = 0;
        for &(first, durable) in &rounds {
            for i in first..durable + 50 {
                let (k, kv) = crash_chunk(i);
                match s.get(&k) {
                    Some(got) => {
                        assert_eq!(*got, *kv, "chunk {i} came back different");
                        found += 1;
                    }
                    None => assert!(i > durable, "chunk {i} was durable before the kill and is gone ({rec:?})"),
                }
            }
        }
        assert!(found > 0);
        assert_eq!(get(&s.stats().corruptions), 0, "recovery left no entry that fails its checks");
    }
}
