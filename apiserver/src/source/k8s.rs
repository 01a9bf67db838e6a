//! From Kubernetes API objects (k8s-openapi types, as read from manifests or the API server)
//! to the source types, validating what the mesh relies on.

use std::collections::BTreeMap;
use std::net::IpAddr;

use clustermesh_model::endpoint::NamedPort;
use clustermesh_model::ip::{Protocol, parse_ip};
use clustermesh_model::labels::{DEFAULT_SERVICE_ACCOUNT, Label, SERVICE_ACCOUNT_LABEL};
use clustermesh_model::names;
use clustermesh_model::policy::cilium::CiliumRule;
use clustermesh_model::policy::{ANNOTATION_AUDIT_MODE, NetworkPolicy};
use clustermesh_model::service::BackendConditions;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

use super::{
    NamespaceInfo, NodeInfo, PodInfo, PortInfo, ServiceInfo, SliceEndpoint, SliceInfo, TargetPort,
};

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why an object could not be used.
pub type Problem = String;

pub(crate) fn name(meta: &ObjectMeta) -> Result<String, Problem> {
    let n = meta.name.clone().ok_or("metadata.name is missing")?;
    names::check_dns_subdomain("name", &n).map_err(|e| e.to_string())?;
    Ok(n)
}

pub(crate) fn namespace(meta: &ObjectMeta) -> Result<String, Problem> {
    let ns = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    names::check_dns_label("namespace", &ns).map_err(|e| e.to_string())?;
    Ok(ns)
}

fn protocol(p: Option<&String>) -> Result<Protocol, Problem> {
    p.map_or(Ok(Protocol::Tcp), |p| {
        p.parse()
            .map_err(|e: clustermesh_model::ip::AddressError| e.to_string())
    })
}

fn port(p: i32) -> Result<u16, Problem> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("port {p} is not 1..=65535"))
}

fn ip(s: &str) -> Result<IpAddr, Problem> {
    parse_ip(s).map_err(|e| e.to_string())
}

/// A namespace.
pub fn namespace_info(ns: &Namespace) -> Result<NamespaceInfo, Problem> {
    let n = ns.metadata.name.clone().ok_or("metadata.name is missing")?;
    names::check_dns_label("namespace", &n).map_err(|e| e.to_string())?;
    let global = match ns
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::GLOBAL_NAMESPACE_ANNOTATION))
    {
        None => None,
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => {
                return Err(format!(
                    "annotation {}: {v:?} is neither \"true\" nor \"false\"",
                    super::GLOBAL_NAMESPACE_ANNOTATION
                ));
            }
        },
    };
    Ok(NamespaceInfo {
        name: n,
        labels: ns.metadata.labels.clone().unwrap_or_default(),
        global,
    })
}

/// A pod.
pub fn pod_info(pod: &Pod) -> Result<PodInfo, Problem> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips = Vec::new();
    if let Some(status) = status {
        for p in status.pod_ips.iter().flatten() {
            ips.push(ip(&p.ip)?);
        }
        if let (true, Some(p)) = (ips.is_empty(), &status.pod_ip) {
            ips.push(ip(p)?);
        }
    }
    let mut named_ports = Vec::new();
    for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for p in c.ports.iter().flatten() {
            if let Some(n) = &p.name {
                names::check_port_name(n).map_err(|e| e.to_string())?;
                named_ports.push(NamedPort {
                    name: n.clone(),
                    port: port(p.container_port)?,
                    protocol: protocol(p.protocol.as_ref())?,
                });
            }
        }
    }
    Ok(PodInfo {
        namespace: namespace(&pod.metadata)?,
        name: name(&pod.metadata)?,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        service_account: service_account(spec)?,
        ips,
        host_ip: status
            .and_then(|s| s.host_ip.as_deref())
            .map(ip)
            .transpose()?,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        named_ports,
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
        terminal: status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed"),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        node_name: spec.and_then(|s| s.node_name.clone()),
    })
}

/// A pod's service account: `spec.serviceAccountName`, else the deprecated
/// `spec.serviceAccount`, else `default` (what a real API server's admission fills in). Its
/// full name becomes the `io.cilium.k8s.policy.serviceaccount` label's value, as Cilium
/// writes it. A name that is no DNS subdomain is refused.
fn service_account(spec: Option<&PodSpec>) -> Result<String, Problem> {
    let name = spec
        .and_then(|s| {
            s.service_account_name
                .as_deref()
                .filter(|n| !n.is_empty())
                .or(s.service_account.as_deref().filter(|n| !n.is_empty()))
        })
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    names::check_dns_subdomain("service account", name).map_err(|e| e.to_string())?;
    Label::k8s(SERVICE_ACCOUNT_LABEL, name)
        .map_err(|e| format!("service account {name:?}: {e}"))?;
    Ok(name.to_owned())
}

/// A Service.
pub fn service_info(svc: &Service) -> Result<ServiceInfo, Problem> {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut cluster_ips = Vec::new();
    let listed = spec.cluster_ips.clone().unwrap_or_default();
    for s in listed.iter().chain(spec.cluster_ip.iter()) {
        if s == "None" || s.is_empty() {
            continue;
        }
        let a = ip(s)?;
        if !cluster_ips.contains(&a) {
            cluster_ips.push(a);
        }
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let n = p.name.clone().unwrap_or_default();
        if !n.is_empty() {
            names::check_port_name(&n).map_err(|e| e.to_string())?;
        }
        let target = match &p.target_port {
            None => None,
            Some(IntOrString::Int(t)) => Some(TargetPort::Number(port(*t)?)),
            Some(IntOrString::String(t)) => match t.parse::<i32>() {
                Ok(t) => Some(TargetPort::Number(port(t)?)),
                Err(_) => {
                    names::check_port_name(t).map_err(|e| e.to_string())?;
                    Some(TargetPort::Name(t.clone()))
                }
            },
        };
        ports.push(PortInfo {
            name: n,
            protocol: protocol(p.protocol.as_ref())?,
            port: port(p.port)?,
            target,
        });
    }
    Ok(ServiceInfo {
        namespace: namespace(&svc.metadata)?,
        name: {
            let n = name(&svc.metadata)?;
            names::check_dns_label("service", &n).map_err(|e| e.to_string())?;
            n
        },
        cluster_ips,
        ports,
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        annotations: svc.metadata.annotations.clone().unwrap_or_default(),
        selector: spec.selector.unwrap_or_default(),
        publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
    })
}

/// An EndpointSlice.
pub fn slice_info(slice: &EndpointSlice) -> Result<SliceInfo, Problem> {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .ok_or_else(|| format!("has no {SERVICE_NAME_LABEL} label"))?;
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let Some(n) = p.port else { continue };
        ports.push(PortInfo {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(p.protocol.as_ref())?,
            port: port(n)?,
            target: None,
        });
    }
    let mut endpoints = Vec::new();
    for e in slice.endpoints.iter().flatten() {
        let c = e.conditions.clone().unwrap_or_default();
        // Kubernetes reads an absent `ready` as ready; `serving` defaults to `ready`.
        let ready = c.ready.unwrap_or(true);
        let conditions = BackendConditions {
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
        };
        let addresses = e
            .addresses
            .iter()
            .map(|a| ip(a))
            .collect::<Result<_, _>>()?;
        endpoints.push(SliceEndpoint {
            addresses,
            conditions,
        });
    }
    Ok(SliceInfo {
        namespace: namespace(&slice.metadata)?,
        name: name(&slice.metadata)?,
        service,
        ports,
        endpoints,
    })
}

/// A node.
pub fn node_info(node: &Node) -> Result<NodeInfo, Problem> {
    // A kubelet registers `Hostname` (and clouds add `InternalDNS`, `ExternalDNS`) beside
    // the IP addresses: names are not addresses the mesh can use, so only the `...IP` types
    // are taken, and they must be IPs.
    let mut addresses = Vec::new();
    for a in node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
    {
        if !a.type_.ends_with("IP") {
            continue;
        }
        let addr = ip(&a.address).map_err(|e| format!("address of type {}: {e}", a.type_))?;
        if !addresses.contains(&(a.type_.clone(), addr)) {
            addresses.push((a.type_.clone(), addr));
        }
    }
    Ok(NodeInfo {
        name: name(&node.metadata)?,
        addresses,
        // The IPv4 pod CIDR (a dual-stack node lists both families in `podCIDRs`).
        pod_cidr: node.spec.as_ref().and_then(|s| {
            s.pod_cidrs
                .iter()
                .flatten()
                .chain(s.pod_cidr.iter())
                .find(|c| !c.contains(':'))
                .cloned()
        }),
        labels: node.metadata.labels.clone().unwrap_or_default(),
    })
}

/// A CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy document: `spec` and/or `specs`.
#[derive(Debug, Deserialize)]
pub struct CiliumPolicyDoc {
    /// Name, namespace, annotations.
    pub metadata: ObjectMeta,
    /// One rule.
    #[serde(default)]
    pub spec: Option<CiliumRule>,
    /// Several rules.
    #[serde(default)]
    pub specs: Option<Vec<CiliumRule>>,
}

/// A policy; `clusterwide` for CiliumClusterwideNetworkPolicy.
pub fn policy(doc: CiliumPolicyDoc, clusterwide: bool) -> Result<NetworkPolicy, Problem> {
    let annotations: BTreeMap<String, String> =
        doc.metadata.annotations.clone().unwrap_or_default();
    let audit = match annotations
        .get(ANNOTATION_AUDIT_MODE)
        .map(|v| v.to_ascii_lowercase())
    {
        None => false,
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        Some(v) => {
            return Err(format!(
                "annotation {ANNOTATION_AUDIT_MODE}={v:?} is not \"true\" or \"false\""
            ));
        }
    };
    let written: Vec<CiliumRule> = doc
        .spec
        .into_iter()
        .chain(doc.specs.into_iter().flatten())
        .collect();
    if written.is_empty() {
        return Err("has neither spec nor specs".into());
    }
    let mut rules = Vec::with_capacity(written.len());
    let mut notes = Vec::new();
    for (i, r) in written.into_iter().enumerate() {
        let t = r.translate().map_err(|e| e.to_string())?;
        rules.push(t.rule);
        notes.extend(t.notes.into_iter().map(|n| format!("rule {i} {n}")));
    }
    let p = NetworkPolicy {
        namespace: if clusterwide {
            None
        } else {
            Some(namespace(&doc.metadata)?)
        },
        name: name(&doc.metadata)?,
        audit,
        rules,
        notes,
    };
    p.validate().map_err(|e| e.to_string())?;
    Ok(p)
}
