//! Verdict events from the policy programs' ring buffer (and outlier detection's ejections),
//! decoded and read as an async stream.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use aya::maps::{MapData, RingBuf};
use futures::Stream;
use tokio::io::unix::AsyncFd;

use crate::api::{Direction, Error, Result};
use crate::layout::EventRaw;

/// What the policy program did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventVerdict {
    /// Passed by an allow entry (reported once per new flow).
    Allowed,
    /// Dropped (every dropped packet is reported).
    Denied,
    /// Passed, but only because of audit mode.
    Audited,
    /// Outlier detection ejected a backend for a client: `dst_ip`, `dport` and `proto` name
    /// the backend, `rule_id` the failed connects counted, `endpoint_id` the reason (1:
    /// consecutive failures, 2: a connect unanswered for the window).
    Ejected,
    /// A trial connection to an ejected backend succeeded: it is selected again.
    Readmitted,
}

/// One verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerdictEvent {
    /// Kernel monotonic time (`bpf_ktime_get_ns`).
    pub time_ns: u64,
    /// The local endpoint's direction.
    pub direction: Direction,
    /// The verdict.
    pub verdict: EventVerdict,
    /// Source address.
    pub src_ip: Ipv4Addr,
    /// Destination address.
    pub dst_ip: Ipv4Addr,
    /// Source identity.
    pub src_identity: u32,
    /// Destination identity.
    pub dst_identity: u32,
    /// Source cluster ID (0: unknown).
    pub src_cluster: u16,
    /// Destination cluster ID (0: unknown).
    pub dst_cluster: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// The local endpoint's ID.
    pub endpoint_id: u32,
    /// The rule of the deciding entry (0: default deny).
    pub rule_id: u32,
}

impl VerdictEvent {
    fn decode(raw: &EventRaw) -> Self {
        Self {
            time_ns: raw.time_ns,
            direction: if raw.direction == 1 {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            verdict: match raw.verdict {
                1 => EventVerdict::Allowed,
                3 => EventVerdict::Audited,
                4 => EventVerdict::Ejected,
                5 => EventVerdict::Readmitted,
                _ => EventVerdict::Denied,
            },
            src_ip: Ipv4Addr::from(raw.src_ip.to_ne_bytes()),
            dst_ip: Ipv4Addr::from(raw.dst_ip.to_ne_bytes()),
            src_identity: raw.src_identity,
            dst_identity: raw.dst_identity,
            src_cluster: raw.src_cluster,
            dst_cluster: raw.dst_cluster,
            dport: u16::from_be(raw.dport),
            proto: raw.proto,
            endpoint_id: raw.endpoint_id,
            rule_id: raw.rule_id,
        }
    }
}

/// The ring buffer, read as events arrive.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
    pending: VecDeque<VerdictEvent>,
}

impl EventStream {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Result<Self> {
        // SAFETY: the RingBuf owns its map fd for as long as it lives, and the AsyncFd owns
        // the RingBuf, so the fd stays open and the same until the AsyncFd is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| Error::Io {
                what: "registering the event ring buffer",
                path: "cm_events".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(Self {
            ring,
            pending: VecDeque::new(),
        })
    }

    /// The next event; `None` only if the ring buffer can no longer be polled.
    pub async fn next(&mut self) -> Option<VerdictEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            let mut guard = self.ring.readable_mut().await.ok()?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(raw) = EventRaw::from_bytes(&item) {
                    self.pending.push_back(VerdictEvent::decode(&raw));
                }
            }
            guard.clear_ready();
        }
    }

    /// The events as a [`Stream`].
    pub fn into_stream(self) -> impl Stream<Item = VerdictEvent> + Send {
        futures::stream::unfold(self, |mut s| async move { s.next().await.map(|e| (e, s)) })
    }
}
