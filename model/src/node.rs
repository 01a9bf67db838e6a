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

/// A node of a cluster. Its JSON is Cilium's node JSON (`pkg/node/types.Node`): every field
/// Cilium writes, in Cilium's order, those this project does not track at their Go zero
/// values (`Source` is `k8s`: the node comes from a Kubernetes Node; the datapath balances
/// IPv4 only, so no IPv6 pod CIDR is kept). Reading takes Cilium's
/// nodes as written (pod CIDRs as Go's `net.IPNet`, `null` lists and maps) and ignores the
/// fields not tracked here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
    #[serde(
        rename = "IPv4AllocCIDR",
        default,
        deserialize_with = "crate::gozero::ipnet::deserialize"
    )]
    pub ipv4_alloc_cidr: Option<IpPrefix>,
    /// The node's Kubernetes labels.
    #[serde(
        rename = "Labels",
        default,
        deserialize_with = "crate::gozero::null_as_default"
    )]
    pub labels: BTreeMap<String, String>,
}

/// Cilium's `Source` of a node read from a Kubernetes Node object.
pub const NODE_SOURCE_KUBERNETES: &str = "k8s";

impl Serialize for Node {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        struct Net<'a>(&'a Option<IpPrefix>);
        impl Serialize for Net<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                crate::gozero::ipnet::serialize(self.0, s)
            }
        }
        let none = Option::<()>::None;
        let mut st = s.serialize_struct("Node", 18)?;
        st.serialize_field("Name", &self.name)?;
        st.serialize_field("Cluster", &self.cluster)?;
        st.serialize_field("IPAddresses", &self.addresses)?;
        st.serialize_field("IPv4AllocCIDR", &Net(&self.ipv4_alloc_cidr))?;
        st.serialize_field("IPv4SecondaryAllocCIDRs", &none)?;
        st.serialize_field("IPv6AllocCIDR", &none)?;
        st.serialize_field("IPv6SecondaryAllocCIDRs", &none)?;
        st.serialize_field("IPv4HealthIP", "")?;
        st.serialize_field("IPv6HealthIP", "")?;
        st.serialize_field("IPv4IngressIP", "")?;
        st.serialize_field("IPv6IngressIP", "")?;
        st.serialize_field("ClusterID", &self.cluster_id)?;
        st.serialize_field("Source", NODE_SOURCE_KUBERNETES)?;
        st.serialize_field("EncryptionKey", &0u8)?;
        st.serialize_field("Labels", &self.labels)?;
        st.serialize_field("Annotations", &none)?;
        st.serialize_field("WireguardPubKey", "")?;
        st.serialize_field("BootID", "")?;
        st.end()
    }
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
