//! The commit ring: the shared-memory file through which applications tell the agent, within
//! microseconds, which database was just written, and through which the agent tells them how
//! far each hot database is replicated.
//!
//! This module is free of SQLite types; the extension produces into it and the agent (through
//! this crate's rlib) consumes from it, so the layout is defined exactly once.
//!
//! Layout (all integers native-endian atomics; the file is shared only on one host):
//! - a 4096-byte header: magic (written last by the agent), version, geometry, then on their
//!   own cache lines the producers' `head` and the consumer's `tail`, counters, the agent's pid
//!   and heartbeat, and the futex word the agent sleeps on;
//! - `slot_count` slots of 64 bytes: a bounded multi-producer single-consumer queue with one
//!   sequence number per slot (Vyukov's design). A producer claims tickets with one CAS on
//!   `head`, writes its words, and publishes by moving the slot's sequence from `t` to `t + 1`;
//!   the consumer reads slot `t` when its sequence is `t + 1` and frees it for the next lap by
//!   setting it to `t + slot_count`. Producers never wait: a full ring or a lost race past a
//!   bound counts the record in `dropped`.
//! - `status_entries` entries of 64 bytes written by the agent (one writer) and read by the
//!   extension, each behind a sequence lock, keyed by (device, inode) with linear probing.
//!
//! Everything read from the file is untrusted: the geometry is checked against the file size
//! before use, every record carries a check word, and a bad record is counted and skipped.
//! Tickets advance with wrapping arithmetic: no ring lives to post 2^64 records, but a
//! corrupted or hostile header can put `head` or `tail` anywhere, and an overflow must not
//! panic a producer's commit hook or the agent.

mod consumer;
mod futex;
mod layout;
mod producer;
mod status_table;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub use consumer::{Consumer, STUCK_RUN_NS, STUCK_SLOT_NS};
pub use layout::*;
use layout::{check_geometry, off, CONT_BYTES, MAX_CLAIM_ATTEMPTS, MAX_PROBE};

fn mix(a: u64, b: u64) -> u64 {
    // MurmurHash3's 64-bit finalizer over both words: every input bit reaches every output
    // bit, so inodes that differ only in high bits (as files made in one burst do) do not
    // crowd into one probe window of the status table.
    let mut x = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The check word of a record's first slot: binds the words to the ticket, so a stale or torn
/// slot does not pass for a record.
///
/// Every commit pays for it, so each word costs one multiply (by an odd constant, a bijection)
/// and a rotation, and one finalizer spreads the result: a record that differs in any single
/// word from what was written never checks, and the rotation carries each word's high bits
/// into the next multiply, so differences in several words do not cancel bit by bit.
fn check_word(ticket: u64, words: &[u64; 6]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let acc = words
        .iter()
        .fold((ticket ^ MAGIC).wrapping_mul(K), |acc, &w| {
            (acc ^ w).wrapping_mul(K).rotate_left(29)
        });
    let x = (acc ^ (acc >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

/// FNV-1a over a path: the `path_hash` in every record, cheap enough for each commit.
pub fn path_hash(path: &[u8]) -> u64 {
    path.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A validated view of a mapped ring, borrowing the mapping for `'a`: the view cannot
/// outlive the memory it reads (a `RingFile` hands out `Ring<'_>` tied to itself; the
/// extension's mappings are leaked on purpose and give `Ring<'static>`).
#[derive(Debug, Clone, Copy)]
pub struct Ring<'a> {
    base: *mut u8,
    slots: u64,
    status_entries: usize,
    _mapping: std::marker::PhantomData<&'a [AtomicU64]>,
}

// SAFETY: all access through `Ring` goes through atomics on memory that is valid for the
// lifetime the creator guarantees; the pointer itself is just an address.
unsafe impl Send for Ring<'_> {}
// SAFETY: as above; shared access is what the atomics are for.
unsafe impl Sync for Ring<'_> {}

impl<'a> Ring<'a> {
    /// Validates the header of a mapped ring and returns a view that borrows the mapping.
    pub fn over(map: &'a memmap2::MmapMut) -> Result<Ring<'a>, RingError> {
        // SAFETY: the mapping is page-aligned, `len` bytes long, and borrowed for `'a`. Every
        // access through the view is atomic, which is what memory shared with other
        // processes needs; the pointer is only ever used for atomics.
        unsafe { Ring::open(map.as_ptr().cast_mut(), map.len()) }
    }

    /// Validates the header of a mapped ring of `len` bytes at `base`.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes, aligned to 8, for as long as
    /// the returned view (or any copy) is used.
    pub unsafe fn open(base: *mut u8, len: usize) -> Result<Ring<'a>, RingError> {
        if len < HEADER_SIZE {
            return Err(RingError::TooSmall(len));
        }
        let probe = Ring {
            base,
            slots: 0,
            status_entries: 0,
            _mapping: std::marker::PhantomData,
        };
        if probe.u64_at(off::MAGIC).load(Ordering::Acquire) != MAGIC {
            return Err(RingError::BadMagic);
        }
        let version = probe.u32_at(off::VERSION).load(Ordering::Relaxed);
        if version != VERSION {
            return Err(RingError::Version(version));
        }
        let geometry = |why: String| Err(RingError::Geometry(why));
        let header = probe.u32_at(off::HEADER_SIZE).load(Ordering::Relaxed) as usize;
        let slot_size = probe.u32_at(off::SLOT_SIZE).load(Ordering::Relaxed) as usize;
        let entry_size = probe.u32_at(off::STATUS_ENTRY_SIZE).load(Ordering::Relaxed) as usize;
        if (header, slot_size, entry_size) != (HEADER_SIZE, SLOT_SIZE, STATUS_ENTRY_SIZE) {
            return geometry(format!("sizes {header}/{slot_size}/{entry_size}"));
        }
        let slots = probe.u32_at(off::SLOT_COUNT).load(Ordering::Relaxed);
        let entries = probe.u32_at(off::STATUS_ENTRIES).load(Ordering::Relaxed);
        check_geometry(slots, entries)?;
        let need = file_size(slots, entries);
        let declared = probe.u64_at(off::TOTAL_SIZE).load(Ordering::Relaxed);
        if declared != need as u64 || len < need {
            return geometry(format!(
                "file is {len} bytes, header says {declared}, geometry needs {need}"
            ));
        }
        Ok(Ring {
            base,
            slots: u64::from(slots),
            status_entries: entries as usize,
            _mapping: std::marker::PhantomData,
        })
    }

    /// A view of only the header of a ring whose magic is ours but whose version or
    /// geometry is not: enough to read its counters and pid and to [`Ring::retire`] it, so
    /// its producers move to the replacement. It has no slots and no status entries.
    ///
    /// # Safety
    /// As for [`Ring::open`], with `len >= HEADER_SIZE`. Only header methods (`stats`,
    /// `retire`, `generation`) may be called on the view.
    pub unsafe fn header_only(base: *mut u8, len: usize) -> Ring<'a> {
        debug_assert!(len >= HEADER_SIZE);
        Ring {
            base,
            slots: 0,
            status_entries: 0,
            _mapping: std::marker::PhantomData,
        }
    }

    /// Writes a fresh ring into zeroed memory; the magic goes last, so no producer can see a
    /// half-initialised ring.
    ///
    /// # Safety
    /// As for [`Ring::open`]; `len` must be at least `file_size(slots, status_entries)`, and no
    /// other process may use the memory until this returns.
    pub unsafe fn init(
        base: *mut u8,
        len: usize,
        slots: u32,
        status_entries: u32,
        generation: u64,
    ) -> Result<Ring<'a>, RingError> {
        check_geometry(slots, status_entries)?;
        let need = file_size(slots, status_entries);
        if len < need {
            return Err(RingError::TooSmall(len));
        }
        let ring = Ring {
            base,
            slots: u64::from(slots),
            status_entries: status_entries as usize,
            _mapping: std::marker::PhantomData,
        };
        ring.u64_at(off::MAGIC).store(0, Ordering::Relaxed);
        ring.u32_at(off::VERSION).store(VERSION, Ordering::Relaxed);
        ring.u32_at(off::HEADER_SIZE)
            .store(HEADER_SIZE as u32, Ordering::Relaxed);
        ring.u32_at(off::SLOT_COUNT).store(slots, Ordering::Relaxed);
        ring.u32_at(off::SLOT_SIZE)
            .store(SLOT_SIZE as u32, Ordering::Relaxed);
        ring.u32_at(off::STATUS_ENTRIES)
            .store(status_entries, Ordering::Relaxed);
        ring.u32_at(off::STATUS_ENTRY_SIZE)
            .store(STATUS_ENTRY_SIZE as u32, Ordering::Relaxed);
        ring.u64_at(off::TOTAL_SIZE)
            .store(need as u64, Ordering::Relaxed);
        ring.u64_at(off::GENERATION)
            .store(generation, Ordering::Relaxed);
        for field in [
            off::HEAD,
            off::DROPPED,
            off::TAIL,
            off::SKIPPED,
            off::INVALID,
            off::HEARTBEAT_NS,
        ] {
            ring.u64_at(field).store(0, Ordering::Relaxed);
        }
        for field in [off::AGENT_PID, off::SLEEPING, off::WAKE, off::RETIRED] {
            ring.u32_at(field).store(0, Ordering::Relaxed);
        }
        for ticket in 0..u64::from(slots) {
            ring.seq(ticket).store(ticket, Ordering::Relaxed);
        }
        ring.u64_at(off::MAGIC).store(MAGIC, Ordering::Release);
        Ok(ring)
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 8 == 0);
        // SAFETY: every offset used is inside the validated mapping and 8-aligned (the base is
        // page-aligned); any bit pattern is a valid `AtomicU64`.
        unsafe { &*(self.base.add(offset) as *const AtomicU64) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset % 4 == 0);
        // SAFETY: as for `u64_at`, with 4-byte alignment.
        unsafe { &*(self.base.add(offset) as *const AtomicU32) }
    }

    fn slot_offset(&self, ticket: u64) -> usize {
        HEADER_SIZE + (ticket & (self.slots - 1)) as usize * SLOT_SIZE
    }

    fn seq(&self, ticket: u64) -> &AtomicU64 {
        self.u64_at(self.slot_offset(ticket))
    }

    fn word(&self, ticket: u64, i: usize) -> &AtomicU64 {
        self.u64_at(self.slot_offset(ticket) + 8 + 8 * i)
    }

    fn status_offset(&self, index: usize) -> usize {
        HEADER_SIZE + self.slots as usize * SLOT_SIZE + index * STATUS_ENTRY_SIZE
    }

    /// This ring's identity: the agent's creation time. A producer re-registers its paths
    /// when it changes.
    pub fn generation(&self) -> u64 {
        self.u64_at(off::GENERATION).load(Ordering::Relaxed)
    }

    pub fn capacity(&self) -> u64 {
        self.slots
    }

    pub fn status_capacity(&self) -> usize {
        self.status_entries
    }

    pub fn stats(&self) -> Stats {
        Stats {
            capacity: self.slots,
            head: self.u64_at(off::HEAD).load(Ordering::Relaxed),
            tail: self.u64_at(off::TAIL).load(Ordering::Relaxed),
            dropped: self.u64_at(off::DROPPED).load(Ordering::Relaxed),
            skipped: self.u64_at(off::SKIPPED).load(Ordering::Relaxed),
            invalid: self.u64_at(off::INVALID).load(Ordering::Relaxed),
            agent_pid: self.u32_at(off::AGENT_PID).load(Ordering::Relaxed),
            heartbeat_ns: self.u64_at(off::HEARTBEAT_NS).load(Ordering::Relaxed),
            generation: self.generation(),
        }
    }

    /// Whether the agent replaced this ring with a new file.
    pub fn retired(&self) -> bool {
        self.u32_at(off::RETIRED).load(Ordering::Relaxed) != 0
    }

    /// Whether the agent's heartbeat is younger than `max_age_ns` at `now_ns`.
    pub fn agent_alive(&self, now_ns: u64, max_age_ns: u64) -> bool {
        let beat = self.u64_at(off::HEARTBEAT_NS).load(Ordering::Relaxed);
        beat != 0 && now_ns.saturating_sub(beat) < max_age_ns
    }
}

/// CLOCK_REALTIME in nanoseconds (served by the vDSO: no system call). Read directly rather
/// than through `SystemTime`, whose `duration_since` and 128-bit `as_nanos` cost more than the
/// clock on the commit path. Not the coarse clock: `multidb_wait` compares commit times with
/// the agent's sync start, and a commit stamped up to a tick early could pass for replicated.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_REALTIME always exists.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } != 0 {
        return 0;
    }
    // Before 1970 reads as 0, as `SystemTime::duration_since(UNIX_EPOCH)` failing did.
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u64>);

    impl Mem {
        fn ring(slots: u32, entries: u32) -> (Mem, Ring<'static>) {
            let len = file_size(slots, entries);
            let mut mem = Mem(vec![0u64; len / 8]);
            // SAFETY: the Vec outlives the view in each test and is 8-aligned.
            let ring =
                unsafe { Ring::init(mem.0.as_mut_ptr().cast(), len, slots, entries, 7) }.unwrap();
            (mem, ring)
        }
    }

    fn commit(i: u64) -> Commit {
        Commit {
            dev: 1,
            ino: i,
            path_hash: 3,
            frames: i * 2,
            pid: 42,
            time_ns: 99,
        }
    }

    #[test]
    fn push_pop_in_order_and_full_ring_counts_drops() {
        let (_mem, ring) = Mem::ring(4, 8);
        let mut c = Consumer::default();
        assert_eq!(ring.pop(&mut c, 0), Pop::Empty);
        for i in 0..6 {
            ring.push_commit(&commit(i));
        }
        assert_eq!(ring.stats().dropped, 2);
        for i in 0..4 {
            assert_eq!(ring.pop(&mut c, 0), Pop::Record(Record::Commit(commit(i))));
        }
        assert_eq!(ring.pop(&mut c, 0), Pop::Empty);
        assert!(ring.push_commit(&commit(9)));
        assert_eq!(ring.pop(&mut c, 0), Pop::Record(Record::Commit(commit(9))));
    }

    #[test]
    fn registration_spans_slots_and_round_trips() {
        let (_mem, ring) = Mem::ring(16, 8);
        let path =
            b"/data/project1/databases/userdb/branches/main/tenants/acme.db-and-a-long-suffix"
                .to_vec();
        assert!(ring.push_registration(5, 6, 7, &path));
        let mut c = Consumer::default();
        match ring.pop(&mut c, 0) {
            Pop::Record(Record::Register {
                dev,
                ino,
                pid,
                path: p,
                ..
            }) => {
                assert_eq!((dev, ino, pid), (5, 6, 7));
                assert_eq!(p, path);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ring.pop(&mut c, 0), Pop::Empty);
        assert!(
            !ring.push_registration(5, 6, 7, &vec![b'a'; 2000]),
            "longer than the ring"
        );
    }

    #[test]
    fn abandoned_slot_is_skipped_after_the_bound() {
        let (_mem, ring) = Mem::ring(8, 8);
        let t = ring.claim(1).unwrap(); // a producer that dies before publishing
        assert_eq!(t, 0);
        ring.push_commit(&commit(1));
        let mut c = Consumer::default();
        assert_eq!(ring.pop(&mut c, 1_000), Pop::Pending);
        assert_eq!(ring.pop(&mut c, 1_000 + STUCK_SLOT_NS / 2), Pop::Pending);
        assert_eq!(ring.pop(&mut c, 1_000 + STUCK_SLOT_NS + 1), Pop::Skipped);
        assert_eq!(ring.pop(&mut c, 0), Pop::Record(Record::Commit(commit(1))));
        assert_eq!(ring.stats().skipped, 1);
        assert!(
            !ring.publish(t),
            "a late publish of an abandoned ticket fails"
        );
    }

    #[test]
    fn garbage_slots_are_counted_not_returned() {
        let (_mem, ring) = Mem::ring(8, 8);
        ring.push_commit(&commit(1));
        ring.word(0, 2).store(12345, Ordering::Relaxed); // corrupt the record
        ring.push_commit(&commit(2));
        let mut c = Consumer::default();
        assert_eq!(ring.pop(&mut c, 0), Pop::Skipped);
        assert_eq!(ring.pop(&mut c, 0), Pop::Record(Record::Commit(commit(2))));
        assert_eq!(ring.stats().invalid, 1);
    }

    #[test]
    fn open_rejects_bad_headers() {
        let (mut mem, _ring) = Mem::ring(8, 8);
        let len = mem.0.len() * 8;
        let base: *mut u8 = mem.0.as_mut_ptr().cast();
        // SAFETY: `mem` is alive and 8-aligned for every call below.
        unsafe {
            assert!(Ring::open(base, len).is_ok());
            assert_eq!(Ring::open(base, 100).unwrap_err(), RingError::TooSmall(100));
            assert!(matches!(
                Ring::open(base, len - 1),
                Err(RingError::Geometry(_))
            ));
            mem.0[1] = 99; // version
            assert!(matches!(
                Ring::open(mem.0.as_mut_ptr().cast(), len),
                Err(RingError::Version(_))
            ));
            mem.0[0] = 0;
            assert_eq!(
                Ring::open(mem.0.as_mut_ptr().cast(), len).unwrap_err(),
                RingError::BadMagic
            );
        }
    }

    /// Found by the `ring_records` fuzz target: a header whose `tail` is u64::MAX (the
    /// minimised input) made the consumer's ticket arithmetic overflow, a panic in the agent;
    /// `head` there did the same to producers. Tickets wrap, records crossing the wrap included.
    #[test]
    fn regression_10_fuzz_tickets_wrap_at_the_end_of_their_space() {
        let (_mem, ring) = Mem::ring(8, 8);
        ring.u64_at(off::TAIL).store(u64::MAX, Ordering::Relaxed);
        let mut c = Consumer::default();
        assert_eq!(ring.pop(&mut c, 0), Pop::Skipped);
        assert_eq!(ring.stats().tail, 0);

        let (_mem, ring) = Mem::ring(8, 8);
        let start = u64::MAX - 1;
        for i in 0..8 {
            let t = start.wrapping_add(i);
            ring.seq(t).store(t, Ordering::Relaxed);
        }
        ring.u64_at(off::HEAD).store(start, Ordering::Relaxed);
        ring.u64_at(off::TAIL).store(start, Ordering::Relaxed);
        let path = vec![b'p'; 100]; // three slots: tickets u64::MAX - 1, u64::MAX, 0
        assert!(ring.push_registration(5, 6, 7, &path));
        assert!(ring.push_commit(&commit(1)));
        match ring.pop(&mut c, 0) {
            Pop::Record(Record::Register { path: p, .. }) => assert_eq!(p, path),
            other => panic!("{other:?}"),
        }
        assert_eq!(ring.pop(&mut c, 0), Pop::Record(Record::Commit(commit(1))));
        assert_eq!(ring.pop(&mut c, 0), Pop::Empty);
        assert_eq!(ring.stats().invalid, 0);
    }

    #[test]
    fn status_table_publish_lookup_remove() {
        let (_mem, ring) = Mem::ring(8, 4);
        let s = |ino| Status {
            dev: 1,
            ino,
            tier: Tier::Hot,
            replicated_txid: ino * 10,
            ..Status::default()
        };
        for ino in 1..=4 {
            assert!(ring.publish_status(&s(ino)));
        }
        assert!(!ring.publish_status(&s(5)), "table full");
        assert_eq!(ring.status(1, 3).unwrap().replicated_txid, 30);
        ring.remove_status(1, 3);
        assert_eq!(ring.status(1, 3), None);
        assert!(ring.publish_status(&s(5)), "tombstone reused");
        assert_eq!(ring.status(1, 5).unwrap().replicated_txid, 50);
        assert_eq!(ring.status(1, 4).unwrap().replicated_txid, 40);
    }

    #[test]
    fn threads_lose_nothing_they_did_not_count() {
        let (_mem, ring) = Mem::ring(64, 8);
        let producers = 4;
        let per = 20_000u64;
        let received = std::thread::scope(|s| {
            for p in 0..producers {
                s.spawn(move || {
                    for i in 0..per {
                        ring.push_commit(&Commit {
                            dev: p,
                            ino: i,
                            ..commit(0)
                        });
                    }
                });
            }
            let consumer = s.spawn(move || {
                let mut c = Consumer::default();
                let mut seen = vec![0u64; producers as usize];
                let mut n = 0u64;
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while std::time::Instant::now() < deadline {
                    match ring.pop(&mut c, now_ns()) {
                        Pop::Record(Record::Commit(x)) => {
                            assert!(x.ino >= seen[x.dev as usize], "per-producer order kept");
                            seen[x.dev as usize] = x.ino;
                            n += 1;
                        }
                        Pop::Empty => {
                            if n + ring.stats().dropped == producers * per {
                                break;
                            }
                            std::thread::yield_now();
                        }
                        Pop::Pending => std::hint::spin_loop(),
                        other => panic!("{other:?}"),
                    }
                }
                n
            });
            consumer.join().unwrap()
        });
        assert_eq!(received + ring.stats().dropped, producers * per);
        assert_eq!(ring.stats().invalid + ring.stats().skipped, 0);
    }
}
