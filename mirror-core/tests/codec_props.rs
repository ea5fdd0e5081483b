//! Property tests of the wire codec (`mirror_core::wire`).
//!
//! - every frame kind round-trips through `encode` and `decode` (and through the streaming path
//!   `decode_header` + `decode_body`), and frames back to back are framed apart;
//! - any single corrupted byte of an encoded frame is detected, and a corrupted WRITE payload is
//!   the only corruption that can be answered with NAK;
//! - decoding arbitrary bytes never panics, never reports a frame larger than `FRAME_BYTES_MAX`,
//!   and never allocates more than that;
//! - a truncated frame asks for more bytes (`Ok(None)`).
//!
//! The random inputs come from a ChaCha RNG seeded from `PROPTEST_SEED` (decimal or `0x` hex) or
//! from [`SEED_DEFAULT`]; every property prints its seed, and a failure names the seed and the
//! shrunk input, so `PROPTEST_SEED=<seed> cargo test -p mirror-core --test codec_props` replays it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Debug;

use bytes::Bytes;
use mirror_core::genid::GenIds;
use mirror_core::wire::{
    decode, decode_body, decode_header, Frame, Hello, Kind, Op, RefuseReason, ResyncMark,
    WireError, FLAG_WANT_GRANT, FRAME_BYTES_MAX, HEADER_BYTES, HELLO_PAYLOAD_BYTES, MAC_BYTES,
    MAGIC, PAYLOAD_BYTES_MAX, VERSION,
};
use mirror_core::{Generation, Lba, NodeId, Seq, VolumeId, SECTOR_BYTES};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestError, TestRunner};

// ---------------------------------------------------------------------------------------------
// Allocation accounting: how many bytes the current thread allocates inside a measured section.

/// The system allocator, counting the bytes each thread allocates.
struct CountingAlloc;

thread_local! {
    static ALLOC_BYTES: Cell<usize> = const { Cell::new(0) };
    static ALLOC_LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record_alloc(size: usize) {
    // `try_with`: the thread-locals may already be gone while a thread exits.
    let _ = ALLOC_BYTES.try_with(|c| c.set(c.get().saturating_add(size)));
    let _ = ALLOC_LARGEST.try_with(|c| c.set(c.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record_alloc(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record_alloc(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record_alloc(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Bytes allocated by this thread while running `f`: (total, largest single allocation).
fn measure_alloc<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    ALLOC_BYTES.with(|c| c.set(0));
    ALLOC_LARGEST.with(|c| c.set(0));
    let out = f();
    let total = ALLOC_BYTES.with(Cell::get);
    let largest = ALLOC_LARGEST.with(Cell::get);
    (out, total, largest)
}

// ---------------------------------------------------------------------------------------------
// Deterministic runner.

/// Seed used when `PROPTEST_SEED` is not set.
const SEED_DEFAULT: u64 = 0x5eed_c0de_c0de_0001;

fn seed() -> u64 {
    match std::env::var("PROPTEST_SEED") {
        Err(_) => SEED_DEFAULT,
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            match parsed {
                Ok(seed) => seed,
                Err(_) => panic!("PROPTEST_SEED={text:?} is not a u64"),
            }
        }
    }
}

/// Runs `test` on `cases` inputs drawn from `strategy` with the seeded ChaCha RNG; on failure,
/// panics with the property's name, the seed and the shrunk input.
fn check<S>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let seed = seed();
    println!("codec_props::{name}: seed {seed:#x}, {cases} cases (PROPTEST_SEED replays)");
    let config = Config {
        cases,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        // The seed replays a failure; do not write regression files into the source tree.
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    match runner.run(&strategy, test) {
        Ok(()) => {}
        Err(TestError::Fail(reason, input)) => panic!(
            "property {name} failed with PROPTEST_SEED={seed:#x}: {reason}\nminimal input: {input:#?}"
        ),
        Err(TestError::Abort(reason)) => {
            panic!("property {name} aborted with PROPTEST_SEED={seed:#x}: {reason}")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies: frames within the validity rules `decode_header` enforces.

/// Largest write payload the properties generate (keeps them fast).
const GEN_WRITE_BYTES_MAX: usize = 16 * 1024;

/// An address whose extent of `len_bytes` does not overflow a u64 byte offset; biased towards
/// both ends of the address space.
fn lba_for(len_bytes: u32) -> impl Strategy<Value = Lba> {
    let lba_max = (u64::MAX - u64::from(len_bytes)) / SECTOR_BYTES;
    prop_oneof![
        0..=1024u64,
        0..=lba_max,
        lba_max.saturating_sub(16)..=lba_max,
    ]
    .prop_map(Lba)
}

/// A non-zero multiple of 512 that fits the u32 length field.
fn extent_len() -> impl Strategy<Value = u32> {
    let sectors_max = u32::MAX / 512;
    prop_oneof![1..=64u32, 1..=sectors_max, sectors_max - 4..=sectors_max]
        .prop_map(|sectors| sectors * 512)
}

fn extent() -> impl Strategy<Value = (Lba, u32)> {
    extent_len().prop_flat_map(|len| (lba_for(len), Just(len)))
}

fn write_data() -> impl Strategy<Value = Bytes> {
    (1..=GEN_WRITE_BYTES_MAX / 512)
        .prop_flat_map(|sectors| vec(any::<u8>(), sectors * 512))
        .prop_map(Bytes::from)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        write_data()
            .prop_flat_map(|data| {
                let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                (lba_for(len), Just(data))
            })
            .prop_map(|(lba, data)| Op::Write { lba, data }),
        extent().prop_map(|(lba, len_bytes)| Op::Discard { lba, len_bytes }),
        extent().prop_map(|(lba, len_bytes)| Op::WriteZeroes { lba, len_bytes }),
        Just(Op::Flush),
        Just(Op::Resync(ResyncMark::Begin { full: false })),
        Just(Op::Resync(ResyncMark::Begin { full: true })),
        Just(Op::Resync(ResyncMark::End)),
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<[u64; 4]>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<[u8; MAC_BYTES]>(),
        (any::<[u8; MAC_BYTES]>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(
                volume,
                node,
                ids,
                last_seq,
                volume_bytes,
                block_bytes,
                nonce,
                (mac, resync_follows, rebase_target),
            )| Hello {
                volume_id: VolumeId(volume),
                node_id: NodeId(node),
                gen_ids: GenIds {
                    current: Generation(ids[0]),
                    bitmap: Generation(ids[1]),
                    history: [Generation(ids[2]), Generation(ids[3])],
                },
                last_seq: Seq(last_seq),
                volume_bytes,
                block_bytes,
                nonce,
                mac,
                resync_follows,
                rebase_target,
            },
        )
}

fn refuse_reason() -> impl Strategy<Value = RefuseReason> {
    prop_oneof![
        Just(RefuseReason::WrongVolume),
        Just(RefuseReason::BadAuth),
        Just(RefuseReason::Geometry),
        Just(RefuseReason::Protocol),
        Just(RefuseReason::Busy),
        Just(RefuseReason::Other),
    ]
}

fn seq() -> impl Strategy<Value = Seq> {
    prop_oneof![0..=64u64, any::<u64>()].prop_map(Seq)
}

/// Any valid frame, every variant.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        1 => hello().prop_map(Frame::Hello),
        1 => any::<[u8; MAC_BYTES]>().prop_map(|mac| Frame::Auth { mac }),
        1 => refuse_reason().prop_map(|reason| Frame::Refuse { reason }),
        1 => (seq(), any::<u32>(), extent(), any::<bool>()).prop_map(
            |(seq, epoch, (lba, len_bytes), want_grant)| Frame::Lock {
                seq,
                epoch,
                lba,
                len_bytes,
                want_grant,
            }
        ),
        // Operations more often: WRITE is the frame that carries data.
        4 => (seq(), any::<u32>(), op(), any::<bool>()).prop_map(|(seq, epoch, op, ack_on_receipt)| {
            Frame::Op {
                seq,
                epoch,
                op: op.into(),
                ack_on_receipt,
            }
        }),
        1 => (seq(), seq()).prop_map(|(received, durable)| Frame::Ack { received, durable }),
        1 => (seq(), any::<u32>()).prop_map(|(seq, epoch)| Frame::Reject { seq, epoch }),
        1 => (seq(), any::<u32>()).prop_map(|(seq, epoch)| Frame::Granted { seq, epoch }),
        1 => (seq(), any::<u32>()).prop_map(|(seq, epoch)| Frame::Nak { seq, epoch }),
        1 => any::<u64>().prop_map(|token| Frame::Ping { token }),
        1 => any::<u64>().prop_map(|token| Frame::Pong { token }),
    ]
}

fn kind_of(frame: &Frame) -> Kind {
    match frame {
        Frame::Hello(_) => Kind::Hello,
        Frame::Auth { .. } => Kind::Auth,
        Frame::Refuse { .. } => Kind::Refuse,
        Frame::Lock { .. } => Kind::Lock,
        Frame::Op { op, .. } => match op.op() {
            Op::Write { .. } => Kind::Write,
            Op::Discard { .. } => Kind::Discard,
            Op::WriteZeroes { .. } => Kind::WriteZeroes,
            Op::Flush => Kind::Flush,
            Op::Resync(_) => Kind::Resync,
        },
        Frame::Ack { .. } => Kind::Ack,
        Frame::Reject { .. } => Kind::Reject,
        Frame::Granted { .. } => Kind::Granted,
        Frame::Nak { .. } => Kind::Nak,
        Frame::Ping { .. } => Kind::Ping,
        Frame::Pong { .. } => Kind::Pong,
    }
}

/// Payload bytes each kind carries on the wire.
fn payload_len_of(frame: &Frame) -> usize {
    match frame {
        Frame::Hello(_) => HELLO_PAYLOAD_BYTES,
        Frame::Auth { .. } => MAC_BYTES,
        Frame::Op { op, .. } => op.op().payload_bytes(),
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Header-shaped inputs: a valid magic and header checksum around arbitrary fields, so that the
// checks behind the header checksum (version, kind, flags, lengths, extents, frame checksum) are
// reached, which uniformly random bytes almost never do.

#[derive(Debug, Clone)]
struct RawFrame {
    version: u8,
    kind: u8,
    flags: u16,
    seq: u64,
    lba: u64,
    len: u32,
    payload_len: u32,
    aux: u64,
    epoch: u32,
    reserved: u32,
    /// Compute a correct frame checksum (otherwise use `frame_crc` as is).
    good_frame_crc: bool,
    frame_crc: u32,
    /// Payload bytes actually present (may be fewer or more than `payload_len`).
    payload: Vec<u8>,
}

impl RawFrame {
    fn to_bytes(&self) -> Vec<u8> {
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4] = self.version;
        h[5] = self.kind;
        h[6..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.lba.to_le_bytes());
        h[24..28].copy_from_slice(&self.len.to_le_bytes());
        h[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        h[32..40].copy_from_slice(&self.aux.to_le_bytes());
        h[40..44].copy_from_slice(&self.epoch.to_le_bytes());
        h[44..48].copy_from_slice(&self.reserved.to_le_bytes());
        let frame_crc = if self.good_frame_crc {
            let claimed = (self.payload_len as usize).min(self.payload.len());
            // Protocol version 2: the payload first, then header bytes 0..48.
            crc32c::crc32c_append(crc32c::crc32c(&self.payload[..claimed]), &h[0..48])
        } else {
            self.frame_crc
        };
        h[48..52].copy_from_slice(&frame_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&h[0..52]);
        h[52..56].copy_from_slice(&header_crc.to_le_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(&self.payload);
        out
    }
}

// Small constants; the assertion below proves the casts lossless.
/// HELLO payload bytes as a header length field.
#[allow(clippy::cast_possible_truncation)]
const HELLO_U32: u32 = HELLO_PAYLOAD_BYTES as u32;
/// AUTH payload bytes as a header length field.
#[allow(clippy::cast_possible_truncation)]
const MAC_U32: u32 = MAC_BYTES as u32;
const _: () = assert!(HELLO_U32 as usize == HELLO_PAYLOAD_BYTES && MAC_U32 as usize == MAC_BYTES);

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        (1..=64u32).prop_map(|s| s * 512),
        Just(MAC_U32),
        Just(HELLO_U32),
        Just(PAYLOAD_BYTES_MAX),
        Just(PAYLOAD_BYTES_MAX + 512),
        Just(u32::MAX),
        Just(u32::MAX - 511),
        any::<u32>(),
    ]
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..=1024u64,
        Just(u64::MAX / SECTOR_BYTES),
        Just(u64::MAX / SECTOR_BYTES - 1),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn raw_frame() -> impl Strategy<Value = RawFrame> {
    let fields = (
        prop_oneof![4 => Just(VERSION), 1 => any::<u8>()],
        prop_oneof![8 => 1..=14u8, 1 => any::<u8>()],
        prop_oneof![4 => Just(0u16), 2 => Just(FLAG_WANT_GRANT), 1 => any::<u16>()],
        interesting_u64(),
        interesting_u64(),
        interesting_u32(),
        interesting_u32(),
        interesting_u64(),
        any::<u32>(),
        prop_oneof![8 => Just(0u32), 1 => any::<u32>()],
    );
    let tail = (
        prop_oneof![3 => Just(true), 1 => Just(false)],
        any::<u32>(),
        // Payload present: none, the claimed length, a little less or more, or random.
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(-7),
            Just(1),
            Just(0),
            any::<u16>().prop_map(i64::from)
        ],
        any::<u64>(),
    );
    (fields, tail, any::<bool>()).prop_map(
        |(
            (
                version,
                kind,
                flags,
                mut seq,
                mut lba,
                mut len,
                mut payload_len,
                mut aux,
                mut epoch,
                reserved,
            ),
            (good_frame_crc, frame_crc, extra, fill),
            coherent,
        )| {
            if coherent {
                // Fields the kind does not use are zero (the decoder insists), and lengths fit
                // the kind, so that more inputs get past the header rules.
                let (uses_seq, uses_extent, uses_aux, uses_epoch) = match kind {
                    1 => (true, false, false, false),
                    3 | 13 | 14 => (false, false, true, false),
                    4 | 5 | 7 | 8 => (true, true, false, true),
                    6 | 10..=12 => (true, false, false, true),
                    9 => (true, false, true, false),
                    _ => (false, false, false, false),
                };
                if !uses_seq {
                    seq = 0;
                }
                if !uses_extent {
                    lba = 0;
                    len = 0;
                }
                if !uses_aux {
                    aux = 0;
                }
                if !uses_epoch {
                    epoch = 0;
                }
                len = len / 512 * 512;
                payload_len = match kind {
                    1 => HELLO_U32,
                    2 => MAC_U32,
                    5 => {
                        len %= 1 << 15;
                        len
                    }
                    _ => 0,
                };
            }
            // Present bytes: claimed length adjusted by `extra`, capped so the test stays small
            // (a claim above the cap is simply a truncated frame).
            let claimed = i64::from(payload_len.min(1 << 15));
            let present = usize::try_from((claimed + extra).clamp(0, 1 << 15)).unwrap_or(0);
            let mut rng = fastrand::Rng::with_seed(fill);
            let payload = (0..present).map(|_| rng.u8(..)).collect();
            RawFrame {
                version,
                kind,
                flags,
                seq,
                lba,
                len,
                payload_len,
                aux,
                epoch,
                reserved,
                good_frame_crc,
                frame_crc,
                payload,
            }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Shared checks.

/// Decodes the front of `bytes` with the allocation meter running; checks the limits every
/// decode must keep whatever the input.
fn decode_bounded(
    bytes: &[u8],
) -> Result<Result<Option<(Frame, usize)>, WireError>, TestCaseError> {
    let (result, total, largest) = measure_alloc(|| decode(bytes));
    prop_assert!(
        total <= FRAME_BYTES_MAX,
        "decode allocated {total} bytes (largest {largest}), limit {FRAME_BYTES_MAX}"
    );
    if let Ok(Some((frame, used))) = &result {
        prop_assert!(
            *used >= HEADER_BYTES,
            "frame of {used} bytes is shorter than a header"
        );
        prop_assert!(*used <= bytes.len(), "used {used} of {} bytes", bytes.len());
        prop_assert!(
            *used <= FRAME_BYTES_MAX,
            "frame of {used} bytes exceeds the limit"
        );
        prop_assert_eq!(*used, HEADER_BYTES + payload_len_of(frame));
    }
    Ok(result)
}

/// A decoded frame must survive encode + decode unchanged.
fn check_reencodes(frame: &Frame) -> Result<(), TestCaseError> {
    let bytes = frame.encode().to_vec();
    match decode(&bytes) {
        Ok(Some((again, used))) => {
            prop_assert_eq!(&again, frame);
            prop_assert_eq!(used, bytes.len());
            Ok(())
        }
        other => Err(TestCaseError::fail(format!(
            "re-encoded frame does not decode: {other:?}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Properties.

#[test]
fn every_frame_round_trips() {
    check("every_frame_round_trips", 1000, frame(), |frame| {
        let encoded = frame.encode();
        prop_assert_eq!(encoded.payload.len(), payload_len_of(&frame));
        let bytes = encoded.to_vec();
        prop_assert_eq!(bytes.len(), encoded.wire_len());
        prop_assert_eq!(bytes[5], kind_of(&frame) as u8);

        // Whole-buffer path, with trailing bytes that must not be consumed.
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0xa5; 9]);
        match decode_bounded(&padded)? {
            Ok(Some((back, used))) => {
                prop_assert_eq!(&back, &frame);
                prop_assert_eq!(used, bytes.len());
            }
            other => return Err(TestCaseError::fail(format!("decode gave {other:?}"))),
        }

        // Streaming path: header first, then exactly the announced payload.
        let header = match decode_header(&bytes[..HEADER_BYTES]) {
            Ok(h) => h,
            Err(e) => return Err(TestCaseError::fail(format!("decode_header: {e}"))),
        };
        prop_assert_eq!(header.kind, kind_of(&frame));
        prop_assert_eq!(header.payload_len as usize, payload_len_of(&frame));
        let payload = Bytes::copy_from_slice(&bytes[HEADER_BYTES..]);
        match decode_body(&header, payload) {
            Ok(back) => prop_assert_eq!(&back, &frame),
            Err(e) => return Err(TestCaseError::fail(format!("decode_body: {e}"))),
        }

        // Encoding is deterministic.
        prop_assert_eq!(frame.encode().to_vec(), bytes);
        Ok(())
    });
}

#[test]
fn frames_back_to_back_are_framed_apart() {
    check(
        "frames_back_to_back_are_framed_apart",
        300,
        vec(frame(), 1..8),
        |frames| {
            let mut stream = Vec::new();
            for f in &frames {
                stream.extend_from_slice(&f.encode().to_vec());
            }
            let mut rest = &stream[..];
            for f in &frames {
                match decode_bounded(rest)? {
                    Ok(Some((back, used))) => {
                        prop_assert_eq!(&back, f);
                        rest = &rest[used..];
                    }
                    other => return Err(TestCaseError::fail(format!("decode gave {other:?}"))),
                }
            }
            prop_assert!(rest.is_empty());
            prop_assert_eq!(decode(rest), Ok(None));
            Ok(())
        },
    );
}

#[test]
fn any_single_corrupted_byte_is_detected() {
    let strategy = (frame(), any::<prop::sample::Index>(), 1..=255u8);
    check(
        "any_single_corrupted_byte_is_detected",
        2000,
        strategy,
        |(frame, at, xor)| {
            let mut bytes = frame.encode().to_vec();
            let pos = at.index(bytes.len());
            bytes[pos] ^= xor;
            let err = match decode_bounded(&bytes)? {
                Err(e) => e,
                Ok(other) => {
                    return Err(TestCaseError::fail(format!(
                        "byte {pos} ^ {xor:#04x} undetected: decoded {other:?}"
                    )))
                }
            };
            // The streaming path must reject it too.
            let streamed = decode_header(&bytes)
                .and_then(|h| decode_body(&h, Bytes::copy_from_slice(&bytes[HEADER_BYTES..])));
            prop_assert_eq!(streamed, Err(err.clone()));
            if pos < HEADER_BYTES {
                // A corrupted header cannot be trusted, so it can never be NAKed.
                prop_assert!(
                    matches!(err, WireError::BadMagic(_) | WireError::HeaderChecksum),
                    "header byte {pos} corrupted gave {err:?}"
                );
                prop_assert_eq!(err.nak_seq(), None);
            } else {
                // A corrupted payload keeps the header: a WRITE is repaired by NAK(seq, epoch).
                let expected = match &frame {
                    Frame::Op { seq, epoch, op, .. } if matches!(op.op(), Op::Write { .. }) => {
                        Some((*seq, *epoch))
                    }
                    _ => None,
                };
                prop_assert!(
                    matches!(err, WireError::PayloadChecksum { .. }),
                    "payload byte {pos} corrupted gave {err:?}"
                );
                prop_assert_eq!(err.nak_seq(), expected);
            }
            Ok(())
        },
    );
}

#[test]
fn truncated_frames_ask_for_more() {
    let strategy = (frame(), vec(any::<prop::sample::Index>(), 16));
    check(
        "truncated_frames_ask_for_more",
        500,
        strategy,
        |(frame, cuts)| {
            let bytes = frame.encode().to_vec();
            // Every cut inside the header and around its end, plus random cuts in the payload.
            let mut lens: Vec<usize> = (0..bytes.len().min(HEADER_BYTES + 8)).collect();
            lens.extend(cuts.iter().map(|c| c.index(bytes.len())));
            for len in lens {
                let (result, total, _) = measure_alloc(|| decode(&bytes[..len]));
                prop_assert_eq!(
                    result,
                    Ok(None),
                    "prefix of {} of {} bytes",
                    len,
                    bytes.len()
                );
                prop_assert_eq!(total, 0, "a truncated frame allocated {} bytes", total);
            }
            Ok(())
        },
    );
}

#[test]
fn arbitrary_bytes_never_panic() {
    let strategy = prop_oneof![
        vec(any::<u8>(), 0..256),
        // Valid magic in front, so the header checksum is what rejects them.
        vec(any::<u8>(), 0..256).prop_map(|mut v| {
            let mut bytes = MAGIC.to_le_bytes().to_vec();
            bytes.append(&mut v);
            bytes
        }),
    ];
    check("arbitrary_bytes_never_panic", 2000, strategy, |bytes| {
        if let Ok(Some((frame, _))) = decode_bounded(&bytes)? {
            check_reencodes(&frame)?;
        }
        // The header decoder alone, at every offset of the input.
        for start in 0..bytes.len() {
            let _ = decode_header(&bytes[start..]);
        }
        Ok(())
    });
}

#[test]
fn header_shaped_garbage_is_rejected_or_decoded_within_limits() {
    // Outcomes seen: decoded, waiting for payload, header refused, payload checksum failed.
    let seen = Cell::new([0usize; 4]);
    let count = |i: usize| {
        let mut s = seen.get();
        s[i] += 1;
        seen.set(s);
    };
    check(
        "header_shaped_garbage_is_rejected_or_decoded_within_limits",
        4000,
        raw_frame(),
        |raw| {
            let bytes = raw.to_bytes();
            let result = decode_bounded(&bytes)?;
            let header = decode_header(&bytes);
            count(match (&result, &header) {
                (Ok(Some(_)), _) => 0,
                (Ok(None), _) => 1,
                (Err(_), Err(_)) => 2,
                (Err(_), Ok(_)) => 3,
            });
            match (&result, &header) {
                (Ok(Some((frame, used))), Ok(h)) => {
                    // A frame comes out only from a header that passed every rule.
                    prop_assert_eq!(h.kind, kind_of(frame));
                    prop_assert!(h.payload_len <= PAYLOAD_BYTES_MAX);
                    prop_assert_eq!(*used, HEADER_BYTES + h.payload_len as usize);
                    prop_assert_eq!(raw.reserved, 0);
                    prop_assert!(raw.good_frame_crc, "a random frame checksum was accepted");
                    let write = match frame {
                        Frame::Op { op, .. } => match op.op() {
                            Op::Write { lba, data } => Some((lba, data)),
                            _ => None,
                        },
                        _ => None,
                    };
                    if let Some((lba, data)) = write {
                        prop_assert!(!data.is_empty() && data.len() % 512 == 0);
                        let end = lba
                            .bytes()
                            .and_then(|start| start.checked_add(data.len() as u64));
                        prop_assert!(end.is_some(), "write extent overflows");
                    }
                    check_reencodes(frame)?;
                }
                (Ok(None), Ok(h)) => {
                    // Only a payload still to come can make a valid header wait.
                    prop_assert!(bytes.len() < HEADER_BYTES + h.payload_len as usize);
                }
                (Err(e), Err(he)) => prop_assert_eq!(e, he),
                (Err(WireError::PayloadChecksum { kind, seq, epoch }), Ok(h)) => {
                    prop_assert_eq!((*kind, *seq, *epoch), (h.kind, h.seq, h.epoch));
                }
                (Err(WireError::Malformed(_)), Ok(h)) if h.kind == Kind::Hello => {
                    // Only the HELLO payload has rules of its own (reserved bytes are zero).
                }
                (Err(e), Ok(h)) => {
                    return Err(TestCaseError::fail(format!(
                        "header {h:?} accepted but the frame failed with {e:?}"
                    )))
                }
                (Ok(_), Err(he)) => {
                    return Err(TestCaseError::fail(format!(
                        "decode succeeded but decode_header failed with {he:?}"
                    )))
                }
            }
            Ok(())
        },
    );
    // The generator must reach every outcome, or the property says little.
    let seen = seen.get();
    println!(
        "outcomes: decoded {}, waiting {}, header refused {}, payload checksum {}",
        seen[0], seen[1], seen[2], seen[3]
    );
    assert!(
        seen.iter().all(|n| *n > 0),
        "an outcome was never reached: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Boundaries, one case each.

#[test]
fn largest_write_round_trips_and_larger_claims_are_refused() {
    let data = Bytes::from(vec![0x5a; PAYLOAD_BYTES_MAX as usize]);
    let frame = Frame::Op {
        seq: Seq(u64::MAX),
        epoch: u32::MAX,
        op: Op::Write {
            lba: Lba((u64::MAX - u64::from(PAYLOAD_BYTES_MAX)) / SECTOR_BYTES),
            data,
        }
        .into(),
        ack_on_receipt: true,
    };
    let bytes = frame.encode().to_vec();
    assert_eq!(bytes.len(), FRAME_BYTES_MAX);
    let (result, total, _) = measure_alloc(|| decode(&bytes));
    assert_eq!(result, Ok(Some((frame, FRAME_BYTES_MAX))));
    assert!(total <= FRAME_BYTES_MAX, "allocated {total} bytes");

    // A header that claims one sector more is refused before any payload is read.
    let raw = RawFrame {
        version: VERSION,
        kind: Kind::Write as u8,
        flags: 0,
        seq: 1,
        lba: 0,
        len: PAYLOAD_BYTES_MAX + 512,
        payload_len: PAYLOAD_BYTES_MAX + 512,
        aux: 0,
        epoch: 0,
        reserved: 0,
        good_frame_crc: true,
        frame_crc: 0,
        payload: Vec::new(),
    };
    let (result, total, _) = measure_alloc(|| decode(&raw.to_bytes()));
    assert_eq!(
        result,
        Err(WireError::PayloadTooLarge(PAYLOAD_BYTES_MAX + 512))
    );
    assert!(total < 1024, "refusing a header allocated {total} bytes");
}

#[test]
fn extents_at_the_end_of_the_address_space() {
    let len = 4096u32;
    let lba_max = (u64::MAX - u64::from(len)) / SECTOR_BYTES;
    let ok = Frame::Op {
        seq: Seq(1),
        epoch: 0,
        op: Op::Discard {
            lba: Lba(lba_max),
            len_bytes: len,
        }
        .into(),
        ack_on_receipt: false,
    };
    let bytes = ok.encode().to_vec();
    assert_eq!(decode(&bytes), Ok(Some((ok, bytes.len()))));

    for lba in [lba_max + 1, u64::MAX / SECTOR_BYTES + 1, u64::MAX] {
        let frame = Frame::Lock {
            seq: Seq(1),
            epoch: 0,
            lba: Lba(lba),
            len_bytes: len,
            want_grant: false,
        };
        assert_eq!(
            decode(&frame.encode().to_vec()),
            Err(WireError::Malformed("extent overflows")),
            "lba {lba}"
        );
    }
}
