//! The commit ring with real processes: `sqlite3` shells with libmultidb loaded write, the real
//! `multidb ring tail` reads. Counts must add up exactly; broken ring files must never hurt the
//! application; checkpoints must follow the documented policy.

use std::collections::{HashMap, HashSet};

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use multidb_tests::{extension, multidb_bin, run};

/// A `multidb ring tail --json` process reading a ring of `slots` at `ring`. Its output is
/// drained as it comes, as a terminal would, so a full pipe never slows the reader.
struct Tail {
    child: Child,
    stdout: std::thread::JoinHandle<String>,
}

impl Tail {
    fn start(ring: &Path, slots: u32, idle_exit: &str) -> Tail {
        let _ = fs::remove_file(ring);
        let mut child = Command::new(multidb_bin())
            .args(["ring", "--ring"])
            .arg(ring)
            .args([
                "tail",
                "--json",
                "--slots",
                &slots.to_string(),
                "--idle-exit",
                idle_exit,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut pipe, &mut text).unwrap();
            text
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ring.exists() {
            assert!(
                Instant::now() < deadline,
                "ring tail did not create {}",
                ring.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Tail { child, stdout }
    }

    /// Waits for the tail to exit on its idle timeout; returns its JSON records and summary.
    fn finish(self) -> (Vec<serde_json::Value>, String) {
        let out = self.child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = self.stdout.join().unwrap();
        let records = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (records, String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn summary_number(summary: &str, word: &str) -> u64 {
    let words: Vec<&str> = summary
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter(|w| !w.is_empty())
        .collect();
    let i = words
        .iter()
        .position(|w| *w == word)
        .unwrap_or_else(|| panic!("no `{word}` in {summary}"));
    if word == "commits" || word == "registrations" {
        words[i - 1].parse().unwrap()
    } else {
        words[i + 1].parse().unwrap()
    }
}

/// Creates a WAL-mode database with table `t`, without the extension.
fn create_db(path: &Path) {
    let out = run(Command::new("sqlite3")
        .arg(path)
        .arg("PRAGMA journal_mode=WAL; CREATE TABLE t(x);"));
    assert_eq!(out.code, 0, "{}", out.stderr);
}

/// A `sqlite3` shell with the extension loaded running `statements`, pointed at `ring`.
fn writer(db: &Path, ring: &Path, statements: &str) -> Command {
    let mut script = tempfile::NamedTempFile::new().unwrap();
    writeln!(script, ".load {}", extension().display()).unwrap();
    script.write_all(statements.as_bytes()).unwrap();
    let (_file, path) = script.keep().unwrap();
    let mut command = Command::new("sqlite3");
    command
        .arg("-bail")
        .arg(db)
        .env("MULTIDB_RING", ring)
        .stdin(fs::File::open(path).unwrap());
    command
}

fn inserts(n: usize) -> String {
    let mut s = String::from("PRAGMA synchronous=OFF;\n");
    for i in 0..n {
        s.push_str(&format!("INSERT INTO t VALUES({i});\n"));
    }
    s
}

fn count_rows(db: &Path) -> u64 {
    let out = run(Command::new("sqlite3")
        .arg(db)
        .arg("SELECT count(*) FROM t;"));
    out.stdout.trim().parse().unwrap()
}

fn four_writers(dir: &Path, ring: &Path, commits: usize) -> (Vec<PathBuf>, HashSet<u32>) {
    let dbs: Vec<PathBuf> = (0..4).map(|i| dir.join(format!("w{i}.db"))).collect();
    let children: Vec<Child> = dbs
        .iter()
        .map(|db| {
            create_db(db);
            writer(db, ring, &inserts(commits))
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut pids = HashSet::new();
    for mut child in children {
        pids.insert(child.id());
        assert!(child.wait().unwrap().success());
    }
    for db in &dbs {
        assert_eq!(count_rows(db), commits as u64);
    }
    (dbs, pids)
}

#[test]
fn every_commit_of_four_writers_arrives_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = tmp.path().join("multidb.ring");
    let tail = Tail::start(&ring, 65_536, "3s");
    let (dbs, pids) = four_writers(tmp.path(), &ring, 10_000);
    let (records, summary) = tail.finish();
    let inodes: HashSet<u64> = dbs
        .iter()
        .map(|d| std::os::unix::fs::MetadataExt::ino(&fs::metadata(d).unwrap()))
        .collect();
    let mut last_time: HashMap<u64, u64> = HashMap::new();
    let mut commits = 0u64;
    for r in &records {
        if r["kind"] == "register" {
            continue;
        }
        commits += 1;
        let ino = r["ino"].as_u64().unwrap();
        assert!(inodes.contains(&ino), "record for an unknown database: {r}");
        assert!(
            pids.contains(&(r["pid"].as_u64().unwrap() as u32)),
            "record from an unknown pid: {r}"
        );
        let t = r["time_ns"].as_u64().unwrap();
        let previous = last_time.insert(ino, t).unwrap_or(0);
        assert!(
            t > previous,
            "records of one writer arrive once and in order: {r}"
        );
        assert!(
            r["path"].as_str().unwrap().ends_with(".db"),
            "the registration named the path first: {r}"
        );
    }
    let dropped = summary_number(&summary, "dropped");
    assert_eq!(commits + dropped, 40_000, "{summary}");
    assert_eq!(summary_number(&summary, "commits"), commits);
    assert_eq!(summary_number(&summary, "invalid"), 0, "{summary}");
    assert_eq!(summary_number(&summary, "registrations"), 4, "{summary}");
}

#[test]
fn a_tiny_ring_drops_and_counts_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = tmp.path().join("tiny.ring");
    let tail = Tail::start(&ring, 16, "3s");
    four_writers(tmp.path(), &ring, 10_000);
    let (records, summary) = tail.finish();
    let commits = records.iter().filter(|r| r["kind"] == "commit").count() as u64;
    let dropped = summary_number(&summary, "dropped");
    assert_eq!(commits + dropped, 40_000, "{summary}");
    assert!(
        dropped > 0,
        "a 16-slot ring under four writers must overflow: {summary}"
    );
    assert_eq!(summary_number(&summary, "invalid"), 0, "{summary}");
}

#[test]
fn a_killed_writer_does_not_stop_the_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = tmp.path().join("multidb.ring");
    let tail = Tail::start(&ring, 1024, "3s");
    let victim_db = tmp.path().join("victim.db");
    create_db(&victim_db);
    let mut victim = writer(&victim_db, &ring, &inserts(1_000_000))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: sending SIGKILL to our own child.
    unsafe { libc::kill(victim.id() as i32, libc::SIGKILL) };
    victim.wait().unwrap();
    let db = tmp.path().join("after.db");
    create_db(&db);
    assert!(writer(&db, &ring, &inserts(500))
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success());
    let (records, summary) = tail.finish();
    let after = records
        .iter()
        .filter(|r| r["kind"] == "commit" && r["path"].as_str().unwrap().ends_with("after.db"))
        .count();
    assert_eq!(after, 500, "the survivor's commits all arrive: {summary}");
    assert_eq!(summary_number(&summary, "invalid"), 0, "{summary}");
}

#[test]
fn broken_ring_files_never_hurt_the_application() {
    let tmp = tempfile::tempdir().unwrap();
    let valid = tmp.path().join("valid.ring");
    Tail::start(&valid, 64, "100ms").finish();
    let bytes = fs::read(&valid).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            (0..20_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
        ("truncated", bytes[..5000].to_vec()),
        ("empty", Vec::new()),
    ];
    let mut wrong_version = bytes.clone();
    wrong_version[8] = 99;
    cases.push(("wrong-version", wrong_version));
    let mut huge_geometry = bytes.clone();
    huge_geometry[16..20].copy_from_slice(&(1u32 << 30).to_ne_bytes());
    cases.push(("huge-geometry", huge_geometry));
    cases.push(("missing", Vec::new()));
    for (name, content) in cases {
        let ring = tmp.path().join(format!("{name}.ring"));
        if name != "missing" {
            fs::write(&ring, &content).unwrap();
        }
        let db = tmp.path().join(format!("{name}.db"));
        create_db(&db);
        let started = Instant::now();
        let out = run(&mut writer(
            &db,
            &ring,
            &format!(
                "{}SELECT json_extract(multidb_status(), '$.agent.running');\n",
                inserts(100)
            ),
        ));
        assert_eq!(out.code, 0, "{name}: {}", out.stderr);
        assert_eq!(out.stdout.trim(), "0", "{name}: no agent is reported");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: the writer did not hang"
        );
        assert_eq!(count_rows(&db), 100, "{name}");
    }
    // A ring deleted while the application runs: the writer keeps going.
    let ring = tmp.path().join("deleted.ring");
    let tail = Tail::start(&ring, 64, "1s");
    let db = tmp.path().join("deleted.db");
    create_db(&db);
    let mut child = writer(&db, &ring, &inserts(20_000))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    fs::remove_file(&ring).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(count_rows(&db), 20_000);
    tail.finish();
}

fn wal_size(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    fs::metadata(PathBuf::from(wal))
        .map(|m| m.len())
        .unwrap_or(0)
}

#[test]
fn with_a_live_ring_connection_per_write_leaves_frames_for_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let ring = tmp.path().join("multidb.ring");
    let db = tmp.path().join("app.db");
    create_db(&db);
    let tail = Tail::start(&ring, 1024, "2s");
    for i in 0..20 {
        let out = run(&mut writer(
            &db,
            &ring,
            &format!("INSERT INTO t VALUES({i});\n"),
        ));
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    let frames = (wal_size(&db).saturating_sub(32)) / (4096 + 24);
    assert!(
        frames >= 20,
        "the WAL must keep the 20 commits for the agent, has {frames} frames"
    );
    let (records, _) = tail.finish();
    assert_eq!(records.iter().filter(|r| r["kind"] == "commit").count(), 20);

    // Control: with no agent, SQLite checkpoints and deletes the WAL when each connection closes.
    let control = tmp.path().join("control.db");
    create_db(&control);
    for i in 0..20 {
        assert_eq!(
            run(&mut writer(
                &control,
                &tmp.path().join("none.ring"),
                &format!("INSERT INTO t VALUES({i});\n")
            ))
            .code,
            0
        );
    }
    assert_eq!(
        wal_size(&control),
        0,
        "stock close-time checkpoint with no agent"
    );
    assert_eq!(count_rows(&control), 20);
}

/// `first.db` and `second.db` in a new directory, and a `ring tail` reading a ring beside them.
fn two_databases_and_a_tail() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf, Tail) {
    two_databases_and_a_tail_of(1024)
}

/// As [`two_databases_and_a_tail`], with a ring of `slots`.
fn two_databases_and_a_tail_of(slots: u32) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf, Tail) {
    let tmp = tempfile::tempdir().unwrap();
    let ring = tmp.path().join("multidb.ring");
    let first = tmp.path().join("first.db");
    let second = tmp.path().join("second.db");
    create_db(&first);
    create_db(&second);
    let tail = Tail::start(&ring, slots, "2s");
    (tmp, ring, first, second, tail)
}

#[test]
fn a_connection_opened_after_loading_is_hooked() {
    let (_tmp, ring, first, second, tail) = two_databases_and_a_tail();
    // `.open` closes the loading connection and opens a new one: only the auto-extension
    // (and its one-shot commit hook) can hook it.
    let script = format!("INSERT INTO t VALUES(1);\n.open {}\nINSERT INTO t VALUES(2);\nINSERT INTO t VALUES(3);\nSELECT multidb_version();\n", second.display());
    let out = run(&mut writer(&first, &ring, &script));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.trim().starts_with('v'),
        "functions are registered on the new connection"
    );
    let (records, _) = tail.finish();
    let on_second = records
        .iter()
        .filter(|r| r["kind"] == "commit" && r["path"].as_str().unwrap().ends_with("second.db"))
        .count();
    assert_eq!(on_second, 2, "{records:?}");
}

/// The WAL hook caches each connection's database; a closed connection's memory is often
/// reused by the next one (here, `.open` closes one and opens the next), and a stale cache
/// entry would post the next database's commits under the previous one's name.
#[test]
fn a_reopened_connection_posts_under_its_own_database() {
    let (_tmp, ring, first, second, tail) = two_databases_and_a_tail();
    let mut script = String::new();
    for round in 0..6 {
        let db = if round % 2 == 0 { &second } else { &first };
        script.push_str(&format!(
            ".open {}\nINSERT INTO t VALUES({round});\n",
            db.display()
        ));
    }
    let out = run(&mut writer(&first, &ring, &script));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let (records, _) = tail.finish();
    let names: Vec<&str> = records
        .iter()
        .filter(|r| r["kind"] == "commit")
        .map(|r| {
            let path = r["path"].as_str().unwrap();
            if path.ends_with("first.db") {
                "first"
            } else {
                "second"
            }
        })
        .collect();
    assert_eq!(
        names,
        ["second", "first", "second", "first", "second", "first"],
        "{records:?}"
    );
}

/// More connections in one process than the hook's per-connection cache has slots (1,024):
/// each later connection takes over an earlier one's slot, and the earlier one, committing
/// again, must notice and still post every commit under its own database.
#[test]
fn more_connections_than_cache_slots_post_every_commit_under_its_database() {
    let (tmp, ring, first, second, tail) = two_databases_and_a_tail_of(65_536);
    let connections = 1100;
    let list = tmp.path().join("connections.txt");
    let lines: Vec<String> = (0..connections)
        .map(|i| {
            // Connection i + 1024 takes connection i's slot: for i = 0, 3, 6, ... it writes
            // the other database, so a slot read by the wrong connection shows in the paths.
            let db = if i % 3 == 0 { &first } else { &second };
            db.display().to_string()
        })
        .collect();
    fs::write(&list, lines.join("\n")).unwrap();
    // Round robin over the connections, so each commits three or four times.
    let out = run(Command::new(multidb_bin())
        .args(["bench", "agent-writer", "--list"])
        .arg(&list)
        .args(["--rate", "2500", "--duration", "1600ms", "--extension"])
        .arg(extension())
        .env("MULTIDB_RING", &ring));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let committed: usize = out.stdout.trim().parse().unwrap();
    assert!(committed > 2 * connections, "only {committed} commits");
    let (records, summary) = tail.finish();
    let on = |name: &str| {
        records
            .iter()
            .filter(|r| r["kind"] == "commit" && r["path"].as_str().unwrap().ends_with(name))
            .count()
    };
    // Plus one commit each: the writer's first connection to each database creates its table.
    let to_first = (0..committed).filter(|k| k % connections % 3 == 0).count();
    assert_eq!(on("first.db"), to_first + 1, "{summary}");
    assert_eq!(on("second.db"), committed - to_first + 1, "{summary}");
}
