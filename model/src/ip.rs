//! Network addressing shared by endpoints, nodes and services: IP prefixes, L4 protocols and
//! ports.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why an address, prefix, protocol or port was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Not an IPv4 or IPv6 address.
    #[error("{0:?} is not an IP address")]
    Ip(String),
    /// Not of the form `address/length`, or the length is too large for the family.
    #[error("{0:?} is not an IP prefix (address/length)")]
    Prefix(String),
    /// The prefix has bits set past its length.
    #[error("prefix {0:?} has host bits set")]
    HostBits(String),
    /// Not one of TCP, UDP, SCTP.
    #[error("protocol {0:?} is not one of TCP, UDP, SCTP")]
    Protocol(String),
    /// Port 0 is not a service port.
    #[error("port 0 is not a valid port")]
    PortZero,
    /// An address no pod, backend or service can have.
    #[error("{ip} is {why}, not an address of a pod, backend or service")]
    NotUsable {
        /// The address.
        ip: IpAddr,
        /// What it is.
        why: &'static str,
    },
}

/// Refuses the addresses that a cluster can never rightly export as a pod, backend or service
/// address: unspecified, loopback, multicast, link-local and the IPv4 broadcast address. An
/// import that claims one would reach the importing node itself or everything at once.
pub fn check_usable(ip: IpAddr) -> Result<(), AddressError> {
    let why = match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => Some("unspecified"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
        IpAddr::V6(v6) if v6.is_loopback() => Some("a loopback address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .and_then(|v4| check_usable(IpAddr::V4(v4)).err())
            .map(|_| "an IPv4-mapped address of that kind"),
        IpAddr::V4(_) => None,
    };
    match why {
        Some(why) => Err(AddressError::NotUsable { ip, why }),
        None => Ok(()),
    }
}

/// Parses an IP address, refusing the zoned and bracketed forms the kvstore never holds. An
/// IPv4-mapped IPv6 address (`::ffff:10.1.0.5`) is the IPv4 address, as Go's `net.IP` reads
/// and writes it: Cilium's keys and values name it `10.1.0.5`.
pub fn parse_ip(s: &str) -> Result<IpAddr, AddressError> {
    s.parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| AddressError::Ip(s.to_owned()))
}

// === impl IpPrefix ===

/// An IP prefix such as `10.0.1.0/24`, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    /// Validates the length against the family and refuses host bits.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, AddressError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(AddressError::Prefix(format!("{addr}/{len}")));
        }
        let bits: u128 = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
            IpAddr::V6(a) => u128::from(a),
        };
        let host_mask = if len == 0 {
            u128::MAX
        } else {
            (1u128 << (128 - u32::from(len))) - 1
        };
        let host_mask = if addr.is_ipv4() {
            host_mask & !((1u128 << 96) - 1)
        } else {
            host_mask
        };
        if bits & host_mask != 0 {
            return Err(AddressError::HostBits(format!("{addr}/{len}")));
        }
        Ok(Self { addr, len })
    }

    /// The prefix holding exactly one address.
    pub fn host(addr: IpAddr) -> Self {
        Self {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether this is the `/0` prefix of its family.
    pub fn is_default(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for IpPrefix {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| AddressError::Prefix(s.to_owned()))?;
        let addr = parse_ip(addr)?;
        let len: u8 = len
            .parse()
            .map_err(|_| AddressError::Prefix(s.to_owned()))?;
        Self::new(addr, len)
    }
}

impl TryFrom<String> for IpPrefix {
    type Error = AddressError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<IpPrefix> for String {
    fn from(p: IpPrefix) -> Self {
        p.to_string()
    }
}

// === impl Protocol ===

/// An L4 protocol, spelled as Kubernetes and Cilium spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Protocol {
    /// TCP, the Kubernetes default.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The upper-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    /// The IANA protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(AddressError::Protocol(other.to_owned())),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// === impl L4Addr ===

/// A protocol and a non-zero port: Cilium's `L4Addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawL4Addr", into = "RawL4Addr")]
pub struct L4Addr {
    /// The protocol.
    pub protocol: Protocol,
    port: u16,
}

#[derive(Serialize, Deserialize)]
struct RawL4Addr {
    #[serde(rename = "Protocol")]
    protocol: Protocol,
    #[serde(rename = "Port")]
    port: u16,
}

impl L4Addr {
    /// Refuses port 0.
    pub fn new(protocol: Protocol, port: u16) -> Result<Self, AddressError> {
        if port == 0 {
            return Err(AddressError::PortZero);
        }
        Ok(Self { protocol, port })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl TryFrom<RawL4Addr> for L4Addr {
    type Error = AddressError;
    fn try_from(raw: RawL4Addr) -> Result<Self, Self::Error> {
        Self::new(raw.protocol, raw.port)
    }
}

impl From<L4Addr> for RawL4Addr {
    fn from(a: L4Addr) -> Self {
        Self {
            protocol: a.protocol,
            port: a.port,
        }
    }
}

#[cfg(test)]
mod tests;
