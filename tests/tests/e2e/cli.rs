//! The cold-side commands as a user runs them: `generate`, `databases`, `parse`, and the exit
//! codes and messages of bad input.

use std::fs;
use std::path::Path;

use multidb_tests::{multidb, run};

fn seed_config(dir: &Path) -> std::path::PathBuf {
    let config = dir.join("multidb.yml");
    let root = dir.join("data");
    let text = format!(
        "multi_db:\n  discovery_pattern: \"{}/*/databases/*/branches/*/tenants/*.db\"\n  max_active: 10\n  scan_interval: 30s\n  replica_template:\n    type: file\n    path: \"{}/replica/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"\n",
        root.display(),
        dir.display()
    );
    fs::write(&config, text).unwrap();
    config
}

fn generate_seed(dir: &Path) {
    let out = run(multidb(dir).args(["generate", "--root", "data", "--sqlite"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.starts_with("created 24 databases"),
        "{}",
        out.stdout
    );
}

#[test]
fn seed_tree_lists_24_databases_with_fields_and_replica_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    generate_seed(dir);
    seed_config(dir);
    let out = run(multidb(dir).arg("databases"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 24, "{}", out.stdout);
    let acme = format!(
        "{d}/data/project1/databases/userdb/branches/main/tenants/acme.db\tcold\tproject=project1 database=userdb branch=main tenant=acme\t{d}/replica/project1/userdb/main/acme",
        d = dir.display()
    );
    assert!(
        lines.contains(&acme.as_str()),
        "missing {acme}\n{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("24 databases discovered"),
        "{}",
        out.stderr
    );

    let out = run(multidb(dir).args(["databases", "--json"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list.len(), 24);
    let initech = list
        .iter()
        .find(|d| {
            d["path"]
                .as_str()
                .unwrap()
                .ends_with("project2/databases/orderdb/branches/feature/tenants/initech.db")
        })
        .unwrap();
    assert_eq!(initech["fields"]["tenant"], "initech");
    assert_eq!(initech["fields"]["branch"], "feature");
    assert_eq!(initech["tier"], "cold");
    assert_eq!(
        initech["replica"],
        format!("{}/replica/project2/orderdb/feature/initech", dir.display())
    );

    let out = run(multidb(dir).args(["databases", "--count"]));
    assert_eq!((out.code, out.stdout.as_str()), (0, "24\n"));
}

#[test]
fn parse_prints_fields_or_why_a_path_does_not_match() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    seed_config(dir);
    let path = format!(
        "{}/data/p9/databases/crm/branches/dev/tenants/hooli.db",
        dir.display()
    );
    let out = run(multidb(dir).args(["parse", &path]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        format!("project: p9\ndatabase: crm\nbranch: dev\ntenant: hooli\nreplica: {}/replica/p9/crm/dev/hooli\n", dir.display())
    );
    let out = run(multidb(dir).args(["parse", "--json", &path]));
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["fields"]["database"], "crm");
    // A path relative to the working directory, as `restore` and `release` take it.
    let out = run(multidb(dir).args([
        "parse",
        "--json",
        "./data/p9/databases/crm/branches/dev/tenants/hooli.db",
    ]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["path"], path.as_str());
    assert_eq!(v["fields"]["tenant"], "hooli");

    let bad = format!(
        "{}/data/p9/dbs/crm/branches/dev/tenants/hooli.db",
        dir.display()
    );
    let out = run(multidb(dir).args(["parse", &bad]));
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("does not match")
            && out
                .stderr
                .contains("it has segment 2 `dbs`, which does not match `databases`"),
        "{}",
        out.stderr
    );
}

#[test]
fn unsafe_values_are_listed_but_never_given_a_replica_path() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    seed_config(dir);
    let tenants = dir.join("data/p/databases/d/branches/b/tenants");
    fs::create_dir_all(&tenants).unwrap();
    fs::write(tenants.join("...db"), b"").unwrap();
    let out = run(multidb(dir).args(["databases", "--json"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0]["replica_error"],
        "tenant value \"..\" contains `..`"
    );
    assert!(list[0].get("replica").is_none());
}

#[test]
fn bad_input_gets_a_clear_message_and_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::write(
        dir.join("bad.yml"),
        "multi_db:\n  discovery_pattern: \"/data/*/x/*.db\"\n  max_active: 0\n",
    )
    .unwrap();
    let out = run(multidb(dir).args(["--config", "bad.yml", "databases"]));
    assert_eq!(out.code, 2);
    assert_eq!(
        out.stderr.trim(),
        "multidb: bad.yml:3:3: multi_db.max_active: expected a positive integer"
    );

    let out = run(multidb(dir).arg("databases"));
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("./multidb.yml does not exist; pass --config FILE or --pattern PATTERN"),
        "{}",
        out.stderr
    );

    let out = run(multidb(dir).args(["--config", "missing.yml", "databases"]));
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("missing.yml: cannot read"),
        "{}",
        out.stderr
    );

    let out = run(multidb(dir).args(["--pattern", "/data/**/x.db", "databases"]));
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("--pattern: pattern `/data/**/x.db`: recursive `**` is not supported"),
        "{}",
        out.stderr
    );

    let out = run(multidb(dir).args([
        "--pattern",
        "/nonexistent-root-for-multidb/*.db",
        "databases",
    ]));
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("pattern root `/nonexistent-root-for-multidb` cannot be read"),
        "{}",
        out.stderr
    );

    let out = run(multidb(dir).args(["databases", "--frobnicate"]));
    assert_eq!(out.code, 2, "clap usage errors exit 2");
}

/// Issue 13: a pattern that matches nothing says so, at the segment where the walk stopped.
#[test]
fn regression_13_a_pattern_that_matches_nothing_says_where() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir_all(dir.join("data/project1/dbs")).unwrap();
    seed_config(dir);
    let out = run(multidb(dir).arg("databases"));
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "the pattern matches no database: no directory in `{}/data/project1` matches segment 2 `databases`",
            dir.display()
        )),
        "{}",
        out.stderr
    );
}

/// Issue 13: logs into a pipe carry no colour codes; `MULTIDB_LOG_FORMAT=json` makes each log
/// line one JSON object.
#[test]
fn regression_13_logs_are_plain_in_a_pipe_and_json_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pattern = format!("{}/*.db", dir.display());
    let out =
        run(multidb(dir)
            .env("MULTIDB_LOG", "info")
            .args(["--pattern", &pattern, "databases"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("matches no database"), "{}", out.stderr);
    assert!(!out.stderr.contains('\u{1b}'), "{:?}", out.stderr);

    let out = run(multidb(dir)
        .env("MULTIDB_LOG", "info")
        .env("MULTIDB_LOG_FORMAT", "json")
        .args(["--pattern", &pattern, "databases"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let logs: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter(|l| !l.starts_with("0 databases discovered"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let warning = logs
        .iter()
        .find(|l| l["level"] == "WARN")
        .unwrap_or_else(|| panic!("{}", out.stderr));
    assert!(
        warning["fields"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the pattern matches no database"),
        "{warning}"
    );
    assert_eq!(warning["fields"]["pattern"], pattern.as_str());

    let out = run(multidb(dir).env("MULTIDB_LOG_FORMAT", "yaml").args([
        "--pattern",
        &pattern,
        "databases",
    ]));
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("MULTIDB_LOG_FORMAT=`yaml`: expected `text` or `json`"),
        "{}",
        out.stderr
    );
}

/// Issue 13: a replica directory given without `file://` gets the URL to use, not "no
/// configuration".
#[test]
fn regression_13_a_bare_replica_directory_suggests_its_url() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::create_dir_all(dir.join("replica/ltx/0")).unwrap();
    let hint = format!(
        "replica is a directory, not a database; to read it as a replica, pass file://{}/replica",
        dir.display()
    );
    let out = run(multidb(dir).args(["ltx", "replica"]));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains(&hint), "{}", out.stderr);
    let out = run(multidb(dir).args(["restore", "-o", "out.db", "replica"]));
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains(&hint), "{}", out.stderr);
    assert!(!dir.join("out.db").exists());
}

#[test]
fn rescan_sees_a_commit_through_the_wal_only() {
    use multidb_agent::discover::{arena::Arena, discovery, pattern::Pattern};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    generate_seed(dir);
    let pattern = Pattern::new(&format!(
        "{}/data/*/databases/*/branches/*/tenants/*.db",
        dir.display()
    ))
    .unwrap();
    let mut arena = Arena::new(pattern.root());
    assert_eq!(
        discovery::scan(&pattern, &mut arena)
            .unwrap()
            .diff
            .added
            .len(),
        24
    );
    let db = dir.join("data/project1/databases/userdb/branches/main/tenants/globex.db");
    let main_before = fs::metadata(&db).unwrap().modified().unwrap();
    // A writer that keeps its connection open, so the WAL stays (as a live app's would).
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA journal_mode=WAL; INSERT INTO items(name) VALUES ('third');")
        .unwrap();
    assert_eq!(
        fs::metadata(&db).unwrap().modified().unwrap(),
        main_before,
        "WAL commit left the main file alone"
    );
    let diff = discovery::scan(&pattern, &mut arena).unwrap().diff;
    let id = arena.lookup_path(db.to_str().unwrap()).unwrap();
    assert_eq!(diff.changed, vec![id]);
    assert!(diff.added.is_empty() && diff.removed.is_empty());
    let removed = dir.join("data/project2/databases/orderdb/branches/main/tenants/acme.db");
    fs::remove_file(&removed).unwrap();
    fs::copy(
        &db,
        dir.join("data/project2/databases/orderdb/branches/main/tenants/umbrella.db"),
    )
    .unwrap();
    let diff = discovery::scan(&pattern, &mut arena).unwrap().diff;
    assert_eq!(diff.removed, vec![removed.display().to_string()]);
    assert_eq!(diff.added.len(), 1);
    drop(conn);
}

/// The repository's root, where `scripts/` and the README are.
fn repo_root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Issue 13: `scripts/run.sh` set up the S3 server and Litestream of the tests before the
/// demo, which needs neither; it asks `setup.sh --build`, which installs only what building
/// needs (here: nothing, libclang being given, and no Python tool is ever run).
#[test]
fn regression_13_run_sh_installs_only_what_the_demo_needs() {
    let root = repo_root();
    let run_sh = fs::read_to_string(root.join("scripts/run.sh")).unwrap();
    assert!(
        run_sh
            .lines()
            .any(|l| l.trim() == "scripts/setup.sh --build"),
        "{run_sh}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let log = tmp.path().join("python3.log");
    let stub = format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", log.display());
    fs::write(bin.join("python3"), stub).unwrap();
    fs::set_permissions(
        bin.join("python3"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = run(std::process::Command::new("/bin/bash")
        .arg(root.join("scripts/setup.sh"))
        .arg("--build")
        .env("PATH", &bin)
        .env("LIBCLANG_PATH", tmp.path())
        .env("HOME", tmp.path()));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        !log.exists(),
        "setup.sh --build ran python3: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Issue 13: the README's demo transcript shows the paths of a clone anyone could have
/// (`/home/me/multidb`), not those of the machine it was recorded on.
#[test]
fn regression_13_readme_demo_shows_no_machine_paths() {
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme
        .find("\nmultidb demo in ")
        .expect("the demo transcript");
    let transcript = &readme[start..start + readme[start..].find("```").unwrap()];
    for line in transcript.lines().filter(|l| l.contains("multidb-demo")) {
        for (i, _) in line.match_indices("multidb-demo") {
            assert!(
                line[..i].ends_with("/home/me/multidb/"),
                "a machine's path in the README: {line}"
            );
        }
    }
}
