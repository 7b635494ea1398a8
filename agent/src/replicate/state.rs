//! Replication positions kept in `state_dir`, in a small SQLite database of the agent's own, so
//! a restart resumes every database without listing and reading its replica.
//!
//! A saved position is a hint, never trusted blindly: the replicator checks that the database
//! still matches it (WAL generation and the database checksum at that point) and falls back to
//! the replica, then to a snapshot, when it does not. Positions are saved only after the
//! replica acknowledged the file they describe, so a crash can repeat work but not skip it.

use std::path::Path;

use crate::replicate::wal::WalPosition;

/// Why the state database could not be used.
#[derive(Debug, thiserror::Error)]
#[error("state database {path}: {op}: {error}")]
pub struct StateError {
    pub path: String,
    pub op: &'static str,
    pub error: rusqlite::Error,
}

/// A saved replication position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub txid: u64,
    pub page_size: u32,
    pub db_pages: u32,
    pub wal: WalPosition,
    pub db_checksum: u64,
}

/// The state database.
/// The stamp saved for a hot database: it matches no `-wal`, so a database that was hot when
/// the agent stopped is always looked at again.
pub const HOT_STAMP: u64 = u64::MAX;

pub struct StateStore {
    /// One connection shared by every replicator of the agent: a hot database costs no
    /// descriptor here, and saves are a few microseconds each.
    conn: std::sync::Mutex<rusqlite::Connection>,
    path: String,
}

/// Creates `dir` (and missing parents) readable by the owner only: the state lists every
/// database path. A directory that exists already is left as it is (it may be shared, such
/// as a home directory); the files in it are private either way.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Makes `db` and its `-wal` and `-shm` owner-only, creating an empty `db` if there is none:
/// SQLite gives a new `-wal` and `-shm` the mode of the database file, so a 0600 database
/// keeps its companions private too. The file is never followed through a symlink.
fn private_files(db: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(db)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    for suffix in ["-wal", "-shm"] {
        let mut companion = db.as_os_str().to_owned();
        companion.push(suffix);
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&companion)
        {
            Ok(f) => f.set_permissions(std::fs::Permissions::from_mode(0o600))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl StateStore {
    /// Opens (creating) `DIR/state.db`.
    pub fn open(dir: &Path) -> Result<StateStore, StateError> {
        let path = dir.join("state.db");
        let name = path.display().to_string();
        let err = |op| {
            let path = name.clone();
            move |source| StateError {
                path,
                op,
                error: source,
            }
        };
        let io = |op: &'static str| {
            let path = name.clone();
            move |e: std::io::Error| StateError {
                path,
                op,
                error: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            }
        };
        private_dir(dir).map_err(io("create directory"))?;
        private_files(&path).map_err(io("make private"))?;
        let conn = rusqlite::Connection::open(&path).map_err(err("open"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err("busy_timeout"))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS positions(
                 db TEXT NOT NULL,
                 replica TEXT NOT NULL,
                 txid INTEGER NOT NULL,
                 page_size INTEGER NOT NULL,
                 db_pages INTEGER NOT NULL,
                 salt1 INTEGER NOT NULL,
                 salt2 INTEGER NOT NULL,
                 checkpoint_seq INTEGER NOT NULL,
                 wal_offset INTEGER NOT NULL,
                 checksum1 INTEGER NOT NULL,
                 checksum2 INTEGER NOT NULL,
                 db_checksum INTEGER NOT NULL,
                 updated_ms INTEGER NOT NULL,
                 PRIMARY KEY (db, replica)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta(
                 key TEXT PRIMARY KEY,
                 value INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS wal_stamps(
                 db TEXT PRIMARY KEY,
                 stamp INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )
        .map_err(err("create schema"))?;
        Ok(StateStore {
            conn: std::sync::Mutex::new(conn),
            path: name,
        })
    }

    fn err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StateError {
        let path = self.path.clone();
        move |source| StateError {
            path,
            op,
            error: source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
        // A panic while holding the lock leaves the connection usable: take it anyway.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the agent first watched these databases (CLOCK_REALTIME ns): `now` on the first
    /// call ever, the same value on every later one.
    pub fn watch_start_ns(&self, now: u64) -> Result<u64, StateError> {
        let conn = self.lock();
        conn.execute(
            "INSERT OR IGNORE INTO meta VALUES ('watch_start_ns', ?1)",
            [now as i64],
        )
        .map_err(self.err("save watch start"))?;
        conn.query_row(
            "SELECT value FROM meta WHERE key = 'watch_start_ns'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|v| v as u64)
        .map_err(self.err("load watch start"))
    }

    /// Calls `f` with every saved `-wal` stamp (see [`StateStore::set_wal_stamps`]), streamed so
    /// a hundred thousand databases cost no map in memory.
    pub fn for_each_wal_stamp(&self, mut f: impl FnMut(&str, u64)) -> Result<usize, StateError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT db, stamp FROM wal_stamps")
            .map_err(self.err("prepare stamps"))?;
        let mut rows = stmt.query([]).map_err(self.err("load stamps"))?;
        let mut count = 0;
        while let Some(row) = rows.next().map_err(self.err("load stamps"))? {
            let db: String = row.get(0).map_err(self.err("decode stamp"))?;
            let stamp: i64 = row.get(1).map_err(self.err("decode stamp"))?;
            f(&db, stamp as u64);
            count += 1;
        }
        Ok(count)
    }

    /// Saves `-wal` stamps: the stamp a database had when the agent last knew it replicated
    /// (or first saw it), or [`HOT_STAMP`] while it is hot. At the next start, a database whose
    /// `-wal` no longer has its saved stamp was written since and is caught up.
    pub fn set_wal_stamps<'a>(
        &self,
        stamps: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> Result<(), StateError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.err("begin"))?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT OR REPLACE INTO wal_stamps VALUES (?1, ?2)")
                .map_err(self.err("prepare stamp"))?;
            for (db, stamp) in stamps {
                stmt.execute(rusqlite::params![db, stamp as i64])
                    .map_err(self.err("save stamp"))?;
            }
        }
        tx.commit().map_err(self.err("commit stamps"))
    }

    /// The saved position of `db` replicated to `replica`.
    pub fn load(&self, db: &str, replica: &str) -> Result<Option<Position>, StateError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT txid, page_size, db_pages, salt1, salt2, checkpoint_seq, wal_offset, checksum1, checksum2, db_checksum
                 FROM positions WHERE db = ?1 AND replica = ?2",
            )
            .map_err(self.err("prepare load"))?;
        let mut rows = stmt.query([db, replica]).map_err(self.err("load"))?;
        let Some(row) = rows.next().map_err(self.err("load"))? else {
            return Ok(None);
        };
        let get = |i: usize| row.get::<_, i64>(i);
        let read = || -> rusqlite::Result<Position> {
            Ok(Position {
                txid: get(0)? as u64,
                page_size: get(1)? as u32,
                db_pages: get(2)? as u32,
                wal: WalPosition {
                    salt1: get(3)? as u32,
                    salt2: get(4)? as u32,
                    checkpoint_seq: get(5)? as u32,
                    offset: get(6)? as u64,
                    checksum: (get(7)? as u32, get(8)? as u32),
                },
                db_checksum: get(9)? as u64,
            })
        };
        read().map(Some).map_err(self.err("decode"))
    }

    /// Forgets the saved position of `db` at `replica`: another host wrote there since, so
    /// it describes an older stretch of the replica's history and must never be resumed.
    pub fn forget(&self, db: &str, replica: &str) -> Result<(), StateError> {
        self.lock()
            .execute(
                "DELETE FROM positions WHERE db = ?1 AND replica = ?2",
                [db, replica],
            )
            .map(|_| ())
            .map_err(self.err("forget"))
    }

    /// Saves the position after the replica acknowledged it.
    pub fn save(&self, db: &str, replica: &str, p: &Position) -> Result<(), StateError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.lock()
            .prepare_cached(
                "INSERT OR REPLACE INTO positions VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )
            .and_then(|mut stmt| {
                stmt.execute(rusqlite::params![
                    db,
                    replica,
                    p.txid as i64,
                    i64::from(p.page_size),
                    i64::from(p.db_pages),
                    i64::from(p.wal.salt1),
                    i64::from(p.wal.salt2),
                    i64::from(p.wal.checkpoint_seq),
                    p.wal.offset as i64,
                    i64::from(p.wal.checksum.0),
                    i64::from(p.wal.checksum.1),
                    p.db_checksum as i64,
                    now,
                ])
            })
            .map_err(self.err("save"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Issue 10, case 3: `state.db` lists every database path and was 0644.
    #[test]
    fn regression_10_state_is_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/state");
        let store = StateStore::open(&dir).unwrap();
        store.set_wal_stamps([("/x.db", 1)]).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for name in ["state.db", "state.db-wal", "state.db-shm"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        drop(store);
        // Files an older version left readable are made private on the next start.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("state.db"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let _store = StateStore::open(&dir).unwrap();
        assert_eq!(mode(&dir.join("state.db")), 0o600);
    }

    #[test]
    fn positions_round_trip_and_replace() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::open(&tmp.path().join("state")).unwrap();
        assert_eq!(store.load("/a.db", "file:///r").unwrap(), None);
        let mut p = Position {
            txid: 7,
            page_size: 4096,
            db_pages: 3,
            wal: WalPosition {
                salt1: u32::MAX,
                salt2: 2,
                checkpoint_seq: 1,
                offset: 8272,
                checksum: (0xdead_beef, 5),
            },
            db_checksum: 0x8000_0000_0000_1234,
        };
        store.save("/a.db", "file:///r", &p).unwrap();
        assert_eq!(store.load("/a.db", "file:///r").unwrap(), Some(p));
        p.txid = 8;
        store.save("/a.db", "file:///r", &p).unwrap();
        drop(store);
        let reopened = StateStore::open(&tmp.path().join("state")).unwrap();
        assert_eq!(
            reopened.load("/a.db", "file:///r").unwrap().unwrap().txid,
            8
        );
        assert_eq!(reopened.load("/a.db", "s3://other").unwrap(), None);
    }
}
