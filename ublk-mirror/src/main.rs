//! `ublk-mirror`: the command-line front end. Subcommands live in `cmd/`; each parses its own
//! flags and reports failures as one `ublk-mirror: error: ...` line with a non-zero exit.

#![forbid(unsafe_code)]

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ublk-mirror",
    version,
    about = "A replicated block device over ublk: source-side daemon and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes a seeded random workload to a file-backed source volume and mirrors it to a
    /// target server (no ublk needed); prints throughput and latency.
    Loadgen(cmd::loadgen::LoadgenArgs),
    #[command(flatten)]
    Admin(ublk_mirror::admin::cli::AdminCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            let line = mirror_core::one_line_error(&e.to_string());
            eprintln!("ublk-mirror: error: {line} (see --help)");
            return ExitCode::from(2);
        }
    };
    let daemon = matches!(
        cli.command,
        Command::Admin(ublk_mirror::admin::cli::AdminCommand::Start(_))
    );
    init_logging(if daemon { "warn" } else { "error" });
    let result = match cli.command {
        Command::Loadgen(args) => cmd::loadgen::run(args),
        Command::Admin(cmd) => cmd.run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ublk-mirror: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr; `RUST_LOG` selects what. By default a command logs errors only (a failing
/// command prints one line) and the daemon (`start`, its log file) warnings too: a dropped
/// connection, a degraded start, a copy in full, replication stopped.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
