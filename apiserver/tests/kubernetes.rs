//! The Kubernetes source against kube's mock service (`tower_test::mock::pair`): a scenario
//! server answers the watchers' list and watch requests with realistic JSON, and each
//! scenario asserts the exact kvstore contents: the initial list; added, modified and deleted
//! objects; a bookmark and a `410 Gone` on a watch followed by a relist that drops an object;
//! a malformed object (reported, skipped, the rest applied).

#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::{Config, Running};
use clustermesh_certs::CertificateAuthority;
use clustermesh_kvstore::KvStore;
use clustermesh_model::ClusterName;
use http::{Request, Response};
use kube::client::Body;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;
type Responder = mock::SendResponse<Response<Body>>;

/// What the fake API server holds: objects per resource path, events queued per resource for
/// the next watch, a revision counter, and parked watch requests.
#[derive(Default)]
struct ApiState {
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    queued: BTreeMap<String, Vec<Value>>,
    revision: u64,
    parked: Vec<(String, Responder)>,
}

#[derive(Clone, Default)]
struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    wake: Arc<Notify>,
}

/// The resource path of a request (`/api/v1/pods`), and whether it is a watch.
fn route(req: &Request<Body>) -> (String, bool) {
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
    (req.uri().path().to_owned(), watch)
}

fn json_response(v: &Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn watch_response(events: &[Value]) -> Response<Body> {
    let mut body = Vec::new();
    for e in events {
        body.extend(serde_json::to_vec(e).unwrap());
        body.push(b'\n');
    }
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

impl FakeApi {
    fn key(o: &Value) -> String {
        format!(
            "{}/{}",
            o["metadata"]["namespace"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap()
        )
    }

    /// Sets an object without an event (the state a later list returns).
    fn put(&self, path: &str, mut o: Value) {
        let mut st = self.state.lock();
        st.revision += 1;
        o["metadata"]["resourceVersion"] = st.revision.to_string().into();
        st.objects
            .entry(path.to_owned())
            .or_default()
            .insert(Self::key(&o), o);
    }

    fn remove(&self, path: &str, key: &str) {
        self.state
            .lock()
            .objects
            .entry(path.to_owned())
            .or_default()
            .remove(key);
    }

    /// Queues a watch event (and applies it to the state).
    fn event(&self, path: &str, kind: &str, mut o: Value) {
        {
            let mut st = self.state.lock();
            st.revision += 1;
            o["metadata"]["resourceVersion"] = st.revision.to_string().into();
            let key = Self::key(&o);
            let objects = st.objects.entry(path.to_owned()).or_default();
            match kind {
                "DELETED" => {
                    objects.remove(&key);
                }
                _ => {
                    objects.insert(key, o.clone());
                }
            }
            st.queued
                .entry(path.to_owned())
                .or_default()
                .push(json!({"type": kind, "object": o}));
        }
        self.wake.notify_one();
    }

    /// Queues a raw watch event (bookmark, error).
    fn raw(&self, path: &str, e: Value) {
        self.state
            .lock()
            .queued
            .entry(path.to_owned())
            .or_default()
            .push(e);
        self.wake.notify_one();
    }

    /// Answers parked watches that have events now.
    fn flush(&self) {
        let mut st = self.state.lock();
        let parked = std::mem::take(&mut st.parked);
        for (path, responder) in parked {
            match st.queued.remove(&path) {
                Some(events) if !events.is_empty() => {
                    responder.send_response(watch_response(&events));
                }
                _ => st.parked.push((path, responder)),
            }
        }
    }

    fn answer(&self, req: Request<Body>, responder: Responder) {
        let (path, watch) = route(&req);
        let mut st = self.state.lock();
        if watch {
            match st.queued.remove(&path) {
                Some(events) if !events.is_empty() => {
                    responder.send_response(watch_response(&events));
                }
                // Nothing yet: the watch stays open until something happens.
                _ => st.parked.push((path, responder)),
            }
            return;
        }
        let known = [
            "/api/v1/namespaces",
            "/api/v1/pods",
            "/api/v1/services",
            "/api/v1/nodes",
            "/apis/discovery.k8s.io/v1/endpointslices",
            "/apis/cilium.io/v2/ciliumnetworkpolicies",
            "/apis/networking.k8s.io/v1/networkpolicies",
        ];
        if !known.contains(&path.as_str()) {
            // The clusterwide policy CRD is not installed in this cluster.
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "the server could not find the requested resource",
                "reason": "NotFound", "code": 404});
            let r = Response::builder()
                .status(404)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                .unwrap();
            responder.send_response(r);
            return;
        }
        // As a real API server lists: `<Kind>List` with the group's apiVersion, and items
        // without their own kind and apiVersion.
        let items: Vec<Value> = st
            .objects
            .get(&path)
            .map(|m| {
                m.values()
                    .cloned()
                    .map(|mut o| {
                        if let Some(o) = o.as_object_mut() {
                            o.remove("kind");
                            o.remove("apiVersion");
                        }
                        o
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (api_version, kind) = list_kind(&path);
        let list = json!({"kind": kind, "apiVersion": api_version,
            "metadata": {"resourceVersion": st.revision.to_string()}, "items": items});
        responder.send_response(json_response(&list));
    }

    /// Serves requests until the test ends.
    fn serve(self, mut handle: Handle) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = handle.next_request() => match r {
                        Some((req, responder)) => self.answer(req, responder),
                        None => return,
                    },
                    () = self.wake.notified() => self.flush(),
                }
            }
        });
    }
}

/// The apiVersion and kind of a list at `path`.
fn list_kind(path: &str) -> (&'static str, &'static str) {
    match path.rsplit('/').next().unwrap_or("") {
        "pods" => ("v1", "PodList"),
        "services" => ("v1", "ServiceList"),
        "nodes" => ("v1", "NodeList"),
        "namespaces" => ("v1", "NamespaceList"),
        "endpointslices" => ("discovery.k8s.io/v1", "EndpointSliceList"),
        "ciliumnetworkpolicies" => ("cilium.io/v2", "CiliumNetworkPolicyList"),
        "networkpolicies" => ("networking.k8s.io/v1", "NetworkPolicyList"),
        "ciliumclusterwidenetworkpolicies" => {
            ("cilium.io/v2", "CiliumClusterwideNetworkPolicyList")
        }
        _ => ("v1", "List"),
    }
}

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
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    api.clone().serve(handle);
    let client = kube::Client::new(service, "default");
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
    assert_eq!(node["IPv4AllocCIDR"], "10.1.0.0/24");
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
    let rv = api.state.lock().revision.to_string();
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
