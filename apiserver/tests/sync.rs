//! Sync workers between real apiservers on loopback: A's exportable state appears in B's
//! cache exactly and follows changes; a dead A is withdrawn and restored with hysteresis; a
//! remote whose ID disagrees with the configuration is refused.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use clustermesh_kvstore::KvStore;
use clustermesh_kvstore::testing::free_port;
use clustermesh_model::cluster::ClusterStatus;
use clustermesh_model::keys::{CachedObject, Key};
use support::TestCluster;

const A_MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod, annotations: {service.cilium.io/global: "true"}}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: private, namespace: prod}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.5]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: prod, labels: {app: web}}
status: {podIP: 10.1.0.5, hostIP: 192.0.2.1}
---
apiVersion: v1
kind: Node
metadata: {name: a-node}
status: {addresses: [{type: InternalIP, address: 192.0.2.1}]}
"#;

/// A's exportable keys, mapped to where B caches them.
async fn expected_cache(a: &dyn KvStore) -> BTreeSet<String> {
    let c1 = clustermesh_model::ClusterName::new("c1").unwrap();
    let mut out = BTreeSet::new();
    for kv in a.list("cilium/state/").await.unwrap().kvs {
        let object = match Key::parse(&kv.key) {
            Ok(Key::Identity { id }) => CachedObject::Identity(id),
            Ok(Key::IpCache { ip }) => CachedObject::IpCache(ip),
            Ok(Key::Node { name, .. }) => CachedObject::Node(name),
            Ok(Key::Service {
                namespace, name, ..
            }) => {
                let s: clustermesh_model::service::ClusterService =
                    serde_json::from_slice(&kv.value).unwrap();
                if !(s.include_external && s.shared) {
                    continue;
                }
                CachedObject::Service { namespace, name }
            }
            _ => continue,
        };
        out.insert(
            Key::Cached {
                remote: c1.clone(),
                object,
            }
            .to_string(),
        );
    }
    out
}

async fn cached(b: &dyn KvStore) -> BTreeSet<String> {
    b.list("cilium/cache/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

/// Waits until B's cache equals A's export and holds `key`.
async fn converge(a: &dyn KvStore, b: &dyn KvStore, key: &str) -> BTreeSet<String> {
    let mut last = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..100 {
        let (want, got) = (expected_cache(a).await, cached(b).await);
        if want == got && got.contains(key) {
            return got;
        }
        last = (want, got);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "B's cache never equalled A's export:\nwant {:?}\ngot  {:?}",
        last.0, last.1
    );
}

async fn status_of(b: &dyn KvStore) -> Option<ClusterStatus> {
    b.get("clustermesh/local/cluster-status/c1")
        .await
        .unwrap()
        .map(|kv| serde_json::from_slice(&kv.value).unwrap())
}

async fn wait_status(b: &dyn KvStore, what: &str, pred: impl Fn(&ClusterStatus) -> bool) {
    for _ in 0..200 {
        if status_of(b).await.is_some_and(|s| pred(&s)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("B never saw A as {what}: {:?}", status_of(b).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_imports_a_follows_changes_withdraws_and_restores() {
    let port = free_port();
    let a = TestCluster::full("c1", 1, None, "", port);
    a.write_manifest("a.yaml", A_MANIFESTS);
    let running_a = a.start().await;
    let mut b = TestCluster::new("c2", 2, None);
    let entry = a.remote_entry_for(&b, &format!("127.0.0.1:{port}"), 1);
    b.reconfigure(&format!("remotes:\n{entry}staleness: {{unreachableAfterMillis: 600, withdrawAfterMillis: 600, restoreAfterMillis: 1500, keepLastBackends: false}}\n"));
    let running_b = b.start().await;

    // A's objects appear in B's cache exactly: identities, ipcache, nodes, global services.
    let got = converge(
        running_a.store.as_ref(),
        running_b.store.as_ref(),
        "cilium/cache/nodes/v1/c1/a-node",
    )
    .await;
    assert!(got.contains("cilium/cache/services/v1/c1/prod/web"));
    assert!(
        !got.contains("cilium/cache/services/v1/c1/prod/private"),
        "non-global services stay home"
    );
    assert!(got.contains("cilium/cache/ip/v1/c1/10.1.0.5"));
    assert!(got.contains("cilium/cache/nodes/v1/c1/a-node"));
    wait_status(running_b.store.as_ref(), "ready", |s| {
        s.connected && s.ready && !s.withdrawn
    })
    .await;
    let published = status_of(running_b.store.as_ref()).await.unwrap();
    assert!(
        !published.keep_last_backends,
        "the configured panic threshold is published"
    );

    // Changes and deletions propagate; the cache equals the export after every step.
    a.write_manifest(
        "a.yaml",
        &(A_MANIFESTS
            .replace(
                "[{addresses: [10.1.0.5]}]",
                "[{addresses: [10.1.0.5]}, {addresses: [10.1.0.7]}]",
            )
            .replace("name: a-node", "name: a-node-2")
            // A backend is imported only as one of A's own endpoints: its pod comes too.
            + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: prod, labels: {app: web}}\nstatus: {podIP: 10.1.0.7, hostIP: 192.0.2.1}\n"),
    );
    let got = converge(
        running_a.store.as_ref(),
        running_b.store.as_ref(),
        "cilium/cache/nodes/v1/c1/a-node-2",
    )
    .await;
    assert!(!got.contains("cilium/cache/nodes/v1/c1/a-node"));
    let svc = running_b
        .store
        .get("cilium/cache/services/v1/c1/prod/web")
        .await
        .unwrap()
        .unwrap();
    let svc: clustermesh_model::service::ClusterService =
        serde_json::from_slice(&svc.value).unwrap();
    assert_eq!(svc.backends.len(), 2);

    // A goes away: B marks it unreachable, then withdrawn; the cache (identities included) stays.
    let before = cached(running_b.store.as_ref()).await;
    running_a.stop().await.unwrap();
    wait_status(running_b.store.as_ref(), "withdrawn", |s| {
        s.withdrawn && !s.connected
    })
    .await;
    assert_eq!(cached(running_b.store.as_ref()).await, before);
    assert!(running_b.remotes.status("c1").unwrap().failures >= 1);
    let status = support::http_get(running_b.health_addr, "/status").await;
    assert!(
        status.contains("\"withdrawn\":true") && status.contains("\"name\":\"c1\""),
        "{status}"
    );
    let metrics = support::http_get(running_b.health_addr, "/metrics").await;
    assert!(
        metrics.contains("cilium_kvstoremesh_remote_clusters 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "cilium_kvstoremesh_remote_cluster_readiness_status{target_cluster=\"c1\"} 0"
        ),
        "{metrics}"
    );

    // A comes back on the same address: B resumes, and restores A after restoreAfter.
    let running_a = a.start().await;
    wait_status(running_b.store.as_ref(), "restored", |s| {
        s.connected && s.ready && !s.withdrawn
    })
    .await;
    converge(
        running_a.store.as_ref(),
        running_b.store.as_ref(),
        "cilium/cache/nodes/v1/c1/a-node-2",
    )
    .await;
    let status = running_b.remotes.status("c1").unwrap();
    assert!(status.rejected.is_empty(), "{:?}", status.rejected);
    assert_eq!(
        status.full_syncs, 1,
        "B resumed after A's restart instead of taking a new snapshot"
    );
    let counts: Vec<(&str, usize)> = status
        .counts
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        counts,
        [("identities", 1), ("ip", 2), ("nodes", 1), ("services", 1)]
    );
    let metrics = support::http_get(running_b.health_addr, "/metrics").await;
    assert!(
        metrics.contains(
            "cilium_kvstoremesh_remote_cluster_readiness_status{target_cluster=\"c1\"} 1"
        ),
        "{metrics}"
    );
    // Every family says what it is: a HELP line for each TYPE line.
    let families: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(families.contains(&"cilium_kvstoremesh_remote_cluster_failures"));
    let build = metrics
        .lines()
        .find(|l| l.starts_with("clustermesh_build_info{"))
        .unwrap_or_else(|| panic!("no build info: {metrics}"));
    assert!(
        build.starts_with(&format!(
            "clustermesh_build_info{{version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        )) && build.ends_with(",component=\"apiserver\"} 1"),
        "{build}"
    );
    for f in families {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&format!("# HELP {f} "))),
            "no HELP for {f}: {metrics}"
        );
    }
    running_b.stop().await.unwrap();
    running_a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_with_another_id_is_refused_and_nothing_is_imported() {
    let a = TestCluster::new("c1", 1, None);
    a.write_manifest("a.yaml", A_MANIFESTS);
    let running_a = a.start().await;
    let mut b = TestCluster::new("c2", 2, None);
    // B expects c1 to have ID 3.
    let entry = a.remote_entry_for(&b, &running_a.export_addr.to_string(), 3);
    b.reconfigure(&format!("remotes:\n{entry}"));
    let running_b = b.start().await;
    for _ in 0..100 {
        if running_b.remotes.status("c1").unwrap().refused.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = running_b.remotes.status("c1").unwrap();
    let refused = status.refused.unwrap_or_default();
    assert!(
        refused.contains("reports ID 1, configured as 3"),
        "{refused:?}"
    );
    assert!(cached(running_b.store.as_ref()).await.is_empty());
    running_b.stop().await.unwrap();
    running_a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clusters_one_on_etcd_import_each_other() {
    use clustermesh_apiserver::config::StoreConfig;
    let etcd = clustermesh_kvstore::testing::EtcdServer::start().await;
    let ports = [free_port(), free_port(), free_port()];
    let stores = [
        None,
        Some(StoreConfig::Etcd {
            endpoints: vec![etcd.endpoint()],
            tls: None,
            // Small transactions, so that replacing a snapshot takes several.
            max_txn_ops: Some(std::num::NonZeroUsize::new(3).unwrap()),
            max_txn_bytes: None,
        }),
        None,
    ];
    let mut clusters: Vec<TestCluster> = (0..3)
        .map(|i| {
            TestCluster::full(
                &format!("c{}", i + 1),
                u32::try_from(i + 1).unwrap(),
                stores[i].clone(),
                "",
                ports[i],
            )
        })
        .collect();
    for (i, c) in clusters.iter().enumerate() {
        c.write_manifest(
            "a.yaml",
            &A_MANIFESTS
                .replace("a-node", &format!("node-{}", i + 1))
                .replace("10.1.0.5", &format!("10.{}.0.5", i + 1)),
        );
    }
    // Full mesh: every cluster imports the two others.
    for i in 0..3 {
        let mut entries = String::from("remotes:\n");
        for j in (0..3).filter(|j| *j != i) {
            entries.push_str(&clusters[j].remote_entry_for(
                &clusters[i],
                &format!("127.0.0.1:{}", ports[j]),
                u32::try_from(j + 1).unwrap(),
            ));
        }
        clusters[i].reconfigure(&entries);
    }
    let mut running = Vec::new();
    for c in &clusters {
        running.push(c.start().await);
    }
    for (i, r) in running.iter().enumerate() {
        for j in (0..3).filter(|j| *j != i) {
            let key = format!("cilium/cache/nodes/v1/c{}/node-{}", j + 1, j + 1);
            let mut found = false;
            for _ in 0..100 {
                if r.store.get(&key).await.unwrap().is_some() {
                    found = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(found, "c{} never imported {key}", i + 1);
            let ip = format!("cilium/cache/ip/v1/c{}/10.{}.0.5", j + 1, j + 1);
            assert!(
                r.store.get(&ip).await.unwrap().is_some(),
                "c{} lacks {ip}",
                i + 1
            );
        }
        // Nothing of a cluster is cached in itself.
        let own = format!("cilium/cache/nodes/v1/c{}/", i + 1);
        assert!(r.store.list(&own).await.unwrap().kvs.is_empty());
    }
    for r in running {
        r.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remotes_come_and_go_through_the_remotes_directory_without_a_restart() {
    let a = TestCluster::new("c1", 1, None);
    a.write_manifest("a.yaml", A_MANIFESTS);
    let running_a = a.start().await;
    let mut b = TestCluster::new("c2", 2, None);
    b.reconfigure("remotesDir: remotes\nremoteDrainGraceSeconds: 1\n");
    let remotes_dir = b.dir.path().join("remotes");
    std::fs::create_dir_all(&remotes_dir).unwrap();
    let running_b = b.start().await;
    assert!(running_b.remotes.statuses().is_empty());

    // Adding a file adds the remote.
    let entry = a.remote_entry_for(&b, &running_a.export_addr.to_string(), 1);
    let yaml = entry
        .trim_start_matches("- ")
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .replace(", ", "\n");
    std::fs::write(remotes_dir.join("c1.yaml"), format!("{yaml}\n")).unwrap();
    converge(
        running_a.store.as_ref(),
        running_b.store.as_ref(),
        "cilium/cache/nodes/v1/c1/a-node",
    )
    .await;

    // The remote's config is mirrored as KVStoreMesh mirrors it: `cached`, so that a Cilium
    // agent reading this kvstore takes c1's state from the cache.
    let mirrored = running_b
        .store
        .get("cilium/cluster-config/c1")
        .await
        .unwrap()
        .expect("the mirrored config");
    assert_eq!(
        std::str::from_utf8(&mirrored.value).unwrap(),
        r#"{"id":1,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#
    );
    let from = running_b.store.current_revision().await.unwrap();

    // A broken file changes nothing: the running remote keeps going.
    std::fs::write(remotes_dir.join("broken.yaml"), "name: [\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(running_b.remotes.status("c1").is_some());
    std::fs::remove_file(remotes_dir.join("broken.yaml")).unwrap();

    // Removing the file stops the worker and, after the drain grace, deletes the cache and
    // the remote's status (one after the other: both are waited for).
    std::fs::remove_file(remotes_dir.join("c1.yaml")).unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if running_b.remotes.status("c1").is_none()
            && cached(running_b.store.as_ref()).await.is_empty()
            && status_of(running_b.store.as_ref()).await.is_none()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "the removed remote's cache or status is still there: {:?} {:?}",
        cached(running_b.store.as_ref()).await,
        status_of(running_b.store.as_ref()).await
    );
    // Its mirrored config went first, then its state.
    let mut events = running_b.store.watch("cilium/", from).await.unwrap();
    let mut deleted = Vec::new();
    while let Ok(Some(Ok(e))) = tokio::time::timeout(
        Duration::from_millis(300),
        futures::StreamExt::next(&mut events),
    )
    .await
    {
        if e.kind == clustermesh_kvstore::EventKind::Delete {
            deleted.push(e.key);
        }
    }
    assert_eq!(
        deleted.first().map(String::as_str),
        Some("cilium/cluster-config/c1"),
        "{deleted:?}"
    );
    assert!(deleted.len() > 1, "{deleted:?}");
    running_b.stop().await.unwrap();
    running_a.stop().await.unwrap();
}
