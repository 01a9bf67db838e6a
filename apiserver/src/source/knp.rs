//! Kubernetes `networking.k8s.io/v1` NetworkPolicy, translated into the policy model as
//! Cilium translates it (one rule; the policy's namespace; default-deny in each of its
//! `policyTypes`).
//!
//! - `podSelector` selects the endpoints, in the policy's namespace;
//! - a peer's `podSelector` selects pods in the policy's namespace (an `In` on
//!   `io.kubernetes.pod.namespace`, so that a pod selector naming that key cannot widen it),
//!   or in the namespaces of its `namespaceSelector`; only namespace selectors on
//!   `kubernetes.io/metadata.name` (a namespace's name, which every namespace carries) are
//!   enforced, since namespace labels are not identity labels yet; `{}` is every namespace;
//!   like Cilium's, a pod selector without the cluster label selects the local cluster only;
//! - no `from`/`to` is every peer, no `ports` every port; a port without a protocol is TCP
//!   (the API server's default);
//! - `endPort` ranges are enforced;
//! - what cannot be enforced yet (`ipBlock`, other namespace labels, a protocol
//!   without a port) fails closed as in `clustermesh_model::policy::cilium`: the part is left
//!   out, and an entry with nothing enforceable left allows nothing; each is a note.

use clustermesh_model::labels::NAMESPACE_LABEL;
use clustermesh_model::policy::{
    EgressRule, EndpointSelector, Entity, IngressRule, NetworkPolicy, PolicyProtocol, PolicyRule,
    PortProtocol, PortRule, SelectorOperator, SelectorRequirement,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy as K8sPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::k8s::{Problem, name, namespace};

/// The label every namespace carries with its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

const LEFT_OUT: &str = "the rule is left out: it allows nothing (its direction stays default-deny)";

/// Translates a NetworkPolicy; an invalid one (a bad selector, protocol, port or policy
/// type) is refused with the reason.
pub fn network_policy(np: &K8sPolicy) -> Result<NetworkPolicy, Problem> {
    let ns = namespace(&np.metadata)?;
    let name = name(&np.metadata)?;
    let spec = np.spec.as_ref().ok_or("spec is missing")?;
    // As the API server defaults it: Ingress, and Egress when there are egress rules.
    let types: Vec<String> = match &spec.policy_types {
        Some(t) if !t.is_empty() => t.clone(),
        _ => {
            let mut t = vec!["Ingress".to_owned()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress".to_owned());
            }
            t
        }
    };
    if let Some(bad) = types.iter().find(|t| *t != "Ingress" && *t != "Egress") {
        return Err(format!("policyTypes {bad:?} is neither Ingress nor Egress"));
    }
    let mut rule = PolicyRule {
        // Absent or `{}`: every pod of the namespace.
        endpoint_selector: selector(&spec.pod_selector.clone().unwrap_or_default())?,
        ..PolicyRule::default()
    };
    let mut notes = Vec::new();
    if types.iter().any(|t| t == "Ingress") {
        let rules = spec.ingress.as_deref().unwrap_or_default();
        if rules.is_empty() {
            // Default-deny: nothing allowed.
            rule.ingress.push(IngressRule::default());
        }
        for (i, r) in rules.iter().enumerate() {
            let at = format!("ingress[{i}]");
            let e = entry(&ns, r.from.as_deref(), r.ports.as_deref(), &at, &mut notes)?;
            rule.ingress.push(IngressRule {
                from_endpoints: e.0,
                from_entities: e.1,
                to_ports: e.2,
            });
        }
    }
    if types.iter().any(|t| t == "Egress") {
        let rules = spec.egress.as_deref().unwrap_or_default();
        if rules.is_empty() {
            rule.egress.push(EgressRule::default());
        }
        for (i, r) in rules.iter().enumerate() {
            let at = format!("egress[{i}]");
            let e = entry(&ns, r.to.as_deref(), r.ports.as_deref(), &at, &mut notes)?;
            rule.egress.push(EgressRule {
                to_endpoints: e.0,
                to_entities: e.1,
                to_ports: e.2,
            });
        }
    }
    let p = NetworkPolicy {
        namespace: Some(ns),
        name,
        audit: false,
        rules: vec![rule],
        notes: notes.into_iter().map(|n| format!("rule 0 {n}")).collect(),
    };
    p.validate().map_err(|e| e.to_string())?;
    Ok(p)
}

/// Peers, entities and ports of one entry.
type Entry = (Vec<EndpointSelector>, Vec<Entity>, Vec<PortRule>);

fn entry(
    ns: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    at: &str,
    notes: &mut Vec<String>,
) -> Result<Entry, Problem> {
    let mut lost = Vec::new();
    let (mut selectors, mut entities) = (Vec::new(), Vec::new());
    match peers {
        None | Some([]) => entities.push(Entity::All),
        Some(peers) => {
            for (pi, p) in peers.iter().enumerate() {
                match peer(ns, p)? {
                    Ok(sel) => selectors.push(sel),
                    Err(what) => lost.push(format!("peer {pi} {what}")),
                }
            }
        }
    }
    let peers_lost_all = entities.is_empty() && selectors.is_empty();
    let mut kept = Vec::new();
    let given = ports.unwrap_or_default();
    for (pi, p) in given.iter().enumerate() {
        match port(p)? {
            Ok(pp) => kept.push(pp),
            Err(what) => lost.push(format!("port {pi} {what}")),
        }
    }
    let ports_lost_all = !given.is_empty() && kept.is_empty();
    if peers_lost_all || ports_lost_all {
        notes.push(format!(
            "{at}: {} not enforced yet; {LEFT_OUT}",
            lost.join(", ")
        ));
        return Ok((Vec::new(), Vec::new(), Vec::new()));
    }
    if !lost.is_empty() {
        notes.push(format!(
            "{at}: {} not enforced yet; left out: this rule allows less",
            lost.join(", ")
        ));
    }
    let to_ports = if kept.is_empty() {
        Vec::new()
    } else {
        vec![PortRule { ports: kept }]
    };
    Ok((selectors, entities, to_ports))
}

/// A peer as an endpoint selector; `Ok(Err(what))` for one that cannot be enforced yet.
fn peer(ns: &str, p: &NetworkPolicyPeer) -> Result<Result<EndpointSelector, String>, Problem> {
    if p.ip_block.is_some() {
        return Ok(Err("ipBlock".to_owned()));
    }
    let mut sel = match &p.pod_selector {
        Some(s) => selector(s)?,
        None if p.namespace_selector.is_some() => EndpointSelector::default(),
        None => return Err("a peer needs podSelector, namespaceSelector or ipBlock".into()),
    };
    let namespaces = match &p.namespace_selector {
        None => SelectorRequirement {
            key: NAMESPACE_LABEL.to_owned(),
            operator: SelectorOperator::In,
            values: vec![ns.to_owned()],
        },
        Some(nsel) => match namespace_requirement(nsel)? {
            Ok(r) => r,
            Err(what) => return Ok(Err(what)),
        },
    };
    sel.match_expressions.push(namespaces);
    Ok(Ok(sel))
}

/// A namespace selector as one requirement on the namespace label.
fn namespace_requirement(
    s: &LabelSelector,
) -> Result<Result<SelectorRequirement, String>, Problem> {
    let labels = s.match_labels.clone().unwrap_or_default();
    let exprs = s.match_expressions.clone().unwrap_or_default();
    let other = labels
        .keys()
        .chain(exprs.iter().map(|e| &e.key))
        .find(|k| k.as_str() != NAMESPACE_NAME_LABEL);
    if let Some(k) = other {
        return Ok(Err(format!("namespaceSelector on {k:?}")));
    }
    let mut reqs: Vec<SelectorRequirement> = labels
        .into_values()
        .map(|v| SelectorRequirement {
            key: NAMESPACE_LABEL.to_owned(),
            operator: SelectorOperator::In,
            values: vec![v],
        })
        .collect();
    for e in exprs {
        reqs.push(SelectorRequirement {
            key: NAMESPACE_LABEL.to_owned(),
            operator: operator(&e.operator)?,
            values: e.values.unwrap_or_default(),
        });
    }
    match reqs.len() {
        // `{}`: every namespace.
        0 => Ok(Ok(SelectorRequirement {
            key: NAMESPACE_LABEL.to_owned(),
            operator: SelectorOperator::Exists,
            values: Vec::new(),
        })),
        1 => Ok(Ok(reqs.remove(0))),
        _ => Ok(Err("namespaceSelector with several requirements".to_owned())),
    }
}

fn operator(op: &str) -> Result<SelectorOperator, Problem> {
    Ok(match op {
        "In" => SelectorOperator::In,
        "NotIn" => SelectorOperator::NotIn,
        "Exists" => SelectorOperator::Exists,
        "DoesNotExist" => SelectorOperator::DoesNotExist,
        other => return Err(format!("selector operator {other:?} is not valid")),
    })
}

/// A Kubernetes label selector as an endpoint selector (the same shape).
fn selector(s: &LabelSelector) -> Result<EndpointSelector, Problem> {
    let mut out = EndpointSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for e in s.match_expressions.iter().flatten() {
        out.match_expressions.push(SelectorRequirement {
            key: e.key.clone(),
            operator: operator(&e.operator)?,
            values: e.values.clone().unwrap_or_default(),
        });
    }
    out.validate().map_err(|e| e.to_string())?;
    Ok(out)
}

/// A port; `Ok(Err(what))` for one that cannot be enforced yet.
fn port(p: &NetworkPolicyPort) -> Result<Result<PortProtocol, String>, Problem> {
    let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => PolicyProtocol::Tcp,
        "UDP" => PolicyProtocol::Udp,
        "SCTP" => PolicyProtocol::Sctp,
        other => return Err(format!("protocol {other:?} is not TCP, UDP or SCTP")),
    };
    let port = match &p.port {
        None => {
            let name = match protocol {
                PolicyProtocol::Udp => "UDP",
                PolicyProtocol::Sctp => "SCTP",
                _ => "TCP",
            };
            return Ok(Err(format!("every {name} port (no port)")));
        }
        Some(IntOrString::Int(n)) => {
            let n = u16::try_from(*n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("port {n} is not a port number"))?;
            n.to_string()
        }
        Some(IntOrString::String(s)) => s.clone(),
    };
    let pp = PortProtocol {
        port,
        protocol,
        end_port: None,
    };
    pp.port_spec().map_err(|e| e.to_string())?;
    match p.end_port {
        None => Ok(Ok(pp)),
        Some(end) => {
            let start: i64 = pp
                .port
                .parse()
                .map_err(|_| format!("endPort {end} on the named port {:?}", pp.port))?;
            let end = i64::from(end);
            if end == start {
                Ok(Ok(pp))
            } else if end > start && end <= 65_535 {
                Ok(Ok(PortProtocol {
                    end_port: u16::try_from(end).ok(),
                    ..pp
                }))
            } else {
                Err(format!("endPort {end} is not a valid end for port {start}"))
            }
        }
    }
}

#[cfg(test)]
mod tests;
