//! A hostile remote: a fake Export server with a valid certificate that mixes invalid objects
//! (an identity outside its range, a service keyed under another cluster, an oversized object,
//! a garbage IP, the unspecified and loopback addresses as a pod and as a backend, a policy)
//! into a valid stream. Each bad object is rejected and counted; the
//! valid objects of the same stream are imported.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_certs::{CertificateAuthority, ClientIdentity};
use clustermesh_kvstore::embedded::{SledConfig, SledStore};
use clustermesh_kvstore::{EventKind, KvStore};
use clustermesh_model::ClusterName;
use clustermesh_model::cluster::{ClusterId, MaxConnectedClusters};
use clustermesh_model::keys::ExportKind;
use clustermesh_proto::client::{ClientTls, server_name};
use clustermesh_proto::v1::{self, watch_event::Event as Ev};
use clustermesh_sync::staleness::StalenessConfig;
use clustermesh_sync::worker::{Quota, RemoteConfig, RemoteWorker, SyncContext};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

struct Hostile;

fn upsert(object: v1::upsert::Object) -> v1::WatchEvent {
    v1::WatchEvent {
        revision: 10,
        event: Some(Ev::Upsert(v1::Upsert {
            object: Some(object),
        })),
        origin: None,
    }
}

fn ipcache(ip: &str, identity: u32) -> v1::upsert::Object {
    v1::upsert::Object::Ipcache(v1::IpCacheEntry {
        cluster: "c2".into(),
        ip: ip.into(),
        identity,
        host_ip: String::new(),
        namespace: "prod".into(),
        pod_name: "p".into(),
        named_ports: vec![],
    })
}

#[tonic::async_trait]
impl v1::export_server::Export for Hostile {
    async fn get_cluster_config(
        &self,
        _: Request<v1::GetClusterConfigRequest>,
    ) -> Result<Response<v1::ClusterConfig>, Status> {
        Ok(Response::new(v1::ClusterConfig {
            name: "c2".into(),
            id: 2,
            synced_canaries: true,
            cached: true,
            max_connected_clusters: 255,
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        _: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let label = |k: &str, v: &str| v1::Label {
            source: "k8s".into(),
            key: k.into(),
            value: v.into(),
        };
        let labels = vec![
            label("app", "web"),
            label("io.cilium.k8s.policy.cluster", "c2"),
            label("io.kubernetes.pod.namespace", "prod"),
        ];
        let events = vec![
            // Valid.
            upsert(v1::upsert::Object::Identity(v1::Identity {
                cluster: "c2".into(),
                id: 131_080,
                labels: labels.clone(),
            })),
            upsert(ipcache("10.2.0.5", 131_080)),
            // An identity of cluster 1's range.
            upsert(v1::upsert::Object::Identity(v1::Identity {
                cluster: "c2".into(),
                id: 65_600,
                labels,
            })),
            // A service claiming another cluster.
            upsert(v1::upsert::Object::Service(v1::Service {
                cluster: "c3".into(),
                namespace: "prod".into(),
                name: "web".into(),
                cluster_id: 3,
                global: true,
                shared: true,
                ..Default::default()
            })),
            // Oversized: a node with a megabyte of labels.
            upsert(v1::upsert::Object::Node(v1::Node {
                name: "n1".into(),
                cluster: "c2".into(),
                cluster_id: 2,
                addresses: vec![v1::NodeAddress {
                    r#type: "InternalIP".into(),
                    ip: "192.0.2.2".into(),
                }],
                labels: (0..3000)
                    .map(|i| (format!("k{i}"), "v".repeat(500)))
                    .collect(),
                ..Default::default()
            })),
            // A garbage IP.
            upsert(ipcache("10.2.0.999", 131_080)),
            // Policies are never imported.
            upsert(v1::upsert::Object::Policy(v1::NetworkPolicy {
                cluster: "c2".into(),
                name: "p".into(),
                ..Default::default()
            })),
            // Addresses no pod or backend can have: they would reach the importing node itself.
            upsert(ipcache("0.0.0.0", 131_080)),
            upsert(ipcache("127.0.0.1", 131_080)),
            upsert(v1::upsert::Object::Service(v1::Service {
                cluster: "c2".into(),
                namespace: "prod".into(),
                name: "loop".into(),
                cluster_id: 2,
                global: true,
                shared: true,
                frontends: vec![v1::Frontend {
                    ip: "10.96.0.10".into(),
                    ports: vec![v1::ServicePort {
                        name: "http".into(),
                        protocol: "TCP".into(),
                        port: 80,
                    }],
                }],
                backends: vec![v1::Backend {
                    ip: "127.0.0.1".into(),
                    ports: vec![v1::ServicePort {
                        name: "http".into(),
                        protocol: "TCP".into(),
                        port: 22,
                    }],
                    ready: true,
                    serving: true,
                    terminating: false,
                }],
                affinity: "none".into(),
                ..Default::default()
            })),
            // Valid again, after all of that.
            upsert(ipcache("10.2.0.6", 131_080)),
            v1::WatchEvent {
                revision: 10,
                event: Some(Ev::Synced(v1::Synced {})),
                origin: None,
            },
        ];
        let heartbeats = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((
                Ok(v1::WatchEvent {
                    revision: 10,
                    event: Some(Ev::Heartbeat(v1::Heartbeat {})),
                    origin: None,
                }),
                (),
            ))
        });
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            futures::stream::iter(events.into_iter().map(Ok)),
            heartbeats,
        ))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_are_rejected_and_counted_and_the_rest_is_imported() {
    let (worker, store, _dir) = import_from(Hostile, StalenessConfig::default()).await;
    for _ in 0..200 {
        if worker.status.lock().imported {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = worker.status.lock().clone();
    assert!(status.imported, "{status:?}");
    let rejected: Vec<(&str, u64)> = status
        .rejected
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        rejected,
        [
            ("identities/identity-out-of-range", 1),
            ("ip/invalid", 2),
            ("nodes/oversized", 1),
            ("other/kind-not-importable", 1),
            ("other/malformed", 1),
            ("services/invalid", 2),
        ]
    );
    let keys: Vec<String> = store
        .list("cilium/cache/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        keys,
        [
            "cilium/cache/identities/v1/c2/id/131080",
            "cilium/cache/ip/v1/c2/10.2.0.5",
            "cilium/cache/ip/v1/c2/10.2.0.6"
        ]
    );
    worker.stop().await;
}

/// A remote that sends a valid snapshot, then nothing at all (no heartbeats) while keeping the
/// connection open: a partitioned or hung peer.
struct Silent;

#[tonic::async_trait]
impl v1::export_server::Export for Silent {
    async fn get_cluster_config(
        &self,
        r: Request<v1::GetClusterConfigRequest>,
    ) -> Result<Response<v1::ClusterConfig>, Status> {
        Hostile.get_cluster_config(r).await
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        _: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let events = vec![
            upsert(ipcache("10.2.0.5", 131_080)),
            v1::WatchEvent {
                revision: 10,
                event: Some(Ev::Synced(v1::Synced {})),
                origin: None,
            },
        ];
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            futures::stream::iter(events.into_iter().map(Ok)),
            futures::stream::pending(),
        ))))
    }
}

async fn serve<S: v1::export_server::Export>(
    service: S,
    ca: &CertificateAuthority,
    name: &ClusterName,
) -> std::net::SocketAddr {
    let server = ca.server_cert(name, &[]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &server.cert_pem,
            &server.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(&ca.cert().cert_pem));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(v1::export_server::ExportServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// Serves `service` as remote cluster c2 (with a CA of its own) and starts a worker of local
/// cluster c1 that imports it into a fresh embedded store.
async fn import_from<S: v1::export_server::Export>(
    service: S,
    staleness: StalenessConfig,
) -> (RemoteWorker, Arc<dyn KvStore>, tempfile::TempDir) {
    import_with_quota(service, staleness, Quota::default()).await
}

/// [`import_from`] with the given quota.
async fn import_with_quota<S: v1::export_server::Export>(
    service: S,
    staleness: StalenessConfig,
    quota: Quota,
) -> (RemoteWorker, Arc<dyn KvStore>, tempfile::TempDir) {
    let (ctx, store, dir) = local_c1(staleness, quota);
    let worker = spawn_worker(service, &ctx, "c2", 2).await;
    (worker, store, dir)
}

/// Local cluster c1's sync context on a fresh embedded store.
fn local_c1(
    staleness: StalenessConfig,
    quota: Quota,
) -> (SyncContext, Arc<dyn KvStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn KvStore> =
        Arc::new(SledStore::open(&SledConfig::new(dir.path().join("s"))).unwrap());
    let ctx = SyncContext {
        local: ClusterName::new("c1").unwrap(),
        local_id: ClusterId::new(1, MaxConnectedClusters::C255).unwrap(),
        mode: MaxConnectedClusters::C255,
        store: Arc::clone(&store),
        staleness,
        connected_ids: Arc::default(),
        keep_last_backends: true,
        quota,
        ip_owners: Arc::default(),
        provenance: Arc::default(),
        propagated: Arc::new(|_: &ClusterName, _: f64| {}),
    };
    (ctx, store, dir)
}

/// Serves `service` as remote cluster `name` (ID `id`, a CA of its own) and starts a worker
/// of `ctx` that imports it.
async fn spawn_worker<S: v1::export_server::Export>(
    service: S,
    ctx: &SyncContext,
    name: &str,
    id: u32,
) -> RemoteWorker {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = ClusterName::new(name).unwrap();
    let ca = CertificateAuthority::generate(&cluster).unwrap();
    let addr = serve(service, &ca, &cluster).await;
    let client = ca
        .client_cert(&ClientIdentity::Remote(ctx.local.clone()))
        .unwrap();
    let remote = RemoteConfig {
        name: cluster,
        id,
        address: addr.to_string(),
        tls: ClientTls {
            ca_pem: ca.cert().cert_pem.clone(),
            cert_pem: client.cert_pem,
            key_pem: client.key_pem,
            server_name: server_name(name),
        },
        etcd: None,
    };
    RemoteWorker::spawn(ctx.clone(), remote)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_remote_is_withdrawn_but_its_identities_stay() {
    let staleness = StalenessConfig {
        unreachable_after: Duration::from_millis(300),
        withdraw_after: Duration::from_millis(300),
        restore_after: Duration::from_secs(60),
    };
    let started = tokio::time::Instant::now();
    let (worker, store, _dir) = import_from(Silent, staleness).await;
    let mut withdrawn_after = None;
    for _ in 0..100 {
        if worker.status.lock().withdrawn {
            withdrawn_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = worker.status.lock().clone();
    assert!(
        withdrawn_after.is_some(),
        "a silent remote was never withdrawn: {status:?}"
    );
    let status: clustermesh_model::cluster::ClusterStatus = serde_json::from_slice(
        &store
            .get("clustermesh/local/cluster-status/c2")
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    assert!(status.withdrawn);
    assert!(
        store
            .get("cilium/cache/ip/v1/c2/10.2.0.5")
            .await
            .unwrap()
            .is_some(),
        "withdrawing keeps the remote's state"
    );
    // The silent session is ended (and retried) once the remote would be withdrawn.
    let mut ended = false;
    for _ in 0..100 {
        if worker.status.lock().failures >= 1 {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ended, "the silent session was never ended");
    worker.stop().await;
}

/// A remote that serves one snapshot, then accepts every watch and fails it at once.
struct AcceptsThenFails {
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl v1::export_server::Export for AcceptsThenFails {
    async fn get_cluster_config(
        &self,
        r: Request<v1::GetClusterConfigRequest>,
    ) -> Result<Response<v1::ClusterConfig>, Status> {
        Hostile.get_cluster_config(r).await
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        _: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let events = if call == 0 {
            vec![
                Ok(upsert(ipcache("10.2.0.5", 131_080))),
                Ok(v1::WatchEvent {
                    revision: 20,
                    event: Some(Ev::Synced(v1::Synced {})),
                    origin: None,
                }),
            ]
        } else {
            Vec::new()
        };
        let end = futures::stream::once(async { Err(Status::unavailable("failing")) });
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            futures::stream::iter(events),
            end,
        ))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_accepts_each_watch_and_fails_it_is_withdrawn_on_time() {
    // Reconnects come at most ~4 s apart (2 s with jitter); were each accepted stream counted
    // as a sign of life, the 5 s withdrawal would never come.
    let staleness = StalenessConfig {
        unreachable_after: Duration::from_secs(5),
        withdraw_after: Duration::from_secs(5),
        restore_after: Duration::from_secs(60),
    };
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (worker, _store, _dir) = import_from(
        AcceptsThenFails {
            calls: Arc::clone(&calls),
        },
        staleness,
    )
    .await;
    support_wait(|| worker.status.lock().imported).await;
    let broke = tokio::time::Instant::now();
    let mut withdrawn_after = None;
    for _ in 0..160 {
        if worker.status.lock().withdrawn {
            withdrawn_after = Some(broke.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = withdrawn_after.expect("withdrawn within 8 s");
    assert!(
        after >= Duration::from_millis(4_500),
        "withdrawn after {after:?}, before withdrawAfter"
    );
    let status = worker.status.lock().clone();
    assert!(!status.ready && !status.connected, "{status:?}");
    assert!(
        calls.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "it kept reconnecting"
    );
    worker.stop().await;
}

/// A remote whose history is compacted while the worker is away: the first stream ends after
/// its snapshot; the resumed stream answers `Reset` and a smaller snapshot.
struct Compacted {
    calls: std::sync::atomic::AtomicUsize,
}

#[tonic::async_trait]
impl v1::export_server::Export for Compacted {
    async fn get_cluster_config(
        &self,
        r: Request<v1::GetClusterConfigRequest>,
    ) -> Result<Response<v1::ClusterConfig>, Status> {
        Hostile.get_cluster_config(r).await
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let synced = v1::WatchEvent {
            revision: 20,
            event: Some(Ev::Synced(v1::Synced {})),
            origin: None,
        };
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if call == 0 {
            if req.get_ref().since_revision != 0 {
                return Err(Status::invalid_argument(
                    "the first watch must start from scratch",
                ));
            }
            let events = vec![
                Ok(upsert(ipcache("10.2.0.5", 131_080))),
                Ok(upsert(ipcache("10.2.0.6", 131_080))),
                Ok(synced),
            ];
            let end = futures::stream::once(async { Err(Status::unavailable("going away")) });
            return Ok(Response::new(Box::pin(futures::StreamExt::chain(
                futures::stream::iter(events),
                end,
            ))));
        }
        // The worker resumes from the snapshot's revision (what Synced carried).
        if req.get_ref().since_revision != 20 {
            return Err(Status::invalid_argument(format!(
                "resumed from {}, not 20",
                req.get_ref().since_revision
            )));
        }
        let reset = v1::WatchEvent {
            revision: 30,
            event: Some(Ev::Reset(v1::Reset {
                reason: "compacted".into(),
            })),
            origin: None,
        };
        let events = vec![
            Ok(reset),
            Ok(upsert(ipcache("10.2.0.5", 131_080))),
            Ok(synced),
        ];
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            futures::stream::iter(events),
            futures::stream::pending(),
        ))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reset_the_cache_converges_and_stale_keys_go() {
    let (worker, store, _dir) = import_from(
        Compacted {
            calls: Default::default(),
        },
        StalenessConfig::default(),
    )
    .await;
    for _ in 0..200 {
        if worker.status.lock().full_syncs == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = worker.status.lock().clone();
    assert_eq!(status.full_syncs, 2, "{status:?}");
    let keys: Vec<String> = store
        .list("cilium/cache/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["cilium/cache/ip/v1/c2/10.2.0.5"]);
    // The replace was one transaction: the stale key went at the revision of the new canaries.
    let canaries = store.list("cilium/synced/c2/").await.unwrap().kvs;
    assert_eq!(canaries.len(), ExportKind::ALL.len());
    let at = canaries[0].mod_revision;
    assert!(
        canaries.iter().all(|kv| kv.mod_revision == at),
        "{canaries:?}"
    );
    let mut history = store.watch("cilium/cache/", 0).await.unwrap();
    let deleted = loop {
        let e = tokio::time::timeout(Duration::from_secs(5), history.next())
            .await
            .expect("the deletion is in the history")
            .unwrap()
            .unwrap();
        if e.kind == EventKind::Delete {
            break e;
        }
    };
    assert_eq!(deleted.key, "cilium/cache/ip/v1/c2/10.2.0.6");
    assert_eq!(deleted.revision, at);
    worker.stop().await;
}

/// A remote that sends objects without end: `synced_after` of them, then `Synced`, then more;
/// with `None`, never `Synced` (its snapshot never ends).
struct Flood {
    synced_after: Option<usize>,
    object: fn(usize) -> v1::upsert::Object,
}

#[tonic::async_trait]
impl v1::export_server::Export for Flood {
    async fn get_cluster_config(
        &self,
        r: Request<v1::GetClusterConfigRequest>,
    ) -> Result<Response<v1::ClusterConfig>, Status> {
        Hostile.get_cluster_config(r).await
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        _: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (synced_after, object) = (self.synced_after, self.object);
        let events = futures::stream::iter(0..).flat_map(move |i| {
            let mut out = Vec::new();
            if synced_after == Some(i) {
                out.push(Ok(v1::WatchEvent {
                    revision: 10,
                    event: Some(Ev::Synced(v1::Synced {})),
                    origin: None,
                }));
            }
            let mut u = upsert(object(i));
            u.revision = 11 + i64::try_from(i).unwrap();
            out.push(Ok(u));
            futures::stream::iter(out)
        });
        Ok(Response::new(Box::pin(events)))
    }
}

fn pod_ip(i: usize) -> v1::upsert::Object {
    ipcache(&format!("10.2.{}.{}", i / 250, 1 + i % 250), 131_080)
}

fn big_node(i: usize) -> v1::upsert::Object {
    v1::upsert::Object::Node(v1::Node {
        name: format!("n{i}"),
        cluster: "c2".into(),
        cluster_id: 2,
        addresses: vec![v1::NodeAddress {
            r#type: "InternalIP".into(),
            ip: "192.0.2.2".into(),
        }],
        labels: (0..40)
            .map(|l| (format!("k{l}"), "v".repeat(1000)))
            .collect(),
        ..Default::default()
    })
}

async fn wait_for_quota_stop(worker: &RemoteWorker) -> clustermesh_sync::worker::RemoteStatus {
    for _ in 0..400 {
        if worker.status.lock().quota_stops > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    worker.status.lock().clone()
}

async fn cache_keys(store: &Arc<dyn KvStore>, prefix: &str) -> Vec<String> {
    store
        .list(prefix)
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_never_ends_stops_at_the_object_quota_and_writes_nothing() {
    let quota = Quota {
        ip: 1000,
        ..Quota::default()
    };
    let flood = Flood {
        synced_after: None,
        object: pod_ip,
    };
    let (worker, store, _dir) = import_with_quota(flood, StalenessConfig::default(), quota).await;
    let status = wait_for_quota_stop(&worker).await;
    assert_eq!(status.quota_stops, 1, "{status:?}");
    assert_eq!(
        status.quota_exceeded.as_deref(),
        Some("more than 1000 ip objects")
    );
    assert!(!status.imported && !status.connected, "{status:?}");
    assert_eq!(
        status.last_failure.as_deref(),
        Some("quota exceeded: more than 1000 ip objects; the import stops, what was synced stays")
    );
    // The staged snapshot was dropped: nothing reached the store.
    assert!(cache_keys(&store, "cilium/cache/").await.is_empty());
    // The import waits `retry_after` (60 s) before it tries again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(worker.status.lock().quota_stops, 1);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_over_the_byte_quota_stops_and_writes_nothing() {
    let quota = Quota {
        bytes: 200_000,
        ..Quota::default()
    };
    let flood = Flood {
        synced_after: None,
        object: big_node,
    };
    let (worker, store, _dir) = import_with_quota(flood, StalenessConfig::default(), quota).await;
    let status = wait_for_quota_stop(&worker).await;
    assert_eq!(
        status.quota_exceeded.as_deref(),
        Some("more than 200000 bytes of objects"),
        "{status:?}"
    );
    assert!(cache_keys(&store, "cilium/cache/").await.is_empty());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_the_quota_after_sync_keeps_what_was_synced() {
    let quota = Quota {
        ip: 10,
        ..Quota::default()
    };
    let flood = Flood {
        synced_after: Some(4),
        object: pod_ip,
    };
    let (worker, store, _dir) = import_with_quota(flood, StalenessConfig::default(), quota).await;
    let status = wait_for_quota_stop(&worker).await;
    assert_eq!(
        status.quota_exceeded.as_deref(),
        Some("more than 10 ip objects"),
        "{status:?}"
    );
    // Synced once; the cache holds the snapshot and the changes up to the quota, and the
    // canaries of the sync.
    assert!(status.imported, "{status:?}");
    assert_eq!(status.full_syncs, 1);
    assert_eq!(status.counts.get("ip"), Some(&10));
    let keys = cache_keys(&store, "cilium/cache/ip/").await;
    let expected: Vec<String> = (0..10)
        .map(|i| match pod_ip(i) {
            v1::upsert::Object::Ipcache(e) => format!("cilium/cache/ip/v1/c2/{}", e.ip),
            _ => unreachable!(),
        })
        .collect();
    let mut expected = expected;
    expected.sort();
    assert_eq!(keys, expected);
    assert_eq!(
        cache_keys(&store, "cilium/synced/c2/").await.len(),
        ExportKind::ALL.len()
    );
    worker.stop().await;
}

/// A remote that sends `events`, then heartbeats: as cluster `name`, ID `id`.
struct Scripted {
    name: &'static str,
    id: u32,
    events: Vec<v1::WatchEvent>,
}

#[tonic::async_trait]
impl v1::export_server::Export for Scripted {
    async fn get_cluster_config(
        &self,
        _: Request<v1::GetClusterConfigRequest>,
    ) -> Result<Response<v1::ClusterConfig>, Status> {
        Ok(Response::new(v1::ClusterConfig {
            name: self.name.into(),
            id: self.id,
            synced_canaries: true,
            cached: true,
            max_connected_clusters: 255,
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        _: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let heartbeats = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let beat = v1::WatchEvent {
                revision: 10,
                event: Some(Ev::Heartbeat(v1::Heartbeat {})),
                origin: None,
            };
            Some((Ok(beat), ()))
        });
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            futures::stream::iter(self.events.clone().into_iter().map(Ok)),
            heartbeats,
        ))))
    }
}

fn pod_of(cluster: &str, ip: &str, identity: u32) -> v1::WatchEvent {
    upsert(v1::upsert::Object::Ipcache(v1::IpCacheEntry {
        cluster: cluster.into(),
        ip: ip.into(),
        identity,
        host_ip: String::new(),
        namespace: "prod".into(),
        pod_name: "p".into(),
        named_ports: vec![],
    }))
}

fn synced() -> v1::WatchEvent {
    v1::WatchEvent {
        revision: 10,
        event: Some(Ev::Synced(v1::Synced {})),
        origin: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_cannot_take_another_clusters_ip_or_point_a_service_outside_itself() {
    let (ctx, store, _dir) = local_c1(StalenessConfig::default(), Quota::default());
    // A pod of this cluster.
    store
        .put("cilium/state/ip/v1/default/10.1.0.9", b"{}", None)
        .await
        .unwrap();
    // c3 imports first and owns 10.9.0.1.
    let c3 = spawn_worker(
        Scripted {
            name: "c3",
            id: 3,
            events: vec![pod_of("c3", "10.9.0.1", 196_616), synced()],
        },
        &ctx,
        "c3",
        3,
    )
    .await;
    support_wait(|| c3.status.lock().imported).await;
    // c2 (a lower name: once the winner) claims it too, and lists it, an address outside the
    // mesh and its own pod and node as backends of a global service.
    let service = global_service(
        "c2",
        2,
        &[
            "10.9.0.1",
            "10.9.0.2",
            "198.51.100.7",
            "192.0.2.2",
            "10.1.0.9",
        ],
    );
    // Its own address, and (hostile) c3's pod and a pod of this cluster as "node" addresses,
    // to pass them off as host-network backends.
    let node = node_of("c2", 2, "n1", &["192.0.2.2", "10.9.0.1", "10.1.0.9"]);
    let c2 = spawn_worker(
        Scripted {
            name: "c2",
            id: 2,
            events: vec![
                pod_of("c2", "10.9.0.1", 131_080),
                pod_of("c2", "10.9.0.2", 131_080),
                node,
                service,
                synced(),
            ],
        },
        &ctx,
        "c2",
        2,
    )
    .await;
    support_wait(|| c2.status.lock().imported).await;
    let status = c2.status.lock().clone();
    let rejected: Vec<(&str, u64)> = status
        .rejected
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        rejected,
        [("ip/conflict", 1), ("services/foreign-backend", 1)]
    );
    let keys = cache_keys(&store, "cilium/cache/ip/").await;
    assert_eq!(
        keys,
        [
            "cilium/cache/ip/v1/c2/10.9.0.2",
            "cilium/cache/ip/v1/c3/10.9.0.1"
        ]
    );
    let web = store
        .get("cilium/cache/services/v1/c2/prod/web")
        .await
        .unwrap()
        .expect("the service is imported");
    let web: clustermesh_model::service::ClusterService =
        serde_json::from_slice(&web.value).unwrap();
    let backends: Vec<String> = web.backends.keys().map(|ip| ip.to_string()).collect();
    assert_eq!(backends, ["10.9.0.2", "192.0.2.2"]);
    // The owner's import is untouched.
    assert!(c3.status.lock().rejected.is_empty());
    c2.stop().await;
    c3.stop().await;
}

fn global_service(cluster: &str, id: u32, backends: &[&str]) -> v1::WatchEvent {
    let port = || v1::ServicePort {
        name: "http".into(),
        protocol: "TCP".into(),
        port: 80,
    };
    upsert(v1::upsert::Object::Service(v1::Service {
        cluster: cluster.into(),
        namespace: "prod".into(),
        name: "web".into(),
        cluster_id: id,
        global: true,
        shared: true,
        frontends: vec![v1::Frontend {
            ip: "10.96.0.10".into(),
            ports: vec![port()],
        }],
        backends: backends
            .iter()
            .map(|ip| v1::Backend {
                ip: (*ip).into(),
                ports: vec![port()],
                ready: true,
                serving: true,
                terminating: false,
            })
            .collect(),
        affinity: "none".into(),
        ..Default::default()
    }))
}

fn node_of(cluster: &str, id: u32, name: &str, addresses: &[&str]) -> v1::WatchEvent {
    upsert(v1::upsert::Object::Node(v1::Node {
        name: name.into(),
        cluster: cluster.into(),
        cluster_id: id,
        addresses: addresses
            .iter()
            .map(|ip| v1::NodeAddress {
                r#type: "InternalIP".into(),
                ip: (*ip).into(),
            })
            .collect(),
        ..Default::default()
    }))
}

fn delete(cluster: &str, kind: v1::Kind, name: &str) -> v1::WatchEvent {
    v1::WatchEvent {
        revision: 11,
        event: Some(Ev::Delete(v1::Delete {
            kind: kind as i32,
            cluster: cluster.into(),
            name: name.into(),
        })),
        origin: None,
    }
}

async fn cached_backends(store: &Arc<dyn KvStore>, key: &str) -> Vec<String> {
    let kv = store
        .get(key)
        .await
        .unwrap()
        .expect("the service is cached");
    let service: clustermesh_model::service::ClusterService =
        serde_json::from_slice(&kv.value).unwrap();
    service.backends.keys().map(|ip| ip.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_the_remote_gives_up_leaves_its_service_before_another_cluster_can_claim_it() {
    let (ctx, store, _dir) = local_c1(StalenessConfig::default(), Quota::default());
    // c2's service has its pod 10.9.0.5 and its node address 192.0.2.5 as backends, and its
    // pod 10.9.0.6. After the sync c2 deletes the pod 10.9.0.5 and the node, but never
    // updates the service.
    let c2 = spawn_worker(
        Scripted {
            name: "c2",
            id: 2,
            events: vec![
                pod_of("c2", "10.9.0.5", 131_080),
                pod_of("c2", "10.9.0.6", 131_080),
                node_of("c2", 2, "n1", &["192.0.2.5"]),
                global_service("c2", 2, &["10.9.0.5", "10.9.0.6", "192.0.2.5"]),
                synced(),
                delete("c2", v1::Kind::Ipcache, "10.9.0.5"),
                delete("c2", v1::Kind::Nodes, "n1"),
                pod_of("c2", "10.9.0.7", 131_080),
            ],
        },
        &ctx,
        "c2",
        2,
    )
    .await;
    let marker = "cilium/cache/ip/v1/c2/10.9.0.7";
    for _ in 0..400 {
        if store.get(marker).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        cached_backends(&store, "cilium/cache/services/v1/c2/prod/web").await,
        ["10.9.0.6"],
        "the given-up pod IP and node address left the service"
    );
    assert_eq!(
        c2.status.lock().rejected.get("services/foreign-backend"),
        Some(&2),
        "counted: one service change per removed entry"
    );
    // Now c3 claims the address c2 gave up: it is c3's, and c2's service does not reach it.
    let c3 = spawn_worker(
        Scripted {
            name: "c3",
            id: 3,
            events: vec![pod_of("c3", "10.9.0.5", 196_616), synced()],
        },
        &ctx,
        "c3",
        3,
    )
    .await;
    support_wait(|| c3.status.lock().imported).await;
    assert!(c3.status.lock().rejected.is_empty());
    assert_eq!(
        cache_keys(&store, "cilium/cache/ip/").await,
        [
            "cilium/cache/ip/v1/c2/10.9.0.6",
            "cilium/cache/ip/v1/c2/10.9.0.7",
            "cilium/cache/ip/v1/c3/10.9.0.5"
        ]
    );
    c2.stop().await;
    c3.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_given_up_inside_a_snapshot_never_reaches_the_store() {
    let (ctx, store, _dir) = local_c1(StalenessConfig::default(), Quota::default());
    // The same as above, but all before Synced: the snapshot is staged, and what is written
    // at Synced must not have the service pointing at the deleted pod and node.
    let c2 = spawn_worker(
        Scripted {
            name: "c2",
            id: 2,
            events: vec![
                pod_of("c2", "10.9.0.5", 131_080),
                pod_of("c2", "10.9.0.6", 131_080),
                node_of("c2", 2, "n1", &["192.0.2.5"]),
                global_service("c2", 2, &["10.9.0.5", "10.9.0.6", "192.0.2.5"]),
                delete("c2", v1::Kind::Ipcache, "10.9.0.5"),
                delete("c2", v1::Kind::Nodes, "n1"),
                synced(),
            ],
        },
        &ctx,
        "c2",
        2,
    )
    .await;
    support_wait(|| c2.status.lock().imported).await;
    assert_eq!(
        cached_backends(&store, "cilium/cache/services/v1/c2/prod/web").await,
        ["10.9.0.6"]
    );
    assert_eq!(
        c2.status.lock().rejected.get("services/foreign-backend"),
        Some(&1),
        "one service changed"
    );
    c2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_loaded_at_start_loses_the_backends_another_cluster_owns_now() {
    let (ctx, store, _dir) = local_c1(StalenessConfig::default(), Quota::default());
    let c2 = spawn_worker(
        Scripted {
            name: "c2",
            id: 2,
            events: vec![
                pod_of("c2", "10.9.0.5", 131_080),
                pod_of("c2", "10.9.0.6", 131_080),
                global_service("c2", 2, &["10.9.0.5", "10.9.0.6"]),
                synced(),
            ],
        },
        &ctx,
        "c2",
        2,
    )
    .await;
    support_wait(|| c2.status.lock().imported).await;
    c2.stop().await;
    // A restart (ownership is rebuilt) where c3 is imported first and claims 10.9.0.5; c2's
    // cache, loaded next, loses the address and its service the backend, before c2 answers.
    let ctx = SyncContext {
        ip_owners: Arc::default(),
        connected_ids: Arc::default(),
        ..ctx
    };
    let c3 = spawn_worker(
        Scripted {
            name: "c3",
            id: 3,
            events: vec![pod_of("c3", "10.9.0.5", 196_616), synced()],
        },
        &ctx,
        "c3",
        3,
    )
    .await;
    support_wait(|| c3.status.lock().imported).await;
    let c2 = spawn_worker(
        Scripted {
            name: "c2",
            id: 2,
            events: vec![],
        },
        &ctx,
        "c2",
        2,
    )
    .await;
    support_wait(|| {
        c2.status
            .lock()
            .rejected
            .contains_key("services/foreign-backend")
    })
    .await;
    assert_eq!(
        cached_backends(&store, "cilium/cache/services/v1/c2/prod/web").await,
        ["10.9.0.6"]
    );
    assert_eq!(
        cache_keys(&store, "cilium/cache/ip/").await,
        [
            "cilium/cache/ip/v1/c2/10.9.0.6",
            "cilium/cache/ip/v1/c3/10.9.0.5"
        ]
    );
    let rejected: Vec<(String, u64)> = c2.status.lock().rejected.clone().into_iter().collect();
    assert_eq!(
        rejected,
        [
            ("ip/conflict".to_owned(), 1),
            ("services/foreign-backend".to_owned(), 1)
        ]
    );
    c2.stop().await;
    c3.stop().await;
}

async fn support_wait(mut cond: impl FnMut() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out after 10 s");
}

/// A remote that crosses the quota after its first sync, then shrinks: its second session
/// must be a full snapshot (a resume would replay the crossing object first).
struct Shrinks {
    requests: Arc<parking_lot::Mutex<Vec<i64>>>,
}

#[tonic::async_trait]
impl v1::export_server::Export for Shrinks {
    async fn get_cluster_config(
        &self,
        r: Request<v1::GetClusterConfigRequest>,
    ) -> Result<Response<v1::ClusterConfig>, Status> {
        Hostile.get_cluster_config(r).await
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        r: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let first = {
            let mut requests = self.requests.lock();
            requests.push(r.get_ref().since_revision);
            requests.len() == 1
        };
        let ips: Vec<usize> = if first {
            (0..20).collect()
        } else {
            (0..3).collect()
        };
        let mut events: Vec<v1::WatchEvent> = Vec::new();
        for i in ips {
            if first && i == 5 {
                events.push(synced());
            }
            events.push(upsert(pod_ip(i)));
        }
        if !first {
            events.push(synced());
        }
        Ok(Response::new(Box::pin(futures::StreamExt::chain(
            futures::stream::iter(events.into_iter().map(Ok)),
            futures::stream::pending(),
        ))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_quota_stop_the_next_import_is_a_full_snapshot_and_recovers() {
    let quota = Quota {
        ip: 10,
        retry_after: Duration::from_millis(300),
        ..Quota::default()
    };
    let requests = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let remote = Shrinks {
        requests: Arc::clone(&requests),
    };
    let (worker, store, _dir) = import_with_quota(remote, StalenessConfig::default(), quota).await;
    support_wait(|| worker.status.lock().full_syncs == 2).await;
    let status = worker.status.lock().clone();
    assert_eq!(status.quota_stops, 1, "{status:?}");
    assert_eq!(status.quota_exceeded, None, "cleared by the new sync");
    assert_eq!(
        *requests.lock(),
        [0, 0],
        "the second session asked for a snapshot"
    );
    assert_eq!(cache_keys(&store, "cilium/cache/ip/").await.len(), 3);
    worker.stop().await;
}

/// `event` with `origin`.
fn with_origin(mut event: v1::WatchEvent, unix_nanos: i64, traceparent: &str) -> v1::WatchEvent {
    event.origin = Some(v1::Origin {
        unix_nanos,
        traceparent: traceparent.to_owned(),
        tracestate: String::new(),
    });
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_origin_is_dropped_or_clamped_and_the_change_is_imported_all_the_same() {
    let (ctx, store, _dir) = local_c1(StalenessConfig::default(), Quota::default());
    let seen: Arc<parking_lot::Mutex<Vec<(String, f64)>>> = Arc::default();
    let record = Arc::clone(&seen);
    let ctx = SyncContext {
        propagated: Arc::new(move |remote: &ClusterName, seconds: f64| {
            record.lock().push((remote.to_string(), seconds));
        }),
        ..ctx
    };
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap();
    let hour = 3_600_000_000_000_i64;
    let c2 = spawn_worker(
        Scripted {
            name: "c2",
            id: 2,
            events: vec![
                // A snapshot's origin is not a change's: ignored.
                with_origin(pod_of("c2", "10.9.0.1", 131_080), now - hour, ""),
                synced(),
                // No time (0, negative): no origin at all.
                with_origin(pod_of("c2", "10.9.0.2", 131_080), 0, "garbage"),
                with_origin(pod_of("c2", "10.9.0.3", 131_080), -5, ""),
                // A malformed, an oversized and an unsampled trace context: dropped, the time
                // kept.
                with_origin(pod_of("c2", "10.9.0.4", 131_080), now - hour, "garbage"),
                with_origin(
                    pod_of("c2", "10.9.0.5", 131_080),
                    now - hour,
                    &format!("00-{}-00f067aa0ba902b7-01", "a".repeat(100_000)),
                ),
                with_origin(
                    pod_of("c2", "10.9.0.6", 131_080),
                    now - hour,
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                ),
                // From the future (a clock ahead): 0 seconds, not negative.
                with_origin(pod_of("c2", "10.9.0.7", 131_080), i64::MAX, ""),
                // From 1970, or two days ago: no origin (not a delay worth measuring).
                with_origin(pod_of("c2", "10.9.0.8", 131_080), 1, ""),
                with_origin(pod_of("c2", "10.9.0.9", 131_080), now - 48 * hour, ""),
            ],
        },
        &ctx,
        "c2",
        2,
    )
    .await;
    let marker = "cilium/cache/ip/v1/c2/10.9.0.9";
    for _ in 0..400 {
        if store.get(marker).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        cache_keys(&store, "cilium/cache/ip/").await.len(),
        9,
        "every change imported"
    );
    assert!(c2.status.lock().rejected.is_empty());
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    for (remote, seconds) in &seen[..3] {
        assert_eq!(remote, "c2");
        assert!((3600.0..3700.0).contains(seconds), "{seconds}");
    }
    assert_eq!(seen[3], ("c2".to_owned(), 0.0));
    // The writes are recorded with their origin for the Export to the agents: the time, and
    // no trace context (none was valid and sampled); none for the snapshot or without a time.
    for (ip, recorded) in [
        ("10.9.0.1", false),
        ("10.9.0.2", false),
        ("10.9.0.3", false),
        ("10.9.0.4", true),
        ("10.9.0.5", true),
        ("10.9.0.6", true),
        ("10.9.0.7", true),
        ("10.9.0.8", false),
        ("10.9.0.9", false),
    ] {
        let key = format!("cilium/cache/ip/v1/c2/{ip}");
        let rev = store.get(&key).await.unwrap().unwrap().mod_revision;
        let origin = ctx.provenance.lookup(&key, rev);
        assert_eq!(origin.is_some(), recorded, "{ip}");
        if let Some(o) = origin {
            assert_eq!(o.trace, None, "{ip}");
        }
    }
    c2.stop().await;
}
