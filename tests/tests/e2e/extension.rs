//! libmultidb loaded into the real `sqlite3` shell.

use multidb_tests::sqlite3_with_extension;

/// Every SQL function the extension adds; each has a test below.
const FUNCTIONS: &[&str] = &["multidb_version"];

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
    assert_eq!(names, FUNCTIONS);
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
                .stdin(std::fs::File::open(&script).unwrap()),
        );
        assert_eq!(out.code, 0, "{}: {}", script.display(), out.stderr);
        let got: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(got, expected, "{}", script.display());
    }
}
