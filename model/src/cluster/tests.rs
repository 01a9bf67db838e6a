use super::*;

#[test]
fn cluster_name_rules() {
    let cases: &[(&str, Option<ClusterError>)] = &[
        ("c1", None),
        ("a", None),
        ("0", None),
        ("cluster-east-1", None),
        ("abcdefghijklmnopqrstuvwxyz012345", None),
        (
            "",
            Some(ClusterError::NameLength {
                name: String::new(),
            }),
        ),
        (
            "abcdefghijklmnopqrstuvwxyz0123456",
            Some(ClusterError::NameLength {
                name: "abcdefghijklmnopqrstuvwxyz0123456".into(),
            }),
        ),
        ("-c1", Some(ClusterError::NameSyntax { name: "-c1".into() })),
        ("c1-", Some(ClusterError::NameSyntax { name: "c1-".into() })),
        ("C1", Some(ClusterError::NameSyntax { name: "C1".into() })),
        ("c_1", Some(ClusterError::NameSyntax { name: "c_1".into() })),
        ("c.1", Some(ClusterError::NameSyntax { name: "c.1".into() })),
        ("c/1", Some(ClusterError::NameSyntax { name: "c/1".into() })),
        ("default", Some(ClusterError::NameReserved)),
    ];
    for (name, want) in cases {
        let got = ClusterName::new(*name);
        match want {
            None => assert_eq!(got.as_ref().map(ClusterName::as_str), Ok(*name), "{name:?}"),
            Some(err) => assert_eq!(got.as_ref().err(), Some(err), "{name:?}"),
        }
    }
}

#[test]
fn cluster_id_rules_in_both_modes() {
    use MaxConnectedClusters::{C255, C511};
    let cases: &[(u32, MaxConnectedClusters, Result<u16, ClusterError>)] = &[
        (1, C255, Ok(1)),
        (255, C255, Ok(255)),
        (
            256,
            C255,
            Err(ClusterError::IdOutOfRange { id: 256, max: 255 }),
        ),
        (0, C255, Err(ClusterError::IdZero { max: 255 })),
        (256, C511, Ok(256)),
        (511, C511, Ok(511)),
        (
            512,
            C511,
            Err(ClusterError::IdOutOfRange { id: 512, max: 511 }),
        ),
        (0, C511, Err(ClusterError::IdZero { max: 511 })),
        (
            u32::MAX,
            C511,
            Err(ClusterError::IdOutOfRange {
                id: u32::MAX,
                max: 511,
            }),
        ),
    ];
    for (id, mode, want) in cases {
        assert_eq!(
            ClusterId::new(*id, *mode).map(ClusterId::get),
            *want,
            "{id} in {mode}"
        );
    }
}

#[test]
fn max_connected_clusters_accepts_only_255_and_511() {
    assert_eq!(
        MaxConnectedClusters::try_from(255),
        Ok(MaxConnectedClusters::C255)
    );
    assert_eq!(
        MaxConnectedClusters::try_from(511),
        Ok(MaxConnectedClusters::C511)
    );
    for bad in [0, 128, 256, 512, 1023] {
        assert_eq!(
            MaxConnectedClusters::try_from(bad),
            Err(ClusterError::MaxConnectedClusters(bad))
        );
    }
}

#[test]
fn cluster_config_json_uses_cilium_field_names() {
    let cfg = ClusterConfig {
        id: ClusterId::new(7, MaxConnectedClusters::C255).unwrap(),
        capabilities: Capabilities {
            synced_canaries: true,
            cached: true,
            max_connected_clusters: MaxConnectedClusters::C255,
            service_exports_enabled: None,
        },
    };
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(
        json,
        r#"{"id":7,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255}}"#
    );
    assert_eq!(serde_json::from_str::<ClusterConfig>(&json).unwrap(), cfg);
    // A cluster's own config, as Cilium's clustermesh-apiserver writes it
    // (clusterconfig.txtar): no `cached`, `serviceExportsEnabled` last.
    let own = ClusterConfig {
        id: ClusterId::new(3, MaxConnectedClusters::C255).unwrap(),
        capabilities: Capabilities {
            synced_canaries: true,
            cached: false,
            max_connected_clusters: MaxConnectedClusters::C255,
            service_exports_enabled: Some(false),
        },
    };
    let json = serde_json::to_string(&own).unwrap();
    assert_eq!(
        json,
        r#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#
    );
    assert_eq!(serde_json::from_str::<ClusterConfig>(&json).unwrap(), own);
}

#[test]
fn cluster_config_rejects_bad_values() {
    for bad in [
        r#"{"id":0,"capabilities":{}}"#,
        r#"{"id":600,"capabilities":{}}"#,
        r#"{"id":3,"capabilities":{"maxConnectedClusters":300}}"#,
        r#"{"capabilities":{}}"#,
        r#"{"id":"3","capabilities":{}}"#,
    ] {
        assert!(serde_json::from_str::<ClusterConfig>(bad).is_err(), "{bad}");
    }
    // 300 fits the wide mode the decoder checks, but not the config's own 255 mode.
    let cfg: ClusterConfig = serde_json::from_str(r#"{"id":300,"capabilities":{}}"#).unwrap();
    assert_eq!(
        cfg.validate(),
        Err(ClusterError::IdOutOfRange { id: 300, max: 255 })
    );
}

#[test]
fn cluster_name_json_is_validated() {
    assert!(serde_json::from_str::<ClusterName>(r#""Bad""#).is_err());
    assert_eq!(
        serde_json::from_str::<ClusterName>(r#""c1""#)
            .unwrap()
            .as_str(),
        "c1"
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn valid_names_round_trip(name in "[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?") {
            prop_assume!(name != "default");
            let parsed = ClusterName::new(name.clone()).unwrap();
            let json = serde_json::to_string(&parsed).unwrap();
            prop_assert_eq!(serde_json::from_str::<ClusterName>(&json).unwrap(), parsed);
        }

        #[test]
        fn config_round_trips(id in 1u32..=511, synced in any::<bool>(), cached in any::<bool>()) {
            let mode = if id > 255 { MaxConnectedClusters::C511 } else { MaxConnectedClusters::C255 };
            let cfg = ClusterConfig {
                id: ClusterId::new(id, mode).unwrap(),
                capabilities: Capabilities { synced_canaries: synced, cached, max_connected_clusters: mode, service_exports_enabled: None },
            };
            let json = serde_json::to_vec(&cfg).unwrap();
            prop_assert_eq!(serde_json::from_slice::<ClusterConfig>(&json).unwrap(), cfg);
        }
    }
}
