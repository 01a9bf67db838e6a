//! The Kubernetes source against kube's mock service (`tower_test::mock::pair`): a scenario
//! server answers the watchers' list and watch requests with realistic JSON, and each
//! scenario asserts the exact kvstore contents: the initial list; added, modified and deleted
//! objects; a bookmark and a `410 Gone` on a watch followed by a relist that drops an object;
//! a malformed object (reported, skipped, the rest applied).

#![allow(clippy::unwrap_used, reason = "tests")]

#[path = "support/fake_api.rs"]
mod fake_api;

use std::collections::BTreeSet;
use std::time::Duration;

use clustermesh_apiserver::{Config, Running};
use clustermesh_certs::CertificateAuthority;
use clustermesh_kvstore::KvStore;
use clustermesh_model::ClusterName;
use serde_json::{Value, json};

use fake_api::FakeApi;

/// An object of `tests/fixtures/` (the shapes a real API server returns).
fn fixture(file: &str) -> Value {
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A Deployment's pod as the API server returns it, renamed and readdressed.
fn pod(name: &str, ip: &str) -> Value {
    let mut p = fixture("pod-web-0.json");
    p["metadata"]["name"] = name.into();
    p["status"]["podIP"] = ip.into();
    p["status"]["podIPs"] = json!([{"ip": ip}]);
    p
}

/// The global Service `web` as the API server returns it, renamed and readdressed.
fn service(name: &str, ip: &str) -> Value {
    let mut s = fixture("service-web.json");
    s["metadata"]["name"] = name.into();
    s["spec"]["clusterIP"] = ip.into();
    s["spec"]["clusterIPs"] = json!([ip]);
    s
}

fn scenario_objects(api: &FakeApi) {
    api.put("/api/v1/namespaces", json!({"metadata": {"name": "prod"}}));
    // A kubelet-registered node: a Hostname address beside the InternalIP.
    api.put("/api/v1/nodes", fixture("node.json"));
    api.put("/api/v1/pods", pod("web-0", "10.1.0.5"));
    api.put("/api/v1/services", service("web", "10.96.0.10"));
    api.put("/api/v1/services", fixture("service-web-headless.json"));
    api.put(
        "/apis/discovery.k8s.io/v1/endpointslices",
        fixture("endpointslice-web.json"),
    );
    api.put(
        "/apis/cilium.io/v2/ciliumnetworkpolicies",
        json!({"metadata": {"name": "allow-web", "namespace": "prod"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}]}]}}),
    );
    // A Kubernetes NetworkPolicy as the API server returns it (policyTypes defaulted).
    api.put(
        "/apis/networking.k8s.io/v1/networkpolicies",
        json!({"metadata": {"name": "all-ingress-deny", "namespace": "prod", "uid": "8d3c4d2e-1b1f-4c55-9d55-2f3a0e9c1a10",
                "resourceVersion": "4711", "generation": 1, "creationTimestamp": "2026-12-01T10:00:00Z"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
    );
}

async fn start(api: &FakeApi) -> (tempfile::TempDir, Running) {
    let client = api.client();
    let dir = tempfile::tempdir().unwrap();
    let name = ClusterName::new("c1").unwrap();
    let ca = CertificateAuthority::generate(&name).unwrap();
    ca.cert().write(dir.path(), "ca").unwrap();
    ca.server_cert(&name, &["127.0.0.1".into()])
        .unwrap()
        .write(dir.path(), "server")
        .unwrap();
    let path = dir.path().join("apiserver.yaml");
    std::fs::write(
        &path,
        "cluster: {name: c1, id: 1}\nstore: {backend: sled, path: store}\nsource: {kubernetes: {}}\n\
         listen: {export: \"127.0.0.1:0\", health: \"127.0.0.1:0\"}\ntls: {ca: ca.pem, cert: server.pem, key: server-key.pem}\n",
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    let running = clustermesh_apiserver::start_with(config, Some(client))
        .await
        .unwrap();
    (dir, running)
}

/// The JSON value stored at `key`.
async fn stored(store: &dyn KvStore, key: &str) -> Value {
    let kv = store
        .get(key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no {key}"));
    serde_json::from_slice(&kv.value).unwrap()
}

/// The keys of the exported state, without identities (numbered by allocation).
async fn state(store: &dyn KvStore) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in [
        "cilium/state/ip/",
        "cilium/state/services/",
        "cilium/state/nodes/",
        "clustermesh/local/policies/",
    ] {
        for kv in store.list(prefix).await.unwrap().kvs {
            out.insert(kv.key);
        }
    }
    out
}

async fn wait_state(store: &dyn KvStore, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    let mut got = BTreeSet::new();
    for _ in 0..200 {
        got = state(store).await;
        if got == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the store never matched:\n want {want:#?}\n got {got:#?}");
}

const INITIAL: [&str; 5] = [
    "cilium/state/ip/v1/default/10.1.0.5",
    "cilium/state/services/v1/c1/prod/web",
    "cilium/state/nodes/v1/c1/n1",
    "clustermesh/local/policies/prod/all-ingress-deny",
    "clustermesh/local/policies/prod/allow-web",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_list_then_added_modified_deleted() {
    let api = FakeApi::default();
    scenario_objects(&api);
    let (_dir, running) = start(&api).await;
    for _ in 0..200 {
        if running.metrics.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        running.metrics.is_ready(),
        "ready after the initial list of every kind"
    );
    wait_state(running.store.as_ref(), &INITIAL).await;
    // The NetworkPolicy: every pod of prod, ingress default-deny, nothing allowed.
    let knp = stored(
        running.store.as_ref(),
        "clustermesh/local/policies/prod/all-ingress-deny",
    )
    .await;
    assert_eq!(
        knp["rules"],
        json!([{"endpointSelector": {}, "ingress": [{}]}])
    );
    let entry = stored(
        running.store.as_ref(),
        "cilium/state/ip/v1/default/10.1.0.5",
    )
    .await;
    assert_eq!(entry["K8sPodName"], "web-0");
    assert_eq!(entry["HostIP"], "192.0.2.1");
    assert_eq!(
        entry["NamedPorts"],
        json!([{"Name": "http", "Port": 8080, "Protocol": "TCP"}])
    );
    // The node is written with its IP addresses; Hostname and DNS addresses are not IPs.
    let node = stored(running.store.as_ref(), "cilium/state/nodes/v1/c1/n1").await;
    assert_eq!(
        node["IPAddresses"],
        json!([{"Type": "InternalIP", "IP": "192.0.2.1"}, {"Type": "ExternalIP", "IP": "198.51.100.7"}]),
        "{node}"
    );
    // Go's net.IPNet, as every Cilium release decodes it.
    assert_eq!(
        node["IPv4AllocCIDR"],
        json!({"IP": "10.1.0.0", "Mask": "////AA=="})
    );
    assert_eq!(node["Labels"]["topology.kubernetes.io/zone"], "zone-a");
    // The service's backends come from the controller's EndpointSlice (the mesh derives no
    // slices from a real API server's pods).
    let svc = stored(
        running.store.as_ref(),
        "cilium/state/services/v1/c1/prod/web",
    )
    .await;
    assert_eq!(
        svc["backends"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["10.1.0.5"],
        "{svc}"
    );

    // Added, modified, deleted.
    api.event("/api/v1/pods", "ADDED", pod("web-1", "10.1.0.6"));
    let mut moved = service("web", "10.96.0.10");
    moved["spec"]["ports"][0]["port"] = 8443.into();
    api.event("/api/v1/services", "MODIFIED", moved);
    api.event(
        "/api/v1/nodes",
        "DELETED",
        json!({"metadata": {"name": "n1"}, "status": {}}),
    );
    api.event(
        "/apis/networking.k8s.io/v1/networkpolicies",
        "DELETED",
        json!({"metadata": {"name": "all-ingress-deny", "namespace": "prod"}, "spec": {}}),
    );
    wait_state(
        running.store.as_ref(),
        &[
            "cilium/state/ip/v1/default/10.1.0.5",
            "cilium/state/ip/v1/default/10.1.0.6",
            "cilium/state/services/v1/c1/prod/web",
            "clustermesh/local/policies/prod/allow-web",
        ],
    )
    .await;
    let svc = stored(
        running.store.as_ref(),
        "cilium/state/services/v1/c1/prod/web",
    )
    .await;
    assert_eq!(svc["frontends"]["10.96.0.10"]["http"]["Port"], 8443);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bookmark_then_410_relists_and_drops_what_went_away() {
    let api = FakeApi::default();
    scenario_objects(&api);
    api.put("/api/v1/pods", pod("web-1", "10.1.0.6"));
    let (_dir, running) = start(&api).await;
    let with_both = [
        "cilium/state/ip/v1/default/10.1.0.5",
        "cilium/state/ip/v1/default/10.1.0.6",
        "cilium/state/services/v1/c1/prod/web",
        "cilium/state/nodes/v1/c1/n1",
        "clustermesh/local/policies/prod/all-ingress-deny",
        "clustermesh/local/policies/prod/allow-web",
    ];
    wait_state(running.store.as_ref(), &with_both).await;
    // A bookmark changes nothing.
    let rv = api.revision().to_string();
    api.raw(
        "/api/v1/pods",
        json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"resourceVersion": rv}}}),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        state(running.store.as_ref()).await,
        with_both.iter().map(|s| (*s).to_owned()).collect()
    );
    // web-1 goes away while the watch is broken: the API answers 410 and the relist no longer
    // has it.
    api.remove("/api/v1/pods", "prod/web-1");
    api.raw(
        "/api/v1/pods",
        json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "too old resource version", "reason": "Expired",
            "code": 410}}),
    );
    wait_state(running.store.as_ref(), &INITIAL).await;
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_object_is_reported_and_skipped() {
    let api = FakeApi::default();
    scenario_objects(&api);
    let (_dir, running) = start(&api).await;
    wait_state(running.store.as_ref(), &INITIAL).await;
    api.event("/api/v1/services", "ADDED", service("bad", "not-an-ip"));
    api.event("/api/v1/services", "ADDED", service("api", "10.96.0.11"));
    wait_state(
        running.store.as_ref(),
        &[
            "cilium/state/ip/v1/default/10.1.0.5",
            "cilium/state/services/v1/c1/prod/api",
            "cilium/state/services/v1/c1/prod/web",
            "cilium/state/nodes/v1/c1/n1",
            "clustermesh/local/policies/prod/all-ingress-deny",
            "clustermesh/local/policies/prod/allow-web",
        ],
    )
    .await;
    let metrics = running.metrics.render();
    assert!(
        metrics.contains("clustermesh_source_problems 1"),
        "the malformed service is counted: {metrics}"
    );
    running.stop().await.unwrap();
}
