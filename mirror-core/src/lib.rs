//! The speculative mirroring protocol as deterministic state machines, with no I/O.
//!
//! - [`wire`]: frames, their encoding and the checks every received byte goes through.
//! - [`source::Source`]: sequence numbers, the bounded rollback log ([`log::RollbackLog`]), LOCK and
//!   WRITE sent back to back, halt on REJECT, go-back-N on NAK, completions per [`source::Mode`].
//! - [`session::SourceSession`]: the source's connection lifecycle (reconnect backoff with
//!   jitter, idle PING, silence timeout) as policy with time passed in.
//! - [`target::Target`]: the commit log, the [`lock::LockTable`] shared with local lock holders,
//!   in-order apply, separate "received" and "applied and durable" acknowledgements.
//! - [`commit::GroupCommit`]: the target's group commit (which operations are written together,
//!   when the volume is synced and durability recorded), run by the target server and the
//!   simulator alike.
//! - [`meta`]: the persistent metadata record of either role (versioned, checksummed, two slots);
//!   [`target::recover`] decides what a restarted target trusts of it.
//! - [`bitmap`]: the dirty bitmap (a chunk map) and its checksummed stored form.
//! - [`genid`]: generation ids and the handshake's decision of what two nodes' ids mean.
//! - [`storage`]: the volume seam ([`storage::Volume`], one [`storage::apply`] for every
//!   implementation) with in-memory and fault-injecting volumes.
//! - [`sim`]: a seeded simulation of both over a faulty link, with invariant checkers.
//!
//! Nothing here reads a clock, a socket or a file: drivers pass time and bytes in and take frames,
//! operations to apply and completions out. This crate depends on no async runtime, no io_uring and
//! no libc (CI checks it with `cargo tree -p mirror-core -e normal`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod bitmap;
pub mod commit;
pub mod genid;
pub mod lock;
pub mod log;
pub mod meta;
pub mod node;
pub mod session;
pub mod sim;
pub mod source;
pub mod storage;
pub mod target;
#[cfg(test)]
mod testkit;
pub mod types;
pub mod wire;

pub use types::{
    block_shift, one_line_error, parse_size, BadBlockSize, ExtentError, Generation, Lba, NodeId,
    Range, Seq, Size, VolumeId, SECTOR_BYTES,
};
