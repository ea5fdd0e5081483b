//! The block device: `/dev/ublkbN` over a local volume, every write mirrored by the replicator.
//!
//! Built on libublk 0.4.8. Each queue runs on its own thread (created by libublk) with a
//! single-threaded `smol` executor and one task per tag:
//!
//! - READ: served from the local volume through the queue's io_uring.
//! - WRITE: the request's data is copied once into a `Bytes` (the rollback log's copy) and goes
//!   through [`crate::host_write`], the path `loadgen` takes too: under the write's byte range in
//!   the [`gate::RangeGate`] shared by all queues, queued to the replicator (which fixes its
//!   sequence number), then written locally on the queue's io_uring; the request completes when
//!   the replicator reports the acknowledgement mode satisfied (in `async` mode: as soon as the op
//!   is queued in order, without a round trip through its thread). Overlapping writes in flight
//!   at once so reach the mirror (sequence order) and the local volume in the same order.
//!   FUA adds a local `fdatasync` (and a mirrored FLUSH when flushes replicate).
//! - FLUSH: a FLUSH barrier to the replicator (which waits for the target when the mode or
//!   `flush_replicates` says so) and a local `fdatasync`.
//! - DISCARD / WRITE_ZEROES: mirrored as such; locally `fallocate` (punch hole, or zero range for
//!   WRITE_ZEROES with NOUNMAP, a hole where the backing has no zero ranges), like the kernel's
//!   loop driver; under the range gate as writes.
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
//!
//! A failed request completes with the errno a block device user expects (invalid request:
//! EINVAL, unsupported operation: EOPNOTSUPP, the local volume's own errno such as ENOSPC,
//! mirroring failed: EIO); [`request`] decides it.
//!
//! Files: this one (control device: add, run, stop, delete), `queue.rs` (a queue thread and its
//! request handling), [`request`] (checking a request, the errno of a failure), `bell.rs` (the
//! eventfd that wakes a queue ring), [`system`] (signals, the mount namespace), [`gate`].

#![allow(unsafe_code)]

mod bell;
pub mod gate;
mod queue;
pub mod request;
pub mod system;

use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkError, UblkFlags};
use mirror_core::wire::PAYLOAD_BYTES_MAX;
use mirror_core::BadBlockSize;
use nix::errno::Errno;

use crate::replicator::Handle;
pub use system::{private_mount_namespace, TermSignals};

/// Largest request the device accepts (the ublk I/O buffer of each tag).
pub const IO_BUF_BYTES: u32 = 512 << 10;
const _: () = assert!(IO_BUF_BYTES <= PAYLOAD_BYTES_MAX);
/// Largest DISCARD / WRITE_ZEROES request (fits the wire's 32-bit length).
const MAX_DISCARD_BYTES: u32 = 1 << 30;
/// A daemon that dies leaves its device quiesced, holding new requests, and the next daemon
/// takes it over ([`Device::recover`]); the requests the dead one had not completed are
/// reissued to it (a write written twice leaves the same bytes).
const RECOVERY_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
/// Most queues and most requests per queue the device accepts.
const QUEUES_MAX: u16 = 64;
const DEPTH_MAX: u16 = 1024;

/// Why the device could not be created, run or deleted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The ublk driver is not there (`modprobe ublk_drv`).
    #[error("ublk is not available: /dev/ublk-control is missing (modprobe ublk_drv; needs Linux 6.0+ and root)")]
    NoDriver,
    /// A ublk control command failed.
    #[error("{what}: {}", describe(.source))]
    Ublk {
        /// The operation.
        what: &'static str,
        /// Why.
        source: UblkError,
    },
    /// The block size is neither 512 nor 4096.
    #[error(transparent)]
    BlockSize(#[from] BadBlockSize),
    /// The volume is empty or not a whole number of blocks.
    #[error(
        "volume size {volume_bytes} is not a non-zero multiple of the {block_bytes}-byte block"
    )]
    VolumeSize {
        /// The volume's size.
        volume_bytes: u64,
        /// The block size.
        block_bytes: u32,
    },
    /// Too few or too many queues.
    #[error("{0} queues: must be between 1 and {QUEUES_MAX}")]
    Queues(u16),
    /// Too small or too large a queue depth.
    #[error("queue depth {0}: must be between 1 and {DEPTH_MAX}")]
    Depth(u16),
    /// A device number beyond what the driver takes.
    #[error("device id {0} is too large")]
    DevIdTooLarge(u32),
    /// The requested device number is taken.
    #[error("device id {0} is already in use (/dev/ublkc{0} exists; `ublk-mirror delete` removes a stale one)")]
    DevIdInUse(u32),
    /// A device left behind cannot be taken over.
    #[error("cannot recover /dev/ublkb{id}: {why}")]
    NotRecoverable {
        /// N of /dev/ublkbN.
        id: u32,
        /// What the kernel reports of it.
        why: String,
    },
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
            let errno = Errno::from_raw(n.checked_abs().unwrap_or(Errno::EIO as i32));
            format!("{} (errno {})", errno.desc(), errno as i32)
        }
        UblkError::IOError(io) => io.to_string(),
        other => format!("{other} ({other:?})"),
    }
}

fn ublk_err(what: &'static str, source: UblkError) -> DeviceError {
    DeviceError::Ublk { what, source }
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
        let shift = mirror_core::block_shift(self.block_bytes)?;
        if self.volume_bytes == 0
            || !self
                .volume_bytes
                .is_multiple_of(u64::from(self.block_bytes))
        {
            return Err(DeviceError::VolumeSize {
                volume_bytes: self.volume_bytes,
                block_bytes: self.block_bytes,
            });
        }
        if !(1..=QUEUES_MAX).contains(&self.queues) {
            return Err(DeviceError::Queues(self.queues));
        }
        if !(1..=DEPTH_MAX).contains(&self.depth) {
            return Err(DeviceError::Depth(self.depth));
        }
        if let Some(id) = self.dev_id {
            if i32::try_from(id).is_err() {
                return Err(DeviceError::DevIdTooLarge(id));
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
    .map_err(|e| ublk_err("cannot create the ublk control ring", e))
}

impl Stopper {
    /// Sends STOP_DEV: requests in flight complete, then [`Device::run`] returns.
    pub fn stop(&self) -> Result<(), DeviceError> {
        ensure_ctrl_ring()?;
        self.ctrl
            .kill_dev()
            .map(|_| ())
            .map_err(|e| ublk_err("STOP_DEV", e))
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

/// The control device of `cfg`'s geometry as device `id` (-1: the driver picks), added or
/// recovered as `dev_flags` say; always with user recovery.
fn build_ctrl(cfg: &DeviceConfig, id: i32, dev_flags: UblkFlags) -> Result<UblkCtrl, UblkError> {
    UblkCtrlBuilder::default()
        .name(&cfg.name)
        .id(id)
        .nr_queues(cfg.queues)
        .depth(cfg.depth)
        .io_buf_bytes(IO_BUF_BYTES)
        .dev_flags(dev_flags)
        .ctrl_flags(RECOVERY_FLAGS)
        .build()
}

fn state_name(state: u16) -> String {
    match u32::from(state) {
        sys::UBLK_S_DEV_DEAD => "not started".into(),
        sys::UBLK_S_DEV_LIVE => "live".into(),
        sys::UBLK_S_DEV_QUIESCED => "quiesced".into(),
        sys::UBLK_S_DEV_FAIL_IO => "failing I/O".into(),
        n => format!("in state {n}"),
    }
}

/// Whether device `id` exists and waits, quiesced, for a daemon to take it over.
#[must_use]
pub fn is_quiesced(id: u32) -> bool {
    let Ok(n) = i32::try_from(id) else {
        return false;
    };
    if driver_present().is_err() || ensure_ctrl_ring().is_err() {
        return false;
    }
    UblkCtrl::new_simple(n).is_ok_and(|c| u32::from(c.dev_info().state) == sys::UBLK_S_DEV_QUIESCED)
}

fn driver_present() -> Result<(), DeviceError> {
    if std::path::Path::new("/dev/ublk-control").exists() {
        Ok(())
    } else {
        Err(DeviceError::NoDriver)
    }
}

impl Device {
    /// Adds the device to the driver (ADD_DEV). Fails if ublk is missing or the id is in use.
    pub fn create(cfg: DeviceConfig) -> Result<Device, DeviceError> {
        let shift = cfg.validate()?;
        driver_present()?;
        let id = cfg
            .dev_id
            .map_or(-1, |id| i32::try_from(id).unwrap_or(i32::MAX));
        if let Some(n) = cfg.dev_id {
            if std::path::Path::new(&format!("/dev/ublkc{n}")).exists() {
                return Err(DeviceError::DevIdInUse(n));
            }
        }
        let ctrl = build_ctrl(
            &cfg,
            id,
            UblkFlags::UBLK_DEV_F_ADD_DEV | UblkFlags::UBLK_DEV_F_DEL_DEV_ASYNC,
        )
        .map_err(|e| match (e, cfg.dev_id) {
            (UblkError::UringIOError(n) | UblkError::OtherError(n), Some(id))
                if n == -(Errno::EEXIST as i32) =>
            {
                DeviceError::DevIdInUse(id)
            }
            (other, _) => ublk_err("cannot add the ublk device (ADD_DEV)", other),
        })?;
        Ok(Device {
            ctrl: Arc::new(ctrl),
            cfg,
            shift,
        })
    }

    /// Takes over device `id`, which a daemon that died left quiesced (ublk user recovery):
    /// the same /dev/ublkbN, so a filesystem mounted on it goes on; the requests the kernel held
    /// meanwhile, and those the dead daemon had not completed (reissued), are served by this
    /// process once [`Device::run`] starts it. `cfg` must have the device's queues and depth.
    pub fn recover(id: u32, cfg: DeviceConfig) -> Result<Device, DeviceError> {
        let shift = cfg.validate()?;
        driver_present()?;
        ensure_ctrl_ring()?;
        let n = i32::try_from(id).map_err(|_| DeviceError::DevIdTooLarge(id))?;
        let not = |why: String| DeviceError::NotRecoverable { id, why };
        let left = UblkCtrl::new_simple(n).map_err(|e| not(describe(&e)))?;
        let info = left.dev_info();
        if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
            return Err(not("it was created without user recovery".into()));
        }
        if u32::from(info.state) != sys::UBLK_S_DEV_QUIESCED {
            return Err(not(format!(
                "it is {}, not quiesced (is another process serving it?)",
                state_name(info.state)
            )));
        }
        if (info.nr_hw_queues, info.queue_depth) != (cfg.queues, cfg.depth) {
            return Err(not(format!(
                "it has {} queues of depth {}, this start asks for {} of depth {}",
                info.nr_hw_queues, info.queue_depth, cfg.queues, cfg.depth
            )));
        }
        let mut params = sys::ublk_params::default();
        left.get_params(&mut params)
            .map_err(|e| not(format!("GET_PARAMS: {}", describe(&e))))?;
        let sectors = cfg.volume_bytes >> 9;
        if params.basic.dev_sectors != sectors || params.basic.logical_bs_shift != shift {
            return Err(not(format!(
                "it has {} bytes in blocks of {}, the volume {} bytes in blocks of {}",
                params.basic.dev_sectors << 9,
                1u32 << params.basic.logical_bs_shift.min(31),
                cfg.volume_bytes,
                cfg.block_bytes
            )));
        }
        left.start_user_recover()
            .map_err(|e| not(format!("START_USER_RECOVERY: {}", describe(&e))))?;
        drop(left);
        let ctrl = build_ctrl(&cfg, n, UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            .map_err(|e| not(describe(&e)))?;
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
        // With a mirror, the replicator's gate: an overflow's resync reads under it.
        let gate = repl
            .as_ref()
            .map_or_else(|| gate::RangeGate::new(gate_entries), Handle::gate);
        let shared = queue::QueueShared {
            repl,
            flush_replicates: self.cfg.flush_replicates,
            gate,
            limits: request::Limits {
                volume_bytes,
                block_bytes: 1 << shift,
                io_bytes_max: IO_BUF_BYTES,
                discard_bytes_max: MAX_DISCARD_BYTES,
            },
        };
        self.ctrl
            .run_target(
                move |dev: &mut UblkDev| init_target(dev, fd, volume_bytes, shift),
                move |qid, dev: &UblkDev| queue::queue_thread(qid, dev, &shared),
                move |ctrl: &UblkCtrl| {
                    on_started(Started {
                        dev_id: ctrl.dev_info().dev_id,
                        path: ctrl.get_bdev_path(),
                    });
                },
            )
            .map(|_| ())
            .map_err(|e| ublk_err("cannot start the ublk device", e))
    }

    /// Removes the device (DEL_DEV_ASYNC: does not wait for openers such as a mount).
    pub fn delete(&self) -> Result<(), DeviceError> {
        ensure_ctrl_ring()?;
        self.ctrl
            .del_dev_async()
            .map(|_| ())
            .map_err(|e| ublk_err("cannot delete the ublk device", e))
    }
}

/// Removes a device left behind by a daemon that died (e.g. after SIGKILL): the requests it
/// holds fail (EIO) at once; DEL_DEV_ASYNC, so that an opener (a mount, fio) cannot make this
/// wait.
pub fn delete_stale(dev_id: u32) -> Result<(), DeviceError> {
    let id = i32::try_from(dev_id).map_err(|_| DeviceError::DevIdTooLarge(dev_id))?;
    driver_present()?;
    ensure_ctrl_ring()?;
    let ctrl = UblkCtrl::new_simple(id).map_err(|e| ublk_err("cannot open the ublk device", e))?;
    ctrl.del_dev_async()
        .map(|_| ())
        .map_err(|e| ublk_err("cannot delete the ublk device", e))
}

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
