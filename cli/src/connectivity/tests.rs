use super::*;
use suite::{CLIENT, CLIENT2, DropAt, ECHO_OTHER_NODE, ECHO_SAME_NODE};

const A: Addresses = Addresses {
    pods: [10, 254, 0],
    services: [10, 96, 254],
};

fn event(src: &str, dst: &str, direction: &str, verdict: &str, rule: u64, proto: u64) -> Value {
    json!({"src": src, "dst": dst, "direction": direction, "verdict": verdict, "rule": rule,
        "proto": proto, "dport": 8080, "srcIdentity": 1, "dstIdentity": 2, "srcCluster": 1,
        "dstCluster": 2})
}

#[test]
fn pods_and_services_get_their_addresses() {
    assert_eq!(A.pod(&CLIENT), Ipv4Addr::new(10, 254, 0, 10));
    assert_eq!(A.pod(&ECHO_OTHER_NODE), Ipv4Addr::new(10, 254, 0, 13));
    assert_eq!(A.service(&ECHO_SAME_NODE), Ipv4Addr::new(10, 96, 254, 10));
    assert_eq!(A.service(&ECHO_OTHER_NODE), Ipv4Addr::new(10, 96, 254, 11));
    assert_eq!(octets("10.254.0"), Ok([10, 254, 0]));
    for bad in [
        "127.0.0",
        "10.254",
        "10.254.0.1",
        "10.256.0",
        "0.1.2",
        "224.0.0",
        "a.b.c",
        "",
    ] {
        assert!(octets(bad).is_err(), "{bad}");
    }
}

#[test]
fn an_answer_passes_only_from_the_expected_pod() {
    let a = Action::PodToService(CLIENT, ECHO_OTHER_NODE);
    let ok = Observed::Answered("echo-other-node".into());
    assert_eq!(judge(&a, Expect::Ok, &ok, &[], &A), None);
    let wrong = Observed::Answered("echo-same-node".into());
    assert_eq!(
        judge(&a, Expect::Ok, &wrong, &[], &A).unwrap(),
        "expected an answer from echo-other-node, observed one from echo-same-node"
    );
    let ping = Action::ClientToClient(CLIENT, CLIENT2);
    let reply = Observed::Answered("10.254.0.11".into());
    assert_eq!(judge(&ping, Expect::Ok, &reply, &[], &A), None);
    assert_eq!(
        judge(&ping, Expect::Ok, &Observed::TimedOut, &[], &A).unwrap(),
        "expected ok, observed no answer (timed out)"
    );
}

#[test]
fn a_drop_passes_only_where_an_agent_reported_it() {
    let a = Action::PodToPod(CLIENT, ECHO_SAME_NODE);
    let (src, dst) = ("10.254.0.10", "10.254.0.12");
    let default_ingress = Expect::Drop(DropAt::DefaultIngress);
    let at_ingress = [event(src, dst, "ingress", "denied", 0, 6)];
    assert_eq!(
        judge(&a, default_ingress, &Observed::TimedOut, &at_ingress, &A),
        None
    );
    // The wrong direction, a deny rule instead of default deny, no event, an answer, a reset.
    let at_egress = [event(src, dst, "egress", "denied", 0, 6)];
    assert!(judge(&a, default_ingress, &Observed::TimedOut, &at_egress, &A).is_some());
    let by_rule = [event(src, dst, "ingress", "denied", 77, 6)];
    assert!(judge(&a, default_ingress, &Observed::TimedOut, &by_rule, &A).is_some());
    assert_eq!(
        judge(
            &a,
            Expect::Drop(DropAt::DenyIngress),
            &Observed::TimedOut,
            &by_rule,
            &A
        ),
        None
    );
    assert_eq!(
        judge(&a, default_ingress, &Observed::TimedOut, &[], &A).unwrap(),
        "expected dropped at ingress (default deny), observed no answer, but no agent reported \
         the packets dropped at ingress (default deny)"
    );
    assert!(
        judge(
            &a,
            default_ingress,
            &Observed::Answered("echo-same-node".into()),
            &at_ingress,
            &A
        )
        .is_some()
    );
    assert!(
        judge(
            &a,
            default_ingress,
            &Observed::Failed("ConnectionRefused 111".into()),
            &at_ingress,
            &A
        )
        .is_some()
    );
}

#[test]
fn an_actions_events_are_those_of_its_pair_and_protocol() {
    let all = vec![
        event("10.254.0.10", "10.254.0.12", "egress", "allowed", 0, 6),
        event("10.254.0.12", "10.254.0.10", "ingress", "allowed", 0, 6),
        event("10.254.0.11", "10.254.0.12", "egress", "denied", 0, 6),
        event("10.254.0.10", "10.254.0.12", "egress", "allowed", 0, 1),
    ];
    let tcp = events_of(&Action::PodToService(CLIENT, ECHO_SAME_NODE), &A, &all);
    assert_eq!(
        tcp,
        all[..1].to_vec(),
        "its own direction and protocol only"
    );
    let icmp = events_of(&Action::ClientToClient(CLIENT, CLIENT2), &A, &all);
    assert!(icmp.is_empty());
}

#[test]
fn percentiles_are_nearest_rank() {
    let ms = |v: &[u64]| {
        v.iter()
            .map(|m| Duration::from_millis(*m))
            .collect::<Vec<_>>()
    };
    assert_eq!(percentile(&[], 50), None);
    assert_eq!(percentile(&ms(&[5]), 99), Some(Duration::from_millis(5)));
    let d = ms(&(1..=100).collect::<Vec<_>>());
    assert_eq!(percentile(&d, 50), Some(Duration::from_millis(50)));
    assert_eq!(percentile(&d, 99), Some(Duration::from_millis(99)));
}

#[test]
fn the_deployment_loads_through_the_apiserver_manifest_parser() {
    use clustermesh_apiserver::source::manifest::{Loaded, parse_text};
    let c = Cluster {
        name: "c1".into(),
        admin: "127.0.0.1:1".into(),
        manifests: PathBuf::from("/nonexistent"),
        cgroup: PathBuf::from("/nonexistent"),
        node_ns: "node".into(),
        node: "c1-node".into(),
        host_ip: Ipv4Addr::new(192, 0, 2, 1),
    };
    let mut loaded = Loaded::default();
    parse_text(
        "cilium-test.yaml",
        &deploy::manifest(&c, false, &A),
        &mut loaded,
    );
    assert_eq!(loaded.problems, vec![]);
    let o = &loaded.objects;
    let pods: Vec<String> = o.pods.values().map(|p| p.name.clone()).collect();
    assert_eq!(pods, ["client", "client2", "echo-same-node"]);
    let echo = o
        .pods
        .values()
        .find(|p| p.name == "echo-same-node")
        .unwrap();
    assert_eq!(echo.service_account, "echo-same-node");
    assert_eq!(echo.labels.get("other").map(String::as_str), Some("echo"));
    assert_eq!(echo.named_ports.len(), 1);
    assert_eq!(echo.host_ip, Some("192.0.2.1".parse().unwrap()));
    assert_eq!(
        o.services.len(),
        2,
        "echo-same-node, and echo-other-node to import"
    );
    assert_eq!(o.endpoint_slices.len(), 1);

    let mut remote = Loaded::default();
    parse_text(
        "cilium-test.yaml",
        &deploy::manifest(&c, true, &A),
        &mut remote,
    );
    assert_eq!(remote.problems, vec![]);
    let names: Vec<String> = remote
        .objects
        .services
        .values()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["echo-other-node"]);
    assert_eq!(remote.objects.pods.len(), 1);
}

#[test]
fn policies_go_into_the_test_namespace_unchanged_otherwise() {
    let (text, names) =
        deploy::policies(&["allow-all-egress", "client-ingress-from-client2-knp"]).unwrap();
    assert_eq!(
        names,
        [
            "cilium-test/allow-all-egress",
            "cilium-test/client-ingress-from-client2"
        ]
    );
    use clustermesh_apiserver::source::manifest::{Loaded, parse_text};
    let mut loaded = Loaded::default();
    parse_text("p.yaml", &text, &mut loaded);
    assert_eq!(loaded.problems, vec![]);
    assert_eq!(loaded.objects.policies.len(), 2);
    assert!(
        loaded
            .objects
            .policies
            .keys()
            .all(|(ns, _)| ns.as_deref() == Some("cilium-test"))
    );
    assert!(deploy::policies(&["no-such-file"]).is_err());
}

#[test]
fn actions_on_the_same_pods_and_protocol_never_run_at_once() {
    let no_policies = suite::TESTS
        .iter()
        .find(|t| t.name == "no-policies")
        .unwrap();
    let actions = no_policies.actions();
    let r = rounds(&actions);
    assert_eq!(r.iter().map(Vec::len).sum::<usize>(), actions.len());
    // pod-to-pod and pod-to-service share pairs; the two pings share one.
    assert_eq!(r.len(), 2, "{r:?}");
    for round in &r {
        for (n, i) in round.iter().enumerate() {
            for j in &round[n + 1..] {
                let (a, b) = (actions[*i].0, actions[*j].0);
                let same_pods = (a.source() == b.source() && a.destination() == b.destination())
                    || (a.source() == b.destination() && a.destination() == b.source());
                let same_proto = matches!(a, Action::ClientToClient(..))
                    == matches!(b, Action::ClientToClient(..));
                assert!(!(same_pods && same_proto), "{a:?} and {b:?} at once");
            }
        }
    }
}
