//! Issue 11, item 3: one owner per replica location across hosts, and `multidb release`.
//!
//! Two agents act as two hosts: each has its own data root (the same tenant fields), state
//! directory (so its own host id) and ring, and both replicate into one replica root, a
//! directory or a bucket on a real S3 server (moto, which honours `If-None-Match: *` and
//! `If-Match` on PUT). Applications are the real `sqlite3` shell with libmultidb.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use multidb_agent::replica::s3::S3Replica;
use multidb_agent::replica::{ReplicaClient, ReplicaUrl};
use multidb_tests::s3server::{S3Server, BUCKET};
use multidb_tests::{extension, multidb, multidb_bin, run, Run};

/// The lease TTL of these tests: short, so a killed holder's lease ends within seconds, yet
/// long enough that a renewal (due every third of it, fenced at two thirds) on a machine
/// slowed by a parallel build is never late by itself: at 3 s one late second cost the holder
/// its writes.
const TTL: &str = "10s";
/// The tenant both hosts have, below their own data roots.
const TENANT: &str = "p1/databases/userdb/branches/main/tenants/acme.db";
const TEMPLATE: &str = "{{project}}/{{database}}/{{branch}}/{{tenant}}";

/// One "host": a data root, a state directory, a ring and a configuration, all its own.
pub(crate) struct Host {
    name: &'static str,
    pub(crate) dir: PathBuf,
    config: PathBuf,
    ring: PathBuf,
    pub(crate) db: PathBuf,
    env: Vec<(&'static str, String)>,
    agent: Option<Child>,
}

impl Host {
    pub(crate) fn new(
        root: &Path,
        name: &'static str,
        replica: &str,
        env: &[(&'static str, String)],
    ) -> Host {
        Host::with_ttl(root, name, replica, env, TTL)
    }

    /// A host whose leases last `ttl` (a config duration such as "3s").
    pub(crate) fn with_ttl(
        root: &Path,
        name: &'static str,
        replica: &str,
        env: &[(&'static str, String)],
        ttl: &str,
    ) -> Host {
        let dir = root.join(name);
        let db = dir.join("data").join(TENANT);
        std::fs::create_dir_all(db.parent().unwrap()).unwrap();
        let made = run(Command::new("sqlite3")
            .arg(&db)
            .arg("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);"));
        assert_eq!(made.code, 0, "{}", made.stderr);
        let config = dir.join("multidb.yml");
        std::fs::write(
            &config,
            format!(
                "multi_db:\n  discovery_pattern: \"{data}/*/databases/*/branches/*/tenants/*.db\"\n  state_dir: \"{state}\"\n  sync_interval: 100ms\n  scan_interval: 1s\n  lease_ttl: {ttl}\n  replica_template:\n{replica}",
                data = dir.join("data").display(),
                state = dir.join("state").display(),
            ),
        )
        .unwrap();
        Host {
            name,
            ring: dir.join("ring"),
            dir,
            config,
            db,
            env: env.to_vec(),
            agent: None,
        }
    }

    pub(crate) fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        let child = Command::new(multidb_bin())
            .current_dir(&self.dir)
            .env("MULTIDB_RING", &self.ring)
            .env("MULTIDB_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .arg("--config")
            .arg(&self.config)
            .arg("agent")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.status().is_none() {
            assert!(
                Instant::now() < deadline,
                "{}: no status: {}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub(crate) fn command(&self) -> Command {
        let mut command = multidb(&self.dir);
        command.envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        command.arg("--config").arg(&self.config);
        command
    }

    pub(crate) fn status(&self) -> Option<Value> {
        let out = run(self.command().args(["status", "--json"]));
        (out.code == 0)
            .then(|| serde_json::from_str(&out.stdout).ok())
            .flatten()
    }

    /// SIGTERM (a clean stop: final syncs, leases released) or SIGKILL, and the exit code.
    fn stop(&mut self, signal: i32) -> Option<i32> {
        let mut child = self.agent.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().unwrap().code()
    }

    /// Sends `signal` to the running agent (SIGSTOP/SIGCONT: a host that hangs and resumes).
    fn signal(&self, signal: i32) {
        let child = self.agent.as_ref().expect("running");
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    /// Commits row `v` with libmultidb loaded and returns `multidb_wait(timeout_ms)` and
    /// `multidb_status()` after it.
    pub(crate) fn commit(&self, v: &str, timeout_ms: u64) -> (String, Value) {
        let out = run(Command::new("sqlite3")
            .env("MULTIDB_RING", &self.ring)
            .arg("-bail")
            .arg(&self.db)
            // The agent's connection may hold a lock for a moment (a checkpoint, a snapshot).
            .arg(".timeout 5000")
            .arg(format!(".load {}", extension().display()))
            .arg(format!(
                "INSERT INTO t(v) VALUES ('{v}'); SELECT multidb_wait({timeout_ms}); SELECT multidb_status();"
            )));
        assert_eq!(out.code, 0, "{}: {}", self.name, out.stderr);
        let mut lines = out.stdout.lines();
        let wait = lines.next().unwrap_or_default().to_string();
        let status = serde_json::from_str(lines.next().unwrap_or("null")).unwrap_or_default();
        (wait, status)
    }

    /// Commits until one is acknowledged (a takeover happens at a write after the lease
    /// ended); returns the first acknowledged row's status.
    fn commit_until_acknowledged(&self, tag: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        for n in 0.. {
            let (wait, status) = self.commit(&format!("{tag}-{n}"), 3000);
            if wait == "1" {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: never acknowledged: {status}\n{}",
                self.name,
                self.log()
            );
        }
        unreachable!()
    }

    pub(crate) fn restore(&self, txid: Option<u64>, out: &Path) -> Run {
        let mut command = self.command();
        command.arg("restore").arg("-o").arg(out);
        if let Some(txid) = txid {
            command.arg("--txid").arg(txid.to_string());
        }
        run(command.arg(&self.db))
    }

    fn release(&self, force: bool) -> Run {
        let mut command = self.command();
        command.arg("release");
        if force {
            command.arg("--force");
        }
        run(command.arg(&self.db))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn rows(db: &Path) -> Vec<String> {
    let out = run(Command::new("sqlite3")
        .arg(db)
        .arg("SELECT v FROM t ORDER BY id"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout.lines().map(str::to_string).collect()
}

/// The wall clock in Unix ms, as lease expiries are written.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn txid_of(status: &Value) -> u64 {
    status["database"]["replicated_txid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no replicated TXID: {status}"))
}

/// The replica's files as `(level, min, max)`.
fn files(host: &Host, url: &str) -> Vec<(u64, u64, u64)> {
    let out = run(host.command().args(["ltx", "--json", url]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let n = |k: &str| f[k].as_u64().unwrap();
            (n("level"), n("min_txid"), n("max_txid"))
        })
        .collect()
}

/// The history so far: after each acknowledged commit, its TXID and the rows then.
type History = Vec<(u64, Vec<String>)>;

fn write_history(host: &Host, tag: &str, commits: usize, history: &mut History) {
    for n in 0..commits {
        let (wait, status) = host.commit(&format!("{tag}{n}"), 10_000);
        assert_eq!(
            wait,
            "1",
            "{}: not acknowledged: {status}\n{}",
            host.name,
            host.log()
        );
        history.push((txid_of(&status), rows(&host.db)));
    }
}

/// Every recorded point restores, from `by`, to the rows its host had then.
fn assert_history_restores(by: &Host, history: &History, scratch: &Path) {
    static RESTORES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    for (txid, expected) in history {
        let n = RESTORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out_path = scratch.join(format!("restored-{n}-{}-{txid}.db", by.name));
        let out = by.restore(Some(*txid), &out_path);
        assert_eq!(out.code, 0, "restore --txid {txid}: {}", out.stderr);
        assert_eq!(&rows(&out_path), expected, "TXID {txid}");
    }
}

/// The latest restore from `by`'s configuration holds exactly its database's rows.
fn assert_latest_restores_to_its_database(by: &Host, scratch: &Path, why: &str) {
    static LATEST: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = LATEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let latest = scratch.join(format!("latest-{n}-{}.db", by.name));
    let out = by.restore(None, &latest);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(rows(&latest), rows(&by.db), "{why}");
}

/// A commit on a host whose lease another host holds now: `multidb_wait` answers 0.
fn assert_not_acknowledged(host: &Host, v: &str, who: &str) {
    let (wait, status) = host.commit(v, 5000);
    assert_eq!(
        wait,
        "0",
        "{who} is not acknowledged: {status}\n{}",
        host.log()
    );
}

/// The refused side: `multidb_wait` 0 at once, the reason in `multidb_status()`, the error in
/// `multidb status`, counted as refused.
fn assert_refused_by_lease(host: &Host, v: &str) {
    let started = Instant::now();
    let (wait, status) = host.commit(v, 60_000);
    assert_eq!(wait, "0", "{}: {status}", host.name);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered long before the 60 s timeout"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (_, status) = host.commit(&format!("{v}-again"), 0);
        if status["database"]["tier"] == "refused" || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["database"]["tier"], "refused", "{status}");
    let reason = status["database"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("leased by another host"), "{reason}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let report = host.status().expect("status");
        if report["tiers"]["refused"] == 1 || Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(report["tiers"]["refused"], 1, "{report}");
    let errors = report["errors"].to_string();
    assert!(errors.contains("the replica is leased by host"), "{errors}");
}

/// The whole story on one replica root: `replica` is the `replica_template` body, `url` the
/// tenant's replica URL, `lease_path` a way to read the lease object.
fn two_hosts(replica: &str, url: &str, env: &[(&'static str, String)], lease: &dyn Fn() -> Value) {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Host::new(tmp.path(), "host-a", replica, env);
    let mut b = Host::new(tmp.path(), "host-b", replica, env);
    a.start();
    b.start();

    // Host A replicates the tenant and holds the lease; host B is refused.
    let started = Instant::now();
    let mut history = History::new();
    write_history(&a, "a", 3, &mut history);
    let held = lease();
    assert_eq!(held["released"], false, "{held}");
    assert_eq!(held["pid"], a.agent.as_ref().unwrap().id(), "{held}");
    assert_refused_by_lease(&b, "b-refused");
    let before_b = files(&a, url);

    // `multidb release` refuses a live lease without --force.
    eprintln!("{:?}: A holds, B refused", started.elapsed());
    let out = b.release(false);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stderr.contains("the lease is live"), "{}", out.stderr);

    // A clean stop releases the lease: B takes over at its next write, with a snapshot at
    // the next TXID, and every earlier point stays restorable.
    assert_eq!(a.stop(libc::SIGTERM), Some(0), "{}", a.log());
    assert_eq!(lease()["released"], true, "{}", a.log());
    let last_a = history.last().unwrap().0;
    let status = b.commit_until_acknowledged("b");
    assert!(txid_of(&status) > last_a, "{status}");
    let after = files(&b, url);
    assert!(
        after.contains(&(9, 1, last_a + 1)),
        "a snapshot at TXID {}: {after:?} (before: {before_b:?})",
        last_a + 1
    );
    history.push((txid_of(&status), rows(&b.db)));
    write_history(&b, "b", 2, &mut history);
    assert_history_restores(&b, &history, tmp.path());
    assert_latest_restores_to_its_database(&b, tmp.path(), "the latest state is host B's");
    assert_history_restores(&a, &history, tmp.path());

    eprintln!("{:?}: B took over after a clean stop", started.elapsed());
    // B is killed: its lease stays until it expires, then A takes over, never before.
    let expires_ms = lease()["expires_ms"].as_i64().unwrap();
    assert_eq!(b.stop(libc::SIGKILL), None);
    a.start();
    let status = a.commit_until_acknowledged("a-back");
    assert!(
        now_ms() >= expires_ms,
        "taken over before the lease expired"
    );
    let last_b = history.last().unwrap().0;
    assert!(txid_of(&status) > last_b, "{status}");
    assert!(files(&a, url).contains(&(9, 1, last_b + 1)));
    history.push((txid_of(&status), rows(&a.db)));
    assert_history_restores(&a, &history, tmp.path());

    eprintln!("{:?}: A took over after SIGKILL", started.elapsed());
    // `multidb release --force` takes a live lease away: the holder writes nothing more, and
    // the other host goes on.
    b.start();
    let out = b.release(true);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("released the live lease"),
        "{}",
        out.stdout
    );
    let status = b.commit_until_acknowledged("b-forced");
    history.push((txid_of(&status), rows(&b.db)));
    // A still running learns of it at its next renewal (a third of the TTL at most; until
    // then it may still write, which is why the README says --force is for a host that is
    // gone).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.log().contains("lease lost") {
        assert!(Instant::now() < deadline, "A never noticed: {}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_not_acknowledged(&a, "a-fenced", "the old holder");
    assert_history_restores(&b, &history, tmp.path());
    assert_latest_restores_to_its_database(&b, tmp.path(), "nothing of host A's after the release");

    eprintln!(
        "{:?}: B took the lease with release --force",
        started.elapsed()
    );
    // B hangs while it holds the lease (SIGSTOP: a frozen host or VM): A takes over only
    // after the lease expired; B, resumed, finds its lease gone and writes nothing more.
    let expires_ms = lease()["expires_ms"].as_i64().unwrap();
    b.signal(libc::SIGSTOP);
    let status = a.commit_until_acknowledged("a-after-hang");
    assert!(
        now_ms() >= expires_ms,
        "taken over before the hung holder's lease expired"
    );
    history.push((txid_of(&status), rows(&a.db)));
    b.signal(libc::SIGCONT);
    assert_not_acknowledged(&b, "b-resumed", "the resumed old holder");
    assert_eq!(lease()["pid"], a.agent.as_ref().unwrap().id());
    write_history(&a, "a-owner", 2, &mut history);
    assert_history_restores(&a, &history, tmp.path());
    assert_latest_restores_to_its_database(
        &a,
        tmp.path(),
        "nothing of the resumed host B's in the replica",
    );
    assert_eq!(a.stop(libc::SIGTERM), Some(0), "{}", a.log());
    assert_eq!(b.stop(libc::SIGTERM), Some(0), "{}", b.log());
}

#[test]
fn two_hosts_share_a_directory_replica() {
    let root = tempfile::tempdir().unwrap();
    let replica = format!(
        "    type: file\n    path: \"{}/{TEMPLATE}\"\n",
        root.path().display()
    );
    let location = root.path().join("p1/userdb/main/acme");
    let url = format!("file://{}", location.display());
    two_hosts(&replica, &url, &[], &|| {
        serde_json::from_slice(&std::fs::read(location.join("multidb.lease")).unwrap()).unwrap()
    });
}

#[test]
fn two_hosts_share_an_s3_replica() {
    let server = S3Server::start();
    let replica = format!(
        "    type: s3\n    bucket: {BUCKET}\n    endpoint: \"{}\"\n    path: \"lease/{TEMPLATE}\"\n",
        server.endpoint()
    );
    let url = server.url("lease/p1/userdb/main/acme");
    // Read with the project's client (the server keeps objects private), from the server.
    let ReplicaUrl::S3(location) = ReplicaUrl::parse(&url).unwrap() else {
        unreachable!()
    };
    let reader = S3Replica::with_credentials(location, server.credentials()).unwrap();
    two_hosts(&replica, &url, &server.env(), &|| {
        let stored = reader.read_lease().unwrap().expect("a lease object");
        serde_json::from_slice(&stored.body).unwrap()
    });
}

/// Two hosts take turns at one location with `multidb replicate --once`, each with a state
/// directory of its own (so a host id of its own). A host that takes over after the other
/// wrote forgets its own older saved position before it writes: resuming from it would
/// number its next file after a TXID the other host has already used.
#[test]
fn a_host_that_took_over_never_resumes_its_older_saved_position() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("tenant.db");
    let made = run(Command::new("sqlite3")
        .arg(&db)
        .arg("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);"));
    assert_eq!(made.code, 0, "{}", made.stderr);
    let url = format!("file://{}", tmp.path().join("replica").display());
    let mut history = Vec::new();
    let mut turn = |host: &str, v: &str| {
        let insert = run(Command::new("sqlite3")
            .arg(&db)
            .arg(format!("INSERT INTO t(v) VALUES ('{v}');")));
        assert_eq!(insert.code, 0, "{}", insert.stderr);
        let state = tmp.path().join(format!("state-{host}"));
        let out = run(multidb(tmp.path())
            .args(["replicate", "--once", "--state-dir"])
            .arg(&state)
            .arg(&db)
            .arg(&url));
        assert_eq!(out.code, 0, "{host} {v}: {}", out.stderr);
        history.push(rows(&db));
    };
    turn("a", "a1");
    turn("a", "a2");
    turn("b", "b1");
    turn("b", "b2");
    turn("a", "a3"); // takes over from B
    turn("a", "a4"); // its own lease now: resumes from what it saved after taking over
    turn("b", "b3");
    let latest = tmp.path().join("latest.db");
    let out = run(multidb(tmp.path())
        .args(["restore", "-o"])
        .arg(&latest)
        .arg(&url));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        rows(&latest),
        rows(&db),
        "the latest restore is the database"
    );
    for (n, expected) in history.iter().enumerate() {
        let txid = n + 1;
        let out_path = tmp.path().join(format!("at-{txid}.db"));
        let out = run(multidb(tmp.path())
            .args(["restore", "-o"])
            .arg(&out_path)
            .args(["--txid", &txid.to_string()])
            .arg(&url));
        assert_eq!(out.code, 0, "restore --txid {txid}: {}", out.stderr);
        assert_eq!(&rows(&out_path), expected, "TXID {txid}");
    }
}
