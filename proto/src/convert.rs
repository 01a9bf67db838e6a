//! Conversions between Export messages and the domain model. From the wire they validate
//! (names, IPs, ports, identities, label syntax) and fail with a [`ConvertError`] naming the
//! field.

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustermesh_model::cluster::{ClusterId, ClusterName, ClusterStatus, MaxConnectedClusters};
use clustermesh_model::endpoint::{IpCacheEntry, NamedPort};
use clustermesh_model::identity::Identity;
use clustermesh_model::ip::{IpPrefix, L4Addr, Protocol, parse_ip};
use clustermesh_model::keys::ExportKind;
use clustermesh_model::labels::{Label, LabelSet};
use clustermesh_model::node::{Node, NodeAddress};
use clustermesh_model::policy::{
    EgressRule, EndpointSelector, Entity, IngressRule, NetworkPolicy, PolicyProtocol, PolicyRule,
    PortProtocol, PortRule, SelectorOperator, SelectorRequirement,
};
use clustermesh_model::service::{Affinity, BackendConditions, ClusterService, PortConfiguration};

use crate::v1;

/// A message field that does not convert into the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ConvertError {
    /// The field, e.g. `service.frontends.ip`.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(field: &'static str, reason: impl ToString) -> ConvertError {
    ConvertError {
        field,
        reason: reason.to_string(),
    }
}

fn cluster(field: &'static str, s: &str) -> Result<ClusterName, ConvertError> {
    ClusterName::new(s).map_err(|e| bad(field, e))
}

fn cluster_id(field: &'static str, v: u32) -> Result<ClusterId, ConvertError> {
    ClusterId::new(v, MaxConnectedClusters::C511).map_err(|e| bad(field, e))
}

fn ip(field: &'static str, s: &str) -> Result<IpAddr, ConvertError> {
    parse_ip(s).map_err(|e| bad(field, e))
}

fn port(field: &'static str, v: u32) -> Result<u16, ConvertError> {
    u16::try_from(v).map_err(|_| bad(field, format!("{v} is not a port")))
}

fn protocol(field: &'static str, s: &str) -> Result<Protocol, ConvertError> {
    s.parse().map_err(|e| bad(field, e))
}

/// One exported object with the cluster it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    /// A numeric identity and its labels.
    Identity {
        /// The owning cluster.
        cluster: ClusterName,
        /// The identity.
        id: Identity,
        /// Its labels.
        labels: LabelSet,
    },
    /// An ipcache entry.
    IpCache {
        /// The owning cluster.
        cluster: ClusterName,
        /// The entry.
        entry: IpCacheEntry,
    },
    /// A node (names its cluster itself).
    Node(Node),
    /// A service (names its cluster itself).
    Service(ClusterService),
    /// A network policy of the local cluster.
    Policy {
        /// The owning cluster.
        cluster: ClusterName,
        /// The policy.
        policy: NetworkPolicy,
    },
    /// The status of a remote cluster.
    ClusterStatus(ClusterStatus),
}

/// Names an object, for deletes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// The kind.
    pub kind: v1::Kind,
    /// The owning cluster.
    pub cluster: ClusterName,
    /// The name within the kind (see the `Delete` message).
    pub name: String,
}

impl Object {
    /// The name of the object, as a `Delete` would carry it.
    pub fn reference(&self) -> ObjectRef {
        let (kind, cluster, name) = match self {
            Self::Identity { cluster, id, .. } => {
                (v1::Kind::Identities, cluster.clone(), id.to_string())
            }
            Self::IpCache { cluster, entry } => {
                (v1::Kind::Ipcache, cluster.clone(), entry.ip.to_string())
            }
            Self::Node(n) => (v1::Kind::Nodes, n.cluster.clone(), n.name.clone()),
            Self::Service(s) => (
                v1::Kind::Services,
                s.cluster.clone(),
                format!("{}/{}", s.namespace, s.name),
            ),
            Self::Policy { cluster, policy } => (
                v1::Kind::Policies,
                cluster.clone(),
                match &policy.namespace {
                    Some(ns) => format!("{ns}/{}", policy.name),
                    None => policy.name.clone(),
                },
            ),
            Self::ClusterStatus(s) => (
                v1::Kind::ClusterStatus,
                s.cluster.clone(),
                s.cluster.to_string(),
            ),
        };
        ObjectRef {
            kind,
            cluster,
            name,
        }
    }
}

/// The Export kind of a kvstore kind.
pub fn kind_of(kind: ExportKind) -> v1::Kind {
    match kind {
        ExportKind::Identities => v1::Kind::Identities,
        ExportKind::IpCache => v1::Kind::Ipcache,
        ExportKind::Nodes => v1::Kind::Nodes,
        ExportKind::Services => v1::Kind::Services,
    }
}

// === model -> wire ===

fn ports_to_wire(ports: &PortConfiguration) -> Vec<v1::ServicePort> {
    ports
        .iter()
        .map(|(name, a)| v1::ServicePort {
            name: name.clone(),
            protocol: a.protocol.to_string(),
            port: u32::from(a.port()),
        })
        .collect()
}

fn selector_to_wire(s: &EndpointSelector) -> v1::EndpointSelector {
    v1::EndpointSelector {
        match_labels: s.match_labels.clone().into_iter().collect(),
        match_expressions: s
            .match_expressions
            .iter()
            .map(|e| v1::SelectorRequirement {
                key: e.key.clone(),
                operator: e.operator.to_string(),
                values: e.values.clone(),
            })
            .collect(),
    }
}

fn port_rules_to_wire(rules: &[PortRule]) -> Vec<v1::PortRule> {
    rules
        .iter()
        .map(|r| v1::PortRule {
            ports: r
                .ports
                .iter()
                .map(|p| v1::PortProtocol {
                    port: p.port.clone(),
                    protocol: match p.protocol {
                        PolicyProtocol::Tcp => "TCP",
                        PolicyProtocol::Udp => "UDP",
                        PolicyProtocol::Sctp => "SCTP",
                        PolicyProtocol::Icmp => "ICMP",
                        PolicyProtocol::Any => "ANY",
                    }
                    .to_owned(),
                    end_port: p.end_port.map_or(0, u32::from),
                })
                .collect(),
        })
        .collect()
}

/// The key of a selector sent beside the entities of an allow rule that has no label
/// selector. An agent older than entities ignores the `entities` field and would read "no
/// peers, some ports" as "every peer on those ports"; to it this selector matches no identity,
/// so the rule allows nothing (fail closed). A deny is sent without it: to an old agent it
/// then denies every peer, which is closed too. Agents that know entities drop it.
const ENTITIES_ONLY: &str = "reserved:clustermesh-entities-only";

fn entities_only() -> v1::EndpointSelector {
    v1::EndpointSelector {
        match_labels: Default::default(),
        match_expressions: vec![v1::SelectorRequirement {
            key: ENTITIES_ONLY.to_owned(),
            operator: "Exists".to_owned(),
            values: Vec::new(),
        }],
    }
}

fn peers_to_wire(
    selectors: &[EndpointSelector],
    entities: &[Entity],
    deny: bool,
) -> Vec<v1::EndpointSelector> {
    if selectors.is_empty() && !entities.is_empty() && !deny {
        return vec![entities_only()];
    }
    selectors.iter().map(selector_to_wire).collect()
}

fn ingress_to_wire(rules: &[IngressRule], deny: bool) -> Vec<v1::PeerRule> {
    rules
        .iter()
        .map(|r| v1::PeerRule {
            peers: peers_to_wire(&r.from_endpoints, &r.from_entities, deny),
            to_ports: port_rules_to_wire(&r.to_ports),
            entities: r
                .from_entities
                .iter()
                .map(|e| e.as_str().to_owned())
                .collect(),
        })
        .collect()
}

fn egress_to_wire(rules: &[EgressRule], deny: bool) -> Vec<v1::PeerRule> {
    rules
        .iter()
        .map(|r| v1::PeerRule {
            peers: peers_to_wire(&r.to_endpoints, &r.to_entities, deny),
            to_ports: port_rules_to_wire(&r.to_ports),
            entities: r
                .to_entities
                .iter()
                .map(|e| e.as_str().to_owned())
                .collect(),
        })
        .collect()
}

impl From<&Object> for v1::Upsert {
    fn from(o: &Object) -> Self {
        use v1::upsert::Object as W;
        let object = match o {
            Object::Identity {
                cluster,
                id,
                labels,
            } => W::Identity(v1::Identity {
                cluster: cluster.to_string(),
                id: id.get(),
                labels: labels
                    .iter()
                    .map(|l| v1::Label {
                        source: l.source().to_owned(),
                        key: l.key().to_owned(),
                        value: l.value().to_owned(),
                    })
                    .collect(),
            }),
            Object::IpCache { cluster, entry } => W::Ipcache(v1::IpCacheEntry {
                cluster: cluster.to_string(),
                ip: entry.ip.to_string(),
                identity: entry.identity.get(),
                host_ip: entry.host_ip.map(|h| h.to_string()).unwrap_or_default(),
                namespace: entry.namespace.clone(),
                pod_name: entry.pod_name.clone(),
                named_ports: entry
                    .named_ports
                    .iter()
                    .map(|p| v1::NamedPort {
                        name: p.name.clone(),
                        port: u32::from(p.port),
                        protocol: p.protocol.to_string(),
                    })
                    .collect(),
            }),
            Object::Node(n) => W::Node(v1::Node {
                name: n.name.clone(),
                cluster: n.cluster.to_string(),
                cluster_id: u32::from(n.cluster_id),
                addresses: n
                    .addresses
                    .iter()
                    .map(|a| v1::NodeAddress {
                        r#type: a.kind.clone(),
                        ip: a.ip.to_string(),
                    })
                    .collect(),
                ipv4_alloc_cidr: n.ipv4_alloc_cidr.map(|c| c.to_string()).unwrap_or_default(),
                labels: n.labels.clone().into_iter().collect(),
            }),
            Object::Service(s) => W::Service(v1::Service {
                cluster: s.cluster.to_string(),
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                frontends: s
                    .frontends
                    .iter()
                    .map(|(ip, ports)| v1::Frontend {
                        ip: ip.to_string(),
                        ports: ports_to_wire(ports),
                    })
                    .collect(),
                backends: s
                    .backends
                    .iter()
                    .map(|(ip, ports)| {
                        let c = s.conditions_of(ip);
                        v1::Backend {
                            ip: ip.to_string(),
                            ports: ports_to_wire(ports),
                            ready: c.ready,
                            serving: c.serving,
                            terminating: c.terminating,
                        }
                    })
                    .collect(),
                labels: s.labels.clone().into_iter().collect(),
                selector: s.selector.clone().into_iter().collect(),
                global: s.include_external,
                shared: s.shared,
                cluster_id: u32::from(s.cluster_id),
                affinity: s.affinity.to_string(),
            }),
            Object::Policy { cluster, policy } => W::Policy(v1::NetworkPolicy {
                cluster: cluster.to_string(),
                namespace: policy.namespace.clone().unwrap_or_default(),
                name: policy.name.clone(),
                audit: policy.audit,
                rules: policy
                    .rules
                    .iter()
                    .map(|r| v1::PolicyRule {
                        endpoint_selector: Some(selector_to_wire(&r.endpoint_selector)),
                        ingress: ingress_to_wire(&r.ingress, false),
                        egress: egress_to_wire(&r.egress, false),
                        ingress_deny: ingress_to_wire(&r.ingress_deny, true),
                        egress_deny: egress_to_wire(&r.egress_deny, true),
                        description: r.description.clone().unwrap_or_default(),
                        unenforced_requires: r.unenforced_requires.clone(),
                    })
                    .collect(),
                notes: policy.notes.clone(),
            }),
            Object::ClusterStatus(s) => W::ClusterStatus(v1::ClusterStatus {
                cluster: s.cluster.to_string(),
                connected: s.connected,
                ready: s.ready,
                withdrawn: s.withdrawn,
                keep_last_backends: s.keep_last_backends,
                failures: s.failures,
                last_failure_time: s.last_failure_time,
            }),
        };
        Self {
            object: Some(object),
        }
    }
}

// === wire -> model ===

fn ports_from_wire(
    field: &'static str,
    ports: &[v1::ServicePort],
) -> Result<PortConfiguration, ConvertError> {
    ports
        .iter()
        .map(|p| {
            let addr = L4Addr::new(protocol(field, &p.protocol)?, port(field, p.port)?)
                .map_err(|e| bad(field, e))?;
            Ok((p.name.clone(), addr))
        })
        .collect()
}

fn selector_from_wire(s: &v1::EndpointSelector) -> Result<EndpointSelector, ConvertError> {
    let match_expressions = s
        .match_expressions
        .iter()
        .map(|e| {
            let operator = match e.operator.as_str() {
                "In" => SelectorOperator::In,
                "NotIn" => SelectorOperator::NotIn,
                "Exists" => SelectorOperator::Exists,
                "DoesNotExist" => SelectorOperator::DoesNotExist,
                other => {
                    return Err(bad(
                        "policy.selector.operator",
                        format!("unknown operator {other:?}"),
                    ));
                }
            };
            Ok(SelectorRequirement {
                key: e.key.clone(),
                operator,
                values: e.values.clone(),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(EndpointSelector {
        match_labels: s.match_labels.clone().into_iter().collect(),
        match_expressions,
    })
}

fn port_rules_from_wire(rules: &[v1::PortRule]) -> Result<Vec<PortRule>, ConvertError> {
    rules
        .iter()
        .map(|r| {
            let ports = r
                .ports
                .iter()
                .map(|p| {
                    let protocol = match p.protocol.as_str() {
                        "TCP" => PolicyProtocol::Tcp,
                        "UDP" => PolicyProtocol::Udp,
                        "SCTP" => PolicyProtocol::Sctp,
                        "ICMP" => PolicyProtocol::Icmp,
                        "ANY" | "" => PolicyProtocol::Any,
                        other => {
                            return Err(bad(
                                "policy.ports.protocol",
                                format!("unknown protocol {other:?}"),
                            ));
                        }
                    };
                    let end_port = match p.end_port {
                        0 => None,
                        n => Some(u16::try_from(n).map_err(|_| {
                            bad("policy.ports.endPort", format!("{n} is not a port"))
                        })?),
                    };
                    Ok(PortProtocol {
                        port: p.port.clone(),
                        protocol,
                        end_port,
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(PortRule { ports })
        })
        .collect()
}

fn peers_from_wire(rules: &[v1::PeerRule]) -> Result<Vec<PeersAndPorts>, ConvertError> {
    rules
        .iter()
        .map(|r| {
            let entities = r
                .entities
                .iter()
                .map(|e| {
                    Entity::parse(e)
                        .ok_or_else(|| bad("policy.entities", format!("unknown entity {e:?}")))
                })
                .collect::<Result<_, _>>()?;
            Ok((
                r.peers
                    .iter()
                    .filter(|s| {
                        !(s.match_labels.is_empty()
                            && s.match_expressions.len() == 1
                            && s.match_expressions[0].key == ENTITIES_ONLY)
                    })
                    .map(selector_from_wire)
                    .collect::<Result<_, _>>()?,
                entities,
                port_rules_from_wire(&r.to_ports)?,
            ))
        })
        .collect()
}

/// The peers (by labels and by entity) and ports of one ingress or egress rule.
type PeersAndPorts = (Vec<EndpointSelector>, Vec<Entity>, Vec<PortRule>);

fn ingress_from_wire(rules: &[v1::PeerRule]) -> Result<Vec<IngressRule>, ConvertError> {
    Ok(peers_from_wire(rules)?
        .into_iter()
        .map(|(from_endpoints, from_entities, to_ports)| IngressRule {
            from_endpoints,
            from_entities,
            to_ports,
        })
        .collect())
}

fn egress_from_wire(rules: &[v1::PeerRule]) -> Result<Vec<EgressRule>, ConvertError> {
    Ok(peers_from_wire(rules)?
        .into_iter()
        .map(|(to_endpoints, to_entities, to_ports)| EgressRule {
            to_endpoints,
            to_entities,
            to_ports,
        })
        .collect())
}

impl TryFrom<&v1::Upsert> for Object {
    type Error = ConvertError;

    fn try_from(u: &v1::Upsert) -> Result<Self, Self::Error> {
        use v1::upsert::Object as W;
        let object = u
            .object
            .as_ref()
            .ok_or_else(|| bad("upsert.object", "missing"))?;
        Ok(match object {
            W::Identity(i) => {
                let labels = i
                    .labels
                    .iter()
                    .map(|l| Label::new(l.source.as_str(), l.key.as_str(), l.value.as_str()))
                    .collect::<Result<Vec<_>, _>>()
                    .and_then(LabelSet::from_labels)
                    .map_err(|e| bad("identity.labels", e))?;
                Self::Identity {
                    cluster: cluster("identity.cluster", &i.cluster)?,
                    id: Identity::new(i.id).map_err(|e| bad("identity.id", e))?,
                    labels,
                }
            }
            W::Ipcache(e) => {
                let entry = IpCacheEntry {
                    ip: ip("ipcache.ip", &e.ip)?,
                    identity: Identity::new(e.identity)
                        .map_err(|err| bad("ipcache.identity", err))?,
                    host_ip: if e.host_ip.is_empty() {
                        None
                    } else {
                        Some(ip("ipcache.host_ip", &e.host_ip)?)
                    },
                    namespace: e.namespace.clone(),
                    pod_name: e.pod_name.clone(),
                    named_ports: e
                        .named_ports
                        .iter()
                        .map(|p| {
                            Ok(NamedPort {
                                name: p.name.clone(),
                                port: port("ipcache.named_ports.port", p.port)?,
                                protocol: protocol("ipcache.named_ports.protocol", &p.protocol)?,
                            })
                        })
                        .collect::<Result<_, ConvertError>>()?,
                };
                entry.check_names().map_err(|err| bad("ipcache", err))?;
                Self::IpCache {
                    cluster: cluster("ipcache.cluster", &e.cluster)?,
                    entry,
                }
            }
            W::Node(n) => Self::Node(Node {
                name: n.name.clone(),
                cluster: cluster("node.cluster", &n.cluster)?,
                cluster_id: cluster_id("node.cluster_id", n.cluster_id)?,
                addresses: n
                    .addresses
                    .iter()
                    .map(|a| {
                        Ok(NodeAddress {
                            kind: a.r#type.clone(),
                            ip: ip("node.addresses.ip", &a.ip)?,
                        })
                    })
                    .collect::<Result<_, ConvertError>>()?,
                ipv4_alloc_cidr: if n.ipv4_alloc_cidr.is_empty() {
                    None
                } else {
                    Some(
                        n.ipv4_alloc_cidr
                            .parse::<IpPrefix>()
                            .map_err(|e| bad("node.ipv4_alloc_cidr", e))?,
                    )
                },
                labels: n.labels.clone().into_iter().collect(),
            }),
            W::Service(s) => {
                let mut frontends = BTreeMap::new();
                for f in &s.frontends {
                    frontends.insert(
                        ip("service.frontends.ip", &f.ip)?,
                        ports_from_wire("service.frontends.ports", &f.ports)?,
                    );
                }
                let mut backends = BTreeMap::new();
                let mut backend_conditions = BTreeMap::new();
                for b in &s.backends {
                    let addr = ip("service.backends.ip", &b.ip)?;
                    backends.insert(addr, ports_from_wire("service.backends.ports", &b.ports)?);
                    let c = BackendConditions {
                        ready: b.ready,
                        serving: b.serving,
                        terminating: b.terminating,
                    };
                    if c != BackendConditions::READY {
                        backend_conditions.insert(addr, c);
                    }
                }
                Self::Service(ClusterService {
                    cluster: cluster("service.cluster", &s.cluster)?,
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    frontends,
                    backends,
                    backend_conditions,
                    labels: s.labels.clone().into_iter().collect(),
                    selector: s.selector.clone().into_iter().collect(),
                    include_external: s.global,
                    shared: s.shared,
                    cluster_id: cluster_id("service.cluster_id", s.cluster_id)?,
                    affinity: if s.affinity.is_empty() {
                        Affinity::None
                    } else {
                        s.affinity.parse().map_err(|v| {
                            bad("service.affinity", format!("unknown affinity {v:?}"))
                        })?
                    },
                })
            }
            W::Policy(p) => {
                let rules = p
                    .rules
                    .iter()
                    .map(|r| {
                        Ok(PolicyRule {
                            endpoint_selector: r
                                .endpoint_selector
                                .as_ref()
                                .map(selector_from_wire)
                                .transpose()?
                                .unwrap_or_default(),
                            ingress: ingress_from_wire(&r.ingress)?,
                            egress: egress_from_wire(&r.egress)?,
                            ingress_deny: ingress_from_wire(&r.ingress_deny)?,
                            egress_deny: egress_from_wire(&r.egress_deny)?,
                            description: (!r.description.is_empty()).then(|| r.description.clone()),
                            unenforced_requires: r.unenforced_requires.clone(),
                        })
                    })
                    .collect::<Result<_, ConvertError>>()?;
                let policy = NetworkPolicy {
                    namespace: (!p.namespace.is_empty()).then(|| p.namespace.clone()),
                    name: p.name.clone(),
                    audit: p.audit,
                    rules,
                    notes: p.notes.clone(),
                };
                policy.validate().map_err(|e| bad("policy", e))?;
                Self::Policy {
                    cluster: cluster("policy.cluster", &p.cluster)?,
                    policy,
                }
            }
            W::ClusterStatus(s) => Self::ClusterStatus(ClusterStatus {
                cluster: cluster("cluster_status.cluster", &s.cluster)?,
                connected: s.connected,
                ready: s.ready,
                withdrawn: s.withdrawn,
                keep_last_backends: s.keep_last_backends,
                failures: s.failures,
                last_failure_time: s.last_failure_time,
            }),
        })
    }
}

#[cfg(test)]
mod tests;
