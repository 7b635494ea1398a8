//! One owner per replica location, across hosts: a lease object at the replica's root.
//!
//! While an agent (or `multidb replicate`) writes a location it holds `multidb.lease` there,
//! naming its host id, host name, pid and an expiry. It is taken with a conditional create
//! (`If-None-Match: *` on S3), renewed and taken over with a compare-and-swap on its version
//! (`If-Match: <etag>` on S3; on a directory a check and a rename under a lock directory,
//! see `FileReplica::write_lease`), and
//! released by writing it back as `released` (never deleted: the next owner must see that
//! another host wrote here, so that it trusts the replica, not its own saved position).
//!
//! A writer checks its lease before each write (the fence): once it could not renew for
//! [`fence_after`] of the TTL it writes nothing, so a put it starts still lands well before
//! another host may take over at expiry. Host ids come from the state directory, so two agents
//! with two state directories on one machine are two hosts.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use super::{ReplicaClient, ReplicaError, ReplicaUrl};

mod fenced;
mod keeper;

pub use fenced::{Lease, Leased};
pub use keeper::LeaseKeeper;

/// The lease object's name at a replica's root. Litestream ignores it (it lists only levels).
pub const LEASE_NAME: &str = "multidb.lease";

/// The lease TTL when the configuration does not say (`lease_ttl`): long enough that a slow
/// store's renewal, retried, fits well inside it; short enough that a tenant whose host died
/// moves on within half a minute.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

/// The host id's file in the state directory: one random id per state directory, so two
/// agents on one machine with two state directories are two hosts.
pub const HOST_ID_FILE: &str = "host-id";

/// A lease is renewed once this fraction of its TTL has passed since the last renewal was
/// sent: two more attempts fit before writes stop at [`fence_after`].
pub fn renew_after(ttl: Duration) -> Duration {
    ttl / 3
}

/// Writes stop this long after the last successful renewal was sent: the last third of the
/// TTL is left for a write that started just before to land before another host may take
/// over, and for clocks that disagree a little.
pub fn fence_after(ttl: Duration) -> Duration {
    ttl * 2 / 3
}

/// Who holds a lease: this process, on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Random, kept in the state directory (or made for one `multidb replicate` run).
    pub host_id: String,
    pub hostname: String,
    pub pid: u32,
    /// When this process started (Unix ms), to tell two runs of one host apart in messages.
    pub started_ms: i64,
}

impl Holder {
    /// This process, with the host id kept in `state_dir` (created once, 0600), or the
    /// machine's id when there is no state directory (`multidb replicate` without one: a run
    /// killed on this machine does not lock the next run out for a TTL).
    pub fn of_process(state_dir: Option<&Path>) -> std::io::Result<Holder> {
        let host_id = match state_dir {
            Some(dir) => host_id(dir)?,
            None => machine_id(),
        };
        Ok(Holder {
            host_id,
            hostname: hostname(),
            pid: std::process::id(),
            started_ms: process_start_ms(),
        })
    }
}

/// This host's name, for messages (`/proc/sys/kernel/hostname`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn process_start_ms() -> i64 {
    static STARTED: OnceLock<i64> = OnceLock::new();
    *STARTED.get_or_init(|| crate::ltx::unix_millis(SystemTime::now()))
}

/// `/etc/machine-id` (systemd's stable random id), or one derived from the host name.
fn machine_id() -> String {
    let id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let id = id.trim();
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return id.to_ascii_lowercase();
    }
    let name = hostname();
    format!(
        "{:016x}{:016x}",
        crate::ltx::checksum_page(1, name.as_bytes()),
        crate::ltx::checksum_page(2, name.as_bytes())
    )
}

/// Whether a process with this pid runs on this machine (a zombie or another user's process
/// counts: only "no such process" says it is gone).
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH))
}

fn random_hex() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The host id kept in `state_dir/host-id`, made on first use (exclusively, 0600).
pub fn host_id(state_dir: &Path) -> std::io::Result<String> {
    crate::replicate::state::private_dir(state_dir)?;
    let path = state_dir.join(HOST_ID_FILE);
    let valid = |text: &str| {
        let id = text.trim();
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return valid(&text).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{} is not a host id (32 hex digits); remove it to make a new one",
                        path.display()
                    ),
                )
            })
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let id = random_hex()?;
    match super::create_new(&path, 0o600) {
        Ok(mut file) => {
            file.write_all(format!("{id}\n").as_bytes())?;
            file.sync_all()?;
            Ok(id)
        }
        // Made by a racing process meanwhile: that one counts.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(&path)?;
            valid(&text).ok_or_else(|| std::io::Error::other("host id being written"))
        }
        Err(e) => Err(e),
    }
}

/// A lease object as stored, with its version (S3's ETag; a checksum of a file's bytes).
#[derive(Debug, Clone)]
pub struct Stored {
    pub body: Vec<u8>,
    pub tag: String,
}

/// What a lease object says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseBody {
    pub host_id: String,
    pub hostname: String,
    pub pid: u32,
    pub started_ms: i64,
    /// The holder's clock when the lease ends, unless renewed (Unix ms).
    pub expires_ms: i64,
    pub ttl_ms: u64,
    /// Handed over on purpose (a clean stop or demotion, or `multidb release`): free to take.
    pub released: bool,
    /// Makes every write's bytes unique, so a writer recognises its own write after a lost
    /// response.
    pub nonce: u64,
}

impl LeaseBody {
    fn new(me: &Holder, ttl: Duration, released: bool) -> LeaseBody {
        let now = crate::ltx::unix_millis(SystemTime::now());
        LeaseBody {
            host_id: me.host_id.clone(),
            hostname: me.hostname.clone(),
            pid: me.pid,
            started_ms: me.started_ms,
            expires_ms: if released {
                now
            } else {
                now.saturating_add(ttl.as_millis() as i64)
            },
            ttl_ms: ttl.as_millis() as u64,
            released,
            nonce: crate::time::random_u64(),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<LeaseBody, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("{LEASE_NAME} is unreadable: {e}"))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// How long the lease is still live by this host's clock; zero when it has expired or
    /// was released.
    pub fn remaining(&self) -> Duration {
        if self.released {
            return Duration::ZERO;
        }
        let now = crate::ltx::unix_millis(SystemTime::now());
        Duration::from_millis(self.expires_ms.saturating_sub(now).max(0) as u64)
    }

    /// `host NAME (id ID…), pid PID`, for messages.
    pub fn describe(&self) -> String {
        let short: String = self.host_id.chars().take(8).collect();
        format!("host {} (id {short}…), pid {}", self.hostname, self.pid)
    }
}

/// Whether the location was last written under another host's lease, which decides what a new
/// owner may trust: its own saved position only if no other host wrote since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// No lease object: the location is new, or was written before leases.
    None,
    /// The last lease was this host's (this run's or an earlier one's).
    Ours,
    /// The last lease was another host's (expired or released): the replica may have moved on.
    Foreign,
}

/// Why a lease could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("{location}: the replica is leased by {holder} for {} ms more; it is replicated there (this host takes over after expiry or `multidb release`)", remaining.as_millis())]
    Held {
        location: String,
        holder: String,
        remaining: Duration,
    },
    #[error("{location}: {why}; `multidb release` replaces it")]
    Unreadable { location: String, why: String },
    #[error("{location}: the lease keeps changing under this writer")]
    Contended { location: String },
    /// The process is stopping and has released its leases: nothing more is written.
    #[error("{location}: not leased: stopping")]
    Stopped { location: String },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

impl LeaseError {
    /// How long until a held lease expires, for when to look again.
    pub fn remaining(&self) -> Option<Duration> {
        match self {
            LeaseError::Held { remaining, .. } => Some(*remaining),
            _ => None,
        }
    }
}

/// The monotonic clock as nanoseconds since the first use, for an atomic deadline.
fn mono_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What `multidb release` did.
#[derive(Debug)]
pub enum Released {
    /// There was no lease object.
    None,
    /// The lease was expired or released already; now marked released.
    Stale(LeaseBody),
    /// A live lease was released (`force`).
    Live(LeaseBody),
    /// An unreadable lease object was replaced by a released one.
    Unreadable(String),
}

/// Why `multidb release` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{location}: the lease is live, held by {holder} for {} ms more; stop that agent first (it releases on a clean stop), or pass --force if that host is gone", remaining.as_millis())]
    Live {
        location: String,
        holder: String,
        remaining: Duration,
    },
    #[error("{location}: the lease changed while being released; run the command again")]
    Changed { location: String },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// Marks the lease at `client`'s location released, so another host takes the location over
/// at once: a live lease only with `force` (its holder stops writing at its next renewal,
/// which fails).
pub fn release(
    client: &dyn ReplicaClient,
    me: &Holder,
    force: bool,
) -> Result<Released, ReleaseError> {
    let location = client.url();
    let Some(stored) = client.read_lease()? else {
        return Ok(Released::None);
    };
    let current = LeaseBody::parse(&stored.body);
    if let Ok(body) = &current {
        let remaining = body.remaining();
        if !remaining.is_zero() && !force {
            return Err(ReleaseError::Live {
                location,
                holder: body.describe(),
                remaining,
            });
        }
    }
    // The released marker keeps the last holder's host id: the next owner must know that
    // another host wrote here (see `Previous`).
    let marker = match &current {
        Ok(body) => LeaseBody {
            released: true,
            expires_ms: crate::ltx::unix_millis(SystemTime::now()),
            nonce: crate::time::random_u64(),
            ..body.clone()
        },
        // No host's: whoever takes the location next counts it as another host's.
        Err(_) => LeaseBody {
            host_id: String::new(),
            hostname: String::new(),
            ..LeaseBody::new(me, Duration::ZERO, true)
        },
    };
    if client
        .write_lease(&marker.to_bytes(), Some(&stored.tag))?
        .is_none()
    {
        return Err(ReleaseError::Changed { location });
    }
    Ok(match current {
        Ok(body) if body.remaining().is_zero() => Released::Stale(body),
        Ok(body) => Released::Live(body),
        Err(why) => Released::Unreadable(why),
    })
}

/// The version tag of a lease file's bytes on a directory replica: a CRC-64 of them (every
/// body carries a random nonce, so two writes never share one).
pub fn file_tag(bytes: &[u8]) -> String {
    format!("{:016x}", crate::ltx::checksum_page(0, bytes))
}

#[cfg(test)]
mod tests {
    use super::keeper::{renew_all, RENEW_THREADS};
    use super::*;
    use crate::replica::file::FileReplica;

    fn holder(id: &str) -> Holder {
        Holder {
            host_id: id.repeat(32 / id.len()),
            hostname: "test".into(),
            pid: 1,
            started_ms: 0,
        }
    }

    fn client(dir: &Path) -> Box<dyn ReplicaClient> {
        Box::new(FileReplica::new(dir.to_path_buf()))
    }

    #[test]
    fn a_live_lease_refuses_another_host_and_a_released_one_passes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        let ttl = Duration::from_secs(30);
        let (a, previous) = Lease::acquire(client(&root), &holder("a"), ttl).unwrap();
        assert_eq!(previous, Previous::None);
        a.fence().unwrap();
        let refused = Lease::acquire(client(&root), &holder("b"), ttl)
            .err()
            .unwrap();
        assert!(matches!(refused, LeaseError::Held { .. }), "{refused}");
        assert!(refused.remaining().unwrap() > Duration::from_secs(25));
        a.renew().unwrap();
        a.release().unwrap();
        assert!(a.fence().is_err(), "a released lease fences its writer");
        let (_b, previous) = Lease::acquire(client(&root), &holder("b"), ttl).unwrap();
        assert_eq!(previous, Previous::Foreign);
        // The same host adopts its own lease (a previous run of its state directory).
        let (_b2, previous) = Lease::acquire(client(&root), &holder("b"), ttl).unwrap();
        assert_eq!(previous, Previous::Ours);
    }

    #[test]
    fn an_expired_lease_is_taken_over_and_its_holder_loses_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        let short = Duration::from_millis(300);
        let (a, _) = Lease::acquire(client(&root), &holder("a"), short).unwrap();
        std::thread::sleep(Duration::from_millis(350));
        assert!(a.fence().is_err(), "past the fence without renewal");
        let (b, previous) = Lease::acquire(client(&root), &holder("b"), short).unwrap();
        assert_eq!(previous, Previous::Foreign);
        assert!(a.renew().is_err());
        assert!(a.lost());
        b.renew().unwrap();
        b.fence().unwrap();
    }

    #[test]
    fn racing_takers_of_an_expired_lease_leave_one_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        let short = Duration::from_millis(100);
        for round in 0..20 {
            let stale = holder("0");
            let (_old, _) = Lease::acquire(client(&root), &stale, short).unwrap();
            std::thread::sleep(Duration::from_millis(120));
            let barrier = Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (1..=4)
                .map(|n| {
                    let (root, barrier) = (root.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        Lease::acquire(
                            client(&root),
                            &holder(&n.to_string()),
                            Duration::from_secs(30),
                        )
                        .is_ok()
                    })
                })
                .collect();
            let winners = threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .filter(|&won| won)
                .count();
            assert_eq!(winners, 1, "round {round}");
            let body =
                LeaseBody::parse(&client(&root).read_lease().unwrap().unwrap().body).unwrap();
            // Reset for the next round: release whatever won.
            release(client(&root).as_ref(), &holder("0"), true).unwrap();
            assert!(!body.released);
        }
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            [std::ffi::OsString::from(LEASE_NAME)],
            "no temporaries left"
        );
    }

    #[test]
    fn release_refuses_a_live_lease_without_force() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        let me = holder("c");
        assert!(matches!(
            release(client(&root).as_ref(), &me, false).unwrap(),
            Released::None
        ));
        let (a, _) = Lease::acquire(client(&root), &holder("a"), Duration::from_secs(30)).unwrap();
        let live = release(client(&root).as_ref(), &me, false).unwrap_err();
        assert!(live.to_string().contains("lease is live"), "{live}");
        assert!(matches!(
            release(client(&root).as_ref(), &me, true).unwrap(),
            Released::Live(_)
        ));
        assert!(
            a.renew().is_err(),
            "the holder finds out at its next renewal"
        );
        assert!(a.fence().is_err());
        let (_, previous) =
            Lease::acquire(client(&root), &holder("b"), Duration::from_secs(30)).unwrap();
        assert_eq!(
            previous,
            Previous::Foreign,
            "the released marker keeps the last holder"
        );
    }

    #[test]
    fn host_id_is_made_once_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let id = host_id(&dir).unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(host_id(&dir).unwrap(), id);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(HOST_ID_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_ne!(host_id(&tmp.path().join("other")).unwrap(), id);
        std::fs::write(dir.join(HOST_ID_FILE), "nope").unwrap();
        assert!(host_id(&dir)
            .unwrap_err()
            .to_string()
            .contains("not a host id"));
    }

    type WriteHook = Box<
        dyn Fn(&dyn ReplicaClient, &[u8], Option<&str>) -> Result<Option<String>, ReplicaError>
            + Send
            + Sync,
    >;

    /// A store whose lease writes go through `hook` (slow answers, lost answers).
    struct Hooked {
        inner: Box<dyn ReplicaClient>,
        hook: WriteHook,
    }

    impl ReplicaClient for Hooked {
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
            self.inner.put(level, min, max, src)
        }
        fn local_path(&self, level: u8, min: u64, max: u64) -> Option<std::path::PathBuf> {
            self.inner.local_path(level, min, max)
        }
        fn get(
            &self,
            level: u8,
            min: u64,
            max: u64,
            dst: &mut dyn Write,
        ) -> Result<(), ReplicaError> {
            self.inner.get(level, min, max, dst)
        }
        fn delete(&self, files: &[crate::replica::FileInfo]) -> Result<(), ReplicaError> {
            self.inner.delete(files)
        }
        fn read_identity(&self) -> Result<Option<Vec<u8>>, ReplicaError> {
            self.inner.read_identity()
        }
        fn exists(&self) -> Result<bool, ReplicaError> {
            self.inner.exists()
        }
        fn create_identity(&self, body: &[u8]) -> Result<bool, ReplicaError> {
            self.inner.create_identity(body)
        }
        fn replace_identity(&self, body: &[u8]) -> Result<(), ReplicaError> {
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
            (self.hook)(self.inner.as_ref(), body, expected)
        }
    }

    #[test]
    fn a_write_that_landed_although_its_answer_was_lost_takes_the_lease() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        let ttl = Duration::from_secs(30);
        let (first, _) = Lease::acquire(client(&root), &holder("b"), ttl).unwrap();
        first.release().unwrap();
        // The first conditional write lands, but its caller is told the condition failed (a
        // retried request that saw its own first attempt).
        let answered = AtomicBool::new(false);
        let lossy = Hooked {
            inner: client(&root),
            hook: Box::new(move |inner, body, expected| {
                let written = inner.write_lease(body, expected)?;
                Ok(written.filter(|_| answered.swap(true, Ordering::AcqRel)))
            }),
        };
        let (lease, previous) = Lease::acquire(Box::new(lossy), &holder("a"), ttl).unwrap();
        assert_eq!(previous, Previous::Foreign, "what the first look found");
        lease.renew().unwrap();
        lease.fence().unwrap();
    }

    #[test]
    fn a_live_lease_of_another_process_of_this_host_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        let ttl = Duration::from_secs(30);
        let me = Holder::of_process(Some(tmp.path())).unwrap();
        // Our parent runs: its live lease is not ours to adopt.
        let parent = Holder {
            pid: std::os::unix::process::parent_id(),
            ..me.clone()
        };
        let (_held, _) = Lease::acquire(client(&root), &parent, ttl).unwrap();
        let refused = Lease::acquire(client(&root), &me, ttl).err().unwrap();
        assert!(matches!(refused, LeaseError::Held { .. }), "{refused}");
        // A process of this host that is gone: its lease is adopted at once.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        let dead = Holder {
            pid: child.id(),
            ..me.clone()
        };
        let other = tmp.path().join("r2");
        let (_gone, _) = Lease::acquire(client(&other), &dead, ttl).unwrap();
        let (_adopted, previous) = Lease::acquire(client(&other), &me, ttl).unwrap();
        assert_eq!(previous, Previous::Ours);
    }

    #[test]
    fn an_unreadable_lease_released_counts_as_another_host_s() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        let (lease, _) =
            Lease::acquire(client(&root), &holder("a"), Duration::from_secs(30)).unwrap();
        drop(lease);
        std::fs::write(root.join(LEASE_NAME), b"not json").unwrap();
        let released = release(client(&root).as_ref(), &holder("a"), false).unwrap();
        assert!(matches!(released, Released::Unreadable(_)), "{released:?}");
        let (_lease, previous) =
            Lease::acquire(client(&root), &holder("a"), Duration::from_secs(30)).unwrap();
        assert_eq!(previous, Previous::Foreign);
    }

    #[test]
    fn due_leases_are_renewed_side_by_side() {
        let tmp = tempfile::tempdir().unwrap();
        let (in_flight, most) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let leases: Vec<Arc<Lease>> = (0..40)
            .map(|n| {
                let (in_flight, most) = (in_flight.clone(), most.clone());
                let slow = Hooked {
                    inner: client(&tmp.path().join(n.to_string())),
                    hook: Box::new(move |inner, body, expected| {
                        let now = in_flight.fetch_add(1, Ordering::AcqRel) + 1;
                        most.fetch_max(now, Ordering::AcqRel);
                        std::thread::sleep(Duration::from_millis(50));
                        let written = inner.write_lease(body, expected);
                        in_flight.fetch_sub(1, Ordering::AcqRel);
                        written
                    }),
                };
                let ttl = Duration::from_secs(30);
                Arc::new(Lease::acquire(Box::new(slow), &holder("a"), ttl).unwrap().0)
            })
            .collect();
        most.store(0, Ordering::Release);
        renew_all(&leases);
        let most = most.load(Ordering::Acquire);
        assert!(
            most > 1 && most <= RENEW_THREADS as u64,
            "{most} renewals in flight at once"
        );
        for lease in &leases {
            lease.fence().unwrap();
            assert!(!lease.lost());
        }
    }
}
