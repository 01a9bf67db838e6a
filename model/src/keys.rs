//! The kvstore key layout, Cilium's, so that operators and `etcdctl` find their way:
//!
//! | key | value |
//! |---|---|
//! | `cilium/cluster-config/<cluster>` | [`ClusterConfig`](crate::ClusterConfig) JSON |
//! | `cilium/state/identities/v1/id/<id>` | [`LabelSet`](crate::LabelSet) string form |
//! | `cilium/state/ip/v1/default/<ip>` | [`IpCacheEntry`](crate::endpoint::IpCacheEntry) JSON |
//! | `cilium/state/nodes/v1/<cluster>/<node>` | [`Node`](crate::node::Node) JSON |
//! | `cilium/state/services/v1/<cluster>/<ns>/<name>` | [`ClusterService`](crate::service::ClusterService) JSON |
//! | `cilium/synced/<cluster>/cilium/state/<kind>/v1` | timestamp of the initial sync |
//! | `cilium/cache/<kind>/v1/<remote>/...` | the same values, imported from a remote |
//! | `cilium/state/identities/v1/value/<labels>` | the identity allocated to that label set |
//! | `clustermesh/local/...` | local-only state (policies, remote cluster status), never exported |
//!
//! [`Key`] builds every key (`Display`) and parses it back, validating each part.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::cluster::{ClusterError, ClusterName};
use crate::identity::{Identity, IdentityError};
use crate::ip::{AddressError, parse_ip};
use crate::names::{self, NameError};

/// Prefix of every cluster config.
pub const CLUSTER_CONFIG_PREFIX: &str = "cilium/cluster-config/";
/// Prefix of sync canaries.
pub const SYNCED_PREFIX: &str = "cilium/synced/";
/// Prefix of everything imported from remote clusters.
pub const CACHE_PREFIX: &str = "cilium/cache/";
/// Prefix of local-only state, never exported.
pub const LOCAL_PREFIX: &str = "clustermesh/local/";
const POLICIES: &str = "clustermesh/local/policies/";
/// Prefix of the remote clusters' status, as this cluster's sync workers see them.
pub const CLUSTER_STATUS_PREFIX: &str = "clustermesh/local/cluster-status/";
/// Prefix of this cluster's identities (not split per cluster: the value names it).
pub const IDENTITY_ID_PREFIX: &str = "cilium/state/identities/v1/id/";
/// Prefix of this cluster's ipcache entries.
pub const IPCACHE_PREFIX: &str = "cilium/state/ip/v1/default/";
/// Prefix of the reverse index label set -> identity, used to allocate each label set once.
pub const IDENTITY_VALUE_PREFIX: &str = "cilium/state/identities/v1/value/";
const CLUSTERWIDE_POLICIES: &str = "clustermesh/local/clusterwide-policies/";
/// Prefix of every Service of this cluster, for its own agents: global or not, shared or not,
/// with every backend and its conditions. `cilium/state/services/v1/<cluster>/` holds what
/// Cilium's clustermesh-apiserver exports instead: only global and shared Services of global
/// namespaces, with only their ready or serving backends.
pub const LOCAL_SERVICES_PREFIX: &str = "clustermesh/local/services/v1/";

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is under no known prefix, or has the wrong number of parts.
    #[error("{0:?} is not a clustermesh key")]
    Unknown(String),
    /// A cluster name in the key is invalid.
    #[error("in key {key:?}: {source}")]
    Cluster {
        /// The key.
        key: String,
        /// What is wrong with the name.
        source: ClusterError,
    },
    /// The identity in the key is invalid.
    #[error("in key {key:?}: {source}")]
    Identity {
        /// The key.
        key: String,
        /// What is wrong with the identity.
        source: IdentityError,
    },
    /// The IP in the key is invalid.
    #[error("in key {key:?}: {source}")]
    Ip {
        /// The key.
        key: String,
        /// What is wrong with the address.
        source: AddressError,
    },
    /// The label set in an identity value key is invalid.
    #[error("in key {key:?}: {source}")]
    Labels {
        /// The key.
        key: String,
        /// What is wrong with the labels.
        source: crate::labels::LabelError,
    },
    /// An object name in the key is invalid.
    #[error("in key {key:?}: {source}")]
    Name {
        /// The key.
        key: String,
        /// What is wrong with the name.
        source: NameError,
    },
}

// === impl ExportKind ===

/// The kinds of state a cluster exports to its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExportKind {
    /// Numeric identities and their labels.
    Identities,
    /// ipcache entries.
    IpCache,
    /// Nodes.
    Nodes,
    /// Services.
    Services,
}

impl ExportKind {
    /// Every kind.
    pub const ALL: [Self; 4] = [Self::Identities, Self::IpCache, Self::Nodes, Self::Services];

    /// The kind's segment in keys (`identities`, `ip`, `nodes`, `services`).
    pub const fn segment(self) -> &'static str {
        match self {
            Self::Identities => "identities",
            Self::IpCache => "ip",
            Self::Nodes => "nodes",
            Self::Services => "services",
        }
    }

    fn from_segment(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.segment() == s)
    }

    /// Where a cluster keeps its own objects of this kind. Identities and ipcache entries are
    /// not split per cluster (their values name the cluster), as in Cilium.
    pub fn state_prefix(self, cluster: &ClusterName) -> String {
        match self {
            Self::Identities => IDENTITY_ID_PREFIX.to_owned(),
            Self::IpCache => IPCACHE_PREFIX.to_owned(),
            Self::Nodes | Self::Services => {
                format!("cilium/state/{}/v1/{cluster}/", self.segment())
            }
        }
    }

    /// Where objects of this kind imported from `remote` are kept.
    pub fn cache_prefix(self, remote: &ClusterName) -> String {
        let base = format!("{CACHE_PREFIX}{}/v1/{remote}/", self.segment());
        match self {
            Self::Identities => base + "id/",
            _ => base,
        }
    }

    /// The sync canary of this kind for `cluster`.
    pub fn synced_key(self, cluster: &ClusterName) -> String {
        Key::Synced {
            cluster: cluster.clone(),
            kind: self,
        }
        .to_string()
    }

    /// The sync canary of this kind in the cache of `remote`, written by the importing
    /// apiserver once the remote's snapshot is in the cache:
    /// `cilium/synced/<remote>/cilium/cache/<kind>/v1`.
    pub fn cache_synced_key(self, remote: &ClusterName) -> String {
        format!("{SYNCED_PREFIX}{remote}/cilium/cache/{}/v1", self.segment())
    }
}

impl fmt::Display for ExportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.segment())
    }
}

// === impl Key ===

/// The object a cache key points at, inside the remote's cache prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CachedObject {
    /// `id/<id>`.
    Identity(Identity),
    /// `<ip>`.
    IpCache(IpAddr),
    /// `<node>`.
    Node(String),
    /// `<ns>/<name>`.
    Service {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

/// Every key clustermesh writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// `cilium/cluster-config/<cluster>`.
    ClusterConfig {
        /// The cluster.
        cluster: ClusterName,
    },
    /// `cilium/state/identities/v1/id/<id>`.
    Identity {
        /// The identity.
        id: Identity,
    },
    /// `cilium/state/ip/v1/default/<ip>`.
    IpCache {
        /// The pod IP.
        ip: IpAddr,
    },
    /// `cilium/state/nodes/v1/<cluster>/<node>`.
    Node {
        /// The node's cluster.
        cluster: ClusterName,
        /// The node's name.
        name: String,
    },
    /// `cilium/state/services/v1/<cluster>/<ns>/<name>`.
    Service {
        /// The service's cluster.
        cluster: ClusterName,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// `cilium/synced/<cluster>/cilium/state/<kind>/v1`.
    Synced {
        /// The cluster.
        cluster: ClusterName,
        /// The kind whose initial sync completed.
        kind: ExportKind,
    },
    /// `cilium/cache/<kind>/v1/<remote>/...`.
    Cached {
        /// The remote cluster the object was imported from.
        remote: ClusterName,
        /// The object.
        object: CachedObject,
    },
    /// `cilium/state/identities/v1/value/<label string>/<owner>`: the identity of a label
    /// set, as one of its users (Cilium: a node; here: the apiserver) holds it, attached to
    /// the user's lease (Cilium's allocator layout).
    IdentityValue {
        /// The label set.
        labels: crate::labels::LabelSet,
        /// Who holds it: no `/`, not empty.
        owner: String,
    },
    /// `clustermesh/local/services/v1/<ns>/<name>`: a Service of this cluster as its own
    /// agents see it.
    LocalService {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// `clustermesh/local/cluster-status/<cluster>`.
    ClusterStatus {
        /// The remote cluster.
        cluster: ClusterName,
    },
    /// `clustermesh/local/policies/<ns>/<name>` or
    /// `clustermesh/local/clusterwide-policies/<name>`.
    Policy {
        /// The namespace; `None` for a clusterwide policy.
        namespace: Option<String>,
        /// The policy's name.
        name: String,
    },
}

impl Key {
    /// The export kind the key belongs to, if any.
    pub fn export_kind(&self) -> Option<ExportKind> {
        match self {
            Self::Identity { .. } => Some(ExportKind::Identities),
            Self::IpCache { .. } => Some(ExportKind::IpCache),
            Self::Node { .. } => Some(ExportKind::Nodes),
            Self::Service { .. } => Some(ExportKind::Services),
            Self::Cached { object, .. } => Some(match object {
                CachedObject::Identity(_) => ExportKind::Identities,
                CachedObject::IpCache(_) => ExportKind::IpCache,
                CachedObject::Node(_) => ExportKind::Nodes,
                CachedObject::Service { .. } => ExportKind::Services,
            }),
            _ => None,
        }
    }

    /// Parses and validates a key.
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        let unknown = || KeyError::Unknown(key.to_owned());
        let cluster = |s: &str| {
            ClusterName::new(s).map_err(|source| KeyError::Cluster {
                key: key.to_owned(),
                source,
            })
        };
        let identity = |s: &str| {
            Identity::parse_decimal(s).map_err(|source| KeyError::Identity {
                key: key.to_owned(),
                source,
            })
        };
        let ip = |s: &str| {
            parse_ip(s).map_err(|source| KeyError::Ip {
                key: key.to_owned(),
                source,
            })
        };
        let label = |what, s: &str| {
            names::check_dns_label(what, s)
                .map(|()| s.to_owned())
                .map_err(|source| KeyError::Name {
                    key: key.to_owned(),
                    source,
                })
        };
        let subdomain = |what, s: &str| {
            names::check_dns_subdomain(what, s)
                .map(|()| s.to_owned())
                .map_err(|source| KeyError::Name {
                    key: key.to_owned(),
                    source,
                })
        };

        if let Some(rest) = key.strip_prefix(CLUSTER_CONFIG_PREFIX) {
            return Ok(Self::ClusterConfig {
                cluster: cluster(rest)?,
            });
        }
        if let Some(rest) = key.strip_prefix(SYNCED_PREFIX) {
            let (c, prefix) = rest.split_once('/').ok_or_else(unknown)?;
            let kind = prefix
                .strip_prefix("cilium/state/")
                .and_then(|p| p.strip_suffix("/v1"))
                .and_then(ExportKind::from_segment)
                .ok_or_else(unknown)?;
            return Ok(Self::Synced {
                cluster: cluster(c)?,
                kind,
            });
        }
        if let Some(rest) = key.strip_prefix(LOCAL_SERVICES_PREFIX) {
            let (ns, name) = rest.split_once('/').ok_or_else(unknown)?;
            return Ok(Self::LocalService {
                namespace: label("namespace", ns)?,
                name: label("service", name)?,
            });
        }
        if let Some(rest) = key.strip_prefix(CLUSTER_STATUS_PREFIX) {
            return Ok(Self::ClusterStatus {
                cluster: cluster(rest)?,
            });
        }
        if let Some(rest) = key.strip_prefix(IDENTITY_VALUE_PREFIX) {
            // The label string ends with `;` (label keys may hold `/`); the owner follows.
            let (labels, owner) = rest
                .rsplit_once('/')
                .filter(|(l, o)| l.ends_with(';') && !o.is_empty())
                .ok_or_else(unknown)?;
            let labels = labels.parse().map_err(|source| KeyError::Labels {
                key: key.to_owned(),
                source,
            })?;
            if !owner.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(unknown());
            }
            return Ok(Self::IdentityValue {
                labels,
                owner: owner.to_owned(),
            });
        }
        if let Some(rest) = key.strip_prefix(POLICIES) {
            let (ns, name) = rest.split_once('/').ok_or_else(unknown)?;
            return Ok(Self::Policy {
                namespace: Some(label("namespace", ns)?),
                name: subdomain("policy", name)?,
            });
        }
        if let Some(rest) = key.strip_prefix(CLUSTERWIDE_POLICIES) {
            return Ok(Self::Policy {
                namespace: None,
                name: subdomain("policy", rest)?,
            });
        }
        if let Some(rest) = key.strip_prefix(CACHE_PREFIX) {
            let (segment, rest) = rest.split_once("/v1/").ok_or_else(unknown)?;
            let kind = ExportKind::from_segment(segment).ok_or_else(unknown)?;
            let (remote, rest) = rest.split_once('/').ok_or_else(unknown)?;
            let object = match kind {
                ExportKind::Identities => {
                    CachedObject::Identity(identity(rest.strip_prefix("id/").ok_or_else(unknown)?)?)
                }
                ExportKind::IpCache => CachedObject::IpCache(ip(rest)?),
                ExportKind::Nodes => CachedObject::Node(subdomain("node", rest)?),
                ExportKind::Services => {
                    let (ns, name) = rest.split_once('/').ok_or_else(unknown)?;
                    CachedObject::Service {
                        namespace: label("namespace", ns)?,
                        name: label("service", name)?,
                    }
                }
            };
            return Ok(Self::Cached {
                remote: cluster(remote)?,
                object,
            });
        }
        let rest = key.strip_prefix("cilium/state/").ok_or_else(unknown)?;
        if let Some(id) = rest.strip_prefix("identities/v1/id/") {
            return Ok(Self::Identity { id: identity(id)? });
        }
        if let Some(addr) = rest.strip_prefix("ip/v1/default/") {
            return Ok(Self::IpCache { ip: ip(addr)? });
        }
        if let Some(rest) = rest.strip_prefix("nodes/v1/") {
            let (c, name) = rest.split_once('/').ok_or_else(unknown)?;
            return Ok(Self::Node {
                cluster: cluster(c)?,
                name: subdomain("node", name)?,
            });
        }
        if let Some(rest) = rest.strip_prefix("services/v1/") {
            let mut parts = rest.splitn(3, '/');
            let (Some(c), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(unknown());
            };
            return Ok(Self::Service {
                cluster: cluster(c)?,
                namespace: label("namespace", ns)?,
                name: label("service", name)?,
            });
        }
        Err(unknown())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClusterConfig { cluster } => write!(f, "{CLUSTER_CONFIG_PREFIX}{cluster}"),
            Self::Identity { id } => write!(f, "cilium/state/identities/v1/id/{id}"),
            // Go's text form: an IPv4-mapped address is written as the IPv4 one.
            Self::IpCache { ip } => write!(f, "cilium/state/ip/v1/default/{}", ip.to_canonical()),
            Self::Node { cluster, name } => write!(f, "cilium/state/nodes/v1/{cluster}/{name}"),
            Self::Service {
                cluster,
                namespace,
                name,
            } => {
                write!(f, "cilium/state/services/v1/{cluster}/{namespace}/{name}")
            }
            Self::Synced { cluster, kind } => {
                write!(
                    f,
                    "{SYNCED_PREFIX}{cluster}/cilium/state/{}/v1",
                    kind.segment()
                )
            }
            Self::Cached { remote, object } => match object {
                CachedObject::Identity(id) => {
                    write!(f, "{}{id}", ExportKind::Identities.cache_prefix(remote))
                }
                CachedObject::IpCache(ip) => {
                    write!(
                        f,
                        "{}{}",
                        ExportKind::IpCache.cache_prefix(remote),
                        ip.to_canonical()
                    )
                }
                CachedObject::Node(name) => {
                    write!(f, "{}{name}", ExportKind::Nodes.cache_prefix(remote))
                }
                CachedObject::Service { namespace, name } => {
                    write!(
                        f,
                        "{}{namespace}/{name}",
                        ExportKind::Services.cache_prefix(remote)
                    )
                }
            },
            Self::IdentityValue { labels, owner } => {
                write!(f, "{IDENTITY_VALUE_PREFIX}{labels}/{owner}")
            }
            Self::ClusterStatus { cluster } => write!(f, "{CLUSTER_STATUS_PREFIX}{cluster}"),
            Self::LocalService { namespace, name } => {
                write!(f, "{LOCAL_SERVICES_PREFIX}{namespace}/{name}")
            }
            Self::Policy {
                namespace: Some(ns),
                name,
            } => write!(f, "{POLICIES}{ns}/{name}"),
            Self::Policy {
                namespace: None,
                name,
            } => write!(f, "{CLUSTERWIDE_POLICIES}{name}"),
        }
    }
}

impl FromStr for Key {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests;
