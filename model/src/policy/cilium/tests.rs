use serde_json::json;

use super::*;

fn translate(rule: Value) -> Result<Translated, String> {
    let r: CiliumRule = serde_json::from_value(rule).map_err(|e| e.to_string())?;
    r.translate().map_err(|e| e.to_string())
}

fn sel(app: &str) -> EndpointSelector {
    EndpointSelector {
        match_labels: [("app".to_owned(), app.to_owned())].into(),
        match_expressions: vec![],
    }
}

fn tcp(port: &str) -> PortRule {
    PortRule {
        ports: vec![PortProtocol {
            port: port.into(),
            protocol: PolicyProtocol::Tcp,
            end_port: None,
        }],
    }
}

#[test]
fn supported_rules_translate_unchanged_without_notes() {
    let t = translate(json!({
        "endpointSelector": {"matchLabels": {"app": "web"}},
        "description": "d",
        "labels": [{"key": "k", "value": "v"}],
        "egress": [{"toEntities": ["cluster", "world"], "toPorts": [{"ports": [{"port": "53", "protocol": "UDP", "endPort": 53}]}]}],
        "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "db"}}]}],
        "ingress": [{"toPorts": [{"ports": [{"port": "53"}], "rules": {"dns": [{"matchPattern": "*"}]}}]}],
    }))
    .unwrap();
    assert_eq!(
        t.rule.egress[0].to_entities,
        [Entity::Cluster, Entity::World]
    );
    assert_eq!(
        t.rule.egress[0].to_ports[0].ports[0].protocol,
        PolicyProtocol::Udp
    );
    assert_eq!(t.rule.ingress_deny[0].from_endpoints, [sel("db")]);
    assert_eq!(t.rule.ingress[0].to_ports[0].ports[0].port, "53");
    assert_eq!(
        t.notes,
        [
            "ingress[0] toPorts[0]: DNS rules allow every name (matchPattern \"*\"): enforced as \
          the L4 rule (no DNS visibility)"
        ]
    );
}

#[test]
fn an_allow_loses_what_it_cannot_enforce_and_never_widens() {
    // Some peers and ports left: the rest stays, it allows less.
    let t = translate(json!({
        "endpointSelector": {},
        "egress": [{
            "toEndpoints": [{"matchLabels": {"app": "db"}}],
            "toCIDR": ["10.0.0.0/8"],
            "toPorts": [
                {"ports": [{"port": "8080", "protocol": "TCP"}, {"port": "9000", "endPort": 9100, "protocol": "TCP"}]},
                {"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}},
            ],
            "icmps": [{"fields": [{"type": 8}, {"family": "IPv6", "type": 128}]}],
        }],
    }))
    .unwrap();
    assert_eq!(t.rule.egress[0].to_endpoints, [sel("db")]);
    assert!(t.rule.egress[0].to_entities.is_empty());
    // ICMP (IPv4) types are ports of protocol ICMP.
    let echo = PortRule {
        ports: vec![PortProtocol {
            port: "8".into(),
            protocol: PolicyProtocol::Icmp,
            end_port: None,
        }],
    };
    // A port range is kept as a range.
    let mut ports = tcp("8080");
    ports.ports.push(PortProtocol {
        port: "9000".into(),
        protocol: PolicyProtocol::Tcp,
        end_port: Some(9100),
    });
    assert_eq!(t.rule.egress[0].to_ports, [ports, echo]);
    assert_eq!(
        t.notes,
        [
            "egress[0]: icmps IPv6 type 128 not enforced: this datapath does not enforce IPv6 \
             at all",
            "egress[0]: toCIDR, toPorts[1] L7 rules not enforced yet; left out: this rule \
             allows less",
        ]
    );

    // Nothing enforceable left of its peers, of its ports, or a condition on its peers: the
    // rule becomes `{}` (allows nothing, the direction stays default-deny).
    let cases = [
        (
            json!({"toCIDR": ["0.0.0.0/0"], "toPorts": [{"ports": [{"port": "80"}]}]}),
            "toCIDR",
        ),
        (json!({"toFQDNs": [{"matchName": "x.example"}]}), "toFQDNs"),
        (
            json!({"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "0", "protocol": "TCP"}]}]}),
            "toPorts[0] every TCP port (port 0)",
        ),
        (
            json!({"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "80"}], "rules": {"dns": [{"matchName": "a.example"}]}}]}),
            "toPorts[0] L7 rules",
        ),
        (
            json!({"toEndpoints": [{}], "authentication": {"mode": "required"}}),
            "authentication",
        ),
    ];
    for (egress, what) in cases {
        let t = translate(json!({"endpointSelector": {}, "egress": [egress]})).unwrap();
        assert_eq!(t.rule.egress, [EgressRule::default()], "{what}");
        assert!(t.rule.covers(super::super::Direction::Egress), "{what}");
        assert_eq!(
            t.notes,
            [format!(
                "egress[0]: {what} not enforced yet; the rule is left out: it allows nothing \
                 (its direction stays default-deny)"
            )],
        );
    }
}

#[test]
fn a_deny_denies_more_when_it_cannot_be_enforced_as_written() {
    let t = translate(json!({
        "endpointSelector": {},
        "ingressDeny": [
            {"fromCIDR": ["192.0.2.0/24"], "toPorts": [{"ports": [{"port": "22", "protocol": "TCP"}]}]},
            {"fromEndpoints": [{"matchLabels": {"app": "db"}}], "toPorts": [{"ports": [{"port": "1000", "endPort": 2000, "protocol": "TCP"}]}]},
            {"fromEndpoints": [{"matchLabels": {"app": "db"}}], "toPorts": [{"ports": [{"port": "80", "protocol": "VRRP"}]}]},
            {"fromEndpoints": [{"matchLabels": {"app": "db"}}], "fromRequires": [{"matchLabels": {"env": "prod"}}]},
            {"fromCIDRSet": [{"cidr": "0.0.0.0/0"}], "icmps": [{"fields": [{"type": "EchoRequest"}]}]},
        ],
    }))
    .unwrap();
    let d = &t.rule.ingress_deny;
    // An unsupported peer: every peer, on its ports.
    assert!(d[0].from_endpoints.is_empty());
    assert_eq!(d[0].from_entities, [Entity::All]);
    assert_eq!(d[0].to_ports, [tcp("22")]);
    // A port range is denied as a range.
    assert_eq!(d[1].to_ports[0].ports[0].end_port, Some(2000));
    // An unsupported port part: every port of its peers.
    assert_eq!(d[2].from_endpoints, [sel("db")]);
    assert!(d[2].to_ports.is_empty());
    // A condition on the peers: dropped, so the deny covers more of them.
    assert_eq!(d[3].from_endpoints, [sel("db")]);
    // An unsupported peer with ICMP: every peer, that ICMP type.
    assert_eq!(d[4].from_entities, [Entity::All]);
    assert_eq!(d[4].to_ports[0].ports[0].port, "8");
    assert_eq!(d[4].to_ports[0].ports[0].protocol, PolicyProtocol::Icmp);
    assert_eq!(
        t.notes,
        [
            "ingressDeny[0]: fromCIDR not enforced yet; this rule denies every peer instead",
            "ingressDeny[2]: toPorts[0] protocol VRRP not enforced yet; this rule denies every \
             port instead",
            "ingressDeny[3]: fromRequires not enforced yet; this rule denies its peers without \
             that condition (it denies more)",
            "ingressDeny[4]: fromCIDRSet not enforced yet; this rule denies every peer instead",
        ]
    );
}

#[test]
fn unknown_fields_and_bad_values_are_refused() {
    let bad = [
        // A typo must not change a policy.
        (
            json!({"endpointSelector": {}, "egress": [{"toEndpoint": [{}]}]}),
            "unknown field",
        ),
        (
            json!({"endpointSelector": {}, "ingress": [{"toEndpoints": [{}]}]}),
            "unknown field",
        ),
        (
            json!({"endpointSelector": {}, "nodeSelector": {}}),
            "unknown field",
        ),
        (
            json!({"endpointSelector": {}, "egress": [{"toEntities": ["everything"]}]}),
            "unknown variant",
        ),
        (
            json!({"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "HTTP"}]}]}]}),
            "toPorts protocol \"HTTP\"",
        ),
        (
            json!({"endpointSelector": {}, "egress": [{"toPorts": [{"ports": [{"port": "-1"}]}]}]}),
            "neither a port number nor a valid port name",
        ),
    ];
    for (rule, want) in bad {
        let err = translate(rule.clone()).unwrap_err();
        assert!(err.contains(want), "{rule}: {err}");
    }
}

#[test]
fn enable_default_deny_false_is_noted() {
    let t = translate(json!({
        "endpointSelector": {},
        "enableDefaultDeny": {"egress": false, "ingress": true},
        "egress": [{"toEndpoints": [{}]}],
    }))
    .unwrap();
    assert_eq!(t.notes.len(), 1);
    assert!(t.notes[0].starts_with("enableDefaultDeny.egress: false is not enforced yet"));
}

/// What Cilium accepts is never refused (a refused policy vanishes, and its denies with it):
/// port 0, endPort not past the port, protocols the datapath does not enforce, upper-case
/// port names, `toPorts` entries without ports.
#[test]
fn what_cilium_accepts_is_translated_not_refused() {
    let t = translate(json!({
        "endpointSelector": {},
        "egress": [
            // Port 0 with ANY: every port.
            {"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "0"}]}, {"ports": [{"port": "1", "endPort": 9}]}]},
            // endPort 0 or before the port is ignored (Cilium); a named port is lower-cased.
            {"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "90", "endPort": 80, "protocol": "TCP"}, {"port": "HTTP-8080", "endPort": 0, "protocol": "TCP"}]}]},
            // Port 0 of one protocol, ICMP: not enforced yet; nothing else left.
            {"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "0", "protocol": "TCP"}, {"port": "8", "protocol": "ICMP"}]}]},
            // No ports: matches nothing, as in Cilium (not "every port").
            {"toEndpoints": [{}], "toPorts": [{}]},
            {"toEndpoints": [{}], "toPorts": [{"rules": {"dns": [{"matchPattern": "*"}]}}]},
        ],
        "egressDeny": [
            {"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "0", "protocol": "UDP"}]}]},
            {"toEndpoints": [{}], "toPorts": [{}]},
        ],
    }))
    .unwrap();
    let e = &t.rule.egress;
    assert!(
        e[0].to_ports.is_empty() && e[0].to_endpoints.len() == 1,
        "every port"
    );
    let ports: Vec<&str> = e[1].to_ports[0]
        .ports
        .iter()
        .map(|p| p.port.as_str())
        .collect();
    assert_eq!(ports, ["90", "http-8080"]);
    for (i, r) in e.iter().enumerate().skip(2) {
        assert_eq!(*r, EgressRule::default(), "egress[{i}] allows nothing");
    }
    let d = &t.rule.egress_deny;
    assert!(
        d[0].to_ports.is_empty() && d[0].to_endpoints.len() == 1,
        "every port denied"
    );
    assert_eq!(d[1], EgressRule::default(), "denies nothing, as in Cilium");
    assert_eq!(
        t.notes,
        [
            "egress[2]: toPorts[0] every TCP port (port 0), toPorts[0] protocol ICMP not \
             enforced yet; the rule is left out: it allows nothing (its direction stays \
             default-deny)",
            "egress[3] toPorts[0]: lists no ports, so it matches nothing (as in Cilium)",
            "egress[4] toPorts[0]: lists no ports, so it matches nothing (as in Cilium)",
            "egressDeny[0]: toPorts[0] every UDP port (port 0) not enforced yet; this rule \
             denies every port instead",
            "egressDeny[1] toPorts[0]: lists no ports, so it matches nothing (as in Cilium)",
        ]
    );
}

/// `fromRequires`/`toRequires` constrain every allow of the endpoints a rule selects (across
/// policies, in Cilium): not enforced yet, the rule marks its direction, and the agent leaves
/// every allow of it out for those endpoints.
#[test]
fn requires_mark_the_direction_for_the_agent() {
    let t = translate(json!({
        "endpointSelector": {},
        "egress": [{"toEndpoints": [{}], "toRequires": [{"matchLabels": {"env": "prod"}}]}],
        "ingress": [{"fromEndpoints": [{}]}],
    }))
    .unwrap();
    assert_eq!(t.rule.unenforced_requires, ["egress"]);
    assert!(t.rule.requires_unenforced(super::super::Direction::Egress));
    assert!(!t.rule.requires_unenforced(super::super::Direction::Ingress));
    assert_eq!(
        t.notes,
        [
            "egress[0]: toRequires not enforced yet; every allow of this direction is left out for \
          the endpoints this rule selects (they allow nothing; their direction stays \
          default-deny)"
        ]
    );
}
