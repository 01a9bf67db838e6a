//! CiliumNetworkPolicy rules as users write them, and their translation into the subset the
//! datapath enforces ([`PolicyRule`]).
//!
//! Every field of Cilium's rule types is read. What the project cannot enforce yet (CIDR
//! peers, FQDNs, services, nodes and groups as peers, `fromRequires`/`toRequires`, ICMP in
//! `toPorts` and IPv6 ICMP types, L7 rules, mutual authentication) never makes a policy
//! disappear, and is never silently dropped: each part is translated so that
//! the result **fails closed**, and a note on the policy says what was done:
//! - in an allow rule the part is left out; where leaving it out would make the rule allow
//!   more (its only peers, its only ports, an L7 filter on a port) the whole rule becomes
//!   `{}`, which allows nothing and still makes its direction default-deny;
//! - in a deny rule, an unsupported peer makes it deny every peer on its ports, an
//!   unsupported port part makes it deny every port of its peers, and an unsupported
//!   condition on the peers (`fromRequires`) is dropped, so it denies those peers without it.
//!
//! A field Cilium does not have is refused, as before: a typo must not change a policy.
//! DNS rules that allow every name (`matchPattern: "*"`) are enforced as the L4 rule they
//! are attached to (only the DNS proxy's visibility is missing).

use serde::Deserialize;
use serde_json::Value;

use super::{
    Direction, EgressRule, EndpointSelector, Entity, IngressRule, PolicyError, PolicyProtocol,
    PolicyRule, PortProtocol, PortRule,
};

/// One rule (`spec`, or an entry of `specs`) as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumRule {
    /// The endpoints the rule applies to.
    pub endpoint_selector: EndpointSelector,
    /// Allowed ingress.
    #[serde(default)]
    pub ingress: Vec<CiliumIngressRule>,
    /// Allowed egress.
    #[serde(default)]
    pub egress: Vec<CiliumEgressRule>,
    /// Denied ingress.
    #[serde(default)]
    pub ingress_deny: Vec<CiliumIngressRule>,
    /// Denied egress.
    #[serde(default)]
    pub egress_deny: Vec<CiliumEgressRule>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Rule labels: metadata, they select nothing.
    #[serde(default)]
    pub labels: Option<Value>,
    /// `enableDefaultDeny`: only `true` (the default) is enforced.
    #[serde(default)]
    pub enable_default_deny: Option<DefaultDeny>,
}

/// `enableDefaultDeny`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultDeny {
    /// Ingress.
    #[serde(default)]
    pub ingress: Option<bool>,
    /// Egress.
    #[serde(default)]
    pub egress: Option<bool>,
}

/// An `ingress` or `ingressDeny` entry as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumIngressRule {
    /// Peers by labels.
    #[serde(default)]
    pub from_endpoints: Vec<EndpointSelector>,
    /// Peers by entity.
    #[serde(default)]
    pub from_entities: Vec<Entity>,
    /// Peers by CIDR (not enforced yet).
    #[serde(default, rename = "fromCIDR")]
    pub from_cidr: Vec<Value>,
    /// Peers by CIDR, with exceptions (not enforced yet).
    #[serde(default, rename = "fromCIDRSet")]
    pub from_cidr_set: Vec<Value>,
    /// Extra requirements on every peer (not enforced yet).
    #[serde(default)]
    pub from_requires: Vec<Value>,
    /// Peers by cloud group (not enforced yet).
    #[serde(default)]
    pub from_groups: Vec<Value>,
    /// Peers by node labels (not enforced yet).
    #[serde(default)]
    pub from_nodes: Vec<Value>,
    /// Ports.
    #[serde(default)]
    pub to_ports: Vec<CiliumPortRule>,
    /// ICMP types (IPv4 enforced, by type; IPv6 noted).
    #[serde(default)]
    pub icmps: Vec<Value>,
    /// Mutual authentication (not enforced).
    #[serde(default)]
    pub authentication: Option<Value>,
}

/// An `egress` or `egressDeny` entry as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumEgressRule {
    /// Peers by labels.
    #[serde(default)]
    pub to_endpoints: Vec<EndpointSelector>,
    /// Peers by entity.
    #[serde(default)]
    pub to_entities: Vec<Entity>,
    /// Peers by CIDR (not enforced yet).
    #[serde(default, rename = "toCIDR")]
    pub to_cidr: Vec<Value>,
    /// Peers by CIDR, with exceptions (not enforced yet).
    #[serde(default, rename = "toCIDRSet")]
    pub to_cidr_set: Vec<Value>,
    /// Extra requirements on every peer (not enforced yet).
    #[serde(default)]
    pub to_requires: Vec<Value>,
    /// Peers by Kubernetes service (not enforced yet).
    #[serde(default)]
    pub to_services: Vec<Value>,
    /// Peers by DNS name (not enforced yet).
    #[serde(default, rename = "toFQDNs")]
    pub to_fqdns: Vec<Value>,
    /// Peers by cloud group (not enforced yet).
    #[serde(default)]
    pub to_groups: Vec<Value>,
    /// Peers by node labels (not enforced yet).
    #[serde(default)]
    pub to_nodes: Vec<Value>,
    /// Ports.
    #[serde(default)]
    pub to_ports: Vec<CiliumPortRule>,
    /// ICMP types (IPv4 enforced, by type; IPv6 noted).
    #[serde(default)]
    pub icmps: Vec<Value>,
    /// Mutual authentication (not enforced).
    #[serde(default)]
    pub authentication: Option<Value>,
}

/// A `toPorts` entry as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumPortRule {
    /// The ports.
    #[serde(default)]
    pub ports: Vec<CiliumPort>,
    /// L7 rules (only DNS rules with `matchPattern: "*"` are enforced, at L4).
    #[serde(default)]
    pub rules: Option<Value>,
    /// TLS SNI names (not enforced).
    #[serde(default)]
    pub server_names: Vec<Value>,
    /// An Envoy listener (not enforced).
    #[serde(default)]
    pub listener: Option<Value>,
    /// TLS origination (not enforced).
    #[serde(default, rename = "originatingTLS")]
    pub originating_tls: Option<Value>,
    /// TLS termination (not enforced).
    #[serde(default, rename = "terminatingTLS")]
    pub terminating_tls: Option<Value>,
}

/// A `toPorts[].ports[]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumPort {
    /// A number or a port name.
    pub port: String,
    /// The protocol: `TCP`, `UDP`, `SCTP`, `ANY` (the default), or one not enforced yet
    /// (`ICMP`, `ICMPV6`, `VRRP`, `IGMP`).
    #[serde(default)]
    pub protocol: String,
    /// The end of a port range (ignored when not past `port`, as Cilium does).
    #[serde(default)]
    pub end_port: Option<i64>,
}

/// A rule as written, translated; `notes` says what is not enforced as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// The enforced rule.
    pub rule: PolicyRule,
    /// One line per part that is not enforced as written.
    pub notes: Vec<String>,
}

/// Peers and ports of one entry, direction-neutral.
struct Entry<'a> {
    endpoints: &'a [EndpointSelector],
    entities: &'a [Entity],
    /// Field names of peers that are not enforced yet, with their number of items.
    unsupported_peers: Vec<&'static str>,
    /// `fromRequires` / `toRequires`: conditions on every allowed peer of the endpoints.
    requires: Option<&'static str>,
    /// `authentication`: a condition on this entry's peers.
    authentication: bool,
    ports: &'a [CiliumPortRule],
    icmps: &'a [Value],
}

/// The translated peers and ports of one entry.
struct Out {
    endpoints: Vec<EndpointSelector>,
    entities: Vec<Entity>,
    ports: Vec<PortRule>,
}

impl CiliumRule {
    /// Validates and translates the rule (see the module documentation).
    pub fn translate(self) -> Result<Translated, PolicyError> {
        let mut notes = Vec::new();
        let mut rule = PolicyRule {
            endpoint_selector: self.endpoint_selector,
            description: self.description,
            ..PolicyRule::default()
        };
        for (i, r) in self.ingress.iter().enumerate() {
            let o = entry(
                &ingress_entry(r),
                false,
                &format!("ingress[{i}]"),
                &mut notes,
            )?;
            rule.ingress.push(IngressRule {
                from_endpoints: o.endpoints,
                from_entities: o.entities,
                to_ports: o.ports,
            });
        }
        for (i, r) in self.ingress_deny.iter().enumerate() {
            let o = entry(
                &ingress_entry(r),
                true,
                &format!("ingressDeny[{i}]"),
                &mut notes,
            )?;
            rule.ingress_deny.push(IngressRule {
                from_endpoints: o.endpoints,
                from_entities: o.entities,
                to_ports: o.ports,
            });
        }
        if self.ingress.iter().any(|r| !r.from_requires.is_empty()) {
            rule.unenforced_requires
                .push(Direction::Ingress.to_string());
        }
        if self.egress.iter().any(|r| !r.to_requires.is_empty()) {
            rule.unenforced_requires.push(Direction::Egress.to_string());
        }
        for (i, r) in self.egress.iter().enumerate() {
            let o = entry(&egress_entry(r), false, &format!("egress[{i}]"), &mut notes)?;
            rule.egress.push(EgressRule {
                to_endpoints: o.endpoints,
                to_entities: o.entities,
                to_ports: o.ports,
            });
        }
        for (i, r) in self.egress_deny.iter().enumerate() {
            let o = entry(
                &egress_entry(r),
                true,
                &format!("egressDeny[{i}]"),
                &mut notes,
            )?;
            rule.egress_deny.push(EgressRule {
                to_endpoints: o.endpoints,
                to_entities: o.entities,
                to_ports: o.ports,
            });
        }
        if let Some(d) = self.enable_default_deny {
            for (dir, v) in [("ingress", d.ingress), ("egress", d.egress)] {
                if v == Some(false) {
                    notes.push(format!(
                        "enableDefaultDeny.{dir}: false is not enforced yet; the rule makes \
                         its endpoints default-deny on {dir} when it has {dir} rules (it \
                         allows less)"
                    ));
                }
            }
        }
        rule.validate()?;
        Ok(Translated { rule, notes })
    }
}

fn ingress_entry(r: &CiliumIngressRule) -> Entry<'_> {
    let mut unsupported_peers = Vec::new();
    for (name, n) in [
        ("fromCIDR", r.from_cidr.len()),
        ("fromCIDRSet", r.from_cidr_set.len()),
        ("fromGroups", r.from_groups.len()),
        ("fromNodes", r.from_nodes.len()),
    ] {
        if n > 0 {
            unsupported_peers.push(name);
        }
    }
    let requires = (!r.from_requires.is_empty()).then_some("fromRequires");
    Entry {
        endpoints: &r.from_endpoints,
        entities: &r.from_entities,
        unsupported_peers,
        requires,
        authentication: r.authentication.is_some(),
        ports: &r.to_ports,
        icmps: &r.icmps,
    }
}

fn egress_entry(r: &CiliumEgressRule) -> Entry<'_> {
    let mut unsupported_peers = Vec::new();
    for (name, n) in [
        ("toCIDR", r.to_cidr.len()),
        ("toCIDRSet", r.to_cidr_set.len()),
        ("toServices", r.to_services.len()),
        ("toFQDNs", r.to_fqdns.len()),
        ("toGroups", r.to_groups.len()),
        ("toNodes", r.to_nodes.len()),
    ] {
        if n > 0 {
            unsupported_peers.push(name);
        }
    }
    let requires = (!r.to_requires.is_empty()).then_some("toRequires");
    Entry {
        endpoints: &r.to_endpoints,
        entities: &r.to_entities,
        unsupported_peers,
        requires,
        authentication: r.authentication.is_some(),
        ports: &r.to_ports,
        icmps: &r.icmps,
    }
}

/// Whether an L7 `rules` value is DNS rules that allow every name.
fn dns_allows_every_name(rules: &Value) -> bool {
    let Some(obj) = rules.as_object() else {
        return false;
    };
    let Some(dns) = obj.get("dns").and_then(Value::as_array) else {
        return false;
    };
    obj.len() == 1
        && !dns.is_empty()
        && dns.iter().any(|d| {
            d.as_object().is_some_and(|m| {
                m.len() == 1 && m.get("matchPattern").and_then(Value::as_str) == Some("*")
            })
        })
}

/// The ports of one entry, translated.
#[derive(Default)]
struct Ports {
    /// Port rules with the ports that are enforced as written.
    kept: Vec<PortRule>,
    /// A port `0` with protocol `ANY`: every port.
    any_port: bool,
    /// What could not be enforced.
    lost: Vec<String>,
}

/// A protocol as written: the model's, or the name of one not enforced yet.
fn protocol(p: &str) -> Result<Result<PolicyProtocol, &'static str>, PolicyError> {
    Ok(Ok(match p {
        "" | "ANY" => PolicyProtocol::Any,
        "TCP" => PolicyProtocol::Tcp,
        "UDP" => PolicyProtocol::Udp,
        "SCTP" => PolicyProtocol::Sctp,
        "ICMP" => return Ok(Err("ICMP")),
        "ICMPV6" => return Ok(Err("ICMPV6")),
        "VRRP" => return Ok(Err("VRRP")),
        "IGMP" => return Ok(Err("IGMP")),
        other => return Err(PolicyError::Protocol(other.to_owned())),
    }))
}

fn ports(
    rules: &[CiliumPortRule],
    at: &str,
    notes: &mut Vec<String>,
) -> Result<Ports, PolicyError> {
    let mut out = Ports::default();
    for (pi, pr) in rules.iter().enumerate() {
        let mut l7 = Vec::new();
        match &pr.rules {
            None => {}
            Some(r) if r.is_null() => {}
            Some(r) if dns_allows_every_name(r) && pr.ports.is_empty() => {}
            Some(r) if dns_allows_every_name(r) => notes.push(format!(
                "{at} toPorts[{pi}]: DNS rules allow every name (matchPattern \"*\"): \
                 enforced as the L4 rule (no DNS visibility)"
            )),
            Some(_) => l7.push("L7 rules"),
        }
        if !pr.server_names.is_empty() {
            l7.push("serverNames");
        }
        if pr.listener.is_some() {
            l7.push("listener");
        }
        if pr.originating_tls.is_some() || pr.terminating_tls.is_some() {
            l7.push("TLS");
        }
        if !l7.is_empty() {
            out.lost.push(format!("toPorts[{pi}] {}", l7.join(", ")));
            continue;
        }
        if pr.ports.is_empty() {
            notes.push(format!(
                "{at} toPorts[{pi}]: lists no ports, so it matches nothing (as in Cilium)"
            ));
            continue;
        }
        let mut kept = Vec::new();
        for p in &pr.ports {
            let proto = match protocol(&p.protocol)? {
                Ok(proto) => proto,
                Err(name) => {
                    out.lost.push(format!("toPorts[{pi}] protocol {name}"));
                    continue;
                }
            };
            // Cilium lower-cases port names.
            let pp = PortProtocol {
                port: p.port.to_ascii_lowercase(),
                protocol: proto,
                end_port: None,
            };
            if pp.port.bytes().all(|b| b == b'0') && !pp.port.is_empty() {
                // Port 0: every port of the protocol.
                if proto == PolicyProtocol::Any {
                    out.any_port = true;
                } else {
                    out.lost.push(format!(
                        "toPorts[{pi}] every {} port (port 0)",
                        proto_name(proto)
                    ));
                }
                continue;
            }
            let spec = pp.port_spec()?;
            match (p.end_port, spec) {
                // Cilium ignores an endPort that is not past the port, and on a named port.
                (Some(end), super::PortSpec::Number(start)) if end > i64::from(start) => {
                    kept.push(PortProtocol {
                        end_port: Some(u16::try_from(end.min(65_535)).unwrap_or(u16::MAX)),
                        ..pp
                    });
                }
                _ => kept.push(pp),
            }
        }
        if !kept.is_empty() {
            out.kept.push(PortRule { ports: kept });
        }
    }
    Ok(out)
}

fn proto_name(p: PolicyProtocol) -> &'static str {
    match p {
        PolicyProtocol::Tcp => "TCP",
        PolicyProtocol::Udp => "UDP",
        PolicyProtocol::Sctp => "SCTP",
        PolicyProtocol::Icmp => "ICMP",
        PolicyProtocol::Any => "ANY",
    }
}

fn entry(e: &Entry<'_>, deny: bool, at: &str, notes: &mut Vec<String>) -> Result<Out, PolicyError> {
    let ports = ports(e.ports, at, notes)?;
    let mut out = Out {
        endpoints: e.endpoints.to_vec(),
        entities: e.entities.to_vec(),
        ports: Vec::new(),
    };
    let nothing = Out {
        endpoints: Vec::new(),
        entities: Vec::new(),
        ports: Vec::new(),
    };
    let not_yet = |what: &[String]| format!("{at}: {} not enforced yet", what.join(", "));
    // toPorts (or icmps) given, and nothing of them matches as written.
    let l4_given = !e.ports.is_empty() || !e.icmps.is_empty();
    let (icmp, icmp_v6) = icmps(e.icmps)?;
    if !icmp_v6.is_empty() {
        notes.push(format!(
            "{at}: icmps {} not enforced: this datapath does not enforce IPv6 at all",
            icmp_v6.join(", ")
        ));
    }
    let mut ports = ports;
    if !icmp.is_empty() {
        ports.kept.push(PortRule { ports: icmp });
    }
    if deny {
        // Fail closed: deny more, never less.
        let conditions: Vec<&str> = e
            .requires
            .into_iter()
            .chain(e.authentication.then_some("authentication"))
            .collect();
        if !conditions.is_empty() {
            notes.push(format!(
                "{at}: {} not enforced yet; this rule denies its peers without that condition \
                 (it denies more)",
                conditions.join(", ")
            ));
        }
        let peers: Vec<String> = e
            .unsupported_peers
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        if !peers.is_empty() {
            notes.push(format!(
                "{}; this rule denies every peer instead",
                not_yet(&peers)
            ));
            out.endpoints.clear();
            out.entities = vec![Entity::All];
        }
        let port_parts = ports.lost;
        if ports.any_port {
            // Every port, as written.
        } else if !port_parts.is_empty() {
            notes.push(format!(
                "{}; this rule denies every port instead",
                not_yet(&port_parts)
            ));
        } else if l4_given && ports.kept.is_empty() {
            // Only port rules without ports: it denies nothing (as in Cilium), and still
            // makes its direction default-deny.
            return Ok(nothing);
        } else {
            out.ports = ports.kept;
        }
        // No ports left means every port; a rule with no peers left denies every peer.
        if out.ports.is_empty() && out.endpoints.is_empty() && out.entities.is_empty() {
            out.entities = vec![Entity::All];
        }
        return Ok(out);
    }
    // Allow: leave out, and never let leaving out widen the rule.
    let peers_lost_all =
        !e.unsupported_peers.is_empty() && e.endpoints.is_empty() && e.entities.is_empty();
    let ports_lost_all = l4_given && !ports.any_port && ports.kept.is_empty();
    let mut parts: Vec<String> = e
        .unsupported_peers
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    if !ports.any_port {
        parts.extend(ports.lost.iter().cloned());
    }
    if let Some(requires) = e.requires {
        // Cilium adds the requirement to every allow of the endpoints the rule selects,
        // across policies; the agent leaves all of those allows out instead.
        notes.push(format!(
            "{}; every allow of this direction is left out for the endpoints this rule \
             selects (they allow nothing; their direction stays default-deny)",
            not_yet(&[requires.to_owned()])
        ));
    }
    if e.authentication {
        parts.insert(0, "authentication".to_owned());
    }
    if e.authentication || peers_lost_all || ports_lost_all {
        if !parts.is_empty() {
            notes.push(format!("{}; {LEFT_OUT}", not_yet(&parts)));
        }
        return Ok(nothing);
    }
    if !parts.is_empty() {
        notes.push(format!(
            "{}; left out: this rule allows less",
            not_yet(&parts)
        ));
    }
    out.ports = if ports.any_port {
        Vec::new()
    } else {
        ports.kept
    };
    Ok(out)
}

/// ICMP type names, as Cilium accepts them (IPv4).
const ICMP_TYPES: [(&str, u8); 14] = [
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

/// `icmps[].fields[]`: the IPv4 types as ICMP "ports", and the IPv6 ones (not enforced) for
/// the note.
fn icmps(list: &[Value]) -> Result<(Vec<PortProtocol>, Vec<String>), PolicyError> {
    let bad = |v: &Value| PolicyError::IcmpType(v.to_string());
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for rule in list {
        let fields = rule
            .get("fields")
            .and_then(Value::as_array)
            .ok_or_else(|| bad(rule))?;
        for f in fields {
            let family = f.get("family").and_then(Value::as_str).unwrap_or("IPv4");
            let ty = f.get("type").ok_or_else(|| bad(f))?;
            match family {
                "IPv4" => {
                    let n = match ty {
                        Value::Number(n) => n.as_u64().and_then(|n| u8::try_from(n).ok()),
                        Value::String(s) => ICMP_TYPES
                            .iter()
                            .find(|(name, _)| name == s)
                            .map(|(_, n)| *n)
                            .or_else(|| s.parse().ok()),
                        _ => None,
                    }
                    .ok_or_else(|| bad(ty))?;
                    v4.push(PortProtocol {
                        port: n.to_string(),
                        protocol: PolicyProtocol::Icmp,
                        end_port: None,
                    });
                }
                "IPv6" => v6.push(format!("IPv6 type {}", ty.to_string().trim_matches('"'))),
                _ => return Err(PolicyError::IcmpType(format!("family {family:?}"))),
            }
        }
    }
    Ok((v4, v6))
}

const LEFT_OUT: &str = "the rule is left out: it allows nothing (its direction stays default-deny)";

#[cfg(test)]
mod tests;
