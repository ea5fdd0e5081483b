//! The secondary's status: what its volume holds (consistent or not, a resync under way, the
//! generation ids), its sequence numbers and commit log, and whether a source is connected. The
//! server answers every connection to its status socket (`--status-socket`) with one JSON line
//! ([`SecondaryStatus`]); `target-server status` prints it as a table or as that line.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mirror_core::target::TargetStatus;
use mirror_core::VolumeId;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tokio::sync::watch;

use crate::error::ServerError;

/// How long a status client may take to read its line.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The status a secondary reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondaryStatus {
    /// Always `secondary`.
    pub role: String,
    /// The volume's path.
    pub volume: String,
    /// The mirrored volume's id.
    pub volume_id: String,
    /// Where the server listens.
    pub listen: String,
    /// Whether a source is authenticated now.
    pub connected: bool,
    /// Whether the volume is a consistent state of the source's writes.
    pub consistent: bool,
    /// What the volume holds, in words.
    pub data: String,
    /// A resync under way: `partial` or `full` (none: no resync).
    pub resync: Option<String>,
    /// Last received in order, last applied, last durable.
    pub received: u64,
    /// See `received`.
    pub applied: u64,
    /// See `received`.
    pub durable: u64,
    /// Commit log entries and payload bytes waiting.
    pub commit_log_entries: u64,
    /// See `commit_log_entries`.
    pub commit_log_bytes: u64,
    /// Generation ids: current, bitmap, then the history (16 hex digits, or `none`).
    pub generation: Vec<String>,
}

impl SecondaryStatus {
    /// The report of an engine in state `st`.
    #[must_use]
    pub fn new(st: &TargetStatus, volume: &Path, volume_id: VolumeId, listen: SocketAddr) -> Self {
        let data = match (st.consistent, st.resync, st.data_trusted) {
            _ if st.gen_ids.current == mirror_core::Generation::NONE && st.resync.is_none() => {
                "no source's history yet: the first source copies its volume in full".to_string()
            }
            (true, _, _) => "consistent (a state of the source's writes)".to_string(),
            (false, Some(full), _) => format!(
                "inconsistent: a {}resync is under way; consistent once its end is durable",
                if full { "full " } else { "" }
            ),
            (false, None, false) => {
                "inconsistent: holds none of a source's history (a full resync makes it consistent)"
                    .to_string()
            }
            (false, None, true) => {
                "inconsistent: after an unclean stop, until the source's resend is durable"
                    .to_string()
            }
        };
        let g = st.gen_ids;
        SecondaryStatus {
            role: "secondary".into(),
            volume: volume.display().to_string(),
            volume_id: volume_id.to_string(),
            listen: listen.to_string(),
            connected: st.connected,
            consistent: st.consistent,
            data,
            resync: st
                .resync
                .map(|full| if full { "full" } else { "partial" }.to_string()),
            received: st.received.0,
            applied: st.applied.0,
            durable: st.durable.0,
            commit_log_entries: st.commit_log_entries as u64,
            commit_log_bytes: st.commit_log_bytes as u64,
            generation: [g.current, g.bitmap, g.history[0], g.history[1]]
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }

    /// The status as a table, one row per line.
    #[must_use]
    pub fn table(&self) -> String {
        let rows = [
            ("role", self.role.clone()),
            ("volume", format!("{} (id {})", self.volume, self.volume_id)),
            (
                "source",
                format!(
                    "{} (listening on {})",
                    if self.connected {
                        "connected"
                    } else {
                        "not connected"
                    },
                    self.listen
                ),
            ),
            ("data", self.data.clone()),
            (
                "seq",
                format!(
                    "received {}  applied {}  durable {}",
                    self.received, self.applied, self.durable
                ),
            ),
            (
                "commit log",
                format!(
                    "{} entries, {} bytes",
                    self.commit_log_entries, self.commit_log_bytes
                ),
            ),
            (
                "generation",
                match self.generation.as_slice() {
                    [current, bitmap, history @ ..] => {
                        format!("{current} (bitmap {bitmap}, history {})", history.join(" "))
                    }
                    _ => "-".to_string(),
                },
            ),
        ];
        rows.iter()
            .map(|(name, value)| format!("{name:<11} {value}\n"))
            .collect()
    }
}

/// Binds the status socket at `path`: a stale socket file (nobody answers on it) is replaced, one
/// a live server answers on is refused.
pub(crate) fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ServerError::StatusSocket {
            path: path.to_owned(),
            reason: std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another server answers on it",
            ),
        });
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|reason| ServerError::StatusSocket {
        path: path.to_owned(),
        reason,
    })
}

/// Answers every connection to `listener` with the status as of then, until the server stops.
pub(crate) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    status: watch::Receiver<TargetStatus>,
    fixed: (PathBuf, VolumeId, SocketAddr),
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let report = SecondaryStatus::new(&status.borrow(), &fixed.0, fixed.1, fixed.2);
                let mut line = serde_json::to_string(&report).unwrap_or_default();
                line.push('\n');
                // A client that does not read is dropped, never waited for.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        CLIENT_WRITE_TIMEOUT,
                        stream.write_all(line.as_bytes()),
                    )
                    .await;
                });
            }
            _ = stopped.wait_for(|s| *s) => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Why `target-server status` could not report.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing answers on the socket.
    #[error("cannot reach a target server on {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The answer is not a status.
    #[error("{path}: not a target server's status: {message}")]
    Garbled {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Asks the server on `path` for its status.
pub fn query(path: &Path) -> Result<SecondaryStatus, StatusError> {
    let stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| StatusError::Connect {
            path: path.to_owned(),
            source,
        })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| StatusError::Garbled {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    serde_json::from_str(&line).map_err(|e| StatusError::Garbled {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirror_core::genid::GenIds;
    use mirror_core::{Generation, Seq};

    fn status(consistent: bool, resync: Option<bool>, data_trusted: bool) -> TargetStatus {
        TargetStatus {
            connected: true,
            received: Seq(9),
            applied: Seq(8),
            durable: Seq(7),
            commit_log_entries: 2,
            commit_log_bytes: 8192,
            consistent,
            epoch: 0,
            resync,
            data_trusted,
            gen_ids: GenIds {
                current: Generation(0xab),
                ..GenIds::NONE
            },
        }
    }

    #[test]
    fn the_status_says_what_the_volume_holds() {
        let id = VolumeId::parse("00112233445566778899aabbccddeeff").unwrap();
        let addr: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let at = |st| SecondaryStatus::new(&st, Path::new("/v.img"), id, addr);
        let mut new = status(true, None, true);
        new.gen_ids = GenIds::NONE;
        assert!(at(new).data.contains("no source's history yet"));
        let ok = at(status(true, None, true));
        assert!(ok.data.starts_with("consistent"), "{}", ok.data);
        let t = ok.table();
        assert!(
            t.contains("seq         received 9  applied 8  durable 7"),
            "{t}"
        );
        assert!(
            t.contains("generation  00000000000000ab (bitmap none, history none none)"),
            "{t}"
        );
        let full = at(status(false, Some(true), false));
        assert_eq!(full.resync.as_deref(), Some("full"));
        assert!(
            full.data.contains("a full resync is under way"),
            "{}",
            full.data
        );
        assert!(at(status(false, None, false))
            .data
            .contains("none of a source's history"));
        assert!(at(status(false, None, true)).data.contains("unclean stop"));
        let back: SecondaryStatus =
            serde_json::from_str(&serde_json::to_string(&ok).unwrap()).unwrap();
        assert_eq!(back, ok);
    }
}
