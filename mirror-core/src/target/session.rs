//! The session's frames: LOCK and data into the commit log in order, epochs and resends,
//! REJECT and GRANTED, the protocol checks every frame goes through.

use super::*;

impl Target {
    /// A frame that failed to decode, read at `now_ns`. A corrupted write payload (intact
    /// header) is answered with NAK and the stream goes on; anything else ends the connection.
    pub fn handle_wire_error(
        &mut self,
        conn: ConnId,
        err: &WireError,
        now_ns: u64,
    ) -> Result<(), TargetError> {
        let Some((seq, epoch)) = err.nak_seq() else {
            return Err(TargetError::Wire(err.clone()));
        };
        if !self.is_session(conn) {
            return Err(TargetError::Wire(err.clone()));
        }
        self.heard(now_ns);
        if epoch < self.epoch {
            // A stale frame that would have been dropped anyway.
            return Ok(());
        }
        if self.resend.is_some_and(|w| w.pending_range.is_some()) {
            return Err(TargetError::Protocol(SourceViolation::WhileRejected {
                seq,
            }));
        }
        self.expect_new_or_pending(seq)?;
        self.epoch += 1;
        self.truncate_from(seq);
        self.resend = Some(ResendWait {
            seq,
            pending_range: None,
        });
        self.out.push_back(Frame::Nak {
            seq,
            epoch: self.epoch,
        });
        Ok(())
    }

    fn heard(&mut self, now_ns: u64) {
        if self.sabotage != TargetSabotage::IdleFromAuth {
            self.touch_session(now_ns);
        }
    }

    /// Checks that `seq` is the next new entry, or the newest entry waiting for its data.
    pub(super) fn expect_new_or_pending(&self, seq: Seq) -> Result<(), TargetError> {
        let next = self.next_new_seq();
        let pending = self.log.iter().any(|e| e.seq == seq && e.op.is_none());
        if seq == next || pending {
            Ok(())
        } else {
            Err(TargetError::Protocol(SourceViolation::OutOfOrder {
                seq,
                expected: next,
            }))
        }
    }

    pub(super) fn next_new_seq(&self) -> Seq {
        self.log
            .back()
            .map(|e| e.seq)
            .unwrap_or_else(|| self.last_handed_out())
            .next()
    }

    /// Drops the commit log entries at or after `seq` and their locks.
    pub(super) fn truncate_from(&mut self, seq: Seq) {
        while self.log.back().is_some_and(|e| e.seq >= seq) {
            if let Some(e) = self.log.pop_back() {
                self.lock_only -= usize::from(e.op.is_none());
                self.log_bytes -= e.op.as_ref().map_or(0, Op::payload_bytes);
            }
        }
        self.locks.unlock_mirror_from(seq);
        self.update_received();
    }

    /// One decoded frame from connection `conn`, read at `now_ns`. On a protocol violation a
    /// REFUSE is queued before the error is returned, so the peer learns why it is disconnected.
    pub fn handle_frame(
        &mut self,
        conn: ConnId,
        frame: Frame,
        now_ns: u64,
    ) -> Result<(), TargetError> {
        if !self.is_session(conn) {
            return self.handle_handshake_frame(conn, frame, now_ns);
        }
        self.heard(now_ns);
        let result = self.handle_frame_inner(frame);
        if let Err(TargetError::Protocol(_)) = &result {
            let refusal = Frame::Refuse {
                reason: RefuseReason::Protocol,
            };
            if self.out.back() != Some(&refusal) {
                self.out.push_back(refusal);
            }
        }
        result
    }

    pub(super) fn handle_frame_inner(&mut self, frame: Frame) -> Result<(), TargetError> {
        match frame {
            Frame::Ping { token } => {
                // A peer that pings faster than it reads loses PONGs, not memory.
                if self.out.len() < OUT_FRAMES_MAX + self.cfg.commit_log_entries_max {
                    self.out.push_back(Frame::Pong { token });
                }
                Ok(())
            }
            Frame::Pong { .. } => Ok(()),
            Frame::Lock {
                seq,
                epoch,
                lba,
                len_bytes,
                want_grant,
            } => {
                if !self.accept_epoch(seq, epoch)? {
                    return Ok(());
                }
                // `lba` counts sectors; the extent check works in bytes.
                let offset_bytes =
                    lba.bytes()
                        .ok_or(TargetError::Protocol(SourceViolation::AddressOverflow {
                            seq,
                            lba: lba.0,
                        }))?;
                let range = self.check_extent(offset_bytes, u64::from(len_bytes))?;
                if seq != self.next_new_seq() {
                    return Err(TargetError::Protocol(SourceViolation::OutOfOrder {
                        seq,
                        expected: self.next_new_seq(),
                    }));
                }
                self.new_entry(seq, Some(range), want_grant, None)
            }
            Frame::Op {
                seq,
                epoch,
                op,
                ack_on_receipt,
            } => {
                if !self.accept_epoch(seq, epoch)? {
                    return Ok(());
                }
                self.receipt_wanted |= ack_on_receipt;
                // The checksum was verified when the frame was decoded; only the op is kept.
                let (op, _) = op.into_parts();
                let range = match op.range() {
                    Some(r) => Some(self.check_extent(r.offset_bytes, r.len_bytes)?),
                    None => None,
                };
                if !self.has_room(op.payload_bytes()) {
                    return Err(TargetError::Protocol(SourceViolation::IgnoredBackPressure));
                }
                if let Some(index) = self.index_of(seq) {
                    return self.attach_data(index, seq, range, op);
                }
                if seq != self.next_new_seq() {
                    return Err(TargetError::Protocol(SourceViolation::OutOfOrder {
                        seq,
                        expected: self.next_new_seq(),
                    }));
                }
                self.new_entry(seq, range, false, Some(op))
            }
            _ => self.refuse_protocol(SourceViolation::NotInSession),
        }
    }

    /// Data for an entry that a LOCK created: it must lie inside the lock and arrive in order.
    pub(super) fn attach_data(
        &mut self,
        index: usize,
        seq: Seq,
        range: Option<Range>,
        op: Op,
    ) -> Result<(), TargetError> {
        if self.log.iter().take(index).any(|e| e.op.is_none()) {
            return Err(TargetError::Protocol(SourceViolation::DataAhead { seq }));
        }
        let entry = &mut self.log[index];
        if entry.op.is_some() {
            return Err(TargetError::Protocol(SourceViolation::DuplicateData {
                seq,
            }));
        }
        let inside = match (entry.range, range) {
            (Some(lock), Some(r)) => {
                r.offset_bytes >= lock.offset_bytes && r.end_bytes() <= lock.end_bytes()
            }
            (_, None) => true,
            (None, Some(_)) => false,
        };
        if !inside {
            return Err(TargetError::Protocol(SourceViolation::OutsideLock { seq }));
        }
        self.log_bytes += op.payload_bytes();
        entry.op = Some(op);
        self.lock_only -= 1;
        self.update_received();
        Ok(())
    }

    pub(super) fn refuse_protocol(&mut self, why: SourceViolation) -> Result<(), TargetError> {
        self.out.push_back(Frame::Refuse {
            reason: RefuseReason::Protocol,
        });
        Err(TargetError::Protocol(why))
    }

    /// Decides whether a data frame of `epoch` is processed (true), silently dropped (false), or
    /// a protocol violation.
    pub(super) fn accept_epoch(&mut self, seq: Seq, epoch: u32) -> Result<bool, TargetError> {
        if epoch < self.epoch {
            return Ok(false);
        }
        if epoch > self.epoch {
            return Err(TargetError::Protocol(SourceViolation::EpochAhead {
                epoch,
                current: self.epoch,
            }));
        }
        if let Some(wait) = self.resend {
            if wait.pending_range.is_some() {
                return Err(TargetError::Protocol(SourceViolation::WhileAwaitingLock {
                    seq,
                    waiting: wait.seq,
                }));
            }
            if seq != wait.seq {
                return Err(TargetError::Protocol(SourceViolation::ResendStart {
                    seq,
                    expected: wait.seq,
                }));
            }
            // After a REJECT the lock was taken when it was granted; the resent frame takes it
            // again below (nothing can come between), so an operation never holds two. (After
            // a NAK there is none: this finds nothing.)
            self.locks.unlock_mirror(seq);
            self.resend = None;
        }
        Ok(true)
    }

    pub(super) fn check_extent(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<Range, TargetError> {
        Range::checked(
            offset_bytes,
            len_bytes,
            u64::from(self.cfg.block_bytes),
            self.cfg.volume_bytes,
        )
        .map_err(|e| TargetError::Protocol(e.into()))
    }

    pub(super) fn new_entry(
        &mut self,
        seq: Seq,
        range: Option<Range>,
        want_grant: bool,
        op: Option<Op>,
    ) -> Result<(), TargetError> {
        if op.is_some()
            && self.data_entries() + self.applying.len() >= self.cfg.commit_log_entries_max
        {
            return Err(TargetError::Protocol(SourceViolation::IgnoredBackPressure));
        }
        if op.is_none() && self.lock_only >= LOCKS_AHEAD_MAX {
            return Err(TargetError::Protocol(SourceViolation::TooManyLocksAhead));
        }
        let lock = match range {
            None => LockState::NotNeeded,
            Some(r) => {
                if self.locks.try_lock_mirror(seq, r) {
                    LockState::Held
                } else if self.cfg.conflict_policy == ConflictPolicy::Reject && !want_grant {
                    self.reject(seq, r);
                    return Ok(());
                } else {
                    self.locks.add_waiter(seq, r);
                    LockState::Waiting
                }
            }
        };
        if lock == LockState::Held && want_grant {
            self.out.push_back(Frame::Granted {
                seq,
                epoch: self.epoch,
            });
        }
        self.log_bytes += op.as_ref().map_or(0, Op::payload_bytes);
        self.lock_only += usize::from(op.is_none());
        self.log.push_back(Entry {
            seq,
            range,
            lock,
            want_grant,
            op,
        });
        self.update_received();
        Ok(())
    }

    pub(super) fn reject(&mut self, seq: Seq, range: Range) {
        self.epoch += 1;
        self.truncate_from(seq);
        self.locks.add_waiter(seq, range);
        self.resend = Some(ResendWait {
            seq,
            pending_range: Some(range),
        });
        self.out.push_back(Frame::Reject {
            seq,
            epoch: self.epoch,
        });
    }

    /// Index of the commit log entry of `seq`. The log holds consecutive sequence numbers, so
    /// this is arithmetic (with a search as the fallback that never runs in an honest engine).
    pub(super) fn index_of(&self, seq: Seq) -> Option<usize> {
        let (front, back) = (self.log.front()?.seq, self.log.back()?.seq);
        if seq > back {
            return None;
        }
        let guess = usize::try_from(seq.0.checked_sub(front.0)?).ok()?;
        match self.log.get(guess) {
            Some(e) if e.seq == seq => Some(guess),
            _ => self.log.iter().position(|e| e.seq == seq),
        }
    }

    /// Recomputes `received`: everything handed out, then the commit log's entries in order
    /// while they carry their data. Entries up to the current `received` already do (data is
    /// never taken back from an entry), so the scan resumes after it: O(new entries), not
    /// O(commit log), per frame.
    pub(super) fn update_received(&mut self) {
        let floor = self.last_handed_out();
        let end = self.log.back().map_or(floor, |e| e.seq).max(floor);
        let mut received = self.received.clamp(floor, end);
        let start = self.log.partition_point(|e| e.seq <= received);
        for e in self.log.range(start..) {
            if e.op.is_none() {
                break;
            }
            received = e.seq;
        }
        if received != self.received {
            self.received = received;
            if self.receipt_wanted {
                self.receipt_wanted = false;
                self.ack_dirty = true;
            }
        }
    }

    /// Retries waiting locks (after a local lock is released or an entry is applied).
    pub(super) fn pump_locks(&mut self) {
        // Every waiting lock (an entry's or a resend's) is registered in the table: without
        // waiters there is nothing to retry, and the scan of the commit log is skipped.
        if !self.locks.has_waiters() {
            return;
        }
        if let Some(wait) = self.resend {
            if let Some(range) = wait.pending_range {
                if self.locks.try_lock_mirror(wait.seq, range) {
                    self.resend = Some(ResendWait {
                        seq: wait.seq,
                        pending_range: None,
                    });
                    self.out.push_back(Frame::Granted {
                        seq: wait.seq,
                        epoch: self.epoch,
                    });
                }
            }
        }
        for e in &mut self.log {
            if e.lock != LockState::Waiting {
                continue;
            }
            let Some(range) = e.range else { continue };
            if self.locks.try_lock_mirror(e.seq, range) {
                e.lock = LockState::Held;
                if e.want_grant {
                    self.out.push_back(Frame::Granted {
                        seq: e.seq,
                        epoch: self.epoch,
                    });
                }
            }
        }
    }
}
