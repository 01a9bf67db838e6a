//! Cluster services: a Service's frontends and its backends (from its EndpointSlices) with
//! their conditions, and the global-service settings parsed from its annotations. Stored under
//! `cilium/state/services/v1/<cluster>/<ns>/<name>` as Cilium's `ClusterService` JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterId, ClusterName};
use crate::ip::L4Addr;
use crate::names::{self, NameError};

/// Marks a service as global (merged across clusters).
pub const ANNOTATION_GLOBAL: &str = "service.cilium.io/global";
/// Whether a global service's local backends are exported to other clusters.
pub const ANNOTATION_SHARED: &str = "service.cilium.io/shared";
/// Which backends a global service prefers: `local`, `remote` or `none`.
pub const ANNOTATION_AFFINITY: &str = "service.cilium.io/affinity";
/// Legacy spelling of [`ANNOTATION_GLOBAL`].
pub const LEGACY_ANNOTATION_GLOBAL: &str = "io.cilium/global-service";
/// Legacy spelling of [`ANNOTATION_SHARED`].
pub const LEGACY_ANNOTATION_SHARED: &str = "io.cilium/shared-service";
/// Legacy spelling of [`ANNOTATION_AFFINITY`].
pub const LEGACY_ANNOTATION_AFFINITY: &str = "io.cilium/service-affinity";

/// Port name -> protocol and port, Cilium's `PortConfiguration`. The name is empty for the
/// single unnamed port a Service may have.
pub type PortConfiguration = BTreeMap<String, L4Addr>;

/// Why a service was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// A namespace, service or port name that is not a valid Kubernetes name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The service claims another cluster than the one that sent it.
    #[error(
        "service {namespace}/{name} claims cluster {found:?} (ID {found_id}), expected {expected:?} (ID {expected_id})"
    )]
    WrongCluster {
        /// The service's namespace.
        namespace: String,
        /// The service's name.
        name: String,
        /// The cluster the service names.
        found: String,
        /// The cluster ID the service names.
        found_id: u16,
        /// The cluster that sent it.
        expected: String,
        /// That cluster's ID.
        expected_id: u16,
    },
    /// A frontend or backend address no service can have.
    #[error("service {namespace}/{name}: {source}")]
    Address {
        /// The service's namespace.
        namespace: String,
        /// The service's name.
        name: String,
        /// What is wrong.
        source: crate::ip::AddressError,
    },
    /// A condition for an address that is no backend.
    #[error("service {namespace}/{name} has conditions for {ip}, which is not a backend")]
    OrphanCondition {
        /// The service's namespace.
        namespace: String,
        /// The service's name.
        name: String,
        /// The address.
        ip: IpAddr,
    },
}

/// A global-service annotation whose value was not understood. The service still gets the
/// default for that setting; the caller reports the error as a warning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// A boolean annotation that is neither `true` nor `false`.
    #[error("annotation {annotation}={value:?} is not \"true\" or \"false\"; using {default}")]
    NotABool {
        /// The annotation's name, as written.
        annotation: String,
        /// Its value.
        value: String,
        /// The value used instead.
        default: bool,
    },
    /// An affinity that is not `local`, `remote` or `none`.
    #[error(
        "annotation {annotation}={value:?} is not \"local\", \"remote\" or \"none\"; using none"
    )]
    UnknownAffinity {
        /// The annotation's name, as written.
        annotation: String,
        /// Its value.
        value: String,
    },
}

// === impl Affinity ===

/// Which backends of a global service are preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Affinity {
    /// All healthy backends of all clusters.
    #[default]
    None,
    /// Local backends; remote ones only when no local backend is healthy.
    Local,
    /// Remote backends; local ones only when no remote backend is healthy.
    Remote,
}

impl Affinity {
    /// The annotation spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Local => "local",
            Self::Remote => "remote",
        }
    }

    fn is_none(&self) -> bool {
        *self == Self::None
    }
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Affinity {
    type Err = String;
    /// Case-insensitive, as Cilium compares these values.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(Self::None),
            "local" => Ok(Self::Local),
            "remote" => Ok(Self::Remote),
            _ => Err(s.to_owned()),
        }
    }
}

impl Serialize for Affinity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Affinity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|v| serde::de::Error::custom(format!("unknown affinity {v:?}")))
    }
}

// === impl GlobalServiceConfig ===

/// The global-service settings of one Service, from its annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GlobalServiceConfig {
    /// Merged across clusters.
    pub global: bool,
    /// Local backends are exported. Defaults to `global`; meaningless without it.
    pub shared: bool,
    /// Backend preference.
    pub affinity: Affinity,
}

impl GlobalServiceConfig {
    /// Reads the annotations (current names win over legacy ones). A value that is not
    /// understood yields an error to report and `false`, as Cilium reads it (only `true`,
    /// in any case, is true): an invalid `shared` keeps the backends home, although a global
    /// service is shared when the annotation is absent. An invalid affinity is `none`.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> (Self, Vec<AnnotationError>) {
        let mut errors = Vec::new();
        let lookup = |current: &str, legacy: &str| {
            annotations
                .get_key_value(current)
                .or_else(|| annotations.get_key_value(legacy))
                .map(|(k, v)| (k.clone(), v.trim().to_owned()))
        };
        let mut parse_bool =
            |current: &str, legacy: &str, absent: bool| match lookup(current, legacy) {
                None => absent,
                Some((annotation, value)) => match value.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        errors.push(AnnotationError::NotABool {
                            annotation,
                            value,
                            default: false,
                        });
                        false
                    }
                },
            };
        let global = parse_bool(ANNOTATION_GLOBAL, LEGACY_ANNOTATION_GLOBAL, false);
        let shared = global && parse_bool(ANNOTATION_SHARED, LEGACY_ANNOTATION_SHARED, true);
        let affinity = match lookup(ANNOTATION_AFFINITY, LEGACY_ANNOTATION_AFFINITY) {
            None => Affinity::None,
            Some((annotation, value)) => value.parse().unwrap_or_else(|_| {
                errors.push(AnnotationError::UnknownAffinity { annotation, value });
                Affinity::None
            }),
        };
        (
            Self {
                global,
                shared,
                affinity,
            },
            errors,
        )
    }
}

// === impl ClusterService ===

/// The EndpointSlice conditions of one backend address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackendConditions {
    /// Ready to receive new traffic.
    pub ready: bool,
    /// Able to serve (may be terminating).
    pub serving: bool,
    /// Shutting down.
    pub terminating: bool,
}

impl BackendConditions {
    /// A backend that is ready and not terminating.
    pub const READY: Self = Self {
        ready: true,
        serving: true,
        terminating: false,
    };

    /// Healthy when ready, or serving and not terminating.
    pub const fn is_healthy(&self) -> bool {
        self.ready || (self.serving && !self.terminating)
    }
}

/// A Service of one cluster as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterService {
    /// The cluster the service lives in.
    pub cluster: ClusterName,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// ClusterIPs (VIPs) and their ports.
    #[serde(default)]
    pub frontends: BTreeMap<IpAddr, PortConfiguration>,
    /// Backend addresses and their ports.
    #[serde(default)]
    pub backends: BTreeMap<IpAddr, PortConfiguration>,
    /// Conditions per backend address; a backend without an entry counts as ready, as
    /// Kubernetes reads an absent condition.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backend_conditions: BTreeMap<IpAddr, BackendConditions>,
    /// The Service's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The Service's pod selector.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Global: merged with the same service of other clusters.
    #[serde(default)]
    pub include_external: bool,
    /// Shared: the backends are exported to other clusters.
    #[serde(default)]
    pub shared: bool,
    /// The cluster's ID.
    #[serde(rename = "clusterID")]
    pub cluster_id: ClusterId,
    /// Backend preference of the local definition.
    #[serde(default, skip_serializing_if = "Affinity::is_none")]
    pub affinity: Affinity,
}

impl ClusterService {
    /// Whether Cilium's clustermesh-apiserver exports the service: global and shared (its
    /// namespace must be global too, which the service alone does not say).
    pub const fn is_exported(&self) -> bool {
        self.include_external && self.shared
    }

    /// The service as Cilium's clustermesh-apiserver writes it for other clusters: only the
    /// backends that are ready or serving (Cilium's readers take every `backends` entry as
    /// active). The conditions of the kept backends that are not plainly ready stay in
    /// `backendConditions` (a field Cilium's readers ignore), so that a serving but
    /// terminating backend is still told apart by this project's agents.
    pub fn for_export(&self) -> Self {
        let kept = |ip: &IpAddr| {
            let c = self.conditions_of(ip);
            c.ready || c.serving
        };
        Self {
            backends: self
                .backends
                .iter()
                .filter(|(ip, _)| kept(ip))
                .map(|(ip, ports)| (*ip, ports.clone()))
                .collect(),
            backend_conditions: self
                .backend_conditions
                .iter()
                .filter(|(ip, _)| kept(ip))
                .map(|(ip, c)| (*ip, *c))
                .collect(),
            ..self.clone()
        }
    }

    /// The conditions of a backend (ready when none were recorded).
    pub fn conditions_of(&self, ip: &IpAddr) -> BackendConditions {
        self.backend_conditions
            .get(ip)
            .copied()
            .unwrap_or(BackendConditions::READY)
    }

    /// Checks a service received from `cluster`.
    pub fn check_from_cluster(
        &self,
        cluster: &ClusterName,
        id: ClusterId,
    ) -> Result<(), ServiceError> {
        names::check_dns_label("namespace", &self.namespace)?;
        names::check_dns_label("service", &self.name)?;
        if &self.cluster != cluster || self.cluster_id != id {
            return Err(ServiceError::WrongCluster {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                found: self.cluster.to_string(),
                found_id: self.cluster_id.get(),
                expected: cluster.to_string(),
                expected_id: id.get(),
            });
        }
        for ports in self.frontends.values().chain(self.backends.values()) {
            for port_name in ports.keys().filter(|n| !n.is_empty()) {
                names::check_port_name(port_name)?;
            }
        }
        for ip in self.frontends.keys().chain(self.backends.keys()) {
            crate::ip::check_usable(*ip).map_err(|source| ServiceError::Address {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source,
            })?;
        }
        if let Some(ip) = self
            .backend_conditions
            .keys()
            .find(|ip| !self.backends.contains_key(ip))
        {
            return Err(ServiceError::OrphanCondition {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                ip: *ip,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

// === Cilium's exported EndpointSlices ===

/// The label naming an EndpointSlice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The conditions of an endpoint, as Kubernetes writes them (absent `ready` is ready, absent
/// `serving` is `ready`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct SliceConditions {
    /// Ready.
    #[serde(default)]
    pub ready: Option<bool>,
    /// Serving.
    #[serde(default)]
    pub serving: Option<bool>,
    /// Terminating.
    #[serde(default)]
    pub terminating: Option<bool>,
}

/// One endpoint of an exported EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SliceEndpoint {
    /// Its addresses.
    #[serde(default, deserialize_with = "crate::gozero::null_as_default")]
    pub addresses: Vec<String>,
    /// Its conditions.
    #[serde(default)]
    pub conditions: SliceConditions,
}

/// One port of an exported EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SlicePort {
    /// Its name (empty for the single unnamed port).
    #[serde(default)]
    pub name: Option<String>,
    /// Its number.
    #[serde(default)]
    pub port: Option<i32>,
    /// Its protocol (TCP when absent).
    #[serde(default)]
    pub protocol: Option<String>,
}

/// An EndpointSlice of a global shared service as Cilium 1.20's clustermesh-apiserver exports
/// it (`cilium/state/endpointslices/v1/<cluster>/<ns>/<slice>`): the Kubernetes
/// EndpointSlice with its cluster's name and ID.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ClusterEndpointSlice {
    /// The cluster.
    pub cluster: ClusterName,
    /// Its ID.
    #[serde(rename = "clusterID")]
    pub cluster_id: ClusterId,
    /// Namespace.
    pub namespace: String,
    /// The slice's name.
    pub name: String,
    /// Its labels ([`SERVICE_NAME_LABEL`] names the Service).
    #[serde(default, deserialize_with = "crate::gozero::null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// Endpoints.
    #[serde(default, deserialize_with = "crate::gozero::null_as_default")]
    pub endpoints: Vec<SliceEndpoint>,
    /// Ports.
    #[serde(default, deserialize_with = "crate::gozero::null_as_default")]
    pub ports: Vec<SlicePort>,
}

impl ClusterEndpointSlice {
    /// The Service the slice belongs to.
    pub fn service(&self) -> Option<&str> {
        self.labels.get(SERVICE_NAME_LABEL).map(String::as_str)
    }
}

/// A remote cluster's service as the merge sees it, from its exported EndpointSlices (all of
/// one Service): global and shared (only those are exported), no frontends, the ready or
/// serving endpoints as backends with their ports, and the conditions of those that are not
/// plainly ready. An address or port that does not parse is left out and reported.
pub fn service_from_slices(
    cluster: &ClusterName,
    cluster_id: ClusterId,
    namespace: &str,
    name: &str,
    slices: &[&ClusterEndpointSlice],
) -> (ClusterService, Vec<String>) {
    let mut problems = Vec::new();
    let mut backends = BTreeMap::new();
    let mut backend_conditions = BTreeMap::new();
    for slice in slices {
        let mut ports = PortConfiguration::new();
        for p in &slice.ports {
            let Some(number) = p.port else { continue };
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            let l4 = u16::try_from(number)
                .map_err(|e| e.to_string())
                .and_then(|n| {
                    let proto = protocol
                        .parse::<crate::ip::Protocol>()
                        .map_err(|e| e.to_string())?;
                    L4Addr::new(proto, n).map_err(|e| e.to_string())
                });
            match l4 {
                Ok(l4) => {
                    ports.insert(p.name.clone().unwrap_or_default(), l4);
                }
                Err(e) => problems.push(format!("slice {}: port {number}: {e}", slice.name)),
            }
        }
        for e in &slice.endpoints {
            let ready = e.conditions.ready.unwrap_or(true);
            let conditions = BackendConditions {
                ready,
                serving: e.conditions.serving.unwrap_or(ready),
                terminating: e.conditions.terminating.unwrap_or(false),
            };
            if !(conditions.ready || conditions.serving) {
                continue;
            }
            for a in &e.addresses {
                match crate::ip::parse_ip(a) {
                    Ok(ip) => {
                        backends.insert(ip, ports.clone());
                        if conditions != BackendConditions::READY {
                            backend_conditions.insert(ip, conditions);
                        }
                    }
                    Err(err) => problems.push(format!("slice {}: {err}", slice.name)),
                }
            }
        }
    }
    let service = ClusterService {
        cluster: cluster.clone(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        frontends: BTreeMap::new(),
        backends,
        backend_conditions,
        labels: BTreeMap::new(),
        selector: BTreeMap::new(),
        include_external: true,
        shared: true,
        cluster_id,
        affinity: Affinity::None,
    };
    (service, problems)
}
