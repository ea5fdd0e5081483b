//! The source node's process: its engine and session, a crash that loses them (the local volume
//! and the stored write intent keep every write it took: a process crash, not a power loss), its
//! restart from its record and intent, and the resync that follows a crash.

use bytes::Bytes;

use crate::bitmap::DirtyBitmap;
use crate::meta::MetaRecord;
use crate::node::{
    recover_primary_with, running_primary_record, OverflowRule, PeerLink, PrimaryRecoverySabotage,
    PrimaryRestored, PrimaryStart, ResyncStep, SubmitError, Submitted,
};
use crate::session::{SessionConfig, SourceSession};
use crate::source::{Source, SourceConfig};
use crate::target::{TargetConfig, VolumeFacts};
use crate::wire::{Op, ResyncMark, SummedOp};
use crate::{Generation, NodeId, Seq};

use super::check::{byte_range, op_name};
use super::workload::Needs;
use super::world::{Drain, Event, Sim, Step, Stream, TICK_NS};
use super::{Check, SimConfig, SimOptions, SourceCrashSabotage};

/// Waits for "everything so far" a source process keeps at once (more are not begun).
const REPLICATED_WAITS_MAX: usize = 64;

/// Where the source process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SourceLife {
    /// Running: the host's operations go to its engine.
    Up,
    /// The operator stops it cleanly: no new host operations; once those in flight are done the
    /// link drains, and a drained link records a clean stop.
    Stopping,
    /// Dead until its restart event.
    Down,
}

impl SourceLife {
    /// Whether the process runs (its engine and log exist).
    pub(super) fn alive(self) -> bool {
        matches!(self, SourceLife::Up | SourceLife::Stopping)
    }
}

impl Sim<'_> {
    pub(super) fn schedule_source_crash(&mut self) {
        let mean = self.cfg.source_crash_gap_ticks;
        self.schedule_gap_on(Stream::Crash, mean, Event::SourceCrash);
    }

    /// The source process dies: its engine (rollback log, pending completions), its session and
    /// its connection are gone. Host operations in flight fail; the source volume (`src_vol`)
    /// keeps what it took.
    pub(super) fn source_crash(&mut self) -> Step<()> {
        self.check_intent_covers_unconfirmed()?;
        self.check_intent_covers_differences()?;
        // The restart's resync carries every chunk written out of sync (they are in the stored
        // intent); the history it continues may be shorter.
        if self.out_of_sync_since.is_some() {
            self.out_of_sync_since = Some(0);
        }

        self.report.source_crashes += 1;
        if self.link_up {
            self.cut_link();
        }
        let mut in_flight = std::mem::take(&mut self.in_flight);
        if self.link.parked_token().is_some() {
            // Taken by the process, waiting for room in its log: in flight for the host too.
            in_flight.insert(Seq(u64::try_from(self.ops.len()).unwrap_or(u64::MAX)));
        }
        match self.opts.source_crash_sabotage {
            SourceCrashSabotage::None | SourceCrashSabotage::ForgetIntentChunk => {
                self.failed += in_flight.len();
                self.report.host_ops_failed += u64::try_from(in_flight.len()).unwrap_or(u64::MAX);
            }
            SourceCrashSabotage::AckInFlight => {
                let cfg = self.link.source().config();
                let (mode, flush_replicates) = (cfg.mode, cfg.flush_replicates);
                for seq in in_flight {
                    let is_flush = self.op(seq) == Some(&Op::Flush);
                    self.completed += 1;
                    self.acked
                        .push((seq, Needs::of(mode, flush_replicates, is_flush)));
                }
            }
        }
        self.process_exits();
        Ok(())
    }

    /// The write intent stored on the primary covers every write on its local volume that is
    /// not durable on the target (what a restart must resync), the one waiting for room in the
    /// log included; a replication stopped for good is left alone (its host writes failed).
    fn check_intent_covers_unconfirmed(&self) -> Step<()> {
        // A target without the primary's history gets every chunk at the restart.
        if !self.target_has_our_history() {
            return Ok(());
        }
        let first = usize::try_from(self.persisted.0).unwrap_or(usize::MAX);
        for (index, op) in self.ops.iter().enumerate().skip(first) {
            let Some(range) = op.range() else { continue };
            if !self.primary_intent.covers(range) {
                return Err(self.violation(
                    Check::WriteIntent,
                    format!(
                        "{} of seq {} ({range:?}) is on the local volume and not durable on the \
                         target (durable through {}), but the stored write intent lacks a chunk \
                         of it",
                        op_name(op),
                        index + 1,
                        self.persisted
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The write intent stored on the primary covers every chunk where the local volume differs
    /// from what the target holds durably: what a restart must resync, whether the write was
    /// queued or recorded out of sync while the primary overflowed.
    fn check_intent_covers_differences(&self) -> Step<()> {
        if !self.target_has_our_history() {
            return Ok(());
        }
        let intent = &self.primary_intent;
        let volume_bytes = self.cfg.volume_bytes;
        let src = &self.src_vol;
        let uncovered = self.volume.with_durable(|image| {
            (0..intent.chunks()).find(|&c| {
                let r = byte_range(intent.chunk_range(c, volume_bytes));
                !intent.is_dirty(c) && src[r.clone()] != image[r]
            })
        });
        if let Some(chunk) = uncovered {
            return Err(self.violation(
                Check::WriteIntent,
                format!(
                    "chunk {chunk} of the local volume differs from the target's durable copy \
                     (durable through {}), but the stored write intent lacks it",
                    self.persisted
                ),
            ));
        }
        Ok(())
    }

    /// Whether the target's volume holds the primary's history (it lacks it once replaced, until
    /// a full resync's end).
    pub(super) fn target_has_our_history(&self) -> bool {
        self.node.engines().gen_ids().current == self.primary_meta.gen_ids.current
    }

    /// A replaced target volume holds the primary's history again (a full resync's end is
    /// durable on it): from here on every check applies again.
    pub(super) fn settle_replaced(&mut self) {
        if self.replaced && self.target_has_our_history() {
            self.report.full_resyncs += 1;
            self.replaced = false;
            self.lost_through = Seq::NONE;
        }
    }

    /// The process is gone; it restarts after a while.
    fn process_exits(&mut self) {
        self.source_life = SourceLife::Down;
        self.overtaken = 0;
        self.copy_wait = None;
        self.replicated_waits.clear();
        self.source_run += 1;
        let delay = self
            .crash_rng
            .u64(1..=self.cfg.source_restart_ticks_max.max(1));
        self.schedule(
            self.now + delay,
            Event::SourceRestart {
                source_run: self.source_run,
            },
        );
    }

    /// The operator's `stop`: the device stops taking host operations, the link drains
    /// ([`Sim::begin_drain`]), and [`Sim::finish_stop`] records the clean stop.
    pub(super) fn source_stop(&mut self) {
        self.source_life = SourceLife::Stopping;
        self.stop_draining = false;
    }

    /// The stop's drain is over: the peer holds everything through `through`. The record of a
    /// clean stop goes to "disk" (through its bytes), the process exits, and it restarts later.
    pub(super) fn finish_stop(&mut self, through: Seq) {
        self.report.clean_source_stops += 1;
        let clean = MetaRecord {
            durable: through,
            clean: true,
            ..self.primary_meta
        };
        self.store_primary(clean);
        if self.link_up {
            self.cut_link();
        }
        self.process_exits();
    }

    /// The primary's record as the daemon writes it: through its bytes.
    pub(super) fn store_primary(&mut self, record: MetaRecord) {
        self.primary_writes += 1;
        let (record, _) = MetaRecord::decode_file(&record.encode_file(self.primary_writes))
            .unwrap_or_else(|e| panic!("the primary's record does not read back: {e}"));
        self.primary_meta = record;
    }

    /// What the restarted source knows of its volume (the same as the target's, never new).
    fn primary_facts(&self) -> VolumeFacts {
        VolumeFacts {
            volume_id: self.target_cfg.volume_id,
            volume_bytes: self.target_cfg.volume_bytes,
            created: false,
        }
    }

    /// The restarted process runs the daemon's recovery rule on its record and its stored write
    /// intent: after a clean stop it continues the sequence; after a crash it continues after
    /// the target's and resyncs the chunks the intent marks.
    pub(super) fn source_restart(&mut self) {
        let facts = self.primary_facts();
        let mut stored = self.primary_intent.clone();
        if self.opts.source_crash_sabotage == SourceCrashSabotage::ForgetIntentChunk {
            if let Some(chunk) = stored.next_dirty(0) {
                stored.clear(chunk);
            }
        }
        let restored = recover_primary_with(
            Some(&self.primary_meta),
            Some(&stored),
            &facts,
            self.opts.primary_recovery_sabotage,
        )
        .unwrap_or_else(|e| panic!("the primary refused its own record: {e}"));
        match restored.kind {
            PrimaryStart::Resumed => self.report.source_resumes += 1,
            PrimaryStart::Crashed => {
                self.report.source_resyncs += 1;
                self.adopting = true;
            }
            PrimaryStart::First | PrimaryStart::NewSequence => {}
        }
        self.start_source(restored, stored);
    }

    /// A new engine as `restored` says, with its running record stored, connecting.
    fn start_source(&mut self, restored: PrimaryRestored, stored: DirtyBitmap) {
        let facts = self.primary_facts();
        // The record always has its history (from the first start); `fresh` is never taken.
        let fresh = Generation::fresh(self.seed ^ self.source_run);
        let running =
            running_primary_record(Some(&self.primary_meta), &facts, NodeId(1), restored, fresh);
        self.store_primary(running);
        let cfg = SourceConfig {
            gen_ids: running.gen_ids,
            ..self.link.source().config().clone()
        };
        self.link = new_link(
            cfg,
            restored,
            stored,
            &self.cfg,
            (self.seed, self.source_run),
            self.now * TICK_NS,
            self.opts,
        );
        self.source_life = SourceLife::Up;
        // The run's last drain died with the old process: the new one drains anew.
        if self.drain == Drain::Waiting {
            self.drain = Drain::NotBegun;
        }
        self.connect();
    }

    /// The resync steps the link hands out, carried out as the daemon does: a copy reads the
    /// source volume now (host operations wait meanwhile). The history takes each in sequence.
    pub(super) fn source_resync(&mut self) -> Step<bool> {
        if !self.source_life.alive() {
            return Ok(false);
        }
        let mut progress = false;
        while self.copy_wait.is_none() {
            let Some(step) = self.link.poll_resync(self.now * TICK_NS) else {
                break;
            };
            progress = true;
            if let (ResyncStep::Copy(range), true) = (step, self.link.step_interleaved()) {
                // The daemon reads an overflow copy once no host write to its range is in
                // flight: some ticks later, while host operations go on.
                self.copy_wait = Some(range);
                let at = self.now + self.rng.u64(0..=self.cfg.op_gap_ticks_max + 2);
                let source_run = self.source_run;
                self.schedule(at, Event::OverflowCopy { source_run });
                break;
            }
            self.submit_resync_step(step)?;
        }
        Ok(progress)
    }

    /// The overflow copy handed out earlier reads the source volume now and enters the log.
    pub(super) fn overflow_copy(&mut self, source_run: u64) -> Step<()> {
        if source_run != self.source_run || !self.source_life.alive() {
            return Ok(());
        }
        let Some(range) = self.copy_wait.take() else {
            return Ok(());
        };
        self.submit_resync_step(ResyncStep::Copy(range))
    }

    /// Carries out `step`, which the link handed out: the operation enters the history and
    /// the log.
    fn submit_resync_step(&mut self, step: ResyncStep) -> Step<()> {
        {
            // A full resync before host operations rebases the sequence on the target's whatever
            // the restart was (one while they go on keeps it: the target took ours).
            let rebased = step == ResyncStep::Mark(ResyncMark::Begin { full: true })
                && !self.link.step_interleaved();
            if self.adopting || rebased {
                self.adopted()?;
            }
            let op = match step {
                ResyncStep::Mark(mark) => {
                    let seq = Seq(u64::try_from(self.ops.len()).unwrap_or(u64::MAX) + 1);
                    match mark {
                        ResyncMark::Begin { .. } if self.link.step_interleaved() => {
                            self.report.overflow_resyncs += 1;
                        }
                        ResyncMark::Begin { .. } => {}
                        // Any resync's end carries the chunks written out of sync before it.
                        ResyncMark::End => self.overflow_end = Some(seq),
                    }
                    self.bracket = match mark {
                        ResyncMark::Begin { .. } => Some((seq, None)),
                        ResyncMark::End => self.bracket.map(|(begin, _)| (begin, Some(seq))),
                    };
                    Op::Resync(mark)
                }
                ResyncStep::Copy(range) => {
                    if self.link.step_interleaved() {
                        self.report.overflow_copy_bytes += range.len_bytes;
                    } else {
                        self.report.resync_copy_bytes += range.len_bytes;
                    }
                    let data = Bytes::copy_from_slice(&self.src_vol[byte_range(range)]);
                    ResyncStep::copy_op(range, data)
                }
            };
            // A copy may go ahead of a host write parked behind its reserve (a throttled
            // host): in the history it comes before that write, whose seq follows it.
            let overtakes = self.link.is_parked();
            let at = self.ops.len() - usize::from(overtakes);
            self.ops.insert(at, op.clone());
            let submitted = self
                .link
                .resync_submit(SummedOp::new(op), self.now * TICK_NS);
            self.store_intent();
            match submitted {
                Ok(Submitted::Accepted(seq)) => {
                    self.overtaken += u64::from(overtakes);
                    self.report.copies_past_parked += u64::from(overtakes);
                    let expected = u64::try_from(at + 1).unwrap_or(u64::MAX);
                    if seq.0 != expected {
                        return Err(self.violation(
                            Check::Protocol,
                            format!(
                                "resync step {step:?} entered the log as seq {seq}, not {expected}"
                            ),
                        ));
                    }
                }
                Ok(Submitted::Parked) => self.report.log_full_waits += 1,
                Ok(Submitted::OutOfSync) => {
                    return Err(self.violation(
                        Check::Protocol,
                        format!("resync step {step:?} was recorded out of sync"),
                    ))
                }
                Err(SubmitError::Withdrawn) => {
                    self.ops.remove(at);
                    self.report.overflow_steps_withdrawn += 1;
                }
                Err(e) => {
                    return Err(self.violation(Check::Protocol, format!("resync step refused: {e}")))
                }
            }
        }
        Ok(())
    }

    /// The restarted primary's sequence now continues after the target's: what the target
    /// holds of the crashed run is final. Operations completed with the promise "durable on the
    /// target" must be in it; the history past it goes (the target never took it; the resync
    /// carries those writes' data, which quiescence compares).
    fn adopted(&mut self) -> Step<()> {
        self.adopting = false;
        // The history is cut back: the resync that follows carries writes out of sync too.
        if self.out_of_sync_since.is_some() {
            self.out_of_sync_since = Some(0);
        }
        let through = self.link.source().status().last_local;
        let full = self.link.status().resync.is_some_and(|r| r.full);
        if full == self.target_has_our_history() {
            return Err(self.violation(
                Check::Protocol,
                format!(
                    "the restarted primary resyncs {} though the target {} its history",
                    if full { "in full" } else { "only its intent" },
                    if full { "holds" } else { "lacks" },
                ),
            ));
        }
        // The target's durable seq as it told it: its record's, or one it was rebased to and
        // has not recorded yet.
        let told = self.node.engines().status().durable;
        if through != told {
            return Err(self.violation(
                Check::Protocol,
                format!(
                    "the restarted primary continues after seq {through}, the target is durable \
                     through {told}"
                ),
            ));
        }
        self.settle_replaced();
        if self.replaced {
            // The target's disk lost what it held; the full copy restores every write.
            if full {
                self.report.full_resyncs += 1;
            }
            self.replaced = false;
            self.lost_through = Seq::NONE;
        } else {
            self.check_survives_source_crash(through)?;
        }
        self.ops
            .truncate(usize::try_from(through.0).unwrap_or(usize::MAX));
        // Writes out of sync after it came before whatever follows now.
        for (after, _) in &mut self.out_of_sync_ops {
            *after = (*after).min(through);
        }
        // A bracket of the crashed run past `through` was never taken: it stays open (its end
        // is gone) if its begin was, until the next one.
        self.bracket = match self.bracket {
            Some((begin, _)) if begin > through => None,
            Some((begin, end)) => Some((begin, end.filter(|&end| end <= through))),
            None => None,
        };
        self.acked.clear();
        self.received_high = through;
        Ok(())
    }

    /// Once every host operation is over, the daemon stops: its device is gone and the link
    /// drains (no limit here: the run's step bound is the limit).
    pub(super) fn begin_drain(&mut self) -> bool {
        if self.source_life == SourceLife::Stopping {
            // The device stopped: once its requests are done, the link drains.
            if self.stop_draining || !self.in_flight.is_empty() || self.link.is_parked() {
                return false;
            }
            self.stop_draining = true;
            self.link.begin_drain(self.now * TICK_NS, u64::MAX / 4);
            return true;
        }
        if self.drain != Drain::NotBegun
            || self.source_life != SourceLife::Up
            || self.submitted < self.opts.ops
            || self.completed + self.failed < self.submitted
        {
            return false;
        }
        self.drain = Drain::Waiting;
        self.wait_replicated();
        self.link.begin_drain(self.now * TICK_NS, u64::MAX / 4);
        true
    }

    /// An operator's `wait-replicated last`: it must return once the peer holds every write so
    /// far (quiescence checks that it did).
    pub(super) fn wait_replicated(&mut self) {
        if self.replicated_waits.len() < REPLICATED_WAITS_MAX {
            self.replicated_waits
                .push((self.link.everything_so_far(), self.now));
        }
    }

    /// Operation `seq` of the current history.
    pub(super) fn op(&self, seq: Seq) -> Option<&Op> {
        let index = usize::try_from(seq.0).ok()?.checked_sub(1)?;
        self.ops.get(index)
    }
}

/// The primary's first start, and its record as the daemon keeps it while it runs.
pub(super) fn first_primary_start(
    cfg: &TargetConfig,
    current: Generation,
) -> (PrimaryRestored, MetaRecord) {
    let facts = VolumeFacts {
        volume_id: cfg.volume_id,
        volume_bytes: cfg.volume_bytes,
        created: true,
    };
    let restored = recover_primary_with(None, None, &facts, PrimaryRecoverySabotage::None)
        .unwrap_or_else(|e| panic!("a first start was refused: {e}"));
    let record = running_primary_record(None, &facts, NodeId(1), restored, current);
    (restored, record)
}

/// The source process's link to the target, the daemon's policy: an engine restarted as
/// `restored` says with `stored` its write intent as last stored, and its session with reconnect
/// delays in the run's scale (1 tick up to the configured bound), PING and the idle timeout as the
/// seed chose them. Each life of the source process (`run`: the seed and the life) draws its
/// own jitter.
pub(super) fn new_link(
    source_cfg: SourceConfig,
    restored: PrimaryRestored,
    stored: DirtyBitmap,
    cfg: &SimConfig,
    run: (u64, u64),
    now_ns: u64,
    opts: &SimOptions,
) -> PeerLink {
    let (seed, source_run) = run;
    let mut source = Source::with_log(source_cfg, crate::log::MemLog::new(), restored.confirmed);
    source.set_sabotage(opts.source_sabotage);
    let session = SessionConfig {
        backoff_min_ns: TICK_NS,
        backoff_max_ns: cfg.reconnect_ticks_max.max(1) * TICK_NS,
        ping_interval_ns: cfg.ping_interval_ticks * TICK_NS,
        idle_timeout_ns: cfg.idle_timeout_ticks * TICK_NS,
    };
    let jitter_seed = seed ^ 0x5e55_1011 ^ source_run.rotate_left(32);
    let mut session = SourceSession::new(session, jitter_seed, now_ns);
    session.set_sabotage(opts.session_sabotage);
    let mut link = PeerLink::restarted(source, session, restored, stored);
    link.set_sabotage(opts.peer_sabotage);
    // The target's commit log takes any host operation, not necessarily a whole chunk.
    link.set_resync_piece_bytes_max(cfg.op_bytes_max);
    link.set_intent_keep_chunks(cfg.intent_keep_chunks);
    link.set_intent_extent_chunks(cfg.intent_extent_chunks);
    if cfg.overflow_after_ticks > 0 {
        link.set_overflow_rule(OverflowRule {
            enabled: true,
            after_down_ns: cfg.overflow_after_ticks * TICK_NS,
            sync_peer_gone: cfg.sync_peer_gone,
        });
    }
    if cfg.throttle_window_ticks > 0 {
        link.set_overflow_throttle(true);
        link.set_converge_window_ns(cfg.throttle_window_ticks * TICK_NS);
    }
    if cfg.resync_bytes_per_tick > 0 {
        let per_s = u128::from(cfg.resync_bytes_per_tick) * 1_000_000_000 / u128::from(TICK_NS);
        link.set_resync_rate(Some(u64::try_from(per_s).unwrap_or(u64::MAX)));
    }
    link
}
