//! The server's errors: why it could not start, stopped, or refused a local request.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use mirror_core::storage::{MetaStoreError, VolumeError};
use mirror_core::target::RecoverError;
use mirror_core::{BadBlockSize, Seq};
use mirror_storage::StorageError;

/// Why the server could not start, stopped, or refused a local request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The volume could not be opened, created or upgraded, or its metadata is corrupt.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The metadata store (of [`crate::start_with`]) is unreadable, corrupt, or cannot be written.
    #[error(transparent)]
    MetaStore(#[from] MetaStoreError),
    /// The metadata belongs to another volume or geometry.
    #[error("metadata of volume {path} does not match: {why}")]
    MetaMismatch {
        /// The volume.
        path: PathBuf,
        /// What differs.
        why: RecoverError,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(#[from] BadConfig),
    /// The status socket cannot be bound.
    #[error("status socket {path}: {reason}")]
    StatusSocket {
        /// Its path.
        path: PathBuf,
        /// The failure.
        reason: io::Error,
    },
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: io::Error,
    },
    /// Writing, syncing or reading the volume, or recording its metadata, failed: the server
    /// stopped without acknowledging what it could not make durable.
    #[error("volume I/O failed: {0}")]
    VolumeIo(#[from] IoFailure),
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
    Internal(#[from] InternalError),
}

/// A server configuration that cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BadConfig {
    /// The block size is not supported.
    #[error(transparent)]
    BlockSize(#[from] BadBlockSize),
    /// The commit log cannot hold the largest frame.
    #[error("commit log of {bytes} bytes cannot hold one {frame_bytes}-byte write")]
    CommitLogTooSmall {
        /// The configured bound.
        bytes: usize,
        /// The largest write payload.
        frame_bytes: u32,
    },
    /// A bound or timeout is zero.
    #[error("commit log entries, idle timeout and handshake timeout must be positive")]
    NotPositive,
    /// The volume's size is not a positive multiple of the block.
    #[error(
        "a volume of {bytes} bytes is not a positive multiple of the {block_bytes}-byte block"
    )]
    VolumeSize {
        /// The volume's size.
        bytes: u64,
        /// The block.
        block_bytes: u32,
    },
    /// A volume kept in memory does not fit this machine's address space.
    #[error("{bytes} bytes do not fit in memory")]
    TooLargeForMemory {
        /// The size asked for.
        bytes: u64,
    },
}

/// A failure of the volume or metadata I/O.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoFailure {
    /// Applying an operation failed.
    #[error("applying seq {seq}: {source}")]
    Apply {
        /// The operation.
        seq: Seq,
        /// The failure.
        source: VolumeError,
    },
    /// The volume's sync failed.
    #[error("sync: {0}")]
    Sync(VolumeError),
    /// Recording the durable seq failed.
    #[error(transparent)]
    Record(MetaStoreError),
    /// A local holder's read failed.
    #[error("read {offset_bytes}+{len_bytes}: {source}")]
    Read {
        /// Where.
        offset_bytes: u64,
        /// How much.
        len_bytes: usize,
        /// The failure.
        source: VolumeError,
    },
    /// The thread doing the I/O panicked or is gone.
    #[error("the {0} failed (panicked)")]
    ThreadFailed(&'static str),
    /// The before-resync hook failed: the resync did not start.
    #[error("the before-resync hook `{command}` failed ({why}): the resync does not start")]
    Hook {
        /// The hook's command.
        command: String,
        /// How it failed.
        why: String,
    },
}

/// A task or thread of the server that failed unexpectedly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InternalError {
    /// The I/O thread could not be started.
    #[error("cannot start the I/O thread: {0}")]
    IoThreadSpawn(io::Error),
    /// The engine's task panicked or was cancelled.
    #[error("the engine's task failed: {0}")]
    EngineTask(tokio::task::JoinError),
}
