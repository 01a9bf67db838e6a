//! The agent's runtime: one Export watch to the local apiserver (with the `local-<cluster>`
//! certificate), the view, the desired state, the reconciler, and local endpoints' program
//! attachment.
//!
//! Start-up without disruption: the datapath adopts the pinned maps and links; the first
//! snapshot is staged in a fresh view and nothing is written until `Synced`; then one full
//! pass writes what changed and prunes what is gone. A `Reset` stages a new snapshot the same
//! way. A broken stream resumes from the last revision applied.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use clustermesh_bpf::{Datapath, KernelConfig, KernelDatapath, UserspaceDatapath};
use clustermesh_model::cluster::{ClusterId, ClusterName, MaxConnectedClusters};
use clustermesh_proto::Object;
use clustermesh_proto::client::{ClientTls, connect, server_name};
use clustermesh_proto::v1::{self, watch_event::Event as Ev};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admin::{self, Metrics};
use crate::attach::{InterfacePolicy, default_devices, endpoint_interface};
use crate::config::{Config, DatapathKind};
use crate::desired::Desired;
use crate::reconcile::{Reconciler, Scope};
use crate::view::{Dirty, View, delete_ref};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A TLS file could not be read.
    #[error("reading {path} failed")]
    Tls {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot be used.
    #[error("{0}")]
    Config(String),
    /// A filesystem the eBPF datapath needs is not mounted and could not be.
    #[error("{0}")]
    Mount(String),
    /// The datapath could not be loaded or attached.
    #[error("the datapath failed to start")]
    Datapath(#[from] clustermesh_bpf::Error),
    /// The admin or metrics listener could not bind.
    #[error("binding the listener {addr} failed")]
    Admin {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How a local endpoint's programs are attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attachment {
    /// Its host-side interface, once found.
    pub interface: Option<String>,
    /// Why it is not attached, if it is not.
    pub error: Option<String>,
}

/// What the admin endpoint shows.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The local cluster.
    pub cluster: String,
    /// This node.
    pub node: String,
    /// `bpf` or `userspace`.
    pub datapath: &'static str,
    /// The watch to the local apiserver is up.
    pub connected: bool,
    /// The first snapshot was applied (the agent is ready).
    pub synced: bool,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Frontends (`vip:port/proto`) the datapath refused, with why: not in the maps as the
    /// view wants them.
    pub datapath_errors: BTreeMap<String, String>,
    /// Connection failures so far.
    pub failures: u64,
    /// Reconcile passes so far.
    pub reconciles: u64,
    /// Entries in the maps: services, backends, ipcache, endpoints, policy.
    pub maps: BTreeMap<&'static str, usize>,
    /// Objects in the view.
    pub view: BTreeMap<&'static str, usize>,
    /// Remote clusters as the local apiserver reports them.
    pub clusters: Vec<clustermesh_model::cluster::ClusterStatus>,
    /// Local endpoints' program attachment (eBPF datapath).
    pub endpoints: BTreeMap<Ipv4Addr, Attachment>,
    /// Objects from the stream that were refused.
    pub rejected: u64,
    /// The policies (`namespace/name`) the datapath enforces: those of the view at the last
    /// pass that wrote the maps without error (what `connectivity test` waits for).
    pub policies: Vec<String>,
    /// This node's addresses (from its Node object).
    pub node_addresses: Vec<IpAddr>,
}

/// State shared with the admin endpoint.
pub struct Shared {
    /// The view (after the first `Synced`).
    pub view: Mutex<Option<View>>,
    /// The desired state.
    pub desired: Mutex<Desired>,
    /// Status.
    pub status: Mutex<AgentStatus>,
    /// Metrics.
    pub metrics: Metrics,
    /// The datapath (for `/maps`).
    pub datapath: Arc<dyn Datapath>,
    /// Verdict events as flows (eBPF datapath only), for `/events`.
    pub events: Option<tokio::sync::broadcast::Sender<Arc<crate::flows::Flow>>>,
    /// The kernel datapath (eBPF only), for what outlier detection recorded.
    pub kernel: Option<Arc<KernelDatapath>>,
    /// Rule IDs and the rules they name, as of the last pass (verdict events name their
    /// rule from it without waiting for a pass that holds `desired`).
    pub rule_names: Mutex<Arc<BTreeMap<u32, String>>>,
    /// Cluster names by ID, as of the last pass (for verdict events).
    pub cluster_names: Mutex<Arc<BTreeMap<u16, String>>>,
    /// The recent flows (eBPF datapath), for `/events?last=N` and `?since=`.
    pub recent: Mutex<crate::flows::Recent>,
}

/// A running agent.
pub struct Running {
    /// The admin listener's address.
    pub admin_addr: std::net::SocketAddr,
    /// The metrics listener's address, when `metrics` is configured.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Shared state.
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
    metrics_task: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops the agent. The maps and links stay pinned (traffic keeps flowing).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.admin_task.abort();
        if let Some(t) = self.metrics_task {
            t.abort();
        }
    }
}

fn read(path: &std::path::Path) -> Result<String, StartError> {
    std::fs::read_to_string(path).map_err(|source| StartError::Tls {
        path: path.display().to_string(),
        source,
    })
}

/// The datapath and, for eBPF, the handle that attaches endpoint programs.
struct Plane {
    dp: Arc<dyn Datapath>,
    kernel: Option<Arc<KernelDatapath>>,
    endpoint_netns: Option<PathBuf>,
    interfaces: InterfacePolicy,
}

/// Starts the agent.
pub async fn start(config: Config, kind: DatapathKind) -> Result<Running, StartError> {
    let tls = ClientTls {
        ca_pem: read(&config.apiserver.ca)?,
        cert_pem: read(&config.apiserver.cert)?,
        key_pem: read(&config.apiserver.key)?,
        server_name: server_name(config.cluster.as_str()),
    };
    tracing::info!(
        cluster = %config.cluster,
        node = %config.node_name,
        datapath = ?kind,
        apiserver = %config.apiserver.address,
        "agent starting"
    );
    let plane = match kind {
        DatapathKind::Bpf => {
            crate::mounts::ensure_bpffs(&config.bpf.root).map_err(StartError::Mount)?;
            crate::mounts::ensure_cgroup2(&config.bpf.cgroup).map_err(StartError::Mount)?;
            let k = Arc::new(KernelDatapath::load(&KernelConfig {
                bpf_root: config.bpf.root.clone(),
                cluster: config.cluster.to_string(),
                node: config.node_name.clone(),
            })?);
            k.set_outlier_detection(&config.bpf.outlier_detection.settings())?;
            k.attach_cgroup(&config.bpf.cgroup)?;
            Plane {
                dp: Arc::clone(&k) as Arc<dyn Datapath>,
                kernel: Some(k),
                endpoint_netns: config.bpf.endpoint_netns.clone(),
                interfaces: InterfacePolicy::new(&config.bpf.endpoint_interfaces)
                    .map_err(StartError::Config)?,
            }
        }
        DatapathKind::Userspace => Plane {
            dp: Arc::new(UserspaceDatapath::new()),
            kernel: None,
            endpoint_netns: None,
            interfaces: InterfacePolicy::default(),
        },
    };
    let reconciler = Reconciler::adopt(Arc::clone(&plane.dp))?;
    let metrics = Metrics::new();
    let (events, stream) = match &plane.kernel {
        Some(k) => {
            let stream = k.events()?;
            let (tx, _) = tokio::sync::broadcast::channel(4096);
            (Some(tx), Some(stream))
        }
        None => (None, None),
    };
    let shared = Arc::new(Shared {
        datapath: Arc::clone(&plane.dp),
        kernel: plane.kernel.clone(),
        events,
        view: Mutex::new(None),
        desired: Mutex::new(Desired::default()),
        rule_names: Mutex::new(Arc::default()),
        cluster_names: Mutex::new(Arc::default()),
        recent: Mutex::new(crate::flows::Recent::default()),
        status: Mutex::new(AgentStatus {
            cluster: config.cluster.to_string(),
            node: config.node_name.clone(),
            datapath: match kind {
                DatapathKind::Bpf => "bpf",
                DatapathKind::Userspace => "userspace",
            },
            ..AgentStatus::default()
        }),
        metrics,
    });
    if let (Some(stream), Some(tx)) = (stream, &shared.events) {
        tokio::spawn(forward_events(stream, tx.clone(), Arc::clone(&shared)));
    }
    let listener = tokio::net::TcpListener::bind(&config.admin)
        .await
        .map_err(|source| StartError::Admin {
            addr: config.admin.clone(),
            source,
        })?;
    let admin_addr = listener.local_addr().map_err(|source| StartError::Admin {
        addr: config.admin.clone(),
        source,
    })?;
    let metrics_listener = match &config.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Admin {
                    addr: addr.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let router = admin::router(Arc::clone(&shared));
    let metrics_router = admin::metrics_router(Arc::clone(&shared));
    let admin_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "the admin listener failed");
        }
    });
    // The metrics port serves only /metrics (and /healthz), for a scraper on the network; the
    // admin port, with status, explanations and flows, stays local.
    let metrics_task = metrics_listener.map(|m| {
        tokio::spawn(async move {
            if let Err(e) = axum::serve(m, metrics_router).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        })
    });
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(
        config,
        tls,
        plane,
        reconciler,
        Arc::clone(&shared),
        stop_rx,
    ));
    Ok(Running {
        admin_addr,
        metrics_addr,
        shared,
        stop,
        task,
        admin_task,
        metrics_task,
    })
}

/// Removes an endpoint's programs from `ifname` (its pinned links).
fn detach(kernel: &KernelDatapath, ip: Ipv4Addr, ifname: &str) {
    match kernel.detach_endpoint(ifname) {
        Ok(()) => tracing::info!(%ip, interface = %ifname, "policy programs detached"),
        Err(e) => tracing::warn!(%ip, %ifname, error = %e, "detaching an endpoint failed"),
    }
}

/// Forwards the datapath's verdict events to `/events` subscribers as JSON lines (a policy
/// verdict with the name of the rule that decided it, `ruleName`), and counts outlier
/// detection's ejections.
async fn forward_events(
    stream: clustermesh_bpf::EventStream,
    tx: tokio::sync::broadcast::Sender<Arc<crate::flows::Flow>>,
    shared: Arc<Shared>,
) {
    use futures::StreamExt;
    let mut stream = std::pin::pin!(stream.into_stream());
    let node = shared.status.lock().node.clone();
    while let Some(e) = stream.next().await {
        shared.metrics.outlier.count(&e);
        let now = std::time::SystemTime::now();
        let policy_verdict = matches!(
            e.verdict,
            clustermesh_bpf::EventVerdict::Allowed
                | clustermesh_bpf::EventVerdict::Denied
                | clustermesh_bpf::EventVerdict::Audited
        );
        let clusters = Arc::clone(&shared.cluster_names.lock());
        // Rule 0: no rule matched (default deny) or conntrack let a reply through.
        let rule = (policy_verdict && e.rule_id != 0)
            .then(|| {
                let names = Arc::clone(&shared.rule_names.lock());
                names.get(&e.rule_id).cloned()
            })
            .flatten();
        // The pods' names from the view, unless a pass holds it: an event never waits for a
        // reconcile.
        let (src_pod, dst_pod) = match shared.view.try_lock() {
            Some(view) => {
                let pod = |ip: Ipv4Addr| {
                    view.as_ref()
                        .and_then(|v| v.ipcache_entry(&IpAddr::V4(ip)))
                        .filter(|(_, e)| !e.pod_name.is_empty())
                        .map(|(_, e)| (e.namespace.clone(), e.pod_name.clone()))
                };
                (pod(e.src_ip), pod(e.dst_ip))
            }
            None => (None, None),
        };
        let names = crate::flows::Names {
            node: node.clone(),
            clusters: (*clusters).clone(),
            rule,
            src_pod,
            dst_pod,
        };
        let time = humantime::format_rfc3339_millis(now).to_string();
        let mut line = crate::flows::to_json(&e, &time, &names);
        // Outlier detection: the backend, the failed connects counted, and why.
        let outlier = match e.verdict {
            clustermesh_bpf::EventVerdict::Ejected if e.endpoint_id == 2 => {
                Some("ejected for a client: a connect unanswered for the window".to_owned())
            }
            clustermesh_bpf::EventVerdict::Ejected => Some(format!(
                "ejected for a client: {} failed connects",
                e.rule_id
            )),
            clustermesh_bpf::EventVerdict::Readmitted => {
                Some("a trial connection succeeded: selected again".to_owned())
            }
            _ => None,
        };
        if let (Some(what), Some(o)) = (outlier, line.as_object_mut()) {
            o.insert("outlier".to_owned(), what.into());
        }
        if policy_verdict {
            // A cluster not named yet is `unknown`, not its ID: one series per name.
            let cluster = |id: u16| {
                clusters
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| "unknown".to_owned())
            };
            shared
                .metrics
                .count_verdict(&e, cluster(e.src_cluster), cluster(e.dst_cluster));
        }
        let unix_ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let keys = crate::flows::keys(&e, &names);
        let flow = shared
            .recent
            .lock()
            .push(unix_ms, keys, Arc::from(format!("{line}\n")));
        // No subscriber is fine: the ring keeps the recent ones.
        let _ = tx.send(flow);
    }
}

/// The loop's state across sessions.
struct Loop {
    config: Config,
    plane: Plane,
    reconciler: Reconciler,
    shared: Arc<Shared>,
    /// The view being staged (before a `Synced`); the view in force is in `shared`.
    staging: Option<View>,
    pending: Dirty,
    /// When to retry a failed datapath write.
    retry_at: Option<Instant>,
    last_revision: i64,
    attached: BTreeMap<Ipv4Addr, Attachment>,
    /// Endpoints that are not attached are tried again at passes after this time.
    attach_retry_at: Instant,
    /// The origins of the changes not yet in the datapath (at most [`MAX_ORIGINS`]).
    origins: Vec<ChangeOrigin>,
}

/// A change applied to the view, waiting for its datapath write.
struct ChangeOrigin {
    /// The cluster the object belongs to.
    cluster: ClusterName,
    /// When it was applied at its source (Unix nanoseconds).
    unix_nanos: i64,
    /// The span of its view update, when traced.
    trace: Option<clustermesh_telemetry::Trace>,
}

/// Origins kept per reconcile pass; a burst of more changes measures the first ones.
const MAX_ORIGINS: usize = 4096;
/// Traced changes linked from one reconcile pass span.
const MAX_LINKS: usize = 128;

async fn run(
    config: Config,
    tls: ClientTls,
    plane: Plane,
    reconciler: Reconciler,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut lp = Loop {
        config,
        plane,
        reconciler,
        shared,
        staging: None,
        pending: Dirty::default(),
        retry_at: None,
        last_revision: 0,
        attached: BTreeMap::new(),
        attach_retry_at: Instant::now(),
        origins: Vec::new(),
    };
    let mut backoff = new_backoff();
    loop {
        let result = tokio::select! {
            r = lp.session(&tls) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let was_connected = {
            let mut st = lp.shared.status.lock();
            let was = st.connected;
            st.connected = false;
            st.failures += 1;
            if let Err(e) = result {
                tracing::warn!(error = %e, "the watch on the local apiserver ended");
                st.last_error = Some(e);
            }
            was
        };
        if was_connected {
            backoff = new_backoff();
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(5));
        tracing::info!(after = ?delay, "reconnecting to the local apiserver");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn new_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Delay before a failed datapath write is retried (with a full comparison).
const RETRY: Duration = Duration::from_secs(1);

/// Silence after which the local apiserver is considered gone (it heartbeats every second by
/// default).
const SILENCE: Duration = Duration::from_secs(10);

impl Loop {
    async fn session(&mut self, tls: &ClientTls) -> Result<(), String> {
        let mut client = tokio::time::timeout(
            Duration::from_secs(10),
            connect(&self.config.apiserver.address, tls),
        )
        .await
        .map_err(|_| "connecting timed out".to_owned())?
        .map_err(|e| {
            format!(
                "connecting to {}: {}",
                self.config.apiserver.address,
                clustermesh_proto::client::error_chain(&e)
            )
        })?;
        let cc = client
            .get_cluster_config(v1::GetClusterConfigRequest {})
            .await
            .map_err(|e| e.message().to_owned())?
            .into_inner();
        if cc.name != self.config.cluster.as_str() {
            return Err(format!(
                "the apiserver at {} is cluster {:?}, configured as {}",
                self.config.apiserver.address, cc.name, self.config.cluster
            ));
        }
        let mode = MaxConnectedClusters::try_from(cc.max_connected_clusters)
            .map_err(|e| format!("the apiserver's maxConnectedClusters: {e}"))?;
        let id = ClusterId::new(cc.id, mode).map_err(|e| e.to_string())?;
        let (cluster, node) = (self.config.cluster.clone(), self.config.node_name.clone());
        let fresh = move || View::new(cluster.clone(), id, node.clone(), mode);
        let since = if self.shared.view.lock().is_some() && self.staging.is_none() {
            self.last_revision
        } else {
            self.staging = Some(fresh());
            0
        };
        let kinds = [
            v1::Kind::Identities,
            v1::Kind::Ipcache,
            v1::Kind::Nodes,
            v1::Kind::Services,
            v1::Kind::RemoteCache,
            v1::Kind::Policies,
            v1::Kind::ClusterStatus,
        ];
        let mut stream = client
            .watch(v1::WatchRequest {
                kinds: kinds.iter().map(|k| *k as i32).collect(),
                since_revision: since,
            })
            .await
            .map_err(|e| e.message().to_owned())?
            .into_inner();
        self.shared.status.lock().connected = true;
        tracing::info!(
            address = %self.config.apiserver.address,
            since_revision = since,
            "connected to the local apiserver"
        );
        let debounce = Duration::from_millis(self.config.debounce_millis);
        let max_debounce = Duration::from_millis(self.config.max_debounce_millis);
        let mut first_pending: Option<Instant> = None;
        let mut quiet_until = Instant::now();
        let mut last_message = Instant::now();
        loop {
            let silence_at = last_message + SILENCE;
            let deadline = match (first_pending, self.retry_at) {
                (Some(first), _) => quiet_until.min(first + max_debounce),
                (None, Some(retry)) => retry.min(silence_at),
                (None, None) => silence_at,
            };
            let msg = tokio::select! {
                m = stream.message() => m,
                () = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    if first_pending.take().is_some() || self.retry_at.is_some_and(|r| r <= now) {
                        self.flush().await;
                        continue;
                    }
                    if now < silence_at {
                        continue;
                    }
                    return Err(format!("no message from the local apiserver for {SILENCE:?}"));
                }
            };
            last_message = Instant::now();
            let event = match msg {
                Ok(Some(e)) => e,
                Ok(None) => return Err("the local apiserver closed the stream".into()),
                Err(e) => return Err(e.message().to_owned()),
            };
            // A live change's origin: measured when in the datapath, and traced when it
            // carries a sampled trace context.
            let origin = if self.staging.is_none() {
                clustermesh_telemetry::Origin::from_proto(event.origin.as_ref())
            } else {
                None
            };
            match event.event {
                Some(Ev::Upsert(u)) => match Object::try_from(&u) {
                    Ok(object) => {
                        let cluster = object.reference().cluster;
                        self.apply_change(origin, cluster, |v| v.upsert(object));
                    }
                    Err(e) => self.reject(&e.to_string()),
                },
                Some(Ev::Delete(d)) => match delete_ref(&d) {
                    Ok(r) => self.apply_change(origin, r.cluster.clone(), |v| v.delete(&r)),
                    Err(e) => self.reject(&e),
                },
                Some(Ev::Synced(_)) => {
                    self.last_revision = event.revision;
                    if let Some(view) = self.staging.take() {
                        self.install(view).await;
                        first_pending = None;
                    }
                    continue;
                }
                Some(Ev::Reset(r)) => {
                    tracing::info!(reason = %r.reason, "the local apiserver reset the watch");
                    self.staging = Some(fresh());
                    continue;
                }
                Some(Ev::Heartbeat(_)) | None => continue,
            }
            if self.staging.is_none() {
                self.last_revision = event.revision;
                if !self.pending.is_empty() {
                    let now = Instant::now();
                    first_pending.get_or_insert(now);
                    quiet_until = now + debounce;
                }
            }
        }
    }

    fn reject(&self, reason: &str) {
        tracing::warn!(%reason, "refusing an object from the local apiserver");
        self.shared.status.lock().rejected += 1;
    }

    /// [`Loop::apply`] for a change from `cluster`, in the span `agent view update` when it
    /// is traced; its origin waits for the datapath write, unless the change changed nothing
    /// to write (a repeated upsert, a delete of nothing): then nothing is measured.
    fn apply_change(
        &mut self,
        origin: Option<clustermesh_telemetry::Origin>,
        cluster: ClusterName,
        f: impl FnOnce(&mut View) -> Dirty,
    ) {
        let span = clustermesh_telemetry::step!(
            origin.as_ref().and_then(|o| o.trace.as_ref()),
            "agent view update",
            cluster = %self.config.cluster,
            node = %self.config.node_name,
            source_cluster = %cluster
        );
        let to_write = self.apply(f);
        if let Some(o) = origin
            && to_write
            && self.origins.len() < MAX_ORIGINS
        {
            self.origins.push(ChangeOrigin {
                cluster,
                unix_nanos: o.unix_nanos,
                trace: clustermesh_telemetry::Trace::of(&span).or(o.trace),
            });
        }
    }

    /// Applies a change to the view being staged or the view in force; whether it gave the
    /// view in force something to write.
    fn apply(&mut self, f: impl FnOnce(&mut View) -> Dirty) -> bool {
        if let Some(v) = self.staging.as_mut() {
            f(v);
            false
        } else if let Some(v) = self.shared.view.lock().as_mut() {
            let d = f(v);
            let to_write = !d.is_empty();
            self.pending.merge(d);
            to_write
        } else {
            false
        }
    }

    /// Installs a complete snapshot: one full pass, pruning allowed.
    async fn install(&mut self, view: View) {
        let desired = Desired::from_view(&view);
        let result = self.reconciler.reconcile(&desired, Scope::Full, true);
        tracing::info!(
            identities = view.identities().len(),
            ipcache = view.ipcache_len(),
            services = view.service_names().count(),
            nodes = view.nodes().len(),
            policies = view.policies().len(),
            "snapshot of the local apiserver applied"
        );
        *self.shared.view.lock() = Some(view);
        *self.shared.desired.lock() = desired;
        self.pending = Dirty::default();
        self.origins.clear();
        self.after_pass(result, true).await;
        let first = !std::mem::replace(&mut self.shared.status.lock().synced, true);
        if first {
            tracing::info!("ready: the datapath holds the first complete snapshot");
        }
    }

    /// Writes what the pending changes touched (everything, when retrying a failed pass).
    async fn flush(&mut self) {
        let dirty = std::mem::take(&mut self.pending);
        let full = self.retry_at.take().is_some();
        // The pass is a child of the first traced change it writes, linked to the others.
        let mut traced = self.origins.iter().filter_map(|o| o.trace.as_ref());
        let pass = clustermesh_telemetry::step!(
            traced.next(),
            "reconcile pass",
            cluster = %self.config.cluster,
            node = %self.config.node_name,
            changes = self.origins.len(),
            full
        );
        for other in traced.take(MAX_LINKS) {
            clustermesh_telemetry::context::add_link(&pass, other);
        }
        let (result, policy_changed) = {
            let view = self.shared.view.lock();
            let Some(view) = view.as_ref() else {
                return;
            };
            let mut desired = self.shared.desired.lock();
            let changed = desired.update(view, &dirty);
            let scope = if full {
                Scope::Full
            } else {
                Scope::Changed(&changed)
            };
            let write = clustermesh_telemetry::child!(&pass, "datapath write");
            let result = self.reconciler.reconcile(&desired, scope, true);
            drop(write);
            (result, changed.policy || full)
        };
        if result.is_ok() {
            // In the datapath: the changes' propagation ends here (a failed pass keeps them
            // for the retry).
            let m = &self.shared.metrics;
            for o in self.origins.drain(..) {
                m.propagation
                    .get_or_create(&vec![("source_cluster", o.cluster.to_string())])
                    .observe(clustermesh_telemetry::seconds_since(o.unix_nanos));
            }
        }
        drop(pass);
        self.after_pass(result, policy_changed).await;
    }

    async fn after_pass(
        &mut self,
        result: clustermesh_bpf::Result<crate::reconcile::Stats>,
        endpoints_changed: bool,
    ) {
        let m = &self.shared.metrics;
        m.reconciles.inc();
        match result {
            Ok(stats) => {
                m.count_ops(stats.upserts, stats.deletes);
                for (key, why) in &stats.failed {
                    m.reconcile_errors.inc();
                    tracing::warn!(frontend = %key, error = %why, "the datapath refused a service; everything else is written");
                }
            }
            Err(e) => {
                m.reconcile_errors.inc();
                tracing::error!(error = %e, "writing the datapath failed; a full pass retries in 1 s");
                self.shared.status.lock().last_error = Some(format!("datapath: {e}"));
                self.retry_at = Some(Instant::now() + RETRY);
            }
        }
        let unattached = self.attached.values().any(|a| a.error.is_some());
        if endpoints_changed || (unattached && Instant::now() >= self.attach_retry_at) {
            self.attach_endpoints(endpoints_changed).await;
            // At most one retry a second for what stays unattached (each costs `ip` runs).
            self.attach_retry_at = Instant::now() + RETRY;
        }
        self.publish();
    }

    /// Attaches the policy programs of every local endpoint to its own interface, detaches
    /// those of vanished endpoints. Refused or failed endpoints are tried again at every call;
    /// with `recheck` (the endpoints or policies changed), attached ones are resolved again
    /// too, so that an endpoint whose interface changed (a pod recreated with the same IP)
    /// follows it.
    async fn attach_endpoints(&mut self, recheck: bool) {
        let Some(kernel) = self.plane.kernel.clone() else {
            return;
        };
        let want: Vec<Ipv4Addr> = self
            .shared
            .desired
            .lock()
            .endpoints()
            .keys()
            .copied()
            .collect();
        let gone: Vec<Ipv4Addr> = self
            .attached
            .keys()
            .filter(|ip| want.binary_search(ip).is_err())
            .copied()
            .collect();
        for ip in gone {
            // Also after a partial attach (one direction pinned, the other failed).
            if let Some(Attachment {
                interface: Some(ifname),
                ..
            }) = self.attached.remove(&ip)
            {
                detach(&kernel, ip, &ifname);
            }
        }
        let netns = self.plane.endpoint_netns.clone();
        let defaults = default_devices(netns.as_deref()).await;
        for ip in want {
            let prev = self.attached.get(&ip).cloned();
            let attached_before = prev.as_ref().is_some_and(|a| a.error.is_none());
            if attached_before && !recheck {
                continue;
            }
            let resolved = match &defaults {
                Ok(d) => endpoint_interface(netns.as_deref(), ip, &self.plane.interfaces, d).await,
                Err(e) => Err(format!("finding the default routes: {e}; nothing attached")),
            };
            // An interface carries one endpoint's programs: detaching one must never strip
            // another's.
            let resolved = resolved.and_then(|ifname| {
                match self
                    .attached
                    .iter()
                    .find(|(other, a)| **other != ip && a.interface.as_deref() == Some(&ifname))
                {
                    Some((other, _)) => Err(format!(
                        "{ip} is routed to {ifname}, which already carries the programs of \
                         endpoint {other}; nothing attached"
                    )),
                    None => Ok(ifname),
                }
            });
            let old = prev.as_ref().and_then(|a| a.interface.clone());
            if attached_before && resolved.as_ref().ok() == old.as_ref() {
                continue;
            }
            if let Some(old) = old.filter(|o| resolved.as_ref().ok() != Some(o)) {
                detach(&kernel, ip, &old);
            }
            let result = match resolved {
                Ok(ifname) => match kernel.attach_endpoint(netns.as_deref(), &ifname) {
                    Ok(()) => {
                        tracing::info!(%ip, interface = %ifname, "policy programs attached to the endpoint's interface");
                        Attachment {
                            interface: Some(ifname),
                            error: None,
                        }
                    }
                    Err(e) => Attachment {
                        interface: Some(ifname),
                        error: Some(format!("{e}")),
                    },
                },
                Err(e) => Attachment {
                    interface: None,
                    error: Some(e),
                },
            };
            // Refusals are retried at every pass (a route may change); said once per reason.
            let before = prev.as_ref().and_then(|a| a.error.as_ref());
            if let Some(e) = &result.error
                && before != Some(e)
            {
                tracing::warn!(%ip, error = %e, "policy programs not attached");
            }
            self.attached.insert(ip, result);
        }
    }

    fn publish(&self) {
        let counts = self.reconciler.counts();
        // Taken before the status lock (the admin endpoint takes desired, then status).
        let (enforced, rules) = {
            let d = self.shared.desired.lock();
            (
                self.retry_at.is_none().then(|| d.policy.policies.clone()),
                d.policy.rules.clone(),
            )
        };
        *self.shared.rule_names.lock() = Arc::new(rules);
        let mut st = self.shared.status.lock();
        st.reconciles += 1;
        st.maps = ["services", "backends", "ipcache", "endpoints", "policy"]
            .into_iter()
            .zip(counts)
            .collect();
        if let Some(view) = self.shared.view.lock().as_ref() {
            st.view = BTreeMap::from([
                ("identities", view.identities().len()),
                ("ipcache", view.ipcache_len()),
                ("services", view.service_names().count()),
                ("nodes", view.nodes().len()),
                ("policies", view.policies().len()),
            ]);
            st.clusters = view.statuses().values().cloned().collect();
            st.node_addresses = view.node_ips().iter().copied().collect();
            let mut clusters: BTreeMap<u16, String> = view
                .nodes()
                .values()
                .map(|n| (n.cluster_id.get(), n.cluster.to_string()))
                .collect();
            clusters.insert(view.local_id().get(), view.local().to_string());
            *self.shared.cluster_names.lock() = Arc::new(clusters);
        }
        if let Some(p) = enforced {
            st.policies = p;
        }
        st.endpoints = self.attached.clone();
        st.datapath_errors = self
            .reconciler
            .failed()
            .iter()
            .map(|(k, why)| (k.to_string(), why.clone()))
            .collect();
        drop(st);
        let m = &self.shared.metrics;
        m.services.set(i64::try_from(counts[0]).unwrap_or(i64::MAX));
        m.ipcache.set(i64::try_from(counts[2]).unwrap_or(i64::MAX));
    }
}
