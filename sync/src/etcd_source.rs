//! Importing from a Cilium cluster: a remote of kind `etcd` is read as Cilium's agents read a
//! clustermesh-apiserver (or KVStoreMesh): its etcd, with the address and certificates Cilium
//! hands to its remote users. Its cluster config (`cilium/cluster-config/<remote>`) says
//! where the state is (`cilium/state/...`, or `cilium/cache/...` when `cached`) and whether
//! to wait for its sync canaries. The state is turned into the Export protocol's events (a
//! snapshot, `Synced`, then changes, with heartbeats), so that the worker checks, stages,
//! waits for and counts it exactly as it does an Export remote's.

use std::sync::Arc;
use std::time::Duration;

use clustermesh_kvstore::etcd::{EtcdConfig, EtcdStore};
use clustermesh_kvstore::{EventKind, KvStore};
use clustermesh_model::cluster::{ClusterConfig, ClusterName};
use clustermesh_model::endpoint::IpCacheEntry;
use clustermesh_model::keys::{CachedObject, ExportKind, Key};
use clustermesh_model::labels::LabelSet;
use clustermesh_model::node::Node;
use clustermesh_model::service::ClusterService;
use clustermesh_proto::Object;
use clustermesh_proto::v1::{self, watch_event::Event as Ev};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::worker::SessionError;

/// Keys read from the remote's etcd at once while its snapshot is taken.
const SNAPSHOT_PAGE: usize = 500;

/// A failure of the remote's etcd (not of the local store: the session ends and is tried
/// again, the cache is kept).
fn remote_err(e: clustermesh_kvstore::Error) -> SessionError {
    SessionError::RemoteStore(clustermesh_proto::client::error_chain(&e))
}

/// A Cilium cluster's etcd and what its config says.
pub(crate) struct EtcdRemote {
    store: Arc<EtcdStore>,
    remote: ClusterName,
    /// The config read from `cilium/cluster-config/<remote>`.
    pub(crate) config: ClusterConfig,
}

/// Connects and reads the remote's cluster config; a remote without one is refused (it
/// cannot be told apart from a cluster that is not set up).
pub(crate) async fn connect(
    etcd: &EtcdConfig,
    remote: &ClusterName,
) -> Result<EtcdRemote, SessionError> {
    let store = EtcdStore::connect(etcd).await.map_err(remote_err)?;
    let key = Key::ClusterConfig {
        cluster: remote.clone(),
    }
    .to_string();
    let kv = store
        .get(&key)
        .await
        .map_err(remote_err)?
        .ok_or_else(|| SessionError::Refused(format!("the remote's etcd has no {key}")))?;
    let config: ClusterConfig = serde_json::from_slice(&kv.value)
        .map_err(|e| SessionError::Refused(format!("{key}: {e}")))?;
    Ok(EtcdRemote {
        store: Arc::new(store),
        remote: remote.clone(),
        config,
    })
}

impl EtcdRemote {
    /// Where each kind is, and its sync canary.
    fn layout(&self) -> Vec<(ExportKind, String, String)> {
        let r = &self.remote;
        ExportKind::ALL
            .iter()
            .map(|k| {
                if self.config.capabilities.cached {
                    (*k, k.cache_prefix(r), k.cache_synced_key(r))
                } else {
                    (*k, k.state_prefix(r), k.synced_key(r))
                }
            })
            .collect()
    }

    /// The events of a session: every event the worker would get from an Export remote that
    /// sends a full snapshot.
    pub(crate) fn events(
        self,
        heartbeat: Duration,
    ) -> mpsc::Receiver<Result<v1::WatchEvent, SessionError>> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            if let Err(e) = self.run(heartbeat, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    async fn run(
        &self,
        heartbeat: Duration,
        tx: &mpsc::Sender<Result<v1::WatchEvent, SessionError>>,
    ) -> Result<(), SessionError> {
        let send = |revision: i64, event: Ev| {
            tx.send(Ok(v1::WatchEvent {
                revision,
                event: Some(event),
                origin: None,
            }))
        };
        let layout = self.layout();
        // Its canaries first, when it writes them: a snapshot before them may be partial.
        if self.config.capabilities.synced_canaries {
            let since = tokio::time::Instant::now();
            let mut warned = since;
            loop {
                let mut missing = Vec::new();
                for (_, _, canary) in &layout {
                    if self.store.get(canary).await.map_err(remote_err)?.is_none() {
                        missing.push(canary.clone());
                    }
                }
                if missing.is_empty() {
                    break;
                }
                // Said after 10 s, then every minute: a remote that never writes one (a Cilium 1.20 cluster
                // exporting EndpointSlices only writes no services canary) imports nothing.
                if since.elapsed() >= Duration::from_secs(10)
                    && (warned == since || warned.elapsed() >= Duration::from_secs(60))
                {
                    warned = tokio::time::Instant::now();
                    tracing::warn!(remote = %self.remote, ?missing, "waiting for the remote's sync canaries: nothing is imported before all four exist");
                }
                if send(0, Ev::Heartbeat(v1::Heartbeat {})).await.is_err() {
                    return Ok(());
                }
                tokio::time::sleep(heartbeat).await;
            }
        }
        // The snapshot, every kind at one revision, a page at a time: the worker's quotas end
        // the session (and this reader) before a hostile remote's listing fills memory.
        let mut revision = None;
        for (kind, prefix, _) in &layout {
            let mut after: Option<String> = None;
            loop {
                let (kvs, rev, more) = self
                    .store
                    .list_page(prefix, after.as_deref(), revision, SNAPSHOT_PAGE)
                    .await
                    .map_err(remote_err)?;
                revision = Some(rev);
                after = kvs.last().map(|kv| kv.key.clone());
                for kv in kvs {
                    let event = self.upsert(*kind, &kv.key, &kv.value);
                    if send(rev, event).await.is_err() {
                        return Ok(());
                    }
                }
                if !more || after.is_none() {
                    break;
                }
            }
        }
        let revision = revision.unwrap_or_default();
        if send(revision, Ev::Synced(v1::Synced {})).await.is_err() {
            return Ok(());
        }
        // Then its changes, with a heartbeat while the store answers.
        let common = if self.config.capabilities.cached {
            clustermesh_model::keys::CACHE_PREFIX
        } else {
            "cilium/state/"
        };
        let mut watch = self
            .store
            .watch(common, revision)
            .await
            .map_err(remote_err)?;
        let mut tick = tokio::time::interval(heartbeat);
        loop {
            tokio::select! {
                e = watch.next() => {
                    let e = match e {
                        Some(e) => e.map_err(remote_err)?,
                        None => return Err(SessionError::Closed),
                    };
                    let Some((kind, _, _)) = layout.iter().find(|(_, p, _)| e.key.starts_with(p.as_str())) else {
                        continue;
                    };
                    let event = match e.kind {
                        EventKind::Put => self.upsert(*kind, &e.key, &e.value),
                        EventKind::Delete => match self.delete(&e.key) {
                            Some(d) => Ev::Delete(d),
                            None => continue,
                        },
                    };
                    if send(e.revision, event).await.is_err() {
                        return Ok(());
                    }
                }
                _ = tick.tick() => {
                    let now = self.store.current_revision().await.map_err(remote_err)?;
                    if send(now, Ev::Heartbeat(v1::Heartbeat {})).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The object at `key`, or what the worker counts as malformed (an upsert without an
    /// object) when the key or value is not what Cilium writes there.
    fn upsert(&self, kind: ExportKind, key: &str, value: &[u8]) -> Ev {
        match self.object(key, value) {
            Ok(o) if kind_of(&o) == kind => Ev::Upsert(v1::Upsert::from(&o)),
            Ok(_) => {
                tracing::warn!(remote = %self.remote, key, "a value of another kind under this prefix");
                Ev::Upsert(v1::Upsert::default())
            }
            Err(reason) => {
                tracing::warn!(remote = %self.remote, key, %reason, "an undecodable value");
                Ev::Upsert(v1::Upsert::default())
            }
        }
    }

    fn object(&self, key: &str, value: &[u8]) -> Result<Object, String> {
        let json = |v: &[u8]| -> Result<serde_json::Value, String> {
            serde_json::from_slice(v).map_err(|e| e.to_string())
        };
        let labels = |v: &[u8]| -> Result<LabelSet, String> {
            std::str::from_utf8(v)
                .map_err(|e| e.to_string())?
                .parse()
                .map_err(|e: clustermesh_model::labels::LabelError| e.to_string())
        };
        let remote = self.remote.clone();
        let key = Key::parse(key).map_err(|e| e.to_string())?;
        let object = match key.clone() {
            Key::Identity { id }
            | Key::Cached {
                object: CachedObject::Identity(id),
                ..
            } => Object::Identity {
                cluster: remote,
                id,
                labels: labels(value)?,
            },
            Key::IpCache { .. }
            | Key::Cached {
                object: CachedObject::IpCache(_),
                ..
            } => Object::IpCache {
                cluster: remote,
                entry: serde_json::from_value::<IpCacheEntry>(json(value)?)
                    .map_err(|e| e.to_string())?,
            },
            Key::Node { .. }
            | Key::Cached {
                object: CachedObject::Node(_),
                ..
            } => Object::Node(
                serde_json::from_value::<Node>(json(value)?).map_err(|e| e.to_string())?,
            ),
            Key::Service { .. }
            | Key::Cached {
                object: CachedObject::Service { .. },
                ..
            } => Object::Service(
                serde_json::from_value::<ClusterService>(json(value)?)
                    .map_err(|e| e.to_string())?,
            ),
            other => return Err(format!("{other} is not an exported object")),
        };
        // The value must be the object its key names: a value under another object's key
        // would overwrite that object in the cache.
        let named = match &object {
            Object::IpCache { entry, .. } => self.delete_name(&key) == Some(entry.ip.to_string()),
            Object::Node(n) => self.delete_name(&key) == Some(n.name.clone()),
            Object::Service(s) => {
                self.delete_name(&key) == Some(format!("{}/{}", s.namespace, s.name))
            }
            _ => true,
        };
        if !named {
            return Err("the value is another object than its key names".into());
        }
        Ok(object)
    }

    /// The name a Delete of `key` carries.
    fn delete_name(&self, key: &Key) -> Option<String> {
        self.delete(&key.to_string()).map(|d| d.name)
    }

    /// The Delete of the object at `key` (none for a key that is not one).
    fn delete(&self, key: &str) -> Option<v1::Delete> {
        let (kind, name) = match Key::parse(key).ok()? {
            Key::Identity { id }
            | Key::Cached {
                object: CachedObject::Identity(id),
                ..
            } => (v1::Kind::Identities, id.to_string()),
            Key::IpCache { ip }
            | Key::Cached {
                object: CachedObject::IpCache(ip),
                ..
            } => (v1::Kind::Ipcache, ip.to_string()),
            Key::Node { name, .. }
            | Key::Cached {
                object: CachedObject::Node(name),
                ..
            } => (v1::Kind::Nodes, name),
            Key::Service {
                namespace, name, ..
            }
            | Key::Cached {
                object: CachedObject::Service { namespace, name },
                ..
            } => (v1::Kind::Services, format!("{namespace}/{name}")),
            _ => return None,
        };
        Some(v1::Delete {
            kind: kind as i32,
            cluster: self.remote.to_string(),
            name,
        })
    }
}

fn kind_of(o: &Object) -> ExportKind {
    match o {
        Object::Identity { .. } => ExportKind::Identities,
        Object::IpCache { .. } => ExportKind::IpCache,
        Object::Node(_) => ExportKind::Nodes,
        // Policies and statuses are never decoded from an etcd remote.
        _ => ExportKind::Services,
    }
}
