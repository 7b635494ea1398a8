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
use crate::wal::{self, WalHeader, WalPosition};

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
/// How long the replicator's connection waits for locks before giving up on one attempt.
const BUSY_TIMEOUT_MS: u64 = 5000;

/// What can go wrong replicating a database.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error("{db}: {op}: {source}")]
    Io {
        db: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("{db}: {op}: {source}")]
    Sqlite {
        db: String,
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error("{db}: {source}")]
    Replica { db: String, source: ReplicaError },
    #[error("{db}: LTX {op}: {source}")]
    Ltx {
        db: String,
        op: &'static str,
        source: ltx::LtxError,
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
    /// The file at the database's path is not the one this replicator opened (deleted,
    /// recreated or replaced by `mv`): its history ends here.
    #[error("{db}: the database file was replaced or removed at its path")]
    Replaced { db: String },
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
    /// The database file, read through `conn`'s own descriptor (see [`crate::sqlfile`]).
    db_file: crate::sqlfile::MainFile,
    db_path: PathBuf,
    wal_path: PathBuf,
    replica: Box<dyn ReplicaClient>,
    tmp_dir: PathBuf,
    state: Option<State>,
    pinned: bool,
    page: Vec<u8>,
    /// Where positions are saved after each acknowledged upload, if anywhere.
    store: Option<std::sync::Arc<crate::state::StateStore>>,
    /// (device, inode) of the file `conn` opened.
    file_id: (u64, u64),
    /// Whether the replica's identity was found to name this database (or was created).
    identity_checked: bool,
}

impl Drop for Replicator {
    fn drop(&mut self) {
        // Explicit for the reader: `conn` is declared first, so it is closed first.
        let _ = self.conn.execute_batch("ROLLBACK");
    }
}

impl Replicator {
    /// Opens `db` for replication to `replica`; temporary LTX files go to `tmp_dir`.
    pub fn open(
        db: &Path,
        replica: Box<dyn ReplicaClient>,
        tmp_dir: &Path,
    ) -> Result<Replicator, ReplicateError> {
        let name = db.display().to_string();
        let io_err = |op| {
            let name = name.clone();
            move |source| ReplicateError::Io {
                db: name,
                op,
                source,
            }
        };
        let stat_id = |op| {
            std::fs::metadata(db)
                .map(|m| (m.dev(), m.ino()))
                .map_err(io_err(op))
        };
        let before = stat_id("stat")?;
        let conn = open_connection(db).map_err(|source| ReplicateError::Sqlite {
            db: name.clone(),
            op: "open",
            source,
        })?;
        // The file SQLite opened is the one at the path before and after the open.
        if stat_id("stat")? != before {
            return Err(ReplicateError::Replaced { db: name });
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(|source| ReplicateError::Sqlite {
                db: name.clone(),
                op: "journal_mode",
                source,
            })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ReplicateError::NotWal { db: name, mode });
        }
        let db_file = crate::sqlfile::MainFile::of(&conn).map_err(io_err("open"))?;
        std::fs::create_dir_all(tmp_dir).map_err(io_err("create temp directory"))?;
        let mut wal_path = db.as_os_str().to_owned();
        wal_path.push("-wal");
        Ok(Replicator {
            conn,
            db_file,
            db_path: db.to_path_buf(),
            wal_path: PathBuf::from(wal_path),
            replica,
            tmp_dir: tmp_dir.to_path_buf(),
            state: None,
            pinned: false,
            page: Vec::new(),
            store: None,
            file_id: before,
            identity_checked: false,
        })
    }

    /// (device, inode) of the database file this replicator reads.
    pub fn file_id(&self) -> (u64, u64) {
        self.file_id
    }

    /// Whether the path no longer names the file this replicator opened.
    pub fn replaced(&self) -> bool {
        std::fs::metadata(&self.db_path).map_or(true, |m| (m.dev(), m.ino()) != self.file_id)
    }

    /// Makes sure the replica holds this database's history: its identity object names this
    /// database, or there was none and this call created it (exclusively: of two writers
    /// racing for an empty location, one wins). Checked once per replicator, before its first
    /// write.
    fn check_identity(&mut self) -> Result<(), ReplicateError> {
        if self.identity_checked {
            return Ok(());
        }
        let mine = self.name();
        let refuse = |holder: String| ReplicateError::Identity {
            db: mine.clone(),
            location: self.replica.url(),
            holder,
        };
        for _ in 0..2 {
            match self.replica.read_identity().map_err(self.replica_err())? {
                Some(bytes) => {
                    return match crate::replica::identity_database(&bytes) {
                        Ok(holder) if holder == mine => {
                            self.identity_checked = true;
                            Ok(())
                        }
                        Ok(holder) => Err(refuse(holder)),
                        Err(why) => Err(refuse(format!("an unreadable identity ({why})"))),
                    };
                }
                None => {
                    let body = crate::replica::identity_json(&mine);
                    if self
                        .replica
                        .create_identity(&body)
                        .map_err(self.replica_err())?
                    {
                        self.identity_checked = true;
                        return Ok(());
                    }
                }
            }
        }
        Err(refuse("an identity that keeps changing".into()))
    }

    fn name(&self) -> String {
        self.db_path.display().to_string()
    }

    /// Saves positions in `store` after every upload and resumes from it after a restart,
    /// so a restart does not list and read the replica.
    pub fn with_state(mut self, store: std::sync::Arc<crate::state::StateStore>) -> Replicator {
        self.store = Some(store);
        self
    }

    /// Records the current position in the state database (best effort: the replica is the
    /// source of truth, a lost position only costs a replica read at the next start).
    fn save_position(&self) {
        let (Some(store), Some(state)) = (&self.store, &self.state) else {
            return;
        };
        let position = crate::state::Position {
            txid: state.txid,
            page_size: state.page_size,
            db_pages: state.db_pages,
            wal: state.pos,
            db_checksum: state.db_checksum,
        };
        if let Err(e) = store.save(&self.name(), &self.replica.url(), &position) {
            tracing::warn!(db = %self.db_path.display(), error = %e, "saving the position failed");
        }
    }

    /// The saved position, verified against the database.
    fn resume_from_store(
        &mut self,
        wal: Option<&(File, WalHeader)>,
    ) -> Result<Option<State>, ReplicateError> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let saved = match store.load(&self.name(), &self.replica.url()) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(db = %self.db_path.display(), error = %e, "reading the saved position failed");
                return Ok(None);
            }
        };
        let claim = Claim {
            txid: saved.txid,
            page_size: saved.page_size,
            db_pages: saved.db_pages,
            salts: (saved.wal.salt1, saved.wal.salt2),
            end: saved.wal.offset,
            checksum: saved.db_checksum,
        };
        let state = self.verify(wal, &claim)?;
        if state.is_some() {
            tracing::debug!(db = %self.db_path.display(), txid = saved.txid, "resumed from the state directory");
        }
        Ok(state)
    }

    fn sql_err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> ReplicateError {
        let db = self.name();
        move |source| ReplicateError::Sqlite { db, op, source }
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> ReplicateError {
        let db = self.name();
        move |source| ReplicateError::Io { db, op, source }
    }

    fn ltx_err(&self, op: &'static str) -> impl FnOnce(ltx::LtxError) -> ReplicateError {
        let db = self.name();
        move |source| ReplicateError::Ltx { db, op, source }
    }

    fn replica_err(&self) -> impl FnOnce(ReplicaError) -> ReplicateError {
        let db = self.name();
        move |source| ReplicateError::Replica { db, source }
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

    /// Writes one level-0 file with the pages the committed frames changed.
    fn incremental(
        &mut self,
        wal_file: &File,
        header: &WalHeader,
        committed: wal::Committed,
    ) -> Result<Synced, ReplicateError> {
        let mut state = self.state.clone().expect("incremental needs a state");
        let page_size = state.page_size;
        let lock = ltx::lock_pgno(page_size);
        let new_pages = committed.db_pages;
        // Latest frame of each page, in page order.
        let mut latest: BTreeMap<u32, u64> = BTreeMap::new();
        for frame in &committed.frames {
            if frame.pgno != 0 && frame.pgno <= new_pages && frame.pgno != lock {
                latest.insert(frame.pgno, frame.data_offset);
            }
        }
        let txid = state.txid + 1;
        let ltx_header = Header {
            page_size,
            commit: new_pages,
            min_txid: txid,
            max_txid: txid,
            timestamp_ms: ltx::unix_millis(SystemTime::now()),
            pre_apply_checksum: state.db_checksum,
            wal_offset: state.pos.offset as i64,
            wal_size: (committed.end.offset - state.pos.offset) as i64,
            wal_salt1: header.salt1,
            wal_salt2: header.salt2,
            ..Header::default()
        };
        let (tmp, mut encoder) = self.create_ltx(ltx_header)?;
        let old_pages = state.db_pages;
        if new_pages < old_pages {
            // Truncated pages leave the database checksum.
            for sum in state.page_sums[new_pages as usize..]
                .iter()
                .filter(|s| **s != 0)
            {
                state.db_checksum = ltx::toggle_page_checksum(state.db_checksum, *sum);
            }
        }
        state.page_sums.resize(new_pages as usize, 0);
        let mut page = std::mem::take(&mut self.page);
        page.resize(page_size as usize, 0);
        let mut written = 0;
        let mut write = |pgno: u32, page: &[u8], state: &mut State| -> Result<(), ltx::LtxError> {
            encoder.write_page(pgno, page)?;
            let sum = ltx::checksum_page(pgno, page);
            let slot = &mut state.page_sums[(pgno - 1) as usize];
            if pgno <= old_pages && *slot != 0 {
                state.db_checksum = ltx::toggle_page_checksum(state.db_checksum, *slot);
            }
            state.db_checksum = ltx::toggle_page_checksum(state.db_checksum, sum);
            *slot = sum;
            written += 1;
            Ok(())
        };
        let result = (|| -> Result<(), ReplicateError> {
            // Pages past the old end that no frame carries (rare: growth without a write)
            // are taken from the database file so the replica matches it exactly.
            let mut grown = (old_pages + 1..=new_pages)
                .filter(|p| *p != lock && !latest.contains_key(p))
                .peekable();
            let mut changed = latest.iter().peekable();
            loop {
                let next_changed = changed.peek().map(|(p, _)| **p);
                let next_grown = grown.peek().copied();
                let pgno = match (next_changed, next_grown) {
                    (None, None) => break,
                    (Some(c), Some(g)) => c.min(g),
                    (Some(c), None) => c,
                    (None, Some(g)) => g,
                };
                if next_changed == Some(pgno) {
                    let (_, offset) = changed.next().expect("peeked");
                    wal_file
                        .read_exact_at(&mut page, *offset)
                        .map_err(self.io_err("read WAL page"))?;
                } else {
                    grown.next();
                    self.read_db_page(pgno, &mut page)?;
                }
                write(pgno, &page, &mut state).map_err(self.ltx_err("encode"))?;
            }
            Ok(())
        })();
        self.page = page;
        result?;
        let bytes = self.upload(0, encoder, &tmp, state.db_checksum)?;
        state.txid = txid;
        state.pos = committed.end;
        state.db_pages = new_pages;
        self.state = Some(state);
        Ok(Synced {
            txid,
            level: 0,
            pages: written,
            bytes,
            snapshot_reason: None,
            wal_offset: committed.end.offset,
        })
    }

    /// Starts an LTX file in the temporary directory.
    fn create_ltx(
        &self,
        header: Header,
    ) -> Result<(PathBuf, Encoder<BufWriter<File>>), ReplicateError> {
        // Unique per file: the agent's replicators share one temporary directory, and two
        // databases often reach the same TXID at the same moment.
        static FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let tmp = self.tmp_dir.join(format!(
            "{}-{}-{:016x}.ltx.tmp",
            std::process::id(),
            FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            header.max_txid
        ));
        // The file becomes the replica's (a rename): it gets the database's mode from the
        // start, and is never a name someone else planted.
        let mode = crate::replica::copy_mode(&self.db_path);
        let out = BufWriter::new(
            crate::replica::create_new(&tmp, mode).map_err(self.io_err("create temporary LTX"))?,
        );
        let encoder = Encoder::new(out, header).map_err(self.ltx_err("encode"))?;
        Ok((tmp, encoder))
    }

    /// Finishes the file, syncs it and stores it in the replica at `level`; the temporary
    /// file is gone afterwards either way. Returns the file's size.
    fn upload(
        &self,
        level: u8,
        encoder: Encoder<BufWriter<File>>,
        tmp: &Path,
        post_apply: u64,
    ) -> Result<u64, ReplicateError> {
        let header = *encoder.header();
        let result = (|| {
            let (out, _) = encoder
                .finish(Some(post_apply))
                .map_err(self.ltx_err("finish"))?;
            let bytes = finish_file(out, tmp).map_err(self.io_err("write temporary LTX"))?;
            self.replica
                .put(level, header.min_txid, header.max_txid, tmp)
                .map_err(self.replica_err())?;
            Ok(bytes)
        })();
        let _ = std::fs::remove_file(tmp);
        result
    }

    fn read_db_page(&self, pgno: u32, page: &mut [u8]) -> Result<(), ReplicateError> {
        let offset = u64::from(pgno - 1) * page.len() as u64;
        // Past the end the page reads as zeros, as SQLite would.
        self.db_file
            .read_at(page, offset)
            .map_err(self.io_err("read database page"))?;
        Ok(())
    }

    /// The page size and size in pages of the database file itself.
    fn db_file_geometry(&self) -> Result<(u32, u32), ReplicateError> {
        let mut head = [0u8; 100];
        let len = self.db_file.size().map_err(self.io_err("stat database"))?;
        if len < 100 {
            return Ok((0, 0));
        }
        self.db_file
            .read_at(&mut head, 0)
            .map_err(self.io_err("read database header"))?;
        let page_size = match u16::from_be_bytes([head[16], head[17]]) {
            1 => 65536,
            n => u32::from(n),
        };
        if page_size == 0 {
            return Ok((0, 0));
        }
        Ok((page_size, (len / u64::from(page_size)) as u32))
    }

    /// Whether the database file alone equals the replicated state.
    fn db_file_matches_state(&mut self) -> Result<bool, ReplicateError> {
        let state = self.state.as_ref().expect("called with a state");
        let (page_size, pages) = self.db_file_geometry()?;
        if page_size != state.page_size || pages != state.db_pages {
            return Ok(false);
        }
        let (_, checksum) = self.page_sums_of(page_size, pages, None, &BTreeMap::new(), None)?;
        Ok(checksum == self.state.as_ref().expect("checked").db_checksum)
    }

    /// Checksums of every page of the state made of the database file overlaid with `overlay`
    /// (page → offset of its data in `wal`), streaming the pages into `encoder` if given.
    fn page_sums_of(
        &mut self,
        page_size: u32,
        pages: u32,
        wal: Option<&File>,
        overlay: &BTreeMap<u32, u64>,
        mut encoder: Option<&mut Encoder<BufWriter<File>>>,
    ) -> Result<(Vec<u64>, u64), ReplicateError> {
        let lock = ltx::lock_pgno(page_size);
        let mut sums = vec![0u64; pages as usize];
        let mut checksum = ltx::EMPTY_DATABASE_CHECKSUM;
        let mut page = vec![0u8; page_size as usize];
        for pgno in 1..=pages {
            if pgno == lock {
                continue;
            }
            match (overlay.get(&pgno), wal) {
                (Some(offset), Some(wal)) => wal
                    .read_exact_at(&mut page, *offset)
                    .map_err(self.io_err("read WAL page"))?,
                _ => self.read_db_page(pgno, &mut page)?,
            }
            let sum = ltx::checksum_page(pgno, &page);
            sums[(pgno - 1) as usize] = sum;
            checksum = ltx::toggle_page_checksum(checksum, sum);
            if let Some(encoder) = encoder.as_mut() {
                encoder
                    .write_page(pgno, &page)
                    .map_err(self.ltx_err("encode snapshot"))?;
            }
        }
        Ok((sums, checksum))
    }

    /// Writes a level-9 snapshot of the current state as TXID `txid`.
    fn snapshot(
        &mut self,
        wal: Option<&(File, WalHeader)>,
        txid: u64,
        reason: &'static str,
    ) -> Result<Synced, ReplicateError> {
        let started = Instant::now();
        let (mut page_size, mut pages) = self.db_file_geometry()?;
        let mut overlay = BTreeMap::new();
        let mut pos = WalPosition::default();
        if let Some((file, header)) = wal {
            let mut scratch = std::mem::take(&mut self.page);
            let committed = wal::read_committed(file, header, header.start(), &mut scratch)
                .map_err(self.io_err("read WAL"));
            self.page = scratch;
            let committed = committed?;
            pos = committed.end;
            if !committed.frames.is_empty() {
                page_size = header.page_size;
                pages = committed.db_pages;
                for frame in &committed.frames {
                    if frame.pgno <= pages {
                        overlay.insert(frame.pgno, frame.data_offset);
                    }
                }
            } else {
                page_size = header.page_size;
            }
        }
        if page_size == 0 || pages == 0 {
            return Err(ReplicateError::Io {
                db: self.name(),
                op: "snapshot",
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the database is empty (no pages)",
                ),
            });
        }
        let header = Header {
            page_size,
            commit: pages,
            min_txid: 1,
            max_txid: txid,
            timestamp_ms: ltx::unix_millis(SystemTime::now()),
            wal_offset: pos.offset as i64,
            wal_size: 0,
            wal_salt1: pos.salt1,
            wal_salt2: pos.salt2,
            ..Header::default()
        };
        let (tmp, mut encoder) = self.create_ltx(header)?;
        let wal_file = wal.map(|(f, _)| f);
        let (sums, checksum) =
            self.page_sums_of(page_size, pages, wal_file, &overlay, Some(&mut encoder))?;
        let bytes = self.upload(SNAPSHOT_LEVEL, encoder, &tmp, checksum)?;
        self.state = Some(State {
            txid,
            pos,
            page_size,
            db_pages: pages,
            page_sums: sums,
            db_checksum: checksum,
        });
        tracing::info!(db = %self.db_path.display(), txid, pages, bytes, ms = started.elapsed().as_millis() as u64, reason, "snapshot");
        Ok(Synced {
            txid,
            level: SNAPSHOT_LEVEL,
            pages: pages as usize,
            bytes,
            snapshot_reason: Some(reason),
            wal_offset: pos.offset,
        })
    }

    /// Recovers the position from the replica's newest file, if the database still matches it.
    fn recover(&mut self, wal: Option<&(File, WalHeader)>) -> Result<Recovery, ReplicateError> {
        let mut newest: Option<crate::replica::FileInfo> = None;
        for level in [0u8, 1, 2, 3, SNAPSHOT_LEVEL] {
            for file in self.replica.list(level).map_err(self.replica_err())? {
                if newest.as_ref().is_none_or(|n| file.max_txid > n.max_txid) {
                    newest = Some(file);
                }
            }
        }
        let Some(newest) = newest else {
            return Ok(Recovery::Empty);
        };
        let mut bytes = Vec::new();
        self.replica
            .get(newest.level, newest.min_txid, newest.max_txid, &mut bytes)
            .map_err(self.replica_err())?;
        let mut decoder = ltx::Decoder::new(bytes.as_slice())
            .map_err(self.ltx_err("decode newest replica file"))?;
        let header = *decoder.header();
        let mut scratch = vec![0u8; header.page_size as usize];
        while decoder
            .next_page(&mut scratch)
            .map_err(self.ltx_err("decode newest replica file"))?
            .is_some()
        {}
        let post_apply = decoder
            .finish()
            .map_err(self.ltx_err("decode newest replica file"))?
            .post_apply_checksum;
        let claim = Claim {
            txid: newest.max_txid,
            page_size: header.page_size,
            db_pages: header.commit,
            salts: (header.wal_salt1, header.wal_salt2),
            end: (header.wal_offset + header.wal_size) as u64,
            checksum: post_apply,
        };
        Ok(self
            .verify(wal, &claim)?
            .map_or(Recovery::Snapshot { after: claim.txid }, Recovery::Resume))
    }

    /// The state `claim` describes, if the database still matches it: the WAL generation it
    /// names reaches exactly its end and the database checksum there agrees, or (with no such
    /// WAL) the database file alone has that checksum.
    fn verify(
        &mut self,
        wal: Option<&(File, WalHeader)>,
        claim: &Claim,
    ) -> Result<Option<State>, ReplicateError> {
        let txid = claim.txid;
        let end = claim.end;
        let same_generation =
            wal.filter(|(_, h)| (h.salt1, h.salt2) == claim.salts && end >= wal::WAL_HEADER_SIZE);
        let Some((file, wal_header)) = same_generation else {
            return self.recover_from_db_file(claim);
        };
        let mut scratch = Vec::new();
        let committed = wal::read_committed(file, wal_header, wal_header.start(), &mut scratch)
            .map_err(self.io_err("read WAL"))?;
        let Some(at) = committed.commits.iter().position(|p| p.offset == end) else {
            if end == wal::WAL_HEADER_SIZE {
                // A snapshot taken when the WAL held no frames.
                let resumed = self.recover_from_db_file(claim)?;
                return Ok(resumed.map(|s| State {
                    pos: wal_header.start(),
                    ..s
                }));
            }
            tracing::info!(db = %self.db_path.display(), txid, "WAL does not reach the replicated position");
            return Ok(None);
        };
        let pos = committed.commits[at];
        let mut overlay = BTreeMap::new();
        let mut pages = 0;
        for frame in committed.frames.iter().take_while(|f| f.data_offset < end) {
            overlay.insert(frame.pgno, frame.data_offset);
            if frame.commit != 0 {
                pages = frame.commit;
            }
        }
        overlay.retain(|p, _| *p <= pages);
        let (sums, checksum) =
            self.page_sums_of(claim.page_size, pages, Some(file), &overlay, None)?;
        if checksum != claim.checksum {
            tracing::info!(db = %self.db_path.display(), txid, "database differs from the replicated state");
            return Ok(None);
        }
        Ok(Some(State {
            txid,
            pos,
            page_size: claim.page_size,
            db_pages: pages,
            page_sums: sums,
            db_checksum: checksum,
        }))
    }

    /// With no usable WAL position, the database file itself may still equal the replica's
    /// newest state (the WAL was checkpointed after everything was replicated).
    fn recover_from_db_file(&mut self, claim: &Claim) -> Result<Option<State>, ReplicateError> {
        let (page_size, pages) = self.db_file_geometry()?;
        if page_size != claim.page_size || pages != claim.db_pages {
            return Ok(None);
        }
        let (sums, checksum) = self.page_sums_of(page_size, pages, None, &BTreeMap::new(), None)?;
        if checksum != claim.checksum {
            return Ok(None);
        }
        Ok(Some(State {
            txid: claim.txid,
            pos: WalPosition::default(),
            page_size,
            db_pages: pages,
            page_sums: sums,
            db_checksum: checksum,
        }))
    }

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

/// A connection of the agent's to a user's database: busy-waiting on locks, never
/// checkpointing on its own (ours are explicit), and never on close either, since that would
/// checkpoint and delete a WAL whose newest frames we may not have read yet.
fn open_connection(db: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // A thousand of these stay open in the agent: no lookaside buffers (SQLite's default is
    // tens of KB per connection) and a page cache of 16 KiB, since pages are read through
    // `sqlfile`, not through this cache; only the pin's one-row query uses it.
    // SAFETY: the connection is open and idle; LOOKASIDE with a null buffer and zero sizes
    // disables lookaside for it.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_config(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBCONFIG_LOOKASIDE,
            std::ptr::null_mut::<std::ffi::c_void>(),
            0i32,
            0i32,
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        tracing::debug!(
            rc,
            "disabling lookaside failed; continuing with SQLite's default"
        );
    }
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))?;
    conn.execute_batch("PRAGMA wal_autocheckpoint=0; PRAGMA cache_size=-16")?;
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    Ok(conn)
}

fn finish_file(out: BufWriter<File>, path: &Path) -> io::Result<u64> {
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(std::fs::metadata(path)?.size())
}

/// How `multidb replicate` runs.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Replicate what is committed, then exit.
    pub once: bool,
    /// How often the WAL is looked at for new commits (one `stat`).
    pub poll: std::time::Duration,
    /// The longest wait before retrying after a failed sync.
    pub max_backoff: std::time::Duration,
}

/// The `-wal` file's size and modification time: a commit changes one or both.
fn wal_stamp(path: &Path) -> Option<(u64, i64, i64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.len(), m.mtime(), m.mtime_nsec()))
}

/// `multidb replicate`: syncs until interrupted (then one final sync), or once.
pub fn run(
    db: &Path,
    replica: Box<dyn ReplicaClient>,
    tmp_dir: &Path,
    store: Option<std::sync::Arc<crate::state::StateStore>>,
    options: RunOptions,
) -> Result<u64, ReplicateError> {
    crate::signals::catch_interrupts();
    run_with(
        db,
        replica,
        tmp_dir,
        store,
        options,
        &crate::signals::interrupted,
        &mut |_| {},
    )
}

/// The replication loop: syncs when the WAL changes, until `stop` says so (then one final
/// sync) or after one pass with `once`. `on_sync` sees every sync that wrote a file.
pub fn run_with(
    db: &Path,
    replica: Box<dyn ReplicaClient>,
    tmp_dir: &Path,
    store: Option<std::sync::Arc<crate::state::StateStore>>,
    options: RunOptions,
    stop: &dyn Fn() -> bool,
    on_sync: &mut dyn FnMut(&Synced),
) -> Result<u64, ReplicateError> {
    let url = replica.url();
    let mut replicator = Replicator::open(db, replica, tmp_dir)?;
    if let Some(store) = store {
        replicator = replicator.with_state(store);
    }
    let mut backoff = options.poll;
    let mut last_stamp = None;
    let policy = crate::compaction::Policy::default();
    let mut last_maintenance = Instant::now();
    let mut written_since_maintenance = false;
    let mut last_checkpoint = Instant::now();
    loop {
        let stamp = wal_stamp(&replicator.wal_path);
        let stopping = stop();
        if stamp != last_stamp || stopping || options.once || replicator.state.is_none() {
            match replicator.sync() {
                Ok(Some(s)) => {
                    last_stamp = stamp;
                    backoff = options.poll;
                    let kind = s
                        .snapshot_reason
                        .map_or("sync".to_string(), |why| format!("snapshot ({why})"));
                    tracing::info!(db = %db.display(), replica = %url, txid = s.txid, level = s.level, pages = s.pages, bytes = s.bytes, "{kind}");
                    on_sync(&s);
                    written_since_maintenance = true;
                }
                Ok(None) => last_stamp = stamp,
                Err(e) if options.once || stopping => return Err(e),
                Err(e) => {
                    tracing::error!(db = %db.display(), error = %e, retry_ms = backoff.as_millis() as u64, "sync failed");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(options.max_backoff);
                    continue;
                }
            }
            if let Err(e) = replicator.repin() {
                tracing::warn!(db = %db.display(), error = %e, "moving the read transaction failed");
            }
            match replicator.checkpoint_if_needed(last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL)
            {
                Ok(true) => last_checkpoint = Instant::now(),
                Ok(false) => {}
                Err(e) => tracing::warn!(db = %db.display(), error = %e, "checkpoint failed"),
            }
        }
        // Compaction and retention only for a database that was written: an idle one costs
        // no replica request at all.
        if written_since_maintenance
            && last_maintenance.elapsed() >= MAINTENANCE_INTERVAL
            && !options.once
        {
            match crate::compaction::maintain(
                replicator.replica.as_ref(),
                tmp_dir,
                SystemTime::now(),
                &policy,
            ) {
                Ok(report) if !report.is_empty() => {
                    tracing::info!(db = %db.display(), compacted = report.compacted.len(), snapshot = report.snapshot.is_some(), deleted = report.deleted.len(), "maintenance")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(db = %db.display(), error = %e, "compaction or retention failed")
                }
            }
            last_maintenance = Instant::now();
            written_since_maintenance = false;
        }
        if options.once || stopping {
            return Ok(replicator.txid());
        }
        std::thread::sleep(options.poll);
    }
}
