//! The stored write intent as the host's write path sees it, so that a write into chunks the
//! stored copy already holds reaches the local volume without a round trip through the engine.
//!
//! The engine publishes a chunk only once a store holding it is durable. A host write announces
//! its chunks (`entering`) and then reads their published bits; the engine, before a store that
//! drops chunks, unpublishes them and then reads the announcements, keeping every announced one.
//! With sequentially consistent accesses on both sides one of them sees the other (Dekker): either
//! the engine keeps the chunk, or the host takes the slow path and waits until the engine took its
//! write and stored a map holding it. The engine withdraws the announcement once the write is in
//! the link's intent (from then on every store holds its chunks until the peer has it).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

use mirror_core::bitmap::DirtyBitmap;
use mirror_core::Range;

/// Announcement counters; chunks share them modulo this (a shared one only keeps a chunk a
/// little longer).
const ENTERING_SLOTS: u64 = 4096;

#[derive(Debug)]
pub(crate) struct IntentView {
    /// None: no write intent is kept (every write is covered).
    chunk_shift: Option<u32>,
    chunks: u64,
    published: Box<[AtomicU64]>,
    entering: Box<[AtomicU32]>,
}

impl IntentView {
    /// A view that covers everything: the replicator keeps no write intent.
    pub(crate) fn disabled() -> IntentView {
        IntentView {
            chunk_shift: None,
            chunks: 0,
            published: Box::new([]),
            entering: Box::new([]),
        }
    }

    /// A view of `stored` (the map on disk now).
    pub(crate) fn new(stored: &DirtyBitmap) -> IntentView {
        let words = stored.chunks().div_ceil(64);
        let view = IntentView {
            chunk_shift: Some(stored.chunk_bytes().trailing_zeros()),
            chunks: stored.chunks(),
            published: (0..words).map(|_| AtomicU64::new(0)).collect(),
            entering: (0..ENTERING_SLOTS).map(|_| AtomicU32::new(0)).collect(),
        };
        for chunk in stored.dirty() {
            view.word(chunk).fetch_or(bit(chunk), SeqCst);
        }
        view
    }

    fn span(&self, range: Range) -> std::ops::Range<u64> {
        match self.chunk_shift {
            Some(shift) if range.len_bytes > 0 => {
                let first = range.offset_bytes >> shift;
                let last = (range.end_bytes() - 1) >> shift;
                first.min(self.chunks)..(last + 1).min(self.chunks)
            }
            _ => 0..0,
        }
    }

    fn word(&self, chunk: u64) -> &AtomicU64 {
        &self.published[usize::try_from(chunk / 64).unwrap_or(usize::MAX)]
    }

    fn slot(&self, chunk: u64) -> &AtomicU32 {
        &self.entering[usize::try_from(chunk % ENTERING_SLOTS).unwrap_or(0)]
    }

    /// The host announces a write to `range` (none: a flush) and learns whether the stored copy
    /// holds all its chunks; [`Self::leave`] follows once the engine took the write.
    pub(crate) fn enter(&self, range: Option<Range>) -> bool {
        let Some(range) = range else { return true };
        let span = self.span(range);
        for chunk in span.clone() {
            self.slot(chunk).fetch_add(1, SeqCst);
        }
        span.into_iter()
            .all(|chunk| self.word(chunk).load(SeqCst) & bit(chunk) != 0)
    }

    /// The engine took the write [`Self::enter`] announced.
    pub(crate) fn leave(&self, range: Option<Range>) {
        let Some(range) = range else { return };
        for chunk in self.span(range) {
            self.slot(chunk).fetch_sub(1, SeqCst);
        }
    }

    /// Before a store of `map`: unpublishes the chunks it drops and puts back into `map` those a
    /// host write announced meanwhile.
    pub(crate) fn before_store(&self, map: &mut DirtyBitmap) {
        let mut dropped = Vec::new();
        for (w, word) in self.published.iter().enumerate() {
            let keep = map.words().get(w).copied().unwrap_or(0);
            let mut gone = word.fetch_and(keep, SeqCst) & !keep;
            while gone != 0 {
                dropped.push(w as u64 * 64 + u64::from(gone.trailing_zeros()));
                gone &= gone - 1;
            }
        }
        for chunk in dropped {
            if self.slot(chunk).load(SeqCst) > 0 {
                self.word(chunk).fetch_or(bit(chunk), SeqCst);
                map.mark_chunk(chunk);
            }
        }
    }

    /// After a store of `map` is durable: its chunks are published.
    pub(crate) fn after_store(&self, map: &DirtyBitmap) {
        for chunk in map.dirty() {
            self.word(chunk).fetch_or(bit(chunk), SeqCst);
        }
    }
}

fn bit(chunk: u64) -> u64 {
    1 << (chunk % 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;

    #[test]
    fn a_write_is_covered_only_by_a_published_store_and_an_announced_chunk_is_kept() {
        let mut stored = DirtyBitmap::new(64 * CHUNK, CHUNK).unwrap();
        stored.mark(Range::new(3 * CHUNK, 4096));
        let view = IntentView::new(&stored);
        let in3 = Some(Range::new(3 * CHUNK + 512, 512));
        let in5 = Some(Range::new(5 * CHUNK, 4096));
        assert!(view.enter(in3), "chunk 3 is stored");
        assert!(!view.enter(in5), "chunk 5 is not: the slow path");
        // The engine stores a map without chunk 3 while the write to it is announced.
        let mut next = DirtyBitmap::new(64 * CHUNK, CHUNK).unwrap();
        next.mark(Range::new(5 * CHUNK, 4096));
        view.before_store(&mut next);
        assert!(next.is_dirty(3), "an announced chunk is kept");
        view.after_store(&next);
        view.leave(in3);
        view.leave(in5);
        assert!(view.enter(in5), "published once stored");
        view.leave(in5);
        let mut last = DirtyBitmap::new(64 * CHUNK, CHUNK).unwrap();
        view.before_store(&mut last);
        assert_eq!(
            last.dirty_chunks(),
            0,
            "nothing announced: everything may go"
        );
        assert!(!view.enter(in3), "unpublished before the store");
        assert!(IntentView::disabled().enter(in3));
    }
}
