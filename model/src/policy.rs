//! The CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy subset the mesh enforces at L3/L4:
//! endpoint selectors with `matchLabels` and `matchExpressions`, `ingress`/`egress` with
//! `fromEndpoints`/`toEndpoints` and `toPorts`, `ingressDeny`/`egressDeny`, and audit mode.
//! Policies stay in their cluster: they are never exported.
//!
//! This module holds the types, their validation and label matching; resolving policies into
//! per-endpoint datapath entries is the agent's job.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::labels::{Label, LabelSet};
use crate::names::{self, NameError};

/// The annotation that puts a policy in audit mode: verdicts are recorded, not enforced.
pub const ANNOTATION_AUDIT_MODE: &str = "cilium.io/policy-audit-mode";

/// Why a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The policy's name or namespace is not a valid Kubernetes name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A selector key that is not `[source:]key`.
    #[error("selector key {0:?} is not a valid label key")]
    SelectorKey(String),
    /// A selector value that is not a valid label value.
    #[error("selector value {0:?} is not a valid label value")]
    SelectorValue(String),
    /// `In`/`NotIn` without values, or `Exists`/`DoesNotExist` with values.
    #[error("selector expression on {key:?} with operator {operator} {problem}")]
    Expression {
        /// The expression's key.
        key: String,
        /// Its operator.
        operator: SelectorOperator,
        /// What is wrong.
        problem: &'static str,
    },
    /// Port 0 in `toPorts`.
    #[error("toPorts port 0 is not valid; omit the port to allow every port")]
    PortZero,
    /// An ICMP type that is not 0..=255 or a known name.
    #[error("ICMP type {0:?} is not 0..255 or a known type name")]
    IcmpType(String),
    /// A direction that is neither `ingress` nor `egress`.
    #[error("direction {0:?} is neither ingress nor egress")]
    Direction(String),
    /// An `endPort` below its port, or on a named port or ICMP.
    #[error("toPorts port {0:?} cannot end a range at {1}")]
    PortRange(String, u16),
    /// A `toPorts` protocol Cilium does not have.
    #[error("toPorts protocol {0:?} is not TCP, UDP, SCTP, ANY, ICMP, ICMPV6, VRRP or IGMP")]
    Protocol(String),
    /// A port that is neither a number nor a port name.
    #[error("toPorts port {0:?} is neither a port number nor a valid port name")]
    Port(String),
}

// === impl Direction ===

/// Traffic direction, seen from the selected endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Traffic towards the endpoint.
    Ingress,
    /// Traffic from the endpoint.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

// === impl EndpointSelector ===

/// A `matchExpressions` operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum SelectorOperator {
    /// The label's value is one of the values.
    In,
    /// The label is absent or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl fmt::Display for SelectorOperator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SelectorRequirement {
    /// `[source:]key`.
    pub key: String,
    /// The operator.
    pub operator: SelectorOperator,
    /// The values, for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// A label selector over security labels. Keys are `key` (any source) or `source:key`. An
/// empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSelector {
    /// Labels that must be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

/// Splits `source:key` (or `key`, any source) and validates both parts.
fn selector_key(raw: &str) -> Result<(Option<&str>, &str), PolicyError> {
    let (source, key) = match raw.split_once(':') {
        Some((source, key)) if source != "any" => (Some(source), key),
        Some((_, key)) => (None, key),
        None => (None, raw),
    };
    Label::new(source.unwrap_or("any"), key, "")
        .map(|_| (source, key))
        .map_err(|_| PolicyError::SelectorKey(raw.to_owned()))
}

impl EndpointSelector {
    /// Whether the selector mentions a key (with or without a source), e.g. the cluster
    /// label.
    pub fn mentions_key(&self, key: &str) -> bool {
        let mentions = |raw: &str| selector_key(raw).is_ok_and(|(_, k)| k == key);
        self.match_labels.keys().any(|k| mentions(k))
            || self.match_expressions.iter().any(|e| mentions(&e.key))
    }

    /// Checks every key, value and expression.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (k, v) in &self.match_labels {
            selector_key(k)?;
            Label::new("any", "k", v.as_str())
                .map_err(|_| PolicyError::SelectorValue(v.clone()))?;
        }
        for e in &self.match_expressions {
            selector_key(&e.key)?;
            let problem = match (e.operator, e.values.is_empty()) {
                (SelectorOperator::In | SelectorOperator::NotIn, true) => Some("needs values"),
                (SelectorOperator::Exists | SelectorOperator::DoesNotExist, false) => {
                    Some("takes no values")
                }
                _ => None,
            };
            if let Some(problem) = problem {
                return Err(PolicyError::Expression {
                    key: e.key.clone(),
                    operator: e.operator,
                    problem,
                });
            }
        }
        Ok(())
    }

    /// Whether a label set matches. Keys that do not parse match nothing (validate first).
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let value_of = |raw: &str| -> Result<Option<&str>, ()> {
            let (source, key) = selector_key(raw).map_err(|_| ())?;
            Ok(labels
                .get(key)
                .filter(|l| source.is_none_or(|s| s == l.source()))
                .map(Label::value))
        };
        self.match_labels
            .iter()
            .all(|(k, v)| value_of(k).is_ok_and(|found| found == Some(v.as_str())))
            && self.match_expressions.iter().all(|e| {
                let Ok(found) = value_of(&e.key) else {
                    return false;
                };
                match e.operator {
                    SelectorOperator::In => found.is_some_and(|f| e.values.iter().any(|v| v == f)),
                    SelectorOperator::NotIn => {
                        found.is_none_or(|f| e.values.iter().all(|v| v != f))
                    }
                    SelectorOperator::Exists => found.is_some(),
                    SelectorOperator::DoesNotExist => found.is_none(),
                }
            })
    }
}

// === impl PortRule ===

/// A `toPorts[].ports[].protocol`: a protocol, or `ANY`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// ICMP (IPv4), from a rule's `icmps`: the port is the message type (0..=255).
    Icmp,
    /// Any protocol.
    #[default]
    Any,
}

/// One `toPorts[].ports[]` entry. `port` is a number or a named port, as in Cilium.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PortProtocol {
    /// The port: a number, or the name of a container port.
    pub port: String,
    /// The protocol.
    #[serde(default)]
    pub protocol: PolicyProtocol,
    /// The last port of a range that starts at `port` (a number; TCP, UDP or ANY).
    #[serde(default, rename = "endPort", skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
}

/// The port of a [`PortProtocol`], parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortSpec {
    /// Every port (`"0"` is refused; a missing `toPorts` means every port).
    Number(u16),
    /// A named container port, resolved per endpoint.
    Named(String),
}

impl PortProtocol {
    /// Parses the port (for ICMP, the message type).
    pub fn port_spec(&self) -> Result<PortSpec, PolicyError> {
        if self.protocol == PolicyProtocol::Icmp {
            return self
                .port
                .parse::<u8>()
                .map(|t| PortSpec::Number(u16::from(t)))
                .map_err(|_| PolicyError::IcmpType(self.port.clone()));
        }
        if self.port.bytes().all(|b| b.is_ascii_digit()) && !self.port.is_empty() {
            return match self.port.parse::<u16>() {
                Ok(0) => Err(PolicyError::PortZero),
                Ok(p) => Ok(PortSpec::Number(p)),
                Err(_) => Err(PolicyError::Port(self.port.clone())),
            };
        }
        names::check_port_name(&self.port).map_err(|_| PolicyError::Port(self.port.clone()))?;
        Ok(PortSpec::Named(self.port.clone()))
    }

    /// The ports as a range `(first, last)`: `None` for a named port or ICMP; a single
    /// port is `(p, p)`. An `endPort` needs a numbered TCP/UDP/ANY port at or below it.
    pub fn range(&self) -> Result<Option<(u16, u16)>, PolicyError> {
        let spec = self.port_spec()?;
        match (spec, self.end_port) {
            (PortSpec::Number(p), None) if self.protocol != PolicyProtocol::Icmp => {
                Ok(Some((p, p)))
            }
            (PortSpec::Number(p), Some(end))
                if end >= p && self.protocol != PolicyProtocol::Icmp =>
            {
                Ok(Some((p, end)))
            }
            (_, None) => Ok(None),
            (_, Some(end)) => Err(PolicyError::PortRange(self.port.clone(), end)),
        }
    }
}

/// One `toPorts` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct PortRule {
    /// The ports; all must be valid.
    #[serde(default)]
    pub ports: Vec<PortProtocol>,
}

// === impl PolicyRule ===

/// A Cilium entity, as `fromEntities` and `toEntities` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// Every peer.
    All,
    /// Everything outside the mesh (addresses no cluster's endpoint has).
    World,
    /// The IPv4 part of `world`.
    WorldIpv4,
    /// The IPv6 part of `world`.
    WorldIpv6,
    /// The local cluster's endpoints.
    Cluster,
    /// The local node.
    Host,
    /// The other nodes.
    RemoteNode,
    /// The Kubernetes API server.
    KubeApiserver,
    /// Cilium's ingress proxy.
    Ingress,
    /// Cilium's health endpoints.
    Health,
    /// Endpoints whose identity is not resolved yet.
    Init,
    /// Pods Cilium does not manage.
    Unmanaged,
    /// Nothing.
    None,
}

impl Entity {
    /// The name as policies write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::World => "world",
            Self::WorldIpv4 => "world-ipv4",
            Self::WorldIpv6 => "world-ipv6",
            Self::Cluster => "cluster",
            Self::Host => "host",
            Self::RemoteNode => "remote-node",
            Self::KubeApiserver => "kube-apiserver",
            Self::Ingress => "ingress",
            Self::Health => "health",
            Self::Init => "init",
            Self::Unmanaged => "unmanaged",
            Self::None => "none",
        }
    }

    /// Parses a name as policies write it.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::All,
            Self::World,
            Self::WorldIpv4,
            Self::WorldIpv6,
            Self::Cluster,
            Self::Host,
            Self::RemoteNode,
            Self::KubeApiserver,
            Self::Ingress,
            Self::Health,
            Self::Init,
            Self::Unmanaged,
            Self::None,
        ]
        .into_iter()
        .find(|e| e.as_str() == s)
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `ingress` or `ingressDeny` rule: from these peers, to these ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Peers; empty (and no entities) means every peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_endpoints: Vec<EndpointSelector>,
    /// Peers by entity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_entities: Vec<Entity>,
    /// Ports; empty means every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortRule>,
}

/// An `egress` or `egressDeny` rule: to these peers, on these ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Peers; empty (and no entities) means every peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_endpoints: Vec<EndpointSelector>,
    /// Peers by entity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_entities: Vec<Entity>,
    /// Ports; empty means every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortRule>,
}

/// One policy spec: which endpoints it selects and what it allows or denies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// The endpoints the rule applies to.
    pub endpoint_selector: EndpointSelector,
    /// Allowed ingress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressRule>,
    /// Allowed egress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
    /// Denied ingress (wins over allows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_deny: Vec<IngressRule>,
    /// Denied egress (wins over allows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_deny: Vec<EgressRule>,
    /// Free text, as CiliumNetworkPolicy allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Directions (`ingress`, `egress`) whose `fromRequires`/`toRequires` the datapath does not
    /// enforce yet: every allow of that direction is left out for the endpoints the rule
    /// selects (set by [`cilium`], never written by users).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(skip))]
    pub unenforced_requires: Vec<String>,
}

impl PolicyRule {
    /// Whether the rule has anything to say about a direction (and so makes its endpoints
    /// default-deny there).
    pub fn covers(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => !self.ingress.is_empty() || !self.ingress_deny.is_empty(),
            Direction::Egress => !self.egress.is_empty() || !self.egress_deny.is_empty(),
        }
    }

    /// Whether allows of a direction are left out for the endpoints the rule selects.
    pub fn requires_unenforced(&self, direction: Direction) -> bool {
        self.unenforced_requires
            .iter()
            .any(|d| *d == direction.to_string())
    }

    /// Checks every selector and port of the rule.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.endpoint_selector.validate()?;
        if let Some(d) = self
            .unenforced_requires
            .iter()
            .find(|d| *d != "ingress" && *d != "egress")
        {
            return Err(PolicyError::Direction(d.clone()));
        }
        let ingress = self.ingress.iter().chain(&self.ingress_deny);
        let egress = self.egress.iter().chain(&self.egress_deny);
        let peers = ingress
            .clone()
            .flat_map(|r| &r.from_endpoints)
            .chain(egress.clone().flat_map(|r| &r.to_endpoints));
        for sel in peers {
            sel.validate()?;
        }
        let ports = ingress
            .flat_map(|r| &r.to_ports)
            .chain(egress.flat_map(|r| &r.to_ports));
        for p in ports.flat_map(|r| &r.ports) {
            p.range()?;
        }
        Ok(())
    }
}

/// A CiliumNetworkPolicy (namespaced) or CiliumClusterwideNetworkPolicy (no namespace), as
/// kept in the local-only policy prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    /// The namespace; `None` for a clusterwide policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The policy's name.
    pub name: String,
    /// Audit mode: verdicts are recorded, not enforced.
    #[serde(default)]
    pub audit: bool,
    /// The rules (`spec` and `specs` of the resource, together).
    pub rules: Vec<PolicyRule>,
    /// What of the resource as written is not enforced, and what is enforced instead (see
    /// [`cilium`]): `rule 0 egress[1]: toCIDR is not enforced yet; ...`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl NetworkPolicy {
    /// Checks the names and every rule.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if let Some(ns) = &self.namespace {
            names::check_dns_label("namespace", ns)?;
        }
        names::check_dns_subdomain("policy", &self.name)?;
        self.rules.iter().try_for_each(PolicyRule::validate)
    }
}

pub mod cilium;

#[cfg(test)]
mod tests;
