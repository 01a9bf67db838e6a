//! `clustermesh agent` on the userspace datapath against a real apiserver: the same merge,
//! policy and explanations, maps in memory, no privileges used.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

use std::time::Duration;

use clustermesh_e2e::{Agent, Cluster, wait_until};

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
endpoints: [{addresses: [10.244.2.10]}, {addresses: [10.244.2.11], conditions: {ready: false}}]
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
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{toPorts: [{ports: [{port: "8080", protocol: TCP}]}]}]
"#;

#[test]
fn the_userspace_datapath_serves_the_same_agent() {
    let mut b = Cluster::new("c2", 2);
    b.write_manifest("b.yaml", MANIFESTS);
    b.start();
    let agent = Agent::start(&b.agent_config_userspace("b-node"));
    wait_until(Duration::from_secs(30), "the service and endpoint", || {
        let s = agent.get("/status");
        s["maps"]["services"] == 1 && s["maps"]["endpoints"] == 1
    });
    let status = agent.get("/status");
    assert_eq!(status["datapath"], "userspace");
    assert_eq!(status["synced"], true);
    let plan = agent.get("/explain/service/prod/web");
    let f = &plan["frontends"][0];
    assert_eq!(f["vip"], "10.96.0.10");
    assert_eq!(f["backends"].as_array().unwrap().len(), 1, "{plan}");
    let reasons: Vec<(&str, &str)> = f["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["ip"].as_str().unwrap(), c["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        [("10.244.2.10", "selected"), ("10.244.2.11", "unhealthy")]
    );
    let ep = agent.get("/explain/endpoint/10.244.2.10");
    assert_eq!(ep["enforce_ingress"], true);
    assert_eq!(ep["entries"][0]["port"], "8080/TCP");
    assert_eq!(ep["entries"][0]["identity"], 0, "any peer: {ep}");
    assert_eq!(ep["entries"][0]["rules"][0], "prod/web rule 0 ingress[0]");
    // Bad input: a clear answer, no panic.
    let (code, _) = clustermesh_e2e::http_get(&agent.admin, "/explain/endpoint/not-an-ip").unwrap();
    assert_eq!(code, 400);
    let (code, _) = clustermesh_e2e::http_get(&agent.admin, "/explain/service/prod/nope").unwrap();
    assert_eq!(code, 404);

    // A policy with a part the datapath does not enforce (a CIDR peer) loads, fails closed,
    // and is reported in the apiserver's status, its metrics and `clustermesh status`.
    b.write_manifest(
        "notes.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: cidr, namespace: prod}\n\
         spec:\n  endpointSelector: {matchLabels: {app: other}}\n  ingress: [{fromCIDR: [192.0.2.0/24]}]\n",
    );
    let note = "rule 0 ingress[0]: fromCIDR not enforced yet; the rule is left out: it allows \
                nothing (its direction stays default-deny)";
    wait_until(
        Duration::from_secs(30),
        "the policy's notes in /status",
        || {
            clustermesh_e2e::http_get(b.health_addr(), "/status").is_some_and(|(_, body)| {
                let s: serde_json::Value = serde_json::from_str(&body).unwrap();
                s["policiesNotEnforcedAsWritten"] == serde_json::json!({"prod/cidr": [note]})
            })
        },
    );
    let (_, metrics) = clustermesh_e2e::http_get(b.health_addr(), "/metrics").unwrap();
    assert!(
        metrics.contains("clustermesh_policies_not_enforced_as_written 1"),
        "{metrics}"
    );
    let out = std::process::Command::new(clustermesh_e2e::binary("clustermesh"))
        .args(["status", "--server", b.health_addr()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "1 policies with parts not enforced as written (translated to fail closed):\n  prod/cidr: {note}\n"
        )),
        "{text}"
    );

    // The agent's life, at info: start, connection, snapshot, ready; then a lost apiserver
    // and the reconnection.
    let log = agent.log();
    for line in [
        "agent starting cluster=c2 node=b-node datapath=Userspace",
        "connected to the local apiserver",
        "snapshot of the local apiserver applied",
        "ready: the datapath holds the first complete snapshot",
    ] {
        assert!(
            log.contains(line),
            "{line:?} not in the agent's log:\n{log}"
        );
    }
    assert!(!log.contains('\x1b'), "colour codes in a log file");
    b.kill();
    wait_until(Duration::from_secs(30), "the agent to notice", || {
        agent
            .log()
            .contains("the watch on the local apiserver ended")
    });
    b.start();
    wait_until(Duration::from_secs(30), "the agent to reconnect", || {
        let log = agent.log();
        log.contains("reconnecting to the local apiserver")
            && log
                .matches("connected to the local apiserver address=")
                .count()
                == 2
    });

    // A half-written manifest file fails closed: the policy stays enforced, and the problem is
    // counted.
    b.write_manifest("b.yaml", &MANIFESTS[..MANIFESTS.len() - 20]);
    wait_until(
        Duration::from_secs(30),
        "the broken file to be reported",
        || {
            clustermesh_e2e::http_get(b.health_addr(), "/metrics")
                .is_some_and(|(_, m)| m.contains("clustermesh_source_problems 1"))
        },
    );
    // A later change in another file reaches the agent, so everything before it has too.
    let ipcache = agent.get("/status")["view"]["ipcache"].as_u64().unwrap();
    b.write_manifest(
        "c.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: late, namespace: prod, labels: {app: late}}\nstatus: {podIP: 10.244.2.99, hostIP: 192.0.2.2}\n",
    );
    wait_until(
        Duration::from_secs(30),
        "the later pod on the agent",
        || agent.get("/status")["view"]["ipcache"].as_u64() == Some(ipcache + 1),
    );
    let ep = agent.get("/explain/endpoint/10.244.2.10");
    assert_eq!(ep["enforce_ingress"], true, "the policy stays: {ep}");
    assert_eq!(ep["entries"][0]["port"], "8080/TCP");

    // Still broken across a crash and a restart of the apiserver: the file's good content was
    // saved in the store, so the policy stays.
    b.kill();
    b.start();
    wait_until(
        Duration::from_secs(30),
        "the broken file to be reported after the restart",
        || {
            clustermesh_e2e::http_get(b.health_addr(), "/metrics")
                .is_some_and(|(_, m)| m.contains("clustermesh_source_problems 1"))
        },
    );
    let log = std::fs::read_to_string(b.dir.path().join("apiserver.log")).unwrap();
    assert!(
        log.contains("the file's last good objects, saved before the restart, are kept"),
        "{log}"
    );
    b.write_manifest(
        "d.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: later, namespace: prod, labels: {app: late}}\nstatus: {podIP: 10.244.2.98, hostIP: 192.0.2.2}\n",
    );
    wait_until(
        Duration::from_secs(30),
        "the pod written after the restart on the agent",
        || agent.get("/status")["view"]["ipcache"].as_u64() == Some(ipcache + 2),
    );
    let ep = agent.get("/explain/endpoint/10.244.2.10");
    assert_eq!(ep["enforce_ingress"], true, "the policy stays: {ep}");
    assert_eq!(ep["entries"][0]["port"], "8080/TCP");
}
