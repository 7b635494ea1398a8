//! A test writer: commits small transactions to random databases from a list, for a while,
//! as an application would. With `--ext` it loads libmultidb (into its first connection; the
//! extension's auto-extension hooks every later one). With `--per-txn` it opens a new
//! connection for every transaction and closes it after the commit, like a request handler.
//!
//! Usage: multidb-writer --list FILE --seconds S --seed N [--ext PATH] [--per-txn] [--rate R]
//! Prints `committed N` at the end.
//!
//! Or: multidb-writer --wait DB --ext PATH: for each stdin line `K TIMEOUT_MS`, inserts K into
//! table `waits` of DB, runs `SELECT multidb_wait(TIMEOUT_MS)` and prints its result, so a test
//! can look at the replica between a commit and the next.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// Connections a long-lived writer keeps open at once (an LRU), so a thousand databases do
/// not exhaust its descriptors.
const OPEN_CONNECTIONS: usize = 16;

struct Args {
    list: PathBuf,
    seconds: f64,
    seed: u64,
    ext: Option<PathBuf>,
    per_txn: bool,
    /// Transactions per second (0: as fast as possible).
    rate: f64,
    wait: Option<PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args {
        list: PathBuf::new(),
        seconds: 5.0,
        seed: 1,
        ext: None,
        per_txn: false,
        rate: 0.0,
        wait: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--list" => args.list = PathBuf::from(value()),
            "--seconds" => args.seconds = value().parse().expect("--seconds"),
            "--seed" => args.seed = value().parse().expect("--seed"),
            "--ext" => args.ext = Some(PathBuf::from(value())),
            "--rate" => args.rate = value().parse().expect("--rate"),
            "--per-txn" => args.per_txn = true,
            "--wait" => args.wait = Some(PathBuf::from(value())),
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// xorshift64*: deterministic per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn open(path: &Path, ext: Option<&Path>, loaded: &mut bool) -> Connection {
    let conn = Connection::open(path).expect("open");
    conn.busy_timeout(Duration::from_secs(30))
        .expect("busy_timeout");
    if let (Some(ext), false) = (ext, *loaded) {
        // SAFETY: loading the extension under test, which is what this program is for.
        unsafe {
            conn.load_extension_enable().expect("enable extensions");
            conn.load_extension(ext, None::<&str>)
                .expect("load libmultidb");
            conn.load_extension_disable().expect("disable extensions");
        }
        *loaded = true;
    }
    conn
}

fn transaction(conn: &Connection, rng: &mut Rng, seed: u64, seq: u64) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS writes(writer INTEGER, seq INTEGER, payload BLOB, PRIMARY KEY (writer, seq));",
    )?;
    let tx = conn.unchecked_transaction()?;
    let size = 16 + rng.below(2000);
    tx.execute(
        "INSERT INTO writes VALUES (?1, ?2, randomblob(?3))",
        rusqlite::params![seed as i64, seq as i64, size as i64],
    )?;
    match rng.below(4) {
        0 => {
            tx.execute(
                "UPDATE writes SET payload = randomblob(40) WHERE writer = ?1 AND seq = ?2",
                rusqlite::params![seed as i64, seq.saturating_sub(1) as i64],
            )?;
        }
        1 => {
            tx.execute(
                "DELETE FROM writes WHERE writer = ?1 AND seq = ?2",
                rusqlite::params![seed as i64, seq.saturating_sub(3) as i64],
            )?;
        }
        _ => {}
    }
    tx.commit()
}

fn wait_mode(db: &Path, ext: Option<&Path>) {
    use std::io::{BufRead, Write};
    let mut loaded = false;
    let conn = open(db, ext, &mut loaded);
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS waits(k INTEGER PRIMARY KEY);",
    )
    .expect("schema");
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let mut words = line.split_whitespace();
        let (Some(k), Some(timeout)) = (words.next(), words.next()) else {
            continue;
        };
        let k: i64 = k.parse().expect("K");
        let timeout: i64 = timeout.parse().expect("TIMEOUT_MS");
        conn.execute("INSERT INTO waits VALUES (?1)", [k])
            .expect("insert");
        let durable: i64 = conn
            .query_row("SELECT multidb_wait(?1)", [timeout], |r| r.get(0))
            .expect("multidb_wait");
        let mut out = stdout.lock();
        writeln!(out, "{durable}").expect("stdout");
        out.flush().expect("stdout");
    }
}

fn main() {
    let args = parse_args();
    if let Some(db) = &args.wait {
        wait_mode(db, args.ext.as_deref());
        return;
    }
    let text = std::fs::read_to_string(&args.list).expect("reading --list");
    let dbs: Vec<PathBuf> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect();
    assert!(!dbs.is_empty(), "--list names no database");
    let mut rng = Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut loaded = false;
    let mut open_conns: VecDeque<(usize, Connection)> = VecDeque::new();
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let pause = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    let mut committed = 0u64;
    let mut seq = 0u64;
    while Instant::now() < deadline {
        let index = rng.below(dbs.len());
        seq += 1;
        let result = if args.per_txn {
            let conn = open(&dbs[index], args.ext.as_deref(), &mut loaded);
            let r = transaction(&conn, &mut rng, args.seed, seq);
            drop(conn);
            r
        } else {
            let at = open_conns.iter().position(|(i, _)| *i == index);
            let (i, conn) = match at {
                Some(at) => open_conns.remove(at).expect("present"),
                None => (index, open(&dbs[index], args.ext.as_deref(), &mut loaded)),
            };
            let r = transaction(&conn, &mut rng, args.seed, seq);
            open_conns.push_back((i, conn));
            if open_conns.len() > OPEN_CONNECTIONS {
                open_conns.pop_front();
            }
            r
        };
        match result {
            Ok(()) => committed += 1,
            Err(e) => panic!("transaction on {} failed: {e}", dbs[index].display()),
        }
        if let Some(pause) = pause {
            std::thread::sleep(pause);
        }
    }
    println!("committed {committed}");
}
