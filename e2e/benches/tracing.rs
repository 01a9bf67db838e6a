//! The cost of tracing (issue 15): propagation of a Service edit from cluster A's manifest
//! directory into B's agent, with tracing off, on at 1 % and on at 100 % (parent-based
//! trace-ID ratio sampling in all three processes, spans exported over OTLP/gRPC to a collector
//! inside this benchmark).
//!
//! Real processes: A's and B's apiservers (embedded store, B importing A over mTLS) and B's
//! agent (userspace datapath). Each change adds one endpoint to the global service `prod/web`
//! in A's manifest; the time is from the file's rename until B's agent lists the new backend
//! (`/explain`, polled every 2 ms). This includes the apiserver's 50 ms settle after a change
//! notification. The agent's own `clustermesh_agent_propagation_seconds` (from the source
//! pass's origin to the map write, without the settle) is reported as its mean. CPU is the
//! three processes' user + system time over the changes, per change.
//!
//! `cargo build --release -p clustermesh --bins && cargo bench -p clustermesh-e2e --bench tracing`
//! (`CM_CHANGES`, default 200).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failed step is the report"
)]
#![allow(clippy::disallowed_methods, reason = "no async runtime here")]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use clustermesh_e2e::otlp::Collector;
use clustermesh_e2e::{
    Agent, Cluster, WEB_SERVICE, cpu_time, global_web_manifest, http_get, node_manifest, wait_until,
};

/// A's manifest with `backends` endpoints of `prod/web`.
fn manifest(backends: usize) -> String {
    let ips: Vec<String> = (0..backends)
        .map(|i| format!("10.244.{}.{}", 1 + i / 250, 1 + i % 250))
        .collect();
    global_web_manifest(&ips)
}

fn backends(agent: &Agent) -> usize {
    http_get(&agent.admin, "/explain/service/prod/web")
        .and_then(|(code, body)| (code == 200).then_some(body))
        .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
        .and_then(|v| v["frontends"][0]["backends"].as_array().map(Vec::len))
        .unwrap_or(0)
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short list"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn run(label: &str, ratio: Option<f64>, changes: usize) {
    let collector = Collector::start();
    let mut a = Cluster::new("c1", 1);
    let mut b = Cluster::new("c2", 2);
    b.import(&a);
    a.configure("allowedRemotes: [c2]\n");
    let mut env: Vec<(String, String)> = Vec::new();
    if let Some(r) = ratio {
        env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector.endpoint()));
        env.push((
            "OTEL_TRACES_SAMPLER".into(),
            "parentbased_traceidratio".into(),
        ));
        env.push(("OTEL_TRACES_SAMPLER_ARG".into(), r.to_string()));
    }
    for (k, v) in &env {
        a.env(k, v);
        b.env(k, v);
    }
    a.write_manifest("web.yaml", &manifest(1));
    b.write_manifest(
        "b.yaml",
        &format!("{WEB_SERVICE}{}", node_manifest("b-node", "192.0.2.2")),
    );
    a.start();
    b.start();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let agent = Agent::start_with_env(&b.agent_config_userspace("b-node"), &env_refs);
    wait_until(
        Duration::from_secs(30),
        "the first backend in B's agent",
        || backends(&agent) == 1,
    );
    let pids = [a.pid(), b.pid(), agent.pid()];
    let cpu_before: Duration = pids.iter().map(|p| cpu_time(*p)).sum();
    let mut times = Vec::with_capacity(changes);
    for i in 2..=changes + 1 {
        a.write_manifest("web.yaml", &manifest(i));
        let t = Instant::now();
        while backends(&agent) != i {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "change {i} timed out"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let cpu_after: Duration = pids.iter().map(|p| cpu_time(*p)).sum();
    let (_, m) = http_get(&agent.admin, "/metrics").unwrap();
    let sum = metric(
        &m,
        "clustermesh_agent_propagation_seconds_sum{source_cluster=\"c1\"}",
    );
    let count = metric(
        &m,
        "clustermesh_agent_propagation_seconds_count{source_cluster=\"c1\"}",
    );
    // Let the batch processors send what they hold.
    std::thread::sleep(Duration::from_secs(if ratio.is_some() { 7 } else { 0 }));
    let spans = collector.spans();
    let traces: BTreeSet<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    times.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss, reason = "counts")]
    let cpu_per_change = (cpu_after - cpu_before).as_secs_f64() * 1e3 / changes as f64;
    println!(
        "| {label} | {changes} | {:.1} | {:.1} | {:.2} ({count} changes) | {cpu_per_change:.2} | {} spans, {} traces |",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        if count > 0.0 {
            sum / count * 1e3
        } else {
            f64::NAN
        },
        spans.len(),
        traces.len(),
    );
}

fn main() {
    let changes: usize = std::env::var("CM_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    println!(
        "| tracing | changes | manifest in A -> B's agent p50 (ms) | p99 (ms) | agent's propagation_seconds mean (ms) | CPU of the 3 processes per change (ms) | at the collector |"
    );
    println!("|---|---|---|---|---|---|---|");
    run("off", None, changes);
    run("1 %", Some(0.01), changes);
    run("100 %", Some(1.0), changes);
}
