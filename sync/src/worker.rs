//! The sync worker of one remote cluster: connect (mTLS, `remote-<local>` certificate), check
//! the remote's cluster config, stage its snapshot and replace the cached state at `Synced`,
//! follow changes, resume from the last applied revision after failures (exponential backoff
//! with jitter), and drive the staleness contract, publishing the remote's status for the
//! local agents under `clustermesh/local/cluster-status/<remote>`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use clustermesh_kvstore::{KvStore, Write};
use clustermesh_model::cluster::{ClusterId, ClusterName, ClusterStatus, MaxConnectedClusters};
use clustermesh_model::keys::{CachedObject, ExportKind, Key};
use clustermesh_model::node::Node;
use clustermesh_model::service::ClusterService;
use clustermesh_proto::Object;
use clustermesh_proto::client::{ClientTls, connect};
use clustermesh_proto::v1::{self, watch_event::Event as Ev};
use clustermesh_telemetry::{Origin, Provenance, seconds_since};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ownership::IpOwners;
use crate::staleness::{Staleness, StalenessConfig};
use crate::validate::{Reject, Remote, cache_entry, cache_key_of_delete, restrict_backends};

/// One configured remote cluster.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Its name, as it must report it.
    pub name: ClusterName,
    /// Its ID, as it must report it.
    pub id: u32,
    /// Its Export address, `host:port`.
    pub address: String,
    /// Its CA and our `remote-<local>` certificate.
    pub tls: ClientTls,
    /// A Cilium cluster's etcd to read instead of an Export server (a remote of kind
    /// `etcd`; `address` then only names it in messages).
    pub etcd: Option<clustermesh_kvstore::etcd::EtcdConfig>,
}

/// Where a session's events come from.
enum Events {
    /// An Export server's watch stream.
    Grpc(Box<tonic::Streaming<v1::WatchEvent>>),
    /// A Cilium cluster's etcd, read by [`crate::etcd_source`].
    Etcd(tokio::sync::mpsc::Receiver<Result<v1::WatchEvent, SessionError>>),
}

impl Events {
    async fn next(&mut self) -> Result<Option<v1::WatchEvent>, SessionError> {
        match self {
            Self::Grpc(s) => Ok(s.message().await?),
            Self::Etcd(rx) => rx.recv().await.transpose(),
        }
    }
}

/// How a session reached its remote, before its events are asked for.
enum Connected {
    Grpc(clustermesh_proto::v1::export_client::ExportClient<tonic::transport::Channel>),
    Etcd(crate::etcd_source::EtcdRemote),
}

/// What every worker of one apiserver shares.
#[derive(Clone)]
pub struct SyncContext {
    /// The local cluster.
    pub local: ClusterName,
    /// Its ID.
    pub local_id: ClusterId,
    /// The mesh size mode.
    pub mode: MaxConnectedClusters,
    /// The local store the cache is written to.
    pub store: Arc<dyn KvStore>,
    /// The staleness durations.
    pub staleness: StalenessConfig,
    /// Remote IDs currently connected, to refuse collisions.
    pub connected_ids: Arc<Mutex<BTreeMap<u16, ClusterName>>>,
    /// The panic threshold published with each remote's status: agents keep a withdrawn
    /// cluster's backends when they are a global service's last ones.
    pub keep_last_backends: bool,
    /// What one remote may place in the store.
    pub quota: Quota,
    /// Which remote owns each imported pod IP.
    pub ip_owners: Arc<IpOwners>,
    /// Where each imported change's origin is recorded with its write, for the Export server
    /// to hand it on to the agents.
    pub provenance: Arc<Provenance>,
    /// Called for each change imported from a remote with its origin: the remote, and the
    /// seconds from its origin until it was in the cache (the propagation metric).
    pub propagated: Propagated,
}

/// See [`SyncContext::propagated`].
pub type Propagated = Arc<dyn Fn(&ClusterName, f64) + Send + Sync>;

/// What one remote may place in this cluster's store: objects per kind, bytes (keys and
/// values of its cache), and the size of one object. A staged snapshot is held to the same
/// limits. Crossing one stops that remote's import: the session ends, what was synced stays,
/// the status and the metric say which limit, and the import is tried again after
/// `retry_after`. Other remotes are not touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Identities (a cluster's identity range holds at most 65,536).
    pub identities: usize,
    /// ipcache entries (pod IPs).
    pub ip: usize,
    /// Nodes.
    pub nodes: usize,
    /// Global services.
    pub services: usize,
    /// Bytes of keys and values in the remote's cache.
    pub bytes: u64,
    /// Bytes of one encoded object; a larger one is rejected (counted), the rest imported.
    pub object_bytes: usize,
    /// How long to wait before importing again after a quota stop.
    pub retry_after: Duration,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            identities: 65_536,
            ip: 262_144,
            nodes: 16_384,
            services: 65_536,
            bytes: 512 * 1024 * 1024,
            object_bytes: crate::validate::MAX_OBJECT_BYTES,
            retry_after: Duration::from_secs(60),
        }
    }
}

impl Quota {
    fn max_objects(&self, kind: &str) -> usize {
        match kind {
            "identities" => self.identities,
            "ip" => self.ip,
            "nodes" => self.nodes,
            "services" => self.services,
            _ => 0,
        }
    }
}

/// What `clustermesh status` shows for a remote.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemoteStatus {
    /// The remote's name.
    pub name: String,
    /// A session is up.
    pub connected: bool,
    /// Its snapshot has been imported at least once (its cache is complete as of some time).
    pub imported: bool,
    /// In use now: connected, imported and not withdrawn ([`RemoteStatus::with_ready`]).
    pub ready: bool,
    /// Objects in its cache, per kind.
    pub counts: BTreeMap<String, usize>,
    /// Failed sessions so far.
    pub failures: u64,
    /// The last failure.
    pub last_failure: Option<String>,
    /// When it happened (Unix seconds).
    pub last_failure_time: Option<u64>,
    /// Seconds since the last message from the remote.
    pub seconds_since_last_message: f64,
    /// Its backends are withdrawn from global services.
    pub withdrawn: bool,
    /// Objects rejected, by `kind/reason`.
    pub rejected: BTreeMap<String, u64>,
    /// Full snapshots applied (1 after the first sync; resumes do not add to it).
    pub full_syncs: u64,
    /// Kinds whose sync canary is written in the cache (all at once: one stream carries
    /// every kind).
    pub synced: Vec<String>,
    /// Why the remote is refused (name, ID or mesh size mismatch), if it is.
    pub refused: Option<String>,
    /// The quota the remote crossed, while its import is stopped for it.
    pub quota_exceeded: Option<String>,
    /// Imports stopped by a quota so far.
    pub quota_stops: u64,
    /// Bytes of keys and values in its cache.
    pub bytes: u64,
    /// Sessions ended because writing its cache into the store failed.
    pub store_errors: u64,
    /// When its first snapshot was imported (Unix seconds), once it was.
    pub first_import_unix: Option<f64>,
    /// Objects of a snapshot being staged, per kind, before they are written to the store in
    /// one transaction (empty when none is).
    pub staged: BTreeMap<String, usize>,
}

impl RemoteStatus {
    /// This status with `ready` worked out from the rest: a remote is ready only while it is
    /// connected, its snapshot is imported and its backends are not withdrawn.
    pub fn with_ready(mut self) -> Self {
        self.ready = self.connected && self.imported && !self.withdrawn;
        self
    }
}

/// A running worker.
pub struct RemoteWorker {
    /// Its status, updated as it runs.
    pub status: Arc<Mutex<RemoteStatus>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RemoteWorker {
    /// Starts the worker of `remote`.
    pub fn spawn(ctx: SyncContext, remote: RemoteConfig) -> Self {
        let status = Arc::new(Mutex::new(RemoteStatus {
            name: remote.name.to_string(),
            ..RemoteStatus::default()
        }));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(ctx, remote, Arc::clone(&status), stop_rx));
        Self { status, stop, task }
    }

    /// Stops the worker (the cache stays; removing it is the caller's decision).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Claims the pod IP `key` names (if it names one) for `remote`.
fn claim(owners: &IpOwners, remote: &ClusterName, key: &str) -> Result<(), Reject> {
    match ip_of(key) {
        Some(ip) => owners.claim(ip, remote).map_err(|owner| Reject {
            kind: "ip",
            reason: "conflict",
            detail: format!("{ip} belongs to cluster {owner}"),
        }),
        None => Ok(()),
    }
}

fn kind_label(key: &str) -> String {
    match Key::parse(key).ok().and_then(|k| k.export_kind()) {
        Some(k) => k.segment().to_owned(),
        None => "other".to_owned(),
    }
}

/// A set of keys and values with its size per kind and in bytes: the remote's cache, or a
/// snapshot being staged.
#[derive(Debug, Default)]
struct Tracked {
    entries: BTreeMap<String, Vec<u8>>,
    counts: BTreeMap<String, usize>,
    bytes: u64,
    /// The remote's pod IPs (its ipcache keys).
    ips: HashSet<IpAddr>,
    /// Its nodes' addresses, with the number of nodes that have each.
    node_addrs: HashMap<IpAddr, usize>,
    /// The service keys that have each address as a backend.
    backend_refs: HashMap<IpAddr, HashSet<String>>,
}

/// A service rewritten without some backends: its key, its new value, the addresses removed.
type Rewrite = (String, Vec<u8>, Vec<IpAddr>);

/// The backend addresses of a cached service value.
fn service_backends(key: &str, value: &[u8]) -> Vec<IpAddr> {
    match cached_object(key) {
        Some(CachedObject::Service { .. }) => serde_json::from_slice::<ClusterService>(value)
            .map(|s| s.backends.into_keys().collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The addresses a cache entry makes the remote's own (a pod IP, a node's addresses): what
/// stops being the remote's own when the entry changes or goes.
fn own_addresses(key: &str, value: &[u8]) -> Vec<IpAddr> {
    let mut out = node_addresses(key, value);
    out.extend(ip_of(key));
    out
}

fn cached_object(key: &str) -> Option<CachedObject> {
    match Key::parse(key).ok()? {
        Key::Cached { object, .. } => Some(object),
        _ => None,
    }
}

/// The pod IP a cache key names.
fn ip_of(key: &str) -> Option<IpAddr> {
    match cached_object(key)? {
        CachedObject::IpCache(ip) => Some(ip),
        _ => None,
    }
}

fn node_addresses(key: &str, value: &[u8]) -> Vec<IpAddr> {
    match cached_object(key) {
        Some(CachedObject::Node(_)) => serde_json::from_slice::<Node>(value)
            .map(|n| n.addresses.iter().map(|a| a.ip).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn weight(key: &str, value: &[u8]) -> u64 {
    u64::try_from(key.len() + value.len()).unwrap_or(u64::MAX)
}

impl Tracked {
    fn new(entries: BTreeMap<String, Vec<u8>>) -> Self {
        let mut t = Self::default();
        for (k, v) in entries {
            t.insert(k, v);
        }
        t
    }

    fn index(&mut self, key: &str, value: &[u8], add: bool) {
        if let Some(ip) = ip_of(key) {
            if add {
                self.ips.insert(ip);
            } else {
                self.ips.remove(&ip);
            }
        }
        for addr in service_backends(key, value) {
            if add {
                self.backend_refs
                    .entry(addr)
                    .or_default()
                    .insert(key.to_owned());
            } else if let Some(keys) = self.backend_refs.get_mut(&addr) {
                keys.remove(key);
                if keys.is_empty() {
                    self.backend_refs.remove(&addr);
                }
            }
        }
        for addr in node_addresses(key, value) {
            if add {
                *self.node_addrs.entry(addr).or_insert(0) += 1;
            } else if let Some(n) = self.node_addrs.get_mut(&addr) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.node_addrs.remove(&addr);
                }
            }
        }
    }

    /// The services whose backends include an address among `addrs` that is no longer one
    /// of this set's own endpoints (pod IPs, node addresses), each with its value without
    /// those backends and the addresses removed, by key.
    fn lost_backends(
        &self,
        addrs: impl IntoIterator<Item = IpAddr>,
    ) -> Result<Vec<Rewrite>, clustermesh_kvstore::Error> {
        let lost: HashSet<IpAddr> = addrs
            .into_iter()
            .filter(|a| !self.ips.contains(a) && !self.node_addrs.contains_key(a))
            .collect();
        let mut keys: Vec<&String> = lost
            .iter()
            .filter_map(|a| self.backend_refs.get(a))
            .flatten()
            .collect();
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for key in keys {
            let Some(value) = self.entries.get(key) else {
                continue;
            };
            let Ok(mut service) = serde_json::from_slice::<ClusterService>(value) else {
                continue;
            };
            let removed = restrict_backends(&mut service, |ip| !lost.contains(ip));
            if removed.is_empty() {
                continue;
            }
            let value = serde_json::to_vec(&service)
                .map_err(|e| clustermesh_kvstore::Error::UnexpectedResponse(e.to_string()))?;
            out.push((key.clone(), value, removed));
        }
        Ok(out)
    }

    /// Removes from this set's services every backend that is not one of its own endpoints
    /// (a staged snapshot, whose pod IPs and nodes may have gone after its services came);
    /// the services changed, with the addresses removed. Removing backends only shrinks the
    /// set, so no quota applies.
    fn drop_lost_backends(
        &mut self,
    ) -> Result<Vec<(String, Vec<IpAddr>)>, clustermesh_kvstore::Error> {
        let addrs: Vec<IpAddr> = self.backend_refs.keys().copied().collect();
        let mut changed = Vec::new();
        for (key, value, removed) in self.lost_backends(addrs)? {
            self.insert(key.clone(), value);
            changed.push((key, removed));
        }
        Ok(changed)
    }

    /// Whether writing `key` keeps this set within `quota`.
    fn admit(&self, quota: &Quota, key: &str, value: &[u8]) -> Result<(), SessionError> {
        let old = self.entries.get(key);
        let kind = kind_label(key);
        if old.is_none() {
            let n = self.counts.get(&kind).copied().unwrap_or(0);
            let max = quota.max_objects(&kind);
            if n >= max {
                return Err(SessionError::Quota(format!(
                    "more than {max} {kind} objects"
                )));
            }
        }
        let bytes = self
            .bytes
            .saturating_sub(old.map_or(0, |v| weight(key, v)))
            .saturating_add(weight(key, value));
        if bytes > quota.bytes {
            return Err(SessionError::Quota(format!(
                "more than {} bytes of objects",
                quota.bytes
            )));
        }
        Ok(())
    }

    /// Writes `key` (after [`Tracked::admit`]).
    fn insert(&mut self, key: String, value: Vec<u8>) {
        self.remove(&key);
        self.bytes = self.bytes.saturating_add(weight(&key, &value));
        *self.counts.entry(kind_label(&key)).or_insert(0) += 1;
        self.index(&key, &value, true);
        self.entries.insert(key, value);
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.entries.remove(key) {
            Some(old) => {
                self.bytes = self.bytes.saturating_sub(weight(key, &old));
                if let Some(n) = self.counts.get_mut(&kind_label(key)) {
                    *n = n.saturating_sub(1);
                }
                self.index(key, &old, false);
                true
            }
            None => false,
        }
    }
}

/// The worker's view of the remote's cache, mirrored in memory so that only changes are
/// written.
struct Cache {
    store: Arc<dyn KvStore>,
    provenance: Arc<Provenance>,
    remote: ClusterName,
    state: Tracked,
}

impl Cache {
    async fn load(
        store: Arc<dyn KvStore>,
        provenance: Arc<Provenance>,
        remote: &ClusterName,
    ) -> Result<Self, clustermesh_kvstore::Error> {
        let mut entries = BTreeMap::new();
        for kind in ExportKind::ALL {
            for kv in store.list(&kind.cache_prefix(remote)).await?.kvs {
                entries.insert(kv.key, kv.value);
            }
        }
        Ok(Self {
            store,
            provenance,
            remote: remote.clone(),
            state: Tracked::new(entries),
        })
    }

    /// Claims the pod IPs of the loaded cache; an address another remote's cache already
    /// holds (written before ownership was checked) is deleted from this one and returned.
    async fn claim_loaded(
        &mut self,
        owners: &IpOwners,
    ) -> Result<Vec<Reject>, clustermesh_kvstore::Error> {
        let mut lost = Vec::new();
        let mut gone = Vec::new();
        let keys: Vec<String> = self.state.entries.keys().cloned().collect();
        for key in keys {
            if let Err(reject) = claim(owners, &self.remote, &key) {
                if let Some(revision) = self.store.delete(&key).await? {
                    self.provenance.advance(revision);
                }
                gone.extend(ip_of(&key));
                self.state.remove(&key);
                lost.push(reject);
            }
        }
        // The services lose these backends too (they are another cluster's now).
        for (key, value, removed) in self.state.lost_backends(gone)? {
            let revision = self.store.put(&key, &value, None).await?;
            self.provenance.advance(revision);
            self.state.insert(key.clone(), value);
            lost.push(dropped_reject(&self.remote, &key, &removed));
        }
        Ok(lost)
    }

    /// Writes a changed entry, recording `origin` with the write.
    async fn put(
        &mut self,
        quota: &Quota,
        (key, value): (String, Vec<u8>),
        origin: Option<&Arc<Origin>>,
    ) -> Result<(), SessionError> {
        if self.state.entries.get(&key) != Some(&value) {
            self.state.admit(quota, &key, &value)?;
            let pending = origin.map(|o| self.provenance.expect(&key, o));
            let revision = self.store.put(&key, &value, None).await?;
            match pending {
                Some(p) => p.written(revision),
                None => self.provenance.advance(revision),
            }
            self.state.insert(key, value);
        }
        Ok(())
    }

    /// Deletes an entry, recording `origin` with the deletion.
    async fn delete(
        &mut self,
        key: &str,
        origin: Option<&Arc<Origin>>,
    ) -> Result<(), clustermesh_kvstore::Error> {
        if self.state.entries.contains_key(key) {
            let pending = origin.map(|o| self.provenance.expect(key, o));
            match (self.store.delete(key).await?, pending) {
                (Some(revision), Some(p)) => p.written(revision),
                (Some(revision), None) => self.provenance.advance(revision),
                (None, _) => {}
            }
            self.state.remove(key);
        }
        Ok(())
    }

    /// Makes the cache equal to a complete snapshot: the changed and new keys, the deletions
    /// of keys the snapshot lacks, and the sync canaries go to the store in one transaction
    /// (one revision) when the store's limits allow; otherwise in consecutive transactions in
    /// that order, so that a reader never misses a key the snapshot holds.
    async fn replace(&mut self, snapshot: Tracked) -> Result<(), clustermesh_kvstore::Error> {
        let mut writes: Vec<Write> = self
            .state
            .entries
            .keys()
            .filter(|k| !snapshot.entries.contains_key(*k))
            .map(|k| Write::Delete { key: k.clone() })
            .collect();
        writes.splice(
            0..0,
            snapshot
                .entries
                .iter()
                .filter(|(k, v)| self.state.entries.get(*k) != Some(*v))
                .map(|(k, v)| Write::Put {
                    key: k.clone(),
                    value: v.clone(),
                }),
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for kind in ExportKind::ALL {
            writes.push(Write::Put {
                key: kind.cache_synced_key(&self.remote),
                value: now.to_string().into_bytes(),
            });
        }
        for chunk in self.store.txn_limits().split(&writes) {
            if let Some(revision) = self.store.apply(chunk).await? {
                self.provenance.advance(revision);
            }
        }
        self.state = snapshot;
        Ok(())
    }

    fn counts(&self) -> BTreeMap<String, usize> {
        self.state.counts.clone()
    }

    /// Removes, from the remote's cached services, the backends among `addrs` that are no
    /// longer the remote's own endpoints (its pod IP was deleted, its node went or changed
    /// address): an address the remote gave up may be claimed by another cluster next, and
    /// the remote's service must not keep pointing at it. Returns the services changed, with
    /// the addresses removed.
    async fn drop_lost_backends(
        &mut self,
        quota: &Quota,
        addrs: &[IpAddr],
    ) -> Result<Vec<(String, Vec<IpAddr>)>, SessionError> {
        let mut changed = Vec::new();
        for (key, value, removed) in self.state.lost_backends(addrs.iter().copied())? {
            self.put(quota, (key.clone(), value), None).await?;
            changed.push((key, removed));
        }
        Ok(changed)
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("connecting failed: {0}")]
    Connect(String),
    #[error("reading the remote's etcd failed: {0}")]
    RemoteStore(String),
    #[error("the remote refused the call: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("refused: {0}")]
    Refused(String),
    #[error("no message for {0:?}")]
    Silent(Duration),
    #[error("the remote closed the stream")]
    Closed,
    #[error("writing the cache failed: {0}")]
    Store(#[from] clustermesh_kvstore::Error),
    #[error("quota exceeded: {0}; the import stops, what was synced stays")]
    Quota(String),
    #[error("stopped")]
    Stopped,
}

async fn publish(ctx: &SyncContext, remote: &ClusterName, status: &RemoteStatus) {
    let value = ClusterStatus {
        cluster: remote.clone(),
        connected: status.connected,
        ready: status.imported,
        withdrawn: status.withdrawn,
        keep_last_backends: ctx.keep_last_backends,
        failures: status.failures,
        last_failure_time: status.last_failure_time.unwrap_or(0),
    };
    let key = Key::ClusterStatus {
        cluster: remote.clone(),
    }
    .to_string();
    let Ok(bytes) = serde_json::to_vec(&value) else {
        return;
    };
    if let Err(e) = ctx.store.put(&key, &bytes, None).await {
        tracing::warn!(remote = %remote, error = %e, "publishing the remote's status failed");
    }
}

async fn run(
    ctx: SyncContext,
    remote: RemoteConfig,
    status: Arc<Mutex<RemoteStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let staleness = Arc::new(Mutex::new(Staleness::new(ctx.staleness, Instant::now())));
    let ticker = tokio::spawn(tick(
        ctx.clone(),
        remote.name.clone(),
        Arc::clone(&staleness),
        Arc::clone(&status),
        stop.clone(),
    ));
    let mut cache = load_cache(&ctx, &remote.name, &status, &mut stop).await;
    let mut last_revision = 0;
    let mut reconnect = Reconnect::default();
    loop {
        let mut synced = false;
        let started = Instant::now();
        let result = tokio::select! {
            r = session(&ctx, &remote, &status, &staleness, &mut cache, &mut last_revision, &mut synced) => r,
            _ = stop.wait_for(|s| *s) => Err(SessionError::Stopped),
        };
        match &result {
            // The store may hold writes the mirror missed (a timed-out put that committed, a
            // replace cut between transactions): read it again, then take a full snapshot.
            Err(SessionError::Store(_)) => {
                cache = load_cache(&ctx, &remote.name, &status, &mut stop).await;
                last_revision = 0;
            }
            // A resume would replay the object that crossed the quota before any change that
            // brings the remote back under it: the next session takes a full snapshot.
            Err(SessionError::Quota(_)) => last_revision = 0,
            _ => {}
        }
        // Addresses claimed by a snapshot that was never applied go back.
        ctx.ip_owners.release_except(&remote.name, &cache.state.ips);
        if let Ok(id) = u16::try_from(remote.id) {
            ctx.connected_ids.lock().remove(&id);
        }
        {
            let now = Instant::now();
            let mut st = staleness.lock();
            st.set_synced(false, now);
            // A broken stream (reset, transport error, refused reconnect) is known now; a hung
            // peer is caught by its silence.
            if !matches!(result, Err(SessionError::Stopped)) {
                st.disconnected(now);
            }
        }
        {
            let mut s = status.lock();
            s.connected = false;
            // A snapshot not applied is no longer queued.
            s.staged.clear();
            match &result {
                Err(SessionError::Stopped) => {}
                Err(e) => {
                    s.failures += 1;
                    s.last_failure = Some(e.to_string());
                    s.last_failure_time = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_secs());
                    s.refused = matches!(e, SessionError::Refused(_)).then(|| e.to_string());
                    if matches!(e, SessionError::Store(_)) {
                        s.store_errors += 1;
                    }
                    if let SessionError::Quota(q) = e {
                        s.quota_exceeded = Some(q.clone());
                        s.quota_stops += 1;
                    }
                }
                Ok(()) => {}
            }
        }
        let mut delay = reconnect.after_session(synced && started.elapsed() >= STABLE_SESSION);
        match result {
            Err(SessionError::Stopped) => break,
            Err(SessionError::Quota(q)) => {
                tracing::error!(remote = %remote.name, quota = %q, retry_after = ?ctx.quota.retry_after, "the remote crossed a quota: its import is stopped, what was synced stays");
                delay = ctx.quota.retry_after;
            }
            Err(e) => {
                tracing::warn!(remote = %remote.name, error = %e, synced, retry_in = ?delay, "sync session ended")
            }
            Ok(()) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = ticker.await;
}

/// Reads the remote's cache from the store and claims its pod IPs (retrying every second
/// until the store answers, or until stopped).
async fn load_cache(
    ctx: &SyncContext,
    remote: &ClusterName,
    status: &Mutex<RemoteStatus>,
    stop: &mut watch::Receiver<bool>,
) -> Cache {
    loop {
        let loaded =
            match Cache::load(Arc::clone(&ctx.store), Arc::clone(&ctx.provenance), remote).await {
                Ok(mut c) => c.claim_loaded(&ctx.ip_owners).await.map(|lost| (c, lost)),
                Err(e) => Err(e),
            };
        match loaded {
            Ok((c, lost)) => {
                for reject in &lost {
                    count_reject(status, remote, reject);
                }
                let mut st = status.lock();
                st.counts = c.counts();
                st.bytes = c.state.bytes;
                return c;
            }
            Err(e) => {
                tracing::warn!(remote = %remote, error = %e, "reading the cache failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => {
                        return Cache {
                            store: Arc::clone(&ctx.store),
                            provenance: Arc::clone(&ctx.provenance),
                            remote: remote.clone(),
                            state: Tracked::default(),
                        };
                    }
                }
            }
        }
    }
}

/// The longest wait between reconnects (before jitter): a remote that comes back is found
/// within about this long, and a dead peer costs a refused TCP connect this often.
const RECONNECT_MAX: Duration = Duration::from_secs(2);

fn new_backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(RECONNECT_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

/// How long a session must have lasted, in sync, for the reconnect wait to start again: a peer
/// that accepts, says one thing and fails is not reconnected to in a tight loop.
const STABLE_SESSION: Duration = Duration::from_secs(3);

/// The wait before reconnecting: exponential (100 ms up to 2 s, with jitter) over sessions
/// that failed before they were in sync, and back to the start after a session that was in
/// sync (it received a complete snapshot, or resumed and heard from the remote) and lasted
/// [`STABLE_SESSION`], so that a remote that restarts after hours of service is reconnected
/// at once.
struct Reconnect {
    backoff: backon::ExponentialBackoff,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            backoff: new_backoff(),
        }
    }
}

impl Reconnect {
    /// The wait after a session that ended; `stable`: it was in sync and lasted
    /// [`STABLE_SESSION`].
    fn after_session(&mut self, stable: bool) -> Duration {
        if stable {
            self.backoff = new_backoff();
        }
        self.backoff.next().unwrap_or(RECONNECT_MAX)
    }
}

/// Drives the staleness state machine and publishes status changes.
async fn tick(
    ctx: SyncContext,
    remote: ClusterName,
    staleness: Arc<Mutex<Staleness>>,
    status: Arc<Mutex<RemoteStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut published: Option<(bool, bool, bool, u64)> = None;
    loop {
        let now = Instant::now();
        let snapshot = {
            let mut st = staleness.lock();
            st.tick(now);
            let mut s = status.lock();
            s.withdrawn = st.withdrawn();
            s.seconds_since_last_message = st.silence(now).as_secs_f64();
            s.ready = s.connected && s.imported && !s.withdrawn;
            s.clone()
        };
        let state = (
            snapshot.connected,
            snapshot.imported,
            snapshot.withdrawn,
            snapshot.failures,
        );
        if published != Some(state) {
            publish(&ctx, &remote, &snapshot).await;
            published = Some(state);
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Writes `cilium/cluster-config/<remote>` as KVStoreMesh mirrors it: the remote's ID and
/// mesh size with `cached: true`, which tells a Cilium agent reading this kvstore to take the
/// remote's state from `cilium/cache/...` and to wait for its canaries there. Written when
/// the remote's config has been checked, before any of its state (the canaries mark when that
/// is complete); rewritten only when it differs.
pub async fn mirror_cluster_config(
    store: &dyn KvStore,
    remote: &ClusterName,
    id: ClusterId,
    mode: MaxConnectedClusters,
) -> Result<(), clustermesh_kvstore::Error> {
    let config = clustermesh_model::cluster::ClusterConfig {
        id,
        capabilities: clustermesh_model::cluster::Capabilities {
            synced_canaries: true,
            cached: true,
            max_connected_clusters: mode,
            // Remotes of this project export no MCS-API ServiceExports.
            service_exports_enabled: Some(false),
        },
    };
    let key = Key::ClusterConfig {
        cluster: remote.clone(),
    }
    .to_string();
    let value = serde_json::to_vec(&config).unwrap_or_default();
    if store.get(&key).await?.map(|kv| kv.value) != Some(value.clone()) {
        store.put(&key, &value, None).await?;
    }
    Ok(())
}

async fn session(
    ctx: &SyncContext,
    remote: &RemoteConfig,
    status: &Mutex<RemoteStatus>,
    staleness: &Mutex<Staleness>,
    cache: &mut Cache,
    last_revision: &mut i64,
    synced: &mut bool,
) -> Result<(), SessionError> {
    let (config, connected) = match &remote.etcd {
        Some(etcd) => {
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                crate::etcd_source::connect(etcd, &remote.name),
            )
            .await
            .map_err(|_| SessionError::Connect("timed out".into()))??;
            let config = v1::ClusterConfig {
                name: remote.name.to_string(),
                id: u32::from(r.config.id.get()),
                max_connected_clusters: u32::from(r.config.capabilities.max_connected_clusters),
                ..v1::ClusterConfig::default()
            };
            (config, Connected::Etcd(r))
        }
        None => {
            let mut client = tokio::time::timeout(
                Duration::from_secs(10),
                connect(&remote.address, &remote.tls),
            )
            .await
            .map_err(|_| SessionError::Connect("timed out".into()))?
            .map_err(|e| SessionError::Connect(clustermesh_proto::client::error_chain(&e)))?;
            let config = client
                .get_cluster_config(v1::GetClusterConfigRequest {})
                .await?
                .into_inner();
            (config, Connected::Grpc(client))
        }
    };
    let mode_max = u32::from(ctx.mode);
    if config.name != remote.name.as_str() {
        return Err(SessionError::Refused(format!(
            "the remote at {} is cluster {:?}, configured as {}",
            remote.address, config.name, remote.name
        )));
    }
    if config.id != remote.id {
        return Err(SessionError::Refused(format!(
            "cluster {} reports ID {}, configured as {}",
            remote.name, config.id, remote.id
        )));
    }
    if config.max_connected_clusters != mode_max {
        return Err(SessionError::Refused(format!(
            "cluster {} uses maxConnectedClusters {}, this cluster {mode_max}",
            remote.name, config.max_connected_clusters
        )));
    }
    let id =
        ClusterId::new(config.id, ctx.mode).map_err(|e| SessionError::Refused(e.to_string()))?;
    if id == ctx.local_id || remote.name == ctx.local {
        return Err(SessionError::Refused(format!(
            "cluster {} collides with the local cluster (name or ID {})",
            remote.name, id
        )));
    }
    {
        let mut ids = ctx.connected_ids.lock();
        match ids.get(&id.get()) {
            Some(other) if other != &remote.name => {
                return Err(SessionError::Refused(format!(
                    "cluster {} has ID {id}, already used by connected cluster {other}",
                    remote.name
                )));
            }
            _ => {
                ids.insert(id.get(), remote.name.clone());
            }
        }
    }
    let target = Remote {
        name: remote.name.clone(),
        id,
        mode: ctx.mode,
        max_object_bytes: ctx.quota.object_bytes,
    };
    mirror_cluster_config(ctx.store.as_ref(), &remote.name, id, ctx.mode).await?;

    // A resume needs a revision to resume from (none after a store failure or a quota stop).
    // An etcd remote is always read in full (its revisions are not ours to resume from).
    let resume = remote.etcd.is_none() && status.lock().imported && *last_revision > 0;
    let since = if resume { *last_revision } else { 0 };
    let kinds = [
        v1::Kind::Identities,
        v1::Kind::Ipcache,
        v1::Kind::Nodes,
        v1::Kind::Services,
    ];
    let request = v1::WatchRequest {
        kinds: kinds.iter().map(|k| *k as i32).collect(),
        since_revision: since,
    };
    let mut stream = match connected {
        Connected::Grpc(mut client) => {
            Events::Grpc(Box::new(client.watch(request).await?.into_inner()))
        }
        // Heartbeats often enough for the staleness machine to see a live remote.
        Connected::Etcd(r) => Events::Etcd(
            r.events(
                (ctx.staleness.unreachable_after / 4)
                    .clamp(Duration::from_millis(50), Duration::from_secs(1)),
            ),
        ),
    };
    {
        let mut st = status.lock();
        st.connected = true;
        // Its config passed the checks: whatever refused an earlier session no longer does.
        st.refused = None;
    }
    // Reachable again at the first message, not at the stream's opening: a peer that
    // accepts and then fails stays unreachable (and is withdrawn on time).
    let mut staging: Option<Tracked> = (!resume).then(Tracked::default);
    // A stream that carries nothing, not even heartbeats, until the remote would be withdrawn
    // is dead: end it and reconnect. (Unreachability itself is the staleness machine's call,
    // made from the time of the last message, not from this timeout.)
    let silence = ctx.staleness.unreachable_after + ctx.staleness.withdraw_after;
    loop {
        let message = tokio::time::timeout(silence, stream.next())
            .await
            .map_err(|_| SessionError::Silent(silence))??
            .ok_or(SessionError::Closed)?;
        {
            let mut st = staleness.lock();
            st.message(Instant::now());
            // A resumed session is in sync from its first message on.
            if resume && !*synced {
                st.set_synced(true, Instant::now());
            }
        }
        *synced |= resume;
        let revision = message.revision;
        // A live change's origin (a snapshot's objects have none): measured, and traced when
        // it carries a sampled trace context. The span lasts until the change is handled.
        let origin = staging
            .is_none()
            .then(|| Origin::from_proto(message.origin.as_ref()))
            .flatten();
        let import = clustermesh_telemetry::step!(
            origin.as_ref().and_then(|o| o.trace.as_ref()),
            "remote import applied",
            cluster = %ctx.local,
            remote = %remote.name,
            revision
        );
        match message.event {
            Some(Ev::Upsert(u)) => {
                let object = Object::try_from(&u).map_err(|e| crate::validate::Reject {
                    kind: "other",
                    reason: "malformed",
                    detail: e.to_string(),
                });
                // A node address serves as a backend (host-network pods) only when no pod of
                // this cluster has it and no other remote owns it.
                let mut local_pods = HashSet::new();
                if let Ok(Object::Service(s)) = &object {
                    let state = staging.as_ref().unwrap_or(&cache.state);
                    let candidates: Vec<IpAddr> = s
                        .backends
                        .keys()
                        .filter(|ip| !state.ips.contains(ip) && state.node_addrs.contains_key(ip))
                        .copied()
                        .collect();
                    for ip in candidates {
                        if ctx
                            .store
                            .get(&Key::IpCache { ip }.to_string())
                            .await?
                            .is_some()
                        {
                            local_pods.insert(ip);
                        }
                    }
                }
                let entry = object
                    .and_then(|mut o| {
                        // A service that is valid otherwise keeps only the remote's own
                        // endpoints as backends (an invalid one is rejected whole below).
                        if let Object::Service(s) = &mut o
                            && s.check_from_cluster(&remote.name, id).is_ok()
                        {
                            let state = staging.as_ref().unwrap_or(&cache.state);
                            let foreign = restrict_backends(s, |ip| {
                                state.ips.contains(ip)
                                    || (state.node_addrs.contains_key(ip)
                                        && !local_pods.contains(ip)
                                        && ctx
                                            .ip_owners
                                            .owner(ip)
                                            .is_none_or(|o| o == remote.name))
                            });
                            if !foreign.is_empty() {
                                count_reject(
                                    status,
                                    &remote.name,
                                    &Reject {
                                        kind: "services",
                                        reason: "foreign-backend",
                                        detail: format!(
                                            "{}/{}: {foreign:?} are not endpoints of {}; imported without them",
                                            s.namespace, s.name, remote.name
                                        ),
                                    },
                                );
                            }
                        }
                        cache_entry(&target, &o)
                    })
                    .and_then(|(key, value)| {
                        claim(&ctx.ip_owners, &remote.name, &key).map(|()| (key, value))
                    });
                match entry {
                    Ok((key, value)) => match &mut staging {
                        Some(stage) => {
                            stage.admit(&ctx.quota, &key, &value)?;
                            stage.insert(key, value);
                            status.lock().staged.clone_from(&stage.counts);
                        }
                        None => {
                            let before = cache
                                .state
                                .entries
                                .get(&key)
                                .map(|old| own_addresses(&key, old))
                                .unwrap_or_default();
                            let write = clustermesh_telemetry::child!(&import, "kvstore write");
                            let handed = origin.as_ref().map(|o| Arc::new(o.handed_on(&write)));
                            cache.put(&ctx.quota, (key, value), handed.as_ref()).await?;
                            drop(write);
                            let dropped = cache.drop_lost_backends(&ctx.quota, &before).await?;
                            count_dropped(status, &remote.name, &dropped);
                            if let Some(o) = &origin {
                                (ctx.propagated)(&remote.name, seconds_since(o.unix_nanos));
                            }
                        }
                    },
                    Err(reject) => count_reject(status, &remote.name, &reject),
                }
            }
            Some(Ev::Delete(d)) => match cache_key_of_delete(&target, &d) {
                Ok(key) => {
                    match &mut staging {
                        Some(stage) => {
                            stage.remove(&key);
                            status.lock().staged.clone_from(&stage.counts);
                        }
                        None => {
                            let before = cache
                                .state
                                .entries
                                .get(&key)
                                .map(|old| own_addresses(&key, old))
                                .unwrap_or_default();
                            let write = clustermesh_telemetry::child!(&import, "kvstore write");
                            let handed = origin.as_ref().map(|o| Arc::new(o.handed_on(&write)));
                            cache.delete(&key, handed.as_ref()).await?;
                            drop(write);
                            let dropped = cache.drop_lost_backends(&ctx.quota, &before).await?;
                            count_dropped(status, &remote.name, &dropped);
                            if let Some(o) = &origin {
                                (ctx.propagated)(&remote.name, seconds_since(o.unix_nanos));
                            }
                        }
                    }
                    if let Some(ip) = ip_of(&key) {
                        let held = staging.as_ref().is_some_and(|s| s.ips.contains(&ip));
                        if !held && !cache.state.ips.contains(&ip) {
                            ctx.ip_owners.release(&ip, &remote.name);
                        }
                    }
                }
                Err(reject) => count_reject(status, &remote.name, &reject),
            },
            Some(Ev::Synced(_)) => {
                *synced = true;
                if let Some(mut stage) = staging.take() {
                    // Backends whose pod or node the snapshot deleted after its service came.
                    let dropped = stage.drop_lost_backends()?;
                    count_dropped(status, &remote.name, &dropped);
                    let keep = stage.ips.clone();
                    cache.replace(stage).await?;
                    ctx.ip_owners.release_except(&remote.name, &keep);
                    let mut st = status.lock();
                    st.full_syncs += 1;
                    st.synced = ExportKind::ALL
                        .iter()
                        .map(|k| k.segment().to_owned())
                        .collect();
                }
                {
                    let mut st = status.lock();
                    st.staged.clear();
                    if st.first_import_unix.is_none() {
                        st.first_import_unix = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs_f64());
                    }
                    st.imported = true;
                    st.quota_exceeded = None;
                    st.counts = cache.counts();
                    st.bytes = cache.state.bytes;
                }
                staleness.lock().set_synced(true, Instant::now());
                tracing::info!(remote = %remote.name, revision, "remote synced");
            }
            Some(Ev::Reset(r)) => {
                tracing::info!(remote = %remote.name, reason = %r.reason, "remote reset: staging a new snapshot");
                staging = Some(Tracked::default());
            }
            Some(Ev::Heartbeat(_)) | None => {}
        }
        if staging.is_none() && revision > *last_revision {
            *last_revision = revision;
            let mut st = status.lock();
            st.counts = cache.counts();
            st.bytes = cache.state.bytes;
        }
    }
}

/// Reports the backends [`Cache::drop_lost_backends`] removed.
fn count_dropped(
    status: &Mutex<RemoteStatus>,
    remote: &ClusterName,
    dropped: &[(String, Vec<IpAddr>)],
) {
    for (key, addrs) in dropped {
        count_reject(status, remote, &dropped_reject(remote, key, addrs));
    }
}

/// What a service losing backends that are no longer the remote's own is counted as.
fn dropped_reject(remote: &ClusterName, key: &str, addrs: &[IpAddr]) -> Reject {
    Reject {
        kind: "services",
        reason: "foreign-backend",
        detail: format!(
            "{key}: {addrs:?} are no longer endpoints of {remote}; removed from the service"
        ),
    }
}

fn count_reject(
    status: &Mutex<RemoteStatus>,
    remote: &ClusterName,
    reject: &crate::validate::Reject,
) {
    tracing::warn!(remote = %remote, kind = reject.kind, reason = reject.reason, detail = %reject.detail, "rejected an object from a remote");
    *status
        .lock()
        .rejected
        .entry(format!("{}/{}", reject.kind, reject.reason))
        .or_insert(0) += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reconnect_wait_grows_over_failures_and_starts_again_after_a_synced_session() {
        let mut r = Reconnect::default();
        let first = r.after_session(false);
        assert!(first <= Duration::from_millis(200), "{first:?}");
        let mut last = first;
        for _ in 0..12 {
            last = r.after_session(false);
        }
        assert!(
            last >= RECONNECT_MAX && last <= 2 * RECONNECT_MAX,
            "grown to the cap (with its jitter): {last:?}"
        );
        let after_sync = r.after_session(true);
        assert!(
            after_sync <= Duration::from_millis(200),
            "a session that was in sync resets the wait: {after_sync:?}"
        );
        assert!(r.after_session(false) <= Duration::from_millis(400));
    }
}
