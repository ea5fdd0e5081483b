//! What a restarted primary trusts of its metadata record.
//!
//! A primary records where its peer stands: at start, "not clean" with the seq its engine
//! continues after; at a clean stop, once the drain ended with the peer holding everything, "clean"
//! with the last seq. Such a record lets a restart continue the sequence: the peer holds every
//! write through it and nothing after it exists. After any other stop (a crash, a drain that
//! timed out) local writes may be missing on the peer; the write intent stored before each of
//! them reached the local volume ([`super::WriteIntent`]) says which chunks hold them. The
//! restart then continues the sequence after the peer's and resyncs those chunks first
//! ([`super::PeerLink::restarted`]); without a stored intent it is refused.

use crate::bitmap::DirtyBitmap;
use crate::genid::GenIds;
use crate::meta::{BindingError, MetaRecord, Role, VolumeFacts};
use crate::{Generation, NodeId, Seq};

/// What a restarted primary continues from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryRestored {
    /// The peer holds every operation through this seq durably, and no later one exists: the
    /// engine's sequence continues after it.
    pub confirmed: Seq,
    /// How the primary came to it.
    pub kind: PrimaryStart,
    /// The record said the peer is outdated (writes recorded out of sync) and the restart
    /// resyncs: it stays outdated until that resync's end is durable.
    pub peer_outdated: bool,
}

/// How a primary's start came to its [`PrimaryRestored`] state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryStart {
    /// A volume just created, or one without a record: the sequence starts at 1. Its data is
    /// not known to be on the peer: a peer without its history is copied in full.
    First,
    /// The record of a clean stop.
    Resumed,
    /// The record of a run that did not stop cleanly, and its stored write intent: the
    /// sequence continues after the peer's and the chunks the intent marks are resynced.
    Crashed,
    /// The operator's `--new-sequence`: nothing of the record is trusted and the sequence starts
    /// at 1 against a new target ([`new_sequence`]).
    NewSequence,
}

/// Why a primary must not start on this volume and record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrimaryRecoverError {
    /// The last run did not stop cleanly.
    #[error(
        "the last run did not stop cleanly (a crash, or a stop before the target held every \
         write): writes after seq {durable} may be missing on the target and no stored write \
         intent records which: start again with --new-sequence against a new target volume \
         (see docs/operations.md, \"after an unclean stop\")"
    )]
    Unclean {
        /// What the peer was known to hold.
        durable: Seq,
    },
    /// The record does not describe this volume.
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// The stored write intent does not map this volume.
    #[error(
        "the stored write intent maps {chunks} chunks of {chunk_bytes} bytes, not this volume of \
         {volume_bytes} bytes"
    )]
    IntentGeometry {
        /// Its chunks.
        chunks: u64,
        /// Its chunk size.
        chunk_bytes: u64,
        /// The volume's size.
        volume_bytes: u64,
    },
    /// The metadata is a secondary's: roles change with issue 16's verbs, not by a restart.
    #[error("it was written by a secondary (node {}): it holds a copy, not the primary's data", .0.0)]
    Secondary(NodeId),
}

/// Deliberate bugs of [`recover_primary_with`] for tests that prove the simulator's checkers
/// bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrimaryRecoverySabotage {
    /// Behave correctly.
    #[default]
    None,
    /// Trust the record of an unclean stop as if the stop had been clean.
    TrustUnclean,
}

/// What a restarted primary trusts of this volume's record and its stored write intent
/// (`intent`, if the driver keeps one): see the module docs.
pub fn recover_primary(
    record: Option<&MetaRecord>,
    intent: Option<&DirtyBitmap>,
    facts: &VolumeFacts,
) -> Result<PrimaryRestored, PrimaryRecoverError> {
    recover_primary_with(record, intent, facts, PrimaryRecoverySabotage::None)
}

/// [`recover_primary`], broken on purpose when `sabotage` says so (tests only).
pub fn recover_primary_with(
    record: Option<&MetaRecord>,
    intent: Option<&DirtyBitmap>,
    facts: &VolumeFacts,
    sabotage: PrimaryRecoverySabotage,
) -> Result<PrimaryRestored, PrimaryRecoverError> {
    let Some(record) = record else {
        return Ok(PrimaryRestored {
            confirmed: Seq::NONE,
            kind: PrimaryStart::First,
            peer_outdated: false,
        });
    };
    record.check_binding(facts)?;
    if record.role == Role::Secondary {
        return Err(PrimaryRecoverError::Secondary(record.node_id));
    }
    if !record.clean && sabotage != PrimaryRecoverySabotage::TrustUnclean {
        let Some(intent) = intent else {
            return Err(PrimaryRecoverError::Unclean {
                durable: record.durable,
            });
        };
        if intent.chunks() != facts.volume_bytes.div_ceil(intent.chunk_bytes()) {
            return Err(PrimaryRecoverError::IntentGeometry {
                chunks: intent.chunks(),
                chunk_bytes: intent.chunk_bytes(),
                volume_bytes: facts.volume_bytes,
            });
        }
        return Ok(PrimaryRestored {
            confirmed: record.durable,
            kind: PrimaryStart::Crashed,
            peer_outdated: record.peer_outdated,
        });
    }
    Ok(PrimaryRestored {
        confirmed: record.durable,
        kind: PrimaryStart::Resumed,
        peer_outdated: false,
    })
}

/// The operator's way out after an unclean stop without a stored write intent: trust nothing of
/// the record; the volume takes a new history ([`running_primary_record`]), so a target holding
/// the old one is refused as unrelated and only a new target accepts it (copied in full).
#[must_use]
pub fn new_sequence() -> PrimaryRestored {
    PrimaryRestored {
        confirmed: Seq::NONE,
        kind: PrimaryStart::NewSequence,
        peer_outdated: false,
    }
}

/// The record a primary keeps while it runs: the loaded one (its generation ids and bitmap
/// location kept) or a new one, this node's, not clean until a clean stop says otherwise. A
/// volume without a history of its own (a first start, `--new-sequence`, a record from before
/// generation ids) takes `fresh` as its current id: the primary's data is what the pair counts
/// on, and a peer that holds none of it is copied in full.
#[must_use]
pub fn running_primary_record(
    loaded: Option<&MetaRecord>,
    facts: &VolumeFacts,
    node_id: NodeId,
    restored: PrimaryRestored,
    fresh: Generation,
) -> MetaRecord {
    let loaded = loaded.filter(|_| restored.kind != PrimaryStart::NewSequence);
    let mut record = MetaRecord::running(loaded, facts, node_id, Role::Primary, restored.confirmed);
    if record.gen_ids.current == Generation::NONE {
        record.gen_ids = GenIds {
            current: fresh,
            ..GenIds::default()
        };
    }
    record
}
