//! The scheduler's state: the hot set (one [`Hot`] per database being replicated), the
//! databases refused and why, the queues of written databases waiting for a slot, and the
//! timing rules it applies (how often it wakes, when a refusal is looked at or logged again,
//! when a sync starts, how failures back off). Its behaviour is in the sibling modules
//! (`tiers`, `recovery`, `watch`, `published`) as `impl Scheduler`.

use super::*;

/// A database refused because its replica holds another database is tried again after
/// this long (the user may have fixed the location), not at every write.
pub(super) const IDENTITY_RETRY: Duration = Duration::from_secs(60);
/// A database refused again for the reason last logged is logged again after this.
pub(super) const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// The scheduler's longest sleep: how often gauges and idle demotions are looked at.
pub(super) const TICK: Duration = Duration::from_millis(250);
/// A commit from an inode the arena does not know asks for a rescan, at most this often.
pub(super) const RESCAN_AFTER_UNKNOWN: Duration = Duration::from_secs(1);
/// Longest retry delay after failed syncs of one database.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A hot database, as the scheduler tracks it.
pub(super) struct Hot {
    pub(super) path: String,
    pub(super) url: ReplicaUrl,
    pub(super) fields: Fields,
    pub(super) dev: u64,
    pub(super) ino: u64,
    /// Whether a worker has the database now; while it is idle, its open replicator.
    pub(super) job: JobState,
    /// Commits seen that no finished or running sync covers.
    pub(super) dirty: bool,
    /// When the oldest commit not yet in the replica was made (ns), 0 if none.
    pub(super) pending_since_ns: u64,
    /// `pending_since_ns` of the commits the running job covers.
    pub(super) in_flight_since_ns: u64,
    pub(super) last_write: Instant,
    pub(super) last_sync_start: Option<Instant>,
    pub(super) due: Option<Instant>,
    pub(super) demoting: bool,
    pub(super) wal_stamp: WalStamp,
    pub(super) last_checkpoint: Instant,
    pub(super) last_maintenance_start: Instant,
    /// New files in the replica since the last maintenance pass was queued.
    pub(super) written_since_maintenance: bool,
    pub(super) failures: u32,
    pub(super) txid: u64,
    pub(super) wal_frames: u64,
    pub(super) last_sync_ns: u64,
}

pub(super) struct Scheduler<'a> {
    pub(super) config: &'a Config,
    pub(super) template: crate::config::ReplicaTemplate,
    pub(super) arena: &'a mut Arena,
    /// The ring, shared with the reader thread.
    pub(super) ring_file: Arc<RingFile>,
    /// Rings replaced under the agent: kept mapped, as producers may still write to them.
    pub(super) old_rings: Vec<Arc<RingFile>>,
    pub(super) ring_path: PathBuf,
    pub(super) ring_slots: (u32, u32),
    /// Hands a new ring to the reader.
    pub(super) ring_tx: Sender<Arc<RingFile>>,
    pub(super) ring_warned: bool,
    /// Databases under the pattern that are not replicated: a [`reason`] code and when it
    /// was decided (the message goes to the log, the metrics and `multidb status`).
    pub(super) refused: HashMap<DbId, Refusal>,
    /// The last refusal logged for each database: its reason code and when, so the same
    /// reason is logged at most once per [`REFUSAL_LOG_EVERY`] across promotions.
    pub(super) refusals_logged: HashMap<DbId, (u32, Instant)>,
    /// This agent's leases on replica locations.
    pub(super) leases: LeaseKeeper,
    pub(super) maintenance: Sender<MaintenanceJob>,
    /// Databases with a maintenance pass queued or running.
    pub(super) maintaining: HashSet<DbId>,
    pub(super) lag_warned: bool,
    pub(super) store: &'a StateStore,
    pub(super) metrics: &'a Metrics,
    pub(super) jobs: Sender<Job>,
    pub(super) hot: HashMap<DbId, Hot>,
    /// Written databases waiting for a hot slot, oldest first, with when they were written.
    pub(super) waiting: VecDeque<(DbId, u64)>,
    pub(super) waiting_set: HashSet<DbId>,
    /// Status-table entries of demoted databases, oldest first (kept so `multidb_wait` and
    /// `multidb_status()` still answer for them, evicted when the table fills).
    pub(super) cold_entries: VecDeque<(u64, u64)>,
    pub(super) last_scan: Instant,
    pub(super) last_scan_ms: u64,
    pub(super) rescan_soon: Option<Instant>,
    pub(super) last_wal_poll: Instant,
    /// inotify watches on leaf directories.
    pub(super) watches: watch::Watches,
    /// Recently demoted databases: what their demotion left on disk.
    pub(super) echoes: HashMap<DbId, watch::Echo>,
}

/// Why a database is not replicated.
pub(super) struct Refusal {
    pub(super) code: u32,
    pub(super) since: Instant,
    /// Not looked at again before this (a lease refusal: when the lease may have ended).
    pub(super) retry_at: Option<Instant>,
    /// The oldest commit not in the replica (ns) of a database refused for a lease: promoted
    /// again once `retry_at` passes, so commits made while another host held the lease are
    /// replicated when it ends, with or without another write.
    pub(super) deferred_ns: Option<u64>,
}

/// Whether the database file or its `-wal` was modified at or after `since_ns`.
pub(super) fn modified_since(db: &str, since_ns: u64) -> bool {
    let mtime =
        |path: &str| std::fs::metadata(path).map_or(0, |m| crate::discover::arena::mtime_ns(&m));
    mtime(db).max(mtime(&format!("{db}-wal"))) >= since_ns
}

/// The status entry of a database the agent does not replicate, and why (a `reason` code).
pub(super) fn refused_entry(dev: u64, ino: u64, code: u32) -> Status {
    Status {
        dev,
        ino,
        tier: Tier::Refused,
        reason: code,
        ..Status::default()
    }
}

/// The oldest of some "since" times (ns), ignoring zeros (none); 0 when all are zero.
pub(super) fn oldest_ns(times: impl IntoIterator<Item = u64>) -> u64 {
    times.into_iter().filter(|&t| t != 0).min().unwrap_or(0)
}

/// When a sync should start for a commit seen now: at once after a quiet spell, otherwise
/// one `sync_interval` after the previous sync started.
pub(super) fn sync_time(last_start: Option<Instant>, interval: Duration) -> Instant {
    let now = Instant::now();
    match last_start {
        Some(start) if now.duration_since(start) < interval => start + interval,
        _ => now,
    }
}

/// Capped exponential backoff with jitter for a database whose syncs keep failing.
pub(super) fn backoff(failures: u32) -> Duration {
    crate::time::backoff(
        failures.saturating_add(1),
        Duration::from_millis(100),
        MAX_BACKOFF,
        crate::time::random_u64(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_commit_after_quiet_goes_at_once_then_batches() {
        let interval = Duration::from_secs(1);
        let now = Instant::now();
        assert!(sync_time(None, interval) <= Instant::now());
        let long_ago = now - Duration::from_secs(5);
        assert!(sync_time(Some(long_ago), interval) <= Instant::now());
        let just_now = Instant::now();
        assert_eq!(sync_time(Some(just_now), interval), just_now + interval);
    }

    #[test]
    fn oldest_ignores_the_zeros() {
        assert_eq!(oldest_ns([0, 5, 3, 0]), 3);
        assert_eq!(oldest_ns([0, 0]), 0);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        // The first failure waits 100-200 ms, later ones double, never past the cap.
        for _ in 0..100 {
            assert!(backoff(1) >= Duration::from_millis(100));
            assert!(backoff(1) <= Duration::from_millis(200));
            assert!(backoff(30) >= MAX_BACKOFF / 2);
            assert!(backoff(30) <= MAX_BACKOFF);
        }
    }
}
