use super::*;

#[test]
fn kvstore_form_is_sorted_by_key_with_trailing_semicolons() {
    let c1 = ClusterName::new("c1").unwrap();
    let set = LabelSet::workload(&c1, "prod", [("app", "web"), ("tier", "front")]).unwrap();
    assert_eq!(
        set.to_kvstore_string(),
        "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=prod;k8s:tier=front;"
    );
    assert_eq!(set.cluster(), Some("c1"));
    assert_eq!(set.namespace(), Some("prod"));
    assert_eq!(set.check_workload_of(&c1), Ok(()));
}

#[test]
fn parsing_accepts_any_order_and_canonicalises() {
    let set: LabelSet = "k8s:b=2;k8s:a=1;reserved:host=;".parse().unwrap();
    assert_eq!(set.to_string(), "k8s:a=1;k8s:b=2;reserved:host=;");
    assert_eq!(set.get("host").map(Label::source), Some("reserved"));
    assert_eq!("".parse::<LabelSet>().unwrap(), LabelSet::new());
}

#[test]
fn label_rules() {
    let cases: &[(&str, Result<(), LabelError>)] = &[
        ("k8s:app=web", Ok(())),
        ("k8s:app.kubernetes.io/name=web-1_x.y", Ok(())),
        ("reserved:host=", Ok(())),
        ("app=web", Err(LabelError::MissingSource("app=web".into()))),
        ("k8s:app", Err(LabelError::MissingValue("k8s:app".into()))),
        (":app=web", Err(LabelError::Source(String::new()))),
        ("K8S:app=web", Err(LabelError::Source("K8S".into()))),
        ("k8s:=web", Err(LabelError::Key(String::new()))),
        ("k8s:a b=web", Err(LabelError::Key("a b".into()))),
        ("k8s:a;b=web", Err(LabelError::Key("a;b".into()))),
        // What Cilium's string form carries: the key ends at the first '='.
        ("k8s:app=w=b", Ok(())),
        ("k8s:app=a/b:c", Ok(())),
        ("k8s:app=é", Err(LabelError::Value("é".into()))),
        ("k8s:app=a b", Err(LabelError::Value("a b".into()))),
    ];
    for (input, want) in cases {
        assert_eq!(input.parse::<Label>().map(|_| ()), *want, "{input:?}");
    }
    assert_eq!(
        Label::k8s("app", "a;b"),
        Err(LabelError::Value("a;b".into()))
    );
    // Control characters (a tab) are not printable.
    assert!(Label::k8s("app", "a\tb").is_err());
    // A service account's full name (253) and a namespace label's key with its prefix (348)
    // fit, as Cilium writes them; one more does not.
    let sa = "s".repeat(253);
    assert!(Label::k8s(SERVICE_ACCOUNT_LABEL, sa.clone()).is_ok());
    let long = "v".repeat(254);
    assert_eq!(
        Label::k8s("app", long.clone()),
        Err(LabelError::Value(long))
    );
    let key = format!(
        "{NAMESPACE_LABELS_PREFIX}{}/{}",
        "d".repeat(253),
        "n".repeat(63)
    );
    assert!(Label::k8s(key.clone(), "v").is_ok());
    let longer = format!("{key}x");
    assert_eq!(
        Label::k8s(longer.clone(), "v"),
        Err(LabelError::Key(longer))
    );
}

#[test]
fn set_rules() {
    assert_eq!(
        "k8s:a=1;k8s:a=2;".parse::<LabelSet>(),
        Err(LabelError::DuplicateKey("a".into()))
    );
    assert_eq!(
        "k8s:a=1".parse::<LabelSet>(),
        Err(LabelError::MissingTerminator)
    );
    assert_eq!(
        "k8s:a=1;;".parse::<LabelSet>(),
        Err(LabelError::MissingSource(String::new()))
    );
    assert!(serde_json::from_str::<LabelSet>(r#""k8s:a=1""#).is_err());
}

#[test]
fn workload_checks() {
    let c1 = ClusterName::new("c1").unwrap();
    let c2 = ClusterName::new("c2").unwrap();
    let set = LabelSet::workload(&c1, "ns", [("app", "x")]).unwrap();
    assert_eq!(
        set.check_workload_of(&c2),
        Err(LabelError::WrongCluster {
            expected: "c2".into(),
            found: "c1".into()
        })
    );
    let no_cluster: LabelSet = "k8s:io.kubernetes.pod.namespace=ns;".parse().unwrap();
    assert_eq!(
        no_cluster.check_workload_of(&c1),
        Err(LabelError::WrongCluster {
            expected: "c1".into(),
            found: String::new()
        })
    );
    let no_ns: LabelSet = "k8s:io.cilium.k8s.policy.cluster=c1;".parse().unwrap();
    assert_eq!(
        no_ns.check_workload_of(&c1),
        Err(LabelError::MissingNamespace)
    );
    // A pod label may not shadow the cluster label.
    assert_eq!(
        LabelSet::workload(&c1, "ns", [(CLUSTER_LABEL, "c2")]),
        Err(LabelError::DuplicateKey(CLUSTER_LABEL.into()))
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn label() -> impl Strategy<Value = Label> {
        (
            "[a-z][a-z0-9-]{0,8}",
            "[A-Za-z0-9][A-Za-z0-9._/-]{0,20}",
            "[A-Za-z0-9._-]{0,20}",
        )
            .prop_map(|(s, k, v)| Label::new(s, k, v).unwrap())
    }

    proptest! {
        #[test]
        fn label_set_string_form_round_trips(labels in proptest::collection::vec(label(), 0..12)) {
            let mut set = LabelSet::new();
            for l in labels {
                let _ = set.insert(l); // duplicates by key are skipped
            }
            let s = set.to_kvstore_string();
            prop_assert_eq!(s.parse::<LabelSet>().unwrap(), set.clone());
            let json = serde_json::to_string(&set).unwrap();
            prop_assert_eq!(serde_json::from_str::<LabelSet>(&json).unwrap(), set);
        }
    }
}

#[test]
fn cilium_s_default_label_filter() {
    for kept in [
        "app",
        "app.kubernetes.io/name",
        "io.kubernetes.pod.namespace",
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name",
        "io.cilium.k8s.policy.cluster",
        // Cilium's rules match from the key's start only.
        "topology.kubernetes.io/zone",
        "batch.kubernetes.io/job-name",
        "job-name",
    ] {
        assert!(is_identity_label(kept), "{kept}");
    }
    for dropped in [
        "pod-template-hash",
        "controller-revision-hash",
        "pod-template-generation",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "batch.kubernetes.io/job-completion-index",
        "batch.kubernetes.io/controller-uid",
        "controller-uid",
        "kubernetes.io/hostname",
        "io.kubernetes.container.name",
        "failure-domain.beta.kubernetes.io/zone",
        "k8s.io/anything",
        "annotation.foo",
        "etcd_node",
    ] {
        assert!(!is_identity_label(dropped), "{dropped}");
    }
}
