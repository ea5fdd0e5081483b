//! A deterministic simulation of a [`Source`] and a [`Target`] over a faulty link, with invariant
//! checkers after every step.
//!
//! One `u64` seed drives everything: the configuration (volume geometry, acknowledgement mode,
//! lock style, conflict policy, log bounds, link latency and bandwidth, fault rates), the host
//! workload (writes, discards, write-zeroes and flushes of mixed sizes over a hot region), and the
//! faults (disconnects, corrupted bytes, silences of the link and pauses of the host longer than
//! the source's idle timeout, local lock holders on the target, mode switches, target
//! crashes that lose all or part of the volatile data, source process crashes and clean stops,
//! and with [`SimOptions::replace_target_volume`] a target disk replaced). Source crashes draw
//! from a [`fastrand::Rng`] stream of their own, the session's timers and the link's silences
//! (frames held in both directions, neither end told, as a half-open TCP connection) from a
//! third, everything else from one other. Time is a
//! tick counter; events sit in a queue ordered by (time, insertion counter), so a seed replays
//! exactly. Frames cross the link as encoded bytes, so the codec is exercised too.
//!
//! After every step the checkers verify:
//! - **prefix**: while the target says it is consistent, its volume (durable image plus volatile
//!   overlay) equals the replay of the operations through `applied` onto the initial image (after
//!   a source crash, the history continues after the seq the restarted primary adopted);
//! - **resync-bracket**: from a resync begin handed out until its end is durable, the target says
//!   it is inconsistent (it holds chunks of the source's current data over an older state);
//! - **acked-durable** / **acked-received**: an operation completed to the host in `sync` or
//!   `lock-then-write` (or a replicated flush) is durable on the target; in `received`, a completed
//!   write was received;
//! - **rollback-log**: every operation not yet durable on the target is still in the log;
//! - **memory**: the rollback log, the commit log and the link queues stay within their bounds;
//! - **protocol**: honest engines never return an error, except the resets that corrupted headers
//!   (or corrupted handshake payloads) must cause, and corruption is always detected;
//! - **local-lock**: a local lock holder never sees its region change;
//! - **write-intent**: at a source crash, the write intent the primary stored covers every write
//!   on its volume that is not durable on the target;
//! - **survives-source-crash**: a source crash loses its engine, rollback log, session and pending
//!   completions, not its volume, its metadata record or its stored write intent. Restarted, it
//!   runs the daemon's recovery rule on them ([`crate::node::recover_primary`]): after a clean stop
//!   (the operator's `stop`: the device stops, the link drains, the record says clean) it
//!   continues the sequence; after a crash its sequence continues after the target's and it
//!   resyncs the intent's chunks before host operations ([`crate::node::PeerLink::restarted`]).
//!   Every operation completed before the crash with the promise "durable on the target" must be
//!   durable there when the sequence continues; writes completed with a weaker promise that the
//!   target lacked then are counted in [`SimReport::acked_writes_resynced`], and quiescence proves
//!   the resync brought them;
//! - **quiescence** / **no-progress**: once the workload ends and faults stop, the run reaches a
//!   state where every host operation completed, the rollback log is empty and both volumes are
//!   byte-identical, within a step bound.
//!
//! The code is split by concern: `world` (event queue, run loop, pump), `link` (connections,
//! frames in flight, corruption), `storage` (the target's volume, metadata, group commit and
//! crashes), `source` (the source process: its crash, clean stop, restart and resync), `workload` (host
//! operations and local lock holders), `check` (the checkers), `config` and `report`.
//!
//! [`run`] returns a [`SimReport`] with counters of what happened, or the first [`Violation`],
//! whose message names the seed and the command that replays it.
//!
//! [`Source`]: crate::source::Source
//! [`Target`]: crate::target::Target

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::commit::CommitSabotage;
use crate::lock::LocalRetrySabotage;
use crate::node::PeerSabotage;
use crate::node::PrimaryRecoverySabotage;
use crate::session::SessionSabotage;
use crate::source::SourceSabotage;
use crate::target::{RecoverySabotage, TargetSabotage};

use world::Sim;

mod check;
mod config;
mod link;
mod report;
mod source;
mod storage;
mod workload;
mod world;

pub use config::SimConfig;
pub use report::SimReport;

/// Mixed into the seed for the source-crash stream.
const SOURCE_CRASH_STREAM: u64 = 0x50c3_c4a5_d1e5_0001;
/// Mixed into the seed for the stream of the session's timers and the link's silences.
const SILENCE_STREAM: u64 = 0x51e1_ce00_d1e5_0002;

/// What a run may be told from outside the seed.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Host operations in the workload.
    pub ops: usize,
    /// Bound on steps (events); 0 derives one from `ops`.
    pub max_steps: u64,
    /// Deliberate target bug (tests only).
    pub target_sabotage: TargetSabotage,
    /// Deliberate source bug (tests only).
    pub source_sabotage: SourceSabotage,
    /// Deliberate group-commit bug (tests only).
    pub commit_sabotage: CommitSabotage,
    /// Deliberate recovery bug (tests only).
    pub recovery_sabotage: RecoverySabotage,
    /// Deliberate session-policy bug (tests only).
    pub session_sabotage: SessionSabotage,
    /// Deliberate bug of the primary's per-peer policy (tests only).
    pub peer_sabotage: PeerSabotage,
    /// Deliberate bug of the simulated source process at a crash (tests only).
    pub source_crash_sabotage: SourceCrashSabotage,
    /// Deliberate bug of the primary's recovery rule at a restart (tests only).
    pub primary_recovery_sabotage: PrimaryRecoverySabotage,
    /// Deliberate bug of the local lock holders' retry policy (tests only).
    pub local_retry_sabotage: LocalRetrySabotage,
    /// One target crash in the run (each with even odds, while the source runs) puts a volume
    /// of unknown content without metadata under the target. The target must stay inconsistent;
    /// if the source had writes durable on it, replication stops for good (until the full resync
    /// of a target that lost its data) and the run ends there.
    pub replace_target_volume: bool,
}

/// Deliberate bugs of the simulated source process around a crash, for the tests that prove the
/// checkers bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceCrashSabotage {
    /// Behave correctly: host operations in flight at the crash fail.
    #[default]
    None,
    /// The dying process completes its in-flight host operations as if they had succeeded, as a
    /// daemon whose exit path ends its requests with success instead of an error would.
    AckInFlight,
    /// The restarted process reads its stored write intent with its first marked chunk clear
    /// (a bit lost between store and load): that chunk's writes the target lacks are never
    /// resynced.
    ForgetIntentChunk,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            ops: 150,
            max_steps: 0,
            target_sabotage: TargetSabotage::None,
            source_sabotage: SourceSabotage::None,
            commit_sabotage: CommitSabotage::None,
            recovery_sabotage: RecoverySabotage::None,
            session_sabotage: SessionSabotage::None,
            peer_sabotage: PeerSabotage::None,
            source_crash_sabotage: SourceCrashSabotage::None,
            primary_recovery_sabotage: PrimaryRecoverySabotage::None,
            local_retry_sabotage: LocalRetrySabotage::None,
            replace_target_volume: false,
        }
    }
}

/// The checker that found a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Check {
    /// The target volume is not the replay of a prefix of the operations.
    Prefix,
    /// An operation completed in `sync`/`lock-then-write` (or a replicated flush) is not durable
    /// on the target.
    AckedDurable,
    /// A write completed in `received` was never received by the target.
    AckedReceived,
    /// The rollback log lost an entry the target has not made durable.
    RollbackLog,
    /// A log or queue exceeded its bound.
    Memory,
    /// An engine returned an error (or a corrupt frame went undetected) without cause.
    Protocol,
    /// A local lock holder saw its region change.
    LocalLock,
    /// An operation completed in `sync`/`lock-then-write` (or a replicated flush) before a source
    /// crash is not durable on the target when the restarted primary continues after it.
    SurvivesSourceCrash,
    /// At a source crash, the write intent the primary stored misses a chunk of a write that is
    /// on its local volume and not durable on the target.
    WriteIntent,
    /// The target reported itself consistent inside a resync bracket (from its begin handed
    /// out until its end is durable).
    ResyncBracket,
    /// The primary's status called the peer up to date while the target had not made every
    /// operation durable, or was not consistent.
    PeerStatus,
    /// At quiescence the volumes differ or operations are missing.
    Quiescence,
    /// The run stopped making progress (deadlock) or exceeded its step bound (livelock).
    NoProgress,
    /// An engine panicked.
    Panic,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Check::Prefix => "prefix",
            Check::AckedDurable => "acked-durable",
            Check::AckedReceived => "acked-received",
            Check::RollbackLog => "rollback-log",
            Check::Memory => "memory",
            Check::Protocol => "protocol",
            Check::LocalLock => "local-lock",
            Check::SurvivesSourceCrash => "survives-source-crash",
            Check::WriteIntent => "write-intent",
            Check::ResyncBracket => "resync-bracket",
            Check::PeerStatus => "peer-status",
            Check::Quiescence => "quiescence",
            Check::NoProgress => "no-progress",
            Check::Panic => "panic",
        })
    }
}

/// A failed check, with what is needed to replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The seed of the run.
    pub seed: u64,
    /// Host operations of the run (part of the replay command).
    pub ops: usize,
    /// Step (event number) at which the check failed.
    pub step: u64,
    /// Simulated time in ticks.
    pub tick: u64,
    /// Which checker failed.
    pub check: Check,
    /// What exactly is wrong.
    pub message: String,
    /// The configuration the seed chose.
    pub config: String,
    /// Whether the run replaced the target's volume ([`SimOptions::replace_target_volume`]).
    pub replace_target_volume: bool,
}

impl Violation {
    /// The command that replays this run.
    #[must_use]
    pub fn replay_command(&self) -> String {
        let replace = if self.replace_target_volume {
            " --replace-target-volume"
        } else {
            ""
        };
        format!(
            "scripts/sim --seed {} --ops {}{replace}",
            self.seed, self.ops
        )
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} step {} tick {}: [{}] {}\n  config: {}\n  replay: {}",
            self.seed,
            self.step,
            self.tick,
            self.check,
            self.message,
            self.config,
            self.replay_command()
        )
    }
}

impl std::error::Error for Violation {}

/// Runs one simulation. `Err` is the first violated invariant.
pub fn run(seed: u64, opts: &SimOptions) -> Result<SimReport, Violation> {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Source crashes draw from a stream of their own: a seed that has none runs exactly as it did
    // before they were simulated.
    let mut crash_rng = fastrand::Rng::with_seed(seed ^ SOURCE_CRASH_STREAM);
    let mut silence_rng = fastrand::Rng::with_seed(seed ^ SILENCE_STREAM);
    let cfg = SimConfig::random(&mut rng, &mut crash_rng, &mut silence_rng);
    let config = cfg.summary();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed, opts, cfg, rng, crash_rng, silence_rng);
        let result = sim.run();
        (result, sim.step, sim.now)
    }));
    match outcome {
        Ok((result, _, _)) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Violation {
                seed,
                ops: opts.ops,
                step: 0,
                tick: 0,
                check: Check::Panic,
                message: format!("engine panicked: {message}"),
                config,
                replace_target_volume: opts.replace_target_volume,
            })
        }
    }
}
