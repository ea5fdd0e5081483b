//! The replicator library against the in-process target, through the fault-injecting proxy.
//! These need no binaries. Every random test prints its seed; `E2E_SEED=<seed>` replays it.

use std::time::Duration;

use bytes::Bytes;

use mirror_core::node::DrainError;
use mirror_core::source::{LockStyle, Mode, SourceConfig, SourceError};
use mirror_core::wire::Op;
use mirror_core::{Lba, NodeId, Seq, VolumeId, SECTOR_BYTES};
use mirror_tests::memtarget::{target_config, MemTarget};
use mirror_tests::proxy::{FaultProxy, Faults};
use tokio::task::JoinSet;
use ublk_mirror::replicator::{self, Handle, ReplError, ReplicatorConfig};

const VOLUME_ID: VolumeId = VolumeId([0x5a; 16]);
const SECRET: &[u8] = b"replicator test secret";
const BLOCK: u32 = 512;
const VOLUME_BYTES: u64 = 2 << 20;
const LOG_BYTES_MAX: usize = 256 << 10;

fn source_config(mode: Mode, volume_id: VolumeId, secret: &[u8]) -> SourceConfig {
    SourceConfig {
        volume_id,
        node_id: NodeId(1),
        gen_ids: mirror_tests::memtarget::PAIR_IDS,
        volume_bytes: VOLUME_BYTES,
        block_bytes: BLOCK,
        secret: secret.to_vec(),
        mode,
        flush_replicates: false,
        lock_style: LockStyle::Implied,
        log_bytes_max: LOG_BYTES_MAX,
        log_entries_max: 512,
    }
}

fn config(peer: String, source: SourceConfig) -> ReplicatorConfig {
    let mut cfg = ReplicatorConfig::new(peer, source);
    cfg.backoff_min = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(200);
    cfg
}

/// Writes `writes` random overlapping writes (1..=16 blocks) with `qd` in flight, mirroring them
/// into `local`; switches modes as `modes` says (at the given write index). Returns the last seq.
/// What a workload runs against.
struct Rig<'a> {
    handle: &'a Handle,
    proxy: &'a FaultProxy,
    target: &'a MemTarget,
}

async fn workload(
    rig: &Rig<'_>,
    rng: &mut fastrand::Rng,
    local: &mut [u8],
    writes: usize,
    qd: usize,
    modes: &[(usize, Mode)],
) -> Seq {
    let Rig {
        handle,
        proxy,
        target,
    } = *rig;
    let mut inflight: JoinSet<(Result<Seq, ReplError>, bool)> = JoinSet::new();
    let mut sync_now = false;
    let volume_blocks = VOLUME_BYTES / u64::from(BLOCK);
    for i in 0..writes {
        if let Some((_, mode)) = modes.iter().find(|(at, _)| *at == i) {
            handle.set_mode(*mode).await.expect("set_mode");
            sync_now = matches!(mode, Mode::Sync | Mode::LockThenWrite);
        }
        if i == writes / 2 {
            // At least one cut in every run, whatever the random timer does.
            proxy.cut();
        }
        while inflight.len() >= qd {
            let (result, sync) = inflight
                .join_next()
                .await
                .expect("in flight")
                .expect("join");
            let seq = result.expect("completion");
            if sync {
                let durable = target.status().durable;
                assert!(
                    durable >= seq,
                    "sync write {seq} completed before durable ({durable})"
                );
            }
        }
        let blocks = rng.u64(1..=16);
        let first = rng.u64(0..=volume_blocks - blocks);
        let mut data = vec![0u8; usize::try_from(blocks * u64::from(BLOCK)).unwrap()];
        rng.fill(&mut data);
        let offset = usize::try_from(first * u64::from(BLOCK)).unwrap();
        local[offset..offset + data.len()].copy_from_slice(&data);
        let op = Op::Write {
            lba: Lba(first * u64::from(BLOCK) / SECTOR_BYTES),
            data: Bytes::from(data),
        };
        let pending = handle.enqueue(op).await.expect("enqueue");
        let sync = sync_now;
        inflight.spawn(async move { (pending.await, sync) });
        if i % 97 == 96 {
            let pending = handle.enqueue(Op::Flush).await.expect("enqueue flush");
            inflight.spawn(async move { (pending.await, false) });
        }
        if i % 50 == 0 {
            let st = handle.status().await.expect("status");
            assert!(
                st.source.log_bytes <= LOG_BYTES_MAX,
                "rollback log holds {} bytes, bound {LOG_BYTES_MAX}",
                st.source.log_bytes
            );
        }
    }
    while let Some(joined) = inflight.join_next().await {
        joined.expect("join").0.expect("completion");
    }
    handle.status().await.expect("status").source.last_local
}

async fn converge(seed: u64, modes: &[(usize, Mode)], faults: Faults, writes: usize) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let target = MemTarget::start(target_config(VOLUME_ID, VOLUME_BYTES, BLOCK, SECRET))
        .await
        .expect("mem target");
    let proxy = FaultProxy::start("127.0.0.1:0", target.addr(), faults, rng.u64(..))
        .await
        .expect("proxy");
    let (handle, task) = replicator::spawn(config(
        proxy.addr().to_string(),
        source_config(modes[0].1, VOLUME_ID, SECRET),
    ));
    tokio::time::timeout(Duration::from_secs(20), handle.wait_connected())
        .await
        .expect("connect in time")
        .expect("connect");
    let mut local = vec![0u8; usize::try_from(VOLUME_BYTES).unwrap()];
    let rig = Rig {
        handle: &handle,
        proxy: &proxy,
        target: &target,
    };
    let run = workload(&rig, &mut rng, &mut local, writes, 16, modes);
    let last = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("workload in time");
    tokio::time::timeout(Duration::from_secs(60), handle.wait_replicated(last))
        .await
        .expect("replicated in time")
        .expect("replicated");
    let status = handle.status().await.expect("status");
    let stats = proxy.stats();
    println!("seed {seed}: last seq {last}, replicator {status:?}, proxy {stats:?}");
    assert!(status.disconnects >= 1, "the forced cut was not noticed");
    assert!(status.fatal.is_none());
    assert_eq!(status.source.log_entries, 0, "log not empty at quiescence");
    let remote = target.volume();
    if let Some(i) = (0..local.len()).find(|&i| local[i] != remote[i]) {
        panic!("seed {seed}: volumes differ first at byte {i}");
    }
    handle.shutdown().await.expect("shutdown");
    task.await.expect("engine task");
}

fn faulty() -> Faults {
    Faults {
        corrupt_prob: 0.01,
        cut_every: Some(Duration::from_millis(250)),
        ..Faults::none()
    }
    .with_delay(Duration::from_millis(1))
    .with_bandwidth(32 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicator_converges_under_faults_in_every_mode() {
    let seed = mirror_tests::seed();
    println!("seed {seed}");
    for (i, mode) in Mode::ALL.into_iter().enumerate() {
        println!("mode {mode}");
        converge(seed.wrapping_add(i as u64), &[(0, mode)], faulty(), 1500).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicator_converges_when_the_mode_changes_mid_run() {
    let seed = mirror_tests::seed();
    println!("seed {seed}");
    let modes = [
        (0, Mode::Async),
        (400, Mode::Sync),
        (800, Mode::LockThenWrite),
        (1200, Mode::Received),
        (1600, Mode::Async),
    ];
    converge(seed, &modes, faulty(), 2000).await;
}

async fn expect_fatal(volume_id: VolumeId, secret: &[u8], expect: &str) {
    let target = MemTarget::start(target_config(VOLUME_ID, VOLUME_BYTES, BLOCK, SECRET))
        .await
        .expect("mem target");
    let (handle, task) = replicator::spawn(config(
        target.addr().to_string(),
        source_config(Mode::Sync, volume_id, secret),
    ));
    let err = tokio::time::timeout(Duration::from_secs(10), handle.wait_connected())
        .await
        .expect("answer in time")
        .expect_err("must not connect");
    let ReplError::Fatal(why) = &err else {
        panic!("expected a fatal error, got {err:?}");
    };
    let why = why.describe();
    assert!(why.contains(expect), "{why:?} does not mention {expect:?}");
    let st = handle.status().await.expect("status");
    assert_eq!(st.fatal.as_deref(), Some(why.as_str()));
    let submitted = handle.submit(Op::Flush).await;
    assert!(
        matches!(submitted, Err(ReplError::Fatal(_))),
        "{submitted:?}"
    );
    handle.shutdown().await.expect("shutdown");
    task.await.expect("engine task");
    assert_eq!(handle.submit(Op::Flush).await, Err(ReplError::Shutdown));
}

#[tokio::test]
async fn replicator_reports_another_volume_as_fatal() {
    expect_fatal(VolumeId([0x11; 16]), SECRET, "another volume").await;
}

#[tokio::test]
async fn replicator_reports_a_wrong_secret_as_fatal() {
    expect_fatal(VOLUME_ID, b"not the secret", "authentication").await;
}

#[tokio::test]
async fn replicator_rejects_invalid_operations_and_keeps_going() {
    let target = MemTarget::start(target_config(VOLUME_ID, VOLUME_BYTES, BLOCK, SECRET))
        .await
        .expect("mem target");
    let (handle, task) = replicator::spawn(config(
        target.addr().to_string(),
        source_config(Mode::Sync, VOLUME_ID, SECRET),
    ));
    let misaligned = Op::Write {
        lba: Lba(1),
        data: Bytes::from(vec![1u8; 100]),
    };
    assert!(matches!(
        handle.submit(misaligned).await,
        Err(ReplError::InvalidOp(_))
    ));
    let beyond = Op::Write {
        lba: Lba(VOLUME_BYTES / SECTOR_BYTES),
        data: Bytes::from(vec![1u8; 512]),
    };
    assert!(matches!(
        handle.submit(beyond).await,
        Err(ReplError::InvalidOp(_))
    ));
    let good = Op::Write {
        lba: Lba(8),
        data: Bytes::from(vec![7u8; 1024]),
    };
    let seq = handle.submit(good).await.expect("valid write");
    assert_eq!(seq, Seq(1));
    handle.wait_replicated(seq).await.expect("replicated");
    assert_eq!(
        handle.wait_replicated(Seq(99)).await,
        Err(ReplError::NeverSubmitted(Seq(99)))
    );
    assert_eq!(&target.volume()[4096..5120], &[7u8; 1024][..]);
    handle.shutdown().await.expect("shutdown");
    task.await.expect("engine task");
}

#[tokio::test]
async fn async_acks_on_enqueue_until_fatal_and_queued_bytes_stay_bounded() {
    // Nothing listens on port 1: the engine keeps trying while writes pile up.
    let mut cfg = config(
        "127.0.0.1:1".into(),
        source_config(Mode::Async, VOLUME_ID, SECRET),
    );
    cfg.submit_queue_bytes = 1 << 20; // the smallest bound allowed
    let (handle, task) = replicator::spawn(cfg);
    assert!(handle.acks_on_enqueue(), "async completes on enqueue");
    handle.set_mode(Mode::Sync).await.expect("set mode");
    assert!(!handle.acks_on_enqueue(), "sync waits for the target");
    handle.set_mode(Mode::Async).await.expect("set mode");
    assert!(handle.acks_on_enqueue());

    // 64 KiB writes: the log takes LOG_BYTES_MAX / 64 KiB = 4, one waits parked in the engine,
    // the channel takes 1 MiB / 64 KiB = 16 more; after that enqueue must wait.
    let op = Op::Write {
        lba: Lba(0),
        data: Bytes::from(vec![3u8; 64 << 10]),
    };
    let mut accepted = 0usize;
    let mut pending = Vec::new();
    while let Ok(p) =
        tokio::time::timeout(Duration::from_millis(300), handle.enqueue(op.clone())).await
    {
        pending.push(p.expect("enqueue"));
        accepted += 1;
        assert!(
            accepted <= 4 + 1 + 16,
            "the submission channel is not bounded"
        );
    }
    assert_eq!(accepted, 4 + 1 + 16, "every byte of room is used");
    let st = handle.status().await.expect("status");
    assert_eq!(st.source.log_bytes, LOG_BYTES_MAX);
    handle.shutdown().await.expect("shutdown");
    task.await.expect("engine task");
    assert!(
        !handle.acks_on_enqueue(),
        "a stopped replicator completes nothing"
    );
    drop(pending);

    // A fatal error turns the fast path off: the next writes wait and see the error.
    let target = MemTarget::start(target_config(VOLUME_ID, VOLUME_BYTES, BLOCK, SECRET))
        .await
        .expect("mem target");
    let (handle, task) = replicator::spawn(config(
        target.addr().to_string(),
        source_config(Mode::Async, VolumeId([0x22; 16]), SECRET),
    ));
    assert!(handle.wait_connected().await.is_err());
    assert!(
        !handle.acks_on_enqueue(),
        "fatal: no completion without the engine"
    );
    handle.shutdown().await.expect("shutdown");
    task.await.expect("engine task");
}

/// The start's bound and the stop's drain are the link's timers, run by the engine task: an
/// unreachable target stops replication once the connect deadline passes; a drain reports the
/// last seq once the target holds it, and the limit's error while the target is gone.
#[tokio::test]
async fn connect_deadline_and_drain_are_the_links_decisions() {
    let mut cfg = config(
        "127.0.0.1:1".into(),
        source_config(Mode::Async, VOLUME_ID, SECRET),
    );
    cfg.connect_deadline = Some(Duration::from_millis(300));
    let (handle, task) = replicator::spawn(cfg);
    let err = tokio::time::timeout(Duration::from_secs(10), handle.wait_connected())
        .await
        .expect("the deadline answers")
        .expect_err("nothing listens there");
    assert!(
        matches!(err, ReplError::Fatal(SourceError::Unreachable { secs: 0 })),
        "{err:?}"
    );
    handle.shutdown().await.expect("shutdown");
    task.await.expect("engine task");

    let target = MemTarget::start(target_config(VOLUME_ID, VOLUME_BYTES, BLOCK, SECRET))
        .await
        .expect("mem target");
    let proxy = FaultProxy::start("127.0.0.1:0", target.addr(), Faults::none(), 1)
        .await
        .expect("proxy");
    let mut cfg = config(
        proxy.addr().to_string(),
        source_config(Mode::Async, VOLUME_ID, SECRET),
    );
    cfg.connect_deadline = Some(Duration::from_secs(10));
    let (handle, task) = replicator::spawn(cfg);
    handle.wait_connected().await.expect("connected");
    for block in 0..8u64 {
        let op = Op::Write {
            lba: Lba(block),
            data: Bytes::from(vec![9u8; 512]),
        };
        handle.submit(op).await.expect("async write");
    }
    let clean = handle
        .drain(Duration::from_secs(10))
        .await
        .expect("drained");
    assert_eq!((clean.durable, clean.clean), (Seq(8), true));
    assert_eq!(&target.volume()[..4096], &[9u8; 4096][..]);

    // The target is gone for the replicator: nothing listens where the proxy now leads.
    proxy.set_upstream("127.0.0.1:1".parse().expect("address"));
    proxy.cut();
    let op = Op::Write {
        lba: Lba(100),
        data: Bytes::from(vec![1u8; 512]),
    };
    handle.submit(op).await.expect("async write");
    let drained = handle.drain(Duration::from_millis(300)).await;
    assert!(
        matches!(
            &drained,
            Err(ReplError::NotDrained(DrainError::TimedOut {
                through: Seq(9),
                durable: Seq(8),
                ..
            }))
        ),
        "{drained:?}"
    );
    handle.shutdown().await.expect("shutdown");
    task.await.expect("engine task");
}

/// Issue 14's review: a drain asked for while writes the host already had completed (in `async`,
/// once queued) still wait in the submission channel, one of them parked for room in the log,
/// covers them all: the clean stop's record names the last of them, not the last the engine had
/// taken when the drain was asked for.
#[tokio::test]
async fn a_drain_covers_writes_still_queued_towards_the_engine() {
    let target = MemTarget::start(target_config(VOLUME_ID, VOLUME_BYTES, BLOCK, SECRET))
        .await
        .expect("mem target");
    let (handle, task) = replicator::spawn(config(
        target.addr().to_string(),
        source_config(Mode::Async, VOLUME_ID, SECRET),
    ));
    handle.wait_connected().await.expect("connected");
    // 64 KiB writes: the log holds 4, one parks, the rest queue in the channel.
    let writes = 24u64;
    let mut pending = Vec::new();
    for i in 0..writes {
        let op = Op::Write {
            lba: Lba(i * 128),
            data: Bytes::from(vec![u8::try_from(i).unwrap_or(0); 64 << 10]),
        };
        pending.push(handle.enqueue(op).await.expect("enqueue"));
    }
    let clean = handle
        .drain(Duration::from_secs(30))
        .await
        .expect("drained");
    assert_eq!((clean.durable, clean.clean), (Seq(writes), true));
    let volume = target.volume();
    for i in 0..writes {
        let at = usize::try_from(i * 128 * 512).unwrap_or(usize::MAX);
        assert_eq!(volume[at], u8::try_from(i).unwrap_or(0), "write {i}");
    }
    drop(pending);
    handle.shutdown().await.expect("shutdown");
    task.await.expect("engine task");
}
