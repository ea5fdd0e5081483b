//! Admission: connections in their handshake (bounded, each with a deadline), none of which
//! touches the target's state; the verified AUTH that makes one the session; replacement of a
//! stale session of the same node.

use super::*;

impl Target {
    /// A new connection, accepted at `now_ns`. `nonce` must be fresh and random. Nothing of the
    /// target's state changes until the connection authenticates. Refused with Busy (a REFUSE is
    /// queued for it) when [`TargetConfig::handshakes_max`] handshakes are already in flight.
    pub fn on_connect(
        &mut self,
        conn: ConnId,
        nonce: [u8; MAC_BYTES],
        now_ns: u64,
    ) -> Result<(), TargetError> {
        let full = self.handshakes.len() >= self.cfg.handshakes_max;
        self.handshakes.push(Handshake {
            conn,
            nonce,
            deadline_ns: now_ns.saturating_add(self.cfg.handshake_timeout_ns),
            state: HandshakeState::AwaitHello,
            out: VecDeque::new(),
        });
        if full {
            let last = self.handshakes.len() - 1;
            return Self::refuse_handshake(&mut self.handshakes[last], RefuseReason::Busy);
        }
        Ok(())
    }

    /// A connection is gone. If it was the session, entries not yet handed to the driver are
    /// dropped: the source resends them.
    pub fn on_disconnect(&mut self, conn: ConnId) {
        self.handshakes.retain(|h| h.conn != conn);
        self.closing.retain(|(c, _)| *c != conn);
        if self.session.is_some_and(|s| s.conn == conn) {
            self.drop_connection_state();
            self.session = None;
        }
    }

    /// The next connection the driver must close (after sending what [`Self::poll_transmit`]
    /// still has for it), and why.
    pub fn poll_close(&mut self) -> Option<(ConnId, CloseReason)> {
        self.closing.pop_front()
    }

    /// When [`Self::handle_timeout`] must next be called, if any deadline is pending.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<u64> {
        let session = self.session.map(|s| s.idle_deadline_ns);
        let handshakes = self.handshakes.iter().map(|h| h.deadline_ns);
        handshakes.chain(session).min()
    }

    /// Time has reached `now_ns`: handshakes past their deadline (refused ones whose driver has
    /// not closed them included) are forgotten, their slots free, and their connections are to
    /// be closed ([`Self::poll_close`]); so is a session idle past its timeout, unless the
    /// commit log holds operations (then the target is what is slow, and its driver may be
    /// holding the source's frames back until there is room).
    pub fn handle_timeout(&mut self, now_ns: u64) {
        if let Some(s) = self.session.filter(|s| s.idle_deadline_ns <= now_ns) {
            if self.data_entries() + self.applying.len() == 0 {
                self.drop_connection_state();
                self.session = None;
                self.closing.push_back((s.conn, CloseReason::Idle));
            } else {
                self.touch_session(now_ns);
            }
        }
        let closing = &mut self.closing;
        self.handshakes.retain(|h| {
            let expired = h.deadline_ns <= now_ns;
            if expired {
                closing.push_back((h.conn, CloseReason::HandshakeTimeout));
            }
            !expired
        });
    }

    /// The authenticated connection, if any.
    #[must_use]
    pub fn session(&self) -> Option<ConnId> {
        self.session.map(|s| s.conn)
    }

    /// Whether the engine still has a use for `conn`: it is the session, or a handshake that was
    /// neither refused nor timed out. Once false, the driver sends what [`Self::poll_transmit`]
    /// still has for it (a REFUSE, say) and closes it.
    #[must_use]
    pub fn is_open(&self, conn: ConnId) -> bool {
        self.is_session(conn)
            || self
                .handshakes
                .iter()
                .any(|h| h.conn == conn && h.state != HandshakeState::Refused)
    }

    pub(super) fn is_session(&self, conn: ConnId) -> bool {
        self.session.is_some_and(|s| s.conn == conn)
    }

    /// The session was heard from (or could not be heard: no room) at `now_ns`.
    pub(super) fn touch_session(&mut self, now_ns: u64) {
        let idle_ns = self.cfg.idle_timeout_ns;
        if let Some(s) = &mut self.session {
            s.idle_deadline_ns = now_ns.saturating_add(idle_ns);
        }
    }

    pub(super) fn drop_connection_state(&mut self) {
        let first_unapplied = self.last_handed_out().next();
        self.locks.unlock_mirror_from(first_unapplied);
        self.log.clear();
        self.lock_only = 0;
        self.log_bytes = 0;
        self.received = self.last_handed_out();
        self.epoch = 0;
        self.resend = None;
        self.out.clear();
        self.ack_dirty = false;
        self.receipt_wanted = false;
    }

    /// Last sequence number handed to the driver (applied or being applied).
    pub(super) fn last_handed_out(&self) -> Seq {
        self.applying.back().copied().unwrap_or(self.applied)
    }

    /// A frame of a connection that has not authenticated. Nothing here changes the target's
    /// state before the AUTH verified.
    pub(super) fn handle_handshake_frame(
        &mut self,
        conn: ConnId,
        frame: Frame,
        now_ns: u64,
    ) -> Result<(), TargetError> {
        let Some(index) = self.handshakes.iter().position(|h| h.conn == conn) else {
            return Err(TargetError::Protocol(SourceViolation::UnknownConn { conn }));
        };
        let told = self.last_handed_out();
        if let (TargetSabotage::TrustHelloBeforeAuth, Frame::Hello(hello)) = (self.sabotage, &frame)
        {
            if let Some(until) = self.inconsistent_until {
                self.inconsistent_until = Some(until.min(hello.last_seq));
                self.check_consistent();
            }
        }
        let h = &mut self.handshakes[index];
        match (h.state, frame) {
            (_, Frame::Pong { .. }) => Ok(()),
            (HandshakeState::AwaitHello, Frame::Hello(hello)) => {
                if hello.volume_id != self.cfg.volume_id {
                    return Self::refuse_handshake(h, RefuseReason::WrongVolume);
                }
                if hello.volume_bytes != self.cfg.volume_bytes
                    || hello.block_bytes != self.cfg.block_bytes
                {
                    return Self::refuse_handshake(h, RefuseReason::Geometry);
                }
                // A restarted primary continues its sequence after what we tell it: that must
                // be durable, or a crash of ours would lose seqs it never resends.
                // A source that copies this volume in full while it runs continues after its own
                // durable seq; only a volume without its history (what a full resync from it
                // overwrites anyway) takes that as its own.
                let rebase = (hello.rebase_target
                    && decide(&self.gen_ids, &hello.gen_ids)
                        == (Verdict::Resync {
                            from: Side::Peer,
                            full: true,
                        }))
                .then_some(hello.last_seq);
                if (hello.resync_follows || rebase.is_some()) && told != self.durable {
                    return Self::refuse_handshake(h, RefuseReason::Busy);
                }
                let mac = auth::sign(
                    &self.cfg.secret,
                    Signer::Target,
                    &hello.nonce,
                    &h.nonce,
                    &self.cfg.volume_id,
                );
                h.out.push_back(Frame::Hello(Hello {
                    volume_id: self.cfg.volume_id,
                    node_id: self.cfg.node_id,
                    gen_ids: self.gen_ids,
                    last_seq: told,
                    volume_bytes: self.cfg.volume_bytes,
                    block_bytes: self.cfg.block_bytes,
                    nonce: h.nonce,
                    mac,
                    resync_follows: false,
                    rebase_target: false,
                }));
                h.state = HandshakeState::AwaitAuth {
                    peer_nonce: hello.nonce,
                    peer_node: hello.node_id,
                    peer_gen_ids: hello.gen_ids,
                    peer_last_seq: hello.last_seq,
                    resync_follows: hello.resync_follows,
                    rebase,
                    asked_rebase: hello.rebase_target,
                    told,
                };
                Ok(())
            }
            (
                HandshakeState::AwaitAuth {
                    peer_nonce,
                    peer_node,
                    peer_gen_ids,
                    peer_last_seq,
                    resync_follows,
                    rebase,
                    asked_rebase,
                    told,
                },
                Frame::Auth { mac },
            ) => {
                let ok = auth::verify(
                    &self.cfg.secret,
                    Signer::Source,
                    &h.nonce,
                    &peer_nonce,
                    &self.cfg.volume_id,
                    &mac,
                );
                if !ok {
                    return Self::refuse_handshake(h, RefuseReason::BadAuth);
                }
                // With either flag the HELLO's seq is no bound of what we took.
                let bound = (!resync_follows && !asked_rebase).then_some(peer_last_seq);
                self.admit(index, (peer_node, peer_gen_ids), bound, told, now_ns)?;
                if let Some(seq) = rebase {
                    self.rebase(seq);
                }
                Ok(())
            }
            (HandshakeState::Refused, _) => {
                Err(TargetError::Protocol(SourceViolation::AfterRefusal {
                    conn,
                }))
            }
            (_, _) => {
                h.out.push_back(Frame::Refuse {
                    reason: RefuseReason::Protocol,
                });
                h.state = HandshakeState::Refused;
                Err(TargetError::Protocol(SourceViolation::BeforeAuth))
            }
        }
    }

    /// The session just admitted copies this volume in full and continues after `seq`: what
    /// the volume holds is no state of the source's until that copy ends (our HELLO's position
    /// was durable, nothing is in flight).
    fn rebase(&mut self, seq: Seq) {
        self.received = seq;
        self.applied = seq;
        self.durable = seq;
        // A bracket open here (a copy begun before, or in a record) is not this copy's: an end
        // the source resends from before its new begin must not make the volume trusted.
        self.resync = None;
        self.full_resync_from = None;
        self.data_untrusted = true;
        self.inconsistent_until = Some(Seq(u64::MAX));
        self.ack_dirty = true;
        self.record_due = true;
        self.rebased = Some(seq);
    }

    pub(super) fn refuse_handshake(
        h: &mut Handshake,
        reason: RefuseReason,
    ) -> Result<(), TargetError> {
        h.out.push_back(Frame::Refuse { reason });
        h.state = HandshakeState::Refused;
        Err(TargetError::Refused(reason))
    }

    /// The handshake at `index` authenticated: it becomes the session, or is refused with Busy
    /// when another node holds the session, or when the target moved since our HELLO (a replaced
    /// session of the same node was still handing out operations; the source retries).
    pub(super) fn admit(
        &mut self,
        index: usize,
        (node, gen_ids): (NodeId, GenIds),
        peer_last_seq: Option<Seq>,
        told: Seq,
        now_ns: u64,
    ) -> Result<(), TargetError> {
        if let Some(old) = self.session {
            if old.node != node {
                return Self::refuse_handshake(&mut self.handshakes[index], RefuseReason::Busy);
            }
            self.drop_connection_state();
            self.session = None;
            self.closing.push_back((old.conn, CloseReason::Replaced));
        }
        if self.last_handed_out() != told {
            return Self::refuse_handshake(&mut self.handshakes[index], RefuseReason::Busy);
        }
        let h = self.handshakes.swap_remove(index);
        self.out = h.out;
        if let Some(until) = self.inconsistent_until {
            // The source's last sequence number bounds what must be re-applied, unless the source
            // is behind what we took or says a resync follows: a restarted primary, whose
            // sequence continues after ours (a bound an earlier run gave names seqs it reuses)
            // and whose resync end says when we are consistent.
            self.inconsistent_until = match peer_last_seq {
                Some(last) if last >= told => Some(until.min(last)),
                Some(_) => Some(until),
                None => Some(Seq(u64::MAX)),
            };
            self.check_consistent();
        }
        self.session = Some(Session {
            conn: h.conn,
            node,
            gen_ids,
            idle_deadline_ns: now_ns.saturating_add(self.cfg.idle_timeout_ns),
        });
        self.ack_dirty = true;
        Ok(())
    }
}
