//! The source's connection lifecycle as policy: when to (re)connect (bounded exponential backoff
//! with jitter), when to probe an idle link with PING, when to give up on a silent one. Time and
//! randomness are passed in; the driver opens sockets and sends what [`SessionAction`] asks.

/// Timers of a source session, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// First reconnect delay after a lost connection.
    pub backoff_min_ns: u64,
    /// Largest reconnect delay (before jitter).
    pub backoff_max_ns: u64,
    /// A PING goes out when nothing was sent for this long on an authenticated connection.
    pub ping_interval_ns: u64,
    /// A connection on which nothing arrived for this long is dropped.
    pub idle_timeout_ns: u64,
}

/// What the driver must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionAction {
    /// Open a connection (then [`SourceSession::on_connected`] or [`SourceSession::on_lost`]).
    Connect,
    /// Send a PING with this token.
    Ping(u64),
    /// Drop the connection, for this reason (then [`SourceSession::on_lost`]).
    Drop(DropReason),
}

/// Why the session gives up on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DropReason {
    /// Nothing arrived for the idle timeout.
    #[error("no data from the target for {:.1} s", *idle_timeout_ns as f64 / 1e9)]
    Silent {
        /// The timeout that passed.
        idle_timeout_ns: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No connection; retry at this time (`None`: not before asked, or never after a fatal error).
    Down {
        retry_at_ns: Option<u64>,
    },
    Connecting,
    Up {
        last_rx_ns: u64,
        last_tx_ns: u64,
        authenticated: bool,
    },
}

/// Deliberate bugs for tests that prove the simulator's checkers bite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionSabotage {
    /// Behave correctly.
    #[default]
    None,
    /// Treat every lost connection as the end: never reconnect.
    NeverReconnect,
    /// Keep a silent connection forever: no idle timeout.
    KeepSilent,
    /// Never probe an idle connection: the idle timeout then drops healthy ones.
    NeverPing,
}

/// The lifecycle of one source's connection to its target.
#[derive(Debug)]
pub struct SourceSession {
    cfg: SessionConfig,
    state: State,
    backoff_ns: u64,
    fatal: bool,
    rng: fastrand::Rng,
    sabotage: SessionSabotage,
}

impl SourceSession {
    /// A session that connects at once; `seed` drives the jitter and the PING tokens.
    #[must_use]
    pub fn new(cfg: SessionConfig, seed: u64, now_ns: u64) -> SourceSession {
        SourceSession {
            cfg,
            state: State::Down {
                retry_at_ns: Some(now_ns),
            },
            backoff_ns: 0,
            fatal: false,
            rng: fastrand::Rng::with_seed(seed),
            sabotage: SessionSabotage::None,
        }
    }

    /// Breaks the policy on purpose (tests that prove the checkers bite).
    pub fn set_sabotage(&mut self, sabotage: SessionSabotage) {
        self.sabotage = sabotage;
    }

    /// The driver started connecting.
    pub fn on_connecting(&mut self) {
        self.state = State::Connecting;
    }

    /// The connection is open (the handshake starts).
    pub fn on_connected(&mut self, now_ns: u64) {
        self.state = State::Up {
            last_rx_ns: now_ns,
            last_tx_ns: now_ns,
            authenticated: false,
        };
    }

    /// The handshake finished: the backoff starts over, and idle probing begins.
    pub fn on_authenticated(&mut self) {
        if let State::Up { authenticated, .. } = &mut self.state {
            *authenticated = true;
            self.backoff_ns = 0;
        }
    }

    /// Something arrived from the target.
    pub fn on_rx(&mut self, now_ns: u64) {
        if let State::Up { last_rx_ns, .. } = &mut self.state {
            *last_rx_ns = now_ns;
        }
    }

    /// Something was sent to the target.
    pub fn on_tx(&mut self, now_ns: u64) {
        if let State::Up { last_tx_ns, .. } = &mut self.state {
            *last_tx_ns = now_ns;
        }
    }

    /// The connection (or the attempt) is gone: the next attempt waits the backoff, doubled each
    /// time up to the maximum, plus up to 25 % jitter so that many sources do not reconnect in
    /// lockstep.
    pub fn on_lost(&mut self, now_ns: u64) {
        if self.fatal || self.sabotage == SessionSabotage::NeverReconnect {
            self.state = State::Down { retry_at_ns: None };
            return;
        }
        self.backoff_ns = if self.backoff_ns == 0 {
            self.cfg.backoff_min_ns
        } else {
            self.backoff_ns
                .saturating_mul(2)
                .min(self.cfg.backoff_max_ns)
        };
        let jitter_ns = self.rng.u64(0..=self.backoff_ns / 4);
        self.state = State::Down {
            retry_at_ns: Some(
                now_ns
                    .saturating_add(self.backoff_ns)
                    .saturating_add(jitter_ns),
            ),
        };
    }

    /// Replication stopped for good: never reconnect.
    pub fn on_fatal(&mut self) {
        self.fatal = true;
        self.state = State::Down { retry_at_ns: None };
    }

    /// Whether a connection is up (authenticated or not).
    #[must_use]
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    fn idle_deadline(cfg: &SessionConfig, sabotage: SessionSabotage, last_rx_ns: u64) -> u64 {
        if sabotage == SessionSabotage::KeepSilent {
            return u64::MAX;
        }
        last_rx_ns.saturating_add(cfg.idle_timeout_ns)
    }

    /// When [`Self::handle_timeout`] must next be called, if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            State::Down { retry_at_ns } => retry_at_ns,
            State::Connecting => None,
            State::Up {
                last_rx_ns,
                last_tx_ns,
                authenticated,
            } => {
                let idle = Self::idle_deadline(&self.cfg, self.sabotage, last_rx_ns);
                Some(
                    if authenticated && self.sabotage != SessionSabotage::NeverPing {
                        idle.min(last_tx_ns.saturating_add(self.cfg.ping_interval_ns))
                    } else {
                        idle
                    },
                )
            }
        }
    }

    /// Time has reached `now_ns`: what the driver must do, if anything.
    pub fn handle_timeout(&mut self, now_ns: u64) -> Option<SessionAction> {
        match &mut self.state {
            State::Down { retry_at_ns } => {
                if retry_at_ns.is_some_and(|at| at <= now_ns) {
                    self.state = State::Connecting;
                    return Some(SessionAction::Connect);
                }
                None
            }
            State::Connecting => None,
            State::Up {
                last_rx_ns,
                last_tx_ns,
                authenticated,
            } => {
                if now_ns >= Self::idle_deadline(&self.cfg, self.sabotage, *last_rx_ns) {
                    return Some(SessionAction::Drop(DropReason::Silent {
                        idle_timeout_ns: self.cfg.idle_timeout_ns,
                    }));
                }
                // PING is answered only once the target has authenticated us.
                if *authenticated
                    && self.sabotage != SessionSabotage::NeverPing
                    && now_ns >= last_tx_ns.saturating_add(self.cfg.ping_interval_ns)
                {
                    *last_tx_ns = now_ns;
                    return Some(SessionAction::Ping(self.rng.u64(..)));
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn cfg() -> SessionConfig {
        SessionConfig {
            backoff_min_ns: 50 * MS,
            backoff_max_ns: 1_000 * MS,
            ping_interval_ns: 2_000 * MS,
            idle_timeout_ns: 20_000 * MS,
        }
    }

    #[test]
    fn reconnects_back_off_with_bounded_jitter_and_start_over_once_authenticated() {
        let mut s = SourceSession::new(cfg(), 7, 0);
        assert_eq!(s.handle_timeout(0), Some(SessionAction::Connect));
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            s.on_lost(now);
            let at = s.poll_timeout().unwrap();
            waits.push(at - now);
            assert_eq!(s.handle_timeout(at - 1), None);
            assert_eq!(s.handle_timeout(at), Some(SessionAction::Connect));
            now = at;
        }
        let mut base = 50 * MS;
        for w in &waits {
            assert!(
                *w >= base && *w <= base + base / 4,
                "{w} for backoff {base}"
            );
            base = (base * 2).min(1_000 * MS);
        }
        s.on_connected(now);
        s.on_authenticated();
        s.on_lost(now);
        assert!(s.poll_timeout().unwrap() - now <= 50 * MS + 50 * MS / 4);
        s.on_fatal();
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn an_authenticated_idle_link_is_probed_and_a_silent_one_dropped() {
        let mut s = SourceSession::new(cfg(), 1, 0);
        s.handle_timeout(0);
        s.on_connected(0);
        // Not authenticated: no PING (the target would refuse it), only the idle deadline.
        assert_eq!(s.poll_timeout(), Some(20_000 * MS));
        s.on_authenticated();
        assert_eq!(s.poll_timeout(), Some(2_000 * MS));
        assert!(matches!(
            s.handle_timeout(2_000 * MS),
            Some(SessionAction::Ping(_))
        ));
        s.on_rx(3_000 * MS);
        assert_eq!(s.poll_timeout(), Some(4_000 * MS));
        let dropped = s.handle_timeout(23_000 * MS);
        assert!(
            matches!(&dropped, Some(SessionAction::Drop(why)) if why.to_string().contains("20.0 s")),
            "{dropped:?}"
        );
    }
}
