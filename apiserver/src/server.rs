//! Wiring: opens the store, binds the listeners, runs the source loop (manifest directory ->
//! desired state -> identities -> writes), the Export server and the health server, until
//! asked to stop.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_kvstore::KvStore;
use clustermesh_kvstore::embedded::{SledConfig, SledStore};
use clustermesh_kvstore::etcd::{EtcdConfig, EtcdStore, EtcdTls};
use clustermesh_model::cluster::{Capabilities, ClusterConfig, ClusterId, ClusterName};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::{Config, StoreConfig};
use crate::desired::DesiredState;
use crate::export::{ExportService, ExportSettings, NamespaceFilter};
use crate::identity::IdentityAllocator;
use crate::metrics::{self, Metrics};
use crate::remotes::RemoteSet;
use crate::source::manifest;
use crate::writer::{self, StateWriter};

/// Where the exported namespaces are recorded (read by nobody but this apiserver; no Export
/// kind covers it).
pub const EXPORT_FILTER_KEY: &str = "clustermesh/local/export-namespaces";

/// Where the last good content of each manifest file is saved (the key's rest is the file's
/// path relative to the directory), so that a file broken across a restart keeps its objects.
/// Read by nobody but this apiserver; no Export kind covers it.
pub const MANIFEST_LAST_GOOD_PREFIX: &str = "clustermesh/local/manifest-last-good/";

/// How often the source loop runs its housekeeping (retries, identity release), and how often
/// the manifest directory is read when it cannot be watched.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// How often a watched manifest directory is read in full anyway (a change the watch cannot
/// see: a network filesystem, a lost event).
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(30);

/// How long a change notification waits for more before the directory is read (a file being
/// written gives several).
const SETTLE: Duration = Duration::from_millis(50);

/// The first and the longest wait before a failed watch of the manifest directory is tried
/// again (each try walks the tree).
const WATCH_RETRY_MIN: Duration = Duration::from_secs(1);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(30);

/// Why the apiserver could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Opening the store failed.
    #[error("opening the kvstore failed")]
    Store(#[from] clustermesh_kvstore::Error),
    /// A listener could not be bound.
    #[error("binding {addr} failed")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file could not be read.
    #[error("reading TLS file {path} failed")]
    Tls {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("the Export server failed")]
    Grpc(#[from] tonic::transport::Error),
    /// The health server failed.
    #[error("the health server failed")]
    Health(#[source] std::io::Error),
    /// The cluster ID does not fit the mesh size.
    #[error("invalid cluster ID")]
    Cluster(#[from] clustermesh_model::cluster::ClusterError),
    /// The remote clusters could not be set up.
    #[error("configuring the remote clusters failed: {0}")]
    Remotes(String),
    /// Writing the cluster config failed.
    #[error("writing the cluster config failed")]
    Write(#[from] writer::WriteError),
    /// The Kubernetes API client could not be configured.
    #[error("configuring the Kubernetes client failed: {0}")]
    Kubernetes(String),
    /// The source reader stopped (a bug): the store keeps its state.
    #[error("the source reader failed: {0}")]
    Source(String),
}

/// A running apiserver.
pub struct Running {
    /// Where the Export server listens.
    pub export_addr: SocketAddr,
    /// Where the health server listens.
    pub health_addr: SocketAddr,
    /// Its metrics (and readiness).
    pub metrics: Arc<Metrics>,
    /// The store it writes.
    pub store: Arc<dyn KvStore>,
    /// The sync workers, one per remote.
    pub remotes: Arc<RemoteSet>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<Result<(), ServeError>>>,
}

impl Running {
    /// Stops every task and waits for them.
    pub async fn stop(self) -> Result<(), ServeError> {
        let _ = self.stop.send(true);
        self.remotes.stop_all().await;
        for t in self.tasks {
            match t.await {
                Ok(r) => r?,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            }
        }
        Ok(())
    }
}

/// Opens the configured store.
pub async fn open_store(config: &StoreConfig) -> Result<Arc<dyn KvStore>, ServeError> {
    Ok(match config {
        StoreConfig::Sled { path } => Arc::new(SledStore::open(&SledConfig::new(path))?),
        StoreConfig::Etcd {
            endpoints,
            tls,
            max_txn_ops,
            max_txn_bytes,
        } => {
            let mut c = EtcdConfig::new(endpoints.clone());
            c.txn_limits.max_ops = max_txn_ops.map_or(c.txn_limits.max_ops, |n| n.get());
            c.txn_limits.max_bytes = max_txn_bytes.map_or(c.txn_limits.max_bytes, |n| n.get());
            c.tls = tls.as_ref().map(|t| EtcdTls {
                ca: t.ca.clone(),
                cert: t.cert.clone(),
                key: t.key.clone(),
            });
            Arc::new(EtcdStore::connect(&c).await?)
        }
    })
}

fn read(path: &std::path::Path) -> Result<String, ServeError> {
    std::fs::read_to_string(path).map_err(|source| ServeError::Tls {
        path: path.display().to_string(),
        source,
    })
}

async fn bind(addr: &str) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The Kubernetes client of a `kubernetes` source: the kubeconfig file and context when set,
/// else the in-cluster service account (or `$KUBECONFIG`).
async fn kube_client(k: &crate::config::KubernetesSource) -> Result<kube::Client, ServeError> {
    let err = |e: &dyn std::fmt::Display| ServeError::Kubernetes(e.to_string());
    let options = kube::config::KubeConfigOptions {
        context: k.context.clone(),
        ..Default::default()
    };
    let config = match &k.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| err(&e))?
        }
        None if k.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| err(&e))?,
        None => kube::Config::infer().await.map_err(|e| err(&e))?,
    };
    kube::Client::try_from(config).map_err(|e| err(&e))
}

/// Starts the apiserver: binds both listeners, then runs until [`Running::stop`].
pub async fn start(config: Config) -> Result<Running, ServeError> {
    let client = match &config.source.kubernetes {
        Some(k) => Some(kube_client(k).await?),
        None => None,
    };
    start_with(config, client).await
}

/// [`start`] with a given Kubernetes client for a `kubernetes` source (tests pass a mock).
pub async fn start_with(
    config: Config,
    client: Option<kube::Client>,
) -> Result<Running, ServeError> {
    let cluster = config.cluster.name.clone();
    let id = config.cluster_id()?;
    let mode = config.cluster.max_connected_clusters;
    let store = open_store(&config.store).await?;
    let metrics = Arc::new(Metrics::new());
    metrics.set_cluster(cluster.as_str(), id.get());
    let cluster_config = ClusterConfig {
        id,
        capabilities: Capabilities {
            synced_canaries: true,
            // Its own config: not a mirrored one (those in the cache say `cached`).
            cached: false,
            max_connected_clusters: mode,
            service_exports_enabled: Some(false),
        },
    };
    // The origin of each recent write, handed on by the Export server with the change.
    let provenance = Arc::new(clustermesh_telemetry::Provenance::default());
    let writer = StateWriter::new(Arc::clone(&store), &cluster, Arc::clone(&provenance));
    writer
        .write_cluster_config(&cluster, &cluster_config)
        .await?;

    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(&config.tls.cert)?,
            read(&config.tls.key)?,
        ))
        .client_ca_root(Certificate::from_pem(read(&config.tls.ca)?));
    let export_listener = bind(&config.listen.export).await?;
    let health_listener = bind(&config.listen.health).await?;
    let export_addr = export_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            addr: config.listen.export.clone(),
            source,
        })?;
    let health_addr = health_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            addr: config.listen.health.clone(),
            source,
        })?;
    let (stop, stop_rx) = watch::channel(false);

    let settings = ExportSettings {
        heartbeat: Duration::from_millis(config.heartbeat_millis.max(10)),
        buffer: config.export_buffer_events.max(1),
        lag_timeout: Duration::from_millis(config.export_lag_timeout_millis.max(1)),
        max_object_bytes: config.limits.max_object_bytes,
        max_streams_per_remote: config.export_max_streams_per_remote.max(1),
    };
    // Unset until the source's first pass: remote streams wait for it.
    let (namespaces_tx, namespaces_rx) = watch::channel(None);
    let (peers_tx, peers_rx) = watch::channel(BTreeSet::new());
    let service = ExportService::new(
        Arc::clone(&store),
        cluster.clone(),
        cluster_config,
        settings,
        Arc::clone(&metrics),
        crate::export::ExportWatches {
            shutdown: stop_rx.clone(),
            namespaces: namespaces_rx,
            peers: peers_rx,
            provenance: Arc::clone(&provenance),
        },
    );
    // A client that never finishes mTLS is closed after the handshake timeout; dead peers
    // are found by HTTP/2 keepalive pings; at most `exportMaxConnections` at once.
    let grpc = Server::builder()
        .tls_config(tls.timeout(Duration::from_millis(
            config.export_handshake_timeout_millis.max(1),
        )))?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service.into_server());
    let grpc_stop = stopped(stop_rx.clone());
    let max_connections = config.export_max_connections;
    let grpc_task = tokio::spawn(async move {
        grpc.serve_with_incoming_shutdown(
            crate::conn::incoming(export_listener, max_connections),
            grpc_stop,
        )
        .await
        .map_err(ServeError::Grpc)
    });
    let remotes = start_remotes(&config, &store, id, peers_tx, (&provenance, &metrics)).await?;
    let status_source = Arc::clone(&remotes);
    let statuses: metrics::RemoteStatuses = Arc::new(move || status_source.statuses());
    let health_metrics = Arc::clone(&metrics);
    let health_stop = stopped(stop_rx.clone());
    let health_task = tokio::spawn(async move {
        metrics::serve(health_listener, health_metrics, statuses, health_stop)
            .await
            .map_err(ServeError::Health)
    });

    let mut allocator = IdentityAllocator::new(
        Arc::clone(&store),
        id,
        mode,
        Duration::from_secs(config.identity_grace_seconds),
    );
    allocator.load().await.map_err(|e| match e {
        crate::identity::IdentityError::Store(s) => ServeError::Store(s),
        other => ServeError::Store(clustermesh_kvstore::Error::UnexpectedResponse(
            other.to_string(),
        )),
    })?;
    let input = match (&config.source.manifest_dir, client) {
        (Some(dir), _) => Input::Dir(Box::new(DirInput::new(
            manifest::ManifestDir::with_limits(
                dir,
                config.limits.manifest_file_bytes,
                config.limits.manifest_total_bytes,
            )
            .with_max_saved_bytes(config.limits.max_object_bytes),
        ))),
        (None, Some(client)) => {
            let (tx, rx) = watch::channel(None);
            tokio::spawn(crate::source::kubernetes::run(client, tx, stop_rx.clone()));
            Input::Kube(rx)
        }
        (None, None) => {
            return Err(ServeError::Kubernetes(
                "a kubernetes source needs a client".into(),
            ));
        }
    };
    let source = SourceLoop {
        cluster,
        id,
        input,
        namespaces: namespaces_tx,
        writer,
        allocator,
        metrics: Arc::clone(&metrics),
        max_object_bytes: config.limits.max_object_bytes,
        default_global: config.global_namespaces_by_default,
    };
    let source_task = tokio::spawn(source.run(stop_rx.clone()));
    let heartbeat_task = tokio::spawn(write_heartbeat(Arc::clone(&store), stop_rx.clone()));
    let probe_task = tokio::spawn(probe_store(
        Arc::clone(&store),
        Arc::clone(&metrics),
        stop_rx.clone(),
    ));
    let supervisor_task = tokio::spawn(supervise_remotes(
        config.clone(),
        Arc::clone(&remotes),
        stop_rx,
    ));
    tracing::info!(%export_addr, %health_addr, remotes = remotes.statuses().len(), "apiserver started");
    Ok(Running {
        export_addr,
        health_addr,
        metrics,
        store,
        remotes,
        stop,
        tasks: vec![
            source_task,
            grpc_task,
            health_task,
            supervisor_task,
            probe_task,
            heartbeat_task,
        ],
    })
}

/// Cilium's heartbeat key: its remote readers re-connect and list again after two minutes
/// without a change to it.
pub const HEARTBEAT_KEY: &str = "cilium/.heartbeat";
/// How often [`HEARTBEAT_KEY`] is written (Cilium's interval).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);
/// The TTL of the heartbeat's lease (Cilium's default kvstore lease TTL): the key goes away
/// some time after its writer does.
pub const HEARTBEAT_LEASE_TTL: Duration = Duration::from_secs(15 * 60);

/// Writes [`HEARTBEAT_KEY`] (the time, RFC 3339) every [`HEARTBEAT_INTERVAL`], attached to a
/// lease this task keeps alive, as Cilium's clustermesh-apiserver does. A failure is logged
/// and tried again at the next interval; it never stops the apiserver.
async fn write_heartbeat(
    store: Arc<dyn KvStore>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let mut lease = None;
    loop {
        let beat = async {
            let id = match lease {
                Some(id) => match store.keep_alive(id).await {
                    Ok(_) => id,
                    Err(_) => store.grant_lease(HEARTBEAT_LEASE_TTL).await?,
                },
                None => store.grant_lease(HEARTBEAT_LEASE_TTL).await?,
            };
            lease = Some(id);
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            store.put(HEARTBEAT_KEY, now.as_bytes(), Some(id)).await?;
            Ok::<(), clustermesh_kvstore::Error>(())
        };
        if let Err(e) = beat.await {
            lease = None;
            tracing::warn!(error = %error_chain(&e), "writing the kvstore heartbeat failed; retrying");
        }
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// How often the kvstore is probed, and how long it has to answer.
pub const STORE_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// See [`STORE_PROBE_INTERVAL`].
pub const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Probes the store every second: a read of its revision (on etcd a linearizable read, which
/// needs quorum), tried up to three times. Three failures, or no answer within 3 s, make the apiserver not ready
/// (`/readyz`, `/status`), sets `clustermesh_kvstore_healthy` to 0 and is logged; so is the
/// recovery.
async fn probe_store(
    store: Arc<dyn KvStore>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    loop {
        tokio::select! {
            () = tokio::time::sleep(STORE_PROBE_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        // Up to three tries: a request that reached a dead member of a healthy etcd cluster
        // fails at once, and the client's balancer then tries the others.
        let probe = async {
            let mut last = String::new();
            for _ in 0..3 {
                match store.current_revision().await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = error_chain(&e),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(last)
        };
        let result = match tokio::time::timeout(STORE_PROBE_TIMEOUT, probe).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {STORE_PROBE_TIMEOUT:?}")),
        };
        if let Some(h) = metrics.record_store_probe(result) {
            if h.healthy {
                tracing::info!("the kvstore answers again: ready");
            } else {
                tracing::error!(
                    error = h.error.as_deref().unwrap_or(""),
                    "the kvstore is unavailable (etcd without quorum, or unreachable): not ready until it answers"
                );
            }
        }
    }
}

/// An error with its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The remotes wanted now: the config file's plus the remotes directory's.
fn wanted_remotes(config: &Config) -> Result<Vec<crate::config::RemoteSection>, String> {
    let mut wanted = config.remotes.clone();
    if let Some(dir) = &config.remotes_dir {
        wanted.extend(crate::remotes::read_remotes_dir(dir)?);
    }
    Ok(wanted)
}

async fn start_remotes(
    config: &Config,
    store: &Arc<dyn KvStore>,
    id: ClusterId,
    peers: watch::Sender<BTreeSet<ClusterName>>,
    (provenance, metrics): (&Arc<clustermesh_telemetry::Provenance>, &Arc<Metrics>),
) -> Result<Arc<RemoteSet>, ServeError> {
    use clustermesh_sync::staleness::StalenessConfig;
    use clustermesh_sync::worker::SyncContext;
    let st = config.staleness;
    let ctx = SyncContext {
        local: config.cluster.name.clone(),
        local_id: id,
        mode: config.cluster.max_connected_clusters,
        store: Arc::clone(store),
        staleness: StalenessConfig {
            unreachable_after: Duration::from_millis(st.unreachable_after_millis.max(1)),
            withdraw_after: Duration::from_millis(st.withdraw_after_millis),
            restore_after: Duration::from_millis(st.restore_after_millis),
        },
        connected_ids: Arc::default(),
        keep_last_backends: st.keep_last_backends,
        quota: config.limits.quota(),
        ip_owners: Arc::default(),
        provenance: Arc::clone(provenance),
        propagated: {
            let histogram = metrics.propagation.clone();
            Arc::new(move |remote: &ClusterName, seconds: f64| {
                histogram
                    .get_or_create(&vec![("source_cluster".to_owned(), remote.to_string())])
                    .observe(seconds);
            })
        },
    };
    let set = RemoteSet::new(
        ctx,
        Duration::from_secs(config.remote_drain_grace_seconds),
        peers,
        config.allowed_remotes.iter().cloned().collect(),
    );
    let wanted = wanted_remotes(config).map_err(ServeError::Remotes)?;
    set.apply(&wanted).await.map_err(ServeError::Remotes)?;
    Ok(set)
}

/// Re-reads the remotes directory every second and applies changes.
async fn supervise_remotes(
    config: Config,
    set: Arc<RemoteSet>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let mut last_error = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        if config.remotes_dir.is_none() {
            continue;
        }
        let result = match wanted_remotes(&config) {
            Ok(wanted) => set.apply(&wanted).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => last_error = None,
            Err(e) => {
                if last_error.as_ref() != Some(&e) {
                    tracing::warn!(error = %e, "the remotes directory cannot be applied; keeping the running remotes");
                }
                last_error = Some(e);
            }
        }
    }
}

/// A manifest directory and how it is followed.
struct DirInput {
    /// The directory (taken while a poll runs on a blocking thread).
    dir: Option<manifest::ManifestDir>,
    /// Its path.
    path: std::path::PathBuf,
    /// The change notification; none when inotify cannot be used (then it is read every
    /// [`POLL_INTERVAL`]).
    watch: Option<crate::source::watch::DirWatch>,
    /// Why the last attempt to watch failed (logged once per reason).
    watch_error: Option<String>,
    /// When to try to watch again after a failure, and the wait after the next failure.
    watch_retry: (Option<Instant>, Duration),
    /// The saved copies were read back ([`MANIFEST_LAST_GOOD_PREFIX`]).
    restored: bool,
    /// When the directory was last read in full.
    last_read: Option<Instant>,
    /// Copies not saved yet (their write failed): saved before the next pass is written.
    unsaved: std::collections::BTreeMap<String, Option<String>>,
}

impl DirInput {
    fn new(dir: manifest::ManifestDir) -> Self {
        Self {
            path: dir.path().to_owned(),
            dir: Some(dir),
            watch: None,
            watch_error: None,
            watch_retry: (None, WATCH_RETRY_MIN),
            restored: false,
            last_read: None,
            unsaved: std::collections::BTreeMap::new(),
        }
    }

    /// Watches the directory if it is not watched yet (before it is read, so no change is
    /// missed). Setting up a recursive watch walks the tree, so it runs on a blocking thread;
    /// after a failure it is tried again with a back-off (1 s doubling to 30 s).
    async fn ensure_watch(&mut self) {
        if self.watch.is_some() || self.watch_retry.0.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let path = self.path.clone();
        let made = tokio::task::spawn_blocking(move || crate::source::watch::DirWatch::new(&path))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match made {
            Ok(w) => {
                tracing::info!(dir = %self.path.display(), "watching the manifest directory (inotify)");
                self.watch = Some(w);
                self.watch_error = None;
                self.watch_retry = (None, WATCH_RETRY_MIN);
                // Whatever changed before the watch existed is seen by a full read now.
                self.last_read = None;
            }
            Err(e) => {
                if self.watch_error.as_ref() != Some(&e) {
                    tracing::warn!(dir = %self.path.display(), error = %e, "the manifest directory cannot be watched; reading it every {} ms", POLL_INTERVAL.as_millis());
                }
                self.watch_error = Some(e);
                let wait = self.watch_retry.1;
                self.watch_retry = (Some(Instant::now() + wait), (wait * 2).min(WATCH_RETRY_MAX));
            }
        }
    }

    /// Reads the saved copies of the files' last good content back into the directory
    /// (parsed on a blocking thread).
    async fn restore(&mut self, store: &dyn KvStore) -> Result<(), clustermesh_kvstore::Error> {
        let kvs = store.list(MANIFEST_LAST_GOOD_PREFIX).await?.kvs;
        let Some(mut dir) = self.dir.take() else {
            return Ok(());
        };
        let dir = tokio::task::spawn_blocking(move || {
            for kv in kvs {
                let rel = kv
                    .key
                    .strip_prefix(MANIFEST_LAST_GOOD_PREFIX)
                    .unwrap_or_default();
                let restored = std::str::from_utf8(&kv.value)
                    .map_err(|e| format!("is not UTF-8 ({e})"))
                    .and_then(|text| dir.restore(std::path::Path::new(rel), text));
                if let Err(e) = restored {
                    tracing::warn!(key = %kv.key, error = %e, "a saved manifest copy is not used");
                }
            }
            dir
        })
        .await
        .map_err(|e| {
            clustermesh_kvstore::Error::UnexpectedResponse(format!(
                "restoring the saved manifest copies: {e}"
            ))
        })?;
        self.dir = Some(dir);
        self.restored = true;
        Ok(())
    }

    /// Saves (or deletes) the copies the last reads produced; on failure they are kept for
    /// the next try. A copy the store refuses (too large for it) is not saved, and its older
    /// copy is deleted instead (it must not come back after a restart).
    async fn save(&mut self, store: &dyn KvStore) -> Result<(), clustermesh_kvstore::Error> {
        if let Some(dir) = self.dir.as_mut() {
            self.unsaved.extend(dir.take_saves());
        }
        while let Some((rel, text)) = self.unsaved.pop_first() {
            let key = format!("{MANIFEST_LAST_GOOD_PREFIX}{rel}");
            let put = match &text {
                Some(t) => store.put(&key, t.as_bytes(), None).await.map(|_| ()),
                None => Ok(()),
            };
            let done = match put {
                Ok(()) if text.is_some() => Ok(()),
                Ok(()) => store.delete(&key).await.map(|_| ()),
                // Refused for what it is (too large for the store): never saved, so the older
                // copy goes (it must not come back after a restart).
                Err(e) if e.is_about_the_request() => {
                    let deleted = store.delete(&key).await.map(|_| ());
                    if deleted.is_ok() {
                        tracing::warn!(file = %rel, error = %e, "the file's good content is not saved; if it is broken when the apiserver starts, only its usable documents apply");
                    }
                    deleted
                }
                // The store failed: the older copy stays, and this one is tried again.
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                self.unsaved.insert(rel, text);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reads the directory if it is due: at the first pass, when the watch reported a
    /// change, every [`RESCAN_INTERVAL`], and every pass when it cannot be watched.
    async fn read(&mut self) -> Result<Option<manifest::Loaded>, ServeError> {
        self.ensure_watch().await;
        let changes = self.watch.as_ref().map(|w| w.take()).unwrap_or_default();
        if changes.root_gone {
            // Watched again (the new directory, if any) at the next pass.
            self.watch = None;
        }
        let due = self.watch.is_none()
            || !changes.is_empty()
            || self
                .last_read
                .is_none_or(|t| t.elapsed() >= RESCAN_INTERVAL);
        if !due {
            return Ok(None);
        }
        let Some(mut dir) = self.dir.take() else {
            return Ok(None);
        };
        // On a blocking thread of its own: reading and parsing files never holds up the
        // threads that serve health and Export.
        let named = if changes.rescan {
            BTreeSet::from([self.path.clone()])
        } else {
            changes.paths
        };
        let (dir, polled) = tokio::task::spawn_blocking(move || {
            let r = dir.poll_named(&named);
            (dir, r)
        })
        .await
        .map_err(|e| ServeError::Source(e.to_string()))?;
        self.dir = Some(dir);
        self.last_read = Some(Instant::now());
        match polled {
            Ok(l) => Ok(l),
            Err(e) => {
                tracing::warn!(error = %e, "the manifest directory cannot be listed; keeping the current state");
                Ok(None)
            }
        }
    }

    /// Waits for a change notification, and a little more for the rest of its burst.
    async fn changed(&self) {
        match &self.watch {
            Some(w) => {
                w.changed().await;
                tokio::time::sleep(SETTLE).await;
            }
            None => std::future::pending().await,
        }
    }
}

/// Where the source loop reads from.
enum Input {
    /// A manifest directory.
    Dir(Box<DirInput>),
    /// The Kubernetes source's complete snapshots.
    Kube(watch::Receiver<Option<manifest::Loaded>>),
}

struct SourceLoop {
    cluster: ClusterName,
    id: ClusterId,
    input: Input,
    /// The exported namespaces, for the Export server.
    namespaces: watch::Sender<Option<NamespaceFilter>>,
    /// `globalNamespacesByDefault`.
    default_global: bool,
    writer: StateWriter,
    allocator: IdentityAllocator,
    metrics: Arc<Metrics>,
    /// `limits.maxObjectBytes`.
    max_object_bytes: usize,
}

/// The first 200 characters of `text`, for a log line about a huge value.
fn abbreviate(text: &str) -> String {
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}… ({} bytes)", &text[..i], text.len()),
        None => text.to_owned(),
    }
}

impl SourceLoop {
    async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), ServeError> {
        // A manifest state whose write failed (written again on the next tick).
        let mut retry: Option<manifest::Loaded> = None;
        let mut synced = false;
        let mut in_use: BTreeSet<clustermesh_model::labels::LabelSet> = BTreeSet::new();
        // A Kubernetes snapshot not yet written (a failed write is retried on the next tick).
        let mut pending: Option<manifest::Loaded> = None;
        // The Kubernetes source published (seen by the wait below, which marks it read).
        let mut kube_changed = false;
        loop {
            let store = Arc::clone(self.writer.store());
            let loaded = match &mut self.input {
                Input::Dir(input) => {
                    if !input.restored
                        && let Err(e) = input.restore(store.as_ref()).await
                    {
                        tracing::warn!(error = %e, "reading the saved manifest copies failed; retrying");
                        None
                    } else if let Some(l) = retry.take() {
                        Some(l)
                    } else {
                        input.read().await?
                    }
                }
                Input::Kube(rx) => {
                    if std::mem::take(&mut kube_changed) || rx.has_changed().unwrap_or(false) {
                        pending = rx.borrow_and_update().clone();
                    }
                    pending.clone()
                }
            };
            if let Some(loaded) = loaded {
                // A file's good content is saved before its objects are written: after a
                // crash in between, the saved copy is at least as new as the store.
                let saved = match &mut self.input {
                    Input::Dir(input) => input.save(store.as_ref()).await,
                    Input::Kube(_) => Ok(()),
                };
                // The root of the trace of this pass's changes (sampled by the sampler).
                let pass =
                    clustermesh_telemetry::root!("source change applied", cluster = %self.cluster);
                let written = match saved {
                    Ok(()) => {
                        use tracing::Instrument as _;
                        self.reconcile(&loaded).instrument(pass).await
                    }
                    Err(e) => Err(format!("saving the manifest files' good content: {e}").into()),
                };
                match written {
                    Ok(labels) => {
                        in_use = labels;
                        pending = None;
                        if !synced {
                            self.writer.write_canaries(&self.cluster).await?;
                            self.metrics.set_ready();
                            synced = true;
                            tracing::info!("initial sync of the source is complete");
                        }
                    }
                    // Retried on the next tick.
                    Err(e) => {
                        if matches!(self.input, Input::Dir(_)) {
                            retry = Some(loaded);
                        }
                        tracing::warn!(error = %e, "writing the desired state failed; retrying")
                    }
                }
            }
            let refs: BTreeSet<_> = in_use.iter().collect();
            match self.allocator.release_unused(&refs, Instant::now()).await {
                Ok(released) if !released.is_empty() => {
                    tracing::info!(?released, "released unused identities")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "releasing identities failed"),
            }
            self.metrics
                .identities
                .set(i64::try_from(self.allocator.identities().len()).unwrap_or(i64::MAX));
            let changed = async {
                match &mut self.input {
                    Input::Kube(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    Input::Dir(input) => input.changed().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(POLL_INTERVAL) => {}
                () = changed => kube_changed = true,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
        }
    }

    /// Hands `filter` to the Export server if it exports other namespaces than the current
    /// one (a change resets remote streams). The filter is recorded in the store
    /// ([`EXPORT_FILTER_KEY`]), so that it has a revision in the same history as the objects
    /// it governs: it holds after that revision, also across a restart that finds it
    /// unchanged (remotes then resume instead of taking a new snapshot).
    async fn publish_filter(
        &self,
        mut filter: NamespaceFilter,
    ) -> Result<(), clustermesh_kvstore::Error> {
        let current = self.namespaces.borrow().clone();
        if current.as_ref().is_some_and(|f| f.same_namespaces(&filter)) {
            return Ok(());
        }
        let store = self.writer.store();
        let value = serde_json::json!({
            "defaultGlobal": filter.default_global,
            "exceptions": filter.exceptions,
        })
        .to_string();
        let recorded = match current {
            // After a start: the filter the store holds still applies if it is the same.
            None => store
                .get(EXPORT_FILTER_KEY)
                .await?
                .filter(|kv| kv.value == value.as_bytes())
                .map(|kv| kv.mod_revision),
            Some(_) => None,
        };
        filter.since = match recorded {
            Some(revision) => revision,
            None => store.put(EXPORT_FILTER_KEY, value.as_bytes(), None).await?,
        };
        self.namespaces.send_replace(Some(filter));
        Ok(())
    }

    async fn reconcile(
        &mut self,
        loaded: &manifest::Loaded,
    ) -> Result<
        BTreeSet<clustermesh_model::labels::LabelSet>,
        Box<dyn std::error::Error + Send + Sync>,
    > {
        // The time this pass applies the source's changes: their origin.
        let origin_nanos = clustermesh_telemetry::now_unix_nanos();
        // The exported namespaces: a namespace leaving the export stops being exported
        // before anything of this pass is written (identities included), one joining only
        // after its objects are in the store.
        let filter = NamespaceFilter {
            default_global: self.default_global,
            exceptions: loaded
                .objects
                .namespaces
                .values()
                .filter(|n| n.global.is_some_and(|g| g != self.default_global))
                .map(|n| n.name.clone())
                .collect(),
            since: 0,
        };
        let narrowest = match &*self.namespaces.borrow() {
            Some(current) => current.narrowest(&filter),
            None => filter.clone(),
        };
        self.publish_filter(narrowest).await?;
        let desired = DesiredState::compute(&self.cluster, self.id, &loaded.objects);
        let max = self.max_object_bytes;
        // Objects the limits refuse: reported; the store keeps its version of each.
        let mut refused: Vec<crate::source::SourceProblem> = Vec::new();
        for labels in desired.label_sets() {
            let bytes = labels.to_kvstore_string().len();
            if bytes > max {
                refused.push(crate::source::SourceProblem {
                    origin: format!("identity labels {}", abbreviate(&labels.to_string())),
                    reason: format!(
                        "{bytes} bytes, more than limits.maxObjectBytes ({max}): no identity; its pods get no ipcache entry"
                    ),
                });
                continue;
            }
            self.allocator.allocate(labels).await?;
        }
        let (ipcache, duplicates) = desired.ipcache(&loaded.objects, self.allocator.identities());
        refused.extend(duplicates);
        let mut kv = writer::encode(&self.cluster, &desired, &ipcache, &filter)?;
        let oversized: BTreeSet<String> = kv
            .iter()
            .filter(|(_, v)| v.len() > max)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &oversized {
            let bytes = kv.remove(key).map_or(0, |v| v.len());
            refused.push(crate::source::SourceProblem {
                origin: key.clone(),
                reason: format!(
                    "{bytes} bytes encoded, more than limits.maxObjectBytes ({max}): not written, the stored version (if any) is kept"
                ),
            });
        }
        let stats = {
            use tracing::Instrument as _;
            let write = clustermesh_telemetry::child!(&tracing::Span::current(), "kvstore write");
            let origin = Arc::new(clustermesh_telemetry::Origin {
                unix_nanos: origin_nanos,
                trace: clustermesh_telemetry::Trace::of(&write),
            });
            self.writer
                .apply(&kv, &oversized, &origin)
                .instrument(write)
                .await?
        };
        for (key, reason) in &stats.refused {
            refused.push(crate::source::SourceProblem {
                origin: key.clone(),
                reason: format!(
                    "the store refused it ({reason}): the stored version (if any) is kept"
                ),
            });
        }
        let problems: Vec<_> = loaded
            .problems
            .iter()
            .chain(&desired.problems)
            .chain(&refused)
            .collect();
        for p in &problems {
            tracing::warn!(origin = %p.origin, reason = %p.reason, "source object not used");
        }
        let mut notes = std::collections::BTreeMap::new();
        for ((ns, name), policy) in &loaded.objects.policies {
            if policy.notes.is_empty() {
                continue;
            }
            let key = match ns {
                Some(ns) => format!("{ns}/{name}"),
                None => name.clone(),
            };
            for note in &policy.notes {
                tracing::warn!(policy = %key, %note, "policy part not enforced as written");
            }
            notes.insert(key, policy.notes.clone());
        }
        self.metrics.set_policy_notes(notes);
        self.metrics
            .source_problems
            .set(i64::try_from(problems.len()).unwrap_or(i64::MAX));
        self.publish_filter(filter).await?;
        self.metrics
            .store_writes
            .inc_by(u64::try_from(stats.put + stats.deleted).unwrap_or(u64::MAX));
        self.metrics
            .services
            .set(i64::try_from(desired.services.len()).unwrap_or(i64::MAX));
        self.metrics.global_services.set(
            i64::try_from(
                desired
                    .services
                    .iter()
                    .filter(|s| s.include_external)
                    .count(),
            )
            .unwrap_or(i64::MAX),
        );
        tracing::info!(
            put = stats.put,
            deleted = stats.deleted,
            problems = problems.len(),
            "applied the source"
        );
        Ok(desired.label_sets().into_iter().cloned().collect())
    }
}

#[cfg(test)]
mod dir_input_tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a panic is the failure report"
    )]

    use std::sync::atomic::{AtomicU8, Ordering};

    use clustermesh_kvstore::{
        CasOutcome, CreateOutcome, Error, KeyValue, LeaseId, Listing, Result, Revision, TxnLimits,
        WatchStream, Write,
    };

    use super::*;

    const OK: u8 = 0;
    const DOWN: u8 = 1;
    const TOO_LARGE: u8 = 2;

    /// The embedded store, whose puts fail while `fail` says so: as a store that is down, or
    /// as one that refuses the value as too large.
    struct Flaky {
        inner: SledStore,
        fail: AtomicU8,
    }

    #[async_trait::async_trait]
    impl KvStore for Flaky {
        async fn current_revision(&self) -> Result<Revision> {
            self.inner.current_revision().await
        }
        async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Listing> {
            self.inner.list(prefix).await
        }
        async fn list_at(&self, prefix: &str, revision: Revision) -> Result<Listing> {
            self.inner.list_at(prefix, revision).await
        }
        async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
            match self.fail.load(Ordering::SeqCst) {
                DOWN => Err(Error::UnexpectedResponse("the store is down".into())),
                TOO_LARGE => Err(Error::TooLarge(key.into())),
                _ => self.inner.put(key, value, lease).await,
            }
        }
        async fn delete(&self, key: &str) -> Result<Option<Revision>> {
            self.inner.delete(key).await
        }
        async fn create(
            &self,
            key: &str,
            value: &[u8],
            lease: Option<LeaseId>,
        ) -> Result<CreateOutcome> {
            self.inner.create(key, value, lease).await
        }
        async fn compare_and_swap(
            &self,
            key: &str,
            expected: Revision,
            value: &[u8],
            lease: Option<LeaseId>,
        ) -> Result<CasOutcome> {
            self.inner
                .compare_and_swap(key, expected, value, lease)
                .await
        }
        async fn compare_and_delete(&self, key: &str, expected: Revision) -> Result<CasOutcome> {
            self.inner.compare_and_delete(key, expected).await
        }
        async fn apply(&self, writes: &[Write]) -> Result<Option<Revision>> {
            self.inner.apply(writes).await
        }
        fn txn_limits(&self) -> TxnLimits {
            self.inner.txn_limits()
        }
        async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
            self.inner.revoke_lease(lease).await
        }
        async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
            self.inner.watch(prefix, after).await
        }
        async fn compact(&self, revision: Revision) -> Result<()> {
            self.inner.compact(revision).await
        }
    }

    fn namespace(name: &str) -> String {
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
    }

    async fn saved(store: &dyn KvStore) -> Option<String> {
        let kv = store
            .get(&format!("{MANIFEST_LAST_GOOD_PREFIX}a.yaml"))
            .await
            .unwrap()?;
        Some(String::from_utf8(kv.value).unwrap())
    }

    /// Reads until the directory's state is handed out (the watch may need a moment).
    async fn read_changed(input: &mut DirInput) {
        for _ in 0..100 {
            if input.read().await.unwrap().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the change was never read");
    }

    #[tokio::test]
    async fn a_copy_the_store_failed_to_save_keeps_the_older_one_and_is_saved_later() {
        let dir = tempfile::tempdir().unwrap();
        let store = Flaky {
            inner: SledStore::open(&SledConfig::new(dir.path().join("store"))).unwrap(),
            fail: AtomicU8::new(OK),
        };
        let manifests = dir.path().join("m");
        std::fs::create_dir(&manifests).unwrap();
        std::fs::write(manifests.join("a.yaml"), namespace("one")).unwrap();
        let mut input = DirInput::new(manifest::ManifestDir::new(&manifests));
        read_changed(&mut input).await;
        input.save(&store).await.unwrap();
        assert_eq!(saved(&store).await, Some(namespace("one")));

        // The store is down: the older copy stays, and the new one is saved once it is back.
        std::fs::write(manifests.join("a.yaml"), namespace("two")).unwrap();
        read_changed(&mut input).await;
        store.fail.store(DOWN, Ordering::SeqCst);
        assert!(input.save(&store).await.is_err());
        assert_eq!(saved(&store).await, Some(namespace("one")));
        store.fail.store(OK, Ordering::SeqCst);
        input.save(&store).await.unwrap();
        assert_eq!(saved(&store).await, Some(namespace("two")));

        // The store refuses the copy itself: the older copy goes (it must not come back after
        // a restart), and nothing is left to retry.
        std::fs::write(manifests.join("a.yaml"), namespace("three")).unwrap();
        read_changed(&mut input).await;
        store.fail.store(TOO_LARGE, Ordering::SeqCst);
        input.save(&store).await.unwrap();
        assert_eq!(saved(&store).await, None);
        assert!(input.unsaved.is_empty());
    }

    #[tokio::test]
    async fn a_directory_watched_late_is_read_in_full_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let manifests = dir.path().join("m");
        let mut input = DirInput::new(manifest::ManifestDir::new(&manifests));
        // Missing: not watched, and its read fails (the state is kept).
        assert!(input.read().await.unwrap().is_none());
        assert!(input.watch.is_none());
        assert!(input.watch_error.is_some());
        // It appears with a file, between the read and the next try to watch it.
        std::fs::create_dir(&manifests).unwrap();
        std::fs::write(manifests.join("a.yaml"), namespace("one")).unwrap();
        tokio::time::sleep(WATCH_RETRY_MIN + Duration::from_millis(100)).await;
        // The pass that sets the watch up reads the file, not one 30 s later.
        let loaded = input.read().await.unwrap().expect("read in full at once");
        assert!(input.watch.is_some());
        assert_eq!(loaded.objects.namespaces.len(), 1, "{loaded:?}");
    }

    #[tokio::test]
    async fn a_failed_watch_is_tried_again_with_a_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut input = DirInput::new(manifest::ManifestDir::new(&dir.path().join("m")));
        input.read().await.unwrap();
        let (first, wait) = input.watch_retry;
        assert_eq!(wait, WATCH_RETRY_MIN * 2);
        let first = first.expect("a retry time");
        // Passes before the retry time do not try again.
        input.read().await.unwrap();
        assert_eq!(input.watch_retry.0, Some(first));
        tokio::time::sleep(WATCH_RETRY_MIN + Duration::from_millis(50)).await;
        input.read().await.unwrap();
        assert_eq!(input.watch_retry.1, WATCH_RETRY_MIN * 4);
    }
}
