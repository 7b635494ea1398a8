//! Catching up: after a start (databases written while no agent ran), at each scan (writes
//! by applications without the extension, files added, removed or replaced), and by polling
//! hot databases' `-wal` stamps.

use super::*;

impl Scheduler<'_> {
    /// After a start: databases written while no agent ran (or whose commit signal a killed
    /// agent had read but not acted on) are caught up. A database that was ever hot has a
    /// saved `-wal` stamp: from its last demotion, or [`HOT_STAMP`] while hot; a stamp that
    /// differs now means a write the replica may lack. Any other database is caught up if its
    /// file or `-wal` changed since the agent first watched this host (`watch_start_ns`), so
    /// installing the agent does not upload every database (unless `baseline`), and nothing
    /// written after that is missed.
    pub(super) fn recover(
        &mut self,
        watch_start_ns: u64,
        baseline: bool,
    ) -> Result<(), crate::replicate::state::StateError> {
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
                if stamp == HOT_STAMP || !self.arena.same_wal(id, WalStamp::from_raw(stamp)) {
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

    /// Scans, idle demotions, WAL polls of hot databases, gauges.
    pub(super) fn housekeeping(&mut self) {
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
                !h.job.running()
                    && !h.dirty
                    && !h.demoting
                    && h.last_write.elapsed() >= multi.idle_timeout
            })
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            self.start_demotion(id);
        }
        self.forget_old_echoes();
        self.retry_deferred_leases();
        self.update_gauges();
    }

    /// Databases written while another host's lease refused them: asked for again once the
    /// lease may have ended.
    fn retry_deferred_leases(&mut self) {
        let now = Instant::now();
        let due: Vec<(DbId, u64)> = self
            .refused
            .iter()
            .filter(|(_, r)| r.code == reason::LEASED && r.retry_at.is_none_or(|at| at <= now))
            .filter_map(|(&id, r)| r.deferred_ns.map(|ns| (id, ns)))
            .collect();
        for (id, since_ns) in due {
            self.request_promotion(id, since_ns);
        }
    }

    /// Applications without the extension send no records: a hot database's `-wal` stamp
    /// changing is their commit signal (one `stat` per hot database per `sync_interval`).
    pub(super) fn poll_hot_wals(&mut self) {
        let now_ns = layout::now_ns();
        let changed: Vec<DbId> = self
            .hot
            .iter()
            .filter(|(_, h)| {
                !h.job.running() && !h.dirty && WalStamp::of_wal(&h.path) != h.wal_stamp
            })
            .map(|(&id, _)| id)
            .collect();
        for id in changed {
            self.on_write(id, now_ns, Signal::Detected);
        }
    }

    pub(super) fn rescan(&mut self) {
        self.last_scan = Instant::now();
        self.rescan_soon = None;
        let report =
            match crate::discover::discovery::scan(&self.config.multi_db.pattern, self.arena) {
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
                    self.ring_file.ring().remove_status(hot.dev, hot.ino);
                }
            }
            self.refused.retain(|id, _| self.arena.is_live(*id));
            self.refusals_logged.retain(|id, _| self.arena.is_live(*id));
            self.maintaining.retain(|id| self.arena.is_live(*id));
            self.waiting.retain(|&(id, _)| self.arena.is_live(id));
            self.waiting_set = self.waiting.iter().map(|&(id, _)| id).collect();
        }
        let now = layout::now_ns();
        // A database created since the last scan is new content, unless it is still an empty
        // file (its first write will show in its `-wal`).
        let created = diff.added.iter().filter(|&&id| {
            self.arena.has_wal(id)
                || std::fs::metadata(self.arena.path(id)).is_ok_and(|m| m.len() > 0)
        });
        let written: Vec<DbId> = diff.changed.iter().chain(created).copied().collect();
        if !diff.added.is_empty() || !diff.removed.is_empty() {
            self.check_collisions();
        }
        if !diff.added.is_empty() || (self.watches.enabled() && self.watches.unwatched() > 0) {
            self.watch_new_dirs();
        }
        for id in written {
            self.on_write(id, now, Signal::Detected);
        }
        tracing::debug!(
            ms = self.last_scan_ms,
            added = diff.added.len(),
            removed = diff.removed.len(),
            changed = diff.changed.len(),
            "scan"
        );
    }
}
