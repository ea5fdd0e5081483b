//! The rollback log's storage seam. The source engine decides what enters and leaves the log; a
//! [`RollbackLog`] only stores entries in sequence order. [`MemLog`] keeps them in memory; a
//! persistent on-disk log (and the overflow bitmap) implement the same trait outside this crate.

use std::collections::VecDeque;

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
    /// The backing storage failed.
    #[error("rollback log storage: {0}")]
    Storage(String),
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
