//! A node's persistent metadata record, for both roles: which volume and node this is, its role,
//! its generation ids ([`GenIds`]), the last durable sequence number, whether the previous run stopped
//! cleanly, whether the data is known to be consistent, and where a dirty bitmap lives (none yet).
//! The bytes, their checks and the size of the metadata area live here; the drivers keep the
//! record at the end of the volume's backing (`mirror-storage`) and decide nothing about it:
//! [`crate::target::recover`] says what a restarted target trusts.
//!
//! Metadata is internal, as DRBD's: a backing of `B` bytes holds the data area `[0, volume_bytes)`
//! and the metadata area `[volume_bytes, B)`. The area begins with room for the dirty bitmap
//! ([`bitmap_room_bytes`]: one bit per [`BITMAP_CHUNK_BYTES`] chunk) and ends with the two record
//! slots ([`META_SLOTS_BYTES`], so a reader finds them from the backing's size alone); its size is
//! [`meta_area_bytes`] (rounded up to [`META_AREA_ALIGN_BYTES`]) or more, and is recorded.
//!
//! Each update overwrites the slot that does not hold the newest record, so a torn update leaves
//! the previous record intact. A record (version 6, [`RECORD_BYTES`] bytes, little endian):
//!
//! | bytes    | field          | meaning                                                  |
//! |----------|----------------|----------------------------------------------------------|
//! | 0..8     | magic          | `"UBMRMETA"`                                             |
//! | 8..12    | version        | [`META_VERSION`]                                         |
//! | 12..16   | flags          | bit 0: clean (all applied writes were synced); bit 1: consistent (the data is a prefix of the mirror's writes, once any resync in progress ends); bit 2: resyncing (a resync bracket was applied in part: not a prefix until its end is durable); bit 3: that bracket is a full resync (its end makes data of unknown content consistent); bit 4: a primary's peer is outdated (writes recorded out of sync have no durable resync end there yet) |
//! | 16..32   | volume id      | the mirrored volume                                      |
//! | 32..40   | node id        | the node that wrote it                                   |
//! | 40..44   | role           | 0: secondary (target), 1: primary                        |
//! | 44..48   | reserved       | zero                                                     |
//! | 48..56   | volume bytes   | size of the data area                                    |
//! | 56..64   | durable seq    | last operation applied and synced                        |
//! | 64..72   | current id     | the history the volume holds ([`GenIds::current`])       |
//! | 72..80   | bitmap offset  | where the dirty bitmap starts (0 with length 0: none)    |
//! | 80..88   | bitmap bytes   | its length                                               |
//! | 88..96   | area bytes     | size of the metadata area (0: kept apart from the data)  |
//! | 96..104  | bitmap id      | the history the dirty bitmap counts from ([`GenIds::bitmap`]) |
//! | 104..120 | history ids    | two earlier histories, newest first ([`GenIds::history`]) |
//! | 120..128 | write count    | incremented by every update; the higher valid slot wins  |
//! | 128..132 | crc32c         | CRC32C of bytes 0..128                                   |
//!
//! Version 5 is this layout without bit 4 (read as not outdated). Version 4 (108 bytes: this
//! layout up to the area bytes, with the write count at 96..104 and
//! the crc32c of 0..104 at 104..108; its one "generation" at 64..72 reads as the current id) is
//! read for the upgrade, in place. Earlier versions were kept in a separate file
//! (`<volume>.meta`) and are read for the upgrade: version 1 (one 52-byte record, the whole
//! file), 2 (two 60-byte slots, without node, role, generation and bitmap), 3 (two 100-byte
//! slots, the version-4 layout without area bytes: write count at 88..96, crc32c of 0..96 at
//! 96..100). They read as consistent, with no metadata area.

use crate::genid::GenIds;
use crate::types::{Generation, NodeId, Seq, VolumeId};
use crate::wire::{le_u32, le_u64};

/// `"UBMRMETA"`.
pub const META_MAGIC: [u8; 8] = *b"UBMRMETA";
/// The format version this code writes.
pub const META_VERSION: u32 = 6;
/// Bytes in one version-5 or version-6 record.
pub const RECORD_BYTES: usize = 132;
/// Distance between the two slots (records never share a page or a sector).
pub const SLOT_BYTES: usize = 4096;
/// Bytes of the two slots (a legacy metadata file, or the end of the metadata area).
pub const META_FILE_BYTES: usize = 2 * SLOT_BYTES;
/// [`META_FILE_BYTES`] as a byte count on disk.
pub const META_SLOTS_BYTES: u64 = META_FILE_BYTES as u64;
/// Chunk size the bitmap room is reserved for (one bit per chunk).
pub const BITMAP_CHUNK_BYTES: u64 = 64 << 10;
/// The metadata area's size is a multiple of this.
pub const META_AREA_ALIGN_BYTES: u64 = 1 << 20;
const V1_BYTES: usize = 52;
const V2_RECORD_BYTES: usize = 60;
const V3_RECORD_BYTES: usize = 100;
const V4_RECORD_BYTES: usize = 108;
const FLAG_CLEAN: u32 = 1;
const FLAG_CONSISTENT: u32 = 2;
const FLAG_RESYNCING: u32 = 4;
const FLAG_RESYNC_FULL: u32 = 8;
const FLAG_PEER_OUTDATED: u32 = 16;

/// Bytes reserved for the dirty bitmap of a data area of `volume_bytes`: one bit per
/// [`BITMAP_CHUNK_BYTES`], in whole 4 KiB pages.
#[must_use]
pub fn bitmap_room_bytes(volume_bytes: u64) -> u64 {
    let chunks = volume_bytes.div_ceil(BITMAP_CHUNK_BYTES);
    chunks.div_ceil(8).div_ceil(SLOT_BYTES as u64) * SLOT_BYTES as u64
}

/// The size rule of the metadata area behind a data area of `volume_bytes`: the bitmap room and
/// the two slots, rounded up to [`META_AREA_ALIGN_BYTES`] (1 MiB up to 32 GiB of data, then
/// 1 MiB more per 32 GiB). A backing may hold a larger area (a block device's slack).
#[must_use]
pub fn meta_area_bytes(volume_bytes: u64) -> u64 {
    (bitmap_room_bytes(volume_bytes) + META_SLOTS_BYTES).div_ceil(META_AREA_ALIGN_BYTES)
        * META_AREA_ALIGN_BYTES
}

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
    /// Which data histories the volume holds and its bitmap counts from.
    pub gen_ids: GenIds,
    /// Whether the run that wrote this stopped cleanly.
    pub clean: bool,
    /// Whether the data is known to be a prefix of the mirror's writes. False for a volume of
    /// unknown content (initialised without a record); only a full resync makes it true.
    pub consistent: bool,
    /// Whether part of a resync bracket ([`crate::wire::ResyncMark`]) was applied and its end
    /// was not: the data is not a prefix of the mirror's writes until a resync's end is durable.
    pub resyncing: bool,
    /// Whether that bracket is a full resync (every chunk): its end makes data of unknown
    /// content consistent.
    pub resync_full: bool,
    /// A primary's: its peer's copy lacks writes recorded out of sync (an overflow, a degraded
    /// `sync`) until a resync's end after them is durable there; the peer is outdated.
    pub peer_outdated: bool,
    /// The dirty bitmap, if any.
    pub bitmap: BitmapLocation,
    /// Size of the metadata area behind the data area (0: the record is kept apart, in memory or
    /// a legacy file).
    pub meta_area_bytes: u64,
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

impl MetaCorrupt {
    /// Whether no record was ever stored there, as opposed to a record that was damaged: every
    /// slot is all zeroes (a new volume) or lacks the record's magic (a volume's own data, such as
    /// the last blocks of a volume whose metadata lived in a legacy file). The two slots are
    /// written alternately, so a torn write damages one of them, never the magic of both: except
    /// the very first store, after which the other slot still holds no record (a first record
    /// torn before its magic reached the disk reads as no record).
    #[must_use]
    pub fn holds_no_record(&self) -> bool {
        match self {
            MetaCorrupt::Empty | MetaCorrupt::BadMagic => true,
            MetaCorrupt::NoValidRecord { slot0, slot1 } => {
                slot0.holds_no_record() && slot1.holds_no_record()
            }
            _ => false,
        }
    }
}

/// Magic, checksum (of `bytes[..crc_at]`, stored at `crc_at`), version and flags; returns the
/// flags.
fn check_header(bytes: &[u8], version_wanted: u32, crc_at: usize) -> Result<u32, MetaCorrupt> {
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
    let known = if version_wanted >= 6 {
        FLAG_CLEAN | FLAG_CONSISTENT | FLAG_RESYNCING | FLAG_RESYNC_FULL | FLAG_PEER_OUTDATED
    } else if version_wanted >= 5 {
        FLAG_CLEAN | FLAG_CONSISTENT | FLAG_RESYNCING | FLAG_RESYNC_FULL
    } else if version_wanted >= 4 {
        FLAG_CLEAN | FLAG_CONSISTENT
    } else {
        FLAG_CLEAN
    };
    if flags & !known != 0 {
        return Err(MetaCorrupt::Flags(flags));
    }
    Ok(flags)
}

fn volume_id_at(bytes: &[u8]) -> VolumeId {
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[16..32]);
    VolumeId(id)
}

/// What a driver knows of its volume at start, for the recovery rules of either role
/// ([`crate::target::recover`], [`crate::node::recover_primary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeFacts {
    /// The volume the node is configured for.
    pub volume_id: VolumeId,
    /// The volume's data size now.
    pub volume_bytes: u64,
    /// Whether the driver just created the volume (it held nothing before).
    pub created: bool,
}

/// Why a record does not describe the volume it was found on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingError {
    /// Metadata exists for a volume that was just created: it describes an earlier volume.
    #[error("the volume was just created but metadata of an earlier volume exists")]
    MetaOfEarlierVolume,
    /// The metadata names another volume.
    #[error("it belongs to volume {found}, not {expected}")]
    OtherVolume {
        /// The id in the metadata.
        found: VolumeId,
        /// The configured id.
        expected: VolumeId,
    },
    /// The volume's size changed since the metadata was written.
    #[error("it records a volume of {recorded} bytes, the volume has {actual}")]
    Size {
        /// The size in the metadata.
        recorded: u64,
        /// The size now.
        actual: u64,
    },
}

impl MetaRecord {
    /// The record a node keeps while it runs in `role` with `durable`: the one it `loaded` (its
    /// generation ids and bitmap location kept) or a new one for the volume of `facts`; this node's,
    /// and not clean until a clean stop says otherwise.
    #[must_use]
    pub fn running(
        loaded: Option<&MetaRecord>,
        facts: &VolumeFacts,
        node_id: NodeId,
        role: Role,
        durable: Seq,
    ) -> MetaRecord {
        let base = loaded.map_or_else(
            || MetaRecord::new(facts.volume_id, facts.volume_bytes),
            |r| *r,
        );
        MetaRecord {
            node_id,
            role,
            durable,
            clean: false,
            ..base
        }
    }

    /// Whether this record describes the volume of `facts`: not a volume just created, the
    /// configured volume id, the same data size. Both roles' recovery rules start here.
    pub fn check_binding(&self, facts: &VolumeFacts) -> Result<(), BindingError> {
        if facts.created {
            return Err(BindingError::MetaOfEarlierVolume);
        }
        if self.volume_id != facts.volume_id {
            return Err(BindingError::OtherVolume {
                found: self.volume_id,
                expected: facts.volume_id,
            });
        }
        if self.volume_bytes != facts.volume_bytes {
            return Err(BindingError::Size {
                recorded: self.volume_bytes,
                actual: facts.volume_bytes,
            });
        }
        Ok(())
    }

    /// A clean, consistent record of a secondary at seq 0, without generation ids (it holds no
    /// history of its own), a bitmap or a metadata area.
    #[must_use]
    pub fn new(volume_id: VolumeId, volume_bytes: u64) -> MetaRecord {
        MetaRecord {
            volume_id,
            node_id: NodeId(0),
            role: Role::Secondary,
            volume_bytes,
            durable: Seq::NONE,
            gen_ids: GenIds::default(),
            clean: true,
            consistent: true,
            resyncing: false,
            resync_full: false,
            peer_outdated: false,
            bitmap: BitmapLocation::default(),
            meta_area_bytes: 0,
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

    /// A legacy (external) record moved into a metadata area of `meta_area_bytes`. If the volume
    /// was written after the record (`volume_newer`: its modification time is later), it may have
    /// been replaced or changed behind the record's back, so its data is no longer vouched for.
    #[must_use]
    pub fn upgraded(self, meta_area_bytes: u64, volume_newer: bool) -> MetaRecord {
        MetaRecord {
            meta_area_bytes,
            consistent: self.consistent && !volume_newer,
            ..self
        }
    }

    /// The version-6 record carrying `write_count`.
    #[must_use]
    pub fn encode(&self, write_count: u64) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        b[0..8].copy_from_slice(&META_MAGIC);
        b[8..12].copy_from_slice(&META_VERSION.to_le_bytes());
        let mut flags = if self.clean { FLAG_CLEAN } else { 0 };
        if self.consistent {
            flags |= FLAG_CONSISTENT;
        }
        if self.resync_full {
            flags |= FLAG_RESYNC_FULL;
        }
        if self.resyncing {
            flags |= FLAG_RESYNCING;
        }
        if self.peer_outdated {
            flags |= FLAG_PEER_OUTDATED;
        }
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
        b[64..72].copy_from_slice(&self.gen_ids.current.0.to_le_bytes());
        b[72..80].copy_from_slice(&self.bitmap.offset_bytes.to_le_bytes());
        b[80..88].copy_from_slice(&self.bitmap.len_bytes.to_le_bytes());
        b[88..96].copy_from_slice(&self.meta_area_bytes.to_le_bytes());
        b[96..104].copy_from_slice(&self.gen_ids.bitmap.0.to_le_bytes());
        b[104..112].copy_from_slice(&self.gen_ids.history[0].0.to_le_bytes());
        b[112..120].copy_from_slice(&self.gen_ids.history[1].0.to_le_bytes());
        b[120..128].copy_from_slice(&write_count.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..128]);
        b[128..132].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses one slot (a version-6 record, or a version-5, 4, 3 or 2 one) and its write count.
    pub fn decode(bytes: &[u8]) -> Result<(MetaRecord, u64), MetaCorrupt> {
        let tagged = bytes.len() >= 12 && bytes[0..8] == META_MAGIC;
        let found = if tagged { le_u32(bytes, 8) } else { 0 };
        if found == 2 {
            return Self::decode_v2(bytes);
        }
        let (version, crc_at) = match found {
            3 => (3, V3_RECORD_BYTES - 4),
            4 => (4, V4_RECORD_BYTES - 4),
            5 => (5, RECORD_BYTES - 4),
            _ => (META_VERSION, RECORD_BYTES - 4),
        };
        let v3 = version == 3;
        let flags = check_header(bytes, version, crc_at)?;
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
            gen_ids: GenIds {
                current: Generation(le_u64(bytes, 64)),
                bitmap: Generation(if version >= 5 { le_u64(bytes, 96) } else { 0 }),
                history: if version >= 5 {
                    [
                        Generation(le_u64(bytes, 104)),
                        Generation(le_u64(bytes, 112)),
                    ]
                } else {
                    [Generation::NONE; 2]
                },
            },
            clean: flags & FLAG_CLEAN != 0,
            // Before version 4 nothing was initialised on a volume of unknown content.
            consistent: v3 || flags & FLAG_CONSISTENT != 0,
            resyncing: flags & FLAG_RESYNCING != 0,
            resync_full: flags & FLAG_RESYNC_FULL != 0,
            peer_outdated: flags & FLAG_PEER_OUTDATED != 0,
            bitmap: BitmapLocation {
                offset_bytes: le_u64(bytes, 72),
                len_bytes: le_u64(bytes, 80),
            },
            meta_area_bytes: if v3 { 0 } else { le_u64(bytes, 88) },
        };
        let write_count_at = match version {
            3 => 88,
            4 => 96,
            _ => 120,
        };
        Ok((record, le_u64(bytes, write_count_at)))
    }

    /// Version 2: magic, version, flags, volume id, durable seq (32..40), volume bytes (40..48),
    /// write count (48..56), crc32c (56..60); a target's record.
    fn decode_v2(bytes: &[u8]) -> Result<(MetaRecord, u64), MetaCorrupt> {
        let clean = check_header(bytes, 2, V2_RECORD_BYTES - 4)? & FLAG_CLEAN != 0;
        let record = MetaRecord {
            durable: Seq(le_u64(bytes, 32)),
            clean,
            ..MetaRecord::new(volume_id_at(bytes), le_u64(bytes, 40))
        };
        Ok((record, le_u64(bytes, 48)))
    }

    /// Version 1: as version 2 without the write count (crc32c at 48..52), the whole file.
    fn decode_v1(bytes: &[u8]) -> Result<MetaRecord, MetaCorrupt> {
        let clean = check_header(bytes, 1, V1_BYTES - 4)? & FLAG_CLEAN != 0;
        Ok(MetaRecord {
            durable: Seq(le_u64(bytes, 32)),
            clean,
            ..MetaRecord::new(volume_id_at(bytes), le_u64(bytes, 40))
        })
    }

    /// Parses both slots (or a whole version-1 file): the valid slot with the highest write
    /// count (and that count).
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

    /// Where the record with `write_count` goes among the two slots.
    #[must_use]
    pub fn slot_offset(write_count: u64) -> usize {
        if write_count.is_multiple_of(2) {
            0
        } else {
            SLOT_BYTES
        }
    }

    /// Both slots holding only this record, at the slot of `write_count`.
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
            gen_ids: GenIds {
                current: Generation(0x1234_5678_9abc),
                bitmap: Generation(0x77),
                history: [Generation(0x66), Generation(0x55)],
            },
            clean: false,
            consistent: false,
            resyncing: false,
            resync_full: false,
            peer_outdated: false,
            bitmap: BitmapLocation {
                offset_bytes: 8192,
                len_bytes: 4096,
            },
            meta_area_bytes: 3 << 20,
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
            let crc = crc32c::crc32c(&b[0..128]);
            b[128..132].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut bytes = sample().encode(0);
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            MetaRecord::decode(&reseal(bytes)),
            Err(MetaCorrupt::Version(7))
        );
        let mut bytes = sample().encode(0);
        bytes[12..16].copy_from_slice(&32u32.to_le_bytes());
        assert_eq!(
            MetaRecord::decode(&reseal(bytes)),
            Err(MetaCorrupt::Flags(32))
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

    /// Version 4 as it was written: this layout up to the area bytes, write count at 96..104.
    fn encode_v4(m: &MetaRecord, write_count: u64) -> Vec<u8> {
        let mut b = m.encode(write_count)[..V4_RECORD_BYTES].to_vec();
        b[8..12].copy_from_slice(&4u32.to_le_bytes());
        b[96..104].copy_from_slice(&write_count.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..104]);
        b[104..108].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Version 6 keeps whether a primary's peer is outdated; version 5, the same layout without
    /// that flag, reads as not outdated and refuses the bit.
    #[test]
    fn the_outdated_peer_flag_is_version_6() {
        let written = MetaRecord {
            role: Role::Primary,
            peer_outdated: true,
            ..sample()
        };
        let (read, _) = MetaRecord::decode(&written.encode(3)).unwrap();
        assert_eq!(read, written);
        let as_v5 = |flags: u32| {
            let mut b = written.encode(3);
            b[8..12].copy_from_slice(&5u32.to_le_bytes());
            b[12..16].copy_from_slice(&flags.to_le_bytes());
            let crc = crc32c::crc32c(&b[0..128]);
            b[128..132].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let (old, _) = MetaRecord::decode(&as_v5(FLAG_CONSISTENT)).unwrap();
        assert!(!old.peer_outdated && old.consistent);
        assert_eq!(
            MetaRecord::decode(&as_v5(FLAG_CONSISTENT | FLAG_PEER_OUTDATED)),
            Err(MetaCorrupt::Flags(FLAG_CONSISTENT | FLAG_PEER_OUTDATED))
        );
    }

    /// Version 4's one generation is the current id; it had no bitmap or history ids.
    #[test]
    fn version_4_reads_its_generation_as_the_current_id() {
        let written = sample();
        let mut file = vec![0u8; META_FILE_BYTES];
        file[..V4_RECORD_BYTES].copy_from_slice(&encode_v4(&written, 8));
        let read = MetaRecord {
            gen_ids: GenIds {
                current: written.gen_ids.current,
                ..GenIds::default()
            },
            ..written
        };
        assert_eq!(MetaRecord::decode_file(&file), Ok((read, 8)));
        // A newer version-5 record in the other slot wins; the version-4 one is what is left
        // after a torn first update.
        let at = MetaRecord::slot_offset(9);
        file[at..at + RECORD_BYTES].copy_from_slice(&written.encode(9));
        assert_eq!(MetaRecord::decode_file(&file), Ok((written, 9)));
        file[at + 100] ^= 1;
        assert_eq!(MetaRecord::decode_file(&file), Ok((read, 8)));
        file[70] ^= 1;
        assert!(MetaRecord::decode_file(&file).is_err());
    }

    /// Version 3 as it was written: this layout up to the bitmap, write count at 88..96.
    fn encode_v3(m: &MetaRecord, write_count: u64) -> Vec<u8> {
        let mut b = m.encode(write_count)[..V3_RECORD_BYTES].to_vec();
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(m.clean).to_le_bytes());
        b[88..96].copy_from_slice(&write_count.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..96]);
        b[96..100].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn version_3_reads_as_consistent_without_a_metadata_area() {
        let written = MetaRecord {
            consistent: true,
            meta_area_bytes: 0,
            gen_ids: GenIds {
                current: Generation(9),
                ..GenIds::default()
            },
            ..sample()
        };
        let mut file = vec![0u8; META_FILE_BYTES];
        file[SLOT_BYTES..SLOT_BYTES + V3_RECORD_BYTES].copy_from_slice(&encode_v3(&written, 7));
        assert_eq!(MetaRecord::decode_file(&file), Ok((written, 7)));
        file[SLOT_BYTES + 60] ^= 1;
        assert!(MetaRecord::decode_file(&file).is_err());
    }

    #[test]
    fn the_area_holds_the_bitmap_room_and_the_slots_in_whole_mebibytes() {
        assert_eq!(bitmap_room_bytes(1 << 20), 4096);
        assert_eq!(meta_area_bytes(1 << 20), 1 << 20);
        // 32 GiB of data: 512 Ki chunks, a 64 KiB bitmap; with the slots still within 1 MiB.
        assert_eq!(bitmap_room_bytes(32 << 30), 64 << 10);
        assert_eq!(meta_area_bytes(32 << 30), 1 << 20);
        // 16 TiB: a 32 MiB bitmap plus the slots.
        assert_eq!(meta_area_bytes(16 << 40), 33 << 20);
        for v in [512, 4096, (1 << 30) + 512, 1 << 40] {
            let a = meta_area_bytes(v);
            assert!(a.is_multiple_of(META_AREA_ALIGN_BYTES));
            assert!(a >= bitmap_room_bytes(v) + META_SLOTS_BYTES, "{v}");
        }
    }

    #[test]
    fn only_slots_without_the_magic_hold_no_record() {
        let zeros = vec![0u8; META_FILE_BYTES];
        assert!(MetaRecord::decode_file(&zeros)
            .unwrap_err()
            .holds_no_record());
        let data: Vec<u8> = (0..META_FILE_BYTES)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        assert!(MetaRecord::decode_file(&data)
            .unwrap_err()
            .holds_no_record());
        let mut damaged = sample().encode_file(0);
        damaged[20] ^= 1;
        assert!(!MetaRecord::decode_file(&damaged)
            .unwrap_err()
            .holds_no_record());
        // One slot's record torn, the other never written over a volume's data.
        let mut torn = data.clone();
        let record = sample().encode(0);
        torn[..record.len()].copy_from_slice(&record);
        torn[20] ^= 1;
        assert!(!MetaRecord::decode_file(&torn)
            .unwrap_err()
            .holds_no_record());
    }

    #[test]
    fn versions_1_and_2_are_read_as_a_secondary_without_generation_ids() {
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

    #[test]
    fn the_resyncing_flag_round_trips() {
        let record = MetaRecord {
            resyncing: true,
            ..sample()
        };
        assert_eq!(MetaRecord::decode(&record.encode(3)), Ok((record, 3)));
        let full = MetaRecord {
            resync_full: true,
            ..record
        };
        assert_eq!(MetaRecord::decode(&full.encode(3)), Ok((full, 3)));
        assert_eq!(MetaRecord::decode(&sample().encode(3)), Ok((sample(), 3)));
    }
}
