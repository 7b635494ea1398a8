//! `multidb_status()` and `multidb_autocheckpoint(N)`: what the agent says about this
//! connection's database, and the checkpoint threshold that replaces
//! `PRAGMA wal_autocheckpoint` (which would remove the extension's WAL hook).

use serde_json::{json, Value};
use sqlite_loadable::prelude::*;
use sqlite_loadable::{api as sql, Error, Result};

use crate::ring::{self, Ring, Tier};
use crate::{api, guard, hook, shared};

fn ms(ns: u64) -> u64 {
    ns / 1_000_000
}

/// `multidb_status()` → JSON about the agent, the main database and the ring.
pub fn multidb_status(context: *mut sqlite3_context, values: &[*mut sqlite3_value]) -> Result<()> {
    guard("multidb_status", || {
        if !values.is_empty() {
            return Err(Error::new_message("multidb_status: takes no arguments"));
        }
        // SAFETY: `context` is the running function's context.
        let db = unsafe { api::context_db_handle(context) };
        // SAFETY: `db` is the open connection running this function; "main" is NUL-terminated.
        let path = unsafe { api::db_filename(db, c"main".as_ptr()) };
        let now = ring::now_ns();
        // Fresh looks, as `multidb_wait` takes them: this is not the commit path.
        let ring = shared::ring_now(now);
        if !path.is_empty() {
            shared::lookup_fresh(ring::path_hash(path), path, now);
        }
        let status = report(ring, path, now);
        sql::result_text(context, status.to_string())
    })
}

/// The WAL frame count after this process's last commit to the database, if it made one.
fn committed(info: Option<shared::PathInfo>) -> Option<u64> {
    info.filter(|i| i.last_commit_ns != 0)
        .map(|i| i.last_frames)
}

/// The status object; separate from the SQL glue so it can be tested directly.
pub fn report(ring: Option<Ring<'_>>, path: &[u8], now: u64) -> Value {
    let hash = ring::path_hash(path);
    let cached = shared::peek(hash);
    let path_text = String::from_utf8_lossy(path);
    let Some(ring) = ring else {
        return json!({
            "agent": {"running": false, "pid": null, "heartbeat_age_ms": null},
            "database": {
                "path": path_text,
                "tier": "unknown",
                "replicated": false,
                "reason": "no agent is running (no ring file)",
                "committed_frames": committed(cached),
            },
            "ring": null,
        });
    };
    let stats = ring.stats();
    let alive = ring.agent_alive(now, ring::AGENT_ALIVE_NS);
    let ids = if path.is_empty() {
        None
    } else {
        shared::lookup(hash, path, now)
    };
    let entry = ids.and_then(|i| ring.status(i.dev, i.ino));
    let entry = entry.filter(|_| alive);
    let tier = match entry.map(|e| e.tier) {
        _ if !alive => "unknown",
        Some(Tier::Hot) => "hot",
        Some(Tier::Cold) => "cold",
        Some(Tier::Refused) => "refused",
        _ => "unknown",
    };
    let replicated = entry.is_some_and(|e| e.tier == Tier::Hot || e.tier == Tier::Cold);
    let reason = match entry {
        _ if !alive => Some("no agent is running (its heartbeat stopped)"),
        Some(e) if e.tier == Tier::Refused => Some(ring::reason::text(e.reason)),
        Some(_) => None,
        None => Some("the agent has no entry for this database (not written in WAL mode since the agent started, or not under its pattern)"),
    };
    let mut database = json!({
        "path": path_text,
        "tier": tier,
        "replicated": replicated,
        "reason": reason,
        "committed_frames": committed(ids),
    });
    if let (Some(e), Some(obj)) = (entry.filter(|_| replicated), database.as_object_mut()) {
        obj.insert("replicated_txid".into(), e.replicated_txid.into());
        obj.insert("replicated_frames".into(), e.replicated_frames.into());
        let since_sync = (e.last_sync_ns != 0).then(|| ms(now.saturating_sub(e.last_sync_ns)));
        obj.insert("last_sync_age_ms".into(), since_sync.into());
        let lag = if e.pending_since_ns == 0 {
            0
        } else {
            ms(now.saturating_sub(e.pending_since_ns))
        };
        obj.insert("lag_ms".into(), lag.into());
    }
    json!({
        "agent": {
            "running": alive,
            "pid": (stats.agent_pid != 0).then_some(stats.agent_pid),
            "heartbeat_age_ms": (stats.heartbeat_ns != 0).then(|| ms(now.saturating_sub(stats.heartbeat_ns))),
        },
        "database": database,
        "ring": {
            "path": shared::ring_path().to_string_lossy(),
            "capacity": stats.capacity,
            "fill": stats.fill(),
            "dropped": stats.dropped,
            "skipped": stats.skipped,
            "invalid": stats.invalid,
        },
    })
}

/// `multidb_autocheckpoint(N)`: checkpoint this connection's WAL at N frames (0 disables), as
/// `PRAGMA wal_autocheckpoint=N` would, but keeping the extension's hook. Returns N.
pub fn multidb_autocheckpoint(
    context: *mut sqlite3_context,
    values: &[*mut sqlite3_value],
) -> Result<()> {
    guard("multidb_autocheckpoint", || {
        let bad = || {
            Error::new_message("multidb_autocheckpoint: 1st argument (frames) must be an integer from 0 to 2147483647")
        };
        let value = values.first().ok_or_else(bad)?;
        if !matches!(sql::value_type(value), sql::ValueType::Integer) {
            return Err(bad());
        }
        let frames = u32::try_from(sql::value_int64(value))
            .ok()
            .filter(|&n| n <= i32::MAX as u32)
            .ok_or_else(bad)?;
        // SAFETY: `context` is the running function's context; its connection is open.
        unsafe { hook::install(api::context_db_handle(context), frames) };
        sql::result_int64(context, i64::from(frames));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{reason, Status};
    use std::os::unix::fs::MetadataExt;

    /// A ring in ordinary memory, an agent heartbeat at `now`, and a real file for the path.
    fn setup() -> (Vec<u64>, Ring<'static>, tempfile::NamedTempFile, u64, u64) {
        let len = ring::file_size(64, 64);
        let mut mem = vec![0u64; len / 8];
        // SAFETY: the Vec is returned with the view and outlives every use in the test.
        let ring = unsafe { Ring::init(mem.as_mut_ptr().cast(), len, 64, 64, 1) }.unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        let meta = file.as_file().metadata().unwrap();
        (mem, ring, file, meta.dev(), meta.ino())
    }

    fn path_of(file: &tempfile::NamedTempFile) -> Vec<u8> {
        file.path().to_string_lossy().as_bytes().to_vec()
    }

    #[test]
    fn without_a_ring_nothing_is_replicated() {
        let v = report(None, b"/x.db", 5);
        assert_eq!(v["database"]["replicated"], false);
        assert_eq!(v["database"]["tier"], "unknown");
        assert_eq!(v["agent"]["running"], false);
        assert!(v["database"]["reason"]
            .as_str()
            .unwrap()
            .contains("no agent"));
        assert!(v["ring"].is_null());
    }

    #[test]
    fn a_hot_entry_of_a_live_agent_is_reported_with_its_positions() {
        let (_mem, ring, file, dev, ino) = setup();
        let now = ring::now_ns();
        ring.heartbeat(42, now);
        ring.publish_status(&Status {
            dev,
            ino,
            tier: Tier::Hot,
            replicated_txid: 5,
            replicated_frames: 9,
            last_sync_ns: now - 2_000_000,
            pending_since_ns: now - 7_000_000,
            reason: 0,
        });
        let v = report(Some(ring), &path_of(&file), now);
        assert_eq!(v["agent"]["pid"], 42);
        assert_eq!(v["database"]["tier"], "hot");
        assert_eq!(v["database"]["replicated"], true);
        assert!(v["database"]["reason"].is_null());
        assert_eq!(v["database"]["replicated_txid"], 5);
        assert_eq!(v["database"]["lag_ms"], 7);
    }

    #[test]
    fn a_refused_entry_says_why_and_shows_no_positions() {
        let (_mem, ring, file, dev, ino) = setup();
        let now = ring::now_ns();
        ring.heartbeat(42, now);
        ring.publish_status(&Status {
            dev,
            ino,
            tier: Tier::Refused,
            reason: reason::COLLISION,
            ..Status::default()
        });
        let v = report(Some(ring), &path_of(&file), now);
        assert_eq!(v["database"]["tier"], "refused");
        assert_eq!(v["database"]["replicated"], false);
        assert_eq!(v["database"]["reason"], reason::text(reason::COLLISION));
        assert!(v["database"].get("replicated_txid").is_none());
    }

    #[test]
    fn a_stale_heartbeat_serves_no_entry() {
        let (_mem, ring, file, dev, ino) = setup();
        let now = ring::now_ns();
        ring.heartbeat(42, now - ring::AGENT_ALIVE_NS - 1);
        ring.publish_status(&Status {
            dev,
            ino,
            tier: Tier::Hot,
            replicated_txid: 5,
            ..Status::default()
        });
        let v = report(Some(ring), &path_of(&file), now);
        assert_eq!(v["agent"]["running"], false);
        assert_eq!(v["database"]["tier"], "unknown");
        assert_eq!(v["database"]["replicated"], false);
        assert!(v["database"].get("replicated_txid").is_none());
    }
}
