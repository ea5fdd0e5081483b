//! Generation ids: which data history a node's volume holds, and what two nodes' ids say about
//! each other at a handshake (the table in `docs/protocol.md`).
//!
//! In the spirit of DRBD's UUIDs. `current` names the history the volume holds now. A primary
//! that writes while its peer does not see the writes (a degraded start, a peer lost) first moves
//! `current` to `bitmap` and takes a fresh `current`: its dirty bitmap then records every chunk
//! written since the history `bitmap` names, which is where the peer stands. When a resync ends,
//! `bitmap` moves into `history` and is cleared; the target of a full resync takes the source's
//! `current`. A node whose volume holds nothing of its own (just created, or invalidated) has
//! `current` [`Generation::NONE`].
//!
//! A primary's first start on a volume gives it a fresh `current` (its data is what the pair
//! counts on: `start` names the side whose data counts). A target volume that is new or replaced
//! has none; the end of a full resync gives it the source's ([`GenIds::adopt`]). The source
//! decides each handshake with [`decide`] (`Source::on_hello`); `diverge` (a primary writing
//! without its peer) comes with the degraded start.

use crate::Generation;

/// A node's generation ids, as its metadata record keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GenIds {
    /// The history the volume holds now.
    pub current: Generation,
    /// The history the dirty bitmap counts from ([`Generation::NONE`]: no bitmap in use).
    pub bitmap: Generation,
    /// Earlier histories, newest first.
    pub history: [Generation; 2],
}

/// One side of a handshake, from the deciding node's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The node deciding.
    Local,
    /// Its peer.
    Peer,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Local => Side::Peer,
            Side::Peer => Side::Local,
        }
    }
}

/// What two nodes' generation ids mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The same history: only what the bitmaps record (a crash's dirty chunks) needs resyncing.
    InSync,
    /// Neither side holds data of its own (a new pair): the operator names the side whose data
    /// counts.
    NeedsInitialSource,
    /// `from` holds a later state of the other side's history: resync from it, only the chunks
    /// its bitmap records, or all of them (`full`) when no bitmap covers the difference.
    Resync {
        /// The side whose data counts.
        from: Side,
        /// Whether every chunk must be shipped.
        full: bool,
    },
    /// Both sides wrote since they last agreed: refuse and report; the operator chooses the side
    /// whose changes are discarded (issue 16).
    SplitBrain,
    /// No common history: the peer mirrors other data. Refuse.
    Unrelated,
}

impl Verdict {
    /// The same verdict seen from the peer.
    #[must_use]
    pub fn mirrored(self) -> Verdict {
        match self {
            Verdict::Resync { from, full } => Verdict::Resync {
                from: from.other(),
                full,
            },
            v => v,
        }
    }
}

impl std::fmt::Display for GenIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "current {} bitmap {} history {} {}",
            self.current, self.bitmap, self.history[0], self.history[1]
        )
    }
}

impl GenIds {
    /// No history at all.
    pub const NONE: GenIds = GenIds {
        current: Generation::NONE,
        bitmap: Generation::NONE,
        history: [Generation::NONE; 2],
    };

    /// Writes start that the peer will not see: the bitmap starts counting from the history the
    /// peer holds (unless it already counts from an earlier point), and the volume's history gets
    /// the fresh id `fresh`.
    pub fn diverge(&mut self, fresh: Generation) {
        if self.bitmap == Generation::NONE {
            self.bitmap = self.current;
        }
        self.current = fresh;
    }

    /// A resync from this node ended: the peer holds `current` too; the bitmap's history moves
    /// into `history`.
    pub fn resync_done(&mut self) {
        if self.bitmap != Generation::NONE {
            self.history = [self.bitmap, self.history[0]];
            self.bitmap = Generation::NONE;
        }
    }

    /// This node was the target of a full resync from a peer holding `peer`: it now holds the
    /// peer's history.
    pub fn adopt(&mut self, peer: &GenIds) {
        self.history = [self.current, self.history[0]];
        self.current = peer.current;
        self.bitmap = Generation::NONE;
    }

    fn knows(&self, id: Generation) -> bool {
        id != Generation::NONE && self.history.contains(&id)
    }
}

/// What the handshake of `local` with `peer` means (see the module docs and `docs/protocol.md`).
/// Symmetric: `decide(b, a)` is `decide(a, b).mirrored()`.
#[must_use]
pub fn decide(local: &GenIds, peer: &GenIds) -> Verdict {
    const NONE: Generation = Generation::NONE;
    let (l, p) = (local, peer);
    if l.current == NONE && p.current == NONE {
        return Verdict::NeedsInitialSource;
    }
    if l.current == p.current {
        return Verdict::InSync;
    }
    if l.current == NONE || p.current == NONE {
        let from = if l.current == NONE {
            Side::Peer
        } else {
            Side::Local
        };
        return Verdict::Resync { from, full: true };
    }
    // Moved on from where the other stands, with a bitmap since then.
    let l_ahead = l.bitmap != NONE && l.bitmap == p.current;
    let p_ahead = p.bitmap != NONE && p.bitmap == l.current;
    if let Some(v) = one_ahead(l_ahead, p_ahead, false) {
        return v;
    }
    if l.bitmap != NONE && l.bitmap == p.bitmap {
        return Verdict::SplitBrain;
    }
    // Ahead, but the bitmap no longer counts from the other's state.
    if let Some(v) = one_ahead(l.knows(p.current), p.knows(l.current), true) {
        return v;
    }
    // A common ancestor further back: both wrote since.
    let shared = [l.bitmap, l.history[0], l.history[1]]
        .into_iter()
        .filter(|id| *id != NONE)
        .any(|id| id == p.bitmap || p.knows(id));
    if shared {
        Verdict::SplitBrain
    } else {
        Verdict::Unrelated
    }
}

/// The verdict when exactly one side is ahead of the other (a resync from it), or when each
/// claims to be (a divergence: split brain); `None` when neither is.
fn one_ahead(local: bool, peer: bool, full: bool) -> Option<Verdict> {
    match (local, peer) {
        (true, false) => Some(Verdict::Resync {
            from: Side::Local,
            full,
        }),
        (false, true) => Some(Verdict::Resync {
            from: Side::Peer,
            full,
        }),
        (true, true) => Some(Verdict::SplitBrain),
        (false, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Generation = Generation(0xa);
    const B: Generation = Generation(0xb);
    const C: Generation = Generation(0xc);
    const D: Generation = Generation(0xd);

    fn ids(current: Generation) -> GenIds {
        GenIds {
            current,
            ..GenIds::default()
        }
    }

    /// The life of a pair, step by step, each handshake decided from both sides.
    #[test]
    fn a_pairs_life_reads_as_the_table_says() {
        let check = |l: &GenIds, p: &GenIds, want: Verdict| {
            assert_eq!(decide(l, p), want, "{l:?} vs {p:?}");
            assert_eq!(decide(p, l), want.mirrored(), "{p:?} vs {l:?}");
        };
        let (mut primary, mut secondary) = (GenIds::default(), GenIds::default());
        check(&primary, &secondary, Verdict::NeedsInitialSource);
        // The operator names the primary's data: it takes a history, the secondary is filled.
        primary.current = A;
        check(
            &primary,
            &secondary,
            Verdict::Resync {
                from: Side::Local,
                full: true,
            },
        );
        secondary.adopt(&primary);
        check(&primary, &secondary, Verdict::InSync);
        // The peer is lost; the primary writes on: only its bitmap's chunks go across.
        primary.diverge(B);
        check(
            &primary,
            &secondary,
            Verdict::Resync {
                from: Side::Local,
                full: false,
            },
        );
        // Another outage before the resync ended: the bitmap still counts from A.
        primary.diverge(C);
        assert_eq!(primary.bitmap, A);
        check(
            &primary,
            &secondary,
            Verdict::Resync {
                from: Side::Local,
                full: false,
            },
        );
        primary.resync_done();
        secondary.adopt(&primary);
        check(&primary, &secondary, Verdict::InSync);
        // Both write without the other (a promotion while disconnected): split brain.
        primary.diverge(D);
        secondary.diverge(Generation(0xe));
        check(&primary, &secondary, Verdict::SplitBrain);
        // A volume of other data.
        check(&primary, &ids(Generation(0x99)), Verdict::Unrelated);
        // A secondary that lost its data.
        check(
            &primary,
            &GenIds::default(),
            Verdict::Resync {
                from: Side::Local,
                full: true,
            },
        );
    }

    /// Ahead of the other's state, with the bitmap reset since (a later resync elsewhere): a
    /// full resync, never a partial one from a bitmap that does not cover the difference.
    #[test]
    fn a_history_without_its_bitmap_means_a_full_resync() {
        let l = GenIds {
            current: C,
            bitmap: Generation::NONE,
            history: [B, A],
        };
        assert_eq!(
            decide(&l, &ids(A)),
            Verdict::Resync {
                from: Side::Local,
                full: true
            }
        );
    }

    fn gen() -> impl Strategy<Value = Generation> {
        (0u64..5).prop_map(Generation)
    }

    fn genids() -> impl Strategy<Value = GenIds> {
        (gen(), gen(), gen(), gen()).prop_map(|(current, bitmap, h0, h1)| GenIds {
            current,
            bitmap,
            history: [h0, h1],
        })
    }

    proptest! {
        /// Either side reaches the same verdict about the pair.
        #[test]
        fn the_verdict_is_the_same_from_both_sides(a in genids(), b in genids()) {
            prop_assert_eq!(decide(&b, &a), decide(&a, &b).mirrored());
        }

        /// A node resynced from a peer that then wrote on without it is the source of a
        /// partial resync, never a target (its writes would be lost); equal ids are in sync.
        #[test]
        fn the_side_that_moved_on_is_the_source(a in genids(), fresh in 5u64..10) {
            let mut moved = GenIds::default();
            moved.adopt(&a);
            moved.diverge(Generation(fresh));
            if a.current != Generation::NONE {
                let v = decide(&moved, &a);
                prop_assert_eq!(v, Verdict::Resync { from: Side::Local, full: false });
            }
            prop_assert_eq!(decide(&a, &a), if a.current == Generation::NONE {
                Verdict::NeedsInitialSource
            } else {
                Verdict::InSync
            });
        }
    }
}
