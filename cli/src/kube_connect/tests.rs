//! `connect` in kube mode against kube's mock service: two fake API servers holding what the
//! chart installs (the apiserver's ConfigMap, the CA Secret, the Export Service), the remotes
//! Secret created on both sides, a second run that writes nothing, and the refusals, which
//! write nothing either.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use clustermesh_certs::CertificateAuthority;
use clustermesh_model::ClusterName;
use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tower_test::mock;

use super::{Placement, connect};
use crate::connect::Outcome;

const NS: &str = "clustermesh";

/// A fake API server: objects by path; GET, POST (create) and PATCH (JSON merge) of Secrets.
#[derive(Clone, Default)]
struct FakeApi {
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
    writes: Arc<Mutex<usize>>,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl FakeApi {
    fn cluster(name: &str, id: u32, mode: u32, lb: Option<&str>) -> Self {
        let api = Self::default();
        let ca = CertificateAuthority::generate(&ClusterName::new(name).unwrap()).unwrap();
        let base = format!("/api/v1/namespaces/{NS}");
        let mut o = api.objects.lock();
        o.insert(
            format!("{base}/configmaps/mesh-clustermesh-apiserver"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "mesh-clustermesh-apiserver", "namespace": NS,
                    "uid": "7b1f0c9e-3a52-4d1e-8f6a-2c4b9d0e1f20", "resourceVersion": "4012",
                    "creationTimestamp": "2026-11-30T09:20:00Z",
                    "labels": {"app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/name": "clustermesh"},
                    "annotations": {"meta.helm.sh/release-name": "mesh", "meta.helm.sh/release-namespace": NS}},
                "data": {"apiserver.yaml": format!(
                    "cluster: {{name: {name}, id: {id}, maxConnectedClusters: {mode}}}\nstore: {{backend: sled, path: /var/lib/clustermesh/store}}\nsource: {{kubernetes: {{}}}}\nlisten: {{export: \"0.0.0.0:2379\", health: \"0.0.0.0:9880\"}}\ntls: {{ca: /t/ca.pem, cert: /t/server.pem, key: /t/server-key.pem}}\nremotesDir: /etc/clustermesh/remotes\n")}}),
        );
        o.insert(
            format!("{base}/secrets/clustermesh-ca"),
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "clustermesh-ca", "namespace": NS,
                    "uid": "0d8e6f4a-9b1c-4e2d-a3f5-6b7c8d9e0f1a", "resourceVersion": "3990",
                    "creationTimestamp": "2026-11-30T09:19:30Z"},
                "data": {"ca.pem": b64(&ca.cert().cert_pem), "ca-key.pem": b64(&ca.cert().key_pem)}}),
        );
        let status = match lb {
            Some(ip) => json!({"loadBalancer": {"ingress": [{"ip": ip}]}}),
            None => json!({"loadBalancer": {}}),
        };
        o.insert(
            format!("{base}/services/mesh-clustermesh-apiserver"),
            json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "mesh-clustermesh-apiserver", "namespace": NS,
                    "uid": "5c3a1e9f-7d2b-4f6a-b8c0-1e2d3f4a5b6c", "resourceVersion": "4020",
                    "creationTimestamp": "2026-11-30T09:20:00Z",
                    "labels": {"app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/name": "clustermesh"}},
                "spec": {"type": if lb.is_some() { "LoadBalancer" } else { "ClusterIP" },
                    "clusterIP": "10.96.44.10", "clusterIPs": ["10.96.44.10"],
                    "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                    "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
                    "selector": {"app.kubernetes.io/component": "apiserver"},
                    "ports": [{"name": "export", "port": 2379, "protocol": "TCP", "targetPort": "export"}]},
                "status": status}),
        );
        drop(o);
        api
    }

    fn secret(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let o = self.objects.lock();
        let s = o.get(&format!("/api/v1/namespaces/{NS}/secrets/{name}"))?;
        Some(
            s["data"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap())
                        .unwrap();
                    (k.clone(), String::from_utf8(bytes).unwrap())
                })
                .collect(),
        )
    }

    async fn answer(&self, req: Request<Body>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let respond = |code: u16, v: &Value| {
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(v).unwrap()))
                .unwrap()
        };
        let not_found = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
        let mut objects = self.objects.lock();
        match method.as_str() {
            "GET" => match objects.get(&path) {
                Some(v) => respond(200, v),
                None => respond(404, &not_found),
            },
            "POST" => {
                let v: Value = serde_json::from_slice(&body).unwrap();
                let name = v["metadata"]["name"].as_str().unwrap().to_owned();
                *self.writes.lock() += 1;
                objects.insert(format!("{path}/{name}"), v.clone());
                respond(201, &v)
            }
            "PATCH" => {
                let patch: Value = serde_json::from_slice(&body).unwrap();
                let Some(target) = objects.get_mut(&path) else {
                    return respond(404, &not_found);
                };
                merge(target, &patch);
                *self.writes.lock() += 1;
                respond(200, target)
            }
            _ => respond(405, &json!({"kind": "Status", "code": 405})),
        }
    }

    fn client(&self) -> kube::Client {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((req, responder)) = handle.next_request().await {
                responder.send_response(api.answer(req).await);
            }
        });
        kube::Client::new(service, NS)
    }
}

fn placement(address: Option<&str>) -> Placement {
    Placement {
        namespace: NS.into(),
        release: "mesh".into(),
        ca_secret: "clustermesh-ca".into(),
        remotes_secret: "clustermesh-remotes".into(),
        address: address.map(str::to_owned),
    }
}

#[tokio::test]
async fn connects_two_clusters_through_their_apis_and_a_second_run_writes_nothing() {
    let east = FakeApi::cluster("east", 1, 255, Some("203.0.113.10"));
    let west = FakeApi::cluster("west", 2, 255, None);
    let (x, y) = connect(
        (east.client(), placement(None)),
        (west.client(), placement(Some("203.0.113.20:32379"))),
    )
    .await
    .unwrap();
    assert_eq!((x, y), (Outcome::Written, Outcome::Written));
    let e = east.secret("clustermesh-remotes").unwrap();
    let keys: Vec<&str> = e.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "west-ca.pem",
            "west-client-key.pem",
            "west-client.pem",
            "west.yaml"
        ]
    );
    assert!(
        e["west.yaml"].contains("address: \"203.0.113.20:32379\""),
        "{}",
        e["west.yaml"]
    );
    assert!(e["west.yaml"].contains("id: 2"));
    let w = west.secret("clustermesh-remotes").unwrap();
    assert!(
        w["east.yaml"].contains("address: \"203.0.113.10:2379\""),
        "{}",
        w["east.yaml"]
    );
    // The certificate east presents to west is signed by west's CA, for remote-east.
    let west_ca = west.secret("clustermesh-ca").unwrap()["ca.pem"].clone();
    assert_eq!(e["west-ca.pem"], west_ca);
    let cert = clustermesh_certs::parse_certs(&e["west-client.pem"], "west-client.pem").unwrap();
    let id = clustermesh_certs::ClientIdentity::from_der(cert[0].as_ref()).unwrap();
    assert_eq!(
        id,
        clustermesh_certs::ClientIdentity::Remote(ClusterName::new("east").unwrap())
    );
    assert!(
        !e.values().any(|v| v.contains("PRIVATE KEY")
            && v == &west.secret("clustermesh-ca").unwrap()["ca-key.pem"])
    );

    // Twice: nothing is written.
    let writes = (*east.writes.lock(), *west.writes.lock());
    let (x, y) = connect(
        (east.client(), placement(None)),
        (west.client(), placement(Some("203.0.113.20:32379"))),
    )
    .await
    .unwrap();
    assert_eq!((x, y), (Outcome::Unchanged, Outcome::Unchanged));
    assert_eq!((*east.writes.lock(), *west.writes.lock()), writes);

    // A third cluster joins east: east's Secret is merged, west's entry kept.
    let north = FakeApi::cluster("north", 3, 255, Some("203.0.113.30"));
    connect(
        (east.client(), placement(None)),
        (north.client(), placement(None)),
    )
    .await
    .unwrap();
    let e = east.secret("clustermesh-remotes").unwrap();
    assert!(e.contains_key("west.yaml") && e.contains_key("north.yaml"));
}

#[tokio::test]
async fn refusals_write_nothing() {
    let cases = [
        (
            FakeApi::cluster("east", 2, 255, Some("203.0.113.20")),
            "cluster names must be unique",
        ),
        (
            FakeApi::cluster("west", 1, 255, Some("203.0.113.20")),
            "both have cluster ID 1",
        ),
        (
            FakeApi::cluster("west", 2, 511, Some("203.0.113.20")),
            "maxConnectedClusters 255",
        ),
        (
            FakeApi::cluster("west", 2, 255, None),
            "no load balancer address",
        ),
    ];
    for (other, why) in cases {
        let east = FakeApi::cluster("east", 1, 255, Some("203.0.113.10"));
        let err = connect(
            (east.client(), placement(None)),
            (other.client(), placement(None)),
        )
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains(why), "{why:?} not in {text:?}");
        assert_eq!((*east.writes.lock(), *other.writes.lock()), (0, 0), "{why}");
        assert!(east.secret("clustermesh-remotes").is_none());
    }
    // No CA Secret: a message saying how to create it.
    let east = FakeApi::cluster("east", 1, 255, Some("203.0.113.10"));
    let west = FakeApi::cluster("west", 2, 255, Some("203.0.113.20"));
    west.objects
        .lock()
        .remove(&format!("/api/v1/namespaces/{NS}/secrets/clustermesh-ca"));
    let err = connect(
        (east.client(), placement(None)),
        (west.client(), placement(None)),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("kubectl create secret generic clustermesh-ca"));
    assert_eq!(*east.writes.lock(), 0);
}
