//! Scanning into the arena: interning the directories on the way to each database, marking
//! what a scan saw, inserting new databases and freeing vanished ones, and rebuilding the
//! path and inode indexes when a scan changed them. Kept apart from the queries because it
//! is the only code that changes the tree.

use super::*;

impl Arena {
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

    pub(super) fn find_dir(&self, components: &[&str]) -> Option<u32> {
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
    pub(super) fn find_record(&self, dir: u32, name: &[u8]) -> Option<DbId> {
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
}
