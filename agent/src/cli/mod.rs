//! The `multidb` command line: raw arguments (clap) first, then a validated configuration,
//! then one small function per command.
mod args;
pub mod bench;
pub mod demo;
mod fleet;
pub mod generate;
mod listing;
pub mod ring;
pub mod signals;
mod source;

use anyhow::Context;

use crate::replica::ReplicaUrl;
use generate::Layout;

pub use args::{BenchCommand, Cli, Command, GenerateArgs, RingCommand};
use source::{absolute_for, check_replica_identity, is_url, replica_for, source_fields};
pub use source::{load_config, DEFAULT_CONFIG};

/// An error and its causes as `{:#}` prints them, less the causes that a message already
/// quotes: errors that put their source in their own text (`{path}: {op}: {source}`) would
/// otherwise print the same OS error two or three times.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !last.is_empty() && last.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        last = text;
    }
    out
}

/// `text` for a line meant for people: control characters (newlines, tabs, escape
/// sequences) in names that users chose are shown escaped, as `\n` or `\u{1b}`, so one
/// database is one line and a name cannot rewrite the terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// How a command failed: the exit code follows from it.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage or configuration: exit 2.
    Usage(anyhow::Error),
    /// The command ran and failed: exit 1.
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Runtime(e)
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Demo(args) => crate::cli::demo::run(args)?,
        Command::Agent { baseline } => {
            let config = load_config(&cli)?;
            crate::cli::signals::catch_interrupts();
            let options = crate::agent::Options {
                config,
                ring_path: multidb::ring::path_from_env(),
                baseline: *baseline,
                stop: std::sync::Arc::new(crate::cli::signals::interrupted),
            };
            let metrics = std::sync::Arc::new(crate::agent::status::Metrics::default());
            crate::agent::run(options, metrics).map_err(anyhow::Error::from)?;
        }
        Command::Status { json } => {
            let config = load_config(&cli)?;
            let status = crate::agent::status::query(&config.multi_db.state_dir)?;
            if *json {
                println!("{status}");
            } else {
                listing::print_status(&status);
            }
        }
        Command::Databases { json, count } => {
            let config = load_config(&cli)?;
            listing::databases(&config, *json, *count)?;
        }
        Command::Parse { path, json } => {
            let config = load_config(&cli)?;
            let path = absolute_for(&config.multi_db.pattern, path);
            listing::parse(&config, &path, *json)?;
        }
        Command::Generate(args) => {
            let layout = Layout {
                projects: args.projects,
                databases: args.databases,
                branches: args.branches,
                tenants: args.tenants,
            };
            let stats = generate::generate(&args.root, &layout, args.sqlite)
                .with_context(|| format!("generating databases under {}", args.root.display()))?;
            println!(
                "created {} databases under {} in {:.1} s; pattern: {}",
                stats.created,
                args.root.display(),
                stats.elapsed.as_secs_f64(),
                generate::pattern_for(&args.root)
            );
        }
        Command::Replicate {
            once,
            poll,
            tmp_dir,
            state_dir,
            litestream_compatible,
            db,
            url,
        } => {
            let replica = ReplicaUrl::parse(url).map_err(|e| Failure::Usage(e.into()))?;
            let me = crate::replica::lease::Holder::of_process(state_dir.as_deref())
                .context("making a host id")?;
            let leases = crate::replica::lease::LeaseKeeper::start(
                me,
                crate::replica::lease::DEFAULT_LEASE_TTL,
            )
            .context("starting the lease keeper")?;
            let (client, previous) = leases.lease(&replica).map_err(anyhow::Error::from)?;
            // A work directory of this run's own below it: one a killed run left is removed.
            let base = tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
            std::fs::create_dir_all(&base)
                .with_context(|| format!("creating {}", base.display()))?;
            let work = crate::replicate::workdir::WorkDir::create(&base, "replicate")?;
            let tmp = work.path().to_path_buf();
            let options = crate::replicate::RunOptions {
                once: *once,
                poll: *poll,
                max_backoff: std::time::Duration::from_secs(5),
                litestream_compatible: *litestream_compatible,
                // After another host's lease the replica may be past any saved position: the
                // replicator forgets it before its first write.
                previous_lease: previous,
            };
            let store = match state_dir.as_ref() {
                Some(dir) => Some(std::sync::Arc::new(
                    crate::replicate::state::StateStore::open(dir).map_err(anyhow::Error::from)?,
                )),
                None => None,
            };
            crate::cli::signals::catch_interrupts();
            let txid = crate::replicate::run_with(
                db,
                client,
                &tmp,
                store,
                options,
                &crate::cli::signals::interrupted,
                &mut |_| {},
            );
            leases.release_all();
            let txid = txid.map_err(anyhow::Error::from)?;
            eprintln!("{}: replicated through TXID {txid} to {url}", db.display());
        }
        Command::Restore {
            output,
            txid,
            timestamp,
            dry_run,
            follow,
            interval,
            source,
            all,
            to,
            jobs,
        } => {
            let target = match (txid, timestamp) {
                (Some(t), _) => crate::replicate::restore::Target::Txid(*t),
                (None, Some(when)) => crate::replicate::restore::Target::Time(*when),
                (None, None) => crate::replicate::restore::Target::Latest,
            };
            let (Some(output), Some(source), false) = (output, source, *all) else {
                return fleet::restore_all(&cli, to.clone(), target, *jobs);
            };
            let replica = replica_for(&cli, source)?;
            let client = replica.client().map_err(anyhow::Error::from)?;
            check_replica_identity(
                client.as_ref(),
                source,
                source_fields(&cli, source).as_ref(),
            )?;
            // Restoring a database named by its path: the copy is no more readable than the
            // original still there, else owner-only (a replica says nothing about readers).
            let mode = if is_url(source) {
                crate::replica::PRIVATE_MODE
            } else {
                crate::replica::copy_mode(std::path::Path::new(source))
            };
            if *follow {
                let options = crate::replicate::follow::FollowOptions {
                    interval: *interval,
                    mode,
                };
                crate::cli::signals::catch_interrupts();
                let url = client.url();
                let txid = crate::replicate::follow::follow(
                    client.as_ref(),
                    output,
                    &options,
                    &crate::cli::signals::interrupted,
                    &mut |step| {
                        eprintln!(
                            "{} TXID {} ({} files, {} pages) from {url} to {}",
                            step.kind,
                            step.txid,
                            step.files,
                            step.pages,
                            output.display()
                        )
                    },
                )?;
                eprintln!(
                    "stopped following at TXID {txid}; {} is current to it",
                    output.display()
                );
                return Ok(());
            }
            let restored = crate::replicate::restore::restore_with_mode(
                client.as_ref(),
                target,
                output,
                *dry_run,
                mode,
            )?;
            if !dry_run {
                eprintln!(
                    "restored TXID {} ({} pages, {} files) from {} to {}; checksums and integrity_check verified",
                    restored.txid,
                    restored.pages,
                    restored.files,
                    client.url(),
                    output.display()
                );
            }
        }
        Command::Replicas {
            json,
            missing,
            jobs,
        } => fleet::replicas(&cli, *json, *missing, *jobs)?,
        Command::Ltx { json, source } => {
            let replica = replica_for(&cli, source)?;
            let client = replica.client().map_err(anyhow::Error::from)?;
            listing::list_ltx(client.as_ref(), *json)?;
        }
        Command::Ring { ring, command } => {
            let path = ring
                .clone()
                .unwrap_or_else(crate::agent::ring::default_path);
            match command {
                RingCommand::Tail(args) => ring::tail(&path, args)?,
                RingCommand::Stat { json } => ring::stat(&path, *json)?,
            }
        }
        Command::Bench(BenchCommand::Discovery(args)) => crate::cli::bench::discovery(args)?,
        Command::Bench(BenchCommand::Commit(args)) => crate::cli::bench::commit(args)?,
        Command::Bench(BenchCommand::Replicate(args)) => crate::cli::bench::replicate(args)?,
        Command::Bench(BenchCommand::Agent(args)) => crate::cli::bench::agent(args)?,
        Command::Bench(BenchCommand::Fleet(args)) => crate::cli::bench::fleet(args)?,
        Command::Bench(BenchCommand::AgentWriter(args)) => crate::cli::bench::agent_writer(args)?,
        Command::Bench(BenchCommand::Follow(args)) => crate::cli::bench::follow(args)?,
        Command::Bench(BenchCommand::NonextLag(args)) => crate::cli::bench::nonext(args)?,
        Command::Bench(BenchCommand::Measure { command }) => crate::cli::bench::measure(command)?,
        Command::Bench(BenchCommand::CommitChild(args)) => crate::cli::bench::commit_child(args)?,
        Command::Bench(BenchCommand::Peers(args)) => crate::cli::bench::peers(args)?,
        Command::Release { force, source } => release(&cli, source, *force)?,
    }
    Ok(())
}

/// `multidb release`: the lease marked released (a live one only with `--force`) and the
/// identity handed over, with what was done printed.
fn release(cli: &Cli, source: &str, force: bool) -> Result<(), Failure> {
    use crate::replica::lease::{self, Released};
    let replica = replica_for(cli, source)?;
    let client = replica.client().map_err(anyhow::Error::from)?;
    let url = client.url();
    let state_dir = load_config(cli).ok().map(|c| c.multi_db.state_dir);
    let me = lease::Holder::of_process(state_dir.as_deref()).context("making a host id")?;
    let what = lease::release(client.as_ref(), &me, force).map_err(anyhow::Error::from)?;
    match what {
        Released::None => println!("{url}: no lease there; nothing to release"),
        Released::Stale(was) => {
            println!("{url}: released the lease of {} (it had expired or was released)", was.describe())
        }
        Released::Live(was) => println!(
            "{url}: released the live lease of {} (--force); it writes nothing more once its next renewal fails",
            was.describe()
        ),
        Released::Unreadable(why) => {
            println!("{url}: replaced an unreadable lease ({why}) with a released one")
        }
    }
    if let Some(holder) =
        crate::replica::release_identity(client.as_ref()).map_err(anyhow::Error::from)?
    {
        println!("{url}: identity handed over: it named {holder}; the next database written there continues its history with a snapshot");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_10_names_print_on_one_line_without_escapes() {
        assert_eq!(printable("/d/acme.db"), "/d/acme.db");
        assert_eq!(
            printable("/d/a\nb\tc\u{1b}[2J.db"),
            "/d/a\\nb\\tc\\u{1b}[2J.db"
        );
        assert_eq!(printable("/d/é.db"), "/d/é.db");
    }

    #[test]
    fn regression_10_an_os_error_is_printed_once() {
        let os = std::io::Error::from_raw_os_error(libc::ENOENT);
        let replica = crate::replica::ReplicaError::Io {
            location: "/r/x".into(),
            op: "list",
            error: os,
        };
        let e = anyhow::Error::from(replica).context("listing level 0 of file:///r");
        assert_eq!(
            error_chain(&e),
            "listing level 0 of file:///r: /r/x: list: No such file or directory (os error 2)"
        );
        assert_eq!(
            format!("{e:#}").matches("No such file").count(),
            1,
            "{{:#}} prints it once too"
        );
    }

    /// Issue 13: an error whose message embeds its cause does not also return it from
    /// `source()`, so `{:#}` and `error_chain` print an OS error once, whoever prints it.
    #[test]
    fn regression_13_every_error_names_its_os_error_once() {
        let os = || std::io::Error::from_raw_os_error(libc::EACCES);
        let errors: Vec<anyhow::Error> = vec![
            crate::discover::discovery::DiscoveryError::Root {
                root: "/data".into(),
                error: os(),
            }
            .into(),
            crate::agent::lock::LockError::Io {
                dir: "/state".into(),
                op: "create",
                error: os(),
            }
            .into(),
            crate::agent::ring::RingFileError::Io {
                path: "/ring".into(),
                op: "open",
                error: os(),
            }
            .into(),
            crate::replicate::compaction::MaintainError::List {
                url: "file:///r".into(),
                level: 0,
                error: crate::replica::ReplicaError::Io {
                    location: "/r/0000".into(),
                    op: "list",
                    error: os(),
                },
            }
            .into(),
            crate::ltx::LtxError::Read {
                section: "header",
                error: os(),
            }
            .into(),
            crate::replicate::ReplicateError::Io {
                db: "/d/acme.db".into(),
                op: "read the WAL",
                error: os(),
            }
            .into(),
        ];
        for e in errors {
            let text = format!("{e:#}");
            assert_eq!(text.matches("Permission denied").count(), 1, "{text}");
            assert_eq!(error_chain(&e), text);
        }
    }
}
