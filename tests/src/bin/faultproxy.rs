//! `faultproxy`: the tests' fault-injecting TCP proxy as a command, for benchmark scripts.
//!
//! Prints `faultproxy: listening on <addr>` once bound, then relays until killed.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mirror_tests::proxy::{FaultProxy, Faults};

#[derive(Debug, Parser)]
#[command(name = "faultproxy", about = "A fault-injecting TCP proxy on loopback")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Address to relay to.
    #[arg(long)]
    upstream: SocketAddr,
    /// One-way delay in each direction, milliseconds (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Rate cap in each direction, bytes per second (0: none).
    #[arg(long, default_value_t = 0)]
    bandwidth_bytes: u64,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability that a chunk gets one byte flipped.
    #[arg(long, default_value_t = 0.0)]
    corrupt_prob: f64,
    /// Mean interval between cuts of all connections, milliseconds (0: never).
    #[arg(long, default_value_t = 0)]
    cut_every_ms: u64,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "faultproxy: error: {}",
                mirror_core::one_line_error(&e.to_string())
            );
            return ExitCode::from(2);
        }
    };
    if !(args.delay_ms.is_finite() && (0.0..=60_000.0).contains(&args.delay_ms)) {
        eprintln!(
            "faultproxy: error: --delay-ms {} must be between 0 and 60000",
            args.delay_ms
        );
        return ExitCode::from(2);
    }
    if !(0.0..=1.0).contains(&args.corrupt_prob) {
        eprintln!(
            "faultproxy: error: --corrupt-prob {} must be between 0 and 1",
            args.corrupt_prob
        );
        return ExitCode::from(2);
    }
    let faults = Faults {
        corrupt_prob: args.corrupt_prob,
        cut_every: (args.cut_every_ms > 0).then(|| Duration::from_millis(args.cut_every_ms)),
        ..Faults::none()
    }
    .with_delay(Duration::from_secs_f64(args.delay_ms / 1000.0))
    .with_bandwidth(args.bandwidth_bytes);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("faultproxy: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let proxy = match FaultProxy::start(&args.listen, args.upstream, faults, args.seed).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("faultproxy: error: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        println!("faultproxy: listening on {}", proxy.addr());
        // Runs until killed; a terminal signal ends the process.
        let _ = tokio::signal::ctrl_c().await;
        ExitCode::SUCCESS
    })
}
