//! The manifest directory ends up in the kvstore, with sled and with a real etcd: exactly the
//! documented keys with the documented JSON, identities in the cluster's range, and every
//! change and deletion reflected.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use clustermesh_apiserver::config::StoreConfig;
use clustermesh_kvstore::KvStore;
use clustermesh_kvstore::testing::EtcdServer;
use clustermesh_model::ClusterName;
use clustermesh_model::endpoint::IpCacheEntry;
use clustermesh_model::identity::Identity;
use clustermesh_model::service::{BackendConditions, ClusterService};
use support::TestCluster;

const NAMESPACE_AND_SERVICE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod, annotations: {service.cilium.io/global: "true"}}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}], selector: {app: web}}
"#;

fn slice(web1_ready: bool) -> String {
    format!(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: prod, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [10.1.0.5]
- addresses: [10.1.0.6]
  conditions: {{ready: {web1_ready}}}
"#
    )
}

fn pods(with_db: bool) -> String {
    let mut text = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: prod, labels: {app: web, pod-template-hash: a}}
status: {podIP: 10.1.0.5, hostIP: 192.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: prod, labels: {app: web, pod-template-hash: b}}
status: {podIP: 10.1.0.6, hostIP: 192.0.2.1}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.0.2.1}]}
"#
    .to_owned();
    if with_db {
        text.push_str("---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: prod, labels: {app: db}}\nstatus: {podIP: 10.1.0.7, hostIP: 192.0.2.1}\n");
    }
    text
}

/// Everything the apiserver wrote, minus the canaries' timestamps.
async fn contents(store: &dyn KvStore) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for prefix in ["cilium/", "clustermesh/"] {
        for kv in store.list(prefix).await.unwrap().kvs {
            let value = if kv.key.starts_with("cilium/synced/") {
                Vec::new()
            } else {
                kv.value
            };
            out.insert(kv.key, value);
        }
    }
    out
}

async fn eventually(
    store: &dyn KvStore,
    check: impl Fn(&BTreeMap<String, Vec<u8>>) -> Result<(), String>,
) -> BTreeMap<String, Vec<u8>> {
    let mut last = String::new();
    for _ in 0..100 {
        let c = contents(store).await;
        match check(&c) {
            Ok(()) => return c,
            Err(why) => last = why,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the store never reached the expected state: {last}");
}

const SAVED: &str = "clustermesh/local/manifest-last-good/";

fn keys_of(c: &BTreeMap<String, Vec<u8>>) -> Vec<&str> {
    c.keys()
        .map(String::as_str)
        .filter(|k| !k.starts_with("cilium/state/identities/") && !k.starts_with(SAVED))
        .collect()
}

/// The saved copies of the manifest files' good content: file -> content.
fn saved_copies(c: &BTreeMap<String, Vec<u8>>) -> BTreeMap<&str, String> {
    c.iter()
        .filter_map(|(k, v)| {
            let file = k.strip_prefix(SAVED)?;
            Some((file, String::from_utf8(v.clone()).unwrap()))
        })
        .collect()
}

fn identity_of(c: &BTreeMap<String, Vec<u8>>, ip: &str) -> Identity {
    let e: IpCacheEntry =
        serde_json::from_slice(&c[&format!("cilium/state/ip/v1/default/{ip}")]).unwrap();
    e.identity
}

async fn scenario(cluster: TestCluster) {
    cluster.write_manifest("ns-svc.yaml", NAMESPACE_AND_SERVICE);
    cluster.write_manifest("slice.yaml", &slice(false));
    cluster.write_manifest("pods.yaml", &pods(true));
    let running = cluster.start().await;
    let store = running.store.as_ref();

    // Step 1: everything defined is there, under the documented keys.
    let base = [
        // The heartbeat Cilium's remote readers watch.
        "cilium/.heartbeat",
        "cilium/cluster-config/c1",
        "cilium/state/ip/v1/default/10.1.0.5",
        "cilium/state/ip/v1/default/10.1.0.6",
        "cilium/state/ip/v1/default/10.1.0.7",
        "cilium/state/nodes/v1/c1/n1",
        "cilium/state/services/v1/c1/prod/web",
        "cilium/synced/c1/cilium/state/identities/v1",
        "cilium/synced/c1/cilium/state/ip/v1",
        "cilium/synced/c1/cilium/state/nodes/v1",
        "cilium/synced/c1/cilium/state/services/v1",
        // The exported namespaces, recorded with the objects they govern.
        "clustermesh/local/export-namespaces",
        // Every service with every backend, for this cluster's agents.
        "clustermesh/local/services/v1/prod/web",
    ];
    let c = eventually(store, |c| {
        if keys_of(c) == base {
            Ok(())
        } else {
            Err(format!("{:?}", keys_of(c)))
        }
    })
    .await;
    // The heartbeat: the time in RFC 3339, attached to a lease.
    let beat = store.get("cilium/.heartbeat").await.unwrap().unwrap();
    let written = humantime::parse_rfc3339(std::str::from_utf8(&beat.value).unwrap()).unwrap();
    let age = std::time::SystemTime::now()
        .duration_since(written)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "{age:?} old");
    assert!(beat.lease.is_some(), "the heartbeat has no lease");
    // Each file's good content is saved, under its name.
    assert_eq!(
        saved_copies(&c),
        BTreeMap::from([
            ("ns-svc.yaml", NAMESPACE_AND_SERVICE.to_owned()),
            ("pods.yaml", pods(true)),
            ("slice.yaml", slice(false)),
        ])
    );
    let web = identity_of(&c, "10.1.0.5");
    let db = identity_of(&c, "10.1.0.7");
    assert_eq!(
        identity_of(&c, "10.1.0.6"),
        web,
        "both web replicas share one identity"
    );
    assert_ne!(web, db);
    for id in [web, db] {
        assert!(
            (65_537..=131_071).contains(&id.get()),
            "{id} is outside cluster 1's range"
        );
    }
    assert_eq!(
        String::from_utf8(c[&format!("cilium/state/identities/v1/id/{web}")].clone()).unwrap(),
        "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;\
         k8s:io.cilium.k8s.policy.serviceaccount=default;k8s:io.kubernetes.pod.namespace=prod;"
    );
    assert_eq!(
        String::from_utf8(c["cilium/state/identities/v1/value/k8s:app=db;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.cilium.k8s.policy.serviceaccount=default;k8s:io.kubernetes.pod.namespace=prod;/clustermesh-apiserver"].clone()).unwrap(),
        db.to_string()
    );
    let svc: ClusterService =
        serde_json::from_slice(&c["cilium/state/services/v1/c1/prod/web"]).unwrap();
    assert_eq!(svc.cluster, ClusterName::new("c1").unwrap());
    assert!(svc.include_external && svc.shared);
    assert_eq!(
        svc.frontends
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.96.0.10"]
    );
    assert_eq!(svc.frontends.values().next().unwrap()["http"].port(), 80);
    // What other clusters get (Cilium's form): only the ready backend.
    assert_eq!(
        svc.backends
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.1.0.5"]
    );
    assert!(svc.backend_conditions.is_empty());
    assert_eq!(
        svc.backends[&"10.1.0.5".parse().unwrap()]["http"].port(),
        8080
    );
    // What this cluster's agents get: both, with the conditions of the one not ready.
    let local: ClusterService =
        serde_json::from_slice(&c["clustermesh/local/services/v1/prod/web"]).unwrap();
    assert_eq!(local.frontends, svc.frontends);
    assert_eq!(local.backends.len(), 2);
    assert_eq!(
        local.backend_conditions[&"10.1.0.6".parse().unwrap()],
        BackendConditions {
            ready: false,
            serving: false,
            terminating: false
        }
    );
    let entry: IpCacheEntry =
        serde_json::from_slice(&c["cilium/state/ip/v1/default/10.1.0.5"]).unwrap();
    assert_eq!(
        (entry.namespace.as_str(), entry.pod_name.as_str()),
        ("prod", "web-0")
    );
    assert_eq!(entry.host_ip, Some("192.0.2.1".parse().unwrap()));

    // Step 2: a backend becomes ready and a pod goes away; its identity is released after
    // the grace period.
    cluster.write_manifest("slice.yaml", &slice(true));
    cluster.write_manifest("pods.yaml", &pods(false));
    let db_key = format!("cilium/state/identities/v1/id/{db}");
    let c = eventually(store, |c| {
        let svc: ClusterService =
            serde_json::from_slice(&c["clustermesh/local/services/v1/prod/web"])
                .map_err(|e| e.to_string())?;
        let exported: ClusterService =
            serde_json::from_slice(&c["cilium/state/services/v1/c1/prod/web"])
                .map_err(|e| e.to_string())?;
        if c.contains_key("cilium/state/ip/v1/default/10.1.0.7")
            || c.contains_key(&db_key)
            || !svc.backend_conditions.is_empty()
            || exported.backends.len() != 2
        {
            return Err(format!("{:?}", c.keys().collect::<Vec<_>>()));
        }
        Ok(())
    })
    .await;
    assert!(c.contains_key(&format!("cilium/state/identities/v1/id/{web}")));
    assert_eq!(
        c.keys()
            .filter(|k| k.starts_with("cilium/state/identities/"))
            .count(),
        2,
        "web's id and value keys remain"
    );

    // Step 3: the service's file is deleted.
    cluster.remove_manifest("ns-svc.yaml");
    let c = eventually(store, |c| {
        if c.contains_key("cilium/state/services/v1/c1/prod/web")
            || c.contains_key("clustermesh/local/services/v1/prod/web")
        {
            Err("service still there".into())
        } else {
            Ok(())
        }
    })
    .await;
    // Its saved copy is gone too.
    assert_eq!(
        saved_copies(&c).keys().copied().collect::<Vec<_>>(),
        ["pods.yaml", "slice.yaml"]
    );
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_written_to_sled_exactly() {
    scenario(TestCluster::new("c1", 1, None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_written_to_etcd_exactly() {
    let etcd = EtcdServer::start().await;
    scenario(TestCluster::new(
        "c1",
        1,
        Some(StoreConfig::Etcd {
            endpoints: vec![etcd.endpoint()],
            tls: None,
            max_txn_ops: None,
            max_txn_bytes: None,
        }),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_etcd_never_share_or_split_an_identity() {
    use clustermesh_apiserver::identity::IdentityAllocator;
    use clustermesh_model::MaxConnectedClusters;
    use clustermesh_model::cluster::ClusterId;
    use clustermesh_model::labels::LabelSet;
    let etcd = EtcdServer::start().await;
    let c1 = ClusterName::new("c1").unwrap();
    let id = ClusterId::new(1, MaxConnectedClusters::C255).unwrap();
    let sets: Vec<LabelSet> = (0..40)
        .map(|i| LabelSet::workload(&c1, "ns", [("app", format!("a{i}").as_str())]).unwrap())
        .collect();
    let mut tasks = Vec::new();
    for replica in 0..2 {
        let store: std::sync::Arc<dyn KvStore> = std::sync::Arc::new(etcd.store().await);
        let sets = sets.clone();
        tasks.push(tokio::spawn(async move {
            let mut a = IdentityAllocator::new(
                store,
                id,
                MaxConnectedClusters::C255,
                Duration::from_secs(60),
            );
            let mut got = BTreeMap::new();
            // The replicas walk the label sets in opposite orders to collide as much as possible.
            let order: Vec<&LabelSet> = if replica == 0 {
                sets.iter().collect()
            } else {
                sets.iter().rev().collect()
            };
            for labels in order {
                got.insert(labels.clone(), a.allocate(labels).await.unwrap());
            }
            got
        }));
    }
    let a = tasks.remove(0).await.unwrap();
    let b = tasks.remove(0).await.unwrap();
    assert_eq!(a, b, "both replicas agree on every label set's identity");
    let distinct: std::collections::BTreeSet<_> = a.values().collect();
    assert_eq!(
        distinct.len(),
        sets.len(),
        "no identity serves two label sets"
    );
    let store = etcd.store().await;
    assert_eq!(
        store
            .list("cilium/state/identities/v1/id/")
            .await
            .unwrap()
            .kvs
            .len(),
        sets.len(),
        "no number is left claimed twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_orphaned_by_a_crash_are_collected_after_the_grace() {
    use clustermesh_apiserver::identity::IdentityAllocator;
    use clustermesh_kvstore::embedded::{SledConfig, SledStore};
    use clustermesh_model::MaxConnectedClusters;
    use clustermesh_model::cluster::ClusterId;
    use clustermesh_model::labels::LabelSet;
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let store: std::sync::Arc<dyn KvStore> =
        std::sync::Arc::new(SledStore::open(&SledConfig::new(dir.path().join("s"))).unwrap());
    let c1 = ClusterName::new("c1").unwrap();
    let id = ClusterId::new(1, MaxConnectedClusters::C255).unwrap();
    let web = LabelSet::workload(&c1, "prod", [("app", "web")]).unwrap();
    let db = LabelSet::workload(&c1, "prod", [("app", "db")]).unwrap();
    let grace = Duration::from_millis(200);
    let mut first = IdentityAllocator::new(
        std::sync::Arc::clone(&store),
        id,
        MaxConnectedClusters::C255,
        grace,
    );
    first.load().await.unwrap();
    let web_id = first.allocate(&web).await.unwrap();
    let db_id = first.allocate(&db).await.unwrap();
    // A crash between the number's claim and its reverse key: the reverse key of db is gone.
    let db_value = clustermesh_model::keys::Key::IdentityValue {
        labels: db.clone(),
        owner: clustermesh_apiserver::identity::OWNER.to_owned(),
    }
    .to_string();
    assert!(store.delete(&db_value).await.unwrap().is_some());
    let ids = |store: std::sync::Arc<dyn KvStore>| async move {
        store
            .list("cilium/state/identities/v1/id/")
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key.rsplit('/').next().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(std::sync::Arc::clone(&store)).await,
        [web_id.to_string(), db_id.to_string()]
    );

    // The restarted allocator takes the number back (its reverse key is written again) and,
    // as no pod uses db, releases it after the grace, not before.
    let mut restarted = IdentityAllocator::new(
        std::sync::Arc::clone(&store),
        id,
        MaxConnectedClusters::C255,
        grace,
    );
    restarted.load().await.unwrap();
    let in_use: std::collections::BTreeSet<&LabelSet> = [&web].into_iter().collect();
    let now = Instant::now();
    assert!(
        restarted
            .release_unused(&in_use, now)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(ids(std::sync::Arc::clone(&store)).await.len(), 2);
    let released = restarted
        .release_unused(&in_use, now + grace)
        .await
        .unwrap();
    assert_eq!(released, [db_id]);
    assert_eq!(
        ids(std::sync::Arc::clone(&store)).await,
        [web_id.to_string()]
    );
    // The number is free again; web keeps its identity.
    assert_eq!(restarted.allocate(&web).await.unwrap(), web_id);
    assert_eq!(restarted.allocate(&db).await.unwrap(), db_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_keys_have_cilium_s_layout_and_a_lease_and_survive_its_expiry() {
    use clustermesh_apiserver::identity::{IdentityAllocator, OWNER};
    use clustermesh_kvstore::embedded::{SledConfig, SledStore};
    use clustermesh_model::MaxConnectedClusters;
    use clustermesh_model::cluster::ClusterId;
    use clustermesh_model::labels::LabelSet;
    let dir = tempfile::tempdir().unwrap();
    let store: std::sync::Arc<dyn KvStore> =
        std::sync::Arc::new(SledStore::open(&SledConfig::new(dir.path().join("s"))).unwrap());
    let c1 = ClusterName::new("c1").unwrap();
    let id = ClusterId::new(1, MaxConnectedClusters::C255).unwrap();
    let web = LabelSet::workload(&c1, "prod", [("app", "web")]).unwrap();
    // A reverse key of this project's earlier layout (no owner) is replaced.
    let old = format!("cilium/state/identities/v1/value/{web}");
    store.put(&old, b"65537", None).await.unwrap();
    let new = |store: std::sync::Arc<dyn KvStore>| {
        IdentityAllocator::new(
            store,
            id,
            MaxConnectedClusters::C255,
            Duration::from_secs(60),
        )
    };
    let mut a = new(std::sync::Arc::clone(&store));
    a.load().await.unwrap();
    assert!(
        store.get(&old).await.unwrap().is_none(),
        "the old layout stays"
    );
    let web_id = a.allocate(&web).await.unwrap();
    // `value/<labels>/<owner>`, attached to a lease.
    let key = format!("cilium/state/identities/v1/value/{web}/{OWNER}");
    let kv = store.get(&key).await.unwrap().expect("the reverse key");
    assert_eq!(kv.value, web_id.to_string().into_bytes());
    let lease = kv.lease.expect("a lease");
    // Every user of the store is gone long enough for the lease to expire: the key goes, the
    // number stays; the next allocator takes it back, and web keeps its identity.
    drop(a);
    store.revoke_lease(lease).await.unwrap();
    assert!(store.get(&key).await.unwrap().is_none());
    let mut b = new(std::sync::Arc::clone(&store));
    b.load().await.unwrap();
    assert_eq!(b.identities().get(&web), Some(&web_id));
    assert!(store.get(&key).await.unwrap().is_some());
    assert_eq!(b.allocate(&web).await.unwrap(), web_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverse_key_is_never_restored_for_a_number_that_has_other_labels_now() {
    use clustermesh_apiserver::identity::{IdentityAllocator, OWNER};
    use clustermesh_kvstore::embedded::{SledConfig, SledStore};
    use clustermesh_model::MaxConnectedClusters;
    use clustermesh_model::cluster::ClusterId;
    use clustermesh_model::labels::LabelSet;
    let dir = tempfile::tempdir().unwrap();
    let store: std::sync::Arc<dyn KvStore> =
        std::sync::Arc::new(SledStore::open(&SledConfig::new(dir.path().join("s"))).unwrap());
    let c1 = ClusterName::new("c1").unwrap();
    let id = ClusterId::new(1, MaxConnectedClusters::C255).unwrap();
    let web = LabelSet::workload(&c1, "prod", [("app", "web")]).unwrap();
    let db = LabelSet::workload(&c1, "prod", [("app", "db")]).unwrap();
    // Renewing at every pass, so that the test needs no minute.
    let mut a = IdentityAllocator::new(
        std::sync::Arc::clone(&store),
        id,
        MaxConnectedClusters::C255,
        Duration::from_secs(60),
    )
    .with_lease_renewal(Duration::ZERO);
    a.load().await.unwrap();
    let n = a.allocate(&web).await.unwrap();
    let web_key = format!("cilium/state/identities/v1/value/{web}/{OWNER}");
    // Meanwhile (another replica): the lease holding web's reverse key expired, web's number
    // was released and given to db.
    let lease = store.get(&web_key).await.unwrap().unwrap().lease.unwrap();
    store.revoke_lease(lease).await.unwrap();
    let n_key = format!("cilium/state/identities/v1/id/{n}");
    store
        .put(&n_key, db.to_string().as_bytes(), None)
        .await
        .unwrap();
    // The allocator finds its lease gone: it writes back only what still holds, so web's
    // reverse key does not point at db's number again, and web gets a number of its own.
    let in_use: std::collections::BTreeSet<&LabelSet> = [&web].into_iter().collect();
    a.release_unused(&in_use, std::time::Instant::now())
        .await
        .unwrap();
    assert!(store.get(&web_key).await.unwrap().is_none());
    assert!(a.identities().get(&web).is_none());
    let m = a.allocate(&web).await.unwrap();
    assert_ne!(m, n);
    assert_eq!(
        store.get(&n_key).await.unwrap().unwrap().value,
        db.to_string().into_bytes()
    );
}

fn nodes_manifest(names: &[&str]) -> String {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.0.2.{}}}]}}\n",
                i + 1
            )
        })
        .collect()
}

async fn stored_nodes(store: &dyn KvStore) -> Option<Vec<String>> {
    let listing = store.list("cilium/state/nodes/v1/c1/").await.ok()?;
    Some(
        listing
            .kvs
            .into_iter()
            .map(|kv| kv.key.rsplit('/').next().unwrap().to_owned())
            .collect(),
    )
}

async fn readyz(running: &clustermesh_apiserver::Running) -> String {
    support::http_get(running.health_addr, "/readyz").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_etcd_losing_its_leader_then_its_quorum_is_seen_and_loses_nothing() {
    use clustermesh_kvstore::testing::EtcdCluster;
    let mut etcd = EtcdCluster::start(3).await;
    let cluster = TestCluster::new(
        "c1",
        1,
        Some(StoreConfig::Etcd {
            endpoints: etcd.endpoints(),
            tls: None,
            max_txn_ops: None,
            max_txn_bytes: None,
        }),
    );
    cluster.write_manifest("nodes.yaml", &nodes_manifest(&["n1"]));
    let running = cluster.start().await;

    // The leader dies: the others elect a new one, the apiserver stays ready, writes land.
    let leader = etcd.leader().await;
    etcd.kill(leader);
    cluster.write_manifest("nodes.yaml", &nodes_manifest(&["n1", "n2"]));
    // Within 30 s: a request the client sent to the dead member waits out its deadline before
    // the next member is tried, and a pass makes several (how fast is the benchmarks' matter).
    let mut landed = false;
    for _ in 0..300 {
        if stored_nodes(running.store.as_ref()).await == Some(vec!["n1".into(), "n2".into()]) {
            landed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(landed, "a write after the leader's death never landed");
    let r = readyz(&running).await;
    assert!(r.contains(" 200 "), "{r}");

    // A second member dies: no quorum. Within seconds the apiserver says so.
    let second = (0..3).find(|i| *i != leader).unwrap();
    etcd.kill(second);
    let lost = std::time::Instant::now();
    let mut seen = String::new();
    for _ in 0..100 {
        seen = readyz(&running).await;
        if seen.contains(" 503 ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.contains("not ready: the kvstore is unavailable"),
        "no sign of the lost quorum after {:?}: {seen}",
        lost.elapsed()
    );
    let noticed = lost.elapsed();
    assert!(!running.metrics.is_ready());
    let metrics = support::http_get(running.health_addr, "/metrics").await;
    assert!(
        metrics.contains("clustermesh_kvstore_healthy 0"),
        "{metrics}"
    );
    let status = support::http_get(running.health_addr, "/status").await;
    assert!(
        status.contains("\"ready\":false") && status.contains("\"healthy\":false"),
        "{status}"
    );
    // A change made meanwhile waits for the store.
    cluster.write_manifest("nodes.yaml", &nodes_manifest(&["n1", "n2", "n3"]));

    // Quorum returns: ready again, and the change is written.
    etcd.restart(leader);
    etcd.restart(second);
    let back = std::time::Instant::now();
    let mut ready = false;
    for _ in 0..300 {
        if readyz(&running).await.contains(" 200 ") {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "not ready 30 s after quorum returned");
    let recovered = back.elapsed();
    let mut landed = false;
    for _ in 0..300 {
        if stored_nodes(running.store.as_ref()).await
            == Some(vec!["n1".into(), "n2".into(), "n3".into()])
        {
            landed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(landed, "the change made without quorum never landed");
    let metrics = support::http_get(running.health_addr, "/metrics").await;
    assert!(
        metrics.contains("clustermesh_kvstore_healthy 1"),
        "{metrics}"
    );
    eprintln!("quorum loss seen after {noticed:?}; ready again {recovered:?} after its return");
    running.stop().await.unwrap();
}
