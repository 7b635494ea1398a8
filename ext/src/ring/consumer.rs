//! The consumer's side (the agent, and `multidb ring tail`): pop records in order, free
//! slots, skip what dead or buggy producers left, sleep on the futex, beat the heart.

use std::sync::atomic::Ordering;

use super::futex::futex_wait;
use super::layout::off;
use super::*;

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

impl Ring<'_> {
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
            if entry.tier != Tier::Empty {
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
        if seq == t.wrapping_add(1) {
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
                .compare_exchange(
                    t,
                    t.wrapping_add(self.slots),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                return Pop::Pending; // published just now; read it next time
            }
            tail_field.store(t.wrapping_add(1), Ordering::Release);
            self.u64_at(off::SKIPPED).fetch_add(1, Ordering::Relaxed);
            consumer.stuck_since_ns = None;
            consumer.in_stuck_run = true;
            return Pop::Skipped;
        }
        // Neither free nor published: the slot holds garbage. Count, reset and move on.
        self.seq(t)
            .store(t.wrapping_add(self.slots), Ordering::Release);
        tail_field.store(t.wrapping_add(1), Ordering::Release);
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
            tail_field.store(t.wrapping_add(1), Ordering::Release);
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
            let all_published = (1..=cont).all(|i| {
                let ticket = t.wrapping_add(i);
                self.seq(ticket).load(Ordering::Acquire) == ticket.wrapping_add(1)
            });
            let mut path = Vec::with_capacity(words[4] as usize);
            if all_published {
                for i in 1..=cont {
                    for j in 0..CONT_BYTES / 8 {
                        path.extend_from_slice(
                            &self
                                .word(t.wrapping_add(i), j)
                                .load(Ordering::Relaxed)
                                .to_ne_bytes(),
                        );
                    }
                }
                path.truncate(words[4] as usize);
            }
            if !all_published || path_hash(&path) != words[3] {
                self.release(t, 1);
                tail_field.store(t.wrapping_add(1), Ordering::Release);
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
        tail_field.store(t.wrapping_add(nslots), Ordering::Release);
        Pop::Record(record)
    }

    fn release(&self, t: u64, n: u64) {
        for i in 0..n {
            let ticket = t.wrapping_add(i);
            self.seq(ticket)
                .store(ticket.wrapping_add(self.slots), Ordering::Release);
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
        if self.seq(t).load(Ordering::SeqCst) == t.wrapping_add(1) {
            sleeping.store(0, Ordering::SeqCst);
            return;
        }
        futex_wait(wake, observed, timeout);
        sleeping.store(0, Ordering::SeqCst);
    }
}
