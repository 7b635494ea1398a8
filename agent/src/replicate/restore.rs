//! Restoring a database from its replica to any TXID or point in time, verified.
//!
//! The plan is the newest snapshot at or before the target, then the shortest chain of files
//! across levels that continues it TXID by TXID (from each TXID, the file reaching furthest
//! without passing the target). Files are downloaded in parallel; each is decoded with its
//! file checksum verified, its pre-apply checksum must equal the previous file's post-apply
//! checksum, and the finished database must have the last file's post-apply checksum and pass
//! `PRAGMA integrity_check`. The result is written to a temporary file and renamed, so `OUT`
//! is either the verified database or untouched.
//!
//! A restore runs at close to the speed of copying the file: each page is decompressed
//! straight into a run of pages and hashed once for both its file's checksum and the
//! database checksum on one core, while the other writes the runs and the kernel is asked to
//! write them back as they come; the integrity check then reads the page cache while the
//! fsync finishes.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context};

use crate::ltx::{self, Decoder};
use crate::replica::{FileInfo, ReplicaClient, SNAPSHOT_LEVEL};

/// Levels a restore may read, compacted ones first so chains are short.
const LEVELS: [u8; 5] = [SNAPSHOT_LEVEL, 3, 2, 1, 0];
/// Files downloaded at once.
const PARALLEL_DOWNLOADS: usize = 4;

/// What to restore to.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Latest,
    Txid(u64),
    /// The last TXID whose file the replica stored at or before this time.
    Time(SystemTime),
}

/// Every file of a replica, by level.
pub fn list_all(replica: &dyn ReplicaClient) -> anyhow::Result<Vec<FileInfo>> {
    let mut files = Vec::new();
    for level in LEVELS {
        files.extend(
            replica
                .list(level)
                .with_context(|| format!("listing level {level} of {}", replica.url()))?,
        );
    }
    files.sort_by_key(|f| (f.max_txid, f.level));
    Ok(files)
}

/// Why a replica with no LTX files cannot be restored, and what usually causes it: the agent
/// ships a database at its first write after it started watching, so one that was never
/// written since has nothing in its replica yet.
fn empty_replica(replica: &dyn ReplicaClient) -> anyhow::Error {
    let url = replica.url();
    let state = match replica.exists() {
        Ok(true) => format!("the replica {url} exists but holds no LTX files"),
        Ok(false) => format!("the replica {url} does not exist, so it holds no LTX files"),
        Err(e) => {
            format!("the replica {url} holds no LTX files (whether it exists is unknown: {e})")
        }
    };
    anyhow::anyhow!(
        "{state}; the agent replicates a database from its first write after it started \
         watching, so either nothing was written since, or the agent never ran with this \
         replica (start it with `multidb agent --baseline` to back up every database once)"
    )
}

/// The files to apply, in order, to reach `target`.
pub fn plan(files: &[FileInfo], target: Target) -> anyhow::Result<Vec<FileInfo>> {
    let Some(max) = files.iter().map(|f| f.max_txid).max() else {
        bail!("the replica holds no LTX files");
    };
    let target_txid = match target {
        Target::Latest => max,
        Target::Txid(t) => {
            if t == 0 || t > max {
                bail!("TXID {t} is not in the replica (it holds 1 to {max})");
            }
            t
        }
        Target::Time(when) => files
            .iter()
            .filter(|f| (f.level == 0 || f.level == SNAPSHOT_LEVEL) && f.created <= when)
            .map(|f| f.max_txid)
            .max()
            .context("no file in the replica is that old")?,
    };
    // Any file that starts at TXID 1 holds the whole database, whatever its level: Litestream
    // writes no level-9 snapshot in its first snapshot interval (a day), so its level-0 file
    // 1-1 is the only full copy until then.
    let snapshot = files
        .iter()
        .filter(|f| (f.level == SNAPSHOT_LEVEL || f.min_txid == 1) && f.max_txid <= target_txid)
        .max_by_key(|f| f.max_txid)
        .with_context(|| format!("no snapshot at or before TXID {target_txid}"))?;
    let mut chain = vec![snapshot.clone()];
    let mut at = snapshot.max_txid;
    while at < target_txid {
        let next = files
            .iter()
            .filter(|f| f.level != SNAPSHOT_LEVEL && f.min_txid == at + 1 && f.max_txid <= target_txid)
            .max_by_key(|f| f.max_txid)
            .with_context(|| format!("missing file in the chain: nothing in the replica starts at TXID {} (restoring to {target_txid})", at + 1))?;
        at = next.max_txid;
        chain.push(next.clone());
    }
    Ok(chain)
}

/// Downloads `chain` in parallel into files in `dir`, in order.
fn download(
    replica: &dyn ReplicaClient,
    chain: &[FileInfo],
    dir: &Path,
    progress: &(dyn Fn(usize) + Sync),
) -> anyhow::Result<Vec<PathBuf>> {
    // Files of a local replica are read in place; others are downloaded into `dir`.
    let (paths, remote): (Vec<PathBuf>, Vec<bool>) = chain
        .iter()
        .enumerate()
        .map(
            |(i, f)| match replica.local_path(f.level, f.min_txid, f.max_txid) {
                Some(path) => (path, false),
                None => (dir.join(format!("{i:08}.ltx")), true),
            },
        )
        .unzip();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let fetched = remote.iter().filter(|r| **r).count();
    // Threads only when more than one file is fetched and there is enough to fetch.
    let threads = if fetched > 1 && !is_small(chain) {
        PARALLEL_DOWNLOADS.min(fetched)
    } else {
        1
    };
    let fetch = || -> anyhow::Result<()> {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(f) = chain.get(i) else { return Ok(()) };
            if remote[i] {
                let mut out = io::BufWriter::new(File::create(&paths[i])?);
                replica
                    .get(f.level, f.min_txid, f.max_txid, &mut out)
                    .with_context(|| {
                        format!(
                            "downloading {}",
                            replica.location(f.level, f.min_txid, f.max_txid)
                        )
                    })?;
                out.flush()?;
            }
            progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
        }
    };
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (1..threads).map(|_| scope.spawn(fetch)).collect();
        // The calling thread fetches too: with one thread, nothing is started.
        let here = fetch();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("download thread panicked"))??;
        }
        here
    })?;
    Ok(paths)
}

/// Pages travel from the decoding thread to the writing thread in runs of consecutive pages.
enum Chunk {
    /// Pages `start`.. in the first `len` bytes of `data`.
    Run {
        start: u32,
        page_size: usize,
        data: Vec<u8>,
        len: usize,
    },
    /// A file ended: the database is now `commit` pages long.
    End { commit: u32, page_size: u32 },
}

/// The largest run handed over (and written) at once; a multiple of every page size. Larger
/// writes are fewer calls, but on the 2-core VM the restore is measured on (Linux 6.18, ext4)
/// the kernel copied them into the page cache far more slowly at times: 1 MiB runs made a
/// 1 GiB restore up to twice as slow, 4 MiB ones three to four times; 128 to 512 KiB measured
/// alike.
const RUN_BYTES: usize = 512 * 1024;
/// A restore whose replica files hold at most this many bytes is small: it runs on the calling
/// thread alone (no download, writing or fsync threads), in runs of [`SMALL_RUN_BYTES`].
/// Starting those threads cost more than the whole restore of a few-KiB database, which is
/// what `restore --all` mostly meets.
const SMALL_RESTORE_BYTES: u64 = 1 << 20;
const SMALL_RUN_BYTES: usize = 64 * 1024;

fn is_small(chain: &[FileInfo]) -> bool {
    chain.iter().map(|f| f.size).sum::<u64>() <= SMALL_RESTORE_BYTES
}

/// Runs in flight between the two threads (bounded: memory stays a few MiB).
const RUNS_IN_FLIGHT: usize = 4;
/// Input buffered per LTX file: few read calls, and most payloads decompress straight out of
/// the buffer rather than being copied out first.
const INPUT_BUFFER: usize = 256 * 1024;
/// Written bytes after which the kernel is asked to start writing them back, so the disk works
/// while pages are still decoded and the closing fsync finds little left to do. Without it a
/// restore smaller than the dirty-page threshold (10% of memory by default) reaches the disk
/// only at that fsync: a 1 GiB restore took 750 ms rather than 570 ms. 8 and 32 MiB measured
/// alike, 128 MiB started too late.
const WRITEBACK_BYTES: usize = 8 << 20;
/// SQLite maps this much of the database for `PRAGMA integrity_check` (capped by its
/// SQLITE_MAX_MMAP_SIZE, 2 GiB on Linux): reading pages through the mapping rather than a
/// `pread` each halves the check's time on a 1 GiB database.
const CHECK_MMAP_BYTES: i64 = 1 << 40;

/// The decoding side: decodes pages straight into runs (one write per run rather than per
/// page), keeps their checksums and hands the runs to [`write_runs`] on the other core.
struct Applier<'a> {
    sink: Sink<'a>,
    page_size: usize,
    /// [`RUN_BYTES`] long ([`SMALL_RUN_BYTES`] for a small restore); the first `filled`
    /// bytes hold pages `run_start`...
    run: Vec<u8>,
    filled: usize,
    run_start: u32,
    /// Page checksums of the database as applied so far (index pgno-1; 0 for none).
    sums: Vec<u64>,
    /// The database's size in pages after the files applied so far.
    db_pages: u32,
}

/// Where an [`Applier`]'s runs go.
enum Sink<'a> {
    /// To [`write_runs`] on another thread, and buffers back for reuse.
    Thread {
        tx: std::sync::mpsc::SyncSender<Chunk>,
        spare: std::sync::mpsc::Receiver<Vec<u8>>,
    },
    /// Written here: a small restore, where starting threads would cost more than the
    /// overlap saves. The buffer of the last run written is kept for the next.
    Direct {
        out: &'a File,
        spare: Option<Vec<u8>>,
    },
}

fn writer_gone() -> io::Error {
    io::Error::other("the restore's writing thread stopped")
}

impl<'a> Applier<'a> {
    /// An applier handing runs of up to `run_bytes` to `sink`.
    fn new(sink: Sink<'a>, run_bytes: usize) -> Applier<'a> {
        Applier {
            sink,
            page_size: 0,
            run: vec![0; run_bytes],
            filled: 0,
            run_start: 0,
            sums: Vec::new(),
            db_pages: 0,
        }
    }

    /// Room for the next page, at the end of the current run.
    fn slot(&mut self, page_size: usize) -> io::Result<&mut [u8]> {
        if page_size != self.page_size || self.filled + page_size > self.run.len() {
            self.flush()?;
            self.page_size = page_size;
        }
        Ok(&mut self.run[self.filled..self.filled + page_size])
    }

    /// The slot now holds page `pgno`, whose page checksum is `sum`.
    fn commit(&mut self, pgno: u32, sum: u64) -> io::Result<()> {
        let page_size = self.page_size;
        if self.filled == 0 {
            self.run_start = pgno;
        } else if pgno != self.run_start + (self.filled / page_size) as u32 {
            // Not the next page: the run ends before it and a new one starts with it.
            let mut fresh = self.fresh_run();
            fresh[..page_size].copy_from_slice(&self.run[self.filled..self.filled + page_size]);
            let run = std::mem::replace(&mut self.run, fresh);
            self.send_run(run)?;
            self.run_start = pgno;
        }
        self.filled += page_size;
        let index = (pgno - 1) as usize;
        if self.sums.len() <= index {
            self.sums.resize(index + 1, 0);
        }
        self.sums[index] = sum;
        Ok(())
    }

    fn fresh_run(&mut self) -> Vec<u8> {
        let len = self.run.len();
        let spare = match &mut self.sink {
            Sink::Thread { spare, .. } => spare.try_recv().ok(),
            Sink::Direct { spare, .. } => spare.take(),
        };
        spare.unwrap_or_else(|| vec![0; len])
    }

    fn send_run(&mut self, data: Vec<u8>) -> io::Result<()> {
        let len = std::mem::take(&mut self.filled);
        match &mut self.sink {
            Sink::Thread { tx, .. } => {
                let chunk = Chunk::Run {
                    start: self.run_start,
                    page_size: self.page_size,
                    data,
                    len,
                };
                tx.send(chunk).map_err(|_| writer_gone())
            }
            Sink::Direct { out, spare } => {
                let offset = u64::from(self.run_start - 1) * self.page_size as u64;
                out.write_all_at(&data[..len], offset)?;
                *spare = Some(data);
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let fresh = self.fresh_run();
        let run = std::mem::replace(&mut self.run, fresh);
        self.send_run(run)
    }

    fn end_file(&mut self, commit: u32, page_size: u32) -> io::Result<()> {
        self.flush()?;
        self.sums.truncate(commit as usize);
        self.db_pages = commit;
        match &self.sink {
            Sink::Thread { tx, .. } => tx
                .send(Chunk::End { commit, page_size })
                .map_err(|_| writer_gone()),
            Sink::Direct { out, .. } => out.set_len(u64::from(commit) * u64::from(page_size)),
        }
    }
}

/// The writing side: writes each run where it belongs and keeps writeback going.
fn write_runs(
    out: &File,
    rx: std::sync::mpsc::Receiver<Chunk>,
    spare: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> io::Result<()> {
    // Starting writeback blocks while the disk's queue is full, so a third thread does it and
    // the writes never wait for it; a kick it has not yet taken covers later writes too.
    let (kick, kicks) = std::sync::mpsc::sync_channel::<()>(1);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for () in kicks {
                start_writeback(out);
            }
        });
        let mut unsynced = 0;
        let written = (|| {
            for chunk in rx {
                match chunk {
                    Chunk::Run {
                        start,
                        page_size,
                        data,
                        len,
                    } => {
                        out.write_all_at(&data[..len], u64::from(start - 1) * page_size as u64)?;
                        unsynced += len;
                        if unsynced >= WRITEBACK_BYTES {
                            let _ = kick.try_send(());
                            unsynced = 0;
                        }
                        let _ = spare.try_send(data);
                    }
                    Chunk::End { commit, page_size } => {
                        out.set_len(u64::from(commit) * u64::from(page_size))?;
                    }
                }
            }
            Ok(())
        })();
        drop(kick);
        written
    })
}

/// Asks the kernel to start writing `file`'s dirty pages back, without waiting. Only a hint:
/// the fsync at the end reports any failure.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call; no memory is passed.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File) {}

/// The database checksum of a set of page checksums.
pub(crate) fn database_checksum(sums: &[u64]) -> u64 {
    sums.iter()
        .filter(|s| **s != 0)
        .fold(ltx::EMPTY_DATABASE_CHECKSUM, |c, s| {
            ltx::toggle_page_checksum(c, *s)
        })
}

/// Applies one downloaded file; returns its header and post-apply checksum. The outer error is
/// a local I/O failure, the inner one a corrupt file.
fn apply(
    path: &Path,
    applier: &mut Applier<'_>,
) -> io::Result<Result<(ltx::Header, u64), ltx::LtxError>> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut decoder = match Decoder::with_capacity(INPUT_BUFFER, file) {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    let header = *decoder.header();
    // Numbers from the file size what is allocated and written (a page checksum per page,
    // the database's length): each must be justified by the file's length first. A file
    // may add to the database at most the pages it can hold.
    if let Err(e) = ltx::check_header_against_len(&header, len) {
        return Ok(Err(e));
    }
    let max_pages = ltx::max_pages_in(len);
    let growth = u64::from(header.commit).saturating_sub(u64::from(applier.db_pages));
    if growth > max_pages {
        return Ok(Err(ltx::LtxError::TooLarge {
            what: format!(
                "header grows the database from {} to {} pages",
                applier.db_pages, header.commit
            ),
            len,
            max_pages,
        }));
    }
    loop {
        let slot = applier.slot(header.page_size as usize)?;
        match decoder.next_page(slot) {
            Ok(Some(pgno)) => applier.commit(pgno, decoder.page_checksum())?,
            Ok(None) => break,
            Err(e) => return Ok(Err(e)),
        }
    }
    let trailer = match decoder.finish() {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    applier.end_file(header.commit, header.page_size)?;
    Ok(Ok((header, trailer.post_apply_checksum)))
}

/// `PRAGMA integrity_check` on a database others may open too (through SQLite's locks).
pub(crate) fn integrity_check(path: &Path) -> anyhow::Result<()> {
    let conn = rusqlite::Connection::open(path)
        .with_context(|| format!("opening {} for PRAGMA integrity_check", path.display()))?;
    check_integrity(&conn, path)
}

/// `PRAGMA integrity_check` on a restore's own temporary, which no one else opens: read-only
/// and `immutable`, so the check writes nothing (no `-wal` or `-shm` beside it; on a full
/// disk it still runs).
fn integrity_check_unshared(path: &Path) -> anyhow::Result<()> {
    // Not UTF-8: a URI cannot name it; the check goes through the locks instead.
    let Some(name) = path.to_str() else {
        return integrity_check(path);
    };
    // `file://` with an empty authority before an absolute path.
    let mut uri = String::from(if name.starts_with('/') {
        "file://"
    } else {
        "file:"
    });
    for c in name.chars() {
        match c {
            '%' | '?' | '#' => uri.push_str(&format!("%{:02X}", c as u32)),
            _ => uri.push(c),
        }
    }
    uri.push_str("?immutable=1");
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
        | rusqlite::OpenFlags::SQLITE_OPEN_URI
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(&uri, flags)
        .with_context(|| format!("opening {} for PRAGMA integrity_check", path.display()))?;
    check_integrity(&conn, path)
}

fn check_integrity(conn: &rusqlite::Connection, path: &Path) -> anyhow::Result<()> {
    let check: String = conn
        .pragma_update_and_check(None, "mmap_size", CHECK_MMAP_BYTES, |r| r.get::<_, i64>(0))
        .and_then(|_| conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)))
        .with_context(|| format!("PRAGMA integrity_check on {}", path.display()))?;
    if check != "ok" {
        bail!("restored database fails PRAGMA integrity_check: {check}");
    }
    Ok(())
}

/// The header and trailer of one replica file: read in place from a directory replica,
/// downloaded (and all but both ends dropped on the way) from others.
pub fn head_and_tail(
    replica: &dyn ReplicaClient,
    file: &FileInfo,
) -> Result<(crate::ltx::Header, crate::ltx::Trailer), String> {
    use crate::ltx::{HEADER_SIZE, TRAILER_SIZE};
    let location = replica.location(file.level, file.min_txid, file.max_txid);
    let mut ends = Ends::default();
    match replica.local_path(file.level, file.min_txid, file.max_txid) {
        Some(path) => {
            use std::os::unix::fs::FileExt;
            let f = File::open(&path).map_err(|e| format!("{location}: {e}"))?;
            let len = f.metadata().map_err(|e| format!("{location}: {e}"))?.len();
            let mut head = [0; HEADER_SIZE];
            let mut tail = [0; TRAILER_SIZE];
            f.read_exact_at(&mut head, 0)
                .and_then(|()| f.read_exact_at(&mut tail, len.saturating_sub(TRAILER_SIZE as u64)))
                .map_err(|e| format!("{location}: {e}"))?;
            ends.head = head.to_vec();
            ends.tail = tail.to_vec();
        }
        None => replica
            .get(file.level, file.min_txid, file.max_txid, &mut ends)
            .map_err(|e| e.to_string())?,
    }
    let head: [u8; HEADER_SIZE] =
        ends.head.as_slice().try_into().map_err(|_| {
            format!("replica file {location} is corrupt: shorter than an LTX header")
        })?;
    let tail: [u8; TRAILER_SIZE] = ends
        .tail
        .as_slice()
        .try_into()
        .map_err(|_| format!("replica file {location} is corrupt: no trailer"))?;
    let header = crate::ltx::Header::decode(&head)
        .map_err(|e| format!("replica file {location} is corrupt: {e}"))?;
    Ok((header, crate::ltx::Trailer::decode(&tail)))
}

/// A sink keeping the first [`crate::ltx::HEADER_SIZE`] and last
/// [`crate::ltx::TRAILER_SIZE`] bytes written to it.
#[derive(Default)]
struct Ends {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Write for Ends {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use crate::ltx::{HEADER_SIZE, TRAILER_SIZE};
        let room = HEADER_SIZE.saturating_sub(self.head.len()).min(buf.len());
        self.head.extend_from_slice(&buf[..room]);
        self.tail.extend_from_slice(buf);
        let excess = self.tail.len().saturating_sub(TRAILER_SIZE);
        self.tail.drain(..excess);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    pub txid: u64,
    pub files: usize,
    pub pages: u32,
}

/// Restores into `output` (which must not exist), owner-only: the replica does not say who
/// may read the database. [`restore_with_mode`] restores with another mode.
pub fn restore(
    replica: &dyn ReplicaClient,
    target: Target,
    output: &Path,
    dry_run: bool,
) -> anyhow::Result<Restored> {
    restore_with_mode(
        replica,
        target,
        output,
        dry_run,
        crate::replica::PRIVATE_MODE,
    )
}

/// Restores into `output` (which must not exist), created with `mode` (narrowed by the
/// umask): the `restore` command passes the mode of the database it restores when that file
/// exists, so a restored copy is never more readable than the original.
pub fn restore_with_mode(
    replica: &dyn ReplicaClient,
    target: Target,
    output: &Path,
    dry_run: bool,
    mode: u32,
) -> anyhow::Result<Restored> {
    if output.exists() {
        bail!(
            "{} already exists; restore never overwrites a database",
            output.display()
        );
    }
    let files = list_all(replica)?;
    if !dry_run {
        let progress = io::stderr().is_terminal();
        return restore_listed(replica, &files, target, output, mode, progress);
    }
    if files.is_empty() {
        return Err(empty_replica(replica));
    }
    let chain = plan(&files, target)?;
    let txid = chain.last().map_or(0, |f| f.max_txid);
    for f in &chain {
        println!("level {} {} ({} bytes)", f.level, f.name(), f.size);
    }
    println!(
        "would restore TXID {txid} from {} file(s) to {}",
        chain.len(),
        output.display()
    );
    Ok(Restored {
        txid,
        files: chain.len(),
        pages: 0,
    })
}

/// Restores into `output` (which must not exist) from `files`, a listing of the replica
/// already made (by [`list_all`], or by a walk over many replicas that saw every file, so
/// that no request lists this one again). `progress` prints the download and apply counts to
/// stderr; a caller restoring many databases at once shows its own progress instead.
pub fn restore_listed(
    replica: &dyn ReplicaClient,
    files: &[FileInfo],
    target: Target,
    output: &Path,
    mode: u32,
    progress: bool,
) -> anyhow::Result<Restored> {
    if files.is_empty() {
        return Err(empty_replica(replica));
    }
    let chain = plan(files, target)?;
    let txid = chain.last().map_or(0, |f| f.max_txid);
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let work = super::workdir::WorkDir::create(parent, "restore")?;
    let result = restore_into(replica, &chain, output, work.path(), mode, progress);
    drop(work);
    result.map(|pages| Restored {
        txid,
        files: chain.len(),
        pages,
    })
}

fn restore_into(
    replica: &dyn ReplicaClient,
    chain: &[FileInfo],
    output: &Path,
    work: &Path,
    mode: u32,
    show: bool,
) -> anyhow::Result<u32> {
    let total = chain.len();
    let progress = |n: usize| {
        if show {
            eprint!("\rdownloading {n}/{total}");
        }
    };
    let started = std::time::Instant::now();
    let paths = download(replica, chain, work, &progress)?;
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "downloaded");
    if show {
        eprintln!();
    }
    let tmp = work.join("restored.db");
    let out = crate::replica::create_new(&tmp, mode)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let mut checksum = None;
    let mut header = None;
    let mut apply_all = |applier: &mut Applier<'_>| -> anyhow::Result<Vec<u64>> {
        for (i, (f, path)) in chain.iter().zip(&paths).enumerate() {
            if show {
                eprint!("\rapplying {}/{total}", i + 1);
            }
            let location = replica.location(f.level, f.min_txid, f.max_txid);
            let (h, post) = apply(path, applier)
                .with_context(|| format!("writing {}", tmp.display()))?
                .with_context(|| format!("replica file {location} is corrupt"))?;
            if h.min_txid != f.min_txid || h.max_txid != f.max_txid {
                bail!(
                    "replica file {location} is corrupt: its header says TXIDs {}-{}",
                    h.min_txid,
                    h.max_txid
                );
            }
            if let Some(previous) = checksum {
                if h.tracks_checksums() && h.pre_apply_checksum != previous {
                    bail!("replica file {location} does not continue the chain: pre-apply checksum {:016x}, expected {previous:016x}", h.pre_apply_checksum);
                }
            }
            checksum = Some(post);
            header = Some(h);
        }
        if show {
            eprintln!();
        }
        Ok(std::mem::take(&mut applier.sums))
    };
    let small = is_small(chain);
    let (applied, written) = if small {
        let sink = Sink::Direct {
            out: &out,
            spare: None,
        };
        let mut applier = Applier::new(sink, SMALL_RUN_BYTES);
        (apply_all(&mut applier), Ok(Ok(())))
    } else {
        let (tx, rx) = std::sync::mpsc::sync_channel(RUNS_IN_FLIGHT);
        let (spare_tx, spare_rx) = std::sync::mpsc::sync_channel(RUNS_IN_FLIGHT);
        let out_ref = &out;
        std::thread::scope(|scope| {
            let writer = scope.spawn(move || write_runs(out_ref, rx, spare_tx));
            let sink = Sink::Thread {
                tx,
                spare: spare_rx,
            };
            let mut applier = Applier::new(sink, RUN_BYTES);
            let applied = apply_all(&mut applier);
            drop(applier); // closes the channel: the writer finishes
            let written = writer
                .join()
                .map_err(|_| anyhow::anyhow!("the restore's writing thread panicked"));
            (applied, written)
        })
    };
    written?.with_context(|| format!("writing {}", tmp.display()))?;
    let sums = applied?;
    let header = header.context("empty chain")?;
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "applied");
    let actual = database_checksum(&sums);
    if header.tracks_checksums() && Some(actual) != checksum {
        bail!(
            "restored database checksum {actual:016x} differs from the replica's {:016x}",
            checksum.unwrap_or_default()
        );
    }
    // The check reads what the page cache holds while the fsync puts it on disk; both must
    // succeed before the rename, in either order (one after the other for a small one).
    let (synced, checked) = if small {
        (Ok(out.sync_all()), integrity_check_unshared(&tmp))
    } else {
        std::thread::scope(|scope| {
            let sync = scope.spawn(|| out.sync_all());
            let checked = integrity_check_unshared(&tmp);
            tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                "integrity checked"
            );
            (sync.join(), checked)
        })
    };
    synced
        .map_err(|_| anyhow::anyhow!("the restore's fsync thread panicked"))?
        .with_context(|| format!("syncing {}", tmp.display()))?;
    tracing::debug!(ms = started.elapsed().as_millis() as u64, "synced");
    checked?;
    // A link, not a rename: it fails rather than replace whatever appeared at `output`
    // meanwhile (a file, or a symlink planted to make us write elsewhere). The temporary
    // name goes with the work directory.
    std::fs::hard_link(&tmp, output)
        .with_context(|| format!("moving the restored database to {}", output.display()))?;
    if let Some(dir) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(header.commit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn f(level: u8, min: u64, max: u64, secs: u64) -> FileInfo {
        FileInfo {
            level,
            min_txid: min,
            max_txid: max,
            size: 1,
            created: UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    /// A file replica holding `files` at level 0, each named by its header's TXIDs.
    fn replica_of(dir: &Path, files: &[Vec<u8>]) -> crate::replica::file::FileReplica {
        let level = dir.join("replica/ltx/0");
        std::fs::create_dir_all(&level).unwrap();
        for bytes in files {
            let mut decoder = Decoder::new(bytes.as_slice()).unwrap();
            let h = *decoder.header();
            let mut page = vec![0; h.page_size as usize];
            while decoder.next_page(&mut page).unwrap().is_some() {}
            let name = crate::replica::file_name(h.min_txid, h.max_txid);
            std::fs::write(level.join(name), bytes).unwrap();
        }
        crate::replica::file::FileReplica::new(dir.join("replica"))
    }

    /// A real one-page database: page 1 of an empty WAL-less SQLite file.
    fn one_page_db() -> Vec<u8> {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA page_size=4096; VACUUM;")
            .unwrap();
        drop(conn);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 4096);
        bytes
    }

    /// Issue 10, case 6: a 4 KB file claiming a page near 2^31 made restore allocate a page
    /// checksum for every page up to it (1 GB; 16 GiB aborted the process and left the
    /// temporary directory behind).
    #[test]
    fn regression_10_crafted_page_numbers_fail_before_allocating() {
        use crate::ltx::test_support::{encode_file, header};
        let tmp = tempfile::tempdir().unwrap();
        let page = one_page_db();
        let snapshot = encode_file(header(4096, 1, 1, 1), &[(1, page.clone())], None);
        let huge = (1u32 << 31) - 2;
        let post = ltx::CHECKSUM_FLAG | 1;
        let crafted = encode_file(header(4096, huge, 2, 2), &[(huge - 1, page)], Some(post));
        assert!(crafted.len() < 4096, "{} bytes", crafted.len());
        let replica = replica_of(tmp.path(), &[snapshot, crafted]);
        let out = tmp.path().join("out.db");
        let started = std::time::Instant::now();
        let e = format!(
            "{:#}",
            restore(&replica, Target::Latest, &out, false).unwrap_err()
        );
        let elapsed = started.elapsed();
        assert!(
            e.contains("0000000000000002-0000000000000002.ltx is corrupt: header grows the database from 1 to 2147483646 pages, more than a file of"),
            "{e}"
        );
        eprintln!("refused in {elapsed:?}: {e}");
        assert!(!out.exists());
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["replica"], "nothing but the replica is left");

        // A snapshot header cannot claim more pages than its file holds either.
        let tmp = tempfile::tempdir().unwrap();
        let mut lying = encode_file(header(4096, 1, 1, 1), &[(1, one_page_db())], None);
        lying[12..16].copy_from_slice(&1_000_000u32.to_be_bytes());
        let level = tmp.path().join("replica/ltx/0");
        std::fs::create_dir_all(&level).unwrap();
        std::fs::write(level.join(crate::replica::file_name(1, 1)), &lying).unwrap();
        let replica = crate::replica::file::FileReplica::new(tmp.path().join("replica"));
        let e = format!(
            "{:#}",
            restore(&replica, Target::Latest, &tmp.path().join("o.db"), false).unwrap_err()
        );
        assert!(
            e.contains("is corrupt: snapshot header says 1000000 pages, more than a file of"),
            "{e}"
        );
    }

    /// Issue 13: an empty replica names itself, says whether it exists and why it may be empty.
    #[test]
    fn regression_13_an_empty_replica_says_what_and_why() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("replica");
        let replica = crate::replica::file::FileReplica::new(root.clone());
        let out = tmp.path().join("out.db");
        let e = format!(
            "{:#}",
            restore(&replica, Target::Latest, &out, false).unwrap_err()
        );
        let url = format!("file://{}", root.display());
        assert!(
            e.starts_with(&format!(
                "the replica {url} does not exist, so it holds no LTX files;"
            )),
            "{e}"
        );
        assert!(e.contains("`multidb agent --baseline`"), "{e}");
        std::fs::create_dir_all(&root).unwrap();
        let e = format!(
            "{:#}",
            restore(&replica, Target::Latest, &out, false).unwrap_err()
        );
        assert!(
            e.starts_with(&format!("the replica {url} exists but holds no LTX files;")),
            "{e}"
        );
        assert!(!out.exists());
    }

    #[test]
    fn plans_take_the_newest_snapshot_and_the_shortest_chain() {
        let files = vec![
            f(9, 1, 1, 1),
            f(0, 2, 2, 2),
            f(0, 3, 3, 3),
            f(1, 2, 4, 5),
            f(0, 4, 4, 4),
            f(0, 5, 5, 6),
            f(9, 1, 5, 7),
            f(0, 6, 6, 8),
        ];
        let names = |p: Vec<FileInfo>| {
            p.iter()
                .map(|f| (f.level, f.min_txid, f.max_txid))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(plan(&files, Target::Latest).unwrap()),
            [(9, 1, 5), (0, 6, 6)]
        );
        assert_eq!(
            names(plan(&files, Target::Txid(4)).unwrap()),
            [(9, 1, 1), (1, 2, 4)]
        );
        assert_eq!(
            names(plan(&files, Target::Txid(3)).unwrap()),
            [(9, 1, 1), (0, 2, 2), (0, 3, 3)]
        );
        assert_eq!(
            names(plan(&files, Target::Time(UNIX_EPOCH + Duration::from_secs(3))).unwrap()),
            [(9, 1, 1), (0, 2, 2), (0, 3, 3)]
        );
        assert!(plan(&files, Target::Txid(7))
            .unwrap_err()
            .to_string()
            .contains("TXID 7 is not in the replica"));
        let gap: Vec<FileInfo> = files
            .iter()
            .filter(|x| (x.level, x.min_txid) != (0, 3) && x.level != 1)
            .cloned()
            .collect();
        assert!(plan(&gap, Target::Txid(4))
            .unwrap_err()
            .to_string()
            .contains("nothing in the replica starts at TXID 3"));
        assert!(plan(&[], Target::Latest).is_err());
    }
}
