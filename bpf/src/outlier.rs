//! Outlier detection (failure accrual) in the socket load balancer: its settings and what the
//! kernel recorded per client and backend. The programs (`cm_sockops`, `cm_connect4`) do the
//! work; this is how the agent configures and reads them.

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::layout::{HealthKeyRaw, HealthRaw, LbConfigRaw};

/// When a backend is ejected and how it comes back. The defaults: three consecutive failed
/// connects, or one connect unanswered for 1 s with no success since, eject a backend for the
/// client that saw it; a trial connection is let through after 2 s, then 4, 8, 16 and 32 s
/// while trials fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Consecutive failed connects that eject a backend; 0 turns outlier detection off.
    pub consecutive_failures: u32,
    /// A connect unanswered this long, with no success since it started, ejects the backend
    /// (a black hole gives no failure until the client gives up).
    pub window: Duration,
    /// The wait before the first trial connection to an ejected backend.
    pub probe_interval: Duration,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            window: Duration::from_secs(1),
            probe_interval: Duration::from_secs(2),
        }
    }
}

impl OutlierDetection {
    /// Outlier detection turned off: every backend stays in selection.
    pub fn off() -> Self {
        Self {
            consecutive_failures: 0,
            ..Self::default()
        }
    }

    pub(crate) fn raw(&self) -> LbConfigRaw {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        LbConfigRaw {
            consecutive_failures: self.consecutive_failures,
            pad: 0,
            window_ns: ns(self.window),
            probe_ns: ns(self.probe_interval),
        }
    }
}

/// Why a backend was ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectReason {
    /// Consecutive failed connects.
    Failures,
    /// A connect went unanswered for the window.
    Timeout,
}

impl EjectReason {
    pub(crate) fn from_raw(reason: u32) -> Self {
        if reason == 2 {
            Self::Timeout
        } else {
            Self::Failures
        }
    }
}

/// What the kernel recorded about one backend for one client network namespace. Times are
/// ages (how long ago), read against the kernel's monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendHealth {
    /// The client's network namespace cookie.
    pub netns: u64,
    /// The backend's address.
    pub ip: Ipv4Addr,
    /// The backend's port.
    pub port: u16,
    /// IP protocol (TCP).
    pub proto: u8,
    /// Consecutive failed connects.
    pub failures: u32,
    /// Times ejected.
    pub ejections: u32,
    /// Ejected now: since how long, and why.
    pub ejected: Option<(Duration, EjectReason)>,
    /// The last failed connect, how long ago.
    pub last_failure: Option<Duration>,
    /// The last successful connect, how long ago.
    pub last_success: Option<Duration>,
}

impl BackendHealth {
    pub(crate) fn from_raw(k: &HealthKeyRaw, v: &HealthRaw, now_ns: u64) -> Self {
        let age = |t: u64| (t != 0).then(|| Duration::from_nanos(now_ns.saturating_sub(t)));
        Self {
            netns: k.netns,
            ip: Ipv4Addr::from(k.ip.to_ne_bytes()),
            port: u16::from_be(k.port),
            proto: k.proto,
            failures: v.failures,
            ejections: v.ejections,
            ejected: age(v.ejected_ns).map(|a| (a, EjectReason::from_raw(v.reason))),
            last_failure: age(v.last_failure_ns),
            last_success: age(v.last_success_ns),
        }
    }
}

/// The kernel's monotonic clock (`bpf_ktime_get_ns`), in nanoseconds.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid, exclusive pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_ages_are_read_against_the_monotonic_clock() {
        let k = HealthKeyRaw {
            netns: 7,
            ip: u32::from_ne_bytes([10, 3, 0, 5]),
            port: 8080u16.to_be(),
            proto: 6,
            pad: 0,
        };
        let v = HealthRaw {
            last_failure_ns: 9_200_000_000,
            ejected_ns: 9_200_000_000,
            failures: 3,
            ejections: 1,
            reason: 1,
            ..HealthRaw::default()
        };
        let h = BackendHealth::from_raw(&k, &v, 10_000_000_000);
        assert_eq!(h.ip, Ipv4Addr::new(10, 3, 0, 5));
        assert_eq!(h.port, 8080);
        assert_eq!(
            h.ejected,
            Some((Duration::from_millis(800), EjectReason::Failures))
        );
        assert_eq!(h.last_success, None);
        assert!(monotonic_ns() > 0);
    }

    #[test]
    fn the_settings_reach_the_kernel_in_nanoseconds_and_zero_turns_it_off() {
        let raw = OutlierDetection::default().raw();
        assert_eq!(
            (raw.consecutive_failures, raw.window_ns, raw.probe_ns),
            (3, 1_000_000_000, 2_000_000_000)
        );
        assert_eq!(OutlierDetection::off().raw().consecutive_failures, 0);
    }
}
