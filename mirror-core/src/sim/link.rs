//! The link between source and target: connections, frames in flight with latency and bandwidth,
//! corruption and disconnects, and the intruder who connects without the secret.

use std::collections::VecDeque;

use crate::genid::GenIds;
use crate::session::SessionAction;
use crate::source::SourceError;
use crate::target::{ConnId, TargetError};
use crate::wire::{self, Encoded, Frame, RefuseReason, WireError, HEADER_BYTES, MAC_BYTES};
use crate::{NodeId, Seq};

use super::world::{Event, Sim, Step, Stream, TICK_NS};
use super::Check;

/// Intruders' connection ids start above this (the real source's count from 0).
pub(super) const INTRUDER_CONN_BASE: u64 = 1 << 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    ToTarget,
    ToSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Corruption {
    None,
    Header,
    Payload,
}

#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) arrive: u64,
    pub(super) bytes: Vec<u8>,
    pub(super) corruption: Corruption,
}

/// One direction of the connection: frames in order, with latency and bandwidth.
#[derive(Debug, Default)]
pub(super) struct Link {
    pub(super) frames: VecDeque<InFlight>,
    pub(super) bytes: usize,
    pub(super) busy_until: u64,
    /// Nothing arrives before this tick: the link is silent (0: it never was on this connection).
    pub(super) held_until: u64,
}

impl Link {
    pub(super) fn clear(&mut self, now: u64) {
        self.frames.clear();
        self.bytes = 0;
        self.busy_until = now;
        self.held_until = 0;
    }

    pub(super) fn arrived(&self, now: u64) -> Option<&InFlight> {
        self.frames
            .front()
            .filter(|f| f.arrive.max(self.held_until) <= now)
    }

    pub(super) fn pop(&mut self) -> Option<InFlight> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.bytes.len();
        Some(f)
    }
}

impl Sim<'_> {
    pub(super) fn connect(&mut self) {
        let mut nonce_t = [0u8; MAC_BYTES];
        let mut nonce_s = [0u8; MAC_BYTES];
        self.rng.fill(&mut nonce_t);
        self.rng.fill(&mut nonce_s);
        self.s2t.clear(self.now);
        self.t2s.clear(self.now);
        if let Err(e) =
            self.node
                .engines_mut()
                .on_connect(ConnId(self.conn), nonce_t, self.now * TICK_NS)
        {
            unreachable!("the simulator's only connection was refused: {e}");
        }
        self.link.on_connected(nonce_s, self.now * TICK_NS);
        self.link_up = true;
        self.target_closed = false;
    }

    pub(super) fn disconnect(&mut self) {
        if !self.link_up {
            return;
        }
        self.cut_link();
        self.link.on_lost(self.now * TICK_NS);
        self.schedule_reconnect();
    }

    pub(super) fn schedule_silence(&mut self) {
        let mean = self.cfg.silence_gap_ticks;
        self.schedule_gap_on(Stream::Silence, mean, Event::Silence);
    }

    /// The link falls silent: frames in both directions are held (those on the way included),
    /// half of the time for good (a peer that vanished without a FIN), otherwise for up to twice
    /// the session's idle timeout, after which they arrive. Neither end is told; only the
    /// source's idle timeout gets the connection going again.
    pub(super) fn silence(&mut self) {
        if !self.link_up {
            return;
        }
        self.report.silences += 1;
        let until = if self.silence_rng.bool() {
            u64::MAX
        } else {
            let ticks = self
                .silence_rng
                .u64(1..=self.cfg.idle_timeout_ticks.saturating_mul(2));
            let until = self.now.saturating_add(ticks);
            self.schedule(until, Event::Deliver);
            until
        };
        self.s2t.held_until = until;
        self.t2s.held_until = until;
    }

    /// Asks for a [`Event::SessionTimer`] at the source session's next deadline while a
    /// connection is up (the reconnect while it is down is [`Event::Reconnect`]'s).
    pub(super) fn arm_session_timer(&mut self) {
        if !self.link_up || !self.source_life.alive() {
            return;
        }
        let at = self
            .link
            .poll_timeout()
            .map(|ns| ns.div_ceil(TICK_NS).max(self.now));
        let mut slot = self.session_timer;
        self.arm(&mut slot, at, Event::SessionTimer);
        self.session_timer = slot;
    }

    /// Asks for a [`Event::TargetTimer`] at the target engine's next deadline.
    pub(super) fn arm_target_timer(&mut self) {
        let at =
            (self.node.engines().poll_timeout()).map(|ns| ns.div_ceil(TICK_NS).max(self.now + 1));
        let mut slot = self.target_timer;
        self.arm(&mut slot, at, Event::TargetTimer);
        self.target_timer = slot;
    }

    /// Schedules `event` at `at` unless `slot` (the earliest one already scheduled) comes first:
    /// the queue holds one timer event per deadline, not one per pump.
    fn arm(&mut self, slot: &mut Option<u64>, at: Option<u64>, event: Event) {
        let Some(at) = at else { return };
        if slot.is_some_and(|t| t <= at) {
            return;
        }
        *slot = Some(at);
        self.schedule(at, event);
    }

    /// The session's deadline: a PING goes out (as the daemon's, skipped while the link's queue
    /// is full: data is flowing), or a silent connection is dropped and the reconnect policy
    /// takes over.
    pub(super) fn session_timer(&mut self) -> Step<()> {
        if self.session_timer == Some(self.now) {
            self.session_timer = None;
        }
        if !self.link_up || !self.source_life.alive() {
            return Ok(());
        }
        match self.link.handle_timeout(self.now * TICK_NS) {
            Some(SessionAction::Ping(token)) => {
                if self.s2t.bytes < self.cfg.link_bytes_max {
                    self.report.pings += 1;
                    self.send(Dir::ToTarget, &Frame::Ping { token }.encode());
                }
            }
            Some(SessionAction::Drop(reason)) => {
                // The idle timeout is far above a healthy link's quiet spells (SimConfig), and
                // PING keeps an idle one talking: only a connection that went silent may be
                // dropped (if only just healed, its answers may still be on the way).
                if self.s2t.held_until == 0 {
                    return Err(self.violation(
                        Check::Protocol,
                        format!("the source dropped a live connection: {reason}"),
                    ));
                }
                self.report.silent_drops += 1;
                self.disconnect();
            }
            Some(SessionAction::Connect) | None => {}
        }
        Ok(())
    }

    /// The source's reconnect policy decides when (backoff with jitter, as the daemon's).
    pub(super) fn schedule_reconnect(&mut self) {
        let at_ns = self.link.poll_timeout().unwrap_or(self.now * TICK_NS);
        let at = at_ns.div_ceil(TICK_NS).max(self.now + 1);
        self.schedule(at, Event::Reconnect { conn: self.conn });
    }

    /// The connection is gone for the target and the link; the source's side is the caller's.
    pub(super) fn cut_link(&mut self) {
        self.link_up = false;
        self.s2t.clear(self.now);
        self.t2s.clear(self.now);
        self.node.engines_mut().on_disconnect(ConnId(self.conn));
        self.conn += 1;
    }

    /// A connection from someone without the secret: either silent (the target's handshake
    /// deadline closes it) or a HELLO that names a last seq of 0 followed by a forged AUTH. The
    /// target must refuse it and change nothing; it must never keep the real source out.
    pub(super) fn intruder(&mut self) -> Step<()> {
        self.report.intruders += 1;
        self.next_intruder += 1;
        let conn = ConnId(INTRUDER_CONN_BASE + self.next_intruder);
        let mut nonce = [0u8; MAC_BYTES];
        self.rng.fill(&mut nonce);
        if self
            .node
            .engines_mut()
            .on_connect(conn, nonce, self.now * TICK_NS)
            .is_err()
        {
            self.node.engines_mut().on_disconnect(conn);
            return Ok(());
        }
        if self.rng.bool() {
            // Silent: left open until the deadline.
            return Ok(());
        }
        let hello = Frame::Hello(wire::Hello {
            volume_id: self.target_cfg.volume_id,
            node_id: NodeId(1),
            gen_ids: GenIds::default(),
            last_seq: Seq::NONE,
            volume_bytes: self.target_cfg.volume_bytes,
            block_bytes: self.target_cfg.block_bytes,
            nonce,
            mac: [0; MAC_BYTES],
            resync_follows: false,
            rebase_target: false,
        });
        let now_ns = self.now * TICK_NS;
        let answered = self.node.engines_mut().handle_frame(conn, hello, now_ns);
        let refused = self.node.engines_mut().handle_frame(
            conn,
            Frame::Auth {
                mac: [0; MAC_BYTES],
            },
            now_ns,
        );
        while self.node.engines_mut().poll_transmit(conn).is_some() {}
        self.node.engines_mut().on_disconnect(conn);
        if answered.is_err() || refused.is_ok() {
            return Err(self.violation(
                Check::Protocol,
                format!("an intruder's HELLO gave {answered:?} and its forged AUTH {refused:?}"),
            ));
        }
        Ok(())
    }

    pub(super) fn send(&mut self, dir: Dir, frame: &Encoded) {
        let mut bytes = frame.to_vec();
        let mut corruption = Corruption::None;
        if self.faults_on && self.rng.u32(0..1000) < self.cfg.corrupt_per_mille {
            let payload = bytes.len() - HEADER_BYTES;
            let at = if payload > 0 && self.rng.bool() {
                corruption = Corruption::Payload;
                self.report.corrupt_payloads += 1;
                HEADER_BYTES + self.rng.usize(0..payload)
            } else {
                corruption = Corruption::Header;
                self.report.corrupt_headers += 1;
                self.rng.usize(0..HEADER_BYTES)
            };
            bytes[at] ^= self.rng.u8(1..=255);
        }
        self.report.frames += 1;
        self.report.wire_bytes += u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let bw = self.cfg.bandwidth_bytes_per_tick;
        let wire_ticks = u64::try_from(bytes.len()).unwrap_or(u64::MAX).div_ceil(bw);
        let latency = self.cfg.latency_ticks;
        let now = self.now;
        let link = match dir {
            Dir::ToTarget => &mut self.s2t,
            Dir::ToSource => &mut self.t2s,
        };
        let depart = link.busy_until.max(now) + wire_ticks;
        link.busy_until = depart;
        let arrive = depart + latency;
        link.bytes += bytes.len();
        link.frames.push_back(InFlight {
            arrive,
            bytes,
            corruption,
        });
        self.schedule(arrive, Event::Deliver);
    }

    pub(super) fn source_send(&mut self) -> bool {
        let mut progress = false;
        while self.link_up && self.s2t.bytes < self.cfg.link_bytes_max {
            let Some(frame) = self.link.poll_transmit(self.now * TICK_NS) else {
                break;
            };
            self.send(Dir::ToTarget, &frame.encode());
            progress = true;
        }
        progress
    }

    pub(super) fn target_send(&mut self) -> bool {
        let mut progress = false;
        while self.link_up && self.t2s.bytes < self.cfg.link_bytes_max {
            let Some(frame) = self.node.engines_mut().poll_transmit(ConnId(self.conn)) else {
                break;
            };
            self.send(Dir::ToSource, &frame.encode());
            progress = true;
        }
        progress
    }

    /// A receiver closed the connection after a corrupted frame it could not repair.
    pub(super) fn reset(&mut self) {
        self.report.resets += 1;
        self.disconnect();
    }

    pub(super) fn target_receive(&mut self) -> Step<bool> {
        let mut progress = false;
        while self.link_up {
            let Some(front) = self.s2t.arrived(self.now) else {
                break;
            };
            if self.target_closed {
                // The target's socket is gone: its stack answers with a reset.
                self.reset();
                return Ok(true);
            }
            if let Ok(header) = wire::decode_header(&front.bytes) {
                if !self.node.engines().has_room(header.payload_len as usize) {
                    if !self.commit_full_noted {
                        self.commit_full_noted = true;
                        self.report.commit_full_waits += 1;
                    }
                    break;
                }
            }
            self.commit_full_noted = false;
            let Some(frame) = self.s2t.pop() else { break };
            progress = true;
            match self.decoded(&frame, "target")? {
                Ok(decoded) => {
                    let handled = self.node.engines_mut().handle_frame(
                        ConnId(self.conn),
                        decoded,
                        self.now * TICK_NS,
                    );
                    if let Err(TargetError::Refused(RefuseReason::Busy)) = handled {
                        let source = self.link.source();
                        if source.awaits_admission() || source.asks_rebase() {
                            // A restarted primary (or one whose target lost its data) waits
                            // until everything the target took is durable: it tries again after
                            // its backoff.
                            self.report.resync_admission_refusals += 1;
                            self.disconnect();
                            return Ok(true);
                        }
                    }
                    if let Err(e) = handled {
                        return Err(self.violation(
                            Check::Protocol,
                            format!("target closed the connection: {e}"),
                        ));
                    }
                }
                Err(err) => {
                    let repairable = err.nak_seq().is_some();
                    match self.node.engines_mut().handle_wire_error(
                        ConnId(self.conn),
                        &err,
                        self.now * TICK_NS,
                    ) {
                        Ok(()) if repairable => {}
                        Ok(()) => {
                            return Err(self.violation(
                                Check::Protocol,
                                format!("target kept a connection after unrepairable {err}"),
                            ))
                        }
                        Err(e) if repairable => {
                            return Err(self.violation(
                                Check::Protocol,
                                format!("target closed instead of NAKing ({err}): {e}"),
                            ))
                        }
                        Err(_) => {
                            self.reset();
                            return Ok(true);
                        }
                    }
                }
            }
            self.received_high = self
                .received_high
                .max(self.node.engines().status().received);
        }
        Ok(progress)
    }

    pub(super) fn source_receive(&mut self) -> Step<bool> {
        let mut progress = false;
        while self.link_up {
            if self.t2s.arrived(self.now).is_none() {
                break;
            }
            let Some(frame) = self.t2s.pop() else { break };
            progress = true;
            match self.decoded(&frame, "source")? {
                Ok(decoded) => {
                    match &decoded {
                        Frame::Nak { .. } => self.report.naks += 1,
                        Frame::Reject { .. } => self.report.rejects += 1,
                        Frame::Granted { .. } => self.report.granted += 1,
                        _ => {}
                    }
                    if let Err(e) = self.link.handle_frame(decoded, self.now * TICK_NS) {
                        let lost = matches!(
                            e.error,
                            SourceError::TargetLostData { .. }
                                | SourceError::FullResyncFollows { .. }
                        );
                        if self.replaced && lost && !e.fatal {
                            // The primary reconnects at once to announce the full resync.
                            self.report.target_losses_found += 1;
                            self.cut_link();
                            self.schedule_reconnect();
                            return Ok(true);
                        }
                        return Err(self.violation(
                            Check::Protocol,
                            format!("source closed the connection: {e}"),
                        ));
                    }
                    self.check_log()?;
                }
                Err(_) => {
                    // The source cannot repair anything it receives: it closes the connection.
                    self.reset();
                    return Ok(true);
                }
            }
        }
        Ok(progress)
    }

    /// Decodes a frame that arrived for `to`: a corrupted frame must not decode, an intact one
    /// must decode whole. `Err(e)` inside: a detected corruption for the receiver to handle.
    fn decoded(&self, frame: &InFlight, to: &str) -> Step<Result<Frame, WireError>> {
        match wire::decode(&frame.bytes) {
            Ok(Some((decoded, used))) => {
                if frame.corruption != Corruption::None || used != frame.bytes.len() {
                    return Err(self.violation(
                        Check::Protocol,
                        format!(
                            "{:?} corruption of a frame to the {to} went undetected ({decoded:?})",
                            frame.corruption
                        ),
                    ));
                }
                Ok(Ok(decoded))
            }
            Ok(None) => Err(self.violation(
                Check::Protocol,
                "a whole frame decoded as incomplete".into(),
            )),
            Err(err) if frame.corruption == Corruption::None => Err(self.violation(
                Check::Protocol,
                format!("an intact frame failed to decode: {err}"),
            )),
            Err(err) => Ok(Err(err)),
        }
    }
}
