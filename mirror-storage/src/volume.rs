//! The data area as a [`Volume`] and the metadata area's record slots as a [`MetaStore`], both
//! over one open backing.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use mirror_core::meta::{MetaRecord, META_FILE_BYTES};
use mirror_core::storage::{MetaStore, MetaStoreError, Volume, VolumeError};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

/// Zeroes are written in chunks of this size (discard and write-zeroes).
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// The data area `[0, volume_bytes)` of a backing: positioned writes, `fdatasync`, reads. Every
/// access is checked against the data area, whatever the engine already checked, so nothing is
/// ever written outside it (the metadata area behind it included).
#[derive(Debug)]
pub struct FileVolume {
    file: Arc<File>,
    volume_bytes: u64,
}

impl FileVolume {
    pub(crate) fn new(file: Arc<File>, volume_bytes: u64) -> FileVolume {
        FileVolume { file, volume_bytes }
    }

    /// The backing's file, for a driver that does its own I/O on the data area (the ublk
    /// device's io_uring): it must stay below [`Volume::volume_bytes`].
    #[must_use]
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Volume for FileVolume {
    fn volume_bytes(&self) -> u64 {
        self.volume_bytes
    }

    fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_extent(offset_bytes, buf.len() as u64)?;
        Ok(self.file.read_exact_at(buf, offset_bytes)?)
    }

    fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.check_extent(offset_bytes, data.len() as u64)?;
        Ok(self.file.write_all_at(data, offset_bytes)?)
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeError> {
        self.check_extent(offset_bytes, len_bytes)?;
        // The kernel zeroes the range without our buffers where the file system or device can:
        // a hole (reads as zeroes, takes no space: a full resync ships a new volume's zeroes
        // this way), else zeroed extents; else they are written.
        if let (Ok(offset), Ok(len)) = (i64::try_from(offset_bytes), i64::try_from(len_bytes)) {
            for mode in [
                FallocateFlags::FALLOC_FL_PUNCH_HOLE,
                FallocateFlags::FALLOC_FL_ZERO_RANGE,
            ] {
                let mode = mode | FallocateFlags::FALLOC_FL_KEEP_SIZE;
                match fallocate(self.file.as_raw_fd(), mode, offset, len) {
                    Ok(()) => return Ok(()),
                    Err(Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENODEV | Errno::ENOSYS) => {}
                    Err(e) => return Err(io::Error::from(e).into()),
                }
            }
        }
        let zeroes =
            vec![0u8; ZERO_CHUNK_BYTES.min(usize::try_from(len_bytes).unwrap_or(usize::MAX))];
        let mut done = 0u64;
        while done < len_bytes {
            let n = (len_bytes - done).min(zeroes.len() as u64);
            // n <= zeroes.len(), which is a usize.
            let n_usize = usize::try_from(n).unwrap_or(zeroes.len());
            self.file
                .write_all_at(&zeroes[..n_usize], offset_bytes + done)?;
            done += n;
        }
        Ok(())
    }

    /// `fdatasync`: everything written so far is durable.
    fn sync(&self) -> Result<(), VolumeError> {
        Ok(self.file.sync_data()?)
    }
}

/// The two record slots at the end of the metadata area. Each update overwrites the slot that
/// does *not* hold the newest record, then fdatasyncs (a group commit therefore syncs twice: the
/// data, then this record, so the record never claims data the volume may lose); a torn update
/// leaves the other slot's record, and the loader takes the valid record with the higher write
/// count. Every record stored carries this area's size.
#[derive(Debug)]
pub struct AreaMeta {
    file: Arc<File>,
    path: PathBuf,
    slots_offset_bytes: u64,
    meta_area_bytes: u64,
    /// Write count of the newest record on disk; the lock also serializes updates.
    write_count: Mutex<u64>,
}

impl AreaMeta {
    pub(crate) fn new(
        file: Arc<File>,
        path: PathBuf,
        backing_bytes: u64,
        meta_area_bytes: u64,
        write_count: u64,
    ) -> AreaMeta {
        AreaMeta {
            file,
            path,
            slots_offset_bytes: backing_bytes - META_FILE_BYTES as u64,
            meta_area_bytes,
            write_count: Mutex::new(write_count),
        }
    }

    /// Where the record slots begin (the write intent's slots end there).
    pub(crate) fn slots_offset_bytes(&self) -> u64 {
        self.slots_offset_bytes
    }

    /// The backing and its path.
    pub(crate) fn file(&self) -> (Arc<File>, PathBuf) {
        (Arc::clone(&self.file), self.path.clone())
    }

    fn io_error(&self, e: io::Error) -> MetaStoreError {
        MetaStoreError::Io(io::Error::new(
            e.kind(),
            format!("metadata of {}: {e}", self.path.display()),
        ))
    }
}

/// Reads both slots at `offset_bytes`: the newest valid record and its write count, `None` if
/// the slots are all zero.
pub(crate) fn read_slots(
    file: &File,
    offset_bytes: u64,
) -> io::Result<Result<Option<(MetaRecord, u64)>, mirror_core::meta::MetaCorrupt>> {
    let mut bytes = vec![0u8; META_FILE_BYTES];
    file.read_exact_at(&mut bytes, offset_bytes)?;
    Ok(match MetaRecord::decode_file(&bytes) {
        Ok(found) => Ok(Some(found)),
        Err(why) if why.holds_no_record() => Ok(None),
        Err(why) => Err(why),
    })
}

/// Writes `record` with `write_count` into its slot at the slots' `offset_bytes`, then
/// fdatasyncs.
pub(crate) fn write_slot(
    file: &File,
    offset_bytes: u64,
    record: &MetaRecord,
    write_count: u64,
) -> io::Result<()> {
    let at = offset_bytes + MetaRecord::slot_offset(write_count) as u64;
    file.write_all_at(&record.encode(write_count), at)?;
    file.sync_data()
}

impl MetaStore for AreaMeta {
    fn load(&self) -> Result<Option<MetaRecord>, MetaStoreError> {
        match read_slots(&self.file, self.slots_offset_bytes).map_err(|e| self.io_error(e))? {
            Ok(found) => Ok(found.map(|(record, _)| record)),
            Err(why) => Err(MetaStoreError::Corrupt(why)),
        }
    }

    fn store(&self, record: &MetaRecord) -> Result<(), MetaStoreError> {
        let mut write_count = self
            .write_count
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let next = *write_count + 1;
        let record = MetaRecord {
            meta_area_bytes: self.meta_area_bytes,
            ..*record
        };
        write_slot(&self.file, self.slots_offset_bytes, &record, next)
            .map_err(|e| self.io_error(e))?;
        *write_count = next;
        Ok(())
    }
}

#[cfg(test)]
// Test sizes are small constants: casts between them cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mirror_core::storage::{apply, read};
    use mirror_core::wire::Op;
    use mirror_core::Lba;

    #[test]
    fn writes_zeroes_and_never_touches_the_metadata_area() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let data = 3u64 << 20;
        std::fs::write(&path, vec![0xeeu8; (data + 8192) as usize]).unwrap();
        let v = FileVolume::new(
            Arc::new(File::options().read(true).write(true).open(&path).unwrap()),
            data,
        );
        apply(
            &v,
            &Op::Write {
                lba: Lba(8),
                data: Bytes::from(vec![7u8; 4096]),
            },
        )
        .unwrap();
        assert_eq!(read(&v, 4096, 4096).unwrap(), vec![7u8; 4096]);
        apply(
            &v,
            &Op::Discard {
                lba: Lba(1),
                len_bytes: (2 << 20) + 512,
            },
        )
        .unwrap();
        let all = read(&v, 0, 3 << 20).unwrap();
        assert_eq!(&all[..512], &[0xeeu8; 512][..]);
        assert!(all[512..(2 << 20) + 1024].iter().all(|b| *b == 0));
        let beyond = Op::WriteZeroes {
            lba: Lba(data / 512),
            len_bytes: 512,
        };
        assert!(apply(&v, &beyond).is_err());
        assert!(read(&v, data, 1).is_err());
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            bytes[data as usize..].iter().all(|b| *b == 0xee),
            "metadata area written"
        );
    }

    #[test]
    fn a_torn_update_falls_back_to_the_previous_record_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let backing = 1u64 << 20;
        std::fs::write(&path, vec![0u8; backing as usize]).unwrap();
        let file = Arc::new(File::options().read(true).write(true).open(&path).unwrap());
        let meta = AreaMeta::new(Arc::clone(&file), path.clone(), backing, 1 << 19, 0);
        assert_eq!(meta.load().unwrap(), None);
        let first = MetaRecord::new(mirror_core::VolumeId([5; 16]), 1 << 19);
        meta.store(&first).unwrap();
        let stamped = MetaRecord {
            meta_area_bytes: 1 << 19,
            ..first
        };
        assert_eq!(meta.load().unwrap(), Some(stamped));
        let newer = MetaRecord {
            durable: mirror_core::Seq(9),
            ..stamped
        };
        meta.store(&newer).unwrap();
        assert_eq!(meta.load().unwrap(), Some(newer));
        // Tear the newer slot (write count 2: slot 0).
        let slots = backing - META_FILE_BYTES as u64;
        file.write_all_at(&[0u8; 40], slots + 20).unwrap();
        assert_eq!(meta.load().unwrap(), Some(stamped));
        file.write_all_at(&[1u8; 40], slots + 4096 + 20).unwrap();
        assert!(matches!(meta.load(), Err(MetaStoreError::Corrupt(_))));
    }
}
