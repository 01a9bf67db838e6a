//! Importing from a Cilium cluster (issue 16): a remote of kind `etcd` is a real etcd over
//! mutual TLS, seeded with the values Cilium's own clustermesh-apiserver writes (taken from
//! its golden files). Nothing is imported before its sync canaries; then its services,
//! identities, ipcache entries and nodes reach the cache and, through the Export server, a
//! local agent's stream; hostile values are rejected and counted; when the etcd goes away the
//! remote is withdrawn.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod golden;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use clustermesh_certs::{CertificateAuthority, ClientIdentity};
use clustermesh_kvstore::KvStore;
use clustermesh_kvstore::testing::{EtcdServer, TlsFiles};
use clustermesh_model::ClusterName;
use clustermesh_proto::Object;
use clustermesh_proto::v1::{self, Kind, watch_event::Event as Ev};
use support::TestCluster;

/// `(key, value)` of a dump in one of Cilium's golden archives, values compacted as Cilium
/// stores them.
fn golden_values(archive: &str, file: &str) -> Vec<(String, String)> {
    let (_, text) = golden::archives()
        .into_iter()
        .find(|(n, _)| n == archive)
        .unwrap();
    let a = golden::parse_txtar(&text);
    golden::parse_list_output(&a.files[file])
        .into_iter()
        .map(|(k, v)| {
            let v = if v.starts_with('{') {
                golden::json_compact(&v)
            } else {
                v
            };
            (k, v)
        })
        .collect()
}

/// Everything cluster3's clustermesh-apiserver would hold, from Cilium's golden files.
fn cluster3_state() -> Vec<(String, String)> {
    let mut kv = Vec::new();
    kv.extend(golden_values("clusterconfig.txtar", "config.expected"));
    kv.extend(golden_values(
        "globalnamespace-services.txtar",
        "services-1+2.expected",
    ));
    kv.extend(golden_values("ciliumnodes.txtar", "node-1.expected"));
    kv.extend(golden_values("ciliumnodes.txtar", "node-2.expected"));
    kv.extend(golden_values(
        "ciliumidentitites.txtar",
        "identities-1+2.expected",
    ));
    let ips = golden_values("ciliumendpoints.txtar", "ips-1+2.expected");
    // The services' backends are pods of cluster3 too: their ipcache entries, as Cilium
    // writes one (the first golden entry, readdressed). A backend that is no endpoint of the
    // remote would be dropped as foreign.
    for (ip, pod) in [("10.244.1.10", "echo-a"), ("10.244.2.10", "echo-b")] {
        let template = &ips[0].1;
        kv.push((
            format!("cilium/state/ip/v1/default/{ip}"),
            template.replace("10.244.1.79", ip).replace("cep-001", pod),
        ));
    }
    kv.extend(ips);
    kv
}

const CANARIES: [&str; 4] = [
    "cilium/synced/cluster3/cilium/state/identities/v1",
    "cilium/synced/cluster3/cilium/state/ip/v1",
    "cilium/synced/cluster3/cilium/state/nodes/v1",
    "cilium/synced/cluster3/cilium/state/services/v1",
];

async fn cache_keys(store: &dyn KvStore) -> BTreeSet<String> {
    store
        .list("cilium/cache/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

/// cluster3's etcd over mutual TLS, with the certificates its clustermesh-apiserver hands
/// out, and the `remotes:` entry of c2's config for it.
async fn cluster3_etcd(certs: &std::path::Path) -> (EtcdServer, String) {
    let cluster3 = ClusterName::new("cluster3").unwrap();
    let ca = CertificateAuthority::generate(&cluster3).unwrap();
    ca.cert().write(certs, "ca").unwrap();
    ca.server_cert(&cluster3, &["127.0.0.1".into()])
        .unwrap()
        .write(certs, "etcd")
        .unwrap();
    ca.client_cert(&ClientIdentity::Remote(ClusterName::new("c2").unwrap()))
        .unwrap()
        .write(certs, "client")
        .unwrap();
    let p = |f: &str| certs.join(f);
    let etcd = EtcdServer::start_with_tls(TlsFiles {
        ca: p("ca.pem"),
        server_cert: p("etcd.pem"),
        server_key: p("etcd-key.pem"),
        client_cert: p("client.pem"),
        client_key: p("client-key.pem"),
    })
    .await;
    let entry = format!(
        "remotes:\n- {{name: cluster3, id: 3, kind: etcd, address: \"{}\", ca: {}, cert: {}, key: {}}}\n\
         staleness: {{unreachableAfterMillis: 600, withdrawAfterMillis: 600, restoreAfterMillis: 1500, keepLastBackends: false}}\n",
        etcd.endpoint(),
        p("ca.pem").display(),
        p("client.pem").display(),
        p("client-key.pem").display(),
    );
    (etcd, entry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cilium_cluster_is_imported_from_its_etcd() {
    let certs = tempfile::tempdir().unwrap();
    let (etcd, entry) = cluster3_etcd(certs.path()).await;
    let remote = etcd.store().await;
    for (k, v) in cluster3_state() {
        remote.put(&k, v.as_bytes(), None).await.unwrap();
    }

    // B imports cluster3 from its etcd.
    let mut b = TestCluster::new("c2", 2, None);
    b.reconfigure(&entry);
    let running = b.start().await;
    let store = running.store.as_ref();

    // No canaries yet: connected, nothing imported.
    support::wait_for(
        || {
            running
                .remotes
                .status("cluster3")
                .is_some_and(|s| s.connected)
        },
        "a session with cluster3's etcd",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(cache_keys(store).await.is_empty());
    assert!(!running.remotes.status("cluster3").unwrap().imported);

    // Its canaries: everything comes, under the cache's keys.
    for c in CANARIES {
        remote.put(c, b"1764672000", None).await.unwrap();
    }
    support::wait_for(
        || {
            running
                .remotes
                .status("cluster3")
                .is_some_and(|s| s.imported)
        },
        "cluster3's snapshot",
    )
    .await;
    let want: BTreeSet<String> = [
        "cilium/cache/identities/v1/cluster3/id/196915",
        "cilium/cache/identities/v1/cluster3/id/199472",
        "cilium/cache/ip/v1/cluster3/10.244.1.10",
        "cilium/cache/ip/v1/cluster3/10.244.1.79",
        "cilium/cache/ip/v1/cluster3/10.244.2.10",
        "cilium/cache/ip/v1/cluster3/10.244.2.74",
        "cilium/cache/ip/v1/cluster3/fd00:10:244:1::d643",
        "cilium/cache/ip/v1/cluster3/fd00:10:244:2::e024",
        "cilium/cache/nodes/v1/cluster3/test-node-1",
        "cilium/cache/nodes/v1/cluster3/test-node-2",
        "cilium/cache/services/v1/cluster3/ns-alpha/echo-service",
        "cilium/cache/services/v1/cluster3/ns-beta/echo-service",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let got: BTreeSet<String> = cache_keys(store)
        .await
        .into_iter()
        .filter(|k| !k.starts_with("cilium/synced/"))
        .collect();
    assert_eq!(got, want);
    let status = running.remotes.status("cluster3").unwrap();
    assert!(status.rejected.is_empty(), "{:?}", status.rejected);
    // The mirrored config says cached, for Cilium agents reading this kvstore.
    let mirrored = store
        .get("cilium/cluster-config/cluster3")
        .await
        .unwrap()
        .unwrap();
    assert!(
        std::str::from_utf8(&mirrored.value)
            .unwrap()
            .contains("\"cached\":true")
    );

    // A local agent's stream carries them, with their backends and labels.
    let mut agent = b
        .client(&running, &ClientIdentity::Local(b.name.clone()))
        .await;
    let mut stream = agent
        .watch(v1::WatchRequest {
            kinds: vec![Kind::RemoteCache as i32],
            since_revision: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = BTreeSet::new();
    while let Some(e) = stream.message().await.unwrap() {
        match e.event {
            Some(Ev::Upsert(u)) => match Object::try_from(&u).unwrap() {
                Object::Service(s) => {
                    assert_eq!(s.cluster.as_str(), "cluster3");
                    assert_eq!(s.backends.len(), 1, "{s:?}");
                    seen.insert(format!("service {}/{}", s.namespace, s.name));
                }
                Object::Identity {
                    cluster,
                    id,
                    labels,
                } => {
                    assert_eq!(cluster.as_str(), "cluster3");
                    assert_eq!(labels.cluster(), Some("cluster3"));
                    seen.insert(format!("identity {id}"));
                }
                Object::IpCache { cluster, entry } => {
                    assert_eq!(cluster.as_str(), "cluster3");
                    seen.insert(format!("ip {}", entry.ip));
                }
                Object::Node(n) => {
                    assert_eq!(
                        n.ipv4_alloc_cidr.map(|c| c.to_string()).as_deref(),
                        Some(if n.name == "test-node-1" {
                            "10.244.0.0/24"
                        } else {
                            "10.244.1.0/24"
                        })
                    );
                    seen.insert(format!("node {}", n.name));
                }
                other => panic!("{other:?}"),
            },
            Some(Ev::Synced(_)) => break,
            _ => {}
        }
    }
    assert_eq!(seen.len(), 12, "{seen:?}");

    // A change follows; hostile values are rejected and counted, the rest stays.
    remote
        .delete("cilium/state/ip/v1/default/10.244.2.74")
        .await
        .unwrap();
    // A service claiming to be this cluster's, a service under another service's key (it
    // would overwrite that one), an identity of cluster 1's range, a node that is no JSON.
    let alpha = golden_values("globalnamespace-services.txtar", "services-1.expected")[0]
        .1
        .clone();
    let evil_service = alpha
        .replace("\"cluster\":\"cluster3\"", "\"cluster\":\"c2\"")
        .replace("\"name\":\"echo-service\"", "\"name\":\"evil\"");
    remote
        .put(
            "cilium/state/services/v1/cluster3/ns-alpha/evil",
            evil_service.as_bytes(),
            None,
        )
        .await
        .unwrap();
    remote
        .put(
            "cilium/state/services/v1/cluster3/ns-alpha/other",
            alpha.as_bytes(),
            None,
        )
        .await
        .unwrap();
    remote
        .put(
            "cilium/state/identities/v1/id/65537",
            b"k8s:app=evil;k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace=x;",
            None,
        )
        .await
        .unwrap();
    remote
        .put("cilium/state/nodes/v1/cluster3/bad", b"not json", None)
        .await
        .unwrap();
    for _ in 0..100 {
        let s = running.remotes.status("cluster3").unwrap();
        if s.rejected.values().sum::<u64>() >= 4
            && !cache_keys(store)
                .await
                .contains("cilium/cache/ip/v1/cluster3/10.244.2.74")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = running.remotes.status("cluster3").unwrap();
    assert_eq!(
        s.rejected,
        std::collections::BTreeMap::from([
            ("identities/identity-out-of-range".to_owned(), 1),
            // The node that is no JSON, the service under another's key.
            ("other/malformed".to_owned(), 2),
            ("services/invalid".to_owned(), 1),
        ])
    );
    let keys = cache_keys(store).await;
    assert!(!keys.contains("cilium/cache/ip/v1/cluster3/10.244.2.74"));
    assert!(!keys.iter().any(|k| {
        k.contains("evil") || k.ends_with("/other") || k.ends_with("/bad") || k.ends_with("/65537")
    }));
    assert!(keys.contains("cilium/cache/services/v1/cluster3/ns-alpha/echo-service"));

    // cluster3's etcd goes away: the remote is withdrawn (its backends leave global
    // services), its cache stays.
    drop(remote);
    drop(etcd);
    support::wait_for(
        || {
            running
                .remotes
                .status("cluster3")
                .is_some_and(|s| s.withdrawn && !s.connected)
        },
        "cluster3 to be withdrawn",
    )
    .await;
    assert!(keys_present(store, "cilium/cache/nodes/v1/cluster3/test-node-1").await);
    running.stop().await.unwrap();
}

async fn keys_present(store: &dyn KvStore, key: &str) -> bool {
    store.get(key).await.unwrap().is_some()
}

/// KVStoreMesh's layout: a config that says `cached`, the state under `cilium/cache/...`
/// with its canaries there; before the config exists the remote is refused and nothing is
/// imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kvstoremesh_cache_is_read_and_a_remote_without_config_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    let (etcd, entry) = cluster3_etcd(certs.path()).await;
    let remote = etcd.store().await;
    // cluster3's state as a KVStoreMesh in another cluster mirrors it.
    let mut config = None;
    for (k, v) in cluster3_state() {
        let Ok(key) = clustermesh_model::keys::Key::parse(&k) else {
            panic!("{k}")
        };
        use clustermesh_model::keys::{CachedObject, Key};
        let remote3 = ClusterName::new("cluster3").unwrap();
        let cached = |object| Key::Cached {
            remote: remote3.clone(),
            object,
        };
        let mirrored = match key {
            Key::ClusterConfig { .. } => {
                config = Some(v.replace(
                    "\"syncedCanaries\":true,",
                    "\"syncedCanaries\":true,\"cached\":true,",
                ));
                continue;
            }
            Key::Identity { id } => cached(CachedObject::Identity(id)),
            Key::IpCache { ip } => cached(CachedObject::IpCache(ip)),
            Key::Node { name, .. } => cached(CachedObject::Node(name)),
            Key::Service {
                namespace, name, ..
            } => cached(CachedObject::Service { namespace, name }),
            other => panic!("{other}"),
        };
        remote
            .put(&mirrored.to_string(), v.as_bytes(), None)
            .await
            .unwrap();
    }
    for kind in ["identities", "ip", "nodes", "services"] {
        remote
            .put(
                &format!("cilium/synced/cluster3/cilium/cache/{kind}/v1"),
                b"1764672000",
                None,
            )
            .await
            .unwrap();
    }
    let mut b = TestCluster::new("c2", 2, None);
    b.reconfigure(&entry);
    let running = b.start().await;
    support::wait_for(
        || {
            running
                .remotes
                .status("cluster3")
                .and_then(|s| s.refused)
                .is_some_and(|r| r.contains("has no cilium/cluster-config/cluster3"))
        },
        "cluster3 refused for want of its config",
    )
    .await;
    assert!(cache_keys(running.store.as_ref()).await.is_empty());
    let config = config.unwrap();
    assert!(config.contains("\"cached\":true"), "{config}");
    remote
        .put("cilium/cluster-config/cluster3", config.as_bytes(), None)
        .await
        .unwrap();
    support::wait_for(
        || {
            running
                .remotes
                .status("cluster3")
                .is_some_and(|s| s.imported)
        },
        "cluster3's snapshot from the cache layout",
    )
    .await;
    let keys = cache_keys(running.store.as_ref()).await;
    for k in [
        "cilium/cache/identities/v1/cluster3/id/199472",
        "cilium/cache/ip/v1/cluster3/10.244.1.10",
        "cilium/cache/nodes/v1/cluster3/test-node-2",
        "cilium/cache/services/v1/cluster3/ns-beta/echo-service",
    ] {
        assert!(keys.contains(k), "{k} not in {keys:?}");
    }
    let s = running.remotes.status("cluster3").unwrap();
    assert!(s.rejected.is_empty() && s.refused.is_none(), "{s:?}");
    running.stop().await.unwrap();
}
