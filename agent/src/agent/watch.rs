//! Watching leaf directories with inotify, so a write by an application that did not load
//! libmultidb (a migration, an operator's `sqlite3`) is replicated at once rather than at the
//! next scan.
//!
//! One watch per directory that holds databases, never one per database. The kernel's
//! events name the directory (watch descriptor) and the file; the scheduler maps the
//! descriptor to the arena's directory id through a table indexed by descriptor (4 bytes per
//! watched directory) and finds the database by name among that directory's records, so a
//! watch costs no per-database map. Scans stay for what events cannot tell: new directories,
//! a queue overflow, directories left unwatched when the kernel's limit is reached.
//!
//! What counts as a write (`IN_MODIFY` only): a commit writes the `-wal`; a connection that
//! closes last checkpoints into the database file and deletes the `-wal`, so a modified
//! database file counts too while the database is cold. Not `IN_CLOSE_WRITE`: SQLite opens
//! files read-write, so a reader closing fires it without writing. `-shm` and `-journal` are
//! ignored (readers, the agent's own read transactions). The agent's own writes (its
//! checkpoints while hot) arrive while the database is hot, when only a changed `-wal` stamp
//! counts, or just after its demotion, when a change is checked against what the demotion left
//! (see [`Echo`]), so they never keep a database hot.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::*;

/// The events a leaf directory is watched for.
const WATCH_MASK: u32 = libc::IN_MODIFY
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW
    | libc::IN_EXCL_UNLINK;
/// Events that add, remove or replace a database file: the next scan (within
/// [`RESCAN_AFTER_UNKNOWN`]) applies them, with the collision checks a new path needs.
const NAME_CHANGES: u32 =
    libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO;
/// How long the changes a demotion left on disk are remembered, to tell its late events from a
/// new write. Events reach the scheduler within milliseconds; the margin covers a busy queue.
const ECHO_WINDOW: Duration = Duration::from_secs(10);
/// Bytes read from the inotify descriptor at a time (a few hundred events).
const READ_BUFFER: usize = 64 * 1024;
/// Where Linux says how many watches one user may hold.
const MAX_USER_WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";

/// The inotify instance and which directory each watch descriptor names.
pub(super) struct Watches {
    fd: Option<Arc<OwnedFd>>,
    /// Watch descriptor → arena directory id ([`NO_DIR`]: free). The kernel hands out small,
    /// increasing descriptors, so this stays about as long as the number of watches.
    by_wd: Vec<u32>,
    /// One bit per arena directory: watched.
    watched: Vec<u64>,
    count: u64,
    unwatched: u64,
    limit: Option<u64>,
    limit_warned: bool,
}

const NO_DIR: u32 = u32::MAX;

/// What a demotion left on disk: its own checkpoint's late events match this and are not a
/// write.
pub(super) struct Echo {
    main_mtime_ns: u64,
    wal: WalStamp,
    at: Instant,
}

impl Echo {
    pub(super) fn now(path: &str) -> Echo {
        Echo {
            main_mtime_ns: main_mtime_ns(path),
            wal: WalStamp::of_wal(path),
            at: Instant::now(),
        }
    }
}

/// Whether the database file's header says WAL mode (read and write versions 2, bytes 18 and
/// 19). Read through a descriptor of its own, which is safe for a cold database only: the
/// agent holds no connection (and so no POSIX lock) that closing it could release.
fn in_wal_mode(path: &str) -> bool {
    use std::io::Read;
    let mut header = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok_and(|()| header[18] == 2 && header[19] == 2)
}

fn main_mtime_ns(path: &str) -> u64 {
    std::fs::metadata(path).map_or(0, |m| crate::discover::arena::mtime_ns(&m))
}

impl Watches {
    /// No inotify: every directory is scanned.
    pub(super) fn disabled() -> Watches {
        Watches {
            fd: None,
            by_wd: Vec::new(),
            watched: Vec::new(),
            count: 0,
            unwatched: 0,
            limit: None,
            limit_warned: false,
        }
    }

    /// A new inotify instance, or none (logged) when the kernel refuses one.
    pub(super) fn new(limit: Option<u64>) -> Watches {
        let mut watches = Watches::disabled();
        watches.limit = limit;
        // SAFETY: inotify_init1 takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            let error = std::io::Error::last_os_error();
            tracing::warn!(error = %error, "inotify is not available (see sysctl fs.inotify.max_user_instances); writes by applications without libmultidb are seen at each scan");
            return watches;
        }
        // SAFETY: `fd` is a descriptor we just opened and own.
        watches.fd = Some(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }));
        watches
    }

    pub(super) fn enabled(&self) -> bool {
        self.fd.is_some()
    }

    pub(super) fn fd(&self) -> Option<Arc<OwnedFd>> {
        self.fd.clone()
    }

    pub(super) fn watched(&self) -> u64 {
        self.count
    }

    /// Leaf directories scans alone cover: the kernel's or the configured limit was reached.
    pub(super) fn unwatched(&self) -> u64 {
        self.unwatched
    }

    fn is_watched(&self, dir: u32) -> bool {
        self.watched
            .get(dir as usize / 64)
            .is_some_and(|w| w & (1 << (dir % 64)) != 0)
    }

    fn set_watched(&mut self, dir: u32, on: bool) {
        let word = dir as usize / 64;
        if self.watched.len() <= word {
            self.watched.resize(word + 1, 0);
        }
        if on {
            self.watched[word] |= 1 << (dir % 64);
        } else {
            self.watched[word] &= !(1 << (dir % 64));
        }
    }

    /// The arena directory a watch descriptor names.
    pub(super) fn dir_of(&self, wd: i32) -> Option<u32> {
        let dir = *self.by_wd.get(usize::try_from(wd).ok()?)?;
        (dir != NO_DIR).then_some(dir)
    }

    /// The directory of `wd` was moved away: its events no longer name the path the arena
    /// knows, so the watch goes (the next scan watches whatever is at the path then).
    pub(super) fn unwatch(&mut self, wd: i32) {
        if let Some(fd) = &self.fd {
            // SAFETY: removes a watch of our own inotify descriptor; a stale `wd` is EINVAL.
            unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), wd) };
        }
        self.forget(wd);
    }

    /// The kernel removed watch `wd` (its directory was deleted or unmounted).
    pub(super) fn forget(&mut self, wd: i32) {
        if let Some(dir) = self.dir_of(wd) {
            self.by_wd[wd as usize] = NO_DIR;
            self.set_watched(dir, false);
            self.count -= 1;
        }
    }

    /// Watches every directory of `arena` that holds databases and has no watch yet, until a
    /// limit is reached; the rest are counted as unwatched (scans cover them) and tried again
    /// after the next scan.
    pub(super) fn watch_new_dirs(&mut self, arena: &Arena) {
        let Some(fd) = self.fd.clone() else {
            self.unwatched = arena.leaf_dirs().len() as u64;
            return;
        };
        let mut unwatched = 0;
        let mut full = false;
        for dir in arena.leaf_dirs() {
            if self.is_watched(dir) {
                continue;
            }
            if full || self.limit.is_some_and(|l| self.count >= l) {
                full = true;
                unwatched += 1;
                continue;
            }
            let path = arena.dir_path(dir);
            let Ok(c_path) = CString::new(path.as_bytes()) else {
                unwatched += 1;
                continue;
            };
            // SAFETY: `fd` is our inotify descriptor and `c_path` a NUL-terminated path.
            let wd =
                unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_path.as_ptr(), WATCH_MASK) };
            if wd < 0 {
                let error = std::io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::ENOSPC) => {
                        full = true;
                        unwatched += 1;
                    }
                    // Gone since the scan, or replaced by something else: the next scan knows.
                    Some(libc::ENOENT) | Some(libc::ENOTDIR) => {}
                    _ => {
                        tracing::debug!(dir = %path, error = %error, "watching the directory failed; scans cover it");
                        unwatched += 1;
                    }
                }
                continue;
            }
            let slot = wd as usize;
            if self.by_wd.len() <= slot {
                self.by_wd.resize(slot + 1, NO_DIR);
            }
            if self.by_wd[slot] == NO_DIR {
                self.count += 1;
            }
            self.by_wd[slot] = dir;
            self.set_watched(dir, true);
        }
        self.unwatched = unwatched;
        if full && !self.limit_warned {
            self.limit_warned = true;
            match self.limit {
                Some(limit) if self.count >= limit => tracing::warn!(
                    watched = self.count,
                    unwatched,
                    "max_watches ({limit}) reached: {unwatched} directories are not watched and are seen only at each scan; raise max_watches in the configuration"
                ),
                _ => {
                    let kernel = std::fs::read_to_string(MAX_USER_WATCHES)
                        .map(|s| s.trim().to_string())
                        .unwrap_or_else(|_| "?".into());
                    tracing::warn!(
                        watched = self.count,
                        unwatched,
                        "the kernel's inotify watch limit is reached (fs.inotify.max_user_watches = {kernel}, shared by every process of this user): {unwatched} directories are not watched and are seen only at each scan; raise it with `sysctl fs.inotify.max_user_watches={}`",
                        (self.count + unwatched).saturating_mul(2).max(kernel.parse::<u64>().unwrap_or(0) * 2)
                    );
                }
            }
        } else if !full {
            self.limit_warned = false;
        }
        // Bytes per directory stay bounded: the descriptor table and the bit set only grow
        // with the number of watches and directories.
        self.by_wd.shrink_to_fit();
    }

    /// Heap bytes the watch tables hold.
    pub(super) fn heap_bytes(&self) -> usize {
        self.by_wd.capacity() * 4 + self.watched.capacity() * 8
    }
}

/// One event as the reader forwards it: coalesced per read, so a burst of writes to one file
/// (SQLite writes each frame with its own call) is one event.
pub(super) struct FsEvent {
    pub wd: i32,
    pub mask: u32,
    pub name: Vec<u8>,
}

/// The watch reader thread, and the eventfd that wakes it to stop: it sleeps in `poll`
/// without a timeout, so an idle host pays no wake-ups for it.
pub(super) struct WatchReader {
    thread: std::thread::JoinHandle<()>,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
}

impl WatchReader {
    pub(super) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        let _ = self.thread.join();
    }
}

/// Starts the watch reader: it reads the inotify descriptor and sends events to the scheduler.
pub(super) fn spawn_watch_reader(
    fd: Arc<OwnedFd>,
    events: Sender<Event>,
) -> std::io::Result<WatchReader> {
    // SAFETY: eventfd takes an initial value and flags and returns a new descriptor or -1.
    let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if wake < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `wake` is a descriptor we just opened and own.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(wake) });
    let stop = Arc::new(AtomicBool::new(false));
    let (thread_wake, thread_stop) = (wake.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || {
            // u64 words, so the kernel's event structures are aligned for reading.
            let mut buf = vec![0u64; READ_BUFFER / 8];
            let mut batch: Vec<FsEvent> = Vec::new();
            while !thread_stop.load(Ordering::Relaxed) {
                let mut polls = [fd.as_raw_fd(), thread_wake.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                // SAFETY: two valid pollfds for the duration of the call.
                if unsafe { libc::poll(polls.as_mut_ptr(), 2, -1) } <= 0
                    || polls[0].revents & libc::POLLIN == 0
                {
                    continue;
                }
                // SAFETY: `buf` is writable for its whole length in bytes.
                let n =
                    unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len() * 8) };
                let Ok(n) = usize::try_from(n) else { continue };
                // SAFETY: the u64 buffer viewed as the bytes the kernel wrote into it.
                let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                parse_events(bytes, &mut batch);
                for event in batch.drain(..) {
                    if events.send(Event::Fs(event)).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(WatchReader { thread, wake, stop })
}

/// Splits what one `read` returned into events, merging repeats of (descriptor, name).
fn parse_events(mut bytes: &[u8], out: &mut Vec<FsEvent>) {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    while bytes.len() >= HEADER {
        // SAFETY: HEADER bytes are available; read_unaligned needs no alignment.
        let header: libc::inotify_event =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let len = header.len as usize;
        let Some(name) = bytes.get(HEADER..HEADER + len) else {
            return;
        };
        // The name is NUL-padded to an alignment boundary.
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        bytes = &bytes[HEADER + len..];
        // Every commit and every read transaction writes the `-shm`: dropped here, so they
        // never wake the scheduler (which ignores them).
        if name.ends_with(b"-shm") || name.ends_with(b"-journal") {
            continue;
        }
        if let Some(seen) = out.iter_mut().find(|e| e.wd == header.wd && e.name == name) {
            seen.mask |= header.mask;
            continue;
        }
        out.push(FsEvent {
            wd: header.wd,
            mask: header.mask,
            name: name.to_vec(),
        });
    }
}

impl Scheduler<'_> {
    /// Watches the directories the last scan found that have no watch yet.
    pub(super) fn watch_new_dirs(&mut self) {
        self.watches.watch_new_dirs(self.arena);
    }

    /// An inotify event: a write to a cold database promotes it at once; a name added,
    /// removed or replaced asks for a scan.
    pub(super) fn on_fs_event(&mut self, event: FsEvent) {
        let FsEvent { wd, mask, name } = event;
        if mask & libc::IN_Q_OVERFLOW != 0 {
            // Events were lost: only a scan can tell what changed.
            tracing::debug!("inotify queue overflowed; scanning");
            self.rescan_soon = Some(Instant::now());
            return;
        }
        if mask & libc::IN_IGNORED != 0 {
            self.watches.forget(wd);
            self.ask_rescan();
            return;
        }
        if mask & libc::IN_MOVE_SELF != 0 {
            self.watches.unwatch(wd);
            self.ask_rescan();
            return;
        }
        let Some(dir) = self.watches.dir_of(wd) else {
            return;
        };
        let (base, is_wal) = match name.strip_suffix(b"-wal") {
            Some(base) => (base, true),
            None if name.ends_with(b"-shm") || name.ends_with(b"-journal") => return,
            None => (&name[..], false),
        };
        let Some(id) = self.arena.find_in_dir(dir, base) else {
            // A new database (or a new name for one): the scan adds it. Other files (an
            // application's log beside its databases) must not cost a scan per write.
            if !is_wal
                && mask & (NAME_CHANGES | libc::IN_MODIFY) != 0
                && self.names_a_database(base)
            {
                self.ask_rescan();
            }
            return;
        };
        if !is_wal && mask & NAME_CHANGES != 0 {
            self.ask_rescan();
        }
        if mask & libc::IN_MODIFY != 0 {
            self.metrics.watch_writes.fetch_add(1, Ordering::Relaxed);
            self.on_watched_write(id, is_wal);
        }
    }

    /// Whether a file of this name in a leaf directory would be a database.
    fn names_a_database(&self, name: &[u8]) -> bool {
        let last = self.config.multi_db.pattern.segments().last();
        std::str::from_utf8(name).is_ok_and(|name| last.is_some_and(|s| s.matches(name)))
    }

    fn on_watched_write(&mut self, id: DbId, is_wal: bool) {
        if let Some(hot) = self.hot.get(&id) {
            // The ring (libmultidb), a sync in progress or one already due covers it; a hot
            // database's file changes by the agent's own checkpoints, so only a `-wal` that
            // changed since the last sync started is a write.
            if !is_wal || hot.job.running() || hot.dirty {
                return;
            }
            if WalStamp::of_wal(&hot.path) == hot.wal_stamp {
                return;
            }
        } else if !is_wal && self.refused.contains_key(&id) {
            // A database refused for not being in WAL mode (the one refusal a write can
            // undo) is retried when a `-wal` appears, not at each write of its rollback
            // journal; the ring's records retry it for applications with libmultidb.
            return;
        } else {
            let path = self.arena.path(id);
            if let Some(echo) = self.echoes.get(&id) {
                if echo.wal == WalStamp::of_wal(&path) && echo.main_mtime_ns == main_mtime_ns(&path)
                {
                    return;
                }
                self.echoes.remove(&id);
            }
            // A rollback-journal database is written in place: opening it now, mid-write,
            // would hold a shared lock that fails the application's next commit with
            // SQLITE_BUSY. The ring and scans cover such databases, as before.
            if !is_wal && !in_wal_mode(&path) {
                return;
            }
        }
        self.on_write(id, layout::now_ns(), Signal::Detected);
    }

    /// A demotion finished: its own checkpoint's events may still be on their way.
    pub(super) fn remember_echo(&mut self, id: DbId, path: &str) {
        if self.watches.enabled() {
            self.echoes.insert(id, Echo::now(path));
        }
    }

    pub(super) fn forget_old_echoes(&mut self) {
        if !self.echoes.is_empty() {
            self.echoes.retain(|_, e| e.at.elapsed() < ECHO_WINDOW);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_event(wd: i32, mask: u32, name: &str) -> Vec<u8> {
        let mut padded = name.as_bytes().to_vec();
        padded.resize((name.len() + 1).next_multiple_of(16), 0);
        let header = libc::inotify_event {
            wd,
            mask,
            cookie: 0,
            len: padded.len() as u32,
        };
        // SAFETY: inotify_event is plain old data.
        let mut out = unsafe {
            std::slice::from_raw_parts(
                (&header as *const libc::inotify_event).cast::<u8>(),
                std::mem::size_of::<libc::inotify_event>(),
            )
        }
        .to_vec();
        out.extend_from_slice(&padded);
        out
    }

    #[test]
    fn events_are_parsed_and_repeats_merged() {
        let mut bytes = raw_event(1, libc::IN_MODIFY, "a.db-wal");
        bytes.extend(raw_event(2, libc::IN_CREATE, "b.db"));
        bytes.extend(raw_event(1, libc::IN_MODIFY, "a.db-wal"));
        bytes.extend(raw_event(1, libc::IN_DELETE, "a.db-wal"));
        bytes.extend(raw_event(1, libc::IN_MODIFY, "a.db-shm"));
        bytes.extend(raw_event(-1, libc::IN_Q_OVERFLOW, ""));
        let mut out = Vec::new();
        parse_events(&bytes, &mut out);
        let got: Vec<(i32, u32, &[u8])> = out.iter().map(|e| (e.wd, e.mask, &e.name[..])).collect();
        assert_eq!(
            got,
            [
                (1, libc::IN_MODIFY | libc::IN_DELETE, &b"a.db-wal"[..]),
                (2, libc::IN_CREATE, &b"b.db"[..]),
                (-1, libc::IN_Q_OVERFLOW, &b""[..]),
            ]
        );
        // A truncated read ends the parse without reading past the end.
        let mut out = Vec::new();
        parse_events(&bytes[..20], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn watches_map_descriptors_to_directories_and_respect_the_limit() {
        use crate::discover::arena::{Diff, FoundFile};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_str().unwrap();
        let mut arena = Arena::new(root);
        let mut diff = Diff::default();
        arena.begin_scan();
        for (i, d) in ["a", "b", "c"].iter().enumerate() {
            std::fs::create_dir(tmp.path().join(d)).unwrap();
            let file = FoundFile {
                name: "x.db".into(),
                ino: i as u64,
                wal: WalStamp::NONE,
            };
            arena.visit_dir(&[d], 1, &[file], &mut diff);
        }
        arena.end_scan(&[], &mut diff);
        let mut watches = Watches::new(Some(2));
        assert!(watches.enabled());
        watches.watch_new_dirs(&arena);
        assert_eq!((watches.watched(), watches.unwatched()), (2, 1));
        let dirs: Vec<u32> = (0..8).filter_map(|wd| watches.dir_of(wd)).collect();
        assert_eq!(dirs.len(), 2);
        for dir in dirs {
            assert_eq!(
                arena
                    .find_in_dir(dir, b"x.db")
                    .map(|id| arena.path(id).ends_with("/x.db")),
                Some(true)
            );
        }
        watches.limit = None;
        watches.watch_new_dirs(&arena);
        assert_eq!((watches.watched(), watches.unwatched()), (3, 0));
        let wd = (0..8).find(|&wd| watches.dir_of(wd).is_some()).unwrap();
        watches.forget(wd);
        assert_eq!(watches.watched(), 2);
        watches.watch_new_dirs(&arena);
        assert_eq!(
            watches.watched(),
            3,
            "a forgotten directory is watched again"
        );
    }
}
