use super::*;

fn entry() -> IpCacheEntry {
    IpCacheEntry {
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
    }
}

#[test]
fn json_uses_cilium_field_names() {
    let json = serde_json::to_string(&entry()).unwrap();
    assert_eq!(
        json,
        r#"{"IP":"10.1.0.5","ID":65600,"HostIP":"192.0.2.1","K8sNamespace":"prod","K8sPodName":"web-0","NamedPorts":[{"Name":"http","Port":8080,"Protocol":"TCP"}]}"#
    );
    assert_eq!(
        serde_json::from_str::<IpCacheEntry>(&json).unwrap(),
        entry()
    );
}

#[test]
fn entries_from_a_cluster_are_checked() {
    let c1 = ClusterId::new(1, MaxConnectedClusters::C255).unwrap();
    let c2 = ClusterId::new(2, MaxConnectedClusters::C255).unwrap();
    let mode = MaxConnectedClusters::C255;
    assert_eq!(entry().check_from_cluster(c1, mode), Ok(()));
    assert!(matches!(
        entry().check_from_cluster(c2, mode),
        Err(EndpointError::Identity(
            IdentityError::OutsideClusterRange { .. }
        ))
    ));
    let reserved = IpCacheEntry {
        identity: Identity::new(6).unwrap(),
        ..entry()
    };
    assert!(matches!(
        reserved.check_from_cluster(c1, mode),
        Err(EndpointError::ReservedIdentity { identity: 6, .. })
    ));
    let bad_ns = IpCacheEntry {
        namespace: "Prod".into(),
        ..entry()
    };
    assert!(matches!(
        bad_ns.check_from_cluster(c1, mode),
        Err(EndpointError::Name(_))
    ));
    let bad_port = IpCacheEntry {
        named_ports: vec![NamedPort {
            name: "http".into(),
            port: 0,
            protocol: Protocol::Tcp,
        }],
        ..entry()
    };
    assert_eq!(
        bad_port.check_from_cluster(c1, mode),
        Err(EndpointError::PortZero("http".into()))
    );
}

#[test]
fn malformed_json_is_an_error() {
    for bad in [
        r#"{"IP":"10.1.0.300","ID":65600}"#,
        r#"{"IP":"10.1.0.5","ID":16777216}"#,
        r#"{"IP":"10.1.0.5"}"#,
        r#"{"IP":"10.1.0.5","ID":-1}"#,
        "not json",
    ] {
        assert!(serde_json::from_str::<IpCacheEntry>(bad).is_err(), "{bad}");
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    proptest! {
        #[test]
        fn entries_round_trip(ip in any::<u32>(), id in 256u32..16_777_215, host in proptest::option::of(any::<u32>()),
                              ns in "[a-z][a-z0-9-]{0,10}[a-z0-9]", port in 1u16..) {
            let e = IpCacheEntry {
                ip: IpAddr::V4(Ipv4Addr::from(ip)),
                identity: Identity::new(id).unwrap(),
                host_ip: host.map(|h| IpAddr::V4(Ipv4Addr::from(h))),
                namespace: ns.clone(),
                pod_name: format!("{ns}-0"),
                named_ports: vec![NamedPort { name: "p".into(), port, protocol: Protocol::Udp }],
            };
            let json = serde_json::to_vec(&e).unwrap();
            prop_assert_eq!(serde_json::from_slice::<IpCacheEntry>(&json).unwrap(), e);
        }
    }
}

#[test]
fn go_zero_values_decode_as_empty_and_bad_ips_are_refused() {
    let e: IpCacheEntry = serde_json::from_str(
        r#"{"IP":"10.1.0.5","ID":65600,"HostIP":"","K8sNamespace":"prod","K8sPodName":"web-0","NamedPorts":null}"#,
    )
    .unwrap();
    assert_eq!(e.host_ip, None);
    assert!(e.named_ports.is_empty());
    let e: IpCacheEntry = serde_json::from_str(r#"{"IP":"10.1.0.5","ID":65600}"#).unwrap();
    assert_eq!(e.host_ip, None);
    let err =
        serde_json::from_str::<IpCacheEntry>(r#"{"IP":"10.1.0.5","ID":65600,"HostIP":"node-1"}"#)
            .unwrap_err();
    assert!(
        err.to_string().contains("\"node-1\" is not an IP address"),
        "{err}"
    );
}
