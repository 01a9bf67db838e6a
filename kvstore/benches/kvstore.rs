//! kvstore benchmark: put throughput (1 and 64 writes in flight), watch delivery latency from
//! put to event (p50/p99), and listing 100k keys, for the embedded sled store and a real etcd.
//!
//! Run with `cargo bench -p clustermesh-kvstore`; results go to stdout as a Markdown table
//! (copied into docs/BENCHMARKS.md with the machine they ran on). `KV_BENCH_SCALE=0.1` runs a
//! tenth of the work for a quick look.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_kvstore::KvStore;
use clustermesh_kvstore::embedded::{SledConfig, SledStore};
use clustermesh_kvstore::testing::EtcdServer;
use futures::StreamExt;

const VALUE: [u8; 200] = [b'v'; 200];

struct Figures {
    put_1: f64,
    put_64: f64,
    watch_p50: Duration,
    watch_p99: Duration,
    list_keys: usize,
    list: Duration,
}

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("KV_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * scale) as usize).max(64)
}

async fn puts_per_second(
    store: Arc<dyn KvStore>,
    prefix: &str,
    total: usize,
    in_flight: usize,
) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|t| {
            let store = Arc::clone(&store);
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                for i in (t..total).step_by(in_flight) {
                    store
                        .put(&format!("{prefix}{i:08}"), &VALUE, None)
                        .await
                        .expect("put");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

async fn watch_latency(store: Arc<dyn KvStore>, samples: usize) -> (Duration, Duration) {
    let start = store.current_revision().await.expect("revision");
    let mut watch = store.watch("bench/watch/", start).await.expect("watch");
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let t = Instant::now();
        store
            .put(&format!("bench/watch/{}", i % 100), &VALUE, None)
            .await
            .expect("put");
        let event = watch
            .next()
            .await
            .expect("watch ended")
            .expect("watch failed");
        latencies.push(t.elapsed());
        assert_eq!(event.key, format!("bench/watch/{}", i % 100));
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    (pct(0.50), pct(0.99))
}

async fn run(store: Arc<dyn KvStore>) -> Figures {
    let put_1 = puts_per_second(Arc::clone(&store), "bench/seq/", scaled(5_000), 1).await;
    let put_64 = puts_per_second(Arc::clone(&store), "bench/par/", scaled(20_000), 64).await;
    let (watch_p50, watch_p99) = watch_latency(Arc::clone(&store), scaled(2_000)).await;
    let list_keys = scaled(100_000);
    puts_per_second(Arc::clone(&store), "bench/list/", list_keys, 64).await;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let listing = store.list("bench/list/").await.expect("list");
        best = best.min(t.elapsed());
        assert_eq!(listing.kvs.len(), list_keys);
    }
    Figures {
        put_1,
        put_64,
        watch_p50,
        watch_p99,
        list_keys,
        list: best,
    }
}

fn row(name: &str, f: &Figures) -> String {
    format!(
        "| {name} | {:.0} | {:.0} | {:.2} | {:.2} | {} keys in {:.0} ms |",
        f.put_1,
        f.put_64,
        f.watch_p50.as_secs_f64() * 1e3,
        f.watch_p99.as_secs_f64() * 1e3,
        f.list_keys,
        f.list.as_secs_f64() * 1e3,
    )
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and expects a
    // quick exit.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let sled = SledStore::open(&SledConfig::new(dir.path().join("store"))).expect("open sled");
        let sled_figures = run(Arc::new(sled)).await;

        let etcd = EtcdServer::start().await;
        let etcd_figures = run(Arc::new(etcd.store().await)).await;

        println!("| backend | put/s, 1 in flight | put/s, 64 in flight | watch p50 (ms) | watch p99 (ms) | list |");
        println!("|---|---|---|---|---|---|");
        println!("{}", row("sled (embedded)", &sled_figures));
        println!("{}", row("etcd 3.4 (loopback)", &etcd_figures));
    });
}
