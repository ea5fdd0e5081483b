//! Opening the local volume, for the daemon and `loadgen` alike: read-write and exclusive
//! (O_EXCL for a block device, an advisory lock for a file), its usable size a whole number of
//! blocks. One function, so that the shared storage crate's volume can take its place.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;

/// Why the volume cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// It does not exist or cannot be examined.
    #[error("cannot use volume {}: {err}", .path.display())]
    Stat {
        /// The volume.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// A block device some other opener holds exclusively.
    #[error("volume {} is already in use (busy)", .path.display())]
    Busy {
        /// The volume.
        path: PathBuf,
    },
    /// A file another process has locked.
    #[error("volume {} is already in use (locked by another process)", .path.display())]
    Locked {
        /// The volume.
        path: PathBuf,
    },
    /// Opening, sizing or extending it failed.
    #[error("cannot {what} volume {}: {err}", .path.display())]
    Io {
        /// The step.
        what: &'static str,
        /// The volume.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// Not even one block.
    #[error("volume {} ({bytes} bytes) is smaller than one {block_bytes}-byte block", .path.display())]
    TooSmall {
        /// The volume.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The block size.
        block_bytes: u32,
    },
}

/// An open local volume.
#[derive(Debug)]
pub struct LocalVolume {
    /// Open for reading and writing, held exclusively.
    pub file: File,
    /// The usable size: the file's, rounded down to whole blocks.
    pub bytes: u64,
    /// The file's own size.
    pub file_bytes: u64,
}

/// Opens the volume at `path` exclusively. With `create_bytes` a missing file is created and a
/// shorter one extended to that size (what `loadgen` wants); without it the file or block device
/// must exist.
pub fn open_volume(
    path: &Path,
    block_bytes: u32,
    create_bytes: Option<u64>,
) -> Result<LocalVolume, VolumeError> {
    let is_block = match std::fs::metadata(path) {
        Ok(meta) => meta.file_type().is_block_device(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create_bytes.is_some() => false,
        Err(err) => {
            return Err(VolumeError::Stat {
                path: path.into(),
                err,
            })
        }
    };
    let io = |what, err| VolumeError::Io {
        what,
        path: path.into(),
        err,
    };
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    if is_block {
        opts.custom_flags(OFlag::O_EXCL.bits());
    } else if create_bytes.is_some() {
        opts.create(true).truncate(false);
    }
    let mut file = opts.open(path).map_err(|e| {
        if e.raw_os_error() == Some(Errno::EBUSY as i32) {
            VolumeError::Busy { path: path.into() }
        } else {
            io("open", e)
        }
    })?;
    if !is_block && file.try_lock().is_err() {
        return Err(VolumeError::Locked { path: path.into() });
    }
    let mut file_bytes = file.seek(SeekFrom::End(0)).map_err(|e| io("size", e))?;
    if let Some(want) = create_bytes.filter(|&want| !is_block && file_bytes < want) {
        file.set_len(want).map_err(|e| io("extend", e))?;
        file_bytes = want;
    }
    let bytes = file_bytes - file_bytes % u64::from(block_bytes);
    if bytes == 0 {
        return Err(VolumeError::TooSmall {
            path: path.into(),
            bytes: file_bytes,
            block_bytes,
        });
    }
    Ok(LocalVolume {
        file,
        bytes,
        file_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_sized_in_whole_blocks_and_held_exclusively() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        std::fs::write(&path, vec![0u8; 4096 * 3 + 100]).unwrap();
        let v = open_volume(&path, 4096, None).unwrap();
        assert_eq!((v.bytes, v.file_bytes), (4096 * 3, 4096 * 3 + 100));
        let again = open_volume(&path, 4096, None).unwrap_err();
        assert!(matches!(again, VolumeError::Locked { .. }), "{again}");
        drop(v);
        assert!(open_volume(&path, 4096, None).is_ok());
    }

    #[test]
    fn a_missing_file_is_created_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let e = open_volume(&path, 512, None).unwrap_err();
        assert!(matches!(e, VolumeError::Stat { .. }), "{e}");
        let v = open_volume(&path, 512, Some(1 << 20)).unwrap();
        assert_eq!(v.bytes, 1 << 20);
        drop(v);
        // A larger file is left as it is.
        let v = open_volume(&path, 512, Some(4096)).unwrap();
        assert_eq!(v.bytes, 1 << 20);
    }

    #[test]
    fn less_than_a_block_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        std::fs::write(&path, [0u8; 100]).unwrap();
        let e = open_volume(&path, 512, None).unwrap_err();
        assert!(
            e.to_string().contains("smaller than one 512-byte block"),
            "{e}"
        );
    }
}
