//! Opening the local volume, for the daemon and `loadgen` alike: read-write and exclusive
//! (mirror-storage's [`Backing`]: O_EXCL for a block device, an advisory
//! lock for a file), with the primary's metadata record at its end in mirror-storage's internal
//! layout (the target's layout: data area, then the metadata area).
//!
//! A regular file of an earlier release (no record) keeps its size as the data area and grows by
//! the metadata area. A block device without a record needs its data size (`--create-size`): its
//! data area is then that many bytes, and the metadata area follows.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mirror_core::bitmap::DirtyBitmap;
use mirror_core::meta::{BitmapLocation, MetaRecord, BITMAP_CHUNK_BYTES};
use mirror_core::node::{
    recover_primary, running_primary_record, PrimaryRecoverError, PrimaryRestored,
};
use mirror_core::storage::{IntentStore, IntentStoreError, MetaStore, MetaStoreError};
use mirror_core::target::VolumeFacts;
use mirror_core::{Generation, NodeId, VolumeId};
use mirror_storage::{
    AreaIntent, AreaMeta, Backing, IntentAreaError, Opening, StorageError, VolumeSpec,
};

/// Why the volume cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// No randomness for a new generation id.
    #[error("no randomness for the volume's generation id: {0}")]
    NoRandomness(String),
    /// Opening, creating, locking, extending or reading its metadata failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// mirror-core refused to start the primary on this volume's record.
    #[error("cannot start on volume {}: {why}", .path.display())]
    Recover {
        /// The volume.
        path: PathBuf,
        /// Why.
        why: PrimaryRecoverError,
    },
    /// The record could not be written.
    #[error("volume {}: {source}", .path.display())]
    Record {
        /// The volume.
        path: PathBuf,
        /// What failed.
        source: MetaStoreError,
    },
    /// The write intent does not fit the metadata area.
    #[error("volume {}: {source}", .path.display())]
    IntentArea {
        /// The volume.
        path: PathBuf,
        /// Why.
        source: IntentAreaError,
    },
    /// The stored write intent of an unclean stop cannot be read.
    #[error(
        "cannot start on volume {}: {source}: which writes the target lacks is unknown; start \
         again with --new-sequence against a new target volume",
        .path.display()
    )]
    IntentLoad {
        /// The volume.
        path: PathBuf,
        /// Why.
        source: IntentStoreError,
    },
    /// Not even one block.
    #[error("volume {} ({bytes} bytes) is smaller than one {block_bytes}-byte block", .path.display())]
    TooSmall {
        /// The volume.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The block size.
        block_bytes: u32,
    },
}

/// An open local volume.
#[derive(Debug)]
pub struct LocalVolume {
    /// Open for reading and writing, held exclusively; only its data area `[0, bytes)` is the
    /// host's.
    pub file: File,
    /// The data area's size: a whole number of blocks.
    pub bytes: u64,
    /// The record slots at the end of the metadata area (`None`: a passthrough volume that was
    /// never mirrored, used whole).
    pub meta: Option<Arc<AreaMeta>>,
    /// The record found, if any.
    pub record: Option<MetaRecord>,
    /// Whether it was created now (all zeroes).
    pub created: bool,
}

/// Opens the volume at `path` exclusively. With `create_bytes` a missing file is created with that
/// data size, and a volume without a record is initialised with it; without it a regular file
/// without a record is taken whole (see the module docs).
pub fn open_volume(
    path: &Path,
    block_bytes: u32,
    create_bytes: Option<u64>,
) -> Result<LocalVolume, VolumeError> {
    if path.is_file() {
        let bytes = std::fs::metadata(path)
            .map_err(StorageError::io(path))?
            .len();
        if bytes < u64::from(block_bytes) {
            return Err(VolumeError::TooSmall {
                path: path.into(),
                bytes,
                block_bytes,
            });
        }
    }
    let opened = mirror_storage::open(&VolumeSpec {
        path,
        create_bytes,
        legacy_meta: None,
        block_bytes,
        adopt_file: true,
    })?;
    local(path, opened)
}

/// Opens the volume for passthrough (`--no-mirror`): a volume with a record as [`open_volume`]
/// does (the caller marks the record unclean: the peer will not see these writes); one without
/// is used whole, as plain ublk would, and gets no metadata.
pub fn open_passthrough(path: &Path, block_bytes: u32) -> Result<LocalVolume, VolumeError> {
    let spec = VolumeSpec {
        path,
        create_bytes: None,
        legacy_meta: None,
        block_bytes,
        adopt_file: false,
    };
    match mirror_storage::open(&spec) {
        Ok(opened) => local(path, opened),
        Err(StorageError::NoMetadata { .. }) => {
            let backing = Backing::open(path)?;
            let size = backing.backing_bytes();
            let bytes = size - size % u64::from(block_bytes);
            if bytes == 0 {
                return Err(VolumeError::TooSmall {
                    path: path.into(),
                    bytes: size,
                    block_bytes,
                });
            }
            Ok(LocalVolume {
                file: backing.into_file(),
                bytes,
                meta: None,
                record: None,
                created: false,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// A primary's write intent on its volume: where it is stored, and the map to start from (a
/// crash's as stored, else a clean one).
#[derive(Debug)]
pub struct PrimaryIntent {
    /// Its slots in the metadata area.
    pub store: AreaIntent,
    /// The map the start begins from.
    pub stored: DirtyBitmap,
}

/// What a primary starts from: what mirror-core restored, the record it keeps while it runs, and
/// its write intent (none on a volume without a metadata area).
#[derive(Debug)]
pub struct PrimaryStartup {
    /// What [`recover_primary`] restored.
    pub restored: PrimaryRestored,
    /// The running record (not clean; with the intent's location).
    pub running: MetaRecord,
    /// The write intent.
    pub intent: Option<PrimaryIntent>,
}

impl LocalVolume {
    /// What a primary restarts from, as mirror-core decides ([`recover_primary`]), and the
    /// record it keeps while it runs. The caller stores that record ([`LocalVolume::store`])
    /// before the host may write: not clean, so that a crash from then on is never taken for a
    /// clean stop (a start that fails before leaves the volume's record as it was; a volume
    /// without one gets the record of a clean stop at seq 0 at once).
    /// With `new_sequence` (the operator's `--new-sequence`) nothing of the record is trusted.
    pub fn restore_primary(
        &self,
        path: &Path,
        volume_id: VolumeId,
        node_id: NodeId,
        new_sequence: bool,
    ) -> Result<PrimaryStartup, VolumeError> {
        let facts = VolumeFacts {
            volume_id,
            volume_bytes: self.bytes,
            created: self.created,
        };
        let area = match &self.meta {
            Some(meta) => {
                let chunk = AreaIntent::fitting_chunk_bytes(meta, self.bytes, BITMAP_CHUNK_BYTES);
                let area = AreaIntent::new(meta, self.bytes, chunk).map_err(|source| {
                    VolumeError::IntentArea {
                        path: path.into(),
                        source,
                    }
                })?;
                Some(area)
            }
            None => None,
        };
        let (restored, loaded, crashed) = if new_sequence {
            (mirror_core::node::new_sequence(), None, None)
        } else {
            // Only a record that says it keeps an intent has one to read.
            let crashed = match (&area, &self.record) {
                (Some(area), Some(r)) if !r.clean && r.bitmap.len_bytes > 0 => {
                    area.load().map_err(|source| VolumeError::IntentLoad {
                        path: path.into(),
                        source,
                    })?
                }
                _ => None,
            };
            let restored = recover_primary(self.record.as_ref(), crashed.as_ref(), &facts)
                .map_err(|why| VolumeError::Recover {
                    path: path.into(),
                    why,
                })?;
            (restored, self.record.as_ref(), crashed)
        };
        let fresh = getrandom::u64().map_err(|e| VolumeError::NoRandomness(e.to_string()))?;
        let mut running =
            running_primary_record(loaded, &facts, node_id, restored, Generation::fresh(fresh));
        let intent = area.map(|store| {
            running.bitmap = BitmapLocation {
                offset_bytes: self.bytes,
                len_bytes: store.slots_bytes(),
            };
            let stored = crashed.unwrap_or_else(|| store.clean_map());
            PrimaryIntent { store, stored }
        });
        if self.record.is_none() {
            // A file just grown by the metadata area must hold a record before anything else can
            // happen: without one, the next open would take the grown file whole as its data.
            // Nothing was written under the mirror yet, so "clean through seq 0" is the truth.
            self.store(
                path,
                &MetaRecord {
                    clean: true,
                    ..running
                },
            )?;
        }
        Ok(PrimaryStartup {
            restored,
            running,
            intent,
        })
    }

    /// What the replicator needs to keep this primary's write intent and record
    /// ([`crate::replicator::IntentSetup`]), if the volume has a metadata area.
    pub fn intent_setup(
        &self,
        path: &Path,
        intent: Option<PrimaryIntent>,
        restored: PrimaryRestored,
    ) -> Result<Option<crate::replicator::IntentSetup>, VolumeError> {
        let (Some(intent), Some(meta)) = (intent, &self.meta) else {
            return Ok(None);
        };
        Ok(Some(crate::replicator::IntentSetup {
            store: Box::new(intent.store),
            stored: intent.stored,
            restored,
            volume: self.file.try_clone().map_err(StorageError::io(path))?,
            record: Box::new(Arc::clone(meta)),
        }))
    }

    /// Stores `record` (the replicator's record of a clean stop).
    pub fn store(&self, path: &Path, record: &MetaRecord) -> Result<(), VolumeError> {
        match &self.meta {
            Some(meta) => meta.store(record).map_err(|source| VolumeError::Record {
                path: path.into(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Passthrough on a volume that was mirrored: its record says "not clean" from now on, since
    /// the peer never sees these writes, and keeps no write intent (they are in none: a later
    /// mirrored start is refused rather than resyncing only what an older intent says).
    pub fn start_passthrough(&self, path: &Path) -> Result<(), VolumeError> {
        match self.record {
            Some(record) => self.store(
                path,
                &MetaRecord {
                    clean: false,
                    bitmap: BitmapLocation::default(),
                    ..record
                },
            ),
            None => Ok(()),
        }
    }
}

fn local(path: &Path, opened: mirror_storage::Opened) -> Result<LocalVolume, VolumeError> {
    let file = opened
        .volume
        .file()
        .try_clone()
        .map_err(StorageError::io(path))?;
    Ok(LocalVolume {
        file,
        bytes: mirror_core::storage::Volume::volume_bytes(&*opened.volume),
        meta: Some(opened.meta),
        record: opened.record,
        created: opened.how == Opening::Created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirror_core::meta::meta_area_bytes;
    use mirror_core::storage::MetaStore;
    use mirror_core::{NodeId, VolumeId};

    #[test]
    fn a_file_keeps_its_whole_blocks_as_data_and_is_held_exclusively() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        std::fs::write(&path, vec![0u8; 4096 * 3 + 100]).unwrap();
        let v = open_volume(&path, 4096, None).unwrap();
        assert_eq!(v.bytes, 4096 * 3);
        assert!(v.record.is_none() && !v.created);
        let again = open_volume(&path, 4096, None).unwrap_err();
        assert!(
            again
                .to_string()
                .contains("already in use (locked by another process)"),
            "{again}"
        );
        v.meta
            .as_ref()
            .unwrap()
            .store(&MetaRecord::new(VolumeId([1; 16]), 4096 * 3))
            .unwrap();
        drop(v);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4096 * 3 + meta_area_bytes(4096 * 3),
            "grown by the metadata area"
        );
        let v = open_volume(&path, 4096, None).unwrap();
        assert_eq!(v.bytes, 4096 * 3);
        assert_eq!(v.record.map(|r| r.volume_bytes), Some(4096 * 3));
    }

    /// A start that fails after the file grew (the peer unreachable) leaves a record behind, so
    /// the next start does not take the grown file whole as its data.
    #[test]
    fn a_grown_file_keeps_its_data_size_across_a_failed_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let v = open_volume(&path, 4096, None).unwrap();
        let start = v
            .restore_primary(&path, VolumeId([1; 16]), NodeId(1), false)
            .unwrap();
        assert_eq!(start.restored.confirmed, mirror_core::Seq::NONE);
        // Its write intent shares the volume's open file (and lock).
        drop((v, start));
        let v = open_volume(&path, 4096, None).unwrap();
        assert_eq!(v.bytes, 1 << 20);
        let again = v
            .restore_primary(&path, VolumeId([1; 16]), NodeId(1), false)
            .unwrap();
        assert_eq!(again.restored.confirmed, mirror_core::Seq::NONE);
    }

    /// A passthrough run writes what no write intent records: the next mirrored start after it
    /// is refused, while one after a crash of a mirrored run resyncs.
    #[test]
    fn a_passthrough_run_drops_the_write_intent_and_a_crash_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let id = VolumeId([1; 16]);
        let v = open_volume(&path, 4096, Some(1 << 20)).unwrap();
        let start = v.restore_primary(&path, id, NodeId(1), false).unwrap();
        assert!(
            start.running.bitmap.len_bytes > 0,
            "the record says where the intent is"
        );
        v.store(&path, &start.running).unwrap();
        let mut intent = start.intent.unwrap();
        let mut map = intent.stored.clone();
        map.mark(mirror_core::Range::new(0, 4096));
        intent.store.store(&map).unwrap();
        drop((v, intent));
        // A crash: the record stays "not clean", the intent says chunk 0.
        let v = open_volume(&path, 4096, None).unwrap();
        let after_crash = v.restore_primary(&path, id, NodeId(1), false).unwrap();
        assert_eq!(
            after_crash.restored.kind,
            mirror_core::node::PrimaryStart::Crashed
        );
        assert_eq!(
            after_crash.intent.as_ref().map(|i| i.stored.dirty_chunks()),
            Some(1)
        );
        drop(after_crash);
        v.start_passthrough(&path).unwrap();
        drop(v);
        let v = open_volume(&path, 4096, None).unwrap();
        let refused = v.restore_primary(&path, id, NodeId(1), false).unwrap_err();
        assert!(
            refused.to_string().contains("did not stop cleanly"),
            "{refused}"
        );
    }

    #[test]
    fn a_missing_file_is_created_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let e = open_volume(&path, 512, None).unwrap_err();
        assert!(
            matches!(e, VolumeError::Storage(StorageError::Io { .. })),
            "{e}"
        );
        let v = open_volume(&path, 512, Some(1 << 20)).unwrap();
        assert_eq!(v.bytes, 1 << 20);
        assert!(v.created);
    }

    #[test]
    fn less_than_a_block_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        std::fs::write(&path, [0u8; 100]).unwrap();
        let e = open_volume(&path, 512, None).unwrap_err();
        assert!(
            e.to_string().contains("smaller than one 512-byte block"),
            "{e}"
        );
    }
}
