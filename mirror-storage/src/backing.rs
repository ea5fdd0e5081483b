//! Opening a backing (regular file or block device) for exclusive use, and the errors of this
//! crate.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mirror_core::meta::MetaCorrupt;

/// Why a volume cannot be opened, created or upgraded. Each message is one line naming the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An I/O call on the backing or a metadata file failed.
    #[error("volume {path}: {source}")]
    Io {
        /// The file or device.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// Another process has the backing open for exclusive use.
    #[error("volume {path} is already in use ({why})")]
    InUse {
        /// The file or device.
        path: PathBuf,
        /// Busy (a block device) or locked (a file).
        why: &'static str,
    },
    /// The backing is neither a regular file nor a block device.
    #[error("volume {path} is neither a regular file nor a block device")]
    NotAVolume {
        /// The path.
        path: PathBuf,
    },
    /// A size is not a positive multiple of the block.
    #[error(
        "volume {path}: size {bytes} is not a positive multiple of the {block_bytes}-byte block"
    )]
    BadSize {
        /// The file or device.
        path: PathBuf,
        /// The size.
        bytes: u64,
        /// The block.
        block_bytes: u32,
    },
    /// The metadata at the end of the backing is damaged (not merely absent).
    #[error("metadata at the end of volume {path} is corrupt ({why}); refusing to trust it")]
    Corrupt {
        /// The file or device.
        path: PathBuf,
        /// What check failed.
        why: MetaCorrupt,
    },
    /// The backing's size does not fit the data and metadata areas its record (or the size asked
    /// for) describes.
    #[error(
        "volume {path} has {backing_bytes} bytes, but {volume_bytes} data bytes and their metadata \
         need {expected_bytes}: was it grown or shrunk? restore its size"
    )]
    Resized {
        /// The file or device.
        path: PathBuf,
        /// Its size.
        backing_bytes: u64,
        /// The data area's size.
        volume_bytes: u64,
        /// What data and metadata need.
        expected_bytes: u64,
    },
    /// The backing holds a volume of another size than the one asked for.
    #[error("volume {path} holds {found} data bytes, not the {asked} bytes asked for")]
    SizeMismatch {
        /// The file or device.
        path: PathBuf,
        /// Its data area's size.
        found: u64,
        /// The size asked for.
        asked: u64,
    },
    /// An existing backing without metadata, and no data size to initialise it with.
    #[error(
        "volume {path} has no metadata at its end: give its data size (--create-size) to \
         initialise it (the metadata area follows that many bytes of data; a target volume so \
         initialised is not consistent); if it was grown or shrunk, restore its size"
    )]
    NoMetadata {
        /// The file or device.
        path: PathBuf,
    },
    /// A legacy metadata file is unreadable or corrupt.
    #[error("legacy metadata file {path} is corrupt ({why}); refusing to trust it")]
    LegacyCorrupt {
        /// The legacy file.
        path: PathBuf,
        /// What check failed.
        why: MetaCorrupt,
    },
    /// A legacy metadata file beside a volume that does not exist: it describes an earlier one.
    #[error(
        "legacy metadata file {legacy} exists but volume {path} does not: it describes an earlier \
         volume; restore that volume, or remove the file to create a new one"
    )]
    LegacyWithoutVolume {
        /// The volume.
        path: PathBuf,
        /// The legacy file.
        legacy: PathBuf,
    },
    /// A legacy metadata file describes a volume of another size.
    #[error("legacy metadata file {legacy} records {recorded} bytes, volume {path} has {actual}")]
    LegacySize {
        /// The volume.
        path: PathBuf,
        /// The legacy file.
        legacy: PathBuf,
        /// Its recorded size.
        recorded: u64,
        /// The volume's size.
        actual: u64,
    },
    /// A block device with legacy metadata: its data cannot grow to make room for the area.
    #[error(
        "volume {path} is a block device with legacy metadata {legacy}: metadata now lives at the \
         end of the volume, which a device cannot grow by; copy its data to a device of at least \
         {needed_bytes} bytes and start there with --create-size {volume_bytes} (not consistent \
         until a resync), or keep the previous release"
    )]
    BlockDeviceUpgrade {
        /// The device.
        path: PathBuf,
        /// The legacy file.
        legacy: PathBuf,
        /// The data size.
        volume_bytes: u64,
        /// What data and metadata need.
        needed_bytes: u64,
    },
}

impl StorageError {
    /// Wraps an I/O error on `path`.
    pub fn io(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
        move |source| StorageError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// A regular file or block device opened for reading and writing, for this process alone (a
/// block device with `O_EXCL`, a file with an advisory lock).
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    backing_bytes: u64,
    is_block_device: bool,
}

impl Backing {
    /// Opens an existing file or block device.
    pub fn open(path: &Path) -> Result<Backing, StorageError> {
        let meta = std::fs::metadata(path).map_err(StorageError::io(path))?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(StorageError::NotAVolume {
                path: path.to_owned(),
            });
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if is_block_device {
            opts.custom_flags(nix::fcntl::OFlag::O_EXCL.bits());
        }
        let mut file = opts.open(path).map_err(|e| {
            if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) {
                StorageError::InUse {
                    path: path.to_owned(),
                    why: "busy",
                }
            } else {
                StorageError::io(path)(e)
            }
        })?;
        if !is_block_device && file.try_lock().is_err() {
            return Err(StorageError::InUse {
                path: path.to_owned(),
                why: "locked by another process",
            });
        }
        // A block device's metadata length is 0: its size is where a seek to the end lands.
        let backing_bytes = file
            .seek(SeekFrom::End(0))
            .map_err(StorageError::io(path))?;
        Ok(Backing {
            file,
            path: path.to_owned(),
            backing_bytes,
            is_block_device,
        })
    }

    /// Creates a sparse regular file of `backing_bytes` (it must not exist yet), locked as
    /// [`Backing::open`] locks it.
    pub fn create(path: &Path, backing_bytes: u64) -> Result<Backing, StorageError> {
        let err = StorageError::io(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(err)?;
        if file.try_lock().is_err() {
            return Err(StorageError::InUse {
                path: path.to_owned(),
                why: "locked by another process",
            });
        }
        file.set_len(backing_bytes)
            .and_then(|()| file.sync_all())
            .map_err(StorageError::io(path))?;
        Ok(Backing {
            file,
            path: path.to_owned(),
            backing_bytes,
            is_block_device: false,
        })
    }

    /// Grows a regular file to `backing_bytes` (the new bytes read as zeroes) and syncs it.
    pub fn grow(&mut self, backing_bytes: u64) -> Result<(), StorageError> {
        self.file
            .set_len(backing_bytes)
            .and_then(|()| self.file.sync_all())
            .map_err(StorageError::io(&self.path))?;
        self.backing_bytes = backing_bytes;
        Ok(())
    }

    /// The open file or device (the primary daemon hands it to its io_uring queues).
    #[must_use]
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives up the backing for its file (the lock goes with it).
    #[must_use]
    pub fn into_file(self) -> File {
        self.file
    }

    /// The path it was opened at.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its whole size: data and metadata areas.
    #[must_use]
    pub fn backing_bytes(&self) -> u64 {
        self.backing_bytes
    }

    /// Whether it is a block device (it cannot grow).
    #[must_use]
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }
}
