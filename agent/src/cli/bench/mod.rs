//! `multidb bench discovery`: figures for the cold side, each beside a baseline measured in the
//! same run on the same tree (`find ROOT -name '*.db'`). Benchmarks print; they never fail on a
//! number.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cli::generate::{self, Layout};
use crate::discover::arena::Arena;
use crate::discover::discovery;
use crate::discover::pattern::Pattern;

mod agent;
mod fleet;
mod follow;
mod instructions;
mod nonext;
mod peers;
mod replication;
pub use agent::{agent, writer as agent_writer, AgentArgs, WriterArgs};
pub use fleet::{fleet, FleetArgs};
pub use follow::{follow, FollowArgs};
pub use instructions::{child as commit_child, CommitChildArgs};
pub use nonext::{nonext, NonextArgs};
pub use peers::{peers, PeersArgs};
pub use replication::{replicate, ReplicateArgs};

#[derive(Debug, clap::Args)]
pub struct DiscoveryArgs {
    /// Where the trees are generated (kept and reused by later runs)
    #[arg(long, default_value = "target/bench-trees")]
    pub dir: PathBuf,
    /// Tree sizes in databases, multiples of 1000 (10 projects × 10 databases × 10 branches × N/1000 tenants)
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    pub sizes: Vec<usize>,
    /// Timed runs per figure; the median is reported
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
}

/// This `multidb` binary and the libmultidb built beside it, for benchmarks that start both.
fn built_binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let exe = std::env::current_exe().context("locating the multidb binary")?;
    let extension = exe.with_file_name("libmultidb.so");
    if !extension.exists() {
        bail!(
            "{} is missing: run `cargo build --release`",
            extension.display()
        );
    }
    Ok((exe, extension))
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Runs `program args` to completion with output discarded; returns its wall time and peak RSS.
///
/// Linux charges a child's `ru_maxrss` with the resident size of the process that spawned it
/// (the high-water mark survives `exec`), so the child is started from a small trampoline, this
/// same binary's `bench measure`, whose own footprint is the floor of both figures alike.
fn run_measured(exe: &Path, program: &Path, args: &[&str]) -> anyhow::Result<(Duration, u64)> {
    let out = Command::new(exe)
        .args(["bench", "measure", "--"])
        .arg(program)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .context("spawning the measuring trampoline")?;
    if !out.status.success() {
        bail!("{} {args:?} failed", program.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(ns)), Some(Ok(rss))) => Ok((Duration::from_nanos(ns), rss)),
        _ => bail!("unexpected trampoline output {text:?}"),
    }
}

/// `multidb bench measure -- CMD...`: runs CMD, prints `wall_ns peak_rss_bytes`.
pub fn measure(command: &[String]) -> anyhow::Result<()> {
    let (program, args) = command
        .split_first()
        .context("bench measure needs a command")?;
    let started = Instant::now();
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {program}"))?;
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    let mut status = 0;
    // SAFETY: `rusage` is plain old data, so all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own unwaited child; `status` and `usage` are valid for writes.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = started.elapsed();
    if waited != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{program} failed with status {status}");
    }
    // `ru_maxrss` is in kilobytes on Linux.
    let rss = u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024;
    println!("{} {rss}", elapsed.as_nanos());
    Ok(())
}

/// This process's peak resident set size (VmHWM), if /proc tells.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn discovery(args: &DiscoveryArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the multidb binary")?;
    for &size in &args.sizes {
        if size < 1000 || size % 1000 != 0 {
            bail!("--sizes: {size} is not a positive multiple of 1000");
        }
        let layout = Layout {
            projects: 10,
            databases: 10,
            branches: 10,
            tenants: size / 1000,
        };
        let root = args.dir.join(size.to_string());
        eprintln!("preparing {size} databases under {} ...", root.display());
        let made = generate::generate(&root, &layout, false)?;
        if made.created > 0 {
            eprintln!(
                "  created {} files in {:.1} s",
                made.created,
                made.elapsed.as_secs_f64()
            );
        }
        bench_one(&exe, &root, size, args.runs)?;
    }
    Ok(())
}

fn bench_one(exe: &Path, root: &Path, size: usize, runs: usize) -> anyhow::Result<()> {
    let root = root.canonicalize()?;
    let pattern_text = generate::pattern_for(&root);
    let pattern = Pattern::new(&pattern_text)?;
    let find_args = [
        root.to_str().context("tree path is not UTF-8")?,
        "-name",
        "*.db",
    ];
    let find = || run_measured(exe, Path::new("find"), &find_args);
    let multidb = || {
        run_measured(
            exe,
            exe,
            &["databases", "--count", "--pattern", &pattern_text],
        )
    };
    // Warm the cache and check both see the same tree.
    let mut arena = Arena::new(pattern.root());
    discovery::scan(&pattern, &mut arena)?;
    if arena.len() != size {
        bail!(
            "discovered {} databases under {}, expected {size}",
            arena.len(),
            root.display()
        );
    }
    find()?;

    let mut scan_times = Vec::new();
    let mut rescan_times = Vec::new();
    let mut find_times = Vec::new();
    let mut find_rss = 0;
    let mut cli_times = Vec::new();
    let mut cli_rss = 0;
    let mut bytes = 0;
    for _ in 0..runs {
        let mut arena = Arena::new(pattern.root());
        let report = discovery::scan(&pattern, &mut arena)?;
        scan_times.push(report.elapsed);
        bytes = arena.heap_bytes();
        rescan_times.push(discovery::scan(&pattern, &mut arena)?.elapsed);
        drop(arena);
        let (t, rss) = find()?;
        find_times.push(t);
        find_rss = find_rss.max(rss);
        let (t, rss) = multidb()?;
        cli_times.push(t);
        cli_rss = cli_rss.max(rss);
    }
    let (scan, rescan, find_t, cli) = (
        median(scan_times),
        median(rescan_times),
        median(find_times),
        median(cli_times),
    );
    let per_db = bytes as f64 / size as f64;
    println!("discovery: {size} databases (10 projects x 10 databases x 10 branches x {} tenants, tenant names unique), warm cache, median of {runs}", size / 1000);
    println!("  multidb discovery, in-process       {:>10}", ms(scan));
    println!("  multidb rescan (no change)          {:>10}", ms(rescan));
    println!("  `multidb databases --count` process {:>10}", ms(cli));
    println!("  baseline `find ROOT -name '*.db'`   {:>10}", ms(find_t));
    println!(
        "  discovery / find                    {:>10.2}x",
        scan.as_secs_f64() / find_t.as_secs_f64()
    );
    println!("  arena                               {bytes:>10} B = {per_db:.1} B per database");
    println!(
        "  peak RSS `multidb databases --count` {:>9.1} MB  (find: {:.1} MB)",
        cli_rss as f64 / 1048576.0,
        find_rss as f64 / 1048576.0
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct CommitArgs {
    /// Commits per run (one small INSERT each, autocommit, WAL, synchronous=NORMAL)
    #[arg(long, default_value_t = 20_000)]
    pub commits: usize,
    /// Timed runs per configuration; the median is reported
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// The libmultidb library to load [default: next to this binary]
    #[arg(long)]
    pub extension: Option<PathBuf>,
    /// Commits counted under callgrind and strace (0 skips the counts)
    #[arg(long, default_value_t = 5_000)]
    pub count_commits: usize,
    /// Keep callgrind's profiles here (`callgrind.plain.out`, `callgrind.hooked.out`) for `callgrind_annotate`
    #[arg(long)]
    pub callgrind_out: Option<PathBuf>,
}

fn commit_run(conn: &rusqlite::Connection, commits: usize) -> anyhow::Result<Duration> {
    conn.execute_batch("DELETE FROM t; PRAGMA wal_checkpoint(TRUNCATE);")?;
    let mut insert = conn.prepare("INSERT INTO t(v) VALUES (?1)")?;
    let started = Instant::now();
    for i in 0..commits {
        insert.execute([i as i64])?;
    }
    Ok(started.elapsed())
}

fn open_bench_db(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v INTEGER);",
    )?;
    Ok(conn)
}

fn per_commit_us(d: Duration, commits: usize) -> f64 {
    d.as_secs_f64() * 1e6 / commits as f64
}

/// `multidb bench commit`: the cost of libmultidb to an application's commits, beside plain
/// SQLite in the same process, and the delay from commit to the agent reading its record.
pub fn commit(args: &CommitArgs) -> anyhow::Result<()> {
    use multidb::ring::Record;
    if args.runs == 0 || args.commits == 0 {
        bail!("--runs and --commits must be at least 1");
    }
    let extension = match &args.extension {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("libmultidb"),
    };
    let tmp = tempfile_dir()?;
    let ring_path = tmp.join("bench.ring");
    // Set before the extension is loaded and before any thread starts.
    // SAFETY: single-threaded here; nothing else reads the environment concurrently.
    unsafe { std::env::set_var(multidb::ring::ENV_PATH, &ring_path) };

    let plain = open_bench_db(&tmp.join("plain.db"))?;
    let baseline: Vec<Duration> = (0..args.runs)
        .map(|_| commit_run(&plain, args.commits))
        .collect::<Result<_, _>>()?;
    drop(plain);

    let hooked = open_bench_db(&tmp.join("hooked.db"))?;
    // SAFETY: loading our own extension.
    unsafe {
        hooked.load_extension_enable()?;
        hooked
            .load_extension(&extension, None::<&str>)
            .with_context(|| format!("loading {}", extension.display()))?;
        hooked.load_extension_disable()?;
    }
    let no_agent: Vec<Duration> = (0..args.runs)
        .map(|_| commit_run(&hooked, args.commits))
        .collect::<Result<_, _>>()?;

    let ring_file = crate::agent::ring::RingFile::create_or_open(
        &ring_path,
        multidb::ring::DEFAULT_SLOTS,
        1024,
    )?;
    let ring = ring_file.ring();
    ring.heartbeat(std::process::id(), multidb::ring::now_ns());
    // The extension looks for a ring at most every 2 s.
    std::thread::sleep(Duration::from_millis(2100));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (with_agent, mut delays) =
        std::thread::scope(|scope| -> anyhow::Result<(Vec<Duration>, Vec<u64>)> {
            let reader = scope.spawn(|| {
                let mut delays = Vec::new();
                crate::agent::ring::read_loop(
                    ring,
                    |_, _| stop.load(std::sync::atomic::Ordering::Relaxed),
                    |record| {
                        if let Record::Commit(c) = record {
                            delays.push(multidb::ring::now_ns().saturating_sub(c.time_ns));
                        }
                    },
                );
                delays
            });
            let runs: Result<Vec<Duration>, _> = (0..args.runs)
                .map(|_| commit_run(&hooked, args.commits))
                .collect();
            // Sporadic commits: the reader is asleep on the futex for each, the latency users see.
            for _ in 0..200 {
                std::thread::sleep(Duration::from_millis(2));
                hooked.execute("INSERT INTO t(v) VALUES (0)", [])?;
            }
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let delays = reader
                .join()
                .map_err(|_| anyhow::anyhow!("reader panicked"))?;
            Ok((runs?, delays))
        })?;
    let stats = ring.stats();
    let mut sporadic: Vec<u64> = delays.split_off(delays.len().saturating_sub(200));
    let (b, n, a) = (median(baseline), median(no_agent), median(with_agent));
    let pct = |x: Duration| (x.as_secs_f64() / b.as_secs_f64() - 1.0) * 100.0;
    let quantile = |v: &mut Vec<u64>, q: f64| -> f64 {
        v.sort_unstable();
        v.get(((v.len() as f64 - 1.0) * q) as usize)
            .map_or(0.0, |&ns| ns as f64 / 1000.0)
    };
    println!(
        "commit cost: {} autocommit INSERTs per run, WAL, synchronous=NORMAL, median of {}",
        args.commits, args.runs
    );
    println!(
        "  baseline: plain SQLite (no extension)       {:>8.2} us/commit",
        per_commit_us(b, args.commits)
    );
    println!(
        "  libmultidb loaded, no agent                 {:>8.2} us/commit ({:+.1}%)",
        per_commit_us(n, args.commits),
        pct(n)
    );
    println!(
        "  libmultidb loaded, agent reading the ring   {:>8.2} us/commit ({:+.1}%)",
        per_commit_us(a, args.commits),
        pct(a)
    );
    println!(
        "  ring: {} records read, {} dropped",
        stats.tail, stats.dropped
    );
    println!(
        "  commit -> agent read, sporadic commits (agent asleep): p50 {:.0} us, p99 {:.0} us",
        quantile(&mut sporadic, 0.5),
        quantile(&mut sporadic, 0.99)
    );
    if args.count_commits > 0 {
        // Databases on tmpfs, as applications' tests and the figures have them: the
        // counts are then SQLite's and the extension's, not the file system's.
        let shm = Path::new("/dev/shm");
        let count_dir = if shm.is_dir() {
            shm.join(format!("multidb-bench-{}", std::process::id()))
        } else {
            tmp.join("count")
        };
        std::fs::create_dir_all(&count_dir)?;
        let exe = std::env::current_exe()?;
        let profiles = args.callgrind_out.as_deref().unwrap_or(&count_dir);
        std::fs::create_dir_all(profiles)
            .with_context(|| format!("creating {}", profiles.display()))?;
        let counted = instructions::report(
            &exe,
            &extension,
            &count_dir,
            profiles,
            ring,
            args.count_commits,
        );
        let _ = std::fs::remove_dir_all(&count_dir);
        counted?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("multidb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
