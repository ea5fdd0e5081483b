//! A queue thread: one task per tag serving the driver's requests on the queue's io_uring, and
//! the task that keeps the queue's bell armed. Mirrored operations go through
//! [`crate::host_write`]; what a failure completes with is [`super::request`]'s.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, UblkDev, UblkQueue};
use libublk::{sys, UblkError};
use mirror_core::wire::Op;
use mirror_core::{Lba, SECTOR_BYTES};
use nix::errno::Errno;
use nix::fcntl::FallocateFlags;

use super::bell::{bell_task, RingBell};
use super::describe;
use super::gate::RangeGate;
use super::request::{self, Kind, Limits, Request, RequestError};
use crate::host_write::{self, Submitted};
use crate::replicator::{Handle, Pending};

/// Fixed-file index of the backing volume in every queue ring (index 0 is /dev/ublkcN).
const BACKING: types::Fixed = types::Fixed(1);
/// Seconds a queue thread sleeps in io_uring_enter before it looks around anyway.
const IDLE_SECS: u64 = 20;
/// Retries of a read or write that the backing file answers with EAGAIN.
const AGAIN_MAX: u32 = 16;

/// What every queue thread shares.
#[derive(Clone)]
pub(super) struct QueueShared {
    /// `None`: passthrough (no mirror).
    pub(super) repl: Option<Handle>,
    pub(super) flush_replicates: bool,
    pub(super) gate: Arc<RangeGate>,
    pub(super) limits: Limits,
}

struct QueueCtx {
    shared: QueueShared,
    bell: Arc<RingBell>,
}

/// Submits one SQE on this queue's ring and awaits its result.
async fn sqe(q: &UblkQueue<'_>, e: io_uring::squeue::Entry) -> i32 {
    q.ublk_submit_sqe(e).await
}

/// A ring result: the non-negative value, or the errno.
fn ring_result(r: i32) -> Result<u32, Errno> {
    u32::try_from(r).map_err(|_| Errno::from_raw(r.saturating_neg()))
}

async fn fdatasync(q: &UblkQueue<'_>) -> Result<(), Errno> {
    let e = opcode::Fsync::new(BACKING)
        .flags(types::FsyncFlags::DATASYNC)
        .build();
    ring_result(sqe(q, e).await).map(|_| ())
}

/// Reads or writes `bytes` at `off`, looping over short transfers and EAGAIN.
async fn rw_full(
    q: &UblkQueue<'_>,
    write: bool,
    off: u64,
    buf: *mut u8,
    bytes: u32,
) -> Result<u32, Errno> {
    let mut done: u32 = 0;
    let mut again = 0;
    while done < bytes {
        // SAFETY: done < bytes <= the tag's buffer size.
        let p = unsafe { buf.add(done as usize) };
        let len = bytes - done;
        let o = off + u64::from(done);
        let e = if write {
            opcode::Write::new(BACKING, p, len).offset(o).build()
        } else {
            opcode::Read::new(BACKING, p, len).offset(o).build()
        };
        match ring_result(sqe(q, e).await) {
            Err(Errno::EAGAIN) if again < AGAIN_MAX => again += 1,
            Err(errno) => return Err(errno),
            // A write that makes no progress would loop forever.
            Ok(0) if write => return Err(Errno::EIO),
            Ok(0) => {
                // Past the end of the backing file: zeroes.
                // SAFETY: p..p+len lies inside the tag's buffer.
                unsafe { std::ptr::write_bytes(p, 0, len as usize) };
                break;
            }
            Ok(n) => done += n,
        }
    }
    Ok(bytes)
}

/// Punches a hole (discard) or zeroes a range, like the loop driver; a discard is advisory. A
/// backing without zero ranges (tmpfs) gets a hole for WRITE_ZEROES with NOUNMAP instead: it
/// reads as zeroes too, and the local volume must hold what the mirror sent the peer.
async fn deallocate(
    q: &UblkQueue<'_>,
    zeroes: bool,
    nounmap: bool,
    off: u64,
    bytes: u32,
) -> Result<(), Errno> {
    let zero_range = zeroes && nounmap;
    let mut mode = if zero_range {
        FallocateFlags::FALLOC_FL_ZERO_RANGE
    } else {
        FallocateFlags::FALLOC_FL_PUNCH_HOLE
    };
    loop {
        let e = opcode::Fallocate::new(BACKING, u64::from(bytes))
            .offset(off)
            .mode((mode | FallocateFlags::FALLOC_FL_KEEP_SIZE).bits())
            .build();
        match ring_result(sqe(q, e).await) {
            Ok(_) => return Ok(()),
            Err(Errno::EOPNOTSUPP) if mode == FallocateFlags::FALLOC_FL_ZERO_RANGE => {
                mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE;
            }
            Err(Errno::EOPNOTSUPP) if !zeroes => return Ok(()),
            Err(errno) => return Err(errno),
        }
    }
}

/// Serves a request without the mirror: no copy, no range gate (like the loop driver).
async fn passthrough(
    q: &UblkQueue<'_>,
    req: Request,
    flags: u32,
    buf: *mut u8,
) -> Result<u32, Errno> {
    let Request {
        kind,
        offset_bytes: off,
        bytes,
    } = req;
    match kind {
        Kind::Read => rw_full(q, false, off, buf, bytes).await,
        Kind::Write => {
            rw_full(q, true, off, buf, bytes).await?;
            if flags & sys::UBLK_IO_F_FUA != 0 {
                fdatasync(q).await?;
            }
            Ok(bytes)
        }
        Kind::Flush => fdatasync(q).await.map(|()| 0),
        Kind::Discard | Kind::WriteZeroes => {
            let zeroes = kind == Kind::WriteZeroes;
            let nounmap = flags & sys::UBLK_IO_F_NOUNMAP != 0;
            deallocate(q, zeroes, nounmap, off, bytes).await.map(|()| 0)
        }
    }
}

impl QueueCtx {
    /// A mirrored operation through the host-write path.
    async fn submit<Fut>(
        &self,
        repl: &Handle,
        op: Op,
        local: impl FnOnce() -> Fut,
    ) -> Result<Submitted<Pending>, RequestError>
    where
        Fut: std::future::Future<Output = Result<(), Errno>>,
    {
        Ok(host_write::submit(&self.bell, repl, &self.shared.gate, op, local).await?)
    }

    async fn complete(&self, s: Submitted<Pending>) -> Result<(), RequestError> {
        s.complete(&self.bell).await?;
        Ok(())
    }

    /// Serves a checked request: its length, or why it failed.
    async fn serve(
        &self,
        q: &UblkQueue<'_>,
        req: Request,
        flags: u32,
        buf: *mut u8,
    ) -> Result<u32, RequestError> {
        let Request {
            kind,
            offset_bytes: off,
            bytes,
        } = req;
        let fua = flags & sys::UBLK_IO_F_FUA != 0;
        let lba = Lba(off / SECTOR_BYTES);
        let Some(repl) = &self.shared.repl else {
            return passthrough(q, req, flags, buf)
                .await
                .map_err(RequestError::Local);
        };
        match kind {
            Kind::Read => rw_full(q, false, off, buf, bytes)
                .await
                .map_err(RequestError::Local),
            Kind::Write => {
                // The one copy: the rollback log keeps it until the target has it durable.
                // SAFETY: the driver copied `bytes` (<= the buffer size) of write data into buf.
                let data = Bytes::copy_from_slice(unsafe {
                    std::slice::from_raw_parts(buf.cast_const(), bytes as usize)
                });
                let write = self
                    .submit(repl, Op::Write { lba, data }, || async {
                        rw_full(q, true, off, buf, bytes).await.map(|_| ())
                    })
                    .await?;
                let flush = match (fua, self.shared.flush_replicates) {
                    (true, true) => Some(self.submit(repl, Op::Flush, || fdatasync(q)).await?),
                    (true, false) => {
                        fdatasync(q).await.map_err(RequestError::Local)?;
                        None
                    }
                    (false, _) => None,
                };
                self.complete(write).await?;
                if let Some(flush) = flush {
                    self.complete(flush).await?;
                }
                Ok(bytes)
            }
            Kind::Flush => {
                let flush = self.submit(repl, Op::Flush, || fdatasync(q)).await?;
                self.complete(flush).await.map(|()| 0)
            }
            Kind::Discard | Kind::WriteZeroes => {
                let zeroes = kind == Kind::WriteZeroes;
                let nounmap = flags & sys::UBLK_IO_F_NOUNMAP != 0;
                let op = if zeroes {
                    Op::WriteZeroes {
                        lba,
                        len_bytes: bytes,
                    }
                } else {
                    Op::Discard {
                        lba,
                        len_bytes: bytes,
                    }
                };
                let done = self
                    .submit(repl, op, || deallocate(q, zeroes, nounmap, off, bytes))
                    .await?;
                self.complete(done).await.map(|()| 0)
            }
        }
    }
}

async fn handle_io(q: &UblkQueue<'_>, ctx: &QueueCtx, tag: u16, buf: *mut u8) -> i32 {
    let iod = q.get_iod(tag);
    // UBLK_IO_F_* are bits of op_flags itself.
    let flags = iod.op_flags;
    let checked = request::check(
        flags & 0xff,
        iod.start_sector,
        iod.nr_sectors,
        &ctx.shared.limits,
    );
    let result = match checked {
        Ok(req) => ctx.serve(q, req, flags, buf).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        tracing::error!(
            error = %e,
            sector = iod.start_sector,
            sectors = iod.nr_sectors,
            op = flags & 0xff,
            "request failed"
        );
    }
    request::completion(&result)
}

/// One task per tag: FETCH once, then loop { handle; COMMIT_AND_FETCH }.
async fn io_task(q: &UblkQueue<'_>, ctx: &QueueCtx, tag: u16) -> Result<(), UblkError> {
    let buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = handle_io(q, ctx, tag, buf.as_mut_ptr()).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

pub(super) fn queue_thread(qid: u16, dev: &UblkDev, shared: &QueueShared) {
    let bell = match RingBell::new() {
        Ok(b) => Arc::new(b),
        Err(e) => {
            tracing::error!(qid, error = %e, "cannot create the queue's eventfd");
            return;
        }
    };
    let q_rc = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(qid, error = %describe(&e), "cannot set up the ublk queue");
            return;
        }
    };
    let ctx = Rc::new(QueueCtx {
        shared: shared.clone(),
        bell: bell.clone(),
    });
    let exe_rc = Rc::new(smol::LocalExecutor::new());
    let exe = exe_rc.clone();
    let mut tasks = Vec::new();
    for tag in q_rc.tags() {
        let q = q_rc.clone();
        let ctx = ctx.clone();
        tasks.push(exe.spawn(async move {
            match io_task(&q, &ctx, tag).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!(qid, tag, error = %describe(&e), "ublk I/O task failed"),
            }
        }));
    }
    let q = q_rc.clone();
    let bell_task_handle = exe.spawn(async move { bell_task(&q, &bell).await });
    smol::block_on(exe_rc.run(async move {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(smol::Task::is_finished);
        if let Err(e) =
            libublk::wait_and_handle_io_events(&q_rc, Some(IDLE_SECS), run_ops, done).await
        {
            tracing::error!(qid, error = %describe(&e), "ublk queue loop failed");
        }
    }));
    drop(bell_task_handle);
}
