//! Queries on the arena: a database's path, directory, inode and `-wal` stamp, the
//! databases in a directory, and lookups by path or by (device, inode) for inotify events
//! and rescans; plus the tier each record carries.

use super::*;

impl Arena {
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

    pub(super) fn dev(&self, id: DbId) -> u64 {
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
}
