//! Ring records: a ring whose slots (and status table, and header positions or whole header)
//! hold arbitrary bytes is consumed with `Ring::pop`, then produced into and consumed again.
//! Nothing may panic, read outside the ring (the buffer is exactly the ring's size, so
//! AddressSanitizer sees any overrun) or loop: every call is bounded and every pop that
//! returns a record or a skip moves the tail forward.
//!
//! Checked besides: a registration comes back with the path its hash names; once the
//! consumer has caught up with the producers (`Empty` with head = tail), a record a producer
//! posted comes back exactly, registrations spanning several slots included.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multidb::ring::{self, Commit, Consumer, Pop, Record, Ring, Status, MAX_PATH, STUCK_SLOT_NS};
use multidb_fuzz::{Header, RingInput, STATUS_ENTRIES};

/// Header offsets of `head` and `tail` (the layout in `ext/src/ring.rs`).
const HEAD: usize = 64;
const TAIL: usize = 128;

/// Pops until empty, for at most `bound` calls, on a clock that jumps past the stuck-slot
/// bound whenever a slot is pending. Returns what came out and whether the ring ended empty.
fn drain(ring: &Ring, consumer: &mut Consumer, now: &mut u64, bound: usize) -> (Vec<Record>, bool) {
    let mut records = Vec::new();
    for _ in 0..bound {
        let before = ring.stats().tail;
        match ring.pop(consumer, *now) {
            Pop::Empty => return (records, true),
            Pop::Pending => {
                *now += STUCK_SLOT_NS + 1;
                continue;
            }
            Pop::Skipped => {}
            Pop::Record(record) => {
                if let Record::Register {
                    path, path_hash, ..
                } = &record
                {
                    assert!(!path.is_empty() && path.len() <= MAX_PATH);
                    assert_eq!(ring::path_hash(path), *path_hash, "registration hash");
                }
                records.push(record);
            }
        }
        assert_ne!(
            ring.stats().tail,
            before,
            "a pop that takes or skips moves the tail"
        );
    }
    (records, false)
}

/// Copies `bytes` into the ring's memory at byte `offset`, clipped to its end.
fn write_at(memory: &mut [u64], offset: usize, bytes: &[u8]) {
    for (i, byte) in bytes.iter().enumerate() {
        let at = offset + i;
        let Some(word) = memory.get_mut(at / 8) else {
            return;
        };
        let mut le = word.to_ne_bytes();
        le[at % 8] = *byte;
        *word = u64::from_ne_bytes(le);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = RingInput::decode(data) else {
        return;
    };
    let len = ring::file_size(input.slots, STATUS_ENTRIES);
    let mut memory = vec![0u64; len / 8];
    // SAFETY: `memory` is 8-aligned, `len` bytes long, and nothing else touches it meanwhile;
    // the view is dropped at once.
    let made = unsafe {
        Ring::init(
            memory.as_mut_ptr().cast(),
            len,
            input.slots,
            STATUS_ENTRIES,
            1,
        )
    };
    made.expect("the target's geometry is valid");
    write_at(&mut memory, ring::HEADER_SIZE, input.body);
    let raw_header = match input.header {
        Header::Positions { head, tail } => {
            write_at(&mut memory, HEAD, &head.to_ne_bytes());
            write_at(&mut memory, TAIL, &tail.to_ne_bytes());
            false
        }
        Header::Raw(raw) => {
            write_at(&mut memory, 0, raw);
            true
        }
    };
    // SAFETY: as for `init`; `memory` outlives `ring` and is only used through it from here.
    let ring = match unsafe { Ring::open(memory.as_mut_ptr().cast(), len) } {
        Ok(ring) => ring,
        Err(e) => {
            assert!(raw_header, "a ring made by init no longer opens: {e}");
            return;
        }
    };
    assert!(ring::file_size(ring.capacity() as u32, ring.status_capacity() as u32) <= len);

    let bound = 4 * ring.capacity() as usize + 16;
    let mut consumer = Consumer::default();
    let mut now = 1_000;
    let (records, empty) = drain(&ring, &mut consumer, &mut now, bound);
    let caught_up = empty && ring.stats().head == ring.stats().tail;

    // The status table holds input bytes too: lookups and the agent's writes stay inside it.
    for record in &records {
        let (dev, ino) = match record {
            Record::Commit(c) => (c.dev, c.ino),
            Record::Register { dev, ino, .. } => (*dev, *ino),
        };
        let _ = ring.status(dev, ino);
    }
    let status = Status {
        dev: 7,
        ino: 8,
        tier: ring::Tier::Hot,
        ..Status::default()
    };
    if ring.publish_status(&status) {
        assert_eq!(ring.status(7, 8), Some(status));
    }
    ring.remove_status(7, 8);

    // Producers post into whatever state the consumer left.
    let commit = Commit {
        dev: 1,
        ino: 2,
        path_hash: 3,
        frames: 4,
        pid: 5,
        time_ns: 6,
    };
    let mut posted = Vec::new();
    if ring.push_commit(&commit) {
        posted.push(Record::Commit(commit));
    }
    if ring.push_registration(9, 10, 11, input.path) {
        posted.push(Record::Register {
            dev: 9,
            ino: 10,
            path_hash: ring::path_hash(input.path),
            pid: 11,
            path: input.path.to_vec(),
        });
    }
    let (records, _) = drain(&ring, &mut consumer, &mut now, bound);
    if caught_up {
        assert_eq!(records, posted, "a caught-up ring returns what was posted");
    }
});
