//! The server over loopback, driven by a hand-pumped `Source` engine.

// Test sizes are small constants: casts between them cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use mirror_core::auth::{self, Signer};
use mirror_core::source::{Mode, Source};
use mirror_core::wire::{Frame, Op, RefuseReason, HEADER_BYTES};
use mirror_core::{Lba, Seq, VolumeId};

const VOLUME_BYTES: u64 = 4 << 20;

/// Builds the bytes of a bad frame for a given next sequence number.
type MakeFrame<'a> = Box<dyn Fn(u64) -> Vec<u8> + 'a>;

/// Random aligned writes (and a discard, a write-zeroes, a flush) reach the file and are
/// acknowledged durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_writes_are_applied_and_acknowledged() {
    let seed = seed("handshake_and_writes_are_applied_and_acknowledged");
    let fx = start_server(VOLUME_BYTES, |_| {}).await;
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let mut c = Client::connect_ready(fx.addr(), src, seed).await;
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    let mut rng = fastrand::Rng::with_seed(seed);
    for i in 0..60 {
        let blocks = rng.u64(1..=64);
        let offset = rng.u64(0..VOLUME_BYTES / BLOCK - blocks + 1) * BLOCK;
        let len = (blocks * BLOCK) as usize;
        match i % 20 {
            7 => {
                c.src
                    .submit(
                        Op::Discard {
                            lba: Lba::from_bytes(offset),
                            len_bytes: len as u32,
                        },
                        0,
                    )
                    .unwrap();
                model[offset as usize..offset as usize + len].fill(0);
            }
            13 => {
                c.src
                    .submit(
                        Op::WriteZeroes {
                            lba: Lba::from_bytes(offset),
                            len_bytes: len as u32,
                        },
                        0,
                    )
                    .unwrap();
                model[offset as usize..offset as usize + len].fill(0);
            }
            17 => {
                c.src.submit(Op::Flush, 0).unwrap();
            }
            _ => {
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
                c.write(offset, data);
            }
        }
        if i % 8 == 0 {
            c.sync().await;
        }
    }
    c.sync().await;
    let last = c.src.status().last_local;
    assert_eq!(last, Seq(60));
    assert_eq!(fx.server.status().durable, last);
    assert!(fx.server.status().consistent);
    assert!(
        fx.volume_content() == model,
        "target volume differs from the model"
    );
    assert_eq!(fx.volume_content().len() as u64, VOLUME_BYTES);
}

/// The engine outlives connections: a reconnecting source resumes after what the target has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_resumes_where_the_target_stands() {
    let fx = start_server(VOLUME_BYTES, |_| {}).await;
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let mut c = Client::connect_ready(fx.addr(), src, 1).await;
    c.write(0, vec![1; 8192]);
    c.sync().await;
    let src = c.disconnect();
    let mut c = Client::connect_ready(fx.addr(), src, 2).await;
    let hello_seq = c.seen.iter().find_map(|f| match f {
        Frame::Hello(h) => Some(h.last_seq),
        _ => None,
    });
    assert_eq!(hello_seq, Some(Seq(1)));
    c.write(4096, vec![2; 4096]);
    c.sync().await;
    let content = fx.volume_content();
    assert_eq!(&content[..4096], &[1u8; 4096][..]);
    assert_eq!(&content[4096..8192], &[2u8; 4096][..]);
    assert_eq!(fx.server.status().durable, Seq(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_of_another_volume_is_refused() {
    let fx = start_server(VOLUME_BYTES, |_| {}).await;
    let mut cfg = source_config(VOLUME_BYTES, Mode::Sync);
    cfg.volume_id = VolumeId([0x22; 16]);
    let mut c = Client::connect(fx.addr(), Source::new(cfg), 3).await;
    let err = c
        .pump_until(|_| false, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        c.seen.contains(&Frame::Refuse {
            reason: RefuseReason::WrongVolume
        }),
        "{err}: {:?}",
        c.seen
    );
    let rest = read_until_closed(&mut c.stream, Duration::from_secs(5)).await;
    assert!(rest.is_empty(), "{rest:?}");
    // Still serving.
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let mut good = Client::connect_ready(fx.addr(), src, 4).await;
    good.write(0, vec![5; 4096]);
    good.sync().await;
}

/// A source that signs with the wrong secret gets REFUSE(BadAuth) and is closed; nothing it sends
/// afterwards is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused() {
    let fx = start_server(VOLUME_BYTES, |_| {}).await;
    let mut cfg = source_config(VOLUME_BYTES, Mode::Sync);
    cfg.secret = b"not-the-secret".to_vec();
    let mut c = Client::connect(fx.addr(), Source::new(cfg), 5).await;
    // Send our HELLO by hand (the engine would itself notice the target's MAC is wrong).
    let Some(Frame::Hello(ours)) = c.src.poll_transmit() else {
        panic!("no HELLO queued");
    };
    c.send_raw(&Frame::Hello(ours.clone()).encode().to_vec())
        .await;
    let Ok(Frame::Hello(theirs)) = read_frame(&mut c.stream, Duration::from_secs(5)).await else {
        panic!("no HELLO from the target");
    };
    let mac = auth::sign(
        b"not-the-secret",
        Signer::Source,
        &theirs.nonce,
        &ours.nonce,
        &VOLUME_ID,
    );
    c.send_raw(&Frame::Auth { mac }.encode().to_vec()).await;
    let write = Frame::Op {
        seq: Seq(1),
        epoch: 0,
        op: Op::Write {
            lba: Lba(0),
            data: Bytes::from(vec![0xee; 4096]),
        }
        .into(),
        ack_on_receipt: false,
    };
    // The server may already have closed: ignore send errors.
    let _ = tokio::io::AsyncWriteExt::write_all(&mut c.stream, &write.encode().to_vec()).await;
    let frames = read_until_closed(&mut c.stream, Duration::from_secs(5)).await;
    assert_eq!(
        frames,
        vec![Frame::Refuse {
            reason: RefuseReason::BadAuth
        }]
    );
    assert!(fx.volume_content().iter().all(|b| *b == 0));
    assert_eq!(fx.server.status().applied, Seq(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_closed() {
    let fx = start_server(VOLUME_BYTES, |cfg| {
        cfg.idle_timeout = Duration::from_millis(500);
    })
    .await;
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let mut c = Client::connect_ready(fx.addr(), src, 7).await;
    let started = std::time::Instant::now();
    read_until_closed(&mut c.stream, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "closed after {waited:?}"
    );
    // A source that keeps talking is not closed: ping for longer than the timeout.
    let src = c.disconnect();
    let mut c = Client::connect_ready(fx.addr(), src, 8).await;
    for token in 0..8u64 {
        c.send_raw(&Frame::Ping { token }.encode().to_vec()).await;
        let pong = loop {
            match read_frame(&mut c.stream, Duration::from_secs(2)).await {
                Ok(Frame::Ack { .. }) => continue,
                other => break other,
            }
        };
        assert_eq!(pong, Ok(Frame::Pong { token }));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// A corrupted write payload is answered with NAK; the engine's resend is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_write_payload_is_naked_and_the_resend_applied() {
    let seed = seed("corrupt_write_payload_is_naked_and_the_resend_applied");
    let fx = start_server(VOLUME_BYTES, |_| {}).await;
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let mut c = Client::connect_ready(fx.addr(), src, seed).await;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    for i in 0..6u64 {
        let mut data = vec![0u8; 16384];
        rng.fill(&mut data);
        model[(i * 16384) as usize..((i + 1) * 16384) as usize].copy_from_slice(&data);
        c.write(i * 16384, data);
    }
    let last = c.src.status().last_local;
    let mut corrupted = 0;
    let flip_at = HEADER_BYTES + rng.usize(0..16384);
    c.pump_until_with(
        |s| s.status().durable >= last,
        Duration::from_secs(10),
        |frame, bytes| {
            // Corrupt the first transmission of seq 3 only.
            if matches!(
                frame,
                Frame::Op {
                    seq: Seq(3),
                    epoch: 0,
                    ..
                }
            ) && corrupted == 0
            {
                bytes[flip_at] ^= 0x40;
                corrupted += 1;
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(corrupted, 1);
    assert!(
        c.seen
            .iter()
            .any(|f| matches!(f, Frame::Nak { seq: Seq(3), .. })),
        "no NAK for seq 3: {:?}",
        c.seen
    );
    assert!(fx.server.status().epoch >= 1);
    assert!(fx.volume_content() == model, "target volume differs");
}

/// Every malformed frame closes the connection, writes nothing outside (or inside) the volume, and
/// the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_the_connection_and_write_nothing() {
    let fx = start_server(VOLUME_BYTES, |_| {}).await;
    let mut src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let marker = vec![0xee_u8; 4096];
    let write = |seq: u64, lba: u64, data: Vec<u8>| Frame::Op {
        seq: Seq(seq),
        epoch: 0,
        op: Op::Write {
            lba: Lba(lba),
            data: Bytes::from(data),
        }
        .into(),
        ack_on_receipt: false,
    };
    let fix_header_crc = |h: &mut [u8]| {
        let crc = crc32c::crc32c(&h[0..52]);
        h[52..56].copy_from_slice(&crc.to_le_bytes());
    };
    let volume_sectors = VOLUME_BYTES / 512;
    let cases: Vec<(&str, MakeFrame)> = vec![
        (
            "bad magic",
            Box::new(|seq| {
                let mut b = write(seq, 0, marker.clone()).encode().to_vec();
                b[0] ^= 0xff;
                b
            }),
        ),
        (
            "bad header checksum",
            Box::new(|seq| {
                let mut b = write(seq, 0, marker.clone()).encode().to_vec();
                b[17] ^= 0x01;
                b
            }),
        ),
        (
            "oversized payload_len",
            Box::new(|seq| {
                let mut b = write(seq, 0, marker.clone()).encode().to_vec();
                let huge = (64u32 << 20).to_le_bytes();
                b[24..28].copy_from_slice(&huge);
                b[28..32].copy_from_slice(&huge);
                fix_header_crc(&mut b[..HEADER_BYTES]);
                b
            }),
        ),
        (
            "LBA beyond the volume",
            Box::new(|seq| write(seq, volume_sectors, marker.clone()).encode().to_vec()),
        ),
        (
            "write straddling the end of the volume",
            Box::new(|seq| {
                write(seq, volume_sectors - 8, vec![0xee; 8192])
                    .encode()
                    .to_vec()
            }),
        ),
        (
            "LBA overflowing u64 bytes",
            Box::new(|seq| write(seq, u64::MAX / 256, marker.clone()).encode().to_vec()),
        ),
        (
            "length not a multiple of the block",
            Box::new(|seq| write(seq, 0, vec![0xee; 512]).encode().to_vec()),
        ),
        (
            "offset not a multiple of the block",
            Box::new(|seq| write(seq, 1, marker.clone()).encode().to_vec()),
        ),
        (
            "length not a multiple of 512",
            Box::new(|seq| {
                let mut b = write(seq, 0, marker.clone()).encode().to_vec();
                b[24..28].copy_from_slice(&4000u32.to_le_bytes());
                b[28..32].copy_from_slice(&4000u32.to_le_bytes());
                fix_header_crc(&mut b[..HEADER_BYTES]);
                b.truncate(HEADER_BYTES + 4000);
                b
            }),
        ),
        (
            "discard beyond the volume",
            Box::new(|seq| {
                Frame::Op {
                    seq: Seq(seq),
                    epoch: 0,
                    op: Op::Discard {
                        lba: Lba(volume_sectors - 8),
                        len_bytes: 1 << 20,
                    }
                    .into(),
                    ack_on_receipt: false,
                }
                .encode()
                .to_vec()
            }),
        ),
        (
            "frame the source never sends (ACK)",
            Box::new(|seq| {
                Frame::Ack {
                    received: Seq(seq),
                    durable: Seq(seq),
                }
                .encode()
                .to_vec()
            }),
        ),
    ];
    let mut seed = 100;
    // A known pattern in the last block, so a zeroing discard past the end would show too.
    let mut c = Client::connect_ready(fx.addr(), src, seed).await;
    c.write(VOLUME_BYTES - BLOCK, vec![0x5a; BLOCK as usize]);
    c.sync().await;
    src = c.disconnect();
    let before = fx.volume_content();
    for (name, make) in &cases {
        seed += 1;
        let mut c = Client::connect_ready(fx.addr(), src, seed).await;
        let next = c.src.status().last_local.0 + 1;
        let _ = tokio::io::AsyncWriteExt::write_all(&mut c.stream, &make(next)).await;
        let frames = read_until_closed(&mut c.stream, Duration::from_secs(5)).await;
        assert!(
            frames
                .iter()
                .all(|f| matches!(f, Frame::Refuse { .. } | Frame::Ack { .. })),
            "{name}: {frames:?}"
        );
        let after = fx.volume_content();
        assert_eq!(after.len() as u64, VOLUME_BYTES, "{name}: volume resized");
        assert!(after == before, "{name}: volume content changed");
        src = c.disconnect();
    }
    // Still serving, and a good write lands.
    let mut c = Client::connect_ready(fx.addr(), src, 999).await;
    c.write(0, marker.clone());
    c.sync().await;
    assert_eq!(&fx.volume_content()[..4096], &marker[..]);
}

/// The engine's back-pressure: a tiny commit log stops the reader, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_commit_log_applies_everything_under_back_pressure() {
    let seed = seed("small_commit_log_applies_everything_under_back_pressure");
    let fx = start_server(VOLUME_BYTES, |cfg| {
        cfg.commit_log_bytes_max = 1 << 20;
        cfg.commit_log_entries_max = 4;
    })
    .await;
    let mut cfg = source_config(VOLUME_BYTES, Mode::Async);
    cfg.log_bytes_max = 64 << 20;
    let mut c = Client::connect_ready(fx.addr(), Source::new(cfg), seed).await;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut model = vec![0u8; VOLUME_BYTES as usize];
    for _ in 0..40 {
        let blocks = rng.u64(1..=256);
        let offset = rng.u64(0..VOLUME_BYTES / BLOCK - blocks + 1) * BLOCK;
        let mut data = vec![0u8; (blocks * BLOCK) as usize];
        rng.fill(&mut data);
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        c.write(offset, data);
    }
    c.sync().await;
    assert!(fx.volume_content() == model);
}
