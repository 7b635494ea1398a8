//! What the agent tells applications and operators: status-table entries in the ring (one
//! per hot, demoted or refused database), refusals with their reasons, collision checks,
//! the ring's own survival, and the gauges of `multidb status` and the metrics.

use super::*;

impl Scheduler<'_> {
    /// Writes `hot`'s entry in the ring's status table, evicting entries of demoted databases
    /// when the table is full.
    pub(super) fn publish(&mut self, status: Status) {
        let capacity = self.ring_file.ring().status_capacity();
        while self.cold_entries.len() > capacity / 4 {
            if let Some((dev, ino)) = self.cold_entries.pop_front() {
                self.remove_cold_entry(dev, ino);
            }
        }
        while !self.ring_file.ring().publish_status(&status) {
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

    pub(super) fn status_of(hot: &Hot, tier: Tier) -> Status {
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

    pub(super) fn remove_cold_entry(&self, dev: u64, ino: u64) {
        let still_cold = self
            .ring_file
            .ring()
            .status(dev, ino)
            .is_some_and(|s| s.tier == Tier::Cold || s.tier == Tier::Refused);
        if still_cold {
            self.ring_file.ring().remove_status(dev, ino);
        }
    }

    /// Moves `id`'s status entry to the file its replicator reads, when that is not the one
    /// it was published for (the file was replaced at its path).
    pub(super) fn move_status(&mut self, id: DbId, dev: u64, ino: u64) {
        let Some(hot) = self.hot.get_mut(&id) else {
            return;
        };
        if (hot.dev, hot.ino) == (dev, ino) {
            return;
        }
        self.ring_file.ring().remove_status(hot.dev, hot.ino);
        hot.dev = dev;
        hot.ino = ino;
        let status = Self::status_of(hot, Tier::Hot);
        self.publish(status);
    }

    /// A scan saw a new inode at a hot database's path: every handle on the old file goes
    /// (unless a job holds them; it notices the replacement itself) and the next sync opens
    /// the new file, whose history starts with a snapshot.
    pub(super) fn follow_inode(&mut self, id: DbId) {
        let (dev, ino) = self.arena.inode(id);
        let Some(hot) = self.hot.get_mut(&id) else {
            return;
        };
        if (hot.dev, hot.ino) == (dev, ino) {
            return;
        }
        tracing::info!(db = %hot.path, "database file replaced at its path; its replica continues with a snapshot of the new file");
        if let JobState::Idle(replicator) = &mut hot.job {
            *replicator = None; // every handle on the old file goes now
        }
        self.move_status(id, dev, ino);
    }

    /// Stops replicating `id` (if it is hot) and publishes why, for `multidb_wait`,
    /// `multidb_status()`, `multidb status` and the metrics, and logs it (a repeated reason at
    /// most once per [`REFUSAL_LOG_EVERY`]).
    pub(super) fn refuse(&mut self, id: DbId, code: u32, message: String) {
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
                self.ring_file.ring().remove_status(hot.dev, hot.ino);
            }
        }
        self.waiting_set.remove(&id);
        self.waiting.retain(|&(w, _)| w != id);
        // The same reason again (its message may differ in a figure, such as how long a lease
        // went unrenewed) is logged once a minute at most, even though the database is
        // promoted and refused again at each commit: a full disk or an unreachable store would
        // otherwise log a line per commit.
        let now = Instant::now();
        let logged = self.refusals_logged.get(&id).is_some_and(|&(logged, at)| {
            logged == code && now.duration_since(at) < REFUSAL_LOG_EVERY
        });
        if !logged {
            tracing::warn!(db = %self.arena.path(id), reason = %message, "not replicated");
            self.refusals_logged.insert(id, (code, now));
        }
        self.metrics.record_refusal(&self.arena.path(id), message);
        self.refused.insert(
            id,
            Refusal {
                code,
                since: now,
                retry_at: None,
                deferred_ns: None,
            },
        );
        self.publish(refused_entry(dev, ino, code));
        self.fill_hot_tier();
    }

    /// Forgets a refusal that no longer holds.
    pub(super) fn unrefuse(&mut self, id: DbId) {
        if self.refused.remove(&id).is_some() {
            let (dev, ino) = self.arena.inode(id);
            self.ring_file.ring().remove_status(dev, ino);
            self.metrics.clear_error(&self.arena.path(id));
        }
    }

    /// Refuses every database that shares its replica location with another, and forgets
    /// collisions that ended (one of the two was removed or renamed).
    pub(super) fn check_collisions(&mut self) {
        let started = Instant::now();
        let shared = crate::discover::collisions::find(
            self.arena,
            &self.config.multi_db.pattern,
            &self.template,
        );
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
            let location = crate::discover::collisions::location_of(
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
    pub(super) fn check_ring(&mut self) {
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
        let old = std::mem::replace(&mut self.ring_file, Arc::new(fresh));
        old.ring().retire();
        self.old_rings.push(old);
        let _ = self.ring_tx.send(self.ring_file.clone());
        tracing::warn!(ring = %self.ring_path.display(), "the ring file was removed or replaced; made a new one");
        // The new table: every hot and refused database again.
        self.cold_entries.clear();
        let statuses: Vec<Status> = self
            .hot
            .values()
            .map(|h| Self::status_of(h, Tier::Hot))
            .collect();
        for status in statuses {
            self.publish(status);
        }
        let refused: Vec<(DbId, u32)> = self.refused.iter().map(|(&id, r)| (id, r.code)).collect();
        for (id, code) in refused {
            let (dev, ino) = self.arena.inode(id);
            self.publish(refused_entry(dev, ino, code));
        }
        // Commits signalled into the old ring after it was removed: a scan finds them.
        self.rescan_soon = Some(Instant::now() + Duration::from_secs(3));
    }

    pub(super) fn update_gauges(&mut self) {
        let stats = self.ring_file.ring().stats();
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
            in_flight: self.hot.values().filter(|h| h.job.running()).count() as u64,
            max_active: u64::from(self.config.multi_db.max_active),
            last_scan_ms: self.last_scan_ms,
            ring_dropped: stats.dropped,
            ring_invalid: stats.invalid,
            ring_skipped: stats.skipped,
            ring_fill: stats.fill(),
            ring_capacity: stats.capacity,
            refused: self.refused.len() as u64,
            oldest_unreplicated_ms: oldest_ms,
            watched_dirs: self.watches.watched(),
            unwatched_dirs: self.watches.unwatched(),
        });
    }
}
