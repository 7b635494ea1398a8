//! `multidb ring tail` and `multidb ring stat`: watch the commit signals, read the counters.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use crate::agent::ring::{read_loop, RingFile};
use multidb::ring::{self as layout, Record, Stats};

/// Options of `multidb ring tail`.
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
    /// Slots when the ring is created (a power of two)
    #[arg(long, default_value_t = layout::DEFAULT_SLOTS)]
    pub slots: u32,
    /// Status entries when the ring is created
    #[arg(long, default_value_t = layout::DEFAULT_STATUS_ENTRIES)]
    pub status_entries: u32,
    /// Exit after this long without a record (e.g. `2s`); by default run until interrupted
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub idle_exit: Option<Duration>,
}

/// `multidb ring tail`: creates the ring if needed and prints one line per record.
pub fn tail(path: &Path, args: &TailArgs) -> anyhow::Result<()> {
    let file = RingFile::create_or_open(path, args.slots, args.status_entries)?;
    let ring = file.ring();
    crate::cli::signals::catch_interrupts();
    eprintln!(
        "multidb: reading {} ({} slots); Ctrl-C to stop",
        path.display(),
        ring.capacity()
    );
    let start = ring.stats();
    let mut paths: HashMap<(u64, u64), String> = HashMap::new();
    let stdout = io::stdout();
    let mut out = io::LineWriter::new(stdout.lock());
    let write_error: std::cell::RefCell<Option<io::Error>> = std::cell::RefCell::new(None);
    let idle = args.idle_exit;
    let counts = read_loop(
        ring,
        |_, quiet| {
            crate::cli::signals::interrupted()
                || write_error.borrow().is_some()
                || idle.is_some_and(|d| quiet >= d)
        },
        |record| {
            let line = describe(record, &mut paths, args.json);
            if let Err(e) = writeln!(out, "{line}") {
                *write_error.borrow_mut() = Some(e);
            }
        },
    );
    let end = ring.stats();
    eprintln!(
        "multidb: received {} commits and {} registrations; dropped {}, skipped {}, invalid {}",
        counts.commits,
        counts.registrations,
        end.dropped - start.dropped,
        end.skipped - start.skipped,
        end.invalid - start.invalid
    );
    match write_error.into_inner() {
        Some(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn describe(record: &Record, paths: &mut HashMap<(u64, u64), String>, json: bool) -> String {
    match record {
        Record::Register {
            dev,
            ino,
            pid,
            path,
            ..
        } => {
            let path = String::from_utf8_lossy(path).into_owned();
            paths.insert((*dev, *ino), path.clone());
            if json {
                serde_json::json!({"kind": "register", "dev": dev, "ino": ino, "pid": pid, "path": path}).to_string()
            } else {
                format!("register dev={dev} ino={ino} pid={pid} path={path}")
            }
        }
        Record::Commit(c) => {
            let path = paths.get(&(c.dev, c.ino)).map_or("?", String::as_str);
            let age_us = layout::now_ns().saturating_sub(c.time_ns) / 1000;
            if json {
                serde_json::json!({
                    "kind": "commit", "dev": c.dev, "ino": c.ino, "path_hash": c.path_hash, "frames": c.frames,
                    "pid": c.pid, "time_ns": c.time_ns, "path": path,
                })
                .to_string()
            } else {
                format!(
                    "commit dev={} ino={} frames={} pid={} age_us={age_us} path={path}",
                    c.dev, c.ino, c.frames, c.pid
                )
            }
        }
    }
}

/// `multidb ring stat`: the ring's counters and whether an agent is reading it.
pub fn stat(path: &Path, json: bool) -> anyhow::Result<()> {
    let file = RingFile::open_existing(path)?;
    let s: Stats = file.ring().stats();
    let now = layout::now_ns();
    let alive = file.ring().agent_alive(now, layout::AGENT_ALIVE_NS);
    let beat_ms = (s.heartbeat_ns != 0).then(|| now.saturating_sub(s.heartbeat_ns) / 1_000_000);
    if json {
        let v = serde_json::json!({
            "path": path.display().to_string(), "capacity": s.capacity, "head": s.head, "tail": s.tail,
            "fill": s.fill(), "dropped": s.dropped, "skipped": s.skipped, "invalid": s.invalid,
            "agent": {"running": alive, "pid": (s.agent_pid != 0).then_some(s.agent_pid), "heartbeat_age_ms": beat_ms},
            "status_entries": file.ring().status_capacity(),
        });
        println!("{v}");
    } else {
        println!("ring      {}", path.display());
        println!(
            "capacity  {} slots, {} status entries",
            s.capacity,
            file.ring().status_capacity()
        );
        println!("fill      {} (head {}, tail {})", s.fill(), s.head, s.tail);
        println!("dropped   {} (ring full)", s.dropped);
        println!("skipped   {} (abandoned by a dead writer)", s.skipped);
        println!("invalid   {} (failed validation)", s.invalid);
        match beat_ms {
            Some(ms) if alive => println!(
                "agent     running, pid {}, heartbeat {ms} ms ago",
                s.agent_pid
            ),
            Some(ms) => println!(
                "agent     not running (last heartbeat {ms} ms ago, pid {})",
                s.agent_pid
            ),
            None => println!("agent     never ran"),
        }
    }
    Ok(())
}
