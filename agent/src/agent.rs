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
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use crossbeam_channel::{select, Receiver, Sender};

use crate::arena::{Arena, DbId, Tier, WalStamp};
use crate::config::Config;
use crate::replica::ReplicaUrl;
use crate::replicate::{
    ReplicateError, Replicator, Synced, CHECKPOINT_INTERVAL, MAINTENANCE_INTERVAL,
};
use crate::ring::RingFile;
use crate::state::{StateStore, HOT_STAMP};
use crate::status::{Metrics, Tiers};
use multidb::ring::{self as layout, reason, Record, Status, TIER_COLD, TIER_HOT, TIER_REFUSED};

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
/// A database refused because its replica holds another database is tried again after
/// this long (the user may have fixed the location), not at every write.
const IDENTITY_RETRY: Duration = Duration::from_secs(60);
/// How long SIGTERM waits for the final syncs before exiting anyway.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// The scheduler's longest sleep: how often gauges and idle demotions are looked at.
const TICK: Duration = Duration::from_millis(250);
/// Events queued between the ring reader and the scheduler. When full the reader waits, the
/// ring fills and counts drops, and the next scan recovers them.
const EVENT_QUEUE: usize = 65_536;
/// Longest retry delay after failed syncs of one database.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A commit from an inode the arena does not know asks for a rescan, at most this often.
const RESCAN_AFTER_UNKNOWN: Duration = Duration::from_secs(1);
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

enum Event {
    Commit { dev: u64, ino: u64, time_ns: u64 },
    Register { dev: u64, ino: u64, path: Vec<u8> },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum JobKind {
    Sync,
    /// Final sync, checkpoint, close.
    Demote,
}

struct Job {
    id: DbId,
    kind: JobKind,
    path: PathBuf,
    url: ReplicaUrl,
    replicator: Option<Replicator>,
    checkpoint_due: bool,
    started_ns: u64,
}

/// Compaction, snapshots and retention of one replica, on a maintenance worker.
struct MaintenanceJob {
    id: DbId,
    path: String,
    url: ReplicaUrl,
}

struct Done {
    id: DbId,
    kind: JobKind,
    replicator: Option<Replicator>,
    result: Result<Option<Synced>, String>,
    started_ns: u64,
    checkpointed: bool,
    /// The `-wal` stamp taken before a demotion's final sync.
    stamp: WalStamp,
    wal_frames: u64,
    txid: u64,
    /// The database is not to be replicated (not in WAL mode, or its replica holds another
    /// database): a [`reason`] code and the message.
    refusal: Option<(u32, String)>,
    /// The file at the path is not the one the job's replicator had open.
    replaced: bool,
    /// (device, inode) of the file the replicator reads.
    file_id: Option<(u64, u64)>,
}

impl Done {
    fn new(job: &Job) -> Done {
        Done {
            id: job.id,
            kind: job.kind,
            replicator: None,
            result: Ok(None),
            started_ns: job.started_ns,
            checkpointed: false,
            stamp: WalStamp::NONE,
            wal_frames: 0,
            txid: 0,
            refusal: None,
            replaced: false,
            file_id: None,
        }
    }

    /// Classifies a failed open or sync.
    fn failed(&mut self, e: &ReplicateError) {
        self.result = Err(e.to_string());
        match e {
            ReplicateError::NotWal { .. } => self.refusal = Some((reason::NOT_WAL, e.to_string())),
            ReplicateError::Identity { .. } => {
                self.refusal = Some((reason::IDENTITY, e.to_string()))
            }
            ReplicateError::Replaced { .. } => self.replaced = true,
            _ => {}
        }
    }
}

/// A hot database, as the scheduler tracks it.
struct Hot {
    path: String,
    url: ReplicaUrl,
    dev: u64,
    ino: u64,
    /// `None` while a job has it, and before the first job opened it.
    replicator: Option<Replicator>,
    busy: bool,
    /// Commits seen that no finished or running sync covers.
    dirty: bool,
    /// When the oldest commit not yet in the replica was made (ns), 0 if none.
    pending_since_ns: u64,
    /// `pending_since_ns` of the commits the running job covers.
    in_flight_since_ns: u64,
    last_write: Instant,
    last_sync_start: Option<Instant>,
    due: Option<Instant>,
    demoting: bool,
    wal_stamp: WalStamp,
    last_checkpoint: Instant,
    last_maintenance_start: Instant,
    /// New files in the replica since the last maintenance pass was queued.
    written_since_maintenance: bool,
    failures: u32,
    txid: u64,
    wal_frames: u64,
    last_sync_ns: u64,
}

/// Runs the agent until `options.stop` is set.
pub fn run(options: Options, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let config = &options.config;
    let multi = &config.multi_db;
    // Before anything else: a second agent on this state directory stops here.
    let _lock = crate::lock::AgentLock::acquire(&multi.state_dir)?;
    let template = multi.replica.clone().context(
        "the configuration has no replica_template: the agent needs to know where replicas go",
    )?;
    raise_fd_limit(u64::from(multi.max_active))?;
    let store =
        Arc::new(StateStore::open(&multi.state_dir).with_context(|| {
            format!("opening the state directory {}", multi.state_dir.display())
        })?);
    let ring_file = RingFile::create_or_open(
        &options.ring_path,
        layout::DEFAULT_SLOTS,
        status_entries(multi.max_active),
    )?;
    let ring = ring_file.ring();
    let slots = (layout::DEFAULT_SLOTS, status_entries(multi.max_active));
    let socket = crate::status::socket_path(&multi.state_dir);
    crate::status::serve_status(&socket, metrics.clone())
        .with_context(|| format!("serving status on {}", socket.display()))?;
    if let Some(addr) = multi.addr {
        crate::status::serve_metrics(addr, metrics.clone())
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    let tmp_dir = multi.state_dir.join("tmp");
    // Leftovers of a killed agent: never renamed into a replica, so never needed.
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::create_dir_all(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;

    // Before the scan: a write racing with it is then newer than the watch start.
    let watch_start_ns = store.watch_start_ns(layout::now_ns())?;
    let started = Instant::now();
    let (mut arena, _) = crate::cli::discover(config)?;
    tracing::info!(
        databases = arena.len(),
        ms = started.elapsed().as_millis() as u64,
        bytes_per_db = arena.heap_bytes() as f64 / arena.len().max(1) as f64,
        "discovered"
    );

    let (event_tx, event_rx) = crossbeam_channel::bounded(EVENT_QUEUE);
    let reader_stop = Arc::new(AtomicBool::new(false));
    let (ring_tx, ring_rx) = crossbeam_channel::unbounded();
    let reader = spawn_ring_reader(
        ring,
        ring_rx,
        event_tx,
        reader_stop.clone(),
        metrics.clone(),
    )?;
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    let mut workers = Vec::new();
    for n in 0..SYNC_WORKERS {
        let (jobs, done) = (job_rx.clone(), done_tx.clone());
        let ctx = WorkerContext {
            tmp_dir: tmp_dir.clone(),
            store: store.clone(),
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
                })?,
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
                    maintain(&job, &tmp_dir, &policy);
                    if done.send(job.id).is_err() {
                        return;
                    }
                }
            })?;
    }
    drop(maintained_tx);

    let mut scheduler = Scheduler {
        config,
        template,
        arena: &mut arena,
        ring,
        ring_file,
        old_rings: Vec::new(),
        ring_path: options.ring_path.clone(),
        ring_slots: slots,
        ring_tx,
        ring_warned: false,
        refused: HashMap::new(),
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
    };
    scheduler.check_collisions();
    scheduler.recover(watch_start_ns, options.baseline)?;
    scheduler.main_loop(&event_rx, &done_rx, &maintained_rx, options.stop.as_ref());
    scheduler.shut_down(&done_rx);
    reader_stop.store(true, Ordering::Relaxed);
    // The reader maps the scheduler's rings: it ends before they are unmapped.
    let _ = reader.join();
    drop(scheduler);
    for w in workers {
        let _ = w.join();
    }
    let _ = std::fs::remove_file(&socket);
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
fn raise_fd_limit(max_active: u64) -> anyhow::Result<()> {
    let need = max_active * FDS_PER_HOT + FDS_BASE;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
    }
    if limit.rlim_cur >= need {
        return Ok(());
    }
    if limit.rlim_max < need {
        anyhow::bail!(
            "max_active: {max_active} hot databases need {need} file descriptors, but the hard limit (ulimit -Hn) is {}; raise it or lower max_active",
            limit.rlim_max
        );
    }
    limit.rlim_cur = need;
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
    }
    Ok(())
}

/// The ring reader: turns records into events, and moves to a new ring when the scheduler
/// sends one (the old file was deleted or replaced under the agent).
fn spawn_ring_reader(
    ring: layout::Ring,
    new_rings: Receiver<layout::Ring>,
    events: Sender<Event>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ring".into())
        .spawn(move || {
            let closed = std::cell::Cell::new(false);
            let mut ring = ring;
            loop {
                let next = std::cell::Cell::new(None);
                read_ring(ring, &events, &closed, &metrics, || {
                    if let Ok(new) = new_rings.try_recv() {
                        next.set(Some(new));
                    }
                    stop.load(Ordering::Relaxed) || next.get().is_some()
                });
                match next.get() {
                    Some(new) if !closed.get() => ring = new,
                    _ => return,
                }
            }
        })
}

fn read_ring(
    ring: layout::Ring,
    events: &Sender<Event>,
    closed: &std::cell::Cell<bool>,
    metrics: &Metrics,
    mut stop: impl FnMut() -> bool,
) {
    crate::ring::read_loop(
        ring,
        |_, _| closed.get() || stop(),
        |record| {
            let event = match record {
                Record::Commit(c) => {
                    metrics.ring_commits.fetch_add(1, Ordering::Relaxed);
                    Event::Commit {
                        dev: c.dev,
                        ino: c.ino,
                        time_ns: c.time_ns,
                    }
                }
                Record::Register { dev, ino, path, .. } => Event::Register {
                    dev: *dev,
                    ino: *ino,
                    path: path.clone(),
                },
            };
            closed.set(events.send(event).is_err());
        },
    );
}

/// One maintenance pass over a replica; failures are logged and retried at the next pass.
fn maintain(job: &MaintenanceJob, tmp_dir: &std::path::Path, policy: &crate::compaction::Policy) {
    let run = || -> Result<crate::compaction::Report, String> {
        let client = job.url.client().map_err(|e| e.to_string())?;
        crate::compaction::maintain(client.as_ref(), tmp_dir, SystemTime::now(), policy)
            .map_err(|e| e.to_string())
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(report)) if !report.is_empty() => {
            tracing::info!(db = %job.path, compacted = report.compacted.len(), snapshot = report.snapshot.is_some(), deleted = report.deleted.len(), "maintenance")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(db = %job.path, error = %e, "compaction or retention failed"),
        Err(panic) => {
            tracing::error!(db = %job.path, panic = %panic_message(&panic), "maintenance panicked; it runs again at the next pass")
        }
    }
}

/// The text of a caught panic.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

struct WorkerContext {
    tmp_dir: PathBuf,
    store: Arc<StateStore>,
}

impl WorkerContext {
    /// [`WorkerContext::work`], with a panic turned into that database's failed sync (its
    /// replicator is dropped, so the next attempt opens the database afresh): a bug hit by
    /// one database never leaves it "busy" or takes a worker away.
    fn work_catching_panics(&self, job: Job) -> Done {
        let mut failed = Done::new(&job);
        let path = job.path.clone();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.work(job))) {
            Ok(done) => done,
            Err(panic) => {
                let message = panic_message(&panic);
                tracing::error!(db = %path.display(), panic = %message, "sync panicked");
                failed.result = Err(format!("sync panicked: {message}"));
                failed
            }
        }
    }

    fn work(&self, job: Job) -> Done {
        let mut done = Done::new(&job);
        #[cfg(test)]
        if job.path.to_string_lossy().contains("panic-in-sync") {
            panic!("injected by a test");
        }
        let mut replicator = match job.replicator {
            Some(r) => r,
            None => match self.open(&job) {
                Ok(r) => r,
                Err(e) => {
                    done.failed(&e);
                    return done;
                }
            },
        };
        done.file_id = Some(replicator.file_id());
        if job.kind == JobKind::Demote {
            // Taken before the final sync: a commit after it changes the stamp, so a restart
            // sees the database as written since.
            done.stamp = WalStamp::of_wal(&job.path.to_string_lossy());
        }
        match replicator.sync() {
            Ok(synced) => done.result = Ok(synced),
            Err(e) => {
                done.failed(&e);
                if done.replaced || done.refusal.is_some() {
                    return done; // the replicator (and every handle on the old file) goes
                }
            }
        }
        if done.result.is_ok() {
            if let Err(e) = replicator.repin() {
                tracing::warn!(db = %job.path.display(), error = %e, "moving the read transaction failed");
            }
            let force = job.checkpoint_due || job.kind == JobKind::Demote;
            match replicator.checkpoint_if_needed(force) {
                Ok(ran) => done.checkpointed = ran,
                Err(e) => tracing::warn!(db = %job.path.display(), error = %e, "checkpoint failed"),
            }
        }
        done.txid = replicator.txid();
        done.wal_frames = replicator.wal_frames();
        let closing = job.kind == JobKind::Demote && done.result.is_ok();
        done.replicator = (!closing).then_some(replicator);
        done
    }

    fn open(&self, job: &Job) -> Result<Replicator, ReplicateError> {
        let client = job.url.client().map_err(|source| ReplicateError::Replica {
            db: job.path.display().to_string(),
            source,
        })?;
        Ok(Replicator::open(&job.path, client, &self.tmp_dir)?.with_state(self.store.clone()))
    }
}

struct Scheduler<'a> {
    config: &'a Config,
    template: crate::config::ReplicaTemplate,
    arena: &'a mut Arena,
    /// The ring being read (a copy of `ring_file`'s view).
    ring: layout::Ring,
    ring_file: RingFile,
    /// Rings replaced under the agent: kept mapped, as producers may still write to them.
    old_rings: Vec<RingFile>,
    ring_path: PathBuf,
    ring_slots: (u32, u32),
    /// Hands a new ring to the reader.
    ring_tx: Sender<layout::Ring>,
    ring_warned: bool,
    /// Databases under the pattern that are not replicated: a [`reason`] code, the message,
    /// and when it was decided.
    refused: HashMap<DbId, Refusal>,
    maintenance: Sender<MaintenanceJob>,
    /// Databases with a maintenance pass queued or running.
    maintaining: HashSet<DbId>,
    lag_warned: bool,
    store: &'a StateStore,
    metrics: &'a Metrics,
    jobs: Sender<Job>,
    hot: HashMap<DbId, Hot>,
    /// Written databases waiting for a hot slot, oldest first, with when they were written.
    waiting: VecDeque<(DbId, u64)>,
    waiting_set: HashSet<DbId>,
    /// Status-table entries of demoted databases, oldest first (kept so `multidb_wait` and
    /// `multidb_status()` still answer for them, evicted when the table fills).
    cold_entries: VecDeque<(u64, u64)>,
    last_scan: Instant,
    last_scan_ms: u64,
    rescan_soon: Option<Instant>,
    last_wal_poll: Instant,
}

/// Why a database is not replicated.
struct Refusal {
    code: u32,
    message: String,
    since: Instant,
}

impl Scheduler<'_> {
    /// After a start: databases written while no agent ran (or whose commit signal a killed
    /// agent had read but not acted on) are caught up. A database that was ever hot has a
    /// saved `-wal` stamp: from its last demotion, or [`HOT_STAMP`] while hot; a stamp that
    /// differs now means a write the replica may lack. Any other database is caught up if its
    /// file or `-wal` changed since the agent first watched this host (`watch_start_ns`), so
    /// installing the agent does not upload every database (unless `baseline`), and nothing
    /// written after that is missed.
    fn recover(&mut self, watch_start_ns: u64, baseline: bool) -> anyhow::Result<()> {
        let now = layout::now_ns();
        let mut seen = vec![
            false;
            self.arena
                .ids()
                .map(|id| id as usize + 1)
                .max()
                .unwrap_or(0)
        ];
        let mut written = Vec::new();
        self.store.for_each_wal_stamp(|path, stamp| {
            if let Some(id) = self.arena.lookup_path(path) {
                seen[id as usize] = true;
                if stamp != self.arena.wal(id).raw() {
                    written.push(id);
                }
            }
        })?;
        for id in self.arena.ids() {
            if seen[id as usize] {
                continue;
            }
            if baseline || modified_since(&self.arena.path(id), watch_start_ns) {
                written.push(id);
            }
        }
        drop(seen);
        if !written.is_empty() {
            tracing::info!(
                databases = written.len(),
                "catching up databases written while the agent was not running"
            );
        }
        for id in written {
            self.request_promotion(id, now);
        }
        Ok(())
    }

    fn main_loop(
        &mut self,
        events: &Receiver<Event>,
        done: &Receiver<Done>,
        maintained: &Receiver<DbId>,
        stop: &(dyn Fn() -> bool + Send + Sync),
    ) {
        let ticker = crossbeam_channel::tick(TICK);
        let mut last_housekeeping = Instant::now();
        while !stop() {
            let timeout = self.next_due().map_or(TICK, |due| {
                due.saturating_duration_since(Instant::now()).min(TICK)
            });
            select! {
                recv(events) -> event => {
                    let Ok(event) = event else { break };
                    self.on_event(event);
                    // Drain what else is queued before scheduling, so a burst is one pass.
                    for event in events.try_iter().take(4096) {
                        self.on_event(event);
                    }
                }
                recv(done) -> finished => {
                    if let Ok(finished) = finished {
                        self.on_done(finished);
                    }
                }
                recv(maintained) -> id => {
                    if let Ok(id) = id {
                        self.maintaining.remove(&id);
                    }
                }
                recv(ticker) -> _ => {}
                default(timeout) => {}
            }
            self.dispatch_due();
            if last_housekeeping.elapsed() >= TICK {
                last_housekeeping = Instant::now();
                self.housekeeping();
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.hot
            .values()
            .filter(|h| !h.busy)
            .filter_map(|h| h.due)
            .min()
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Commit { dev, ino, time_ns } => match self.arena.lookup_inode(dev, ino) {
                Some(id) => self.on_write(id, time_ns),
                None => self.ask_rescan(),
            },
            Event::Register { dev, ino, path } => {
                let path = String::from_utf8_lossy(&path);
                if self.arena.lookup_path(&path).is_some() {
                    return;
                }
                if self.config.multi_db.pattern.parse(&path).is_err() {
                    // An application writes a database the agent will never replicate: say so
                    // to its `multidb_wait` and `multidb_status()` at once.
                    tracing::debug!(db = %path, "written through libmultidb but outside the discovery pattern");
                    self.publish(Status {
                        dev,
                        ino,
                        tier: TIER_REFUSED,
                        reason: reason::OUTSIDE_PATTERN,
                        ..Status::default()
                    });
                    self.cold_entries.push_back((dev, ino));
                } else {
                    self.ask_rescan();
                }
            }
        }
    }

    fn ask_rescan(&mut self) {
        if self.rescan_soon.is_none() {
            self.rescan_soon = Some(Instant::now() + RESCAN_AFTER_UNKNOWN);
        }
    }

    /// A commit to `id` was made at `time_ns`.
    fn on_write(&mut self, id: DbId, time_ns: u64) {
        if !self.hot.contains_key(&id) {
            self.request_promotion(id, time_ns);
            return;
        }
        self.follow_inode(id);
        let hot = self.hot.get_mut(&id).expect("checked above");
        hot.last_write = Instant::now();
        hot.dirty = true;
        if hot.pending_since_ns == 0 {
            hot.pending_since_ns = time_ns.max(1);
            // Lag shows from the first unreplicated commit, not from the next sync's end.
            let status = Self::status_of(hot, TIER_HOT);
            self.publish(status);
        }
        let hot = self.hot.get_mut(&id).expect("checked above");
        if !hot.busy && hot.due.is_none() {
            hot.due = Some(sync_time(
                hot.last_sync_start,
                self.config.multi_db.sync_interval,
            ));
        }
    }

    fn request_promotion(&mut self, id: DbId, time_ns: u64) {
        if let Some(refusal) = self.refused.get(&id) {
            let retry = match refusal.code {
                // A database switched to WAL mode is replicated from its next write.
                reason::NOT_WAL => true,
                reason::IDENTITY => refusal.since.elapsed() >= IDENTITY_RETRY,
                // Collisions and bad locations change only with the tree or the config.
                _ => false,
            };
            if !retry {
                return;
            }
        }
        if self.waiting_set.insert(id) {
            self.waiting.push_back((id, time_ns.max(1)));
        }
        self.fill_hot_tier();
    }

    /// Promotes waiting databases while there is room, and starts demoting the least recently
    /// written hot ones to make room for the rest.
    fn fill_hot_tier(&mut self) {
        let max_active = self.config.multi_db.max_active as usize;
        while self.hot.len() < max_active {
            let Some((id, since)) = self.waiting.pop_front() else {
                break;
            };
            self.waiting_set.remove(&id);
            self.promote(id, since);
        }
        let demoting = self.hot.values().filter(|h| h.demoting).count();
        let mut wanted = self.waiting.len().saturating_sub(demoting);
        while wanted > 0 {
            let victim = self
                .hot
                .iter()
                .filter(|(_, h)| !h.demoting)
                .min_by_key(|(_, h)| h.last_write)
                .map(|(&id, _)| id);
            let Some(victim) = victim else { break };
            self.start_demotion(victim);
            wanted -= 1;
        }
    }

    fn promote(&mut self, id: DbId, since_ns: u64) {
        let path = self.arena.path(id);
        let fields = match self
            .config
            .multi_db
            .pattern
            .fields_of(&self.arena.components(id))
        {
            Ok(f) => f,
            Err(why) => {
                tracing::warn!(db = %path, reason = %why, "not replicated: does not match the pattern");
                return;
            }
        };
        let url = match self.template.url_for(&fields) {
            Ok(url) => url,
            Err(e) => {
                self.refuse(
                    id,
                    reason::BAD_LOCATION,
                    format!("{path}: not replicated: {e}"),
                );
                return;
            }
        };
        self.unrefuse(id);
        let (dev, ino) = self.arena.inode(id);
        let previous = self.ring.status(dev, ino);
        self.arena.set_tier(id, Tier::Hot);
        if let Err(e) = self.store.set_wal_stamps([(path.as_str(), HOT_STAMP)]) {
            tracing::warn!(db = %path, error = %e, "marking the database hot in the state failed");
        }
        self.metrics.promotions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(db = %path, "promoted to hot");
        let now = Instant::now();
        let hot = Hot {
            path,
            url,
            dev,
            ino,
            replicator: None,
            busy: false,
            dirty: true,
            pending_since_ns: since_ns,
            in_flight_since_ns: 0,
            last_write: now,
            last_sync_start: None,
            due: Some(now),
            demoting: false,
            wal_stamp: self.arena.wal(id),
            last_checkpoint: now,
            last_maintenance_start: now,
            written_since_maintenance: false,
            failures: 0,
            txid: previous.map_or(0, |s| s.replicated_txid),
            wal_frames: previous.map_or(0, |s| s.replicated_frames),
            last_sync_ns: previous.map_or(0, |s| s.last_sync_ns),
        };
        self.publish(Self::status_of(&hot, TIER_HOT));
        self.hot.insert(id, hot);
    }

    fn start_demotion(&mut self, id: DbId) {
        if let Some(hot) = self.hot.get_mut(&id) {
            hot.demoting = true;
            if !hot.busy {
                hot.due = Some(Instant::now());
            }
        }
    }

    /// Sends every hot database whose time has come to a worker.
    fn dispatch_due(&mut self) {
        let now = Instant::now();
        let due: Vec<DbId> = self
            .hot
            .iter()
            .filter(|(_, h)| !h.busy && h.due.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.dispatch(id);
        }
    }

    fn dispatch(&mut self, id: DbId) {
        let Some(hot) = self.hot.get_mut(&id) else {
            return;
        };
        let kind = if hot.demoting {
            JobKind::Demote
        } else {
            JobKind::Sync
        };
        let now = Instant::now();
        let job = Job {
            id,
            kind,
            path: PathBuf::from(&hot.path),
            url: hot.url.clone(),
            replicator: hot.replicator.take(),
            checkpoint_due: hot.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL,
            started_ns: layout::now_ns(),
        };
        hot.busy = true;
        hot.due = None;
        hot.dirty = false;
        hot.in_flight_since_ns = std::mem::take(&mut hot.pending_since_ns);
        hot.last_sync_start = Some(now);
        hot.wal_stamp = WalStamp::of_wal(&hot.path);
        if self.jobs.send(job).is_err() {
            tracing::error!("the sync workers are gone");
        }
    }

    fn on_done(&mut self, done: Done) {
        if let Some((code, message)) = done.refusal {
            self.refuse(done.id, code, message);
            return;
        }
        if !self.hot.contains_key(&done.id) {
            return;
        }
        if let Some((dev, ino)) = done.file_id {
            self.move_status(done.id, dev, ino);
        }
        let hot = self.hot.get_mut(&done.id).expect("checked above");
        hot.busy = false;
        hot.replicator = done.replicator;
        if done.replaced {
            // A new file at the path: its history starts with a snapshot at the next sync,
            // by a replicator that opens it afresh (this job dropped every handle on the old).
            tracing::info!(db = %hot.path, "database file replaced at its path; its replica continues with a snapshot of the new file");
            hot.dirty = true;
            hot.due = Some(Instant::now());
            if hot.pending_since_ns == 0 {
                hot.pending_since_ns = hot.in_flight_since_ns.max(1);
            }
            hot.in_flight_since_ns = 0;
            self.ask_rescan();
            return;
        }
        hot.txid = done.txid.max(hot.txid);
        hot.wal_frames = done.wal_frames;
        if done.checkpointed {
            hot.last_checkpoint = Instant::now();
            self.metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
        }
        let mut maintain = false;
        match &done.result {
            Ok(synced) => {
                hot.failures = 0;
                hot.last_sync_ns = done.started_ns;
                if hot.in_flight_since_ns != 0 {
                    let lag = layout::now_ns().saturating_sub(hot.in_flight_since_ns);
                    self.metrics.record_lag(Duration::from_nanos(lag));
                }
                hot.in_flight_since_ns = 0;
                if let Some(s) = synced {
                    maintain = true;
                    self.metrics.syncs.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .bytes_uploaded
                        .fetch_add(s.bytes, Ordering::Relaxed);
                    if s.snapshot_reason.is_some() {
                        self.metrics.snapshots.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(db = %hot.path, txid = s.txid, level = s.level, pages = s.pages, bytes = s.bytes, snapshot = ?s.snapshot_reason, "synced");
                }
                self.metrics.clear_error(&hot.path);
            }
            Err(e) => {
                hot.failures += 1;
                hot.dirty = true;
                if hot.pending_since_ns == 0 || hot.in_flight_since_ns < hot.pending_since_ns {
                    hot.pending_since_ns = hot.in_flight_since_ns.max(1);
                }
                let backoff = backoff(hot.failures);
                hot.due = Some(Instant::now() + backoff);
                self.metrics.record_error(&hot.path, e.clone());
                tracing::error!(db = %hot.path, error = %e, retry_ms = backoff.as_millis() as u64, "sync failed");
            }
        }
        if maintain {
            hot.written_since_maintenance = true;
        }
        let demoted = done.kind == JobKind::Demote && done.result.is_ok();
        self.schedule_maintenance(done.id, demoted);
        if demoted {
            self.finish_demotion(done.id, done.stamp);
            self.fill_hot_tier();
            return;
        }
        let hot = self.hot.get_mut(&done.id).expect("present above");
        if hot.dirty && hot.due.is_none() {
            hot.due = Some(sync_time(
                hot.last_sync_start,
                self.config.multi_db.sync_interval,
            ));
        }
        if hot.demoting && hot.due.is_none() {
            hot.due = Some(Instant::now());
        }
        let status = Self::status_of(&self.hot[&done.id], TIER_HOT);
        self.publish(status);
    }

    fn finish_demotion(&mut self, id: DbId, stamp: WalStamp) {
        let Some(hot) = self.hot.remove(&id) else {
            return;
        };
        self.metrics.demotions.fetch_add(1, Ordering::Relaxed);
        self.arena.set_tier(id, Tier::Cold);
        self.arena.set_txid(id, hot.txid);
        self.arena.set_wal(id, stamp);
        if let Err(e) = self
            .store
            .set_wal_stamps([(hot.path.as_str(), stamp.raw())])
        {
            tracing::warn!(db = %hot.path, error = %e, "saving the WAL stamp failed");
        }
        self.publish(Self::status_of(&hot, TIER_COLD));
        self.cold_entries.push_back((hot.dev, hot.ino));
        tracing::debug!(db = %hot.path, txid = hot.txid, "demoted to cold");
        if hot.dirty {
            // Written while the demotion ran: back in line.
            self.request_promotion(id, hot.pending_since_ns.max(1));
        }
    }

    /// Writes `hot`'s entry in the ring's status table, evicting entries of demoted databases
    /// when the table is full.
    fn publish(&mut self, status: Status) {
        let capacity = self.ring.status_capacity();
        while self.cold_entries.len() > capacity / 4 {
            if let Some((dev, ino)) = self.cold_entries.pop_front() {
                self.remove_cold_entry(dev, ino);
            }
        }
        while !self.ring.publish_status(&status) {
            let Some((dev, ino)) = self.cold_entries.pop_front() else {
                tracing::warn!(
                    dev = status.dev,
                    ino = status.ino,
                    "the ring's status table is full"
                );
                return;
            };
            self.remove_cold_entry(dev, ino);
        }
    }

    fn status_of(hot: &Hot, tier: u32) -> Status {
        Status {
            dev: hot.dev,
            ino: hot.ino,
            tier,
            replicated_txid: hot.txid,
            replicated_frames: hot.wal_frames,
            last_sync_ns: hot.last_sync_ns,
            pending_since_ns: oldest_ns([hot.pending_since_ns, hot.in_flight_since_ns]),
            reason: reason::NONE,
        }
    }

    fn remove_cold_entry(&self, dev: u64, ino: u64) {
        let still_cold = self
            .ring
            .status(dev, ino)
            .is_some_and(|s| s.tier == TIER_COLD || s.tier == TIER_REFUSED);
        if still_cold {
            self.ring.remove_status(dev, ino);
        }
    }

    /// Scans, idle demotions, WAL polls of hot databases, gauges.
    fn housekeeping(&mut self) {
        let multi = &self.config.multi_db;
        let scan_due = self.last_scan.elapsed() >= multi.scan_interval
            || self.rescan_soon.is_some_and(|t| t <= Instant::now());
        if scan_due {
            self.rescan();
        }
        self.check_ring();
        if self.last_wal_poll.elapsed() >= multi.sync_interval {
            self.last_wal_poll = Instant::now();
            self.poll_hot_wals();
        }
        let idle: Vec<DbId> = self
            .hot
            .iter()
            .filter(|(_, h)| {
                !h.busy && !h.dirty && !h.demoting && h.last_write.elapsed() >= multi.idle_timeout
            })
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            self.start_demotion(id);
        }
        self.update_gauges();
    }

    /// Applications without the extension send no records: a hot database's `-wal` stamp
    /// changing is their commit signal (one `stat` per hot database per `sync_interval`).
    fn poll_hot_wals(&mut self) {
        let now_ns = layout::now_ns();
        let changed: Vec<DbId> = self
            .hot
            .iter()
            .filter(|(_, h)| !h.busy && !h.dirty && WalStamp::of_wal(&h.path) != h.wal_stamp)
            .map(|(&id, _)| id)
            .collect();
        for id in changed {
            self.on_write(id, now_ns);
        }
    }

    fn rescan(&mut self) {
        self.last_scan = Instant::now();
        self.rescan_soon = None;
        let report = match crate::discovery::scan(&self.config.multi_db.pattern, self.arena) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "scan failed");
                return;
            }
        };
        self.metrics.scans.fetch_add(1, Ordering::Relaxed);
        self.last_scan_ms = report.elapsed.as_millis() as u64;
        for (dir, why) in &report.unreadable {
            tracing::warn!(dir = %dir, error = %why, "directory not readable; its databases keep their last state");
        }
        let diff = report.diff;
        if !diff.removed.is_empty() {
            let gone: HashSet<&str> = diff.removed.iter().map(String::as_str).collect();
            let removed: Vec<DbId> = self
                .hot
                .iter()
                .filter(|(_, h)| gone.contains(h.path.as_str()))
                .map(|(&id, _)| id)
                .collect();
            for id in removed {
                if let Some(hot) = self.hot.remove(&id) {
                    tracing::info!(db = %hot.path, "database removed; replication stopped");
                    self.ring.remove_status(hot.dev, hot.ino);
                }
            }
            self.refused.retain(|id, _| self.arena.is_live(*id));
            self.maintaining.retain(|id| self.arena.is_live(*id));
            self.waiting.retain(|&(id, _)| self.arena.is_live(id));
            self.waiting_set = self.waiting.iter().map(|&(id, _)| id).collect();
        }
        let now = layout::now_ns();
        // A database created since the last scan is new content, unless it is still an empty
        // file (its first write will show in its `-wal`).
        let created = diff.added.iter().filter(|&&id| {
            self.arena.wal(id) != WalStamp::NONE
                || std::fs::metadata(self.arena.path(id)).is_ok_and(|m| m.len() > 0)
        });
        let written: Vec<DbId> = diff.changed.iter().chain(created).copied().collect();
        if !diff.added.is_empty() || !diff.removed.is_empty() {
            self.check_collisions();
        }
        for id in written {
            self.on_write(id, now);
        }
        tracing::debug!(
            ms = self.last_scan_ms,
            added = diff.added.len(),
            removed = diff.removed.len(),
            changed = diff.changed.len(),
            "scan"
        );
    }

    fn update_gauges(&mut self) {
        let stats = self.ring.stats();
        let hot = self.hot.len() as u64;
        let now = layout::now_ns();
        let oldest = oldest_ns(
            self.hot
                .values()
                .flat_map(|h| [h.pending_since_ns, h.in_flight_since_ns])
                .chain(self.waiting.iter().map(|&(_, since)| since)),
        );
        let oldest_ms = if oldest == 0 {
            0
        } else {
            now.saturating_sub(oldest) / 1_000_000
        };
        let bound = LAG_WARNING.as_millis() as u64;
        if oldest_ms >= bound && !self.lag_warned {
            self.lag_warned = true;
            let errors = self.metrics.report(0)["errors"].clone();
            tracing::warn!(oldest_unreplicated_ms = oldest_ms, errors = %errors, "replication is stalled: a commit is not in the replica after {} s", LAG_WARNING.as_secs());
        } else if oldest_ms < bound / 2 && self.lag_warned {
            self.lag_warned = false;
            tracing::info!(
                oldest_unreplicated_ms = oldest_ms,
                "replication caught up again"
            );
        }
        self.metrics.set_tiers(Tiers {
            discovered: self.arena.len() as u64,
            hot,
            cold: (self.arena.len() as u64).saturating_sub(hot),
            waiting: self.waiting.len() as u64,
            in_flight: self.hot.values().filter(|h| h.busy).count() as u64,
            max_active: u64::from(self.config.multi_db.max_active),
            last_scan_ms: self.last_scan_ms,
            ring_dropped: stats.dropped,
            ring_invalid: stats.invalid,
            ring_skipped: stats.skipped,
            ring_fill: stats.fill(),
            ring_capacity: stats.capacity,
            refused: self.refused.len() as u64,
            oldest_unreplicated_ms: oldest_ms,
        });
    }

    /// Queues a maintenance pass for `id` when its replica got new files and the interval
    /// passed (or it was just demoted), unless one is queued or running.
    fn schedule_maintenance(&mut self, id: DbId, now_or_never: bool) {
        let Some(hot) = self.hot.get_mut(&id) else {
            return;
        };
        if !hot.written_since_maintenance || self.maintaining.contains(&id) {
            return;
        }
        if !now_or_never && hot.last_maintenance_start.elapsed() < MAINTENANCE_INTERVAL {
            return;
        }
        hot.last_maintenance_start = Instant::now();
        hot.written_since_maintenance = false;
        self.maintaining.insert(id);
        let job = MaintenanceJob {
            id,
            path: hot.path.clone(),
            url: hot.url.clone(),
        };
        if self.maintenance.send(job).is_err() {
            tracing::error!("the maintenance workers are gone");
        }
    }

    /// Moves `id`'s status entry to the file its replicator reads, when that is not the one
    /// it was published for (the file was replaced at its path).
    fn move_status(&mut self, id: DbId, dev: u64, ino: u64) {
        let Some(hot) = self.hot.get_mut(&id) else {
            return;
        };
        if (hot.dev, hot.ino) == (dev, ino) {
            return;
        }
        self.ring.remove_status(hot.dev, hot.ino);
        hot.dev = dev;
        hot.ino = ino;
        let status = Self::status_of(hot, TIER_HOT);
        self.publish(status);
    }

    /// A scan saw a new inode at a hot database's path: every handle on the old file goes
    /// (unless a job holds them; it notices the replacement itself) and the next sync opens
    /// the new file, whose history starts with a snapshot.
    fn follow_inode(&mut self, id: DbId) {
        let (dev, ino) = self.arena.inode(id);
        let Some(hot) = self.hot.get_mut(&id) else {
            return;
        };
        if (hot.dev, hot.ino) == (dev, ino) {
            return;
        }
        tracing::info!(db = %hot.path, "database file replaced at its path; its replica continues with a snapshot of the new file");
        if !hot.busy {
            hot.replicator = None;
        }
        self.move_status(id, dev, ino);
    }

    /// Stops replicating `id` (if it is hot) and publishes why, for `multidb_wait`,
    /// `multidb_status()`, `multidb status` and the metrics. Warns once per database.
    fn refuse(&mut self, id: DbId, code: u32, message: String) {
        let (dev, ino) = self.arena.inode(id);
        if let Some(hot) = self.hot.remove(&id) {
            self.arena.set_tier(id, Tier::Cold);
            let stamp = WalStamp::of_wal(&hot.path);
            self.arena.set_wal(id, stamp);
            if let Err(e) = self
                .store
                .set_wal_stamps([(hot.path.as_str(), stamp.raw())])
            {
                tracing::warn!(db = %hot.path, error = %e, "saving the WAL stamp failed");
            }
            if (hot.dev, hot.ino) != (dev, ino) {
                self.ring.remove_status(hot.dev, hot.ino);
            }
        }
        self.waiting_set.remove(&id);
        self.waiting.retain(|&(w, _)| w != id);
        let repeated = self
            .refused
            .get(&id)
            .is_some_and(|r| r.code == code && r.message == message);
        if !repeated {
            tracing::warn!(db = %self.arena.path(id), reason = %message, "not replicated");
        }
        self.metrics
            .record_refusal(&self.arena.path(id), message.clone());
        self.refused.insert(
            id,
            Refusal {
                code,
                message,
                since: Instant::now(),
            },
        );
        self.publish(Status {
            dev,
            ino,
            tier: TIER_REFUSED,
            reason: code,
            ..Status::default()
        });
        self.fill_hot_tier();
    }

    /// Forgets a refusal that no longer holds.
    fn unrefuse(&mut self, id: DbId) {
        if self.refused.remove(&id).is_some() {
            let (dev, ino) = self.arena.inode(id);
            self.ring.remove_status(dev, ino);
            self.metrics.clear_error(&self.arena.path(id));
        }
    }

    /// Refuses every database that shares its replica location with another, and forgets
    /// collisions that ended (one of the two was removed or renamed).
    fn check_collisions(&mut self) {
        let started = Instant::now();
        let shared =
            crate::collisions::find(self.arena, &self.config.multi_db.pattern, &self.template);
        let ended: Vec<DbId> = self
            .refused
            .iter()
            .filter(|(id, r)| r.code == reason::COLLISION && !shared.contains_key(id))
            .map(|(&id, _)| id)
            .collect();
        for id in ended {
            self.unrefuse(id);
        }
        for (&id, &other) in &shared {
            let location = crate::collisions::location_of(
                self.arena,
                &self.config.multi_db.pattern,
                &self.template,
                id,
            )
            .unwrap_or_default();
            let message = format!(
                "replica location shared with {}: both are refused (location {location}); give the template every field that tells them apart",
                self.arena.path(other)
            );
            self.refuse(id, reason::COLLISION, message);
        }
        tracing::debug!(
            databases = self.arena.len(),
            shared = shared.len(),
            ms = started.elapsed().as_millis() as u64,
            "replica locations checked"
        );
    }

    /// Makes a new ring when the file at the ring's path is no longer ours (deleted, or
    /// replaced), so applications find the agent again within seconds.
    fn check_ring(&mut self) {
        if self.ring_file.still_at_path() {
            return;
        }
        let (slots, entries) = self.ring_slots;
        let fresh = match RingFile::create_or_open(&self.ring_path, slots, entries) {
            Ok(fresh) => fresh,
            Err(e) => {
                if !self.ring_warned {
                    self.ring_warned = true;
                    tracing::error!(ring = %self.ring_path.display(), error = %e, "the ring file was removed or replaced and cannot be made again; applications cannot signal commits (scans still find them)");
                }
                return;
            }
        };
        self.ring_warned = false;
        let old = std::mem::replace(&mut self.ring_file, fresh);
        old.ring().retire();
        self.old_rings.push(old);
        self.ring = self.ring_file.ring();
        let _ = self.ring_tx.send(self.ring);
        tracing::warn!(ring = %self.ring_path.display(), "the ring file was removed or replaced; made a new one");
        // The new table: every hot and refused database again.
        self.cold_entries.clear();
        let statuses: Vec<Status> = self
            .hot
            .values()
            .map(|h| Self::status_of(h, TIER_HOT))
            .collect();
        for status in statuses {
            self.publish(status);
        }
        let refused: Vec<(DbId, u32)> = self.refused.iter().map(|(&id, r)| (id, r.code)).collect();
        for (id, code) in refused {
            let (dev, ino) = self.arena.inode(id);
            self.publish(Status {
                dev,
                ino,
                tier: TIER_REFUSED,
                reason: code,
                ..Status::default()
            });
        }
        // Commits signalled into the old ring after it was removed: a scan finds them.
        self.rescan_soon = Some(Instant::now() + Duration::from_secs(3));
    }

    /// Final sync, checkpoint and close of every hot database, for at most
    /// [`SHUTDOWN_TIMEOUT`].
    fn shut_down(&mut self, done: &Receiver<Done>) {
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        let ids: Vec<DbId> = self.hot.keys().copied().collect();
        tracing::info!(
            hot = ids.len(),
            "stopping: final sync of every hot database"
        );
        for id in ids {
            self.start_demotion(id);
        }
        while !self.hot.is_empty() && Instant::now() < deadline {
            self.dispatch_due();
            match done.recv_timeout(TICK) {
                Ok(finished) => {
                    let failed = finished.result.is_err();
                    let id = finished.id;
                    self.on_done(finished);
                    if failed {
                        // One attempt at shutdown; the state directory and the next start
                        // take it from here.
                        self.hot.remove(&id);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        if !self.hot.is_empty() {
            tracing::warn!(
                hot = self.hot.len(),
                "stopped before every final sync finished; the next start catches up"
            );
        }
        self.update_gauges();
    }
}

/// Whether the database file or its `-wal` was modified at or after `since_ns`.
fn modified_since(db: &str, since_ns: u64) -> bool {
    let mtime = |path: &str| std::fs::metadata(path).map_or(0, |m| crate::arena::mtime_ns(&m));
    mtime(db).max(mtime(&format!("{db}-wal"))) >= since_ns
}

/// The oldest of some "since" times (ns), ignoring zeros (none); 0 when all are zero.
fn oldest_ns(times: impl IntoIterator<Item = u64>) -> u64 {
    times.into_iter().filter(|&t| t != 0).min().unwrap_or(0)
}

/// When a sync should start for a commit seen now: at once after a quiet spell, otherwise
/// one `sync_interval` after the previous sync started.
fn sync_time(last_start: Option<Instant>, interval: Duration) -> Instant {
    let now = Instant::now();
    match last_start {
        Some(start) if now.duration_since(start) < interval => start + interval,
        _ => now,
    }
}

/// Capped exponential backoff with jitter for a database whose syncs keep failing.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << failures.min(10));
    let capped = base.min(MAX_BACKOFF);
    let jitter = layout::now_ns() % (capped.as_millis() as u64 / 4 + 1);
    capped + Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_commit_after_quiet_goes_at_once_then_batches() {
        let interval = Duration::from_secs(1);
        let now = Instant::now();
        assert!(sync_time(None, interval) <= Instant::now());
        let long_ago = now - Duration::from_secs(5);
        assert!(sync_time(Some(long_ago), interval) <= Instant::now());
        let just_now = Instant::now();
        assert_eq!(sync_time(Some(just_now), interval), just_now + interval);
    }

    #[test]
    fn a_panicking_sync_is_that_database_s_failure_not_the_worker_s() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = WorkerContext {
            tmp_dir: dir.path().join("tmp"),
            store: Arc::new(StateStore::open(&dir.path().join("state")).unwrap()),
        };
        let job = Job {
            id: 7,
            kind: JobKind::Sync,
            path: dir.path().join("panic-in-sync.db"),
            url: ReplicaUrl::File(dir.path().join("replica")),
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

    #[test]
    fn oldest_ignores_the_zeros() {
        assert_eq!(oldest_ns([0, 5, 3, 0]), 3);
        assert_eq!(oldest_ns([0, 0]), 0);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) >= Duration::from_millis(200));
        assert!(backoff(1) < Duration::from_millis(300));
        assert!(backoff(30) >= MAX_BACKOFF);
        assert!(backoff(30) <= MAX_BACKOFF + MAX_BACKOFF / 4 + Duration::from_millis(1));
    }
}
