//! The server's public face: configuration, start (open the volume, let mirror-core decide what
//! the metadata is trusted for, bind), and the handle (status, shutdown, local locks). The engine
//! itself belongs to one task, [`crate::owner`]; this module reaches it only through channels.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mirror_core::lock::{LocalLockId, LockError};
use mirror_core::meta::MetaRecord;
use mirror_core::storage::{self, MetaStore, MetaStoreError};
use mirror_core::target::{
    self, ConflictPolicy, RecoverError, RecoveryKind, Restored, Target, TargetConfig, TargetStatus,
    VolumeFacts, HANDSHAKES_MAX_DEFAULT,
};
use mirror_core::wire;
use mirror_core::{Generation, NodeId, Range, VolumeId};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::meta::{self, default_meta_path, MetaError, MetaFile};
use crate::owner::{Cmd, Owner};
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
/// Largest read a local lock holder may make at once.
pub const READ_BYTES_MAX: usize = 64 << 20;
/// Local locks held at once.
const LOCAL_LOCKS_MAX: usize = 64;

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
    /// The metadata store (of [`start_with`]) is unreadable, corrupt, or cannot be written.
    #[error(transparent)]
    MetaStore(#[from] MetaStoreError),
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

/// Local lock requests queued at once (each waits for its answer; unlocks are bounded by the
/// locks held).
const CMDS_MAX: usize = LOCAL_LOCKS_MAX + 8;

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    volume: Arc<dyn storage::Volume + Send + Sync>,
    cmds: mpsc::Sender<Cmd>,
    status: watch::Receiver<TargetStatus>,
    shutdown: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
    owner: Option<JoinHandle<Result<(), ServerError>>>,
    local_lock_timeout: Duration,
}

/// What a server runs on: its volume and its metadata store (files for [`start`]; memory, or
/// fault-injecting implementations, for tests).
#[derive(Debug, Clone)]
pub struct Backing {
    /// The volume.
    pub volume: Arc<dyn storage::Volume + Send + Sync>,
    /// Where the metadata record is kept.
    pub meta: Arc<dyn MetaStore + Send + Sync>,
    /// Whether the volume was just created (it holds nothing of any mirror).
    pub created: bool,
}

/// Opens the volume and its metadata files, binds, and starts serving.
///
/// Metadata: what is trusted of it is mirror-core's decision ([`target::recover`]); a corrupt
/// file, or one of another volume, is an error. The file is rewritten as "not clean" before
/// serving.
pub async fn start(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
    check_config(&cfg)?;
    let (volume, created) = open_volume(&cfg)?;
    let record = meta::load(&cfg.meta_path)?;
    let restored = restore(&cfg, record, volume.volume_bytes(), created)?;
    // Until a graceful shutdown says otherwise, the volume may hold writes past `durable`.
    let meta_file = MetaFile::create(
        &cfg.meta_path,
        &running_record(&cfg, restored, volume.volume_bytes()),
    )?;
    serve(cfg, Arc::new(volume), Arc::new(meta_file), restored).await
}

/// Starts serving on `backing` instead of files (the volume's size must fit the block size).
pub async fn start_with(cfg: ServerConfig, backing: Backing) -> Result<ServerHandle, ServerError> {
    check_config(&cfg)?;
    let volume_bytes = backing.volume.volume_bytes();
    if volume_bytes == 0 || !volume_bytes.is_multiple_of(u64::from(cfg.block_bytes)) {
        return Err(ServerError::Config(format!(
            "a volume of {volume_bytes} bytes is not a positive multiple of the {}-byte block",
            cfg.block_bytes
        )));
    }
    let record = backing.meta.load()?;
    let restored = restore(&cfg, record, volume_bytes, backing.created)?;
    backing
        .meta
        .store(&running_record(&cfg, restored, volume_bytes))?;
    serve(cfg, backing.volume, backing.meta, restored).await
}

fn check_config(cfg: &ServerConfig) -> Result<(), ServerError> {
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
    Ok(())
}

/// The record a running server keeps: not clean until a graceful shutdown says otherwise.
fn running_record(cfg: &ServerConfig, restored: Restored, volume_bytes: u64) -> MetaRecord {
    MetaRecord::secondary(
        cfg.volume_id,
        cfg.node_id,
        volume_bytes,
        restored.durable,
        false,
    )
}

async fn serve(
    cfg: ServerConfig,
    volume: Arc<dyn storage::Volume + Send + Sync>,
    meta: Arc<dyn MetaStore + Send + Sync>,
    restored: Restored,
) -> Result<ServerHandle, ServerError> {
    info!(
        volume = %cfg.volume_path.display(),
        volume_bytes = volume.volume_bytes(),
        durable = %restored.durable,
        clean = restored.clean,
        "volume opened"
    );
    let target = Target::new(target_config(&cfg, volume.volume_bytes()), restored);
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
    let (cmds, cmd_rx) = mpsc::channel(CMDS_MAX);
    let (status_tx, status) = watch::channel(target.status());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (stopped_tx, stopped) = watch::channel(false);
    let owner = Owner {
        target,
        volume: Arc::clone(&volume),
        meta_file: meta,
        volume_id: cfg.volume_id,
        node_id: cfg.node_id,
        idle_timeout: cfg.idle_timeout,
        listener,
        cmds: cmd_rx,
        status: status_tx,
        shutdown: shutdown_rx,
    };
    let owner = tokio::spawn(async move {
        // A panic of the owner (an engine assertion) must stop the server, not stall it.
        let result = match tokio::spawn(owner.run()).await {
            Ok(result) => result,
            Err(e) => Err(ServerError::Internal(format!(
                "the engine's task failed: {e}"
            ))),
        };
        stopped_tx.send_replace(true);
        result
    });
    info!(%local_addr, "listening");
    Ok(ServerHandle {
        local_addr,
        volume,
        cmds,
        status,
        shutdown,
        stopped,
        owner: Some(owner),
        local_lock_timeout: cfg.local_lock_timeout,
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
fn restore(
    cfg: &ServerConfig,
    record: Option<MetaRecord>,
    volume_bytes: u64,
    created: bool,
) -> Result<Restored, ServerError> {
    let facts = VolumeFacts {
        volume_id: cfg.volume_id,
        volume_bytes,
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

    /// The engine's state, as its owner last published it.
    #[must_use]
    pub fn status(&self) -> TargetStatus {
        self.status.borrow().clone()
    }

    /// Resolves once the server has stopped serving (a fatal volume error, or [`Self::shutdown`]).
    pub async fn stopped(&self) {
        let mut rx = self.stopped.clone();
        // An error means the sender is gone: stopped as well.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Stops gracefully: stop accepting and reading, apply what is ready, sync, record the durable
    /// sequence number and mark the metadata clean. Returns the error that stopped the server, if
    /// one did.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.shutdown.send_replace(true);
        let Some(owner) = self.owner.take() else {
            return Ok(());
        };
        match owner.await {
            Ok(result) => result,
            Err(e) => Err(ServerError::Internal(format!(
                "the engine's task failed: {e}"
            ))),
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
        let in_volume = offset_bytes
            .checked_add(len_bytes)
            .is_some_and(|end| end <= self.volume.volume_bytes());
        if len_bytes == 0 || !in_volume {
            return Err(ServerError::BadRange(offset_bytes, len_bytes));
        }
        let range = Range::new(offset_bytes, len_bytes);
        let deadline = tokio::time::Instant::now() + self.local_lock_timeout;
        let mut backoff = Duration::from_millis(1);
        loop {
            let (reply, answer) = oneshot::channel();
            self.cmds
                .send(Cmd::Lock(range, reply))
                .await
                .map_err(|_| ServerError::Stopped)?;
            match answer.await.map_err(|_| ServerError::Stopped)? {
                Ok(id) => {
                    return Ok(RegionLock {
                        cmds: self.cmds.clone(),
                        volume: Arc::clone(&self.volume),
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
        // Not awaited, but the owner stops as after `shutdown`.
        self.shutdown.send_replace(true);
    }
}

/// A local lock on a region of the volume; released by [`RegionLock::release`] or on drop.
#[derive(Debug)]
pub struct RegionLock {
    cmds: mpsc::Sender<Cmd>,
    volume: Arc<dyn storage::Volume + Send + Sync>,
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
        let volume = Arc::clone(&self.volume);
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
            // Room is certain: the queue holds more than the locks that can exist. A stopped
            // server has no locks left to release.
            if self.cmds.try_send(Cmd::Unlock(id)).is_err() {
                warn!("local lock {id:?} released after the server stopped");
            }
        }
    }
}

impl Drop for RegionLock {
    fn drop(&mut self) {
        self.unlock();
    }
}
