//! Two clusters of real processes (apiservers A and B, B's node agent on the eBPF datapath)
//! and pods in network namespaces:
//! - a global service with backends in both clusters is programmed with both, and a client
//!   in B reaches A's backend through the VIP;
//! - a cross-cluster policy on B's web pod allows A's frontend and drops A's other pod, with
//!   real connections, and lets in another node of A as `remote-node`;
//! - when A is killed, its backends leave B's maps after the withdraw delay and new
//!   connections all go to B's backend.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]
#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous test: no async runtime to block"
)]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use clustermesh_e2e::{Agent, Cluster, Topology, binary, tally, wait_until};

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod, annotations: {service.cilium.io/global: "true"}}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
"#;

fn slice(ip: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: prod, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{ip}]}}]\n"
    )
}

fn pod(name: &str, app: &str, ip: &str, host: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: prod, labels: {{app: {app}}}}}\nstatus: {{podIP: {ip}, hostIP: {host}}}\n"
    )
}

fn node(name: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
    )
}

const POLICY: &str = r#"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend, io.cilium.k8s.policy.cluster: c1}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - fromEntities: [remote-node]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

/// The IDs of the kernel's TCX links (bpftool 7.1 prints the type as its number, 11).
fn tcx_links() -> Vec<u64> {
    let out = clustermesh_bpf::testing::sh("bpftool", &["-j", "link", "show"]);
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    links
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["type"] == 11 || l["type"] == "tcx")
        .map(|l| l["id"].as_u64().unwrap())
        .collect()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn backends(agent: &Agent) -> usize {
    agent.get("/explain/service/prod/web")["frontends"][0]["backends"]
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn global_service_policy_and_failover_across_two_clusters() {
    let topo = Topology::new(
        &binary("cm-netprobe"),
        &[
            ("a-web", ip("10.244.1.10")),
            ("a-frontend", ip("10.244.1.20")),
            ("a-other", ip("10.244.1.21")),
            // Not a pod: the address of another node of cluster A.
            ("a-node2", ip("10.244.1.30")),
            ("b-web", ip("10.244.2.10")),
            ("b-client", ip("10.244.2.20")),
        ],
    );
    topo.serve("a-web", 8080);
    topo.serve("b-web", 8080);

    let mut a = Cluster::new("c1", 1);
    let mut b = Cluster::new("c2", 2);
    b.import(&a);
    // A exports to B without importing from it.
    a.configure("allowedRemotes: [c2]\n");
    b.configure("staleness: {unreachableAfterMillis: 600, withdrawAfterMillis: 600, restoreAfterMillis: 1500, keepLastBackends: false}\n");
    a.write_manifest(
        "a.yaml",
        &format!(
            "{SERVICE}{}{}{}{}{}{}",
            slice("10.244.1.10"),
            pod("a-web", "web", "10.244.1.10", "192.0.2.1"),
            pod("a-frontend", "frontend", "10.244.1.20", "192.0.2.1"),
            pod("a-other", "other", "10.244.1.21", "192.0.2.1"),
            node("a-node", "192.0.2.1"),
            node("a-node2", "10.244.1.30"),
        ),
    );
    b.write_manifest(
        "b.yaml",
        &format!(
            "{SERVICE}{}{}{}{}{}{}{POLICY}",
            slice("10.244.2.10"),
            pod("b-web", "web", "10.244.2.10", "192.0.2.2"),
            pod("b-client", "client", "10.244.2.20", "192.0.2.2"),
            pod("b-routed", "other", "10.244.9.9", "192.0.2.2"),
            pod("b-dummy", "other", "10.244.8.8", "192.0.2.2"),
            node("b-node", "192.0.2.2"),
        ),
    );
    // Two local endpoints whose routes do not lead to an endpoint's own interface: one
    // through a gateway, one straight to a bridge (not a veth).
    let ns = topo.node_ns();
    for args in [
        &["-n", ns, "link", "add", "cmbr0", "type", "bridge"][..],
        &["-n", ns, "link", "set", "cmbr0", "up"],
        &["-n", ns, "addr", "add", "10.250.0.1/24", "dev", "cmbr0"],
        &[
            "-n",
            ns,
            "route",
            "add",
            "10.244.9.0/24",
            "via",
            "10.250.0.254",
        ],
        &["-n", ns, "route", "add", "10.244.8.8/32", "dev", "cmbr0"],
    ] {
        clustermesh_bpf::testing::sh("ip", args);
    }
    a.start();
    b.start();
    let links_before = tcx_links();
    let agent = Agent::start(&b.agent_config("b-node", &topo));

    // The global service gets both clusters' backends.
    wait_until(Duration::from_secs(30), "both backends in B's maps", || {
        backends(&agent) == 2
    });
    let status = agent.get("/status");
    for pod_ip in ["10.244.2.10", "10.244.2.20"] {
        let e = &status["endpoints"][pod_ip];
        assert!(
            e["error"].is_null() && e["interface"].is_string(),
            "{pod_ip}: {e}\n{}",
            agent.log()
        );
    }
    // The refused ones: a reason each, and nothing attached to the bridge.
    let refused = |ip: &str| {
        let e = agent.get("/status")["endpoints"][ip].clone();
        assert!(e["interface"].is_null(), "{ip}: {e}");
        e["error"].as_str().unwrap_or_default().to_owned()
    };
    let routed = refused("10.244.9.9");
    assert!(
        routed.contains("through the gateway 10.250.0.254 on cmbr0"),
        "{routed}"
    );
    let explain = agent.get("/explain/endpoint/10.244.9.9");
    assert_eq!(
        explain["attachment"]["error"].as_str(),
        Some(routed.as_str()),
        "{explain}"
    );
    let dummy = refused("10.244.8.8");
    assert!(
        dummy.contains("cmbr0, which is a bridge interface, not a veth"),
        "{dummy}"
    );
    let pins = topo.bpf_root().join("c2").join("b-node");
    let pinned: Vec<String> = std::fs::read_dir(&pins)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // The agent pins every link it makes: b-web's are there, none for the bridge.
    let web_if = topo.pod("b-web").host_if.clone();
    assert!(pinned.iter().any(|p| p.contains(&web_if)), "{pinned:?}");
    let explain = agent.get("/explain/endpoint/10.244.2.10");
    assert_eq!(
        explain["attachment"]["interface"],
        web_if.as_str(),
        "{explain}"
    );
    // In the kernel: exactly two TCX links (ingress and egress) for each of the two attached
    // endpoints, none for the refused ones.
    let new: Vec<u64> = tcx_links()
        .into_iter()
        .filter(|id| !links_before.contains(id))
        .collect();
    assert_eq!(new.len(), 4, "new TCX links: {new:?}");
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "policy programs attached to the endpoint's interface ip=10.244.2.10 interface={web_if}"
        )),
        "{log}"
    );
    assert_eq!(
        log.matches("policy programs not attached ip=10.244.9.9")
            .count(),
        1,
        "a refusal is logged once: {log}"
    );
    assert!(!pinned.iter().any(|p| p.contains("cmbr0")), "{pinned:?}");
    let lines = topo.probe("b-client", true, &["tcp", "10.96.0.10:80", "--count", "60"]);
    let (names, failed) = tally(&lines);
    assert_eq!(failed, 0, "{lines:?}");
    assert!(
        names.get("a-web").is_some_and(|n| *n > 0) && names.get("b-web").is_some_and(|n| *n > 0),
        "both clusters answer through the VIP: {names:?}"
    );

    // A's backend crashes (its apiserver lives on, so nothing is withdrawn): outlier
    // detection takes it out of b-client's selection after three refused connects, and
    // `observe`, `explain service` and the metrics say so.
    let observer = std::process::Command::new(binary("clustermesh"))
        .args([
            "observe",
            "--agent",
            &agent.admin,
            "--verdict",
            "ejected",
            "--count",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    topo.kill_pod_processes("a-web");
    let lines = topo.probe("b-client", true, &["tcp", "10.96.0.10:80", "--count", "60"]);
    let (names, failed) = tally(&lines);
    assert_eq!(
        failed, 3,
        "three refused connects, then only b-web: {lines:?}"
    );
    assert_eq!(names.get("b-web"), Some(&57), "{lines:?}");
    let out = observer.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        seen.contains(" EJECTED    backend 10.244.1.10:8080 (prod/a-web, c1, identity ")
            && seen.ends_with("): ejected for a client: 3 failed connects\n"),
        "{seen}"
    );
    let plan = agent.get("/explain/service/prod/web");
    let a_web = plan["frontends"][0]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["ip"] == "10.244.1.10")
        .cloned()
        .unwrap();
    assert_eq!(
        a_web["reason"], "selected",
        "still a backend of the service: {plan}"
    );
    assert_eq!(a_web["outlier"]["ejectedClients"], 1, "{a_web}");
    assert_eq!(a_web["outlier"]["reason"], "failures", "{a_web}");
    let explained = std::process::Command::new(binary("clustermesh"))
        .args(["explain", "service", "prod/web", "--agent", &agent.admin])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&explained.stdout);
    let row = text
        .lines()
        .find(|l| l.contains("10.244.1.10:8080"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("in      selected; ejected (3 failed connects, ") && row.ends_with(" s ago)"),
        "{text}"
    );
    assert_eq!(
        agent.metric("clustermesh_backend_ejections_total{reason=\"failures\"}"),
        1.0
    );
    // It comes back: after the probe interval (2 s) a trial connect reaches it again.
    topo.serve("a-web", 8080);
    std::thread::sleep(Duration::from_millis(2_200));
    let lines = topo.probe("b-client", true, &["tcp", "10.96.0.10:80", "--count", "60"]);
    let (names, failed) = tally(&lines);
    assert_eq!(failed, 0, "{lines:?}");
    assert!(names.get("a-web").is_some_and(|n| *n > 5), "{names:?}");
    assert_eq!(agent.metric("clustermesh_backend_readmissions_total"), 1.0);
    assert!(
        agent.get("/explain/service/prod/web")["frontends"][0]["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["outlier"]["ejectedClients"] != 1),
        "no backend is ejected any more"
    );

    // Cross-cluster policy on b-web: A's frontend in, A's other pod dropped.
    let lines = topo.probe(
        "a-frontend",
        false,
        &[
            "tcp",
            "10.244.2.10:8080",
            "--count",
            "3",
            "--timeout-ms",
            "3000",
        ],
    );
    assert_eq!(
        tally(&lines),
        ([("b-web".to_owned(), 3)].into(), 0),
        "{lines:?}"
    );
    // `clustermesh observe` sees the drops live, with both identities and clusters.
    let observer = std::process::Command::new(binary("clustermesh"))
        .args([
            "observe",
            "--agent",
            &agent.admin,
            "--verdict",
            "denied",
            "--count",
            "1",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let lines = topo.probe(
        "a-other",
        false,
        &[
            "tcp",
            "10.244.2.10:8080",
            "--count",
            "3",
            "--timeout-ms",
            "500",
        ],
    );
    assert_eq!(tally(&lines), (Default::default(), 3), "{lines:?}");
    // A node of A is `remote-node` to B (its address is in B's ipcache with identity 6), not
    // world: `fromEntities: [remote-node]` lets it in.
    let lines = topo.probe(
        "a-node2",
        false,
        &[
            "tcp",
            "10.244.2.10:8080",
            "--count",
            "2",
            "--timeout-ms",
            "3000",
        ],
    );
    assert_eq!(
        tally(&lines),
        ([("b-web".to_owned(), 2)].into(), 0),
        "{lines:?}"
    );
    let out = observer.wait_with_output().unwrap();
    assert!(out.status.success());
    let event: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(event["src"], "10.244.1.21", "{event}");
    assert_eq!(event["dst"], "10.244.2.10");
    assert_eq!(
        (event["srcCluster"].clone(), event["dstCluster"].clone()),
        (1.into(), 2.into())
    );
    assert_eq!(event["dport"], 8080);
    // As Hubble shows it: names of both clusters and pods, the verdict and drop reason.
    let flow = &event["flow"];
    assert_eq!(flow["verdict"], "DROPPED", "{event}");
    assert_eq!(flow["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(flow["traffic_direction"], "INGRESS");
    assert_eq!(
        (&flow["source"]["cluster_name"], &flow["source"]["pod_name"]),
        (&"c1".into(), &"a-other".into())
    );
    assert_eq!(flow["destination"]["pod_name"], "b-web");
    assert_eq!(flow["l4"]["TCP"]["destination_port"], 8080);
    // The agent kept them: `--last` gives the last drops afterwards, oldest first, and stops
    // with --no-follow; `--cluster` takes a name.
    let out = std::process::Command::new(binary("clustermesh"))
        .args([
            "observe",
            "--agent",
            &agent.admin,
            "--verdict",
            "dropped",
            "--cluster",
            "c1",
            "--last",
            "50",
            "--no-follow",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let dropped: Vec<&str> = text.lines().collect();
    assert!(dropped.len() >= 3, "{text}");
    for line in &dropped {
        assert!(
            line.contains(" DROPPED    ingress 10.244.1.21 (prod/a-other, c1, identity ")
                && line.contains("-> 10.244.2.10:8080 (prod/b-web, c2, identity ")
                && line.ends_with(" TCP rule 0 (default deny)"),
            "{line}"
        );
    }
    let metrics = {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(&agent.admin).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.0\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(
            head.lines().any(|l| l.eq_ignore_ascii_case(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            )),
            "{head}"
        );
        assert!(body.ends_with("# EOF\n"), "OpenMetrics text");
        assert!(
            body.contains("# TYPE clustermesh_build info\n")
                && body.contains(",component=\"agent\"} 1\n"),
            "{body}"
        );
        body.to_owned()
    };
    let drops: u64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("clustermesh_policy_verdicts_total{")
                && l.contains("verdict=\"dropped\"")
                && l.contains("direction=\"ingress\"")
                && l.contains("source_cluster=\"c1\"")
                && l.contains("destination_cluster=\"c2\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no dropped c1 -> c2 series: {metrics}"));
    assert!(drops >= dropped.len() as u64, "{drops} < {}", dropped.len());
    let explain = agent.get("/explain/endpoint/10.244.2.10");
    assert_eq!(explain["enforce_ingress"], true, "{explain}");

    // A dies: after the withdraw delay its backend leaves B's maps.
    let killed = Instant::now();
    a.kill();
    wait_until(
        Duration::from_secs(30),
        "A's backend to be withdrawn",
        || backends(&agent) == 1,
    );
    let withdrawn_after = killed.elapsed();
    let plan = agent.get("/explain/service/prod/web");
    let a_web = plan["frontends"][0]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["ip"] == "10.244.1.10")
        .cloned()
        .unwrap();
    assert_eq!(a_web["reason"], "cluster-withdrawn", "{plan}");
    assert!(
        withdrawn_after >= Duration::from_millis(600),
        "withdrawn after {withdrawn_after:?}, before the configured delay"
    );
    let lines = topo.probe("b-client", true, &["tcp", "10.96.0.10:80", "--count", "40"]);
    assert_eq!(
        tally(&lines),
        ([("b-web".to_owned(), 40)].into(), 0),
        "every new connection goes to B"
    );

    // An endpoint that vanishes loses its programs; one that appears gets them.
    b.write_manifest(
        "b.yaml",
        &format!(
            "{SERVICE}{}{}{}{}{POLICY}",
            slice("10.244.2.10"),
            pod("b-web", "web", "10.244.2.10", "192.0.2.2"),
            pod("b-client-2", "client", "10.244.2.21", "192.0.2.2"),
            node("b-node", "192.0.2.2"),
        ),
    );
    let client_if = topo.pod("b-client").host_if.clone();
    wait_until(
        Duration::from_secs(30),
        "b-client's programs to be detached",
        || {
            agent.get("/status")["endpoints"]
                .get("10.244.2.20")
                .is_none()
        },
    );
    let pins = topo.bpf_root().join("c2").join("b-node");
    assert!(
        !pins
            .join(format!("link_tc_{client_if}_cm_from_endpoint"))
            .exists(),
        "the pinned link of a vanished endpoint is removed"
    );
    assert!(
        pins.join(format!(
            "link_tc_{}_cm_to_endpoint",
            topo.pod("b-web").host_if
        ))
        .exists()
    );
    // 10.244.2.21 has no interface in this topology: the agent reports why it is not attached.
    wait_until(
        Duration::from_secs(30),
        "the new endpoint to be tried",
        || agent.get("/status")["endpoints"]["10.244.2.21"]["error"].is_string(),
    );
}
