//! A resync from the primary: the byte ranges it copies from its local volume, in order, between
//! two resync marks ([`ResyncMark`]) in the sequence stream. The copies are ordinary writes of the
//! local volume's current data; the marks tell the target that in between it is not a prefix of
//! the primary's writes.

use bytes::Bytes;

use crate::bitmap::DirtyBitmap;
use crate::wire::{Op, ResyncMark};
use crate::{Lba, Range};

/// One step of a [`ResyncPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncStep {
    /// Submit this mark.
    Mark(ResyncMark),
    /// Read these bytes of the local volume and submit them as a write.
    Copy(Range),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Begin,
    Copy,
    Done,
}

impl ResyncStep {
    /// The operation of a copy of `range` whose bytes on the local volume are `data`: a write,
    /// or a write of zeroes when they are all zero (a new or sparse volume's full resync then
    /// ships headers, not its size).
    #[must_use]
    pub fn copy_op(range: Range, data: Bytes) -> Op {
        let lba = Lba::from_bytes(range.offset_bytes);
        match u32::try_from(data.len()) {
            Ok(len_bytes) if data.iter().all(|b| *b == 0) => Op::WriteZeroes { lba, len_bytes },
            _ => Op::Write { lba, data },
        }
    }
}

/// Which chunks a resync copies and how far it got.
#[derive(Debug, Clone)]
pub struct ResyncPlan {
    /// The chunks to copy; none: every chunk (a full resync).
    map: Option<DirtyBitmap>,
    chunk_bytes: u64,
    volume_bytes: u64,
    /// The next byte to copy.
    at: u64,
    stage: Stage,
    copied_bytes: u64,
}

impl ResyncPlan {
    /// Copies the chunks `map` marks (the write intent a crashed primary stored).
    #[must_use]
    pub fn partial(map: DirtyBitmap, volume_bytes: u64) -> ResyncPlan {
        ResyncPlan {
            chunk_bytes: map.chunk_bytes(),
            map: Some(map),
            volume_bytes,
            at: 0,
            stage: Stage::Begin,
            copied_bytes: 0,
        }
    }

    /// Copies every chunk (a target whose data is unknown: new, replaced or lost).
    #[must_use]
    pub fn full(volume_bytes: u64, chunk_bytes: u64) -> ResyncPlan {
        ResyncPlan {
            map: None,
            chunk_bytes: chunk_bytes.max(crate::bitmap::CHUNK_BYTES_MIN),
            volume_bytes,
            at: 0,
            stage: Stage::Begin,
            copied_bytes: 0,
        }
    }

    /// Whether it covers every chunk.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.map.is_none()
    }

    /// Bytes the plan copies in all.
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        match &self.map {
            None => self.volume_bytes,
            Some(map) => map
                .dirty()
                .map(|c| map.chunk_range(c, self.volume_bytes).len_bytes)
                .sum(),
        }
    }

    /// Bytes handed out to be copied so far.
    #[must_use]
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes
    }

    /// Whether every step was handed out.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// The next step; a copy is at most `piece_bytes` (a positive multiple of the block size)
    /// and never crosses a chunk's end.
    pub fn next_step(&mut self, piece_bytes: u64) -> Option<ResyncStep> {
        match self.stage {
            Stage::Begin => {
                self.stage = Stage::Copy;
                Some(ResyncStep::Mark(ResyncMark::Begin {
                    full: self.is_full(),
                }))
            }
            Stage::Copy => match self.next_copy(piece_bytes) {
                Some(range) => Some(ResyncStep::Copy(range)),
                None => {
                    self.stage = Stage::Done;
                    Some(ResyncStep::Mark(ResyncMark::End))
                }
            },
            Stage::Done => None,
        }
    }

    fn next_copy(&mut self, piece_bytes: u64) -> Option<Range> {
        if self.at >= self.volume_bytes {
            return None;
        }
        let mut chunk = self.at / self.chunk_bytes;
        if let Some(map) = &self.map {
            if self.at.is_multiple_of(self.chunk_bytes) {
                chunk = map.next_dirty(chunk)?;
                self.at = chunk * self.chunk_bytes;
            }
        }
        let chunk_end = ((chunk + 1) * self.chunk_bytes).min(self.volume_bytes);
        let len = piece_bytes.max(1).min(chunk_end - self.at);
        let range = Range::new(self.at, len);
        self.at += len;
        self.copied_bytes += len;
        Some(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;

    fn steps(plan: &mut ResyncPlan, piece: u64) -> Vec<ResyncStep> {
        std::iter::from_fn(|| plan.next_step(piece)).collect()
    }

    #[test]
    fn a_partial_plan_copies_the_marked_chunks_in_pieces_between_its_marks() {
        let volume = 4 * CHUNK + 8192;
        let mut map = DirtyBitmap::new(volume, CHUNK).unwrap();
        map.mark(Range::new(CHUNK + 512, 512));
        map.mark(Range::new(4 * CHUNK, 512));
        let mut plan = ResyncPlan::partial(map, volume);
        assert_eq!(plan.total_bytes(), CHUNK + 8192);
        let got = steps(&mut plan, 40 << 10);
        let copy = |at, len| ResyncStep::Copy(Range::new(at, len));
        assert_eq!(
            got,
            vec![
                ResyncStep::Mark(ResyncMark::Begin { full: false }),
                copy(CHUNK, 40 << 10),
                copy(CHUNK + (40 << 10), 24 << 10),
                copy(4 * CHUNK, 8192),
                ResyncStep::Mark(ResyncMark::End),
            ]
        );
        assert!(plan.is_done());
        assert_eq!(plan.copied_bytes(), plan.total_bytes());
    }

    #[test]
    fn a_full_plan_copies_every_byte() {
        let mut plan = ResyncPlan::full(2 * CHUNK + 4096, CHUNK);
        let got = steps(&mut plan, CHUNK);
        assert_eq!(got[0], ResyncStep::Mark(ResyncMark::Begin { full: true }));
        assert_eq!(got[3], ResyncStep::Copy(Range::new(2 * CHUNK, 4096)));
        assert_eq!(got.len(), 5);
        assert_eq!(plan.copied_bytes(), 2 * CHUNK + 4096);
    }

    #[test]
    fn a_plan_of_a_clean_map_is_only_its_marks() {
        let map = DirtyBitmap::new(3 * CHUNK, CHUNK).unwrap();
        let mut plan = ResyncPlan::partial(map, 3 * CHUNK);
        assert_eq!(
            steps(&mut plan, CHUNK),
            vec![
                ResyncStep::Mark(ResyncMark::Begin { full: false }),
                ResyncStep::Mark(ResyncMark::End),
            ]
        );
    }
}
