use super::*;
use crate::cluster::ClusterName;

fn labels(s: &str) -> LabelSet {
    s.parse().unwrap()
}

fn selector(json: &str) -> EndpointSelector {
    serde_json::from_str(json).unwrap()
}

#[test]
fn selector_matching_table() {
    let web = labels("k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:tier=front;");
    let cases: &[(&str, bool)] = &[
        (r#"{}"#, true),
        (r#"{"matchLabels":{"app":"web"}}"#, true),
        (r#"{"matchLabels":{"k8s:app":"web"}}"#, true),
        (r#"{"matchLabels":{"any:app":"web"}}"#, true),
        (r#"{"matchLabels":{"container:app":"web"}}"#, false),
        (r#"{"matchLabels":{"app":"db"}}"#, false),
        (r#"{"matchLabels":{"app":"web","tier":"back"}}"#, false),
        (
            r#"{"matchLabels":{"io.cilium.k8s.policy.cluster":"c1"}}"#,
            true,
        ),
        (
            r#"{"matchLabels":{"io.cilium.k8s.policy.cluster":"c2"}}"#,
            false,
        ),
        (
            r#"{"matchExpressions":[{"key":"app","operator":"In","values":["db","web"]}]}"#,
            true,
        ),
        (
            r#"{"matchExpressions":[{"key":"app","operator":"In","values":["db"]}]}"#,
            false,
        ),
        (
            r#"{"matchExpressions":[{"key":"app","operator":"NotIn","values":["db"]}]}"#,
            true,
        ),
        (
            r#"{"matchExpressions":[{"key":"app","operator":"NotIn","values":["web"]}]}"#,
            false,
        ),
        (
            r#"{"matchExpressions":[{"key":"zone","operator":"NotIn","values":["a"]}]}"#,
            true,
        ),
        (
            r#"{"matchExpressions":[{"key":"tier","operator":"Exists"}]}"#,
            true,
        ),
        (
            r#"{"matchExpressions":[{"key":"zone","operator":"Exists"}]}"#,
            false,
        ),
        (
            r#"{"matchExpressions":[{"key":"zone","operator":"DoesNotExist"}]}"#,
            true,
        ),
        (
            r#"{"matchExpressions":[{"key":"k8s:tier","operator":"DoesNotExist"}]}"#,
            false,
        ),
        (
            r#"{"matchLabels":{"app":"web"},"matchExpressions":[{"key":"tier","operator":"In","values":["back"]}]}"#,
            false,
        ),
    ];
    for (json, want) in cases {
        let sel = selector(json);
        assert_eq!(sel.validate(), Ok(()), "{json}");
        assert_eq!(sel.matches(&web), *want, "{json}");
    }
}

#[test]
fn selector_validation_rejects() {
    let cases: &[(&str, PolicyError)] = &[
        (
            r#"{"matchLabels":{"a b":"x"}}"#,
            PolicyError::SelectorKey("a b".into()),
        ),
        (
            r#"{"matchLabels":{"app":"a b"}}"#,
            PolicyError::SelectorValue("a b".into()),
        ),
        (
            r#"{"matchExpressions":[{"key":"app","operator":"In"}]}"#,
            PolicyError::Expression {
                key: "app".into(),
                operator: SelectorOperator::In,
                problem: "needs values",
            },
        ),
        (
            r#"{"matchExpressions":[{"key":"app","operator":"Exists","values":["x"]}]}"#,
            PolicyError::Expression {
                key: "app".into(),
                operator: SelectorOperator::Exists,
                problem: "takes no values",
            },
        ),
    ];
    for (json, want) in cases {
        assert_eq!(selector(json).validate(), Err(want.clone()), "{json}");
    }
    assert!(
        serde_json::from_str::<EndpointSelector>(
            r#"{"matchExpressions":[{"key":"a","operator":"Like"}]}"#
        )
        .is_err()
    );
}

#[test]
fn mentions_cluster_label() {
    let c = crate::labels::CLUSTER_LABEL;
    assert!(selector(r#"{"matchLabels":{"io.cilium.k8s.policy.cluster":"c2"}}"#).mentions_key(c));
    assert!(
        selector(r#"{"matchExpressions":[{"key":"k8s:io.cilium.k8s.policy.cluster","operator":"Exists"}]}"#)
            .mentions_key(c)
    );
    assert!(!selector(r#"{"matchLabels":{"app":"web"}}"#).mentions_key(c));
}

#[test]
fn cilium_policy_json_parses_and_validates() {
    let json = r#"{
        "name": "allow-web",
        "namespace": "prod",
        "audit": false,
        "rules": [{
            "endpointSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web", "io.cilium.k8s.policy.cluster": "c2"}}],
                         "toPorts": [{"ports": [{"port": "5432", "protocol": "TCP"}, {"port": "metrics"}]}]}],
            "egressDeny": [{"toEndpoints": [{}]}]
        }]
    }"#;
    let p: NetworkPolicy = serde_json::from_str(json).unwrap();
    assert_eq!(p.validate(), Ok(()));
    let rule = &p.rules[0];
    assert!(rule.covers(Direction::Ingress));
    assert!(rule.covers(Direction::Egress));
    let ports = &rule.ingress[0].to_ports[0].ports;
    assert_eq!(ports[0].port_spec(), Ok(PortSpec::Number(5432)));
    assert_eq!(ports[1].port_spec(), Ok(PortSpec::Named("metrics".into())));
    assert_eq!(ports[1].protocol, PolicyProtocol::Any);
    let back: NetworkPolicy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(back, p);
    let c1 = ClusterName::new("c1").unwrap();
    let c2 = ClusterName::new("c2").unwrap();
    let web_c2 = LabelSet::workload(&c2, "prod", [("app", "web")]).unwrap();
    let web_c1 = LabelSet::workload(&c1, "prod", [("app", "web")]).unwrap();
    let peer = &rule.ingress[0].from_endpoints[0];
    assert!(peer.matches(&web_c2));
    assert!(!peer.matches(&web_c1));
}

#[test]
fn port_rules() {
    let pp = |port: &str| PortProtocol {
        port: port.into(),
        protocol: PolicyProtocol::Tcp,
        end_port: None,
    };
    assert_eq!(pp("80").port_spec(), Ok(PortSpec::Number(80)));
    assert_eq!(pp("0").port_spec(), Err(PolicyError::PortZero));
    assert_eq!(
        pp("65536").port_spec(),
        Err(PolicyError::Port("65536".into()))
    );
    assert_eq!(pp("").port_spec(), Err(PolicyError::Port(String::new())));
    assert_eq!(
        pp("HTTP").port_spec(),
        Err(PolicyError::Port("HTTP".into()))
    );
    let bad = NetworkPolicy {
        namespace: None,
        name: "p".into(),
        audit: true,
        rules: vec![PolicyRule {
            egress: vec![EgressRule {
                to_ports: vec![PortRule {
                    ports: vec![pp("0")],
                }],
                ..EgressRule::default()
            }],
            ..PolicyRule::default()
        }],
        notes: vec![],
    };
    assert_eq!(bad.validate(), Err(PolicyError::PortZero));
    let bad_ns = NetworkPolicy {
        namespace: Some("Prod".into()),
        rules: vec![],
        ..bad
    };
    assert!(matches!(bad_ns.validate(), Err(PolicyError::Name(_))));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn selector() -> impl Strategy<Value = EndpointSelector> {
        let op = prop_oneof![
            Just(SelectorOperator::In),
            Just(SelectorOperator::NotIn),
            Just(SelectorOperator::Exists),
            Just(SelectorOperator::DoesNotExist),
        ];
        (
            proptest::collection::btree_map("(k8s:)?[a-z]{1,8}", "[a-z0-9]{0,8}", 0..3),
            proptest::collection::vec(
                (
                    "[a-z]{1,8}",
                    op,
                    proptest::collection::vec("[a-z]{1,5}", 1..3),
                ),
                0..3,
            ),
        )
            .prop_map(|(match_labels, exprs)| EndpointSelector {
                match_labels,
                match_expressions: exprs
                    .into_iter()
                    .map(|(key, operator, values)| SelectorRequirement {
                        key,
                        values: match operator {
                            SelectorOperator::In | SelectorOperator::NotIn => values,
                            _ => vec![],
                        },
                        operator,
                    })
                    .collect(),
            })
    }

    fn ports() -> impl Strategy<Value = Vec<PortRule>> {
        proptest::collection::vec(
            proptest::collection::vec((1u16.., 0..4u8, 0u16..100), 1..3).prop_map(|ps| PortRule {
                ports: ps
                    .into_iter()
                    .map(|(p, proto, span)| PortProtocol {
                        port: p.to_string(),
                        protocol: [
                            PolicyProtocol::Tcp,
                            PolicyProtocol::Udp,
                            PolicyProtocol::Sctp,
                            PolicyProtocol::Any,
                        ][usize::from(proto)],
                        end_port: (span > 50).then(|| p.saturating_add(span)),
                    })
                    .collect(),
            }),
            0..2,
        )
    }

    fn rule() -> impl Strategy<Value = PolicyRule> {
        (
            selector(),
            proptest::collection::vec(selector(), 0..2),
            ports(),
            proptest::collection::vec(selector(), 0..2),
            any::<bool>(),
        )
            .prop_map(|(endpoint_selector, peers, to_ports, deny_peers, egress)| {
                let mut r = PolicyRule {
                    endpoint_selector,
                    ..PolicyRule::default()
                };
                if egress {
                    r.egress = vec![EgressRule {
                        to_endpoints: peers,
                        to_ports,
                        ..EgressRule::default()
                    }];
                    r.egress_deny = vec![EgressRule {
                        to_endpoints: deny_peers,
                        to_entities: vec![Entity::World, Entity::Cluster],
                        to_ports: vec![],
                    }];
                } else {
                    r.ingress = vec![IngressRule {
                        from_endpoints: peers,
                        to_ports,
                        ..IngressRule::default()
                    }];
                    r.ingress_deny = vec![IngressRule {
                        from_endpoints: deny_peers,
                        from_entities: vec![Entity::All, Entity::RemoteNode],
                        to_ports: vec![],
                    }];
                }
                r
            })
    }

    proptest! {
        #[test]
        fn policies_round_trip_and_validate(
            ns in proptest::option::of("[a-z]{1,10}"), name in "[a-z]{1,10}", audit in any::<bool>(),
            rules in proptest::collection::vec(rule(), 1..3),
        ) {
            let p = NetworkPolicy { namespace: ns, name, audit, rules, notes: vec!["rule 0 a note".into()] };
            prop_assert_eq!(p.validate(), Ok(()));
            let json = serde_json::to_vec(&p).unwrap();
            prop_assert_eq!(serde_json::from_slice::<NetworkPolicy>(&json).unwrap(), p);
        }
    }
}

#[test]
fn port_ranges_need_a_numbered_port_at_or_below_their_end() {
    let pp = |port: &str, protocol, end_port| PortProtocol {
        port: port.into(),
        protocol,
        end_port,
    };
    let tcp = PolicyProtocol::Tcp;
    assert_eq!(pp("4096", tcp, Some(8191)).range(), Ok(Some((4096, 8191))));
    assert_eq!(pp("80", tcp, None).range(), Ok(Some((80, 80))));
    assert_eq!(pp("80", tcp, Some(80)).range(), Ok(Some((80, 80))));
    assert_eq!(pp("http", tcp, None).range(), Ok(None));
    assert_eq!(pp("8", PolicyProtocol::Icmp, None).range(), Ok(None));
    for bad in [
        pp("90", tcp, Some(80)),
        pp("http", tcp, Some(80)),
        pp("8", PolicyProtocol::Icmp, Some(9)),
    ] {
        assert!(
            matches!(bad.range(), Err(PolicyError::PortRange(..))),
            "{bad:?}"
        );
    }
}
