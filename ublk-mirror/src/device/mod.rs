//! The block device: `/dev/ublkbN` over a local volume, every write mirrored by the replicator.
//!
//! Built on libublk 0.4.8. Each queue runs on its own thread (created by libublk) with a
//! single-threaded `smol` executor and one task per tag:
//!
//! - READ: served from the local volume through the queue's io_uring.
//! - WRITE: the request's data is copied once into a [`Bytes`] (the rollback log's copy) and
//!   queued to the replicator, which fixes its sequence number; then the local write runs on the
//!   queue's io_uring; the request completes when both the local write finished and the replicator
//!   reports the acknowledgement mode satisfied (in `async` mode: as soon as the op is queued to
//!   the replicator in order, without a round trip through its thread). Enqueue and local write
//!   both happen under the write's byte range in the [`gate::RangeGate`] shared by all queues, so
//!   overlapping writes in flight at once reach the mirror (sequence order) and the local volume
//!   in the same order.
//!   FUA adds a local `fdatasync` (and a mirrored FLUSH when flushes replicate).
//! - FLUSH: a FLUSH barrier to the replicator (which waits for the target when the mode or
//!   `flush_replicates` says so) and a local `fdatasync`.
//! - DISCARD / WRITE_ZEROES: mirrored as such; locally `fallocate` (punch hole, or zero range for
//!   WRITE_ZEROES with NOUNMAP), like the kernel's loop driver; under the range gate as writes.
//! - READ takes no range: a read racing an overlapping write may see either version, as on any
//!   disk.
//!
//! Queue threads never block on the network: the replicator runs on a tokio runtime of its own and
//! the queue tasks only await its futures (bounded `tokio::sync` channels, which need no tokio
//! runtime on the waiting side). A queue thread sleeps in `io_uring_enter`, so a wake-up coming
//! from the replicator's thread (or from another queue releasing a range) must also wake the ring:
//! every replicator and range-gate future is polled through `RingWake`, whose waker writes to a
//! per-queue eventfd on which the queue keeps a POLL_ADD armed.
//!
//! Passthrough (`repl` = `None`, `ublk-mirror start --no-mirror`): the same device without the
//! mirror: writes go straight to the local volume (no copy, no range gate), flushes only sync it.
//! It exists to measure what the mirror itself costs against plain ublk.
//!
//! Stopping: [`Stopper::stop`] (any thread) sends STOP_DEV; the kernel drains the requests in
//! flight (each still completes through the replicator), the pending fetches abort, the queue
//! threads end and [`Device::run`] returns; [`Device::delete`] then removes the device with
//! DEL_DEV_ASYNC (plain DEL_DEV would block while a filesystem on the device is still mounted).

#![allow(unsafe_code)]

pub mod gate;

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDesc, UblkDev, UblkQueue};
use libublk::{sys, UblkError, UblkFlags};
use mirror_core::wire::{Op, PAYLOAD_BYTES_MAX};
use mirror_core::Lba;

use crate::replicator::{Handle, Pending, ReplError};
use gate::{Guard, RangeGate};

/// Largest request the device accepts (the ublk I/O buffer of each tag).
pub const IO_BUF_BYTES: u32 = 512 << 10;
const _: () = assert!(IO_BUF_BYTES <= PAYLOAD_BYTES_MAX);
/// Largest DISCARD / WRITE_ZEROES request (fits the wire's 32-bit length).
const MAX_DISCARD_BYTES: u32 = 1 << 30;
/// Fixed-file index of the backing volume in every queue ring (index 0 is /dev/ublkcN).
const BACKING: types::Fixed = types::Fixed(1);
/// Seconds a queue thread sleeps in io_uring_enter before it looks around anyway.
const IDLE_SECS: u64 = 20;

/// Why the device could not be created, run or deleted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The ublk driver is not there (`modprobe ublk_drv`).
    #[error("ublk is not available: /dev/ublk-control is missing (modprobe ublk_drv; needs Linux 6.0+ and root)")]
    NoDriver,
    /// A ublk control command failed.
    #[error("{what}: {detail}")]
    Ublk {
        /// The operation.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// Bad parameters.
    #[error("{0}")]
    Invalid(String),
    /// An operating system call failed.
    #[error("{what}: {err}")]
    Io {
        /// The operation.
        what: &'static str,
        /// Why.
        err: std::io::Error,
    },
}

/// Describes a libublk error with the errno text when there is one.
fn describe(e: &UblkError) -> String {
    match e {
        UblkError::UringIOError(n) | UblkError::OtherError(n) => {
            let errno = n.checked_abs().unwrap_or(libc::EIO);
            format!(
                "{} (errno {errno})",
                std::io::Error::from_raw_os_error(errno)
            )
        }
        UblkError::IOError(io) => io.to_string(),
        other => format!("{other} ({other:?})"),
    }
}

fn ublk_err(what: &'static str, e: &UblkError) -> DeviceError {
    DeviceError::Ublk {
        what,
        detail: describe(e),
    }
}

/// Parameters of the block device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Device number N of /dev/ublkbN, or `None` for the first free one.
    pub dev_id: Option<u32>,
    /// Name given to the driver (shows in the device's JSON; informational).
    pub name: String,
    /// Hardware queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Logical (and physical) block size: 512 or 4096.
    pub block_bytes: u32,
    /// Size of the device in bytes (a multiple of `block_bytes`).
    pub volume_bytes: u64,
    /// Whether FUA writes also send a mirrored FLUSH (as host flushes do with
    /// `flush_replicates`).
    pub flush_replicates: bool,
}

impl DeviceConfig {
    fn validate(&self) -> Result<u8, DeviceError> {
        let shift = mirror_core::block_shift(self.block_bytes)
            .map_err(|e| DeviceError::Invalid(e.to_string()))?;
        if self.volume_bytes == 0
            || !self
                .volume_bytes
                .is_multiple_of(u64::from(self.block_bytes))
        {
            return Err(DeviceError::Invalid(format!(
                "volume size {} is not a non-zero multiple of the {}-byte block",
                self.volume_bytes, self.block_bytes
            )));
        }
        if self.queues == 0 || self.queues > 64 {
            return Err(DeviceError::Invalid(format!(
                "{} queues: must be between 1 and 64",
                self.queues
            )));
        }
        if self.depth == 0 || self.depth > 1024 {
            return Err(DeviceError::Invalid(format!(
                "queue depth {}: must be between 1 and 1024",
                self.depth
            )));
        }
        if let Some(id) = self.dev_id {
            if i32::try_from(id).is_err() {
                return Err(DeviceError::Invalid(format!("device id {id} is too large")));
            }
        }
        Ok(shift)
    }
}

/// A ublk device added to the driver (ADD_DEV done), not yet started.
pub struct Device {
    ctrl: Arc<UblkCtrl>,
    cfg: DeviceConfig,
    shift: u8,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("dev_id", &self.ctrl.dev_info().dev_id)
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// Stops a running device from any thread.
#[derive(Clone)]
pub struct Stopper {
    ctrl: Arc<UblkCtrl>,
}

impl fmt::Debug for Stopper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stopper")
            .field("dev_id", &self.ctrl.dev_info().dev_id)
            .finish()
    }
}

/// libublk keeps its control ring in a thread-local that only the thread which built the
/// `UblkCtrl` has; any other thread must create its own before sending control commands.
fn ensure_ctrl_ring() -> Result<(), DeviceError> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                    .build(16)
                    .map_err(UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(|e| ublk_err("cannot create the ublk control ring", &e))
}

impl Stopper {
    /// Sends STOP_DEV: requests in flight complete, then [`Device::run`] returns.
    pub fn stop(&self) -> Result<(), DeviceError> {
        ensure_ctrl_ring()?;
        self.ctrl
            .kill_dev()
            .map(|_| ())
            .map_err(|e| ublk_err("STOP_DEV", &e))
    }
}

/// What [`Device::run`] reports once the device is live.
#[derive(Debug, Clone)]
pub struct Started {
    /// N of /dev/ublkbN.
    pub dev_id: u32,
    /// `/dev/ublkbN`.
    pub path: String,
}

impl Device {
    /// Adds the device to the driver (ADD_DEV). Fails if ublk is missing or the id is in use.
    pub fn create(cfg: DeviceConfig) -> Result<Device, DeviceError> {
        let shift = cfg.validate()?;
        if !std::path::Path::new("/dev/ublk-control").exists() {
            return Err(DeviceError::NoDriver);
        }
        let id = cfg
            .dev_id
            .map_or(-1, |id| i32::try_from(id).unwrap_or(i32::MAX));
        if let Some(n) = cfg.dev_id {
            if std::path::Path::new(&format!("/dev/ublkc{n}")).exists() {
                return Err(DeviceError::Invalid(format!(
                    "device id {n} is already in use (/dev/ublkc{n} exists; `ublk-mirror delete` removes a stale one)"
                )));
            }
        }
        let ctrl = UblkCtrlBuilder::default()
            .name(&cfg.name)
            .id(id)
            .nr_queues(cfg.queues)
            .depth(cfg.depth)
            .io_buf_bytes(IO_BUF_BYTES)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV | UblkFlags::UBLK_DEV_F_DEL_DEV_ASYNC)
            .ctrl_flags(0)
            .build()
            .map_err(|e| match e {
                UblkError::UringIOError(n) | UblkError::OtherError(n) if n == -libc::EEXIST => {
                    DeviceError::Invalid(format!("ublk device id {id} is already in use"))
                }
                other => ublk_err("cannot add the ublk device (ADD_DEV)", &other),
            })?;
        Ok(Device {
            ctrl: Arc::new(ctrl),
            cfg,
            shift,
        })
    }

    /// The device number N (/dev/ublkbN).
    #[must_use]
    pub fn dev_id(&self) -> u32 {
        self.ctrl.dev_info().dev_id
    }

    /// A handle that stops the running device from another thread.
    #[must_use]
    pub fn stopper(&self) -> Stopper {
        Stopper {
            ctrl: self.ctrl.clone(),
        }
    }

    /// Starts the device and serves it until it is stopped: `backing` is the local volume,
    /// `repl` the replicator every write goes to (`None`: passthrough, the mirror is off and the
    /// device only serves the local volume). `on_started` runs once /dev/ublkbN exists.
    pub fn run(
        &self,
        backing: &File,
        repl: Option<Handle>,
        on_started: impl FnOnce(Started) + Send + Sync + 'static,
    ) -> Result<(), DeviceError> {
        let fd = backing.as_raw_fd();
        let shift = self.shift;
        let volume_bytes = self.cfg.volume_bytes;
        // Each tag holds at most one range at a time.
        let gate_entries = usize::from(self.cfg.queues) * usize::from(self.cfg.depth);
        let shared = QueueShared {
            repl,
            flush_replicates: self.cfg.flush_replicates,
            gate: RangeGate::new(gate_entries),
        };
        self.ctrl
            .run_target(
                move |dev: &mut UblkDev| init_target(dev, fd, volume_bytes, shift),
                move |qid, dev: &UblkDev| queue_thread(qid, dev, &shared),
                move |ctrl: &UblkCtrl| {
                    on_started(Started {
                        dev_id: ctrl.dev_info().dev_id,
                        path: ctrl.get_bdev_path(),
                    });
                },
            )
            .map(|_| ())
            .map_err(|e| ublk_err("cannot start the ublk device", &e))
    }

    /// Removes the device (DEL_DEV_ASYNC: does not wait for openers such as a mount).
    pub fn delete(&self) -> Result<(), DeviceError> {
        ensure_ctrl_ring()?;
        self.ctrl
            .del_dev_async()
            .map(|_| ())
            .map_err(|e| ublk_err("cannot delete the ublk device", &e))
    }
}

/// Removes a device left behind by a daemon that died (e.g. after SIGKILL).
pub fn delete_stale(dev_id: u32) -> Result<(), DeviceError> {
    let id = i32::try_from(dev_id)
        .map_err(|_| DeviceError::Invalid(format!("device id {dev_id} is too large")))?;
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return Err(DeviceError::NoDriver);
    }
    ensure_ctrl_ring()?;
    let ctrl = UblkCtrl::new_simple(id).map_err(|e| ublk_err("cannot open the ublk device", &e))?;
    ctrl.del_dev()
        .map(|_| ())
        .map_err(|e| ublk_err("cannot delete the ublk device", &e))
}

/// Puts this process in a private mount namespace, so that it never holds a mount of its own
/// device (when the daemon is the last task of a namespace in which /dev/ublkbN is mounted, its
/// exit would flush that filesystem to a device nobody serves any more: a self-deadlock). Call it
/// before any thread is created.
pub fn private_mount_namespace() -> Result<(), DeviceError> {
    // SAFETY: plain system calls with valid (null or NUL-terminated) arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(DeviceError::Io {
                what: "unshare(CLONE_NEWNS) (needs root)",
                err: std::io::Error::last_os_error(),
            });
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(DeviceError::Io {
                what: "mount --make-rprivate /",
                err: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The termination signals, blocked in the calling thread (and so in every thread it creates
/// later); [`TermSignals::wait`] takes them synchronously.
#[derive(Clone, Copy)]
pub struct TermSignals {
    set: libc::sigset_t,
}

impl fmt::Debug for TermSignals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TermSignals(SIGTERM, SIGINT, SIGHUP)")
    }
}

impl TermSignals {
    /// Blocks SIGTERM, SIGINT and SIGHUP. Call it before any thread is created.
    #[must_use]
    pub fn block() -> TermSignals {
        // SAFETY: sigset_t is plain data; the calls get valid pointers.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGHUP);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            TermSignals { set }
        }
    }

    /// Waits for one of the signals and returns its number.
    #[must_use]
    pub fn wait(&self) -> i32 {
        let mut sig: libc::c_int = 0;
        // SAFETY: valid pointers to a sigset and an int.
        unsafe { libc::sigwait(&self.set, &mut sig) };
        sig
    }

    /// Sends SIGTERM to this process (taken by whichever thread waits in [`TermSignals::wait`]).
    pub fn raise_term() {
        // SAFETY: kill(getpid(), SIGTERM) has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// target setup

fn init_target(
    dev: &mut UblkDev,
    backing_fd: i32,
    dev_size: u64,
    shift: u8,
) -> Result<(), UblkError> {
    let info = dev.dev_info;
    let tgt = &mut dev.tgt;
    // fds[0] is /dev/ublkcN; fds[1..] are registered as fixed files in every queue ring.
    let slot = usize::try_from(tgt.nr_fds).map_err(|_| UblkError::InvalidVal)?;
    *tgt.fds.get_mut(slot).ok_or(UblkError::InvalidVal)? = backing_fd;
    tgt.nr_fds += 1;
    tgt.dev_size = dev_size;
    tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            // VOLATILE_CACHE: the block layer sends FLUSH; FUA: writes may carry UBLK_IO_F_FUA.
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: shift,
            io_min_shift: shift,
            max_sectors: info.max_io_buf_bytes >> 9,
            // Always 512-byte units, whatever the block size.
            dev_sectors: dev_size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: 1 << shift,
            max_discard_sectors: MAX_DISCARD_BYTES >> 9,
            max_write_zeroes_sectors: MAX_DISCARD_BYTES >> 9,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    dev.set_target_json(serde_json::json!({ "ublk-mirror": { "dev_size": dev_size } }));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// waking the queue ring from other threads

/// An eventfd that wakes a queue thread sleeping in io_uring_enter.
struct RingBell {
    file: File,
}

impl RingBell {
    fn new() -> std::io::Result<RingBell> {
        // SAFETY: eventfd returns a new descriptor (or -1), which we own from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(RingBell {
            file: File::from(owned),
        })
    }

    fn ring(&self) {
        // EAGAIN (counter saturated) still leaves the fd readable: fine.
        let _ = (&self.file).write(&1u64.to_ne_bytes());
    }

    fn drain(&self) {
        let mut buf = [0u8; 8];
        let _ = (&self.file).read(&mut buf);
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
struct RingWake<F> {
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

/// Keeps a POLL_ADD armed on the bell: its completion wakes io_uring_enter, after which libublk
/// runs every ready task.
async fn bell_task(q: &UblkQueue<'_>, bell: &RingBell) {
    let fd = types::Fd(bell.file.as_raw_fd());
    loop {
        let mask = u32::try_from(libc::POLLIN).unwrap_or(1);
        let r = q
            .ublk_submit_sqe(opcode::PollAdd::new(fd, mask).build())
            .await;
        if r < 0 && r != -libc::EINTR && r != -libc::EAGAIN {
            tracing::error!(errno = -r, "poll on the queue's eventfd failed");
            return;
        }
        bell.drain();
    }
}

// ---------------------------------------------------------------------------------------------
// I/O path

#[derive(Clone)]
struct QueueShared {
    repl: Option<Handle>,
    flush_replicates: bool,
    gate: Arc<RangeGate>,
}

struct QueueCtx {
    /// `None`: passthrough (no mirror).
    repl: Option<Handle>,
    flush_replicates: bool,
    gate: Arc<RangeGate>,
    bell: Arc<RingBell>,
}

impl QueueCtx {
    fn wake<F: Future>(&self, fut: F) -> RingWake<F> {
        RingWake {
            fut: Box::pin(fut),
            bell: self.bell.clone(),
        }
    }

    /// Queues `op` to the replicator; `None` in passthrough.
    async fn enqueue(&self, op: Op) -> Result<Option<Pending>, ReplError> {
        match &self.repl {
            Some(repl) => self.wake(repl.enqueue(op)).await.map(Some),
            None => Ok(None),
        }
    }

    /// Queues a data operation (write, discard, write-zeroes). `None` when nothing is left to
    /// await: passthrough, or `async` mode, where the op is complete once its place in the
    /// sequence is fixed (see [`Handle::acks_on_enqueue`]); this saves the round trip through
    /// the replicator's thread on every write.
    async fn enqueue_data(&self, op: Op) -> Result<Option<Pending>, ReplError> {
        let pending = self.enqueue(op).await?;
        match &self.repl {
            Some(repl) if repl.acks_on_enqueue() => Ok(None),
            _ => Ok(pending),
        }
    }

    async fn complete(&self, pending: Option<Pending>) -> Result<(), ReplError> {
        match pending {
            Some(p) => self.wake(p).await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Waits until no earlier in-flight write overlaps `bytes` at `off` (the release may come
    /// from another queue's thread, hence `RingWake`), and holds the range until the guard drops.
    async fn lock_range(&self, off: u64, bytes: u32) -> Guard {
        self.wake(self.gate.acquire(off..off.saturating_add(u64::from(bytes))))
            .await
    }
}

fn repl_errno(what: &str, e: &ReplError) -> i32 {
    tracing::error!(error = %e, "{what}: mirroring failed; failing the request");
    -libc::EIO
}

/// Submits one SQE on this queue's ring and awaits its result.
async fn sqe(q: &UblkQueue<'_>, e: io_uring::squeue::Entry) -> i32 {
    q.ublk_submit_sqe(e).await
}

fn fdatasync() -> io_uring::squeue::Entry {
    opcode::Fsync::new(BACKING)
        .flags(types::FsyncFlags::DATASYNC)
        .build()
}

/// Reads or writes `bytes` at `off`, looping over short transfers and -EAGAIN.
async fn rw_full(q: &UblkQueue<'_>, write: bool, off: u64, buf: *mut u8, bytes: u32) -> i32 {
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
        let r = sqe(q, e).await;
        if r == -libc::EAGAIN && again < 16 {
            again += 1;
            continue;
        }
        if r < 0 {
            return r;
        }
        if r == 0 {
            if write {
                return -libc::EIO;
            }
            // Past the end of the backing file: zeroes.
            // SAFETY: p..p+len lies inside the tag's buffer.
            unsafe { std::ptr::write_bytes(p, 0, len as usize) };
            break;
        }
        done += r.unsigned_abs();
    }
    i32::try_from(bytes).unwrap_or(i32::MAX)
}

async fn handle_io(q: &UblkQueue<'_>, ctx: &QueueCtx, tag: u16, buf: *mut u8) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let flags = iod.op_flags; // UBLK_IO_F_* are bits of op_flags itself
    let sector = iod.start_sector;
    let off = sector << 9; // 512-byte units even with 4 KiB blocks
    let bytes = iod.nr_sectors << 9;
    if bytes > IO_BUF_BYTES && (op == sys::UBLK_IO_OP_READ || op == sys::UBLK_IO_OP_WRITE) {
        return -libc::EINVAL;
    }

    match op {
        sys::UBLK_IO_OP_READ => rw_full(q, false, off, buf, bytes).await,
        sys::UBLK_IO_OP_WRITE if ctx.repl.is_none() => {
            // Passthrough: no copy, no range gate (like the loop driver).
            let r = rw_full(q, true, off, buf, bytes).await;
            if r >= 0 && flags & sys::UBLK_IO_F_FUA != 0 {
                let s = sqe(q, fdatasync()).await;
                if s < 0 {
                    return s;
                }
            }
            r
        }
        sys::UBLK_IO_OP_WRITE => {
            // The one copy: the rollback log keeps it until the target has it durable.
            // SAFETY: the driver copied `bytes` (<= the buffer size) of write data into buf.
            let data = Bytes::copy_from_slice(unsafe {
                std::slice::from_raw_parts(buf.cast_const(), bytes as usize)
            });
            // Held across the enqueue (which fixes the mirror's order) and the local write, so
            // that an overlapping write in flight cannot land in the other order on one side.
            let range = ctx.lock_range(off, bytes).await;
            let pending = match ctx
                .enqueue_data(Op::Write {
                    lba: Lba(sector),
                    data,
                })
                .await
            {
                Ok(p) => p,
                Err(e) => return repl_errno("write", &e),
            };
            let r = rw_full(q, true, off, buf, bytes).await;
            drop(range);
            if r < 0 {
                tracing::error!(errno = -r, offset = off, bytes, "local write failed");
                // The mirror still gets it; the host sees the local failure.
                let _ = ctx.complete(pending).await;
                return r;
            }
            let fua = flags & sys::UBLK_IO_F_FUA != 0;
            let flush = if fua && ctx.flush_replicates {
                match ctx.enqueue(Op::Flush).await {
                    Ok(p) => p,
                    Err(e) => return repl_errno("write (FUA)", &e),
                }
            } else {
                None
            };
            if fua {
                let s = sqe(q, fdatasync()).await;
                if s < 0 {
                    return s;
                }
            }
            if let Err(e) = ctx.complete(pending).await {
                return repl_errno("write", &e);
            }
            if flush.is_some() {
                if let Err(e) = ctx.complete(flush).await {
                    return repl_errno("write (FUA)", &e);
                }
            }
            r
        }
        sys::UBLK_IO_OP_FLUSH => {
            let pending = match ctx.enqueue(Op::Flush).await {
                Ok(p) => p,
                Err(e) => return repl_errno("flush", &e),
            };
            let r = sqe(q, fdatasync()).await;
            if let Err(e) = ctx.complete(pending).await {
                return repl_errno("flush", &e);
            }
            r
        }
        sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
            let zeroes = op == sys::UBLK_IO_OP_WRITE_ZEROES;
            let lba = Lba(sector);
            let mirrored = if zeroes {
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
            let range = ctx.lock_range(off, bytes).await;
            let pending = match ctx.enqueue_data(mirrored).await {
                Ok(p) => p,
                Err(e) => return repl_errno("discard", &e),
            };
            // Like the loop driver: punch a hole, or zero the range for WRITE_ZEROES + NOUNMAP.
            let mode = libc::FALLOC_FL_KEEP_SIZE
                | if zeroes && flags & sys::UBLK_IO_F_NOUNMAP != 0 {
                    libc::FALLOC_FL_ZERO_RANGE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE
                };
            let mut r = sqe(
                q,
                opcode::Fallocate::new(BACKING, u64::from(bytes))
                    .offset(off)
                    .mode(mode)
                    .build(),
            )
            .await;
            drop(range);
            if r == -libc::EOPNOTSUPP && !zeroes {
                r = 0; // discard is advisory
            }
            if let Err(e) = ctx.complete(pending).await {
                return repl_errno("discard", &e);
            }
            r
        }
        _ => -libc::EINVAL,
    }
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

fn queue_thread(qid: u16, dev: &UblkDev, shared: &QueueShared) {
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
        repl: shared.repl.clone(),
        flush_replicates: shared.flush_replicates,
        gate: shared.gate.clone(),
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
