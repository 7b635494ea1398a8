//! What the running agent tells the outside: counters and gauges the scheduler updates, the
//! `multidb status` answer served on a Unix socket in the state directory, and Prometheus
//! metrics over HTTP at the optional `addr`.
//!
//! The scheduler owns the truth; it writes counters here as it works, and a small snapshot of
//! per-tier counts once per tick. The servers only read, each on one thread of its own, so a
//! slow client can delay another client but never replication.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// The status socket's file name in the state directory.
pub const SOCKET_NAME: &str = "agent.sock";

/// Upper bounds (seconds) of the lag histogram's buckets: from "shipped at once" to "the
/// replica is down".
const LAG_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0,
];
/// Lag samples kept for the percentiles `multidb status` prints: the last few thousand syncs,
/// a bounded window rather than all history.
const LAG_WINDOW: usize = 4096;
/// Databases whose last error is kept; beyond this, the oldest error is forgotten (the
/// counters still count it).
const MAX_ERRORS: usize = 100;
/// How long a status or metrics client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Counters, gauges and recent lags of one agent.
#[derive(Default)]
pub struct Metrics {
    pub syncs: AtomicU64,
    pub sync_errors: AtomicU64,
    pub snapshots: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub promotions: AtomicU64,
    pub demotions: AtomicU64,
    pub ring_commits: AtomicU64,
    pub scans: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Writes seen through inotify (events that named a database or its `-wal`).
    pub watch_writes: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    lag_counts: [u64; LAG_BUCKETS.len() + 1],
    lag_sum: f64,
    lag_window: VecDeque<f64>,
    /// Database → (errors, last message); bounded by [`MAX_ERRORS`].
    errors: BTreeMap<String, (u64, String)>,
    error_order: VecDeque<String>,
    tiers: Tiers,
}

/// A snapshot the scheduler writes each tick.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Tiers {
    pub discovered: u64,
    pub hot: u64,
    pub cold: u64,
    pub waiting: u64,
    pub in_flight: u64,
    pub max_active: u64,
    pub last_scan_ms: u64,
    pub ring_dropped: u64,
    pub ring_invalid: u64,
    pub ring_skipped: u64,
    pub ring_fill: u64,
    pub ring_capacity: u64,
    /// Databases under the pattern that are not replicated (collision, not WAL, bad location,
    /// replica of another database); each has its reason under `errors`.
    pub refused: u64,
    /// Age of the oldest commit not yet in the replica, over every database (0: caught up).
    pub oldest_unreplicated_ms: u64,
    /// Leaf directories watched with inotify.
    pub watched_dirs: u64,
    /// Leaf directories left to scans: a watch limit was reached (or inotify is off).
    pub unwatched_dirs: u64,
}

impl Metrics {
    /// A commit became durable `lag` after it was made (or first seen).
    pub fn record_lag(&self, lag: Duration) {
        let secs = lag.as_secs_f64();
        let mut inner = self.lock();
        let bucket = LAG_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LAG_BUCKETS.len());
        inner.lag_counts[bucket] += 1;
        inner.lag_sum += secs;
        if inner.lag_window.len() == LAG_WINDOW {
            inner.lag_window.pop_front();
        }
        inner.lag_window.push_back(secs);
    }

    /// A database that is not replicated, and why: listed under `errors` like a failing one,
    /// without counting as a failed sync.
    pub fn record_refusal(&self, db: &str, message: String) {
        self.note_error(db, message);
    }

    pub fn record_error(&self, db: &str, message: String) {
        self.sync_errors.fetch_add(1, Ordering::Relaxed);
        self.note_error(db, message);
    }

    fn note_error(&self, db: &str, message: String) {
        let mut inner = self.lock();
        if let Some(entry) = inner.errors.get_mut(db) {
            entry.0 += 1;
            entry.1 = message;
            return;
        }
        if inner.errors.len() == MAX_ERRORS {
            if let Some(oldest) = inner.error_order.pop_front() {
                inner.errors.remove(&oldest);
            }
        }
        inner.errors.insert(db.to_string(), (1, message));
        inner.error_order.push_back(db.to_string());
    }

    /// A database synced cleanly: its error is history.
    pub fn clear_error(&self, db: &str) {
        let mut inner = self.lock();
        if inner.errors.remove(db).is_some() {
            inner.error_order.retain(|d| d != db);
        }
    }

    pub fn set_tiers(&self, tiers: Tiers) {
        self.lock().tiers = tiers;
    }

    pub fn tiers(&self) -> Tiers {
        self.lock().tiers
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `multidb status --json` object.
    pub fn report(&self, pid: u32) -> Value {
        let inner = self.lock();
        let mut lags: Vec<f64> = inner.lag_window.iter().copied().collect();
        lags.sort_by(f64::total_cmp);
        let pct = |p: f64| -> Option<f64> {
            if lags.is_empty() {
                return None;
            }
            let at = ((lags.len() - 1) as f64 * p).round() as usize;
            Some((lags[at] * 1000.0 * 10.0).round() / 10.0)
        };
        let errors: Vec<Value> = inner
            .errors
            .iter()
            .map(|(db, (count, last))| json!({"db": db, "count": count, "last": last}))
            .collect();
        json!({
            "pid": pid,
            "tiers": inner.tiers,
            // One lag sample per sync that caught up with a write (however many commits it
            // carried, whether or not it uploaded): not the count of `syncs`, which counts
            // uploads. `samples` is the window the percentiles cover, `total` every sample.
            "lag_ms": {
                "p50": pct(0.5),
                "p99": pct(0.99),
                "samples": lags.len(),
                "total": inner.lag_counts.iter().sum::<u64>(),
            },
            "syncs": self.syncs.load(Ordering::Relaxed),
            "snapshots": self.snapshots.load(Ordering::Relaxed),
            "sync_errors": self.sync_errors.load(Ordering::Relaxed),
            "bytes_uploaded": self.bytes_uploaded.load(Ordering::Relaxed),
            "promotions": self.promotions.load(Ordering::Relaxed),
            "demotions": self.demotions.load(Ordering::Relaxed),
            "checkpoints": self.checkpoints.load(Ordering::Relaxed),
            "ring_commits": self.ring_commits.load(Ordering::Relaxed),
            "scans": self.scans.load(Ordering::Relaxed),
            "watch_writes": self.watch_writes.load(Ordering::Relaxed),
            "oldest_unreplicated_ms": inner.tiers.oldest_unreplicated_ms,
            "errors": errors,
        })
    }

    /// The Prometheus text exposition.
    pub fn prometheus(&self) -> String {
        use std::fmt::Write as _;
        let inner = self.lock();
        let t = inner.tiers;
        let mut out = String::with_capacity(4096);
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP multidb_{name} {help}\n# TYPE multidb_{name} gauge\nmultidb_{name} {value}"
            );
        };
        gauge(
            "databases_discovered",
            "Databases the pattern matches.",
            t.discovered,
        );
        gauge(
            "ring_fill",
            "Records waiting in the commit ring.",
            t.ring_fill,
        );
        gauge("max_active", "The hot tier's capacity.", t.max_active);
        gauge(
            "databases_refused",
            "Databases under the pattern that are not replicated (see multidb status).",
            t.refused,
        );
        gauge(
            "watched_directories",
            "Leaf directories watched with inotify.",
            t.watched_dirs,
        );
        gauge(
            "unwatched_directories",
            "Leaf directories seen only at scans (a watch limit was reached, or watch is off).",
            t.unwatched_dirs,
        );
        gauge(
            "waiting",
            "Written databases waiting for a hot slot.",
            t.waiting,
        );
        let _ = writeln!(
            out,
            "# HELP multidb_databases Databases by tier.\n# TYPE multidb_databases gauge\nmultidb_databases{{tier=\"hot\"}} {}\nmultidb_databases{{tier=\"cold\"}} {}",
            t.hot, t.cold
        );
        let _ = writeln!(
            out,
            "# HELP multidb_oldest_unreplicated_seconds Age of the oldest commit not yet in the replica (0: caught up).\n# TYPE multidb_oldest_unreplicated_seconds gauge\nmultidb_oldest_unreplicated_seconds {:.3}",
            t.oldest_unreplicated_ms as f64 / 1000.0
        );
        let counters: [(&str, &str, u64); 12] = [
            (
                "watch_writes_total",
                "Writes seen through inotify on watched directories.",
                self.watch_writes.load(Ordering::Relaxed),
            ),
            (
                "syncs_total",
                "Syncs that uploaded an LTX file.",
                self.syncs.load(Ordering::Relaxed),
            ),
            (
                "snapshots_total",
                "Snapshots uploaded.",
                self.snapshots.load(Ordering::Relaxed),
            ),
            (
                "sync_errors_total",
                "Failed syncs.",
                self.sync_errors.load(Ordering::Relaxed),
            ),
            (
                "uploaded_bytes_total",
                "Bytes of LTX files uploaded.",
                self.bytes_uploaded.load(Ordering::Relaxed),
            ),
            (
                "promotions_total",
                "Databases promoted to hot.",
                self.promotions.load(Ordering::Relaxed),
            ),
            (
                "demotions_total",
                "Databases demoted to cold.",
                self.demotions.load(Ordering::Relaxed),
            ),
            (
                "checkpoints_total",
                "Checkpoints the agent ran.",
                self.checkpoints.load(Ordering::Relaxed),
            ),
            (
                "ring_commits_total",
                "Commit records read from the ring.",
                self.ring_commits.load(Ordering::Relaxed),
            ),
            (
                "ring_dropped_total",
                "Commit records the ring dropped (recovered by scans).",
                t.ring_dropped,
            ),
            (
                "ring_invalid_total",
                "Invalid records skipped in the ring.",
                t.ring_invalid + t.ring_skipped,
            ),
            (
                "scans_total",
                "Discovery scans.",
                self.scans.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP multidb_{name} {help}\n# TYPE multidb_{name} counter\nmultidb_{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP multidb_lag_seconds From a commit to its LTX file in the replica.\n# TYPE multidb_lag_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in LAG_BUCKETS.iter().enumerate() {
            cumulative += inner.lag_counts[i];
            let _ = writeln!(
                out,
                "multidb_lag_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += inner.lag_counts[LAG_BUCKETS.len()];
        let _ = writeln!(
            out,
            "multidb_lag_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(out, "multidb_lag_seconds_sum {}", inner.lag_sum);
        let _ = writeln!(out, "multidb_lag_seconds_count {cumulative}");
        out
    }
}

/// The status socket of the agent whose state directory is `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// Serves `multidb status` on `path` until the process ends. A stale socket from a dead agent
/// is replaced (the ring's lock already proved no other agent runs).
pub fn serve_status(path: &Path, metrics: Arc<Metrics>) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    // Owner only (the state directory is 0700 as well): the report names every hot database.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let pid = std::process::id();
    std::thread::Builder::new()
        .name("status".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
                let body = metrics.report(pid).to_string();
                let _ = stream.write_all(body.as_bytes());
            }
        })?;
    Ok(())
}

/// Serves Prometheus metrics at `http://addr/metrics` until the process ends.
pub fn serve_metrics(addr: std::net::SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut stream = stream;
                let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
                let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
                let request = read_request_head(&mut stream);
                let line = String::from_utf8_lossy(&request);
                let response = if line.starts_with("GET /metrics ") || line.starts_with("GET / ") {
                    let body = metrics.prometheus();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = stream.write_all(response.as_bytes());
            }
        })?;
    Ok(())
}

/// The head of an HTTP request (up to its blank line, at most 4 KiB), however many reads it
/// arrives in: a client may send the request line in pieces, and answering (and closing)
/// before the head is read would take a request for `/metrics` for another path, or reset
/// the connection under the client's next write.
fn read_request_head(stream: &mut impl Read) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    while head.len() < 4096 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    head
}

/// `multidb status`: asks the agent through its socket.
pub fn query(state_dir: &Path) -> anyhow::Result<Value> {
    let path = socket_path(state_dir);
    let mut stream = UnixStream::connect(&path).map_err(|e| {
        anyhow::anyhow!(
            "no agent answers on {} ({e}); is `multidb agent` running with this configuration?",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    serde_json::from_str(&body)
        .map_err(|e| anyhow::anyhow!("the agent on {} sent no status: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_percentiles_and_histogram() {
        let m = Metrics::default();
        for ms in 1..=100 {
            m.record_lag(Duration::from_millis(ms));
        }
        let r = m.report(1);
        assert_eq!(r["lag_ms"]["samples"], 100);
        assert_eq!(r["lag_ms"]["total"], 100);
        let p50 = r["lag_ms"]["p50"].as_f64().unwrap();
        assert!((50.0..=51.0).contains(&p50), "{p50}");
        assert_eq!(r["lag_ms"]["p99"].as_f64().unwrap(), 99.0);
        let text = m.prometheus();
        assert!(
            text.contains("multidb_lag_seconds_bucket{le=\"0.005\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("multidb_lag_seconds_bucket{le=\"+Inf\"} 100\n"));
        assert!(text.contains("multidb_lag_seconds_count 100\n"));
    }

    #[test]
    fn errors_are_bounded_and_cleared() {
        let m = Metrics::default();
        for i in 0..(MAX_ERRORS + 5) {
            m.record_error(&format!("/d/{i}.db"), "boom".into());
        }
        m.record_error("/d/104.db", "again".into());
        let r = m.report(1);
        let errors = r["errors"].as_array().unwrap();
        assert_eq!(errors.len(), MAX_ERRORS);
        assert!(!errors.iter().any(|e| e["db"] == "/d/0.db"));
        m.clear_error("/d/104.db");
        assert_eq!(
            m.report(1)["errors"].as_array().unwrap().len(),
            MAX_ERRORS - 1
        );
        assert_eq!(m.sync_errors.load(Ordering::Relaxed), MAX_ERRORS as u64 + 6);
    }

    #[test]
    fn a_request_head_sent_in_pieces_is_read_whole() {
        /// Hands out its pieces one read at a time, as a TCP stream may.
        struct Pieces(Vec<&'static [u8]>);
        impl Read for Pieces {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() {
                    return Ok(0);
                }
                let piece = self.0.remove(0);
                buf[..piece.len()].copy_from_slice(piece);
                Ok(piece.len())
            }
        }
        let mut stream = Pieces(vec![
            b"GET ",
            b"/metrics",
            b" HTTP/1.1\r\nHost: x\r\n",
            b"\r\n",
        ]);
        let head = read_request_head(&mut stream);
        assert!(head.starts_with(b"GET /metrics HTTP/1.1\r\n"));
        assert!(head.ends_with(b"\r\n\r\n"));
        // A client that closes early gets what it sent.
        let mut short = Pieces(vec![b"GET /metr"]);
        assert_eq!(read_request_head(&mut short), b"GET /metr");
    }
}
