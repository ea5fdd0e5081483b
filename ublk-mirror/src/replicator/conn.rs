//! One connection's tasks: a reader that decodes the target's frames, a writer that gathers what
//! the engine hands out into vectored writes. Both report to the engine through its event queue;
//! neither decides anything.

use mirror_core::wire::{Encoded, Frame};
use mirror_net::ReadEnd;
use tokio::io::BufReader;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Frames queued towards the writer task of one connection.
pub(super) const WRITER_QUEUE_FRAMES: usize = 64;
/// Frames and bytes the writer gathers into one vectored write.
const WRITE_BATCH_FRAMES: usize = 64;
const WRITE_BATCH_BYTES: usize = 1 << 20;
/// Buffer of the reader (frames from the target are small: acknowledgements).
const READ_BUFFER_BYTES: usize = 64 << 10;

/// What the connection tasks (and the connect attempt) tell the engine, with the connection's id.
pub(super) enum Event {
    Connected(u64, Result<TcpStream, String>),
    Frame(u64, Frame),
    Failed(u64, String),
    /// An overflow copy's bytes, read while its range was held against host writes (the guard
    /// is released once the copy's place in the sequence is fixed).
    Copied {
        range: mirror_core::Range,
        data: Result<Vec<u8>, mirror_core::source::SourceError>,
        guard: crate::device::gate::Guard,
    },
}

/// An open connection: where the engine's frames go, and its two tasks.
pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) writer_tx: mpsc::Sender<Encoded>,
    pub(super) reader: JoinHandle<()>,
    pub(super) writer: JoinHandle<()>,
}

pub(super) async fn reserve(
    writer: Option<mpsc::Sender<Encoded>>,
) -> Option<mpsc::OwnedPermit<Encoded>> {
    match writer {
        Some(tx) => tx.reserve_owned().await.ok(),
        None => std::future::pending().await,
    }
}

pub(super) async fn read_frames(id: u64, rd: OwnedReadHalf, events: mpsc::Sender<Event>) {
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let reason = loop {
        match mirror_net::read_frame(&mut rd, None).await {
            Ok(Ok(frame)) => {
                if events.send(Event::Frame(id, frame)).await.is_err() {
                    return;
                }
            }
            Ok(Err(e)) => break format!("bad frame from the target: {e}"),
            Err(ReadEnd::PeerClosed) => break "the target closed the connection".to_string(),
            Err(ReadEnd::Wire(e)) => break format!("bad frame from the target: {e}"),
            Err(e) => break format!("read from the target: {e}"),
        }
    };
    let _ = events.send(Event::Failed(id, reason)).await;
}

pub(super) async fn write_frames(
    id: u64,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Encoded>,
    events: mpsc::Sender<Event>,
) {
    let mut batch: Vec<Encoded> = Vec::with_capacity(WRITE_BATCH_FRAMES);
    while let Some(first) = rx.recv().await {
        let mut bytes = first.wire_len();
        batch.push(first);
        while batch.len() < WRITE_BATCH_FRAMES && bytes < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(frame) => {
                    bytes += frame.wire_len();
                    batch.push(frame);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = mirror_net::write_frames(&mut wr, &batch).await {
            let _ = events
                .send(Event::Failed(id, format!("write to the target: {e}")))
                .await;
            return;
        }
        batch.clear();
    }
}
