//! The volume's internal metadata across runs: clean shutdown and restart, a corrupt record, a
//! record of another volume, a replaced or resized volume, and the upgrade of a legacy file.

// Test sizes are small constants: casts between them cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use mirror_core::meta::{meta_area_bytes, MetaRecord, META_FILE_BYTES, SLOT_BYTES};
use mirror_core::source::{Mode, Source};
use mirror_core::wire::Frame;
use mirror_core::{Seq, VolumeId};
use mirror_storage::StorageError;
use target_server::ServerError;

const VOLUME_BYTES: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_marks_meta_clean_and_restart_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_config(&dir, VOLUME_BYTES);
    let server = target_server::start(cfg.clone()).await.unwrap();
    // A volume the server created full of zeroes starts consistent at seq 0.
    assert!(server.status().consistent);
    let running = volume_record(&cfg).unwrap();
    assert!(
        !running.clean,
        "a running server's metadata must say not clean"
    );
    assert!(running.consistent);
    assert_eq!(running.durable, Seq(0));
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let mut c = Client::connect_ready(server.local_addr(), src, 21).await;
    for i in 0..3u64 {
        c.write(i * BLOCK, vec![i as u8 + 1; BLOCK as usize]);
    }
    c.sync().await;
    // Durability was recorded before it was acknowledged.
    let meta = volume_record(&cfg).unwrap();
    assert_eq!((meta.durable, meta.clean), (Seq(3), false));
    server.shutdown().await.unwrap();
    assert_eq!(
        volume_record(&cfg).unwrap(),
        MetaRecord {
            durable: Seq(3),
            meta_area_bytes: meta_area_bytes(VOLUME_BYTES),
            ..MetaRecord::new(VOLUME_ID, VOLUME_BYTES)
        }
    );
    // Restart on the same volume (same flags): the target resumes at seq 3.
    let src = c.disconnect();
    let server = target_server::start(cfg.clone()).await.unwrap();
    assert_eq!(server.status().durable, Seq(3));
    assert!(server.status().consistent);
    let mut c = Client::connect_ready(server.local_addr(), src, 22).await;
    let hello = c.seen.iter().find_map(|f| match f {
        Frame::Hello(h) => Some(h.last_seq),
        _ => None,
    });
    assert_eq!(hello, Some(Seq(3)));
    c.write(3 * BLOCK, vec![4; BLOCK as usize]);
    c.sync().await;
    server.shutdown().await.unwrap();
    let content = data_area(&cfg.volume_path, VOLUME_BYTES);
    for i in 0..4usize {
        let block = &content[i * BLOCK as usize..(i + 1) * BLOCK as usize];
        assert!(block.iter().all(|b| *b == i as u8 + 1), "block {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = stopped_volume(&dir, VOLUME_BYTES).await;
    let good = std::fs::read(&cfg.volume_path).unwrap();
    // One bad record is a torn update and the other slot is used; both bad is corruption.
    let slots = good.len() - META_FILE_BYTES;
    let mut flipped = good.clone();
    flipped[slots + 20] ^= 0x04;
    flipped[slots + SLOT_BYTES + 20] ^= 0x04;
    std::fs::write(&cfg.volume_path, &flipped).unwrap();
    match target_server::start(cfg.clone()).await {
        Err(ServerError::Storage(StorageError::Corrupt { .. })) => {}
        Err(other) => panic!("wrong error {other}"),
        Ok(_) => panic!("started on corrupt metadata"),
    }
    // Never overwritten by the failed start.
    assert_eq!(std::fs::read(&cfg.volume_path).unwrap(), flipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_of_another_volume_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = stopped_volume(&dir, VOLUME_BYTES).await;
    let mut other = cfg.clone();
    other.volume_id = VolumeId([0x33; 16]);
    let err = target_server::start(other).await.unwrap_err();
    assert!(matches!(err, ServerError::MetaMismatch { .. }), "{err}");
    assert!(err.to_string().contains("belongs to volume"), "{err}");
}

/// A backing that grew (or shrank) no longer ends in its record: it is refused as resized (or,
/// without its data size, as lacking metadata); it is never initialised over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_or_shrunk_backing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = stopped_volume(&dir, VOLUME_BYTES).await;
    let len = std::fs::metadata(&cfg.volume_path).unwrap().len();
    for new_len in [len + (1 << 20), len - 4096] {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&cfg.volume_path)
            .unwrap();
        file.set_len(new_len).unwrap();
        let err = target_server::start(cfg.clone()).await.unwrap_err();
        assert!(
            matches!(err, ServerError::Storage(StorageError::Resized { .. })),
            "{new_len}: {err}"
        );
        assert!(err.to_string().contains("grown or shrunk"), "{err}");
        let mut no_size = cfg.clone();
        no_size.create_bytes = None;
        // Without the size: no record at the end, or one whose sizes do not add up.
        let err = target_server::start(no_size).await.unwrap_err();
        assert!(
            matches!(
                err,
                ServerError::Storage(
                    StorageError::NoMetadata { .. } | StorageError::Resized { .. }
                )
            ),
            "{new_len}: {err}"
        );
        assert!(err.to_string().contains("grown or shrunk"), "{err}");
        assert_eq!(std::fs::metadata(&cfg.volume_path).unwrap().len(), new_len);
        file.set_len(len).unwrap();
    }
}

/// Item 2: a replaced volume (another file at the path, which carries no record) is never
/// trusted as consistent, not after the resend and not after a clean restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_volume_is_never_trusted_as_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_config(&dir, VOLUME_BYTES);
    let server = target_server::start(cfg.clone()).await.unwrap();
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let mut c = Client::connect_ready(server.local_addr(), src, 31).await;
    c.write(0, vec![1; BLOCK as usize]);
    c.sync().await;
    server.shutdown().await.unwrap();
    // Replaced by an image of the data size (and, in a second round, by a zeroed one of the
    // full size, as a copy of another volume's data area and an empty area would be).
    let full = VOLUME_BYTES + meta_area_bytes(VOLUME_BYTES);
    for replacement_bytes in [VOLUME_BYTES, full] {
        std::fs::remove_file(&cfg.volume_path).unwrap();
        std::fs::write(&cfg.volume_path, vec![0u8; replacement_bytes as usize]).unwrap();
        let server = target_server::start(cfg.clone()).await.unwrap();
        assert_eq!(server.status().durable, Seq::NONE);
        assert!(!server.status().consistent, "{replacement_bytes}");
        assert!(!volume_record(&cfg).unwrap().consistent);
        // A source's writes are applied; the data before them is still unknown. (The first
        // source refuses this target: it acknowledged seq 1, the target reports 0.)
        let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
        let mut c = Client::connect_ready(server.local_addr(), src, 32).await;
        c.write(BLOCK, vec![2; BLOCK as usize]);
        c.sync().await;
        assert_eq!(server.status().durable, Seq(1));
        assert!(!server.status().consistent);
        drop(c);
        server.shutdown().await.unwrap();
        let record = volume_record(&cfg).unwrap();
        assert!(record.clean && !record.consistent, "{record:?}");
        let server = target_server::start(cfg.clone()).await.unwrap();
        assert!(!server.status().consistent, "trusted after a clean restart");
        server.shutdown().await.unwrap();
        assert_eq!(
            std::fs::metadata(&cfg.volume_path).unwrap().len(),
            full,
            "grown by the metadata area"
        );
    }
}

/// The legacy external `<volume>.meta` of an earlier release moves into the volume, keeping the
/// durable seq; the old file is renamed. The record is written as version 3 wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_meta_file_is_upgraded_keeping_the_durable_seq() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_config(&dir, VOLUME_BYTES);
    let mut data = vec![0u8; VOLUME_BYTES as usize];
    data[..BLOCK as usize].fill(5);
    std::fs::write(&cfg.volume_path, &data).unwrap();
    let legacy = MetaRecord {
        durable: Seq(41),
        clean: true,
        ..MetaRecord::new(VOLUME_ID, VOLUME_BYTES)
    };
    std::fs::write(&cfg.legacy_meta_path, legacy_v3_file(&legacy)).unwrap();
    let server = target_server::start(cfg.clone()).await.unwrap();
    assert_eq!(server.status().durable, Seq(41));
    assert!(server.status().consistent);
    server.shutdown().await.unwrap();
    assert!(!cfg.legacy_meta_path.exists());
    assert!(mirror_storage::upgraded_path(&cfg.legacy_meta_path).exists());
    assert_eq!(data_area(&cfg.volume_path, VOLUME_BYTES), data);
    let record = volume_record(&cfg).unwrap();
    assert_eq!((record.durable, record.clean), (Seq(41), true));
    // And it stays upgraded.
    let server = target_server::start(cfg.clone()).await.unwrap();
    assert_eq!(server.status().durable, Seq(41));
    server.shutdown().await.unwrap();
}

/// A volume written after its legacy record (replaced, or copied in) is upgraded as not
/// consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_newer_than_its_legacy_meta_is_upgraded_as_not_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_config(&dir, VOLUME_BYTES);
    let legacy = MetaRecord {
        durable: Seq(41),
        ..MetaRecord::new(VOLUME_ID, VOLUME_BYTES)
    };
    std::fs::write(&cfg.legacy_meta_path, legacy_v3_file(&legacy)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&cfg.volume_path, vec![0u8; VOLUME_BYTES as usize]).unwrap();
    let server = target_server::start(cfg.clone()).await.unwrap();
    assert_eq!(server.status().durable, Seq(41));
    assert!(!server.status().consistent);
    server.shutdown().await.unwrap();
    assert!(!volume_record(&cfg).unwrap().consistent);
}

/// A legacy metadata file as version 3 wrote it (slot 0, write count 0).
fn legacy_v3_file(record: &MetaRecord) -> Vec<u8> {
    let mut b = record.encode(0)[..100].to_vec();
    b[8..12].copy_from_slice(&3u32.to_le_bytes());
    b[12..16].copy_from_slice(&u32::from(record.clean).to_le_bytes());
    b[88..96].fill(0);
    let crc = crc32c::crc32c(&b[..96]);
    b[96..100].copy_from_slice(&crc.to_le_bytes());
    b.resize(META_FILE_BYTES, 0);
    b
}
