//! Bootstrap of an importing apiserver that runs as a process of its own (the real
//! `clustermesh apiserver` binary), so that its peak memory is its own:
//! - initial sync: B imports an A holding 100,000 endpoints, 10,000 services and 5,000
//!   identities;
//! - fan-in: one apiserver imports 50 remotes of 1,000 endpoints each.
//!
//! The exporting apiservers run inside this benchmark process, on loopback, with real mTLS
//! and the embedded store. Reports seconds from the importer's start until every remote is
//! ready (snapshot in its cache), and the importer's peak resident memory (VmHWM).
//!
//! `cargo bench -p clustermesh --bench import`.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failed step ends the run"
)]

use std::process::Child;
use std::time::{Duration, Instant};

mod procs;
#[path = "../../apiserver/benches/support/mod.rs"]
mod support;
use support::{Cluster, fill, start};

/// The importer, started on `cluster`'s config with `remotes`; returns it and its health
/// address.
fn spawn_importer(cluster: &Cluster, id: u32, remotes: &str) -> (Child, String) {
    cluster.config(id, remotes);
    procs::spawn("apiserver", &cluster.dir.path().join("apiserver.yaml"))
}

/// Waits until the importer reports `n` remotes, all ready; returns their entry counts.
async fn wait_all_ready(health: &str, n: usize) -> Vec<serde_json::Value> {
    let t = Instant::now();
    loop {
        if let Some(s) = procs::get_json(health, "/status").await {
            let remotes = s["remotes"].as_array().cloned().unwrap_or_default();
            if remotes.len() == n && remotes.iter().all(|r| r["ready"] == true) {
                return remotes.iter().map(|r| r["counts"].clone()).collect();
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "not ready in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn peak_and_stop(child: Child) -> String {
    let hwm = procs::proc_kb(child.id(), "VmHWM:");
    procs::stop(child);
    format!("{hwm} kB")
}

async fn initial_sync() -> (f64, String) {
    let a = Cluster::new("c1");
    let b = Cluster::new("c2");
    let ra = start(a.config(1, "")).await;
    fill(ra.store.as_ref(), "c1", 1, 100_000, 10_000, 5_000, 0).await;
    let remotes = format!("remotes:\n{}", a.entry_for(&b, &ra, 1));
    let t = Instant::now();
    let (child, health) = spawn_importer(&b, 2, &remotes);
    let counts = wait_all_ready(&health, 1).await;
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(counts[0]["ip"], 100_000);
    assert_eq!(counts[0]["services"], 10_000);
    assert_eq!(counts[0]["identities"], 5_000);
    let hwm = peak_and_stop(child);
    ra.stop().await.unwrap();
    (secs, hwm)
}

async fn fan_in() -> (f64, String) {
    let hub = Cluster::new("hub");
    let mut exporters = Vec::new();
    let mut remotes = String::from("remotes:\n");
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
        remotes.push_str(&c.entry_for(&hub, &r, i + 2));
        exporters.push((c, r));
    }
    let t = Instant::now();
    let (child, health) = spawn_importer(&hub, 1, &remotes);
    let counts = wait_all_ready(&health, 50).await;
    let secs = t.elapsed().as_secs_f64();
    assert!(counts.iter().all(|c| c["ip"] == 1_000));
    let hwm = peak_and_stop(child);
    for (_, r) in exporters {
        r.stop().await.unwrap();
    }
    (secs, hwm)
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
        println!("| bootstrap | ready after | importer peak RSS |");
        println!("|---|---|---|");
        let (secs, hwm) = initial_sync().await;
        println!("| B imports A with 100,000 endpoints, 10,000 services, 5,000 identities | {secs:.1} s | {hwm} |");
        let (secs, hwm) = fan_in().await;
        println!("| one apiserver imports 50 remotes x 1,000 endpoints | {secs:.1} s | {hwm} |");
    });
}
