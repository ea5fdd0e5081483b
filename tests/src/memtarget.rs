//! The real target server ([`target_server::start_with`]) over a volume and a metadata store in
//! memory: the replicator's tests run against the production target without files.

use std::net::SocketAddr;
use std::sync::Arc;

use mirror_core::genid::GenIds;
use mirror_core::meta::{MetaRecord, Role};
use mirror_core::storage::{MemMetaStore, MemVolume, MetaStore};
use mirror_core::target::TargetStatus;
use mirror_core::{Generation, NodeId, VolumeId};
use target_server::{Backing, BadConfig, ServerConfig, ServerError, ServerHandle};

/// A target server whose volume is memory.
#[derive(Debug)]
pub struct MemTarget {
    server: ServerHandle,
    volume: Arc<MemVolume>,
}

/// A server configuration listening on a free loopback port, for a zeroed volume of
/// `volume_bytes` (kept in `create_bytes`).
#[must_use]
pub fn target_config(
    volume_id: VolumeId,
    volume_bytes: u64,
    block_bytes: u32,
    secret: &[u8],
) -> ServerConfig {
    // The paths are never opened: the backing is memory.
    let mut cfg = ServerConfig::new("memory".into(), volume_id, secret.to_vec());
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.node_id = NodeId(2);
    cfg.block_bytes = block_bytes;
    cfg.create_bytes = Some(volume_bytes);
    cfg
}

/// The history of the pairs these tests build: a source with these ids and a [`MemTarget`]
/// are in sync from the start.
pub const PAIR_IDS: GenIds = GenIds {
    current: Generation(0x7e57),
    ..GenIds::NONE
};

impl MemTarget {
    /// Starts the server on a zeroed volume of `cfg.create_bytes` bytes, recorded as holding
    /// the pair's history ([`PAIR_IDS`]): a source of that history mirrors to it at once.
    pub async fn start(cfg: ServerConfig) -> Result<MemTarget, ServerError> {
        let bytes = cfg.create_bytes.unwrap_or(0);
        let len = usize::try_from(bytes).map_err(|_| BadConfig::TooLargeForMemory { bytes })?;
        let volume = Arc::new(MemVolume::new(vec![0; len]));
        let meta = MemMetaStore::new();
        let record = MetaRecord {
            node_id: cfg.node_id,
            role: Role::Secondary,
            gen_ids: PAIR_IDS,
            clean: true,
            ..MetaRecord::new(cfg.volume_id, bytes)
        };
        meta.store(&record)?;
        let backing = Backing {
            volume: Arc::clone(&volume) as _,
            meta: Arc::new(meta),
            created: false,
        };
        let server = target_server::start_with(cfg, backing).await?;
        Ok(MemTarget { server, volume })
    }

    /// Where sources connect.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// A copy of the volume.
    #[must_use]
    pub fn volume(&self) -> Vec<u8> {
        self.volume.contents()
    }

    /// The engine's state.
    #[must_use]
    pub fn status(&self) -> TargetStatus {
        self.server.status()
    }
}
