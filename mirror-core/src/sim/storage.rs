//! The target node's storage: its volume (written, synced, part of it lost in a crash), its
//! metadata record, the group commit that batches writes, target crashes and restarts, and the
//! replacement of its volume.

use crate::commit::{CommitConfig, GroupCommit};
use crate::genid::GenIds;
use crate::meta::MetaRecord;
use crate::node::Node;
use crate::storage::{self, Volume};
use crate::target::{recover_with, running_record, Restored, Target, TargetConfig, VolumeFacts};
use crate::Seq;

use super::check::{advance, byte_range};
use super::source::SourceLife;
use super::world::{Event, Sim};
use super::{SimConfig, SimOptions};

impl Sim<'_> {
    pub(super) fn crash(&mut self) {
        self.disconnect();
        self.holders.clear();
        self.lock_waiters.clear();
        let clean = self.rng.u32(0..4) == 0 && self.node.engines().status().consistent;
        if clean {
            // A clean shutdown finishes the batch out, syncs what was applied and records that
            // it stopped cleanly.
            while !self.applying.is_empty() {
                self.apply_done();
            }
            self.batch_done();
            let applied = self.node.engines().applied();
            self.fsync(applied);
            self.report.clean_restarts += 1;
        } else {
            self.report.crashes += 1;
            let keep_percent = match self.rng.u32(0..3) {
                0 => 0,
                1 => 100,
                _ => self.rng.u32(1..100),
            };
            let rng = &mut self.rng;
            let loss = self.volume.crash(&mut || rng.u32(0..100) < keep_percent);
            if loss.kept_blocks > 0 {
                self.report.partial_crashes += 1;
            }
        }
        self.touched.push((0, self.base_image.len()));
        self.applying.clear();
        self.written = self.persisted;
        self.batch = None;
        self.commit = new_commit(&self.cfg, self.opts);
        self.target_run += 1;
        if self.opts.replace_target_volume
            && !self.replaced
            && self.source_life == SourceLife::Up
            && self.rng.u32(0..2) == 0
        {
            self.replace_volume();
            return;
        }
        // The record the driver last wrote (the node's, as the target server keeps it), through
        // its bytes, and the recovery rule the target server runs.
        let record = self.node.record(self.persisted, clean);
        let (record, _) = MetaRecord::decode_file(&record.encode_file(self.target_run))
            .unwrap_or_else(|e| panic!("the metadata record does not read back: {e}"));
        self.node = new_node(&self.target_cfg, Some(&record), false, self.opts);
    }

    /// The operator puts another disk of unknown content under the crashed target, without its
    /// metadata: it must never be trusted as consistent (nothing the source resends covers the
    /// regions it does not write), and a source that had it durable further stops for good.
    fn replace_volume(&mut self) {
        self.report.replaced_volumes += 1;
        self.replaced = true;
        let mut other = vec![0u8; self.base_image.len()];
        self.rng.fill(&mut other);
        let replaced = self
            .volume
            .write_at(0, &other)
            .and_then(|()| self.volume.sync());
        if let Err(e) = replaced {
            panic!("replacing the target's volume: {e}");
        }
        self.lost_through = self.persisted;
        self.persisted = Seq::NONE;
        self.written = Seq::NONE;
        self.node = new_node(&self.target_cfg, None, false, self.opts);
    }

    /// One operation of the batch out is written (to the volatile view).
    pub(super) fn apply_done(&mut self) {
        let Some(apply) = self.applying.pop_front() else {
            return;
        };
        self.written = apply.seq;
        if let Err(e) = storage::apply(&self.volume, &apply.op) {
            // The engine checked the extent and no fault is injected: a bug of the simulator.
            panic!("applying seq {}: {e}", apply.seq);
        }
        if let Some(r) = apply.op.range() {
            let r = byte_range(r);
            self.touched.push((r.start, r.end));
        }
        if self.applying.is_empty() {
            self.batch_written();
        }
    }

    /// Every operation of the batch out is written: sync it if it says so, else it is done.
    pub(super) fn batch_written(&mut self) {
        match self.batch.as_ref().and_then(|b| b.sync) {
            Some(_) => {
                let delay = self.rng.u64(0..=self.cfg.fsync_ticks_max);
                self.schedule(
                    self.now + delay,
                    Event::Fsync {
                        target_run: self.target_run,
                    },
                );
            }
            None => self.batch_done(),
        }
    }

    pub(super) fn batch_done(&mut self) {
        if let Some(batch) = self.batch.take() {
            self.commit.handle_done(self.node.engines_mut(), &batch);
        }
    }

    /// The volume is synced: what was written is durable, and `seq` is recorded as durable.
    pub(super) fn fsync(&mut self, seq: Seq) {
        if let Err(e) = self.volume.sync() {
            panic!("sync of seq {seq}: {e}");
        }
        self.persisted = seq;
        advance(
            &mut self.durable_shadow,
            &mut self.durable_shadow_seq,
            seq,
            (&self.ops, &self.out_of_sync_ops),
            (Seq::NONE, &self.base_image),
        );
    }

    /// Takes the planner's next batch and schedules its writes, one after another.
    pub(super) fn target_apply(&mut self) -> bool {
        let Some(batch) = self.commit.poll_batch(self.node.engines_mut()) else {
            return false;
        };
        for apply in &batch.ops {
            let t =
                self.apply_busy_until.max(self.now) + self.rng.u64(0..=self.cfg.apply_ticks_max);
            self.apply_busy_until = t;
            self.applying.push_back(apply.clone());
            self.schedule(
                t,
                Event::ApplyDone {
                    target_run: self.target_run,
                },
            );
        }
        let empty = batch.ops.is_empty();
        self.batch = Some(batch);
        if empty {
            self.batch_written();
        }
        true
    }
}

/// The target node as the target server starts it: recovery decides what `loaded` (the record on
/// disk, if any) is trusted for, the node keeps the running record.
/// The target of a pair that starts in sync: a volume holding the source's data, of the pair's
/// history `ids`.
pub(super) fn first_node(cfg: &TargetConfig, ids: GenIds, opts: &SimOptions) -> Node<Target> {
    let facts = VolumeFacts {
        volume_id: cfg.volume_id,
        volume_bytes: cfg.volume_bytes,
        created: true,
    };
    let restored = Restored {
        gen_ids: ids,
        ..Restored::FRESH
    };
    let record = running_record(None, &facts, cfg.node_id, restored);
    let mut target = Target::new(cfg.clone(), restored);
    target.set_sabotage(opts.target_sabotage);
    Node::secondary(record, target)
}

pub(super) fn new_node(
    cfg: &TargetConfig,
    loaded: Option<&MetaRecord>,
    created: bool,
    opts: &SimOptions,
) -> Node<Target> {
    let facts = VolumeFacts {
        volume_id: cfg.volume_id,
        volume_bytes: cfg.volume_bytes,
        created,
    };
    let (restored, _) = recover_with(loaded, &facts, opts.recovery_sabotage)
        .unwrap_or_else(|e| panic!("recovery refused the target's own metadata: {e}"));
    let record = running_record(loaded, &facts, cfg.node_id, restored);
    let mut target = Target::new(cfg.clone(), restored);
    target.set_sabotage(opts.target_sabotage);
    Node::secondary(record, target)
}

/// The planner for a run, with bounds small enough that batches are cut by both (derived from the
/// commit log's bounds, so the seed's draws stay as they were).
pub(super) fn new_commit(cfg: &SimConfig, opts: &SimOptions) -> GroupCommit {
    let mut commit = GroupCommit::new(CommitConfig {
        batch_ops_max: (cfg.commit_entries_max / 4).max(1),
        sync_after_bytes: (cfg.commit_bytes_max / 2).max(1),
    });
    commit.set_sabotage(opts.commit_sabotage);
    commit
}
