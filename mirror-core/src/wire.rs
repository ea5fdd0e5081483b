//! The wire format: a fixed 56-byte header, an optional payload, two CRC32C checksums.
//!
//! `docs/protocol.md` is the reference for the layout. The header checksum lets a receiver trust the
//! header (and so the frame boundary and the sequence number) before it reads the payload; the frame
//! checksum covers header and payload, so a corrupted payload can be answered with `NAK(seq)` while
//! the stream stays framed. A corrupted header cannot be re-framed: the connection must be reset.

use bytes::Bytes;
use thiserror::Error;

use crate::genid::GenIds;
use crate::types::{Generation, Lba, NodeId, Seq, VolumeId, SECTOR_BYTES};

/// `"UBMR"` in little-endian byte order on the wire.
pub const MAGIC: u32 = u32::from_le_bytes(*b"UBMR");
/// The protocol version this code speaks.
pub const VERSION: u8 = 5;
/// Bytes in a frame header.
pub const HEADER_BYTES: usize = 56;
/// Largest payload a frame may carry (write data).
pub const PAYLOAD_BYTES_MAX: u32 = 1 << 20;
/// Largest frame on the wire.
pub const FRAME_BYTES_MAX: usize = HEADER_BYTES + PAYLOAD_BYTES_MAX as usize;
/// Bytes in a HELLO payload.
pub const HELLO_PAYLOAD_BYTES: usize = HELLO_PAYLOAD_LEN as usize;
const HELLO_PAYLOAD_LEN: u32 = 136;
/// Bytes in a MAC or a nonce.
pub const MAC_BYTES: usize = MAC_LEN as usize;
const MAC_LEN: u32 = 32;

/// Flag on LOCK: the source waits for GRANTED before sending the data (`lock-then-write`).
pub const FLAG_WANT_GRANT: u16 = 1;
/// Flag on an operation (WRITE, DISCARD, WRITE_ZEROES, FLUSH, RESYNC): acknowledge it as soon as it is in
/// the commit log. Without it the target reports receipt with the next durability ACK, which
/// saves an ACK frame per operation in the modes that wait for durability (or for nothing).
pub const FLAG_ACK_ON_RECEIPT: u16 = 2;
/// Flag on a source's HELLO: its `last_seq` does not bound what the target took (a primary
/// restarted after a crash, whose sequence continues after the target's and whose resync from
/// its write intent follows), so the target neither ends an unclean restart's inconsistency at it
/// nor starts the session while operations it handed out are not durable.
pub const FLAG_RESYNC_FOLLOWS: u16 = 4;
/// Flag on a source's HELLO: a full resync into the target follows, and a target without the
/// source's history continues its sequence after the HELLO's `last_seq` (the source's durable
/// seq; the source resends its log after it) instead of the source continuing after the
/// target's. A primary that finds its target's data lost while it runs sends it, so that its
/// sequence and every write in its log stay as they are.
pub const FLAG_TARGET_REBASE: u16 = 8;
const FLAGS_KNOWN: u16 =
    FLAG_WANT_GRANT | FLAG_ACK_ON_RECEIPT | FLAG_RESYNC_FOLLOWS | FLAG_TARGET_REBASE;

/// Frame kind codes (byte 5 of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Kind {
    Hello = 1,
    Auth = 2,
    Refuse = 3,
    Lock = 4,
    Write = 5,
    Flush = 6,
    Discard = 7,
    WriteZeroes = 8,
    Ack = 9,
    Reject = 10,
    Granted = 11,
    Nak = 12,
    Ping = 13,
    Pong = 14,
    Resync = 15,
}

impl Kind {
    fn from_u8(code: u8) -> Option<Kind> {
        use Kind::*;
        Some(match code {
            1 => Hello,
            2 => Auth,
            3 => Refuse,
            4 => Lock,
            5 => Write,
            6 => Flush,
            7 => Discard,
            8 => WriteZeroes,
            9 => Ack,
            10 => Reject,
            11 => Granted,
            12 => Nak,
            13 => Ping,
            14 => Pong,
            15 => Resync,
            _ => return None,
        })
    }
}

/// A mirrored operation: what the rollback log keeps and the target applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `data` at `lba`.
    Write {
        /// Where.
        lba: Lba,
        /// What (length a multiple of 512, at most [`PAYLOAD_BYTES_MAX`]).
        data: Bytes,
    },
    /// Deallocate a range (reads back as zeroes on our volumes).
    Discard {
        /// Where.
        lba: Lba,
        /// How many bytes.
        len_bytes: u32,
    },
    /// Write zeroes over a range.
    WriteZeroes {
        /// Where.
        lba: Lba,
        /// How many bytes.
        len_bytes: u32,
    },
    /// A barrier: everything before it is durable on the target once this is acknowledged durable.
    Flush,
    /// A bracket around resync writes in the sequence stream: between them the target holds
    /// chunks of the source's current data over an older state, so it is not a prefix of the
    /// source's writes and says so.
    Resync(ResyncMark),
}

/// Where a [`Op::Resync`] stands in its bracket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncMark {
    /// Resync writes follow. `full`: they cover the whole volume, so once they end the data is
    /// consistent even if it was unknown before (a replaced or never-synced target).
    Begin {
        /// Whether every chunk follows.
        full: bool,
    },
    /// The bracket's writes are all before this: the target is consistent once it is durable.
    End,
}

impl ResyncMark {
    /// The header's `aux` code (`docs/protocol.md`).
    fn code(self) -> u64 {
        match self {
            ResyncMark::Begin { full: false } => 1,
            ResyncMark::Begin { full: true } => 2,
            ResyncMark::End => 3,
        }
    }

    fn from_code(code: u64) -> Option<ResyncMark> {
        Some(match code {
            1 => ResyncMark::Begin { full: false },
            2 => ResyncMark::Begin { full: true },
            3 => ResyncMark::End,
            _ => return None,
        })
    }
}

impl Op {
    /// The byte range the operation touches (`None` for a flush).
    #[must_use]
    pub fn range(&self) -> Option<crate::Range> {
        match self {
            Op::Write { lba, data } => Some(crate::Range::new(
                lba.0.saturating_mul(SECTOR_BYTES),
                data.len() as u64,
            )),
            Op::Discard { lba, len_bytes } | Op::WriteZeroes { lba, len_bytes } => Some(
                crate::Range::new(lba.0.saturating_mul(SECTOR_BYTES), u64::from(*len_bytes)),
            ),
            Op::Flush | Op::Resync(_) => None,
        }
    }

    /// Bytes of data the operation carries (what it costs in a log).
    #[must_use]
    pub fn payload_bytes(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// An operation with the CRC32C of its write data ([`payload_crc`]), taken once where the data
/// was captured. [`Frame::Op`] carries one and [`Frame::encode`] extends its checksum by the header,
/// so a WRITE kept in the rollback log is checksummed once however often it is sent, and the data
/// is covered from capture on: damage while it waits in the log reaches the target as a checksum
/// failure instead of travelling under a fresh, matching checksum. It is built only from the data
/// ([`SummedOp::new`]) or by [`decode_body`] from the checksum it has just verified, so the
/// checksum cannot disagree with the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummedOp {
    op: Op,
    payload_crc: u32,
}

impl SummedOp {
    /// Checksums the operation's write data (one pass over it; nothing for other kinds).
    #[must_use]
    pub fn new(op: Op) -> SummedOp {
        let payload_crc = match &op {
            Op::Write { data, .. } => payload_crc(data),
            _ => payload_crc(&[]),
        };
        SummedOp { op, payload_crc }
    }

    /// `op` with the checksum [`decode_body`] just computed over exactly its payload.
    fn verified(op: Op, payload_crc: u32) -> SummedOp {
        SummedOp { op, payload_crc }
    }

    /// The operation.
    #[must_use]
    pub fn op(&self) -> &Op {
        &self.op
    }

    /// CRC32C of its write data ([`payload_crc`]; that of no bytes for other kinds).
    #[must_use]
    pub fn payload_crc(&self) -> u32 {
        self.payload_crc
    }

    /// The operation and its checksum.
    #[must_use]
    pub fn into_parts(self) -> (Op, u32) {
        (self.op, self.payload_crc)
    }
}

impl From<Op> for SummedOp {
    fn from(op: Op) -> SummedOp {
        SummedOp::new(op)
    }
}

/// CRC32C of a frame's payload alone: where the frame checksum starts (see [`Frame::encode`]).
#[must_use]
pub fn payload_crc(payload: &[u8]) -> u32 {
    crc32c::crc32c(payload)
}

/// The HELLO payload: who is speaking and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The mirrored volume.
    pub volume_id: VolumeId,
    /// The speaking node.
    pub node_id: NodeId,
    /// The speaker's generation ids: which data histories its volume holds.
    pub gen_ids: GenIds,
    /// Target: last sequence number it applied or is applying (the source resends after it).
    /// Source: last local sequence number (with [`FLAG_TARGET_REBASE`]: its durable seq, which the
    /// target's sequence continues after).
    pub last_seq: Seq,
    /// Size of the speaker's volume.
    pub volume_bytes: u64,
    /// Logical block size of the volume.
    pub block_bytes: u32,
    /// Fresh random challenge for the peer to sign.
    pub nonce: [u8; MAC_BYTES],
    /// Answer to the peer's challenge (all zero in the first HELLO of a connection).
    pub mac: [u8; MAC_BYTES],
    /// Source: [`FLAG_RESYNC_FOLLOWS`]. Always false from a target.
    pub resync_follows: bool,
    /// Source: [`FLAG_TARGET_REBASE`]. Always false from a target.
    pub rebase_target: bool,
}

/// Why the target refuses a peer (REFUSE's reason code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The peer mirrors another volume.
    WrongVolume = 1,
    /// Authentication failed.
    BadAuth = 2,
    /// Volume size or block size differ.
    Geometry = 3,
    /// The peer broke the protocol.
    Protocol = 4,
    /// The target already serves a source.
    Busy = 5,
    /// A reason this version does not know.
    Other = 0xffff,
}

impl RefuseReason {
    fn from_u16(code: u16) -> RefuseReason {
        match code {
            1 => RefuseReason::WrongVolume,
            2 => RefuseReason::BadAuth,
            3 => RefuseReason::Geometry,
            4 => RefuseReason::Protocol,
            5 => RefuseReason::Busy,
            _ => RefuseReason::Other,
        }
    }
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RefuseReason::WrongVolume => "peer mirrors another volume",
            RefuseReason::BadAuth => "authentication failed",
            RefuseReason::Geometry => "volume size or block size differ",
            RefuseReason::Protocol => "protocol violation",
            RefuseReason::Busy => "target already serves a source",
            RefuseReason::Other => "unknown reason",
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a connection (both directions).
    Hello(Hello),
    /// The source's answer to the target's challenge.
    Auth {
        /// HMAC over the target's nonce.
        mac: [u8; MAC_BYTES],
    },
    /// The target refuses the peer and closes.
    Refuse {
        /// Why.
        reason: RefuseReason,
    },
    /// Lock a range for operation `seq` (explicit lock; a WRITE without one locks its own range).
    Lock {
        /// Operation the lock is for.
        seq: Seq,
        /// Resend epoch.
        epoch: u32,
        /// First sector.
        lba: Lba,
        /// Bytes.
        len_bytes: u32,
        /// Answer with GRANTED once held (`lock-then-write`).
        want_grant: bool,
    },
    /// A mirrored operation (WRITE, DISCARD, WRITE_ZEROES, FLUSH on the wire).
    Op {
        /// Its sequence number.
        seq: Seq,
        /// Resend epoch.
        epoch: u32,
        /// The operation, with the checksum of its write data.
        op: SummedOp,
        /// Acknowledge receipt at once ([`FLAG_ACK_ON_RECEIPT`]; the source's `received` mode).
        ack_on_receipt: bool,
    },
    /// Cumulative acknowledgement: all operations through `received` are in the commit log, all
    /// through `durable` are applied and durable on the target volume.
    Ack {
        /// Last received in order.
        received: Seq,
        /// Last applied and durable.
        durable: Seq,
    },
    /// The lock for `seq` conflicts: the source halts until GRANTED.
    Reject {
        /// The rejected operation.
        seq: Seq,
        /// The epoch resent frames must carry.
        epoch: u32,
    },
    /// The lock for `seq` is now held: the source resends from `seq` (or sends its data).
    Granted {
        /// The operation.
        seq: Seq,
        /// The epoch resent frames must carry.
        epoch: u32,
    },
    /// The frame for `seq` arrived corrupted: resend it and everything after it.
    Nak {
        /// The corrupted operation.
        seq: Seq,
        /// The epoch resent frames must carry.
        epoch: u32,
    },
    /// Liveness probe.
    Ping {
        /// Echoed in PONG.
        token: u64,
    },
    /// Answer to PING.
    Pong {
        /// From the PING.
        token: u64,
    },
}

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than a header.
    #[error("truncated frame: {got} bytes, need {need}")]
    Truncated {
        /// Bytes available.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The first four bytes are not the magic number.
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    /// The header checksum does not match: the stream cannot be trusted any more.
    #[error("header checksum mismatch")]
    HeaderChecksum,
    /// A version this code does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The header announces more payload than allowed.
    #[error("payload of {0} bytes exceeds the limit of {PAYLOAD_BYTES_MAX}")]
    PayloadTooLarge(u32),
    /// The payload of an operation is corrupted; the header (and so `seq`) is intact.
    #[error("payload checksum mismatch in frame seq {seq}")]
    PayloadChecksum {
        /// Kind of the corrupted frame.
        kind: Kind,
        /// Its sequence number.
        seq: Seq,
        /// Its resend epoch.
        epoch: u32,
    },
    /// Fields that do not fit together (for example a WRITE whose payload length differs from
    /// its length field).
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

impl WireError {
    /// The sequence number to NAK, when the error is a corrupted operation payload that can be
    /// repaired by resending.
    #[must_use]
    pub fn nak_seq(&self) -> Option<(Seq, u32)> {
        match self {
            WireError::PayloadChecksum {
                kind: Kind::Write,
                seq,
                epoch,
            } => Some((*seq, *epoch)),
            _ => None,
        }
    }
}

/// A validated header: enough to know how many payload bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// Flags.
    pub flags: u16,
    /// Sequence number.
    pub seq: Seq,
    /// Sector address.
    pub lba: Lba,
    /// Length field (bytes covered by the operation).
    pub len: u32,
    /// Payload bytes that follow the header.
    pub payload_len: u32,
    /// Kind-specific value.
    pub aux: u64,
    /// Resend epoch.
    pub epoch: u32,
    frame_crc: u32,
}

/// A frame ready for the wire: the header, and the payload kept apart so write data is not copied.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Header bytes.
    pub header: [u8; HEADER_BYTES],
    /// Payload bytes (empty for most kinds).
    pub payload: Bytes,
}

impl Encoded {
    /// Total bytes on the wire.
    #[must_use]
    pub fn wire_len(&self) -> usize {
        HEADER_BYTES + self.payload.len()
    }

    /// Header and payload in one buffer.
    #[must_use]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire_len());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&self.payload);
        out
    }
}

struct RawHeader {
    kind: Kind,
    flags: u16,
    seq: u64,
    lba: u64,
    len: u32,
    aux: u64,
    epoch: u32,
}

/// An operation's frame kind, `lba`, `len`, `aux` and payload.
fn op_parts(op: &Op) -> (Kind, u64, u32, u64, Bytes) {
    match op {
        Op::Write { lba, data } => (
            Kind::Write,
            lba.0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            data.clone(),
        ),
        Op::Discard { lba, len_bytes } => (Kind::Discard, lba.0, *len_bytes, 0, Bytes::new()),
        Op::WriteZeroes { lba, len_bytes } => {
            (Kind::WriteZeroes, lba.0, *len_bytes, 0, Bytes::new())
        }
        Op::Flush => (Kind::Flush, 0, 0, 0, Bytes::new()),
        Op::Resync(mark) => (Kind::Resync, 0, 0, mark.code(), Bytes::new()),
    }
}

impl Frame {
    /// Encodes the frame. Write data is shared, not copied, and not read again: the frame
    /// checksum extends the one the operation carries ([`SummedOp`]) by the header.
    ///
    /// # Panics
    /// If a WRITE carries more than [`PAYLOAD_BYTES_MAX`] bytes: callers split larger writes.
    #[must_use]
    pub fn encode(&self) -> Encoded {
        let mut known_payload_crc = None;
        let mut raw = RawHeader {
            kind: Kind::Ping,
            flags: 0,
            seq: 0,
            lba: 0,
            len: 0,
            aux: 0,
            epoch: 0,
        };
        let payload = match self {
            Frame::Hello(h) => {
                raw.kind = Kind::Hello;
                raw.seq = h.last_seq.0;
                raw.flags = if h.resync_follows {
                    FLAG_RESYNC_FOLLOWS
                } else {
                    0
                } | if h.rebase_target {
                    FLAG_TARGET_REBASE
                } else {
                    0
                };
                Bytes::from(encode_hello(h).to_vec())
            }
            Frame::Auth { mac } => {
                raw.kind = Kind::Auth;
                Bytes::copy_from_slice(mac)
            }
            Frame::Refuse { reason } => {
                raw.kind = Kind::Refuse;
                raw.aux = *reason as u64;
                Bytes::new()
            }
            Frame::Lock {
                seq,
                epoch,
                lba,
                len_bytes,
                want_grant,
            } => {
                raw.kind = Kind::Lock;
                raw.seq = seq.0;
                raw.epoch = *epoch;
                raw.lba = lba.0;
                raw.len = *len_bytes;
                raw.flags = if *want_grant { FLAG_WANT_GRANT } else { 0 };
                Bytes::new()
            }
            Frame::Op {
                seq,
                epoch,
                op,
                ack_on_receipt,
            } => {
                known_payload_crc = Some(op.payload_crc());
                let (kind, lba, len, aux, payload) = op_parts(op.op());
                assert!(
                    payload.len() <= PAYLOAD_BYTES_MAX as usize,
                    "write of {} bytes exceeds the frame limit",
                    payload.len()
                );
                raw.kind = kind;
                raw.seq = seq.0;
                raw.epoch = *epoch;
                raw.lba = lba;
                raw.len = len;
                raw.aux = aux;
                raw.flags = if *ack_on_receipt {
                    FLAG_ACK_ON_RECEIPT
                } else {
                    0
                };
                payload
            }
            Frame::Ack { received, durable } => {
                raw.kind = Kind::Ack;
                raw.seq = received.0;
                raw.aux = durable.0;
                Bytes::new()
            }
            Frame::Reject { seq, epoch } => {
                raw.kind = Kind::Reject;
                raw.seq = seq.0;
                raw.epoch = *epoch;
                Bytes::new()
            }
            Frame::Granted { seq, epoch } => {
                raw.kind = Kind::Granted;
                raw.seq = seq.0;
                raw.epoch = *epoch;
                Bytes::new()
            }
            Frame::Nak { seq, epoch } => {
                raw.kind = Kind::Nak;
                raw.seq = seq.0;
                raw.epoch = *epoch;
                Bytes::new()
            }
            Frame::Ping { token } => {
                raw.kind = Kind::Ping;
                raw.aux = *token;
                Bytes::new()
            }
            Frame::Pong { token } => {
                raw.kind = Kind::Pong;
                raw.aux = *token;
                Bytes::new()
            }
        };
        let crc = match known_payload_crc {
            Some(crc) => {
                debug_assert_eq!(crc, payload_crc(&payload), "an operation's stale checksum");
                crc
            }
            None => payload_crc(&payload),
        };
        Encoded {
            header: encode_header(&raw, payload.len(), crc),
            payload,
        }
    }
}

fn encode_header(raw: &RawHeader, payload_len: usize, payload_crc: u32) -> [u8; HEADER_BYTES] {
    let mut h = header_fields(raw, payload_len);
    let frame_crc = frame_crc(&h, payload_crc);
    h[48..52].copy_from_slice(&frame_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&h[0..52]);
    h[52..56].copy_from_slice(&header_crc.to_le_bytes());
    h
}

/// The header's fields (bytes 0..48); both checksums still zero.
fn header_fields(raw: &RawHeader, payload_len: usize) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = VERSION;
    h[5] = raw.kind as u8;
    h[6..8].copy_from_slice(&raw.flags.to_le_bytes());
    h[8..16].copy_from_slice(&raw.seq.to_le_bytes());
    h[16..24].copy_from_slice(&raw.lba.to_le_bytes());
    h[24..28].copy_from_slice(&raw.len.to_le_bytes());
    let payload_len = u32::try_from(payload_len).unwrap_or(u32::MAX);
    h[28..32].copy_from_slice(&payload_len.to_le_bytes());
    h[32..40].copy_from_slice(&raw.aux.to_le_bytes());
    h[40..44].copy_from_slice(&raw.epoch.to_le_bytes());
    // 44..48 reserved, zero.
    h
}

/// The frame checksum: CRC32C over the payload, then the header's fields (bytes 0..48). The
/// payload comes first so that a checksum of it taken earlier ([`SummedOp`]) is extended by the
/// 48 header bytes instead of the payload being read again.
fn frame_crc(fields: &[u8; HEADER_BYTES], payload_crc: u32) -> u32 {
    crc32c::crc32c_append(payload_crc, &fields[0..48])
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Validates a header: magic, header checksum, version, kind, flags, and the payload length the
/// kind allows. After `Ok`, exactly `payload_len` bytes of payload follow.
pub fn decode_header(bytes: &[u8]) -> Result<Header, WireError> {
    if bytes.len() < HEADER_BYTES {
        return Err(WireError::Truncated {
            got: bytes.len(),
            need: HEADER_BYTES,
        });
    }
    let h = &bytes[..HEADER_BYTES];
    let magic = le_u32(h, 0);
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if crc32c::crc32c(&h[0..52]) != le_u32(h, 52) {
        return Err(WireError::HeaderChecksum);
    }
    if h[4] != VERSION {
        return Err(WireError::UnsupportedVersion(h[4]));
    }
    let kind = Kind::from_u8(h[5]).ok_or(WireError::UnknownKind(h[5]))?;
    let header = Header {
        kind,
        flags: le_u16(h, 6),
        seq: Seq(le_u64(h, 8)),
        lba: Lba(le_u64(h, 16)),
        len: le_u32(h, 24),
        payload_len: le_u32(h, 28),
        aux: le_u64(h, 32),
        epoch: le_u32(h, 40),
        frame_crc: le_u32(h, 48),
    };
    if le_u32(h, 44) != 0 {
        return Err(WireError::Malformed("reserved header bytes are not zero"));
    }
    check_fields(&header)?;
    Ok(header)
}

/// Which header fields a kind uses; every other field must be zero, so each valid frame has exactly
/// one encoding.
struct Uses {
    seq: bool,
    lba_len: bool,
    aux: bool,
    epoch: bool,
}

fn uses(kind: Kind) -> Uses {
    let (seq, lba_len, aux, epoch) = match kind {
        Kind::Hello => (true, false, false, false),
        Kind::Auth => (false, false, false, false),
        Kind::Refuse | Kind::Ping | Kind::Pong => (false, false, true, false),
        Kind::Lock | Kind::Write | Kind::Discard | Kind::WriteZeroes => (true, true, false, true),
        Kind::Flush | Kind::Reject | Kind::Granted | Kind::Nak => (true, false, false, true),
        Kind::Resync => (true, false, true, true),
        Kind::Ack => (true, false, true, false),
    };
    Uses {
        seq,
        lba_len,
        aux,
        epoch,
    }
}

/// The per-kind rules on header fields (also re-checked by [`decode_body`], since a [`Header`]
/// can be built or changed by its caller).
fn check_fields(header: &Header) -> Result<(), WireError> {
    let kind = header.kind;
    let used = uses(kind);
    if (!used.seq && header.seq.0 != 0)
        || (!used.lba_len && (header.lba.0 != 0 || header.len != 0))
        || (!used.aux && header.aux != 0)
        || (!used.epoch && header.epoch != 0)
    {
        return Err(WireError::Malformed(
            "a field this frame kind does not use is not zero",
        ));
    }
    let is_op = matches!(
        kind,
        Kind::Write | Kind::Discard | Kind::WriteZeroes | Kind::Flush | Kind::Resync
    );
    if header.flags & !FLAGS_KNOWN != 0
        || (header.flags & FLAG_WANT_GRANT != 0 && kind != Kind::Lock)
        || (header.flags & FLAG_ACK_ON_RECEIPT != 0 && !is_op)
        || (header.flags & (FLAG_RESYNC_FOLLOWS | FLAG_TARGET_REBASE) != 0 && kind != Kind::Hello)
    {
        return Err(WireError::Malformed("unknown flags"));
    }
    if header.payload_len > PAYLOAD_BYTES_MAX {
        return Err(WireError::PayloadTooLarge(header.payload_len));
    }
    let expected_payload = match kind {
        Kind::Hello => Some(HELLO_PAYLOAD_LEN),
        Kind::Auth => Some(MAC_LEN),
        Kind::Write => None,
        _ => Some(0),
    };
    if let Some(expected) = expected_payload {
        if header.payload_len != expected {
            return Err(WireError::Malformed(
                "payload length does not fit the frame kind",
            ));
        }
    }
    match kind {
        Kind::Write => {
            if header.payload_len != header.len {
                return Err(WireError::Malformed(
                    "write payload differs from its length",
                ));
            }
            check_extent(header.lba, header.len)?;
        }
        Kind::Lock | Kind::Discard | Kind::WriteZeroes => check_extent(header.lba, header.len)?,
        Kind::Resync if ResyncMark::from_code(header.aux).is_none() => {
            return Err(WireError::Malformed("unknown resync mark"));
        }
        _ => {}
    }
    Ok(())
}

fn check_extent(lba: Lba, len: u32) -> Result<(), WireError> {
    if len == 0 || u64::from(len) % SECTOR_BYTES != 0 {
        return Err(WireError::Malformed(
            "length is zero or not a multiple of 512",
        ));
    }
    let end = lba
        .bytes()
        .and_then(|start| start.checked_add(u64::from(len)));
    if end.is_none() {
        return Err(WireError::Malformed("extent overflows"));
    }
    Ok(())
}

/// Checks the frame checksum and builds the frame. `payload` must hold exactly
/// `header.payload_len` bytes.
pub fn decode_body(header: &Header, payload: Bytes) -> Result<Frame, WireError> {
    check_fields(header)?;
    if payload.len() != header.payload_len as usize {
        return Err(WireError::Truncated {
            got: payload.len(),
            need: header.payload_len as usize,
        });
    }
    let raw = RawHeader {
        kind: header.kind,
        flags: header.flags,
        seq: header.seq.0,
        lba: header.lba.0,
        len: header.len,
        aux: header.aux,
        epoch: header.epoch,
    };
    // Only the frame checksum: decode_header already checked the header's own.
    let payload_crc = payload_crc(&payload);
    if frame_crc(&header_fields(&raw, payload.len()), payload_crc) != header.frame_crc {
        return Err(WireError::PayloadChecksum {
            kind: header.kind,
            seq: header.seq,
            epoch: header.epoch,
        });
    }
    let (seq, epoch, lba) = (header.seq, header.epoch, header.lba);
    Ok(match header.kind {
        Kind::Hello => {
            if le_u32(&payload, 44) != 0 {
                return Err(WireError::Malformed("reserved HELLO bytes are not zero"));
            }
            let mut hello = decode_hello(&payload, seq);
            hello.resync_follows = header.flags & FLAG_RESYNC_FOLLOWS != 0;
            hello.rebase_target = header.flags & FLAG_TARGET_REBASE != 0;
            Frame::Hello(hello)
        }
        Kind::Auth => {
            let mut mac = [0u8; MAC_BYTES];
            mac.copy_from_slice(&payload);
            Frame::Auth { mac }
        }
        Kind::Refuse => Frame::Refuse {
            reason: RefuseReason::from_u16(u16::try_from(header.aux).unwrap_or(u16::MAX)),
        },
        Kind::Lock => Frame::Lock {
            seq,
            epoch,
            lba,
            len_bytes: header.len,
            want_grant: header.flags & FLAG_WANT_GRANT != 0,
        },
        Kind::Write => Frame::Op {
            ack_on_receipt: header.flags & FLAG_ACK_ON_RECEIPT != 0,
            seq,
            epoch,
            op: SummedOp::verified(Op::Write { lba, data: payload }, payload_crc),
        },
        Kind::Discard => Frame::Op {
            ack_on_receipt: header.flags & FLAG_ACK_ON_RECEIPT != 0,
            seq,
            epoch,
            op: SummedOp::verified(
                Op::Discard {
                    lba,
                    len_bytes: header.len,
                },
                payload_crc,
            ),
        },
        Kind::WriteZeroes => Frame::Op {
            ack_on_receipt: header.flags & FLAG_ACK_ON_RECEIPT != 0,
            seq,
            epoch,
            op: SummedOp::verified(
                Op::WriteZeroes {
                    lba,
                    len_bytes: header.len,
                },
                payload_crc,
            ),
        },
        Kind::Flush => Frame::Op {
            ack_on_receipt: header.flags & FLAG_ACK_ON_RECEIPT != 0,
            seq,
            epoch,
            op: SummedOp::verified(Op::Flush, payload_crc),
        },
        Kind::Resync => Frame::Op {
            ack_on_receipt: header.flags & FLAG_ACK_ON_RECEIPT != 0,
            seq,
            epoch,
            op: SummedOp::verified(
                Op::Resync(
                    ResyncMark::from_code(header.aux)
                        .ok_or(WireError::Malformed("unknown resync mark"))?,
                ),
                payload_crc,
            ),
        },
        Kind::Ack => Frame::Ack {
            received: seq,
            durable: Seq(header.aux),
        },
        Kind::Reject => Frame::Reject { seq, epoch },
        Kind::Granted => Frame::Granted { seq, epoch },
        Kind::Nak => Frame::Nak { seq, epoch },
        Kind::Ping => Frame::Ping { token: header.aux },
        Kind::Pong => Frame::Pong { token: header.aux },
    })
}

/// Decodes one frame from the front of `bytes`. `Ok(None)` means more bytes are needed; on
/// success returns the frame and how many bytes it used. Never reads or allocates more than
/// [`FRAME_BYTES_MAX`].
pub fn decode(bytes: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    if bytes.len() < HEADER_BYTES {
        return Ok(None);
    }
    let header = decode_header(bytes)?;
    let total = HEADER_BYTES + header.payload_len as usize;
    if bytes.len() < total {
        return Ok(None);
    }
    let payload = Bytes::copy_from_slice(&bytes[HEADER_BYTES..total]);
    decode_body(&header, payload).map(|frame| Some((frame, total)))
}

fn encode_hello(h: &Hello) -> [u8; HELLO_PAYLOAD_BYTES] {
    let mut p = [0u8; HELLO_PAYLOAD_BYTES];
    p[0..16].copy_from_slice(&h.volume_id.0);
    p[16..24].copy_from_slice(&h.node_id.0.to_le_bytes());
    p[24..32].copy_from_slice(&h.gen_ids.current.0.to_le_bytes());
    p[32..40].copy_from_slice(&h.volume_bytes.to_le_bytes());
    p[40..44].copy_from_slice(&h.block_bytes.to_le_bytes());
    // 44..48 reserved.
    p[48..80].copy_from_slice(&h.nonce);
    p[80..112].copy_from_slice(&h.mac);
    p[112..120].copy_from_slice(&h.gen_ids.bitmap.0.to_le_bytes());
    p[120..128].copy_from_slice(&h.gen_ids.history[0].0.to_le_bytes());
    p[128..136].copy_from_slice(&h.gen_ids.history[1].0.to_le_bytes());
    p
}

fn decode_hello(p: &[u8], last_seq: Seq) -> Hello {
    let mut volume_id = [0u8; 16];
    volume_id.copy_from_slice(&p[0..16]);
    let mut nonce = [0u8; MAC_BYTES];
    nonce.copy_from_slice(&p[48..80]);
    let mut mac = [0u8; MAC_BYTES];
    mac.copy_from_slice(&p[80..112]);
    Hello {
        volume_id: VolumeId(volume_id),
        node_id: NodeId(le_u64(p, 16)),
        gen_ids: GenIds {
            current: Generation(le_u64(p, 24)),
            bitmap: Generation(le_u64(p, 112)),
            history: [Generation(le_u64(p, 120)), Generation(le_u64(p, 128))],
        },
        last_seq,
        volume_bytes: le_u64(p, 32),
        block_bytes: le_u32(p, 40),
        nonce,
        mac,
        resync_follows: false,
        rebase_target: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_frame() -> Frame {
        Frame::Op {
            seq: Seq(7),
            epoch: 2,
            op: Op::Write {
                lba: Lba(16),
                data: Bytes::from(vec![0xab; 4096]),
            }
            .into(),
            ack_on_receipt: true,
        }
    }

    #[test]
    fn write_round_trips() {
        let f = write_frame();
        let bytes = f.encode().to_vec();
        assert_eq!(bytes.len(), HEADER_BYTES + 4096);
        let (back, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(back, f);
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn op_frames_carry_their_checksum_and_encode_the_documented_one() {
        let ops = [
            Op::Flush,
            Op::Resync(ResyncMark::Begin { full: false }),
            Op::Resync(ResyncMark::Begin { full: true }),
            Op::Resync(ResyncMark::End),
            Op::Discard {
                lba: Lba(8),
                len_bytes: 4096,
            },
            Op::Write {
                lba: Lba(0),
                data: Bytes::from(vec![0x11; 512]),
            },
            Op::Write {
                lba: Lba(16),
                data: Bytes::from((0..=255u8).cycle().take(4096).collect::<Vec<_>>()),
            },
            Op::Write {
                lba: Lba(2048),
                data: Bytes::from(vec![0xee; PAYLOAD_BYTES_MAX as usize]),
            },
        ];
        for op in ops {
            let summed = SummedOp::new(op.clone());
            let data: &[u8] = match &op {
                Op::Write { data, .. } => data,
                _ => &[],
            };
            assert_eq!(summed.payload_crc(), crc32c::crc32c(data), "{op:?}");
            let frame = Frame::Op {
                seq: Seq(9),
                epoch: 3,
                op: summed,
                ack_on_receipt: false,
            };
            let encoded = frame.encode();
            assert_eq!(&encoded.payload[..], data, "{op:?}");
            // docs/protocol.md: CRC32C of the payload, then of header bytes 0..48.
            let expected = crc32c::crc32c_append(crc32c::crc32c(data), &encoded.header[..48]);
            assert_eq!(le_u32(&encoded.header, 48), expected, "{op:?}");
            // Decoding gives the same operation with the checksum it verified.
            let (back, _) = decode(&encoded.to_vec()).unwrap().unwrap();
            assert_eq!(back, frame, "{op:?}");
        }
    }

    #[test]
    fn corrupt_payload_is_nakable_and_corrupt_header_is_not() {
        let mut bytes = write_frame().encode().to_vec();
        bytes[HEADER_BYTES + 100] ^= 1;
        let err = decode(&bytes).unwrap_err();
        assert_eq!(err.nak_seq(), Some((Seq(7), 2)));
        let mut bytes = write_frame().encode().to_vec();
        bytes[9] ^= 0x10;
        assert_eq!(decode(&bytes).unwrap_err(), WireError::HeaderChecksum);
    }

    #[test]
    fn short_input_asks_for_more() {
        let bytes = write_frame().encode().to_vec();
        assert_eq!(decode(&bytes[..10]).unwrap(), None);
        assert_eq!(decode(&bytes[..HEADER_BYTES + 5]).unwrap(), None);
    }
}
