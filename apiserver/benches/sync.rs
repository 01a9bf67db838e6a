//! Sync benchmarks, in one process on loopback with the embedded store:
//! - propagation: a kvstore write in A -> the entry in B's cache, p50/p99, at 100 and 1,000
//!   writes per second; and a manifest change in A -> B's cache;
//! - initial sync: B imports an A holding 100,000 endpoints, 10,000 services and 5,000
//!   identities;
//! - fan-in: 50 remotes of 1,000 endpoints each into one apiserver.
//!
//! `cargo bench -p clustermesh-apiserver --bench sync`.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failed step ends the run"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_apiserver::{Config, Running};
use clustermesh_certs::{CertificateAuthority, ClientIdentity};
use clustermesh_kvstore::KvStore;
use clustermesh_model::ClusterName;
use futures::StreamExt;

struct Cluster {
    dir: tempfile::TempDir,
    name: ClusterName,
    ca: CertificateAuthority,
}

impl Cluster {
    fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster = ClusterName::new(name).unwrap();
        let ca = CertificateAuthority::generate(&cluster).unwrap();
        ca.cert().write(dir.path(), "ca").unwrap();
        ca.server_cert(&cluster, &[])
            .unwrap()
            .write(dir.path(), "server")
            .unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        Self {
            dir,
            name: cluster,
            ca,
        }
    }

    fn config(&self, id: u32, remotes: &str) -> Config {
        let yaml = format!(
            "cluster: {{name: {}, id: {id}}}\nstore: {{backend: sled, path: store}}\nsource: {{manifestDir: manifests}}\n\
             listen: {{export: \"127.0.0.1:0\", health: \"127.0.0.1:0\"}}\ntls: {{ca: ca.pem, cert: server.pem, key: server-key.pem}}\n{remotes}",
            self.name
        );
        let path = self.dir.path().join("apiserver.yaml");
        std::fs::write(&path, yaml).unwrap();
        Config::load(&path).unwrap()
    }

    /// The `remotes:` entry with which `peer` imports this cluster.
    fn entry_for(&self, peer: &Cluster, running: &Running, id: u32) -> String {
        let dir = peer.dir.path().join(format!("remote-{}", self.name));
        std::fs::create_dir_all(&dir).unwrap();
        self.ca.cert().write(&dir, "ca").unwrap();
        self.ca
            .client_cert(&ClientIdentity::Remote(peer.name.clone()))
            .unwrap()
            .write(&dir, "client")
            .unwrap();
        let d = dir.display();
        format!(
            "- {{name: {}, id: {id}, address: \"{}\", ca: {d}/ca.pem, cert: {d}/client.pem, key: {d}/client-key.pem}}\n",
            self.name, running.export_addr
        )
    }
}

async fn start(config: Config) -> Running {
    let r = clustermesh_apiserver::start(config).await.unwrap();
    while !r.metrics.is_ready() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    r
}

fn ip_entry(i: u32, identity: u32) -> (String, Vec<u8>) {
    let ip = format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256);
    let v = format!(
        r#"{{"IP":"{ip}","ID":{identity},"HostIP":null,"K8sNamespace":"ns","K8sPodName":"p{i}","NamedPorts":[]}}"#
    );
    (format!("cilium/state/ip/v1/default/{ip}"), v.into_bytes())
}

fn pct(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

async fn wait_ready(b: &Running, remote: &str) {
    while !b.remotes.status(remote).is_some_and(|s| s.ready) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn propagation(rate: u32, n: u32) -> (f64, f64) {
    let a = Cluster::new("c1");
    let b = Cluster::new("c2");
    let ra = start(a.config(1, "")).await;
    let rb = start(b.config(2, &format!("remotes:\n{}", a.entry_for(&b, &ra, 1)))).await;
    wait_ready(&rb, "c1").await;
    let start_rev = rb.store.current_revision().await.unwrap();
    let mut watch = rb
        .store
        .watch("cilium/cache/ip/v1/c1/", start_rev)
        .await
        .unwrap();
    let gap = Duration::from_secs(1) / rate;
    let mut sent = Vec::with_capacity(n as usize);
    let writer_store = Arc::clone(&ra.store);
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        let mut times = Vec::new();
        for i in 0..n {
            let due = t0 + gap * i;
            tokio::time::sleep_until(due.into()).await;
            let (k, v) = ip_entry(i, 65_600);
            times.push(Instant::now());
            writer_store.put(&k, &v, None).await.unwrap();
        }
        times
    });
    let mut arrived = Vec::with_capacity(n as usize);
    while arrived.len() < n as usize {
        let e = watch.next().await.unwrap().unwrap();
        arrived.push((e.key, Instant::now()));
    }
    sent.extend(writer.await.unwrap());
    let lat: Vec<Duration> = arrived
        .iter()
        .map(|(key, at)| {
            let ip = key.rsplit('/').next().unwrap();
            let parts: Vec<u32> = ip.split('.').map(|p| p.parse().unwrap()).collect();
            let idx = (parts[1] - 100) * 65_536 + parts[2] * 256 + parts[3];
            at.duration_since(sent[idx as usize])
        })
        .collect();
    rb.stop().await.unwrap();
    ra.stop().await.unwrap();
    pct(lat)
}

async fn manifest_propagation(samples: u32) -> (f64, f64) {
    let a = Cluster::new("c1");
    let b = Cluster::new("c2");
    let ra = start(a.config(1, "")).await;
    let rb = start(b.config(2, &format!("remotes:\n{}", a.entry_for(&b, &ra, 1)))).await;
    wait_ready(&rb, "c1").await;
    let mut lat = Vec::new();
    for i in 0..samples {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns, labels: {{app: a}}}}\nstatus: {{podIP: 10.50.0.{}}}\n",
            i + 1
        );
        let tmp = a.dir.path().join(".tmp.yaml");
        std::fs::write(&tmp, text).unwrap();
        let t = Instant::now();
        std::fs::rename(&tmp, a.dir.path().join(format!("manifests/p{i}.yaml"))).unwrap();
        let key = format!("cilium/cache/ip/v1/c1/10.50.0.{}", i + 1);
        while rb.store.get(&key).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lat.push(t.elapsed());
    }
    rb.stop().await.unwrap();
    ra.stop().await.unwrap();
    pct(lat)
}

fn vm_hwm() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
        .unwrap_or_default()
}

async fn fill(
    store: &dyn KvStore,
    cluster: &str,
    cluster_id: u32,
    endpoints: u32,
    services: u32,
    identities: u32,
    offset: u32,
) {
    let base = cluster_id << 16;
    for i in 0..identities {
        let labels = format!(
            "k8s:app=a{i};k8s:io.cilium.k8s.policy.cluster={cluster};k8s:io.kubernetes.pod.namespace=ns;"
        );
        store
            .put(
                &format!("cilium/state/identities/v1/id/{}", base + 1 + i),
                labels.as_bytes(),
                None,
            )
            .await
            .unwrap();
    }
    for i in 0..endpoints {
        let (k, v) = ip_entry(offset + i, base + 1 + i % identities.max(1));
        store.put(&k, &v, None).await.unwrap();
    }
    for s in 0..services {
        let v = format!(
            r#"{{"cluster":"{cluster}","namespace":"ns","name":"s{s}","frontends":{{"10.96.{}.{}":{{"http":{{"Protocol":"TCP","Port":80}}}}}},"backends":{{}},"labels":{{}},"selector":{{}},"includeExternal":true,"shared":true,"clusterID":{cluster_id}}}"#,
            s / 250,
            s % 250 + 1
        );
        store
            .put(
                &format!("cilium/state/services/v1/{cluster}/ns/s{s}"),
                v.as_bytes(),
                None,
            )
            .await
            .unwrap();
    }
}

async fn initial_sync() -> (f64, String) {
    let a = Cluster::new("c1");
    let b = Cluster::new("c2");
    let ra = start(a.config(1, "")).await;
    fill(ra.store.as_ref(), "c1", 1, 100_000, 10_000, 5_000, 0).await;
    let t = Instant::now();
    let rb = start(b.config(2, &format!("remotes:\n{}", a.entry_for(&b, &ra, 1)))).await;
    wait_ready(&rb, "c1").await;
    let secs = t.elapsed().as_secs_f64();
    let counts = rb.remotes.status("c1").unwrap().counts;
    assert_eq!(counts.get("ip"), Some(&100_000));
    assert_eq!(counts.get("services"), Some(&10_000));
    rb.stop().await.unwrap();
    ra.stop().await.unwrap();
    (secs, vm_hwm())
}

async fn fan_in() -> f64 {
    let hub = Cluster::new("hub");
    let mut remotes = Vec::new();
    let mut entries = String::from("remotes:\n");
    let hub_dir = &hub;
    for i in 0..50u32 {
        let c = Cluster::new(&format!("r{i}"));
        let r = start(c.config(i + 2, "")).await;
        fill(
            r.store.as_ref(),
            &format!("r{i}"),
            i + 2,
            1_000,
            0,
            10,
            i * 1_000,
        )
        .await;
        entries.push_str(&c.entry_for(hub_dir, &r, i + 2));
        remotes.push((c, r));
    }
    let t = Instant::now();
    let rh = start(hub.config(1, &entries)).await;
    for i in 0..50 {
        wait_ready(&rh, &format!("r{i}")).await;
    }
    let secs = t.elapsed().as_secs_f64();
    rh.stop().await.unwrap();
    for (_, r) in remotes {
        r.stop().await.unwrap();
    }
    secs
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
        for (rate, n) in [(100, 1_000), (1_000, 5_000)] {
            let (p50, p99) = propagation(rate, n).await;
            println!("| kvstore write in A -> B's cache, {rate} writes/s ({n} writes) | {p50:.2} | {p99:.2} |");
        }
        let (p50, p99) = manifest_propagation(30).await;
        println!("| manifest file in A -> B's cache (30 changes) | {p50:.1} | {p99:.1} |");
        let (secs, hwm) = initial_sync().await;
        println!();
        println!("initial sync of 100,000 endpoints, 10,000 services, 5,000 identities: {secs:.1} s (bench process peak RSS {hwm}, A and B together)");
        let secs = fan_in().await;
        println!("fan-in of 50 remotes x 1,000 endpoints: {secs:.1} s to ready (bench process peak RSS {})", vm_hwm());
    });
}
