//! Finding or making the internal layout: data area, then the metadata area ending in the two
//! record slots ([`mirror_core::meta`] documents it and its size rule).
//!
//! | the backing                                   | what [`open`] does                               |
//! |-----------------------------------------------|--------------------------------------------------|
//! | missing, a data size given                    | creates data + area, all zeroes ([`Opening::Created`]); refuses if a legacy `.meta` file is there (it describes an earlier volume) |
//! | ends in a valid record                        | checks its sizes ([`Opening::Found`])            |
//! | ends in damaged slots                         | refuses ([`StorageError::Corrupt`])              |
//! | ends in no record, a legacy `.meta` file beside | regular file: grows it by the area, writes the legacy record there (not consistent if the volume was modified after the record), renames the file to `.meta.upgraded` ([`Opening::Upgraded`]); block device: refuses |
//! | ends in no record, a data size given          | file of that size: grows it by the area; already data + area (or a device large enough): as is ([`Opening::Initialised`], no record) |
//! | ends in no record, no data size               | refuses ([`StorageError::NoMetadata`])           |
//!
//! "No record": neither slot has the record's magic (zeroes, or the volume's own data, as at the
//! end of a volume whose metadata lived in a legacy file); a slot with the magic that fails a
//! check is damage. A grown or shrunk backing no longer ends in its record; given its data size it is refused as
//! resized, without it as lacking metadata. Nothing is written before every check passed.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mirror_core::meta::{meta_area_bytes, MetaRecord, META_FILE_BYTES, META_SLOTS_BYTES};

use crate::backing::{Backing, StorageError};
use crate::volume::{read_slots, write_slot, AreaMeta, FileVolume};

/// What to open.
#[derive(Debug, Clone, Copy)]
pub struct VolumeSpec<'a> {
    /// The regular file or block device.
    pub path: &'a Path,
    /// The data area's size: create the volume with it if it does not exist, initialise an
    /// existing one without metadata with it, and check a found record against it.
    pub create_bytes: Option<u64>,
    /// A legacy metadata file to upgrade from (see [`legacy_meta_path`]).
    pub legacy_meta: Option<&'a Path>,
    /// The logical block size; the data area is a multiple of it.
    pub block_bytes: u32,
    /// Without `create_bytes`, a regular file without a record is taken whole (rounded down to
    /// the block size) as the data area and grown by the metadata area: a primary's volume of an
    /// earlier release keeps its size. A block device is never taken whole (its data area would
    /// shrink by the metadata area under a filesystem that fills it).
    pub adopt_file: bool,
}

/// How [`open`] found the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// Created now, all zeroes.
    Created,
    /// Its own record was at its end.
    Found,
    /// Existing data without metadata: the area is ready, no record yet (the data is of unknown
    /// content).
    Initialised,
    /// A legacy record was moved into the area (or an interrupted upgrade finished).
    Upgraded {
        /// The legacy file as it was named.
        legacy: PathBuf,
        /// Its name now.
        renamed: PathBuf,
    },
}

/// An open volume with its metadata.
#[derive(Debug)]
pub struct Opened {
    /// The data area.
    pub volume: Arc<FileVolume>,
    /// The record slots.
    pub meta: Arc<AreaMeta>,
    /// The record found (or upgraded), `None` when there was none.
    pub record: Option<MetaRecord>,
    /// How it was found.
    pub how: Opening,
}

/// `<volume>.meta`: where earlier releases kept the metadata.
#[must_use]
pub fn legacy_meta_path(volume: &Path) -> PathBuf {
    with_suffix(volume, ".meta")
}

/// `<legacy>.upgraded`: a legacy file after its record moved into the volume.
#[must_use]
pub fn upgraded_path(legacy: &Path) -> PathBuf {
    with_suffix(legacy, ".upgraded")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn check_block(path: &Path, bytes: u64, block_bytes: u32) -> Result<(), StorageError> {
    if bytes == 0 || !bytes.is_multiple_of(u64::from(block_bytes)) {
        return Err(StorageError::BadSize {
            path: path.to_owned(),
            bytes,
            block_bytes,
        });
    }
    Ok(())
}

/// Reads a legacy metadata file: `None` if there is none.
fn read_legacy(path: Option<&Path>) -> Result<Option<(MetaRecord, u64, PathBuf)>, StorageError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io(path)(e)),
    };
    let (record, count) =
        MetaRecord::decode_file(&bytes).map_err(|why| StorageError::LegacyCorrupt {
            path: path.to_owned(),
            why,
        })?;
    Ok(Some((record, count, path.to_owned())))
}

/// Renames the legacy file to `.upgraded` and syncs its directory.
fn retire_legacy(legacy: &Path) -> Result<Opening, StorageError> {
    let renamed = upgraded_path(legacy);
    fs::rename(legacy, &renamed).map_err(StorageError::io(legacy))?;
    let dir = match legacy.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io(&dir))?;
    Ok(Opening::Upgraded {
        legacy: legacy.to_owned(),
        renamed,
    })
}

/// Opens (or creates, initialises, upgrades) the volume at `spec.path`; see the module docs.
pub fn open(spec: &VolumeSpec<'_>) -> Result<Opened, StorageError> {
    let path = spec.path;
    // Read only where its record is needed: beside a volume with its own record it is a leftover.
    let legacy_present = spec.legacy_meta.filter(|p| p.exists());
    if let (false, Some(volume_bytes)) = (path.exists(), spec.create_bytes) {
        check_block(path, volume_bytes, spec.block_bytes)?;
        if let Some(legacy) = legacy_present {
            return Err(StorageError::LegacyWithoutVolume {
                path: path.to_owned(),
                legacy: legacy.to_owned(),
            });
        }
        let area = meta_area_bytes(volume_bytes);
        let backing_bytes =
            volume_bytes
                .checked_add(area)
                .ok_or_else(|| StorageError::BadSize {
                    path: path.to_owned(),
                    bytes: volume_bytes,
                    block_bytes: spec.block_bytes,
                })?;
        let backing = Backing::create(path, backing_bytes)?;
        let created = Opening::Created;
        return Ok(assemble(backing, volume_bytes, area, 0, None, created));
    }
    let mut backing = Backing::open(path)?;
    let size = backing.backing_bytes();
    let found = if size >= META_SLOTS_BYTES {
        read_slots(backing.file(), size - META_SLOTS_BYTES).map_err(StorageError::io(path))?
    } else {
        Ok(None)
    };
    match found {
        Ok(Some((record, count))) => {
            let area = record.meta_area_bytes;
            let expected = record.volume_bytes.saturating_add(area);
            if area < meta_area_bytes(record.volume_bytes) || expected != size {
                return Err(StorageError::Resized {
                    path: path.to_owned(),
                    backing_bytes: size,
                    volume_bytes: record.volume_bytes,
                    expected_bytes: record
                        .volume_bytes
                        .saturating_add(meta_area_bytes(record.volume_bytes)),
                });
            }
            if let Some(asked) = spec.create_bytes.filter(|a| *a != record.volume_bytes) {
                return Err(StorageError::SizeMismatch {
                    path: path.to_owned(),
                    found: record.volume_bytes,
                    asked,
                });
            }
            check_block(path, record.volume_bytes, spec.block_bytes)?;
            // A legacy file beside a volume with its own record: an upgrade that stopped before
            // the rename.
            let how = match legacy_present {
                Some(legacy) => retire_legacy(legacy)?,
                None => Opening::Found,
            };
            let volume_bytes = record.volume_bytes;
            Ok(assemble(
                backing,
                volume_bytes,
                area,
                count,
                Some(record),
                how,
            ))
        }
        Err(why) => Err(StorageError::Corrupt {
            path: path.to_owned(),
            why,
        }),
        Ok(None) => match read_legacy(legacy_present)? {
            Some((record, count, legacy_path)) => {
                upgrade(backing, spec, record, count, &legacy_path)
            }
            None => {
                let whole = (spec.adopt_file && !backing.is_block_device())
                    .then(|| size - size % u64::from(spec.block_bytes))
                    .filter(|b| *b > 0);
                let Some(volume_bytes) = spec.create_bytes.or(whole) else {
                    return Err(StorageError::NoMetadata {
                        path: path.to_owned(),
                    });
                };
                check_block(path, volume_bytes, spec.block_bytes)?;
                let needed = volume_bytes.saturating_add(meta_area_bytes(volume_bytes));
                let fits = if backing.is_block_device() {
                    size >= needed
                } else {
                    size == volume_bytes || size == needed || whole == Some(volume_bytes)
                };
                if !fits {
                    return Err(StorageError::Resized {
                        path: path.to_owned(),
                        backing_bytes: size,
                        volume_bytes,
                        expected_bytes: needed,
                    });
                }
                if !backing.is_block_device() && size < needed {
                    backing.grow(needed)?;
                }
                let area = backing.backing_bytes() - volume_bytes;
                Ok(assemble(
                    backing,
                    volume_bytes,
                    area,
                    0,
                    None,
                    Opening::Initialised,
                ))
            }
        },
    }
}

/// Moves a legacy record into the area of a regular file grown for it.
fn upgrade(
    mut backing: Backing,
    spec: &VolumeSpec<'_>,
    record: MetaRecord,
    count: u64,
    legacy: &Path,
) -> Result<Opened, StorageError> {
    let path = spec.path;
    let volume_bytes = record.volume_bytes;
    let area = meta_area_bytes(volume_bytes);
    let needed = volume_bytes.saturating_add(area);
    let size = backing.backing_bytes();
    if backing.is_block_device() {
        return Err(StorageError::BlockDeviceUpgrade {
            path: path.to_owned(),
            legacy: legacy.to_owned(),
            volume_bytes,
            needed_bytes: needed,
        });
    }
    // Already grown: an upgrade that stopped before it wrote the record.
    if size != volume_bytes && size != needed {
        return Err(StorageError::LegacySize {
            path: path.to_owned(),
            legacy: legacy.to_owned(),
            recorded: volume_bytes,
            actual: size,
        });
    }
    if let Some(asked) = spec.create_bytes.filter(|a| *a != volume_bytes) {
        return Err(StorageError::SizeMismatch {
            path: path.to_owned(),
            found: volume_bytes,
            asked,
        });
    }
    check_block(path, volume_bytes, spec.block_bytes)?;
    // The earlier server wrote its record after every sync of the volume, so a volume modified
    // later was changed behind it (replaced, or copied in).
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified());
    let volume_newer = match (modified(path), modified(legacy)) {
        (Ok(v), Ok(m)) => v > m,
        _ => true,
    };
    backing.grow(needed)?;
    let record = record.upgraded(area, volume_newer);
    let slots = backing.backing_bytes() - META_SLOTS_BYTES;
    write_slot(backing.file(), slots, &record, count + 1).map_err(StorageError::io(path))?;
    let how = retire_legacy(legacy)?;
    Ok(assemble(
        backing,
        volume_bytes,
        area,
        count + 1,
        Some(record),
        how,
    ))
}

fn assemble(
    backing: Backing,
    volume_bytes: u64,
    meta_area_bytes: u64,
    write_count: u64,
    record: Option<MetaRecord>,
    how: Opening,
) -> Opened {
    let path = backing.path().to_owned();
    let backing_bytes = backing.backing_bytes();
    debug_assert!(meta_area_bytes >= META_FILE_BYTES as u64);
    let file = Arc::new(backing.into_file());
    Opened {
        volume: Arc::new(FileVolume::new(Arc::clone(&file), volume_bytes)),
        meta: Arc::new(AreaMeta::new(
            file,
            path,
            backing_bytes,
            meta_area_bytes,
            write_count,
        )),
        record,
        how,
    }
}

#[cfg(test)]
// Test sizes are small constants: casts between them cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use mirror_core::{Seq, VolumeId};

    const DATA: u64 = 1 << 20;

    fn spec<'a>(path: &'a Path, legacy: &'a Path, create_bytes: Option<u64>) -> VolumeSpec<'a> {
        VolumeSpec {
            path,
            create_bytes,
            legacy_meta: Some(legacy),
            block_bytes: 4096,
            adopt_file: false,
        }
    }

    fn legacy_record() -> MetaRecord {
        MetaRecord {
            durable: Seq(7),
            ..MetaRecord::new(VolumeId([1; 16]), DATA)
        }
    }

    #[test]
    fn a_legacy_file_without_its_volume_is_refused_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, legacy) = (dir.path().join("v"), dir.path().join("v.meta"));
        fs::write(&legacy, legacy_record().encode_file(0)).unwrap();
        let err = open(&spec(&vol, &legacy, Some(DATA))).unwrap_err();
        assert!(
            matches!(err, StorageError::LegacyWithoutVolume { .. }),
            "{err}"
        );
        assert!(!vol.exists());
    }

    /// A crash after the record was written but before the rename: the next start finds the
    /// record at the end and finishes the rename.
    #[test]
    fn an_interrupted_upgrade_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, legacy) = (dir.path().join("v"), dir.path().join("v.meta"));
        fs::write(&vol, vec![0u8; DATA as usize]).unwrap();
        fs::write(&legacy, legacy_record().encode_file(0)).unwrap();
        let opened = open(&spec(&vol, &legacy, None)).unwrap();
        assert!(matches!(opened.how, Opening::Upgraded { .. }));
        assert_eq!(opened.record.unwrap().durable, Seq(7));
        drop(opened);
        fs::rename(upgraded_path(&legacy), &legacy).unwrap();
        let opened = open(&spec(&vol, &legacy, Some(DATA))).unwrap();
        assert!(matches!(opened.how, Opening::Upgraded { .. }));
        assert_eq!(opened.record.unwrap().durable, Seq(7));
        assert!(!legacy.exists());
        drop(opened);
        let opened = open(&spec(&vol, &legacy, Some(DATA))).unwrap();
        assert_eq!(opened.how, Opening::Found);
        assert_eq!(
            fs::metadata(&vol).unwrap().len(),
            DATA + meta_area_bytes(DATA)
        );
    }

    /// A volume of the previous release holds data up to its last byte: its end is no record,
    /// and the legacy record moves into a new area behind the data, which stays as it was.
    #[test]
    fn a_legacy_volume_with_data_at_its_end_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, legacy) = (dir.path().join("v"), dir.path().join("v.meta"));
        let content: Vec<u8> = (0..DATA).map(|i| u8::try_from(i % 251).unwrap()).collect();
        fs::write(&vol, &content).unwrap();
        fs::write(&legacy, legacy_record().encode_file(0)).unwrap();
        let opened = open(&spec(&vol, &legacy, None)).unwrap();
        assert!(matches!(opened.how, Opening::Upgraded { .. }));
        assert_eq!(opened.record.unwrap().durable, Seq(7));
        drop(opened);
        assert_eq!(fs::read(&vol).unwrap()[..DATA as usize], content[..]);
        let opened = open(&spec(&vol, &legacy, None)).unwrap();
        assert_eq!(opened.how, Opening::Found);
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_volume() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, legacy) = (dir.path().join("v"), dir.path().join("v.meta"));
        let first = open(&spec(&vol, &legacy, Some(DATA))).unwrap();
        assert_eq!(first.how, Opening::Created);
        let err = open(&spec(&vol, &legacy, Some(DATA))).unwrap_err();
        assert!(matches!(err, StorageError::InUse { .. }), "{err}");
    }

    /// A loop device over a file, detached on drop. Needs root and the loop driver, as CI has.
    struct Loop(PathBuf);

    impl Loop {
        fn attach(file: &Path) -> Loop {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(file)
                .output()
                .expect("run losetup (this test needs util-linux)");
            assert!(
                out.status.success(),
                "losetup failed (this test needs root and the loop driver): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }

    /// A block device cannot grow by the metadata area: its legacy record is not moved, the
    /// device and the legacy file stay as they were, and the error says what to do.
    #[test]
    fn a_legacy_file_beside_a_block_device_without_a_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (image, legacy) = (dir.path().join("image"), dir.path().join("dev.meta"));
        let content: Vec<u8> = (0..DATA).map(|i| u8::try_from(i % 251).unwrap()).collect();
        fs::write(&image, &content).unwrap();
        fs::write(&legacy, legacy_record().encode_file(0)).unwrap();
        let dev = Loop::attach(&image);
        let err = open(&spec(&dev.0, &legacy, None)).unwrap_err();
        assert!(
            matches!(
                &err,
                StorageError::BlockDeviceUpgrade { volume_bytes, needed_bytes, .. }
                    if *volume_bytes == DATA && *needed_bytes == DATA + meta_area_bytes(DATA)
            ),
            "{err}"
        );
        assert!(err.to_string().contains("--create-size"), "{err}");
        drop(dev);
        assert_eq!(fs::read(&image).unwrap(), content);
        assert_eq!(
            fs::read(&legacy).unwrap(),
            legacy_record().encode_file(0).to_vec()
        );
        assert!(!upgraded_path(&legacy).exists());
    }
}
