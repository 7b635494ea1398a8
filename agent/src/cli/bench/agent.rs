//! `multidb bench agent`: the sidecar at host scale, as a real process. A tree of 100,000
//! databases is discovered; first nothing is written (idle cost: CPU, memory, replica
//! writes), then writer processes with libmultidb commit to 1,000 of them at 10,000
//! commits/s in total (lag, CPU, memory, and each hot database's descriptors and memory).
//! Baselines in the same run: `find` over the same tree, and the agent's own idle figures.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cli::generate::{self, Layout};

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Where the tree, replica and state go (the tree is kept and reused)
    #[arg(long, default_value = "target/bench-agent")]
    pub dir: PathBuf,
    /// Databases discovered, a multiple of 1000
    #[arg(long, default_value_t = 100_000)]
    pub databases: usize,
    /// Databases written (and so hot)
    #[arg(long, default_value_t = 1000)]
    pub hot: usize,
    /// Commits per second, all writers together
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Writer processes
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// How long the writers write
    #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// How long the idle phase is watched
    #[arg(long, default_value = "20s", value_parser = crate::config::parse_duration)]
    pub idle: Duration,
    /// The agent's `watch` setting: `false` measures the same load with scans only, the
    /// baseline for what the inotify watches cost
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub watch: bool,
}

#[derive(Debug, clap::Args)]
pub struct WriterArgs {
    #[arg(long)]
    pub list: PathBuf,
    #[arg(long)]
    pub rate: f64,
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    #[arg(long)]
    pub extension: PathBuf,
}

/// CPU time (user + system) of a process, from /proc.
pub(super) fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Resident and peak resident memory of a process, bytes.
pub(super) fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub(super) fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

pub(super) fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}

pub(super) fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub(super) struct AgentProcess {
    pub(super) child: Child,
    pub(super) exe: PathBuf,
    pub(super) config: PathBuf,
}

impl AgentProcess {
    pub(super) fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .args(["status", "--json"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The benchmarks' tree of `databases` empty files below `dir` (10 projects × 10 databases ×
/// 10 branches × N/1000 tenants), made once and reused: the canonical `dir`, the tree, its
/// layout.
pub(super) fn bench_tree(
    dir: &Path,
    databases: usize,
) -> anyhow::Result<(PathBuf, PathBuf, Layout)> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let tree = dir.join(format!("tree-{databases}"));
    let layout = Layout {
        projects: 10,
        databases: 10,
        branches: 10,
        tenants: databases / 1000,
    };
    eprintln!(
        "preparing {databases} databases under {} ...",
        tree.display()
    );
    generate::generate(&tree, &layout, false)?;
    Ok((dir, tree, layout))
}

pub fn agent(args: &AgentArgs) -> anyhow::Result<()> {
    if args.databases < 1000 || args.databases % 1000 != 0 {
        bail!("--databases must be a positive multiple of 1000");
    }
    if args.hot == 0 || args.hot > args.databases || args.writers == 0 {
        bail!("--hot must be 1 to --databases, --writers at least 1");
    }
    let (exe, extension) = super::built_binaries()?;
    let (dir, tree, _) = bench_tree(&args.dir, args.databases)?;
    for stale in ["state", "replica"] {
        let _ = std::fs::remove_dir_all(dir.join(stale));
    }
    let ring = dir.join("ring");
    let config = dir.join("multidb.yml");
    std::fs::write(
        &config,
        format!(
            "multi_db:\n  discovery_pattern: \"{}\"\n  max_active: {}\n  scan_interval: 30s\n  sync_interval: 1s\n  idle_timeout: 60s\n  watch: {}\n  state_dir: \"{}\"\n  replica_template:\n    type: file\n    path: \"{}/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"\n",
            generate::pattern_for(&tree),
            args.hot.max(1),
            args.watch,
            dir.join("state").display(),
            dir.join("replica").display()
        ),
    )?;

    // Baseline: `find` over the same tree.
    let started = Instant::now();
    let found = Command::new("find")
        .arg(&tree)
        .args(["-name", "*.db"])
        .stdout(Stdio::piped())
        .output()
        .context("running find")?;
    let find_time = started.elapsed();
    let find_count = found
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count();

    let agent = AgentProcess {
        child: Command::new(&exe)
            .arg("--config")
            .arg(&config)
            .arg("agent")
            .env(multidb::ring::ENV_PATH, &ring)
            .env("MULTIDB_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("starting the agent")?,
        exe: exe.clone(),
        config: config.clone(),
    };
    let start_deadline = Instant::now() + Duration::from_secs(120);
    let discovered = loop {
        if let Some(s) = agent.status() {
            let n = s["tiers"]["discovered"].as_u64().unwrap_or(0);
            if n as usize >= args.databases {
                break n;
            }
        }
        if Instant::now() > start_deadline {
            bail!("the agent did not discover the tree within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let pid = agent.pid();
    eprintln!("idle phase: {} s, nothing written ...", args.idle.as_secs());
    let cpu0 = cpu_time(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(args.idle);
    let idle_cpu = (cpu_time(pid)? - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let (idle_rss, _) = rss(pid);
    let idle_fds = fds(pid);
    let idle_files = count_files(&dir.join("replica"));

    // The written databases: spread over the tree, every (N/hot)-th.
    let mut all = Vec::with_capacity(find_count);
    for line in found
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
    {
        all.push(String::from_utf8_lossy(line).into_owned());
    }
    all.sort();
    let step = (all.len() / args.hot).max(1);
    let hot: Vec<&String> = all.iter().step_by(step).take(args.hot).collect();
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let list = dir.join(format!("writer-{w}.txt"));
        let mine: Vec<&str> = hot
            .iter()
            .skip(w)
            .step_by(args.writers)
            .map(|s| s.as_str())
            .collect();
        std::fs::write(&list, mine.join("\n"))?;
        writers.push(
            Command::new(&exe)
                .args(["bench", "agent-writer", "--list"])
                .arg(&list)
                .args([
                    "--rate",
                    &(args.rate as f64 / args.writers as f64).to_string(),
                ])
                .args(["--duration", &format!("{}ms", args.duration.as_millis())])
                .arg("--extension")
                .arg(&extension)
                .env(multidb::ring::ENV_PATH, &ring)
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a writer")?,
        );
    }
    eprintln!(
        "load phase: {} writers, {} commits/s to {} databases for {} s ...",
        args.writers,
        args.rate,
        hot.len(),
        args.duration.as_secs()
    );
    // Measured from a quarter in, once the hot set has formed.
    std::thread::sleep(args.duration / 4);
    let cpu1 = cpu_time(pid)?;
    let t1 = Instant::now();
    let mut max_hot = 0;
    let mut max_fds = 0;
    let mut load_rss = 0;
    while t1.elapsed() < args.duration / 2 {
        if let Some(s) = agent.status() {
            max_hot = max_hot.max(s["tiers"]["hot"].as_u64().unwrap_or(0));
        }
        max_fds = max_fds.max(fds(pid));
        load_rss = load_rss.max(rss(pid).0);
        std::thread::sleep(Duration::from_millis(500));
    }
    let load_cpu = (cpu_time(pid)? - cpu1).as_secs_f64() / t1.elapsed().as_secs_f64();
    let status = agent.status().context("no status from the agent")?;
    let mut committed = 0u64;
    for w in writers {
        let out = w.wait_with_output()?;
        if !out.status.success() {
            bail!("a writer failed");
        }
        committed += String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .unwrap_or(0);
    }
    let (_, peak_rss) = rss(pid);
    drop(agent);

    let rate = committed as f64 / args.duration.as_secs_f64();
    let hot_n = max_hot.max(1) as f64;
    println!("agent at host scale ({} databases discovered, watch: {}; `find` over the same tree: {find_count} files in {:.0} ms, the baseline for a full walk)", discovered, args.watch, find_time.as_secs_f64() * 1e3);
    println!(
        "  idle {} s, nothing written: agent CPU {:.2}% of a core, RSS {}, {} descriptors, {} replica files written (goal: 0 requests, CPU ≈ 0, RSS ≤ 32 MB)",
        args.idle.as_secs(),
        idle_cpu * 100.0,
        mb(idle_rss),
        idle_fds,
        idle_files
    );
    println!(
        "  load: {:.0} commits/s achieved by {} writer processes into {} databases; hot set {} (max_active {})",
        rate,
        args.writers,
        hot.len(),
        max_hot,
        args.hot
    );
    println!(
        "  lag from commit to replica: p50 {} ms, p99 {} ms over the last {} syncs (goal p99 ≤ 1500 ms; sync_interval 1 s batches commits)",
        status["lag_ms"]["p50"], status["lag_ms"]["p99"], status["lag_ms"]["samples"]
    );
    println!(
        "  agent CPU {:.2} cores (goal ≤ 1), RSS {} now, {} peak (goal ≤ 256 MB); {} syncs, {} sync errors; ring: {} commit records read, {} dropped",
        load_cpu,
        mb(load_rss),
        mb(peak_rss),
        status["syncs"],
        status["sync_errors"],
        status["ring_commits"],
        status["tiers"]["ring_dropped"]
    );
    println!(
        "  per hot database beyond the idle agent: {:.2} descriptors, {:.1} KB (goal ≤ 3 fds, ≤ 128 KB)",
        (max_fds.saturating_sub(idle_fds)) as f64 / hot_n,
        load_rss.saturating_sub(idle_rss) as f64 / hot_n / 1e3
    );
    Ok(())
}

/// `multidb bench agent-writer`: commits to the listed databases round-robin at `rate`/s
/// through libmultidb, keeping every connection open; prints the commit count.
pub fn writer(args: &WriterArgs) -> anyhow::Result<()> {
    // Each open database holds three descriptors: make room for all of them.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let text = std::fs::read_to_string(&args.list)?;
    let mut conns = Vec::new();
    for (i, path) in text.lines().filter(|l| !l.is_empty()).enumerate() {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        if i == 0 {
            // SAFETY: loading the extension under measurement; later connections get it
            // through its auto-extension.
            unsafe {
                conn.load_extension_enable()?;
                conn.load_extension(&args.extension, None::<&str>)?;
                conn.load_extension_disable()?;
            }
        }
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS bench(id INTEGER PRIMARY KEY, v BLOB);",
        )?;
        conns.push(conn);
    }
    if conns.is_empty() {
        bail!("{}: no databases", args.list.display());
    }
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1.0));
    let started = Instant::now();
    let mut next = started;
    let mut committed = 0u64;
    while started.elapsed() < args.duration {
        let conn = &conns[committed as usize % conns.len()];
        conn.execute("INSERT INTO bench(v) VALUES (randomblob(100))", [])?;
        committed += 1;
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    println!("{committed}");
    Ok(())
}
