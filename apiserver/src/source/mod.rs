//! Sources of a cluster's objects, reduced to what the mesh needs. Every source (the manifest
//! directory here, the Kubernetes API later) produces the same [`SourceObjects`], so everything
//! after the source is one code path.

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustermesh_model::endpoint::NamedPort;
use clustermesh_model::ip::Protocol;
use clustermesh_model::policy::NetworkPolicy;
use clustermesh_model::service::BackendConditions;

pub mod crd;
pub mod endpoints;
pub mod k8s;
pub mod knp;
pub mod kubernetes;
pub mod manifest;
pub mod watch;

/// A namespaced name.
pub type NsName = (String, String);

/// A namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its `clustermesh.cilium.io/global` annotation, when set to true or false.
    pub global: Option<bool>,
}

/// The namespace annotation that exports a namespace (`"true"`) or keeps it home (`"false"`).
pub const GLOBAL_NAMESPACE_ANNOTATION: &str = "clustermesh.cilium.io/global";

/// A pod, as far as identities and the ipcache care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its service account (`spec.serviceAccountName`; `default` when the pod names none, as
    /// a real API server's admission sets it).
    pub service_account: String,
    /// Its IPs (none before it is scheduled and started).
    pub ips: Vec<IpAddr>,
    /// The IP of its node.
    pub host_ip: Option<IpAddr>,
    /// Host-network pods have the node's identity, not one of their own.
    pub host_network: bool,
    /// Named container ports.
    pub named_ports: Vec<NamedPort>,
    /// Its `Ready` condition is `True`.
    pub ready: bool,
    /// Its phase is `Succeeded` or `Failed`: it will not run again.
    pub terminal: bool,
    /// It has a deletion timestamp.
    pub terminating: bool,
    /// The node it is scheduled on.
    pub node_name: Option<String>,
}

/// One port of a Service or an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Its name (empty for the single unnamed port).
    pub name: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Port number.
    pub port: u16,
    /// A Service port's `targetPort` (none: the same number as `port`; always none in an
    /// EndpointSlice).
    pub target: Option<TargetPort>,
}

/// A Service port's `targetPort`: a number, or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A named container port, resolved per pod.
    Name(String),
}

/// A Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// ClusterIPs; empty for headless services.
    pub cluster_ips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<PortInfo>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations (global-service settings live here).
    pub annotations: BTreeMap<String, String>,
    /// Pod selector.
    pub selector: BTreeMap<String, String>,
    /// `publishNotReadyAddresses`: not-ready pods are ready endpoints.
    pub publish_not_ready: bool,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// Its conditions.
    pub conditions: BackendConditions,
}

/// An EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The service it belongs to (`kubernetes.io/service-name`).
    pub service: String,
    /// Ports.
    pub ports: Vec<PortInfo>,
    /// Endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// A node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its name.
    pub name: String,
    /// Its addresses with their types.
    pub addresses: Vec<(String, IpAddr)>,
    /// Its IPv4 pod CIDR.
    pub pod_cidr: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// Everything a source knows about the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceObjects {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    /// Pods.
    pub pods: BTreeMap<NsName, PodInfo>,
    /// Services.
    pub services: BTreeMap<NsName, ServiceInfo>,
    /// EndpointSlices.
    pub endpoint_slices: BTreeMap<NsName, SliceInfo>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Network policies by (namespace, name); clusterwide ones have no namespace.
    pub policies: BTreeMap<(Option<String>, String), NetworkPolicy>,
}

/// A source object that could not be used; reported, and the rest goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {reason}")]
pub struct SourceProblem {
    /// Where it came from (a file and document, or an object).
    pub origin: String,
    /// What is wrong.
    pub reason: String,
}
