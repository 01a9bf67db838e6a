use clustermesh_model::policy::Direction;
use serde_json::json;

use super::*;

fn translate(spec: serde_json::Value) -> Result<NetworkPolicy, Problem> {
    let np: K8sPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "prod"},
        "spec": spec,
    }))
    .unwrap();
    network_policy(&np)
}

fn req(key: &str, operator: SelectorOperator, values: &[&str]) -> SelectorRequirement {
    SelectorRequirement {
        key: key.into(),
        operator,
        values: values.iter().map(|v| (*v).to_owned()).collect(),
    }
}

fn in_prod() -> SelectorRequirement {
    req(NAMESPACE_LABEL, SelectorOperator::In, &["prod"])
}

fn app(v: &str) -> EndpointSelector {
    EndpointSelector {
        match_labels: [("app".to_owned(), v.to_owned())].into(),
        match_expressions: vec![],
    }
}

#[test]
fn policy_types_default_as_kubernetes_says() {
    // No egress section: ingress only, and no ingress rules: deny all ingress.
    let p = translate(json!({"podSelector": {"matchLabels": {"app": "db"}}})).unwrap();
    let r = &p.rules[0];
    assert_eq!(r.endpoint_selector, app("db"));
    assert_eq!(r.ingress, [IngressRule::default()]);
    assert!(r.covers(Direction::Ingress) && !r.covers(Direction::Egress));
    assert!(p.notes.is_empty());
    // An egress section makes it an egress policy too; policyTypes overrides both.
    let p = translate(json!({"podSelector": {}, "egress": [{}]})).unwrap();
    assert!(p.rules[0].covers(Direction::Ingress) && p.rules[0].covers(Direction::Egress));
    // `egress: [{}]`: every peer, every port.
    assert_eq!(
        p.rules[0].egress,
        [EgressRule {
            to_entities: vec![Entity::All],
            ..EgressRule::default()
        }]
    );
    let p =
        translate(json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]})).unwrap();
    assert!(!p.rules[0].covers(Direction::Ingress) && p.rules[0].covers(Direction::Egress));
    assert_eq!(
        p.rules[0].egress,
        [EgressRule::default()],
        "deny all egress"
    );
    assert!(translate(json!({"podSelector": {}, "policyTypes": ["Both"]})).is_err());
    // An empty policyTypes is defaulted, and an empty egress list does not add Egress.
    let p = translate(json!({"podSelector": {}, "policyTypes": [], "egress": []})).unwrap();
    assert!(p.rules[0].covers(Direction::Ingress) && !p.rules[0].covers(Direction::Egress));
}

#[test]
fn peers_are_pods_of_the_policys_namespace_unless_a_namespace_selector_says_otherwise() {
    let p = translate(json!({
        "podSelector": {},
        "ingress": [{
            "from": [
                {"podSelector": {"matchLabels": {"app": "web"}}},
                // A pod selector naming the namespace key cannot leave the namespace.
                {"podSelector": {"matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "In", "values": ["kube-system"]}]}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dev"}}, "podSelector": {"matchLabels": {"app": "web"}}},
                {"namespaceSelector": {}},
                {"namespaceSelector": {"matchLabels": {"team": "a"}}},
                {"ipBlock": {"cidr": "10.0.0.0/8"}},
            ],
            "ports": [
                {"port": 8080},
                {"port": "http", "protocol": "UDP"},
                {"port": 9000, "endPort": 9000},
                {"protocol": "TCP"},
                {"port": 1000, "endPort": 2000},
            ],
        }],
    }))
    .unwrap();
    let r = &p.rules[0].ingress[0];
    let mut web_prod = app("web");
    web_prod.match_expressions.push(in_prod());
    let mut web_dev = app("web");
    web_dev
        .match_expressions
        .push(req(NAMESPACE_LABEL, SelectorOperator::In, &["dev"]));
    assert_eq!(
        r.from_endpoints,
        [
            web_prod,
            EndpointSelector {
                match_labels: Default::default(),
                match_expressions: vec![
                    req(NAMESPACE_LABEL, SelectorOperator::In, &["kube-system"]),
                    in_prod()
                ],
            },
            web_dev,
            EndpointSelector {
                match_labels: Default::default(),
                match_expressions: vec![req(NAMESPACE_LABEL, SelectorOperator::Exists, &[])],
            },
        ]
    );
    assert!(r.from_entities.is_empty());
    let ports: Vec<(String, PolicyProtocol, Option<u16>)> = r.to_ports[0]
        .ports
        .iter()
        .map(|p| (p.port.clone(), p.protocol, p.end_port))
        .collect();
    assert_eq!(
        ports,
        [
            ("8080".to_owned(), PolicyProtocol::Tcp, None),
            ("http".to_owned(), PolicyProtocol::Udp, None),
            ("9000".to_owned(), PolicyProtocol::Tcp, None),
            ("1000".to_owned(), PolicyProtocol::Tcp, Some(2000)),
        ]
    );
    assert_eq!(
        p.notes,
        [
            "rule 0 ingress[0]: peer 4 namespaceSelector on \"team\", peer 5 ipBlock, port 3 every \
          TCP port (no port) not enforced yet; left out: this rule allows less"
        ]
    );
}

#[test]
fn an_entry_with_nothing_enforceable_left_allows_nothing() {
    for (entry, what) in [
        (
            json!({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
            "peer 0 ipBlock",
        ),
        (
            json!({"from": [{"podSelector": {}}], "ports": [{"protocol": "UDP"}]}),
            "port 0 every UDP port (no port)",
        ),
    ] {
        let p = translate(json!({"podSelector": {}, "ingress": [entry]})).unwrap();
        assert_eq!(p.rules[0].ingress, [IngressRule::default()], "{what}");
        assert_eq!(
            p.notes,
            [format!(
                "rule 0 ingress[0]: {what} not enforced yet; {LEFT_OUT}"
            )]
        );
    }
}

#[test]
fn invalid_policies_are_refused() {
    for (spec, want) in [
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "protocol": "ICMP"}]}]}),
            "protocol \"ICMP\"",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 0}]}]}),
            "port 0",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}),
            "port 70000",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}),
            "endPort 80",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
            "named port",
        ),
        (
            json!({"podSelector": {}, "ingress": [{"from": [{}]}]}),
            "a peer needs",
        ),
        (
            json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}),
            "operator \"Near\"",
        ),
        (
            json!({"podSelector": {"matchLabels": {"a": "not a value!"}}}),
            "not a valid label value",
        ),
    ] {
        let err = translate(spec.clone()).unwrap_err();
        assert!(err.contains(want), "{spec}: {err}");
    }
}
