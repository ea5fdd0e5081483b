//! `target-server`: receives mirrored operations over TCP and applies them to a target volume.
//!
//! Prints `target-server: listening on <addr>` on stdout once bound; logs go to stderr (`RUST_LOG`).
//! Bad input gives one `target-server: error: ...` line and exit code 2; a failure while serving
//! exits with 1. SIGTERM or SIGINT stop it gracefully (metadata marked clean).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::error::ErrorKind;
use clap::Parser;
use target_server::config::{resolve, Cli, Command};
use target_server::ServerConfig;
use tokio::signal::unix::{signal, SignalKind};

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("target-server: error: {message}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            return fail(2, &mirror_core::one_line_error(&e.to_string()));
        }
    };
    if let Some(Command::Status {
        status_socket,
        json,
    }) = &cli.command
    {
        return match target_server::status::query(status_socket) {
            Ok(st) if *json => {
                println!("{}", serde_json::to_string(&st).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Ok(st) => {
                print!("{}", st.table());
                ExitCode::SUCCESS
            }
            Err(e) => fail(1, &e.to_string()),
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cfg = match resolve(&cli) {
        Ok(cfg) => cfg,
        Err(e) => return fail(2, &e.to_string()),
    };
    // One thread runs the sessions and the applier (their hand-offs stay on it); file I/O goes to
    // tokio's blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, &format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Start(e)) => fail(2, &format!("{e:#}")),
        Err(Failure::Serve(e)) => fail(1, &format!("{e:#}")),
    }
}

enum Failure {
    Start(anyhow::Error),
    Serve(anyhow::Error),
}

async fn run(cfg: ServerConfig) -> Result<(), Failure> {
    let mut term = signal(SignalKind::terminate())
        .context("cannot handle SIGTERM")
        .map_err(Failure::Start)?;
    let server = target_server::start(cfg)
        .await
        .map_err(|e| Failure::Start(e.into()))?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "target-server: listening on {}", server.local_addr());
    let _ = out.flush();
    drop(out);
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        () = server.stopped() => {}
    }
    server
        .shutdown()
        .await
        .context("server stopped")
        .map_err(Failure::Serve)
}
