//! Restoring a fleet: every replica under the template's root, in parallel, each with the
//! verification of a single restore, in one process.
//!
//! One thread walks the root ([`Catalogue::walk`]) and hands each replica found to `jobs`
//! workers through a bounded queue, so memory follows the jobs, not the number of databases:
//! the walk waits while the workers are busy. A worker reads the location back into its
//! database path, checks the replica's identity names that path, and restores it with
//! [`restore::restore_listed`], reusing the walk's listing where the walk saw the files.
//!
//! Nothing is overwritten: a restore writes a temporary file and links it into place, which
//! fails rather than replace a file that appeared meanwhile. No symbolic link below the output
//! root is followed, as discovery follows none: a database whose output path passes through
//! one fails. Without a target directory only databases missing on this host (neither the
//! file nor its `-wal` exists) are restored.
//!
//! A rerun resumes: a restored file appears at its path only once it is complete, synced,
//! checksummed and integrity-checked (the link is the last step), so a file found at an output
//! path under a target directory is either one this command restored or someone else's. It is
//! counted as already restored only when it still holds the replica's state at the target TXID:
//! its length is the last file's page count times its page size and its database checksum (the
//! XOR of the page CRC-64s, as LTX defines it) equals the last file's post-apply checksum.
//! Anything else there is a failure, left as it is.
//!
//! Directories are synced once, not once per database: each restore syncs its file before
//! linking it, and every directory from its output's up to the output root (and above the
//! root, those it may create) is synced once, on the jobs' threads, before [`restore_all`]
//! returns (a restore of 2,000 databases into a few directories made 2,000 directory fsyncs,
//! which the file system's journal serialises). A crash before then may lose names, never
//! leave part of a database; a rerun restores what is missing and syncs again the
//! directories of what it finds restored.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::discover::pattern::Fields;
use crate::replica::{FileInfo, ReplicaClient};
use crate::replicate::catalogue::{Catalogue, CatalogueError, Found, Listing, Unreadable};
use crate::replicate::restore::{self, DirSync, Target};

/// Mode of directories a fleet restore creates: owner only, as the files it restores; a
/// replica does not say who may read a database.
const DIR_MODE: u32 = 0o700;

/// How to restore a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub target: Target,
    /// Restore under this directory, at each database's path relative to the pattern's
    /// root; `None` restores in place the databases missing on this host.
    pub to: Option<PathBuf>,
    /// Restores at once.
    pub jobs: usize,
}

/// What became of one replica.
#[derive(Debug)]
pub enum Outcome {
    /// Restored to this TXID.
    Restored { txid: u64 },
    /// Found restored by an earlier run, at this TXID, and verified.
    AlreadyRestored { txid: u64 },
    /// In place: the database (or its `-wal`) exists on this host, so it was left alone.
    Present,
    /// Not restored, and why.
    Failed(String),
}

/// One replica's outcome: `path` is the database path, or the location when it names none.
#[derive(Debug)]
pub struct EntryResult {
    pub path: String,
    /// Where it was restored to (or would have been).
    pub output: Option<PathBuf>,
    pub outcome: Outcome,
}

/// Restores every replica under `catalogue`'s root, calling `report` with each outcome as it
/// comes (on the calling thread). Fails only when the root cannot be walked at all; every
/// replica's failure is an [`Outcome::Failed`].
pub fn restore_all(
    catalogue: &Catalogue,
    pattern_root: &str,
    options: &FleetOptions,
    report: &mut dyn FnMut(EntryResult),
) -> Result<(), CatalogueError> {
    let to_sync = Mutex::new(BTreeSet::new());
    let walked = catalogue.walk_parallel(
        options.jobs,
        &|found| restore_one(catalogue, pattern_root, options, found, &to_sync),
        &|Unreadable { location, error }| EntryResult {
            path: location,
            output: None,
            outcome: Outcome::Failed(format!(
                "cannot be read ({error}); the replicas below it are unknown"
            )),
        },
        report,
    );
    let dirs = to_sync.into_inner().unwrap_or_else(|e| e.into_inner());
    for (dir, e) in sync_directories(dirs, options.jobs) {
        report(EntryResult {
            path: dir.display().to_string(),
            output: None,
            outcome: Outcome::Failed(format!(
                "syncing this directory failed ({e}): what was restored below it may not \
                 survive a crash; run restore --all again, which checks and syncs it"
            )),
        });
    }
    walked
}

/// Where the database at `path` is restored to.
fn output_for(path: &str, pattern_root: &str, to: Option<&Path>) -> PathBuf {
    let Some(to) = to else {
        return PathBuf::from(path);
    };
    let relative = path
        .strip_prefix(pattern_root)
        .unwrap_or(path)
        .trim_start_matches('/');
    to.join(relative)
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn restore_one(
    catalogue: &Catalogue,
    pattern_root: &str,
    options: &FleetOptions,
    found: Found,
    to_sync: &Mutex<BTreeSet<PathBuf>>,
) -> EntryResult {
    let (path, fields) = match found.database {
        Ok(database) => database,
        Err(why) => {
            return EntryResult {
                path: found.location,
                output: None,
                outcome: Outcome::Failed(format!("names no database: {why}")),
            }
        }
    };
    let output = output_for(&path, pattern_root, options.to.as_deref());
    let root = options.to.as_deref().unwrap_or(Path::new(pattern_root));
    let outcome = match restore_database(
        catalogue,
        options,
        &path,
        &fields,
        found.listing,
        Place {
            root,
            output: &output,
        },
        to_sync,
    ) {
        Ok(outcome) => outcome,
        Err(why) => Outcome::Failed(why),
    };
    EntryResult {
        path,
        output: Some(output),
        outcome,
    }
}

/// Where one database is restored to.
struct Place<'a> {
    /// No symbolic link below it is followed: the pattern's root, or `--to`.
    root: &'a Path,
    output: &'a Path,
}

fn restore_database(
    catalogue: &Catalogue,
    options: &FleetOptions,
    path: &str,
    fields: &Fields,
    listing: Option<Listing>,
    Place { root, output }: Place<'_>,
    to_sync: &Mutex<BTreeSet<PathBuf>>,
) -> Result<Outcome, String> {
    let exists = |p: &Path| p.symlink_metadata().is_ok();
    if options.to.is_none() && (exists(output) || exists(&sidecar(output, "-wal"))) {
        return Ok(Outcome::Present);
    }
    check_no_links(root, output)?;
    let client = catalogue.client(fields)?;
    let has_identity = listing.as_ref().is_none_or(|l| l.has_identity);
    crate::replicate::catalogue::check_identity(client.as_ref(), path, fields, has_identity)
        .map_err(|why| format!("{why}; not restored"))?;
    let files = match listing {
        Some(listing) => listing.files,
        None => restore::list_all(client.as_ref()).map_err(|e| format!("{e:#}"))?,
    };
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Recorded before anything is made, whatever becomes of this restore: a directory made
    // here is another restore's too. A file found restored by an earlier run has its
    // directories synced again, in case that run was killed before it synced them.
    to_sync
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(directories_to_sync(parent, root));
    if exists(output) {
        return verify_existing(client.as_ref(), &files, options.target, output);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(parent)
        .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let restored = restore::restore_listed(
        client.as_ref(),
        &files,
        options.target,
        output,
        crate::replica::PRIVATE_MODE,
        false,
        DirSync::Caller,
    )
    .map_err(|e| crate_error_chain(&e))?;
    Ok(Outcome::Restored {
        txid: restored.txid,
    })
}

/// The directories whose entries a restore into `parent` may change, each synced once at
/// the end: `parent` and every directory up to `root` (any of them may be created, which
/// writes its name into the one above), and above `root` those missing now plus the first
/// that exists.
fn directories_to_sync(parent: &Path, root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut at = parent;
    loop {
        dirs.push(at.to_path_buf());
        let below_root = at != root && at.starts_with(root);
        if at == Path::new(".") || (!below_root && at.symlink_metadata().is_ok()) {
            break;
        }
        match at.parent() {
            Some(up) if up.as_os_str().is_empty() => at = Path::new("."),
            Some(up) => at = up,
            None => break,
        }
    }
    dirs
}

/// Syncs each of `dirs` once, on `jobs` threads (a journaling file system commits
/// concurrent syncs together); returns those that failed, with why.
fn sync_directories(dirs: BTreeSet<PathBuf>, jobs: usize) -> Vec<(PathBuf, std::io::Error)> {
    let dirs: Vec<PathBuf> = dirs.into_iter().collect();
    let per_job = dirs.len().div_ceil(jobs.max(1)).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = dirs
            .chunks(per_job)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .filter_map(|dir| {
                            File::open(dir)
                                .and_then(|d| d.sync_all())
                                .err()
                                // Never made (its restore failed first): nothing to sync.
                                .filter(|e| e.kind() != std::io::ErrorKind::NotFound)
                                .map(|e| (dir.clone(), e))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    })
}

/// Fails when a path component of `output` below `root` (the output file included) is a
/// symbolic link, or one above the file is not a directory. Discovery never follows links
/// below the pattern's root, so a restore does not write or read through one either: a
/// tenant's directory linked elsewhere would put a database outside the root. Components that
/// do not exist yet are created by the restore (a link made meanwhile is not guarded against).
fn check_no_links(root: &Path, output: &Path) -> Result<(), String> {
    let below = output.strip_prefix(root).map_err(|_| {
        format!(
            "{} is not below {}; not restored",
            output.display(),
            root.display()
        )
    })?;
    let mut at = root.to_path_buf();
    let mut components = below.components().peekable();
    while let Some(component) = components.next() {
        at.push(component);
        let meta = match at.symlink_metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("{}: {e}; not restored", at.display())),
        };
        if meta.file_type().is_symlink() {
            return Err(format!(
                "{} is a symbolic link; restore does not follow links below {}; nothing written there",
                at.display(),
                root.display()
            ));
        }
        if components.peek().is_some() && !meta.is_dir() {
            return Err(format!("{} is not a directory; not restored", at.display()));
        }
    }
    Ok(())
}

/// An error and its causes on one line, each cause once.
fn crate_error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Whether the file already at `output` holds the replica's state at `target`.
fn verify_existing(
    replica: &dyn ReplicaClient,
    files: &[FileInfo],
    target: Target,
    output: &Path,
) -> Result<Outcome, String> {
    let left = "left as it is";
    let chain = restore::plan(files, target).map_err(|e| format!("{e:#}"))?;
    let last = chain.last().ok_or("the replica holds no LTX files")?;
    let (header, trailer) = restore::head_and_tail(replica, last)?;
    if !header.tracks_checksums() {
        return Err(format!(
            "exists, and the replica's files carry no checksums to compare it with; {left}"
        ));
    }
    if sidecar(output, "-wal").symlink_metadata().is_ok() {
        return Err(format!("exists with a -wal beside it (in use?); {left}"));
    }
    let file = File::open(output).map_err(|e| format!("exists but cannot be read: {e}"))?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let expected_len = u64::from(header.commit) * u64::from(header.page_size);
    let checksum = if len == expected_len {
        crate::ltx::checksum_database(std::io::BufReader::new(file), header.page_size).ok()
    } else {
        None
    };
    if checksum != Some(trailer.post_apply_checksum) {
        return Err(format!(
            "exists and differs from the replica at TXID {}; {left}",
            last.max_txid
        ));
    }
    Ok(Outcome::AlreadyRestored {
        txid: last.max_txid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directories_to_sync_reach_the_root_and_the_first_that_exists_above_it() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        // `--to` not made yet: everything below it, itself, and the first that exists.
        let root = base.join("to");
        let parent = root.join("p1/userdb/main/tenants");
        assert_eq!(
            directories_to_sync(&parent, &root),
            [
                parent.clone(),
                root.join("p1/userdb/main"),
                root.join("p1/userdb"),
                root.join("p1"),
                root.clone(),
                base.to_path_buf(),
            ]
        );
        // All there: the same up to the root, which ends it.
        std::fs::create_dir_all(&parent).unwrap();
        assert_eq!(directories_to_sync(&parent, &root).last(), Some(&root));
        assert_eq!(directories_to_sync(&parent, &root).len(), 5);
        // A relative path ends at ".".
        assert_eq!(
            directories_to_sync(Path::new("a/b"), Path::new("")),
            [PathBuf::from("a/b"), PathBuf::from("a"), PathBuf::from(".")]
        );
        // Syncing: a directory never made is not a failure.
        let dirs: BTreeSet<PathBuf> = [parent.clone(), base.join("never-made")].into();
        assert!(sync_directories(dirs, 3).is_empty());
    }
}
