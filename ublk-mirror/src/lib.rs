//! ublk-mirror: the source side drivers of the mirroring engine.
//!
//! - [`replicator`]: runs the `mirror_core` source engine over TCP to a target server, with
//!   reconnects, back-pressure and a handle usable from any executor.
//! - [`device`]: the ublk block device (/dev/ublkbN) whose writes go through the replicator (the
//!   only module with `unsafe` code: libublk's request buffers).
//! - [`host_write`]: the one path of a host write (range, enqueue, local write, completion), for
//!   the device and `loadgen`.
//! - [`volume`]: opening the local volume.
//! - [`admin`]: the daemon (`ublk-mirror start`), its control socket and the admin commands.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod device;
pub mod host_write;
pub mod replicator;
pub mod volume;
