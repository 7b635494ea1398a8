//! A command's work directory, `.multidb-<kind>-<pid>-<n>`: a restore's beside its output
//! (downloads and the database being built live there until the finished file is linked into
//! place), `multidb replicate`'s in the temporary directory (LTX files before they are
//! shipped). It is removed when the work ends. A process killed meanwhile leaves it behind,
//! so each one holds an `flock` on a `.lock` file inside for as long as it lives (the kernel
//! drops it when the process dies, in any pid namespace, and NFS carries it across hosts):
//! the next command of the same kind there removes those whose lock it can take.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;

const LOCK: &str = ".lock";

/// A work directory without a lock file is removed once this old: its creator died between
/// `mkdir` and creating the lock (or was a version without locks).
const UNLOCKED_STALE: Duration = Duration::from_secs(60);

/// A work directory of this process, removed when dropped.
pub struct WorkDir {
    path: PathBuf,
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
        // process each need a work directory of their own.
        static WORK_DIRS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WORK_DIRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A short name of its own, not the output's name plus a suffix: an output name near
        // NAME_MAX (255 bytes) must still leave room for the temporary one.
        let path = parent.join(format!("{prefix}{}-{n}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        // Locked under another name, then renamed: a sweeper that finds `.lock` always
        // finds it held (a lock file it could take between our create and our `flock`
        // would cost a live restore its directory).
        let fresh = path.join(".lock-new");
        let lock = crate::replica::create_new(&fresh, 0o600)
            .and_then(|file| flock(&file, libc::LOCK_EX | libc::LOCK_NB).map(|()| file))
            .and_then(|file| fs::rename(&fresh, path.join(LOCK)).map(|()| file))
            .with_context(|| format!("locking {}", path.display()));
        match lock {
            Ok(lock) => Ok(WorkDir { path, _lock: lock }),
            Err(e) => {
                let _ = fs::remove_dir_all(&path);
                Err(e)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
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
    static SWEPT: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let first = SWEPT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(parent.join(prefix));
    if first {
        sweep(parent, prefix);
    }
}

/// Removes the work directories named `prefix…` in `parent` that no live process holds;
/// returns how many.
fn sweep(parent: &Path, prefix: &str) -> usize {
    let Ok(entries) = fs::read_dir(parent) else {
        return 0;
    };
    let ours = std::process::id().to_string();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        // This process's own are in use.
        if rest.split('-').next() == Some(ours.as_str()) {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let stale = match File::open(dir.join(LOCK)) {
            // Taken: its holder is gone. Kept until the directory is removed, so no other
            // sweeper takes it meanwhile.
            Ok(lock) => flock(&lock, libc::LOCK_EX | libc::LOCK_NB)
                .ok()
                .map(|()| Some(lock)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let age = fs::symlink_metadata(&dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                age.is_some_and(|age| age >= UNLOCKED_STALE).then_some(None)
            }
            Err(_) => None,
        };
        if stale.is_some() && fs::remove_dir_all(&dir).is_ok() {
            tracing::info!(dir = %dir.display(), "removed a work directory left by a process that died");
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
        std::fs::write(live.path().join("restored.db"), b"x").unwrap();
        // Left by a process that died: its lock file is there, nobody holds it.
        let dead = tmp.path().join(format!("{PREFIX}999999-0"));
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join(LOCK), b"").unwrap();
        fs::write(dead.join("restored.db"), b"half").unwrap();
        // Just made by a process that has not locked it yet: kept for a while.
        let young = tmp.path().join(format!("{PREFIX}999998-0"));
        fs::create_dir(&young).unwrap();
        // Someone else's file with the prefix: not a directory, kept; another kind's dead
        // directory: left to that kind.
        fs::write(tmp.path().join(format!("{PREFIX}file")), b"").unwrap();
        let other = tmp.path().join(".multidb-other-999999-0");
        fs::create_dir(&other).unwrap();
        fs::write(other.join(LOCK), b"").unwrap();
        assert_eq!(sweep(tmp.path(), PREFIX), 1);
        assert!(!dead.exists());
        assert!(young.exists());
        assert!(live.path().join("restored.db").exists());
        assert!(tmp.path().join(format!("{PREFIX}file")).exists());
        assert!(other.exists());
        let old = std::time::SystemTime::now() - UNLOCKED_STALE * 2;
        File::open(&young).unwrap().set_modified(old).unwrap();
        assert_eq!(sweep(tmp.path(), PREFIX), 1);
        assert!(!young.exists());
        let path = live.path().to_path_buf();
        drop(live);
        assert!(!path.exists());
    }

    /// Work directories made side by side while others sweep the same directory (what
    /// `restore --all` does with many databases in one directory): none is removed while
    /// its owner uses it. The sweepers here act as another process would (this process's
    /// own directories are skipped by pid, so they sweep under another prefix's rules by
    /// taking the lock itself).
    #[test]
    fn sweeping_never_takes_a_directory_being_made() {
        let tmp = tempfile::tempdir().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let sweeper = scope.spawn(|| {
                let mut taken = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for entry in fs::read_dir(tmp.path()).unwrap().flatten() {
                        if let Ok(lock) = File::open(entry.path().join(LOCK)) {
                            if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
                                taken += 1;
                            }
                        }
                    }
                }
                taken
            });
            // Kept until the sweeper stops: a directory removed by its owner releases its
            // lock, which is not the race under test.
            let made: Vec<WorkDir> = (0..2000)
                .map(|_| WorkDir::create(tmp.path(), "test").unwrap())
                .collect();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(
                sweeper.join().unwrap(),
                0,
                "a live work directory's lock was taken"
            );
            assert!(made.iter().all(|d| d.path().join(LOCK).exists()));
        });
    }
}
