//! `multidb demo`: the seed's walkthrough, for real, on this machine and with no cloud
//! account. It builds the seed's tree of 24 SQLite databases, runs the agent in-process
//! against a directory replica, writes to one database through libmultidb, shows it promoted
//! and replicated, restores it and compares, parses a few paths, and watches the database go
//! cold again after the idle timeout.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::agent::status::Metrics;
use crate::cli::generate::{self, Layout};
use crate::config::Config;

/// Marks a demo directory as ours, so a second run may replace it.
const MARKER: &str = "# written by `multidb demo`";
/// The demo's idle timeout: short, so the demotion is seen within the demo.
const IDLE_TIMEOUT: &str = "3s";
/// How long the demo waits for any one step before it gives up with an error.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the demo puts its databases, replica and state
    #[arg(long, default_value = "multidb-demo")]
    pub dir: PathBuf,
    /// libmultidb to load [default: next to this binary]
    #[arg(long)]
    pub extension: Option<PathBuf>,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let dir = prepare_dir(&args.dir)?;
    let extension = find_extension(args.extension.as_deref())?;
    let data = dir.join("data");
    let ring = dir.join("ring");
    // SAFETY: set before any thread of ours starts; libmultidb (loaded below, in this
    // process) and the agent read it to find the demo's ring instead of the host's.
    unsafe { std::env::set_var(multidb::ring::ENV_PATH, &ring) };
    println!(
        "multidb demo in {} (a local directory replica; no cloud account)\n",
        dir.display()
    );

    let stats = generate::generate(&data, &Layout::SEED, true)
        .with_context(|| format!("creating the demo databases under {}", data.display()))?;
    println!(
        "1. created {} SQLite databases in the seed's layout under {} ({:.0} ms)",
        stats.created,
        data.display(),
        stats.elapsed.as_secs_f64() * 1000.0
    );

    let config_path = dir.join("multidb.yml");
    std::fs::write(&config_path, config_text(&dir, &data))
        .with_context(|| format!("writing {}", config_path.display()))?;
    let config = Config::load(&config_path, None)?;
    println!("   configuration: {}", config_path.display());

    let stop = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::default());
    let agent = {
        let options = crate::agent::Options {
            config: config.clone(),
            ring_path: ring.clone(),
            baseline: false,
            stop: {
                let stop = stop.clone();
                Arc::new(move || stop.load(Ordering::Relaxed))
            },
        };
        let metrics = metrics.clone();
        std::thread::spawn(move || crate::agent::run(options, metrics).map_err(anyhow::Error::from))
    };
    let outcome = walkthrough(&config, &data, &dir, &extension, &metrics, &agent);
    stop.store(true, Ordering::Relaxed);
    let agent_result = agent
        .join()
        .map_err(|_| anyhow::anyhow!("the agent thread panicked"))?;
    outcome?;
    agent_result?;
    println!(
        "\n8. agent stopped. Run it yourself:\n     target/release/multidb --config {} agent\n   and watch it: target/release/multidb --config {} status",
        config_path.display(),
        config_path.display()
    );
    Ok(())
}

fn walkthrough(
    config: &Config,
    data: &Path,
    dir: &Path,
    extension: &Path,
    metrics: &Metrics,
    agent: &std::thread::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    wait_for("the agent to start", agent, || {
        metrics.tiers().discovered > 0
    })?;
    let (arena, report) = crate::discover::discover(config)?;
    println!(
        "\n2. agent started: it discovers {} databases in {:.2} ms, {:.1} bytes each in its arena; {} hot (max_active {})",
        arena.len(),
        report.elapsed.as_secs_f64() * 1000.0,
        arena.heap_bytes() as f64 / arena.len().max(1) as f64,
        metrics.tiers().hot,
        config.multi_db.max_active
    );

    let db = data.join("project1/databases/userdb/branches/main/tenants/acme.db");
    println!(
        "\n3. paths, parsed by the pattern {}:",
        config.multi_db.pattern.as_str()
    );
    for path in [
        db.display().to_string(),
        data.join("project2/databases/orderdb/branches/feature/tenants/globex.db")
            .display()
            .to_string(),
        data.join("project1/databases/userdb/tenants/acme.db")
            .display()
            .to_string(),
    ] {
        match config.multi_db.pattern.parse(&path) {
            Ok(fields) => {
                let replica = config
                    .replica_location(&fields)
                    .and_then(Result::ok)
                    .unwrap_or_default();
                println!("   {path}\n     → {fields}\n     → replica {replica}");
            }
            Err(why) => println!("   {path}\n     → not a database: it {why}"),
        }
    }

    println!("\n4. writing to {} with libmultidb loaded:", db.display());
    let conn = open_with_extension(&db, extension)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS orders(id INTEGER PRIMARY KEY, item TEXT NOT NULL, total REAL NOT NULL);",
    )?;
    for (item, total) in [("coffee", 4.5), ("bagel", 3.25), ("juice", 5.0)] {
        conn.execute(
            "INSERT INTO orders(item, total) VALUES (?1, ?2)",
            rusqlite::params![item, total],
        )?;
    }
    let started = Instant::now();
    let durable: i64 = conn.query_row("SELECT multidb_wait(10000)", [], |r| r.get(0))?;
    if durable != 1 {
        bail!("the write did not reach the replica within 10 s");
    }
    println!(
        "   4 transactions committed; multidb_wait(10000) returned 1 after {:.1} ms: they are in the replica",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let status = status_of(&conn)?;
    println!(
        "   multidb_status(): tier {}, replicated TXID {} (a TXID is one sync, not one SQL transaction), lag {} ms",
        status["database"]["tier"].as_str().unwrap_or("?"),
        status["database"]["replicated_txid"],
        status["database"]["lag_ms"]
    );
    let fields = config
        .multi_db
        .pattern
        .parse(&db.display().to_string())
        .map_err(anyhow::Error::msg)?;
    let template = config
        .multi_db
        .replica
        .as_ref()
        .context("no replica_template")?;
    let url = template.url_for(&fields)?;
    let client = url.client()?;
    let files = crate::replicate::restore::list_all(client.as_ref())?;
    println!("   replica {}:", client.url());
    for f in &files {
        let kind = if f.level == crate::replica::SNAPSHOT_LEVEL {
            "snapshot"
        } else {
            "changes"
        };
        println!(
            "     level {} TXID {}-{} ({kind}, {} bytes)",
            f.level, f.min_txid, f.max_txid, f.size
        );
    }

    let restored = dir.join("restored-acme.db");
    let _ = std::fs::remove_file(&restored);
    let outcome = crate::replicate::restore::restore(
        client.as_ref(),
        crate::replicate::restore::Target::Latest,
        &restored,
        false,
    )?;
    let source_rows = rows(&db)?;
    let restored_rows = rows(&restored)?;
    if source_rows != restored_rows {
        bail!("the restored database differs from its source");
    }
    println!(
        "\n5. restored TXID {} to {} ({} pages from {} file(s)): checksums and integrity_check verified, all {} rows equal to the source",
        outcome.txid,
        restored.display(),
        outcome.pages,
        outcome.files,
        source_rows.len()
    );

    wait_for("the agent's gauges", agent, || metrics.tiers().hot == 1)?;
    println!(
        "\n6. {} of {} databases is hot; the other {} cost the agent no file handle, timer or request",
        metrics.tiers().hot,
        metrics.tiers().discovered,
        metrics.tiers().cold
    );
    let idle = config.multi_db.idle_timeout;
    println!(
        "\n7. no more writes; waiting for the idle timeout ({} s) ...",
        idle.as_secs()
    );
    let mut status = status_of(&conn)?;
    wait_for("the database to be demoted", agent, || {
        status = status_of(&conn).unwrap_or_default();
        status["database"]["tier"] == "cold"
    })?;
    println!(
        "   demoted: multidb_status() says tier {}, replicated TXID {}; {} promotion(s), {} demotion(s), {} sync(s) so far",
        status["database"]["tier"].as_str().unwrap_or("?"),
        status["database"]["replicated_txid"],
        metrics.promotions.load(Ordering::Relaxed),
        metrics.demotions.load(Ordering::Relaxed),
        metrics.syncs.load(Ordering::Relaxed)
    );
    Ok(())
}

fn config_text(dir: &Path, data: &Path) -> String {
    format!(
        "{MARKER}; edit freely, `multidb demo` rewrites it.
multi_db:
  discovery_pattern: \"{pattern}\"
  max_active: 1000
  scan_interval: 30s
  sync_interval: 200ms
  idle_timeout: {IDLE_TIMEOUT}
  state_dir: state
  replica_template:
    type: file
    path: \"{replica}/{{{{project}}}}/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"
",
        pattern = generate::pattern_for(data),
        replica = dir.join("replica").display(),
    )
}

/// Creates the demo directory, or empties one an earlier demo made. Anything else there is
/// left alone and the demo refuses.
fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.exists() {
        let ours = std::fs::read_to_string(dir.join("multidb.yml"))
            .is_ok_and(|text| text.starts_with(MARKER));
        if !ours {
            bail!(
                "{} exists and was not made by `multidb demo`; pass --dir with a new directory",
                dir.display()
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(std::fs::canonicalize(dir)?)
}

fn find_extension(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("the binary has no directory")?
            .join("libmultidb.so"),
    };
    if !path.exists() {
        bail!(
            "libmultidb not found at {}; build it with `cargo build --release` (or pass --extension)",
            path.display()
        );
    }
    Ok(path)
}

fn open_with_extension(db: &Path, extension: &Path) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // SAFETY: loading libmultidb, the extension this project builds, is the point of the demo.
    unsafe {
        conn.load_extension_enable()?;
        let loaded = conn.load_extension(extension, None::<&str>);
        conn.load_extension_disable()?;
        loaded.with_context(|| format!("loading {}", extension.display()))?;
    }
    Ok(conn)
}

fn status_of(conn: &rusqlite::Connection) -> anyhow::Result<serde_json::Value> {
    let text: String = conn.query_row("SELECT multidb_status()", [], |r| r.get(0))?;
    Ok(serde_json::from_str(&text)?)
}

/// Every row of every table, for comparing a restore with its source.
fn rows(db: &Path) -> anyhow::Result<Vec<String>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for table in tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\" ORDER BY rowid"))?;
        let columns = stmt.column_count();
        let mut query = stmt.query([])?;
        while let Some(row) = query.next()? {
            let mut line = format!("{table}:");
            for i in 0..columns {
                let value: rusqlite::types::Value = row.get(i)?;
                line.push_str(&format!("{value:?}|"));
            }
            out.push(line);
        }
    }
    Ok(out)
}

fn wait_for(
    what: &str,
    agent: &std::thread::JoinHandle<anyhow::Result<()>>,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !done() {
        if agent.is_finished() {
            bail!("the agent stopped while waiting for {what}");
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
