//! Sync propagation, in one process on loopback with the embedded store: a kvstore write in A
//! -> the entry in B's cache, p50/p99, at 100 and 1,000 writes per second; and a manifest
//! change in A -> B's cache. (Initial sync and fan-in, with the importer as a process of its
//! own: `cli/benches/import.rs`.)
//!
//! `cargo bench -p clustermesh-apiserver --bench sync`.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failed step ends the run"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_apiserver::Running;
use futures::StreamExt;

mod support;
use support::{Cluster, ip_entry, start};

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
    });
}
