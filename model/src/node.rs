//! Nodes of a cluster, stored under `cilium/state/nodes/v1/<cluster>/<node>` as Cilium's node
//! JSON.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, ClusterName};
use crate::ip::IpPrefix;
use crate::names::{self, NameError};

/// Why a node was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// The node's name is not a DNS subdomain.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The node claims another cluster than the one that sent it.
    #[error(
        "node {node} claims cluster {found:?} (ID {found_id}), expected {expected:?} (ID {expected_id})"
    )]
    WrongCluster {
        /// The node's name.
        node: String,
        /// The cluster the node names.
        found: String,
        /// The cluster ID the node names.
        found_id: u16,
        /// The cluster that sent it.
        expected: String,
        /// That cluster's ID.
        expected_id: u16,
    },
    /// A node without any address cannot be reached.
    #[error("node {0} has no address")]
    NoAddress(String),
}

/// One address of a node, with its Kubernetes type (`InternalIP`, `ExternalIP`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeAddress {
    /// The address type.
    #[serde(rename = "Type")]
    pub kind: String,
    /// The address.
    #[serde(rename = "IP")]
    pub ip: IpAddr,
}

/// A node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The node's name.
    #[serde(rename = "Name")]
    pub name: String,
    /// The cluster it belongs to.
    #[serde(rename = "Cluster")]
    pub cluster: ClusterName,
    /// That cluster's ID.
    #[serde(rename = "ClusterID")]
    pub cluster_id: ClusterId,
    /// The node's addresses.
    #[serde(
        rename = "IPAddresses",
        default,
        deserialize_with = "crate::gozero::null_as_default"
    )]
    pub addresses: Vec<NodeAddress>,
    /// The pod CIDR the node allocates IPv4 addresses from.
    #[serde(rename = "IPv4AllocCIDR", default)]
    pub ipv4_alloc_cidr: Option<IpPrefix>,
    /// The node's Kubernetes labels.
    #[serde(
        rename = "Labels",
        default,
        deserialize_with = "crate::gozero::null_as_default"
    )]
    pub labels: BTreeMap<String, String>,
}

impl Node {
    /// Checks a node received from `cluster`.
    pub fn check_from_cluster(
        &self,
        cluster: &ClusterName,
        id: ClusterId,
    ) -> Result<(), NodeError> {
        names::check_dns_subdomain("node", &self.name)?;
        if &self.cluster != cluster || self.cluster_id != id {
            return Err(NodeError::WrongCluster {
                node: self.name.clone(),
                found: self.cluster.to_string(),
                found_id: self.cluster_id.get(),
                expected: cluster.to_string(),
                expected_id: id.get(),
            });
        }
        if self.addresses.is_empty() {
            return Err(NodeError::NoAddress(self.name.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
