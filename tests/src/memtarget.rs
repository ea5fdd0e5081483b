//! An in-process target over TCP: [`mirror_core::target::Target`] applying frames to a volume in
//! memory (durable as soon as written). It tests the replicator without the `target-server`
//! binary, and keeps the replicator's tests independent of it.
//!
//! One connection is served at a time; a new one replaces the previous (as after a cut).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use mirror_core::commit::{CommitConfig, GroupCommit};
use mirror_core::storage;
use mirror_core::target::{
    ConflictPolicy, ConnId, Restored, Target, TargetConfig, TargetStatus, HANDSHAKES_MAX_DEFAULT,
    HANDSHAKE_TIMEOUT_NS_DEFAULT,
};
use mirror_core::wire::{self, Frame, WireError, HEADER_BYTES, MAC_BYTES};
use mirror_core::{Generation, NodeId, Seq, VolumeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const EVENTS_MAX: usize = 256;

#[derive(Debug)]
struct State {
    target: Target,
    commit: GroupCommit,
    volume: Vec<u8>,
}

/// A running in-memory target. Dropping it stops it.
#[derive(Debug)]
pub struct MemTarget {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

/// A target configuration with test-sized bounds.
#[must_use]
pub fn target_config(
    volume_id: VolumeId,
    volume_bytes: u64,
    block_bytes: u32,
    secret: &[u8],
) -> TargetConfig {
    TargetConfig {
        volume_id,
        node_id: NodeId(2),
        generation: Generation(1),
        volume_bytes,
        block_bytes,
        secret: secret.to_vec(),
        conflict_policy: ConflictPolicy::Wait,
        commit_log_bytes_max: 64 << 20,
        commit_log_entries_max: 16384,
        local_locks_max: 64,
        handshake_timeout_ns: HANDSHAKE_TIMEOUT_NS_DEFAULT,
        handshakes_max: HANDSHAKES_MAX_DEFAULT,
    }
}

enum Event {
    Frame(u64, Frame),
    /// A frame that failed to decode; `framed` tells whether the stream can go on.
    Wire(u64, WireError, bool),
    Closed(u64),
}

impl MemTarget {
    /// Listens on 127.0.0.1 (a free port) and serves `cfg` with a zeroed volume; `seed` drives
    /// the handshake nonces.
    pub async fn start(cfg: TargetConfig, seed: u64) -> std::io::Result<MemTarget> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let volume_len = usize::try_from(cfg.volume_bytes)
            .map_err(|_| std::io::Error::other("volume too large for memory"))?;
        let state = Arc::new(Mutex::new(State {
            target: Target::new(
                cfg,
                Restored {
                    durable: Seq::NONE,
                    clean: true,
                },
            ),
            commit: GroupCommit::new(CommitConfig::default()),
            volume: vec![0; volume_len],
        }));
        let task = tokio::spawn(serve(listener, state.clone(), seed));
        Ok(MemTarget { addr, state, task })
    }

    /// Where sources connect.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of the volume.
    #[must_use]
    pub fn volume(&self) -> Vec<u8> {
        self.state
            .lock()
            .map(|s| s.volume.clone())
            .unwrap_or_default()
    }

    /// The engine's state.
    #[must_use]
    pub fn status(&self) -> Option<TargetStatus> {
        self.state.lock().ok().map(|s| s.target.status())
    }
}

impl Drop for MemTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (events_tx, mut events_rx) = mpsc::channel(EVENTS_MAX);
    let mut current: Option<(u64, tokio::net::tcp::OwnedWriteHalf, JoinHandle<()>)> = None;
    let mut next_id = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if let Some((old, _, reader)) = current.take() {
                    reader.abort();
                    if let Ok(mut s) = state.lock() {
                        s.target.on_disconnect(ConnId(old));
                    }
                }
                let _ = stream.set_nodelay(true);
                next_id += 1;
                let (rd, wr) = stream.into_split();
                let reader = tokio::spawn(read_frames(next_id, rd, events_tx.clone()));
                current = Some((next_id, wr, reader));
                let mut nonce = [0u8; MAC_BYTES];
                rng.fill(&mut nonce);
                if let Ok(mut s) = state.lock() {
                    // The only connection: a refusal is impossible.
                    let _ = s.target.on_connect(ConnId(next_id), nonce, 0);
                }
            }
            Some(event) = events_rx.recv() => {
                let Some((id, _, _)) = &current else { continue };
                let id = *id;
                let keep = match event {
                    Event::Frame(eid, frame) if eid == id => handle(&state, |t| t.handle_frame(ConnId(id), frame).is_ok()),
                    Event::Wire(eid, err, framed) if eid == id => {
                        handle(&state, |t| t.handle_wire_error(ConnId(id), &err).is_ok()) && framed
                    }
                    Event::Closed(eid) if eid == id => false,
                    _ => continue,
                };
                let out = drain(&state, ConnId(id));
                let mut write_ok = true;
                if let Some((_, wr, _)) = &mut current {
                    for frame in out {
                        let encoded = frame.encode();
                        if wr.write_all(&encoded.to_vec()).await.is_err() {
                            write_ok = false;
                            break;
                        }
                    }
                }
                if !keep || !write_ok {
                    if let Some((_, _, reader)) = current.take() {
                        reader.abort();
                    }
                    if let Ok(mut s) = state.lock() {
                        s.target.on_disconnect(ConnId(id));
                    }
                }
            }
        }
    }
}

fn handle(state: &Mutex<State>, f: impl FnOnce(&mut Target) -> bool) -> bool {
    match state.lock() {
        Ok(mut s) => f(&mut s.target),
        Err(_) => false,
    }
}

/// Applies what is ready (durable at once: the volume is memory) and returns frames to send.
fn drain(state: &Mutex<State>, conn: ConnId) -> Vec<Frame> {
    let Ok(mut guard) = state.lock() else {
        return Vec::new();
    };
    let s = &mut *guard;
    // The planner the target server runs; memory is durable at once, so every batch completes
    // on the spot.
    while let Some(batch) = s.commit.poll_batch(&mut s.target) {
        for apply in &batch.ops {
            storage::apply_to_image(&mut s.volume, &apply.op);
        }
        s.commit.handle_done(&mut s.target, &batch);
    }
    let mut out = Vec::new();
    while let Some(frame) = s.target.poll_transmit(conn) {
        out.push(frame);
    }
    out
}

async fn read_frames(id: u64, rd: OwnedReadHalf, events: mpsc::Sender<Event>) {
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    loop {
        let mut header = [0u8; HEADER_BYTES];
        if rd.read_exact(&mut header).await.is_err() {
            let _ = events.send(Event::Closed(id)).await;
            return;
        }
        let h = match wire::decode_header(&header) {
            Ok(h) => h,
            Err(e) => {
                let _ = events.send(Event::Wire(id, e, false)).await;
                return;
            }
        };
        let mut payload = BytesMut::zeroed(h.payload_len as usize);
        if rd.read_exact(&mut payload).await.is_err() {
            let _ = events.send(Event::Closed(id)).await;
            return;
        }
        let event = match wire::decode_body(&h, payload.freeze()) {
            Ok(frame) => Event::Frame(id, frame),
            Err(e) => Event::Wire(id, e, true),
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}
