//! `multidb`: parses arguments, runs the command, reports errors with their causes.
//! Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.

use std::process::ExitCode;

use clap::Parser;
use multidb_agent::cli::{self, Cli, Failure};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo speaks for itself; its agent logs only what goes wrong unless asked.
    let default_level = match cli.command {
        cli::Command::Demo(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MULTIDB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_target(false)
        .init();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("multidb: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("multidb: {e:#}");
            ExitCode::from(1)
        }
    }
}
