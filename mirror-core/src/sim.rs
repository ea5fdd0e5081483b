//! A deterministic simulation of a [`Source`] and a [`Target`] over a faulty link, with invariant
//! checkers after every step.
//!
//! One `u64` seed drives everything through a single [`fastrand::Rng`]: the configuration (volume
//! geometry, acknowledgement mode, lock style, conflict policy, log bounds, link latency and
//! bandwidth, fault rates), the host workload (writes, discards, write-zeroes and flushes of mixed
//! sizes over a hot region), and the faults (disconnects, corrupted bytes, local lock holders on
//! the target, mode switches, target crashes that lose all or part of the volatile data). Time is a
//! tick counter; events sit in a queue ordered by (time, insertion counter), so a seed replays
//! exactly. Frames cross the link as encoded bytes, so the codec is exercised too.
//!
//! After every step the checkers verify:
//! - **prefix**: while the target says it is consistent, its volume (durable image plus volatile
//!   overlay) equals the replay of operations `1..=applied` onto the initial image;
//! - **acked-durable** / **acked-received**: an operation completed to the host in `sync` or
//!   `lock-then-write` (or a replicated flush) is durable on the target; in `received`, a completed
//!   write was received;
//! - **rollback-log**: every operation not yet durable on the target is still in the log;
//! - **memory**: the rollback log, the commit log and the link queues stay within their bounds;
//! - **protocol**: honest engines never return an error, except the resets that corrupted headers
//!   (or corrupted handshake payloads) must cause, and corruption is always detected;
//! - **local-lock**: a local lock holder never sees its region change;
//! - **quiescence** / **no-progress**: once the workload ends and faults stop, the run reaches a
//!   state where every host operation completed, the rollback log is empty and both volumes are
//!   byte-identical, within a step bound.
//!
//! [`run`] returns a [`SimReport`] with counters of what happened, or the first [`Violation`],
//! whose message names the seed and the command that replays it.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::Bytes;

use crate::commit::{Batch, CommitConfig, CommitSabotage, GroupCommit};
use crate::lock::{LocalLockId, LockError};
use crate::log::RollbackLog;
use crate::meta::MetaRecord;
use crate::session::{SessionAction, SessionConfig, SessionSabotage, SourceSession};
use crate::source::{LockStyle, Mode, Source, SourceConfig, LOCKS_AHEAD_MAX};
use crate::storage::{self, FaultyVolume, Volume};
use crate::target::{
    recover_with, Apply, ConflictPolicy, ConnId, RecoverySabotage, Restored, Target, TargetConfig,
    VolumeFacts, HANDSHAKES_MAX_DEFAULT,
};
use crate::wire::{self, Encoded, Frame, Op, HEADER_BYTES, HELLO_PAYLOAD_BYTES, MAC_BYTES};
use crate::{Generation, Lba, NodeId, Range, Seq, VolumeId};

use crate::source::SourceSabotage;
use crate::target::TargetSabotage;

/// Intruders' connection ids start above this (the real source's count from 0).
const INTRUDER_CONN_BASE: u64 = 1 << 48;
/// Simulated nanoseconds per tick (only used for the submission time the source records).
const TICK_NS: u64 = 1_000;
/// Granularity of the volume comparisons and of the volatile overlay.
const CHECK_BLOCK_BYTES: usize = 512;
/// Bound on the number of rounds of one pump (each round moves at least one thing).
const PUMP_ROUNDS_MAX: usize = 100_000;

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
}

impl Violation {
    /// The command that replays this run.
    #[must_use]
    pub fn replay_command(&self) -> String {
        format!("scripts/sim --seed {} --ops {}", self.seed, self.ops)
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

/// The configuration a seed chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Volume size.
    pub volume_bytes: u64,
    /// Logical block size (512 or 4096).
    pub block_bytes: u32,
    /// Largest host operation.
    pub op_bytes_max: u64,
    /// Start of the hot region.
    pub hot_offset_bytes: u64,
    /// Size of the hot region.
    pub hot_bytes: u64,
    /// Initial acknowledgement mode.
    pub mode: Mode,
    /// Lock frames in speculative modes.
    pub lock_style: LockStyle,
    /// Target's conflict policy.
    pub policy: ConflictPolicy,
    /// Whether host flushes wait for the target (initially).
    pub flush_replicates: bool,
    /// Source rollback log bounds.
    pub log_bytes_max: usize,
    /// Source rollback log bounds.
    pub log_entries_max: usize,
    /// Target commit log bounds.
    pub commit_bytes_max: usize,
    /// Target commit log bounds.
    pub commit_entries_max: usize,
    /// Local locks at once on the target.
    pub local_locks_max: usize,
    /// One-way link latency.
    pub latency_ticks: u64,
    /// Link bandwidth.
    pub bandwidth_bytes_per_tick: u64,
    /// A sender stops taking frames from its engine while this many bytes are queued.
    pub link_bytes_max: usize,
    /// Host operations in flight at most.
    pub host_depth: usize,
    /// Gap between host operations, at most.
    pub op_gap_ticks_max: u64,
    /// Time to write one operation on the target, at most.
    pub apply_ticks_max: u64,
    /// Time before a needed fsync, at most.
    pub fsync_ticks_max: u64,
    /// Mean gap between disconnects (0: none).
    pub disconnect_gap_ticks: u64,
    /// Time to reconnect, at most.
    pub reconnect_ticks_max: u64,
    /// Frames corrupted, per mille.
    pub corrupt_per_mille: u32,
    /// Mean gap between target crashes (0: none).
    pub crash_gap_ticks: u64,
    /// Mean gap between local lock attempts (0: none).
    pub lock_gap_ticks: u64,
    /// Longest local lock hold.
    pub lock_hold_ticks_max: u64,
    /// Mean gap between mode switches (0: none).
    pub mode_switch_gap_ticks: u64,
}

impl SimConfig {
    fn random(rng: &mut fastrand::Rng) -> SimConfig {
        let block_bytes: u32 = if rng.bool() { 4096 } else { 512 };
        let block = u64::from(block_bytes);
        let volume_bytes = rng.u64(16..=64) * 4096;
        let op_bytes_max = if block_bytes == 4096 {
            block * rng.u64(1..=8)
        } else {
            block * rng.u64(1..=64)
        };
        let hot_bytes = (rng.u64(1..=4) * 4096).min(volume_bytes);
        let hot_offset_bytes = rng.u64(0..=(volume_bytes - hot_bytes) / block) * block;
        let op_max = usize::try_from(op_bytes_max).unwrap_or(usize::MAX);
        let some = |rng: &mut fastrand::Rng, percent: u32, lo: u64, hi: u64| {
            if rng.u32(0..100) < percent {
                rng.u64(lo..=hi)
            } else {
                0
            }
        };
        SimConfig {
            volume_bytes,
            block_bytes,
            op_bytes_max,
            hot_offset_bytes,
            hot_bytes,
            mode: Mode::ALL[rng.usize(0..Mode::ALL.len())],
            lock_style: if rng.bool() {
                LockStyle::Implied
            } else {
                LockStyle::Explicit
            },
            policy: if rng.bool() {
                ConflictPolicy::Wait
            } else {
                ConflictPolicy::Reject
            },
            flush_replicates: rng.bool(),
            log_bytes_max: op_max * rng.usize(1..=16) + rng.usize(0..=op_max),
            log_entries_max: rng.usize(2..=64),
            commit_bytes_max: op_max * rng.usize(1..=8) + rng.usize(0..=op_max),
            commit_entries_max: rng.usize(2..=64),
            local_locks_max: rng.usize(1..=4),
            latency_ticks: rng.u64(0..=30),
            bandwidth_bytes_per_tick: rng.u64(256..=65_536),
            link_bytes_max: rng.usize(1..=128) * 1024,
            host_depth: rng.usize(1..=32),
            op_gap_ticks_max: rng.u64(0..=20),
            apply_ticks_max: rng.u64(0..=5),
            fsync_ticks_max: rng.u64(0..=40),
            disconnect_gap_ticks: some(rng, 80, 300, 3000),
            reconnect_ticks_max: rng.u64(1..=200),
            corrupt_per_mille: u32::try_from(some(rng, 70, 1, 40)).unwrap_or(0),
            crash_gap_ticks: some(rng, 60, 500, 5000),
            lock_gap_ticks: some(rng, 85, 20, 400),
            lock_hold_ticks_max: rng.u64(1..=300),
            mode_switch_gap_ticks: some(rng, 50, 200, 3000),
        }
    }

    fn summary(&self) -> String {
        format!(
            "volume {} KiB block {} op<= {} hot {}+{} mode {} lock {:?} policy {:?} \
             flush_replicates {} log {}B/{} commit {}B/{} locals {} latency {} bw {}B/t \
             link {}B depth {} disconnect~{} corrupt {}/1000 crash~{} locks~{} switch~{}",
            self.volume_bytes / 1024,
            self.block_bytes,
            self.op_bytes_max,
            self.hot_offset_bytes,
            self.hot_bytes,
            self.mode,
            self.lock_style,
            self.policy,
            self.flush_replicates,
            self.log_bytes_max,
            self.log_entries_max,
            self.commit_bytes_max,
            self.commit_entries_max,
            self.local_locks_max,
            self.latency_ticks,
            self.bandwidth_bytes_per_tick,
            self.link_bytes_max,
            self.host_depth,
            self.disconnect_gap_ticks,
            self.corrupt_per_mille,
            self.crash_gap_ticks,
            self.lock_gap_ticks,
            self.mode_switch_gap_ticks,
        )
    }
}

/// What happened during a run (equal for equal seeds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// The configuration the seed chose, in one line.
    pub config: String,
    /// Events processed.
    pub steps: u64,
    /// Simulated time at quiescence.
    pub ticks: u64,
    /// Host operations submitted (and completed).
    pub ops: u64,
    /// Host writes.
    pub writes: u64,
    /// Host discards.
    pub discards: u64,
    /// Host write-zeroes.
    pub write_zeroes: u64,
    /// Host flushes.
    pub flushes: u64,
    /// Frames put on the link (both directions).
    pub frames: u64,
    /// Bytes put on the link (both directions).
    pub wire_bytes: u64,
    /// Frames whose header was corrupted.
    pub corrupt_headers: u64,
    /// Frames whose payload was corrupted.
    pub corrupt_payloads: u64,
    /// NAK frames the source received.
    pub naks: u64,
    /// REJECT frames the source received.
    pub rejects: u64,
    /// GRANTED frames the source received.
    pub granted: u64,
    /// Injected disconnects.
    pub disconnects: u64,
    /// Connections reset by a receiver after a corrupted frame.
    pub resets: u64,
    /// Handshakes completed (source reached "connected").
    pub handshakes: u64,
    /// Connections the target closed on its own (a handshake past its deadline).
    pub target_closes: u64,
    /// Target crashes losing volatile data.
    pub crashes: u64,
    /// Connections of someone without the secret (silent, or with a forged AUTH).
    pub intruders: u64,
    /// Crashes where some volatile blocks reached the durable image anyway.
    pub partial_crashes: u64,
    /// Clean target restarts.
    pub clean_restarts: u64,
    /// Local locks granted on the target.
    pub local_locks: u64,
    /// Local lock attempts refused (busy or too many).
    pub local_lock_refusals: u64,
    /// Run-time mode switches.
    pub mode_switches: u64,
    /// Host operations completed while the mode was `async`.
    pub completed_async: u64,
    /// ... `received`.
    pub completed_received: u64,
    /// ... `sync`.
    pub completed_sync: u64,
    /// ... `lock-then-write`.
    pub completed_lock_then_write: u64,
    /// Host operations that waited because the rollback log was full.
    pub log_full_waits: u64,
    /// Times the target stopped reading because its commit log was full.
    pub commit_full_waits: u64,
    /// Steps during which the target reported itself inconsistent.
    pub inconsistent_steps: u64,
    /// Largest rollback log, bytes.
    pub log_bytes_peak: u64,
    /// Largest commit log, entries.
    pub commit_entries_peak: u64,
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} ops in {} steps / {} ticks; {} frames {} B; corrupt {}h/{}p; \
             nak {} reject {} granted {}; disconnect {} reset {} handshake {}; crash {} \
             (partial {}) clean-restart {}; local locks {} refused {}; mode switches {}",
            self.seed,
            self.ops,
            self.steps,
            self.ticks,
            self.frames,
            self.wire_bytes,
            self.corrupt_headers,
            self.corrupt_payloads,
            self.naks,
            self.rejects,
            self.granted,
            self.disconnects,
            self.resets,
            self.handshakes,
            self.crashes,
            self.partial_crashes,
            self.clean_restarts,
            self.local_locks,
            self.local_lock_refusals,
            self.mode_switches,
        )
    }
}

/// Runs one simulation. `Err` is the first violated invariant.
pub fn run(seed: u64, opts: &SimOptions) -> Result<SimReport, Violation> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let cfg = SimConfig::random(&mut rng);
    let config = cfg.summary();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed, opts, cfg, rng);
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
            })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToTarget,
    ToSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// The link may have a frame for a receiver (a wake-up only).
    Deliver,
    /// The host produces its next operation.
    HostArrive,
    /// The oldest operation being applied on the target is written (`target_run`: which life of
    /// the target process scheduled it; a crash starts a new one and voids older events).
    ApplyDone {
        target_run: u64,
    },
    /// The target syncs its volume.
    Fsync {
        target_run: u64,
    },
    /// Reconnect after disconnect number `conn`.
    Reconnect {
        conn: u64,
    },
    /// Injected faults (each reschedules itself while the workload runs).
    Disconnect,
    Crash,
    /// Someone who knows the volume's id but not the secret connects to the target.
    Intruder,
    LockAttempt,
    ModeSwitch,
    /// A local lock holder is done.
    LockRelease {
        key: u64,
    },
}

#[derive(Debug)]
struct Scheduled {
    tick: u64,
    order: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.tick, self.order) == (other.tick, other.order)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Reversed: BinaryHeap is a max-heap and the earliest event must come first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.tick, other.order).cmp(&(self.tick, self.order))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Corruption {
    None,
    Header,
    Payload,
}

#[derive(Debug)]
struct InFlight {
    arrive: u64,
    bytes: Vec<u8>,
    corruption: Corruption,
}

/// One direction of the connection: frames in order, with latency and bandwidth.
#[derive(Debug, Default)]
struct Link {
    frames: VecDeque<InFlight>,
    bytes: usize,
    busy_until: u64,
}

impl Link {
    fn clear(&mut self, now: u64) {
        self.frames.clear();
        self.bytes = 0;
        self.busy_until = now;
    }

    fn arrived(&self, now: u64) -> Option<&InFlight> {
        self.frames.front().filter(|f| f.arrive <= now)
    }

    fn pop(&mut self) -> Option<InFlight> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.bytes.len();
        Some(f)
    }
}

#[derive(Debug)]
struct Holder {
    key: u64,
    id: LocalLockId,
    range: Range,
    snapshot: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Local,
    Received,
    Durable,
}

struct Sim<'a> {
    seed: u64,
    opts: &'a SimOptions,
    cfg: SimConfig,
    config: String,
    rng: fastrand::Rng,
    now: u64,
    step: u64,
    order: u64,
    queue: BinaryHeap<Scheduled>,
    max_steps: u64,

    source: Source,
    target: Target,
    target_cfg: TargetConfig,

    /// The source volume (every submitted operation applied).
    src_vol: Vec<u8>,
    initial: Vec<u8>,
    /// Operation `seq` is `ops[seq - 1]`.
    ops: Vec<Op>,

    /// The target volume: what reads return, and what survives a crash.
    volume: FaultyVolume,
    /// The durable sequence number the target driver recorded (survives crashes).
    persisted: Seq,
    /// Replay of operations `1..=shadow_seq`.
    shadow: Vec<u8>,
    shadow_seq: Seq,
    /// Replay of operations `1..=persisted`.
    durable_shadow: Vec<u8>,
    durable_shadow_seq: Seq,
    /// Byte ranges of `view` or `shadow` changed since the last check.
    touched: Vec<(usize, usize)>,
    /// Check blocks where `view` differs from `shadow`.
    differs: BTreeSet<usize>,
    /// Highest sequence number the target ever reported received.
    received_high: Seq,

    s2t: Link,
    t2s: Link,
    link_up: bool,
    /// Incremented at each disconnect; a reconnect event carries the value it was made for.
    conn: u64,
    /// The source's connection lifecycle, the policy the daemon runs (only its reconnect
    /// backoff matters here: the simulated link is never silent).
    session: SourceSession,
    next_intruder: u64,
    was_connected: bool,

    /// The target's group commit, the same planner the target server runs.
    commit: GroupCommit,
    /// The batch out, and its operations not yet written (in order).
    batch: Option<Batch>,
    /// Last operation written to the target's (volatile) volume: the engine hears of a batch only
    /// once it is done, so this runs ahead of the engine's applied seq.
    written: Seq,
    applying: VecDeque<Apply>,
    apply_busy_until: u64,
    /// Which life of the target process this is: a crash starts the next, and events scheduled
    /// by an earlier life are ignored.
    target_run: u64,

    next_op: usize,
    parked: Option<Op>,
    outstanding: usize,
    completed: usize,
    faults_on: bool,
    log_full_noted: bool,
    commit_full_noted: bool,

    holders: Vec<Holder>,
    next_holder_key: u64,

    report: SimReport,
}

type Step<T> = Result<T, Violation>;

impl<'a> Sim<'a> {
    fn new(seed: u64, opts: &'a SimOptions, cfg: SimConfig, mut rng: fastrand::Rng) -> Sim<'a> {
        let mut volume_id = [0u8; 16];
        rng.fill(&mut volume_id);
        let mut secret = vec![0u8; 32];
        rng.fill(&mut secret);
        let volume_len = usize::try_from(cfg.volume_bytes).unwrap_or(0);
        let mut initial = vec![0u8; volume_len];
        rng.fill(&mut initial);
        let source_cfg = SourceConfig {
            volume_id: VolumeId(volume_id),
            node_id: NodeId(1),
            generation: Generation(1),
            volume_bytes: cfg.volume_bytes,
            block_bytes: cfg.block_bytes,
            secret: secret.clone(),
            mode: cfg.mode,
            flush_replicates: cfg.flush_replicates,
            lock_style: cfg.lock_style,
            log_bytes_max: cfg.log_bytes_max,
            log_entries_max: cfg.log_entries_max,
        };
        let target_cfg = TargetConfig {
            volume_id: VolumeId(volume_id),
            node_id: NodeId(2),
            generation: Generation(1),
            volume_bytes: cfg.volume_bytes,
            block_bytes: cfg.block_bytes,
            secret,
            conflict_policy: cfg.policy,
            commit_log_bytes_max: cfg.commit_bytes_max,
            commit_log_entries_max: cfg.commit_entries_max,
            local_locks_max: cfg.local_locks_max,
            // A handshake is three one-way trips on a link the connect has just cleared.
            handshake_timeout_ns: (cfg.latency_ticks * 8 + 1_000) * TICK_NS,
            handshakes_max: HANDSHAKES_MAX_DEFAULT,
        };
        let ops_u64 = u64::try_from(opts.ops).unwrap_or(u64::MAX);
        let max_steps = if opts.max_steps > 0 {
            opts.max_steps
        } else {
            200_000u64.saturating_add(ops_u64.saturating_mul(2_000))
        };
        let config = cfg.summary();
        let report = SimReport {
            seed,
            config: config.clone(),
            ..SimReport::default()
        };
        Sim {
            seed,
            opts,
            config,
            rng,
            now: 0,
            step: 0,
            order: 0,
            queue: BinaryHeap::new(),
            max_steps,
            source: new_source(source_cfg, opts),
            target: new_target(
                target_cfg.clone(),
                Restored {
                    durable: Seq::NONE,
                    clean: true,
                },
                opts,
            ),
            target_cfg,
            src_vol: initial.clone(),
            ops: Vec::with_capacity(opts.ops),
            volume: FaultyVolume::new(initial.clone()),
            persisted: Seq::NONE,
            shadow: initial.clone(),
            shadow_seq: Seq::NONE,
            durable_shadow: initial.clone(),
            durable_shadow_seq: Seq::NONE,
            initial,
            touched: Vec::new(),
            differs: BTreeSet::new(),
            received_high: Seq::NONE,
            s2t: Link::default(),
            t2s: Link::default(),
            link_up: false,
            conn: 0,
            session: new_session(&cfg, seed, opts),
            next_intruder: 0,
            was_connected: false,
            commit: new_commit(&cfg, opts),
            batch: None,
            written: Seq::NONE,
            applying: VecDeque::new(),
            apply_busy_until: 0,
            target_run: 0,
            next_op: 0,
            parked: None,
            outstanding: 0,
            completed: 0,
            faults_on: opts.ops > 0,
            log_full_noted: false,
            commit_full_noted: false,
            holders: Vec::new(),
            next_holder_key: 1,
            report,
            cfg,
        }
    }

    fn violation(&self, check: Check, message: String) -> Violation {
        Violation {
            seed: self.seed,
            ops: self.opts.ops,
            step: self.step,
            tick: self.now,
            check,
            message,
            config: self.config.clone(),
        }
    }

    fn schedule(&mut self, tick: u64, event: Event) {
        self.order += 1;
        self.queue.push(Scheduled {
            tick,
            order: self.order,
            event,
        });
    }

    fn schedule_gap(&mut self, mean: u64, event: Event) {
        if mean > 0 {
            let gap = self.rng.u64(1..=mean.saturating_mul(2));
            self.schedule(self.now + gap, event);
        }
    }

    fn run(&mut self) -> Step<SimReport> {
        self.connect();
        if self.opts.ops > 0 {
            self.schedule(0, Event::HostArrive);
        }
        self.schedule_gap(self.cfg.disconnect_gap_ticks, Event::Disconnect);
        self.schedule_gap(self.cfg.crash_gap_ticks, Event::Crash);
        self.schedule_gap(self.cfg.lock_gap_ticks, Event::LockAttempt);
        self.schedule_gap(self.cfg.mode_switch_gap_ticks, Event::ModeSwitch);
        self.pump()?;
        self.check()?;
        loop {
            if self.quiescent()? {
                self.report.steps = self.step;
                self.report.ticks = self.now;
                self.report.ops = u64::try_from(self.ops.len()).unwrap_or(u64::MAX);
                return Ok(std::mem::take(&mut self.report));
            }
            let Some(next) = self.queue.pop() else {
                return Err(self.violation(Check::NoProgress, self.stuck("nothing left to do")));
            };
            self.step += 1;
            if self.step > self.max_steps {
                return Err(self.violation(
                    Check::NoProgress,
                    self.stuck(&format!("step bound {} exceeded", self.max_steps)),
                ));
            }
            self.now = next.tick;
            self.handle(next.event)?;
            self.pump()?;
            self.check()?;
        }
    }

    fn stuck(&self, why: &str) -> String {
        let s = self.source.status();
        let t = self.target.status();
        format!(
            "{why}: {} of {} host ops submitted, {} completed, parked {}; source {:?}; target \
             {:?}; link up {} s2t {} frames t2s {} frames; holders {}; applying {}",
            self.ops.len(),
            self.opts.ops,
            self.completed,
            self.parked.is_some(),
            s,
            t,
            self.link_up,
            self.s2t.frames.len(),
            self.t2s.frames.len(),
            self.holders.len(),
            self.applying.len(),
        )
    }

    // ----- events -----

    fn handle(&mut self, event: Event) -> Step<()> {
        match event {
            Event::Deliver => {}
            Event::HostArrive => {
                if self.parked.is_none() && self.next_op < self.opts.ops {
                    let op = self.gen_op();
                    self.next_op += 1;
                    self.parked = Some(op);
                    self.log_full_noted = false;
                }
            }
            Event::ApplyDone { target_run } => {
                if target_run == self.target_run {
                    self.apply_done();
                }
            }
            Event::Fsync { target_run } => {
                if let Some(seq) = self.batch.as_ref().and_then(|b| b.sync) {
                    if target_run == self.target_run {
                        self.fsync(seq);
                        self.batch_done();
                    }
                }
            }
            Event::Reconnect { conn } => {
                if conn == self.conn && !self.link_up {
                    let due = self.session.handle_timeout(self.now * TICK_NS);
                    if due == Some(SessionAction::Connect) {
                        self.session.on_connecting();
                        self.connect();
                    }
                }
            }
            Event::Disconnect => {
                if self.faults_on {
                    if self.link_up {
                        self.report.disconnects += 1;
                        self.disconnect();
                    }
                    self.schedule_gap(self.cfg.disconnect_gap_ticks, Event::Disconnect);
                }
            }
            Event::Crash => {
                if self.faults_on {
                    self.crash();
                    self.schedule_gap(self.cfg.crash_gap_ticks, Event::Crash);
                    // Most telling while the restarted target is inconsistent.
                    let soon = self
                        .rng
                        .u64(0..=2 * self.cfg.latency_ticks + self.cfg.reconnect_ticks_max);
                    self.schedule(self.now + soon, Event::Intruder);
                }
            }
            Event::Intruder => self.intruder()?,
            Event::LockAttempt => {
                if self.faults_on {
                    self.lock_attempt()?;
                    self.schedule_gap(self.cfg.lock_gap_ticks, Event::LockAttempt);
                }
            }
            Event::ModeSwitch => {
                if self.faults_on {
                    let mode = Mode::ALL[self.rng.usize(0..Mode::ALL.len())];
                    self.source.set_mode(mode);
                    // Completions the switch released count under the mode that released them.
                    self.completions()?;
                    if self.rng.u32(0..4) == 0 {
                        let on = !self.source.config().flush_replicates;
                        self.source.set_flush_replicates(on);
                    }
                    self.report.mode_switches += 1;
                    self.schedule_gap(self.cfg.mode_switch_gap_ticks, Event::ModeSwitch);
                }
            }
            Event::LockRelease { key } => self.lock_release(key)?,
        }
        Ok(())
    }

    fn gen_op(&mut self) -> Op {
        let block = u64::from(self.cfg.block_bytes);
        let blocks_total = self.cfg.volume_bytes / block;
        let len_blocks = if self.rng.u32(0..4) == 0 {
            self.rng.u64(1..=self.cfg.op_bytes_max / block)
        } else {
            self.rng.u64(1..=(self.cfg.op_bytes_max / block).min(2))
        };
        let mut first = if self.rng.u32(0..100) < 60 {
            self.cfg.hot_offset_bytes / block + self.rng.u64(0..self.cfg.hot_bytes / block)
        } else {
            self.rng.u64(0..blocks_total)
        };
        first = first.min(blocks_total - len_blocks);
        let lba = Lba::from_bytes(first * block);
        let len_bytes = u32::try_from(len_blocks * block).unwrap_or(u32::MAX);
        match self.rng.u32(0..100) {
            0..=69 => {
                self.report.writes += 1;
                let mut data = vec![0u8; len_bytes as usize];
                self.rng.fill(&mut data);
                Op::Write {
                    lba,
                    data: Bytes::from(data),
                }
            }
            70..=79 => {
                self.report.discards += 1;
                Op::Discard { lba, len_bytes }
            }
            80..=87 => {
                self.report.write_zeroes += 1;
                Op::WriteZeroes { lba, len_bytes }
            }
            _ => {
                self.report.flushes += 1;
                Op::Flush
            }
        }
    }

    fn connect(&mut self) {
        let mut nonce_t = [0u8; MAC_BYTES];
        let mut nonce_s = [0u8; MAC_BYTES];
        self.rng.fill(&mut nonce_t);
        self.rng.fill(&mut nonce_s);
        self.s2t.clear(self.now);
        self.t2s.clear(self.now);
        if let Err(e) = self
            .target
            .on_connect(ConnId(self.conn), nonce_t, self.now * TICK_NS)
        {
            unreachable!("the simulator's only connection was refused: {e}");
        }
        self.source.on_connect(nonce_s);
        self.session.on_connected(self.now * TICK_NS);
        self.link_up = true;
        self.was_connected = false;
    }

    fn disconnect(&mut self) {
        if !self.link_up {
            return;
        }
        self.link_up = false;
        self.s2t.clear(self.now);
        self.t2s.clear(self.now);
        self.source.on_disconnect();
        self.target.on_disconnect(ConnId(self.conn));
        self.conn += 1;
        // The source's reconnect policy decides when (backoff with jitter, as the daemon's).
        self.session.on_lost(self.now * TICK_NS);
        let at_ns = self.session.poll_timeout().unwrap_or(self.now * TICK_NS);
        let at = at_ns.div_ceil(TICK_NS).max(self.now + 1);
        self.schedule(at, Event::Reconnect { conn: self.conn });
    }

    fn crash(&mut self) {
        self.disconnect();
        self.holders.clear();
        let clean = self.rng.u32(0..4) == 0 && self.target.status().consistent;
        if clean {
            // A clean shutdown finishes the batch out, syncs what was applied and records that
            // it stopped cleanly.
            while !self.applying.is_empty() {
                self.apply_done();
            }
            self.batch_done();
            let applied = self.target.applied();
            self.fsync(applied);
            self.report.clean_restarts += 1;
        } else {
            self.report.crashes += 1;
            let keep_percent = match self.rng.u32(0..3) {
                0 => 0,
                1 => 100,
                _ => self.rng.u32(1..100),
            };
            let rng = &mut self.rng;
            let loss = self.volume.crash(&mut || rng.u32(0..100) < keep_percent);
            if loss.kept_blocks > 0 {
                self.report.partial_crashes += 1;
            }
        }
        self.touched.push((0, self.initial.len()));
        self.applying.clear();
        self.written = self.persisted;
        self.batch = None;
        self.commit = new_commit(&self.cfg, self.opts);
        self.target_run += 1;
        // The driver's record, through its bytes, and the recovery rule the target server runs.
        let record = MetaRecord {
            durable: self.persisted,
            clean,
            ..MetaRecord::new(self.target_cfg.volume_id, self.target_cfg.volume_bytes)
        };
        let (record, _) = MetaRecord::decode_file(&record.encode_file(self.target_run))
            .unwrap_or_else(|e| panic!("the metadata record does not read back: {e}"));
        let facts = VolumeFacts {
            volume_id: self.target_cfg.volume_id,
            volume_bytes: self.target_cfg.volume_bytes,
            created: false,
        };
        let (restored, _) = recover_with(Some(&record), &facts, self.opts.recovery_sabotage)
            .unwrap_or_else(|e| panic!("recovery refused the target's own metadata: {e}"));
        self.target = new_target(self.target_cfg.clone(), restored, self.opts);
    }

    /// A connection from someone without the secret: either silent (the target's handshake
    /// deadline closes it) or a HELLO that names a last seq of 0 followed by a forged AUTH. The
    /// target must refuse it and change nothing; it must never keep the real source out.
    fn intruder(&mut self) -> Step<()> {
        self.report.intruders += 1;
        self.next_intruder += 1;
        let conn = ConnId(INTRUDER_CONN_BASE + self.next_intruder);
        let mut nonce = [0u8; MAC_BYTES];
        self.rng.fill(&mut nonce);
        if self
            .target
            .on_connect(conn, nonce, self.now * TICK_NS)
            .is_err()
        {
            self.target.on_disconnect(conn);
            return Ok(());
        }
        if self.rng.bool() {
            // Silent: left open until the deadline.
            return Ok(());
        }
        let hello = Frame::Hello(wire::Hello {
            volume_id: self.target_cfg.volume_id,
            node_id: NodeId(1),
            generation: Generation(1),
            last_seq: Seq::NONE,
            volume_bytes: self.target_cfg.volume_bytes,
            block_bytes: self.target_cfg.block_bytes,
            nonce,
            mac: [0; MAC_BYTES],
        });
        let answered = self.target.handle_frame(conn, hello);
        let refused = self.target.handle_frame(
            conn,
            Frame::Auth {
                mac: [0; MAC_BYTES],
            },
        );
        while self.target.poll_transmit(conn).is_some() {}
        self.target.on_disconnect(conn);
        if answered.is_err() || refused.is_ok() {
            return Err(self.violation(
                Check::Protocol,
                format!("an intruder's HELLO gave {answered:?} and its forged AUTH {refused:?}"),
            ));
        }
        Ok(())
    }

    fn lock_attempt(&mut self) -> Step<()> {
        let block = u64::from(self.cfg.block_bytes);
        let blocks_total = self.cfg.volume_bytes / block;
        let len_blocks = self.rng.u64(1..=(16_384 / block).max(1)).min(blocks_total);
        let mut first = if self.rng.u32(0..100) < 70 {
            self.cfg.hot_offset_bytes / block + self.rng.u64(0..self.cfg.hot_bytes / block)
        } else {
            self.rng.u64(0..blocks_total)
        };
        first = first.min(blocks_total - len_blocks);
        let range = Range::new(first * block, len_blocks * block);
        match self.target.try_lock_local(range) {
            Ok(id) => {
                self.report.local_locks += 1;
                let key = self.next_holder_key;
                self.next_holder_key += 1;
                let snapshot = self.volume.with_view(|v| v[byte_range(range)].to_vec());
                self.holders.push(Holder {
                    key,
                    id,
                    range,
                    snapshot,
                });
                let hold = self.rng.u64(1..=self.cfg.lock_hold_ticks_max);
                self.schedule(self.now + hold, Event::LockRelease { key });
                Ok(())
            }
            Err(LockError::Busy | LockError::TooMany) => {
                self.report.local_lock_refusals += 1;
                Ok(())
            }
            Err(e) => Err(self.violation(
                Check::Protocol,
                format!("local lock on {range:?} refused: {e}"),
            )),
        }
    }

    fn lock_release(&mut self, key: u64) -> Step<()> {
        let Some(index) = self.holders.iter().position(|h| h.key == key) else {
            // The target crashed meanwhile; the holder went with it.
            return Ok(());
        };
        self.check_holders()?;
        let holder = self.holders.remove(index);
        if !self.target.unlock_local(holder.id) {
            return Err(self.violation(
                Check::LocalLock,
                format!("local lock {:?} was not held at release", holder.id),
            ));
        }
        Ok(())
    }

    /// One operation of the batch out is written (to the volatile view).
    fn apply_done(&mut self) {
        let Some(apply) = self.applying.pop_front() else {
            return;
        };
        self.written = apply.seq;
        if let Err(e) = storage::apply(&self.volume, &apply.op) {
            // The engine checked the extent and no fault is injected: a bug of the simulator.
            panic!("applying seq {}: {e}", apply.seq);
        }
        if let Some(r) = apply.op.range() {
            let r = byte_range(r);
            self.touched.push((r.start, r.end));
        }
        if self.applying.is_empty() {
            self.batch_written();
        }
    }

    /// Every operation of the batch out is written: sync it if it says so, else it is done.
    fn batch_written(&mut self) {
        match self.batch.as_ref().and_then(|b| b.sync) {
            Some(_) => {
                let delay = self.rng.u64(0..=self.cfg.fsync_ticks_max);
                self.schedule(
                    self.now + delay,
                    Event::Fsync {
                        target_run: self.target_run,
                    },
                );
            }
            None => self.batch_done(),
        }
    }

    fn batch_done(&mut self) {
        if let Some(batch) = self.batch.take() {
            self.commit.handle_done(&mut self.target, &batch);
        }
    }

    /// The volume is synced: what was written is durable, and `seq` is recorded as durable.
    fn fsync(&mut self, seq: Seq) {
        if let Err(e) = self.volume.sync() {
            panic!("sync of seq {seq}: {e}");
        }
        self.persisted = seq;
        advance(
            &mut self.durable_shadow,
            &mut self.durable_shadow_seq,
            seq,
            &self.ops,
            &self.initial,
        );
    }

    // ----- pumping the engines -----

    fn pump(&mut self) -> Step<()> {
        self.target.handle_timeout(self.now * TICK_NS);
        while let Some((conn, _)) = self.target.poll_close() {
            if conn == ConnId(self.conn) && self.link_up {
                self.report.target_closes += 1;
                self.disconnect();
            }
        }
        for _ in 0..PUMP_ROUNDS_MAX {
            let mut progress = self.host_submit()?;
            progress |= self.source_send();
            progress |= self.target_send();
            progress |= self.target_receive()?;
            progress |= self.source_receive()?;
            progress |= self.target_apply();
            progress |= self.completions()?;
            if self.source.status().conn == crate::source::ConnState::Connected
                && !self.was_connected
            {
                self.was_connected = true;
                self.session.on_authenticated();
                self.report.handshakes += 1;
            }
            if !progress {
                return Ok(());
            }
        }
        Err(self.violation(
            Check::NoProgress,
            self.stuck("the engines keep producing work within one instant"),
        ))
    }

    fn host_submit(&mut self) -> Step<bool> {
        let Some(op) = self.parked.as_ref() else {
            return Ok(false);
        };
        if self.outstanding >= self.cfg.host_depth {
            return Ok(false);
        }
        if !self.source.has_room(op.payload_bytes()) {
            if !self.log_full_noted {
                self.log_full_noted = true;
                self.report.log_full_waits += 1;
            }
            return Ok(false);
        }
        let Some(op) = self.parked.take() else {
            return Ok(false);
        };
        storage::apply_to_image(&mut self.src_vol, &op);
        let seq = match self.source.submit(op.clone(), self.now * TICK_NS) {
            Ok(seq) => seq,
            Err(e) => {
                return Err(self.violation(Check::Protocol, format!("source refused {op:?}: {e}")))
            }
        };
        self.ops.push(op);
        let expected = u64::try_from(self.ops.len()).unwrap_or(u64::MAX);
        if seq != Seq(expected) {
            return Err(self.violation(
                Check::Protocol,
                format!("submit returned seq {seq}, expected {expected}"),
            ));
        }
        self.outstanding += 1;
        if self.next_op < self.opts.ops {
            let gap = self.rng.u64(0..=self.cfg.op_gap_ticks_max);
            self.schedule(self.now + gap, Event::HostArrive);
        } else {
            // The workload is over: faults stop, and the run must reach quiescence.
            self.faults_on = false;
        }
        Ok(true)
    }

    fn send(&mut self, dir: Dir, frame: &Encoded) {
        let mut bytes = frame.to_vec();
        let mut corruption = Corruption::None;
        if self.faults_on && self.rng.u32(0..1000) < self.cfg.corrupt_per_mille {
            let payload = bytes.len() - HEADER_BYTES;
            let at = if payload > 0 && self.rng.bool() {
                corruption = Corruption::Payload;
                self.report.corrupt_payloads += 1;
                HEADER_BYTES + self.rng.usize(0..payload)
            } else {
                corruption = Corruption::Header;
                self.report.corrupt_headers += 1;
                self.rng.usize(0..HEADER_BYTES)
            };
            bytes[at] ^= self.rng.u8(1..=255);
        }
        self.report.frames += 1;
        self.report.wire_bytes += u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let bw = self.cfg.bandwidth_bytes_per_tick;
        let wire_ticks = u64::try_from(bytes.len()).unwrap_or(u64::MAX).div_ceil(bw);
        let latency = self.cfg.latency_ticks;
        let now = self.now;
        let link = match dir {
            Dir::ToTarget => &mut self.s2t,
            Dir::ToSource => &mut self.t2s,
        };
        let depart = link.busy_until.max(now) + wire_ticks;
        link.busy_until = depart;
        let arrive = depart + latency;
        link.bytes += bytes.len();
        link.frames.push_back(InFlight {
            arrive,
            bytes,
            corruption,
        });
        self.schedule(arrive, Event::Deliver);
    }

    fn source_send(&mut self) -> bool {
        let mut progress = false;
        while self.link_up && self.s2t.bytes < self.cfg.link_bytes_max {
            let Some(frame) = self.source.poll_transmit() else {
                break;
            };
            self.send(Dir::ToTarget, &frame.encode());
            progress = true;
        }
        progress
    }

    fn target_send(&mut self) -> bool {
        let mut progress = false;
        while self.link_up && self.t2s.bytes < self.cfg.link_bytes_max {
            let Some(frame) = self.target.poll_transmit(ConnId(self.conn)) else {
                break;
            };
            self.send(Dir::ToSource, &frame.encode());
            progress = true;
        }
        progress
    }

    /// A receiver closed the connection after a corrupted frame it could not repair.
    fn reset(&mut self) {
        self.report.resets += 1;
        self.disconnect();
    }

    fn target_receive(&mut self) -> Step<bool> {
        let mut progress = false;
        while self.link_up {
            let Some(front) = self.s2t.arrived(self.now) else {
                break;
            };
            if let Ok(header) = wire::decode_header(&front.bytes) {
                if !self.target.has_room(header.payload_len as usize) {
                    if !self.commit_full_noted {
                        self.commit_full_noted = true;
                        self.report.commit_full_waits += 1;
                    }
                    break;
                }
            }
            self.commit_full_noted = false;
            let Some(frame) = self.s2t.pop() else { break };
            progress = true;
            match wire::decode(&frame.bytes) {
                Ok(Some((decoded, used))) => {
                    if frame.corruption != Corruption::None || used != frame.bytes.len() {
                        return Err(self.violation(
                            Check::Protocol,
                            format!(
                                "{:?} corruption of a frame to the target went undetected \
                                 ({decoded:?})",
                                frame.corruption
                            ),
                        ));
                    }
                    if let Err(e) = self.target.handle_frame(ConnId(self.conn), decoded) {
                        return Err(self.violation(
                            Check::Protocol,
                            format!("target closed the connection: {e}"),
                        ));
                    }
                }
                Ok(None) => {
                    return Err(self.violation(
                        Check::Protocol,
                        "a whole frame decoded as incomplete".into(),
                    ))
                }
                Err(err) => {
                    if frame.corruption == Corruption::None {
                        return Err(self.violation(
                            Check::Protocol,
                            format!("an intact frame failed to decode: {err}"),
                        ));
                    }
                    let repairable = err.nak_seq().is_some();
                    match self.target.handle_wire_error(ConnId(self.conn), &err) {
                        Ok(()) if repairable => {}
                        Ok(()) => {
                            return Err(self.violation(
                                Check::Protocol,
                                format!("target kept a connection after unrepairable {err}"),
                            ))
                        }
                        Err(e) if repairable => {
                            return Err(self.violation(
                                Check::Protocol,
                                format!("target closed instead of NAKing ({err}): {e}"),
                            ))
                        }
                        Err(_) => {
                            self.reset();
                            return Ok(true);
                        }
                    }
                }
            }
            self.received_high = self.received_high.max(self.target.status().received);
        }
        Ok(progress)
    }

    fn source_receive(&mut self) -> Step<bool> {
        let mut progress = false;
        while self.link_up {
            if self.t2s.arrived(self.now).is_none() {
                break;
            }
            let Some(frame) = self.t2s.pop() else { break };
            progress = true;
            match wire::decode(&frame.bytes) {
                Ok(Some((decoded, used))) => {
                    if frame.corruption != Corruption::None || used != frame.bytes.len() {
                        return Err(self.violation(
                            Check::Protocol,
                            format!(
                                "{:?} corruption of a frame to the source went undetected \
                                 ({decoded:?})",
                                frame.corruption
                            ),
                        ));
                    }
                    match &decoded {
                        Frame::Nak { .. } => self.report.naks += 1,
                        Frame::Reject { .. } => self.report.rejects += 1,
                        Frame::Granted { .. } => self.report.granted += 1,
                        _ => {}
                    }
                    if let Err(e) = self.source.handle_frame(decoded) {
                        return Err(self.violation(
                            Check::Protocol,
                            format!("source closed the connection: {e}"),
                        ));
                    }
                    self.check_log()?;
                }
                Ok(None) => {
                    return Err(self.violation(
                        Check::Protocol,
                        "a whole frame decoded as incomplete".into(),
                    ))
                }
                Err(err) => {
                    if frame.corruption == Corruption::None {
                        return Err(self.violation(
                            Check::Protocol,
                            format!("an intact frame failed to decode: {err}"),
                        ));
                    }
                    // The source cannot repair anything it receives: it closes the connection.
                    self.reset();
                    return Ok(true);
                }
            }
        }
        Ok(progress)
    }

    /// Takes the planner's next batch and schedules its writes, one after another.
    fn target_apply(&mut self) -> bool {
        let Some(batch) = self.commit.poll_batch(&mut self.target) else {
            return false;
        };
        for apply in &batch.ops {
            let t =
                self.apply_busy_until.max(self.now) + self.rng.u64(0..=self.cfg.apply_ticks_max);
            self.apply_busy_until = t;
            self.applying.push_back(apply.clone());
            self.schedule(
                t,
                Event::ApplyDone {
                    target_run: self.target_run,
                },
            );
        }
        let empty = batch.ops.is_empty();
        self.batch = Some(batch);
        if empty {
            self.batch_written();
        }
        true
    }

    fn completions(&mut self) -> Step<bool> {
        let mut progress = false;
        while let Some(seq) = self.source.poll_completion() {
            progress = true;
            self.outstanding = self.outstanding.saturating_sub(1);
            self.completed += 1;
            let cfg = self.source.config();
            let (mode, flush_replicates) = (cfg.mode, cfg.flush_replicates);
            match mode {
                Mode::Async => self.report.completed_async += 1,
                Mode::Received => self.report.completed_received += 1,
                Mode::Sync => self.report.completed_sync += 1,
                Mode::LockThenWrite => self.report.completed_lock_then_write += 1,
            }
            let Some(op) = usize::try_from(seq.0)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| self.ops.get(i))
            else {
                return Err(
                    self.violation(Check::Protocol, format!("completion of unknown seq {seq}"))
                );
            };
            let needs = match (mode, *op == Op::Flush) {
                (Mode::Sync | Mode::LockThenWrite, _) => Needs::Durable,
                (_, true) if flush_replicates => Needs::Durable,
                (_, true) | (Mode::Async, false) => Needs::Local,
                (Mode::Received, false) => Needs::Received,
            };
            match needs {
                Needs::Local => {}
                Needs::Received => {
                    if seq > self.received_high {
                        return Err(self.violation(
                            Check::AckedReceived,
                            format!(
                                "seq {seq} completed in mode {mode} but the target received \
                                 only through {}",
                                self.received_high
                            ),
                        ));
                    }
                }
                Needs::Durable => {
                    if seq > self.persisted {
                        return Err(self.violation(
                            Check::AckedDurable,
                            format!(
                                "seq {seq} ({}) completed in mode {mode} (flush_replicates \
                                 {flush_replicates}) but the target is durable only through {}",
                                op_name(op),
                                self.persisted
                            ),
                        ));
                    }
                    if let Some(r) = op.range() {
                        let r = byte_range(r);
                        let differs = self
                            .volume
                            .with_durable(|d| d[r.clone()] != self.durable_shadow[r.clone()]);
                        if self.target.status().consistent && differs {
                            return Err(self.violation(
                                Check::AckedDurable,
                                format!(
                                    "seq {seq} completed in mode {mode}, but the durable image \
                                     at {}+{} is not the replay through seq {}",
                                    r.start,
                                    r.len(),
                                    self.persisted
                                ),
                            ));
                        }
                    }
                }
            }
        }
        Ok(progress)
    }

    // ----- checkers -----

    fn check(&mut self) -> Step<()> {
        // (a) prefix: advance the shadow to what the driver wrote, then compare what changed.
        let applied = self.written;
        if applied < self.shadow_seq {
            self.shadow.copy_from_slice(&self.initial);
            self.shadow_seq = Seq::NONE;
            self.touched.push((0, self.shadow.len()));
        }
        if applied > self.shadow_seq {
            let from = usize::try_from(self.shadow_seq.0).unwrap_or(usize::MAX);
            let to = usize::try_from(applied.0).unwrap_or(usize::MAX);
            if to > self.ops.len() {
                return Err(self.violation(
                    Check::Prefix,
                    format!(
                        "target applied seq {applied} but only {} operations exist",
                        self.ops.len()
                    ),
                ));
            }
            for op in &self.ops[from..to] {
                if let Some(r) = op.range() {
                    let r = byte_range(r);
                    self.touched.push((r.start, r.end));
                }
            }
            advance(
                &mut self.shadow,
                &mut self.shadow_seq,
                applied,
                &self.ops,
                &self.initial,
            );
        }
        let touched = std::mem::take(&mut self.touched);
        let (shadow, differs) = (&self.shadow, &mut self.differs);
        self.volume.with_view(|view| {
            for &(start, end) in &touched {
                let first = start / CHECK_BLOCK_BYTES;
                let last = end.div_ceil(CHECK_BLOCK_BYTES);
                for b in first..last {
                    let r = b * CHECK_BLOCK_BYTES..(b + 1) * CHECK_BLOCK_BYTES;
                    if view[r.clone()] == shadow[r] {
                        differs.remove(&b);
                    } else {
                        differs.insert(b);
                    }
                }
            }
        });
        let status = self.target.status();
        if !status.consistent {
            self.report.inconsistent_steps += 1;
        } else if let Some(&b) = self.differs.iter().next() {
            return Err(self.violation(
                Check::Prefix,
                format!(
                    "target reports consistent with seq {applied} written, but its volume \
                     differs from the replay of ops 1..={applied} at byte {} ({} of {} check \
                     blocks differ)",
                    b * CHECK_BLOCK_BYTES,
                    self.differs.len(),
                    self.initial.len() / CHECK_BLOCK_BYTES
                ),
            ));
        }
        // (f) local lock holders, over what changed.
        if touched.iter().any(|&(s, e)| {
            self.holders.iter().any(|h| {
                let r = byte_range(h.range);
                s < r.end && r.start < e
            })
        }) {
            self.check_holders()?;
        }
        self.received_high = self.received_high.max(status.received);
        self.check_log()?;
        self.check_memory()
    }

    fn check_holders(&self) -> Step<()> {
        for h in &self.holders {
            let r = byte_range(h.range);
            let changed = self.volume.with_view(|view| {
                view[r.clone()]
                    .iter()
                    .zip(&h.snapshot)
                    .position(|(a, b)| a != b)
            });
            if let Some(at) = changed {
                return Err(self.violation(
                    Check::LocalLock,
                    format!(
                        "local lock {:?} on {}+{} saw byte {} change while held",
                        h.id,
                        r.start,
                        r.len(),
                        r.start + at
                    ),
                ));
            }
        }
        Ok(())
    }

    /// (c) nothing leaves the rollback log before the target made it durable.
    fn check_log(&self) -> Step<()> {
        let last_local = self.source.status().last_local;
        let log = self.source.log();
        let durable = self.persisted;
        match log.first_seq() {
            Some(first) => {
                if first > durable.next() {
                    return Err(self.violation(
                        Check::RollbackLog,
                        format!(
                            "rollback log starts at seq {first} but the target is durable only \
                             through {durable}"
                        ),
                    ));
                }
                let len = u64::try_from(log.len()).unwrap_or(u64::MAX);
                if first.0 + len - 1 != last_local.0 {
                    return Err(self.violation(
                        Check::RollbackLog,
                        format!(
                            "rollback log holds {len} entries from seq {first}, the last local \
                             seq is {last_local}"
                        ),
                    ));
                }
            }
            None => {
                if last_local > durable {
                    return Err(self.violation(
                        Check::RollbackLog,
                        format!(
                            "rollback log is empty but seqs ({durable}, {last_local}] are not \
                             durable on the target"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// (d) every log and queue within its bound.
    fn check_memory(&mut self) -> Step<()> {
        let s = self.source.status();
        let t = self.target.status();
        self.report.log_bytes_peak = self
            .report
            .log_bytes_peak
            .max(u64::try_from(s.log_bytes).unwrap_or(u64::MAX));
        self.report.commit_entries_peak = self
            .report
            .commit_entries_peak
            .max(u64::try_from(t.commit_log_entries).unwrap_or(u64::MAX));
        let op_max = usize::try_from(self.cfg.op_bytes_max).unwrap_or(usize::MAX);
        // A sender takes one more frame while under its bound: at most one largest frame over.
        let s2t_max = self.cfg.link_bytes_max + HEADER_BYTES + op_max.max(HELLO_PAYLOAD_BYTES);
        let t2s_max = self.cfg.link_bytes_max + HEADER_BYTES + HELLO_PAYLOAD_BYTES;
        let (mirror_locks, local_locks) = self.target.lock_counts();
        let checks = [
            (
                s.log_bytes <= self.cfg.log_bytes_max,
                format!(
                    "rollback log {} bytes > {}",
                    s.log_bytes, self.cfg.log_bytes_max
                ),
            ),
            (
                s.log_entries <= self.cfg.log_entries_max,
                format!(
                    "rollback log {} entries > {}",
                    s.log_entries, self.cfg.log_entries_max
                ),
            ),
            (
                t.commit_log_bytes <= self.cfg.commit_bytes_max,
                format!(
                    "commit log {} bytes > {}",
                    t.commit_log_bytes, self.cfg.commit_bytes_max
                ),
            ),
            (
                // Entries waiting for their data are bounded apart, by the protocol.
                t.commit_log_entries <= self.cfg.commit_entries_max + LOCKS_AHEAD_MAX,
                format!(
                    "commit log {} entries > {} + {LOCKS_AHEAD_MAX}",
                    t.commit_log_entries, self.cfg.commit_entries_max
                ),
            ),
            (
                self.s2t.bytes <= s2t_max,
                format!("source->target link {} bytes > {s2t_max}", self.s2t.bytes),
            ),
            (
                self.t2s.bytes <= t2s_max,
                format!("target->source link {} bytes > {t2s_max}", self.t2s.bytes),
            ),
            (
                // Each entry holds at most one lock or waiter, plus the rejected lock pending.
                mirror_locks <= 2 * (self.cfg.commit_entries_max + LOCKS_AHEAD_MAX) + 2,
                format!("{mirror_locks} mirror locks and waiters"),
            ),
            (
                local_locks <= self.cfg.local_locks_max,
                format!("{local_locks} local locks > {}", self.cfg.local_locks_max),
            ),
            (
                self.source.pending_count() <= self.cfg.host_depth,
                format!(
                    "source tracks {} host operations, the host has at most {} in flight",
                    self.source.pending_count(),
                    self.cfg.host_depth
                ),
            ),
        ];
        for (ok, message) in checks {
            if !ok {
                return Err(self.violation(Check::Memory, message));
            }
        }
        Ok(())
    }

    /// (g) at quiescence the volumes are byte-identical.
    fn quiescent(&mut self) -> Step<bool> {
        if self.faults_on
            || self.parked.is_some()
            || self.ops.len() < self.opts.ops
            || self.completed < self.ops.len()
            || !self.source.log().is_empty()
        {
            return Ok(false);
        }
        let last_local = self.source.status().last_local;
        let t = self.target.status();
        if t.durable < last_local || !self.applying.is_empty() {
            return Ok(false);
        }
        if !t.consistent {
            return Err(self.violation(
                Check::Quiescence,
                format!("target still reports inconsistent at quiescence: {t:?}"),
            ));
        }
        let first_difference = |image: &[u8]| {
            self.src_vol
                .iter()
                .zip(image.iter())
                .position(|(a, b)| a != b)
        };
        let differences = [
            ("volume", self.volume.with_view(first_difference)),
            ("durable image", self.volume.with_durable(first_difference)),
        ];
        for (name, at) in differences {
            if let Some(at) = at {
                return Err(self.violation(
                    Check::Quiescence,
                    format!(
                        "source and target {name} differ at byte {at} after all {} ops are \
                         durable",
                        self.ops.len()
                    ),
                ));
            }
        }
        Ok(true)
    }
}

fn byte_range(r: Range) -> std::ops::Range<usize> {
    let start = usize::try_from(r.offset_bytes).unwrap_or(usize::MAX);
    let end = usize::try_from(r.end_bytes()).unwrap_or(usize::MAX);
    start..end
}

/// Moves a replay image to `to` (replaying from the initial image when going back).
fn advance(image: &mut [u8], at: &mut Seq, to: Seq, ops: &[Op], initial: &[u8]) {
    if to < *at {
        image.copy_from_slice(initial);
        *at = Seq::NONE;
    }
    let from = usize::try_from(at.0).unwrap_or(usize::MAX);
    let to_index = usize::try_from(to.0).unwrap_or(usize::MAX).min(ops.len());
    for op in ops.get(from..to_index).unwrap_or(&[]) {
        storage::apply_to_image(image, op);
    }
    *at = to;
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Write { .. } => "write",
        Op::Discard { .. } => "discard",
        Op::WriteZeroes { .. } => "write-zeroes",
        Op::Flush => "flush",
    }
}

fn new_source(cfg: SourceConfig, opts: &SimOptions) -> Source {
    let mut source = Source::new(cfg);
    source.set_sabotage(opts.source_sabotage);
    source
}

fn new_target(cfg: TargetConfig, restored: Restored, opts: &SimOptions) -> Target {
    let mut target = Target::new(cfg, restored);
    target.set_sabotage(opts.target_sabotage);
    target
}

/// The planner for a run, with bounds small enough that batches are cut by both (derived from the
/// commit log's bounds, so the seed's draws stay as they were).
fn new_commit(cfg: &SimConfig, opts: &SimOptions) -> GroupCommit {
    let mut commit = GroupCommit::new(CommitConfig {
        batch_ops_max: (cfg.commit_entries_max / 4).max(1),
        sync_after_bytes: (cfg.commit_bytes_max / 2).max(1),
    });
    commit.set_sabotage(opts.commit_sabotage);
    commit
}

/// The source's session policy with reconnect delays in the run's scale (1 tick up to the
/// configured bound); the link is never silent, so PING and the idle timeout never fire.
fn new_session(cfg: &SimConfig, seed: u64, opts: &SimOptions) -> SourceSession {
    let session = SessionConfig {
        backoff_min_ns: TICK_NS,
        backoff_max_ns: cfg.reconnect_ticks_max.max(1) * TICK_NS,
        ping_interval_ns: u64::MAX / 4,
        idle_timeout_ns: u64::MAX / 4,
    };
    let mut session = SourceSession::new(session, seed ^ 0x5e55_1011, 0);
    session.set_sabotage(opts.session_sabotage);
    session
}
