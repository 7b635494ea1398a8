//! `multidb restore --all` and `multidb replicas`: a host's whole fleet of replicas, read back
//! from the replica root through the configuration's template.

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{load_config, printable, Cli, Failure};
use crate::replica::FileInfo;
use crate::replicate::catalogue::{Catalogue, CatalogueError, Found, Unreadable};
use crate::replicate::fleet::{self, EntryResult, FleetOptions, Outcome};
use crate::replicate::restore::Target;

/// Restores at once unless `--jobs` says otherwise. Small restores wait on fsyncs and
/// requests far more than on the CPU, so more jobs than cores pays; each job holds a few MiB.
pub const DEFAULT_JOBS: usize = 8;

/// Most failures printed in the summary; the count says how many there were. What is kept for
/// printing is bounded too, whatever the number of databases.
const FAILURES_SHOWN: usize = 1000;

fn catalogue(cli: &Cli) -> Result<(crate::config::Config, Catalogue), Failure> {
    let config = load_config(cli)?;
    let catalogue = Catalogue::new(&config).map_err(|e| match e {
        CatalogueError::NoTemplate | CatalogueError::NotInvertible(_) => {
            Failure::Usage(anyhow::Error::from(e))
        }
        other => Failure::Runtime(other.into()),
    })?;
    Ok((config, catalogue))
}

/// `multidb restore --all [--to DIR] [--txid N | --timestamp T] [--jobs N]`.
pub fn restore_all(
    cli: &Cli,
    to: Option<PathBuf>,
    target: Target,
    jobs: usize,
) -> Result<(), Failure> {
    if jobs == 0 {
        return Err(Failure::Usage(anyhow::anyhow!("--jobs must be at least 1")));
    }
    let (config, catalogue) = catalogue(cli)?;
    let to = match to {
        Some(dir) => Some(
            std::path::absolute(&dir)
                .map_err(|e| Failure::Usage(anyhow::anyhow!("--to {}: {e}", dir.display())))?,
        ),
        None => None,
    };
    let options = FleetOptions { target, to, jobs };
    let bar = progress_bar();
    let started = Instant::now();
    let mut counts = Counts::default();
    let mut failures: Vec<(String, String)> = Vec::new();
    let walked = fleet::restore_all(
        &catalogue,
        config.multi_db.pattern.root(),
        &options,
        &mut |result: EntryResult| {
            counts.add(&result.outcome);
            if let Outcome::Failed(why) = result.outcome {
                tracing::debug!(db = %result.path, error = %why, "not restored");
                if failures.len() < FAILURES_SHOWN {
                    failures.push((result.path, why));
                }
            }
            if let Some(bar) = &bar {
                bar.inc(1);
                bar.set_message(counts.short());
            }
        },
    );
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let mut out = io::stdout().lock();
    let _ = writeln!(
        out,
        "restore --all from {} in {:.1} s: {} replica(s): {}",
        catalogue.root(),
        started.elapsed().as_secs_f64(),
        counts.total(),
        counts.long(options.to.is_some())
    );
    if let Some(dir) = &options.to {
        let _ = writeln!(out, "restored under {}", dir.display());
    }
    if !failures.is_empty() {
        let _ = writeln!(out, "failed:");
        for (path, why) in &failures {
            let _ = writeln!(out, "  {}: {}", printable(path), printable(why));
        }
        if counts.failed > failures.len() {
            let _ = writeln!(out, "  ... and {} more", counts.failed - failures.len());
        }
    }
    let _ = out.flush();
    // The summary first: what was restored before the walk broke off stays restored.
    walked.map_err(|e| {
        anyhow::anyhow!(
            "the walk of {} stopped ({e}); replicas after that point were not looked at",
            catalogue.root()
        )
    })?;
    if counts.total() == 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "no replica found under {}; is replica_template the one the agent used?",
            catalogue.root()
        )));
    }
    if counts.failed > 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{} of {} database(s) not restored (listed above)",
            counts.failed,
            counts.total()
        )));
    }
    Ok(())
}

fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} {elapsed_precise} {pos} database(s) ({per_sec}) {msg}",
    )
    .ok()?;
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

#[derive(Default)]
struct Counts {
    restored: usize,
    already: usize,
    present: usize,
    failed: usize,
}

impl Counts {
    fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Restored { .. } => self.restored += 1,
            Outcome::AlreadyRestored { .. } => self.already += 1,
            Outcome::Present => self.present += 1,
            Outcome::Failed(_) => self.failed += 1,
        }
    }

    fn total(&self) -> usize {
        self.restored + self.already + self.present + self.failed
    }

    fn short(&self) -> String {
        format!(
            "{} restored, {} skipped, {} failed",
            self.restored,
            self.already + self.present,
            self.failed
        )
    }

    fn long(&self, to: bool) -> String {
        let mut parts = vec![format!("{} restored", self.restored)];
        if to || self.already > 0 {
            parts.push(format!("{} already restored and verified", self.already));
        }
        if !to {
            parts.push(format!(
                "{} present on this host (left alone)",
                self.present
            ));
        }
        parts.push(format!("{} failed", self.failed));
        parts.join(", ")
    }
}

/// One line of the catalogue.
struct Row {
    location: String,
    /// The database and its fields, or why the location names none.
    database: Result<(String, crate::discover::pattern::Fields), String>,
    newest: Option<FileInfo>,
    files: usize,
    bytes: u64,
    identity: bool,
    /// Why the replica could not be read, or names another database.
    error: Option<String>,
}

fn catalogue_row(catalogue: &Catalogue, found: Found) -> Row {
    let mut row = Row {
        location: found.location,
        database: found.database,
        newest: None,
        files: 0,
        bytes: 0,
        identity: false,
        error: None,
    };
    let Ok((path, fields)) = &row.database else {
        return row;
    };
    let read = (|| -> Result<(bool, Vec<FileInfo>), String> {
        let client = catalogue.client(fields)?;
        let has_identity = found.listing.as_ref().is_none_or(|l| l.has_identity);
        let identity = crate::replicate::catalogue::check_identity(
            client.as_ref(),
            path,
            fields,
            has_identity,
        )?;
        let files = match found.listing {
            Some(listing) => listing.files,
            None => crate::replicate::restore::list_all(client.as_ref())
                .map_err(|e| format!("{e:#}"))?,
        };
        Ok((identity, files))
    })();
    match read {
        Ok((identity, files)) => {
            row.identity = identity;
            row.files = files.len();
            row.bytes = files.iter().map(|f| f.size).sum();
            row.newest = files.into_iter().max_by_key(|f| (f.max_txid, f.created));
        }
        Err(why) => row.error = Some(why),
    }
    row
}

/// `multidb replicas [--json] [--missing] [--jobs N]`.
pub fn replicas(cli: &Cli, json: bool, missing: bool, jobs: usize) -> Result<(), Failure> {
    if jobs == 0 {
        return Err(Failure::Usage(anyhow::anyhow!("--jobs must be at least 1")));
    }
    let (config, catalogue) = catalogue(cli)?;
    let started = Instant::now();
    let mut rows = Vec::new();
    catalogue
        .walk_parallel(
            jobs,
            &|found| catalogue_row(&catalogue, found),
            &|Unreadable { location, error }| Row {
                location: location.clone(),
                database: Err(format!("cannot be read: {error}")),
                newest: None,
                files: 0,
                bytes: 0,
                identity: false,
                error: None,
            },
            &mut |row| rows.push(row),
        )
        .map_err(anyhow::Error::from)?;
    rows.sort_unstable_by(|a, b| a.location.cmp(&b.location));
    let elapsed = started.elapsed();
    let broken = rows
        .iter()
        .filter(|r| r.database.is_err() || r.error.is_some())
        .count();
    if missing {
        print_missing(&config, &rows, json)?;
    } else if json {
        let list: Vec<serde_json::Value> = rows.iter().map(row_json).collect();
        let mut out = io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &list).map_err(anyhow::Error::from)?;
        let _ = writeln!(out);
    } else {
        let mut out = io::BufWriter::new(io::stdout().lock());
        for row in &rows {
            let _ = writeln!(out, "{}", row_text(row));
        }
        let _ = out.flush();
    }
    let bytes: u64 = rows.iter().map(|r| r.bytes).sum();
    eprintln!(
        "{} replica(s) under {} ({:.1} MB stored) read in {:.1} ms; {broken} with a problem",
        rows.len(),
        catalogue.root(),
        bytes as f64 / 1048576.0,
        elapsed.as_secs_f64() * 1e3
    );
    Ok(())
}

fn time_text(newest: Option<&FileInfo>) -> String {
    newest.map_or("-".to_string(), |f| crate::time::format_rfc3339(f.created))
}

fn row_text(row: &Row) -> String {
    match (&row.database, &row.error) {
        (Err(why), _) => format!(
            "{}\t(names no database: {})",
            printable(&row.location),
            printable(why)
        ),
        (Ok((path, _)), Some(why)) => format!(
            "{}\t(error: {})\t{}",
            printable(path),
            printable(why),
            printable(&row.location)
        ),
        (Ok((path, fields)), None) => format!(
            "{}\t{}\tTXID {}\t{}\t{} B in {} file(s)\t{}",
            printable(path),
            printable(&fields.to_string()),
            row.newest.as_ref().map_or(0, |f| f.max_txid),
            time_text(row.newest.as_ref()),
            row.bytes,
            row.files,
            printable(&row.location)
        ),
    }
}

fn row_json(row: &Row) -> serde_json::Value {
    let (path, fields) = match &row.database {
        Ok((path, fields)) => (
            serde_json::Value::from(path.as_str()),
            fields
                .0
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        ),
        Err(_) => (serde_json::Value::Null, serde_json::Value::Null),
    };
    let error = match (&row.database, &row.error) {
        (Err(why), _) => Some(format!("names no database: {why}")),
        (_, Some(why)) => Some(why.clone()),
        _ => None,
    };
    serde_json::json!({
        "path": path,
        "fields": fields,
        "location": row.location,
        "newest_txid": row.newest.as_ref().map(|f| f.max_txid),
        "time": row.newest.as_ref().map(|f| crate::time::format_rfc3339(f.created)),
        "files": row.files,
        "bytes": row.bytes,
        "identity": row.identity,
        "error": error,
    })
}

/// `--missing`: the catalogue beside local discovery.
fn print_missing(config: &crate::config::Config, rows: &[Row], json: bool) -> Result<(), Failure> {
    let (arena, _) = crate::discover::discover(config).map_err(anyhow::Error::from)?;
    let mut replicated = std::collections::HashSet::new();
    let mut absent_here = Vec::new();
    for row in rows {
        if let Ok((path, _)) = &row.database {
            match arena.lookup_path(path) {
                Some(id) => {
                    replicated.insert(id);
                }
                None => absent_here.push(row),
            }
        }
    }
    let mut never: Vec<String> = arena
        .ids()
        .filter(|id| !replicated.contains(id))
        .map(|id| arena.path(id))
        .collect();
    never.sort_unstable();
    let mut out = io::BufWriter::new(io::stdout().lock());
    if json {
        let absent: Vec<serde_json::Value> = absent_here.iter().map(|r| row_json(r)).collect();
        let value = serde_json::json!({
            "replicated_absent_here": absent,
            "present_never_replicated": never,
        });
        serde_json::to_writer_pretty(&mut out, &value).map_err(anyhow::Error::from)?;
        let _ = writeln!(out);
    } else {
        for row in &absent_here {
            let _ = writeln!(out, "absent here\t{}", row_text(row));
        }
        for path in &never {
            let _ = writeln!(out, "never replicated\t{}", printable(path));
        }
    }
    let _ = out.flush();
    eprintln!(
        "{} replicated but absent here, {} here but never replicated ({} discovered here)",
        absent_here.len(),
        never.len(),
        arena.len()
    );
    Ok(())
}
