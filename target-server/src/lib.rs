//! The target server: receives mirrored operations over TCP and applies them to a target volume
//! (a file or block device with internal metadata, [`mirror_storage`]) through the
//! [`mirror_core::target::Target`] engine.
//!
//! - One task owns the engine (commit log, lock table, sequence numbers), which outlives
//!   connections: it belongs to the volume. Each connection has a reader and a writer task that
//!   only move bytes; the engine decides which connection is the session (only an authenticated
//!   one; a second source of another node gets `REFUSE(Busy)`).
//! - The owner takes frames only while the commit log has room for the largest one
//!   (back-pressure: the readers wait, the sockets fill), so memory stays bounded. A frame that
//!   cannot be decoded is logged with its reason and the connection closed; a corrupted write
//!   payload is answered with `NAK`.
//! - Operations are applied strictly in order on an I/O thread, then synced (`fdatasync`) per
//!   batch of mirror-core's group-commit planner; the durable sequence number is recorded in the
//!   volume's metadata area before the engine acknowledges durability.
//! - Local lock holders ([`ServerHandle::lock_region`], [`ServerHandle::consistent_read`]) read a
//!   region while no mirrored write touches it.
//!
//! [`start`] opens the volume and its metadata, binds, and returns a [`ServerHandle`];
//! [`ServerHandle::shutdown`] stops gracefully and marks the metadata clean.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
mod conn;
mod error;
mod hook;
mod io_thread;
mod local;
mod open;
mod owner;
mod server;
pub mod status;

pub use error::{BadConfig, InternalError, IoFailure, ServerError};
pub use local::RegionLock;
pub use server::{
    start, start_with, Backing, ServerConfig, ServerHandle, COMMIT_LOG_BYTES_DEFAULT,
    COMMIT_LOG_ENTRIES_DEFAULT, IDLE_TIMEOUT_DEFAULT, READ_BYTES_MAX,
};
