//! The host workload (operations submitted to the source, completions received) and the target's
//! local lock holders.

use bytes::Bytes;

use crate::bitmap::DirtyBitmap;
use crate::lock::{LocalLockId, LocalLockRetry, LocalRetry, LockError};
use crate::node::{PeerEvent, Submitted};
use crate::source::Mode;
use crate::storage;
use crate::wire::{Op, SummedOp};
use crate::{Lba, Range, Seq};

use super::check::{byte_range, op_name};
use super::source::SourceLife;
use super::world::{Drain, Event, Sim, Step, Stream, TICK_NS};
use super::Check;

/// What a completed host operation promises, as the checkers state it (apart from the engine's
/// own rule, so that a broken rule is caught).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Needs {
    Local,
    Received,
    Durable,
}

impl Needs {
    /// What the modes promise for an operation (a flush if `is_flush`) completed in `mode`.
    pub(super) fn of(mode: Mode, flush_replicates: bool, is_flush: bool) -> Needs {
        match (mode, is_flush) {
            (Mode::Sync | Mode::LockThenWrite, _) => Needs::Durable,
            (_, true) if flush_replicates => Needs::Durable,
            (_, true) | (Mode::Async, false) => Needs::Local,
            (Mode::Received, false) => Needs::Received,
        }
    }
}

#[derive(Debug)]
pub(super) struct Holder {
    pub(super) key: u64,
    pub(super) id: LocalLockId,
    pub(super) range: Range,
    pub(super) snapshot: Vec<u8>,
}

/// A local lock holder that was refused and waits to try again.
#[derive(Debug)]
pub(super) struct LockWaiter {
    pub(super) key: u64,
    pub(super) range: Range,
    pub(super) retry: LocalLockRetry,
}

impl Sim<'_> {
    pub(super) fn gen_op(&mut self) -> Op {
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

    pub(super) fn lock_attempt(&mut self) -> Step<()> {
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
        let key = self.next_holder_key;
        self.next_holder_key += 1;
        let now_ns = self.now * TICK_NS;
        let retry = LocalLockRetry::new(now_ns, self.cfg.local_lock_timeout_ticks * TICK_NS)
            .with_sabotage(self.opts.local_retry_sabotage);
        self.try_local_lock(LockWaiter { key, range, retry })
    }

    /// A refused holder's retry is due.
    pub(super) fn lock_retry(&mut self, key: u64) -> Step<()> {
        let Some(index) = self.lock_waiters.iter().position(|w| w.key == key) else {
            // The target crashed meanwhile: the request failed with it.
            return Ok(());
        };
        let waiter = self.lock_waiters.swap_remove(index);
        self.try_local_lock(waiter)
    }

    /// Asks the target for the lock; when refused, the holder retries as the target server's
    /// do ([`LocalLockRetry`]). The holder is answered before its deadline, always.
    fn try_local_lock(&mut self, mut waiter: LockWaiter) -> Step<()> {
        let now_ns = self.now * TICK_NS;
        let range = waiter.range;
        let refused = match self.node.engines_mut().try_lock_local(range) {
            Ok(id) => {
                if now_ns > waiter.retry.deadline_ns() {
                    let _ = self.node.engines_mut().unlock_local(id);
                    return Err(self.violation(
                        Check::LocalLock,
                        format!(
                            "a local lock holder on {range:?} was answered after its deadline \
                             ({} ns late)",
                            now_ns - waiter.retry.deadline_ns()
                        ),
                    ));
                }
                self.report.local_locks += 1;
                let snapshot = self.volume.with_view(|v| v[byte_range(range)].to_vec());
                let key = waiter.key;
                self.holders.push(Holder {
                    key,
                    id,
                    range,
                    snapshot,
                });
                let hold = self.rng.u64(1..=self.cfg.lock_hold_ticks_max);
                self.schedule(self.now + hold, Event::LockRelease { key });
                return Ok(());
            }
            Err(e) => e,
        };
        if matches!(refused, LockError::Busy | LockError::TooMany) {
            self.report.local_lock_refusals += 1;
        }
        match waiter.retry.on_refused(refused, now_ns) {
            LocalRetry::Wait { wait_ns } => {
                let at = self.now + wait_ns.div_ceil(TICK_NS).max(1);
                self.schedule(at, Event::LockRetry { key: waiter.key });
                self.lock_waiters.push(waiter);
                Ok(())
            }
            LocalRetry::TimedOut => {
                self.report.local_lock_timeouts += 1;
                Ok(())
            }
            LocalRetry::Refused => Err(self.violation(
                Check::Protocol,
                format!("local lock on {range:?} refused: {refused}"),
            )),
        }
    }

    pub(super) fn lock_release(&mut self, key: u64) -> Step<()> {
        let Some(index) = self.holders.iter().position(|h| h.key == key) else {
            // The target crashed meanwhile; the holder went with it.
            return Ok(());
        };
        self.check_holders()?;
        let holder = self.holders.remove(index);
        if !self.node.engines_mut().unlock_local(holder.id) {
            return Err(self.violation(
                Check::LocalLock,
                format!("local lock {:?} was not held at release", holder.id),
            ));
        }
        Ok(())
    }

    pub(super) fn host_submit(&mut self) -> Step<bool> {
        if self.parked.is_none() || self.source_life != SourceLife::Up {
            return Ok(false);
        }
        // The link keeps one operation while its log is full, and a resync enters the log
        // first; the daemon offers no other then.
        if self.link.is_parked()
            || !self.link.takes_host_ops()
            || self.in_flight.len() >= self.cfg.host_depth
        {
            return Ok(false);
        }
        let Some(op) = self.parked.take() else {
            return Ok(false);
        };
        storage::apply_to_image(&mut self.src_vol, &op);
        self.ops.push(op.clone());
        let token = u64::try_from(self.ops.len()).unwrap_or(u64::MAX);
        let throttled = self.link.throttled_writes();
        let submitted = self
            .link
            .submit(token, SummedOp::new(op.clone()), self.now * TICK_NS);
        self.report.throttled_writes += self.link.throttled_writes() - throttled;
        // The daemon stores the write intent, synced, before the local write.
        self.store_intent();
        match submitted {
            Ok(Submitted::Accepted(seq)) => self.accepted(token, seq)?,
            Ok(Submitted::Parked) => self.report.log_full_waits += 1,
            Ok(Submitted::OutOfSync) => {
                // Not in the sequence: complete once local; a resync carries it.
                if let Some(op) = self.ops.pop() {
                    let after = Seq(u64::try_from(self.ops.len()).unwrap_or(u64::MAX));
                    self.out_of_sync_ops.push((after, op));
                }
                self.completed += 1;
                self.report.out_of_sync_writes += 1;
                self.out_of_sync_since = Some(self.ops.len());
            }
            Err(e) => {
                return Err(self.violation(Check::Protocol, format!("source refused {op:?}: {e}")))
            }
        }
        self.submitted += 1;
        if self.next_op < self.opts.ops {
            let gap = self.rng.u64(0..=self.cfg.op_gap_ticks_max);
            let at = (self.now + gap).max(self.host_paused_until);
            self.schedule(at, Event::HostArrive);
        } else {
            // The workload is over: faults stop, and the run must reach quiescence.
            self.faults_on = false;
        }
        Ok(true)
    }

    /// The write intent the link asks for goes to "disk" (through its bytes).
    pub(super) fn store_intent(&mut self) {
        if let Some(map) = self.link.take_intent_store() {
            self.primary_intent = DirtyBitmap::decode(&map.encode())
                .unwrap_or_else(|e| panic!("the stored write intent does not read back: {e}"));
            self.report.intent_stores += 1;
        }
    }

    pub(super) fn schedule_host_pause(&mut self) {
        let mean = self.cfg.host_pause_gap_ticks;
        self.schedule_gap_on(Stream::Silence, mean, Event::HostPause);
    }

    /// The host goes quiet for one to two idle timeouts: its next operation waits.
    pub(super) fn host_pause(&mut self) {
        let idle = self.cfg.idle_timeout_ticks;
        let ticks = self.silence_rng.u64(idle..=idle.saturating_mul(2));
        self.host_paused_until = self.host_paused_until.max(self.now.saturating_add(ticks));
        self.report.host_pauses += 1;
    }

    /// Operation `token` (its index in `ops`, from 1) entered the log as `seq`.
    fn accepted(&mut self, token: u64, seq: Seq) -> Step<()> {
        // Copies that went ahead of it while it was parked took the seqs before it.
        let token = token + std::mem::take(&mut self.overtaken);
        if seq.0 != token || token != u64::try_from(self.ops.len()).unwrap_or(u64::MAX) {
            return Err(self.violation(
                Check::Protocol,
                format!(
                    "operation {token} of {} entered the log as seq {seq}",
                    self.ops.len()
                ),
            ));
        }
        self.in_flight.insert(seq);
        Ok(())
    }

    pub(super) fn completions(&mut self) -> Step<bool> {
        let mut progress = false;
        if !self.source_life.alive() {
            // A dead process completes nothing (it held nothing not yet polled).
            return Ok(false);
        }
        while let Some(event) = self.link.poll_event() {
            progress = true;
            let seq = match event {
                PeerEvent::Completed(seq) => seq,
                PeerEvent::Accepted { token, seq } => {
                    self.accepted(token, seq)?;
                    continue;
                }
                PeerEvent::Durable(seq) => {
                    // What a replaced volume lost was durable when the target said so.
                    if seq > self.persisted.max(self.lost_through) {
                        return Err(self.violation(
                            Check::AckedDurable,
                            format!(
                                "the link reports durable through {seq}, the target only \
                                 through {}",
                                self.persisted
                            ),
                        ));
                    }
                    continue;
                }
                PeerEvent::Connected => {
                    self.report.handshakes += 1;
                    continue;
                }
                // The simulated start sets no connect deadline.
                PeerEvent::Degraded { .. } => continue,
                PeerEvent::RecordRunning { durable, rebased } => {
                    if let Some(all) = rebased {
                        // As the daemon: a wait of the old numbering waits for the full copy.
                        for (seq, _) in &mut self.replicated_waits {
                            *seq = all;
                        }
                    }
                    let running = crate::meta::MetaRecord {
                        durable,
                        clean: false,
                        peer_outdated: self.link.peer_outdated(),
                        ..self.primary_meta
                    };
                    self.store_primary(running);
                    continue;
                }
                PeerEvent::Drained(Ok(through)) => {
                    let last = self.link.source().status().last_local;
                    // A drain before the primary heard of a replaced volume counts what the
                    // target had made durable before it.
                    if through != last || through > self.persisted.max(self.lost_through) {
                        return Err(self.violation(
                            Check::AckedDurable,
                            format!(
                                "the link reports drained through {through} (last local seq \
                                 {last}), the target is durable only through {}",
                                self.persisted
                            ),
                        ));
                    }
                    if self.source_life == SourceLife::Stopping {
                        self.finish_stop(through);
                        // The process is gone: its link says nothing more.
                        return Ok(true);
                    }
                    self.drain = Drain::Done;
                    continue;
                }
                PeerEvent::Drained(Err(e)) => {
                    return Err(self.violation(Check::Protocol, format!("drain failed: {e}")));
                }
                PeerEvent::Stopped(e) => {
                    return Err(
                        self.violation(Check::Protocol, format!("replication stopped: {e}"))
                    );
                }
            };
            self.completed += 1;
            if self.completed.is_multiple_of(16) {
                self.wait_replicated();
            }
            let cfg = self.link.source().config();
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
            let needs = Needs::of(mode, flush_replicates, *op == Op::Flush);
            self.in_flight.remove(&seq);
            self.acked.push((seq, needs));
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
                        if self.node.engines().status().consistent && differs {
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
}
