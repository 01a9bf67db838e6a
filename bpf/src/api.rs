//! The typed interface the agent drives, the same for the kernel maps and the in-memory
//! backend: services and their backends, ipcache entries, local endpoints, policy entries,
//! and read-back of each.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use crate::layout::{
    BackendRaw, EndpointRaw, IpCacheValueRaw, PolicyKeyRaw, PolicyValueRaw, ServiceKeyRaw,
};

/// Why a datapath operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A map operation failed in the kernel.
    #[error("{op} on map {map} failed")]
    Map {
        /// The operation.
        op: &'static str,
        /// The map.
        map: &'static str,
        /// Why.
        #[source]
        source: aya::maps::MapError,
    },
    /// A raw bpf(2) batch call failed.
    #[error("{op} on map {map} failed")]
    Batch {
        /// The operation.
        op: &'static str,
        /// The map.
        map: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Loading the object or a program failed.
    #[error("loading the eBPF object failed")]
    Load(#[source] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("{step} of program {program} failed")]
    Program {
        /// Load or attach.
        step: &'static str,
        /// The program.
        program: &'static str,
        /// Why.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Pinning or unpinning failed.
    #[error("pinning {path} failed")]
    Pin {
        /// The pin path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory the datapath needs (bpffs dir, cgroup, netns) failed.
    #[error("{what} {path} failed")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A map or program the object should contain is missing (a build mismatch).
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// A service with more backends than a slot count can hold.
    #[error("service {0} has {1} backends; at most 65535 are supported")]
    TooManyBackends(ServiceKey, usize),
    /// A prefix length over 32.
    #[error("prefix length {0} is over 32")]
    PrefixLength(u8),
}

/// The result of datapath operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

// === impl Proto ===

/// An L4 protocol: TCP and UDP, which the socket load balancer translates and policy
/// matches by port, and ICMP, which policy matches by message type (in the port's place).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP (and SCTP is not translated).
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (IPv4): policy entries only, the "port" is the message type.
    Icmp,
}

impl Proto {
    /// The upper-case name, as Kubernetes spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Icmp => "ICMP",
        }
    }

    /// The IANA number.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Icmp => 1,
        }
    }

    /// From the IANA number.
    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            1 => Some(Self::Icmp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// === services ===

/// A service frontend: VIP, port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// The virtual IP.
    pub vip: Ipv4Addr,
    /// The port.
    pub port: u16,
    /// The protocol.
    pub proto: Proto,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.proto)
    }
}

impl ServiceKey {
    pub(crate) fn raw(&self, slot: u32) -> ServiceKeyRaw {
        ServiceKeyRaw {
            vip: u32::from_ne_bytes(self.vip.octets()),
            port: self.port.to_be(),
            proto: self.proto.number(),
            pad: 0,
            slot,
        }
    }

    pub(crate) fn from_raw(raw: &ServiceKeyRaw) -> Option<Self> {
        Some(Self {
            vip: Ipv4Addr::from(raw.vip.to_ne_bytes()),
            port: u16::from_be(raw.port),
            proto: Proto::from_number(raw.proto)?,
        })
    }
}

/// A backend's state, as the datapath records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Receives new connections (when listed in a service's slots).
    Active,
    /// Shutting down: kept for inspection, not chosen for new connections.
    Terminating,
    /// Failing health checks.
    Quarantined,
}

impl BackendState {
    const fn raw(self) -> u8 {
        match self {
            Self::Active => 1,
            Self::Terminating => 2,
            Self::Quarantined => 3,
        }
    }

    const fn from_raw(v: u8) -> Self {
        match v {
            2 => Self::Terminating,
            3 => Self::Quarantined,
            _ => Self::Active,
        }
    }
}

/// A backend address, referenced by services through its ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backend {
    /// The backend's address.
    pub ip: Ipv4Addr,
    /// Its port.
    pub port: u16,
    /// Its protocol.
    pub proto: Proto,
    /// Its state.
    pub state: BackendState,
    /// The cluster it lives in.
    pub cluster_id: u16,
}

impl Backend {
    pub(crate) fn raw(&self) -> BackendRaw {
        BackendRaw {
            ip: u32::from_ne_bytes(self.ip.octets()),
            port: self.port.to_be(),
            proto: self.proto.number(),
            state: self.state.raw(),
            cluster_id: self.cluster_id,
            pad: 0,
        }
    }

    pub(crate) fn from_raw(raw: &BackendRaw) -> Option<Self> {
        Some(Self {
            ip: Ipv4Addr::from(raw.ip.to_ne_bytes()),
            port: u16::from_be(raw.port),
            proto: Proto::from_number(raw.proto)?,
            state: BackendState::from_raw(raw.state),
            cluster_id: raw.cluster_id,
        })
    }
}

/// A backend's ID in `cm_backends`, chosen by the caller.
pub type BackendId = u32;

// === ipcache ===

/// An IPv4 prefix in the ipcache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// The network address.
    pub addr: Ipv4Addr,
    /// The prefix length, 0..=32.
    pub len: u8,
}

impl Prefix {
    /// A /32 prefix.
    pub const fn host(addr: Ipv4Addr) -> Self {
        Self { addr, len: 32 }
    }

    /// The prefix with its host bits cleared, as it is stored.
    pub fn canonical(self) -> Self {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len.min(32)))
        };
        Self {
            addr: Ipv4Addr::from(u32::from(self.addr) & mask),
            len: self.len,
        }
    }

    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len.min(32)))
        };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What the ipcache knows about a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpCacheValue {
    /// The security identity.
    pub identity: u32,
    /// The node the address lives on, if known.
    pub node_ip: Option<Ipv4Addr>,
    /// The cluster the address belongs to.
    pub cluster_id: u16,
}

impl IpCacheValue {
    pub(crate) fn raw(&self) -> IpCacheValueRaw {
        IpCacheValueRaw {
            identity: self.identity,
            node_ip: self.node_ip.map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
            cluster_id: self.cluster_id,
            pad: 0,
        }
    }

    pub(crate) fn from_raw(raw: &IpCacheValueRaw) -> Self {
        Self {
            identity: raw.identity,
            node_ip: (raw.node_ip != 0).then(|| Ipv4Addr::from(raw.node_ip.to_ne_bytes())),
            cluster_id: raw.cluster_id,
        }
    }
}

// === endpoints ===

/// Which directions of a local endpoint are under policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EndpointFlags {
    /// Ingress is default-deny, allowed by entries.
    pub enforce_ingress: bool,
    /// Egress is default-deny, allowed by entries.
    pub enforce_egress: bool,
    /// Ingress default-deny verdicts pass and are reported as audited.
    pub audit_ingress: bool,
    /// Egress default-deny verdicts pass and are reported as audited.
    pub audit_egress: bool,
    /// The port block sizes the endpoint's entries use (port ranges): bit `k - 1` set when
    /// an entry covers an aligned block of `2^k` ports (`k` 1..=16). The datapath probes
    /// only those sizes.
    pub port_blocks: u16,
}

impl EndpointFlags {
    pub(crate) fn raw(self) -> u32 {
        u32::from(self.enforce_ingress)
            | u32::from(self.enforce_egress) << 1
            | u32::from(self.audit_ingress) << 2
            | u32::from(self.audit_egress) << 3
            | u32::from(self.port_blocks) << 16
    }

    pub(crate) fn from_raw(v: u32) -> Self {
        Self {
            enforce_ingress: v & 1 != 0,
            enforce_egress: v & 2 != 0,
            audit_ingress: v & 4 != 0,
            audit_egress: v & 8 != 0,
            port_blocks: u16::try_from(v >> 16).unwrap_or(0),
        }
    }
}

/// A local endpoint: its ID (used in policy keys), identity and policy flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The endpoint's ID.
    pub endpoint_id: u32,
    /// Its security identity.
    pub identity: u32,
    /// Which directions are enforced or audited.
    pub flags: EndpointFlags,
    /// Its cluster's ID.
    pub cluster_id: u16,
}

impl Endpoint {
    pub(crate) fn raw(&self) -> EndpointRaw {
        EndpointRaw {
            endpoint_id: self.endpoint_id,
            identity: self.identity,
            flags: self.flags.raw(),
            cluster_id: self.cluster_id,
            pad: 0,
        }
    }

    pub(crate) fn from_raw(raw: &EndpointRaw) -> Self {
        Self {
            endpoint_id: raw.endpoint_id,
            identity: raw.identity,
            flags: EndpointFlags::from_raw(raw.flags),
            cluster_id: raw.cluster_id,
        }
    }
}

// === policy ===

/// Traffic direction, seen from the local endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Towards the endpoint.
    Ingress,
    /// From the endpoint.
    Egress,
}

impl Direction {
    const fn raw(self) -> u8 {
        match self {
            Self::Ingress => 0,
            Self::Egress => 1,
        }
    }

    const fn from_raw(v: u8) -> Self {
        if v == 1 { Self::Egress } else { Self::Ingress }
    }
}

/// One policy entry's key. Identity 0 means any identity; `port: None` any port and
/// protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// The local endpoint.
    pub endpoint_id: u32,
    /// The peer identity (0: any).
    pub identity: u32,
    /// Port and protocol (`None`: any).
    pub port: Option<(u16, Proto)>,
    /// Direction.
    pub direction: Direction,
    /// A port range: the entry covers the aligned block of `2^port_block` ports that starts
    /// at `port` (0: exactly `port`; at most 16). Set the size's bit in the endpoint's
    /// [`EndpointFlags::port_blocks`], or the datapath does not look for it.
    pub port_block: u8,
}

impl PolicyKey {
    pub(crate) fn raw(&self) -> PolicyKeyRaw {
        let (port, proto) = self
            .port
            .map_or((0, 0), |(p, proto)| (p.to_be(), proto.number()));
        PolicyKeyRaw {
            endpoint_id: self.endpoint_id,
            identity: self.identity,
            port,
            proto,
            // The block size rides in the direction byte (bits 1..=5), so that exact
            // entries keep the layout they always had.
            direction: self.direction.raw() | (self.port_block.min(16) << 1),
        }
    }

    pub(crate) fn from_raw(raw: &PolicyKeyRaw) -> Self {
        Self {
            endpoint_id: raw.endpoint_id,
            identity: raw.identity,
            port: Proto::from_number(raw.proto).map(|proto| (u16::from_be(raw.port), proto)),
            direction: Direction::from_raw(raw.direction & 1),
            port_block: (raw.direction >> 1) & 0x1f,
        }
    }
}

/// What a policy entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Pass.
    Allow,
    /// Drop (wins over every allow that also matches).
    Deny,
    /// Pass and report as audited.
    Audit,
}

/// A policy entry's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// The verdict.
    pub verdict: Verdict,
    /// The rule that produced the entry, reported in events.
    pub rule_id: u32,
}

impl PolicyValue {
    pub(crate) fn raw(&self) -> PolicyValueRaw {
        let verdict = match self.verdict {
            Verdict::Allow => 1,
            Verdict::Deny => 2,
            Verdict::Audit => 3,
        };
        PolicyValueRaw {
            verdict,
            pad: [0; 3],
            rule_id: self.rule_id,
        }
    }

    pub(crate) fn from_raw(raw: &PolicyValueRaw) -> Self {
        let verdict = match raw.verdict {
            2 => Verdict::Deny,
            3 => Verdict::Audit,
            _ => Verdict::Allow,
        };
        Self {
            verdict,
            rule_id: raw.rule_id,
        }
    }
}

// === the interface ===

/// Everything the maps hold, decoded: what [`Datapath::snapshot`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Services and the backend IDs of their slots, in slot order.
    pub services: BTreeMap<ServiceKey, Vec<BackendId>>,
    /// Backends by ID.
    pub backends: BTreeMap<BackendId, Backend>,
    /// ipcache entries.
    pub ipcache: BTreeMap<Prefix, IpCacheValue>,
    /// Local endpoints by IP.
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// Policy entries.
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
}

/// The operations the agent's reconciler uses. Slices are written with the kernel's batch
/// operations where the map type has them.
pub trait Datapath: Send + Sync {
    /// Writes backends (before the services that name them).
    fn upsert_backends(&self, backends: &[(BackendId, Backend)]) -> Result<()>;
    /// Deletes backends (after no service names them).
    fn delete_backends(&self, ids: &[BackendId]) -> Result<()>;
    /// Sets a service's backends so that no lookup sees a half-written service: new slots
    /// first, then the service entry with the new count, then slots past the new count. An
    /// empty list keeps the service with no backend: connections to it are refused.
    fn upsert_service(&self, key: ServiceKey, backends: &[BackendId]) -> Result<()>;
    /// Removes a service (its entry first, then its slots).
    fn delete_service(&self, key: ServiceKey) -> Result<()>;
    /// Writes ipcache entries.
    fn upsert_ipcache(&self, entries: &[(Prefix, IpCacheValue)]) -> Result<()>;
    /// Deletes ipcache entries.
    fn delete_ipcache(&self, prefixes: &[Prefix]) -> Result<()>;
    /// Writes local endpoints, keyed by IP.
    fn upsert_endpoints(&self, endpoints: &[(Ipv4Addr, Endpoint)]) -> Result<()>;
    /// Deletes local endpoints.
    fn delete_endpoints(&self, ips: &[Ipv4Addr]) -> Result<()>;
    /// Writes policy entries.
    fn upsert_policy(&self, entries: &[(PolicyKey, PolicyValue)]) -> Result<()>;
    /// Deletes policy entries.
    fn delete_policy(&self, keys: &[PolicyKey]) -> Result<()>;
    /// Reads every map back.
    fn snapshot(&self) -> Result<Snapshot>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trips() {
        let key = ServiceKey {
            vip: Ipv4Addr::new(10, 96, 0, 10),
            port: 8080,
            proto: Proto::Udp,
        };
        let raw = key.raw(3);
        assert_eq!(
            raw.vip.to_ne_bytes(),
            [10, 96, 0, 10],
            "addresses are stored in network order"
        );
        assert_eq!(
            raw.port.to_ne_bytes(),
            8080u16.to_be_bytes(),
            "ports are stored in network order"
        );
        assert_eq!((raw.proto, raw.slot), (17, 3));
        assert_eq!(ServiceKey::from_raw(&raw), Some(key));

        let b = Backend {
            ip: Ipv4Addr::new(10, 1, 2, 3),
            port: 443,
            proto: Proto::Tcp,
            state: BackendState::Terminating,
            cluster_id: 511,
        };
        assert_eq!(Backend::from_raw(&b.raw()), Some(b));

        for bits in (0..16).chain([0x8001_0003, 0xffff_000f]) {
            assert_eq!(EndpointFlags::from_raw(bits).raw(), bits);
        }
        for k in [
            PolicyKey {
                endpoint_id: 1,
                identity: 0,
                port: None,
                direction: Direction::Egress,
                port_block: 0,
            },
            PolicyKey {
                endpoint_id: 9,
                identity: 70_000,
                port: Some((53, Proto::Udp)),
                direction: Direction::Ingress,
                port_block: 0,
            },
            PolicyKey {
                endpoint_id: 9,
                identity: 70_000,
                port: Some((4096, Proto::Tcp)),
                direction: Direction::Egress,
                port_block: 12,
            },
            PolicyKey {
                endpoint_id: 9,
                identity: 0,
                port: Some((0, Proto::Tcp)),
                direction: Direction::Ingress,
                port_block: 16,
            },
        ] {
            assert_eq!(PolicyKey::from_raw(&k.raw()), k);
        }
        for verdict in [Verdict::Allow, Verdict::Deny, Verdict::Audit] {
            let v = PolicyValue {
                verdict,
                rule_id: 42,
            };
            assert_eq!(PolicyValue::from_raw(&v.raw()), v);
        }
        let v = IpCacheValue {
            identity: 7,
            node_ip: None,
            cluster_id: 3,
        };
        assert_eq!(IpCacheValue::from_raw(&v.raw()), v);
    }

    #[test]
    fn prefixes_canonicalise_and_contain() {
        let p = Prefix {
            addr: Ipv4Addr::new(10, 0, 1, 77),
            len: 24,
        };
        assert_eq!(
            p.canonical(),
            Prefix {
                addr: Ipv4Addr::new(10, 0, 1, 0),
                len: 24
            }
        );
        assert!(p.contains(Ipv4Addr::new(10, 0, 1, 200)));
        assert!(!p.contains(Ipv4Addr::new(10, 0, 2, 1)));
        let all = Prefix {
            addr: Ipv4Addr::new(1, 2, 3, 4),
            len: 0,
        };
        assert_eq!(all.canonical().addr, Ipv4Addr::UNSPECIFIED);
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
    }
}
