//! `multidb bench nonext-lag`: how soon a commit by an application that did not load
//! libmultidb reaches the replica, with inotify on the leaf directories beside the scan-only
//! baseline (`watch: false`, the seed's `scan_interval: 30s`), in the same run on the same
//! tree. Each commit goes to a cold database through a plain SQLite connection that is
//! closed right after (so SQLite checkpoints and deletes the `-wal`, as the `sqlite3` shell
//! does). Also the agent's memory after discovery in both modes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::agent::{bench_tree, rss, AgentProcess};
use crate::cli::generate;

#[derive(Debug, clap::Args)]
pub struct NonextArgs {
    /// Where the tree, replicas and state go (the tree is kept and reused; tmpfs is fastest)
    #[arg(long, default_value = "target/bench-nonext")]
    pub dir: PathBuf,
    /// Databases discovered, a multiple of 1000
    #[arg(long, default_value_t = 100_000)]
    pub databases: usize,
    /// Commits per mode, each to a different cold database
    #[arg(long, default_value_t = 200)]
    pub commits: usize,
    /// Commits per second
    #[arg(long, default_value_t = 20)]
    pub rate: u64,
    /// The scan interval of both modes (the seed's)
    #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
    pub scan_interval: Duration,
}

/// How often pending replicas are looked at: the resolution of every figure.
const POLL: Duration = Duration::from_millis(1);

/// One mode's figures.
struct Figures {
    lags: Vec<Duration>,
    missing: usize,
    rss_after_discovery: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
}

/// Whether the replica directory of a database holds an LTX file yet.
fn has_ltx(dir: &Path) -> bool {
    let Ok(levels) = std::fs::read_dir(dir.join("ltx")) else {
        return false;
    };
    levels.flatten().any(|level| {
        std::fs::read_dir(level.path()).is_ok_and(|files| {
            files
                .flatten()
                .any(|f| f.file_name().to_string_lossy().ends_with(".ltx"))
        })
    })
}

/// Makes `db` (an empty file from `generate`) a WAL database with a table.
fn prepare(db: &Path) -> anyhow::Result<()> {
    let conn = rusqlite::Connection::open(db)?;
    conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(x);")?;
    Ok(())
}

fn run_mode(
    exe: &Path,
    dir: &Path,
    tree: &Path,
    args: &NonextArgs,
    watch: bool,
    dbs: &[(PathBuf, PathBuf)],
) -> anyhow::Result<Figures> {
    let mode = if watch { "watch" } else { "scan" };
    let work = dir.join(mode);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let config = work.join("multidb.yml");
    std::fs::write(
        &config,
        format!(
            "multi_db:\n  discovery_pattern: \"{}\"\n  max_active: {}\n  scan_interval: {}ms\n  sync_interval: 1s\n  idle_timeout: 10m\n  watch: {watch}\n  state_dir: \"{}\"\n  replica_template:\n    type: file\n    path: \"{}/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"\n",
            generate::pattern_for(tree),
            args.commits.max(1),
            args.scan_interval.as_millis(),
            work.join("state").display(),
            work.join("replica").display()
        ),
    )?;
    let agent = AgentProcess {
        child: Command::new(exe)
            .arg("--config")
            .arg(&config)
            .arg("agent")
            .env("MULTIDB_RING", work.join("ring"))
            .env("MULTIDB_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("agent.log"))?)
            .spawn()
            .context("starting the agent")?,
        exe: exe.to_path_buf(),
        config: config.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let discovered = agent
            .status()
            .and_then(|s| s["tiers"]["discovered"].as_u64())
            .unwrap_or(0);
        if discovered as usize == args.databases {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not discover the tree; see {}",
                work.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (rss_after_discovery, _) = rss(agent.pid());

    // The poller: the first time each database's replica holds an LTX file.
    let replica_root = work.join("replica");
    let pending: Arc<Mutex<Vec<(usize, Instant, PathBuf)>>> = Arc::default();
    let arrived: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (pending, arrived, done) = (pending.clone(), arrived.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let now_pending: Vec<(usize, Instant, PathBuf)> =
                    pending.lock().expect("poller lock").clone();
                for (i, committed, replica) in now_pending {
                    if has_ltx(&replica) {
                        let lag = committed.elapsed();
                        arrived.lock().expect("poller lock").push(lag);
                        pending.lock().expect("poller lock").retain(|p| p.0 != i);
                    }
                }
                std::thread::sleep(POLL);
            }
        })
    };
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let started = Instant::now();
    for (i, (db, rel)) in dbs.iter().enumerate() {
        let at = started + interval * i as u32;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        {
            let conn = rusqlite::Connection::open(db)?;
            conn.execute("INSERT INTO t VALUES (?1)", [i as i64])?;
        }
        let committed = Instant::now();
        pending
            .lock()
            .expect("poller lock")
            .push((i, committed, replica_root.join(rel)));
    }
    let wait_until = Instant::now() + args.scan_interval * 2 + Duration::from_secs(10);
    while !pending.lock().expect("poller lock").is_empty() && Instant::now() < wait_until {
        std::thread::sleep(Duration::from_millis(20));
    }
    done.store(true, Ordering::Relaxed);
    let _ = poller.join();
    let missing = pending.lock().expect("poller lock").len();
    let mut lags = arrived.lock().expect("poller lock").clone();
    lags.sort_unstable();
    drop(agent);
    Ok(Figures {
        lags,
        missing,
        rss_after_discovery,
    })
}

fn collect_databases(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_databases(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "db") {
            out.push(path);
        }
    }
    Ok(())
}

pub fn nonext(args: &NonextArgs) -> anyhow::Result<()> {
    if args.databases < 1000 || args.databases % 1000 != 0 {
        bail!("--databases must be a positive multiple of 1000");
    }
    if args.commits == 0 || 2 * args.commits > args.databases {
        bail!("--commits must be 1 to half of --databases");
    }
    let exe = std::env::current_exe().context("locating the multidb binary")?;
    let (dir, tree, layout) = bench_tree(&args.dir, args.databases)?;
    let mut all = Vec::new();
    collect_databases(&tree, &mut all)?;
    all.sort();
    if all.len() != args.databases {
        bail!(
            "{} holds {} databases, expected {}; remove it to regenerate",
            tree.display(),
            all.len(),
            args.databases
        );
    }
    // Evenly spread samples, a different set per mode, each made a WAL database beforehand
    // (the agent starts afterwards, so they are cold and not caught up at its start).
    let step = args.databases / (2 * args.commits);
    let sample = |offset: usize| -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
        (0..args.commits)
            .map(|i| {
                let db = all[(2 * i + offset) * step].clone();
                prepare(&db).with_context(|| format!("preparing {}", db.display()))?;
                // project/databases/db/branches/branch/tenants/tenant.db → the template's path.
                let rel = db.strip_prefix(&tree)?.to_string_lossy().to_string();
                let parts: Vec<&str> = rel.split('/').collect();
                let replica = PathBuf::from(parts[0])
                    .join(parts[2])
                    .join(parts[4])
                    .join(parts[6].trim_end_matches(".db"));
                Ok((db, replica))
            })
            .collect()
    };
    let (watched_dbs, scanned_dbs) = (sample(0)?, sample(1)?);
    eprintln!("inotify run ...");
    let watched = run_mode(&exe, &dir, &tree, args, true, &watched_dbs)?;
    eprintln!("scan-only run ...");
    let scanned = run_mode(&exe, &dir, &tree, args, false, &scanned_dbs)?;

    println!(
        "non-extension commits: {} databases discovered ({} leaf directories), {} commits at {}/s by plain SQLite without libmultidb, each to a cold database, connection closed after each; commit -> first LTX file in the replica (polled every {} ms)",
        args.databases,
        args.databases / layout.tenants,
        args.commits,
        args.rate,
        POLL.as_millis()
    );
    println!(
        "  {:<44} {:>10} {:>10} {:>10} {:>9}",
        "", "p50", "p99", "max", "arrived"
    );
    for (name, f) in [
        ("inotify (watch: true)".to_string(), &watched),
        (
            format!(
                "baseline: scans only (watch: false, scan {} s)",
                args.scan_interval.as_secs()
            ),
            &scanned,
        ),
    ] {
        println!(
            "  {:<44} {:>10} {:>10} {:>10} {:>5}/{}",
            name,
            ms(percentile(&f.lags, 0.5)),
            ms(percentile(&f.lags, 0.99)),
            ms(f.lags.last().copied()),
            f.lags.len(),
            f.lags.len() + f.missing
        );
    }
    if let (Some(w), Some(s)) = (
        percentile(&watched.lags, 0.5),
        percentile(&scanned.lags, 0.5),
    ) {
        println!(
            "  p50 scans only / inotify                   {:>9.0}x",
            s.as_secs_f64() / w.as_secs_f64().max(1e-9)
        );
    }
    let extra = watched.rss_after_discovery as f64 - scanned.rss_after_discovery as f64;
    println!(
        "  agent RSS after discovery: {:.1} MB with watches, {:.1} MB scans only: {:+.1} B per database (kernel memory for the watches is not in RSS)",
        watched.rss_after_discovery as f64 / 1048576.0,
        scanned.rss_after_discovery as f64 / 1048576.0,
        extra / args.databases as f64
    );
    Ok(())
}
