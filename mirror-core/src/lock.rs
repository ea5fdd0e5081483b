//! The target's lock table: ranges held by the mirror (per operation) or by local holders on the
//! secondary (a backup read of a consistent region, online verify, resync).
//!
//! Mirror locks never conflict with each other: they belong to one ordered stream. Local locks are
//! shared among local holders and exclusive against the mirror. While a mirror lock waits for a
//! region, no new local lock is granted over it, so the mirror cannot be starved.

use std::collections::VecDeque;

use crate::types::{Range, Seq};

/// Handle of a local lock, returned by [`LockTable::try_lock_local`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LocalLockId(pub u64);

/// Why a local lock was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The mirror holds or waits for an overlapping range; try again later.
    #[error("region is locked by the mirror")]
    Busy,
    /// The table already holds its maximum of local locks.
    #[error("too many local locks")]
    TooMany,
    /// The range is empty or outside the volume.
    #[error("range is empty or outside the volume")]
    BadRange,
}

/// Lock table over byte ranges.
///
/// Costs: the mirror takes and releases one lock per operation, so those paths must not grow with
/// the commit log. Checking a mirror lock scans only the local locks (at most `locals_max`);
/// releasing one finds it at the front in the usual case (operations are applied in order).
/// Only the rare paths (a local lock request, a reconnect) scan the mirror's locks.
#[derive(Debug)]
pub struct LockTable {
    /// Mirror locks held, in the order they were taken (mostly sequence order).
    mirror: VecDeque<(Range, Seq)>,
    /// Mirror operations waiting for a region.
    waiting: Vec<(Range, Seq)>,
    locals: Vec<(Range, LocalLockId)>,
    next_local: u64,
    locals_max: usize,
}

impl LockTable {
    /// An empty table allowing `locals_max` local locks at once.
    #[must_use]
    pub fn new(locals_max: usize) -> LockTable {
        LockTable {
            mirror: VecDeque::new(),
            waiting: Vec::new(),
            locals: Vec::new(),
            next_local: 1,
            locals_max,
        }
    }

    /// Takes a local lock unless the mirror holds or waits for an overlapping range.
    pub fn try_lock_local(&mut self, range: Range) -> Result<LocalLockId, LockError> {
        if range.len_bytes == 0 {
            return Err(LockError::BadRange);
        }
        if self.locals.len() >= self.locals_max {
            return Err(LockError::TooMany);
        }
        let mirror_busy = self.mirror.iter().any(|(r, _)| r.overlaps(&range))
            || self.waiting.iter().any(|(r, _)| r.overlaps(&range));
        if mirror_busy {
            return Err(LockError::Busy);
        }
        let id = LocalLockId(self.next_local);
        self.next_local += 1;
        self.locals.push((range, id));
        Ok(id)
    }

    /// Releases a local lock; false if it was not held.
    pub fn unlock_local(&mut self, id: LocalLockId) -> bool {
        let before = self.locals.len();
        self.locals.retain(|(_, l)| *l != id);
        self.locals.len() != before
    }

    /// Whether a local lock overlaps `range`.
    #[must_use]
    pub fn conflicts_with_local(&self, range: &Range) -> bool {
        self.locals.iter().any(|(r, _)| r.overlaps(range))
    }

    /// Takes the mirror lock for `seq` unless a local lock overlaps. Clears a waiter for `seq`.
    pub fn try_lock_mirror(&mut self, seq: Seq, range: Range) -> bool {
        if self.conflicts_with_local(&range) {
            return false;
        }
        if !self.waiting.is_empty() {
            self.waiting.retain(|(_, s)| *s != seq);
        }
        self.mirror.push_back((range, seq));
        true
    }

    /// Records that the mirror waits for `range` on behalf of `seq` (blocks new local locks there).
    pub fn add_waiter(&mut self, seq: Seq, range: Range) {
        if !self.waiting.iter().any(|(_, s)| *s == seq) {
            self.waiting.push((range, seq));
        }
    }

    /// Whether any mirror operation waits for a region.
    #[must_use]
    pub fn has_waiters(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Releases every mirror lock and waiter of `seq`.
    pub fn unlock_mirror(&mut self, seq: Seq) {
        // An operation holds at most one lock, and operations are applied in order: the lock is
        // almost always the oldest one.
        if let Some(i) = self.mirror.iter().position(|(_, s)| *s == seq) {
            self.mirror.remove(i);
        }
        debug_assert!(
            self.mirror.iter().all(|(_, s)| *s != seq),
            "two mirror locks for seq {seq}"
        );
        if !self.waiting.is_empty() {
            self.waiting.retain(|(_, s)| *s != seq);
        }
    }

    /// Releases every mirror lock and waiter of operations at or after `seq`.
    pub fn unlock_mirror_from(&mut self, seq: Seq) {
        self.mirror.retain(|(_, s)| *s < seq);
        self.waiting.retain(|(_, s)| *s < seq);
    }

    /// Number of local locks held.
    #[must_use]
    pub fn local_count(&self) -> usize {
        self.locals.len()
    }

    /// Number of mirror locks held plus waiters (bounded by the commit log).
    #[must_use]
    pub fn mirror_count(&self) -> usize {
        self.mirror.len() + self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_mirror_exclude_each_other_and_waiters_block_locals() {
        let mut t = LockTable::new(4);
        let a = Range::new(0, 8192);
        let l = t.try_lock_local(a).unwrap();
        // Local readers share.
        let l2 = t.try_lock_local(Range::new(4096, 4096)).unwrap();
        assert!(!t.try_lock_mirror(Seq(1), Range::new(4096, 512)));
        t.add_waiter(Seq(1), Range::new(4096, 512));
        // A waiting mirror lock blocks new local locks on its region, not elsewhere.
        assert_eq!(
            t.try_lock_local(Range::new(4096, 512)),
            Err(LockError::Busy)
        );
        assert!(t.try_lock_local(Range::new(65536, 512)).is_ok());
        assert!(t.unlock_local(l));
        assert!(t.unlock_local(l2));
        assert!(!t.unlock_local(l2));
        assert!(t.try_lock_mirror(Seq(1), Range::new(4096, 512)));
        assert_eq!(t.try_lock_local(a), Err(LockError::Busy));
        t.unlock_mirror(Seq(1));
        assert!(t.try_lock_local(a).is_ok());
    }

    #[test]
    fn local_lock_count_is_bounded() {
        let mut t = LockTable::new(1);
        t.try_lock_local(Range::new(0, 512)).unwrap();
        assert_eq!(
            t.try_lock_local(Range::new(1024, 512)),
            Err(LockError::TooMany)
        );
    }
}
