//! `multidb_status()` and `multidb_autocheckpoint(N)`: what the agent says about this
//! connection's database, and the checkpoint threshold that replaces
//! `PRAGMA wal_autocheckpoint` (which would remove the extension's WAL hook).

use serde_json::{json, Value};
use sqlite_loadable::prelude::*;
use sqlite_loadable::{api as sql, Error, Result};

use crate::ring::{self, Ring, TIER_COLD, TIER_HOT, TIER_REFUSED};
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
        Some(TIER_HOT) => "hot",
        Some(TIER_COLD) => "cold",
        Some(TIER_REFUSED) => "refused",
        _ => "unknown",
    };
    let replicated = entry.is_some_and(|e| e.tier == TIER_HOT || e.tier == TIER_COLD);
    let reason = match entry {
        _ if !alive => Some("no agent is running (its heartbeat stopped)"),
        Some(e) if e.tier == TIER_REFUSED => Some(ring::reason::text(e.reason)),
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
