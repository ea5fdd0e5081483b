//! The target's metadata file: which volume this is, the last durable sequence number, and whether
//! the previous run stopped cleanly.
//!
//! The file is [`META_FILE_BYTES`] long and holds two record slots, at offset 0 and at
//! [`SLOT_BYTES`]. A record (60 bytes, little endian):
//!
//! | bytes  | field          | meaning                                             |
//! |--------|----------------|-----------------------------------------------------|
//! | 0..8   | magic          | `"UBMRMETA"`                                        |
//! | 8..12  | version        | [`META_VERSION`]                                    |
//! | 12..16 | flags          | bit 0: clean (all applied writes were synced)       |
//! | 16..32 | volume id      | the mirrored volume                                 |
//! | 32..40 | durable seq    | last operation applied and synced                   |
//! | 40..48 | volume bytes   | size of the volume when written                     |
//! | 48..56 | write_count    | incremented by every update                         |
//! | 56..60 | crc32c         | CRC32C of bytes 0..56                               |
//!
//! The file is created atomically (written to `<path>.tmp`, fsynced, renamed over `<path>`, the
//! directory fsynced) when the server starts. While it runs, each update overwrites the slot that
//! does *not* hold the newest record and then fdatasyncs: one `pwrite` and one `fdatasync` per
//! group commit instead of a file replacement. A crash in the middle of an update tears at most
//! that slot, and the other one still holds the previous record, so the loader takes the valid
//! record with the highest write count. (If that ever were older than what the target had already
//! reported durable, the source refuses the connection: the target regressed.) A file with no
//! valid record is never trusted: the server refuses to start.
//!
//! A version-1 file (one 52-byte record without a write count, replaced on every update) is still
//! read; the server rewrites it in this format when it starts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mirror_core::{Seq, VolumeId};

/// `"UBMRMETA"`.
pub const META_MAGIC: [u8; 8] = *b"UBMRMETA";
/// The metadata format version this code writes.
pub const META_VERSION: u32 = 2;
/// Bytes in one record.
pub const RECORD_BYTES: usize = 60;
/// Distance between the two slots (records never share a page or a sector).
pub const SLOT_BYTES: usize = 4096;
/// Bytes in a metadata file.
pub const META_FILE_BYTES: usize = 2 * SLOT_BYTES;
const V1_BYTES: usize = 52;
const FLAG_CLEAN: u32 = 1;

/// The contents of a metadata record.
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

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Meta {
    /// The on-disk record carrying `write_count`.
    #[must_use]
    pub fn encode(&self, write_count: u64) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        b[0..8].copy_from_slice(&META_MAGIC);
        b[8..12].copy_from_slice(&META_VERSION.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_id.0);
        b[32..40].copy_from_slice(&self.durable.0.to_le_bytes());
        b[40..48].copy_from_slice(&self.volume_bytes.to_le_bytes());
        b[48..56].copy_from_slice(&write_count.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses one record (the first [`RECORD_BYTES`] of `bytes`) and its write count; the error
    /// says which check failed.
    pub fn decode(bytes: &[u8]) -> Result<(Meta, u64), String> {
        if bytes.len() < RECORD_BYTES {
            return Err(format!(
                "{} bytes, expected {RECORD_BYTES} (torn write?)",
                bytes.len()
            ));
        }
        let meta = Self::decode_fields(bytes, META_VERSION, 56)?;
        Ok((meta, u64_at(bytes, 48)))
    }

    /// Parses a whole version-1 file (52 bytes, no write count).
    fn decode_v1(bytes: &[u8]) -> Result<Meta, String> {
        Self::decode_fields(bytes, 1, 48)
    }

    /// Checks magic, CRC (of `bytes[..crc_at]`, stored at `crc_at`), version and flags, and
    /// reads the fields both versions share.
    fn decode_fields(bytes: &[u8], version_wanted: u32, crc_at: usize) -> Result<Meta, String> {
        if bytes[0..8] != META_MAGIC {
            return Err(if bytes[..crc_at + 4].iter().all(|b| *b == 0) {
                "empty record".into()
            } else {
                "bad magic".into()
            });
        }
        if crc32c::crc32c(&bytes[0..crc_at]) != u32_at(bytes, crc_at) {
            return Err("checksum mismatch".into());
        }
        let version = u32_at(bytes, 8);
        if version != version_wanted {
            return Err(format!("unsupported version {version}"));
        }
        let flags = u32_at(bytes, 12);
        if flags & !FLAG_CLEAN != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[16..32]);
        Ok(Meta {
            volume_id: VolumeId(id),
            durable: Seq(u64_at(bytes, 32)),
            clean: flags & FLAG_CLEAN != 0,
            volume_bytes: u64_at(bytes, 40),
        })
    }

    /// Parses a whole file: the valid record with the highest write count (and that write count).
    fn decode_file(bytes: &[u8]) -> Result<(Meta, u64), String> {
        if bytes.len() == V1_BYTES {
            return Self::decode_v1(bytes)
                .map(|m| (m, 0))
                .map_err(|why| format!("version-1 file: {why}"));
        }
        if bytes.len() != META_FILE_BYTES {
            return Err(format!(
                "{} bytes, expected {META_FILE_BYTES} (torn write?)",
                bytes.len()
            ));
        }
        let slots = [
            Self::decode(&bytes[..SLOT_BYTES]),
            Self::decode(&bytes[SLOT_BYTES..]),
        ];
        match slots {
            [Ok(a), Ok(b)] => Ok(if b.1 > a.1 { b } else { a }),
            [Ok(a), Err(_)] => Ok(a),
            [Err(_), Ok(b)] => Ok(b),
            [Err(a), Err(b)] => Err(format!("no valid record: slot 0: {a}; slot 1: {b}")),
        }
    }

    /// Reads `path`: `Ok(None)` if it does not exist, an error if it exists but holds no valid
    /// record.
    pub fn load(path: &Path) -> Result<Option<Meta>, MetaError> {
        Ok(MetaFile::read(path)?.map(|(meta, _)| meta))
    }
}

/// An open metadata file that the running server updates in place (see the module docs).
#[derive(Debug)]
pub struct MetaFile {
    path: PathBuf,
    file: File,
    /// Write count of the newest record on disk; the next update writes `write_count + 1` into
    /// slot `(write_count + 1) % 2`. The lock also serializes updates.
    write_count: Mutex<u64>,
}

impl MetaFile {
    fn read(path: &Path) -> Result<Option<(Meta, u64)>, MetaError> {
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
        Meta::decode_file(&bytes)
            .map(Some)
            .map_err(|why| MetaError::Corrupt {
                path: path.to_owned(),
                why,
            })
    }

    /// Replaces `path` atomically with a file holding `meta` (temp file, fsync, rename, fsync
    /// directory) and opens it for updates. The record's write count continues from the file it
    /// replaces, if that is valid.
    pub fn create(path: &Path, meta: &Meta) -> Result<MetaFile, MetaError> {
        let io_err = |source| MetaError::Io {
            path: path.to_owned(),
            source,
        };
        let write_count = match Self::read(path) {
            Ok(Some((_, g))) => g + 1,
            _ => 0,
        };
        let mut bytes = vec![0u8; META_FILE_BYTES];
        let slot = Self::slot_offset(write_count);
        bytes[slot..slot + RECORD_BYTES].copy_from_slice(&meta.encode(write_count));
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

    fn slot_offset(write_count: u64) -> usize {
        if write_count.is_multiple_of(2) {
            0
        } else {
            SLOT_BYTES
        }
    }

    /// Records `meta` durably: overwrites the older slot, then fdatasync.
    pub fn update(&self, meta: &Meta) -> Result<(), MetaError> {
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
            .write_all_at(&meta.encode(next), Self::slot_offset(next) as u64)
            .map_err(io_err)?;
        self.file.sync_data().map_err(io_err)?;
        *write_count = next;
        Ok(())
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
        let file = MetaFile::create(&path, &sample()).unwrap();
        assert_eq!(Meta::load(&path).unwrap(), Some(sample()));
        assert!(!temp_path(&path).exists());
        for (i, clean) in [false, true, false, true, true].into_iter().enumerate() {
            let m = Meta {
                clean,
                durable: Seq(i as u64 * 7),
                ..sample()
            };
            file.update(&m).unwrap();
            assert_eq!(Meta::load(&path).unwrap(), Some(m), "update {i}");
            assert_eq!(fs::metadata(&path).unwrap().len(), META_FILE_BYTES as u64);
        }
        // A new run continues the write count (so its first update wins over both slots).
        drop(file);
        let file = MetaFile::create(&path, &sample()).unwrap();
        assert_eq!(Meta::load(&path).unwrap(), Some(sample()));
        let m = Meta {
            durable: Seq(99),
            ..sample()
        };
        file.update(&m).unwrap();
        assert_eq!(Meta::load(&path).unwrap(), Some(m));
    }

    #[test]
    fn updates_alternate_slots_and_a_torn_update_falls_back_to_the_previous_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.meta");
        let file = MetaFile::create(&path, &sample()).unwrap();
        let newer = Meta {
            durable: Seq(200_000),
            ..sample()
        };
        file.update(&newer).unwrap();
        let good = fs::read(&path).unwrap();
        // Write count 0 sits in slot 0, write count 1 in slot 1.
        assert_eq!(Meta::decode(&good[..SLOT_BYTES]).unwrap(), (sample(), 0));
        assert_eq!(Meta::decode(&good[SLOT_BYTES..]).unwrap(), (newer, 1));
        for torn_at in [1, 30, 56, RECORD_BYTES - 1] {
            let mut bytes = good.clone();
            bytes[SLOT_BYTES + torn_at..SLOT_BYTES + RECORD_BYTES].fill(0);
            assert_eq!(
                Meta::decode_file(&bytes).unwrap().0,
                sample(),
                "torn at {torn_at}"
            );
        }
        let mut both = good.clone();
        both[20] ^= 1;
        both[SLOT_BYTES + 20] ^= 1;
        let err = Meta::decode_file(&both).unwrap_err();
        assert!(err.contains("no valid record"), "{err}");
    }

    #[test]
    fn every_corrupted_byte_is_refused() {
        let good = sample().encode(3);
        for at in 0..RECORD_BYTES {
            for bit in [0x01u8, 0x80] {
                let mut bad = good;
                bad[at] ^= bit;
                assert!(Meta::decode(&bad).is_err(), "flip {bit:#x} at byte {at}");
            }
        }
    }

    #[test]
    fn torn_and_padded_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.meta");
        drop(MetaFile::create(&path, &sample()).unwrap());
        let good = fs::read(&path).unwrap();
        for len in [0, 1, 30, RECORD_BYTES, SLOT_BYTES, META_FILE_BYTES - 1] {
            assert!(Meta::decode_file(&good[..len]).is_err(), "torn at {len}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(Meta::decode_file(&long).is_err());
    }

    #[test]
    fn corrupt_file_on_disk_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.meta");
        drop(MetaFile::create(&path, &sample()).unwrap());
        let mut bytes = fs::read(&path).unwrap();
        bytes[33] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = Meta::load(&path).unwrap_err();
        assert!(matches!(err, MetaError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn unknown_version_is_refused_even_with_a_valid_checksum() {
        let mut bytes = sample().encode(0);
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[0..56]);
        bytes[56..60].copy_from_slice(&crc.to_le_bytes());
        let err = Meta::decode(&bytes).unwrap_err();
        assert!(err.contains("version 3"), "{err}");
    }

    /// A version-1 record, as the previous format wrote it.
    fn encode_v1(m: &Meta) -> Vec<u8> {
        let mut b = m.encode(0)[..V1_BYTES].to_vec();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn version_1_files_are_read_and_rewritten_on_create() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.meta");
        fs::write(&path, encode_v1(&sample())).unwrap();
        assert_eq!(Meta::load(&path).unwrap(), Some(sample()));
        let mut bad = encode_v1(&sample());
        bad[40] ^= 1;
        fs::write(&path, &bad).unwrap();
        let err = Meta::load(&path).unwrap_err().to_string();
        assert!(err.contains("version-1 file: checksum"), "{err}");
        fs::write(&path, encode_v1(&sample())).unwrap();
        let file = MetaFile::create(&path, &sample()).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), META_FILE_BYTES as u64);
        file.update(&sample()).unwrap();
        assert_eq!(Meta::load(&path).unwrap(), Some(sample()));
    }
}
