//! What the kvstore should hold, as a pure function of the source objects: the security label
//! set of each pod, the services (frontends from the Service, backends and conditions from its
//! EndpointSlices), the nodes and the policies. Identities are allocated afterwards
//! ([`crate::identity`]) and turned into ipcache entries by [`DesiredState::ipcache`].

use std::collections::{BTreeMap, BTreeSet};

use clustermesh_model::cluster::{ClusterId, ClusterName};
use clustermesh_model::endpoint::IpCacheEntry;
use clustermesh_model::identity::Identity;
use clustermesh_model::ip::{IpPrefix, L4Addr};
use clustermesh_model::labels::{
    LabelSet, NAMESPACE_LABELS_PREFIX, SERVICE_ACCOUNT_LABEL, is_identity_label,
};
use clustermesh_model::node::{Node, NodeAddress};
use clustermesh_model::policy::NetworkPolicy;
use clustermesh_model::service::{ClusterService, GlobalServiceConfig, PortConfiguration};

use crate::source::{NsName, PodInfo, PortInfo, SourceObjects, SourceProblem};

/// The desired state, before identities are known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// The label set of every pod that has an IP of its own.
    pub pod_labels: BTreeMap<NsName, LabelSet>,
    /// Every Service; a headless one has no frontends (Cilium writes it so: its backends
    /// still count for a global service of that name elsewhere).
    pub services: Vec<ClusterService>,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Policies.
    pub policies: Vec<NetworkPolicy>,
    /// What could not be used (invalid labels, annotations, addresses).
    pub problems: Vec<SourceProblem>,
}

fn problem(origin: String, reason: impl ToString) -> SourceProblem {
    SourceProblem {
        origin,
        reason: reason.to_string(),
    }
}

/// A pod's security labels, as Cilium builds them: its labels (source `k8s`) that Cilium's
/// default label filter keeps ([`is_identity_label`]), its namespace's labels (as
/// `io.cilium.k8s.namespace.labels.<key>`), and its service account, namespace and cluster
/// labels. A pod's own label with the service-account key is overwritten (as Cilium does);
/// one with the namespace or cluster key, or under the namespace labels' prefix, is refused
/// (it would pose as another cluster's or namespace's workload).
pub fn pod_label_set(
    cluster: &ClusterName,
    pod: &PodInfo,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<LabelSet, String> {
    if let Some(k) = pod
        .labels
        .keys()
        .find(|k| k.starts_with(NAMESPACE_LABELS_PREFIX))
    {
        return Err(format!(
            "label {k}: only the namespace's own labels may carry {NAMESPACE_LABELS_PREFIX}"
        ));
    }
    let namespace_labels: Vec<(String, &str)> = namespace_labels
        .iter()
        .map(|(k, v)| (format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.as_str()))
        .collect();
    let labels = pod
        .labels
        .iter()
        .filter(|(k, _)| is_identity_label(k) && *k != SERVICE_ACCOUNT_LABEL)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(namespace_labels.iter().map(|(k, v)| (k.as_str(), *v)))
        .chain([(SERVICE_ACCOUNT_LABEL, pod.service_account.as_str())]);
    LabelSet::workload(cluster, &pod.namespace, labels).map_err(|e| e.to_string())
}

/// Port name -> protocol and port. Sources only produce non-zero ports.
fn port_config(ports: &[PortInfo]) -> PortConfiguration {
    ports
        .iter()
        .filter_map(|p| {
            L4Addr::new(p.protocol, p.port)
                .ok()
                .map(|a| (p.name.clone(), a))
        })
        .collect()
}

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

impl DesiredState {
    /// Computes the desired state of `cluster` from its objects.
    pub fn compute(cluster: &ClusterName, id: ClusterId, objects: &SourceObjects) -> Self {
        let mut out = Self {
            policies: objects.policies.values().cloned().collect(),
            ..Self::default()
        };

        for (key, pod) in &objects.pods {
            if pod.host_network || pod.ips.is_empty() {
                continue;
            }
            let namespace_labels = objects
                .namespaces
                .get(&pod.namespace)
                .map(|n| &n.labels)
                .unwrap_or(&EMPTY);
            match pod_label_set(cluster, pod, namespace_labels) {
                Ok(labels) => {
                    out.pod_labels.insert(key.clone(), labels);
                }
                Err(e) => out
                    .problems
                    .push(problem(format!("pod {}/{}", key.0, key.1), e)),
            }
        }

        let mut slices_of: BTreeMap<NsName, Vec<&crate::source::SliceInfo>> = BTreeMap::new();
        for slice in objects.endpoint_slices.values() {
            slices_of
                .entry((slice.namespace.clone(), slice.service.clone()))
                .or_default()
                .push(slice);
        }
        for (key, svc) in &objects.services {
            let origin = format!("service {}/{}", key.0, key.1);
            let (settings, errors) = GlobalServiceConfig::from_annotations(&svc.annotations);
            out.problems
                .extend(errors.into_iter().map(|e| problem(origin.clone(), e)));
            let ports = port_config(&svc.ports);
            let frontends = svc
                .cluster_ips
                .iter()
                .map(|ip| (*ip, ports.clone()))
                .collect();
            let mut backends = BTreeMap::new();
            let mut backend_conditions = BTreeMap::new();
            for slice in slices_of.get(key).into_iter().flatten() {
                let slice_ports = port_config(&slice.ports);
                for ep in &slice.endpoints {
                    for ip in &ep.addresses {
                        backends.insert(*ip, slice_ports.clone());
                        if ep.conditions != clustermesh_model::service::BackendConditions::READY {
                            backend_conditions.insert(*ip, ep.conditions);
                        }
                    }
                }
            }
            out.services.push(ClusterService {
                cluster: cluster.clone(),
                namespace: key.0.clone(),
                name: key.1.clone(),
                frontends,
                backends,
                backend_conditions,
                labels: svc.labels.clone(),
                selector: svc.selector.clone(),
                include_external: settings.global,
                shared: settings.shared,
                cluster_id: id,
                affinity: settings.affinity,
            });
        }

        for node in objects.nodes.values() {
            let cidr = match node
                .pod_cidr
                .as_deref()
                .map(str::parse::<IpPrefix>)
                .transpose()
            {
                Ok(c) => c,
                Err(e) => {
                    out.problems.push(problem(format!("node {}", node.name), e));
                    None
                }
            };
            out.nodes.push(Node {
                name: node.name.clone(),
                cluster: cluster.clone(),
                cluster_id: id,
                addresses: node
                    .addresses
                    .iter()
                    .map(|(kind, ip)| NodeAddress {
                        kind: kind.clone(),
                        ip: *ip,
                    })
                    .collect(),
                ipv4_alloc_cidr: cidr,
                labels: node.labels.clone(),
            });
        }
        out
    }

    /// Every distinct label set in use.
    pub fn label_sets(&self) -> BTreeSet<&LabelSet> {
        self.pod_labels.values().collect()
    }

    /// The ipcache entries, given the identity of each label set. Pods whose label set has no
    /// identity yet are left out. An address two pods claim (a reused IP whose old pod is
    /// still listed, or a mistake) goes to the first pod by namespace and name; the others
    /// are reported.
    pub fn ipcache(
        &self,
        objects: &SourceObjects,
        identities: &BTreeMap<LabelSet, Identity>,
    ) -> (Vec<IpCacheEntry>, Vec<SourceProblem>) {
        let mut out = Vec::new();
        let mut problems = Vec::new();
        let mut owners: BTreeMap<std::net::IpAddr, String> = BTreeMap::new();
        for (key, labels) in &self.pod_labels {
            let (Some(pod), Some(identity)) = (objects.pods.get(key), identities.get(labels))
            else {
                continue;
            };
            let name = format!("{}/{}", pod.namespace, pod.name);
            for ip in &pod.ips {
                if let Some(first) = owners.get(ip) {
                    problems.push(problem(
                        format!("pod {name}"),
                        format!("its IP {ip} is also pod {first}'s: the address stays {first}'s"),
                    ));
                    continue;
                }
                owners.insert(*ip, name.clone());
                out.push(IpCacheEntry {
                    ip: *ip,
                    identity: *identity,
                    host_ip: pod.host_ip,
                    namespace: pod.namespace.clone(),
                    pod_name: pod.name.clone(),
                    named_ports: pod.named_ports.clone(),
                });
            }
        }
        (out, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest::{Loaded, parse_text};

    #[test]
    fn services_pods_and_nodes_become_model_objects() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod, annotations: {service.cilium.io/global: "true", service.cilium.io/affinity: "sideways"}}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: prod}
spec: {clusterIP: None}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.0.5]}, {addresses: [10.1.0.6], conditions: {ready: false}}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: prod, labels: {app: web, pod-template-hash: abc}}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: prod, labels: {app: web, pod-template-hash: def}}
status: {podIP: 10.1.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: prod}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.1.0.0/24}
status: {addresses: [{type: InternalIP, address: 192.0.2.1}]}
"#;
        let mut loaded = Loaded::default();
        parse_text("t.yaml", text, &mut loaded);
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        let c1 = ClusterName::new("c1").unwrap();
        let id = ClusterId::new(1, clustermesh_model::MaxConnectedClusters::C255).unwrap();
        let d = DesiredState::compute(&c1, id, &loaded.objects);

        // One identity for both replicas: the rollout label does not count.
        assert_eq!(d.pod_labels.len(), 2);
        assert_eq!(d.label_sets().len(), 1);
        assert_eq!(
            d.label_sets().into_iter().next().unwrap().to_string(),
            "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;\
             k8s:io.cilium.k8s.policy.serviceaccount=default;k8s:io.kubernetes.pod.namespace=prod;"
        );
        assert_eq!(d.services.len(), 2, "headless services too");
        assert!(d.services[0].frontends.is_empty(), "headless: no frontend");
        let web = &d.services[1];
        assert!(web.include_external && web.shared);
        assert_eq!(web.affinity, clustermesh_model::service::Affinity::None);
        assert_eq!(d.problems.len(), 1, "the bad affinity is reported");
        assert!(d.problems[0].reason.contains("sideways"));
        assert_eq!(web.backends.len(), 2);
        assert!(!web.conditions_of(&"10.1.0.6".parse().unwrap()).is_healthy());
        assert_eq!(
            d.nodes[0].ipv4_alloc_cidr.map(|c| c.to_string()).as_deref(),
            Some("10.1.0.0/24")
        );

        let identity = Identity::new(65_537).unwrap();
        let ids = d
            .label_sets()
            .into_iter()
            .map(|l| (l.clone(), identity))
            .collect();
        let (ipcache, problems) = d.ipcache(&loaded.objects, &ids);
        assert_eq!(ipcache.len(), 2);
        assert!(problems.is_empty());
        assert!(ipcache.iter().all(|e| e.identity == identity));
    }

    /// Pods as `cilium connectivity test` deploys them: the service account becomes the
    /// `io.cilium.k8s.policy.serviceaccount` label its policies select on.
    #[test]
    fn the_service_account_is_a_security_label() {
        let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: client-0, namespace: cilium-test, labels: {name: client, kind: client}}
spec: {serviceAccountName: client, containers: [{name: client, image: x}]}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: old-style, namespace: cilium-test, labels: {name: old}}
spec: {serviceAccount: legacy, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: poser, namespace: cilium-test, labels: {name: poser, io.cilium.k8s.policy.serviceaccount: client}}
spec: {serviceAccountName: poser, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: long, namespace: cilium-test}
spec: {serviceAccountName: a-service-account-name.longer-than-a-label-value.may-be-0123456789, containers: [{name: c, image: x}]}
status: {podIP: 10.1.0.8}
"#;
        let mut loaded = Loaded::default();
        parse_text("pods.yaml", text, &mut loaded);
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        let c1 = ClusterName::new("c1").unwrap();
        let id = ClusterId::new(1, clustermesh_model::MaxConnectedClusters::C255).unwrap();
        let d = DesiredState::compute(&c1, id, &loaded.objects);
        assert!(d.problems.is_empty(), "{:?}", d.problems);
        let sets: Vec<String> = d.label_sets().into_iter().map(|l| l.to_string()).collect();
        // A name longer than a Kubernetes label value: the full name, as Cilium writes it.
        assert_eq!(sets.len(), 4, "{sets:?}");
        assert_eq!(
            sets[0],
            "k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.cilium.k8s.policy.serviceaccount=\
             a-service-account-name.longer-than-a-label-value.may-be-0123456789;\
             k8s:io.kubernetes.pod.namespace=cilium-test;"
        );
        assert_eq!(
            sets[1..],
            [
                "k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.cilium.k8s.policy.serviceaccount=client;\
                 k8s:io.kubernetes.pod.namespace=cilium-test;k8s:kind=client;k8s:name=client;",
                "k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.cilium.k8s.policy.serviceaccount=legacy;\
                 k8s:io.kubernetes.pod.namespace=cilium-test;k8s:name=old;",
                // A pod's own label with the key is overwritten, as Cilium does: it cannot
                // pose as another service account.
                "k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.cilium.k8s.policy.serviceaccount=poser;\
                 k8s:io.kubernetes.pod.namespace=cilium-test;k8s:name=poser;",
            ]
        );
    }

    #[test]
    fn identities_follow_cilium_s_label_filter_and_carry_the_namespace_s_labels() {
        // Labels as a real API server and its controllers set them.
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: db, labels: {kubernetes.io/metadata.name: db, team: storage}}
---
apiVersion: v1
kind: Pod
metadata: {name: pg-0, namespace: db, labels: {app: pg, apps.kubernetes.io/pod-index: "0", controller-revision-hash: pg-6b8f7d5c4, statefulset.kubernetes.io/pod-name: pg-0}}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: pg-1, namespace: db, labels: {app: pg, apps.kubernetes.io/pod-index: "1", controller-revision-hash: pg-6b8f7d5c4, statefulset.kubernetes.io/pod-name: pg-1}}
status: {podIP: 10.1.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: backup-28901234-x7k2p, namespace: db, labels: {batch.kubernetes.io/controller-uid: 6a1c6c1e-8f5a-4a8e-9b0e-3d2f1c0b9a87, batch.kubernetes.io/job-name: backup-28901234, controller-uid: 6a1c6c1e-8f5a-4a8e-9b0e-3d2f1c0b9a87, job-name: backup-28901234}}
status: {podIP: 10.1.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: poser, namespace: db, labels: {io.cilium.k8s.namespace.labels.team: payments}}
status: {podIP: 10.1.0.8}
"#;
        let mut loaded = Loaded::default();
        parse_text("t.yaml", text, &mut loaded);
        assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
        let c1 = ClusterName::new("c1").unwrap();
        let id = ClusterId::new(1, clustermesh_model::MaxConnectedClusters::C255).unwrap();
        let d = DesiredState::compute(&c1, id, &loaded.objects);
        let sets: Vec<String> = d.label_sets().into_iter().map(|l| l.to_string()).collect();
        let ns = "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=db;\
                  k8s:io.cilium.k8s.namespace.labels.team=storage;\
                  k8s:io.cilium.k8s.policy.cluster=c1;\
                  k8s:io.cilium.k8s.policy.serviceaccount=default;\
                  k8s:io.kubernetes.pod.namespace=db;";
        // Both StatefulSet pods share one identity; the Job's run is not part of its own.
        assert_eq!(
            sets,
            [
                format!("k8s:app=pg;{ns}"),
                format!(
                    "k8s:batch.kubernetes.io/job-name=backup-28901234;{ns}k8s:job-name=backup-28901234;"
                ),
            ]
        );
        assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
        assert_eq!(d.problems[0].origin, "pod db/poser");
        assert!(
            d.problems[0]
                .reason
                .contains("io.cilium.k8s.namespace.labels.")
        );
    }

    #[test]
    fn two_pods_with_one_ip_are_reported_and_the_first_keeps_it() {
        let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: b-new, namespace: prod, labels: {app: b}}
status: {podIP: 10.1.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: a-old, namespace: prod, labels: {app: a}}
status: {podIP: 10.1.0.5}
"#;
        let mut loaded = Loaded::default();
        parse_text("pods.yaml", text, &mut loaded);
        let c1 = ClusterName::new("c1").unwrap();
        let id = ClusterId::new(1, clustermesh_model::MaxConnectedClusters::C255).unwrap();
        let d = DesiredState::compute(&c1, id, &loaded.objects);
        let ids: BTreeMap<LabelSet, Identity> = d
            .label_sets()
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                (
                    l.clone(),
                    Identity::new(65_537 + u32::try_from(i).unwrap()).unwrap(),
                )
            })
            .collect();
        let (ipcache, problems) = d.ipcache(&loaded.objects, &ids);
        assert_eq!(ipcache.len(), 1);
        assert_eq!(ipcache[0].pod_name, "a-old");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].origin, "pod prod/b-new");
        assert_eq!(
            problems[0].reason,
            "its IP 10.1.0.5 is also pod prod/a-old's: the address stays prod/a-old's"
        );
    }
}
