//! Streaming LTX writer: header, then pages in ascending order, then index and trailer.
//!
//! The file checksum is updated as bytes leave, so nothing but the page index (16 bytes a
//! page) is held whatever the file's size. Every rule is checked before a byte is written, so
//! a refused page leaves the encoder usable; after an I/O error the output is garbage and
//! the caller drops it (replica files are written under a temporary name and renamed).

use std::io::Write;

use lz4_flex::block::{compress_into, get_maximum_output_size};

use super::{
    checksum_page, crc64_digest, put_uvarint, toggle_page_checksum, write_error, Crc64Digest,
    Header, LtxError, PageHeader, PageIndexEntry, Result, Trailer, CHECKSUM_FLAG,
    EMPTY_DATABASE_CHECKSUM, PAGE_FLAG_SIZE, PAGE_HEADER_SIZE, PAGE_SIZE_PREFIX,
};

/// Writes one LTX file to `W`. Wrap files in a `BufWriter`: frames are written in pieces.
pub struct Encoder<W: Write> {
    out: W,
    header: Header,
    file_digest: Crc64Digest,
    /// Bytes written so far: the offset of the next frame.
    offset: u64,
    prev_pgno: u32,
    /// Database checksum of the pages written, kept for snapshots only.
    database_checksum: u64,
    index: Vec<PageIndexEntry>,
    compressed: Vec<u8>,
}

impl<W: Write> Encoder<W> {
    /// Validates `header` and writes it.
    pub fn new(out: W, header: Header) -> Result<Self> {
        header.validate()?;
        let mut encoder = Encoder {
            out,
            header,
            file_digest: crc64_digest(),
            offset: 0,
            prev_pgno: 0,
            database_checksum: EMPTY_DATABASE_CHECKSUM,
            index: Vec::new(),
            compressed: vec![0; get_maximum_output_size(header.page_size as usize)],
        };
        encoder.write_hashed(&header.encode())?;
        Ok(encoder)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Writes one page. Pages come in ascending order, within the commit size, never the lock
    /// page; a snapshot must hold every page from 1 up (the lock page excepted).
    pub fn write_page(&mut self, pgno: u32, data: &[u8]) -> Result<()> {
        let header = &self.header;
        if data.len() != header.page_size as usize {
            return Err(LtxError::PageBufferSize {
                expected: header.page_size,
                found: data.len(),
            });
        }
        if pgno == 0 {
            return Err(LtxError::PageNumberZero { flags: 0 });
        }
        super::check_page_order(header, self.prev_pgno, pgno)?;

        let size =
            compress_into(data, &mut self.compressed).map_err(|source| LtxError::Compress {
                pgno,
                error: source,
            })?;
        let offset = self.offset;
        self.write_hashed(
            &PageHeader {
                pgno,
                flags: PAGE_FLAG_SIZE,
            }
            .encode(),
        )?;
        self.write_hashed(&(size as u32).to_be_bytes())?;
        // The payload is written but the page it decompresses to is what gets hashed.
        self.out
            .write_all(&self.compressed[..size])
            .map_err(write_error)?;
        self.offset += size as u64;
        self.file_digest.update(data);

        if self.header.is_snapshot() && self.header.tracks_checksums() {
            self.database_checksum =
                toggle_page_checksum(self.database_checksum, checksum_page(pgno, data));
        }
        let frame_size = (PAGE_HEADER_SIZE + PAGE_SIZE_PREFIX + size) as u64;
        self.index.push(PageIndexEntry {
            pgno,
            offset,
            size: frame_size,
        });
        self.prev_pgno = pgno;
        Ok(())
    }

    /// Ends the page block, writes index and trailer, and returns the writer and the trailer.
    ///
    /// `post_apply_checksum` is the database checksum after the file applies. Snapshots compute
    /// it from their pages (a given value must agree), zero-page databases have the empty
    /// checksum, NoChecksum files have none; any other file needs the caller's value.
    pub fn finish(mut self, post_apply_checksum: Option<u64>) -> Result<(W, Trailer)> {
        let header = self.header;
        if header.is_snapshot() && self.prev_pgno != header.last_snapshot_pgno() {
            return Err(LtxError::SnapshotIncomplete {
                last: self.prev_pgno,
                commit: header.commit,
            });
        }
        let post_apply_checksum = if !header.tracks_checksums() {
            post_apply_checksum.unwrap_or(0)
        } else if header.is_snapshot() {
            let computed = self.database_checksum;
            match post_apply_checksum {
                Some(stored) if stored != computed => {
                    return Err(LtxError::PostApplyChecksumMismatch { stored, computed });
                }
                _ => computed,
            }
        } else if header.commit == 0 {
            post_apply_checksum.unwrap_or(EMPTY_DATABASE_CHECKSUM)
        } else {
            post_apply_checksum.ok_or(LtxError::PostApplyChecksumRequired)?
        };
        // Validate before writing so a refused checksum leaves no half-written trailer.
        Trailer {
            post_apply_checksum,
            file_checksum: CHECKSUM_FLAG,
        }
        .validate(&header)?;

        self.write_hashed(&PageHeader::default().encode())?;
        let mut varints = Vec::with_capacity(30);
        let mut index_size = 0u64;
        for entry in std::mem::take(&mut self.index) {
            varints.clear();
            put_uvarint(&mut varints, u64::from(entry.pgno));
            put_uvarint(&mut varints, entry.offset);
            put_uvarint(&mut varints, entry.size);
            self.write_hashed(&varints)?;
            index_size += varints.len() as u64;
        }
        self.write_hashed(&[0])?;
        self.write_hashed(&(index_size + 1).to_be_bytes())?;

        self.write_hashed(&post_apply_checksum.to_be_bytes())?;
        let file_checksum = CHECKSUM_FLAG | self.file_digest.finalize();
        self.out
            .write_all(&file_checksum.to_be_bytes())
            .map_err(write_error)?;
        self.out.flush().map_err(write_error)?;
        Ok((
            self.out,
            Trailer {
                post_apply_checksum,
                file_checksum,
            },
        ))
    }

    /// Writes bytes that the file checksum covers as stored.
    fn write_hashed(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(write_error)?;
        self.file_digest.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }
}

/// The page a snapshot must hold after `prev` (0 before the first page).
pub(super) fn next_snapshot_pgno(prev: u32, lock_pgno: u32) -> u32 {
    if prev + 1 == lock_pgno {
        prev + 2
    } else {
        prev + 1
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{lock_pgno, Decoder, HEADER_FLAG_NO_CHECKSUM, HEADER_SIZE};
    use super::*;

    fn page(byte: u8, size: usize) -> Vec<u8> {
        (0..size).map(|i| byte ^ (i % 7) as u8).collect()
    }

    /// The whole file, byte for byte, equals the README layout assembled independently (the
    /// LZ4 payload bytes are the one thing implementations may choose, so both use lz4_flex's).
    #[test]
    fn file_bytes_follow_the_spec_layout() {
        let header = header(512, 9, 4, 6);
        let pages = [
            (2, page(0x41, 512)),
            (9, (0..512).map(|i| (i * 31 % 251) as u8).collect()),
        ];
        let bytes = encode_file(header, &pages, Some(CHECKSUM_FLAG | 0x1234));

        let frames: Vec<_> = pages
            .iter()
            .map(|(pgno, data)| block_frame(*pgno, data))
            .collect();
        let expected = assemble(&header, &frames, None, CHECKSUM_FLAG | 0x1234);
        assert_eq!(bytes, expected);

        // Spot-check the fixed positions the README gives.
        assert_eq!(bytes[HEADER_SIZE..HEADER_SIZE + 6], [0, 0, 0, 2, 0, 1]);
        let size = u32::from_be_bytes(bytes[106..110].try_into().unwrap()) as usize;
        assert_eq!(size, frames[0].stored.len() - 4);
        let second = 110 + size;
        assert_eq!(bytes[second..second + 6], [0, 0, 0, 9, 0, 1]);
        let trailer = &bytes[bytes.len() - 16..];
        assert_eq!(trailer[..8], (CHECKSUM_FLAG | 0x1234).to_be_bytes());
        assert_eq!(trailer[8] & 0x80, 0x80, "file checksum carries the flag");
        let index_size = u64::from_be_bytes(
            bytes[bytes.len() - 24..bytes.len() - 16]
                .try_into()
                .unwrap(),
        );
        let index_start = bytes.len() - 24 - index_size as usize;
        assert_eq!(
            bytes[index_start - 6..index_start],
            [0; 6],
            "zero page header ends pages"
        );
        assert_eq!(
            bytes[index_start..index_start + 3],
            [2, 100, 10 + size as u8]
        );
    }

    #[test]
    fn snapshot_computes_its_post_apply_checksum_and_refuses_a_wrong_one() {
        let pages: Vec<_> = (1..=3).map(|pgno| (pgno, page(pgno as u8, 1024))).collect();
        let expected = reference_database_checksum(pages.iter().map(|(n, p)| (*n, p.as_slice())));
        let bytes = encode_file(header(1024, 3, 1, 1), &pages, None);
        let (_, decoded, trailer) = decode_all(&bytes).unwrap();
        assert_eq!(decoded, pages);
        assert_eq!(trailer.post_apply_checksum, expected);

        let mut encoder = Encoder::new(Vec::new(), header(1024, 3, 1, 1)).unwrap();
        for (pgno, data) in &pages {
            encoder.write_page(*pgno, data).unwrap();
        }
        let err = encoder.finish(Some(expected ^ 1)).unwrap_err();
        assert!(
            matches!(err, LtxError::PostApplyChecksumMismatch { computed, .. } if computed == expected)
        );
    }

    #[test]
    fn refused_pages_name_the_rule_and_leave_the_encoder_usable() {
        let mut encoder = Encoder::new(Vec::new(), header(512, 5, 2, 2)).unwrap();
        let data = page(1, 512);
        encoder.write_page(3, &data).unwrap();
        let err =
            |e: &mut Encoder<Vec<u8>>, pgno, data: &[u8]| e.write_page(pgno, data).unwrap_err();
        assert!(matches!(
            err(&mut encoder, 3, &data),
            LtxError::PageOutOfOrder { prev: 3, pgno: 3 }
        ));
        assert!(matches!(
            err(&mut encoder, 2, &data),
            LtxError::PageOutOfOrder { prev: 3, pgno: 2 }
        ));
        assert!(matches!(
            err(&mut encoder, 6, &data),
            LtxError::PageBeyondCommit { pgno: 6, commit: 5 }
        ));
        assert!(matches!(
            err(&mut encoder, 0, &data),
            LtxError::PageNumberZero { .. }
        ));
        assert!(matches!(
            err(&mut encoder, 4, &data[..100]),
            LtxError::PageBufferSize {
                expected: 512,
                found: 100
            }
        ));
        encoder.write_page(5, &data).unwrap();
        assert!(matches!(
            encoder.finish(None),
            Err(LtxError::PostApplyChecksumRequired)
        ));

        let lock = lock_pgno(512);
        let mut encoder = Encoder::new(Vec::new(), header(512, lock + 1, 2, 2)).unwrap();
        assert!(
            matches!(err(&mut encoder, lock, &data), LtxError::LockPage { pgno } if pgno == lock)
        );
        encoder.write_page(lock + 1, &data).unwrap();

        let mut snapshot = Encoder::new(Vec::new(), header(512, 3, 1, 1)).unwrap();
        assert!(matches!(
            err(&mut snapshot, 2, &data),
            LtxError::SnapshotGap {
                expected: 1,
                found: 2
            }
        ));
        snapshot.write_page(1, &data).unwrap();
        assert!(matches!(
            err(&mut snapshot, 3, &data),
            LtxError::SnapshotGap {
                expected: 2,
                found: 3
            }
        ));
        snapshot.write_page(2, &data).unwrap();
        assert!(matches!(
            snapshot.finish(None),
            Err(LtxError::SnapshotIncomplete { last: 2, commit: 3 })
        ));

        let bad_header = Header {
            page_size: 1000,
            ..header(512, 3, 1, 1)
        };
        assert!(matches!(
            Encoder::new(Vec::new(), bad_header),
            Err(LtxError::InvalidPageSize { .. })
        ));
    }

    #[test]
    fn snapshots_step_over_the_lock_page() {
        assert_eq!(next_snapshot_pgno(0, 5), 1);
        assert_eq!(next_snapshot_pgno(3, 5), 4);
        assert_eq!(next_snapshot_pgno(4, 5), 6);
    }

    #[test]
    fn deletion_and_no_checksum_files() {
        // A database truncated to zero pages: no pages, the empty database checksum.
        let bytes = encode_file(header(4096, 0, 7, 7), &[], None);
        let (header_read, pages, trailer) = decode_all(&bytes).unwrap();
        assert_eq!((header_read.commit, pages.len()), (0, 0));
        assert_eq!(trailer.post_apply_checksum, EMPTY_DATABASE_CHECKSUM);
        assert_eq!(bytes.len(), HEADER_SIZE + 6 + 1 + 8 + 16);

        let no_checksum = Header {
            flags: HEADER_FLAG_NO_CHECKSUM,
            pre_apply_checksum: 0,
            ..header(512, 2, 3, 4)
        };
        let bytes = encode_file(no_checksum, &[(2, page(9, 512))], None);
        let (_, _, trailer) = decode_all(&bytes).unwrap();
        assert_eq!(trailer.post_apply_checksum, 0);
        let encoder = Encoder::new(Vec::new(), no_checksum).unwrap();
        assert!(matches!(
            encoder.finish(Some(CHECKSUM_FLAG)),
            Err(LtxError::InvalidTrailer { .. })
        ));
    }

    #[test]
    fn incompressible_pages_round_trip() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let bytes = encode_file(header(65536, 1, 1, 1), &[(1, noise.clone())], None);
        let mut decoder = Decoder::new(bytes.as_slice()).unwrap();
        let mut out = vec![0; 65536];
        assert_eq!(decoder.next_page(&mut out).unwrap(), Some(1));
        assert_eq!(out, noise);
        assert!(decoder.finish().is_ok());
    }
}
