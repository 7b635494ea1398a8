//! The raw command line: every command and its arguments as clap parses them, before any
//! of it is checked against the configuration.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use super::{fleet, ring};

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
