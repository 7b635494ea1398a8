//! Helpers for the end-to-end tests: the real `multidb` binary, the real `libmultidb` and the
//! real `sqlite3` shell, each test in its own temporary directory.

pub mod faultproxy;
pub mod s3server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Builds the binary and the extension once per test process (release: the scale tests need it).
fn built() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "multidb-agent",
                "-p",
                "multidb-ext",
            ])
            .current_dir(workspace())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build of multidb failed");
        target_dir().join("release")
    })
}

/// The `multidb` binary.
pub fn multidb_bin() -> PathBuf {
    built().join("multidb")
}

/// The extension, as `.load` takes it (without the `.so` suffix).
pub fn extension() -> PathBuf {
    built().join("libmultidb")
}

/// A `multidb` command run in `dir`, with logs at warn so stderr holds only what matters.
pub fn multidb(dir: &Path) -> Command {
    let mut command = Command::new(multidb_bin());
    command.current_dir(dir).env("MULTIDB_LOG", "warn");
    command
}

/// Runs a command and returns its output, with stdout/stderr as text for assertions.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(command: &mut Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("spawning command");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Runs SQL in the real `sqlite3` shell with the extension loaded and no ring (so a
/// multidb agent running on this machine cannot change what the test sees).
pub fn sqlite3_with_extension(db: &Path, sql: &str) -> Run {
    let load = format!(".load {}", extension().display());
    run(Command::new("sqlite3")
        .env("MULTIDB_RING", "/nonexistent/multidb.ring")
        .arg("-bail")
        .arg(db)
        .arg(load)
        .arg(sql))
}
