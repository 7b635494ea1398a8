//! The extension's checkpoint policy, in-process with rusqlite (bundled SQLite) loading the
//! built library: like stock SQLite without an agent, the agent's job while it replicates a
//! hot database, with a hard cap.
//!
//! A test binary of its own, with one test: it sets `MULTIDB_RING` for this process, which
//! every hooked connection reads, and loading the library registers it as an auto-extension,
//! so every connection the process opens afterwards is hooked too. In the shared e2e binary
//! that would reach other tests' in-process connections.

use std::path::{Path, PathBuf};
use std::time::Duration;

use multidb::ring::{Status, Tier};
use multidb_agent::agent::ring::RingFile;
use rusqlite::Connection;

const FRAME: u64 = 4096 + 24;

fn wal_frames(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(PathBuf::from(wal)).map_or(0, |m| m.len().saturating_sub(32) / FRAME)
}

fn open(db: &Path, hooked: bool) -> Connection {
    let conn = Connection::open(db).unwrap();
    if hooked {
        // SAFETY: loading our own extension, built by this workspace.
        unsafe {
            conn.load_extension_enable().unwrap();
            conn.load_extension(multidb_tests::extension(), None::<&str>)
                .unwrap();
            conn.load_extension_disable().unwrap();
        }
    }
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF; CREATE TABLE IF NOT EXISTS t(x);",
    )
    .unwrap();
    conn
}

fn insert(conn: &Connection, n: usize) {
    for i in 0..n {
        conn.execute("INSERT INTO t VALUES (?1)", [i as i64])
            .unwrap();
    }
}

#[test]
fn checkpoints_follow_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let ring_path = tmp.path().join("multidb.ring");
    // SAFETY: the only test in this binary; nothing else reads or writes the environment.
    unsafe { std::env::set_var("MULTIDB_RING", &ring_path) };

    // No agent: the WAL stays bounded exactly as stock SQLite bounds it.
    let hooked_db = tmp.path().join("hooked.db");
    let stock_db = tmp.path().join("stock.db");
    let hooked = open(&hooked_db, true);
    let stock = open(&stock_db, false);
    insert(&hooked, 5000);
    insert(&stock, 5000);
    let (h, s) = (wal_frames(&hooked_db), wal_frames(&stock_db));
    assert!(
        h <= 1001 && s <= 1001,
        "hooked {h} frames, stock {s} frames: both checkpoint at 1000"
    );
    assert!(
        h >= 999,
        "the hook checkpoints at 1000 frames, not earlier: {h}"
    );

    // multidb_autocheckpoint sets the threshold (and keeps the hook).
    let small_db = tmp.path().join("small.db");
    let small = open(&small_db, true);
    small
        .query_row("SELECT multidb_autocheckpoint(100)", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap();
    insert(&small, 500);
    assert!(
        wal_frames(&small_db) <= 101,
        "threshold 100: {} frames",
        wal_frames(&small_db)
    );

    // A live agent reports the database hot: checkpoints are the agent's, up to the hard cap.
    let ring_file = RingFile::create_or_open(&ring_path, 1024, 64).unwrap();
    let ring = ring_file.ring();
    let hot_db = tmp.path().join("hot.db");
    let hot = open(&hot_db, true);
    let meta = std::fs::metadata(&hot_db).unwrap();
    let (dev, ino) = (
        std::os::unix::fs::MetadataExt::dev(&meta),
        std::os::unix::fs::MetadataExt::ino(&meta),
    );
    ring.heartbeat(std::process::id(), multidb::ring::now_ns());
    assert!(ring.publish_status(&Status {
        dev,
        ino,
        tier: Tier::Hot,
        ..Status::default()
    }));
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ring.heartbeat(std::process::id(), multidb::ring::now_ns());
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // The extension looks for a ring at most every 2 s.
        std::thread::sleep(Duration::from_millis(2200));
        insert(&hot, 3000);
        let held = wal_frames(&hot_db);
        let status: String = hot
            .query_row("SELECT multidb_status()", [], |r| r.get(0))
            .unwrap();
        insert(&hot, 8000);
        let capped = wal_frames(&hot_db);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            held >= 3000,
            "hot database: the extension left checkpoints to the agent, WAL has {held} frames"
        );
        assert!(capped <= 10_001, "hard cap of 10,000 frames: {capped}");
        let v: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(v["database"]["tier"], "hot", "{status}");
        assert_eq!(v["agent"]["running"], true, "{status}");
        assert_eq!(v["agent"]["pid"], std::process::id(), "{status}");
    });
}
