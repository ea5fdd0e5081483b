//! The configuration a seed chooses.

use crate::source::{LockStyle, Mode};
use crate::target::ConflictPolicy;

/// The configuration a seed chooses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Volume size.
    pub volume_bytes: u64,
    /// Logical block size (512 or 4096).
    pub block_bytes: u32,
    /// Largest host operation.
    pub op_bytes_max: u64,
    /// Start of the hot region.
    pub hot_offset_bytes: u64,
    /// Size of the hot region.
    pub hot_bytes: u64,
    /// Initial acknowledgement mode.
    pub mode: Mode,
    /// Lock frames in speculative modes.
    pub lock_style: LockStyle,
    /// Target's conflict policy.
    pub policy: ConflictPolicy,
    /// Whether host flushes wait for the target (initially).
    pub flush_replicates: bool,
    /// Source rollback log bounds.
    pub log_bytes_max: usize,
    /// Source rollback log bounds.
    pub log_entries_max: usize,
    /// Target commit log bounds.
    pub commit_bytes_max: usize,
    /// Target commit log bounds.
    pub commit_entries_max: usize,
    /// Local locks at once on the target.
    pub local_locks_max: usize,
    /// One-way link latency.
    pub latency_ticks: u64,
    /// Link bandwidth.
    pub bandwidth_bytes_per_tick: u64,
    /// A sender stops taking frames from its engine while this many bytes are queued.
    pub link_bytes_max: usize,
    /// Host operations in flight at most.
    pub host_depth: usize,
    /// Gap between host operations, at most.
    pub op_gap_ticks_max: u64,
    /// Time to write one operation on the target, at most.
    pub apply_ticks_max: u64,
    /// Time before a needed fsync, at most.
    pub fsync_ticks_max: u64,
    /// Mean gap between disconnects (0: none).
    pub disconnect_gap_ticks: u64,
    /// Time to reconnect, at most.
    pub reconnect_ticks_max: u64,
    /// Frames corrupted, per mille.
    pub corrupt_per_mille: u32,
    /// Mean gap between target crashes (0: none).
    pub crash_gap_ticks: u64,
    /// Mean gap between local lock attempts (0: none).
    pub lock_gap_ticks: u64,
    /// Longest local lock hold.
    pub lock_hold_ticks_max: u64,
    /// How long a refused local lock holder retries (as the target server's
    /// `--local-lock-timeout`): some give up before their first retry, some after one or two.
    pub local_lock_timeout_ticks: u64,
    /// Mean gap between mode switches (0: none).
    pub mode_switch_gap_ticks: u64,
    /// Mean gap between source process crashes (0: none).
    pub source_crash_gap_ticks: u64,
    /// Time before a crashed source process restarts, at most.
    pub source_restart_ticks_max: u64,
    /// The source's session sends a PING after this long without sending anything.
    pub ping_interval_ticks: u64,
    /// The source's session drops a connection on which nothing arrived for this long.
    pub idle_timeout_ticks: u64,
    /// Mean gap between silences of the link (0: none): frames in both directions are held, for
    /// a while or until the connection is dropped, and neither end is told.
    pub silence_gap_ticks: u64,
    /// Mean gap between pauses of the host (0: none), each longer than the idle timeout: the
    /// link idles, and only PING keeps it alive.
    pub host_pause_gap_ticks: u64,
    /// The chunk size of the primary's write intent (4 KiB to 64 KiB: 1 to 64 chunks).
    pub intent_chunk_bytes: u64,
    /// How many chunks its stored copy keeps before a store drops the clean ones (0 to 7).
    pub intent_keep_chunks: u64,
    /// How many chunks a store adds around a new one (1 to 4).
    pub intent_extent_chunks: u64,
    /// Host writes overflow (recorded out of sync instead of queued) when the log is full or the
    /// link has been down this long (0: never).
    pub overflow_after_ticks: u64,
    /// What `sync` does once the link has been down that long.
    pub sync_peer_gone: crate::node::SyncPeerGone,
    /// An overflow's resync copies at most this many bytes per tick (0: unbounded).
    pub resync_bytes_per_tick: u64,
    /// Host writes are throttled while an overflow's resync reaches no new low for this many
    /// ticks (0: never; [`crate::node::PeerLink::set_overflow_throttle`]).
    pub throttle_window_ticks: u64,
}

impl SimConfig {
    /// Draws a configuration; what concerns source crashes comes from `crash_rng`, the session's
    /// timers and the link's silences from `silence_rng`.
    pub(super) fn random(
        rng: &mut fastrand::Rng,
        crash_rng: &mut fastrand::Rng,
        silence_rng: &mut fastrand::Rng,
    ) -> SimConfig {
        let block_bytes: u32 = if rng.bool() { 4096 } else { 512 };
        let block = u64::from(block_bytes);
        let volume_bytes = rng.u64(16..=64) * 4096;
        let op_bytes_max = if block_bytes == 4096 {
            block * rng.u64(1..=8)
        } else {
            block * rng.u64(1..=64)
        };
        let hot_bytes = (rng.u64(1..=4) * 4096).min(volume_bytes);
        let hot_offset_bytes = rng.u64(0..=(volume_bytes - hot_bytes) / block) * block;
        let op_max = usize::try_from(op_bytes_max).unwrap_or(usize::MAX);
        let some = |rng: &mut fastrand::Rng, percent: u32, lo: u64, hi: u64| {
            if rng.u32(0..100) < percent {
                rng.u64(lo..=hi)
            } else {
                0
            }
        };
        let mut cfg = SimConfig {
            volume_bytes,
            block_bytes,
            op_bytes_max,
            hot_offset_bytes,
            hot_bytes,
            mode: Mode::ALL[rng.usize(0..Mode::ALL.len())],
            lock_style: if rng.bool() {
                LockStyle::Implied
            } else {
                LockStyle::Explicit
            },
            policy: if rng.bool() {
                ConflictPolicy::Wait
            } else {
                ConflictPolicy::Reject
            },
            flush_replicates: rng.bool(),
            log_bytes_max: op_max * rng.usize(1..=16) + rng.usize(0..=op_max),
            log_entries_max: rng.usize(2..=64),
            commit_bytes_max: op_max * rng.usize(1..=8) + rng.usize(0..=op_max),
            commit_entries_max: rng.usize(2..=64),
            local_locks_max: rng.usize(1..=4),
            latency_ticks: rng.u64(0..=30),
            bandwidth_bytes_per_tick: rng.u64(256..=65_536),
            link_bytes_max: rng.usize(1..=128) * 1024,
            host_depth: rng.usize(1..=32),
            op_gap_ticks_max: rng.u64(0..=20),
            apply_ticks_max: rng.u64(0..=5),
            fsync_ticks_max: rng.u64(0..=40),
            disconnect_gap_ticks: some(rng, 80, 300, 3000),
            reconnect_ticks_max: rng.u64(1..=200),
            corrupt_per_mille: u32::try_from(some(rng, 70, 1, 40)).unwrap_or(0),
            crash_gap_ticks: some(rng, 60, 500, 5000),
            lock_gap_ticks: some(rng, 85, 20, 400),
            lock_hold_ticks_max: rng.u64(1..=300),
            local_lock_timeout_ticks: 0,
            mode_switch_gap_ticks: some(rng, 50, 200, 3000),
            source_crash_gap_ticks: some(crash_rng, 50, 300, 3000),
            source_restart_ticks_max: crash_rng.u64(1..=500),
            ping_interval_ticks: silence_rng.u64(20..=400),
            idle_timeout_ticks: 0,
            silence_gap_ticks: some(silence_rng, 40, 500, 5000),
            host_pause_gap_ticks: some(silence_rng, 30, 1500, 6000),
            intent_chunk_bytes: 0,
            intent_keep_chunks: 0,
            intent_extent_chunks: 1,
            overflow_after_ticks: 0,
            sync_peer_gone: crate::node::SyncPeerGone::Suspend,
            resync_bytes_per_tick: 0,
            throttle_window_ticks: 0,
        };
        // Far above a healthy link's quiet spells (both queues full, a round trip, a slow sync
        // behind a local lock): a drop of a live connection costs a reconnect, not correctness.
        let queue_ticks =
            u64::try_from(cfg.link_bytes_max).unwrap_or(u64::MAX) / cfg.bandwidth_bytes_per_tick;
        cfg.idle_timeout_ticks =
            cfg.ping_interval_ticks * 3 + 4 * cfg.latency_ticks + 2 * queue_ticks + 2_000;
        // Derived, not drawn, so that every other draw of a seed stays as it was.
        cfg.local_lock_timeout_ticks = cfg.lock_hold_ticks_max * 12;
        cfg.intent_chunk_bytes = 4096 << (cfg.source_restart_ticks_max % 5);
        cfg.intent_keep_chunks = cfg.lock_hold_ticks_max % 8;
        cfg.intent_extent_chunks = 1 + cfg.ping_interval_ticks % 4;
        if !(cfg.reconnect_ticks_max + cfg.op_gap_ticks_max).is_multiple_of(3) {
            cfg.overflow_after_ticks = 20 + (cfg.lock_hold_ticks_max * 7) % 600;
        }
        if cfg.lock_gap_ticks.is_multiple_of(2) {
            cfg.resync_bytes_per_tick = (cfg.bandwidth_bytes_per_tick / 4).max(64);
        }
        if cfg.latency_ticks.is_multiple_of(2) {
            cfg.sync_peer_gone = crate::node::SyncPeerGone::Degrade;
        }
        if cfg.idle_timeout_ticks.is_multiple_of(2) {
            cfg.throttle_window_ticks = 5 + cfg.op_gap_ticks_max * 4;
        }
        cfg
    }

    pub(super) fn summary(&self) -> String {
        format!(
            "volume {} KiB block {} op<= {} hot {}+{} mode {} lock {:?} policy {:?} \
             flush_replicates {} log {}B/{} commit {}B/{} locals {} latency {} bw {}B/t \
             link {}B depth {} disconnect~{} corrupt {}/1000 crash~{} locks~{} lock-timeout {} switch~{} \
             source-crash~{} restart<={} ping {} idle {} silence~{} pause~{} intent-chunk {} keep {} extent {} \
             overflow-after {} sync-peer-gone {} resync-rate {}B/t throttle-window {}",
            self.volume_bytes / 1024,
            self.block_bytes,
            self.op_bytes_max,
            self.hot_offset_bytes,
            self.hot_bytes,
            self.mode,
            self.lock_style,
            self.policy,
            self.flush_replicates,
            self.log_bytes_max,
            self.log_entries_max,
            self.commit_bytes_max,
            self.commit_entries_max,
            self.local_locks_max,
            self.latency_ticks,
            self.bandwidth_bytes_per_tick,
            self.link_bytes_max,
            self.host_depth,
            self.disconnect_gap_ticks,
            self.corrupt_per_mille,
            self.crash_gap_ticks,
            self.lock_gap_ticks,
            self.local_lock_timeout_ticks,
            self.mode_switch_gap_ticks,
            self.source_crash_gap_ticks,
            self.source_restart_ticks_max,
            self.ping_interval_ticks,
            self.idle_timeout_ticks,
            self.silence_gap_ticks,
            self.host_pause_gap_ticks,
            self.intent_chunk_bytes,
            self.intent_keep_chunks,
            self.intent_extent_chunks,
            self.overflow_after_ticks,
            self.sync_peer_gone,
            self.resync_bytes_per_tick,
            self.throttle_window_ticks,
        )
    }
}
