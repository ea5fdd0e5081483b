//! Process set-up the daemon needs before any thread exists: a private mount namespace and the
//! termination signals blocked, to be taken synchronously by one thread.

use std::fmt;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::Pid;

use super::DeviceError;

/// Puts this process in a private mount namespace, so that it never holds a mount of its own
/// device (when the daemon is the last task of a namespace in which /dev/ublkbN is mounted, its
/// exit would flush that filesystem to a device nobody serves any more: a self-deadlock). Call it
/// before any thread is created.
pub fn private_mount_namespace() -> Result<(), DeviceError> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| DeviceError::Io {
        what: "unshare(CLONE_NEWNS) (needs root)",
        err: e.into(),
    })?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| DeviceError::Io {
        what: "mount --make-rprivate /",
        err: e.into(),
    })
}

/// The termination signals, blocked in the calling thread (and so in every thread it creates
/// later); [`TermSignals::wait`] takes them synchronously.
#[derive(Clone, Copy)]
pub struct TermSignals {
    set: SigSet,
}

impl fmt::Debug for TermSignals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TermSignals(SIGTERM, SIGINT, SIGHUP)")
    }
}

impl TermSignals {
    /// The signals that stop the daemon.
    const SIGNALS: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

    /// Blocks SIGTERM, SIGINT and SIGHUP. Call it before any thread is created.
    pub fn block() -> Result<TermSignals, DeviceError> {
        let mut set = SigSet::empty();
        for sig in Self::SIGNALS {
            set.add(sig);
        }
        set.thread_block().map_err(|e| DeviceError::Io {
            what: "cannot block the termination signals",
            err: e.into(),
        })?;
        Ok(TermSignals { set })
    }

    /// Waits for one of the signals and returns its number.
    #[must_use]
    pub fn wait(&self) -> i32 {
        // sigwait fails only for an invalid set, and this one is built from valid signals.
        self.set.wait().map_or(0, |sig| sig as i32)
    }

    /// Sends SIGTERM to this process (taken by whichever thread waits in [`TermSignals::wait`]).
    pub fn raise_term() {
        // Only fails for a bad pid or signal, neither of which this is.
        let _ = kill(Pid::this(), Signal::SIGTERM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_term_signal_is_taken_by_wait() {
        // A thread of its own: blocking signals in a test harness thread would leak into others.
        let sig = std::thread::spawn(|| {
            let signals = TermSignals::block().unwrap();
            // raise() is thread-directed: only this thread can take it, so no other test sees it.
            nix::sys::signal::raise(Signal::SIGHUP).unwrap();
            signals.wait()
        })
        .join()
        .unwrap();
        assert_eq!(sig, Signal::SIGHUP as i32);
    }
}
