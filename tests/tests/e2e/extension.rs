//! libmultidb loaded into the real `sqlite3` shell.

use multidb_tests::sqlite3_with_extension;

/// Every SQL function the extension adds, from the table that registers them; each has a
/// test below (`every_function_has_a_test` checks this file names each one in a test).
fn functions() -> Vec<&'static str> {
    multidb::SQL_FUNCTIONS.iter().map(|f| f.name).collect()
}

#[test]
fn every_function_has_a_test() {
    let source = include_str!("extension.rs");
    for name in functions() {
        assert!(
            source.contains(&format!("fn {name}_")),
            "no test named {name}_… in extension.rs"
        );
    }
}

#[test]
fn shell_loads_the_extension_and_sees_exactly_its_functions() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("t.db");
    let out = sqlite3_with_extension(
        &db,
        "SELECT DISTINCT name FROM pragma_function_list WHERE name LIKE 'multidb%' ORDER BY name;",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let names: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(names, functions());
}

#[test]
fn multidb_version_reports_the_build() {
    let tmp = tempfile::tempdir().unwrap();
    let out = sqlite3_with_extension(&tmp.path().join("t.db"), "SELECT multidb_version();");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.trim(), format!("v{}", env!("CARGO_PKG_VERSION")));
    let out = sqlite3_with_extension(&tmp.path().join("t.db"), "SELECT multidb_version(1);");
    assert_ne!(out.code, 0, "a wrong argument count is an SQL error");
}

#[test]
fn multidb_autocheckpoint_checks_its_argument() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("t.db");
    let out = sqlite3_with_extension(&db, "SELECT multidb_autocheckpoint(0);");
    assert_eq!((out.code, out.stdout.trim()), (0, "0"), "{}", out.stderr);
    for bad in ["'x'", "-1", "1.5", "NULL", "4294967296"] {
        let out = sqlite3_with_extension(&db, &format!("SELECT multidb_autocheckpoint({bad});"));
        assert_ne!(out.code, 0, "{bad}");
        assert!(
            out.stderr.contains("multidb_autocheckpoint: 1st argument (frames) must be an integer from 0 to 2147483647"),
            "{bad}: {}",
            out.stderr
        );
    }
}

#[test]
fn multidb_status_reports_the_database_path() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("t.db");
    let out = sqlite3_with_extension(&db, "SELECT multidb_status();");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["database"]["path"], db.display().to_string());
    let out = sqlite3_with_extension(&db, "SELECT multidb_status(1);");
    assert_ne!(out.code, 0, "a wrong argument count is an SQL error");
}

/// Every script in `sql/` prints exactly what its `-- =>` comments say.
#[test]
fn sql_scripts_print_their_documented_output() {
    let dir = multidb_tests::workspace().join("sql");
    multidb_tests::extension(); // builds the library the scripts load
    let mut scripts: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    scripts.retain(|p| p.extension().is_some_and(|e| e == "sql"));
    assert!(!scripts.is_empty());
    for script in scripts {
        let text = std::fs::read_to_string(&script).unwrap();
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("-- => "))
            .collect();
        let out = multidb_tests::run(
            std::process::Command::new("sqlite3")
                .arg("-bail")
                .arg(":memory:")
                .current_dir(multidb_tests::workspace())
                .env("MULTIDB_RING", "/nonexistent/multidb.ring")
                .stdin(std::fs::File::open(&script).unwrap()),
        );
        assert_eq!(out.code, 0, "{}: {}", script.display(), out.stderr);
        let got: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(got, expected, "{}", script.display());
    }
}

#[test]
fn multidb_wait_checks_its_argument_and_times_out_without_an_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("t.db");
    for bad in ["'soon'", "-1", "3600001", "1.5", "NULL"] {
        let out = sqlite3_with_extension(&db, &format!("SELECT multidb_wait({bad});"));
        assert_ne!(out.code, 0, "multidb_wait({bad}) must fail");
        assert!(
            out.stderr
                .contains("multidb_wait: 1st argument (timeout_ms) must be an integer"),
            "{}",
            out.stderr
        );
    }
    // No agent: nothing can be acknowledged, committed or not.
    let out = sqlite3_with_extension(&db, "SELECT multidb_wait(0);");
    assert_eq!(out.stdout.trim(), "0", "{}", out.stderr);
    // A commit and no agent: 0 at once, not after the (long) timeout: waiting cannot help.
    let started = std::time::Instant::now();
    let out = sqlite3_with_extension(
        &db,
        "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1); SELECT multidb_wait(60000);",
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.lines().last(), Some("0"));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "multidb_wait without an agent waited for its timeout"
    );
}
