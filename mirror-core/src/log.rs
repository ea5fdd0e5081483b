//! The rollback log's storage seam. The source engine decides what enters and leaves the log; a
//! [`RollbackLog`] only stores entries in sequence order. [`MemLog`] keeps them in memory,
//! [`FaultyLog`] wraps it with switchable storage failures for tests; a persistent on-disk log
//! (and the overflow bitmap) implement the same trait outside this crate.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::types::Seq;
use crate::wire::SummedOp;

/// One logged operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Its sequence number.
    pub seq: Seq,
    /// The operation with its checksum (write data is shared, not copied).
    pub op: SummedOp,
    /// When the host submitted it (driver's clock, nanoseconds), for lag in seconds.
    pub submitted_ns: u64,
}

/// A failure of the log's storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// Entries must be appended in sequence order without gaps.
    #[error("append of seq {got} out of order (expected {expected})")]
    OutOfOrder {
        /// What was appended.
        got: Seq,
        /// What was expected.
        expected: Seq,
    },
    /// The backing storage failed: nothing of the operation took effect.
    #[error("rollback log storage failed to {during}: {kind}")]
    Storage {
        /// What the log was doing.
        during: LogOp,
        /// The kind of I/O failure.
        kind: std::io::ErrorKind,
    },
}

/// A log operation that touches storage, as named in [`LogError::Storage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOp {
    /// [`RollbackLog::append`].
    Append,
    /// [`RollbackLog::release_through`].
    Release,
}

impl std::fmt::Display for LogOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogOp::Append => "append",
            LogOp::Release => "release",
        })
    }
}

/// Storage of the rollback log: a FIFO of entries with consecutive sequence numbers.
pub trait RollbackLog {
    /// Appends the next entry (its seq is one past the last one, or anything when empty).
    fn append(&mut self, entry: LogEntry) -> Result<(), LogError>;
    /// The entry with this seq, if still logged (a cheap clone).
    fn get(&self, seq: Seq) -> Option<LogEntry>;
    /// Drops every entry with seq ≤ `seq` (the target confirmed them).
    fn release_through(&mut self, seq: Seq) -> Result<(), LogError>;
    /// First logged seq.
    fn first_seq(&self) -> Option<Seq>;
    /// Entries held.
    fn len(&self) -> usize;
    /// Whether no entry is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Payload bytes held.
    fn bytes(&self) -> usize;
    /// Submission time of the oldest entry.
    fn oldest_ns(&self) -> Option<u64>;
}

/// The in-memory rollback log.
#[derive(Debug, Default)]
pub struct MemLog {
    entries: VecDeque<LogEntry>,
    bytes: usize,
}

impl MemLog {
    /// An empty log.
    #[must_use]
    pub fn new() -> MemLog {
        MemLog::default()
    }
}

impl RollbackLog for MemLog {
    fn append(&mut self, entry: LogEntry) -> Result<(), LogError> {
        if let Some(last) = self.entries.back() {
            if entry.seq != last.seq.next() {
                return Err(LogError::OutOfOrder {
                    got: entry.seq,
                    expected: last.seq.next(),
                });
            }
        }
        self.bytes += entry.op.op().payload_bytes();
        self.entries.push_back(entry);
        Ok(())
    }

    fn get(&self, seq: Seq) -> Option<LogEntry> {
        let first = self.entries.front()?.seq;
        let index = usize::try_from(seq.0.checked_sub(first.0)?).ok()?;
        self.entries.get(index).cloned()
    }

    fn release_through(&mut self, seq: Seq) -> Result<(), LogError> {
        while self.entries.front().is_some_and(|e| e.seq <= seq) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.op.op().payload_bytes();
            }
        }
        Ok(())
    }

    fn first_seq(&self) -> Option<Seq> {
        self.entries.front().map(|e| e.seq)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn bytes(&self) -> usize {
        self.bytes
    }

    fn oldest_ns(&self) -> Option<u64> {
        self.entries.front().map(|e| e.submitted_ns)
    }
}

/// Switches of a [`FaultyLog`], kept by the test while the engine owns the log.
#[derive(Debug, Clone, Default)]
pub struct LogFaults {
    appends: Arc<AtomicBool>,
    releases: Arc<AtomicBool>,
}

impl LogFaults {
    /// Makes every later append fail (or succeed again).
    pub fn fail_appends(&self, on: bool) {
        self.appends.store(on, Ordering::Relaxed);
    }

    /// Makes every later release fail (or succeed again).
    pub fn fail_releases(&self, on: bool) {
        self.releases.store(on, Ordering::Relaxed);
    }
}

/// A [`MemLog`] whose storage can be made to fail through its [`LogFaults`]: while a failure is
/// switched on, the operation returns [`LogError::Storage`] and changes nothing.
#[derive(Debug, Default)]
pub struct FaultyLog {
    inner: MemLog,
    faults: LogFaults,
}

impl FaultyLog {
    /// An empty log with no failures switched on.
    #[must_use]
    pub fn new() -> FaultyLog {
        FaultyLog::default()
    }

    /// The switches (shared: the log sees every change).
    #[must_use]
    pub fn faults(&self) -> LogFaults {
        self.faults.clone()
    }

    fn check(flag: &AtomicBool, during: LogOp) -> Result<(), LogError> {
        if flag.load(Ordering::Relaxed) {
            return Err(LogError::Storage {
                during,
                kind: std::io::ErrorKind::Other,
            });
        }
        Ok(())
    }
}

impl RollbackLog for FaultyLog {
    fn append(&mut self, entry: LogEntry) -> Result<(), LogError> {
        Self::check(&self.faults.appends, LogOp::Append)?;
        self.inner.append(entry)
    }

    fn get(&self, seq: Seq) -> Option<LogEntry> {
        self.inner.get(seq)
    }

    fn release_through(&mut self, seq: Seq) -> Result<(), LogError> {
        Self::check(&self.faults.releases, LogOp::Release)?;
        self.inner.release_through(seq)
    }

    fn first_seq(&self) -> Option<Seq> {
        self.inner.first_seq()
    }

    fn len(&self) -> usize {
        self.inner.len()
    }

    fn bytes(&self) -> usize {
        self.inner.bytes()
    }

    fn oldest_ns(&self) -> Option<u64> {
        self.inner.oldest_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Mode, Source, SourceError};
    use crate::types::Lba;
    use crate::wire::Op;
    use bytes::Bytes;

    fn write(block: u64) -> Op {
        Op::Write {
            lba: Lba(block * 8),
            data: Bytes::from(vec![1u8; 4096]),
        }
    }

    /// A failed append is the source's `Log` error naming the append, takes no sequence number
    /// and logs nothing; the next append after the fault clears gets seq 1.
    #[test]
    fn the_source_reports_a_failed_append_and_logs_nothing() {
        let log = FaultyLog::new();
        let faults = log.faults();
        let cfg = crate::testkit::source_config(Mode::Async, 1, 64);
        let mut source = Source::with_log(cfg, log, Seq::NONE);
        faults.fail_appends(true);
        let err = source.submit(write(0), 0).unwrap_err();
        assert_eq!(
            err,
            SourceError::Log(LogError::Storage {
                during: LogOp::Append,
                kind: std::io::ErrorKind::Other,
            })
        );
        assert!(!err.is_fatal(), "{err}");
        assert_eq!(
            err.to_string(),
            "rollback log storage failed to append: other error"
        );
        assert!(source.log().is_empty());
        assert_eq!(source.poll_completion(), None);
        faults.fail_appends(false);
        assert_eq!(source.submit(write(1), 0), Ok(Seq(1)));
        assert_eq!(source.poll_completion(), Some(Seq(1)));
        assert_eq!(source.log().len(), 1);
    }

    #[test]
    fn a_failed_release_keeps_the_entries() {
        let mut log = FaultyLog::new();
        for seq in 1..=3 {
            log.append(LogEntry {
                seq: Seq(seq),
                op: write(seq).into(),
                submitted_ns: seq,
            })
            .unwrap();
        }
        log.faults().fail_releases(true);
        assert!(matches!(
            log.release_through(Seq(2)),
            Err(LogError::Storage {
                during: LogOp::Release,
                ..
            })
        ));
        assert_eq!(log.len(), 3);
        log.faults().fail_releases(false);
        log.release_through(Seq(2)).unwrap();
        assert_eq!(log.first_seq(), Some(Seq(3)));
    }
}
