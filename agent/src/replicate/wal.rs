//! Reading a SQLite write-ahead log directly: the header, and committed frames past a known
//! position, each validated by its salts and the WAL's cumulative checksum.
//!
//! Format (sqlite.org/fileformat2.html#walformat): a 32-byte header (magic, version, page
//! size, checkpoint sequence, two salts, two checksum words), then frames of a 24-byte header
//! (page number, database size after commit or 0, the two salts, two checksum words) and one
//! page. The checksum runs over the header and then every frame in order, so a frame can only
//! be validated knowing the running checksum of the frame before it, which is part of a
//! [`WalPosition`]. Only frames up to the last commit frame count: later ones belong to a
//! transaction still being written.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub const WAL_HEADER_SIZE: u64 = 32;
pub const FRAME_HEADER_SIZE: u64 = 24;
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;

/// The WAL header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    pub page_size: u32,
    /// Incremented by SQLite every time the WAL is restarted.
    pub checkpoint_seq: u32,
    pub salt1: u32,
    pub salt2: u32,
    /// Whether checksum words are big-endian (magic 0x377f0683).
    pub big_endian: bool,
    /// The running checksum after the header.
    pub checksum: (u32, u32),
}

/// Where replication stands in a WAL: the next frame's offset, and the running checksum and
/// salts it must continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WalPosition {
    pub salt1: u32,
    pub salt2: u32,
    pub checkpoint_seq: u32,
    /// Offset of the next frame to read.
    pub offset: u64,
    pub checksum: (u32, u32),
}

/// One valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub pgno: u32,
    /// Database size in pages for a commit frame, 0 otherwise.
    pub commit: u32,
    /// Offset of the frame's page data in the WAL.
    pub data_offset: u64,
}

/// The committed frames read past a position.
#[derive(Debug, Default)]
pub struct Committed {
    pub frames: Vec<Frame>,
    /// Position after the last commit frame.
    pub end: WalPosition,
    /// Database size in pages after the last commit.
    pub db_pages: u32,
    /// The position after each commit frame, in order (the last one is `end`).
    pub commits: Vec<WalPosition>,
}

fn checksum_words(data: &[u8], big_endian: bool, mut s: (u32, u32)) -> (u32, u32) {
    for pair in data.chunks_exact(8) {
        let word = |b: &[u8]| {
            let b = [b[0], b[1], b[2], b[3]];
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        s.0 = s.0.wrapping_add(word(&pair[..4])).wrapping_add(s.1);
        s.1 = s.1.wrapping_add(word(&pair[4..])).wrapping_add(s.0);
    }
    s
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads and validates the header; `None` if the WAL is missing, empty or not a valid WAL
/// (SQLite treats such a WAL as empty too).
pub fn read_header(wal: &File) -> io::Result<Option<WalHeader>> {
    let mut b = [0u8; WAL_HEADER_SIZE as usize];
    match wal.read_exact_at(&mut b, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let magic = be32(&b[0..4]);
    let big_endian = match magic {
        MAGIC_LE => false,
        MAGIC_BE => true,
        _ => return Ok(None),
    };
    let page_size = match be32(&b[8..12]) {
        1 => 65536,
        n => n,
    };
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Ok(None);
    }
    let checksum = checksum_words(&b[..24], big_endian, (0, 0));
    if checksum != (be32(&b[24..28]), be32(&b[28..32])) {
        return Ok(None);
    }
    Ok(Some(WalHeader {
        page_size,
        checkpoint_seq: be32(&b[12..16]),
        salt1: be32(&b[16..20]),
        salt2: be32(&b[20..24]),
        big_endian,
        checksum,
    }))
}

impl WalHeader {
    /// The position of the first frame.
    pub fn start(&self) -> WalPosition {
        WalPosition {
            salt1: self.salt1,
            salt2: self.salt2,
            checkpoint_seq: self.checkpoint_seq,
            offset: WAL_HEADER_SIZE,
            checksum: self.checksum,
        }
    }

    /// Whether `pos` belongs to this WAL generation.
    pub fn continues(&self, pos: &WalPosition) -> bool {
        pos.salt1 == self.salt1 && pos.salt2 == self.salt2 && pos.offset >= WAL_HEADER_SIZE
    }
}

/// Reads the frames committed after `from` (which must belong to `header`'s generation),
/// validating salts and checksums; stops at the first invalid frame or the file's end, and
/// returns only frames up to the last commit. `page` is a scratch buffer of one page.
pub fn read_committed(
    wal: &File,
    header: &WalHeader,
    from: WalPosition,
    page: &mut Vec<u8>,
) -> io::Result<Committed> {
    let frame_size = FRAME_HEADER_SIZE + u64::from(header.page_size);
    page.resize(header.page_size as usize, 0);
    let len = wal.metadata()?.len();
    let mut out = Committed {
        frames: Vec::new(),
        end: from,
        db_pages: 0,
        commits: Vec::new(),
    };
    let mut pending = Vec::new();
    let mut pos = from;
    let mut fh = [0u8; FRAME_HEADER_SIZE as usize];
    while pos.offset + frame_size <= len {
        wal.read_exact_at(&mut fh, pos.offset)?;
        wal.read_exact_at(page, pos.offset + FRAME_HEADER_SIZE)?;
        if be32(&fh[8..12]) != header.salt1 || be32(&fh[12..16]) != header.salt2 {
            break;
        }
        let s = checksum_words(&fh[..8], header.big_endian, pos.checksum);
        let s = checksum_words(page, header.big_endian, s);
        if s != (be32(&fh[16..20]), be32(&fh[20..24])) {
            break;
        }
        let frame = Frame {
            pgno: be32(&fh[0..4]),
            commit: be32(&fh[4..8]),
            data_offset: pos.offset + FRAME_HEADER_SIZE,
        };
        pos.offset += frame_size;
        pos.checksum = s;
        pending.push(frame);
        if frame.commit != 0 {
            out.frames.append(&mut pending);
            out.end = pos;
            out.db_pages = frame.commit;
            out.commits.push(pos);
        }
    }
    Ok(out)
}

/// The last seen state of a database's `-wal` file, packed into eight bytes.
///
/// In WAL mode a commit changes only the `-wal`, never the main file, so this is how a scan
/// notices writes by applications that do not load the extension. The size saturates at
/// 4 GiB and the modification time keeps its low 32 bits of nanoseconds: together they change
/// on every append; an equal stamp after a change needs the same size and an mtime exactly a
/// multiple of 4.29 s later, and is caught by the next write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WalStamp(u64);

impl WalStamp {
    /// No `-wal` file.
    pub const NONE: WalStamp = WalStamp(0);

    pub fn new(size: u64, mtime_ns: i64) -> WalStamp {
        let size = size.min(u64::from(u32::MAX) - 1) + 1; // +1 so an empty WAL is not NONE
        WalStamp((size << 32) | (mtime_ns as u64 & 0xffff_ffff))
    }

    /// The stamp of `db_path`'s `-wal` now (NONE when it is missing or not a regular file).
    /// Discovery and the agent both take stamps here, so theirs compare equal.
    pub fn of_wal(db_path: &str) -> WalStamp {
        let mut wal = String::with_capacity(db_path.len() + 4);
        wal.push_str(db_path);
        wal.push_str("-wal");
        match std::fs::symlink_metadata(&wal) {
            Ok(m) if m.is_file() => WalStamp::new(m.len(), mtime_ns(&m) as i64),
            _ => WalStamp::NONE,
        }
    }

    /// The packed value, for the state database.
    pub fn raw(self) -> u64 {
        self.0
    }

    pub fn from_raw(raw: u64) -> WalStamp {
        WalStamp(raw)
    }

    /// The WAL size in bytes (saturated at 4 GiB), or `None` if there was no WAL.
    pub fn size(self) -> Option<u64> {
        (self.0 != 0).then(|| (self.0 >> 32) - 1)
    }
}

/// A file's modification time in nanoseconds since the epoch (CLOCK_REALTIME, the agent's
/// clock).
pub fn mtime_ns(m: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    (m.mtime() as u64).saturating_mul(1_000_000_000) + m.mtime_nsec() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_frames_that_sqlite_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("t.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        let wal = File::open(tmp.path().join("t.db-wal")).unwrap();
        let header = read_header(&wal).unwrap().unwrap();
        assert_eq!(header.page_size, 4096);
        let mut page = Vec::new();
        let first = read_committed(&wal, &header, header.start(), &mut page).unwrap();
        assert!(!first.frames.is_empty());
        assert_eq!(first.db_pages, 2);
        conn.execute("INSERT INTO t VALUES (2)", []).unwrap();
        let next = read_committed(&wal, &header, first.end, &mut page).unwrap();
        assert_eq!(
            next.frames.len(),
            1,
            "one page changed by the second commit"
        );
        assert!(next.end.offset > first.end.offset);
        let none = read_committed(&wal, &header, next.end, &mut page).unwrap();
        assert!(none.frames.is_empty());
        assert_eq!(none.end, next.end);
        // A wrong running checksum invalidates the continuation.
        let mut wrong = first.end;
        wrong.checksum.0 ^= 1;
        assert!(read_committed(&wal, &header, wrong, &mut page)
            .unwrap()
            .frames
            .is_empty());
    }
}
