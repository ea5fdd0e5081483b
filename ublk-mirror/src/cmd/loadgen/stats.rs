//! Completion latencies and the summary `loadgen` prints.

use super::*;

/// Completion latencies in a log-linear histogram (about 3 % resolution, fixed memory).
#[derive(Debug)]
pub(super) struct Latencies {
    pub(super) buckets: Vec<u64>,
    pub(super) count: u64,
    pub(super) sum_ns: u128,
    pub(super) max_ns: u64,
}

const SUB_BUCKETS: u64 = 32;
/// Linear buckets below 64 ns, then 32 per power of two up to 2^64 ns.
const BUCKETS: usize = 64 + 58 * 32;

impl Latencies {
    pub(super) fn new() -> Latencies {
        Latencies {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }

    pub(super) fn index(ns: u64) -> usize {
        if ns < 2 * SUB_BUCKETS {
            return usize::try_from(ns).unwrap_or(0);
        }
        let msb = u64::from(63 - ns.leading_zeros());
        let shift = msb - 5;
        let sub = (ns >> shift) - SUB_BUCKETS;
        usize::try_from(2 * SUB_BUCKETS + (msb - 6) * SUB_BUCKETS + sub).unwrap_or(0)
    }

    /// The middle of bucket `index` in nanoseconds.
    pub(super) fn value(index: usize) -> u64 {
        let i = index as u64;
        if i < 2 * SUB_BUCKETS {
            return i;
        }
        let msb = (i - 2 * SUB_BUCKETS) / SUB_BUCKETS + 6;
        let sub = (i - 2 * SUB_BUCKETS) % SUB_BUCKETS + SUB_BUCKETS;
        let shift = msb - 5;
        (sub << shift) + (1 << shift) / 2
    }

    pub(super) fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if let Some(b) = self.buckets.get_mut(Self::index(ns)) {
            *b += 1;
        }
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    pub(super) fn mean_us(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.sum_ns as f64 / self.count as f64 / 1000.0
    }

    /// The latency below which `per_mille` thousandths of the samples lie.
    pub(super) fn quantile_us(&self, per_mille: u64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = (u128::from(per_mille) * u128::from(self.count)).div_ceil(1000);
        let rank = u64::try_from(rank).unwrap_or(u64::MAX).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(i).min(self.max_ns) as f64 / 1000.0;
            }
        }
        self.max_ns as f64 / 1000.0
    }
}

/// What `loadgen` prints (`--json`: one object).
#[derive(Debug, Serialize)]
pub(super) struct Summary {
    pub(super) mode: String,
    pub(super) qd: usize,
    pub(super) seed: u64,
    pub(super) block_bytes: u64,
    pub(super) writes: u64,
    pub(super) flushes: u64,
    pub(super) bytes: u64,
    pub(super) elapsed_s: f64,
    pub(super) iops: f64,
    pub(super) mib_s: f64,
    pub(super) lat_mean_us: f64,
    pub(super) lat_p50_us: f64,
    pub(super) lat_p99_us: f64,
    pub(super) lat_max_us: f64,
    pub(super) last_seq: u64,
    pub(super) replicated: bool,
    pub(super) drain_s: f64,
    pub(super) connects: u64,
    pub(super) disconnects: u64,
    /// Writes completed out of sync while the primary overflowed.
    pub(super) out_of_sync_writes: u64,
}

pub(super) fn print_summary(s: &Summary) {
    println!(
        "loadgen: mode {}, qd {}, seed {}, block {} bytes",
        s.mode, s.qd, s.seed, s.block_bytes
    );
    println!(
        "  {} writes + {} flushes, {:.1} MiB in {:.3} s: {:.0} IOPS, {:.1} MiB/s",
        s.writes,
        s.flushes,
        s.bytes as f64 / f64::from(1 << 20),
        s.elapsed_s,
        s.iops,
        s.mib_s
    );
    println!(
        "  completion latency: mean {:.0} us, p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        s.lat_mean_us, s.lat_p50_us, s.lat_p99_us, s.lat_max_us
    );
    if s.replicated {
        println!(
            "  target holds everything through seq {} ({:.3} s after the last completion); \
             connects {}, disconnects {}",
            s.last_seq, s.drain_s, s.connects, s.disconnects
        );
    } else {
        println!(
            "  last seq {} (not waited for); connects {}, disconnects {}",
            s.last_seq, s.connects, s.disconnects
        );
    }
    if s.out_of_sync_writes > 0 {
        println!(
            "  {} writes completed out of sync (the log was full or the target gone too long): \
             a resync carries them",
            s.out_of_sync_writes
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_a_few_percent() {
        let mut l = Latencies::new();
        for us in 1..=1000u64 {
            l.record(Duration::from_micros(us));
        }
        let p99 = l.quantile_us(990);
        assert!((p99 - 990.0).abs() < 990.0 * 0.04, "p99 {p99}");
        let p50 = l.quantile_us(500);
        assert!((p50 - 500.0).abs() < 500.0 * 0.04, "p50 {p50}");
        assert!((l.mean_us() - 500.5).abs() < 0.01);
        // Every index maps back into its own bucket.
        for ns in [0u64, 63, 64, 65, 1000, 123_456_789, u64::MAX / 3] {
            assert_eq!(
                Latencies::index(Latencies::value(Latencies::index(ns))),
                Latencies::index(ns)
            );
        }
    }
}
