//! Reads of a database file through its SQLite connection's own descriptor.
//!
//! A replicator must read database pages (snapshots, checksums) while its connection holds
//! the read lock that pins the WAL. Opening the file a second time would cost a descriptor
//! per hot database, and closing such a descriptor would drop every POSIX lock the process
//! holds on the file (DESIGN.md hazard 8). SQLite hands out its own file object for this
//! (`SQLITE_FCNTL_FILE_POINTER`); reading through its `xRead` is a `pread` on the descriptor
//! SQLite already has, and never touches locks.

use std::ffi::c_void;
use std::io;

use rusqlite::ffi;

/// The main database file of one connection. Valid while that connection is open: the
/// replicator owns both and drops this first (it holds no resource of its own).
pub struct MainFile {
    file: *mut ffi::sqlite3_file,
}

// SAFETY: the file object belongs to a connection that moves between threads with its
// replicator but is used by one thread at a time, as is this handle.
unsafe impl Send for MainFile {}

impl MainFile {
    /// The main database file of `conn`.
    pub fn of(conn: &rusqlite::Connection) -> io::Result<MainFile> {
        let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: `conn` is open; the file control writes one pointer into `file`.
        let rc = unsafe {
            ffi::sqlite3_file_control(
                conn.handle(),
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_FILE_POINTER,
                (&mut file as *mut *mut ffi::sqlite3_file).cast::<c_void>(),
            )
        };
        let no_methods = !file.is_null()
            // SAFETY: a non-null file object handed out by SQLite is initialised.
            && unsafe { (*file).pMethods.is_null() };
        if rc != ffi::SQLITE_OK || file.is_null() || no_methods {
            return Err(io::Error::other(format!(
                "SQLite gave no file object for the database (code {rc})"
            )));
        }
        Ok(MainFile { file })
    }

    fn methods(&self) -> &ffi::sqlite3_io_methods {
        // SAFETY: checked non-null in `of`; the methods table lives as long as the file.
        unsafe { &*(*self.file).pMethods }
    }

    /// The file's size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        let size_fn = self
            .methods()
            .xFileSize
            .ok_or_else(|| io::Error::other("the VFS has no xFileSize"))?;
        let mut size: ffi::sqlite3_int64 = 0;
        // SAFETY: a valid file object and a place for the size.
        let rc = unsafe { size_fn(self.file, &mut size) };
        if rc != ffi::SQLITE_OK {
            return Err(io::Error::other(format!("xFileSize failed (code {rc})")));
        }
        Ok(size.max(0) as u64)
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros
    /// (SQLite's short-read rule). Returns whether the whole range was inside the file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let read_fn = self
            .methods()
            .xRead
            .ok_or_else(|| io::Error::other("the VFS has no xRead"))?;
        let amount = i32::try_from(buf.len()).map_err(|_| io::Error::other("read too large"))?;
        let offset = i64::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
        // SAFETY: `buf` is valid for `amount` bytes; the file object is valid.
        let rc = unsafe { read_fn(self.file, buf.as_mut_ptr().cast::<c_void>(), amount, offset) };
        match rc {
            ffi::SQLITE_OK => Ok(true),
            ffi::SQLITE_IOERR_SHORT_READ => Ok(false),
            _ => Err(io::Error::other(format!("xRead failed (code {rc})"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pages_and_zero_fills_past_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA page_size=4096; CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        let file = MainFile::of(&conn).unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(file.size().unwrap(), on_disk.len() as u64);
        let mut head = [0u8; 100];
        assert!(file.read_at(&mut head, 0).unwrap());
        assert_eq!(&head[..], &on_disk[..100]);
        let mut past = [7u8; 4096];
        assert!(!file.read_at(&mut past, on_disk.len() as u64).unwrap());
        assert!(past.iter().all(|&b| b == 0));
    }
}
