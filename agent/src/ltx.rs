//! The LTX file format, version 3: the unit every replica stores, shared with Litestream v0.5.
//!
//! This module owns the byte layout and the two checksums (their CRC in `crc64`); the
//! streaming [`Encoder`], [`Decoder`] and [`compact`] live in submodules built on them. The
//! format is the one the README of superfly/ltx (main branch) specifies and its Go code writes
//! (ltx v0.5.2, Litestream v0.5.16). The `litetx` crate speaks the older v1 layout, hence this
//! codec.
//!
//! A file is four sections, all integers big-endian unless said otherwise:
//!
//! ```text
//! header      100 bytes  magic "LTX1", flags, page size, commit, TXID range, timestamp, ...
//! page block  per page:  pgno u32, flags u16, compressed size u32, LZ4 *block* payload
//!             then a 6-byte zero page header
//! page index  per page:  uvarint pgno, uvarint frame offset, uvarint frame size;
//!             uvarint 0; u64 byte size of the varints (terminator included)
//! trailer     16 bytes   post-apply database checksum, file checksum
//! ```
//!
//! The file checksum is CRC-ISO-64 over every byte except the payloads and the file checksum
//! itself, with each page's *decompressed* data hashed in place of its payload. The database
//! checksum is the XOR of [`checksum_page`] over every page except the lock page. Both carry
//! [`CHECKSUM_FLAG`] so that a present checksum is never zero.
//!
//! The format has no version field: versions 2 and 3 share the magic and a reader must know
//! which one it holds. We read and write version 3 only; version 2 files (4-byte page headers)
//! fail to decode with a page-header or checksum error.

mod compact;
mod crc64;
mod decode;
mod encode;

use std::io::{self, Read};
use std::time::{SystemTime, UNIX_EPOCH};

use crc64::{Crc64Digest, Shift};

pub use compact::{compact, Compacted};
pub use decode::Decoder;
pub use encode::Encoder;

/// The first four bytes of every LTX file (versions 2 and 3 alike).
pub const MAGIC: [u8; 4] = *b"LTX1";
/// Size of the file header; its last 20 bytes are reserved and written as zero.
pub const HEADER_SIZE: usize = 100;
/// Size of a version 3 page header: pgno (4) and flags (2).
pub const PAGE_HEADER_SIZE: usize = 6;
/// Size of the compressed-size prefix that follows a page header carrying [`PAGE_FLAG_SIZE`].
pub const PAGE_SIZE_PREFIX: usize = 4;
/// Size of the trailer: post-apply checksum (8) and file checksum (8).
pub const TRAILER_SIZE: usize = 16;

/// Set on every checksum the format stores, so a present checksum is never zero.
pub const CHECKSUM_FLAG: u64 = 1 << 63;
/// Database checksum of a database with no pages (what a deletion file's trailer holds).
pub const EMPTY_DATABASE_CHECKSUM: u64 = CHECKSUM_FLAG;

/// Header flag: the file tracks no database checksums (both are then zero).
pub const HEADER_FLAG_NO_CHECKSUM: u32 = 1 << 1;
/// Every header flag version 3 defines; any other bit makes the file invalid.
const HEADER_FLAG_MASK: u32 = HEADER_FLAG_NO_CHECKSUM;
/// Page flag: a 4-byte compressed size follows and the payload is one LZ4 block. The Go
/// encoder always sets it; frames without it are legacy v3 frames holding an LZ4 *frame*.
pub const PAGE_FLAG_SIZE: u16 = 1 << 0;

/// Smallest and largest SQLite page sizes; the format accepts the powers of two in between.
pub const MIN_PAGE_SIZE: u32 = 512;
pub const MAX_PAGE_SIZE: u32 = 65536;

/// SQLite's PENDING_BYTE: the page holding it (the lock page) is never stored or checksummed.
const PENDING_BYTE: u64 = 0x4000_0000;

/// A running CRC-64 with the ISO polynomial as Go's `hash/crc64` computes it (`crc64.ISO`).
fn crc64_digest() -> Crc64Digest {
    Crc64Digest::new()
}

/// Everything that can be wrong with an LTX file or with a request to write one.
#[derive(Debug, thiserror::Error)]
pub enum LtxError {
    #[error("reading the LTX {section} failed: {error}")]
    Read {
        section: &'static str,
        error: io::Error,
    },
    #[error("writing the LTX file failed: {error}")]
    Write { error: io::Error },
    #[error("truncated LTX file: it ends inside the {section}")]
    Truncated { section: &'static str },
    #[error("not an LTX file: magic is {found:02x?}, expected \"LTX1\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported header flags {flags:#010x}: version 3 defines only NoChecksum (0x2)")]
    UnsupportedHeaderFlags { flags: u32 },
    #[error("invalid page size {page_size}: must be a power of two from 512 to 65536")]
    InvalidPageSize { page_size: u32 },
    #[error("invalid LTX header: {reason}")]
    InvalidHeader { reason: &'static str },
    #[error("page {pgno}: unsupported page header flags {flags:#06x}")]
    UnsupportedPageFlags { pgno: u32, flags: u16 },
    #[error("page number 0 with flags {flags:#06x} (only an all-zero header ends the pages)")]
    PageNumberZero { flags: u16 },
    #[error("page {pgno} follows page {prev}: pages must be in ascending order")]
    PageOutOfOrder { prev: u32, pgno: u32 },
    #[error("snapshot skips pages: expected page {expected}, found {found}")]
    SnapshotGap { expected: u32, found: u32 },
    #[error("snapshot ends at page {last} but holds {commit} pages")]
    SnapshotIncomplete { last: u32, commit: u32 },
    #[error("page {pgno} is beyond the commit size of {commit} pages")]
    PageBeyondCommit { pgno: u32, commit: u32 },
    #[error("page {pgno} is the lock page, which LTX files never hold")]
    LockPage { pgno: u32 },
    #[error("page buffer holds {found} bytes, page size is {expected}")]
    PageBufferSize { expected: u32, found: usize },
    #[error("page {pgno}: payload does not decompress to one page: {reason}")]
    Decompress { pgno: u32, reason: String },
    #[error("page {pgno}: LZ4 compression failed: {error}")]
    Compress {
        pgno: u32,
        error: lz4_flex::block::CompressError,
    },
    #[error("page index is wrong: {reason}")]
    PageIndex { reason: &'static str },
    #[error("invalid LTX trailer: {reason}")]
    InvalidTrailer { reason: &'static str },
    #[error("bytes follow the trailer")]
    TrailingData,
    #[error(
        "file checksum mismatch: trailer says {stored:016x}, content hashes to {computed:016x}"
    )]
    FileChecksumMismatch { stored: u64, computed: u64 },
    #[error(
        "post-apply checksum mismatch: trailer says {stored:016x}, pages give {computed:016x}"
    )]
    PostApplyChecksumMismatch { stored: u64, computed: u64 },
    #[error("a post-apply checksum is required: only snapshots can compute their own")]
    PostApplyChecksumRequired,
    #[error("compaction needs at least one input")]
    NoInputs,
    #[error("input {index} has page size {found}, input 0 has {expected}")]
    PageSizeMismatch {
        index: usize,
        expected: u32,
        found: u32,
    },
    #[error(
        "input {index} (TXIDs {min:016x}-{max:016x}) does not continue the chain ending at {prev_max:016x}"
    )]
    NonContiguous {
        index: usize,
        prev_max: u64,
        min: u64,
        max: u64,
    },
    #[error("{what}, more than a file of {len} bytes can hold (at most {max_pages} pages)")]
    TooLarge {
        what: String,
        len: u64,
        max_pages: u64,
    },
    #[error("input {index}: {error}")]
    Input { index: usize, error: Box<LtxError> },
}

/// The fewest bytes a page can take in a file: its page header, one byte of payload and
/// three one-byte varints in the page index. Real frames are larger (an LZ4 block of a page
/// of zeros is 20 bytes and more), so this bound only ever errs towards accepting.
const MIN_PAGE_BYTES: u64 = PAGE_HEADER_SIZE as u64 + 1 + 3;

/// The most pages a file of `len` bytes can hold: what a count read from such a file may
/// justify allocating for (issue 10, case 6: a 4 KB file claiming page 2^31 took 1 GB).
pub fn max_pages_in(len: u64) -> u64 {
    len.saturating_sub((HEADER_SIZE + TRAILER_SIZE + 8) as u64) / MIN_PAGE_BYTES
}

/// Checks the numbers of `header` against the length of the file it came from, before
/// anything is sized by them: a snapshot holds all its `commit` pages, so they must fit.
pub fn check_header_against_len(header: &Header, len: u64) -> Result<()> {
    let max_pages = max_pages_in(len);
    if header.is_snapshot() && u64::from(header.last_snapshot_pgno()) > max_pages {
        return Err(LtxError::TooLarge {
            what: format!("snapshot header says {} pages", header.commit),
            len,
            max_pages,
        });
    }
    Ok(())
}

/// Shorthand for results of this module.
pub type Result<T, E = LtxError> = std::result::Result<T, E>;

/// Turns a read error into [`LtxError::Truncated`] at end of input, naming the section.
fn read_error(section: &'static str) -> impl FnOnce(io::Error) -> LtxError {
    move |source| match source.kind() {
        io::ErrorKind::UnexpectedEof => LtxError::Truncated { section },
        _ => LtxError::Read {
            section,
            error: source,
        },
    }
}

fn write_error(source: io::Error) -> LtxError {
    LtxError::Write { error: source }
}

/// The page order rules of an LTX file (those the Go encoder enforces): within the commit
/// size, never the lock page, ascending, and every page in a snapshot. `prev` is the page
/// before `pgno` (0 for the first).
pub(crate) fn check_page_order(header: &Header, prev: u32, pgno: u32) -> Result<()> {
    if pgno > header.commit {
        return Err(LtxError::PageBeyondCommit {
            pgno,
            commit: header.commit,
        });
    }
    if pgno == header.lock_pgno() {
        return Err(LtxError::LockPage { pgno });
    }
    if header.is_snapshot() {
        let expected = encode::next_snapshot_pgno(prev, header.lock_pgno());
        if pgno != expected {
            return Err(LtxError::SnapshotGap {
                expected,
                found: pgno,
            });
        }
    } else if pgno <= prev {
        return Err(LtxError::PageOutOfOrder { prev, pgno });
    }
    Ok(())
}

/// The 100-byte file header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// [`HEADER_FLAG_NO_CHECKSUM`] or zero.
    pub flags: u32,
    pub page_size: u32,
    /// Database size in pages after applying the file; zero for a deleted database.
    pub commit: u32,
    pub min_txid: u64,
    pub max_txid: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Database checksum before applying the file; zero for snapshots.
    pub pre_apply_checksum: u64,
    /// Offset of the frames in the source WAL; zero when not from a WAL.
    pub wal_offset: i64,
    pub wal_size: i64,
    /// Salts of the source WAL; zero when not from a WAL and after compaction.
    pub wal_salt1: u32,
    pub wal_salt2: u32,
    /// Node that wrote the file; zero if unset.
    pub node_id: u64,
}

impl Header {
    /// A file whose range starts at TXID 1 is a snapshot: it holds every page of the database.
    pub fn is_snapshot(&self) -> bool {
        self.min_txid == 1
    }

    /// Whether the file carries database checksums (the NoChecksum flag is clear).
    pub fn tracks_checksums(&self) -> bool {
        self.flags & HEADER_FLAG_NO_CHECKSUM == 0
    }

    pub fn lock_pgno(&self) -> u32 {
        lock_pgno(self.page_size)
    }

    /// The page a complete snapshot ends with: `commit`, unless that is the lock page.
    fn last_snapshot_pgno(&self) -> u32 {
        if self.commit == self.lock_pgno() {
            self.commit - 1
        } else {
            self.commit
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_be_bytes());
        b[12..16].copy_from_slice(&self.commit.to_be_bytes());
        b[16..24].copy_from_slice(&self.min_txid.to_be_bytes());
        b[24..32].copy_from_slice(&self.max_txid.to_be_bytes());
        b[32..40].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b[40..48].copy_from_slice(&self.pre_apply_checksum.to_be_bytes());
        b[48..56].copy_from_slice(&self.wal_offset.to_be_bytes());
        b[56..64].copy_from_slice(&self.wal_size.to_be_bytes());
        b[64..68].copy_from_slice(&self.wal_salt1.to_be_bytes());
        b[68..72].copy_from_slice(&self.wal_salt2.to_be_bytes());
        b[72..80].copy_from_slice(&self.node_id.to_be_bytes());
        b
    }

    /// Parses and validates a header. The reserved bytes are ignored, as the Go decoder does;
    /// they are covered by the file checksum all the same.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Self> {
        let found = [b[0], b[1], b[2], b[3]];
        if found != MAGIC {
            return Err(LtxError::BadMagic { found });
        }
        let header = Header {
            flags: be_u32(&b[4..]),
            page_size: be_u32(&b[8..]),
            commit: be_u32(&b[12..]),
            min_txid: be_u64(&b[16..]),
            max_txid: be_u64(&b[24..]),
            timestamp_ms: be_u64(&b[32..]) as i64,
            pre_apply_checksum: be_u64(&b[40..]),
            wal_offset: be_u64(&b[48..]) as i64,
            wal_size: be_u64(&b[56..]) as i64,
            wal_salt1: be_u32(&b[64..]),
            wal_salt2: be_u32(&b[68..]),
            node_id: be_u64(&b[72..]),
        };
        header.validate()?;
        Ok(header)
    }

    /// The rules of the Go `Header.Validate`, which every writer we interoperate with obeys.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason| Err(LtxError::InvalidHeader { reason });
        if self.flags & !HEADER_FLAG_MASK != 0 {
            return Err(LtxError::UnsupportedHeaderFlags { flags: self.flags });
        }
        if !is_valid_page_size(self.page_size) {
            return Err(LtxError::InvalidPageSize {
                page_size: self.page_size,
            });
        }
        if self.min_txid == 0 || self.max_txid == 0 {
            return invalid("TXIDs start at 1");
        }
        if self.min_txid > self.max_txid {
            return invalid("min TXID is above max TXID");
        }
        if self.wal_offset < 0 || self.wal_size < 0 {
            return invalid("WAL offset and size cannot be negative");
        }
        if (self.wal_salt1 != 0 || self.wal_salt2 != 0) && self.wal_offset == 0 {
            return invalid("WAL salts require a WAL offset");
        }
        if self.wal_offset == 0 && self.wal_size != 0 {
            return invalid("a WAL size requires a WAL offset");
        }
        if self.is_snapshot() || !self.tracks_checksums() {
            if self.pre_apply_checksum != 0 {
                return invalid(
                    "pre-apply checksum must be zero on snapshots and NoChecksum files",
                );
            }
        } else if self.pre_apply_checksum & CHECKSUM_FLAG == 0 {
            return invalid("pre-apply checksum is required and must carry the checksum flag");
        }
        Ok(())
    }
}

/// The 6-byte header in front of each page frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageHeader {
    pub pgno: u32,
    pub flags: u16,
}

impl PageHeader {
    pub fn encode(&self) -> [u8; PAGE_HEADER_SIZE] {
        let mut b = [0u8; PAGE_HEADER_SIZE];
        b[0..4].copy_from_slice(&self.pgno.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b
    }

    /// Parses a page header; `None` is the all-zero header that ends the page block.
    pub fn decode(b: &[u8; PAGE_HEADER_SIZE]) -> Result<Option<Self>> {
        let header = PageHeader {
            pgno: be_u32(&b[0..]),
            flags: u16::from_be_bytes([b[4], b[5]]),
        };
        if header == PageHeader::default() {
            return Ok(None);
        }
        if header.pgno == 0 {
            return Err(LtxError::PageNumberZero {
                flags: header.flags,
            });
        }
        if header.flags & !PAGE_FLAG_SIZE != 0 {
            return Err(LtxError::UnsupportedPageFlags {
                pgno: header.pgno,
                flags: header.flags,
            });
        }
        Ok(Some(header))
    }
}

/// The 16-byte trailer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trailer {
    /// Database checksum after applying the file; zero for NoChecksum files.
    pub post_apply_checksum: u64,
    /// [`CHECKSUM_FLAG`] | CRC-ISO-64 of the file's logical content.
    pub file_checksum: u64,
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_SIZE] {
        let mut b = [0u8; TRAILER_SIZE];
        b[0..8].copy_from_slice(&self.post_apply_checksum.to_be_bytes());
        b[8..16].copy_from_slice(&self.file_checksum.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; TRAILER_SIZE]) -> Self {
        Trailer {
            post_apply_checksum: be_u64(&b[0..]),
            file_checksum: be_u64(&b[8..]),
        }
    }

    /// The Go `Trailer.Validate` rules, plus its encoder's rule that a zero-page database has
    /// the empty checksum.
    pub fn validate(&self, header: &Header) -> Result<()> {
        let invalid = |reason| Err(LtxError::InvalidTrailer { reason });
        if !header.tracks_checksums() {
            if self.post_apply_checksum != 0 {
                return invalid("NoChecksum files carry no post-apply checksum");
            }
        } else if self.post_apply_checksum & CHECKSUM_FLAG == 0 {
            return invalid("post-apply checksum is required and must carry the checksum flag");
        } else if header.commit == 0 && self.post_apply_checksum != EMPTY_DATABASE_CHECKSUM {
            return invalid("a zero-page database must have the empty checksum");
        }
        if self.file_checksum & CHECKSUM_FLAG == 0 {
            return invalid("file checksum must carry the checksum flag");
        }
        Ok(())
    }
}

/// Where one page frame sits in the file; `size` counts its header, size prefix and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageIndexEntry {
    pub pgno: u32,
    pub offset: u64,
    pub size: u64,
}

/// The page holding SQLite's PENDING_BYTE for this page size.
pub fn lock_pgno(page_size: u32) -> u32 {
    (PENDING_BYTE / u64::from(page_size.max(1))) as u32 + 1
}

pub fn is_valid_page_size(page_size: u32) -> bool {
    page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
}

/// A page's contribution to the database checksum: CRC-ISO-64 of the big-endian page number
/// followed by the page, with [`CHECKSUM_FLAG`] set.
pub fn checksum_page(pgno: u32, data: &[u8]) -> u64 {
    let mut digest = crc64_digest();
    digest.update(&pgno.to_be_bytes());
    digest.update(data);
    CHECKSUM_FLAG | digest.finalize()
}

/// [`checksum_page`] from the page's [`crc64::raw`] CRC, which the file checksum needs too;
/// `shift` is [`Shift::page`] of its page size.
fn checksum_page_from_raw(pgno: u32, raw: u64, shift: &Shift) -> u64 {
    let mut digest = crc64_digest();
    digest.update(&pgno.to_be_bytes());
    digest.append(raw, shift);
    CHECKSUM_FLAG | digest.finalize()
}

/// Adds a page checksum to a database checksum, or removes it: XOR is its own inverse, so
/// replacing a page is `toggle(toggle(db, old), new)`.
pub fn toggle_page_checksum(database_checksum: u64, page_checksum: u64) -> u64 {
    CHECKSUM_FLAG | (database_checksum ^ page_checksum)
}

/// The database checksum of a whole database file read from `db`, skipping the lock page.
/// A trailing partial page is an error (the Go `ChecksumReader` refuses it too).
pub fn checksum_database<R: Read>(mut db: R, page_size: u32) -> Result<u64> {
    if !is_valid_page_size(page_size) {
        return Err(LtxError::InvalidPageSize { page_size });
    }
    let lock = lock_pgno(page_size);
    let mut page = vec![0u8; page_size as usize];
    let mut checksum = EMPTY_DATABASE_CHECKSUM;
    for pgno in 1u32.. {
        let filled = read_full(&mut db, &mut page).map_err(read_error("database page"))?;
        if filled == 0 {
            break;
        }
        if filled < page.len() {
            return Err(LtxError::Truncated {
                section: "database page",
            });
        }
        if pgno != lock {
            checksum = toggle_page_checksum(checksum, checksum_page(pgno, &page));
        }
    }
    Ok(checksum)
}

/// Milliseconds since the Unix epoch, the unit of [`Header::timestamp_ms`].
pub fn unix_millis(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Appends `value` as an unsigned LEB128 varint, Go's `binary.AppendUvarint`.
fn put_uvarint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Builders shared by the tests of this module and its submodules. The reference assembler
/// lays a file out from the README alone, with a bit-by-bit CRC, so that the codec is checked
/// against the specification rather than against itself.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// CRC-64/GO-ISO one bit at a time: reflected polynomial x^64 + x^4 + x^3 + x + 1,
    /// initial value and final XOR all ones (Go's `crc64.Checksum(b, crc64.MakeTable(ISO))`).
    pub fn reference_crc64(bytes: &[u8]) -> u64 {
        const REFLECTED_ISO_POLY: u64 = 0xD800_0000_0000_0000;
        let mut crc = !0u64;
        for &byte in bytes {
            crc ^= u64::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ REFLECTED_ISO_POLY
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// One page frame as stored: `stored` is everything after the 6-byte page header, of
    /// which the first `hashed_prefix` bytes are hashed as stored (the size prefix).
    pub struct RefFrame {
        pub pgno: u32,
        pub flags: u16,
        pub stored: Vec<u8>,
        pub hashed_prefix: usize,
        pub page: Vec<u8>,
    }

    /// A current-encoding frame: size prefix and one LZ4 block.
    pub fn block_frame(pgno: u32, page: &[u8]) -> RefFrame {
        let block = lz4_flex::block::compress(page);
        let mut stored = (block.len() as u32).to_be_bytes().to_vec();
        stored.extend_from_slice(&block);
        RefFrame {
            pgno,
            flags: PAGE_FLAG_SIZE,
            stored,
            hashed_prefix: 4,
            page: page.to_vec(),
        }
    }

    /// A legacy frame: no flag, no prefix, the page as an LZ4 frame with a content checksum
    /// (as pierrec/lz4 writes by default), the checksums filled with junk the decoder ignores.
    /// `split` cuts the page into two linked blocks; `stored` keeps the blocks uncompressed.
    pub fn legacy_frame(pgno: u32, page: &[u8], split: Option<usize>, stored: bool) -> RefFrame {
        let linked = split.is_some();
        let flg = 0x40 | if linked { 0 } else { 0x20 } | 0x04;
        let mut bytes = vec![0x04, 0x22, 0x4D, 0x18, flg, 0x40, 0xA5];
        let (first, second) = page.split_at(split.unwrap_or(page.len()));
        let blocks: Vec<(Vec<u8>, bool)> = [first, second]
            .iter()
            .enumerate()
            .filter(|(_, part)| !part.is_empty())
            .map(|(i, part)| match (stored, i) {
                (true, _) => (part.to_vec(), true),
                (false, 0) => (lz4_flex::block::compress(part), false),
                (false, _) => (lz4_flex::block::compress_with_dict(part, first), false),
            })
            .collect();
        for (block, raw) in blocks {
            let word = block.len() as u32 | if raw { 0x8000_0000 } else { 0 };
            bytes.extend_from_slice(&word.to_le_bytes());
            bytes.extend_from_slice(&block);
        }
        bytes.extend_from_slice(&[0, 0, 0, 0, 0xDE, 0xAD, 0xBE, 0xEF]);
        RefFrame {
            pgno,
            flags: 0,
            stored: bytes,
            hashed_prefix: 0,
            page: page.to_vec(),
        }
    }

    /// The page index bytes for frames at the given (pgno, offset, size).
    pub fn index_bytes(entries: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(pgno, offset, size) in entries {
            put_uvarint(&mut out, u64::from(pgno));
            put_uvarint(&mut out, offset);
            put_uvarint(&mut out, size);
        }
        out.push(0);
        let len = out.len() as u64;
        out.extend_from_slice(&len.to_be_bytes());
        out
    }

    /// Lays out a whole file per the README; `index` replaces the correct page index.
    pub fn assemble(
        header: &Header,
        frames: &[RefFrame],
        index: Option<Vec<u8>>,
        post_apply: u64,
    ) -> Vec<u8> {
        let mut file = header.encode().to_vec();
        let mut hashed = file.clone();
        let mut entries = Vec::new();
        for frame in frames {
            let offset = file.len() as u64;
            let page_header = PageHeader {
                pgno: frame.pgno,
                flags: frame.flags,
            }
            .encode();
            file.extend_from_slice(&page_header);
            file.extend_from_slice(&frame.stored);
            hashed.extend_from_slice(&page_header);
            hashed.extend_from_slice(&frame.stored[..frame.hashed_prefix]);
            hashed.extend_from_slice(&frame.page);
            entries.push((frame.pgno, offset, file.len() as u64 - offset));
        }
        let tail = [
            vec![0u8; PAGE_HEADER_SIZE],
            index.unwrap_or_else(|| index_bytes(&entries)),
            post_apply.to_be_bytes().to_vec(),
        ]
        .concat();
        file.extend_from_slice(&tail);
        hashed.extend_from_slice(&tail);
        file.extend_from_slice(&(CHECKSUM_FLAG | reference_crc64(&hashed)).to_be_bytes());
        file
    }

    pub fn header(page_size: u32, commit: u32, min_txid: u64, max_txid: u64) -> Header {
        let pre_apply_checksum = if min_txid == 1 {
            0
        } else {
            CHECKSUM_FLAG | min_txid
        };
        Header {
            page_size,
            commit,
            min_txid,
            max_txid,
            pre_apply_checksum,
            ..Header::default()
        }
    }

    pub type Pages = Vec<(u32, Vec<u8>)>;

    pub fn encode_file(header: Header, pages: &[(u32, Vec<u8>)], post: Option<u64>) -> Vec<u8> {
        let mut encoder = Encoder::new(Vec::new(), header).expect("valid header");
        for (pgno, page) in pages {
            encoder.write_page(*pgno, page).expect("valid page");
        }
        encoder.finish(post).expect("finish").0
    }

    pub fn decode_all(bytes: &[u8]) -> Result<(Header, Pages, Trailer)> {
        let mut decoder = Decoder::new(bytes)?;
        let mut page = vec![0u8; decoder.header().page_size as usize];
        let mut pages = Vec::new();
        while let Some(pgno) = decoder.next_page(&mut page)? {
            pages.push((pgno, page.clone()));
        }
        let trailer = *decoder.trailer().expect("trailer after the last page");
        Ok((*decoder.header(), pages, trailer))
    }

    /// The database checksum of whole pages, computed from the definition.
    pub fn reference_database_checksum<'a>(
        pages: impl IntoIterator<Item = (u32, &'a [u8])>,
    ) -> u64 {
        pages.into_iter().fold(CHECKSUM_FLAG, |acc, (pgno, page)| {
            let hashed = [&pgno.to_be_bytes()[..], page].concat();
            CHECKSUM_FLAG | acc ^ (CHECKSUM_FLAG | reference_crc64(&hashed))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn crc64_is_go_iso_per_catalog_check_value_and_bitwise_reference() {
        // The catalog's check value is the CRC of "123456789".
        let checksum = |bytes: &[u8]| {
            let mut digest = crc64_digest();
            digest.update(bytes);
            digest.finalize()
        };
        assert_eq!(checksum(b"123456789"), 0xB909_56C7_75A4_1001);
        assert_eq!(reference_crc64(b"123456789"), 0xB909_56C7_75A4_1001);
        let inputs: [&[u8]; 4] = [b"", b"a", b"hello, world", &[0xFF; 1000]];
        for input in inputs {
            assert_eq!(checksum(input), reference_crc64(input), "{input:?}");
        }
        let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let shift = Shift::page(4096).unwrap();
        assert_eq!(
            checksum_page_from_raw(9, crc64::raw(&page), shift),
            checksum_page(9, &page)
        );
    }

    #[test]
    fn header_encodes_to_the_documented_bytes() {
        let header = Header {
            flags: 0,
            page_size: 4096,
            commit: 3,
            min_txid: 2,
            max_txid: 5,
            timestamp_ms: 1_700_000_000_000,
            pre_apply_checksum: 0x8000_0000_0000_0ABC,
            wal_offset: 32,
            wal_size: 4152,
            wal_salt1: 0x1122_3344,
            wal_salt2: 0x5566_7788,
            node_id: 7,
        };
        #[rustfmt::skip]
        let mut expected = vec![
            b'L', b'T', b'X', b'1',                         // magic
            0, 0, 0, 0,                                     // flags
            0, 0, 0x10, 0,                                  // page size
            0, 0, 0, 3,                                     // commit
            0, 0, 0, 0, 0, 0, 0, 2,                         // min TXID
            0, 0, 0, 0, 0, 0, 0, 5,                         // max TXID
            0, 0, 0x01, 0x8B, 0xCF, 0xE5, 0x68, 0x00,       // timestamp (ms)
            0x80, 0, 0, 0, 0, 0, 0x0A, 0xBC,                // pre-apply checksum
            0, 0, 0, 0, 0, 0, 0, 0x20,                      // WAL offset
            0, 0, 0, 0, 0, 0, 0x10, 0x38,                   // WAL size
            0x11, 0x22, 0x33, 0x44,                         // WAL salt 1
            0x55, 0x66, 0x77, 0x88,                         // WAL salt 2
            0, 0, 0, 0, 0, 0, 0, 7,                         // node ID
        ];
        expected.resize(HEADER_SIZE, 0); // reserved
        assert_eq!(header.encode().to_vec(), expected);
        assert_eq!(Header::decode(&header.encode()).unwrap(), header);
    }

    #[test]
    fn header_decode_names_what_is_wrong() {
        let good = header(4096, 3, 2, 5);
        let decode = |h: Header| Header::decode(&h.encode());
        let mut bytes = good.encode();
        bytes[3] = b'2';
        assert!(
            matches!(Header::decode(&bytes), Err(LtxError::BadMagic { found }) if found == *b"LTX2")
        );
        let err = decode(Header { flags: 1, ..good }).unwrap_err();
        assert!(
            matches!(err, LtxError::UnsupportedHeaderFlags { flags: 1 }),
            "{err}"
        );
        for page_size in [0, 256, 1000, 131_072] {
            let err = decode(Header { page_size, ..good }).unwrap_err();
            assert!(matches!(err, LtxError::InvalidPageSize { .. }), "{err}");
        }
        let invalid = [
            Header {
                min_txid: 0,
                ..good
            },
            Header {
                max_txid: 1,
                ..good
            },
            Header {
                wal_offset: -1,
                ..good
            },
            Header {
                wal_salt1: 9,
                ..good
            },
            Header {
                wal_size: 4152,
                ..good
            },
            Header {
                pre_apply_checksum: 0,
                ..good
            },
            Header {
                pre_apply_checksum: 5,
                ..good
            },
            Header {
                min_txid: 1,
                pre_apply_checksum: CHECKSUM_FLAG | 1,
                ..good
            },
            Header {
                flags: HEADER_FLAG_NO_CHECKSUM,
                ..good
            },
        ];
        for h in invalid {
            assert!(
                matches!(decode(h), Err(LtxError::InvalidHeader { .. })),
                "{h:?}"
            );
        }
        let no_checksum = Header {
            flags: HEADER_FLAG_NO_CHECKSUM,
            pre_apply_checksum: 0,
            ..good
        };
        assert_eq!(decode(no_checksum).unwrap(), no_checksum);
        assert!(decode(header(512, 0, 1, 1)).unwrap().is_snapshot());
    }

    #[test]
    fn page_header_and_trailer_rules() {
        let page = PageHeader {
            pgno: 0x0102_0304,
            flags: PAGE_FLAG_SIZE,
        };
        assert_eq!(page.encode(), [1, 2, 3, 4, 0, 1]);
        assert_eq!(PageHeader::decode(&page.encode()).unwrap(), Some(page));
        assert_eq!(PageHeader::decode(&[0; 6]).unwrap(), None);
        assert!(matches!(
            PageHeader::decode(&[0, 0, 0, 0, 0, 1]),
            Err(LtxError::PageNumberZero { flags: 1 })
        ));
        assert!(matches!(
            PageHeader::decode(&[0, 0, 0, 7, 0, 2]),
            Err(LtxError::UnsupportedPageFlags { pgno: 7, flags: 2 })
        ));

        let trailer = Trailer {
            post_apply_checksum: CHECKSUM_FLAG | 5,
            file_checksum: !0,
        };
        assert_eq!(trailer.encode()[..8], [0x80, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(Trailer::decode(&trailer.encode()), trailer);
        let h = header(4096, 3, 2, 5);
        assert!(trailer.validate(&h).is_ok());
        let bad = [
            (
                h,
                Trailer {
                    file_checksum: 5,
                    ..trailer
                },
            ),
            (
                h,
                Trailer {
                    post_apply_checksum: 5,
                    ..trailer
                },
            ),
            (Header { commit: 0, ..h }, trailer),
            (
                Header {
                    flags: HEADER_FLAG_NO_CHECKSUM,
                    pre_apply_checksum: 0,
                    ..h
                },
                trailer,
            ),
        ];
        for (h, t) in bad {
            assert!(
                matches!(t.validate(&h), Err(LtxError::InvalidTrailer { .. })),
                "{h:?} {t:?}"
            );
        }
    }

    #[test]
    fn lock_page_is_the_page_holding_byte_one_gibibyte() {
        assert_eq!(lock_pgno(4096), 262_145);
        assert_eq!(lock_pgno(512), 2_097_153);
        assert_eq!(lock_pgno(65536), 16_385);
    }

    /// Post-apply checksums from the Go test suite (ltx_test.go, decoder_test.go,
    /// compactor_test.go), which its decoder verifies against the pages of each snapshot.
    #[test]
    fn database_checksums_match_the_go_test_vectors() {
        let db = |page_size: usize, bytes: &[u8]| -> u64 {
            let file: Vec<u8> = bytes.iter().flat_map(|&b| vec![b; page_size]).collect();
            checksum_database(file.as_slice(), page_size as u32).unwrap()
        };
        assert_eq!(db(512, &[1, 2, 3]), 0xEFFF_FFFF_ECD9_9000);
        assert_eq!(db(512, b"1"), 0xEB1A_9992_3104_4DDD);
        assert_eq!(db(1024, &[0x81, 0x82, 0x83]), 0x8A24_9272_AD9F_7DEA);
        assert_eq!(db(1024, &[0x81]), 0xEB95_3FC4_7685_D740);
        assert_eq!(db(1024, b"23"), 0xE189_9B6D_587A_AAAA);
        assert_eq!(db(512, b"23"), 0x8B87_423E_EEEE_EEEE);
        assert_eq!(db(512, b""), EMPTY_DATABASE_CHECKSUM);

        let pages = [vec![1u8; 512], vec![2; 512], vec![3; 512]];
        let numbered = pages.iter().zip(1..).map(|(p, n)| (n, p.as_slice()));
        assert_eq!(reference_database_checksum(numbered), 0xEFFF_FFFF_ECD9_9000);
        let toggled = (1..=3u32).fold(EMPTY_DATABASE_CHECKSUM, |acc, pgno| {
            toggle_page_checksum(acc, checksum_page(pgno, &pages[pgno as usize - 1]))
        });
        assert_eq!(toggled, 0xEFFF_FFFF_ECD9_9000);
        // Toggling a page again removes it: pages 1 and 2 remain.
        let removed = toggle_page_checksum(toggled, checksum_page(3, &pages[2]));
        assert_eq!(removed, db(512, &[1, 2]));

        let partial = [0u8; 700];
        assert!(matches!(
            checksum_database(&partial[..], 512),
            Err(LtxError::Truncated {
                section: "database page"
            })
        ));
    }

    /// Go's decoder_test.go "WithLockPage": 4 KiB pages of "x" up to ten pages past the lock
    /// page, which counts as zeros and is skipped. Hashes 1 GiB, so it only runs on request.
    #[test]
    #[ignore = "hashes 1 GiB; run with --ignored"]
    fn database_checksum_skips_the_lock_page_like_go() {
        struct Pages {
            next: u64,
            end: u64,
        }
        impl Read for Pages {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min((self.end - self.next) as usize);
                let lock =
                    (u64::from(lock_pgno(4096)) - 1) * 4096..u64::from(lock_pgno(4096)) * 4096;
                for (i, byte) in buf[..n].iter_mut().enumerate() {
                    *byte = if lock.contains(&(self.next + i as u64)) {
                        0
                    } else {
                        b'x'
                    };
                }
                self.next += n as u64;
                Ok(n)
            }
        }
        let commit = u64::from(lock_pgno(4096)) + 10;
        let checksum = checksum_database(
            Pages {
                next: 0,
                end: commit * 4096,
            },
            4096,
        )
        .unwrap();
        assert_eq!(checksum, 0xC19B_668C_3766_62C7);
    }
}
