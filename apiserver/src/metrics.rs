//! Prometheus metrics of the apiserver and the plain-HTTP health endpoints: `/healthz` (the
//! process runs), `/readyz` (the first sync of the source into the store is done and the
//! store answers), `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// What the last probes of the kvstore found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreHealth {
    /// The last probe got an answer in time.
    pub healthy: bool,
    /// Why it did not.
    pub error: Option<String>,
    /// Since when (Unix seconds) the store has been in this state.
    pub since: u64,
}

fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The apiserver's metrics.
pub struct Metrics {
    registry: Registry,
    ready: AtomicBool,
    store_health: parking_lot::Mutex<StoreHealth>,
    /// 1 while the kvstore answers its probes.
    pub kvstore_healthy: Gauge,
    /// Probes of the kvstore that failed or timed out.
    pub kvstore_probe_failures: Counter,
    /// This cluster's name and ID, for `/status`.
    cluster: std::sync::OnceLock<(String, u16)>,
    /// Source documents that could not be used, per load.
    pub source_problems: Gauge,
    /// Keys written (put or deleted) into the store.
    pub store_writes: Counter,
    /// Identities this cluster holds.
    pub identities: Gauge,
    /// Services written.
    pub services: Gauge,
    /// Global services written.
    pub global_services: Gauge,
    /// Export watch streams open now.
    pub export_watchers: Gauge,
    /// Watchers reset because they fell behind.
    pub export_resets: Counter,
    /// Stored values skipped by the Export server because they did not decode.
    pub export_undecodable: Counter,
    /// Requests with a `remote-` certificate of a cluster that is not connected.
    pub export_refused: Counter,
    /// Stored values the Export server did not send because they exceed
    /// `limits.maxObjectBytes`.
    pub export_oversized: Counter,
    /// Watch requests refused because the remote had `exportMaxStreamsPerRemote` open.
    pub export_streams_refused: Counter,
    /// Policies of the last load with parts not enforced as written.
    pub policies_not_as_written: Gauge,
    /// Those policies (`namespace/name`, a clusterwide one by its name) and their notes, for
    /// `/status`.
    policy_notes: parking_lot::Mutex<std::collections::BTreeMap<String, Vec<String>>>,
    /// Seconds from a remote change's origin until it is in this cluster's cache, per remote.
    pub propagation: PropagationHistogram,
    /// When the apiserver started (Unix seconds).
    started_unix: f64,
    /// Seconds from the start to the source's first sync.
    source_bootstrap: std::sync::OnceLock<f64>,
    /// Seconds from the start until every remote had its first snapshot imported.
    remotes_bootstrap: std::sync::OnceLock<f64>,
}

/// A histogram of propagation delays by `source_cluster`.
pub type PropagationHistogram = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// A new [`PropagationHistogram`] with the buckets of
/// [`clustermesh_telemetry::PROPAGATION_BUCKETS`].
pub fn propagation_histogram() -> PropagationHistogram {
    Family::new_with_constructor(|| {
        Histogram::new(clustermesh_telemetry::PROPAGATION_BUCKETS.iter().copied())
    })
}

impl Metrics {
    /// A registry with every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("clustermesh");
        let m = |r: &mut Registry, name: &str, help: &str, metric: Gauge| {
            r.register(name, help, metric.clone());
            metric
        };
        let c = |r: &mut Registry, name: &str, help: &str, metric: Counter| {
            r.register(name, help, metric.clone());
            metric
        };
        let source_problems = m(
            &mut registry,
            "source_problems",
            "Source documents that could not be used in the last load",
            Gauge::default(),
        );
        let store_writes = c(
            &mut registry,
            "apiserver_store_writes",
            "Keys put or deleted in the kvstore",
            Counter::default(),
        );
        let identities = m(
            &mut registry,
            "identities",
            "Identities allocated by this cluster",
            Gauge::default(),
        );
        let services = m(
            &mut registry,
            "services",
            "Services written by this cluster",
            Gauge::default(),
        );
        let global_services = m(
            &mut registry,
            "global_services",
            "Global services this apiserver wrote into the kvstore (the agents' programmed frontends are clustermesh_agent_service_frontends)",
            Gauge::default(),
        );
        let export_watchers = m(
            &mut registry,
            "export_watchers",
            "Open Export watch streams",
            Gauge::default(),
        );
        let export_resets = c(
            &mut registry,
            "export_resets",
            "Export watchers reset because they fell behind",
            Counter::default(),
        );
        let export_undecodable = c(
            &mut registry,
            "export_undecodable_values",
            "Stored values the Export server skipped",
            Counter::default(),
        );
        let export_refused = c(
            &mut registry,
            "export_refused_remotes",
            "Export requests refused: a remote certificate of a cluster that is not connected",
            Counter::default(),
        );
        let export_oversized = c(
            &mut registry,
            "export_oversized_values",
            "Stored values the Export server did not send: larger than limits.maxObjectBytes",
            Counter::default(),
        );
        let kvstore_healthy = m(
            &mut registry,
            "kvstore_healthy",
            "1 while the kvstore answers its probes (every second, 3 s to answer), 0 while it does not (etcd without quorum, unreachable)",
            Gauge::default(),
        );
        kvstore_healthy.set(1);
        let kvstore_probe_failures = c(
            &mut registry,
            "kvstore_probe_failures",
            "Probes of the kvstore that failed or timed out",
            Counter::default(),
        );
        let export_streams_refused = c(
            &mut registry,
            "export_streams_refused",
            "Export watch requests refused: the remote already had exportMaxStreamsPerRemote streams open",
            Counter::default(),
        );
        registry.register(
            "build",
            "This build of clustermesh (version) and the process (component)",
            prometheus_client::metrics::info::Info::new(clustermesh_telemetry::build::info_labels(
                "apiserver",
            )),
        );
        let policies_not_as_written = m(
            &mut registry,
            "policies_not_enforced_as_written",
            "Policies of the last load with parts the datapath does not enforce as written (each translated to fail closed; /status lists the notes)",
            Gauge::default(),
        );
        let propagation = propagation_histogram();
        registry.register_with_unit(
            "apiserver_propagation",
            "Seconds from a change's origin (applied by the source of its cluster) until it is in this cluster's cache, per source cluster: the delay of cross-cluster sync (clocks of both clusters count)",
            prometheus_client::registry::Unit::Seconds,
            propagation.clone(),
        );
        Self {
            registry,
            ready: AtomicBool::new(false),
            store_health: parking_lot::Mutex::new(StoreHealth {
                healthy: true,
                error: None,
                since: unix_now(),
            }),
            kvstore_healthy,
            kvstore_probe_failures,
            cluster: std::sync::OnceLock::new(),
            source_problems,
            store_writes,
            identities,
            services,
            global_services,
            export_watchers,
            export_resets,
            export_undecodable,
            export_refused,
            export_oversized,
            export_streams_refused,
            policies_not_as_written,
            policy_notes: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
            propagation,
            started_unix: unix_now_f64(),
            source_bootstrap: std::sync::OnceLock::new(),
            remotes_bootstrap: std::sync::OnceLock::new(),
        }
    }

    /// Records the policies of the last load that have notes (parts not enforced as written).
    pub fn set_policy_notes(&self, notes: std::collections::BTreeMap<String, Vec<String>>) {
        self.policies_not_as_written
            .set(i64::try_from(notes.len()).unwrap_or(i64::MAX));
        *self.policy_notes.lock() = notes;
    }

    /// The policies with notes, as recorded.
    pub fn policy_notes(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        self.policy_notes.lock().clone()
    }

    /// Marks the apiserver ready.
    pub fn set_ready(&self) {
        let _ = self
            .source_bootstrap
            .set((unix_now_f64() - self.started_unix).max(0.0));
        self.ready.store(true, Ordering::Release);
    }

    /// Seconds from the start until every remote of `statuses` had its first snapshot
    /// imported: known (and kept) once they all have.
    fn remotes_bootstrap(
        &self,
        statuses: &[clustermesh_sync::worker::RemoteStatus],
    ) -> Option<f64> {
        if let Some(b) = self.remotes_bootstrap.get() {
            return Some(*b);
        }
        // No remote yet: nothing to bootstrap (absent, not 0, so that remotes added later
        // are measured).
        if statuses.is_empty() {
            return None;
        }
        let mut last = self.started_unix;
        for s in statuses {
            last = last.max(s.first_import_unix?);
        }
        Some(
            *self
                .remotes_bootstrap
                .get_or_init(|| last - self.started_unix),
        )
    }

    /// Whether the apiserver is ready: the first sync is done and the store answers.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.store_health.lock().healthy
    }

    /// Whether the first sync of the source is done.
    pub fn is_synced(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The kvstore's health.
    pub fn store_health(&self) -> StoreHealth {
        self.store_health.lock().clone()
    }

    /// Records a probe of the kvstore; returns the new health when it changed.
    pub fn record_store_probe(&self, result: Result<(), String>) -> Option<StoreHealth> {
        let mut h = self.store_health.lock();
        match result {
            Ok(()) => {
                self.kvstore_healthy.set(1);
                if h.healthy {
                    return None;
                }
                *h = StoreHealth {
                    healthy: true,
                    error: None,
                    since: unix_now(),
                };
            }
            Err(e) => {
                self.kvstore_healthy.set(0);
                self.kvstore_probe_failures.inc();
                if !h.healthy {
                    h.error = Some(e);
                    return None;
                }
                *h = StoreHealth {
                    healthy: false,
                    error: Some(e),
                    since: unix_now(),
                };
            }
        }
        Some(h.clone())
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What `/status` reports for each remote cluster.
pub type RemoteStatuses =
    Arc<dyn Fn() -> Vec<clustermesh_sync::worker::RemoteStatus> + Send + Sync>;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    remotes: RemoteStatuses,
}

impl axum::extract::FromRef<AppState> for Arc<Metrics> {
    fn from_ref(s: &AppState) -> Self {
        Arc::clone(&s.metrics)
    }
}

/// Appends one family (HELP, TYPE, UNIT when given) and its samples (`suffix{labels} value`).
/// A family without samples is left out, as the registry leaves out its own.
fn family(
    out: &mut String,
    (name, kind, unit, help): (&str, &str, &str, &str),
    samples: &[(&str, String, String)],
) {
    if samples.is_empty() {
        return;
    }
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    if !unit.is_empty() {
        out.push_str(&format!("# UNIT {name} {unit}\n"));
    }
    for (suffix, labels, value) in samples {
        if labels.is_empty() {
            out.push_str(&format!("{name}{suffix} {value}\n"));
        } else {
            out.push_str(&format!("{name}{suffix}{{{labels}}} {value}\n"));
        }
    }
}

/// Per-remote metrics, rendered from the workers' statuses: Cilium's KVStoreMesh names, types
/// and labels for what KVStoreMesh reports (docs/OBSERVABILITY.md), ours for the rest.
fn remote_metrics(metrics: &Metrics, remotes: &RemoteStatuses) -> String {
    let mut out = String::new();
    let statuses = remotes();
    let target =
        |s: &clustermesh_sync::worker::RemoteStatus| format!("target_cluster=\"{}\"", s.name);
    let per_remote = |value: &dyn Fn(&clustermesh_sync::worker::RemoteStatus) -> String| {
        statuses
            .iter()
            .map(|s| ("", target(s), value(s)))
            .collect::<Vec<_>>()
    };
    family(
        &mut out,
        (
            "cilium_kvstoremesh_remote_clusters",
            "gauge",
            "",
            "The total number of remote clusters meshed with the local cluster",
        ),
        &[("", String::new(), statuses.len().to_string())],
    );
    family(
        &mut out,
        (
            "cilium_kvstoremesh_remote_cluster_readiness_status",
            "gauge",
            "",
            "The readiness status of the remote cluster (1: connected and its snapshot imported, 0: not)",
        ),
        &per_remote(&|s| u8::from(s.ready).to_string()),
    );
    family(
        &mut out,
        (
            "cilium_kvstoremesh_remote_cluster_failures",
            "gauge",
            "",
            "The total number of failures related to the remote cluster (failed connections, broken or refused sessions)",
        ),
        &per_remote(&|s| s.failures.to_string()),
    );
    family(
        &mut out,
        (
            "cilium_kvstoremesh_remote_cluster_last_failure_ts",
            "gauge",
            "",
            "The timestamp of the last failure of the remote cluster (Unix seconds; 0: none yet)",
        ),
        &per_remote(&|s| s.last_failure_time.unwrap_or(0).to_string()),
    );
    family(
        &mut out,
        (
            "cilium_clustermesh_apiserver_bootstrap_seconds",
            "gauge",
            "",
            "Duration in seconds to complete bootstrap: from the start of the apiserver until the first sync of its source into the store (absent until then)",
        ),
        &metrics
            .source_bootstrap
            .get()
            .map(|b| vec![("", String::new(), format!("{b:.3}"))])
            .unwrap_or_default(),
    );
    let bootstrap = metrics.remotes_bootstrap(&statuses);
    family(
        &mut out,
        (
            "cilium_kvstoremesh_bootstrap_seconds",
            "gauge",
            "",
            "Duration in seconds to complete bootstrap: from the start of the apiserver until every remote configured then had its first snapshot imported (absent until then)",
        ),
        &bootstrap
            .map(|b| vec![("", String::new(), format!("{b:.3}"))])
            .unwrap_or_default(),
    );
    let mut queue = Vec::new();
    let mut completed = Vec::new();
    let mut errors = Vec::new();
    for s in &statuses {
        for kind in ["identities", "ip", "nodes", "services"] {
            let scope = format!("scope=\"{kind}/v1\",source_cluster=\"{}\"", s.name);
            queue.push((
                "",
                scope.clone(),
                s.staged.get(kind).copied().unwrap_or(0).to_string(),
            ));
            completed.push((
                "",
                format!("{scope},action=\"write\""),
                u8::from(s.imported).to_string(),
            ));
        }
        errors.push((
            "_total",
            format!("scope=\"cache\",source_cluster=\"{}\"", s.name),
            s.store_errors.to_string(),
        ));
    }
    family(
        &mut out,
        (
            "cilium_kvstoremesh_kvstore_sync_queue_size",
            "gauge",
            "",
            "Number of elements queued for synchronization in the kvstore: objects of a remote's snapshot staged before they are written in one transaction",
        ),
        &queue,
    );
    family(
        &mut out,
        (
            "cilium_kvstoremesh_kvstore_initial_sync_completed",
            "gauge",
            "",
            "Whether the initial synchronization from/to the kvstore has completed: a remote's first snapshot is in this cluster's store",
        ),
        &completed,
    );
    family(
        &mut out,
        (
            "cilium_kvstoremesh_kvstore_sync_errors",
            "counter",
            "",
            "Number of times synchronization to the kvstore failed: import sessions ended because writing a remote's cache failed",
        ),
        &errors,
    );
    family(
        &mut out,
        (
            "clustermesh_remote_cluster_last_message_seconds",
            "gauge",
            "seconds",
            "Seconds since the last message of the remote cluster",
        ),
        &per_remote(&|s| format!("{:.3}", s.seconds_since_last_message)),
    );
    family(
        &mut out,
        (
            "clustermesh_remote_quota_exceeded",
            "gauge",
            "",
            "1 while a remote's import is stopped because it crossed a quota",
        ),
        &per_remote(&|s| u8::from(s.quota_exceeded.is_some()).to_string()),
    );
    family(
        &mut out,
        (
            "clustermesh_remote_quota_stops",
            "counter",
            "",
            "Imports stopped because the remote crossed a quota",
        ),
        &statuses
            .iter()
            .map(|s| ("_total", target(s), s.quota_stops.to_string()))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        (
            "clustermesh_remote_cache_bytes",
            "gauge",
            "bytes",
            "Bytes of keys and values a remote has in this cluster's store",
        ),
        &per_remote(&|s| s.bytes.to_string()),
    );
    let mut objects = Vec::new();
    for s in &statuses {
        for (kind, n) in &s.counts {
            objects.push(("", format!("{},kind=\"{kind}\"", target(s)), n.to_string()));
        }
    }
    family(
        &mut out,
        (
            "clustermesh_remote_cluster_objects",
            "gauge",
            "",
            "Objects of the remote cluster in this cluster's cache, by kind (identities, ip, nodes, services)",
        ),
        &objects,
    );
    let mut rejected = Vec::new();
    for s in &statuses {
        for (kind_reason, n) in &s.rejected {
            let (kind, reason) = kind_reason
                .split_once('/')
                .unwrap_or((kind_reason.as_str(), ""));
            rejected.push((
                "_total",
                format!("{},kind=\"{kind}\",reason=\"{reason}\"", target(s)),
                n.to_string(),
            ));
        }
    }
    family(
        &mut out,
        (
            "clustermesh_sync_rejected",
            "counter",
            "",
            "Objects of the remote cluster that the import refused, by kind and reason",
        ),
        &rejected,
    );
    out
}

impl Metrics {
    /// Names the cluster in `/status` (once).
    pub fn set_cluster(&self, name: &str, id: u16) {
        let _ = self.cluster.set((name.to_owned(), id));
    }
}

/// The health, status and metrics routes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    router_with_remotes(metrics, Arc::new(Vec::new))
}

/// [`router`] with `/status` and per-remote metrics for the given sync workers.
pub fn router_with_remotes(metrics: Arc<Metrics>, remotes: RemoteStatuses) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                let store = m.store_health();
                if !store.healthy {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "not ready: the kvstore is unavailable since unix time {}: {}\n",
                            store.since,
                            store.error.unwrap_or_default()
                        ),
                    )
                } else if m.is_synced() {
                    (StatusCode::OK, "ready\n".to_owned())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: the first sync is not done\n".to_owned(),
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(
                |State(s): State<AppState>, headers: axum::http::HeaderMap| async move {
                    let mut text = s.metrics.render();
                    // The registry ends with "# EOF"; the other series go before it.
                    let eof = text.rfind("# EOF").unwrap_or(text.len());
                    let mut extra = remote_metrics(&s.metrics, &s.remotes);
                    extra.push_str(&clustermesh_telemetry::process::render());
                    text.insert_str(eof, &extra);
                    let accept = headers.get("accept").and_then(|v| v.to_str().ok());
                    let (content_type, body) =
                        clustermesh_telemetry::exposition::negotiate(accept, text);
                    ([("content-type", content_type)], body)
                },
            ),
        )
        .route(
            "/status",
            get(|State(s): State<AppState>| async move {
                let statuses = (s.remotes)();
                (
                    [("content-type", "application/json")],
                    serde_json::json!({
                        "cluster": s.metrics.cluster.get().map(|c| c.0.clone()),
                        "id": s.metrics.cluster.get().map(|c| c.1),
                        "ready": s.metrics.is_ready(),
                        "store": s.metrics.store_health(),
                        "remotes": statuses,
                        "policiesNotEnforcedAsWritten": s.metrics.policy_notes(),
                    })
                    .to_string(),
                )
            }),
        )
        .with_state(AppState { metrics, remotes })
}

/// Serves [`router_with_remotes`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    remotes: RemoteStatuses,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router_with_remotes(metrics, remotes))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The address a listener is bound to, for logs.
pub fn bound(listener: &tokio::net::TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
