//! Pattern-directed discovery: find every database the pattern matches without walking the
//! whole tree under its root.
//!
//! The walk goes segment by segment. A literal segment (`databases`) costs nothing: the
//! directory is simply assumed and the next read finds out whether it exists. A wildcard
//! segment reads one directory and keeps the entries that match, using the entry type that
//! `readdir` returns (no `stat` per file). Only the last level stats anything: the directory
//! (for its device number) and each `-wal` that sits beside a database, because in WAL mode a
//! commit changes only the `-wal`. Directories of a level are shared between threads.

use std::io;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::discover::arena::{mtime_ns, Arena, Diff, FoundFile, WalStamp};
use crate::discover::pattern::{Pattern, Segment};

/// Suffixes of the files SQLite keeps beside a database; they are never databases themselves.
const SIDECARS: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Directories handed to a thread at a time: small enough to balance uneven trees, large
/// enough that the shared counter is not contended.
const CHUNK: usize = 4;

/// Below this many directories in a level, threads cost more than they save.
const PARALLEL_MIN_DIRS: usize = 8;

/// Why discovery could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("pattern root `{root}` cannot be read: {error}")]
    Root { root: String, error: io::Error },
}

/// What one scan found and changed.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub diff: Diff,
    /// Directories that exist but could not be read, with the reason; the databases below
    /// them keep their previous state.
    pub unreadable: Vec<(String, String)>,
    /// Paths that looked like databases but were skipped, with the reason.
    pub skipped: Vec<(String, String)>,
    pub dirs_read: usize,
    pub elapsed: Duration,
}

/// One directory of the last level and the databases in it.
struct LeafDir {
    path: String,
    dev: u64,
    mtime_ns: u64,
    files: Vec<FoundFile>,
}

#[derive(Default)]
struct WorkerOut {
    next: Vec<String>,
    unreadable: Vec<(String, String)>,
    skipped: Vec<(String, String)>,
    dirs_read: usize,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        return name.to_string();
    }
    let mut path = String::with_capacity(dir.len() + 1 + name.len());
    path.push_str(dir);
    if !dir.ends_with('/') {
        path.push('/');
    }
    path.push_str(name);
    path
}

fn dir_to_open(dir: &str) -> &str {
    if dir.is_empty() {
        "."
    } else {
        dir
    }
}

/// Scans the tree and applies the result to `arena`.
pub fn scan(pattern: &Pattern, arena: &mut Arena) -> Result<ScanReport, DiscoveryError> {
    let started = Instant::now();
    let root = pattern.root().to_string();
    match std::fs::metadata(dir_to_open(&root)) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            let source = io::Error::new(io::ErrorKind::NotADirectory, "not a directory");
            return Err(DiscoveryError::Root {
                root,
                error: source,
            });
        }
        Err(source) => {
            return Err(DiscoveryError::Root {
                root,
                error: source,
            })
        }
    }
    let mut report = ScanReport::default();
    let segments = pattern.segments();
    let (last, inner) = segments
        .split_last()
        .expect("a pattern has at least one segment");
    let mut dirs = vec![root.clone()];
    // Literal components appended since the last directory listing: the listing proved the
    // entries it kept are directories and not symlinks, but these are only assumed.
    let mut literals = 0;
    for segment in inner {
        if let Some(literal) = segment.literal() {
            for dir in &mut dirs {
                *dir = join(dir, literal);
            }
            literals += 1;
            continue;
        }
        let outs = for_each_dir(&dirs, |dir, out: &mut WorkerOut| {
            if no_symlink_in_tail(dir, literals, out) {
                list_subdirs(dir, segment, out)
            }
        });
        literals = 0;
        dirs = Vec::new();
        for mut out in outs {
            dirs.append(&mut out.next);
            merge(&mut report, out);
        }
    }
    dirs.sort_unstable();

    arena.begin_scan();
    let (tx, rx) = mpsc::sync_channel::<LeafDir>(64);
    let root_len = if root.is_empty() { 0 } else { root.len() + 1 };
    let dirs = &dirs;
    let outs = std::thread::scope(|scope| {
        // The walker owns the sender, so the channel closes when the walk ends.
        let walker = scope.spawn(move || {
            for_each_dir(dirs, |dir, out: &mut WorkerOut| {
                if !no_symlink_in_tail(dir, literals, out) {
                    return;
                }
                if let Some(leaf) = list_databases(dir, last, out) {
                    // The receiver lives until the walk ends; a send cannot fail before that.
                    let _ = tx.send(leaf);
                }
            })
        });
        for leaf in rx.iter() {
            let below_root = leaf.path.get(root_len..).unwrap_or("");
            let components: Vec<&str> = if below_root.is_empty() {
                Vec::new()
            } else {
                below_root.split('/').collect()
            };
            let refused = arena.visit_dir(&components, leaf.dev, &leaf.files, &mut report.diff);
            arena.check_leaf_dir(&components, leaf.mtime_ns, &leaf.files, &mut report.diff);
            if refused > 0 {
                report.skipped.push((
                    leaf.path.clone(),
                    format!("{refused} database(s) over the arena's limits"),
                ));
            }
        }
        walker.join().expect("discovery walker panicked")
    });
    for out in outs {
        merge(&mut report, out);
    }
    let unreadable: Vec<String> = report.unreadable.iter().map(|(p, _)| p.clone()).collect();
    arena.end_scan(&unreadable, &mut report.diff);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Where a pattern that matches nothing stops matching: the first segment for which none of
/// the directories reached so far has an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoMatch {
    /// 1-based, as `multidb parse` counts segments.
    pub segment: usize,
    pub text: String,
    /// Whether the segment names files (the last one) rather than directories.
    pub files: bool,
    /// The directories searched for it, sorted: never empty.
    pub searched: Vec<String>,
}

impl std::fmt::Display for NoMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.files { "file" } else { "directory" };
        write!(f, "no {what} in `{}`", dir_to_open(&self.searched[0]))?;
        match self.searched.len() {
            1 => {}
            2 => write!(f, " or 1 other directory")?,
            n => write!(f, " or {} other directories", n - 1)?,
        }
        write!(f, " matches segment {} `{}`", self.segment, self.text)
    }
}

/// Why `pattern` matches nothing, when it does: walks the tree as [`scan`] does, one segment at
/// a time, and stops at the first segment that leaves no candidate. `None` when something
/// matches or the root cannot be read (which [`scan`] reports). Meant for after a scan that
/// found nothing, so it costs at most one more walk of the part of the tree that matched.
pub fn first_unmatched(pattern: &Pattern) -> Option<NoMatch> {
    let segments = pattern.segments();
    let mut dirs = vec![pattern.root().to_string()];
    for (i, segment) in segments.iter().enumerate() {
        let files = i + 1 == segments.len();
        let wanted = |kind: std::fs::FileType| {
            if files {
                kind.is_file()
            } else {
                kind.is_dir()
            }
        };
        let mut next = Vec::new();
        for dir in &dirs {
            if let Some(literal) = segment.literal() {
                let path = join(dir, literal);
                if std::fs::symlink_metadata(&path).is_ok_and(|m| wanted(m.file_type())) {
                    next.push(path);
                }
                continue;
            }
            let Ok(entries) = std::fs::read_dir(dir_to_open(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if segment.matches(name) && entry.file_type().is_ok_and(wanted) {
                    next.push(join(dir, name));
                }
            }
        }
        if next.is_empty() {
            dirs.sort_unstable();
            return Some(NoMatch {
                segment: i + 1,
                text: pattern.segment_text(i).to_string(),
                files,
                searched: dirs,
            });
        }
        dirs = next;
    }
    None
}

fn merge(report: &mut ScanReport, out: WorkerOut) {
    report.unreadable.extend(out.unreadable);
    report.skipped.extend(out.skipped);
    report.dirs_read += out.dirs_read;
}

/// Runs `work` over `dirs` on every core, each thread with its own output.
fn for_each_dir<F>(dirs: &[String], work: F) -> Vec<WorkerOut>
where
    F: Fn(&str, &mut WorkerOut) + Sync,
{
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if dirs.len() < PARALLEL_MIN_DIRS {
        1
    } else {
        threads
    };
    let next = AtomicUsize::new(0);
    let run = || {
        let mut out = WorkerOut::default();
        loop {
            let start = next.fetch_add(CHUNK, Ordering::Relaxed);
            if start >= dirs.len() {
                break;
            }
            for dir in &dirs[start..(start + CHUNK).min(dirs.len())] {
                work(dir, &mut out);
            }
        }
        out
    };
    if threads == 1 {
        return vec![run()];
    }
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(run)).collect();
        let mut outs = vec![run()];
        outs.extend(
            helpers
                .into_iter()
                .map(|h| h.join().expect("discovery thread panicked")),
        );
        outs
    })
}

/// Whether the last `literals` components of `dir` are real directories, not symlinks: the
/// agent runs as root over directories that users own, and a user who links a branch to a
/// directory they cannot read must not get its databases replicated to where they can
/// (issue 10, case 4). A symlink is reported as skipped; a missing component is normal.
/// (Checked with `lstat` before the directory is opened: a user who swaps a directory for a
/// link between the two races the scan, which the next scan undoes.)
fn no_symlink_in_tail(dir: &str, literals: usize, out: &mut WorkerOut) -> bool {
    let mut path = dir;
    for _ in 0..literals {
        match std::fs::symlink_metadata(dir_to_open(path)) {
            Ok(meta) if meta.file_type().is_symlink() => {
                out.skipped
                    .push((path.to_string(), SYMLINK_NOT_FOLLOWED.to_string()));
                return false;
            }
            Ok(_) => {}
            Err(_) => return false,
        }
        match path.rfind('/') {
            Some(i) => path = &path[..i],
            None => break,
        }
    }
    true
}

/// Why a symlinked directory or database is skipped.
const SYMLINK_NOT_FOLLOWED: &str = "a symlink: discovery does not follow symlinks";

/// Reads `dir`; a missing directory is normal (a literal segment that is not there), any
/// other failure is reported.
fn read_dir(dir: &str, out: &mut WorkerOut) -> Option<std::fs::ReadDir> {
    match std::fs::read_dir(dir_to_open(dir)) {
        Ok(entries) => {
            out.dirs_read += 1;
            Some(entries)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            None
        }
        Err(e) => {
            out.unreadable.push((dir.to_string(), e.to_string()));
            None
        }
    }
}

fn list_subdirs(dir: &str, segment: &Segment, out: &mut WorkerOut) {
    let Some(entries) = read_dir(dir, out) else {
        return;
    };
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !segment.matches(name) {
            continue;
        }
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = join(dir, name);
        if kind.is_dir() {
            out.next.push(path);
        } else if kind.is_symlink() {
            out.skipped.push((path, SYMLINK_NOT_FOLLOWED.to_string()));
        }
    }
}

/// Lists the databases in one directory of the last level.
fn list_databases(dir: &str, segment: &Segment, out: &mut WorkerOut) -> Option<LeafDir> {
    if let Some(literal) = segment.literal() {
        // One known name: stat it rather than read a directory that may be large.
        let path = join(dir, literal);
        let meta = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file())?;
        let dev = meta.dev();
        let mtime_ns = std::fs::metadata(dir_to_open(dir)).map_or(0, |m| mtime_ns(&m));
        let wal = WalStamp::of_wal(&path);
        let files = vec![FoundFile {
            name: literal.to_string(),
            ino: meta.ino(),
            wal,
        }];
        return Some(LeafDir {
            path: dir.to_string(),
            dev,
            mtime_ns,
            files,
        });
    }
    let entries = read_dir(dir, out)?;
    let mut files = Vec::new();
    let mut wals: Vec<String> = Vec::new();
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            if segment.matches(&name.to_string_lossy()) {
                out.skipped.push((
                    join(dir, &name.to_string_lossy()),
                    "name is not UTF-8".into(),
                ));
            }
            continue;
        };
        if let Some(sidecar) = SIDECARS.iter().find(|s| name.ends_with(*s)) {
            if *sidecar == "-wal" {
                wals.push(name[..name.len() - 4].to_string());
            }
            continue;
        }
        if !segment.matches(name) {
            continue;
        }
        match entry.file_type() {
            Ok(kind) if kind.is_file() => {
                files.push(FoundFile {
                    name: name.to_string(),
                    ino: entry.ino(),
                    wal: WalStamp::NONE,
                });
            }
            Ok(kind) if kind.is_symlink() => {
                out.skipped
                    .push((join(dir, name), SYMLINK_NOT_FOLLOWED.to_string()));
            }
            _ => {}
        }
    }
    if files.is_empty() {
        return None;
    }
    if !wals.is_empty() {
        wals.sort_unstable();
        for file in &mut files {
            if wals.binary_search(&file.name).is_ok() {
                file.wal = WalStamp::of_wal(&join(dir, &file.name));
            }
        }
    }
    let (dev, mtime_ns) = std::fs::metadata(dir_to_open(dir))
        .map(|m| (m.dev(), mtime_ns(&m)))
        .unwrap_or((0, 0));
    Some(LeafDir {
        path: dir.to_string(),
        dev,
        mtime_ns,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn touch(path: &std::path::Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"").unwrap();
    }

    /// A connection-per-write app without the extension leaves no `-wal` behind (SQLite
    /// deletes it when the last connection closes); the scan still sees the write.
    #[test]
    fn a_write_that_left_no_wal_is_seen_through_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_str().unwrap();
        let dir = tmp.path().join("t");
        touch(&dir.join("a.db"));
        touch(&dir.join("b.db"));
        let pattern = Pattern::new(&format!("{root}/*/*.db")).unwrap();
        let mut arena = Arena::new(pattern.root());
        scan(&pattern, &mut arena).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(scan(&pattern, &mut arena).unwrap().diff.changed.is_empty());
        // What the close of such a connection does: a -wal comes and goes, the file changes.
        fs::write(dir.join("a.db-wal"), b"x").unwrap();
        fs::write(dir.join("a.db"), b"written").unwrap();
        fs::remove_file(dir.join("a.db-wal")).unwrap();
        let changed = scan(&pattern, &mut arena).unwrap().diff.changed;
        let a = arena.lookup_path(&format!("{root}/t/a.db")).unwrap();
        assert_eq!(changed, vec![a]);
        assert!(scan(&pattern, &mut arena).unwrap().diff.changed.is_empty());
    }

    #[test]
    fn walk_finds_matches_skips_sidecars_and_reports_diff() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_str().unwrap();
        for rel in [
            "p1/databases/u/branches/main/tenants/acme.db",
            "p1/databases/u/branches/main/tenants/globex.db",
        ] {
            touch(&tmp.path().join(rel));
        }
        touch(
            &tmp.path()
                .join("p1/databases/u/branches/main/tenants/acme.db-wal"),
        );
        touch(
            &tmp.path()
                .join("p1/databases/u/branches/main/tenants/acme.db-shm"),
        );
        touch(
            &tmp.path()
                .join("p1/databases/u/branches/main/tenants/notes.txt"),
        );
        touch(&tmp.path().join("p1/other/u/branches/main/tenants/x.db"));
        fs::create_dir_all(
            tmp.path()
                .join("p1/databases/u/branches/main/tenants/dir.db"),
        )
        .unwrap();
        let pattern =
            Pattern::new(&format!("{root}/*/databases/*/branches/*/tenants/*.db")).unwrap();
        let mut arena = Arena::new(pattern.root());
        let report = scan(&pattern, &mut arena).unwrap();
        assert_eq!(report.diff.added.len(), 2);
        assert!(report.unreadable.is_empty());
        let acme = arena
            .lookup_path(&format!(
                "{root}/p1/databases/u/branches/main/tenants/acme.db"
            ))
            .unwrap();
        assert!(arena.has_wal(acme));

        fs::write(
            tmp.path()
                .join("p1/databases/u/branches/main/tenants/acme.db-wal"),
            b"frames",
        )
        .unwrap();
        fs::remove_file(
            tmp.path()
                .join("p1/databases/u/branches/main/tenants/globex.db"),
        )
        .unwrap();
        touch(
            &tmp.path()
                .join("p2/databases/u/branches/dev/tenants/initech.db"),
        );
        let report = scan(&pattern, &mut arena).unwrap();
        assert_eq!(report.diff.changed, vec![acme]);
        assert_eq!(
            report.diff.removed,
            vec![format!(
                "{root}/p1/databases/u/branches/main/tenants/globex.db"
            )]
        );
        assert_eq!(report.diff.added.len(), 1);
        let stamp = WalStamp::of_wal(&arena.path(acme));
        assert_eq!(stamp.size(), Some(6));
        assert!(arena.same_wal(acme, stamp));
    }

    #[test]
    fn missing_root_is_an_error() {
        let pattern = Pattern::new("/nonexistent-multidb-root/*.db").unwrap();
        let e = scan(&pattern, &mut Arena::new(pattern.root())).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("pattern root `/nonexistent-multidb-root` cannot be read"),
            "{e}"
        );
    }

    /// Issue 10, case 4: a user who owns a branch directory links it (or a literal
    /// directory below it, or a database file) to a directory they cannot read.
    #[test]
    fn regression_10_symlinks_are_not_followed() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        let elsewhere = tmp.path().join("secret");
        touch(&elsewhere.join("tenants/hidden.db"));
        touch(&elsewhere.join("hidden2.db"));
        touch(&root.join("p1/databases/u/branches/main/tenants/acme.db"));
        let branches = root.join("p1/databases/u/branches");
        symlink(&elsewhere, branches.join("linked")).unwrap();
        fs::create_dir_all(branches.join("lit")).unwrap();
        symlink(elsewhere.join("tenants"), branches.join("lit/tenants")).unwrap();
        symlink(
            elsewhere.join("hidden2.db"),
            branches.join("main/tenants/link.db"),
        )
        .unwrap();
        let pattern = Pattern::new(&format!(
            "{}/*/databases/*/branches/*/tenants/*.db",
            root.display()
        ))
        .unwrap();
        let mut arena = Arena::new(pattern.root());
        let report = scan(&pattern, &mut arena).unwrap();
        let found: Vec<String> = report.diff.added.iter().map(|&id| arena.path(id)).collect();
        assert_eq!(
            found,
            [format!(
                "{}/p1/databases/u/branches/main/tenants/acme.db",
                root.display()
            )]
        );
        let mut skipped: Vec<&str> = report.skipped.iter().map(|(p, _)| p.as_str()).collect();
        skipped.sort_unstable();
        let b = branches.display();
        assert_eq!(
            skipped,
            [
                format!("{b}/linked"),
                format!("{b}/lit/tenants"),
                format!("{b}/main/tenants/link.db")
            ]
        );
    }

    /// Issue 13: a pattern that matches nothing says at which segment the walk found nothing.
    #[test]
    fn regression_13_a_pattern_that_matches_nothing_names_the_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_str().unwrap();
        let pattern = Pattern::new(&format!("{root}/*/databases/*/tenants/*.db")).unwrap();
        assert_eq!(
            first_unmatched(&pattern).unwrap().to_string(),
            format!("no directory in `{root}` matches segment 1 `*`")
        );
        fs::create_dir_all(tmp.path().join("p1/dbs/u/tenants")).unwrap();
        fs::create_dir_all(tmp.path().join("p2")).unwrap();
        touch(&tmp.path().join("p2/databases"));
        assert_eq!(
            first_unmatched(&pattern).unwrap().to_string(),
            format!(
                "no directory in `{root}/p1` or 1 other directory matches segment 2 `databases`"
            )
        );
        fs::create_dir_all(tmp.path().join("p1/databases/u/tenants")).unwrap();
        touch(&tmp.path().join("p1/databases/u/tenants/acme.sqlite"));
        let miss = first_unmatched(&pattern).unwrap();
        assert_eq!(
            miss.to_string(),
            format!("no file in `{root}/p1/databases/u/tenants` matches segment 5 `*.db`")
        );
        assert!(scan(&pattern, &mut Arena::new(pattern.root()))
            .unwrap()
            .diff
            .added
            .is_empty());
        touch(&tmp.path().join("p1/databases/u/tenants/acme.db"));
        assert_eq!(first_unmatched(&pattern), None);
    }

    #[test]
    fn literal_last_segment_is_statted_not_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_str().unwrap();
        touch(&tmp.path().join("acme/db.sqlite"));
        touch(&tmp.path().join("globex/other.sqlite"));
        let pattern = Pattern::new(&format!("{root}/{{tenant}}/db.sqlite")).unwrap();
        let mut arena = Arena::new(pattern.root());
        let report = scan(&pattern, &mut arena).unwrap();
        assert_eq!(report.diff.added.len(), 1);
        assert_eq!(
            arena.path(report.diff.added[0]),
            format!("{root}/acme/db.sqlite")
        );
    }
}
