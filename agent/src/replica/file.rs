//! The `file` replica: a directory, written with temp-file, fsync, rename, directory fsync.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::{file_name, parse_file_name, FileInfo, ReplicaClient, ReplicaError};

pub struct FileReplica {
    root: PathBuf,
}

impl FileReplica {
    pub fn new(root: PathBuf) -> FileReplica {
        FileReplica { root }
    }

    fn level_dir(&self, level: u8) -> PathBuf {
        self.root.join("ltx").join(level.to_string())
    }

    fn path(&self, level: u8, min: u64, max: u64) -> PathBuf {
        self.level_dir(level).join(file_name(min, max))
    }

    fn io(&self, path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> ReplicaError {
        let location = path.display().to_string();
        move |source| ReplicaError::Io {
            location,
            op,
            error: source,
        }
    }
}

/// Links `from` to `to`, false if `to` exists: an exclusive create of a complete file.
fn link_new(from: &Path, to: &Path) -> io::Result<bool> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// The lock around a lease's compare-and-swap on a directory replica: a directory made with
/// `mkdir` (atomic, on NFS too) beside the lease, removed when dropped. Inside, an `owner`
/// file names the holder's kernel (boot id and pid namespace) and pid: a lock whose holder
/// ran on this kernel and is gone (killed while holding it) is broken at once; any other
/// is broken once it is [`LEASE_LOCK_STALE`] old.
struct LeaseLock {
    path: PathBuf,
}

/// A lease lock older than this was left by a process that died holding it (a holder keeps
/// it for one read and one rename).
const LEASE_LOCK_STALE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a writer waits for another's lease lock before the write fails (and is retried
/// by its caller): longer than [`LEASE_LOCK_STALE`], so a lock left by a dead holder on
/// another host never fails a write, only delays it.
const LEASE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(7);

/// This process as a lease lock's owner: `<boot id> <pid namespace> <pid>`. Two processes
/// with the same boot id and pid namespace see each other's pids. Read once per process.
fn lock_owner() -> &'static str {
    static OWNER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    OWNER.get_or_init(|| {
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let ns = fs::read_link("/proc/self/ns/pid")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        format!("{} {} {}\n", boot.trim(), ns, std::process::id())
    })
}

/// Whether `owner` (a lock's `owner` file) names a process of this kernel that is gone.
fn owner_is_gone(owner: &str, ours: &str) -> bool {
    let mut theirs = owner.split_whitespace();
    let mut here = ours.split_whitespace();
    let (Some(boot), Some(ns), Some(pid)) = (theirs.next(), theirs.next(), theirs.next()) else {
        return false;
    };
    let same_kernel = !boot.is_empty() && here.next() == Some(boot) && here.next() == Some(ns);
    same_kernel
        && pid
            .parse::<u32>()
            .is_ok_and(|pid| !super::lease::process_alive(pid))
}

impl LeaseLock {
    fn take(root: &Path) -> io::Result<LeaseLock> {
        let path = root.join(format!("{}.lock", super::lease::LEASE_NAME));
        let owner = lock_owner();
        let deadline = std::time::Instant::now() + LEASE_LOCK_WAIT;
        loop {
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    // Killed before this lands, the lock has no owner and ages out.
                    let _ = fs::write(path.join("owner"), owner);
                    return Ok(LeaseLock { path });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            let age = fs::symlink_metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            let dead = fs::read_to_string(path.join("owner"))
                .is_ok_and(|theirs| owner_is_gone(&theirs, owner));
            if dead || age.is_some_and(|age| age >= LEASE_LOCK_STALE) {
                // Renamed away before it is removed: of two processes breaking it, one wins.
                let aside = root.join(format!(
                    ".{}.lock.{:016x}.stale",
                    super::lease::LEASE_NAME,
                    crate::time::random_u64()
                ));
                if fs::rename(&path, &aside).is_ok() {
                    tracing::warn!(lock = %path.display(), "broke a lease lock left by a process that died holding it");
                    let _ = fs::remove_file(aside.join("owner"));
                    let _ = fs::remove_dir(&aside);
                }
                continue;
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is held by another writer of the lease; try again",
                        path.display()
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Drop for LeaseLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.path.join("owner"));
        let _ = fs::remove_dir(&self.path);
    }
}

impl FileReplica {
    /// A name at the root for a temporary of `name`, unique to this process and call.
    fn temporary_name(&self, name: &str, kind: &str) -> PathBuf {
        self.root.join(format!(
            ".{name}.{}.{:016x}.{kind}",
            std::process::id(),
            crate::time::random_u64()
        ))
    }

    /// Writes `body` to a new owner-only temporary at the root (made 0700 if missing), synced.
    fn private_temporary(
        &self,
        name: &str,
        kind: &str,
        body: &[u8],
    ) -> Result<PathBuf, ReplicaError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(self.io(&self.root, "create directory"))?;
        let tmp = self.temporary_name(name, kind);
        let written = super::create_new(&tmp, 0o600).and_then(|mut out| {
            out.write_all(body)?;
            out.sync_all()
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(self.io(&tmp, "write")(e));
        }
        Ok(tmp)
    }

    fn sync_root(&self) -> Result<(), ReplicaError> {
        fs::File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(self.io(&self.root, "sync directory"))
    }
}

impl ReplicaClient for FileReplica {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn location(&self, level: u8, min: u64, max: u64) -> String {
        self.path(level, min, max).display().to_string()
    }

    fn list(&self, level: u8) -> Result<Vec<FileInfo>, ReplicaError> {
        let dir = self.level_dir(level);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(&dir, "list")(e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(self.io(&dir, "list"))?;
            let Some((min, max)) = entry.file_name().to_str().and_then(parse_file_name) else {
                continue;
            };
            let meta = entry.metadata().map_err(self.io(&entry.path(), "stat"))?;
            let created = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            files.push(FileInfo {
                level,
                min_txid: min,
                max_txid: max,
                size: meta.len(),
                created,
            });
        }
        files.sort_by_key(|f| (f.min_txid, f.max_txid));
        Ok(files)
    }

    fn put(&self, level: u8, min: u64, max: u64, src: &Path) -> Result<(), ReplicaError> {
        let dir = self.level_dir(level);
        // New directories are no more open than the file (0600 gives 0700): their names are
        // the database's fields.
        let mode = super::copy_mode(src);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode | ((mode & 0o444) >> 2))
            .create(&dir)
            .map_err(self.io(&dir, "create directory"))?;
        let dst = self.path(level, min, max);
        // Same file system: a rename is atomic and writes nothing twice (`src` is synced).
        if fs::rename(src, &dst).is_ok() {
            return fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(self.io(&dir, "sync directory"));
        }
        let tmp = dst.with_extension(format!("ltx.tmp{}", std::process::id()));
        // Another file system: copy to a temporary name, sync, rename.
        let result = (|| {
            let mut input = fs::File::open(src)?;
            // The copy keeps the temporary file's mode, which follows the source database.
            let _ = fs::remove_file(&tmp);
            let mut out = super::create_new(&tmp, super::copy_mode(src))?;
            io::copy(&mut input, &mut out)?;
            out.sync_all()?;
            fs::rename(&tmp, &dst)?;
            fs::File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(self.io(&dst, "write"))
    }

    fn local_path(&self, level: u8, min: u64, max: u64) -> Option<PathBuf> {
        Some(self.path(level, min, max))
    }

    fn get(&self, level: u8, min: u64, max: u64, dst: &mut dyn Write) -> Result<(), ReplicaError> {
        let path = self.path(level, min, max);
        let mut file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ReplicaError::NotFound {
                    location: path.display().to_string(),
                })
            }
            Err(e) => return Err(self.io(&path, "open")(e)),
        };
        io::copy(&mut file, dst).map_err(self.io(&path, "read"))?;
        Ok(())
    }

    fn exists(&self) -> Result<bool, ReplicaError> {
        match fs::metadata(&self.root) {
            Ok(meta) => Ok(meta.is_dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io(&self.root, "stat")(e)),
        }
    }

    fn read_identity(&self) -> Result<Option<Vec<u8>>, ReplicaError> {
        let path = self.root.join(super::IDENTITY_NAME);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&path, "read")(e)),
        }
    }

    fn create_identity(&self, body: &[u8]) -> Result<bool, ReplicaError> {
        // Owner-only, as the identity file: the directory's names are a database's fields.
        let path = self.root.join(super::IDENTITY_NAME);
        let tmp = self.private_temporary(super::IDENTITY_NAME, "tmp", body)?;
        // A link never replaces: of two agents racing, exactly one creates the identity.
        let linked = link_new(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        if linked.map_err(self.io(&path, "create"))? {
            self.sync_root()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn replace_identity(&self, body: &[u8]) -> Result<(), ReplicaError> {
        let path = self.root.join(super::IDENTITY_NAME);
        let tmp = self.private_temporary(super::IDENTITY_NAME, "tmp", body)?;
        let renamed = fs::rename(&tmp, &path);
        if renamed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        renamed.map_err(self.io(&path, "replace"))?;
        self.sync_root()
    }

    fn read_lease(&self) -> Result<Option<super::lease::Stored>, ReplicaError> {
        let path = self.root.join(super::lease::LEASE_NAME);
        match fs::read(&path) {
            Ok(body) => Ok(Some(super::lease::Stored {
                tag: super::lease::file_tag(&body),
                body,
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&path, "read")(e)),
        }
    }

    /// A compare-and-swap the file system does not offer, made of a lock around a check and
    /// a rename: under [`LeaseLock`] the current lease is read and compared with `expected`
    /// (none, or the version we last wrote), and the new one renamed over it. The lease's
    /// path never goes missing, so a reader never takes a live lease for no lease.
    fn write_lease(
        &self,
        body: &[u8],
        expected: Option<&str>,
    ) -> Result<Option<String>, ReplicaError> {
        let path = self.root.join(super::lease::LEASE_NAME);
        let tmp = self.private_temporary(super::lease::LEASE_NAME, "tmp", body)?;
        let swapped = (|| -> io::Result<bool> {
            let _lock = LeaseLock::take(&self.root)?;
            let current = match fs::read(&path) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            let as_expected = match (expected, &current) {
                (None, None) => true,
                (Some(expected), Some(was)) => super::lease::file_tag(was) == expected,
                _ => false,
            };
            if as_expected {
                fs::rename(&tmp, &path)?;
            }
            Ok(as_expected)
        })();
        let _ = fs::remove_file(&tmp);
        if swapped.map_err(self.io(&path, "write lease"))? {
            self.sync_root()?;
            return Ok(Some(super::lease::file_tag(body)));
        }
        Ok(None)
    }

    fn delete(&self, files: &[FileInfo]) -> Result<(), ReplicaError> {
        for f in files {
            let path = self.path(f.level, f.min_txid, f.max_txid);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io(&path, "delete")(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_list_get_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let replica = FileReplica::new(tmp.path().join("r"));
        let src = tmp.path().join("src.ltx");
        fs::write(&src, b"hello").unwrap();
        replica.put(0, 1, 1, &src).unwrap();
        fs::write(&src, b"hello").unwrap();
        replica.put(0, 2, 5, &src).unwrap();
        fs::write(replica.level_dir(0).join("junk.txt"), b"x").unwrap();
        let files = replica.list(0).unwrap();
        assert_eq!(
            files
                .iter()
                .map(|f| (f.min_txid, f.max_txid))
                .collect::<Vec<_>>(),
            [(1, 1), (2, 5)]
        );
        assert!(tmp
            .path()
            .join("r/ltx/0/0000000000000002-0000000000000005.ltx")
            .is_file());
        let mut out = Vec::new();
        replica.get(0, 2, 5, &mut out).unwrap();
        assert_eq!(out, b"hello");
        assert!(
            !src.exists(),
            "same file system: the source was moved into place"
        );
        replica.delete(&files[..1]).unwrap();
        assert_eq!(replica.list(0).unwrap().len(), 1);
        assert!(matches!(
            replica.get(0, 1, 1, &mut out),
            Err(ReplicaError::NotFound { .. })
        ));
        assert!(replica.list(9).unwrap().is_empty());
    }

    #[test]
    fn a_lease_being_replaced_never_goes_missing_for_a_reader() {
        let tmp = tempfile::tempdir().unwrap();
        let replica = FileReplica::new(tmp.path().join("r"));
        let mut tag = replica.write_lease(b"v0", None).unwrap().unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    assert!(
                        replica.read_lease().unwrap().is_some(),
                        "missing after {reads}"
                    );
                    reads += 1;
                }
                reads
            });
            for n in 1..300 {
                let body = format!("v{n}");
                tag = replica
                    .write_lease(body.as_bytes(), Some(&tag))
                    .unwrap()
                    .expect("our own version");
            }
            stop.store(true, std::sync::atomic::Ordering::Release);
            assert!(reader.join().unwrap() > 0);
        });
        // A stale version loses; creating over an existing lease loses.
        assert_eq!(replica.write_lease(b"late", Some("stale")).unwrap(), None);
        assert_eq!(replica.write_lease(b"new", None).unwrap(), None);
    }

    /// A lock a live holder keeps taking (here: kept fresh) is never broken: the write
    /// waits [`LEASE_LOCK_WAIT`], then fails with an error that names the lock, and the lease
    /// is left as it was.
    #[test]
    fn a_lease_lock_a_live_holder_keeps_fails_the_write_after_the_wait() {
        let tmp = tempfile::tempdir().unwrap();
        let replica = FileReplica::new(tmp.path().join("r"));
        let tag = replica.write_lease(b"v0", None).unwrap().unwrap();
        let lock = tmp.path().join("r").join("multidb.lease.lock");
        fs::create_dir(&lock).unwrap();
        fs::write(lock.join("owner"), lock_owner()).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let started = std::time::Instant::now();
        let result = std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let now = std::time::SystemTime::now();
                    fs::File::open(&lock).unwrap().set_modified(now).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            });
            let result = replica.write_lease(b"v1", Some(&tag));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            result
        });
        let waited = started.elapsed();
        let error = result.expect_err("written under another writer's lock");
        let message = format!("{:#}", anyhow::Error::from(error));
        assert!(
            message.contains("held by another writer of the lease")
                && message.contains(&lock.display().to_string()),
            "{message}"
        );
        assert!(waited >= LEASE_LOCK_WAIT, "{waited:?}");
        assert!(lock.exists(), "a live holder's lock was broken");
        assert_eq!(
            fs::read(tmp.path().join("r").join(super::super::lease::LEASE_NAME)).unwrap(),
            b"v0"
        );
    }

    #[test]
    fn a_lease_lock_left_by_a_dead_process_is_broken() {
        let tmp = tempfile::tempdir().unwrap();
        let replica = FileReplica::new(tmp.path().join("r"));
        let mut tag = replica.write_lease(b"v0", None).unwrap().unwrap();
        let lock = tmp.path().join("r").join("multidb.lease.lock");
        // A lock of a live holder of this kernel (this process) is waited for until it is
        // old enough to have been left by a hung holder, then broken.
        fs::create_dir(&lock).unwrap();
        fs::write(lock.join("owner"), lock_owner()).unwrap();
        let started = std::time::Instant::now();
        tag = replica.write_lease(b"v1", Some(&tag)).unwrap().unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= LEASE_LOCK_STALE - std::time::Duration::from_millis(500)
                && waited < LEASE_LOCK_WAIT,
            "{waited:?}"
        );
        assert!(!lock.exists());
        // Fresh, but its holder ran on this kernel and is gone (a child that has exited and
        // been reaped): broken at once.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let ours = lock_owner();
        let mut fields = ours.split_whitespace();
        let owner = format!(
            "{} {} {gone}\n",
            fields.next().unwrap(),
            fields.next().unwrap()
        );
        fs::create_dir(&lock).unwrap();
        fs::write(lock.join("owner"), &owner).unwrap();
        let started = std::time::Instant::now();
        tag = replica.write_lease(b"v2", Some(&tag)).unwrap().unwrap();
        assert!(
            started.elapsed() < LEASE_LOCK_STALE,
            "{:?}",
            started.elapsed()
        );
        assert!(!lock.exists());
        // Another kernel's pid says nothing here: the lock ages out instead.
        fs::create_dir(&lock).unwrap();
        fs::write(lock.join("owner"), format!("other-boot ns {gone}\n")).unwrap();
        assert!(!owner_is_gone(&format!("other-boot ns {gone}"), ours));
        assert!(owner_is_gone(&owner, ours));
        assert!(!owner_is_gone(ours, ours));
        let old = std::time::SystemTime::now() - LEASE_LOCK_STALE * 2;
        fs::File::open(&lock).unwrap().set_modified(old).unwrap();
        assert!(replica.write_lease(b"v3", Some(&tag)).unwrap().is_some());
    }
}
