//! Host microbenchmarks of the engine (no I/O): frame encode/decode with full checksum checks, raw
//! CRC32C, the rollback log's append/confirm, and the per-write CPU cost of the source and target
//! state machines.
//!
//! Run with `scripts/bench-micro` (prints a table) or `cargo bench -p mirror-core --bench engine`.
//! Every benchmark checks what it computes (a decoded frame equals the encoded one, the engine
//! completes and releases each write), so a broken engine fails here instead of looking fast.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mirror_core::genid::GenIds;
use mirror_core::log::{LogEntry, MemLog, RollbackLog};
use mirror_core::source::{ConnState, LockStyle, Mode, Source, SourceConfig};
use mirror_core::target::{
    ConflictPolicy, ConnId, Restored, Target, TargetConfig, HANDSHAKES_MAX_DEFAULT,
    HANDSHAKE_TIMEOUT_NS_DEFAULT, IDLE_TIMEOUT_NS_DEFAULT,
};
use mirror_core::wire::{self, Frame, Op, SummedOp, MAC_BYTES};
use mirror_core::{Generation, Lba, NodeId, Seq, VolumeId};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const BLOCK_BYTES: u32 = 4096;
const VOLUME_BYTES: u64 = 1 << 30;

/// Write data with a fixed, non-trivial pattern (CRC32C speed does not depend on it).
fn payload(len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| u8::try_from(i % 251).unwrap_or(0))
            .collect::<Vec<u8>>(),
    )
}

fn write_frame(seq: u64, data: Bytes) -> Frame {
    Frame::Op {
        seq: Seq(seq),
        epoch: 0,
        op: Op::Write {
            lba: Lba(seq * 8),
            data,
        }
        .into(),
        ack_on_receipt: false,
    }
}

/// A 4 KiB WRITE as operation `seq`, taken in turn from `writes` (checksummed ready-made, as a
/// decoded frame arrives with its checksum verified: this measures the target, not CRC32C).
fn wrapped_write(seq: u64, writes: &[SummedOp]) -> Frame {
    Frame::Op {
        seq: Seq(seq),
        epoch: 0,
        op: writes[usize::try_from(seq).unwrap_or(0) % writes.len()].clone(),
        ack_on_receipt: false,
    }
}

fn lock_frame() -> Frame {
    Frame::Lock {
        seq: Seq(7),
        epoch: 0,
        lba: Lba(56),
        len_bytes: 4096,
        want_grant: false,
    }
}

/// The frames measured by the encode and decode groups: (name, frame, bytes on the wire or `None`
/// for a per-frame measurement).
fn frames() -> Vec<(&'static str, Frame, Option<u64>)> {
    let mut out = Vec::new();
    for (name, len) in [("write_4k", 4 * KIB), ("write_1m", MIB)] {
        let frame = write_frame(7, payload(len));
        let wire_len = frame.encode().wire_len() as u64;
        out.push((name, frame, Some(wire_len)));
    }
    out.push(("lock", lock_frame(), None));
    out
}

/// A data frame carries its operation's checksum ([`SummedOp`], taken where the data was
/// captured), so encoding it checksums the header only; the `crc32c` group measures the payload's.
fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (name, frame, wire_len) in frames() {
        group.throughput(match wire_len {
            Some(bytes) => Throughput::Bytes(bytes),
            None => Throughput::Elements(1),
        });
        group.bench_function(name, |b| b.iter(|| black_box(&frame).encode()));
    }
    group.finish();
}

/// Header check, then frame checksum over header and payload and the frame built: what a receiver
/// does with every frame.
fn decode(header: &[u8], payload: Bytes) -> Frame {
    let h = match wire::decode_header(header) {
        Ok(h) => h,
        Err(e) => panic!("header of a valid frame rejected: {e}"),
    };
    match wire::decode_body(&h, payload) {
        Ok(frame) => frame,
        Err(e) => panic!("body of a valid frame rejected: {e}"),
    }
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, frame, wire_len) in frames() {
        let encoded = frame.encode();
        assert_eq!(
            decode(&encoded.header, encoded.payload.clone()),
            frame,
            "{name}: decode(encode(frame)) differs from the frame"
        );
        group.throughput(match wire_len {
            Some(bytes) => Throughput::Bytes(bytes),
            None => Throughput::Elements(1),
        });
        // The payload clone is a reference count increment, as when a driver hands over the
        // buffer it read the payload into.
        group.bench_function(name, |b| {
            b.iter(|| decode(black_box(&encoded.header), encoded.payload.clone()))
        });
    }
    group.finish();
}

fn bench_crc32c(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    for (name, len) in [("4k", 4 * KIB), ("1m", MIB)] {
        let data = payload(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(name, |b| b.iter(|| crc32c::crc32c(black_box(&data))));
    }
    group.finish();
}

/// A log entry sharing `op` (checksummed once by the caller: this measures the log, not CRC32C).
fn log_entry(seq: u64, op: &SummedOp) -> LogEntry {
    LogEntry {
        seq: Seq(seq),
        op: op.clone(),
        submitted_ns: seq,
    }
}

fn bench_log(c: &mut Criterion) {
    let data = payload(4 * KIB);
    let op = SummedOp::new(Op::Write {
        lba: Lba(8),
        data: data.clone(),
    });
    let mut group = c.benchmark_group("log");

    // Steady state: DEPTH writes in flight; each iteration logs one 4 KiB write and confirms the
    // one DEPTH entries older (what the source does per write once acknowledgements flow).
    const DEPTH: u64 = 256;
    group.throughput(Throughput::Elements(1));
    group.bench_function("append_confirm_depth256_4k", |b| {
        let mut log = MemLog::new();
        for seq in 1..=DEPTH {
            log.append(log_entry(seq, &op))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let mut next = DEPTH + 1;
        b.iter(|| {
            log.append(log_entry(next, &op))
                .unwrap_or_else(|e| panic!("{e}"));
            log.release_through(Seq(next - DEPTH))
                .unwrap_or_else(|e| panic!("{e}"));
            next += 1;
        });
        assert_eq!(log.len() as u64, DEPTH, "the log must hold DEPTH entries");
        assert_eq!(log.bytes() as u64, DEPTH * data.len() as u64);
    });

    // Batch: append BATCH entries, then one cumulative confirmation releases all of them.
    const BATCH: u64 = 1024;
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function("append_1024_confirm_all_4k", |b| {
        let mut log = MemLog::new();
        let mut next = 1;
        b.iter(|| {
            for _ in 0..BATCH {
                log.append(log_entry(next, &op))
                    .unwrap_or_else(|e| panic!("{e}"));
                next += 1;
            }
            log.release_through(Seq(next - 1))
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(log.is_empty());
        });
    });
    group.finish();
}

/// The history both ends hold.
const PAIR_IDS: GenIds = GenIds {
    current: Generation(0xbe),
    ..GenIds::NONE
};

fn source_config(mode: Mode) -> SourceConfig {
    SourceConfig {
        volume_id: VolumeId([0x42; 16]),
        node_id: NodeId(1),
        gen_ids: PAIR_IDS,
        volume_bytes: VOLUME_BYTES,
        block_bytes: BLOCK_BYTES,
        secret: b"bench-secret".to_vec(),
        mode,
        flush_replicates: false,
        lock_style: LockStyle::Implied,
        log_bytes_max: 64 * MIB,
        log_entries_max: 4096,
    }
}

/// The benchmarks' one connection.
const C: ConnId = ConnId(1);

fn target_config() -> TargetConfig {
    TargetConfig {
        volume_id: VolumeId([0x42; 16]),
        node_id: NodeId(2),
        volume_bytes: VOLUME_BYTES,
        block_bytes: BLOCK_BYTES,
        secret: b"bench-secret".to_vec(),
        conflict_policy: ConflictPolicy::Wait,
        commit_log_bytes_max: 64 * MIB,
        commit_log_entries_max: 4096,
        local_locks_max: 64,
        handshake_timeout_ns: HANDSHAKE_TIMEOUT_NS_DEFAULT,
        handshakes_max: HANDSHAKES_MAX_DEFAULT,
        idle_timeout_ns: IDLE_TIMEOUT_NS_DEFAULT,
    }
}

/// A source and a target that completed the handshake (HELLO, HELLO, AUTH, first ACK).
fn connected_pair(mode: Mode) -> (Source, Target) {
    let mut source = Source::new(source_config(mode));
    let mut target = Target::new(
        target_config(),
        Restored {
            gen_ids: PAIR_IDS,
            ..Restored::FRESH
        },
    );
    target.on_connect(C, [1; MAC_BYTES], 0).unwrap();
    source.on_connect([2; MAC_BYTES]);
    // Bounded: the handshake takes four frames.
    for _ in 0..8 {
        let mut moved = false;
        while let Some(frame) = source.poll_transmit() {
            target
                .handle_frame(C, frame, 0)
                .unwrap_or_else(|e| panic!("target: {e}"));
            moved = true;
        }
        while let Some(frame) = target.poll_transmit(C) {
            source
                .handle_frame(frame)
                .unwrap_or_else(|e| panic!("source: {e}"));
            moved = true;
        }
        if !moved {
            break;
        }
    }
    assert_eq!(source.status().conn, ConnState::Connected);
    assert!(target.is_ready(), "target did not finish the handshake");
    (source, target)
}

/// Sector address of the `seq`-th 4 KiB write, cycling over the volume.
fn lba_of(seq: Seq) -> Lba {
    let blocks = VOLUME_BYTES / u64::from(BLOCK_BYTES);
    Lba::from_bytes(seq.0 % blocks * u64::from(BLOCK_BYTES))
}

/// `count` checksummed 4 KiB writes to the first `count` blocks, used in turn. The daemon
/// checksums on the ublk queue thread before the engine sees a write, so the engine benchmarks
/// take them ready-made. (Fewer writes than `count` are ever in flight at once, so reusing blocks
/// changes nothing.)
fn summed_writes(data: &Bytes, count: u64) -> Vec<SummedOp> {
    (0..count)
        .map(|i| {
            SummedOp::new(Op::Write {
                lba: lba_of(Seq(i)),
                data: data.clone(),
            })
        })
        .collect()
}

/// Submits a 4 KiB write as operation `next` (async: complete at once) and returns its seq.
fn submit_write(source: &mut Source, next: Seq, writes: &[SummedOp]) -> Seq {
    let op = writes[usize::try_from(next.0).unwrap_or(0) % writes.len()].clone();
    let seq = source.submit(op, next.0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(source.poll_completion(), Some(seq));
    seq
}

fn bench_source(c: &mut Criterion) {
    let data = payload(4 * KIB);
    let writes = summed_writes(&data, 1024);
    let mut group = c.benchmark_group("engine");
    group.throughput(Throughput::Elements(1));

    // The source alone, async mode, one ACK per write (the target coalesces ACKs in practice, so
    // this is the worst case): submit, completion, the WRITE frame to send, the ACK that releases
    // the log entry.
    group.bench_function("source_async_4k_submit_send_ack", |b| {
        let (mut source, _target) = connected_pair(Mode::Async);
        let mut next = Seq(1);
        b.iter(|| {
            let seq = submit_write(&mut source, next, &writes);
            match source.poll_transmit() {
                Some(Frame::Op { seq: sent, .. }) if sent == seq => {}
                other => panic!("expected the WRITE of seq {seq}, got {other:?}"),
            }
            source
                .handle_frame(Frame::Ack {
                    received: seq,
                    durable: seq,
                })
                .unwrap_or_else(|e| panic!("{e}"));
            next = seq.next();
            black_box(seq)
        });
        assert_eq!(
            source.status().log_entries,
            0,
            "every write must be released"
        );
    });

    // Source and target together through the wire codec, one write at a time: submit, encode,
    // decode (checksums), target receive, apply, durable, ACK encode/decode, source release. The
    // CPU cost of the protocol per 4 KiB write, without sockets, disks or fsync.
    group.bench_function("pair_async_4k_roundtrip_wire", |b| {
        let (mut source, mut target) = connected_pair(Mode::Async);
        let mut next = Seq(1);
        b.iter(|| {
            let seq = submit_write(&mut source, next, &writes);
            while let Some(encoded) = source.poll_transmit().map(|frame| frame.encode()) {
                target
                    .handle_frame(C, decode(&encoded.header, encoded.payload), 0)
                    .unwrap_or_else(|e| panic!("target: {e}"));
            }
            match target.poll_apply() {
                Some(apply) if apply.seq == seq => {
                    black_box(&apply.op);
                }
                other => panic!("expected to apply seq {seq}, got {other:?}"),
            }
            target.handle_applied(seq);
            target.handle_durable(seq);
            while let Some(frame) = target.poll_transmit(C) {
                let encoded = frame.encode();
                source
                    .handle_frame(decode(&encoded.header, encoded.payload))
                    .unwrap_or_else(|e| panic!("source: {e}"));
            }
            next = seq.next();
        });
        let status = source.status();
        assert_eq!(
            status.durable, status.last_local,
            "every write must be durable"
        );
        assert_eq!(status.log_entries, 0, "every write must be released");
    });

    // The target alone with a deep commit log (the applier behind the network, as under a burst
    // of async writes): receive one 4 KiB WRITE, hand out and apply the oldest entry. The cost
    // per write must not grow with the depth (it did: every frame scanned the whole commit log
    // and lock table, which made the target the bottleneck of async QD16).
    let deep = summed_writes(&data, 8192);
    for depth in [0u64, 4000] {
        group.bench_function(format!("target_4k_receive_apply_{depth}_queued"), |b| {
            let (_source, mut target) = connected_pair(Mode::Async);
            let mut next = 1u64;
            for _ in 0..depth {
                target
                    .handle_frame(C, wrapped_write(next, &deep), 0)
                    .unwrap_or_else(|e| panic!("target: {e}"));
                next += 1;
            }
            b.iter(|| {
                target
                    .handle_frame(C, wrapped_write(next, &deep), 0)
                    .unwrap_or_else(|e| panic!("target: {e}"));
                next += 1;
                let apply = target.poll_apply().expect("an entry is ready");
                target.handle_applied(apply.seq);
                black_box(apply.seq)
            });
            let status = target.status();
            assert_eq!(
                status.commit_log_entries as u64, depth,
                "the commit log keeps its depth"
            );
            assert_eq!(status.received.0, next - 1, "every write was received");
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_encode,
    bench_decode,
    bench_crc32c,
    bench_log,
    bench_source
);
criterion_main!(benches);
