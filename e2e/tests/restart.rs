//! The agent killed with SIGKILL and restarted while a client connects through a service VIP
//! in a loop: no connection fails, and the restarted agent adopts the pinned maps without
//! writing or pruning anything (the state did not change). And the apiserver killed with
//! SIGKILL right after writes its agent has seen: after the restart the agent equals the
//! store again, with no phantom of a write the crash lost.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]
#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous test: no async runtime to block"
)]

use std::time::Duration;

use clustermesh_e2e::{Agent, Cluster, Topology, binary};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.2.10]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
status: {podIP: 10.244.2.10, hostIP: 192.0.2.2}
---
apiVersion: v1
kind: Node
metadata: {name: b-node}
status: {addresses: [{type: InternalIP, address: 192.0.2.2}]}
"#;

#[test]
fn an_agent_restart_does_not_interrupt_traffic_or_prune_before_synced() {
    let topo = Topology::new(
        &binary("cm-netprobe"),
        &[
            ("web", "10.244.2.10".parse().unwrap()),
            ("client", "10.244.2.20".parse().unwrap()),
        ],
    );
    topo.serve("web", 8080);
    let mut b = Cluster::new("c2", 2);
    b.write_manifest("b.yaml", MANIFESTS);
    b.start();
    let config = b.agent_config("b-node", &topo);
    let mut agent = Agent::start(&config);
    clustermesh_e2e::wait_until(Duration::from_secs(30), "the service in the maps", || {
        agent.get("/status")["maps"]["services"] == 1
    });

    let client = topo.spawn_probe(
        "client",
        true,
        &["tcp-loop", "10.96.0.10:80", "--duration-ms", "5000"],
    );
    std::thread::sleep(Duration::from_millis(1000));
    agent.kill();
    std::thread::sleep(Duration::from_millis(500));
    agent.restart();
    // Adoption: the restarted agent found everything in place.
    assert_eq!(
        agent.metric("clustermesh_bpf_map_ops_total{op=\"upsert\"}"),
        0.0,
        "{}",
        agent.log()
    );
    assert_eq!(
        agent.metric("clustermesh_bpf_map_ops_total{op=\"delete\"}"),
        0.0
    );
    assert_eq!(agent.get("/status")["maps"]["services"], 1);

    let out = client.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(
        matches!(words.as_slice(), ["attempts", _, "ok", _, "failed", "0"]),
        "the client saw failures across the restart: {line:?}"
    );
    let attempts: u64 = words[1].parse().unwrap();
    assert!(attempts > 100, "the client barely ran: {line:?}");
}

fn pod(name: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: prod, labels: {{app: web}}}}\nstatus: {{podIP: {ip}}}\n"
    )
}

/// The pod addresses in the agent's ipcache map.
fn agent_pod_ips(agent: &Agent) -> Vec<String> {
    let rows = agent.get("/maps/ipcache");
    let mut ips: Vec<String> = rows
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r["prefix"].as_str())
                .filter(|p| p.starts_with("10.1."))
                .map(|p| p.trim_end_matches("/32").to_owned())
                .collect()
        })
        .unwrap_or_default();
    ips.sort();
    ips
}

#[test]
fn an_apiserver_killed_right_after_writes_leaves_no_phantom_in_its_agent() {
    let mut a = Cluster::new("c1", 1);
    a.write_manifest("base.yaml", &pod("base", "10.1.0.1"));
    a.start();
    let agent = Agent::start(&a.agent_config_userspace("n1"));
    clustermesh_e2e::wait_until(Duration::from_secs(30), "the base pod in the agent", || {
        agent_pod_ips(&agent) == ["10.1.0.1"]
    });
    for trial in 0..5 {
        // A pod the agent sees (written, not yet flushed to disk), then the crash.
        let seen = format!("10.1.1.{trial}");
        a.write_manifest("seen.yaml", &pod("seen", &seen));
        clustermesh_e2e::wait_until(Duration::from_secs(10), "the new pod in the agent", || {
            agent_pod_ips(&agent).contains(&seen)
        });
        // The agent waits (frozen) until the restarted store is past the revisions it saw,
        // so that it resumes into the new history instead of finding it too short.
        agent.freeze();
        a.kill();
        // While the apiserver is down the pod goes, and another comes.
        std::fs::remove_file(a.dir.path().join("manifests/seen.yaml")).unwrap();
        let after = format!("10.1.2.{trial}");
        a.write_manifest("after.yaml", &pod("after", &after));
        a.start();
        agent.thaw();
        let expected = vec!["10.1.0.1".to_owned(), after];
        clustermesh_e2e::wait_until(
            Duration::from_secs(20),
            &format!("trial {trial}: the agent to equal the store ({expected:?})"),
            || agent_pod_ips(&agent) == expected,
        );
    }
}
