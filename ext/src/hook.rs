//! The commit path: the WAL hook that posts one record per commit into the ring and then
//! applies the checkpoint policy, and the hooks that install it on every connection.
//!
//! Installing a WAL hook replaces SQLite's auto-checkpoint (which is itself a WAL hook), so
//! the hook checkpoints as SQLite would (PASSIVE once the WAL reaches the connection's
//! threshold) unless a live agent replicates the database: then checkpoints are the agent's,
//! up to a hard cap. The threshold and the connection's cache ticket (see `connection`) travel
//! in the hook's argument pointer, so no per-connection allocation exists to leak when
//! connections close.
//!
//! Every commit of the application runs through here: a steady-state commit costs about 290
//! instructions (`multidb bench commit` counts them) and no system call.

use std::os::raw::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use sqlite_loadable::prelude::sqlite3;

use crate::ring::{self, Commit};
use crate::{api, connection, shared};

/// SQLite's default auto-checkpoint threshold, in WAL frames (pages).
pub const DEFAULT_AUTOCHECKPOINT: u32 = 1000;
/// With a live agent replicating the database, the WAL may grow to this many times the
/// threshold (at least [`HARD_CAP_MIN_FRAMES`]) before the extension checkpoints anyway: the
/// agent checkpoints far earlier, this only bounds the WAL if the agent stalls.
pub const HARD_CAP_FACTOR: u64 = 10;
pub const HARD_CAP_MIN_FRAMES: u64 = 10_000;

/// The process id, cached because `getpid` is a system call; refreshed in a forked child.
static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn refresh_pid() {
    PID.store(std::process::id(), std::sync::atomic::Ordering::Relaxed);
}

/// Sets up process-wide state once: the cached pid and its refresh after `fork`.
pub fn init_process() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        refresh_pid();
        // SAFETY: registers a handler that only stores an integer; valid for the process life.
        unsafe { libc::pthread_atfork(None, None, Some(refresh_pid)) };
    });
}

/// Installs the WAL hook on `db` with checkpoint threshold `threshold` (0 disables), with a
/// fresh slot of the per-connection cache.
///
/// # Safety
/// `db` must be an open connection.
pub unsafe fn install(db: *mut sqlite3, threshold: u32) {
    let arg = connection::pack(threshold, connection::claim(db));
    // SAFETY: `db` is open (caller's contract).
    unsafe { api::wal_hook(db, Some(wal_hook), arg as *mut c_void) };
}

/// The auto-extension's commit hook: SQLite resets the WAL hook after auto-extensions run, so
/// the WAL hook is installed at the connection's first commit, and this hook removes itself.
///
/// # Safety
/// Called by SQLite only, as the commit hook installed by `auto_init`: `arg` is the open
/// connection the hook belongs to.
pub unsafe extern "C" fn first_commit(arg: *mut c_void) -> c_int {
    let db = arg.cast::<sqlite3>();
    let _ = catch_unwind(|| {
        // SAFETY: SQLite calls the commit hook on the open connection it was installed on,
        // which is `arg`; replacing hooks from inside the callback only swaps pointers.
        unsafe {
            install(db, DEFAULT_AUTOCHECKPOINT);
            api::commit_hook(db, None, std::ptr::null_mut());
        }
    });
    0 // let the commit proceed
}

/// The WAL hook: posts the commit and applies the checkpoint policy.
///
/// # Safety
/// Called by SQLite only, after a commit on `db` (open) to schema `schema` (a valid name);
/// `arg` carries the checkpoint threshold and the connection's ticket as integers, never a
/// pointer.
unsafe extern "C" fn wal_hook(
    arg: *mut c_void,
    db: *mut sqlite3,
    schema: *const c_char,
    frames: c_int,
) -> c_int {
    let (threshold, ticket) = connection::unpack(arg as usize);
    let frames = u64::try_from(frames).unwrap_or(0);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: SQLite passes the open connection and the schema name of the commit.
        unsafe { on_commit(db, schema, frames, threshold, ticket) }
    }));
    api::SQLITE_OK
}

/// The database a commit went to, as the commit path needs it.
struct Target<'a> {
    cached: connection::Cached,
    /// The path, once it was asked for in this commit (registration needs it).
    path: Option<&'a [u8]>,
    /// Whether `cached` describes the schema committed to (its device and inode are known).
    known: bool,
}

/// Posts the commit and applies the checkpoint policy.
///
/// Steady state: one clock read, the connection's slot, one ring record, two counters; the
/// path, its `stat`, the registration and `sqlite3_db_config` only when something changed.
///
/// # Safety
/// `db` open, `schema` a valid schema name (as given to the WAL hook).
unsafe fn on_commit(
    db: *mut sqlite3,
    schema: *const c_char,
    frames: u64,
    threshold: u32,
    ticket: u32,
) {
    let now = ring::now_ns();
    let ring = shared::ring(now);
    let alive = ring.is_some_and(|r| r.agent_alive(now, ring::AGENT_ALIVE_NS));
    let slot = match connection::get(ticket, db) {
        Ok(cached) => Some(cached),
        Err(miss) => {
            if miss == connection::Miss::Taken {
                // SAFETY: `db` is open; swapping the hook's argument inside the hook is what
                // SQLite's own hook management does under the connection's mutex.
                unsafe { install(db, threshold) };
            }
            None
        }
    };
    // SAFETY: `schema` comes from SQLite for this commit.
    let main = unsafe { connection::is_main(schema) };
    let fresh = |c: &connection::Cached| {
        c.checked_ns != 0 && now.saturating_sub(c.checked_ns) < shared::PATH_RECHECK_NS
    };
    // Whether the slot must be written back: only when something changed, never per commit.
    let mut dirty = false;
    let mut target = match slot.filter(|c| main && fresh(c)) {
        Some(cached) => Target {
            cached,
            path: None,
            known: true,
        },
        None => {
            dirty = main;
            // SAFETY: `db` and `schema` come from SQLite for this commit.
            unsafe { resolve(db, schema, now, slot.unwrap_or_default()) }
        }
    };
    let hash = target.cached.hash;
    shared::note_commit_time(hash, now);
    if let (Some(ring), true) = (ring, target.known) {
        let pid = PID.load(std::sync::atomic::Ordering::Relaxed);
        let generation = ring.generation();
        if target.cached.registered != generation {
            // Another connection of this process may have registered the file already.
            let (dev, ino) = (target.cached.dev, target.cached.ino);
            let registered = shared::peek(hash)
                .is_some_and(|i| i.registered == generation && (i.dev, i.ino) == (dev, ino));
            let path = || {
                target.path.unwrap_or_else(|| {
                    // SAFETY: `db` and `schema` come from SQLite for this commit.
                    unsafe { api::db_filename(db, schema) }
                })
            };
            if registered || ring.push_registration(dev, ino, pid, path()) {
                shared::mark_registered(hash, generation);
                target.cached.registered = generation;
                dirty = main;
            }
        }
        ring.push_commit(&Commit {
            dev: target.cached.dev,
            ino: target.cached.ino,
            path_hash: hash,
            frames,
            pid,
            time_ns: now,
        });
        shared::note_commit(hash, frames, now);
    }
    // What the connection's slot holds after this commit: the main database's identity, and
    // the close-checkpoint setting, which is the connection's whatever schema committed.
    let mut state = if main {
        target.cached
    } else {
        slot.unwrap_or_default()
    };
    if !state.no_checkpoint_on_close_is(alive) {
        // SAFETY: `db` is open.
        unsafe { api::set_no_checkpoint_on_close(db, alive) };
        state.set_no_checkpoint_on_close(alive);
        dirty = true;
    }
    if dirty && slot.is_some() {
        connection::put(ticket, db, &state);
    }
    if threshold == 0 || frames < u64::from(threshold) {
        return;
    }
    // Only a WAL past the threshold asks whether the agent replicates the database, so the
    // status table is read when a checkpoint is due, not on every commit.
    let hot = alive
        && target.known
        && ring.is_some_and(|r| {
            r.status(target.cached.dev, target.cached.ino)
                .is_some_and(|s| s.tier == ring::Tier::Hot)
        });
    let threshold = u64::from(threshold);
    let limit = if hot {
        (threshold * HARD_CAP_FACTOR).max(HARD_CAP_MIN_FRAMES)
    } else {
        threshold
    };
    if frames >= limit {
        // SAFETY: checkpointing from inside the WAL hook is what SQLite's own hook does.
        unsafe { api::checkpoint_passive(db, schema) };
    }
}

/// The slow path: the schema's file name, its hash, and its (device, inode) from the
/// process-wide path cache (a `stat` at most every [`shared::PATH_RECHECK_NS`]).
///
/// # Safety
/// `db` open, `schema` a valid schema name.
unsafe fn resolve<'a>(
    db: *mut sqlite3,
    schema: *const c_char,
    now: u64,
    previous: connection::Cached,
) -> Target<'a> {
    // SAFETY: caller's contract. The name lives as long as the schema is attached, which
    // outlasts this commit, the only use of the returned target.
    let path: &'a [u8] = unsafe { api::db_filename(db, schema) };
    let hash = ring::path_hash(path);
    let mut cached = previous;
    cached.hash = hash;
    let info = shared::lookup(hash, path, now);
    if let Some(info) = info {
        cached.dev = info.dev;
        cached.ino = info.ino;
        cached.checked_ns = info.checked_ns;
        cached.registered = info.registered;
    }
    Target {
        cached,
        path: Some(path),
        known: info.is_some(),
    }
}
