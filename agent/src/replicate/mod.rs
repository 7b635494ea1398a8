//! Replicating one database: committed WAL frames become one level-0 LTX file per sync.
//!
//! The replicator keeps a read transaction open on its own connection, as Litestream does:
//! while it is open SQLite can neither restart nor truncate the WAL, so frames cannot vanish
//! before they are read. Each sync reads the frames committed past the last position straight
//! from the `-wal` file (validating salts and the running checksum), writes the latest version
//! of each changed page into one LTX file (streamed through a temporary file: memory grows with
//! the number of distinct pages, never with their data), uploads it, and only then advances
//! the position. Between syncs the transaction is restarted so checkpoints can progress.
//!
//! A per-page checksum table gives each file its pre- and post-apply database checksums. When
//! the WAL's continuity breaks (a new generation after a checkpoint restarted or truncated it,
//! or a WAL deleted on close), the database file is read and its checksum compared with the
//! replicated state: equal means nothing was missed and replication simply continues in the
//! new WAL; anything else is answered with a level-9 snapshot, never a silent skip.
//!
//! The raw descriptor on the database file is opened before the connection and closed after
//! it: closing any descriptor of a file drops every POSIX lock the process holds on it,
//! including SQLite's read lock (hazard 8 in DESIGN.md).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use crate::ltx::{self, Encoder, Header};
use crate::replica::{ReplicaClient, ReplicaError, SNAPSHOT_LEVEL};
use wal::{WalHeader, WalPosition};

pub mod catalogue;
mod checkpoint;
pub mod compaction;
pub mod fleet;
pub mod follow;
mod open;
pub mod restore;
mod resume;
mod run;
mod ship;
pub mod sqlfile;
pub mod state;
pub mod wal;
pub mod workdir;

use open::open_connection;
pub use run::{run_with, RunOptions};

/// A PASSIVE checkpoint runs after a sync once the WAL holds this many frames: SQLite's own
/// default threshold, so the WAL stays as small as without multidb.
pub const CHECKPOINT_FRAMES: u64 = 1000;
/// Past this many frames the checkpoint is TRUNCATE: the WAL file shrinks back to nothing.
pub const TRUNCATE_FRAMES: u64 = 10 * CHECKPOINT_FRAMES;
/// A WAL holding frames is checkpointed at least this often, even below the threshold.
pub const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// How often a written database's replica is compacted and pruned: half the level-1
/// interval, so level 1 follows its 30 s windows.
pub const MAINTENANCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

/// What can go wrong replicating a database.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error("{db}: {op}: {error}")]
    Io {
        db: String,
        op: &'static str,
        error: io::Error,
    },
    #[error("{db}: {op}: {error}")]
    Sqlite {
        db: String,
        op: &'static str,
        error: rusqlite::Error,
    },
    #[error("{db}: {error}")]
    Replica { db: String, error: ReplicaError },
    #[error("{db}: LTX {op}: {error}")]
    Ltx {
        db: String,
        op: &'static str,
        error: ltx::LtxError,
    },
    #[error("{db}: not in WAL mode (journal_mode={mode}); multidb replicates WAL databases")]
    NotWal { db: String, mode: String },
    /// The replica location holds another database's history (or an identity that cannot
    /// be read): appending would mix two histories, so nothing is written.
    #[error("{db}: the replica {location} holds the history of {holder}, not of this database; refusing to write to it (another database, configuration or host uses this location; remove its multidb.json only if that history is no longer wanted)")]
    Identity {
        db: String,
        location: String,
        holder: String,
    },
    /// Another host holds the replica location's lease: it replicates this tenant now.
    #[error("{db}: {error}")]
    Leased {
        db: String,
        error: crate::replica::lease::LeaseError,
    },
    /// The file at the database's path is not the one this replicator opened (deleted,
    /// recreated or replaced by `mv`): its history ends here.
    #[error("{db}: the database file was replaced or removed at its path")]
    Replaced { db: String },
}
impl ReplicateError {
    /// A failed write of the temporary LTX file `tmp`, with the file named.
    fn naming_staged(self, tmp: &Path) -> ReplicateError {
        match self {
            ReplicateError::Ltx {
                db,
                op,
                error: ltx::LtxError::Write { error },
            } => ReplicateError::Io {
                db,
                op,
                error: naming(error, tmp),
            },
            other => other,
        }
    }
}

/// `error` with the file it happened to in its message, its kind kept.
fn naming(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// What one [`Replicator::cycle`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cycle {
    /// The file the sync wrote, if anything was new.
    pub synced: Option<Synced>,
    /// Whether a checkpoint ran.
    pub checkpointed: bool,
}

/// What one sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub txid: u64,
    pub level: u8,
    pub pages: usize,
    pub bytes: u64,
    /// Why a snapshot was taken, if this sync wrote one.
    pub snapshot_reason: Option<&'static str>,
    /// The WAL offset replicated through (the position after the last commit frame read).
    pub wal_offset: u64,
}

/// The replicated state: everything needed to continue from the last TXID.
#[derive(Debug, Clone)]
struct State {
    txid: u64,
    pos: WalPosition,
    page_size: u32,
    db_pages: u32,
    /// Checksum of each page at `txid` (index pgno-1; 0 for the lock page).
    page_sums: Vec<u64>,
    db_checksum: u64,
}

/// A replicated state as something outside memory records it (the replica's newest file, or
/// the state database), to be verified against the database before it is trusted.
#[derive(Debug, Clone, Copy)]
struct Claim {
    txid: u64,
    page_size: u32,
    db_pages: u32,
    /// Salts of the WAL generation the state ends in.
    salts: (u32, u32),
    /// WAL offset after the last replicated commit (0: not from a WAL).
    end: u64,
    /// Database checksum at `txid`.
    checksum: u64,
}

/// Where a replicator starts when it has no state in memory.
enum Recovery {
    /// The replica is empty: the first snapshot is TXID 1.
    Empty,
    /// The database still matches the replica's newest file: continue after it.
    Resume(State),
    /// The database moved on in a way that cannot be followed: snapshot after TXID `after`.
    Snapshot { after: u64 },
}

/// Replicates one database to one replica.
pub struct Replicator {
    conn: rusqlite::Connection,
    /// The database file, read through `conn`'s own descriptor (see [`crate::replicate::sqlfile`]).
    db_file: crate::replicate::sqlfile::MainFile,
    db_path: PathBuf,
    wal_path: PathBuf,
    replica: Box<dyn ReplicaClient>,
    tmp_dir: PathBuf,
    state: Option<State>,
    pinned: bool,
    page: Vec<u8>,
    /// Where positions are saved after each acknowledged upload, if anywhere.
    store: Option<std::sync::Arc<crate::replicate::state::StateStore>>,
    /// (device, inode) of the file `conn` opened.
    file_id: (u64, u64),
    /// Whether the replica's identity was found to name this database (or was created).
    identity_checked: bool,
    /// Files go out without database checksums, as Litestream 0.5.17 writes them.
    litestream_compatible: bool,
    /// The fields the pattern captured from the path, recorded in the identity object: the
    /// same fields under another path are this tenant moved.
    fields: Option<crate::discover::pattern::Fields>,
    /// Whether a position saved in the state directory may be resumed from: not when another
    /// host wrote the replica since (its lease was another's, or the identity named another
    /// path), since the replica may have moved past it.
    trust_saved: bool,
}

impl Drop for Replicator {
    fn drop(&mut self) {
        // Explicit for the reader: `conn` is declared first, so it is closed first.
        let _ = self.conn.execute_batch("ROLLBACK");
    }
}

impl Replicator {
    fn sql_err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> ReplicateError {
        let db = self.name();
        move |source| ReplicateError::Sqlite {
            db,
            op,
            error: source,
        }
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> ReplicateError {
        let db = self.name();
        move |source| ReplicateError::Io {
            db,
            op,
            error: source,
        }
    }

    fn ltx_err(&self, op: &'static str) -> impl FnOnce(ltx::LtxError) -> ReplicateError {
        let db = self.name();
        move |source| ReplicateError::Ltx {
            db,
            op,
            error: source,
        }
    }

    /// An error encoding the temporary LTX file `tmp`; a failed write names the file (a full
    /// disk must say which disk).
    fn staged_err<'a>(
        &self,
        op: &'static str,
        tmp: &'a Path,
    ) -> impl FnOnce(ltx::LtxError) -> ReplicateError + 'a {
        let ltx_err = self.ltx_err(op);
        move |source| ltx_err(source).naming_staged(tmp)
    }

    fn replica_err(&self) -> impl FnOnce(ReplicaError) -> ReplicateError {
        let db = self.name();
        move |error| ReplicateError::Replica { db, error }
    }

    /// Where this database is replicated.
    pub fn replica(&self) -> &dyn ReplicaClient {
        self.replica.as_ref()
    }

    /// The last replicated TXID (0 before the first sync).
    pub fn txid(&self) -> u64 {
        self.state.as_ref().map_or(0, |s| s.txid)
    }

    /// Frames in the current WAL generation up to the replicated position.
    pub fn wal_frames(&self) -> u64 {
        self.state.as_ref().map_or(0, |s| {
            s.pos.offset.saturating_sub(wal::WAL_HEADER_SIZE)
                / (wal::FRAME_HEADER_SIZE + u64::from(s.page_size))
        })
    }

    /// Starts the read transaction that keeps SQLite from restarting the WAL.
    fn pin(&mut self) -> Result<(), ReplicateError> {
        if !self.pinned {
            self.conn
                .execute_batch("BEGIN")
                .map_err(self.sql_err("begin read transaction"))?;
            self.conn
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(self.sql_err("read transaction"))?;
            self.pinned = true;
        }
        Ok(())
    }

    fn unpin(&mut self) -> Result<(), ReplicateError> {
        if self.pinned {
            self.conn
                .execute_batch("ROLLBACK")
                .map_err(self.sql_err("end read transaction"))?;
            self.pinned = false;
        }
        Ok(())
    }

    fn open_wal(&self) -> Result<Option<(File, WalHeader)>, ReplicateError> {
        let file = match File::open(&self.wal_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_err("open WAL")(e)),
        };
        Ok(wal::read_header(&file)
            .map_err(self.io_err("read WAL header"))?
            .map(|h| (file, h)))
    }

    /// Replicates what has been committed since the last sync. `None` if nothing was new.
    pub fn sync(&mut self) -> Result<Option<Synced>, ReplicateError> {
        self.pin()?;
        let result = self.sync_pinned();
        if matches!(result, Ok(Some(_))) {
            self.save_position();
        }
        result
    }

    /// One replication cycle, the same for the agent's workers and `multidb replicate`:
    /// sync what is committed, move the pin past it, and checkpoint when the WAL is long or
    /// `checkpoint_due` (the interval passed). Only the sync's failure is an error; a failed
    /// repin or checkpoint is logged and tried again next cycle.
    pub fn cycle(&mut self, checkpoint_due: bool) -> Result<Cycle, ReplicateError> {
        let synced = self.sync()?;
        if let Err(e) = self.repin() {
            tracing::warn!(db = %self.db_path.display(), error = %e, "moving the read transaction failed");
        }
        let checkpointed = match self.checkpoint_if_needed(checkpoint_due) {
            Ok(ran) => ran,
            Err(e) => {
                tracing::warn!(db = %self.db_path.display(), error = %e, "checkpoint failed");
                false
            }
        };
        Ok(Cycle {
            synced,
            checkpointed,
        })
    }

    /// Moves the pin forward to the end of the WAL, right after a sync. This is the only
    /// moment SQLite can restart the WAL, and it can only if a checkpoint copied every frame;
    /// checkpoints run under a pin, which every sync reads past before it is moved, so every
    /// frame a restart discards was replicated.
    pub fn repin(&mut self) -> Result<(), ReplicateError> {
        self.unpin()?;
        self.pin()
    }

    fn sync_pinned(&mut self) -> Result<Option<Synced>, ReplicateError> {
        let wal = self.open_wal()?;
        // After opening the `-wal` by name: if the path still names our file now, the `-wal`
        // is not a newer database's (a file recreated at the path brings its own).
        if self.replaced() {
            return Err(ReplicateError::Replaced { db: self.name() });
        }
        if self.state.is_none() {
            if let Some(state) = self.resume_from_store(wal.as_ref())? {
                self.state = Some(state);
                // A saved position means this agent wrote here, after checking the identity.
                self.identity_checked = true;
            }
        }
        if self.state.is_none() {
            self.check_identity()?;
            match self.recover(wal.as_ref())? {
                Recovery::Resume(state) => self.state = Some(state),
                Recovery::Empty => {
                    return self
                        .snapshot(wal.as_ref(), 1, "first replication")
                        .map(Some)
                }
                Recovery::Snapshot { after } => {
                    return self
                        .snapshot(
                            wal.as_ref(),
                            after + 1,
                            "database changed beyond the replica's newest TXID",
                        )
                        .map(Some)
                }
            }
        }
        let state = self.state.as_ref().expect("recovered or snapshotted above");
        let next_txid = state.txid + 1;
        let continues = wal
            .as_ref()
            .is_some_and(|(_, h)| h.continues(&state.pos) && h.page_size == state.page_size);
        if !continues {
            // A new WAL generation or no WAL: continue only if the database file is exactly
            // the replicated state (every frame of the old generation was replicated).
            if !self.db_file_matches_state()? {
                return self
                    .snapshot(
                        wal.as_ref(),
                        next_txid,
                        "WAL restarted or removed with unreplicated frames",
                    )
                    .map(Some);
            }
            let state = self.state.as_mut().expect("checked above");
            match &wal {
                Some((_, header)) => state.pos = header.start(),
                None => {
                    // No WAL: nothing to read until SQLite starts a new one.
                    state.pos = WalPosition::default();
                    return Ok(None);
                }
            }
        }
        let (file, header) = wal.as_ref().expect("a continuing WAL exists");
        let from = self.state.as_ref().expect("set").pos;
        let mut page = std::mem::take(&mut self.page);
        let committed =
            wal::read_committed(file, header, from, &mut page).map_err(self.io_err("read WAL"));
        self.page = page;
        let committed = committed?;
        if committed.frames.is_empty() {
            if from.offset > wal::WAL_HEADER_SIZE
                && file.metadata().map_or(0, |m| m.len()) < from.offset
            {
                return self
                    .snapshot(
                        wal.as_ref(),
                        next_txid,
                        "WAL shorter than the replicated position",
                    )
                    .map(Some);
            }
            return Ok(None);
        }
        self.incremental(file, header, committed).map(Some)
    }
}

fn finish_file(out: BufWriter<File>, path: &Path) -> io::Result<u64> {
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(std::fs::metadata(path)?.size())
}
