//! Runs the deterministic simulator over a range of seeds (see `scripts/sim`).
//!
//! ```text
//! cargo run --release -p mirror-core --example sim -- [--seed N] [--start S --count C] [--ops N] [--verbose]
//! ```
//!
//! Prints one line per failing seed (with its replay command), then totals and the elapsed time.
//! Exits with status 1 when any seed fails, 2 on bad flags.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use mirror_core::sim::{self, SimOptions};

struct Args {
    start: u64,
    count: u64,
    ops: usize,
    verbose: bool,
}

const USAGE: &str = "usage: sim [--seed N] [--start S --count C] [--ops N] [--verbose]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        start: 1,
        count: 1000,
        ops: SimOptions::default().ops,
        verbose: false,
    };
    let mut seed = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--seed" => seed = Some(number(&value("--seed")?, "--seed")?),
            "--start" => args.start = number(&value("--start")?, "--start")?,
            "--count" => args.count = number(&value("--count")?, "--count")?,
            "--ops" => {
                let ops = number(&value("--ops")?, "--ops")?;
                args.ops = usize::try_from(ops).map_err(|_| format!("--ops {ops} is too large"))?;
            }
            "--verbose" | "-v" => args.verbose = true,
            "--help" | "-h" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown flag '{other}'\n{USAGE}")),
        }
    }
    if let Some(seed) = seed {
        args.start = seed;
        args.count = 1;
        args.verbose = true;
    }
    Ok(args)
}

fn number(text: &str, flag: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| format!("{flag} expects a non-negative integer, got '{text}'"))
}

/// Prints a line; a closed stdout (`scripts/sim | head`) ends the program quietly.
fn emit(line: &str) {
    if writeln!(std::io::stdout().lock(), "{line}").is_err() {
        std::process::exit(0);
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("sim: {message}");
            return ExitCode::from(2);
        }
    };
    let opts = SimOptions {
        ops: args.ops,
        ..SimOptions::default()
    };
    let began = Instant::now();
    let mut failures = 0u64;
    let mut steps = 0u64;
    let mut totals = Totals::default();
    let end = args.start.saturating_add(args.count);
    for seed in args.start..end {
        match sim::run(seed, &opts) {
            Ok(report) => {
                steps += report.steps;
                totals.add(&report);
                if args.verbose {
                    emit(&format!("ok   {report}"));
                    emit(&format!("     config: {}", report.config));
                }
            }
            Err(v) => {
                failures += 1;
                emit(&format!(
                    "FAIL seed {} step {} [{}] {} | replay: {}",
                    v.seed,
                    v.step,
                    v.check,
                    v.message,
                    v.replay_command()
                ));
                if args.verbose {
                    emit(&format!("     config: {}", v.config));
                }
            }
        }
    }
    let secs = began.elapsed().as_secs_f64();
    let ran = end - args.start;
    #[allow(clippy::cast_precision_loss)]
    let rate = ran as f64 / secs.max(1e-9);
    emit(&format!(
        "{ran} seeds ({}..={}), {} ops each: {failures} failed, {steps} steps, {secs:.2} s \
         ({rate:.0} seeds/s)",
        args.start,
        end.saturating_sub(1),
        args.ops
    ));
    emit(&format!("exercised: {totals}"));
    if failures > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Sums of the mechanisms the passing seeds exercised.
#[derive(Default)]
struct Totals {
    naks: u64,
    rejects: u64,
    granted: u64,
    disconnects: u64,
    resets: u64,
    handshakes: u64,
    crashes: u64,
    intruders: u64,
    partial_crashes: u64,
    clean_restarts: u64,
    local_locks: u64,
    mode_switches: u64,
    completed: [u64; 4],
    inconsistent_steps: u64,
    source_crashes: u64,
    host_ops_failed: u64,
    acked_durable_kept: u64,
    acked_writes_lost: u64,
    rebases_on_inconsistent: u64,
}

impl Totals {
    fn add(&mut self, r: &sim::SimReport) {
        self.naks += r.naks;
        self.rejects += r.rejects;
        self.granted += r.granted;
        self.disconnects += r.disconnects;
        self.resets += r.resets;
        self.handshakes += r.handshakes;
        self.crashes += r.crashes;
        self.intruders += r.intruders;
        self.partial_crashes += r.partial_crashes;
        self.clean_restarts += r.clean_restarts;
        self.local_locks += r.local_locks;
        self.mode_switches += r.mode_switches;
        self.completed[0] += r.completed_async;
        self.completed[1] += r.completed_received;
        self.completed[2] += r.completed_sync;
        self.completed[3] += r.completed_lock_then_write;
        self.inconsistent_steps += r.inconsistent_steps;
        self.source_crashes += r.source_crashes;
        self.host_ops_failed += r.host_ops_failed;
        self.acked_durable_kept += r.acked_durable_kept;
        self.acked_writes_lost += r.acked_writes_lost;
        self.rebases_on_inconsistent += r.rebases_on_inconsistent;
    }
}

impl std::fmt::Display for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nak {} reject {} granted {} disconnect {} reset {} handshake {} crash {} \
             (partial {}) intruder {} clean-restart {} local-lock {} mode-switch {} \
             inconsistent-steps {}; \
             completed async/received/sync/ltw {}/{}/{}/{}; source-crash {} (host ops failed {}, \
             acked durable kept {}, acked writes lost in async/received {}, re-based on an inconsistent \
             target {})",
            self.naks,
            self.rejects,
            self.granted,
            self.disconnects,
            self.resets,
            self.handshakes,
            self.crashes,
            self.partial_crashes,
            self.intruders,
            self.clean_restarts,
            self.local_locks,
            self.mode_switches,
            self.inconsistent_steps,
            self.completed[0],
            self.completed[1],
            self.completed[2],
            self.completed[3],
            self.source_crashes,
            self.host_ops_failed,
            self.acked_durable_kept,
            self.acked_writes_lost,
            self.rebases_on_inconsistent,
        )
    }
}
