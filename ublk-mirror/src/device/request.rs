//! Which block requests the device serves, and the errno each failure completes a request with:
//! the one place that decides what a block device user sees when a request fails.

use mirror_core::source::SourceError;
use mirror_core::{ExtentError, Range, SECTOR_BYTES};
use nix::errno::Errno;

use crate::host_write::HostWriteError;
use crate::replicator::ReplError;
use libublk::sys;

/// What a request may be on this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size of the device.
    pub volume_bytes: u64,
    /// Logical block size: offsets and lengths are multiples of it.
    pub block_bytes: u32,
    /// Largest READ or WRITE (the tag's buffer).
    pub io_bytes_max: u32,
    /// Largest DISCARD or WRITE_ZEROES.
    pub discard_bytes_max: u32,
}

/// A request's operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read into the tag's buffer.
    Read,
    /// Write the tag's buffer.
    Write,
    /// A cache flush (a barrier for the mirror).
    Flush,
    /// Deallocate a range.
    Discard,
    /// Write zeroes over a range.
    WriteZeroes,
}

/// A request that passed [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: Kind,
    /// First byte (0 for a flush).
    pub offset_bytes: u64,
    /// Length in bytes (0 for a flush).
    pub bytes: u32,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// An operation this device does not implement (zoned operations, ...).
    #[error("operation {0} is not supported")]
    Unsupported(u32),
    /// Empty, not on block boundaries, or past the device (mirror-core's one extent rule).
    #[error(transparent)]
    Extent(#[from] ExtentError),
    /// Longer than this operation may be.
    #[error("{bytes} bytes in one request (at most {bytes_max})")]
    TooLarge {
        /// Length.
        bytes: u64,
        /// The bound.
        bytes_max: u32,
    },
    /// The local volume failed with this errno.
    #[error("local volume: {}", .0.desc())]
    Local(Errno),
    /// The mirror refused or lost the operation.
    #[error("mirroring failed: {0}")]
    Mirror(#[source] ReplError),
}

impl From<HostWriteError> for RequestError {
    fn from(e: HostWriteError) -> RequestError {
        match e {
            HostWriteError::Mirror(e) => RequestError::Mirror(e),
            HostWriteError::Local(errno) => RequestError::Local(errno),
        }
    }
}

/// The errno a failed request completes with.
#[must_use]
pub fn errno(e: &RequestError) -> Errno {
    match e {
        RequestError::Unsupported(_) => Errno::EOPNOTSUPP,
        RequestError::Extent(_) | RequestError::TooLarge { .. } => Errno::EINVAL,
        // What the volume said: ENOSPC from a full filesystem under a sparse file, EIO, ...
        RequestError::Local(errno) => *errno,
        // The engine's own check of the range (alignment, extent): the request was invalid.
        RequestError::Mirror(ReplError::InvalidOp(SourceError::InvalidOp(_))) => Errno::EINVAL,
        // Replication stopped or was shut down: the data is not safe as the mode promises.
        RequestError::Mirror(_) => Errno::EIO,
    }
}

/// What the request completes with: its length, or the negated errno.
#[must_use]
pub fn completion(result: &Result<u32, RequestError>) -> i32 {
    match result {
        Ok(bytes) => i32::try_from(*bytes).unwrap_or(i32::MAX),
        Err(e) => -(errno(e) as i32),
    }
}

/// Checks a request from the driver against the device's limits.
pub fn check(
    op: u32,
    start_sector: u64,
    nr_sectors: u32,
    limits: &Limits,
) -> Result<Request, RequestError> {
    let (kind, bytes_max) = match op {
        sys::UBLK_IO_OP_READ => (Kind::Read, limits.io_bytes_max),
        sys::UBLK_IO_OP_WRITE => (Kind::Write, limits.io_bytes_max),
        sys::UBLK_IO_OP_FLUSH => {
            return Ok(Request {
                kind: Kind::Flush,
                offset_bytes: 0,
                bytes: 0,
            })
        }
        sys::UBLK_IO_OP_DISCARD => (Kind::Discard, limits.discard_bytes_max),
        sys::UBLK_IO_OP_WRITE_ZEROES => (Kind::WriteZeroes, limits.discard_bytes_max),
        other => return Err(RequestError::Unsupported(other)),
    };
    // 512-byte sectors whatever the block size.
    let offset_bytes = start_sector.saturating_mul(SECTOR_BYTES);
    let bytes = u64::from(nr_sectors) * SECTOR_BYTES;
    if bytes > u64::from(bytes_max) {
        return Err(RequestError::TooLarge { bytes, bytes_max });
    }
    Range::checked(
        offset_bytes,
        bytes,
        u64::from(limits.block_bytes),
        limits.volume_bytes,
    )?;
    Ok(Request {
        kind,
        offset_bytes,
        bytes: u32::try_from(bytes).map_err(|_| RequestError::TooLarge { bytes, bytes_max })?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        volume_bytes: 1 << 20,
        block_bytes: 4096,
        io_bytes_max: 512 << 10,
        discard_bytes_max: 1 << 30,
    };

    fn errno_of(op: u32, sector: u64, sectors: u32) -> Errno {
        errno(&check(op, sector, sectors, &LIMITS).unwrap_err())
    }

    #[test]
    fn a_valid_request_passes_with_its_byte_range() {
        let r = check(sys::UBLK_IO_OP_WRITE, 8, 16, &LIMITS).unwrap();
        assert_eq!(
            r,
            Request {
                kind: Kind::Write,
                offset_bytes: 4096,
                bytes: 8192
            }
        );
        assert_eq!(completion(&Ok(r.bytes)), 8192);
        // The last block of the device.
        assert!(check(sys::UBLK_IO_OP_READ, (1 << 11) - 8, 8, &LIMITS).is_ok());
        assert_eq!(
            check(sys::UBLK_IO_OP_FLUSH, 0, 0, &LIMITS).unwrap().kind,
            Kind::Flush
        );
    }

    #[test]
    fn out_of_range_is_einval() {
        assert_eq!(errno_of(sys::UBLK_IO_OP_WRITE, 1 << 11, 8), Errno::EINVAL);
        assert_eq!(
            errno_of(sys::UBLK_IO_OP_DISCARD, u64::MAX, 8),
            Errno::EINVAL
        );
    }

    #[test]
    fn unaligned_is_einval() {
        assert_eq!(errno_of(sys::UBLK_IO_OP_READ, 1, 8), Errno::EINVAL);
        assert_eq!(errno_of(sys::UBLK_IO_OP_WRITE, 8, 1), Errno::EINVAL);
    }

    #[test]
    fn too_large_is_einval() {
        assert_eq!(errno_of(sys::UBLK_IO_OP_WRITE, 0, 1032), Errno::EINVAL);
        // Discards may be larger than a buffer, not than their own bound.
        let big = Limits {
            volume_bytes: 4 << 30,
            ..LIMITS
        };
        assert!(check(sys::UBLK_IO_OP_DISCARD, 0, 1032, &big).is_ok());
        let e = check(sys::UBLK_IO_OP_WRITE_ZEROES, 0, (2u32 << 30) >> 9, &big).unwrap_err();
        assert_eq!(errno(&e), Errno::EINVAL);
    }

    #[test]
    fn an_unknown_operation_is_eopnotsupp() {
        for op in [
            sys::UBLK_IO_OP_WRITE_SAME,
            sys::UBLK_IO_OP_ZONE_APPEND,
            0xfe,
        ] {
            assert_eq!(errno_of(op, 0, 8), Errno::EOPNOTSUPP);
        }
        assert_eq!(completion(&Err(RequestError::Unsupported(0xfe))), -95);
    }

    #[test]
    fn a_local_failure_keeps_the_volumes_errno() {
        for e in [Errno::ENOSPC, Errno::EIO, Errno::EROFS] {
            assert_eq!(errno(&RequestError::Local(e)), e);
        }
        let from_path: RequestError = HostWriteError::Local(Errno::ENOSPC).into();
        assert_eq!(completion(&Err(from_path)), -(Errno::ENOSPC as i32));
    }

    #[test]
    fn an_operation_the_engine_calls_invalid_is_einval() {
        let e = RequestError::Mirror(ReplError::InvalidOp(SourceError::InvalidOp(
            ExtentError::BeyondVolume {
                offset_bytes: 1 << 20,
                len_bytes: 4096,
                volume_bytes: 1 << 20,
            }
            .into(),
        )));
        assert_eq!(errno(&e), Errno::EINVAL);
    }

    /// An operation the rollback log can never hold is the configuration's fault, not the
    /// request's: EIO, not EINVAL.
    #[test]
    fn an_operation_larger_than_the_log_is_eio() {
        let e = RequestError::Mirror(ReplError::InvalidOp(SourceError::NeverFits {
            bytes: 512 << 10,
            log_bytes_max: 256 << 10,
        }));
        assert_eq!(errno(&e), Errno::EIO);
    }

    #[test]
    fn a_mirror_that_stopped_is_eio() {
        assert_eq!(
            errno(&RequestError::Mirror(ReplError::Shutdown)),
            Errno::EIO
        );
        let from_path: RequestError = HostWriteError::Mirror(ReplError::Shutdown).into();
        assert_eq!(errno(&from_path), Errno::EIO);
    }
}
