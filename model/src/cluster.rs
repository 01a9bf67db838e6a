//! Cluster names, cluster IDs, the mesh size mode (255 or 511 clusters) and the cluster
//! config each apiserver publishes under `cilium/cluster-config/<cluster>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a cluster name, ID or config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The name is empty or longer than 32 characters.
    #[error("cluster name {name:?} must be 1 to 32 characters long")]
    NameLength {
        /// The refused name.
        name: String,
    },
    /// The name has a character or shape the pattern does not allow.
    #[error(
        "cluster name {name:?} must consist of lower case letters, digits and '-', and start and end with a letter or digit"
    )]
    NameSyntax {
        /// The refused name.
        name: String,
    },
    /// `default` is what an unconfigured Cilium calls itself; two such clusters would collide.
    #[error("cluster name \"default\" is reserved; give the cluster a unique name")]
    NameReserved,
    /// ID 0 means "not part of a mesh".
    #[error("cluster ID 0 is reserved; use 1..={max}")]
    IdZero {
        /// The largest ID of the mesh's mode.
        max: u16,
    },
    /// The ID does not fit the mesh's mode.
    #[error("cluster ID {id} is out of range 1..={max} (max connected clusters {max})")]
    IdOutOfRange {
        /// The refused ID.
        id: u32,
        /// The largest ID of the mesh's mode.
        max: u16,
    },
    /// Only 255 and 511 are supported, as in Cilium.
    #[error("max connected clusters must be 255 or 511, not {0}")]
    MaxConnectedClusters(u32),
}

// === impl ClusterName ===

/// A validated cluster name: 1–32 characters of `^([a-z0-9][-a-z0-9]*)?[a-z0-9]$`, not
/// `default`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

impl ClusterName {
    /// The longest name accepted.
    pub const MAX_LEN: usize = 32;

    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, ClusterError> {
        let name = name.into();
        if name.is_empty() || name.len() > Self::MAX_LEN {
            return Err(ClusterError::NameLength { name });
        }
        let bytes = name.as_bytes();
        let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !bytes.iter().all(|&b| allowed(b)) || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1])
        {
            return Err(ClusterError::NameSyntax { name });
        }
        if name == "default" {
            return Err(ClusterError::NameReserved);
        }
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = ClusterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for ClusterName {
    type Error = ClusterError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<ClusterName> for String {
    fn from(n: ClusterName) -> Self {
        n.0
    }
}

// === impl MaxConnectedClusters ===

/// How many clusters a mesh may hold. It decides how many bits of a numeric identity carry the
/// cluster ID, so every cluster of one mesh must use the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub enum MaxConnectedClusters {
    /// 255 clusters, 8 cluster bits at shift 16, 65,535 local identities per cluster.
    #[default]
    C255,
    /// 511 clusters, 9 cluster bits at shift 15, 32,767 local identities per cluster.
    C511,
}

impl MaxConnectedClusters {
    /// The largest valid cluster ID.
    pub const fn max_cluster_id(self) -> u16 {
        match self {
            Self::C255 => 255,
            Self::C511 => 511,
        }
    }

    /// Where the cluster ID starts inside a numeric identity.
    pub const fn identity_shift(self) -> u32 {
        match self {
            Self::C255 => 16,
            Self::C511 => 15,
        }
    }
}

impl TryFrom<u32> for MaxConnectedClusters {
    type Error = ClusterError;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        match v {
            255 => Ok(Self::C255),
            511 => Ok(Self::C511),
            other => Err(ClusterError::MaxConnectedClusters(other)),
        }
    }
}

impl From<MaxConnectedClusters> for u32 {
    fn from(m: MaxConnectedClusters) -> Self {
        u32::from(m.max_cluster_id())
    }
}

impl fmt::Display for MaxConnectedClusters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.max_cluster_id())
    }
}

// === impl ClusterId ===

/// A cluster ID, 1..=255 or 1..=511 depending on [`MaxConnectedClusters`]. 0 is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "u32")]
pub struct ClusterId(u16);

impl ClusterId {
    /// Validates `id` for a mesh of the given size.
    pub fn new(id: u32, mode: MaxConnectedClusters) -> Result<Self, ClusterError> {
        let max = mode.max_cluster_id();
        match id {
            0 => Err(ClusterError::IdZero { max }),
            id if id > u32::from(max) => Err(ClusterError::IdOutOfRange { id, max }),
            id => Ok(Self(
                u16::try_from(id).expect("checked against max above, which fits u16"),
            )),
        }
    }

    /// The ID as a number.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl From<ClusterId> for u32 {
    fn from(id: ClusterId) -> Self {
        u32::from(id.0)
    }
}

impl<'de> Deserialize<'de> for ClusterId {
    /// Accepts the widest mode (1..=511); callers that know the mesh size check again with
    /// [`ClusterId::new`].
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = u32::deserialize(d)?;
        Self::new(raw, MaxConnectedClusters::C511).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

// === impl ClusterConfig ===

/// What a cluster can do, as published in its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// The cluster writes `cilium/synced/...` canaries once each prefix is fully written.
    #[serde(default)]
    pub synced_canaries: bool,
    /// The config describes a remote cluster whose state this kvstore serves from its cache
    /// (`cilium/cache/...`): set only on the configs KVStoreMesh mirrors for remotes, never on
    /// a cluster's own config (a Cilium consumer would wait for cache canaries that never
    /// come). Omitted when false, as Cilium writes it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cached: bool,
    /// The mesh size mode; must be equal across the mesh.
    #[serde(default)]
    pub max_connected_clusters: MaxConnectedClusters,
    /// Whether the cluster exports MCS-API ServiceExports (`cilium/state/serviceexports`);
    /// Cilium's clustermesh-apiserver always writes it (false here: none are exported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_exports_enabled: Option<bool>,
}

/// serde's `skip_serializing_if` passes a reference.
fn is_false(b: &bool) -> bool {
    !*b
}

/// The value under `cilium/cluster-config/<cluster>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// The cluster's ID.
    pub id: ClusterId,
    /// What the cluster supports.
    pub capabilities: Capabilities,
}

impl ClusterConfig {
    /// Checks that the ID fits the config's own mesh size (the deserializer only checks the
    /// widest mode).
    pub fn validate(&self) -> Result<(), ClusterError> {
        ClusterId::new(self.id.into(), self.capabilities.max_connected_clusters).map(|_| ())
    }
}

/// How this cluster sees a remote cluster, published to the local agents (the staleness
/// contract: a withdrawn cluster's service backends leave global services).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The remote cluster.
    pub cluster: ClusterName,
    /// A connection to it is up.
    pub connected: bool,
    /// Its initial sync completed.
    pub ready: bool,
    /// Its backends are withdrawn from global services.
    pub withdrawn: bool,
    /// The panic threshold: when withdrawing would leave a global service with no backend at
    /// all, agents keep this cluster's backends instead (default true).
    #[serde(default = "keep_last_backends_default", rename = "keepLastBackends")]
    pub keep_last_backends: bool,
    /// Failed connections and broken or refused sessions to it so far.
    #[serde(default)]
    pub failures: u64,
    /// When the last one happened (Unix seconds; 0: none).
    #[serde(default, rename = "lastFailureTime")]
    pub last_failure_time: u64,
}

fn keep_last_backends_default() -> bool {
    true
}

#[cfg(test)]
mod tests;
