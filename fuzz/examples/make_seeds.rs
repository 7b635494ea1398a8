//! Writes the seed corpora in `fuzz/seeds/<target>/` from the repository's own examples: the
//! configurations of the README, `multidb.example.yml` and the tests; the patterns and
//! templates of the tests; LTX files written by the encoder (snapshots, incremental files,
//! a NoChecksum file, a deletion, legacy LZ4-frame pages); replica directories holding
//! chains of those files; rings that producers pushed commits and registrations into.
//!
//! Run from the repository root after changing a format:
//! `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`
//! The seeds are committed; each file is named after what it holds.

use std::path::Path;

use multidb::ring::{self, Commit, Consumer, Ring};
use multidb_agent::ltx::{
    checksum_page, toggle_page_checksum, Encoder, Header, EMPTY_DATABASE_CHECKSUM,
    HEADER_FLAG_NO_CHECKSUM,
};
use multidb_fuzz::{Header as RingHeader, RingInput, STATUS_ENTRIES};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&dir).expect("seed directory");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

fn main() {
    config_seeds();
    pattern_seeds();
    let files = ltx_seeds();
    restore_seeds(&files);
    ring_seeds();
}

fn config_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = std::fs::read_to_string(root.join("multidb.example.yml")).expect("example");
    write("config_yaml", "example_file.yml", example.as_bytes());
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    for (i, block) in readme.split("```yaml\n").skip(1).enumerate() {
        let block = block.split("```").next().unwrap_or_default();
        write("config_yaml", &format!("readme_{i}.yml"), block.as_bytes());
    }
    let base = "multi_db:\n  discovery_pattern: \"/data/*/x/*.db\"\n";
    let cases = [
        ("agent_keys", "multi_db:\n  discovery_pattern: \"/d/*.db\"\n  sync_interval: 200ms\n  idle_timeout: 5s\n  retention: 1h\n  snapshot_interval: 1h30m\n  state_dir: st\n  addr: \":9464\"\n"),
        ("file_replica", "multi_db:\n  discovery_pattern: \"/srv/*/databases/*/branches/*/tenants/*.db\"\n  max_active: 10\n  scan_interval: 30s\n  replica_template:\n    type: file\n    path: \"/backups/{{project}}/{{database}}/{{branch}}/{{tenant}}\"\n"),
        ("s3_endpoint", "multi_db:\n  discovery_pattern: \"/srv/*/databases/*/branches/*/tenants/*.db\"\n  scan_interval: 10s\n  state_dir: \"/var/lib/multidb\"\n  replica_template:\n    type: s3\n    bucket: backups\n    region: eu-west-1\n    endpoint: \"http://127.0.0.1:9000\"\n    force_path_style: true\n    path: \"idle/{{project}}/{{database}}/{{branch}}/{{tenant}}\"\n"),
        ("named_captures", "multi_db:\n  discovery_pattern: \"/srv/{tenant}/db_{shard}.sqlite\"\n  replica_template:\n    path: \"/r/{{tenant}}/{{shard}}\"\n"),
        ("flow_style", "{multi_db: {discovery_pattern: \"/d/*/*.db\", max_active: 5, replica_template: {path: \"/r/{{1}}/{{2}}\"}}}\n"),
        ("anchors", "multi_db: &m\n  discovery_pattern: &p \"/d/*.db\"\n  state_dir: *p\n"),
        ("pattern_override", "#pattern: /other/{a}/*.db\nmulti_db:\n  discovery_pattern: \"/d/*.db\"\n  replica_template:\n    path: \"/r/{{a}}/{{1}}\"\n"),
        ("unknown_key", "multi_db:\n  discovery_pattern: \"/data/*/x/*.db\"\n  max_actve: 3\n"),
        ("recursive_pattern", "multi_db:\n  discovery_pattern: \"/data/**/x.db\"\n"),
        ("nested", "multi_db:\n  discovery_pattern: [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]\n"),
    ];
    for (name, text) in cases {
        write("config_yaml", &format!("{name}.yml"), text.as_bytes());
    }
    let bad_values = [
        ("max_active_zero", "  max_active: 0\n"),
        ("scan_interval_unitless", "  scan_interval: 30\n"),
        ("addr_bad", "  addr: everywhere\n"),
        ("replica_ftp", "  replica_template:\n    type: ftp\n    path: /x\n"),
        ("s3_no_bucket", "  replica_template:\n    type: s3\n    path: \"{{1}}\"\n"),
        ("file_relative", "  replica_template:\n    path: \"backups/{{1}}\"\n"),
        ("unknown_name", "  replica_template:\n    type: s3\n    path: \"{{project}}/{{tenant}}\"\n    bucket: b\n"),
    ];
    for (name, extra) in bad_values {
        write(
            "config_yaml",
            &format!("{name}.yml"),
            format!("{base}{extra}").as_bytes(),
        );
    }
}

fn pattern_seeds() {
    let seed = "/data/*/databases/*/branches/*/tenants/*.db";
    let four = "{{project}}/{{database}}/{{branch}}/{{tenant}}";
    let cases = [
        (
            "seed_s3",
            seed,
            four.to_string(),
            "/data/p1/databases/db/branches/main/tenants/acme.db",
            vec![],
        ),
        (
            "seed_file",
            seed,
            format!("/r/{four}"),
            "/data/project1/databases/userdb/branches/main/tenants/acme.db",
            vec!["x", "y.z"],
        ),
        (
            "dots",
            seed,
            format!("/r/.{{{{tenant}}}}/{four}"),
            "/data/p1/databases/db/branches/main/tenants/..db",
            vec![".", ".."],
        ),
        (
            "named",
            "/srv/{tenant}/db_{shard}.sqlite",
            "/r/{{tenant}}/s{{shard}}".into(),
            "/srv/acme/db_7.sqlite",
            vec!["a_b"],
        ),
        (
            "numbered",
            "/srv/*/*.db",
            "/b/{{1}}-{{2}}".into(),
            "/srv/a/b.db",
            vec![],
        ),
        (
            "relative",
            "data/{org}/*.db",
            "{{org}}/{{1}}".into(),
            "./data/a/b.db",
            vec![],
        ),
        (
            "split",
            "/r/db_{x}_{y}.s",
            "/b/{{x}}/{{y}}".into(),
            "/r/db_x_y_z.s",
            vec!["ctl\u{1}"],
        ),
        ("bad_glob", "/data/[ab].db", "".into(), "", vec![]),
        (
            "unclosed",
            "/data/{a.db",
            "/b/{{a".into(),
            "/data/x.db",
            vec![],
        ),
    ];
    for (name, pattern, template, path, values) in cases {
        let mut text = format!("{pattern}\n{template}\n{path}");
        for v in values {
            text.push('\n');
            text.push_str(v);
        }
        write("pattern_template", &format!("{name}.txt"), text.as_bytes());
    }
}

fn header(page_size: u32, commit: u32, min_txid: u64, max_txid: u64) -> Header {
    Header {
        page_size,
        commit,
        min_txid,
        max_txid,
        timestamp_ms: 1_700_000_000_000,
        ..Header::default()
    }
}

fn page(page_size: u32, pgno: u32, kind: u8) -> Vec<u8> {
    (0..page_size)
        .map(|i| match kind {
            0 => pgno as u8,
            1 => (i / (pgno + 1)) as u8,
            _ => (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ pgno as u8,
        })
        .collect()
}

/// A database as a chain of LTX files leaves it, so each file carries true checksums.
#[derive(Default)]
struct Database {
    pages: std::collections::BTreeMap<u32, Vec<u8>>,
}

impl Database {
    fn checksum(&self) -> u64 {
        self.pages
            .iter()
            .fold(EMPTY_DATABASE_CHECKSUM, |c, (pgno, page)| {
                toggle_page_checksum(c, checksum_page(*pgno, page))
            })
    }

    /// The file taking this database to `header.commit` pages with `pgnos` rewritten.
    fn file(&mut self, header: Header, pgnos: &[u32], kind: u8) -> Vec<u8> {
        let tracks = header.flags & HEADER_FLAG_NO_CHECKSUM == 0;
        let header = Header {
            pre_apply_checksum: if header.min_txid > 1 && tracks {
                self.checksum()
            } else {
                0
            },
            ..header
        };
        let mut encoder = Encoder::new(Vec::new(), header).expect("valid header");
        for &pgno in pgnos {
            let page = page(header.page_size, pgno, kind);
            encoder.write_page(pgno, &page).expect("valid page");
            self.pages.insert(pgno, page);
        }
        self.pages.retain(|pgno, _| *pgno <= header.commit);
        let post = tracks.then(|| self.checksum());
        encoder.finish(post).expect("valid file").0
    }
}

/// The pages of a real SQLite database (page size 512) after `statements`.
fn sqlite_pages(conn: &rusqlite::Connection, path: &Path, statements: &str) -> Vec<Vec<u8>> {
    conn.execute_batch(statements).expect("SQL");
    let bytes = std::fs::read(path).expect("database file");
    bytes.chunks(512).map(<[u8]>::to_vec).collect()
}

/// Named LTX files, the first four of which chain over a real database: snapshot 1-1, then
/// 2-2 and 3-3 changing pages, and a level-1 2-3 covering both.
fn ltx_seeds() -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().expect("scratch");
    let path = dir.path().join("seed.db");
    let conn = rusqlite::Connection::open(&path).expect("database");
    let states = [
        "PRAGMA page_size = 512; CREATE TABLE t (x); INSERT INTO t VALUES ('one');",
        "INSERT INTO t VALUES (randomblob(600));",
        "CREATE INDEX i ON t (x); INSERT INTO t VALUES ('three');",
    ]
    .map(|sql| sqlite_pages(&conn, &path, sql));
    let changed = |before: &[Vec<u8>], after: &[Vec<u8>]| -> Vec<u32> {
        (0..after.len())
            .filter(|&i| before.get(i) != after.get(i))
            .map(|i| i as u32 + 1)
            .collect()
    };
    let mut db = Database::default();
    let file = |db: &mut Database, min: u64, max: u64, state: &[Vec<u8>], pgnos: &[u32]| {
        let h = Header {
            pre_apply_checksum: if min > 1 { db.checksum() } else { 0 },
            ..header(512, state.len() as u32, min, max)
        };
        let mut encoder = Encoder::new(Vec::new(), h).expect("valid header");
        for &pgno in pgnos {
            let page = &state[pgno as usize - 1];
            encoder.write_page(pgno, page).expect("valid page");
            db.pages.insert(pgno, page.clone());
        }
        db.pages.retain(|pgno, _| *pgno <= h.commit);
        encoder.finish(Some(db.checksum())).expect("valid file").0
    };
    let all: Vec<u32> = (1..=states[0].len() as u32).collect();
    let snapshot = file(&mut db, 1, 1, &states[0], &all);
    let mut at_1 = Database {
        pages: db.pages.clone(),
    };
    let second = file(&mut db, 2, 2, &states[1], &changed(&states[0], &states[1]));
    let third = file(&mut db, 3, 3, &states[2], &changed(&states[1], &states[2]));
    let compacted = file(
        &mut at_1,
        2,
        3,
        &states[2],
        &changed(&states[0], &states[2]),
    );
    let files = vec![
        ("snapshot_sqlite_512", snapshot),
        ("incremental_2", second),
        ("incremental_3", third),
        ("compacted_2_3", compacted),
        (
            "snapshot_4096_random",
            Database::default().file(header(4096, 2, 1, 5), &[1, 2], 2),
        ),
        (
            "no_checksum",
            Database::default().file(
                Header {
                    flags: HEADER_FLAG_NO_CHECKSUM,
                    ..header(1024, 2, 4, 4)
                },
                &[2],
                1,
            ),
        ),
        (
            "deletion",
            Database::default().file(header(512, 0, 6, 6), &[], 0),
        ),
        ("legacy_frame", legacy_frame_file()),
    ];
    let files: Vec<(String, Vec<u8>)> =
        files.into_iter().map(|(n, b)| (n.to_string(), b)).collect();
    for (name, bytes) in &files {
        write("ltx_decode", &format!("{name}.ltx"), bytes);
    }
    files
}

/// A snapshot of one page stored as ltx v0.5.0 wrote it: no size flag, an LZ4 frame with one
/// uncompressed block.
fn legacy_frame_file() -> Vec<u8> {
    let good = Database::default().file(header(512, 1, 1, 1), &[1], 0);
    let content = page(512, 1, 0);
    let mut frame = Vec::new();
    frame.extend_from_slice(&1u32.to_be_bytes());
    frame.extend_from_slice(&0u16.to_be_bytes());
    frame.extend_from_slice(&0x184D_2204u32.to_le_bytes());
    frame.extend_from_slice(&[0x60, 0x40, 0x82]);
    frame.extend_from_slice(&(512u32 | 0x8000_0000).to_le_bytes());
    frame.extend_from_slice(&content);
    frame.extend_from_slice(&0u32.to_le_bytes());
    // Header, the legacy frame, then the good file's end (its index no longer matches: the
    // fuzzer starts from a near miss of the legacy path).
    let tail_start = good.len() - 16 - 8 - 8;
    [&good[..100], &frame[..], &[0u8; 6], &good[tail_start..]].concat()
}

/// Replica directories in the restore target's input layout.
fn restore_seeds(files: &[(String, Vec<u8>)]) {
    let get = |name: &str| {
        files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.clone())
            .expect("seed file")
    };
    let entry = |level: u8, min: u8, max: u8, mtime: u8, bytes: &[u8]| {
        let level_index = [9u8, 3, 2, 1, 0]
            .iter()
            .position(|l| *l == level)
            .unwrap_or(4) as u8;
        let len = u16::try_from(bytes.len()).expect("small file");
        [
            &[level_index, 0, min, max, mtime][..],
            &len.to_le_bytes(),
            bytes,
        ]
        .concat()
    };
    let snapshot = get("snapshot_sqlite_512");
    let chain = [
        entry(0, 1, 1, 10, &snapshot),
        entry(0, 2, 2, 20, &get("incremental_2")),
        entry(0, 3, 3, 30, &get("incremental_3")),
    ]
    .concat();
    write(
        "restore_dir",
        "chain_latest.bin",
        &[&[0u8][..], &chain].concat(),
    );
    write(
        "restore_dir",
        "chain_txid_2.bin",
        &[&[1u8 + 3 * 2][..], &chain].concat(),
    );
    write(
        "restore_dir",
        "chain_time_25.bin",
        &[&[2u8 + 3 * 25][..], &chain].concat(),
    );
    let compacted = [
        entry(9, 1, 1, 10, &snapshot),
        entry(1, 2, 3, 30, &get("compacted_2_3")),
        entry(0, 2, 2, 20, &get("incremental_2")),
    ]
    .concat();
    write(
        "restore_dir",
        "snapshot_and_level_1.bin",
        &[&[0u8][..], &compacted].concat(),
    );
    let junk_name = [&[4u8, 9][..], b"junk.txt", &[0, 3, 0], b"abc"].concat();
    write(
        "restore_dir",
        "junk_name.bin",
        &[&[0u8][..], &entry(0, 1, 1, 1, &snapshot), &junk_name].concat(),
    );
    write(
        "restore_dir",
        "gap.bin",
        &[
            &[0u8][..],
            &entry(0, 1, 1, 1, &snapshot),
            &entry(0, 3, 3, 3, &get("incremental_3")),
        ]
        .concat(),
    );
}

/// Rings after producers posted: commits, registrations of several lengths (several slots,
/// wrapping the ring's end), some already consumed.
fn ring_seeds() {
    let cases: [(&str, u32, usize, &[usize]); 5] = [
        ("commits_4_slots", 4, 0, &[0, 0, 0]),
        ("registration_3_slots", 8, 0, &[100]),
        ("registration_wraps", 16, 5, &[0, 200, 0]),
        ("mixed_half_consumed", 32, 3, &[0, 60, 0, 300, 0, 0]),
        ("long_path", 256, 0, &[4096]),
    ];
    for (name, slots, consumed, pushes) in cases {
        let len = ring::file_size(slots, STATUS_ENTRIES);
        let mut memory = vec![0u64; len / 8];
        // SAFETY: `memory` is 8-aligned, `len` bytes, and outlives `ring`.
        let ring = unsafe { Ring::init(memory.as_mut_ptr().cast(), len, slots, STATUS_ENTRIES, 1) }
            .expect("geometry");
        let mut consumer = Consumer::default();
        // Move both positions on first, so the records sit at an offset into the slots.
        for i in 0..consumed {
            ring.push_commit(&Commit {
                ino: i as u64,
                ..Commit::default()
            });
            ring.pop(&mut consumer, 0);
        }
        for (i, &path_len) in pushes.iter().enumerate() {
            if path_len == 0 {
                ring.push_commit(&Commit {
                    dev: 1,
                    ino: i as u64,
                    path_hash: 3,
                    frames: 10 * i as u64,
                    pid: 42,
                    time_ns: 99,
                });
            } else {
                let path: Vec<u8> = (0..path_len).map(|j| b'a' + (j % 26) as u8).collect();
                ring.push_registration(1, i as u64, 42, &path);
            }
        }
        let stats = ring.stats();
        let bytes: Vec<u8> = memory.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let positions = RingInput {
            slots,
            header: RingHeader::Positions {
                head: stats.head,
                tail: stats.tail,
            },
            path: b"/data/p/databases/d/branches/main/tenants/t.db",
            body: &bytes[ring::HEADER_SIZE..],
        };
        write("ring_records", &format!("{name}.bin"), &positions.encode());
        let raw = RingInput {
            header: RingHeader::Raw(&bytes[..multidb_fuzz::HEADER_BYTES]),
            ..positions
        };
        write("ring_records", &format!("{name}_opened.bin"), &raw.encode());
    }
}
