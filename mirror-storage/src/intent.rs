//! The primary's write intent in its volume's metadata area: two alternating slots
//! ([`DirtyBitmap::encode_slot`]) from the end of the data area, before the record slots.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use mirror_core::bitmap::{BitmapError, DirtyBitmap};
use mirror_core::storage::{IntentStore, IntentStoreError};

use crate::volume::AreaMeta;

/// Why the write intent does not fit the metadata area.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IntentAreaError {
    /// The chunk size is not valid.
    #[error(transparent)]
    Chunk(#[from] BitmapError),
    /// Two slots of the map do not fit between the data area and the record slots.
    #[error(
        "two copies of a write intent in chunks of {chunk_bytes} bytes need {needed_bytes} bytes; \
         the metadata area has {room_bytes} (use larger chunks)"
    )]
    NoRoom {
        /// The chunk size asked for.
        chunk_bytes: u64,
        /// What two slots need.
        needed_bytes: u64,
        /// What the area has for them.
        room_bytes: u64,
    },
}

/// The write intent's two slots in the metadata area.
#[derive(Debug)]
pub struct AreaIntent {
    file: Arc<File>,
    path: PathBuf,
    offset_bytes: u64,
    slot_bytes: u64,
    geometry: DirtyBitmap,
    write_count: u64,
}

impl AreaIntent {
    /// The slots of a map in chunks of `chunk_bytes` over the data area `[0, volume_bytes)` of
    /// `meta`'s backing; the newest stored count is read from them.
    pub fn new(
        meta: &AreaMeta,
        volume_bytes: u64,
        chunk_bytes: u64,
    ) -> Result<AreaIntent, IntentAreaError> {
        let geometry = DirtyBitmap::new(volume_bytes, chunk_bytes)?;
        let slot_bytes = geometry.slot_bytes();
        let room_bytes = meta.slots_offset_bytes().saturating_sub(volume_bytes);
        if 2 * slot_bytes > room_bytes {
            return Err(IntentAreaError::NoRoom {
                chunk_bytes,
                needed_bytes: 2 * slot_bytes,
                room_bytes,
            });
        }
        let (file, path) = meta.file();
        let mut intent = AreaIntent {
            file,
            path,
            offset_bytes: volume_bytes,
            slot_bytes,
            geometry,
            write_count: 0,
        };
        intent.write_count = intent.newest_count();
        Ok(intent)
    }

    /// The smallest chunk size of at least `wanted_bytes` whose two slots fit `meta`'s area.
    #[must_use]
    pub fn fitting_chunk_bytes(meta: &AreaMeta, volume_bytes: u64, wanted_bytes: u64) -> u64 {
        let mut chunk = wanted_bytes.max(mirror_core::bitmap::CHUNK_BYTES_MIN);
        chunk = chunk.checked_next_power_of_two().unwrap_or(1 << 62);
        while chunk < 1 << 62 {
            if AreaIntent::new(meta, volume_bytes, chunk).is_ok() {
                break;
            }
            chunk *= 2;
        }
        chunk
    }

    /// Bytes of both slots.
    #[must_use]
    pub fn slots_bytes(&self) -> u64 {
        2 * self.slot_bytes
    }

    /// A clean map of this geometry.
    #[must_use]
    pub fn clean_map(&self) -> DirtyBitmap {
        let mut map = self.geometry.clone();
        for chunk in self.geometry.dirty() {
            map.clear(chunk);
        }
        map
    }

    fn read_slot(&self, index: u64) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; usize::try_from(self.slot_bytes).unwrap_or(usize::MAX)];
        self.file
            .read_exact_at(&mut bytes, self.offset_bytes + index * self.slot_bytes)?;
        Ok(bytes)
    }

    fn newest_count(&self) -> u64 {
        [0, 1]
            .into_iter()
            .filter_map(|i| self.read_slot(i).ok())
            .filter_map(|b| DirtyBitmap::decode_slot(&b).ok().flatten())
            .map(|(_, count)| count)
            .max()
            .unwrap_or(0)
    }

    fn io_error(&self, e: io::Error) -> IntentStoreError {
        IntentStoreError::Io(io::Error::new(
            e.kind(),
            format!("write intent of {}: {e}", self.path.display()),
        ))
    }
}

impl IntentStore for AreaIntent {
    fn load(&self) -> Result<Option<DirtyBitmap>, IntentStoreError> {
        let a = self.read_slot(0).map_err(|e| self.io_error(e))?;
        let b = self.read_slot(1).map_err(|e| self.io_error(e))?;
        Ok(DirtyBitmap::decode_slots(&a, &b)?)
    }

    fn store(&mut self, map: &DirtyBitmap) -> Result<(), IntentStoreError> {
        let next = self.write_count + 1;
        let at = self.offset_bytes + (next % 2) * self.slot_bytes;
        self.file
            .write_all_at(&map.encode_slot(next), at)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| self.io_error(e))?;
        self.write_count = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirror_core::storage::MetaStore;
    use mirror_core::Range;

    #[test]
    fn the_intent_survives_a_reopen_and_never_touches_data_or_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let volume_bytes = 8u64 << 20;
        let opened = crate::open(&crate::VolumeSpec {
            path: &path,
            create_bytes: Some(volume_bytes),
            legacy_meta: None,
            block_bytes: 4096,
            adopt_file: false,
        })
        .unwrap();
        let record =
            mirror_core::meta::MetaRecord::new(mirror_core::VolumeId([3; 16]), volume_bytes);
        opened.meta.store(&record).unwrap();
        let mut intent = AreaIntent::new(&opened.meta, volume_bytes, 64 << 10).unwrap();
        assert_eq!(intent.load().unwrap(), None);
        let mut map = intent.clean_map();
        map.mark(Range::new(0, 4096));
        intent.store(&map).unwrap();
        map.mark(Range::new(volume_bytes - 4096, 4096));
        intent.store(&map).unwrap();
        drop(intent);
        let again = AreaIntent::new(&opened.meta, volume_bytes, 64 << 10).unwrap();
        assert_eq!(again.load().unwrap(), Some(map));
        assert_eq!(
            opened.meta.load().unwrap().map(|r| r.volume_id),
            Some(record.volume_id),
            "the record is intact"
        );
        let mut data = vec![1u8; 4096];
        mirror_core::storage::Volume::read_at(&*opened.volume, volume_bytes - 4096, &mut data)
            .unwrap();
        assert!(data.iter().all(|&b| b == 0), "the data area is untouched");
        // Too small a chunk for this area is refused with the way out.
        let e = AreaIntent::new(&opened.meta, volume_bytes, 4096).map(|_| ());
        assert!(e.is_ok() || matches!(e, Err(IntentAreaError::NoRoom { .. })));
        let fit = AreaIntent::fitting_chunk_bytes(&opened.meta, volume_bytes, 4096);
        assert!(AreaIntent::new(&opened.meta, volume_bytes, fit).is_ok());
    }
}
