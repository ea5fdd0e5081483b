//! Fuzz target: arbitrary bytes into `mirror_core::wire::decode`.
//!
//! The input is read as a stream of frames, twice: as it is, and with its checksums fixed up so
//! that the checks behind them (version, kind, flags, lengths, extents, payload layouts) are
//! explored without the fuzzer having to solve CRC32C. Decoding must never panic, never report a
//! frame longer than the input or than `FRAME_BYTES_MAX`, the streaming path (`decode_header` +
//! `decode_body`) must agree with `decode`, and every accepted frame must survive encode + decode
//! unchanged. (Detection of corrupted bytes is a property test: `mirror-core/tests/codec_props.rs`.)

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mirror_core::wire::{
    decode, decode_body, decode_header, Frame, Op, WireError, FRAME_BYTES_MAX, HEADER_BYTES,
    PAYLOAD_BYTES_MAX,
};
use mirror_core::{Lba, Seq};

static SELF_CHECK: std::sync::Once = std::sync::Once::new();

fuzz_target!(|data: &[u8]| {
    SELF_CHECK.call_once(fix_checksums_agrees_with_the_codec);
    check_stream(data, false);
    let mut fixed = data.to_vec();
    fix_checksums(&mut fixed);
    check_stream(&fixed, true);
});

/// `fix_checksums` must compute what the codec computes, or the fixed-up pass tests nothing past
/// the checksums. It once did, silently, after protocol version 2 changed the CRC order, because
/// random inputs rarely get as far as a checksum; this catches that on the first input.
fn fix_checksums_agrees_with_the_codec() {
    let frame = Frame::Op {
        seq: Seq(1),
        epoch: 1,
        op: Op::Write {
            lba: Lba(8),
            data: Bytes::from(vec![7u8; 512]),
        }
        .into(),
        ack_on_receipt: false,
    };
    let mut bytes = frame.encode().to_vec();
    bytes[48..HEADER_BYTES].fill(0);
    fix_checksums(&mut bytes);
    match decode(&bytes) {
        Ok(Some((back, used))) => assert!(back == frame && used == bytes.len()),
        other => panic!("fix_checksums disagrees with the codec: {other:?}"),
    }
}

/// Decodes frames from the front of `data` until one fails or more bytes would be needed. With
/// `checksums_fixed`, a failure must not be a checksum: otherwise `fix_checksums` computes them
/// differently from the codec, and this pass would silently stop at the first frame.
fn check_stream(data: &[u8], checksums_fixed: bool) {
    let mut rest = data;
    // Bounded: each decoded frame consumes at least a header.
    loop {
        let (frame, used) = match decode(rest) {
            Ok(Some(decoded)) => decoded,
            Ok(None) => return,
            Err(e) => {
                assert!(
                    !(checksums_fixed
                        && matches!(
                            e,
                            WireError::HeaderChecksum | WireError::PayloadChecksum { .. }
                        )),
                    "a frame with fixed-up checksums failed its checksum: {e}"
                );
                return;
            }
        };
        assert!(
            used >= HEADER_BYTES,
            "frame of {used} bytes is shorter than a header"
        );
        assert!(
            used <= rest.len(),
            "frame of {used} bytes from {} bytes",
            rest.len()
        );
        assert!(
            used <= FRAME_BYTES_MAX,
            "frame of {used} bytes exceeds the limit"
        );

        let header = decode_header(rest).expect("decode accepted this header");
        assert_eq!(HEADER_BYTES + header.payload_len as usize, used);
        let body = Bytes::copy_from_slice(&rest[HEADER_BYTES..used]);
        assert_eq!(decode_body(&header, body).as_ref(), Ok(&frame));

        let encoded = frame.encode();
        assert_eq!(
            encoded.wire_len(),
            used,
            "re-encoded {frame:?} has another length"
        );
        let again = encoded.to_vec();
        match decode(&again) {
            Ok(Some((back, back_used))) => {
                assert_eq!(back, frame);
                assert_eq!(back_used, again.len());
            }
            other => panic!("re-encoded {frame:?} does not decode: {other:?}"),
        }
        rest = &rest[used..];
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Rewrites the frame checksum (bytes 48..52: the payload, then header bytes 0..48; protocol
/// version 2) and the header
/// checksum (bytes 52..56: header bytes 0..52) of each frame laid end to end in `buf`, following
/// the payload length at bytes 28..32 (see docs/protocol.md).
fn fix_checksums(buf: &mut [u8]) {
    let mut at = 0;
    while buf.len() - at >= HEADER_BYTES {
        let payload_len = le_u32(buf, at + 28);
        let end = at + HEADER_BYTES + payload_len as usize;
        let whole = payload_len <= PAYLOAD_BYTES_MAX && end <= buf.len();
        if whole {
            let crc = crc32c::crc32c_append(
                crc32c::crc32c(&buf[at + HEADER_BYTES..end]),
                &buf[at..at + 48],
            );
            buf[at + 48..at + 52].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32c::crc32c(&buf[at..at + 52]);
        buf[at + 52..at + 56].copy_from_slice(&crc.to_le_bytes());
        if !whole {
            return;
        }
        at = end;
    }
}
