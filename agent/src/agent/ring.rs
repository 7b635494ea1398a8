//! The agent's end of the commit ring: creating and mapping the shared file, reading records
//! (every one validated as untrusted input by the layout module), sleeping on the futex, and
//! the `multidb ring tail` / `ring stat` commands.
//!
//! The layout itself is defined once, in the extension crate (`multidb::ring`).

use std::fs::{File, OpenOptions};
use std::io;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use multidb::ring::{self as layout, Consumer, Pop, Record, Ring};

/// How long the reader sleeps on the futex before it beats its heart again; producers
/// treat a heartbeat older than 3 s as a dead agent.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// Why the ring could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RingFileError {
    #[error("ring {path}: {op}: {error}")]
    Io {
        path: PathBuf,
        op: &'static str,
        error: io::Error,
    },
    #[error("another multidb agent (pid {pid}) is running: it holds the ring {path} (one agent per ring and state directory)")]
    Busy { path: PathBuf, pid: u32 },
    #[error("ring {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The path of the ring: `MULTIDB_RING` or `/dev/shm/multidb.ring`.
pub fn default_path() -> PathBuf {
    layout::path_from_env()
}

/// A mapped ring file. The consumer holds an exclusive `flock` on it, so two agents never
/// read one ring.
pub struct RingFile {
    path: PathBuf,
    file: File,
    _map: memmap2::MmapMut,
    /// The view of `_map`, its lifetime erased here and shortened again by [`RingFile::ring`]
    /// to a borrow of this file, so no view outlives the mapping.
    ring: Ring<'static>,
}

/// Attempts at creating the ring when other processes race to create or remove it.
const CREATE_ATTEMPTS: usize = 5;

impl RingFile {
    /// Opens the ring at `path` as its one consumer and starts a new run on it (status
    /// entries of an earlier run cleared, a new generation, our pid).
    ///
    /// A missing ring is created (mode 0600) under a private name with
    /// `O_CREAT|O_EXCL|O_NOFOLLOW`, locked, initialised, and then linked into place: two
    /// starting agents cannot both own it, and a planted symlink or a file that appears
    /// meanwhile is never written. An existing file is used only when its header says it is a
    /// multidb ring; one of another version or geometry is replaced (after taking its lock);
    /// anything else is refused with a message naming it. An existing valid ring is kept, so
    /// applications that mapped it keep working across agent restarts.
    pub fn create_or_open(
        path: &Path,
        slots: u32,
        status_entries: u32,
    ) -> Result<RingFile, RingFileError> {
        for _ in 0..CREATE_ATTEMPTS {
            let Some(existing) = RingFile::open_locked(path)? else {
                let fresh = RingFile::create_private(path, slots, status_entries)?;
                let linked = std::fs::hard_link(&fresh.path, path);
                let _ = std::fs::remove_file(&fresh.path);
                match linked {
                    Ok(()) => {
                        return Ok(RingFile {
                            path: path.to_path_buf(),
                            ..fresh
                        })
                    }
                    // Another process created it first: open theirs.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        return Err(RingFileError::Io {
                            path: path.to_path_buf(),
                            op: "link into place",
                            error: e,
                        })
                    }
                }
            };
            if existing.ring.capacity() == u64::from(slots)
                && existing.ring.status_capacity() == status_entries as usize
            {
                existing
                    .ring
                    .start_run(std::process::id(), layout::now_ns());
                return Ok(existing);
            }
            // Ours, locked by us, of another version or geometry: replace it atomically.
            let fresh = RingFile::create_private(path, slots, status_entries)?;
            if let Err(e) = std::fs::rename(&fresh.path, path) {
                let _ = std::fs::remove_file(&fresh.path);
                return Err(RingFileError::Io {
                    path: path.to_path_buf(),
                    op: "replace",
                    error: e,
                });
            }
            existing.ring.retire();
            return Ok(RingFile {
                path: path.to_path_buf(),
                ..fresh
            });
        }
        Err(RingFileError::Invalid {
            path: path.to_path_buf(),
            reason: "it kept appearing and disappearing while the agent created it".into(),
        })
    }

    /// Opens `path` without following a symlink and without blocking on a FIFO.
    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
    }

    /// The existing ring at `path`, locked by us; `None` if there is no file. A ring of
    /// another version or geometry comes back as a header-only view, to be replaced.
    fn open_locked(path: &Path) -> Result<Option<RingFile>, RingFileError> {
        let invalid = |reason: String| RingFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let file = match RingFile::open_file(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(invalid("is a symbolic link; the ring must be a regular file (remove the link, or set MULTIDB_RING to another path)".into()))
            }
            Err(e) => {
                return Err(RingFileError::Io {
                    path: path.to_path_buf(),
                    op: "open",
                    error: e,
                })
            }
        };
        let not_ours = |why: String| {
            invalid(format!(
                "exists and is not a multidb ring ({why}); refusing to replace it: remove it, or set MULTIDB_RING to another path"
            ))
        };
        let (file, mut map) = match RingFile::map_file(path, file) {
            Ok(m) => m,
            Err(RingFileError::Invalid { reason, .. }) => return Err(not_ours(reason)),
            Err(e) => return Err(e),
        };
        let len = map.len();
        // SAFETY: page-aligned mapping of `len` bytes, kept alive with the view in RingFile.
        let opened = unsafe { Ring::open(map.as_mut_ptr(), len) };
        let ring = match opened {
            Ok(ring) => ring,
            Err(e @ (layout::RingError::BadMagic | layout::RingError::TooSmall(_))) => {
                return Err(not_ours(e.to_string()))
            }
            // SAFETY: as above; the magic is ours, and a header-only view touches nothing
            // past the header.
            Err(_) => unsafe { Ring::header_only(map.as_mut_ptr(), len) },
        };
        if let Err(e) = crate::agent::lock::flock_exclusive(&file) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(RingFileError::Busy {
                    path: path.to_path_buf(),
                    pid: ring.stats().agent_pid,
                });
            }
            return Err(RingFileError::Io {
                path: path.to_path_buf(),
                op: "lock",
                error: e,
            });
        }
        Ok(Some(RingFile {
            path: path.to_path_buf(),
            file,
            _map: map,
            ring,
        }))
    }

    /// A new, initialised and locked ring under a private name beside `path`; the caller
    /// links or renames it into place. The returned `path` is the private name.
    fn create_private(
        path: &Path,
        slots: u32,
        status_entries: u32,
    ) -> Result<RingFile, RingFileError> {
        let io_err = |op, source| RingFileError::Io {
            path: path.to_path_buf(),
            op,
            error: source,
        };
        let name = path
            .file_name()
            .map_or("ring".into(), |n| n.to_string_lossy());
        let private = format!(
            ".{name}.{}.{}.new",
            std::process::id(),
            layout::now_ns() % 1_000_000_000
        );
        let tmp = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => dir.join(&private),
            None => PathBuf::from(&private),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| io_err("create", e))?;
        let result = (|| {
            let size = layout::file_size(slots, status_entries);
            file.set_len(size as u64).map_err(|e| io_err("size", e))?;
            crate::agent::lock::flock_exclusive(&file).map_err(|e| io_err("lock", e))?;
            // SAFETY: we just created and sized the file; nobody else maps it until it is
            // linked into place.
            let mut map = unsafe { memmap2::MmapOptions::new().map_mut(&file) }
                .map_err(|e| io_err("map", e))?;
            let len = map.len();
            // SAFETY: page-aligned mapping of `len` bytes kept alive in the returned RingFile.
            let ring = unsafe {
                Ring::init(
                    map.as_mut_ptr(),
                    len,
                    slots,
                    status_entries,
                    layout::now_ns(),
                )
            }
            .map_err(|e| RingFileError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            ring.start_run(std::process::id(), ring.generation());
            // Alive from the moment it is linked into place: an application that maps it at
            // once must not take the new ring for one without an agent.
            ring.heartbeat(std::process::id(), layout::now_ns());
            Ok((map, ring))
        })();
        match result {
            Ok((map, ring)) => Ok(RingFile {
                path: tmp,
                file,
                _map: map,
                ring,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Maps an existing ring without taking the consumer lock (for `ring stat`).
    pub fn open_existing(path: &Path) -> Result<RingFile, RingFileError> {
        let file = RingFile::open_file(path).map_err(|e| RingFileError::Io {
            path: path.to_path_buf(),
            op: "open",
            error: e,
        })?;
        let (file, mut map) = RingFile::map_file(path, file)?;
        let len = map.len();
        // SAFETY: page-aligned mapping of `len` bytes kept alive with the view.
        let ring =
            unsafe { Ring::open(map.as_mut_ptr(), len) }.map_err(|e| RingFileError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(RingFile {
            path: path.to_path_buf(),
            file,
            _map: map,
            ring,
        })
    }

    /// Maps a regular file of at least a header's size, shared and writable.
    fn map_file(path: &Path, file: File) -> Result<(File, memmap2::MmapMut), RingFileError> {
        let meta = file.metadata().map_err(|e| RingFileError::Io {
            path: path.to_path_buf(),
            op: "stat",
            error: e,
        })?;
        let invalid = |reason: String| RingFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if !meta.is_file() {
            return Err(invalid("not a regular file".into()));
        }
        if meta.len() < layout::HEADER_SIZE as u64 {
            return Err(invalid(format!(
                "{} bytes, smaller than a ring header",
                meta.len()
            )));
        }
        // SAFETY: a regular file mapped shared; the mapping lives in the returned RingFile.
        let map = unsafe { memmap2::MmapOptions::new().map_mut(&file) }.map_err(|e| {
            RingFileError::Io {
                path: path.to_path_buf(),
                op: "map",
                error: e,
            }
        })?;
        Ok((file, map))
    }

    pub fn ring(&self) -> Ring<'_> {
        self.ring
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the ring's path still names this file (it may have been deleted or replaced).
    pub fn still_at_path(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::symlink_metadata(&self.path), self.file.metadata()) {
            (Ok(here), Ok(mine)) => here.dev() == mine.dev() && here.ino() == mine.ino(),
            _ => false,
        }
    }
}

/// After a record, the reader polls this long before it sleeps on the futex: while commits
/// keep coming, producers then never find it asleep and never pay for a wake-up system call.
pub const BUSY_WINDOW: Duration = Duration::from_millis(2);
/// The poll interval inside the busy window: the added delay a record can see in a burst.
pub const BUSY_POLL: Duration = Duration::from_micros(100);

/// Counts of what a reader has taken from the ring.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadCounts {
    pub commits: u64,
    pub registrations: u64,
    pub skipped: u64,
}

/// Reads records until `stop` returns true, beating the heart and sleeping on the futex when
/// the ring is empty. `on_record` gets every valid record.
pub fn read_loop(
    ring: Ring<'_>,
    mut stop: impl FnMut(&ReadCounts, Duration) -> bool,
    mut on_record: impl FnMut(&Record),
) -> ReadCounts {
    let pid = std::process::id();
    let mut consumer = Consumer::default();
    let mut counts = ReadCounts::default();
    let mut last_record = Instant::now();
    let mut last_beat = Instant::now();
    ring.heartbeat(pid, layout::now_ns());
    loop {
        if last_beat.elapsed() >= HEARTBEAT_INTERVAL {
            ring.heartbeat(pid, layout::now_ns());
            last_beat = Instant::now();
        }
        if stop(&counts, last_record.elapsed()) {
            return counts;
        }
        match ring.pop(&mut consumer, layout::now_ns()) {
            Pop::Record(record) => {
                match &record {
                    Record::Commit(_) => counts.commits += 1,
                    Record::Register { .. } => counts.registrations += 1,
                }
                last_record = Instant::now();
                on_record(&record);
            }
            Pop::Skipped => counts.skipped += 1,
            Pop::Pending => std::thread::sleep(Duration::from_micros(100)),
            Pop::Empty if last_record.elapsed() < BUSY_WINDOW => std::thread::sleep(BUSY_POLL),
            Pop::Empty => ring.wait(HEARTBEAT_INTERVAL),
        }
    }
}
