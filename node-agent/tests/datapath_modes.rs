//! The eBPF datapath and the userspace one end with the same map contents for the same view,
//! through the same reconciler passes. Needs root (CAP_BPF) and bpffs, which the test mounts
//! when missing; it fails loudly without them.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod support;

use std::sync::Arc;

use clustermesh_agent::desired::Desired;
use clustermesh_agent::reconcile::{Reconciler, Scope};
use clustermesh_bpf::testing::{bpffs_root, require_root};
use clustermesh_bpf::{Datapath, KernelConfig, KernelDatapath, UserspaceDatapath};
use clustermesh_model::service::Affinity;
use clustermesh_proto::Object;
use support::*;

#[test]
fn bpf_and_userspace_datapaths_hold_the_same_entries() {
    require_root();
    let root = bpffs_root().join(format!("clustermesh-agent-test-{}", std::process::id()));
    let kernel = Arc::new(
        KernelDatapath::load(&KernelConfig {
            bpf_root: root.clone(),
            cluster: "c1".into(),
            node: "n1".into(),
        })
        .unwrap(),
    );
    let user = Arc::new(UserspaceDatapath::new());
    let mut rk = Reconciler::adopt(kernel.clone()).unwrap();
    let mut ru = Reconciler::adopt(user.clone()).unwrap();

    let mut v = populated();
    let mut desired = Desired::from_view(&v);
    rk.reconcile(&desired, Scope::Full, true).unwrap();
    ru.reconcile(&desired, Scope::Full, true).unwrap();
    let first = kernel.snapshot().unwrap();
    assert_eq!(first, user.snapshot().unwrap());
    assert_eq!(
        (
            first.services.len(),
            first.backends.len(),
            first.ipcache.len()
        ),
        (1, 2, 3),
        "the service, its backends; two endpoints and the node (host) in the ipcache"
    );
    assert_eq!((first.endpoints.len(), first.policy.len()), (1, 1));

    // A change: the remote cluster withdrawn, a second local backend.
    let mut dirty = v.upsert(status("c2", true, false));
    dirty.merge(v.upsert(Object::Service(web(
        "c1",
        true,
        true,
        Affinity::None,
        &[("10.1.0.1", READY), ("10.1.0.2", READY)],
    ))));
    let changed = desired.update(&v, &dirty);
    rk.reconcile(&desired, Scope::Changed(&changed), true)
        .unwrap();
    ru.reconcile(&desired, Scope::Changed(&changed), true)
        .unwrap();
    let second = kernel.snapshot().unwrap();
    assert_eq!(second, user.snapshot().unwrap());
    assert_ne!(second, first);

    kernel.unpin_all().unwrap();
    let _ = std::fs::remove_dir_all(&root);
}
