//! The deterministic simulator over many seeds, the proof that its checkers bite (engines broken
//! on purpose through their sabotage switches, which only these tests turn on), and determinism.
//!
//! `SIM_SEED_START` and `SIM_SEEDS` choose the seeds of `many_seeds_hold_every_invariant`
//! (default 1..=2000). A failure prints the seed and `scripts/sim --seed N` to replay it.

use std::time::Instant;

use mirror_core::commit::CommitSabotage;
use mirror_core::lock::LocalRetrySabotage;
use mirror_core::node::{PeerSabotage, PrimaryRecoverySabotage};
use mirror_core::session::SessionSabotage;
use mirror_core::sim::{self, Check, SimOptions, SimReport, SourceCrashSabotage};
use mirror_core::source::SourceSabotage;
use mirror_core::target::{RecoverySabotage, TargetSabotage};

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text} is not a non-negative integer")),
        Err(_) => default,
    }
}

#[test]
fn many_seeds_hold_every_invariant() {
    let start = env_u64("SIM_SEED_START", 1);
    let count = env_u64("SIM_SEEDS", 2000);
    let opts = SimOptions::default();
    println!(
        "simulating seeds {start}..={} ({} ops each)",
        start + count - 1,
        opts.ops
    );
    let began = Instant::now();
    let mut totals = SimReport::default();
    let mut failures = Vec::new();
    for seed in start..start + count {
        match sim::run(seed, &opts) {
            Ok(report) => totals.add(&report),
            Err(v) => {
                println!("FAILED: {v}");
                failures.push(v);
            }
        }
    }
    println!(
        "{count} seeds in {:.1} s: {} failed; {totals:?}",
        began.elapsed().as_secs_f64(),
        failures.len()
    );
    if let Some(first) = failures.first() {
        panic!(
            "{} of {count} seeds violated an invariant; first: {first}\nreplay with: {}",
            failures.len(),
            first.replay_command()
        );
    }
    // Only meaningful over the default range: every mechanism must have happened many times.
    if count >= 2000 {
        let floor = count / 50;
        let exercised = [
            ("NAK", totals.naks),
            ("REJECT", totals.rejects),
            ("GRANTED", totals.granted),
            ("injected disconnect", totals.disconnects),
            ("reset after corruption", totals.resets),
            ("handshake", totals.handshakes),
            ("crash", totals.crashes),
            ("intruder (silent or forged AUTH)", totals.intruders),
            (
                "crash with part of the page cache written",
                totals.partial_crashes,
            ),
            ("clean restart", totals.clean_restarts),
            ("local lock", totals.local_locks),
            ("local lock refused", totals.local_lock_refusals),
            ("mode switch", totals.mode_switches),
            ("completion in async", totals.completed_async),
            ("completion in received", totals.completed_received),
            ("completion in sync", totals.completed_sync),
            (
                "completion in lock-then-write",
                totals.completed_lock_then_write,
            ),
            ("step while target inconsistent", totals.inconsistent_steps),
            ("corrupted header", totals.corrupt_headers),
            ("corrupted payload", totals.corrupt_payloads),
            ("host waiting for the rollback log", totals.log_full_waits),
            (
                "target waiting for its commit log",
                totals.commit_full_waits,
            ),
            ("discard", totals.discards),
            ("write-zeroes", totals.write_zeroes),
            ("flush", totals.flushes),
            ("source crash", totals.source_crashes),
            (
                "host operation failed by a source crash",
                totals.host_ops_failed,
            ),
            (
                "durable-acked operation checked across a source crash",
                totals.acked_durable_kept,
            ),
            (
                "acknowledged write the target lacked, carried by a resync",
                totals.acked_writes_resynced,
            ),
            (
                "restart after a crash that resynced from the write intent",
                totals.source_resyncs,
            ),
            ("clean stop of the source", totals.clean_source_stops),
            (
                "restart that resumed from the record of a clean stop",
                totals.source_resumes,
            ),
        ];
        for (what, n) in exercised {
            assert!(
                n >= floor,
                "{what} happened only {n} times over {count} seeds (want >= {floor})"
            );
        }
    }
}

/// A target whose volume is replaced (unknown content, no metadata) under it, as the target server
/// starts on it: recovery never trusts it, so the prefix check never sees it claim consistency; a
/// running primary that finds it at a handshake (its generation ids show none of the primary's
/// history) has it continue after its own seq and copies the whole volume into it while host
/// writes go on, a restarted one copies it before host writes; after either every check applies
/// again and quiescence proves the copy.
#[test]
fn a_replaced_target_volume_is_never_trusted_and_is_copied_in_full() {
    let opts = SimOptions {
        replace_target_volume: true,
        ..SimOptions::default()
    };
    let mut totals = SimReport::default();
    for seed in 1..=400 {
        match sim::run(seed, &opts) {
            Ok(report) => totals.add(&report),
            Err(v) => panic!("{v}\nreplay with: {}", v.replay_command()),
        }
    }
    println!("{totals:?}");
    assert!(totals.replaced_volumes >= 40, "{totals:?}");
    assert!(totals.target_losses_found >= 20, "{totals:?}");
    assert!(totals.full_resyncs >= 20, "{totals:?}");
}

/// A source that takes a target's history for its own (no generation-id check) resends into a
/// replaced volume, or resyncs only its write intent into it after a restart.
#[test]
fn ignoring_the_generation_ids_is_caught() {
    let opts = SimOptions {
        replace_target_volume: true,
        source_sabotage: SourceSabotage::IgnoreGenIds,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::Protocol, Check::Quiescence]);
}

/// A target that takes the source's history when a full resync begins: a primary restarted
/// before the end resyncs only its write intent, and the copy stays partial.
#[test]
fn adopting_the_history_before_a_full_resync_ends_is_caught() {
    let opts = SimOptions {
        replace_target_volume: true,
        target_sabotage: TargetSabotage::AdoptIdsAtBegin,
        ..SimOptions::default()
    };
    // The partial copy stays inconsistent: the peer-status check sees the primary call it up to
    // date, or quiescence finds it inconsistent.
    assert_caught_by(
        &opts,
        2000,
        &[Check::PeerStatus, Check::Quiescence, Check::Protocol],
    );
}

/// A primary that finds its target's volume lost while it runs and only resends its log into
/// it (a full bracket around no copy): the target takes the history over data it never got.
#[test]
fn resending_only_the_log_into_a_lost_volume_is_caught() {
    let opts = SimOptions {
        replace_target_volume: true,
        peer_sabotage: PeerSabotage::LostDataResentOnly,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::Prefix, Check::Quiescence]);
}

/// A primary that queues writes while an overflow's resync has not begun (no Ahead rule): the
/// target applies them and calls itself consistent in a state the source volume never was in
/// (the writes out of sync before them missing). The prefix check replays the writes out of
/// sync where they happened, so it sees that.
#[test]
fn queueing_writes_before_an_overflow_resync_begins_is_caught() {
    let opts = SimOptions {
        peer_sabotage: PeerSabotage::NoAheadRule,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 1000, &[Check::Prefix]);
}

/// A primary whose status calls its peer up to date once the peer received everything, not
/// once it made it durable (issue 14: status never reports up to date when it is not).
#[test]
fn reporting_the_peer_up_to_date_early_is_caught() {
    let opts = SimOptions {
        peer_sabotage: PeerSabotage::UpToDateEarly,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::PeerStatus]);
}

/// A primary that completes writes while it overflows without marking their chunks out of
/// sync: nothing carries them to the target (issue 14: a sabotage that drops a bitmap bit).
#[test]
fn overflowing_without_marking_the_chunks_is_caught() {
    let opts = SimOptions {
        peer_sabotage: PeerSabotage::OverflowUnmarked,
        ..SimOptions::default()
    };
    assert_caught_by(
        &opts,
        200,
        &[Check::WriteIntent, Check::Quiescence, Check::Prefix],
    );
}

/// An overflow's resync that forgets a write into the chunk it is copying (the piece already
/// read lacks it).
#[test]
fn a_copy_that_forgets_a_rewrite_of_its_chunk_is_caught() {
    let opts = SimOptions {
        peer_sabotage: PeerSabotage::CopyIgnoresRewrites,
        ..SimOptions::default()
    };
    assert_caught_by(
        &opts,
        500,
        &[Check::WriteIntent, Check::Quiescence, Check::Prefix],
    );
}

/// A primary whose status calls its peer up to date while chunks written during an overflow
/// have not reached it.
#[test]
fn reporting_the_peer_up_to_date_while_overflowing_is_caught() {
    let opts = SimOptions {
        peer_sabotage: PeerSabotage::UpToDateOverflowing,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::PeerStatus]);
}

/// A primary that never records its peer as outdated when writes go out of sync.
#[test]
fn not_recording_an_outdated_peer_is_caught() {
    let opts = SimOptions {
        peer_sabotage: PeerSabotage::OutdatedUnrecorded,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::PeerStatus]);
}

/// Recovery trusting a volume without a record (the rule the target server runs).
#[test]
fn trusting_a_replaced_volume_is_caught_by_the_prefix_check() {
    let opts = SimOptions {
        replace_target_volume: true,
        recovery_sabotage: RecoverySabotage::TrustAdopted,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::Prefix]);
}

/// The primary's per-peer policy stopping for good on an error a reconnect cures (a target
/// that lost its data, a busy one, a frame the link broke): the simulator's runs meet no fatal
/// error, so any stop fails them.
#[test]
fn stopping_on_a_retryable_error_is_caught() {
    let opts = SimOptions {
        replace_target_volume: true,
        peer_sabotage: PeerSabotage::StopOnRetryable,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::Protocol]);
}

/// The daemon's stop (the same `PeerLink` drain the replicator runs) reporting that the target holds
/// everything before it does.
#[test]
fn draining_early_is_caught_by_the_acknowledged_durable_check() {
    let opts = SimOptions {
        peer_sabotage: PeerSabotage::DrainEarly,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::AckedDurable]);
}

/// The primary's recovery rule (the one the daemon and loadgen run) resuming from the record of an
/// unclean stop: the new sequence starts where the record of the last start says, reusing seqs
/// the host's later writes already had (and that the target may hold).
#[test]
fn resuming_after_an_unclean_stop_is_caught_by_the_protocol_check() {
    let opts = SimOptions {
        primary_recovery_sabotage: PrimaryRecoverySabotage::TrustUnclean,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::Protocol]);
}

/// Runs seeds `1..=seeds` with a sabotaged engine and returns the first violation.
fn first_violation(opts: &SimOptions, seeds: u64) -> sim::Violation {
    for seed in 1..=seeds {
        if let Err(v) = sim::run(seed, opts) {
            println!("sabotage caught: {v}");
            return v;
        }
    }
    panic!("no seed in 1..={seeds} caught the sabotage {opts:?}");
}

fn assert_caught_by(opts: &SimOptions, seeds: u64, expected: &[Check]) {
    let v = first_violation(opts, seeds);
    assert!(
        expected.contains(&v.check),
        "expected a violation of {expected:?}, got: {v}"
    );
    assert!(v
        .to_string()
        .contains(&format!("scripts/sim --seed {}", v.seed)));
}

#[test]
fn apply_out_of_order_is_caught_by_the_prefix_check() {
    let opts = SimOptions {
        target_sabotage: TargetSabotage::ApplyOutOfOrder,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 50, &[Check::Prefix]);
}

#[test]
fn ignoring_reject_is_caught_as_no_progress() {
    let opts = SimOptions {
        source_sabotage: SourceSabotage::IgnoreReject,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::NoProgress]);
}

#[test]
fn releasing_on_received_is_caught_by_the_rollback_log_check() {
    let opts = SimOptions {
        source_sabotage: SourceSabotage::ReleaseOnReceived,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 50, &[Check::RollbackLog]);
}

/// The group-commit planner (the same one the target server runs) acknowledging durability before
/// the sync: a crash then loses what the source was told is durable.
#[test]
fn durable_before_sync_is_caught() {
    let opts = SimOptions {
        commit_sabotage: CommitSabotage::DurableBeforeSync,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::AckedDurable, Check::RollbackLog]);
}

/// The recovery rule (the same one the target server runs) trusting an unclean stop: the volume
/// holds part of a batch past the durable seq while the target claims to be consistent.
#[test]
fn trusting_an_unclean_stop_is_caught_by_the_prefix_check() {
    let opts = SimOptions {
        recovery_sabotage: RecoverySabotage::TrustUnclean,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 500, &[Check::Prefix]);
}

/// Admission (issue 13, item 9a): a forged HELLO taken before its AUTH verified makes a target
/// restarted after an unclean stop claim consistency its volume does not have.
#[test]
fn trusting_a_hello_before_its_auth_is_caught_by_the_prefix_check() {
    let opts = SimOptions {
        target_sabotage: TargetSabotage::TrustHelloBeforeAuth,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 500, &[Check::Prefix]);
}

/// The source's session policy (the one the daemon runs) never reconnecting after a loss.
#[test]
fn never_reconnecting_is_caught_as_no_progress() {
    let opts = SimOptions {
        session_sabotage: SessionSabotage::NeverReconnect,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::NoProgress]);
}

/// The primary's per-peer policy telling the waiters "durable through N" for what the target
/// only received.
#[test]
fn reporting_received_as_durable_is_caught_by_the_acknowledged_durable_check() {
    let opts = SimOptions {
        peer_sabotage: PeerSabotage::DurableEarly,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::AckedDurable]);
}

/// The source's session keeping a connection on which nothing arrives (no idle timeout): a link
/// that went silent for good, a peer gone without a FIN, holds replication up forever.
#[test]
fn keeping_a_silent_connection_is_caught_as_no_progress() {
    let opts = SimOptions {
        session_sabotage: SessionSabotage::KeepSilent,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 1000, &[Check::NoProgress]);
}

/// The source's session never probing an idle connection: its idle timeout then drops a healthy
/// link whenever the host pauses (the checker allows a drop only while the link is silent).
#[test]
fn never_pinging_an_idle_connection_is_caught() {
    let opts = SimOptions {
        session_sabotage: SessionSabotage::NeverPing,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 300, &[Check::Protocol]);
}

/// The target's idle timeout counted from the session's AUTH instead of its last frame: it
/// closes healthy sessions that outlive it (the checker allows that only on a silent link).
#[test]
fn timing_out_a_talking_session_on_the_target_is_caught() {
    let opts = SimOptions {
        target_sabotage: TargetSabotage::IdleFromAuth,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 300, &[Check::Protocol]);
}

/// The primary never storing its write intent before a write reaches its local volume: a source
/// crash then leaves writes the target lacks that nothing on disk records.
#[test]
fn skipping_the_write_intent_store_is_caught_at_a_source_crash() {
    let opts = SimOptions {
        peer_sabotage: PeerSabotage::SkipIntentStore,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::WriteIntent]);
}

/// The primary's per-peer policy (the replicator's) losing the submission it parked while the
/// rollback log was full.
#[test]
fn dropping_a_parked_submission_is_caught() {
    let opts = SimOptions {
        peer_sabotage: PeerSabotage::DropParked,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::Protocol]);
}

/// A local lock holder that retries past its deadline (the target server's `lock_region` would
/// never return `LockTimeout`).
#[test]
fn retrying_a_local_lock_past_its_deadline_is_caught() {
    let opts = SimOptions {
        local_retry_sabotage: LocalRetrySabotage::NoDeadline,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 300, &[Check::LocalLock]);
}

#[test]
fn ignoring_local_locks_is_caught_by_the_local_lock_check() {
    let opts = SimOptions {
        target_sabotage: TargetSabotage::IgnoreLocalLocks,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::LocalLock]);
}

/// A dying source process that completes its in-flight host writes as if they had succeeded: in
/// `sync` they were never durable on the target when the restarted primary continues after it.
#[test]
fn acking_in_flight_writes_at_a_source_crash_is_caught_by_the_crash_survival_check() {
    let opts = SimOptions {
        source_crash_sabotage: SourceCrashSabotage::AckInFlight,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::SurvivesSourceCrash]);
    // Not one lucky seed: several catch it, each with this check alone.
    let caught: Vec<sim::Violation> = (1..=100)
        .filter_map(|seed| sim::run(seed, &opts).err())
        .collect();
    println!("{} of seeds 1..=100 caught the sabotage", caught.len());
    assert!(
        caught.len() >= 3,
        "only {} of seeds 1..=100 caught it",
        caught.len()
    );
    for v in &caught {
        assert_eq!(v.check, Check::SurvivesSourceCrash, "{v}");
    }
}

/// A chunk of the stored write intent lost before the restart reads it: its writes the target
/// lacks are never resynced, and the volumes never converge.
#[test]
fn forgetting_a_chunk_of_the_write_intent_is_caught_by_the_quiescence_check() {
    let opts = SimOptions {
        source_crash_sabotage: SourceCrashSabotage::ForgetIntentChunk,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 200, &[Check::Quiescence]);
}

/// A target that takes no notice of resync marks claims consistency while it holds chunks of
/// the source's current data over an older state.
#[test]
fn ignoring_resync_marks_is_caught_by_the_resync_bracket_check() {
    let opts = SimOptions {
        target_sabotage: TargetSabotage::IgnoreResyncMarks,
        ..SimOptions::default()
    };
    assert_caught_by(&opts, 300, &[Check::ResyncBracket]);
}

#[test]
fn a_seed_replays_to_the_same_report() {
    let opts = SimOptions::default();
    for seed in [7u64, 1234, 987_654_321] {
        let a = sim::run(seed, &opts);
        let b = sim::run(seed, &opts);
        println!("seed {seed}: {a:?}");
        assert_eq!(a, b, "seed {seed} is not deterministic");
        let report = a.unwrap_or_else(|v| panic!("{v}"));
        assert!(report.steps > 0 && report.ops == opts.ops as u64);
    }
    // Different seeds choose different runs.
    assert_ne!(sim::run(1, &opts), sim::run(2, &opts));
}

#[test]
fn an_empty_workload_is_quiescent_at_once() {
    let opts = SimOptions {
        ops: 0,
        ..SimOptions::default()
    };
    let report = sim::run(3, &opts).unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(report.ops, 0);
    assert_eq!(report.crashes, 0);
}
