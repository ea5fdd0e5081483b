//! The dirty bitmap: which chunks of a volume may differ from the peer's copy (SPEC §3 and §4).
//!
//! One bit per chunk (a power of two, [`crate::meta::BITMAP_CHUNK_BYTES`] by default). A chunk is
//! marked before a write to it can reach the local volume and cleared once the peer holds every
//! write to it durably; resync ships the marked chunks. [`DirtyBitmap::mark`] says how many
//! chunks a write newly marks, which is when the persisted copy must be updated before the
//! write: writes into chunks already marked cost nothing (activity-log style amortisation).
//!
//! The primary's write intent ([`crate::node::WriteIntent`]) keeps two of these maps; the
//! simulator stores its map through these bytes, the daemon in one of two alternating slots of
//! its volume's metadata area ([`DirtyBitmap::encode_slot`]).

/// `"UBMRINTN"`: a slot of a stored write intent.
const SLOT_MAGIC: [u8; 8] = *b"UBMRINTN";
/// Magic, write count, map bytes, checksum of the count and the map.
const SLOT_HEADER_BYTES: usize = 8 + 8 + 4 + 4;
/// A slot is a whole number of these (pages never shared by the two slots).
const SLOT_ALIGN_BYTES: u64 = 4096;

use crate::Range;

/// The smallest chunk: one page.
pub const CHUNK_BYTES_MIN: u64 = 4096;

const MAGIC: [u8; 8] = *b"UMBITMAP";
const VERSION: u32 = 1;
/// Magic, version, chunk shift, chunk count, checksum.
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 4;

/// Why a bitmap cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The chunk size is not a power of two of at least one page.
    #[error("chunk size {0} is not a power of two of at least {CHUNK_BYTES_MIN} bytes")]
    ChunkBytes(u64),
}

/// Why stored bitmap bytes cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapCorrupt {
    /// Not a bitmap.
    #[error("bad magic")]
    BadMagic,
    /// A version this code does not read.
    #[error("unsupported version {0}")]
    Version(u32),
    /// Shorter or longer than its header says.
    #[error("{len} bytes, expected {expected}")]
    Length {
        /// What was found.
        len: usize,
        /// What the header implies.
        expected: usize,
    },
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
    /// The header's chunk size is not valid.
    #[error("chunk shift {0} out of range")]
    ChunkShift(u32),
    /// Bits are set past the last chunk.
    #[error("bits set past the last chunk")]
    Trailing,
}

/// A volume's chunk map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    chunk_shift: u32,
    chunks: u64,
    words: Vec<u64>,
    dirty: u64,
}

impl DirtyBitmap {
    /// A clean map of a volume of `volume_bytes` in chunks of `chunk_bytes`.
    pub fn new(volume_bytes: u64, chunk_bytes: u64) -> Result<DirtyBitmap, BitmapError> {
        if !chunk_bytes.is_power_of_two() || chunk_bytes < CHUNK_BYTES_MIN {
            return Err(BitmapError::ChunkBytes(chunk_bytes));
        }
        let chunks = volume_bytes.div_ceil(chunk_bytes);
        let words = usize::try_from(chunks.div_ceil(64)).unwrap_or(usize::MAX);
        Ok(DirtyBitmap {
            chunk_shift: chunk_bytes.trailing_zeros(),
            chunks,
            words: vec![0; words],
            dirty: 0,
        })
    }

    /// The chunk size.
    #[must_use]
    pub fn chunk_bytes(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// Chunks of the volume.
    #[must_use]
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Marked chunks.
    #[must_use]
    pub fn dirty_chunks(&self) -> u64 {
        self.dirty
    }

    /// The chunks `range` touches (empty for an empty range; clipped at the volume's end).
    #[must_use]
    pub fn chunks_of(&self, range: Range) -> std::ops::Range<u64> {
        self.span(range)
    }

    fn span(&self, range: Range) -> std::ops::Range<u64> {
        if range.len_bytes == 0 {
            return 0..0;
        }
        let first = range.offset_bytes >> self.chunk_shift;
        let last = (range.end_bytes() - 1) >> self.chunk_shift;
        first.min(self.chunks)..(last + 1).min(self.chunks)
    }

    fn bit(chunk: u64) -> (usize, u64) {
        (
            usize::try_from(chunk / 64).unwrap_or(usize::MAX),
            1 << (chunk % 64),
        )
    }

    /// Whether `chunk` is marked.
    #[must_use]
    pub fn is_dirty(&self, chunk: u64) -> bool {
        let (w, b) = Self::bit(chunk);
        self.words.get(w).is_some_and(|word| word & b != 0)
    }

    /// Marks every chunk `range` touches; returns how many were not marked before (when that is
    /// not 0, the persisted copy must be updated before the write reaches the local volume).
    pub fn mark(&mut self, range: Range) -> u64 {
        let mut newly = 0;
        for chunk in self.span(range) {
            let (w, b) = Self::bit(chunk);
            if let Some(word) = self.words.get_mut(w) {
                if *word & b == 0 {
                    *word |= b;
                    newly += 1;
                }
            }
        }
        self.dirty += newly;
        newly
    }

    /// Marks `chunk` (past the end: nothing).
    pub fn mark_chunk(&mut self, chunk: u64) {
        if chunk < self.chunks {
            let (w, b) = Self::bit(chunk);
            if self.words[w] & b == 0 {
                self.words[w] |= b;
                self.dirty += 1;
            }
        }
    }

    /// Marks every chunk `other` marks (a map of the same geometry).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
        self.dirty = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// The map's words: chunk `c` is bit `c % 64` of word `c / 64`.
    #[must_use]
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Clears `chunk` (the peer holds every write to it durably, or a resync shipped it).
    pub fn clear(&mut self, chunk: u64) {
        let (w, b) = Self::bit(chunk);
        if let Some(word) = self.words.get_mut(w) {
            if *word & b != 0 {
                *word &= !b;
                self.dirty -= 1;
            }
        }
    }

    /// Whether every chunk `range` touches is marked.
    #[must_use]
    pub fn covers(&self, range: Range) -> bool {
        self.span(range).all(|chunk| self.is_dirty(chunk))
    }

    /// The marked chunks, in order.
    pub fn dirty(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::successors(self.next_dirty(0), |&c| self.next_dirty(c + 1))
    }

    /// The first marked chunk at or after `from` (a word at a time: a resync walks a large,
    /// mostly clean map).
    #[must_use]
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        if from >= self.chunks {
            return None;
        }
        let (mut w, bit) = Self::bit(from);
        let mut word = self.words.get(w)? & !(bit - 1);
        loop {
            if word != 0 {
                let chunk = (w as u64) * 64 + u64::from(word.trailing_zeros());
                return (chunk < self.chunks).then_some(chunk);
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    /// The bytes of `chunk`, clipped at the volume's end (`volume_bytes`).
    #[must_use]
    pub fn chunk_range(&self, chunk: u64, volume_bytes: u64) -> Range {
        let start = chunk << self.chunk_shift;
        let end = (start + self.chunk_bytes()).min(volume_bytes);
        Range::new(start, end.saturating_sub(start))
    }

    /// The stored form: a checksummed header, then the words, little-endian.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + self.words.len() * 8);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.chunk_shift.to_le_bytes());
        out.extend_from_slice(&self.chunks.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for word in &self.words {
            out.extend_from_slice(&word.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out[HEADER_BYTES - 4..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Bytes of one slot ([`Self::encode_slot`]) of a map of this geometry, in whole pages.
    #[must_use]
    pub fn slot_bytes(&self) -> u64 {
        let len = (SLOT_HEADER_BYTES + HEADER_BYTES + self.words.len() * 8) as u64;
        len.div_ceil(SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES
    }

    /// The map as one of two alternating slots, with the count of its store: the loader takes
    /// the valid slot with the higher count, so a torn store leaves the one before it.
    #[must_use]
    pub fn encode_slot(&self, write_count: u64) -> Vec<u8> {
        let map = self.encode();
        let mut out = Vec::with_capacity(SLOT_HEADER_BYTES + map.len());
        out.extend_from_slice(&SLOT_MAGIC);
        out.extend_from_slice(&write_count.to_le_bytes());
        out.extend_from_slice(&u32::try_from(map.len()).unwrap_or(u32::MAX).to_le_bytes());
        let mut crc = crc32c::crc32c(&out[8..20]);
        crc = crc32c::crc32c_append(crc, &map);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&map);
        out
    }

    /// One slot's bytes (padding after the map is ignored): `None` for a slot never written
    /// (all zero), else its map and write count, or why it cannot be trusted.
    pub fn decode_slot(bytes: &[u8]) -> Result<Option<(DirtyBitmap, u64)>, BitmapCorrupt> {
        if bytes.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if bytes.len() < SLOT_HEADER_BYTES {
            return Err(BitmapCorrupt::Length {
                len: bytes.len(),
                expected: SLOT_HEADER_BYTES,
            });
        }
        if bytes[..8] != SLOT_MAGIC {
            return Err(BitmapCorrupt::BadMagic);
        }
        let u64_at = |at: usize| bytes[at..at + 8].try_into().map_or(0, u64::from_le_bytes);
        let u32_at = |at: usize| bytes[at..at + 4].try_into().map_or(0, u32::from_le_bytes);
        let write_count = u64_at(8);
        let len = usize::try_from(u32_at(16)).unwrap_or(usize::MAX);
        let Some(map) = bytes.get(SLOT_HEADER_BYTES..SLOT_HEADER_BYTES.saturating_add(len)) else {
            return Err(BitmapCorrupt::Length {
                len: bytes.len(),
                expected: SLOT_HEADER_BYTES.saturating_add(len),
            });
        };
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[8..20]), map);
        if crc != u32_at(20) {
            return Err(BitmapCorrupt::Checksum);
        }
        Ok(Some((DirtyBitmap::decode(map)?, write_count)))
    }

    /// The newest valid map of two slots: `None` if neither was ever written; an error if none
    /// is valid, or if a damaged one could be the newer (a slot never written next to a damaged
    /// one is damage too).
    pub fn decode_slots(a: &[u8], b: &[u8]) -> Result<Option<DirtyBitmap>, BitmapCorrupt> {
        match (DirtyBitmap::decode_slot(a), DirtyBitmap::decode_slot(b)) {
            (Ok(None), Ok(None)) => Ok(None),
            (Ok(Some((x, n))), Ok(Some((y, m)))) => Ok(Some(if n >= m { x } else { y })),
            // A store went to the slot that is damaged or empty: the other holds the one before.
            (Ok(Some((x, _))), Err(_) | Ok(None)) | (Err(_) | Ok(None), Ok(Some((x, _)))) => {
                Ok(Some(x))
            }
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// Reads the stored form back; every defect is an error, never a silently cleaner map.
    pub fn decode(bytes: &[u8]) -> Result<DirtyBitmap, BitmapCorrupt> {
        let le_u32 = |at: usize| {
            bytes
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        if bytes.len() < HEADER_BYTES {
            return Err(BitmapCorrupt::Length {
                len: bytes.len(),
                expected: HEADER_BYTES,
            });
        }
        if bytes[..8] != MAGIC {
            return Err(BitmapCorrupt::BadMagic);
        }
        let version = le_u32(8);
        if version != VERSION {
            return Err(BitmapCorrupt::Version(version));
        }
        let chunk_shift = le_u32(12);
        if !(CHUNK_BYTES_MIN.trailing_zeros()..63).contains(&chunk_shift) {
            return Err(BitmapCorrupt::ChunkShift(chunk_shift));
        }
        let chunks = bytes
            .get(16..24)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes);
        let words = usize::try_from(chunks.div_ceil(64)).unwrap_or(usize::MAX);
        let expected = words.saturating_mul(8).saturating_add(HEADER_BYTES);
        if bytes.len() != expected {
            return Err(BitmapCorrupt::Length {
                len: bytes.len(),
                expected,
            });
        }
        let mut copy = bytes.to_vec();
        copy[HEADER_BYTES - 4..HEADER_BYTES].fill(0);
        if crc32c::crc32c(&copy) != le_u32(HEADER_BYTES - 4) {
            return Err(BitmapCorrupt::Checksum);
        }
        let words: Vec<u64> = bytes[HEADER_BYTES..]
            .chunks_exact(8)
            .map(|w| w.try_into().map_or(0, u64::from_le_bytes))
            .collect();
        let tail = chunks % 64;
        if tail != 0 && words.last().is_some_and(|w| w >> tail != 0) {
            return Err(BitmapCorrupt::Trailing);
        }
        let dirty = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(DirtyBitmap {
            chunk_shift,
            chunks,
            words,
            dirty,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VOLUME_BYTES: u64 = (8 << 20) + 4096;

    #[test]
    fn marking_is_counted_once_per_chunk_and_clipped_at_the_end() {
        let mut map = DirtyBitmap::new(VOLUME_BYTES, 64 << 10).unwrap();
        assert_eq!(map.chunks(), 129);
        assert_eq!(map.mark(Range::new(0, 4096)), 1);
        assert_eq!(
            map.mark(Range::new(4096, 4096)),
            0,
            "the same chunk costs nothing"
        );
        assert_eq!(
            map.mark(Range::new((64 << 10) - 512, 1024)),
            1,
            "straddles two chunks"
        );
        assert_eq!(map.mark(Range::new(VOLUME_BYTES - 512, 512)), 1);
        assert_eq!(map.mark(Range::new(0, 0)), 0);
        assert_eq!(map.dirty().collect::<Vec<_>>(), vec![0, 1, 128]);
        assert_eq!(
            map.chunk_range(128, VOLUME_BYTES),
            Range::new(128 << 16, 4096)
        );
        map.clear(1);
        map.clear(1);
        assert_eq!(map.dirty_chunks(), 2);
        assert_eq!(
            DirtyBitmap::new(1 << 20, 1000),
            Err(BitmapError::ChunkBytes(1000))
        );
    }

    #[test]
    fn every_defect_of_the_stored_form_is_an_error() {
        let mut map = DirtyBitmap::new(VOLUME_BYTES, 4096).unwrap();
        map.mark(Range::new(12345, 70000));
        let bytes = map.encode();
        assert_eq!(DirtyBitmap::decode(&bytes), Ok(map));
        for at in [0, 9, 13, 17, HEADER_BYTES, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(DirtyBitmap::decode(&bad).is_err(), "flip at {at}");
        }
        assert!(DirtyBitmap::decode(&bytes[..bytes.len() - 8]).is_err());
        assert_eq!(
            DirtyBitmap::decode(&[0; 8]),
            Err(BitmapCorrupt::Length {
                len: 8,
                expected: HEADER_BYTES
            })
        );
    }

    proptest! {
        /// Whatever is marked is covered, the count is the number of marked chunks, and the map
        /// reads back as it was written.
        #[test]
        fn marked_ranges_are_covered_and_survive_encoding(
            ranges in proptest::collection::vec((0u64..VOLUME_BYTES, 1u64..300_000), 0..40),
            shift in 12u32..20,
        ) {
            let mut map = DirtyBitmap::new(VOLUME_BYTES, 1 << shift).unwrap();
            let mut total = 0;
            for &(offset, len) in &ranges {
                let len = len.min(VOLUME_BYTES - offset);
                total += map.mark(Range::new(offset, len));
            }
            prop_assert_eq!(total, map.dirty_chunks());
            prop_assert_eq!(u64::try_from(map.dirty().count()).unwrap(), total);
            let naive: Vec<u64> = (0..map.chunks()).filter(|&c| map.is_dirty(c)).collect();
            prop_assert_eq!(map.dirty().collect::<Vec<_>>(), naive);
            for &(offset, len) in &ranges {
                let len = len.min(VOLUME_BYTES - offset);
                prop_assert!(map.covers(Range::new(offset, len)));
            }
            prop_assert_eq!(DirtyBitmap::decode(&map.encode()), Ok(map));
        }
    }
}
