//! `multidb bench replicate`: how fast commits reach a replica, how fast changed pages
//! stream, how a restore compares with `cp`, and what an unwritten database costs in S3
//! requests. Each figure is printed beside its baseline from the same run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::median;
use crate::replica::ReplicaUrl;
use crate::replicate::{self, RunOptions, Synced};

#[derive(Debug, clap::Args)]
pub struct ReplicateArgs {
    /// Replica URL to measure [default: a directory under the work directory]; an s3:// URL
    /// takes credentials from the environment
    #[arg(long)]
    pub url: Option<String>,
    /// Work directory for databases and the default replica
    #[arg(long, default_value = "target/bench-replicate")]
    pub dir: PathBuf,
    /// Sporadic commits for the latency figure
    #[arg(long, default_value_t = 200)]
    pub commits: usize,
    /// Changed data in the throughput transaction, MiB
    #[arg(long, default_value_t = 256)]
    pub throughput_mb: usize,
    /// Size of the restored database, MiB (0 skips the restore figure)
    #[arg(long, default_value_t = 1024)]
    pub restore_mb: usize,
    /// Seconds the idle database is watched for replica requests
    #[arg(long, default_value_t = 5)]
    pub idle_secs: u64,
}

pub(super) fn fresh(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    Ok(path)
}

fn replica_url(args: &ReplicateArgs, name: &str) -> anyhow::Result<String> {
    replica_url_in(args.url.as_deref(), &args.dir, name)
}

/// A replica for one figure: below `url` when given, else a directory in `dir`.
pub(super) fn replica_url_in(url: Option<&str>, dir: &Path, name: &str) -> anyhow::Result<String> {
    Ok(match url {
        Some(url) if url.starts_with("s3://") => {
            let (base, query) = url.split_once('?').unwrap_or((url, ""));
            let run = std::process::id();
            format!(
                "{}/{name}-{run}{}{query}",
                base.trim_end_matches('/'),
                if query.is_empty() { "" } else { "?" }
            )
        }
        Some(url) => format!(
            "{}/{name}-{}",
            url.trim_end_matches('/'),
            std::process::id()
        ),
        None => {
            let dir = std::fs::canonicalize(dir)?.join(format!("replica-{name}"));
            let _ = std::fs::remove_dir_all(&dir);
            format!("file://{}", dir.display())
        }
    })
}

/// When each commit finished and the WAL offset it ended at.
type Commits = Vec<(Instant, u64)>;

pub(super) fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or_default()
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(super) fn open_writer(db: &Path) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(db)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB);",
    )?;
    Ok(conn)
}

pub fn replicate(args: &ReplicateArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let tmp = args.dir.join("tmp");
    let target = args.url.as_deref().unwrap_or("a local directory");
    println!("replication benchmark against {target}");
    latency(args, &tmp)?;
    if args.throughput_mb > 0 {
        throughput(args, &tmp)?;
    }
    if args.restore_mb > 0 {
        restore_vs_cp(args, &tmp)?;
    }
    Ok(())
}

/// Sporadic commits (one every ~20 ms) while the replication loop runs: the time from each
/// commit to the end of the upload that carries it.
fn latency(args: &ReplicateArgs, tmp: &Path) -> anyhow::Result<()> {
    let db = fresh(&args.dir, "latency.db")?;
    let writer = open_writer(&db)?;
    let url = replica_url(args, "latency")?;
    let replica = ReplicaUrl::parse(&url)?.client()?;
    let stop = AtomicBool::new(false);
    let synced: Mutex<Vec<(Instant, u64)>> = Mutex::new(Vec::new());
    let options = RunOptions {
        once: false,
        poll: Duration::from_millis(10),
        max_backoff: Duration::from_secs(1),
        litestream_compatible: false,
        previous_lease: crate::replica::lease::Previous::None,
    };
    let (commits, idle_requests) =
        std::thread::scope(|scope| -> anyhow::Result<(Commits, Option<u64>)> {
            let loop_thread = scope.spawn(|| {
                replicate::run_with(
                    &db,
                    replica,
                    tmp,
                    None,
                    options,
                    &|| stop.load(Ordering::Relaxed),
                    &mut |s: &Synced| {
                        synced
                            .lock()
                            .expect("lock")
                            .push((Instant::now(), s.wal_offset));
                    },
                )
            });
            // Let the first snapshot land.
            let started = Instant::now();
            while synced.lock().expect("lock").is_empty()
                && started.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            let wal = db.with_extension("db-wal");
            let mut commits = Vec::new();
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            for i in 0..args.commits {
                writer.execute("INSERT INTO t(v) VALUES (randomblob(200))", [])?;
                let end = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                commits.push((Instant::now(), end));
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let _ = i;
                std::thread::sleep(Duration::from_millis(10 + seed % 20));
            }
            std::thread::sleep(Duration::from_millis(500));
            let idle = if url.starts_with("s3://") {
                let before = crate::replica::s3::REQUESTS.load(Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(args.idle_secs));
                Some(crate::replica::s3::REQUESTS.load(Ordering::Relaxed) - before)
            } else {
                None
            };
            stop.store(true, Ordering::Relaxed);
            loop_thread
                .join()
                .map_err(|_| anyhow::anyhow!("replication loop panicked"))??;
            Ok((commits, idle))
        })?;
    let synced = synced.into_inner().expect("lock");
    let mut delays: Vec<Duration> = Vec::new();
    for (at, end) in &commits {
        let durable = synced
            .iter()
            .find(|(t, offset)| t >= at && offset >= end)
            .map(|(t, _)| *t);
        match durable {
            Some(t) => delays.push(t - *at),
            None => bail!("a commit never reached the replica"),
        }
    }
    delays.sort_unstable();
    println!(
        "  commit -> durable in replica, {} sporadic commits: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (poll interval 10 ms; Litestream syncs every 1 s)",
        delays.len(),
        ms(quantile(&delays, 0.5)),
        ms(quantile(&delays, 0.99)),
        ms(*delays.last().unwrap_or(&Duration::ZERO))
    );
    if let Some(n) = idle_requests {
        println!(
            "  S3 requests while the database was not written for {} s: {n}",
            args.idle_secs
        );
    }
    Ok(())
}

/// One transaction changing `throughput_mb` of pages, replicated in one sync, beside a plain
/// copy of the same WAL.
fn throughput(args: &ReplicateArgs, tmp: &Path) -> anyhow::Result<()> {
    let db = fresh(&args.dir, "throughput.db")?;
    let writer = open_writer(&db)?;
    let url = replica_url(args, "throughput")?;
    let mut replicator = replicate::Replicator::open(&db, ReplicaUrl::parse(&url)?.client()?, tmp)?;
    replicator.sync()?;
    let rows = args.throughput_mb * 256; // one 3000-byte row fills about one 4 KiB page
    writer.execute_batch(&format!(
        "BEGIN; INSERT INTO t(v) SELECT randomblob(3000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) SELECT x FROM c); COMMIT;"
    ))?;
    let started = Instant::now();
    let synced = replicator
        .sync()?
        .context("the transaction produced no file")?;
    let took = started.elapsed();
    let changed = synced.pages as f64 * 4096.0 / 1048576.0;
    let wal = db.with_extension("db-wal");
    let copy = args.dir.join("wal-copy");
    let started = Instant::now();
    std::fs::copy(&wal, &copy)?;
    let cp = started.elapsed();
    let wal_mb = std::fs::metadata(&wal)?.len() as f64 / 1048576.0;
    let _ = std::fs::remove_file(&copy);
    println!(
        "  changed-page throughput: {changed:.0} MiB in one transaction synced in {:.0} ms = {:.0} MiB/s (LTX {:.0} MiB); baseline copy of the {wal_mb:.0} MiB WAL: {:.0} ms = {:.0} MiB/s",
        ms(took),
        changed / took.as_secs_f64(),
        synced.bytes as f64 / 1048576.0,
        ms(cp),
        wal_mb / cp.as_secs_f64()
    );
    Ok(())
}

/// Restores and copies timed for the restore figure. Single restores of 1 GiB on a shared
/// 2-core machine ranged from 0.5 to 0.9 s; a median of five outlasts two outliers, one of
/// three only one.
const RESTORE_ROUNDS: usize = 5;

/// A `restore_mb` database replicated as one snapshot, restored, beside `cp` of the file.
fn restore_vs_cp(args: &ReplicateArgs, tmp: &Path) -> anyhow::Result<()> {
    let db = fresh(&args.dir, "restore.db")?;
    let writer = open_writer(&db)?;
    let rows = args.restore_mb * 256;
    writer.execute_batch(&format!(
        "BEGIN; INSERT INTO t(v) SELECT randomblob(3000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) SELECT x FROM c); COMMIT; PRAGMA wal_checkpoint(TRUNCATE);"
    ))?;
    drop(writer);
    let url = replica_url(args, "restore")?;
    let replica = ReplicaUrl::parse(&url)?;
    let mut replicator = replicate::Replicator::open(&db, replica.client()?, tmp)?;
    replicator.sync()?;
    drop(replicator);
    let size_mb = std::fs::metadata(&db)?.len() as f64 / 1048576.0;
    let mut restore_times = Vec::new();
    let mut cp_times = Vec::new();
    let mut durable_cp_times = Vec::new();
    for round in 0..RESTORE_ROUNDS {
        let out = fresh(&args.dir, &format!("restored-{round}.db"))?;
        let started = Instant::now();
        crate::replicate::restore::restore(
            replica.client()?.as_ref(),
            crate::replicate::restore::Target::Latest,
            &out,
            false,
        )?;
        restore_times.push(started.elapsed());
        let _ = std::fs::remove_file(&out);
        let copy = fresh(&args.dir, &format!("copied-{round}.db"))?;
        let started = Instant::now();
        if !std::process::Command::new("cp")
            .arg(&db)
            .arg(&copy)
            .status()?
            .success()
        {
            bail!("cp failed");
        }
        cp_times.push(started.elapsed());
        // The restore ends with its file on disk; so does this copy (coreutils `sync FILE`).
        if !std::process::Command::new("sync")
            .arg(&copy)
            .status()?
            .success()
        {
            bail!("sync failed");
        }
        durable_cp_times.push(started.elapsed());
        let _ = std::fs::remove_file(&copy);
    }
    let (r, c, d) = (
        median(restore_times),
        median(cp_times),
        median(durable_cp_times),
    );
    println!(
        "  restore of a {size_mb:.0} MiB database (median of {RESTORE_ROUNDS}, checksums and integrity_check included): {:.0} ms; baseline `cp`: {:.0} ms (ratio {:.2}x); `cp` + fsync of the copy: {:.0} ms (ratio {:.2}x)",
        ms(r),
        ms(c),
        r.as_secs_f64() / c.as_secs_f64(),
        ms(d),
        r.as_secs_f64() / d.as_secs_f64()
    );
    Ok(())
}
