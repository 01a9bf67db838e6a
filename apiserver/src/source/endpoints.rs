//! The EndpointSlice controller of the manifest mode: a real cluster's control plane writes
//! the EndpointSlices of every Service with a selector; a manifest directory has nobody to do
//! it, so manifests written for a real cluster (a Service with a `selector` and its Pods)
//! would leave the Service without backends. For every Service with a selector and no
//! EndpointSlice of its own, this derives one from the matching Pods the way Kubernetes'
//! controller does:
//! - a pod counts when it is in the Service's namespace, its labels match the selector, it
//!   has an IP and its phase is not `Succeeded` or `Failed`;
//! - `ready` is the pod's Ready condition, unless the pod is terminating; `serving` is its
//!   Ready condition; `terminating` is a deletion timestamp; `publishNotReadyAddresses` makes
//!   every such pod ready and serving;
//! - a `targetPort` by number is used as it is, by name resolved among the pod's named
//!   container ports of the same protocol (a pod without it gets no such port), absent means
//!   the Service port's number; pods with different resolved ports get different slices.
//!
//! Hand-written EndpointSlices for a Service win: then nothing is derived for it.

use std::collections::BTreeSet;

use clustermesh_model::service::BackendConditions;

use super::{PodInfo, PortInfo, ServiceInfo, SliceEndpoint, SliceInfo, SourceObjects, TargetPort};

/// The suffix of a derived slice's name: `<service>-clustermesh-<n>`.
pub const DERIVED_SLICE_INFIX: &str = "-clustermesh-";

fn resolve(port: &PortInfo, pod: &PodInfo) -> Option<PortInfo> {
    let number = match &port.target {
        None => port.port,
        Some(TargetPort::Number(n)) => *n,
        Some(TargetPort::Name(name)) => {
            pod.named_ports
                .iter()
                .find(|p| &p.name == name && p.protocol == port.protocol)?
                .port
        }
    };
    Some(PortInfo {
        name: port.name.clone(),
        protocol: port.protocol,
        port: number,
        target: None,
    })
}

fn selects(svc: &ServiceInfo, pod: &PodInfo) -> bool {
    pod.namespace == svc.namespace
        && svc
            .selector
            .iter()
            .all(|(k, v)| pod.labels.get(k) == Some(v))
}

/// The slices of one Service, from the pods that match it.
pub fn derive(svc: &ServiceInfo, pods: &[&PodInfo]) -> Vec<SliceInfo> {
    let mut groups: Vec<(Vec<PortInfo>, Vec<SliceEndpoint>)> = Vec::new();
    for pod in pods {
        if pod.terminal || pod.ips.is_empty() || !selects(svc, pod) {
            continue;
        }
        let ports: Vec<PortInfo> = svc.ports.iter().filter_map(|p| resolve(p, pod)).collect();
        let conditions = BackendConditions {
            ready: svc.publish_not_ready || (pod.ready && !pod.terminating),
            serving: svc.publish_not_ready || pod.ready,
            terminating: pod.terminating,
        };
        let endpoint = SliceEndpoint {
            addresses: pod.ips.clone(),
            conditions,
        };
        match groups.iter_mut().find(|(p, _)| *p == ports) {
            Some((_, eps)) => eps.push(endpoint),
            None => groups.push((ports, vec![endpoint])),
        }
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (ports, endpoints))| SliceInfo {
            namespace: svc.namespace.clone(),
            name: format!("{}{DERIVED_SLICE_INFIX}{i}", svc.name),
            service: svc.name.clone(),
            ports,
            endpoints,
        })
        .collect()
}

/// Adds the derived slices of every Service with a selector and no slice of its own.
pub fn derive_missing(objects: &mut SourceObjects) {
    let has_slice: BTreeSet<(String, String)> = objects
        .endpoint_slices
        .values()
        .map(|s| (s.namespace.clone(), s.service.clone()))
        .collect();
    let mut derived = Vec::new();
    for (key, svc) in &objects.services {
        if svc.selector.is_empty() || has_slice.contains(key) {
            continue;
        }
        let pods: Vec<&PodInfo> = objects
            .pods
            .range((key.0.clone(), String::new())..)
            .take_while(|((ns, _), _)| *ns == key.0)
            .map(|(_, p)| p)
            .collect();
        derived.extend(derive(svc, &pods));
    }
    for slice in derived {
        objects
            .endpoint_slices
            .entry((slice.namespace.clone(), slice.name.clone()))
            .or_insert(slice);
    }
}
