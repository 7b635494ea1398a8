//! `LeaseKeeper`: holds this process's leases, renews them on its own thread, releases idle ones.

use super::*;

/// A lease no writer holds is released after this long: a database demoted and promoted
/// again at once (or a maintenance pass right after a demotion) keeps it without a request.
const IDLE_RELEASE_AFTER: Duration = Duration::from_secs(1);

/// Longest time one keeper pass spends releasing, so renewals are never far behind (a
/// release on a busy disk costs two fsyncs).
const RELEASE_BUDGET: Duration = Duration::from_millis(250);

/// How long a clean stop waits for writers still using a lease before leaving it to expire.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// How often the keeper looks at its leases, at most: renewals are due every third of the TTL
/// and a failed one is tried again at the next look.
const KEEPER_TICK_MAX: Duration = Duration::from_secs(1);

/// Renewals in flight at once, at most: enough that a thousand leases on a store that
/// answers in 100 ms renew in about 6 s, a fifth of the default TTL.
pub(super) const RENEW_THREADS: usize = 16;

/// Holds this process's leases, one per location however many writers share it (a
/// replicator and a maintenance pass), renews them on a thread of its own (so a renewal
/// never delays a commit's upload), and releases a lease once no writer holds it.
#[derive(Clone)]
pub struct LeaseKeeper {
    inner: Arc<KeeperInner>,
}

struct KeeperInner {
    me: Holder,
    ttl: Duration,
    held: Mutex<HashMap<String, Arc<Lease>>>,
    /// Serialises taking the lease of one location (by a hash of its URL).
    acquiring: Vec<Mutex<()>>,
    /// Held through each pass of the renewal thread, so that [`LeaseKeeper::release_all`]
    /// waits for a release in flight instead of exiting under it.
    pass: Mutex<()>,
    stop: AtomicBool,
}

/// Stripes of [`KeeperInner::acquiring`]: enough that sync workers taking leases of
/// different locations rarely wait for each other.
const ACQUIRE_STRIPES: usize = 64;

fn stripe_of(key: &str) -> usize {
    (crate::ltx::checksum_page(0, key.as_bytes()) % ACQUIRE_STRIPES as u64) as usize
}

impl LeaseKeeper {
    /// A keeper for `me` with leases of `ttl`, and its renewal thread.
    pub fn start(me: Holder, ttl: Duration) -> std::io::Result<LeaseKeeper> {
        let inner = Arc::new(KeeperInner {
            me,
            ttl,
            held: Mutex::new(HashMap::new()),
            acquiring: (0..ACQUIRE_STRIPES).map(|_| Mutex::new(())).collect(),
            pass: Mutex::new(()),
            stop: AtomicBool::new(false),
        });
        let keeper = LeaseKeeper { inner };
        let renewing = keeper.clone();
        let tick = (ttl / 10).clamp(Duration::from_millis(50), KEEPER_TICK_MAX);
        std::thread::Builder::new()
            .name("leases".into())
            .spawn(move || {
                while !renewing.inner.stop.load(Ordering::Acquire) {
                    std::thread::sleep(tick);
                    renewing.look_after();
                }
            })?;
        Ok(keeper)
    }

    pub fn holder(&self) -> &Holder {
        &self.inner.me
    }

    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// A client for `url` whose writes are fenced by this process's lease there, taking the
    /// lease if this process does not hold it yet, and what the previous lease said.
    pub fn lease(
        &self,
        url: &ReplicaUrl,
    ) -> Result<(Box<dyn ReplicaClient>, Previous), LeaseError> {
        let client = url.client()?;
        let key = client.url();
        // Two writers of one location in this process must not both take it (the second
        // would adopt "ours" and leave the first with a stale version): one stripe lock per
        // location for the remote part, the map's lock only around the map.
        let stripe = &self.inner.acquiring[stripe_of(&key)];
        let _one_at_a_time = stripe.lock().unwrap_or_else(|e| e.into_inner());
        // After `release_all` a late writer (a maintenance pass still running) must not take
        // the lease back and leave it live behind the process.
        if self.inner.stop.load(Ordering::Acquire) {
            return Err(LeaseError::Stopped { location: key });
        }
        if let Some(lease) = self.held().get(&key).filter(|l| !l.lost()) {
            let previous = lease.previous;
            return Ok((Box::new(Leased::new(client, lease.clone())), previous));
        }
        let (lease, previous) = Lease::acquire(url.client()?, &self.inner.me, self.inner.ttl)?;
        let lease = Arc::new(lease);
        self.held().insert(key, lease.clone());
        tracing::debug!(replica = %lease.location(), ?previous, "lease taken");
        Ok((Box::new(Leased::new(client, lease)), previous))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Lease>>> {
        self.inner.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One pass: forget what was lost, renew what is due, then release what no writer has
    /// held for [`IDLE_RELEASE_AFTER`], for at most [`RELEASE_BUDGET`]: a late renewal stops
    /// writes, a late release only keeps another host waiting a little.
    fn look_after(&self) {
        let _pass = self.inner.pass.lock().unwrap_or_else(|e| e.into_inner());
        if self.inner.stop.load(Ordering::Acquire) {
            return;
        }
        let now = mono_ns();
        let mut idle = Vec::new();
        let mut due = Vec::new();
        {
            let mut held = self.held();
            held.retain(|_, lease| !lease.lost());
            for (key, lease) in held.iter() {
                if Arc::strong_count(lease) == 1 {
                    let since = lease.idle_since_ns.load(Ordering::Acquire);
                    if since == 0 {
                        lease.idle_since_ns.store(now, Ordering::Release);
                    } else if Duration::from_nanos(now.saturating_sub(since)) >= IDLE_RELEASE_AFTER
                    {
                        idle.push(key.clone());
                    }
                } else {
                    lease.idle_since_ns.store(0, Ordering::Release);
                }
                if lease.renew_due() {
                    due.push(lease.clone());
                }
            }
        }
        renew_all(&due);
        let budget_end = Instant::now() + RELEASE_BUDGET;
        for key in idle {
            if Instant::now() >= budget_end {
                break; // the rest at the next pass
            }
            let lease = {
                let mut held = self.held();
                match held.get(&key) {
                    Some(lease) if Arc::strong_count(lease) == 1 => held.remove(&key),
                    _ => None,
                }
            };
            let Some(lease) = lease else { continue };
            match lease.release() {
                Ok(()) => tracing::debug!(replica = %lease.location(), "lease released"),
                // Taken again by a writer of this process meanwhile: it is that writer's now.
                Err(e @ LeaseError::Contended { .. }) => {
                    tracing::debug!(replica = %lease.location(), error = %e, "lease not released: taken again")
                }
                Err(e) => {
                    tracing::warn!(replica = %lease.location(), error = %e, "releasing a lease failed; it expires on its own")
                }
            }
        }
    }

    /// Releases every lease (at a clean stop) and ends the renewal thread. No write starts
    /// once this begins (every lease is marked lost first); a lease whose writer is still
    /// in the middle of one (a maintenance pass, a sync the stop gave up waiting for) is
    /// released once that writer lets go, or, after [`RELEASE_WAIT`], left to expire:
    /// released under a write in flight, another host could start before it lands.
    pub fn release_all(&self) {
        self.inner.stop.store(true, Ordering::Release);
        let _pass = self.inner.pass.lock().unwrap_or_else(|e| e.into_inner());
        let leases: Vec<Arc<Lease>> = self.held().drain().map(|(_, l)| l).collect();
        for lease in &leases {
            lease.lost.store(true, Ordering::Release);
        }
        let deadline = Instant::now() + RELEASE_WAIT;
        for lease in leases {
            while Arc::strong_count(&lease) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if Arc::strong_count(&lease) > 1 {
                tracing::warn!(replica = %lease.location(), "a write was still in flight at the stop; its lease is left to expire");
                continue;
            }
            if let Err(e) = lease.swap(true) {
                tracing::warn!(replica = %lease.location(), error = %e, "releasing a lease failed; it expires on its own");
            }
        }
    }
}

/// Renews `due` leases on up to [`RENEW_THREADS`] threads: one at a time, a thousand hot
/// databases on a store that answers in 30 ms would take 30 s, past the fence of a 30 s TTL,
/// and the agent would stop writing its own replicas.
pub(super) fn renew_all(due: &[Arc<Lease>]) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let renew_some = || {
        while let Some(lease) = due.get(next.fetch_add(1, Ordering::Relaxed)) {
            match lease.renew() {
                Ok(()) => {
                    let failed = lease.failed_renewals.swap(0, Ordering::Relaxed);
                    if failed > 0 {
                        tracing::info!(replica = %lease.location(), failed, "lease renewed again");
                    }
                }
                Err(e) if lease.lost() => {
                    tracing::error!(replica = %lease.location(), error = %e, "lease lost: another writer took the location; this agent stops writing it");
                }
                Err(e) => {
                    // A store that stays down fails every renewal at each tick: the log
                    // gets the 1st, 2nd, 4th, 8th… in a row.
                    let failed = lease.failed_renewals.fetch_add(1, Ordering::Relaxed) + 1;
                    if failed.is_power_of_two() {
                        tracing::warn!(replica = %lease.location(), error = %e, failed, "renewing a lease failed; trying again");
                    }
                }
            }
        }
    };
    let threads = due.len().min(RENEW_THREADS);
    if threads <= 1 {
        return renew_some();
    }
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(renew_some);
        }
        renew_some();
    });
}
