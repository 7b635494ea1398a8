//! `multidb bench peers`: Litestream and the multidb agent on the same tree of real WAL
//! databases, each replicating to a directory, one after the other in the same run. For each
//! tool: start-up time, memory, descriptors, threads, CPU, files written and directory
//! listings while idle, and the delay from a commit to a new file in the replica. A tool that
//! fails to start is a row that says so; every phase has a timeout.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::agent::{count_files, cpu_time, fds, mb, rss};
use crate::cli::generate::{self, Layout};

#[derive(Debug, clap::Args)]
pub struct PeersArgs {
    /// Where the trees, replicas and configurations go (trees are kept and reused)
    #[arg(long, default_value = "target/bench-peers")]
    pub dir: PathBuf,
    /// Tree sizes in databases, multiples of 1000
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    pub databases: Vec<usize>,
    /// How long each tool is left alone after start-up before the idle figures are taken
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub settle: Duration,
    /// How long each tool is watched idle (CPU, files written)
    #[arg(long, default_value = "20s", value_parser = crate::config::parse_duration)]
    pub idle: Duration,
    /// How long system calls are traced while idle (directory listings)
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub trace: Duration,
    /// Commits whose lag is measured, each to a different idle database, per tool and mode
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
    /// Give up on a start-up after this long
    #[arg(long, default_value = "120s", value_parser = crate::config::parse_duration)]
    pub start_timeout: Duration,
    /// Give up on one commit reaching the replica after this long
    #[arg(long, default_value = "45s", value_parser = crate::config::parse_duration)]
    pub lag_timeout: Duration,
    /// The Litestream binary (0.5.x; `scripts/setup.sh` installs 0.5.17)
    #[arg(long, default_value = "litestream")]
    pub litestream: PathBuf,
}

/// A tool under test, killed when dropped so a failed phase leaves nothing running.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn pid(&self) -> u32 {
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

/// What one tool measured at one size; `None` where a phase could not run.
#[derive(Default)]
struct Figures {
    /// Start-up time, or why there is none.
    startup: Option<Result<Duration, String>>,
    rss: Option<u64>,
    fds: Option<usize>,
    threads: Option<u64>,
    idle_cpu: Option<f64>,
    files_written: Option<usize>,
    listings: Option<Result<u64, String>>,
    /// The descriptor limit the tool ran with.
    fd_limit: Option<u64>,
    lag_plain: Vec<Option<Duration>>,
    lag_extension: Vec<Option<Duration>>,
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
fn files_under(dir: &Path, into: &mut BTreeSet<PathBuf>) {
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
fn idle_phase(
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
fn lag_samples(
    dbs: &mut impl Iterator<Item = (PathBuf, PathBuf)>,
    args: &PeersArgs,
    extension: Option<&Path>,
) -> anyhow::Result<Vec<Option<Duration>>> {
    let targets: Vec<(PathBuf, PathBuf)> = dbs.take(args.samples).collect();
    lag_of_commits(&targets, extension, args.lag_timeout)
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

fn litestream(
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

fn multidb(
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

fn lag_text(samples: &[Option<Duration>], timeout: Duration) -> String {
    if samples.is_empty() {
        return "—".to_string();
    }
    let mut done: Vec<Duration> = samples.iter().flatten().copied().collect();
    done.sort_unstable();
    let missed = samples.len() - done.len();
    let mut text = match done.as_slice() {
        [] => String::new(),
        d => format!(
            "median {:.0} ms, max {:.0} ms",
            d[d.len() / 2].as_secs_f64() * 1e3,
            d[d.len() - 1].as_secs_f64() * 1e3
        ),
    };
    if missed > 0 {
        if !text.is_empty() {
            text.push_str("; ");
        }
        text.push_str(&format!(
            "{missed} of {} not in the replica after {} s",
            samples.len(),
            timeout.as_secs()
        ));
    }
    text
}

fn print_table(size: usize, args: &PeersArgs, tools: &[(&str, &Figures)]) {
    let cell = |f: &Figures, row: &str| -> String {
        let not_started = || "— (not started)".to_string();
        match row {
            "startup" => match &f.startup {
                Some(Ok(d)) => format!("{:.1} s", d.as_secs_f64()),
                Some(Err(why)) => format!("**failed**: {why}"),
                None => "—".to_string(),
            },
            "rss" => f.rss.map_or_else(not_started, mb),
            "fds" => f.fds.map_or_else(not_started, |n| n.to_string()),
            "limit" => f.fd_limit.map_or("—".to_string(), |n| n.to_string()),
            "threads" => f.threads.map_or_else(not_started, |n| n.to_string()),
            "cpu" => f
                .idle_cpu
                .map_or_else(not_started, |c| format!("{:.2}% of a core", c * 100.0)),
            "files" => f.files_written.map_or_else(not_started, |n| n.to_string()),
            "listings" => match &f.listings {
                Some(Ok(n)) => n.to_string(),
                Some(Err(why)) => why.clone(),
                None => not_started(),
            },
            "lag_plain" if f.startup.as_ref().is_some_and(|s| s.is_ok()) => {
                lag_text(&f.lag_plain, args.lag_timeout)
            }
            "lag_extension" if f.startup.as_ref().is_some_and(|s| s.is_ok()) => {
                if f.lag_extension.is_empty() {
                    "n/a (no extension)".to_string()
                } else {
                    lag_text(&f.lag_extension, args.lag_timeout)
                }
            }
            _ => not_started(),
        }
    };
    let rows = [
        ("startup", "start-up (Litestream: every database has its first replica file; multidb: `status` counts every database discovered)".to_string()),
        ("rss", "RSS, idle".to_string()),
        ("fds", "descriptors, idle".to_string()),
        ("limit", "descriptor limit it ran with".to_string()),
        ("threads", "threads".to_string()),
        ("cpu", format!("CPU, idle {} s", args.idle.as_secs())),
        ("files", format!("replica files written, idle {} s", args.idle.as_secs())),
        ("listings", format!("directory listings (`getdents64`), idle {} s", args.trace.as_secs())),
        ("lag_plain", format!("commit → new replica file, `sqlite3` shell without the extension ({} commits, each to another idle database; from the shell's start)", args.samples)),
        ("lag_extension", format!("commit → new replica file, `sqlite3` shell with libmultidb loaded ({} commits)", args.samples)),
    ];
    println!();
    println!(
        "{size} idle WAL databases (10 projects × 10 databases × 10 branches × {} tenants), directory replicas on the same disk:",
        size / 1000
    );
    println!();
    print!("| |");
    for (name, _) in tools {
        print!(" {name} |");
    }
    println!();
    print!("|---|");
    for _ in tools {
        print!("---|");
    }
    println!();
    for (key, label) in rows {
        print!("| {label} |");
        for (_, f) in tools {
            print!(" {} |", cell(f, key));
        }
        println!();
    }
}

pub fn peers(args: &PeersArgs) -> anyhow::Result<()> {
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    for &size in &args.databases {
        if size < 1000 || size % 1000 != 0 {
            bail!("--databases: {size} is not a positive multiple of 1000");
        }
    }
    let (_, extension) = super::built_binaries()?;
    let version = Command::new(&args.litestream)
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let litestream_name = if version.is_empty() {
        "Litestream (not found)".to_string()
    } else {
        format!("Litestream {version}")
    };
    std::fs::create_dir_all(&args.dir)?;
    let root = args.dir.canonicalize()?;
    // The agents of every size use this ring, and so does libmultidb loaded into this
    // process for the lag samples. Set before any thread starts.
    // SAFETY: single-threaded here; nothing reads the environment concurrently.
    unsafe { std::env::set_var(multidb::ring::ENV_PATH, root.join("ring")) };
    println!(
        "bench peers: Litestream and multidb one after the other on the same trees; settle {} s after start-up, then idle {} s, traced {} s; timeouts: start-up {} s, lag {} s",
        args.settle.as_secs(),
        args.idle.as_secs(),
        args.trace.as_secs(),
        args.start_timeout.as_secs(),
        args.lag_timeout.as_secs()
    );
    for &size in &args.databases {
        let pristine = root.join(format!("tree-{size}"));
        let layout = Layout {
            projects: 10,
            databases: 10,
            branches: 10,
            tenants: size / 1000,
        };
        eprintln!(
            "preparing {size} WAL databases under {} ...",
            pristine.display()
        );
        generate::generate(&pristine, &layout, true)?;
        // Litestream writes into every database it replicates (its `_litestream_seq` and
        // `_litestream_lock` tables), so each run works on a fresh copy of the generated tree,
        // multidb first: it writes nothing into a database.
        let dir = root.join(format!("run-{size}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let tree = dir.join("tree");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&pristine)
            .arg(&tree)
            .status()
            .context("running cp")?;
        if !copied.success() {
            bail!(
                "copying {} to {} failed",
                pristine.display(),
                tree.display()
            );
        }
        let mut found = BTreeSet::new();
        files_under(&tree, &mut found);
        let dbs: Vec<PathBuf> = found
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "db"))
            .collect();
        if dbs.len() != size {
            bail!(
                "{}: {} databases, expected {size}",
                tree.display(),
                dbs.len()
            );
        }
        // Lag samples take databases nobody wrote during the run, spread over the tree; the
        // two tools take different ones, so each first commit finds its database idle.
        let step = (size / (3 * args.samples + 1)).max(1);
        let mut spare = (1..).map(move |k| (k * step) % size);
        eprintln!("  multidb ...");
        let ours = multidb(args, &tree, &dbs, &dir, &extension, &mut spare)?;
        eprintln!("  Litestream ...");
        let theirs = if version.is_empty() {
            Figures {
                startup: Some(Err(format!("{} not found", args.litestream.display()))),
                ..Figures::default()
            }
        } else {
            litestream(args, &dbs, &dir, &mut spare)?
        };
        print_table(
            size,
            args,
            &[(&litestream_name, &theirs), ("multidb", &ours)],
        );
        // The copy is 3 files per database; the pristine tree stays for the next run.
        let _ = std::fs::remove_dir_all(&tree);
    }
    Ok(())
}
