//! Writes the desired state into the kvstore under the key layout, touching only what
//! changed: for every prefix this apiserver owns it lists what is there, puts what differs and
//! deletes what is no longer desired.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use clustermesh_kvstore::KvStore;
use clustermesh_model::cluster::{ClusterConfig, ClusterName};
use clustermesh_model::endpoint::IpCacheEntry;
use clustermesh_model::keys::{
    ExportKind, IPCACHE_PREFIX, Key, LOCAL_PREFIX, LOCAL_SERVICES_PREFIX,
};
use clustermesh_telemetry::{Origin, Provenance};

use crate::desired::DesiredState;
use crate::export::NamespaceFilter;

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The store failed.
    #[error("kvstore write failed")]
    Store(#[from] clustermesh_kvstore::Error),

    /// A value did not encode (cannot happen for model types; kept to avoid a panic path).
    #[error("encoding {key} failed")]
    Encode {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// What one pass wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Keys put (new or changed).
    pub put: usize,
    /// Keys deleted.
    pub deleted: usize,
    /// Keys the store refused (too large for it), with why: they keep what the store has.
    pub refused: Vec<(String, String)>,
}

/// The prefixes the writer owns: everything under them that is not desired is deleted.
/// Identities are managed by the allocator, not here.
pub fn owned_prefixes(cluster: &ClusterName) -> Vec<String> {
    vec![
        IPCACHE_PREFIX.to_owned(),
        ExportKind::Nodes.state_prefix(cluster),
        ExportKind::Services.state_prefix(cluster),
        LOCAL_SERVICES_PREFIX.to_owned(),
        format!("{LOCAL_PREFIX}policies/"),
        format!("{LOCAL_PREFIX}clusterwide-policies/"),
    ]
}

fn json<T: serde::Serialize>(key: &str, value: &T) -> Result<Vec<u8>, WriteError> {
    serde_json::to_vec(value).map_err(|source| WriteError::Encode {
        key: key.to_owned(),
        source,
    })
}

/// The key/value pairs of the desired state. Every service goes under
/// [`LOCAL_SERVICES_PREFIX`] for this cluster's agents; under
/// `cilium/state/services/v1/<cluster>/` go only those Cilium's clustermesh-apiserver exports
/// (global and shared, in a namespace `filter` exports), in its form
/// ([`clustermesh_model::service::ClusterService::for_export`]).
pub fn encode(
    cluster: &ClusterName,
    desired: &DesiredState,
    ipcache: &[IpCacheEntry],
    filter: &NamespaceFilter,
) -> Result<BTreeMap<String, Vec<u8>>, WriteError> {
    let mut out = BTreeMap::new();
    for e in ipcache {
        let key = Key::IpCache { ip: e.ip }.to_string();
        out.insert(key.clone(), json(&key, e)?);
    }
    for n in &desired.nodes {
        let key = Key::Node {
            cluster: cluster.clone(),
            name: n.name.clone(),
        }
        .to_string();
        out.insert(key.clone(), json(&key, n)?);
    }
    for s in &desired.services {
        let key = Key::LocalService {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
        }
        .to_string();
        out.insert(key.clone(), json(&key, s)?);
        if !(s.is_exported() && filter.exports(Some(&s.namespace))) {
            continue;
        }
        let key = Key::Service {
            cluster: cluster.clone(),
            namespace: s.namespace.clone(),
            name: s.name.clone(),
        }
        .to_string();
        out.insert(key.clone(), json(&key, &s.for_export())?);
    }
    for p in &desired.policies {
        let key = Key::Policy {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        }
        .to_string();
        out.insert(key.clone(), json(&key, p)?);
    }
    Ok(out)
}

/// Writes a cluster's state.
pub struct StateWriter {
    store: Arc<dyn KvStore>,
    prefixes: Vec<String>,
    provenance: Arc<Provenance>,
}

impl StateWriter {
    /// A writer for `cluster`.
    /// Each write's origin goes into `provenance`.
    pub fn new(
        store: Arc<dyn KvStore>,
        cluster: &ClusterName,
        provenance: Arc<Provenance>,
    ) -> Self {
        Self {
            store,
            prefixes: owned_prefixes(cluster),
            provenance,
        }
    }

    /// The store it writes.
    pub fn store(&self) -> &Arc<dyn KvStore> {
        &self.store
    }

    /// Makes the owned prefixes hold exactly `desired`, except for the keys in `keep`: those
    /// (objects the source could not provide, such as an oversized one) keep what the store
    /// has. A key the store refuses (too large for it) does not stop the others: it is
    /// reported in [`WriteStats::refused`], every other key written. Each write is recorded
    /// with `origin`.
    pub async fn apply(
        &self,
        desired: &BTreeMap<String, Vec<u8>>,
        keep: &std::collections::BTreeSet<String>,
        origin: &Arc<Origin>,
    ) -> Result<WriteStats, WriteError> {
        let mut stats = WriteStats::default();
        let mut current = BTreeMap::new();
        for prefix in &self.prefixes {
            for kv in self.store.list(prefix).await?.kvs {
                current.insert(kv.key, kv.value);
            }
        }
        for (key, value) in desired {
            if keep.contains(key) || current.get(key) == Some(value) {
                continue;
            }
            let pending = self.provenance.expect(key, origin);
            match self.store.put(key, value, None).await {
                Ok(revision) => {
                    pending.written(revision);
                    stats.put += 1;
                }
                Err(e) if e.is_about_the_request() => {
                    stats.refused.push((key.clone(), e.to_string()));
                }
                Err(e) => return Err(e.into()),
            }
        }
        for key in current
            .keys()
            .filter(|k| !desired.contains_key(*k) && !keep.contains(*k))
        {
            let pending = self.provenance.expect(key, origin);
            if let Some(revision) = self.store.delete(key).await? {
                pending.written(revision);
                stats.deleted += 1;
            }
        }
        Ok(stats)
    }

    /// Writes the cluster config if it differs.
    pub async fn write_cluster_config(
        &self,
        cluster: &ClusterName,
        config: &ClusterConfig,
    ) -> Result<(), WriteError> {
        let key = Key::ClusterConfig {
            cluster: cluster.clone(),
        }
        .to_string();
        let value = json(&key, config)?;
        if self.store.get(&key).await?.map(|kv| kv.value) != Some(value.clone()) {
            self.store.put(&key, &value, None).await?;
        }
        Ok(())
    }

    /// Writes the sync canaries: every kind's initial sync is complete.
    pub async fn write_canaries(&self, cluster: &ClusterName) -> Result<(), WriteError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for kind in ExportKind::ALL {
            self.store
                .put(&kind.synced_key(cluster), now.to_string().as_bytes(), None)
                .await?;
        }
        Ok(())
    }
}
