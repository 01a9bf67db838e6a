//! Policy resolution, a pure function of the view: the local cluster's
//! CiliumNetworkPolicies and CiliumClusterwideNetworkPolicies, over the identities of every
//! cluster, into per-endpoint datapath entries.
//!
//! Semantics (DESIGN section 3, Cilium's where the design is silent):
//! - a rule applies to the local endpoints its `endpointSelector` matches; a namespaced
//!   policy only to endpoints of its namespace;
//! - an endpoint selected by a rule that has ingress (or egress) rules, allow or deny, is
//!   default-deny in that direction;
//! - peer selectors (`fromEndpoints`, `toEndpoints`) select identities of every cluster by
//!   `matchLabels` and `matchExpressions`; a selector that does not mention the cluster label
//!   `io.cilium.k8s.policy.cluster` selects only the local cluster (Cilium 1.19's
//!   `policy-default-local-cluster`); in a namespaced policy, one that does not mention
//!   `io.kubernetes.pod.namespace` selects only the policy's namespace;
//! - `fromEntities`/`toEntities`: `all` is any peer (identity 0), `world` (and `world-ipv4`)
//!   the reserved world identity 2, which the datapath gives every address the ipcache does
//!   not know; `host` this node's addresses (identity 1) and `remote-node` every other node's
//!   of any cluster (identity 6), both in the ipcache from the Node objects; `cluster` every
//!   identity of the local cluster with host and remote-node; `kube-apiserver`, `ingress`,
//!   `health`, `init` and `unmanaged` are not told apart from world (no address has those
//!   identities here): left out of an allow (noted), world in a deny (fail closed, noted);
//! - a rule with no peer selector, no entity and `toPorts` allows any peer on those ports;
//!   one with neither selects nothing (it still makes the direction default-deny);
//! - what the apiserver could not translate as written (the policy's notes, see
//!   `clustermesh_model::policy::cilium`) shows in `explain endpoint` of every endpoint the
//!   rule selects;
//! - `toPorts` protocol `ANY` means TCP and UDP; a named port resolves against the endpoint's
//!   own named ports for ingress and against the selected peers' named ports for egress;
//! - deny wins over allow, allow over audit;
//! - an audit-mode policy (annotation `cilium.io/policy-audit-mode: "true"`) enforces
//!   nothing: a direction covered only by audit policies passes what would be dropped and
//!   reports it as audited; its deny entries become audit entries; on a direction that an
//!   enforcing policy covers, its entries are left out (they could only open traffic).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use clustermesh_bpf::{Direction, Endpoint, EndpointFlags, PolicyKey, PolicyValue, Proto, Verdict};
use clustermesh_model::endpoint::IpCacheEntry;
use clustermesh_model::labels::{CLUSTER_LABEL, LabelSet, NAMESPACE_LABEL};
use clustermesh_model::policy::{
    EgressRule, EndpointSelector, Entity, IngressRule, PolicyProtocol, PortRule, PortSpec,
};
use serde::Serialize;

use crate::merge::proto_of;
use crate::view::View;

/// The resolved policy of every local endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Local endpoints with their flags.
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// Every policy entry.
    pub entries: BTreeMap<PolicyKey, PolicyValue>,
    /// Per endpoint, what produced its state.
    pub explain: BTreeMap<Ipv4Addr, EndpointExplain>,
    /// Rule IDs (as the datapath reports them in verdict events) and the rules they name.
    pub rules: BTreeMap<u32, String>,
    /// The policies (`namespace/name`) of the view this state was resolved from.
    pub policies: Vec<String>,
}

/// Why an endpoint's policy is what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointExplain {
    /// Address.
    pub ip: Ipv4Addr,
    /// `namespace/pod`.
    pub pod: String,
    /// Its identity.
    pub identity: u32,
    /// Its endpoint ID in the datapath.
    pub endpoint_id: u32,
    /// Ingress is default-deny.
    pub enforce_ingress: bool,
    /// Egress is default-deny.
    pub enforce_egress: bool,
    /// Ingress drops are only audited.
    pub audit_ingress: bool,
    /// Egress drops are only audited.
    pub audit_egress: bool,
    /// The rules whose endpoint selector matches it.
    pub selected_by: Vec<String>,
    /// Its entries, each with the rules that produced it.
    pub entries: Vec<EntryExplain>,
    /// Anything left out, and why.
    pub notes: Vec<String>,
}

/// One policy entry of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryExplain {
    /// `ingress` or `egress`.
    pub direction: &'static str,
    /// The peer identity (0: any).
    pub identity: u32,
    /// The peer identity's cluster, when known.
    pub cluster: Option<String>,
    /// `port/PROTO`, or `any`.
    pub port: String,
    /// `allow`, `deny` or `audit`.
    pub verdict: &'static str,
    /// The rule ID of the winning rule.
    pub rule_id: u32,
    /// Every rule that asked for this entry, winner first.
    pub rules: Vec<String>,
}

/// A peer rule, resolved once for all endpoints.
struct PeerRule {
    direction: Direction,
    deny: bool,
    /// Peer identities (0: any).
    peers: Vec<u32>,
    ports: Vec<PortRule>,
    source: String,
    /// How its entities were mapped, where not as written.
    notes: Vec<String>,
}

/// A policy rule with its peers resolved.
struct ResolvedRule<'a> {
    policy_ns: Option<&'a str>,
    audit: bool,
    selector: &'a EndpointSelector,
    covers: [bool; 2],
    name: String,
    rule_id: u32,
    peer_rules: Vec<PeerRule>,
    /// The policy's notes on this rule (what is not enforced as written).
    notes: Vec<String>,
    /// [ingress, egress]: the rule has `fromRequires`/`toRequires`, not enforced yet.
    requires: [bool; 2],
}

/// FNV-1a: a rule's ID, stable across restarts and nodes (never 0).
pub fn rule_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

fn direction_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

fn protos(p: PolicyProtocol) -> &'static [Proto] {
    match p {
        PolicyProtocol::Tcp => &[Proto::Tcp],
        PolicyProtocol::Udp => &[Proto::Udp],
        PolicyProtocol::Any => &[Proto::Tcp, Proto::Udp],
        PolicyProtocol::Icmp => &[Proto::Icmp],
        PolicyProtocol::Sctp => &[],
    }
}

/// The reserved identity of addresses outside the mesh (what the datapath gives an address
/// its ipcache does not know).
const WORLD: u32 = 2;
/// The reserved identity of this node's addresses (Cilium's `reserved:host`).
pub const HOST: u32 = 1;
/// The reserved identity of every other node's addresses, of any cluster (Cilium's
/// `reserved:remote-node`).
pub const REMOTE_NODE: u32 = 6;

/// The peers of one ingress or egress rule.
struct Peers<'a> {
    selectors: &'a [EndpointSelector],
    entities: &'a [Entity],
    has_ports: bool,
    deny: bool,
}

/// The identities a rule's peer selectors and entities select, and notes on entities that
/// are not enforced as written.
fn select_peers(
    view: &View,
    peers: &Peers<'_>,
    policy_ns: Option<&str>,
    source: &str,
) -> (Vec<u32>, Vec<String>) {
    let mut notes = Vec::new();
    if peers.selectors.is_empty() && peers.entities.is_empty() {
        return (if peers.has_ports { vec![0] } else { Vec::new() }, notes);
    }
    let mut out: BTreeSet<u32> = view
        .identities()
        .iter()
        .filter(|(_, info)| {
            peers.selectors.iter().any(|sel| {
                (sel.mentions_key(CLUSTER_LABEL) || info.cluster == *view.local())
                    && (policy_ns.is_none()
                        || sel.mentions_key(NAMESPACE_LABEL)
                        || info.labels.namespace() == policy_ns)
                    && sel.matches(&info.labels)
            })
        })
        .map(|(id, _)| *id)
        .collect();
    for e in peers.entities {
        match e {
            Entity::All => {
                out.insert(0);
            }
            // Node addresses are in the ipcache as host / remote-node: world is only what
            // is outside the mesh.
            Entity::World | Entity::WorldIpv4 => {
                out.insert(WORLD);
            }
            Entity::Host => {
                out.insert(HOST);
            }
            Entity::RemoteNode => {
                out.insert(REMOTE_NODE);
            }
            // Every endpoint of the local cluster, in any namespace, and the nodes (Cilium's
            // `cluster` includes host and remote-node).
            Entity::Cluster => {
                out.extend(
                    view.identities()
                        .iter()
                        .filter(|(_, info)| info.cluster == *view.local())
                        .map(|(id, _)| *id),
                );
                out.extend([HOST, REMOTE_NODE]);
            }
            Entity::WorldIpv6 => notes.push(format!(
                "{source}: entity world-ipv6 selects nothing: this datapath enforces IPv4 only"
            )),
            Entity::None => {}
            // Addresses of these are not in the ipcache: the datapath sees them as world. An
            // allow for them allows nothing; a deny denies world (fail closed).
            Entity::KubeApiserver
            | Entity::Ingress
            | Entity::Health
            | Entity::Init
            | Entity::Unmanaged => {
                if peers.deny {
                    out.insert(WORLD);
                    notes.push(format!(
                        "{source}: entity {e} is not told apart from world by this datapath \
                         (no address has that identity here); the rule denies world instead"
                    ));
                } else {
                    notes.push(format!(
                        "{source}: entity {e} is not told apart from world by this datapath \
                         (no address has that identity here); left out: the rule allows less"
                    ));
                }
            }
        }
    }
    (out.into_iter().collect(), notes)
}

fn has_ports(rules: &[PortRule]) -> bool {
    rules.iter().any(|r| !r.ports.is_empty())
}

/// Resolves every policy for every local endpoint.
pub fn resolve(view: &View) -> PolicyState {
    let mut state = PolicyState {
        policies: view.policies().keys().cloned().collect(),
        ..PolicyState::default()
    };
    let rules = resolve_rules(view);
    for r in &rules {
        state.rules.insert(r.rule_id, r.name.clone());
    }
    for entry in view.local_endpoints() {
        let IpAddr::V4(ip) = entry.ip else {
            continue;
        };
        let (endpoint, explain, entries) = resolve_endpoint(view, &rules, ip, entry);
        state.endpoints.insert(ip, endpoint);
        state.explain.insert(ip, explain);
        state.entries.extend(entries);
    }
    state
}

/// An entry's peer selectors, entities and ports, whatever its direction.
type EntryParts<'a> = (&'a [EndpointSelector], &'a [Entity], &'a [PortRule]);

fn ingress_entries(l: &[IngressRule]) -> Vec<EntryParts<'_>> {
    l.iter()
        .map(|r| (&r.from_endpoints[..], &r.from_entities[..], &r.to_ports[..]))
        .collect()
}

fn egress_entries(l: &[EgressRule]) -> Vec<EntryParts<'_>> {
    l.iter()
        .map(|r| (&r.to_endpoints[..], &r.to_entities[..], &r.to_ports[..]))
        .collect()
}

fn resolve_rules(view: &View) -> Vec<ResolvedRule<'_>> {
    let mut out = Vec::new();
    for (pkey, policy) in view.policies() {
        let ns = policy.namespace.as_deref();
        for (ri, rule) in policy.rules.iter().enumerate() {
            let name = format!("{pkey} rule {ri}");
            let mut peer_rules = Vec::new();
            let lists = [
                (
                    Direction::Ingress,
                    "ingress",
                    false,
                    ingress_entries(&rule.ingress),
                ),
                (
                    Direction::Ingress,
                    "ingressDeny",
                    true,
                    ingress_entries(&rule.ingress_deny),
                ),
                (
                    Direction::Egress,
                    "egress",
                    false,
                    egress_entries(&rule.egress),
                ),
                (
                    Direction::Egress,
                    "egressDeny",
                    true,
                    egress_entries(&rule.egress_deny),
                ),
            ];
            for (direction, kind, deny, list) in lists {
                for (i, (selectors, entities, ports)) in list.into_iter().enumerate() {
                    let source = format!("{name} {kind}[{i}]");
                    let wanted = Peers {
                        selectors,
                        entities,
                        has_ports: has_ports(ports),
                        deny,
                    };
                    let (peers, notes) = select_peers(view, &wanted, ns, &source);
                    peer_rules.push(PeerRule {
                        direction,
                        deny,
                        peers,
                        ports: ports.to_vec(),
                        source,
                        notes,
                    });
                }
            }
            let prefix = format!("rule {ri} ");
            let notes = policy
                .notes
                .iter()
                .filter_map(|n| n.strip_prefix(&prefix))
                .map(|n| format!("{name} {n}"))
                .collect();
            out.push(ResolvedRule {
                notes,
                requires: [
                    rule.requires_unenforced(clustermesh_model::policy::Direction::Ingress),
                    rule.requires_unenforced(clustermesh_model::policy::Direction::Egress),
                ],
                policy_ns: ns,
                audit: policy.audit,
                selector: &rule.endpoint_selector,
                covers: [
                    rule.covers(clustermesh_model::policy::Direction::Ingress),
                    rule.covers(clustermesh_model::policy::Direction::Egress),
                ],
                rule_id: rule_id(&name),
                name,
                peer_rules,
            });
        }
    }
    out
}

/// The ports of a peer rule for one endpoint (`None`: any port).
/// A port range as aligned blocks: `(first port, k)` for each block of `2^k` ports, the
/// fewest that cover `first..=last` exactly (at most 30).
pub fn port_blocks(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // The largest block that starts at `lo` (aligned) and ends by `hi`.
        let mut k = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1 << k) - 1 > hi {
            k -= 1;
        }
        out.push((
            u16::try_from(lo).unwrap_or(u16::MAX),
            u8::try_from(k).unwrap_or(0),
        ));
        lo += 1 << k;
    }
    out
}

/// The ports of a peer rule for one endpoint (`None`: any port): `(port, protocol, k)`,
/// `k` > 0 for an aligned block of `2^k` ports starting at `port` (a range's piece).
fn resolve_ports(
    view: &View,
    pr: &PeerRule,
    endpoint: &IpCacheEntry,
    notes: &mut Vec<String>,
) -> Vec<Option<(u16, Proto, u8)>> {
    if !has_ports(&pr.ports) {
        return vec![None];
    }
    let mut out = BTreeSet::new();
    for pp in pr.ports.iter().flat_map(|r| &r.ports) {
        let wanted = protos(pp.protocol);
        if wanted.is_empty() {
            notes.push(format!("{}: SCTP ports are not enforced", pr.source));
            continue;
        }
        match (pp.port_spec(), pp.range()) {
            (Ok(PortSpec::Number(_)), Ok(Some((first, last)))) if last > first => {
                for (start, k) in port_blocks(first, last) {
                    out.extend(wanted.iter().map(|proto| Some((start, *proto, k))));
                }
            }
            (Ok(PortSpec::Number(p)), _) => {
                out.extend(wanted.iter().map(|proto| Some((p, *proto, 0))));
            }
            (Ok(PortSpec::Named(name)), _) => {
                let found = named_ports(view, pr, endpoint, &name, wanted);
                if found.is_empty() {
                    notes.push(format!("{}: named port {name:?} not found", pr.source));
                }
                out.extend(found.into_iter().map(|(p, proto)| Some((p, proto, 0))));
            }
            (Err(e), _) => notes.push(format!("{}: {e}", pr.source)),
        }
    }
    out.into_iter().collect()
}

fn named_ports(
    view: &View,
    pr: &PeerRule,
    endpoint: &IpCacheEntry,
    name: &str,
    wanted: &[Proto],
) -> BTreeSet<(u16, Proto)> {
    let pick = |e: &IpCacheEntry| -> Vec<(u16, Proto)> {
        e.named_ports
            .iter()
            .filter(|np| np.name == name)
            .filter_map(|np| proto_of(np.protocol).map(|p| (np.port, p)))
            .filter(|(_, p)| wanted.contains(p))
            .collect()
    };
    match pr.direction {
        Direction::Ingress => pick(endpoint).into_iter().collect(),
        Direction::Egress => {
            let any = pr.peers.contains(&0);
            view.named_port_ips()
                .iter()
                .filter_map(|ip| view.ipcache_entry(ip))
                .filter(|(_, e)| any || pr.peers.binary_search(&e.identity.get()).is_ok())
                .flat_map(|(_, e)| pick(e))
                .collect()
        }
    }
}

fn resolve_endpoint(
    view: &View,
    rules: &[ResolvedRule<'_>],
    ip: Ipv4Addr,
    entry: &IpCacheEntry,
) -> (Endpoint, EndpointExplain, BTreeMap<PolicyKey, PolicyValue>) {
    let identity = entry.identity.get();
    let endpoint_id = u32::from(ip);
    let empty = LabelSet::new();
    let mut explain = EndpointExplain {
        ip,
        pod: format!("{}/{}", entry.namespace, entry.pod_name),
        identity,
        endpoint_id,
        enforce_ingress: false,
        enforce_egress: false,
        audit_ingress: false,
        audit_egress: false,
        selected_by: Vec::new(),
        entries: Vec::new(),
        notes: Vec::new(),
    };
    let labels = match view.identity(identity) {
        Some(info) => &info.labels,
        None => {
            explain.notes.push(format!(
                "identity {identity} is unknown: no label selects it"
            ));
            &empty
        }
    };
    let ns = labels.namespace().unwrap_or(&entry.namespace);
    let selecting: Vec<&ResolvedRule<'_>> = rules
        .iter()
        .filter(|r| r.policy_ns.is_none_or(|p| p == ns) && r.selector.matches(labels))
        .collect();
    // [ingress, egress]: (enforced by a non-audit rule, covered by an audit rule).
    let mut enforce = [false; 2];
    let mut audited = [false; 2];
    // Directions whose allows are all left out: a selecting rule's requirement on every
    // allowed peer is not enforced yet (fail closed).
    let mut requires: [Option<&str>; 2] = [None; 2];
    for r in &selecting {
        for (slot, has) in requires.iter_mut().zip(r.requires) {
            if has && slot.is_none() {
                *slot = Some(&r.name);
            }
        }
    }
    for (d, by) in requires.iter().enumerate() {
        if let Some(by) = by {
            explain.notes.push(format!(
                "every {} allow left out: {by} has {}, which is not enforced yet",
                ["ingress", "egress"][d],
                ["fromRequires", "toRequires"][d]
            ));
        }
    }
    for r in &selecting {
        explain.selected_by.push(r.name.clone());
        explain.notes.extend(r.notes.iter().cloned());
        for pr in &r.peer_rules {
            explain.notes.extend(pr.notes.iter().cloned());
        }
        for d in 0..2 {
            if r.covers[d] {
                if r.audit {
                    audited[d] = true;
                } else {
                    enforce[d] = true;
                }
            }
        }
    }
    let mut flags = EndpointFlags {
        enforce_ingress: enforce[0],
        enforce_egress: enforce[1],
        audit_ingress: !enforce[0] && audited[0],
        audit_egress: !enforce[1] && audited[1],
        port_blocks: 0,
    };
    // Per key: (rank, verdict, rule id, sources).
    let mut merged: BTreeMap<PolicyKey, (u8, Verdict, u32, Vec<String>)> = BTreeMap::new();
    for r in &selecting {
        for pr in &r.peer_rules {
            let d = usize::from(pr.direction == Direction::Egress);
            if !pr.deny && requires[d].is_some() {
                continue;
            }
            if r.audit && enforce[d] {
                explain.notes.push(format!(
                    "{}: audit-mode rule left out, {} is enforced by another policy",
                    pr.source,
                    direction_name(pr.direction)
                ));
                continue;
            }
            let verdict = match (r.audit, pr.deny) {
                (true, _) => Verdict::Audit,
                (false, true) => Verdict::Deny,
                (false, false) => Verdict::Allow,
            };
            let rank = match verdict {
                Verdict::Deny => 3,
                Verdict::Allow => 2,
                Verdict::Audit => 1,
            };
            for port in resolve_ports(view, pr, entry, &mut explain.notes) {
                for peer in &pr.peers {
                    let key = PolicyKey {
                        endpoint_id,
                        identity: *peer,
                        port: port.map(|(p, proto, _)| (p, proto)),
                        direction: pr.direction,
                        port_block: port.map_or(0, |(_, _, k)| k),
                    };
                    let slot = merged
                        .entry(key)
                        .or_insert((0, verdict, r.rule_id, Vec::new()));
                    if rank > slot.0 {
                        slot.0 = rank;
                        slot.1 = verdict;
                        slot.2 = r.rule_id;
                        slot.3.insert(0, pr.source.clone());
                    } else {
                        slot.3.push(pr.source.clone());
                    }
                }
            }
        }
    }
    // The block sizes the datapath must probe for this endpoint.
    for key in merged.keys().filter(|k| k.port_block > 0) {
        flags.port_blocks |= 1 << (key.port_block - 1);
    }
    let mut entries = BTreeMap::new();
    for (key, (_, verdict, rule_id, sources)) in merged {
        explain.entries.push(EntryExplain {
            direction: direction_name(key.direction),
            identity: key.identity,
            cluster: view.identity(key.identity).map(|i| i.cluster.to_string()),
            port: key.port.map_or_else(
                || "any".to_owned(),
                |(p, proto)| match key.port_block {
                    0 => format!("{p}/{}", proto.name()),
                    k => format!("{p}-{}/{}", u32::from(p) + (1u32 << k) - 1, proto.name()),
                },
            ),
            verdict: match verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
                Verdict::Audit => "audit",
            },
            rule_id,
            rules: sources,
        });
        entries.insert(key, PolicyValue { verdict, rule_id });
    }
    explain.enforce_ingress = flags.enforce_ingress;
    explain.enforce_egress = flags.enforce_egress;
    explain.audit_ingress = flags.audit_ingress;
    explain.audit_egress = flags.audit_egress;
    let endpoint = Endpoint {
        endpoint_id,
        identity,
        flags,
        cluster_id: view.local_id().get(),
    };
    (endpoint, explain, entries)
}
