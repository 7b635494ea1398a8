//! A full disk, for real: a small tmpfs mounted under the test's directory holds the replica
//! (the agent's writes fail with `ENOSPC`) or the restore's output. Nothing is acknowledged
//! that is not in the replica, nothing half-written stays behind, the error names the cause,
//! and once there is room again the work completes with nothing lost. Mounting needs root;
//! without it these tests say so and skip.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use multidb_tests::{multidb, run};

use crate::lease::{rows, Host};
use crate::replicate::assert_complete_ltx;

/// A tmpfs of a given size, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it) at `path`; `None`, with the
    /// reason printed, when this process may not mount (not root, or a container without
    /// the capability).
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return None;
        }
        fs::create_dir_all(path).unwrap();
        let out = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg("tmpfs")
            .arg(path));
        if out.code != 0 {
            eprintln!("skipped: mount -t tmpfs failed: {}", out.stderr);
            return None;
        }
        Some(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    /// Gives it `size` (room again).
    fn resize(&self, size: &str) {
        let out = run(Command::new("mount")
            .arg("-o")
            .arg(format!("remount,size={size}"))
            .arg(&self.path));
        assert_eq!(out.code, 0, "remount: {}", out.stderr);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Every file below `root`, relative to it.
fn files_below(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                dirs.push(entry.path());
            } else {
                found.push(entry.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

/// A file replica holds only its identity, its lease and complete LTX files.
fn assert_replica_holds_only_complete_files(root: &Path) {
    for file in files_below(root) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if name == "multidb.json" || name == "multidb.lease" {
            continue;
        }
        assert!(
            file.components()
                .rev()
                .nth(2)
                .is_some_and(|c| c.as_os_str() == "ltx")
                && name.len() == 37
                && name.ends_with(".ltx"),
            "{} is not a replica file (a temporary left behind?)",
            file.display()
        );
        assert_complete_ltx(&root.join(&file));
    }
}

/// Writes `path` until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
}

/// Adds `rows` random rows of 1,000 bytes to `db` with the plain `sqlite3` shell (no
/// extension).
fn grow(db: &Path, rows: usize) {
    let out = run(Command::new("sqlite3")
        .arg(db)
        .arg(".timeout 5000")
        .arg(format!(
            "CREATE TABLE IF NOT EXISTS big(b BLOB); \
         WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {}) \
         INSERT INTO big SELECT randomblob(1000) FROM c;",
            rows
        )));
    assert_eq!(out.code, 0, "{}", out.stderr);
}

fn count_big(db: &Path) -> String {
    let out = run(Command::new("sqlite3")
        .arg(db)
        .arg("SELECT count(*), sum(length(b)) FROM big"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout
}

/// A host (see `lease.rs`) whose tenant is replicated to the directory `replica`, with a
/// lease TTL of 3 s, so a disk full for seconds outlasts it. A single host: a renewal that
/// is late on a loaded machine fences its writes for a moment, which these tests allow for.
fn host_replicating_to(root: &Path, replica: &Path) -> Host {
    Host::with_ttl(
        root,
        "host",
        &format!(
            "    type: file\n    path: \"{}/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"\n",
            replica.display()
        ),
        &[],
        "3s",
    )
}

/// Commits until one is acknowledged once there is room again: syncs that kept failing back
/// off (up to 30 s) and a fenced writer looks at its lease again after 5 s, so the next
/// attempt may be that far away.
fn commit_until_acknowledged_after_room(host: &Host) {
    let room = Instant::now();
    for n in 0.. {
        let (wait, status) = host.commit(&format!("room-again-{n}"), 3_000);
        if wait == "1" {
            break;
        }
        assert!(
            room.elapsed() < Duration::from_secs(120),
            "not acknowledged 120 s after room came back: {status}\n{}",
            host.log()
        );
    }
    eprintln!(
        "acknowledged again {:?} after room came back",
        room.elapsed()
    );
}

/// The latest restore holds every row of the host's database.
fn assert_restores_to_its_database(host: &Host, scratch: &Path) {
    let restored = scratch.join("restored.db");
    let out = host.restore(None, &restored);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(rows(&restored), rows(&host.db));
    assert_eq!(count_big(&restored), count_big(&host.db));
}

/// The agent's replica directory fills up: commits after the one that does not fit are not
/// acknowledged, `multidb status` names the cause, no temporary or half file is left in the
/// replica; with room again every commit reaches it, and the restore equals the source.
#[test]
fn a_full_replica_disk_holds_acknowledgements_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&tmp.path().join("replica-fs"), "1m") else {
        return;
    };
    let replica = disk.path.join("r");
    let mut host = host_replicating_to(tmp.path(), &replica);
    host.start();
    for n in 0..3 {
        let (wait, status) = host.commit(&format!("fits-{n}"), 10_000);
        assert_eq!(wait, "1", "{status}\n{}", host.log());
    }

    // 2 MB of rows do not fit in 1 MiB: neither they nor the commit after them are
    // acknowledged.
    grow(&host.db, 2000);
    let (wait, status) = host.commit("after-full", 3_000);
    assert_eq!(
        wait,
        "0",
        "acknowledged although the replica's disk is full: {status}\n{}",
        host.log()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let report = host.status().expect("status");
        if report["errors"].to_string().contains("No space left") || Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        report["errors"].to_string().contains("No space left"),
        "multidb status names the full disk: {report}\n{}",
        host.log()
    );
    let location = replica.join("p1/userdb/main/acme");
    assert_replica_holds_only_complete_files(&location);

    // Full to the last byte for longer than the lease's TTL: lease renewals fail too, so the
    // writer fences itself; still nothing is acknowledged and nothing is lost.
    let filler = disk.path.join("filler");
    fill(&filler);
    let (wait, status) = host.commit("full-to-the-byte", 3_000);
    assert_eq!(wait, "0", "{status}\n{}", host.log());
    std::thread::sleep(Duration::from_secs(4));
    let (wait, status) = host.commit("past-the-ttl", 3_000);
    assert_eq!(wait, "0", "{status}\n{}", host.log());
    assert_replica_holds_only_complete_files(&location);
    let log = host.log();
    assert!(
        log.matches("not replicated").count() <= 2,
        "a refusal for the same reason is logged once: {log}"
    );

    // Room again: everything arrives, nothing was lost on the way.
    fs::remove_file(&filler).unwrap();
    disk.resize("64m");
    commit_until_acknowledged_after_room(&host);
    assert_replica_holds_only_complete_files(&location);
    // Renewals failed at every keeper tick (~0.3 s with this TTL) for seconds: logged at the
    // 1st, 2nd, 4th… failure in a row, and once when they work again.
    let log = host.log();
    let failed = log.matches("renewing a lease failed").count();
    // Eight lines are 128 failures in a row (~40 s); twelve would be ten minutes.
    assert!(
        (1..=12).contains(&failed),
        "{failed} renewal failures logged: {log}"
    );
    assert!(log.contains("lease renewed again"), "{log}");
    assert_restores_to_its_database(&host, tmp.path());
}

/// `multidb restore` and `multidb restore --all` onto a full disk: a non-zero exit naming the
/// cause, no partial database and no temporary left; with room again a rerun of `--all`
/// completes, keeping what the first run had verified, and every restore equals its source.
#[test]
fn a_restore_onto_a_full_disk_fails_cleanly_and_a_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    let replicas = dir.join("replicas");
    fs::write(
        dir.join("multidb.yml"),
        format!(
            "multi_db:\n  discovery_pattern: \"{}/{{name}}.db\"\n  replica_template:\n    type: file\n    path: \"{}/{{{{name}}}}\"\n",
            data.display(),
            replicas.display()
        ),
    )
    .unwrap();
    fs::create_dir_all(&data).unwrap();
    // Four databases of about 600 kB each: one or two fit in 1 MiB, not all four.
    let dbs: Vec<PathBuf> = (0..4).map(|n| data.join(format!("t{n}.db"))).collect();
    for db in &dbs {
        let out = run(Command::new("sqlite3")
            .arg(db)
            .arg("PRAGMA journal_mode=WAL;"));
        assert_eq!(out.code, 0, "{}", out.stderr);
        grow(db, 600);
        let url = format!(
            "file://{}",
            replicas
                .join(db.file_stem().unwrap().to_str().unwrap())
                .display()
        );
        let out = run(multidb(dir).args(["replicate", "--once"]).arg(db).arg(&url));
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    let Some(disk) = Tmpfs::mount(&dir.join("small"), "1m") else {
        return;
    };

    // One database, bigger than the disk once two are there.
    let first = disk.path.join("first.db");
    let url = format!("file://{}", replicas.join("t0").display());
    let out = run(multidb(dir).args(["restore", "-o"]).arg(&first).arg(&url));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let second = disk.path.join("second.db");
    let out = run(multidb(dir).args(["restore", "-o"]).arg(&second).arg(&url));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("No space left"), "{}", out.stderr);
    assert_eq!(
        files_below(&disk.path),
        vec![PathBuf::from("first.db")],
        "a failed restore leaves nothing behind"
    );
    fs::remove_file(&first).unwrap();

    // The fleet: some restored, the rest listed as failed, nothing partial.
    let out_root = disk.path.join("out");
    let out = run(multidb(dir)
        .args(["restore", "--all", "--to"])
        .arg(&out_root));
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("No space left"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    let done = files_below(&out_root);
    assert!(done.len() < dbs.len(), "{done:?}");
    for file in &done {
        let name = file.to_str().unwrap();
        assert!(
            dbs.iter().any(|db| db.file_name().unwrap() == name),
            "{name} is a temporary or partial file left behind"
        );
        assert_eq!(count_big(&out_root.join(file)), count_big(&data.join(file)));
    }

    disk.resize("64m");
    let out = run(multidb(dir)
        .args(["restore", "--all", "--to"])
        .arg(&out_root));
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("{} already restored and verified", done.len())),
        "{}",
        out.stdout
    );
    for db in &dbs {
        let restored = out_root.join(db.file_name().unwrap());
        assert_eq!(count_big(&restored), count_big(db), "{}", db.display());
    }
}

/// The agent's own disk (its state directory, where LTX files are written before they are
/// shipped) fills up: nothing is acknowledged, the error names the temporary file, failed
/// attempts leave no partial files behind (each retry would otherwise add one and fill the
/// disk further), and with room again the replica catches up.
#[test]
fn a_full_state_disk_leaves_no_partial_files_and_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let replica = tmp.path().join("replica");
    let mut host = host_replicating_to(tmp.path(), &replica);
    let Some(disk) = Tmpfs::mount(&host.dir.join("state"), "1m") else {
        return;
    };
    host.start();
    let (wait, status) = host.commit("fits", 10_000);
    assert_eq!(wait, "1", "{status}\n{}", host.log());

    grow(&host.db, 2000);
    let (wait, status) = host.commit("after-full", 3_000);
    assert_eq!(wait, "0", "{status}\n{}", host.log());
    let staging = disk.path.join("tmp");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = host.status().expect("status");
        let errors = report["errors"].to_string();
        let failures = host.log().matches("sync failed").count();
        let left = fs::read_dir(&staging).unwrap().count();
        assert!(
            left <= 1,
            "{left} files in {} after {failures} failed syncs: partial files left behind",
            staging.display()
        );
        if failures >= 4 {
            assert!(
                errors.contains("No space left") && errors.contains(&staging.display().to_string()),
                "the error names the full disk's file: {errors}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than 4 failed syncs in 30 s: {}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    disk.resize("64m");
    commit_until_acknowledged_after_room(&host);
    assert_restores_to_its_database(&host, tmp.path());
}
