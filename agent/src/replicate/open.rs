//! Opening a replicator: the connection to the user's database (configured so it never
//! checkpoints on its own and costs little memory), the descriptor on the database file and
//! its identity, the options a caller sets before the first sync, and what the replicator
//! says about the file it opened.

use super::*;

/// How long the replicator's connection waits for locks before giving up on one attempt.
const BUSY_TIMEOUT_MS: u64 = 5000;
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
                error: source,
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
            error: source,
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
                error: source,
            })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ReplicateError::NotWal { db: name, mode });
        }
        let db_file = crate::replicate::sqlfile::MainFile::of(&conn).map_err(io_err("open"))?;
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
            litestream_compatible: false,
            fields: None,
            trust_saved: true,
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

    pub(super) fn name(&self) -> String {
        self.db_path.display().to_string()
    }

    /// Saves positions in `store` after every upload and resumes from it after a restart,
    /// so a restart does not list and read the replica.
    pub fn with_state(
        mut self,
        store: std::sync::Arc<crate::replicate::state::StateStore>,
    ) -> Replicator {
        self.store = Some(store);
        self
    }

    /// Writes LTX files as Litestream 0.5.17 does: the NoChecksum flag, no pre- or post-apply
    /// checksum. Its restore refuses a chain whose last file carries a post-apply checksum
    /// (its issue #1427), so only such files restore there. The replicator still keeps the
    /// database checksum itself (positions and resumes are verified as before); what is lost
    /// is the replica's record of it, so restores can no longer prove the result equals the
    /// source, and a restart without saved positions snapshots rather than resumes.
    pub fn litestream_compatible(mut self, compatible: bool) -> Replicator {
        self.litestream_compatible = compatible;
        self
    }

    /// Records the database's pattern fields in the identity object it creates, and accepts
    /// an identity with the same fields under another path as this tenant moved here.
    pub fn with_fields(mut self, fields: crate::discover::pattern::Fields) -> Replicator {
        self.fields = Some(fields);
        self
    }

    /// Tells the replicator what the lease it writes under said before it was taken: when
    /// another host held it, the saved position is not resumed from (the replica decides).
    pub fn with_previous_lease(mut self, previous: crate::replica::lease::Previous) -> Replicator {
        self.trust_saved = previous != crate::replica::lease::Previous::Foreign;
        self
    }
}

/// A connection of the agent's to a user's database: busy-waiting on locks, never
/// checkpointing on its own (ours are explicit), and never on close either, since that would
/// checkpoint and delete a WAL whose newest frames we may not have read yet.
pub(super) fn open_connection(db: &Path) -> rusqlite::Result<rusqlite::Connection> {
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
