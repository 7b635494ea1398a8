//! The LTX decoder over arbitrary bytes: every input ends in pages and a verified trailer or
//! in an error, never a panic, an endless loop or an allocation the input does not justify
//! (libFuzzer's `-rss_limit_mb` and `-malloc_limit_mb` catch those).
//!
//! The same bytes are decoded twice, in place (every payload straight out of the slice) and
//! through a 64-byte buffer (payloads straddling refills), which must agree. A file that
//! decodes is encoded again from its pages and must decode to the same pages.
#![no_main]

use std::io::BufRead;

use libfuzzer_sys::fuzz_target;
use multidb_agent::ltx::{Decoder, Encoder, Header, LtxError, Trailer};

/// A buffer smaller than most frames, so the decoder's copy-out path runs too.
const SMALL_BUFFER: usize = 64;

type Decoded = (Header, Vec<(u32, Vec<u8>)>, Trailer);

fn decode<B: BufRead>(decoder: Result<Decoder<B>, LtxError>) -> Result<Decoded, String> {
    let mut decoder = decoder.map_err(|e| e.to_string())?;
    let header = *decoder.header();
    let mut page = vec![0u8; header.page_size as usize];
    let mut pages = Vec::new();
    while let Some(pgno) = decoder.next_page(&mut page).map_err(|e| e.to_string())? {
        pages.push((pgno, page.clone()));
    }
    assert_eq!(decoder.page_index().len(), pages.len());
    let trailer = *decoder.trailer().expect("an ended decoder has its trailer");
    Ok((header, pages, trailer))
}

fuzz_target!(|data: &[u8]| {
    let in_place = decode(Decoder::buffered(data));
    let small = decode(Decoder::with_capacity(SMALL_BUFFER, data));
    assert_eq!(in_place, small, "buffering changed what was decoded");
    let Ok((header, pages, trailer)) = in_place else {
        return;
    };
    let Ok(mut encoder) = Encoder::new(Vec::new(), header) else {
        panic!("a decoded header does not encode: {header:?}");
    };
    for (pgno, page) in &pages {
        encoder
            .write_page(*pgno, page)
            .expect("decoded pages re-encode");
    }
    let (bytes, _) = encoder
        .finish(Some(trailer.post_apply_checksum))
        .expect("a decoded file re-encodes");
    let (again_header, again_pages, again_trailer) =
        decode(Decoder::buffered(bytes.as_slice())).expect("a re-encoded file decodes");
    assert_eq!(again_header, header);
    assert_eq!(again_pages, pages);
    assert_eq!(
        again_trailer.post_apply_checksum,
        trailer.post_apply_checksum
    );
});
