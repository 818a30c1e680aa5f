//! Segment files: where chunk payloads live on disk, behind the store's own I/O seam.
//!
//! A segment is a file `segments/NNNNNNNN.seg` in the data directory, holding one contiguous
//! extent per chunk. [`SegmentFiles`] is every I/O call the disk tier makes, so tests can put
//! a full disk or a failing device behind it; [`FsSegments`] is the real thing (positional
//! reads and writes, `fdatasync`, hole punching to give freed space back to the filesystem).
//! [`Extents`] decides where a payload goes: first fit in freed space, else appended.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Every I/O operation of the disk tier on its payload files.
pub trait SegmentFiles: Send + Sync {
    /// Segments present, with their lengths.
    fn list(&self) -> io::Result<Vec<(u32, u64)>>;
    fn write_at(&self, segment: u32, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes written data durable (`fdatasync`).
    fn sync(&self, segment: u32) -> io::Result<()>;
    fn read_at(&self, segment: u32, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Gives a freed range's space back to the filesystem (a hole; the length stays).
    fn release(&self, segment: u32, offset: u64, len: u64) -> io::Result<()>;
    fn truncate(&self, segment: u32, len: u64) -> io::Result<()>;
    fn remove(&self, segment: u32) -> io::Result<()>;
    /// Drops a segment's pages from the page cache (benchmarks of cold reads).
    fn evict_from_page_cache(&self, segment: u32) -> io::Result<()>;
    /// Bytes the segments occupy on the device (holes excluded).
    fn allocated_bytes(&self) -> io::Result<u64>;
}

/// Segment files in a directory.
pub struct FsSegments {
    dir: PathBuf,
    open: Mutex<HashMap<u32, Arc<File>>>,
}

impl FsSegments {
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_path_buf(), open: Mutex::new(HashMap::new()) })
    }

    fn path(&self, segment: u32) -> PathBuf {
        self.dir.join(format!("{segment:08}.seg"))
    }

    fn file(&self, segment: u32) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap();
        if let Some(f) = open.get(&segment) {
            return Ok(f.clone());
        }
        let f =
            Arc::new(OpenOptions::new().read(true).write(true).create(true).truncate(false).open(self.path(segment))?);
        open.insert(segment, f.clone());
        Ok(f)
    }
}

impl SegmentFiles for FsSegments {
    fn list(&self) -> io::Result<Vec<(u32, u64)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse().ok()) else {
                continue;
            };
            out.push((id, e.metadata()?.len()));
        }
        out.sort_unstable();
        Ok(out)
    }

    fn write_at(&self, segment: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file(segment)?.write_all_at(data, offset)
    }

    fn sync(&self, segment: u32) -> io::Result<()> {
        self.file(segment)?.sync_data()
    }

    fn read_at(&self, segment: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file(segment)?.read_exact_at(buf, offset)
    }

    fn release(&self, segment: u32, offset: u64, len: u64) -> io::Result<()> {
        let f = self.file(segment)?;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on an open descriptor with plain integer arguments.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        match io::Error::last_os_error() {
            // Filesystems without hole punching keep the space until the extent is reused.
            e if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            e => Err(e),
        }
    }

    fn truncate(&self, segment: u32, len: u64) -> io::Result<()> {
        self.file(segment)?.set_len(len)
    }

    fn remove(&self, segment: u32) -> io::Result<()> {
        self.open.lock().unwrap().remove(&segment);
        match std::fs::remove_file(self.path(segment)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn evict_from_page_cache(&self, segment: u32) -> io::Result<()> {
        let f = self.file(segment)?;
        // SAFETY: posix_fadvise on an open descriptor with plain integer arguments.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(r)) }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut total = 0;
        for (id, _) in self.list()? {
            total += std::fs::metadata(self.path(id))?.blocks() * 512;
        }
        Ok(total)
    }
}

/// Where a payload lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    pub segment: u32,
    pub offset: u64,
    pub len: u64,
}

/// What freeing an extent asks of the files.
#[derive(Debug, PartialEq)]
pub enum Release {
    /// Punch a hole over the range.
    Hole { offset: u64, len: u64 },
    /// The freed space was the segment's tail: cut the file here.
    Truncate(u64),
    /// Nothing is left in the segment.
    Remove,
}

#[derive(Debug, Default)]
struct Space {
    /// End of the last live extent: appends go here.
    end: u64,
    /// Free ranges below `end`, by offset (coalesced).
    free: BTreeMap<u64, u64>,
}

/// Space accounting of the segments: first fit in freed ranges, else append to a segment
/// with room, else a new segment.
#[derive(Debug)]
pub struct Extents {
    segments: BTreeMap<u32, Space>,
    /// Appending stops at this size (a larger payload gets a segment of its own).
    segment_bytes: u64,
}

impl Extents {
    pub fn new(segment_bytes: u64) -> Self {
        Self { segments: BTreeMap::new(), segment_bytes: segment_bytes.max(1) }
    }

    /// Rebuilds the accounting from the extents in use (recovery). Returns the free ranges
    /// between them, to be released, and each segment's end.
    pub fn rebuild(segment_bytes: u64, mut used: Vec<Extent>) -> (Self, Vec<Extent>) {
        let mut x = Self::new(segment_bytes);
        let mut gaps = Vec::new();
        used.sort_unstable_by_key(|e| (e.segment, e.offset));
        for e in used {
            let s = x.segments.entry(e.segment).or_default();
            if e.offset > s.end {
                s.free.insert(s.end, e.offset - s.end);
                gaps.push(Extent { segment: e.segment, offset: s.end, len: e.offset - s.end });
            }
            s.end = e.offset + e.len;
        }
        (x, gaps)
    }

    /// Segment ends known to the accounting.
    pub fn ends(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.segments.iter().map(|(&id, s)| (id, s.end))
    }

    pub fn allocate(&mut self, len: u64) -> Extent {
        for (&segment, s) in &mut self.segments {
            if let Some((&offset, &free)) = s.free.iter().find(|&(_, &f)| f >= len) {
                s.free.remove(&offset);
                if free > len {
                    s.free.insert(offset + len, free - len);
                }
                return Extent { segment, offset, len };
            }
        }
        for (&segment, s) in &mut self.segments {
            if s.end + len <= self.segment_bytes {
                let offset = s.end;
                s.end += len;
                return Extent { segment, offset, len };
            }
        }
        let segment = self.segments.keys().next_back().map_or(0, |s| s + 1);
        self.segments.insert(segment, Space { end: len, free: BTreeMap::new() });
        Extent { segment, offset: 0, len }
    }

    pub fn free(&mut self, e: Extent) -> Release {
        let Some(s) = self.segments.get_mut(&e.segment) else { return Release::Remove };
        let (mut offset, mut len) = (e.offset, e.len);
        if let Some((&p, &pl)) = s.free.range(..offset).next_back() {
            if p + pl == offset {
                s.free.remove(&p);
                offset = p;
                len += pl;
            }
        }
        if let Some(&nl) = s.free.get(&(offset + len)) {
            s.free.remove(&(offset + len));
            len += nl;
        }
        if offset + len >= s.end {
            s.end = offset;
            if offset == 0 {
                self.segments.remove(&e.segment);
                return Release::Remove;
            }
            return Release::Truncate(offset);
        }
        s.free.insert(offset, len);
        Release::Hole { offset: e.offset, len: e.len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_space_is_reused_first_fit_and_coalesced() {
        let mut x = Extents::new(100);
        let a = x.allocate(30);
        let b = x.allocate(30);
        let c = x.allocate(30);
        assert_eq!((a.offset, b.offset, c.offset), (0, 30, 60));
        let d = x.allocate(30); // no room left in segment 0
        assert_eq!((d.segment, d.offset), (1, 0));
        assert_eq!(x.free(a), Release::Hole { offset: 0, len: 30 });
        assert_eq!(x.free(b), Release::Hole { offset: 30, len: 30 });
        let e = x.allocate(50); // fits the coalesced 60 bytes at 0
        assert_eq!((e.segment, e.offset), (0, 0));
        assert_eq!(x.free(c), Release::Truncate(50), "the tail is cut, with the free bytes before it");
        assert_eq!(x.free(e), Release::Remove);
        assert_eq!(x.free(d), Release::Remove);
        assert_eq!(x.allocate(10).segment, 0);
    }

    #[test]
    fn rebuild_finds_the_gaps() {
        let used = vec![Extent { segment: 2, offset: 10, len: 5 }, Extent { segment: 2, offset: 30, len: 5 }];
        let (mut x, gaps) = Extents::rebuild(100, used);
        assert_eq!(gaps, vec![Extent { segment: 2, offset: 0, len: 10 }, Extent { segment: 2, offset: 15, len: 15 }]);
        assert_eq!(x.ends().collect::<Vec<_>>(), vec![(2, 35)]);
        assert_eq!(x.allocate(12), Extent { segment: 2, offset: 15, len: 12 });
    }
}
