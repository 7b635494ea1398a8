//! Issue 9, integrity: a restore is never another database's data or a stale one,
//! `multidb_wait` never says 1 for what is not in the replica, and one agent writes a replica.
//! One test per numbered case of the issue, with real processes: the `multidb` binary, the
//! `sqlite3` shell and writer processes with libmultidb, `moto_server` behind a fault proxy.
//!
//! The interfaces asserted on are the ones `/work/notes/integrity-spec.md` gives the
//! implementation: `multidb_status()` has `database.replicated` and `database.reason`;
//! `multidb databases` shows `refused`; `multidb status --json` has `errors` and
//! `oldest_unreplicated_ms`; a second agent exits 1 with
//! `another multidb agent (pid PID) is running`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::Value;

use multidb_tests::faultproxy::{FaultProxy, Mode};
use multidb_tests::s3server::{S3Server, BUCKET};
use multidb_tests::{extension, multidb, multidb_bin, run, Run};

use crate::agent::Site;

const WRITER: &str = env!("CARGO_BIN_EXE_multidb-writer");

/// How long `multidb_wait` may take to answer 0 for a database that is not replicated: the
/// spec allows the agent ~3 s to decide after a first commit; the rest is process start-up
/// on a two-core machine that may be running a build and other tests beside this one. "At
/// once" compared with the timeout the tests pass, [`WAIT_MS`].
const PROMPT: Duration = Duration::from_secs(20);

/// The `multidb_wait` timeout the tests pass: far above [`PROMPT`], so "answered 0 at once"
/// and "answered 0 at the timeout" stay apart however slow the machine.
const WAIT_MS: u64 = 60_000;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A `multidb agent` process with its own log file; killed when dropped.
struct AgentProc {
    child: Child,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl AgentProc {
    /// Starts the agent and returns at once (for races).
    fn spawn(dir: &Path, config: &Path, ring: &Path, env: &[(&'static str, String)]) -> AgentProc {
        let log = dir.join(format!(
            "agent-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(multidb_bin())
            .current_dir(dir)
            .env("MULTIDB_RING", ring)
            .env(
                "MULTIDB_LOG",
                std::env::var("MULTIDB_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .arg("--config")
            .arg(config)
            .arg("agent")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        AgentProc {
            child,
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            log,
        }
    }

    /// Starts the agent and waits until it answers `multidb status`.
    fn start(dir: &Path, config: &Path, ring: &Path, env: &[(&'static str, String)]) -> AgentProc {
        let mut agent = AgentProc::spawn(dir, config, ring, env);
        agent.wait_ready();
        agent
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.try_status().is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited with {status}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "agent did not answer: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_status(&self) -> Option<Value> {
        status_of(&self.dir, &self.config)
    }

    fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("no status: {}", self.log_text()))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, and the exit code.
    fn stop(mut self) -> i32 {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_of(dir: &Path, config: &Path) -> Option<Value> {
    let out = run(multidb(dir)
        .arg("--config")
        .arg(config)
        .args(["status", "--json"]));
    (out.code == 0)
        .then(|| serde_json::from_str(&out.stdout).ok())
        .flatten()
}

/// The error `multidb status --json` lists for `db`, in either shape the spec allows: an
/// object `path -> reason` or the existing array of `{"db", "last", ...}`.
fn status_error(status: &Value, db: &Path) -> Option<String> {
    let db = db.to_str().unwrap();
    match &status["errors"] {
        Value::Object(map) => map.get(db).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }),
        Value::Array(list) => list
            .iter()
            .find(|e| e["db"] == db || e["path"] == db)
            .map(|e| e.to_string()),
        _ => None,
    }
}

/// Writes the agent configuration: `pattern` (default: the site's seed layout), `extra` lines
/// in `multi_db:`, and the `replica_template:` block's body.
fn write_config(site: &Site, config: &Path, pattern: Option<&str>, extra: &str, replica: &str) {
    write_config_state(site, config, pattern, extra, replica, "state");
}

fn write_config_state(
    site: &Site,
    config: &Path,
    pattern: Option<&str>,
    extra: &str,
    replica: &str,
    state: &str,
) {
    let default = format!(
        "{}/*/databases/*/branches/*/tenants/*.db",
        site.tmp.path().join("data").display()
    );
    let yaml = format!(
        "multi_db:\n  discovery_pattern: \"{pattern}\"\n  max_active: 16\n  state_dir: \"{state}\"\n{extra}  replica_template:\n{replica}",
        pattern = pattern.unwrap_or(&default),
        state = site.tmp.path().join(state).display(),
    );
    std::fs::write(config, yaml).unwrap();
}

/// The replica block of a file replica below `<tmp>/replica` with `template` (in `{{ }}`).
fn file_replica(site: &Site, template: &str) -> String {
    format!(
        "    type: file\n    path: \"{}/{template}\"\n",
        site.tmp.path().join("replica").display()
    )
}

const SEED_TEMPLATE: &str = "{{project}}/{{database}}/{{branch}}/{{tenant}}";

/// `sqlite3` with libmultidb loaded, attached to `ring`, running `sql`.
fn sql_ext(db: &Path, ring: &Path, sql: &str) -> Run {
    run(Command::new("sqlite3")
        .env("MULTIDB_RING", ring)
        .arg("-bail")
        .arg(db)
        .arg(format!(".load {}", extension().display()))
        .arg(sql))
}

/// What one application session saw: `multidb_wait`'s answer, `multidb_status()` right
/// after, and how long the session took (start-up included, a few ms).
struct Waited {
    wait: String,
    status: Value,
    took: Duration,
    out: Run,
}

impl std::fmt::Display for Waited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "multidb_wait = {:?} after {:?}; multidb_status() = {}; stderr: {}",
            self.wait, self.took, self.status, self.out.stderr
        )
    }
}

/// Runs `statements` (may be empty), then `multidb_wait(timeout_ms)` and `multidb_status()`.
fn commit_and_wait(db: &Path, ring: &Path, statements: &str, timeout_ms: u64) -> Waited {
    let sql = format!("{statements}\nSELECT multidb_wait({timeout_ms});\nSELECT multidb_status();");
    let started = Instant::now();
    let out = sql_ext(db, ring, &sql);
    let took = started.elapsed();
    assert_eq!(out.code, 0, "sqlite3 on {}: {}", db.display(), out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines.len() >= 2, "{}: {}", db.display(), out.stdout);
    let status = serde_json::from_str(lines[lines.len() - 1])
        .unwrap_or_else(|e| panic!("multidb_status() is not JSON ({e}): {}", out.stdout));
    Waited {
        wait: lines[lines.len() - 2].trim().to_string(),
        status,
        took,
        out,
    }
}

/// The statements that stamp `db` with its own path in table `marks`: a row only this
/// database can have, so a restore holding another database's rows is caught.
fn mark(db: &Path, tag: &str) -> String {
    format!(
        "PRAGMA journal_mode=WAL;\nCREATE TABLE IF NOT EXISTS marks(path TEXT, tag TEXT);\nINSERT INTO marks VALUES ('{}', '{tag}');",
        db.display()
    )
}

/// The `marks` rows of a database (`path|tag`), empty without the table.
fn marks(db: &Path) -> Vec<String> {
    let out = run(Command::new("sqlite3")
        .arg("-readonly")
        .arg(db)
        .arg("SELECT path || '|' || tag FROM marks ORDER BY rowid;"));
    if out.code != 0 {
        return Vec::new();
    }
    out.stdout.lines().map(str::to_string).collect()
}

/// `.dump` of a database, read-only (so reading never checkpoints the source).
fn dump(db: &Path) -> String {
    let out = run(Command::new("sqlite3")
        .arg("-readonly")
        .arg(db)
        .arg(".dump"));
    assert_eq!(out.code, 0, "dump {}: {}", db.display(), out.stderr);
    out.stdout
}

/// `multidb restore` of `db` (by path, through the configuration) into a new file.
fn restore(
    dir: &Path,
    config: &Path,
    db: &Path,
    txid: Option<u64>,
    env: &[(&'static str, String)],
) -> (Run, PathBuf) {
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let out = scratch.join(format!(
        "restored-{}-{}.db",
        db.display().to_string().replace('/', "_"),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut command = multidb(dir);
    command
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .arg("--config")
        .arg(config)
        .arg("restore")
        .arg("-o")
        .arg(&out);
    if let Some(txid) = txid {
        command.args(["--txid", &txid.to_string()]);
    }
    command.arg(db);
    (run(&mut command), out)
}

/// Restores the latest state of `db` and requires it to equal the source (`.dump`) and to
/// hold no other database's marks.
fn assert_restores_equal(dir: &Path, config: &Path, db: &Path, env: &[(&'static str, String)]) {
    let (out, restored) = restore(dir, config, db, None, env);
    assert_eq!(
        out.code,
        0,
        "restoring {}: {}{}",
        db.display(),
        out.stdout,
        out.stderr
    );
    assert_only_own_marks(db, &restored);
    assert!(
        dump(&restored) == dump(db),
        "{} restores equal to its source (.dump):\n--- restored\n{}\n--- source\n{}",
        db.display(),
        head(&dump(&restored)),
        head(&dump(db))
    );
}

fn assert_only_own_marks(db: &Path, restored: &Path) {
    let own = format!("{}|", db.display());
    for row in marks(restored) {
        assert!(
            row.starts_with(&own),
            "the restore of {} holds another database's row: {row}",
            db.display()
        );
    }
}

/// The first lines of a dump, for readable failure messages.
fn head(text: &str) -> String {
    text.lines().take(12).collect::<Vec<_>>().join("\n")
}

/// The newest TXID in `db`'s replica (`multidb ltx --json`).
fn latest_txid(dir: &Path, config: &Path, db: &Path) -> u64 {
    let out = run(multidb(dir)
        .arg("--config")
        .arg(config)
        .args(["ltx", "--json"])
        .arg(db));
    assert_eq!(out.code, 0, "ltx {}: {}", db.display(), out.stderr);
    let files: Value = serde_json::from_str(&out.stdout).unwrap();
    files
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["max_txid"].as_u64())
        .max()
        .expect("the replica has files")
}

/// Every regular file below `dir` (none when it does not exist).
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_below(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

fn create_wal_db(db: &Path, sql: &str) {
    let out = run(Command::new("sqlite3")
        .arg(db)
        .arg(format!("PRAGMA journal_mode=WAL; {sql}")));
    assert_eq!(out.code, 0, "{}", out.stderr);
}

/// A long-lived application connection with libmultidb (`multidb-writer --wait`): each
/// `commit_and_wait` inserts into table `waits`, then runs `multidb_wait`.
struct Waiter {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Waiter {
    fn start(ring: &Path, db: &Path) -> Waiter {
        let mut child = Command::new(WRITER)
            .env("MULTIDB_RING", ring)
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

    /// Commits `k`, then `multidb_wait(timeout_ms)`: its answer and how long it took.
    fn commit_and_wait(&mut self, k: u64, timeout_ms: u64) -> (String, Duration) {
        let started = Instant::now();
        writeln!(self.stdin, "{k} {timeout_ms}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        (line.trim().to_string(), started.elapsed())
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a writer process and requires success.
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

/// For every database of the site: one more commit, `multidb_wait` must say 1, and then the
/// latest restore equals the source.
fn ack_and_compare_all(
    site: &Site,
    config: &Path,
    ring: &Path,
    timeout_ms: u64,
    env: &[(&'static str, String)],
) {
    for db in &site.dbs {
        let w = commit_and_wait(db, ring, &mark(db, "final"), timeout_ms);
        assert_eq!(
            w.wait,
            "1",
            "{}: the final commit is acknowledged: {w}",
            db.display()
        );
    }
    for db in &site.dbs {
        assert_restores_equal(site.tmp.path(), config, db, env);
    }
}

fn metrics(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn reason(w: &Waited) -> String {
    w.status["database"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The checks every "not replicated" answer shares: 0, promptly, `replicated: false` and a
/// reason containing `why` (empty: any non-empty reason).
fn assert_refused(w: &Waited, what: &str, why: &str) {
    assert_eq!(w.wait, "0", "{what}: multidb_wait must say 0: {w}");
    assert!(
        w.took < PROMPT,
        "{what}: multidb_wait(10000) must answer 0 at once, not after its timeout: {w}"
    );
    assert_eq!(
        w.status["database"]["replicated"],
        Value::Bool(false),
        "{what}: multidb_status() says replicated: false: {w}"
    );
    let r = reason(w);
    assert!(
        !r.is_empty() && r.contains(why),
        "{what}: multidb_status() gives the reason (containing {why:?}): {w}"
    );
}

// ---------------------------------------------------------------------------------------
// Case 1: template collisions, and a replica location holding another database
// ---------------------------------------------------------------------------------------

/// `path: "<root>/{{database}}/{{branch}}/{{tenant}}"` and two projects that both have
/// `userdb/branches/main/tenants/acme.db`: both are refused (`databases`, `status`,
/// `multidb_status()`, the metric, the log), `multidb_wait` says 0 at once, nothing is written
/// at the shared location and no restore returns the other's rows. A third database with a
/// location of its own is replicated as usual.
#[test]
fn integrity_1_template_collision_refuses_both_databases() {
    let port = free_port();
    let site = Site::new([2, 1, 1, 1], 8, "");
    let pa = site.dbs[0].clone();
    let pb = site.dbs[1].clone();
    assert!(pa.ends_with("project1/databases/userdb/branches/main/tenants/acme.db"));
    assert!(pb.ends_with("project2/databases/userdb/branches/main/tenants/acme.db"));
    let control = site
        .tmp
        .path()
        .join("data/project3/databases/otherdb/branches/main/tenants/acme.db");
    std::fs::create_dir_all(control.parent().unwrap()).unwrap();
    create_wal_db(&control, "CREATE TABLE t(x);");
    write_config(
        &site,
        &site.config,
        None,
        &format!("  sync_interval: 100ms\n  scan_interval: 1s\n  addr: \":{port}\"\n"),
        &file_replica(&site, "{{database}}/{{branch}}/{{tenant}}"),
    );
    let shared_location = site.tmp.path().join("replica/userdb/main/acme");
    let agent = AgentProc::start(site.tmp.path(), &site.config, &site.ring, &[]);

    for db in [&pa, &pb] {
        let w = commit_and_wait(db, &site.ring, &mark(db, "1"), WAIT_MS);
        // The status table has a reason code, not room for the other path: `databases` and
        // `status` name it (below).
        assert_refused(
            &w,
            &db.display().to_string(),
            "shares its replica location with",
        );
        assert_eq!(w.status["database"]["tier"], "refused", "{w}");
    }
    let w = commit_and_wait(&control, &site.ring, &mark(&control, "1"), WAIT_MS);
    assert_eq!(
        w.wait, "1",
        "a database with its own location is replicated: {w}"
    );
    assert_eq!(w.status["database"]["replicated"], true, "{w}");

    // `multidb status --json` lists both under errors; the metric counts them.
    let status = agent.status();
    for (db, other) in [(&pa, &pb), (&pb, &pa)] {
        let error = status_error(&status, db)
            .unwrap_or_else(|| panic!("status has no error for {}: {status}", db.display()));
        assert!(error.contains(other.to_str().unwrap()), "{error}");
    }
    assert!(status_error(&status, &control).is_none(), "{status}");
    // Refreshed every 250 ms by a scheduler a loaded machine may run late: asked for 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics(port);
        if m.contains("multidb_databases_refused 2\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metric multidb_databases_refused 2 in:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // `multidb databases`, for people and as JSON.
    let out = run(multidb(site.tmp.path())
        .arg("--config")
        .arg(&site.config)
        .arg("databases"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    for (db, other) in [(&pa, &pb), (&pb, &pa)] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(db.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{} not listed: {}", db.display(), out.stdout));
        assert!(
            line.contains("refused") && line.contains(other.to_str().unwrap()),
            "databases shows the refusal naming the other database: {line}"
        );
    }
    let out = run(multidb(site.tmp.path())
        .arg("--config")
        .arg(&site.config)
        .args(["databases", "--json"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    let entry = |db: &Path| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == db.to_str().unwrap())
            .unwrap_or_else(|| panic!("{} not in {list}", db.display()))
            .clone()
    };
    for (db, other) in [(&pa, &pb), (&pb, &pa)] {
        let refused = entry(db)["refused"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            refused.contains(other.to_str().unwrap()),
            "databases --json: {}",
            entry(db)
        );
    }
    assert!(entry(&control)["refused"].is_null(), "{}", entry(&control));

    // Warned about, and nothing written at the shared location, even after more scans.
    std::thread::sleep(Duration::from_secs(2));
    let log = agent.log_text();
    assert!(
        log.contains(pa.to_str().unwrap()) && log.contains(pb.to_str().unwrap()),
        "the agent warns about both databases:\n{log}"
    );
    let warnings = log
        .lines()
        .filter(|l| l.contains("replica location shared with"))
        .count();
    assert_eq!(
        warnings, 2,
        "one warning per database, not one per scan (scans every second):\n{log}"
    );
    let written = files_below(&shared_location);
    assert!(
        written.is_empty(),
        "nothing is written at the shared location: {written:?}"
    );

    // No restore returns the other's rows: refused, or only its own.
    for db in [&pa, &pb] {
        let (out, restored) = restore(site.tmp.path(), &site.config, db, None, &[]);
        if out.code == 0 {
            assert_only_own_marks(db, &restored);
        }
    }
    assert_restores_equal(site.tmp.path(), &site.config, &control, &[]);
    assert_eq!(agent.stop(), 0);
}

/// A replica location whose identity object (`multidb.json`) names another database is not
/// appended to: `multidb_wait` says 0 at once, `multidb_status()` and `status` say why, and
/// the location keeps only what was there.
#[test]
fn integrity_1_replica_identity_of_another_database_is_refused() {
    let site = Site::new([1, 1, 1, 2], 8, "");
    write_config(
        &site,
        &site.config,
        None,
        "  sync_interval: 100ms\n  scan_interval: 1s\n",
        &file_replica(&site, SEED_TEMPLATE),
    );
    let db = site.dbs[0].clone();
    let control = site.dbs[1].clone();
    let location = site.replica_of(&db);
    std::fs::create_dir_all(&location).unwrap();
    let identity = serde_json::json!({"database": "/elsewhere/another/tenant.db"}).to_string();
    std::fs::write(location.join("multidb.json"), &identity).unwrap();
    let agent = AgentProc::start(site.tmp.path(), &site.config, &site.ring, &[]);

    let w = commit_and_wait(&db, &site.ring, &mark(&db, "1"), WAIT_MS);
    assert_refused(&w, "identity of another database", "another database");
    let w = commit_and_wait(&control, &site.ring, &mark(&control, "1"), WAIT_MS);
    assert_eq!(
        w.wait, "1",
        "the other database is replicated as usual: {w}"
    );

    let status = agent.status();
    assert!(
        status_error(&status, &db).is_some(),
        "status --json lists {}: {status}",
        db.display()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        files_below(&location),
        [location.join("multidb.json")],
        "nothing is appended to another database's replica"
    );
    assert_eq!(
        std::fs::read_to_string(location.join("multidb.json")).unwrap(),
        identity,
        "the identity is left as it was"
    );
    // The control's location now says whose history it is.
    let own: Value = serde_json::from_str(
        &std::fs::read_to_string(site.replica_of(&control).join("multidb.json"))
            .expect("a replicated location has multidb.json"),
    )
    .unwrap();
    assert_eq!(own["database"], control.to_str().unwrap());
    assert_eq!(agent.stop(), 0);
}

// ---------------------------------------------------------------------------------------
// Case 2: a database replaced at its path while hot
// ---------------------------------------------------------------------------------------

/// The first half of both replacement tests: an agent, and `db` with old content in the
/// replica. Returns the agent, the old `.dump` and the old file's last TXID.
fn replaced_setup(site: &Site, db: &Path) -> (AgentProc, String, u64) {
    write_config(
        site,
        &site.config,
        None,
        "  sync_interval: 100ms\n  scan_interval: 1s\n  idle_timeout: 60s\n",
        &file_replica(site, SEED_TEMPLATE),
    );
    let agent = AgentProc::start(site.tmp.path(), &site.config, &site.ring, &[]);
    let old = format!(
        "{}\nCREATE TABLE old(v); INSERT INTO old VALUES ('old-1'), ('old-2');",
        mark(db, "old")
    );
    let w = commit_and_wait(db, &site.ring, &old, WAIT_MS);
    assert_eq!(w.wait, "1", "the old content is acknowledged: {w}");
    let w = commit_and_wait(db, &site.ring, "INSERT INTO old VALUES ('old-3');", WAIT_MS);
    assert_eq!(w.wait, "1", "{w}");
    assert_eq!(w.status["database"]["tier"], "hot", "{w}");
    let old_dump = dump(db);
    let old_txid = latest_txid(site.tmp.path(), &site.config, db);
    (agent, old_dump, old_txid)
}

/// The second half: the new file is acknowledged, the latest restore is the new file (right
/// after a plain read, and after one more commit), and the old TXID restores the old file.
fn replaced_check(site: &Site, db: &Path, old_dump: &str, old_txid: u64, new_sql: &str) {
    let w = commit_and_wait(db, &site.ring, new_sql, WAIT_MS);
    assert_eq!(
        w.wait, "1",
        "multidb_wait says 1 for the new database's commit: {w}"
    );
    // A plain reader (no extension) opens it once, as in the issue.
    let out = run(Command::new("sqlite3")
        .arg(db)
        .arg("SELECT count(*) FROM marks;"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    std::thread::sleep(Duration::from_millis(2500));
    let new_dump = dump(db);
    assert_ne!(new_dump, old_dump);
    assert_restores_equal(site.tmp.path(), &site.config, db, &[]);

    let w = commit_and_wait(db, &site.ring, &mark(db, "new-2"), WAIT_MS);
    assert_eq!(w.wait, "1", "{w}");
    assert_restores_equal(site.tmp.path(), &site.config, db, &[]);

    let (out, restored) = restore(site.tmp.path(), &site.config, db, Some(old_txid), &[]);
    assert_eq!(
        out.code, 0,
        "the old file's history stays restorable at TXID {old_txid}: {}",
        out.stderr
    );
    assert!(
        dump(&restored) == old_dump,
        "TXID {old_txid} restores the old file:\n{}\n--- expected\n{}",
        head(&dump(&restored)),
        head(old_dump)
    );
}

/// `rm` of a hot database and its `-wal`/`-shm`, a new one created at the path through
/// libmultidb: a new history that starts with a snapshot.
#[test]
fn integrity_2_database_removed_and_recreated_while_hot() {
    let site = Site::new([1, 1, 1, 2], 8, "");
    let db = site.dbs[0].clone();
    let (agent, old_dump, old_txid) = replaced_setup(&site, &db);
    remove_db(&db);
    let new_sql = format!(
        "{}\nCREATE TABLE fresh(v); INSERT INTO fresh VALUES ('new-1');",
        mark(&db, "new")
    );
    replaced_check(&site, &db, &old_dump, old_txid, &new_sql);
    assert_eq!(agent.stop(), 0);
}

/// `mv` of another database over a hot one (the stale `-wal`/`-shm` removed, as SQLite
/// requires): the moved-in file is a new history.
#[test]
fn integrity_2_database_moved_over_while_hot() {
    let site = Site::new([1, 1, 1, 2], 8, "");
    let db = site.dbs[0].clone();
    let (agent, old_dump, old_txid) = replaced_setup(&site, &db);
    let other = site.tmp.path().join("other.db");
    create_wal_db(
        &other,
        "CREATE TABLE moved(v); INSERT INTO moved VALUES ('moved-1'), ('moved-2');",
    );
    assert!(!site.tmp.path().join("other.db-wal").exists());
    std::fs::rename(&other, &db).unwrap();
    for suffix in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    replaced_check(&site, &db, &old_dump, old_txid, &mark(&db, "moved"));
    assert_eq!(agent.stop(), 0);
}

// ---------------------------------------------------------------------------------------
// Case 3: two agents at once
// ---------------------------------------------------------------------------------------

/// Starts two agents in the same instant (threads released by one barrier); returns the one
/// that keeps running and the loser's exit code and stderr. Fails when both keep running.
fn race(dir: &Path, a: (&Path, &Path), b: (&Path, &Path)) -> (AgentProc, i32, String, u32) {
    let barrier = Arc::new(Barrier::new(2));
    let spawn = |(config, ring): (&Path, &Path)| {
        let (dir, config, ring) = (dir.to_path_buf(), config.to_path_buf(), ring.to_path_buf());
        let barrier = Arc::clone(&barrier);
        std::thread::spawn(move || {
            barrier.wait();
            AgentProc::spawn(&dir, &config, &ring, &[])
        })
    };
    let (ta, tb) = (spawn(a), spawn(b));
    let mut agents = vec![ta.join().unwrap(), tb.join().unwrap()];
    let deadline = Instant::now() + Duration::from_secs(30);
    let loser = loop {
        let exited: Vec<usize> = (0..2).filter(|&i| !agents[i].running()).collect();
        match exited.as_slice() {
            [] => {}
            [i] => break *i,
            _ => panic!(
                "both agents exited:\n{}\n{}",
                agents[0].log_text(),
                agents[1].log_text()
            ),
        }
        assert!(
            Instant::now() < deadline,
            "two agents started together both still run after 30 s (pids {} and {})",
            agents[0].pid(),
            agents[1].pid()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut loser = agents.remove(loser);
    let mut winner = agents.remove(0);
    let code = loser.child.wait().unwrap().code().unwrap_or(-1);
    let stderr = loser.log_text();
    let loser_pid = loser.pid();
    drop(loser);
    winner.wait_ready();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        winner.running(),
        "the first agent keeps running: {}",
        winner.log_text()
    );
    assert_eq!(
        winner.status()["pid"],
        winner.pid(),
        "the running agent answers status"
    );
    (winner, code, stderr, loser_pid)
}

fn assert_second_refused(winner: &AgentProc, code: i32, stderr: &str, names: &Path) {
    assert_eq!(code, 1, "the second agent exits 1: {stderr}");
    let expected = format!("another multidb agent (pid {}) is running", winner.pid());
    assert!(
        stderr.contains(&expected),
        "the second agent names the running one ({expected}): {stderr}"
    );
    assert!(
        stderr.contains(names.to_str().unwrap()),
        "the second agent names {}: {stderr}",
        names.display()
    );
}

/// Two agents with the same configuration started in the same instant, ring file absent, 10
/// times: exactly one keeps running, the other exits 1 naming its pid. With writers running
/// afterwards, every acknowledged database restores equal to its source.
#[test]
fn integrity_3_two_agents_started_together_ten_times() {
    let site = Site::new([1, 1, 2, 2], 8, "");
    write_config(
        &site,
        &site.config,
        None,
        "  sync_interval: 100ms\n  scan_interval: 1s\n",
        &file_replica(&site, SEED_TEMPLATE),
    );
    let dir = site.tmp.path();
    let conf = (site.config.as_path(), site.ring.as_path());
    let mut last = None;
    for round in 0..10 {
        let _ = std::fs::remove_file(&site.ring);
        let (winner, code, stderr, _) = race(dir, conf, conf);
        assert_second_refused(&winner, code, &stderr, &dir.join("state"));
        eprintln!(
            "round {round}: agent {} runs; the other: {stderr}",
            winner.pid()
        );
        if round < 9 {
            assert_eq!(winner.stop(), 0);
        } else {
            last = Some(winner);
        }
    }
    let agent = last.unwrap();
    let writers: Vec<Child> = (0..2u64)
        .map(|n| site.writer(40 + n, 5.0, true, n == 1, 40.0))
        .collect();
    let committed: u64 = writers.into_iter().map(finish).sum();
    assert!(committed > 20);
    ack_and_compare_all(&site, &site.config, &site.ring, 20_000, &[]);
    assert_eq!(agent.stop(), 0);
}

/// The same race with another `MULTIDB_RING` but the same state directory (refused by the
/// state lock), and with the same ring but another state directory (refused by the ring).
#[test]
fn integrity_3_second_agent_with_other_ring_or_other_state_dir() {
    let site = Site::new([1, 1, 1, 2], 8, "");
    let extra = "  sync_interval: 100ms\n  scan_interval: 1s\n";
    let replica = file_replica(&site, SEED_TEMPLATE);
    write_config(&site, &site.config, None, extra, &replica);
    let dir = site.tmp.path();
    let other_config = dir.join("other-state.yml");
    write_config_state(&site, &other_config, None, extra, &replica, "state2");
    let other_ring = dir.join("ring2");
    for round in 0..3 {
        // Another ring, the same state directory.
        let _ = std::fs::remove_file(&site.ring);
        let _ = std::fs::remove_file(&other_ring);
        let (winner, code, stderr, _) =
            race(dir, (&site.config, &site.ring), (&site.config, &other_ring));
        assert_second_refused(&winner, code, &stderr, &dir.join("state"));
        eprintln!("round {round}, other ring: {stderr}");
        assert_eq!(winner.stop(), 0);

        // The same ring, another state directory.
        let _ = std::fs::remove_file(&site.ring);
        let (winner, code, stderr, _) =
            race(dir, (&site.config, &site.ring), (&other_config, &site.ring));
        assert_second_refused(&winner, code, &stderr, &site.ring);
        eprintln!("round {round}, other state dir: {stderr}");
        assert_eq!(winner.stop(), 0);
    }
}

// ---------------------------------------------------------------------------------------
// Case 4: false acknowledgements
// ---------------------------------------------------------------------------------------

/// Databases under the pattern that cannot be replicated (rollback journal, an empty file,
/// a MEMORY journal): `multidb_wait` says 0 well before its timeout, and `multidb_status()`
/// says `replicated: false` with a reason. A WAL database beside them is acknowledged.
#[test]
fn integrity_4_no_acknowledgement_for_what_is_not_replicated() {
    let site = Site::new([1, 1, 1, 4], 8, "");
    write_config(
        &site,
        &site.config,
        None,
        "  sync_interval: 100ms\n  scan_interval: 1s\n",
        &file_replica(&site, SEED_TEMPLATE),
    );
    let [rollback, empty, memory, wal] = [0, 1, 2, 3].map(|i| site.dbs[i].clone());
    for db in [&rollback, &memory] {
        let out = run(Command::new("sqlite3")
            .arg(db)
            .arg("PRAGMA journal_mode=DELETE;"));
        assert_eq!(out.stdout.trim(), "delete", "{}", out.stderr);
    }
    remove_db(&empty);
    std::fs::write(&empty, b"").unwrap();
    let agent = AgentProc::start(site.tmp.path(), &site.config, &site.ring, &[]);
    std::thread::sleep(Duration::from_millis(1500));

    let rollback_sql = "CREATE TABLE IF NOT EXISTS r(x); INSERT INTO r VALUES (1);";
    let w = commit_and_wait(&rollback, &site.ring, rollback_sql, WAIT_MS);
    assert_refused(&w, "rollback-journal database", "WAL");
    // A second commit after the agent had time to look: still 0.
    let w = commit_and_wait(&rollback, &site.ring, rollback_sql, WAIT_MS);
    assert_refused(&w, "rollback-journal database, again", "WAL");

    let w = commit_and_wait(&empty, &site.ring, "", WAIT_MS);
    assert_refused(&w, "empty file", "");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);

    let w = commit_and_wait(
        &memory,
        &site.ring,
        "PRAGMA journal_mode=MEMORY; CREATE TABLE IF NOT EXISTS m(x); INSERT INTO m VALUES (1);",
        WAIT_MS,
    );
    assert_refused(&w, "MEMORY-journal database", "WAL");

    let w = commit_and_wait(&wal, &site.ring, &mark(&wal, "1"), WAIT_MS);
    assert_eq!(w.wait, "1", "a WAL database is acknowledged: {w}");
    assert_eq!(w.status["database"]["replicated"], true, "{w}");
    assert!(w.status["database"]["reason"].is_null(), "{w}");
    assert_restores_equal(site.tmp.path(), &site.config, &wal, &[]);
    assert_eq!(agent.stop(), 0);
}

// ---------------------------------------------------------------------------------------
// Case 5: the ring deleted under a running agent
// ---------------------------------------------------------------------------------------

/// The ring file deleted under a running agent with writers: within a few seconds it exists
/// again and `multidb_wait` says 1 for new commits without restarting anything; then the same
/// after the ring is replaced by another (valid, unowned) ring file; and a later
/// `multidb ring tail` does not become a second consumer.
#[test]
fn integrity_5_ring_deleted_under_running_agent_comes_back() {
    let site = Site::new([1, 1, 2, 2], 8, "");
    write_config(
        &site,
        &site.config,
        None,
        "  sync_interval: 100ms\n  scan_interval: 1s\n",
        &file_replica(&site, SEED_TEMPLATE),
    );
    let agent = AgentProc::start(site.tmp.path(), &site.config, &site.ring, &[]);
    let writers: Vec<Child> = (0..2u64)
        .map(|n| site.writer(50 + n, 20.0, true, n == 1, 20.0))
        .collect();
    let mut waiter = Waiter::start(&site.ring, &site.dbs[0]);
    assert_eq!(waiter.commit_and_wait(1, WAIT_MS).0, "1");

    std::fs::remove_file(&site.ring).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !site.ring.exists() {
        assert!(
            Instant::now() < deadline,
            "the agent did not recreate its deleted ring within 30 s: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // "Within a few seconds": a commit made while the extension still looks at the old ring
    // or at the new one before its first heartbeat may be answered 0; soon after the ring is
    // back (5 s on a quiet machine; 30 s allowed beside a build), every commit is
    // acknowledged.
    let back = Instant::now();
    let mut k = 2;
    loop {
        let (answer, took) = waiter.commit_and_wait(k, WAIT_MS);
        k += 1;
        if answer == "1" {
            eprintln!(
                "first acknowledgement {:?} after the ring came back",
                back.elapsed()
            );
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "multidb_wait does not work again within 30 s without a restart (last: {answer:?} after {took:?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (answer, took) = waiter.commit_and_wait(k, WAIT_MS);
    assert_eq!(answer, "1", "{took:?}");
    let w = commit_and_wait(&site.dbs[1], &site.ring, &mark(&site.dbs[1], "1"), WAIT_MS);
    assert_eq!(w.wait, "1", "{w}");
    assert_eq!(w.status["agent"]["running"], true, "{w}");
    assert_eq!(w.status["agent"]["pid"], agent.pid(), "{w}");

    // Replaced: a copy of the ring (a valid ring file, but not the one the agent reads)
    // renamed over it. The agent takes the path back; applications follow within seconds.
    let copy = site.tmp.path().join("ring.copy");
    std::fs::copy(&site.ring, &copy).unwrap();
    std::fs::rename(&copy, &site.ring).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let w = commit_and_wait(&site.dbs[1], &site.ring, &mark(&site.dbs[1], "2"), 10_000);
        if w.wait == "1" && w.status["agent"]["pid"] == agent.pid() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the ring was replaced, commits are not acknowledged within 60 s: {w}\n{}",
            agent.log_text()
        );
    }
    let (answer, _) = waiter.commit_and_wait(500, WAIT_MS);
    assert_eq!(
        answer, "1",
        "the long-lived connection follows the replaced ring"
    );
    let ring_ino = std::fs::metadata(&site.ring).unwrap().ino();

    // `multidb ring tail` on the agent's ring does not take its records.
    let mut tail = Command::new(multidb_bin())
        .args(["ring", "--ring"])
        .arg(&site.ring)
        .args(["tail", "--json", "--idle-exit", "2s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for k in 1000..1004 {
        let (answer, took) = waiter.commit_and_wait(k, WAIT_MS);
        assert_eq!(answer, "1", "commit {k} while ring tail runs ({took:?})");
    }
    let _ = tail.kill();
    let out = tail.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let consumed = stdout.lines().filter(|l| l.contains("\"commit\"")).count();
    assert_eq!(
        consumed, 0,
        "ring tail consumed {consumed} commit records of the agent's ring: {stderr}"
    );
    assert_eq!(
        std::fs::metadata(&site.ring).unwrap().ino(),
        ring_ino,
        "ring tail left the agent's ring in place"
    );
    assert_eq!(agent.status()["pid"], agent.pid());

    for writer in writers {
        finish(writer);
    }
    drop(waiter);
    ack_and_compare_all(&site, &site.config, &site.ring, 20_000, &[]);
    assert_eq!(agent.stop(), 0);
}

// ---------------------------------------------------------------------------------------
// Case 6: stale status
// ---------------------------------------------------------------------------------------

/// The agent restarted with a configuration whose pattern no longer matches a database: no
/// application is shown the old run's tier and TXID, and `multidb_wait` says 0.
#[test]
fn integrity_6_status_of_a_previous_agent_run_is_never_served() {
    let site = Site::new([1, 1, 1, 2], 8, "");
    let (acme, globex) = (site.dbs[0].clone(), site.dbs[1].clone());
    assert!(acme.ends_with("acme.db") && globex.ends_with("globex.db"));
    let extra = "  sync_interval: 100ms\n  scan_interval: 1s\n";
    let replica = file_replica(&site, SEED_TEMPLATE);
    write_config(&site, &site.config, None, extra, &replica);
    let agent = AgentProc::start(site.tmp.path(), &site.config, &site.ring, &[]);
    let mut waiter = Waiter::start(&site.ring, &acme);
    assert_eq!(waiter.commit_and_wait(1, WAIT_MS).0, "1");
    let w = commit_and_wait(&globex, &site.ring, &mark(&globex, "1"), WAIT_MS);
    assert_eq!(w.wait, "1", "{w}");
    assert_eq!(agent.stop(), 0);

    // Only globex matches now.
    let narrowed = format!(
        "{}/*/databases/*/branches/*/tenants/g*.db",
        site.tmp.path().join("data").display()
    );
    write_config(&site, &site.config, Some(&narrowed), extra, &replica);
    let agent = AgentProc::start(site.tmp.path(), &site.config, &site.ring, &[]);

    let w = commit_and_wait(&acme, &site.ring, &mark(&acme, "2"), WAIT_MS);
    assert_refused(&w, "a database outside the new pattern", "does not match");
    let database = &w.status["database"];
    assert!(
        database["tier"] != "hot" && database["tier"] != "cold",
        "no tier of the old run: {w}"
    );
    assert!(
        database["replicated_txid"].is_null(),
        "no TXID of the old run: {w}"
    );
    // The application that was connected across the restart is not told 1 either.
    let (answer, took) = waiter.commit_and_wait(2, WAIT_MS);
    assert_eq!(answer, "0", "the long-lived connection gets 0 ({took:?})");
    assert!(took < PROMPT, "{took:?}");

    // The database that still matches is replicated by the new run.
    let w = commit_and_wait(&globex, &site.ring, &mark(&globex, "2"), WAIT_MS);
    assert_eq!(w.wait, "1", "{w}");
    assert_eq!(w.status["database"]["replicated"], true, "{w}");
    assert_eq!(w.status["agent"]["pid"], agent.pid(), "{w}");
    assert_restores_equal(site.tmp.path(), &site.config, &globex, &[]);
    assert_eq!(agent.stop(), 0);
}

// ---------------------------------------------------------------------------------------
// Case 7: slow S3 and S3 outages
// ---------------------------------------------------------------------------------------

/// `oldest_unreplicated_ms` from `multidb status --json`; fails when it is missing.
fn oldest_unreplicated(status: &Value) -> u64 {
    status["oldest_unreplicated_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("status --json has no oldest_unreplicated_ms: {status}"))
}

/// Samples `oldest_unreplicated_ms` once a second for `seconds`; the agent must answer
/// `status` throughout.
fn sample(agent: &AgentProc, seconds: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        let status = agent.status();
        out.push(oldest_unreplicated(&status));
        std::thread::sleep(Duration::from_secs(1));
    }
    out
}

/// Writers to an S3 replica through the fault proxy: slow (2 s per chunk) for 45 s, then
/// refused, then blackholed, then back. The stall shows in `status --json` and the metric
/// while it happens; afterwards every database is acknowledged and restores equal to its
/// source, with none of another database's rows.
#[test]
fn integrity_7_slow_s3_and_outages_through_a_proxy() {
    let server = S3Server::start();
    let upstream: std::net::SocketAddr = server
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = FaultProxy::start(upstream);
    let port = free_port();
    let site = Site::new([1, 1, 2, 2], 8, "");
    write_config(
        &site,
        &site.config,
        None,
        &format!("  sync_interval: 200ms\n  scan_interval: 2s\n  addr: \":{port}\"\n"),
        &format!(
            "    type: s3\n    bucket: {BUCKET}\n    endpoint: \"{}\"\n    path: \"integrity/{SEED_TEMPLATE}\"\n",
            proxy.endpoint()
        ),
    );
    let env = server.env();
    let agent = AgentProc::start(site.tmp.path(), &site.config, &site.ring, &env);
    let (slow, refuse, blackhole) = (45u64, 8u64, 8u64);
    let writing = (5 + slow + refuse + blackhole) as f64;
    let writers: Vec<Child> = (0..2u64)
        .map(|n| site.writer(70 + n, writing, true, n == 1, 10.0))
        .collect();
    let mut waiter = Waiter::start(&site.ring, &site.dbs[0]);
    let (answer, _) = waiter.commit_and_wait(1, 30_000);
    assert_eq!(answer, "1", "a commit reaches S3 through the proxy");
    std::thread::sleep(Duration::from_secs(3));
    let baseline = oldest_unreplicated(&agent.status());
    eprintln!("oldest_unreplicated_ms before the faults: {baseline}");

    // Slow S3: the lag grows while it lasts, and it is reported as it is, not from before.
    proxy.set_mode(Mode::Slow(Duration::from_secs(2)));
    let mut slow_samples = sample(&agent, slow / 2);
    let m = metrics(port);
    assert!(
        m.contains("multidb_oldest_unreplicated_seconds"),
        "metric multidb_oldest_unreplicated_seconds in:\n{m}"
    );
    slow_samples.extend(sample(&agent, slow - slow / 2));
    eprintln!("slow S3, oldest_unreplicated_ms: {slow_samples:?}");
    let max = *slow_samples.iter().max().unwrap();
    assert!(
        max >= 4000,
        "with 2 s per chunk, commits wait seconds for the replica: {slow_samples:?}"
    );
    let mut distinct = slow_samples.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() >= 3,
        "oldest_unreplicated_ms moves while S3 is slow: {slow_samples:?}"
    );

    // S3 refuses connections: nothing can be replicated, and the lag says so.
    let refused_before = proxy.counts().refused;
    proxy.set_mode(Mode::Refuse);
    let refuse_samples = sample(&agent, refuse);
    eprintln!("refused, oldest_unreplicated_ms: {refuse_samples:?}");
    assert!(
        proxy.counts().refused > refused_before,
        "the agent kept trying"
    );
    assert!(
        *refuse_samples.last().unwrap() >= (refuse - 3) * 1000,
        "the lag grows through the outage: {refuse_samples:?}"
    );

    // S3 does not answer at all.
    proxy.set_mode(Mode::Blackhole);
    let blackhole_samples = sample(&agent, blackhole);
    eprintln!("blackholed, oldest_unreplicated_ms: {blackhole_samples:?}");
    assert!(
        *blackhole_samples.last().unwrap() >= (blackhole - 3) * 1000,
        "the lag grows through the outage: {blackhole_samples:?}"
    );

    proxy.set_mode(Mode::Pass);
    let committed: u64 = writers.into_iter().map(finish).sum();
    assert!(committed > 100, "{committed}");
    let (answer, took) = waiter.commit_and_wait(2, 60_000);
    assert_eq!(
        answer, "1",
        "after the outage, commits are acknowledged ({took:?})"
    );
    drop(waiter);
    ack_and_compare_all(&site, &site.config, &site.ring, 60_000, &env);
    let status = agent.status();
    eprintln!("after: {status}\nproxy: {:?}", proxy.counts());
    assert!(oldest_unreplicated(&status) < 5000, "caught up: {status}");
    assert_eq!(agent.stop(), 0);
}

// ---------------------------------------------------------------------------------------
// Issue 13, the agent's front door
// ---------------------------------------------------------------------------------------

/// Demotion comes at `idle_timeout` after the last commit, not after the last change the
/// agent merely saw: here the `-wal` is touched every 300 ms (as the agent's own checkpoint
/// or a WAL deleted on close would change it) and the database must still be demoted.
#[test]
fn front_door_idle_demotion_is_not_delayed_by_changes_without_a_commit() {
    let site = Site::new([1, 1, 1, 2], 4, "");
    write_config(
        &site,
        &site.config,
        None,
        "  sync_interval: 100ms\n  scan_interval: 1s\n  idle_timeout: 2s\n",
        &file_replica(&site, SEED_TEMPLATE),
    );
    let agent = AgentProc::start(site.tmp.path(), &site.config, &site.ring, &[]);
    let db = &site.dbs[0];
    let w = commit_and_wait(db, &site.ring, &mark(db, "idle"), WAIT_MS);
    assert_eq!(w.wait, "1", "{w}");
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let committed = Instant::now();
    let demoted = loop {
        // Demoted at least once while the changes go on (an inotify watch may promote it
        // again at the next change: a `-wal` whose mtime moved may hold a commit, and only a
        // look at it tells).
        let s = agent.status();
        if s["demotions"].as_u64().unwrap_or(0) >= 1 {
            break committed.elapsed();
        }
        assert!(
            committed.elapsed() < Duration::from_secs(15),
            "not demoted 15 s after the last commit with idle_timeout 2s while its -wal kept changing: {s}\n{}",
            agent.log_text()
        );
        // A change without a commit: the -wal's mtime moves.
        let now = std::time::SystemTime::now();
        std::fs::File::options()
            .append(true)
            .open(&wal)
            .and_then(|f| f.set_modified(now))
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
    };
    eprintln!("demoted {demoted:?} after the last commit (idle_timeout 2 s)");
    // Once the changes stop, it is cold within idle_timeout and stays so.
    let quiet = Instant::now();
    loop {
        let s = agent.status();
        if s["tiers"]["hot"] == 0 {
            break;
        }
        assert!(
            quiet.elapsed() < Duration::from_secs(30),
            "still hot 30 s after the last change with idle_timeout 2s: {s}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agent.stop(), 0);
    assert_restores_equal(site.tmp.path(), &site.config, db, &[]);
}

/// SIGTERM while the replica is unreachable: the final syncs fail, the agent exits 1 and
/// names the databases that were not synced (it used to exit 0).
#[test]
fn front_door_sigterm_after_a_failed_final_sync_exits_1_naming_the_databases() {
    let server = S3Server::start();
    let upstream: std::net::SocketAddr = server
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = FaultProxy::start(upstream);
    let site = Site::new([1, 1, 1, 2], 4, "");
    write_config(
        &site,
        &site.config,
        None,
        "  sync_interval: 5s\n  scan_interval: 1s\n",
        &format!(
            "    type: s3\n    bucket: {BUCKET}\n    endpoint: \"{}\"\n    path: \"front/{SEED_TEMPLATE}\"\n",
            proxy.endpoint()
        ),
    );
    let env = server.env();
    let agent = AgentProc::start(site.tmp.path(), &site.config, &site.ring, &env);
    let db = &site.dbs[0];
    let w = commit_and_wait(db, &site.ring, &mark(db, "first"), 30_000);
    assert_eq!(w.wait, "1", "{w}");
    // The store goes away; a commit is made (the next sync is 5 s off), then SIGTERM.
    proxy.set_mode(Mode::Refuse);
    let out = sql_ext(db, &site.ring, &mark(db, "second"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    std::thread::sleep(Duration::from_millis(300));
    let log = agent.log.clone();
    let code = agent.stop();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, 1, "exit code after a failed final sync: {text}");
    assert!(
        text.contains("not synced") && text.contains(&db.display().to_string()),
        "the message names the database: {text}"
    );
}
