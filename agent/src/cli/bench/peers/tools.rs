//! The two tools under test: each started on a copy of the tree with its own replica
//! directory and configuration, killed when dropped, and known to have started when every
//! database is in its replica (Litestream) or counted by `multidb status`; then measured.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::measure::{idle_phase, lag_samples, Figures};
use super::PeersArgs;
use crate::cli::bench::agent::{count_files, fds, mb, rss};
use crate::cli::generate;

/// A tool under test, killed when dropped so a failed phase leaves nothing running.
pub(super) struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status and the end of the log, if the process is gone.
    fn exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok()??;
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Some(format!("exited ({status}): {}", tail.join(" / ")))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until `ready` says so or the tool exits or the timeout passes.
fn wait_started(
    tool: &mut Running,
    timeout: Duration,
    mut ready: impl FnMut(&mut Running) -> bool,
) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        if let Some(why) = tool.exited() {
            return Err(why);
        }
        if ready(tool) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!("not started within {} s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Raises RLIMIT_NOFILE to 1,048,576 where permitted (root), else to the hard limit.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        let wanted = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: limit.rlim_max.max(1 << 20),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The descriptor limit a child of `pid` runs with, from /proc.
fn nofile_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

pub(super) fn litestream(
    args: &PeersArgs,
    dbs: &[PathBuf],
    dir: &Path,
    spare: &mut impl Iterator<Item = usize>,
) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();
    let replica = dir.join("replica-litestream");
    let _ = std::fs::remove_dir_all(&replica);
    let replica_of = |i: usize| replica.join(i.to_string());
    let mut config = String::from("dbs:\n");
    for (i, db) in dbs.iter().enumerate() {
        config.push_str(&format!(
            "  - path: {}\n    replica:\n      type: file\n      path: {}\n",
            db.display(),
            replica_of(i).display()
        ));
    }
    let config_path = dir.join("litestream.yml");
    std::fs::write(&config_path, config)?;
    let log = dir.join("litestream.log");
    let log_file = std::fs::File::create(&log)?;
    let started = Instant::now();
    let mut command = Command::new(&args.litestream);
    // Litestream keeps about five descriptors per database: give it what the host allows,
    // as an operator would, so a failure is Litestream's and not this machine's ulimit.
    // SAFETY: the closure only calls async-signal-safe setrlimit between fork and exec.
    unsafe {
        command.pre_exec(|| {
            raise_nofile_limit();
            Ok(())
        })
    };
    let mut tool = Running {
        child: command
            .args(["replicate", "-config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", args.litestream.display()))?,
        log,
    };
    // Started: every database has its first file in its replica (Litestream's initial sync of
    // each database), which needs every database open.
    let total = dbs.len();
    let pid = tool.pid();
    figures.fd_limit = nofile_limit(pid);
    // Databases found started are not looked at again: the check stays cheap at 10,000.
    let mut first_unstarted = 0;
    let startup = wait_started(&mut tool, args.start_timeout, |_| {
        while first_unstarted < total && count_files(&replica_of(first_unstarted)) > 0 {
            first_unstarted += 1;
        }
        first_unstarted == total
    })
    .map(|_| started.elapsed());
    if let Err(why) = startup {
        let started_dbs = (0..total)
            .filter(|&i| count_files(&replica_of(i)) > 0)
            .count();
        let log = std::fs::read_to_string(dir.join("litestream.log")).unwrap_or_default();
        let errors = log.lines().filter(|l| l.contains("level=ERROR")).count();
        let too_many = log.matches("too many open files").count();
        figures.startup = Some(Err(format!(
            "{why}; {started_dbs} of {total} databases had a replica file, {} descriptors, RSS {}, {errors} ERROR lines in its log ({too_many} \"too many open files\")",
            fds(pid),
            mb(rss(pid).0)
        )));
        return Ok(figures);
    }
    figures.startup = Some(startup);
    idle_phase(
        &mut tool,
        &replica,
        args,
        &dir.join("strace-litestream.txt"),
        &mut figures,
    )?;
    let mut pairs = spare.map(|i| (dbs[i].clone(), replica_of(i)));
    figures.lag_plain = lag_samples(&mut pairs, args, None)?;
    Ok(figures)
}

pub(super) fn multidb(
    args: &PeersArgs,
    tree: &Path,
    dbs: &[PathBuf],
    dir: &Path,
    extension: &Path,
    spare: &mut impl Iterator<Item = usize>,
) -> anyhow::Result<Figures> {
    let exe = std::env::current_exe().context("locating the multidb binary")?;
    let mut figures = Figures::default();
    let replica = dir.join("replica-multidb");
    let state = dir.join("state-multidb");
    for stale in [&replica, &state] {
        let _ = std::fs::remove_dir_all(stale);
    }
    let config = dir.join("multidb.yml");
    std::fs::write(
        &config,
        format!(
            "multi_db:\n  discovery_pattern: \"{}\"\n  max_active: 1000\n  scan_interval: 30s\n  sync_interval: 1s\n  state_dir: \"{}\"\n  replica_template:\n    type: file\n    path: \"{}/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"\n",
            generate::pattern_for(tree),
            state.display(),
            replica.display()
        ),
    )?;
    let log = dir.join("multidb.log");
    let log_file = std::fs::File::create(&log)?;
    let started = Instant::now();
    let mut tool = Running {
        child: Command::new(&exe)
            .arg("--config")
            .arg(&config)
            .arg("agent")
            .env("MULTIDB_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting the agent")?,
        log,
    };
    // Started: `multidb status` counts every database of the tree as discovered.
    let total = dbs.len() as u64;
    let status = |exe: &Path| -> Option<u64> {
        let out = Command::new(exe)
            .arg("--config")
            .arg(&config)
            .args(["status", "--json"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["tiers"]["discovered"].as_u64()
    };
    let startup = wait_started(&mut tool, args.start_timeout, |_| {
        status(&exe).is_some_and(|n| n >= total)
    })
    .map(|_| started.elapsed());
    let ok = startup.is_ok();
    figures.startup = Some(startup);
    figures.fd_limit = nofile_limit(tool.pid());
    if !ok {
        return Ok(figures);
    }
    idle_phase(
        &mut tool,
        &replica,
        args,
        &dir.join("strace-multidb.txt"),
        &mut figures,
    )?;
    let replica_of = |db: &Path| -> PathBuf {
        // PROJECT/databases/DATABASE/branches/BRANCH/tenants/TENANT.db, the template's
        // captures, from the end of the path.
        let parts: Vec<String> = db
            .components()
            .rev()
            .filter_map(|c| c.as_os_str().to_str().map(str::to_string))
            .collect();
        let part = |i: usize| parts.get(i).map_or("", String::as_str);
        let tenant = part(0).strip_suffix(".db").unwrap_or("");
        replica
            .join(part(6))
            .join(part(4))
            .join(part(2))
            .join(tenant)
    };
    let mut pairs = spare
        .by_ref()
        .map(|i| (dbs[i].clone(), replica_of(&dbs[i])));
    figures.lag_plain = lag_samples(&mut pairs, args, None)?;
    figures.lag_extension = lag_samples(&mut pairs, args, Some(extension))?;
    Ok(figures)
}
