//! The Export gRPC server (DESIGN section 5): a snapshot of the requested kinds, `Synced`,
//! then changes in revision order; resume from a revision while the store has the history,
//! `Reset` and a new snapshot otherwise; heartbeats when idle. Who may watch what comes from
//! the client certificate: `remote-<peer>` sees this cluster's identities, ipcache, nodes and
//! global shared services; `local-<this cluster>` sees everything, remote caches and policies
//! included.
//!
//! Each watcher has its own store watch and a bounded buffer: a slow watcher cannot slow the
//! others. One that does not take an event within `lag_timeout` is reset (and counted): it
//! gets `Reset` and a fresh snapshot once it reads again.

use std::collections::{BTreeSet, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_certs::ClientIdentity;
use clustermesh_kvstore::{EventKind, KvStore, Revision};
use clustermesh_model::cluster::{ClusterConfig, ClusterName, ClusterStatus};
use clustermesh_model::endpoint::IpCacheEntry;
use clustermesh_model::keys::{
    CACHE_PREFIX, CLUSTER_STATUS_PREFIX, CachedObject, ExportKind, IDENTITY_ID_PREFIX,
    IPCACHE_PREFIX, Key, LOCAL_PREFIX, LOCAL_SERVICES_PREFIX,
};
use clustermesh_model::labels::LabelSet;
use clustermesh_model::node::Node;
use clustermesh_model::policy::NetworkPolicy;
use clustermesh_model::service::ClusterService;
use clustermesh_proto::Object;
use clustermesh_proto::v1::{self, Kind, watch_event::Event as Ev};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;

/// Tunables of the Export server.
#[derive(Debug, Clone, Copy)]
pub struct ExportSettings {
    /// How often an idle stream carries a heartbeat.
    pub heartbeat: Duration,
    /// Events buffered per watcher.
    pub buffer: usize,
    /// How long a watcher may leave a full buffer unread before it is reset.
    pub lag_timeout: Duration,
    /// The largest stored value sent (`limits.maxObjectBytes`): a larger one (written by
    /// another tool, or under a larger limit) is never sent, so that no reader is handed a
    /// message it cannot receive.
    pub max_object_bytes: usize,
    /// Watch streams one remote cluster may hold open at once (an importer needs one).
    pub max_streams_per_remote: usize,
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(500),
            buffer: 1024,
            lag_timeout: Duration::from_secs(5),
            max_object_bytes: clustermesh_sync::validate::MAX_OBJECT_BYTES,
            max_streams_per_remote: 8,
        }
    }
}

/// Which namespaces are exported to other clusters: a namespace's
/// `clustermesh.cilium.io/global` annotation, else the configured default. Nodes are always
/// exported; identities, ipcache entries and services only from exported namespaces. Local
/// agents always see everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamespaceFilter {
    /// Whether a namespace without the annotation is exported.
    pub default_global: bool,
    /// Namespaces whose annotation says otherwise than the default.
    pub exceptions: std::collections::BTreeSet<String>,
    /// The store revision this filter holds after: every change after it was (and is)
    /// filtered by it. A remote that resumes from this revision or an earlier one may hold
    /// objects an earlier filter exported, so it gets a new snapshot instead.
    pub since: Revision,
}

impl NamespaceFilter {
    /// Every namespace exported.
    pub fn all() -> Self {
        Self {
            default_global: true,
            exceptions: std::collections::BTreeSet::new(),
            since: 0,
        }
    }

    /// The filter that exports a namespace only when both `self` and `other` do: applied
    /// before a change is written, so that a namespace leaving the export stops being
    /// exported before its objects change, and one joining only after they are written.
    pub fn narrowest(&self, other: &Self) -> Self {
        let exceptions = if self.default_global {
            // Exceptions are the namespaces not exported: either's.
            self.exceptions.union(&other.exceptions).cloned().collect()
        } else {
            // Exceptions are the namespaces exported: both's.
            self.exceptions
                .intersection(&other.exceptions)
                .cloned()
                .collect()
        };
        Self {
            default_global: self.default_global,
            exceptions,
            since: self.since.max(other.since),
        }
    }

    /// Whether `other` exports the same namespaces.
    pub fn same_namespaces(&self, other: &Self) -> bool {
        self.default_global == other.default_global && self.exceptions == other.exceptions
    }

    /// Whether objects of `namespace` are exported (objects without a namespace are).
    pub fn exports(&self, namespace: Option<&str>) -> bool {
        match namespace {
            None | Some("") => true,
            Some(ns) => self.default_global != self.exceptions.contains(ns),
        }
    }
}

/// What the Export service follows while it runs.
pub struct ExportWatches {
    /// Becomes true when the server stops.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// The exported namespaces; `None` until the source's first pass has set them (remote
    /// streams wait for it).
    pub namespaces: tokio::sync::watch::Receiver<Option<NamespaceFilter>>,
    /// The clusters whose `remote-` certificates are accepted.
    pub peers: tokio::sync::watch::Receiver<BTreeSet<ClusterName>>,
    /// The origins of recent writes: each change is sent with its own.
    pub provenance: Arc<clustermesh_telemetry::Provenance>,
}

/// The Export service of one cluster.
#[derive(Clone)]
pub struct ExportService {
    inner: Arc<Inner>,
}

struct Inner {
    /// Becomes true when the server stops: open streams end, so that shutdown completes.
    shutdown: tokio::sync::watch::Receiver<bool>,
    store: Arc<dyn KvStore>,
    cluster: ClusterName,
    config: ClusterConfig,
    settings: ExportSettings,
    metrics: Arc<Metrics>,
    /// The exported namespaces; a change resets remote streams.
    namespaces: tokio::sync::watch::Receiver<Option<NamespaceFilter>>,
    /// The clusters whose `remote-` certificates are accepted; a removed one's streams end.
    peers: tokio::sync::watch::Receiver<BTreeSet<ClusterName>>,
    /// The origins of recent writes.
    provenance: Arc<clustermesh_telemetry::Provenance>,
    /// Open watch streams per remote cluster.
    remote_streams: Arc<parking_lot::Mutex<std::collections::HashMap<ClusterName, usize>>>,
}

/// One open watch stream of a remote, counted until dropped.
struct RemoteStreamSlot {
    streams: Arc<parking_lot::Mutex<std::collections::HashMap<ClusterName, usize>>>,
    cluster: ClusterName,
}

impl Drop for RemoteStreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock();
        if let Some(n) = streams.get_mut(&self.cluster) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.cluster);
            }
        }
    }
}

impl ExportService {
    /// The service for `cluster`, serving from `store`; its streams end when `shutdown`
    /// becomes true, so that a graceful stop does not wait for clients.
    pub fn new(
        store: Arc<dyn KvStore>,
        cluster: ClusterName,
        config: ClusterConfig,
        settings: ExportSettings,
        metrics: Arc<Metrics>,
        watches: ExportWatches,
    ) -> Self {
        let ExportWatches {
            shutdown,
            namespaces,
            peers,
            provenance,
        } = watches;
        Self {
            inner: Arc::new(Inner {
                shutdown,
                store,
                cluster,
                config,
                settings,
                metrics,
                namespaces,
                peers,
                provenance,
                remote_streams: Arc::default(),
            }),
        }
    }

    /// The tonic server wrapper.
    pub fn into_server(self) -> v1::export_server::ExportServer<Self> {
        v1::export_server::ExportServer::new(self).max_encoding_message_size(16 * 1024 * 1024)
    }
}

const REMOTE_KINDS: [Kind; 4] = [Kind::Identities, Kind::Ipcache, Kind::Nodes, Kind::Services];

/// Who the client is, from its certificate: `local-<this cluster>`, or `remote-<peer>` for a
/// peer allowed to import from this cluster (a configured remote or an `allowedRemotes`
/// entry), never this cluster's own name.
fn who<T>(req: &Request<T>, inner: &Inner) -> Result<ClientIdentity, Status> {
    let cluster = &inner.cluster;
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let first = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let id = ClientIdentity::from_der(first.as_ref())
        .map_err(|e| Status::permission_denied(e.to_string()))?;
    match &id {
        ClientIdentity::Local(c) if c != cluster => Err(Status::permission_denied(format!(
            "a local certificate of cluster {c} is not valid for cluster {cluster}"
        ))),
        ClientIdentity::Remote(c) if c == cluster => Err(Status::permission_denied(format!(
            "a remote certificate with this cluster's own name ({c}) is never valid"
        ))),
        ClientIdentity::Remote(c) if !inner.peers.borrow().contains(c) => {
            inner.metrics.export_refused.inc();
            Err(Status::permission_denied(format!(
                "cluster {c} is not connected to {cluster} (clustermesh connect, or allowedRemotes)"
            )))
        }
        _ => Ok(id),
    }
}

/// Where the objects of `kind` are, for a remote client or a local one. A remote gets the
/// services Cilium's clustermesh-apiserver exports (`cilium/state/services/...`: global and
/// shared, of global namespaces, ready or serving backends); a local agent gets every service
/// of its cluster with every backend.
fn prefixes(cluster: &ClusterName, kind: Kind, remote: bool) -> Vec<String> {
    match kind {
        Kind::Identities => vec![IDENTITY_ID_PREFIX.to_owned()],
        Kind::Ipcache => vec![IPCACHE_PREFIX.to_owned()],
        Kind::Nodes => vec![ExportKind::Nodes.state_prefix(cluster)],
        Kind::Services if remote => vec![ExportKind::Services.state_prefix(cluster)],
        Kind::Services => vec![LOCAL_SERVICES_PREFIX.to_owned()],
        Kind::RemoteCache => vec![CACHE_PREFIX.to_owned()],
        Kind::Policies => vec![
            format!("{LOCAL_PREFIX}policies/"),
            format!("{LOCAL_PREFIX}clusterwide-policies/"),
        ],
        Kind::ClusterStatus => vec![CLUSTER_STATUS_PREFIX.to_owned()],
        Kind::Unspecified => Vec::new(),
    }
}

fn common_prefix(prefixes: &[String]) -> String {
    let Some(first) = prefixes.first() else {
        return String::new();
    };
    let mut len = first.len();
    for p in &prefixes[1..] {
        len = first
            .bytes()
            .zip(p.bytes())
            .take(len)
            .take_while(|(a, b)| a == b)
            .count();
    }
    first[..len].to_owned()
}

/// What a watch sends for one key.
enum Translated {
    Upsert(v1::Upsert),
    Delete(v1::Delete),
    Skip,
}

fn parse_json<T: serde::de::DeserializeOwned>(value: &[u8]) -> Result<T, String> {
    serde_json::from_slice(value).map_err(|e| e.to_string())
}

/// The namespace an exported object belongs to (nodes belong to none).
fn namespace_of(object: &Object) -> Option<&str> {
    match object {
        Object::Service(s) => Some(s.namespace.as_str()),
        Object::IpCache { entry, .. } => Some(entry.namespace.as_str()),
        Object::Identity { labels, .. } => labels.namespace(),
        _ => None,
    }
}

fn decode(local: &ClusterName, key: &Key, value: &[u8]) -> Result<Option<Object>, String> {
    let labels = |v: &[u8]| -> Result<LabelSet, String> {
        std::str::from_utf8(v)
            .map_err(|e| e.to_string())?
            .parse()
            .map_err(|e: clustermesh_model::labels::LabelError| e.to_string())
    };
    Ok(Some(match key {
        Key::Identity { id } => Object::Identity {
            cluster: local.clone(),
            id: *id,
            labels: labels(value)?,
        },
        Key::IpCache { .. } => Object::IpCache {
            cluster: local.clone(),
            entry: parse_json::<IpCacheEntry>(value)?,
        },
        Key::Node { .. } => Object::Node(parse_json::<Node>(value)?),
        Key::Service { .. } | Key::LocalService { .. } => {
            Object::Service(parse_json::<ClusterService>(value)?)
        }
        Key::Policy { .. } => Object::Policy {
            cluster: local.clone(),
            policy: parse_json::<NetworkPolicy>(value)?,
        },
        Key::ClusterStatus { .. } => Object::ClusterStatus(parse_json::<ClusterStatus>(value)?),
        Key::Cached { remote, object } => match object {
            CachedObject::Identity(id) => Object::Identity {
                cluster: remote.clone(),
                id: *id,
                labels: labels(value)?,
            },
            CachedObject::IpCache(_) => Object::IpCache {
                cluster: remote.clone(),
                entry: parse_json::<IpCacheEntry>(value)?,
            },
            CachedObject::Node(_) => Object::Node(parse_json::<Node>(value)?),
            CachedObject::Service { .. } => Object::Service(parse_json::<ClusterService>(value)?),
        },
        _ => return Ok(None),
    }))
}

fn delete_of(local: &ClusterName, key: &Key) -> Option<v1::Delete> {
    let (kind, cluster, name) = match key {
        Key::Identity { id } => (Kind::Identities, local.clone(), id.to_string()),
        Key::IpCache { ip } => (Kind::Ipcache, local.clone(), ip.to_string()),
        Key::Node { cluster, name } => (Kind::Nodes, cluster.clone(), name.clone()),
        Key::Service {
            cluster,
            namespace,
            name,
        } => (
            Kind::Services,
            cluster.clone(),
            format!("{namespace}/{name}"),
        ),
        Key::LocalService { namespace, name } => {
            (Kind::Services, local.clone(), format!("{namespace}/{name}"))
        }
        Key::Policy { namespace, name } => (
            Kind::Policies,
            local.clone(),
            namespace
                .as_ref()
                .map_or_else(|| name.clone(), |ns| format!("{ns}/{name}")),
        ),
        Key::ClusterStatus { cluster } => {
            (Kind::ClusterStatus, cluster.clone(), cluster.to_string())
        }
        Key::Cached { remote, object } => {
            let (kind, name) = match object {
                CachedObject::Identity(id) => (Kind::Identities, id.to_string()),
                CachedObject::IpCache(ip) => (Kind::Ipcache, ip.to_string()),
                CachedObject::Node(n) => (Kind::Nodes, n.clone()),
                CachedObject::Service { namespace, name } => {
                    (Kind::Services, format!("{namespace}/{name}"))
                }
            };
            (kind, remote.clone(), name)
        }
        _ => return None,
    };
    Some(v1::Delete {
        kind: kind as i32,
        cluster: cluster.to_string(),
        name,
    })
}

impl Inner {
    /// What to send for a put of `key` (or a delete when the object is not for this client).
    fn translate_put(&self, remote: bool, key_text: &str, value: &[u8]) -> Translated {
        let Ok(key) = Key::parse(key_text) else {
            return Translated::Skip;
        };
        if value.len() > self.settings.max_object_bytes {
            tracing::warn!(
                key = key_text,
                bytes = value.len(),
                max = self.settings.max_object_bytes,
                "not sending a value larger than limits.maxObjectBytes"
            );
            self.metrics.export_oversized.inc();
            // A peer that had an earlier version drops it; a local agent keeps what it has.
            return if remote {
                delete_of(&self.cluster, &key).map_or(Translated::Skip, Translated::Delete)
            } else {
                Translated::Skip
            };
        }
        match decode(&self.cluster, &key, value) {
            Ok(Some(Object::Service(s))) if remote && !(s.include_external && s.shared) => {
                // Not exported: a peer that had it (it was global and shared before) drops it.
                delete_of(&self.cluster, &key).map_or(Translated::Skip, Translated::Delete)
            }
            Ok(Some(object))
                if remote
                    && !self
                        .namespaces
                        .borrow()
                        .as_ref()
                        .is_some_and(|f| f.exports(namespace_of(&object))) =>
            {
                // Its namespace is not global: a peer that had it drops it.
                delete_of(&self.cluster, &key).map_or(Translated::Skip, Translated::Delete)
            }
            Ok(Some(object)) => Translated::Upsert(v1::Upsert::from(&object)),
            Ok(None) => Translated::Skip,
            Err(reason) => {
                tracing::warn!(key = key_text, %reason, "skipping a value that does not decode");
                self.metrics.export_undecodable.inc();
                Translated::Skip
            }
        }
    }

    fn translate_delete(&self, key_text: &str) -> Translated {
        Key::parse(key_text)
            .ok()
            .and_then(|k| delete_of(&self.cluster, &k))
            .map_or(Translated::Skip, Translated::Delete)
    }
}

/// The keys a remote client holds: what it was sent and not yet told to drop. A remote is
/// sent a Delete only for one of these, so it never hears of an object it was never sent (a
/// non-global service, a pod of a namespace that is not exported), in a follow or in a
/// resume through the history. Local clients (`None`) get every Delete.
struct Held(Option<HashSet<String>>);

impl Held {
    fn for_client(remote: bool) -> Self {
        Self(remote.then(HashSet::new))
    }

    fn clear(&mut self) {
        if let Some(set) = &mut self.0 {
            set.clear();
        }
    }

    /// What to send for `t` about `key`, keeping the set up to date.
    fn pass(&mut self, key: &str, t: Translated) -> Translated {
        let Some(set) = &mut self.0 else {
            return t;
        };
        match t {
            Translated::Upsert(u) => {
                set.insert(key.to_owned());
                Translated::Upsert(u)
            }
            Translated::Delete(d) if set.remove(key) => Translated::Delete(d),
            Translated::Delete(_) | Translated::Skip => Translated::Skip,
        }
    }
}

/// Why forwarding stopped.
enum Stop {
    /// The client went away.
    Gone,
    /// The client lagged, or the history is gone: send a new snapshot.
    Resnapshot,
}

type EventTx = mpsc::Sender<Result<v1::WatchEvent, Status>>;

async fn send(inner: &Inner, tx: &EventTx, revision: Revision, event: Ev) -> Result<(), Stop> {
    send_with(inner, tx, revision, event, None).await
}

async fn send_with(
    inner: &Inner,
    tx: &EventTx,
    revision: Revision,
    event: Ev,
    origin: Option<v1::Origin>,
) -> Result<(), Stop> {
    let msg = v1::WatchEvent {
        revision,
        event: Some(event),
        origin,
    };
    match tx.send_timeout(Ok(msg), inner.settings.lag_timeout).await {
        Ok(()) => Ok(()),
        Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Stop::Gone),
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            inner.metrics.export_resets.inc();
            let reset = Ev::Reset(v1::Reset {
                reason: "the client fell behind; a new snapshot follows".into(),
            });
            tx.send(Ok(v1::WatchEvent {
                revision,
                event: Some(reset),
                origin: None,
            }))
            .await
            .map_err(|_| Stop::Gone)?;
            Err(Stop::Resnapshot)
        }
    }
}

async fn send_translated(
    inner: &Inner,
    tx: &EventTx,
    revision: Revision,
    t: Translated,
    origin: Option<v1::Origin>,
) -> Result<(), Stop> {
    match t {
        Translated::Upsert(u) => send_with(inner, tx, revision, Ev::Upsert(u), origin).await,
        Translated::Delete(d) => send_with(inner, tx, revision, Ev::Delete(d), origin).await,
        Translated::Skip => Ok(()),
    }
}

/// Sends a change with its origin (from the provenance table): inside the span
/// `export event sent`, a child of the write's span when the change is traced, whose context
/// the event carries on.
async fn send_change(
    inner: &Inner,
    tx: &EventTx,
    remote: bool,
    (key, revision): (&str, Revision),
    t: Translated,
) -> Result<(), Stop> {
    use tracing::Instrument as _;
    if matches!(t, Translated::Skip) {
        return Ok(());
    }
    let Some(origin) = inner.provenance.lookup(key, revision) else {
        return send_translated(inner, tx, revision, t, None).await;
    };
    let span = clustermesh_telemetry::step!(
        origin.trace.as_ref(),
        "export event sent",
        cluster = %inner.cluster,
        to = if remote { "remote" } else { "local" },
        key,
        revision
    );
    let wire = origin.handed_on(&span).to_proto();
    send_translated(inner, tx, revision, t, Some(wire))
        .instrument(span)
        .await
}

async fn run_watch(
    inner: Arc<Inner>,
    remote: bool,
    kinds: BTreeSet<i32>,
    since: Revision,
    tx: EventTx,
) {
    let wanted: Vec<String> = kinds
        .iter()
        .filter_map(|k| Kind::try_from(*k).ok())
        .flat_map(|k| prefixes(&inner.cluster, k, remote))
        .collect();
    let common = common_prefix(&wanted);
    let matches = |key: &str| wanted.iter().any(|p| key.starts_with(p.as_str()));
    if remote {
        // Nothing goes to a remote before the source has said which namespaces are exported.
        let mut namespaces = inner.namespaces.clone();
        tokio::select! {
            r = namespaces.wait_for(Option::is_some) => if r.is_err() { return },
            () = tx.closed() => return,
        }
    }
    let mut held = Held::for_client(remote);
    let mut resume = (since > 0).then_some(since);
    loop {
        // Marked now, before the snapshot or the resume reads the filter: a change from here
        // on resets the stream, even one made while the snapshot is being sent.
        let mut namespaces = inner.namespaces.clone();
        namespaces.borrow_and_update();
        let from = match resume.take() {
            Some(since) => match resume_from(&inner, remote, &wanted, since).await {
                Resume::From(holding) => {
                    held = holding;
                    since
                }
                Resume::Failed(e) => {
                    let _ = tx.send(Err(Status::unavailable(e))).await;
                    return;
                }
                Resume::Reset(reason) => {
                    let reset = Ev::Reset(v1::Reset { reason });
                    if send(&inner, &tx, since, reset).await.is_err() {
                        return;
                    }
                    continue;
                }
            },
            None => {
                held.clear();
                match snapshot(&inner, remote, &wanted, &tx, &mut held).await {
                    Ok(rev) => rev,
                    Err(Stop::Gone) => return,
                    Err(Stop::Resnapshot) => continue,
                }
            }
        };
        let stream = Followed {
            remote,
            common: &common,
            matches: &matches,
            tx: &tx,
        };
        match follow(&inner, &stream, from, &mut held, namespaces).await {
            Stop::Gone => return,
            Stop::Resnapshot => continue,
        }
    }
}

/// Whether a client may resume from a revision.
enum Resume {
    /// Yes; a remote client holds these keys there.
    From(Held),
    /// No, the store's history or the namespace filter does not allow it: a Reset with this
    /// reason and a new snapshot.
    Reset(String),
    /// The store failed: the stream ends.
    Failed(String),
}

async fn resume_from(inner: &Inner, remote: bool, wanted: &[String], since: Revision) -> Resume {
    match inner.store.current_revision().await {
        Ok(current) if since <= current => {}
        Ok(_) => {
            return Resume::Reset(format!(
                "revision {since} is newer than this store's history"
            ));
        }
        Err(e) => return Resume::Failed(e.to_string()),
    }
    if !remote {
        return Resume::From(Held::for_client(false));
    }
    let filter_since = inner.namespaces.borrow().as_ref().map(|f| f.since);
    if filter_since.is_none_or(|f| since <= f) {
        return Resume::Reset(format!(
            "the exported namespaces changed after revision {since}; a new snapshot follows"
        ));
    }
    // What the client holds at `since`: what the same filter exported then.
    let mut held = Held::for_client(true);
    for prefix in wanted {
        let listing = match inner.store.list_at(prefix, since).await {
            Ok(l) => l,
            Err(clustermesh_kvstore::Error::Compacted { .. }) => {
                return Resume::Reset(format!(
                    "revision {since} is compacted; a new snapshot follows"
                ));
            }
            Err(e) => return Resume::Failed(e.to_string()),
        };
        for kv in listing.kvs {
            let t = inner.translate_put(true, &kv.key, &kv.value);
            if matches!(t, Translated::Upsert(_)) {
                held.pass(&kv.key, t);
            }
        }
    }
    Resume::From(held)
}

/// Sends every object under the wanted prefixes at one revision, then `Synced`.
async fn snapshot(
    inner: &Inner,
    remote: bool,
    wanted: &[String],
    tx: &EventTx,
    held: &mut Held,
) -> Result<Revision, Stop> {
    let fail = |e: clustermesh_kvstore::Error| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
            Stop::Gone
        }
    };
    let rev = match inner.store.current_revision().await {
        Ok(r) => r,
        Err(e) => return Err(fail(e).await),
    };
    for prefix in wanted {
        let listing = match inner.store.list_at(prefix, rev).await {
            Ok(l) => l,
            Err(e) => return Err(fail(e).await),
        };
        for kv in listing.kvs {
            match inner.translate_put(remote, &kv.key, &kv.value) {
                // A snapshot only carries what the client may hold.
                Translated::Delete(_) | Translated::Skip => {}
                t => {
                    let t = held.pass(&kv.key, t);
                    send_translated(inner, tx, kv.mod_revision, t, None).await?;
                }
            }
        }
    }
    send(inner, tx, rev, Ev::Synced(v1::Synced {})).await?;
    Ok(rev)
}

/// Streams changes after `from` until the client leaves or a new snapshot is needed.
/// What one watch stream follows, and where it sends.
struct Followed<'a, M: Fn(&str) -> bool> {
    remote: bool,
    common: &'a str,
    matches: &'a M,
    tx: &'a EventTx,
}

async fn follow<M: Fn(&str) -> bool>(
    inner: &Inner,
    stream: &Followed<'_, M>,
    from: Revision,
    held: &mut Held,
    mut namespaces: tokio::sync::watch::Receiver<Option<NamespaceFilter>>,
) -> Stop {
    let Followed {
        remote,
        common,
        matches,
        tx,
    } = *stream;
    let mut watch = match inner.store.watch(common, from).await {
        Ok(w) => w,
        Err(e) => {
            let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
            return Stop::Gone;
        }
    };
    let mut last = from;
    let mut shutdown = inner.shutdown.clone();
    // A heartbeat goes out when nothing was *sent* for the interval, however busy the store
    // is with keys this client does not watch.
    let mut beat_at = tokio::time::Instant::now() + inner.settings.heartbeat;
    loop {
        let next = tokio::select! {
            () = tx.closed() => return Stop::Gone,
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                let _ = tx.send(Err(Status::unavailable("the apiserver is shutting down"))).await;
                return Stop::Gone;
            }
            Ok(()) = namespaces.changed(), if remote => {
                let reset = Ev::Reset(v1::Reset {
                    reason: "the exported namespaces changed; a new snapshot follows".into(),
                });
                return match send(inner, tx, last, reset).await {
                    Ok(()) => Stop::Resnapshot,
                    Err(stop) => stop,
                };
            }
            next = tokio::time::timeout_at(beat_at, watch.next()) => next,
        };
        let result = match next {
            Err(_) => {
                beat_at = tokio::time::Instant::now() + inner.settings.heartbeat;
                send(inner, tx, last, Ev::Heartbeat(v1::Heartbeat {})).await
            }
            Ok(Some(Ok(event))) => {
                last = event.revision;
                if !matches(&event.key) {
                    continue;
                }
                let t = match event.kind {
                    EventKind::Put => inner.translate_put(remote, &event.key, &event.value),
                    EventKind::Delete => inner.translate_delete(&event.key),
                };
                let t = held.pass(&event.key, t);
                if !matches!(t, Translated::Skip) {
                    beat_at = tokio::time::Instant::now() + inner.settings.heartbeat;
                }
                send_change(inner, tx, remote, (&event.key, event.revision), t).await
            }
            Ok(Some(Err(clustermesh_kvstore::Error::Compacted { requested, .. }))) => {
                let reset = Ev::Reset(v1::Reset {
                    reason: format!("revision {requested} is compacted; a new snapshot follows"),
                });
                match send(inner, tx, last, reset).await {
                    Ok(()) => return Stop::Resnapshot,
                    Err(stop) => return stop,
                }
            }
            Ok(Some(Err(e))) => {
                let _ = tx.send(Err(Status::unavailable(e.to_string()))).await;
                return Stop::Gone;
            }
            Ok(None) => {
                let _ = tx
                    .send(Err(Status::unavailable("the store ended the watch")))
                    .await;
                return Stop::Gone;
            }
        };
        if let Err(stop) = result {
            return stop;
        }
    }
}

type WatchResponseStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl v1::export_server::Export for ExportService {
    async fn get_cluster_config(
        &self,
        req: Request<v1::GetClusterConfigRequest>,
    ) -> Result<Response<v1::ClusterConfig>, Status> {
        who(&req, &self.inner)?;
        let c = &self.inner.config;
        Ok(Response::new(v1::ClusterConfig {
            name: self.inner.cluster.to_string(),
            id: u32::from(c.id),
            synced_canaries: c.capabilities.synced_canaries,
            cached: c.capabilities.cached,
            max_connected_clusters: u32::from(c.capabilities.max_connected_clusters),
        }))
    }

    type WatchStream = WatchResponseStream;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let client = who(&req, &self.inner)?;
        let body = req.into_inner();
        let kinds: BTreeSet<i32> = body.kinds.iter().copied().collect();
        if kinds.is_empty()
            || kinds
                .iter()
                .any(|k| matches!(Kind::try_from(*k), Err(_) | Ok(Kind::Unspecified)))
        {
            return Err(Status::invalid_argument(
                "kinds must name at least one known kind",
            ));
        }
        let remote = matches!(client, ClientIdentity::Remote(_));
        let forbidden = kinds
            .iter()
            .find(|k| !REMOTE_KINDS.iter().any(|r| *r as i32 == **k));
        if let (true, Some(k)) = (remote, forbidden) {
            let name = Kind::try_from(*k)
                .map(|k| k.as_str_name())
                .unwrap_or("unknown");
            return Err(Status::permission_denied(format!(
                "{client} may not watch {name}"
            )));
        }
        if body.since_revision < 0 {
            return Err(Status::invalid_argument(
                "since_revision must not be negative",
            ));
        }
        // A remote holds at most a few streams: one importer needs one.
        let slot = match &client {
            ClientIdentity::Remote(name) => {
                let mut streams = self.inner.remote_streams.lock();
                let open = streams.entry(name.clone()).or_insert(0);
                let max = self.inner.settings.max_streams_per_remote;
                if *open >= max {
                    self.inner.metrics.export_streams_refused.inc();
                    return Err(Status::resource_exhausted(format!(
                        "cluster {name} already has {max} Export streams open (exportMaxStreamsPerRemote)"
                    )));
                }
                *open += 1;
                Some(RemoteStreamSlot {
                    streams: Arc::clone(&self.inner.remote_streams),
                    cluster: name.clone(),
                })
            }
            ClientIdentity::Local(_) => None,
        };
        let (tx, rx) = mpsc::channel(self.inner.settings.buffer);
        let inner = Arc::clone(&self.inner);
        if let ClientIdentity::Remote(name) = &client {
            // Disconnected while watching: the stream ends with the refusal.
            let mut peers = inner.peers.clone();
            let (name, tx) = (name.clone(), tx.clone());
            tokio::spawn(async move {
                loop {
                    if !peers.borrow_and_update().contains(&name) {
                        let _ = tx
                            .send(Err(Status::permission_denied(format!(
                                "cluster {name} was disconnected"
                            ))))
                            .await;
                        return;
                    }
                    tokio::select! {
                        r = peers.changed() => if r.is_err() { return },
                        () = tx.closed() => return,
                    }
                }
            });
        }
        inner.metrics.export_watchers.inc();
        tokio::spawn(async move {
            let metrics = Arc::clone(&inner.metrics);
            run_watch(inner, remote, kinds, body.since_revision, tx).await;
            metrics.export_watchers.dec();
            drop(slot);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_of_kinds() {
        let c1 = ClusterName::new("c1").unwrap();
        let all: Vec<String> = REMOTE_KINDS
            .iter()
            .flat_map(|k| prefixes(&c1, *k, true))
            .collect();
        assert_eq!(common_prefix(&all), "cilium/state/");
        let mixed: Vec<String> = [Kind::Nodes, Kind::Policies]
            .iter()
            .flat_map(|k| prefixes(&c1, *k, false))
            .collect();
        assert_eq!(
            common_prefix(&mixed),
            "c",
            "a byte-wise prefix; the watch filters the rest"
        );
        assert_eq!(
            common_prefix(&prefixes(&c1, Kind::Policies, false)),
            "clustermesh/local/"
        );
    }
}
