//! `multidb bench follow`: the time from a commit in a replicated database until a reader of
//! `restore --follow`'s output sees it, beside the poll interval and, as the baseline from
//! the same run, the time until the commit was in the replica. Issue 11's goal: visible in
//! the output within the poll interval plus 100 ms.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::replication::{fresh, ms, open_writer, quantile, replica_url_in};
use crate::replica::ReplicaUrl;
use crate::replicate::follow::{FollowOptions, DEFAULT_INTERVAL, FULL_LIST_EVERY};
use crate::replicate::{self, RunOptions, Synced};

#[derive(Debug, clap::Args)]
pub struct FollowArgs {
    /// Replica URL to measure [default: a directory under the work directory]; an s3:// URL
    /// takes credentials from the environment
    #[arg(long)]
    pub url: Option<String>,
    /// Work directory for the source, the follower's output and the default replica
    #[arg(long, default_value = "target/bench-follow")]
    pub dir: PathBuf,
    /// Commits measured, at random moments of the poll interval
    #[arg(long, default_value_t = 40)]
    pub commits: usize,
    /// The follower's poll interval
    #[arg(long, default_value = "1s", value_parser = crate::config::parse_duration)]
    pub interval: Duration,
    /// Seconds the idle follower is watched for replica requests (S3 only)
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
}

/// How long any one stage may take before the benchmark gives up.
const STAGE_TIMEOUT: Duration = Duration::from_secs(60);

pub fn follow(args: &FollowArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let tmp = args.dir.join("tmp");
    let db = fresh(&args.dir, "source.db")?;
    let out = fresh(&args.dir, "follower.db")?;
    let _ = std::fs::remove_file(replicate::follow::sidecar_path(&out));
    let writer = open_writer(&db)?;
    writer.execute("INSERT INTO t(v) VALUES (randomblob(200))", [])?;
    let url = replica_url_in(args.url.as_deref(), &args.dir, "follow")?;
    println!(
        "follow benchmark against {}, poll interval {:?} (default {DEFAULT_INTERVAL:?})",
        args.url.as_deref().unwrap_or("a local directory"),
        args.interval
    );
    let replica = ReplicaUrl::parse(&url)?.client()?;
    let follower_replica = ReplicaUrl::parse(&url)?.client()?;
    let (stop_replicating, stop_following, stop_watching) = (
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    );
    let synced: Mutex<Vec<(Instant, u64)>> = Mutex::new(Vec::new());
    let seen: Mutex<Vec<(Instant, i64)>> = Mutex::new(Vec::new());
    let options = RunOptions {
        once: false,
        poll: Duration::from_millis(10),
        max_backoff: Duration::from_secs(1),
        litestream_compatible: false,
        previous_lease: crate::replica::lease::Previous::None,
    };
    let follow_options = FollowOptions {
        interval: args.interval,
        mode: crate::replica::PRIVATE_MODE,
    };
    let wal = db.with_extension("db-wal");
    let (commits, idle) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let replicating = scope.spawn(|| {
            replicate::run_with(
                &db,
                replica,
                &tmp,
                None,
                options,
                &|| stop_replicating.load(Ordering::Relaxed),
                &mut |s: &Synced| {
                    let at = (Instant::now(), s.wal_offset);
                    synced.lock().expect("lock").push(at);
                },
            )
        });
        wait_until("the first sync", || {
            !synced.lock().expect("lock").is_empty()
        })?;
        let following = scope.spawn(|| {
            replicate::follow::follow(
                follower_replica.as_ref(),
                &out,
                &follow_options,
                &|| stop_following.load(Ordering::Relaxed),
                &mut |_| {},
            )
        });
        wait_until("the follower's first restore", || out.exists())?;
        let watching = scope.spawn(|| -> anyhow::Result<()> {
            let reader = rusqlite::Connection::open_with_flags(
                &out,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?;
            let mut last = -1;
            while !stop_watching.load(Ordering::Relaxed) {
                let id: i64 =
                    reader.query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))?;
                if id != last {
                    seen.lock().expect("lock").push((Instant::now(), id));
                    last = id;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        });
        let mut commits = Vec::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..args.commits {
            writer.execute("INSERT INTO t(v) VALUES (randomblob(200))", [])?;
            let id = writer.last_insert_rowid();
            let end = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            commits.push((Instant::now(), id, end));
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Between 0.3 and 1.7 intervals: commits land at every phase of the poll.
            let pause = args.interval.mul_f64(0.3 + (seed % 1000) as f64 / 715.0);
            std::thread::sleep(pause);
        }
        let last = commits.last().map_or(0, |c| c.1);
        wait_until("the last commit in the follower's output", || {
            seen.lock()
                .expect("lock")
                .last()
                .is_some_and(|s| s.1 >= last)
        })?;
        // The replicator stops first, so the idle count is the follower's alone (the
        // replicator's compaction would otherwise run in the window).
        stop_replicating.store(true, Ordering::Relaxed);
        replicating
            .join()
            .map_err(|_| anyhow::anyhow!("the replication loop panicked"))??;
        let idle = url.starts_with("s3://").then(|| {
            let before = crate::replica::s3::REQUESTS.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs(args.idle_secs));
            crate::replica::s3::REQUESTS.load(Ordering::Relaxed) - before
        });
        stop_watching.store(true, Ordering::Relaxed);
        stop_following.store(true, Ordering::Relaxed);
        watching
            .join()
            .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
        following
            .join()
            .map_err(|_| anyhow::anyhow!("the follower panicked"))??;
        Ok((commits, idle))
    })?;
    let synced = synced.into_inner().expect("lock");
    let seen = seen.into_inner().expect("lock");
    let mut in_replica = Vec::new();
    let mut visible = Vec::new();
    for (at, id, end) in &commits {
        let durable = synced
            .iter()
            .find(|(t, offset)| t >= at && offset >= end)
            .context("a commit never reached the replica")?;
        in_replica.push(durable.0 - *at);
        match seen.iter().find(|(t, seen_id)| t >= at && seen_id >= id) {
            Some((t, _)) => visible.push(*t - *at),
            None => bail!("commit {id} never became visible in the follower's output"),
        }
    }
    in_replica.sort_unstable();
    visible.sort_unstable();
    let budget = args.interval + Duration::from_millis(100);
    println!(
        "  commit -> visible to a reader of OUT, {} commits: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal: <= interval + 100 ms = {:.0} ms)",
        visible.len(),
        ms(quantile(&visible, 0.5)),
        ms(quantile(&visible, 0.99)),
        ms(*visible.last().unwrap_or(&Duration::ZERO)),
        ms(budget)
    );
    println!(
        "  baseline, same run: commit -> in the replica: p50 {:.1} ms, p99 {:.1} ms; the poll interval alone: {:.0} ms",
        ms(quantile(&in_replica, 0.5)),
        ms(quantile(&in_replica, 0.99)),
        ms(args.interval)
    );
    if let Some(requests) = idle {
        let polls = Duration::from_secs(args.idle_secs).as_secs_f64() / args.interval.as_secs_f64();
        println!(
            "  S3 requests of the idle follower in {} s: {requests}, {:.2} per poll interval (every {FULL_LIST_EVERY}th poll lists all 5 levels)",
            args.idle_secs,
            requests as f64 / polls
        );
    }
    Ok(())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + STAGE_TIMEOUT;
    while !done() {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {STAGE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}
