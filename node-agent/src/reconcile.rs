//! The reconciler: compares the desired state with what the datapath maps hold and writes
//! only the difference, in an order that never exposes a half-written state:
//!
//! 1. ipcache entries, new backends and policy entries are written (nothing refers to them
//!    yet, or they only add what a later step relies on);
//! 2. services are written (the datapath writes each service's new slots before its count);
//! 3. endpoints are written (their flags may now enforce policy whose entries exist);
//! 4. removals, when pruning is allowed: endpoints, policy entries, services, backends no
//!    service names any more, ipcache entries.
//!
//! Nothing is removed before the local apiserver's `Synced` (`prune: false`): an agent that
//! restarts adopts the pinned maps ([`Reconciler::adopt`]) and leaves every entry in place
//! until it has the whole picture again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use clustermesh_bpf::{
    Backend, BackendId, BackendState, Datapath, Endpoint, IpCacheValue, PolicyKey, PolicyValue,
    Prefix, ServiceKey,
};

use crate::desired::{Changed, Desired};
use crate::merge::BackendAddr;

/// What one pass wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Entries written or overwritten.
    pub upserts: usize,
    /// Entries deleted.
    pub deletes: usize,
    /// Deletions held back because pruning is not allowed yet.
    pub held: usize,
    /// Services the datapath refused (e.g. more backends than a service may have), with why.
    /// They keep what they had; every other object of the pass is written.
    pub failed: BTreeMap<ServiceKey, String>,
}

impl Stats {
    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.upserts == 0 && self.deletes == 0
    }
}

/// The part of the desired state a pass compares.
#[derive(Debug, Clone)]
pub enum Scope<'a> {
    /// Everything (after `Synced`, or at start).
    Full,
    /// Only what changed.
    Changed(&'a Changed),
}

/// What the maps hold, mirrored, and the backend IDs handed out.
pub struct Reconciler {
    dp: Arc<dyn Datapath>,
    services: BTreeMap<ServiceKey, Vec<BackendId>>,
    backends: BTreeMap<BackendId, Backend>,
    ids: HashMap<BackendAddr, BackendId>,
    /// How many services name each backend.
    refs: HashMap<BackendId, usize>,
    ipcache: BTreeMap<Prefix, IpCacheValue>,
    endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    policy: BTreeMap<PolicyKey, PolicyValue>,
    next_id: BackendId,
    /// Services the datapath refused at their last write, with why (not in the maps as
    /// desired).
    failed: BTreeMap<ServiceKey, String>,
}

fn addr_of(b: &Backend) -> BackendAddr {
    BackendAddr {
        cluster_id: b.cluster_id,
        ip: b.ip,
        port: b.port,
        proto: b.proto,
    }
}

impl Reconciler {
    /// A reconciler over `dp`, adopting what its maps already hold.
    pub fn adopt(dp: Arc<dyn Datapath>) -> clustermesh_bpf::Result<Self> {
        let snap = dp.snapshot()?;
        let mut r = Self {
            dp,
            services: snap.services,
            backends: snap.backends,
            ids: HashMap::new(),
            refs: HashMap::new(),
            ipcache: snap.ipcache,
            endpoints: snap.endpoints,
            policy: snap.policy,
            next_id: 1,
            failed: BTreeMap::new(),
        };
        for (id, b) in &r.backends {
            r.ids.insert(addr_of(b), *id);
            r.next_id = r.next_id.max(id.saturating_add(1));
        }
        for ids in r.services.values() {
            for id in ids {
                *r.refs.entry(*id).or_insert(0) += 1;
            }
        }
        Ok(r)
    }

    /// Number of entries held: services, backends, ipcache, endpoints, policy.
    pub fn counts(&self) -> [usize; 5] {
        [
            self.services.len(),
            self.backends.len(),
            self.ipcache.len(),
            self.endpoints.len(),
            self.policy.len(),
        ]
    }

    fn backend_id(&mut self, addr: BackendAddr, new: &mut Vec<(BackendId, Backend)>) -> BackendId {
        if let Some(id) = self.ids.get(&addr) {
            return *id;
        }
        let id = self.next_id;
        self.next_id += 1;
        let b = Backend {
            ip: addr.ip,
            port: addr.port,
            proto: addr.proto,
            state: BackendState::Active,
            cluster_id: addr.cluster_id,
        };
        self.ids.insert(addr, id);
        self.backends.insert(id, b);
        new.push((id, b));
        id
    }

    /// Brings the maps to `desired` within `scope`; removes only when `prune`.
    pub fn reconcile(
        &mut self,
        desired: &Desired,
        scope: Scope<'_>,
        prune: bool,
    ) -> clustermesh_bpf::Result<Stats> {
        let mut stats = Stats::default();

        // What to compare.
        let (ip_keys, svc_keys, policy): (Vec<Prefix>, Vec<ServiceKey>, bool) = match scope {
            Scope::Full => (
                self.ipcache
                    .keys()
                    .chain(desired.ipcache.keys())
                    .copied()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                self.services
                    .keys()
                    .chain(desired.services.keys())
                    .copied()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                true,
            ),
            Scope::Changed(c) => (
                c.ipcache.iter().copied().collect(),
                c.services.iter().copied().collect(),
                c.policy,
            ),
        };

        // 1. ipcache, backends, policy entries.
        let mut ip_up = Vec::new();
        let mut ip_del = Vec::new();
        for p in ip_keys {
            match (desired.ipcache.get(&p), self.ipcache.get(&p)) {
                (Some(want), have) if have != Some(want) => ip_up.push((p, *want)),
                (None, Some(_)) => ip_del.push(p),
                _ => {}
            }
        }
        if !ip_up.is_empty() {
            self.dp.upsert_ipcache(&ip_up)?;
            stats.upserts += ip_up.len();
            self.ipcache.extend(ip_up);
        }

        let mut new_backends = Vec::new();
        let mut svc_up: Vec<(ServiceKey, Vec<BackendId>)> = Vec::new();
        let mut svc_del = Vec::new();
        for key in svc_keys {
            match desired.services.get(&key) {
                Some(addrs) => {
                    let ids: Vec<BackendId> = addrs
                        .iter()
                        .map(|a| self.backend_id(*a, &mut new_backends))
                        .collect();
                    if self.services.get(&key) != Some(&ids) {
                        svc_up.push((key, ids));
                    }
                }
                None if self.services.contains_key(&key) => svc_del.push(key),
                None => {
                    self.failed.remove(&key);
                }
            }
        }
        if !new_backends.is_empty() {
            self.dp.upsert_backends(&new_backends)?;
            stats.upserts += new_backends.len();
        }

        let (mut pol_up, mut pol_del, mut ep_up, mut ep_del) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        if policy {
            for (k, v) in desired.entries() {
                if self.policy.get(k) != Some(v) {
                    pol_up.push((*k, *v));
                }
            }
            pol_del.extend(
                self.policy
                    .keys()
                    .filter(|k| !desired.entries().contains_key(k))
                    .copied(),
            );
            for (ip, e) in desired.endpoints() {
                if self.endpoints.get(ip) != Some(e) {
                    ep_up.push((*ip, *e));
                }
            }
            ep_del.extend(
                self.endpoints
                    .keys()
                    .filter(|ip| !desired.endpoints().contains_key(ip))
                    .copied(),
            );
        }
        if !pol_up.is_empty() {
            self.dp.upsert_policy(&pol_up)?;
            stats.upserts += pol_up.len();
            self.policy.extend(pol_up);
        }

        // 2. services. One the datapath refuses keeps what it had and is reported; it must
        // not keep the endpoints and removals below from being written.
        for (key, ids) in svc_up {
            if let Err(e) = self.dp.upsert_service(key, &ids) {
                stats.failed.insert(key, e.to_string());
                self.failed.insert(key, e.to_string());
                continue;
            }
            self.failed.remove(&key);
            stats.upserts += 1;
            for id in &ids {
                *self.refs.entry(*id).or_insert(0) += 1;
            }
            if let Some(old) = self.services.insert(key, ids) {
                self.unref(&old);
            }
        }

        // 3. endpoints.
        if !ep_up.is_empty() {
            self.dp.upsert_endpoints(&ep_up)?;
            stats.upserts += ep_up.len();
            self.endpoints.extend(ep_up);
        }

        // 4. removals.
        if !prune {
            stats.held = ep_del.len() + pol_del.len() + svc_del.len() + ip_del.len();
            return Ok(stats);
        }
        if !ep_del.is_empty() {
            self.dp.delete_endpoints(&ep_del)?;
            stats.deletes += ep_del.len();
            for ip in &ep_del {
                self.endpoints.remove(ip);
            }
        }
        if !pol_del.is_empty() {
            self.dp.delete_policy(&pol_del)?;
            stats.deletes += pol_del.len();
            for k in &pol_del {
                self.policy.remove(k);
            }
        }
        for key in svc_del {
            self.failed.remove(&key);
            self.dp.delete_service(key)?;
            stats.deletes += 1;
            if let Some(old) = self.services.remove(&key) {
                self.unref(&old);
            }
        }
        let unused: Vec<BackendId> = self
            .backends
            .keys()
            .filter(|id| self.refs.get(id).is_none_or(|n| *n == 0))
            .copied()
            .collect();
        if !unused.is_empty() {
            self.dp.delete_backends(&unused)?;
            stats.deletes += unused.len();
            for id in &unused {
                if let Some(b) = self.backends.remove(id) {
                    self.ids.remove(&addr_of(&b));
                }
                self.refs.remove(id);
            }
        }
        if !ip_del.is_empty() {
            self.dp.delete_ipcache(&ip_del)?;
            stats.deletes += ip_del.len();
            for p in &ip_del {
                self.ipcache.remove(p);
            }
        }
        Ok(stats)
    }

    /// The services the datapath refused at their last write, with why: they are not in the
    /// maps as desired (`/status` and `explain service` show them).
    pub fn failed(&self) -> &BTreeMap<ServiceKey, String> {
        &self.failed
    }

    fn unref(&mut self, ids: &[BackendId]) {
        for id in ids {
            if let Some(n) = self.refs.get_mut(id) {
                *n = n.saturating_sub(1);
            }
        }
    }
}
