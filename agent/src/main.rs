//! `multidb`: parses arguments, runs the command, reports errors with their causes.
//! Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error.

use std::process::ExitCode;

use clap::Parser;
use multidb_agent::cli::{self, Cli, Failure};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.prints_for_pipes() {
        // A listing piped into `head` ends as `cat` and `ls` do when the reader goes: killed
        // by SIGPIPE, quietly (status 141 in a shell), rather than with a panic in `println!`
        // or a "Broken pipe" error. Only for commands that write no sockets: Rust ignores
        // SIGPIPE so that a peer closing a connection is an error, not the process's end.
        // SAFETY: restoring a signal's default disposition, before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
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
            eprintln!("multidb: {}", cli::error_chain(&e));
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("multidb: {}", cli::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
