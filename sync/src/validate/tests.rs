use super::*;
use clustermesh_model::endpoint::IpCacheEntry;
use clustermesh_model::labels::LabelSet;

fn remote() -> Remote {
    Remote {
        name: ClusterName::new("c2").unwrap(),
        id: ClusterId::new(2, MaxConnectedClusters::C255).unwrap(),
        mode: MaxConnectedClusters::C255,
        max_object_bytes: crate::validate::MAX_OBJECT_BYTES,
    }
}

fn c(n: &str) -> ClusterName {
    ClusterName::new(n).unwrap()
}

#[test]
fn valid_objects_map_to_the_remote_cache() {
    let r = remote();
    let labels = LabelSet::workload(&c("c2"), "prod", [("app", "web")]).unwrap();
    let (k, v) = cache_entry(
        &r,
        &Object::Identity {
            cluster: c("c2"),
            id: Identity::new(131_080).unwrap(),
            labels: labels.clone(),
        },
    )
    .unwrap();
    assert_eq!(k, "cilium/cache/identities/v1/c2/id/131080");
    assert_eq!(v, labels.to_kvstore_string().into_bytes());
    let entry = IpCacheEntry {
        ip: "10.2.0.5".parse().unwrap(),
        identity: Identity::new(131_080).unwrap(),
        host_ip: None,
        namespace: "prod".into(),
        pod_name: "web-0".into(),
        named_ports: vec![],
    };
    let (k, _) = cache_entry(
        &r,
        &Object::IpCache {
            cluster: c("c2"),
            entry,
        },
    )
    .unwrap();
    assert_eq!(k, "cilium/cache/ip/v1/c2/10.2.0.5");
}

#[test]
fn hostile_objects_are_rejected_with_a_reason() {
    let r = remote();
    let labels = LabelSet::workload(&c("c2"), "prod", [("app", "web")]).unwrap();
    let cases: Vec<(Object, &str)> = vec![
        (
            Object::Identity {
                cluster: c("c2"),
                id: Identity::new(65_600).unwrap(),
                labels: labels.clone(),
            },
            "identity-out-of-range",
        ),
        (
            Object::Identity {
                cluster: c("c2"),
                id: Identity::new(5).unwrap(),
                labels: labels.clone(),
            },
            "reserved-identity",
        ),
        (
            Object::Identity {
                cluster: c("c3"),
                id: Identity::new(131_080).unwrap(),
                labels: labels.clone(),
            },
            "wrong-cluster",
        ),
        (
            Object::Identity {
                cluster: c("c2"),
                id: Identity::new(131_080).unwrap(),
                labels: LabelSet::workload(&c("c9"), "prod", [("app", "web")]).unwrap(),
            },
            "labels",
        ),
    ];
    for (object, reason) in cases {
        assert_eq!(
            cache_entry(&r, &object).unwrap_err().reason,
            reason,
            "{object:?}"
        );
    }
    let bad_delete = v1::Delete {
        kind: v1::Kind::Services as i32,
        cluster: "c2".into(),
        name: "a/b/c".into(),
    };
    assert_eq!(
        cache_key_of_delete(&r, &bad_delete).unwrap_err().reason,
        "invalid"
    );
    let foreign = v1::Delete {
        kind: v1::Kind::Nodes as i32,
        cluster: "c1".into(),
        name: "n".into(),
    };
    assert_eq!(
        cache_key_of_delete(&r, &foreign).unwrap_err().reason,
        "wrong-cluster"
    );
    let ok = v1::Delete {
        kind: v1::Kind::Services as i32,
        cluster: "c2".into(),
        name: "prod/web".into(),
    };
    assert_eq!(
        cache_key_of_delete(&r, &ok).unwrap(),
        "cilium/cache/services/v1/c2/prod/web"
    );
}
