//! The ring file's layout: sizes, header offsets, record kinds, tiers, refusal reasons,
//! and the plain data types records and status entries decode into. No shared memory is
//! touched here.

/// `MDBRING1` read as a little-endian integer.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MDBRING1");
/// Bumped on any incompatible layout change; a ring of another version is not used.
/// 2: the status table's hash changed (entries of version 1 would be looked up elsewhere).
/// 3: status entries carry a refusal reason and the tier [`Tier::Refused`] (a version-2 reader
/// would take a refused database for a cold, replicated one).
/// 4: records carry a cheaper check word (every record of version 3 would fail its check).
pub const VERSION: u32 = 4;
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
pub(super) const MAX_CLAIM_ATTEMPTS: u32 = 64;
/// Longest path a registration record carries (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Payload bytes of a continuation slot.
pub(super) const CONT_BYTES: usize = SLOT_SIZE - 8;
/// Linear probe bound in the status table.
pub(super) const MAX_PROBE: usize = 32;

/// Record kinds.
pub const KIND_COMMIT: u8 = 1;
pub const KIND_REGISTER: u8 = 2;

/// A database's tier, as the agent's arena keeps it and as status entries store it (one
/// type for both crates). `Empty` and `Tombstone` exist only in the status table.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tier {
    /// A free status entry (ends a probe).
    #[default]
    Empty = 0,
    /// Known and replicated, not written lately: no handle open.
    Cold = 1,
    /// Being replicated continuously.
    Hot = 2,
    /// A removed status entry (a probe goes on past it).
    Tombstone = 3,
    /// The agent knows the database and does not replicate it; `Status::reason` says why.
    Refused = 4,
}

impl Tier {
    /// The tier a stored word names; anything else (the file is untrusted) reads as a
    /// tombstone, which lookups skip.
    pub fn from_u32(word: u32) -> Tier {
        match word {
            0 => Tier::Empty,
            1 => Tier::Cold,
            2 => Tier::Hot,
            4 => Tier::Refused,
            _ => Tier::Tombstone,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Empty => "empty",
            Tier::Cold => "cold",
            Tier::Hot => "hot",
            Tier::Tombstone => "removed",
            Tier::Refused => "refused",
        }
    }
}

/// Why a database is not replicated, as stored in a [`Tier::Refused`] entry. The codes are
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
    /// Another host holds the replica location's lease (it replicates the tenant now).
    pub const LEASED: u32 = 6;

    /// A sentence for `multidb_status()` and the agent's reports.
    pub fn text(code: u32) -> &'static str {
        match code {
            NOT_WAL => "not in WAL mode (or empty): only WAL databases are replicated",
            COLLISION => "shares its replica location with another database; both are refused",
            OUTSIDE_PATTERN => "does not match the discovery pattern",
            BAD_LOCATION => "its replica location is invalid (see `multidb databases`)",
            IDENTITY => "its replica location holds another database's history (replica holds another database)",
            LEASED => "another host holds its replica location's lease (replica leased by another host; taken over after expiry or `multidb release`)",
            _ => "not replicated",
        }
    }
}

/// Header field offsets (bytes). Each shared counter sits where producers and the consumer
/// do not false-share more than they must.
pub(super) mod off {
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
pub(super) fn check_geometry(slots: u32, status_entries: u32) -> Result<(), RingError> {
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
    pub tier: Tier,
    /// The last TXID in the replica.
    pub replicated_txid: u64,
    /// The WAL frame count the replica covers.
    pub replicated_frames: u64,
    /// When the last successful sync started reading the WAL (CLOCK_REALTIME ns): every
    /// commit made before this instant is in the replica (`multidb_wait` relies on it).
    pub last_sync_ns: u64,
    /// When the oldest commit not yet in the replica was seen; 0 when caught up.
    pub pending_since_ns: u64,
    /// With [`Tier::Refused`]: one of the [`reason`] codes.
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
