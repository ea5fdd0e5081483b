//! The owner's group commit: hand the planner's batches to the I/O thread and take their
//! results; on a graceful stop, apply what is ready and record the volume clean.

use std::sync::Arc;

use mirror_core::commit::Batch;
use mirror_core::storage;
use mirror_core::wire::{Op, ResyncMark};
use tokio::sync::oneshot;
use tracing::{error, info};

use super::Run;
use crate::error::{IoFailure, ServerError};
use crate::io_thread::sync_and_record;

impl Run {
    /// Hands the planner's next batch to the I/O thread, if none is out: write its operations,
    /// then (if it says so) sync the volume and record the durable seq, in one hand-off.
    pub(super) fn dispatch_batch(&mut self) {
        if self.io_pending.is_some() {
            return;
        }
        let Some(batch) = self.commit.poll_batch(self.o.node.engines_mut()) else {
            return;
        };
        let record = batch
            .sync
            .map(|seq| (self.meta(seq, false), Arc::clone(&self.o.meta_file)));
        let volume = Arc::clone(&self.o.volume);
        let hook = self.o.before_resync.clone();
        self.io_pending = Some(self.io.start(move || {
            for a in &batch.ops {
                if let (Some(hook), Op::Resync(ResyncMark::Begin { full })) = (&hook, &a.op) {
                    // The hook sees everything before the resync on the volume, none of it.
                    volume.sync().map_err(IoFailure::Sync)?;
                    hook.run(a.seq, *full)?;
                }
                storage::apply(&*volume, &a.op)
                    .map_err(|source| IoFailure::Apply { seq: a.seq, source })?;
            }
            if let Some((meta, meta_file)) = record {
                sync_and_record(&*volume, &*meta_file, &meta)?;
            }
            Ok(batch)
        }));
    }

    pub(super) fn batch_done(
        &mut self,
        done: Result<Result<Batch, IoFailure>, oneshot::error::RecvError>,
    ) -> Result<(), ServerError> {
        let batch = done.map_err(|_| IoFailure::ThreadFailed("I/O thread"))??;
        self.commit.handle_done(self.o.node.engines_mut(), &batch);
        Ok(())
    }

    /// Stopping: stop reading, apply and sync what is ready, tell the session where we stand, and
    /// record that we stopped cleanly.
    pub(super) async fn finish(&mut self) -> Result<(), ServerError> {
        for c in self.conns.values_mut() {
            if let Some(stop) = c.stop_reader.take() {
                let _ = stop.send(false);
            }
        }
        loop {
            if let Some(pending) = self.io_pending.take() {
                let done = pending.await;
                self.batch_done(done)?;
            }
            self.dispatch_batch();
            if self.io_pending.is_none() {
                break;
            }
        }
        let applied = self.o.node.engines().applied();
        let meta = self.meta(applied, true);
        let volume = Arc::clone(&self.o.volume);
        let meta_file = Arc::clone(&self.o.meta_file);
        let synced = self
            .io
            .start(move || sync_and_record(&*volume, &*meta_file, &meta))
            .await
            .map_err(|_| IoFailure::ThreadFailed("I/O thread"))
            .and_then(|r| r);
        if let Err(e) = synced {
            error!("final sync failed: {e}");
            return Err(e.into());
        }
        self.o.node.engines_mut().handle_durable(applied);
        self.flush_all();
        self.publish();
        info!(durable = %applied, "stopped cleanly");
        Ok(())
    }
}
