//! `ublk-mirror loadgen`: a seeded workload generator over a file-backed source volume.
//!
//! Each write gets random data and a random block range and takes the device's path
//! ([`ublk_mirror::host_write`]): its range is taken, it is enqueued to the replicator, written to
//! the source volume file (a positioned write), the range released; it completes when the mode
//! says so (at once in `async`), with `--qd` operations in flight. A host flush (`--flush-every`)
//! takes the same path: a FLUSH barrier enqueued, the source file fsynced, then the barrier's
//! completion. At the end the command waits until the target holds everything (applied and
//! durable), unless `--no-wait`.
//!
//! `--distinct` sends every write to blocks not written before in the run; `--ack-log` appends
//! `seq lba_blocks nblocks crc32c` for each write once the host saw it complete (a write that
//! completed at enqueue is logged when its sequence number is known), so a test can check after a
//! crash that every acknowledged write reached the target.

mod plan;
mod stats;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use mirror_core::meta::MetaRecord;
use mirror_core::source::{LockStyle, Mode, SourceConfig, SourceError};
use mirror_core::wire::{Op, PAYLOAD_BYTES_MAX};
use mirror_core::{Lba, NodeId, VolumeId, SECTOR_BYTES};
use nix::errno::Errno;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use ublk_mirror::admin::config::read_secret;
use ublk_mirror::device::gate::RangeGate;
use ublk_mirror::host_write::{self, Completed, Direct, Mirror, Submitted};
use ublk_mirror::replicator::{self, ReplError, ReplicatorConfig, Started};
use ublk_mirror::volume::{open_volume, LocalVolume, PrimaryStartup};

use plan::{Placer, Plan};
use stats::{print_summary, Latencies, Summary};

/// Flags of `ublk-mirror loadgen`.
#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    /// Source volume file (created or extended to --volume-bytes).
    #[arg(long)]
    volume: PathBuf,
    /// Size of the volume in bytes (suffixes K, M, G: powers of 1024).
    #[arg(long, value_parser = parse_size)]
    volume_bytes: u64,
    /// Target server address, `host:port`.
    #[arg(long)]
    peer: String,
    /// Volume id shared with the target: 32 hex digits (dashes allowed).
    #[arg(long, value_parser = parse_volume_id)]
    volume_id: VolumeId,
    /// File holding the shared secret (surrounding whitespace ignored).
    #[arg(long)]
    secret_file: PathBuf,
    /// Acknowledgement mode: async, received, sync or lock-then-write.
    #[arg(long)]
    mode: Mode,
    /// Logical block size in bytes: 512 or 4096 (the device's rule).
    #[arg(long, default_value_t = 4096)]
    block_bytes: u32,
    /// Number of writes (default 1000 unless --seconds).
    #[arg(long, conflicts_with = "seconds")]
    ops: Option<u64>,
    /// Issue writes for this many seconds instead of a fixed count.
    #[arg(long)]
    seconds: Option<f64>,
    /// Operations in flight.
    #[arg(long, default_value_t = 1)]
    qd: usize,
    /// Largest write in blocks (sizes are uniform in 1..=max).
    #[arg(long, default_value_t = 8)]
    max_blocks: u32,
    /// Seed of the workload (random if not given; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// A host flush after every N writes (0: never).
    #[arg(long, default_value_t = 0)]
    flush_every: u64,
    /// Host flushes also wait until the target has everything up to them.
    #[arg(long)]
    flush_replicates: bool,
    /// Every write goes to blocks not written before in this run (running out is an error).
    #[arg(long)]
    distinct: bool,
    /// Append `seq lba_blocks nblocks crc32c` for each acknowledged write to this file.
    #[arg(long)]
    ack_log: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Do not wait for the target to hold everything at the end.
    #[arg(long)]
    no_wait: bool,
    /// Trust nothing of the volume's record and start the sequence at 1 against a new target
    /// (as `start --new-sequence`).
    #[arg(long)]
    new_sequence: bool,
    /// Give up when no handshake with the target succeeds within this time.
    #[arg(long, default_value_t = 10)]
    connect_timeout_secs: u64,
    /// Give up when the target does not hold everything this long after the last write.
    #[arg(long, default_value_t = 600)]
    wait_timeout_secs: u64,
    /// Bound on rollback log payload bytes (suffixes K, M, G).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    log_bytes_max: u64,
    /// Bound on rollback log entries.
    #[arg(long, default_value_t = 16384)]
    log_entries_max: usize,
    /// Node id announced in HELLO.
    #[arg(long, default_value_t = 1)]
    node_id: u64,
    /// Record writes out of sync instead of queueing them once the target has been unreachable
    /// this long (a full log overflows at once); 0: never (as `start`).
    #[arg(long, default_value_t = 30)]
    overflow_after_secs: u64,
}

use mirror_core::parse_size;

fn parse_volume_id(text: &str) -> Result<VolumeId, String> {
    VolumeId::parse(text).ok_or_else(|| format!("'{text}' is not 32 hex digits"))
}

/// Where acknowledged writes are recorded.
type AckLog = Arc<Mutex<File>>;

/// Runs the subcommand.
pub fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let plan = Plan::new(&args)?;
    let secret = read_secret(&args.secret_file)?;
    let volume = open_volume(&args.volume, args.block_bytes, Some(args.volume_bytes))?;
    // The daemon's rules: what a restart trusts (decided at once: a file the open grew gets its
    // record before anything else can fail), and a clean stop recorded once the target holds
    // everything.
    let start = volume.restore_primary(
        &args.volume,
        args.volume_id,
        NodeId(args.node_id),
        args.new_sequence,
    )?;
    let ack_log = match &args.ack_log {
        Some(path) => Some(Arc::new(Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open ack log {}", path.display()))?,
        ))),
        None => None,
    };
    let source = SourceConfig {
        volume_id: args.volume_id,
        node_id: NodeId(args.node_id),
        gen_ids: start.running.gen_ids,
        volume_bytes: args.volume_bytes,
        block_bytes: args.block_bytes,
        secret,
        mode: args.mode,
        flush_replicates: args.flush_replicates,
        lock_style: LockStyle::Implied,
        log_bytes_max: usize::try_from(args.log_bytes_max).unwrap_or(usize::MAX),
        log_entries_max: args.log_entries_max,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let summary = runtime.block_on(drive(&args, &plan, source, (volume, start), ack_log))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}

async fn drive(
    args: &LoadgenArgs,
    plan: &Plan,
    source: SourceConfig,
    (volume, start): (LocalVolume, PrimaryStartup),
    ack_log: Option<AckLog>,
) -> anyhow::Result<Summary> {
    let running = start.running;
    let cfg = ReplicatorConfig {
        connect_deadline: Some(Duration::from_secs(args.connect_timeout_secs)),
        meta: running,
        host_ops_max: args.qd.max(1),
        overflow: mirror_core::node::OverflowRule {
            enabled: args.overflow_after_secs > 0,
            after_down_ns: args.overflow_after_secs.saturating_mul(1_000_000_000),
            ..replicator::OVERFLOW_DEFAULT
        },
        ..ReplicatorConfig::new(args.peer.clone(), source)
    };
    let intent = volume.intent_setup(&args.volume, start.intent, start.restored)?;
    let (handle, task) = replicator::spawn_primary(cfg, intent);
    let result = async {
        // The engine stored the running record (not clean) at the handshake.
        connect(args, &handle).await?;
        workload(args, plan, &handle, &volume.file, ack_log).await
    }
    .await;
    let _ = handle.shutdown().await;
    let _ = task.await;
    let (summary, clean) = result?;
    if let Some(clean) = clean {
        volume.store(&args.volume, &clean)?;
    }
    Ok(summary)
}

/// Waits for the first handshake (the replicator's connect deadline bounds it).
async fn connect(args: &LoadgenArgs, handle: &replicator::Handle) -> anyhow::Result<()> {
    match handle.wait_connected().await {
        Ok(Started::Connected) => Ok(()),
        Ok(Started::Degraded { secs }) => {
            eprintln!(
                "ublk-mirror: no handshake with {} within {secs} s: running without the target \
                 (writes are logged and shipped once it answers)",
                args.peer
            );
            Ok(())
        }
        Err(ReplError::Fatal(SourceError::Unreachable { secs })) => {
            let why = handle
                .last_error()
                .unwrap_or_else(|| "no answer".to_string());
            bail!(
                "cannot reach the target at {} within {secs} s: {why}",
                args.peer
            );
        }
        Err(e) => Err(e).context(format!("target {}", args.peer)),
    }
}

async fn workload(
    args: &LoadgenArgs,
    plan: &Plan,
    handle: &replicator::Handle,
    volume: &File,
    ack_log: Option<AckLog>,
) -> anyhow::Result<(Summary, Option<MetaRecord>)> {
    let mut rng = fastrand::Rng::with_seed(plan.seed);
    let mut placer = Placer::new(plan, args.distinct, &mut rng);
    let latencies = Arc::new(Mutex::new(Latencies::new()));
    let mut inflight: JoinSet<anyhow::Result<()>> = JoinSet::new();
    // Each operation holds at most one range, and only while it is submitted; an overflow's
    // resync reads under the same gate.
    let gate = handle.gate();
    let start = Instant::now();
    let deadline = plan.seconds.map(|s| start + Duration::from_secs_f64(s));
    let (mut writes, mut flushes, mut bytes) = (0u64, 0u64, 0u64);
    loop {
        if plan.writes.is_some_and(|n| writes >= n) || deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        while inflight.len() >= plan.qd {
            settle(inflight.join_next().await)?;
        }
        let (first_block, nblocks) = placer.next(plan, &mut rng)?;
        let len = usize::try_from(nblocks * plan.block_bytes)?;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        let data = Bytes::from(data);
        let offset_bytes = first_block * plan.block_bytes;
        let crc = ack_log.as_ref().map(|_| crc32c::crc32c(&data));
        let t0 = Instant::now();
        let submitted = write(handle, &gate, volume, offset_bytes, data).await?;
        writes += 1;
        bytes += nblocks * plan.block_bytes;
        let lat = latencies.clone();
        let ack_log = ack_log.clone();
        inflight.spawn(async move {
            let done = submitted.complete(&Direct).await.context("replication")?;
            let elapsed = t0.elapsed();
            if let Ok(mut l) = lat.lock() {
                l.record(elapsed);
            }
            if let (Some(log), Some(crc)) = (ack_log, crc) {
                let seq = match done {
                    Completed::Waited(seq) => seq,
                    Completed::Early(pending) => pending.await.context("replication")?,
                };
                let line = format!("{} {first_block} {nblocks} {crc:08x}\n", seq.0);
                let mut file = log
                    .lock()
                    .map_err(|_| anyhow::anyhow!("ack log lock poisoned"))?;
                file.write_all(line.as_bytes())
                    .context("write to the ack log")?;
            }
            Ok(())
        });
        if args.flush_every > 0 && writes % args.flush_every == 0 {
            while inflight.len() >= plan.qd {
                settle(inflight.join_next().await)?;
            }
            let t0 = Instant::now();
            let submitted = flush(handle, &gate, volume).await?;
            flushes += 1;
            let lat = latencies.clone();
            inflight.spawn(async move {
                submitted
                    .complete(&Direct)
                    .await
                    .context("replication of a flush")?;
                if let Ok(mut l) = lat.lock() {
                    l.record(t0.elapsed());
                }
                Ok(())
            });
        }
    }
    while let Some(joined) = inflight.join_next().await {
        settle(Some(joined))?;
    }
    let elapsed = start.elapsed();

    let drain_start = Instant::now();
    let clean = if args.no_wait {
        None
    } else {
        let wait = Duration::from_secs(args.wait_timeout_secs);
        match handle.drain(wait).await {
            Ok(clean) => Some(clean),
            Err(ReplError::NotDrained(e)) => bail!(
                "{e} (last error: {})",
                handle.last_error().unwrap_or_else(|| "none".into())
            ),
            Err(e) => return Err(e).context("waiting for the target"),
        }
    };
    let replicated = clean.is_some();
    let drain = drain_start.elapsed();
    let status = handle.status().await.context("replication")?;
    // In async the last writes may still have been queued towards the engine when the workload
    // ended: the drained record names the last seq; without a drain the engine's count is all
    // there is.
    let last_seq = clean.map_or(status.source.last_local, |c| c.durable);
    let elapsed_s = elapsed.as_secs_f64().max(1e-9);
    let l = latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("latency lock poisoned"))?;
    let summary = Summary {
        mode: args.mode.to_string(),
        qd: plan.qd,
        seed: plan.seed,
        block_bytes: plan.block_bytes,
        writes,
        flushes,
        bytes,
        elapsed_s,
        iops: writes as f64 / elapsed_s,
        mib_s: bytes as f64 / f64::from(1 << 20) / elapsed_s,
        lat_mean_us: l.mean_us(),
        lat_p50_us: l.quantile_us(500),
        lat_p99_us: l.quantile_us(990),
        lat_max_us: l.max_ns as f64 / 1000.0,
        last_seq: last_seq.0,
        replicated,
        drain_s: drain.as_secs_f64(),
        connects: status.connects,
        disconnects: status.disconnects,
        out_of_sync_writes: status.out_of_sync_writes,
    };
    Ok((summary, clean))
}

/// One host write by the device's path ([`host_write`]): range, enqueue, positioned write,
/// release.
async fn write<M: Mirror>(
    mirror: &M,
    gate: &Arc<RangeGate>,
    volume: &File,
    offset_bytes: u64,
    data: Bytes,
) -> anyhow::Result<Submitted<M::Pending>> {
    let op = Op::Write {
        lba: Lba(offset_bytes / SECTOR_BYTES),
        data: data.clone(),
    };
    host_write::submit(&Direct, mirror, gate, op, || async {
        volume
            .write_all_at(&data, offset_bytes)
            .map_err(|e| errno_of(&e))
    })
    .await
    .with_context(|| format!("write at byte {offset_bytes}"))
}

/// A host flush by the same path: the barrier enqueued, the source file synced.
async fn flush<M: Mirror>(
    mirror: &M,
    gate: &Arc<RangeGate>,
    volume: &File,
) -> anyhow::Result<Submitted<M::Pending>> {
    let file = volume.try_clone().context("source volume")?;
    host_write::submit(&Direct, mirror, gate, Op::Flush, || async move {
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|_| Errno::EIO)?
            .map_err(|e| errno_of(&e))
    })
    .await
    .context("flush")
}

fn errno_of(e: &std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

fn settle(
    joined: Option<Result<anyhow::Result<()>, tokio::task::JoinError>>,
) -> anyhow::Result<()> {
    match joined {
        None => Ok(()),
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(anyhow::anyhow!("completion task failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::future::Future;

    /// The real replicator, and at each enqueue whether the write's data was already in the
    /// source file (it must not be: the device's path enqueues first, then writes locally).
    struct Watch<'a> {
        inner: &'a replicator::Handle,
        file: &'a File,
        offset_bytes: u64,
        written_before_enqueue: Cell<Option<bool>>,
    }

    impl Mirror for Watch<'_> {
        type Pending = replicator::Pending;
        fn enqueue(
            &self,
            op: Op,
        ) -> impl Future<Output = Result<replicator::Pending, replicator::ReplError>> {
            let mut buf = [0u8; 512];
            self.file
                .read_exact_at(&mut buf, self.offset_bytes)
                .unwrap();
            self.written_before_enqueue
                .set(Some(buf.iter().any(|&b| b != 0)));
            Mirror::enqueue(self.inner, op)
        }
        fn acks_on_enqueue(&self) -> bool {
            self.inner.acks_on_enqueue()
        }
    }

    /// A replicator whose target never answers (nothing listens on port 1).
    fn unreachable(mode: Mode) -> (replicator::Handle, tokio::task::JoinHandle<()>) {
        let source = SourceConfig {
            volume_id: VolumeId([7; 16]),
            node_id: NodeId(1),
            gen_ids: mirror_core::genid::GenIds::default(),
            volume_bytes: 1 << 20,
            block_bytes: 4096,
            secret: b"s".to_vec(),
            mode,
            flush_replicates: false,
            lock_style: LockStyle::Implied,
            log_bytes_max: 1 << 20,
            log_entries_max: 16,
        };
        replicator::spawn(ReplicatorConfig::new("127.0.0.1:1", source))
    }

    #[test]
    fn a_write_takes_the_device_path_and_completes_at_enqueue_in_async() {
        let dir = tempfile::tempdir().unwrap();
        let volume = open_volume(&dir.path().join("vol"), 4096, Some(1 << 20))
            .unwrap()
            .file;
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            for (mode, offset_bytes) in [(Mode::Async, 8192), (Mode::Sync, 16384)] {
                let (handle, task) = unreachable(mode);
                let watch = Watch {
                    inner: &handle,
                    file: &volume,
                    offset_bytes,
                    written_before_enqueue: Cell::new(None),
                };
                let gate = RangeGate::new(1);
                let data = Bytes::from(vec![0xa5u8; 4096]);
                let submitted = write(&watch, &gate, &volume, offset_bytes, data.clone())
                    .await
                    .unwrap();
                assert_eq!(watch.written_before_enqueue.get(), Some(false), "{mode}");
                let mut back = vec![0u8; 4096];
                volume.read_exact_at(&mut back, offset_bytes).unwrap();
                assert_eq!(back, data, "{mode}: not written locally");
                assert!(gate.is_empty());
                // Async: complete without the target. Sync: waits for it (here, forever).
                assert_eq!(submitted.acked(), mode == Mode::Async, "{mode}");
                let done =
                    tokio::time::timeout(Duration::from_millis(200), submitted.complete(&Direct))
                        .await;
                match mode {
                    Mode::Async => assert!(matches!(done, Ok(Ok(Completed::Early(_))))),
                    _ => assert!(done.is_err(), "{mode}: completed without a target"),
                }
                let _ = handle.shutdown().await;
                let _ = task.await;
            }
        });
    }
}
