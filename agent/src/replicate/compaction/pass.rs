//! One maintenance pass: its state ([`Maintenance`]) and its steps, listing each level at
//! most once, compacting a due level, writing a periodic snapshot, enforcing retention, and
//! deleting what retention no longer needs (lower levels first, snapshots last).

use super::*;

/// One call's state: the listings made so far (each level at most once) and the report.
pub(super) struct Maintenance<'a> {
    pub(super) replica: &'a dyn ReplicaClient,
    pub(super) tmp_dir: &'a Path,
    pub(super) now: SystemTime,
    pub(super) policy: &'a Policy,
    pub(super) listed: [Option<Vec<FileInfo>>; SNAPSHOT_LEVEL as usize + 1],
    pub(super) report: Report,
}

impl Maintenance<'_> {
    /// The files at `level`, listed on first use and kept up to date with what this call
    /// writes and deletes.
    fn files(&mut self, level: u8) -> Result<&[FileInfo], MaintainError> {
        let slot = &mut self.listed[usize::from(level)];
        if slot.is_none() {
            let files = self
                .replica
                .list(level)
                .map_err(|source| MaintainError::List {
                    url: self.replica.url(),
                    level,
                    error: source,
                })?;
            self.report.lists += 1;
            *slot = Some(files);
        }
        Ok(slot.as_deref().unwrap_or_default())
    }

    fn newest(&mut self, level: u8) -> Result<Option<FileInfo>, MaintainError> {
        Ok(self
            .files(level)?
            .iter()
            .max_by_key(|f| f.max_txid)
            .cloned())
    }

    pub(super) fn location(&self, f: &FileInfo) -> String {
        self.replica.location(f.level, f.min_txid, f.max_txid)
    }

    /// Compacts level `level` from the level below, if due and there is something new.
    pub(super) fn compact_level(&mut self, level: u8) -> Result<(), MaintainError> {
        let interval = self.policy.compaction_intervals[usize::from(level) - 1];
        let newest = self.newest(level)?;
        if !level_due(newest.as_ref(), self.now, interval) {
            return Ok(());
        }
        let after = newest.map_or(0, |f| f.max_txid);
        let run = contiguous_run(self.files(level - 1)?, after);
        let Some(first) = run.first() else {
            return Ok(());
        };
        if after > 0 && first.min_txid != after + 1 {
            tracing::info!(replica = %self.replica.url(), level, after, resume = first.min_txid, "level {} has no file after TXID {after}; compaction resumes past the gap", level - 1);
        }
        let written = self.merge_and_put(level, &run)?;
        self.report.compacted.push(written);
        Ok(())
    }

    /// Writes a new snapshot if the newest one is older than the interval and the replica
    /// reaches past it.
    pub(super) fn snapshot_if_due(&mut self) -> Result<(), MaintainError> {
        let Some(newest) = self.newest(SNAPSHOT_LEVEL)? else {
            return Ok(()); // nothing to build on: the replicator writes the first snapshot
        };
        let age = self.now.duration_since(newest.created).unwrap_or_default();
        if age < self.policy.snapshot_interval {
            return Ok(());
        }
        let mut files = Vec::new();
        for level in [SNAPSHOT_LEVEL, 3, 2, 1, 0] {
            files.extend_from_slice(self.files(level)?);
        }
        let reached = reach(&files, newest.max_txid);
        let latest = files.iter().map(|f| f.max_txid).max().unwrap_or(0);
        if reached < latest {
            tracing::warn!(replica = %self.replica.url(), snapshot = newest.max_txid, reached, latest, "the chain after the newest snapshot has a gap; snapshotting up to it");
        }
        if reached == newest.max_txid {
            return Ok(());
        }
        let chain =
            restore::plan(&files, Target::Txid(reached)).map_err(|e| MaintainError::Plan {
                url: self.replica.url(),
                reason: format!("{e:#}"),
            })?;
        let written = self.merge_and_put(SNAPSHOT_LEVEL, &chain)?;
        self.report.snapshot = Some(written);
        Ok(())
    }

    /// Deletes what no point inside the retention window needs.
    pub(super) fn enforce_retention(&mut self) -> Result<(), MaintainError> {
        let Some(window_start) = self.now.checked_sub(self.policy.retention) else {
            return Ok(());
        };
        let snapshots = self.files(SNAPSHOT_LEVEL)?;
        let Some(base) = snapshots
            .iter()
            .filter(|f| f.created <= window_start)
            .max_by_key(|f| f.max_txid)
            .cloned()
        else {
            return Ok(());
        };
        let older_snapshots: Vec<FileInfo> = snapshots
            .iter()
            .filter(|f| f.max_txid < base.max_txid)
            .cloned()
            .collect();
        let mut lower = Vec::new();
        for level in [3, 2, 1] {
            lower.extend(expired(self.files(level)?, base.max_txid).cloned());
        }
        if older_snapshots.is_empty() && lower.is_empty() && self.listed[0].is_none() {
            return Ok(()); // see the module comment: level 0 is checked when it is listed
        }
        lower.extend(expired(self.files(0)?, base.max_txid).cloned());
        // Lower levels first: while older snapshots remain, the next call finishes the pass.
        self.delete(lower)?;
        self.delete(older_snapshots)
    }

    fn delete(&mut self, files: Vec<FileInfo>) -> Result<(), MaintainError> {
        let Some(first) = files.first() else {
            return Ok(());
        };
        let location = self.location(first);
        self.replica
            .delete(&files)
            .map_err(|source| MaintainError::Delete {
                location,
                count: files.len(),
                error: source,
            })?;
        for f in &files {
            if let Some(listed) = &mut self.listed[usize::from(f.level)] {
                listed.retain(|l| l != f);
            }
        }
        tracing::info!(replica = %self.replica.url(), files = files.len(), first = %first.name(), "retention deleted expired files");
        self.report.deleted.extend(files);
        Ok(())
    }
}
