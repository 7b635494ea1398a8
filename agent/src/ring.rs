//! The agent's end of the commit ring: creating and mapping the shared file, reading records
//! (every one validated as untrusted input by the layout module), sleeping on the futex, and
//! the `multidb ring tail` / `ring stat` commands.
//!
//! The layout itself is defined once, in the extension crate (`multidb::ring`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use multidb::ring::{self as layout, Consumer, Pop, Record, Ring, Stats};

/// How long the reader sleeps on the futex before it beats its heart again; producers
/// treat a heartbeat older than 3 s as a dead agent.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// Why the ring could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RingFileError {
    #[error("ring {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("ring {path}: another process (agent pid {pid}) is already reading it")]
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
    _file: File,
    _map: memmap2::MmapMut,
    ring: Ring,
}

impl RingFile {
    /// Opens the ring at `path` as its one consumer, creating it (mode 0600) when it is
    /// missing, invalid, or of another geometry than asked. An existing valid ring is kept,
    /// so applications that mapped it keep working across agent restarts.
    pub fn create_or_open(
        path: &Path,
        slots: u32,
        status_entries: u32,
    ) -> Result<RingFile, RingFileError> {
        let io_err = |op, source| RingFileError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        if let Ok(existing) = RingFile::map(path, true) {
            let stats = existing.ring.stats();
            lock(&existing._file).map_err(|_| RingFileError::Busy {
                path: path.to_path_buf(),
                pid: stats.agent_pid,
            })?;
            if stats.capacity == u64::from(slots)
                && existing.ring.status_capacity() == status_entries as usize
            {
                return Ok(existing);
            }
            existing.ring.retire();
        }
        let size = layout::file_size(slots, status_entries);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err("create", e))?;
        file.set_len(size as u64).map_err(|e| io_err("size", e))?;
        lock(&file).map_err(|e| io_err("lock", e))?;
        // SAFETY: we just created and sized the file; nobody else maps it until the rename.
        let mut map =
            unsafe { memmap2::MmapOptions::new().map_mut(&file) }.map_err(|e| io_err("map", e))?;
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
        std::fs::rename(&tmp, path).map_err(|e| io_err("rename", e))?;
        Ok(RingFile {
            path: path.to_path_buf(),
            _file: file,
            _map: map,
            ring,
        })
    }

    /// Maps an existing ring without taking the consumer lock (for `ring stat`).
    pub fn open_existing(path: &Path) -> Result<RingFile, RingFileError> {
        RingFile::map(path, true)
    }

    fn map(path: &Path, write: bool) -> Result<RingFile, RingFileError> {
        let io_err = |op, source| RingFileError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| io_err("open", e))?;
        let meta = file.metadata().map_err(|e| io_err("stat", e))?;
        if !meta.is_file() {
            return Err(RingFileError::Invalid {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        // SAFETY: a regular file mapped shared; the mapping lives in the returned RingFile.
        let mut map =
            unsafe { memmap2::MmapOptions::new().map_mut(&file) }.map_err(|e| io_err("map", e))?;
        let len = map.len();
        // SAFETY: page-aligned mapping of `len` bytes kept alive with the view.
        let ring =
            unsafe { Ring::open(map.as_mut_ptr(), len) }.map_err(|e| RingFileError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(RingFile {
            path: path.to_path_buf(),
            _file: file,
            _map: map,
            ring,
        })
    }

    pub fn ring(&self) -> Ring {
        self.ring
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn lock(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
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
    ring: Ring,
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

/// Options of `multidb ring tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
    /// Slots when the ring is created (a power of two)
    #[arg(long, default_value_t = layout::DEFAULT_SLOTS)]
    pub slots: u32,
    /// Status entries when the ring is created
    #[arg(long, default_value_t = layout::DEFAULT_STATUS_ENTRIES)]
    pub status_entries: u32,
    /// Exit after this long without a record (e.g. `2s`); by default run until interrupted
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub idle_exit: Option<Duration>,
}

/// `multidb ring tail`: creates the ring if needed and prints one line per record.
pub fn tail(path: &Path, args: &TailArgs) -> anyhow::Result<()> {
    let file = RingFile::create_or_open(path, args.slots, args.status_entries)?;
    let ring = file.ring();
    crate::signals::catch_interrupts();
    eprintln!(
        "multidb: reading {} ({} slots); Ctrl-C to stop",
        path.display(),
        ring.capacity()
    );
    let start = ring.stats();
    let mut paths: HashMap<(u64, u64), String> = HashMap::new();
    let stdout = io::stdout();
    let mut out = io::LineWriter::new(stdout.lock());
    let write_error: std::cell::RefCell<Option<io::Error>> = std::cell::RefCell::new(None);
    let idle = args.idle_exit;
    let counts = read_loop(
        ring,
        |_, quiet| {
            crate::signals::interrupted()
                || write_error.borrow().is_some()
                || idle.is_some_and(|d| quiet >= d)
        },
        |record| {
            let line = describe(record, &mut paths, args.json);
            if let Err(e) = writeln!(out, "{line}") {
                *write_error.borrow_mut() = Some(e);
            }
        },
    );
    let end = ring.stats();
    eprintln!(
        "multidb: received {} commits and {} registrations; dropped {}, skipped {}, invalid {}",
        counts.commits,
        counts.registrations,
        end.dropped - start.dropped,
        end.skipped - start.skipped,
        end.invalid - start.invalid
    );
    match write_error.into_inner() {
        Some(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn describe(record: &Record, paths: &mut HashMap<(u64, u64), String>, json: bool) -> String {
    match record {
        Record::Register {
            dev,
            ino,
            pid,
            path,
            ..
        } => {
            let path = String::from_utf8_lossy(path).into_owned();
            paths.insert((*dev, *ino), path.clone());
            if json {
                serde_json::json!({"kind": "register", "dev": dev, "ino": ino, "pid": pid, "path": path}).to_string()
            } else {
                format!("register dev={dev} ino={ino} pid={pid} path={path}")
            }
        }
        Record::Commit(c) => {
            let path = paths.get(&(c.dev, c.ino)).map_or("?", String::as_str);
            let age_us = layout::now_ns().saturating_sub(c.time_ns) / 1000;
            if json {
                serde_json::json!({
                    "kind": "commit", "dev": c.dev, "ino": c.ino, "path_hash": c.path_hash, "frames": c.frames,
                    "pid": c.pid, "time_ns": c.time_ns, "path": path,
                })
                .to_string()
            } else {
                format!(
                    "commit dev={} ino={} frames={} pid={} age_us={age_us} path={path}",
                    c.dev, c.ino, c.frames, c.pid
                )
            }
        }
    }
}

/// `multidb ring stat`: the ring's counters and whether an agent is reading it.
pub fn stat(path: &Path, json: bool) -> anyhow::Result<()> {
    let file = RingFile::open_existing(path)?;
    let s: Stats = file.ring().stats();
    let now = layout::now_ns();
    let alive = file.ring().agent_alive(now, layout::AGENT_ALIVE_NS);
    let beat_ms = (s.heartbeat_ns != 0).then(|| now.saturating_sub(s.heartbeat_ns) / 1_000_000);
    if json {
        let v = serde_json::json!({
            "path": path.display().to_string(), "capacity": s.capacity, "head": s.head, "tail": s.tail,
            "fill": s.fill(), "dropped": s.dropped, "skipped": s.skipped, "invalid": s.invalid,
            "agent": {"running": alive, "pid": (s.agent_pid != 0).then_some(s.agent_pid), "heartbeat_age_ms": beat_ms},
            "status_entries": file.ring().status_capacity(),
        });
        println!("{v}");
    } else {
        println!("ring      {}", path.display());
        println!(
            "capacity  {} slots, {} status entries",
            s.capacity,
            file.ring().status_capacity()
        );
        println!("fill      {} (head {}, tail {})", s.fill(), s.head, s.tail);
        println!("dropped   {} (ring full)", s.dropped);
        println!("skipped   {} (abandoned by a dead writer)", s.skipped);
        println!("invalid   {} (failed validation)", s.invalid);
        match beat_ms {
            Some(ms) if alive => println!(
                "agent     running, pid {}, heartbeat {ms} ms ago",
                s.agent_pid
            ),
            Some(ms) => println!(
                "agent     not running (last heartbeat {ms} ms ago, pid {})",
                s.agent_pid
            ),
            None => println!("agent     never ran"),
        }
    }
    Ok(())
}
