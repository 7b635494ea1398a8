//! A command's work directory, `.multidb-<kind>-<pid>-<n>-<random>`: a restore's beside its output
//! (downloads and the database being built live there until the finished file is linked into
//! place), `multidb replicate`'s in the temporary directory (LTX files before they are
//! shipped). It is removed when the work ends. A process killed meanwhile leaves it behind,
//! so each one holds an `flock` on a lock file beside it, `<the directory's name>.lock`,
//! for as long as it lives (the kernel drops it when the process dies, in any pid namespace,
//! and NFS carries it across hosts): the next command of the same kind there removes those
//! whose lock it can take. The lock is held before the directory exists and released after
//! it is gone, so a directory is never seen without its lock, however early its maker dies.
//!
//! A sweep never touches this process's own live work directories (kept in a set while they
//! live): on NFS `flock` is a POSIX lock, which does not keep two descriptors of one process
//! apart, and closing any descriptor of the file drops the process's lock on it. One a dead
//! process with the same pid left (a container runs its commands with the same pids) is
//! swept like any other. The random part keeps names apart across pid namespaces.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;

/// The lock file's suffix, and the name it is made under before it is held.
const LOCK: &str = ".lock";
const LOCK_NEW: &str = ".lock-new";

/// A directory without its lock is removed once this old (not made by this code, or its
/// lock was removed by hand).
const UNLOCKED_STALE: Duration = Duration::from_secs(60);

/// The number of the next work directory this process makes.
static WORK_DIRS: AtomicU64 = AtomicU64::new(0);

/// The paths of this process's work directories from before their lock is made until after
/// they are removed: a sweep in this process leaves them alone.
static OURS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn ours() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    OURS.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_ours(path: &Path) -> bool {
    ours().contains(path)
}

/// A work directory of this process, removed when dropped.
pub struct WorkDir {
    path: PathBuf,
    lock_path: PathBuf,
    /// Holds the `flock` that says this directory is in use.
    _lock: File,
}

impl WorkDir {
    /// Creates a work directory for `kind` of work in `parent`, first removing any a dead
    /// process left there (once per directory and process).
    pub fn create(parent: &Path, kind: &str) -> anyhow::Result<WorkDir> {
        let prefix = format!(".multidb-{kind}-");
        sweep_once(parent, &prefix);
        // Numbered as well as named by the process: restores running side by side in one
        // process each need a work directory of their own. A name already taken, or a lock
        // a sweeper took before it was held (see `sweep`), moves on to the next number.
        let mut tries = 0;
        loop {
            let n = WORK_DIRS.fetch_add(1, Ordering::Relaxed);
            // A short name of its own, not the output's name plus a suffix: an output name
            // near NAME_MAX (255 bytes) must still leave room for the temporary one.
            let path = parent.join(format!(
                "{prefix}{}-{n}-{:08x}",
                std::process::id(),
                crate::time::random_u64() as u32
            ));
            match Self::create_at(path) {
                Err(e)
                    if tries < 100
                        && matches!(
                            e.kind(),
                            io::ErrorKind::AlreadyExists
                                | io::ErrorKind::NotFound
                                | io::ErrorKind::WouldBlock
                        ) =>
                {
                    tries += 1
                }
                made => {
                    return made.with_context(|| {
                        format!("creating a work directory in {}", parent.display())
                    })
                }
            }
        }
    }

    fn create_at(path: PathBuf) -> io::Result<WorkDir> {
        ours().insert(path.clone());
        let made = Self::make(path.clone());
        if made.is_err() {
            ours().remove(&path);
        }
        made
    }

    fn make(path: PathBuf) -> io::Result<WorkDir> {
        let lock_path = with_suffix(&path, LOCK);
        // Locked under another name, then renamed: a sweeper that finds the lock always
        // finds it held (a lock file it could take between our create and our `flock`
        // would cost a live restore its directory).
        let fresh = with_suffix(&path, LOCK_NEW);
        let file = crate::replica::create_new(&fresh, 0o600)?;
        let lock = flock(&file, libc::LOCK_EX | libc::LOCK_NB)
            .and_then(|()| rename_new(&fresh, &lock_path))
            .map(|()| file);
        let lock = match lock {
            Ok(lock) => lock,
            Err(e) => {
                let _ = fs::remove_file(&fresh);
                return Err(e);
            }
        };
        if let Err(e) = fs::DirBuilder::new().mode(0o700).create(&path) {
            let _ = fs::remove_file(&lock_path);
            return Err(e);
        }
        Ok(WorkDir {
            path,
            lock_path,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // The directory first, while the lock still says it is in use; a directory that
        // could not be removed keeps its lock file, which the next sweep takes once this
        // process has gone.
        if fs::remove_dir_all(&self.path).is_ok() {
            let _ = fs::remove_file(&self.lock_path);
        }
        ours().remove(&self.path);
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Renames `from` to `to` unless `to` exists (`AlreadyExists` then): a lock already at that
/// name (a dead namesake's, which a sweeper may hold) must not be replaced.
fn rename_new(from: &Path, to: &Path) -> io::Result<()> {
    fs::hard_link(from, to)?;
    fs::remove_file(from)
}

fn flock(file: &File, how: libc::c_int) -> io::Result<()> {
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// [`sweep`] on `parent` unless this process has swept it already: `restore --all` restores
/// many databases into one directory, and one look per directory is enough.
fn sweep_once(parent: &Path, prefix: &str) {
    static SWEPT: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
    let first = SWEPT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(parent.join(prefix));
    if first {
        sweep(parent, prefix);
    }
}

/// The lock file at `path`, locked, when no process holds it and `path` still names the
/// file that was locked: a lock opened just before its owner removed it, and taken just
/// after, is another file than one made at that name since.
fn take_if_unheld(path: &Path) -> Option<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // Open for writing: NFS takes an exclusive `flock` as a POSIX write lock, which needs it.
    let lock = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    flock(&lock, libc::LOCK_EX | libc::LOCK_NB).ok()?;
    let (held, named) = (lock.metadata().ok()?, fs::metadata(path).ok()?);
    (held.dev() == named.dev() && held.ino() == named.ino()).then_some(lock)
}

fn older_than(path: &Path, age: Duration) -> bool {
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|elapsed| elapsed >= age)
}

/// Removes the work directories named `prefix…` in `parent` that no live process holds
/// (their lock can be taken), with their locks; returns how many directories. This
/// process's own live ones are left alone (see the module's doc).
fn sweep(parent: &Path, prefix: &str) -> usize {
    let Ok(entries) = fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with(prefix)) else {
            continue;
        };
        let path = entry.path();
        // The work directory the entry is, or whose lock (made or being made) it is.
        let (dir, suffix) = [LOCK_NEW, LOCK]
            .into_iter()
            .find_map(|suffix| Some((parent.join(name.strip_suffix(suffix)?), Some(suffix))))
            .unwrap_or_else(|| (path.clone(), None));
        if is_ours(&dir) {
            continue;
        }
        if suffix == Some(LOCK) {
            // Taken: its holder is gone. Kept until both are removed, so no other sweeper
            // takes it meanwhile.
            let Some(_lock) = take_if_unheld(&path) else {
                continue;
            };
            let gone = match fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(dir = %dir.display(), "removed a work directory left by a process that died");
                    removed += 1;
                    true
                }
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
            if gone {
                let _ = fs::remove_file(&path);
            }
        } else if suffix == Some(LOCK_NEW) {
            // Not held: its maker died before holding it, or is about to hold it and, when it
            // finds it gone or taken, tries the next name (`WorkDir::create`).
            if take_if_unheld(&path).is_some() {
                let _ = fs::remove_file(&path);
            }
        } else if entry.file_type().is_ok_and(|t| t.is_dir())
            && !with_suffix(&path, LOCK).exists()
            && older_than(&path, UNLOCKED_STALE)
            && fs::remove_dir_all(&path).is_ok()
        {
            tracing::info!(dir = %path.display(), "removed a work directory without a lock");
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = ".multidb-test-";

    #[test]
    fn a_dead_process_s_work_directory_is_removed_and_a_live_one_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let live = WorkDir::create(tmp.path(), "test").unwrap();
        assert!(live
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(PREFIX));
        assert!(with_suffix(live.path(), LOCK).exists());
        std::fs::write(live.path().join("restored.db"), b"x").unwrap();
        // Left by a process that died: its lock file is there, nobody holds it.
        let dead = tmp.path().join(format!("{PREFIX}999999-0"));
        fs::create_dir(&dead).unwrap();
        fs::write(with_suffix(&dead, LOCK), b"").unwrap();
        fs::write(dead.join("restored.db"), b"half").unwrap();
        // Died after removing its directory, before removing its lock.
        let lock_alone = with_suffix(&tmp.path().join(format!("{PREFIX}999997-0")), LOCK);
        fs::write(&lock_alone, b"").unwrap();
        // Died between creating its lock and holding it.
        let never_held = with_suffix(&tmp.path().join(format!("{PREFIX}999996-0")), LOCK_NEW);
        fs::write(&never_held, b"").unwrap();
        // A directory without a lock (not made by this code): kept for a while.
        let young = tmp.path().join(format!("{PREFIX}999998-0"));
        fs::create_dir(&young).unwrap();
        // Someone else's file with the prefix: not a directory, kept; another kind's dead
        // directory: left to that kind.
        fs::write(tmp.path().join(format!("{PREFIX}file")), b"").unwrap();
        let other = tmp.path().join(".multidb-other-999999-0");
        fs::create_dir(&other).unwrap();
        fs::write(with_suffix(&other, LOCK), b"").unwrap();
        assert_eq!(sweep(tmp.path(), PREFIX), 1);
        assert!(!dead.exists());
        assert!(!with_suffix(&dead, LOCK).exists());
        assert!(!lock_alone.exists());
        assert!(!never_held.exists());
        assert!(young.exists());
        assert!(live.path().join("restored.db").exists());
        assert!(with_suffix(live.path(), LOCK).exists());
        assert!(tmp.path().join(format!("{PREFIX}file")).exists());
        assert!(other.exists());
        let old = std::time::SystemTime::now() - UNLOCKED_STALE * 2;
        File::open(&young).unwrap().set_modified(old).unwrap();
        assert_eq!(sweep(tmp.path(), PREFIX), 1);
        assert!(!young.exists());
        let path = live.path().to_path_buf();
        drop(live);
        assert!(!path.exists());
        assert!(!with_suffix(&path, LOCK).exists());
    }

    /// This process's live work directories are never swept, even when their lock can be
    /// taken (on NFS `flock` is a POSIX lock, which a second descriptor of the same process
    /// takes, and whose close would drop the owner's lock); one a dead process with this
    /// process's pid left (pids repeat in containers) is swept.
    #[test]
    fn this_process_s_live_work_directories_are_never_swept_a_dead_namesake_s_are() {
        let tmp = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        // Live, as the set says, with a lock anyone could take (the NFS case).
        let live = tmp.path().join(format!(".multidb-pid-{pid}-7-00000000"));
        fs::create_dir(&live).unwrap();
        fs::write(with_suffix(&live, LOCK), b"").unwrap();
        ours().insert(live.clone());
        // Left by a dead process with this pid.
        let namesake = tmp.path().join(format!(".multidb-pid-{pid}-7-11111111"));
        fs::create_dir(&namesake).unwrap();
        fs::write(with_suffix(&namesake, LOCK), b"").unwrap();
        let never_held = tmp.path().join(format!(".multidb-pid-{pid}-8-00000000"));
        fs::write(with_suffix(&never_held, LOCK_NEW), b"").unwrap();
        assert_eq!(sweep(tmp.path(), ".multidb-pid-"), 1);
        assert!(live.exists() && with_suffix(&live, LOCK).exists());
        assert!(!namesake.exists() && !with_suffix(&namesake, LOCK).exists());
        assert!(!with_suffix(&never_held, LOCK_NEW).exists());
        ours().remove(&live);
        // Made and dropped: in the set only while it lives; two in a row differ.
        let (a, b) = (
            WorkDir::create(tmp.path(), "pid").unwrap(),
            WorkDir::create(tmp.path(), "pid").unwrap(),
        );
        assert_ne!(a.path(), b.path());
        assert!(is_ours(a.path()));
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!is_ours(&path));
    }

    /// Work directories made side by side while others sweep the same directory (what
    /// `restore --all` does with many databases in one directory): none is removed while
    /// its owner uses it. The first sweeper acts as another process would (a sweep skips
    /// this process's live ones), taking locks itself.
    #[test]
    fn sweeping_never_takes_a_directory_being_made() {
        let tmp = tempfile::tempdir().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            // Counts the locks it could take and the directories it saw without a lock.
            let sweeper = scope.spawn(|| {
                let (mut taken, mut unlocked) = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for entry in fs::read_dir(tmp.path()).unwrap().flatten() {
                        let path = entry.path();
                        if path.to_string_lossy().ends_with(LOCK) {
                            if let Ok(lock) = File::open(&path) {
                                if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
                                    taken += 1;
                                }
                            }
                        } else if path.is_dir() && !with_suffix(&path, LOCK).exists() {
                            unlocked += 1;
                        }
                    }
                }
                (taken, unlocked)
            });
            // The real sweep beside it must remove nothing of this process's (its set says
            // which are live).
            let real = scope.spawn(|| {
                let mut removed = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    removed += sweep(tmp.path(), PREFIX);
                }
                removed
            });
            // Kept until the sweeper stops: a directory removed by its owner releases its
            // lock, which is not the race under test.
            let made: Vec<WorkDir> = (0..2000)
                .map(|_| WorkDir::create(tmp.path(), "test").unwrap())
                .collect();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(
                sweeper.join().unwrap(),
                (0, 0),
                "a live work directory's lock was taken, or one was seen without its lock"
            );
            assert_eq!(real.join().unwrap(), 0, "the sweep removed a live one");
            assert!(made
                .iter()
                .all(|d| d.path().is_dir() && with_suffix(d.path(), LOCK).exists()));
        });
    }
}
