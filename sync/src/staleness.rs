//! The bounded-staleness contract (DESIGN section 6) as a pure state machine, driven by the
//! time of the last message from a remote and by its sync state:
//!
//! - no message (event or heartbeat) for `unreachable_after` -> **unreachable**;
//! - unreachable for `withdraw_after` more -> **withdrawn**: its service backends leave global
//!   services (identities and ipcache entries stay, so that policy for flows still in progress
//!   keeps working);
//! - withdrawn, then connected and synced again for `restore_after` without a new outage ->
//!   **restored** (hysteresis: a flapping remote stays withdrawn).

use std::time::Duration;

use tokio::time::Instant;

/// The durations of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StalenessConfig {
    /// Silence after which a remote is unreachable (default 1.5 s: three heartbeats).
    pub unreachable_after: Duration,
    /// Unreachability after which its backends are withdrawn (default 4 s).
    pub withdraw_after: Duration,
    /// Time back and synced before a withdrawn remote is restored (default 10 s).
    pub restore_after: Duration,
}

impl Default for StalenessConfig {
    fn default() -> Self {
        Self {
            unreachable_after: Duration::from_millis(1500),
            withdraw_after: Duration::from_secs(4),
            restore_after: Duration::from_secs(10),
        }
    }
}

/// Where a remote stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Messages arrive.
    Reachable,
    /// Silent since the given time.
    Unreachable {
        /// When it became unreachable.
        since: Instant,
    },
    /// Its backends are withdrawn.
    Withdrawn {
        /// When it was last seen healthy again (connected and synced), if it is.
        healthy_since: Option<Instant>,
    },
}

/// The state machine of one remote.
#[derive(Debug, Clone)]
pub struct Staleness {
    config: StalenessConfig,
    health: Health,
    last_message: Instant,
    synced: bool,
    /// The connection broke and no message came since.
    broken: bool,
}

impl Staleness {
    /// A remote that has just been configured: counted from `now`, not yet synced.
    pub fn new(config: StalenessConfig, now: Instant) -> Self {
        Self {
            config,
            health: Health::Reachable,
            last_message: now,
            synced: false,
            broken: false,
        }
    }

    /// The current state.
    pub fn health(&self) -> Health {
        self.health
    }

    /// Whether its backends are withdrawn now.
    pub fn withdrawn(&self) -> bool {
        matches!(self.health, Health::Withdrawn { .. })
    }

    /// Time since the last message.
    pub fn silence(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_message)
    }

    /// A message (event or heartbeat) arrived.
    pub fn message(&mut self, now: Instant) {
        self.last_message = now;
        self.broken = false;
        if let Health::Unreachable { .. } = self.health {
            self.health = Health::Reachable;
        }
    }

    /// The connection broke (a reset, a transport error, a refused reconnect): the remote is
    /// unreachable from `now`, without waiting for `unreachable_after` of silence. The next
    /// message makes it reachable again.
    pub fn disconnected(&mut self, now: Instant) {
        self.broken = true;
        if let Health::Reachable = self.health {
            self.health = Health::Unreachable { since: now };
        }
    }

    /// The remote's initial (or post-reset) sync completed, or the connection was lost
    /// (`false`).
    pub fn set_synced(&mut self, synced: bool, now: Instant) {
        self.synced = synced;
        if let Health::Withdrawn { healthy_since } = &mut self.health {
            *healthy_since = synced.then_some(now);
        }
    }

    /// Advances time; returns true when the withdrawn state changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        let silent = self.broken || self.silence(now) >= self.config.unreachable_after;
        let before = self.withdrawn();
        self.health = match self.health {
            Health::Reachable if silent => Health::Unreachable {
                since: self.last_message + self.config.unreachable_after,
            },
            Health::Unreachable { since } if !silent => {
                let _ = since;
                Health::Reachable
            }
            Health::Unreachable { since }
                if now.saturating_duration_since(since) >= self.config.withdraw_after =>
            {
                Health::Withdrawn {
                    healthy_since: None,
                }
            }
            Health::Withdrawn { .. } if silent => Health::Withdrawn {
                healthy_since: None,
            },
            Health::Withdrawn {
                healthy_since: Some(t),
            } if self.synced && now.saturating_duration_since(t) >= self.config.restore_after => {
                Health::Reachable
            }
            Health::Withdrawn {
                healthy_since: None,
            } if self.synced && !silent => Health::Withdrawn {
                healthy_since: Some(now),
            },
            other => other,
        };
        before != self.withdrawn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> StalenessConfig {
        StalenessConfig {
            unreachable_after: Duration::from_secs(3),
            withdraw_after: Duration::from_secs(5),
            restore_after: Duration::from_secs(10),
        }
    }

    fn at(t0: Instant, secs: f64) -> Instant {
        t0 + Duration::from_secs_f64(secs)
    }

    #[test]
    fn silence_makes_unreachable_then_withdrawn() {
        let t0 = Instant::now();
        let mut s = Staleness::new(cfg(), t0);
        s.set_synced(true, t0);
        assert!(!s.tick(at(t0, 2.9)));
        assert_eq!(s.health(), Health::Reachable);
        assert!(!s.tick(at(t0, 3.0)));
        assert!(matches!(s.health(), Health::Unreachable { .. }));
        assert!(!s.tick(at(t0, 7.9)));
        assert!(
            s.tick(at(t0, 8.0)),
            "withdrawn at unreachable_after + withdraw_after"
        );
        assert!(s.withdrawn());
    }

    #[test]
    fn a_message_before_the_withdrawal_cancels_it() {
        let t0 = Instant::now();
        let mut s = Staleness::new(cfg(), t0);
        s.set_synced(true, t0);
        s.tick(at(t0, 4.0));
        s.message(at(t0, 6.0));
        assert_eq!(s.health(), Health::Reachable);
        assert!(!s.tick(at(t0, 8.5)));
        assert!(!s.withdrawn());
    }

    #[test]
    fn restored_only_after_being_back_and_synced_for_restore_after() {
        let t0 = Instant::now();
        let mut s = Staleness::new(cfg(), t0);
        s.set_synced(true, t0);
        s.tick(at(t0, 3.0));
        s.tick(at(t0, 8.0));
        assert!(s.withdrawn());
        // Back: connected, messages, but not synced yet.
        s.set_synced(false, at(t0, 20.0));
        s.message(at(t0, 20.0));
        assert!(!s.tick(at(t0, 35.0)), "not restored before it is synced");
        s.message(at(t0, 35.0));
        s.set_synced(true, at(t0, 36.0));
        s.message(at(t0, 40.0));
        assert!(!s.tick(at(t0, 40.0)));
        s.message(at(t0, 45.9));
        assert!(!s.tick(at(t0, 45.9)));
        s.message(at(t0, 46.0));
        assert!(
            s.tick(at(t0, 46.0)),
            "restored 10 s after it was synced again"
        );
        assert_eq!(s.health(), Health::Reachable);
    }

    #[test]
    fn a_broken_connection_is_unreachable_at_once_and_withdrawn_after_withdraw_after() {
        let t0 = Instant::now();
        let mut s = Staleness::new(cfg(), t0);
        s.message(at(t0, 1.0));
        s.disconnected(at(t0, 1.5));
        assert!(!s.tick(at(t0, 1.6)));
        assert_eq!(
            s.health(),
            Health::Unreachable { since: at(t0, 1.5) },
            "not after 3 s of silence: now"
        );
        assert!(!s.tick(at(t0, 6.4)), "withdraw_after (5 s) not over");
        assert!(s.tick(at(t0, 6.5)));
        assert!(s.withdrawn());
    }

    #[test]
    fn a_quick_reconnect_after_a_broken_connection_cancels_the_withdrawal() {
        let t0 = Instant::now();
        let mut s = Staleness::new(cfg(), t0);
        s.disconnected(at(t0, 1.0));
        s.tick(at(t0, 2.0));
        // The restarted apiserver answers 2 s later.
        s.message(at(t0, 3.0));
        s.tick(at(t0, 3.1));
        assert_eq!(s.health(), Health::Reachable);
        assert!(!s.tick(at(t0, 6.5)) && !s.withdrawn());
    }

    #[test]
    fn a_flapping_remote_stays_withdrawn() {
        let t0 = Instant::now();
        let mut s = Staleness::new(cfg(), t0);
        s.set_synced(true, t0);
        s.tick(at(t0, 3.0));
        s.tick(at(t0, 8.0));
        assert!(s.withdrawn());
        // Up for 4 s, down for 4 s, over and over: never 10 s of health in a row.
        let mut t = 10.0;
        for _ in 0..10 {
            s.set_synced(true, at(t0, t));
            for k in 0..4 {
                s.message(at(t0, t + f64::from(k)));
                s.tick(at(t0, t + f64::from(k)));
            }
            t += 4.0;
            s.set_synced(false, at(t0, t));
            s.tick(at(t0, t + 3.5));
            t += 4.0;
            assert!(s.withdrawn(), "restored while flapping at {t} s");
        }
    }
}
