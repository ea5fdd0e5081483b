//! A blocking client of the control socket (one request per connection).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{Request, Response, LINE_BYTES_MAX};

/// Why a request could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Nobody listens on the socket.
    #[error("no daemon is running on {path} ({reason})")]
    NotRunning {
        /// The socket.
        path: String,
        /// Why the connection failed.
        reason: String,
    },
    /// The exchange failed midway.
    #[error("talking to the daemon on {path}: {detail}")]
    Exchange {
        /// The socket.
        path: String,
        /// What went wrong.
        detail: String,
    },
}

/// Whether a daemon answers on `path`.
#[must_use]
pub fn is_live(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Sends `req` to the daemon on `socket` and returns its response. `timeout` bounds the wait for
/// the answer.
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let path = socket.display().to_string();
    let exchange = |detail: String| ClientError::Exchange {
        path: path.clone(),
        detail,
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| ClientError::NotRunning {
        path: path.clone(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => "no such socket".into(),
            std::io::ErrorKind::ConnectionRefused => "connection refused: stale socket".into(),
            _ => e.to_string(),
        },
    })?;
    stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(10))))
        .map_err(|e| exchange(e.to_string()))?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| exchange(e.to_string()))?;
    let mut line = serde_json::to_string(req).map_err(|e| exchange(e.to_string()))?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| exchange(format!("send: {e}")))?;
    let limit = u64::try_from(LINE_BYTES_MAX).unwrap_or(u64::MAX);
    let mut reader = BufReader::new(stream.take(limit));
    let mut answer = String::new();
    match reader.read_line(&mut answer) {
        Ok(0) => return Err(exchange("the daemon closed the connection".into())),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(exchange(format!(
                "no answer within {:.1} s",
                timeout.as_secs_f64()
            )))
        }
        Err(e) => return Err(exchange(format!("receive: {e}"))),
    }
    if !answer.ends_with('\n') {
        return Err(exchange("truncated answer".into()));
    }
    serde_json::from_str(&answer).map_err(|e| exchange(format!("bad answer: {e}")))
}
