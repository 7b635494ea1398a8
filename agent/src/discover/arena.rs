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

    /// Number of live databases.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Every live id, in id order.
    pub fn ids(&self) -> impl Iterator<Item = DbId> + '_ {
        (0..self.rec_flags.len() as u32).filter(|&id| self.is_live(id))
    }

    /// Whether `id` names a database (ids of removed ones are free for reuse).
    pub fn is_live(&self, id: DbId) -> bool {
        self.rec_flags
            .get(id as usize)
            .is_some_and(|f| f & FLAG_LIVE != 0)
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

    fn dir_hash(parent: u32, name: u32) -> u64 {
        mix(u64::from(parent) | 1 << 40, u64::from(name))
    }

    /// The id of the directory `components` below the root, creating the chain as needed.
    fn intern_dir(&mut self, components: &[&str], dev: u64) -> Option<u32> {
        let mut dir = 0u32;
        for component in components {
            let name = self.dir_names.intern(component.as_bytes())?;
            let hash = Self::dir_hash(dir, name);
            let dirs = &self.dirs;
            let found = self
                .dir_index
                .find(hash, |&d| {
                    dirs[d as usize].parent == dir && dirs[d as usize].name == name
                })
                .copied();
            dir = match found {
                Some(d) => d,
                None => {
                    let id = u32::try_from(self.dirs.len()).ok()?;
                    self.dirs.push(Dir {
                        parent: dir,
                        name,
                        dev: 0,
                        mtime_ns: 0,
                    });
                    let dirs = &self.dirs;
                    self.dir_index.insert_unique(hash, id, |&d| {
                        Self::dir_hash(dirs[d as usize].parent, dirs[d as usize].name)
                    });
                    id
                }
            };
        }
        self.dirs[dir as usize].dev = dev;
        Some(dir)
    }

    fn find_dir(&self, components: &[&str]) -> Option<u32> {
        let mut dir = 0u32;
        for component in components {
            let name = self.dir_names.find(component.as_bytes())?;
            let hash = Self::dir_hash(dir, name);
            dir = *self.dir_index.find(hash, |&d| {
                self.dirs[d as usize].parent == dir && self.dirs[d as usize].name == name
            })?;
        }
        Some(dir)
    }

    /// The record of `name` in `dir` as of the last rebuild of `by_path` (databases a scan
    /// inserts are found from the end of that scan on; a scan visits each directory once).
    fn find_record(&self, dir: u32, name: &[u8]) -> Option<DbId> {
        let d = dir as usize;
        let (start, end) = (*self.dir_first.get(d)?, *self.dir_first.get(d + 1)?);
        let ids = &self.by_path[start as usize..end as usize];
        let at = ids
            .binary_search_by(|&id| self.leaf_name(id).cmp(name))
            .ok()?;
        Some(ids[at])
    }

    /// Marks every database unseen; the scan that follows marks what it finds.
    pub fn begin_scan(&mut self) {
        self.previous_scan_started_ns = self.scan_started_ns;
        self.scan_started_ns = multidb::ring::now_ns();
        for flags in &mut self.rec_flags {
            *flags &= !FLAG_SEEN;
        }
    }

    /// Records the databases found in one directory (`components` below the root).
    /// Returns how many could not be stored (names longer than 255 bytes).
    pub fn visit_dir(
        &mut self,
        components: &[&str],
        dev: u64,
        files: &[FoundFile],
        diff: &mut Diff,
    ) -> usize {
        let Some(dir) = self.intern_dir(components, dev) else {
            return files.len();
        };
        let mut refused = 0;
        for file in files {
            match self.find_record(dir, file.name.as_bytes()) {
                Some(id) => {
                    let i = id as usize;
                    self.rec_flags[i] |= FLAG_SEEN;
                    let wal = wal_fingerprint(file.wal);
                    if self.rec_wal[i] != wal || self.ino(id) != file.ino {
                        if self.ino(id) != file.ino {
                            self.scan_dirty = true;
                            self.set_ino(id, file.ino);
                        }
                        self.rec_wal[i] = wal;
                        diff.changed.push(id);
                    }
                }
                None => match self.insert(dir, file) {
                    Some(id) => diff.added.push(id),
                    None => refused += 1,
                },
            }
        }
        refused
    }

    /// Catches writes a `-wal` stamp cannot show: a connection that was the database's only one
    /// checkpoints and deletes the `-wal` when it closes, so a write leaves no `-wal` behind.
    /// Creating and deleting the `-wal` changes the directory, though: when a leaf directory's
    /// mtime moved, its databases without a `-wal` are stat'ed, and one modified after the
    /// directory's previous mtime (SQLite's last change to a database it closes is that
    /// `-wal` deletion, after the checkpoint wrote the file), or since the previous scan
    /// started, is reported as changed. Quiet directories cost nothing.
    pub fn check_leaf_dir(
        &mut self,
        components: &[&str],
        dir_mtime_ns: u64,
        files: &[FoundFile],
        diff: &mut Diff,
    ) {
        let Some(dir) = self.find_dir(components) else {
            return;
        };
        let before = std::mem::replace(&mut self.dirs[dir as usize].mtime_ns, dir_mtime_ns);
        if before == 0 || before == dir_mtime_ns || self.previous_scan_started_ns == 0 {
            return;
        }
        let since_scan = self.previous_scan_started_ns;
        for file in files.iter().filter(|f| f.wal == WalStamp::NONE) {
            let Some(id) = self.find_record(dir, file.name.as_bytes()) else {
                continue;
            };
            if diff.added.contains(&id) || diff.changed.contains(&id) {
                continue;
            }
            // An empty file holds nothing yet; its first write shows in its `-wal`.
            let modified = std::fs::metadata(self.path(id)).is_ok_and(|m| {
                let ns = mtime_ns(&m);
                m.len() > 0 && (ns > before || ns >= since_scan)
            });
            if modified {
                diff.changed.push(id);
            }
        }
    }

    fn insert(&mut self, dir: u32, file: &FoundFile) -> Option<DbId> {
        let leaf = self.leaves.intern(file.name.as_bytes())?;
        let flags = FLAG_LIVE | FLAG_SEEN;
        let wal = wal_fingerprint(file.wal);
        let id = match self.free.pop() {
            Some(id) => {
                let i = id as usize;
                self.rec_dir[i] = dir;
                self.rec_leaf[i] = leaf;
                self.rec_wal[i] = wal;
                self.rec_flags[i] = flags;
                id
            }
            None => {
                let id = u32::try_from(self.rec_flags.len())
                    .ok()
                    .filter(|&id| id != NONE)?;
                self.rec_dir.push(dir);
                self.rec_leaf.push(leaf);
                self.rec_ino.push(0);
                self.rec_wal.push(wal);
                self.rec_flags.push(flags);
                id
            }
        };
        self.set_ino(id, file.ino);
        self.live += 1;
        self.scan_dirty = true;
        Some(id)
    }

    /// Ends a scan: databases not seen are removed, except those below a directory the scan
    /// could not read (`unreadable`, full paths), which are kept as they were.
    pub fn end_scan(&mut self, unreadable: &[String], diff: &mut Diff) {
        let unseen: Vec<DbId> = (0..self.rec_flags.len() as u32)
            .filter(|&id| self.rec_flags[id as usize] & (FLAG_LIVE | FLAG_SEEN) == FLAG_LIVE)
            .collect();
        for id in unseen {
            let path = self.path(id);
            let below = |dir: &String| {
                path.strip_prefix(dir.as_str())
                    .is_some_and(|r| r.starts_with('/'))
            };
            if unreadable.iter().any(below) {
                continue;
            }
            self.remove(id);
            diff.removed.push(path);
        }
        self.leaves.drop_index();
        if self.scan_dirty {
            self.rebuild_path_index();
            self.rebuild_inode_index();
            self.shrink();
            self.scan_dirty = false;
        }
    }

    /// Removal leaves `by_path` stale until the rebuild that ends the scan: lookups check
    /// liveness, and a freed id is reused only by a later scan.
    fn remove(&mut self, id: DbId) {
        self.rec_flags[id as usize] = 0;
        self.ino_high.remove(&id);
        self.free.push(id);
        self.live -= 1;
        self.scan_dirty = true;
    }

    /// Groups live ids by directory (a counting sort: linear, no hashing) and sorts each
    /// directory's few names.
    fn rebuild_path_index(&mut self) {
        let dirs = self.dirs.len();
        let mut first = std::mem::take(&mut self.dir_first);
        first.clear();
        first.resize(dirs + 1, 0);
        for id in self.ids() {
            first[self.rec_dir[id as usize] as usize + 1] += 1;
        }
        for d in 0..dirs {
            first[d + 1] += first[d];
        }
        let mut next = first.clone();
        let mut by_path = std::mem::take(&mut self.by_path);
        by_path.clear();
        by_path.resize(self.live, 0);
        for id in self.ids() {
            let slot = &mut next[self.rec_dir[id as usize] as usize];
            by_path[*slot as usize] = id;
            *slot += 1;
        }
        drop(next);
        for d in 0..dirs {
            let group = &mut by_path[first[d] as usize..first[d + 1] as usize];
            if group.len() > 1 {
                group.sort_unstable_by(|&a, &b| self.leaf_name(a).cmp(self.leaf_name(b)));
            }
        }
        self.by_path = by_path;
        self.dir_first = first;
    }

    fn rebuild_inode_index(&mut self) {
        let mut index: Vec<DbId> = std::mem::take(&mut self.by_inode);
        index.clear();
        index.extend(self.ids());
        index.sort_unstable_by_key(|&id| (self.dev(id), self.ino(id)));
        self.by_inode = index;
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

    fn dev(&self, id: DbId) -> u64 {
        self.dirs[self.rec_dir[id as usize] as usize].dev
    }

    /// The directory ids (below the root) that hold at least one live database, ascending.
    pub fn leaf_dirs(&self) -> Vec<u32> {
        let mut has = vec![false; self.dirs.len()];
        for id in self.ids() {
            has[self.rec_dir[id as usize] as usize] = true;
        }
        (0..self.dirs.len() as u32)
            .filter(|&d| has[d as usize])
            .collect()
    }

    /// The full path of directory `dir` (an id from [`Arena::leaf_dirs`]).
    pub fn dir_path(&self, dir: u32) -> String {
        let mut names = Vec::new();
        let mut at = dir;
        while at != 0 {
            let node = self.dirs[at as usize];
            names.push(std::str::from_utf8(self.dir_names.get(node.name)).unwrap_or(""));
            at = node.parent;
        }
        let mut path = self.root.clone();
        for name in names.iter().rev() {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(name);
        }
        if path.is_empty() {
            path.push('.');
        }
        path
    }

    /// The database named `name` in directory `dir`, if discovered.
    pub fn find_in_dir(&self, dir: u32, name: &[u8]) -> Option<DbId> {
        if dir as usize >= self.dirs.len() {
            return None;
        }
        self.find_record(dir, name).filter(|&id| self.is_live(id))
    }

    /// The database at `path`, if discovered.
    pub fn lookup_path(&self, path: &str) -> Option<DbId> {
        let rest = if self.root.is_empty() {
            path.trim_start_matches("./")
        } else {
            path.strip_prefix(self.root.as_str())?.strip_prefix('/')?
        };
        let (dir_part, leaf) = match rest.rsplit_once('/') {
            Some((d, l)) => (Some(d), l),
            None => (None, rest),
        };
        let components: Vec<&str> = dir_part.map(|d| d.split('/').collect()).unwrap_or_default();
        let dir = self.find_dir(&components)?;
        self.find_record(dir, leaf.as_bytes())
    }

    /// The database with this device and inode, as the extension names databases.
    pub fn lookup_inode(&self, dev: u64, ino: u64) -> Option<DbId> {
        let key = (dev, ino);
        let at = self
            .by_inode
            .binary_search_by_key(&key, |&id| (self.dev(id), self.ino(id)))
            .ok()?;
        self.by_inode
            .get(at)
            .copied()
            .filter(|&id| self.is_live(id))
    }

    /// The path components of `id` below the root, outermost first.
    pub fn components(&self, id: DbId) -> Vec<&str> {
        let mut out = Vec::new();
        let leaf = self.leaves.get(self.rec_leaf[id as usize]);
        out.push(std::str::from_utf8(leaf).unwrap_or(""));
        let mut dir = self.rec_dir[id as usize];
        while dir != 0 {
            let node = self.dirs[dir as usize];
            out.push(std::str::from_utf8(self.dir_names.get(node.name)).unwrap_or(""));
            dir = node.parent;
        }
        out.reverse();
        out
    }

    /// The full path of `id`, rebuilt from the interned names.
    pub fn path(&self, id: DbId) -> String {
        let components = self.components(id);
        let mut path = String::with_capacity(self.root.len() + 64);
        path.push_str(&self.root);
        for component in components {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(component);
        }
        path
    }

    pub fn inode(&self, id: DbId) -> (u64, u64) {
        (self.dev(id), self.ino(id))
    }

    /// Whether `stamp` is the `-wal` stamp recorded for `id` (up to the fingerprint's
    /// 32 bits, see [`wal_fingerprint`]).
    pub fn same_wal(&self, id: DbId, stamp: WalStamp) -> bool {
        self.rec_wal[id as usize] == wal_fingerprint(stamp)
    }

    /// Whether `id` had a `-wal` when it was last seen.
    pub fn has_wal(&self, id: DbId) -> bool {
        self.rec_wal[id as usize] != 0
    }

    /// Records the `-wal` stamp the agent saw when it last replicated `id`, so the next scan
    /// reports a change only for writes after that.
    pub fn set_wal(&mut self, id: DbId, stamp: WalStamp) {
        self.rec_wal[id as usize] = wal_fingerprint(stamp);
    }

    pub fn tier(&self, id: DbId) -> Tier {
        if self.rec_flags[id as usize] & FLAG_HOT != 0 {
            Tier::Hot
        } else {
            Tier::Cold
        }
    }

    /// Marks `id` hot, or not hot (any other tier: the arena keeps one bit).
    pub fn set_tier(&mut self, id: DbId, tier: Tier) {
        let flags = &mut self.rec_flags[id as usize];
        if tier == Tier::Hot {
            *flags |= FLAG_HOT;
        } else {
            *flags &= !FLAG_HOT;
        }
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
