//! Configurations the engines' unit tests share: one volume of 1 MiB in 4 KiB blocks, one secret.

use crate::genid::GenIds;
use crate::source::{LockStyle, Mode, SourceConfig};
use crate::target::{
    ConflictPolicy, Restored, Target, TargetConfig, HANDSHAKES_MAX_DEFAULT,
    HANDSHAKE_TIMEOUT_NS_DEFAULT, IDLE_TIMEOUT_NS_DEFAULT,
};
use crate::{Generation, NodeId, VolumeId};

pub(crate) const VOLUME_BYTES: u64 = 1 << 20;
pub(crate) const VOLUME_ID: VolumeId = VolumeId([7; 16]);
/// The history both ends of a test pair hold.
pub(crate) const PAIR_IDS: GenIds = GenIds {
    current: Generation(0x9a1),
    ..GenIds::NONE
};

/// A source of node `node` in `mode`; its log holds `log_entries_max` entries of 1 MiB at most.
pub(crate) fn source_config(mode: Mode, node: u64, log_entries_max: usize) -> SourceConfig {
    SourceConfig {
        volume_id: VOLUME_ID,
        node_id: NodeId(node),
        gen_ids: PAIR_IDS,
        volume_bytes: VOLUME_BYTES,
        block_bytes: 4096,
        secret: b"s".to_vec(),
        mode,
        flush_replicates: false,
        lock_style: LockStyle::Implied,
        log_bytes_max: 1 << 20,
        log_entries_max,
    }
}

/// The target of node 2, as `restored`.
pub(crate) fn target(restored: Restored) -> Target {
    Target::new(
        TargetConfig {
            volume_id: VOLUME_ID,
            node_id: NodeId(2),
            volume_bytes: VOLUME_BYTES,
            block_bytes: 4096,
            secret: b"s".to_vec(),
            conflict_policy: ConflictPolicy::Wait,
            commit_log_bytes_max: 1 << 20,
            commit_log_entries_max: 64,
            local_locks_max: 4,
            handshake_timeout_ns: HANDSHAKE_TIMEOUT_NS_DEFAULT,
            handshakes_max: HANDSHAKES_MAX_DEFAULT,
            idle_timeout_ns: IDLE_TIMEOUT_NS_DEFAULT,
        },
        restored,
    )
}

/// A new volume of the pair (its history): nothing durable, stopped cleanly.
pub(crate) const FRESH: Restored = Restored {
    gen_ids: PAIR_IDS,
    ..Restored::FRESH
};
