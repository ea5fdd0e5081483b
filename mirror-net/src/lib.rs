//! The framed transport: one way to read a frame from a stream (header, then exactly its payload,
//! then mirror-core's checks) and one way to write a batch of frames (vectored: the payloads are
//! not copied). Drivers and test clients use it; it decides nothing about what the frames mean.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::{self, IoSlice};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use mirror_core::wire::{self, Encoded, Frame, WireError, HEADER_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a stream cannot give another frame.
#[derive(Debug)]
pub enum ReadEnd {
    /// The peer closed the connection between frames.
    PeerClosed,
    /// Nothing arrived for this long.
    Idle(Duration),
    /// Reading failed, or the stream ended inside a frame.
    Io(io::Error),
    /// A header that cannot be framed: the stream cannot go on.
    Wire(WireError),
}

impl std::fmt::Display for ReadEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadEnd::PeerClosed => f.write_str("the peer closed the connection"),
            ReadEnd::Idle(t) => write!(f, "nothing received for {t:?}"),
            ReadEnd::Io(e) => write!(f, "{e}"),
            ReadEnd::Wire(e) => write!(f, "malformed frame: {e}"),
        }
    }
}

impl std::error::Error for ReadEnd {}

/// Reads one frame. A payload that fails its checks after the whole frame was read is
/// `Ok(Err(..))`: the stream is still framed (a corrupted write can be answered with NAK). With
/// `idle`, the wait for each chunk is bounded (reading restarts the clock). Read through a
/// buffered reader: one recv then usually brings a header with its payload.
pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    idle: Option<Duration>,
) -> Result<Result<Frame, WireError>, ReadEnd> {
    let mut head = [0u8; HEADER_BYTES];
    if !read_full(rd, &mut head[..], idle).await? {
        return Err(ReadEnd::PeerClosed);
    }
    let header = wire::decode_header(&head).map_err(ReadEnd::Wire)?;
    let len = header.payload_len as usize;
    // At most PAYLOAD_BYTES_MAX, checked by decode_header.
    let mut payload = BytesMut::with_capacity(len);
    if !read_full(rd, (&mut payload).limit(len), idle).await? && len > 0 {
        return Err(ReadEnd::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed after a frame header",
        )));
    }
    Ok(wire::decode_body(&header, payload.freeze()))
}

/// Reads until `buf` is full. `Ok(false)` means the peer closed before the first byte. Takes any
/// `BufMut`, so a payload is read straight into uninitialized capacity.
async fn read_full<R: AsyncRead + Unpin, B: BufMut>(
    rd: &mut R,
    mut buf: B,
    idle: Option<Duration>,
) -> Result<bool, ReadEnd> {
    let want = buf.remaining_mut();
    let mut got = 0;
    while buf.has_remaining_mut() {
        let read = rd.read_buf(&mut buf);
        let n = match idle {
            Some(t) => match tokio::time::timeout(t, read).await {
                Err(_) => return Err(ReadEnd::Idle(t)),
                Ok(r) => r,
            },
            None => read.await,
        }
        .map_err(ReadEnd::Io)?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(ReadEnd::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed inside a frame ({got} of {want} bytes)"),
            )));
        }
        got += n;
    }
    Ok(true)
}

/// Writes every header and payload of `batch` with vectored writes (no copy of the payloads).
pub async fn write_frames<W: AsyncWrite + Unpin>(wr: &mut W, batch: &[Encoded]) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = Vec::with_capacity(batch.len() * 2);
    for frame in batch {
        parts.push(&frame.header);
        if !frame.payload.is_empty() {
            parts.push(&frame.payload);
        }
    }
    let mut index = 0;
    let mut offset = 0;
    while index < parts.len() {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() - index);
        slices.push(IoSlice::new(&parts[index][offset..]));
        slices.extend(parts[index + 1..].iter().map(|p| IoSlice::new(p)));
        let mut written = wr.write_vectored(&slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while index < parts.len() && written >= parts[index].len() - offset {
            written -= parts[index].len() - offset;
            index += 1;
            offset = 0;
        }
        offset += written;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use mirror_core::wire::Op;
    use mirror_core::{Lba, Seq};

    #[tokio::test]
    async fn frames_written_in_a_batch_read_back_one_by_one() {
        let frames = vec![
            Frame::Ping { token: 7 },
            Frame::Op {
                seq: Seq(1),
                epoch: 0,
                op: Op::Write {
                    lba: Lba(8),
                    data: Bytes::from(vec![5u8; 4096]),
                }
                .into(),
                ack_on_receipt: false,
            },
            Frame::Ack {
                received: Seq(1),
                durable: Seq(1),
            },
        ];
        let encoded: Vec<Encoded> = frames.iter().map(Frame::encode).collect();
        let (mut a, mut b) = tokio::io::duplex(1 << 10);
        let writer = tokio::spawn(async move {
            write_frames(&mut a, &encoded).await.unwrap();
        });
        for want in &frames {
            let got = read_frame(&mut b, Some(Duration::from_secs(5)))
                .await
                .unwrap();
            assert_eq!(got.as_ref(), Ok(want));
        }
        writer.await.unwrap();
        assert!(matches!(
            read_frame(&mut b, None).await,
            Err(ReadEnd::PeerClosed)
        ));
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_frame_or_a_silent_one_ends_with_a_reason() {
        let bytes = Frame::Ping { token: 1 }.encode().to_vec();
        let (mut a, mut b) = tokio::io::duplex(1 << 10);
        a.write_all(&bytes[..10]).await.unwrap();
        let idle = read_frame(&mut b, Some(Duration::from_millis(50))).await;
        assert!(matches!(idle, Err(ReadEnd::Idle(_))), "{idle:?}");
        let (mut a, mut b) = tokio::io::duplex(1 << 10);
        a.write_all(&bytes[..10]).await.unwrap();
        drop(a);
        let cut = read_frame(&mut b, None).await;
        assert!(matches!(cut, Err(ReadEnd::Io(_))), "{cut:?}");
    }
}
