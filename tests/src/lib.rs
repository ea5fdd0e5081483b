//! Helpers for the end-to-end tests: a fault-injecting TCP proxy, an in-process target, and
//! process management for the real binaries.
//!
//! - [`proxy::FaultProxy`]: delay, bandwidth cap, cuts and corruption on loopback, seeded and
//!   adjustable at run time (also a CLI: `faultproxy`).
//! - [`memtarget::MemTarget`]: the real target server over a volume and metadata in memory.
//! - [`procs`]: start `target-server` and `ublk-mirror loadgen`, kill them, compare files.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod memtarget;
pub mod procs;
pub mod proxy;

/// A seed for a random test: `$E2E_SEED` if set (to replay a failure), else a fresh one. The
/// caller prints it.
#[must_use]
pub fn seed() -> u64 {
    match std::env::var("E2E_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("E2E_SEED={s} is not a u64")),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            u64::try_from(t & u128::from(u64::MAX)).unwrap_or(0)
                ^ u64::from(std::process::id()).rotate_left(32)
        }
    }
}
