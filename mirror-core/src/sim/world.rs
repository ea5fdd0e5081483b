//! The world: the event queue in virtual time, the run loop, what each event does, and the pump
//! that moves the engines until nothing more happens within one instant.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};

use crate::bitmap::DirtyBitmap;
use crate::commit::{Batch, GroupCommit};
use crate::genid::GenIds;
use crate::meta::MetaRecord;
use crate::node::{Node, PeerLink};
use crate::session::SessionAction;
use crate::source::{Mode, SourceConfig};
use crate::storage::FaultyVolume;
use crate::target::{Apply, CloseReason, ConnId, Target, TargetConfig, HANDSHAKES_MAX_DEFAULT};
use crate::wire::Op;
use crate::{Generation, NodeId, Range, Seq, VolumeId};

use super::link::Link;
use super::source::{first_primary_start, new_link, SourceLife};
use super::storage::{first_node, new_commit};
use super::workload::{Holder, LockWaiter, Needs};
use super::{Check, SimConfig, SimOptions, SimReport, Violation};

/// Simulated nanoseconds per tick (only used for the submission time the source records).
pub(super) const TICK_NS: u64 = 1_000;
/// Bound on the number of rounds of one pump (each round moves at least one thing).
const PUMP_ROUNDS_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
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
    /// A refused local lock holder tries again.
    LockRetry {
        key: u64,
    },
    /// The source process dies (rescheduled from the source-crash stream while the workload runs).
    SourceCrash,
    /// The source process of life `source_run` starts again.
    SourceRestart {
        source_run: u64,
    },
    /// The link falls silent (rescheduled from the silence stream while the workload runs).
    Silence,
    /// The source's session asked to be woken at this tick (a PING, or a silent link's drop).
    SessionTimer,
    /// The target's engine asked to be woken at this tick (a handshake's deadline, or the
    /// session's idle timeout).
    TargetTimer,
    /// The host stops producing operations for a while (from the silence stream).
    HostPause,
    /// The overflow copy the source process of life `source_run` handed out is read.
    OverflowCopy {
        source_run: u64,
    },
}

#[derive(Debug)]
pub(super) struct Scheduled {
    pub(super) tick: u64,
    pub(super) order: u64,
    pub(super) event: Event,
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

pub(super) struct Sim<'a> {
    pub(super) seed: u64,
    pub(super) opts: &'a SimOptions,
    pub(super) cfg: SimConfig,
    pub(super) config: String,
    pub(super) rng: fastrand::Rng,
    pub(super) now: u64,
    pub(super) step: u64,
    pub(super) order: u64,
    pub(super) queue: BinaryHeap<Scheduled>,
    pub(super) max_steps: u64,

    /// The source engine of the live source process with its session and waiting rules, the
    /// daemon's replicator policy (the dead one's while it is down).
    pub(super) link: PeerLink,
    pub(super) source_life: SourceLife,
    /// Which life of the source process this is (a crash starts the next).
    pub(super) source_run: u64,
    /// Draws of source crashes (a stream apart from `rng`).
    pub(super) crash_rng: fastrand::Rng,
    /// Draws of the link's silences (a third stream).
    pub(super) silence_rng: fastrand::Rng,
    /// The earliest tick a [`Event::SessionTimer`] is scheduled for.
    pub(super) session_timer: Option<u64>,
    /// The earliest tick a [`Event::TargetTimer`] is scheduled for.
    pub(super) target_timer: Option<u64>,
    /// The host produces no operation before this tick.
    pub(super) host_paused_until: u64,
    /// The target node: its engine and the metadata record its driver keeps.
    pub(super) node: Node<Target>,
    pub(super) target_cfg: TargetConfig,
    /// The target's volume was replaced by one of unknown content (and no record).
    pub(super) replaced: bool,
    /// The primary's metadata record as last stored, and how many times it was.
    pub(super) primary_meta: MetaRecord,
    /// The write intent as the primary last stored it (through its bytes).
    pub(super) primary_intent: DirtyBitmap,
    pub(super) primary_writes: u64,
    /// A clean stop's drain has begun.
    pub(super) stop_draining: bool,
    /// Where the daemon's stop (drain until the target holds everything) stands.
    pub(super) drain: Drain,
    /// Waits of the live process for "everything so far" (as `wait-replicated last` after the
    /// workload), with the tick each began: at quiescence every one must have returned.
    pub(super) replicated_waits: Vec<(Seq, u64)>,
    /// What the target had durable when its volume was replaced.
    pub(super) lost_through: Seq,

    /// The source volume (every submitted operation applied).
    pub(super) src_vol: Vec<u8>,
    /// The history the checkers replay: the volume was `base_image` before operation 1, and
    /// operation `seq` is `ops[seq - 1]`. When a crashed primary's sequence continues after the
    /// target's, the operations past it go: the target never took them, and the resync carries
    /// their data.
    pub(super) base_image: Vec<u8>,
    pub(super) ops: Vec<Op>,
    /// Host writes completed out of sync (no seq), each with the seq it followed: the source
    /// volume took it between that seq and the next, so the volume was never in the state of a
    /// later seq without it, and a target consistent past it must hold it (a resync's copy
    /// carries it). In the order they happened.
    pub(super) out_of_sync_ops: Vec<(Seq, Op)>,
    /// A restarted primary has not yet continued its sequence after the target's.
    pub(super) adopting: bool,
    /// The last resync bracket of the history: its begin's seq and its end's, once submitted.
    pub(super) bracket: Option<(Seq, Option<Seq>)>,
    /// A host write completed out of sync after operation `ops[..n]`, and no resync's end after
    /// it is durable yet: the peer is not up to date.
    pub(super) out_of_sync_since: Option<usize>,
    /// The seq of the last resync end handed out.
    pub(super) overflow_end: Option<Seq>,
    /// An overflow copy handed out and not yet read (the daemon waits for host writes to its
    /// range to finish first).
    pub(super) copy_wait: Option<Range>,

    /// The target volume: what reads return, and what survives a crash.
    pub(super) volume: FaultyVolume,
    /// The durable sequence number the target driver recorded (survives crashes).
    pub(super) persisted: Seq,
    /// Replay of operations `1..=shadow_seq`.
    pub(super) shadow: Vec<u8>,
    pub(super) shadow_seq: Seq,
    /// Replay of operations `1..=persisted`.
    pub(super) durable_shadow: Vec<u8>,
    pub(super) durable_shadow_seq: Seq,
    /// Byte ranges of `view` or `shadow` changed since the last check.
    pub(super) touched: Vec<(usize, usize)>,
    /// Check blocks where `view` differs from `shadow`.
    pub(super) differs: BTreeSet<usize>,
    /// Highest sequence number the target ever reported received.
    pub(super) received_high: Seq,

    pub(super) s2t: Link,
    pub(super) t2s: Link,
    pub(super) link_up: bool,
    /// The target closed this connection while the link was silent: its FIN cannot reach the
    /// source, which learns of it from its idle timeout, or from the reset that answers its next
    /// frame once the silence ends.
    pub(super) target_closed: bool,
    /// Incremented at each disconnect; a reconnect event carries the value it was made for.
    pub(super) conn: u64,
    pub(super) next_intruder: u64,

    /// The target's group commit, the same planner the target server runs.
    pub(super) commit: GroupCommit,
    /// The batch out, and its operations not yet written (in order).
    pub(super) batch: Option<Batch>,
    /// Last operation written to the target's (volatile) volume: the engine hears of a batch only
    /// once it is done, so this runs ahead of the engine's applied seq.
    pub(super) written: Seq,
    pub(super) applying: VecDeque<Apply>,
    pub(super) apply_busy_until: u64,
    /// Which life of the target process this is: a crash starts the next, and events scheduled
    /// by an earlier life are ignored.
    pub(super) target_run: u64,

    pub(super) next_op: usize,
    pub(super) parked: Option<Op>,
    /// Resync copies that entered the log ahead of the parked host write.
    pub(super) overtaken: u64,
    /// Host operations given to a source process, over all its lives.
    pub(super) submitted: usize,
    pub(super) completed: usize,
    /// Host operations a source crash failed.
    pub(super) failed: usize,
    /// Host operations in flight: given to this source life, not completed yet (at most the
    /// host's depth).
    pub(super) in_flight: BTreeSet<Seq>,
    /// Operations completed since the history last continued after a crash, with what their completion promised (at
    /// most the workload's size).
    pub(super) acked: Vec<(Seq, Needs)>,
    pub(super) faults_on: bool,
    pub(super) commit_full_noted: bool,

    pub(super) holders: Vec<Holder>,
    /// Local lock holders refused at their first try, waiting to retry (as the target server's).
    pub(super) lock_waiters: Vec<LockWaiter>,
    pub(super) next_holder_key: u64,

    pub(super) report: SimReport,
}

pub(super) type Step<T> = Result<T, Violation>;

/// The random streams a seed drives (apart, so that one kind of fault does not shift another's
/// draws).
#[derive(Debug, Clone, Copy)]
pub(super) enum Stream {
    Main,
    Crash,
    Silence,
}

/// The stop of the source daemon, run when every host operation is over: the link reports when
/// the target holds everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drain {
    NotBegun,
    Waiting,
    Done,
}

impl<'a> Sim<'a> {
    pub(super) fn new(
        seed: u64,
        opts: &'a SimOptions,
        cfg: SimConfig,
        mut rng: fastrand::Rng,
        crash_rng: fastrand::Rng,
        silence_rng: fastrand::Rng,
    ) -> Sim<'a> {
        let mut volume_id = [0u8; 16];
        rng.fill(&mut volume_id);
        let mut secret = vec![0u8; 32];
        rng.fill(&mut secret);
        let volume_len = usize::try_from(cfg.volume_bytes).unwrap_or(0);
        let mut initial = vec![0u8; volume_len];
        rng.fill(&mut initial);
        // The pair starts in sync (both volumes hold `initial`): one history, drawn from the
        // seed without touching its stream of draws.
        let pair_ids = GenIds {
            current: Generation::fresh(seed ^ 0x06e6_e1d5),
            ..GenIds::NONE
        };
        let source_cfg = SourceConfig {
            volume_id: VolumeId(volume_id),
            node_id: NodeId(1),
            gen_ids: pair_ids,
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
            // The source's rule, seen from the other end: PING keeps an idle session talking.
            idle_timeout_ns: cfg.idle_timeout_ticks * TICK_NS,
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
        let (first_start, primary_meta) = first_primary_start(&target_cfg, pair_ids.current);
        let primary_intent = DirtyBitmap::new(cfg.volume_bytes, cfg.intent_chunk_bytes)
            .unwrap_or_else(|e| unreachable!("the drawn chunk size is valid: {e}"));
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
            link: new_link(
                source_cfg,
                first_start,
                primary_intent.clone(),
                &cfg,
                (seed, 0),
                0,
                opts,
            ),
            source_life: SourceLife::Up,
            source_run: 0,
            crash_rng,
            silence_rng,
            session_timer: None,
            target_timer: None,
            host_paused_until: 0,
            node: first_node(&target_cfg, pair_ids, opts),
            target_cfg,
            replaced: false,
            lost_through: Seq::NONE,
            drain: Drain::NotBegun,
            replicated_waits: Vec::new(),
            primary_meta,
            primary_intent,
            primary_writes: 0,
            stop_draining: false,
            src_vol: initial.clone(),
            ops: Vec::with_capacity(opts.ops),
            out_of_sync_ops: Vec::new(),
            volume: FaultyVolume::new(initial.clone()),
            persisted: Seq::NONE,
            shadow: initial.clone(),
            shadow_seq: Seq::NONE,
            durable_shadow: initial.clone(),
            durable_shadow_seq: Seq::NONE,
            adopting: false,
            bracket: None,
            out_of_sync_since: None,
            overflow_end: None,
            copy_wait: None,
            base_image: initial,
            touched: Vec::new(),
            differs: BTreeSet::new(),
            received_high: Seq::NONE,
            s2t: Link::default(),
            t2s: Link::default(),
            link_up: false,
            target_closed: false,
            conn: 0,
            next_intruder: 0,
            commit: new_commit(&cfg, opts),
            batch: None,
            written: Seq::NONE,
            applying: VecDeque::new(),
            apply_busy_until: 0,
            target_run: 0,
            next_op: 0,
            parked: None,
            overtaken: 0,
            submitted: 0,
            completed: 0,
            failed: 0,
            in_flight: BTreeSet::new(),
            acked: Vec::new(),
            faults_on: opts.ops > 0,
            commit_full_noted: false,
            holders: Vec::new(),
            lock_waiters: Vec::new(),
            next_holder_key: 1,
            report,
            cfg,
        }
    }

    pub(super) fn violation(&self, check: Check, message: String) -> Violation {
        Violation {
            seed: self.seed,
            ops: self.opts.ops,
            step: self.step,
            tick: self.now,
            check,
            message,
            config: self.config.clone(),
            replace_target_volume: self.opts.replace_target_volume,
        }
    }

    pub(super) fn schedule(&mut self, tick: u64, event: Event) {
        self.order += 1;
        self.queue.push(Scheduled {
            tick,
            order: self.order,
            event,
        });
    }

    pub(super) fn schedule_gap(&mut self, mean: u64, event: Event) {
        self.schedule_gap_on(Stream::Main, mean, event);
    }

    /// Schedules `event` after a gap of 1 to twice `mean` ticks drawn from `stream` (none if
    /// `mean` is 0).
    pub(super) fn schedule_gap_on(&mut self, stream: Stream, mean: u64, event: Event) {
        if mean > 0 {
            let rng = match stream {
                Stream::Main => &mut self.rng,
                Stream::Crash => &mut self.crash_rng,
                Stream::Silence => &mut self.silence_rng,
            };
            let gap = rng.u64(1..=mean.saturating_mul(2));
            self.schedule(self.now + gap, event);
        }
    }

    pub(super) fn run(&mut self) -> Step<SimReport> {
        self.connect();
        if self.opts.ops > 0 {
            self.schedule(0, Event::HostArrive);
        }
        self.schedule_gap(self.cfg.disconnect_gap_ticks, Event::Disconnect);
        self.schedule_gap(self.cfg.crash_gap_ticks, Event::Crash);
        self.schedule_gap(self.cfg.lock_gap_ticks, Event::LockAttempt);
        self.schedule_gap(self.cfg.mode_switch_gap_ticks, Event::ModeSwitch);
        self.schedule_source_crash();
        self.schedule_silence();
        self.schedule_host_pause();
        self.pump()?;
        self.check()?;
        loop {
            if self.quiescent()? {
                self.report.steps = self.step;
                self.report.ticks = self.now;
                self.report.ops = u64::try_from(self.submitted).unwrap_or(u64::MAX);
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

    pub(super) fn handle(&mut self, event: Event) -> Step<()> {
        match event {
            Event::Deliver => {}
            Event::HostArrive => {
                if self.parked.is_none() && self.next_op < self.opts.ops {
                    let op = self.gen_op();
                    self.next_op += 1;
                    self.parked = Some(op);
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
                if conn == self.conn && !self.link_up && self.source_life.alive() {
                    let due = self.link.handle_timeout(self.now * TICK_NS);
                    if due == Some(SessionAction::Connect) {
                        self.link.on_connecting();
                        self.connect();
                    } else {
                        // Another of the link's deadlines came first (as the daemon's timer,
                        // which asks again).
                        self.schedule_reconnect();
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
                // The operator's switch goes to the daemon; while it is down there is none.
                if self.faults_on && self.source_life == SourceLife::Up {
                    let mode = Mode::ALL[self.rng.usize(0..Mode::ALL.len())];
                    self.link.set_mode(mode);
                    // Completions the switch released count under the mode that released them.
                    self.completions()?;
                    if self.rng.u32(0..4) == 0 {
                        let on = !self.link.source().config().flush_replicates;
                        self.link.set_flush_replicates(on);
                    }
                    self.report.mode_switches += 1;
                }
                if self.faults_on {
                    self.schedule_gap(self.cfg.mode_switch_gap_ticks, Event::ModeSwitch);
                }
            }
            Event::LockRelease { key } => self.lock_release(key)?,
            Event::LockRetry { key } => self.lock_retry(key)?,
            Event::SourceCrash => {
                if self.faults_on {
                    if self.source_life == SourceLife::Up {
                        // A third of the time the operator stops it cleanly instead.
                        if self.crash_rng.u32(0..3) == 0 {
                            self.source_stop();
                        } else {
                            self.source_crash()?;
                        }
                    }
                    self.schedule_source_crash();
                }
            }
            Event::SourceRestart { source_run } => {
                if source_run == self.source_run && self.source_life == SourceLife::Down {
                    self.source_restart();
                }
            }
            Event::Silence => {
                if self.faults_on {
                    self.silence();
                    self.schedule_silence();
                }
            }
            Event::SessionTimer => self.session_timer()?,
            Event::TargetTimer => {
                // The pump that follows every event runs the target's timeout.
                if self.target_timer == Some(self.now) {
                    self.target_timer = None;
                }
            }
            Event::HostPause => {
                if self.faults_on {
                    self.host_pause();
                    self.schedule_host_pause();
                }
            }
            Event::OverflowCopy { source_run } => self.overflow_copy(source_run)?,
        }
        Ok(())
    }

    pub(super) fn pump(&mut self) -> Step<()> {
        self.node.engines_mut().handle_timeout(self.now * TICK_NS);
        while let Some((conn, why)) = self.node.engines_mut().poll_close() {
            if conn == ConnId(self.conn) && self.link_up {
                // As the source's: PING keeps an idle session talking.
                if why == CloseReason::Idle && self.s2t.held_until == 0 {
                    return Err(self.violation(
                        Check::Protocol,
                        format!("the target closed a live session: {why}"),
                    ));
                }
                self.report.target_closes += 1;
                if why == CloseReason::Idle {
                    self.report.target_idle_closes += 1;
                    self.target_closed = true;
                } else {
                    self.disconnect();
                }
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
            progress |= self.source_resync()?;
            progress |= self.begin_drain();
            if !progress {
                self.arm_session_timer();
                self.arm_target_timer();
                return Ok(());
            }
        }
        Err(self.violation(
            Check::NoProgress,
            self.stuck("the engines keep producing work within one instant"),
        ))
    }
}
