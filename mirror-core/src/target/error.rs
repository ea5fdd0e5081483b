//! Why a connection must close.

use super::*;

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
