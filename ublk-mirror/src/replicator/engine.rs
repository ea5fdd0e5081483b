//! The engine task: owns the volume's primary [`Node`], drives its one [`PeerLink`] over TCP and
//! forwards the link's events to the callers.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::os::unix::fs::FileExt;

use bytes::Bytes;
use mirror_core::meta::MetaRecord;
use mirror_core::node::{
    CloseConn, DrainError, Node, PeerEvent, PeerId, PeerLink, Peers, ResyncStep, SubmitError,
    Submitted, WaitError,
};
use mirror_core::session::SessionAction;
use mirror_core::source::SourceError;
use mirror_core::storage::{IntentStore, MetaStore};
use mirror_core::wire::{Encoded, Frame, Op, SummedOp, MAC_BYTES};
use mirror_core::Seq;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::device::gate::RangeGate;

use super::conn::{read_frames, reserve, write_frames, Conn, Event, WRITER_QUEUE_FRAMES};
use super::intent::IntentView;
use super::{
    ConnInfo, Ctl, ReplError, ReplicatorConfig, ReplicatorStatus, Reply, SubmitReq,
    REPLICATED_WAITERS_MAX,
};

/// Events (decoded frames, failures) queued from the connection tasks to the engine.
const EVENT_QUEUE: usize = 256;
/// The link's token for the one parked submission (there is never more than one).
const PARKED: u64 = 0;
/// "Never" for the engine's timer: ten years after its start.
const FAR_SECS: u64 = 10 * 365 * 86_400;
/// Submissions taken from the channel before one store of the write intent.
const SUBMIT_BATCH_MAX: usize = 64;
/// A writer waiting until the stored write intent holds its chunks.
type Covered = tokio::sync::oneshot::Sender<Result<(), ReplError>>;
/// The one peer a primary mirrors to today.
pub(super) const PEER: PeerId = PeerId(0);

/// The write intent the engine stores, and the local volume its resync reads.
/// Reads a resync copy's bytes from the local volume, then drops them from the page cache: read
/// once to be shipped, they would only stay there as folios that later small host writes into
/// the range pay for (measured: a 64 MiB initial sync cost the loadgen's following 4 KiB async
/// writes about a quarter of their rate until the cache was dropped).
/// A failed read stops replication (the copy cannot be made).
fn read_copy_bytes(
    volume: &std::fs::File,
    range: mirror_core::Range,
) -> Result<Vec<u8>, SourceError> {
    use std::os::fd::AsRawFd;
    let mut data = vec![0u8; usize::try_from(range.len_bytes).unwrap_or(0)];
    volume
        .read_exact_at(&mut data, range.offset_bytes)
        .map_err(|e| {
            SourceError::Local(format!(
                "resync read of {}+{}: {e}",
                range.offset_bytes, range.len_bytes
            ))
        })?;
    // The kernel drops only whole folios, and readahead makes them large: the advice covers the
    // aligned span around the copy (clean pages only; dirty ones are just written back). Advice
    // only: a failure changes nothing but the cache.
    const SPAN_BYTES: u64 = 2 << 20;
    let start = range.offset_bytes / SPAN_BYTES * SPAN_BYTES;
    let end = range.end_bytes().div_ceil(SPAN_BYTES) * SPAN_BYTES;
    let _ = nix::fcntl::posix_fadvise(
        volume.as_raw_fd(),
        i64::try_from(start).unwrap_or(i64::MAX),
        i64::try_from(end - start).unwrap_or(0),
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    Ok(data)
}

pub(super) struct KeptIntent {
    pub(super) store: Box<dyn IntentStore>,
    pub(super) volume: Arc<std::fs::File>,
    pub(super) record: Box<dyn MetaStore + Send>,
    pub(super) view: Arc<IntentView>,
}

pub(super) struct Engine {
    cfg: ReplicatorConfig,
    /// The host writes' range order, which an overflow copy's read joins.
    gate: Arc<RangeGate>,
    intent: Option<KeptIntent>,
    node: Node<Peers>,
    epoch: Instant,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    conn_tx: watch::Sender<ConnInfo>,
    conn: Option<Conn>,
    next_conn_id: u64,
    /// Id of the connection attempt under way.
    connecting: Option<u64>,
    /// Operations in the log and not yet complete, by sequence number (bounded by the log).
    waiting: HashMap<Seq, Reply<Seq>>,
    /// The caller of the submission the link parked.
    parked: Option<Reply<Seq>>,
    replicated_waiters: BTreeMap<Seq, Vec<Reply<()>>>,
    replicated_waiter_count: usize,
    /// The caller of the drain under way, and when it gives up.
    drainer: Option<Reply<MetaRecord>>,
    drain_deadline_ns: u64,
    /// The link reported the drain done through this seq; the loop checks that nothing the host
    /// completed is still queued before it tells the caller.
    drained: Option<Seq>,
    /// Shared with the handles: see [`super::Handle::acks_on_enqueue`].
    fast_ack: Arc<AtomicBool>,
    /// The next frame for the writer, taken from the link but not yet queued.
    staged: Option<Encoded>,
    last_error: Option<String>,
    sent_frames: u64,
    sent_bytes: u64,
    /// The start went on without its peer after this many seconds.
    degraded: Option<u64>,
}

impl Engine {
    pub(super) fn new(
        cfg: ReplicatorConfig,
        gate: Arc<RangeGate>,
        node: Node<Peers>,
        fast_ack: Arc<AtomicBool>,
        conn_tx: watch::Sender<ConnInfo>,
        intent: Option<KeptIntent>,
    ) -> Engine {
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        Engine {
            cfg,
            gate,
            intent,
            node,
            epoch: Instant::now(),
            events_tx,
            events_rx,
            conn_tx,
            conn: None,
            next_conn_id: 0,
            connecting: None,
            waiting: HashMap::new(),
            parked: None,
            replicated_waiters: BTreeMap::new(),
            replicated_waiter_count: 0,
            drainer: None,
            drain_deadline_ns: 0,
            drained: None,
            fast_ack,
            staged: None,
            last_error: None,
            sent_frames: 0,
            sent_bytes: 0,
            degraded: None,
        }
    }

    pub(super) async fn run(
        mut self,
        mut submit_rx: mpsc::Receiver<SubmitReq>,
        mut ctl_rx: mpsc::Receiver<Ctl>,
    ) {
        // One timer entry for the task's life, moved only when the link's next timeout moves (a
        // new sleep per loop registered and dropped a timer entry for every frame and submission).
        let sleep = tokio::time::sleep_until(self.next_wake());
        tokio::pin!(sleep);
        loop {
            self.pump();
            if let Some(seq) = self.drained.take() {
                self.finish_drain(seq, submit_rx.is_empty());
            }
            let writer = match (&self.conn, &self.staged) {
                (Some(c), Some(_)) => Some(c.writer_tx.clone()),
                _ => None,
            };
            // A resync enters the log before any host operation.
            let take_submit = !self.link().is_parked() && self.link().takes_host_ops();
            let wake = self.next_wake();
            if sleep.deadline() != wake {
                sleep.as_mut().reset(wake);
            }
            tokio::select! {
                biased;
                Some(ev) = self.events_rx.recv() => self.on_event(ev),
                ctl = ctl_rx.recv() => match ctl {
                    Some(Ctl::Shutdown(done)) => {
                        self.stop(&ReplError::Shutdown);
                        let _ = done.send(());
                        return;
                    }
                    Some(ctl) => self.on_ctl(ctl),
                    None => break,
                },
                permit = reserve(writer), if self.staged.is_some() => {
                    if let (Some(permit), Some(frame)) = (permit, self.staged.take()) {
                        permit.send(frame);
                    }
                }
                req = submit_rx.recv(), if take_submit => match req {
                    Some(req) => self.on_submits(req, &mut submit_rx),
                    None => break,
                },
                () = &mut sleep => self.on_timer(),
            }
        }
        self.stop(&ReplError::Shutdown);
    }

    fn link(&self) -> &PeerLink {
        self.node
            .peer(PEER)
            .expect("a primary node keeps the peer it was built with")
    }

    fn link_mut(&mut self) -> &mut PeerLink {
        self.node
            .peer_mut(PEER)
            .expect("a primary node keeps the peer it was built with")
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Carries out the resync steps the link hands out: a copy reads the local volume now,
    /// unless host writes go on meanwhile (an overflow's resync): then a task reads it once no
    /// host write to its range is in flight, and [`Event::Copied`] brings it back.
    fn pump_resync(&mut self) {
        loop {
            let now = self.now_ns();
            let Some(step) = self.link_mut().poll_resync(now) else {
                return;
            };
            if let (ResyncStep::Copy(range), true) = (step, self.link().step_interleaved()) {
                self.read_copy(range);
                return;
            }
            let op = match step {
                ResyncStep::Mark(mark) => Op::Resync(mark),
                ResyncStep::Copy(range) => {
                    let Some(kept) = &self.intent else { return };
                    match read_copy_bytes(&kept.volume, range) {
                        Ok(data) => ResyncStep::copy_op(range, Bytes::from(data)),
                        Err(e) => {
                            self.link_mut().stop(e);
                            return;
                        }
                    }
                }
            };
            let now = self.now_ns();
            if let Err(e) = self.link_mut().resync_submit(SummedOp::new(op), now) {
                tracing::error!(error = %e, "resync step refused");
                return;
            }
            let _ = self.store_intent();
        }
    }

    /// Reads an overflow copy of `range` under the range gate, off the engine's task.
    fn read_copy(&self, range: mirror_core::Range) {
        let Some(kept) = &self.intent else { return };
        let volume = Arc::clone(&kept.volume);
        let gate = Arc::clone(&self.gate);
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let end = range.offset_bytes.saturating_add(range.len_bytes);
            let guard = gate.acquire(range.offset_bytes..end).await;
            let data = read_copy_bytes(&volume, range);
            let _ = events.send(Event::Copied { range, data, guard }).await;
        });
    }

    /// An overflow copy's bytes are back: it enters the log, then host writes to its range go on.
    fn on_copied(&mut self, range: mirror_core::Range, data: Result<Vec<u8>, SourceError>) {
        if self.link().fatal().is_some() {
            return;
        }
        let data = match data {
            Ok(data) => data,
            Err(e) => {
                self.link_mut().stop(e);
                return;
            }
        };
        let op = ResyncStep::copy_op(range, Bytes::from(data));
        let now = self.now_ns();
        match self.link_mut().resync_submit(SummedOp::new(op), now) {
            Ok(_) => {
                let _ = self.store_intent();
            }
            Err(SubmitError::Withdrawn) => tracing::debug!("overflow copy withdrawn"),
            Err(e) => tracing::error!(error = %e, "resync step refused"),
        }
    }

    /// Stores the primary's running record (not clean) with the peer holding everything through
    /// `durable`; a failure stops replication (a crash would be checked against a stale seq).
    fn store_record(&mut self, durable: Seq) {
        let record = self.node.record(durable, false);
        let Some(kept) = &self.intent else { return };
        if let Err(e) = kept.record.store(&record) {
            let e = SourceError::Local(format!("storing the primary's record: {e}"));
            self.link_mut().stop(e);
        }
    }

    /// Stores the write intent if the link asks for it (before a write it now holds may reach
    /// the local volume); a failure stops replication.
    fn store_intent(&mut self) -> Result<(), ReplError> {
        let Some(kept) = &mut self.intent else {
            return Ok(());
        };
        let link = self
            .node
            .peer_mut(PEER)
            .expect("a primary node keeps the peer it was built with");
        let Some(map) = link.take_intent_store() else {
            return Ok(());
        };
        let mut map = map.clone();
        kept.view.before_store(&mut map);
        match kept.store.store(&map) {
            Ok(()) => {
                kept.view.after_store(&map);
                Ok(())
            }
            Err(e) => {
                let e = SourceError::Local(e.to_string());
                link.stop(e.clone());
                Err(ReplError::Fatal(e))
            }
        }
    }

    /// Forwards the link's events and stages the next frame.
    fn pump(&mut self) {
        self.pump_resync();
        while let Some(ev) = self.link_mut().poll_event() {
            match ev {
                PeerEvent::Accepted { seq, .. } => {
                    if let Some(reply) = self.parked.take() {
                        self.waiting.insert(seq, reply);
                    }
                }
                PeerEvent::Completed(seq) => {
                    if let Some(reply) = self.waiting.remove(&seq) {
                        let _ = reply.send(Ok(seq));
                    }
                }
                PeerEvent::Durable(seq) => self.wake_replicated(seq),
                PeerEvent::Connected => {
                    tracing::info!(peer = %self.cfg.peer, "connected to target");
                    self.publish();
                }
                PeerEvent::Degraded { secs } => {
                    tracing::warn!(
                        peer = %self.cfg.peer,
                        "no handshake within {secs} s: serving the host without the peer (writes \
                         are logged and shipped once it answers)"
                    );
                    self.degraded = Some(secs);
                    self.publish();
                }
                PeerEvent::RecordRunning { durable, rebased } => {
                    if let Some(all) = rebased {
                        tracing::warn!(
                            peer = %self.cfg.peer,
                            "the target holds none of this volume's data: copying all of it, \
                             the sequence continues after the target's seq {durable}"
                        );
                        self.rebase_replicated_waiters(all);
                    }
                    self.store_record(durable);
                }
                PeerEvent::Stopped(e) => {
                    tracing::warn!(reason = %e.describe(), "replication stopped");
                    self.last_error = Some(e.describe());
                    self.stop(&ReplError::Fatal(e));
                    self.publish();
                }
                PeerEvent::Drained(Ok(seq)) => self.drained = Some(seq),
                PeerEvent::Drained(Err(e)) => {
                    let err = match e {
                        DrainError::Stopped(e) => ReplError::Fatal(e),
                        e @ DrainError::TimedOut { .. } => ReplError::NotDrained(e),
                    };
                    if let Some(reply) = self.drainer.take() {
                        let _ = reply.send(Err(err));
                    }
                }
            }
        }
        if self.staged.is_none() && self.conn.is_some() {
            let now = self.now_ns();
            self.staged = self
                .link_mut()
                .poll_transmit(now)
                .map(|frame| frame.encode());
            if let Some(e) = &self.staged {
                self.sent_frames += 1;
                self.sent_bytes += e.wire_len() as u64;
            }
        }
    }

    /// The link holds nothing the peer lacks. Unless host operations completed before the stop
    /// still wait in the submission channel (in `async` a write is complete once queued), the
    /// drain is over and its caller gets the record of the clean stop; else the link drains
    /// again, with what is left of the limit, once they are in.
    fn finish_drain(&mut self, seq: Seq, queue_empty: bool) {
        if self.drainer.is_none() {
            return;
        }
        if queue_empty {
            let record = self.node.record(seq, true);
            if let Some(reply) = self.drainer.take() {
                let _ = reply.send(Ok(record));
            }
        } else {
            let now = self.now_ns();
            let left = self.drain_deadline_ns.saturating_sub(now);
            self.link_mut().begin_drain(now, left);
        }
    }

    /// The sequence starts over (a full resync): every wait for a seq of the old numbering
    /// waits for `seq` (the link's [`PeerEvent::RecordRunning`] says which).
    fn rebase_replicated_waiters(&mut self, seq: Seq) {
        let all: Vec<_> = std::mem::take(&mut self.replicated_waiters)
            .into_values()
            .flatten()
            .collect();
        if !all.is_empty() {
            self.replicated_waiters.insert(seq, all);
        }
    }

    fn wake_replicated(&mut self, durable: Seq) {
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
    }

    fn next_wake(&self) -> Instant {
        // Fixed, so that "no timeout" does not move the timer on every loop.
        let far = self.epoch + Duration::from_secs(FAR_SECS);
        match self.link().poll_timeout() {
            Some(ns) => (self.epoch + Duration::from_nanos(ns)).min(far),
            None => far,
        }
    }

    fn on_timer(&mut self) {
        let now = self.now_ns();
        match self.link_mut().handle_timeout(now) {
            Some(SessionAction::Connect) => self.start_connect(),
            Some(SessionAction::Drop(reason)) => self.lose_conn(reason.to_string()),
            Some(SessionAction::Ping(token)) => {
                // If the writer's queue is full, data is flowing anyway and the probe is skipped.
                if let Some(c) = &self.conn {
                    let _ = c.writer_tx.try_send(Frame::Ping { token }.encode());
                }
            }
            None => {}
        }
    }

    fn start_connect(&mut self) {
        if self.conn.is_some() || self.connecting.is_some() {
            return;
        }
        self.next_conn_id += 1;
        let id = self.next_conn_id;
        self.connecting = Some(id);
        self.link_mut().on_connecting();
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

    fn publish(&self) {
        let st = self.link().status();
        let info = ConnInfo {
            connects: st.connects,
            degraded: self.degraded,
            fatal: st.fatal,
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
                if self.link().fatal().is_some() {
                    // Replication stopped while the attempt was under way (the connect deadline):
                    // the late connection is dropped unused.
                    return;
                }
                match result {
                    Ok(stream) => {
                        let mut nonce = [0u8; MAC_BYTES];
                        match getrandom::fill(&mut nonce) {
                            Ok(()) => self.open_conn(id, stream, nonce),
                            Err(e) => {
                                tracing::error!(error = %e, "no randomness for the handshake nonce");
                                self.link_mut().stop(SourceError::NoRandomness);
                            }
                        }
                    }
                    Err(reason) => {
                        tracing::info!(%reason, "connection attempt failed");
                        self.last_error = Some(reason);
                        let now = self.now_ns();
                        self.link_mut().on_lost(now);
                        self.publish();
                    }
                }
            }
            Event::Frame(id, frame) => {
                if self.conn.as_ref().is_none_or(|c| c.id != id) {
                    return;
                }
                let now = self.now_ns();
                if let Err(CloseConn { error, fatal }) = self.link_mut().handle_frame(frame, now) {
                    // A fatal error is reported by the Stopped event the link queued.
                    self.close_socket();
                    if !fatal {
                        tracing::warn!(reason = %error, "connection to the target dropped");
                        self.last_error = Some(format!("engine error: {error}"));
                        self.publish();
                    }
                }
            }
            Event::Failed(id, reason) => {
                if self.conn.as_ref().is_some_and(|c| c.id == id) {
                    self.lose_conn(reason);
                }
            }
            Event::Copied { range, data, guard } => {
                self.on_copied(range, data);
                drop(guard);
            }
        }
    }

    fn open_conn(&mut self, id: u64, stream: TcpStream, nonce: [u8; MAC_BYTES]) {
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
        self.staged = None;
        let now = self.now_ns();
        self.link_mut().on_connected(nonce, now);
        tracing::debug!(peer = %self.cfg.peer, "handshaking");
        self.publish();
    }

    fn close_socket(&mut self) {
        if let Some(c) = self.conn.take() {
            c.reader.abort();
            c.writer.abort();
        }
        self.staged = None;
    }

    /// The connection failed under us (socket error, silence): the link schedules the reconnect.
    fn lose_conn(&mut self, reason: String) {
        tracing::warn!(%reason, "connection to the target dropped");
        self.close_socket();
        let now = self.now_ns();
        self.link_mut().on_lost(now);
        self.last_error = Some(reason);
        self.publish();
    }

    /// Every caller still waiting gets `err`; no submission is taken after a fatal error.
    fn stop(&mut self, err: &ReplError) {
        self.fast_ack.store(false, Ordering::Release);
        self.close_socket();
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        for (_, replies) in std::mem::take(&mut self.replicated_waiters) {
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
        self.replicated_waiter_count = 0;
        if let Some(reply) = self.parked.take() {
            let _ = reply.send(Err(err.clone()));
        }
        if let Some(reply) = self.drainer.take() {
            let _ = reply.send(Err(err.clone()));
        }
    }

    /// Takes `first` and whatever else is queued (up to [`SUBMIT_BATCH_MAX`], while the link
    /// takes host operations), then stores the write intent once for all of them and tells the
    /// writers waiting for it.
    fn on_submits(&mut self, first: SubmitReq, rx: &mut mpsc::Receiver<SubmitReq>) {
        let mut waiting_for_store = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(req) = next.take() {
            waiting_for_store.extend(self.on_submit(req));
            taken += 1;
            if taken >= SUBMIT_BATCH_MAX || self.link().is_parked() || !self.link().takes_host_ops()
            {
                break;
            }
            next = rx.try_recv().ok();
        }
        let stored = self.store_intent();
        for (covered, taken) in waiting_for_store {
            let _ = covered.send(taken.and_then(|()| stored.clone()));
        }
    }

    /// Takes one submission; returns its writer's wait for the intent's store, if it waits, and
    /// whether the link took it.
    fn on_submit(&mut self, mut req: SubmitReq) -> Option<(Covered, Result<(), ReplError>)> {
        // Out of the channel: its bytes no longer count against the channel's bound.
        drop(req.permit.take());
        let now = self.now_ns();
        let range = req.op.op().range();
        let taken = match self.link_mut().submit(PARKED, req.op, now) {
            Ok(Submitted::Accepted(seq)) => {
                self.waiting.insert(seq, req.reply);
                Ok(())
            }
            Ok(Submitted::Parked) => {
                self.parked = Some(req.reply);
                Ok(())
            }
            Ok(Submitted::OutOfSync) => {
                // Complete once local: no seq stands for it (a resync carries it).
                let _ = req.reply.send(Ok(Seq::NONE));
                Ok(())
            }
            Err(e) => {
                let e = ReplError::from(e);
                let _ = req.reply.send(Err(e.clone()));
                Err(e)
            }
        };
        // The write is in the link's intent now: every later store holds its chunks. One the
        // link refused must not reach the local volume either.
        if let Some(kept) = &self.intent {
            kept.view.leave(range);
        }
        req.covered.take().map(|covered| (covered, taken))
    }

    fn on_ctl(&mut self, ctl: Ctl) {
        match ctl {
            Ctl::Status(reply) => {
                let st = self.link().status();
                let _ = reply.send(ReplicatorStatus {
                    role: self.node.role(),
                    source: st.source,
                    last_error: self.last_error.clone(),
                    fatal: st.fatal.map(|e| e.describe()),
                    connects: st.connects,
                    disconnects: st.disconnects,
                    sent_frames: self.sent_frames,
                    sent_bytes: self.sent_bytes,
                    intent: self.intent.as_ref().map(|_| st.intent),
                    resync: st.resync,
                    clock_ns: self.now_ns(),
                    gen_ids: self.node.meta().gen_ids,
                    peer_data: st.peer_data,
                    overflow: st.overflow,
                    overflow_rule: st.overflow_rule,
                    resync_rate_bytes_per_s: self.link().resync_rate(),
                    out_of_sync_writes: st.out_of_sync_writes,
                    resync_throttle: self.cfg.resync_throttle,
                    throttled_writes: st.throttled_writes,
                    everything_so_far: self.link().everything_so_far(),
                });
            }
            Ctl::SetMode(mode, reply) => {
                self.link_mut().set_mode(mode);
                self.fast_ack
                    .store(self.link().acks_on_submit(), Ordering::Release);
                let _ = reply.send(());
            }
            Ctl::WaitReplicated(seq, reply) => match self.link().check_replicated(seq) {
                Ok(true) => {
                    let _ = reply.send(Ok(()));
                }
                Ok(false) if self.replicated_waiter_count >= REPLICATED_WAITERS_MAX => {
                    let _ = reply.send(Err(ReplError::TooManyWaiters));
                }
                Ok(false) => {
                    self.replicated_waiter_count += 1;
                    self.replicated_waiters.entry(seq).or_default().push(reply);
                }
                Err(WaitError::NeverSubmitted(seq)) => {
                    let _ = reply.send(Err(ReplError::NeverSubmitted(seq)));
                }
                Err(WaitError::Stopped(e)) => {
                    let _ = reply.send(Err(ReplError::Fatal(e)));
                }
            },
            Ctl::Drain(limit, reply) => {
                let now = self.now_ns();
                let limit_ns = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
                // One drain at a time: the earlier caller hears it was replaced.
                if let Some(old) = self.drainer.replace(reply) {
                    let _ = old.send(Err(ReplError::DrainReplaced));
                }
                self.drain_deadline_ns = now.saturating_add(limit_ns);
                self.link_mut().begin_drain(now, limit_ns);
            }
            Ctl::Shutdown(done) => {
                // Handled by the loop; kept for exhaustiveness.
                let _ = done.send(());
            }
        }
    }
}
