//! The replicator: runs a volume's primary [`Node`] (its [`Source`] engine per peer) on a tokio
//! task over TCP to the target server.
//!
//! [`spawn`] starts the engine task and returns a [`Handle`]. The handle is cheap to clone and
//! usable from any thread or executor: it only talks to the engine through bounded
//! `tokio::sync` channels and oneshots, which need no tokio runtime on the caller's side.
//!
//! The engine task (`engine.rs`) owns the node and so mirror-core's [`PeerLink`], which decides
//! everything: when to connect, probe and give up (its session, and the start's connect
//! deadline), which errors stop replication for good, when an operation completes, when "durable
//! through N" wakes a waiter, when a stop's drain is over, and which submission waits for room in
//! the rollback log. The task moves bytes: it opens the connection (with a bounded
//! timeout), gives the link a fresh random nonce, runs a reader task (frames from the target) and
//! a writer task (what the link hands out, header and payload in one vectored write; data is never
//! copied), and forwards the link's [`PeerEvent`](mirror_core::node::PeerEvent)s to the callers
//! waiting on them.
//!
//! Back-pressure: while a submission waits for room in the log, the engine takes no other; the
//! bounded submission channel fills and [`Handle::enqueue`] waits. With overflow on
//! ([`ReplicatorConfig::overflow`], the default) a write in `async` or `received` never waits
//! for room: the link records it out of sync and resyncs it later; the copies of that resync
//! read the local volume under the host writes' [`RangeGate`] ([`Handle::gate`]).

use crate::device::gate::RangeGate;

mod conn;
mod engine;
mod intent;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mirror_core::bitmap::DirtyBitmap;
use mirror_core::log::MemLog;
use mirror_core::meta::{MetaRecord, Role};
use mirror_core::node::{
    DrainError, Node, OverflowRule, PeerLink, PrimaryRestored, SubmitError, SyncPeerGone,
};
use mirror_core::session::{SessionConfig, SourceSession};
use mirror_core::source::{Mode, Source, SourceConfig, SourceError, SourceStatus};
use mirror_core::storage::{IntentStore, MetaStore};
use mirror_core::wire::{Op, SummedOp, PAYLOAD_BYTES_MAX};
use mirror_core::Seq;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// Control requests queued towards the engine.
const CONTROL_QUEUE: usize = 64;
/// Callers waiting for a sequence number to be replicated.
const REPLICATED_WAITERS_MAX: usize = 4096;

/// How the replicator reaches the target and how patient it is.
#[derive(Clone)]
pub struct ReplicatorConfig {
    /// Target address (`host:port`).
    pub peer: String,
    /// The engine's configuration (volume identity, secret, mode, log bounds).
    pub source: SourceConfig,
    /// The node's metadata record as it runs (its `durable`: the peer holds every operation
    /// through it, what [`recover_primary`] restored, and the sequence continues after it); a
    /// clean drain returns it marked clean.
    ///
    /// [`recover_primary`]: mirror_core::node::recover_primary
    pub meta: MetaRecord,
    /// Bound on one connection attempt.
    pub connect_timeout: Duration,
    /// Replication stops for good unless a handshake completes within this of the start
    /// (`None`: keep trying).
    pub connect_deadline: Option<Duration>,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay (the delay doubles after each failure up to this).
    pub backoff_max: Duration,
    /// A PING is sent when nothing was sent for this long on an established connection.
    pub ping_interval: Duration,
    /// The connection is dropped when nothing arrives from the target for this long.
    pub idle_timeout: Duration,
    /// Bound on submissions queued towards the engine.
    pub submit_queue: usize,
    /// Bound on the payload bytes of those submissions (at least [`PAYLOAD_BYTES_MAX`]).
    pub submit_queue_bytes: usize,
    /// When host writes stop being queued for the peer and are recorded out of sync instead.
    pub overflow: OverflowRule,
    /// An overflow's resync copies at most this many bytes per second (none: unbounded).
    pub resync_rate_bytes_per_s: Option<u64>,
    /// The stored write intent keeps clean chunks up to this many bytes of them, so that
    /// rewriting them costs no store, and a crash resyncs them all (none: mirror-core's default,
    /// 1 GiB).
    pub intent_keep_bytes: Option<u64>,
    /// While an overflow's resync does not converge, host writes queue instead of overflowing
    /// ([`PeerLink::set_overflow_throttle`]).
    pub resync_throttle: bool,
    /// Host operations in flight at once, at most (the range gate's size, less the resync's
    /// entry).
    pub host_ops_max: usize,
}

/// The default of [`ReplicatorConfig::overflow`]: on, after 30 s without the peer, and `sync`
/// suspends.
pub const OVERFLOW_DEFAULT: OverflowRule = OverflowRule {
    enabled: true,
    after_down_ns: 30_000_000_000,
    sync_peer_gone: SyncPeerGone::Suspend,
};

impl ReplicatorConfig {
    /// A configuration with default timeouts and bounds.
    #[must_use]
    pub fn new(peer: impl Into<String>, source: SourceConfig) -> ReplicatorConfig {
        let meta = MetaRecord {
            node_id: source.node_id,
            role: Role::Primary,
            ..MetaRecord::new(source.volume_id, source.volume_bytes)
        };
        ReplicatorConfig {
            peer: peer.into(),
            source,
            meta,
            connect_timeout: Duration::from_secs(3),
            connect_deadline: None,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            ping_interval: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(20),
            submit_queue: 256,
            submit_queue_bytes: 16 << 20,
            overflow: OVERFLOW_DEFAULT,
            resync_rate_bytes_per_s: None,
            intent_keep_bytes: None,
            resync_throttle: false,
            host_ops_max: 4096,
        }
    }
}

impl fmt::Debug for ReplicatorConfig {
    // By hand: the source configuration holds the shared secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicatorConfig")
            .field("peer", &self.peer)
            .field("volume_id", &self.source.volume_id)
            .field("mode", &self.source.mode)
            .field("volume_bytes", &self.source.volume_bytes)
            .field("confirmed", &self.meta.durable)
            .field("block_bytes", &self.source.block_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("connect_deadline", &self.connect_deadline)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("ping_interval", &self.ping_interval)
            .field("idle_timeout", &self.idle_timeout)
            .field("submit_queue", &self.submit_queue)
            .field("submit_queue_bytes", &self.submit_queue_bytes)
            .field("overflow", &self.overflow)
            .field("resync_rate_bytes_per_s", &self.resync_rate_bytes_per_s)
            .field("intent_keep_bytes", &self.intent_keep_bytes)
            .field("resync_throttle", &self.resync_throttle)
            .field("host_ops_max", &self.host_ops_max)
            .finish_non_exhaustive()
    }
}

/// The write intent a primary with a metadata area keeps ([`spawn_primary`]).
#[derive(Debug)]
pub struct IntentSetup {
    /// Where it is stored.
    pub store: Box<dyn IntentStore>,
    /// The map as last stored after a crash, else a clean map of the store's geometry.
    pub stored: DirtyBitmap,
    /// What the start restored ([`mirror_core::node::recover_primary`]): after a crash, the
    /// chunks of `stored` are resynced before host operations.
    pub restored: PrimaryRestored,
    /// The local volume's data area, read by the resync.
    pub volume: std::fs::File,
    /// Where the primary's record is kept: the engine stores it (not clean) when the link says
    /// ([`mirror_core::node::PeerEvent::RecordRunning`]).
    pub record: Box<dyn MetaStore + Send>,
}

/// Why a replicator call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplError {
    /// Replication stopped for good (refused, authentication failed, wrong volume, ...).
    #[error("replication stopped: {}", .0.describe())]
    Fatal(SourceError),
    /// The replicator was shut down (or its task ended).
    #[error("replicator shut down")]
    Shutdown,
    /// The operation is not valid for this volume (alignment, extent, size).
    #[error("{0}")]
    InvalidOp(SourceError),
    /// A wait for a sequence number that was never submitted.
    #[error("seq {0} was never submitted")]
    NeverSubmitted(Seq),
    /// Another drain replaced this one.
    #[error("a later drain replaced this one")]
    DrainReplaced,
    /// A drain ended before the target held everything.
    #[error("{0}")]
    NotDrained(DrainError),
    /// Too many callers already wait for replication.
    #[error("too many callers waiting for replication (limit {REPLICATED_WAITERS_MAX})")]
    TooManyWaiters,
    /// A resync must enter the log first (the engine holds submissions until it has; a caller
    /// that submits to the link directly meets this).
    #[error("{0}")]
    Resync(SubmitError),
}

impl From<SubmitError> for ReplError {
    fn from(e: SubmitError) -> ReplError {
        match e {
            SubmitError::Invalid(e) => ReplError::InvalidOp(e),
            SubmitError::Stopped(e) => ReplError::Fatal(e),
            // The engine takes no submission while one is parked; if it ever did, the caller
            // sees the log as full rather than an operation silently dropped.
            SubmitError::AlreadyParked => ReplError::InvalidOp(SourceError::LogFull),
            e @ (SubmitError::Resyncing
            | SubmitError::NotResyncStep { .. }
            | SubmitError::Withdrawn) => ReplError::Resync(e),
        }
    }
}

/// A snapshot of the replicator's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatorStatus {
    /// The node's role for this volume.
    pub role: Role,
    /// The engine's state (sequence numbers, log fill, connection).
    pub source: SourceStatus,
    /// Why the last connection (attempt) ended, if one did.
    pub last_error: Option<String>,
    /// Why replication stopped for good, if it did.
    pub fatal: Option<String>,
    /// Handshakes completed.
    pub connects: u64,
    /// Frames handed to the connection since start (resends included).
    pub sent_frames: u64,
    /// Their bytes on the wire: headers and payloads (resends included).
    pub sent_bytes: u64,
    /// Connections dropped after they were opened (including failed handshakes).
    pub disconnects: u64,
    /// The write intent, if one is kept.
    pub intent: Option<mirror_core::node::IntentStatus>,
    /// The resync under way, if any.
    pub resync: Option<mirror_core::node::ResyncStatus>,
    /// The engine's clock when it took this report (the resync's `begun_ns` is on it).
    pub clock_ns: u64,
    /// The volume's generation ids, as its record keeps them.
    pub gen_ids: mirror_core::genid::GenIds,
    /// What the peer's copy is.
    pub peer_data: mirror_core::node::PeerData,
    /// The overflow under way, if any.
    pub overflow: Option<mirror_core::node::OverflowStatus>,
    /// When writes overflow.
    pub overflow_rule: OverflowRule,
    /// An overflow's resync copies at most this many bytes per second (none: unbounded).
    pub resync_rate_bytes_per_s: Option<u64>,
    /// Writes completed out of sync since the start.
    pub out_of_sync_writes: u64,
    /// Whether writes are throttled while an overflow's resync does not converge.
    pub resync_throttle: bool,
    /// Host writes queued because it did not.
    pub throttled_writes: u64,
    /// The seq whose replication means every write so far is on the peer
    /// ([`PeerLink::everything_so_far`]).
    pub everything_so_far: Seq,
}

/// Connection state, published on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConnInfo {
    connects: u64,
    /// The start's connect deadline (this many seconds) passed and it went on without the peer.
    degraded: Option<u64>,
    fatal: Option<SourceError>,
    last_error: Option<String>,
}

/// How a start found its peer ([`Handle::wait_connected`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// A handshake completed.
    Connected,
    /// The connect deadline passed; the start serves the host without its peer
    /// ([`mirror_core::node::PeerEvent::Degraded`]) and keeps reconnecting.
    Degraded {
        /// The deadline's bound, in whole seconds.
        secs: u64,
    },
}

type Reply<T> = oneshot::Sender<Result<T, ReplError>>;

struct SubmitReq {
    /// Checksummed by the caller's thread (see [`SummedOp`]), not the engine's.
    op: SummedOp,
    reply: Reply<Seq>,
    /// Told once the stored write intent holds the op's chunks, if it did not when queued.
    covered: Option<oneshot::Sender<Result<(), ReplError>>>,
    /// The op's share of `submit_queue_bytes`, given back when the engine takes it.
    permit: Option<OwnedSemaphorePermit>,
}

enum Ctl {
    Status(oneshot::Sender<ReplicatorStatus>),
    SetMode(Mode, oneshot::Sender<()>),
    WaitReplicated(Seq, Reply<()>),
    Drain(Duration, Reply<MetaRecord>),
    Shutdown(oneshot::Sender<()>),
}

/// An operation accepted by the replicator (its place in the sequence is fixed); await it for its
/// completion per the acknowledgement mode.
#[derive(Debug)]
pub struct Pending {
    rx: oneshot::Receiver<Result<Seq, ReplError>>,
}

impl Future for Pending {
    type Output = Result<Seq, ReplError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(_)) => Poll::Ready(Err(ReplError::Shutdown)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The caller's side of a replicator. Clone it freely; every method works from any executor.
#[derive(Debug, Clone)]
pub struct Handle {
    submit_tx: mpsc::Sender<SubmitReq>,
    /// Payload bytes that may sit in the submission channel.
    queued_bytes: Arc<Semaphore>,
    queued_bytes_max: usize,
    /// True while an operation is complete as soon as it is queued (see
    /// [`Handle::acks_on_enqueue`]).
    fast_ack: Arc<AtomicBool>,
    ctl_tx: mpsc::Sender<Ctl>,
    conn_rx: watch::Receiver<ConnInfo>,
    intent: Arc<intent::IntentView>,
    gate: Arc<RangeGate>,
}

impl fmt::Debug for SubmitReq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubmitReq").field("op", &self.op).finish()
    }
}

impl fmt::Debug for Ctl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ctl::Status(_) => "Status",
            Ctl::SetMode(..) => "SetMode",
            Ctl::WaitReplicated(..) => "WaitReplicated",
            Ctl::Drain(..) => "Drain",
            Ctl::Shutdown(_) => "Shutdown",
        })
    }
}

impl Handle {
    /// Queues `op` (waiting while the rollback log is full). Once this returns, the operation's
    /// place in the sequence is fixed (operations enqueued later get later sequence numbers) and
    /// the stored write intent holds its chunks, so it may reach the local volume. Await the
    /// returned [`Pending`] for its completion.
    pub async fn enqueue(&self, op: Op) -> Result<Pending, ReplError> {
        let range = op.range();
        let covered = self.intent.enter(range);
        let (reply, rx) = oneshot::channel();
        // Bigger than the bound: the engine refuses it anyway; take the whole bound meanwhile.
        let share = op.payload_bytes().min(self.queued_bytes_max);
        let permit = match u32::try_from(share) {
            Ok(0) => None,
            Ok(n) => Some(
                Arc::clone(&self.queued_bytes)
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| ReplError::Shutdown)?,
            ),
            Err(_) => {
                return Err(ReplError::InvalidOp(SourceError::NeverFits {
                    bytes: share,
                    log_bytes_max: self.queued_bytes_max,
                }))
            }
        };
        // The checksum is taken here, on the caller's thread (a ublk queue thread), so the
        // engine's single network thread does not read every payload again.
        let op = SummedOp::new(op);
        let (covered_tx, covered_rx) = if covered {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        let req = SubmitReq {
            op,
            reply,
            covered: covered_tx,
            permit,
        };
        if self.submit_tx.send(req).await.is_err() {
            self.intent.leave(range);
            return Err(ReplError::Shutdown);
        }
        if let Some(rx) = covered_rx {
            rx.await.map_err(|_| ReplError::Shutdown)??;
        }
        Ok(Pending { rx })
    }

    /// The range gate every host write to this volume must hold across its enqueue and its
    /// local half (the resync's copies join it).
    #[must_use]
    pub fn gate(&self) -> Arc<RangeGate> {
        Arc::clone(&self.gate)
    }

    /// Whether an operation that [`Handle::enqueue`] accepted is already complete per the mode:
    /// true in `async` mode while replication has not failed for good. Its place in the sequence
    /// is fixed and the engine takes it into the rollback log in that order (the submission
    /// channel is bounded in operations and bytes), so a caller may skip awaiting its
    /// [`Pending`] and save a round trip through the engine's thread. Only for data operations:
    /// a flush may still wait for the target (`flush_replicates`).
    #[must_use]
    pub fn acks_on_enqueue(&self) -> bool {
        self.fast_ack.load(Ordering::Acquire)
    }

    /// Submits `op` and resolves when it completes per the acknowledgement mode, with its
    /// sequence number.
    pub async fn submit(&self, op: Op) -> Result<Seq, ReplError> {
        self.enqueue(op).await?.await
    }

    /// A host flush: a barrier that completes per the mode (and `flush_replicates`).
    pub async fn flush(&self) -> Result<Seq, ReplError> {
        self.submit(Op::Flush).await
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Ctl) -> Result<T, ReplError> {
        let (tx, rx) = oneshot::channel();
        self.ctl_tx
            .send(make(tx))
            .await
            .map_err(|_| ReplError::Shutdown)?;
        rx.await.map_err(|_| ReplError::Shutdown)
    }

    /// The current state.
    pub async fn status(&self) -> Result<ReplicatorStatus, ReplError> {
        self.ask(Ctl::Status).await
    }

    /// Changes the acknowledgement mode; waiting operations are re-evaluated.
    pub async fn set_mode(&self, mode: Mode) -> Result<(), ReplError> {
        self.ask(|tx| Ctl::SetMode(mode, tx)).await
    }

    /// Resolves once operation `seq` (and so every earlier one) is applied and durable on the
    /// target.
    pub async fn wait_replicated(&self, seq: Seq) -> Result<(), ReplError> {
        self.ask(|tx| Ctl::WaitReplicated(seq, tx)).await?
    }

    /// Resolves once a handshake with the target has completed (now or earlier), or fails when
    /// replication stopped for good: with [`ReplicatorConfig::connect_deadline`], also once it
    /// passed without a handshake (else an unreachable target is retried forever), unless the
    /// start may serve the host without its peer: then it resolves as [`Started::Degraded`].
    pub async fn wait_connected(&self) -> Result<Started, ReplError> {
        let mut rx = self.conn_rx.clone();
        loop {
            {
                let info = rx.borrow_and_update();
                if let Some(fatal) = &info.fatal {
                    return Err(ReplError::Fatal(fatal.clone()));
                }
                if info.connects > 0 {
                    return Ok(Started::Connected);
                }
                if let Some(secs) = info.degraded {
                    return Ok(Started::Degraded { secs });
                }
            }
            rx.changed().await.map_err(|_| ReplError::Shutdown)?;
        }
    }

    /// Why the last connection (attempt) failed, without asking the engine.
    #[must_use]
    pub fn last_error(&self) -> Option<String> {
        self.conn_rx.borrow().last_error.clone()
    }

    /// The host is done: once the target holds every operation submitted so far durably,
    /// resolves with the node's record of that clean stop (its `durable` the last seq) for the
    /// caller to store; fails when `limit` passed first ([`ReplError::NotDrained`]) or
    /// replication stopped.
    pub async fn drain(&self, limit: Duration) -> Result<MetaRecord, ReplError> {
        self.ask(|tx| Ctl::Drain(limit, tx)).await?
    }

    /// Stops the engine: pending operations fail with [`ReplError::Shutdown`], the connection
    /// closes. Unreplicated entries are lost with the in-memory rollback log.
    pub async fn shutdown(&self) -> Result<(), ReplError> {
        self.ask(Ctl::Shutdown).await
    }
}

/// Starts the engine task on the current tokio runtime. The task ends on [`Handle::shutdown`] or
/// when every handle is dropped.
///
/// # Panics
/// Outside a tokio runtime.
pub fn spawn(cfg: ReplicatorConfig) -> (Handle, JoinHandle<()>) {
    spawn_primary(cfg, None)
}

/// [`spawn`] for a primary that keeps a write intent (`intent`): every write's chunks are in the
/// stored intent before it may reach the local volume ([`Handle::enqueue`]), and a restart after
/// a crash resyncs the stored chunks first.
///
/// # Panics
/// Outside a tokio runtime.
pub fn spawn_primary(
    cfg: ReplicatorConfig,
    intent: Option<IntentSetup>,
) -> (Handle, JoinHandle<()>) {
    let (submit_tx, submit_rx) = mpsc::channel(cfg.submit_queue.max(1));
    let queued_bytes_max = cfg
        .submit_queue_bytes
        .clamp(PAYLOAD_BYTES_MAX as usize, Semaphore::MAX_PERMITS);
    let queued_bytes = Arc::new(Semaphore::new(queued_bytes_max));

    let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
    let (conn_tx, conn_rx) = watch::channel(ConnInfo {
        connects: 0,
        degraded: None,
        fatal: None,
        last_error: None,
    });
    let session = SourceSession::new(session_config(&cfg), random_u64(), 0);
    let source = Source::with_log(cfg.source.clone(), MemLog::new(), cfg.meta.durable);
    let (mut link, view, kept) = match intent {
        Some(setup) => {
            let view = Arc::new(intent::IntentView::new(&setup.stored));
            let link = PeerLink::restarted(source, session, setup.restored, setup.stored);
            let kept = engine::KeptIntent {
                store: setup.store,
                volume: Arc::new(setup.volume),
                record: setup.record,
                view: Arc::clone(&view),
            };
            (link, view, Some(kept))
        }
        None => (
            PeerLink::new(source, session),
            Arc::new(intent::IntentView::disabled()),
            None,
        ),
    };
    // Overflow needs a stored intent to record writes in and a volume to resync them from.
    if kept.is_some() {
        link.set_overflow_rule(cfg.overflow);
        link.set_resync_rate(cfg.resync_rate_bytes_per_s);
        link.set_overflow_throttle(cfg.resync_throttle);
        if let Some(bytes) = cfg.intent_keep_bytes {
            let chunk_bytes = link.status().intent.chunk_bytes.max(1);
            link.set_intent_keep_chunks(bytes / chunk_bytes);
        }
    }
    if let Some(limit) = cfg.connect_deadline {
        link.set_connect_deadline(0, u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX));
    }
    let fast_ack = Arc::new(AtomicBool::new(link.acks_on_submit()));
    let node = Node::primary(cfg.meta, engine::PEER, link);
    let gate = RangeGate::new(cfg.host_ops_max.saturating_add(1));
    let engine = engine::Engine::new(
        cfg,
        Arc::clone(&gate),
        node,
        Arc::clone(&fast_ack),
        conn_tx,
        kept,
    );
    let task = tokio::spawn(engine.run(submit_rx, ctl_rx));
    (
        Handle {
            submit_tx,
            queued_bytes,
            queued_bytes_max,
            fast_ack,
            ctl_tx,
            conn_rx,
            intent: view,
            gate,
        },
        task,
    )
}

/// The replicator's timers as mirror-core's session policy takes them.
fn session_config(cfg: &ReplicatorConfig) -> SessionConfig {
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    SessionConfig {
        backoff_min_ns: ns(cfg.backoff_min),
        backoff_max_ns: ns(cfg.backoff_max),
        ping_interval_ns: ns(cfg.ping_interval),
        idle_timeout_ns: ns(cfg.idle_timeout),
    }
}

fn random_u64() -> u64 {
    // Only for reconnect jitter and PING tokens: a fixed fallback is harmless.
    getrandom::u64().unwrap_or(0x5eed_5eed_5eed_5eed)
}
