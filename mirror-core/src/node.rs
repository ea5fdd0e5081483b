//! A node: one volume's role, its engines and its persistent metadata.
//!
//! A [`Node`] is keyed by its volume (a daemon may later hold several, one per [`VolumeId`]). A
//! primary holds one [`PeerLink`] per peer ([`Peers`], keyed by [`PeerId`]; one today), a
//! secondary its [`Target`].
//! The metadata record ([`MetaRecord`]) is defined for both roles and both persist it: the target
//! server's group commit writes what [`Node::record`] returns, the primary's driver the record of
//! a clean stop after the drain (what a restart trusts of it is [`recover_primary`]).
//! The replicator and the simulator drive a primary's link the same way, through its
//! [`PeerLink`]: its timers ([`PeerLink::poll_timeout`]) include the start's connect deadline and
//! the stop's drain limit, so no driver decides how long to wait for its peer.
//!
//! [`PeerLink`] is everything a primary decides about one peer, so that the replicator and the
//! simulator run the same policy: the [`Source`] engine, its connection lifecycle
//! ([`SourceSession`]), the one submission parked while the rollback log is full, which errors
//! stop replication for good, and the events the driver forwards to the host's waiters
//! ([`PeerEvent`]: a completion per the mode, "durable through N", connected, stopped).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use crate::bitmap::DirtyBitmap;
use crate::log::{MemLog, RollbackLog};
use crate::meta::{MetaRecord, Role, BITMAP_CHUNK_BYTES};
use crate::session::{SessionAction, SourceSession};
use crate::source::{ConnState, FullResync, Mode, Source, SourceError, SourceStatus};
use crate::target::Target;
use crate::wire::{Frame, Op, ResyncMark, SummedOp, MAC_BYTES, PAYLOAD_BYTES_MAX};
use crate::Range;
use crate::{Seq, VolumeId};

/// Which peer of a volume (a primary mirrors to one today; the key leaves room for more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PeerId(pub u32);

/// What happened to a submission offered to [`PeerLink::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// In the rollback log with this sequence number; its completion comes as
    /// [`PeerEvent::Completed`].
    Accepted(Seq),
    /// The log is full: the link keeps the operation and takes it when there is room
    /// ([`PeerEvent::Accepted`] with the caller's token). Offer nothing else meanwhile
    /// ([`PeerLink::is_parked`]).
    Parked,
    /// The primary overflows ([`PeerLink::overflow`]): the operation is not queued for the peer;
    /// its chunks are marked out of sync in the write intent (store it first, as for an accepted
    /// write) and a resync carries them once the peer takes data again. It is complete once it
    /// is done locally.
    OutOfSync,
}

/// Why a submission was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Not valid for this volume, or larger than the rollback log could ever hold.
    #[error(transparent)]
    Invalid(SourceError),
    /// Replication stopped for good; nothing more is taken.
    #[error("replication stopped: {0}")]
    Stopped(SourceError),
    /// A submission is already parked: the driver must wait for [`PeerEvent::Accepted`].
    #[error("a submission already waits for room in the rollback log")]
    AlreadyParked,
    /// A resync must enter the log first ([`PeerLink::takes_host_ops`]).
    #[error("a resync waits to enter the rollback log before host operations")]
    Resyncing,
    /// An overflow's resync step met a host operation waiting for room in the log: the link
    /// takes it back and hands it out again later (nothing to do for the driver).
    #[error("the resync step was withdrawn: a host operation waits for room in the log")]
    Withdrawn,
    /// [`PeerLink::resync_submit`] got an operation of another step.
    #[error("resync operation on {got}, the link asked for {asked:?}")]
    NotResyncStep {
        /// The range of what the driver handed over.
        got: String,
        /// What [`PeerLink::poll_resync`] asked for, if anything.
        asked: Option<ResyncStep>,
    },
}

/// Why a wait for "replicated through N" cannot be granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// No operation with that sequence number was ever submitted.
    #[error("seq {0} was never submitted")]
    NeverSubmitted(Seq),
    /// Replication stopped for good before it got there.
    #[error("replication stopped: {0}")]
    Stopped(SourceError),
}

/// Why a drain ([`PeerLink::begin_drain`]) ended before the peer held everything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    /// The limit passed first.
    #[error(
        "the target did not catch up within {limit_secs} s: durable through seq {durable}, the \
         last local seq is {through}"
    )]
    TimedOut {
        /// The last local seq at the limit.
        through: Seq,
        /// What the peer held durable at the limit.
        durable: Seq,
        /// The limit, in whole seconds.
        limit_secs: u64,
    },
    /// Replication stopped for good.
    #[error("replication stopped: {}", .0.describe())]
    Stopped(SourceError),
}

/// What the driver forwards to the host's waiters, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// The parked submission with this token entered the log as `seq`.
    Accepted {
        /// The driver's token given to [`PeerLink::submit`].
        token: u64,
        /// Its sequence number.
        seq: Seq,
    },
    /// Operation `seq` is complete per the acknowledgement mode.
    Completed(Seq),
    /// Everything through this seq is applied and durable on the peer, and no write recorded
    /// out of sync since is missing there ([`PeerLink::replicated`]; waiters of
    /// [`PeerLink::check_replicated`] wake); reported once per advance.
    Durable(Seq),
    /// A handshake completed: the peer is authenticated and shipping started.
    Connected,
    /// The start's connect deadline passed without a handshake, and this start may serve the
    /// host without its peer (a primary resumed from the record of a clean stop): host
    /// operations enter the rollback log and the link keeps reconnecting; `sync` writes wait for
    /// the peer. The driver goes on (a start that may not degrade stops with
    /// [`SourceError::Unreachable`] instead).
    Degraded {
        /// The deadline's bound, in whole seconds.
        secs: u64,
    },
    /// The driver stores its running record (not clean) with the peer durable through
    /// `durable`, before it hands over anything more: once, before the host's first write can
    /// reach the local volume (ahead of the first [`PeerEvent::Connected`] or of
    /// [`PeerEvent::Degraded`]), so that a crash is never taken for a clean stop; and whenever
    /// the peer held none of this volume's history (`rebased`: the sequence now continues after
    /// the peer's seq, lower or higher than the record's, and a full resync follows), so that a
    /// crash is checked against the peer's new position, not the lost one.
    RecordRunning {
        /// What the peer holds durably.
        durable: Seq,
        /// The sequence was rebased on the peer's for a full resync: every wait for a seq of
        /// the old numbering ([`PeerLink::check_replicated`]) waits for this seq now (the full
        /// copy's end comes at or after it).
        rebased: Option<Seq>,
    },
    /// Replication stopped for good with this error: every pending operation, the parked one and
    /// every waiter fail with it; later submissions are refused. The driver closes the connection.
    Stopped(SourceError),
    /// The drain [`PeerLink::begin_drain`] started is over: the peer holds everything through
    /// this seq durably, or why not.
    Drained(Result<Seq, DrainError>),
}

/// Why the driver must close the connection (the link has already taken note).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct CloseConn {
    /// What went wrong.
    pub error: SourceError,
    /// Whether replication stopped for good ([`PeerEvent::Stopped`] follows); else the session
    /// reconnects after its backoff.
    pub fatal: bool,
}

/// Deliberate bugs for tests that prove the simulator's checkers bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PeerSabotage {
    /// Behave correctly.
    #[default]
    None,
    /// Drop the parked submission when room appears, reporting it accepted as if it had been
    /// taken into the log.
    DropParked,
    /// Stop replication for good on an error a reconnect cures (a busy target, a broken frame,
    /// a target that lost its data).
    StopOnRetryable,
    /// Report a drain complete as soon as it begins.
    DrainEarly,
    /// Report "durable through N" for what was received, not what the peer made durable.
    DurableEarly,
    /// Never ask the driver to store the write intent before a write reaches the local volume.
    SkipIntentStore,
    /// Report the peer up to date once it received everything, not once it made it durable.
    UpToDateEarly,
    /// Complete a write while overflowing without marking its chunks out of sync.
    OverflowUnmarked,
    /// Tell the peer's data from the log alone, blind to an overflow and its resync.
    UpToDateOverflowing,
    /// Take a chunk off the out-of-sync map once its copy is in the log, even if a write marked
    /// it again while the copy was under way.
    CopyIgnoresRewrites,
    /// Never ask for the running record to be stored when the peer becomes outdated.
    OutdatedUnrecorded,
    /// A peer that lost its data while the primary ran gets the log resent and a full bracket
    /// around nothing: no chunk is marked out of sync for the copy.
    LostDataResentOnly,
    /// Queue a write the log has room for while an overflow's resync has not begun (no Ahead
    /// rule): it reaches a target that calls itself consistent without the writes out of sync.
    NoAheadRule,
}

/// What a primary can say of its peer's copy ([`PeerLink::peer_data`]): a status that says
/// "up to date" only when it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerData {
    /// Connected, no resync open, and every operation this primary took is durable there.
    UpToDate,
    /// Connected, and this many operations are not durable there yet.
    Behind {
        /// Operations taken and not durable on the peer.
        ops: u64,
    },
    /// Writes since the primary overflowed are not on the peer: this many chunks wait for a
    /// resync (it starts once the peer takes data again).
    OutOfSync {
        /// Chunks marked out of sync.
        chunks: u64,
    },
    /// A resync is under way: the peer is not consistent until its end is durable.
    Resyncing {
        /// Whether it copies the whole volume.
        full: bool,
    },
    /// Not connected (or not yet admitted): what the peer holds is not known now; this many
    /// operations were not durable there when it was last heard of.
    Unknown {
        /// Operations taken and not known durable on the peer.
        ops: u64,
    },
}

impl fmt::Display for PeerData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerData::UpToDate => f.write_str("up to date"),
            PeerData::Behind { ops } => write!(f, "behind by {ops} operations"),
            PeerData::OutOfSync { chunks } => {
                write!(
                    f,
                    "outdated ({chunks} chunks out of sync, resynced once it takes data)"
                )
            }
            PeerData::Resyncing { full: true } => f.write_str("resyncing in full (inconsistent)"),
            PeerData::Resyncing { full: false } => f.write_str("resyncing (inconsistent)"),
            PeerData::Unknown { ops } => {
                write!(
                    f,
                    "unknown (not connected; {ops} operations not known durable there)"
                )
            }
        }
    }
}

/// A primary's replication to one peer: the engine, its session and its waiting rules.
#[derive(Debug)]
pub struct PeerLink<L: RollbackLog = MemLog> {
    source: Source<L>,
    sabotage: PeerSabotage,
    session: SourceSession,
    parked: Option<Parked>,
    fatal: Option<SourceError>,
    /// Whether [`PeerEvent::Connected`] was reported for the current connection.
    announced: bool,
    durable_reported: Seq,
    events: VecDeque<PeerEvent>,
    connects: u64,
    disconnects: u64,
    /// Replication stops if no handshake completed by then (the deadline, and the limit it came
    /// from).
    connect_deadline: Option<(u64, u64)>,
    /// A drain under way: the seq the peer must hold, and when the drain gives up.
    drain: Option<Drain>,
    /// Which chunks hold writes the peer has not made durable ([`Self::take_intent_store`]).
    intent: WriteIntent,
    /// A resync that must enter the log before host operations (a primary restarted after a
    /// crash), until its last step is submitted.
    resync: Option<ResyncPlan>,
    /// The step [`Self::poll_resync`] handed out, until it is submitted.
    resync_step: Option<ResyncStep>,
    resync_piece_bytes_max: u64,
    /// The resync's progress, from the restart until its end is durable.
    resync_track: Option<ResyncTrack>,
    /// What this start may do before its first handshake.
    start: StartRule,
    /// The driver was told to store its running record ([`PeerEvent::RecordRunning`]).
    record_told: bool,
    /// When host writes stop being queued for the peer.
    overflow_rule: OverflowRule,
    /// Since when no handshake holds (none while connected).
    down_since_ns: Option<u64>,
    /// The overflow under way: writes are recorded as out of sync, and resynced.
    overflow: Option<Overflow>,
    /// The step handed out belongs to the overflow's resync (host operations go on meanwhile).
    step_interleaved: bool,
    /// Writes completed out of sync since the start.
    out_of_sync_writes: u64,
    /// Host writes queued because an overflow's resync did not converge.
    throttled_writes: u64,
    /// An overflow's resync copies at most this many bytes per second (none: as fast as the log
    /// takes them).
    resync_rate_bytes_per_s: Option<u64>,
    /// The next overflow copy is not handed out before this.
    resync_next_ns: u64,
    /// The last [`Self::poll_resync`] held a copy back for the rate limit alone (a timer).
    rate_waiting: bool,
    /// An overflow's resync without a new low of its chunks out of sync for this long does not
    /// converge ([`OverflowStatus::converging`]).
    converge_window_ns: u64,
    /// While one does not converge, host writes queue (and wait for room) instead of
    /// overflowing, and its copies stop yielding to them.
    throttle: bool,
    /// Whether the host was throttled as of the last submission or resync step (what
    /// [`Self::copy_reserve`] goes by between them).
    throttled: bool,
    /// The last seq before the first write recorded out of sync that no durable resync end
    /// covers yet: the peer holds the volume as of no later seq.
    out_of_sync_after: Option<Seq>,
}

/// When a primary stops queueing host writes for its peer and records their chunks as out of
/// sync instead (SPEC §3: the host never stalls because of the peer). In `sync` and
/// `lock-then-write` the peer's pace is the mode's promise: a full log waits, and an unreachable
/// peer is handled as `sync_peer_gone` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverflowRule {
    /// Whether writes ever overflow (`false`: a full log waits, as before overflow existed).
    pub enabled: bool,
    /// A peer unreachable for this long makes every write overflow (until then writes queue
    /// while the log has room).
    pub after_down_ns: u64,
    /// What `sync` does once the peer has been unreachable that long.
    pub sync_peer_gone: SyncPeerGone,
}

impl OverflowRule {
    /// Never overflow.
    pub const OFF: OverflowRule = OverflowRule {
        enabled: false,
        after_down_ns: u64::MAX,
        sync_peer_gone: SyncPeerGone::Suspend,
    };
}

/// What a `sync` primary does while its peer is unreachable (DRBD's fencing choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPeerGone {
    /// Writes wait until the peer returns (or the operator stops or switches the mode): an
    /// acknowledged write is always on the peer.
    #[default]
    Suspend,
    /// Writes complete locally and their chunks are marked out of sync; the peer is outdated
    /// until the resync that follows its return.
    Degrade,
}

impl fmt::Display for SyncPeerGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SyncPeerGone::Suspend => "suspend",
            SyncPeerGone::Degrade => "degrade",
        })
    }
}

impl std::str::FromStr for SyncPeerGone {
    type Err = String;

    fn from_str(s: &str) -> Result<SyncPeerGone, String> {
        match s {
            "suspend" => Ok(SyncPeerGone::Suspend),
            "degrade" => Ok(SyncPeerGone::Degrade),
            other => Err(format!("unknown policy {other:?} (suspend or degrade)")),
        }
    }
}

/// Why a primary overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowCause {
    /// A write found the rollback log full.
    LogFull,
    /// The peer was unreachable longer than the rule's bound.
    PeerGone,
    /// The peer's volume lost this volume's data while the primary ran: every chunk is out of
    /// sync, copied in full while host writes go on.
    PeerLostData,
}

impl fmt::Display for OverflowCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverflowCause::LogFull => "the rollback log was full",
            OverflowCause::PeerGone => "the peer was unreachable too long",
            OverflowCause::PeerLostData => "the peer's volume lost this volume's data",
        })
    }
}

/// An overflow: from the first write recorded out of sync until the resync that carries them all
/// has handed out its end.
#[derive(Debug, Clone, Copy)]
struct Overflow {
    cause: OverflowCause,
    /// Its next resync copies the whole volume into a peer without this volume's history (its
    /// end gives the peer the history).
    full: bool,
    /// The resync's begin mark was handed out.
    begun: bool,
    /// Its end mark was handed out (and not yet submitted).
    ending: bool,
    /// The chunk whose copy is under way.
    copying: Option<Copying>,
    /// Where the search for the next chunk to copy starts.
    cursor: u64,
    /// The fewest chunks out of sync since its resync began, and when that low was reached.
    low_chunks: u64,
    low_at_ns: u64,
}

#[derive(Debug, Clone, Copy)]
struct Copying {
    chunk: u64,
    /// The next byte to copy, and the chunk's end.
    at: u64,
    end: u64,
    /// A write marked the chunk again after its copy began: it is copied again.
    dirtied: bool,
}

/// An overflow as a status report shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverflowStatus {
    /// Why it began.
    pub cause: OverflowCause,
    /// Chunks written since then and not yet copied to the peer's log.
    pub out_of_sync_chunks: u64,
    /// Whether its resync is under way.
    pub resyncing: bool,
    /// While it is: when the chunks out of sync last fell to a new low (the driver's clock).
    pub progress_ns: Option<u64>,
    /// Without a new low for this long it does not converge.
    pub window_ns: u64,
}

/// A resync whose chunks out of sync reach no new low for this long does not converge: the host
/// dirties them as fast as the link copies them.
pub const CONVERGE_WINDOW_NS: u64 = 30_000_000_000;

impl OverflowStatus {
    /// Whether its resync converges as of `now_ns` (none: not under way, the peer does not take
    /// data yet).
    #[must_use]
    pub fn converging(&self, now_ns: u64) -> Option<bool> {
        self.progress_ns
            .map(|at| now_ns.saturating_sub(at) < self.window_ns)
    }
}

/// What a link may do before its first handshake settled where the peer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartRule {
    /// An engine driven without a record (tests, tools): host operations at any time; a connect
    /// deadline stops it.
    Unrecorded,
    /// A primary resumed from the record of a clean stop: the peer held its history then, so
    /// host operations go to the log at once, and a connect deadline degrades the start.
    Resumed,
    /// A first start or a restart after a crash: the handshake decides what the peer lacks
    /// (a full copy, the write intent's chunks) before any host operation; a connect deadline
    /// stops it.
    NeedsPeer,
}

/// The one submission waiting for room in the rollback log.
#[derive(Debug)]
struct Parked {
    /// The driver's token; none for the link's own (a resync step).
    token: Option<u64>,
    op: SummedOp,
    /// When it was submitted (its age counts from then).
    submitted_ns: u64,
}

#[derive(Debug, Clone, Copy)]
struct Drain {
    deadline_ns: u64,
    limit_ns: u64,
}

/// The write intent as a status report shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntentStatus {
    /// Its chunk size.
    pub chunk_bytes: u64,
    /// Chunks holding writes the peer has not made durable.
    pub dirty_chunks: u64,
    /// Chunks the stored copy holds (what a crash now would resync).
    pub stored_chunks: u64,
}

/// A resync under way: from the restart until its end is durable on the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncStatus {
    /// Whether it copies every chunk (the peer held none of this volume's history).
    pub full: bool,
    /// Bytes it copies in all.
    pub total_bytes: u64,
    /// Bytes handed to the log so far.
    pub submitted_bytes: u64,
    /// Bytes the peer holds durably (the copies through its durable seq).
    pub durable_bytes: u64,
    /// When its begin mark entered the log (the driver's clock, as given to
    /// [`PeerLink::resync_submit`]), if it did.
    pub begun_ns: Option<u64>,
}

/// Counters a status report shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLinkStatus {
    /// The engine's state.
    pub source: SourceStatus,
    /// Why replication stopped for good, if it did.
    pub fatal: Option<SourceError>,
    /// Handshakes completed.
    pub connects: u64,
    /// Connections dropped after they were opened.
    pub disconnects: u64,
    /// What the peer's copy is.
    pub peer_data: PeerData,
    /// The write intent.
    pub intent: IntentStatus,
    /// The resync under way, if any.
    pub resync: Option<ResyncStatus>,
    /// The overflow under way, if any.
    pub overflow: Option<OverflowStatus>,
    /// When writes overflow.
    pub overflow_rule: OverflowRule,
    /// Writes completed out of sync since the start.
    pub out_of_sync_writes: u64,
    /// Host writes queued (throttled) because an overflow's resync did not converge.
    pub throttled_writes: u64,
}

/// How far a resync got: its size, and the seq and running byte count of each copy handed out
/// (bounded by the rollback log: entries leave once durable), through its end's seq.
#[derive(Debug, Default)]
struct ResyncTrack {
    total_bytes: u64,
    full: bool,
    /// An overflow's resync: its total grows with the chunks written meanwhile.
    interleaved: bool,
    submitted_bytes: u64,
    durable_bytes: u64,
    /// (seq, bytes through it) of copies not yet durable.
    in_log: VecDeque<(Seq, u64)>,
    /// The seq before its first step, once that is in the log: until its end is durable the
    /// peer holds the volume as of no later seq.
    base: Option<Seq>,
    /// When its begin entered the log.
    begun_ns: Option<u64>,
    end: Option<Seq>,
}

impl<L: RollbackLog> PeerLink<L> {
    /// A link over `source` whose connections `session` paces.
    #[must_use]
    pub fn new(source: Source<L>, session: SourceSession) -> PeerLink<L> {
        let intent = WriteIntent::new(source.config().volume_bytes, BITMAP_CHUNK_BYTES)
            .unwrap_or_else(|e| unreachable!("the default chunk size is valid: {e}"));
        Self::with_intent(source, session, intent)
    }

    /// A link for a primary restarted as `restored` says, over `source` (whose operations
    /// through `restored.confirmed` are durable on the peer), with `stored` its write intent as
    /// last stored (after a clean stop a map of the volume's geometry: its bits only cost a
    /// store). After a crash ([`PrimaryStart::Crashed`]) the sequence continues after the
    /// peer's ([`Source::adopt_target_seq`]) and the chunks of `stored` are resynced before
    /// host operations are taken ([`Self::poll_resync`]).
    #[must_use]
    pub fn restarted(
        mut source: Source<L>,
        session: SourceSession,
        restored: PrimaryRestored,
        stored: DirtyBitmap,
    ) -> PeerLink<L> {
        let volume_bytes = source.config().volume_bytes;
        let resync = (restored.kind == PrimaryStart::Crashed).then(|| {
            source.adopt_target_seq();
            ResyncPlan::partial(stored.clone(), volume_bytes)
        });
        let mut link = Self::with_intent(source, session, WriteIntent::restored(stored));
        link.start = if restored.kind == PrimaryStart::Resumed {
            StartRule::Resumed
        } else {
            StartRule::NeedsPeer
        };
        link.resync_track = resync.as_ref().map(|plan| ResyncTrack {
            total_bytes: plan.total_bytes(),
            ..ResyncTrack::default()
        });
        if restored.peer_outdated && resync.is_some() {
            // The writes it lacks are in the chunks this resync copies.
            link.out_of_sync_after = Some(restored.confirmed);
        }
        link.resync = resync;
        link
    }

    fn with_intent(source: Source<L>, session: SourceSession, intent: WriteIntent) -> PeerLink<L> {
        let durable = source.status().durable;
        PeerLink {
            intent,
            resync: None,
            resync_step: None,
            resync_piece_bytes_max: u64::from(PAYLOAD_BYTES_MAX),
            resync_track: None,
            start: StartRule::Unrecorded,
            record_told: false,
            overflow_rule: OverflowRule::OFF,
            down_since_ns: Some(0),
            overflow: None,
            step_interleaved: false,
            out_of_sync_writes: 0,
            throttled_writes: 0,
            out_of_sync_after: None,
            resync_rate_bytes_per_s: None,
            resync_next_ns: 0,
            rate_waiting: false,
            converge_window_ns: CONVERGE_WINDOW_NS,
            throttle: false,
            throttled: false,
            source,
            sabotage: PeerSabotage::None,
            session,
            parked: None,
            fatal: None,
            announced: false,
            durable_reported: durable,
            events: VecDeque::new(),
            connects: 0,
            disconnects: 0,
            connect_deadline: None,
            drain: None,
        }
    }

    /// Unless a handshake completes within `limit_ns` of `now_ns`, a start that may serve the host
    /// without its peer reports [`PeerEvent::Degraded`] and goes on, any other stops for good
    /// ([`SourceError::Unreachable`]).
    pub fn set_connect_deadline(&mut self, now_ns: u64, limit_ns: u64) {
        if self.connects == 0 {
            self.connect_deadline = Some((now_ns.saturating_add(limit_ns), limit_ns));
        }
    }

    /// The host is done (its device stopped): reports [`PeerEvent::Drained`] once nothing is
    /// parked and the peer holds every operation in the log durably (submissions taken after
    /// this call count too: the driver must hand over everything the host completed before it
    /// reports the drain), or when `limit_ns` has passed since `now_ns`, or when replication
    /// stops. A later call replaces the drain under way.
    pub fn begin_drain(&mut self, now_ns: u64, limit_ns: u64) {
        let through = self.source.status().last_local;
        self.drain = Some(Drain {
            deadline_ns: now_ns.saturating_add(limit_ns),
            limit_ns,
        });
        if self.sabotage == PeerSabotage::DrainEarly {
            self.drain = None;
            self.events.push_back(PeerEvent::Drained(Ok(through)));
        } else if let Some(e) = &self.fatal {
            self.drain = None;
            self.events
                .push_back(PeerEvent::Drained(Err(DrainError::Stopped(e.clone()))));
        }
    }

    /// When host writes overflow (by default never).
    pub fn set_overflow_rule(&mut self, rule: OverflowRule) {
        self.overflow_rule = rule;
    }

    /// Bounds an overflow's resync to `bytes_per_s` (none or 0: unbounded), so that it leaves
    /// the link to the host's writes.
    pub fn set_resync_rate(&mut self, bytes_per_s: Option<u64>) {
        self.resync_rate_bytes_per_s = bytes_per_s;
    }

    /// Whether host writes are throttled, not overflowed, while an overflow's resync does not
    /// converge: they queue in the log (waiting for room) so that the resync's copies catch up;
    /// the host then writes at the link's pace. Off by default.
    pub fn set_overflow_throttle(&mut self, on: bool) {
        self.throttle = on;
    }

    /// How long an overflow's resync may go without a new low before it counts as not
    /// converging (default [`CONVERGE_WINDOW_NS`]).
    pub fn set_converge_window_ns(&mut self, ns: u64) {
        self.converge_window_ns = ns;
    }

    /// Whether host writes are throttled now: the rule is on, the peer takes data and the
    /// overflow's resync, under way, does not converge.
    fn throttling(&self, now_ns: u64) -> bool {
        self.throttle
            && self.announced
            && self.source.status().conn == ConnState::Connected
            && self.overflow.is_some_and(|ov| {
                ov.begun && now_ns.saturating_sub(ov.low_at_ns) >= self.converge_window_ns
            })
    }

    /// Host writes queued (throttled) since the start because an overflow's resync did not
    /// converge.
    #[must_use]
    pub fn throttled_writes(&self) -> u64 {
        self.throttled_writes
    }

    /// The bound [`Self::set_resync_rate`] set, if any.
    #[must_use]
    pub fn resync_rate(&self) -> Option<u64> {
        self.resync_rate_bytes_per_s.filter(|r| *r > 0)
    }

    /// Breaks the policy on purpose (tests that prove the checkers bite).
    pub fn set_sabotage(&mut self, sabotage: PeerSabotage) {
        self.sabotage = sabotage;
    }

    /// The engine (read-only: every input goes through the link).
    #[must_use]
    pub fn source(&self) -> &Source<L> {
        &self.source
    }

    /// Offers a host operation. `token` names it in a later [`PeerEvent::Accepted`] if it parks.
    pub fn submit(
        &mut self,
        token: u64,
        op: SummedOp,
        now_ns: u64,
    ) -> Result<Submitted, SubmitError> {
        if !self.takes_host_ops() {
            return Err(SubmitError::Resyncing);
        }
        let throttling = self.throttling(now_ns);
        self.throttled = throttling;
        if let Some(cause) = self.overflows(op.op(), now_ns, throttling) {
            return self.out_of_sync(op.op(), cause);
        }
        if throttling {
            self.throttled_writes += 1;
        }
        self.offer(Some(token), op, now_ns)
    }

    /// While the host is throttled, the room the log keeps for the overflow's next copy (a
    /// piece): a host write takes the log only beyond it, and a copy gets it even while a host
    /// write waits. Host writes then queue and mark no chunk, and every copy gets in as the peer
    /// frees room, so the chunks out of sync only fall: the resync ends.
    fn copy_reserve(&self) -> Option<usize> {
        let ov = self.overflow.as_ref().filter(|_| self.throttled)?;
        let pending = ov.copying.is_some() || self.intent.pinned().dirty_chunks() > 0;
        pending.then(|| usize::try_from(self.resync_piece_bytes()).unwrap_or(usize::MAX))
    }

    /// Whether a parked submission keeps resync steps out: always, but a host write parked
    /// behind a copy's reserve.
    fn parked_blocks_steps(&self) -> bool {
        self.parked
            .as_ref()
            .is_some_and(|p| p.token.is_none() || self.copy_reserve().is_none())
    }

    /// Whether the log has room for a host operation of `bytes` now (beyond a copy's reserve,
    /// unless the log could never hold both).
    fn host_room(&self, bytes: usize) -> bool {
        let cfg = self.source.config();
        match self.copy_reserve() {
            Some(reserve)
                if cfg.log_entries_max >= 2
                    && bytes.saturating_add(reserve) <= cfg.log_bytes_max =>
            {
                self.source.has_room_for(2, bytes.saturating_add(reserve))
            }
            _ => self.source.has_room(bytes),
        }
    }

    /// Whether a host operation overflows now, and why: an overflow is under way and its
    /// resync has not begun, or the operation touches a chunk already out of sync (a write
    /// queued behind an older one there would land before the resync's copy), whatever the
    /// mode and the rule say now; or the rule allows it and the log cannot take it, or the peer
    /// has been gone too long.
    fn overflows(&self, op: &Op, now_ns: u64, throttling: bool) -> Option<OverflowCause> {
        let rule = self.overflow_rule;
        if self.fatal.is_some() || self.parked.is_some() {
            return None;
        }
        // A full copy into a peer without our history (its data untrusted until the copy's
        // end) lets host writes queue when the rule is off.
        let under_way = self.overflow.filter(|ov| rule.enabled || !ov.full);
        if let (Some(ov), false) = (under_way, throttling) {
            if !ov.begun && self.sabotage != PeerSabotage::NoAheadRule {
                // Until the resync's begin mark is in the log the target calls itself
                // consistent: a write queued now would reach it without the ones out of sync
                // before it (a state the volume never was in). Every write goes out of sync
                // until then (DRBD's Ahead), also in a mode that does not overflow (the mode
                // changed since).
                return Some(ov.cause);
            }
            if let Some(range) = op.range() {
                let chunks = self.intent.live().chunks_of(range);
                let busy = chunks.clone().any(|c| self.intent.pinned().is_dirty(c))
                    || ov.copying.is_some_and(|cp| chunks.contains(&cp.chunk));
                if busy {
                    return Some(ov.cause);
                }
            }
        }
        if !rule.enabled {
            return None;
        }
        let peer_paced = matches!(self.source.config().mode, Mode::Sync | Mode::LockThenWrite);
        let gone = self
            .down_since_ns
            .is_some_and(|since| now_ns.saturating_sub(since) >= rule.after_down_ns);
        if peer_paced {
            return (gone && rule.sync_peer_gone == SyncPeerGone::Degrade)
                .then_some(OverflowCause::PeerGone);
        }
        if gone {
            return Some(OverflowCause::PeerGone);
        }
        // Inside the resync's bracket a queued write lands before the copy of its chunk (which
        // reads it), so it may queue even into a chunk out of sync.
        if throttling {
            return None;
        }
        // An overflow copy handed out and not yet submitted keeps its room.
        let reserved = match self.resync_step {
            Some(ResyncStep::Copy(r)) if self.step_interleaved => {
                (1, usize::try_from(r.len_bytes).unwrap_or(usize::MAX))
            }
            _ => (0, 0),
        };
        (!self.source.has_room_for(
            1 + reserved.0,
            op.payload_bytes().saturating_add(reserved.1),
        ))
        .then_some(OverflowCause::LogFull)
    }

    /// Records `op` as out of sync instead of queueing it.
    fn out_of_sync(&mut self, op: &Op, cause: OverflowCause) -> Result<Submitted, SubmitError> {
        self.source.check_op(op).map_err(SubmitError::Invalid)?;
        let ov = self.overflow.get_or_insert(Overflow {
            cause,
            full: false,
            begun: false,
            ending: false,
            copying: None,
            cursor: 0,
            low_chunks: u64::MAX,
            low_at_ns: 0,
        });
        if let Some(range) = op.range() {
            if let Some(cp) = &mut ov.copying {
                if self.intent.live().chunks_of(range).contains(&cp.chunk) {
                    cp.dirtied = true;
                }
            }
            if self.sabotage != PeerSabotage::OverflowUnmarked {
                self.intent.pin(range);
            }
        }
        self.out_of_sync_writes += 1;
        let last = self.source.status().last_local;
        if self.out_of_sync_after.is_none() {
            self.out_of_sync_after = Some(last);
            self.record_outdated_changed();
        }
        Ok(Submitted::OutOfSync)
    }

    /// The overflow under way, if any.
    #[must_use]
    pub fn overflow(&self) -> Option<OverflowStatus> {
        self.overflow.map(|ov| OverflowStatus {
            cause: ov.cause,
            out_of_sync_chunks: self.intent.pinned().dirty_chunks(),
            resyncing: ov.begun,
            progress_ns: ov.begun.then_some(ov.low_at_ns),
            window_ns: self.converge_window_ns,
        })
    }

    /// Whether host operations may be offered: not while a resync waits to enter the log (its
    /// copies read the local volume, which host writes must not change under them), nor before
    /// the first handshake of a start that needs its peer's verdict first.
    #[must_use]
    pub fn takes_host_ops(&self) -> bool {
        self.resync.is_none()
            && (self.resync_step.is_none() || self.step_interleaved)
            && (self.connects > 0 || self.start != StartRule::NeedsPeer)
    }

    /// Whether the step [`Self::poll_resync`] handed out is taken while host operations go on
    /// (an overflow's resync): the driver must read a copy's bytes under the same range order
    /// as host writes (no host write to them in flight between the read and
    /// [`Self::resync_submit`]).
    #[must_use]
    pub fn step_interleaved(&self) -> bool {
        self.resync_step.is_some() && self.step_interleaved
    }

    /// Whether this start may serve the host before its peer answered (a primary resumed from
    /// the record of a clean stop, or an engine without a record).
    #[must_use]
    pub fn may_start_degraded(&self) -> bool {
        self.start == StartRule::Resumed
    }

    /// The next resync step the driver must carry out, if one is due: once the peer admitted
    /// the session (the sequence continues after its), one at a time, while nothing waits for
    /// room in the log. For a mark the driver submits `Op::Resync(mark)`, for a copy a write of
    /// those bytes read from the local volume now, both through [`Self::resync_submit`]. An
    /// overflow's copies yield to host writes: one is handed out only while the log stays at most
    /// half full, and no faster than [`Self::set_resync_rate`] (then [`Self::poll_timeout`] says
    /// when the next is due).
    pub fn poll_resync(&mut self, now_ns: u64) -> Option<ResyncStep> {
        self.rate_waiting = false;
        self.settle_durable();
        self.throttled = self.throttling(now_ns);
        if self.fatal.is_some()
            || self.parked_blocks_steps()
            || self.resync_step.is_some()
            || self.source.awaits_admission()
        {
            return None;
        }
        let piece_bytes = self.resync_piece_bytes();
        let Some(plan) = self.resync.as_mut() else {
            let step = self.next_overflow_step(piece_bytes, now_ns);
            self.resync_step = step;
            self.step_interleaved = step.is_some();
            return step;
        };
        let step = plan.next_step(piece_bytes);
        if step.is_none() || plan.is_done() {
            self.resync = None;
        }
        self.resync_step = step;
        self.step_interleaved = false;
        step
    }

    /// The overflow's next resync step: while the peer takes data (connected, admitted, the
    /// last resync's end durable) and the log has room for it. A begin mark, the out-of-sync
    /// chunks one after another (a chunk written again meanwhile is copied again), and the end
    /// once none is left, which ends the overflow.
    fn next_overflow_step(&mut self, piece_bytes: u64, now_ns: u64) -> Option<ResyncStep> {
        let connected = self.announced && self.source.status().conn == ConnState::Connected;
        let throttling = self.throttling(now_ns);
        let ov = self.overflow.as_mut()?;
        if !connected || ov.ending {
            return None;
        }
        if !ov.begun {
            if self.resync_track.is_some() || !self.source.has_room(0) {
                return None;
            }
            ov.begun = true;
            ov.low_chunks = self.intent.pinned().dirty_chunks();
            ov.low_at_ns = now_ns;
            self.resync_track = Some(ResyncTrack {
                interleaved: true,
                full: ov.full,
                ..ResyncTrack::default()
            });
            return Some(ResyncStep::Mark(ResyncMark::Begin { full: ov.full }));
        }
        let chunk_bytes = self.intent.live().chunk_bytes();
        let volume_bytes = self.source.config().volume_bytes;
        if ov.copying.is_none() {
            let pinned = self.intent.pinned();
            let next = pinned
                .next_dirty(ov.cursor)
                .or_else(|| pinned.next_dirty(0));
            match next {
                Some(chunk) => {
                    let r = pinned.chunk_range(chunk, volume_bytes);
                    ov.cursor = chunk + 1;
                    ov.copying = Some(Copying {
                        chunk,
                        at: r.offset_bytes,
                        end: r.end_bytes(),
                        dirtied: false,
                    });
                }
                None => {
                    if !self.source.has_room(0) {
                        return None;
                    }
                    ov.ending = true;
                    return Some(ResyncStep::Mark(ResyncMark::End));
                }
            }
        }
        let cp = ov.copying.as_mut()?;
        let len = piece_bytes.min(cp.end - cp.at).min(chunk_bytes);
        let len_bytes = usize::try_from(len).unwrap_or(usize::MAX);
        // Host writes come first: a copy takes the log only while it stays at most half full
        // (bytes and entries; an empty log takes any), and no faster than the rate limit.
        let cfg = self.source.config();
        let st = self.source.status();
        let yields = !throttling
            && st.log_entries > 0
            && (st.log_bytes.saturating_add(len_bytes) > cfg.log_bytes_max / 2
                || st.log_entries >= cfg.log_entries_max.div_ceil(2));
        if yields || !self.source.has_room(len_bytes) {
            return None;
        }
        self.rate_waiting = now_ns < self.resync_next_ns;
        if self.rate_waiting {
            return None;
        }
        if let Some(rate) = self.resync_rate_bytes_per_s.filter(|r| *r > 0) {
            let spacing = u64::try_from(u128::from(len) * 1_000_000_000 / u128::from(rate))
                .unwrap_or(u64::MAX);
            self.resync_next_ns = self.resync_next_ns.max(now_ns).saturating_add(spacing);
        }
        let range = Range::new(cp.at, len);
        cp.at += len;
        Some(ResyncStep::Copy(range))
    }

    /// The operation of the step [`Self::poll_resync`] handed out: it enters the log as the
    /// link's own (no completion is reported for it).
    pub fn resync_submit(&mut self, op: SummedOp, now_ns: u64) -> Result<Submitted, SubmitError> {
        let fits = match (self.resync_step, op.op()) {
            (Some(ResyncStep::Mark(mark)), Op::Resync(m)) => mark == *m,
            (Some(ResyncStep::Copy(range)), Op::Write { .. } | Op::WriteZeroes { .. }) => {
                op.op().range() == Some(range)
            }
            _ => false,
        };
        if !fits {
            return Err(SubmitError::NotResyncStep {
                got: format!("{:?}", op.op().range()),
                asked: self.resync_step,
            });
        }
        let step = self.resync_step.take();
        let interleaved = std::mem::take(&mut self.step_interleaved);
        if interleaved && self.parked_blocks_steps() {
            self.withdraw(step);
            return Err(SubmitError::Withdrawn);
        }
        if self.parked.is_some() && !self.source.has_room(op.op().payload_bytes()) {
            // A copy beside a throttled host write never parks: it comes again.
            self.withdraw(step);
            return Err(SubmitError::Withdrawn);
        }
        let bytes = op.op().payload_bytes() as u64;
        let is_end = matches!(op.op(), Op::Resync(ResyncMark::End));
        let is_begin = matches!(op.op(), Op::Resync(ResyncMark::Begin { .. }));
        let submitted = self.offer(None, op, now_ns);
        if interleaved && submitted.is_ok() {
            self.overflow_step_taken(step);
            let left = self.intent.pinned().dirty_chunks();
            if let Some(ov) = self.overflow.as_mut().filter(|ov| left < ov.low_chunks) {
                ov.low_chunks = left;
                ov.low_at_ns = now_ns;
            }
        }
        // A parked step enters the log next, as the seq after the last local one.
        let seq = match submitted {
            Ok(Submitted::Accepted(seq)) => Some(seq),
            Ok(Submitted::Parked) => Some(self.source.status().last_local.next()),
            Ok(Submitted::OutOfSync) | Err(_) => None,
        };
        if let (Some(track), Some(seq)) = (&mut self.resync_track, seq) {
            track.submitted_bytes += bytes;
            if bytes > 0 {
                track.in_log.push_back((seq, track.submitted_bytes));
            }
            if is_begin {
                track.base = Some(Seq(seq.0.saturating_sub(1)));
                track.begun_ns = Some(now_ns);
            }
            if is_end {
                track.end = Some(seq);
            }
        }
        submitted
    }

    /// An overflow's step is in the log. Once a chunk's last piece is, the chunk is no longer
    /// out of sync, unless a write marked it again since its copy began. Once the end is, the
    /// overflow is over, unless writes went out of sync meanwhile: a new resync then follows.
    fn overflow_step_taken(&mut self, step: Option<ResyncStep>) {
        let Some(ov) = self.overflow.as_mut() else {
            return;
        };
        match step {
            Some(ResyncStep::Copy(_)) => {
                let Some(cp) = ov.copying.filter(|cp| cp.at >= cp.end) else {
                    return;
                };
                ov.copying = None;
                if !cp.dirtied || self.sabotage == PeerSabotage::CopyIgnoresRewrites {
                    self.intent.unpin(cp.chunk);
                }
            }
            // The end of a resync a full one superseded (handed out before it): its own comes.
            Some(ResyncStep::Mark(ResyncMark::End)) if !ov.begun => {}
            Some(ResyncStep::Mark(ResyncMark::End)) => {
                if self.intent.pinned().dirty_chunks() == 0 {
                    self.overflow = None;
                } else {
                    // The full copy is in the log: what was written out of sync since follows
                    // in a partial resync.
                    ov.full = false;
                    ov.begun = false;
                    ov.ending = false;
                }
            }
            _ => {}
        }
    }

    /// Takes back an overflow's step that could not enter the log now.
    fn withdraw(&mut self, step: Option<ResyncStep>) {
        let Some(ov) = self.overflow.as_mut() else {
            return;
        };
        match step {
            Some(ResyncStep::Copy(_)) => {
                // The chunk stays out of sync; its copy starts again from its first byte.
                if let Some(cp) = ov.copying.take() {
                    ov.cursor = cp.chunk;
                }
            }
            Some(ResyncStep::Mark(ResyncMark::Begin { .. })) => {
                ov.begun = false;
                self.resync_track = None;
            }
            Some(ResyncStep::Mark(ResyncMark::End)) => ov.ending = false,
            None => {}
        }
    }

    /// How many chunks the stored write intent may hold before a store drops the clean ones
    /// ([`WriteIntent::set_keep_chunks`]).
    pub fn set_intent_keep_chunks(&mut self, chunks: u64) {
        self.intent.set_keep_chunks(chunks);
    }

    /// How many chunks a store of the write intent adds around one it must add
    /// ([`WriteIntent::set_extent_chunks`]).
    pub fn set_intent_extent_chunks(&mut self, chunks: u64) {
        self.intent.set_extent_chunks(chunks);
    }

    /// Bounds a resync copy to `bytes` (the largest write the peer's commit log takes; by
    /// default a frame's payload).
    pub fn set_resync_piece_bytes_max(&mut self, bytes: u64) {
        self.resync_piece_bytes_max = bytes;
    }

    /// The largest resync copy: a chunk, if one operation, the rollback log and the peer's
    /// bound can hold it.
    fn resync_piece_bytes(&self) -> u64 {
        let cfg = self.source.config();
        let block = u64::from(cfg.block_bytes).max(1);
        let fits = self
            .intent
            .live()
            .chunk_bytes()
            .min(self.resync_piece_bytes_max)
            .min(cfg.log_bytes_max as u64);
        (fits / block * block).max(block)
    }

    fn offer(
        &mut self,
        token: Option<u64>,
        op: SummedOp,
        now_ns: u64,
    ) -> Result<Submitted, SubmitError> {
        if let Some(e) = &self.fatal {
            return Err(SubmitError::Stopped(e.clone()));
        }
        // Only a copy goes beside a host write parked behind its reserve.
        if self.parked.is_some() && (token.is_some() || self.copy_reserve().is_none()) {
            return Err(SubmitError::AlreadyParked);
        }
        let bytes = op.op().payload_bytes();
        let log_bytes_max = self.source.config().log_bytes_max;
        if bytes > log_bytes_max.min(PAYLOAD_BYTES_MAX as usize) {
            return Err(SubmitError::Invalid(SourceError::NeverFits {
                bytes,
                log_bytes_max,
            }));
        }
        self.intent.submitted(op.op().range());
        let submitted = match token {
            // A throttled host write leaves the copy's reserve alone: it waits as for a full log.
            Some(_) if !self.host_room(bytes) => match self.source.check_op(op.op()) {
                Ok(()) => Err(SourceError::LogFull),
                Err(e) => Err(e),
            },
            Some(_) => self.source.submit(op.clone(), now_ns),
            None => self.source.submit_own(op.clone(), now_ns),
        };
        let result = match submitted {
            Ok(seq) => {
                self.intent.accepted(seq);
                return Ok(Submitted::Accepted(seq));
            }
            Err(SourceError::LogFull) => {
                self.parked = Some(Parked {
                    token,
                    op,
                    submitted_ns: now_ns,
                });
                return Ok(Submitted::Parked);
            }
            Err(e @ SourceError::InvalidOp(_)) => Err(SubmitError::Invalid(e)),
            Err(e) => {
                self.stop(e.clone());
                Err(SubmitError::Stopped(e))
            }
        };
        self.intent.refused();
        result
    }

    /// The write intent to store before the writes submitted since the last store reach the
    /// local volume, if the stored copy lacks some of their chunks (see [`WriteIntent`]). The
    /// driver stores it, synced, first.
    pub fn take_intent_store(&mut self) -> Option<&DirtyBitmap> {
        if self.sabotage == PeerSabotage::SkipIntentStore {
            return None;
        }
        self.intent.take_store()
    }

    /// The driver's token of the submission waiting for room, if it is a host operation.
    #[must_use]
    pub fn parked_token(&self) -> Option<u64> {
        self.parked.as_ref().and_then(|p| p.token)
    }

    /// Whether a submission waits for room; the driver offers no other meanwhile.
    #[must_use]
    pub fn is_parked(&self) -> bool {
        self.parked.is_some()
    }

    /// Whether a data operation is complete as soon as [`Self::submit`] took it (the async
    /// fast path): the mode says so and replication has not stopped.
    #[must_use]
    pub fn acks_on_submit(&self) -> bool {
        self.fatal.is_none() && self.source.data_completes_on_submit()
    }

    /// Changes the acknowledgement mode; waiting operations are re-evaluated.
    pub fn set_mode(&mut self, mode: Mode) {
        self.source.set_mode(mode);
    }

    /// Whether a host flush waits for the target in every mode.
    pub fn set_flush_replicates(&mut self, on: bool) {
        self.source.set_flush_replicates(on);
    }

    /// Whether `seq` is already applied and durable on the peer (`Ok(false)`: wait for
    /// [`PeerEvent::Durable`]).
    pub fn check_replicated(&self, seq: Seq) -> Result<bool, WaitError> {
        if seq <= self.replicated() {
            return Ok(true);
        }
        if let Some(e) = &self.fatal {
            return Err(WaitError::Stopped(e.clone()));
        }
        if seq > self.everything_so_far() {
            return Err(WaitError::NeverSubmitted(seq));
        }
        Ok(false)
    }

    /// The seq whose replication ([`Self::check_replicated`]) means that every write so far is
    /// on the peer: the last local one, or while a resync's end is not yet in the log (writes
    /// recorded out of sync, a resync after a restart or for a new peer), the next (that end
    /// comes at or after it). Once the end is in the log, the last local seq is at or after it.
    #[must_use]
    pub fn everything_so_far(&self) -> Seq {
        let last = self.source.status().last_local;
        if self.overflow.is_some() || self.resync.is_some() || self.resync_step.is_some() {
            last.next()
        } else {
            last
        }
    }

    /// Through which seq the peer holds the volume: what it made durable, but while writes it
    /// lacks wait for a resync (recorded out of sync, or copied by a resync whose end is not yet
    /// durable), no later than the last seq before them.
    #[must_use]
    pub fn replicated(&self) -> Seq {
        let durable = self.source.durable();
        let last = self.source.status().last_local;
        let resync_base = self
            .resync_track
            .as_ref()
            .map(|track| track.base.unwrap_or(last));
        [self.out_of_sync_after, resync_base]
            .into_iter()
            .flatten()
            .fold(durable, Seq::min)
    }

    /// What the peer made durable since the last look: the write intent's chunks it covers, the
    /// resync's copies, its end (then the resync is over and the peer up to date again, unless
    /// writes went out of sync since). Every poll looks first, so that a resync step that waits
    /// for an end is handed out whichever the driver polls first.
    fn settle_durable(&mut self) {
        let durable = self.source.durable();
        self.intent.durable(durable);
        if let Some(track) = &mut self.resync_track {
            while let Some(&(seq, bytes)) = track.in_log.front() {
                if seq > durable {
                    break;
                }
                track.durable_bytes = bytes;
                track.in_log.pop_front();
            }
            if track.end.is_some_and(|end| end <= durable) {
                if track.full {
                    self.source.end_full_resync();
                }
                self.resync_track = None;
                self.intent.trim_after_resync();
            }
        }
        if self.overflow.is_none()
            && self.resync_track.is_none()
            && self.out_of_sync_after.take().is_some()
        {
            self.record_outdated_changed();
        }
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.settle_durable();
        if let Some(ev) = self.events.pop_front() {
            return Some(ev);
        }
        if self.fatal.is_some() {
            return None;
        }
        if let Some(parked) = self.parked.take() {
            let bytes = parked.op.op().payload_bytes();
            let room = match parked.token {
                Some(_) => self.host_room(bytes),
                None => self.source.has_room(bytes),
            };
            if !room {
                self.parked = Some(parked);
            } else if let Some(ev) = self.take_parked(parked) {
                return Some(ev);
            }
        }
        if let Some(seq) = self.source.poll_completion() {
            return Some(PeerEvent::Completed(seq));
        }
        let durable = if self.sabotage == PeerSabotage::DurableEarly {
            self.source.status().received
        } else {
            self.replicated()
        };
        if durable > self.durable_reported {
            self.durable_reported = durable;
            return Some(PeerEvent::Durable(durable));
        }
        if self.drain.is_some()
            && self.parked.is_none()
            && self.takes_host_ops()
            && self.overflow.is_none()
            && self.resync_step.is_none()
        {
            let last = self.source.status().last_local;
            if self.source.is_replicated(last) {
                self.drain = None;
                return Some(PeerEvent::Drained(Ok(last)));
            }
        }
        if !self.announced
            && self.source.status().conn == ConnState::Connected
            && !self.source.awaits_admission()
        {
            self.announced = true;
            self.connects += 1;
            self.connect_deadline = None;
            self.down_since_ns = None;
            self.session.on_authenticated();
            if let Some(record) = self.tell_record() {
                self.events.push_back(PeerEvent::Connected);
                return Some(record);
            }
            return Some(PeerEvent::Connected);
        }
        None
    }

    /// The parked submission enters the log (there is room): the driver hears of its own.
    fn take_parked(&mut self, parked: Parked) -> Option<PeerEvent> {
        let Parked {
            token,
            op,
            submitted_ns,
        } = parked;
        if let (Some(token), PeerSabotage::DropParked) = (token, self.sabotage) {
            return Some(PeerEvent::Accepted {
                token,
                seq: self.source.status().last_local.next(),
            });
        }
        // The source validated it when it parked; what can fail now is the log itself.
        let submitted = match token {
            Some(_) => self.source.submit(op, submitted_ns),
            None => self.source.submit_own(op, submitted_ns),
        };
        match submitted {
            Ok(seq) => {
                self.intent.accepted(seq);
                token.map(|token| PeerEvent::Accepted { token, seq })
            }
            Err(e) => {
                self.intent.refused();
                self.stop(e);
                self.events.pop_front()
            }
        }
    }

    /// The next frame to send on the open connection (`now_ns`: when it is handed over).
    pub fn poll_transmit(&mut self, now_ns: u64) -> Option<Frame> {
        if !self.session.is_up() {
            return None;
        }
        let frame = self.source.poll_transmit()?;
        self.session.on_tx(now_ns);
        Some(frame)
    }

    /// When [`Self::handle_timeout`] must next be called, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<u64> {
        // An overflow copy held back by the rate limit is due then.
        let copy_due = (self.rate_waiting
            && self.overflow.is_some()
            && self.resync_step.is_none()
            && self.announced
            && self.source.status().conn == ConnState::Connected)
            .then_some(self.resync_next_ns);
        let own = [
            self.connect_deadline.map(|(deadline, _)| deadline),
            self.drain.map(|d| d.deadline_ns),
            copy_due,
        ];
        own.into_iter()
            .flatten()
            .chain(self.session.poll_timeout())
            .min()
    }

    /// Time has reached `now_ns`: connect, send a PING, or drop a silent connection (then call
    /// [`Self::on_lost`]).
    pub fn handle_timeout(&mut self, now_ns: u64) -> Option<SessionAction> {
        if let Some(drain) = self.drain.filter(|d| now_ns >= d.deadline_ns) {
            self.drain = None;
            self.events
                .push_back(PeerEvent::Drained(Err(DrainError::TimedOut {
                    through: self.source.status().last_local,
                    durable: self.source.status().durable,
                    limit_secs: drain.limit_ns / 1_000_000_000,
                })));
        }
        if let Some((_, limit_ns)) = self.connect_deadline.filter(|&(d, _)| now_ns >= d) {
            self.connect_deadline = None;
            let secs = limit_ns / 1_000_000_000;
            // A handshake that completed but was not polled yet still counts.
            if self.source.status().conn != ConnState::Connected {
                if !self.may_start_degraded() {
                    self.stop(SourceError::Unreachable { secs });
                    return None;
                }
                if let Some(record) = self.tell_record() {
                    self.events.push_back(record);
                }
                self.events.push_back(PeerEvent::Degraded { secs });
            }
        }
        let action = self.session.handle_timeout(now_ns)?;
        if let SessionAction::Ping(_) = action {
            // The probe goes out with the engine's frames; PING changes no engine state.
            self.session.on_tx(now_ns);
        }
        Some(action)
    }

    /// The driver is opening a connection (after [`SessionAction::Connect`]).
    pub fn on_connecting(&mut self) {
        self.session.on_connecting();
    }

    /// The connection is open; `nonce` must be fresh and random. The handshake starts.
    pub fn on_connected(&mut self, nonce: [u8; MAC_BYTES], now_ns: u64) {
        self.session.on_connected(now_ns);
        self.announced = false;
        self.source.on_connect(nonce);
    }

    /// The connection or the attempt is gone (a socket error, a timeout, [`SessionAction::Drop`]):
    /// the log is resent after the next handshake, which the session schedules.
    pub fn on_lost(&mut self, now_ns: u64) {
        if self.session.is_up() {
            self.disconnects += 1;
        }
        self.source.on_disconnect();
        self.announced = false;
        self.down_since_ns.get_or_insert(now_ns);
        if self.fatal.is_none() {
            self.session.on_lost(now_ns);
        }
    }

    /// One frame from the peer. An error means: close the connection (the link already
    /// scheduled the reconnect, or stopped for good).
    pub fn handle_frame(&mut self, frame: Frame, now_ns: u64) -> Result<(), CloseConn> {
        self.session.on_rx(now_ns);
        match self.source.handle_frame(frame) {
            Ok(()) => {
                match self.source.take_full_resync() {
                    Some(FullResync::BeforeHostOps) => self.begin_full_resync(),
                    Some(FullResync::WhileRunning) => self.begin_full_overflow(now_ns),
                    None => {}
                }
                Ok(())
            }
            Err(e) if e.is_fatal() || self.sabotage == PeerSabotage::StopOnRetryable => {
                self.disconnects += 1;
                self.stop(e.clone());
                Err(CloseConn {
                    error: e,
                    fatal: true,
                })
            }
            Err(e) => {
                self.on_lost(now_ns);
                Err(CloseConn {
                    error: e,
                    fatal: false,
                })
            }
        }
    }

    /// Whether the peer is outdated: writes recorded out of sync (or, after a restart, the ones
    /// its record said were) have no durable resync end there yet. The record keeps it
    /// ([`MetaRecord::peer_outdated`]).
    #[must_use]
    pub fn peer_outdated(&self) -> bool {
        self.out_of_sync_after.is_some()
    }

    /// The peer became outdated or up to date again: the driver stores its running record,
    /// which says so.
    fn record_outdated_changed(&mut self) {
        if self.sabotage == PeerSabotage::OutdatedUnrecorded {
            return;
        }
        self.events.push_back(PeerEvent::RecordRunning {
            durable: self.source.durable(),
            rebased: None,
        });
    }

    /// The first [`PeerEvent::RecordRunning`], if not told yet.
    fn tell_record(&mut self) -> Option<PeerEvent> {
        if self.record_told {
            return None;
        }
        self.record_told = true;
        Some(PeerEvent::RecordRunning {
            durable: self.source.durable(),
            rebased: None,
        })
    }

    /// The target holds none of this volume's history and the sequence now continues after its
    /// (nothing was taken yet): every chunk is copied before host operations, in place of the
    /// stored intent's.
    fn begin_full_resync(&mut self) {
        let plan = ResyncPlan::full(
            self.source.config().volume_bytes,
            self.intent.live().chunk_bytes(),
        );
        self.resync_track = Some(ResyncTrack {
            total_bytes: plan.total_bytes(),
            full: true,
            ..ResyncTrack::default()
        });
        self.resync = Some(plan);
        self.resync_step = None;
        // The full copy carries whatever was written out of sync.
        self.overflow = None;
        self.step_interleaved = false;
        self.intent.unpin_all();
        // Writes recorded out of sync reach the peer with the full copy's end: it stays outdated
        // until then (the sequence now continues after its seq).
        if self.out_of_sync_after.is_some() {
            self.out_of_sync_after = Some(self.source.durable());
        }
        self.durable_reported = self.source.durable();
        self.record_told = true;
        self.events.push_back(PeerEvent::RecordRunning {
            durable: self.source.durable(),
            rebased: Some(self.everything_so_far()),
        });
    }

    /// The peer lost this volume's data while we ran and continues its sequence after our
    /// durable seq (the log is resent to it): every chunk goes out of sync and an overflow copies
    /// them all, the first resync a full one, while host writes go on (into chunks not yet
    /// copied they go out of sync, as in any overflow). The resync under way, if any, is
    /// superseded (a step handed out still enters the log: the copy covers it).
    fn begin_full_overflow(&mut self, now_ns: u64) {
        let volume_bytes = self.source.config().volume_bytes;
        self.resync = None;
        self.resync_track = None;
        if self.sabotage != PeerSabotage::LostDataResentOnly {
            self.intent.pin(Range::new(0, volume_bytes));
        }
        self.overflow = Some(Overflow {
            cause: OverflowCause::PeerLostData,
            full: true,
            begun: false,
            ending: false,
            copying: None,
            cursor: 0,
            low_chunks: u64::MAX,
            low_at_ns: now_ns,
        });
        // Nothing it made durable is there any more; only the full copy's end counts again.
        let durable = self.source.durable();
        self.out_of_sync_after = Some(self.out_of_sync_after.map_or(durable, |s| s.min(durable)));
        self.record_outdated_changed();
    }

    /// Replication stops for good (also what a driver calls when it cannot go on, e.g. no
    /// randomness for a nonce).
    pub fn stop(&mut self, error: SourceError) {
        if self.fatal.is_some() {
            return;
        }
        self.source.on_disconnect();
        self.session.on_fatal();
        self.parked = None;
        self.resync = None;
        self.resync_step = None;
        self.step_interleaved = false;
        self.overflow = None;
        self.fatal = Some(error.clone());
        self.events.push_back(PeerEvent::Stopped(error.clone()));
        if self.drain.take().is_some() {
            self.events
                .push_back(PeerEvent::Drained(Err(DrainError::Stopped(error))));
        }
    }

    /// Why replication stopped, if it did.
    #[must_use]
    pub fn fatal(&self) -> Option<&SourceError> {
        self.fatal.as_ref()
    }

    /// What the peer's copy is, as far as this primary knows.
    #[must_use]
    pub fn peer_data(&self) -> PeerData {
        let st = self.source.status();
        let durable = if self.sabotage == PeerSabotage::UpToDateEarly {
            st.received
        } else {
            st.durable
        };
        let ops = st.last_local.0.saturating_sub(durable.0);
        let overflow_blind = self.sabotage == PeerSabotage::UpToDateOverflowing;
        if let Some(track) = self
            .resync_track
            .as_ref()
            .filter(|t| !t.interleaved || !overflow_blind)
        {
            return PeerData::Resyncing { full: track.full };
        }
        if self.overflow.is_some() && !overflow_blind {
            return PeerData::OutOfSync {
                chunks: self.intent.pinned().dirty_chunks(),
            };
        }
        // Only an admitted session has a target that took our position (after its restart,
        // what it must re-apply to be consistent again).
        if !self.source.is_admitted() {
            return PeerData::Unknown { ops };
        }
        if ops > 0 {
            PeerData::Behind { ops }
        } else {
            PeerData::UpToDate
        }
    }

    /// Bytes an overflow's resync has yet to copy (its out-of-sync chunks, the rest of the one
    /// under way).
    fn out_of_sync_bytes(&self) -> u64 {
        let pinned = self.intent.pinned();
        let volume_bytes = self.source.config().volume_bytes;
        let copying = self
            .overflow
            .and_then(|ov| ov.copying)
            .map_or(0, |cp| cp.end - cp.at);
        pinned
            .dirty()
            .map(|c| pinned.chunk_range(c, volume_bytes).len_bytes)
            .sum::<u64>()
            + copying
    }

    /// The state a status report shows.
    #[must_use]
    pub fn status(&self) -> PeerLinkStatus {
        let durable = self.source.durable();
        PeerLinkStatus {
            source: self.source.status(),
            fatal: self.fatal.clone(),
            connects: self.connects,
            disconnects: self.disconnects,
            peer_data: self.peer_data(),
            intent: IntentStatus {
                chunk_bytes: self.intent.live().chunk_bytes(),
                dirty_chunks: self.intent.live().dirty_chunks(),
                stored_chunks: self.intent.stored().dirty_chunks(),
            },
            overflow: self.overflow(),
            overflow_rule: self.overflow_rule,
            out_of_sync_writes: self.out_of_sync_writes,
            throttled_writes: self.throttled_writes,
            resync: self.resync_track.as_ref().map(|t| ResyncStatus {
                full: t.full,
                total_bytes: if t.interleaved {
                    t.submitted_bytes + self.out_of_sync_bytes()
                } else {
                    t.total_bytes
                },
                submitted_bytes: t.submitted_bytes,
                durable_bytes: t
                    .in_log
                    .iter()
                    .take_while(|(seq, _)| *seq <= durable)
                    .last()
                    .map_or(t.durable_bytes, |&(_, bytes)| bytes),
                begun_ns: t.begun_ns,
            }),
        }
    }
}

/// What a node's role runs: the engines of a primary ([`Peers`]) or of a secondary ([`Target`]).
pub trait RoleEngines: std::fmt::Debug {
    /// The role these engines serve.
    const ROLE: Role;

    /// Brings what the record says of the data up to the engines' state.
    fn update_record(&self, _meta: &mut MetaRecord) {}
}

/// A primary's links, one per peer.
pub type Peers = BTreeMap<PeerId, PeerLink>;

impl RoleEngines for Peers {
    const ROLE: Role = Role::Primary;

    fn update_record(&self, meta: &mut MetaRecord) {
        meta.peer_outdated = self.values().any(PeerLink::peer_outdated);
    }
}

impl RoleEngines for Target {
    const ROLE: Role = Role::Secondary;

    fn update_record(&self, meta: &mut MetaRecord) {
        (meta.consistent, meta.resyncing) = self.data_state();
        meta.resync_full = self.resync_is_full();
        meta.gen_ids = self.gen_ids();
    }
}

/// One volume on one node: its persistent metadata and the engines its role runs. The role is
/// the type (`Node<Peers>` or `Node<Target>`), so a driver never meets the engine of another role;
/// a role change (issue 16) turns one into the other.
#[derive(Debug)]
pub struct Node<E: RoleEngines> {
    meta: MetaRecord,
    engines: E,
}

impl<E: RoleEngines> Node<E> {
    /// The volume this node serves.
    #[must_use]
    pub fn volume_id(&self) -> VolumeId {
        self.meta.volume_id
    }

    /// Its role.
    #[must_use]
    pub fn role(&self) -> Role {
        E::ROLE
    }

    /// The metadata as last recorded (or to be recorded).
    #[must_use]
    pub fn meta(&self) -> &MetaRecord {
        &self.meta
    }

    /// The role's engines, read-only.
    #[must_use]
    pub fn engines(&self) -> &E {
        &self.engines
    }

    /// The role's engines.
    pub fn engines_mut(&mut self) -> &mut E {
        &mut self.engines
    }

    /// The record to persist: a secondary's once `durable` is synced (`clean` at a graceful
    /// stop, after the last sync), a primary's at a clean stop (its peer holds everything through
    /// `durable`). The node keeps it as its current metadata.
    pub fn record(&mut self, durable: Seq, clean: bool) -> MetaRecord {
        self.meta.durable = durable;
        self.meta.clean = clean;
        self.engines.update_record(&mut self.meta);
        self.meta
    }
}

impl Node<Peers> {
    /// A primary mirroring to one peer. `meta` is the record it would persist.
    #[must_use]
    pub fn primary(meta: MetaRecord, peer: PeerId, link: PeerLink) -> Node<Peers> {
        Node {
            meta: MetaRecord {
                role: Role::Primary,
                ..meta
            },
            engines: BTreeMap::from([(peer, link)]),
        }
    }

    /// The link to `peer`, if this node mirrors to it.
    #[must_use]
    pub fn peer(&self, peer: PeerId) -> Option<&PeerLink> {
        self.engines.get(&peer)
    }

    /// The link to `peer`, to drive it.
    pub fn peer_mut(&mut self, peer: PeerId) -> Option<&mut PeerLink> {
        self.engines.get_mut(&peer)
    }
}

impl Node<Target> {
    /// A secondary over `target`, restored from `meta` (what [`crate::target::recover`] trusted).
    #[must_use]
    pub fn secondary(meta: MetaRecord, target: Target) -> Node<Target> {
        Node {
            meta: MetaRecord {
                role: Role::Secondary,
                ..meta
            },
            engines: target,
        }
    }
}

mod intent;
mod recover;
mod resync;
#[cfg(test)]
mod tests;

pub use intent::{WriteIntent, KEEP_BYTES_DEFAULT};
pub use recover::{
    new_sequence, recover_primary, recover_primary_with, running_primary_record,
    PrimaryRecoverError, PrimaryRecoverySabotage, PrimaryRestored, PrimaryStart,
};
pub use resync::{ResyncPlan, ResyncStep};
