//! The one path of a host operation, shared by the ublk device and `loadgen` so that the
//! host-level benchmark measures what the device does.
//!
//! Order ([`submit`], then [`Submitted::complete`]):
//! 1. take the operation's byte range in the [`RangeGate`] (a flush takes none);
//! 2. enqueue it to the mirror, which fixes its place in the sequence and returns once the stored
//!    write intent holds its chunks (so a crash from then on cannot lose where it went);
//! 3. do the local half (write, discard, sync: the caller's closure);
//! 4. release the range: overlapping operations so reach both sides in the same order;
//! 5. complete once the mode is satisfied: at once for a data operation when the mirror
//!    [acks on enqueue](Mirror::acks_on_enqueue) (`async`), else when its pending resolves.
//!
//! How the local half runs and how a future woken from another thread wakes the caller's
//! executor are the caller's: the device's io_uring queue ring ([`CrossWake`] rings its eventfd),
//! loadgen's positioned write on a tokio task ([`Direct`]).

use std::future::Future;
use std::sync::Arc;

use mirror_core::wire::Op;
use mirror_core::Seq;
use nix::errno::Errno;

use crate::device::gate::RangeGate;
use crate::replicator::{Handle, Pending, ReplError};

/// Awaits futures that are woken from other threads (the replicator's, another queue's).
pub trait CrossWake {
    /// `fut`, wrapped so that its wake-up reaches the caller's executor.
    fn cross<F: Future>(&self, fut: F) -> impl Future<Output = F::Output>;
}

/// For executors whose wakers work from any thread (tokio): the future as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Direct;

impl CrossWake for Direct {
    fn cross<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> {
        fut
    }
}

/// Where host operations are mirrored: the replicator's [`Handle`] (a fake in tests).
pub trait Mirror {
    /// Resolves when the operation completes per the mode, with its sequence number.
    type Pending: Future<Output = Result<Seq, ReplError>>;
    /// Queues `op`; once this resolves its place in the sequence is fixed and the stored write
    /// intent holds its chunks (it may reach the local volume).
    fn enqueue(&self, op: Op) -> impl Future<Output = Result<Self::Pending, ReplError>>;
    /// Whether a data operation is complete as soon as it is enqueued (`async`).
    fn acks_on_enqueue(&self) -> bool;
}

impl Mirror for Handle {
    type Pending = Pending;

    fn enqueue(&self, op: Op) -> impl Future<Output = Result<Pending, ReplError>> {
        Handle::enqueue(self, op)
    }

    fn acks_on_enqueue(&self) -> bool {
        Handle::acks_on_enqueue(self)
    }
}

/// Why a host operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostWriteError {
    /// The mirror refused or lost the operation.
    #[error("mirroring failed: {0}")]
    Mirror(#[source] ReplError),
    /// The local half failed with this errno (the mirror still has the operation).
    #[error("local volume: {}", .0.desc())]
    Local(Errno),
}

/// An operation enqueued and done locally; [`Submitted::complete`] waits for the mode.
#[derive(Debug)]
#[must_use = "the host may only be told once the operation is complete"]
pub struct Submitted<P> {
    pending: P,
    /// False when the mode is already satisfied (the async fast path).
    wait: bool,
}

/// What [`Submitted::complete`] leaves behind.
#[derive(Debug)]
pub enum Completed<P> {
    /// The mode was satisfied by waiting; the operation's sequence number.
    Waited(Seq),
    /// Complete at enqueue (async); the pending still resolves with the sequence number, for a
    /// caller that wants it.
    Early(P),
}

impl<P: Future<Output = Result<Seq, ReplError>>> Submitted<P> {
    /// Whether the host may be told already, without waiting for the mirror.
    #[must_use]
    pub fn acked(&self) -> bool {
        !self.wait
    }

    /// Resolves when the host may be told the operation is done.
    pub async fn complete(self, wake: &impl CrossWake) -> Result<Completed<P>, HostWriteError> {
        if self.wait {
            let seq = wake
                .cross(self.pending)
                .await
                .map_err(HostWriteError::Mirror)?;
            Ok(Completed::Waited(seq))
        } else {
            Ok(Completed::Early(self.pending))
        }
    }
}

/// Steps 1 to 4 (see the module docs): range, enqueue, `local`, release.
pub async fn submit<W, M, L, Fut>(
    wake: &W,
    mirror: &M,
    gate: &Arc<RangeGate>,
    op: Op,
    local: L,
) -> Result<Submitted<M::Pending>, HostWriteError>
where
    W: CrossWake,
    M: Mirror,
    L: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), Errno>>,
{
    let range = op.range();
    // Held across the enqueue (which fixes the mirror's order) and the local half, so that an
    // overlapping operation in flight cannot land in the other order on one side.
    let guard = match &range {
        Some(r) => Some(
            wake.cross(gate.acquire(r.offset_bytes..r.offset_bytes.saturating_add(r.len_bytes)))
                .await,
        ),
        None => None,
    };
    let pending = wake
        .cross(mirror.enqueue(op))
        .await
        .map_err(HostWriteError::Mirror)?;
    let local = local().await;
    drop(guard);
    // A flush may still wait for the target (flush_replicates), whatever the mode.
    let wait = range.is_none() || !mirror.acks_on_enqueue();
    if let Err(errno) = local {
        // The mirror has it; the host sees the local failure once the mirror is done with it.
        if wait {
            let _ = wake.cross(pending).await;
        }
        return Err(HostWriteError::Local(errno));
    }
    Ok(Submitted { pending, wait })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mirror_core::Lba;
    use std::cell::RefCell;
    use std::pin::Pin;
    use std::rc::Rc;
    use std::task::{Context, Poll};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Call {
        Enqueue,
        /// The local half; whether the gate held a range meanwhile.
        Local {
            range_held: bool,
        },
        /// The pending was awaited; whether the gate held a range meanwhile.
        Wait {
            range_held: bool,
        },
    }

    type Calls = Rc<RefCell<Vec<Call>>>;

    struct FakeMirror {
        calls: Calls,
        gate: Arc<RangeGate>,
        acks_on_enqueue: bool,
        refuse: bool,
    }

    struct FakePending {
        calls: Calls,
        gate: Arc<RangeGate>,
    }

    impl Future for FakePending {
        type Output = Result<Seq, ReplError>;
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
            let range_held = !self.gate.is_empty();
            self.calls.borrow_mut().push(Call::Wait { range_held });
            Poll::Ready(Ok(Seq(7)))
        }
    }

    impl Mirror for FakeMirror {
        type Pending = FakePending;
        async fn enqueue(&self, _op: Op) -> Result<FakePending, ReplError> {
            if self.refuse {
                return Err(ReplError::Shutdown);
            }
            self.calls.borrow_mut().push(Call::Enqueue);
            Ok(FakePending {
                calls: self.calls.clone(),
                gate: self.gate.clone(),
            })
        }
        fn acks_on_enqueue(&self) -> bool {
            self.acks_on_enqueue
        }
    }

    fn fake(acks_on_enqueue: bool) -> FakeMirror {
        FakeMirror {
            calls: Calls::default(),
            gate: RangeGate::new(4),
            acks_on_enqueue,
            refuse: false,
        }
    }

    fn write() -> Op {
        Op::Write {
            lba: Lba(8),
            data: Bytes::from(vec![1u8; 4096]),
        }
    }

    /// Runs one operation through the path with a local half that records itself.
    fn run(m: &FakeMirror, op: Op, local: Result<(), Errno>) -> Result<bool, HostWriteError> {
        smol::block_on(async {
            let submitted = submit(&Direct, m, &m.gate, op, || async {
                let range_held = !m.gate.is_empty();
                m.calls.borrow_mut().push(Call::Local { range_held });
                local
            })
            .await?;
            let acked = submitted.acked();
            match submitted.complete(&Direct).await? {
                Completed::Waited(seq) => assert_eq!(seq, Seq(7)),
                Completed::Early(_) => assert!(acked),
            }
            Ok(acked)
        })
    }

    #[test]
    fn async_writes_enqueue_then_write_locally_under_the_range_and_never_wait() {
        let m = fake(true);
        assert!(run(&m, write(), Ok(())).unwrap());
        assert_eq!(
            *m.calls.borrow(),
            [Call::Enqueue, Call::Local { range_held: true }]
        );
        assert!(m.gate.is_empty());
    }

    #[test]
    fn other_modes_wait_for_the_mirror_after_releasing_the_range() {
        let m = fake(false);
        assert!(!run(&m, write(), Ok(())).unwrap());
        assert_eq!(
            *m.calls.borrow(),
            [
                Call::Enqueue,
                Call::Local { range_held: true },
                Call::Wait { range_held: false }
            ]
        );
    }

    #[test]
    fn a_flush_takes_no_range_and_waits_even_in_async() {
        let m = fake(true);
        assert!(!run(&m, Op::Flush, Ok(())).unwrap());
        assert_eq!(
            *m.calls.borrow(),
            [
                Call::Enqueue,
                Call::Local { range_held: false },
                Call::Wait { range_held: false }
            ]
        );
    }

    #[test]
    fn a_refused_enqueue_skips_the_local_write() {
        let mut m = fake(true);
        m.refuse = true;
        let e = run(&m, write(), Ok(())).unwrap_err();
        assert!(
            matches!(e, HostWriteError::Mirror(ReplError::Shutdown)),
            "{e}"
        );
        assert!(m.calls.borrow().is_empty());
        assert!(m.gate.is_empty());
    }

    #[test]
    fn a_local_failure_is_reported_after_the_mirror_is_done_with_it() {
        let m = fake(false);
        let e = run(&m, write(), Err(Errno::ENOSPC)).unwrap_err();
        assert!(matches!(e, HostWriteError::Local(Errno::ENOSPC)), "{e}");
        assert_eq!(
            *m.calls.borrow(),
            [
                Call::Enqueue,
                Call::Local { range_held: true },
                Call::Wait { range_held: false }
            ]
        );
    }
}
