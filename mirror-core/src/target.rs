//! The target side: commit log, lock table, in-order apply, acknowledgements.
//!
//! A driver (the target server, the simulator) pumps it:
//! - [`Target::on_connect`] for each accepted connection (named by a [`ConnId`]), then
//!   [`Target::handle_frame`] for each decoded frame and [`Target::handle_wire_error`] for each
//!   frame that failed to decode, and [`Target::on_disconnect`] when it is gone;
//! - [`Target::poll_transmit`] for frames to send back on a connection, [`Target::poll_close`] for
//!   connections the engine is done with, [`Target::poll_timeout`] / [`Target::handle_timeout`]
//!   for the handshake deadline;
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
use crate::lock::{LocalLockId, LockError, LockTable};
use crate::meta::{MetaRecord, Role};
use crate::source::LOCKS_AHEAD_MAX;
use crate::types::{ExtentError, Generation, NodeId, Range, Seq, VolumeId};
use crate::wire::{Frame, Hello, Op, RefuseReason, WireError, MAC_BYTES};

/// Control frames (PONG, REFUSE, HELLO) the target queues beyond one per commit log entry.
const OUT_FRAMES_MAX: usize = 64;

/// Default for [`TargetConfig::handshake_timeout_ns`]: 5 s.
pub const HANDSHAKE_TIMEOUT_NS_DEFAULT: u64 = 5_000_000_000;
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
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::HandshakeTimeout => "the handshake did not finish in time",
            CloseReason::Replaced => "a new session of the same source replaced it",
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
}

/// Configuration of a target.
#[derive(Clone)]
pub struct TargetConfig {
    /// The volume this target mirrors.
    pub volume_id: VolumeId,
    /// This node.
    pub node_id: NodeId,
    /// Data generation.
    pub generation: Generation,
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
}

impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("volume_id", &self.volume_id)
            .field("node_id", &self.node_id)
            .field("generation", &self.generation)
            .field("volume_bytes", &self.volume_bytes)
            .field("block_bytes", &self.block_bytes)
            .field("secret", &"<redacted>")
            .field("conflict_policy", &self.conflict_policy)
            .field("commit_log_bytes_max", &self.commit_log_bytes_max)
            .field("commit_log_entries_max", &self.commit_log_entries_max)
            .field("local_locks_max", &self.local_locks_max)
            .field("handshake_timeout_ns", &self.handshake_timeout_ns)
            .field("handshakes_max", &self.handshakes_max)
            .finish()
    }
}

/// What the target's driver recovered from its own durable state at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Last sequence number applied and durable.
    pub durable: Seq,
    /// Whether the previous run stopped cleanly (all applied writes synced). After an unclean stop
    /// the volume may hold part of a batch past `durable`, so it is inconsistent until the source's
    /// resend has been applied.
    pub clean: bool,
}

/// What a target's driver knows of its volume at start, for [`recover`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeFacts {
    /// The volume the target is configured to mirror.
    pub volume_id: VolumeId,
    /// The volume's size now.
    pub volume_bytes: u64,
    /// Whether the driver just created the volume (it held nothing before).
    pub created: bool,
}

/// How a restarted target came to its [`Restored`] state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryKind {
    /// From its metadata record.
    Resumed,
    /// A volume the driver just created full of zeroes, with no metadata: consistent at seq 0.
    Fresh,
    /// An existing volume without a record (new to the mirror, or replaced): its content is
    /// unknown, so it is initialised at seq 0 as not consistent. The driver should say so.
    Adopted,
    /// A record of this volume that says its data is not known to be consistent (an adopted
    /// volume, restarted): still not consistent.
    Unverified,
}

impl RecoveryKind {
    /// Whether the volume's data may be taken as a prefix of the mirror's writes (after the
    /// resend an unclean stop needs). Otherwise only a full resync makes it consistent, and every
    /// record the target writes says so.
    #[must_use]
    pub fn trusts_data(self) -> bool {
        matches!(self, RecoveryKind::Resumed | RecoveryKind::Fresh)
    }
}

/// Why a target must not start on this volume and metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// Metadata exists for a volume that was just created: it describes an earlier volume.
    #[error("the volume was just created but metadata of an earlier volume exists")]
    MetaOfEarlierVolume,
    /// The metadata names another volume.
    #[error("it belongs to volume {found}, not {expected}")]
    OtherVolume {
        /// The id in the metadata.
        found: VolumeId,
        /// The configured id.
        expected: VolumeId,
    },
    /// The volume's size changed since the metadata was written.
    #[error("it records a volume of {recorded} bytes, the volume has {actual}")]
    Size {
        /// The size in the metadata.
        recorded: u64,
        /// The size now.
        actual: u64,
    },
    /// The metadata is a primary's; a target does not take over a primary's state.
    #[error("it was written by a primary (node {})", .0.0)]
    Primary(NodeId),
}

/// Deliberate bugs of [`recover_with`] for tests that prove the simulator's checkers bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoverySabotage {
    /// Behave correctly.
    #[default]
    None,
    /// Trust a record of an unclean stop as if the stop had been clean.
    TrustUnclean,
}

/// What a restarted target trusts: its metadata record if it has one that describes this volume
/// (durable seq, and whether the last run stopped cleanly: if not, the volume may hold part of a
/// batch past the durable seq and is inconsistent until the source's resend is applied), nothing
/// at all for a new volume, and never the data of a volume without a record (or whose record says
/// it is not consistent): the [`RecoveryKind`] says which, and [`Target::recovered`] acts on it.
pub fn recover(
    record: Option<&MetaRecord>,
    facts: &VolumeFacts,
) -> Result<(Restored, RecoveryKind), RecoverError> {
    recover_with(record, facts, RecoverySabotage::None)
}

/// [`recover`], broken on purpose when `sabotage` says so (tests only).
pub fn recover_with(
    record: Option<&MetaRecord>,
    facts: &VolumeFacts,
    sabotage: RecoverySabotage,
) -> Result<(Restored, RecoveryKind), RecoverError> {
    let Some(record) = record else {
        let kind = if facts.created {
            RecoveryKind::Fresh
        } else {
            RecoveryKind::Adopted
        };
        let restored = Restored {
            durable: Seq::NONE,
            clean: kind.trusts_data(),
        };
        return Ok((restored, kind));
    };
    if facts.created {
        return Err(RecoverError::MetaOfEarlierVolume);
    }
    if record.volume_id != facts.volume_id {
        return Err(RecoverError::OtherVolume {
            found: record.volume_id,
            expected: facts.volume_id,
        });
    }
    if record.volume_bytes != facts.volume_bytes {
        return Err(RecoverError::Size {
            recorded: record.volume_bytes,
            actual: facts.volume_bytes,
        });
    }
    if record.role == Role::Primary {
        return Err(RecoverError::Primary(record.node_id));
    }
    let restored = Restored {
        durable: record.durable,
        clean: record.clean || sabotage == RecoverySabotage::TrustUnclean,
    };
    let kind = if record.consistent {
        RecoveryKind::Resumed
    } else {
        RecoveryKind::Unverified
    };
    Ok((restored, kind))
}

/// Why the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// The peer was refused (a REFUSE frame is queued).
    #[error("peer refused: {0}")]
    Refused(RefuseReason),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(SourceViolation),
    /// The frame could not be decoded and the stream cannot be re-framed.
    #[error("undecodable frame: {0}")]
    Wire(WireError),
}

/// How a peer broke the protocol (the target answers each with REFUSE(Protocol)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SourceViolation {
    /// A frame before the handshake authenticated the peer.
    #[error("peer sent a frame before authentication")]
    BeforeAuth,
    /// A frame on a connection that was already refused.
    #[error("connection {conn} sent a frame after it was refused")]
    AfterRefusal {
        /// The connection.
        conn: ConnId,
    },
    /// A frame on a connection the target does not know.
    #[error("connection {conn} is neither in its handshake nor the session")]
    UnknownConn {
        /// The connection.
        conn: ConnId,
    },
    /// A frame kind a source does not send in a session.
    #[error("peer sent a frame a source does not send in a session")]
    NotInSession,
    /// A new operation that does not follow the last one.
    #[error("seq {seq} out of order (expected {expected})")]
    OutOfOrder {
        /// What arrived.
        seq: Seq,
        /// What was due.
        expected: Seq,
    },
    /// Data sent while a rejected lock waits for its grant.
    #[error("seq {seq} sent while a rejected lock is pending")]
    WhileRejected {
        /// What arrived.
        seq: Seq,
    },
    /// Data sent ahead of the entry that awaits its lock.
    #[error("seq {seq} sent while seq {waiting} awaits its lock")]
    WhileAwaitingLock {
        /// What arrived.
        seq: Seq,
        /// The entry waiting.
        waiting: Seq,
    },
    /// A resend that does not start at the granted entry.
    #[error("resend starts at seq {seq}, expected {expected}")]
    ResendStart {
        /// What arrived.
        seq: Seq,
        /// The granted entry.
        expected: Seq,
    },
    /// A frame of an epoch the target never opened.
    #[error("frame epoch {epoch} ahead of {current}")]
    EpochAhead {
        /// Its epoch.
        epoch: u32,
        /// The target's.
        current: u32,
    },
    /// A LOCK whose address overflows.
    #[error("LOCK seq {seq}: address {lba} overflows")]
    AddressOverflow {
        /// The LOCK's seq.
        seq: Seq,
        /// Its first sector.
        lba: u64,
    },
    /// Data for an entry whose predecessors have none yet.
    #[error("data for seq {seq} before data of earlier operations")]
    DataAhead {
        /// What arrived.
        seq: Seq,
    },
    /// Data twice for one entry.
    #[error("duplicate data for seq {seq}")]
    DuplicateData {
        /// What arrived.
        seq: Seq,
    },
    /// Data outside the range its LOCK took.
    #[error("seq {seq} writes outside its lock")]
    OutsideLock {
        /// What arrived.
        seq: Seq,
    },
    /// Not a valid extent of the volume.
    #[error(transparent)]
    Extent(#[from] ExtentError),
    /// More than the commit log's bound (the peer ignored back-pressure).
    #[error("commit log overflow: peer ignored back-pressure")]
    IgnoredBackPressure,
    /// Too many LOCK frames ahead of their data.
    #[error("more than {LOCKS_AHEAD_MAX} LOCK frames ahead of their data")]
    TooManyLocksAhead,
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
        peer_last_seq: Seq,
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
    /// The data was never known to be consistent (see [`RecoveryKind::trusts_data`]): no resend
    /// clears `inconsistent_until`, only a full resync will.
    data_untrusted: bool,
    /// After an unclean restart: consistent again once durable reaches this (set by the source's
    /// HELLO); `Some(Seq(u64::MAX))` until a source has said where it stands.
    inconsistent_until: Option<Seq>,
    /// Commit log entries created by a LOCK that still wait for their data.
    lock_only: usize,
    sabotage: TargetSabotage,
}

impl Target {
    /// A target as [`recover`] found it: `restored`, and never consistent while `kind` does not
    /// trust the data.
    #[must_use]
    pub fn recovered(cfg: TargetConfig, restored: Restored, kind: RecoveryKind) -> Target {
        let mut target = Target::new(cfg, restored);
        if !kind.trusts_data() {
            target.data_untrusted = true;
            target.inconsistent_until = Some(Seq(u64::MAX));
        }
        target
    }

    /// A target whose volume's durable state is `restored`.
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
            inconsistent_until: (!restored.clean).then_some(Seq(u64::MAX)),
            data_untrusted: false,
            lock_only: 0,
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

    /// A new connection, accepted at `now_ns`. `nonce` must be fresh and random. Nothing of the
    /// target's state changes until the connection authenticates. Refused with Busy (a REFUSE is
    /// queued for it) when [`TargetConfig::handshakes_max`] handshakes are already in flight.
    pub fn on_connect(
        &mut self,
        conn: ConnId,
        nonce: [u8; MAC_BYTES],
        now_ns: u64,
    ) -> Result<(), TargetError> {
        let full = self.handshakes.len() >= self.cfg.handshakes_max;
        self.handshakes.push(Handshake {
            conn,
            nonce,
            deadline_ns: now_ns.saturating_add(self.cfg.handshake_timeout_ns),
            state: HandshakeState::AwaitHello,
            out: VecDeque::new(),
        });
        if full {
            let last = self.handshakes.len() - 1;
            return Self::refuse_handshake(&mut self.handshakes[last], RefuseReason::Busy);
        }
        Ok(())
    }

    /// A connection is gone. If it was the session, entries not yet handed to the driver are
    /// dropped: the source resends them.
    pub fn on_disconnect(&mut self, conn: ConnId) {
        self.handshakes.retain(|h| h.conn != conn);
        self.closing.retain(|(c, _)| *c != conn);
        if self.session.is_some_and(|s| s.conn == conn) {
            self.drop_connection_state();
            self.session = None;
        }
    }

    /// The next connection the driver must close (after sending what [`Self::poll_transmit`]
    /// still has for it), and why.
    pub fn poll_close(&mut self) -> Option<(ConnId, CloseReason)> {
        self.closing.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called, if any deadline is pending.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<u64> {
        self.handshakes.iter().map(|h| h.deadline_ns).min()
    }

    /// Time has reached `now_ns`: handshakes past their deadline (refused ones whose driver has
    /// not closed them included) are forgotten, their slots free, and their connections are to
    /// be closed ([`Self::poll_close`]).
    pub fn handle_timeout(&mut self, now_ns: u64) {
        let closing = &mut self.closing;
        self.handshakes.retain(|h| {
            let expired = h.deadline_ns <= now_ns;
            if expired {
                closing.push_back((h.conn, CloseReason::HandshakeTimeout));
            }
            !expired
        });
    }

    /// The authenticated connection, if any.
    #[must_use]
    pub fn session(&self) -> Option<ConnId> {
        self.session.map(|s| s.conn)
    }

    /// Whether the engine still has a use for `conn`: it is the session, or a handshake that was
    /// neither refused nor timed out. Once false, the driver sends what [`Self::poll_transmit`]
    /// still has for it (a REFUSE, say) and closes it.
    #[must_use]
    pub fn is_open(&self, conn: ConnId) -> bool {
        self.is_session(conn)
            || self
                .handshakes
                .iter()
                .any(|h| h.conn == conn && h.state != HandshakeState::Refused)
    }

    fn is_session(&self, conn: ConnId) -> bool {
        self.session.is_some_and(|s| s.conn == conn)
    }

    fn drop_connection_state(&mut self) {
        let first_unapplied = self.last_handed_out().next();
        self.locks.unlock_mirror_from(first_unapplied);
        self.log.clear();
        self.lock_only = 0;
        self.log_bytes = 0;
        self.received = self.last_handed_out();
        self.epoch = 0;
        self.resend = None;
        self.out.clear();
        self.ack_dirty = false;
        self.receipt_wanted = false;
    }

    /// Last sequence number handed to the driver (applied or being applied).
    fn last_handed_out(&self) -> Seq {
        self.applying.back().copied().unwrap_or(self.applied)
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
    fn data_entries(&self) -> usize {
        self.log.len() - self.lock_only
    }

    /// A frame that failed to decode. A corrupted write payload (intact header) is answered with
    /// NAK and the stream goes on; anything else ends the connection.
    pub fn handle_wire_error(&mut self, conn: ConnId, err: &WireError) -> Result<(), TargetError> {
        let Some((seq, epoch)) = err.nak_seq() else {
            return Err(TargetError::Wire(err.clone()));
        };
        if !self.is_session(conn) {
            return Err(TargetError::Wire(err.clone()));
        }
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

    /// Checks that `seq` is the next new entry, or the newest entry waiting for its data.
    fn expect_new_or_pending(&self, seq: Seq) -> Result<(), TargetError> {
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

    fn next_new_seq(&self) -> Seq {
        self.log
            .back()
            .map(|e| e.seq)
            .unwrap_or_else(|| self.last_handed_out())
            .next()
    }

    /// Drops the commit log entries at or after `seq` and their locks.
    fn truncate_from(&mut self, seq: Seq) {
        while self.log.back().is_some_and(|e| e.seq >= seq) {
            if let Some(e) = self.log.pop_back() {
                self.lock_only -= usize::from(e.op.is_none());
                self.log_bytes -= e.op.as_ref().map_or(0, Op::payload_bytes);
            }
        }
        self.locks.unlock_mirror_from(seq);
        self.update_received();
    }

    /// One decoded frame from connection `conn`. On a protocol violation a REFUSE is queued
    /// before the error is returned, so the peer learns why it is disconnected.
    pub fn handle_frame(&mut self, conn: ConnId, frame: Frame) -> Result<(), TargetError> {
        if !self.is_session(conn) {
            return self.handle_handshake_frame(conn, frame);
        }
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

    /// A frame of a connection that has not authenticated. Nothing here changes the target's
    /// state before the AUTH verified.
    fn handle_handshake_frame(&mut self, conn: ConnId, frame: Frame) -> Result<(), TargetError> {
        let Some(index) = self.handshakes.iter().position(|h| h.conn == conn) else {
            return Err(TargetError::Protocol(SourceViolation::UnknownConn { conn }));
        };
        let told = self.last_handed_out();
        if let (TargetSabotage::TrustHelloBeforeAuth, Frame::Hello(hello)) = (self.sabotage, &frame)
        {
            if let Some(until) = self.inconsistent_until {
                self.inconsistent_until = Some(until.min(hello.last_seq));
                self.check_consistent();
            }
        }
        let h = &mut self.handshakes[index];
        match (h.state, frame) {
            (_, Frame::Pong { .. }) => Ok(()),
            (HandshakeState::AwaitHello, Frame::Hello(hello)) => {
                if hello.volume_id != self.cfg.volume_id {
                    return Self::refuse_handshake(h, RefuseReason::WrongVolume);
                }
                if hello.volume_bytes != self.cfg.volume_bytes
                    || hello.block_bytes != self.cfg.block_bytes
                {
                    return Self::refuse_handshake(h, RefuseReason::Geometry);
                }
                let mac = auth::sign(
                    &self.cfg.secret,
                    Signer::Target,
                    &hello.nonce,
                    &h.nonce,
                    &self.cfg.volume_id,
                );
                h.out.push_back(Frame::Hello(Hello {
                    volume_id: self.cfg.volume_id,
                    node_id: self.cfg.node_id,
                    generation: self.cfg.generation,
                    last_seq: told,
                    volume_bytes: self.cfg.volume_bytes,
                    block_bytes: self.cfg.block_bytes,
                    nonce: h.nonce,
                    mac,
                }));
                h.state = HandshakeState::AwaitAuth {
                    peer_nonce: hello.nonce,
                    peer_node: hello.node_id,
                    peer_last_seq: hello.last_seq,
                    told,
                };
                Ok(())
            }
            (
                HandshakeState::AwaitAuth {
                    peer_nonce,
                    peer_node,
                    peer_last_seq,
                    told,
                },
                Frame::Auth { mac },
            ) => {
                let ok = auth::verify(
                    &self.cfg.secret,
                    Signer::Source,
                    &h.nonce,
                    &peer_nonce,
                    &self.cfg.volume_id,
                    &mac,
                );
                if !ok {
                    return Self::refuse_handshake(h, RefuseReason::BadAuth);
                }
                self.admit(index, peer_node, peer_last_seq, told)
            }
            (HandshakeState::Refused, _) => {
                Err(TargetError::Protocol(SourceViolation::AfterRefusal {
                    conn,
                }))
            }
            (_, _) => {
                h.out.push_back(Frame::Refuse {
                    reason: RefuseReason::Protocol,
                });
                h.state = HandshakeState::Refused;
                Err(TargetError::Protocol(SourceViolation::BeforeAuth))
            }
        }
    }

    fn refuse_handshake(h: &mut Handshake, reason: RefuseReason) -> Result<(), TargetError> {
        h.out.push_back(Frame::Refuse { reason });
        h.state = HandshakeState::Refused;
        Err(TargetError::Refused(reason))
    }

    /// The handshake at `index` authenticated: it becomes the session, or is refused with Busy
    /// when another node holds the session, or when the target moved since our HELLO (a replaced
    /// session of the same node was still handing out operations; the source retries).
    fn admit(
        &mut self,
        index: usize,
        node: NodeId,
        peer_last_seq: Seq,
        told: Seq,
    ) -> Result<(), TargetError> {
        if let Some(old) = self.session {
            if old.node != node {
                return Self::refuse_handshake(&mut self.handshakes[index], RefuseReason::Busy);
            }
            self.drop_connection_state();
            self.session = None;
            self.closing.push_back((old.conn, CloseReason::Replaced));
        }
        if self.last_handed_out() != told {
            return Self::refuse_handshake(&mut self.handshakes[index], RefuseReason::Busy);
        }
        let h = self.handshakes.swap_remove(index);
        self.out = h.out;
        if let Some(until) = self.inconsistent_until {
            // The source's last sequence number bounds what must be re-applied.
            self.inconsistent_until = Some(until.min(peer_last_seq));
            self.check_consistent();
        }
        self.session = Some(Session { conn: h.conn, node });
        self.ack_dirty = true;
        Ok(())
    }

    fn handle_frame_inner(&mut self, frame: Frame) -> Result<(), TargetError> {
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
    fn attach_data(
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

    fn refuse_protocol(&mut self, why: SourceViolation) -> Result<(), TargetError> {
        self.out.push_back(Frame::Refuse {
            reason: RefuseReason::Protocol,
        });
        Err(TargetError::Protocol(why))
    }

    /// Decides whether a data frame of `epoch` is processed (true), silently dropped (false), or
    /// a protocol violation.
    fn accept_epoch(&mut self, seq: Seq, epoch: u32) -> Result<bool, TargetError> {
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

    fn check_extent(&self, offset_bytes: u64, len_bytes: u64) -> Result<Range, TargetError> {
        Range::checked(
            offset_bytes,
            len_bytes,
            u64::from(self.cfg.block_bytes),
            self.cfg.volume_bytes,
        )
        .map_err(|e| TargetError::Protocol(e.into()))
    }

    fn new_entry(
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

    fn reject(&mut self, seq: Seq, range: Range) {
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
    fn index_of(&self, seq: Seq) -> Option<usize> {
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
    fn update_received(&mut self) {
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
    fn pump_locks(&mut self) {
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

    /// The next operation to apply, strictly in sequence order, once its lock is held.
    pub fn poll_apply(&mut self) -> Option<Apply> {
        let index = self.ready_index()?;
        let entry = self.log.remove(index)?;
        let op = entry.op?;
        self.log_bytes -= op.payload_bytes();
        self.applying.push_back(entry.seq);
        Some(Apply { seq: entry.seq, op })
    }

    fn entry_ready(e: &Entry) -> bool {
        e.op.is_some() && e.lock != LockState::Waiting
    }

    fn ready_index(&self) -> Option<usize> {
        match self.sabotage {
            TargetSabotage::None | TargetSabotage::TrustHelloBeforeAuth => {
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

    /// Whether applied operations wait for a sync of the volume before they count as durable.
    #[must_use]
    pub fn needs_sync(&self) -> bool {
        self.applied > self.durable
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
        self.check_consistent();
    }

    fn check_consistent(&mut self) {
        if !self.data_untrusted
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
        }
    }

    /// Number of mirror locks and waiters (bounded by the commit log) and local locks.
    #[must_use]
    pub fn lock_counts(&self) -> (usize, usize) {
        (self.locks.mirror_count(), self.locks.local_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{LockStyle, Mode, Source, SourceConfig};
    use crate::types::Lba;
    use crate::wire::{decode, SummedOp};
    use bytes::Bytes;

    const VOLUME_BYTES: u64 = 1 << 20;
    const C: ConnId = ConnId(1);

    fn new_source(mode: Mode, node: u64) -> Source {
        Source::new(SourceConfig {
            volume_id: VolumeId([7; 16]),
            node_id: NodeId(node),
            generation: Generation(1),
            volume_bytes: VOLUME_BYTES,
            block_bytes: 4096,
            secret: b"s".to_vec(),
            mode,
            flush_replicates: false,
            lock_style: LockStyle::Implied,
            log_bytes_max: 1 << 20,
            log_entries_max: 64,
        })
    }

    fn new_target(restored: Restored) -> Target {
        Target::new(
            TargetConfig {
                volume_id: VolumeId([7; 16]),
                node_id: NodeId(2),
                generation: Generation(1),
                volume_bytes: VOLUME_BYTES,
                block_bytes: 4096,
                secret: b"s".to_vec(),
                conflict_policy: ConflictPolicy::Wait,
                commit_log_bytes_max: 1 << 20,
                commit_log_entries_max: 64,
                local_locks_max: 4,
                handshake_timeout_ns: HANDSHAKE_TIMEOUT_NS_DEFAULT,
                handshakes_max: HANDSHAKES_MAX_DEFAULT,
            },
            restored,
        )
    }

    const FRESH: Restored = Restored {
        durable: Seq::NONE,
        clean: true,
    };

    fn pair(mode: Mode) -> (Source, Target) {
        let mut source = new_source(mode, 1);
        let mut target = new_target(FRESH);
        target.on_connect(C, [1; MAC_BYTES], 0).unwrap();
        source.on_connect([2; MAC_BYTES]);
        let acks = exchange(&mut source, &mut target);
        assert!(target.is_ready(), "handshake");
        assert_eq!(
            acks,
            vec![(Seq::NONE, Seq::NONE)],
            "the ACK that opens a session"
        );
        (source, target)
    }

    /// Moves frames both ways, through the codec, until both are quiet. Returns the ACKs the
    /// target sent as (received, durable).
    fn exchange(source: &mut Source, target: &mut Target) -> Vec<(Seq, Seq)> {
        exchange_on(source, target, C).unwrap()
    }

    /// [`exchange`] on connection `conn`; the first error either side reports ends it.
    fn exchange_on(
        source: &mut Source,
        target: &mut Target,
        conn: ConnId,
    ) -> Result<Vec<(Seq, Seq)>, String> {
        let mut acks = Vec::new();
        for _ in 0..16 {
            let mut moved = false;
            while let Some(frame) = source.poll_transmit() {
                let bytes = frame.encode().to_vec();
                let (decoded, _) = decode(&bytes).unwrap().unwrap();
                target
                    .handle_frame(conn, decoded)
                    .map_err(|e| format!("target: {e}"))?;
                moved = true;
            }
            while let Some(frame) = target.poll_transmit(conn) {
                if let Frame::Ack { received, durable } = frame {
                    acks.push((received, durable));
                }
                source
                    .handle_frame(frame)
                    .map_err(|e| format!("source: {e}"))?;
                moved = true;
            }
            if !moved {
                break;
            }
        }
        Ok(acks)
    }

    fn write(source: &mut Source, block: u64) -> Seq {
        let op = Op::Write {
            lba: Lba(8 * block),
            data: Bytes::from(vec![0x3c; 4096]),
        };
        source.submit(op, 1).unwrap()
    }

    /// A HELLO as anyone who knows the volume's id and geometry (not the secret) can send it.
    fn forged_hello(last_seq: Seq) -> Frame {
        Frame::Hello(Hello {
            volume_id: VolumeId([7; 16]),
            node_id: NodeId(1),
            generation: Generation(1),
            last_seq,
            volume_bytes: VOLUME_BYTES,
            block_bytes: 4096,
            nonce: [9; MAC_BYTES],
            mac: [0; MAC_BYTES],
        })
    }

    /// What a restarted target trusts: its own record; nothing for a new volume; never a record
    /// of another volume, another size, a primary, or one that predates the volume.
    #[test]
    fn recovery_trusts_only_a_record_of_this_volume() {
        let facts = VolumeFacts {
            volume_id: VolumeId([7; 16]),
            volume_bytes: VOLUME_BYTES,
            created: false,
        };
        let own = MetaRecord {
            durable: Seq(9),
            clean: false,
            ..MetaRecord::new(facts.volume_id, VOLUME_BYTES)
        };
        assert_eq!(
            recover(Some(&own), &facts),
            Ok((
                Restored {
                    durable: Seq(9),
                    clean: false
                },
                RecoveryKind::Resumed
            ))
        );
        // An existing volume without a record (new to the mirror, or replaced): seq 0, and its
        // data is not trusted.
        let (adopted, kind) = recover(None, &facts).unwrap();
        assert_eq!(kind, RecoveryKind::Adopted);
        assert!(!adopted.clean && !kind.trusts_data());
        let unverified = MetaRecord {
            consistent: false,
            clean: true,
            ..own
        };
        assert_eq!(
            recover(Some(&unverified), &facts).map(|r| r.1),
            Ok(RecoveryKind::Unverified)
        );
        let created = VolumeFacts {
            created: true,
            ..facts
        };
        assert_eq!(
            recover(None, &created).map(|r| r.1),
            Ok(RecoveryKind::Fresh)
        );
        assert_eq!(
            recover(Some(&own), &created),
            Err(RecoverError::MetaOfEarlierVolume)
        );
        let other = MetaRecord {
            volume_id: VolumeId([8; 16]),
            ..own
        };
        assert!(matches!(
            recover(Some(&other), &facts),
            Err(RecoverError::OtherVolume { .. })
        ));
        let grown = MetaRecord {
            volume_bytes: 2 * VOLUME_BYTES,
            ..own
        };
        assert!(matches!(
            recover(Some(&grown), &facts),
            Err(RecoverError::Size { .. })
        ));
        let primary = MetaRecord {
            role: Role::Primary,
            node_id: NodeId(4),
            ..own
        };
        let err = recover(Some(&primary), &facts).unwrap_err();
        assert_eq!(err.to_string(), "it was written by a primary (node 4)");
    }

    /// A volume whose data is not trusted (adopted without a record) stays inconsistent after the
    /// source's resend; one that is (a fresh volume, an unclean stop) does not.
    #[test]
    fn an_untrusted_volume_stays_inconsistent_after_the_resend() {
        for (kind, consistent_after) in [
            (RecoveryKind::Adopted, false),
            (RecoveryKind::Unverified, false),
            (RecoveryKind::Resumed, true),
        ] {
            let restored = Restored {
                durable: Seq::NONE,
                clean: false,
            };
            let mut target = Target::recovered(new_target(FRESH).cfg.clone(), restored, kind);
            let mut source = new_source(Mode::Sync, 1);
            write(&mut source, 0);
            source.on_connect([2; MAC_BYTES]);
            target.on_connect(C, [3; MAC_BYTES], 0).unwrap();
            exchange(&mut source, &mut target);
            let apply = target.poll_apply().unwrap();
            target.handle_applied(apply.seq);
            target.handle_durable(apply.seq);
            assert_eq!(target.status().consistent, consistent_after, "{kind:?}");
        }
    }

    /// Item 9a: before this fix the forged HELLO alone cleared "inconsistent" (the HELLO's
    /// `last_seq` 0 bounded the resend that an unclean restart needs).
    #[test]
    fn an_unauthenticated_hello_changes_nothing() {
        let mut target = new_target(Restored {
            durable: Seq(5),
            clean: false,
        });
        let before = target.status();
        assert!(!before.consistent);
        let intruder = ConnId(9);
        target.on_connect(intruder, [1; MAC_BYTES], 0).unwrap();
        target
            .handle_frame(intruder, forged_hello(Seq::NONE))
            .unwrap();
        assert!(matches!(
            target.poll_transmit(intruder),
            Some(Frame::Hello(_))
        ));
        assert_eq!(
            target.handle_frame(
                intruder,
                Frame::Auth {
                    mac: [0; MAC_BYTES]
                }
            ),
            Err(TargetError::Refused(RefuseReason::BadAuth))
        );
        assert_eq!(
            target.poll_transmit(intruder),
            Some(Frame::Refuse {
                reason: RefuseReason::BadAuth
            })
        );
        target.on_disconnect(intruder);
        assert_eq!(target.status(), before);

        // The real source's HELLO, once authenticated, bounds the resend: consistent again once
        // its last seq (7) is durable.
        let mut source = new_source(Mode::Sync, 1);
        for block in 0..7 {
            write(&mut source, block);
        }
        source.on_connect([2; MAC_BYTES]);
        target.on_connect(C, [3; MAC_BYTES], 0).unwrap();
        exchange(&mut source, &mut target);
        for want in [6, 7] {
            assert!(!target.status().consistent);
            let apply = target.poll_apply().unwrap();
            assert_eq!(apply.seq, Seq(want));
            target.handle_applied(apply.seq);
            target.handle_durable(apply.seq);
        }
        assert!(target.status().consistent);
    }

    /// Item 9b: a silent connection neither takes the session nor outlives its deadline, and
    /// handshakes in flight are bounded.
    #[test]
    fn a_silent_connection_blocks_nobody() {
        let mut target = new_target(FRESH);
        let silent = ConnId(9);
        target.on_connect(silent, [1; MAC_BYTES], 0).unwrap();
        let mut source = new_source(Mode::Sync, 1);
        source.on_connect([2; MAC_BYTES]);
        target.on_connect(C, [3; MAC_BYTES], 10).unwrap();
        exchange_on(&mut source, &mut target, C).unwrap();
        assert_eq!(target.session(), Some(C));

        assert_eq!(target.poll_timeout(), Some(HANDSHAKE_TIMEOUT_NS_DEFAULT));
        target.handle_timeout(HANDSHAKE_TIMEOUT_NS_DEFAULT - 1);
        assert_eq!(target.poll_close(), None);
        target.handle_timeout(HANDSHAKE_TIMEOUT_NS_DEFAULT);
        assert_eq!(
            target.poll_close(),
            Some((silent, CloseReason::HandshakeTimeout))
        );
        assert_eq!(target.poll_timeout(), None);
        assert_eq!(target.session(), Some(C), "the session is not timed out");

        let now = HANDSHAKE_TIMEOUT_NS_DEFAULT;
        for i in 0..HANDSHAKES_MAX_DEFAULT as u64 {
            target
                .on_connect(ConnId(100 + i), [1; MAC_BYTES], now)
                .unwrap();
        }
        let over = ConnId(200);
        assert_eq!(
            target.on_connect(over, [1; MAC_BYTES], now),
            Err(TargetError::Refused(RefuseReason::Busy))
        );
        assert_eq!(
            target.poll_transmit(over),
            Some(Frame::Refuse {
                reason: RefuseReason::Busy
            })
        );
        target.on_disconnect(over);
        target.handle_timeout(now + HANDSHAKE_TIMEOUT_NS_DEFAULT);
        let closed = std::iter::from_fn(|| target.poll_close()).count();
        assert_eq!(closed, HANDSHAKES_MAX_DEFAULT);
        target.on_connect(ConnId(300), [1; MAC_BYTES], now).unwrap();
    }

    /// Item 9c: the source reconnects while its old connection is still open on the target (a
    /// lost FIN): the new session replaces the stale one. Another node gets Busy.
    #[test]
    fn a_reconnect_replaces_its_own_stale_session() {
        let (mut source, mut target) = pair(Mode::Sync);
        let seq = write(&mut source, 0);
        exchange(&mut source, &mut target);
        let apply = target.poll_apply().unwrap();
        target.handle_applied(apply.seq);
        target.handle_durable(apply.seq);
        exchange(&mut source, &mut target);
        assert_eq!(source.poll_completion(), Some(seq));

        // The source saw the link die; the target did not.
        source.on_disconnect();
        let second = write(&mut source, 1);
        let fresh = ConnId(2);
        source.on_connect([4; MAC_BYTES]);
        target.on_connect(fresh, [5; MAC_BYTES], 0).unwrap();
        exchange_on(&mut source, &mut target, fresh).unwrap();
        assert_eq!(target.session(), Some(fresh));
        assert_eq!(target.poll_close(), Some((C, CloseReason::Replaced)));
        assert_eq!(target.status().received, second);
        assert!(
            target.handle_frame(C, Frame::Ping { token: 1 }).is_err(),
            "the replaced connection is dead"
        );

        let mut other = new_source(Mode::Sync, 3);
        other.on_connect([6; MAC_BYTES]);
        let third = ConnId(3);
        target.on_connect(third, [7; MAC_BYTES], 0).unwrap();
        let refused = exchange_on(&mut other, &mut target, third);
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(
            target.session(),
            Some(fresh),
            "another node does not replace it"
        );
    }

    /// A replaced session's operations were still being handed out after our HELLO told the new
    /// connection where the target stands: the new one is refused with Busy, and its retry works.
    #[test]
    fn a_replacement_that_raced_the_old_session_retries() {
        let (mut old, mut target) = pair(Mode::Sync);
        // The same node after a restart, say: its log has the write the old connection carries.
        let mut new = new_source(Mode::Sync, 1);
        write(&mut new, 0);
        new.on_connect([4; MAC_BYTES]);
        let fresh = ConnId(2);
        target.on_connect(fresh, [5; MAC_BYTES], 0).unwrap();
        let hello = new.poll_transmit().unwrap();
        target.handle_frame(fresh, hello).unwrap();
        let ours = target.poll_transmit(fresh).unwrap();
        new.handle_frame(ours).unwrap();
        // Meanwhile the old connection delivers a write that is handed out.
        write(&mut old, 0);
        exchange(&mut old, &mut target);
        assert!(target.poll_apply().is_some());
        let auth = new.poll_transmit().unwrap();
        assert_eq!(
            target.handle_frame(fresh, auth),
            Err(TargetError::Refused(RefuseReason::Busy))
        );
        assert_eq!(target.poll_close(), Some((C, CloseReason::Replaced)));
        target.on_disconnect(fresh);
        assert_eq!(target.session(), None);
        new.on_disconnect();
        new.on_connect([6; MAC_BYTES]);
        target.on_connect(ConnId(3), [7; MAC_BYTES], 0).unwrap();
        exchange_on(&mut new, &mut target, ConnId(3)).unwrap();
        assert_eq!(target.session(), Some(ConnId(3)));
    }

    /// The daemon checksums a write on its capture thread ([`SummedOp`]); the source's data
    /// frames carry that checksum, in every mode (lock-then-write adds LOCK frames), the bytes
    /// decode back to the same frames, and the target takes them.
    #[test]
    fn writes_go_out_with_the_checksum_taken_at_submit() {
        for mode in Mode::ALL {
            let (mut src, mut target) = pair(mode);
            let mut submitted = Vec::new();
            for i in 0..3u8 {
                let op = SummedOp::new(Op::Write {
                    lba: Lba(8 * u64::from(i)),
                    data: Bytes::from(vec![i ^ 0xa5; 4096]),
                });
                submitted.push(op.clone());
                src.submit(op, 1).unwrap();
            }
            let mut writes = Vec::new();
            let mut sent = 0;
            while let Some(frame) = src.poll_transmit() {
                if let Frame::Op { op, .. } = &frame {
                    writes.push(op.clone());
                }
                let (back, _) = decode(&frame.encode().to_vec()).unwrap().unwrap();
                assert_eq!(back, frame, "{mode:?}");
                target.handle_frame(C, back).unwrap();
                sent += 1;
                if mode == Mode::LockThenWrite {
                    // Grants come back before the WRITEs go.
                    while let Some(f) = target.poll_transmit(C) {
                        src.handle_frame(f).unwrap();
                    }
                }
            }
            assert_eq!(writes, submitted, "{mode:?}");
            let frames = if mode == Mode::LockThenWrite { 6 } else { 3 };
            assert_eq!(sent, frames, "{mode:?}");
            assert_eq!(target.status().received, Seq(3), "{mode:?}");
        }
    }

    #[test]
    fn receipt_is_acknowledged_at_once_only_in_received_mode() {
        for mode in [Mode::Async, Mode::Received, Mode::Sync, Mode::LockThenWrite] {
            let (mut source, mut target) = pair(mode);
            let op = Op::Write {
                lba: Lba(8),
                data: Bytes::from(vec![0x5a; 4096]),
            };
            let seq = source.submit(op, 1).unwrap();
            let acks = exchange(&mut source, &mut target);
            assert_eq!(target.status().received, seq, "{mode:?}");
            let completed = source.poll_completion() == Some(seq);
            if mode == Mode::Received {
                assert_eq!(acks, vec![(seq, Seq::NONE)], "{mode:?}");
                assert!(completed, "{mode:?}: received write completes on receipt");
            } else {
                // No frame just for receipt: it travels with the durability ACK.
                assert_eq!(acks, vec![], "{mode:?}");
                assert_eq!(completed, mode == Mode::Async, "{mode:?}");
            }
            let apply = target.poll_apply().unwrap();
            target.handle_applied(apply.seq);
            target.handle_durable(apply.seq);
            assert_eq!(
                exchange(&mut source, &mut target),
                vec![(seq, seq)],
                "{mode:?}"
            );
            if !matches!(mode, Mode::Async | Mode::Received) {
                assert_eq!(source.poll_completion(), Some(seq), "{mode:?}");
            }
            assert_eq!(source.status().log_entries, 0, "{mode:?}");
        }
    }
}
