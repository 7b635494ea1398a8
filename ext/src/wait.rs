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

/// What `multidb_wait` can say about a database at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The commit is in the replica.
    Durable,
    /// Not yet; the agent replicates the database (or has not decided about it yet).
    Pending,
    /// It will not be: no agent, or the agent does not replicate this database.
    Never,
}

/// The decision for a database given what the agent published. `committed` is when this
/// process last committed to it in WAL mode (0: never), `entry` the current run's status
/// entry for it; `alive` whether the agent's heartbeat is fresh.
///
/// Without a WAL commit of its own the process can only promise what the agent states: a
/// replicated database that is caught up. A database the agent has no entry for, and that
/// this process never wrote in WAL mode (rollback journal, MEMORY journal, an empty file),
/// gets 0 at once: nothing will ever make that a durable commit.
pub fn decide(committed: u64, alive: bool, entry: Option<ring::Status>) -> Decision {
    if !alive {
        return Decision::Never;
    }
    match entry {
        Some(e) if e.tier == ring::Tier::Refused => Decision::Never,
        Some(e) if committed == 0 => {
            if e.pending_since_ns == 0 {
                Decision::Durable
            } else {
                Decision::Pending
            }
        }
        Some(e) if e.last_sync_ns >= committed => Decision::Durable,
        Some(_) => Decision::Pending,
        None if committed == 0 => Decision::Never,
        None => Decision::Pending,
    }
}

/// Waits until the last commit this process made to `path` is in the replica.
pub fn wait(path: &[u8], timeout: Duration) -> bool {
    let hash = ring::path_hash(path);
    let committed = shared::last_commit_time(hash);
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        let now = ring::now_ns();
        // Fresh looks (system calls are fine here): a ring replaced or a file recreated a
        // moment ago must not be judged by a stale mapping or inode.
        let Some(ring) = shared::ring_now(now) else {
            return false; // no agent: nothing will replicate the commit
        };
        let Some(info) = shared::lookup_fresh(hash, path, now) else {
            return false; // the database file is gone
        };
        let alive = ring.agent_alive(now, ring::AGENT_ALIVE_NS);
        match decide(committed, alive, ring.status(info.dev, info.ino)) {
            Decision::Durable => return true,
            Decision::Never => return false,
            Decision::Pending => {}
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{reason, Status, Tier};

    fn entry(tier: Tier, last_sync_ns: u64, pending_since_ns: u64) -> Option<Status> {
        Some(Status {
            tier,
            last_sync_ns,
            pending_since_ns,
            reason: if tier == Tier::Refused {
                reason::NOT_WAL
            } else {
                0
            },
            ..Status::default()
        })
    }

    #[test]
    fn durable_only_when_a_sync_of_this_run_started_after_the_commit() {
        assert_eq!(
            decide(100, true, entry(Tier::Hot, 100, 0)),
            Decision::Durable
        );
        assert_eq!(
            decide(100, true, entry(Tier::Cold, 150, 0)),
            Decision::Durable
        );
        assert_eq!(
            decide(100, true, entry(Tier::Hot, 99, 100)),
            Decision::Pending
        );
        // The agent has not heard of the database yet: it may still promote it.
        assert_eq!(decide(100, true, None), Decision::Pending);
    }

    #[test]
    fn never_without_an_agent_or_for_a_refused_database() {
        assert_eq!(
            decide(100, false, entry(Tier::Hot, 200, 0)),
            Decision::Never
        );
        assert_eq!(
            decide(100, true, entry(Tier::Refused, 0, 0)),
            Decision::Never
        );
        assert_eq!(decide(0, true, entry(Tier::Refused, 0, 0)), Decision::Never);
    }

    #[test]
    fn without_a_wal_commit_only_a_caught_up_entry_is_durable() {
        // Rollback journal, MEMORY journal, empty file: no WAL commit, no entry.
        assert_eq!(decide(0, true, None), Decision::Never);
        assert_eq!(decide(0, true, entry(Tier::Cold, 50, 0)), Decision::Durable);
        assert_eq!(decide(0, true, entry(Tier::Hot, 50, 40)), Decision::Pending);
    }
}
