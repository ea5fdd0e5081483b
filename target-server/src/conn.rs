//! One connection's two tasks, over the framed transport ([`mirror_net`]): a reader that turns
//! bytes into frames for the engine's owner, and a writer that sends what the owner hands it.
//! Neither touches the engine; neither decides anything but how to move bytes (when a session
//! has been silent too long is the engine's idle timeout; its owner then aborts the writer).

use std::time::Duration;

use mirror_core::target::ConnId;
use mirror_core::wire::{Encoded, Frame, WireError};
use mirror_net::ReadEnd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
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
    /// The stream cannot go on (closed, reset, or a header that cannot be framed).
    Ended(ConnId, ReadEnd),
}

/// Reads frames until the stream ends or `stop` fires; then, if `stop` asks for it, drains what
/// the peer already sent (briefly, boundedly: closing a socket with unread data resets the connection, and
/// the reset could overtake the REFUSE that says why).
pub(crate) async fn read_loop(
    conn: ConnId,
    rd: OwnedReadHalf,
    inputs: mpsc::Sender<Input>,
    mut stop: oneshot::Receiver<bool>,
) {
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let drain = loop {
        let next = tokio::select! {
            next = mirror_net::read_frame(&mut rd, None) => next,
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

/// Writes each batch the owner sends; when the owner drops its sender, writes what is left and
/// shuts the write side down (FIN). A peer that stops reading stalls it until the owner aborts
/// it (the engine's idle timeout: the owner takes no frames while a writer is full).
pub(crate) async fn write_loop(
    conn: ConnId,
    mut wr: OwnedWriteHalf,
    mut batches: mpsc::Receiver<Vec<Encoded>>,
) {
    while let Some(batch) = batches.recv().await {
        if let Err(e) = mirror_net::write_frames(&mut wr, &batch).await {
            debug!(%conn, "write to source failed: {e}");
            return;
        }
    }
    let _ = wr.shutdown().await;
}
