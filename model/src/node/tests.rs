use super::*;
use crate::cluster::MaxConnectedClusters;

fn node() -> Node {
    Node {
        name: "node-1".into(),
        cluster: ClusterName::new("c1").unwrap(),
        cluster_id: ClusterId::new(1, MaxConnectedClusters::C255).unwrap(),
        addresses: vec![NodeAddress {
            kind: "InternalIP".into(),
            ip: "192.0.2.10".parse().unwrap(),
        }],
        ipv4_alloc_cidr: Some("10.1.0.0/24".parse().unwrap()),
        labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
    }
}

#[test]
fn json_uses_cilium_field_names() {
    let json = serde_json::to_string(&node()).unwrap();
    assert_eq!(
        json,
        concat!(
            r#"{"Name":"node-1","Cluster":"c1","IPAddresses":[{"Type":"InternalIP","IP":"192.0.2.10"}],"#,
            r#""IPv4AllocCIDR":{"IP":"10.1.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"#,
            r#""IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","#,
            r#""IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":1,"Source":"k8s","EncryptionKey":0,"#,
            r#""Labels":{"zone":"a"},"Annotations":null,"WireguardPubKey":"","BootID":""}"#
        )
    );
    assert_eq!(serde_json::from_str::<Node>(&json).unwrap(), node());
    // The text form earlier versions wrote is still read.
    let old = r#"{"Name":"node-1","Cluster":"c1","ClusterID":1,"IPAddresses":[{"Type":"InternalIP","IP":"192.0.2.10"}],"IPv4AllocCIDR":"10.1.0.0/24","Labels":{"zone":"a"}}"#;
    assert_eq!(serde_json::from_str::<Node>(old).unwrap(), node());
}

#[test]
fn pod_cidrs_in_go_s_ipnet_form() {
    let parse = |v: &str| {
        serde_json::from_str::<Node>(&format!(
            r#"{{"Name":"n","Cluster":"c1","ClusterID":1,"IPv4AllocCIDR":{v}}}"#
        ))
        .map(|n| n.ipv4_alloc_cidr.map(|c| c.to_string()))
        .map_err(|e| e.to_string())
    };
    assert_eq!(parse("null"), Ok(None));
    assert_eq!(
        parse(r#"{"IP":"10.244.0.0","Mask":"////AA=="}"#),
        Ok(Some("10.244.0.0/24".into()))
    );
    assert_eq!(
        parse(r#"{"IP":"fd00:10:244::","Mask":"//////////8AAAAAAAAAAA=="}"#),
        Ok(Some("fd00:10:244::/64".into()))
    );
    // Go's 16-byte form of an IPv4 mask.
    assert_eq!(
        parse(r#"{"IP":"10.0.0.0","Mask":"/////////////////wAAAA=="}"#),
        Ok(Some("10.0.0.0/8".into()))
    );
    for bad in [
        r#"{"IP":"10.244.0.0","Mask":"/wD/AA=="}"#,
        r#"{"IP":"10.244.0.1","Mask":"////AA=="}"#,
        r#"{"IP":"10.244.0.0","Mask":"not base64"}"#,
        r#"{"IP":"10.244.0.0","Mask":"//8="}"#,
        r#"{"IP":"nope","Mask":"////AA=="}"#,
        r#""10.244.0.1/24""#,
        "7",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn nodes_from_a_cluster_are_checked() {
    let c1 = ClusterName::new("c1").unwrap();
    let c2 = ClusterName::new("c2").unwrap();
    let id1 = ClusterId::new(1, MaxConnectedClusters::C255).unwrap();
    let id2 = ClusterId::new(2, MaxConnectedClusters::C255).unwrap();
    assert_eq!(node().check_from_cluster(&c1, id1), Ok(()));
    assert!(matches!(
        node().check_from_cluster(&c2, id1),
        Err(NodeError::WrongCluster { .. })
    ));
    assert!(matches!(
        node().check_from_cluster(&c1, id2),
        Err(NodeError::WrongCluster { .. })
    ));
    let no_addr = Node {
        addresses: vec![],
        ..node()
    };
    assert_eq!(
        no_addr.check_from_cluster(&c1, id1),
        Err(NodeError::NoAddress("node-1".into()))
    );
    let bad_name = Node {
        name: "Node/1".into(),
        ..node()
    };
    assert!(matches!(
        bad_name.check_from_cluster(&c1, id1),
        Err(NodeError::Name(_))
    ));
    assert!(serde_json::from_str::<Node>(r#"{"Name":"n","Cluster":"Bad","ClusterID":1}"#).is_err());
    assert!(
        serde_json::from_str::<Node>(
            r#"{"Name":"n","Cluster":"c1","ClusterID":1,"IPv4AllocCIDR":"10.1.0.1/24"}"#
        )
        .is_err()
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    proptest! {
        #[test]
        fn nodes_round_trip(name in "[a-z][a-z0-9-]{0,20}[a-z0-9]", id in 1u32..=255, ip in any::<u32>(),
                            labels in proptest::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{0,8}", 0..4)) {
            let n = Node {
                name,
                cluster: ClusterName::new(format!("c{id}")).unwrap(),
                cluster_id: ClusterId::new(id, MaxConnectedClusters::C255).unwrap(),
                addresses: vec![NodeAddress { kind: "InternalIP".into(), ip: IpAddr::V4(Ipv4Addr::from(ip)) }],
                ipv4_alloc_cidr: None,
                labels,
            };
            let json = serde_json::to_vec(&n).unwrap();
            prop_assert_eq!(serde_json::from_slice::<Node>(&json).unwrap(), n);
        }
    }
}

#[test]
fn go_zero_values_decode_as_empty() {
    // Cilium writes a nil map or slice as null.
    let n: Node = serde_json::from_str(
        r#"{"Name":"node-1","Cluster":"c1","ClusterID":1,"IPAddresses":[{"Type":"InternalIP","IP":"192.0.2.10"}],"Labels":null}"#,
    )
    .unwrap();
    assert!(n.labels.is_empty());
    assert_eq!(n.addresses.len(), 1);
    let n: Node =
        serde_json::from_str(r#"{"Name":"n","Cluster":"c1","ClusterID":1,"IPAddresses":null}"#)
            .unwrap();
    assert!(n.addresses.is_empty());
    assert_eq!(
        n.check_from_cluster(
            &ClusterName::new("c1").unwrap(),
            ClusterId::new(1, MaxConnectedClusters::C255).unwrap()
        ),
        Err(NodeError::NoAddress("n".into()))
    );
}
