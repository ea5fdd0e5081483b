//! Waking a queue thread from other threads. A queue thread sleeps in `io_uring_enter`, so a
//! wake-up from the replicator's thread (or from another queue releasing a range) must also wake
//! the ring: such futures are polled through [`RingWake`], whose waker writes to the queue's
//! eventfd, on which [`bell_task`] keeps a POLL_ADD armed.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use io_uring::{opcode, types};
use libublk::io::UblkQueue;
use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::host_write::CrossWake;

/// An eventfd that wakes a queue thread sleeping in io_uring_enter.
#[derive(Debug)]
pub(super) struct RingBell {
    fd: EventFd,
}

impl RingBell {
    pub(super) fn new() -> Result<RingBell, Errno> {
        let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(RingBell { fd })
    }

    fn ring(&self) {
        // EAGAIN (counter saturated) still leaves the fd readable: fine.
        let _ = self.fd.write(1);
    }

    fn drain(&self) {
        // EAGAIN (nothing to read) is fine too.
        let _ = self.fd.read();
    }
}

struct BellWaker {
    inner: Waker,
    bell: Arc<RingBell>,
}

impl Wake for BellWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Schedule the task first, then wake the ring so the executor runs it.
        self.inner.wake_by_ref();
        self.bell.ring();
    }
}

/// Polls a future that is woken from another thread (the replicator's) so that its wake-up also
/// rings the queue's bell.
pub(super) struct RingWake<F> {
    fut: Pin<Box<F>>,
    bell: Arc<RingBell>,
}

impl<F: Future> Future for RingWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let waker = Waker::from(Arc::new(BellWaker {
            inner: cx.waker().clone(),
            bell: self.bell.clone(),
        }));
        let mut cx2 = Context::from_waker(&waker);
        self.fut.as_mut().poll(&mut cx2)
    }
}

impl CrossWake for Arc<RingBell> {
    fn cross<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> {
        RingWake {
            fut: Box::pin(fut),
            bell: self.clone(),
        }
    }
}

/// Keeps a POLL_ADD armed on the bell: its completion wakes io_uring_enter, after which libublk
/// runs every ready task.
pub(super) async fn bell_task(q: &UblkQueue<'_>, bell: &RingBell) {
    let fd = types::Fd(bell.fd.as_raw_fd());
    let mask = u32::from(PollFlags::POLLIN.bits().unsigned_abs());
    loop {
        let r = q
            .ublk_submit_sqe(opcode::PollAdd::new(fd, mask).build())
            .await;
        if r < 0 && r != -(Errno::EINTR as i32) && r != -(Errno::EAGAIN as i32) {
            tracing::error!(errno = -r, "poll on the queue's eventfd failed");
            return;
        }
        bell.drain();
    }
}
