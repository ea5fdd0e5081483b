//! Serializes overlapping writes across all queues, as DRBD does.
//!
//! The mirror applies writes in sequence-number order, and the sequence number is fixed when a
//! write is enqueued to the replicator. The local volume applies them in whatever order the local
//! writes land. For two overlapping writes in flight at once (possibly on different queues) the
//! two orders can differ, and the volumes end up different, silently. So every write (and
//! DISCARD / WRITE_ZEROES) first takes its byte range in a [`RangeGate`] shared by all queues,
//! and holds the [`Guard`] across both the enqueue and the local write: conflicting writes then
//! happen one after the other, in the same order on both sides.
//!
//! Rules: every [`RangeGate::acquire`] takes a ticket at the call (arrival order). A request is
//! admitted when no entry with an earlier ticket (admitted or still waiting) overlaps its range;
//! so overlapping requests are admitted in FIFO order (a writer is never starved), and a request
//! that overlaps nothing in the table never waits. An entry leaves the table when its [`Guard`]
//! (or its unfinished [`Acquire`] future) is dropped, which wakes the waiters it was holding up.
//! Admission is monotone: entries only join at the end, so an admissible request stays so.
//!
//! The table is bounded: each ublk tag holds at most one entry, so a gate built for
//! `queues × depth` entries can never hold more; an insert beyond that is a bug and panics.
//! Wakers may be called from any thread (the queue threads wrap them so they also ring their
//! io_uring).

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// One request in the table.
#[derive(Debug)]
struct Entry {
    ticket: u64,
    range: Range<u64>,
    admitted: bool,
    waker: Option<Waker>,
}

#[derive(Debug)]
struct Table {
    next_ticket: u64,
    /// In ticket order (new tickets join at the end).
    entries: Vec<Entry>,
}

/// Whether the two ranges share a byte (an empty range shares none).
fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

impl Table {
    fn index(&self, ticket: u64) -> Option<usize> {
        self.entries
            .binary_search_by_key(&ticket, |e| e.ticket)
            .ok()
    }

    /// Whether the entry at `i` may go: nothing before it overlaps its range.
    fn admissible(&self, i: usize) -> bool {
        let Some(me) = self.entries.get(i) else {
            return false;
        };
        !self
            .entries
            .iter()
            .take(i)
            .any(|e| overlaps(&e.range, &me.range))
    }

    /// Removes `ticket`'s entry and returns the wakers of the waiters that it alone held up.
    fn remove(&mut self, ticket: u64) -> Vec<Waker> {
        let Some(i) = self.index(ticket) else {
            return Vec::new();
        };
        let gone = self.entries.remove(i);
        let mut wake = Vec::new();
        // Only later entries overlapping the removed range can have become admissible.
        for j in i..self.entries.len() {
            let candidate = self.entries.get(j).is_some_and(|e| {
                !e.admitted && e.waker.is_some() && overlaps(&e.range, &gone.range)
            });
            if candidate && self.admissible(j) {
                if let Some(e) = self.entries.get_mut(j) {
                    e.admitted = true;
                    wake.extend(e.waker.take());
                }
            }
        }
        wake
    }
}

/// The range lock shared by all queues (see the module docs).
#[derive(Debug)]
pub struct RangeGate {
    capacity: usize,
    table: Mutex<Table>,
}

impl RangeGate {
    /// A gate for at most `capacity` requests at once (queues × depth).
    #[must_use]
    pub fn new(capacity: usize) -> Arc<RangeGate> {
        Arc::new(RangeGate {
            capacity,
            table: Mutex::new(Table {
                next_ticket: 0,
                entries: Vec::with_capacity(capacity),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table is consistent between statements; a panic elsewhere does not corrupt it.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a ticket for `range` (bytes) now; the future resolves to the [`Guard`] once no
    /// earlier request overlapping it is still in the table. Dropping the unfinished future gives
    /// the ticket back.
    ///
    /// # Panics
    /// If the table already holds `capacity` entries (a caller holding more than one entry per
    /// ublk tag: a bug).
    #[must_use = "the range is only held once the future has resolved, and until the guard drops"]
    pub fn acquire(self: &Arc<Self>, range: Range<u64>) -> Acquire {
        let mut t = self.lock();
        assert!(
            t.entries.len() < self.capacity,
            "range gate: more than {} requests in flight",
            self.capacity
        );
        let ticket = t.next_ticket;
        t.next_ticket += 1;
        t.entries.push(Entry {
            ticket,
            range,
            admitted: false,
            waker: None,
        });
        // The common case, decided under this lock: nothing earlier overlaps, so the first poll
        // need not look at the table again.
        let last = t.entries.len() - 1;
        let at_once = t.admissible(last);
        if let Some(e) = t.entries.get_mut(last) {
            e.admitted = at_once;
        }
        Acquire {
            gate: Some(self.clone()),
            ticket,
            at_once,
        }
    }

    /// Requests in the table (admitted or waiting).
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no request is in the table.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn release(&self, ticket: u64) {
        let wake = self.lock().remove(ticket);
        // Outside the lock: a waker may ring an eventfd or run arbitrary code.
        for w in wake {
            w.wake();
        }
    }
}

/// The pending admission of one request; resolves to its [`Guard`].
#[derive(Debug)]
pub struct Acquire {
    /// `None` once resolved (the guard owns the entry from then on).
    gate: Option<Arc<RangeGate>>,
    ticket: u64,
    /// Admitted when the ticket was taken.
    at_once: bool,
}

impl Future for Acquire {
    type Output = Guard;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Guard> {
        if self.at_once {
            if let Some(gate) = self.gate.take() {
                return Poll::Ready(Guard {
                    gate,
                    ticket: self.ticket,
                });
            }
        }
        let Some(gate) = self.gate.clone() else {
            panic!("range gate: Acquire polled after it resolved");
        };
        let ready = {
            let mut t = gate.lock();
            match t.index(self.ticket) {
                Some(i) => {
                    let go = t.entries.get(i).is_some_and(|e| e.admitted) || t.admissible(i);
                    if let Some(e) = t.entries.get_mut(i) {
                        if go {
                            e.admitted = true;
                            e.waker = None;
                        } else {
                            // The waker can differ from one poll to the next: keep the latest.
                            match &e.waker {
                                Some(w) if w.will_wake(cx.waker()) => {}
                                _ => e.waker = Some(cx.waker().clone()),
                            }
                        }
                    }
                    go
                }
                // Cannot happen (only this future and its guard remove the entry); admit rather
                // than hang.
                None => true,
            }
        };
        if !ready {
            return Poll::Pending;
        }
        self.gate = None;
        Poll::Ready(Guard {
            gate,
            ticket: self.ticket,
        })
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.release(self.ticket);
        }
    }
}

/// Holds a range; dropping it lets the next overlapping request go.
#[derive(Debug)]
#[must_use = "dropping the guard releases the range at once"]
pub struct Guard {
    gate: Arc<RangeGate>,
    ticket: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.gate.release(self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::task::Wake;
    use std::time::Duration;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count::default());
        (c.clone(), Waker::from(c))
    }

    fn poll(a: &mut Acquire, w: &Waker) -> Option<Guard> {
        match Pin::new(a).poll(&mut Context::from_waker(w)) {
            Poll::Ready(g) => Some(g),
            Poll::Pending => None,
        }
    }

    #[test]
    fn non_overlapping_requests_never_wait() {
        let gate = RangeGate::new(8);
        let (c, w) = counter();
        let mut a = gate.acquire(0..4096);
        let mut b = gate.acquire(4096..8192);
        let mut z = gate.acquire(100..100); // empty: overlaps nothing
        let ga = poll(&mut a, &w).expect("first request goes at once");
        let gb = poll(&mut b, &w).expect("an adjacent range does not overlap");
        let gz = poll(&mut z, &w).expect("an empty range does not overlap");
        assert_eq!(gate.len(), 3);
        drop((ga, gb, gz));
        assert!(gate.is_empty());
        assert_eq!(c.0.load(Ordering::SeqCst), 0, "nobody waited, nobody woken");
    }

    #[test]
    fn overlapping_requests_go_in_arrival_order() {
        let gate = RangeGate::new(8);
        let (c, w) = counter();
        let mut a = gate.acquire(0..8192);
        let mut b = gate.acquire(4096..12288);
        let ga = poll(&mut a, &w).expect("a goes");
        assert!(poll(&mut b, &w).is_none(), "b overlaps a: waits");
        assert!(poll(&mut b, &w).is_none(), "still waits while a holds");
        drop(ga);
        assert_eq!(c.0.load(Ordering::SeqCst), 1, "releasing a wakes b once");
        let gb = poll(&mut b, &w).expect("b goes after a");
        drop(gb);
        assert!(gate.is_empty());
    }

    #[test]
    fn overlapping_waiters_are_fifo_and_not_starved() {
        // a holds [0,8K); b wants [4K,12K) and waits; c wants [8K,16K): it does not overlap a,
        // but b came first and overlaps it, so c waits for b (no overtaking an older waiter).
        // d, later, wants [0,4K) only: it waits for a but not for b or c.
        let gate = RangeGate::new(8);
        let (cb, wb) = counter();
        let (cc, wc) = counter();
        let (cd, wd) = counter();
        let mut a = gate.acquire(0..8192);
        let mut b = gate.acquire(4096..12288);
        let mut c = gate.acquire(8192..16384);
        let mut d = gate.acquire(0..4096);
        let mut e = gate.acquire(1 << 20..(1 << 20) + 4096);
        let ga = poll(&mut a, &wb).expect("a goes");
        assert!(poll(&mut b, &wb).is_none());
        assert!(
            poll(&mut c, &wc).is_none(),
            "c must not overtake the older b"
        );
        assert!(poll(&mut d, &wd).is_none());
        let ge = poll(&mut e, &wd).expect("e overlaps nothing: goes at once");
        drop(ga);
        assert_eq!(cb.0.load(Ordering::SeqCst), 1, "b woken");
        assert_eq!(cc.0.load(Ordering::SeqCst), 0, "c still blocked by b");
        assert_eq!(cd.0.load(Ordering::SeqCst), 1, "d woken: only a blocked it");
        let gd = poll(&mut d, &wd).expect("d goes");
        assert!(poll(&mut c, &wc).is_none(), "c still waits for b");
        let gb = poll(&mut b, &wb).expect("b goes");
        drop(gb);
        assert_eq!(cc.0.load(Ordering::SeqCst), 1, "c woken by b's release");
        let gc = poll(&mut c, &wc).expect("c goes");
        drop((gc, gd, ge));
        assert!(gate.is_empty());
    }

    #[test]
    fn a_new_request_waits_for_an_older_waiter_that_overlaps_it() {
        // Many writers to the same block: each is admitted strictly after the previous one.
        let gate = RangeGate::new(16);
        let (_c, w) = counter();
        let mut reqs: Vec<Acquire> = (0..10).map(|_| gate.acquire(0..512)).collect();
        for i in 0..reqs.len() {
            for later in reqs.iter_mut().skip(i + 1) {
                assert!(poll(later, &w).is_none(), "a later writer overtook #{i}");
            }
            let g = poll(&mut reqs[i], &w).expect("the oldest writer goes");
            drop(g);
        }
        assert!(gate.is_empty());
    }

    #[test]
    fn dropping_an_unfinished_acquire_gives_the_ticket_back() {
        let gate = RangeGate::new(4);
        let (c, w) = counter();
        let mut a = gate.acquire(0..4096);
        let mut b = gate.acquire(0..4096);
        let mut d = gate.acquire(0..4096);
        let ga = poll(&mut a, &w).expect("a goes");
        assert!(poll(&mut b, &w).is_none());
        assert!(poll(&mut d, &w).is_none());
        drop(b); // cancelled while waiting
        assert_eq!(c.0.load(Ordering::SeqCst), 0, "d still waits for a");
        drop(ga);
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        let gd = poll(&mut d, &w).expect("d goes");
        drop(gd);
        assert!(gate.is_empty());
    }

    #[test]
    #[should_panic(expected = "more than 2 requests in flight")]
    fn the_table_is_bounded() {
        let gate = RangeGate::new(2);
        let _a = gate.acquire(0..1);
        let _b = gate.acquire(10..11);
        let _c = gate.acquire(20..21);
    }

    #[test]
    fn a_release_on_another_thread_wakes_the_waiter() {
        let gate = RangeGate::new(4);
        let held = smol::block_on(gate.acquire(0..8192));
        let (tx, rx) = mpsc::channel();
        let g2 = gate.clone();
        let waiter = std::thread::spawn(move || {
            let acq = g2.acquire(4096..8192);
            tx.send(()).expect("main thread is waiting");
            let guard = smol::block_on(acq);
            drop(guard);
            "admitted"
        });
        rx.recv().expect("the waiter registered");
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "the waiter went while the range was held"
        );
        drop(held);
        assert_eq!(waiter.join().expect("waiter thread"), "admitted");
        assert!(gate.is_empty());
    }

    /// Threads hammer a few overlapping ranges; each range holder checks that no overlapping
    /// holder is inside at the same time (and every thread finishes: nobody starves or hangs).
    #[test]
    fn concurrent_holders_of_overlapping_ranges_exclude_each_other() {
        // GATE_SEED=<seed> replays a run.
        let seed = std::env::var("GATE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        println!("seed {seed} (GATE_SEED={seed} replays it)");
        let threads = 4;
        let per_thread = 300;
        let gate = RangeGate::new(threads);
        // blocks of 4 KiB in a 64 KiB region; each holder marks its blocks
        let marks: Arc<Vec<AtomicUsize>> = Arc::new((0..16).map(|_| AtomicUsize::new(0)).collect());
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let gate = gate.clone();
                let marks = marks.clone();
                std::thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(seed ^ (t as u64 + 1));
                    for _ in 0..per_thread {
                        let first = rng.usize(0..16);
                        let n = rng.usize(1..=(16 - first).min(4));
                        let range = (first as u64 * 4096)..((first + n) as u64 * 4096);
                        let guard = smol::block_on(gate.acquire(range));
                        for m in &marks[first..first + n] {
                            assert_eq!(m.swap(1, Ordering::SeqCst), 0, "overlapping holders");
                        }
                        if rng.bool() {
                            std::thread::yield_now();
                        }
                        for m in &marks[first..first + n] {
                            m.store(0, Ordering::SeqCst);
                        }
                        drop(guard);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .expect("a holder thread panicked (see the seed above)");
        }
        assert!(gate.is_empty());
    }
}
