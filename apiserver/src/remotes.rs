//! The set of sync workers, kept equal to the configured remotes: those in the config file plus
//! one YAML file per remote in `remotesDir`, re-read every second, so that adding or removing a
//! remote takes effect without a restart. A removed remote's cached state is deleted after a
//! drain grace period (unless it comes back meanwhile). A remotes directory with a file that
//! does not parse changes nothing until it is fixed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clustermesh_kvstore::KvStore;
use clustermesh_model::ClusterName;
use clustermesh_model::keys::{ExportKind, Key};
use clustermesh_proto::client::{ClientTls, server_name};
use clustermesh_sync::worker::{RemoteConfig, RemoteStatus, RemoteWorker, SyncContext};
use parking_lot::Mutex;

use crate::config::RemoteSection;

struct Entry {
    section: RemoteSection,
    worker: RemoteWorker,
}

/// The running sync workers.
pub struct RemoteSet {
    ctx: SyncContext,
    drain_grace: Duration,
    workers: Mutex<BTreeMap<ClusterName, Entry>>,
    /// The clusters whose `remote-` certificates the Export server accepts: the configured
    /// remotes (as last applied) plus the one-way `allowedRemotes`.
    peers: tokio::sync::watch::Sender<BTreeSet<ClusterName>>,
    allowed: BTreeSet<ClusterName>,
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

fn same(a: &RemoteSection, b: &RemoteSection) -> bool {
    a.name == b.name
        && a.id == b.id
        && a.address == b.address
        && a.ca == b.ca
        && a.cert == b.cert
        && a.key == b.key
}

/// Reads every `*.yaml` file of `dir` as one remote. Relative paths inside a file are
/// relative to `dir`.
pub fn read_remotes_dir(dir: &Path) -> Result<Vec<RemoteSection>, String> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("listing {}: {e}", dir.display())),
    };
    let mut paths: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden
            || !matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            )
        {
            continue;
        }
        let mut r: RemoteSection = serde_yaml_ng::from_str(&read(&path)?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        for p in [&mut r.ca, &mut r.cert, &mut r.key] {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        out.push(r);
    }
    Ok(out)
}

impl RemoteSet {
    /// No workers yet. `peers` is told the clusters allowed to import from this one after
    /// every change: the configured remotes plus `allowed` (one-way exports).
    pub fn new(
        ctx: SyncContext,
        drain_grace: Duration,
        peers: tokio::sync::watch::Sender<BTreeSet<ClusterName>>,
        allowed: BTreeSet<ClusterName>,
    ) -> Arc<Self> {
        peers.send_replace(allowed.clone());
        Arc::new(Self {
            ctx,
            drain_grace,
            workers: Mutex::new(BTreeMap::new()),
            peers,
            allowed,
        })
    }

    /// The status of every remote.
    pub fn statuses(&self) -> Vec<RemoteStatus> {
        self.workers
            .lock()
            .values()
            .map(|e| e.worker.status.lock().clone().with_ready())
            .collect()
    }

    /// The status of one remote.
    pub fn status(&self, name: &str) -> Option<RemoteStatus> {
        self.workers
            .lock()
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, e)| e.worker.status.lock().clone().with_ready())
    }

    fn spawn(&self, section: &RemoteSection) -> Result<RemoteWorker, String> {
        let tls = ClientTls {
            ca_pem: read(&section.ca)?,
            cert_pem: read(&section.cert)?,
            key_pem: read(&section.key)?,
            server_name: server_name(section.name.as_str()),
        };
        let remote = RemoteConfig {
            name: section.name.clone(),
            id: section.id,
            address: section.address.clone(),
            tls,
            etcd: section.etcd_config(),
        };
        Ok(RemoteWorker::spawn(self.ctx.clone(), remote))
    }

    /// Starts, restarts and stops workers so that exactly `wanted` run.
    pub async fn apply(self: &Arc<Self>, wanted: &[RemoteSection]) -> Result<(), String> {
        let mut by_name = BTreeMap::new();
        for r in wanted {
            if by_name.insert(r.name.clone(), r.clone()).is_some() {
                return Err(format!("remote {} is configured twice", r.name));
            }
        }
        // Spawn first (reading certificate files may fail: then nothing changes).
        let mut started = Vec::new();
        for (name, section) in &by_name {
            let unchanged = self
                .workers
                .lock()
                .get(name)
                .is_some_and(|e| same(&e.section, section));
            if !unchanged {
                started.push((name.clone(), section.clone()));
            }
        }
        let mut new_workers = Vec::new();
        for (name, section) in started {
            match self.spawn(&section) {
                Ok(w) => new_workers.push((name, section, w)),
                Err(e) => {
                    for (_, _, w) in new_workers {
                        w.stop().await;
                    }
                    return Err(e);
                }
            }
        }
        let mut stopped = Vec::new();
        {
            let mut workers = self.workers.lock();
            let removed: Vec<ClusterName> = workers
                .keys()
                .filter(|n| !by_name.contains_key(*n))
                .cloned()
                .collect();
            for name in removed {
                if let Some(e) = workers.remove(&name) {
                    stopped.push((name, e.worker, true));
                }
            }
            for (name, section, worker) in new_workers {
                tracing::info!(remote = %name, address = %section.address, "starting the sync worker");
                if let Some(old) = workers.insert(name.clone(), Entry { section, worker }) {
                    stopped.push((name, old.worker, false));
                }
            }
        }
        // Who may import from us: a removed remote loses access now (its open streams end).
        let mut peers = self.allowed.clone();
        peers.extend(by_name.keys().cloned());
        self.peers.send_if_modified(|p| {
            let changed = *p != peers;
            *p = peers;
            changed
        });
        for (name, worker, removed) in stopped {
            worker.stop().await;
            if removed {
                tracing::info!(remote = %name, grace = ?self.drain_grace, "remote removed; its cache is deleted after the drain grace period");
                let this = Arc::clone(self);
                tokio::spawn(async move { this.drain(name).await });
            }
        }
        Ok(())
    }

    /// Deletes a removed remote's cached state after the grace period, unless it is back.
    async fn drain(self: Arc<Self>, name: ClusterName) {
        tokio::time::sleep(self.drain_grace).await;
        if self.workers.lock().contains_key(&name) {
            return;
        }
        let store: &dyn KvStore = self.ctx.store.as_ref();
        // Its mirrored cluster config goes first, as KVStoreMesh removes it: a Cilium agent
        // stops reading the remote before its state disappears under it.
        let config = Key::ClusterConfig {
            cluster: name.clone(),
        }
        .to_string();
        let mut complete = true;
        for attempt in 1..=10 {
            match store.delete(&config).await {
                Ok(_) => break,
                Err(e) if attempt < 10 => {
                    tracing::warn!(key = %config, error = %e, attempt, "deleting a removed remote's cluster config failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                // Its state goes anyway: a store that refuses this keeps nothing forever.
                Err(e) => {
                    complete = false;
                    tracing::warn!(key = %config, error = %e, "deleting a removed remote's cluster config failed; deleting its state anyway");
                }
            }
        }
        let mut prefixes: Vec<String> = ExportKind::ALL
            .iter()
            .map(|k| k.cache_prefix(&name))
            .collect();
        prefixes.push(format!("cilium/synced/{name}/"));
        for prefix in prefixes {
            match store.list(&prefix).await {
                Ok(listing) => {
                    for kv in listing.kvs {
                        if let Err(e) = store.delete(&kv.key).await {
                            complete = false;
                            tracing::warn!(key = %kv.key, error = %e, "deleting a removed remote's key failed");
                        }
                    }
                }
                Err(e) => {
                    complete = false;
                    tracing::warn!(%prefix, error = %e, "listing a removed remote's cache failed")
                }
            }
        }
        let _ = store
            .delete(
                &Key::ClusterStatus {
                    cluster: name.clone(),
                }
                .to_string(),
            )
            .await;
        // Its pod IPs are free for others only once its cache is gone, and only if it did not
        // come back meanwhile.
        if complete && !self.workers.lock().contains_key(&name) {
            self.ctx.ip_owners.release_all(&name);
        }
        tracing::info!(remote = %name, "deleted the cached state of a removed remote");
    }

    /// Stops every worker.
    pub async fn stop_all(&self) {
        let all: Vec<Entry> = std::mem::take(&mut *self.workers.lock())
            .into_values()
            .collect();
        for e in all {
            e.worker.stop().await;
        }
    }
}
