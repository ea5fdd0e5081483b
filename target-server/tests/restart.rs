//! The metadata file across runs: clean shutdown, restart, and corrupt or foreign metadata.

// Test sizes are small constants: casts between them cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use mirror_core::meta::{MetaRecord, SLOT_BYTES};
use mirror_core::source::{Mode, Source};
use mirror_core::wire::Frame;
use mirror_core::{Seq, VolumeId};
use target_server::meta::{self, MetaError};
use target_server::ServerError;

const VOLUME_BYTES: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_marks_meta_clean_and_restart_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_config(&dir, VOLUME_BYTES);
    let server = target_server::start(cfg.clone()).await.unwrap();
    let running = meta::load(&cfg.meta_path).unwrap().unwrap();
    assert!(
        !running.clean,
        "a running server's metadata must say not clean"
    );
    assert_eq!(running.durable, Seq(0));
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let mut c = Client::connect_ready(server.local_addr(), src, 21).await;
    for i in 0..3u64 {
        c.write(i * BLOCK, vec![i as u8 + 1; BLOCK as usize]);
    }
    c.sync().await;
    // Durability was recorded before it was acknowledged.
    let meta = meta::load(&cfg.meta_path).unwrap().unwrap();
    assert_eq!((meta.durable, meta.clean), (Seq(3), false));
    server.shutdown().await.unwrap();
    let meta = meta::load(&cfg.meta_path).unwrap().unwrap();
    assert_eq!(
        meta,
        MetaRecord {
            durable: Seq(3),
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
    let content = std::fs::read(&cfg.volume_path).unwrap();
    for i in 0..4usize {
        let block = &content[i * BLOCK as usize..(i + 1) * BLOCK as usize];
        assert!(block.iter().all(|b| *b == i as u8 + 1), "block {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_torn_meta_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_config(&dir, VOLUME_BYTES);
    target_server::start(cfg.clone())
        .await
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    let good = std::fs::read(&cfg.meta_path).unwrap();
    // One bad record is a torn update and the other slot is used; both bad is corruption.
    let mut flipped = good.clone();
    flipped[20] ^= 0x04;
    flipped[SLOT_BYTES + 20] ^= 0x04;
    for (what, bytes) in [
        ("flipped bit in both records", flipped),
        ("torn", good[..30].to_vec()),
        ("empty", Vec::new()),
    ] {
        std::fs::write(&cfg.meta_path, &bytes).unwrap();
        match target_server::start(cfg.clone()).await {
            Err(ServerError::Meta(MetaError::Corrupt { .. })) => {}
            Err(other) => panic!("{what}: wrong error {other}"),
            Ok(_) => panic!("{what}: started on corrupt metadata"),
        }
        // Never overwritten by the failed start.
        assert_eq!(std::fs::read(&cfg.meta_path).unwrap(), bytes, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_of_another_volume_or_size_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_config(&dir, VOLUME_BYTES);
    target_server::start(cfg.clone())
        .await
        .unwrap()
        .shutdown()
        .await
        .unwrap();
    let mut other = cfg.clone();
    other.volume_id = VolumeId([0x33; 16]);
    let err = target_server::start(other).await.unwrap_err();
    assert!(matches!(err, ServerError::MetaMismatch { .. }), "{err}");
    assert!(err.to_string().contains("belongs to volume"), "{err}");
    // The volume grew behind the server's back.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.volume_path)
        .unwrap()
        .set_len(2 * VOLUME_BYTES)
        .unwrap();
    let mut grown = cfg.clone();
    grown.create_bytes = None;
    let err = target_server::start(grown).await.unwrap_err();
    assert!(err.to_string().contains("records a volume of"), "{err}");
}
