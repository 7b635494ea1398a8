//! Replica maintenance: level compaction, periodic snapshots and retention, working on the
//! replica alone (never on the database), as Litestream v0.5 does them.
//!
//! - **Compaction.** Level 1 is compacted from level 0 every 30 s, level 2 from level 1 every
//!   5 min, level 3 from level 2 every hour. A level is due when its newest file was created
//!   at or before the start of the current interval window (`now` rounded down to a multiple
//!   of the interval since the Unix epoch): Litestream's `Store.CompactDB` refuses with
//!   `ErrCompactionTooEarly` when the newest file is newer than `CompactionLevel
//!   .PrevCompactionAt(now)`, which is `now.Truncate(interval)`. So a restart never compacts
//!   again within a window, with no state but the replica's own timestamps. A due level takes
//!   the files of the level below that continue its newest file (or, when it is empty or the
//!   level below has a gap there, starting at the first file past its newest TXID) as one
//!   TXID-contiguous run, stopping at the first gap, and merges them with [`ltx::compact`].
//!   Inputs are never deleted here; retention does that.
//! - **Snapshots.** When the newest level-9 snapshot is older than `snapshot_interval` and the
//!   replica reaches past it, the newest snapshot and the shortest chain after it (the chain a
//!   restore would apply, [`restore::plan`]) are compacted into a new snapshot `1-MAX`.
//!   Unlike Litestream, which snapshots once per interval window (at midnight UTC by default),
//!   the interval runs from the newest snapshot, so an agent with many hot databases does not
//!   snapshot all of them at the same instant.
//! - **Retention.** Every point in `[now - retention, now]` stays restorable. The base is the
//!   snapshot with the highest TXID among those created at or before the window start; every
//!   restore into the window starts from it or a newer snapshot. Older snapshots and files at
//!   levels 0–3 ending at or before the base's TXID are deleted, except the newest file of each
//!   level (compaction resumes from it). Without such a snapshot nothing is deleted.
//!   Litestream deletes by the same idea (snapshots older than the retention, then lower
//!   levels below the oldest snapshot kept); basing it on the newest snapshot *before* the
//!   window instead guarantees that the window's first moments stay restorable.
//!
//! Cost per call of [`maintain`]: each level is listed at most once. With nothing due that is
//! 4 LISTs (levels 1, 2, 3 and 9) and nothing else. A due level 1 also lists level 0, and it
//! stays due until level 0 has something new, so an idle hot database costs 5 LISTs a call.
//! Downloads, uploads and deletions happen only for work that is due. Level 0 is read for
//! retention only when this call listed it anyway or there are older snapshots to delete
//! (deletions go lower levels first and snapshots last, so an interrupted pass is finished by
//! the next call).
//!
//! Compacted files keep their database checksums when all inputs have them (Litestream writes
//! compacted files with the NoChecksum flag), so restores keep verifying the chain.

mod merge;
mod pass;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ltx::{self, LtxError};
use crate::replica::{FileInfo, ReplicaClient, ReplicaError, SNAPSHOT_LEVEL};
use crate::replicate::restore::{self, Target};
use pass::Maintenance;

/// Level 1 compaction interval: Litestream v0.5's default for level 1 (`30s`).
pub const LEVEL1_INTERVAL: Duration = Duration::from_secs(30);
/// Level 2 compaction interval: Litestream v0.5's default for level 2 (`5m`).
pub const LEVEL2_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Level 3 compaction interval: Litestream v0.5's default for level 3 (`1h`).
pub const LEVEL3_INTERVAL: Duration = Duration::from_secs(60 * 60);
/// Time between snapshots: Litestream's `DefaultSnapshotInterval` (24 h). A restore applies at
/// most one snapshot plus a day of level-3 files and less than an hour of lower levels.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
/// How far back every point stays restorable: Litestream's `DefaultRetention` (24 h).
pub const RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Files compacted in one pass. The compactor holds one open file and one page buffer per
/// input (64 × 64 KiB at most); longer runs are folded batch by batch through a partial
/// result, so a long backlog costs time and disk but never descriptors or memory.
const MAX_OPEN_INPUTS: usize = 64;

/// When maintenance work is due. [`Policy::default`] is Litestream v0.5's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Compaction intervals of levels 1, 2 and 3.
    pub compaction_intervals: [Duration; 3],
    /// A new snapshot is written when the newest one is this old (and there is news).
    pub snapshot_interval: Duration,
    /// Every point in time this far back stays restorable.
    pub retention: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            compaction_intervals: [LEVEL1_INTERVAL, LEVEL2_INTERVAL, LEVEL3_INTERVAL],
            snapshot_interval: SNAPSHOT_INTERVAL,
            retention: RETENTION,
        }
    }
}

/// One file that maintenance wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub level: u8,
    pub min_txid: u64,
    pub max_txid: u64,
    /// How many replica files were merged into it.
    pub inputs: usize,
    pub bytes: u64,
}

/// What one call of [`maintain`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Files written at levels 1–3, lowest level first.
    pub compacted: Vec<Written>,
    /// The snapshot written, if one was due.
    pub snapshot: Option<Written>,
    /// Files deleted by retention.
    pub deleted: Vec<FileInfo>,
    /// LIST requests made (the cost of a call with nothing to do).
    pub lists: usize,
}

impl Report {
    /// Whether the call changed nothing in the replica.
    pub fn is_empty(&self) -> bool {
        self.compacted.is_empty() && self.snapshot.is_none() && self.deleted.is_empty()
    }
}

/// What can go wrong maintaining a replica. Replica errors name the file's location.
#[derive(Debug, thiserror::Error)]
pub enum MaintainError {
    #[error("listing level {level} of {url}: {error}")]
    List {
        url: String,
        level: u8,
        error: ReplicaError,
    },
    #[error("downloading a compaction input: {error}")]
    Download {
        location: String,
        error: ReplicaError,
    },
    #[error("uploading a compacted file: {error}")]
    Upload {
        location: String,
        error: ReplicaError,
    },
    #[error("deleting {count} expired file(s), the first {location}: {error}")]
    Delete {
        location: String,
        count: usize,
        error: ReplicaError,
    },
    #[error("replica file {location} cannot be compacted: {error}")]
    Corrupt { location: String, error: LtxError },
    #[error("compacting into {location}: {error}")]
    Compact { location: String, error: LtxError },
    #[error("compacting into {location}: the merged file spans TXIDs {min}-{max} instead")]
    WrongRange {
        location: String,
        min: u64,
        max: u64,
    },
    #[error("planning a snapshot of {url}: {reason}")]
    Plan { url: String, reason: String },
    #[error("{path}: {op}: {error}")]
    Local {
        path: PathBuf,
        op: &'static str,
        error: io::Error,
    },
}

/// [`maintain`] now, with what it did or why it failed logged for `db`: the one pass the
/// agent's maintenance workers and `multidb replicate` both run. A failure is only logged;
/// the next pass retries.
pub fn maintain_logged(replica: &dyn ReplicaClient, tmp_dir: &Path, policy: &Policy, db: &str) {
    match maintain(replica, tmp_dir, SystemTime::now(), policy) {
        Ok(report) if !report.is_empty() => {
            tracing::info!(
                db,
                compacted = report.compacted.len(),
                snapshot = report.snapshot.is_some(),
                deleted = report.deleted.len(),
                "maintenance"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(db, error = %e, "compaction or retention failed"),
    }
}

/// Compacts, snapshots and expires what is due at `now`; temporary files go below `tmp_dir`.
///
/// The steps are independent: a failed one (a corrupt file, a failed upload) does not stop
/// the others, so a broken chain cannot keep retention from bounding the replica. The first
/// error is returned, later ones are logged; a failed LIST ends the call at once. Repeating a
/// call, or crashing in the middle of one, is safe: files are written whole and deletion
/// never removes what the window needs.
pub fn maintain(
    replica: &dyn ReplicaClient,
    tmp_dir: &Path,
    now: SystemTime,
    policy: &Policy,
) -> Result<Report, MaintainError> {
    let mut run = Maintenance {
        replica,
        tmp_dir,
        now,
        policy,
        listed: Default::default(),
        report: Report::default(),
    };
    let mut first_error = None;
    for step in [
        Step::Level(1),
        Step::Level(2),
        Step::Level(3),
        Step::Snapshot,
        Step::Retention,
    ] {
        let result = match step {
            Step::Level(level) => run.compact_level(level),
            Step::Snapshot => run.snapshot_if_due(),
            Step::Retention => run.enforce_retention(),
        };
        match result {
            Ok(()) => {}
            Err(e @ MaintainError::List { .. }) => return Err(first_error.unwrap_or(e)),
            Err(e) if first_error.is_none() => first_error = Some(e),
            Err(e) => {
                tracing::warn!(replica = %replica.url(), error = %e, "maintenance step failed")
            }
        }
    }
    first_error.map_or(Ok(run.report), Err)
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Level(u8),
    Snapshot,
    Retention,
}

/// The start of the interval window holding `now`: `now` rounded down to a multiple of
/// `interval` since the Unix epoch, as Go's `time.Truncate` does.
fn window_start(now: SystemTime, interval: Duration) -> SystemTime {
    let Ok(since_epoch) = now.duration_since(UNIX_EPOCH) else {
        return now;
    };
    if interval.is_zero() {
        return now;
    }
    let nanos = since_epoch.as_nanos() / interval.as_nanos() * interval.as_nanos();
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    UNIX_EPOCH + Duration::new(secs, (nanos % 1_000_000_000) as u32)
}

/// Whether a level whose newest file is `newest` is due for compaction at `now`.
fn level_due(newest: Option<&FileInfo>, now: SystemTime, interval: Duration) -> bool {
    newest.is_none_or(|f| f.created <= window_start(now, interval))
}

/// The file reaching furthest from each starting TXID, as a restore would pick it.
fn longest_by_start<'a>(
    files: impl IntoIterator<Item = &'a FileInfo>,
) -> BTreeMap<u64, &'a FileInfo> {
    let mut by_start: BTreeMap<u64, &FileInfo> = BTreeMap::new();
    for f in files {
        let slot = by_start.entry(f.min_txid).or_insert(f);
        if f.max_txid > slot.max_txid {
            *slot = f;
        }
    }
    by_start
}

/// The TXID-contiguous run of `files` that starts at the first file past TXID `after` and
/// ends at the first gap.
fn contiguous_run(files: &[FileInfo], after: u64) -> Vec<FileInfo> {
    let by_start = longest_by_start(files.iter().filter(|f| f.min_txid > after));
    let mut run = Vec::new();
    let mut next = by_start.keys().next().copied();
    while let Some(f) = next.and_then(|txid| by_start.get(&txid)) {
        run.push((*f).clone());
        next = f.max_txid.checked_add(1);
    }
    run
}

/// The highest TXID reachable from `from` through non-snapshot files without a gap.
fn reach(files: &[FileInfo], from: u64) -> u64 {
    let by_start = longest_by_start(files.iter().filter(|f| f.level != SNAPSHOT_LEVEL));
    let mut at = from;
    while let Some(f) = at.checked_add(1).and_then(|next| by_start.get(&next)) {
        at = f.max_txid;
    }
    at
}

/// Files at one level that retention may delete: ending at or before `base_max`, but never
/// the level's newest file.
fn expired(files: &[FileInfo], base_max: u64) -> impl Iterator<Item = &FileInfo> {
    let newest = files.iter().map(|f| f.max_txid).max().unwrap_or(0);
    files
        .iter()
        .filter(move |f| f.max_txid <= base_max && f.max_txid != newest)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::replica::file::FileReplica;
    use crate::replica::file_name;
    use crate::replicate::Replicator;

    /// A fixed instant that is a multiple of every interval (an hour boundary), so the
    /// windows of the tests are easy to read: `at(40)` is 10 s into the second 30-s window.
    const T: u64 = 1_800_000_000;
    const HOUR: i64 = 3600;

    fn at(secs: i64) -> SystemTime {
        let t = UNIX_EPOCH + Duration::from_secs(T);
        if secs >= 0 {
            t + Duration::from_secs(secs.unsigned_abs())
        } else {
            t - Duration::from_secs(secs.unsigned_abs())
        }
    }

    /// A file by (level, min, max).
    type Id = (u8, u64, u64);

    fn id(f: &FileInfo) -> Id {
        (f.level, f.min_txid, f.max_txid)
    }

    fn ids<'a>(files: impl IntoIterator<Item = &'a FileInfo>) -> Vec<Id> {
        let mut ids: Vec<Id> = files.into_iter().map(id).collect();
        ids.sort();
        ids
    }

    /// What a report wrote, in the order it wrote it.
    fn written(report: &Report) -> Vec<Id> {
        report
            .compacted
            .iter()
            .chain(&report.snapshot)
            .map(|w| (w.level, w.min_txid, w.max_txid))
            .collect()
    }

    fn level0(txids: std::ops::RangeInclusive<u64>) -> Vec<Id> {
        txids.map(|t| (0, t, t)).collect()
    }

    /// A WAL database replicated by the real replicator into a file replica.
    struct Fixture {
        dir: tempfile::TempDir,
        root: PathBuf,
        tmp: PathBuf,
        conn: rusqlite::Connection,
        replicator: Replicator,
        replica: FileReplica,
    }

    impl Fixture {
        /// The replica starts with the first snapshot, 1-1.
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("app.db");
            let conn = rusqlite::Connection::open(&db).unwrap();
            conn.execute_batch(
                "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
                 CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);",
            )
            .unwrap();
            let root = dir.path().join("replica");
            let tmp = dir.path().join("tmp");
            let replica = Box::new(FileReplica::new(root.clone()));
            let mut replicator = Replicator::open(&db, replica, &tmp).unwrap();
            let first = replicator.sync().unwrap().unwrap();
            assert_eq!((first.level, first.txid), (SNAPSHOT_LEVEL, 1));
            Fixture {
                replica: FileReplica::new(root.clone()),
                dir,
                root,
                tmp,
                conn,
                replicator,
            }
        }

        /// `n` transactions, each replicated as one level-0 file. Each inserts a row and
        /// rewrites the first, so later files overwrite pages of earlier ones.
        fn commit(&mut self, n: usize) {
            for _ in 0..n {
                let txid = self.replicator.txid() + 1;
                self.conn
                    .execute_batch(&format!(
                        "BEGIN; INSERT INTO t(v) VALUES ('{}');
                         UPDATE t SET v = v || '-{txid}' WHERE id = 1; COMMIT;",
                        "x".repeat(700 + txid as usize)
                    ))
                    .unwrap();
                let synced = self
                    .replicator
                    .sync()
                    .unwrap()
                    .expect("a commit to replicate");
                assert_eq!((synced.level, synced.txid), (0, txid));
            }
        }

        fn maintain(&self, now: SystemTime) -> Report {
            self.maintain_with(now, &Policy::default())
        }

        fn maintain_with(&self, now: SystemTime, policy: &Policy) -> Report {
            maintain(&self.replica, &self.tmp, now, policy).unwrap_or_else(|e| panic!("{e}"))
        }

        fn path(&self, (level, min, max): Id) -> PathBuf {
            self.root
                .join("ltx")
                .join(level.to_string())
                .join(file_name(min, max))
        }

        fn all(&self) -> Vec<FileInfo> {
            restore::list_all(&self.replica).unwrap()
        }

        fn level(&self, level: u8) -> Vec<Id> {
            ids(&self.replica.list(level).unwrap())
        }

        /// Sets the replica's creation time of a file (its mtime, for a file replica).
        fn set_created(&self, file: Id, when: SystemTime) {
            File::options()
                .write(true)
                .open(self.path(file))
                .unwrap()
                .set_modified(when)
                .unwrap();
        }

        fn set_all_created(&self, when: SystemTime) {
            for f in self.all() {
                self.set_created(id(&f), when);
            }
        }

        /// Dates what `report` wrote at `when`, as if the call had run then.
        fn stamp(&self, report: &Report, when: SystemTime) {
            for file in written(report) {
                self.set_created(file, when);
            }
        }

        /// Merges existing files into one at `level` with the module's own merge.
        fn merge(&self, level: u8, inputs: &[Id]) {
            let all = self.all();
            let inputs: Vec<FileInfo> = inputs
                .iter()
                .map(|i| all.iter().find(|f| id(f) == *i).unwrap().clone())
                .collect();
            let policy = Policy::default();
            let mut run = Maintenance {
                replica: &self.replica,
                tmp_dir: &self.tmp,
                now: at(0),
                policy: &policy,
                listed: Default::default(),
                report: Report::default(),
            };
            run.merge_and_put(level, &inputs).unwrap();
        }

        /// A second replica holding only this one's snapshots and level-0 files, as now.
        fn level0_copy(&self, name: &str) -> FileReplica {
            let root = self.dir.path().join(name);
            for level in [0, SNAPSHOT_LEVEL] {
                let dir = root.join("ltx").join(level.to_string());
                fs::create_dir_all(&dir).unwrap();
                for f in self.replica.list(level).unwrap() {
                    fs::copy(self.path(id(&f)), dir.join(f.name())).unwrap();
                }
            }
            FileReplica::new(root)
        }

        /// The database restored from `replica` at `target`, as bytes.
        fn restored(&self, replica: &dyn ReplicaClient, target: Target) -> Vec<u8> {
            static RESTORES: AtomicUsize = AtomicUsize::new(0);
            let n = RESTORES.fetch_add(1, Ordering::Relaxed);
            let out = self.dir.path().join(format!("restored-{n}.db"));
            restore::restore(replica, target, &out, false)
                .unwrap_or_else(|e| panic!("restoring {target:?} from {}: {e:#}", replica.url()));
            fs::read(&out).unwrap()
        }

        /// Every TXID in `txids` restores to the same bytes from this replica and `other`.
        fn assert_restores_like(
            &self,
            other: &dyn ReplicaClient,
            txids: std::ops::RangeInclusive<u64>,
        ) {
            for txid in txids {
                let target = Target::Txid(txid);
                assert!(
                    self.restored(&self.replica, target) == self.restored(other, target),
                    "TXID {txid} restores differently"
                );
            }
        }
    }

    #[test]
    fn windows_align_to_the_epoch_and_runs_stop_at_gaps() {
        assert_eq!(window_start(at(29), LEVEL1_INTERVAL), at(0));
        assert_eq!(window_start(at(30), LEVEL1_INTERVAL), at(30));
        assert_eq!(window_start(at(-1), LEVEL3_INTERVAL), at(-HOUR));
        let file = |level, min, max, created| FileInfo {
            level,
            min_txid: min,
            max_txid: max,
            size: 1,
            created,
        };
        // Due at the window start exactly: Litestream skips only files created *after* it.
        assert!(level_due(None, at(1), LEVEL1_INTERVAL));
        assert!(level_due(
            Some(&file(1, 2, 2, at(30))),
            at(59),
            LEVEL1_INTERVAL
        ));
        assert!(!level_due(
            Some(&file(1, 2, 2, at(31))),
            at(59),
            LEVEL1_INTERVAL
        ));

        let files = [
            file(0, 2, 2, at(0)),
            file(0, 3, 3, at(0)),
            file(0, 3, 4, at(0)),
            file(0, 5, 5, at(0)),
            file(0, 7, 7, at(0)),
            file(0, 8, 8, at(0)),
        ];
        let run = |after| ids(&contiguous_run(&files, after));
        assert_eq!(run(0), [(0, 2, 2), (0, 3, 4), (0, 5, 5)]);
        assert_eq!(run(5), [(0, 7, 7), (0, 8, 8)]);
        assert_eq!(run(8), []);
        assert_eq!(reach(&files, 1), 5);
        assert_eq!(reach(&files, 6), 8);
    }

    #[test]
    fn levels_compact_into_files_that_restore_like_level_0() {
        let mut fx = Fixture::new();
        fx.commit(4);
        fx.set_all_created(at(0));
        // Empty levels are due: each takes everything below it.
        let report = fx.maintain(at(10));
        assert_eq!(written(&report), [(1, 2, 5), (2, 2, 5), (3, 2, 5)]);
        assert_eq!(report.compacted[0].inputs, 4);
        fx.stamp(&report, at(10));

        fx.commit(4);
        let report = fx.maintain(at(40));
        assert_eq!(written(&report), [(1, 6, 9)], "only level 1 is due");
        fx.stamp(&report, at(40));
        fx.commit(4);
        let report = fx.maintain(at(70));
        assert_eq!(written(&report), [(1, 10, 13)]);
        fx.stamp(&report, at(70));
        let report = fx.maintain(at(310));
        assert_eq!(
            written(&report),
            [(2, 6, 13)],
            "level 2 continues its newest file"
        );
        fx.stamp(&report, at(310));
        let report = fx.maintain(at(HOUR + 10));
        assert_eq!(written(&report), [(3, 6, 13)]);

        assert_eq!(fx.level(1), [(1, 2, 5), (1, 6, 9), (1, 10, 13)]);
        assert_eq!(fx.level(0), level0(2..=13), "inputs are left to retention");
        let chain = restore::plan(&fx.all(), Target::Latest).unwrap();
        assert_eq!(ids(&chain), [(3, 2, 5), (3, 6, 13), (9, 1, 1)]);
        let plain = fx.level0_copy("level0");
        fx.assert_restores_like(&plain, 1..=13);
    }

    #[test]
    fn compaction_is_due_once_per_window_and_idle_calls_only_list() {
        let mut fx = Fixture::new();
        fx.commit(2);
        fx.set_all_created(at(0));
        let report = fx.maintain(at(5));
        assert_eq!(written(&report), [(1, 2, 3), (2, 2, 3), (3, 2, 3)]);
        fx.stamp(&report, at(5));
        fx.commit(1);

        // Same window (as after a restart): nothing is compacted, and only levels 1, 2, 3
        // and 9 are listed.
        let report = fx.maintain(at(29));
        assert!(report.is_empty(), "{report:?}");
        assert_eq!(report.lists, 4);
        let report = fx.maintain(at(30));
        assert_eq!(written(&report), [(1, 4, 4)]);
        fx.stamp(&report, at(31));

        fx.commit(1);
        assert!(fx.maintain(at(59)).is_empty());
        let report = fx.maintain(at(60));
        assert_eq!(written(&report), [(1, 5, 5)]);
        fx.stamp(&report, at(60));
        // Due with nothing new: level 0 is listed too, and nothing is written.
        let report = fx.maintain(at(90));
        assert!(report.is_empty(), "{report:?}");
        assert_eq!(report.lists, 5);
        let report = fx.maintain(at(300));
        assert_eq!(written(&report), [(2, 4, 5)]);
    }

    #[test]
    fn a_gap_at_level_0_stops_compaction_at_the_gap() {
        let mut fx = Fixture::new();
        fx.commit(8);
        // As the replicator answers a gap: TXID 5 exists only as the snapshot 1-5.
        let chain: Vec<Id> = [(9, 1, 1)].into_iter().chain(level0(2..=5)).collect();
        fx.merge(SNAPSHOT_LEVEL, &chain);
        fs::remove_file(fx.path((0, 5, 5))).unwrap();
        fx.set_all_created(at(0));
        let plain = fx.level0_copy("level0");

        let report = fx.maintain(at(10));
        assert_eq!(written(&report), [(1, 2, 4), (2, 2, 4), (3, 2, 4)]);
        fx.stamp(&report, at(10));
        // The next window resumes past the gap, where the snapshot joins the chain.
        let report = fx.maintain(at(HOUR + 10));
        assert_eq!(written(&report), [(1, 6, 9), (2, 6, 9), (3, 6, 9)]);

        let chain = restore::plan(&fx.all(), Target::Latest).unwrap();
        assert_eq!(ids(&chain), [(3, 6, 9), (9, 1, 5)]);
        fx.assert_restores_like(&plain, 1..=9);
    }

    #[test]
    fn periodic_snapshot_restores_like_level_0() {
        // Retention stays out of this test.
        let policy = Policy {
            retention: Duration::from_secs(10 * 365 * 24 * 3600),
            ..Policy::default()
        };
        let mut fx = Fixture::new();
        fx.commit(6);
        fx.set_all_created(at(-25 * HOUR));
        let plain = fx.level0_copy("level0");

        let report = fx.maintain_with(at(0), &policy);
        let snapshot = report.snapshot.clone().expect("a snapshot is due");
        assert_eq!((snapshot.min_txid, snapshot.max_txid), (1, 7));
        assert_eq!(
            snapshot.inputs, 2,
            "snapshot 1-1 and the level-3 file made just before"
        );
        let chain = restore::plan(&fx.all(), Target::Latest).unwrap();
        assert_eq!(ids(&chain), [(9, 1, 7)]);
        assert!(fx.restored(&fx.replica, Target::Latest) == fx.restored(&plain, Target::Latest));
        fx.stamp(&report, at(0));

        fx.commit(1);
        let plain = fx.level0_copy("level0-8");
        let report = fx.maintain_with(at(23 * HOUR), &policy);
        assert_eq!(
            report.snapshot, None,
            "the newest snapshot is not a day old"
        );
        let report = fx.maintain_with(at(24 * HOUR), &policy);
        let snapshot = report.snapshot.clone().expect("a snapshot is due");
        assert_eq!((snapshot.min_txid, snapshot.max_txid), (1, 8));
        fx.stamp(&report, at(24 * HOUR));
        let report = fx.maintain_with(at(49 * HOUR), &policy);
        assert_eq!(report.snapshot, None, "nothing new since the last snapshot");
        fx.assert_restores_like(&plain, 8..=8);
    }

    #[test]
    fn retention_deletes_exactly_what_the_window_does_not_need() {
        let hours = |n: i64| at(n * HOUR);
        let mut fx = Fixture::new();
        fx.commit(14);
        // Snapshots at TXIDs 5, 9 and 13, and level files, as earlier maintenance made them.
        fx.merge(9, &[[(9, 1, 1)].as_slice(), &level0(2..=5)].concat());
        fx.merge(9, &[[(9, 1, 5)].as_slice(), &level0(6..=9)].concat());
        fx.merge(9, &[[(9, 1, 9)].as_slice(), &level0(10..=13)].concat());
        for (a, b) in [(2, 5), (6, 9), (10, 13), (14, 15)] {
            fx.merge(1, &level0(a..=b));
        }
        fx.merge(2, &[(1, 2, 5), (1, 6, 9)]);
        fx.merge(2, &[(1, 10, 13), (1, 14, 15)]);
        fx.merge(3, &[(2, 2, 9)]);
        let times: [(&[Id], SystemTime); 13] = [
            (&[(9, 1, 1)], hours(-50)),
            (&level0(2..=5), hours(-49)),
            (&[(9, 1, 5)], hours(-48)),
            (&level0(6..=9), hours(-30)),
            (&[(9, 1, 9)], hours(-26)),
            (&level0(10..=13), hours(-20)),
            (&[(9, 1, 13)], hours(-10)),
            (&level0(14..=15), hours(-1)),
            (&[(1, 2, 5)], hours(-49)),
            (&[(1, 6, 9)], hours(-30)),
            (&[(1, 10, 13)], hours(-20)),
            (&[(2, 2, 9)], hours(-26)),
            // The newest file of each compacted level: recent, so no level is due.
            (&[(1, 14, 15), (2, 10, 15), (3, 2, 9)], at(95)),
        ];
        for (files, when) in times {
            for file in files {
                fx.set_created(*file, when);
            }
        }
        let before = fx.all();
        let plain = fx.level0_copy("level0");

        // The window starts 24 h before now: the base is the snapshot 1-9 (26 h old); 1-13 is
        // inside the window.
        let now = at(100);
        let report = fx.maintain(now);
        assert!(report.compacted.is_empty() && report.snapshot.is_none());
        let mut expected: Vec<Id> = vec![(9, 1, 1), (9, 1, 5), (1, 2, 5), (1, 6, 9), (2, 2, 9)];
        expected.extend(level0(2..=9));
        expected.sort();
        assert_eq!(ids(&report.deleted), expected);
        let after = fx.all();
        let kept: Vec<FileInfo> = before
            .iter()
            .filter(|f| !expected.contains(&id(f)))
            .cloned()
            .collect();
        assert_eq!(ids(&after), ids(&kept));
        assert_eq!(fx.level(3), [(3, 2, 9)], "the newest file of a level stays");

        // Every TXID from the base on, and every moment of the window, still restores, and a
        // moment resolves to the TXID it did before.
        for txid in 9..=15 {
            restore::plan(&after, Target::Txid(txid)).unwrap();
        }
        assert!(restore::plan(&after, Target::Txid(8)).is_err());
        for minutes in 0..=24 * 60 {
            let when = now - RETENTION + Duration::from_secs(minutes * 60);
            let target = Target::Time(when);
            let txid = |files| {
                restore::plan(files, target)
                    .unwrap()
                    .last()
                    .unwrap()
                    .max_txid
            };
            assert_eq!(txid(&after), txid(&before), "{minutes} min into the window");
        }
        fx.assert_restores_like(&plain, 9..=15);

        // Done: the next call deletes nothing and does not list level 0.
        let report = fx.maintain(now + Duration::from_secs(1));
        assert!(report.is_empty(), "{report:?}");
        assert_eq!(report.lists, 4);
    }

    #[test]
    fn retention_deletes_nothing_without_a_snapshot_old_enough() {
        let mut fx = Fixture::new();
        fx.commit(5);
        fx.merge(1, &level0(2..=6));
        fx.merge(2, &[(1, 2, 6)]);
        fx.merge(3, &[(2, 2, 6)]);
        // Level-0 files far older than the window, but the only snapshot is inside it.
        fx.set_all_created(at(-40 * HOUR));
        fx.set_created((9, 1, 1), at(-23 * HOUR));
        for file in [(1, 2, 6), (2, 2, 6), (3, 2, 6)] {
            fx.set_created(file, at(95));
        }
        let before = ids(&fx.all());
        let report = fx.maintain(at(100));
        assert!(report.is_empty(), "{report:?}");
        assert_eq!(ids(&fx.all()), before);
    }

    #[test]
    fn a_corrupt_input_is_named_by_its_replica_location() {
        let mut fx = Fixture::new();
        fx.commit(3);
        let path = fx.path((0, 3, 3));
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        let err = maintain(&fx.replica, &fx.tmp, at(10), &Policy::default()).unwrap_err();
        match &err {
            MaintainError::Corrupt {
                location,
                error: source,
            } => {
                assert_eq!(*location, fx.replica.location(0, 3, 3));
                assert!(
                    matches!(source, LtxError::FileChecksumMismatch { .. }),
                    "{source}"
                );
            }
            other => panic!("{other}"),
        }
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(fx.level(1), [], "nothing half-made is stored");
        assert!(fs::read_dir(&fx.tmp).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".compact")));
    }
}
