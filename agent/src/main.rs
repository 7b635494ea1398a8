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
    if let Err(e) = init_logs(default_level) {
        eprintln!("multidb: {e}");
        return ExitCode::from(2);
    }
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

/// Logs on stderr at `MULTIDB_LOG` (else `default_level`), as text or, with
/// `MULTIDB_LOG_FORMAT=json`, one JSON object per line for a log collector. Colours only on a
/// terminal (and not with `NO_COLOR`): a file or a pipe gets plain text.
fn init_logs(default_level: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MULTIDB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false);
    match std::env::var("MULTIDB_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().init(),
        Ok("text") | Err(std::env::VarError::NotPresent) => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).init();
        }
        Ok(other) => {
            return Err(format!(
                "MULTIDB_LOG_FORMAT=`{other}`: expected `text` or `json`"
            ))
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err("MULTIDB_LOG_FORMAT is not UTF-8: expected `text` or `json`".into())
        }
    }
    Ok(())
}
