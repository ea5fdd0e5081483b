//! Local lock holders on the secondary (a consistent backup read, verify, resync): they lock a
//! region through the engine's owner, retrying as mirror-core's [`LocalLockRetry`] says, and read
//! it while no mirrored operation touches it.

use std::sync::Arc;
use std::time::Duration;

use mirror_core::lock::{LocalLockId, LocalLockRetry, LocalRetry};
use mirror_core::storage;
use mirror_core::Range;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::error::{IoFailure, ServerError};
use crate::owner::Cmd;
use crate::server::{ServerHandle, READ_BYTES_MAX};

impl ServerHandle {
    /// Takes a local lock on `[offset_bytes, offset_bytes + len_bytes)`, retrying with a bounded
    /// backoff while the mirror holds or waits for an overlapping range. While held, no mirrored
    /// operation on the region is applied.
    pub async fn lock_region(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<RegionLock, ServerError> {
        let in_volume = offset_bytes
            .checked_add(len_bytes)
            .is_some_and(|end| end <= self.volume.volume_bytes());
        if len_bytes == 0 || !in_volume {
            return Err(ServerError::BadRange(offset_bytes, len_bytes));
        }
        let range = Range::new(offset_bytes, len_bytes);
        let started = tokio::time::Instant::now();
        let elapsed_ns = || u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let timeout_ns = u64::try_from(self.local_lock_timeout.as_nanos()).unwrap_or(u64::MAX);
        let mut retry = LocalLockRetry::new(0, timeout_ns);
        loop {
            let (reply, answer) = oneshot::channel();
            self.cmds
                .send(Cmd::Lock(range, reply))
                .await
                .map_err(|_| ServerError::Stopped)?;
            match answer.await.map_err(|_| ServerError::Stopped)? {
                Ok(id) => {
                    return Ok(RegionLock {
                        cmds: self.cmds.clone(),
                        volume: Arc::clone(&self.volume),
                        id: Some(id),
                        range,
                    })
                }
                Err(why) => match retry.on_refused(why, elapsed_ns()) {
                    LocalRetry::Wait { wait_ns } => {
                        tokio::time::sleep(Duration::from_nanos(wait_ns)).await;
                    }
                    LocalRetry::TimedOut => {
                        return Err(ServerError::LockTimeout(offset_bytes, len_bytes))
                    }
                    LocalRetry::Refused => {
                        return Err(ServerError::BadRange(offset_bytes, len_bytes))
                    }
                },
            }
        }
    }

    /// Reads a region while no mirrored operation touches it: takes a local lock (see
    /// [`Self::lock_region`]), reads, releases.
    pub async fn consistent_read(
        &self,
        offset_bytes: u64,
        len_bytes: usize,
    ) -> Result<Vec<u8>, ServerError> {
        if len_bytes > READ_BYTES_MAX {
            return Err(ServerError::BadRange(offset_bytes, len_bytes as u64));
        }
        let lock = self.lock_region(offset_bytes, len_bytes as u64).await?;
        let data = lock.read(offset_bytes, len_bytes).await;
        lock.release();
        data
    }
}

/// A local lock on a region of the volume; released by [`RegionLock::release`] or on drop.
#[derive(Debug)]
pub struct RegionLock {
    cmds: mpsc::Sender<Cmd>,
    volume: Arc<dyn storage::Volume + Send + Sync>,
    id: Option<LocalLockId>,
    range: Range,
}

impl RegionLock {
    /// The locked range.
    #[must_use]
    pub fn range(&self) -> Range {
        self.range
    }

    /// Reads part of the locked region.
    pub async fn read(&self, offset_bytes: u64, len_bytes: usize) -> Result<Vec<u8>, ServerError> {
        let inside = offset_bytes >= self.range.offset_bytes
            && offset_bytes
                .checked_add(len_bytes as u64)
                .is_some_and(|end| end <= self.range.end_bytes());
        if !inside || len_bytes > READ_BYTES_MAX {
            return Err(ServerError::BadRange(offset_bytes, len_bytes as u64));
        }
        let volume = Arc::clone(&self.volume);
        tokio::task::spawn_blocking(move || storage::read(&*volume, offset_bytes, len_bytes))
            .await
            .map_err(|_| IoFailure::ThreadFailed("read task"))?
            .map_err(|source| {
                ServerError::from(IoFailure::Read {
                    offset_bytes,
                    len_bytes,
                    source,
                })
            })
    }

    /// Releases the lock; mirrored operations waiting for the region may proceed.
    pub fn release(mut self) {
        self.unlock();
    }

    fn unlock(&mut self) {
        if let Some(id) = self.id.take() {
            // Room is certain: the queue holds more than the locks that can exist. A stopped
            // server has no locks left to release.
            if self.cmds.try_send(Cmd::Unlock(id)).is_err() {
                warn!("local lock {id:?} released after the server stopped");
            }
        }
    }
}

impl Drop for RegionLock {
    fn drop(&mut self) {
        self.unlock();
    }
}
