//! The primary's write intent (SPEC §3–§4, activity-log style): which chunks hold writes the peer
//! has not made durable, and the copy of that map the driver keeps on disk. A write's chunks are
//! marked when it is submitted; when the stored copy lacks one of them, the driver must store the
//! map ([`WriteIntent::take_store`]) before the write reaches the local volume. So after a crash
//! at any instant the stored map covers every write the peer had not confirmed durable. Writes
//! into chunks the stored copy already holds cost nothing.
//!
//! A chunk is cleared in memory once the peer holds every write to it durably. A store that adds
//! a chunk adds its whole extent ([`EXTENT_BYTES_DEFAULT`], DRBD's activity-log extent), so
//! writes near it cost no store; the stored copy keeps chunks that went clean while it holds at
//! most [`WriteIntent::set_keep_chunks`] of them, so a working set costs no store once it is
//! stored; a store that would exceed that keeps only the live chunks. A stored bit of a clean
//! chunk only costs a needless resync.

use std::collections::{HashMap, VecDeque};

use crate::bitmap::{BitmapError, DirtyBitmap};
use crate::{Range, Seq};

/// A primary's write intent towards one peer.
#[derive(Debug, Clone)]
pub struct WriteIntent {
    live: DirtyBitmap,
    stored: DirtyBitmap,
    store_due: bool,
    /// Submitted operations the peer has not made durable, in order: their seq (none while
    /// parked) and range (none for a flush). At most the rollback log's entries and the parked
    /// one.
    pending: VecDeque<(Option<Seq>, Option<Range>)>,
    /// Per marked chunk, how many of `pending` touch it.
    writers: HashMap<u64, u32>,
    /// Chunks written while the primary overflowed, not yet copied into the log.
    pinned: DirtyBitmap,
    keep_chunks: u64,
    extent_chunks: u64,
}

/// Default of [`WriteIntent::set_keep_chunks`]: 1 GiB of chunks.
pub const KEEP_BYTES_DEFAULT: u64 = 1 << 30;
/// Default of [`WriteIntent::set_extent_chunks`]: 4 MiB of chunks.
pub const EXTENT_BYTES_DEFAULT: u64 = 4 << 20;

impl WriteIntent {
    /// A clean intent over a volume of `volume_bytes` in chunks of `chunk_bytes`.
    pub fn new(volume_bytes: u64, chunk_bytes: u64) -> Result<WriteIntent, BitmapError> {
        let live = DirtyBitmap::new(volume_bytes, chunk_bytes)?;
        Ok(WriteIntent {
            stored: live.clone(),
            pinned: live.clone(),
            keep_chunks: KEEP_BYTES_DEFAULT / chunk_bytes,
            extent_chunks: (EXTENT_BYTES_DEFAULT / chunk_bytes).max(1),
            live,
            store_due: false,
            pending: VecDeque::new(),
            writers: HashMap::new(),
        })
    }

    /// The intent of a restarted primary: nothing pending, and `stored` (as last stored, of this
    /// geometry) as the stored copy: its chunks need no store before they are written again.
    #[must_use]
    pub fn restored(stored: DirtyBitmap) -> WriteIntent {
        let mut live = stored.clone();
        for chunk in stored.dirty() {
            live.clear(chunk);
        }
        WriteIntent {
            pinned: live.clone(),
            keep_chunks: KEEP_BYTES_DEFAULT / stored.chunk_bytes(),
            extent_chunks: (EXTENT_BYTES_DEFAULT / stored.chunk_bytes()).max(1),
            live,
            stored,
            store_due: false,
            pending: VecDeque::new(),
            writers: HashMap::new(),
        }
    }

    /// How many chunks the stored copy may hold before a store drops the clean ones.
    pub fn set_keep_chunks(&mut self, chunks: u64) {
        self.keep_chunks = chunks;
    }

    /// A resync carried every chunk of the stored copy that was not live: if it holds more than
    /// the bound (a restart's copy of a larger bound or of a full copy), the next store keeps
    /// only the live chunks. Never while a resync still has stored chunks to copy: they are in
    /// the stored copy alone.
    pub fn trim_after_resync(&mut self) {
        if self.stored.dirty_chunks() > self.keep_chunks {
            self.store_due = true;
        }
    }

    /// How many chunks (aligned) a store adds around a chunk it must add (at least 1).
    pub fn set_extent_chunks(&mut self, chunks: u64) {
        self.extent_chunks = chunks.max(1);
    }

    /// An operation on `range` (none: a flush) was submitted; its seq follows with
    /// [`Self::accepted`], at once or once a parked submission is taken.
    pub fn submitted(&mut self, range: Option<Range>) {
        if let Some(range) = range {
            self.live.mark(range);
            if !self.stored.covers(range) {
                self.store_due = true;
            }
            for chunk in self.live.chunks_of(range) {
                *self.writers.entry(chunk).or_insert(0) += 1;
            }
        }
        self.pending.push_back((None, range));
    }

    /// A write to `range` was not queued (the primary overflows): its chunks stay marked until
    /// [`Self::unpin`].
    pub fn pin(&mut self, range: Range) {
        self.live.mark(range);
        self.pinned.mark(range);
        if !self.stored.covers(range) {
            self.store_due = true;
        }
    }

    /// A copy of `chunk` is in the log (submitted after every write that pinned it): the copy
    /// keeps it marked from now on.
    pub fn unpin(&mut self, chunk: u64) {
        self.pinned.clear(chunk);
        if !self.writers.contains_key(&chunk) {
            self.live.clear(chunk);
        }
    }

    /// Every chunk is being copied in full: none stays pinned (until the copy of a chunk is in
    /// the log a crash finds the peer without this volume's history and copies it in full again).
    pub fn unpin_all(&mut self) {
        for chunk in self.pinned.dirty().collect::<Vec<_>>() {
            self.unpin(chunk);
        }
    }

    /// Chunks written while the primary overflowed and not yet copied into the log.
    #[must_use]
    pub fn pinned(&self) -> &DirtyBitmap {
        &self.pinned
    }

    /// The newest submitted operation without a seq entered the log as `seq` (a resync copy may
    /// enter ahead of a parked host write: the write's entry, older, is then the one waiting;
    /// it is released no earlier than the copy's, which is only longer than needed).
    pub fn accepted(&mut self, seq: Seq) {
        if let Some(entry) = self.pending.iter_mut().rev().find(|e| e.0.is_none()) {
            entry.0 = Some(seq);
        }
    }

    /// The newest submitted operation without a seq was refused (it never reaches the local
    /// volume).
    pub fn refused(&mut self) {
        if let Some(index) = self.pending.iter().rposition(|e| e.0.is_none()) {
            if let Some((_, range)) = self.pending.remove(index) {
                self.forget(range);
            }
        }
    }

    /// The peer holds everything through `durable`: chunks no later write touches are clean.
    pub fn durable(&mut self, durable: Seq) {
        while let Some(&(Some(seq), range)) = self.pending.front() {
            if seq > durable {
                break;
            }
            self.pending.pop_front();
            self.forget(range);
        }
    }

    fn forget(&mut self, range: Option<Range>) {
        let Some(range) = range else { return };
        for chunk in self.live.chunks_of(range) {
            if let Some(n) = self.writers.get_mut(&chunk) {
                *n -= 1;
                if *n == 0 {
                    self.writers.remove(&chunk);
                    if !self.pinned.is_dirty(chunk) {
                        self.live.clear(chunk);
                    }
                }
            }
        }
    }

    /// The map to store before the writes submitted since the last store reach the local volume,
    /// if the stored copy lacks some of their chunks; the stored copy is then that map.
    pub fn take_store(&mut self) -> Option<&DirtyBitmap> {
        if !self.store_due {
            return None;
        }
        self.store_due = false;
        let mut added = Vec::new();
        for (w, (live, stored)) in self
            .live
            .words()
            .iter()
            .zip(self.stored.words())
            .enumerate()
        {
            let mut new = live & !stored;
            while new != 0 {
                added.push(w as u64 * 64 + u64::from(new.trailing_zeros()));
                new &= new - 1;
            }
        }
        self.stored.merge(&self.live);
        for chunk in added {
            let first = chunk - chunk % self.extent_chunks;
            for c in first..first + self.extent_chunks {
                self.stored.mark_chunk(c);
            }
        }
        if self.stored.dirty_chunks() > self.keep_chunks {
            self.stored.clone_from(&self.live);
        }
        Some(&self.stored)
    }

    /// Chunks holding writes the peer has not made durable.
    #[must_use]
    pub fn live(&self) -> &DirtyBitmap {
        &self.live
    }

    /// The copy last handed out to be stored.
    #[must_use]
    pub fn stored(&self) -> &DirtyBitmap {
        &self.stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;

    #[test]
    fn a_store_is_due_only_for_chunks_the_stored_copy_lacks() {
        let mut w = WriteIntent::new(16 * CHUNK, CHUNK).unwrap();
        w.set_extent_chunks(1);
        w.submitted(Some(Range::new(0, 4096)));
        w.accepted(Seq(1));
        assert_eq!(w.take_store().map(DirtyBitmap::dirty_chunks), Some(1));
        w.submitted(Some(Range::new(8192, 4096)));
        w.accepted(Seq(2));
        assert!(w.take_store().is_none(), "the chunk is stored already");
        // Straddling chunks 1 and 2.
        w.submitted(Some(Range::new(2 * CHUNK - 4096, 8192)));
        w.accepted(Seq(3));
        assert_eq!(w.take_store().map(DirtyBitmap::dirty_chunks), Some(3));
        w.durable(Seq(1));
        assert!(w.live().is_dirty(0), "seq 2 still writes chunk 0");
        w.durable(Seq(2));
        assert!(!w.live().is_dirty(0));
        assert!(
            w.stored().is_dirty(0),
            "the stored copy follows at its next store"
        );
        w.durable(Seq(3));
        assert_eq!(w.live().dirty_chunks(), 0);
    }

    #[test]
    fn a_parked_write_stays_marked_until_it_is_durable() {
        let mut w = WriteIntent::new(4 * CHUNK, CHUNK).unwrap();
        w.submitted(Some(Range::new(0, 4096)));
        w.accepted(Seq(1));
        w.submitted(Some(Range::new(4096, 4096)));
        // Parked: no seq yet; seq 1 durable does not clear its chunk.
        w.durable(Seq(1));
        assert!(w.live().is_dirty(0));
        w.accepted(Seq(2));
        w.durable(Seq(2));
        assert!(!w.live().is_dirty(0));
        w.submitted(Some(Range::new(CHUNK, 4096)));
        w.refused();
        assert!(
            !w.live().is_dirty(1),
            "a refused write never reaches the volume"
        );
    }

    #[test]
    fn the_stored_copy_keeps_clean_chunks_up_to_its_bound() {
        let mut w = WriteIntent::new(16 * CHUNK, CHUNK).unwrap();
        w.set_keep_chunks(2);
        w.set_extent_chunks(1);
        for (chunk, seq) in [(0, 1), (1, 2)] {
            w.submitted(Some(Range::new(chunk * CHUNK, 4096)));
            w.accepted(Seq(seq));
            assert!(w.take_store().is_some());
            w.durable(Seq(seq));
        }
        assert_eq!(w.live().dirty_chunks(), 0);
        assert_eq!(
            w.stored().dirty_chunks(),
            2,
            "both kept: clean, within the bound"
        );
        w.submitted(Some(Range::new(0, 4096)));
        w.accepted(Seq(3));
        assert!(w.take_store().is_none(), "a kept chunk costs no store");
        w.submitted(Some(Range::new(5 * CHUNK, 4096)));
        w.accepted(Seq(4));
        let stored = w.take_store().map(|m| m.dirty().collect::<Vec<_>>());
        assert_eq!(
            stored,
            Some(vec![0, 5]),
            "over the bound: only the live chunks"
        );
    }

    #[test]
    fn a_store_adds_the_whole_extent_of_a_new_chunk() {
        let mut w = WriteIntent::new(16 * CHUNK, CHUNK).unwrap();
        w.set_extent_chunks(4);
        w.submitted(Some(Range::new(5 * CHUNK, 4096)));
        w.accepted(Seq(1));
        let stored = w.take_store().map(|m| m.dirty().collect::<Vec<_>>());
        assert_eq!(stored, Some(vec![4, 5, 6, 7]));
        w.submitted(Some(Range::new(7 * CHUNK, 4096)));
        w.accepted(Seq(2));
        assert!(
            w.take_store().is_none(),
            "a chunk of a stored extent costs no store"
        );
    }

    #[test]
    fn a_pinned_chunk_stays_marked_until_its_copy_is_durable() {
        let mut w = WriteIntent::new(16 * CHUNK, CHUNK).unwrap();
        w.set_extent_chunks(1);
        w.submitted(Some(Range::new(2 * CHUNK, 4096)));
        w.accepted(Seq(1));
        w.pin(Range::new(2 * CHUNK + 8192, 4096));
        assert_eq!(w.take_store().map(DirtyBitmap::dirty_chunks), Some(1));
        w.durable(Seq(1));
        assert!(
            w.live().is_dirty(2),
            "pinned: the logged write's end clears nothing"
        );
        // The resync's copy enters the log as seq 2, then the pin goes.
        w.submitted(Some(Range::new(2 * CHUNK, CHUNK)));
        w.accepted(Seq(2));
        w.unpin(2);
        assert!(w.live().is_dirty(2), "the copy keeps it until durable");
        w.durable(Seq(2));
        assert_eq!(w.live().dirty_chunks(), 0);
        w.pin(Range::new(5 * CHUNK, 512));
        w.unpin(5);
        assert_eq!(w.pinned().dirty_chunks(), 0);
        assert_eq!(w.live().dirty_chunks(), 0);
    }

    #[test]
    fn a_restart_trims_a_stored_copy_beyond_its_bound_once_the_resync_is_over() {
        let mut stored = DirtyBitmap::new(16 * CHUNK, CHUNK).unwrap();
        stored.mark(Range::new(0, 16 * CHUNK));
        let mut w = WriteIntent::restored(stored);
        w.set_keep_chunks(4);
        w.set_extent_chunks(1);
        assert!(
            w.take_store().is_none(),
            "the stored copy covers every chunk, and the resync still needs them"
        );
        // The resync copies chunk 3, then a host write goes to chunk 5; both durable.
        w.submitted(Some(Range::new(3 * CHUNK, CHUNK)));
        w.accepted(Seq(1));
        w.durable(Seq(1));
        w.submitted(Some(Range::new(5 * CHUNK, 4096)));
        w.accepted(Seq(2));
        w.trim_after_resync();
        assert_eq!(
            w.take_store().map(DirtyBitmap::dirty_chunks),
            Some(1),
            "only the live chunk is kept"
        );
        assert!(w.stored().is_dirty(5));
        w.trim_after_resync();
        assert!(w.take_store().is_none(), "within the bound: no store");
    }
}
