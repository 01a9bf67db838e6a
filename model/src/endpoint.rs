//! ipcache entries: which identity a pod IP has, on which host, under which pod. Stored under
//! `cilium/state/ip/v1/default/<ip>` as Cilium's `IPIdentityPair` JSON.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, MaxConnectedClusters};
use crate::identity::{Identity, IdentityError};
use crate::ip::Protocol;
use crate::names::{self, NameError};

/// Why an ipcache entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The identity is not the sending cluster's.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A reserved identity on a pod IP.
    #[error("pod {ip} has reserved identity {identity}")]
    ReservedIdentity {
        /// The pod IP.
        ip: IpAddr,
        /// The identity.
        identity: u32,
    },
    /// A namespace, pod or port name that is not a valid Kubernetes name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A named port with port 0.
    #[error("named port {0:?} has port 0")]
    PortZero(String),
    /// An address no pod can have.
    #[error(transparent)]
    Address(#[from] crate::ip::AddressError),
}

/// A named container port of the pod (for policies that name ports).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    /// The port's name.
    #[serde(rename = "Name")]
    pub name: String,
    /// The port number.
    #[serde(rename = "Port")]
    pub port: u16,
    /// The protocol.
    #[serde(rename = "Protocol")]
    pub protocol: Protocol,
}

/// One ipcache entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpCacheEntry {
    /// The pod's IP.
    #[serde(rename = "IP")]
    pub ip: IpAddr,
    /// The pod's security identity.
    #[serde(rename = "ID")]
    pub identity: Identity,
    /// The IP of the node the pod runs on.
    #[serde(
        rename = "HostIP",
        default,
        deserialize_with = "crate::gozero::empty_ip_as_none"
    )]
    pub host_ip: Option<IpAddr>,
    /// The pod's namespace.
    #[serde(rename = "K8sNamespace", default)]
    pub namespace: String,
    /// The pod's name.
    #[serde(rename = "K8sPodName", default)]
    pub pod_name: String,
    /// The pod's named ports.
    #[serde(
        rename = "NamedPorts",
        default,
        deserialize_with = "crate::gozero::null_as_default"
    )]
    pub named_ports: Vec<NamedPort>,
}

impl IpCacheEntry {
    /// Checks an entry received from `cluster`: its identity is a workload identity the
    /// cluster owns, and its names are valid.
    pub fn check_from_cluster(
        &self,
        cluster: ClusterId,
        mode: MaxConnectedClusters,
    ) -> Result<(), EndpointError> {
        if self.identity.is_reserved() {
            return Err(EndpointError::ReservedIdentity {
                ip: self.ip,
                identity: self.identity.get(),
            });
        }
        self.identity.check_owned_by(cluster, mode)?;
        crate::ip::check_usable(self.ip)?;
        self.check_names()
    }

    /// Checks the namespace, pod and port names.
    pub fn check_names(&self) -> Result<(), EndpointError> {
        names::check_dns_label("namespace", &self.namespace)?;
        names::check_dns_subdomain("pod", &self.pod_name)?;
        for p in &self.named_ports {
            names::check_port_name(&p.name)?;
            if p.port == 0 {
                return Err(EndpointError::PortZero(p.name.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
