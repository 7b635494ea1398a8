//! Fleet recovery (issue 11): `multidb restore --all` and `multidb replicas` with the real
//! binary over a tree of real databases, each replicated by `multidb replicate --once`, to a
//! directory and to a real S3 server; every restore is compared with its source.

use std::fs;
use std::path::{Path, PathBuf};

use multidb_tests::s3server::S3Server;
use multidb_tests::{multidb, run, Run};

/// 2 projects × 1 database × 2 branches × 3 tenants.
const COUNT: usize = 12;

struct Fleet {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// Every database path, sorted.
    dbs: Vec<PathBuf>,
}

impl Fleet {
    /// A generated tree of [`COUNT`] databases, each with rows of its own, a configuration
    /// whose template is `template` (`{R}` stands for the test directory), and every database
    /// replicated once to the location its template names (a second transaction in every
    /// other one, so restores also apply level-0 files).
    fn new(template: &str, kind: &str, s3: Option<&S3Server>) -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let out = run(multidb(&dir).args([
            "generate",
            "--root",
            "data",
            "--sqlite",
            "--projects",
            "2",
            "--databases",
            "1",
            "--branches",
            "2",
            "--tenants",
            "3",
        ]));
        assert_eq!(out.code, 0, "{}", out.stderr);
        let mut extra = String::new();
        if let Some(server) = s3 {
            extra = format!(
                "    bucket: {}\n    endpoint: {}\n",
                multidb_tests::s3server::BUCKET,
                server.endpoint()
            );
        }
        fs::write(
            dir.join("multidb.yml"),
            format!(
                "multi_db:\n  discovery_pattern: \"{d}/data/*/databases/*/branches/*/tenants/*.db\"\n  replica_template:\n    type: {kind}\n    path: \"{}\"\n{extra}",
                template.replace("{R}", &dir.display().to_string()),
                d = dir.display()
            ),
        )
        .unwrap();
        let mut dbs: Vec<PathBuf> = Vec::new();
        collect_dbs(&dir.join("data"), &mut dbs);
        dbs.sort();
        assert_eq!(dbs.len(), COUNT);
        let fleet = Fleet {
            _tmp: tmp,
            dir,
            dbs,
        };
        for (i, db) in fleet.dbs.iter().enumerate() {
            // Open across both syncs, as an application would be: its WAL stays, so the
            // second sync ships the new frames as a level-0 file after the snapshot.
            let conn = rusqlite::Connection::open(db).unwrap();
            conn.execute(
                "INSERT INTO items(name) VALUES (?1)",
                [format!("{} row {i}", db.display())],
            )
            .unwrap();
            fleet.replicate(db, s3);
            if i % 2 == 0 {
                conn.execute("INSERT INTO items(name) VALUES ('later')", [])
                    .unwrap();
                fleet.replicate(db, s3);
            }
        }
        fleet
    }

    fn replicate(&self, db: &Path, s3: Option<&S3Server>) {
        let location = self.location(db, s3);
        let mut command = multidb(&self.dir);
        if let Some(server) = s3 {
            server.apply_env(&mut command);
        }
        let out = run(command.args(["replicate", "--once"]).arg(db).arg(&location));
        assert_eq!(out.code, 0, "{}", out.stderr);
    }

    /// The replica URL the configuration names for `db`, as `multidb parse` prints it.
    fn location(&self, db: &Path, s3: Option<&S3Server>) -> String {
        let out = run(multidb(&self.dir).args(["parse", "--json"]).arg(db));
        assert_eq!(out.code, 0, "{}", out.stderr);
        let parsed: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let replica = parsed["replica"].as_str().unwrap().to_string();
        match s3 {
            Some(server) => format!("{replica}?endpoint={}&region=us-east-1", server.endpoint()),
            None => format!("file://{replica}"),
        }
    }

    fn multidb(&self, args: &[&str], s3: Option<&S3Server>) -> Run {
        let mut command = multidb(&self.dir);
        if let Some(server) = s3 {
            server.apply_env(&mut command);
        }
        run(command.args(args))
    }

    /// Where `db` lands under `--to out`.
    fn restored(&self, db: &Path) -> PathBuf {
        self.dir
            .join("out")
            .join(db.strip_prefix(self.dir.join("data")).unwrap())
    }
}

fn collect_dbs(dir: &Path, out: &mut Vec<PathBuf>) {
    collect_files(dir, out);
    out.retain(|p| p.extension().is_some_and(|e| e == "db"));
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// Every row of a database, in order, as text.
fn rows(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT group_concat(id || ':' || name || ':' || created_at, '|') FROM (SELECT * FROM items ORDER BY id)",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// `out` exited with `code` and its stdout says `text`.
fn expect(out: &Run, code: i32, text: &str) {
    assert_eq!(out.code, code, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(text),
        "expected {text:?} in\n{}",
        out.stdout
    );
}

const FILE_TEMPLATE: &str = "{R}/replica/{{project}}/{{database}}/{{branch}}/{{tenant}}";

#[test]
fn restore_all_to_a_directory_equals_every_source_and_a_rerun_skips() {
    let fleet = Fleet::new(FILE_TEMPLATE, "file", None);
    let out = fleet.multidb(&["restore", "--all", "--to", "out", "--jobs", "3"], None);
    expect(
        &out,
        0,
        &format!("{COUNT} replica(s): {COUNT} restored, 0 already restored and verified, 0 failed"),
    );
    for db in &fleet.dbs {
        let restored = fleet.restored(db);
        assert_eq!(rows(&restored), rows(db), "{}", restored.display());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&restored).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", restored.display());
    }
    assert!(rows(&fleet.restored(&fleet.dbs[0])).contains("later"));

    // A rerun verifies what is there and restores nothing.
    let again = fleet.multidb(&["restore", "--all", "--to", "out"], None);
    expect(
        &again,
        0,
        &format!("0 restored, {COUNT} already restored and verified, 0 failed"),
    );

    // A file at an output path that is not the replica's state is never overwritten: it is a
    // failure, listed by path, and the rest still counts as restored.
    let changed = fleet.restored(&fleet.dbs[1]);
    let conn = rusqlite::Connection::open(&changed).unwrap();
    // Rollback-journal mode, so no `-wal` stays beside the file: `checkpoint.rs` loads
    // libmultidb into this process, and its hook keeps the WAL for an agent it believes alive.
    conn.execute_batch(
        "PRAGMA journal_mode=DELETE; INSERT INTO items(name) VALUES ('local change');",
    )
    .unwrap();
    drop(conn);
    let stranger = fleet.restored(&fleet.dbs[2]);
    fs::remove_file(&stranger).unwrap();
    fs::write(&stranger, b"not a database").unwrap();
    let third = fleet.multidb(&["restore", "--all", "--to", "out"], None);
    assert_eq!(third.code, 1, "{}\n{}", third.stdout, third.stderr);
    for db in [&fleet.dbs[1], &fleet.dbs[2]] {
        let line = format!(
            "  {}: exists and differs from the replica at TXID",
            db.display()
        );
        assert!(third.stdout.contains(&line), "{line}\n{}", third.stdout);
    }
    assert!(
        third.stdout.contains(&format!(
            "0 restored, {} already restored and verified, 2 failed",
            COUNT - 2
        )),
        "{}",
        third.stdout
    );
    assert!(
        third.stderr.contains("2 of 12 database(s) not restored"),
        "{}",
        third.stderr
    );
    assert!(rows(&changed).contains("local change"));
    assert_eq!(fs::read(&stranger).unwrap(), b"not a database");

    // A restore to a TXID: the databases written twice come back without their second row.
    let old = fleet.multidb(&["restore", "--all", "--to", "at1", "--txid", "1"], None);
    assert_eq!(old.code, 0, "{}\n{}", old.stdout, old.stderr);
    for (i, db) in fleet.dbs.iter().enumerate() {
        let at1 = fleet
            .dir
            .join("at1")
            .join(db.strip_prefix(fleet.dir.join("data")).unwrap());
        let restored = rows(&at1);
        assert!(!restored.contains("later"), "{restored}");
        if i % 2 == 1 {
            assert_eq!(restored, rows(db));
        }
    }
    let beyond = fleet.multidb(&["restore", "--all", "--to", "at3", "--txid", "3"], None);
    assert_eq!(beyond.code, 1, "{}", beyond.stdout);
    assert_eq!(
        beyond
            .stdout
            .matches("TXID 3 is not in the replica")
            .count(),
        COUNT,
        "{}",
        beyond.stdout
    );
}

#[test]
fn restore_all_in_place_restores_only_databases_missing_here() {
    let fleet = Fleet::new(FILE_TEMPLATE, "file", None);
    let gone = &fleet.dbs[3];
    let expected = rows(gone);
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", gone.display()));
    }
    // Only the -wal left: SQLite would replay it into a new file, so this one is left alone.
    let wal_only = &fleet.dbs[4];
    fs::remove_file(wal_only).unwrap();
    fs::write(format!("{}-wal", wal_only.display()), b"").unwrap();
    // A database changed here since it was replicated is the newer copy: kept as it is.
    let newer = &fleet.dbs[5];
    let conn = rusqlite::Connection::open(newer).unwrap();
    conn.execute("INSERT INTO items(name) VALUES ('newer here')", [])
        .unwrap();
    drop(conn);

    let out = fleet.multidb(&["restore", "--all"], None);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&format!(
            "1 restored, {} present on this host (left alone), 0 failed",
            COUNT - 1
        )),
        "{}",
        out.stdout
    );
    assert_eq!(rows(gone), expected);
    assert!(!wal_only.exists());
    assert!(rows(newer).contains("newer here"));
}

/// Discovery never follows a symbolic link below the pattern's root, and neither does a
/// restore: a tenant directory linked elsewhere, in place or under `--to`, or a link at an
/// output path, fails its databases by naming the link, and nothing is written through it.
#[test]
fn restore_all_does_not_follow_links_below_the_root() {
    let fleet = Fleet::new(FILE_TEMPLATE, "file", None);
    let tenants = fleet.dbs[0].parent().unwrap().to_path_buf();
    let linked: Vec<&PathBuf> = fleet
        .dbs
        .iter()
        .filter(|db| db.parent() == Some(tenants.as_path()))
        .collect();
    assert_eq!(linked.len(), 3);
    let failed_by_link = |out: &Run, link: &Path, dbs: &[&PathBuf]| {
        for db in dbs {
            let line = format!("  {}: {} is a symbolic link", db.display(), link.display());
            assert!(out.stdout.contains(&line), "{line}\n{}", out.stdout);
        }
    };

    // In place: the tenants directory is gone, a link to a directory outside in its stead.
    let outside = fleet.dir.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::remove_dir_all(&tenants).unwrap();
    std::os::unix::fs::symlink(&outside, &tenants).unwrap();
    let out = fleet.multidb(&["restore", "--all"], None);
    let summary = format!(
        "0 restored, {} present on this host (left alone), 3 failed",
        COUNT - 3
    );
    expect(&out, 1, &summary);
    failed_by_link(&out, &tenants, &linked);
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

    // Under --to: the same directory linked there, and a link at another output path to a
    // copy of its database, which a resume check reading through it would count as restored.
    let to_tenants = fleet.restored(linked[0]).parent().unwrap().to_path_buf();
    fs::create_dir_all(to_tenants.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&outside, &to_tenants).unwrap();
    let other = fleet
        .dbs
        .iter()
        .find(|db| db.parent() != Some(tenants.as_path()))
        .unwrap();
    let other_out = fleet.restored(other);
    fs::create_dir_all(other_out.parent().unwrap()).unwrap();
    let copy = fleet.dir.join("copy.db");
    fs::copy(other, &copy).unwrap();
    std::os::unix::fs::symlink(&copy, &other_out).unwrap();
    let out = fleet.multidb(&["restore", "--all", "--to", "out"], None);
    let summary = format!(
        "{} restored, 0 already restored and verified, 4 failed",
        COUNT - 4
    );
    expect(&out, 1, &summary);
    failed_by_link(&out, &to_tenants, &linked);
    failed_by_link(&out, &other_out, &[other]);
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    assert_eq!(fs::read_link(&other_out).unwrap(), copy);
}

#[test]
fn a_corrupt_file_or_a_misfiled_replica_is_listed_and_exits_1() {
    let fleet = Fleet::new(FILE_TEMPLATE, "file", None);
    // One replica's newest file has a flipped byte.
    let corrupt = &fleet.dbs[0];
    let location = fleet.location(corrupt, None);
    let mut files = Vec::new();
    collect_files(
        &PathBuf::from(location.strip_prefix("file://").unwrap()).join("ltx"),
        &mut files,
    );
    // Named `<min>-<max>.ltx`: the newest file reaches the highest TXID.
    let newest = files
        .into_iter()
        .max_by_key(|p| p.file_name().unwrap().to_str().unwrap()[17..].to_string())
        .unwrap();
    let mut bytes = fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&newest, bytes).unwrap();
    // Another replica's identity names a database other than the one its location reads as.
    let misfiled = &fleet.dbs[1];
    let location = fleet.location(misfiled, None);
    let identity = PathBuf::from(location.strip_prefix("file://").unwrap()).join("multidb.json");
    fs::write(&identity, b"{\"database\": \"/elsewhere/other.db\"}").unwrap();

    let out = fleet.multidb(&["restore", "--all", "--to", "out"], None);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&format!("{} restored", COUNT - 2)),
        "{}",
        out.stdout
    );
    let listed = |db: &Path, why: &str| {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("  {}: ", db.display())))
            .unwrap_or_else(|| panic!("{} not listed:\n{}", db.display(), out.stdout));
        assert!(line.contains(why), "{line}");
    };
    listed(corrupt, "is corrupt");
    listed(
        misfiled,
        "holds the history of /elsewhere/other.db, not of this database; not restored",
    );
    assert!(!fleet.restored(corrupt).exists());
    assert!(!fleet.restored(misfiled).exists());
    let leftovers: Vec<_> = fs::read_dir(fleet.restored(corrupt).parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".multidb-restore"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The catalogue shows the same problem, and the rest.
    let out = fleet.multidb(&["replicas", "--json"], None);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    let entry = list
        .iter()
        .find(|e| e["path"] == misfiled.display().to_string())
        .unwrap();
    assert!(
        entry["error"]
            .as_str()
            .unwrap()
            .contains("holds the history of /elsewhere/other.db"),
        "{entry}"
    );
}

#[test]
fn a_template_that_cannot_be_read_back_is_refused() {
    let fleet = Fleet::new(FILE_TEMPLATE, "file", None);
    let config = fleet.dir.join("multidb.yml");
    let text = fs::read_to_string(&config).unwrap();
    for (template, why) in [
        (
            "{{database}}/{{branch}}/{{tenant}}",
            "leaves out `{{project}}`",
        ),
        (
            "{{project}}{{database}}/{{branch}}/{{tenant}}",
            "`{{project}}` and `{{database}}` touch",
        ),
    ] {
        let changed = text.replace("{{project}}/{{database}}/{{branch}}/{{tenant}}", template);
        fs::write(&config, changed).unwrap();
        for args in [&["restore", "--all"][..], &["replicas"][..]] {
            let out = fleet.multidb(args, None);
            assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
            assert!(
                out.stderr.contains(&format!(
                    "template `{}/replica/{template}` cannot be read back into database paths",
                    fleet.dir.display()
                )),
                "{}",
                out.stderr
            );
            assert!(out.stderr.contains(why), "{}", out.stderr);
        }
    }
    assert!(!fleet.dir.join("out").exists());

    // A template that matches nothing restores nothing, and says so.
    fs::write(&config, text.replace("/replica/", "/elsewhere/")).unwrap();
    let out = fleet.multidb(&["restore", "--all", "--to", "out"], None);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "no replica found under {}/elsewhere",
            fleet.dir.display()
        )),
        "{}",
        out.stderr
    );
}

#[test]
fn replicas_lists_the_catalogue_and_what_is_missing() {
    let fleet = Fleet::new(FILE_TEMPLATE, "file", None);
    let out = fleet.multidb(&["replicas", "--json"], None);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list.len(), COUNT);
    for (i, db) in fleet.dbs.iter().enumerate() {
        let entry = list
            .iter()
            .find(|e| e["path"] == db.display().to_string())
            .unwrap_or_else(|| panic!("{} missing", db.display()));
        let written = if i % 2 == 0 { 2 } else { 1 };
        assert_eq!(entry["newest_txid"], written, "{entry}");
        assert_eq!(entry["files"], written, "{entry}");
        if written == 2 {
            let level0 = PathBuf::from(entry["location"].as_str().unwrap()).join("ltx/0");
            assert_eq!(fs::read_dir(&level0).unwrap().count(), 1, "{entry}");
        }
        assert_eq!(entry["identity"], true);
        assert!(entry["bytes"].as_u64().unwrap() > 0);
        assert!(entry["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(entry["error"], serde_json::Value::Null);
        let fields = &entry["fields"];
        let tenant = db.file_stem().unwrap().to_str().unwrap();
        assert_eq!(fields["tenant"], tenant);
        assert_eq!(
            format!("file://{}", entry["location"].as_str().unwrap()),
            fleet.location(db, None)
        );
    }
    let text = fleet.multidb(&["replicas"], None);
    assert_eq!(text.stdout.lines().count(), COUNT);
    assert!(text.stderr.contains(&format!("{COUNT} replica(s) under")));

    // One database gone here, one new here that was never replicated.
    fs::remove_file(&fleet.dbs[0]).unwrap();
    let new = fleet.dbs[1].with_file_name("newcomer.db");
    rusqlite::Connection::open(&new)
        .unwrap()
        .execute_batch("CREATE TABLE t(x)")
        .unwrap();
    let out = fleet.multidb(&["replicas", "--missing", "--json"], None);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let missing: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let absent: Vec<&str> = missing["replicated_absent_here"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(absent, [fleet.dbs[0].display().to_string()]);
    assert_eq!(
        missing["present_never_replicated"],
        serde_json::json!([new.display().to_string()])
    );
    let out = fleet.multidb(&["replicas", "--missing"], None);
    assert!(
        out.stdout
            .contains(&format!("never replicated\t{}", new.display())),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains(&format!("absent here\t{}\t", fleet.dbs[0].display())),
        "{}",
        out.stdout
    );
}

#[test]
fn s3_fleet_is_found_with_few_listings_and_restored() {
    let server = S3Server::start();
    let fleet = Fleet::new(
        "fleet/{{project}}/{{database}}/{{branch}}/{{tenant}}",
        "s3",
        Some(&server),
    );
    // Something else in the bucket, beside and below the fleet, is not a replica.
    server.put_raw("fleet/notes.txt", "x");
    server.put_raw("other/project1/userdb/main/acme/0000/x.ltx", "x");
    let before = server.requests().len();
    let out = fleet.multidb(&["restore", "--all", "--to", "out"], Some(&server));
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&format!("{COUNT} restored")),
        "{}",
        out.stdout
    );
    for db in &fleet.dbs {
        assert_eq!(rows(&fleet.restored(db)), rows(db));
    }
    // One listing for the whole fleet: no database was listed on its own.
    let lists: Vec<String> = server.requests()[before..]
        .iter()
        .filter(|r| r.contains("list-type=2"))
        .cloned()
        .collect();
    assert_eq!(lists.len(), 1, "{lists:#?}");
    assert!(lists[0].contains("prefix=fleet"), "{lists:#?}");

    let again = fleet.multidb(&["restore", "--all", "--to", "out"], Some(&server));
    assert_eq!(again.code, 0, "{}", again.stdout);
    assert!(
        again
            .stdout
            .contains(&format!("{COUNT} already restored and verified")),
        "{}",
        again.stdout
    );

    let out = fleet.multidb(&["replicas", "--json"], Some(&server));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list.len(), COUNT, "{}", out.stdout);
    assert!(list
        .iter()
        .all(|e| e["identity"] == true && e["error"].is_null()));
}
