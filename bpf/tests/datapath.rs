//! The kernel datapath on real packets: socket load balancing, identity-based policy with
//! verdict events, adoption of pinned state across a reload, and parity with the userspace
//! backend. Runs as root inside network namespaces built by the test (no link to the host's
//! namespace); every address below exists only inside them.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a panic is the failure report"
)]
#![allow(
    clippy::disallowed_methods,
    reason = "the synchronous tests wait with thread::sleep; no runtime is blocked"
)]

use std::net::Ipv4Addr;
use std::time::Duration;

use clustermesh_bpf::testing::Topology;
use clustermesh_bpf::{
    Backend, BackendState, Datapath, Direction, Endpoint, EndpointFlags, EventStream, EventVerdict,
    IpCacheValue, KernelConfig, KernelDatapath, PolicyKey, PolicyValue, Prefix, Proto, ServiceKey,
    UserspaceDatapath, Verdict, VerdictEvent,
};
use clustermesh_bpf::{BackendHealth, EjectReason, OutlierDetection};

const PROBE: &str = env!("CARGO_BIN_EXE_cm-netprobe");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, last)
}

fn load(topo: &Topology) -> KernelDatapath {
    KernelDatapath::load(&KernelConfig {
        bpf_root: topo.bpf_root().to_owned(),
        cluster: "c1".into(),
        node: "n1".into(),
    })
    .expect("loading the datapath")
}

fn backend(last: u8, port: u16, proto: Proto) -> Backend {
    Backend {
        ip: ip(last),
        port,
        proto,
        state: BackendState::Active,
        cluster_id: 1,
    }
}

fn names(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| {
            l.strip_prefix("ok ")
                .unwrap_or_else(|| panic!("failed: {l}"))
        })
        .collect()
}

#[test]
fn socket_lb_translates_vips_spreads_and_refuses_empty_services() {
    let topo = Topology::new(
        PROBE.as_ref(),
        &[
            ("client", ip(2)),
            ("be1", ip(11)),
            ("be2", ip(12)),
            ("be3", ip(13)),
        ],
    );
    for be in ["be1", "be2", "be3"] {
        topo.serve(be, 8080);
    }
    let dp = load(&topo);
    dp.attach_cgroup(topo.cgroup()).unwrap();
    let tcp = ServiceKey {
        vip: VIP,
        port: 80,
        proto: Proto::Tcp,
    };
    let udp = ServiceKey {
        vip: VIP,
        port: 53,
        proto: Proto::Udp,
    };
    dp.upsert_backends(&[
        (1, backend(11, 8080, Proto::Tcp)),
        (2, backend(12, 8080, Proto::Tcp)),
        (3, backend(13, 8080, Proto::Tcp)),
        (11, backend(11, 8080, Proto::Udp)),
        (12, backend(12, 8080, Proto::Udp)),
    ])
    .unwrap();
    dp.upsert_service(tcp, &[1, 2, 3]).unwrap();
    dp.upsert_service(udp, &[11, 12]).unwrap();

    // TCP: every connection reaches a backend, and all three get some.
    let lines = topo.probe("client", true, &["tcp", "10.96.0.10:80", "--count", "60"]);
    let got = names(&lines);
    assert_eq!(got.len(), 60);
    for be in ["be1", "be2", "be3"] {
        assert!(
            got.contains(&be),
            "{be} got no connection out of 60: {got:?}"
        );
    }
    assert!(got.iter().all(|n| ["be1", "be2", "be3"].contains(n)));

    // Unconnected UDP: replies appear to come from the VIP.
    let lines = topo.probe("client", true, &["udp", "10.96.0.10:53", "--count", "20"]);
    assert_eq!(lines.len(), 20);
    for l in &lines {
        assert!(
            l == "ok be1 from 10.96.0.10:53" || l == "ok be2 from 10.96.0.10:53",
            "unexpected UDP reply {l:?}"
        );
    }

    // Connected UDP is translated at connect time.
    let lines = topo.probe(
        "client",
        true,
        &["udp-connected", "10.96.0.10:53", "--count", "10"],
    );
    assert!(
        names(&lines).iter().all(|n| *n == "be1" || *n == "be2"),
        "{lines:?}"
    );

    // A removed backend gets no new connection.
    dp.upsert_service(tcp, &[1, 3]).unwrap();
    let got = topo.probe("client", true, &["tcp", "10.96.0.10:80", "--count", "30"]);
    assert!(
        names(&got).iter().all(|n| *n == "be1" || *n == "be3"),
        "{got:?}"
    );

    // A service without backends is refused at connect time, not passed through.
    dp.upsert_service(tcp, &[]).unwrap();
    let started = std::time::Instant::now();
    let got = topo.probe(
        "client",
        true,
        &["tcp", "10.96.0.10:80", "--timeout-ms", "3000"],
    );
    assert_eq!(got, ["err PermissionDenied 1"]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusal took {:?}",
        started.elapsed()
    );

    // Outside the cgroup nothing is translated.
    let got = topo.probe(
        "client",
        false,
        &["tcp", "10.96.0.10:80", "--timeout-ms", "300"],
    );
    assert!(got[0].starts_with("err"), "{got:?}");

    let snap = dp.snapshot().unwrap();
    assert_eq!(snap.services.get(&tcp), Some(&vec![]));
    assert_eq!(snap.services.get(&udp), Some(&vec![11, 12]));
    dp.unpin_all().unwrap();
}

/// The next event matching `pred`, within 5 s.
async fn expect_event(
    events: &mut EventStream,
    pred: impl Fn(&VerdictEvent) -> bool,
) -> VerdictEvent {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let e = events.next().await.expect("event stream ended");
            if pred(&e) {
                return e;
            }
        }
    })
    .await
    .expect("no matching verdict event within 5 s")
}

const ID_CLIENT: u32 = 65_600;
const ID_OTHER: u32 = 131_200;
const ID_SERVER: u32 = 65_700;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_allows_denies_audits_and_reports_every_verdict() {
    let topo = Topology::new(
        PROBE.as_ref(),
        &[("client", ip(2)), ("other", ip(3)), ("server", ip(20))],
    );
    topo.serve("server", 8080);
    topo.serve("server", 9090);
    let dp = load(&topo);
    dp.upsert_ipcache(&[
        (
            Prefix::host(ip(2)),
            IpCacheValue {
                identity: ID_CLIENT,
                node_ip: None,
                cluster_id: 1,
            },
        ),
        (
            Prefix::host(ip(3)),
            IpCacheValue {
                identity: ID_OTHER,
                node_ip: None,
                cluster_id: 2,
            },
        ),
        (
            Prefix::host(ip(20)),
            IpCacheValue {
                identity: ID_SERVER,
                node_ip: None,
                cluster_id: 1,
            },
        ),
    ])
    .unwrap();
    let enforce = EndpointFlags {
        enforce_ingress: true,
        ..EndpointFlags::default()
    };
    let server = Endpoint {
        endpoint_id: 1,
        identity: ID_SERVER,
        flags: enforce,
        cluster_id: 1,
    };
    dp.upsert_endpoints(&[(ip(20), server)]).unwrap();
    let allow_8080 = PolicyKey {
        endpoint_id: 1,
        identity: ID_CLIENT,
        port: Some((8080, Proto::Tcp)),
        direction: Direction::Ingress,
        port_block: 0,
    };
    dp.upsert_policy(&[(
        allow_8080,
        PolicyValue {
            verdict: Verdict::Allow,
            rule_id: 7,
        },
    )])
    .unwrap();
    let srv = topo.pod("server").host_if.clone();
    dp.attach_endpoint(Some(&topo.node_netns()), &srv).unwrap();
    let mut events = dp.events().unwrap();

    let tcp = |pod: &str, port: u16| {
        topo.probe(
            pod,
            false,
            &["tcp", &format!("10.244.0.20:{port}"), "--timeout-ms", "500"],
        )
    };

    // The allowed identity on the allowed port connects, reported with both identities.
    assert_eq!(tcp("client", 8080), ["ok server"]);
    let e = expect_event(&mut events, |e| e.verdict == EventVerdict::Allowed).await;
    assert_eq!(
        (
            e.src_ip,
            e.dst_ip,
            e.src_identity,
            e.dst_identity,
            e.src_cluster,
            e.dst_cluster
        ),
        (ip(2), ip(20), ID_CLIENT, ID_SERVER, 1, 1)
    );
    assert_eq!(
        (e.direction, e.dport, e.proto, e.endpoint_id, e.rule_id),
        (Direction::Ingress, 8080, 6, 1, 7)
    );

    // Another identity, and another port, are dropped.
    assert_eq!(tcp("other", 8080), ["err TimedOut 0"]);
    let e = expect_event(&mut events, |e| e.verdict == EventVerdict::Denied).await;
    assert_eq!(
        (e.src_identity, e.src_cluster, e.dst_identity, e.rule_id),
        (ID_OTHER, 2, ID_SERVER, 0)
    );
    assert_eq!(tcp("client", 9090), ["err TimedOut 0"]);
    let e = expect_event(&mut events, |e| {
        e.verdict == EventVerdict::Denied && e.dport == 9090
    })
    .await;
    assert_eq!(e.src_identity, ID_CLIENT);

    // Deny beats allow, even a wildcard deny over an exact allow.
    let deny_all_from_client = PolicyKey {
        endpoint_id: 1,
        identity: ID_CLIENT,
        port: None,
        direction: Direction::Ingress,
        port_block: 0,
    };
    dp.upsert_policy(&[(
        deny_all_from_client,
        PolicyValue {
            verdict: Verdict::Deny,
            rule_id: 9,
        },
    )])
    .unwrap();
    assert_eq!(tcp("client", 8080), ["err TimedOut 0"]);
    let e = expect_event(&mut events, |e| {
        e.verdict == EventVerdict::Denied && e.src_identity == ID_CLIENT && e.dport == 8080
    })
    .await;
    assert_eq!(e.rule_id, 9);
    dp.delete_policy(&[deny_all_from_client]).unwrap();
    assert_eq!(tcp("client", 8080), ["ok server"]);

    // Audit mode: what would be dropped passes, and is reported as audited.
    let audit = EndpointFlags {
        enforce_ingress: true,
        audit_ingress: true,
        ..EndpointFlags::default()
    };
    dp.upsert_endpoints(&[(
        ip(20),
        Endpoint {
            flags: audit,
            ..server
        },
    )])
    .unwrap();
    assert_eq!(tcp("other", 9090), ["ok server"]);
    let e = expect_event(&mut events, |e| e.verdict == EventVerdict::Audited).await;
    assert_eq!((e.src_identity, e.dport), (ID_OTHER, 9090));

    // An endpoint without policy in a direction passes.
    dp.upsert_endpoints(&[(
        ip(20),
        Endpoint {
            flags: EndpointFlags::default(),
            ..server
        },
    )])
    .unwrap();
    assert_eq!(tcp("other", 9090), ["ok server"]);

    // Reloading replaces the program on the pinned TC links in place; policy still holds.
    dp.upsert_endpoints(&[(ip(20), server)]).unwrap();
    drop(events);
    drop(dp);
    let dp = load(&topo);
    dp.attach_endpoint(Some(&topo.node_netns()), &srv).unwrap();
    assert_eq!(tcp("other", 8080), ["err TimedOut 0"]);
    assert_eq!(tcp("client", 8080), ["ok server"]);
    dp.detach_endpoint(&srv).unwrap();
    assert_eq!(tcp("other", 8080), ["ok server"]);
    dp.unpin_all().unwrap();
}

/// Pods `client` (10.244.0.2), `other` (.3) and `server` (.20) with their identities in the
/// ipcache (cluster 1), and the datapath loaded.
fn client_other_server() -> (Topology, KernelDatapath) {
    let topo = Topology::new(
        PROBE.as_ref(),
        &[("client", ip(2)), ("other", ip(3)), ("server", ip(20))],
    );
    let dp = load(&topo);
    let ipcache: Vec<_> = [(2, ID_CLIENT), (3, ID_OTHER), (20, ID_SERVER)]
        .into_iter()
        .map(|(last, identity)| {
            (
                Prefix::host(ip(last)),
                IpCacheValue {
                    identity,
                    node_ip: None,
                    cluster_id: 1,
                },
            )
        })
        .collect();
    dp.upsert_ipcache(&ipcache).unwrap();
    (topo, dp)
}

/// Port ranges on real packets: an entry covering an aligned block of ports (here
/// 8064..=8191, k = 7) matches every port in it, and only when the endpoint's flags name the
/// block size; a deny block wins over an exact allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_blocks_match_every_port_of_their_range() {
    let (topo, dp) = client_other_server();
    topo.serve("server", 8080);
    topo.serve("server", 8191);
    topo.serve("server", 9090);
    let with_blocks = |port_blocks| Endpoint {
        endpoint_id: 1,
        identity: ID_SERVER,
        flags: EndpointFlags {
            enforce_ingress: true,
            port_blocks,
            ..EndpointFlags::default()
        },
        cluster_id: 1,
    };
    dp.upsert_endpoints(&[(ip(20), with_blocks(0))]).unwrap();
    let block = PolicyKey {
        endpoint_id: 1,
        identity: ID_CLIENT,
        port: Some((8064, Proto::Tcp)),
        direction: Direction::Ingress,
        port_block: 7,
    };
    let allow = PolicyValue {
        verdict: Verdict::Allow,
        rule_id: 21,
    };
    dp.upsert_policy(&[
        (block, allow),
        (
            PolicyKey {
                identity: ID_OTHER,
                ..block
            },
            allow,
        ),
    ])
    .unwrap();
    let srv = topo.pod("server").host_if.clone();
    dp.attach_endpoint(Some(&topo.node_netns()), &srv).unwrap();
    let tcp = |pod: &str, port: u16| {
        topo.probe(
            pod,
            false,
            &["tcp", &format!("10.244.0.20:{port}"), "--timeout-ms", "500"],
        )
    };

    // The block is only looked for once the endpoint's flags name its size.
    assert_eq!(tcp("client", 8080), ["err TimedOut 0"]);
    dp.upsert_endpoints(&[(ip(20), with_blocks(1 << 6))])
        .unwrap();
    assert_eq!(tcp("client", 8080), ["ok server"]);
    assert_eq!(tcp("client", 8191), ["ok server"]);
    assert_eq!(tcp("client", 9090), ["err TimedOut 0"], "outside the block");
    assert_eq!(tcp("other", 8080), ["ok server"]);

    // A deny block (4096..=8191, k = 12) beats an exact allow of 8080 for `other`.
    dp.upsert_policy(&[
        (
            PolicyKey {
                identity: ID_OTHER,
                port: Some((8080, Proto::Tcp)),
                port_block: 0,
                ..block
            },
            allow,
        ),
        (
            PolicyKey {
                identity: ID_OTHER,
                port: Some((4096, Proto::Tcp)),
                port_block: 12,
                ..block
            },
            PolicyValue {
                verdict: Verdict::Deny,
                rule_id: 22,
            },
        ),
    ])
    .unwrap();
    dp.upsert_endpoints(&[(ip(20), with_blocks((1 << 6) | (1 << 11)))])
        .unwrap();
    assert_eq!(tcp("other", 8080), ["err TimedOut 0"]);
    assert_eq!(tcp("client", 8080), ["ok server"]);
    // The entries read back with their blocks.
    let snap = dp.snapshot().unwrap();
    assert!(snap.policy.contains_key(&block), "{:?}", snap.policy.keys());
    dp.unpin_all().unwrap();
}

/// ICMP policy on real echo requests: an entry with protocol ICMP matches by message type
/// (8, echo request); the reply of an allowed echo passes by conntrack, matched by its echo
/// identifier, so that an echo request the other way is still checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmp_is_matched_by_type_and_replies_by_echo_identifier() {
    let (topo, dp) = client_other_server();
    // The server enforces both directions; it allows echo requests from the client only.
    let server = Endpoint {
        endpoint_id: 1,
        identity: ID_SERVER,
        flags: EndpointFlags {
            enforce_ingress: true,
            enforce_egress: true,
            ..EndpointFlags::default()
        },
        cluster_id: 1,
    };
    dp.upsert_endpoints(&[(ip(20), server)]).unwrap();
    let echo_from_client = PolicyKey {
        endpoint_id: 1,
        identity: ID_CLIENT,
        port: Some((8, Proto::Icmp)),
        direction: Direction::Ingress,
        port_block: 0,
    };
    // Its egress allows everything to `other` only.
    let out_to_other = PolicyKey {
        endpoint_id: 1,
        identity: ID_OTHER,
        port: None,
        direction: Direction::Egress,
        port_block: 0,
    };
    dp.upsert_policy(&[
        (
            echo_from_client,
            PolicyValue {
                verdict: Verdict::Allow,
                rule_id: 11,
            },
        ),
        (
            out_to_other,
            PolicyValue {
                verdict: Verdict::Allow,
                rule_id: 13,
            },
        ),
    ])
    .unwrap();
    let srv = topo.pod("server").host_if.clone();
    dp.attach_endpoint(Some(&topo.node_netns()), &srv).unwrap();
    let mut events = dp.events().unwrap();
    let ping = |from: &str, to: &str| topo.probe(from, false, &["icmp", to, "--timeout-ms", "500"]);

    // Allowed: the request by its type, the reply by conntrack (egress is enforced and allows
    // nothing).
    assert_eq!(ping("client", "10.244.0.20"), ["ok 10.244.0.20"]);
    let e = expect_event(&mut events, |e| e.verdict == EventVerdict::Allowed).await;
    assert_eq!(
        (e.src_identity, e.proto, e.dport, e.rule_id),
        (ID_CLIENT, 1, 8, 11)
    );
    // Another identity: dropped at ingress.
    assert_eq!(ping("other", "10.244.0.20"), ["err TimedOut 0"]);
    let e = expect_event(&mut events, |e| e.verdict == EventVerdict::Denied).await;
    assert_eq!((e.src_identity, e.proto, e.dport), (ID_OTHER, 1, 8));
    // The server's own echo request to the client is not a reply of the client's echo: its
    // egress allows nothing, so it is dropped, although the client's echo is in conntrack.
    assert_eq!(ping("client", "10.244.0.20"), ["ok 10.244.0.20"]);
    assert_eq!(ping("server", "10.244.0.2"), ["err TimedOut 0"]);
    let e = expect_event(&mut events, |e| {
        e.verdict == EventVerdict::Denied && e.src_identity == ID_SERVER
    })
    .await;
    assert_eq!((e.direction, e.proto, e.dport), (Direction::Egress, 1, 8));
    // The server's echo to `other` (allowed egress) is recorded with its identifier; its
    // reply passes. An echo *request* from `other` with the same identifier is no reply:
    // checked by policy, and dropped (conntrack never lets an echo request, or any ICMP
    // message but the reply of a recorded echo, past policy).
    let ping_id = |from: &str, to: &str, id: &str| {
        topo.probe(
            from,
            false,
            &["icmp", to, "--timeout-ms", "500", "--ident", id],
        )
    };
    assert_eq!(ping_id("server", "10.244.0.3", "0"), ["ok 10.244.0.3"]);
    assert_eq!(ping_id("other", "10.244.0.20", "0"), ["err TimedOut 0"]);
    // A deny of echo requests from the client wins over the allow; TCP is not affected by
    // an ICMP entry (nothing serves here, and no TCP entry exists either way).
    dp.upsert_policy(&[(
        PolicyKey {
            identity: 0,
            ..echo_from_client
        },
        PolicyValue {
            verdict: Verdict::Deny,
            rule_id: 12,
        },
    )])
    .unwrap();
    assert_eq!(ping("client", "10.244.0.20"), ["err TimedOut 0"]);
    let e = expect_event(&mut events, |e| {
        e.verdict == EventVerdict::Denied && e.src_identity == ID_CLIENT
    })
    .await;
    assert_eq!(e.rule_id, 12);
    drop(events);
    dp.unpin_all().unwrap();
}

/// A direction left open still records its flows: a server whose egress is enforced (and
/// allows nothing) answers what its open ingress let in, and a client whose ingress is
/// enforced gets the answers of what it opened, by conntrack (Cilium's behaviour: replies
/// are never subject to policy). What the enforced direction itself opens stays dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_direction_records_flows_so_replies_pass_the_enforced_one() {
    let (topo, dp) = client_other_server();
    topo.serve("server", 8080);
    topo.serve("client", 9090);
    let only = |identity, egress: bool| Endpoint {
        endpoint_id: if egress { 1 } else { 2 },
        identity,
        flags: EndpointFlags {
            enforce_egress: egress,
            enforce_ingress: !egress,
            ..EndpointFlags::default()
        },
        cluster_id: 1,
    };
    dp.upsert_endpoints(&[
        (ip(20), only(ID_SERVER, true)),
        (ip(2), only(ID_CLIENT, false)),
    ])
    .unwrap();
    for pod in ["server", "client"] {
        let host_if = topo.pod(pod).host_if.clone();
        dp.attach_endpoint(Some(&topo.node_netns()), &host_if)
            .unwrap();
    }
    let mut events = dp.events().unwrap();
    let probe = |from: &str, args: &[&str]| topo.probe(from, false, args);

    // client -> server: the client's egress and the server's ingress are open; the SYN-ACK
    // passes the server's enforced egress and the client's enforced ingress as a reply.
    assert_eq!(
        probe(
            "client",
            &["tcp", "10.244.0.20:8080", "--timeout-ms", "500"]
        ),
        ["ok server"]
    );
    assert_eq!(
        probe("client", &["icmp", "10.244.0.20", "--timeout-ms", "500"]),
        ["ok 10.244.0.20"]
    );
    // server -> client: opened by the enforced egress, which allows nothing.
    assert_eq!(
        probe("server", &["tcp", "10.244.0.2:9090", "--timeout-ms", "500"]),
        ["err TimedOut 0"]
    );
    let e = expect_event(&mut events, |e| e.verdict == EventVerdict::Denied).await;
    assert_eq!(
        (e.direction, e.src_identity, e.dport, e.rule_id),
        (Direction::Egress, ID_SERVER, 9090, 0)
    );
    // other -> client: the client's enforced ingress allows nothing.
    topo.serve("client", 9091);
    assert_eq!(
        probe("other", &["tcp", "10.244.0.2:9091", "--timeout-ms", "500"]),
        ["err TimedOut 0"]
    );
    // The server now enforces ingress too and allows the client on 8080: the flow the
    // client's open egress recorded does not hide it from the server's check, which
    // reports it allowed by its rule.
    dp.upsert_endpoints(&[(
        ip(20),
        Endpoint {
            flags: EndpointFlags {
                enforce_egress: true,
                enforce_ingress: true,
                ..EndpointFlags::default()
            },
            ..only(ID_SERVER, true)
        },
    )])
    .unwrap();
    dp.upsert_policy(&[(
        PolicyKey {
            endpoint_id: 1,
            identity: ID_CLIENT,
            port: Some((8080, Proto::Tcp)),
            direction: Direction::Ingress,
            port_block: 0,
        },
        PolicyValue {
            verdict: Verdict::Allow,
            rule_id: 31,
        },
    )])
    .unwrap();
    assert_eq!(
        probe(
            "client",
            &["tcp", "10.244.0.20:8080", "--timeout-ms", "500"]
        ),
        ["ok server"]
    );
    let e = expect_event(&mut events, |e| {
        e.verdict == EventVerdict::Allowed && e.direction == Direction::Ingress
    })
    .await;
    assert_eq!((e.src_identity, e.dport, e.rule_id), (ID_CLIENT, 8080, 31));
    drop(events);
    dp.unpin_all().unwrap();
}

/// The service of the outlier tests: be1 and be2 serve, be3 is the one that fails.
fn outlier_topology(probe_interval: Duration) -> (Topology, KernelDatapath, EventStream) {
    let topo = Topology::new(
        PROBE.as_ref(),
        &[
            ("client", ip(2)),
            ("be1", ip(11)),
            ("be2", ip(12)),
            ("be3", ip(13)),
        ],
    );
    topo.serve("be1", 8080);
    topo.serve("be2", 8080);
    let dp = load(&topo);
    dp.attach_cgroup(topo.cgroup()).unwrap();
    dp.set_outlier_detection(&OutlierDetection {
        probe_interval,
        ..OutlierDetection::default()
    })
    .unwrap();
    dp.upsert_backends(&[
        (1, backend(11, 8080, Proto::Tcp)),
        (2, backend(12, 8080, Proto::Tcp)),
        (3, backend(13, 8080, Proto::Tcp)),
    ])
    .unwrap();
    dp.upsert_service(
        ServiceKey {
            vip: VIP,
            port: 80,
            proto: Proto::Tcp,
        },
        &[1, 2, 3],
    )
    .unwrap();
    let events = dp.events().unwrap();
    (topo, dp, events)
}

/// Runs `count` connections from the client to the VIP, one after the other (on a blocking
/// thread), and returns their result lines.
async fn connects(topo: &Topology, count: u32, timeout_ms: u32) -> Vec<String> {
    let count = count.to_string();
    let timeout = timeout_ms.to_string();
    tokio::task::block_in_place(|| {
        topo.probe(
            "client",
            true,
            &[
                "tcp",
                "10.96.0.10:80",
                "--count",
                &count,
                "--timeout-ms",
                &timeout,
            ],
        )
    })
}

fn failed(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| !l.starts_with("ok ")).collect()
}

fn be3_health(dp: &KernelDatapath) -> BackendHealth {
    let all = dp.backend_health().unwrap();
    all.into_iter()
        .find(|h| h.ip == ip(13))
        .expect("be3 has a health entry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_refuses_is_ejected_after_three_failed_connects_and_readmitted_when_it_serves()
 {
    let (topo, dp, mut events) = outlier_topology(Duration::from_millis(500));
    // be3's pod is up but nothing listens: every connect to it is refused (a crashed backend).
    let lines = connects(&topo, 60, 500).await;
    let bad = failed(&lines);
    assert_eq!(
        bad.len(),
        3,
        "exactly the three failed connects that eject it: {lines:?}"
    );
    assert!(
        bad.iter()
            .all(|l| l.as_str() == "err ConnectionRefused 111"),
        "{bad:?}"
    );
    // Every later connection went to be1 or be2.
    let last_bad = lines.iter().rposition(|l| !l.starts_with("ok ")).unwrap();
    assert!(
        names(&lines[last_bad + 1..])
            .iter()
            .all(|n| *n == "be1" || *n == "be2")
    );
    let h = be3_health(&dp);
    assert_eq!(h.failures, 3);
    assert_eq!(h.ejections, 1);
    assert_eq!(h.ejected.map(|(_, why)| why), Some(EjectReason::Failures));
    let e = expect_event(&mut events, |e| e.verdict == EventVerdict::Ejected).await;
    assert_eq!(
        (e.dst_ip, e.dport, e.proto, e.rule_id, e.endpoint_id),
        (ip(13), 8080, 6, 3, 1)
    );

    // be3 comes back; after the probe interval a trial connection reaches it and it is in
    // selection again.
    topo.serve("be3", 8080);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let lines = connects(&topo, 60, 500).await;
    assert!(failed(&lines).is_empty(), "{lines:?}");
    assert!(
        names(&lines).iter().filter(|n| **n == "be3").count() >= 5,
        "be3 is selected again: {lines:?}"
    );
    let h = be3_health(&dp);
    assert_eq!((h.failures, h.ejected), (0, None));
    expect_event(&mut events, |e| {
        e.verdict == EventVerdict::Readmitted && e.dst_ip == ip(13)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_backend_is_ejected_within_the_window() {
    let (topo, dp, mut events) = outlier_topology(Duration::from_secs(30));
    topo.serve("be3", 8080);
    // be3 answers first; then its packets vanish (a partition: no RST, no ICMP).
    assert!(failed(&connects(&topo, 20, 500).await).is_empty());
    tokio::task::block_in_place(|| {
        clustermesh_bpf::testing::sh(
            "ip",
            &[
                "-n",
                topo.node_ns(),
                "route",
                "replace",
                "blackhole",
                "10.244.0.13/32",
            ],
        )
    });
    let started = std::time::Instant::now();
    // Clients give up after 300 ms; the backend is out after at most three of those, or
    // after the 1 s window.
    let lines = connects(&topo, 60, 300).await;
    let bad = failed(&lines);
    assert!(
        (1..=3).contains(&bad.len()),
        "1 to 3 connects lost to the black hole: {lines:?}"
    );
    assert!(bad.iter().all(|l| l.starts_with("err TimedOut")), "{bad:?}");
    assert_eq!(be3_health(&dp).ejections, 1);
    let e = expect_event(&mut events, |e| e.verdict == EventVerdict::Ejected).await;
    assert_eq!(e.dst_ip, ip(13));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_backend_is_never_ejected_from_selection_and_each_client_learns_alone() {
    let (topo, dp, _events) = outlier_topology(Duration::from_secs(30));
    let key = ServiceKey {
        vip: VIP,
        port: 80,
        proto: Proto::Tcp,
    };
    // A service whose only backend refuses: ejected, but still selected (panic threshold),
    // so connects keep reaching it (refused by it, not by the load balancer).
    dp.upsert_service(key, &[3]).unwrap();
    let lines = connects(&topo, 10, 300).await;
    assert_eq!(
        lines,
        vec!["err ConnectionRefused 111".to_owned(); 10],
        "never EPERM from the load balancer"
    );
    assert!(be3_health(&dp).ejected.is_some());

    // Another client (its own network namespace) has its own record: be3 is selected for it
    // until it has seen its own failures.
    dp.upsert_service(key, &[1, 2, 3]).unwrap();
    let other = tokio::task::block_in_place(|| {
        topo.probe(
            "be1",
            true,
            &[
                "tcp",
                "10.96.0.10:80",
                "--count",
                "60",
                "--timeout-ms",
                "300",
            ],
        )
    });
    assert_eq!(failed(&other).len(), 3, "{other:?}");
    let records: Vec<BackendHealth> = dp
        .backend_health()
        .unwrap()
        .into_iter()
        .filter(|h| h.ip == ip(13))
        .collect();
    assert_eq!(records.len(), 2, "one record per client: {records:?}");
    assert!(records.iter().all(|h| h.ejected.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_outlier_detection_off_nothing_is_ejected() {
    let (topo, dp, _events) = outlier_topology(Duration::from_secs(30));
    dp.set_outlier_detection(&OutlierDetection::off()).unwrap();
    let lines = connects(&topo, 60, 300).await;
    assert!(
        failed(&lines).len() >= 8,
        "be3 keeps getting its third of the connects: {lines:?}"
    );
    assert!(
        dp.backend_health()
            .unwrap()
            .iter()
            .all(|h| h.ejected.is_none())
    );
}

#[test]
fn reload_adopts_pinned_maps_and_links_without_interrupting_clients() {
    let topo = Topology::new(
        PROBE.as_ref(),
        &[("client", ip(2)), ("be1", ip(11)), ("be2", ip(12))],
    );
    topo.serve("be1", 8080);
    topo.serve("be2", 8080);
    let dp = load(&topo);
    dp.attach_cgroup(topo.cgroup()).unwrap();
    let tcp = ServiceKey {
        vip: VIP,
        port: 80,
        proto: Proto::Tcp,
    };
    dp.upsert_backends(&[
        (1, backend(11, 8080, Proto::Tcp)),
        (2, backend(12, 8080, Proto::Tcp)),
    ])
    .unwrap();
    dp.upsert_service(tcp, &[1, 2]).unwrap();
    let before = dp.snapshot().unwrap();

    let looping = topo.spawn_probe(
        "client",
        true,
        &["tcp-loop", "10.96.0.10:80", "--duration-ms", "3000"],
    );
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        drop(dp_take(&topo));
    }
    drop(dp);
    let dp = load(&topo);
    dp.attach_cgroup(topo.cgroup()).unwrap();
    assert_eq!(
        dp.snapshot().unwrap(),
        before,
        "the reload adopted the pinned maps as they were"
    );
    let out = looping.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let fields: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(fields.len(), 6, "{summary}");
    let attempts: u64 = fields[1].parse().unwrap();
    assert!(
        attempts > 10,
        "the client made only {attempts} attempts: {summary}"
    );
    assert_eq!(
        fields[5], "0",
        "connections failed across the reloads: {summary}"
    );
    dp.unpin_all().unwrap();
}

/// A second loader on the same pins, attached again: it adopts and is dropped.
fn dp_take(topo: &Topology) -> KernelDatapath {
    let dp = load(topo);
    dp.attach_cgroup(topo.cgroup()).unwrap();
    dp
}

/// One sequence of calls for both backends.
fn program(dp: &dyn Datapath) {
    let tcp = ServiceKey {
        vip: VIP,
        port: 80,
        proto: Proto::Tcp,
    };
    let udp = ServiceKey {
        vip: Ipv4Addr::new(10, 96, 0, 11),
        port: 53,
        proto: Proto::Udp,
    };
    let backends: Vec<_> = (1..=40u8)
        .map(|i| (u32::from(i), backend(i, 8080, Proto::Tcp)))
        .collect();
    dp.upsert_backends(&backends).unwrap();
    dp.upsert_backends(&[(
        100,
        Backend {
            state: BackendState::Terminating,
            ..backend(50, 53, Proto::Udp)
        },
    )])
    .unwrap();
    dp.upsert_service(tcp, &(1..=40).collect::<Vec<_>>())
        .unwrap();
    dp.upsert_service(tcp, &[3, 1, 2]).unwrap();
    dp.upsert_service(udp, &[100]).unwrap();
    dp.delete_backends(&(4..=40).collect::<Vec<_>>()).unwrap();
    dp.upsert_ipcache(&[
        (
            Prefix {
                addr: Ipv4Addr::new(10, 245, 0, 77),
                len: 24,
            },
            IpCacheValue {
                identity: 2,
                node_ip: None,
                cluster_id: 0,
            },
        ),
        (
            Prefix::host(ip(9)),
            IpCacheValue {
                identity: 70_000,
                node_ip: Some(Ipv4Addr::new(10, 1, 0, 1)),
                cluster_id: 1,
            },
        ),
        (
            Prefix::host(ip(10)),
            IpCacheValue {
                identity: 70_001,
                node_ip: None,
                cluster_id: 1,
            },
        ),
    ])
    .unwrap();
    dp.upsert_ipcache(&[(
        Prefix::host(ip(11)),
        IpCacheValue {
            identity: 70_002,
            node_ip: None,
            cluster_id: 3,
        },
    )])
    .unwrap();
    dp.delete_ipcache(&[Prefix::host(ip(10))]).unwrap();
    let flags = EndpointFlags {
        enforce_ingress: true,
        audit_egress: true,
        ..EndpointFlags::default()
    };
    dp.upsert_endpoints(&[(
        ip(9),
        Endpoint {
            endpoint_id: 4,
            identity: 70_000,
            flags,
            cluster_id: 1,
        },
    )])
    .unwrap();
    let k = |identity, port| PolicyKey {
        endpoint_id: 4,
        identity,
        port,
        direction: Direction::Ingress,
        port_block: 0,
    };
    dp.upsert_policy(&[
        (
            k(70_002, Some((80, Proto::Tcp))),
            PolicyValue {
                verdict: Verdict::Allow,
                rule_id: 1,
            },
        ),
        (
            k(0, None),
            PolicyValue {
                verdict: Verdict::Deny,
                rule_id: 2,
            },
        ),
        (
            k(70_003, Some((53, Proto::Udp))),
            PolicyValue {
                verdict: Verdict::Audit,
                rule_id: 3,
            },
        ),
    ])
    .unwrap();
    dp.delete_policy(&[k(0, None)]).unwrap();
    dp.delete_service(udp).unwrap();
}

#[test]
fn userspace_and_kernel_backends_hold_the_same_entries() {
    let topo = Topology::new(PROBE.as_ref(), &[]);
    let kernel = load(&topo);
    let user = UserspaceDatapath::new();
    program(&kernel);
    program(&user);
    let (k, u) = (kernel.snapshot().unwrap(), user.snapshot().unwrap());
    assert_eq!(k, u);
    assert_eq!(k.services.values().next(), Some(&vec![3, 1, 2]));
    assert_eq!(k.backends.len(), 4);
    assert_eq!(k.ipcache.len(), 3);
    assert!(k.ipcache.contains_key(&Prefix {
        addr: Ipv4Addr::new(10, 245, 0, 0),
        len: 24
    }));
    assert_eq!(k.policy.len(), 2);
    kernel.unpin_all().unwrap();
}
