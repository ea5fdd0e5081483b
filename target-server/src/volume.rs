//! The file-backed target volume, behind mirror-core's [`mirror_core::storage::Volume`] seam:
//! positioned writes, `fdatasync`, reads for local lock holders. Every access is checked against
//! the volume's size, whatever the engine already checked, so nothing is ever written outside the
//! volume.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use mirror_core::storage::VolumeError;

/// Zeroes are written in chunks of this size (discard and write-zeroes).
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// An open target volume.
#[derive(Debug)]
pub struct Volume {
    file: File,
    volume_bytes: u64,
}

impl Volume {
    /// Opens an existing volume for reading and writing.
    pub fn open(path: &Path) -> io::Result<Volume> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(Volume {
            file,
            volume_bytes: meta.len(),
        })
    }

    /// Creates a sparse volume of `volume_bytes` (which must not exist yet).
    pub fn create(path: &Path, volume_bytes: u64) -> io::Result<Volume> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(volume_bytes)?;
        file.sync_all()?;
        Ok(Volume { file, volume_bytes })
    }

    /// Size in bytes.
    #[must_use]
    pub fn volume_bytes(&self) -> u64 {
        self.volume_bytes
    }
}

impl mirror_core::storage::Volume for Volume {
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mirror_core::storage::{apply, read};
    use mirror_core::wire::Op;
    use mirror_core::Lba;

    #[test]
    fn writes_zeroes_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let v = Volume::create(&path, 3 << 20).unwrap();
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
            &Op::Write {
                lba: Lba(0),
                data: Bytes::from(vec![9u8; 3 << 20]),
            },
        )
        .unwrap();
        apply(
            &v,
            &Op::Discard {
                lba: Lba(1),
                len_bytes: (2 << 20) + 512,
            },
        )
        .unwrap();
        let all = read(&v, 0, 3 << 20).unwrap();
        assert_eq!(&all[..512], &[9u8; 512][..]);
        assert!(all[512..(2 << 20) + 1024].iter().all(|b| *b == 0));
        assert!(all[(2 << 20) + 1024..].iter().all(|b| *b == 9));
        let beyond = Op::WriteZeroes {
            lba: Lba((3 << 20) / 512),
            len_bytes: 512,
        };
        assert!(apply(&v, &beyond).is_err());
        assert!(read(&v, 3 << 20, 1).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 20);
    }
}
