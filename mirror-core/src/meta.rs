//! A node's persistent metadata record, for both roles: which volume and node this is, its role,
//! its data generation, the last durable sequence number, whether the previous run stopped
//! cleanly, and where a dirty bitmap lives (none yet). The bytes and their checks live here; the
//! drivers keep the record in a file (`target-server`'s `meta.rs`) and decide nothing about it:
//! [`crate::target::recover`] says what a restarted target trusts.
//!
//! A metadata file holds two slots, at offset 0 and at [`SLOT_BYTES`]; each update overwrites the
//! slot that does not hold the newest record, so a torn update leaves the previous record intact.
//! A record (version 3, [`RECORD_BYTES`] bytes, little endian):
//!
//! | bytes    | field          | meaning                                                  |
//! |----------|----------------|----------------------------------------------------------|
//! | 0..8     | magic          | `"UBMRMETA"`                                             |
//! | 8..12    | version        | [`META_VERSION`]                                         |
//! | 12..16   | flags          | bit 0: clean (all applied writes were synced)            |
//! | 16..32   | volume id      | the mirrored volume                                      |
//! | 32..40   | node id        | the node that wrote it                                   |
//! | 40..44   | role           | 0: secondary (target), 1: primary                        |
//! | 44..48   | reserved       | zero                                                     |
//! | 48..56   | volume bytes   | size of the volume when written                          |
//! | 56..64   | durable seq    | last operation applied and synced                        |
//! | 64..72   | generation     | the data generation                                      |
//! | 72..80   | bitmap offset  | where the dirty bitmap starts (0 with length 0: none)    |
//! | 80..88   | bitmap bytes   | its length                                               |
//! | 88..96   | write count    | incremented by every update; the higher valid slot wins  |
//! | 96..100  | crc32c         | CRC32C of bytes 0..96                                    |
//!
//! Versions 1 (one 52-byte record, the whole file) and 2 (two 60-byte slots, without node, role,
//! generation and bitmap) are read; a driver rewrites the file in version 3 when it starts.

use crate::types::{Generation, NodeId, Seq, VolumeId};
use crate::wire::{le_u32, le_u64};

/// `"UBMRMETA"`.
pub const META_MAGIC: [u8; 8] = *b"UBMRMETA";
/// The format version this code writes.
pub const META_VERSION: u32 = 3;
/// Bytes in one version-3 record.
pub const RECORD_BYTES: usize = 100;
/// Distance between the two slots (records never share a page or a sector).
pub const SLOT_BYTES: usize = 4096;
/// Bytes in a metadata file.
pub const META_FILE_BYTES: usize = 2 * SLOT_BYTES;
const V1_BYTES: usize = 52;
const V2_RECORD_BYTES: usize = 60;
const FLAG_CLEAN: u32 = 1;

/// A node's role, as its metadata records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Receives the mirror (the target).
    #[default]
    Secondary,
    /// Serves the device and ships writes.
    Primary,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Secondary => "secondary",
            Role::Primary => "primary",
        })
    }
}

/// Where a dirty bitmap lives (in the metadata's own file or device), if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapLocation {
    /// First byte.
    pub offset_bytes: u64,
    /// Length; 0 means no bitmap.
    pub len_bytes: u64,
}

/// The contents of a metadata record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaRecord {
    /// The mirrored volume.
    pub volume_id: VolumeId,
    /// The node that wrote the record.
    pub node_id: NodeId,
    /// Its role when it wrote it.
    pub role: Role,
    /// Size of the volume.
    pub volume_bytes: u64,
    /// Last sequence number applied and synced to the volume.
    pub durable: Seq,
    /// The data generation.
    pub generation: Generation,
    /// Whether the run that wrote this stopped cleanly.
    pub clean: bool,
    /// The dirty bitmap, if any.
    pub bitmap: BitmapLocation,
}

/// Why metadata bytes cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetaCorrupt {
    /// Too short or too long for any version (a torn or padded write).
    #[error("{len} bytes, expected {expected} (torn write?)")]
    Length {
        /// What was found.
        len: usize,
        /// What the format needs.
        expected: usize,
    },
    /// All zeroes.
    #[error("empty record")]
    Empty,
    /// Not a metadata record.
    #[error("bad magic")]
    BadMagic,
    /// The checksum does not match the contents.
    #[error("checksum mismatch")]
    Checksum,
    /// A version this code does not read.
    #[error("unsupported version {0}")]
    Version(u32),
    /// Flags this version does not define.
    #[error("unknown flags {0:#x}")]
    Flags(u32),
    /// Reserved bytes are not zero.
    #[error("reserved bytes in use")]
    Reserved,
    /// A role this version does not define.
    #[error("unknown role {0}")]
    Role(u32),
    /// Neither slot holds a valid record.
    #[error("no valid record: slot 0: {slot0}; slot 1: {slot1}")]
    NoValidRecord {
        /// Why slot 0 is invalid.
        slot0: Box<MetaCorrupt>,
        /// Why slot 1 is invalid.
        slot1: Box<MetaCorrupt>,
    },
    /// A version-1 file that failed a check.
    #[error("version-1 file: {0}")]
    V1(Box<MetaCorrupt>),
}

/// Magic, checksum (of `bytes[..crc_at]`, stored at `crc_at`), version and flags; returns the
/// clean flag.
fn check_header(bytes: &[u8], version_wanted: u32, crc_at: usize) -> Result<bool, MetaCorrupt> {
    if bytes.len() < crc_at + 4 {
        return Err(MetaCorrupt::Length {
            len: bytes.len(),
            expected: crc_at + 4,
        });
    }
    if bytes[0..8] != META_MAGIC {
        return Err(if bytes[..crc_at + 4].iter().all(|b| *b == 0) {
            MetaCorrupt::Empty
        } else {
            MetaCorrupt::BadMagic
        });
    }
    if crc32c::crc32c(&bytes[0..crc_at]) != le_u32(bytes, crc_at) {
        return Err(MetaCorrupt::Checksum);
    }
    let version = le_u32(bytes, 8);
    if version != version_wanted {
        return Err(MetaCorrupt::Version(version));
    }
    let flags = le_u32(bytes, 12);
    if flags & !FLAG_CLEAN != 0 {
        return Err(MetaCorrupt::Flags(flags));
    }
    Ok(flags & FLAG_CLEAN != 0)
}

fn volume_id_at(bytes: &[u8]) -> VolumeId {
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[16..32]);
    VolumeId(id)
}

impl MetaRecord {
    /// A clean record of a secondary at seq 0, generation 0, without a bitmap.
    #[must_use]
    pub fn new(volume_id: VolumeId, volume_bytes: u64) -> MetaRecord {
        MetaRecord {
            volume_id,
            node_id: NodeId(0),
            role: Role::Secondary,
            volume_bytes,
            durable: Seq::NONE,
            generation: Generation(0),
            clean: true,
            bitmap: BitmapLocation::default(),
        }
    }

    /// A secondary's record: what a target server writes while it runs (`clean` false) and when
    /// it stops gracefully (`clean` true).
    #[must_use]
    pub fn secondary(
        volume_id: VolumeId,
        node_id: NodeId,
        volume_bytes: u64,
        durable: Seq,
        clean: bool,
    ) -> MetaRecord {
        MetaRecord {
            node_id,
            durable,
            clean,
            ..MetaRecord::new(volume_id, volume_bytes)
        }
    }

    /// The version-3 record carrying `write_count`.
    #[must_use]
    pub fn encode(&self, write_count: u64) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        b[0..8].copy_from_slice(&META_MAGIC);
        b[8..12].copy_from_slice(&META_VERSION.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_id.0);
        b[32..40].copy_from_slice(&self.node_id.0.to_le_bytes());
        let role: u32 = match self.role {
            Role::Secondary => 0,
            Role::Primary => 1,
        };
        b[40..44].copy_from_slice(&role.to_le_bytes());
        b[48..56].copy_from_slice(&self.volume_bytes.to_le_bytes());
        b[56..64].copy_from_slice(&self.durable.0.to_le_bytes());
        b[64..72].copy_from_slice(&self.generation.0.to_le_bytes());
        b[72..80].copy_from_slice(&self.bitmap.offset_bytes.to_le_bytes());
        b[80..88].copy_from_slice(&self.bitmap.len_bytes.to_le_bytes());
        b[88..96].copy_from_slice(&write_count.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..96]);
        b[96..100].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses one slot (a version-3 record, or a version-2 one) and its write count.
    pub fn decode(bytes: &[u8]) -> Result<(MetaRecord, u64), MetaCorrupt> {
        if bytes.len() >= 12 && bytes[0..8] == META_MAGIC && le_u32(bytes, 8) == 2 {
            return Self::decode_v2(bytes);
        }
        let clean = check_header(bytes, META_VERSION, 96)?;
        if le_u32(bytes, 44) != 0 {
            return Err(MetaCorrupt::Reserved);
        }
        let role = match le_u32(bytes, 40) {
            0 => Role::Secondary,
            1 => Role::Primary,
            other => return Err(MetaCorrupt::Role(other)),
        };
        let record = MetaRecord {
            volume_id: volume_id_at(bytes),
            node_id: NodeId(le_u64(bytes, 32)),
            role,
            volume_bytes: le_u64(bytes, 48),
            durable: Seq(le_u64(bytes, 56)),
            generation: Generation(le_u64(bytes, 64)),
            clean,
            bitmap: BitmapLocation {
                offset_bytes: le_u64(bytes, 72),
                len_bytes: le_u64(bytes, 80),
            },
        };
        Ok((record, le_u64(bytes, 88)))
    }

    /// Version 2: magic, version, flags, volume id, durable seq (32..40), volume bytes (40..48),
    /// write count (48..56), crc32c (56..60); a target's record.
    fn decode_v2(bytes: &[u8]) -> Result<(MetaRecord, u64), MetaCorrupt> {
        let clean = check_header(bytes, 2, V2_RECORD_BYTES - 4)?;
        let record = MetaRecord {
            durable: Seq(le_u64(bytes, 32)),
            clean,
            ..MetaRecord::new(volume_id_at(bytes), le_u64(bytes, 40))
        };
        Ok((record, le_u64(bytes, 48)))
    }

    /// Version 1: as version 2 without the write count (crc32c at 48..52), the whole file.
    fn decode_v1(bytes: &[u8]) -> Result<MetaRecord, MetaCorrupt> {
        let clean = check_header(bytes, 1, V1_BYTES - 4)?;
        Ok(MetaRecord {
            durable: Seq(le_u64(bytes, 32)),
            clean,
            ..MetaRecord::new(volume_id_at(bytes), le_u64(bytes, 40))
        })
    }

    /// Parses a whole metadata file: the valid slot with the highest write count (and that
    /// count).
    pub fn decode_file(bytes: &[u8]) -> Result<(MetaRecord, u64), MetaCorrupt> {
        if bytes.len() == V1_BYTES {
            return Self::decode_v1(bytes)
                .map(|m| (m, 0))
                .map_err(|e| MetaCorrupt::V1(Box::new(e)));
        }
        if bytes.len() != META_FILE_BYTES {
            return Err(MetaCorrupt::Length {
                len: bytes.len(),
                expected: META_FILE_BYTES,
            });
        }
        let slots = [
            Self::decode(&bytes[..SLOT_BYTES]),
            Self::decode(&bytes[SLOT_BYTES..]),
        ];
        match slots {
            [Ok(a), Ok(b)] => Ok(if b.1 > a.1 { b } else { a }),
            [Ok(a), Err(_)] => Ok(a),
            [Err(_), Ok(b)] => Ok(b),
            [Err(a), Err(b)] => Err(MetaCorrupt::NoValidRecord {
                slot0: Box::new(a),
                slot1: Box::new(b),
            }),
        }
    }

    /// Where the record with `write_count` goes in the file.
    #[must_use]
    pub fn slot_offset(write_count: u64) -> usize {
        if write_count.is_multiple_of(2) {
            0
        } else {
            SLOT_BYTES
        }
    }

    /// A whole file holding only this record, at the slot of `write_count`.
    #[must_use]
    pub fn encode_file(&self, write_count: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; META_FILE_BYTES];
        let slot = Self::slot_offset(write_count);
        bytes[slot..slot + RECORD_BYTES].copy_from_slice(&self.encode(write_count));
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MetaRecord {
        MetaRecord {
            volume_id: VolumeId([0x5a; 16]),
            node_id: NodeId(7),
            role: Role::Primary,
            volume_bytes: 1 << 30,
            durable: Seq(123_456),
            generation: Generation(0x1234_5678_9abc),
            clean: false,
            bitmap: BitmapLocation {
                offset_bytes: 8192,
                len_bytes: 4096,
            },
        }
    }

    #[test]
    fn records_round_trip_and_the_newer_valid_slot_wins() {
        let older = sample();
        let newer = MetaRecord {
            durable: Seq(200_000),
            clean: true,
            ..sample()
        };
        assert_eq!(MetaRecord::decode(&older.encode(3)), Ok((older, 3)));
        let mut file = older.encode_file(0);
        let at = MetaRecord::slot_offset(1);
        file[at..at + RECORD_BYTES].copy_from_slice(&newer.encode(1));
        assert_eq!(MetaRecord::decode_file(&file), Ok((newer, 1)));
        for torn_at in [1, 30, 56, RECORD_BYTES - 1] {
            let mut bytes = file.clone();
            bytes[at + torn_at..at + RECORD_BYTES].fill(0);
            assert_eq!(
                MetaRecord::decode_file(&bytes),
                Ok((older, 0)),
                "torn at {torn_at}"
            );
        }
        let mut both = file.clone();
        both[20] ^= 1;
        both[at + 20] ^= 1;
        assert!(matches!(
            MetaRecord::decode_file(&both),
            Err(MetaCorrupt::NoValidRecord { .. })
        ));
    }

    #[test]
    fn every_corrupted_byte_is_refused() {
        let good = sample().encode(3);
        for at in 0..RECORD_BYTES {
            for bit in [0x01u8, 0x80] {
                let mut bad = good;
                bad[at] ^= bit;
                assert!(
                    MetaRecord::decode(&bad).is_err(),
                    "flip {bit:#x} at byte {at}"
                );
            }
        }
        for len in [
            0,
            1,
            30,
            RECORD_BYTES,
            SLOT_BYTES,
            META_FILE_BYTES - 1,
            META_FILE_BYTES + 1,
        ] {
            let file = sample().encode_file(0);
            let mut bytes = file[..len.min(file.len())].to_vec();
            bytes.resize(len, 0);
            assert!(MetaRecord::decode_file(&bytes).is_err(), "length {len}");
        }
    }

    #[test]
    fn unknown_version_and_role_are_refused_even_with_a_valid_checksum() {
        let reseal = |mut b: [u8; RECORD_BYTES]| {
            let crc = crc32c::crc32c(&b[0..96]);
            b[96..100].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut bytes = sample().encode(0);
        bytes[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert_eq!(
            MetaRecord::decode(&reseal(bytes)),
            Err(MetaCorrupt::Version(4))
        );
        let mut bytes = sample().encode(0);
        bytes[40..44].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            MetaRecord::decode(&reseal(bytes)),
            Err(MetaCorrupt::Role(2))
        );
    }

    /// The earlier formats, as they were written.
    fn encode_v2(m: &MetaRecord, write_count: u64) -> Vec<u8> {
        let mut b = vec![0u8; V2_RECORD_BYTES];
        b[0..8].copy_from_slice(&META_MAGIC);
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(m.clean).to_le_bytes());
        b[16..32].copy_from_slice(&m.volume_id.0);
        b[32..40].copy_from_slice(&m.durable.0.to_le_bytes());
        b[40..48].copy_from_slice(&m.volume_bytes.to_le_bytes());
        b[48..56].copy_from_slice(&write_count.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn versions_1_and_2_are_read_as_a_secondary_of_generation_0() {
        let target = MetaRecord {
            durable: Seq(99),
            clean: true,
            ..MetaRecord::new(VolumeId([3; 16]), 1 << 20)
        };
        let mut file = vec![0u8; META_FILE_BYTES];
        file[SLOT_BYTES..SLOT_BYTES + V2_RECORD_BYTES].copy_from_slice(&encode_v2(&target, 5));
        assert_eq!(MetaRecord::decode_file(&file), Ok((target, 5)));
        let mut v1 = encode_v2(&target, 0)[..V1_BYTES].to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&v1[0..48]);
        v1[48..52].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(MetaRecord::decode_file(&v1), Ok((target, 0)));
        v1[40] ^= 1;
        assert_eq!(
            MetaRecord::decode_file(&v1),
            Err(MetaCorrupt::V1(Box::new(MetaCorrupt::Checksum)))
        );
    }
}
