//! The file-backed target volume: positioned writes of mirrored operations, `fdatasync`, reads for
//! local lock holders. Every access is checked against the volume's size, whatever the engine
//! already checked, so nothing is ever written outside the volume.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use mirror_core::wire::Op;

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

    fn check(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= self.volume_bytes => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "extent {offset_bytes}+{len_bytes} outside the volume of {} bytes",
                    self.volume_bytes
                ),
            )),
        }
    }

    /// Applies one operation (a flush needs nothing here: the driver syncs after each batch).
    pub fn apply(&self, op: &Op) -> io::Result<()> {
        let Some(range) = op.range() else {
            return Ok(());
        };
        self.check(range.offset_bytes, range.len_bytes)?;
        match op {
            Op::Write { data, .. } => self.file.write_all_at(data, range.offset_bytes),
            // Our volumes read back zeroes after a discard.
            Op::Discard { .. } | Op::WriteZeroes { .. } => {
                self.write_zeroes(range.offset_bytes, range.len_bytes)
            }
            Op::Flush => Ok(()),
        }
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
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

    /// `fdatasync`: everything applied so far is durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Reads `len_bytes` at `offset_bytes`.
    pub fn read(&self, offset_bytes: u64, len_bytes: usize) -> io::Result<Vec<u8>> {
        self.check(offset_bytes, len_bytes as u64)?;
        let mut buf = vec![0u8; len_bytes];
        self.file.read_exact_at(&mut buf, offset_bytes)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mirror_core::Lba;

    #[test]
    fn writes_zeroes_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let v = Volume::create(&path, 3 << 20).unwrap();
        v.apply(&Op::Write {
            lba: Lba(8),
            data: Bytes::from(vec![7u8; 4096]),
        })
        .unwrap();
        assert_eq!(v.read(4096, 4096).unwrap(), vec![7u8; 4096]);
        v.apply(&Op::Write {
            lba: Lba(0),
            data: Bytes::from(vec![9u8; 3 << 20]),
        })
        .unwrap();
        v.apply(&Op::Discard {
            lba: Lba(1),
            len_bytes: (2 << 20) + 512,
        })
        .unwrap();
        let all = v.read(0, 3 << 20).unwrap();
        assert_eq!(&all[..512], &[9u8; 512][..]);
        assert!(all[512..(2 << 20) + 1024].iter().all(|b| *b == 0));
        assert!(all[(2 << 20) + 1024..].iter().all(|b| *b == 9));
        let beyond = Op::WriteZeroes {
            lba: Lba((3 << 20) / 512),
            len_bytes: 512,
        };
        assert!(v.apply(&beyond).is_err());
        assert!(v.read(3 << 20, 1).is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 20);
    }
}
