//! The server's public face: configuration, start (open the volume, let mirror-core decide what
//! the metadata is trusted for, bind: [`crate::open`]), and the handle (status, shutdown; local
//! locks in [`crate::local`]). The engine itself belongs to one task, [`crate::owner`]; this
//! module reaches it only through channels.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mirror_core::meta::MetaRecord;
use mirror_core::node::Node;
use mirror_core::storage::{self, MetaStore};
use mirror_core::target::{ConflictPolicy, Restored, Target, TargetStatus};
use mirror_core::{NodeId, VolumeId};
use mirror_storage::{legacy_meta_path, Opening};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::info;

use crate::error::{BadConfig, InternalError, ServerError};
use crate::open::{check_config, open_volume, restore, target_config};
use crate::owner::{Cmd, Owner};

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
pub(crate) const LOCAL_LOCKS_MAX: usize = 64;

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks one; see [`ServerHandle::local_addr`]).
    pub listen: SocketAddr,
    /// The volume: a regular file or block device holding the data area and, at its end, the
    /// metadata area.
    pub volume_path: PathBuf,
    /// The data area's size: create the volume (sparse, larger by the metadata area) if it does
    /// not exist, initialise an existing one without metadata (as not consistent); an existing
    /// volume must hold this many data bytes.
    pub create_bytes: Option<u64>,
    /// A legacy external metadata file (earlier releases) to upgrade from, if it exists.
    pub legacy_meta_path: PathBuf,
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
    /// Where the server answers status requests ([`crate::status`]), if anywhere.
    pub status_socket: Option<PathBuf>,
    /// A command run (through `sh -c`) before a resync's copies reach the volume, so that it
    /// can snapshot the last consistent copy; the server waits for it, and stops if it fails.
    pub before_resync: Option<String>,
}

impl ServerConfig {
    /// A configuration with defaults for everything but the volume, its id and the secret.
    #[must_use]
    pub fn new(volume_path: PathBuf, volume_id: VolumeId, secret: Vec<u8>) -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            legacy_meta_path: legacy_meta_path(&volume_path),
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
            status_socket: None,
            before_resync: None,
            local_lock_timeout: Duration::from_secs(10),
        }
    }
}

/// Local lock requests queued at once (each waits for its answer; unlocks are bounded by the
/// locks held).
const CMDS_MAX: usize = LOCAL_LOCKS_MAX + 8;

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    pub(crate) volume: Arc<dyn storage::Volume + Send + Sync>,
    pub(crate) cmds: mpsc::Sender<Cmd>,
    status: watch::Receiver<TargetStatus>,
    shutdown: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
    owner: Option<JoinHandle<Result<(), ServerError>>>,
    pub(crate) local_lock_timeout: Duration,
    status_socket: Option<PathBuf>,
}

/// What a server runs on: its volume and its metadata store (a file or block device with
/// internal metadata for [`start`]; memory, or fault-injecting implementations, for tests).
#[derive(Debug, Clone)]
pub struct Backing {
    /// The volume.
    pub volume: Arc<dyn storage::Volume + Send + Sync>,
    /// Where the metadata record is kept.
    pub meta: Arc<dyn MetaStore + Send + Sync>,
    /// Whether the volume was just created (it holds nothing of any mirror).
    pub created: bool,
}

/// Opens the volume and its internal metadata (creating, initialising or upgrading it:
/// [`mirror_storage::open`]), binds, and starts serving.
///
/// Metadata: what is trusted of it is mirror-core's decision ([`mirror_core::target::recover`]);
/// corrupt metadata, or metadata of another volume, is an error. The record is rewritten as "not
/// clean" before serving.
pub async fn start(cfg: ServerConfig) -> Result<ServerHandle, ServerError> {
    check_config(&cfg)?;
    let opened = open_volume(&cfg)?;
    let volume_bytes = storage::Volume::volume_bytes(&*opened.volume);
    let created = opened.how == Opening::Created;
    // Until a graceful shutdown says otherwise, the volume may hold writes past `durable`.
    let (restored, record) = restore(&cfg, opened.record, volume_bytes, created)?;
    opened.meta.store(&record)?;
    serve(cfg, opened.volume, opened.meta, record, restored).await
}

/// Starts serving on `backing` instead of a volume on disk (the volume's size must fit the block
/// size).
pub async fn start_with(cfg: ServerConfig, backing: Backing) -> Result<ServerHandle, ServerError> {
    check_config(&cfg)?;
    let volume_bytes = backing.volume.volume_bytes();
    if volume_bytes == 0 || !volume_bytes.is_multiple_of(u64::from(cfg.block_bytes)) {
        return Err(BadConfig::VolumeSize {
            bytes: volume_bytes,
            block_bytes: cfg.block_bytes,
        }
        .into());
    }
    let record = backing.meta.load()?;
    let (restored, record) = restore(&cfg, record, volume_bytes, backing.created)?;
    backing.meta.store(&record)?;
    serve(cfg, backing.volume, backing.meta, record, restored).await
}

async fn serve(
    cfg: ServerConfig,
    volume: Arc<dyn storage::Volume + Send + Sync>,
    meta: Arc<dyn MetaStore + Send + Sync>,
    record: MetaRecord,
    restored: Restored,
) -> Result<ServerHandle, ServerError> {
    info!(
        volume = %cfg.volume_path.display(),
        volume_bytes = volume.volume_bytes(),
        durable = %restored.durable,
        clean = restored.clean,
        consistent = restored.consistent,
        generation = %restored.gen_ids.current,
        "volume opened"
    );
    let config = target_config(&cfg, volume.volume_bytes());
    let target = Target::new(config, restored);
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
    let status_listener = cfg
        .status_socket
        .as_deref()
        .map(crate::status::bind)
        .transpose()?;
    let (cmds, cmd_rx) = mpsc::channel(CMDS_MAX);
    let (status_tx, status) = watch::channel(target.status());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (stopped_tx, stopped) = watch::channel(false);
    let owner = Owner {
        node: Node::secondary(record, target),
        volume: Arc::clone(&volume),
        meta_file: meta,
        listener,
        cmds: cmd_rx,
        status: status_tx,
        shutdown: shutdown_rx,
        before_resync: cfg.before_resync.clone().map(|command| {
            Arc::new(crate::hook::BeforeResync {
                command,
                volume: cfg.volume_path.clone(),
                volume_id: cfg.volume_id,
            })
        }),
    };
    let owner = tokio::spawn(async move {
        // A panic of the owner (an engine assertion) must stop the server, not stall it.
        let result = match tokio::spawn(owner.run()).await {
            Ok(result) => result,
            Err(e) => Err(InternalError::EngineTask(e).into()),
        };
        stopped_tx.send_replace(true);
        result
    });
    if let (Some(listener), Some(path)) = (status_listener, cfg.status_socket.clone()) {
        tokio::spawn(crate::status::serve(
            listener,
            path,
            status.clone(),
            (cfg.volume_path.clone(), cfg.volume_id, local_addr),
            stopped.clone(),
        ));
    }
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
        status_socket: cfg.status_socket.clone(),
    })
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
        if let Some(path) = &self.status_socket {
            let _ = std::fs::remove_file(path);
        }
        let Some(owner) = self.owner.take() else {
            return Ok(());
        };
        match owner.await {
            Ok(result) => result,
            Err(e) => Err(InternalError::EngineTask(e).into()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        // Not awaited, but the owner stops as after `shutdown`.
        self.shutdown.send_replace(true);
    }
}
