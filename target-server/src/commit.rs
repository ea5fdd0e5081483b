//! Overlapped group commit: the blocking half of the applier.
//!
//! A round writes one batch of operations to the volume. Rounds run on two I/O threads, and
//! syncing is a role rather than a step of every round: the round that finds no sync running
//! becomes the syncer. It syncs the volume (`fdatasync`), records the last seq written in the
//! metadata file, reports it durable, and repeats while rounds have written more in the meantime.
//! So the next batch is written while the last one syncs, and one sync covers everything written
//! while the one before it ran (a group as large as the sync is slow).
//!
//! [`Commit`] keeps what matters in order, whatever the threads do:
//! - round k writes only after round k-1 has written and been reported applied, so writes to one
//!   block land in sequence order and the engine sees them in the order it handed them out;
//! - a sync names only seqs whose writes returned before it started, so its `fdatasync` covers
//!   them;
//! - one syncer at a time, so records and durable reports only grow.
//!
//! Once anything fails, no round writes and nothing more is recorded or reported durable.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use mirror_core::target::Apply;
use mirror_core::Seq;

use crate::meta::{Meta, MetaFile};
use crate::volume::Volume;

/// Where rounds write, sync and record (the volume and its metadata file; a fake in tests).
pub(crate) trait Store {
    /// Writes one operation (positioned; no sync).
    fn apply(&self, a: &Apply) -> Result<(), String>;
    /// Makes every write that has returned durable.
    fn sync(&self) -> Result<(), String>;
    /// Durably records that everything up to `seq` is durable.
    fn record(&self, seq: Seq) -> Result<(), String>;
}

/// Whom rounds report to (the engine; a fake in tests). Called from the I/O threads, in order.
pub(crate) trait Report {
    /// The batch is written.
    fn applied(&self, batch: &[Apply]);
    /// Everything up to `seq` is synced and recorded.
    fn durable(&self, seq: Seq);
}

/// The server's store: the volume file and the metadata file, with the metadata every record
/// writes (its durable seq replaced).
#[derive(Debug)]
pub(crate) struct Disk<'a> {
    pub volume: &'a Volume,
    pub meta_file: &'a MetaFile,
    pub meta: Meta,
}

impl Store for Disk<'_> {
    fn apply(&self, a: &Apply) -> Result<(), String> {
        self.volume
            .apply(&a.op)
            .map_err(|e| format!("applying seq {}: {e}", a.seq))
    }

    fn sync(&self) -> Result<(), String> {
        self.volume.sync().map_err(|e| format!("fdatasync: {e}"))
    }

    fn record(&self, seq: Seq) -> Result<(), String> {
        let meta = Meta {
            durable: seq,
            ..self.meta
        };
        self.meta_file.update(&meta).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Default)]
struct State {
    /// Rounds up to this one have written their batch (rounds are numbered from 1).
    applied_round: u64,
    /// The last seq written, and the last one synced and recorded.
    applied: Seq,
    synced: Seq,
    /// A round is the syncer.
    syncing: bool,
    /// Why the first failure happened; nothing is written or recorded after it.
    failed: Option<String>,
}

/// The order between rounds (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Commit {
    state: Mutex<State>,
    changed: Condvar,
}

impl Commit {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the commit failed (the first reason is kept) and wakes every waiting round.
    pub(crate) fn fail(&self, why: String) {
        let mut s = self.lock();
        s.failed.get_or_insert(why);
        s.syncing = false;
        self.changed.notify_all();
    }

    /// The first failure, if any.
    pub(crate) fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Whether a sync is running or written seqs wait for one (false once failed).
    pub(crate) fn busy(&self) -> bool {
        let s = self.lock();
        s.failed.is_none() && (s.syncing || s.applied > s.synced)
    }

    /// Round `k` (from 1): waits for round k-1, writes `batch`, reports it applied, then syncs
    /// if no other round is syncing. On failure the commit is marked failed.
    pub(crate) fn run_round(
        &self,
        store: &impl Store,
        report: &impl Report,
        k: u64,
        batch: &[Apply],
    ) -> Result<(), String> {
        let result = self.write(store, report, k, batch).and_then(|syncer| {
            if syncer {
                self.sync_loop(store, report)
            } else {
                Ok(())
            }
        });
        if let Err(e) = &result {
            self.fail(e.clone());
        }
        result
    }

    /// Writes round k's batch in turn; returns whether this round became the syncer.
    fn write(
        &self,
        store: &impl Store,
        report: &impl Report,
        k: u64,
        batch: &[Apply],
    ) -> Result<bool, String> {
        {
            let mut s = self.lock();
            loop {
                if let Some(why) = &s.failed {
                    return Err(format!("not written after an earlier failure ({why})"));
                }
                if s.applied_round + 1 >= k {
                    break;
                }
                s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
        }
        for a in batch {
            store.apply(a)?;
        }
        report.applied(batch);
        let mut s = self.lock();
        s.applied_round = k;
        if let Some(a) = batch.last() {
            s.applied = a.seq;
        }
        self.changed.notify_all();
        let syncer = !s.syncing && s.applied > s.synced && s.failed.is_none();
        s.syncing |= syncer;
        Ok(syncer)
    }

    /// The syncer: syncs and records what is written until a sync finds nothing new.
    fn sync_loop(&self, store: &impl Store, report: &impl Report) -> Result<(), String> {
        loop {
            let seq = {
                let mut s = self.lock();
                if s.applied == s.synced || s.failed.is_some() {
                    s.syncing = false;
                    self.changed.notify_all();
                    return Ok(());
                }
                s.applied
            };
            store.sync()?;
            store.record(seq)?;
            // Reported before `synced` moves, so a later syncer cannot report a larger seq first.
            report.durable(seq);
            self.lock().synced = seq;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mirror_core::wire::Op;
    use mirror_core::Lba;
    use std::sync::Arc;
    use std::time::Duration;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Ev {
        Applied(u64),
        SyncStart(u64),
        SyncEnd(u64),
        Recorded(u64),
        Durable(u64),
    }

    /// Logs every call in the order it happened; syncs sleep `sync_ms` and fail from the
    /// `fail_sync`-th one on; with `rng`, every call first pauses up to 300 µs.
    #[derive(Default)]
    struct Fake {
        log: Mutex<Vec<Ev>>,
        sync_ms: u64,
        syncs: Mutex<u64>,
        fail_sync: Option<u64>,
        rng: Option<Mutex<fastrand::Rng>>,
    }

    impl Fake {
        fn push(&self, e: Ev) {
            self.log.lock().unwrap().push(e);
        }
        fn pause(&self) {
            if let Some(rng) = &self.rng {
                let us = rng.lock().unwrap().u64(0..300);
                std::thread::sleep(Duration::from_micros(us));
            }
        }
        fn events(&self) -> Vec<Ev> {
            self.log.lock().unwrap().clone()
        }
        fn count(&self, f: impl Fn(&Ev) -> bool) -> usize {
            self.events().iter().filter(|e| f(e)).count()
        }
    }

    impl Store for Fake {
        fn apply(&self, a: &Apply) -> Result<(), String> {
            self.pause();
            self.push(Ev::Applied(a.seq.0));
            Ok(())
        }
        fn sync(&self) -> Result<(), String> {
            let n = {
                let mut s = self.syncs.lock().unwrap();
                *s += 1;
                *s
            };
            self.push(Ev::SyncStart(n));
            std::thread::sleep(Duration::from_millis(self.sync_ms));
            self.pause();
            if self.fail_sync.is_some_and(|f| n >= f) {
                return Err("fdatasync: injected".into());
            }
            self.push(Ev::SyncEnd(n));
            Ok(())
        }
        fn record(&self, seq: Seq) -> Result<(), String> {
            self.pause();
            self.push(Ev::Recorded(seq.0));
            Ok(())
        }
    }

    impl Report for Fake {
        fn applied(&self, _batch: &[Apply]) {
            self.pause();
        }
        fn durable(&self, seq: Seq) {
            self.push(Ev::Durable(seq.0));
        }
    }

    fn batch(seqs: std::ops::Range<u64>) -> Vec<Apply> {
        seqs.map(|s| Apply {
            seq: Seq(s),
            op: Op::Write {
                lba: Lba(s),
                data: Bytes::from_static(&[0u8; 512]),
            },
        })
        .collect()
    }

    /// Runs the batches as rounds, as the applier does: at most two in flight, each started once
    /// `start_after` of the one before has passed.
    fn run_all(
        store: &Arc<Fake>,
        batches: Vec<Vec<Apply>>,
        start_after: Duration,
    ) -> (Arc<Commit>, Vec<Result<(), String>>) {
        let commit = Arc::new(Commit::default());
        let mut flight = std::collections::VecDeque::new();
        let mut results = Vec::new();
        for (i, b) in batches.into_iter().enumerate() {
            // Like the applier: a new round once either of the two in flight has finished.
            while flight.len() == 2 {
                match flight.iter().position(std::thread::JoinHandle::is_finished) {
                    Some(i) => results.push(flight.remove(i).unwrap().join().unwrap()),
                    None => std::thread::sleep(Duration::from_micros(100)),
                }
            }
            let (store, commit) = (Arc::clone(store), Arc::clone(&commit));
            flight.push_back(std::thread::spawn(move || {
                commit.run_round(&*store, &*store, i as u64 + 1, &b)
            }));
            std::thread::sleep(start_after);
        }
        results.extend(flight.into_iter().map(|h| h.join().unwrap()));
        (commit, results)
    }

    /// The module's invariants on one log: writes in seq order; every record names a seq all of
    /// whose writes returned before a sync that started after them and ended before the record;
    /// records only grow and each is reported durable right after.
    fn check(events: &[Ev]) {
        let mut last_applied = 0;
        let mut last_recorded = 0;
        // Per sync, the highest seq written when it started; the highest any finished sync covers.
        let mut covers = std::collections::HashMap::new();
        let mut durable_cover = 0;
        for (i, e) in events.iter().enumerate() {
            match *e {
                Ev::Applied(s) => {
                    assert!(
                        s > last_applied,
                        "event {i}: seq {s} after {last_applied}: {events:?}"
                    );
                    last_applied = s;
                }
                Ev::SyncStart(n) => {
                    covers.insert(n, last_applied);
                }
                Ev::SyncEnd(n) => durable_cover = durable_cover.max(covers[&n]),
                Ev::Recorded(s) => {
                    assert!(s > last_recorded, "event {i}: recorded {s}: {events:?}");
                    assert!(s <= durable_cover, "event {i}: recorded {s}: {events:?}");
                    assert_eq!(events.get(i + 1), Some(&Ev::Durable(s)), "event {i}");
                    last_recorded = s;
                }
                Ev::Durable(s) => assert_eq!(s, last_recorded, "event {i}: {events:?}"),
            }
        }
    }

    #[test]
    fn the_next_round_writes_while_the_last_one_syncs_and_one_sync_covers_it() {
        let store = Arc::new(Fake {
            sync_ms: 500,
            ..Fake::default()
        });
        // Round 1 syncs for 500 ms; rounds 2 and 3 arrive meanwhile.
        let batches = vec![batch(1..4), batch(4..6), batch(6..7)];
        let (commit, results) = run_all(&store, batches, Duration::from_millis(20));
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let ev = store.events();
        check(&ev);
        let at = |e: Ev| ev.iter().position(|x| *x == e).unwrap();
        // A serial commit would write 4 only after 3 is recorded.
        assert!(at(Ev::Applied(4)) < at(Ev::SyncEnd(1)), "{ev:?}");
        assert!(at(Ev::Applied(6)) < at(Ev::SyncEnd(1)), "{ev:?}");
        // Rounds 2 and 3 share the second sync: two syncs for three rounds.
        assert_eq!(store.count(|e| matches!(e, Ev::SyncStart(_))), 2, "{ev:?}");
        assert_eq!(ev.last(), Some(&Ev::Durable(6)), "{ev:?}");
        assert!(!commit.busy());
    }

    #[test]
    fn a_failed_sync_stops_every_later_write_and_record() {
        let store = Arc::new(Fake {
            sync_ms: 50,
            fail_sync: Some(1),
            ..Fake::default()
        });
        // Round 1 syncs and fails; round 2 writes while it syncs.
        let (commit, results) = run_all(
            &store,
            vec![batch(1..3), batch(3..4)],
            Duration::from_millis(10),
        );
        assert_eq!(
            results.iter().filter(|r| r.is_err()).count(),
            1,
            "{results:?}"
        );
        assert!(commit.failure().is_some_and(|f| f.contains("injected")));
        // A round after the failure writes nothing.
        let late = commit.run_round(&*store, &*store, 3, &batch(4..5));
        assert!(late.is_err_and(|e| e.contains("earlier failure")));
        let ev = store.events();
        assert!(!ev.contains(&Ev::Applied(4)), "{ev:?}");
        assert!(
            !ev.iter()
                .any(|e| matches!(e, Ev::Recorded(_) | Ev::Durable(_))),
            "nothing may be recorded or reported after a failed sync: {ev:?}"
        );
        assert!(!commit.busy());
    }

    #[test]
    fn random_schedules_keep_writes_syncs_and_records_in_order() {
        let seed = std::env::var("COMMIT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        println!("seed {seed} (replay with COMMIT_SEED={seed})");
        let mut rng = fastrand::Rng::with_seed(seed);
        for _ in 0..20 {
            let mut next = 1;
            let batches: Vec<Vec<Apply>> = (0..rng.usize(1..12))
                .map(|_| {
                    let n = rng.u64(1..4);
                    next += n;
                    batch(next - n..next)
                })
                .collect();
            let store = Arc::new(Fake {
                sync_ms: rng.u64(0..3),
                rng: Some(Mutex::new(fastrand::Rng::with_seed(rng.u64(..)))),
                ..Fake::default()
            });
            let gap = Duration::from_micros(rng.u64(0..500));
            let (commit, results) = run_all(&store, batches, gap);
            assert!(
                results.iter().all(Result::is_ok),
                "seed {seed}: {results:?}"
            );
            let ev = store.events();
            check(&ev);
            let applied: Vec<u64> = ev
                .iter()
                .filter_map(|e| match e {
                    Ev::Applied(s) => Some(*s),
                    _ => None,
                })
                .collect();
            assert_eq!(applied, (1..next).collect::<Vec<_>>(), "seed {seed}");
            // Nothing written is left without a sync once every round has returned.
            assert_eq!(
                ev.last(),
                Some(&Ev::Durable(next - 1)),
                "seed {seed}: {ev:?}"
            );
            assert!(!commit.busy(), "seed {seed}");
        }
    }
}
