//! `multidb bench discovery`: figures for the cold side, each beside a baseline measured in the
//! same run on the same tree (`find ROOT -name '*.db'`). Benchmarks print; they never fail on a
//! number.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::arena::Arena;
use crate::discovery;
use crate::generate::{self, Layout};
use crate::pattern::Pattern;

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
