//! The commit path: the WAL hook that posts one record per commit into the ring and then
//! applies the checkpoint policy, and the hooks that install it on every connection.
//!
//! Installing a WAL hook replaces SQLite's auto-checkpoint (which is itself a WAL hook), so
//! the hook checkpoints as SQLite would (PASSIVE once the WAL reaches the connection's
//! threshold) unless a live agent replicates the database: then checkpoints are the agent's,
//! up to a hard cap. The threshold travels in the hook's argument pointer, so no per-connection
//! allocation exists to leak when connections close.

use std::os::raw::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use sqlite_loadable::prelude::sqlite3;

use crate::ring::{self, Commit};
use crate::{api, shared};

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

/// Installs the WAL hook on `db` with checkpoint threshold `threshold` (0 disables).
///
/// # Safety
/// `db` must be an open connection.
pub unsafe fn install(db: *mut sqlite3, threshold: u32) {
    // SAFETY: `db` is open (caller's contract).
    unsafe { api::wal_hook(db, Some(wal_hook), threshold as usize as *mut c_void) };
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
/// `arg` carries the checkpoint threshold as an integer, never a pointer.
unsafe extern "C" fn wal_hook(
    arg: *mut c_void,
    db: *mut sqlite3,
    schema: *const c_char,
    frames: c_int,
) -> c_int {
    let threshold = arg as usize as u64;
    let frames = u64::try_from(frames).unwrap_or(0);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: SQLite passes the open connection and the schema name of the commit.
        unsafe { on_commit(db, schema, frames, threshold) }
    }));
    api::SQLITE_OK
}

/// Posts the commit and applies the checkpoint policy.
///
/// # Safety
/// `db` open, `schema` a valid schema name (as given to the WAL hook).
unsafe fn on_commit(db: *mut sqlite3, schema: *const c_char, frames: u64, threshold: u64) {
    let now = ring::now_ns();
    let ring = shared::ring(now);
    let alive = ring.is_some_and(|r| r.agent_alive(now, ring::AGENT_ALIVE_NS));
    let mut hot = false;
    // SAFETY: `db` and `schema` come from SQLite for this commit.
    let path = unsafe { api::db_filename(db, schema) };
    let hash = ring::path_hash(path);
    shared::note_commit_time(hash, now);
    if let Some(ring) = ring {
        if let Some(info) = shared::lookup(hash, path, now) {
            let pid = PID.load(std::sync::atomic::Ordering::Relaxed);
            if info.registered != ring.generation()
                && ring.push_registration(info.dev, info.ino, pid, path)
            {
                shared::mark_registered(hash, ring.generation());
            }
            let commit = Commit {
                dev: info.dev,
                ino: info.ino,
                path_hash: hash,
                frames,
                pid,
                time_ns: now,
            };
            ring.push_commit(&commit);
            shared::note_commit(hash, frames, now);
            hot = alive
                && ring
                    .status(info.dev, info.ino)
                    .is_some_and(|s| s.tier == ring::Tier::Hot);
        }
    }
    // SAFETY: `db` is open.
    unsafe { api::set_no_checkpoint_on_close(db, alive) };
    if threshold == 0 {
        return;
    }
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
