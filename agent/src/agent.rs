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
use crate::replicate::{Replicator, Synced, CHECKPOINT_INTERVAL, MAINTENANCE_INTERVAL};
use crate::ring::RingFile;
use crate::state::{StateStore, HOT_STAMP};
use crate::status::{Metrics, Tiers};
use multidb::ring::{self as layout, Record, Status, TIER_COLD, TIER_HOT};

/// Sync workers. A sync waits mostly on I/O (two fsyncs to a directory, a PUT to S3), so
/// many more workers than cores keep 1,000 hot databases at one sync per second each: with 8,
/// `bench agent` managed about 700 syncs/s on a 2-core machine and lag p99 passed 2 s.
pub const SYNC_WORKERS: usize = 32;
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
    Register { path: Vec<u8> },
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
    maintain: bool,
    started_ns: u64,
}

struct Done {
    id: DbId,
    kind: JobKind,
    replicator: Option<Replicator>,
    result: Result<Option<Synced>, String>,
    started_ns: u64,
    checkpointed: bool,
    maintained: bool,
    /// The `-wal` stamp taken before a demotion's final sync.
    stamp: WalStamp,
    wal_frames: u64,
    txid: u64,
    /// The database is not in WAL mode (or is an empty file): nothing to replicate until a
    /// WAL write, which the ring or a scan will report.
    not_wal: bool,
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
    last_maintenance: Instant,
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
    let reader = spawn_ring_reader(ring, event_tx, reader_stop.clone(), metrics.clone())?;
    let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    let mut workers = Vec::new();
    for n in 0..SYNC_WORKERS {
        let (jobs, done) = (job_rx.clone(), done_tx.clone());
        let ctx = WorkerContext {
            tmp_dir: tmp_dir.clone(),
            store: store.clone(),
            policy: multi.policy,
        };
        workers.push(
            std::thread::Builder::new()
                .name(format!("sync-{n}"))
                .spawn(move || {
                    for job in jobs {
                        if done.send(ctx.work(job)).is_err() {
                            return;
                        }
                    }
                })?,
        );
    }
    drop(done_tx);

    let mut scheduler = Scheduler {
        config,
        template,
        arena: &mut arena,
        ring,
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
    scheduler.recover(watch_start_ns, options.baseline)?;
    scheduler.main_loop(&event_rx, &done_rx, options.stop.as_ref());
    scheduler.shut_down(&done_rx);
    reader_stop.store(true, Ordering::Relaxed);
    drop(scheduler);
    let _ = reader.join();
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

fn spawn_ring_reader(
    ring: layout::Ring,
    events: Sender<Event>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ring".into())
        .spawn(move || {
            let closed = std::cell::Cell::new(false);
            crate::ring::read_loop(
                ring,
                |_, _| closed.get() || stop.load(Ordering::Relaxed),
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
                        Record::Register { path, .. } => Event::Register { path: path.clone() },
                    };
                    closed.set(events.send(event).is_err());
                },
            );
        })
}

struct WorkerContext {
    tmp_dir: PathBuf,
    store: Arc<StateStore>,
    policy: crate::compaction::Policy,
}

impl WorkerContext {
    fn work(&self, job: Job) -> Done {
        let mut done = Done {
            id: job.id,
            kind: job.kind,
            replicator: None,
            result: Ok(None),
            started_ns: job.started_ns,
            checkpointed: false,
            maintained: false,
            stamp: WalStamp::NONE,
            wal_frames: 0,
            txid: 0,
            not_wal: false,
        };
        let mut replicator = match job.replicator {
            Some(r) => r,
            None => match self.open(&job) {
                Ok(r) => r,
                Err(e) => {
                    done.not_wal = matches!(
                        e.downcast_ref::<crate::replicate::ReplicateError>(),
                        Some(crate::replicate::ReplicateError::NotWal { .. })
                    );
                    done.result = Err(format!("{e:#}"));
                    return done;
                }
            },
        };
        if job.kind == JobKind::Demote {
            // Taken before the final sync: a commit after it changes the stamp, so a restart
            // sees the database as written since.
            done.stamp = WalStamp::of_wal(&job.path.to_string_lossy());
        }
        done.result = replicator.sync().map_err(|e| e.to_string());
        if done.result.is_ok() {
            if let Err(e) = replicator.repin() {
                tracing::warn!(db = %job.path.display(), error = %e, "moving the read transaction failed");
            }
            let force = job.checkpoint_due || job.kind == JobKind::Demote;
            match replicator.checkpoint_if_needed(force) {
                Ok(ran) => done.checkpointed = ran,
                Err(e) => tracing::warn!(db = %job.path.display(), error = %e, "checkpoint failed"),
            }
            if job.maintain {
                match crate::compaction::maintain(
                    replicator.replica(),
                    &self.tmp_dir,
                    SystemTime::now(),
                    &self.policy,
                ) {
                    Ok(report) if !report.is_empty() => {
                        tracing::info!(db = %job.path.display(), compacted = report.compacted.len(), snapshot = report.snapshot.is_some(), deleted = report.deleted.len(), "maintenance")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(db = %job.path.display(), error = %e, "compaction or retention failed")
                    }
                }
                done.maintained = true;
            }
        }
        done.txid = replicator.txid();
        done.wal_frames = replicator.wal_frames();
        let closing = job.kind == JobKind::Demote && done.result.is_ok();
        done.replicator = (!closing).then_some(replicator);
        done
    }

    fn open(&self, job: &Job) -> anyhow::Result<Replicator> {
        let client = job.url.client()?;
        Ok(Replicator::open(&job.path, client, &self.tmp_dir)?.with_state(self.store.clone()))
    }
}

struct Scheduler<'a> {
    config: &'a Config,
    template: crate::config::ReplicaTemplate,
    arena: &'a mut Arena,
    ring: layout::Ring,
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
            Event::Register { path } => {
                let known = std::str::from_utf8(&path)
                    .ok()
                    .is_some_and(|p| self.arena.lookup_path(p).is_some());
                if !known {
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
        let Some(hot) = self.hot.get_mut(&id) else {
            self.request_promotion(id, time_ns);
            return;
        };
        hot.last_write = Instant::now();
        hot.dirty = true;
        if hot.pending_since_ns == 0 {
            hot.pending_since_ns = time_ns.max(1);
        }
        if !hot.busy && hot.due.is_none() {
            hot.due = Some(sync_time(
                hot.last_sync_start,
                self.config.multi_db.sync_interval,
            ));
        }
    }

    fn request_promotion(&mut self, id: DbId, time_ns: u64) {
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
                self.metrics.record_error(&path, e.to_string());
                tracing::warn!(db = %path, error = %e, "not replicated: bad replica path");
                return;
            }
        };
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
            last_maintenance: now,
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
        let maintain = hot.written_since_maintenance
            && (kind == JobKind::Demote || hot.last_maintenance.elapsed() >= MAINTENANCE_INTERVAL);
        let job = Job {
            id,
            kind,
            path: PathBuf::from(&hot.path),
            url: hot.url.clone(),
            replicator: hot.replicator.take(),
            checkpoint_due: hot.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL,
            maintain,
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
        if done.not_wal {
            self.drop_not_wal(done.id);
            return;
        }
        let Some(hot) = self.hot.get_mut(&done.id) else {
            return;
        };
        hot.busy = false;
        hot.replicator = done.replicator;
        hot.txid = done.txid.max(hot.txid);
        hot.wal_frames = done.wal_frames;
        if done.checkpointed {
            hot.last_checkpoint = Instant::now();
            self.metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
        }
        if done.maintained {
            hot.last_maintenance = Instant::now();
            hot.written_since_maintenance = false;
        }
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
                    hot.written_since_maintenance = true;
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
        let demoted = done.kind == JobKind::Demote && done.result.is_ok();
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

    /// A database that is not in WAL mode leaves the hot tier at once instead of holding a
    /// slot while retrying; its stamp is saved so a restart does not try again either.
    fn drop_not_wal(&mut self, id: DbId) {
        let Some(hot) = self.hot.remove(&id) else {
            return;
        };
        self.arena.set_tier(id, Tier::Cold);
        let stamp = WalStamp::of_wal(&hot.path);
        self.arena.set_wal(id, stamp);
        if let Err(e) = self
            .store
            .set_wal_stamps([(hot.path.as_str(), stamp.raw())])
        {
            tracing::warn!(db = %hot.path, error = %e, "saving the WAL stamp failed");
        }
        self.ring.remove_status(hot.dev, hot.ino);
        tracing::debug!(db = %hot.path, "not in WAL mode: not replicated until it is");
        self.fill_hot_tier();
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
            pending_since_ns: if hot.pending_since_ns != 0 {
                hot.pending_since_ns
            } else {
                hot.in_flight_since_ns
            },
        }
    }

    fn remove_cold_entry(&self, dev: u64, ino: u64) {
        let still_cold = self
            .ring
            .status(dev, ino)
            .is_some_and(|s| s.tier == TIER_COLD);
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

    fn update_gauges(&self) {
        let stats = self.ring.stats();
        let hot = self.hot.len() as u64;
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
        });
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
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) >= Duration::from_millis(200));
        assert!(backoff(1) < Duration::from_millis(300));
        assert!(backoff(30) >= MAX_BACKOFF);
        assert!(backoff(30) <= MAX_BACKOFF + MAX_BACKOFF / 4 + Duration::from_millis(1));
    }
}
