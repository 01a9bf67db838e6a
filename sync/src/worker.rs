//! The sync worker of one remote cluster: connect (mTLS, `remote-<local>` certificate), check
//! the remote's cluster config, stage its snapshot and replace the cached state at `Synced`,
//! follow changes, resume from the last applied revision after failures (exponential backoff
//! with jitter), and drive the staleness contract, publishing the remote's status for the
//! local agents under `clustermesh/local/cluster-status/<remote>`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use clustermesh_kvstore::{KvStore, Write};
use clustermesh_model::cluster::{ClusterId, ClusterName, ClusterStatus, MaxConnectedClusters};
use clustermesh_model::keys::{ExportKind, Key};
use clustermesh_proto::Object;
use clustermesh_proto::client::{ClientTls, connect};
use clustermesh_proto::v1::{self, watch_event::Event as Ev};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::staleness::{Staleness, StalenessConfig};
use crate::validate::{Remote, cache_entry, cache_key_of_delete};

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
}

/// What `clustermesh status` shows for a remote.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemoteStatus {
    /// The remote's name.
    pub name: String,
    /// A session is up.
    pub connected: bool,
    /// Its snapshot has been imported at least once.
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

fn kind_label(key: &str) -> String {
    match Key::parse(key).ok().and_then(|k| k.export_kind()) {
        Some(k) => k.segment().to_owned(),
        None => "other".to_owned(),
    }
}

/// The worker's view of the remote's cache, mirrored in memory so that only changes are
/// written.
struct Cache {
    store: Arc<dyn KvStore>,
    remote: ClusterName,
    entries: BTreeMap<String, Vec<u8>>,
    counts: BTreeMap<String, usize>,
}

impl Cache {
    async fn load(
        store: Arc<dyn KvStore>,
        remote: &ClusterName,
    ) -> Result<Self, clustermesh_kvstore::Error> {
        let mut entries = BTreeMap::new();
        for kind in ExportKind::ALL {
            for kv in store.list(&kind.cache_prefix(remote)).await?.kvs {
                entries.insert(kv.key, kv.value);
            }
        }
        let mut counts = BTreeMap::new();
        for k in entries.keys() {
            *counts.entry(kind_label(k)).or_insert(0) += 1;
        }
        Ok(Self {
            store,
            remote: remote.clone(),
            entries,
            counts,
        })
    }

    async fn put(&mut self, key: String, value: Vec<u8>) -> Result<(), clustermesh_kvstore::Error> {
        if self.entries.get(&key) != Some(&value) {
            self.store.put(&key, &value, None).await?;
            if self.entries.insert(key.clone(), value).is_none() {
                *self.counts.entry(kind_label(&key)).or_insert(0) += 1;
            }
        }
        Ok(())
    }

    async fn delete(&mut self, key: &str) -> Result<(), clustermesh_kvstore::Error> {
        if self.entries.remove(key).is_some() {
            self.store.delete(key).await?;
            if let Some(n) = self.counts.get_mut(&kind_label(key)) {
                *n = n.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Makes the cache equal to a complete snapshot: the changed and new keys, the deletions
    /// of keys the snapshot lacks, and the sync canaries go to the store in one transaction
    /// (one revision) when the store's limits allow; otherwise in consecutive transactions in
    /// that order, so that a reader never misses a key the snapshot holds.
    async fn replace(
        &mut self,
        snapshot: BTreeMap<String, Vec<u8>>,
    ) -> Result<(), clustermesh_kvstore::Error> {
        let mut writes: Vec<Write> = self
            .entries
            .keys()
            .filter(|k| !snapshot.contains_key(*k))
            .map(|k| Write::Delete { key: k.clone() })
            .collect();
        writes.splice(
            0..0,
            snapshot
                .iter()
                .filter(|(k, v)| self.entries.get(*k) != Some(*v))
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
            self.store.apply(chunk).await?;
        }
        self.entries = snapshot;
        let mut counts = BTreeMap::new();
        for k in self.entries.keys() {
            *counts.entry(kind_label(k)).or_insert(0) += 1;
        }
        self.counts = counts;
        Ok(())
    }

    fn counts(&self) -> BTreeMap<String, usize> {
        self.counts.clone()
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connecting failed: {0}")]
    Connect(String),
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
    #[error("stopped")]
    Stopped,
}

async fn publish(ctx: &SyncContext, remote: &ClusterName, status: &RemoteStatus) {
    let value = ClusterStatus {
        cluster: remote.clone(),
        connected: status.connected,
        ready: status.ready,
        withdrawn: status.withdrawn,
        keep_last_backends: ctx.keep_last_backends,
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
    let mut cache = loop {
        match Cache::load(Arc::clone(&ctx.store), &remote.name).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(remote = %remote.name, error = %e, "reading the cache failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    status.lock().counts = cache.counts();
    let mut last_revision = 0;
    let mut backoff = new_backoff();
    loop {
        let result = tokio::select! {
            r = session(&ctx, &remote, &status, &staleness, &mut cache, &mut last_revision) => r,
            _ = stop.wait_for(|s| *s) => Err(SessionError::Stopped),
        };
        if let Ok(id) = u16::try_from(remote.id) {
            ctx.connected_ids.lock().remove(&id);
        }
        staleness.lock().set_synced(false, Instant::now());
        {
            let mut s = status.lock();
            s.connected = false;
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
                }
                Ok(()) => {}
            }
        }
        match result {
            Err(SessionError::Stopped) => break,
            Err(e) => tracing::warn!(remote = %remote.name, error = %e, "sync session ended"),
            Ok(()) => backoff = new_backoff(),
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(10));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = ticker.await;
}

fn new_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Drives the staleness state machine and publishes status changes.
async fn tick(
    ctx: SyncContext,
    remote: ClusterName,
    staleness: Arc<Mutex<Staleness>>,
    status: Arc<Mutex<RemoteStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut published: Option<(bool, bool, bool)> = None;
    loop {
        let now = Instant::now();
        let snapshot = {
            let mut st = staleness.lock();
            st.tick(now);
            let mut s = status.lock();
            s.withdrawn = st.withdrawn();
            s.seconds_since_last_message = st.silence(now).as_secs_f64();
            s.clone()
        };
        let state = (snapshot.connected, snapshot.ready, snapshot.withdrawn);
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

async fn session(
    ctx: &SyncContext,
    remote: &RemoteConfig,
    status: &Mutex<RemoteStatus>,
    staleness: &Mutex<Staleness>,
    cache: &mut Cache,
    last_revision: &mut i64,
) -> Result<(), SessionError> {
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
    };

    let resume = status.lock().ready;
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
    let mut stream = client.watch(request).await?.into_inner();
    status.lock().connected = true;
    staleness.lock().message(Instant::now());
    if resume {
        staleness.lock().set_synced(true, Instant::now());
    }
    let mut staging: Option<BTreeMap<String, Vec<u8>>> = (!resume).then(BTreeMap::new);
    // A stream that carries nothing, not even heartbeats, until the remote would be withdrawn
    // is dead: end it and reconnect. (Unreachability itself is the staleness machine's call,
    // made from the time of the last message, not from this timeout.)
    let silence = ctx.staleness.unreachable_after + ctx.staleness.withdraw_after;
    loop {
        let message = tokio::time::timeout(silence, stream.message())
            .await
            .map_err(|_| SessionError::Silent(silence))??
            .ok_or(SessionError::Closed)?;
        staleness.lock().message(Instant::now());
        let revision = message.revision;
        match message.event {
            Some(Ev::Upsert(u)) => {
                let entry = Object::try_from(&u)
                    .map_err(|e| crate::validate::Reject {
                        kind: "other",
                        reason: "malformed",
                        detail: e.to_string(),
                    })
                    .and_then(|o| cache_entry(&target, &o));
                match entry {
                    Ok((key, value)) => match &mut staging {
                        Some(stage) => {
                            stage.insert(key, value);
                        }
                        None => cache.put(key, value).await?,
                    },
                    Err(reject) => count_reject(status, &remote.name, &reject),
                }
            }
            Some(Ev::Delete(d)) => match cache_key_of_delete(&target, &d) {
                Ok(key) => match &mut staging {
                    Some(stage) => {
                        stage.remove(&key);
                    }
                    None => cache.delete(&key).await?,
                },
                Err(reject) => count_reject(status, &remote.name, &reject),
            },
            Some(Ev::Synced(_)) => {
                if let Some(stage) = staging.take() {
                    cache.replace(stage).await?;
                    let mut st = status.lock();
                    st.full_syncs += 1;
                    st.synced = ExportKind::ALL
                        .iter()
                        .map(|k| k.segment().to_owned())
                        .collect();
                }
                status.lock().ready = true;
                staleness.lock().set_synced(true, Instant::now());
                tracing::info!(remote = %remote.name, revision, "remote synced");
            }
            Some(Ev::Reset(r)) => {
                tracing::info!(remote = %remote.name, reason = %r.reason, "remote reset: staging a new snapshot");
                staging = Some(BTreeMap::new());
            }
            Some(Ev::Heartbeat(_)) | None => {}
        }
        if staging.is_none() && revision > *last_revision {
            *last_revision = revision;
            status.lock().counts = cache.counts();
        }
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
