//! The invariant checkers that run after every step, and the replay images they compare with.

use crate::log::RollbackLog;
use crate::node::PeerData;
use crate::source::LOCKS_AHEAD_MAX;
use crate::storage;
use crate::wire::{Op, HEADER_BYTES, HELLO_PAYLOAD_BYTES};
use crate::{Range, Seq};

use super::source::SourceLife;
use super::workload::Needs;
use super::world::{Drain, Sim, Step};
use super::Check;

/// Granularity of the volume comparisons and of the volatile overlay.
pub(super) const CHECK_BLOCK_BYTES: usize = 512;

impl Sim<'_> {
    pub(super) fn check(&mut self) -> Step<()> {
        // (a) prefix: advance the shadow to what the driver wrote, then compare what changed.
        let applied = self.written;
        if applied < self.shadow_seq {
            self.shadow.copy_from_slice(&self.base_image);
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
            let (at, touched) = (self.shadow_seq, &mut self.touched);
            for (_, op) in out_of_sync_between(&self.out_of_sync_ops, at, applied) {
                if let Some(r) = op.range() {
                    let r = byte_range(r);
                    touched.push((r.start, r.end));
                }
            }
            advance(
                &mut self.shadow,
                &mut self.shadow_seq,
                applied,
                (&self.ops, &self.out_of_sync_ops),
                (Seq::NONE, &self.base_image),
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
        let status = self.node.engines().status();
        // (i), the more precise message first: from a resync begin handed out until its end is
        // durable, the target holds chunks of the source's current data over an older state: it
        // must say it is inconsistent.
        if let Some((begin, end)) = self.bracket {
            let open = self.written >= begin && end.is_none_or(|end| self.persisted < end);
            if open && status.consistent {
                return Err(self.violation(
                    Check::ResyncBracket,
                    format!(
                        "target reports consistent with seq {} written inside the resync \
                         bracket from seq {begin} (end {end:?}, durable through {})",
                        self.written, self.persisted
                    ),
                ));
            }
        }
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
                    self.base_image.len() / CHECK_BLOCK_BYTES
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
        self.check_peer_status()?;
        self.check_memory()
    }

    /// (i) the primary never calls its peer up to date unless the target made every operation
    /// it took durable and is consistent; while writes out of sync lack a durable resync end
    /// there, its stored record calls the peer outdated.
    fn check_peer_status(&mut self) -> Step<()> {
        if let (Some(since), Some(end)) = (self.out_of_sync_since, self.overflow_end) {
            if usize::try_from(end.0).unwrap_or(usize::MAX) > since && self.persisted >= end {
                self.out_of_sync_since = None;
            }
        }
        if let Some(since) = self
            .out_of_sync_since
            .filter(|_| !self.primary_meta.peer_outdated)
        {
            return Err(self.violation(
                Check::PeerStatus,
                format!(
                    "a write completed out of sync after op {since} and no resync end after it is \
                     durable, but the primary's stored record does not call its peer outdated"
                ),
            ));
        }
        if !self.source_life.alive() || self.link.peer_data() != PeerData::UpToDate {
            return Ok(());
        }
        if let Some(since) = self.out_of_sync_since {
            return Err(self.violation(
                Check::PeerStatus,
                format!(
                    "the primary reports its peer up to date, but a write completed out of sync \
                     after op {since} and no resync end after it is durable (durable through {})",
                    self.persisted
                ),
            ));
        }
        let last = self.link.source().status().last_local;
        let t = self.node.engines().status();
        if self.persisted < last || !t.consistent {
            return Err(self.violation(
                Check::PeerStatus,
                format!(
                    "the primary reports its peer up to date through seq {last}; the target is \
                     durable through {} (consistent: {})",
                    self.persisted, t.consistent
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn check_holders(&self) -> Step<()> {
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
    pub(super) fn check_log(&self) -> Step<()> {
        if !self.source_life.alive() {
            // The log died with the process.
            return Ok(());
        }
        let last_local = self.link.source().status().last_local;
        let log = self.link.source().log();
        // What a replaced volume lost was durable when the log let it go.
        let durable = self.persisted.max(self.lost_through);
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
    pub(super) fn check_memory(&mut self) -> Step<()> {
        let s = self.link.source().status();
        let t = self.node.engines().status();
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
        let (mirror_locks, local_locks) = self.node.engines().lock_counts();
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
                self.link.source().pending_count() <= self.cfg.host_depth,
                format!(
                    "source tracks {} host operations, the host has at most {} in flight",
                    self.link.source().pending_count(),
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

    /// (h) a source crash loses no operation completed with the promise "durable on the target":
    /// each is at or below `through`, the seq the restarted primary continues after (that the
    /// target's image is the replay through it is the prefix check's job). The data operations
    /// completed with a weaker promise past it, which only the resync carries, are counted
    /// (quiescence proves they arrived).
    pub(super) fn check_survives_source_crash(&mut self, through: Seq) -> Step<()> {
        for &(seq, needs) in &self.acked {
            let is_data = self.op(seq).is_some_and(|op| *op != Op::Flush);
            match needs {
                Needs::Durable if seq > through => {
                    let what = self.op(seq).map_or("unknown", op_name);
                    return Err(self.violation(
                        Check::SurvivesSourceCrash,
                        format!(
                            "seq {seq} ({what}) completed as durable on the target before the \
                             source crashed, but the target is durable only through {through}, \
                             the seq the restarted primary continues after"
                        ),
                    ));
                }
                Needs::Durable => self.report.acked_durable_kept += 1,
                Needs::Local | Needs::Received if seq > through && is_data => {
                    self.report.acked_writes_resynced += 1;
                }
                Needs::Local | Needs::Received => {}
            }
        }
        Ok(())
    }

    /// What a run that stopped making progress was waiting for.
    pub(super) fn stuck(&self, why: &str) -> String {
        let s = self.link.source().status();
        let t = self.node.engines().status();
        format!(
            "{why}: {} of {} host ops submitted, {} completed, {} failed, parked {}; source \
             {:?} {:?}; target {:?}; link up {} s2t {} frames t2s {} frames; holders {}; \
             applying {}",
            self.submitted,
            self.opts.ops,
            self.completed,
            self.failed,
            self.parked.is_some(),
            self.source_life,
            s,
            t,
            self.link_up,
            self.s2t.frames.len(),
            self.t2s.frames.len(),
            self.holders.len(),
            self.applying.len(),
        )
    }

    /// (g) at quiescence the volumes are byte-identical.
    pub(super) fn quiescent(&mut self) -> Step<bool> {
        if self.faults_on
            || self.parked.is_some()
            || self.source_life != SourceLife::Up
            || self.submitted < self.opts.ops
            || self.completed + self.failed < self.submitted
        {
            return Ok(false);
        }
        if !self.link.source().log().is_empty() || self.drain != Drain::Done {
            return Ok(false);
        }
        let last_local = self.link.source().status().last_local;
        let t = self.node.engines().status();
        if t.durable < last_local || !self.applying.is_empty() {
            return Ok(false);
        }
        for &(seq, since) in &self.replicated_waits {
            if self.link.check_replicated(seq) != Ok(true) {
                return Err(self.violation(
                    Check::Quiescence,
                    format!(
                        "a wait for everything so far (seq {seq}, begun at tick {since}) never \
                         returns: {:?}, the peer holds everything through {}",
                        self.link.check_replicated(seq),
                        self.link.replicated()
                    ),
                ));
            }
        }
        self.settle_replaced();
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
        // Everything is durable on the peer: the write intent marks nothing (a write it never
        // lets go would grow its bookkeeping for ever and resync at every crash).
        let marked = self.link.status().intent.dirty_chunks;
        if marked > 0 {
            return Err(self.violation(
                Check::Quiescence,
                format!("the write intent still marks {marked} chunks with everything durable"),
            ));
        }
        Ok(true)
    }
}

pub(super) fn byte_range(r: Range) -> std::ops::Range<usize> {
    let start = usize::try_from(r.offset_bytes).unwrap_or(usize::MAX);
    let end = usize::try_from(r.end_bytes()).unwrap_or(usize::MAX);
    start..end
}

/// Moves a replay image to `to`, replaying from `base` (the image after an operation) when going
/// back.
/// The writes out of sync a replay from `at` to `to` takes in.
fn out_of_sync_between(
    out_of_sync: &[(Seq, Op)],
    at: Seq,
    to: Seq,
) -> impl Iterator<Item = &(Seq, Op)> {
    out_of_sync
        .iter()
        .filter(move |(after, _)| *after >= at && *after < to)
}

/// Replays the history from `at` to `to` into `image` (from `base` if `to` is behind): each
/// operation `seq` after the writes out of sync that came between it and the one before.
pub(super) fn advance(
    image: &mut [u8],
    at: &mut Seq,
    to: Seq,
    (ops, out_of_sync): (&[Op], &[(Seq, Op)]),
    base: (Seq, &[u8]),
) {
    if to < *at {
        image.copy_from_slice(base.1);
        *at = base.0;
    }
    let from = usize::try_from(at.0).unwrap_or(usize::MAX);
    let to_index = usize::try_from(to.0).unwrap_or(usize::MAX).min(ops.len());
    let mut oos = out_of_sync
        .iter()
        .skip_while(|(after, _)| after.0 < at.0)
        .peekable();
    for (index, op) in ops.iter().enumerate().take(to_index).skip(from) {
        while let Some((_, w)) = oos.next_if(|(after, _)| after.0 <= index as u64) {
            storage::apply_to_image(image, w);
        }
        storage::apply_to_image(image, op);
    }
    *at = to;
}

pub(super) fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Write { .. } => "write",
        Op::Discard { .. } => "discard",
        Op::WriteZeroes { .. } => "write-zeroes",
        Op::Flush => "flush",
        Op::Resync(_) => "resync mark",
    }
}
