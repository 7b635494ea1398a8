//! `multidb_wait(timeout_ms)`: synchronous replication on request. Returns 1 once the
//! connection's last commit to its main database is durable in the replica, 0 if that did
//! not happen within `timeout_ms` (no agent, agent stopped, replica unreachable).
//!
//! The agent publishes, per database, the time its last successful sync started reading the
//! WAL; every commit made before that instant is in the replica. The WAL hook records when
//! this process last committed to each database, so the wait compares two timestamps of the
//! same clock and never needs the agent's TXIDs. It sleeps between looks: it is the one
//! function of the extension that is meant to block.

use std::time::Duration;

use sqlite_loadable::prelude::*;
use sqlite_loadable::{api as sql, Error, Result};

use crate::ring;
use crate::{api, guard, shared};

/// The longest timeout accepted: an hour. A longer wait is a bug in the caller.
pub const MAX_TIMEOUT_MS: i64 = 3_600_000;
/// The first pause between looks; it doubles up to [`MAX_PAUSE`], so a sync that lands within
/// a few milliseconds is seen within a fraction of one.
const FIRST_PAUSE: Duration = Duration::from_micros(200);
const MAX_PAUSE: Duration = Duration::from_millis(10);

/// `multidb_wait(timeout_ms)` → 1 or 0.
pub fn multidb_wait(context: *mut sqlite3_context, values: &[*mut sqlite3_value]) -> Result<()> {
    guard("multidb_wait", || {
        let bad = || {
            Error::new_message(&format!(
                "multidb_wait: 1st argument (timeout_ms) must be an integer from 0 to {MAX_TIMEOUT_MS}"
            ))
        };
        let value = values.first().ok_or_else(bad)?;
        if !matches!(sql::value_type(value), sql::ValueType::Integer) {
            return Err(bad());
        }
        let timeout_ms = sql::value_int64(value);
        if !(0..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
            return Err(bad());
        }
        // SAFETY: `context` is the running function's context.
        let db = unsafe { api::context_db_handle(context) };
        // SAFETY: `db` is the open connection running this function; "main" is NUL-terminated.
        let path = unsafe { api::db_filename(db, c"main".as_ptr()) };
        let durable = wait(path, Duration::from_millis(timeout_ms as u64));
        sql::result_int64(context, i64::from(durable));
        Ok(())
    })
}

/// Waits until the last commit this process made to `path` is in the replica.
pub fn wait(path: &[u8], timeout: Duration) -> bool {
    let hash = ring::path_hash(path);
    let committed = shared::last_commit_time(hash);
    if committed == 0 {
        return true; // nothing committed here that could be pending
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        let now = ring::now_ns();
        if let (Some(ring), Some(info)) = (shared::ring(now), shared::lookup(hash, path, now)) {
            let alive = ring.agent_alive(now, ring::AGENT_ALIVE_NS);
            let entry = ring.status(info.dev, info.ino);
            if alive && entry.is_some_and(|e| e.last_sync_ns >= committed) {
                return true;
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}
