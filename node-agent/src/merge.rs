//! The global-service merge (DESIGN section 3), a pure function of the view: for a service
//! with a local definition, which backends each of its frontends gets, and why every
//! candidate backend is in or out.
//!
//! - A service is programmed only where it is defined locally (its VIPs are the local
//!   ClusterIPs).
//! - Local backends always count. When the local definition is global, so do the backends of
//!   every remote cluster whose definition of the same `namespace/name` is global and shared.
//! - A backend is healthy when its EndpointSlice conditions say ready (or serving and not
//!   terminating) and its cluster is not withdrawn.
//! - Affinity `local`: the healthy local backends, or the healthy remote ones when there is no
//!   healthy local backend; `remote` is the mirror image; `none` takes all healthy ones.
//! - Backends are matched to a frontend port by port name and protocol.
//! - Panic threshold: when nothing healthy is left and a withdrawn cluster allows it
//!   (`keepLastBackends`), that cluster's otherwise healthy backends are kept.

use std::net::{IpAddr, Ipv4Addr};

use clustermesh_bpf::{Proto, ServiceKey};
use clustermesh_model::cluster::ClusterName;
use clustermesh_model::ip::{L4Addr, Protocol};
use clustermesh_model::service::{Affinity, BackendConditions, ClusterService};
use serde::Serialize;

use crate::view::{ServiceName, View};

/// A backend as the datapath gets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BackendAddr {
    /// Its cluster's ID.
    pub cluster_id: u16,
    /// Address.
    pub ip: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// Protocol.
    #[serde(serialize_with = "ser_proto")]
    pub proto: Proto,
}

fn ser_proto<S: serde::Serializer>(p: &Proto, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.name())
}

/// Why a candidate backend is in or out of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// In: healthy and preferred.
    Selected,
    /// In: its cluster is withdrawn, but nothing else is healthy and the cluster's panic
    /// threshold keeps its last backends.
    KeptLastBackends,
    /// Out: not ready (and not serving-and-not-terminating).
    Unhealthy,
    /// Out: its cluster is withdrawn (unreachable for longer than the staleness bound).
    ClusterWithdrawn,
    /// Out: the remote cluster's definition is not shared.
    NotShared,
    /// Out: the remote cluster's definition is not global.
    RemoteNotGlobal,
    /// Out: the local definition is not global, so remote backends do not count.
    LocalNotGlobal,
    /// Out: the backend has no port of the frontend's name and protocol.
    PortMismatch,
    /// Out: affinity `local` and a healthy local backend exists.
    AffinityLocal,
    /// Out: affinity `remote` and a healthy remote backend exists.
    AffinityRemote,
    /// Out: the datapath balances IPv4 only.
    NotIpv4,
}

impl Reason {
    /// Whether the backend is programmed.
    pub fn selected(self) -> bool {
        matches!(self, Self::Selected | Self::KeptLastBackends)
    }
}

/// One candidate backend of a frontend and its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// Its cluster.
    pub cluster: ClusterName,
    /// Address.
    pub ip: IpAddr,
    /// Its port for this frontend, when it has one.
    pub port: Option<u16>,
    /// In or out, and why.
    pub reason: Reason,
}

/// One frontend (VIP, port, protocol) of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrontendPlan {
    /// The VIP.
    pub vip: Ipv4Addr,
    /// The frontend port.
    pub port: u16,
    /// The port's name (empty for a single unnamed port).
    pub port_name: String,
    /// Protocol.
    #[serde(serialize_with = "ser_proto")]
    pub proto: Proto,
    /// The backends programmed, sorted.
    pub backends: Vec<BackendAddr>,
    /// Every candidate with its reason.
    pub candidates: Vec<Candidate>,
}

impl FrontendPlan {
    /// The datapath key.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: self.vip,
            port: self.port,
            proto: self.proto,
        }
    }
}

/// The merge of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePlan {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Whether the local definition is global.
    pub global: bool,
    /// Its affinity.
    pub affinity: Affinity,
    /// The frontends.
    pub frontends: Vec<FrontendPlan>,
    /// Frontends the datapath cannot carry (IPv6, SCTP), with why.
    pub skipped: Vec<String>,
}

/// The datapath protocol of a model protocol (SCTP is not load-balanced).
pub fn proto_of(p: Protocol) -> Option<Proto> {
    match p {
        Protocol::Tcp => Some(Proto::Tcp),
        Protocol::Udp => Some(Proto::Udp),
        _ => None,
    }
}

/// Merges a service across clusters. `None` when it has no local definition.
pub fn merge(view: &View, name: &ServiceName) -> Option<ServicePlan> {
    let defs = view.service(name)?;
    let local = defs.get(view.local())?;
    let mut plan = ServicePlan {
        namespace: name.0.clone(),
        name: name.1.clone(),
        global: local.include_external,
        affinity: local.affinity,
        frontends: Vec::new(),
        skipped: Vec::new(),
    };
    for (vip, ports) in &local.frontends {
        for (port_name, l4) in ports {
            let IpAddr::V4(vip4) = vip else {
                plan.skipped.push(format!(
                    "{vip} {port_name}: IPv6 frontends are not balanced"
                ));
                continue;
            };
            let Some(proto) = proto_of(l4.protocol) else {
                plan.skipped.push(format!(
                    "{vip}:{} {}: protocol not balanced",
                    l4.port(),
                    l4.protocol.as_str()
                ));
                continue;
            };
            plan.frontends
                .push(frontend(view, local, defs, *vip4, port_name, *l4, proto));
        }
    }
    Some(plan)
}

struct Eligible {
    index: usize,
    addr: BackendAddr,
    local: bool,
    withdrawn_keepable: bool,
}

fn frontend(
    view: &View,
    local: &ClusterService,
    defs: &std::collections::BTreeMap<ClusterName, ClusterService>,
    vip: Ipv4Addr,
    port_name: &str,
    l4: L4Addr,
    proto: Proto,
) -> FrontendPlan {
    let mut candidates = Vec::new();
    let mut healthy = Vec::new();
    let mut withdrawn = Vec::new();
    let local_name = view.local();
    let ordered = std::iter::once(local).chain(
        defs.iter()
            .filter(|(c, _)| *c != local_name)
            .map(|(_, d)| d),
    );
    for def in ordered {
        let is_local = def.cluster == *local_name;
        let status = view.status(&def.cluster);
        let gate = if is_local {
            None
        } else if !local.include_external {
            Some(Reason::LocalNotGlobal)
        } else if !def.include_external {
            Some(Reason::RemoteNotGlobal)
        } else if !def.shared {
            Some(Reason::NotShared)
        } else {
            None
        };
        for (ip, ports) in &def.backends {
            let port = ports
                .get(port_name)
                .filter(|a| a.protocol == l4.protocol)
                .map(L4Addr::port);
            let conditions: BackendConditions = def.conditions_of(ip);
            let reason = match (gate, ip, port) {
                (Some(r), _, _) => r,
                (None, IpAddr::V6(_), _) => Reason::NotIpv4,
                (None, _, None) => Reason::PortMismatch,
                (None, IpAddr::V4(_), Some(_)) if !conditions.is_healthy() => Reason::Unhealthy,
                (None, IpAddr::V4(ip4), Some(p)) => {
                    let e = Eligible {
                        index: candidates.len(),
                        addr: BackendAddr {
                            cluster_id: def.cluster_id.get(),
                            ip: *ip4,
                            port: p,
                            proto,
                        },
                        local: is_local,
                        withdrawn_keepable: status.is_some_and(|s| s.keep_last_backends),
                    };
                    if status.is_some_and(|s| s.withdrawn) {
                        withdrawn.push(e);
                        Reason::ClusterWithdrawn
                    } else {
                        healthy.push(e);
                        Reason::Selected
                    }
                }
            };
            candidates.push(Candidate {
                cluster: def.cluster.clone(),
                ip: *ip,
                port,
                reason,
            });
        }
    }
    let has_local = healthy.iter().any(|e| e.local);
    let has_remote = healthy.iter().any(|e| !e.local);
    let mut backends = Vec::new();
    for e in &healthy {
        let out = match local.affinity {
            Affinity::Local if has_local && !e.local => Some(Reason::AffinityLocal),
            Affinity::Remote if has_remote && e.local => Some(Reason::AffinityRemote),
            _ => None,
        };
        match out {
            Some(r) => candidates[e.index].reason = r,
            None => backends.push(e.addr),
        }
    }
    if backends.is_empty() {
        for e in withdrawn.iter().filter(|e| e.withdrawn_keepable) {
            candidates[e.index].reason = Reason::KeptLastBackends;
            backends.push(e.addr);
        }
    }
    backends.sort();
    backends.dedup();
    FrontendPlan {
        vip,
        port: l4.port(),
        port_name: port_name.to_owned(),
        proto,
        backends,
        candidates,
    }
}
