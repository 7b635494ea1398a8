//! `multidb agent`: one sidecar for every database the pattern discovers.
//!
//! Threads and what they own:
//! - the **scheduler** (the caller's thread) owns the arena, the hot set and the state
//!   database's stamps; it reacts to ring records, finished jobs, scans and timers;
//! - the **ring reader** turns commit records into events (it is the only consumer);
//! - **sync workers** run one job at a time on one hot database (open, sync, checkpoint,
//!   compact, close); a job owns the database's [`Replicator`] while it runs, so nothing is
//!   shared between a worker and the scheduler but channels;
//! - the status and metrics servers read [`Metrics`].
//!
//! A cold database costs its arena record and nothing else: no timer, thread, descriptor or
//! request. It becomes hot on its first ring record, or when a scan sees its `-wal` change
//! (applications without the extension). At most `max_active` are hot; the least recently
//! written is demoted first, and any database idle for `idle_timeout` is demoted: a final
//! sync and checkpoint, then every descriptor closed. The first commit after a quiet spell is
//! shipped at once; commits that follow are batched for at most `sync_interval`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};

mod jobs;
pub mod lock;
mod published;
mod reader;
mod recovery;
pub mod ring;
mod scheduler;
pub mod status;
mod tiers;
mod watch;
mod worker;

use crate::agent::ring::RingFile;
use crate::agent::status::{Metrics, Tiers};
use crate::config::Config;
use crate::discover::arena::{Arena, DbId, Tier, WalStamp};
use crate::discover::pattern::Fields;
use crate::replica::lease::{Holder, LeaseError, LeaseKeeper};
use crate::replica::ReplicaUrl;
use crate::replicate::state::{StateStore, HOT_STAMP};
use crate::replicate::{
    ReplicateError, Replicator, Synced, CHECKPOINT_INTERVAL, MAINTENANCE_INTERVAL,
};
use jobs::{Done, Event, Job, JobKind, JobState, MaintenanceJob, Signal};
use multidb::ring::{self as layout, reason, Record, Status};
use scheduler::{
    backoff, modified_since, oldest_ns, refused_entry, sync_time, Hot, Refusal, Scheduler,
    IDENTITY_RETRY, REFUSAL_LOG_EVERY, RESCAN_AFTER_UNKNOWN, TICK,
};

/// Sync workers. A sync waits mostly on I/O (two fsyncs to a directory, a PUT to S3), so
/// many more workers than cores keep 1,000 hot databases at one sync per second each: with 8,
/// `bench agent` managed about 700 syncs/s on a 2-core machine and lag p99 passed 2 s.
pub const SYNC_WORKERS: usize = 32;
/// Maintenance workers (compaction, snapshots, retention). Separate from the sync workers, so
/// a slow store's LISTs and GETs for compaction never hold up the next commit's upload.
pub const MAINTENANCE_WORKERS: usize = 4;
/// Past this age of the oldest unreplicated commit the agent logs a warning (once per
/// episode): replication has stalled, not just slowed.
pub const LAG_WARNING: Duration = Duration::from_secs(60);

/// How long SIGTERM waits for the final syncs before exiting anyway.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Events queued between the ring reader and the scheduler. When full the reader waits, the
/// ring fills and counts drops, and the next scan recovers them.
const EVENT_QUEUE: usize = 65_536;

/// Descriptors per hot database: SQLite's database, `-wal` and `-shm` (pages are read
/// through SQLite's own descriptor, see `sqlfile`).
const FDS_PER_HOT: u64 = 3;
/// Descriptors the process needs besides hot databases (state, ring, sockets, checkpoint and
/// WAL-reading descriptors of busy workers, temporary files).
const FDS_BASE: u64 = 64 + 6 * SYNC_WORKERS as u64;

/// How the agent runs.
pub struct Options {
    pub config: Config,
    pub ring_path: PathBuf,
    /// Also replicate, once, every database that has no saved position (an initial backup
    /// of databases that are never written).
    pub baseline: bool,
    /// Returns true to stop: every hot database gets a final sync, then [`run`] returns.
    pub stop: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// Why the agent could not start, or stopped with work undone.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Lock(#[from] crate::agent::lock::LockError),
    #[error(
        "the configuration has no replica_template: the agent needs to know where replicas go"
    )]
    NoReplica,
    #[error("max_active: {max_active} hot databases need {need} file descriptors, but the hard limit (ulimit -Hn) is {hard}; raise it or lower max_active")]
    FdLimit {
        max_active: u64,
        need: u64,
        hard: u64,
    },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::replicate::state::StateError),
    #[error(transparent)]
    Ring(#[from] crate::agent::ring::RingFileError),
    #[error(transparent)]
    Discovery(#[from] crate::discover::discovery::DiscoveryError),
    #[error("stopped with {} database(s) not synced (final sync failed or did not finish within {} s): {}; the next start catches them up", .0.len(), SHUTDOWN_TIMEOUT.as_secs(), .0.join(", "))]
    Unsynced(Vec<String>),
}

/// An I/O error with what the agent was doing.
fn io_error(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let op = op.into();
    move |source| AgentError::Io { op, source }
}

/// Runs the agent until `options.stop` is set.
pub fn run(options: Options, metrics: Arc<Metrics>) -> Result<(), AgentError> {
    let config = &options.config;
    let multi = &config.multi_db;
    // Before anything else: a second agent on this state directory stops here.
    let _lock = crate::agent::lock::AgentLock::acquire(&multi.state_dir)?;
    let template = multi.replica.clone().ok_or(AgentError::NoReplica)?;
    raise_fd_limit(u64::from(multi.max_active))?;
    let store = Arc::new(StateStore::open(&multi.state_dir)?);
    let ring_file = Arc::new(RingFile::create_or_open(
        &options.ring_path,
        layout::DEFAULT_SLOTS,
        status_entries(multi.max_active),
    )?);
    let slots = (layout::DEFAULT_SLOTS, status_entries(multi.max_active));
    let socket = crate::agent::status::socket_path(&multi.state_dir);
    crate::agent::status::serve_status(&socket, metrics.clone())
        .map_err(io_error(format!("serving status on {}", socket.display())))?;
    if let Some(addr) = multi.addr {
        crate::agent::status::serve_metrics(addr, metrics.clone())
            .map_err(io_error(format!("serving metrics on {addr}")))?;
    }
    let me = Holder::of_process(Some(&multi.state_dir)).map_err(io_error(format!(
        "host id in {}",
        multi.state_dir.display()
    )))?;
    let leases =
        LeaseKeeper::start(me, multi.lease_ttl).map_err(io_error("starting the lease keeper"))?;
    let tmp_dir = multi.state_dir.join("tmp");
    // Leftovers of a killed agent: never renamed into a replica, so never needed.
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::create_dir_all(&tmp_dir)
        .map_err(io_error(format!("creating {}", tmp_dir.display())))?;

    // Before the scan: a write racing with it is then newer than the watch start.
    let watch_start_ns = store.watch_start_ns(layout::now_ns())?;
    let started = Instant::now();
    let (mut arena, _) = crate::discover::discover(config)?;
    tracing::info!(
        databases = arena.len(),
        ms = started.elapsed().as_millis() as u64,
        bytes_per_db = arena.heap_bytes() as f64 / arena.len().max(1) as f64,
        "discovered"
    );

    let (event_tx, event_rx) = crossbeam_channel::bounded(EVENT_QUEUE);
    let reader_stop = Arc::new(AtomicBool::new(false));
    let (ring_tx, ring_rx) = crossbeam_channel::unbounded();
    let mut watches = if multi.watch {
        watch::Watches::new(multi.max_watches)
    } else {
        watch::Watches::disabled()
    };
    // Before recovery: a write after this is an event, one before it is caught up below.
    watches.watch_new_dirs(&arena);
    let watch_reader = match watches.fd() {
        Some(fd) => Some(
            watch::spawn_watch_reader(fd, event_tx.clone())
                .map_err(io_error("starting the watch reader"))?,
        ),
        None => None,
    };
    if watches.enabled() {
        tracing::info!(
            directories = watches.watched(),
            unwatched = watches.unwatched(),
            bytes = watches.heap_bytes(),
            "watching leaf directories"
        );
    }
    let reader = reader::spawn_ring_reader(
        ring_file.clone(),
        ring_rx,
        event_tx,
        reader_stop.clone(),
        metrics.clone(),
    )
    .map_err(io_error("starting the ring reader"))?;
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    let mut workers = Vec::new();
    for n in 0..SYNC_WORKERS {
        let (jobs, done) = (job_rx.clone(), done_tx.clone());
        let ctx = worker::WorkerContext {
            tmp_dir: tmp_dir.clone(),
            store: store.clone(),
            litestream_compatible: template.litestream_compatible,
            leases: leases.clone(),
        };
        workers.push(
            std::thread::Builder::new()
                .name(format!("sync-{n}"))
                .spawn(move || {
                    for job in jobs {
                        if done.send(ctx.work_catching_panics(job)).is_err() {
                            return;
                        }
                    }
                })
                .map_err(io_error("starting a sync worker"))?,
        );
    }
    drop(done_tx);
    let (maintenance_tx, maintenance_rx) = crossbeam_channel::unbounded::<MaintenanceJob>();
    let (maintained_tx, maintained_rx) = crossbeam_channel::unbounded::<DbId>();
    for n in 0..MAINTENANCE_WORKERS {
        let (jobs, done) = (maintenance_rx.clone(), maintained_tx.clone());
        let (tmp_dir, policy) = (tmp_dir.clone(), multi.policy);
        // Not joined at shutdown: a maintenance pass on a slow store may take minutes, and
        // an interrupted one is finished by the next (see `compaction`).
        std::thread::Builder::new()
            .name(format!("maintain-{n}"))
            .spawn(move || {
                for job in jobs {
                    worker::maintain(&job, &tmp_dir, &policy);
                    if done.send(job.id).is_err() {
                        return;
                    }
                }
            })
            .map_err(io_error("starting a maintenance worker"))?;
    }
    drop(maintained_tx);

    let mut scheduler = Scheduler {
        config,
        template,
        arena: &mut arena,
        ring_file,
        old_rings: Vec::new(),
        ring_path: options.ring_path.clone(),
        ring_slots: slots,
        ring_tx,
        ring_warned: false,
        refused: HashMap::new(),
        refusals_logged: HashMap::new(),
        leases: leases.clone(),
        maintenance: maintenance_tx,
        maintaining: HashSet::new(),
        lag_warned: false,
        store: &store,
        metrics: &metrics,
        jobs: job_tx,
        hot: HashMap::new(),
        waiting: VecDeque::new(),
        waiting_set: HashSet::new(),
        cold_entries: VecDeque::new(),
        last_scan: Instant::now(),
        last_scan_ms: report_ms(started),
        rescan_soon: None,
        last_wal_poll: Instant::now(),
        watches,
        echoes: HashMap::new(),
    };
    scheduler.check_collisions();
    scheduler.recover(watch_start_ns, options.baseline)?;
    scheduler.main_loop(&event_rx, &done_rx, &maintained_rx, options.stop.as_ref());
    let unsynced = scheduler.shut_down(&done_rx);
    reader_stop.store(true, Ordering::Relaxed);
    // The hot databases' replicators go with the scheduler, so only a write still in
    // flight keeps its lease from being released.
    drop(scheduler);
    // Handed over now, not at expiry: a tenant moving hosts goes on at once.
    leases.release_all();
    // A reader blocked on a full queue returns when its send fails.
    drop(event_rx);
    let _ = reader.join();
    if let Some(watch_reader) = watch_reader {
        watch_reader.stop();
    }
    let _ = std::fs::remove_file(&socket);
    if !unsynced.is_empty() {
        // Workers still in a request are not waited for: the process is ending.
        return Err(AgentError::Unsynced(unsynced));
    }
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// Status-table entries for `max_active` hot databases: at least four per hot database, so
/// the table stays at most a quarter full of hot entries (and half with demoted ones), which
/// keeps linear probes short.
fn status_entries(max_active: u32) -> u32 {
    (max_active.saturating_mul(4))
        .checked_next_power_of_two()
        .unwrap_or(layout::MAX_STATUS_ENTRIES)
        .clamp(layout::DEFAULT_STATUS_ENTRIES, layout::MAX_STATUS_ENTRIES)
}

fn report_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

/// Raises the soft descriptor limit to what `max_active` hot databases need, or refuses.
fn raise_fd_limit(max_active: u64) -> Result<(), AgentError> {
    let need = max_active * FDS_PER_HOT + FDS_BASE;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io_error("reading RLIMIT_NOFILE")(
            std::io::Error::last_os_error(),
        ));
    }
    if limit.rlim_cur >= need {
        return Ok(());
    }
    if limit.rlim_max < need {
        return Err(AgentError::FdLimit {
            max_active,
            need,
            hard: limit.rlim_max,
        });
    }
    limit.rlim_cur = need;
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io_error("raising RLIMIT_NOFILE")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The text of a caught panic.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_sync_is_that_database_s_failure_not_the_worker_s() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = worker::WorkerContext {
            tmp_dir: dir.path().join("tmp"),
            store: Arc::new(StateStore::open(&dir.path().join("state")).unwrap()),
            litestream_compatible: false,
            leases: LeaseKeeper::start(
                Holder::of_process(None).unwrap(),
                crate::replica::lease::DEFAULT_LEASE_TTL,
            )
            .unwrap(),
        };
        let job = Job {
            id: 7,
            kind: JobKind::Sync,
            path: dir.path().join("panic-in-sync.db"),
            url: ReplicaUrl::File(dir.path().join("replica")),
            fields: Fields::default(),
            replicator: None,
            checkpoint_due: false,
            started_ns: 1,
        };
        let done = ctx.work_catching_panics(job);
        assert_eq!(done.id, 7);
        let error = done.result.unwrap_err();
        assert!(
            error.contains("sync panicked: injected by a test"),
            "{error}"
        );
        assert!(done.replicator.is_none());
    }
}
