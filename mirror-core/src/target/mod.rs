//! The target side: commit log, lock table, in-order apply, acknowledgements.
//!
//! A driver (the target server, the simulator) pumps it:
//! - [`Target::on_connect`] for each accepted connection (named by a [`ConnId`]), then
//!   [`Target::handle_frame`] for each decoded frame and [`Target::handle_wire_error`] for each
//!   frame that failed to decode, and [`Target::on_disconnect`] when it is gone;
//! - [`Target::poll_transmit`] for frames to send back on a connection, [`Target::poll_close`] for
//!   connections the engine is done with, [`Target::poll_timeout`] / [`Target::handle_timeout`]
//!   for the handshake deadline and the session's idle timeout;
//! - [`Target::poll_apply`] for the next operation to apply to the volume, in sequence order, then
//!   [`Target::handle_applied`] once written, and [`Target::handle_durable`] once the volume (and the
//!   driver's record of the durable sequence number) is synced.
//!
//! An error from `handle_*` means the connection must be closed after the frames already queued
//! (a REFUSE, say) are sent.
//!
//! Admission: any number of connections may be in their handshake (up to
//! [`TargetConfig::handshakes_max`], each until [`TargetConfig::handshake_timeout_ns`]); none of
//! them touches the target's state. Only a connection whose AUTH verified becomes the session. A
//! new session of the node that holds the current one replaces it (its old connection is dead but
//! not yet timed out); another node's gets REFUSE(Busy).

use std::collections::VecDeque;

use crate::auth::{self, Signer};
use crate::genid::{decide, GenIds, Side, Verdict};
use crate::lock::{LocalLockId, LockError, LockTable};
pub use crate::meta::VolumeFacts;
use crate::meta::{BindingError, MetaRecord, Role};
use crate::source::LOCKS_AHEAD_MAX;
use crate::types::{ExtentError, NodeId, Range, Seq, VolumeId};
use crate::wire::{Frame, Hello, Op, RefuseReason, ResyncMark, WireError, MAC_BYTES};

mod admission;
mod error;
mod recover;
mod session;

pub use error::{SourceViolation, TargetError};
pub use recover::{
    recover, recover_with, running_record, RecoverError, RecoveryKind, RecoverySabotage, Restored,
};

/// Control frames (PONG, REFUSE, HELLO) the target queues beyond one per commit log entry.
const OUT_FRAMES_MAX: usize = 64;

/// Default for [`TargetConfig::handshake_timeout_ns`]: 5 s.
pub const HANDSHAKE_TIMEOUT_NS_DEFAULT: u64 = 5_000_000_000;
/// Default for [`TargetConfig::idle_timeout_ns`]: 30 s.
pub const IDLE_TIMEOUT_NS_DEFAULT: u64 = 30_000_000_000;
/// Default for [`TargetConfig::handshakes_max`].
pub const HANDSHAKES_MAX_DEFAULT: usize = 8;

/// A connection, named by the driver; unique for the engine's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Why the engine is done with a connection ([`Target::poll_close`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The handshake did not finish within [`TargetConfig::handshake_timeout_ns`].
    HandshakeTimeout,
    /// The same node authenticated a new session; this older one is dead.
    Replaced,
    /// The session sent nothing for [`TargetConfig::idle_timeout_ns`] while the target could
    /// take its frames (a source that crashed or lost its link without a FIN, or stopped reading:
    /// a driver whose writer is full takes no frames).
    Idle,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::HandshakeTimeout => "the handshake did not finish in time",
            CloseReason::Replaced => "a new session of the same source replaced it",
            CloseReason::Idle => "the source sent nothing within the idle timeout",
        })
    }
}

/// What the target does when a mirrored lock conflicts with a local lock holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictPolicy {
    /// Keep the entry and retry until the lock is granted (no new local lock on that region).
    Wait,
    /// Send REJECT now and GRANTED once the region is free; the source resends from there.
    Reject,
}

/// Deliberate bugs for tests that prove the simulator's checkers bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSabotage {
    /// Behave correctly.
    #[default]
    None,
    /// Apply the second ready entry before the first.
    ApplyOutOfOrder,
    /// Apply an entry even though a local holder locks its range.
    IgnoreLocalLocks,
    /// Take a HELLO's last seq before its AUTH verified (the bug item 9a of issue 13 fixed).
    TrustHelloBeforeAuth,
    /// Count the session's idle timeout from its AUTH, not from its last frame.
    IdleFromAuth,
    /// Take no notice of resync marks: claim consistency in the middle of a resync.
    IgnoreResyncMarks,
    /// Take the source's generation ids when a full resync begins, not when it ends (a primary
    /// restarted in the middle then resyncs only its write intent into a partial copy).
    AdoptIdsAtBegin,
}

/// Configuration of a target.
#[derive(Clone)]
pub struct TargetConfig {
    /// The volume this target mirrors.
    pub volume_id: VolumeId,
    /// This node.
    pub node_id: NodeId,
    /// Size of the target volume.
    pub volume_bytes: u64,
    /// Logical block size: every operation must be aligned to it.
    pub block_bytes: u32,
    /// Shared secret for authentication.
    pub secret: Vec<u8>,
    /// Lock conflict policy.
    pub conflict_policy: ConflictPolicy,
    /// Bound on commit log payload bytes.
    pub commit_log_bytes_max: usize,
    /// Bound on commit log entries.
    pub commit_log_entries_max: usize,
    /// Bound on local locks held at once.
    pub local_locks_max: usize,
    /// How long a connection may take from accept to a verified AUTH.
    pub handshake_timeout_ns: u64,
    /// Connections in their handshake at once; more are refused with Busy.
    pub handshakes_max: usize,
    /// The session is closed once it has sent nothing for this long while the target could take
    /// frames.
    pub idle_timeout_ns: u64,
}

impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("volume_id", &self.volume_id)
            .field("node_id", &self.node_id)
            .field("volume_bytes", &self.volume_bytes)
            .field("block_bytes", &self.block_bytes)
            .field("secret", &"<redacted>")
            .field("conflict_policy", &self.conflict_policy)
            .field("commit_log_bytes_max", &self.commit_log_bytes_max)
            .field("commit_log_entries_max", &self.commit_log_entries_max)
            .field("local_locks_max", &self.local_locks_max)
            .field("handshake_timeout_ns", &self.handshake_timeout_ns)
            .field("handshakes_max", &self.handshakes_max)
            .field("idle_timeout_ns", &self.idle_timeout_ns)
            .finish()
    }
}

/// An operation to apply to the target volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Apply {
    /// Its sequence number.
    pub seq: Seq,
    /// What to do.
    pub op: Op,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockState {
    /// No range to lock (a flush).
    NotNeeded,
    Held,
    Waiting,
}

#[derive(Debug)]
struct Entry {
    seq: Seq,
    range: Option<Range>,
    lock: LockState,
    want_grant: bool,
    op: Option<Op>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandshakeState {
    AwaitHello,
    AwaitAuth {
        peer_nonce: [u8; MAC_BYTES],
        peer_node: NodeId,
        peer_gen_ids: GenIds,
        peer_last_seq: Seq,
        /// The peer's HELLO said [`crate::wire::FLAG_RESYNC_FOLLOWS`].
        resync_follows: bool,
        /// The peer's HELLO said [`crate::wire::FLAG_TARGET_REBASE`] and we hold none of its
        /// history: at its AUTH our sequence continues after this seq.
        rebase: Option<Seq>,
        /// The peer's HELLO said [`crate::wire::FLAG_TARGET_REBASE`] (its seq is its durable
        /// one, not its last).
        asked_rebase: bool,
        /// The position our HELLO told the peer; the session starts from it.
        told: Seq,
    },
    /// Refused: the REFUSE waits in `out`, the driver closes after sending it.
    Refused,
}

/// A connection that has not authenticated: it owns nothing but its own frames.
#[derive(Debug)]
struct Handshake {
    conn: ConnId,
    nonce: [u8; MAC_BYTES],
    deadline_ns: u64,
    state: HandshakeState,
    /// At most a HELLO and a REFUSE.
    out: VecDeque<Frame>,
}

/// The authenticated connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Session {
    conn: ConnId,
    node: NodeId,
    /// The source's generation ids, from its HELLO.
    gen_ids: GenIds,
    idle_deadline_ns: u64,
}

#[derive(Debug, Clone, Copy)]
struct ResendWait {
    seq: Seq,
    /// For a REJECT: the range still to be granted; `None` once GRANTED was sent (or for a NAK).
    pending_range: Option<Range>,
}

/// A snapshot of the target's state, for status and checkers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    /// Whether a source is authenticated.
    pub connected: bool,
    /// Last sequence number received in order (in the commit log or beyond).
    pub received: Seq,
    /// Last applied.
    pub applied: Seq,
    /// Last applied and durable.
    pub durable: Seq,
    /// Commit log entries.
    pub commit_log_entries: usize,
    /// Commit log payload bytes.
    pub commit_log_bytes: usize,
    /// Whether the volume is known to be a consistent prefix of the source's writes.
    pub consistent: bool,
    /// Current resend epoch.
    pub epoch: u32,
    /// A resync bracket is open (handed out in part): whether it is a full one.
    pub resync: Option<bool>,
    /// Whether the data is trusted to be some state of the source's (false: new or replaced, or
    /// inside a full resync, until a full resync's end).
    pub data_trusted: bool,
    /// The histories the volume holds.
    pub gen_ids: GenIds,
}

/// The target state machine.
#[derive(Debug)]
pub struct Target {
    cfg: TargetConfig,
    session: Option<Session>,
    handshakes: Vec<Handshake>,
    closing: VecDeque<(ConnId, CloseReason)>,
    log: VecDeque<Entry>,
    log_bytes: usize,
    applying: VecDeque<Seq>,
    received: Seq,
    applied: Seq,
    durable: Seq,
    epoch: u32,
    resend: Option<ResendWait>,
    locks: LockTable,
    out: VecDeque<Frame>,
    ack_dirty: bool,
    /// An operation asked for an ACK on receipt ([`crate::wire::FLAG_ACK_ON_RECEIPT`]): the next advance
    /// of `received` is acknowledged at once instead of with the next durability ACK.
    receipt_wanted: bool,
    /// The data was never known to be consistent ([`Restored::consistent`] false): no resend
    /// clears `inconsistent_until`, only the end of a full resync will.
    data_untrusted: bool,
    /// Inside a resync bracket ([`ResyncMark`]), handed out in part: whether it is a full one.
    resync: Option<bool>,
    /// The histories the volume holds ([`crate::genid`]), sent in our HELLO and recorded.
    gen_ids: GenIds,
    /// The ids of the source whose full resync is handed out in part: its end makes them ours.
    full_resync_from: Option<GenIds>,
    /// After an unclean restart: consistent again once durable reaches this (set by the source's
    /// HELLO); `Some(Seq(u64::MAX))` until a source has said where it stands.
    inconsistent_until: Option<Seq>,
    /// Commit log entries created by a LOCK that still wait for their data.
    lock_only: usize,
    /// The sequence was rebased ([`crate::wire::FLAG_TARGET_REBASE`]): the record must say so
    /// before a crash can make us report the old position again.
    record_due: bool,
    /// The seq a rebase continued after, until the driver took it ([`Target::take_rebased`]).
    rebased: Option<Seq>,
    sabotage: TargetSabotage,
}

impl Target {
    /// A target whose volume's durable state is `restored` (what [`recover`] trusted): not
    /// consistent after an unclean stop until the source's resend is durable, and never while
    /// the data is not known to be consistent.
    #[must_use]
    pub fn new(cfg: TargetConfig, restored: Restored) -> Target {
        let locks = LockTable::new(cfg.local_locks_max);
        Target {
            cfg,
            session: None,
            handshakes: Vec::new(),
            closing: VecDeque::new(),
            log: VecDeque::new(),
            log_bytes: 0,
            applying: VecDeque::new(),
            received: restored.durable,
            applied: restored.durable,
            durable: restored.durable,
            epoch: 0,
            resend: None,
            locks,
            out: VecDeque::new(),
            ack_dirty: false,
            receipt_wanted: false,
            inconsistent_until: (!restored.clean || !restored.consistent || restored.resyncing)
                .then_some(Seq(u64::MAX)),
            data_untrusted: !restored.consistent,
            resync: restored.resyncing.then_some(restored.resync_full),
            gen_ids: restored.gen_ids,
            full_resync_from: None,
            lock_only: 0,
            record_due: false,
            rebased: None,
            sabotage: TargetSabotage::None,
        }
    }

    /// Breaks the engine on purpose (tests that prove the checkers bite).
    pub fn set_sabotage(&mut self, sabotage: TargetSabotage) {
        self.sabotage = sabotage;
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &TargetConfig {
        &self.cfg
    }

    /// Whether a source is authenticated.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.session.is_some()
    }

    /// Whether the commit log has room for an operation carrying `payload_bytes`. A driver stops
    /// reading from the connection while this is false (back-pressure on the source).
    ///
    /// Entries created by a LOCK frame that still wait for their data do not count: the source
    /// sends at most [`LOCKS_AHEAD_MAX`] of them, and the data that completes them lies behind
    /// them in the stream, so counting them could stop the reading that would complete them.
    #[must_use]
    pub fn has_room(&self, payload_bytes: usize) -> bool {
        self.data_entries() + self.applying.len() < self.cfg.commit_log_entries_max
            && self.log_bytes + payload_bytes <= self.cfg.commit_log_bytes_max
    }

    /// Whether the commit log has room for a frame of any size (the largest payload). A driver
    /// that takes whole frames without seeing their size first stops taking them while this is
    /// false; one that reads the header first asks [`Self::has_room`] with the payload's size.
    #[must_use]
    pub fn has_room_for_any_frame(&self) -> bool {
        self.has_room(crate::wire::PAYLOAD_BYTES_MAX as usize)
    }

    /// Commit log entries that carry their operation.
    pub(super) fn data_entries(&self) -> usize {
        self.log.len() - self.lock_only
    }

    /// The next operation to apply, strictly in sequence order, once its lock is held.
    pub fn poll_apply(&mut self) -> Option<Apply> {
        let index = self.ready_index()?;
        let entry = self.log.remove(index)?;
        let op = entry.op?;
        self.log_bytes -= op.payload_bytes();
        self.applying.push_back(entry.seq);
        if let Op::Resync(mark) = op {
            self.resync_mark(entry.seq, mark);
        }
        Some(Apply { seq: entry.seq, op })
    }

    /// A resync mark is handed out: from a begin on, the volume is not a prefix of the source's
    /// writes; from an end on, it is once the end is durable (and, after a data loss, only if
    /// the bracket covered every chunk).
    fn resync_mark(&mut self, seq: Seq, mark: ResyncMark) {
        if self.sabotage == TargetSabotage::IgnoreResyncMarks {
            return;
        }
        match mark {
            ResyncMark::Begin { full } => {
                // Chunks of a full resync overwrite whatever was there: until its end only
                // another full resync's end makes the data trusted again.
                self.data_untrusted |= full;
                self.resync = Some(full);
                if full {
                    self.full_resync_from = self.session.map(|s| s.gen_ids);
                    if let (TargetSabotage::AdoptIdsAtBegin, Some(from)) =
                        (self.sabotage, self.full_resync_from)
                    {
                        self.gen_ids.adopt(&from);
                    }
                }
                // A bound an unclean restart already has (the source's resend) is kept.
                self.inconsistent_until.get_or_insert(Seq(u64::MAX));
            }
            ResyncMark::End => {
                if self.resync.take() == Some(true) {
                    self.data_untrusted = false;
                    // The volume now holds the source's history (recorded with the durable
                    // seq that covers this end, as `consistent` is).
                    // From the session that began it, or (after our restart) the one that ends
                    // it: the same source, the only one the target serves.
                    let from = self
                        .full_resync_from
                        .take()
                        .or(self.session.map(|s| s.gen_ids));
                    if let Some(from) = from {
                        self.gen_ids.adopt(&from);
                    }
                }
                // Consistent once the end is durable, and not before a resend the source
                // bounded: `u64::MAX` says no source bounded one.
                let until = match self.inconsistent_until {
                    Some(u) if u != Seq(u64::MAX) => u.max(seq),
                    _ => seq,
                };
                self.inconsistent_until = Some(until);
                self.check_consistent();
            }
        }
    }

    /// What the metadata record says of the data: whether it is trusted (no full resync needed)
    /// and whether a resync bracket is open.
    #[must_use]
    pub fn data_state(&self) -> (bool, bool) {
        (!self.data_untrusted, self.resync.is_some())
    }

    /// Whether the open resync bracket (if any) is a full resync.
    #[must_use]
    pub fn resync_is_full(&self) -> bool {
        self.resync == Some(true)
    }

    /// The histories the volume holds (sent in HELLO, kept in the record).
    #[must_use]
    pub fn gen_ids(&self) -> GenIds {
        self.gen_ids
    }

    fn entry_ready(e: &Entry) -> bool {
        e.op.is_some() && e.lock != LockState::Waiting
    }

    fn ready_index(&self) -> Option<usize> {
        match self.sabotage {
            TargetSabotage::None
            | TargetSabotage::TrustHelloBeforeAuth
            | TargetSabotage::IdleFromAuth
            | TargetSabotage::IgnoreResyncMarks
            | TargetSabotage::AdoptIdsAtBegin => {
                self.log.front().filter(|e| Self::entry_ready(e)).map(|_| 0)
            }
            TargetSabotage::ApplyOutOfOrder => {
                let second_ready = self.log.get(1).is_some_and(Self::entry_ready);
                if second_ready {
                    Some(1)
                } else {
                    self.log.front().filter(|e| Self::entry_ready(e)).map(|_| 0)
                }
            }
            TargetSabotage::IgnoreLocalLocks => {
                self.log.front().filter(|e| e.op.is_some()).map(|_| 0)
            }
        }
    }

    /// The driver has written operation `seq` (handed out by [`Target::poll_apply`]) to the volume.
    ///
    /// # Panics
    /// If `seq` is not the oldest operation handed out: the driver must apply in order.
    pub fn handle_applied(&mut self, seq: Seq) {
        let front = self.applying.pop_front();
        assert_eq!(
            front,
            Some(seq),
            "operations must be applied in the order handed out"
        );
        // Only a test that asked for out-of-order application is spared the check.
        if self.sabotage != TargetSabotage::ApplyOutOfOrder {
            assert!(seq > self.applied, "applied sequence numbers only grow");
        }
        self.locks.unlock_mirror(seq);
        self.applied = self.applied.max(seq);
        self.pump_locks();
    }

    /// The seq the session just admitted rebased our sequence on, once (a source that copies
    /// this volume in full while it runs: the driver says so in its log).
    pub fn take_rebased(&mut self) -> Option<Seq> {
        self.rebased.take()
    }

    /// Whether applied operations wait for a sync of the volume before they count as durable
    /// (or a rebased sequence for its record).
    #[must_use]
    pub fn needs_sync(&self) -> bool {
        self.applied > self.durable || self.record_due
    }

    /// Last applied sequence number (what a sync now would make durable).
    #[must_use]
    pub fn applied(&self) -> Seq {
        self.applied
    }

    /// The driver has synced the volume and durably recorded `seq` as the last durable operation.
    ///
    /// # Panics
    /// If `seq` was not applied, or goes backwards.
    pub fn handle_durable(&mut self, seq: Seq) {
        assert!(seq <= self.applied, "durable beyond applied");
        assert!(seq >= self.durable, "durable sequence numbers only grow");
        if seq != self.durable {
            self.durable = seq;
            self.ack_dirty = true;
        }
        self.record_due = false;
        self.check_consistent();
    }

    fn check_consistent(&mut self) {
        if !self.data_untrusted
            && self.resync.is_none()
            && self
                .inconsistent_until
                .is_some_and(|until| self.durable >= until)
        {
            self.inconsistent_until = None;
        }
    }

    /// The next frame to send on connection `conn`.
    pub fn poll_transmit(&mut self, conn: ConnId) -> Option<Frame> {
        if !self.is_session(conn) {
            let h = self.handshakes.iter_mut().find(|h| h.conn == conn)?;
            return h.out.pop_front();
        }
        if let Some(frame) = self.out.pop_front() {
            return Some(frame);
        }
        if self.ack_dirty {
            self.ack_dirty = false;
            return Some(Frame::Ack {
                received: self.received,
                durable: self.durable,
            });
        }
        None
    }

    /// Takes a local lock (a consistent backup read, verify, resync) on `range`. Refused while the
    /// mirror holds or waits for an overlapping range.
    pub fn try_lock_local(&mut self, range: Range) -> Result<LocalLockId, LockError> {
        if range.end_bytes() > self.cfg.volume_bytes {
            return Err(LockError::BadRange);
        }
        self.locks.try_lock_local(range)
    }

    /// Releases a local lock; mirrored operations waiting for it may proceed.
    pub fn unlock_local(&mut self, id: LocalLockId) -> bool {
        let released = self.locks.unlock_local(id);
        if released {
            self.pump_locks();
        }
        released
    }

    /// Current state.
    #[must_use]
    pub fn status(&self) -> TargetStatus {
        TargetStatus {
            connected: self.session.is_some(),
            received: self.received,
            applied: self.applied,
            durable: self.durable,
            commit_log_entries: self.log.len() + self.applying.len(),
            commit_log_bytes: self.log_bytes,
            consistent: self.inconsistent_until.is_none(),
            epoch: self.epoch,
            resync: self.resync,
            data_trusted: !self.data_untrusted,
            gen_ids: self.gen_ids,
        }
    }

    /// Number of mirror locks and waiters (bounded by the commit log) and local locks.
    #[must_use]
    pub fn lock_counts(&self) -> (usize, usize) {
        (self.locks.mirror_count(), self.locks.local_count())
    }
}

#[cfg(test)]
mod tests;
