use super::*;

fn test(name: &str) -> &'static Test {
    TESTS.iter().find(|t| t.name == name).unwrap()
}

fn expect(name: &str, a: Action) -> Expect {
    test(name)
        .actions()
        .into_iter()
        .find(|(b, _)| *b == a)
        .map(|(_, e)| e)
        .unwrap_or_else(|| panic!("{name} has no action {a:?}"))
}

#[test]
fn the_suite_is_the_table_of_connectivity_readme() {
    assert_eq!(TESTS.len(), 35);
    let mut names: Vec<&str> = TESTS.iter().map(|t| t.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 35, "test names are unique");
    let readme = include_str!("../../../../connectivity/README.md");
    for t in TESTS {
        // The table names each test or its base name with "(+ -suffix)".
        let base = t
            .name
            .trim_end_matches("-port-range")
            .trim_end_matches("-knp");
        assert!(
            readme.contains(&format!("| {base}")),
            "{} not in the table",
            t.name
        );
    }
}

#[test]
fn every_manifest_is_used_and_every_named_one_exists() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../connectivity/manifests");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    let mut used: Vec<&str> = TESTS
        .iter()
        .flat_map(|t| t.policies.iter().copied())
        .collect();
    used.sort();
    used.dedup();
    assert_eq!(used, files);
    for f in &files {
        let embedded = policy_file(f).unwrap();
        assert_eq!(
            embedded,
            std::fs::read_to_string(format!("{dir}/{f}.yaml")).unwrap(),
            "{f} is embedded unchanged"
        );
    }
}

#[test]
fn scenarios_expand_as_cilium_cli_does() {
    let no = test("no-policies").actions();
    assert_eq!(no.len(), 10);
    assert!(no.iter().all(|(_, e)| *e == Expect::Ok));
    assert_eq!(
        no.iter()
            .filter(|(a, _)| a.scenario() == "pod-to-service")
            .count(),
        4
    );
    // WithDestinationLabelsOption.
    assert_eq!(
        test("cluster-entity").actions(),
        vec![
            (Action::PodToPod(CLIENT, ECHO_SAME_NODE), Expect::Ok),
            (Action::PodToPod(CLIENT2, ECHO_SAME_NODE), Expect::Ok),
        ]
    );
    assert_eq!(
        test("cluster-entity-multi-cluster").actions(),
        vec![
            (
                Action::PodToPod(CLIENT, ECHO_OTHER_NODE),
                Expect::Drop(DropAt::DefaultEgress)
            ),
            (
                Action::PodToPod(CLIENT2, ECHO_OTHER_NODE),
                Expect::Drop(DropAt::DefaultEgress)
            ),
        ]
    );
    // Two scenarios over the same pairs run each pair once.
    assert_eq!(
        test("echo-ingress-from-other-client-deny").actions().len(),
        6
    );
    assert_eq!(test("client-ingress").actions().len(), 2);
}

#[test]
fn expectations_follow_cilium_cli() {
    let c2c = Action::ClientToClient;
    let p2p = Action::PodToPod;
    // client-ingress: only other=client may reach a client.
    assert_eq!(
        expect("client-ingress", c2c(CLIENT, CLIENT2)),
        Expect::Drop(DropAt::DefaultIngress)
    );
    assert_eq!(
        expect("client-ingress-knp", c2c(CLIENT2, CLIENT)),
        Expect::Ok
    );
    assert_eq!(
        expect("client-ingress-icmp", c2c(CLIENT, CLIENT2)),
        Expect::Drop(DropAt::DefaultIngress)
    );
    // echo-ingress: client (no other=client) is dropped at the echo pod.
    assert_eq!(
        expect("echo-ingress", p2p(CLIENT, ECHO_OTHER_NODE)),
        Expect::Drop(DropAt::DefaultIngress)
    );
    assert_eq!(
        expect("echo-ingress-knp", p2p(CLIENT2, ECHO_SAME_NODE)),
        Expect::Ok
    );
    // Deny rules.
    assert_eq!(
        expect(
            "echo-ingress-from-other-client-deny",
            p2p(CLIENT2, ECHO_SAME_NODE)
        ),
        Expect::Drop(DropAt::DenyIngress)
    );
    assert_eq!(
        expect("echo-ingress-from-other-client-deny", c2c(CLIENT2, CLIENT)),
        Expect::Ok
    );
    assert_eq!(
        expect("client-egress-to-echo-deny", p2p(CLIENT2, ECHO_OTHER_NODE)),
        Expect::Drop(DropAt::DenyEgress)
    );
    assert_eq!(
        expect(
            "client-egress-to-echo-deny-port-range",
            c2c(CLIENT, CLIENT2)
        ),
        Expect::Ok
    );
    assert_eq!(
        expect(
            "client-ingress-to-echo-named-port-deny",
            p2p(CLIENT, ECHO_OTHER_NODE)
        ),
        Expect::Drop(DropAt::DenyIngress)
    );
    assert_eq!(
        expect(
            "client-ingress-to-echo-named-port-deny",
            p2p(CLIENT2, ECHO_OTHER_NODE)
        ),
        Expect::Ok
    );
    assert_eq!(
        expect(
            "client-with-service-account-egress-to-echo-deny",
            p2p(CLIENT2, ECHO_SAME_NODE)
        ),
        Expect::Ok
    );
    assert_eq!(
        expect(
            "client-egress-to-echo-service-account-deny",
            p2p(CLIENT, ECHO_SAME_NODE)
        ),
        Expect::Drop(DropAt::DenyEgress)
    );
    assert_eq!(
        expect(
            "client-egress-to-echo-service-account-deny",
            p2p(CLIENT, ECHO_OTHER_NODE)
        ),
        Expect::Ok
    );
    assert_eq!(
        expect(
            "client-ingress-from-other-client-icmp-deny",
            c2c(CLIENT2, CLIENT)
        ),
        Expect::Drop(DropAt::DenyIngress)
    );
    assert_eq!(
        expect(
            "client-ingress-from-other-client-icmp-deny",
            p2p(CLIENT2, ECHO_SAME_NODE)
        ),
        Expect::Ok
    );
    // Service accounts and the local cluster.
    assert_eq!(
        expect(
            "client-egress-to-echo-service-account",
            p2p(CLIENT2, ECHO_OTHER_NODE)
        ),
        Expect::Drop(DropAt::DefaultEgress)
    );
    assert_eq!(
        expect("policy-local-cluster-egress", p2p(CLIENT, ECHO_OTHER_NODE)),
        Expect::Drop(DropAt::DefaultEgress)
    );
    assert_eq!(
        expect("policy-local-cluster-egress", p2p(CLIENT, ECHO_SAME_NODE)),
        Expect::Ok
    );
    assert_eq!(
        expect("all-entities-deny", p2p(CLIENT2, ECHO_SAME_NODE)),
        Expect::Drop(DropAt::DenyEgress)
    );
}

/// Every action of every test with its expectation, one line each, against a file reviewed
/// by hand against `connectivity/README.md` and cilium-cli's builders
/// (`CLUSTERMESH_UPDATE_EXPECTATIONS=1` rewrites it; review the diff).
#[test]
fn every_expectation_is_the_reviewed_table() {
    let mut text = String::new();
    for t in TESTS {
        for (a, e) in t.actions() {
            text.push_str(&format!(
                "{:<58} {:<62} {}\n",
                t.name,
                a.describe(),
                e.describe()
            ));
        }
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/connectivity/suite/expected.txt"
    );
    if std::env::var_os("CLUSTERMESH_UPDATE_EXPECTATIONS").is_some() {
        std::fs::write(path, &text).unwrap();
    }
    assert_eq!(text, std::fs::read_to_string(path).unwrap());
}
