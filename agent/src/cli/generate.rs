//! Synthetic trees in the seed's layout, `ROOT/<project>/databases/<db>/branches/<branch>/tenants/<tenant>.db`,
//! for the demo, the tests and the benchmarks.
//!
//! Names follow the seed (`project1`, `userdb`, `main`, `acme`). With at most three tenants per
//! branch they are the seed's own (`acme`, `globex`, `initech`, repeated in every branch); with
//! more, every tenant name is unique across the tree (`acme17`, `globex18`, ...), the worst case
//! for interning and the case the memory figures are measured on.

use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const DATABASE_NAMES: [&str; 4] = ["userdb", "orderdb", "billingdb", "authdb"];
const BRANCH_NAMES: [&str; 4] = ["main", "feature", "staging", "dev"];
const TENANT_NAMES: [&str; 3] = ["acme", "globex", "initech"];

/// How many of each level to create.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub projects: usize,
    pub databases: usize,
    pub branches: usize,
    pub tenants: usize,
}

impl Layout {
    /// The seed's demo tree: 2 projects × 2 databases × 2 branches × 3 tenants = 24.
    pub const SEED: Layout = Layout {
        projects: 2,
        databases: 2,
        branches: 2,
        tenants: 3,
    };

    pub fn total(&self) -> Option<usize> {
        self.projects
            .checked_mul(self.databases)?
            .checked_mul(self.branches)?
            .checked_mul(self.tenants)
    }
}

/// What [`generate`] did.
#[derive(Debug, Clone, Copy)]
pub struct GenerateStats {
    /// Databases created by this run (existing files are left alone).
    pub created: usize,
    pub elapsed: Duration,
}

/// The discovery pattern that matches a generated tree.
pub fn pattern_for(root: &Path) -> String {
    format!("{}/*/databases/*/branches/*/tenants/*.db", root.display())
}

fn level_name(names: &[&str], prefix: &str, i: usize) -> String {
    match names.get(i) {
        Some(name) => (*name).to_string(),
        None => format!("{prefix}{}", i + 1),
    }
}

/// The leaf directory of (project, database, branch).
fn leaf_dir(root: &Path, p: usize, d: usize, b: usize) -> PathBuf {
    root.join(format!("project{}", p + 1))
        .join("databases")
        .join(level_name(&DATABASE_NAMES, "db", d))
        .join("branches")
        .join(level_name(&BRANCH_NAMES, "branch", b))
        .join("tenants")
}

fn tenant_name(layout: &Layout, global: usize, t: usize) -> String {
    let base = TENANT_NAMES[t % TENANT_NAMES.len()];
    if layout.tenants <= TENANT_NAMES.len() {
        base.to_string()
    } else {
        format!("{base}{global}")
    }
}

/// Creates the tree; with `sqlite`, each file is a WAL-mode database with a small table.
pub fn generate(root: &Path, layout: &Layout, sqlite: bool) -> io::Result<GenerateStats> {
    let started = Instant::now();
    let total = layout.total().filter(|&n| n > 0).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "every count must be at least 1",
        )
    })?;
    let leaves: Vec<(usize, usize, usize)> = (0..layout.projects)
        .flat_map(|p| {
            (0..layout.databases).flat_map(move |d| (0..layout.branches).map(move |b| (p, d, b)))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let created = AtomicUsize::new(0);
    let show_progress = io::stderr().is_terminal() && total >= 10_000;
    let work = || -> io::Result<()> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(p, d, b)) = leaves.get(i) else {
                return Ok(());
            };
            let dir = leaf_dir(root, p, d, b);
            std::fs::create_dir_all(&dir)?;
            for t in 0..layout.tenants {
                let path = dir.join(format!(
                    "{}.db",
                    tenant_name(layout, i * layout.tenants + t, t)
                ));
                if create_database(&path, sqlite)? {
                    created.fetch_add(1, Ordering::Relaxed);
                }
            }
            if show_progress && i % (leaves.len() / 20).max(1) == 0 {
                eprint!("\rgenerating: {:3}%", i * 100 / leaves.len());
            }
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
        let mut result = work();
        for helper in helpers {
            let r = helper
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("generator thread panicked")));
            result = result.and(r);
        }
        result
    })?;
    if show_progress {
        eprintln!("\rgenerating: 100%");
    }
    Ok(GenerateStats {
        created: created.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
}

/// Creates one database unless it exists; returns whether it was created.
fn create_database(path: &Path, sqlite: bool) -> io::Result<bool> {
    if !sqlite {
        return match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        };
    }
    if path.exists() {
        return Ok(false);
    }
    let tenant = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("tenant");
    let conn = rusqlite::Connection::open(path)
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP);",
    )
    .and_then(|()| conn.execute("INSERT INTO items(name) VALUES (?1), (?2)", [format!("{tenant} first"), format!("{tenant} second")]))
    .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_layout_has_the_seed_names() {
        let tmp = tempfile::tempdir().unwrap();
        let stats = generate(tmp.path(), &Layout::SEED, false).unwrap();
        assert_eq!(stats.created, 24);
        assert!(tmp
            .path()
            .join("project1/databases/userdb/branches/main/tenants/acme.db")
            .is_file());
        assert!(tmp
            .path()
            .join("project2/databases/orderdb/branches/feature/tenants/initech.db")
            .is_file());
        assert_eq!(
            generate(tmp.path(), &Layout::SEED, false).unwrap().created,
            0,
            "idempotent"
        );
    }

    #[test]
    fn many_tenants_get_unique_names() {
        let layout = Layout {
            projects: 1,
            databases: 1,
            branches: 2,
            tenants: 4,
        };
        let names: Vec<String> = (0..8).map(|g| tenant_name(&layout, g, g % 4)).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 8, "{names:?}");
    }
}
