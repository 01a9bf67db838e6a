//! Every process's `/metrics`, as a real scraper reads it (issue 15): a mesh of two apiservers
//! (B imports A) and B's agent with its metrics port, a change from A propagated to B's agent,
//! then each endpoint scraped as Prometheus does (`Accept: application/openmetrics-text`) and
//! as other scrapers do (no `Accept`), and each body parsed by the Python Prometheus client's
//! own parsers (Debian's `python3-prometheus-client`). The families are checked against the
//! table in docs/OBSERVABILITY.md: same type, unit and label names, nothing missing from the
//! table, every `always` row present.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use clustermesh_e2e::{
    Agent, Cluster, WEB_SERVICE, free_port, global_web_manifest, node_manifest, wait_until,
};

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    kind: String,
    unit: String,
    labels: BTreeSet<String>,
    process: String,
    always: bool,
}

/// The table of docs/OBSERVABILITY.md, by family.
fn table() -> BTreeMap<String, Row> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/OBSERVABILITY.md"
    ))
    .unwrap();
    let section = doc
        .split("### Every family")
        .nth(1)
        .expect("docs/OBSERVABILITY.md has the section \"Every family\"");
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", family, type, unit, labels, process, present, meaning, ""
        assert_eq!(cells.len(), 9, "{line}");
        let labels = cells[4]
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let row = Row {
            kind: cells[2].to_owned(),
            unit: cells[3].to_owned(),
            labels,
            process: cells[5].to_owned(),
            always: match cells[6] {
                "always" => true,
                "with data" => false,
                other => panic!("present is `always` or `with data`, not {other:?}: {line}"),
            },
        };
        let name = cells[1].trim_matches('`').to_owned();
        assert!(rows.insert(name, row).is_none(), "twice: {line}");
    }
    assert!(rows.len() > 40, "the table has {} rows", rows.len());
    rows
}

/// GET with an `Accept` header: content type and body.
fn scrape(addr: &str, accept: Option<&str>) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n{accept}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap();
    (content_type, body.to_owned())
}

/// The families as the Python parser of `format` reads them.
fn parse(format: &str, body: &str) -> Vec<serde_json::Value> {
    // Debian's interpreter, which has Debian's python3-prometheus-client (a python3 earlier on
    // PATH, such as a pyenv shim, may not).
    let mut child = Command::new("/usr/bin/python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/parse_metrics.py"
        ))
        .arg(format)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (scripts/deps installs python3 and python3-prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser refused the body: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

/// Checks one endpoint of `process` in both formats; returns the families it exposed.
fn check(addr: &str, process: &str, table: &BTreeMap<String, Row>) -> BTreeSet<String> {
    let (ct, om) = scrape(
        addr,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    );
    assert_eq!(
        ct,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    let (ct, prom) = scrape(addr, None);
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(
        !prom.contains("# EOF") && !prom.contains("# UNIT"),
        "{prom}"
    );
    let mut seen = BTreeSet::new();
    for family in parse("openmetrics", &om) {
        let name = family["name"].as_str().unwrap().to_owned();
        let row = table.get(&name).unwrap_or_else(|| {
            panic!("{process} exposes {name}, which docs/OBSERVABILITY.md does not list: {family}")
        });
        assert!(
            row.process == process || row.process == "both",
            "{name} is listed for {}, exposed by the {process}",
            row.process
        );
        assert_eq!(family["type"], row.kind.as_str(), "{name}");
        assert_eq!(family["unit"], row.unit.as_str(), "{name}");
        assert!(
            !family["help"].as_str().unwrap().is_empty(),
            "{name} has no HELP"
        );
        let labels: BTreeSet<String> = family["samples"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["labels"].as_object().unwrap().keys().cloned())
            .filter(|l| l != "le" && l != "quantile")
            .collect();
        let samples = family["samples"].as_array().unwrap();
        assert!(!samples.is_empty(), "{name} has no sample");
        assert_eq!(labels, row.labels, "labels of {name}");
        seen.insert(name);
    }
    for (name, row) in table {
        if row.always && (row.process == process || row.process == "both") {
            assert!(seen.contains(name), "the {process} does not expose {name}");
        }
    }
    // The Prometheus text format: the same families, counters named with `_total`, info
    // metrics as gauges named `_info`, no units.
    let mut prom_seen = BTreeSet::new();
    for family in parse("prometheus", &prom) {
        let name = family["name"].as_str().unwrap();
        let kind = family["type"].as_str().unwrap();
        let om_name = match name.strip_suffix("_info") {
            Some(base) if table.get(base).is_some_and(|r| r.kind == "info") => {
                assert_eq!(kind, "gauge", "{name}");
                base
            }
            _ => {
                assert_eq!(kind, table[name].kind, "{name}");
                name
            }
        };
        assert_eq!(family["unit"], "", "{name}");
        prom_seen.insert(om_name.to_owned());
    }
    assert_eq!(prom_seen, seen, "the two formats expose different families");
    seen
}

fn histogram_count(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_count{{source_cluster=\"c1\"}} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn every_metrics_endpoint_parses_and_matches_the_documented_table() {
    let table = table();
    let mut a = Cluster::new("c1", 1);
    let mut b = Cluster::new("c2", 2);
    b.import(&a);
    a.configure("allowedRemotes: [c2]\n");
    a.write_manifest("web.yaml", &global_web_manifest(&["10.244.1.10"]));
    b.write_manifest(
        "b.yaml",
        &format!("{WEB_SERVICE}{}", node_manifest("b-node", "192.0.2.2")),
    );
    a.start();
    b.start();
    let config = b.agent_config_userspace("b-node");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("metrics: \"{metrics_addr}\"\n"));
    std::fs::write(&config, text).unwrap();
    let agent = Agent::start(&config);
    // A change after the first sync: the propagation histograms get their samples.
    wait_until(Duration::from_secs(30), "B's apiserver to import A", || {
        scrape(b.health_addr(), None)
            .1
            .contains("cilium_kvstoremesh_remote_cluster_readiness_status{target_cluster=\"c1\"} 1")
    });
    a.write_manifest(
        "web.yaml",
        &global_web_manifest(&["10.244.1.10", "10.244.1.11"]),
    );
    wait_until(
        Duration::from_secs(30),
        "the change in B's agent's histogram",
        || {
            histogram_count(
                &scrape(&agent.admin, None).1,
                "clustermesh_agent_propagation_seconds",
            ) >= 1.0
        },
    );

    let mut exposed = check(a.health_addr(), "apiserver", &table);
    exposed.extend(check(b.health_addr(), "apiserver", &table));
    exposed.extend(check(&agent.admin, "agent", &table));
    // The metrics port serves the same families as the admin port, and nothing else.
    let on_metrics_port = check(&metrics_addr, "agent", &table);
    assert_eq!(on_metrics_port, check(&agent.admin, "agent", &table));
    for path in ["/status", "/events", "/explain/endpoint/10.244.1.10"] {
        assert_eq!(
            clustermesh_e2e::http_get(&metrics_addr, path).map(|(code, _)| code),
            Some(404),
            "{path} on the metrics port"
        );
    }
    // What this mesh has data for is exposed: the Cilium names and the histograms.
    for name in [
        "cilium_kvstoremesh_remote_cluster_readiness_status",
        "cilium_kvstoremesh_remote_cluster_last_failure_ts",
        "cilium_kvstoremesh_bootstrap_seconds",
        "cilium_kvstoremesh_kvstore_sync_queue_size",
        "cilium_kvstoremesh_kvstore_initial_sync_completed",
        "cilium_clustermesh_apiserver_bootstrap_seconds",
        "clustermesh_apiserver_propagation_seconds",
        "cilium_clustermesh_remote_cluster_readiness_status",
        "cilium_clustermesh_remote_cluster_nodes",
        "cilium_clustermesh_remote_cluster_services",
        "cilium_clustermesh_remote_cluster_endpoints",
        "clustermesh_agent_propagation_seconds",
    ] {
        assert!(exposed.contains(name), "{name} is not exposed");
    }
    let agent_text = scrape(&agent.admin, None).1;
    for line in [
        "cilium_clustermesh_remote_clusters 1",
        "cilium_clustermesh_remote_cluster_readiness_status{target_cluster=\"c1\"} 1",
        "cilium_clustermesh_remote_cluster_failures{target_cluster=\"c1\"} 0",
        "cilium_clustermesh_remote_cluster_last_failure_ts{target_cluster=\"c1\"} 0",
        "cilium_clustermesh_remote_cluster_nodes{target_cluster=\"c1\"} 1",
        "cilium_clustermesh_remote_cluster_services{target_cluster=\"c1\"} 1",
        "cilium_clustermesh_remote_cluster_endpoints{target_cluster=\"c1\"} 2",
    ] {
        assert!(
            agent_text.lines().any(|l| l == line),
            "{line} in\n{agent_text}"
        );
    }
    let b_text = scrape(b.health_addr(), None).1;
    for line in [
        "cilium_kvstoremesh_remote_clusters 1",
        "cilium_kvstoremesh_remote_cluster_failures{target_cluster=\"c1\"} 0",
        "cilium_kvstoremesh_remote_cluster_last_failure_ts{target_cluster=\"c1\"} 0",
        "cilium_kvstoremesh_kvstore_sync_queue_size{scope=\"ip/v1\",source_cluster=\"c1\"} 0",
        "cilium_kvstoremesh_kvstore_initial_sync_completed{scope=\"services/v1\",source_cluster=\"c1\",action=\"write\"} 1",
        "cilium_kvstoremesh_kvstore_sync_errors_total{scope=\"cache\",source_cluster=\"c1\"} 0",
    ] {
        assert!(b_text.lines().any(|l| l == line), "{line} in\n{b_text}");
    }
    let build = b_text
        .lines()
        .find(|l| l.starts_with("clustermesh_build_info{"))
        .unwrap();
    assert!(build.contains("component=\"apiserver\""), "{build}");
    assert!(
        build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{build}"
    );
    assert!(!build.contains("rustc=\"unknown\""), "{build}");
}

/// The metric a dashboard expression names, as the table names its family: a histogram's
/// `_bucket`/`_sum`/`_count`, a counter's `_total` and an info metric's `_info` taken off.
fn family_of<'a>(sample: &'a str, table: &BTreeMap<String, Row>) -> Option<&'a str> {
    if table.contains_key(sample) {
        return Some(sample);
    }
    [
        ("_bucket", "histogram"),
        ("_sum", "histogram"),
        ("_count", "histogram"),
        ("_total", "counter"),
        ("_info", "info"),
    ]
    .into_iter()
    .find_map(|(suffix, kind)| {
        let base = sample.strip_suffix(suffix)?;
        table
            .get(base)
            .is_some_and(|r| r.kind == kind)
            .then_some(base)
    })
}

#[test]
fn the_chart_s_dashboard_uses_only_documented_metrics() {
    let table = table();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/clustermesh/files/dashboards/clustermesh-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    let mut exprs = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            exprs += 1;
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if ["cilium_", "clustermesh_", "process_"]
                    .iter()
                    .any(|p| token.starts_with(p))
                {
                    let family = family_of(token, &table).unwrap_or_else(|| {
                        panic!("the dashboard uses {token}, which docs/OBSERVABILITY.md does not list: {expr}")
                    });
                    used.insert(family.to_owned());
                }
            }
        }
    }
    assert!(exprs >= 20, "{exprs} expressions");
    // It shows the remote clusters, the propagation SLO and the flows at least.
    for name in [
        "cilium_kvstoremesh_remote_cluster_readiness_status",
        "clustermesh_agent_propagation_seconds",
        "clustermesh_apiserver_propagation_seconds",
        "clustermesh_policy_verdicts",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
}
