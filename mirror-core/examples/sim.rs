//! Runs the deterministic simulator over a range of seeds (see `scripts/sim`).
//!
//! ```text
//! cargo run --release -p mirror-core --example sim -- [--seed N] [--start S --count C] [--ops N] [--verbose]
//! [--replace-target-volume]
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
    replace_target_volume: bool,
}

const USAGE: &str =
    "usage: sim [--seed N] [--start S --count C] [--ops N] [--verbose] [--replace-target-volume]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        start: 1,
        count: 1000,
        ops: SimOptions::default().ops,
        verbose: false,
        replace_target_volume: false,
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
            "--replace-target-volume" => args.replace_target_volume = true,
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
        replace_target_volume: args.replace_target_volume,
        ..SimOptions::default()
    };
    let began = Instant::now();
    let mut failures = 0u64;
    let mut steps = 0u64;
    let mut totals = Totals(sim::SimReport::default());
    let end = args.start.saturating_add(args.count);
    for seed in args.start..end {
        match sim::run(seed, &opts) {
            Ok(report) => {
                steps += report.steps;
                totals.0.add(&report);
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

/// The mechanisms the passing seeds exercised, from their summed reports.
struct Totals(sim::SimReport);

impl std::fmt::Display for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nak {} reject {} granted {} disconnect {} reset {} handshake {} silence {} ping {} \
             silent-drop {} target-idle-close {} host-pause {} crash {} \
             (partial {}) intruder {} clean-restart {} local-lock {} (timed out {}) mode-switch {} \
             inconsistent-steps {}; \
             completed async/received/sync/ltw {}/{}/{}/{}; source-crash {} (host ops failed {}, \
             acked durable kept {}, acked async/received writes the target lacked {}, resynced from \
             the write intent {} ({} B copied, admission refused {})); clean source stop {} \
             (resumed from its record {}); write-intent stores {}; replaced target volume {} \
             (found by a running primary {}, full resync {}); log full waits {}; out-of-sync \
             writes {} (overflow resyncs {}, {} B copied, steps withdrawn {}, throttled writes {}, copies past a parked one {})",
            self.0.naks,
            self.0.rejects,
            self.0.granted,
            self.0.disconnects,
            self.0.resets,
            self.0.handshakes,
            self.0.silences,
            self.0.pings,
            self.0.silent_drops,
            self.0.target_idle_closes,
            self.0.host_pauses,
            self.0.crashes,
            self.0.partial_crashes,
            self.0.intruders,
            self.0.clean_restarts,
            self.0.local_locks,
            self.0.local_lock_timeouts,
            self.0.mode_switches,
            self.0.inconsistent_steps,
            self.0.completed_async,
            self.0.completed_received,
            self.0.completed_sync,
            self.0.completed_lock_then_write,
            self.0.source_crashes,
            self.0.host_ops_failed,
            self.0.acked_durable_kept,
            self.0.acked_writes_resynced,
            self.0.source_resyncs,
            self.0.resync_copy_bytes,
            self.0.resync_admission_refusals,
            self.0.clean_source_stops,
            self.0.source_resumes,
            self.0.intent_stores,
            self.0.replaced_volumes,
            self.0.target_losses_found,
            self.0.full_resyncs,
            self.0.log_full_waits,
            self.0.out_of_sync_writes,
            self.0.overflow_resyncs,
            self.0.overflow_copy_bytes,
            self.0.overflow_steps_withdrawn,
            self.0.throttled_writes,
            self.0.copies_past_parked,
        )
    }
}
