//! Issue 10: hostile names, links and files, and other local users. The agent runs as root
//! over directories that tenants own: nothing it writes may land outside the replica root or
//! be more readable than its source, and crafted input ends in a message, not a crash.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use multidb_tests::{multidb, multidb_bin, run};

/// A real WAL-mode database with one row.
fn make_db(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES ('hello');",
    )
    .unwrap();
}

/// A configuration for the seed's layout under `dir/data`, with `template` as the replica
/// path and the state in `dir/state`.
fn config(dir: &Path, template: &str) -> PathBuf {
    let path = dir.join("multidb.yml");
    let text = format!(
        "multi_db:\n  discovery_pattern: \"{}/data/*/databases/*/branches/*/tenants/*.db\"\n  scan_interval: 1s\n  sync_interval: 100ms\n  state_dir: \"{}/state\"\n  replica_template:\n    type: file\n    path: \"{template}\"\n",
        dir.display(),
        dir.display()
    );
    fs::write(&path, text).unwrap();
    path
}

fn seed_db(dir: &Path, project: &str, branch: &str, tenant: &str) -> PathBuf {
    dir.join(format!(
        "data/{project}/databases/d1/branches/{branch}/tenants/{tenant}"
    ))
}

/// `multidb agent --baseline` with its ring in `dir`.
fn start_agent(dir: &Path, config: &Path) -> Child {
    Command::new(multidb_bin())
        .current_dir(dir)
        .env("MULTIDB_RING", dir.join("ring"))
        .env("MULTIDB_LOG", "warn")
        .arg("--config")
        .arg(config)
        .args(["agent", "--baseline"])
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("agent.log")).unwrap())
        .spawn()
        .unwrap()
}

fn stop(mut agent: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    assert_eq!(status.code(), Some(0), "agent exit");
}

/// Waits until `dir` holds an `.ltx` file somewhere below it.
fn wait_for_ltx(dir: &Path, agent: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !all_files(dir)
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "ltx"))
    {
        if let Ok(Some(status)) = agent.try_wait() {
            panic!(
                "agent exited with {status}: {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no LTX file below {}: {}",
            dir.display(),
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every file and directory below `dir`, not following symlinks.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            out.extend(all_files(&path));
        }
        out.push(path);
    }
    out
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Cases 1 and 2: `..db` captures `tenant = .`; beside literal text in the template that made
/// `..` and the agent wrote outside the replica root.
#[test]
fn regression_10_a_dot_value_is_refused_and_nothing_is_written_outside_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let escaping = seed_db(dir, "p1", "main", "..db");
    let fine = seed_db(dir, "p1", "main", "acme.db");
    make_db(&escaping);
    make_db(&fine);
    let root = dir.join("r/replica");
    let config = config(
        dir,
        &format!(
            "{}/.{{{{tenant}}}}/{{{{project}}}}-{{{{branch}}}}",
            root.display()
        ),
    );

    let out = run(multidb(dir).arg("--config").arg(&config).arg("databases"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("/..db\t"))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(
        line.contains("(not replicated: tenant value \".\" is `.`"),
        "{line}"
    );
    let out = run(multidb(dir)
        .arg("--config")
        .arg(&config)
        .arg("parse")
        .arg(&escaping));
    assert!(
        out.stdout.contains("replica: not replicated: tenant value"),
        "{}",
        out.stdout
    );

    let mut agent = start_agent(dir, &config);
    wait_for_ltx(&root, &mut agent, &dir.join("agent.log"));
    // Another scan and sync round for the refused one to have had its chance.
    std::thread::sleep(Duration::from_millis(1500));
    stop(agent);
    let outside: Vec<PathBuf> = all_files(&dir.join("r"))
        .into_iter()
        .filter(|p| !p.starts_with(&root) && *p != root)
        .collect();
    assert!(outside.is_empty(), "written outside the root: {outside:?}");
    assert!(root.join(".acme/p1-main/ltx/9").is_dir() || root.join(".acme/p1-main/ltx/0").is_dir());
    let log = fs::read_to_string(dir.join("agent.log")).unwrap();
    assert!(log.contains("not replicated"), "{log}");
}

/// Case 3: a 0600 database in a 0700 tree was replicated and restored world-readable, and
/// the state that lists every database was 0644.
#[test]
fn regression_10_copies_and_state_keep_the_source_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = seed_db(dir, "p1", "main", "acme.db");
    make_db(&db);
    let data = dir.join("data");
    for p in all_files(&data).into_iter().chain([data.clone()]) {
        let m = if p.is_dir() { 0o700 } else { 0o600 };
        fs::set_permissions(&p, fs::Permissions::from_mode(m)).unwrap();
    }
    let root = dir.join("replica");
    let config = config(
        dir,
        &format!(
            "{}/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}",
            root.display()
        ),
    );
    let mut agent = start_agent(dir, &config);
    wait_for_ltx(&root, &mut agent, &dir.join("agent.log"));
    // A commit while hot: level 0 and the temporary LTX path too.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("INSERT INTO t VALUES ('second')", []).unwrap();
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(30);
    while all_files(&root).iter().filter(|p| p.is_file()).count() < 2 {
        assert!(Instant::now() < deadline, "no second LTX file");
        std::thread::sleep(Duration::from_millis(50));
    }
    let state = dir.join("state");
    assert_eq!(mode(&state), 0o700, "state directory");
    for name in ["state.db", "state.db-wal", "state.db-shm", "agent.sock"] {
        assert_eq!(mode(&state.join(name)), 0o600, "{name}");
    }
    stop(agent);

    let files = all_files(&root);
    assert!(!files.is_empty());
    for f in &files {
        let m = mode(f);
        if f.is_dir() {
            // Directories made for replicas: a tree of the replica root's own dirs is the
            // operator's; those the agent made are owner-only.
            if f.starts_with(root.join("p1")) {
                assert_eq!(m, 0o700, "{}", f.display());
            }
        } else {
            assert_eq!(m, 0o600, "{}", f.display());
        }
    }
    for f in all_files(&state) {
        if f.is_file() {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }

    let out_db = dir.join("restored.db");
    let out = run(multidb(dir)
        .arg("--config")
        .arg(&config)
        .args(["restore", "-o"])
        .arg(&out_db)
        .arg(&db));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(mode(&out_db), 0o600, "restored beside its 0600 source");
    let url = format!("file://{}/p1/d1/main/acme", root.display());
    let from_url = dir.join("from-url.db");
    let out = run(multidb(dir)
        .args(["restore", "-o"])
        .arg(&from_url)
        .arg(&url));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(mode(&from_url), 0o600, "restored from a URL: owner-only");
}

/// Case 4: a user who owns a branch directory links it to a directory they cannot read.
#[test]
fn regression_10_a_symlinked_branch_is_not_discovered_or_replicated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_db(&seed_db(dir, "p1", "main", "acme.db"));
    make_db(&dir.join("secret/tenants/hidden.db"));
    std::os::unix::fs::symlink(
        dir.join("secret"),
        dir.join("data/p1/databases/d1/branches/linked"),
    )
    .unwrap();
    let root = dir.join("replica");
    let config = config(
        dir,
        &format!(
            "{}/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}",
            root.display()
        ),
    );
    let out = run(multidb(dir)
        .arg("--config")
        .arg(&config)
        .args(["databases", "--json"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    let paths: Vec<&str> = list.iter().map(|d| d["path"].as_str().unwrap()).collect();
    assert_eq!(paths.len(), 1, "{paths:?}");
    assert!(paths[0].ends_with("/main/tenants/acme.db"));

    let mut agent = start_agent(dir, &config);
    wait_for_ltx(&root, &mut agent, &dir.join("agent.log"));
    std::thread::sleep(Duration::from_millis(1500));
    stop(agent);
    assert!(root.join("p1/d1/main/acme").is_dir());
    assert!(
        !root.join("p1/d1/linked").exists(),
        "{:?}",
        all_files(&root)
    );
}

/// Case 6: a 4 KB replica file claiming a page near 2^31.
#[test]
fn regression_10_a_crafted_ltx_file_fails_fast_and_leaves_nothing() {
    use multidb_agent::ltx::{Encoder, Header};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join("src.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA page_size=4096; VACUUM;")
        .unwrap();
    drop(conn);
    let page = fs::read(&db).unwrap();
    let header = |commit: u32, txid: u64| Header {
        page_size: 4096,
        commit,
        min_txid: txid,
        max_txid: txid,
        pre_apply_checksum: if txid > 1 { (1 << 63) | 1 } else { 0 },
        ..Header::default()
    };
    let level = dir.join("replica/ltx/0");
    fs::create_dir_all(&level).unwrap();
    let mut e = Encoder::new(Vec::new(), header(1, 1)).unwrap();
    e.write_page(1, &page).unwrap();
    let (snapshot, _) = e.finish(None).unwrap();
    fs::write(
        level.join("0000000000000001-0000000000000001.ltx"),
        snapshot,
    )
    .unwrap();
    let huge = (1u32 << 31) - 2;
    let mut e = Encoder::new(Vec::new(), header(huge, 2)).unwrap();
    e.write_page(huge - 1, &page).unwrap();
    let (crafted, _) = e.finish(Some((1 << 63) | 7)).unwrap();
    assert!(crafted.len() <= 4096);
    fs::write(level.join("0000000000000002-0000000000000002.ltx"), crafted).unwrap();

    let out_dir = dir.join("out");
    fs::create_dir(&out_dir).unwrap();
    let started = Instant::now();
    let out = run(multidb(dir)
        .args(["restore", "-o"])
        .arg(out_dir.join("x.db"))
        .arg(format!("file://{}/replica", dir.display())));
    eprintln!("refused in {:?}: {}", started.elapsed(), out.stderr);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("0000000000000002-0000000000000002.ltx is corrupt: header grows the database from 1 to 2147483646 pages"),
        "{}",
        out.stderr
    );
    assert_eq!(
        fs::read_dir(&out_dir).unwrap().count(),
        0,
        "a failed restore leaves nothing"
    );
}

/// Spawns `multidb ARGS` with its stdout a pipe whose reading end is already closed.
fn with_closed_stdout(dir: &Path, args: &[&str]) -> (Option<i32>, Option<i32>, String) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = multidb(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        out.status.signal(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Case 7: `multidb ltx … | head` panicked; `multidb databases | head` printed "Broken pipe"
/// and exited 1.
#[test]
fn regression_10_a_closed_pipe_ends_listings_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = run(multidb(dir).args(["generate", "--root", "data", "--tenants", "50"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let level = dir.join("replica/ltx/0");
    fs::create_dir_all(&level).unwrap();
    for i in 1..=2000u64 {
        fs::write(level.join(format!("{i:016x}-{i:016x}.ltx")), b"").unwrap();
    }
    let pattern = format!(
        "{}/data/*/databases/*/branches/*/tenants/*.db",
        dir.display()
    );
    let replica = format!("file://{}/replica", dir.display());
    for args in [
        vec!["--pattern", &pattern, "databases"],
        vec!["--pattern", &pattern, "databases", "--json"],
        vec!["ltx", &replica],
        vec!["ltx", "--json", &replica],
    ] {
        let (code, signal, stderr) = with_closed_stdout(dir, &args);
        assert!(
            code == Some(0) || signal == Some(libc::SIGPIPE),
            "{args:?}: exit {code:?} signal {signal:?}: {stderr}"
        );
        for noise in ["panicked", "Broken pipe", "backtrace"] {
            assert!(!stderr.contains(noise), "{args:?}: {stderr}");
        }
    }
}

/// Case 8, the smaller ones, each as a user meets it.
#[test]
fn regression_10_smaller_cases() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let write = |text: &str| {
        let path = dir.join("m.yml");
        fs::write(&path, text).unwrap();
        path
    };
    // max_active beyond what one agent can hold is a configuration error: exit 2.
    let c = write("multi_db:\n  discovery_pattern: \"/d/*.db\"\n  max_active: 1000000000\n");
    let out = run(multidb(dir).arg("--config").arg(&c).arg("agent"));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("multi_db.max_active"), "{}", out.stderr);

    // 100,000 levels of nesting are refused at once.
    let deep = format!(
        "multi_db:\n  discovery_pattern: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let c = write(&deep);
    let started = Instant::now();
    let out = run(multidb(dir).arg("--config").arg(&c).arg("databases"));
    eprintln!("100,000 levels refused in {:?}", started.elapsed());
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("nested deeper than"), "{}", out.stderr);

    // An unclosed `{{` is a syntax error, a bucket with `/` is not a bucket.
    let c = write("multi_db:\n  discovery_pattern: \"/d/*/*/*/*.db\"\n  replica_template:\n    path: \"/r/{{project/{{tenant}}\"\n");
    let out = run(multidb(dir).arg("--config").arg(&c).arg("databases"));
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("unclosed `{{`"), "{}", out.stderr);
    let c = write("multi_db:\n  discovery_pattern: \"/d/*.db\"\n  replica_template:\n    type: s3\n    bucket: \"a/b\"\n    path: \"x/{{1}}\"\n");
    let out = run(multidb(dir).arg("--config").arg(&c).arg("databases"));
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("is not a bucket name"),
        "{}",
        out.stderr
    );

    // An OS error is said once.
    let replica = dir.join("r");
    let level = replica.join("ltx/9");
    fs::create_dir_all(&level).unwrap();
    fs::write(level.join("0000000000000001-0000000000000001.ltx"), b"").unwrap();
    let out = run(multidb(dir)
        .args(["restore", "-o"])
        .arg(dir.join("missing/x.db"))
        .arg(format!("file://{}", replica.display())));
    assert_eq!(out.code, 1, "{}", out.stderr);
    let line = out.stderr.lines().last().unwrap_or_default().to_string();
    assert_eq!(line.matches("(os error 2)").count(), 1, "{line}");
    assert!(
        !dir.join("missing").exists(),
        "a restore makes no parent directories"
    );

    // Names with newlines, tabs and escapes print as one escaped line.
    let db = dir.join("data/p/databases/d/branches/ma\nin/tenants/a\tb\u{1b}[2J.db");
    make_db(&db);
    let pattern = format!(
        "{}/data/*/databases/*/branches/*/tenants/*.db",
        dir.display()
    );
    let out = run(multidb(dir).args(["--pattern", &pattern, "databases"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 1, "{:?}", out.stdout);
    assert!(
        out.stdout.contains("/ma\\nin/tenants/a\\tb\\u{1b}[2J.db\t"),
        "{:?}",
        out.stdout
    );
    assert!(!out.stdout.contains('\u{1b}'));
}

/// Case 8: `restore -o` with a relative path, and an output name near NAME_MAX.
#[test]
fn regression_10_restore_to_relative_and_long_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let db = dir.join("src.db");
    make_db(&db);
    let replica = dir.join("replica");
    let out = run(multidb(dir)
        .args(["replicate", "--once"])
        .arg(&db)
        .arg(format!("file://{}", replica.display())));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let url = format!("file://{}", replica.display());
    fs::create_dir(dir.join("sub")).unwrap();
    // 249 bytes: SQLite can still name its `-wal` (253) beside it, the old temporary name
    // (`.NAME.multidb-restore-PID`) could not be made.
    let long = format!("{}.db", "x".repeat(246));
    for output in [
        "relative.db",
        "sub/relative.db",
        "./sub/dot.db",
        long.as_str(),
    ] {
        let out = run(multidb(dir).args(["restore", "-o", output, &url]));
        assert_eq!(out.code, 0, "{output}: {}", out.stderr);
        let restored = rusqlite::Connection::open(dir.join(output)).unwrap();
        let x: String = restored
            .query_row("SELECT x FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(x, "hello");
    }
    // A database path relative to the working directory, through the configuration.
    let config = dir.join("multidb.yml");
    fs::write(
        &config,
        format!(
            "multi_db:\n  discovery_pattern: \"{}/{{name}}.db\"\n  replica_template:\n    path: \"{}/{{{{name}}}}\"\n",
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    fs::rename(&replica, dir.join("src")).unwrap();
    let out = run(multidb(dir).args(["restore", "-o", "via-config.db", "src.db"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
}
