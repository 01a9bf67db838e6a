//! The agent killed with SIGKILL and restarted while a client connects through a service VIP
//! in a loop: no connection fails, and the restarted agent adopts the pinned maps without
//! writing or pruning anything (the state did not change).

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
