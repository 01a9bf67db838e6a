use super::*;
use proptest::prelude::*;

fn c(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap()
}

fn round_trip(o: &Object) -> Object {
    Object::try_from(&v1::Upsert::from(o)).unwrap()
}

fn service() -> ClusterService {
    let tcp = |p| L4Addr::new(Protocol::Tcp, p).unwrap();
    ClusterService {
        cluster: c("c1"),
        namespace: "prod".into(),
        name: "web".into(),
        frontends: BTreeMap::from([(
            "10.96.0.10".parse().unwrap(),
            BTreeMap::from([("http".to_owned(), tcp(80))]),
        )]),
        backends: BTreeMap::from([
            (
                "10.1.0.5".parse().unwrap(),
                BTreeMap::from([("http".to_owned(), tcp(8080))]),
            ),
            (
                "10.1.0.6".parse().unwrap(),
                BTreeMap::from([("http".to_owned(), tcp(8080))]),
            ),
        ]),
        backend_conditions: BTreeMap::from([(
            "10.1.0.6".parse().unwrap(),
            BackendConditions {
                ready: false,
                serving: true,
                terminating: true,
            },
        )]),
        labels: BTreeMap::from([("team".to_owned(), "a".to_owned())]),
        selector: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
        include_external: true,
        shared: true,
        cluster_id: ClusterId::new(1, MaxConnectedClusters::C255).unwrap(),
        affinity: Affinity::Remote,
    }
}

#[test]
fn every_object_kind_round_trips() {
    let policy: NetworkPolicy = serde_json_policy();
    let objects = vec![
        Object::Identity {
            cluster: c("c1"),
            id: Identity::new(65_600).unwrap(),
            labels: LabelSet::workload(&c("c1"), "prod", [("app", "web")]).unwrap(),
        },
        Object::IpCache {
            cluster: c("c1"),
            entry: IpCacheEntry {
                ip: "10.1.0.5".parse().unwrap(),
                identity: Identity::new(65_600).unwrap(),
                host_ip: Some("192.0.2.1".parse().unwrap()),
                namespace: "prod".into(),
                pod_name: "web-0".into(),
                named_ports: vec![NamedPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
            },
        },
        Object::Node(Node {
            name: "n1".into(),
            cluster: c("c1"),
            cluster_id: ClusterId::new(1, MaxConnectedClusters::C255).unwrap(),
            addresses: vec![NodeAddress {
                kind: "InternalIP".into(),
                ip: "192.0.2.1".parse().unwrap(),
            }],
            ipv4_alloc_cidr: Some("10.1.0.0/24".parse().unwrap()),
            labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
        }),
        Object::Service(service()),
        Object::Policy {
            cluster: c("c1"),
            policy,
        },
        Object::ClusterStatus(ClusterStatus {
            cluster: c("c2"),
            connected: true,
            ready: false,
            withdrawn: true,
            keep_last_backends: false,
            failures: 3,
            last_failure_time: 1_700_000_000,
        }),
    ];
    for o in &objects {
        assert_eq!(&round_trip(o), o);
    }
    assert_eq!(objects[3].reference().name, "prod/web");
    assert_eq!(objects[0].reference().name, "65600");
}

fn serde_json_policy() -> NetworkPolicy {
    NetworkPolicy {
        namespace: Some("prod".into()),
        name: "allow-web".into(),
        audit: true,
        rules: vec![PolicyRule {
            endpoint_selector: EndpointSelector {
                match_labels: BTreeMap::from([("app".to_owned(), "db".to_owned())]),
                match_expressions: vec![SelectorRequirement {
                    key: "tier".into(),
                    operator: SelectorOperator::In,
                    values: vec!["a".into(), "b".into()],
                }],
            },
            ingress: vec![IngressRule {
                from_endpoints: vec![EndpointSelector::default()],
                from_entities: vec![Entity::World, Entity::KubeApiserver],
                to_ports: vec![
                    PortRule {
                        ports: vec![PortProtocol {
                            port: "5432".into(),
                            protocol: PolicyProtocol::Tcp,
                            end_port: Some(5440),
                        }],
                    },
                    PortRule {
                        ports: vec![PortProtocol {
                            port: "metrics".into(),
                            protocol: PolicyProtocol::Any,
                            end_port: None,
                        }],
                    },
                ],
            }],
            egress_deny: vec![EgressRule {
                to_endpoints: vec![EndpointSelector::default()],
                to_entities: vec![Entity::All],
                to_ports: vec![],
            }],
            unenforced_requires: vec!["egress".into()],
            ..PolicyRule::default()
        }],
        notes: vec!["rule 0 egress[0]: toCIDR not enforced yet".into()],
    }
}

#[test]
fn malformed_messages_are_refused_with_the_field() {
    use v1::upsert::Object as W;
    let cases: Vec<(W, &str)> = vec![
        (
            W::Identity(v1::Identity {
                cluster: "c1".into(),
                id: 1 << 24,
                labels: vec![],
            }),
            "identity.id",
        ),
        (
            W::Identity(v1::Identity {
                cluster: "C1".into(),
                id: 5,
                labels: vec![],
            }),
            "identity.cluster",
        ),
        (
            W::Identity(v1::Identity {
                cluster: "c1".into(),
                id: 70_000,
                labels: vec![v1::Label {
                    source: "k8s".into(),
                    key: "a;b".into(),
                    value: String::new(),
                }],
            }),
            "identity.labels",
        ),
        (
            W::Ipcache(v1::IpCacheEntry {
                cluster: "c1".into(),
                ip: "10.0.0.300".into(),
                ..Default::default()
            }),
            "ipcache.ip",
        ),
        (
            W::Node(v1::Node {
                name: "n".into(),
                cluster: "c1".into(),
                cluster_id: 0,
                ..Default::default()
            }),
            "node.cluster_id",
        ),
        (
            W::Service(v1::Service {
                cluster: "c1".into(),
                cluster_id: 1,
                frontends: vec![v1::Frontend {
                    ip: "10.96.0.1".into(),
                    ports: vec![v1::ServicePort {
                        name: "x".into(),
                        protocol: "TCP".into(),
                        port: 70_000,
                    }],
                }],
                ..Default::default()
            }),
            "service.frontends.ports",
        ),
        (
            W::Service(v1::Service {
                cluster: "c1".into(),
                cluster_id: 1,
                affinity: "nearest".into(),
                ..Default::default()
            }),
            "service.affinity",
        ),
        (
            W::Policy(v1::NetworkPolicy {
                cluster: "c1".into(),
                name: "Bad/Name".into(),
                ..Default::default()
            }),
            "policy",
        ),
        (
            W::Policy(v1::NetworkPolicy {
                cluster: "c1".into(),
                name: "p".into(),
                rules: vec![v1::PolicyRule {
                    egress: vec![v1::PeerRule {
                        entities: vec!["everything".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            "policy.entities",
        ),
    ];
    for (object, field) in cases {
        let err = Object::try_from(&v1::Upsert {
            object: Some(object),
        })
        .unwrap_err();
        assert_eq!(err.field, field, "{err}");
    }
    assert_eq!(
        Object::try_from(&v1::Upsert { object: None })
            .unwrap_err()
            .field,
        "upsert.object"
    );
}

proptest! {
    #[test]
    fn ipcache_entries_round_trip(ip in any::<[u8; 4]>(), id in 0u32..(1 << 24), port in 1u16.., host in proptest::option::of(any::<[u8; 16]>())) {
        let o = Object::IpCache {
            cluster: c("c9"),
            entry: IpCacheEntry {
                ip: IpAddr::from(ip),
                identity: Identity::new(id).unwrap(),
                host_ip: host.map(IpAddr::from),
                namespace: "ns".into(),
                pod_name: "p".into(),
                named_ports: vec![NamedPort { name: "p".into(), port, protocol: Protocol::Udp }],
            },
        };
        prop_assert_eq!(round_trip(&o), o);
    }
}

/// An allow rule with entities and no label selector is sent with a selector that matches no
/// identity: an agent that predates entities (and ignores the field) then allows nothing,
/// instead of reading "no peers" as every peer. Agents that know entities drop it; denies
/// are sent without it (to an old agent they deny every peer).
#[test]
fn an_entities_only_allow_allows_nothing_to_an_agent_that_ignores_entities() {
    use v1::upsert::Object as W;
    let mut policy = serde_json_policy();
    let port = PortRule {
        ports: vec![PortProtocol {
            port: "443".into(),
            protocol: PolicyProtocol::Tcp,
            end_port: None,
        }],
    };
    policy.rules[0].egress = vec![EgressRule {
        to_entities: vec![Entity::World],
        to_ports: vec![port.clone()],
        ..EgressRule::default()
    }];
    policy.rules[0].egress_deny = vec![EgressRule {
        to_entities: vec![Entity::All],
        to_ports: vec![port],
        ..EgressRule::default()
    }];
    let object = Object::Policy {
        cluster: c("c1"),
        policy,
    };
    let wire = v1::Upsert::from(&object);
    assert_eq!(Object::try_from(&wire).unwrap(), object, "round trip");
    let Some(W::Policy(p)) = &wire.object else {
        panic!("not a policy")
    };
    let allow = &p.rules[0].egress[0];
    assert_eq!(allow.entities, ["world"]);
    assert_eq!(allow.peers.len(), 1);
    // What an old agent makes of the placeholder: a selector no identity matches.
    let old = selector_from_wire(&allow.peers[0]).unwrap();
    old.validate().unwrap();
    for labels in [
        LabelSet::workload(&c("c1"), "prod", [("app", "web")]).unwrap(),
        LabelSet::workload(&c("c2"), "kube-system", []).unwrap(),
    ] {
        assert!(!old.matches(&labels));
    }
    assert!(
        p.rules[0].egress_deny[0].peers.is_empty(),
        "a deny goes as it is"
    );
}
