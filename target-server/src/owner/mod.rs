//! The task that owns the engine. It waits on its inputs (accepted connections, frames from the
//! connections' readers, the I/O thread's batch results, local lock requests, the engine's
//! timer (handshake deadlines, the session's idle timeout), shutdown) and hands the results out (bytes to the connections' writers, a
//! batch to the I/O thread, the status). No other task reaches the engine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirror_core::commit::{Batch, CommitConfig, GroupCommit};
use mirror_core::lock::{LocalLockId, LockError};
use mirror_core::meta::MetaRecord;
use mirror_core::node::Node;
use mirror_core::storage::{MetaStore, Volume};
use mirror_core::target::{CloseReason, ConnId, Target, TargetError, TargetStatus};
use mirror_core::wire::{Encoded, MAC_BYTES};
use mirror_core::{Range, Seq};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, error, info, warn};

use crate::conn::{self, Input};
use crate::error::{InternalError, IoFailure, ServerError};
use crate::io_thread::IoThread;
use mirror_net::ReadEnd;

mod batch;

/// Frames the readers may have handed over and the owner not yet taken (each up to
/// `PAYLOAD_BYTES_MAX`): the memory a full commit log can leave in flight.
const INPUTS_MAX: usize = 16;
/// Inputs taken in one go before the owner looks at its other sources again.
const INPUTS_PER_ROUND: usize = 64;
/// Batches of encoded frames queued for one connection's writer.
const WRITER_BATCHES_MAX: usize = 8;
/// Bytes of encoded frames put in one writer batch at most.
const WRITER_BATCH_BYTES: usize = 1 << 20;
/// Frames put in one writer batch at most.
const WRITER_BATCH_FRAMES: usize = 256;
/// Connections open at once (handshakes, the session, and refused ones still closing); beyond it
/// an accepted connection is closed at once.
const CONNECTIONS_MAX: usize = 4 * mirror_core::target::HANDSHAKES_MAX_DEFAULT + 4;
/// How long a graceful shutdown waits for the writers to send their last frames.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A request from the server's handle (local lock holders).
#[derive(Debug)]
pub(crate) enum Cmd {
    Lock(Range, oneshot::Sender<Result<LocalLockId, LockError>>),
    Unlock(LocalLockId),
}

/// What the owner needs besides the engine.
#[derive(Debug)]
pub(crate) struct Owner {
    /// The volume's node: the engine and the record it persists (whether recovery trusts the
    /// data included: every record written says so).
    pub(crate) node: Node<Target>,
    pub(crate) volume: Arc<dyn Volume + Send + Sync>,
    pub(crate) meta_file: Arc<dyn MetaStore + Send + Sync>,
    pub(crate) listener: TcpListener,
    pub(crate) cmds: mpsc::Receiver<Cmd>,
    pub(crate) status: watch::Sender<TargetStatus>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Run before a resync's copies reach the volume.
    pub(crate) before_resync: Option<Arc<crate::hook::BeforeResync>>,
}

/// A connection as the owner sees it.
#[derive(Debug)]
struct ConnIo {
    peer: SocketAddr,
    writer: mpsc::Sender<Vec<Encoded>>,
    /// The writer's task: aborted when its peer is dead (it may never read what is queued).
    writer_task: AbortHandle,
    /// Tells the reader to stop; `true`: drain what the peer sent first.
    stop_reader: Option<oneshot::Sender<bool>>,
}

/// What woke the owner.
enum Event {
    Shutdown,
    IoDone(Result<Result<Batch, IoFailure>, oneshot::error::RecvError>),
    Writable,
    Input(Input),
    Cmd(Cmd),
    Accepted(std::io::Result<(TcpStream, SocketAddr)>),
    Timer,
    TaskEnded,
}

struct Run {
    o: Owner,
    /// A connection whose writer was full when it had frames to send.
    blocked: Option<ConnId>,
    scratch: Vec<ConnId>,
    io: IoThread,
    commit: GroupCommit,
    /// The batch on the I/O thread.
    io_pending: Option<oneshot::Receiver<Result<Batch, IoFailure>>>,
    conns: HashMap<ConnId, ConnIo>,
    tasks: JoinSet<()>,
    inputs_tx: mpsc::Sender<Input>,
    inputs: mpsc::Receiver<Input>,
    next_conn: u64,
    started: Instant,
}

impl Owner {
    /// Runs until shutdown (graceful: what is ready is applied, synced and recorded clean) or a
    /// fatal volume error.
    pub(crate) async fn run(self) -> Result<(), ServerError> {
        let io = IoThread::spawn().map_err(InternalError::IoThreadSpawn)?;
        let (inputs_tx, inputs) = mpsc::channel(INPUTS_MAX);
        let mut run = Run {
            o: self,
            blocked: None,
            scratch: Vec::new(),
            io,
            commit: GroupCommit::new(CommitConfig::default()),
            io_pending: None,
            conns: HashMap::new(),
            tasks: JoinSet::new(),
            inputs_tx,
            inputs,
            next_conn: 1,
            started: Instant::now(),
        };
        let result = run.serve().await;
        let result = match result {
            Ok(()) => run.finish().await,
            Err(e) => {
                error!("stopping: {e}");
                Err(e)
            }
        };
        run.close_all(CLOSE_GRACE).await;
        result
    }
}

impl Run {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn meta(&mut self, durable: Seq, clean: bool) -> MetaRecord {
        self.o.node.record(durable, clean)
    }

    async fn serve(&mut self) -> Result<(), ServerError> {
        loop {
            self.dispatch_batch();
            self.flush_all();
            self.publish();
            if *self.o.shutdown.borrow() {
                return Ok(());
            }
            // Frames are taken only while the commit log has room for the largest one, and while
            // no writer is full: beyond that the readers wait, then the sockets fill
            // (back-pressure on the source).
            let take = self.o.node.engines().has_room_for_any_frame() && self.blocked.is_none();
            let wait = self
                .o
                .node
                .engines()
                .poll_timeout()
                .map(|ns| Duration::from_nanos(ns.saturating_sub(self.now_ns())));
            let blocked = self
                .blocked
                .and_then(|conn| self.conns.get(&conn))
                .map(|c| c.writer.clone());
            let Run {
                o,
                io_pending,
                inputs,
                tasks,
                ..
            } = self;
            let event = tokio::select! {
                biased;
                _ = o.shutdown.changed() => Event::Shutdown,
                done = async { io_pending.as_mut().expect("guarded").await },
                    if io_pending.is_some() => Event::IoDone(done),
                () = async { blocked.as_ref().expect("guarded").reserve().await.map_or((), drop) },
                    if blocked.is_some() => Event::Writable,
                input = inputs.recv(), if take => match input {
                    Some(input) => Event::Input(input),
                    None => Event::Shutdown,
                },
                cmd = o.cmds.recv() => match cmd {
                    Some(cmd) => Event::Cmd(cmd),
                    // The handle is gone: nobody can ask for a shutdown any more.
                    None => Event::Shutdown,
                },
                accepted = o.listener.accept() => Event::Accepted(accepted),
                () = async { tokio::time::sleep(wait.expect("guarded")).await }, if wait.is_some() => {
                    Event::Timer
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => Event::TaskEnded,
            };
            match event {
                Event::Shutdown => return Ok(()),
                Event::IoDone(done) => {
                    self.io_pending = None;
                    self.batch_done(done)?;
                }
                Event::Writable => self.blocked = None,
                Event::Input(input) => self.take_inputs(input),
                Event::Cmd(cmd) => self.handle_cmd(cmd),
                Event::Accepted(accepted) => self.accept(accepted),
                Event::Timer => {
                    let now = self.now_ns();
                    self.o.node.engines_mut().handle_timeout(now);
                }
                Event::TaskEnded => {}
            }
        }
    }

    /// Takes `first` and whatever else is waiting (while there is room), so that one round of the
    /// loop handles a burst of frames.
    fn take_inputs(&mut self, first: Input) {
        self.handle_input(first);
        for _ in 1..INPUTS_PER_ROUND {
            if !self.o.node.engines().has_room_for_any_frame() {
                break;
            }
            match self.inputs.try_recv() {
                Ok(input) => self.handle_input(input),
                Err(_) => break,
            }
        }
    }

    fn handle_input(&mut self, input: Input) {
        let now = self.now_ns();
        let (conn, result) = match input {
            Input::Frame(conn, Ok(frame)) => (
                conn,
                self.o.node.engines_mut().handle_frame(conn, frame, now),
            ),
            Input::Frame(conn, Err(e)) => {
                if e.nak_seq().is_some() {
                    debug!(%conn, "corrupted payload: {e}");
                }
                (
                    conn,
                    self.o.node.engines_mut().handle_wire_error(conn, &e, now),
                )
            }
            Input::Ended(conn, end) => {
                self.log_end(conn, &end);
                self.close(conn, false);
                return;
            }
        };
        if let Some(seq) = self.o.node.engines_mut().take_rebased() {
            warn!(
                %conn,
                "the source copies this volume in full (it holds none of the source's data): \
                 the sequence continues after seq {seq}; not consistent until the copy ends"
            );
        }
        if let Err(e) = result {
            if let Some(c) = self.conns.get(&conn) {
                match e {
                    TargetError::Refused(reason) => {
                        info!(peer = %c.peer, %conn, "refused: {reason}");
                    }
                    other => warn!(peer = %c.peer, %conn, "closing: {other}"),
                }
            }
            self.close(conn, true);
        }
    }

    fn log_end(&self, conn: ConnId, end: &ReadEnd) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        match end {
            ReadEnd::Wire(_) => warn!(peer = %c.peer, %conn, "closing: {end}"),
            _ => info!(peer = %c.peer, %conn, "closing: {end}"),
        }
    }

    fn accept(&mut self, accepted: std::io::Result<(TcpStream, SocketAddr)>) {
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: the next accept may work; the listener
                // reports again at once, so this is logged at debug level after the first.
                warn!("accept failed: {e}");
                return;
            }
        };
        if self.conns.len() >= CONNECTIONS_MAX {
            warn!(%peer, "closing a connection at once: {CONNECTIONS_MAX} are open");
            return;
        }
        let mut nonce = [0u8; MAC_BYTES];
        if let Err(e) = getrandom::fill(&mut nonce) {
            error!(%peer, "no OS randomness for a nonce: {e}");
            return;
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        let (writer, batches) = mpsc::channel(WRITER_BATCHES_MAX);
        let (stop_reader, stop) = oneshot::channel();
        let writer_task = self.tasks.spawn(conn::write_loop(conn, wr, batches));
        self.tasks
            .spawn(conn::read_loop(conn, rd, self.inputs_tx.clone(), stop));
        self.conns.insert(
            conn,
            ConnIo {
                peer,
                writer,
                writer_task,
                stop_reader: Some(stop_reader),
            },
        );
        debug!(%peer, %conn, "connection accepted");
        let now = self.now_ns();
        if let Err(e) = self.o.node.engines_mut().on_connect(conn, nonce, now) {
            info!(%peer, %conn, "refusing: {e}");
            self.close(conn, true);
        }
    }

    /// Sends what the engine still has for `conn`, then closes it: the writer sends a FIN, the
    /// reader stops (after draining briefly what the peer sent, if `drain`: a refused peer then
    /// reads its REFUSE before any reset).
    fn close(&mut self, conn: ConnId, drain: bool) {
        self.flush(conn);
        self.o.node.engines_mut().on_disconnect(conn);
        if self.blocked == Some(conn) {
            self.blocked = None;
        }
        if let Some(mut c) = self.conns.remove(&conn) {
            if let Some(stop) = c.stop_reader.take() {
                let _ = stop.send(drain);
            }
        }
    }

    /// Moves the engine's frames for `conn` to its writer, as long as the writer has room.
    fn flush(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        loop {
            let permit = match c.writer.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(())) => {
                    // The peer reads slowly: the frames wait in the engine (its queues are
                    // bounded) and go out when the writer has room; no new input meanwhile.
                    self.blocked = Some(conn);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(())) => return,
            };
            let mut buf = Vec::new();
            let mut bytes = 0;
            while bytes < WRITER_BATCH_BYTES && buf.len() < WRITER_BATCH_FRAMES {
                let Some(frame) = self.o.node.engines_mut().poll_transmit(conn) else {
                    break;
                };
                let encoded = frame.encode();
                bytes += encoded.wire_len();
                buf.push(encoded);
            }
            if buf.is_empty() {
                return;
            }
            permit.send(buf);
            if self.blocked == Some(conn) {
                self.blocked = None;
            }
        }
    }

    /// Flushes every connection, and closes those the engine is done with.
    fn flush_all(&mut self) {
        while let Some((conn, why)) = self.o.node.engines_mut().poll_close() {
            let dead = matches!(why, CloseReason::Idle | CloseReason::Replaced);
            if let Some(c) = self.conns.get(&conn) {
                info!(peer = %c.peer, %conn, "closing: {why}");
                if dead {
                    // Nobody reads what is queued: the writer could wait for good.
                    c.writer_task.abort();
                }
            }
            self.close(conn, !dead);
        }
        // A scratch list, kept between rounds: this runs once per round of the loop.
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        ids.extend(self.conns.keys().copied());
        for &conn in &ids {
            self.flush(conn);
            if !self.o.node.engines().is_open(conn) {
                self.close(conn, true);
            }
        }
        self.scratch = ids;
    }

    fn publish(&self) {
        let now = self.o.node.engines().status();
        self.o.status.send_if_modified(|s| {
            let changed = *s != now;
            if changed {
                *s = now;
            }
            changed
        });
    }

    fn handle_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Lock(range, reply) => {
                let _ = reply.send(self.o.node.engines_mut().try_lock_local(range));
            }
            Cmd::Unlock(id) => {
                self.o.node.engines_mut().unlock_local(id);
            }
        }
    }

    /// Closes every connection and waits (up to `grace`) for the writers to send what they hold.
    async fn close_all(&mut self, grace: Duration) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in ids {
            self.close(conn, false);
        }
        self.publish();
        let tasks = &mut self.tasks;
        if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tasks.abort_all();
        }
    }
}
