//! What a restarted target trusts of its metadata.

use super::*;

/// What the target's driver recovered from its own durable state at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Last sequence number applied and durable.
    pub durable: Seq,
    /// Whether the previous run stopped cleanly (all applied writes synced). After an unclean stop
    /// the volume may hold part of a batch past `durable`, so it is inconsistent until the source's
    /// resend has been applied.
    pub clean: bool,
    /// Whether the volume's data may be taken as a prefix of the mirror's writes (after the
    /// resend an unclean stop needs). If not (a volume without a record, or one whose record says
    /// so), no resend makes it consistent: only a full resync will, and every record the target
    /// writes keeps saying so.
    pub consistent: bool,
    /// Whether a resync bracket was applied in part ([`MetaRecord::resyncing`]): not consistent
    /// until a resync's end is durable.
    pub resyncing: bool,
    /// Whether that bracket is a full resync ([`MetaRecord::resync_full`]).
    pub resync_full: bool,
    /// The histories its data holds (none for a volume without a record: a primary copies
    /// into it in full).
    pub gen_ids: GenIds,
}

impl Restored {
    /// A volume just created full of zeroes: nothing durable, stopped cleanly, consistent (a
    /// prefix of any mirror's writes: the empty one), and of no history yet.
    pub const FRESH: Restored = Restored {
        durable: Seq::NONE,
        clean: true,
        consistent: true,
        resyncing: false,
        resync_full: false,
        gen_ids: GenIds::NONE,
    };
}

/// How a restarted target came to its [`Restored`] state (for the driver's log: the state
/// itself says what is trusted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryKind {
    /// From its metadata record.
    Resumed,
    /// A volume the driver just created full of zeroes, with no metadata: consistent at seq 0.
    Fresh,
    /// An existing volume without a record (new to the mirror, or replaced): its content is
    /// unknown, so it is initialised at seq 0 as not consistent. The driver should say so.
    Adopted,
    /// A record of this volume that says its data is not known to be consistent (an adopted
    /// volume, restarted): still not consistent.
    Unverified,
}

/// Why a target must not start on this volume and metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// The record does not describe this volume.
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// The metadata is a primary's; a target does not take over a primary's state.
    #[error("it was written by a primary (node {})", .0.0)]
    Primary(NodeId),
}

/// Deliberate bugs of [`recover_with`] for tests that prove the simulator's checkers bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoverySabotage {
    /// Behave correctly.
    #[default]
    None,
    /// Trust a record of an unclean stop as if the stop had been clean.
    TrustUnclean,
    /// Trust the data of an existing volume without a record (a replaced volume) as consistent.
    TrustAdopted,
}

/// What a restarted target trusts: its metadata record if it has one that describes this volume
/// (durable seq, and whether the last run stopped cleanly: if not, the volume may hold part of a
/// batch past the durable seq and is inconsistent until the source's resend is applied), nothing
/// at all for a new volume, and never the data of a volume without a record (or whose record says
/// it is not consistent). [`Target::new`] acts on the [`Restored`] state; the [`RecoveryKind`]
/// says how it came about.
pub fn recover(
    record: Option<&MetaRecord>,
    facts: &VolumeFacts,
) -> Result<(Restored, RecoveryKind), RecoverError> {
    recover_with(record, facts, RecoverySabotage::None)
}

/// [`recover`], broken on purpose when `sabotage` says so (tests only).
pub fn recover_with(
    record: Option<&MetaRecord>,
    facts: &VolumeFacts,
    sabotage: RecoverySabotage,
) -> Result<(Restored, RecoveryKind), RecoverError> {
    let Some(record) = record else {
        if facts.created {
            return Ok((Restored::FRESH, RecoveryKind::Fresh));
        }
        let trusted = sabotage == RecoverySabotage::TrustAdopted;
        let restored = Restored {
            durable: Seq::NONE,
            clean: trusted,
            consistent: trusted,
            resyncing: false,
            resync_full: false,
            gen_ids: GenIds::NONE,
        };
        return Ok((restored, RecoveryKind::Adopted));
    };
    record.check_binding(facts)?;
    if record.role == Role::Primary {
        return Err(RecoverError::Primary(record.node_id));
    }
    let restored = Restored {
        durable: record.durable,
        clean: record.clean || sabotage == RecoverySabotage::TrustUnclean,
        consistent: record.consistent,
        resyncing: record.resyncing,
        resync_full: record.resyncing && record.resync_full,
        gen_ids: record.gen_ids,
    };
    let kind = if record.consistent {
        RecoveryKind::Resumed
    } else {
        RecoveryKind::Unverified
    };
    Ok((restored, kind))
}

/// The record a target keeps while it runs, from the record it loaded (if any: its generation and
/// bitmap location are kept) and what [`recover`] trusted of it: this node's, a secondary's, not
/// clean until a graceful stop says otherwise, and not consistent while the data is not trusted.
#[must_use]
pub fn running_record(
    loaded: Option<&MetaRecord>,
    facts: &VolumeFacts,
    node_id: NodeId,
    restored: Restored,
) -> MetaRecord {
    MetaRecord {
        consistent: restored.consistent,
        resyncing: restored.resyncing,
        resync_full: restored.resync_full,
        gen_ids: restored.gen_ids,
        ..MetaRecord::running(loaded, facts, node_id, Role::Secondary, restored.durable)
    }
}
