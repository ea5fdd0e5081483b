//! The target's group commit: which operations the driver writes together, and when it syncs the
//! volume and records what is durable. The target server and the simulator both run it.
//!
//! One batch is out at a time. The driver writes the batch's operations in order; if the batch
//! says so, it then syncs the volume and records `sync` as the durable seq (in that order: a
//! restarted target trusts its record only because the sync came first); then it calls
//! [`GroupCommit::handle_done`], which tells the engine. Nothing is acknowledged durable before.

use crate::target::{Apply, Target};
use crate::types::Seq;

/// Operations written in one batch at most, by default.
pub const BATCH_OPS_MAX_DEFAULT: usize = 256;
/// Payload bytes written between two syncs at most, by default (bounds the durable ACK's delay).
pub const SYNC_AFTER_BYTES_DEFAULT: usize = 64 << 20;

/// Bounds of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitConfig {
    /// Operations in one batch at most.
    pub batch_ops_max: usize,
    /// Payload bytes written between two syncs at most.
    pub sync_after_bytes: usize,
}

impl Default for CommitConfig {
    fn default() -> CommitConfig {
        CommitConfig {
            batch_ops_max: BATCH_OPS_MAX_DEFAULT,
            sync_after_bytes: SYNC_AFTER_BYTES_DEFAULT,
        }
    }
}

/// One unit of work for the driver's volume I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Write these, in order (may be empty: a sync of what earlier batches wrote).
    pub ops: Vec<Apply>,
    /// Then sync the volume and record this seq as durable.
    pub sync: Option<Seq>,
}

/// Deliberate bugs for tests that prove the simulator's checkers bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitSabotage {
    /// Behave correctly.
    #[default]
    None,
    /// Report a batch durable once written, without waiting for a sync.
    DurableBeforeSync,
}

/// The planner.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    cfg: CommitConfig,
    in_flight: bool,
    unsynced_bytes: usize,
    sabotage: CommitSabotage,
}

impl GroupCommit {
    /// A planner with these bounds (each at least 1).
    #[must_use]
    pub fn new(cfg: CommitConfig) -> GroupCommit {
        GroupCommit {
            cfg: CommitConfig {
                batch_ops_max: cfg.batch_ops_max.max(1),
                sync_after_bytes: cfg.sync_after_bytes.max(1),
            },
            in_flight: false,
            unsynced_bytes: 0,
            sabotage: CommitSabotage::None,
        }
    }

    /// Breaks the planner on purpose (tests that prove the checkers bite).
    pub fn set_sabotage(&mut self, sabotage: CommitSabotage) {
        self.sabotage = sabotage;
    }

    /// The next batch, if there is work and none is out. A batch syncs when it takes everything
    /// ready (nothing would join a later sync soon) or when the bytes written since the last sync
    /// reach the bound; a batch cut short by the operation bound leaves the sync to a later one.
    pub fn poll_batch(&mut self, target: &mut Target) -> Option<Batch> {
        if self.in_flight {
            return None;
        }
        let ops: Vec<Apply> = std::iter::from_fn(|| target.poll_apply())
            .take(self.cfg.batch_ops_max)
            .collect();
        let sync = match ops.last() {
            None if target.needs_sync() => Some(target.applied()),
            None => return None,
            Some(last) => {
                self.unsynced_bytes += ops.iter().map(|a| a.op.payload_bytes()).sum::<usize>();
                let took_all = ops.len() < self.cfg.batch_ops_max;
                (took_all || self.unsynced_bytes >= self.cfg.sync_after_bytes).then_some(last.seq)
            }
        };
        if sync.is_some() {
            self.unsynced_bytes = 0;
        }
        self.in_flight = true;
        Some(Batch { ops, sync })
    }

    /// The driver finished `batch` (written, and synced and recorded if it said so).
    pub fn handle_done(&mut self, target: &mut Target, batch: &Batch) {
        debug_assert!(self.in_flight, "a batch completed that was not handed out");
        for a in &batch.ops {
            target.handle_applied(a.seq);
        }
        let durable = match (self.sabotage, batch.ops.last()) {
            (CommitSabotage::DurableBeforeSync, Some(last)) => Some(last.seq),
            _ => batch.sync,
        };
        if let Some(seq) = durable {
            target.handle_durable(seq);
        }
        self.in_flight = false;
    }
}
