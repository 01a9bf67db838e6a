//! The agent's in-memory view of every cluster, fed by the local apiserver's Export stream:
//! identities, ipcache entries, services, nodes, cluster statuses and the local cluster's
//! policies, indexed for the merge and the policy resolution. Pure: no I/O.
//!
//! Every change reports what it touched ([`Dirty`]), so that the agent recomputes only the
//! parts of the desired datapath state that depend on it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use clustermesh_model::cluster::{ClusterId, ClusterName, ClusterStatus, MaxConnectedClusters};
use clustermesh_model::endpoint::IpCacheEntry;
use clustermesh_model::labels::LabelSet;
use clustermesh_model::node::Node;
use clustermesh_model::policy::NetworkPolicy;
use clustermesh_model::service::ClusterService;
use clustermesh_proto::{Object, ObjectRef, v1};

/// A service's namespace and name.
pub type ServiceName = (String, String);

/// The labels of a numeric identity and the cluster that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    /// The owning cluster.
    pub cluster: ClusterName,
    /// Its labels.
    pub labels: LabelSet,
}

/// What a change touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    /// ipcache addresses whose entry may have changed.
    pub ips: BTreeSet<IpAddr>,
    /// Services whose merge may have changed.
    pub services: BTreeSet<ServiceName>,
    /// Every service (a cluster's status changed).
    pub all_services: bool,
    /// Local endpoints or policy may have changed.
    pub policy: bool,
}

impl Dirty {
    /// Adds what `other` touched.
    pub fn merge(&mut self, other: Self) {
        self.ips.extend(other.ips);
        self.services.extend(other.services);
        self.all_services |= other.all_services;
        self.policy |= other.policy;
    }

    /// Whether nothing was touched.
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty() && self.services.is_empty() && !self.all_services && !self.policy
    }
}

/// The view of every cluster as this node's agent sees it.
#[derive(Debug, Clone)]
pub struct View {
    local: ClusterName,
    local_id: ClusterId,
    node: String,
    mode: MaxConnectedClusters,
    identities: HashMap<u32, IdentityInfo>,
    /// Per address, the entry of each cluster that claims it (normally one).
    ipcache: HashMap<IpAddr, Vec<(ClusterName, IpCacheEntry)>>,
    services: BTreeMap<ServiceName, BTreeMap<ClusterName, ClusterService>>,
    nodes: BTreeMap<(ClusterName, String), Node>,
    statuses: BTreeMap<ClusterName, ClusterStatus>,
    policies: BTreeMap<String, NetworkPolicy>,
    /// Addresses of this node (from its Node object), to find local endpoints.
    node_ips: BTreeSet<IpAddr>,
    /// ipcache addresses carrying named ports (egress rules may name a peer's port).
    named_port_ips: BTreeSet<IpAddr>,
    /// The local cluster's endpoint addresses by the node address they run on.
    local_by_host: HashMap<IpAddr, BTreeSet<IpAddr>>,
    /// Every node's addresses: the nodes (cluster, name) that claim each.
    node_addresses: BTreeMap<IpAddr, BTreeSet<(ClusterName, String)>>,
}

impl View {
    /// An empty view for `node` of cluster `local`.
    pub fn new(
        local: ClusterName,
        local_id: ClusterId,
        node: impl Into<String>,
        mode: MaxConnectedClusters,
    ) -> Self {
        Self {
            local,
            local_id,
            node: node.into(),
            mode,
            identities: HashMap::new(),
            ipcache: HashMap::new(),
            services: BTreeMap::new(),
            nodes: BTreeMap::new(),
            statuses: BTreeMap::new(),
            policies: BTreeMap::new(),
            node_ips: BTreeSet::new(),
            named_port_ips: BTreeSet::new(),
            local_by_host: HashMap::new(),
            node_addresses: BTreeMap::new(),
        }
    }

    /// The local cluster.
    pub fn local(&self) -> &ClusterName {
        &self.local
    }

    /// The local cluster's ID.
    pub fn local_id(&self) -> ClusterId {
        self.local_id
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The mesh size (how identities carry their cluster).
    pub fn mode(&self) -> MaxConnectedClusters {
        self.mode
    }

    /// Every identity.
    pub fn identities(&self) -> &HashMap<u32, IdentityInfo> {
        &self.identities
    }

    /// One identity.
    pub fn identity(&self, id: u32) -> Option<&IdentityInfo> {
        self.identities.get(&id)
    }

    /// The entry that wins for an address: the local cluster's, else the first cluster's by
    /// name. Two remotes never both hold an address here: the importer refuses a second
    /// claim (`sync::ownership`); the name order only breaks a tie the same way on every node
    /// should one reach the store another way.
    pub fn ipcache_entry(&self, ip: &IpAddr) -> Option<(&ClusterName, &IpCacheEntry)> {
        let claims = self.ipcache.get(ip)?;
        claims
            .iter()
            .find(|(c, _)| *c == self.local)
            .or_else(|| claims.iter().min_by(|a, b| a.0.cmp(&b.0)))
            .map(|(c, e)| (c, e))
    }

    /// Every address with an entry.
    pub fn ipcache_ips(&self) -> impl Iterator<Item = &IpAddr> {
        self.ipcache.keys()
    }

    /// Number of ipcache addresses.
    pub fn ipcache_len(&self) -> usize {
        self.ipcache.len()
    }

    /// Addresses whose entries carry named ports.
    pub fn named_port_ips(&self) -> &BTreeSet<IpAddr> {
        &self.named_port_ips
    }

    /// The definitions of a service in every cluster.
    pub fn service(&self, name: &ServiceName) -> Option<&BTreeMap<ClusterName, ClusterService>> {
        self.services.get(name)
    }

    /// Every service name.
    pub fn service_names(&self) -> impl Iterator<Item = &ServiceName> {
        self.services.keys()
    }

    /// A remote cluster's status.
    pub fn status(&self, cluster: &ClusterName) -> Option<&ClusterStatus> {
        self.statuses.get(cluster)
    }

    /// Every remote cluster's status.
    pub fn statuses(&self) -> &BTreeMap<ClusterName, ClusterStatus> {
        &self.statuses
    }

    /// The local cluster's policies, by `namespace/name` (or `name` when clusterwide).
    pub fn policies(&self) -> &BTreeMap<String, NetworkPolicy> {
        &self.policies
    }

    /// Every node, by cluster and name.
    pub fn nodes(&self) -> &BTreeMap<(ClusterName, String), Node> {
        &self.nodes
    }

    /// Every address of any node of any cluster.
    pub fn node_address_ips(&self) -> impl Iterator<Item = &IpAddr> {
        self.node_addresses.keys()
    }

    /// Whether some node of some cluster has this address.
    pub fn is_node_address(&self, ip: &IpAddr) -> bool {
        self.node_addresses.contains_key(ip)
    }

    /// This node's addresses (empty until its Node object arrives).
    pub fn node_ips(&self) -> &BTreeSet<IpAddr> {
        &self.node_ips
    }

    /// This node's endpoints: the local cluster's ipcache entries whose host is this node.
    pub fn local_endpoints(&self) -> Vec<&IpCacheEntry> {
        let mut ips: Vec<&IpAddr> = self
            .node_ips
            .iter()
            .filter_map(|h| self.local_by_host.get(h))
            .flatten()
            .collect();
        ips.sort();
        ips.dedup();
        ips.into_iter()
            .filter_map(|ip| self.ipcache_entry(ip))
            .filter(|(c, _)| **c == self.local)
            .map(|(_, e)| e)
            .collect()
    }

    /// The cluster ID an identity belongs to (0 for reserved identities).
    pub fn cluster_id_of_identity(&self, id: u32) -> u16 {
        clustermesh_model::identity::Identity::new(id)
            .ok()
            .and_then(|i| i.cluster_id(self.mode))
            .map_or(0, ClusterId::get)
    }

    /// Whether an ipcache entry is an endpoint of this node.
    pub fn is_local_endpoint(&self, cluster: &ClusterName, entry: &IpCacheEntry) -> bool {
        *cluster == self.local && entry.host_ip.is_some_and(|h| self.node_ips.contains(&h))
    }

    /// Applies an upsert.
    pub fn upsert(&mut self, object: Object) -> Dirty {
        let mut dirty = Dirty::default();
        match object {
            Object::Identity {
                cluster,
                id,
                labels,
            } => {
                let info = IdentityInfo { cluster, labels };
                if self.identities.get(&id.get()) != Some(&info) {
                    self.identities.insert(id.get(), info);
                    dirty.policy = true;
                }
            }
            Object::IpCache { cluster, entry } => {
                let ip = entry.ip;
                let claims = self.ipcache.entry(ip).or_default();
                let old = claims.iter().position(|(c, _)| *c == cluster);
                let changed = old.is_none_or(|i| claims[i].1 != entry);
                if changed {
                    let was_local = old.is_some_and(|i| {
                        claims[i].0 == self.local
                            && claims[i]
                                .1
                                .host_ip
                                .is_some_and(|h| self.node_ips.contains(&h))
                    });
                    let had_ports = old.is_some_and(|i| !claims[i].1.named_ports.is_empty());
                    let local_now = self.is_local_endpoint(&cluster, &entry);
                    let has_ports = !entry.named_ports.is_empty();
                    let claims = self.ipcache.entry(ip).or_default();
                    let old_host = old.and_then(|i| claims[i].1.host_ip);
                    let new_host = entry.host_ip;
                    let is_local = cluster == self.local;
                    match old {
                        Some(i) => claims[i].1 = entry,
                        None => claims.push((cluster, entry)),
                    }
                    if is_local {
                        self.index_local(ip, old_host, new_host);
                    }
                    self.track_named_ports(ip);
                    dirty.ips.insert(ip);
                    dirty.policy = was_local || local_now || had_ports || has_ports;
                }
            }
            Object::Node(node) => {
                let key = (node.cluster.clone(), node.name.clone());
                if self.nodes.get(&key) != Some(&node) {
                    let mine = node.cluster == self.local && node.name == self.node;
                    let new: Vec<IpAddr> = node.addresses.iter().map(|a| a.ip).collect();
                    if let Some(old) = self.nodes.insert(key.clone(), node) {
                        self.forget_node_addresses(&key, &old, &mut dirty);
                    }
                    for ip in new {
                        self.node_addresses
                            .entry(ip)
                            .or_default()
                            .insert(key.clone());
                        dirty.ips.insert(ip);
                    }
                    if mine {
                        self.refresh_node_ips();
                        dirty.policy = true;
                    }
                }
            }
            Object::Service(svc) => {
                let name = (svc.namespace.clone(), svc.name.clone());
                let defs = self.services.entry(name.clone()).or_default();
                if defs.get(&svc.cluster) != Some(&svc) {
                    defs.insert(svc.cluster.clone(), svc);
                    dirty.services.insert(name);
                }
            }
            Object::Policy { policy, .. } => {
                let key = policy_key(&policy);
                if self.policies.get(&key) != Some(&policy) {
                    self.policies.insert(key, policy);
                    dirty.policy = true;
                }
            }
            Object::ClusterStatus(status) => {
                if self.statuses.get(&status.cluster) != Some(&status) {
                    self.statuses.insert(status.cluster.clone(), status);
                    dirty.all_services = true;
                }
            }
        }
        dirty
    }

    /// Applies a delete.
    pub fn delete(&mut self, r: &ObjectRef) -> Dirty {
        let mut dirty = Dirty::default();
        match r.kind {
            v1::Kind::Identities => {
                if let Ok(id) = r.name.parse::<u32>()
                    && self
                        .identities
                        .get(&id)
                        .is_some_and(|i| i.cluster == r.cluster)
                {
                    self.identities.remove(&id);
                    dirty.policy = true;
                }
            }
            v1::Kind::Ipcache => {
                if let Ok(ip) = r.name.parse::<IpAddr>()
                    && let Some(claims) = self.ipcache.get_mut(&ip)
                    && let Some(i) = claims.iter().position(|(c, _)| *c == r.cluster)
                {
                    let (cluster, entry) = claims.remove(i);
                    if claims.is_empty() {
                        self.ipcache.remove(&ip);
                    }
                    if cluster == self.local {
                        self.index_local(ip, entry.host_ip, None);
                    }
                    self.track_named_ports(ip);
                    dirty.ips.insert(ip);
                    dirty.policy =
                        self.is_local_endpoint(&cluster, &entry) || !entry.named_ports.is_empty();
                }
            }
            v1::Kind::Nodes => {
                let key = (r.cluster.clone(), r.name.clone());
                let removed = self.nodes.remove(&key);
                if let Some(old) = &removed {
                    self.forget_node_addresses(&key, old, &mut dirty);
                }
                if removed.is_some() && r.cluster == self.local && r.name == self.node {
                    self.refresh_node_ips();
                    dirty.policy = true;
                }
            }
            v1::Kind::Services => {
                if let Some((ns, name)) = r.name.split_once('/') {
                    let key = (ns.to_owned(), name.to_owned());
                    if let Some(defs) = self.services.get_mut(&key)
                        && defs.remove(&r.cluster).is_some()
                    {
                        if defs.is_empty() {
                            self.services.remove(&key);
                        }
                        dirty.services.insert(key);
                    }
                }
            }
            v1::Kind::Policies => {
                if self.policies.remove(&r.name).is_some() {
                    dirty.policy = true;
                }
            }
            v1::Kind::ClusterStatus => {
                if self.statuses.remove(&r.cluster).is_some() {
                    dirty.all_services = true;
                }
            }
            v1::Kind::RemoteCache | v1::Kind::Unspecified => {}
        }
        dirty
    }

    fn index_local(&mut self, ip: IpAddr, old_host: Option<IpAddr>, new_host: Option<IpAddr>) {
        if let Some(h) = old_host
            && let Some(set) = self.local_by_host.get_mut(&h)
        {
            set.remove(&ip);
            if set.is_empty() {
                self.local_by_host.remove(&h);
            }
        }
        if let Some(h) = new_host {
            self.local_by_host.entry(h).or_default().insert(ip);
        }
    }

    fn track_named_ports(&mut self, ip: IpAddr) {
        let has = self
            .ipcache
            .get(&ip)
            .is_some_and(|c| c.iter().any(|(_, e)| !e.named_ports.is_empty()));
        if has {
            self.named_port_ips.insert(ip);
        } else {
            self.named_port_ips.remove(&ip);
        }
    }

    /// Drops a node's addresses from the index (their ipcache entries may change).
    fn forget_node_addresses(
        &mut self,
        key: &(ClusterName, String),
        node: &Node,
        dirty: &mut Dirty,
    ) {
        for a in &node.addresses {
            if let Some(claims) = self.node_addresses.get_mut(&a.ip) {
                claims.remove(key);
                if claims.is_empty() {
                    self.node_addresses.remove(&a.ip);
                }
            }
            dirty.ips.insert(a.ip);
        }
    }

    fn refresh_node_ips(&mut self) {
        self.node_ips = self
            .nodes
            .get(&(self.local.clone(), self.node.clone()))
            .map(|n| n.addresses.iter().map(|a| a.ip).collect())
            .unwrap_or_default();
    }
}

/// A policy's name in the view: `namespace/name`, or `name` when clusterwide (the name a
/// `Delete` carries).
pub fn policy_key(policy: &NetworkPolicy) -> String {
    match &policy.namespace {
        Some(ns) => format!("{ns}/{}", policy.name),
        None => policy.name.clone(),
    }
}

/// The reference a wire `Delete` names, or why it names nothing valid.
pub fn delete_ref(d: &v1::Delete) -> Result<ObjectRef, String> {
    let kind = v1::Kind::try_from(d.kind).map_err(|_| format!("unknown kind {}", d.kind))?;
    let cluster = ClusterName::new(d.cluster.as_str()).map_err(|e| e.to_string())?;
    Ok(ObjectRef {
        kind,
        cluster,
        name: d.name.clone(),
    })
}
