//! Process-wide state of the extension: the mapped ring (shared by every connection) and a
//! small cache that maps a database path to its device and inode.
//!
//! The commit path must not make system calls, so both are refreshed on a clock, not per
//! commit: the ring file is looked for again at most every [`RING_RECHECK_NS`], and a path's
//! (device, inode) is re-read at most every [`PATH_RECHECK_NS`] (a restore or `mv` may put a
//! new file under the same name). A mapping that is replaced is leaked on purpose: another
//! thread may still be writing through it, and replacements are rare.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{fence, AtomicPtr, AtomicU64, Ordering};

use crate::ring::{self, Ring};

/// How often a process without a (valid) ring looks for one again, and how often a process
/// with one checks that the agent did not replace it.
pub const RING_RECHECK_NS: u64 = 2_000_000_000;
/// How often a cached (device, inode) of a path is re-read.
pub const PATH_RECHECK_NS: u64 = 30_000_000_000;
/// Paths cached per process; a collision only costs a `stat`.
const CACHE_ENTRIES: usize = 1024;

struct Mapped {
    _map: memmap2::MmapMut,
    ring: Ring<'static>,
    dev: u64,
    ino: u64,
}

static CURRENT: AtomicPtr<Mapped> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_RING_CHECK: AtomicU64 = AtomicU64::new(0);

/// The path of the ring file: `MULTIDB_RING` or the default.
pub fn ring_path() -> std::path::PathBuf {
    ring::path_from_env()
}

/// The current ring, refreshed at most every [`RING_RECHECK_NS`] by one thread.
pub fn ring(now: u64) -> Option<Ring<'static>> {
    let next = NEXT_RING_CHECK.load(Ordering::Relaxed);
    if now >= next
        && NEXT_RING_CHECK
            .compare_exchange(
                next,
                now + RING_RECHECK_NS,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    {
        refresh();
    }
    let current = CURRENT.load(Ordering::Acquire);
    // SAFETY: mappings stored in CURRENT are leaked, never freed.
    unsafe { current.as_ref() }.map(|m| m.ring)
}

/// The current ring, looked for again now (a `stat`, and a map when it changed): for
/// `multidb_wait` and `multidb_status()`, which may make system calls and must not answer
/// from a ring the agent replaced a moment ago.
pub fn ring_now(now: u64) -> Option<Ring<'static>> {
    NEXT_RING_CHECK.store(now + RING_RECHECK_NS, Ordering::Relaxed);
    refresh();
    let current = CURRENT.load(Ordering::Acquire);
    // SAFETY: mappings stored in CURRENT are leaked, never freed.
    unsafe { current.as_ref() }.map(|m| m.ring)
}

/// Maps the ring file if it exists and is valid; forgets it if it is gone or replaced.
fn refresh() {
    let path = ring_path();
    let current = CURRENT.load(Ordering::Acquire);
    // SAFETY: as above.
    let current_ref = unsafe { current.as_ref() };
    let Ok(meta) = std::fs::metadata(&path) else {
        CURRENT.store(std::ptr::null_mut(), Ordering::Release);
        return;
    };
    if let Some(m) = current_ref {
        if m.dev == meta.dev() && m.ino == meta.ino() && !m.ring.retired() {
            return;
        }
    }
    let mapped = map(&path).map(|m| Box::into_raw(Box::new(m)));
    CURRENT.store(mapped.unwrap_or(std::ptr::null_mut()), Ordering::Release);
}

fn map(path: &std::path::Path) -> Option<Mapped> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() < ring::HEADER_SIZE as u64 || meta.len() > usize::MAX as u64 {
        return None;
    }
    // SAFETY: the file is a regular file we opened read-write; the mapping is kept alive in
    // `Mapped` for as long as the `Ring` view built on it (both are leaked together). Another
    // process truncating the file under us could fault a later access: the agent never does.
    let mut map = unsafe { memmap2::MmapOptions::new().map_mut(&file) }.ok()?;
    let len = map.len();
    // SAFETY: the mapping is page-aligned and `len` bytes long, and lives as long as the view.
    let ring = unsafe { Ring::open(map.as_mut_ptr(), len) }.ok()?;
    Some(Mapped {
        _map: map,
        ring,
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// What the cache knows of one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathInfo {
    pub dev: u64,
    pub ino: u64,
    /// Ring generation this process registered the path with (0: not yet).
    pub registered: u64,
    /// WAL frame count after this process's last commit to it.
    pub last_frames: u64,
    pub last_commit_ns: u64,
    /// When the path was last `stat`ed (the entry is trusted for [`PATH_RECHECK_NS`] after).
    pub checked_ns: u64,
}

/// One cache line: a sequence lock (odd while written) and the fields.
struct Slot {
    seq: AtomicU64,
    hash: AtomicU64,
    dev: AtomicU64,
    ino: AtomicU64,
    registered: AtomicU64,
    checked_ns: AtomicU64,
    last_frames: AtomicU64,
    last_commit_ns: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // used only to initialise the array
const EMPTY: Slot = Slot {
    seq: AtomicU64::new(0),
    hash: AtomicU64::new(0),
    dev: AtomicU64::new(0),
    ino: AtomicU64::new(0),
    registered: AtomicU64::new(0),
    checked_ns: AtomicU64::new(0),
    last_frames: AtomicU64::new(0),
    last_commit_ns: AtomicU64::new(0),
};

static CACHE: [Slot; CACHE_ENTRIES] = [EMPTY; CACHE_ENTRIES];

fn slot(hash: u64) -> &'static Slot {
    &CACHE[(hash as usize) % CACHE_ENTRIES]
}

/// Reads the entry for `hash` if it is cached and consistent.
fn read(hash: u64) -> Option<PathInfo> {
    let s = slot(hash);
    let seq = s.seq.load(Ordering::Acquire);
    if seq % 2 == 1 || s.hash.load(Ordering::Relaxed) != hash {
        return None;
    }
    let info = PathInfo {
        dev: s.dev.load(Ordering::Relaxed),
        ino: s.ino.load(Ordering::Relaxed),
        registered: s.registered.load(Ordering::Relaxed),
        last_frames: s.last_frames.load(Ordering::Relaxed),
        last_commit_ns: s.last_commit_ns.load(Ordering::Relaxed),
        checked_ns: s.checked_ns.load(Ordering::Relaxed),
    };
    fence(Ordering::Acquire);
    (s.seq.load(Ordering::Relaxed) == seq).then_some(info)
}

/// Runs `write` on the slot of `hash` under its lock; skips if another thread holds it.
fn write(hash: u64, write: impl FnOnce(&Slot)) {
    let s = slot(hash);
    let seq = s.seq.load(Ordering::Relaxed);
    if seq % 2 == 1
        || s.seq
            .compare_exchange(seq, seq + 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    fence(Ordering::Release);
    write(s);
    s.seq.store(seq + 2, Ordering::Release);
}

/// The (device, inode) of `path` (hash `hash`), from the cache or one `stat`.
pub fn lookup(hash: u64, path: &[u8], now: u64) -> Option<PathInfo> {
    if let Some(info) = read(hash) {
        if now.saturating_sub(info.checked_ns) < PATH_RECHECK_NS {
            return Some(info);
        }
    }
    lookup_fresh(hash, path, now)
}

/// The (device, inode) of `path` from one `stat` now, updating the cache: a file replaced
/// at the path a moment ago is seen as the new file.
pub fn lookup_fresh(hash: u64, path: &[u8], now: u64) -> Option<PathInfo> {
    if path.is_empty() {
        return None;
    }
    let meta = std::fs::metadata(std::ffi::OsStr::from_bytes(path)).ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let previous = read(hash).filter(|i| i.dev == dev && i.ino == ino);
    let info = PathInfo {
        checked_ns: now,
        ..previous.unwrap_or(PathInfo {
            dev,
            ino,
            ..PathInfo::default()
        })
    };
    write(hash, |s| {
        s.hash.store(hash, Ordering::Relaxed);
        s.dev.store(dev, Ordering::Relaxed);
        s.ino.store(ino, Ordering::Relaxed);
        s.registered.store(info.registered, Ordering::Relaxed);
        s.last_frames.store(info.last_frames, Ordering::Relaxed);
        s.last_commit_ns
            .store(info.last_commit_ns, Ordering::Relaxed);
        s.checked_ns.store(now, Ordering::Relaxed);
    });
    Some(info)
}

/// Notes that this process registered `hash`'s path with ring `generation`.
pub fn mark_registered(hash: u64, generation: u64) {
    write(hash, |s| {
        if s.hash.load(Ordering::Relaxed) == hash {
            s.registered.store(generation, Ordering::Relaxed);
        }
    });
}

/// Notes a commit to `hash`'s database.
pub fn note_commit(hash: u64, frames: u64, now: u64) {
    write(hash, |s| {
        if s.hash.load(Ordering::Relaxed) == hash {
            s.last_frames.store(frames, Ordering::Relaxed);
            s.last_commit_ns.store(now, Ordering::Relaxed);
        }
    });
}

/// Slots of [`LAST_COMMIT`]: a power of two, so the index is a mask.
const LAST_COMMIT_SLOTS: usize = 4096;

/// The time of this process's last commit per database, by path hash. Unlike the path cache
/// above, an update is never skipped (it is one `fetch_max`), so `multidb_wait` can trust it:
/// two databases sharing a slot only make a wait longer, never end it early.
static LAST_COMMIT: [AtomicU64; LAST_COMMIT_SLOTS] =
    [const { AtomicU64::new(0) }; LAST_COMMIT_SLOTS];

/// Records a commit to `hash`'s database at `now` (lock-free, no syscall).
pub fn note_commit_time(hash: u64, now: u64) {
    LAST_COMMIT[(hash as usize) & (LAST_COMMIT_SLOTS - 1)].fetch_max(now, Ordering::AcqRel);
}

/// When this process last committed to `hash`'s database (or a later time; 0: never).
pub fn last_commit_time(hash: u64) -> u64 {
    LAST_COMMIT[(hash as usize) & (LAST_COMMIT_SLOTS - 1)].load(Ordering::Acquire)
}

/// What the cache holds for `hash`, without touching the file system.
pub fn peek(hash: u64) -> Option<PathInfo> {
    read(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_cache_follows_a_file_replaced_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        std::fs::write(&path, b"one").unwrap();
        let bytes = path.to_string_lossy().as_bytes().to_vec();
        let hash = ring::path_hash(&bytes);
        let now = 1_000;
        let first = lookup(hash, &bytes, now).unwrap();
        assert_eq!(first.ino, std::fs::metadata(&path).unwrap().ino());
        mark_registered(hash, 7);
        note_commit(hash, 12, now);
        let cached = peek(hash).unwrap();
        assert_eq!((cached.registered, cached.last_frames), (7, 12));

        // Replaced: a new inode at the path (the old one is kept alive so it is not reused).
        let old = dir.path().join("old.db");
        std::fs::rename(&path, &old).unwrap();
        std::fs::write(&path, b"two").unwrap();
        let new_ino = std::fs::metadata(&path).unwrap().ino();
        // Within the recheck interval the cache answers without a stat...
        assert_eq!(lookup(hash, &bytes, now + 1).unwrap().ino, first.ino);
        // ...after it, or when asked fresh, the new file is seen and its registration is new.
        let fresh = lookup_fresh(hash, &bytes, now + 2).unwrap();
        assert_eq!(fresh.ino, new_ino);
        assert_eq!(fresh.registered, 0, "a new file is registered again");
        let later = lookup(hash, &bytes, now + 2 + PATH_RECHECK_NS).unwrap();
        assert_eq!(later.ino, new_ino);
        // A missing file has no entry.
        std::fs::remove_file(&path).unwrap();
        assert!(lookup_fresh(hash, &bytes, now + 3).is_none());
    }
}
