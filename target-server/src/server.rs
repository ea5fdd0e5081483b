//! The server's tasks: the accept loop (which also runs the engine's handshake timer), one reader
//! and one writer per connection, the applier, and the local lock API. They share the engine behind
//! a mutex that is only held for engine calls, never across I/O. The engine decides which
//! connection is the session; a connection it is done with ([`Target::is_open`]) is closed by its
//! writer.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use mirror_core::commit::{CommitConfig, GroupCommit};
use mirror_core::lock::{LocalLockId, LockError};
use mirror_core::meta::MetaRecord;
use mirror_core::storage::{self, Volume as _};
use mirror_core::target::{
    self, ConflictPolicy, ConnId, RecoverError, RecoveryKind, Restored, Target, TargetConfig,
    TargetError, TargetStatus, VolumeFacts, HANDSHAKES_MAX_DEFAULT,
};
use mirror_core::wire::{self, Kind, HEADER_BYTES, MAC_BYTES};
use mirror_core::{Generation, NodeId, Range, Seq, VolumeId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::meta::{self, default_meta_path, MetaError, MetaFile};
use crate::volume::Volume;

/// Default commit log bound in payload bytes.
pub const COMMIT_LOG_BYTES_DEFAULT: usize = 64 << 20;
/// Default commit log bound in entries.
pub const COMMIT_LOG_ENTRIES_DEFAULT: usize = 16 << 10;
/// Default idle timeout: a connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Default handshake timeout: a connection not authenticated this long after accept is closed.
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration =
    Duration::from_nanos(mirror_core::target::HANDSHAKE_TIMEOUT_NS_DEFAULT);
/// Connections open at once (handshakes, the session, and refused ones still closing); beyond it
/// an accepted connection is closed at once.
const CONNECTIONS_MAX: usize = 4 * HANDSHAKES_MAX_DEFAULT + 4;
/// Largest read a local lock holder may make at once.
pub const READ_BYTES_MAX: usize = 64 << 20;
/// Payload bytes the reader takes in before it lets the applier run (see `read_loop`).
const YIELD_AFTER_BYTES: usize = 1 << 20;
/// Frames handled by the reader before it waits for the writer to catch up (bounds the engine's
/// queue of frames to send when the peer does not read).
const UNSENT_INPUTS_MAX: usize = 1024;
/// Receive buffer of a session.
const READ_BUFFER_BYTES: usize = 256 << 10;
/// Local locks held at once.
const LOCAL_LOCKS_MAX: usize = 64;
/// How long a closing connection may take to send its last frames.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long a graceful shutdown waits for ready operations to be applied.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks one; see [`ServerHandle::local_addr`]).
    pub listen: SocketAddr,
    /// The volume file.
    pub volume_path: PathBuf,
    /// Create the volume (sparse) with this size if it does not exist; an existing file must
    /// have this size.
    pub create_bytes: Option<u64>,
    /// The metadata file.
    pub meta_path: PathBuf,
    /// The mirrored volume's id.
    pub volume_id: VolumeId,
    /// This node.
    pub node_id: NodeId,
    /// Shared secret.
    pub secret: Vec<u8>,
    /// Logical block size (512 or 4096).
    pub block_bytes: u32,
    /// What to do when a mirrored lock meets a local lock holder.
    pub conflict_policy: ConflictPolicy,
    /// Commit log bound in payload bytes.
    pub commit_log_bytes_max: usize,
    /// Commit log bound in entries.
    pub commit_log_entries_max: usize,
    /// Close a connection that sends nothing for this long.
    pub idle_timeout: Duration,
    /// Close a connection that has not authenticated this long after it was accepted.
    pub handshake_timeout: Duration,
    /// How long a local lock holder retries while the mirror holds its region.
    pub local_lock_timeout: Duration,
}

impl ServerConfig {
    /// A configuration with defaults for everything but the volume, its id and the secret.
    #[must_use]
    pub fn new(volume_path: PathBuf, volume_id: VolumeId, secret: Vec<u8>) -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            meta_path: default_meta_path(&volume_path),
            volume_path,
            create_bytes: None,
            volume_id,
            node_id: NodeId(0),
            secret,
            block_bytes: 4096,
            conflict_policy: ConflictPolicy::Wait,
            commit_log_bytes_max: COMMIT_LOG_BYTES_DEFAULT,
            commit_log_entries_max: COMMIT_LOG_ENTRIES_DEFAULT,
            idle_timeout: IDLE_TIMEOUT_DEFAULT,
            handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
            local_lock_timeout: Duration::from_secs(10),
        }
    }
}

/// Why the server could not start, stopped, or refused a local request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The volume file could not be opened or created.
    #[error("volume {path}: {source}")]
    Volume {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The volume's size does not fit the configuration.
    #[error("volume {path}: {why}")]
    VolumeSize {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        why: String,
    },
    /// The metadata file is unreadable or corrupt.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The metadata file belongs to another volume or geometry.
    #[error("metadata file {path} does not match: {why}")]
    MetaMismatch {
        /// The file.
        path: PathBuf,
        /// What differs.
        why: RecoverError,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: io::Error,
    },
    /// Writing or syncing the volume failed: the server stopped without acknowledging it.
    #[error("volume I/O failed: {0}")]
    VolumeIo(String),
    /// A local lock could not be taken within the configured time (the mirror kept the region).
    #[error("region {0}+{1} stayed locked by the mirror")]
    LockTimeout(u64, u64),
    /// A local request for an empty range, a range outside the volume, or one too large.
    #[error("bad range {0}+{1}")]
    BadRange(u64, u64),
    /// The server has stopped.
    #[error("server stopped")]
    Stopped,
    /// A task of the server failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

enum Cmd {
    /// Apply everything ready, sync, then answer.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Shared {
    target: Mutex<Target>,
    volume: Arc<Volume>,
    meta_file: Arc<MetaFile>,
    io: IoThread,
    volume_id: VolumeId,
    node_id: NodeId,
    idle_timeout: Duration,
    local_lock_timeout: Duration,
    /// Something may be ready to apply.
    apply_wake: Notify,
    /// Frames may be waiting to be sent, or a connection may have been closed by the engine:
    /// every writer looks (`notify_waiters`).
    tx_wake: Notify,
    /// The commit log may have room again.
    room_wake: Notify,
    /// The writer has caught up.
    drained_wake: Notify,
    /// Frames the session's reader handled since its writer last caught up.
    unsent_inputs: AtomicUsize,
    /// Connections open now (see [`CONNECTIONS_MAX`]).
    connections: AtomicUsize,
    /// The engine's clock: nanoseconds since this instant.
    epoch_instant: Instant,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    fn target(&self) -> MutexGuard<'_, Target> {
        // The engine is never left half-updated by a panic of ours (it asserts before mutating),
        // so a poisoned lock still holds a usable engine.
        self.target.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch_instant.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Wakes every writer (see `tx_wake`).
    fn wake_writers(&self) {
        self.tx_wake.notify_waiters();
    }

    fn meta(&self, durable: Seq, clean: bool) -> MetaRecord {
        MetaRecord {
            node_id: self.node_id,
            durable,
            clean,
            ..MetaRecord::new(self.volume_id, self.volume.volume_bytes())
        }
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
    applier: Option<JoinHandle<Result<(), ServerError>>>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Flush")
    }
}

/// Opens the volume and its metadata, binds, and starts serving.
///
/// Metadata: a missing file means a fresh start (durable 0, clean); a corrupt one, or one of
/// another volume, is an error. The file is rewritten as "not clean" before serving.
pub async fn start(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
    mirror_core::block_shift(cfg.block_bytes).map_err(|e| ServerError::Config(e.to_string()))?;
    if cfg.commit_log_bytes_max < wire::PAYLOAD_BYTES_MAX as usize {
        return Err(ServerError::Config(format!(
            "commit log of {} bytes cannot hold one {}-byte write",
            cfg.commit_log_bytes_max,
            wire::PAYLOAD_BYTES_MAX
        )));
    }
    if cfg.commit_log_entries_max == 0
        || cfg.idle_timeout.is_zero()
        || cfg.handshake_timeout.is_zero()
    {
        return Err(ServerError::Config(
            "commit log entries, idle timeout and handshake timeout must be positive".into(),
        ));
    }
    let (volume, created) = open_volume(&cfg)?;
    let restored = restore(&cfg, &volume, created)?;
    info!(
        volume = %cfg.volume_path.display(),
        volume_bytes = volume.volume_bytes(),
        durable = %restored.durable,
        clean = restored.clean,
        "volume opened"
    );
    // Until a graceful shutdown says otherwise, the volume may hold writes past `durable`.
    let meta_file = MetaFile::create(
        &cfg.meta_path,
        &MetaRecord {
            node_id: cfg.node_id,
            durable: restored.durable,
            clean: false,
            ..MetaRecord::new(cfg.volume_id, volume.volume_bytes())
        },
    )?;
    let target = Target::new(target_config(&cfg, volume.volume_bytes()), restored);
    let (shutdown, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        target: Mutex::new(target),
        volume: Arc::new(volume),
        meta_file: Arc::new(meta_file),
        io: IoThread::spawn()
            .map_err(|e| ServerError::Internal(format!("cannot start the I/O thread: {e}")))?,
        volume_id: cfg.volume_id,
        node_id: cfg.node_id,
        idle_timeout: cfg.idle_timeout,
        local_lock_timeout: cfg.local_lock_timeout,
        apply_wake: Notify::new(),
        tx_wake: Notify::new(),
        room_wake: Notify::new(),
        drained_wake: Notify::new(),
        unsent_inputs: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
        epoch_instant: Instant::now(),
        shutdown,
    });
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let (cmds, cmd_rx) = mpsc::channel(4);
    let applier = tokio::spawn({
        let shared = Arc::clone(&shared);
        async move {
            // A panic in the applier (an engine assertion) must stop the server, not stall it.
            let inner = tokio::spawn(applier(Arc::clone(&shared), cmd_rx));
            match inner.await {
                Ok(result) => result,
                Err(e) => {
                    error!("applier failed: {e}");
                    shared.shutdown.send_replace(true);
                    Err(ServerError::Internal(format!("applier failed: {e}")))
                }
            }
        }
    });
    // The accept loop holds the only command sender: when it ends, the applier finishes.
    let accept = tokio::spawn(accept_loop(Arc::clone(&shared), listener, cmds));
    info!(%local_addr, "listening");
    Ok(ServerHandle {
        shared,
        local_addr,
        accept: Some(accept),
        applier: Some(applier),
    })
}

fn open_volume(cfg: &ServerConfig) -> Result<(Volume, bool), ServerError> {
    let path = &cfg.volume_path;
    let vol_err = |source| ServerError::Volume {
        path: path.clone(),
        source,
    };
    let size_err = |why: String| ServerError::VolumeSize {
        path: path.clone(),
        why,
    };
    let (volume, created) = match cfg.create_bytes {
        Some(bytes) if !path.exists() => {
            if bytes == 0 || bytes % u64::from(cfg.block_bytes) != 0 {
                return Err(size_err(format!(
                    "size {bytes} to create is not a positive multiple of the {}-byte block",
                    cfg.block_bytes
                )));
            }
            (Volume::create(path, bytes).map_err(vol_err)?, true)
        }
        Some(bytes) => {
            let v = Volume::open(path).map_err(vol_err)?;
            if v.volume_bytes() != bytes {
                return Err(size_err(format!(
                    "exists with {} bytes, not the {bytes} bytes asked for",
                    v.volume_bytes()
                )));
            }
            (v, false)
        }
        None => (Volume::open(path).map_err(vol_err)?, false),
    };
    let bytes = volume.volume_bytes();
    if bytes == 0 || bytes % u64::from(cfg.block_bytes) != 0 {
        return Err(size_err(format!(
            "size {bytes} is not a positive multiple of the {}-byte block",
            cfg.block_bytes
        )));
    }
    Ok((volume, created))
}

/// Reads the metadata and lets mirror-core decide what this restart trusts.
fn restore(cfg: &ServerConfig, volume: &Volume, created: bool) -> Result<Restored, ServerError> {
    let record = meta::load(&cfg.meta_path)?;
    let facts = VolumeFacts {
        volume_id: cfg.volume_id,
        volume_bytes: volume.volume_bytes(),
        created,
    };
    let (restored, kind) =
        target::recover(record.as_ref(), &facts).map_err(|why| ServerError::MetaMismatch {
            path: cfg.meta_path.clone(),
            why,
        })?;
    if kind == RecoveryKind::Adopted {
        warn!(
            meta = %cfg.meta_path.display(),
            "no metadata file: treating the existing volume as fresh (durable seq 0)"
        );
    }
    Ok(restored)
}

fn target_config(cfg: &ServerConfig, volume_bytes: u64) -> TargetConfig {
    TargetConfig {
        volume_id: cfg.volume_id,
        node_id: cfg.node_id,
        generation: Generation(0),
        volume_bytes,
        block_bytes: cfg.block_bytes,
        secret: cfg.secret.clone(),
        conflict_policy: cfg.conflict_policy,
        commit_log_bytes_max: cfg.commit_log_bytes_max,
        commit_log_entries_max: cfg.commit_log_entries_max,
        local_locks_max: LOCAL_LOCKS_MAX,
        handshake_timeout_ns: u64::try_from(cfg.handshake_timeout.as_nanos()).unwrap_or(u64::MAX),
        handshakes_max: HANDSHAKES_MAX_DEFAULT,
    }
}

impl ServerHandle {
    /// The address the server listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The engine's state.
    #[must_use]
    pub fn status(&self) -> TargetStatus {
        self.shared.target().status()
    }

    /// Resolves once the server has begun to stop (a fatal volume error, or [`Self::shutdown`]).
    pub async fn stopped(&self) {
        let mut rx = self.shared.shutdown.subscribe();
        // An error means the sender is gone: stopped as well.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Stops gracefully: stop accepting and reading, apply what is ready, sync, record the durable
    /// sequence number and mark the metadata clean. Returns the error that stopped the server, if
    /// one did.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.shared.shutdown.send_replace(true);
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        // The accept loop has ended and dropped the command channel: the applier finishes.
        let Some(applier) = self.applier.take() else {
            return Ok(());
        };
        match applier.await {
            Ok(result) => result,
            Err(e) => Err(ServerError::Internal(format!("applier task failed: {e}"))),
        }
    }

    /// Takes a local lock on `[offset_bytes, offset_bytes + len_bytes)`, retrying with a bounded
    /// backoff while the mirror holds or waits for an overlapping range. While held, no mirrored
    /// operation on the region is applied.
    pub async fn lock_region(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<RegionLock, ServerError> {
        let volume_bytes = self.shared.volume.volume_bytes();
        let in_volume = offset_bytes
            .checked_add(len_bytes)
            .is_some_and(|end| end <= volume_bytes);
        if len_bytes == 0 || !in_volume {
            return Err(ServerError::BadRange(offset_bytes, len_bytes));
        }
        let range = Range::new(offset_bytes, len_bytes);
        let deadline = tokio::time::Instant::now() + self.shared.local_lock_timeout;
        let mut backoff = Duration::from_millis(1);
        loop {
            if *self.shared.shutdown.borrow() {
                return Err(ServerError::Stopped);
            }
            let attempt = self.shared.target().try_lock_local(range);
            match attempt {
                Ok(id) => {
                    return Ok(RegionLock {
                        shared: Arc::clone(&self.shared),
                        id: Some(id),
                        range,
                    })
                }
                Err(LockError::BadRange) => {
                    return Err(ServerError::BadRange(offset_bytes, len_bytes))
                }
                // Busy, too many holders, or a reason added later: all may clear up.
                Err(_) => {
                    if tokio::time::Instant::now() + backoff > deadline {
                        return Err(ServerError::LockTimeout(offset_bytes, len_bytes));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
            }
        }
    }

    /// Reads a region while no mirrored operation touches it: takes a local lock (see
    /// [`Self::lock_region`]), reads, releases.
    pub async fn consistent_read(
        &self,
        offset_bytes: u64,
        len_bytes: usize,
    ) -> Result<Vec<u8>, ServerError> {
        if len_bytes > READ_BYTES_MAX {
            return Err(ServerError::BadRange(offset_bytes, len_bytes as u64));
        }
        let lock = self.lock_region(offset_bytes, len_bytes as u64).await?;
        let data = lock.read(offset_bytes, len_bytes).await;
        lock.release();
        data
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        // Not graceful (the metadata stays "not clean"), but stop accepting and serving.
        self.shared.shutdown.send_replace(true);
    }
}

/// A local lock on a region of the volume; released by [`RegionLock::release`] or on drop.
#[derive(Debug)]
pub struct RegionLock {
    shared: Arc<Shared>,
    id: Option<LocalLockId>,
    range: Range,
}

impl RegionLock {
    /// The locked range.
    #[must_use]
    pub fn range(&self) -> Range {
        self.range
    }

    /// Reads part of the locked region.
    pub async fn read(&self, offset_bytes: u64, len_bytes: usize) -> Result<Vec<u8>, ServerError> {
        let inside = offset_bytes >= self.range.offset_bytes
            && offset_bytes
                .checked_add(len_bytes as u64)
                .is_some_and(|end| end <= self.range.end_bytes());
        if !inside || len_bytes > READ_BYTES_MAX {
            return Err(ServerError::BadRange(offset_bytes, len_bytes as u64));
        }
        let volume = Arc::clone(&self.shared.volume);
        tokio::task::spawn_blocking(move || storage::read(&*volume, offset_bytes, len_bytes))
            .await
            .map_err(|e| ServerError::VolumeIo(format!("read task failed: {e}")))?
            .map_err(|e| ServerError::VolumeIo(format!("read {offset_bytes}+{len_bytes}: {e}")))
    }

    /// Releases the lock; mirrored operations waiting for the region may proceed.
    pub fn release(mut self) {
        self.unlock();
    }

    fn unlock(&mut self) {
        if let Some(id) = self.id.take() {
            self.shared.target().unlock_local(id);
            self.shared.apply_wake.notify_one();
            self.shared.wake_writers();
        }
    }
}

impl Drop for RegionLock {
    fn drop(&mut self) {
        self.unlock();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, cmds: mpsc::Sender<Cmd>) {
    let mut stop = shared.shutdown.subscribe();
    let next_conn = AtomicU64::new(1);
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        let deadline = shared.target().poll_timeout();
        let timer = async {
            match deadline {
                Some(ns) => {
                    let wait = Duration::from_nanos(ns.saturating_sub(shared.now_ns()));
                    tokio::time::sleep(wait).await;
                }
                None => std::future::pending().await,
            }
        };
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            () = timer => {
                let mut target = shared.target();
                target.handle_timeout(shared.now_ns());
                log_closes(&mut target);
                drop(target);
                shared.wake_writers();
                continue;
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.connections.load(Ordering::Relaxed) >= CONNECTIONS_MAX {
            warn!(%peer, "closing a connection at once: {CONNECTIONS_MAX} are open");
            continue;
        }
        let mut nonce = [0u8; MAC_BYTES];
        if let Err(e) = getrandom::fill(&mut nonce) {
            error!(%peer, "no OS randomness for a nonce: {e}");
            continue;
        }
        let conn = ConnId(next_conn.fetch_add(1, Ordering::Relaxed));
        let admitted = shared.target().on_connect(conn, nonce, shared.now_ns());
        if let Err(e) = admitted {
            info!(%peer, %conn, "refusing: {e}");
        }
        shared.connections.fetch_add(1, Ordering::Relaxed);
        sessions.spawn(run_session(
            Arc::clone(&shared),
            stream,
            peer,
            conn,
            cmds.clone(),
        ));
    }
    drop(listener);
    while sessions.join_next().await.is_some() {}
}

/// Logs the connections the engine is done with; their writers see it and close them.
fn log_closes(target: &mut Target) {
    while let Some((conn, why)) = target.poll_close() {
        info!(%conn, "closing: {why}");
    }
}

/// Why a session ended.
#[derive(Debug)]
enum Close {
    PeerClosed,
    Idle,
    Io(io::Error),
    Wire(wire::WireError),
    Engine(TargetError),
    Shutdown,
    /// The engine is done with the connection (refused, replaced, handshake timed out).
    Dropped,
    WriterGone,
}

async fn run_session(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    conn: ConnId,
    cmds: mpsc::Sender<Cmd>,
) {
    let _ = stream.set_nodelay(true);
    debug!(%peer, %conn, "connection accepted");
    let (rd, wr) = stream.into_split();
    // Frames are read through a buffer: one recv usually brings a header with its payload (and
    // often the next frames), instead of one recv per header and per payload.
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut writer = tokio::spawn(write_loop(Arc::clone(&shared), conn, wr, closing_rx));
    let mut stop = shared.shutdown.subscribe();
    let close = tokio::select! {
        close = read_loop(&shared, conn, &mut rd) => close,
        _ = stop.wait_for(|s| *s) => Close::Shutdown,
        end = &mut writer => match end {
            Ok(WriterEnd::Dropped) => Close::Dropped,
            _ => Close::WriterGone,
        },
    };
    let was_session = shared.target().session() == Some(conn);
    match &close {
        Close::PeerClosed => info!(%peer, %conn, "source closed the connection"),
        Close::Idle => {
            info!(%peer, %conn, "closing: nothing received for {:?}", shared.idle_timeout)
        }
        Close::Io(e) => info!(%peer, %conn, "closing: {e}"),
        Close::Wire(e) => warn!(%peer, %conn, "closing: malformed frame: {e}"),
        Close::Engine(e) => warn!(%peer, %conn, "closing: {e}"),
        Close::Shutdown => info!(%peer, %conn, "closing: server shutting down"),
        Close::Dropped => debug!(%peer, %conn, "closed"),
        Close::WriterGone => info!(%peer, %conn, "closing: cannot send to the source"),
    }
    if matches!(close, Close::Shutdown) && was_session {
        // Finish what is ready so the last acknowledgement tells the source where we stand.
        let (done_tx, done_rx) = oneshot::channel();
        if cmds.send(Cmd::Flush(done_tx)).await.is_ok() {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, done_rx).await;
        }
    }
    if !writer.is_finished() {
        closing_tx.send_replace(true);
        shared.wake_writers();
        if tokio::time::timeout(CLOSE_GRACE, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }
    if matches!(close, Close::Engine(_) | Close::Wire(_) | Close::Dropped) {
        // The writer has sent the REFUSE and a FIN. Read and drop what the peer had already sent,
        // briefly and boundedly: closing a socket with unread data resets the connection, and
        // the reset could reach the peer before it reads why it was refused.
        let mut sink = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        let mut drained = 0usize;
        while drained < (1 << 20) {
            match tokio::time::timeout_at(deadline, rd.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => break,
            }
        }
    }
    shared.target().on_disconnect(conn);
    shared.connections.fetch_sub(1, Ordering::Relaxed);
    if was_session {
        shared.room_wake.notify_one();
        shared.apply_wake.notify_one();
    }
}

/// Reads until `buf` is full (its `remaining_mut`). The idle timeout restarts with every chunk
/// received. `Ok(false)` means the peer closed before the first byte. Takes any `BufMut`, so a
/// payload is read straight into uninitialized capacity (no zero-fill pass over it first).
async fn read_full<R: AsyncRead + Unpin, B: BufMut>(
    rd: &mut R,
    mut buf: B,
    idle: Duration,
) -> Result<bool, Close> {
    let want = buf.remaining_mut();
    let mut got = 0;
    while buf.has_remaining_mut() {
        let n = match tokio::time::timeout(idle, rd.read_buf(&mut buf)).await {
            Err(_) => return Err(Close::Idle),
            Ok(Err(e)) => return Err(Close::Io(e)),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(Close::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed inside a frame ({got} of {want} bytes)"),
            )));
        }
        got += n;
    }
    Ok(true)
}

fn carries_op(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Lock | Kind::Write | Kind::Flush | Kind::Discard | Kind::WriteZeroes
    )
}

async fn read_loop<R: AsyncRead + Unpin>(shared: &Shared, conn: ConnId, rd: &mut R) -> Close {
    let idle = shared.idle_timeout;
    // Payload bytes read since this task last let the others run (see the end of the loop).
    let mut unyielded = 0usize;
    loop {
        let mut head = [0u8; HEADER_BYTES];
        match read_full(rd, &mut head[..], idle).await {
            Ok(true) => {}
            Ok(false) => return Close::PeerClosed,
            Err(close) => return close,
        }
        let header = match wire::decode_header(&head) {
            Ok(h) => h,
            Err(e) => return Close::Wire(e),
        };
        let payload_len = header.payload_len as usize;
        if carries_op(header.kind) {
            // Back-pressure: leave the payload in the socket until the commit log has room.
            loop {
                let room_wake = shared.room_wake.notified();
                if shared.target().has_room(payload_len) {
                    break;
                }
                room_wake.await;
            }
        }
        // At most PAYLOAD_BYTES_MAX, checked by decode_header.
        let mut payload = BytesMut::with_capacity(payload_len);
        match read_full(rd, (&mut payload).limit(payload_len), idle).await {
            Ok(true) => {}
            Ok(false) if payload_len == 0 => {}
            Ok(false) => {
                return Close::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed after a frame header",
                ))
            }
            Err(close) => return close,
        }
        let (result, is_session) = {
            let mut target = shared.target();
            let result = match wire::decode_body(&header, payload.freeze()) {
                Ok(frame) => target.handle_frame(conn, frame),
                Err(e) => {
                    if e.nak_seq().is_some() {
                        debug!("corrupted payload: {e}");
                    }
                    target.handle_wire_error(conn, &e)
                }
            };
            log_closes(&mut target);
            (result, target.session() == Some(conn))
        };
        // The writer first: on this single-threaded runtime woken tasks run in the order they
        // were woken, so the acknowledgement (RECEIVED, in `received` mode the one the host
        // waits for) goes out before the applier hands the write to the I/O thread (a futex
        // wake-up, seen with strace on the ack's path when the applier was woken first).
        shared.wake_writers();
        shared.apply_wake.notify_one();
        // The applier runs on this thread too. While the socket always has data, this task
        // would not give it the thread until a read would block: with 512 KiB frames the
        // reader took in ~10 MiB while the I/O thread sat idle, then the applier applied it
        // while the source, its log full, waited (strace). Yielding every YIELD_AFTER_BYTES lets
        // the applier hand a batch to the I/O thread while reading goes on.
        unyielded += payload_len;
        if unyielded >= YIELD_AFTER_BYTES {
            unyielded = 0;
            tokio::task::yield_now().await;
        }
        if let Err(e) = result {
            return match e {
                TargetError::Wire(w) => Close::Wire(w),
                other => Close::Engine(other),
            };
        }
        // Bound what the engine queues for a peer that does not read its answers. (A connection
        // in its handshake queues at most two frames.)
        while is_session
            && shared.unsent_inputs.fetch_add(1, Ordering::Relaxed) >= UNSENT_INPUTS_MAX
        {
            shared.unsent_inputs.fetch_sub(1, Ordering::Relaxed);
            shared.drained_wake.notified().await;
        }
    }
}

/// Why a writer stopped.
#[derive(Debug)]
enum WriterEnd {
    /// The engine is done with the connection; everything it had for it was sent.
    Dropped,
    /// The session is closing (`closing`), or the peer cannot be written to.
    Closed,
}

async fn write_loop(
    shared: Arc<Shared>,
    conn: ConnId,
    mut wr: OwnedWriteHalf,
    mut closing: watch::Receiver<bool>,
) -> WriterEnd {
    let mut buf = Vec::with_capacity(4096);
    loop {
        // Registered before looking, so a wake-up between the look and the wait is not lost.
        let wake = shared.tx_wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        buf.clear();
        let (open, is_session) = {
            let mut target = shared.target();
            while buf.len() < (1 << 20) {
                let Some(frame) = target.poll_transmit(conn) else {
                    break;
                };
                buf.extend_from_slice(&frame.encode().to_vec());
            }
            (target.is_open(conn), target.session() == Some(conn))
        };
        if !buf.is_empty() {
            match tokio::time::timeout(shared.idle_timeout, wr.write_all(&buf)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(%conn, "write to source failed: {e}");
                    return WriterEnd::Closed;
                }
                Err(_) => {
                    debug!(%conn, "source did not read for {:?}", shared.idle_timeout);
                    return WriterEnd::Closed;
                }
            }
            if is_session {
                shared.unsent_inputs.store(0, Ordering::Relaxed);
                shared.drained_wake.notify_one();
            }
            continue;
        }
        if is_session {
            shared.unsent_inputs.store(0, Ordering::Relaxed);
            shared.drained_wake.notify_one();
        }
        if !open || *closing.borrow() {
            let _ = wr.shutdown().await;
            return if open {
                WriterEnd::Closed
            } else {
                WriterEnd::Dropped
            };
        }
        tokio::select! {
            () = &mut wake => {}
            _ = closing.changed() => {}
        }
    }
}

/// Applies operations in order, syncs once per batch, records the durable sequence number. Runs
/// until the command channel closes, then marks the metadata clean.
async fn applier(shared: Arc<Shared>, mut cmds: mpsc::Receiver<Cmd>) -> Result<(), ServerError> {
    let result = applier_rounds(&shared, &mut cmds).await;
    match &result {
        Ok(()) => {
            // Stopping: nothing is being applied; sync and mark clean.
            let applied = shared.target().applied();
            let meta = shared.meta(applied, true);
            let volume = Arc::clone(&shared.volume);
            let meta_file = Arc::clone(&shared.meta_file);
            let synced = shared
                .io
                .run(move || sync_and_record(&volume, &meta_file, &meta))
                .await;
            if let Err(e) = synced {
                error!("final sync failed: {e}");
                return Err(ServerError::VolumeIo(e));
            }
            shared.target().handle_durable(applied);
            info!(durable = %applied, "stopped cleanly");
        }
        Err(e) => {
            error!("stopping: {e}");
            shared.shutdown.send_replace(true);
        }
    }
    result
}

async fn applier_rounds(
    shared: &Arc<Shared>,
    cmds: &mut mpsc::Receiver<Cmd>,
) -> Result<(), ServerError> {
    // The applier owns the planner: one batch at a time goes to the I/O thread.
    let mut commit = GroupCommit::new(CommitConfig::default());
    loop {
        if run_batch(shared, &mut commit).await? {
            continue;
        }
        tokio::select! {
            _ = shared.apply_wake.notified() => {}
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Flush(done)) => {
                    while run_batch(shared, &mut commit).await? {}
                    let _ = done.send(());
                }
                None => {
                    while run_batch(shared, &mut commit).await? {}
                    return Ok(());
                }
            }
        }
    }
}

/// Makes everything applied durable, then records `meta` (its durable seq) in the metadata file.
/// Runs on the I/O thread; the order is what lets a restarted target trust its record.
fn sync_and_record(volume: &Volume, meta_file: &MetaFile, meta: &MetaRecord) -> Result<(), String> {
    volume.sync().map_err(|e| format!("fdatasync: {e}"))?;
    meta_file.update(meta).map_err(|e| e.to_string())
}

/// A job for the I/O thread.
type IoJob = Box<dyn FnOnce() + Send>;

/// The thread that does the applier's blocking volume I/O (apply, fdatasync, metadata). One
/// dedicated thread rather than tokio's blocking pool: handing a job over is a single wake-up,
/// where the pool's hand-off also contends for its lock (three futex calls and an extra context
/// switch per group commit, seen with strace). It exits when the last sender is dropped.
#[derive(Debug)]
struct IoThread {
    jobs: std::sync::mpsc::SyncSender<IoJob>,
}

impl IoThread {
    fn spawn() -> io::Result<IoThread> {
        // The applier waits for each job, so at most one is ever queued.
        let (jobs, rx) = std::sync::mpsc::sync_channel::<IoJob>(1);
        std::thread::Builder::new()
            .name("target-io".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(IoThread { jobs })
    }

    /// Runs `f` on the I/O thread and waits for its result.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        let job: IoJob = Box::new(move || {
            // A panic in `f` drops `tx`, which the receiver reports.
            let _ = tx.send(f());
        });
        self.jobs
            .send(job)
            .map_err(|_| "the I/O thread has stopped".to_string())?;
        rx.await
            .map_err(|_| "the I/O thread failed (panicked)".to_string())?
    }
}

/// Runs the planner's next batch on the I/O thread: write its operations, then (if it says so)
/// sync the volume and record the durable seq, in one hand-off; only then does the engine hear of
/// it. Returns whether there was a batch.
async fn run_batch(shared: &Arc<Shared>, commit: &mut GroupCommit) -> Result<bool, ServerError> {
    let Some(batch) = commit.poll_batch(&mut shared.target()) else {
        return Ok(false);
    };
    if !batch.ops.is_empty() {
        shared.room_wake.notify_one();
    }
    let record = batch
        .sync
        .map(|seq| (shared.meta(seq, false), Arc::clone(&shared.meta_file)));
    let volume = Arc::clone(&shared.volume);
    let batch = shared
        .io
        .run(move || {
            for a in &batch.ops {
                storage::apply(&*volume, &a.op)
                    .map_err(|e| format!("applying seq {}: {e}", a.seq))?;
            }
            if let Some((meta, meta_file)) = record {
                sync_and_record(&volume, &meta_file, &meta)?;
            }
            Ok(batch)
        })
        .await
        .map_err(ServerError::VolumeIo)?;
    commit.handle_done(&mut shared.target(), &batch);
    shared.room_wake.notify_one();
    shared.wake_writers();
    Ok(true)
}
