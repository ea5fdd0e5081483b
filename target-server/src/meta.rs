//! The target's metadata file: which volume this is, the last durable sequence number, and whether
//! the previous run stopped cleanly.
//!
//! Layout (52 bytes, little endian):
//!
//! | bytes  | field          | meaning                                             |
//! |--------|----------------|-----------------------------------------------------|
//! | 0..8   | magic          | `"UBMRMETA"`                                        |
//! | 8..12  | version        | [`META_VERSION`]                                    |
//! | 12..16 | flags          | bit 0: clean (all applied writes were synced)       |
//! | 16..32 | volume id      | the mirrored volume                                 |
//! | 32..40 | durable seq    | last operation applied and synced                   |
//! | 40..48 | volume bytes   | size of the volume when written                     |
//! | 48..52 | crc32c         | CRC32C of bytes 0..48                               |
//!
//! The file is replaced atomically: written to `<path>.tmp`, fsynced, renamed over `<path>`, and
//! the directory fsynced. A file that fails any check is never trusted: the server refuses to start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use mirror_core::{Seq, VolumeId};

/// `"UBMRMETA"`.
pub const META_MAGIC: [u8; 8] = *b"UBMRMETA";
/// The metadata format version this code reads and writes.
pub const META_VERSION: u32 = 1;
/// Bytes in a metadata file.
pub const META_BYTES: usize = 52;
const FLAG_CLEAN: u32 = 1;

/// The contents of a metadata file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// The mirrored volume.
    pub volume_id: VolumeId,
    /// Last sequence number applied and synced to the volume.
    pub durable: Seq,
    /// Whether the run that wrote this stopped cleanly.
    pub clean: bool,
    /// Size of the volume.
    pub volume_bytes: u64,
}

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
        why: String,
    },
}

impl Meta {
    /// The on-disk bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; META_BYTES] {
        let mut b = [0u8; META_BYTES];
        b[0..8].copy_from_slice(&META_MAGIC);
        b[8..12].copy_from_slice(&META_VERSION.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_id.0);
        b[32..40].copy_from_slice(&self.durable.0.to_le_bytes());
        b[40..48].copy_from_slice(&self.volume_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses on-disk bytes; the error says which check failed.
    pub fn decode(bytes: &[u8]) -> Result<Meta, String> {
        if bytes.len() != META_BYTES {
            return Err(format!(
                "{} bytes, expected {META_BYTES} (torn write?)",
                bytes.len()
            ));
        }
        if bytes[0..8] != META_MAGIC {
            return Err("bad magic".into());
        }
        let crc = u32::from_le_bytes([bytes[48], bytes[49], bytes[50], bytes[51]]);
        if crc32c::crc32c(&bytes[0..48]) != crc {
            return Err("checksum mismatch".into());
        }
        let u32_at = |at: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(a)
        };
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != META_VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let flags = u32_at(12);
        if flags & !FLAG_CLEAN != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[16..32]);
        Ok(Meta {
            volume_id: VolumeId(id),
            durable: Seq(u64_at(32)),
            clean: flags & FLAG_CLEAN != 0,
            volume_bytes: u64_at(40),
        })
    }

    /// Reads `path`: `Ok(None)` if it does not exist, an error if it exists but is not valid.
    pub fn load(path: &Path) -> Result<Option<Meta>, MetaError> {
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
        Meta::decode(&bytes)
            .map(Some)
            .map_err(|why| MetaError::Corrupt {
                path: path.to_owned(),
                why,
            })
    }

    /// Replaces `path` atomically with this record (temp file, fsync, rename, fsync directory).
    pub fn store(&self, path: &Path) -> Result<(), MetaError> {
        let io_err = |source| MetaError::Io {
            path: path.to_owned(),
            source,
        };
        let tmp = temp_path(path);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err)?;
        file.write_all(&self.encode()).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        drop(file);
        fs::rename(&tmp, path).map_err(io_err)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err)
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

    fn sample() -> Meta {
        Meta {
            volume_id: VolumeId([0x5a; 16]),
            durable: Seq(123_456),
            clean: false,
            volume_bytes: 1 << 30,
        }
    }

    #[test]
    fn meta_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.meta");
        assert_eq!(Meta::load(&path).unwrap(), None);
        for clean in [false, true] {
            let m = Meta { clean, ..sample() };
            m.store(&path).unwrap();
            assert_eq!(Meta::load(&path).unwrap(), Some(m));
        }
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn every_corrupted_byte_is_refused() {
        let good = sample().encode();
        for at in 0..META_BYTES {
            for bit in [0x01u8, 0x80] {
                let mut bad = good;
                bad[at] ^= bit;
                assert!(Meta::decode(&bad).is_err(), "flip {bit:#x} at byte {at}");
            }
        }
    }

    #[test]
    fn torn_and_padded_files_are_refused() {
        let good = sample().encode();
        for len in 0..META_BYTES {
            assert!(Meta::decode(&good[..len]).is_err(), "torn at {len}");
        }
        let mut long = good.to_vec();
        long.push(0);
        assert!(Meta::decode(&long).is_err());
    }

    #[test]
    fn corrupt_file_on_disk_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.meta");
        let mut bytes = sample().encode();
        bytes[33] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = Meta::load(&path).unwrap_err();
        assert!(matches!(err, MetaError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn unknown_version_is_refused_even_with_a_valid_checksum() {
        let mut bytes = sample().encode();
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[0..48]);
        bytes[48..52].copy_from_slice(&crc.to_le_bytes());
        let err = Meta::decode(&bytes).unwrap_err();
        assert!(err.contains("version 2"), "{err}");
    }
}
