//! Policy resolution: selectors with and without the cluster label, namespaces,
//! matchExpressions, deny over allow, audit mode, ports (numbers, ANY, named), and which
//! endpoints are this node's.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use clustermesh_agent::policy::{PolicyState, resolve, rule_id};
use clustermesh_agent::view::View;
use clustermesh_bpf::{Direction, EndpointFlags, PolicyKey, PolicyValue, Proto, Verdict};
use clustermesh_model::ip::Protocol;
use clustermesh_model::policy::NetworkPolicy;
use clustermesh_proto::Object;
use support::*;

const WEB: &str = "10.1.0.10";

/// c1 (local): web (on this node), frontend, other (another namespace); a web on another
/// node; c2: frontend; c3: frontend.
fn mesh() -> (View, BTreeMap<&'static str, u32>) {
    let mut v = view();
    let mut ids = BTreeMap::new();
    for (key, cluster, n, ns, app) in [
        ("web", "c1", 256, "prod", "web"),
        ("frontend", "c1", 257, "prod", "frontend"),
        ("other-ns", "c1", 258, "dev", "frontend"),
        ("c2-frontend", "c2", 300, "prod", "frontend"),
        ("c3-frontend", "c3", 300, "prod", "frontend"),
    ] {
        let (id, obj) = identity(cluster, n, ns, &[("app", app)]);
        v.upsert(obj);
        ids.insert(key, id);
    }
    v.upsert(endpoint(
        "c1",
        WEB,
        ids["web"],
        "192.0.2.1",
        &[("http", Protocol::Tcp, 8080)],
    ));
    v.upsert(endpoint("c1", "10.1.0.11", ids["web"], "192.0.2.99", &[]));
    v.upsert(endpoint(
        "c1",
        "10.1.0.20",
        ids["frontend"],
        "192.0.2.1",
        &[],
    ));
    (v, ids)
}

fn policy(v: &mut View, yaml: &str) {
    let p: NetworkPolicy = serde_yaml_ng::from_str(yaml).unwrap();
    p.validate().unwrap();
    v.upsert(Object::Policy {
        cluster: c("c1"),
        policy: p,
    });
}

/// Peer identity, port and direction.
type EntryKey = (u32, Option<(u16, Proto)>, Direction);

fn web_entries(s: &PolicyState) -> BTreeMap<EntryKey, Verdict> {
    let web = u32::from(WEB.parse::<Ipv4Addr>().unwrap());
    s.entries
        .iter()
        .filter(|(k, _)| k.endpoint_id == web)
        .map(|(k, v)| ((k.identity, k.port, k.direction), v.verdict))
        .collect()
}

fn flags(s: &PolicyState) -> EndpointFlags {
    s.endpoints[&WEB.parse::<Ipv4Addr>().unwrap()].flags
}

const ALLOW_FRONTEND: &str = "
namespace: prod
name: allow-frontend
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
";

#[test]
fn only_this_nodes_endpoints_are_programmed() {
    let (v, ids) = mesh();
    let s = resolve(&v);
    let ips: Vec<String> = s.endpoints.keys().map(ToString::to_string).collect();
    assert_eq!(ips, ["10.1.0.10", "10.1.0.20"]);
    let web = &s.endpoints[&WEB.parse::<Ipv4Addr>().unwrap()];
    assert_eq!(web.identity, ids["web"]);
    assert_eq!(web.cluster_id, 1);
    assert_eq!(
        web.flags,
        EndpointFlags::default(),
        "no policy: nothing enforced"
    );
    assert!(s.entries.is_empty());
}

#[test]
fn a_selector_without_the_cluster_label_selects_the_local_cluster_only() {
    let (mut v, ids) = mesh();
    policy(&mut v, ALLOW_FRONTEND);
    let s = resolve(&v);
    assert_eq!(
        web_entries(&s),
        BTreeMap::from([(
            (
                ids["frontend"],
                Some((8080, Proto::Tcp)),
                Direction::Ingress
            ),
            Verdict::Allow
        )]),
        "neither the other namespace nor other clusters"
    );
    let f = flags(&s);
    assert!(f.enforce_ingress && !f.enforce_egress && !f.audit_ingress);
    let web = u32::from(WEB.parse::<Ipv4Addr>().unwrap());
    let key = PolicyKey {
        endpoint_id: web,
        identity: ids["frontend"],
        port: Some((8080, Proto::Tcp)),
        direction: Direction::Ingress,
        port_block: 0,
    };
    let name = "prod/allow-frontend rule 0";
    assert_eq!(
        s.entries[&key],
        PolicyValue {
            verdict: Verdict::Allow,
            rule_id: rule_id(name)
        }
    );
    assert_eq!(s.rules[&rule_id(name)], name);
    let explain = &s.explain[&WEB.parse::<Ipv4Addr>().unwrap()];
    assert_eq!(explain.selected_by, [name]);
    assert_eq!(
        explain.entries[0].rules,
        ["prod/allow-frontend rule 0 ingress[0]"]
    );
}

#[test]
fn the_cluster_label_and_match_expressions_reach_remote_clusters() {
    let (mut v, ids) = mesh();
    policy(
        &mut v,
        "
namespace: prod
name: from-c2
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend, io.cilium.k8s.policy.cluster: c2}}]
",
    );
    let got: Vec<u32> = web_entries(&resolve(&v)).keys().map(|k| k.0).collect();
    assert_eq!(got, [ids["c2-frontend"]]);

    policy(
        &mut v,
        "
namespace: prod
name: from-c2
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend}
      matchExpressions:
      - {key: k8s:io.cilium.k8s.policy.cluster, operator: In, values: [c1, c3]}
",
    );
    let got: Vec<u32> = web_entries(&resolve(&v)).keys().map(|k| k.0).collect();
    assert_eq!(got, [ids["frontend"], ids["c3-frontend"]]);

    // NotIn over every cluster but c1, and the namespace label opening other namespaces.
    policy(
        &mut v,
        "
name: clusterwide
rules:
- endpointSelector: {matchLabels: {app: web}}
  egress:
  - toEndpoints:
    - matchExpressions:
      - {key: io.cilium.k8s.policy.cluster, operator: NotIn, values: [c1]}
      - {key: app, operator: Exists}
",
    );
    let s = resolve(&v);
    let egress: Vec<u32> = web_entries(&s)
        .keys()
        .filter(|k| k.2 == Direction::Egress)
        .map(|k| k.0)
        .collect();
    assert_eq!(egress, [ids["c2-frontend"], ids["c3-frontend"]]);
    assert!(flags(&s).enforce_egress);
}

#[test]
fn a_namespaced_policy_selects_peers_of_its_namespace_unless_the_selector_names_one() {
    let (mut v, ids) = mesh();
    policy(
        &mut v,
        "
namespace: prod
name: from-dev
rules:
- endpointSelector: {}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend, k8s:io.kubernetes.pod.namespace: dev}}]
",
    );
    let got: Vec<u32> = web_entries(&resolve(&v)).keys().map(|k| k.0).collect();
    assert_eq!(got, [ids["other-ns"]]);
    // A namespaced policy never applies to endpoints of another namespace.
    policy(
        &mut v,
        "
namespace: dev
name: elsewhere
rules:
- endpointSelector: {}
  ingress: [{}]
",
    );
    let s = resolve(&v);
    assert!(
        !s.explain[&WEB.parse::<Ipv4Addr>().unwrap()]
            .selected_by
            .iter()
            .any(|r| r.starts_with("dev/"))
    );
}

#[test]
fn deny_wins_over_allow() {
    let (mut v, ids) = mesh();
    policy(&mut v, ALLOW_FRONTEND);
    policy(
        &mut v,
        "
name: deny-frontend
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
",
    );
    let s = resolve(&v);
    let key = (
        ids["frontend"],
        Some((8080, Proto::Tcp)),
        Direction::Ingress,
    );
    assert_eq!(web_entries(&s)[&key], Verdict::Deny);
    let explain = &s.explain[&WEB.parse::<Ipv4Addr>().unwrap()];
    assert_eq!(
        explain.entries[0].rules,
        [
            "deny-frontend rule 0 ingressDeny[0]",
            "prod/allow-frontend rule 0 ingress[0]"
        ],
        "the winner first"
    );
}

#[test]
fn audit_mode_records_instead_of_enforcing() {
    let (mut v, ids) = mesh();
    let audited = ALLOW_FRONTEND.replace("name: allow-frontend", "name: audited\naudit: true");
    policy(&mut v, &audited);
    let s = resolve(&v);
    let f = flags(&s);
    assert!(f.audit_ingress && !f.enforce_ingress, "{f:?}");
    assert_eq!(
        web_entries(&s),
        BTreeMap::from([(
            (
                ids["frontend"],
                Some((8080, Proto::Tcp)),
                Direction::Ingress
            ),
            Verdict::Audit
        )])
    );
    // Once an enforcing policy covers ingress, the audit entries are left out.
    policy(
        &mut v,
        "
namespace: prod
name: enforce
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingress: [{}]
",
    );
    let s = resolve(&v);
    let f = flags(&s);
    assert!(f.enforce_ingress && !f.audit_ingress, "{f:?}");
    assert!(web_entries(&s).is_empty(), "{:?}", web_entries(&s));
    assert!(
        s.explain[&WEB.parse::<Ipv4Addr>().unwrap()]
            .notes
            .iter()
            .any(|n| n.contains("audit-mode rule left out"))
    );
}

#[test]
fn ports_any_protocol_named_ports_and_rules_without_peers() {
    let (mut v, ids) = mesh();
    policy(
        &mut v,
        "
namespace: prod
name: ports
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: '53', protocol: ANY}, {port: http}]}]
  - toPorts: [{ports: [{port: '9090'}]}]
",
    );
    let s = resolve(&v);
    let f = ids["frontend"];
    assert_eq!(
        web_entries(&s),
        BTreeMap::from([
            // No protocol: ANY, as in Cilium.
            (
                (0, Some((9090, Proto::Tcp)), Direction::Ingress),
                Verdict::Allow
            ),
            (
                (0, Some((9090, Proto::Udp)), Direction::Ingress),
                Verdict::Allow
            ),
            (
                (f, Some((53, Proto::Tcp)), Direction::Ingress),
                Verdict::Allow
            ),
            (
                (f, Some((53, Proto::Udp)), Direction::Ingress),
                Verdict::Allow
            ),
            (
                (f, Some((8080, Proto::Tcp)), Direction::Ingress),
                Verdict::Allow
            ),
        ])
    );
    // A named port the endpoint does not have resolves to nothing, and says so.
    policy(
        &mut v,
        "
namespace: prod
name: ports
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: grpc}]}]
",
    );
    let s = resolve(&v);
    assert!(web_entries(&s).is_empty());
    assert!(flags(&s).enforce_ingress, "still default-deny");
    assert!(
        s.explain[&WEB.parse::<Ipv4Addr>().unwrap()]
            .notes
            .iter()
            .any(|n| n.contains("named port \"grpc\" not found"))
    );
}

#[test]
fn removing_the_policy_removes_its_entries_and_enforcement() {
    let (mut v, _) = mesh();
    policy(&mut v, ALLOW_FRONTEND);
    assert!(!resolve(&v).entries.is_empty());
    let dirty = v.delete(&clustermesh_proto::ObjectRef {
        kind: clustermesh_proto::v1::Kind::Policies,
        cluster: c("c1"),
        name: "prod/allow-frontend".into(),
    });
    assert!(dirty.policy);
    let s = resolve(&v);
    assert!(s.entries.is_empty());
    assert_eq!(flags(&s), EndpointFlags::default());
}

/// `toEntities`/`fromEntities`: `all` is any identity, `world` the reserved world identity,
/// `cluster` every identity of the local cluster (any namespace, no other cluster) with host
/// and remote-node; `host` identity 1; `kube-apiserver` and the like are not told apart from
/// world: left out of an allow, world in a deny. The policy's own notes (what the apiserver
/// could not translate) show in explain.
#[test]
fn entities_select_identities_and_what_is_not_enforced_is_explained() {
    let (mut v, ids) = mesh();
    policy(
        &mut v,
        "
namespace: prod
name: entities
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [cluster]
    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]
  - fromEntities: [world, host]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - fromEntities: [host]
    toPorts: [{ports: [{port: '22', protocol: TCP}]}]
  - fromEntities: [none]
    toPorts: [{ports: [{port: '23', protocol: TCP}]}]
  - {}
  egressDeny:
  - toEntities: [all]
    toPorts: [{ports: [{port: '25', protocol: TCP}]}]
  - toEntities: [kube-apiserver]
    toPorts: [{ports: [{port: '6443', protocol: TCP}]}]
notes:
- 'rule 0 ingress[4]: toCIDR not enforced yet; the rule is left out: it allows nothing (its direction stays default-deny)'
- 'rule 1 egress[0]: a note on another rule'
",
    );
    let s = resolve(&v);
    let tcp = |p| Some((p, Proto::Tcp));
    let mut want = BTreeMap::new();
    for id in [ids["web"], ids["frontend"], ids["other-ns"], 1, 6] {
        want.insert((id, tcp(8080), Direction::Ingress), Verdict::Allow);
    }
    want.insert((2, tcp(443), Direction::Ingress), Verdict::Allow);
    want.insert((1, tcp(443), Direction::Ingress), Verdict::Allow);
    want.insert((1, tcp(22), Direction::Ingress), Verdict::Allow);
    want.insert((0, tcp(25), Direction::Egress), Verdict::Deny);
    want.insert((2, tcp(6443), Direction::Egress), Verdict::Deny);
    assert_eq!(web_entries(&s), want);
    assert_eq!(
        flags(&s),
        EndpointFlags {
            enforce_ingress: true,
            enforce_egress: true,
            audit_ingress: false,
            audit_egress: false,
            port_blocks: 0,
        }
    );
    let explain = &s.explain[&WEB.parse::<Ipv4Addr>().unwrap()];
    assert_eq!(
        explain.notes,
        [
            "prod/entities rule 0 ingress[4]: toCIDR not enforced yet; the rule is left out: it \
             allows nothing (its direction stays default-deny)",
            "prod/entities rule 0 egressDeny[1]: entity kube-apiserver is not told apart from \
             world by this datapath (no address has that identity here); the rule denies \
             world instead",
        ]
    );
}

/// `cluster` in a deny denies the local cluster's identities and the nodes (host,
/// remote-node), not world; a rule whose `toRequires` is not enforced leaves every egress
/// allow of the endpoints it selects out, from any policy, and keeps the denies.
#[test]
fn cluster_in_a_deny_and_unenforced_requires_fail_closed() {
    let (mut v, ids) = mesh();
    policy(
        &mut v,
        "
namespace: prod
name: allow-out
rules:
- endpointSelector: {matchLabels: {app: web}}
  egress:
  - toEndpoints: [{matchLabels: {app: frontend}}]
  egressDeny:
  - toEntities: [cluster]
    toPorts: [{ports: [{port: '22', protocol: TCP}]}]
",
    );
    let s = resolve(&v);
    let entries = web_entries(&s);
    assert_eq!(
        entries[&(ids["frontend"], None, Direction::Egress)],
        Verdict::Allow
    );
    for id in [ids["frontend"], 1, 6] {
        assert_eq!(
            entries[&(id, Some((22, Proto::Tcp)), Direction::Egress)],
            Verdict::Deny
        );
    }
    assert!(!entries.contains_key(&(2, Some((22, Proto::Tcp)), Direction::Egress)));
    policy(
        &mut v,
        "
namespace: prod
name: requires
rules:
- endpointSelector: {matchLabels: {app: web}}
  egress: [{}]
  unenforcedRequires: [egress]
",
    );
    let s = resolve(&v);
    let entries = web_entries(&s);
    assert!(
        entries.values().all(|v| *v == Verdict::Deny),
        "only the denies are left: {entries:?}"
    );
    assert_eq!(
        entries.len(),
        5,
        "3 local identities, host, remote-node: {entries:?}"
    );
    assert!(flags(&s).enforce_egress);
    let explain = &s.explain[&WEB.parse::<Ipv4Addr>().unwrap()];
    assert!(
        explain.notes.contains(
            &"every egress allow left out: prod/requires rule 0 has toRequires, which is not \
              enforced yet"
                .to_owned()
        ),
        "{:?}",
        explain.notes
    );
}

/// ICMP (from a rule's `icmps`): an entry of protocol ICMP whose port is the message type,
/// type 0 included.
#[test]
fn icmp_types_are_entries_of_protocol_icmp() {
    let (mut v, ids) = mesh();
    policy(
        &mut v,
        "
namespace: prod
name: ping
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: '8', protocol: ICMP}, {port: '0', protocol: ICMP}]}]
",
    );
    let s = resolve(&v);
    let want: BTreeMap<EntryKey, Verdict> = [8, 0]
        .into_iter()
        .map(|t| {
            (
                (ids["frontend"], Some((t, Proto::Icmp)), Direction::Ingress),
                Verdict::Allow,
            )
        })
        .collect();
    assert_eq!(web_entries(&s), want);
    let explain = &s.explain[&WEB.parse::<Ipv4Addr>().unwrap()];
    let ports: Vec<&str> = explain.entries.iter().map(|e| e.port.as_str()).collect();
    assert_eq!(ports, ["0/ICMP", "8/ICMP"]);
}

/// A port range becomes the fewest aligned blocks that cover it exactly, and the endpoint's
/// flags name the block sizes the datapath must probe.
#[test]
fn port_ranges_become_aligned_blocks() {
    use clustermesh_agent::policy::port_blocks;
    assert_eq!(port_blocks(4096, 8191), [(4096, 12)]);
    assert_eq!(port_blocks(80, 80), [(80, 0)]);
    assert_eq!(port_blocks(0, 65_535), [(0, 16)]);
    assert_eq!(port_blocks(65_535, 65_535), [(65_535, 0)]);
    let pieces = port_blocks(4196, 8191);
    assert_eq!(
        pieces,
        [
            (4196, 2),
            (4200, 3),
            (4208, 4),
            (4224, 7),
            (4352, 8),
            (4608, 9),
            (5120, 10),
            (6144, 11)
        ]
    );
    // Exactly the range, no gap and no overlap.
    let covered: Vec<u32> = pieces
        .iter()
        .flat_map(|(start, k)| u32::from(*start)..u32::from(*start) + (1 << k))
        .collect();
    assert_eq!(covered, (4196..=8191).collect::<Vec<u32>>());

    let (mut v, ids) = mesh();
    policy(
        &mut v,
        "
namespace: prod
name: range
rules:
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: '8000', endPort: 8191, protocol: TCP}]}]
",
    );
    let s = resolve(&v);
    let web = u32::from(WEB.parse::<Ipv4Addr>().unwrap());
    let keys: Vec<(u16, u8)> = s
        .entries
        .keys()
        .filter(|k| k.endpoint_id == web)
        .map(|k| (k.port.unwrap().0, k.port_block))
        .collect();
    assert_eq!(keys, [(8000, 6), (8064, 7)]);
    assert!(
        s.entries
            .keys()
            .all(|k| k.identity == ids["frontend"] || k.endpoint_id != web)
    );
    assert_eq!(flags(&s).port_blocks, (1 << 5) | (1 << 6));
    let explain = &s.explain[&WEB.parse::<Ipv4Addr>().unwrap()];
    let ports: Vec<&str> = explain.entries.iter().map(|e| e.port.as_str()).collect();
    assert_eq!(ports, ["8000-8063/TCP", "8064-8191/TCP"]);
}

/// Node addresses are in the ipcache: this node's as `host` (1), every other node's, of any
/// cluster, as `remote-node` (6), with no cluster ID; an endpoint's own entry wins over a node
/// claiming its address; a node that moves or goes takes its entries along.
#[test]
fn node_addresses_are_host_and_remote_node_in_the_ipcache() {
    use clustermesh_agent::desired::Desired;
    use clustermesh_model::node::{Node, NodeAddress};
    let (mut v, ids) = mesh();
    let node = |cluster: &str, name: &str, addrs: &[&str]| {
        Object::Node(Node {
            name: name.into(),
            cluster: c(cluster),
            cluster_id: clustermesh_model::cluster::ClusterId::new(
                u32::from(support::id_of(cluster)),
                clustermesh_model::cluster::MaxConnectedClusters::C255,
            )
            .unwrap(),
            addresses: addrs
                .iter()
                .map(|a| NodeAddress {
                    kind: "InternalIP".into(),
                    ip: ip(a),
                })
                .collect(),
            ipv4_alloc_cidr: None,
            labels: BTreeMap::new(),
        })
    };
    v.upsert(node("c1", "n2", &["192.0.2.2"]));
    v.upsert(node("c2", "c2-n1", &["198.51.100.1", "10.1.0.20"]));
    let entry = |d: &Desired, a: &str| {
        d.ipcache
            .iter()
            .find(|(p, _)| p.addr.to_string() == a && p.len == 32)
            .map(|(_, v)| (v.identity, v.cluster_id))
    };
    let d = Desired::from_view(&v);
    assert_eq!(entry(&d, "192.0.2.1"), Some((1, 0)), "this node: host");
    assert_eq!(entry(&d, "192.0.2.2"), Some((6, 0)), "another node of c1");
    assert_eq!(entry(&d, "198.51.100.1"), Some((6, 0)), "a node of c2");
    assert_eq!(
        entry(&d, "10.1.0.20"),
        Some((ids["frontend"], 1)),
        "the endpoint's entry wins"
    );

    // Incremental: n2 moves to another address, c2's node goes.
    let mut d = d;
    let dirty = v.upsert(node("c1", "n2", &["192.0.2.3"]));
    d.update(&v, &dirty);
    assert_eq!(entry(&d, "192.0.2.2"), None);
    assert_eq!(entry(&d, "192.0.2.3"), Some((6, 0)));
    let dirty = v.delete(&clustermesh_proto::ObjectRef {
        kind: clustermesh_proto::v1::Kind::Nodes,
        cluster: c("c2"),
        name: "c2-n1".into(),
    });
    d.update(&v, &dirty);
    assert_eq!(entry(&d, "198.51.100.1"), None);
    assert_eq!(entry(&d, "10.1.0.20"), Some((ids["frontend"], 1)));
    assert_eq!(d.ipcache, Desired::from_view(&v).ipcache);
}
