//! The metadata file: mirror-core's record ([`mirror_core::meta`], which documents the format and
//! its checks) kept in a file next to the volume.
//!
//! The file is created atomically (written to `<path>.tmp`, fsynced, renamed over `<path>`, the
//! directory fsynced) when the server starts. While it runs, each update overwrites the slot that
//! does *not* hold the newest record and then fdatasyncs: one `pwrite` and one `fdatasync` per
//! group commit instead of a file replacement. A crash in the middle of an update tears at most
//! that slot, and the other one still holds the previous record, so the loader takes the valid
//! record with the highest write count. (If that ever were older than what the target had already
//! reported durable, the source refuses the connection: the target regressed.) A file with no
//! valid record is never trusted: the server refuses to start. Files of the earlier formats are
//! read and rewritten in the current one at start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mirror_core::meta::{MetaCorrupt, MetaRecord};
use mirror_core::storage::{MetaStore, MetaStoreError};

/// Why a metadata file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// Reading or writing the file failed.
    #[error("metadata file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The file is not a valid metadata file (torn, corrupted, or something else).
    #[error("metadata file {path} is corrupt ({why}); refusing to trust it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What check failed.
        why: MetaCorrupt,
    },
}

/// Reads `path`: `Ok(None)` if it does not exist, an error if it exists but holds no valid
/// record.
pub fn load(path: &Path) -> Result<Option<MetaRecord>, MetaError> {
    Ok(MetaFile::read(path)?.map(|(record, _)| record))
}

/// An open metadata file that the running server updates in place (see the module docs).
#[derive(Debug)]
pub struct MetaFile {
    path: PathBuf,
    file: File,
    /// Write count of the newest record on disk; the next update writes `write_count + 1` into
    /// its slot. The lock also serializes updates.
    write_count: Mutex<u64>,
}

impl MetaFile {
    fn read(path: &Path) -> Result<Option<(MetaRecord, u64)>, MetaError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(MetaError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        MetaRecord::decode_file(&bytes)
            .map(Some)
            .map_err(|why| MetaError::Corrupt {
                path: path.to_owned(),
                why,
            })
    }

    /// Replaces `path` atomically with a file holding `record` (temp file, fsync, rename, fsync
    /// directory) and opens it for updates. The write count continues from the file it replaces,
    /// if that is valid.
    pub fn create(path: &Path, record: &MetaRecord) -> Result<MetaFile, MetaError> {
        let io_err = |source| MetaError::Io {
            path: path.to_owned(),
            source,
        };
        let write_count = match Self::read(path) {
            Ok(Some((_, n))) => n + 1,
            _ => 0,
        };
        let bytes = record.encode_file(write_count);
        let tmp = temp_path(path);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err)?;
        file.write_all(&bytes).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        drop(file);
        fs::rename(&tmp, path).map_err(io_err)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err)?;
        let file = OpenOptions::new().write(true).open(path).map_err(io_err)?;
        Ok(MetaFile {
            path: path.to_owned(),
            file,
            write_count: Mutex::new(write_count),
        })
    }

    /// Records `record` durably: overwrites the older slot, then fdatasync.
    pub fn update(&self, record: &MetaRecord) -> Result<(), MetaError> {
        let io_err = |source| MetaError::Io {
            path: self.path.clone(),
            source,
        };
        let mut write_count = self
            .write_count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = *write_count + 1;
        self.file
            .write_all_at(&record.encode(next), MetaRecord::slot_offset(next) as u64)
            .map_err(io_err)?;
        self.file.sync_data().map_err(io_err)?;
        *write_count = next;
        Ok(())
    }
}

impl MetaStore for MetaFile {
    fn load(&self) -> Result<Option<MetaRecord>, MetaStoreError> {
        load(&self.path).map_err(MetaStoreError::from)
    }

    fn store(&self, record: &MetaRecord) -> Result<(), MetaStoreError> {
        self.update(record).map_err(MetaStoreError::from)
    }
}

impl From<MetaError> for MetaStoreError {
    fn from(e: MetaError) -> MetaStoreError {
        match e {
            MetaError::Corrupt { why, .. } => MetaStoreError::Corrupt(why),
            MetaError::Io { path, source } => MetaStoreError::Io(io::Error::new(
                source.kind(),
                format!("{}: {source}", path.display()),
            )),
        }
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// The default metadata path for a volume: `<volume>.meta`.
#[must_use]
pub fn default_meta_path(volume: &Path) -> PathBuf {
    let mut name = volume.as_os_str().to_owned();
    name.push(".meta");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirror_core::meta::{META_FILE_BYTES, SLOT_BYTES};
    use mirror_core::{Seq, VolumeId};

    fn sample() -> MetaRecord {
        MetaRecord {
            durable: Seq(123_456),
            clean: false,
            ..MetaRecord::new(VolumeId([0x5a; 16]), 1 << 30)
        }
    }

    #[test]
    fn meta_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.meta");
        assert_eq!(load(&path).unwrap(), None);
        let file = MetaFile::create(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        assert!(!temp_path(&path).exists());
        for (i, clean) in [false, true, false, true, true].into_iter().enumerate() {
            let m = MetaRecord {
                clean,
                durable: Seq(i as u64 * 7),
                ..sample()
            };
            file.update(&m).unwrap();
            assert_eq!(load(&path).unwrap(), Some(m), "update {i}");
            assert_eq!(fs::metadata(&path).unwrap().len(), META_FILE_BYTES as u64);
        }
        // A new run continues the write count (so its first update wins over both slots).
        drop(file);
        let file = MetaFile::create(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        let m = MetaRecord {
            durable: Seq(99),
            ..sample()
        };
        file.update(&m).unwrap();
        assert_eq!(load(&path).unwrap(), Some(m));
    }

    #[test]
    fn a_torn_update_on_disk_falls_back_to_the_previous_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.meta");
        let file = MetaFile::create(&path, &sample()).unwrap();
        let newer = MetaRecord {
            durable: Seq(200_000),
            ..sample()
        };
        file.update(&newer).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[SLOT_BYTES + 30..SLOT_BYTES + 60].fill(0);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
    }

    #[test]
    fn corrupt_file_on_disk_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.meta");
        drop(MetaFile::create(&path, &sample()).unwrap());
        let mut bytes = fs::read(&path).unwrap();
        bytes[33] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = load(&path).unwrap_err();
        assert!(
            matches!(
                err,
                MetaError::Corrupt {
                    why: MetaCorrupt::NoValidRecord { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
