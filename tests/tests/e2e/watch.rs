//! Issue 12, item 1: writes by applications without libmultidb (the plain `sqlite3` shell)
//! reach the replica through inotify on the leaf directories, not at the next scan. Every
//! site here scans once an hour unless the test is about scans, so what arrives came
//! through a watch.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use multidb_agent::replica::ReplicaUrl;

use crate::agent::{contents, Agent, Site};

/// The generous bound for anything to arrive: a watch delivers in milliseconds, a scan would
/// take an hour.
const ARRIVES_WITHIN: Duration = Duration::from_secs(30);

/// Runs SQL in the plain `sqlite3` shell: no extension, no ring.
fn plain_sqlite3(db: &Path, sql: &str) {
    let out = Command::new("sqlite3")
        .arg("-bail")
        .arg(db)
        .arg(sql)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sqlite3 {}: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the replica restores to what `db` holds now.
fn replica_equals(replica: &Path, db: &Path, scratch: &Path) -> bool {
    let Ok(client) = ReplicaUrl::File(replica.to_path_buf()).client() else {
        return false;
    };
    let out = scratch.join("restored.db");
    let _ = std::fs::remove_file(&out);
    let restored = multidb_agent::replicate::restore::restore(
        client.as_ref(),
        multidb_agent::replicate::restore::Target::Latest,
        &out,
        false,
    );
    restored.is_ok() && contents(&out) == contents(db)
}

fn wait_replicated(site: &Site, agent: &Agent, db: &Path) {
    let scratch = site.tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let deadline = Instant::now() + ARRIVES_WITHIN;
    while !replica_equals(&site.replica_of(db), db, &scratch) {
        assert!(
            Instant::now() < deadline,
            "{} not in its replica after {ARRIVES_WITHIN:?}: {}\n{}",
            db.display(),
            agent.status(),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_status(agent: &Agent, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + ARRIVES_WITHIN;
    loop {
        let s = agent.status();
        if ok(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {s}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 2 × 2 × 2 × 5 = 40 databases in 8 leaf directories.
fn site(extra: &str) -> Site {
    Site::new([2, 2, 2, 5], 8, extra)
}

/// Starts the agent and waits for its first gauges (the status socket answers before).
fn start(site: &Site) -> Agent {
    let agent = site.start_agent();
    wait_status(&agent, "the agent publishes its gauges", |s| {
        s["tiers"]["discovered"] == 40
    });
    agent
}

#[test]
fn a_plain_sqlite3_insert_reaches_the_replica_without_a_scan() {
    let site = site("  scan_interval: 1h\n");
    let agent = start(&site);
    let s = agent.status();
    assert_eq!(
        s["tiers"]["watched_dirs"], 8,
        "one watch per leaf directory: {s}"
    );
    assert_eq!(s["tiers"]["unwatched_dirs"], 0, "{s}");
    for db in [&site.dbs[3], &site.dbs[27]] {
        plain_sqlite3(
            db,
            "INSERT INTO items(name) VALUES ('written by plain sqlite3');",
        );
        wait_replicated(&site, &agent, db);
    }
    let s = agent.status();
    assert_eq!(s["scans"], 0, "no scan ran: {s}");
    assert!(s["watch_writes"].as_u64().unwrap() >= 2, "{s}");
    // A file that is no database, written beside them, costs no scan (a new database's
    // name starts one within a second).
    let notes = site.dbs[3].with_file_name("notes.txt");
    for line in 0..3 {
        std::fs::write(&notes, format!("line {line}\n")).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let s = agent.status();
    assert_eq!(s["scans"], 0, "writes to notes.txt started no scan: {s}");
    // A second write to a database that is hot now arrives too.
    plain_sqlite3(&site.dbs[3], "INSERT INTO items(name) VALUES ('again');");
    wait_replicated(&site, &agent, &site.dbs[3]);
    assert_eq!(agent.stop(), 0);
}

#[test]
fn databases_created_renamed_and_deleted_in_a_watched_directory_are_followed() {
    let site = site("  scan_interval: 1h\n");
    let agent = start(&site);
    let discovered = |agent: &Agent| agent.status()["tiers"]["discovered"].as_u64().unwrap();
    assert_eq!(discovered(&agent), 40);
    let dir = site.dbs[0].parent().unwrap();

    let new = dir.join("newcomer.db");
    plain_sqlite3(
        &new,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES ('new');",
    );
    wait_status(&agent, "the new database is discovered", |s| {
        s["tiers"]["discovered"] == 41
    });
    wait_replicated(&site, &agent, &new);

    let renamed = dir.join("renamed.db");
    std::fs::rename(&new, &renamed).unwrap();
    wait_status(&agent, "the renamed database is followed", |s| {
        s["tiers"]["discovered"] == 41 && s["scans"].as_u64().unwrap() >= 2
    });
    plain_sqlite3(&renamed, "INSERT INTO t VALUES ('after the rename');");
    wait_replicated(&site, &agent, &renamed);

    std::fs::remove_file(&renamed).unwrap();
    let _ = std::fs::remove_file(dir.join("renamed.db-wal"));
    let _ = std::fs::remove_file(dir.join("renamed.db-shm"));
    wait_status(&agent, "the deleted database is forgotten", |s| {
        s["tiers"]["discovered"] == 40
    });
    assert_eq!(agent.stop(), 0);
}

/// `max_watches` stands in for the kernel's `fs.inotify.max_user_watches` (lowering that
/// sysctl would starve every other process of this user on the machine): the agent takes
/// what it may, says so once, counts the rest, and scans cover them.
#[test]
fn past_the_watch_limit_directories_fall_back_to_scans() {
    let site = site("  scan_interval: 1s\n  max_watches: 3\n");
    let agent = start(&site);
    let s = agent.status();
    assert_eq!(
        (&s["tiers"]["watched_dirs"], &s["tiers"]["unwatched_dirs"]),
        (&3.into(), &5.into()),
        "{s}"
    );
    // One database in each of the 8 directories: watched or not, each arrives.
    let written: Vec<_> = site.dbs.iter().step_by(5).collect();
    assert_eq!(written.len(), 8);
    for db in &written {
        plain_sqlite3(db, "INSERT INTO items(name) VALUES ('limit');");
    }
    for db in &written {
        wait_replicated(&site, &agent, db);
    }
    wait_status(&agent, "several scans ran", |s| {
        s["scans"].as_u64().unwrap() >= 3
    });
    let log = agent.log_text();
    assert_eq!(
        log.matches("max_watches (3) reached").count(),
        1,
        "said once: {log}"
    );
    let metrics_text = {
        let out = multidb_tests::run(
            multidb_tests::multidb(site.tmp.path())
                .arg("--config")
                .arg(&site.config)
                .arg("status"),
        );
        out.stdout
    };
    assert!(
        metrics_text.contains("watches: 3 directories watched, 5 left to scans"),
        "{metrics_text}"
    );
    assert_eq!(agent.stop(), 0);
}

/// The agent's own checkpoint at demotion modifies the database file; that must not promote
/// the database again (it would never stay cold).
#[test]
fn a_database_written_once_by_plain_sqlite3_is_demoted_and_stays_cold() {
    let site = site("  scan_interval: 1h\n  idle_timeout: 1s\n  sync_interval: 100ms\n");
    let agent = start(&site);
    let db = &site.dbs[11];
    plain_sqlite3(db, "INSERT INTO items(name) VALUES ('once');");
    wait_replicated(&site, &agent, db);
    wait_status(&agent, "demoted after idle_timeout", |s| {
        s["demotions"].as_u64().unwrap() >= 1 && s["tiers"]["hot"] == 0
    });
    let promotions = agent.status()["promotions"].as_u64().unwrap();
    // Several idle timeouts: a promotion by the demotion's own echo would show here.
    std::thread::sleep(Duration::from_secs(4));
    let s = agent.status();
    assert_eq!(s["promotions"].as_u64().unwrap(), promotions, "{s}");
    assert_eq!(s["tiers"]["hot"], 0, "{s}");
    // And the next write is still seen.
    plain_sqlite3(db, "INSERT INTO items(name) VALUES ('twice');");
    wait_replicated(&site, &agent, db);
    assert_eq!(agent.stop(), 0);
}

#[test]
fn watch_false_leaves_writes_to_scans() {
    let site = site("  scan_interval: 1s\n  watch: false\n");
    let agent = start(&site);
    let s = agent.status();
    assert_eq!(s["tiers"]["watched_dirs"], 0, "{s}");
    assert_eq!(s["tiers"]["unwatched_dirs"], 8, "{s}");
    plain_sqlite3(&site.dbs[5], "INSERT INTO items(name) VALUES ('scanned');");
    wait_replicated(&site, &agent, &site.dbs[5]);
    assert_eq!(agent.status()["watch_writes"], 0);
    assert_eq!(agent.stop(), 0);
}

/// A leaf directory moved away takes its watch along: the watch is dropped (its events would
/// name the old path), and the directory recreated at the path is watched after the scan
/// that finds it (new directories are the scans' part).
#[test]
fn a_leaf_directory_moved_away_and_recreated_is_watched_again() {
    let site = site("  scan_interval: 2s\n");
    let agent = start(&site);
    let dir = site.dbs[0].parent().unwrap().to_path_buf();
    std::fs::rename(&dir, dir.with_file_name("moved-away")).unwrap();
    wait_status(&agent, "the moved directory's databases are gone", |s| {
        s["tiers"]["discovered"] == 35 && s["tiers"]["watched_dirs"] == 7
    });
    std::fs::create_dir(&dir).unwrap();
    let db = dir.join("fresh.db");
    plain_sqlite3(&db, "PRAGMA journal_mode=WAL; CREATE TABLE t(x);");
    wait_status(&agent, "the recreated directory is watched", |s| {
        s["tiers"]["discovered"] == 36 && s["tiers"]["watched_dirs"] == 8
    });
    let seen = agent.status()["watch_writes"].as_u64().unwrap();
    plain_sqlite3(&db, "INSERT INTO t VALUES ('in the new directory');");
    wait_replicated(&site, &agent, &db);
    let s = agent.status();
    assert!(s["watch_writes"].as_u64().unwrap() > seen, "{s}");
    assert_eq!(agent.stop(), 0);
}

/// A rollback-journal database is written in place: an agent that opened it on the write's
/// event would hold a shared lock mid-write and fail the application's next commit with
/// "database is locked" (the `sqlite3` shell waits for no lock). Its writes are left to the
/// ring and scans, as before the watches.
#[test]
fn writes_to_a_rollback_journal_database_are_never_made_to_fail() {
    let site = site("  scan_interval: 1h\n");
    // Rollback-journal databases from before the agent started, so each one's first write
    // below is the first event the agent sees for it.
    let dbs: Vec<_> = site.dbs.iter().step_by(4).collect();
    for db in &dbs {
        plain_sqlite3(db, "PRAGMA journal_mode=DELETE;");
    }
    let agent = start(&site);
    let many: String = (0..50)
        .map(|i| format!("INSERT INTO items(name) VALUES ('rollback {i}');"))
        .collect();
    for db in &dbs {
        plain_sqlite3(db, &many);
    }
    assert_eq!(agent.stop(), 0);
}
