//! Opening the local volume, for the daemon and `loadgen` alike: read-write and exclusive
//! (mirror-storage's [`Backing`]: O_EXCL for a block device, an advisory lock for a file), its
//! usable size a whole number of blocks. The primary keeps no metadata on its volume yet (issue
//! 14 moves it to mirror-storage's internal layout, as the target's).

use std::fs::File;
use std::path::{Path, PathBuf};

use mirror_storage::{Backing, StorageError};

/// Why the volume cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// Opening, creating, locking or extending it failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
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
    let mut backing = match create_bytes {
        Some(want) if !path.exists() => Backing::create(path, want)?,
        _ => Backing::open(path)?,
    };
    if let Some(want) = create_bytes {
        if !backing.is_block_device() && backing.backing_bytes() < want {
            backing.grow(want)?;
        }
    }
    let file_bytes = backing.backing_bytes();
    let bytes = file_bytes - file_bytes % u64::from(block_bytes);
    if bytes == 0 {
        return Err(VolumeError::TooSmall {
            path: path.into(),
            bytes: file_bytes,
            block_bytes,
        });
    }
    Ok(LocalVolume {
        file: backing.into_file(),
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
        assert!(
            again
                .to_string()
                .contains("already in use (locked by another process)"),
            "{again}"
        );
        drop(v);
        assert!(open_volume(&path, 4096, None).is_ok());
    }

    #[test]
    fn a_missing_file_is_created_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let e = open_volume(&path, 512, None).unwrap_err();
        assert!(
            matches!(e, VolumeError::Storage(StorageError::Io { .. })),
            "{e}"
        );
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
