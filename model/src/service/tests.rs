use super::*;
use crate::cluster::MaxConnectedClusters;
use crate::ip::Protocol;

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn cfg(global: bool, shared: bool, affinity: Affinity) -> GlobalServiceConfig {
    GlobalServiceConfig {
        global,
        shared,
        affinity,
    }
}

#[test]
fn annotation_table() {
    use Affinity::{Local, None as NoAff, Remote};
    // (annotations, expected settings, number of errors)
    type Case = (
        &'static [(&'static str, &'static str)],
        GlobalServiceConfig,
        usize,
    );
    let cases: &[Case] = &[
        (&[], cfg(false, false, NoAff), 0),
        (&[(ANNOTATION_GLOBAL, "true")], cfg(true, true, NoAff), 0),
        (&[(ANNOTATION_GLOBAL, "TRUE")], cfg(true, true, NoAff), 0),
        (&[(ANNOTATION_GLOBAL, "false")], cfg(false, false, NoAff), 0),
        (
            &[(ANNOTATION_GLOBAL, "true"), (ANNOTATION_SHARED, "false")],
            cfg(true, false, NoAff),
            0,
        ),
        // shared without global means nothing is exported
        (&[(ANNOTATION_SHARED, "true")], cfg(false, false, NoAff), 0),
        (
            &[(ANNOTATION_GLOBAL, "true"), (ANNOTATION_AFFINITY, "local")],
            cfg(true, true, Local),
            0,
        ),
        (
            &[(ANNOTATION_GLOBAL, "true"), (ANNOTATION_AFFINITY, "Remote")],
            cfg(true, true, Remote),
            0,
        ),
        (
            &[(ANNOTATION_GLOBAL, "true"), (ANNOTATION_AFFINITY, "none")],
            cfg(true, true, NoAff),
            0,
        ),
        // legacy names
        (
            &[(LEGACY_ANNOTATION_GLOBAL, "true")],
            cfg(true, true, NoAff),
            0,
        ),
        (
            &[
                (LEGACY_ANNOTATION_GLOBAL, "true"),
                (LEGACY_ANNOTATION_SHARED, "false"),
                (LEGACY_ANNOTATION_AFFINITY, "local"),
            ],
            cfg(true, false, Local),
            0,
        ),
        // current names win over legacy ones
        (
            &[
                (ANNOTATION_GLOBAL, "false"),
                (LEGACY_ANNOTATION_GLOBAL, "true"),
            ],
            cfg(false, false, NoAff),
            0,
        ),
        // invalid values: false (as Cilium reads them) and an error; an invalid `shared`
        // is not shared although an absent one is (Cilium's GetAnnotationShared)
        (&[(ANNOTATION_GLOBAL, "yes")], cfg(false, false, NoAff), 1),
        (
            &[(ANNOTATION_GLOBAL, "true"), (ANNOTATION_SHARED, "1")],
            cfg(true, false, NoAff),
            1,
        ),
        (
            &[
                (ANNOTATION_GLOBAL, "true"),
                (ANNOTATION_AFFINITY, "nearest"),
            ],
            cfg(true, true, NoAff),
            1,
        ),
        (
            &[(ANNOTATION_GLOBAL, "maybe"), (ANNOTATION_AFFINITY, "x")],
            cfg(false, false, NoAff),
            2,
        ),
    ];
    for (pairs, want, n_errors) in cases {
        let (got, errors) = GlobalServiceConfig::from_annotations(&annotations(pairs));
        assert_eq!(got, *want, "{pairs:?}");
        assert_eq!(errors.len(), *n_errors, "{pairs:?}: {errors:?}");
    }
}

#[test]
fn annotation_errors_name_the_annotation_and_value() {
    let (_, errors) = GlobalServiceConfig::from_annotations(&annotations(&[
        (LEGACY_ANNOTATION_GLOBAL, "yes"),
        (ANNOTATION_AFFINITY, "nearest"),
    ]));
    assert_eq!(
        errors,
        vec![
            AnnotationError::NotABool {
                annotation: LEGACY_ANNOTATION_GLOBAL.into(),
                value: "yes".into(),
                default: false
            },
            AnnotationError::UnknownAffinity {
                annotation: ANNOTATION_AFFINITY.into(),
                value: "nearest".into()
            },
        ]
    );
    assert_eq!(
        errors[0].to_string(),
        "annotation io.cilium/global-service=\"yes\" is not \"true\" or \"false\"; using false"
    );
}

#[test]
fn backend_health_follows_endpointslice_conditions() {
    let c = |ready, serving, terminating| BackendConditions {
        ready,
        serving,
        terminating,
    };
    assert!(c(true, true, false).is_healthy());
    assert!(c(false, true, false).is_healthy());
    assert!(!c(false, true, true).is_healthy());
    assert!(!c(false, false, false).is_healthy());
    assert!(c(true, false, true).is_healthy());
}

pub(super) fn service() -> ClusterService {
    let port = |p| L4Addr::new(Protocol::Tcp, p).unwrap();
    ClusterService {
        cluster: ClusterName::new("c1").unwrap(),
        namespace: "prod".into(),
        name: "web".into(),
        frontends: BTreeMap::from([(
            "10.96.0.10".parse().unwrap(),
            BTreeMap::from([("http".to_owned(), port(80))]),
        )]),
        backends: BTreeMap::from([
            (
                "10.1.0.5".parse().unwrap(),
                BTreeMap::from([("http".to_owned(), port(8080))]),
            ),
            (
                "10.1.0.6".parse().unwrap(),
                BTreeMap::from([("http".to_owned(), port(8080))]),
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
        labels: BTreeMap::new(),
        selector: BTreeMap::from([("app".to_owned(), "web".to_owned())]),
        include_external: true,
        shared: true,
        cluster_id: ClusterId::new(1, MaxConnectedClusters::C255).unwrap(),
        affinity: Affinity::Local,
    }
}

#[test]
fn json_uses_cilium_field_names() {
    let json = serde_json::to_string(&service()).unwrap();
    assert_eq!(
        json,
        concat!(
            r#"{"cluster":"c1","namespace":"prod","name":"web","#,
            r#""frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"#,
            r#""backends":{"10.1.0.5":{"http":{"Protocol":"TCP","Port":8080}},"10.1.0.6":{"http":{"Protocol":"TCP","Port":8080}}},"#,
            r#""backendConditions":{"10.1.0.6":{"ready":false,"serving":true,"terminating":true}},"#,
            r#""labels":{},"selector":{"app":"web"},"includeExternal":true,"shared":true,"clusterID":1,"affinity":"local"}"#
        )
    );
    let back: ClusterService = serde_json::from_str(&json).unwrap();
    assert_eq!(back, service());
    assert!(
        !back
            .conditions_of(&"10.1.0.6".parse().unwrap())
            .is_healthy()
    );
    assert!(
        back.conditions_of(&"10.1.0.5".parse().unwrap())
            .is_healthy()
    );
}

#[test]
fn services_from_a_cluster_are_checked() {
    let c1 = ClusterName::new("c1").unwrap();
    let id1 = ClusterId::new(1, MaxConnectedClusters::C255).unwrap();
    let id2 = ClusterId::new(2, MaxConnectedClusters::C255).unwrap();
    assert_eq!(service().check_from_cluster(&c1, id1), Ok(()));
    assert!(matches!(
        service().check_from_cluster(&c1, id2),
        Err(ServiceError::WrongCluster { .. })
    ));
    let bad_ns = ClusterService {
        namespace: "a/b".into(),
        ..service()
    };
    assert!(matches!(
        bad_ns.check_from_cluster(&c1, id1),
        Err(ServiceError::Name(_))
    ));
    let mut bad_port = service();
    bad_port.frontends.values_mut().for_each(|p| {
        let v = p.remove("http").unwrap();
        p.insert("HTTP".into(), v);
    });
    assert!(matches!(
        bad_port.check_from_cluster(&c1, id1),
        Err(ServiceError::Name(_))
    ));
    let mut orphan = service();
    orphan
        .backend_conditions
        .insert("10.9.9.9".parse().unwrap(), BackendConditions::READY);
    assert!(matches!(
        orphan.check_from_cluster(&c1, id1),
        Err(ServiceError::OrphanCondition { .. })
    ));
    for bad in [
        r#"{"cluster":"c1","namespace":"a","name":"b","clusterID":1,"affinity":"nearest"}"#,
        r#"{"cluster":"c1","namespace":"a","name":"b","clusterID":0}"#,
        r#"{"cluster":"c1","namespace":"a","name":"b","clusterID":1,"backends":{"not-an-ip":{}}}"#,
    ] {
        assert!(
            serde_json::from_str::<ClusterService>(bad).is_err(),
            "{bad}"
        );
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn ports() -> impl Strategy<Value = PortConfiguration> {
        proptest::collection::btree_map("[a-z]{1,6}", (1u16.., 0..3u8), 0..3).prop_map(|m| {
            m.into_iter()
                .map(|(name, (port, p))| {
                    let proto = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp][usize::from(p)];
                    (name, L4Addr::new(proto, port).unwrap())
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn services_round_trip(
            fe in proptest::collection::btree_map(any::<u32>(), ports(), 0..3),
            be in proptest::collection::btree_map(any::<u32>(), ports(), 0..5),
            global in any::<bool>(), shared in any::<bool>(), aff in 0..3u8, ready in any::<bool>(),
        ) {
            let v4 = |m: BTreeMap<u32, PortConfiguration>| -> BTreeMap<IpAddr, PortConfiguration> {
                m.into_iter().map(|(ip, p)| (IpAddr::V4(Ipv4Addr::from(ip)), p)).collect()
            };
            let backends = v4(be);
            let backend_conditions = backends.keys().take(1)
                .map(|ip| (*ip, BackendConditions { ready, serving: true, terminating: !ready }))
                .collect();
            let s = ClusterService {
                frontends: v4(fe),
                backends,
                backend_conditions,
                include_external: global,
                shared,
                affinity: [Affinity::None, Affinity::Local, Affinity::Remote][usize::from(aff)],
                ..service()
            };
            let json = serde_json::to_vec(&s).unwrap();
            prop_assert_eq!(serde_json::from_slice::<ClusterService>(&json).unwrap(), s);
        }
    }
}

#[test]
fn the_exported_form_keeps_only_ready_or_serving_backends() {
    let mut s = service();
    let ports = s.backends[&"10.1.0.5".parse().unwrap()].clone();
    let c = |ready, serving, terminating| BackendConditions {
        ready,
        serving,
        terminating,
    };
    // 10.1.0.5 ready (no entry); 10.1.0.6 serving and terminating (kept, with its
    // conditions); 10.1.0.7 neither ready nor serving (dropped); 10.1.0.8 ready but
    // terminating (kept).
    for (ip, cond) in [
        ("10.1.0.7", c(false, false, false)),
        ("10.1.0.8", c(true, true, true)),
    ] {
        s.backends.insert(ip.parse().unwrap(), ports.clone());
        s.backend_conditions.insert(ip.parse().unwrap(), cond);
    }
    let e = s.for_export();
    let kept: Vec<String> = e.backends.keys().map(ToString::to_string).collect();
    assert_eq!(kept, ["10.1.0.5", "10.1.0.6", "10.1.0.8"]);
    let conditions: Vec<String> = e
        .backend_conditions
        .keys()
        .map(ToString::to_string)
        .collect();
    assert_eq!(conditions, ["10.1.0.6", "10.1.0.8"]);
    assert_eq!(
        (&e.frontends, &e.labels, e.shared),
        (&s.frontends, &s.labels, s.shared)
    );
    assert!(s.is_exported());
    assert!(
        !ClusterService {
            shared: false,
            ..service()
        }
        .is_exported()
    );
}
