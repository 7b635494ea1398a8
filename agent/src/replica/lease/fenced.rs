//! A held `Lease` (taken, renewed, released) and `Leased`, the replica client it fences.

use super::*;

/// A held lease on one location.
pub struct Lease {
    client: Box<dyn ReplicaClient>,
    me: Holder,
    ttl: Duration,
    /// The version of our newest write, for the next compare-and-swap.
    tag: Mutex<String>,
    /// When the last successful renewal was sent ([`mono_ns`]).
    renewed_ns: AtomicU64,
    pub(super) lost: AtomicBool,
    /// Renewals that failed in a row, for the log: the 1st, 2nd, 4th, 8th… are logged.
    pub(super) failed_renewals: std::sync::atomic::AtomicU32,
    /// Since when no writer holds it ([`mono_ns`]; 0 while one does), for the keeper.
    pub(super) idle_since_ns: AtomicU64,
    /// What the lease said when this process took it: every writer that shares it must
    /// know whether another host wrote before (a maintenance pass may take it first).
    pub(super) previous: Previous,
}

impl Lease {
    /// Takes the lease on `client`'s location: creates it, takes over one that expired or was
    /// released, or adopts one of this host's (a previous run of this state directory: one
    /// agent per state directory, so it is dead). Refuses a live lease of another host.
    pub fn acquire(
        client: Box<dyn ReplicaClient>,
        me: &Holder,
        ttl: Duration,
    ) -> Result<(Lease, Previous), LeaseError> {
        let location = client.url();
        // Our last conditional write, when it reported a failed condition: a retried request
        // whose first attempt landed sees its own object.
        let mut attempt: Option<(Vec<u8>, u64, Previous)> = None;
        for _ in 0..4 {
            let sent = mono_ns();
            let body = LeaseBody::new(me, ttl, false).to_bytes();
            let stored = client.read_lease()?;
            if let (Some(stored), Some((mine, mine_sent, previous))) = (&stored, &attempt) {
                if &stored.body == mine {
                    return Ok((
                        Lease::held(client, me, ttl, stored.tag.clone(), *mine_sent, *previous),
                        *previous,
                    ));
                }
            }
            let (expected, previous) = match stored {
                None => (None, Previous::None),
                Some(stored) => {
                    let current =
                        LeaseBody::parse(&stored.body).map_err(|why| LeaseError::Unreadable {
                            location: location.clone(),
                            why,
                        })?;
                    // A live lease is refused when it is another host's, or this host's but
                    // held by another running process (two `multidb replicate` runs without a
                    // state directory share the machine's id). This host's otherwise is a
                    // previous run's (dead: one agent per state directory), adopted.
                    let ours = current.host_id == me.host_id;
                    let remaining = current.remaining();
                    let live_elsewhere = !remaining.is_zero()
                        && (!ours
                            || (current.pid != me.pid
                                && current.hostname == me.hostname
                                && process_alive(current.pid)));
                    if live_elsewhere {
                        return Err(LeaseError::Held {
                            location,
                            holder: current.describe(),
                            remaining,
                        });
                    }
                    let previous = if ours {
                        Previous::Ours
                    } else {
                        Previous::Foreign
                    };
                    (Some(stored.tag), previous)
                }
            };
            if let Some(tag) = client.write_lease(&body, expected.as_deref())? {
                return Ok((Lease::held(client, me, ttl, tag, sent, previous), previous));
            }
            // Someone else wrote meanwhile, or our own retried request did: look again.
            attempt = Some((body, sent, previous));
        }
        Err(LeaseError::Contended { location })
    }

    fn held(
        client: Box<dyn ReplicaClient>,
        me: &Holder,
        ttl: Duration,
        tag: String,
        sent: u64,
        previous: Previous,
    ) -> Lease {
        Lease {
            client,
            me: me.clone(),
            ttl,
            tag: Mutex::new(tag),
            renewed_ns: AtomicU64::new(sent),
            failed_renewals: std::sync::atomic::AtomicU32::new(0),
            lost: AtomicBool::new(false),
            idle_since_ns: AtomicU64::new(0),
            previous,
        }
    }

    /// The location, for messages.
    pub fn location(&self) -> String {
        self.client.url()
    }

    /// Whether writes may go on: the lease was renewed recently enough and not lost. Checked
    /// before every write to the replica.
    pub fn fence(&self) -> Result<(), ReplicaError> {
        let age =
            Duration::from_nanos(mono_ns().saturating_sub(self.renewed_ns.load(Ordering::Acquire)));
        if self.lost.load(Ordering::Acquire) || age >= fence_after(self.ttl) {
            return Err(ReplicaError::LeaseLost {
                location: self.location(),
                age_ms: age.as_millis() as u64,
            });
        }
        Ok(())
    }

    pub(super) fn renew_due(&self) -> bool {
        let age = mono_ns().saturating_sub(self.renewed_ns.load(Ordering::Acquire));
        Duration::from_nanos(age) >= renew_after(self.ttl)
    }

    /// Extends the lease by a TTL. On a failed compare-and-swap the lease is lost for good
    /// (another host took it); a transport error leaves it to the next attempt.
    pub fn renew(&self) -> Result<(), LeaseError> {
        self.swap(false)
    }

    /// Hands the lease over: marks it lost here first (no write may start after), then
    /// writes it back as released so the next owner need not wait for expiry.
    pub fn release(&self) -> Result<(), LeaseError> {
        if self.lost.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.swap(true)
    }

    pub(super) fn swap(&self, released: bool) -> Result<(), LeaseError> {
        let sent = mono_ns();
        let body = LeaseBody::new(&self.me, self.ttl, released).to_bytes();
        let mut tag = self.tag.lock().unwrap_or_else(|e| e.into_inner());
        let written = match self.client.write_lease(&body, Some(&tag))? {
            Some(new) => Some(new),
            // A retried request whose first attempt landed: the object is our write.
            None => self
                .client
                .read_lease()?
                .filter(|s| s.body == body)
                .map(|s| s.tag),
        };
        match written {
            Some(new) => {
                *tag = new;
                if !released {
                    self.renewed_ns.store(sent, Ordering::Release);
                }
                Ok(())
            }
            None => {
                self.lost.store(true, Ordering::Release);
                Err(LeaseError::Contended {
                    location: self.location(),
                })
            }
        }
    }

    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// A replica client whose writes are fenced by a lease: a writer that lost its lease (or
/// could not renew it in time) writes nothing more.
pub struct Leased {
    inner: Box<dyn ReplicaClient>,
    lease: Arc<Lease>,
}

impl Leased {
    pub fn new(inner: Box<dyn ReplicaClient>, lease: Arc<Lease>) -> Leased {
        Leased { inner, lease }
    }
}

impl ReplicaClient for Leased {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn location(&self, level: u8, min: u64, max: u64) -> String {
        self.inner.location(level, min, max)
    }
    fn list(&self, level: u8) -> Result<Vec<crate::replica::FileInfo>, ReplicaError> {
        self.inner.list(level)
    }
    fn put(&self, level: u8, min: u64, max: u64, src: &Path) -> Result<(), ReplicaError> {
        self.lease.fence()?;
        self.inner.put(level, min, max, src)
    }
    fn local_path(&self, level: u8, min: u64, max: u64) -> Option<std::path::PathBuf> {
        self.inner.local_path(level, min, max)
    }
    fn get(&self, level: u8, min: u64, max: u64, dst: &mut dyn Write) -> Result<(), ReplicaError> {
        self.inner.get(level, min, max, dst)
    }
    fn delete(&self, files: &[crate::replica::FileInfo]) -> Result<(), ReplicaError> {
        self.lease.fence()?;
        self.inner.delete(files)
    }
    fn read_identity(&self) -> Result<Option<Vec<u8>>, ReplicaError> {
        self.inner.read_identity()
    }
    fn exists(&self) -> Result<bool, ReplicaError> {
        self.inner.exists()
    }
    fn create_identity(&self, body: &[u8]) -> Result<bool, ReplicaError> {
        self.lease.fence()?;
        self.inner.create_identity(body)
    }
    fn replace_identity(&self, body: &[u8]) -> Result<(), ReplicaError> {
        self.lease.fence()?;
        self.inner.replace_identity(body)
    }
    fn read_lease(&self) -> Result<Option<Stored>, ReplicaError> {
        self.inner.read_lease()
    }
    fn write_lease(
        &self,
        body: &[u8],
        expected: Option<&str>,
    ) -> Result<Option<String>, ReplicaError> {
        self.inner.write_lease(body, expected)
    }
    fn leased(&self) -> bool {
        true
    }
}
