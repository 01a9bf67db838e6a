//! Failover on real packets (issue 13): three clusters of real processes, c1's agent on the
//! eBPF datapath with outlier detection on its defaults, and a client pod of c1 opening new TCP
//! connections, one after the other, to a global service with one backend in each cluster.
//! Each trial applies one fault to c3 one second into a nine-second client run and reports,
//! from the fault: the last failed connection, the last connection that reached or was sent
//! to c3, and the failed connections.
//!
//! - `a`: kill -9 of c3's backend (its apiserver stays up, so nothing is withdrawn);
//! - `b`: c3 partitioned: its pod's route black-holed (no RST, no ICMP) and its apiserver
//!   stopped (SIGSTOP: its connections stay open and silent);
//! - `c`: kill -9 of c3's apiserver, its backend alive;
//! - `d`: SIGSTOP of c3's apiserver, its backend alive.
//!
//! Build the binaries first, then run as root:
//! `cargo build --release -p clustermesh -p clustermesh-bpf --bins &&
//!  cargo bench -p clustermesh-e2e --bench failover` (`CM_TRIALS`, default 20; `CM_SCENARIOS`,
//! default `abcd`). The staleness and heartbeat settings are the defaults (heartbeat 500 ms,
//! which the e2e harness otherwise sets to 200 ms), except `restoreAfterMillis: 1000` so that
//! trials follow each other quickly.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failed step is the report"
)]
#![allow(clippy::disallowed_methods, reason = "no async runtime here")]

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clustermesh_e2e::{Agent, Cluster, Topology, binary, wait_until};

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod, annotations: {service.cilium.io/global: "true"}}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
"#;

const RUN_MS: u64 = 9_000;
const FAULT_AFTER_MS: u64 = 1_000;
const CONNECT_TIMEOUT_MS: u64 = 500;
/// A gap between two failed connections that ends a burst: longer than a connect timeout,
/// shorter than the first trial interval (2 s).
const BURST_GAP_MS: i64 = 1_000;

fn manifest(cluster: u8, web_ip: &str, extra_pods: &str) -> String {
    format!(
        "{SERVICE}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: prod, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{web_ip}]}}]\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: prod, labels: {{app: web}}}}\nstatus: {{podIP: {web_ip}, hostIP: 192.0.2.{cluster}}}\n{extra_pods}\
         ---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-{cluster}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.0.2.{cluster}}}]}}\n"
    )
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

fn backends(agent: &Agent) -> usize {
    agent.get("/explain/service/prod/web")["frontends"][0]["backends"]
        .as_array()
        .map_or(0, Vec::len)
}

/// Forgets what outlier detection learnt (each trial starts from a clean record).
fn clear_health(pin_dir: &std::path::Path) {
    let map = pin_dir.join("cm_health");
    let path = map.display().to_string();
    let out = clustermesh_bpf::testing::sh("bpftool", &["-j", "map", "dump", "pinned", &path]);
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for e in entries.as_array().into_iter().flatten() {
        let Some(key) = e["key"].as_array() else {
            continue;
        };
        let mut args = vec![
            "map".to_owned(),
            "delete".to_owned(),
            "pinned".to_owned(),
            path.clone(),
            "key".to_owned(),
            "hex".to_owned(),
        ];
        args.extend(key.iter().map(|b| {
            b.as_str()
                .unwrap_or("0x00")
                .trim_start_matches("0x")
                .to_owned()
        }));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = std::process::Command::new("bpftool").args(&refs).status();
    }
}

struct Trial {
    /// When each failed connection started, from the fault.
    failures: Vec<i64>,
    /// How each failed connection ended (`ConnectionRefused 111`: the connect failed;
    /// `ConnectionReset 104`: it was accepted, then reset before the reply).
    kinds: Vec<String>,
    last_failure_ms: Option<i64>,
    last_to_c3_ms: Option<i64>,
    failed: usize,
    attempts: usize,
}

fn parse(lines: &[String], fault: u128) -> Trial {
    let mut t = Trial {
        failures: Vec::new(),
        kinds: Vec::new(),
        last_failure_ms: None,
        last_to_c3_ms: None,
        failed: 0,
        attempts: 0,
    };
    for l in lines {
        let mut parts = l.splitn(3, ' ');
        let (Some(ms), Some(kind), rest) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(ms) = ms.parse::<u128>() else { continue };
        if ms < fault {
            continue;
        }
        let after = i64::try_from(ms - fault).unwrap_or(i64::MAX);
        t.attempts += 1;
        if kind == "ok" {
            if rest == Some("c3-web") {
                t.last_to_c3_ms = Some(after);
            }
        } else {
            // Only c3's backend fails in these scenarios: a failure was sent toward c3.
            t.failed += 1;
            t.failures.push(after);
            t.kinds.push(rest.unwrap_or("").to_owned());
            t.last_failure_ms = Some(after);
            t.last_to_c3_ms = Some(after);
        }
    }
    t
}

/// The failed connections of the first burst: from the first failure until the first gap of
/// [`BURST_GAP_MS`] (the connections that led to the ejection; later failures are the trial
/// connections that test an ejected backend every 2, 4, 8 ... s).
fn burst(failures: &[i64]) -> &[i64] {
    let end = failures
        .windows(2)
        .position(|w| w[1] - w[0] >= BURST_GAP_MS)
        .map_or(failures.len(), |i| i + 1);
    &failures[..end]
}

fn stats(name: &str, unit: &str, mut v: Vec<i64>) -> String {
    if v.is_empty() {
        return format!("{name}: none");
    }
    v.sort_unstable();
    let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!(
        "{name}: min {} p50 {} p99 {} max {}{unit} (n {})",
        v[0],
        pct(0.5),
        pct(0.99),
        v[v.len() - 1],
        v.len()
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let trials: usize = std::env::var("CM_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let scenarios = std::env::var("CM_SCENARIOS").unwrap_or_else(|_| "abcd".to_owned());
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let topo = Topology::new(
        &binary("cm-netprobe"),
        &[
            ("client", ip("10.244.1.20")),
            ("c1-web", ip("10.244.1.10")),
            ("c2-web", ip("10.244.2.10")),
            ("c3-web", ip("10.244.3.10")),
        ],
    );
    for web in ["c1-web", "c2-web", "c3-web"] {
        topo.serve(web, 8080);
    }
    let mut c1 = Cluster::new("c1", 1);
    let mut c2 = Cluster::new("c2", 2);
    let mut c3 = Cluster::new("c3", 3);
    for c in [&mut c1, &mut c2, &mut c3] {
        c.heartbeat_millis = 500;
    }
    c1.import(&c2);
    c1.import(&c3);
    c2.configure("allowedRemotes: [c1]\n");
    c3.configure("allowedRemotes: [c1]\n");
    c1.configure("staleness: {restoreAfterMillis: 1000}\n");
    let client_pod = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: prod, labels: {app: client}}\nstatus: {podIP: 10.244.1.20, hostIP: 192.0.2.1}\n";
    c1.write_manifest("m.yaml", &manifest(1, "10.244.1.10", client_pod));
    c2.write_manifest("m.yaml", &manifest(2, "10.244.2.10", ""));
    c3.write_manifest("m.yaml", &manifest(3, "10.244.3.10", ""));
    c1.start();
    c2.start();
    c3.start();
    let agent = Agent::start(&c1.agent_config("node-1", &topo));
    let pin_dir = topo.bpf_root().join("c1").join("node-1");
    let ns = topo.node_ns().to_owned();
    println!(
        "failover benchmark: {trials} trials per scenario, client connect timeout {CONNECT_TIMEOUT_MS} ms, fault at +{FAULT_AFTER_MS} ms of a {RUN_MS} ms run"
    );
    for scenario in scenarios.chars() {
        let mut last_failure = Vec::new();
        let mut last_to_c3 = Vec::new();
        let mut failed = Vec::new();
        let mut burst_end = Vec::new();
        let mut burst_failed = Vec::new();
        let mut never_failed = 0;
        for trial in 0..trials {
            wait_until(
                Duration::from_secs(60),
                "c3's backend back in c1's maps",
                || backends(&agent) == 3,
            );
            clear_health(&pin_dir);
            let client = topo.spawn_probe(
                "client",
                true,
                &[
                    "tcp-log",
                    "10.96.0.10:80",
                    "--duration-ms",
                    &RUN_MS.to_string(),
                    "--timeout-ms",
                    &CONNECT_TIMEOUT_MS.to_string(),
                    "--gap-ms",
                    "5",
                ],
            );
            std::thread::sleep(Duration::from_millis(FAULT_AFTER_MS));
            let fault = now_ms();
            match scenario {
                'a' => topo.kill_pod_processes("c3-web"),
                'b' => {
                    clustermesh_bpf::testing::sh(
                        "ip",
                        &["-n", &ns, "route", "replace", "blackhole", "10.244.3.10/32"],
                    );
                    c3.freeze();
                }
                'c' => c3.kill(),
                'd' => c3.freeze(),
                other => panic!("unknown scenario {other}"),
            }
            let out = client.wait_with_output().unwrap();
            let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            let t = parse(&lines, fault);
            let first = burst(&t.failures);
            let at: Vec<String> = t
                .failures
                .iter()
                .zip(&t.kinds)
                .map(|(ms, kind)| format!("{ms} ms {kind}"))
                .collect();
            println!(
                "  {scenario} trial {trial}: attempts {} failed {} (at {}) last to c3 {:?} ms",
                t.attempts,
                t.failed,
                at.join(", "),
                t.last_to_c3_ms
            );
            if let Some(ms) = first.last() {
                burst_end.push(*ms);
            }
            burst_failed.push(i64::try_from(first.len()).unwrap_or(i64::MAX));
            failed.push(i64::try_from(t.failed).unwrap_or(i64::MAX));
            match t.last_failure_ms {
                Some(ms) => last_failure.push(ms),
                None => never_failed += 1,
            }
            if let Some(ms) = t.last_to_c3_ms {
                last_to_c3.push(ms);
            }
            // Undo the fault.
            match scenario {
                'a' => topo.serve("c3-web", 8080),
                'b' => {
                    let dev = topo.pod("c3-web").host_if.clone();
                    clustermesh_bpf::testing::sh(
                        "ip",
                        &["-n", &ns, "route", "replace", "10.244.3.10/32", "dev", &dev],
                    );
                    c3.thaw();
                }
                'c' => c3.start(),
                'd' => c3.thaw(),
                _ => {}
            }
        }
        println!("scenario {scenario}:");
        println!(
            "  {}",
            stats("fault -> last failed connection", " ms", last_failure)
        );
        println!("  trials without a failed connection: {never_failed}");
        println!(
            "  {}",
            stats(
                "fault -> last failed connection of the first burst",
                " ms",
                burst_end
            )
        );
        println!(
            "  {}",
            stats("failed connections in the first burst", "", burst_failed)
        );
        println!(
            "  {}",
            stats("fault -> last connection to c3", " ms", last_to_c3)
        );
        println!("  {}", stats("failed connections per trial", "", failed));
    }
    drop(agent);
}
