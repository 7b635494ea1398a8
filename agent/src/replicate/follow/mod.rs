//! Follow mode (`multidb restore --follow -o OUT`): keeps a restored database current as its
//! replica grows, while applications read OUT (a read replica, a warm standby).
//!
//! **How a step reaches OUT.** Every change goes through SQLite's own pager, journal and
//! locks: the follower holds one connection to OUT and writes the pages of new LTX files with
//! `INSERT INTO sqlite_dbpage(pgno, data)` (the bundled SQLite is built with
//! `SQLITE_ENABLE_DBPAGE_VTAB`, see `.cargo/config.toml`), all files of one poll inside one
//! `BEGIN IMMEDIATE … COMMIT`, and shrinks the database with `sqlite_dbpage`'s truncating
//! insert of a NULL page. SQLite journals those pages like any other write (to OUT's `-wal`,
//! since replicas of WAL databases carry WAL's header bytes on page 1), so a reader's
//! transaction sees the state before a step or after it, never a mix, and a follower killed
//! mid-step leaves a transaction SQLite rolls back. Writing the file directly under a lock
//! would be faster to build but leaves a torn file behind a crash; copying a private copy
//! with the backup API would cost the whole database per step.
//!
//! **What is verified before a step is committed.** Each file's checksum (the decoder checks
//! it at the end; nothing is committed before), its TXIDs against its name, and, for files
//! that carry database checksums (multidb's default), that it continues the chain (its
//! pre-apply checksum is the follower's running checksum) and that the result has its
//! post-apply checksum: the follower keeps a checksum per page, so OUT is proven equal to
//! the source at every step without reading it back. Files without database checksums
//! (Litestream's, or `litestream_compatible`) leave only `PRAGMA integrity_check`, which must
//! read a committed state on a fresh connection (the writing connection's b-tree layer
//! caches page 1 across `sqlite_dbpage` writes, so a check inside the transaction proves
//! nothing): it runs right after such a step, and a failure stops the follower with an
//! error naming the TXID.
//!
//! **Where it resumes.** `OUT.multidb-follow` (beside OUT) records the replica, the TXID and
//! the database checksum (page 1 is compared without the counter bytes SQLite rewrites on
//! each commit, see [`Mark`]), written before each commit with the step's expected values too,
//! so a crash on either side of the commit is recognised. A restart recomputes OUT's
//! checksum and resumes only when it matches one of them; anything else means OUT was
//! changed by someone else, and the follower refuses to write into it. While running, it
//! checks `PRAGMA data_version` (another connection's commit) and OUT's inode (a file moved
//! over it) before every step.
//!
//! **Which files.** A poll lists level 0 only (one LIST request per interval on S3 while
//! level 0 holds up to 1,000 files, one more per further 1,000) and applies the files that
//! continue OUT's TXID; every [`FULL_LIST_EVERY`] polls it lists every level (five LISTs). When newer files exist but none at level 0 continues it (they were
//! compacted and deleted), the other levels are listed; when nothing continues it at all (a
//! new snapshot after a replaced database or a gap, a replica started over), or when the
//! replica holds another history now (a file that continues OUT's TXID but not its database
//! checksum, or a newest file at OUT's TXID whose post-apply checksum is not OUT's: the
//! replica was deleted and rewritten, another database's replica written to the same
//! location), a fresh verified restore is made beside OUT and copied into it page by page in
//! one transaction.
//! A replica that cannot be reached is retried with a capped backoff; SIGINT/SIGTERM stop
//! the follower between steps. A step takes at most [`MAX_STEP_FILES`] files (and about
//! [`MAX_STEP_BYTES`]), so a follower far behind catches up in bounded steps back to back.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::ltx::{self, Decoder};
use crate::replica::{FileInfo, ReplicaClient, SNAPSHOT_LEVEL};
use crate::replicate::restore::{self, Target};

mod sidecar;
mod write;

pub use sidecar::sidecar_path;
use sidecar::Mark;

/// The default poll interval: Litestream's default sync interval, so a follower lags its
/// source by about two seconds at most with both defaults.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// The longest wait between retries while the replica cannot be read.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long the follower waits for OUT's write lock (readers in rollback-journal mode, a
/// checkpoint) before the step counts as failed and is retried.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Every this many polls, every level is listed even when level 0 has nothing new: a new
/// history (a level-9 snapshot after a replaced database or a gap) shows at level 9 only
/// until the next write. Once a minute at the default interval.
pub const FULL_LIST_EVERY: u32 = 60;
/// The most LTX files one step applies, and the most bytes of them (at least one file is
/// always taken): the files of a step are held in memory until its commit, so a follower
/// catching up after an outage goes in bounded steps, one right after the other.
const MAX_STEP_FILES: usize = 64;
const MAX_STEP_BYTES: u64 = 256 << 20;
/// Stop requests are noticed within this while waiting.
const STOP_CHECK: Duration = Duration::from_millis(20);

/// How `restore --follow` runs.
#[derive(Debug, Clone, Copy)]
pub struct FollowOptions {
    /// Time between two looks at the replica.
    pub interval: Duration,
    /// Mode of OUT when the follower creates it.
    pub mode: u32,
}

/// One step the follower committed to OUT.
#[derive(Debug, Clone)]
pub struct Step {
    /// OUT's TXID after the step.
    pub txid: u64,
    /// LTX files applied (0 when resuming).
    pub files: usize,
    /// Pages written.
    pub pages: usize,
    /// What kind of step: `restored`, `resumed`, `applied`, or `restored afresh`.
    pub kind: &'static str,
    /// More files were waiting than one step takes: the next step follows at once.
    pub behind: bool,
}

/// OUT was changed by something other than this follower, or is not one it made: the
/// follower refuses to write into it. Retrying cannot help, so the follower stops.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(String);

/// The replica holds another history than OUT's (a file continues OUT's TXID but not its
/// database checksum, or ends at OUT's TXID with another one): no retry makes it continue
/// OUT, so the follower restores afresh.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NewHistory(String);

/// Follows `replica` into `output` until `stop` says so; returns OUT's TXID then.
pub fn follow(
    replica: &dyn ReplicaClient,
    output: &Path,
    options: &FollowOptions,
    stop: &dyn Fn() -> bool,
    on_step: &mut dyn FnMut(&Step),
) -> anyhow::Result<u64> {
    let (mut follower, first) = Follower::start(replica, output, options.mode)?;
    on_step(&first);
    let mut failures = 0u32;
    while !stop() {
        // Polls start at a fixed rate: the next one is due an interval after this one
        // started, not after it ended, so a commit waits at most one interval for the poll
        // that finds it (a slow LIST or step does not add to that wait).
        let started = Instant::now();
        match follower.poll() {
            Ok(step) => {
                failures = 0;
                if let Some(step) = &step {
                    tracing::info!(out = %output.display(), txid = step.txid, files = step.files, pages = step.pages, "{}", step.kind);
                    on_step(step);
                }
                if !step.is_some_and(|s| s.behind) {
                    wait(options.interval.saturating_sub(started.elapsed()), stop);
                }
            }
            Err(e) if e.downcast_ref::<Refused>().is_some() => return Err(e),
            Err(e) => {
                failures += 1;
                let backoff = options
                    .interval
                    .saturating_mul(1 << failures.min(5))
                    .min(MAX_BACKOFF);
                tracing::warn!(out = %output.display(), replica = %replica.url(), txid = follower.txid, failures, retry_ms = backoff.as_millis() as u64, error = %format!("{e:#}"), "follow step failed; retrying");
                wait(backoff, stop);
            }
        }
    }
    Ok(follower.txid)
}

fn wait(duration: Duration, stop: &dyn Fn() -> bool) {
    let until = Instant::now() + duration;
    while !stop() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(STOP_CHECK));
    }
}

/// Page 1's checksum without the bytes SQLite rewrites when it commits page 1 ([`Mark`]).
fn normalized_page1_sum(page: &[u8]) -> u64 {
    let mut copy = page.to_vec();
    for range in [24..28, 92..100] {
        if let Some(bytes) = copy.get_mut(range) {
            bytes.fill(0);
        }
    }
    ltx::checksum_page(1, &copy)
}

struct Follower<'a> {
    replica: &'a dyn ReplicaClient,
    output: PathBuf,
    conn: rusqlite::Connection,
    /// (device, inode) of OUT when the follower opened it.
    file_id: (u64, u64),
    /// `PRAGMA data_version` after the follower's last step: another connection's commit
    /// changes it.
    data_version: i64,
    page_size: u32,
    txid: u64,
    /// Page checksums of the source's state at `txid` (index pgno-1; 0 for the lock page);
    /// OUT's differ only in page 1's counter bytes ([`Mark`]).
    sums: Vec<u64>,
    /// [`normalized_page1_sum`] of the source's page 1 at `txid`.
    page1_normalized: u64,
    /// OUT's pages were written by a file without database checksums since the last
    /// integrity check.
    unchecked: bool,
    /// Polls since every level was last listed.
    polls: u32,
    /// The replica file ending at `txid` last seen to end in OUT's database checksum: while
    /// the replica's newest file is this one, it is not downloaded again.
    confirmed: Option<FileInfo>,
}

impl<'a> Follower<'a> {
    fn open(replica: &'a dyn ReplicaClient, output: &Path, txid: u64) -> anyhow::Result<Self> {
        let meta =
            std::fs::metadata(output).with_context(|| format!("opening {}", output.display()))?;
        let conn = rusqlite::Connection::open_with_flags(
            output,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {}", output.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let page_size: u32 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let data_version = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        let mut follower = Follower {
            replica,
            output: output.to_path_buf(),
            conn,
            file_id: (meta.dev(), meta.ino()),
            data_version,
            page_size,
            txid,
            sums: Vec::new(),
            page1_normalized: 0,
            unchecked: false,
            polls: 0,
            confirmed: None,
        };
        (follower.sums, follower.page1_normalized) = follower
            .read_sums()
            .with_context(|| format!("reading {}", output.display()))?;
        Ok(follower)
    }

    /// Page checksums of OUT as SQLite serves it (its `-wal` included), in one read
    /// transaction, and page 1's [`normalized_page1_sum`].
    fn read_sums(&self) -> rusqlite::Result<(Vec<u64>, u64)> {
        let lock = ltx::lock_pgno(self.page_size);
        let (mut sums, mut page1) = (Vec::new(), 0);
        let mut statement = self
            .conn
            .prepare("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let pgno: u32 = row.get(0)?;
            let data = row.get_ref(1)?.as_blob()?;
            sums.resize(pgno as usize, 0);
            if pgno == 1 {
                page1 = normalized_page1_sum(data);
            }
            if pgno != lock {
                sums[pgno as usize - 1] = ltx::checksum_page(pgno, data);
            }
        }
        Ok((sums, page1))
    }

    fn checksum(&self) -> u64 {
        restore::database_checksum(&self.sums)
    }

    fn mark(&self) -> Mark {
        Mark {
            txid: self.txid,
            checksum: self.checksum(),
            page1: self.sums.first().copied().unwrap_or(0),
            page1_normalized: self.page1_normalized,
        }
    }

    /// Refuses when someone else wrote OUT or replaced it since the last step.
    fn check_untouched(&self) -> anyhow::Result<()> {
        let id = std::fs::metadata(&self.output)
            .map(|m| (m.dev(), m.ino()))
            .ok();
        if id != Some(self.file_id) {
            return Err(Refused(format!(
                "{} was removed or replaced by another file; stopping at TXID {}",
                self.output.display(),
                self.txid
            ))
            .into());
        }
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if version != self.data_version {
            return Err(Refused(format!(
                "another connection wrote to {} (it follows a replica and must not be written); stopping at TXID {}",
                self.output.display(),
                self.txid
            ))
            .into());
        }
        Ok(())
    }

    /// Opens the step's write transaction, making sure nobody committed to OUT since the last
    /// step: a commit between [`Follower::check_untouched`] and this lock (during the
    /// downloads) would otherwise be counted as the follower's own.
    fn begin(&self) -> anyhow::Result<()> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let untouched = self.check_untouched();
        if untouched.is_err() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        untouched
    }

    /// One look at the replica: applies what continues OUT, if anything.
    fn poll(&mut self) -> anyhow::Result<Option<Step>> {
        self.check_untouched()?;
        let level0 = self
            .replica
            .list(0)
            .with_context(|| format!("listing level 0 of {}", self.replica.url()))?;
        let newest = level0.iter().map(|f| f.max_txid).max().unwrap_or(0);
        let mut chain = successors(&level0, self.txid);
        self.polls += 1;
        if chain.is_empty() {
            if newest == self.txid && self.polls < FULL_LIST_EVERY {
                return self.settle(&level0);
            }
            self.polls = 0;
            // Compacted away, a new snapshot, or a replica that went back: every level.
            let all = restore::list_all(self.replica)?;
            if all.is_empty() {
                return Ok(None);
            }
            let newest = all.iter().map(|f| f.max_txid).max().unwrap_or(0);
            if newest == self.txid {
                return self.settle(&all);
            }
            chain = successors(&all, self.txid);
            if chain.is_empty() {
                return self.restore_afresh(&all).map(Some);
            }
        }
        let mut bytes = 0;
        let take = chain
            .iter()
            .take(MAX_STEP_FILES)
            .take_while(|f| {
                bytes += f.size;
                bytes <= MAX_STEP_BYTES
            })
            .count()
            .max(1);
        let behind = chain.len() > take;
        chain.truncate(take);
        match self.apply(&chain) {
            Err(e) if e.downcast_ref::<NewHistory>().is_some() => self.start_over(&e).map(Some),
            step => step.map(|step| Some(Step { behind, ..step })),
        }
    }

    /// The replica's newest TXID is OUT's: nothing to do while the file that ends there ends
    /// in OUT's database checksum; when it does not, another history reached the same TXID
    /// (the replica was deleted and rewritten) and OUT is restored afresh.
    fn settle(&mut self, files: &[FileInfo]) -> anyhow::Result<Option<Step>> {
        // The lowest level's file: the smallest, and the one level 0 shows between listings.
        let Some(newest) = files
            .iter()
            .filter(|f| f.max_txid == self.txid)
            .min_by_key(|f| f.level)
        else {
            return Ok(None);
        };
        // A file is known by its name, size and time stored: a rewritten replica's file at
        // the same TXID is a new upload. (S3 stores times to the second, so a rewrite of the
        // same size within the second OUT's file was stored in goes unseen.)
        if self.confirmed.as_ref() == Some(newest) {
            return Ok(None);
        }
        let (header, trailer) =
            restore::head_and_tail(self.replica, newest).map_err(anyhow::Error::msg)?;
        let checksum = self.checksum();
        // Files without database checksums (Litestream's, `litestream_compatible`) carry no
        // post-apply checksum to compare OUT with: another history at the same TXID cannot be
        // told from this one, and OUT stays as it is until the replica moves on.
        if header.tracks_checksums() && trailer.post_apply_checksum != checksum {
            let location = self
                .replica
                .location(newest.level, newest.min_txid, newest.max_txid);
            let e = anyhow::Error::new(NewHistory(format!(
                "replica file {location} ends at {}'s TXID {} with database checksum {:016x}, not {checksum:016x}",
                self.output.display(),
                self.txid,
                trailer.post_apply_checksum
            )));
            return self.start_over(&e).map(Some);
        }
        self.confirmed = Some(newest.clone());
        Ok(None)
    }
}

/// The files that continue TXID `at`, in order: from each TXID, the non-snapshot file that
/// reaches furthest.
fn successors(files: &[FileInfo], mut at: u64) -> Vec<FileInfo> {
    let mut chain = Vec::new();
    while let Some(next) = files
        .iter()
        .filter(|f| f.level != SNAPSHOT_LEVEL && f.min_txid == at + 1)
        .max_by_key(|f| f.max_txid)
    {
        at = next.max_txid;
        chain.push(next.clone());
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn f(level: u8, min: u64, max: u64) -> FileInfo {
        FileInfo {
            level,
            min_txid: min,
            max_txid: max,
            size: 1,
            created: UNIX_EPOCH,
        }
    }

    #[test]
    fn successors_continue_the_txid_through_any_level_but_snapshots() {
        let files = [
            f(9, 1, 5),
            f(0, 6, 6),
            f(1, 6, 8),
            f(0, 7, 7),
            f(0, 9, 9),
            f(0, 11, 11),
        ];
        let ids = |c: Vec<FileInfo>| c.iter().map(|f| (f.level, f.min_txid)).collect::<Vec<_>>();
        assert_eq!(ids(successors(&files, 5)), [(1, 6), (0, 9)]);
        assert_eq!(ids(successors(&files, 6)), [(0, 7)]);
        assert!(successors(&files, 9).is_empty(), "a gap at 10");
        assert!(successors(&files, 11).is_empty());
    }

    #[test]
    fn page_1_is_compared_without_the_counter_bytes_sqlite_rewrites() {
        let mut page = vec![3u8; 4096];
        let before = normalized_page1_sum(&page);
        page[24..28].copy_from_slice(&[1, 2, 3, 4]);
        page[92..100].fill(8);
        assert_eq!(normalized_page1_sum(&page), before);
        page[28] = 0;
        assert_ne!(normalized_page1_sum(&page), before);
    }
}
