//! Local lock holders (backup reads) against mirrored writes.

// Test sizes are small constants: casts between them cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use common::*;
use mirror_core::source::{Mode, Source};
use mirror_core::target::ConflictPolicy;
use mirror_core::wire::Frame;
use mirror_core::Seq;
use target_server::ServerError;

const VOLUME_BYTES: u64 = 4 << 20;

/// Pumps for a while without expecting completion (the target is held back on purpose).
async fn pump_for(c: &mut Client, wait: Duration) {
    let result = c.pump_until(|_| false, wait).await;
    let err = result.unwrap_err();
    assert!(err.starts_with("timed out"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_lock_holds_back_mirrored_writes_with_wait_policy() {
    let fx = start_server(VOLUME_BYTES, |cfg| {
        cfg.local_lock_timeout = Duration::from_millis(200);
    })
    .await;
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Async));
    let mut c = Client::connect_ready(fx.addr(), src, 11).await;
    let lock = fx.server.lock_region(0, 8192).await.unwrap();
    c.write(4096, vec![1; 4096]);
    c.write(65536, vec![2; 4096]);
    pump_for(&mut c, Duration::from_millis(300)).await;
    // Nothing applied: seq 1 waits for the region, seq 2 waits behind it (in order).
    assert_eq!(fx.server.status().applied, Seq(0));
    assert_eq!(lock.read(0, 8192).await.unwrap(), vec![0u8; 8192]);
    // The mirror waits for [4096, 8192): no new local lock there, but elsewhere yes.
    match fx.server.lock_region(4096, 512).await {
        Err(ServerError::LockTimeout(4096, 512)) => {}
        other => panic!("expected a lock timeout, got {other:?}"),
    }
    let elsewhere = fx.server.lock_region(1 << 20, 4096).await.unwrap();
    // Reading outside the locked region through the lock is refused.
    assert!(matches!(
        lock.read(8192, 4096).await,
        Err(ServerError::BadRange(8192, 4096))
    ));
    lock.release();
    c.sync().await;
    let content = fx.volume_content();
    assert_eq!(&content[4096..8192], &[1u8; 4096][..]);
    assert_eq!(&content[65536..65536 + 4096], &[2u8; 4096][..]);
    drop(elsewhere);
    assert!(matches!(
        fx.server.consistent_read(VOLUME_BYTES - 512, 1024).await,
        Err(ServerError::BadRange(..))
    ));
    assert!(matches!(
        fx.server.consistent_read(0, 0).await,
        Err(ServerError::BadRange(..))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_policy_rejects_then_grants_after_release() {
    let fx = start_server(VOLUME_BYTES, |cfg| {
        cfg.conflict_policy = ConflictPolicy::Reject;
    })
    .await;
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Async));
    let mut c = Client::connect_ready(fx.addr(), src, 12).await;
    let lock = fx.server.lock_region(0, 4096).await.unwrap();
    c.write(0, vec![3; 4096]);
    c.write(8192, vec![4; 4096]);
    pump_for(&mut c, Duration::from_millis(300)).await;
    assert!(
        c.seen
            .iter()
            .any(|f| matches!(f, Frame::Reject { seq: Seq(1), .. })),
        "{:?}",
        c.seen
    );
    assert_eq!(fx.server.status().applied, Seq(0));
    drop(lock);
    c.sync().await;
    assert!(
        c.seen
            .iter()
            .any(|f| matches!(f, Frame::Granted { seq: Seq(1), .. })),
        "{:?}",
        c.seen
    );
    let content = fx.volume_content();
    assert_eq!(&content[..4096], &[3u8; 4096][..]);
    assert_eq!(&content[8192..12288], &[4u8; 4096][..]);
}

/// Each mirrored write fills the whole region with its version number. A consistent read must see
/// one version everywhere (never part of a write), and versions never go back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_reads_never_see_part_of_a_mirrored_write() {
    let seed = seed("consistent_reads_never_see_part_of_a_mirrored_write");
    let mut rng = fastrand::Rng::with_seed(seed);
    let region_bytes = rng.u64(4..=64) * BLOCK;
    let offset = rng.u64(0..16) * BLOCK;
    let versions = rng.u8(60..=120);
    let fx = start_server(VOLUME_BYTES, |_| {}).await;
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Received));
    let mut c = Client::connect_ready(fx.addr(), src, seed).await;
    // The reader reports each read; after each batch the writer waits for one, so reads and
    // writes interleave however the scheduler runs them.
    let (reads_tx, mut reads_rx) = tokio::sync::watch::channel(0u32);
    let writer = tokio::spawn(async move {
        for v in 1..=versions {
            c.write(offset, vec![v; region_bytes as usize]);
            if v % 4 == 0 {
                // Let the batch reach the target (received, maybe not yet applied) ...
                let last = c.src.status().last_local;
                c.pump_until(|s| s.status().received >= last, Duration::from_secs(10))
                    .await
                    .unwrap();
                // ... then let one read through before the next batch, pumping meanwhile.
                let before = *reads_rx.borrow_and_update();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while *reads_rx.borrow() == before {
                    assert!(tokio::time::Instant::now() < deadline, "reader starved");
                    let _ = c.pump_until(|_| false, Duration::from_millis(5)).await;
                }
            }
        }
        c.sync().await;
        c
    });
    let mut last_seen = 0u8;
    let mut reads = 0u32;
    let mut distinct = 0u32;
    while !writer.is_finished() {
        let data = fx
            .server
            .consistent_read(offset, region_bytes as usize)
            .await
            .unwrap();
        let v = data[0];
        assert!(
            data.iter().all(|b| *b == v),
            "torn read: starts with version {v}, seed {seed}"
        );
        assert!(v >= last_seen, "version went back from {last_seen} to {v}");
        if v != last_seen {
            distinct += 1;
        }
        last_seen = v;
        reads += 1;
        reads_tx.send_replace(reads);
    }
    let _client = writer.await.unwrap();
    let data = fx
        .server
        .consistent_read(offset, region_bytes as usize)
        .await
        .unwrap();
    assert_eq!(data, vec![versions; region_bytes as usize]);
    println!("{reads} reads saw {distinct} distinct versions of {versions}");
    // The reads met the writes in progress, not just the end state.
    assert!(
        distinct >= 2,
        "only {distinct} versions seen in {reads} reads"
    );
}
