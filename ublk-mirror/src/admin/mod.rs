//! The daemon's control socket: a Unix socket speaking JSON lines (one request object per line,
//! one response object per line).
//!
//! Requests (`cmd` selects): `{"cmd":"status"}`, `{"cmd":"set-mode","mode":"sync"}`,
//! `{"cmd":"wait-replicated","seq":123,"timeout_secs":30}` (`seq` omitted: the last operation
//! submitted so far), `{"cmd":"stop"}`. Responses: `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`.
//!
//! - [`config`]: `ublk-mirror start`'s flags and TOML file, resolved and checked;
//! - `lifecycle.rs`: start (foreground or background) and stop; `control.rs`: the socket server
//!   and its requests; `status.rs`: the status report;
//! - [`cli`]: the admin subcommands (`status`, `set-mode`, `wait-replicated`, `stop`, `list`,
//!   `delete`) and their clap definitions;
//! - [`client`]: a small blocking client.

pub mod cli;
pub mod client;
pub mod config;
mod control;
mod lifecycle;
mod status;

pub use lifecycle::start;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Longest request or response line accepted.
pub const LINE_BYTES_MAX: usize = 64 << 10;

/// Directory holding `<name>.sock`, `<name>.log` and `<name>.dev` (overridable with
/// `UBLK_MIRROR_RUN_DIR`, for tests).
#[must_use]
pub fn run_dir() -> PathBuf {
    std::env::var_os("UBLK_MIRROR_RUN_DIR")
        .map_or_else(|| PathBuf::from("/run/ublk-mirror"), PathBuf::from)
}

/// The default control socket of a daemon named `name`.
#[must_use]
pub fn socket_path(name: &str) -> PathBuf {
    run_dir().join(format!("{name}.sock"))
}

/// Where a daemon named `name` records its device number and volume (for the next daemon of
/// that name to take the device over after a crash, or `delete` to remove it).
#[must_use]
pub fn dev_file_path(name: &str) -> PathBuf {
    run_dir().join(format!("{name}.dev"))
}

/// What a daemon's device file says: `N` of /dev/ublkbN, then the volume it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevRecord {
    /// N of /dev/ublkbN.
    pub id: u32,
    /// The volume the device serves (none in a file of an older version).
    pub volume: Option<PathBuf>,
}

impl DevRecord {
    /// The file's text.
    #[must_use]
    pub fn to_text(&self) -> String {
        match &self.volume {
            Some(v) => format!("{}\n{}\n", self.id, v.display()),
            None => format!("{}\n", self.id),
        }
    }

    /// Reads it back (none: not such a file).
    #[must_use]
    pub fn parse(text: &str) -> Option<DevRecord> {
        let mut lines = text.lines();
        let id = lines.next()?.trim().parse().ok()?;
        let volume = lines.next().filter(|l| !l.is_empty()).map(PathBuf::from);
        Some(DevRecord { id, volume })
    }

    /// The record daemon `name` left, if any.
    #[must_use]
    pub fn read(name: &str) -> Option<DevRecord> {
        Self::parse(&std::fs::read_to_string(dev_file_path(name)).ok()?)
    }
}

/// The default log file of a background daemon named `name`.
#[must_use]
pub fn log_path(name: &str) -> PathBuf {
    run_dir().join(format!("{name}.log"))
}

/// A daemon name that [`check_name`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("name '{0}' must be 1-64 characters of letters, digits, '.', '_' or '-'")]
pub struct BadName(pub String);

/// Checks a daemon name: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn check_name(name: &str) -> Result<(), BadName> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(BadName(name.to_string()))
    }
}

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// The daemon's state.
    Status,
    /// Change the acknowledgement mode.
    SetMode {
        /// async, received, sync or lock-then-write.
        mode: String,
    },
    /// Wait until an operation is applied and durable on the target.
    WaitReplicated {
        /// The operation (default: the last one submitted so far).
        #[serde(default)]
        seq: Option<u64>,
        /// Give up after this long (default 60 s).
        #[serde(default)]
        timeout_secs: Option<f64>,
    },
    /// Stop the device and the daemon (the device is deleted).
    Stop,
}

/// The daemon's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The state (`status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
    /// The sequence number waited for (`wait-replicated`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl Response {
    /// A failure.
    #[must_use]
    pub fn err(error: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(error.into()),
            ..Response::default()
        }
    }

    /// A success without data.
    #[must_use]
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Response::default()
        }
    }
}

/// Sequence numbers (see `mirror_core::source::SourceStatus`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqReport {
    /// Last operation submitted.
    pub last_local: u64,
    /// Last operation sent on the current connection.
    pub sent: u64,
    /// Last operation the target received in order.
    pub received: u64,
    /// Last operation applied and durable on the target.
    pub durable: u64,
}

/// Rollback log fill.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogReport {
    /// Entries held.
    pub entries: u64,
    /// Payload bytes held.
    pub bytes: u64,
    /// Bound on payload bytes.
    pub bytes_max: u64,
    /// Bound on entries.
    pub entries_max: u64,
}

/// How far the target is behind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LagReport {
    /// Operations not yet durable on the target.
    pub entries: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Age of the oldest of them, in seconds (0 when none).
    pub seconds: f64,
}

/// What went over the link since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShippedReport {
    /// Frames sent (resends included).
    pub frames: u64,
    /// Their bytes on the wire, headers included.
    pub bytes: u64,
}

/// The primary's write intent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentReport {
    /// Its chunk size.
    pub chunk_bytes: u64,
    /// Chunks holding writes the target has not made durable.
    pub dirty_chunks: u64,
    /// Chunks the stored copy holds: what a crash now would resync.
    pub stored_chunks: u64,
}

/// A resync under way (the target is not consistent until it ends).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncReport {
    /// Whether it copies the whole volume (the target held none of its history).
    #[serde(default)]
    pub full: bool,
    /// Bytes it copies in all.
    pub total_bytes: u64,
    /// Bytes in the rollback log or sent.
    pub submitted_bytes: u64,
    /// Bytes the target holds durably.
    pub durable_bytes: u64,
    /// Bytes per second made durable since its begin (none: too early to say).
    #[serde(default)]
    pub rate_bytes_per_s: Option<u64>,
    /// Seconds left at that rate.
    #[serde(default)]
    pub eta_secs: Option<u64>,
}

/// Generation ids ([`mirror_core::genid`]) as 16 hex digits, or "none".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationReport {
    /// The history the volume holds.
    pub current: String,
    /// The history its dirty bitmap counts from.
    pub bitmap: String,
    /// Earlier histories, newest first.
    pub history: Vec<String>,
}

impl From<mirror_core::genid::GenIds> for GenerationReport {
    fn from(ids: mirror_core::genid::GenIds) -> GenerationReport {
        GenerationReport {
            current: ids.current.to_string(),
            bitmap: ids.bitmap.to_string(),
            history: ids.history.iter().map(ToString::to_string).collect(),
        }
    }
}

/// `status`: everything an operator wants to see.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// When the daemon took this report, in seconds since the Unix epoch (0 from a daemon too old
    /// to say).
    #[serde(default)]
    pub unix_time: f64,
    /// Daemon name.
    pub name: String,
    /// Daemon process id.
    pub pid: u32,
    /// `primary` (this daemon is the source of the mirror).
    pub role: String,
    /// Daemon phase: `starting`, `running`, `stopping`.
    pub phase: String,
    /// `/dev/ublkbN` once the device is live.
    pub device: Option<String>,
    /// N of /dev/ublkbN.
    pub dev_id: Option<u32>,
    /// The local volume.
    pub volume: String,
    /// Its size in bytes.
    pub volume_bytes: u64,
    /// Logical block size.
    pub block_bytes: u32,
    /// Target address.
    pub peer: String,
    /// `disconnected`, `handshaking`, `connected` or `failed`.
    pub connection: String,
    /// What the peer's copy is, as far as this primary knows (`up to date` only when it is).
    #[serde(default)]
    pub peer_data: String,
    /// Acknowledgement mode.
    pub mode: String,
    /// Whether host flushes wait for the target.
    pub flush_replicates: bool,
    /// Sequence numbers.
    pub seq: SeqReport,
    /// Rollback log fill.
    pub log: LogReport,
    /// Replication lag.
    pub lag: LagReport,
    /// Frames and bytes sent to the target.
    #[serde(default)]
    pub shipped: ShippedReport,
    /// Handshakes completed.
    pub connects: u64,
    /// Connections dropped.
    pub disconnects: u64,
    /// Why the last connection (attempt) ended.
    pub last_error: Option<String>,
    /// Why replication stopped for good.
    pub fatal: Option<String>,
    /// Sequence number whose rejected lock halts transmission.
    pub halted_at: Option<u64>,
    /// The write intent (none: not kept, or no mirror).
    #[serde(default)]
    pub intent: Option<IntentReport>,
    /// The volume's generation ids (none: no mirror).
    #[serde(default)]
    pub generation: Option<GenerationReport>,
    /// The resync under way after a restart, if any.
    #[serde(default)]
    pub resync: Option<ResyncReport>,
    /// The overflow rule in force and the overflow under way (none: no mirror).
    #[serde(default)]
    pub overflow: Option<OverflowReport>,
}

/// When writes overflow to the write intent, and what is out of sync now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverflowReport {
    /// Whether writes ever overflow (`--overflow-after-secs` above 0).
    pub enabled: bool,
    /// A peer unreachable this long makes writes overflow.
    pub after_secs: u64,
    /// What `sync` does then: `suspend` or `degrade`.
    pub sync_peer_gone: String,
    /// An overflow's resync copies at most this many bytes per second (none: unbounded).
    #[serde(default)]
    pub resync_rate_bytes_per_s: Option<u64>,
    /// Why the overflow under way began (none: no overflow now).
    pub cause: Option<String>,
    /// Chunks written out of sync and not yet copied to the target's log.
    pub out_of_sync_chunks: u64,
    /// While its resync runs: whether the chunks out of sync reached a new low within the last
    /// 30 s (false: the host dirties them as fast as the link copies them).
    #[serde(default)]
    pub converging: Option<bool>,
    /// Writes completed out of sync since the start.
    pub out_of_sync_writes: u64,
    /// Whether host writes are throttled while its resync does not converge
    /// (`--resync-throttle`).
    #[serde(default)]
    pub throttle: bool,
    /// Host writes that waited for the log because it did not.
    #[serde(default)]
    pub throttled_writes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let reqs = [
            Request::Status,
            Request::SetMode {
                mode: "sync".into(),
            },
            Request::WaitReplicated {
                seq: Some(42),
                timeout_secs: Some(1.5),
            },
            Request::WaitReplicated {
                seq: None,
                timeout_secs: None,
            },
            Request::Stop,
        ];
        for req in reqs {
            let line = serde_json::to_string(&req).unwrap();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), req);
        }
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"wait-replicated"}"#).unwrap(),
            Request::WaitReplicated {
                seq: None,
                timeout_secs: None
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
    }

    #[test]
    fn responses_carry_status_or_error() {
        let mut st = StatusReport {
            name: "m".into(),
            role: "primary".into(),
            ..StatusReport::default()
        };
        st.seq.durable = 7;
        let resp = Response {
            ok: true,
            status: Some(st.clone()),
            ..Response::default()
        };
        let back: Response = serde_json::from_str(&serde_json::to_string(&resp).unwrap()).unwrap();
        assert_eq!(back.status, Some(st));
        let err: Response =
            serde_json::from_str(&serde_json::to_string(&Response::err("nope")).unwrap()).unwrap();
        assert!(!err.ok);
        assert_eq!(err.error.as_deref(), Some("nope"));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("mirror-0.a_b").is_ok());
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
