//! The target server: receives mirrored operations over TCP and applies them to a file-backed target
//! volume through the [`mirror_core::target::Target`] engine.
//!
//! - One source at a time; a second connection gets `REFUSE(Busy)`. The engine (commit log, lock
//!   table, sequence numbers) outlives connections: it belongs to the volume.
//! - Frames are read header first; the commit log's room is checked before the payload is read
//!   (back-pressure), so memory stays bounded. A frame that cannot be decoded is logged with its
//!   reason and the connection closed; a corrupted write payload is answered with `NAK`.
//! - Operations are applied strictly in order off the async reactor, then synced (`fdatasync`)
//!   once per batch (group commit); the durable sequence number is recorded in the [`meta`] file
//!   before the engine acknowledges durability.
//! - Local lock holders ([`ServerHandle::lock_region`], [`ServerHandle::consistent_read`]) read a
//!   region while no mirrored write touches it.
//!
//! [`start`] opens the volume and its metadata, binds, and returns a [`ServerHandle`];
//! [`ServerHandle::shutdown`] stops gracefully and marks the metadata clean.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod meta;
mod server;
pub mod volume;

pub use server::{
    start, RegionLock, ServerConfig, ServerError, ServerHandle, COMMIT_LOG_BYTES_DEFAULT,
    COMMIT_LOG_ENTRIES_DEFAULT, IDLE_TIMEOUT_DEFAULT, READ_BYTES_MAX,
};
