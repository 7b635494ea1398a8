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
use std::io::{self, IsTerminal};
use std::path::Path;
use std::time::SystemTime;

use anyhow::{bail, Context};

use crate::replica::{FileInfo, ReplicaClient};

mod apply;
mod chain;

pub(crate) use apply::database_checksum;
use apply::{
    apply, is_small, write_runs, Applier, Sink, RUNS_IN_FLIGHT, RUN_BYTES, SMALL_RUN_BYTES,
};
use chain::download;
pub use chain::{head_and_tail, list_all, plan};

/// What to restore to.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Latest,
    Txid(u64),
    /// The last TXID whose file the replica stored at or before this time.
    Time(SystemTime),
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

/// SQLite maps this much of the database for `PRAGMA integrity_check` (capped by its
/// SQLITE_MAX_MMAP_SIZE, 2 GiB on Linux): reading pages through the mapping rather than a
/// `pread` each halves the check's time on a 1 GiB database.
const CHECK_MMAP_BYTES: i64 = 1 << 40;

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
        return restore_listed(
            replica,
            &files,
            target,
            output,
            mode,
            progress,
            DirSync::Now,
        );
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

/// Who syncs the directory a restored file is linked into, which makes its name durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirSync {
    /// The restore, before it returns.
    Now,
    /// Its caller, once for many restores into one directory (`restore --all`). Until then a
    /// crash may lose the name, never leave part of a database under it: the file is synced
    /// before it is linked.
    Caller,
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
    dir_sync: DirSync,
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
    let result = restore_into(
        replica,
        &chain,
        output,
        work.path(),
        mode,
        progress,
        dir_sync,
    );
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
    dir_sync: DirSync,
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
    if dir_sync == DirSync::Now {
        // A bare file name's directory is the working directory.
        let dir = output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("syncing the directory {}", dir.display()))?;
    }
    Ok(header.commit)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::{self, Decoder};

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
}
