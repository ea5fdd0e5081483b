//! The counters of a run.

use std::fmt;

/// What happened during a run (equal for equal seeds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// The configuration the seed chose, in one line.
    pub config: String,
    /// Events processed.
    pub steps: u64,
    /// Simulated time at quiescence.
    pub ticks: u64,
    /// Host operations submitted (each completed, or failed by a source crash).
    pub ops: u64,
    /// Host writes.
    pub writes: u64,
    /// Host discards.
    pub discards: u64,
    /// Host write-zeroes.
    pub write_zeroes: u64,
    /// Host flushes.
    pub flushes: u64,
    /// Frames put on the link (both directions).
    pub frames: u64,
    /// Bytes put on the link (both directions).
    pub wire_bytes: u64,
    /// Frames whose header was corrupted.
    pub corrupt_headers: u64,
    /// Frames whose payload was corrupted.
    pub corrupt_payloads: u64,
    /// NAK frames the source received.
    pub naks: u64,
    /// REJECT frames the source received.
    pub rejects: u64,
    /// GRANTED frames the source received.
    pub granted: u64,
    /// Injected disconnects.
    pub disconnects: u64,
    /// Connections reset by a receiver after a corrupted frame.
    pub resets: u64,
    /// Handshakes completed (source reached "connected").
    pub handshakes: u64,
    /// Connections the target closed on its own (a handshake past its deadline).
    pub target_closes: u64,
    /// Target crashes losing volatile data.
    pub crashes: u64,
    /// Connections of someone without the secret (silent, or with a forged AUTH).
    pub intruders: u64,
    /// Crashes where some volatile blocks reached the durable image anyway.
    pub partial_crashes: u64,
    /// Clean target restarts.
    pub clean_restarts: u64,
    /// Local locks granted on the target.
    pub local_locks: u64,
    /// Local lock attempts refused (busy or too many).
    pub local_lock_refusals: u64,
    /// Times the primary stored its write intent before a write.
    pub intent_stores: u64,
    /// Local lock holders that gave up retrying at their deadline.
    pub local_lock_timeouts: u64,
    /// Run-time mode switches.
    pub mode_switches: u64,
    /// Host operations completed while the mode was `async`.
    pub completed_async: u64,
    /// ... `received`.
    pub completed_received: u64,
    /// ... `sync`.
    pub completed_sync: u64,
    /// ... `lock-then-write`.
    pub completed_lock_then_write: u64,
    /// Host operations that waited because the rollback log was full.
    pub log_full_waits: u64,
    /// Host operations completed out of sync while the primary overflowed.
    pub out_of_sync_writes: u64,
    /// Host writes queued, not overflowed, because an overflow's resync did not converge.
    pub throttled_writes: u64,
    /// Overflow copies that entered the log ahead of a throttled host write waiting for room
    /// (the copies' reserve).
    pub copies_past_parked: u64,
    /// Resyncs of an overflow (interleaved with host operations).
    pub overflow_resyncs: u64,
    /// Bytes those copied.
    pub overflow_copy_bytes: u64,
    /// Overflow resync steps taken back because a host operation waited for room.
    pub overflow_steps_withdrawn: u64,
    /// Times the target stopped reading because its commit log was full.
    pub commit_full_waits: u64,
    /// Steps during which the target reported itself inconsistent.
    pub inconsistent_steps: u64,
    /// Largest rollback log, bytes.
    pub log_bytes_peak: u64,
    /// Largest commit log, entries.
    pub commit_entries_peak: u64,
    /// Source process crashes (memory lost, local volume kept).
    pub source_crashes: u64,
    /// Restarts after a crash that resynced the chunks of the stored write intent.
    pub source_resyncs: u64,
    /// Bytes those resyncs copied.
    pub resync_copy_bytes: u64,
    /// Handshakes of a restarted primary the target refused until what it took was durable.
    pub resync_admission_refusals: u64,
    /// Host operations in flight at a source crash, failed back to the host.
    pub host_ops_failed: u64,
    /// Operations completed with the promise "durable on the target" before a source crash,
    /// found durable on the target when the restarted primary continued after it.
    pub acked_durable_kept: u64,
    /// Data operations completed before a source crash in a mode that promised only the local
    /// volume (`async`) or the target's commit log (`received`) that the target lacked when the
    /// restarted primary continued after it: only the resync carries them (quiescence proves
    /// it did).
    pub acked_writes_resynced: u64,
    /// Clean stops of the source (the operator's `stop`: drained, recorded clean).
    pub clean_source_stops: u64,
    /// Restarts that continued the sequence from the record of a clean stop.
    pub source_resumes: u64,
    /// Target volumes replaced by one of unknown content (`replace_target_volume`).
    pub replaced_volumes: u64,
    /// Handshakes of a running primary that found its target without its history (a replaced
    /// volume): each asked the target to continue after its seq and copied it in full.
    pub target_losses_found: u64,
    /// Full resyncs of a target that held none of the primary's history (after a replaced
    /// volume), by a running or a restarted primary.
    pub full_resyncs: u64,
    /// Times the link fell silent (frames held both ways, neither end told).
    pub silences: u64,
    /// PINGs the source's session sent on an idle connection.
    pub pings: u64,
    /// Connections the source's session dropped because nothing arrived for its idle timeout.
    pub silent_drops: u64,
    /// Sessions the target closed because nothing arrived for its idle timeout.
    pub target_idle_closes: u64,
    /// Pauses of the host longer than the idle timeout.
    pub host_pauses: u64,
}

impl SimReport {
    /// Adds `r`'s counters to these (peaks: the larger); for totals over many seeds, which keep
    /// the seed and configuration of the first.
    pub fn add(&mut self, r: &SimReport) {
        self.steps += r.steps;
        self.ticks += r.ticks;
        self.ops += r.ops;
        self.writes += r.writes;
        self.discards += r.discards;
        self.write_zeroes += r.write_zeroes;
        self.flushes += r.flushes;
        self.frames += r.frames;
        self.wire_bytes += r.wire_bytes;
        self.corrupt_headers += r.corrupt_headers;
        self.corrupt_payloads += r.corrupt_payloads;
        self.naks += r.naks;
        self.rejects += r.rejects;
        self.granted += r.granted;
        self.disconnects += r.disconnects;
        self.resets += r.resets;
        self.handshakes += r.handshakes;
        self.target_closes += r.target_closes;
        self.crashes += r.crashes;
        self.intruders += r.intruders;
        self.partial_crashes += r.partial_crashes;
        self.clean_restarts += r.clean_restarts;
        self.local_locks += r.local_locks;
        self.local_lock_refusals += r.local_lock_refusals;
        self.local_lock_timeouts += r.local_lock_timeouts;
        self.intent_stores += r.intent_stores;
        self.mode_switches += r.mode_switches;
        self.completed_async += r.completed_async;
        self.completed_received += r.completed_received;
        self.completed_sync += r.completed_sync;
        self.completed_lock_then_write += r.completed_lock_then_write;
        self.log_full_waits += r.log_full_waits;
        self.out_of_sync_writes += r.out_of_sync_writes;
        self.throttled_writes += r.throttled_writes;
        self.copies_past_parked += r.copies_past_parked;
        self.overflow_resyncs += r.overflow_resyncs;
        self.overflow_copy_bytes += r.overflow_copy_bytes;
        self.overflow_steps_withdrawn += r.overflow_steps_withdrawn;
        self.replaced_volumes += r.replaced_volumes;
        self.clean_source_stops += r.clean_source_stops;
        self.source_resumes += r.source_resumes;
        self.target_losses_found += r.target_losses_found;
        self.full_resyncs += r.full_resyncs;
        self.silences += r.silences;
        self.pings += r.pings;
        self.silent_drops += r.silent_drops;
        self.target_idle_closes += r.target_idle_closes;
        self.host_pauses += r.host_pauses;
        self.commit_full_waits += r.commit_full_waits;
        self.inconsistent_steps += r.inconsistent_steps;
        self.source_crashes += r.source_crashes;
        self.source_resyncs += r.source_resyncs;
        self.resync_copy_bytes += r.resync_copy_bytes;
        self.resync_admission_refusals += r.resync_admission_refusals;
        self.host_ops_failed += r.host_ops_failed;
        self.acked_durable_kept += r.acked_durable_kept;
        self.acked_writes_resynced += r.acked_writes_resynced;
        self.log_bytes_peak = self.log_bytes_peak.max(r.log_bytes_peak);
        self.commit_entries_peak = self.commit_entries_peak.max(r.commit_entries_peak);
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} ops in {} steps / {} ticks; {} frames {} B; corrupt {}h/{}p; \
             nak {} reject {} granted {}; disconnect {} reset {} handshake {}; silence {} ping {} silent-drop {} target-idle-close {} host-pause {}; crash {} \
             (partial {}) clean-restart {}; local locks {} refused {} timed out {}; mode switches {}; \
             source crash {} (failed {}, acked durable kept {}, acked writes resynced {}, \
             resyncs {} of {} B; full resyncs {})",
            self.seed,
            self.ops,
            self.steps,
            self.ticks,
            self.frames,
            self.wire_bytes,
            self.corrupt_headers,
            self.corrupt_payloads,
            self.naks,
            self.rejects,
            self.granted,
            self.disconnects,
            self.resets,
            self.handshakes,
            self.silences,
            self.pings,
            self.silent_drops,
            self.target_idle_closes,
            self.host_pauses,
            self.crashes,
            self.partial_crashes,
            self.clean_restarts,
            self.local_locks,
            self.local_lock_refusals,
            self.local_lock_timeouts,
            self.mode_switches,
            self.source_crashes,
            self.host_ops_failed,
            self.acked_durable_kept,
            self.acked_writes_resynced,
            self.source_resyncs,
            self.resync_copy_bytes,
            self.full_resyncs,
        )
    }
}
