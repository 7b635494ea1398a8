//! Merges a TXID-contiguous chain of LTX files into one, streaming.
//!
//! Every input is decoded in step, page number by page number, so memory is one page buffer
//! per input plus the output's page index, however large the files. For each page number the
//! copy from the latest input wins; pages beyond the last input's commit size are dropped (the
//! database shrank). Each input is fully verified as it ends, before the output is finished.

use std::io::{Read, Write};

use super::{Decoder, Encoder, Header, LtxError, Result, Trailer, HEADER_FLAG_NO_CHECKSUM};

/// The output of [`compact`]: the writer back, and what was written.
#[derive(Debug)]
pub struct Compacted<W> {
    pub out: W,
    pub header: Header,
    pub trailer: Trailer,
}

/// Compacts `inputs`, oldest first, into one file written to `out`.
///
/// The result spans the first input's MinTXID to the last one's MaxTXID, with the first's
/// pre-apply checksum and the last's commit size, timestamp and post-apply checksum. Each
/// input must continue the chain: it starts at most one past the previous MaxTXID and ends
/// beyond it (overlap is accepted, as the Go compactor does; a gap is an error). If any input
/// tracks no checksums, neither does the output. WAL fields and node ID are not carried over.
pub fn compact<R: Read, W: Write>(
    inputs: impl IntoIterator<Item = R>,
    out: W,
) -> Result<Compacted<W>> {
    let in_input = |index: usize| {
        move |e: LtxError| LtxError::Input {
            index,
            error: Box::new(e),
        }
    };
    let mut decoders = inputs
        .into_iter()
        .enumerate()
        .map(|(index, input)| Decoder::new(input).map_err(in_input(index)))
        .collect::<Result<Vec<_>>>()?;
    let (Some(first), Some(last)) = (decoders.first(), decoders.last()) else {
        return Err(LtxError::NoInputs);
    };
    let (first, last) = (*first.header(), *last.header());

    let mut prev = first;
    for (index, decoder) in decoders.iter().enumerate().skip(1) {
        let header = decoder.header();
        if header.page_size != first.page_size {
            let (expected, found) = (first.page_size, header.page_size);
            return Err(LtxError::PageSizeMismatch {
                index,
                expected,
                found,
            });
        }
        if header.min_txid > prev.max_txid.saturating_add(1) || header.max_txid <= prev.max_txid {
            let (prev_max, min, max) = (prev.max_txid, header.min_txid, header.max_txid);
            return Err(LtxError::NonContiguous {
                index,
                prev_max,
                min,
                max,
            });
        }
        prev = *header;
    }

    let tracks_checksums = decoders.iter().all(|d| d.header().tracks_checksums());
    let header = Header {
        flags: if tracks_checksums {
            0
        } else {
            HEADER_FLAG_NO_CHECKSUM
        },
        page_size: first.page_size,
        commit: last.commit,
        min_txid: first.min_txid,
        max_txid: last.max_txid,
        timestamp_ms: last.timestamp_ms,
        pre_apply_checksum: if tracks_checksums {
            first.pre_apply_checksum
        } else {
            0
        },
        ..Header::default()
    };
    let mut encoder = Encoder::new(out, header)?;

    let page_size = header.page_size as usize;
    let mut buffers = vec![vec![0u8; page_size]; decoders.len()];
    // The page each input has read but not yet merged; `None` once its page block ended.
    let mut heads = Vec::with_capacity(decoders.len());
    for (index, (decoder, buffer)) in decoders.iter_mut().zip(&mut buffers).enumerate() {
        heads.push(decoder.next_page(buffer).map_err(in_input(index))?);
    }
    while let Some(pgno) = heads.iter().flatten().min().copied() {
        let newest = heads.iter().rposition(|head| *head == Some(pgno));
        if let Some(newest) = newest.filter(|_| pgno <= header.commit) {
            encoder.write_page(pgno, &buffers[newest])?;
        }
        for (index, head) in heads.iter_mut().enumerate() {
            if *head == Some(pgno) {
                *head = decoders[index]
                    .next_page(&mut buffers[index])
                    .map_err(in_input(index))?;
            }
        }
    }

    let post_apply = match decoders.last().and_then(|d| d.trailer()) {
        Some(trailer) if tracks_checksums => Some(trailer.post_apply_checksum),
        _ => None,
    };
    let (out, trailer) = encoder.finish(post_apply)?;
    Ok(Compacted {
        out,
        header,
        trailer,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::super::test_support::*;
    use super::super::{CHECKSUM_FLAG, EMPTY_DATABASE_CHECKSUM};
    use super::*;

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; 1024]
    }

    fn file(min: u64, max: u64, commit: u32, pages: &[(u32, u8)], post: u64) -> Vec<u8> {
        let pages: Pages = pages
            .iter()
            .map(|&(pgno, byte)| (pgno, page(byte)))
            .collect();
        let header = Header {
            timestamp_ms: max as i64 * 1000,
            ..header(1024, commit, min, max)
        };
        encode_file(header, &pages, (min > 1).then_some(post))
    }

    fn run(inputs: &[Vec<u8>]) -> Result<(Compacted<Vec<u8>>, Pages)> {
        let compacted = compact(inputs.iter().map(Vec::as_slice), Vec::new())?;
        let (header, pages, trailer) = decode_all(&compacted.out).unwrap();
        assert_eq!(
            (header, trailer),
            (compacted.header, compacted.trailer),
            "output decodes"
        );
        Ok((compacted, pages))
    }

    /// Go's compactor_test.go "NonSnapshotPageDataOnly", checked field by field.
    #[test]
    fn latest_page_wins_and_the_header_spans_the_chain() {
        let inputs = [
            file(2, 3, 3, &[(3, 0x83)], CHECKSUM_FLAG | 3),
            file(4, 5, 3, &[(1, 0x91)], CHECKSUM_FLAG | 5),
            file(
                6,
                9,
                5,
                &[(2, 0xA2), (3, 0xA3), (5, 0xA5)],
                CHECKSUM_FLAG | 9,
            ),
        ];
        let (out, pages) = run(&inputs).unwrap();
        let h = out.header;
        assert_eq!(
            (h.min_txid, h.max_txid, h.commit, h.timestamp_ms),
            (2, 9, 5, 9000)
        );
        assert_eq!(h.pre_apply_checksum, CHECKSUM_FLAG | 2);
        assert_eq!(out.trailer.post_apply_checksum, CHECKSUM_FLAG | 9);
        let expected: Pages = vec![
            (1, page(0x91)),
            (2, page(0xA2)),
            (3, page(0xA3)),
            (5, page(0xA5)),
        ];
        assert_eq!(pages, expected);
    }

    #[test]
    fn snapshot_plus_changes_gives_the_snapshot_of_the_final_database() {
        let base = [(1, 0x81), (2, 0x82), (3, 0x83)];
        let base_checksum = reference_database_checksum(
            base.map(|(n, b)| (n, page(b)))
                .iter()
                .map(|(n, p)| (*n, p.as_slice())),
        );
        let final_db: Pages = vec![
            (1, page(0x91)),
            (2, page(0x82)),
            (3, page(0x93)),
            (4, page(0x94)),
        ];
        let final_checksum =
            reference_database_checksum(final_db.iter().map(|(n, p)| (*n, p.as_slice())));
        let inputs = [
            file(1, 1, 3, &base, 0),
            file(2, 2, 4, &[(1, 0x91), (3, 0x93), (4, 0x94)], final_checksum),
        ];
        assert_eq!(
            decode_all(&inputs[0]).unwrap().2.post_apply_checksum,
            base_checksum
        );
        let (out, pages) = run(&inputs).unwrap();
        assert!(out.header.is_snapshot());
        assert_eq!(out.header.pre_apply_checksum, 0);
        assert_eq!(pages, final_db);
        assert_eq!(out.trailer.post_apply_checksum, final_checksum);

        // A chain whose last post-apply checksum lies cannot produce a snapshot.
        let lying = [
            inputs[0].clone(),
            file(
                2,
                2,
                4,
                &[(1, 0x91), (3, 0x93), (4, 0x94)],
                CHECKSUM_FLAG | 7,
            ),
        ];
        assert!(matches!(
            run(&lying),
            Err(LtxError::PostApplyChecksumMismatch { .. })
        ));
    }

    #[test]
    fn pages_beyond_the_final_commit_are_dropped() {
        let inputs = [
            file(2, 3, 3, &[(3, 0x83)], CHECKSUM_FLAG | 3),
            file(4, 5, 2, &[(1, 0x91)], CHECKSUM_FLAG | 5),
        ];
        let (out, pages) = run(&inputs).unwrap();
        assert_eq!(out.header.commit, 2);
        assert_eq!(pages, vec![(1, page(0x91))]);

        let deleted = [
            inputs[0].clone(),
            file(4, 4, 0, &[], EMPTY_DATABASE_CHECKSUM),
        ];
        let (out, pages) = run(&deleted).unwrap();
        assert_eq!((out.header.commit, pages.len()), (0, 0));
        assert_eq!(out.trailer.post_apply_checksum, EMPTY_DATABASE_CHECKSUM);
    }

    #[test]
    fn the_chain_must_be_contiguous_and_uniform() {
        let a = file(2, 2, 1, &[(1, 0x81)], CHECKSUM_FLAG | 2);
        let gap = file(4, 4, 1, &[(1, 0x91)], CHECKSUM_FLAG | 4);
        assert!(matches!(
            run(&[a.clone(), gap]),
            Err(LtxError::NonContiguous {
                index: 1,
                prev_max: 2,
                min: 4,
                max: 4
            })
        ));
        let stale = file(2, 2, 1, &[(1, 0x91)], CHECKSUM_FLAG | 4);
        assert!(matches!(
            run(&[a.clone(), stale]),
            Err(LtxError::NonContiguous { index: 1, .. })
        ));
        // Overlap that moves forward is accepted, as the Go compactor does.
        let overlap = file(2, 3, 1, &[(1, 0x92)], CHECKSUM_FLAG | 3);
        assert_eq!(run(&[a.clone(), overlap]).unwrap().1, vec![(1, page(0x92))]);

        let small = encode_file(
            header(512, 1, 3, 3),
            &[(1, vec![0; 512])],
            Some(CHECKSUM_FLAG | 3),
        );
        assert!(matches!(
            run(&[a.clone(), small]),
            Err(LtxError::PageSizeMismatch {
                index: 1,
                expected: 1024,
                found: 512
            })
        ));
        assert!(matches!(run(&[]), Err(LtxError::NoInputs)));

        let mut corrupt = file(3, 3, 1, &[(1, 0x93)], CHECKSUM_FLAG | 3);
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        let err = run(&[a, corrupt]).unwrap_err();
        assert!(
            matches!(&err, LtxError::Input { index: 1, error: source } if matches!(**source, LtxError::FileChecksumMismatch { .. })),
            "{err}"
        );
    }

    #[test]
    fn an_input_without_checksums_makes_the_output_checksum_free() {
        let mut no_checksum = header(1024, 1, 3, 3);
        no_checksum.flags = HEADER_FLAG_NO_CHECKSUM;
        no_checksum.pre_apply_checksum = 0;
        let inputs = [
            file(2, 2, 1, &[(1, 0x81)], CHECKSUM_FLAG | 2),
            encode_file(no_checksum, &[(1, page(0x93))], None),
        ];
        let (out, _) = run(&inputs).unwrap();
        assert!(!out.header.tracks_checksums());
        assert_eq!(
            (
                out.header.pre_apply_checksum,
                out.trailer.post_apply_checksum
            ),
            (0, 0)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        /// Compacting a snapshot and its random successors gives the snapshot of the database
        /// the successors produce one after another.
        #[test]
        fn compaction_equals_applying_the_chain_in_order(
            base in 1u32..12,
            steps in prop::collection::vec((1u32..16, prop::collection::btree_map(1u32..16, any::<u8>(), 0..6)), 1..5),
        ) {
            let page = |byte: u8| vec![byte; 512];
            let mut db: BTreeMap<u32, Vec<u8>> = (1..=base).map(|n| (n, page(n as u8))).collect();
            let snapshot: Pages = db.clone().into_iter().collect();
            let mut inputs = vec![encode_file(header(512, base, 1, 1), &snapshot, None)];
            for (txid, (commit, changes)) in (2u64..).zip(steps) {
                // A growing database writes every new page; a shrinking one loses its tail.
                let old_commit = db.len() as u32;
                db.retain(|&pgno, _| pgno <= commit);
                let mut pages = BTreeMap::new();
                for pgno in old_commit + 1..=commit {
                    pages.insert(pgno, page(0));
                }
                for (pgno, byte) in changes.into_iter().filter(|(pgno, _)| *pgno <= commit) {
                    pages.insert(pgno, page(byte));
                }
                db.extend(pages.clone());
                let checksum = reference_database_checksum(db.iter().map(|(n, p)| (*n, p.as_slice())));
                let pages: Pages = pages.into_iter().collect();
                inputs.push(encode_file(header(512, commit, txid, txid), &pages, Some(checksum)));
            }
            let (out, pages) = run(&inputs).unwrap();
            prop_assert_eq!(out.header.max_txid, inputs.len() as u64);
            prop_assert_eq!(pages, db.into_iter().collect::<Pages>());
        }
    }
}
