//! Export latency: from a kvstore write to the event arriving at watching clients over mTLS,
//! p50/p99, with 1 and with 1,000 concurrent watchers, on the embedded store and on etcd.
//!
//! `cargo bench -p clustermesh-apiserver --bench export`.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failed step ends the run"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_apiserver::Config;
use clustermesh_certs::{CertificateAuthority, ClientIdentity};
use clustermesh_kvstore::testing::EtcdServer;
use clustermesh_model::ClusterName;
use clustermesh_proto::client::{ClientTls, connect, server_name};
use clustermesh_proto::v1::{self, watch_event::Event as Ev};
use tokio::sync::mpsc;

const SAMPLES: usize = 200;

fn setup(dir: &std::path::Path, store: &str) -> (Config, ClientTls) {
    let name = ClusterName::new("c1").unwrap();
    let ca = CertificateAuthority::generate(&name).unwrap();
    ca.cert().write(dir, "ca").unwrap();
    ca.server_cert(&name, &[])
        .unwrap()
        .write(dir, "server")
        .unwrap();
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let yaml = format!(
        "cluster: {{name: c1, id: 1}}\nstore: {store}\nsource: {{manifestDir: manifests}}\n\
         listen: {{export: \"127.0.0.1:0\", health: \"127.0.0.1:0\"}}\ntls: {{ca: ca.pem, cert: server.pem, key: server-key.pem}}\n"
    );
    std::fs::write(dir.join("apiserver.yaml"), yaml).unwrap();
    let cert = ca
        .client_cert(&ClientIdentity::Local(name.clone()))
        .unwrap();
    let tls = ClientTls {
        ca_pem: ca.cert().cert_pem.clone(),
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
        server_name: server_name("c1"),
    };
    (Config::load(&dir.join("apiserver.yaml")).unwrap(), tls)
}

/// p50 and p99 in microseconds over every (write, watcher) pair.
async fn measure(config: Config, tls: ClientTls, watchers: usize) -> (u128, u128) {
    let running = clustermesh_apiserver::start(config).await.unwrap();
    while !running.metrics.is_ready() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = running.export_addr.to_string();
    // 100 streams per connection.
    let mut clients = Vec::new();
    for _ in 0..watchers.div_ceil(100) {
        clients.push(connect(&addr, &tls).await.unwrap());
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let mut ready = Vec::new();
    for w in 0..watchers {
        let mut client = clients[w / 100].clone();
        let tx = tx.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        ready.push(ready_rx);
        tokio::spawn(async move {
            let req = v1::WatchRequest {
                kinds: vec![v1::Kind::Ipcache as i32],
                since_revision: 0,
            };
            let mut s = client.watch(req).await.unwrap().into_inner();
            let mut ready_tx = Some(ready_tx);
            while let Ok(Some(e)) = s.message().await {
                match e.event {
                    Some(Ev::Synced(_)) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Some(Ev::Upsert(v1::Upsert {
                        object: Some(v1::upsert::Object::Ipcache(entry)),
                    })) => {
                        let i: usize = entry.pod_name.trim_start_matches('p').parse().unwrap();
                        let _ = tx.send((i, Instant::now()));
                    }
                    _ => {}
                }
            }
        });
    }
    for r in ready {
        r.await.unwrap();
    }
    let store = Arc::clone(&running.store);
    let mut latencies = Vec::with_capacity(SAMPLES * watchers);
    for i in 0..SAMPLES {
        let ip = format!("10.9.{}.{}", i / 250, i % 250 + 1);
        let value = format!(
            r#"{{"IP":"{ip}","ID":65600,"HostIP":null,"K8sNamespace":"ns","K8sPodName":"p{i}","NamedPorts":[]}}"#
        );
        let start = Instant::now();
        store
            .put(
                &format!("cilium/state/ip/v1/default/{ip}"),
                value.as_bytes(),
                None,
            )
            .await
            .unwrap();
        let mut got = 0;
        while got < watchers {
            let (j, at) = rx.recv().await.unwrap();
            assert_eq!(j, i);
            latencies.push(at.duration_since(start).as_micros());
            got += 1;
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    let out = (pct(0.5), pct(0.99));
    running.stop().await.unwrap();
    out
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
        println!("| store | watchers | p50 (µs) | p99 (µs) |");
        println!("|---|---|---|---|");
        for watchers in [1, 1000] {
            let dir = tempfile::tempdir().unwrap();
            let (config, tls) = setup(dir.path(), "{backend: sled, path: store}");
            let (p50, p99) = measure(config, tls, watchers).await;
            println!("| sled | {watchers} | {p50} | {p99} |");
        }
        for watchers in [1, 1000] {
            let etcd = EtcdServer::start().await;
            let dir = tempfile::tempdir().unwrap();
            let (config, tls) = setup(
                dir.path(),
                &format!("{{backend: etcd, endpoints: [{}]}}", etcd.endpoint()),
            );
            let (p50, p99) = measure(config, tls, watchers).await;
            println!("| etcd | {watchers} | {p50} | {p99} |");
        }
    });
}
