//! Starting on a volume: check the configuration, open the volume and its metadata
//! ([`mirror_storage::open`]), and let mirror-core decide what this start trusts
//! ([`target::recover`]).

use mirror_core::meta::MetaRecord;
use mirror_core::target::{
    self, RecoveryKind, Restored, TargetConfig, VolumeFacts, HANDSHAKES_MAX_DEFAULT,
};
use mirror_core::wire;
use mirror_storage::{Opened, Opening, VolumeSpec};
use tracing::{info, warn};

use crate::error::{BadConfig, ServerError};
use crate::server::{ServerConfig, LOCAL_LOCKS_MAX};

pub(crate) fn check_config(cfg: &ServerConfig) -> Result<(), BadConfig> {
    mirror_core::block_shift(cfg.block_bytes)?;
    if cfg.commit_log_bytes_max < wire::PAYLOAD_BYTES_MAX as usize {
        return Err(BadConfig::CommitLogTooSmall {
            bytes: cfg.commit_log_bytes_max,
            frame_bytes: wire::PAYLOAD_BYTES_MAX,
        });
    }
    if cfg.commit_log_entries_max == 0
        || cfg.idle_timeout.is_zero()
        || cfg.handshake_timeout.is_zero()
    {
        return Err(BadConfig::NotPositive);
    }
    Ok(())
}

/// Opens (creates, initialises, upgrades) the volume with its internal metadata.
pub(crate) fn open_volume(cfg: &ServerConfig) -> Result<Opened, ServerError> {
    let opened = mirror_storage::open(&VolumeSpec {
        path: &cfg.volume_path,
        create_bytes: cfg.create_bytes,
        legacy_meta: Some(&cfg.legacy_meta_path),
        block_bytes: cfg.block_bytes,
        adopt_file: false,
    })?;
    if let Opening::Upgraded { legacy, renamed } = &opened.how {
        info!(
            volume = %cfg.volume_path.display(),
            durable = %opened.record.map_or(mirror_core::Seq::NONE, |r| r.durable),
            "metadata upgraded: moved from {} into the volume's metadata area; the old file is now {}",
            legacy.display(),
            renamed.display()
        );
    }
    Ok(opened)
}

/// Lets mirror-core decide what this start trusts of `record`, and the record the server keeps
/// while it runs.
pub(crate) fn restore(
    cfg: &ServerConfig,
    record: Option<MetaRecord>,
    volume_bytes: u64,
    created: bool,
) -> Result<(Restored, MetaRecord), ServerError> {
    let facts = VolumeFacts {
        volume_id: cfg.volume_id,
        volume_bytes,
        created,
    };
    let (restored, kind) =
        target::recover(record.as_ref(), &facts).map_err(|why| ServerError::MetaMismatch {
            path: cfg.volume_path.clone(),
            why,
        })?;
    match kind {
        RecoveryKind::Adopted => warn!(
            volume = %cfg.volume_path.display(),
            "no metadata: initialised at durable seq 0 as NOT consistent (its data is not known to \
             match the source's; only a full resync makes it consistent)"
        ),
        RecoveryKind::Unverified => warn!(
            volume = %cfg.volume_path.display(),
            "the volume was initialised without metadata: NOT consistent until a full resync"
        ),
        RecoveryKind::Resumed | RecoveryKind::Fresh => {}
    }
    let running = target::running_record(record.as_ref(), &facts, cfg.node_id, restored);
    Ok((restored, running))
}

/// The engine's configuration: the server's, for a volume of `volume_bytes`.
pub(crate) fn target_config(cfg: &ServerConfig, volume_bytes: u64) -> TargetConfig {
    TargetConfig {
        volume_id: cfg.volume_id,
        node_id: cfg.node_id,
        volume_bytes,
        block_bytes: cfg.block_bytes,
        secret: cfg.secret.clone(),
        conflict_policy: cfg.conflict_policy,
        commit_log_bytes_max: cfg.commit_log_bytes_max,
        commit_log_entries_max: cfg.commit_log_entries_max,
        local_locks_max: LOCAL_LOCKS_MAX,
        handshake_timeout_ns: u64::try_from(cfg.handshake_timeout.as_nanos()).unwrap_or(u64::MAX),
        handshakes_max: HANDSHAKES_MAX_DEFAULT,
        idle_timeout_ns: u64::try_from(cfg.idle_timeout.as_nanos()).unwrap_or(u64::MAX),
    }
}
