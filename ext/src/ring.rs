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

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// `MDBRING1` read as a little-endian integer.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MDBRING1");
/// Bumped on any incompatible layout change; a ring of another version is not used.
/// 2: the status table's hash changed (entries of version 1 would be looked up elsewhere).
/// 3: status entries carry a refusal reason and the tier [`TIER_REFUSED`] (a version-2 reader
/// would take a refused database for a cold, replicated one).
pub const VERSION: u32 = 3;
/// Bytes before the first slot: one page, so slots start page-aligned.
pub const HEADER_SIZE: usize = 4096;
/// One cache line per slot: a producer and the consumer never share a line mid-record.
pub const SLOT_SIZE: usize = 64;
/// Bytes per status entry.
pub const STATUS_ENTRY_SIZE: usize = 64;
/// 65,536 slots (4 MiB): a second of 10,000 commits/s with six-fold headroom before drops.
pub const DEFAULT_SLOTS: u32 = 65_536;
/// Status entries: twice the default `max_active`, so probes stay short.
pub const DEFAULT_STATUS_ENTRIES: u32 = 4096;
/// Where the ring lives unless `MULTIDB_RING` says otherwise.
pub const DEFAULT_PATH: &str = "/dev/shm/multidb.ring";
/// Environment variable naming the ring file.
pub const ENV_PATH: &str = "MULTIDB_RING";
/// A heartbeat older than this means the agent is gone (it beats every 250 ms).
pub const AGENT_ALIVE_NS: u64 = 3_000_000_000;

/// The ring file: `$MULTIDB_RING`, or [`DEFAULT_PATH`] when it is unset or empty.
pub fn path_from_env() -> std::path::PathBuf {
    std::env::var_os(ENV_PATH)
        .filter(|p| !p.is_empty())
        .map_or_else(|| DEFAULT_PATH.into(), Into::into)
}
/// Limits on geometry accepted from a file, so a garbage header cannot make us map gigabytes.
pub const MAX_SLOTS: u32 = 1 << 24;
pub const MAX_STATUS_ENTRIES: u32 = 1 << 20;
/// Claim attempts a producer makes against other producers before it drops the record.
const MAX_CLAIM_ATTEMPTS: u32 = 64;
/// Longest path a registration record carries (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Payload bytes of a continuation slot.
const CONT_BYTES: usize = SLOT_SIZE - 8;
/// Linear probe bound in the status table.
const MAX_PROBE: usize = 32;

/// Record kinds.
pub const KIND_COMMIT: u8 = 1;
pub const KIND_REGISTER: u8 = 2;

/// Status tiers as stored.
pub const TIER_EMPTY: u32 = 0;
pub const TIER_COLD: u32 = 1;
pub const TIER_HOT: u32 = 2;
pub const TIER_TOMBSTONE: u32 = 3;
/// The agent knows the database and does not replicate it; `Status::reason` says why.
pub const TIER_REFUSED: u32 = 4;

/// Why a database is not replicated, as stored in a [`TIER_REFUSED`] entry. The codes are
/// part of the layout: add new ones, never renumber.
pub mod reason {
    pub const NONE: u32 = 0;
    /// Not in WAL mode (rollback journal, MEMORY, OFF), or an empty file.
    pub const NOT_WAL: u32 = 1;
    /// Another discovered database expands to the same replica location.
    pub const COLLISION: u32 = 2;
    /// The path does not match the discovery pattern.
    pub const OUTSIDE_PATTERN: u32 = 3;
    /// The expanded replica location is invalid (escapes the root, bad component).
    pub const BAD_LOCATION: u32 = 4;
    /// The replica location holds another database's history.
    pub const IDENTITY: u32 = 5;

    /// A sentence for `multidb_status()` and the agent's reports.
    pub fn text(code: u32) -> &'static str {
        match code {
            NOT_WAL => "not in WAL mode (or empty): only WAL databases are replicated",
            COLLISION => "shares its replica location with another database; both are refused",
            OUTSIDE_PATTERN => "does not match the discovery pattern",
            BAD_LOCATION => "its replica location is invalid (see `multidb databases`)",
            IDENTITY => "its replica location holds another database's history (replica holds another database)",
            _ => "not replicated",
        }
    }
}

/// Header field offsets (bytes). Each shared counter sits where producers and the consumer
/// do not false-share more than they must.
mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_SIZE: usize = 12;
    pub const SLOT_COUNT: usize = 16;
    pub const SLOT_SIZE: usize = 20;
    pub const STATUS_ENTRIES: usize = 24;
    pub const STATUS_ENTRY_SIZE: usize = 28;
    pub const TOTAL_SIZE: usize = 32;
    pub const GENERATION: usize = 40;
    pub const HEAD: usize = 64;
    pub const DROPPED: usize = 72;
    pub const TAIL: usize = 128;
    pub const SKIPPED: usize = 136;
    pub const INVALID: usize = 144;
    pub const HEARTBEAT_NS: usize = 152;
    pub const AGENT_PID: usize = 160;
    pub const SLEEPING: usize = 164;
    pub const WAKE: usize = 168;
    pub const RETIRED: usize = 172;
}

/// Why a ring file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    TooSmall(usize),
    BadMagic,
    Version(u32),
    Geometry(String),
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingError::TooSmall(n) => write!(f, "ring file is {n} bytes, smaller than its header"),
            RingError::BadMagic => {
                write!(f, "not a multidb ring (bad magic) or not initialised yet")
            }
            RingError::Version(v) => {
                write!(f, "ring version {v}, this build speaks version {VERSION}")
            }
            RingError::Geometry(why) => write!(f, "ring geometry is invalid: {why}"),
        }
    }
}

impl std::error::Error for RingError {}

/// Slot and status-entry counts a ring may have.
fn check_geometry(slots: u32, status_entries: u32) -> Result<(), RingError> {
    if !slots.is_power_of_two() || !(2..=MAX_SLOTS).contains(&slots) {
        return Err(RingError::Geometry(format!(
            "{slots} slots: need a power of two from 2 to {MAX_SLOTS}"
        )));
    }
    if !(1..=MAX_STATUS_ENTRIES).contains(&status_entries) {
        return Err(RingError::Geometry(format!(
            "{status_entries} status entries: need 1 to {MAX_STATUS_ENTRIES}"
        )));
    }
    Ok(())
}

/// The total file size of a ring with this geometry.
pub fn file_size(slots: u32, status_entries: u32) -> usize {
    HEADER_SIZE + slots as usize * SLOT_SIZE + status_entries as usize * STATUS_ENTRY_SIZE
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Commit(Commit),
    /// The full path of a database the producer's process writes, sent once per process.
    Register {
        dev: u64,
        ino: u64,
        path_hash: u64,
        pid: u32,
        path: Vec<u8>,
    },
}

/// A commit signal: which database, how far its WAL is, who and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Commit {
    pub dev: u64,
    pub ino: u64,
    pub path_hash: u64,
    /// The WAL's frame count after the commit (`mxFrame`).
    pub frames: u64,
    pub pid: u32,
    /// CLOCK_REALTIME, nanoseconds.
    pub time_ns: u64,
}

/// A database's replication state as the agent publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    pub dev: u64,
    pub ino: u64,
    pub tier: u32,
    /// The last TXID in the replica.
    pub replicated_txid: u64,
    /// The WAL frame count the replica covers.
    pub replicated_frames: u64,
    /// When the last successful sync started reading the WAL (CLOCK_REALTIME ns): every
    /// commit made before this instant is in the replica (`multidb_wait` relies on it).
    pub last_sync_ns: u64,
    /// When the oldest commit not yet in the replica was seen; 0 when caught up.
    pub pending_since_ns: u64,
    /// With [`TIER_REFUSED`]: one of the [`reason`] codes.
    pub reason: u32,
}

/// What [`Ring::pop`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pop {
    Record(Record),
    /// Nothing published at the tail.
    Empty,
    /// A producer claimed the tail slot and has not published it yet.
    Pending,
    /// A slot failed validation or was abandoned; it was counted and skipped.
    Skipped,
}

/// Counters and liveness, for `multidb ring stat` and `multidb_status()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub capacity: u64,
    pub head: u64,
    pub tail: u64,
    pub dropped: u64,
    pub skipped: u64,
    pub invalid: u64,
    pub agent_pid: u32,
    pub heartbeat_ns: u64,
    pub generation: u64,
}

impl Stats {
    /// Slots holding records not yet read.
    pub fn fill(&self) -> u64 {
        self.head.saturating_sub(self.tail).min(self.capacity)
    }
}

/// Consumer-side state that need not live in the shared file.
#[derive(Debug, Default)]
pub struct Consumer {
    stuck_since_ns: Option<u64>,
    in_stuck_run: bool,
}

/// How long the consumer waits for a claimed slot before it decides its producer died:
/// far longer than any write takes, short enough that a killed writer stalls signals briefly.
pub const STUCK_SLOT_NS: u64 = 500_000_000;
/// Once one slot was abandoned, neighbours claimed by the same dead producer (a registration
/// spans several) are given only this long.
pub const STUCK_RUN_NS: u64 = 5_000_000;

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
fn check_word(ticket: u64, words: &[u64; 6]) -> u64 {
    words.iter().fold(mix(ticket, MAGIC), |acc, &w| mix(acc, w))
}

/// FNV-1a over a path: the `path_hash` in every record, cheap enough for each commit.
pub fn path_hash(path: &[u8]) -> u64 {
    path.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A validated view of a mapped ring. It borrows memory it does not own: whoever maps the
/// file keeps the mapping alive at least as long as the view.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    base: *mut u8,
    slots: u64,
    status_entries: usize,
}

// SAFETY: all access through `Ring` goes through atomics on memory that is valid for the
// lifetime the creator guarantees; the pointer itself is just an address.
unsafe impl Send for Ring {}
// SAFETY: as above; shared access is what the atomics are for.
unsafe impl Sync for Ring {}

impl Ring {
    /// Validates the header of a mapped ring of `len` bytes at `base`.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes, aligned to 8, for as long as
    /// the returned view (or any copy) is used.
    pub unsafe fn open(base: *mut u8, len: usize) -> Result<Ring, RingError> {
        if len < HEADER_SIZE {
            return Err(RingError::TooSmall(len));
        }
        let probe = Ring {
            base,
            slots: 0,
            status_entries: 0,
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
        })
    }

    /// A view of only the header of a ring whose magic is ours but whose version or
    /// geometry is not: enough to read its counters and pid and to [`Ring::retire`] it, so
    /// its producers move to the replacement. It has no slots and no status entries.
    ///
    /// # Safety
    /// As for [`Ring::open`], with `len >= HEADER_SIZE`. Only header methods (`stats`,
    /// `retire`, `generation`) may be called on the view.
    pub unsafe fn header_only(base: *mut u8, len: usize) -> Ring {
        debug_assert!(len >= HEADER_SIZE);
        Ring {
            base,
            slots: 0,
            status_entries: 0,
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
    ) -> Result<Ring, RingError> {
        check_geometry(slots, status_entries)?;
        let need = file_size(slots, status_entries);
        if len < need {
            return Err(RingError::TooSmall(len));
        }
        let ring = Ring {
            base,
            slots: u64::from(slots),
            status_entries: status_entries as usize,
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

    // ---- producer side -------------------------------------------------------------------

    /// Claims `k` consecutive tickets, or `None` when the ring is full or contention persists.
    fn claim(&self, k: u64) -> Option<u64> {
        if k == 0 || k > self.slots {
            return None;
        }
        let head = self.u64_at(off::HEAD);
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let pos = head.load(Ordering::Relaxed);
            let mut stale = false;
            for i in 0..k {
                let seq = self.seq(pos + i).load(Ordering::Acquire);
                if seq != pos + i {
                    if seq < pos + i {
                        return None; // the consumer has not freed this slot: full
                    }
                    stale = true; // another producer moved on; reload head
                    break;
                }
            }
            if !stale
                && head
                    .compare_exchange_weak(pos, pos + k, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(pos);
            }
            std::hint::spin_loop();
        }
        None
    }

    /// Publishes ticket `t`; fails if the consumer abandoned it meanwhile.
    fn publish(&self, t: u64) -> bool {
        self.seq(t)
            .compare_exchange(t, t + 1, Ordering::Release, Ordering::Relaxed)
            .is_ok()
    }

    fn count_drop(&self) {
        self.u64_at(off::DROPPED).fetch_add(1, Ordering::Relaxed);
    }

    /// Posts a commit record. Never blocks, allocates or makes a system call, except one
    /// futex wake when the consumer is asleep. A record that cannot be posted is counted in
    /// `dropped`. Returns whether it was posted.
    pub fn push_commit(&self, c: &Commit) -> bool {
        let Some(t) = self.claim(1) else {
            self.count_drop();
            return false;
        };
        let words = [
            u64::from(KIND_COMMIT) | 1 << 8 | u64::from(c.pid) << 32,
            c.dev,
            c.ino,
            c.path_hash,
            c.frames,
            c.time_ns,
        ];
        self.write_first(t, &words);
        if !self.publish(t) {
            self.count_drop();
            return false;
        }
        self.wake_consumer();
        true
    }

    fn write_first(&self, t: u64, words: &[u64; 6]) {
        for (i, w) in words.iter().enumerate() {
            self.word(t, i).store(*w, Ordering::Relaxed);
        }
        self.word(t, 6)
            .store(check_word(t, words), Ordering::Relaxed);
    }

    /// Posts a registration: the record's first slot names the database, the following slots
    /// carry its path. Returns whether it was posted; a lost registration is recovered by
    /// the agent's next scan, so it is not counted as a dropped commit.
    pub fn push_registration(&self, dev: u64, ino: u64, pid: u32, path: &[u8]) -> bool {
        if path.is_empty() || path.len() > MAX_PATH {
            return false;
        }
        let cont = path.len().div_ceil(CONT_BYTES) as u64;
        let Some(t) = self.claim(1 + cont) else {
            return false;
        };
        for (i, chunk) in path.chunks(CONT_BYTES).enumerate() {
            let ticket = t + 1 + i as u64;
            let mut buf = [0u8; CONT_BYTES];
            buf[..chunk.len()].copy_from_slice(chunk);
            for (j, word) in buf.chunks_exact(8).enumerate() {
                let bytes: [u8; 8] = word.try_into().unwrap_or([0; 8]);
                self.word(ticket, j)
                    .store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
            }
        }
        let words = [
            u64::from(KIND_REGISTER) | (1 + cont) << 8 | u64::from(pid) << 32,
            dev,
            ino,
            path_hash(path),
            path.len() as u64,
            0,
        ];
        self.write_first(t, &words);
        // Continuations first, the first slot last: a consumer that sees the first slot
        // published sees the whole record.
        let mut ok = true;
        for i in 1..=cont {
            ok &= self.publish(t + i);
        }
        ok &= self.publish(t);
        if ok {
            self.wake_consumer();
        }
        ok
    }

    /// Wakes the consumer only if it said it is going to sleep: steady traffic makes no
    /// system calls.
    fn wake_consumer(&self) {
        let sleeping = self.u32_at(off::SLEEPING);
        if sleeping.load(Ordering::SeqCst) != 0 && sleeping.swap(0, Ordering::SeqCst) != 0 {
            let wake = self.u32_at(off::WAKE);
            wake.fetch_add(1, Ordering::SeqCst);
            futex_wake(wake);
        }
    }

    /// The agent's published state for (dev, ino), read under the entry's sequence lock.
    pub fn status(&self, dev: u64, ino: u64) -> Option<Status> {
        let start = (mix(dev, ino) as usize) % self.status_entries;
        for probe in 0..MAX_PROBE.min(self.status_entries) {
            let index = (start + probe) % self.status_entries;
            let base = self.status_offset(index);
            for _attempt in 0..4 {
                let seq = self.u32_at(base).load(Ordering::Acquire);
                if seq % 2 == 1 {
                    std::hint::spin_loop();
                    continue;
                }
                let entry = self.read_status(base);
                fence(Ordering::Acquire);
                if self.u32_at(base).load(Ordering::Relaxed) != seq {
                    continue;
                }
                if entry.tier == TIER_EMPTY {
                    return None;
                }
                if entry.tier != TIER_TOMBSTONE && entry.dev == dev && entry.ino == ino {
                    return Some(entry);
                }
                break;
            }
        }
        None
    }

    fn read_status(&self, base: usize) -> Status {
        let w = |i: usize| self.u64_at(base + 8 + 8 * i).load(Ordering::Relaxed);
        Status {
            tier: self.u32_at(base + 4).load(Ordering::Relaxed),
            dev: w(0),
            ino: w(1),
            replicated_txid: w(2),
            replicated_frames: w(3),
            last_sync_ns: w(4),
            pending_since_ns: w(5),
            reason: self.u32_at(base + 56).load(Ordering::Relaxed),
        }
    }

    /// Whether the agent's heartbeat is younger than `max_age_ns` at `now_ns`.
    pub fn agent_alive(&self, now_ns: u64, max_age_ns: u64) -> bool {
        let beat = self.u64_at(off::HEARTBEAT_NS).load(Ordering::Relaxed);
        beat != 0 && now_ns.saturating_sub(beat) < max_age_ns
    }

    // ---- consumer side (the agent) -------------------------------------------------------

    /// Records the agent's pid and a heartbeat.
    pub fn heartbeat(&self, pid: u32, now_ns: u64) {
        self.u32_at(off::AGENT_PID).store(pid, Ordering::Relaxed);
        self.u64_at(off::HEARTBEAT_NS)
            .store(now_ns, Ordering::Relaxed);
    }

    /// Starts a new agent run on this ring: every status entry of the previous run is
    /// removed (so no application is told about positions this run did not establish), the
    /// generation changes (so producers register their paths again) and the pid is set.
    /// Called before the run's first heartbeat, by the ring's one consumer.
    pub fn start_run(&self, pid: u32, generation: u64) {
        for index in 0..self.status_entries {
            let entry = self.read_status(self.status_offset(index));
            if entry.tier != TIER_EMPTY {
                self.write_status(index, &Status::default());
            }
        }
        self.u64_at(off::GENERATION)
            .store(generation, Ordering::Relaxed);
        self.u32_at(off::AGENT_PID).store(pid, Ordering::Relaxed);
    }

    /// Marks the ring as replaced, so producers map the new file.
    pub fn retire(&self) {
        self.u32_at(off::RETIRED).store(1, Ordering::Relaxed);
    }

    /// Takes the record at the tail, if any. Single consumer only.
    pub fn pop(&self, consumer: &mut Consumer, now_ns: u64) -> Pop {
        let tail_field = self.u64_at(off::TAIL);
        let t = tail_field.load(Ordering::Relaxed);
        let seq = self.seq(t).load(Ordering::Acquire);
        if seq == t + 1 {
            consumer.stuck_since_ns = None;
            consumer.in_stuck_run = false;
            return self.take(t);
        }
        if seq == t {
            let head = self.u64_at(off::HEAD).load(Ordering::Acquire);
            if head <= t {
                consumer.stuck_since_ns = None;
                consumer.in_stuck_run = false;
                return Pop::Empty;
            }
            let since = *consumer.stuck_since_ns.get_or_insert(now_ns);
            let bound = if consumer.in_stuck_run {
                STUCK_RUN_NS
            } else {
                STUCK_SLOT_NS
            };
            if now_ns.saturating_sub(since) < bound {
                return Pop::Pending;
            }
            // The producer died between claim and publish: free the slot for the next lap.
            if self
                .seq(t)
                .compare_exchange(t, t + self.slots, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                return Pop::Pending; // published just now; read it next time
            }
            tail_field.store(t + 1, Ordering::Release);
            self.u64_at(off::SKIPPED).fetch_add(1, Ordering::Relaxed);
            consumer.stuck_since_ns = None;
            consumer.in_stuck_run = true;
            return Pop::Skipped;
        }
        // Neither free nor published: the slot holds garbage. Count, reset and move on.
        self.seq(t).store(t + self.slots, Ordering::Release);
        tail_field.store(t + 1, Ordering::Release);
        self.u64_at(off::INVALID).fetch_add(1, Ordering::Relaxed);
        Pop::Skipped
    }

    fn take(&self, t: u64) -> Pop {
        let words: [u64; 6] = std::array::from_fn(|i| self.word(t, i).load(Ordering::Relaxed));
        let check = self.word(t, 6).load(Ordering::Relaxed);
        let kind = (words[0] & 0xff) as u8;
        let nslots = (words[0] >> 8) & 0xff;
        let pid = (words[0] >> 32) as u32;
        let valid_shape = match kind {
            KIND_COMMIT => nslots == 1,
            KIND_REGISTER => {
                let len = words[4] as usize;
                len > 0 && len <= MAX_PATH && nslots == 1 + len.div_ceil(CONT_BYTES) as u64
            }
            _ => false,
        };
        let tail_field = self.u64_at(off::TAIL);
        if check != check_word(t, &words) || !valid_shape {
            self.release(t, 1);
            tail_field.store(t + 1, Ordering::Release);
            self.u64_at(off::INVALID).fetch_add(1, Ordering::Relaxed);
            return Pop::Skipped;
        }
        let record = if kind == KIND_COMMIT {
            Record::Commit(Commit {
                dev: words[1],
                ino: words[2],
                path_hash: words[3],
                frames: words[4],
                pid,
                time_ns: words[5],
            })
        } else {
            let cont = nslots - 1;
            let all_published =
                (1..=cont).all(|i| self.seq(t + i).load(Ordering::Acquire) == t + i + 1);
            let mut path = Vec::with_capacity(words[4] as usize);
            if all_published {
                for i in 1..=cont {
                    for j in 0..CONT_BYTES / 8 {
                        path.extend_from_slice(
                            &self.word(t + i, j).load(Ordering::Relaxed).to_ne_bytes(),
                        );
                    }
                }
                path.truncate(words[4] as usize);
            }
            if !all_published || path_hash(&path) != words[3] {
                self.release(t, 1);
                tail_field.store(t + 1, Ordering::Release);
                self.u64_at(off::INVALID).fetch_add(1, Ordering::Relaxed);
                return Pop::Skipped;
            }
            Record::Register {
                dev: words[1],
                ino: words[2],
                path_hash: words[3],
                pid,
                path,
            }
        };
        self.release(t, nslots);
        tail_field.store(t + nslots, Ordering::Release);
        Pop::Record(record)
    }

    fn release(&self, t: u64, n: u64) {
        for i in 0..n {
            self.seq(t + i).store(t + i + self.slots, Ordering::Release);
        }
    }

    /// Sleeps until a producer posts or `timeout` passes. Producers wake the consumer only
    /// when it set `sleeping`, so the flag is set first and the tail re-checked before waiting.
    pub fn wait(&self, timeout: std::time::Duration) {
        let sleeping = self.u32_at(off::SLEEPING);
        let wake = self.u32_at(off::WAKE);
        let observed = wake.load(Ordering::SeqCst);
        sleeping.store(1, Ordering::SeqCst);
        let t = self.u64_at(off::TAIL).load(Ordering::Relaxed);
        if self.seq(t).load(Ordering::SeqCst) == t + 1 {
            sleeping.store(0, Ordering::SeqCst);
            return;
        }
        futex_wait(wake, observed, timeout);
        sleeping.store(0, Ordering::SeqCst);
    }

    /// Publishes (or updates) the status of (dev, ino). Single writer only: the agent.
    /// Returns false if the probe window is full.
    pub fn publish_status(&self, status: &Status) -> bool {
        let start = (mix(status.dev, status.ino) as usize) % self.status_entries;
        let mut free = None;
        for probe in 0..MAX_PROBE.min(self.status_entries) {
            let index = (start + probe) % self.status_entries;
            let entry = self.read_status(self.status_offset(index));
            if entry.tier != TIER_EMPTY
                && entry.tier != TIER_TOMBSTONE
                && entry.dev == status.dev
                && entry.ino == status.ino
            {
                self.write_status(index, status);
                return true;
            }
            if entry.tier == TIER_TOMBSTONE && free.is_none() {
                free = Some(index);
            }
            if entry.tier == TIER_EMPTY {
                self.write_status(free.unwrap_or(index), status);
                return true;
            }
        }
        match free {
            Some(index) => {
                self.write_status(index, status);
                true
            }
            None => false,
        }
    }

    /// Removes (dev, ino) from the status table.
    pub fn remove_status(&self, dev: u64, ino: u64) {
        let start = (mix(dev, ino) as usize) % self.status_entries;
        for probe in 0..MAX_PROBE.min(self.status_entries) {
            let index = (start + probe) % self.status_entries;
            let entry = self.read_status(self.status_offset(index));
            if entry.tier == TIER_EMPTY {
                return;
            }
            if entry.tier != TIER_TOMBSTONE && entry.dev == dev && entry.ino == ino {
                let tomb = Status {
                    tier: TIER_TOMBSTONE,
                    ..Status::default()
                };
                self.write_status(index, &tomb);
                return;
            }
        }
    }

    fn write_status(&self, index: usize, s: &Status) {
        let base = self.status_offset(index);
        let seq = self.u32_at(base);
        let before = seq.load(Ordering::Relaxed);
        seq.store(before | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.u32_at(base + 4).store(s.tier, Ordering::Relaxed);
        let words = [
            s.dev,
            s.ino,
            s.replicated_txid,
            s.replicated_frames,
            s.last_sync_ns,
            s.pending_since_ns,
        ];
        for (i, w) in words.iter().enumerate() {
            self.u64_at(base + 8 + 8 * i).store(*w, Ordering::Relaxed);
        }
        self.u32_at(base + 56).store(s.reason, Ordering::Relaxed);
        seq.store((before | 1).wrapping_add(1), Ordering::Release);
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32 in shared memory; it only reads the address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            1,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: std::time::Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 with a valid timespec; returns on wake,
    // timeout, signal or when the word no longer equals `expected`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// CLOCK_REALTIME in nanoseconds (served by the vDSO: no system call).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<u64>);

    impl Mem {
        fn ring(slots: u32, entries: u32) -> (Mem, Ring) {
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

    #[test]
    fn status_table_publish_lookup_remove() {
        let (_mem, ring) = Mem::ring(8, 4);
        let s = |ino| Status {
            dev: 1,
            ino,
            tier: TIER_HOT,
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
