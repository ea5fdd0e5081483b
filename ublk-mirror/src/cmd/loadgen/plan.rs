//! The workload's parameters and where its writes land.

use super::*;

/// Validated workload parameters.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) volume_blocks: u64,
    pub(super) block_bytes: u64,
    pub(super) max_blocks: u64,
    pub(super) writes: Option<u64>,
    pub(super) seconds: Option<f64>,
    pub(super) qd: usize,
    pub(super) seed: u64,
}

impl Plan {
    pub(super) fn new(args: &LoadgenArgs) -> anyhow::Result<Plan> {
        let block = args.block_bytes;
        mirror_core::block_shift(block).map_err(|e| anyhow::anyhow!("--block-bytes: {e}"))?;
        let block_bytes = u64::from(block);
        if args.volume_bytes == 0 || !args.volume_bytes.is_multiple_of(block_bytes) {
            bail!(
                "--volume-bytes {} must be a non-zero multiple of the {block}-byte block",
                args.volume_bytes
            );
        }
        if args.max_blocks == 0 {
            bail!("--max-blocks must be at least 1");
        }
        let max_blocks = u64::from(args.max_blocks);
        let largest = max_blocks * block_bytes;
        if largest > u64::from(PAYLOAD_BYTES_MAX) {
            bail!(
                "--max-blocks {} of {block} bytes exceeds the {PAYLOAD_BYTES_MAX}-byte frame limit",
                args.max_blocks
            );
        }
        if largest > args.log_bytes_max {
            bail!(
                "--log-bytes-max {} is smaller than the largest write ({largest} bytes)",
                args.log_bytes_max
            );
        }
        let volume_blocks = args.volume_bytes / block_bytes;
        if volume_blocks < max_blocks {
            bail!(
                "--volume-bytes {} is smaller than the largest write ({largest} bytes)",
                args.volume_bytes
            );
        }
        if args.qd == 0 || args.qd > 4096 {
            bail!("--qd {} must be between 1 and 4096", args.qd);
        }
        if let Some(s) = args.seconds {
            if !(s.is_finite() && s > 0.0 && s <= 86_400.0) {
                bail!("--seconds {s} must be between 0 and 86400");
            }
        }
        if args.log_entries_max == 0 {
            bail!("--log-entries-max must be at least 1");
        }
        let seed = match args.seed {
            Some(s) => s,
            None => getrandom::u64().context("no randomness for a seed; pass --seed")?,
        };
        Ok(Plan {
            volume_blocks,
            block_bytes,
            max_blocks,
            writes: match (args.ops, args.seconds) {
                (Some(n), _) => Some(n),
                (None, Some(_)) => None,
                (None, None) => Some(1000),
            },
            seconds: args.seconds,
            qd: args.qd,
            seed,
        })
    }
}

/// Chooses block ranges: random ones, or (`--distinct`) ranges inside slots of `max_blocks`
/// blocks visited in a scrambled order, each slot at most once.
#[derive(Debug)]
pub(super) struct Placer {
    pub(super) distinct: bool,
    pub(super) slots: u64,
    pub(super) stride: u64,
    pub(super) offset: u64,
    pub(super) used: u64,
}

impl Placer {
    pub(super) fn new(plan: &Plan, distinct: bool, rng: &mut fastrand::Rng) -> Placer {
        let slots = plan.volume_blocks / plan.max_blocks;
        // A stride coprime with the slot count visits every slot once: (stride * i + offset) mod
        // slots is a permutation.
        let mut stride = 1;
        for _ in 0..64 {
            let candidate = rng.u64(1..=slots.max(1));
            if gcd(candidate, slots) == 1 {
                stride = candidate;
                break;
            }
        }
        Placer {
            distinct,
            slots,
            stride,
            offset: rng.u64(0..slots.max(1)),
            used: 0,
        }
    }

    /// `(first block, blocks)` of the next write.
    pub(super) fn next(
        &mut self,
        plan: &Plan,
        rng: &mut fastrand::Rng,
    ) -> anyhow::Result<(u64, u64)> {
        let n = rng.u64(1..=plan.max_blocks);
        if !self.distinct {
            return Ok((rng.u64(0..=plan.volume_blocks - n), n));
        }
        if self.used >= self.slots {
            bail!(
                "--distinct: the volume has room for only {} distinct writes of up to {} blocks; \
                 use a larger --volume-bytes",
                self.slots,
                plan.max_blocks
            );
        }
        let slot = (u128::from(self.stride) * u128::from(self.used) + u128::from(self.offset))
            % u128::from(self.slots);
        self.used += 1;
        let slot = u64::try_from(slot).unwrap_or(0);
        let within = rng.u64(0..=plan.max_blocks - n);
        Ok((slot * plan.max_blocks + within, n))
    }
}

pub(super) fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_placement_never_repeats_a_slot_and_stops_when_full() {
        let seed = 7;
        println!("seed {seed}");
        let plan = Plan {
            volume_blocks: 1000,
            block_bytes: 4096,
            max_blocks: 8,
            writes: Some(125),
            seconds: None,
            qd: 1,
            seed,
        };
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut placer = Placer::new(&plan, true, &mut rng);
        let mut used = vec![false; 1000];
        for _ in 0..125 {
            let (first, n) = placer.next(&plan, &mut rng).unwrap();
            assert!(first + n <= 1000);
            for b in first..first + n {
                let b = usize::try_from(b).unwrap();
                assert!(!used[b], "block {b} written twice");
                used[b] = true;
            }
        }
        assert!(placer.next(&plan, &mut rng).is_err());
    }
}
