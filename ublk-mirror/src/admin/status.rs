//! The `status` report: what the daemon and its replicator say, in the control protocol's terms.

use std::time::{SystemTime, UNIX_EPOCH};

use super::control::DaemonState;
use super::{
    IntentReport, LagReport, LogReport, OverflowReport, ResyncReport, SeqReport, ShippedReport,
    StatusReport,
};

use crate::replicator::ReplError;

impl DaemonState {
    /// What every status shares, mirror or not.
    fn base_status(&self) -> StatusReport {
        let device = self.started();
        let phase = if self.is_stopping() {
            "stopping"
        } else if device.is_some() {
            "running"
        } else {
            "starting"
        };
        StatusReport {
            unix_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            name: self.s.name.clone(),
            pid: std::process::id(),
            // Without a replicator there is no node (the mirror's status names its role).
            role: "passthrough".into(),
            phase: phase.into(),
            device: device.as_ref().map(|d| d.path.clone()),
            dev_id: device.as_ref().map(|d| d.dev_id),
            volume: self.s.volume.display().to_string(),
            volume_bytes: self.volume_bytes,
            block_bytes: self.s.block_bytes,
            flush_replicates: self.s.flush_replicates,
            ..StatusReport::default()
        }
    }

    pub(super) async fn status(&self) -> Result<StatusReport, ReplError> {
        let (Some(repl), Some(m)) = (&self.repl, &self.s.mirror) else {
            return Ok(StatusReport {
                peer: "-".into(),
                connection: "off".into(),
                mode: "off".into(),
                ..self.base_status()
            });
        };
        let st = repl.status().await?;
        let src = &st.source;
        let now_ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let lag_seconds = src
            .oldest_unconfirmed_ns
            .map_or(0.0, |t| now_ns.saturating_sub(t) as f64 / 1e9);
        Ok(StatusReport {
            role: st.role.to_string(),
            peer: m.peer.clone(),
            connection: if st.fatal.is_some() {
                "failed".into()
            } else {
                src.conn.to_string()
            },
            mode: src.mode.to_string(),
            seq: SeqReport {
                last_local: src.last_local.0,
                sent: src.last_sent.0,
                received: src.received.0,
                durable: src.durable.0,
            },
            log: LogReport {
                entries: src.log_entries as u64,
                bytes: src.log_bytes as u64,
                bytes_max: src.log_bytes_max as u64,
                entries_max: self.s.log_entries as u64,
            },
            lag: LagReport {
                entries: src.last_local.0.saturating_sub(src.durable.0),
                bytes: src.log_bytes as u64,
                seconds: lag_seconds,
            },
            shipped: ShippedReport {
                frames: st.sent_frames,
                bytes: st.sent_bytes,
            },
            connects: st.connects,
            disconnects: st.disconnects,
            last_error: st.last_error.clone(),
            fatal: st.fatal.clone(),
            halted_at: src.halted_at.map(|s| s.0),
            intent: st.intent.map(|i| IntentReport {
                chunk_bytes: i.chunk_bytes,
                dirty_chunks: i.dirty_chunks,
                stored_chunks: i.stored_chunks,
            }),
            generation: Some(st.gen_ids.into()),
            peer_data: st.peer_data.to_string(),
            overflow: Some(OverflowReport {
                enabled: st.overflow_rule.enabled,
                after_secs: st.overflow_rule.after_down_ns / 1_000_000_000,
                sync_peer_gone: st.overflow_rule.sync_peer_gone.to_string(),
                resync_rate_bytes_per_s: st.resync_rate_bytes_per_s,
                cause: st.overflow.map(|o| o.cause.to_string()),
                out_of_sync_chunks: st.overflow.map_or(0, |o| o.out_of_sync_chunks),
                converging: st.overflow.and_then(|o| o.converging(st.clock_ns)),
                out_of_sync_writes: st.out_of_sync_writes,
                throttle: st.resync_throttle,
                throttled_writes: st.throttled_writes,
            }),
            resync: st.resync.map(|r| {
                let elapsed_ns = r.begun_ns.map(|b| st.clock_ns.saturating_sub(b));
                let (rate_bytes_per_s, eta_secs) =
                    resync_pace(r.total_bytes, r.durable_bytes, elapsed_ns);
                ResyncReport {
                    full: r.full,
                    total_bytes: r.total_bytes,
                    submitted_bytes: r.submitted_bytes,
                    durable_bytes: r.durable_bytes,
                    rate_bytes_per_s,
                    eta_secs,
                }
            }),
            ..self.base_status()
        })
    }
}

/// A resync's rate so far and the seconds left at it: none before half a second or a first
/// durable byte.
fn resync_pace(
    total_bytes: u64,
    durable_bytes: u64,
    elapsed_ns: Option<u64>,
) -> (Option<u64>, Option<u64>) {
    let Some(elapsed_ns) = elapsed_ns.filter(|ns| *ns >= 500_000_000) else {
        return (None, None);
    };
    if durable_bytes == 0 {
        return (None, None);
    }
    let rate = u128::from(durable_bytes) * 1_000_000_000 / u128::from(elapsed_ns);
    let rate = u64::try_from(rate).unwrap_or(u64::MAX).max(1);
    let left = total_bytes.saturating_sub(durable_bytes);
    (Some(rate), Some(left.div_ceil(rate)))
}

#[cfg(test)]
mod tests {
    use super::resync_pace;

    #[test]
    fn a_resyncs_pace_is_its_durable_bytes_over_its_time() {
        assert_eq!(resync_pace(100, 10, None), (None, None), "not begun");
        assert_eq!(
            resync_pace(100, 10, Some(100_000_000)),
            (None, None),
            "too early"
        );
        assert_eq!(resync_pace(100, 0, Some(2_000_000_000)), (None, None));
        assert_eq!(
            resync_pace(1000, 250, Some(2_000_000_000)),
            (Some(125), Some(6))
        );
        assert_eq!(
            resync_pace(1000, 1000, Some(1_000_000_000)),
            (Some(1000), Some(0))
        );
    }
}
