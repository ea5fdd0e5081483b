//! The thread that does the owner's blocking volume I/O (write a batch, fdatasync, metadata).

use std::io;

use mirror_core::meta::MetaRecord;
use mirror_core::storage::{MetaStore, Volume};
use tokio::sync::oneshot;

use crate::error::IoFailure;

/// A job for the I/O thread.
type IoJob = Box<dyn FnOnce() + Send>;

/// One dedicated thread rather than tokio's blocking pool: handing a job over is a single
/// wake-up, where the pool's hand-off also contends for its lock (three futex calls and an extra
/// context switch per group commit, seen with strace). It exits when the last sender is dropped.
#[derive(Debug)]
pub(crate) struct IoThread {
    jobs: std::sync::mpsc::SyncSender<IoJob>,
}

impl IoThread {
    pub(crate) fn spawn() -> io::Result<IoThread> {
        // The owner waits for each job before it starts the next, so at most one is queued.
        let (jobs, rx) = std::sync::mpsc::sync_channel::<IoJob>(1);
        std::thread::Builder::new()
            .name("target-io".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        Ok(IoThread { jobs })
    }

    /// Starts `f` on the I/O thread; the receiver yields its result (an error if the thread has
    /// stopped or `f` panicked).
    pub(crate) fn start<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, IoFailure> + Send + 'static,
    ) -> oneshot::Receiver<Result<T, IoFailure>> {
        let (tx, rx) = oneshot::channel();
        let job: IoJob = Box::new(move || {
            // A panic in `f` drops `tx`, which the receiver reports.
            let _ = tx.send(f());
        });
        // If the thread is gone the job (and its sender) is dropped: the receiver reports it.
        let _ = self.jobs.send(job);
        rx
    }
}

/// Makes everything written durable, then records `meta` (its durable seq) in the metadata store.
/// Runs on the I/O thread; the order is what lets a restarted target trust its record.
pub(crate) fn sync_and_record(
    volume: &(dyn Volume + Send + Sync),
    meta: &(dyn MetaStore + Send + Sync),
    record: &MetaRecord,
) -> Result<(), IoFailure> {
    volume.sync().map_err(IoFailure::Sync)?;
    meta.store(record).map_err(IoFailure::Record)
}
