//! The source node's process: its engine and session, a crash that loses them (the local volume
//! keeps every write it took: a process crash, not a power loss), its restart, and the operator's
//! re-base that stands in for a restarted source's recovery until the source keeps persistent
//! state (issue 14).

use crate::meta::MetaRecord;
use crate::node::{
    recover_primary_with, running_primary_record, PeerLink, PrimaryRecoverError,
    PrimaryRecoverySabotage, PrimaryRestored, PrimaryStart,
};
use crate::session::{SessionConfig, SourceSession};
use crate::source::{Source, SourceConfig};
use crate::target::{TargetConfig, VolumeFacts};
use crate::wire::Op;
use crate::{NodeId, Seq};

use super::check::op_name;
use super::workload::Needs;
use super::world::{Drain, Event, Sim, Step, Stream, TICK_NS};
use super::{Check, SimConfig, SimOptions, SourceCrashSabotage};

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
    /// Restarted, waiting for the target to be idle so that the operator can re-base it.
    AwaitingResync,
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
        self.report.source_crashes += 1;
        if self.link_up {
            self.cut_link();
        }
        let mut in_flight = std::mem::take(&mut self.in_flight);
        if self.link.is_parked() {
            // Taken by the process, waiting for room in its log: in flight for the host too.
            in_flight.insert(Seq(u64::try_from(self.ops.len()).unwrap_or(u64::MAX)));
        }
        match self.opts.source_crash_sabotage {
            SourceCrashSabotage::None | SourceCrashSabotage::KeepLocalVolume => {
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
        if self.stopped || self.replaced {
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

    /// The process is gone; it restarts after a while.
    fn process_exits(&mut self) {
        self.source_life = SourceLife::Down;
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

    /// The restarted process runs the daemon's recovery rule on its record: after a clean stop
    /// it continues the sequence; otherwise it waits for the operator's re-base.
    pub(super) fn source_restart(&mut self) {
        let facts = self.primary_facts();
        match recover_primary_with(
            Some(&self.primary_meta),
            &facts,
            self.opts.primary_recovery_sabotage,
        ) {
            Ok(restored) => {
                self.report.source_resumes += 1;
                self.resume_source(restored.confirmed);
            }
            Err(PrimaryRecoverError::Unclean { .. }) => {
                self.source_life = SourceLife::AwaitingResync;
            }
            Err(e) => panic!("the primary refused its own record: {e}"),
        }
    }

    /// A new engine whose operations through `confirmed` are on the target, with its running
    /// record stored, connecting.
    fn resume_source(&mut self, confirmed: Seq) {
        let facts = self.primary_facts();
        let restored = PrimaryRestored {
            confirmed,
            kind: PrimaryStart::Resumed,
        };
        let running = running_primary_record(Some(&self.primary_meta), &facts, NodeId(1), restored);
        self.store_primary(running);
        let cfg = self.link.source().config().clone();
        self.link = new_link(
            cfg,
            confirmed,
            &self.cfg,
            self.seed,
            self.source_run,
            self.now * TICK_NS,
            self.opts,
        );
        self.source_life = SourceLife::Up;
        self.connect();
    }

    /// The restarted source's recovery, as an operator step: a PLACEHOLDER that issue 14 replaces
    /// (metadata, a dirty bitmap and resync on the primary). Today the source keeps nothing on
    /// disk but its volume, so it cannot know which of its local writes the target lacks. The only
    /// honest recovery is a full resync from the target: once the target is idle (nothing received
    /// waits to be applied, everything written is synced and recorded), the source volume is
    /// re-based on the target's durable image and a new engine starts after the target's durable
    /// seq. The local writes past it are discarded; the checkers' history is re-based with it.
    pub(super) fn source_rebase(&mut self) -> Step<bool> {
        if self.source_life != SourceLife::AwaitingResync || !self.target_idle() {
            return Ok(false);
        }
        let durable = self.persisted;
        self.check_survives_source_crash(durable)?;
        if !self.node.engines().status().consistent {
            self.report.rebases_on_inconsistent += 1;
        }
        let image = self.volume.with_durable(<[u8]>::to_vec);
        self.ops
            .truncate(usize::try_from(durable.0).unwrap_or(usize::MAX));
        self.base = durable;
        if self.opts.source_crash_sabotage != SourceCrashSabotage::KeepLocalVolume {
            self.src_vol.copy_from_slice(&image);
        }
        self.shadow.copy_from_slice(&image);
        self.shadow_seq = durable;
        self.durable_shadow.copy_from_slice(&image);
        self.durable_shadow_seq = durable;
        self.touched.push((0, image.len()));
        self.base_image = image;
        self.received_high = durable;
        self.acked.clear();
        self.resume_source(durable);
        Ok(true)
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
            || self.stopped
            || self.source_life != SourceLife::Up
            || self.submitted < self.opts.ops
            || self.completed + self.failed < self.submitted
        {
            return false;
        }
        self.drain = Drain::Waiting;
        self.link.begin_drain(self.now * TICK_NS, u64::MAX / 4);
        true
    }

    /// Whether the target has nothing left of the dead source's connection to apply or sync.
    fn target_idle(&self) -> bool {
        let t = self.node.engines().status();
        self.batch.is_none()
            && self.applying.is_empty()
            && t.commit_log_entries == 0
            && !self.node.engines().needs_sync()
            && self.written == self.persisted
    }

    /// Operation `seq` of the current history.
    pub(super) fn op(&self, seq: Seq) -> Option<&Op> {
        let index = usize::try_from(seq.0).ok()?.checked_sub(1)?;
        self.ops.get(index)
    }
}

/// The primary's record at its first start, as the daemon keeps it while it runs.
pub(super) fn first_primary_record(cfg: &TargetConfig) -> MetaRecord {
    let facts = VolumeFacts {
        volume_id: cfg.volume_id,
        volume_bytes: cfg.volume_bytes,
        created: true,
    };
    let restored = recover_primary_with(None, &facts, PrimaryRecoverySabotage::None)
        .unwrap_or_else(|e| panic!("a first start was refused: {e}"));
    running_primary_record(None, &facts, NodeId(1), restored)
}

/// The source process's link to the target, the daemon's policy: an engine whose operations
/// through `confirmed` are durable on the target, and its session with reconnect delays in the
/// run's scale (1 tick up to the configured bound), PING and the idle timeout as the seed chose
/// them. Each life of the source process draws its own jitter.
pub(super) fn new_link(
    source_cfg: SourceConfig,
    confirmed: Seq,
    cfg: &SimConfig,
    seed: u64,
    source_run: u64,
    now_ns: u64,
    opts: &SimOptions,
) -> PeerLink {
    let mut source = Source::with_log(source_cfg, crate::log::MemLog::new(), confirmed);
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
    let mut link = PeerLink::new(source, session);
    link.set_sabotage(opts.peer_sabotage);
    link
}
