//! Manifests written for a real cluster, loaded unchanged into two clusters' manifest
//! directories (`examples/kubernetes/`): a kubelet-shaped Node (with its `Hostname`
//! address), controller-owned Pods with their Ready conditions, a global Service with a
//! `selector` and no EndpointSlice, and a cross-cluster CiliumNetworkPolicy. Both agents get
//! the global service's backends from both clusters (the not-ready pod is left out: by its
//! own cluster's agent, and by its cluster's export for the other), both
//! nodes, and the policy with the other cluster's identity.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

use std::time::Duration;

use clustermesh_e2e::{Agent, Cluster, wait_until};

const A: &str = include_str!("../../examples/kubernetes/cluster-a.yaml");
const B: &str = include_str!("../../examples/kubernetes/cluster-b.yaml");

/// `(ip, reason)` of every candidate backend of `shop/checkout` on `agent`.
fn candidates(agent: &Agent) -> Vec<(String, String)> {
    let plan = agent.get("/explain/service/shop/checkout");
    let mut out: Vec<(String, String)> = plan["frontends"][0]["candidates"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|c| {
                    (
                        c["ip"].as_str().unwrap_or("").to_owned(),
                        c["reason"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn manifests_of_a_real_cluster_work_unchanged_in_two_clusters() {
    let mut a = Cluster::new("cluster-a", 1);
    let mut b = Cluster::new("cluster-b", 2);
    a.import(&b);
    b.import(&a);
    a.write_manifest("app.yaml", A);
    b.write_manifest("app.yaml", B);
    a.start();
    b.start();
    let agent_a = Agent::start(&a.agent_config_userspace("cluster-a-worker"));
    let agent_b = Agent::start(&b.agent_config_userspace("cluster-b-worker"));

    // A's agent sees its own not-ready pod (and leaves it out); B's agent never hears of
    // it: a cluster exports only ready or serving backends, as Cilium does.
    let selected = |ip: &str| (ip.to_owned(), "selected".to_owned());
    let want_a = vec![
        selected("10.1.0.21"),
        ("10.1.0.22".to_owned(), "unhealthy".to_owned()),
        selected("10.2.0.21"),
    ];
    let want_b = vec![selected("10.1.0.21"), selected("10.2.0.21")];
    for (name, agent, want) in [("A", &agent_a, want_a), ("B", &agent_b, want_b)] {
        wait_until(
            Duration::from_secs(30),
            &format!("both clusters' checkout backends on {name}'s agent"),
            || candidates(agent) == want,
        );
        let plan = agent.get("/explain/service/shop/checkout");
        let mut ports: Vec<u64> = plan["frontends"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["port"].as_u64().unwrap())
            .collect();
        ports.dedup();
        assert_eq!(ports, [8080], "targetPort `http` resolved per pod: {plan}");
        // Both kubelet-shaped nodes were accepted (one per cluster).
        wait_until(
            Duration::from_secs(30),
            &format!("both nodes on {name}'s agent"),
            || agent.get("/status")["view"]["nodes"] == 2,
        );
    }

    // The cross-cluster policy: A's checkout pod admits B's frontend, by B's identity.
    let ep = agent_a.get("/explain/endpoint/10.1.0.21");
    assert_eq!(ep["enforce_ingress"], true, "{ep}");
    let peers: Vec<u64> = ep["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["identity"].as_u64())
        .collect();
    assert!(
        !peers.is_empty() && peers.iter().all(|id| id >> 16 == 2),
        "only cluster-b identities are admitted: {ep}"
    );
}
