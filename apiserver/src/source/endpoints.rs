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
//!   every such pod ready (not serving);
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
            serving: pod.ready,
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

/// Adds the derived slices of every Service with a selector and no slice of its own; returns
/// the derived slices that could not be added (a hand-written slice has the name).
pub fn derive_missing(objects: &mut SourceObjects) -> Vec<super::SourceProblem> {
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
    let mut problems = Vec::new();
    for slice in derived {
        let key = (slice.namespace.clone(), slice.name.clone());
        match objects.endpoint_slices.entry(key) {
            std::collections::btree_map::Entry::Occupied(_) => {
                problems.push(super::SourceProblem {
                    origin: format!("service {}/{}", slice.namespace, slice.service),
                    reason: format!(
                        "its derived EndpointSlice {} has the name of an existing EndpointSlice; rename that one",
                        slice.name
                    ),
                });
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(slice);
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest::{Loaded, parse_text};

    fn load(text: &str) -> SourceObjects {
        let mut loaded = Loaded::default();
        parse_text("t.yaml", text, &mut loaded);
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        assert!(derive_missing(&mut loaded.objects).is_empty());
        loaded.objects
    }

    fn pod(name: &str, ip: &str, extra: &str, status: &str) -> String {
        let head = format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: p, labels: {{app: w}}{extra}}}\n\
             spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n"
        );
        head + &status.replace("@IP@", ip)
    }

    #[test]
    fn derives_slices_like_the_controller() {
        let ready = "status: {phase: Running, podIP: @IP@, conditions: [{type: Ready, status: \"True\"}]}\n";
        let unready = "status: {phase: Running, podIP: @IP@, conditions: [{type: Ready, status: \"False\"}]}\n";
        let done = "status: {phase: Succeeded, podIP: @IP@}\n";
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: w, namespace: p}}\n\
             spec: {{clusterIP: 10.96.0.1, selector: {{app: w}}, ports: [{{name: http, port: 80, targetPort: http}}, {{name: raw, port: 81}}]}}\n\
             {}{}{}{}{}{}",
            pod("a", "10.0.0.1", "", ready),
            pod("b", "10.0.0.2", "", unready),
            pod(
                "c",
                "10.0.0.3",
                ", deletionTimestamp: \"2026-12-01T00:00:00Z\"",
                ready
            ),
            pod("d", "10.0.0.4", "", done),
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: e, namespace: p, labels: {app: w}}\nstatus: {phase: Running, podIP: 10.0.0.5, conditions: [{type: Ready, status: \"True\"}]}\n",
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: f, namespace: other, labels: {app: w}}\nstatus: {phase: Running, podIP: 10.0.0.6}\n",
        );
        let objects = load(&text);
        let slices: Vec<&SliceInfo> = objects.endpoint_slices.values().collect();
        assert_eq!(slices.len(), 2, "{slices:#?}");
        // Pods with the named port: http -> 8080, raw -> 81.
        let named = slices
            .iter()
            .find(|s| s.ports.iter().any(|p| p.name == "http"))
            .unwrap();
        assert_eq!(
            named
                .ports
                .iter()
                .map(|p| (p.name.as_str(), p.port))
                .collect::<Vec<_>>(),
            [("http", 8080), ("raw", 81)]
        );
        let eps: Vec<(String, bool, bool, bool)> = named
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses[0].to_string(),
                    e.conditions.ready,
                    e.conditions.serving,
                    e.conditions.terminating,
                )
            })
            .collect();
        assert_eq!(
            eps,
            [
                ("10.0.0.1".into(), true, true, false),
                ("10.0.0.2".into(), false, false, false),
                ("10.0.0.3".into(), false, true, true),
            ]
        );
        // The pod without the named port gets only the numbered one.
        let other = slices.iter().find(|s| s.name != named.name).unwrap();
        assert_eq!(other.ports.len(), 1);
        assert_eq!(other.endpoints[0].addresses[0].to_string(), "10.0.0.5");
    }

    #[test]
    fn hand_written_slices_win_and_publish_not_ready_makes_ready() {
        let unready = "status: {phase: Running, podIP: @IP@, conditions: [{type: Ready, status: \"False\"}]}\n";
        let base = "apiVersion: v1\nkind: Service\nmetadata: {name: w, namespace: p}\n\
                    spec: {clusterIP: 10.96.0.1, selector: {app: w}, publishNotReadyAddresses: true, ports: [{port: 80}]}\n";
        let objects = load(&format!("{base}{}", pod("a", "10.0.0.1", "", unready)));
        let s = objects.endpoint_slices.values().next().unwrap();
        assert!(s.endpoints[0].conditions.ready && !s.endpoints[0].conditions.serving);
        assert_eq!(s.ports[0].port, 80, "no targetPort: the port's number");
        let own = "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: w-1, namespace: p, labels: {kubernetes.io/service-name: w}}\naddressType: IPv4\nendpoints: []\n";
        let objects = load(&format!("{base}{}{own}", pod("a", "10.0.0.1", "", unready)));
        assert_eq!(objects.endpoint_slices.len(), 1);
        assert!(
            objects
                .endpoint_slices
                .values()
                .next()
                .unwrap()
                .endpoints
                .is_empty()
        );
    }
}
