use super::*;

fn c(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap()
}

#[test]
fn keys_have_cilium_layout() {
    let cases: Vec<(Key, &str)> = vec![
        (
            Key::LocalService {
                namespace: "prod".into(),
                name: "web".into(),
            },
            "clustermesh/local/services/v1/prod/web",
        ),
        (
            Key::ClusterConfig { cluster: c("c1") },
            "cilium/cluster-config/c1",
        ),
        (
            Key::Identity {
                id: Identity::new(65_537).unwrap(),
            },
            "cilium/state/identities/v1/id/65537",
        ),
        (
            Key::IpCache {
                ip: "10.1.0.5".parse().unwrap(),
            },
            "cilium/state/ip/v1/default/10.1.0.5",
        ),
        (
            Key::IpCache {
                ip: "fd00::5".parse().unwrap(),
            },
            "cilium/state/ip/v1/default/fd00::5",
        ),
        (
            Key::Node {
                cluster: c("c1"),
                name: "n1.z".into(),
            },
            "cilium/state/nodes/v1/c1/n1.z",
        ),
        (
            Key::Service {
                cluster: c("c1"),
                namespace: "prod".into(),
                name: "web".into(),
            },
            "cilium/state/services/v1/c1/prod/web",
        ),
        (
            Key::Synced {
                cluster: c("c1"),
                kind: ExportKind::IpCache,
            },
            "cilium/synced/c1/cilium/state/ip/v1",
        ),
        (
            Key::Cached {
                remote: c("c2"),
                object: CachedObject::Identity(Identity::new(131_073).unwrap()),
            },
            "cilium/cache/identities/v1/c2/id/131073",
        ),
        (
            Key::Cached {
                remote: c("c2"),
                object: CachedObject::IpCache("10.2.0.1".parse().unwrap()),
            },
            "cilium/cache/ip/v1/c2/10.2.0.1",
        ),
        (
            Key::Cached {
                remote: c("c2"),
                object: CachedObject::Node("n2".into()),
            },
            "cilium/cache/nodes/v1/c2/n2",
        ),
        (
            Key::Cached {
                remote: c("c2"),
                object: CachedObject::Service {
                    namespace: "prod".into(),
                    name: "web".into(),
                },
            },
            "cilium/cache/services/v1/c2/prod/web",
        ),
        (
            Key::Policy {
                namespace: Some("prod".into()),
                name: "p1".into(),
            },
            "clustermesh/local/policies/prod/p1",
        ),
        (
            Key::Policy {
                namespace: None,
                name: "p1".into(),
            },
            "clustermesh/local/clusterwide-policies/p1",
        ),
    ];
    for (key, text) in cases {
        assert_eq!(key.to_string(), text);
        assert_eq!(Key::parse(text), Ok(key), "{text}");
    }
}

#[test]
fn prefixes_contain_their_keys() {
    let c1 = c("c1");
    for kind in ExportKind::ALL {
        let key = match kind {
            ExportKind::Identities => Key::Identity {
                id: Identity::new(70_000).unwrap(),
            },
            ExportKind::IpCache => Key::IpCache {
                ip: "10.0.0.1".parse().unwrap(),
            },
            ExportKind::Nodes => Key::Node {
                cluster: c1.clone(),
                name: "n".into(),
            },
            ExportKind::Services => Key::Service {
                cluster: c1.clone(),
                namespace: "a".into(),
                name: "b".into(),
            },
        };
        assert!(
            key.to_string().starts_with(&kind.state_prefix(&c1)),
            "{kind}"
        );
        assert_eq!(key.export_kind(), Some(kind));
        assert_eq!(
            Key::parse(&kind.synced_key(&c1)),
            Ok(Key::Synced {
                cluster: c1.clone(),
                kind
            })
        );
    }
    // One remote's cache prefix never contains another remote's keys, even with shared
    // name prefixes.
    assert!(!"cilium/cache/nodes/v1/c10/n".starts_with(&ExportKind::Nodes.cache_prefix(&c1)));
}

#[test]
fn malformed_keys_are_rejected() {
    let unknown = [
        "",
        "cilium/",
        "cilium/state/identities/v2/id/5",
        "cilium/state/services/v1/c1/prod",
        "cilium/state/nodes/v1/c1",
        "cilium/synced/c1/cilium/state/policies/v1",
        "cilium/cache/widgets/v1/c2/x",
        "cilium/cache/identities/v1/c2/65537",
        "clustermesh/local/policies/p1",
        "etc/passwd",
    ];
    for key in unknown {
        assert_eq!(
            Key::parse(key),
            Err(KeyError::Unknown(key.into())),
            "{key:?}"
        );
    }
    let invalid = [
        "cilium/cluster-config/Default",
        "cilium/cluster-config/default",
        "cilium/state/identities/v1/id/abc",
        "cilium/state/identities/v1/id/16777216",
        "cilium/state/ip/v1/default/10.0.0.300",
        "cilium/state/nodes/v1/c1/a/b",
        "cilium/state/services/v1/c1/prod/web/extra",
        "cilium/state/services/v1/c_1/prod/web",
        "cilium/cache/services/v1/c2/prod/Web",
        "cilium/cache/ip/v1/c2/10.0.0.1/32",
    ];
    for key in invalid {
        let err = Key::parse(key).unwrap_err();
        assert!(!matches!(err, KeyError::Unknown(_)), "{key:?}: {err}");
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    fn cluster() -> impl Strategy<Value = ClusterName> {
        "[a-z][a-z0-9-]{0,10}[a-z0-9]".prop_filter_map("reserved", |s| ClusterName::new(s).ok())
    }

    fn key() -> impl Strategy<Value = Key> {
        let name = "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?";
        prop_oneof![
            cluster().prop_map(|cluster| Key::ClusterConfig { cluster }),
            (0u32..=Identity::MAX).prop_map(|i| Key::Identity {
                id: Identity::new(i).unwrap()
            }),
            // Keys hold Go's text form: an IPv4-mapped address is the IPv4 one.
            any::<u128>().prop_map(|i| Key::IpCache {
                ip: IpAddr::V6(Ipv6Addr::from(i)).to_canonical()
            }),
            (cluster(), name).prop_map(|(cluster, name)| Key::Node { cluster, name }),
            (cluster(), name, name).prop_map(|(cluster, namespace, name)| Key::Service {
                cluster,
                namespace,
                name
            }),
            (cluster(), 0..4usize).prop_map(|(cluster, k)| Key::Synced {
                cluster,
                kind: ExportKind::ALL[k]
            }),
            (cluster(), any::<[u8; 4]>()).prop_map(|(remote, ip)| Key::Cached {
                remote,
                object: CachedObject::IpCache(IpAddr::from(ip))
            }),
            (cluster(), name, name).prop_map(|(remote, namespace, name)| Key::Cached {
                remote,
                object: CachedObject::Service { namespace, name }
            }),
            (proptest::option::of(name), name)
                .prop_map(|(namespace, name)| Key::Policy { namespace, name }),
            (name, name).prop_map(|(namespace, name)| Key::LocalService { namespace, name }),
        ]
    }

    proptest! {
        #[test]
        fn keys_round_trip(key in key()) {
            prop_assert_eq!(Key::parse(&key.to_string()), Ok(key));
        }

        #[test]
        fn parsing_never_panics(s in "\\PC{0,80}") {
            let _ = Key::parse(&s);
        }
    }
}

#[test]
fn ipv4_mapped_addresses_are_written_as_go_writes_them() {
    let v4 = Key::IpCache {
        ip: "10.1.0.5".parse().unwrap(),
    };
    let mapped = "cilium/state/ip/v1/default/::ffff:10.1.0.5";
    assert_eq!(Key::parse(mapped), Ok(v4.clone()));
    assert_eq!(v4.to_string(), "cilium/state/ip/v1/default/10.1.0.5");
    let as_v6 = Key::IpCache {
        ip: "::ffff:10.1.0.5".parse().unwrap(),
    };
    assert_eq!(as_v6.to_string(), "cilium/state/ip/v1/default/10.1.0.5");
    assert_eq!(
        crate::ip::parse_ip("::ffff:10.1.0.5"),
        Ok("10.1.0.5".parse().unwrap())
    );
    // Other IPv6 addresses keep their form.
    assert_eq!(
        Key::parse("cilium/state/ip/v1/default/fd00::5")
            .unwrap()
            .to_string(),
        "cilium/state/ip/v1/default/fd00::5"
    );
}

#[test]
fn identity_value_keys_have_cilium_s_allocator_layout() {
    let labels: crate::labels::LabelSet =
        "k8s:app.kubernetes.io/name=web;k8s:io.cilium.k8s.policy.cluster=c1;"
            .parse()
            .unwrap();
    let key = Key::IdentityValue {
        labels: labels.clone(),
        owner: "node-1".into(),
    };
    let text = "cilium/state/identities/v1/value/k8s:app.kubernetes.io/name=web;k8s:io.cilium.k8s.policy.cluster=c1;/node-1";
    assert_eq!(key.to_string(), text);
    assert_eq!(Key::parse(text), Ok(key));
    // Without the owner (this project's earlier layout), or with an empty one: not a key.
    for bad in [
        "cilium/state/identities/v1/value/k8s:app=web;",
        "cilium/state/identities/v1/value/k8s:app=web;/",
        "cilium/state/identities/v1/value/k8s:app=web/node-1",
    ] {
        assert!(Key::parse(bad).is_err(), "{bad}");
    }
}
