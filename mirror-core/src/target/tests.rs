//! The target engine against a real source engine, frames through the codec.

use super::*;
use crate::source::{Mode, Source};
use crate::testkit::{self, source_config, FRESH, VOLUME_BYTES, VOLUME_ID};
use crate::types::{Generation, Lba};
use crate::wire::{decode, SummedOp};
use bytes::Bytes;

const C: ConnId = ConnId(1);

fn new_source(mode: Mode, node: u64) -> Source {
    Source::new(source_config(mode, node, 64))
}

fn new_target(restored: Restored) -> Target {
    testkit::target(restored)
}

fn pair(mode: Mode) -> (Source, Target) {
    let mut source = new_source(mode, 1);
    let mut target = new_target(FRESH);
    target.on_connect(C, [1; MAC_BYTES], 0).unwrap();
    source.on_connect([2; MAC_BYTES]);
    let acks = exchange(&mut source, &mut target);
    assert!(target.is_ready(), "handshake");
    assert_eq!(
        acks,
        vec![(Seq::NONE, Seq::NONE)],
        "the ACK that opens a session"
    );
    (source, target)
}

/// Moves frames both ways, through the codec, until both are quiet. Returns the ACKs the
/// target sent as (received, durable).
fn exchange(source: &mut Source, target: &mut Target) -> Vec<(Seq, Seq)> {
    exchange_on(source, target, C).unwrap()
}

/// [`exchange`] on connection `conn`; the first error either side reports ends it.
fn exchange_on(
    source: &mut Source,
    target: &mut Target,
    conn: ConnId,
) -> Result<Vec<(Seq, Seq)>, String> {
    let mut acks = Vec::new();
    for _ in 0..16 {
        let mut moved = false;
        while let Some(frame) = source.poll_transmit() {
            let bytes = frame.encode().to_vec();
            let (decoded, _) = decode(&bytes).unwrap().unwrap();
            target
                .handle_frame(conn, decoded, 0)
                .map_err(|e| format!("target: {e}"))?;
            moved = true;
        }
        while let Some(frame) = target.poll_transmit(conn) {
            if let Frame::Ack { received, durable } = frame {
                acks.push((received, durable));
            }
            source
                .handle_frame(frame)
                .map_err(|e| format!("source: {e}"))?;
            moved = true;
        }
        if !moved {
            break;
        }
    }
    Ok(acks)
}

fn write(source: &mut Source, block: u64) -> Seq {
    let op = Op::Write {
        lba: Lba(8 * block),
        data: Bytes::from(vec![0x3c; 4096]),
    };
    source.submit(op, 1).unwrap()
}

/// A HELLO as anyone who knows the volume's id and geometry (not the secret) can send it.
fn forged_hello(last_seq: Seq) -> Frame {
    Frame::Hello(Hello {
        volume_id: VolumeId([7; 16]),
        node_id: NodeId(1),
        gen_ids: GenIds::default(),
        last_seq,
        volume_bytes: VOLUME_BYTES,
        block_bytes: 4096,
        nonce: [9; MAC_BYTES],
        mac: [0; MAC_BYTES],
        resync_follows: false,
        rebase_target: false,
    })
}

/// What a restarted target trusts: its own record; nothing for a new volume; never a record
/// of another volume, another size, a primary, or one that predates the volume.
#[test]
fn recovery_trusts_only_a_record_of_this_volume() {
    let facts = VolumeFacts {
        volume_id: VolumeId([7; 16]),
        volume_bytes: VOLUME_BYTES,
        created: false,
    };
    let own = MetaRecord {
        durable: Seq(9),
        clean: false,
        ..MetaRecord::new(facts.volume_id, VOLUME_BYTES)
    };
    assert_eq!(
        recover(Some(&own), &facts),
        Ok((
            Restored {
                durable: Seq(9),
                clean: false,
                consistent: true,
                resyncing: false,
                resync_full: false,
                gen_ids: GenIds::NONE,
            },
            RecoveryKind::Resumed
        ))
    );
    // An existing volume without a record (new to the mirror, or replaced): seq 0, and its
    // data is not trusted.
    let (adopted, kind) = recover(None, &facts).unwrap();
    assert_eq!(kind, RecoveryKind::Adopted);
    assert!(!adopted.clean && !adopted.consistent);
    let unverified = MetaRecord {
        consistent: false,
        clean: true,
        ..own
    };
    assert_eq!(
        recover(Some(&unverified), &facts),
        Ok((
            Restored {
                durable: Seq(9),
                clean: true,
                consistent: false,
                resyncing: false,
                resync_full: false,
                gen_ids: GenIds::NONE,
            },
            RecoveryKind::Unverified
        ))
    );
    // The running record keeps what recovery did not trust, and what it loaded.
    let loaded = MetaRecord {
        gen_ids: crate::genid::GenIds {
            current: Generation(3),
            ..Default::default()
        },
        ..unverified
    };
    let (restored, _) = recover(Some(&loaded), &facts).unwrap();
    let running = running_record(Some(&loaded), &facts, NodeId(2), restored);
    assert_eq!(
        (
            running.consistent,
            running.clean,
            running.gen_ids.current,
            running.node_id
        ),
        (false, false, Generation(3), NodeId(2))
    );
    let created = VolumeFacts {
        created: true,
        ..facts
    };
    assert_eq!(
        recover(None, &created).map(|r| r.1),
        Ok(RecoveryKind::Fresh)
    );
    assert_eq!(
        recover(Some(&own), &created),
        Err(RecoverError::Binding(BindingError::MetaOfEarlierVolume))
    );
    let other = MetaRecord {
        volume_id: VolumeId([8; 16]),
        ..own
    };
    assert!(matches!(
        recover(Some(&other), &facts),
        Err(RecoverError::Binding(BindingError::OtherVolume { .. }))
    ));
    let grown = MetaRecord {
        volume_bytes: 2 * VOLUME_BYTES,
        ..own
    };
    assert!(matches!(
        recover(Some(&grown), &facts),
        Err(RecoverError::Binding(BindingError::Size { .. }))
    ));
    let primary = MetaRecord {
        role: Role::Primary,
        node_id: NodeId(4),
        ..own
    };
    let err = recover(Some(&primary), &facts).unwrap_err();
    assert_eq!(err.to_string(), "it was written by a primary (node 4)");
}

/// A volume whose data is not trusted (adopted without a record) stays inconsistent after the
/// source's resend; one that is (a fresh volume, an unclean stop) does not.
#[test]
fn an_untrusted_volume_stays_inconsistent_after_the_resend() {
    let facts = VolumeFacts {
        volume_id: VOLUME_ID,
        volume_bytes: VOLUME_BYTES,
        created: false,
    };
    let unclean = MetaRecord {
        clean: false,
        ..MetaRecord::new(VOLUME_ID, VOLUME_BYTES)
    };
    let unverified = MetaRecord {
        consistent: false,
        ..unclean
    };
    for (record, consistent_after) in [
        (None, false),
        (Some(unverified), false),
        (Some(unclean), true),
    ] {
        let (restored, kind) = recover(record.as_ref(), &facts).unwrap();
        // Trust is the question here, not history: the source may send to it.
        let restored = Restored {
            gen_ids: testkit::PAIR_IDS,
            ..restored
        };
        let mut target = Target::new(new_target(FRESH).cfg.clone(), restored);
        let mut source = new_source(Mode::Sync, 1);
        write(&mut source, 0);
        source.on_connect([2; MAC_BYTES]);
        target.on_connect(C, [3; MAC_BYTES], 0).unwrap();
        exchange(&mut source, &mut target);
        let apply = target.poll_apply().unwrap();
        target.handle_applied(apply.seq);
        target.handle_durable(apply.seq);
        assert_eq!(target.status().consistent, consistent_after, "{kind:?}");
    }
}

/// Item 9a: before this fix the forged HELLO alone cleared "inconsistent" (the HELLO's
/// `last_seq` 0 bounded the resend that an unclean restart needs).
#[test]
fn an_unauthenticated_hello_changes_nothing() {
    let mut target = new_target(Restored {
        durable: Seq(5),
        clean: false,
        consistent: true,
        resyncing: false,
        resync_full: false,
        gen_ids: testkit::PAIR_IDS,
    });
    let before = target.status();
    assert!(!before.consistent);
    let intruder = ConnId(9);
    target.on_connect(intruder, [1; MAC_BYTES], 0).unwrap();
    target
        .handle_frame(intruder, forged_hello(Seq::NONE), 0)
        .unwrap();
    assert!(matches!(
        target.poll_transmit(intruder),
        Some(Frame::Hello(_))
    ));
    assert_eq!(
        target.handle_frame(
            intruder,
            Frame::Auth {
                mac: [0; MAC_BYTES]
            },
            0
        ),
        Err(TargetError::Refused(RefuseReason::BadAuth))
    );
    assert_eq!(
        target.poll_transmit(intruder),
        Some(Frame::Refuse {
            reason: RefuseReason::BadAuth
        })
    );
    target.on_disconnect(intruder);
    assert_eq!(target.status(), before);

    // The real source's HELLO, once authenticated, bounds the resend: consistent again once
    // its last seq (7) is durable.
    let mut source = new_source(Mode::Sync, 1);
    for block in 0..7 {
        write(&mut source, block);
    }
    source.on_connect([2; MAC_BYTES]);
    target.on_connect(C, [3; MAC_BYTES], 0).unwrap();
    exchange(&mut source, &mut target);
    for want in [6, 7] {
        assert!(!target.status().consistent);
        let apply = target.poll_apply().unwrap();
        assert_eq!(apply.seq, Seq(want));
        target.handle_applied(apply.seq);
        target.handle_durable(apply.seq);
    }
    assert!(target.status().consistent);
}

/// The session's idle timeout counts from its last frame, and not while the commit log holds
/// operations (the driver may then be holding the source's frames back).
#[test]
fn a_session_silent_for_the_idle_timeout_is_closed() {
    let (mut source, mut target) = pair(Mode::Sync);
    assert_eq!(target.poll_timeout(), Some(IDLE_TIMEOUT_NS_DEFAULT));
    let later = IDLE_TIMEOUT_NS_DEFAULT - 1;
    target
        .handle_frame(C, Frame::Ping { token: 1 }, later)
        .unwrap();
    target.handle_timeout(IDLE_TIMEOUT_NS_DEFAULT);
    assert_eq!(target.poll_close(), None, "a frame restarts the timeout");
    let deadline = later + IDLE_TIMEOUT_NS_DEFAULT;
    assert_eq!(target.poll_timeout(), Some(deadline));

    write(&mut source, 3);
    while let Some(frame) = source.poll_transmit() {
        let (decoded, _) = decode(&frame.encode().to_vec()).unwrap().unwrap();
        target.handle_frame(C, decoded, later).unwrap();
    }
    target.handle_timeout(deadline);
    assert_eq!(
        target.poll_close(),
        None,
        "an operation waits to be applied"
    );
    assert_eq!(target.session(), Some(C));
    let apply = target.poll_apply().unwrap();
    target.handle_applied(apply.seq);
    target.handle_durable(apply.seq);

    let deadline = deadline + IDLE_TIMEOUT_NS_DEFAULT;
    assert_eq!(target.poll_timeout(), Some(deadline));
    target.handle_timeout(deadline);
    assert_eq!(target.poll_close(), Some((C, CloseReason::Idle)));
    assert_eq!(target.session(), None);
    assert_eq!(target.poll_timeout(), None);
}

/// Item 9b: a silent connection neither takes the session nor outlives its deadline, and
/// handshakes in flight are bounded.
#[test]
fn a_silent_connection_blocks_nobody() {
    let mut target = new_target(FRESH);
    let silent = ConnId(9);
    target.on_connect(silent, [1; MAC_BYTES], 0).unwrap();
    let mut source = new_source(Mode::Sync, 1);
    source.on_connect([2; MAC_BYTES]);
    target.on_connect(C, [3; MAC_BYTES], 10).unwrap();
    exchange_on(&mut source, &mut target, C).unwrap();
    assert_eq!(target.session(), Some(C));

    assert_eq!(target.poll_timeout(), Some(HANDSHAKE_TIMEOUT_NS_DEFAULT));
    target.handle_timeout(HANDSHAKE_TIMEOUT_NS_DEFAULT - 1);
    assert_eq!(target.poll_close(), None);
    target.handle_timeout(HANDSHAKE_TIMEOUT_NS_DEFAULT);
    assert_eq!(
        target.poll_close(),
        Some((silent, CloseReason::HandshakeTimeout))
    );
    assert_eq!(
        target.poll_timeout(),
        Some(IDLE_TIMEOUT_NS_DEFAULT),
        "only the session's idle deadline is left"
    );
    assert_eq!(target.session(), Some(C), "the session is not timed out");

    let now = HANDSHAKE_TIMEOUT_NS_DEFAULT;
    for i in 0..HANDSHAKES_MAX_DEFAULT as u64 {
        target
            .on_connect(ConnId(100 + i), [1; MAC_BYTES], now)
            .unwrap();
    }
    let over = ConnId(200);
    assert_eq!(
        target.on_connect(over, [1; MAC_BYTES], now),
        Err(TargetError::Refused(RefuseReason::Busy))
    );
    assert_eq!(
        target.poll_transmit(over),
        Some(Frame::Refuse {
            reason: RefuseReason::Busy
        })
    );
    target.on_disconnect(over);
    target.handle_timeout(now + HANDSHAKE_TIMEOUT_NS_DEFAULT);
    let closed = std::iter::from_fn(|| target.poll_close()).count();
    assert_eq!(closed, HANDSHAKES_MAX_DEFAULT);
    target.on_connect(ConnId(300), [1; MAC_BYTES], now).unwrap();
}

/// Item 9c: the source reconnects while its old connection is still open on the target (a
/// lost FIN): the new session replaces the stale one. Another node gets Busy.
#[test]
fn a_reconnect_replaces_its_own_stale_session() {
    let (mut source, mut target) = pair(Mode::Sync);
    let seq = write(&mut source, 0);
    exchange(&mut source, &mut target);
    let apply = target.poll_apply().unwrap();
    target.handle_applied(apply.seq);
    target.handle_durable(apply.seq);
    exchange(&mut source, &mut target);
    assert_eq!(source.poll_completion(), Some(seq));

    // The source saw the link die; the target did not.
    source.on_disconnect();
    let second = write(&mut source, 1);
    let fresh = ConnId(2);
    source.on_connect([4; MAC_BYTES]);
    target.on_connect(fresh, [5; MAC_BYTES], 0).unwrap();
    exchange_on(&mut source, &mut target, fresh).unwrap();
    assert_eq!(target.session(), Some(fresh));
    assert_eq!(target.poll_close(), Some((C, CloseReason::Replaced)));
    assert_eq!(target.status().received, second);
    assert!(
        target.handle_frame(C, Frame::Ping { token: 1 }, 0).is_err(),
        "the replaced connection is dead"
    );

    let mut other = new_source(Mode::Sync, 3);
    other.on_connect([6; MAC_BYTES]);
    let third = ConnId(3);
    target.on_connect(third, [7; MAC_BYTES], 0).unwrap();
    let refused = exchange_on(&mut other, &mut target, third);
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        target.session(),
        Some(fresh),
        "another node does not replace it"
    );
}

/// A replaced session's operations were still being handed out after our HELLO told the new
/// connection where the target stands: the new one is refused with Busy, and its retry works.
#[test]
fn a_replacement_that_raced_the_old_session_retries() {
    let (mut old, mut target) = pair(Mode::Sync);
    // The same node after a restart, say: its log has the write the old connection carries.
    let mut new = new_source(Mode::Sync, 1);
    write(&mut new, 0);
    new.on_connect([4; MAC_BYTES]);
    let fresh = ConnId(2);
    target.on_connect(fresh, [5; MAC_BYTES], 0).unwrap();
    let hello = new.poll_transmit().unwrap();
    target.handle_frame(fresh, hello, 0).unwrap();
    let ours = target.poll_transmit(fresh).unwrap();
    new.handle_frame(ours).unwrap();
    // Meanwhile the old connection delivers a write that is handed out.
    write(&mut old, 0);
    exchange(&mut old, &mut target);
    assert!(target.poll_apply().is_some());
    let auth = new.poll_transmit().unwrap();
    assert_eq!(
        target.handle_frame(fresh, auth, 0),
        Err(TargetError::Refused(RefuseReason::Busy))
    );
    assert_eq!(target.poll_close(), Some((C, CloseReason::Replaced)));
    target.on_disconnect(fresh);
    assert_eq!(target.session(), None);
    new.on_disconnect();
    new.on_connect([6; MAC_BYTES]);
    target.on_connect(ConnId(3), [7; MAC_BYTES], 0).unwrap();
    exchange_on(&mut new, &mut target, ConnId(3)).unwrap();
    assert_eq!(target.session(), Some(ConnId(3)));
}

/// The daemon checksums a write on its capture thread ([`SummedOp`]); the source's data
/// frames carry that checksum, in every mode (lock-then-write adds LOCK frames), the bytes
/// decode back to the same frames, and the target takes them.
#[test]
fn writes_go_out_with_the_checksum_taken_at_submit() {
    for mode in Mode::ALL {
        let (mut src, mut target) = pair(mode);
        let mut submitted = Vec::new();
        for i in 0..3u8 {
            let op = SummedOp::new(Op::Write {
                lba: Lba(8 * u64::from(i)),
                data: Bytes::from(vec![i ^ 0xa5; 4096]),
            });
            submitted.push(op.clone());
            src.submit(op, 1).unwrap();
        }
        let mut writes = Vec::new();
        let mut sent = 0;
        while let Some(frame) = src.poll_transmit() {
            if let Frame::Op { op, .. } = &frame {
                writes.push(op.clone());
            }
            let (back, _) = decode(&frame.encode().to_vec()).unwrap().unwrap();
            assert_eq!(back, frame, "{mode:?}");
            target.handle_frame(C, back, 0).unwrap();
            sent += 1;
            if mode == Mode::LockThenWrite {
                // Grants come back before the WRITEs go.
                while let Some(f) = target.poll_transmit(C) {
                    src.handle_frame(f).unwrap();
                }
            }
        }
        assert_eq!(writes, submitted, "{mode:?}");
        let frames = if mode == Mode::LockThenWrite { 6 } else { 3 };
        assert_eq!(sent, frames, "{mode:?}");
        assert_eq!(target.status().received, Seq(3), "{mode:?}");
    }
}

#[test]
fn receipt_is_acknowledged_at_once_only_in_received_mode() {
    for mode in [Mode::Async, Mode::Received, Mode::Sync, Mode::LockThenWrite] {
        let (mut source, mut target) = pair(mode);
        let op = Op::Write {
            lba: Lba(8),
            data: Bytes::from(vec![0x5a; 4096]),
        };
        let seq = source.submit(op, 1).unwrap();
        let acks = exchange(&mut source, &mut target);
        assert_eq!(target.status().received, seq, "{mode:?}");
        let completed = source.poll_completion() == Some(seq);
        if mode == Mode::Received {
            assert_eq!(acks, vec![(seq, Seq::NONE)], "{mode:?}");
            assert!(completed, "{mode:?}: received write completes on receipt");
        } else {
            // No frame just for receipt: it travels with the durability ACK.
            assert_eq!(acks, vec![], "{mode:?}");
            assert_eq!(completed, mode == Mode::Async, "{mode:?}");
        }
        let apply = target.poll_apply().unwrap();
        target.handle_applied(apply.seq);
        target.handle_durable(apply.seq);
        assert_eq!(
            exchange(&mut source, &mut target),
            vec![(seq, seq)],
            "{mode:?}"
        );
        if !matches!(mode, Mode::Async | Mode::Received) {
            assert_eq!(source.poll_completion(), Some(seq), "{mode:?}");
        }
        assert_eq!(source.status().log_entries, 0, "{mode:?}");
    }
}

/// Between a resync's begin and its durable end the target is not a prefix of the source's
/// writes and says so, in its status and in the record it writes (so a restart in between
/// stays inconsistent until an end); a partial resync does not make untrusted data consistent,
/// a full one does.
#[test]
fn a_resync_bracket_is_inconsistent_until_its_end_is_durable() {
    let facts = VolumeFacts {
        volume_id: VOLUME_ID,
        volume_bytes: VOLUME_BYTES,
        created: false,
    };
    let resyncing = MetaRecord {
        resyncing: true,
        ..MetaRecord::new(VOLUME_ID, VOLUME_BYTES)
    };
    let trusted = MetaRecord::new(VOLUME_ID, VOLUME_BYTES);
    // (record, full bracket, consistent before, consistent after)
    for (record, full, before, after) in [
        (Some(trusted), false, true, true),
        (Some(trusted), true, true, true),
        (None, false, false, false),
        (None, true, false, true),
        (Some(resyncing), false, false, true),
    ] {
        let what = format!("record {record:?}, full {full}");
        let (restored, _) = recover(record.as_ref(), &facts).unwrap();
        // The source sends its brackets whatever the ids (this is the target's rule).
        let restored = Restored {
            gen_ids: testkit::PAIR_IDS,
            ..restored
        };
        let mut target = Target::new(new_target(FRESH).cfg.clone(), restored);
        assert_eq!(target.status().consistent, before, "{what}");
        let mut source = new_source(Mode::Sync, 1);
        source.on_connect([2; MAC_BYTES]);
        target.on_connect(C, [3; MAC_BYTES], 0).unwrap();
        exchange(&mut source, &mut target);
        source
            .submit(Op::Resync(ResyncMark::Begin { full }), 1)
            .unwrap();
        write(&mut source, 3);
        let end = source.submit(Op::Resync(ResyncMark::End), 1).unwrap();
        exchange(&mut source, &mut target);
        let mut consistent = Vec::new();
        while let Some(apply) = target.poll_apply() {
            consistent.push(target.status().consistent);
            let (trusted, open) = target.data_state();
            assert!(
                open || apply.seq == end,
                "{what}: the record says resyncing from the begin until the end ({:?})",
                apply.op
            );
            assert!(!full || !trusted || apply.seq == end, "{what}");
            target.handle_applied(apply.seq);
            target.handle_durable(apply.seq);
            exchange(&mut source, &mut target);
        }
        assert_eq!(consistent, [false, false, false], "{what}");
        assert_eq!(target.status().consistent, after, "{what}");
        assert_eq!(target.data_state(), (after, false), "{what}");
    }
}

/// A source whose HELLO is behind what the target took (a primary restarted after a crash,
/// which resyncs from its write intent) does not bound the target's inconsistency: only its
/// resync's end does.
#[test]
fn a_source_behind_the_target_does_not_end_its_inconsistency() {
    let unclean = Restored {
        durable: Seq(5),
        clean: false,
        consistent: true,
        resyncing: false,
        resync_full: false,
        gen_ids: testkit::PAIR_IDS,
    };
    let mut target = Target::new(new_target(FRESH).cfg.clone(), unclean);
    let mut source = new_source(Mode::Sync, 1);
    source.adopt_target_seq();
    source.on_connect([2; MAC_BYTES]);
    target.on_connect(C, [3; MAC_BYTES], 0).unwrap();
    exchange(&mut source, &mut target);
    assert!(target.is_ready());
    assert!(!target.status().consistent, "the source said seq 0");
    assert_eq!(
        source.status().last_local,
        Seq(5),
        "the source took the target's seq"
    );
    source
        .submit(Op::Resync(ResyncMark::Begin { full: false }), 1)
        .unwrap();
    let end = source.submit(Op::Resync(ResyncMark::End), 1).unwrap();
    assert_eq!(end, Seq(7));
    exchange(&mut source, &mut target);
    while let Some(apply) = target.poll_apply() {
        target.handle_applied(apply.seq);
        target.handle_durable(apply.seq);
    }
    assert!(target.status().consistent);
}

/// A resync's end inside the resend an unclean restart needs does not shorten it: the target
/// stays inconsistent until the source's last seq is durable.
#[test]
fn a_resync_end_keeps_the_resend_bound_of_an_unclean_restart() {
    let unclean = Restored {
        durable: Seq::NONE,
        clean: false,
        consistent: true,
        resyncing: false,
        resync_full: false,
        gen_ids: testkit::PAIR_IDS,
    };
    let mut target = Target::new(new_target(FRESH).cfg.clone(), unclean);
    let mut source = new_source(Mode::Sync, 1);
    source
        .submit(Op::Resync(ResyncMark::Begin { full: false }), 1)
        .unwrap();
    let end = source.submit(Op::Resync(ResyncMark::End), 1).unwrap();
    let last = write(&mut source, 2);
    source.on_connect([2; MAC_BYTES]);
    target.on_connect(C, [3; MAC_BYTES], 0).unwrap();
    exchange(&mut source, &mut target);
    while let Some(apply) = target.poll_apply() {
        target.handle_applied(apply.seq);
        target.handle_durable(apply.seq);
        assert_eq!(
            target.status().consistent,
            apply.seq >= last,
            "at {:?}",
            apply.seq
        );
    }
    assert!(end < last);
}

/// A primary restarted after a crash continues its sequence after what the target tells it, so
/// the target admits it only once everything it handed out is durable (a crash of the target
/// would lose seqs the primary never resends): before, its HELLO is refused with Busy and the
/// source adopts nothing; once admitted, the source continues after the durable seq.
#[test]
fn a_restarted_primary_is_admitted_once_what_the_target_took_is_durable() {
    let (mut old, mut target) = pair(Mode::Async);
    for block in 0..3 {
        write(&mut old, block);
    }
    exchange(&mut old, &mut target);
    let first = target.poll_apply().unwrap();
    target.handle_applied(first.seq);
    target.handle_durable(first.seq);
    let second = target.poll_apply().unwrap();
    // The old source crashed; its restart connects with the same node id.
    let mut restarted = new_source(Mode::Async, 1);
    restarted.adopt_target_seq();
    restarted.on_connect([4; MAC_BYTES]);
    target.on_connect(ConnId(2), [5; MAC_BYTES], 0).unwrap();
    let refused = exchange_on(&mut restarted, &mut target, ConnId(2));
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("already serves")),
        "{refused:?}"
    );
    assert_eq!(restarted.status().last_local, Seq::NONE);
    assert!(restarted.awaits_admission());
    target.handle_applied(second.seq);
    let third = target.poll_apply().unwrap();
    target.handle_applied(third.seq);
    target.handle_durable(third.seq);
    restarted.on_disconnect();
    restarted.on_connect([6; MAC_BYTES]);
    target.on_connect(ConnId(3), [7; MAC_BYTES], 0).unwrap();
    exchange_on(&mut restarted, &mut target, ConnId(3)).unwrap();
    assert_eq!(restarted.status().last_local, third.seq);
    assert!(
        !restarted.awaits_admission(),
        "the target's ACK admitted it"
    );
}

/// A bound an earlier source gave an unclean restart names seqs a restarted primary reuses: its
/// admission drops it, and its resync's end alone makes the target consistent.
#[test]
fn a_restarted_primary_drops_the_bound_of_the_run_it_replaces() {
    let unclean = Restored {
        durable: Seq::NONE,
        clean: false,
        consistent: true,
        resyncing: false,
        resync_full: false,
        gen_ids: testkit::PAIR_IDS,
    };
    let mut target = Target::new(new_target(FRESH).cfg.clone(), unclean);
    let mut old = new_source(Mode::Sync, 1);
    for block in 0..10 {
        write(&mut old, block);
    }
    old.on_connect([2; MAC_BYTES]);
    target.on_connect(C, [3; MAC_BYTES], 0).unwrap();
    exchange(&mut old, &mut target);
    // The old source dies before anything is handed out; its restart resyncs.
    target.on_disconnect(C);
    let mut restarted = new_source(Mode::Sync, 1);
    restarted.adopt_target_seq();
    restarted.on_connect([4; MAC_BYTES]);
    target.on_connect(ConnId(2), [5; MAC_BYTES], 0).unwrap();
    exchange_on(&mut restarted, &mut target, ConnId(2)).unwrap();
    restarted
        .submit_own(Op::Resync(ResyncMark::Begin { full: false }), 1)
        .unwrap();
    let end = restarted
        .submit_own(Op::Resync(ResyncMark::End), 1)
        .unwrap();
    exchange_on(&mut restarted, &mut target, ConnId(2)).unwrap();
    while let Some(apply) = target.poll_apply() {
        target.handle_applied(apply.seq);
        target.handle_durable(apply.seq);
    }
    assert_eq!(target.status().durable, end);
    assert!(target.status().consistent, "seq 10 of the old run is gone");
}

/// Hands out, applies and syncs everything the commit log holds.
fn apply_all(target: &mut Target) {
    while let Some(apply) = target.poll_apply() {
        target.handle_applied(apply.seq);
        target.handle_durable(apply.seq);
    }
}

/// A full resync into a volume of no history: inconsistent from its begin; a restart in the
/// middle keeps "full" in the record, so the end (after the restart) makes the data consistent
/// and gives the volume the source's history, which the record then keeps.
#[test]
fn a_full_resync_survives_a_target_restart_and_its_end_gives_the_history() {
    let mut target = new_target(Restored::FRESH);
    let mut source = new_source(Mode::Sync, 1);
    source.adopt_target_seq();
    source.on_connect([2; MAC_BYTES]);
    target.on_connect(C, [3; MAC_BYTES], 0).unwrap();
    exchange(&mut source, &mut target);
    assert_eq!(
        source.take_full_resync(),
        Some(crate::source::FullResync::BeforeHostOps),
        "the source rebased for a full resync"
    );
    source
        .submit(Op::Resync(ResyncMark::Begin { full: true }), 1)
        .unwrap();
    write(&mut source, 3);
    exchange(&mut source, &mut target);
    apply_all(&mut target);
    assert!(!target.status().consistent);
    assert_eq!(target.gen_ids(), GenIds::NONE);
    let mut node = crate::node::Node::secondary(MetaRecord::new(VOLUME_ID, VOLUME_BYTES), target);
    let record = node.record(Seq(2), false);
    assert!(record.resyncing && record.resync_full && !record.consistent);
    let (record, _) = MetaRecord::decode(&record.encode(1)).unwrap();
    let facts = VolumeFacts {
        volume_id: VOLUME_ID,
        volume_bytes: VOLUME_BYTES,
        created: false,
    };
    let (restored, _) = recover(Some(&record), &facts).unwrap();
    let mut target = Target::new(new_target(FRESH).cfg.clone(), restored);
    source.on_disconnect();
    source.on_connect([4; MAC_BYTES]);
    target.on_connect(C, [5; MAC_BYTES], 0).unwrap();
    exchange(&mut source, &mut target);
    source.submit(Op::Resync(ResyncMark::End), 1).unwrap();
    exchange(&mut source, &mut target);
    apply_all(&mut target);
    assert!(target.status().consistent);
    assert_eq!(target.gen_ids(), testkit::PAIR_IDS);
    let mut node = crate::node::Node::secondary(record, target);
    let after = node.record(Seq(3), true);
    assert_eq!(
        (
            after.gen_ids,
            after.consistent,
            after.resyncing,
            after.resync_full
        ),
        (testkit::PAIR_IDS, true, false, false)
    );
}
