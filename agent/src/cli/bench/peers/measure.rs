//! What is measured of a running tool: its idle cost (CPU, memory, descriptors, threads,
//! replica files written, directory listings traced with strace) and the delay from a commit
//! to a new file in its replica, into one [`Figures`] per tool and size.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::tools::Running;
use super::PeersArgs;
use crate::cli::bench::agent::{cpu_time, fds, rss};

/// What one tool measured at one size; `None` where a phase could not run.
#[derive(Default)]
pub(super) struct Figures {
    /// Start-up time, or why there is none.
    pub(super) startup: Option<Result<Duration, String>>,
    pub(super) rss: Option<u64>,
    pub(super) fds: Option<usize>,
    pub(super) threads: Option<u64>,
    pub(super) idle_cpu: Option<f64>,
    pub(super) files_written: Option<usize>,
    pub(super) listings: Option<Result<u64, String>>,
    /// The descriptor limit the tool ran with.
    pub(super) fd_limit: Option<u64>,
    pub(super) lag_plain: Vec<Option<Duration>>,
    pub(super) lag_extension: Vec<Option<Duration>>,
}

fn threads(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// Every file under `dir`, recursively.
pub(super) fn files_under(dir: &Path, into: &mut BTreeSet<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            files_under(&path, into);
        } else {
            into.insert(path);
        }
    }
}

/// `getdents64` calls of `pid` (all threads) over `window`, counted by `strace -c`.
fn directory_listings(pid: u32, window: Duration, out: &Path) -> Result<u64, String> {
    let mut strace = Command::new("strace")
        .args(["-f", "-c", "-e", "trace=getdents64", "-o"])
        .arg(out)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("n/a (strace: {e})"))?;
    std::thread::sleep(window);
    // SAFETY: signalling our own child; SIGINT makes strace detach and print its summary.
    unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
    let _ = strace.wait();
    let text = std::fs::read_to_string(out).map_err(|e| format!("n/a ({e})"))?;
    Ok(text
        .lines()
        .filter(|l| l.trim_end().ends_with(" getdents64"))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .sum())
}

/// Watches an idle tool: CPU and files written over `idle`, then listings over `trace`.
pub(super) fn idle_phase(
    tool: &mut Running,
    replica: &Path,
    args: &PeersArgs,
    trace_out: &Path,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let pid = tool.pid();
    // Start-up work (a first sync, compactions it schedules) is not idle cost.
    std::thread::sleep(args.settle);
    // New paths, not a count: a tool may delete files (retention) while it writes others.
    let mut files_before = BTreeSet::new();
    files_under(replica, &mut files_before);
    let cpu_before = cpu_time(pid)?;
    let started = Instant::now();
    std::thread::sleep(args.idle);
    let cpu = (cpu_time(pid)? - cpu_before).as_secs_f64() / started.elapsed().as_secs_f64();
    figures.idle_cpu = Some(cpu);
    let mut files_after = BTreeSet::new();
    files_under(replica, &mut files_after);
    figures.files_written = Some(files_after.difference(&files_before).count());
    figures.rss = Some(rss(pid).0);
    figures.fds = Some(fds(pid));
    figures.threads = threads(pid);
    figures.listings = Some(directory_listings(pid, args.trace, trace_out));
    Ok(())
}

/// One commit to each database, each by its own `sqlite3` shell process (with libmultidb
/// loaded when `extension` is given), started back to back; then waits until each database's
/// replica (the paired directory) holds a file that was not there before. Each lag counts from
/// the start of its shell, so it includes the shell's start-up (a few milliseconds).
///
/// A process, not a connection of this one: once libmultidb is loaded its auto-extension
/// hooks every connection the process opens, and the plain samples must stay plain.
fn lag_of_commits(
    targets: &[(PathBuf, PathBuf)],
    extension: Option<&Path>,
    timeout: Duration,
) -> anyhow::Result<Vec<Option<Duration>>> {
    let mut pending = Vec::new();
    for (db, replica) in targets {
        let mut before = BTreeSet::new();
        files_under(replica, &mut before);
        let mut shell = Command::new("sqlite3");
        if let Some(extension) = extension {
            shell
                .arg("-cmd")
                .arg(format!(".load {}", extension.display()));
        }
        let committed = Instant::now();
        let out = shell
            .arg(db)
            .arg("PRAGMA busy_timeout=10000; INSERT INTO items(name) VALUES ('bench peers');")
            .stdin(Stdio::null())
            .output()
            .context("running sqlite3")?;
        if !out.status.success() {
            bail!(
                "sqlite3 {}: {}",
                db.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        pending.push((replica, before, committed));
    }
    let mut lags = vec![None; targets.len()];
    let started = Instant::now();
    while started.elapsed() < timeout && lags.iter().any(Option::is_none) {
        for (i, (replica, before, committed)) in pending.iter().enumerate() {
            if lags[i].is_some() {
                continue;
            }
            let mut now = BTreeSet::new();
            files_under(replica, &mut now);
            if now.difference(before).next().is_some() {
                lags[i] = Some(committed.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(lags)
}

/// Lag samples: one commit to each of the next `samples` databases, idle until then.
pub(super) fn lag_samples(
    dbs: &mut impl Iterator<Item = (PathBuf, PathBuf)>,
    args: &PeersArgs,
    extension: Option<&Path>,
) -> anyhow::Result<Vec<Option<Duration>>> {
    let targets: Vec<(PathBuf, PathBuf)> = dbs.take(args.samples).collect();
    lag_of_commits(&targets, extension, args.lag_timeout)
}
