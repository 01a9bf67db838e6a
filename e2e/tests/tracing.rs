//! One trace across the mesh (issue 15): a Service edit in cluster A is traced through A's
//! apiserver (source pass, kvstore write, Export event), B's sync worker and apiserver (import,
//! cache write, Export event to the agent) and B's agent (view update, reconcile pass, eBPF map
//! write). Three real processes export their spans over OTLP/gRPC to a collector inside this
//! test; the test checks that one trace holds the whole chain, with the right parents,
//! processes and an order of start times that matches causality. A's apiserver is configured
//! by the `OTEL_*` variables, B's apiserver and the agent by their files' `tracing` section.
//!
//! Also checked: the propagation histograms of B's apiserver and agent count the change, per
//! source cluster.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use clustermesh_e2e::otlp::{Collector, ReceivedSpan};
use clustermesh_e2e::{
    Agent, Cluster, Topology, WEB_SERVICE, binary, global_web_manifest, http_get, node_manifest,
    wait_until,
};

/// The backends B's agent has programmed for `prod/web`.
fn backends(agent: &Agent) -> usize {
    agent.get("/explain/service/prod/web")["frontends"][0]["backends"]
        .as_array()
        .map_or(0, Vec::len)
}

/// The chain from `leaf` up to its root, following parent span IDs within one trace.
fn chain<'a>(spans: &'a [ReceivedSpan], leaf: &'a ReceivedSpan) -> Vec<&'a ReceivedSpan> {
    let by_id: BTreeMap<(&str, &str), &ReceivedSpan> = spans
        .iter()
        .map(|s| ((s.trace_id.as_str(), s.span_id.as_str()), s))
        .collect();
    let mut out = vec![leaf];
    let mut at = leaf;
    while !at.parent_span_id.is_empty() {
        match by_id.get(&(at.trace_id.as_str(), at.parent_span_id.as_str())) {
            Some(parent) => {
                out.push(parent);
                at = parent;
            }
            None => break,
        }
    }
    out
}

/// The names, services and clusters of a chain, leaf first, as the test expects them.
const EXPECTED: [(&str, &str, &str); 9] = [
    ("datapath write", "clustermesh-agent", "c2"),
    ("reconcile pass", "clustermesh-agent", "c2"),
    ("agent view update", "clustermesh-agent", "c2"),
    ("export event sent", "clustermesh-apiserver", "c2"),
    ("kvstore write", "clustermesh-apiserver", "c2"),
    ("remote import applied", "clustermesh-apiserver", "c2"),
    ("export event sent", "clustermesh-apiserver", "c1"),
    ("kvstore write", "clustermesh-apiserver", "c1"),
    ("source change applied", "clustermesh-apiserver", "c1"),
];

fn shape(c: &[&ReceivedSpan]) -> Vec<(String, String, String)> {
    c.iter()
        .map(|s| {
            (
                s.name.clone(),
                s.service().to_owned(),
                s.cluster().to_owned(),
            )
        })
        .collect()
}

/// A complete chain ending in a `datapath write` of B's agent, if the collector has one.
fn complete_chain(spans: &[ReceivedSpan]) -> Option<Vec<&ReceivedSpan>> {
    let expected: Vec<(String, String, String)> = EXPECTED
        .iter()
        .map(|(n, s, c)| ((*n).to_owned(), (*s).to_owned(), (*c).to_owned()))
        .collect();
    spans
        .iter()
        .filter(|s| s.name == "datapath write")
        .map(|leaf| chain(spans, leaf))
        .find(|c| shape(c) == expected)
}

fn histogram_count(metrics: &str, name: &str, cluster: &str) -> f64 {
    let prefix = format!("{name}_count{{source_cluster=\"{cluster}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_service_edit_in_one_cluster_is_one_trace_down_to_the_bpf_map_of_another() {
    let collector = Collector::start();
    let endpoint = collector.endpoint();
    let topo = Topology::new(
        &binary("cm-netprobe"),
        &[("b-client", "10.244.2.20".parse::<Ipv4Addr>().unwrap())],
    );
    let mut a = Cluster::new("c1", 1);
    let mut b = Cluster::new("c2", 2);
    b.import(&a);
    a.configure("allowedRemotes: [c2]\n");
    // A: the standard variables (the batch processor's delay shortened for the test).
    a.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    a.env("OTEL_TRACES_SAMPLER", "parentbased_always_on");
    a.env("OTEL_BSP_SCHEDULE_DELAY", "100");
    // B: the configuration file.
    b.configure(&format!(
        "tracing: {{otlpEndpoint: \"{endpoint}\", sampler: parentbased_traceidratio, samplerArg: 1.0}}\n"
    ));
    b.env("OTEL_BSP_SCHEDULE_DELAY", "100");
    a.write_manifest("web.yaml", &global_web_manifest(&["10.244.1.10"]));
    // B's own global service of the same name (without endpoints) takes A's backends.
    b.write_manifest(
        "b.yaml",
        &format!(
            "{WEB_SERVICE}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b-client, namespace: prod, labels: {{app: client}}}}\nstatus: {{podIP: 10.244.2.20, hostIP: 192.0.2.2}}\n{}",
            node_manifest("b-node", "192.0.2.2")
        ),
    );
    a.start();
    b.start();
    let config = b.agent_config("b-node", &topo);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("tracing: {{otlpEndpoint: \"{endpoint}\"}}\n"));
    std::fs::write(&config, text).unwrap();
    let agent = Agent::start_with_env(&config, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    wait_until(Duration::from_secs(30), "A's backend in B's agent", || {
        backends(&agent) == 1
    });

    // The edit: a second backend of the global service in A. Only its spans count.
    collector.clear();
    a.write_manifest(
        "web.yaml",
        &global_web_manifest(&["10.244.1.10", "10.244.1.11"]),
    );
    wait_until(
        Duration::from_secs(30),
        "the new backend in B's agent",
        || backends(&agent) == 2,
    );
    let mut found = None;
    wait_until(
        Duration::from_secs(30),
        "one trace from A's source to B's datapath write at the collector",
        || {
            let spans = collector.spans();
            found = complete_chain(&spans).map(|c| c.into_iter().cloned().collect::<Vec<_>>());
            found.is_some()
        },
    );
    let chain = found.unwrap();
    let trace = &chain[0].trace_id;
    assert!(chain.iter().all(|s| &s.trace_id == trace));
    // The root is a root; three processes, one per role.
    assert_eq!(chain[8].parent_span_id, "");
    let pids: BTreeSet<(&str, &str, &str)> = chain
        .iter()
        .map(|s| (s.service(), s.cluster(), s.pid()))
        .collect();
    assert_eq!(pids.len(), 3, "{pids:?}");
    // Causality: each step starts no earlier than its parent; every span ends after it
    // starts; the whole chain took less than the test's patience.
    for pair in chain.windows(2) {
        let (child, parent) = (&pair[0], &pair[1]);
        assert!(child.end >= child.start, "{child:?}");
        assert!(
            child.start >= parent.start,
            "{} starts before its parent {}",
            child.name,
            parent.name
        );
        // The writes are steps inside their parent; the other hand-offs follow their parent
        // (an Export event may be sent while the rest of its pass is still being written).
        if matches!(child.name.as_str(), "kvstore write" | "datapath write") {
            assert!(
                child.end <= parent.end,
                "{} ends after its parent {}",
                child.name,
                parent.name
            );
        }
    }
    let total = chain[0].end - chain[8].start;
    assert!(total < 10_000_000_000, "{total} ns from source to map");
    // What the steps say about themselves.
    assert_eq!(chain[6].attributes["to"], "remote");
    assert_eq!(chain[3].attributes["to"], "local");
    assert_eq!(chain[5].attributes["remote"], "c1");
    assert_eq!(chain[2].attributes["source_cluster"], "c1");
    assert_eq!(chain[2].resource["k8s.node.name"], "b-node");
    // The span tree, as docs/OBSERVABILITY.md shows it: start after the root and duration.
    let mut tree = String::new();
    for (depth, s) in chain.iter().rev().enumerate() {
        tree.push_str(&format!(
            "{:>8.3} ms {:>7.3} ms  {}{} ({} {}, pid {})\n",
            (s.start - chain[8].start) as f64 / 1e6,
            (s.end - s.start) as f64 / 1e6,
            "  ".repeat(depth),
            s.name,
            s.service(),
            s.cluster(),
            s.pid()
        ));
    }
    eprintln!("the trace {trace}:\n{tree}");

    // The live propagation metrics count the change from c1.
    let (_, b_metrics) = http_get(b.health_addr(), "/metrics").unwrap();
    assert!(
        histogram_count(
            &b_metrics,
            "clustermesh_apiserver_propagation_seconds",
            "c1"
        ) >= 1.0,
        "{b_metrics}"
    );
    let (_, agent_metrics) = http_get(&agent.admin, "/metrics").unwrap();
    assert!(
        histogram_count(
            &agent_metrics,
            "clustermesh_agent_propagation_seconds",
            "c1"
        ) >= 1.0,
        "{agent_metrics}"
    );
}
