//! The reconciler: the write order that never exposes a half-written state, nothing pruned
//! before it is allowed, adoption of existing maps without a write, and incremental passes
//! that end where a full one does.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use clustermesh_agent::desired::Desired;
use clustermesh_agent::reconcile::{Reconciler, Scope};
use clustermesh_agent::view::View;
use clustermesh_bpf::{
    Backend, BackendId, Datapath, Endpoint, IpCacheValue, PolicyKey, PolicyValue, Prefix,
    ServiceKey, Snapshot, UserspaceDatapath,
};
use clustermesh_model::service::Affinity;
use clustermesh_proto::{Object, ObjectRef, v1};
use parking_lot::Mutex;
use support::*;

/// The in-memory datapath, with a log of every call.
#[derive(Default)]
struct Recording {
    inner: UserspaceDatapath,
    log: Mutex<Vec<String>>,
}

impl Recording {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock())
    }
    fn note(&self, s: &str) {
        self.log.lock().push(s.to_owned());
    }
}

impl Datapath for Recording {
    fn upsert_backends(&self, b: &[(BackendId, Backend)]) -> clustermesh_bpf::Result<()> {
        self.note("upsert_backends");
        self.inner.upsert_backends(b)
    }
    fn delete_backends(&self, ids: &[BackendId]) -> clustermesh_bpf::Result<()> {
        self.note("delete_backends");
        self.inner.delete_backends(ids)
    }
    fn upsert_service(&self, k: ServiceKey, b: &[BackendId]) -> clustermesh_bpf::Result<()> {
        self.note("upsert_service");
        self.inner.upsert_service(k, b)
    }
    fn delete_service(&self, k: ServiceKey) -> clustermesh_bpf::Result<()> {
        self.note("delete_service");
        self.inner.delete_service(k)
    }
    fn upsert_ipcache(&self, e: &[(Prefix, IpCacheValue)]) -> clustermesh_bpf::Result<()> {
        self.note("upsert_ipcache");
        self.inner.upsert_ipcache(e)
    }
    fn delete_ipcache(&self, p: &[Prefix]) -> clustermesh_bpf::Result<()> {
        self.note("delete_ipcache");
        self.inner.delete_ipcache(p)
    }
    fn upsert_endpoints(&self, e: &[(Ipv4Addr, Endpoint)]) -> clustermesh_bpf::Result<()> {
        self.note("upsert_endpoints");
        self.inner.upsert_endpoints(e)
    }
    fn delete_endpoints(&self, ips: &[Ipv4Addr]) -> clustermesh_bpf::Result<()> {
        self.note("delete_endpoints");
        self.inner.delete_endpoints(ips)
    }
    fn upsert_policy(&self, e: &[(PolicyKey, PolicyValue)]) -> clustermesh_bpf::Result<()> {
        self.note("upsert_policy");
        self.inner.upsert_policy(e)
    }
    fn delete_policy(&self, k: &[PolicyKey]) -> clustermesh_bpf::Result<()> {
        self.note("delete_policy");
        self.inner.delete_policy(k)
    }
    fn snapshot(&self) -> clustermesh_bpf::Result<Snapshot> {
        self.inner.snapshot()
    }
}

/// Map contents with backend IDs resolved to backends (IDs are the reconciler's choice).
type Resolved = (
    BTreeMap<ServiceKey, Vec<Backend>>,
    BTreeMap<Prefix, IpCacheValue>,
    BTreeMap<Ipv4Addr, Endpoint>,
    BTreeMap<PolicyKey, PolicyValue>,
);

fn resolved(dp: &dyn Datapath) -> Resolved {
    let s = dp.snapshot().unwrap();
    let services = s
        .services
        .iter()
        .map(|(k, ids)| (*k, ids.iter().map(|id| s.backends[id]).collect()))
        .collect();
    (services, s.ipcache, s.endpoints, s.policy)
}

fn del(kind: v1::Kind, cluster: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind,
        cluster: c(cluster),
        name: name.into(),
    }
}

#[test]
fn writes_come_before_what_refers_to_them_and_removals_after() {
    let dp = Arc::new(Recording::default());
    let mut r = Reconciler::adopt(dp.clone()).unwrap();
    let mut v = populated();
    let mut desired = Desired::from_view(&v);
    r.reconcile(&desired, Scope::Full, true).unwrap();
    assert_eq!(
        dp.take(),
        [
            "upsert_ipcache",
            "upsert_backends",
            "upsert_policy",
            "upsert_service",
            "upsert_endpoints"
        ]
    );
    let (services, ipcache, endpoints, policy) = resolved(dp.as_ref());
    assert_eq!(services.len(), 1);
    assert_eq!(services.values().next().unwrap().len(), 2);
    // Two endpoints and the node's address (host).
    assert_eq!((ipcache.len(), endpoints.len(), policy.len()), (3, 1, 1));
    assert!(endpoints.values().next().unwrap().flags.enforce_ingress);

    // Remove the policy, the remote service and the remote endpoint.
    let mut dirty = v.delete(&del(v1::Kind::Policies, "c1", "prod/p"));
    dirty.merge(v.delete(&del(v1::Kind::Services, "c2", "prod/web")));
    dirty.merge(v.delete(&del(v1::Kind::Ipcache, "c2", "10.2.0.1")));
    let changed = desired.update(&v, &dirty);
    r.reconcile(&desired, Scope::Changed(&changed), true)
        .unwrap();
    assert_eq!(
        dp.take(),
        [
            "upsert_service",
            "upsert_endpoints",
            "delete_policy",
            "delete_backends",
            "delete_ipcache"
        ],
        "the service shrinks before its old backend goes; enforcement ends before its entries"
    );
    let (services, ipcache, endpoints, policy) = resolved(dp.as_ref());
    assert_eq!(services.values().next().unwrap().len(), 1);
    assert_eq!(
        dp.snapshot().unwrap().backends.len(),
        1,
        "the unused backend is gone"
    );
    assert_eq!((ipcache.len(), policy.len()), (2, 0));
    assert!(!endpoints.values().next().unwrap().flags.enforce_ingress);
}

#[test]
fn nothing_is_removed_until_pruning_is_allowed() {
    let dp = Arc::new(Recording::default());
    let mut r = Reconciler::adopt(dp.clone()).unwrap();
    r.reconcile(&Desired::from_view(&populated()), Scope::Full, true)
        .unwrap();
    let before = resolved(dp.as_ref());
    dp.take();
    // An agent that restarted sees an empty, not yet synced view.
    let empty = Desired::from_view(&view());
    let stats = r.reconcile(&empty, Scope::Full, false).unwrap();
    assert!(dp.take().is_empty(), "no write at all");
    assert_eq!(stats.deletes, 0);
    assert_eq!(
        stats.held,
        1 + 1 + 1 + 2,
        "endpoint, policy entry, service, ipcache"
    );
    assert_eq!(resolved(dp.as_ref()), before);
    let stats = r.reconcile(&empty, Scope::Full, true).unwrap();
    assert_eq!(stats.deletes, 1 + 1 + 1 + 2 + 2, "... and the two backends");
    let s = dp.snapshot().unwrap();
    assert!(s.services.is_empty() && s.backends.is_empty());
    assert_eq!(s.ipcache.len(), 1, "the node's own address (host) stays");
}

#[test]
fn adopting_maps_that_already_match_writes_nothing() {
    let dp = Arc::new(Recording::default());
    let desired = Desired::from_view(&populated());
    Reconciler::adopt(dp.clone())
        .unwrap()
        .reconcile(&desired, Scope::Full, true)
        .unwrap();
    let ids_before = dp.snapshot().unwrap().backends;
    dp.take();
    // A restarted agent: a new reconciler over the same (pinned) maps.
    let mut r = Reconciler::adopt(dp.clone()).unwrap();
    let stats = r.reconcile(&desired, Scope::Full, true).unwrap();
    assert!(stats.is_empty(), "{stats:?}");
    assert!(dp.take().is_empty());
    assert_eq!(
        dp.snapshot().unwrap().backends,
        ids_before,
        "backend IDs kept"
    );
}

/// One change to a view.
type Step = Box<dyn Fn(&mut View) -> clustermesh_agent::view::Dirty>;

#[test]
fn incremental_passes_end_where_a_full_pass_does() {
    let dp = Arc::new(UserspaceDatapath::new());
    let mut r = Reconciler::adopt(dp.clone()).unwrap();
    let mut v = populated();
    let mut desired = Desired::from_view(&v);
    r.reconcile(&desired, Scope::Full, true).unwrap();
    let steps: Vec<Step> = vec![
        Box::new(|v| v.upsert(status("c2", true, false))),
        Box::new(|v| {
            v.upsert(Object::Service(web(
                "c1",
                true,
                true,
                Affinity::Remote,
                &[("10.1.0.1", READY), ("10.1.0.2", READY)],
            )))
        }),
        Box::new(|v| v.upsert(status("c2", false, false))),
        Box::new(|v| {
            v.delete(&del(
                v1::Kind::Identities,
                "c2",
                &((2 << 16) + 300).to_string(),
            ))
        }),
        Box::new(|v| {
            v.upsert(endpoint(
                "c1",
                "10.1.0.3",
                (1 << 16) + 256,
                "192.0.2.1",
                &[],
            ))
        }),
        Box::new(|v| v.delete(&del(v1::Kind::Services, "c1", "prod/web"))),
    ];
    for (i, step) in steps.iter().enumerate() {
        let dirty = step(&mut v);
        let changed = desired.update(&v, &dirty);
        r.reconcile(&desired, Scope::Changed(&changed), true)
            .unwrap();
        let fresh = Arc::new(UserspaceDatapath::new());
        Reconciler::adopt(fresh.clone())
            .unwrap()
            .reconcile(&Desired::from_view(&v), Scope::Full, true)
            .unwrap();
        assert_eq!(
            resolved(dp.as_ref()),
            resolved(fresh.as_ref()),
            "after step {i}"
        );
        assert_eq!(desired, Desired::from_view(&v), "desired after step {i}");
    }
}

/// The in-memory datapath, failing its first ipcache write.
#[derive(Default)]
struct FailsOnce {
    inner: UserspaceDatapath,
    failed: std::sync::atomic::AtomicBool,
}

impl Datapath for FailsOnce {
    fn upsert_backends(&self, b: &[(BackendId, Backend)]) -> clustermesh_bpf::Result<()> {
        self.inner.upsert_backends(b)
    }
    fn delete_backends(&self, ids: &[BackendId]) -> clustermesh_bpf::Result<()> {
        self.inner.delete_backends(ids)
    }
    fn upsert_service(&self, k: ServiceKey, b: &[BackendId]) -> clustermesh_bpf::Result<()> {
        self.inner.upsert_service(k, b)
    }
    fn delete_service(&self, k: ServiceKey) -> clustermesh_bpf::Result<()> {
        self.inner.delete_service(k)
    }
    fn upsert_ipcache(&self, e: &[(Prefix, IpCacheValue)]) -> clustermesh_bpf::Result<()> {
        if !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(clustermesh_bpf::Error::Missing(
                "cm_ipcache (injected failure)",
            ));
        }
        self.inner.upsert_ipcache(e)
    }
    fn delete_ipcache(&self, p: &[Prefix]) -> clustermesh_bpf::Result<()> {
        self.inner.delete_ipcache(p)
    }
    fn upsert_endpoints(&self, e: &[(Ipv4Addr, Endpoint)]) -> clustermesh_bpf::Result<()> {
        self.inner.upsert_endpoints(e)
    }
    fn delete_endpoints(&self, ips: &[Ipv4Addr]) -> clustermesh_bpf::Result<()> {
        self.inner.delete_endpoints(ips)
    }
    fn upsert_policy(&self, e: &[(PolicyKey, PolicyValue)]) -> clustermesh_bpf::Result<()> {
        self.inner.upsert_policy(e)
    }
    fn delete_policy(&self, k: &[PolicyKey]) -> clustermesh_bpf::Result<()> {
        self.inner.delete_policy(k)
    }
    fn snapshot(&self) -> clustermesh_bpf::Result<Snapshot> {
        self.inner.snapshot()
    }
}

#[test]
fn a_failed_write_is_healed_by_the_next_full_pass() {
    let dp = Arc::new(FailsOnce::default());
    let mut r = Reconciler::adopt(dp.clone()).unwrap();
    let desired = Desired::from_view(&populated());
    assert!(r.reconcile(&desired, Scope::Full, true).is_err());
    assert!(dp.snapshot().unwrap().ipcache.is_empty());
    // What the failed pass did not write is not believed written: the retry writes it all.
    r.reconcile(&desired, Scope::Full, true).unwrap();
    let fresh = Arc::new(UserspaceDatapath::new());
    Reconciler::adopt(fresh.clone())
        .unwrap()
        .reconcile(&desired, Scope::Full, true)
        .unwrap();
    assert_eq!(resolved(dp.as_ref()), resolved(fresh.as_ref()));
}

#[test]
fn a_service_the_datapath_refuses_does_not_stop_the_pass() {
    // The populated view plus a second service; then the first service grows past what a
    // service may carry (65,535 backends), as a hostile or huge cluster could make it.
    let dp = Arc::new(Recording::default());
    let mut r = Reconciler::adopt(dp.clone()).unwrap();
    let mut desired = Desired::from_view(&populated());
    let (web, backends) = desired
        .services
        .iter()
        .next()
        .map(|(k, b)| (*k, b.clone()))
        .unwrap();
    let other = ServiceKey {
        vip: Ipv4Addr::new(10, 96, 0, 99),
        ..web
    };
    desired.services.insert(other, backends.clone());
    let huge: Vec<_> = (0..65_536u32)
        .map(|i| clustermesh_agent::merge::BackendAddr {
            ip: Ipv4Addr::from(0x0a10_0000 + i),
            ..backends[0]
        })
        .collect();
    desired.services.insert(web, huge);

    let stats = r.reconcile(&desired, Scope::Full, true).unwrap();
    assert_eq!(stats.failed.len(), 1, "{:?}", stats.failed);
    assert!(
        stats.failed[&web].contains("65536 backends; at most 65535"),
        "{:?}",
        stats.failed
    );
    assert_eq!(r.failed().keys().collect::<Vec<_>>(), [&web]);
    // Everything else is in the maps: the other service, the ipcache, the endpoint with its
    // enforcement and its policy entry.
    let (services, ipcache, endpoints, policy) = resolved(dp.as_ref());
    assert_eq!(services.keys().collect::<Vec<_>>(), [&other]);
    assert_eq!((ipcache.len(), endpoints.len(), policy.len()), (3, 1, 1));
    assert!(endpoints.values().next().unwrap().flags.enforce_ingress);
    // The refused backends are not left in the backends map.
    assert_eq!(dp.snapshot().unwrap().backends.len(), 2);

    // Back within bounds: written, and no longer reported.
    desired.services.insert(web, backends);
    let stats = r.reconcile(&desired, Scope::Full, true).unwrap();
    assert!(stats.failed.is_empty());
    assert!(r.failed().is_empty());
    assert_eq!(resolved(dp.as_ref()).0.len(), 2);
}
