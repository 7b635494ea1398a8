//! The `multidb` command line: raw arguments (clap) first, then a validated configuration,
//! then one small function per command.

pub mod bench;
pub mod demo;
mod fleet;
pub mod generate;
mod listing;
pub mod ring;
pub mod signals;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::replica::ReplicaUrl;
use generate::Layout;

/// The configuration file used when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "multidb.yml";

#[derive(Debug, Parser)]
#[command(
    name = "multidb",
    version,
    about = "Continuous backup for hosts with thousands to a million SQLite databases"
)]
pub struct Cli {
    /// Configuration file [default: ./multidb.yml]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Discovery pattern; replaces the configuration's `discovery_pattern`
    #[arg(long, global = true, value_name = "PATTERN")]
    pub pattern: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The seed's walkthrough on this machine: 24 databases, the agent, a write, a restore
    Demo(crate::cli::demo::DemoArgs),
    /// Run the sidecar: discover, watch commits, replicate written databases until SIGTERM
    Agent {
        /// Also back up, once, every database that has never been replicated (otherwise a
        /// database is first backed up at its first write after the agent starts)
        #[arg(long)]
        baseline: bool,
    },
    /// Ask the running agent how replication goes: tiers, lag, errors, ring drops
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List the databases the pattern discovers, with their fields, tier and replica path
    Databases {
        /// One JSON array instead of lines for people
        #[arg(long)]
        json: bool,
        /// Print only the number of databases
        #[arg(long, conflicts_with = "json")]
        count: bool,
    },
    /// Show the fields the pattern captures from PATH, or why it does not match
    Parse {
        path: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a synthetic tree of databases in the seed's layout, for demos and scale runs
    Generate(GenerateArgs),
    /// Replicate one database to a replica URL (file:///dir or s3://bucket/prefix?endpoint=...)
    Replicate {
        /// Replicate what is committed now, then exit
        #[arg(long)]
        once: bool,
        /// How often the WAL is checked for new commits
        #[arg(long, default_value = "10ms", value_parser = crate::config::parse_duration)]
        poll: std::time::Duration,
        /// Directory for temporary LTX files [default: the system temp directory]
        #[arg(long)]
        tmp_dir: Option<PathBuf>,
        /// Keep positions here, so a restart resumes without reading the replica
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Write LTX files without database checksums, as Litestream 0.5.17 does, so its
        /// restore accepts them (what this gives up: see the README)
        #[arg(long)]
        litestream_compatible: bool,
        db: PathBuf,
        url: String,
    },
    /// Restore a database from its replica, to the latest state or a TXID or time
    Restore {
        /// Where to write the restored database (must not exist)
        #[arg(short, long, required_unless_present = "all")]
        output: Option<PathBuf>,
        /// Restore to this TXID (decimal or 0x-prefixed hex)
        #[arg(long, conflicts_with = "timestamp", value_parser = parse_txid)]
        txid: Option<u64>,
        /// Restore to the last TXID stored at or before this RFC 3339 time
        #[arg(long, value_parser = crate::time::parse_rfc3339)]
        timestamp: Option<std::time::SystemTime>,
        /// Print the files that would be applied, change nothing
        #[arg(long, conflicts_with = "all")]
        dry_run: bool,
        /// Keep OUT current as the replica grows, until SIGINT/SIGTERM (resumes an OUT a
        /// previous --follow made)
        #[arg(long, conflicts_with_all = ["txid", "timestamp", "dry_run", "all"])]
        follow: bool,
        /// With --follow: time between looks at the replica (one LIST request each on S3)
        #[arg(long, requires = "follow", default_value = "1s", value_parser = crate::config::parse_duration)]
        interval: std::time::Duration,
        /// A replica URL, or a database path whose replica the configuration names
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        source: Option<String>,
        /// Restore every replica under the template's root (without --to: only databases
        /// missing on this host, in place)
        #[arg(long, conflicts_with = "output")]
        all: bool,
        /// With --all: restore under DIR, at each database's path relative to the pattern's root
        #[arg(long, value_name = "DIR", requires = "all")]
        to: Option<PathBuf>,
        /// With --all: restores at once
        #[arg(long, default_value_t = fleet::DEFAULT_JOBS, requires = "all")]
        jobs: usize,
    },
    /// List every replica under the template's root: database, fields, newest TXID, time, size
    Replicas {
        #[arg(long)]
        json: bool,
        /// Compare with local discovery: replicated but absent here, here but never replicated
        #[arg(long)]
        missing: bool,
        /// Replicas read at once
        #[arg(long, default_value_t = fleet::DEFAULT_JOBS)]
        jobs: usize,
    },
    /// List a replica's LTX files: level, TXID range, size, time
    Ltx {
        #[arg(long)]
        json: bool,
        /// A replica URL, or a database path whose replica the configuration names
        source: String,
    },
    /// Watch the commit signals applications post through libmultidb
    Ring {
        /// The ring file [default: $MULTIDB_RING or /dev/shm/multidb.ring]
        #[arg(long, value_name = "PATH")]
        ring: Option<PathBuf>,
        #[command(subcommand)]
        command: RingCommand,
    },
    /// Measure multidb against a baseline and print the figures
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Hand a replica location over: mark its lease released, so another host's agent takes
    /// it over at once, and its identity handed over, so the next database written there
    /// continues its history
    Release {
        /// Release a live lease too (its holder stops writing at its next renewal)
        #[arg(long)]
        force: bool,
        /// A replica URL, or a database path whose replica the configuration names
        source: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RingCommand {
    /// Create the ring if needed and print one line per commit record as it arrives
    Tail(ring::TailArgs),
    /// Print the ring's counters and whether an agent is reading it
    Stat {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Directory to create the tree in
    #[arg(long)]
    pub root: PathBuf,
    /// Projects under the root (project1, project2, ...)
    #[arg(long, default_value_t = 2)]
    pub projects: usize,
    /// Databases per project (userdb, orderdb, ...)
    #[arg(long, default_value_t = 2)]
    pub databases: usize,
    /// Branches per database (main, feature, ...)
    #[arg(long, default_value_t = 2)]
    pub branches: usize,
    /// Tenants per branch: up to 3 are the seed's acme, globex, initech; more get unique names
    #[arg(long, default_value_t = 3)]
    pub tenants: usize,
    /// Real WAL-mode SQLite databases with a small table instead of empty files
    #[arg(long)]
    pub sqlite: bool,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Discovery time, arena bytes per database and peak RSS, beside `find` on the same tree
    Discovery(crate::cli::bench::DiscoveryArgs),
    /// Cost of libmultidb per commit beside plain SQLite, and commit-to-agent delay
    Commit(crate::cli::bench::CommitArgs),
    /// Commit-to-replica latency, page throughput, restore vs cp, idle S3 requests
    Replicate(crate::cli::bench::ReplicateArgs),
    /// The agent at host scale: 100,000 discovered, idle cost, then 1,000 hot at 10,000 commits/s
    Agent(crate::cli::bench::AgentArgs),
    /// `restore --all` of 2,000 and 10,000 databases beside a loop of `multidb restore`, file and S3
    Fleet(crate::cli::bench::FleetArgs),
    /// Commit-to-replica of applications without libmultidb: inotify beside scans only
    NonextLag(crate::cli::bench::NonextArgs),
    /// A writer process for `bench agent`
    #[command(hide = true)]
    AgentWriter(crate::cli::bench::WriterArgs),
    /// Commit in a source to visible in `restore --follow`'s output, beside the poll interval
    Follow(crate::cli::bench::FollowArgs),
    /// Run a command and print its wall time (ns) and peak RSS (bytes): the benchmarks' trampoline
    #[command(hide = true)]
    Measure {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// The process `bench commit` counts instructions and system calls of
    #[command(hide = true)]
    CommitChild(crate::cli::bench::CommitChildArgs),
    /// Litestream and the multidb agent on the same trees of WAL databases, side by side
    Peers(crate::cli::bench::PeersArgs),
}

impl Command {
    /// Whether the command's job is to print (to a terminal or a pipe) and it writes to no
    /// socket, so that the default SIGPIPE disposition can end it when its reader goes.
    /// (`status` only reads its socket; S3 requests go through sockets that never raise
    /// SIGPIPE, as Rust sends with `MSG_NOSIGNAL`.)
    pub fn prints_for_pipes(&self) -> bool {
        matches!(
            self,
            Command::Status { .. }
                | Command::Databases { .. }
                | Command::Parse { .. }
                | Command::Generate(_)
                | Command::Restore { .. }
                | Command::Ltx { .. }
                | Command::Ring { .. }
                | Command::Replicas { .. }
        )
    }
}

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

/// The configuration: `--config FILE`, else `./multidb.yml` if it exists, else `--pattern` alone.
pub fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let pattern = cli.pattern.as_deref();
    let path = match &cli.config {
        Some(path) => path.clone(),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() || pattern.is_none() => {
            PathBuf::from(DEFAULT_CONFIG)
        }
        None => {
            let pattern = crate::discover::pattern::Pattern::new(pattern.unwrap_or_default())
                .map_err(|e| Failure::Usage(anyhow::anyhow!("--pattern: {e}")))?;
            return Ok(Config::with_pattern(pattern));
        }
    };
    if cli.config.is_none() && !path.exists() {
        return Err(Failure::Usage(anyhow::anyhow!(
            "no configuration: ./{DEFAULT_CONFIG} does not exist; pass --config FILE or --pattern PATTERN"
        )));
    }
    Config::load(&path, pattern).map_err(|e| Failure::Usage(e.into()))
}

fn parse_txid(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| format!("`{text}` is not a TXID (a positive integer)"))
}

/// A relative database path as the pattern spells paths: against the working directory
/// when the pattern is absolute, so `restore -o x.db tenants/acme.db` works from inside the
/// tree as it does from anywhere else.
fn absolute_for(pattern: &crate::discover::pattern::Pattern, path: &str) -> String {
    if path.starts_with('/') || !pattern.root().starts_with('/') {
        return path.to_string();
    }
    match std::env::current_dir() {
        Ok(cwd) => {
            let joined = cwd.join(path.trim_start_matches("./"));
            joined
                .to_str()
                .map_or_else(|| path.to_string(), str::to_string)
        }
        Err(_) => path.to_string(),
    }
}

fn is_url(source: &str) -> bool {
    source.starts_with("file://") || source.starts_with("s3://")
}

/// The replica named by `source`: a URL, or a database path expanded through the
/// configuration's `replica_template`.
/// Restoring a database by its path: the replica its template names must hold that
/// database's history (its identity object says whose), never another's.
fn check_replica_identity(
    client: &dyn crate::replica::ReplicaClient,
    source: &str,
    fields: Option<&crate::discover::pattern::Fields>,
) -> Result<(), Failure> {
    if source.starts_with("file://") || source.starts_with("s3://") {
        return Ok(()); // a URL names the replica itself
    }
    let Some(bytes) = client.read_identity().map_err(anyhow::Error::from)? else {
        return Ok(()); // written before identities, or by Litestream
    };
    let holder = crate::replica::identity_database(&bytes)
        .map_err(|why| anyhow::anyhow!("{}: {why}", client.url()))?;
    let absolute = std::path::absolute(source)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| source.to_string());
    if holder == source
        || crate::replica::identity_match(&bytes, &absolute, fields)
            != (crate::replica::IdentityMatch::Other {
                holder: holder.clone(),
            })
    {
        // The same database, or the same tenant's history under another path (moved).
        return Ok(());
    }
    Err(Failure::Runtime(anyhow::anyhow!(
        "{source}: the replica {} holds the history of {holder}, not of this database; refusing to restore another database's data (restore it by its URL if that is what you want)",
        client.url()
    )))
}

/// The pattern fields of a database named by its path, when the configuration has them.
fn source_fields(cli: &Cli, source: &str) -> Option<crate::discover::pattern::Fields> {
    if is_url(source) {
        return None;
    }
    let config = load_config(cli).ok()?;
    let pattern = &config.multi_db.pattern;
    pattern.parse(&absolute_for(pattern, source)).ok()
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

fn replica_for(cli: &Cli, source: &str) -> Result<ReplicaUrl, Failure> {
    if is_url(source) {
        return ReplicaUrl::parse(source).map_err(|e| Failure::Usage(e.into()));
    }
    // A database is a file: a directory given here is a replica named without its scheme.
    if std::path::Path::new(source).is_dir() {
        let absolute = std::path::absolute(source)
            .map_or_else(|_| source.to_string(), |p| p.display().to_string());
        return Err(Failure::Usage(anyhow::anyhow!(
            "{source} is a directory, not a database; to read it as a replica, pass file://{absolute}"
        )));
    }
    let config = load_config(cli)?;
    let pattern = &config.multi_db.pattern;
    let source = &absolute_for(pattern, source);
    let fields = pattern.parse(source).map_err(|why| {
        Failure::Usage(anyhow::anyhow!(
            "{source} is not a replica URL and does not match {}: it {why}",
            pattern.as_str()
        ))
    })?;
    let template = config.multi_db.replica.as_ref().ok_or_else(|| {
        Failure::Usage(anyhow::anyhow!(
            "{source}: the configuration has no replica_template"
        ))
    })?;
    template
        .url_for(&fields)
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("{source}: {e}")))
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
