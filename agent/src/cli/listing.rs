//! What `databases`, `parse`, `ltx` and `status` print, for people and as JSON.

use std::io::{self, Write};

use super::printable;
use crate::config::Config;
use crate::discover::pattern::Fields;

pub(super) fn list_ltx(
    replica: &dyn crate::replica::ReplicaClient,
    json: bool,
) -> anyhow::Result<()> {
    let files = crate::replicate::restore::list_all(replica)?;
    if json {
        let list: Vec<serde_json::Value> = files
            .iter()
            .map(|f| {
                serde_json::json!({
                    "level": f.level, "min_txid": f.min_txid, "max_txid": f.max_txid, "size": f.size,
                    "created": crate::time::format_rfc3339(f.created), "name": f.name(),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return Ok(());
    }
    println!("level  min_txid          max_txid          size        created");
    for f in &files {
        println!(
            "{:<6} {:016x}  {:016x}  {:<10}  {}",
            f.level,
            f.min_txid,
            f.max_txid,
            f.size,
            crate::time::format_rfc3339(f.created)
        );
    }
    eprintln!("{} file(s) in {}", files.len(), replica.url());
    Ok(())
}

pub(super) fn databases(config: &Config, json: bool, count: bool) -> anyhow::Result<()> {
    let (arena, report) = crate::discover::discover(config)?;
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    if count {
        writeln!(out, "{}", arena.len())?;
    } else {
        let pattern = &config.multi_db.pattern;
        let shared = match &config.multi_db.replica {
            Some(template) => crate::discover::collisions::find(&arena, pattern, template),
            None => Default::default(),
        };
        let refused = |id: u32| {
            shared.get(&id).map(|other| {
                format!(
                    "replica location shared with {}: both are refused",
                    arena.path(*other)
                )
            })
        };
        let mut rows: Vec<(String, u32)> = arena.ids().map(|id| (arena.path(id), id)).collect();
        rows.sort_unstable();
        if json {
            let list: Vec<serde_json::Value> = rows
                .iter()
                .map(|(path, id)| {
                    let fields = pattern
                        .fields_of(&arena.components(*id))
                        .unwrap_or_default();
                    let mut json =
                        database_json(config, path, Some(arena.tier(*id).as_str()), &fields);
                    json["refused"] = refused(*id).into();
                    json
                })
                .collect();
            serde_json::to_writer_pretty(&mut out, &list)?;
            writeln!(out)?;
        } else {
            for (path, id) in &rows {
                let components = arena.components(*id);
                let fields = pattern.fields_of(&components).unwrap_or_default();
                let replica = match (refused(*id), config.replica_location(&fields)) {
                    (Some(why), _) => format!("refused: {why}"),
                    (None, None) => "-".to_string(),
                    (None, Some(Ok(r))) => r,
                    (None, Some(Err(e))) => format!("(not replicated: {e})"),
                };
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}",
                    printable(path),
                    arena.tier(*id).as_str(),
                    printable(&fields.to_string()),
                    printable(&replica)
                )?;
            }
        }
    }
    out.flush()?;
    let bytes = arena.heap_bytes();
    let rss = crate::cli::bench::peak_rss_bytes().map_or("?".to_string(), |b| {
        format!("{:.1} MB", b as f64 / 1048576.0)
    });
    eprintln!(
        "{} databases discovered in {:.1} ms ({} directories read; arena {} B = {:.1} B per database; peak RSS {rss})",
        arena.len(),
        report.elapsed.as_secs_f64() * 1e3,
        report.dirs_read,
        bytes,
        bytes as f64 / arena.len().max(1) as f64
    );
    Ok(())
}

pub(super) fn parse(config: &Config, path: &str, json: bool) -> anyhow::Result<()> {
    let pattern = &config.multi_db.pattern;
    let fields = pattern.parse(path).map_err(|why| {
        anyhow::anyhow!(
            "{} does not match {}: it {}",
            printable(path),
            pattern.as_str(),
            printable(&why)
        )
    })?;
    if json {
        println!("{}", database_json(config, path, None, &fields));
        return Ok(());
    }
    let replica = config.replica_location(&fields);
    for (name, value) in &fields.0 {
        println!("{name}: {}", printable(value));
    }
    match replica {
        None => {}
        Some(Ok(r)) => println!("replica: {}", printable(&r)),
        Some(Err(e)) => println!("replica: not replicated: {}", printable(&e)),
    }
    Ok(())
}

/// One database as JSON: `path`, `tier` (when known), `fields`, and `replica` or `replica_error`.
fn database_json(
    config: &Config,
    path: &str,
    tier: Option<&str>,
    fields: &Fields,
) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    obj.insert("path".into(), path.into());
    if let Some(tier) = tier {
        obj.insert("tier".into(), tier.into());
    }
    let f: serde_json::Map<String, serde_json::Value> = fields
        .0
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    obj.insert("fields".into(), f.into());
    match config.replica_location(fields) {
        None => obj.insert("replica".into(), serde_json::Value::Null),
        Some(Ok(r)) => obj.insert("replica".into(), r.into()),
        Some(Err(e)) => obj.insert("replica_error".into(), e.into()),
    };
    serde_json::Value::Object(obj)
}

/// The status for people.
pub(super) fn print_status(v: &serde_json::Value) {
    print!("{}", status_text(v));
}

/// The status for people, a line per subject. Each count says what it counts, so the
/// numbers add up: uploads are snapshots plus incremental files, and lag samples are syncs
/// that caught up with a write, which need not upload anything (an earlier sync may have
/// shipped the write already).
fn status_text(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let t = &v["tiers"];
    let ms = |x: &serde_json::Value| x.as_f64().map_or("-".to_string(), |v| format!("{v:.1} ms"));
    let _ = writeln!(
        out,
        "agent pid {}: {} databases, {} hot (max {}), {} cold, {} waiting",
        v["pid"], t["discovered"], t["hot"], t["max_active"], t["cold"], t["waiting"]
    );
    let lag = &v["lag_ms"];
    let _ = writeln!(
        out,
        "lag from a write to its replica: p50 {}, p99 {} over the last {} of {} syncs that caught up with a write",
        ms(&lag["p50"]),
        ms(&lag["p99"]),
        lag["samples"],
        lag["total"],
    );
    let uploads = v["syncs"].as_u64().unwrap_or(0);
    let snapshots = v["snapshots"].as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "uploads: {uploads} LTX files ({snapshots} snapshots + {} incremental), {} bytes; {} sync errors",
        uploads.saturating_sub(snapshots),
        v["bytes_uploaded"],
        v["sync_errors"]
    );
    let _ = writeln!(
        out,
        "ring: {} commits read, {} dropped, {} invalid; last scan {} ms",
        v["ring_commits"], t["ring_dropped"], t["ring_invalid"], t["last_scan_ms"]
    );
    let _ = writeln!(
        out,
        "watches: {} directories watched, {} left to scans; {} writes seen through inotify",
        t["watched_dirs"], t["unwatched_dirs"], v["watch_writes"]
    );
    let oldest = v["oldest_unreplicated_ms"].as_u64().unwrap_or(0);
    if oldest == 0 {
        let _ = writeln!(out, "replicas: caught up; {} refused", t["refused"]);
    } else {
        let _ = writeln!(
            out,
            "replicas: oldest commit not yet in the replica is {:.1} s old; {} refused",
            oldest as f64 / 1000.0,
            t["refused"]
        );
    }
    if let Some(errors) = v["errors"].as_array() {
        for e in errors {
            let _ = writeln!(
                out,
                "error: {} ({} times): {}",
                printable(e["db"].as_str().unwrap_or("?")),
                e["count"],
                printable(e["last"].as_str().unwrap_or(""))
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    /// Issue 13: `multidb status` printed "(last 3 syncs); 5 syncs, 2 snapshots", three counts
    /// of "syncs" that disagreed. Each now names what it counts, and the uploads add up.
    #[test]
    fn regression_13_status_counts_say_what_they_count() {
        let m = crate::agent::status::Metrics::default();
        for ms in [3, 5, 8] {
            m.record_lag(Duration::from_millis(ms));
        }
        m.syncs.store(5, Ordering::Relaxed);
        m.snapshots.store(2, Ordering::Relaxed);
        let text = super::status_text(&m.report(7));
        assert!(
            text.contains(
                "p50 5.0 ms, p99 8.0 ms over the last 3 of 3 syncs that caught up with a write\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "uploads: 5 LTX files (2 snapshots + 3 incremental), 0 bytes; 0 sync errors\n"
            ),
            "{text}"
        );
    }
}
