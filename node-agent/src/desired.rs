//! The desired datapath state, a function of the view, kept up to date part by part: a
//! change recomputes only the ipcache entries, services and policy it touched
//! ([`Desired::update`]), and says which datapath keys may differ ([`Changed`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use clustermesh_bpf::{Endpoint, IpCacheValue, PolicyKey, PolicyValue, Prefix, ServiceKey};

use crate::merge::{BackendAddr, merge};
use crate::policy::{PolicyState, resolve};
use crate::view::{Dirty, ServiceName, View};

/// Everything the datapath should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Frontend -> its backends, sorted.
    pub services: BTreeMap<ServiceKey, Vec<BackendAddr>>,
    /// The frontends each service produced.
    by_service: BTreeMap<ServiceName, BTreeSet<ServiceKey>>,
    /// Every IPv4 ipcache entry, as a /32.
    pub ipcache: BTreeMap<Prefix, IpCacheValue>,
    /// Local endpoints, their policy entries and the explanations.
    pub policy: PolicyState,
}

/// What an update may have changed: the reconciler compares only these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changed {
    /// ipcache prefixes.
    pub ipcache: BTreeSet<Prefix>,
    /// Service frontends.
    pub services: BTreeSet<ServiceKey>,
    /// Endpoints and policy entries (compared in full; they are few per node).
    pub policy: bool,
}

/// The datapath ipcache entry of an address (IPv4 only).
pub fn ipcache_entry(view: &View, ip: &IpAddr) -> Option<(Prefix, IpCacheValue)> {
    let IpAddr::V4(ip4) = ip else {
        return None;
    };
    let Some((_, entry)) = view.ipcache_entry(ip) else {
        // A node's address: this node is `host`, every other node of any cluster
        // `remote-node` (Cilium's reserved identities), so that policies tell them apart
        // from world.
        if !view.is_node_address(ip) {
            return None;
        }
        let identity = if view.node_ips().contains(ip) {
            crate::policy::HOST
        } else {
            crate::policy::REMOTE_NODE
        };
        return Some((
            Prefix {
                addr: *ip4,
                len: 32,
            },
            IpCacheValue {
                identity,
                node_ip: None,
                cluster_id: 0,
            },
        ));
    };
    let identity = entry.identity.get();
    Some((
        Prefix {
            addr: *ip4,
            len: 32,
        },
        IpCacheValue {
            identity,
            node_ip: entry.host_ip.and_then(|h| match h {
                IpAddr::V4(h) => Some(h),
                IpAddr::V6(_) => None,
            }),
            cluster_id: view.cluster_id_of_identity(identity),
        },
    ))
}

impl Desired {
    /// The desired state of a whole view.
    pub fn from_view(view: &View) -> Self {
        let mut d = Self::default();
        for ip in view.ipcache_ips().chain(view.node_address_ips()) {
            if let Some((p, v)) = ipcache_entry(view, ip) {
                d.ipcache.insert(p, v);
            }
        }
        let names: Vec<ServiceName> = view.service_names().cloned().collect();
        for name in names {
            d.update_service(view, &name, &mut BTreeSet::new());
        }
        d.policy = resolve(view);
        d
    }

    /// Recomputes what `dirty` touched.
    pub fn update(&mut self, view: &View, dirty: &Dirty) -> Changed {
        let mut changed = Changed::default();
        for ip in &dirty.ips {
            if let IpAddr::V4(ip4) = ip {
                let prefix = Prefix {
                    addr: *ip4,
                    len: 32,
                };
                match ipcache_entry(view, ip) {
                    Some((p, v)) => {
                        self.ipcache.insert(p, v);
                    }
                    None => {
                        self.ipcache.remove(&prefix);
                    }
                }
                changed.ipcache.insert(prefix);
            }
        }
        let names: Vec<ServiceName> = if dirty.all_services {
            self.by_service
                .keys()
                .cloned()
                .chain(view.service_names().cloned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            dirty.services.iter().cloned().collect()
        };
        for name in &names {
            self.update_service(view, name, &mut changed.services);
        }
        if dirty.policy {
            self.policy = resolve(view);
            changed.policy = true;
        }
        changed
    }

    fn update_service(
        &mut self,
        view: &View,
        name: &ServiceName,
        changed: &mut BTreeSet<ServiceKey>,
    ) {
        if let Some(old) = self.by_service.remove(name) {
            for key in &old {
                self.services.remove(key);
            }
            changed.extend(old);
        }
        let Some(plan) = merge(view, name) else {
            return;
        };
        let mut keys = BTreeSet::new();
        for f in plan.frontends {
            let key = f.key();
            // Two services claiming one frontend: the first by name keeps it.
            if self.services.contains_key(&key) {
                continue;
            }
            self.services.insert(key, f.backends);
            keys.insert(key);
            changed.insert(key);
        }
        if !keys.is_empty() {
            self.by_service.insert(name.clone(), keys);
        }
    }

    /// Local endpoints.
    pub fn endpoints(&self) -> &BTreeMap<Ipv4Addr, Endpoint> {
        &self.policy.endpoints
    }

    /// Policy entries.
    pub fn entries(&self) -> &BTreeMap<PolicyKey, PolicyValue> {
        &self.policy.entries
    }
}
