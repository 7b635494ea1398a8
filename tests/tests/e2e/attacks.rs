//! Issue 10, the ring and a second local user: the ring is created, never imposed on a file
//! that is not one, and a user who does not own a database cannot read it through the agent's
//! copies or links planted for the root agent.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use multidb_tests::{multidb, run};

/// `multidb ring --ring PATH tail` for at most a second of quiet.
fn ring_tail(dir: &Path, ring: &Path) -> multidb_tests::Run {
    run(multidb(dir)
        .arg("ring")
        .arg("--ring")
        .arg(ring)
        .args(["tail", "--idle-exit", "1s"]))
}

/// `MULTIDB_RING=ring multidb agent` over an empty tree; it must refuse before running.
fn agent_with_ring(dir: &Path, ring: &Path) -> multidb_tests::Run {
    let data = dir.join("data");
    fs::create_dir_all(&data).unwrap();
    let config = dir.join("multidb.yml");
    fs::write(
        &config,
        format!(
            "multi_db:\n  discovery_pattern: \"{}/*.db\"\n  state_dir: \"{}\"\n  replica_template:\n    type: file\n    path: \"{}/{{{{1}}}}\"\n",
            data.display(),
            dir.join("state").display(),
            dir.join("replica").display()
        ),
    )
    .unwrap();
    let mut command = multidb(dir);
    command
        .env("MULTIDB_RING", ring)
        .arg("--config")
        .arg(&config)
        .arg("agent");
    // Bounded: a regression that ran the agent would otherwise hang the test. The child is
    // killed through its handle, before it is reaped, so the pid cannot belong to another
    // process by then (a blind kill after a sleep could hit a reused pid: another test's agent).
    let stderr_path = dir.join(format!("agent-{}.stderr", ring_tag(ring)));
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    multidb_tests::Run {
        code: status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: fs::read_to_string(&stderr_path).unwrap_or_default(),
    }
}

/// A file-name-safe tag for a ring path, so two calls in one directory keep their logs apart.
fn ring_tag(ring: &Path) -> String {
    ring.to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// `ring tail` and the agent given a text file or a SQLite database as their ring refuse it,
/// naming it, and leave it byte for byte as it was.
#[test]
fn regression_10_the_ring_never_clobbers_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = dir.join("notes.txt");
    fs::write(&text, "precious notes\n".repeat(500)).unwrap();
    let db = dir.join("app.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES ('keep me');")
        .unwrap();
    drop(conn);
    for victim in [&text, &db] {
        let before = fs::read(victim).unwrap();
        for out in [ring_tail(dir, victim), agent_with_ring(dir, victim)] {
            assert_ne!(out.code, 0, "{}: {}", victim.display(), out.stderr);
            assert!(
                out.stderr.contains(&victim.display().to_string())
                    && out.stderr.contains("not a multidb ring"),
                "{}",
                out.stderr
            );
            assert_eq!(fs::read(victim).unwrap(), before, "{}", victim.display());
        }
    }
}

/// A symlink planted where the ring goes is refused, not followed: the file it points to
/// (here a root-owned 0600 file) is untouched.
#[test]
fn regression_10_a_planted_ring_symlink_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let secret = dir.join("secret");
    fs::write(&secret, "root's secret\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.join("multidb.ring");
    symlink(&secret, &link).unwrap();
    for out in [ring_tail(dir, &link), agent_with_ring(dir, &link)] {
        assert_ne!(out.code, 0, "{}", out.stderr);
        assert!(out.stderr.contains("symbolic link"), "{}", out.stderr);
        assert_eq!(fs::read_to_string(&secret).unwrap(), "root's secret\n");
    }
    // A valid ring is created where nothing is, owner-only, and reused by the next reader.
    let ring = dir.join("fresh.ring");
    let out = ring_tail(dir, &ring);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        fs::metadata(&ring).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = ring_tail(dir, &ring);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

/// The name of the unprivileged user these tests act as.
const OTHER_USER: &str = "multidbtest";

/// Creates [`OTHER_USER`] if needed; `None` (with the reason printed) when not root.
fn other_user() -> Option<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: creating a second local user needs root");
        return None;
    }
    let exists = Command::new("id")
        .arg(OTHER_USER)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let out = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/bin/sh", OTHER_USER])
            .output()
            .expect("useradd");
        assert!(
            out.status.success(),
            "useradd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(())
}

/// Runs `script` with `sh -c` as [`OTHER_USER`].
fn as_other(script: &str) -> std::process::Output {
    Command::new("su")
        .args(["-s", "/bin/sh", "-c", script, OTHER_USER])
        .output()
        .expect("su")
}

/// A second local user: a 0600 database in a 0700 tree, replicated and restored by the root
/// agent, stays unreadable to them through every copy; a ring symlink they plant in a
/// world-writable directory makes the root agent refuse, not truncate root's file; a branch
/// directory they own, linked to a directory they cannot list, is not replicated.
#[test]
fn regression_10_a_second_local_user_reads_nothing_through_the_agent() {
    if other_user().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The test directory itself must be traversable by the other user.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();

    // Ring: the user plants a link in a sticky world-writable directory.
    let shared = dir.join("shm");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let secret = dir.join("root-only");
    fs::write(&secret, "root's data\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let link = shared.join("multidb.ring");
    let out = as_other(&format!("ln -s {} {}", secret.display(), link.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent_with_ring(&dir.join("a"), &link);
    assert_ne!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("symbolic link"), "{}", out.stderr);
    assert_eq!(fs::read_to_string(&secret).unwrap(), "root's data\n");

    // Copies: a private database, replicated and restored by root.
    let data = dir.join("b/data/t");
    fs::create_dir_all(&data).unwrap();
    let db = data.join("private.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES ('only root');",
    )
    .unwrap();
    drop(conn);
    fs::set_permissions(&db, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(dir.join("b/data"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
    let replica = dir.join("b/replica");
    let out = run(multidb(dir)
        .args(["replicate", "--once"])
        .arg(&db)
        .arg(format!("file://{}", replica.display())));
    assert_eq!(out.code, 0, "{}", out.stderr);
    // Even with every directory open to them, the copies themselves refuse the other user.
    fs::set_permissions(dir.join("b"), fs::Permissions::from_mode(0o755)).unwrap();
    let mut files = Vec::new();
    let mut stack = vec![replica.clone()];
    while let Some(d) = stack.pop() {
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(!files.is_empty());
    let restored = dir.join("b/restored.db");
    let out = run(multidb(dir)
        .args(["restore", "-o"])
        .arg(&restored)
        .arg(format!("file://{}", replica.display())));
    assert_eq!(out.code, 0, "{}", out.stderr);
    files.push(restored.clone());
    for f in &files {
        let out = as_other(&format!("cat {} > /dev/null", f.display()));
        assert!(
            !out.status.success(),
            "{} is readable by another user",
            f.display()
        );
    }
    // The binary where the other user can run it, so a refusal is about the replica.
    let bin = dir.join("multidb");
    fs::copy(multidb_tests::multidb_bin(), &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_other(&format!("{} --version", bin.display()));
    assert!(out.status.success(), "the other user cannot run multidb");
    let out = as_other(&format!(
        "{} restore -o /tmp/multidb-stolen-$$.db file://{}",
        bin.display(),
        replica.display()
    ));
    assert!(
        !out.status.success(),
        "another user restored a private replica: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
