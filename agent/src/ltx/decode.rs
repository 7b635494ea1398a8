//! Streaming LTX reader: yields pages one at a time and verifies the whole file at its end.
//!
//! Nothing is trusted until the end: the page index must describe exactly the frames read,
//! the file checksum must match, no byte may follow the trailer, and a snapshot must hold
//! every page and hash to its post-apply checksum. A caller that applies pages as they come
//! must therefore write to a temporary file and keep it only once [`Decoder::next_page`] has
//! returned `None` (restore does so).

use std::io::{BufRead, BufReader, Read};

use lz4_flex::block::{decompress_into, decompress_into_with_dict, get_maximum_output_size};

use super::{
    be_u64, checksum_page_from_raw, crc64, crc64_digest, read_error, read_full,
    toggle_page_checksum, Crc64Digest, Header, LtxError, PageHeader, PageIndexEntry, Result, Shift,
    Trailer, CHECKSUM_FLAG, EMPTY_DATABASE_CHECKSUM, HEADER_SIZE, PAGE_FLAG_SIZE, PAGE_HEADER_SIZE,
    TRAILER_SIZE,
};

/// Input buffered by [`Decoder::new`]: enough for the small files of an incremental chain.
const DEFAULT_BUFFER: usize = 8 * 1024;

/// Reads one LTX file from buffered input `B`: a [`BufReader`] that [`Decoder::new`] puts
/// around any reader, or bytes already in memory ([`Decoder::buffered`]).
pub struct Decoder<B: BufRead> {
    input: B,
    header: Header,
    file_digest: Crc64Digest,
    /// Moves a CRC register past one page: each page is hashed once for both checksums.
    shift: &'static Shift,
    /// The page checksum of the page [`Decoder::next_page`] returned last.
    page_checksum: u64,
    /// Bytes read so far: the offset of the next frame.
    offset: u64,
    prev_pgno: u32,
    /// Database checksum of the pages read, kept for snapshots only.
    database_checksum: u64,
    /// The frames read, to hold the stored page index against.
    index: Vec<PageIndexEntry>,
    compressed: Vec<u8>,
    /// Set once the file has been read to its end and verified.
    trailer: Option<Trailer>,
}

impl<R: Read> Decoder<BufReader<R>> {
    /// Reads and validates the header.
    pub fn new(input: R) -> Result<Self> {
        Self::with_capacity(DEFAULT_BUFFER, input)
    }

    /// Reads and validates the header, buffering `capacity` bytes of input at a time: a large
    /// buffer saves read calls and lets most payloads decompress straight out of it.
    pub fn with_capacity(capacity: usize, input: R) -> Result<Self> {
        Decoder::buffered(BufReader::with_capacity(capacity, input))
    }
}

impl<B: BufRead> Decoder<B> {
    /// Reads and validates the header of input that is buffered already. A byte slice (a
    /// mapped file, say) is read without a copy: every payload decompresses straight out of it.
    pub fn buffered(mut input: B) -> Result<Self> {
        let mut bytes = [0u8; HEADER_SIZE];
        input.read_exact(&mut bytes).map_err(read_error("header"))?;
        let header = Header::decode(&bytes)?;
        let page_size = header.page_size;
        let shift = Shift::page(page_size).ok_or(LtxError::InvalidPageSize { page_size })?;
        let mut file_digest = crc64_digest();
        file_digest.update(&bytes);
        Ok(Decoder {
            input,
            header,
            file_digest,
            shift,
            page_checksum: 0,
            offset: HEADER_SIZE as u64,
            prev_pgno: 0,
            database_checksum: EMPTY_DATABASE_CHECKSUM,
            index: Vec::new(),
            compressed: vec![0; get_maximum_output_size(header.page_size as usize)],
            trailer: None,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The trailer, once the file has been read to its end and verified.
    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    /// The page checksum ([`super::checksum_page`]) of the page [`Decoder::next_page`]
    /// returned last, computed in the same pass as the file checksum.
    pub fn page_checksum(&self) -> u64 {
        self.page_checksum
    }

    /// Where each frame read so far sits; the whole, verified index once the file has ended.
    pub fn page_index(&self) -> &[PageIndexEntry] {
        &self.index
    }

    /// Reads the next page into `page` (one page size long) and returns its number, or
    /// verifies the rest of the file and returns `None` when the page block has ended.
    pub fn next_page(&mut self, page: &mut [u8]) -> Result<Option<u32>> {
        if self.trailer.is_some() {
            return Ok(None);
        }
        let page_size = self.header.page_size;
        if page.len() != page_size as usize {
            return Err(LtxError::PageBufferSize {
                expected: page_size,
                found: page.len(),
            });
        }
        let frame_offset = self.offset;
        let mut bytes = [0u8; PAGE_HEADER_SIZE];
        self.read_hashed(&mut bytes, "page header")?;
        let Some(page_header) = PageHeader::decode(&bytes)? else {
            self.read_index_and_trailer()?;
            return Ok(None);
        };
        let pgno = page_header.pgno;
        super::check_page_order(&self.header, self.prev_pgno, pgno)?;

        if page_header.flags & PAGE_FLAG_SIZE != 0 {
            let mut size = [0u8; 4];
            self.read_hashed(&mut size, "page size prefix")?;
            let size = u32::from_be_bytes(size) as usize;
            if size > self.compressed.len() {
                let reason = format!("compressed size {size} exceeds the LZ4 bound of a page");
                return Err(LtxError::Decompress { pgno, reason });
            }
            // Straight out of the input buffer when the payload is all there, copied first
            // when it straddles the buffer's end.
            let buffered = self.input.fill_buf().map_err(read_error("page data"))?;
            let result = if let Some(payload) = buffered.get(..size) {
                let result = decompress_into(payload, page);
                self.input.consume(size);
                result
            } else {
                let payload = &mut self.compressed[..size];
                self.input
                    .read_exact(payload)
                    .map_err(read_error("page data"))?;
                decompress_into(payload, page)
            };
            self.offset += size as u64;
            let decompressed = result.map_err(|e| LtxError::Decompress {
                pgno,
                reason: e.to_string(),
            })?;
            if decompressed != page.len() {
                let reason = format!("{decompressed} bytes instead of {page_size}");
                return Err(LtxError::Decompress { pgno, reason });
            }
        } else {
            let mut counted = CountedReader {
                inner: &mut self.input,
                count: 0,
            };
            read_lz4_frame(&mut counted, pgno, page, &mut self.compressed)?;
            self.offset += counted.count;
        }
        // The page, not its payload, is what the file checksum covers.
        let raw = crc64::raw(page);
        self.file_digest.append(raw, self.shift);
        self.page_checksum = checksum_page_from_raw(pgno, raw, self.shift);

        if self.header.is_snapshot() && self.header.tracks_checksums() {
            self.database_checksum =
                toggle_page_checksum(self.database_checksum, self.page_checksum);
        }
        let size = self.offset - frame_offset;
        self.index.push(PageIndexEntry {
            pgno,
            offset: frame_offset,
            size,
        });
        self.prev_pgno = pgno;
        Ok(Some(pgno))
    }

    /// Reads (and discards) whatever pages remain, verifies the file, returns its trailer.
    pub fn finish(mut self) -> Result<Trailer> {
        let mut page = vec![0u8; self.header.page_size as usize];
        while self.next_page(&mut page)?.is_some() {}
        self.trailer.ok_or(LtxError::Truncated {
            section: "page block",
        })
    }

    fn read_index_and_trailer(&mut self) -> Result<()> {
        let mut varint_bytes = 0u64;
        let mut entries = 0usize;
        loop {
            let pgno = self.read_uvarint(&mut varint_bytes)?;
            if pgno == 0 {
                break;
            }
            let offset = self.read_uvarint(&mut varint_bytes)?;
            let size = self.read_uvarint(&mut varint_bytes)?;
            let matches = u32::try_from(pgno).ok().is_some_and(|pgno| {
                self.index.get(entries) == Some(&PageIndexEntry { pgno, offset, size })
            });
            if !matches {
                return Err(LtxError::PageIndex {
                    reason: "an entry disagrees with the frames",
                });
            }
            entries += 1;
        }
        if entries != self.index.len() {
            return Err(LtxError::PageIndex {
                reason: "it lists fewer pages than the file holds",
            });
        }
        let mut size = [0u8; 8];
        self.read_hashed(&mut size, "page index")?;
        if be_u64(&size) != varint_bytes {
            return Err(LtxError::PageIndex {
                reason: "its size field disagrees with its length",
            });
        }

        let mut bytes = [0u8; TRAILER_SIZE];
        self.input
            .read_exact(&mut bytes)
            .map_err(read_error("trailer"))?;
        self.file_digest.update(&bytes[..8]);
        let trailer = Trailer::decode(&bytes);
        let computed = CHECKSUM_FLAG | self.file_digest.clone().finalize();
        if computed != trailer.file_checksum {
            let stored = trailer.file_checksum;
            return Err(LtxError::FileChecksumMismatch { stored, computed });
        }
        if read_full(&mut self.input, &mut [0u8; 1]).map_err(read_error("trailer"))? != 0 {
            return Err(LtxError::TrailingData);
        }
        trailer.validate(&self.header)?;

        if self.header.is_snapshot() {
            if self.prev_pgno != self.header.last_snapshot_pgno() {
                let (last, commit) = (self.prev_pgno, self.header.commit);
                return Err(LtxError::SnapshotIncomplete { last, commit });
            }
            let computed = self.database_checksum;
            if self.header.tracks_checksums() && trailer.post_apply_checksum != computed {
                let stored = trailer.post_apply_checksum;
                return Err(LtxError::PostApplyChecksumMismatch { stored, computed });
            }
        }
        self.trailer = Some(trailer);
        Ok(())
    }

    fn read_hashed(&mut self, buf: &mut [u8], section: &'static str) -> Result<()> {
        self.input.read_exact(buf).map_err(read_error(section))?;
        self.file_digest.update(buf);
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Reads an unsigned LEB128 varint as Go's `binary.ReadUvarint` does (at most 10 bytes).
    fn read_uvarint(&mut self, bytes_read: &mut u64) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let mut byte = [0u8];
            self.read_hashed(&mut byte, "page index")?;
            *bytes_read += 1;
            let [byte] = byte;
            if shift == 63 && byte > 1 {
                break;
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(LtxError::PageIndex {
            reason: "a varint overflows 64 bits",
        })
    }
}

/// Counts the bytes a legacy frame takes, which nothing but parsing it reveals.
struct CountedReader<'a, R> {
    inner: &'a mut R,
    count: u64,
}

impl<R: Read> CountedReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner
            .read_exact(buf)
            .map_err(read_error("page data"))?;
        self.count += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, len: usize) -> Result<()> {
        self.read(&mut [0u8; 8][..len])
    }
}

const LZ4_FRAME_MAGIC: u32 = 0x184D_2204;

/// Decodes a legacy payload: one LZ4 *frame* with no size prefix, as ltx v0.5.0 and v0.5.1
/// (Litestream releases before the switch to blocks) wrote. Only the frame's own bytes are
/// read, so the next page header stays in the stream. The frame's xxHash checksums are not
/// verified: the file checksum covers the decompressed page anyway.
fn read_lz4_frame<R: Read>(
    input: &mut CountedReader<'_, R>,
    pgno: u32,
    page: &mut [u8],
    scratch: &mut [u8],
) -> Result<()> {
    let bad = |reason: String| LtxError::Decompress { pgno, reason };
    let mut head = [0u8; 6];
    input.read(&mut head)?;
    let [m0, m1, m2, m3, flg, bd] = head;
    if u32::from_le_bytes([m0, m1, m2, m3]) != LZ4_FRAME_MAGIC {
        return Err(bad("neither a size prefix nor an LZ4 frame".into()));
    }
    if flg >> 6 != 0b01 || flg & 0x01 != 0 || !(4..=7).contains(&((bd >> 4) & 7)) {
        return Err(bad(format!(
            "unsupported LZ4 frame descriptor {flg:#04x} {bd:#04x}"
        )));
    }
    let linked = flg & 0x20 == 0;
    let block_checksums = flg & 0x10 != 0;
    if flg & 0x08 != 0 {
        input.skip(8)?; // content size
    }
    input.skip(1)?; // descriptor checksum

    let mut written = 0usize;
    loop {
        let mut word = [0u8; 4];
        input.read(&mut word)?;
        let word = u32::from_le_bytes(word);
        if word == 0 {
            break; // end mark
        }
        let len = (word & 0x7fff_ffff) as usize;
        let Some(block) = scratch.get_mut(..len) else {
            return Err(bad(format!(
                "LZ4 block of {len} bytes is larger than a page"
            )));
        };
        input.read(block)?;
        let (done, rest) = page.split_at_mut(written);
        if word & 0x8000_0000 != 0 {
            let Some(target) = rest.get_mut(..len) else {
                return Err(bad("LZ4 frame holds more than one page".into()));
            };
            target.copy_from_slice(block);
            written += len;
        } else {
            let result = if linked {
                decompress_into_with_dict(block, rest, done)
            } else {
                decompress_into(block, rest)
            };
            written += result.map_err(|e| bad(e.to_string()))?;
        }
        if block_checksums {
            input.skip(4)?;
        }
    }
    if flg & 0x04 != 0 {
        input.skip(4)?; // content checksum
    }
    if written != page.len() {
        return Err(bad(format!(
            "LZ4 frame holds {written} bytes, not one page"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::test_support::*;
    use super::super::{checksum_page, Encoder, PAGE_SIZE_PREFIX};
    use super::*;

    fn page_contents(page_size: usize) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            any::<u8>().prop_map(move |byte| vec![byte; page_size]),
            prop::collection::vec(any::<u8>(), page_size),
            (any::<u8>(), 1usize..40).prop_map(move |(byte, period)| {
                (0..page_size)
                    .map(|i| byte.wrapping_add((i % period) as u8))
                    .collect()
            }),
        ]
    }

    /// A valid file's header and pages: a snapshot holds every page, an incremental file a
    /// random ascending subset; page contents range from constant to incompressible.
    fn files() -> impl Strategy<Value = (Header, Pages)> {
        let shape = (
            prop::sample::select(vec![512u32, 1024, 4096]),
            any::<bool>(),
            1u32..24,
            2u64..1000,
            0u64..5,
            any::<(i64, u64)>(),
        );
        shape.prop_flat_map(
            |(page_size, snapshot, commit, min, span, (timestamp_ms, node_id))| {
                let min_txid = if snapshot { 1 } else { min };
                let header = Header {
                    timestamp_ms,
                    node_id,
                    ..header(page_size, commit, min_txid, min_txid + span)
                };
                let pgnos = if snapshot {
                    Just((1..=commit).collect::<Vec<_>>()).boxed()
                } else {
                    prop::collection::btree_set(1..=commit, 0..=commit as usize)
                        .prop_map(|set| set.into_iter().collect())
                        .boxed()
                };
                (Just(header), pgnos).prop_flat_map(move |(header, pgnos)| {
                    let contents =
                        prop::collection::vec(page_contents(page_size as usize), pgnos.len());
                    (
                        Just(header),
                        contents.prop_map(move |c| pgnos.iter().copied().zip(c).collect()),
                    )
                })
            },
        )
    }

    fn post_apply_for(header: &Header) -> Option<u64> {
        (!header.is_snapshot()).then_some(CHECKSUM_FLAG | header.max_txid)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn round_trip_preserves_pages_header_and_trailer((header, pages) in files()) {
            let mut encoder = Encoder::new(Vec::new(), header).unwrap();
            for (pgno, page) in &pages {
                encoder.write_page(*pgno, page).unwrap();
            }
            let (bytes, written) = encoder.finish(post_apply_for(&header)).unwrap();
            let (read_header, read_pages, read_trailer) = decode_all(&bytes).unwrap();
            prop_assert_eq!(read_header, header);
            prop_assert_eq!(read_pages, pages);
            prop_assert_eq!(read_trailer, written);
        }

        /// The file checksum hashes decompressed pages, not payloads, so a flip inside a
        /// payload may yield another valid encoding of the same page. It must then decode to
        /// exactly the same content; any flip outside a payload must be rejected.
        #[test]
        fn any_flipped_byte_is_rejected_or_changes_nothing(
            (header, pages) in files(),
            position in any::<prop::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let bytes = encode_file(header, &pages, post_apply_for(&header));
            let original = Decoder::new(bytes.as_slice()).unwrap().finish().unwrap();
            let mut decoder = Decoder::new(bytes.as_slice()).unwrap();
            let mut page = vec![0u8; header.page_size as usize];
            while decoder.next_page(&mut page).unwrap().is_some() {}
            let in_payload = |i: u64| decoder.page_index().iter().any(|e| {
                (e.offset + (PAGE_HEADER_SIZE + PAGE_SIZE_PREFIX) as u64..e.offset + e.size).contains(&i)
            });

            let i = position.index(bytes.len());
            let mut corrupt = bytes.clone();
            corrupt[i] ^= mask;
            match decode_all(&corrupt) {
                Err(_) => {}
                Ok((read_header, read_pages, read_trailer)) => {
                    prop_assert!(in_payload(i as u64), "flip at {} outside a payload went unnoticed", i);
                    prop_assert_eq!(read_header, header);
                    prop_assert_eq!(read_pages, pages);
                    prop_assert_eq!(read_trailer, original);
                }
            }
        }

        #[test]
        fn any_truncation_is_reported_as_truncated(
            (header, pages) in files(),
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = encode_file(header, &pages, post_apply_for(&header));
            let cut = cut.index(bytes.len());
            let result = decode_all(&bytes[..cut]);
            prop_assert!(matches!(result, Err(LtxError::Truncated { .. })), "cut at {}: {:?}", cut, result.err());
        }
    }

    /// Input in memory is read in place, every payload straight out of it; a small buffer
    /// splits payloads across refills. Both read what the default buffer reads.
    #[test]
    fn any_buffering_reads_the_same() {
        let pages: Pages = (1..=40u32)
            .map(|pgno| (pgno, (0..4096u32).map(|i| (i * pgno / 7) as u8).collect()))
            .collect();
        let bytes = encode_file(header(4096, 40, 1, 1), &pages, None);
        let expected = decode_all(&bytes).unwrap();
        fn read_all<B: BufRead>(mut decoder: Decoder<B>) -> (Header, Pages, Trailer) {
            let mut page = vec![0u8; 4096];
            let mut read = Vec::new();
            while let Some(pgno) = decoder.next_page(&mut page).unwrap() {
                assert_eq!(decoder.page_checksum(), checksum_page(pgno, &page));
                read.push((pgno, page.clone()));
            }
            (*decoder.header(), read, *decoder.trailer().unwrap())
        }
        let in_place = Decoder::buffered(bytes.as_slice()).unwrap();
        assert_eq!(read_all(in_place), expected);
        let small = Decoder::with_capacity(1000, bytes.as_slice()).unwrap();
        assert_eq!(read_all(small), expected);
    }

    #[test]
    fn pages_arrive_one_at_a_time_and_the_trailer_only_at_the_end() {
        let pages: Pages = vec![(1, vec![1; 512]), (2, vec![2; 512])];
        let bytes = encode_file(header(512, 2, 1, 3), &pages, None);
        let mut decoder = Decoder::new(bytes.as_slice()).unwrap();
        let mut page = vec![0u8; 512];
        assert_eq!(decoder.next_page(&mut page).unwrap(), Some(1));
        assert_eq!(page, pages[0].1);
        assert_eq!(decoder.page_checksum(), checksum_page(1, &page));
        assert!(decoder.trailer().is_none());
        assert!(matches!(
            decoder.next_page(&mut [0u8; 100]),
            Err(LtxError::PageBufferSize {
                expected: 512,
                found: 100
            })
        ));
        assert_eq!(decoder.next_page(&mut page).unwrap(), Some(2));
        assert_eq!(decoder.page_checksum(), checksum_page(2, &page));
        assert_eq!(decoder.next_page(&mut page).unwrap(), None);
        assert!(decoder.trailer().is_some());
        assert_eq!(decoder.next_page(&mut page).unwrap(), None, "stays ended");
        assert_eq!(decoder.page_index().len(), 2);
    }

    /// Pages written by ltx v0.5.0/v0.5.1 (early Litestream v0.5) hold an LZ4 frame and no
    /// size prefix; the README keeps them valid within version 3.
    #[test]
    fn legacy_lz4_frame_pages_decode() {
        let pages: Vec<Vec<u8>> = (0..4u8)
            .map(|n| {
                (0..4096u32)
                    .map(|i| (i / (u32::from(n) + 1)) as u8 ^ n)
                    .collect()
            })
            .collect();
        let frames = vec![
            legacy_frame(1, &pages[0], None, false),
            legacy_frame(2, &pages[1], None, true),
            legacy_frame(3, &pages[2], Some(1500), false),
            block_frame(4, &pages[3]),
        ];
        let numbered: Vec<_> = (1..).zip(pages.iter().map(Vec::as_slice)).collect();
        let post_apply = reference_database_checksum(numbered.iter().copied());
        let bytes = assemble(&header(4096, 4, 1, 1), &frames, None, post_apply);
        let (_, read, trailer) = decode_all(&bytes).unwrap();
        assert_eq!(read, (1..).zip(pages).collect::<Pages>());
        assert_eq!(trailer.post_apply_checksum, post_apply);

        let mut not_a_frame = legacy_frame(1, &vec![0; 512], None, false);
        not_a_frame.stored[0] = 0;
        let bytes = assemble(&header(512, 1, 2, 2), &[not_a_frame], None, CHECKSUM_FLAG);
        assert!(matches!(
            decode_all(&bytes),
            Err(LtxError::Decompress { pgno: 1, .. })
        ));
    }

    #[test]
    fn the_page_index_must_describe_the_frames() {
        let page = vec![7u8; 512];
        let frames = || vec![block_frame(1, &page), block_frame(3, &page)];
        let post = CHECKSUM_FLAG | 9;
        let good = assemble(&header(512, 3, 2, 2), &frames(), None, post);
        let (_, _, _) = decode_all(&good).unwrap();
        let size = frames()[0].stored.len() as u64 + 6;

        let wrong_offset = index_bytes(&[(1, 101, size), (3, 100 + size, size)]);
        let missing = index_bytes(&[(1, 100, size)]);
        let mut bad_size_field = index_bytes(&[(1, 100, size), (3, 100 + size, size)]);
        let last = bad_size_field.len() - 1;
        bad_size_field[last] += 1;
        for index in [wrong_offset, missing, bad_size_field] {
            let bytes = assemble(&header(512, 3, 2, 2), &frames(), Some(index), post);
            assert!(matches!(
                decode_all(&bytes),
                Err(LtxError::PageIndex { .. })
            ));
        }
    }

    #[test]
    fn whole_file_checks() {
        let page = vec![5u8; 512];
        let checksum = reference_database_checksum([(1, page.as_slice())]);
        let frames = [block_frame(1, &page)];

        let wrong_post = assemble(&header(512, 1, 1, 1), &frames, None, checksum ^ 1);
        assert!(matches!(
            decode_all(&wrong_post),
            Err(LtxError::PostApplyChecksumMismatch { computed, .. }) if computed == checksum
        ));

        let mut good = assemble(&header(512, 1, 1, 1), &frames, None, checksum);
        assert!(decode_all(&good).is_ok());
        let stored = u64::from_be_bytes(good[good.len() - 8..].try_into().unwrap());
        let last = good.len() - 1;
        good[last] ^= 1;
        assert!(matches!(
            decode_all(&good),
            Err(LtxError::FileChecksumMismatch { stored: s, computed }) if s == stored ^ 1 && computed == stored
        ));
        good[last] ^= 1;
        good.push(0);
        assert!(matches!(decode_all(&good), Err(LtxError::TrailingData)));

        let incomplete = assemble(&header(512, 2, 1, 1), &frames, None, checksum);
        assert!(matches!(
            decode_all(&incomplete),
            Err(LtxError::SnapshotIncomplete { last: 1, commit: 2 })
        ));

        let mut short = block_frame(1, &page);
        let block = lz4_flex::block::compress(&page[..511]);
        short.stored = [&(block.len() as u32).to_be_bytes()[..], &block].concat();
        let bytes = assemble(&header(512, 1, 2, 2), &[short], None, CHECKSUM_FLAG | 2);
        assert!(matches!(
            decode_all(&bytes),
            Err(LtxError::Decompress { pgno: 1, .. })
        ));

        assert!(matches!(
            decode_all(b""),
            Err(LtxError::Truncated { section: "header" })
        ));
        assert!(matches!(
            decode_all(&[b'X'; 100]),
            Err(LtxError::BadMagic { .. })
        ));
    }
}
