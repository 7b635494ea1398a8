//! One agent per state directory: an exclusive `flock` on `<state_dir>/agent.lock`, taken
//! before anything else the agent does and held for the life of the process.
//!
//! Two agents on one state directory would both save positions, serve `agent.sock` and (with
//! the same configuration) append to the same replicas, where each computes its checksums from
//! its own idea of the previous file: the chain breaks and restores fail or lose rows (hazard
//! 12 in DESIGN.md). `flock` is released by the kernel when the process dies, so a killed
//! agent never leaves a stale lock; the pid written into the file is only for the message.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The lock file's name inside the state directory.
pub const LOCK_FILE: &str = "agent.lock";

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another multidb agent (pid {pid}) is running with the state directory {dir}; stop it first (one agent per state directory and ring)")]
    Held { dir: PathBuf, pid: String },
    #[error("state directory {dir}: {op}: {error}")]
    Io {
        dir: PathBuf,
        op: &'static str,
        error: io::Error,
    },
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct AgentLock {
    _file: File,
}

impl AgentLock {
    /// Creates `dir` (0700) if needed and takes the lock, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<AgentLock, LockError> {
        let io_err = |op| {
            move |source| LockError::Io {
                dir: dir.to_path_buf(),
                op,
                error: source,
            }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create"))?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(LOCK_FILE))
            .map_err(io_err("open agent.lock"))?;
        if let Err(e) = flock_exclusive(&file) {
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_err("lock agent.lock")(e));
            }
            return Err(LockError::Held {
                dir: dir.to_path_buf(),
                pid: holder(&mut file).map_or("unknown".into(), |p| p.to_string()),
            });
        }
        // A POSIX record lock beside the flock: another process asks the kernel who holds it
        // (F_GETLK), so the message names the holder even before it wrote its pid.
        let _ = posix_lock(&file, libc::F_SETLK);
        let write_pid = |file: &mut File| -> io::Result<()> {
            // Overwrite, then cut: the file never reads as empty.
            file.rewind()?;
            writeln!(file, "{:<20}", std::process::id())?;
            file.set_len(21)?;
            file.sync_data()
        };
        write_pid(&mut file).map_err(io_err("write agent.lock"))?;
        Ok(AgentLock { _file: file })
    }
}

/// The pid of the process holding the lock: the kernel's answer (another process's record
/// lock), else the pid the file names once it names a live process (the holder writes it
/// right after locking; a few reads cover that moment).
fn holder(file: &mut File) -> Option<u32> {
    if let Some(pid) = posix_lock(file, libc::F_GETLK).ok().flatten() {
        return Some(pid);
    }
    for _ in 0..50 {
        let mut text = String::new();
        let _ = file.rewind();
        let _ = file.read_to_string(&mut text);
        // One check for "a live process" across the crate: it also refuses pid 0 and pids
        // past `pid_t` (a garbage file), which `kill` would take for process groups.
        if let Ok(pid) = text.trim().parse::<u32>() {
            if crate::replica::lease::process_alive(pid) {
                return Some(pid);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

/// `fcntl` write lock over the whole file: `F_SETLK` takes it (non-blocking), `F_GETLK`
/// returns the pid of another process holding it.
fn posix_lock(file: &File, command: libc::c_int) -> io::Result<Option<u32>> {
    // SAFETY: a zeroed flock struct is a valid value; the fields are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on a descriptor we own with a valid flock struct.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), command, &mut lock) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let held = command == libc::F_GETLK && lock.l_type != libc::F_UNLCK as libc::c_short;
    Ok(held.then_some(lock.l_pid as u32))
}

/// `flock(LOCK_EX | LOCK_NB)`: the error is `EWOULDBLOCK` when another open file holds it.
pub fn flock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own; it only changes the kernel's lock table.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_the_first_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = AgentLock::acquire(&state).unwrap();
        let err = AgentLock::acquire(&state).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains(&state.display().to_string()), "{err}");
        drop(first);
        AgentLock::acquire(&state).expect("free after the holder let go");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
