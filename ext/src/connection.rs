//! What the WAL hook remembers per connection, so a commit costs no name lookup, `strlen` or
//! path hash, and no `sqlite3_db_config` call unless the agent came or went.
//!
//! SQLite has no callback when a connection closes, so nothing is allocated per connection:
//! each install of the hook takes a ticket and the slot `ticket % SLOTS` of a static table,
//! and the ticket travels in the hook's argument beside the checkpoint threshold. A slot is
//! trusted only while it still holds the ticket and connection pointer of the hook that reads
//! it; a slot taken by a later install (a process with more than [`SLOTS`] connections) is
//! noticed and the hook takes a new ticket. A closed connection's pointer reused by a new one
//! cannot match: the new connection's hook was installed with a new ticket.
//!
//! Only the main database is cached: its file cannot change for the life of the connection,
//! while an attached schema's name may be detached and its memory reused for another file.

use std::os::raw::c_char;
use std::sync::atomic::{fence, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use sqlite_loadable::prelude::sqlite3;

/// Slots in the table: connections that commit at once in one process before two share a
/// slot (sharing costs the slow path, never a wrong answer). 64 KiB.
pub const SLOTS: usize = 1024;

/// `no_checkpoint_on_close` not set by this hook yet.
const CKPT_UNKNOWN: u64 = 0;
const CKPT_ALLOWED: u64 = 1;
const CKPT_SUPPRESSED: u64 = 2;

/// What a connection's hook knows of its main database. `checked_ns == 0`: nothing yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cached {
    pub hash: u64,
    pub dev: u64,
    pub ino: u64,
    /// When the process-wide path cache last `stat`ed the path.
    pub checked_ns: u64,
    /// The ring generation the path is registered with.
    pub registered: u64,
    /// What `SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE` was last set to on the connection.
    ckpt: u64,
}

impl Cached {
    /// Whether this hook last set the connection to skip the checkpoint on close as `on`.
    pub fn no_checkpoint_on_close_is(&self, on: bool) -> bool {
        self.ckpt == if on { CKPT_SUPPRESSED } else { CKPT_ALLOWED }
    }

    pub fn set_no_checkpoint_on_close(&mut self, on: bool) {
        self.ckpt = if on { CKPT_SUPPRESSED } else { CKPT_ALLOWED };
    }
}

/// One slot: `state` is the owner's ticket shifted left by one, with the low bit set while
/// the slot is being written (a sequence lock keyed by owner).
#[repr(align(64))]
struct Slot {
    state: AtomicU64,
    db: AtomicU64,
    hash: AtomicU64,
    dev: AtomicU64,
    ino: AtomicU64,
    checked_ns: AtomicU64,
    registered: AtomicU64,
    ckpt: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // used only to initialise the array
const EMPTY: Slot = Slot {
    state: AtomicU64::new(0),
    db: AtomicU64::new(0),
    hash: AtomicU64::new(0),
    dev: AtomicU64::new(0),
    ino: AtomicU64::new(0),
    checked_ns: AtomicU64::new(0),
    registered: AtomicU64::new(0),
    ckpt: AtomicU64::new(0),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static NEXT_TICKET: AtomicU32 = AtomicU32::new(1);

fn slot(ticket: u32) -> &'static Slot {
    &TABLE[ticket as usize % SLOTS]
}

/// The hook's argument: the checkpoint threshold in the low 32 bits and the ticket above it
/// (0: no slot; always so where pointers are 32 bits wide, which only costs speed).
pub fn pack(threshold: u32, ticket: u32) -> usize {
    ((u64::from(ticket) << 32) | u64::from(threshold)) as usize
}

/// (threshold, ticket) from the hook's argument.
pub fn unpack(arg: usize) -> (u32, u32) {
    let word = arg as u64;
    (word as u32, (word >> 32) as u32)
}

/// Takes a new ticket for `db` and resets its slot; 0 if the slot is being written by
/// another thread this instant (the connection then runs uncached until its next install).
pub fn claim(db: *mut sqlite3) -> u32 {
    let mut ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
    if ticket == 0 {
        ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
    }
    if usize::BITS < 64 {
        return 0;
    }
    let s = slot(ticket);
    let current = s.state.load(Ordering::Relaxed);
    if current & 1 == 1
        || s.state
            .compare_exchange(
                current,
                u64::from(ticket) << 1 | 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_err()
    {
        return 0;
    }
    fence(Ordering::Release);
    s.db.store(db as u64, Ordering::Relaxed);
    for field in [&s.hash, &s.dev, &s.ino, &s.checked_ns, &s.registered] {
        field.store(0, Ordering::Relaxed);
    }
    s.ckpt.store(CKPT_UNKNOWN, Ordering::Relaxed);
    s.state.store(u64::from(ticket) << 1, Ordering::Release);
    ticket
}

/// Why a lookup found nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No ticket (0), or the slot is being written this instant.
    Unavailable,
    /// A later install took the slot: the connection should take a new ticket.
    Taken,
}

/// What the slot of `ticket` holds for connection `db`.
pub fn get(ticket: u32, db: *mut sqlite3) -> Result<Cached, Miss> {
    if ticket == 0 {
        return Err(Miss::Unavailable);
    }
    let s = slot(ticket);
    let owned = u64::from(ticket) << 1;
    let state = s.state.load(Ordering::Acquire);
    if state != owned {
        return Err(if state >> 1 == u64::from(ticket) {
            Miss::Unavailable
        } else {
            Miss::Taken
        });
    }
    let cached = Cached {
        hash: s.hash.load(Ordering::Relaxed),
        dev: s.dev.load(Ordering::Relaxed),
        ino: s.ino.load(Ordering::Relaxed),
        checked_ns: s.checked_ns.load(Ordering::Relaxed),
        registered: s.registered.load(Ordering::Relaxed),
        ckpt: s.ckpt.load(Ordering::Relaxed),
    };
    let owner = s.db.load(Ordering::Relaxed);
    fence(Ordering::Acquire);
    if s.state.load(Ordering::Relaxed) != owned || owner != db as u64 {
        return Err(Miss::Taken);
    }
    Ok(cached)
}

/// Stores `cached` in the slot of `ticket` if `db` still owns it.
pub fn put(ticket: u32, db: *mut sqlite3, cached: &Cached) {
    if ticket == 0 {
        return;
    }
    let s = slot(ticket);
    let owned = u64::from(ticket) << 1;
    if s.state
        .compare_exchange(owned, owned | 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    fence(Ordering::Release);
    if s.db.load(Ordering::Relaxed) == db as u64 {
        s.hash.store(cached.hash, Ordering::Relaxed);
        s.dev.store(cached.dev, Ordering::Relaxed);
        s.ino.store(cached.ino, Ordering::Relaxed);
        s.checked_ns.store(cached.checked_ns, Ordering::Relaxed);
        s.registered.store(cached.registered, Ordering::Relaxed);
        s.ckpt.store(cached.ckpt, Ordering::Relaxed);
    }
    s.state.store(owned, Ordering::Release);
}

/// Whether `schema` is the main database's name: the one schema whose file is fixed for the
/// connection's life.
///
/// # Safety
/// `schema` must be null or a NUL-terminated string.
pub unsafe fn is_main(schema: *const c_char) -> bool {
    // SQLite names the main schema with one static string, so after the first match a
    // pointer comparison answers (a second SQLite library in the process only costs the
    // byte comparison below).
    let known = MAIN_NAME.load(Ordering::Relaxed);
    if schema == known.cast_const() {
        return !known.is_null();
    }
    if schema.is_null() {
        return false;
    }
    // Byte by byte rather than through `strlen`: this runs on every commit.
    for (i, &expected) in b"main\0".iter().enumerate() {
        // SAFETY: the bytes before `i` matched non-NUL bytes, so the string reaches `i`.
        if unsafe { *schema.add(i) } as u8 != expected {
            return false;
        }
    }
    MAIN_NAME.store(schema.cast_mut(), Ordering::Relaxed);
    true
}

/// The address of the main schema's name as SQLite passed it last.
static MAIN_NAME: AtomicPtr<c_char> = AtomicPtr::new(std::ptr::null_mut());

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is process-wide: tests that claim slots run one at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn fake_db(n: usize) -> *mut sqlite3 {
        (n * 4096) as *mut sqlite3
    }

    #[test]
    fn a_slot_serves_only_the_ticket_and_connection_that_claimed_it() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let db = fake_db(1);
        let ticket = claim(db);
        assert_ne!(ticket, 0);
        let fresh = get(ticket, db).unwrap();
        assert_eq!(fresh.checked_ns, 0, "a claimed slot starts empty");
        let mut filled = Cached {
            hash: 1,
            dev: 2,
            ino: 3,
            checked_ns: 4,
            registered: 5,
            ckpt: CKPT_UNKNOWN,
        };
        filled.set_no_checkpoint_on_close(true);
        put(ticket, db, &filled);
        let read = get(ticket, db).unwrap();
        assert_eq!(read, filled);
        assert!(read.no_checkpoint_on_close_is(true));
        assert!(!read.no_checkpoint_on_close_is(false));
        // Another connection holding the same ticket number (impossible in SQLite, but a stale
        // argument must not read someone else's file) is refused.
        assert_eq!(get(ticket, fake_db(2)), Err(Miss::Taken));
        assert_eq!(get(0, db), Err(Miss::Unavailable));
    }

    #[test]
    fn a_later_install_in_the_same_slot_takes_it_over() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let db = fake_db(3);
        let old = claim(db);
        put(
            old,
            db,
            &Cached {
                dev: 9,
                checked_ns: 1,
                ..Cached::default()
            },
        );
        // Tickets are handed out in order: claim until one lands in the same slot.
        let other = fake_db(4);
        let newer = loop {
            let t = claim(other);
            if t as usize % SLOTS == old as usize % SLOTS {
                break t;
            }
        };
        assert_eq!(get(old, db), Err(Miss::Taken));
        put(
            old,
            db,
            &Cached {
                dev: 666,
                ..Cached::default()
            },
        );
        assert_eq!(
            get(newer, other).unwrap().dev,
            0,
            "the old owner cannot write"
        );
    }

    #[test]
    fn the_argument_carries_threshold_and_ticket() {
        assert_eq!(unpack(pack(1000, 77)), (1000, 77));
        assert_eq!(unpack(pack(0, 0)), (0, 0));
        assert_eq!(
            unpack(pack(i32::MAX as u32, u32::MAX)),
            (i32::MAX as u32, u32::MAX)
        );
    }

    #[test]
    fn only_main_is_cached() {
        // SAFETY: NUL-terminated literals and null.
        unsafe {
            assert!(is_main(c"main".as_ptr()));
            assert!(!is_main(c"aux".as_ptr()));
            assert!(!is_main(c"mainx".as_ptr()));
            assert!(!is_main(c"mai".as_ptr()));
            assert!(!is_main(std::ptr::null()));
        }
    }
}
