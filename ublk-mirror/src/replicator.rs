//! The replicator: runs the [`Source`] engine on a tokio task over TCP to the target server.
//!
//! [`spawn`] starts the engine task and returns a [`Handle`]. The handle is cheap to clone and
//! usable from any thread or executor: it only talks to the engine through bounded
//! `tokio::sync` channels and oneshots, which need no tokio runtime on the caller's side.
//!
//! The engine task owns the [`Source`] and the connection:
//! - it connects with a bounded timeout and reconnects with bounded exponential backoff;
//! - on each connection it calls [`Source::on_connect`] with a fresh random nonce (the handshake is
//!   the engine's), a reader task decodes frames (56-byte header, then payload) and a writer task
//!   writes what [`Source::poll_transmit`] hands out, header and payload in one vectored write
//!   (write data is never copied: it stays the `Bytes` that entered the rollback log);
//! - any decode error, I/O error, engine error or silence longer than the idle timeout drops the
//!   connection ([`Source::on_disconnect`]) and reconnects; nothing is lost, the rollback log is
//!   resent after the next handshake;
//! - a REFUSE from the target, a failed authentication or a target that mirrors another volume
//!   (or claims more or less data than it can have) is fatal: pending and later operations fail
//!   with [`ReplError::Fatal`] and the status reports why.
//!
//! Back-pressure: while the rollback log has no room for the next operation, the engine stops
//! taking submissions, the bounded submission channel fills and [`Handle::enqueue`] waits.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mirror_core::session::{SessionAction, SessionConfig, SourceSession};
use mirror_core::source::{
    ConnState, Mode, Needs, Source, SourceConfig, SourceError, SourceStatus,
};
use mirror_core::wire::{Encoded, Frame, Op, SummedOp, MAC_BYTES, PAYLOAD_BYTES_MAX};
use mirror_core::Seq;
use mirror_net::ReadEnd;
use tokio::io::BufReader;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Frames queued towards the writer task of one connection.
const WRITER_QUEUE_FRAMES: usize = 64;
/// Events (decoded frames, failures) queued from the connection tasks to the engine.
const EVENT_QUEUE: usize = 256;
/// Control requests queued towards the engine.
const CONTROL_QUEUE: usize = 64;
/// Callers waiting for a sequence number to be replicated.
const REPLICATED_WAITERS_MAX: usize = 4096;
/// Frames and bytes the writer gathers into one vectored write.
const WRITE_BATCH_FRAMES: usize = 64;
const WRITE_BATCH_BYTES: usize = 1 << 20;
/// Buffer of the reader (frames from the target are small: acknowledgements).
const READ_BUFFER_BYTES: usize = 64 << 10;

/// How the replicator reaches the target and how patient it is.
#[derive(Clone)]
pub struct ReplicatorConfig {
    /// Target address (`host:port`).
    pub peer: String,
    /// The engine's configuration (volume identity, secret, mode, log bounds).
    pub source: SourceConfig,
    /// Bound on one connection attempt.
    pub connect_timeout: Duration,
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
}

impl ReplicatorConfig {
    /// A configuration with default timeouts and bounds.
    #[must_use]
    pub fn new(peer: impl Into<String>, source: SourceConfig) -> ReplicatorConfig {
        ReplicatorConfig {
            peer: peer.into(),
            source,
            connect_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            ping_interval: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(20),
            submit_queue: 256,
            submit_queue_bytes: 16 << 20,
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
            .field("block_bytes", &self.source.block_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("ping_interval", &self.ping_interval)
            .field("idle_timeout", &self.idle_timeout)
            .field("submit_queue", &self.submit_queue)
            .field("submit_queue_bytes", &self.submit_queue_bytes)
            .finish_non_exhaustive()
    }
}

/// Why a replicator call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplError {
    /// Replication stopped for good (refused, authentication failed, wrong volume, ...).
    #[error("replication stopped: {0}")]
    Fatal(String),
    /// The replicator was shut down (or its task ended).
    #[error("replicator shut down")]
    Shutdown,
    /// The operation is not valid for this volume (alignment, extent, size).
    #[error("invalid operation: {0}")]
    InvalidOp(String),
    /// Too many callers already wait for replication.
    #[error("too many callers waiting for replication (limit {REPLICATED_WAITERS_MAX})")]
    TooManyWaiters,
    /// The system's random number generator failed (needed for handshake nonces).
    #[error("no randomness for the handshake nonce: {0}")]
    Random(String),
}

/// A snapshot of the replicator's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatorStatus {
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
}

/// Connection state, published on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConnInfo {
    state: ConnState,
    connects: u64,
    fatal: Option<String>,
    last_error: Option<String>,
}

type Reply<T> = oneshot::Sender<Result<T, ReplError>>;

struct SubmitReq {
    /// Checksummed by the caller's thread (see [`SummedOp`]), not the engine's.
    op: SummedOp,
    reply: Reply<Seq>,
    /// The op's share of `submit_queue_bytes`, given back when the engine takes it.
    permit: Option<OwnedSemaphorePermit>,
}

enum Ctl {
    Status(oneshot::Sender<ReplicatorStatus>),
    SetMode(Mode, oneshot::Sender<()>),
    WaitReplicated(Seq, Reply<()>),
    Shutdown(oneshot::Sender<()>),
}

enum Event {
    Connected(u64, Result<TcpStream, String>),
    Frame(u64, Frame),
    Failed(u64, String),
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
            Ctl::Shutdown(_) => "Shutdown",
        })
    }
}

impl Handle {
    /// Queues `op` (waiting while the rollback log is full). Once this returns, the operation's
    /// place in the sequence is fixed: operations enqueued later get later sequence numbers.
    /// Await the returned [`Pending`] for its completion.
    pub async fn enqueue(&self, op: Op) -> Result<Pending, ReplError> {
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
            Err(_) => return Err(ReplError::InvalidOp(format!("{share} bytes in one op"))),
        };
        // The checksum is taken here, on the caller's thread (a ublk queue thread), so the
        // engine's single network thread does not read every payload again.
        let op = SummedOp::new(op);
        self.submit_tx
            .send(SubmitReq { op, reply, permit })
            .await
            .map_err(|_| ReplError::Shutdown)?;
        Ok(Pending { rx })
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
    /// replication stopped for good. Bound it with a timeout: an unreachable target is retried
    /// forever.
    pub async fn wait_connected(&self) -> Result<(), ReplError> {
        let mut rx = self.conn_rx.clone();
        loop {
            {
                let info = rx.borrow_and_update();
                if let Some(fatal) = &info.fatal {
                    return Err(ReplError::Fatal(fatal.clone()));
                }
                if info.connects > 0 {
                    return Ok(());
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
    let (submit_tx, submit_rx) = mpsc::channel(cfg.submit_queue.max(1));
    let queued_bytes_max = cfg
        .submit_queue_bytes
        .clamp(PAYLOAD_BYTES_MAX as usize, Semaphore::MAX_PERMITS);
    let queued_bytes = Arc::new(Semaphore::new(queued_bytes_max));
    let fast_ack = Arc::new(AtomicBool::new(
        Needs::of(cfg.source.mode, cfg.source.flush_replicates, false) == Needs::Local,
    ));
    let (ctl_tx, ctl_rx) = mpsc::channel(CONTROL_QUEUE);
    let (conn_tx, conn_rx) = watch::channel(ConnInfo {
        state: ConnState::Disconnected,
        connects: 0,
        fatal: None,
        last_error: None,
    });
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let session = SourceSession::new(session_config(&cfg), random_u64(), 0);
    let engine = Engine {
        source: Source::new(cfg.source.clone()),
        cfg,
        fast_ack: Arc::clone(&fast_ack),
        epoch: Instant::now(),
        session,
        events_tx,
        conn_tx,
        conn: None,
        next_conn_id: 0,
        connecting: None,
        waiting: HashMap::new(),
        replicated_waiters: BTreeMap::new(),
        replicated_waiter_count: 0,
        parked: None,
        staged: None,
        fatal: None,
        last_error: None,
        connects: 0,
        disconnects: 0,
        sent_frames: 0,
        sent_bytes: 0,
        was_connected: false,
    };
    let task = tokio::spawn(engine.run(submit_rx, ctl_rx, events_rx));
    (
        Handle {
            submit_tx,
            queued_bytes,
            queued_bytes_max,
            fast_ack,
            ctl_tx,
            conn_rx,
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

fn fresh_nonce() -> Result<[u8; MAC_BYTES], ReplError> {
    let mut nonce = [0u8; MAC_BYTES];
    getrandom::fill(&mut nonce).map_err(|e| ReplError::Random(e.to_string()))?;
    Ok(nonce)
}

struct Conn {
    id: u64,
    writer_tx: mpsc::Sender<Encoded>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

struct Engine {
    cfg: ReplicatorConfig,
    source: Source,
    epoch: Instant,
    /// When to connect, probe and give up: mirror-core's policy.
    session: SourceSession,
    events_tx: mpsc::Sender<Event>,
    conn_tx: watch::Sender<ConnInfo>,
    conn: Option<Conn>,
    next_conn_id: u64,
    /// Id of the connection attempt under way.
    connecting: Option<u64>,
    /// Operations submitted and not yet complete, by sequence number (bounded by the log).
    waiting: HashMap<Seq, Reply<Seq>>,
    replicated_waiters: BTreeMap<Seq, Vec<Reply<()>>>,
    replicated_waiter_count: usize,
    /// A submission taken from the channel that waits for room in the log.
    parked: Option<SubmitReq>,
    /// Shared with the handles: see [`Handle::acks_on_enqueue`].
    fast_ack: Arc<AtomicBool>,
    /// The next frame for the writer, taken from the engine but not yet queued.
    staged: Option<Encoded>,
    fatal: Option<String>,
    last_error: Option<String>,
    connects: u64,
    disconnects: u64,
    sent_frames: u64,
    sent_bytes: u64,
    was_connected: bool,
}

impl Engine {
    async fn run(
        mut self,
        mut submit_rx: mpsc::Receiver<SubmitReq>,
        mut ctl_rx: mpsc::Receiver<Ctl>,
        mut events_rx: mpsc::Receiver<Event>,
    ) {
        loop {
            self.pump();
            let writer = match (&self.conn, &self.staged) {
                (Some(c), Some(_)) => Some(c.writer_tx.clone()),
                _ => None,
            };
            let take_submit = self.parked.is_none();
            let wake = self.next_wake();
            tokio::select! {
                biased;
                Some(ev) = events_rx.recv() => self.on_event(ev),
                ctl = ctl_rx.recv() => match ctl {
                    Some(Ctl::Shutdown(done)) => {
                        self.stop(ReplError::Shutdown);
                        let _ = done.send(());
                        return;
                    }
                    Some(ctl) => self.on_ctl(ctl),
                    None => break,
                },
                permit = reserve(writer), if self.staged.is_some() => {
                    if let (Some(permit), Some(frame)) = (permit, self.staged.take()) {
                        permit.send(frame);
                        let now = self.now_ns();
                        self.session.on_tx(now);
                    }
                }
                req = submit_rx.recv(), if take_submit => match req {
                    Some(req) => self.on_submit(req),
                    None => break,
                },
                () = tokio::time::sleep_until(wake) => self.on_timer(),
            }
        }
        self.stop(ReplError::Shutdown);
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Moves everything that can move without waiting: parked submission, completions,
    /// replication waiters, the next frame to send.
    fn pump(&mut self) {
        if let Some(req) = self.parked.take() {
            if self.source.has_room(req.op.op().payload_bytes()) {
                self.submit_now(req);
            } else {
                self.parked = Some(req);
            }
        }
        while let Some(seq) = self.source.poll_completion() {
            if let Some(reply) = self.waiting.remove(&seq) {
                let _ = reply.send(Ok(seq));
            }
        }
        let durable = self.source.status().durable;
        while let Some(entry) = self.replicated_waiters.first_entry() {
            if *entry.key() > durable {
                break;
            }
            let replies = entry.remove();
            self.replicated_waiter_count -= replies.len();
            for reply in replies {
                let _ = reply.send(Ok(()));
            }
        }
        if self.staged.is_none() && self.conn.is_some() {
            self.staged = self.source.poll_transmit().map(|frame| frame.encode());
            if let Some(e) = &self.staged {
                self.sent_frames += 1;
                self.sent_bytes += e.wire_len() as u64;
            }
        }
        let state = self.source.status().conn;
        if state == ConnState::Connected && !self.was_connected {
            self.was_connected = true;
            self.connects += 1;
            self.session.on_authenticated();
            tracing::info!(peer = %self.cfg.peer, "connected to target");
            self.publish();
        }
    }

    fn next_wake(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        match self.session.poll_timeout() {
            Some(ns) => (self.epoch + Duration::from_nanos(ns)).min(far),
            None => far,
        }
    }

    fn on_timer(&mut self) {
        let now = self.now_ns();
        match self.session.handle_timeout(now) {
            Some(SessionAction::Connect) => self.start_connect(),
            Some(SessionAction::Drop(reason)) => self.drop_conn(reason),
            Some(SessionAction::Ping(token)) => {
                // A probe outside the engine: PING changes nothing on an authenticated session.
                // If the writer's queue is full, data is flowing anyway and the probe is skipped.
                if let Some(c) = &self.conn {
                    let _ = c.writer_tx.try_send(Frame::Ping { token }.encode());
                }
            }
            None => {}
        }
    }

    fn start_connect(&mut self) {
        if self.fatal.is_some() || self.conn.is_some() || self.connecting.is_some() {
            return;
        }
        self.next_conn_id += 1;
        let id = self.next_conn_id;
        self.connecting = Some(id);
        self.session.on_connecting();
        let peer = self.cfg.peer.clone();
        let timeout = self.cfg.connect_timeout;
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, TcpStream::connect(&peer)).await {
                Ok(Ok(stream)) => Ok(stream),
                Ok(Err(e)) => Err(format!("cannot connect to {peer}: {e}")),
                Err(_) => Err(format!(
                    "cannot connect to {peer}: timed out after {:.1} s",
                    timeout.as_secs_f64()
                )),
            };
            let _ = events.send(Event::Connected(id, result)).await;
        });
    }

    fn schedule_reconnect(&mut self) {
        let now = self.now_ns();
        self.session.on_lost(now);
    }

    fn publish(&self) {
        let info = ConnInfo {
            state: if self.conn.is_some() {
                self.source.status().conn
            } else {
                ConnState::Disconnected
            },
            connects: self.connects,
            fatal: self.fatal.clone(),
            last_error: self.last_error.clone(),
        };
        self.conn_tx.send_if_modified(|old| {
            let changed = *old != info;
            *old = info;
            changed
        });
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected(id, result) => {
                if self.connecting != Some(id) {
                    return;
                }
                self.connecting = None;
                match result {
                    Ok(stream) => self.open_conn(id, stream),
                    Err(reason) => {
                        tracing::info!(%reason, "connection attempt failed");
                        self.last_error = Some(reason);
                        self.publish();
                        self.schedule_reconnect();
                    }
                }
            }
            Event::Frame(id, frame) => {
                let Some(c) = &mut self.conn else { return };
                if c.id != id {
                    return;
                }
                let now = self.now_ns();
                self.session.on_rx(now);
                if let Err(e) = self.source.handle_frame(frame) {
                    if e.is_fatal() {
                        self.set_fatal(e.describe());
                    } else {
                        self.drop_conn(format!("engine error: {e}"));
                    }
                }
            }
            Event::Failed(id, reason) => {
                if self.conn.as_ref().is_some_and(|c| c.id == id) {
                    self.drop_conn(reason);
                }
            }
        }
    }

    fn open_conn(&mut self, id: u64, stream: TcpStream) {
        let nonce = match fresh_nonce() {
            Ok(n) => n,
            Err(e) => {
                self.set_fatal(e.to_string());
                return;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let (rd, wr) = stream.into_split();
        let (writer_tx, writer_rx) = mpsc::channel(WRITER_QUEUE_FRAMES);
        let reader = tokio::spawn(read_frames(id, rd, self.events_tx.clone()));
        let writer = tokio::spawn(write_frames(id, wr, writer_rx, self.events_tx.clone()));
        self.conn = Some(Conn {
            id,
            writer_tx,
            reader,
            writer,
        });
        let now = self.now_ns();
        self.session.on_connected(now);
        self.staged = None;
        self.was_connected = false;
        self.source.on_connect(nonce);
        tracing::debug!(peer = %self.cfg.peer, "handshaking");
        self.publish();
    }

    fn close_conn(&mut self) {
        if let Some(c) = self.conn.take() {
            c.reader.abort();
            c.writer.abort();
            self.disconnects += 1;
        }
        self.staged = None;
        self.was_connected = false;
        self.source.on_disconnect();
    }

    fn drop_conn(&mut self, reason: String) {
        tracing::warn!(%reason, "connection to the target dropped");
        self.close_conn();
        self.last_error = Some(reason);
        self.publish();
        self.schedule_reconnect();
    }

    fn set_fatal(&mut self, reason: String) {
        tracing::warn!(%reason, "replication stopped");
        self.fast_ack.store(false, Ordering::Release);
        self.close_conn();
        self.fatal = Some(reason.clone());
        self.last_error = Some(reason.clone());
        self.session.on_fatal();
        self.fail_all(&ReplError::Fatal(reason));
        self.publish();
    }

    fn fail_all(&mut self, err: &ReplError) {
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        for (_, replies) in std::mem::take(&mut self.replicated_waiters) {
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
        self.replicated_waiter_count = 0;
        if let Some(req) = self.parked.take() {
            let _ = req.reply.send(Err(err.clone()));
        }
    }

    fn stop(&mut self, err: ReplError) {
        self.fast_ack.store(false, Ordering::Release);
        self.close_conn();
        self.fail_all(&err);
    }

    fn on_submit(&mut self, mut req: SubmitReq) {
        // Out of the channel: its bytes no longer count against the channel's bound.
        drop(req.permit.take());
        if let Some(fatal) = &self.fatal {
            let _ = req.reply.send(Err(ReplError::Fatal(fatal.clone())));
            return;
        }
        let bytes = req.op.op().payload_bytes();
        if bytes > self.cfg.source.log_bytes_max || bytes > PAYLOAD_BYTES_MAX as usize {
            let _ = req.reply.send(Err(ReplError::InvalidOp(format!(
                "operation of {bytes} bytes can never fit the rollback log"
            ))));
            return;
        }
        if self.source.has_room(bytes) {
            self.submit_now(req);
        } else {
            self.parked = Some(req);
        }
    }

    fn submit_now(&mut self, req: SubmitReq) {
        let now_ns = self.now_ns();
        match self.source.submit(req.op.clone(), now_ns) {
            Ok(seq) => {
                self.waiting.insert(seq, req.reply);
            }
            Err(SourceError::LogFull) => self.parked = Some(req),
            Err(SourceError::InvalidOp(why)) => {
                let _ = req.reply.send(Err(ReplError::InvalidOp(why)));
            }
            Err(e) => {
                let _ = req.reply.send(Err(ReplError::Fatal(e.to_string())));
                self.set_fatal(format!("rollback log failed: {e}"));
            }
        }
    }

    fn on_ctl(&mut self, ctl: Ctl) {
        match ctl {
            Ctl::Status(reply) => {
                let _ = reply.send(ReplicatorStatus {
                    source: self.source.status(),
                    last_error: self.last_error.clone(),
                    fatal: self.fatal.clone(),
                    connects: self.connects,
                    disconnects: self.disconnects,
                    sent_frames: self.sent_frames,
                    sent_bytes: self.sent_bytes,
                });
            }
            Ctl::SetMode(mode, reply) => {
                self.source.set_mode(mode);
                self.fast_ack.store(
                    self.source.data_completes_on_submit() && self.fatal.is_none(),
                    Ordering::Release,
                );
                let _ = reply.send(());
            }
            Ctl::WaitReplicated(seq, reply) => {
                if self.source.is_replicated(seq) {
                    let _ = reply.send(Ok(()));
                } else if let Some(fatal) = &self.fatal {
                    let _ = reply.send(Err(ReplError::Fatal(fatal.clone())));
                } else if seq > self.source.status().last_local {
                    let _ = reply.send(Err(ReplError::InvalidOp(format!(
                        "seq {seq} was never submitted"
                    ))));
                } else if self.replicated_waiter_count >= REPLICATED_WAITERS_MAX {
                    let _ = reply.send(Err(ReplError::TooManyWaiters));
                } else {
                    self.replicated_waiter_count += 1;
                    self.replicated_waiters.entry(seq).or_default().push(reply);
                }
            }
            Ctl::Shutdown(done) => {
                // Handled by the loop; kept for exhaustiveness.
                let _ = done.send(());
            }
        }
    }
}

async fn reserve(writer: Option<mpsc::Sender<Encoded>>) -> Option<mpsc::OwnedPermit<Encoded>> {
    match writer {
        Some(tx) => tx.reserve_owned().await.ok(),
        None => std::future::pending().await,
    }
}

async fn read_frames(id: u64, rd: OwnedReadHalf, events: mpsc::Sender<Event>) {
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let reason = loop {
        match mirror_net::read_frame(&mut rd, None).await {
            Ok(Ok(frame)) => {
                if events.send(Event::Frame(id, frame)).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => break format!("bad frame from the target: {e}"),
            Err(ReadEnd::PeerClosed) => break "the target closed the connection".to_string(),
            Err(ReadEnd::Wire(e)) => break format!("bad frame from the target: {e}"),
            Err(e) => break format!("read from the target: {e}"),
        }
    };
    let _ = events.send(Event::Failed(id, reason)).await;
}

async fn write_frames(
    id: u64,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Encoded>,
    events: mpsc::Sender<Event>,
) {
    let mut batch: Vec<Encoded> = Vec::with_capacity(WRITE_BATCH_FRAMES);
    while let Some(first) = rx.recv().await {
        let mut bytes = first.wire_len();
        batch.push(first);
        while batch.len() < WRITE_BATCH_FRAMES && bytes < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(frame) => {
                    bytes += frame.wire_len();
                    batch.push(frame);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = mirror_net::write_frames(&mut wr, &batch).await {
            let _ = events
                .send(Event::Failed(id, format!("write to the target: {e}")))
                .await;
            return;
        }
        batch.clear();
    }
}
