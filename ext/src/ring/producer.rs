//! The producers' side (applications, through the WAL hook): claim slots with one CAS, write,
//! publish; never wait, allocate or make a system call, except one futex wake when the agent
//! sleeps.

use std::sync::atomic::Ordering;

use super::futex::futex_wake;
use super::layout::off;
use super::*;

impl Ring<'_> {
    /// Claims `k` consecutive tickets, or `None` when the ring is full or contention persists.
    #[inline]
    pub(super) fn claim(&self, k: u64) -> Option<u64> {
        if k == 0 || k > self.slots {
            return None;
        }
        let head = self.u64_at(off::HEAD);
        for _ in 0..MAX_CLAIM_ATTEMPTS {
            let pos = head.load(Ordering::Relaxed);
            let mut stale = false;
            for i in 0..k {
                let seq = self.seq(pos.wrapping_add(i)).load(Ordering::Acquire);
                if seq != pos.wrapping_add(i) {
                    if seq < pos.wrapping_add(i) {
                        return None; // the consumer has not freed this slot: full
                    }
                    stale = true; // another producer moved on; reload head
                    break;
                }
            }
            if !stale
                && head
                    .compare_exchange_weak(
                        pos,
                        pos.wrapping_add(k),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                return Some(pos);
            }
            std::hint::spin_loop();
        }
        None
    }

    /// Publishes ticket `t`; fails if the consumer abandoned it meanwhile.
    #[inline]
    pub(super) fn publish(&self, t: u64) -> bool {
        self.seq(t)
            .compare_exchange(t, t.wrapping_add(1), Ordering::Release, Ordering::Relaxed)
            .is_ok()
    }

    fn count_drop(&self) {
        self.u64_at(off::DROPPED).fetch_add(1, Ordering::Relaxed);
    }

    /// Posts a commit record. Never blocks, allocates or makes a system call, except one
    /// futex wake when the consumer is asleep. A record that cannot be posted is counted in
    /// `dropped`. Returns whether it was posted.
    #[inline]
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

    #[inline]
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
            let ticket = t.wrapping_add(1 + i as u64);
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
            ok &= self.publish(t.wrapping_add(i));
        }
        ok &= self.publish(t);
        if ok {
            self.wake_consumer();
        }
        ok
    }

    /// Wakes the consumer only if it said it is going to sleep: steady traffic makes no
    /// system calls.
    #[inline]
    fn wake_consumer(&self) {
        let sleeping = self.u32_at(off::SLEEPING);
        if sleeping.load(Ordering::SeqCst) != 0 && sleeping.swap(0, Ordering::SeqCst) != 0 {
            let wake = self.u32_at(off::WAKE);
            wake.fetch_add(1, Ordering::SeqCst);
            futex_wake(wake);
        }
    }
}
