//! What passes between the agent's threads: events for the scheduler (ring records and
//! inotify changes), sync and maintenance jobs for the workers, what a finished job reports
//! ([`Done`], with a failure classified into a refusal or a retry), and who holds a hot
//! database's replicator while a job runs.

use super::*;

/// A database refused because another host holds its replica's lease is looked at again
/// after the lease's remaining time, but at most this long after (a holder that stops
/// cleanly releases early) and only at its next write: one lease read per write spell.
const LEASE_RECHECK: Duration = Duration::from_secs(5);

pub(super) enum Event {
    Commit {
        dev: u64,
        ino: u64,
        time_ns: u64,
    },
    Register {
        dev: u64,
        ino: u64,
        path: Vec<u8>,
    },
    /// A change in a watched leaf directory (inotify).
    Fs(watch::FsEvent),
}

/// What told the scheduler a database was written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Signal {
    /// A commit record from the ring.
    Commit,
    /// A scan or `-wal` poll saw the files change (maybe the agent's own checkpoint).
    Detected,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum JobKind {
    Sync,
    /// Final sync, checkpoint, close.
    Demote,
}

pub(super) struct Job {
    pub(super) id: DbId,
    pub(super) kind: JobKind,
    pub(super) path: PathBuf,
    pub(super) url: ReplicaUrl,
    pub(super) fields: Fields,
    pub(super) replicator: Option<Replicator>,
    pub(super) checkpoint_due: bool,
    pub(super) started_ns: u64,
}

/// Compaction, snapshots and retention of one replica, on a maintenance worker.
pub(super) struct MaintenanceJob {
    pub(super) id: DbId,
    pub(super) path: String,
    pub(super) url: ReplicaUrl,
    pub(super) leases: LeaseKeeper,
}

pub(super) struct Done {
    pub(super) id: DbId,
    pub(super) kind: JobKind,
    pub(super) replicator: Option<Replicator>,
    pub(super) result: Result<Option<Synced>, String>,
    pub(super) started_ns: u64,
    pub(super) checkpointed: bool,
    /// The `-wal` stamp taken before a demotion's final sync.
    pub(super) stamp: WalStamp,
    pub(super) wal_frames: u64,
    pub(super) txid: u64,
    /// The database is not to be replicated (not in WAL mode, or its replica holds another
    /// database): a [`reason`] code and the message.
    pub(super) refusal: Option<(u32, String)>,
    /// The file at the path is not the one the job's replicator had open.
    pub(super) replaced: bool,
    /// With a refusal: when to look again at the earliest (another host's lease expires).
    pub(super) retry_after: Option<Duration>,
    /// (device, inode) of the file the replicator reads.
    pub(super) file_id: Option<(u64, u64)>,
}

impl Done {
    pub(super) fn new(job: &Job) -> Done {
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
            retry_after: None,
            file_id: None,
        }
    }

    /// Classifies a failed open or sync.
    pub(super) fn failed(&mut self, e: &ReplicateError) {
        self.result = Err(e.to_string());
        match e {
            ReplicateError::NotWal { .. } => self.refusal = Some((reason::NOT_WAL, e.to_string())),
            ReplicateError::Identity { .. } => {
                self.refusal = Some((reason::IDENTITY, e.to_string()))
            }
            ReplicateError::Replaced { .. } => self.replaced = true,
            ReplicateError::Leased { error, .. } => {
                let transient = matches!(
                    error,
                    LeaseError::Replica(_)
                        | LeaseError::Contended { .. }
                        | LeaseError::Stopped { .. }
                );
                if !transient {
                    self.refusal = Some((reason::LEASED, e.to_string()));
                    self.retry_after = Some(
                        error
                            .remaining()
                            .unwrap_or(LEASE_RECHECK)
                            .min(LEASE_RECHECK),
                    );
                }
            }
            ReplicateError::Replica {
                error: crate::replica::ReplicaError::LeaseLost { .. },
                ..
            } => {
                // The replicator goes with its lost lease; the next write asks for the lease
                // again, which another host holds now or which this one takes back.
                self.refusal = Some((reason::LEASED, e.to_string()));
                self.retry_after = Some(Duration::ZERO);
            }
            _ => {}
        }
    }
}

/// Who has a hot database's replicator: the scheduler (idle, with the replicator once a job
/// opened it) or a worker (running: the job owns it and hands it back in [`Done`]). A running
/// database has no replicator here, so nothing can touch one a worker uses.
// Inline, as the `Option<Replicator>` it replaces was: one per hot database, and a box would
// cost an allocation per job for no saving.
#[allow(clippy::large_enum_variant)]
pub(super) enum JobState {
    Idle(Option<Replicator>),
    Running,
}

impl JobState {
    pub(super) fn running(&self) -> bool {
        matches!(self, JobState::Running)
    }
}
