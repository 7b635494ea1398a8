//! `multidb restore --follow` (issue 11, item 4): a writer commits into a database that
//! `multidb replicate` ships, the follower keeps OUT current, and a reader runs against OUT
//! the whole time, checking in every read transaction an invariant that every source
//! transaction keeps (so a torn or half-applied step would break it) and running
//! `PRAGMA integrity_check` now and then. At the end OUT equals the source; restarts resume,
//! and an OUT written by anyone else is refused.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use multidb_tests::multidb_bin;

use crate::replicate::{dump, shell, Replicating};

/// How long the follower may take to show a commit: the replicator's poll (10 ms) and sync,
/// the follower's interval, and a busy two-core machine.
const CATCH_UP: Duration = Duration::from_secs(60);
/// The follower's poll interval in these tests.
const INTERVAL: &str = "50ms";

/// The source: `items` rows with page-sized blobs and `agg` holding their count and the sum
/// of `v`. Every transaction keeps `agg` equal to the rows and `sum(v) = n(n+1)/2`.
fn new_source(dir: &Path) -> PathBuf {
    let db = dir.join("app.db");
    shell(
        &db,
        "PRAGMA journal_mode=WAL;\n\
         CREATE TABLE items(id INTEGER PRIMARY KEY, v INTEGER NOT NULL, blob BLOB);\n\
         CREATE INDEX items_v ON items(v);\n\
         CREATE TABLE agg(n INTEGER NOT NULL, s INTEGER NOT NULL);\n\
         INSERT INTO agg VALUES (0, 0);\n",
    );
    db
}

/// Transactions `from..to`: each adds rows up to `3 * (k + 1)`, some over several pages, and
/// every fourth also rewrites older rows' blobs (changes spread over the file).
fn write_transactions(db: &Path, from: usize, to: usize, pause: Duration) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    write_with(&conn, from, to, pause);
}

/// [`write_transactions`] on a connection the caller keeps open.
fn write_with(conn: &rusqlite::Connection, from: usize, to: usize, pause: Duration) {
    for k in from..to {
        let tx = conn.unchecked_transaction().unwrap();
        let n: i64 = tx.query_row("SELECT n FROM agg", [], |r| r.get(0)).unwrap();
        let target = 3 * (k as i64 + 1);
        for v in n + 1..=target {
            tx.execute(
                "INSERT INTO items(v, blob) VALUES (?1, randomblob(?2))",
                [v, 100 + (v * 997) % 6000],
            )
            .unwrap();
        }
        if k % 4 == 3 {
            tx.execute(
                "UPDATE items SET blob = randomblob(length(blob)) WHERE v % 7 = ?1",
                [k as i64 % 7],
            )
            .unwrap();
        }
        tx.execute("UPDATE agg SET n = ?1, s = ?1 * (?1 + 1) / 2", [target])
            .unwrap();
        tx.commit().unwrap();
        std::thread::sleep(pause);
    }
}

fn agg_of(db: &Path) -> Option<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row("SELECT n FROM agg", [], |r| r.get(0)).ok()
}

/// Waits until OUT holds `n` rows.
fn wait_for(out: &Path, n: i64, follower: &mut Following) {
    wait_for_within(out, n, follower, CATCH_UP);
}

/// Waits at most `limit` until OUT holds `n` rows.
fn wait_for_within(out: &Path, n: i64, follower: &mut Following, limit: Duration) {
    let deadline = Instant::now() + limit;
    while agg_of(out) != Some(n) {
        if let Ok(Some(status)) = follower.child.try_wait() {
            panic!("the follower exited with {status}: {}", follower.log());
        }
        assert!(
            Instant::now() < deadline,
            "OUT did not reach {n} rows in {limit:?} (it has {:?}): {}",
            agg_of(out),
            follower.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `multidb restore --follow` as a process, its stderr in a file.
struct Following {
    child: Child,
    log: PathBuf,
}

impl Following {
    fn start(url: &str, out: &Path, env: &[(&str, String)]) -> Following {
        let log = out.with_extension(format!("follow-{}.log", std::process::id()));
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(multidb_bin())
            .env("MULTIDB_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["restore", "--follow", "--interval", INTERVAL, "-o"])
            .arg(out)
            .arg(url)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Following { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM between steps: exit 0.
    fn stop(mut self) -> String {
        // SAFETY: signalling our own child, not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "follower exited with {status}: {}",
            self.log()
        );
        self.log()
    }

    /// Freezes the follower (SIGSTOP) until [`Following::thaw`], so that the replica can be
    /// rewritten between two of its polls rather than while one reads it.
    fn freeze(&self) {
        // SAFETY: signalling our own child, not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    fn thaw(&self) {
        // SAFETY: signalling our own child, not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    /// Waits for the follower to exit on its own; returns its exit code and log.
    fn exit(mut self) -> (i32, String) {
        let deadline = Instant::now() + CATCH_UP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code().unwrap_or(-1), self.log());
            }
            assert!(
                Instant::now() < deadline,
                "follower still running: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A reader of OUT running until told to stop: every read transaction checks the invariant,
/// every 20th also `PRAGMA integrity_check`. Returns the distinct row counts it saw.
struct Reader {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<i64>>,
}

impl Reader {
    fn start(out: &Path) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let out = out.to_path_buf();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let conn = rusqlite::Connection::open_with_flags(
                &out,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            let mut seen = Vec::new();
            let mut reads = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let tx = conn.unchecked_transaction().unwrap();
                let (n, s): (i64, i64) = tx
                    .query_row("SELECT n, s FROM agg", [], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap();
                let (count, sum, max): (i64, i64, i64) = tx
                    .query_row(
                        "SELECT count(*), coalesce(sum(v), 0), coalesce(max(v), 0) FROM items INDEXED BY items_v",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .unwrap();
                let blobs: i64 = tx
                    .query_row(
                        "SELECT count(*) FROM items WHERE length(blob) >= 100",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                assert_eq!(
                    (count, sum, max, blobs, s),
                    (n, n * (n + 1) / 2, n, n, n * (n + 1) / 2),
                    "a reader of OUT saw a torn state after {reads} reads"
                );
                if reads % 20 == 0 {
                    let check: String = tx
                        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                        .unwrap();
                    assert_eq!(check, "ok", "OUT at {n} rows");
                }
                drop(tx);
                if seen.last() != Some(&n) {
                    seen.push(n);
                }
                reads += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            assert!(reads > 0);
            seen
        });
        Reader { stop, thread }
    }

    fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(seen) => seen,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Waits until the replica holds a file, so the follower's first restore has something.
fn wait_for_replica(dir: &Path, url: &str, env: &[(&str, String)]) {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let out = multidb_tests::run(
            multidb_tests::multidb(dir)
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .args(["ltx", "--json", url]),
        );
        if out.code == 0 && out.stdout.contains("max_txid") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing in {url}: {}",
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_file(path: &Path, follower: &mut Following) {
    let deadline = Instant::now() + CATCH_UP;
    while !path.exists() || agg_of(path).is_none() {
        if let Ok(Some(status)) = follower.child.try_wait() {
            panic!("the follower exited with {status}: {}", follower.log());
        }
        assert!(
            Instant::now() < deadline,
            "no {}: {}",
            path.display(),
            follower.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The whole cycle against `url`: follow while writing with a reader throughout, stop,
/// resume after more writes, a new history (a snapshot after a WAL checkpointed behind the
/// replicator's back) followed by restoring afresh, then an OUT written by someone else.
fn follow_cycle(dir: &Path, url: &str, env: &[(&str, String)], replicate_args: &[&str]) {
    let db = new_source(dir);
    let out = dir.join("follower.db");
    let replicating = Replicating::start_with(&db, url, replicate_args, env);
    write_transactions(&db, 0, 3, Duration::ZERO);
    wait_for_replica(dir, url, env);
    let mut follower = Following::start(url, &out, env);
    wait_for_file(&out, &mut follower);
    let reader = Reader::start(&out);
    write_transactions(&db, 3, 120, Duration::from_millis(15));
    wait_for(&out, 360, &mut follower);
    let seen = reader.finish();
    assert!(
        seen.len() >= 5,
        "the reader saw OUT at only {seen:?} rows: follow applied too few steps to test"
    );
    let log = follower.stop();
    assert!(log.contains("stopped following at TXID"), "{log}");
    assert_eq!(dump(&out), dump(&db), "OUT after following");

    // Stopped, the source moves on by more files than one step takes; a new follower
    // resumes from OUT's TXID and catches up in bounded steps.
    write_transactions(&db, 120, 200, Duration::from_millis(30));
    let mut follower = Following::start(url, &out, env);
    let reader = Reader::start(&out);
    wait_for(&out, 600, &mut follower);
    reader.finish();
    let log = follower.stop();
    assert!(log.contains("resumed TXID"), "{log}");
    // Level-0 files hold one TXID each, so more than 64 TXIDs behind means a full step.
    let txid_after = |prefix: &str| -> u64 {
        let at = log.rfind(prefix).expect(prefix) + prefix.len();
        log[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let behind = txid_after("stopped following at TXID ") - txid_after("resumed TXID ");
    assert!(
        behind <= 64 || log.contains(" (64 files, "),
        "{behind} TXIDs behind without a full step of 64 files: {log}"
    );
    assert_eq!(dump(&out), dump(&db), "OUT after resuming");

    // A new history: frames checkpointed away while nobody replicated make the replicator
    // start over with a snapshot, which nothing at levels 0-3 continues from OUT's TXID.
    replicating.stop();
    let mut follower = Following::start(url, &out, env);
    write_transactions(&db, 200, 210, Duration::ZERO);
    shell(&db, "PRAGMA wal_checkpoint(TRUNCATE);\nDELETE FROM items WHERE v > 400;\nUPDATE agg SET n = 400, s = 400 * 401 / 2;\nVACUUM;\nPRAGMA wal_checkpoint(TRUNCATE);\n");
    let replicating = Replicating::start_with(&db, url, replicate_args, env);
    let reader = Reader::start(&out);
    wait_for(&out, 400, &mut follower);
    reader.finish();
    assert_eq!(dump(&out), dump(&db), "OUT after the new history");
    assert!(
        follower.log().contains("restored afresh TXID"),
        "{}",
        follower.log()
    );

    // Someone else writes OUT: the follower stops with an error naming it, and a new
    // follower refuses to write into it.
    let intruder = rusqlite::Connection::open(&out).unwrap();
    intruder.busy_timeout(Duration::from_secs(10)).unwrap();
    intruder.execute("UPDATE agg SET s = 0", []).unwrap();
    drop(intruder);
    write_transactions(&db, 210, 220, Duration::ZERO);
    let (code, log) = follower.exit();
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("another connection wrote to"), "{log}");
    let (code, log) = Following::start(url, &out, env).exit();
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("was changed by something other than `restore --follow`"),
        "{log}"
    );
    replicating.stop();
}

#[test]
fn follow_keeps_a_directory_replica_s_output_current_for_a_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("replica").display());
    follow_cycle(tmp.path(), &url, &[], &[]);
}

/// Files without database checksums (as Litestream writes them): each step is checked with
/// `PRAGMA integrity_check` after its commit instead, and the follower still ends equal to
/// the source.
#[test]
fn follow_keeps_output_current_from_litestream_compatible_files() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("file://{}", tmp.path().join("replica").display());
    follow_cycle(tmp.path(), &url, &[], &["--litestream-compatible"]);
}

#[test]
fn follow_keeps_an_s3_replica_s_output_current_for_a_reader() {
    let server = multidb_tests::s3server::S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    follow_cycle(tmp.path(), &server.url("follow/app"), &server.env(), &[]);
}

/// An existing database that `restore --follow` did not make is never written.
#[test]
fn follow_refuses_an_output_it_did_not_make() {
    let tmp = tempfile::tempdir().unwrap();
    let db = new_source(tmp.path());
    let url = format!("file://{}", tmp.path().join("replica").display());
    crate::replicate::replicate_once(&db, &url);
    let out = tmp.path().join("mine.db");
    fs::copy(&db, &out).unwrap();
    let before = fs::read(&out).unwrap();
    let (code, log) = Following::start(&url, &out, &[]).exit();
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("does not say `restore --follow` made it; refusing to write into it"),
        "{log}"
    );
    assert_eq!(fs::read(&out).unwrap(), before);
}

/// Regression (review of follow mode): the replica deleted and written anew by another
/// database's history, once past OUT's TXID (its next file does not continue OUT's checksum)
/// and once to exactly OUT's TXID (nothing newer to apply): the follower restores afresh
/// within a few polls, instead of retrying the broken chain forever or keeping the old
/// history, and a reader never sees a torn state.
#[test]
fn follow_restores_afresh_when_another_history_replaces_the_replica() {
    // Restoring a small database afresh takes a few of the follower's polls; a minute is
    // allowed beside a build (a follower stuck on the broken chain never gets there).
    const WITHIN: Duration = CATCH_UP;
    let tmp = tempfile::tempdir().unwrap();
    let replica = tmp.path().join("replica");
    let url = format!("file://{}", replica.display());
    // A source of its own shipped by `syncs` runs of `replicate --once`, each after
    // `per_sync` more transactions: its replica reaches TXID `syncs` (a snapshot, then a
    // level-0 file per run) with `3 * syncs * per_sync` rows. One connection writes them
    // all, as an application's would, so the WAL goes on from one run to the next (a WAL
    // started over after a checkpoint makes the next run write a snapshot instead).
    let replicate = |name: &str, syncs: usize, per_sync: usize| {
        let dir = tmp.path().join(name);
        fs::create_dir(&dir).unwrap();
        let db = new_source(&dir);
        let conn = rusqlite::Connection::open(&db).unwrap();
        for sync in 0..syncs {
            write_with(
                &conn,
                sync * per_sync,
                (sync + 1) * per_sync,
                Duration::ZERO,
            );
            crate::replicate::replicate_once(&db, &url);
        }
        db
    };
    let newest_txid = || -> u64 {
        let out =
            multidb_tests::run(multidb_tests::multidb(tmp.path()).args(["ltx", "--json", &url]));
        assert_eq!(out.code, 0, "{}", out.stderr);
        let files: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
        let txids = files.iter().map(|f| f["max_txid"].as_u64().unwrap());
        txids.max().unwrap()
    };
    // The follower is frozen while the replica is rewritten, so that it meets the other
    // history whole (not a first snapshot of it, which nothing continues anyway).
    let replace = |follower: &Following, name: &str, syncs: usize, per_sync: usize| {
        follower.freeze();
        fs::remove_dir_all(&replica).unwrap();
        let db = replicate(name, syncs, per_sync);
        assert_eq!(newest_txid(), syncs as u64);
        assert!(
            fs::read_dir(replica.join("ltx/0")).unwrap().count() > 0,
            "no level-0 files: every run wrote a snapshot"
        );
        follower.thaw();
        db
    };

    replicate("first", 2, 2);
    let out = tmp.path().join("follower.db");
    let mut follower = Following::start(&url, &out, &[]);
    wait_for(&out, 12, &mut follower);
    let reader = Reader::start(&out);

    // Past OUT's TXID 2: file 3-3 continues TXID 2, but from the other database's state.
    let longer = replace(&follower, "longer", 4, 2);
    wait_for_within(&out, 24, &mut follower, WITHIN);
    assert_eq!(dump(&out), dump(&longer), "OUT after a longer history");

    // To exactly OUT's TXID 4: nothing newer, but the file at TXID 4 ends elsewhere.
    let same = replace(&follower, "same", 4, 3);
    wait_for_within(&out, 36, &mut follower, WITHIN);
    assert_eq!(
        dump(&out),
        dump(&same),
        "OUT after a history as long as its own"
    );

    let seen = reader.finish();
    assert!(seen.ends_with(&[24, 36]), "{seen:?}");
    let log = follower.stop();
    assert_eq!(
        log.matches("the replica holds another history").count(),
        2,
        "{log}"
    );
    assert!(log.contains("stopped following at TXID 4"), "{log}");
}

/// A follower killed (`SIGKILL`) at random moments while the source keeps writing, on either
/// side of a step's commit: each new follower resumes OUT instead of refusing it as changed by
/// someone else, a reader of OUT never sees a torn state, and at the end OUT equals the
/// source.
#[test]
fn follow_killed_at_random_moments_resumes_every_time() {
    let tmp = tempfile::tempdir().unwrap();
    let replica = tmp.path().join("replica");
    let url = format!("file://{}", replica.display());
    let db = new_source(tmp.path());
    let out = tmp.path().join("follower.db");
    let replicating = Replicating::start(&db, &url);
    write_transactions(&db, 0, 3, Duration::ZERO);
    wait_for_replica(tmp.path(), &url, &[]);
    let mut follower = Following::start(&url, &out, &[]);
    wait_for_file(&out, &mut follower);
    let reader = Reader::start(&out);
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || write_transactions(&db, 3, 150, Duration::from_millis(20)))
    };
    let resumes = |f: &Following| resumes_in(&f.log());
    let mut resumed_before_last = 0;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..12 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Any moment: before it resumed (on a loaded machine), while it applies a step, or
        // between steps.
        std::thread::sleep(Duration::from_millis(100 + seed % 500));
        if let Ok(Some(status)) = follower.child.try_wait() {
            panic!(
                "round {round}: the follower exited with {status}: {}",
                follower.log()
            );
        }
        follower.child.kill().unwrap();
        follower.child.wait().unwrap();
        resumed_before_last = resumes(&follower);
        follower = Following::start(&url, &out, &[]);
    }
    writer.join().unwrap();
    wait_for(&out, 450, &mut follower);
    // The last follower resumed too (OUT may have been complete before it started).
    let deadline = Instant::now() + CATCH_UP;
    while resumes(&follower) <= resumed_before_last {
        assert!(
            Instant::now() < deadline,
            "the last follower resumes OUT: {}",
            follower.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = reader.finish();
    assert!(seen.len() >= 5, "OUT was seen at only {seen:?} rows");
    let log = follower.stop();
    assert!(
        resumes_in(&log) >= 2 && !log.contains("changed by something other"),
        "followers resume OUT after a kill, never refuse it: {log}"
    );
    assert_eq!(dump(&out), dump(&db), "OUT after the kills");
    replicating.stop();
}

fn resumes_in(log: &str) -> usize {
    log.matches("resumed TXID").count()
}
