//! The apiserver's configuration file (YAML). Relative paths are relative to the file's
//! directory. See `docs/CONFIG.md` for every field.

use std::path::{Path, PathBuf};

use clustermesh_model::cluster::{ClusterError, ClusterId, ClusterName, MaxConnectedClusters};
use serde::Deserialize;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path} failed")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not match the schema.
    #[error("{path} is not a valid apiserver configuration: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The cluster ID does not fit the mesh size.
    #[error("{path}: {source}")]
    Cluster {
        /// The file.
        path: String,
        /// What is wrong.
        source: ClusterError,
    },
}

/// This cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSection {
    /// Its name.
    pub name: ClusterName,
    /// Its ID.
    pub id: u32,
    /// 255 or 511; equal across the mesh.
    #[serde(default)]
    pub max_connected_clusters: MaxConnectedClusters,
}

/// Client TLS files for etcd.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EtcdTlsFiles {
    /// CA of the etcd servers.
    pub ca: PathBuf,
    /// Client certificate.
    pub cert: PathBuf,
    /// Client key.
    pub key: PathBuf,
}

/// Where the cluster's state is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    tag = "backend",
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    deny_unknown_fields
)]
pub enum StoreConfig {
    /// The embedded store.
    Sled {
        /// Its directory.
        path: PathBuf,
    },
    /// An etcd cluster.
    Etcd {
        /// Client URLs.
        endpoints: Vec<String>,
        /// mTLS to etcd.
        #[serde(default)]
        tls: Option<EtcdTlsFiles>,
        /// Writes per transaction; at most the servers' `--max-txn-ops` (default 128). A
        /// remote's snapshot is replaced in one transaction when it fits.
        #[serde(default)]
        max_txn_ops: Option<std::num::NonZeroUsize>,
        /// Bytes of writes per transaction; below the servers' `--max-request-bytes`
        /// (default 1 MiB against etcd's 1.5 MiB).
        #[serde(default)]
        max_txn_bytes: Option<std::num::NonZeroUsize>,
    },
}

/// Where the cluster's objects come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceConfig {
    /// A directory of Kubernetes manifests, watched for changes.
    #[serde(default)]
    pub manifest_dir: Option<PathBuf>,
    /// The cluster's Kubernetes API.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSource>,
}

/// How to reach the Kubernetes API (in-cluster credentials when nothing is set).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesSource {
    /// A kubeconfig file; absent: the in-cluster service account, or `$KUBECONFIG`.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[serde(default)]
    pub context: Option<String>,
}

/// Listen addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenConfig {
    /// The Export gRPC server (mTLS), e.g. `0.0.0.0:2379`.
    pub export: String,
    /// Plain HTTP `/healthz`, `/readyz`, `/metrics`, e.g. `0.0.0.0:9880`.
    pub health: String,
}

/// The apiserver's own TLS files.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// This cluster's CA: client certificates must be signed by it.
    pub ca: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// What a remote cluster runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteKind {
    /// One of this project's apiservers, imported over its Export protocol.
    #[default]
    Export,
    /// A Cilium cluster's clustermesh-apiserver (or KVStoreMesh), read from its etcd as
    /// Cilium's agents read it.
    Etcd,
}

/// A remote cluster to import.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoteSection {
    /// Its name, as it must report it.
    pub name: ClusterName,
    /// Its ID, as it must report it.
    pub id: u32,
    /// `export` (default) or `etcd`.
    #[serde(default)]
    pub kind: RemoteKind,
    /// Its Export address, `host:port`; for `etcd`, its etcd's client URL
    /// (`https://host:2379`; `host:port` means https).
    pub address: String,
    /// Its CA.
    pub ca: PathBuf,
    /// Our `remote-<this cluster>` certificate, signed by its CA (for `etcd`: the client
    /// certificate Cilium's clustermesh-apiserver hands to its remote users).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl RemoteSection {
    /// How to reach the etcd of a remote of kind `etcd`.
    pub fn etcd_config(&self) -> Option<clustermesh_kvstore::etcd::EtcdConfig> {
        if self.kind != RemoteKind::Etcd {
            return None;
        }
        let url = if self.address.contains("://") {
            self.address.clone()
        } else {
            format!("https://{}", self.address)
        };
        let mut config = clustermesh_kvstore::etcd::EtcdConfig::new([url]);
        config.tls = Some(clustermesh_kvstore::etcd::EtcdTls {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        });
        Some(config)
    }
}

/// The bounded-staleness durations (milliseconds).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StalenessSection {
    /// Silence after which a remote is unreachable.
    #[serde(default = "default_unreachable")]
    pub unreachable_after_millis: u64,
    /// Unreachability after which its backends are withdrawn.
    #[serde(default = "default_withdraw")]
    pub withdraw_after_millis: u64,
    /// Time back and synced before a withdrawn remote is restored.
    #[serde(default = "default_restore")]
    pub restore_after_millis: u64,
    /// The panic threshold: keep a withdrawn cluster's backends when they are a global
    /// service's last ones (true), or withdraw them anyway (false).
    #[serde(default = "default_keep_last")]
    pub keep_last_backends: bool,
}

fn default_keep_last() -> bool {
    true
}

impl Default for StalenessSection {
    fn default() -> Self {
        Self {
            unreachable_after_millis: default_unreachable(),
            withdraw_after_millis: default_withdraw(),
            restore_after_millis: default_restore(),
            keep_last_backends: default_keep_last(),
        }
    }
}

fn default_unreachable() -> u64 {
    1500
}

fn default_withdraw() -> u64 {
    4000
}

fn default_restore() -> u64 {
    10_000
}

fn default_drain() -> u64 {
    30
}

fn default_true() -> bool {
    true
}

fn default_grace() -> u64 {
    30
}

fn default_heartbeat() -> u64 {
    500
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// This cluster.
    pub cluster: ClusterSection,
    /// The kvstore.
    pub store: StoreConfig,
    /// The source of objects.
    pub source: SourceConfig,
    /// Listen addresses.
    pub listen: ListenConfig,
    /// TLS files.
    pub tls: TlsConfig,
    /// Seconds an identity stays allocated after its last pod is gone.
    #[serde(default = "default_grace")]
    pub identity_grace_seconds: u64,
    /// Milliseconds between heartbeats on an idle Export stream.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_millis: u64,
    /// Events buffered per Export watcher.
    #[serde(default = "default_buffer")]
    pub export_buffer_events: usize,
    /// Milliseconds a watcher may leave its full buffer unread before it is reset.
    #[serde(default = "default_lag")]
    pub export_lag_timeout_millis: u64,
    /// Export connections open at once; more wait in the listen backlog (default 512, kept
    /// below the file-descriptor limit so that health, the store and the manifests always
    /// have descriptors).
    #[serde(default = "default_max_connections")]
    pub export_max_connections: usize,
    /// Milliseconds a client has to complete the TLS handshake (default 5000): a connection
    /// that sends nothing is closed.
    #[serde(default = "default_handshake")]
    pub export_handshake_timeout_millis: u64,
    /// Export watch streams one remote cluster may hold open at once (default 8; an importer
    /// uses one).
    #[serde(default = "default_streams_per_remote")]
    pub export_max_streams_per_remote: usize,
    /// Remote clusters to import.
    #[serde(default)]
    pub remotes: Vec<RemoteSection>,
    /// A directory with one YAML file per remote (the fields of a `remotes` entry), re-read
    /// every second: remotes come and go without a restart.
    #[serde(default)]
    pub remotes_dir: Option<PathBuf>,
    /// Clusters allowed to import from this one (their `remote-<name>` certificates accepted)
    /// without being imported themselves: a one-way export. The configured remotes are
    /// always allowed.
    #[serde(default)]
    pub allowed_remotes: Vec<ClusterName>,
    /// Seconds a removed remote's cached state is kept before it is deleted.
    #[serde(default = "default_drain")]
    pub remote_drain_grace_seconds: u64,
    /// Whether a namespace without the `clustermesh.cilium.io/global` annotation is exported
    /// to other clusters (default true: everything is).
    #[serde(default = "default_true")]
    pub global_namespaces_by_default: bool,
    /// The staleness contract.
    #[serde(default)]
    pub staleness: StalenessSection,
    /// Object size and per-remote quotas.
    #[serde(default)]
    pub limits: LimitsSection,
    /// OpenTelemetry tracing of changes (off unless an OTLP endpoint is set here or in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; docs/OBSERVABILITY.md).
    #[serde(default)]
    pub tracing: clustermesh_telemetry::TracingSection,
}

/// Object size and per-remote quotas (docs/SECURITY.md).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsSection {
    /// Bytes of one encoded object: the source refuses a larger one (reported, the last
    /// good version kept), the Export server never sends one, the importer rejects one.
    #[serde(default = "default_object_bytes")]
    pub max_object_bytes: usize,
    /// What one remote may place in this cluster's store.
    #[serde(default)]
    pub remote: RemoteLimits,
    /// The largest manifest file read; a larger one is a broken file (its last good objects
    /// stay).
    #[serde(default = "default_manifest_file_bytes")]
    pub manifest_file_bytes: u64,
    /// The most bytes read from the manifest directory: files past it (in path order) are
    /// broken files.
    #[serde(default = "default_manifest_total_bytes")]
    pub manifest_total_bytes: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_object_bytes: default_object_bytes(),
            remote: RemoteLimits::default(),
            manifest_file_bytes: default_manifest_file_bytes(),
            manifest_total_bytes: default_manifest_total_bytes(),
        }
    }
}

fn default_manifest_file_bytes() -> u64 {
    crate::source::manifest::MAX_FILE_BYTES
}

fn default_manifest_total_bytes() -> u64 {
    crate::source::manifest::MAX_TOTAL_BYTES
}

fn default_object_bytes() -> usize {
    clustermesh_sync::validate::MAX_OBJECT_BYTES
}

/// The quota of one remote (each field defaults to [`clustermesh_sync::worker::Quota`]'s).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RemoteLimits {
    /// Identities.
    pub max_identities: usize,
    /// Pod IPs (ipcache entries).
    pub max_ipcache: usize,
    /// Nodes.
    pub max_nodes: usize,
    /// Global services.
    pub max_services: usize,
    /// Bytes of keys and values in its cache.
    pub max_bytes: u64,
    /// Seconds before an import stopped by a quota is tried again.
    pub retry_after_seconds: u64,
}

impl Default for RemoteLimits {
    fn default() -> Self {
        let q = clustermesh_sync::worker::Quota::default();
        Self {
            max_identities: q.identities,
            max_ipcache: q.ip,
            max_nodes: q.nodes,
            max_services: q.services,
            max_bytes: q.bytes,
            retry_after_seconds: q.retry_after.as_secs(),
        }
    }
}

impl LimitsSection {
    /// The sync workers' quota.
    pub fn quota(&self) -> clustermesh_sync::worker::Quota {
        let r = &self.remote;
        clustermesh_sync::worker::Quota {
            identities: r.max_identities,
            ip: r.max_ipcache,
            nodes: r.max_nodes,
            services: r.max_services,
            bytes: r.max_bytes,
            object_bytes: self.max_object_bytes,
            retry_after: std::time::Duration::from_secs(r.retry_after_seconds.max(1)),
        }
    }
}

fn default_buffer() -> usize {
    1024
}

fn default_lag() -> u64 {
    5000
}

fn default_max_connections() -> usize {
    512
}

fn default_streams_per_remote() -> usize {
    8
}

fn default_handshake() -> u64 {
    5000
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { reason, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                reason,
            },
            ConfigError::Cluster { source, .. } => ConfigError::Cluster {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Parses YAML text, resolving relative paths against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut c: Self = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            reason: e.to_string(),
        })?;
        c.cluster_id().map_err(|source| ConfigError::Cluster {
            path: String::new(),
            source,
        })?;
        // The keys alone (the environment is read when the apiserver starts).
        clustermesh_telemetry::Settings::resolve(&c.tracing, "clustermesh-apiserver", |_| None)
            .map_err(|e| ConfigError::Parse {
                path: String::new(),
                reason: e.to_string(),
            })?;
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match (&mut c.source.manifest_dir, &mut c.source.kubernetes) {
            (Some(dir), None) => abs(dir),
            (None, Some(k)) => {
                if let Some(p) = &mut k.kubeconfig {
                    abs(p);
                }
            }
            _ => {
                return Err(ConfigError::Parse {
                    path: String::new(),
                    reason: "source needs exactly one of manifestDir and kubernetes".into(),
                });
            }
        }
        abs(&mut c.tls.ca);
        abs(&mut c.tls.cert);
        abs(&mut c.tls.key);
        if let Some(d) = &mut c.remotes_dir {
            abs(d);
        }
        for r in &mut c.remotes {
            abs(&mut r.ca);
            abs(&mut r.cert);
            abs(&mut r.key);
        }
        match &mut c.store {
            StoreConfig::Sled { path } => abs(path),
            StoreConfig::Etcd { tls: Some(t), .. } => {
                abs(&mut t.ca);
                abs(&mut t.cert);
                abs(&mut t.key);
            }
            StoreConfig::Etcd { tls: None, .. } => {}
        }
        Ok(c)
    }

    /// The cluster ID, checked against the mesh size.
    pub fn cluster_id(&self) -> Result<ClusterId, ClusterError> {
        ClusterId::new(self.cluster.id, self.cluster.max_connected_clusters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster: {name: c1, id: 7}
store: {backend: sled, path: data/store}
source: {manifestDir: manifests}
listen: {export: "127.0.0.1:0", health: "127.0.0.1:0"}
tls: {ca: certs/ca.pem, cert: certs/server.pem, key: /abs/server-key.pem}
"#;

    #[test]
    fn parses_and_resolves_relative_paths() {
        let c = Config::parse(GOOD, Path::new("/etc/cm")).unwrap();
        assert_eq!(c.cluster.name.as_str(), "c1");
        assert_eq!(c.cluster_id().unwrap().get(), 7);
        assert_eq!(c.cluster.max_connected_clusters, MaxConnectedClusters::C255);
        assert!(
            matches!(&c.store, StoreConfig::Sled { path } if path == Path::new("/etc/cm/data/store"))
        );
        assert_eq!(
            c.source.manifest_dir.as_deref(),
            Some(Path::new("/etc/cm/manifests"))
        );
        assert_eq!(c.tls.key, Path::new("/abs/server-key.pem"));
        assert_eq!((c.identity_grace_seconds, c.heartbeat_millis), (30, 500));
        let kube = GOOD.replace(
            "{manifestDir: manifests}",
            "{kubernetes: {kubeconfig: kube/config, context: east}}",
        );
        let c = Config::parse(&kube, Path::new("/etc/cm")).unwrap();
        let k = c.source.kubernetes.unwrap();
        assert_eq!(
            k.kubeconfig.as_deref(),
            Some(Path::new("/etc/cm/kube/config"))
        );
        assert_eq!(k.context.as_deref(), Some("east"));
        let etcd = GOOD.replace(
            "{backend: sled, path: data/store}",
            "{backend: etcd, endpoints: [\"http://127.0.0.1:2379\"], maxTxnOps: 4096}",
        );
        let c = Config::parse(&etcd, Path::new("/")).unwrap();
        assert!(matches!(
            &c.store,
            StoreConfig::Etcd { max_txn_ops: Some(n), max_txn_bytes: None, .. } if n.get() == 4096
        ));
    }

    #[test]
    fn refuses_bad_files_with_a_reason() {
        let cases = [
            (GOOD.replace("id: 7", "id: 300"), "out of range"),
            (GOOD.replace("name: c1", "name: default"), "reserved"),
            (
                GOOD.replace("backend: sled", "backend: mysql"),
                "unknown variant",
            ),
            (
                GOOD.replace("manifestDir", "manifestDirectory"),
                "unknown field",
            ),
            (GOOD.replace("tls:", "tlz:"), "unknown field"),
            (
                GOOD.replace("{manifestDir: manifests}", "{}"),
                "exactly one of manifestDir and kubernetes",
            ),
            (
                GOOD.replace(
                    "{manifestDir: manifests}",
                    "{manifestDir: m, kubernetes: {}}",
                ),
                "exactly one of manifestDir and kubernetes",
            ),
            (
                GOOD.replace(
                    "{backend: sled, path: data/store}",
                    "{backend: etcd, endpoints: [\"http://127.0.0.1:2379\"], maxTxnOps: 0}",
                ),
                "nonzero",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(&text, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
        let e = Config::load(Path::new("/nonexistent/apiserver.yaml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/apiserver.yaml"));
    }
}
