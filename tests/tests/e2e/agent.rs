//! `multidb agent` as users run it: real databases made by `multidb generate --sqlite`, real
//! writer processes (with and without libmultidb, long-lived and connection-per-transaction),
//! the real agent binary, `SIGKILL`, and every written database restored and compared.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use multidb_agent::replica::{FileInfo, ReplicaUrl};
use multidb_tests::{extension, multidb, multidb_bin, run};

const WRITER: &str = env!("CARGO_BIN_EXE_multidb-writer");

/// A tree of real databases and an agent configuration for it, in a temp directory.
pub struct Site {
    pub tmp: tempfile::TempDir,
    pub config: PathBuf,
    pub ring: PathBuf,
    pub dbs: Vec<PathBuf>,
}

impl Site {
    /// `projects × databases × branches × tenants` databases; `extra` is appended to the
    /// `multi_db:` block.
    pub fn new(layout: [usize; 4], max_active: u32, extra: &str) -> Site {
        // MULTIDB_TEST_KEEP=1 keeps the tree, logs and replicas for a look after a failure.
        let tmp = tempfile::Builder::new()
            .disable_cleanup(std::env::var_os("MULTIDB_TEST_KEEP").is_some())
            .tempdir()
            .unwrap();
        eprintln!("site: {}", tmp.path().display());
        let root = tmp.path().join("data");
        let [p, d, b, t] = layout.map(|n| n.to_string());
        let out = run(multidb(tmp.path())
            .args(["generate", "--sqlite", "--root"])
            .arg(&root)
            .args([
                "--projects",
                &p,
                "--databases",
                &d,
                "--branches",
                &b,
                "--tenants",
                &t,
            ]));
        assert_eq!(out.code, 0, "generate: {}", out.stderr);
        let config = tmp.path().join("multidb.yml");
        let yaml = format!(
            "multi_db:\n  discovery_pattern: \"{root}/*/databases/*/branches/*/tenants/*.db\"\n  max_active: {max_active}\n  state_dir: \"{state}\"\n{extra}  replica_template:\n    type: file\n    path: \"{replica}/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"\n",
            root = root.display(),
            state = tmp.path().join("state").display(),
            replica = tmp.path().join("replica").display(),
        );
        std::fs::write(&config, yaml).unwrap();
        let mut dbs = Vec::new();
        collect_dbs(&root, &mut dbs);
        dbs.sort();
        let ring = tmp.path().join("ring");
        let text: Vec<String> = dbs.iter().map(|p| p.display().to_string()).collect();
        std::fs::write(tmp.path().join("dbs.txt"), text.join("\n")).unwrap();
        Site {
            tmp,
            config,
            ring,
            dbs,
        }
    }

    pub fn replica_of(&self, db: &Path) -> PathBuf {
        let rel = db
            .strip_prefix(self.tmp.path().join("data"))
            .unwrap()
            .to_string_lossy()
            .to_string();
        let parts: Vec<&str> = rel.split('/').collect();
        // project/databases/db/branches/branch/tenants/tenant.db
        self.tmp
            .path()
            .join("replica")
            .join(parts[0])
            .join(parts[2])
            .join(parts[4])
            .join(parts[6].trim_end_matches(".db"))
    }

    /// The database list writers pick from.
    pub fn list(&self) -> PathBuf {
        self.tmp.path().join("dbs.txt")
    }

    pub fn start_agent(&self) -> Agent {
        Agent::start(self)
    }

    /// Starts a writer process for `seconds`.
    pub fn writer(&self, seed: u64, seconds: f64, ext: bool, per_txn: bool, rate: f64) -> Child {
        let mut command = Command::new(WRITER);
        command
            .env("MULTIDB_RING", &self.ring)
            .arg("--list")
            .arg(self.list())
            .args([
                "--seconds",
                &seconds.to_string(),
                "--seed",
                &seed.to_string(),
            ])
            .args(["--rate", &rate.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if ext {
            command.arg("--ext").arg(extension());
        }
        if per_txn {
            command.arg("--per-txn");
        }
        command.spawn().unwrap()
    }
}

fn collect_dbs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_dbs(&path, out);
        } else if path.extension().is_some_and(|e| e == "db") {
            out.push(path);
        }
    }
}

/// A running `multidb agent`.
pub struct Agent {
    pub child: Child,
    config: PathBuf,
    dir: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(site: &Site) -> Agent {
        let log = site.tmp.path().join(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(multidb_bin())
            .current_dir(site.tmp.path())
            .env("MULTIDB_RING", &site.ring)
            .env(
                "MULTIDB_LOG",
                std::env::var("MULTIDB_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .arg("--config")
            .arg(&site.config)
            .arg("agent")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut agent = Agent {
            child,
            config: site.config.clone(),
            dir: site.tmp.path().to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.try_status().is_none() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited with {status}: {}", agent.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not answer: {}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn try_status(&self) -> Option<serde_json::Value> {
        let out = run(multidb(&self.dir)
            .arg("--config")
            .arg(&self.config)
            .args(["status", "--json"]));
        (out.code == 0)
            .then(|| serde_json::from_str(&out.stdout).ok())
            .flatten()
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|| panic!("no status: {}", self.log_text()))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Descriptors the agent holds now.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// SIGTERM, and the exit code.
    pub fn stop(mut self) -> i32 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        status.code().unwrap_or(-1)
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until nothing is waiting, in flight or unsynced, across `scans` more scans (so
    /// writes without the extension were seen).
    pub fn settle(&self, scans: u64, timeout: Duration) {
        let start_scans = self.status()["scans"].as_u64().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            let t = &s["tiers"];
            let quiet = t["waiting"] == 0 && t["in_flight"] == 0;
            if quiet && s["scans"].as_u64().unwrap() >= start_scans + scans {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not settle: {s}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn finish(writer: Child) -> u64 {
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "writer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("committed ")
        .and_then(|n| n.parse().ok())
        .expect("writer prints `committed N`")
}

/// Every row of every table, in order: what "equal" means for a restore.
pub(crate) fn contents(db: &Path) -> BTreeMap<String, Vec<String>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut out = BTreeMap::new();
    for table in tables {
        let mut stmt = conn
            .prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid"))
            .unwrap();
        let columns = stmt.column_count();
        let rows: Vec<String> = stmt
            .query_map([], |r| {
                let mut row = String::new();
                for i in 0..columns {
                    // Blobs by length and hash, so a failure message stays readable.
                    match r.get::<_, rusqlite::types::Value>(i)? {
                        rusqlite::types::Value::Blob(b) => {
                            use std::hash::{Hash, Hasher};
                            let mut h = std::collections::hash_map::DefaultHasher::new();
                            b.hash(&mut h);
                            row.push_str(&format!("blob({}, {:016x})|", b.len(), h.finish()));
                        }
                        v => row.push_str(&format!("{v:?}|")),
                    }
                }
                Ok(row)
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        out.insert(table, rows);
    }
    out
}

/// Restores `db` from `replica` and requires it to equal the source.
fn assert_restores_equal(db: &Path, replica: &Path, scratch: &Path) {
    let client = ReplicaUrl::File(replica.to_path_buf()).client().unwrap();
    let out = scratch.join(format!(
        "restored-{}.db",
        db.display().to_string().replace('/', "_")
    ));
    multidb_agent::replicate::restore::restore(
        client.as_ref(),
        multidb_agent::replicate::restore::Target::Latest,
        &out,
        false,
    )
    .unwrap_or_else(|e| panic!("restoring {}: {e:#}", db.display()));
    assert_eq!(
        contents(&out),
        contents(db),
        "{} restores equal",
        db.display()
    );
    std::fs::remove_file(&out).unwrap();
}

/// The replica's history has no gap: every TXID from 1 to the newest is in a snapshot or a
/// level-0 file, and each level-0 file continues a file that ends right before it.
fn assert_no_gap(replica: &Path) {
    let client = ReplicaUrl::File(replica.to_path_buf()).client().unwrap();
    let files: Vec<FileInfo> =
        multidb_agent::replicate::restore::list_all(client.as_ref()).unwrap();
    let ends: std::collections::HashSet<u64> = files
        .iter()
        .filter(|f| f.level == 0 || f.level == 9)
        .map(|f| f.max_txid)
        .collect();
    for f in files.iter().filter(|f| f.level == 0) {
        assert!(
            f.min_txid == 1 || ends.contains(&(f.min_txid - 1)),
            "{}: level-0 file {}-{} follows no file",
            replica.display(),
            f.min_txid,
            f.max_txid
        );
    }
    assert!(
        files.iter().any(|f| f.level == 9 && f.min_txid == 1),
        "{}: no snapshot",
        replica.display()
    );
}

fn written(db: &Path) -> bool {
    contents(db).contains_key("writes")
}

/// The site for the load tests: 1,000 databases, `max_active: 10`, rescans every
/// second (writers without the extension are seen by them), short batches and idle timeout.
fn thousand_databases_max_active_ten() -> Site {
    Site::new(
        [2, 5, 10, 10],
        10,
        "  scan_interval: 1s\n  sync_interval: 100ms\n  idle_timeout: 2s\n",
    )
}

/// The load: 1,000 databases, `max_active: 10`, 20 writers with libmultidb (half
/// connection-per-transaction) and two without, for 30 s. Afterwards every written database
/// restores equal, the hot set never passed 10, and no replica history has a gap.
#[test]
fn a_thousand_databases_twenty_writers_max_active_ten() {
    let site = thousand_databases_max_active_ten();
    assert_eq!(site.dbs.len(), 1000);
    let agent = site.start_agent();
    let seconds = 30.0;
    let mut writers = Vec::new();
    for n in 0..20u64 {
        writers.push(site.writer(n + 1, seconds, true, n % 2 == 1, 25.0));
    }
    writers.push(site.writer(101, seconds, false, false, 10.0));
    writers.push(site.writer(102, seconds, false, true, 10.0));
    let started = Instant::now();
    let mut max_hot = 0;
    let mut max_fds = 0;
    while started.elapsed() < Duration::from_secs_f64(seconds) {
        let s = agent.status();
        max_hot = max_hot.max(s["tiers"]["hot"].as_u64().unwrap());
        max_fds = max_fds.max(agent.fds());
        std::thread::sleep(Duration::from_millis(200));
    }
    let committed: u64 = writers.into_iter().map(finish).sum();
    agent.settle(2, Duration::from_secs(120));
    let status = agent.status();
    assert_eq!(agent.stop(), 0, "SIGTERM ends the agent with 0");
    assert!(max_hot <= 10, "hot set reached {max_hot}");
    assert!(status["promotions"].as_u64().unwrap() > 10, "{status}");
    // 10 hot databases at 4 descriptors each, plus the agent's own and its workers' passing
    // ones (a WAL being read, a checkpoint connection, a temporary LTX file).
    assert!(
        max_fds <= 10 * 4 + 64,
        "the agent held {max_fds} descriptors"
    );
    let scratch = site.tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut checked = 0;
    for db in &site.dbs {
        if !written(db) {
            continue;
        }
        let replica = site.replica_of(db);
        assert_restores_equal(db, &replica, &scratch);
        assert_no_gap(&replica);
        checked += 1;
    }
    eprintln!(
        "{committed} transactions, {checked} databases written and restored equal; status {status}"
    );
    assert!(checked > 500, "only {checked} databases were written");
}

/// `SIGKILL` of the agent at random moments under load, 10 times, each followed by a restart:
/// afterwards every database converges and restores equal to its source.
#[test]
fn agent_killed_ten_times_under_load_converges() {
    let site = thousand_databases_max_active_ten();
    let seconds = 25.0;
    let mut agent = site.start_agent();
    let mut writers = Vec::new();
    for n in 0..8u64 {
        writers.push(site.writer(200 + n, seconds, true, n % 2 == 1, 25.0));
    }
    writers.push(site.writer(301, seconds, false, false, 10.0));
    writers.push(site.writer(302, seconds, false, true, 10.0));
    let mut seed = 0x2545_f491u64;
    for _ in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(500 + seed % 1500));
        agent.kill();
        agent = site.start_agent();
    }
    let committed: u64 = writers.into_iter().map(finish).sum();
    agent.settle(2, Duration::from_secs(180));
    assert_eq!(agent.stop(), 0);
    let scratch = site.tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut checked = 0;
    for db in &site.dbs {
        if !written(db) {
            continue;
        }
        assert_restores_equal(db, &site.replica_of(db), &scratch);
        checked += 1;
    }
    eprintln!("{committed} transactions; {checked} databases restored equal after 10 kills");
    assert!(checked > 100);
}

struct Waiter {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Waiter {
    fn start(site: &Site, db: &Path) -> Waiter {
        let mut child = Command::new(WRITER)
            .env("MULTIDB_RING", &site.ring)
            .arg("--wait")
            .arg(db)
            .arg("--ext")
            .arg(extension())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Waiter {
            child,
            stdin,
            stdout,
        }
    }

    /// Commits `k`, then `multidb_wait(timeout_ms)`.
    fn commit_and_wait(&mut self, k: u64, timeout_ms: u64) -> String {
        writeln!(self.stdin, "{k} {timeout_ms}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `multidb_wait` returns 1 only once the commit is in the replica (read back by restoring
/// right after it returned), and 0 when no agent is running.
#[test]
fn multidb_wait_returns_once_the_commit_is_in_the_replica() {
    let site = Site::new([1, 1, 1, 2], 4, "  sync_interval: 200ms\n");
    let db = site.dbs[0].clone();
    let replica = site.replica_of(&db);
    let agent = site.start_agent();
    let mut waiter = Waiter::start(&site, &db);
    let scratch = site.tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    for k in 1..=15u64 {
        assert_eq!(waiter.commit_and_wait(k, 10_000), "1", "commit {k}");
        let client = ReplicaUrl::File(replica.clone()).client().unwrap();
        let out = scratch.join(format!("r{k}.db"));
        multidb_agent::replicate::restore::restore(
            client.as_ref(),
            multidb_agent::replicate::restore::Target::Latest,
            &out,
            false,
        )
        .unwrap();
        let conn = rusqlite::Connection::open(&out).unwrap();
        let max: i64 = conn
            .query_row("SELECT max(k) FROM waits", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            max, k as i64,
            "the replica holds commit {k} when multidb_wait returned"
        );
    }
    assert_eq!(agent.stop(), 0);
    let started = Instant::now();
    assert_eq!(waiter.commit_and_wait(100, 300), "0", "no agent: 0");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

/// SIGTERM syncs every hot database before the agent exits 0.
#[test]
fn sigterm_ships_what_was_committed() {
    let site = Site::new([1, 1, 1, 3], 4, "  sync_interval: 5s\n");
    let agent = site.start_agent();
    let writer = site.writer(7, 2.0, true, false, 200.0);
    let committed = finish(writer);
    // With a 5 s batch interval the last commits are not replicated yet; SIGTERM must ship them.
    assert_eq!(agent.stop(), 0);
    let scratch = site.tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    for db in site.dbs.iter().filter(|db| written(db)) {
        assert_restores_equal(db, &site.replica_of(db), &scratch);
    }
    assert!(committed > 10);
}

/// A restarted agent resumes from its state directory: databases that did not change are not
/// uploaded again, and one written while it was down is caught up.
#[test]
fn restart_catches_up_only_what_changed() {
    let site = Site::new(
        [1, 1, 1, 3],
        4,
        "  idle_timeout: 1s\n  sync_interval: 50ms\n  scan_interval: 2s\n",
    );
    let agent = site.start_agent();
    for db in &site.dbs {
        let out = multidb_tests::run(
            Command::new("sqlite3")
                .env("MULTIDB_RING", &site.ring)
                .arg(db)
                .arg(format!(".load {}", extension().display()))
                .arg("CREATE TABLE writes(k); INSERT INTO writes VALUES (1);"),
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    agent.settle(1, Duration::from_secs(30));
    // Wait for the idle demotions, so every stamp is saved.
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.status()["tiers"]["hot"] != 0 {
        assert!(Instant::now() < deadline, "{}", agent.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agent.stop(), 0);
    let files_before = count_files(&site.tmp.path().join("replica"));
    // Written while no agent runs, without the extension.
    let changed = &site.dbs[1];
    let out = multidb_tests::run(
        Command::new("sqlite3")
            .arg(changed)
            .arg("INSERT INTO writes VALUES (2);"),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let agent = site.start_agent();
    agent.settle(1, Duration::from_secs(30));
    let status = agent.status();
    assert_eq!(agent.stop(), 0);
    assert_eq!(
        status["promotions"], 1,
        "only the changed database: {status}"
    );
    assert!(count_files(&site.tmp.path().join("replica")) > files_before);
    let scratch = site.tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    for db in &site.dbs {
        assert_restores_equal(db, &site.replica_of(db), &scratch);
    }
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.unwrap().path())
        .map(|p| if p.is_dir() { count_files(&p) } else { 1 })
        .sum()
}

/// Configuration the agent cannot run with is refused up front, naming what is wrong.
#[test]
fn agent_refuses_what_it_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("multidb.yml");
    let base = "multi_db:\n  discovery_pattern: \"/nonexistent/*.db\"\n";
    for (extra, expected) in [
        ("", "no replica_template"),
        (
            "  max_active: 2000000000\n  replica_template:\n    path: /tmp/r/{{1}}\n",
            "max_active",
        ),
    ] {
        std::fs::write(&config, format!("{base}{extra}")).unwrap();
        let out = run(multidb(tmp.path())
            .env("MULTIDB_RING", tmp.path().join("ring"))
            .arg("--config")
            .arg(&config)
            .arg("agent"));
        assert_ne!(out.code, 0);
        assert!(out.stderr.contains(expected), "{}", out.stderr);
    }
    std::fs::write(
        &config,
        format!("{base}  replica_template:\n    path: /tmp/r/{{{{1}}}}\n"),
    )
    .unwrap();
    let out = run(multidb(tmp.path())
        .arg("--config")
        .arg(&config)
        .args(["status"]));
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no agent answers"), "{}", out.stderr);
}

/// `multidb demo`, the README's first command, runs start to end, again over its own earlier
/// run, and refuses a directory it did not make.
#[test]
fn demo_runs_and_reruns() {
    let tmp = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = run(multidb(tmp.path()).arg("demo"));
        assert_eq!(out.code, 0, "demo failed:\n{}\n{}", out.stdout, out.stderr);
        for expected in [
            "1. created 24 SQLite databases",
            "discovers 24 databases",
            "multidb_wait(10000) returned 1",
            "multidb_status(): tier hot",
            "level 9 TXID 1-",
            "checksums and integrity_check verified, all",
            "rows equal to the source",
            "says tier cold",
        ] {
            assert!(
                out.stdout.contains(expected),
                "missing `{expected}` in:\n{}",
                out.stdout
            );
        }
    }
    let foreign = tmp.path().join("mine");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep me").unwrap();
    let out = run(multidb(tmp.path()).args(["demo", "--dir", "mine"]));
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("was not made by `multidb demo`"),
        "{}",
        out.stderr
    );
    assert!(foreign.join("notes.txt").exists());
}

/// An idle host: 10,000 discovered databases to an S3 replica, nothing written for 60 s. The
/// S3 server sees no request at all and the agent uses under 1% of a core. Then one write
/// shows the same agent does reach the server (so the silence was not a broken client).
#[test]
fn idle_host_makes_no_request_and_costs_no_cpu() {
    let server = multidb_tests::s3server::S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let out = run(multidb(tmp.path())
        .args(["generate", "--root"])
        .arg(&root)
        .args([
            "--projects",
            "10",
            "--databases",
            "10",
            "--branches",
            "10",
            "--tenants",
            "10",
        ]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let config = tmp.path().join("multidb.yml");
    std::fs::write(
        &config,
        format!(
            "multi_db:\n  discovery_pattern: \"{root}/*/databases/*/branches/*/tenants/*.db\"\n  scan_interval: 10s\n  state_dir: \"{state}\"\n  replica_template:\n    type: s3\n    bucket: {bucket}\n    endpoint: \"{endpoint}\"\n    path: \"idle/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"\n",
            root = root.display(),
            state = tmp.path().join("state").display(),
            bucket = multidb_tests::s3server::BUCKET,
            endpoint = server.endpoint(),
        ),
    )
    .unwrap();
    let ring = tmp.path().join("ring");
    let mut command = Command::new(multidb_bin());
    command
        .current_dir(tmp.path())
        .env("MULTIDB_RING", &ring)
        .env("MULTIDB_LOG", "warn")
        .arg("--config")
        .arg(&config)
        .arg("agent")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    server.apply_env(&mut command);
    let mut child = KillOnDrop(command.spawn().unwrap());
    let status = |config: &Path| -> Option<serde_json::Value> {
        let out = run(multidb(tmp.path())
            .arg("--config")
            .arg(config)
            .args(["status", "--json"]));
        (out.code == 0).then(|| serde_json::from_str(&out.stdout).unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&config).is_none_or(|s| s["tiers"]["discovered"] != 10_000) {
        assert!(
            Instant::now() < deadline,
            "agent did not discover 10,000 databases"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the start-up's own work (watches, state writes) end before the idle minute.
    std::thread::sleep(Duration::from_secs(5));
    let requests_before = server.requests().len();
    let pid = child.0.id();
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let cpu_before = cpu();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(60));
    let ticks = cpu() - cpu_before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = ticks as f64 / hz / started.elapsed().as_secs_f64();
    let new_requests: Vec<String> = server.requests().split_off(requests_before);
    assert!(
        new_requests.is_empty(),
        "an idle agent sent requests: {new_requests:?}"
    );
    assert!(
        share < 0.01,
        "an idle agent used {:.2}% of a core",
        share * 100.0
    );
    eprintln!(
        "idle 60 s over 10,000 databases: 0 requests, {:.3}% of a core",
        share * 100.0
    );

    // One write (without the extension: found by the next scan) reaches the server.
    let mut dbs = Vec::new();
    collect_dbs(&root, &mut dbs);
    let db = dbs.iter().min().unwrap();
    let out = run(Command::new("sqlite3")
        .arg(db)
        .arg("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let deadline = Instant::now() + Duration::from_secs(60);
    while server
        .requests()
        .iter()
        .skip(requests_before)
        .all(|r| !r.contains("PUT"))
    {
        assert!(
            Instant::now() < deadline,
            "the written database was never uploaded"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert!(child.0.wait().unwrap().success());
}

/// A child process that a failing test must not leave running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// With `addr` set, Prometheus metrics are served on loopback: per-tier gauges, sync counters,
/// bytes uploaded and the lag histogram, counting a real write.
#[test]
fn prometheus_metrics_are_served() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let site = Site::new(
        [1, 1, 1, 2],
        4,
        &format!("  sync_interval: 50ms\n  addr: \":{port}\"\n"),
    );
    let agent = site.start_agent();
    let out = run(Command::new("sqlite3")
        .env("MULTIDB_RING", &site.ring)
        .arg(&site.dbs[0])
        .arg(format!(".load {}", extension().display()))
        .arg("CREATE TABLE m(x); INSERT INTO m VALUES (1); SELECT multidb_wait(10000);"));
    assert_eq!(out.stdout.trim(), "1", "{}", out.stderr);
    // A connection reset under load is retried; what is asserted is the answer.
    let fetch = |path: &str| {
        use std::io::Read;
        let mut last = None;
        for _ in 0..5 {
            let attempt = (|| -> std::io::Result<String> {
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
                write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
                let mut body = String::new();
                stream.read_to_string(&mut body)?;
                Ok(body)
            })();
            match attempt {
                Ok(body) => return body,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("GET {path} on port {port}: {last:?}");
    };
    let expected = [
        "multidb_databases{tier=\"hot\"} 1\n",
        "multidb_databases{tier=\"cold\"} 1\n",
        "multidb_databases_discovered 2\n",
        "multidb_promotions_total 1\n",
        "multidb_snapshots_total 1\n",
        "multidb_sync_errors_total 0\n",
        "# TYPE multidb_lag_seconds histogram\n",
        "multidb_lag_seconds_bucket{le=\"+Inf\"} ",
    ];
    // The gauges are refreshed every 250 ms (by a scheduler that a loaded machine may run
    // late): asked until they all show, for up to 30 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = fetch("/metrics");
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        let missing: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|e| !metrics.contains(e))
            .collect();
        if missing.is_empty() {
            break metrics;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "missing {missing:?} in:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let uploaded: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("multidb_uploaded_bytes_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(uploaded > 0);
    assert!(fetch("/nothing").starts_with("HTTP/1.1 404"));
    let human = run(multidb(site.tmp.path())
        .arg("--config")
        .arg(&site.config)
        .arg("status"));
    assert_eq!(human.code, 0);
    assert!(
        human
            .stdout
            .contains("2 databases, 1 hot (max 4), 1 cold, 0 waiting"),
        "{}",
        human.stdout
    );
    assert_eq!(agent.stop(), 0);
}
