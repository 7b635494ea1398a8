//! The arena: every discovered database in a few flat arrays, tens of bytes each.
//!
//! A host may hold a million databases and write to a handful, so the cold side must cost
//! almost nothing. Paths are not stored per database: directories form a tree of interned
//! names (one copy of `acme` and of `/data/p1/databases/userdb` however many databases sit
//! below them), file names are interned once per distinct name, and each database is a fixed
//! set of array slots (struct of arrays, so no padding) addressed by a stable `u32` id.
//! Nothing here allocates per database: no `String`, `PathBuf` or `Box`.

use std::collections::HashMap;
use std::hash::BuildHasher;

use hashbrown::hash_table::HashTable;
use hashbrown::DefaultHashBuilder;
mod lookup;
mod scan;

/// A database's stable handle inside the arena.
pub type DbId = u32;

/// Whether a database is merely known (cold) or being replicated (hot): the arena uses
/// only those two of the ring's tiers.
pub use multidb::ring::Tier;

pub use crate::replicate::wal::{mtime_ns, WalStamp};

/// One database found by a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundFile {
    pub name: String,
    pub ino: u64,
    pub wal: WalStamp,
}

/// What a scan changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<DbId>,
    /// Paths of databases that disappeared; their ids are free for reuse.
    pub removed: Vec<String>,
    /// Databases whose `-wal` (or inode) changed since the previous scan.
    pub changed: Vec<DbId>,
}

const FLAG_LIVE: u8 = 1;
const FLAG_SEEN: u8 = 2;
const FLAG_HOT: u8 = 4;
/// Sentinel for "no parent" / "the root's name".
const NONE: u32 = u32::MAX;

/// Bytes of the per-database arrays (`rec_*`), checked by a test so a widened field shows.
pub const RECORD_BYTES: usize = 4 + 4 + 4 + 4 + 1;

/// The 32 bits of a `-wal` stamp that change detection needs. A stamp packs the size and the
/// low 32 bits of the mtime in ns; a commit changes the mtime (and almost always the size), and
/// both map one-to-one into the result while the other stays, so a write goes unseen only if
/// both change so as to cancel out (2^-32), and then only until the next write. Zero means
/// "no `-wal`", as [`WalStamp::NONE`] does.
fn wal_fingerprint(stamp: WalStamp) -> u32 {
    let raw = stamp.raw();
    if raw == 0 {
        return 0;
    }
    let (size, mtime) = ((raw >> 32) as u32, raw as u32);
    (mtime ^ size.wrapping_mul(0x9E37_79B1)).max(1)
}

/// Interned names: `[len: u8][bytes]` back to back, addressed by offset. File and directory
/// names are at most 255 bytes (NAME_MAX), so one length byte is enough.
///
/// The dedup index of file names is only needed while a scan inserts new databases (lookups
/// go through the arena's path index), so [`Pool::drop_index`] frees it between scans and
/// [`Pool::intern`] rebuilds it when needed: 6.5 bytes per database saved on a quiet host.
#[derive(Default)]
struct Pool {
    bytes: Vec<u8>,
    index: HashTable<u32>,
    indexed_up_to: usize,
    hasher: DefaultHashBuilder,
}

impl Pool {
    fn get(&self, offset: u32) -> &[u8] {
        let start = offset as usize;
        let len = usize::from(self.bytes[start]);
        &self.bytes[start + 1..start + 1 + len]
    }

    /// Finds an interned name; only valid while the index is complete (directory names).
    fn find(&self, name: &[u8]) -> Option<u32> {
        debug_assert_eq!(self.indexed_up_to, self.bytes.len());
        let hash = self.hasher.hash_one(name);
        self.index.find(hash, |&off| self.get(off) == name).copied()
    }

    fn hash_at(bytes: &[u8], hasher: &DefaultHashBuilder, off: u32) -> u64 {
        let start = off as usize;
        hasher.hash_one(&bytes[start + 1..start + 1 + usize::from(bytes[start])])
    }

    /// Indexes names appended since the index was dropped.
    fn complete_index(&mut self) {
        let Pool {
            bytes,
            index,
            indexed_up_to,
            hasher,
        } = self;
        while *indexed_up_to < bytes.len() {
            let off = *indexed_up_to as u32;
            let hash = Self::hash_at(bytes, hasher, off);
            index.insert_unique(hash, off, |&o| Self::hash_at(bytes, hasher, o));
            *indexed_up_to += 1 + usize::from(bytes[off as usize]);
        }
    }

    fn drop_index(&mut self) {
        self.index = HashTable::new();
        self.indexed_up_to = 0;
    }

    /// The offset of `name`, adding it if new; `None` if the name is too long to be a
    /// path component or the pool outgrew `u32` offsets.
    fn intern(&mut self, name: &[u8]) -> Option<u32> {
        self.complete_index();
        if let Some(offset) = self.find(name) {
            return Some(offset);
        }
        let len = u8::try_from(name.len()).ok()?;
        let offset = u32::try_from(self.bytes.len())
            .ok()
            .filter(|&o| o != NONE)?;
        self.bytes.push(len);
        self.bytes.extend_from_slice(name);
        let Pool {
            bytes,
            index,
            indexed_up_to,
            hasher,
        } = self;
        let hash = hasher.hash_one(name);
        index.insert_unique(hash, offset, |&o| Self::hash_at(bytes, hasher, o));
        *indexed_up_to = bytes.len();
        Some(offset)
    }

    fn heap_bytes(&self) -> usize {
        self.bytes.capacity() + self.index.allocation_size()
    }

    fn shrink(&mut self) {
        self.bytes.shrink_to_fit();
        let Pool {
            bytes,
            index,
            hasher,
            ..
        } = self;
        index.shrink_to_fit(|&o| Self::hash_at(bytes, hasher, o));
    }
}

/// A directory on the way from the pattern root to databases.
#[derive(Clone, Copy)]
struct Dir {
    parent: u32,
    name: u32,
    dev: u64,
    /// The directory's mtime at the last scan (ns; 0: not seen as a leaf yet).
    mtime_ns: u64,
}

fn mix(a: u64, b: u64) -> u64 {
    // A multiply-xorshift mix; keys are small integers we produced ourselves.
    let x = (a ^ b.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

/// All databases the pattern discovered.
pub struct Arena {
    root: String,
    dirs: Vec<Dir>,
    dir_names: Pool,
    dir_index: HashTable<u32>,
    leaves: Pool,
    // One slot per database id (struct of arrays: [`RECORD_BYTES`], no padding).
    rec_dir: Vec<u32>,
    rec_leaf: Vec<u32>,
    /// The inode's low 32 bits; the few inodes past 2^32 keep their high bits in `ino_high`.
    rec_ino: Vec<u32>,
    rec_wal: Vec<u32>,
    rec_flags: Vec<u8>,
    ino_high: HashMap<DbId, u32>,
    /// Live ids grouped by directory and sorted by name within it, as of the last scan that
    /// changed the tree: `by_path[dir_first[d]..dir_first[d + 1]]` are directory `d`'s
    /// databases. 4 bytes per database, where a hash table cost 6.5 to 10.5, and the same table
    /// answers "which database is `name` in this directory" for inotify events.
    by_path: Vec<DbId>,
    dir_first: Vec<u32>,
    /// Live ids sorted by (device, inode); rebuilt when a scan changes inodes.
    by_inode: Vec<DbId>,
    free: Vec<DbId>,
    live: usize,
    scan_dirty: bool,
    /// When the current and the previous scan started (CLOCK_REALTIME ns).
    scan_started_ns: u64,
    previous_scan_started_ns: u64,
}

impl Arena {
    /// An empty arena for databases below `root` (the pattern's literal prefix).
    pub fn new(root: &str) -> Arena {
        let mut arena = Arena {
            root: root.to_string(),
            dirs: Vec::new(),
            dir_names: Pool::default(),
            dir_index: HashTable::new(),
            leaves: Pool::default(),
            rec_dir: Vec::new(),
            rec_leaf: Vec::new(),
            rec_ino: Vec::new(),
            rec_wal: Vec::new(),
            rec_flags: Vec::new(),
            ino_high: HashMap::new(),
            by_path: Vec::new(),
            dir_first: Vec::new(),
            by_inode: Vec::new(),
            free: Vec::new(),
            live: 0,
            scan_dirty: false,
            scan_started_ns: 0,
            previous_scan_started_ns: 0,
        };
        arena.dirs.push(Dir {
            parent: NONE,
            name: NONE,
            dev: 0,
            mtime_ns: 0,
        });
        arena
    }

    fn leaf_name(&self, id: DbId) -> &[u8] {
        self.leaves.get(self.rec_leaf[id as usize])
    }

    fn ino(&self, id: DbId) -> u64 {
        let high = self.ino_high.get(&id).copied().unwrap_or(0);
        u64::from(high) << 32 | u64::from(self.rec_ino[id as usize])
    }

    fn set_ino(&mut self, id: DbId, ino: u64) {
        self.rec_ino[id as usize] = ino as u32;
        match (ino >> 32) as u32 {
            0 => self.ino_high.remove(&id),
            high => self.ino_high.insert(id, high),
        };
    }

    /// Gives slack from growth back: a cold host should hold only what it needs.
    fn shrink(&mut self) {
        // Exact: growth by doubling leaves up to half of each array unused, and a scan that
        // changed the tree is rare enough that the next growth's copy costs nothing.
        self.rec_dir.shrink_to_fit();
        self.rec_leaf.shrink_to_fit();
        self.rec_ino.shrink_to_fit();
        self.rec_wal.shrink_to_fit();
        self.rec_flags.shrink_to_fit();
        self.by_inode.shrink_to_fit();
        self.by_path.shrink_to_fit();
        self.dir_first.shrink_to_fit();
        self.dirs.shrink_to_fit();
        self.free.shrink_to_fit();
        self.ino_high.shrink_to_fit();
        self.leaves.shrink();
        self.dir_names.shrink();
    }

    /// Heap bytes the arena holds, counted from capacities (what the allocator gave us).
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.root.capacity()
            + self.dirs.capacity() * size_of::<Dir>()
            + self.dir_names.heap_bytes()
            + self.dir_index.allocation_size()
            + self.leaves.heap_bytes()
            + self.rec_dir.capacity() * 4
            + self.rec_leaf.capacity() * 4
            + self.rec_ino.capacity() * 4
            + self.rec_wal.capacity() * 4
            + self.rec_flags.capacity()
            + self.ino_high.capacity() * (size_of::<(DbId, u32)>() + 1)
            + self.by_path.capacity() * 4
            + self.dir_first.capacity() * 4
            + self.by_inode.capacity() * 4
            + self.free.capacity() * 4
    }
}

// The tests scan and then query through the public methods, so they sit here, beside both
// halves (`scan` and `lookup`).
#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(name: &str, ino: u64) -> FoundFile {
        FoundFile {
            name: name.to_string(),
            ino,
            wal: WalStamp::NONE,
        }
    }

    fn scan(arena: &mut Arena, dirs: &[(&[&str], Vec<FoundFile>)], unreadable: &[String]) -> Diff {
        let mut diff = Diff::default();
        arena.begin_scan();
        for (components, files) in dirs {
            arena.visit_dir(components, 7, files, &mut diff);
        }
        arena.end_scan(unreadable, &mut diff);
        diff
    }

    /// One scan of directories given as owned component lists.
    fn scan_owned(arena: &mut Arena, dirs: &[(Vec<String>, Vec<FoundFile>)]) {
        let mut diff = Diff::default();
        arena.begin_scan();
        for (c, f) in dirs {
            let c: Vec<&str> = c.iter().map(String::as_str).collect();
            arena.visit_dir(&c, 1, f, &mut diff);
        }
        arena.end_scan(&[], &mut diff);
    }

    #[test]
    fn rescan_reports_added_removed_changed() {
        let mut a = Arena::new("/data");
        let d = scan(
            &mut a,
            &[(&["p", "t"], vec![file("a.db", 1), file("b.db", 2)])],
            &[],
        );
        assert_eq!(d.added.len(), 2);
        assert_eq!(a.path(d.added[1]), "/data/p/t/b.db");
        let b = a.lookup_path("/data/p/t/b.db").unwrap();
        let mut changed = file("b.db", 2);
        changed.wal = WalStamp::new(4152, 99);
        let d = scan(
            &mut a,
            &[(&["p", "t"], vec![changed, file("c.db", 3)])],
            &[],
        );
        assert_eq!(d.changed, vec![b]);
        assert_eq!(d.removed, vec!["/data/p/t/a.db".to_string()]);
        assert_eq!(d.added.len(), 1);
        assert_eq!(a.len(), 2);
        assert_eq!(a.lookup_path("/data/p/t/a.db"), None);
        assert_eq!(a.lookup_inode(7, 3), a.lookup_path("/data/p/t/c.db"));
        assert!(a.same_wal(b, WalStamp::new(4152, 99)));
        // Unchanged rescan: empty diff.
        let mut same = file("b.db", 2);
        same.wal = WalStamp::new(4152, 99);
        let d = scan(&mut a, &[(&["p", "t"], vec![same, file("c.db", 3)])], &[]);
        assert_eq!(d, Diff::default());
    }

    #[test]
    fn unreadable_directory_keeps_its_databases() {
        let mut a = Arena::new("/data");
        scan(
            &mut a,
            &[
                (&["p", "t"], vec![file("a.db", 1)]),
                (&["q", "t"], vec![file("b.db", 2)]),
            ],
            &[],
        );
        let d = scan(
            &mut a,
            &[(&["p", "t"], vec![file("a.db", 1)])],
            &["/data/q".to_string()],
        );
        assert!(d.removed.is_empty());
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn names_are_stored_once() {
        let mut a = Arena::new("/data");
        let dirs: Vec<(Vec<String>, Vec<FoundFile>)> = (0..50)
            .map(|b| {
                (
                    vec!["proj".to_string(), format!("b{b}")],
                    vec![file("acme.db", b), file("globex.db", 100 + b)],
                )
            })
            .collect();
        scan_owned(&mut a, &dirs);
        assert_eq!(a.len(), 100);
        // "acme.db" and "globex.db" once each: 2 + 7 + 9 bytes.
        assert_eq!(a.leaves.bytes.len(), 18);
    }

    #[test]
    fn ids_are_reused_and_tier_is_kept_per_record() {
        let mut a = Arena::new("");
        scan(
            &mut a,
            &[(&[], vec![file("a.db", 1), file("b.db", 2)])],
            &[],
        );
        let b = a.lookup_path("b.db").unwrap();
        a.set_tier(b, Tier::Hot);
        scan(&mut a, &[(&[], vec![file("b.db", 2)])], &[]);
        assert_eq!(a.tier(b), Tier::Hot);
        let d = scan(
            &mut a,
            &[(&[], vec![file("b.db", 2), file("c.db", 3)])],
            &[],
        );
        assert_eq!(d.added, vec![0], "the freed id 0 is reused");
        assert_eq!(a.tier(0), Tier::Cold);
        assert_eq!(a.path(0), "c.db");
    }

    /// Issue 12, item 3: the per-database arrays stay at [`RECORD_BYTES`], and a tree with
    /// unique names costs the records, two 4-byte indexes and the name itself.
    #[test]
    fn regression_12_a_database_costs_what_the_budget_says() {
        let a = Arena::new("");
        fn elem<T>(_: &[T]) -> usize {
            std::mem::size_of::<T>()
        }
        let record = elem(&a.rec_dir)
            + elem(&a.rec_leaf)
            + elem(&a.rec_ino)
            + elem(&a.rec_wal)
            + elem(&a.rec_flags);
        assert_eq!(record, RECORD_BYTES);
        assert_eq!(RECORD_BYTES, 17);
        assert_eq!(elem(&a.by_path) + elem(&a.by_inode), 8);

        let mut a = Arena::new("/data");
        let dirs: Vec<(Vec<String>, Vec<FoundFile>)> = (0..200u64)
            .map(|d| {
                let files = (0..100u64)
                    .map(|t| file(&format!("t{:05}.db", d * 100 + t), d * 100 + t))
                    .collect();
                (vec!["p".to_string(), format!("b{d:03}")], files)
            })
            .collect();
        scan_owned(&mut a, &dirs);
        assert_eq!(a.len(), 20_000);
        let per_db = a.heap_bytes() as f64 / a.len() as f64;
        // 17 (records) + 8 (indexes) + 10 (a 9-byte name and its length), and the directories.
        assert!(per_db < 36.0, "{per_db} B per database");
    }

    #[test]
    fn inodes_past_32_bits_are_kept_whole() {
        let mut a = Arena::new("");
        let big = (7u64 << 32) | 5;
        scan(
            &mut a,
            &[(&[], vec![file("a.db", big), file("b.db", 5)])],
            &[],
        );
        let (ida, idb) = (
            a.lookup_path("a.db").unwrap(),
            a.lookup_path("b.db").unwrap(),
        );
        assert_eq!(a.inode(ida), (7, big));
        assert_eq!(a.lookup_inode(7, big), Some(ida));
        assert_eq!(a.lookup_inode(7, 5), Some(idb));
        // Replaced by a file with a small inode: the high bits go.
        scan(
            &mut a,
            &[(&[], vec![file("a.db", 9), file("b.db", 5)])],
            &[],
        );
        assert_eq!(a.lookup_inode(7, 9), Some(ida));
        assert_eq!(a.lookup_inode(7, big), None);
    }

    proptest! {
        #[test]
        fn paths_round_trip(names in proptest::collection::btree_set("[a-z]{1,3}/[a-z]{1,3}/[a-z]{1,4}\\.db", 1..60)) {
            let mut a = Arena::new("/r");
            let mut diff = Diff::default();
            a.begin_scan();
            for (i, n) in names.iter().enumerate() {
                let parts: Vec<&str> = n.split('/').collect();
                a.visit_dir(&parts[..2], 3, &[file(parts[2], i as u64)], &mut diff);
            }
            a.end_scan(&[], &mut diff);
            prop_assert_eq!(a.len(), names.len());
            for (i, n) in names.iter().enumerate() {
                let path = format!("/r/{n}");
                let id = a.lookup_path(&path).unwrap();
                prop_assert_eq!(a.path(id), path);
                prop_assert_eq!(a.lookup_inode(3, i as u64), Some(id));
            }
        }
    }
}
