//! One connection's two tasks: a reader that turns bytes into frames for the engine's owner, and a
//! writer that sends what the owner hands it. Neither touches the engine; neither decides anything
//! but how to move bytes (and the idle timeout, a socket property).

use std::io;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use mirror_core::target::ConnId;
use mirror_core::wire::{self, Frame, WireError, HEADER_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

/// Receive buffer of a connection.
const READ_BUFFER_BYTES: usize = 256 << 10;
/// How long a refused or replaced connection's unread bytes are drained before the socket closes.
const DRAIN_TIME: Duration = Duration::from_millis(500);
/// Bytes drained at most.
const DRAIN_BYTES_MAX: usize = 1 << 20;

/// What a reader hands the owner.
#[derive(Debug)]
pub(crate) enum Input {
    /// A decoded frame, or one that failed to decode after its header was read whole.
    Frame(ConnId, Result<Frame, WireError>),
    /// The stream cannot go on (closed, reset, idle, or a header that cannot be framed).
    Ended(ConnId, End),
}

/// Why a reader stopped.
#[derive(Debug)]
pub(crate) enum End {
    PeerClosed,
    Idle(Duration),
    Io(io::Error),
    Wire(WireError),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::PeerClosed => f.write_str("the peer closed the connection"),
            End::Idle(t) => write!(f, "nothing received for {t:?}"),
            End::Io(e) => write!(f, "{e}"),
            End::Wire(e) => write!(f, "malformed frame: {e}"),
        }
    }
}

/// Reads frames until the stream ends or `stop` fires; then, if `stop` asks for it, drains what
/// the peer already sent (briefly, boundedly: closing a socket with unread data resets the connection, and
/// the reset could overtake the REFUSE that says why).
pub(crate) async fn read_loop(
    conn: ConnId,
    rd: OwnedReadHalf,
    idle: Duration,
    inputs: mpsc::Sender<Input>,
    mut stop: oneshot::Receiver<bool>,
) {
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let drain = loop {
        let next = tokio::select! {
            next = read_frame(&mut rd, idle) => next,
            drain = &mut stop => break drain.unwrap_or(false),
        };
        let input = match next {
            Ok(frame) => Input::Frame(conn, frame),
            Err(end) => Input::Ended(conn, end),
        };
        let ended = matches!(input, Input::Ended(..));
        // The owner stops taking inputs while the commit log is full: this send waits, the socket
        // fills, the source stops (back-pressure).
        let sent = tokio::select! {
            sent = inputs.send(input) => sent.is_ok(),
            drain = &mut stop => break drain.unwrap_or(false),
        };
        if ended || !sent {
            return;
        }
    };
    if !drain {
        return;
    }
    let mut sink = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    let mut drained = 0usize;
    while drained < DRAIN_BYTES_MAX {
        match tokio::time::timeout_at(deadline, rd.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// One frame. A payload that fails its checks after a whole frame was read is `Ok(Err(..))`:
/// the stream is still framed (a corrupted write is answered with NAK).
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    idle: Duration,
) -> Result<Result<Frame, WireError>, End> {
    let mut head = [0u8; HEADER_BYTES];
    if !read_full(rd, &mut head[..], idle).await? {
        return Err(End::PeerClosed);
    }
    let header = wire::decode_header(&head).map_err(End::Wire)?;
    let len = header.payload_len as usize;
    // At most PAYLOAD_BYTES_MAX, checked by decode_header.
    let mut payload = BytesMut::with_capacity(len);
    if !read_full(rd, (&mut payload).limit(len), idle).await? && len > 0 {
        return Err(End::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed after a frame header",
        )));
    }
    Ok(wire::decode_body(&header, payload.freeze()))
}

/// Reads until `buf` is full. The idle timeout restarts with every chunk received. `Ok(false)`
/// means the peer closed before the first byte. Takes any `BufMut`, so a payload is read straight
/// into uninitialized capacity.
async fn read_full<R: AsyncRead + Unpin, B: BufMut>(
    rd: &mut R,
    mut buf: B,
    idle: Duration,
) -> Result<bool, End> {
    let want = buf.remaining_mut();
    let mut got = 0;
    while buf.has_remaining_mut() {
        let n = match tokio::time::timeout(idle, rd.read_buf(&mut buf)).await {
            Err(_) => return Err(End::Idle(idle)),
            Ok(Err(e)) => return Err(End::Io(e)),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(End::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed inside a frame ({got} of {want} bytes)"),
            )));
        }
        got += n;
    }
    Ok(true)
}

/// Writes each batch the owner sends; when the owner drops its sender, writes what is left and
/// shuts the write side down (FIN). A peer that does not read for `idle` is given up on.
pub(crate) async fn write_loop(
    conn: ConnId,
    mut wr: OwnedWriteHalf,
    idle: Duration,
    mut batches: mpsc::Receiver<Vec<u8>>,
) {
    while let Some(batch) = batches.recv().await {
        match tokio::time::timeout(idle, wr.write_all(&batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(%conn, "write to source failed: {e}");
                return;
            }
            Err(_) => {
                debug!(%conn, "source did not read for {idle:?}");
                return;
            }
        }
    }
    let _ = tokio::time::timeout(idle, wr.shutdown()).await;
}
