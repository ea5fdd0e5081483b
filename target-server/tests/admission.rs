//! Who may become the server's session: nothing changes before authentication, a silent
//! connection holds no slot, a source's reconnect replaces its own stale session.

// Test sizes are small constants: casts between them cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::Duration;

use common::*;
use mirror_core::genid::GenIds;
use mirror_core::meta::MetaRecord;
use mirror_core::source::{ConnState, Mode, Source};
use mirror_core::wire::{Frame, Hello, RefuseReason, MAC_BYTES};
use mirror_core::{NodeId, Seq};
use tokio::io::AsyncWriteExt;

const VOLUME_BYTES: u64 = 1 << 20;

/// Before the fix, the forged HELLO's `last_seq` 0 cleared the "inconsistent" flag of a target
/// restarted after an unclean stop, though its AUTH was wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_hello_does_not_clear_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = stopped_volume(&dir, VOLUME_BYTES).await;
    // As a crash leaves it: applied writes past `durable` may be on the volume.
    write_volume_record(
        &cfg,
        &MetaRecord {
            clean: false,
            ..MetaRecord::new(VOLUME_ID, VOLUME_BYTES)
        },
    );
    let server = target_server::start(cfg).await.unwrap();
    assert!(!server.status().consistent);

    let mut intruder = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let hello = Frame::Hello(Hello {
        volume_id: VOLUME_ID,
        node_id: NodeId(1),
        gen_ids: GenIds::default(),
        last_seq: Seq(0),
        volume_bytes: VOLUME_BYTES,
        block_bytes: BLOCK as u32,
        nonce: [7; MAC_BYTES],
        mac: [0; MAC_BYTES],
        resync_follows: false,
        rebase_target: false,
    });
    intruder.write_all(&hello.encode().to_vec()).await.unwrap();
    let Ok(Frame::Hello(_)) = read_frame(&mut intruder, Duration::from_secs(5)).await else {
        panic!("no HELLO from the target");
    };
    let bad_auth = Frame::Auth {
        mac: [0; MAC_BYTES],
    };
    intruder
        .write_all(&bad_auth.encode().to_vec())
        .await
        .unwrap();
    let frames = read_until_closed(&mut intruder, Duration::from_secs(5)).await;
    assert_eq!(
        frames,
        vec![Frame::Refuse {
            reason: RefuseReason::BadAuth
        }]
    );
    assert!(
        !server.status().consistent,
        "an unauthenticated HELLO cleared the inconsistent flag"
    );
}

/// Before the fix, one silent connection held the only session slot until the idle timeout (30 s
/// by default) and the real source got REFUSE(Busy) all that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_holds_no_slot_and_is_closed_at_its_deadline() {
    let fx = start_server(VOLUME_BYTES, |cfg| {
        cfg.handshake_timeout = Duration::from_secs(1);
        cfg.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(fx.addr()).await.unwrap();
    // Let the server take it in before the source comes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let mut c = Client::connect(fx.addr(), src, 31).await;
    c.pump_until(
        |s| s.status().conn == ConnState::Connected,
        Duration::from_secs(5),
    )
    .await
    .expect("the source is admitted at once, not refused as busy");
    assert!(started.elapsed() < Duration::from_millis(900));
    c.write(0, vec![3; BLOCK as usize]);
    c.sync().await;

    let frames = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert_eq!(
        frames,
        vec![],
        "a timed-out handshake is closed without a frame"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "closed after {waited:?}"
    );
    // The session is not touched by the handshake timer.
    c.write(BLOCK, vec![4; BLOCK as usize]);
    c.sync().await;
    assert_eq!(fx.server.status().durable, Seq(2));
}

/// Before the fix, a source whose connection died without the target noticing (loss, a dropped
/// FIN) was refused with "target already serves a source" until its own dead session timed out.
/// A source of another node id still gets Busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_replaces_the_same_nodes_stale_session() {
    let fx = start_server(VOLUME_BYTES, |cfg| {
        cfg.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let src = Source::new(source_config(VOLUME_BYTES, Mode::Sync));
    let mut c = Client::connect_ready(fx.addr(), src, 41).await;
    c.write(0, vec![1; BLOCK as usize]);
    c.sync().await;
    // The source gives up on the connection; the server still has it open.
    let Client {
        mut src,
        stream: mut stale,
        ..
    } = c;
    src.on_disconnect();
    let mut c = Client::connect(fx.addr(), src, 42).await;
    c.pump_until(
        |s| s.status().conn == ConnState::Connected,
        Duration::from_secs(5),
    )
    .await
    .expect("the reconnect is admitted at once");
    c.write(BLOCK, vec![2; BLOCK as usize]);
    c.sync().await;
    // The stale connection is closed by the server (whatever ACKs it had queued come first).
    let frames = read_until_closed(&mut stale, Duration::from_secs(5)).await;
    assert!(
        frames.iter().all(|f| matches!(f, Frame::Ack { .. })),
        "{frames:?}"
    );

    let mut other_cfg = source_config(VOLUME_BYTES, Mode::Sync);
    other_cfg.node_id = NodeId(9);
    let mut other = Client::connect(fx.addr(), Source::new(other_cfg), 43).await;
    // As far along as the target, so that it does not refuse the target itself.
    other.write(0, vec![5; BLOCK as usize]);
    other.write(BLOCK, vec![5; BLOCK as usize]);
    // The source counts itself connected once it sent AUTH: wait for what only a session gets.
    let err = other
        .pump_until(|s| s.status().durable >= Seq(2), Duration::from_secs(5))
        .await
        .expect_err("another node must not take the session");
    assert!(err.contains("already serves"), "{err}");
    c.write(2 * BLOCK, vec![3; BLOCK as usize]);
    c.sync().await;
    assert_eq!(fx.server.status().durable, Seq(3));
}
