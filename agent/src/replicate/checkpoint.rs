//! Checkpoints are the replicator's: PASSIVE under the pin, TRUNCATE when caught up.

use super::*;

impl Replicator {
    /// Checkpoints after a sync, so the WAL stays bounded: PASSIVE (never blocks writers)
    /// once it holds [`CHECKPOINT_FRAMES`] frames or `force` says the interval passed, and
    /// TRUNCATE past [`TRUNCATE_FRAMES`], when PASSIVE checkpoints cannot keep up.
    ///
    /// PASSIVE runs on a second connection while the first stays pinned: SQLite then copies
    /// only frames up to the pinned snapshot and cannot restart the WAL, so the only moment a
    /// restart can happen is inside [`Replicator::sync`], after every frame up to the
    /// checkpointed point was read. TRUNCATE must release the pin; a commit that races in then
    /// is not lost either: the restart it causes is caught by the database-checksum check.
    pub fn checkpoint_if_needed(&mut self, force: bool) -> Result<bool, ReplicateError> {
        let frames = self.wal_frames();
        if frames == 0 || (frames < CHECKPOINT_FRAMES && !force) {
            return Ok(false);
        }
        // TRUNCATE releases the pin, so it runs only while nothing was written past the
        // replicated position (a write racing in after this check costs a snapshot, no data).
        let wal_len = std::fs::metadata(&self.wal_path).map_or(0, |m| m.len());
        let caught_up = self.state.as_ref().is_some_and(|s| s.pos.offset == wal_len);
        // A writer that never pauses is never caught up: past twice the limit the WAL is
        // truncated anyway, and a commit that raced in costs one snapshot.
        let truncate = frames >= TRUNCATE_FRAMES && (caught_up || frames >= 2 * TRUNCATE_FRAMES);
        // A connection of its own, opened for this checkpoint only: `conn` stays pinned
        // meanwhile, and a hot database holds no descriptors beyond `conn`'s between
        // checkpoints.
        let checkpointer =
            open_connection(&self.db_path).map_err(self.sql_err("open checkpoint connection"))?;
        if truncate {
            self.unpin()?;
        }
        let mode = if truncate { "TRUNCATE" } else { "PASSIVE" };
        let result = checkpointer
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(self.sql_err("checkpoint"));
        drop(checkpointer);
        self.pin()?;
        let (busy, log, done) = result?;
        tracing::debug!(db = %self.db_path.display(), mode, busy, log, done, "checkpoint");
        Ok(true)
    }
}
