//! Builders for views in the agent's tests: clusters c1 (local, ID 1) and c2, c3 (remote).

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses part of it"
)]
#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustermesh_agent::view::View;
use clustermesh_model::cluster::{ClusterId, ClusterName, ClusterStatus, MaxConnectedClusters};
use clustermesh_model::endpoint::{IpCacheEntry, NamedPort};
use clustermesh_model::identity::Identity;
use clustermesh_model::ip::{L4Addr, Protocol};
use clustermesh_model::labels::LabelSet;
use clustermesh_model::node::{Node, NodeAddress};
use clustermesh_model::policy::NetworkPolicy;
use clustermesh_model::service::{Affinity, BackendConditions, ClusterService};
use clustermesh_proto::Object;

pub const MODE: MaxConnectedClusters = MaxConnectedClusters::C255;

pub fn c(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap()
}

pub fn id_of(cluster: &str) -> u16 {
    cluster.trim_start_matches('c').parse().unwrap()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A view of node `n1` in cluster c1, whose node object has address 192.0.2.1.
pub fn view() -> View {
    let mut v = View::new(c("c1"), ClusterId::new(1, MODE).unwrap(), "n1", MODE);
    v.upsert(Object::Node(Node {
        name: "n1".into(),
        cluster: c("c1"),
        cluster_id: ClusterId::new(1, MODE).unwrap(),
        addresses: vec![NodeAddress {
            kind: "InternalIP".into(),
            ip: ip("192.0.2.1"),
        }],
        ipv4_alloc_cidr: None,
        labels: BTreeMap::new(),
    }));
    v
}

pub fn ports(entries: &[(&str, Protocol, u16)]) -> BTreeMap<String, L4Addr> {
    entries
        .iter()
        .map(|(n, p, port)| ((*n).to_owned(), L4Addr::new(*p, *port).unwrap()))
        .collect()
}

/// A service `prod/web` of `cluster` with a frontend 10.96.0.10 (`http` TCP 80) when it is
/// the local cluster, and the given backends with port `http` TCP 8080.
pub fn web(
    cluster: &str,
    global: bool,
    shared: bool,
    affinity: Affinity,
    backends: &[(&str, BackendConditions)],
) -> ClusterService {
    let mut frontends = BTreeMap::new();
    if cluster == "c1" {
        frontends.insert(ip("10.96.0.10"), ports(&[("http", Protocol::Tcp, 80)]));
    }
    ClusterService {
        cluster: c(cluster),
        namespace: "prod".into(),
        name: "web".into(),
        frontends,
        backends: backends
            .iter()
            .map(|(b, _)| (ip(b), ports(&[("http", Protocol::Tcp, 8080)])))
            .collect(),
        backend_conditions: backends
            .iter()
            .filter(|(_, cond)| *cond != BackendConditions::READY)
            .map(|(b, cond)| (ip(b), *cond))
            .collect(),
        labels: BTreeMap::new(),
        selector: BTreeMap::new(),
        include_external: global,
        shared,
        cluster_id: ClusterId::new(u32::from(id_of(cluster)), MODE).unwrap(),
        affinity,
    }
}

pub const READY: BackendConditions = BackendConditions::READY;
pub const NOT_READY: BackendConditions = BackendConditions {
    ready: false,
    serving: false,
    terminating: false,
};

pub fn status(cluster: &str, withdrawn: bool, keep_last_backends: bool) -> Object {
    Object::ClusterStatus(ClusterStatus {
        cluster: c(cluster),
        connected: !withdrawn,
        ready: true,
        withdrawn,
        keep_last_backends,
        failures: 0,
        last_failure_time: 0,
    })
}

/// An identity of `cluster` (number within its range) with pod labels in `namespace`.
pub fn identity(cluster: &str, n: u32, namespace: &str, labels: &[(&str, &str)]) -> (u32, Object) {
    let id = (u32::from(id_of(cluster)) << 16) + n;
    let object = Object::Identity {
        cluster: c(cluster),
        id: Identity::new(id).unwrap(),
        labels: LabelSet::workload(&c(cluster), namespace, labels.iter().copied()).unwrap(),
    };
    (id, object)
}

/// An ipcache entry of `cluster` on host `host`.
pub fn endpoint(
    cluster: &str,
    addr: &str,
    id: u32,
    host: &str,
    named_ports: &[(&str, Protocol, u16)],
) -> Object {
    Object::IpCache {
        cluster: c(cluster),
        entry: IpCacheEntry {
            ip: ip(addr),
            identity: Identity::new(id).unwrap(),
            host_ip: Some(ip(host)),
            namespace: "prod".into(),
            pod_name: format!("pod-{addr}"),
            named_ports: named_ports
                .iter()
                .map(|(n, p, port)| NamedPort {
                    name: (*n).into(),
                    port: *port,
                    protocol: *p,
                })
                .collect(),
        },
    }
}

/// A view with a global service (local and remote backends), endpoints and a policy.
pub fn populated() -> View {
    let mut v = view();
    v.upsert(Object::Service(web(
        "c1",
        true,
        true,
        Affinity::None,
        &[("10.1.0.1", READY)],
    )));
    v.upsert(Object::Service(web(
        "c2",
        true,
        true,
        Affinity::None,
        &[("10.2.0.1", READY)],
    )));
    let (web_id, obj) = identity("c1", 256, "prod", &[("app", "web")]);
    v.upsert(obj);
    let (fe_id, obj) = identity("c2", 300, "prod", &[("app", "frontend")]);
    v.upsert(obj);
    v.upsert(endpoint(
        "c1",
        "10.1.0.1",
        web_id,
        "192.0.2.1",
        &[("http", Protocol::Tcp, 8080)],
    ));
    v.upsert(endpoint("c2", "10.2.0.1", fe_id, "192.0.2.2", &[]));
    let p: NetworkPolicy = serde_yaml_ng::from_str(
        "
namespace: prod
name: p
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend, io.cilium.k8s.policy.cluster: c2}}]
",
    )
    .unwrap();
    v.upsert(Object::Policy {
        cluster: c("c1"),
        policy: p,
    });
    v
}
