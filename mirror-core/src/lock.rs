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

/// First wait of a local lock holder after a refusal.
pub const LOCAL_RETRY_FIRST_NS: u64 = 1_000_000;
/// Longest wait between two tries of a local lock holder.
pub const LOCAL_RETRY_MAX_NS: u64 = 50_000_000;

/// What a local lock holder does after its request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalRetry {
    /// Try again after this long.
    Wait {
        /// How long to wait.
        wait_ns: u64,
    },
    /// The deadline would pass before the next try: the region stayed locked.
    TimedOut,
    /// The request can never be granted (its range is empty or outside the volume).
    Refused,
}

/// The retry policy of a local lock holder while the mirror holds its region: waits that double
/// from [`LOCAL_RETRY_FIRST_NS`] up to [`LOCAL_RETRY_MAX_NS`], until a deadline. Time is passed
/// in; the driver sleeps.
#[derive(Debug, Clone)]
pub struct LocalLockRetry {
    deadline_ns: u64,
    backoff_ns: u64,
    sabotage: LocalRetrySabotage,
}

/// Deliberate bugs for the simulator test that proves its local-lock check bites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalRetrySabotage {
    /// Behave correctly.
    #[default]
    None,
    /// Never time out: a holder waits for as long as the region stays locked.
    NoDeadline,
}

impl LocalLockRetry {
    /// A holder that first asked at `now_ns` and gives up `timeout_ns` later.
    #[must_use]
    pub fn new(now_ns: u64, timeout_ns: u64) -> LocalLockRetry {
        LocalLockRetry {
            deadline_ns: now_ns.saturating_add(timeout_ns),
            backoff_ns: LOCAL_RETRY_FIRST_NS,
            sabotage: LocalRetrySabotage::None,
        }
    }

    /// Breaks the policy on purpose (tests that prove the checkers bite).
    #[must_use]
    pub fn with_sabotage(mut self, sabotage: LocalRetrySabotage) -> LocalLockRetry {
        self.sabotage = sabotage;
        self
    }

    /// When the holder gives up.
    #[must_use]
    pub fn deadline_ns(&self) -> u64 {
        self.deadline_ns
    }

    /// The request was refused with `why` at `now_ns`: wait, give up, or fail.
    pub fn on_refused(&mut self, why: LockError, now_ns: u64) -> LocalRetry {
        match why {
            LockError::BadRange => LocalRetry::Refused,
            // Busy or too many holders: both clear up when others release.
            LockError::Busy | LockError::TooMany => {
                let wait_ns = self.backoff_ns;
                let late = now_ns.saturating_add(wait_ns) > self.deadline_ns;
                if late && self.sabotage != LocalRetrySabotage::NoDeadline {
                    return LocalRetry::TimedOut;
                }
                self.backoff_ns = (wait_ns * 2).min(LOCAL_RETRY_MAX_NS);
                LocalRetry::Wait { wait_ns }
            }
        }
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

    #[test]
    fn local_holders_back_off_until_their_deadline() {
        let ms = 1_000_000;
        let mut retry = LocalLockRetry::new(0, 200 * ms);
        let mut now = 0;
        let mut waits = Vec::new();
        loop {
            match retry.on_refused(LockError::Busy, now) {
                LocalRetry::Wait { wait_ns } => {
                    waits.push(wait_ns / ms);
                    now += wait_ns;
                }
                LocalRetry::TimedOut => break,
                LocalRetry::Refused => panic!("busy is retried"),
            }
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 50, 50]);
        assert!(now <= 200 * ms, "waited past the deadline: {now}");
        assert_eq!(
            retry.on_refused(LockError::TooMany, 0),
            LocalRetry::Wait { wait_ns: 50 * ms }
        );
        assert_eq!(
            LocalLockRetry::new(0, 200 * ms).on_refused(LockError::BadRange, 0),
            LocalRetry::Refused
        );
    }
}
