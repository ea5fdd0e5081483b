//! The source side: sequence numbers, the rollback log, speculative transmission, repair.
//!
//! A driver (the ublk daemon, the file mirror, the simulator) pumps it:
//! - [`Source::submit`] for each host write, discard, write-zeroes or flush (after or while the
//!   driver writes it to the local volume);
//! - [`Source::on_connect`] / [`Source::on_disconnect`] for the connection, [`Source::handle_frame`]
//!   for each frame from the target;
//! - [`Source::poll_transmit`] for frames to send (LOCK and WRITE back to back, without waiting for
//!   the lock's answer, except in `lock-then-write`);
//! - [`Source::poll_completion`] for host operations whose acknowledgement mode is satisfied.
//!
//! An entry leaves the rollback log only when the target reports it applied and durable.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::str::FromStr;

use crate::auth::{self, Signer};
use crate::genid::{decide, GenIds, Side, Verdict};
use crate::log::{LogEntry, LogError, MemLog, RollbackLog};
use crate::types::{ExtentError, NodeId, Range, Seq, VolumeId};
use crate::wire::{Frame, Hello, Op, RefuseReason, SummedOp, MAC_BYTES, PAYLOAD_BYTES_MAX};

/// When a host write counts as complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Durable locally and in the rollback log.
    Async,
    /// Also in the target's commit log.
    Received,
    /// Also applied and durable on the target volume.
    Sync,
    /// The classic protocol (LOCK, wait for GRANTED, then WRITE); completes like `sync`. Kept as
    /// the baseline benchmarks compare against.
    LockThenWrite,
}

impl Mode {
    /// All modes, for tests and benchmarks.
    pub const ALL: [Mode; 4] = [Mode::Async, Mode::Received, Mode::Sync, Mode::LockThenWrite];
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Async => "async",
            Mode::Received => "received",
            Mode::Sync => "sync",
            Mode::LockThenWrite => "lock-then-write",
        })
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        Ok(match s {
            "async" => Mode::Async,
            "received" => Mode::Received,
            "sync" => Mode::Sync,
            "lock-then-write" => Mode::LockThenWrite,
            other => {
                return Err(format!(
                    "unknown mode '{other}' (expected async, received, sync or lock-then-write)"
                ))
            }
        })
    }
}

/// Whether speculative transmission sends an explicit LOCK before each write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockStyle {
    /// The WRITE locks its own range (the common case).
    Implied,
    /// LOCK then WRITE, back to back.
    Explicit,
}

/// Deliberate bugs for tests that prove the simulator's checkers bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceSabotage {
    /// Behave correctly.
    #[default]
    None,
    /// Do not halt or resend on REJECT.
    IgnoreReject,
    /// Drop log entries once received instead of once applied and durable.
    ReleaseOnReceived,
    /// Take any target's history for ours (no generation-id check at the handshake).
    IgnoreGenIds,
}

/// Configuration of a source.
#[derive(Clone)]
pub struct SourceConfig {
    /// The mirrored volume.
    pub volume_id: VolumeId,
    /// This node.
    pub node_id: NodeId,
    /// This node's generation ids (from its metadata record), sent in its HELLO.
    pub gen_ids: GenIds,
    /// Size of the volume.
    pub volume_bytes: u64,
    /// Logical block size.
    pub block_bytes: u32,
    /// Shared secret for authentication.
    pub secret: Vec<u8>,
    /// Acknowledgement mode.
    pub mode: Mode,
    /// Whether a host flush also waits for the target (always so in `sync`).
    pub flush_replicates: bool,
    /// Lock frames in speculative modes.
    pub lock_style: LockStyle,
    /// Bound on rollback log payload bytes.
    pub log_bytes_max: usize,
    /// Bound on rollback log entries.
    pub log_entries_max: usize,
}

impl fmt::Debug for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceConfig")
            .field("volume_id", &self.volume_id)
            .field("node_id", &self.node_id)
            .field("gen_ids", &self.gen_ids)
            .field("volume_bytes", &self.volume_bytes)
            .field("block_bytes", &self.block_bytes)
            .field("secret", &"<redacted>")
            .field("mode", &self.mode)
            .field("flush_replicates", &self.flush_replicates)
            .field("lock_style", &self.lock_style)
            .field("log_bytes_max", &self.log_bytes_max)
            .field("log_entries_max", &self.log_entries_max)
            .finish()
    }
}

/// Errors of the source engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The rollback log is full: the host must wait (or the driver records the write in the
    /// overflow bitmap).
    #[error("rollback log full")]
    LogFull,
    /// The host operation is not valid for this volume.
    #[error("invalid operation: {0}")]
    InvalidOp(InvalidOp),
    /// The operation is larger than the rollback log can ever hold.
    #[error("operation of {bytes} bytes can never fit the rollback log ({log_bytes_max} bytes)")]
    NeverFits {
        /// Its payload.
        bytes: usize,
        /// The log's bound.
        log_bytes_max: usize,
    },
    /// The log's storage failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The target refused us.
    #[error("target refused the connection: {0}")]
    Refused(RefuseReason),
    /// The target failed authentication (or we did).
    #[error("target failed authentication")]
    BadAuth,
    /// The target mirrors another volume or has another geometry.
    #[error("target mirrors another volume or has another size")]
    WrongVolume,
    /// The target reports less durable data than it acknowledged before.
    #[error("target regressed: it reports seq {target} but acknowledged seq {durable} durable")]
    TargetRegressed {
        /// What the target reports.
        target: Seq,
        /// What it had acknowledged.
        durable: Seq,
    },
    /// The target claims operations this source never made.
    #[error("target is ahead: it reports seq {target}, the last local seq is {local}")]
    TargetAhead {
        /// What the target reports.
        target: Seq,
        /// Our last sequence number.
        local: Seq,
    },
    /// The target broke the protocol.
    #[error("protocol violation by the target: {0}")]
    Protocol(TargetViolation),
    /// The driver has no randomness for a handshake nonce (reported by the driver).
    #[error("no randomness for the handshake nonce")]
    NoRandomness,
    /// No handshake completed before the deadline a start set
    /// ([`crate::node::PeerLink::set_connect_deadline`]).
    #[error("no handshake with the target completed within {secs} s")]
    Unreachable {
        /// The bound, in whole seconds.
        secs: u64,
    },
    /// The primary's own storage failed (reported by the driver): its write intent could not be
    /// stored (a write it does not cover must not reach the local volume) or a resync could not
    /// read its volume; nothing more is taken.
    #[error("local storage failed: {0}")]
    Local(String),
    /// The target holds none of this volume's history (a new or replaced volume, or a full
    /// resync that never ended): it must be copied in full, and this source announces that at
    /// its next handshake (a reconnect at once, not a failure).
    #[error(
        "the target holds none of this volume's data ({target}): reconnecting to copy it in full"
    )]
    FullResyncFollows {
        /// The target's generation ids.
        target: GenIds,
    },
    /// The target lost this volume's history while the source ran (its volume was replaced): it
    /// is copied in full while host operations go on, and this source asks it at the next
    /// handshake to continue its sequence after ours ([`Hello::rebase_target`]; a reconnect at
    /// once, not a failure).
    #[error(
        "the target's volume holds none of this volume's data any more ({target}; a replaced \
         volume?): reconnecting to copy it in full while the host goes on"
    )]
    TargetLostData {
        /// The target's generation ids.
        target: GenIds,
    },
    /// The generation ids say the target's data is not a state of ours: the pair is refused.
    #[error("{}", diverged_message(*.verdict, .local, .target))]
    Diverged {
        /// What [`crate::genid::decide`] said.
        verdict: Verdict,
        /// Ours.
        local: GenIds,
        /// The target's.
        target: GenIds,
    },
}

fn diverged_message(verdict: Verdict, local: &GenIds, target: &GenIds) -> String {
    let what = match verdict {
        Verdict::Resync {
            from: Side::Peer, ..
        } => "the target holds writes this volume lacks (it was written by another primary since): \
              this node cannot mirror to it before the roles are settled (issue 16); to discard \
              the target's data, give it a new volume",
        Verdict::SplitBrain => {
            "split brain: both this volume and the target's were written since they last agreed; \
             choose the side whose changes are discarded (issue 16), or give the target a new volume"
        }
        Verdict::Unrelated => {
            "the target holds another history of this volume id (no common generation): check \
             --volume-id, or give the target a new volume to copy this one into it"
        }
        Verdict::InSync | Verdict::NeedsInitialSource | Verdict::Resync { .. } => {
            "the generation ids do not allow this pair"
        }
    };
    format!("{what} (ours: {local}; the target's: {target})")
}

/// Why a host operation is not valid for the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidOp {
    /// More data than one frame carries.
    #[error("write of {bytes} bytes exceeds the {PAYLOAD_BYTES_MAX}-byte frame limit")]
    TooLarge {
        /// Its payload.
        bytes: usize,
    },
    /// Not a valid extent of the volume.
    #[error(transparent)]
    Extent(#[from] ExtentError),
}

/// How a target broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetViolation {
    /// A frame the connection's state does not allow.
    #[error("unexpected frame {frame} while {state}")]
    UnexpectedFrame {
        /// Its kind.
        frame: &'static str,
        /// The connection's state.
        state: &'static str,
    },
    /// An ACK for more than was sent.
    #[error("ACK received {received} durable {durable} beyond what was sent ({sent})")]
    AckBeyondSent {
        /// Its received seq.
        received: Seq,
        /// Its durable seq.
        durable: Seq,
        /// The last seq sent.
        sent: Seq,
    },
    /// An ACK whose durable seq is lower than an earlier one.
    #[error("durable seq went back from {from} to {to}")]
    DurableWentBack {
        /// What it was.
        from: Seq,
        /// What the ACK says.
        to: Seq,
    },
    /// A REJECT or NAK for a seq that is not in flight.
    #[error("resend request for seq {seq} outside ({durable}, {sent}]")]
    ResendOutside {
        /// The seq asked for.
        seq: Seq,
        /// The last seq known durable.
        durable: Seq,
        /// The last seq sent.
        sent: Seq,
    },
}

impl SourceError {
    /// Whether reconnecting cannot help: the pair is misconfigured or the target's data cannot
    /// be trusted, so the driver stops and tells the operator. Anything else (a dropped or
    /// broken connection, a busy target) is retried with a new connection.
    #[must_use]
    pub fn is_fatal(&self) -> bool {
        match self {
            SourceError::Refused(RefuseReason::Busy) => false,
            SourceError::Refused(_)
            | SourceError::BadAuth
            | SourceError::WrongVolume
            | SourceError::TargetRegressed { .. }
            | SourceError::TargetAhead { .. }
            | SourceError::NoRandomness
            | SourceError::Unreachable { .. }
            | SourceError::Local(_)
            | SourceError::Diverged { .. } => true,
            SourceError::LogFull
            | SourceError::FullResyncFollows { .. }
            | SourceError::TargetLostData { .. }
            | SourceError::InvalidOp(_)
            | SourceError::NeverFits { .. }
            | SourceError::Log(_)
            | SourceError::Protocol(_) => false,
        }
    }

    /// The message for the operator, with what to check where a hint helps.
    #[must_use]
    pub fn describe(&self) -> String {
        let hint = match self {
            SourceError::BadAuth | SourceError::Refused(RefuseReason::BadAuth) => {
                " (do both sides use the same secret?)"
            }
            SourceError::WrongVolume | SourceError::Refused(RefuseReason::WrongVolume) => {
                " (check --volume-id)"
            }
            SourceError::Refused(RefuseReason::Geometry) => {
                " (check the volume size and block size on both sides)"
            }
            _ => "",
        };
        format!("{self}{hint}")
    }
}

/// Connection state as status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// No connection.
    Disconnected,
    /// HELLO sent, waiting for the target's.
    Handshaking,
    /// Authenticated and shipping.
    Connected,
}

impl fmt::Display for ConnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnState::Disconnected => "disconnected",
            ConnState::Handshaking => "handshaking",
            ConnState::Connected => "connected",
        })
    }
}

/// A snapshot of the source's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStatus {
    /// Acknowledgement mode.
    pub mode: Mode,
    /// Connection state.
    pub conn: ConnState,
    /// Last sequence number assigned.
    pub last_local: Seq,
    /// Last sequence number sent on this connection.
    pub last_sent: Seq,
    /// Last sequence number the target received in order.
    pub received: Seq,
    /// Last sequence number applied and durable on the target.
    pub durable: Seq,
    /// Rollback log entries.
    pub log_entries: usize,
    /// Rollback log payload bytes.
    pub log_bytes: usize,
    /// Bound on rollback log payload bytes.
    pub log_bytes_max: usize,
    /// Submission time of the oldest unconfirmed operation.
    pub oldest_unconfirmed_ns: Option<u64>,
    /// Sequence number whose rejected lock halts transmission.
    pub halted_at: Option<Seq>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Disconnected,
    AwaitHello { nonce: [u8; MAC_BYTES] },
    Ready,
}

/// What a host operation waits for before it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Needs {
    /// Nothing beyond the local write and its place in the rollback log.
    Local,
    /// The target has it in its commit log.
    Received,
    /// The target applied it and made it durable.
    Durable,
}

impl Needs {
    /// The completion rule of the acknowledgement modes, the one copy every driver asks: what an
    /// operation (a flush if `is_flush`) waits for in `mode`.
    #[must_use]
    pub fn of(mode: Mode, flush_replicates: bool, is_flush: bool) -> Needs {
        match (mode, is_flush) {
            (Mode::Sync | Mode::LockThenWrite, _) => Needs::Durable,
            (_, true) if flush_replicates => Needs::Durable,
            (_, true) => Needs::Local,
            (Mode::Async, false) => Needs::Local,
            (Mode::Received, false) => Needs::Received,
        }
    }
}

const OUT_FRAMES_MAX: usize = 64;

/// A source sends at most this many LOCK frames ahead of their data (`lock-then-write` pipelines
/// its locks). The target holds such entries outside its commit log bound and refuses more.
pub const LOCKS_AHEAD_MAX: usize = 16;

/// The source state machine.
#[derive(Debug)]
pub struct Source<L: RollbackLog = MemLog> {
    cfg: SourceConfig,
    log: L,
    conn: Conn,
    last_local: Seq,
    /// Data frames were sent for every seq below this one (this connection, this epoch).
    next_send: Seq,
    /// LOCK frames were sent (or are implied) for every seq below this one.
    next_lock: Seq,
    last_sent: Seq,
    received: Seq,
    durable: Seq,
    epoch: u32,
    halted: Option<Seq>,
    granted: BTreeSet<Seq>,
    pending: VecDeque<(Seq, bool)>,
    completed: VecDeque<Seq>,
    out: VecDeque<Frame>,
    sabotage: SourceSabotage,
    /// Continue the sequence after whatever the target took, at the next handshake
    /// ([`Source::adopt_target_seq`]).
    adopt: bool,
    /// An ACK arrived on the current connection: the target admitted the session.
    admitted: bool,
    /// An operation entered the log since this engine was made.
    appended: bool,
    /// A full resync of the target was set up at a handshake ([`Self::take_full_resync`]) and
    /// has not ended ([`Self::end_full_resync`]), and whether the link has heard of it.
    full_resync: Option<(FullResync, bool)>,
    /// Ask the target at the next handshake to continue its sequence after our durable seq
    /// ([`Hello::rebase_target`]): it lost this volume's data while we ran.
    rebase_target: bool,
}

/// How a handshake set up a full resync of a target that holds none of this volume's history
/// ([`Source::take_full_resync`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullResync {
    /// Nothing was taken yet: the sequence continues after the target's, and the link copies
    /// the whole volume before host operations.
    BeforeHostOps,
    /// The target lost the data while this source ran: its sequence continues after our
    /// durable seq, the log is resent as after any drop, and the link copies the whole volume
    /// while host operations go on.
    WhileRunning,
}

impl Source<MemLog> {
    /// A source with an in-memory rollback log, starting at sequence number 1.
    #[must_use]
    pub fn new(cfg: SourceConfig) -> Source<MemLog> {
        Source::with_log(cfg, MemLog::new(), Seq::NONE)
    }
}

impl<L: RollbackLog> Source<L> {
    /// A source over `log`, whose operations through `confirmed` are known durable on the target
    /// and whose remaining entries follow it without gaps.
    pub fn with_log(cfg: SourceConfig, log: L, confirmed: Seq) -> Source<L> {
        let last_local = Seq(confirmed.0 + log.len() as u64);
        Source {
            cfg,
            log,
            conn: Conn::Disconnected,
            last_local,
            next_send: confirmed.next(),
            next_lock: confirmed.next(),
            last_sent: confirmed,
            received: confirmed,
            durable: confirmed,
            epoch: 0,
            halted: None,
            granted: BTreeSet::new(),
            pending: VecDeque::new(),
            completed: VecDeque::new(),
            out: VecDeque::new(),
            sabotage: SourceSabotage::None,
            adopt: false,
            admitted: false,
            appended: false,
            full_resync: None,
            rebase_target: false,
        }
    }

    /// A primary restarted after a crash knows the target holds everything through its
    /// record's seq but not how much more: at the next handshake its sequence continues after
    /// whatever the target holds (those writes are on the local volume too, and the write intent
    /// resyncs the chunks the target may lack). Its HELLOs say so ([`Hello::resync_follows`]),
    /// and the target admits such a session only once everything it took is durable. Submit
    /// nothing before [`Self::awaits_admission`] turns false.
    pub fn adopt_target_seq(&mut self) {
        self.adopt = true;
    }

    /// Whether the last handshake found a target holding none of this volume's history and set
    /// up its full resync, and how (reported once): the link must copy the whole volume.
    pub fn take_full_resync(&mut self) -> Option<FullResync> {
        match self.full_resync {
            Some((how, false)) => {
                self.full_resync = Some((how, true));
                Some(how)
            }
            _ => None,
        }
    }

    /// The full resync's end is durable on the target: it holds this volume's history, and a
    /// handshake that finds it without that history again means a new loss.
    pub fn end_full_resync(&mut self) {
        self.full_resync = None;
    }

    /// Whether the target admitted the current connection's session: an ACK arrived on it (the
    /// target acknowledges only an authenticated session, after taking our HELLO's position).
    #[must_use]
    pub fn is_admitted(&self) -> bool {
        self.conn == Conn::Ready && self.admitted
    }

    /// Whether the sequence still waits to continue after the target's: a restarted primary
    /// ([`Self::adopt_target_seq`]) whose session the target has not yet admitted (its first ACK
    /// shows it did; a REFUSE after our AUTH is still possible before).
    #[must_use]
    pub fn awaits_admission(&self) -> bool {
        self.adopt && !(self.conn == Conn::Ready && self.admitted)
    }

    /// Whether the next HELLO asks the target to continue after our durable seq (it lost this
    /// volume's data): a target admits that only once everything it took is durable, and
    /// refuses with Busy until then.
    #[must_use]
    pub fn asks_rebase(&self) -> bool {
        self.rebase_target
    }

    /// Breaks the engine on purpose (tests that prove the checkers bite).
    pub fn set_sabotage(&mut self, sabotage: SourceSabotage) {
        self.sabotage = sabotage;
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &SourceConfig {
        &self.cfg
    }

    /// Changes the acknowledgement mode at run time; waiting operations are re-evaluated.
    pub fn set_mode(&mut self, mode: Mode) {
        if mode == Mode::LockThenWrite && self.cfg.mode != Mode::LockThenWrite {
            // Entries already locked speculatively need no grant: the target holds their lock
            // before it applies them.
            let mut seq = self.next_send;
            while seq < self.next_lock {
                self.granted.insert(seq);
                seq = seq.next();
            }
        }
        self.cfg.mode = mode;
        self.check_completions();
    }

    /// Changes whether host flushes wait for the target.
    pub fn set_flush_replicates(&mut self, on: bool) {
        self.cfg.flush_replicates = on;
        self.check_completions();
    }

    /// Whether the log has room for an operation carrying `payload_bytes`.
    #[must_use]
    pub fn has_room(&self, payload_bytes: usize) -> bool {
        self.log.len() < self.cfg.log_entries_max
            && self.log.bytes() + payload_bytes <= self.cfg.log_bytes_max
    }

    /// Whether the log has room for `entries` more operations carrying `payload_bytes` in all.
    #[must_use]
    pub fn has_room_for(&self, entries: usize, payload_bytes: usize) -> bool {
        self.log.len().saturating_add(entries) <= self.cfg.log_entries_max
            && self.log.bytes().saturating_add(payload_bytes) <= self.cfg.log_bytes_max
    }

    /// Whether `op` is valid for this volume (what [`Self::submit`] checks first).
    pub fn check_op(&self, op: &Op) -> Result<(), SourceError> {
        self.validate(op)
    }

    fn validate(&self, op: &Op) -> Result<(), SourceError> {
        if let Op::Write { data, .. } = op {
            if data.len() > PAYLOAD_BYTES_MAX as usize {
                return Err(SourceError::InvalidOp(InvalidOp::TooLarge {
                    bytes: data.len(),
                }));
            }
        }
        if let Some(r) = op.range() {
            Range::checked(
                r.offset_bytes,
                r.len_bytes,
                u64::from(self.cfg.block_bytes),
                self.cfg.volume_bytes,
            )
            .map_err(|e| SourceError::InvalidOp(e.into()))?;
        }
        Ok(())
    }

    /// Logs a host operation and returns its sequence number. Its completion is reported by
    /// [`Source::poll_completion`] once the mode allows. An [`Op`] is checksummed here; pass a
    /// [`SummedOp`] to have that done where the data was captured (another thread).
    pub fn submit(&mut self, op: impl Into<SummedOp>, now_ns: u64) -> Result<Seq, SourceError> {
        self.append(op.into(), now_ns, true)
    }

    /// Logs an operation of the primary's own (a resync write or mark): mirrored like a host
    /// operation, with no completion to report.
    pub fn submit_own(&mut self, op: impl Into<SummedOp>, now_ns: u64) -> Result<Seq, SourceError> {
        self.append(op.into(), now_ns, false)
    }

    fn append(&mut self, op: SummedOp, now_ns: u64, completes: bool) -> Result<Seq, SourceError> {
        self.validate(op.op())?;
        if !self.has_room(op.op().payload_bytes()) {
            return Err(SourceError::LogFull);
        }
        let seq = self.last_local.next();
        let is_flush = *op.op() == Op::Flush;
        self.log.append(LogEntry {
            seq,
            op,
            submitted_ns: now_ns,
        })?;
        self.last_local = seq;
        self.adopt = false;
        self.appended = true;
        if completes {
            self.pending.push_back((seq, is_flush));
            self.check_completions();
        }
        Ok(seq)
    }

    fn needs(&self, is_flush: bool) -> Needs {
        Needs::of(self.cfg.mode, self.cfg.flush_replicates, is_flush)
    }

    /// Whether a data operation (not a flush) submitted now completes as soon as it is in the
    /// rollback log: a driver may complete it without waiting for [`Self::poll_completion`],
    /// provided its place in the sequence is already fixed.
    #[must_use]
    pub fn data_completes_on_submit(&self) -> bool {
        Needs::of(self.cfg.mode, self.cfg.flush_replicates, false) == Needs::Local
    }

    fn check_completions(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            let (seq, is_flush) = self.pending[i];
            let done = match self.needs(is_flush) {
                Needs::Local => true,
                Needs::Received => self.received >= seq || self.durable >= seq,
                Needs::Durable => self.durable >= seq,
            };
            if done {
                self.pending.remove(i);
                self.completed.push_back(seq);
            } else {
                i += 1;
            }
        }
    }

    /// The next host operation whose acknowledgement mode is satisfied.
    pub fn poll_completion(&mut self) -> Option<Seq> {
        self.completed.pop_front()
    }

    /// The last seq applied and durable on the target (every earlier one too).
    #[must_use]
    pub fn durable(&self) -> Seq {
        self.durable
    }

    /// Whether operation `seq` is applied and durable on the target.
    #[must_use]
    pub fn is_replicated(&self, seq: Seq) -> bool {
        seq <= self.durable
    }

    /// A new connection to the target; `nonce` must be fresh and random.
    pub fn on_connect(&mut self, nonce: [u8; MAC_BYTES]) {
        self.out.clear();
        self.halted = None;
        self.conn = Conn::AwaitHello { nonce };
        self.admitted = false;
        self.out.push_back(Frame::Hello(Hello {
            volume_id: self.cfg.volume_id,
            node_id: self.cfg.node_id,
            gen_ids: self.cfg.gen_ids,
            last_seq: if self.rebase_target {
                self.durable
            } else {
                self.last_local
            },
            volume_bytes: self.cfg.volume_bytes,
            block_bytes: self.cfg.block_bytes,
            nonce,
            mac: [0; MAC_BYTES],
            resync_follows: self.adopt,
            rebase_target: self.rebase_target,
        }));
    }

    /// The connection is gone; nothing is lost, the log is resent after the next HELLO.
    pub fn on_disconnect(&mut self) {
        self.out.clear();
        self.halted = None;
        self.granted.clear();
        self.conn = Conn::Disconnected;
    }

    /// One frame from the target. An error means the connection must be closed.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), SourceError> {
        match (self.conn, frame) {
            (_, Frame::Refuse { reason }) => Err(SourceError::Refused(reason)),
            (_, Frame::Ping { token }) => {
                if self.out.len() < OUT_FRAMES_MAX {
                    self.out.push_back(Frame::Pong { token });
                }
                Ok(())
            }
            (_, Frame::Pong { .. }) => Ok(()),
            (Conn::AwaitHello { nonce }, Frame::Hello(hello)) => self.on_hello(nonce, &hello),
            (Conn::Ready, Frame::Ack { received, durable }) => self.on_ack(received, durable),
            (Conn::Ready, Frame::Reject { seq, epoch }) => self.on_reject(seq, epoch),
            (Conn::Ready, Frame::Granted { seq, epoch }) => {
                if epoch != self.epoch {
                    return Ok(());
                }
                if self.halted == Some(seq) {
                    self.halted = None;
                } else if seq >= self.next_send && seq < self.next_lock {
                    self.granted.insert(seq);
                }
                Ok(())
            }
            (Conn::Ready, Frame::Nak { seq, epoch }) => {
                if epoch <= self.epoch {
                    return Ok(());
                }
                self.check_resend_seq(seq)?;
                self.epoch = epoch;
                self.halted = None;
                self.rewind(seq);
                Ok(())
            }
            (conn, other) => Err(SourceError::Protocol(TargetViolation::UnexpectedFrame {
                frame: kind_name(&other),
                state: match conn {
                    Conn::Disconnected => "disconnected",
                    Conn::AwaitHello { .. } => "awaiting the target's HELLO",
                    Conn::Ready => "connected",
                },
            })),
        }
    }

    fn on_hello(&mut self, nonce: [u8; MAC_BYTES], hello: &Hello) -> Result<(), SourceError> {
        let ok = auth::verify(
            &self.cfg.secret,
            Signer::Target,
            &nonce,
            &hello.nonce,
            &self.cfg.volume_id,
            &hello.mac,
        );
        if !ok {
            return Err(SourceError::BadAuth);
        }
        if hello.volume_id != self.cfg.volume_id
            || hello.volume_bytes != self.cfg.volume_bytes
            || hello.block_bytes != self.cfg.block_bytes
        {
            return Err(SourceError::WrongVolume);
        }
        let target = self.check_history(&hello.gen_ids, hello.last_seq)?;
        // Until the first submission: a session refused after this HELLO adopts again.
        if self.adopt && self.log.is_empty() && target > self.last_local {
            self.last_local = target;
        }
        if target < self.durable {
            return Err(SourceError::TargetRegressed {
                target,
                durable: self.durable,
            });
        }
        if target > self.last_local {
            return Err(SourceError::TargetAhead {
                target,
                local: self.last_local,
            });
        }
        self.out.push_back(Frame::Auth {
            mac: auth::sign(
                &self.cfg.secret,
                Signer::Source,
                &hello.nonce,
                &nonce,
                &self.cfg.volume_id,
            ),
        });
        self.conn = Conn::Ready;
        self.epoch = 0;
        self.halted = None;
        self.granted.clear();
        self.received = target;
        self.last_sent = target;
        self.next_send = target.next();
        self.next_lock = target.next();
        self.check_completions();
        Ok(())
    }

    /// What the target's generation ids say ([`decide`]), and the seq the session continues
    /// after: the same history (or ours a later state of it) goes on from the target's seq; a
    /// target without our history is copied in full, announced at the next handshake: by an
    /// engine that took nothing yet its sequence then continues after the target's, whatever
    /// that is; by one that did, the target's continues after our durable seq; anything else is
    /// refused.
    fn check_history(&mut self, peer: &GenIds, target: Seq) -> Result<Seq, SourceError> {
        let local = self.cfg.gen_ids;
        if self.sabotage == SourceSabotage::IgnoreGenIds {
            return Ok(target);
        }
        match decide(&local, peer) {
            // Neither side has a history: an engine driven without records (the target server's
            // protocol tests); a primary always has one, from its first start.
            Verdict::InSync
            | Verdict::NeedsInitialSource
            | Verdict::Resync {
                from: Side::Local,
                full: false,
            } => Ok(target),
            Verdict::Resync {
                from: Side::Local,
                full: true,
            } => {
                if self.full_resync.is_some() && target >= self.durable && !self.rebase_target {
                    // Our full resync is under way: the log is resent as after any drop.
                    return Ok(target);
                }
                if self.appended || !self.log.is_empty() {
                    if !self.rebase_target {
                        self.rebase_target = true;
                        return Err(SourceError::TargetLostData { target: *peer });
                    }
                    // The target takes our durable seq as its own when it admits this session;
                    // whatever an earlier resync copied into it is gone: the copy starts over.
                    self.full_resync = Some((FullResync::WhileRunning, false));
                    return Ok(self.durable);
                }
                if !self.adopt {
                    self.adopt = true;
                    return Err(SourceError::FullResyncFollows { target: *peer });
                }
                self.last_local = target;
                self.durable = target;
                self.full_resync = Some((FullResync::BeforeHostOps, false));
                Ok(target)
            }
            verdict => Err(SourceError::Diverged {
                verdict,
                local,
                target: *peer,
            }),
        }
    }

    fn on_ack(&mut self, received: Seq, durable: Seq) -> Result<(), SourceError> {
        if received > self.last_sent || durable > received.max(self.durable) {
            return Err(SourceError::Protocol(TargetViolation::AckBeyondSent {
                received,
                durable,
                sent: self.last_sent,
            }));
        }
        self.admitted = true;
        // A target we asked to rebase did so when it admitted the session.
        self.rebase_target = false;
        if durable < self.durable {
            return Err(SourceError::Protocol(TargetViolation::DurableWentBack {
                from: self.durable,
                to: durable,
            }));
        }
        self.received = received;
        self.durable = durable;
        let durable = if self.sabotage == SourceSabotage::ReleaseOnReceived {
            received
        } else {
            durable
        };
        self.log.release_through(durable)?;
        self.check_completions();
        Ok(())
    }

    fn on_reject(&mut self, seq: Seq, epoch: u32) -> Result<(), SourceError> {
        if self.sabotage == SourceSabotage::IgnoreReject {
            return Ok(());
        }
        if epoch <= self.epoch {
            return Ok(());
        }
        self.check_resend_seq(seq)?;
        self.epoch = epoch;
        self.halted = Some(seq);
        self.rewind(seq);
        Ok(())
    }

    fn check_resend_seq(&self, seq: Seq) -> Result<(), SourceError> {
        if seq <= self.durable || seq > self.last_sent {
            return Err(SourceError::Protocol(TargetViolation::ResendOutside {
                seq,
                durable: self.durable,
                sent: self.last_sent,
            }));
        }
        Ok(())
    }

    fn rewind(&mut self, seq: Seq) {
        self.next_send = seq;
        self.next_lock = seq;
        self.granted.retain(|s| *s < seq);
    }

    /// The next frame to send, or `None` until something changes. A data frame carries the
    /// operation as the log keeps it, with the checksum taken at [`Source::submit`], so encoding
    /// it does not read the payload again.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        if let Some(frame) = self.out.pop_front() {
            return Some(frame);
        }
        if self.conn != Conn::Ready || self.halted.is_some() {
            return None;
        }
        if self.cfg.mode == Mode::LockThenWrite {
            self.next_lock_then_write()
        } else {
            self.next_speculative()
        }
    }

    fn entry(&self, seq: Seq) -> LogEntry {
        match self.log.get(seq) {
            Some(e) => e,
            None => panic!("rollback log lost unconfirmed seq {seq}"),
        }
    }

    fn data_frame(&mut self, entry: LogEntry) -> Frame {
        let seq = entry.seq;
        self.next_send = seq.next();
        self.next_lock = self.next_lock.max(self.next_send);
        self.last_sent = self.last_sent.max(seq);
        Frame::Op {
            seq,
            epoch: self.epoch,
            op: entry.op,
            // Only `received` completes writes on receipt; the other modes learn it with the
            // durability ACK.
            ack_on_receipt: self.cfg.mode == Mode::Received,
        }
    }

    fn lock_frame(&mut self, entry: &LogEntry, want_grant: bool) -> Option<Frame> {
        let range = entry.op.op().range()?;
        self.next_lock = entry.seq.next();
        Some(Frame::Lock {
            seq: entry.seq,
            epoch: self.epoch,
            lba: crate::types::Lba::from_bytes(range.offset_bytes),
            len_bytes: u32::try_from(range.len_bytes).unwrap_or(u32::MAX),
            want_grant,
        })
    }

    fn next_speculative(&mut self) -> Option<Frame> {
        if self.next_send > self.last_local {
            return None;
        }
        let entry = self.entry(self.next_send);
        if self.cfg.lock_style == LockStyle::Explicit && self.next_lock == self.next_send {
            if let Some(frame) = self.lock_frame(&entry, false) {
                return Some(frame);
            }
        }
        Some(self.data_frame(entry))
    }

    fn next_lock_then_write(&mut self) -> Option<Frame> {
        if self.next_send <= self.last_local {
            let entry = self.entry(self.next_send);
            let needs_grant = entry.op.op().range().is_some();
            if !needs_grant || self.granted.remove(&entry.seq) {
                return Some(self.data_frame(entry));
            }
        }
        let ahead = self.next_lock.0.saturating_sub(self.next_send.0);
        if self.next_lock <= self.last_local && ahead < LOCKS_AHEAD_MAX as u64 {
            let entry = self.entry(self.next_lock);
            // A flush has no lock; later locks wait until it is sent, so the target sees
            // operations in order.
            return self.lock_frame(&entry, true);
        }
        None
    }

    /// Current state.
    #[must_use]
    pub fn status(&self) -> SourceStatus {
        SourceStatus {
            mode: self.cfg.mode,
            conn: match self.conn {
                Conn::Disconnected => ConnState::Disconnected,
                Conn::AwaitHello { .. } => ConnState::Handshaking,
                Conn::Ready => ConnState::Connected,
            },
            last_local: self.last_local,
            last_sent: self.last_sent,
            received: self.received,
            durable: self.durable,
            log_entries: self.log.len(),
            log_bytes: self.log.bytes(),
            log_bytes_max: self.cfg.log_bytes_max,
            oldest_unconfirmed_ns: self.log.oldest_ns(),
            halted_at: self.halted,
        }
    }

    /// The rollback log (read only).
    pub fn log(&self) -> &L {
        &self.log
    }

    /// Host operations submitted and not yet completed.
    #[must_use]
    pub fn pending_count(&self) -> usize {
        self.pending.len() + self.completed.len()
    }
}

fn kind_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "HELLO",
        Frame::Auth { .. } => "AUTH",
        Frame::Refuse { .. } => "REFUSE",
        Frame::Lock { .. } => "LOCK",
        Frame::Op { .. } => "OP",
        Frame::Ack { .. } => "ACK",
        Frame::Reject { .. } => "REJECT",
        Frame::Granted { .. } => "GRANTED",
        Frame::Nak { .. } => "NAK",
        Frame::Ping { .. } => "PING",
        Frame::Pong { .. } => "PONG",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The modes' completion rule, as the README's table states it.
    #[test]
    fn each_mode_waits_for_what_it_promises() {
        assert_eq!(Needs::of(Mode::Async, false, false), Needs::Local);
        assert_eq!(Needs::of(Mode::Received, false, false), Needs::Received);
        assert_eq!(Needs::of(Mode::Sync, false, false), Needs::Durable);
        assert_eq!(Needs::of(Mode::LockThenWrite, false, false), Needs::Durable);
        assert_eq!(Needs::of(Mode::Async, false, true), Needs::Local);
        assert_eq!(Needs::of(Mode::Async, true, true), Needs::Durable);
        assert_eq!(Needs::of(Mode::Sync, false, true), Needs::Durable);
    }

    /// A busy target or a broken connection is retried; a misconfigured pair or an untrustworthy
    /// target stops the driver, with a hint where one helps.
    #[test]
    fn fatal_errors_are_those_a_reconnect_cannot_cure() {
        let retried = [
            SourceError::Refused(RefuseReason::Busy),
            SourceError::Protocol(TargetViolation::DurableWentBack {
                from: Seq(2),
                to: Seq(1),
            }),
            SourceError::LogFull,
        ];
        for e in &retried {
            assert!(!e.is_fatal(), "{e}");
        }
        let fatal = [
            SourceError::NoRandomness,
            SourceError::Local("disk full".into()),
            SourceError::BadAuth,
            SourceError::Refused(RefuseReason::WrongVolume),
            SourceError::Refused(RefuseReason::Geometry),
            SourceError::TargetAhead {
                target: Seq(2),
                local: Seq(1),
            },
        ];
        for e in &fatal {
            assert!(e.is_fatal(), "{e}");
        }
        assert!(SourceError::BadAuth.describe().contains("same secret"));
        assert!(SourceError::Refused(RefuseReason::WrongVolume)
            .describe()
            .contains("--volume-id"));
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let cfg = SourceConfig {
            secret: b"hunter2-hunter2".to_vec(),
            ..crate::testkit::source_config(Mode::Sync, 1, 64)
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("104, 117"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}
