//! Node agent benchmarks, the agent as a process of its own (the real `clustermesh agent`
//! binary), the apiservers inside this benchmark process (loopback, real mTLS, embedded
//! store):
//! - end-to-end propagation into B's agent: a kvstore write in A, and a manifest file in A's
//!   directory -> the entry written into the agent's ipcache map, p50/p99;
//! - bootstrap of an agent into 250 clusters x 1,000 endpoints (synthetic remote state written
//!   straight into the local apiserver's cache), and the agent's memory per remote endpoint
//!   and per service at 250,000 remote endpoints.
//!
//! `cargo bench -p clustermesh --bench agent`. The agent runs the userspace datapath (its
//! maps are in its own memory, counted in its RSS); as root, the bootstrap also runs on the
//! eBPF datapath (maps in kernel memory, not in the RSS).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failed step ends the run"
)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use clustermesh_apiserver::Running;
use clustermesh_certs::ClientIdentity;
use clustermesh_kvstore::{KvStore, Write};
use clustermesh_model::ClusterName;
use clustermesh_model::keys::{CachedObject, Key};

mod procs;
#[path = "../../apiserver/benches/support/mod.rs"]
mod support;
use support::{Cluster, ip_entry, start};

/// Writes the agent's certificate and configuration for `cluster`'s node `n1`.
fn agent_config(cluster: &Cluster, running: &Running, bpf: Option<&str>) -> PathBuf {
    let dir = cluster.dir.path();
    cluster
        .ca
        .client_cert(&ClientIdentity::Local(cluster.name.clone()))
        .unwrap()
        .write(dir, "local")
        .unwrap();
    let datapath = match bpf {
        Some(section) => format!("datapath: bpf\nbpf: {section}\n"),
        None => "datapath: userspace\n".to_owned(),
    };
    let path = dir.join("agent.yaml");
    std::fs::write(
        &path,
        format!(
            "cluster: {}\nnodeName: n1\napiserver: {{address: \"{}\", ca: ca.pem, cert: local.pem, key: local-key.pem}}\nadmin: \"127.0.0.1:0\"\n{datapath}",
            cluster.name, running.export_addr
        ),
    )
    .unwrap();
    path
}

fn spawn_agent(config: &Path) -> (Child, String) {
    procs::spawn("agent", config)
}

/// Polls the agent's status until `pred` holds (every `every`).
async fn wait_status(admin: &str, every: Duration, pred: impl Fn(&serde_json::Value) -> bool) {
    let t = Instant::now();
    loop {
        if let Some(s) = procs::get_json(admin, "/status").await
            && pred(&s)
        {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(900), "timed out");
        tokio::time::sleep(every).await;
    }
}

fn map_count(s: &serde_json::Value, map: &str) -> u64 {
    s["maps"][map].as_u64().unwrap_or(0)
}

fn pct(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

/// Propagation into B's agent of 300 kvstore writes in A (`manifest: false`) or 30 manifest
/// files in A's directory, one at a time, each on a fresh pair of clusters (A's apiserver
/// owns its state prefix: a manifest change would undo direct writes).
async fn propagation(manifest: bool) -> (f64, f64) {
    let a = Cluster::new("c1");
    let b = Cluster::new("c2");
    let ra = start(a.config(1, "")).await;
    let rb = start(b.config(2, &format!("remotes:\n{}", a.entry_for(&b, &ra, 1)))).await;
    while !rb.remotes.status("c1").is_some_and(|s| s.ready) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (child, admin) = spawn_agent(&agent_config(&b, &rb, None));
    wait_status(&admin, Duration::from_millis(20), |s| s["synced"] == true).await;
    let mut have = map_count(
        &procs::get_json(&admin, "/status").await.unwrap(),
        "ipcache",
    );
    let mut lat = Vec::new();
    for i in 0..if manifest { 30 } else { 300u32 } {
        let t = if manifest {
            let text = format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns, labels: {{app: a}}}}\nstatus: {{podIP: 10.50.0.{}}}\n",
                i + 1
            );
            let tmp = a.dir.path().join(".tmp.yaml");
            std::fs::write(&tmp, text).unwrap();
            let t = Instant::now();
            std::fs::rename(&tmp, a.dir.path().join(format!("manifests/p{i}.yaml"))).unwrap();
            t
        } else {
            let (k, v) = ip_entry(i, (1 << 16) + 1);
            let t = Instant::now();
            ra.store.put(&k, &v, None).await.unwrap();
            t
        };
        have += 1;
        wait_status(&admin, Duration::from_millis(1), |s| {
            map_count(s, "ipcache") == have
        })
        .await;
        lat.push(t.elapsed());
    }
    procs::stop(child);
    rb.stop().await.unwrap();
    ra.stop().await.unwrap();
    pct(lat)
}

/// Writes `clusters` x `per` remote endpoints (10 identities per cluster) into the hub's
/// cache, as its sync workers would.
async fn fill_remote(store: &dyn KvStore, clusters: u32, per: u32) {
    let mut batch = Vec::new();
    for r in 0..clusters {
        let remote = ClusterName::new(format!("r{r}")).unwrap();
        let base = (r + 2) << 16;
        for i in 0..10 {
            let id = clustermesh_model::identity::Identity::new(base + 256 + i).unwrap();
            batch.push(Write::Put {
                key: Key::Cached {
                    remote: remote.clone(),
                    object: CachedObject::Identity(id),
                }
                .to_string(),
                value: format!(
                    "k8s:app=a{i};k8s:io.cilium.k8s.policy.cluster={remote};k8s:io.kubernetes.pod.namespace=ns;"
                )
                .into_bytes(),
            });
        }
        for i in 0..per {
            let n = r * per + i;
            let ip: IpAddr = format!("10.{}.{}.{}", 100 + n / 65_536, (n / 256) % 256, n % 256)
                .parse()
                .unwrap();
            batch.push(Write::Put {
                key: Key::Cached {
                    remote: remote.clone(),
                    object: CachedObject::IpCache(ip),
                }
                .to_string(),
                value: format!(
                    r#"{{"IP":"{ip}","ID":{},"HostIP":null,"K8sNamespace":"ns","K8sPodName":"p{n}","NamedPorts":[]}}"#,
                    base + 256 + i % 10
                )
                .into_bytes(),
            });
        }
        if batch.len() >= 20_000 {
            store.apply(&batch).await.unwrap();
            batch.clear();
        }
    }
    store.apply(&batch).await.unwrap();
}

/// 10,000 local services with 10 backends each.
async fn fill_services(store: &dyn KvStore, cluster: &str) {
    let mut batch = Vec::new();
    for s in 0..10_000u32 {
        let backends: Vec<String> = (0..10)
            .map(|b| {
                let n = s * 10 + b;
                format!(
                    r#""10.{}.{}.{}":{{"http":{{"Protocol":"TCP","Port":8080}}}}"#,
                    200 + n / 65_536,
                    (n / 256) % 256,
                    n % 256
                )
            })
            .collect();
        let v = format!(
            r#"{{"cluster":"{cluster}","namespace":"ns","name":"s{s}","frontends":{{"10.96.{}.{}":{{"http":{{"Protocol":"TCP","Port":80}}}}}},"backends":{{{}}},"labels":{{}},"selector":{{}},"includeExternal":true,"shared":true,"clusterID":1}}"#,
            s / 250,
            s % 250 + 1,
            backends.join(",")
        );
        batch.push(Write::Put {
            key: format!("cilium/state/services/v1/{cluster}/ns/s{s}"),
            value: v.into_bytes(),
        });
    }
    store.apply(&batch).await.unwrap();
}

async fn scale(bpf: Option<(&str, &str)>) {
    let hub = Cluster::new("hub");
    let rh = start(hub.config(1, "")).await;
    let section = bpf.map(|(root, cgroup)| format!("{{root: {root}, cgroup: {cgroup}}}"));
    let config = agent_config(&hub, &rh, section.as_deref());
    let mode = if bpf.is_some() { "bpf" } else { "userspace" };

    // Baseline: an agent with nothing to hold.
    let (child, admin) = spawn_agent(&config);
    wait_status(&admin, Duration::from_millis(20), |s| s["synced"] == true).await;
    let baseline = procs::proc_kb(child.id(), "VmRSS:");
    procs::stop(child);

    fill_remote(rh.store.as_ref(), 250, 1_000).await;
    let t = Instant::now();
    let (child, admin) = spawn_agent(&config);
    wait_status(&admin, Duration::from_millis(20), |s| {
        s["synced"] == true && map_count(s, "ipcache") == 250_000
    })
    .await;
    let boot = t.elapsed().as_secs_f64();
    let with_endpoints = procs::proc_kb(child.id(), "VmRSS:");
    let hwm = procs::proc_kb(child.id(), "VmHWM:");
    fill_services(rh.store.as_ref(), "hub").await;
    wait_status(&admin, Duration::from_millis(20), |s| {
        map_count(s, "services") == 10_000
    })
    .await;
    let with_services = procs::proc_kb(child.id(), "VmRSS:");
    procs::stop(child);
    rh.stop().await.unwrap();
    let per_endpoint = (with_endpoints.saturating_sub(baseline)) as f64 * 1024.0 / 250_000.0;
    let per_service = (with_services.saturating_sub(with_endpoints)) as f64 * 1024.0 / 10_000.0;
    println!(
        "| {mode} | {boot:.1} s | {} MB | {} MB | {per_endpoint:.0} B | {per_service:.0} B |",
        baseline / 1024,
        hwm / 1024
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("| propagation | p50 (ms) | p99 (ms) |");
        println!("|---|---|---|");
        let (p50, p99) = propagation(false).await;
        println!("| kvstore write in A -> B's agent ipcache map (300 writes, one at a time) | {p50:.1} | {p99:.1} |");
        let (p50, p99) = propagation(true).await;
        println!("| manifest file in A -> B's agent ipcache map (30 changes) | {p50:.1} | {p99:.1} |");
        println!();
        println!("| datapath | bootstrap, 250 clusters x 1,000 endpoints | RSS, empty | peak RSS | per remote endpoint | per service (10 backends) |");
        println!("|---|---|---|---|---|---|");
        scale(None).await;
        let root = std::env::var("USER").is_ok_and(|u| u == "root")
            || std::fs::read_to_string("/proc/self/status")
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
        if root {
            let bpf_root = format!("/sys/fs/bpf/clustermesh-bench-{}", std::process::id());
            let cgroup2 = std::fs::read_to_string("/proc/mounts")
                .unwrap()
                .lines()
                .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
                .expect("a cgroup v2 mount");
            let cgroup = format!("{cgroup2}/clustermesh-bench-{}", std::process::id());
            std::fs::create_dir_all(&cgroup).unwrap();
            scale(Some((&bpf_root, &cgroup))).await;
            let _ = std::fs::remove_dir_all(&bpf_root);
            let _ = std::fs::remove_dir(&cgroup);
        }
    });
}
