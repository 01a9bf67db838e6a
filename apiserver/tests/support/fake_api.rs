//! A fake Kubernetes API server for kube's mock service (`tower_test::mock::pair`): it
//! answers the watchers' list and watch requests with the shapes a real API server returns
//! (`<Kind>List` with the group's apiVersion and items without kind and apiVersion; watch
//! events as newline-delimited JSON), keeps the objects per resource path, and answers 404
//! for a resource whose CRD is not installed.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses part of the fake"
)]
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a panic is the failure report"
)]

use std::collections::BTreeMap;
use std::sync::Arc;

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
pub struct FakeApi {
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
    pub fn key(o: &Value) -> String {
        format!(
            "{}/{}",
            o["metadata"]["namespace"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap()
        )
    }

    /// Sets an object without an event (the state a later list returns).
    pub fn put(&self, path: &str, mut o: Value) {
        let mut st = self.state.lock();
        st.revision += 1;
        o["metadata"]["resourceVersion"] = st.revision.to_string().into();
        st.objects
            .entry(path.to_owned())
            .or_default()
            .insert(Self::key(&o), o);
    }

    pub fn remove(&self, path: &str, key: &str) {
        self.state
            .lock()
            .objects
            .entry(path.to_owned())
            .or_default()
            .remove(key);
    }

    /// Queues a watch event (and applies it to the state).
    pub fn event(&self, path: &str, kind: &str, mut o: Value) {
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
    pub fn raw(&self, path: &str, e: Value) {
        self.state
            .lock()
            .queued
            .entry(path.to_owned())
            .or_default()
            .push(e);
        self.wake.notify_one();
    }

    /// Answers parked watches that have events now.
    pub fn flush(&self) {
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

    pub fn answer(&self, req: Request<Body>, responder: Responder) {
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
    pub fn serve(self, mut handle: Handle) {
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

/// The resource path of a kind this fake serves (`None`: a kind it does not know).
pub fn path_of_kind(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Namespace" => "/api/v1/namespaces",
        "Pod" => "/api/v1/pods",
        "Service" => "/api/v1/services",
        "Node" => "/api/v1/nodes",
        "EndpointSlice" => "/apis/discovery.k8s.io/v1/endpointslices",
        "NetworkPolicy" => "/apis/networking.k8s.io/v1/networkpolicies",
        "CiliumNetworkPolicy" => "/apis/cilium.io/v2/ciliumnetworkpolicies",
        "CiliumClusterwideNetworkPolicy" => "/apis/cilium.io/v2/ciliumclusterwidenetworkpolicies",
        _ => return None,
    })
}

impl FakeApi {
    /// The current resource version.
    pub fn revision(&self) -> u64 {
        self.state.lock().revision
    }

    /// A kube client served by this fake (a new mock pair; the fake answers it until the
    /// client is dropped). Must be called inside a tokio runtime.
    pub fn client(&self) -> kube::Client {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        self.clone().serve(handle);
        kube::Client::new(service, "default")
    }

    /// Forgets queued events and parked watches (of a client that is gone): a new client
    /// lists the current state first.
    pub fn reset_watches(&self) {
        let mut st = self.state.lock();
        st.queued.clear();
        st.parked.clear();
    }

    /// Applies one object as `ADDED`, `MODIFIED` or `DELETED`: as a watch event when
    /// `watching`, else to the state a later list returns.
    pub fn apply(&self, verb: &str, object: Value, watching: bool) -> Result<(), String> {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let path = path_of_kind(&kind).ok_or_else(|| format!("no resource for kind {kind:?}"))?;
        if object["metadata"]["name"].as_str().is_none() {
            return Err(format!("a {kind} without metadata.name"));
        }
        if watching {
            self.event(path, verb, object);
        } else if verb == "DELETED" {
            self.remove(path, &Self::key(&object));
        } else {
            self.put(path, object);
        }
        Ok(())
    }
}
