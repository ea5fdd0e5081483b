//! The storage seams: the volume (what the target, and later the primary, does to its backing
//! store), the metadata store and the primary's write-intent store, each with an in-memory
//! implementation and fault injection for the simulator and tests. The file and block-device implementations live in `mirror-storage`
//! (shared by both daemons), which implement the same traits; nothing here touches a file.
//!
//! One rule for every implementation: [`apply`] turns a mirrored operation into writes, a discard
//! reads back as zeroes, a flush is the driver's sync after the batch.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::bitmap::{BitmapCorrupt, DirtyBitmap};
use crate::meta::{MetaCorrupt, MetaRecord, RECORD_BYTES};

use crate::wire::Op;

/// Why a volume access failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// The extent does not lie inside the volume (nothing was written).
    #[error("extent {offset_bytes}+{len_bytes} outside the volume of {volume_bytes} bytes")]
    OutOfRange {
        /// Start of the extent.
        offset_bytes: u64,
        /// Its length.
        len_bytes: u64,
        /// The volume's size.
        volume_bytes: u64,
    },
    /// The backing store failed (or a fault was injected).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A volume: positioned reads and writes, zeroing, and a sync that makes every write before it
/// durable. Methods take `&self` so that one volume serves the applier and readers at once.
pub trait Volume: std::fmt::Debug {
    /// Size in bytes.
    fn volume_bytes(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset_bytes`.
    fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), VolumeError>;
    /// Writes `data` at `offset_bytes` (durable only after the next [`Volume::sync`]).
    fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<(), VolumeError>;
    /// Makes `len_bytes` at `offset_bytes` read back as zeroes (discard and write-zeroes).
    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeError>;
    /// Makes every write so far durable.
    fn sync(&self) -> Result<(), VolumeError>;

    /// Checks that an extent lies inside the volume.
    fn check_extent(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeError> {
        let volume_bytes = self.volume_bytes();
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= volume_bytes => Ok(()),
            _ => Err(VolumeError::OutOfRange {
                offset_bytes,
                len_bytes,
                volume_bytes,
            }),
        }
    }
}

/// Applies one mirrored operation to a volume (a flush or a resync mark needs nothing here: the
/// driver syncs after the batch). Every implementation checks the extent, whatever the engine already checked.
pub fn apply(volume: &(impl Volume + ?Sized), op: &Op) -> Result<(), VolumeError> {
    let Some(range) = op.range() else {
        return Ok(());
    };
    match op {
        Op::Write { data, .. } => volume.write_at(range.offset_bytes, data),
        Op::Discard { .. } | Op::WriteZeroes { .. } => {
            volume.write_zeroes(range.offset_bytes, range.len_bytes)
        }
        Op::Flush | Op::Resync(_) => Ok(()),
    }
}

/// Reads `len_bytes` at `offset_bytes` into a new buffer.
pub fn read(
    volume: &(impl Volume + ?Sized),
    offset_bytes: u64,
    len_bytes: usize,
) -> Result<Vec<u8>, VolumeError> {
    // Checked before the buffer is allocated (the read checks again).
    volume.check_extent(offset_bytes, len_bytes as u64)?;
    let mut buf = vec![0u8; len_bytes];
    volume.read_at(offset_bytes, &mut buf)?;
    Ok(buf)
}

/// Applies an operation to an image of a whole volume in memory (the in-memory volumes, and the
/// simulator's reference replays). The extent must be inside the image.
pub fn apply_to_image(image: &mut [u8], op: &Op) {
    let Some(r) = op
        .range()
        .and_then(|r| image_range(image, r.offset_bytes, r.len_bytes))
    else {
        return;
    };
    match op {
        Op::Write { data, .. } => image[r].copy_from_slice(data),
        Op::Discard { .. } | Op::WriteZeroes { .. } => image[r].fill(0),
        Op::Flush | Op::Resync(_) => {}
    }
}

fn image_range(image: &[u8], offset_bytes: u64, len_bytes: u64) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset_bytes).ok()?;
    let end = start.checked_add(usize::try_from(len_bytes).ok()?)?;
    (end <= image.len()).then_some(start..end)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding the lock with the state half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A volume in memory; every write is durable at once.
#[derive(Debug)]
pub struct MemVolume {
    bytes: Mutex<Vec<u8>>,
}

impl MemVolume {
    /// A volume holding `initial`.
    #[must_use]
    pub fn new(initial: Vec<u8>) -> MemVolume {
        MemVolume {
            bytes: Mutex::new(initial),
        }
    }

    /// A copy of the whole volume.
    #[must_use]
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.bytes).clone()
    }
}

impl Volume for MemVolume {
    fn volume_bytes(&self) -> u64 {
        lock(&self.bytes).len() as u64
    }

    fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_extent(offset_bytes, buf.len() as u64)?;
        let bytes = lock(&self.bytes);
        if let Some(r) = image_range(&bytes, offset_bytes, buf.len() as u64) {
            buf.copy_from_slice(&bytes[r]);
        }
        Ok(())
    }

    fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.check_extent(offset_bytes, data.len() as u64)?;
        let mut bytes = lock(&self.bytes);
        if let Some(r) = image_range(&bytes, offset_bytes, data.len() as u64) {
            bytes[r].copy_from_slice(data);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeError> {
        self.check_extent(offset_bytes, len_bytes)?;
        let mut bytes = lock(&self.bytes);
        if let Some(r) = image_range(&bytes, offset_bytes, len_bytes) {
            bytes[r].fill(0);
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), VolumeError> {
        Ok(())
    }
}

/// Granularity at which [`FaultyVolume`] tracks unsynced data (a sector, [`crate::SECTOR_BYTES`]: the
/// unit a power loss can tear at).
pub const FAULT_BLOCK_BYTES: usize = 512;

#[derive(Debug)]
struct FaultyState {
    /// What reads see.
    view: Vec<u8>,
    /// What survives a power loss.
    durable: Vec<u8>,
    /// Blocks of `view` written since the last sync.
    dirty: BTreeSet<usize>,
    fail_writes: bool,
    fail_syncs: bool,
}

/// What a crash did to the unsynced blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CrashLoss {
    /// Unsynced blocks that reached the disk anyway.
    pub kept_blocks: usize,
    /// Unsynced blocks lost.
    pub lost_blocks: usize,
}

/// A volume in memory that can lose what was not synced: [`FaultyVolume::crash`] keeps each
/// unsynced sector or drops it, as a power loss would, and I/O errors can be switched on.
#[derive(Debug)]
pub struct FaultyVolume {
    state: Mutex<FaultyState>,
}

impl FaultyVolume {
    /// A volume holding `initial`, all of it durable.
    #[must_use]
    pub fn new(initial: Vec<u8>) -> FaultyVolume {
        FaultyVolume {
            state: Mutex::new(FaultyState {
                durable: initial.clone(),
                view: initial,
                dirty: BTreeSet::new(),
                fail_writes: false,
                fail_syncs: false,
            }),
        }
    }

    /// A power loss: each unsynced block is kept when `keep` says so (asked in block order), the
    /// others revert to their durable content.
    pub fn crash(&self, keep: &mut dyn FnMut() -> bool) -> CrashLoss {
        let mut s = lock(&self.state);
        let mut loss = CrashLoss::default();
        let dirty = std::mem::take(&mut s.dirty);
        for b in dirty {
            let r = b * FAULT_BLOCK_BYTES..(b + 1) * FAULT_BLOCK_BYTES;
            if keep() {
                let FaultyState { view, durable, .. } = &mut *s;
                durable[r.clone()].copy_from_slice(&view[r]);
                loss.kept_blocks += 1;
            } else {
                loss.lost_blocks += 1;
            }
        }
        let FaultyState { view, durable, .. } = &mut *s;
        view.copy_from_slice(durable);
        loss
    }

    /// Makes every later write fail with an I/O error (or succeed again).
    pub fn fail_writes(&self, on: bool) {
        lock(&self.state).fail_writes = on;
    }

    /// Makes every later sync fail with an I/O error (or succeed again).
    pub fn fail_syncs(&self, on: bool) {
        lock(&self.state).fail_syncs = on;
    }

    /// Runs `f` over what reads see.
    pub fn with_view<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&lock(&self.state).view)
    }

    /// Runs `f` over what would survive a power loss now.
    pub fn with_durable<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&lock(&self.state).durable)
    }

    /// Writes `data` (zeroes for `None`) to the view and marks the blocks it touched unsynced.
    fn write_image(&self, offset_bytes: u64, len_bytes: u64, data: Option<&[u8]>) {
        let mut s = lock(&self.state);
        let Some(r) = image_range(&s.view, offset_bytes, len_bytes) else {
            return;
        };
        match data {
            Some(d) => s.view[r.clone()].copy_from_slice(d),
            None => s.view[r.clone()].fill(0),
        }
        if !r.is_empty() {
            let (first, last) = (r.start / FAULT_BLOCK_BYTES, (r.end - 1) / FAULT_BLOCK_BYTES);
            s.dirty.extend(first..=last);
        }
    }

    fn injected(&self, what: &str) -> VolumeError {
        VolumeError::Io(std::io::Error::other(format!("injected {what} error")))
    }
}

impl Volume for FaultyVolume {
    fn volume_bytes(&self) -> u64 {
        lock(&self.state).view.len() as u64
    }

    fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.check_extent(offset_bytes, buf.len() as u64)?;
        let s = lock(&self.state);
        if let Some(r) = image_range(&s.view, offset_bytes, buf.len() as u64) {
            buf.copy_from_slice(&s.view[r]);
        }
        Ok(())
    }

    fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.check_extent(offset_bytes, data.len() as u64)?;
        if lock(&self.state).fail_writes {
            return Err(self.injected("write"));
        }
        self.write_image(offset_bytes, data.len() as u64, Some(data));
        Ok(())
    }

    fn write_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), VolumeError> {
        self.check_extent(offset_bytes, len_bytes)?;
        if lock(&self.state).fail_writes {
            return Err(self.injected("write"));
        }
        self.write_image(offset_bytes, len_bytes, None);
        Ok(())
    }

    fn sync(&self) -> Result<(), VolumeError> {
        let mut s = lock(&self.state);
        if s.fail_syncs {
            return Err(self.injected("sync"));
        }
        let dirty = std::mem::take(&mut s.dirty);
        let FaultyState { view, durable, .. } = &mut *s;
        for b in dirty {
            let r = b * FAULT_BLOCK_BYTES..(b + 1) * FAULT_BLOCK_BYTES;
            durable[r.clone()].copy_from_slice(&view[r]);
        }
        Ok(())
    }
}

/// Why a metadata store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaStoreError {
    /// The stored bytes hold no valid record.
    #[error("metadata is corrupt ({0}); refusing to trust it")]
    Corrupt(#[from] MetaCorrupt),
    /// The backing store failed (or a fault was injected).
    #[error("metadata I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a node keeps its metadata record: [`MetaStore::store`] returns once the record is
/// durable. The real implementation (the record at the end of the volume's backing) lives in
/// `mirror-storage`.
pub trait MetaStore: std::fmt::Debug {
    /// The newest valid record, `None` if none was ever stored.
    fn load(&self) -> Result<Option<MetaRecord>, MetaStoreError>;
    /// Stores `record` durably (overwriting the older of two slots).
    fn store(&self, record: &MetaRecord) -> Result<(), MetaStoreError>;
}

impl<T: MetaStore + ?Sized> MetaStore for std::sync::Arc<T> {
    fn load(&self) -> Result<Option<MetaRecord>, MetaStoreError> {
        (**self).load()
    }

    fn store(&self, record: &MetaRecord) -> Result<(), MetaStoreError> {
        (**self).store(record)
    }
}

#[derive(Debug, Default)]
struct MemMetaState {
    /// The two-slot file image; empty until the first store.
    bytes: Vec<u8>,
    write_count: u64,
    fail_stores: bool,
}

/// A metadata store in memory, through the same two-slot bytes as a file.
#[derive(Debug, Default)]
pub struct MemMetaStore {
    state: Mutex<MemMetaState>,
}

impl MemMetaStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> MemMetaStore {
        MemMetaStore::default()
    }

    /// Makes every later store fail with an I/O error (or succeed again).
    pub fn fail_stores(&self, on: bool) {
        lock(&self.state).fail_stores = on;
    }
}

impl MetaStore for MemMetaStore {
    fn load(&self) -> Result<Option<MetaRecord>, MetaStoreError> {
        let s = lock(&self.state);
        if s.bytes.is_empty() {
            return Ok(None);
        }
        Ok(Some(MetaRecord::decode_file(&s.bytes)?.0))
    }

    fn store(&self, record: &MetaRecord) -> Result<(), MetaStoreError> {
        let mut s = lock(&self.state);
        if s.fail_stores {
            return Err(MetaStoreError::Io(std::io::Error::other(
                "injected metadata error",
            )));
        }
        if s.bytes.is_empty() {
            s.bytes = record.encode_file(0);
            s.write_count = 0;
            return Ok(());
        }
        let next = s.write_count + 1;
        let at = MetaRecord::slot_offset(next);
        s.bytes[at..at + RECORD_BYTES].copy_from_slice(&record.encode(next));
        s.write_count = next;
        Ok(())
    }
}

/// Why a write-intent store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IntentStoreError {
    /// Neither slot holds a valid map.
    #[error("the stored write intent is corrupt ({0})")]
    Corrupt(#[from] BitmapCorrupt),
    /// The backing store failed (or a fault was injected).
    #[error("write intent I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a primary keeps its write intent ([`crate::node::WriteIntent`]): two alternating
/// slots ([`DirtyBitmap::encode_slot`]); [`IntentStore::store`] returns once the map is durable,
/// and a torn store leaves the one before it. The real implementation (in the volume's metadata
/// area) lives in `mirror-storage`.
pub trait IntentStore: std::fmt::Debug + Send {
    /// The newest valid map, `None` if none was ever stored.
    fn load(&self) -> Result<Option<DirtyBitmap>, IntentStoreError>;
    /// Stores `map` durably (overwriting the older slot).
    fn store(&mut self, map: &DirtyBitmap) -> Result<(), IntentStoreError>;
}

/// A write-intent store in memory, through the same slot bytes as the metadata area.
#[derive(Debug, Default)]
pub struct MemIntentStore {
    slots: [Vec<u8>; 2],
    write_count: u64,
    fail_stores: bool,
}

impl MemIntentStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> MemIntentStore {
        MemIntentStore::default()
    }

    /// Makes every later store fail with an I/O error (or succeed again).
    pub fn fail_stores(&mut self, on: bool) {
        self.fail_stores = on;
    }

    /// Tears the next store: only the first `bytes` of its slot are written (a crash mid-write).
    pub fn store_torn(&mut self, map: &DirtyBitmap, bytes: usize) {
        let next = self.write_count + 1;
        let slot = &mut self.slots[usize::from(next % 2 == 1)];
        let new = map.encode_slot(next);
        slot.resize(new.len().max(slot.len()), 0);
        let n = bytes.min(new.len());
        slot[..n].copy_from_slice(&new[..n]);
    }
}

impl IntentStore for MemIntentStore {
    fn load(&self) -> Result<Option<DirtyBitmap>, IntentStoreError> {
        Ok(DirtyBitmap::decode_slots(&self.slots[0], &self.slots[1])?)
    }

    fn store(&mut self, map: &DirtyBitmap) -> Result<(), IntentStoreError> {
        if self.fail_stores {
            return Err(IntentStoreError::Io(std::io::Error::other(
                "injected write intent error",
            )));
        }
        let next = self.write_count + 1;
        self.slots[usize::from(next % 2 == 1)] = map.encode_slot(next);
        self.write_count = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Lba;
    use bytes::Bytes;

    fn write(block: u64, byte: u8) -> Op {
        Op::Write {
            lba: Lba(block),
            data: Bytes::from(vec![byte; FAULT_BLOCK_BYTES]),
        }
    }

    #[test]
    fn every_volume_applies_the_same_way_and_refuses_what_lies_outside() {
        let mem = MemVolume::new(vec![9; 4096]);
        let faulty = FaultyVolume::new(vec![9; 4096]);
        let mut image = vec![9u8; 4096];
        let ops = [
            write(1, 1),
            Op::Discard {
                lba: Lba(2),
                len_bytes: 1024,
            },
            Op::Flush,
            write(7, 7),
        ];
        for op in &ops {
            apply(&mem, op).unwrap();
            apply(&faulty, op).unwrap();
            apply_to_image(&mut image, op);
        }
        assert_eq!(mem.contents(), image);
        faulty.with_view(|v| assert_eq!(v, &image[..]));
        let beyond = write(8, 1);
        assert!(matches!(
            apply(&mem, &beyond),
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(apply(&faulty, &beyond).is_err());
        assert_eq!(read(&mem, 512, 512).unwrap(), vec![1; 512]);
    }

    #[test]
    fn the_memory_metadata_store_keeps_the_newest_record_in_two_slots() {
        let store = MemMetaStore::new();
        assert!(store.load().unwrap().is_none());
        let mut record = MetaRecord::new(crate::VolumeId([1; 16]), 4096);
        for durable in 1..5 {
            record.durable = crate::Seq(durable);
            store.store(&record).unwrap();
            assert_eq!(store.load().unwrap(), Some(record));
        }
        store.fail_stores(true);
        assert!(matches!(store.store(&record), Err(MetaStoreError::Io(_))));
    }

    #[test]
    fn a_crash_loses_only_what_was_not_synced() {
        let v = FaultyVolume::new(vec![0; 4096]);
        apply(&v, &write(0, 1)).unwrap();
        v.sync().unwrap();
        apply(&v, &write(1, 2)).unwrap();
        apply(&v, &write(2, 3)).unwrap();
        let mut first = true;
        let loss = v.crash(&mut || std::mem::replace(&mut first, false));
        assert_eq!(
            loss,
            CrashLoss {
                kept_blocks: 1,
                lost_blocks: 1
            }
        );
        assert_eq!(
            read(&v, 0, 1536).unwrap()[..],
            {
                let mut want = vec![1u8; 512];
                want.extend([2u8; 512]);
                want.extend([0u8; 512]);
                want
            }[..]
        );
        v.fail_writes(true);
        assert!(matches!(apply(&v, &write(3, 4)), Err(VolumeError::Io(_))));
        v.fail_writes(false);
        v.fail_syncs(true);
        assert!(v.sync().is_err());
    }

    /// The newest complete store is what loads: a torn one leaves the one before it, and a
    /// damaged count or map never passes for a newer map.
    #[test]
    fn a_torn_intent_store_leaves_the_one_before_it() {
        let mut store = MemIntentStore::new();
        assert!(store.load().unwrap().is_none());
        let mut map = DirtyBitmap::new(1 << 20, 64 << 10).unwrap();
        map.mark(crate::Range::new(0, 4096));
        store.store(&map).unwrap();
        let first = map.clone();
        map.mark(crate::Range::new(5 << 16, 4096));
        store.store(&map).unwrap();
        assert_eq!(store.load().unwrap(), Some(map.clone()));
        let mut third = map.clone();
        third.mark(crate::Range::new(9 << 16, 4096));
        for torn in [1, 9, 23, 30, 53] {
            let mut s = MemIntentStore {
                slots: store.slots.clone(),
                write_count: store.write_count,
                fail_stores: false,
            };
            s.store_torn(&third, torn);
            assert_eq!(
                s.load().unwrap(),
                Some(map.clone()),
                "torn after {torn} bytes"
            );
        }
        // Every single-bit flip of the newest slot falls back to the older one or is refused.
        let newest = usize::from(store.write_count % 2 == 1);
        for at in 0..store.slots[newest].len() {
            let mut s = MemIntentStore {
                slots: store.slots.clone(),
                write_count: store.write_count,
                fail_stores: false,
            };
            s.slots[newest][at] ^= 0x04;
            match s.load() {
                Ok(Some(got)) => assert_eq!(got, first, "flip at {at}"),
                other => panic!("flip at {at}: {other:?}"),
            }
        }
        store.fail_stores(true);
        assert!(matches!(store.store(&map), Err(IntentStoreError::Io(_))));
    }
}
