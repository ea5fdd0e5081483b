//! The primary's per-peer policy, driven against a real target engine.

use bytes::Bytes;

use super::*;
use crate::genid::{GenIds, Side, Verdict};
use crate::session::SessionConfig;
use crate::source::SourceConfig;
use crate::target::ConnId;
use crate::testkit::{self, source_config, FRESH, PAIR_IDS, VOLUME_BYTES, VOLUME_ID};
use crate::wire::{decode, Op, RefuseReason, ResyncMark};
use crate::{Generation, Lba, NodeId, Range};

const C: ConnId = ConnId(1);
const MS: u64 = 1_000_000;

fn link(mode: Mode, log_entries_max: usize) -> PeerLink {
    PeerLink::new(Source::new(config(mode, log_entries_max)), session(3))
}

fn config(mode: Mode, log_entries_max: usize) -> SourceConfig {
    let mut cfg = source_config(mode, 1, log_entries_max);
    cfg.log_bytes_max = 64 << 10;
    cfg
}

fn session(jitter_seed: u64) -> SourceSession {
    SourceSession::new(
        SessionConfig {
            backoff_min_ns: 50 * MS,
            backoff_max_ns: 1_000 * MS,
            ping_interval_ns: 2_000 * MS,
            idle_timeout_ns: 20_000 * MS,
        },
        jitter_seed,
        0,
    )
}

fn target() -> Target {
    testkit::target(FRESH)
}

fn write(block: u64) -> SummedOp {
    SummedOp::new(Op::Write {
        lba: Lba(8 * block),
        data: Bytes::from(vec![0x5a; 4096]),
    })
}

/// Frames both ways through the codec; the target applies and syncs everything at once.
fn exchange(link: &mut PeerLink, target: &mut Target) -> Result<(), CloseConn> {
    for _ in 0..32 {
        let mut moved = false;
        while let Some(frame) = link.poll_transmit(1) {
            let bytes = frame.encode().to_vec();
            let (frame, _) = decode(&bytes).unwrap().unwrap();
            target.handle_frame(C, frame, 0).unwrap();
            moved = true;
        }
        while let Some(apply) = target.poll_apply() {
            target.handle_applied(apply.seq);
            target.handle_durable(apply.seq);
            moved = true;
        }
        while let Some(frame) = target.poll_transmit(C) {
            link.handle_frame(frame, 1)?;
            moved = true;
        }
        if !moved {
            break;
        }
    }
    Ok(())
}

/// The link's one request to store the running record, at its first handshake.
fn record(durable: Seq) -> PeerEvent {
    PeerEvent::RecordRunning {
        durable,
        rebased: None,
    }
}

fn events(link: &mut PeerLink) -> Vec<PeerEvent> {
    std::iter::from_fn(|| link.poll_event()).collect()
}

fn connected(mode: Mode, log_entries_max: usize) -> (PeerLink, Target) {
    connect(link(mode, log_entries_max))
}

/// `l` after its first handshake with a fresh target.
fn connect(mut l: PeerLink) -> (PeerLink, Target) {
    let mut t = target();
    assert_eq!(l.handle_timeout(0), Some(SessionAction::Connect));
    l.on_connecting();
    t.on_connect(C, [1; MAC_BYTES], 0).unwrap();
    l.on_connected([2; MAC_BYTES], 0);
    exchange(&mut l, &mut t).unwrap();
    assert_eq!(
        events(&mut l),
        vec![record(Seq::NONE), PeerEvent::Connected]
    );
    (l, t)
}

/// A full log parks one submission (the driver stops offering more), which enters the log, in
/// order, once the target made room; "durable through N" is reported once per advance.
#[test]
fn a_full_log_parks_one_submission_until_the_target_makes_room() {
    let mut l = link(Mode::Sync, 2);
    assert_eq!(l.submit(1, write(0), 0), Ok(Submitted::Accepted(Seq(1))));
    assert_eq!(l.submit(2, write(1), 0), Ok(Submitted::Accepted(Seq(2))));
    assert_eq!(l.submit(3, write(2), 7), Ok(Submitted::Parked));
    assert!(l.is_parked());
    assert_eq!(l.submit(4, write(3), 0), Err(SubmitError::AlreadyParked));
    assert_eq!(events(&mut l), vec![], "nothing moves while disconnected");
    assert_eq!(l.check_replicated(Seq(2)), Ok(false));
    assert_eq!(
        l.check_replicated(Seq(3)),
        Err(WaitError::NeverSubmitted(Seq(3)))
    );

    let mut t = target();
    l.handle_timeout(0);
    l.on_connecting();
    t.on_connect(C, [1; MAC_BYTES], 0).unwrap();
    l.on_connected([2; MAC_BYTES], 0);
    exchange(&mut l, &mut t).unwrap();
    assert_eq!(
        events(&mut l),
        vec![
            PeerEvent::Accepted {
                token: 3,
                seq: Seq(3)
            },
            PeerEvent::Completed(Seq(1)),
            PeerEvent::Completed(Seq(2)),
            PeerEvent::Durable(Seq(2)),
            record(Seq(2)),
            PeerEvent::Connected,
        ]
    );
    assert!(!l.is_parked());
    assert_eq!(l.check_replicated(Seq(2)), Ok(true));
    // Its age counts from when the host submitted it, not from when it found room.
    assert_eq!(l.source().status().oldest_unconfirmed_ns, Some(7));
    exchange(&mut l, &mut t).unwrap();
    assert_eq!(
        events(&mut l),
        vec![PeerEvent::Completed(Seq(3)), PeerEvent::Durable(Seq(3))]
    );
}

/// A refusal no reconnect can cure stops the link: one `Stopped` event, the parked submission
/// dropped, later submissions and waits refused, no reconnect, no fast path.
#[test]
fn a_fatal_error_stops_everything_once() {
    let (mut l, _t) = connected(Mode::Async, 1);
    assert!(l.acks_on_submit());
    assert_eq!(l.submit(1, write(0), 0), Ok(Submitted::Accepted(Seq(1))));
    assert_eq!(l.submit(2, write(1), 0), Ok(Submitted::Parked));
    assert_eq!(events(&mut l), vec![PeerEvent::Completed(Seq(1))]);
    let close = l
        .handle_frame(
            Frame::Refuse {
                reason: RefuseReason::WrongVolume,
            },
            5,
        )
        .unwrap_err();
    assert!(close.fatal, "{close}");
    let stopped = SourceError::Refused(RefuseReason::WrongVolume);
    assert_eq!(events(&mut l), vec![PeerEvent::Stopped(stopped.clone())]);
    assert!(!l.is_parked());
    assert!(!l.acks_on_submit());
    assert_eq!(
        l.submit(3, write(2), 6),
        Err(SubmitError::Stopped(stopped.clone()))
    );
    assert_eq!(l.check_replicated(Seq(1)), Err(WaitError::Stopped(stopped)));
    assert_eq!(l.poll_timeout(), None, "never reconnects");
    assert_eq!(l.status().disconnects, 1);
}

/// A busy target or a broken frame closes the connection and schedules a reconnect; the log is
/// resent after the next handshake, and nothing the host waits for fails.
#[test]
fn a_retryable_error_reconnects_after_the_backoff() {
    let (mut l, _t) = connected(Mode::Sync, 4);
    assert_eq!(l.submit(1, write(0), 0), Ok(Submitted::Accepted(Seq(1))));
    let close = l
        .handle_frame(
            Frame::Refuse {
                reason: RefuseReason::Busy,
            },
            10 * MS,
        )
        .unwrap_err();
    assert!(!close.fatal);
    assert_eq!(events(&mut l), vec![]);
    let at = l.poll_timeout().expect("a reconnect is scheduled");
    assert!(
        (60 * MS..=10 * MS + 50 * MS + 50 * MS / 4).contains(&at),
        "{at}"
    );
    assert_eq!(l.handle_timeout(at), Some(SessionAction::Connect));
    let mut t = target();
    l.on_connecting();
    t.on_connect(C, [1; MAC_BYTES], at).unwrap();
    l.on_connected([3; MAC_BYTES], at);
    exchange(&mut l, &mut t).unwrap();
    assert_eq!(
        events(&mut l),
        vec![
            PeerEvent::Completed(Seq(1)),
            PeerEvent::Durable(Seq(1)),
            PeerEvent::Connected
        ]
    );
    assert_eq!(l.status().connects, 2);
}

/// A start that must find its peer: replication stops once the deadline passes without a
/// handshake, and a handshake before it lifts the deadline.
#[test]
fn a_start_without_a_handshake_by_its_deadline_stops() {
    let mut l = link(Mode::Sync, 4);
    l.set_connect_deadline(0, 3_000 * MS);
    assert_eq!(l.handle_timeout(0), Some(SessionAction::Connect));
    l.on_connecting();
    l.on_lost(MS);
    let mut now = MS;
    while let Some(at) = l.poll_timeout() {
        assert!(at <= 3_000 * MS, "nothing is due after the deadline: {at}");
        now = at;
        if l.handle_timeout(at) == Some(SessionAction::Connect) {
            l.on_connecting();
            l.on_lost(at);
        }
    }
    assert_eq!(now, 3_000 * MS);
    assert_eq!(
        events(&mut l),
        vec![PeerEvent::Stopped(SourceError::Unreachable { secs: 3 })]
    );

    let mut l = link(Mode::Sync, 4);
    l.set_connect_deadline(0, 3_000 * MS);
    let mut t = target();
    assert_eq!(l.handle_timeout(0), Some(SessionAction::Connect));
    l.on_connecting();
    t.on_connect(C, [1; MAC_BYTES], 0).unwrap();
    l.on_connected([2; MAC_BYTES], 0);
    exchange(&mut l, &mut t).unwrap();
    assert_eq!(
        events(&mut l),
        vec![record(Seq::NONE), PeerEvent::Connected]
    );
    l.handle_timeout(3_000 * MS);
    assert_eq!(events(&mut l), vec![]);
    assert_eq!(l.fatal(), None);
}

/// A stop drains: "drained" once the peer holds everything submitted before it durably, or the
/// limit's error with what the peer holds.
#[test]
fn a_drain_ends_when_the_peer_holds_everything_or_at_its_limit() {
    let (mut l, mut t) = connected(Mode::Async, 4);
    assert_eq!(l.submit(1, write(0), 0), Ok(Submitted::Accepted(Seq(1))));
    assert_eq!(l.submit(2, write(1), 0), Ok(Submitted::Accepted(Seq(2))));
    assert_eq!(
        events(&mut l),
        vec![PeerEvent::Completed(Seq(1)), PeerEvent::Completed(Seq(2))]
    );
    l.begin_drain(0, 1_000 * MS);
    assert_eq!(
        events(&mut l),
        vec![],
        "async completions are not durability"
    );
    exchange(&mut l, &mut t).unwrap();
    assert_eq!(
        events(&mut l),
        vec![PeerEvent::Durable(Seq(2)), PeerEvent::Drained(Ok(Seq(2)))]
    );

    let mut l = link(Mode::Async, 4);
    assert_eq!(l.submit(1, write(0), 0), Ok(Submitted::Accepted(Seq(1))));
    l.begin_drain(5 * MS, 2_000 * MS);
    assert_eq!(
        l.poll_timeout(),
        Some(0),
        "the session's first connect comes first"
    );
    l.handle_timeout(0);
    l.on_connecting();
    l.on_lost(MS);
    events(&mut l);
    while let Some(at) = l.poll_timeout().filter(|&at| at < 2_005 * MS) {
        if l.handle_timeout(at) == Some(SessionAction::Connect) {
            l.on_connecting();
            l.on_lost(at);
        }
    }
    l.handle_timeout(2_005 * MS);
    assert_eq!(
        events(&mut l),
        vec![PeerEvent::Drained(Err(DrainError::TimedOut {
            through: Seq(1),
            durable: Seq::NONE,
            limit_secs: 2
        }))]
    );
}

/// An operation the log could never hold is refused at once instead of parking forever.
#[test]
fn an_operation_larger_than_the_log_is_refused() {
    let mut l = link(Mode::Async, 4);
    let big = SummedOp::new(Op::Write {
        lba: Lba(0),
        data: Bytes::from(vec![0; 128 << 10]),
    });
    assert!(matches!(
        l.submit(1, big, 0),
        Err(SubmitError::Invalid(SourceError::NeverFits { .. }))
    ));
    assert!(!l.is_parked());
}

/// The node's record follows what the secondary made durable; its role is its engines' type.
#[test]
fn a_secondary_node_records_its_durable_seq() {
    let meta = MetaRecord::new(VolumeId([7; 16]), VOLUME_BYTES);
    let mut node = Node::secondary(meta, target());
    assert_eq!(node.role(), Role::Secondary);
    let rec = node.record(Seq(5), false);
    assert_eq!(
        (rec.durable, rec.clean, rec.role),
        (Seq(5), false, Role::Secondary)
    );
    assert_eq!(node.meta().durable, Seq(5));
    let primary = Node::primary(meta, PeerId(0), link(Mode::Sync, 4));
    assert_eq!(
        (primary.role(), primary.meta().role),
        (Role::Primary, Role::Primary)
    );
    assert!(primary.engines().contains_key(&PeerId(0)));
}

/// What a restarted primary trusts: the record of a clean stop of this volume, or of an unclean
/// one with its stored write intent; a first start begins at seq 1; an unclean stop without an
/// intent (or with one of another geometry), another volume, another size or a secondary's record
/// is refused.
#[test]
fn a_primary_resumes_only_from_the_record_of_a_clean_stop() {
    use crate::meta::{BindingError, VolumeFacts};
    let facts = VolumeFacts {
        volume_id: VOLUME_ID,
        volume_bytes: VOLUME_BYTES,
        created: false,
    };
    let first = recover_primary(None, None, &facts).unwrap();
    assert_eq!(
        first,
        PrimaryRestored {
            confirmed: Seq::NONE,
            kind: PrimaryStart::First,
            peer_outdated: false
        }
    );
    let running = running_primary_record(None, &facts, NodeId(1), first, PAIR_IDS.current);
    assert_eq!(
        (running.role, running.clean, running.durable),
        (Role::Primary, false, Seq::NONE)
    );
    assert_eq!(
        recover_primary(Some(&running), None, &facts),
        Err(PrimaryRecoverError::Unclean { durable: Seq::NONE }),
        "a crash right after the start"
    );
    let clean = MetaRecord {
        durable: Seq(40),
        clean: true,
        ..running
    };
    assert_eq!(
        recover_primary(Some(&clean), None, &facts),
        Ok(PrimaryRestored {
            confirmed: Seq(40),
            kind: PrimaryStart::Resumed,
            peer_outdated: false
        })
    );
    let unclean = MetaRecord {
        clean: false,
        ..clean
    };
    assert_eq!(
        recover_primary_with(
            Some(&unclean),
            None,
            &facts,
            PrimaryRecoverySabotage::TrustUnclean
        )
        .map(|r| r.confirmed),
        Ok(Seq(40))
    );
    // With its stored write intent, an unclean stop restarts as a crash: the sequence continues
    // after the peer's and the intent's chunks are resynced.
    let intent = crate::bitmap::DirtyBitmap::new(VOLUME_BYTES, 64 << 10).unwrap();
    assert_eq!(
        recover_primary(Some(&unclean), Some(&intent), &facts),
        Ok(PrimaryRestored {
            confirmed: Seq(40),
            kind: PrimaryStart::Crashed,
            peer_outdated: false
        })
    );
    let other_geometry = crate::bitmap::DirtyBitmap::new(VOLUME_BYTES * 2, 64 << 10).unwrap();
    assert!(matches!(
        recover_primary(Some(&unclean), Some(&other_geometry), &facts),
        Err(PrimaryRecoverError::IntentGeometry { .. })
    ));
    let secondary = MetaRecord {
        role: Role::Secondary,
        ..clean
    };
    assert!(matches!(
        recover_primary(Some(&secondary), None, &facts),
        Err(PrimaryRecoverError::Secondary(_))
    ));
    let other = MetaRecord {
        volume_id: VolumeId([9; 16]),
        ..clean
    };
    assert!(matches!(
        recover_primary(Some(&other), None, &facts),
        Err(PrimaryRecoverError::Binding(
            BindingError::OtherVolume { .. }
        ))
    ));
    let created = VolumeFacts {
        created: true,
        ..facts
    };
    assert_eq!(
        recover_primary(Some(&clean), None, &created),
        Err(PrimaryRecoverError::Binding(
            BindingError::MetaOfEarlierVolume
        ))
    );
}

/// A primary restarted after a crash: host operations wait until its resync is in the log; the
/// resync starts once the target admitted the session (the sequence continues after the
/// target's), copies the stored intent's chunks in pieces between two marks, and completes
/// nothing to the host.
#[test]
fn a_restarted_primary_resyncs_its_stored_intent_before_host_operations() {
    const CHUNK: u64 = 16 << 10;
    let (mut old, mut t) = connected(Mode::Sync, 64);
    for block in 0..3 {
        old.submit(block, write(block), 1).unwrap();
    }
    exchange(&mut old, &mut t).unwrap();
    let held = t.status().durable;
    assert_eq!(held, Seq(3));
    // The old process dies; its intent as stored marks chunks 0 and 2.
    let mut stored = crate::bitmap::DirtyBitmap::new(VOLUME_BYTES, CHUNK).unwrap();
    stored.mark(Range::new(0, 4096));
    stored.mark(Range::new(2 * CHUNK + 512, 512));
    let source = Source::with_log(config(Mode::Sync, 64), MemLog::new(), Seq::NONE);
    let restored = PrimaryRestored {
        confirmed: Seq::NONE,
        kind: PrimaryStart::Crashed,
        peer_outdated: false,
    };
    let mut l = PeerLink::restarted(source, session(4), restored, stored);
    l.set_resync_piece_bytes_max(8192);
    assert!(!l.takes_host_ops());
    assert_eq!(l.submit(9, write(9), 1), Err(SubmitError::Resyncing));
    assert_eq!(l.poll_resync(0), None, "not before the target admitted it");
    assert_eq!(l.handle_timeout(0), Some(SessionAction::Connect));
    l.on_connecting();
    t.on_disconnect(C);
    t.on_connect(C, [5; MAC_BYTES], 0).unwrap();
    l.on_connected([6; MAC_BYTES], 0);
    exchange(&mut l, &mut t).unwrap();
    assert_eq!(
        events(&mut l),
        vec![PeerEvent::Durable(held), record(held), PeerEvent::Connected]
    );
    // The copies to come carry acked writes the peer lacks: every write so far is on the peer
    // only after them.
    assert_eq!(l.everything_so_far(), held.next());
    assert_eq!(l.check_replicated(held.next()), Ok(false));
    let mut steps = Vec::new();
    while let Some(step) = l.poll_resync(0) {
        let op = match step {
            ResyncStep::Mark(mark) => Op::Resync(mark),
            ResyncStep::Copy(range) => Op::Write {
                lba: Lba::from_bytes(range.offset_bytes),
                data: Bytes::from(vec![0x11; usize::try_from(range.len_bytes).unwrap()]),
            },
        };
        assert!(matches!(
            l.resync_submit(SummedOp::new(op), 1),
            Ok(Submitted::Accepted(_))
        ));
        steps.push(step);
        if steps.len() == 2 {
            // The begin and a copy are durable there, the volume as of the restart is not.
            exchange(&mut l, &mut t).unwrap();
            assert_eq!(t.status().durable, Seq(held.0 + 2));
            assert_eq!(events(&mut l), vec![]);
            assert_eq!(l.replicated(), held);
            assert_eq!(l.check_replicated(Seq(held.0 + 2)), Ok(false));
        }
    }
    let copy = |at, len| ResyncStep::Copy(Range::new(at, len));
    assert_eq!(
        steps,
        vec![
            ResyncStep::Mark(crate::wire::ResyncMark::Begin { full: false }),
            copy(0, 8192),
            copy(8192, 8192),
            copy(2 * CHUNK, 8192),
            copy(2 * CHUNK + 8192, 8192),
            ResyncStep::Mark(crate::wire::ResyncMark::End),
        ]
    );
    assert_eq!(l.source().status().last_local, Seq(held.0 + 6));
    let under_way = l.status().resync.expect("a resync under way");
    assert_eq!(
        (
            under_way.total_bytes,
            under_way.submitted_bytes,
            under_way.durable_bytes
        ),
        (4 * 8192, 4 * 8192, 8192),
        "the first copy is durable"
    );
    assert_eq!(l.status().intent.stored_chunks, 2);
    assert!(l.takes_host_ops());
    assert_eq!(
        l.submit(10, write(10), 1),
        Ok(Submitted::Accepted(Seq(held.0 + 7)))
    );
    exchange(&mut l, &mut t).unwrap();
    assert_eq!(
        events(&mut l),
        vec![
            PeerEvent::Completed(Seq(held.0 + 7)),
            PeerEvent::Durable(Seq(held.0 + 7))
        ],
        "the resync completes nothing to the host"
    );
    assert!(t.status().consistent);
    assert_eq!(l.status().resync, None, "over once its end is durable");
}

/// Opens a connection of `link` to `target` on [`C`] (at the link's next connect time) and
/// runs the handshake and everything after it.
fn reconnect(link: &mut PeerLink, target: &mut Target, nonce: u8) -> Result<(), CloseConn> {
    let at = link.poll_timeout().unwrap_or(0);
    assert_eq!(link.handle_timeout(at), Some(SessionAction::Connect));
    open(link, target, nonce)
}

/// The connection the link asked for ([`SessionAction::Connect`]) opens to `target`.
fn open(link: &mut PeerLink, target: &mut Target, nonce: u8) -> Result<(), CloseConn> {
    link.on_connecting();
    target.on_disconnect(C);
    target.on_connect(C, [nonce; MAC_BYTES], 0).unwrap();
    link.on_connected([nonce + 1; MAC_BYTES], 0);
    exchange(link, target)
}

/// Carries out every resync step the link hands out with `byte` as the local volume's data,
/// moving frames to `target` whenever the log is full; returns the steps.
fn run_resync(link: &mut PeerLink, target: &mut Target, byte: u8) -> Vec<ResyncStep> {
    let mut steps = Vec::new();
    for _ in 0..10_000 {
        let before = steps.len();
        while let Some(step) = link.poll_resync(0) {
            let op = match step {
                ResyncStep::Mark(mark) => Op::Resync(mark),
                ResyncStep::Copy(range) => ResyncStep::copy_op(
                    range,
                    Bytes::from(vec![byte; usize::try_from(range.len_bytes).unwrap()]),
                ),
            };
            assert!(link.resync_submit(SummedOp::new(op), 1).is_ok());
            steps.push(step);
        }
        exchange(link, target).unwrap();
        while link.poll_event().is_some() {}
        if steps.len() == before && !link.is_parked() {
            return steps;
        }
    }
    panic!("the resync did not end");
}

/// `steps` are one full resync: a full begin, every byte of the volume copied once, an end.
fn assert_one_full_copy(steps: &[ResyncStep]) {
    assert_eq!(
        steps.first(),
        Some(&ResyncStep::Mark(ResyncMark::Begin { full: true }))
    );
    assert_eq!(steps.last(), Some(&ResyncStep::Mark(ResyncMark::End)));
    let copied: u64 = steps
        .iter()
        .map(|s| match s {
            ResyncStep::Copy(r) => r.len_bytes,
            ResyncStep::Mark(_) => 0,
        })
        .sum();
    assert_eq!(copied, VOLUME_BYTES, "every chunk once");
}

/// Issue 14, items 3 and 5: a primary whose target holds none of its history (a new or
/// replaced volume: no generation ids) announces a full resync at a second handshake, continues
/// its sequence after the target's (here below what its clean stop recorded), tells the driver
/// to record that, copies every chunk before host operations, and the target then holds its
/// history and is consistent.
#[test]
fn a_target_without_our_history_is_copied_in_full_before_host_operations() {
    let source = Source::with_log(config(Mode::Sync, 64), MemLog::new(), Seq(40));
    let restored = PrimaryRestored {
        confirmed: Seq(40),
        kind: PrimaryStart::Resumed,
        peer_outdated: false,
    };
    let clean = crate::bitmap::DirtyBitmap::new(VOLUME_BYTES, 256 << 10).unwrap();
    let mut l = PeerLink::restarted(source, session(5), restored, clean);
    let mut t = testkit::target(crate::target::Restored::FRESH);
    assert_eq!(t.gen_ids(), GenIds::NONE);
    let first = reconnect(&mut l, &mut t, 1).unwrap_err();
    assert!(
        matches!(first.error, SourceError::FullResyncFollows { .. }) && !first.fatal,
        "{first:?}"
    );
    assert!(
        l.takes_host_ops(),
        "nothing is decided before the second handshake"
    );
    reconnect(&mut l, &mut t, 3).unwrap();
    assert_eq!(
        events(&mut l),
        vec![
            PeerEvent::RecordRunning {
                durable: Seq::NONE,
                rebased: Some(Seq(1))
            },
            PeerEvent::Connected
        ]
    );
    assert!(!l.takes_host_ops());
    assert_eq!(l.submit(1, write(1), 1), Err(SubmitError::Resyncing));
    let status = l.status().resync.expect("a resync under way");
    assert!(status.full);
    assert_eq!(status.total_bytes, VOLUME_BYTES);
    let steps = run_resync(&mut l, &mut t, 0x42);
    assert_one_full_copy(&steps);
    assert!(t.status().consistent);
    assert_eq!(
        t.gen_ids(),
        PAIR_IDS,
        "the end gives the target our history"
    );
    assert_eq!(t.status().durable, Seq(u64::try_from(steps.len()).unwrap()));
    assert_eq!(t.data_state(), (true, false));
    assert!(l.takes_host_ops());
    assert_eq!(l.status().resync, None);
    // The next handshake finds the same history: no resync.
    l.on_lost(1);
    reconnect(&mut l, &mut t, 5).unwrap();
    assert_eq!(l.poll_resync(0), None);
}

/// Issue 14, failure 5: a target that lost its data while the primary ran (after it took host
/// writes) is copied in full while host writes go on. The primary asks it at a second
/// handshake to continue after the primary's durable seq, resends its log, and an overflow of
/// every chunk copies the volume under a full bracket; the target is inconsistent until that
/// end is durable, then holds our history and is consistent. Nothing stops.
#[test]
fn a_target_that_lost_its_data_mid_run_is_copied_in_full_while_the_host_goes_on() {
    let (mut l, mut t) = connected(Mode::Async, 64);
    for block in 0..3 {
        l.submit(block, write(block), 1).unwrap();
    }
    exchange(&mut l, &mut t).unwrap();
    events(&mut l);
    assert_eq!(l.replicated(), Seq(3));
    // Not yet sent when the target goes: the new one gets it from the log.
    assert_eq!(l.submit(3, write(3), 1), Ok(Submitted::Accepted(Seq(4))));
    let mut replaced = testkit::target(crate::target::Restored::FRESH);
    l.on_lost(1);
    let e = reconnect(&mut l, &mut replaced, 7).unwrap_err();
    assert!(!e.fatal, "{e:?}");
    assert!(
        matches!(e.error, SourceError::TargetLostData { .. }),
        "{e:?}"
    );
    assert_eq!(
        replaced.status().durable,
        Seq::NONE,
        "nothing changed before AUTH"
    );
    reconnect(&mut l, &mut replaced, 9).unwrap();
    let st = replaced.status();
    assert_eq!(
        (st.durable, st.consistent, st.data_trusted),
        (Seq(4), false, false),
        "the target continues after our durable seq, took the log and is not consistent"
    );
    assert!(l.fatal().is_none());
    assert!(l.takes_host_ops());
    assert!(l.peer_outdated());
    let chunks = VOLUME_BYTES.div_ceil(BITMAP_CHUNK_BYTES);
    assert_eq!(
        l.overflow().map(|o| (o.cause, o.out_of_sync_chunks)),
        Some((OverflowCause::PeerLostData, chunks))
    );
    assert!(events(&mut l).contains(&PeerEvent::RecordRunning {
        durable: Seq(3),
        rebased: None
    }));
    // The copy runs with host writes between its steps; they queue (the rule is off).
    let mut steps = Vec::new();
    let mut token = 10;
    for _ in 0..10_000 {
        let Some(step) = l.poll_resync(1) else {
            exchange(&mut l, &mut replaced).unwrap();
            events(&mut l);
            if l.overflow().is_none() && l.poll_resync(1).is_none() {
                break;
            }
            continue;
        };
        steps.push(step);
        assert!(take_step(&mut l, step, 0x42).is_ok());
        if steps.len() % 4 == 0 {
            assert!(matches!(
                l.submit(token, write(token % 64), 1),
                Ok(Submitted::Accepted(_) | Submitted::Parked)
            ));
            token += 1;
        }
        exchange(&mut l, &mut replaced).unwrap();
        events(&mut l);
    }
    assert_one_full_copy(&steps);
    exchange(&mut l, &mut replaced).unwrap();
    events(&mut l);
    let st = replaced.status();
    assert!(st.consistent && st.data_trusted, "{st:?}");
    assert_eq!(
        replaced.gen_ids(),
        PAIR_IDS,
        "the end gives the target our history"
    );
    assert!(!l.peer_outdated());
    assert_eq!(l.replicated(), l.source().status().last_local);
    assert_eq!(l.status().resync, None);
    // The next loss is a new one: found and copied again.
    let mut again = testkit::target(crate::target::Restored::FRESH);
    l.on_lost(1);
    let e = reconnect(&mut l, &mut again, 11).unwrap_err();
    assert!(
        matches!(e.error, SourceError::TargetLostData { .. }),
        "{e:?}"
    );
}

/// A target asked to continue after the source's seq does so only if it holds none of the
/// source's history: one that holds it keeps its own position (and the source resends after it).
#[test]
fn only_a_target_without_our_history_takes_our_seq() {
    let (mut l, mut t) = connected(Mode::Async, 64);
    l.submit(1, write(1), 1).unwrap();
    exchange(&mut l, &mut t).unwrap();
    events(&mut l);
    let hello = |ids: GenIds, target: &mut Target| {
        target.on_disconnect(C);
        target.on_connect(C, [3; MAC_BYTES], 0).unwrap();
        let frame = Frame::Hello(crate::wire::Hello {
            volume_id: VOLUME_ID,
            node_id: NodeId(1),
            gen_ids: ids,
            last_seq: Seq(500),
            volume_bytes: VOLUME_BYTES,
            block_bytes: 4096,
            nonce: [4; MAC_BYTES],
            mac: [0; MAC_BYTES],
            resync_follows: false,
            rebase_target: true,
        });
        target.handle_frame(C, frame, 0).unwrap();
        let Some(Frame::Hello(reply)) = target.poll_transmit(C) else {
            panic!("no HELLO");
        };
        let mac = crate::auth::sign(
            b"s",
            crate::auth::Signer::Source,
            &reply.nonce,
            &[4; MAC_BYTES],
            &VOLUME_ID,
        );
        target.handle_frame(C, Frame::Auth { mac }, 0).unwrap();
        target.status()
    };
    let st = hello(PAIR_IDS, &mut t);
    assert!(st.connected);
    assert_eq!((st.durable, st.data_trusted), (Seq(1), true), "ours: kept");
    // A replaced volume whose record kept a full bracket open: the rebase closes it (an end
    // resent from before the new begin must not make it trusted).
    let mut fresh = testkit::target(crate::target::Restored {
        consistent: false,
        resyncing: true,
        resync_full: true,
        ..crate::target::Restored::FRESH
    });
    assert_eq!(fresh.status().resync, Some(true));
    let st = hello(PAIR_IDS, &mut fresh);
    assert_eq!(st.resync, None);
    assert_eq!(
        (st.durable, st.data_trusted),
        (Seq(500), false),
        "none of ours: rebased"
    );
    assert_eq!(fresh.take_rebased(), Some(Seq(500)), "once");
    assert_eq!(fresh.take_rebased(), None);
    assert_eq!(t.take_rebased(), None);
}

/// Generation ids that are not a state of ours are refused: another history of the volume id,
/// a target written by another primary since, and a split brain.
#[test]
fn a_target_of_another_history_is_refused() {
    const A: Generation = Generation(0xa);
    const B: Generation = Generation(0xb);
    let ids = |current, bitmap| GenIds {
        current,
        bitmap,
        ..GenIds::NONE
    };
    let cases = [
        (PAIR_IDS, ids(B, Generation::NONE), Verdict::Unrelated),
        (
            PAIR_IDS,
            ids(B, PAIR_IDS.current),
            Verdict::Resync {
                from: Side::Peer,
                full: false,
            },
        ),
        (
            ids(A, PAIR_IDS.current),
            ids(B, PAIR_IDS.current),
            Verdict::SplitBrain,
        ),
    ];
    for (ours, theirs, verdict) in cases {
        let mut cfg = config(Mode::Sync, 64);
        cfg.gen_ids = ours;
        let mut l = PeerLink::new(Source::new(cfg), session(6));
        let mut t = testkit::target(crate::target::Restored {
            gen_ids: theirs,
            ..crate::target::Restored::FRESH
        });
        let e = reconnect(&mut l, &mut t, 9).unwrap_err();
        assert!(e.fatal, "{verdict:?}: {e:?}");
        assert_eq!(
            e.error,
            SourceError::Diverged {
                verdict,
                local: ours,
                target: theirs
            }
        );
        assert!(!t.status().consistent || t.status().durable == Seq::NONE);
    }
}

/// Issue 14, failure 2: a primary resumed from the record of a clean stop (the target held its
/// history then) serves host operations before its peer answers and, at its connect deadline,
/// goes on degraded and ships them once the peer is back; a first start or a restart after a
/// crash takes none before the handshake's verdict and stops at the deadline.
#[test]
fn only_a_resumed_start_serves_the_host_without_its_peer() {
    for (kind, degrades) in [
        (PrimaryStart::Resumed, true),
        (PrimaryStart::First, false),
        (PrimaryStart::Crashed, false),
    ] {
        let source = Source::with_log(config(Mode::Async, 64), MemLog::new(), Seq(5));
        let restored = PrimaryRestored {
            confirmed: Seq(5),
            kind,
            peer_outdated: false,
        };
        let map = crate::bitmap::DirtyBitmap::new(VOLUME_BYTES, 64 << 10).unwrap();
        let mut l = PeerLink::restarted(source, session(7), restored, map);
        l.set_connect_deadline(0, 1_000 * MS);
        assert_eq!(l.takes_host_ops(), degrades, "{kind:?}");
        let written = l.submit(1, write(1), 1);
        let action = l.handle_timeout(1_000 * MS);
        let seen = events(&mut l);
        if !degrades {
            assert_eq!(written, Err(SubmitError::Resyncing), "{kind:?}");
            assert_eq!(
                l.fatal(),
                Some(&SourceError::Unreachable { secs: 1 }),
                "{kind:?}"
            );
            continue;
        }
        assert_eq!(written, Ok(Submitted::Accepted(Seq(6))));
        assert_eq!(
            seen,
            vec![
                record(Seq(5)),
                PeerEvent::Degraded { secs: 1 },
                PeerEvent::Completed(Seq(6))
            ]
        );
        assert_eq!(l.fatal(), None);
        let mut t = testkit::target(crate::target::Restored {
            durable: Seq(5),
            ..FRESH
        });
        assert_eq!(action, Some(SessionAction::Connect));
        open(&mut l, &mut t, 11).unwrap();
        assert_eq!(
            t.status().durable,
            Seq(6),
            "the degraded write reached the peer"
        );
        assert!(events(&mut l).contains(&PeerEvent::Connected));
    }
}

fn overflowing(
    mode: Mode,
    log_entries_max: usize,
    after_down_ns: u64,
    sync: SyncPeerGone,
) -> PeerLink {
    let mut l = link(mode, log_entries_max);
    l.set_overflow_rule(OverflowRule {
        enabled: true,
        after_down_ns,
        sync_peer_gone: sync,
    });
    l
}

/// A connected `async` link of a 1 MiB log with `log_entries_max` entries that overflows only
/// when the log is full.
fn overflowing_connected(log_entries_max: usize) -> (PeerLink, Target) {
    let mut cfg = config(Mode::Async, log_entries_max);
    cfg.log_bytes_max = 1 << 20;
    let (mut l, t) = connect(PeerLink::new(Source::new(cfg), session(3)));
    l.set_overflow_rule(OverflowRule {
        enabled: true,
        after_down_ns: u64::MAX,
        sync_peer_gone: SyncPeerGone::Suspend,
    });
    (l, t)
}

/// Carries out one resync step with `byte` as the local data.
fn take_step(l: &mut PeerLink, step: ResyncStep, byte: u8) -> Result<Submitted, SubmitError> {
    let op = match step {
        ResyncStep::Mark(mark) => Op::Resync(mark),
        ResyncStep::Copy(range) => ResyncStep::copy_op(
            range,
            Bytes::from(vec![byte; usize::try_from(range.len_bytes).unwrap()]),
        ),
    };
    l.resync_submit(SummedOp::new(op), 1)
}

/// Issue 14, failure 6: in `async` a write that finds the log full is not held back: its chunk
/// is marked out of sync (and stored) and it completes once local. When the peer has taken the
/// log, a resync copies the marked chunks while host writes go on: a write into the chunk
/// being copied marks it again (copied again), a write elsewhere is queued as usual; the end
/// of the resync ends the overflow and the peer is up to date.
#[test]
fn a_full_log_overflows_to_the_intent_and_a_resync_interleaved_with_writes_catches_up() {
    let (mut l, mut t) = overflowing_connected(3);
    let chunk = BITMAP_CHUNK_BYTES / 4096;
    for (i, c) in [0, 1, 2].into_iter().enumerate() {
        let seq = Seq(i as u64 + 1);
        assert_eq!(
            l.submit(1, write(c * chunk), 0),
            Ok(Submitted::Accepted(seq))
        );
    }
    assert_eq!(l.submit(2, write(3 * chunk), 0), Ok(Submitted::OutOfSync));
    assert_eq!(
        l.overflow().map(|o| (o.cause, o.out_of_sync_chunks)),
        Some((OverflowCause::LogFull, 1))
    );
    assert!(l.peer_outdated());
    assert_eq!(
        l.poll_event(),
        Some(PeerEvent::RecordRunning {
            durable: Seq::NONE,
            rebased: None
        }),
        "the record says the peer is outdated from now on"
    );
    let stored = l
        .take_intent_store()
        .expect("an out-of-sync chunk is stored first");
    assert!(stored.is_dirty(3));
    assert_eq!(l.peer_data(), PeerData::OutOfSync { chunks: 1 });
    assert_eq!(
        l.poll_resync(0),
        None,
        "no resync step while the log is full"
    );

    exchange(&mut l, &mut t).unwrap();
    events(&mut l);
    // Seq 3 is on the peer; the volume as of now (seq 3 and the write after it) is not.
    assert_eq!(l.check_replicated(Seq(3)), Ok(true));
    assert_eq!(l.everything_so_far(), Seq(4));
    assert_eq!(l.check_replicated(Seq(4)), Ok(false));
    let begin = l.poll_resync(0).unwrap();
    assert_eq!(begin, ResyncStep::Mark(ResyncMark::Begin { full: false }));
    assert_eq!(take_step(&mut l, begin, 0), Ok(Submitted::Accepted(Seq(4))));
    let copy = l.poll_resync(0).unwrap();
    assert_eq!(
        copy,
        ResyncStep::Copy(Range::new(3 * BITMAP_CHUNK_BYTES, BITMAP_CHUNK_BYTES))
    );
    assert!(
        l.step_interleaved() && l.takes_host_ops(),
        "host writes go on meanwhile"
    );
    // Into the chunk under copy: out of sync again. Elsewhere: queued, room kept for the copy.
    assert_eq!(
        l.submit(3, write(3 * chunk + 1), 0),
        Ok(Submitted::OutOfSync)
    );
    assert_eq!(l.submit(4, write(0), 0), Ok(Submitted::Accepted(Seq(5))));
    assert_eq!(
        l.submit(5, write(4 * chunk), 0),
        Ok(Submitted::OutOfSync),
        "log full"
    );
    assert_eq!(take_step(&mut l, copy, 1), Ok(Submitted::Accepted(Seq(6))));
    assert_eq!(
        l.overflow().map(|o| o.out_of_sync_chunks),
        Some(2),
        "3 again, and 4"
    );
    assert_eq!(l.peer_data(), PeerData::Resyncing { full: false });
    exchange(&mut l, &mut t).unwrap();
    assert!(!t.status().consistent, "inside the bracket");

    let mut copied = Vec::new();
    for _ in 0..10 {
        exchange(&mut l, &mut t).unwrap();
        events(&mut l);
        while let Some(step) = l.poll_resync(0) {
            copied.push(step);
            assert!(take_step(&mut l, step, 2).is_ok());
        }
        if l.overflow().is_none() {
            break;
        }
    }
    assert_eq!(
        copied,
        vec![
            // On from the chunk after the last copy, then around.
            ResyncStep::Copy(Range::new(4 * BITMAP_CHUNK_BYTES, BITMAP_CHUNK_BYTES)),
            ResyncStep::Copy(Range::new(3 * BITMAP_CHUNK_BYTES, BITMAP_CHUNK_BYTES)),
            ResyncStep::Mark(ResyncMark::End),
        ]
    );
    // The end is in the log, not yet on the peer: everything so far is through it (a wait for
    // the seq after it would never return: the VM suite's overlap case once hung there).
    assert_eq!(l.everything_so_far(), Seq(9));
    assert_eq!(l.check_replicated(Seq(9)), Ok(false));
    assert!(l.peer_outdated());
    exchange(&mut l, &mut t).unwrap();
    let evs = events(&mut l);
    assert!(
        evs.iter()
            .any(|e| matches!(e, PeerEvent::RecordRunning { rebased: None, .. })),
        "the record says the peer is up to date again: {evs:?}"
    );
    assert!(!l.peer_outdated());
    assert_eq!(l.peer_data(), PeerData::UpToDate);
    assert_eq!(l.everything_so_far(), Seq(9));
    assert_eq!(l.check_replicated(Seq(9)), Ok(true));
    assert!(t.status().consistent);
    assert_eq!(l.status().out_of_sync_writes, 3);
    assert_eq!(
        l.submit(6, write(3 * chunk), 0),
        Ok(Submitted::Accepted(Seq(10)))
    );
}

/// A new overflow's resync waits for the last one's end to be durable; once the peer's ACK says
/// so, the next `poll_resync` hands out its begin, whether or not the driver polled events
/// first (the daemon pumps resync steps before events: it once waited for the next PING, 2 s,
/// after an initial sync whose log was full of copies when the host's first write came).
#[test]
fn a_resync_waiting_for_the_last_ones_end_begins_as_soon_as_the_ack_says_so() {
    let (mut l, mut t) = overflowing_connected(2);
    let chunk = BITMAP_CHUNK_BYTES / 4096;
    assert_eq!(l.submit(1, write(0), 0), Ok(Submitted::Accepted(Seq(1))));
    assert_eq!(
        l.submit(2, write(chunk), 0),
        Ok(Submitted::Accepted(Seq(2)))
    );
    assert_eq!(l.submit(3, write(2 * chunk), 0), Ok(Submitted::OutOfSync));
    exchange(&mut l, &mut t).unwrap();
    events(&mut l);
    for _ in 0..3 {
        let step = l.poll_resync(0).expect("begin, copy, end");
        assert!(take_step(&mut l, step, 0).is_ok());
        exchange(&mut l, &mut t).unwrap();
    }
    assert_eq!(l.overflow(), None, "its end is in the log");
    // The end is in the log; the host's next writes overflow again before it is durable.
    assert_eq!(
        l.submit(4, write(3 * chunk), 0),
        Ok(Submitted::Accepted(Seq(6)))
    );
    assert_eq!(
        l.submit(5, write(3 * chunk), 0),
        Ok(Submitted::Accepted(Seq(7)))
    );
    assert_eq!(l.submit(6, write(4 * chunk), 0), Ok(Submitted::OutOfSync));
    exchange(&mut l, &mut t).unwrap();
    assert_eq!(
        l.poll_resync(0),
        Some(ResyncStep::Mark(ResyncMark::Begin { full: false })),
        "no event polled since the ACK"
    );
}

/// An overflow's resync copies no faster than its rate, and says when the next copy is due.
#[test]
fn an_overflow_resync_keeps_to_its_rate() {
    let (mut l, mut t) = overflowing_connected(1);
    // One chunk per 100 ms.
    l.set_resync_rate(Some(BITMAP_CHUNK_BYTES * 10));
    let chunk = BITMAP_CHUNK_BYTES / 4096;
    assert_eq!(l.submit(1, write(0), 0), Ok(Submitted::Accepted(Seq(1))));
    for c in 1..=3 {
        assert_eq!(l.submit(2, write(c * chunk), 0), Ok(Submitted::OutOfSync));
    }
    let mut copies = Vec::new();
    let mut now = 0;
    for _ in 0..40 {
        exchange(&mut l, &mut t).unwrap();
        events(&mut l);
        while let Some(step) = l.poll_resync(now) {
            if matches!(step, ResyncStep::Copy(_)) {
                copies.push(now);
            }
            assert!(take_step(&mut l, step, 1).is_ok());
            exchange(&mut l, &mut t).unwrap();
            events(&mut l);
        }
        if l.overflow().is_none() {
            break;
        }
        now = l.poll_timeout().expect("the next copy's time").max(now);
    }
    assert_eq!(copies, vec![0, 100 * MS, 200 * MS]);
    exchange(&mut l, &mut t).unwrap();
    events(&mut l);
    assert_eq!(l.peer_data(), PeerData::UpToDate);
}

/// Until an overflow's resync has begun, every write goes out of sync, also one the log has
/// room for: queued, it would reach a target that calls itself consistent without the writes
/// out of sync before it (DRBD's Ahead). Inside the bracket writes elsewhere queue again.
#[test]
fn until_the_resync_begins_every_write_of_an_overflow_goes_out_of_sync() {
    let (mut l, mut t) = overflowing_connected(8);
    let big = |block: u64, kib: usize| {
        SummedOp::new(Op::Write {
            lba: Lba(8 * block),
            data: Bytes::from(vec![0x33; kib << 10]),
        })
    };
    assert_eq!(l.submit(1, big(0, 960), 0), Ok(Submitted::Accepted(Seq(1))));
    let chunk = BITMAP_CHUNK_BYTES / 4096;
    assert_eq!(
        l.submit(2, big(128, 128), 0),
        Ok(Submitted::OutOfSync),
        "the log is full for it"
    );
    assert_eq!(
        l.submit(3, write(15 * chunk), 0),
        Ok(Submitted::OutOfSync),
        "room for it, but the resync has not begun"
    );
    l.set_mode(Mode::Sync);
    assert_eq!(
        l.submit(5, write(14 * chunk), 0),
        Ok(Submitted::OutOfSync),
        "in a mode that does not overflow too (the simulator found this after a mode switch)"
    );
    l.set_mode(Mode::Async);
    exchange(&mut l, &mut t).unwrap();
    events(&mut l);
    let begin = l.poll_resync(0).unwrap();
    assert_eq!(begin, ResyncStep::Mark(ResyncMark::Begin { full: false }));
    assert!(take_step(&mut l, begin, 0).is_ok());
    assert_eq!(
        l.submit(4, write(0), 0),
        Ok(Submitted::Accepted(Seq(3))),
        "inside the bracket a write elsewhere queues"
    );
}

/// Status says when an overflow's resync does not converge: no new low of the chunks out of
/// sync for [`CONVERGE_WINDOW_NS`] while it runs.
#[test]
fn an_overflow_resync_without_a_new_low_for_its_window_does_not_converge() {
    const SEC: u64 = 1_000_000_000;
    let (mut l, mut t) = overflowing_connected(1);
    let chunk = BITMAP_CHUNK_BYTES / 4096;
    let step_at = |l: &mut PeerLink, t: &mut Target, now: u64| {
        exchange(l, t).unwrap();
        events(l);
        let step = l.poll_resync(now).expect("a step is due");
        let op = match step {
            ResyncStep::Mark(mark) => Op::Resync(mark),
            ResyncStep::Copy(range) => ResyncStep::copy_op(
                range,
                Bytes::from(vec![7; usize::try_from(range.len_bytes).unwrap()]),
            ),
        };
        assert!(l.resync_submit(SummedOp::new(op), now).is_ok());
        step
    };
    assert_eq!(l.submit(1, write(0), 0), Ok(Submitted::Accepted(Seq(1))));
    for c in 1..=2 {
        assert_eq!(l.submit(2, write(c * chunk), 0), Ok(Submitted::OutOfSync));
    }
    assert_eq!(l.overflow().unwrap().converging(0), None, "not under way");
    step_at(&mut l, &mut t, 0);
    assert_eq!(l.overflow().unwrap().converging(29 * SEC), Some(true));
    step_at(&mut l, &mut t, 10 * SEC);
    assert_eq!(l.overflow().unwrap().out_of_sync_chunks, 1);
    // The host dirties chunk 1 again (the log is full: out of sync).
    assert_eq!(
        l.submit(3, write(chunk), 11 * SEC),
        Ok(Submitted::OutOfSync)
    );
    let ov = l.overflow().unwrap();
    assert_eq!(ov.converging(39 * SEC), Some(true));
    assert_eq!(
        ov.converging(40 * SEC),
        Some(false),
        "no new low since 10 s"
    );
    step_at(&mut l, &mut t, 41 * SEC);
    assert_eq!(
        l.overflow().unwrap().converging(41 * SEC),
        Some(false),
        "one left again is no new low"
    );
    step_at(&mut l, &mut t, 42 * SEC);
    assert_eq!(l.overflow().unwrap().out_of_sync_chunks, 0);
    assert_eq!(l.overflow().unwrap().converging(42 * SEC), Some(true));
}

/// While the host is throttled (a resync that does not converge), a host write takes the log
/// only beyond the room of one copy: a copy gets in ahead of a host write waiting for room,
/// which follows once the peer freed room for both. The copies cannot starve, and the host's
/// queued writes mark no chunk: the resync ends.
#[test]
fn a_throttled_host_leaves_the_log_room_for_the_next_copy() {
    let (mut l, mut t) = overflowing_connected(2);
    l.set_overflow_throttle(true);
    l.set_converge_window_ns(10);
    let chunk = BITMAP_CHUNK_BYTES / 4096;
    assert_eq!(l.submit(1, write(0), 0), Ok(Submitted::Accepted(Seq(1))));
    assert_eq!(
        l.submit(2, write(chunk), 0),
        Ok(Submitted::Accepted(Seq(2)))
    );
    for c in 2..=3 {
        assert_eq!(l.submit(3, write(c * chunk), 0), Ok(Submitted::OutOfSync));
    }
    exchange(&mut l, &mut t).unwrap();
    events(&mut l);
    let begin = l.poll_resync(0).unwrap();
    assert!(take_step(&mut l, begin, 0).is_ok());
    // No new low for the window: throttled. The log has room for one entry, the copy's.
    assert_eq!(l.submit(4, write(4 * chunk), 100), Ok(Submitted::Parked));
    assert_eq!(l.status().throttled_writes, 1);
    let copy = l
        .poll_resync(100)
        .expect("a copy beside the parked host write");
    assert!(matches!(copy, ResyncStep::Copy(_)), "{copy:?}");
    assert_eq!(take_step(&mut l, copy, 0), Ok(Submitted::Accepted(Seq(4))));
    assert!(l.is_parked());
    exchange(&mut l, &mut t).unwrap();
    assert!(events(&mut l).contains(&PeerEvent::Accepted {
        token: 4,
        seq: Seq(5)
    }));
    for _ in 0..64 {
        exchange(&mut l, &mut t).unwrap();
        events(&mut l);
        while let Some(step) = l.poll_resync(200) {
            assert!(take_step(&mut l, step, 0).is_ok());
        }
        if l.overflow().is_none() {
            break;
        }
    }
    assert_eq!(l.overflow(), None, "the resync ended");
    exchange(&mut l, &mut t).unwrap();
    events(&mut l);
    assert_eq!(l.peer_data(), PeerData::UpToDate);
    assert_eq!(
        l.status().intent.dirty_chunks,
        0,
        "the write that waited behind the copy left the intent once durable"
    );
}

/// A peer unreachable past the rule's bound: `async` records writes out of sync even with room
/// in the log; `sync` waits (suspend) or degrades, as its policy says.
#[test]
fn a_peer_gone_too_long_overflows_async_and_sync_as_its_policy_says() {
    for (mode, policy, late) in [
        (Mode::Async, SyncPeerGone::Suspend, Submitted::OutOfSync),
        (
            Mode::Sync,
            SyncPeerGone::Suspend,
            Submitted::Accepted(Seq(2)),
        ),
        (Mode::Sync, SyncPeerGone::Degrade, Submitted::OutOfSync),
    ] {
        let mut l = overflowing(mode, 8, 1_000 * MS, policy);
        assert_eq!(
            l.submit(1, write(0), 999 * MS),
            Ok(Submitted::Accepted(Seq(1)))
        );
        assert_eq!(
            l.submit(2, write(1), 1_000 * MS),
            Ok(late),
            "{mode} {policy}"
        );
        let expected = match late {
            Submitted::OutOfSync => Some(OverflowCause::PeerGone),
            _ => None,
        };
        assert_eq!(l.overflow().map(|o| o.cause), expected);
    }
}
