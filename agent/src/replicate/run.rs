//! `multidb replicate`'s loop for one database: a cycle when the WAL changes, maintenance
//! when due, until told to stop.

use super::*;

/// How `multidb replicate` runs.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Replicate what is committed, then exit.
    pub once: bool,
    /// How often the WAL is looked at for new commits (one `stat`).
    pub poll: std::time::Duration,
    /// The longest wait before retrying after a failed sync.
    pub max_backoff: std::time::Duration,
    /// Write files Litestream 0.5.17 restores ([`Replicator::litestream_compatible`]).
    pub litestream_compatible: bool,
    /// What the lease taken for this run said before ([`Replicator::with_previous_lease`]).
    pub previous_lease: crate::replica::lease::Previous,
}

/// The replication loop: syncs when the WAL changes, until `stop` says so (then one final
/// sync) or after one pass with `once`. `on_sync` sees every sync that wrote a file.
pub fn run_with(
    db: &Path,
    replica: Box<dyn ReplicaClient>,
    tmp_dir: &Path,
    store: Option<std::sync::Arc<crate::replicate::state::StateStore>>,
    options: RunOptions,
    stop: &dyn Fn() -> bool,
    on_sync: &mut dyn FnMut(&Synced),
) -> Result<u64, ReplicateError> {
    let url = replica.url();
    let mut replicator = Replicator::open(db, replica, tmp_dir)?
        .litestream_compatible(options.litestream_compatible)
        .with_previous_lease(options.previous_lease);
    if let Some(store) = store {
        replicator = replicator.with_state(store);
    }
    let mut failures = 0;
    let mut last_stamp = None;
    let policy = crate::replicate::compaction::Policy::default();
    let mut last_maintenance = Instant::now();
    let mut written_since_maintenance = false;
    let mut last_checkpoint = Instant::now();
    loop {
        let stamp = Some(super::wal::WalStamp::of_wal(&db.to_string_lossy()));
        let stopping = stop();
        if stamp != last_stamp || stopping || options.once || replicator.state.is_none() {
            match replicator.cycle(last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL) {
                Ok(Cycle {
                    synced: Some(s),
                    checkpointed,
                }) => {
                    if checkpointed {
                        last_checkpoint = Instant::now();
                    }
                    last_stamp = stamp;
                    failures = 0;
                    let kind = s
                        .snapshot_reason
                        .map_or("sync".to_string(), |why| format!("snapshot ({why})"));
                    tracing::info!(db = %db.display(), replica = %url, txid = s.txid, level = s.level, pages = s.pages, bytes = s.bytes, "{kind}");
                    on_sync(&s);
                    written_since_maintenance = true;
                }
                Ok(Cycle {
                    synced: None,
                    checkpointed,
                }) => {
                    last_stamp = stamp;
                    if checkpointed {
                        last_checkpoint = Instant::now();
                    }
                }
                Err(e) if options.once || stopping => return Err(e),
                Err(e) => {
                    failures += 1;
                    let backoff = crate::time::backoff(
                        failures,
                        options.poll,
                        options.max_backoff,
                        crate::time::random_u64(),
                    );
                    tracing::error!(db = %db.display(), error = %e, retry_ms = backoff.as_millis() as u64, "sync failed");
                    std::thread::sleep(backoff);
                    continue;
                }
            }
        }
        // Compaction and retention only for a database that was written: an idle one costs
        // no replica request at all.
        if written_since_maintenance
            && last_maintenance.elapsed() >= MAINTENANCE_INTERVAL
            && !options.once
        {
            crate::replicate::compaction::maintain_logged(
                replicator.replica.as_ref(),
                tmp_dir,
                &policy,
                &db.display().to_string(),
            );
            last_maintenance = Instant::now();
            written_since_maintenance = false;
        }
        if options.once || stopping {
            return Ok(replicator.txid());
        }
        std::thread::sleep(options.poll);
    }
}
