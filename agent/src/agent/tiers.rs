//! The tier policy: what becomes hot and when, what is synced when, and demotion. Commits
//! (from the ring or scans) request promotion; at most `max_active` databases are hot; the
//! least recently written is demoted to make room, and an idle one after `idle_timeout`.

use super::*;

impl Scheduler<'_> {
    pub(super) fn main_loop(
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

    pub(super) fn next_due(&self) -> Option<Instant> {
        self.hot
            .values()
            .filter(|h| !h.job.running())
            .filter_map(|h| h.due)
            .min()
    }

    pub(super) fn on_event(&mut self, event: Event) {
        match event {
            Event::Commit { dev, ino, time_ns } => match self.arena.lookup_inode(dev, ino) {
                Some(id) => self.on_write(id, time_ns, Signal::Commit),
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
                    self.publish(refused_entry(dev, ino, reason::OUTSIDE_PATTERN));
                    self.cold_entries.push_back((dev, ino));
                } else {
                    self.ask_rescan();
                }
            }
            Event::Fs(event) => self.on_fs_event(event),
        }
    }

    pub(super) fn ask_rescan(&mut self) {
        if self.rescan_soon.is_none() {
            self.rescan_soon = Some(Instant::now() + RESCAN_AFTER_UNKNOWN);
        }
    }

    /// A commit to `id` was made at `time_ns` (`Signal::Commit`), or a scan or `-wal` poll
    /// saw its files change (`Signal::Detected`). Only a commit, or a sync that found new
    /// frames, counts as a write for `idle_timeout`: a change the agent caused itself (its
    /// checkpoint, a WAL deleted on close) must not keep a database hot.
    pub(super) fn on_write(&mut self, id: DbId, time_ns: u64, signal: Signal) {
        if !self.hot.contains_key(&id) {
            self.request_promotion(id, time_ns);
            return;
        }
        self.follow_inode(id);
        let hot = self.hot.get_mut(&id).expect("checked above");
        if signal == Signal::Commit {
            hot.last_write = Instant::now();
        }
        hot.dirty = true;
        if hot.pending_since_ns == 0 {
            hot.pending_since_ns = time_ns.max(1);
            // Lag shows from the first unreplicated commit, not from the next sync's end.
            let status = Self::status_of(hot, Tier::Hot);
            self.publish(status);
        }
        let hot = self.hot.get_mut(&id).expect("checked above");
        if !hot.job.running() && hot.due.is_none() {
            hot.due = Some(sync_time(
                hot.last_sync_start,
                self.config.multi_db.sync_interval,
            ));
        }
    }

    pub(super) fn request_promotion(&mut self, id: DbId, time_ns: u64) {
        if let Some(refusal) = self.refused.get_mut(&id) {
            if refusal.code == reason::LEASED && refusal.deferred_ns.is_none() {
                refusal.deferred_ns = Some(time_ns.max(1));
            }
            let retry = match refusal.code {
                // A database switched to WAL mode is replicated from its next write.
                reason::NOT_WAL => true,
                reason::IDENTITY => refusal.since.elapsed() >= IDENTITY_RETRY,
                reason::LEASED => refusal.retry_at.is_none_or(|at| Instant::now() >= at),
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
    pub(super) fn fill_hot_tier(&mut self) {
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

    pub(super) fn promote(&mut self, id: DbId, since_ns: u64) {
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
        let previous = self.ring_file.ring().status(dev, ino);
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
            fields,
            dev,
            ino,
            job: JobState::Idle(None),
            dirty: true,
            pending_since_ns: since_ns,
            in_flight_since_ns: 0,
            last_write: now,
            last_sync_start: None,
            due: Some(now),
            demoting: false,
            // Taken when the first sync is dispatched, which `due: now` makes at once.
            wal_stamp: WalStamp::NONE,
            last_checkpoint: now,
            last_maintenance_start: now,
            written_since_maintenance: false,
            failures: 0,
            txid: previous.map_or(0, |s| s.replicated_txid),
            wal_frames: previous.map_or(0, |s| s.replicated_frames),
            last_sync_ns: previous.map_or(0, |s| s.last_sync_ns),
        };
        self.publish(Self::status_of(&hot, Tier::Hot));
        self.hot.insert(id, hot);
    }

    pub(super) fn start_demotion(&mut self, id: DbId) {
        if let Some(hot) = self.hot.get_mut(&id) {
            hot.demoting = true;
            if !hot.job.running() {
                hot.due = Some(Instant::now());
            }
        }
    }

    /// Sends every hot database whose time has come to a worker.
    pub(super) fn dispatch_due(&mut self) {
        let now = Instant::now();
        let due: Vec<DbId> = self
            .hot
            .iter()
            .filter(|(_, h)| !h.job.running() && h.due.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.dispatch(id);
        }
    }

    pub(super) fn dispatch(&mut self, id: DbId) {
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
            fields: hot.fields.clone(),
            replicator: match std::mem::replace(&mut hot.job, JobState::Running) {
                JobState::Idle(replicator) => replicator,
                JobState::Running => None, // dispatch_due never picks a running database
            },
            checkpoint_due: hot.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL,
            started_ns: layout::now_ns(),
        };
        hot.due = None;
        hot.dirty = false;
        hot.in_flight_since_ns = std::mem::take(&mut hot.pending_since_ns);
        hot.last_sync_start = Some(now);
        hot.wal_stamp = WalStamp::of_wal(&hot.path);
        if self.jobs.send(job).is_err() {
            tracing::error!("the sync workers are gone");
        }
    }

    pub(super) fn on_done(&mut self, done: Done) {
        if let Some((code, message)) = done.refusal {
            let pending = self
                .hot
                .get(&done.id)
                .map(|h| oldest_ns([h.pending_since_ns, h.in_flight_since_ns]))
                .filter(|&ns| ns != 0);
            self.refuse(done.id, code, message);
            if let (Some(after), Some(refusal)) = (done.retry_after, self.refused.get_mut(&done.id))
            {
                refusal.retry_at = Some(Instant::now() + after);
                // Commits not in the replica yet: looked at again when the lease may have
                // ended, without waiting for another write (there may be none).
                refusal.deferred_ns = Some(pending.unwrap_or_else(layout::now_ns));
            }
            return;
        }
        if !self.hot.contains_key(&done.id) {
            return;
        }
        if let Some((dev, ino)) = done.file_id {
            self.move_status(done.id, dev, ino);
        }
        let hot = self.hot.get_mut(&done.id).expect("checked above");
        hot.job = JobState::Idle(done.replicator);
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
                    // New frames were written before this sync started.
                    if let Some(start) = hot.last_sync_start {
                        hot.last_write = hot.last_write.max(start);
                    }
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
        let status = Self::status_of(&self.hot[&done.id], Tier::Hot);
        self.publish(status);
    }

    pub(super) fn finish_demotion(&mut self, id: DbId, stamp: WalStamp) {
        let Some(hot) = self.hot.remove(&id) else {
            return;
        };
        self.metrics.demotions.fetch_add(1, Ordering::Relaxed);
        self.arena.set_tier(id, Tier::Cold);
        self.arena.set_wal(id, stamp);
        if let Err(e) = self
            .store
            .set_wal_stamps([(hot.path.as_str(), stamp.raw())])
        {
            tracing::warn!(db = %hot.path, error = %e, "saving the WAL stamp failed");
        }
        self.publish(Self::status_of(&hot, Tier::Cold));
        self.cold_entries.push_back((hot.dev, hot.ino));
        self.remember_echo(id, &hot.path);
        tracing::debug!(db = %hot.path, txid = hot.txid, "demoted to cold");
        if hot.dirty {
            // Written while the demotion ran: back in line.
            self.request_promotion(id, hot.pending_since_ns.max(1));
        }
    }

    /// Queues a maintenance pass for `id` when its replica got new files and the interval
    /// passed (or it was just demoted), unless one is queued or running.
    pub(super) fn schedule_maintenance(&mut self, id: DbId, now_or_never: bool) {
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
            leases: self.leases.clone(),
        };
        if self.maintenance.send(job).is_err() {
            tracing::error!("the maintenance workers are gone");
        }
    }

    /// Final sync, checkpoint and close of every hot database, for at most
    /// [`SHUTDOWN_TIMEOUT`].
    /// Returns the databases whose final sync failed or did not finish in time.
    pub(super) fn shut_down(&mut self, done: &Receiver<Done>) -> Vec<String> {
        let mut unsynced = Vec::new();
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
                    // A refusal is not a failed sync: there was nothing to replicate.
                    let failed = finished.result.is_err() && finished.refusal.is_none();
                    let id = finished.id;
                    let error = finished.result.as_ref().err().cloned();
                    self.on_done(finished);
                    if failed {
                        // One attempt at shutdown; the state directory and the next start
                        // take it from here.
                        if let Some(hot) = self.hot.remove(&id) {
                            tracing::error!(db = %hot.path, error = %error.unwrap_or_default(), "final sync failed");
                            unsynced.push(hot.path);
                        }
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
            unsynced.extend(self.hot.values().map(|h| h.path.clone()));
        }
        self.update_gauges();
        unsynced.sort();
        unsynced
    }
}
