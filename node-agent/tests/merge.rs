//! The global-service merge, table-driven: every affinity x local health x remote health x
//! withdrawn combination, port-name matching, shared and global flags, legacy annotations,
//! the panic threshold.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a panic is the failure report"
)]

mod support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use clustermesh_agent::merge::{BackendAddr, FrontendPlan, Reason, merge};
use clustermesh_bpf::Proto;
use clustermesh_model::ip::Protocol;
use clustermesh_model::service::{Affinity, BackendConditions, GlobalServiceConfig};
use clustermesh_proto::Object;
use support::*;

fn name() -> (String, String) {
    ("prod".into(), "web".into())
}

fn only_frontend(v: &clustermesh_agent::view::View) -> FrontendPlan {
    let plan = merge(v, &name()).expect("a local definition");
    assert_eq!(plan.frontends.len(), 1, "{plan:?}");
    plan.frontends.into_iter().next().unwrap()
}

fn reason_of(f: &FrontendPlan, addr: &str) -> Reason {
    f.candidates
        .iter()
        .find(|c| c.ip == ip(addr))
        .unwrap_or_else(|| panic!("no candidate {addr} in {f:?}"))
        .reason
}

fn backend(cluster_id: u16, addr: &str) -> BackendAddr {
    BackendAddr {
        cluster_id,
        ip: addr.parse().unwrap(),
        port: 8080,
        proto: Proto::Tcp,
    }
}

#[test]
fn every_affinity_health_and_withdrawal_combination() {
    use Reason::{AffinityLocal, AffinityRemote, ClusterWithdrawn, Selected, Unhealthy};
    // (affinity, local healthy, remote healthy, remote withdrawn) -> (local, remote) reasons.
    let table = [
        (Affinity::None, true, true, false, Selected, Selected),
        (Affinity::None, true, true, true, Selected, ClusterWithdrawn),
        (Affinity::None, true, false, false, Selected, Unhealthy),
        (Affinity::None, true, false, true, Selected, Unhealthy),
        (Affinity::None, false, true, false, Unhealthy, Selected),
        (
            Affinity::None,
            false,
            true,
            true,
            Unhealthy,
            ClusterWithdrawn,
        ),
        (Affinity::None, false, false, false, Unhealthy, Unhealthy),
        (Affinity::None, false, false, true, Unhealthy, Unhealthy),
        (Affinity::Local, true, true, false, Selected, AffinityLocal),
        (
            Affinity::Local,
            true,
            true,
            true,
            Selected,
            ClusterWithdrawn,
        ),
        (Affinity::Local, true, false, false, Selected, Unhealthy),
        (Affinity::Local, true, false, true, Selected, Unhealthy),
        (Affinity::Local, false, true, false, Unhealthy, Selected),
        (
            Affinity::Local,
            false,
            true,
            true,
            Unhealthy,
            ClusterWithdrawn,
        ),
        (Affinity::Local, false, false, false, Unhealthy, Unhealthy),
        (Affinity::Local, false, false, true, Unhealthy, Unhealthy),
        (
            Affinity::Remote,
            true,
            true,
            false,
            AffinityRemote,
            Selected,
        ),
        (
            Affinity::Remote,
            true,
            true,
            true,
            Selected,
            ClusterWithdrawn,
        ),
        (Affinity::Remote, true, false, false, Selected, Unhealthy),
        (Affinity::Remote, true, false, true, Selected, Unhealthy),
        (Affinity::Remote, false, true, false, Unhealthy, Selected),
        (
            Affinity::Remote,
            false,
            true,
            true,
            Unhealthy,
            ClusterWithdrawn,
        ),
        (Affinity::Remote, false, false, false, Unhealthy, Unhealthy),
        (Affinity::Remote, false, false, true, Unhealthy, Unhealthy),
    ];
    for (affinity, lh, rh, withdrawn, want_local, want_remote) in table {
        let row = format!(
            "affinity {affinity:?}, local healthy {lh}, remote healthy {rh}, withdrawn {withdrawn}"
        );
        let health = |h: bool| if h { READY } else { NOT_READY };
        let mut v = view();
        v.upsert(Object::Service(web(
            "c1",
            true,
            true,
            affinity,
            &[("10.1.0.1", health(lh))],
        )));
        v.upsert(Object::Service(web(
            "c2",
            true,
            true,
            Affinity::None,
            &[("10.2.0.1", health(rh))],
        )));
        v.upsert(status("c2", withdrawn, false));
        let f = only_frontend(&v);
        assert_eq!(
            reason_of(&f, "10.1.0.1"),
            want_local,
            "local backend, {row}"
        );
        assert_eq!(
            reason_of(&f, "10.2.0.1"),
            want_remote,
            "remote backend, {row}"
        );
        let mut want = Vec::new();
        if want_local == Selected {
            want.push(backend(1, "10.1.0.1"));
        }
        if want_remote == Selected {
            want.push(backend(2, "10.2.0.1"));
        }
        assert_eq!(f.backends, want, "programmed backends, {row}");
    }
}

#[test]
fn serving_and_not_terminating_is_healthy_terminating_is_not() {
    let serving = BackendConditions {
        ready: false,
        serving: true,
        terminating: false,
    };
    let terminating = BackendConditions {
        ready: false,
        serving: true,
        terminating: true,
    };
    let mut v = view();
    v.upsert(Object::Service(web(
        "c1",
        true,
        true,
        Affinity::None,
        &[("10.1.0.1", serving), ("10.1.0.2", terminating)],
    )));
    let f = only_frontend(&v);
    assert_eq!(reason_of(&f, "10.1.0.1"), Reason::Selected);
    assert_eq!(reason_of(&f, "10.1.0.2"), Reason::Unhealthy);
    assert_eq!(f.backends, vec![backend(1, "10.1.0.1")]);
}

#[test]
fn backends_match_frontends_by_port_name_and_protocol() {
    let mut v = view();
    let mut local = web("c1", true, true, Affinity::None, &[]);
    local.frontends.insert(
        ip("10.96.0.10"),
        ports(&[("http", Protocol::Tcp, 80), ("dns", Protocol::Udp, 53)]),
    );
    local.backends = BTreeMap::from([
        (
            ip("10.1.0.1"),
            ports(&[("http", Protocol::Tcp, 8080), ("dns", Protocol::Udp, 5353)]),
        ),
        // Only a port of another name.
        (ip("10.1.0.2"), ports(&[("metrics", Protocol::Tcp, 9090)])),
        // The right name, the wrong protocol.
        (ip("10.1.0.3"), ports(&[("dns", Protocol::Tcp, 53)])),
    ]);
    v.upsert(Object::Service(local));
    let plan = merge(&v, &name()).unwrap();
    let by_name: BTreeMap<&str, &FrontendPlan> = plan
        .frontends
        .iter()
        .map(|f| (f.port_name.as_str(), f))
        .collect();
    let http = by_name["http"];
    assert_eq!((http.port, http.proto), (80, Proto::Tcp));
    assert_eq!(http.backends, vec![backend(1, "10.1.0.1")]);
    assert_eq!(reason_of(http, "10.1.0.2"), Reason::PortMismatch);
    assert_eq!(reason_of(http, "10.1.0.3"), Reason::PortMismatch);
    let dns = by_name["dns"];
    assert_eq!((dns.port, dns.proto), (53, Proto::Udp));
    assert_eq!(
        dns.backends,
        vec![BackendAddr {
            cluster_id: 1,
            ip: Ipv4Addr::new(10, 1, 0, 1),
            port: 5353,
            proto: Proto::Udp
        }]
    );
    assert_eq!(reason_of(dns, "10.1.0.3"), Reason::PortMismatch);
}

#[test]
fn only_global_and_shared_remote_definitions_count_and_only_for_a_global_local_one() {
    let mut v = view();
    v.upsert(Object::Service(web(
        "c1",
        true,
        true,
        Affinity::None,
        &[("10.1.0.1", READY)],
    )));
    v.upsert(Object::Service(web(
        "c2",
        true,
        false,
        Affinity::None,
        &[("10.2.0.1", READY)],
    )));
    v.upsert(Object::Service(web(
        "c3",
        false,
        false,
        Affinity::None,
        &[("10.3.0.1", READY)],
    )));
    let f = only_frontend(&v);
    assert_eq!(reason_of(&f, "10.2.0.1"), Reason::NotShared);
    assert_eq!(reason_of(&f, "10.3.0.1"), Reason::RemoteNotGlobal);
    assert_eq!(f.backends, vec![backend(1, "10.1.0.1")]);

    // The local definition is not global: remote backends never count.
    v.upsert(Object::Service(web(
        "c1",
        false,
        false,
        Affinity::None,
        &[("10.1.0.1", READY)],
    )));
    v.upsert(Object::Service(web(
        "c2",
        true,
        true,
        Affinity::None,
        &[("10.2.0.1", READY)],
    )));
    let f = only_frontend(&v);
    assert_eq!(reason_of(&f, "10.2.0.1"), Reason::LocalNotGlobal);
    assert_eq!(f.backends, vec![backend(1, "10.1.0.1")]);
}

#[test]
fn a_service_without_a_local_definition_is_not_programmed() {
    let mut v = view();
    v.upsert(Object::Service(web(
        "c2",
        true,
        true,
        Affinity::None,
        &[("10.2.0.1", READY)],
    )));
    assert_eq!(merge(&v, &name()), None);
}

#[test]
fn legacy_annotations_drive_the_merge_like_the_current_ones() {
    for (global_key, affinity_key) in [
        ("service.cilium.io/global", "service.cilium.io/affinity"),
        ("io.cilium/global-service", "io.cilium/service-affinity"),
    ] {
        let annotations = BTreeMap::from([
            (global_key.to_owned(), "true".to_owned()),
            (affinity_key.to_owned(), "local".to_owned()),
        ]);
        let (settings, errors) = GlobalServiceConfig::from_annotations(&annotations);
        assert!(errors.is_empty(), "{errors:?}");
        let mut v = view();
        v.upsert(Object::Service(web(
            "c1",
            settings.global,
            settings.shared,
            settings.affinity,
            &[("10.1.0.1", READY)],
        )));
        v.upsert(Object::Service(web(
            "c2",
            true,
            true,
            Affinity::None,
            &[("10.2.0.1", READY)],
        )));
        let f = only_frontend(&v);
        assert_eq!(
            reason_of(&f, "10.2.0.1"),
            Reason::AffinityLocal,
            "{global_key}"
        );
        assert_eq!(f.backends, vec![backend(1, "10.1.0.1")], "{global_key}");
    }
}

#[test]
fn the_panic_threshold_keeps_a_withdrawn_clusters_last_backends() {
    for (keep, want) in [(true, vec![backend(2, "10.2.0.1")]), (false, vec![])] {
        let mut v = view();
        v.upsert(Object::Service(web(
            "c1",
            true,
            true,
            Affinity::None,
            &[("10.1.0.1", NOT_READY)],
        )));
        v.upsert(Object::Service(web(
            "c2",
            true,
            true,
            Affinity::None,
            &[("10.2.0.1", READY)],
        )));
        v.upsert(status("c2", true, keep));
        let f = only_frontend(&v);
        assert_eq!(f.backends, want, "keepLastBackends {keep}");
        let reason = if keep {
            Reason::KeptLastBackends
        } else {
            Reason::ClusterWithdrawn
        };
        assert_eq!(reason_of(&f, "10.2.0.1"), reason);
    }
    // With a healthy backend elsewhere, the withdrawn cluster's backends go.
    let mut v = view();
    v.upsert(Object::Service(web(
        "c1",
        true,
        true,
        Affinity::None,
        &[("10.1.0.1", READY)],
    )));
    v.upsert(Object::Service(web(
        "c2",
        true,
        true,
        Affinity::None,
        &[("10.2.0.1", READY)],
    )));
    v.upsert(status("c2", true, true));
    assert_eq!(only_frontend(&v).backends, vec![backend(1, "10.1.0.1")]);
}
