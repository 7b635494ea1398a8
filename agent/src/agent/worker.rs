//! Sync workers and maintenance workers. A sync job owns its database's [`Replicator`]
//! while it runs (open, sync, checkpoint, close), so a worker and the scheduler share nothing
//! but channels; maintenance (compaction, snapshots, retention) runs on workers of its own, so
//! a slow store's compaction never delays the next commit's upload.

use super::*;

pub(super) struct WorkerContext {
    pub(super) tmp_dir: PathBuf,
    pub(super) store: Arc<StateStore>,
    /// `replica_template.litestream_compatible`.
    pub(super) litestream_compatible: bool,
    pub(super) leases: LeaseKeeper,
}

impl WorkerContext {
    /// [`WorkerContext::work`], with a panic turned into that database's failed sync (its
    /// replicator is dropped, so the next attempt opens the database afresh): a bug hit by
    /// one database never leaves it "busy" or takes a worker away.
    pub(super) fn work_catching_panics(&self, job: Job) -> Done {
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
        match replicator.cycle(job.checkpoint_due || job.kind == JobKind::Demote) {
            Ok(cycle) => {
                done.result = Ok(cycle.synced);
                done.checkpointed = cycle.checkpointed;
            }
            Err(e) => {
                done.failed(&e);
                if done.replaced || done.refusal.is_some() {
                    // The replicator (and every handle on the old file) goes, and its file
                    // id no longer names the database at the path.
                    done.file_id = None;
                    return done;
                }
            }
        }
        done.txid = replicator.txid();
        done.wal_frames = replicator.wal_frames();
        let closing = job.kind == JobKind::Demote && done.result.is_ok();
        done.replicator = (!closing).then_some(replicator);
        done
    }

    /// Opens the database's replicator, under this agent's lease on its location (taken
    /// here, before the first write of a promotion; a cold database holds none).
    fn open(&self, job: &Job) -> Result<Replicator, ReplicateError> {
        refuse_another_identity(job)?;
        let (client, previous) =
            self.leases
                .lease(&job.url)
                .map_err(|error| ReplicateError::Leased {
                    db: job.path.display().to_string(),
                    error,
                })?;
        Ok(Replicator::open(&job.path, client, &self.tmp_dir)?
            .with_state(self.store.clone())
            .with_fields(job.fields.clone())
            .with_previous_lease(previous)
            .litestream_compatible(self.litestream_compatible))
    }
}

/// Refuses, before taking its lease, a location whose identity names another database: a
/// location that is not this database's gets nothing from it, not even a lease object. (The
/// replicator checks again under the lease, where it also takes over a moved tenant's.)
fn refuse_another_identity(job: &Job) -> Result<(), ReplicateError> {
    let db = job.path.display().to_string();
    let replica_err = |error| ReplicateError::Replica {
        db: db.clone(),
        error,
    };
    let client = job.url.client().map_err(replica_err)?;
    let Some(bytes) = client.read_identity().map_err(replica_err)? else {
        return Ok(());
    };
    if crate::replica::identity_database(&bytes).is_err() {
        // Unreadable (or cut short by a failing link): the replicator's own check decides.
        return Ok(());
    }
    match crate::replica::identity_match(&bytes, &db, Some(&job.fields)) {
        crate::replica::IdentityMatch::Other { holder } => Err(ReplicateError::Identity {
            db: db.clone(),
            location: client.url(),
            holder,
        }),
        _ => Ok(()),
    }
}

/// One maintenance pass over a replica; failures are logged and retried at the next pass.
pub(super) fn maintain(
    job: &MaintenanceJob,
    tmp_dir: &std::path::Path,
    policy: &crate::replicate::compaction::Policy,
) {
    // Under the lease like every write: a location another host took over is its to maintain.
    let run = || match job.leases.lease(&job.url) {
        Ok((client, _)) => crate::replicate::compaction::maintain_logged(
            client.as_ref(),
            tmp_dir,
            policy,
            &job.path,
        ),
        Err(LeaseError::Held { .. } | LeaseError::Stopped { .. }) => {
            tracing::debug!(db = %job.path, "maintenance skipped: another host holds the replica's lease")
        }
        Err(e) => tracing::warn!(db = %job.path, error = %e, "compaction or retention failed"),
    };
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        tracing::error!(db = %job.path, panic = %panic_message(&panic), "maintenance panicked; it runs again at the next pass");
    }
}
