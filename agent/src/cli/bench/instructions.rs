//! The instruction and system-call count of libmultidb per commit, for `multidb bench commit`.
//!
//! Wall time on a shared 2-core machine varies by ±20%, far more than the extension costs, so
//! the cost is counted: the same commit loop runs in a child process under
//! `valgrind --tool=callgrind`, once on plain SQLite and once with libmultidb loaded, while this
//! process reads the ring as the agent would. Collection is switched on only inside the loop
//! function (`--toggle-collect`), so process start-up and loading the extension are not
//! counted; the difference of the two totals over the commit count is the extension's cost.
//! `strace -f -c` counts the system calls of the same two children at two commit counts, so
//! the per-commit figure excludes what happens once per process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};

use multidb::ring::Ring;

/// The child's loop; `--toggle-collect` names it, so it keeps this unmangled name.
const LOOP_SYMBOL: &str = "multidb_bench_commit_loop";
/// Commits before the counted loop: the extension's first commit on a connection installs the
/// hook, looks the file up and registers its path, which happens once per connection.
const WARMUP_COMMITS: usize = 100;

#[derive(Debug, clap::Args)]
pub struct CommitChildArgs {
    /// The database to create (WAL) and commit into
    #[arg(long)]
    pub db: PathBuf,
    /// Commits in the counted loop
    #[arg(long)]
    pub commits: usize,
    /// The libmultidb library to load; without it, plain SQLite
    #[arg(long)]
    pub extension: Option<PathBuf>,
}

/// The counted loop: one autocommit INSERT per iteration.
#[no_mangle]
#[inline(never)]
pub fn multidb_bench_commit_loop(insert: &mut rusqlite::Statement<'_>, commits: usize) -> usize {
    let mut done = 0;
    for i in 0..commits {
        if insert.execute([i as i64]).is_ok() {
            done += 1;
        }
    }
    done
}

/// `multidb bench commit-child`: the process callgrind and strace watch.
pub fn child(args: &CommitChildArgs) -> anyhow::Result<()> {
    let conn = super::open_bench_db(&args.db)?;
    if let Some(extension) = &args.extension {
        // SAFETY: loading our own extension.
        unsafe {
            conn.load_extension_enable()?;
            conn.load_extension(extension, None::<&str>)
                .with_context(|| format!("loading {}", extension.display()))?;
            conn.load_extension_disable()?;
        }
    }
    let mut insert = conn.prepare("INSERT INTO t(v) VALUES (?1)")?;
    multidb_bench_commit_loop(&mut insert, WARMUP_COMMITS);
    let done = multidb_bench_commit_loop(&mut insert, args.commits);
    if done != args.commits {
        bail!("{} of {} commits failed", args.commits - done, args.commits);
    }
    Ok(())
}

/// Whether `program --version` runs.
fn available(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The child's command line after `exe`, on a fresh database at `db`.
fn child_args(db: &Path, commits: usize, extension: Option<&Path>) -> Vec<String> {
    let _ = std::fs::remove_file(db);
    for suffix in ["-wal", "-shm"] {
        let mut sidecar = db.as_os_str().to_owned();
        sidecar.push(suffix);
        let _ = std::fs::remove_file(sidecar);
    }
    let mut args = vec![
        "bench".to_string(),
        "commit-child".to_string(),
        "--db".to_string(),
        db.to_string_lossy().into_owned(),
        "--commits".to_string(),
        commits.to_string(),
    ];
    if let Some(e) = extension {
        args.push("--extension".to_string());
        args.push(e.to_string_lossy().into_owned());
    }
    args
}

fn run_quiet(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Instructions callgrind counted inside the loop of one child run.
fn callgrind_total(
    exe: &Path,
    dir: &Path,
    profiles: &Path,
    name: &str,
    commits: usize,
    extension: Option<&Path>,
) -> anyhow::Result<u64> {
    let out = profiles.join(format!("callgrind.{name}.out"));
    let db = dir.join(format!("{name}.db"));
    run_quiet(
        Command::new("valgrind")
            .arg("--tool=callgrind")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(format!("--toggle-collect={LOOP_SYMBOL}"))
            .arg(exe)
            .args(child_args(&db, commits, extension)),
        "valgrind --tool=callgrind",
    )?;
    let text =
        std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no totals in {}", out.display()))
}

/// System calls by name of one child run under `strace -f -c`.
fn strace_counts(
    exe: &Path,
    dir: &Path,
    commits: usize,
    extension: Option<&Path>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let out = dir.join("strace.out");
    run_quiet(
        Command::new("strace")
            .args(["-f", "-c", "-o"])
            .arg(&out)
            .arg(exe)
            .args(child_args(&dir.join("strace.db"), commits, extension)),
        "strace -f -c",
    )?;
    let text =
        std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    Ok(parse_strace_summary(&text))
}

/// The `calls` column of `strace -c`'s table by syscall name (errors may be blank, so the
/// count is the fourth field and the name the last).
fn parse_strace_summary(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = *fields.last()?;
            let calls = fields.get(3)?.parse().ok()?;
            (fields.len() >= 5 && name != "total").then(|| (name.to_string(), calls))
        })
        .collect()
}

/// Prints the callgrind and strace figures; a missing tool is said, not an error.
pub fn report(
    exe: &Path,
    extension: &Path,
    dir: &Path,
    profiles: &Path,
    ring: Ring<'_>,
    commits: usize,
) -> anyhow::Result<()> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            crate::agent::ring::read_loop(ring, |_, _| stop.load(Ordering::Relaxed), |_| {})
        });
        let result = counts(exe, extension, dir, profiles, commits);
        stop.store(true, Ordering::Relaxed);
        result
    })
}

fn counts(
    exe: &Path,
    extension: &Path,
    dir: &Path,
    profiles: &Path,
    commits: usize,
) -> anyhow::Result<()> {
    println!(
        "instructions per commit (callgrind, {commits} autocommit INSERTs after {WARMUP_COMMITS} warm-up, ring read by this process, counted inside the loop only):"
    );
    if available("valgrind") {
        let plain = callgrind_total(exe, dir, profiles, "plain", commits, None)?;
        let hooked = callgrind_total(exe, dir, profiles, "hooked", commits, Some(extension))?;
        let per = |total: u64| total as f64 / commits as f64;
        println!(
            "  baseline: plain SQLite                 {plain:>14} Ir = {:>9.0} per commit",
            per(plain)
        );
        println!(
            "  libmultidb loaded, ring read           {hooked:>14} Ir = {:>9.0} per commit",
            per(hooked)
        );
        println!(
            "  libmultidb's cost                      {:>+9.0} instructions per commit ({:+.1}%)",
            per(hooked) - per(plain),
            (hooked as f64 / plain as f64 - 1.0) * 100.0
        );
    } else {
        println!("  n/a: valgrind is not installed (apt-get install valgrind)");
    }
    println!("system calls per commit (strace -f -c; runs of {commits} and {} commits, the difference over {commits}):", 2 * commits);
    if !available("strace") {
        println!("  n/a: strace is not installed (apt-get install strace)");
        return Ok(());
    }
    let mut rows = Vec::new();
    for extension in [None, Some(extension)] {
        let one = strace_counts(exe, dir, commits, extension)?;
        let two = strace_counts(exe, dir, 2 * commits, extension)?;
        rows.push((one, two));
    }
    let per_commit = |(one, two): &(BTreeMap<String, u64>, BTreeMap<String, u64>)| {
        let extra: u64 = two.values().sum::<u64>().saturating_sub(one.values().sum());
        extra as f64 / commits as f64
    };
    let (plain, hooked) = (&rows[0], &rows[1]);
    println!(
        "  baseline: plain SQLite                 {:>6.2} per commit",
        per_commit(plain)
    );
    println!(
        "  libmultidb loaded, ring read           {:>6.2} per commit",
        per_commit(hooked)
    );
    let mut differences = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        plain.1.keys().chain(hooked.1.keys()).collect();
    for name in names {
        let get = |m: &BTreeMap<String, u64>| m.get(name).copied().unwrap_or(0);
        let (p, h) = (get(&plain.1), get(&hooked.1));
        if p != h {
            differences.push(format!("{name} {:+}", h as i64 - p as i64));
        }
    }
    println!(
        "  libmultidb minus plain over the {}-commit run: {}",
        2 * commits,
        if differences.is_empty() {
            "none".to_string()
        } else {
            differences.join(", ")
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strace_summary_rows_are_read_with_and_without_errors() {
        let text = "% time     seconds  usecs/call     calls    errors syscall\n\
------ ----------- ----------- --------- --------- ----------------\n \
 40.00    0.000040           4        10           pwrite64\n \
 30.00    0.000030           3         7         2 openat\n\
------ ----------- ----------- --------- --------- ----------------\n\
100.00    0.000070           4        17         2 total\n";
        let counts = parse_strace_summary(text);
        assert_eq!(counts.get("pwrite64"), Some(&10));
        assert_eq!(counts.get("openat"), Some(&7));
        assert_eq!(counts.len(), 2);
    }
}
