//! Discovery at scale: 10,000 and 100,000 databases, and the arena's memory per database.

use multidb_agent::cli::generate::{self, Layout};
use multidb_agent::discover::arena::Arena;
use multidb_agent::discover::discovery;
use multidb_agent::discover::pattern::Pattern;
use multidb_tests::{multidb, run};

/// A generous bound on arena bytes per cold database with unique tenant names (the goal is
/// 64 B; the benchmark prints the real figure). Catches a per-database allocation sneaking in.
const ARENA_BYTES_PER_DB_BOUND: f64 = 96.0;

fn tree(layout: Layout) -> (tempfile::TempDir, Pattern) {
    let tmp = tempfile::tempdir().unwrap();
    generate::generate(tmp.path(), &layout, false).unwrap();
    let pattern = Pattern::new(&generate::pattern_for(tmp.path())).unwrap();
    (tmp, pattern)
}

#[test]
fn large_scale_discovery_of_10000() {
    let (_tmp, pattern) = tree(Layout {
        projects: 10,
        databases: 10,
        branches: 10,
        tenants: 10,
    });
    let mut arena = Arena::new(pattern.root());
    let report = discovery::scan(&pattern, &mut arena).unwrap();
    assert_eq!(report.diff.added.len(), 10_000);
    assert!(report.unreadable.is_empty());
    for id in arena.ids() {
        let path = arena.path(id);
        assert_eq!(arena.lookup_path(&path), Some(id));
        let fields = pattern.parse(&path).unwrap();
        assert_eq!(fields.0.len(), 4);
        let (dev, ino) = arena.inode(id);
        assert_eq!(arena.lookup_inode(dev, ino), Some(id));
    }
    let again = discovery::scan(&pattern, &mut arena).unwrap();
    assert_eq!(
        again.diff,
        Default::default(),
        "an unchanged tree rescans to an empty diff"
    );
}

#[test]
fn memory_profile_stays_under_bound() {
    let (_tmp, pattern) = tree(Layout {
        projects: 4,
        databases: 5,
        branches: 5,
        tenants: 100,
    });
    let mut arena = Arena::new(pattern.root());
    discovery::scan(&pattern, &mut arena).unwrap();
    assert_eq!(arena.len(), 10_000);
    let per_db = arena.heap_bytes() as f64 / arena.len() as f64;
    assert!(
        per_db < ARENA_BYTES_PER_DB_BOUND,
        "{per_db:.1} B per database"
    );
}

#[test]
fn scale_to_hundred_thousand() {
    let (tmp, pattern) = tree(Layout {
        projects: 10,
        databases: 10,
        branches: 10,
        tenants: 100,
    });
    let out =
        run(multidb(tmp.path()).args(["databases", "--count", "--pattern", pattern.as_str()]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "100000\n");
    assert!(
        out.stderr.contains("100000 databases discovered"),
        "{}",
        out.stderr
    );
}
