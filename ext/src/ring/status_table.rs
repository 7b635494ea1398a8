//! The status table: per database (device, inode) the agent's published state, written by
//! the agent alone and read by applications, each entry behind a sequence lock so a reader
//! never sees a torn entry; linear probing over a full-avalanche hash.

use std::sync::atomic::{fence, Ordering};

use super::*;

impl Ring<'_> {
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
                if entry.tier == Tier::Empty {
                    return None;
                }
                if entry.tier != Tier::Tombstone && entry.dev == dev && entry.ino == ino {
                    return Some(entry);
                }
                break;
            }
        }
        None
    }

    pub(super) fn read_status(&self, base: usize) -> Status {
        let w = |i: usize| self.u64_at(base + 8 + 8 * i).load(Ordering::Relaxed);
        Status {
            tier: Tier::from_u32(self.u32_at(base + 4).load(Ordering::Relaxed)),
            dev: w(0),
            ino: w(1),
            replicated_txid: w(2),
            replicated_frames: w(3),
            last_sync_ns: w(4),
            pending_since_ns: w(5),
            reason: self.u32_at(base + 56).load(Ordering::Relaxed),
        }
    }

    /// Publishes (or updates) the status of (dev, ino). Single writer only: the agent.
    /// Returns false if the probe window is full.
    pub fn publish_status(&self, status: &Status) -> bool {
        let start = (mix(status.dev, status.ino) as usize) % self.status_entries;
        let mut free = None;
        for probe in 0..MAX_PROBE.min(self.status_entries) {
            let index = (start + probe) % self.status_entries;
            let entry = self.read_status(self.status_offset(index));
            if entry.tier != Tier::Empty
                && entry.tier != Tier::Tombstone
                && entry.dev == status.dev
                && entry.ino == status.ino
            {
                self.write_status(index, status);
                return true;
            }
            if entry.tier == Tier::Tombstone && free.is_none() {
                free = Some(index);
            }
            if entry.tier == Tier::Empty {
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
            if entry.tier == Tier::Empty {
                return;
            }
            if entry.tier != Tier::Tombstone && entry.dev == dev && entry.ino == ino {
                let tomb = Status {
                    tier: Tier::Tombstone,
                    ..Status::default()
                };
                self.write_status(index, &tomb);
                return;
            }
        }
    }

    pub(super) fn write_status(&self, index: usize, s: &Status) {
        let base = self.status_offset(index);
        let seq = self.u32_at(base);
        let before = seq.load(Ordering::Relaxed);
        seq.store(before | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.u32_at(base + 4)
            .store(s.tier as u32, Ordering::Relaxed);
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
