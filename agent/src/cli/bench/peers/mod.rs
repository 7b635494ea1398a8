//! `multidb bench peers`: Litestream and the multidb agent on the same tree of real WAL
//! databases, each replicating to a directory, one after the other in the same run. For each
//! tool: start-up time, memory, descriptors, threads, CPU, files written and directory
//! listings while idle, and the delay from a commit to a new file in the replica. A tool that
//! fails to start is a row that says so; every phase has a timeout.
mod measure;
mod tools;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use super::agent::mb;
use crate::cli::generate::{self, Layout};
use measure::{files_under, Figures};
use tools::{litestream, multidb};

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
