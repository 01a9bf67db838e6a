//! Object size limits (`limits.maxObjectBytes`): an oversized object is refused at the source
//! (reported; the rest written), a stored value larger than the limit is never sent (the
//! stream, a resume through the history and a new snapshot all carry on), and an object the
//! store itself refuses (etcd's request limit) does not stop the writer.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::time::Duration;

use clustermesh_apiserver::config::StoreConfig;
use clustermesh_certs::ClientIdentity;
use clustermesh_kvstore::testing::EtcdServer;
use clustermesh_model::ClusterName;
use clustermesh_model::keys::Key;
use clustermesh_proto::Object;
use clustermesh_proto::v1::{self, Kind, WatchEvent, watch_event::Event as Ev};
use support::{TestCluster, http_get};
use tonic::Streaming;

fn c(n: &str) -> ClusterName {
    ClusterName::new(n).unwrap()
}

fn node(name: &str, ip: &str, label_bytes: usize) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{big: \"{}\"}}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n",
        "x".repeat(label_bytes)
    )
}

/// A pod whose label set encodes to more than 64 KiB (every label is valid).
fn pod_with_many_labels() -> String {
    let labels: Vec<String> = (0..10_000).map(|i| format!("l{i}: v")).collect();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: heavy, namespace: prod, labels: {{{}}}}}\nstatus: {{podIP: 10.1.0.9}}\n",
        labels.join(", ")
    )
}

const POD: &str = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: prod, labels: {app: web}}\nstatus: {podIP: 10.1.0.5}\n";

/// The next event that is not a heartbeat, within 10 s.
async fn next_change(s: &mut Streaming<WatchEvent>) -> WatchEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let e = tokio::time::timeout_at(deadline, s.message())
            .await
            .expect("no change within 10 s")
            .unwrap()
            .expect("stream ended");
        if !matches!(e.event, Some(Ev::Heartbeat(_))) {
            return e;
        }
    }
}

/// What the upserts up to Synced name.
async fn snapshot_names(s: &mut Streaming<WatchEvent>) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        match next_change(s).await.event {
            Some(Ev::Upsert(u)) => {
                let o = Object::try_from(&u).unwrap();
                // Identity numbers are the allocator's: one identity, whatever its number.
                names.push(match o {
                    Object::Identity { .. } => "Identities".to_owned(),
                    _ => format!("{:?}/{}", o.reference().kind, o.reference().name),
                });
            }
            Some(Ev::Synced(_)) => return names,
            other => panic!("unexpected {other:?} in a snapshot"),
        }
    }
}

fn watch(since: i64) -> v1::WatchRequest {
    v1::WatchRequest {
        kinds: [Kind::Nodes, Kind::Identities, Kind::Ipcache]
            .iter()
            .map(|k| *k as i32)
            .collect(),
        since_revision: since,
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_object_is_refused_at_the_source_and_never_sent() {
    let cluster = TestCluster::with_settings("c1", 1, None, "limits: {maxObjectBytes: 65536}\n");
    let text = [
        node("small", "192.0.2.1", 10),
        node("huge", "192.0.2.2", 100_000),
        pod_with_many_labels(),
        POD.to_owned(),
    ]
    .concat();
    cluster.write_manifest("all.yaml", &text);
    let running = cluster.start().await;
    // The huge node and the heavy pod's identity are refused and reported; the rest is written.
    let node_key = |n: &str| {
        Key::Node {
            cluster: c("c1"),
            name: n.into(),
        }
        .to_string()
    };
    assert!(
        running
            .store
            .get(&node_key("small"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        running
            .store
            .get(&node_key("huge"))
            .await
            .unwrap()
            .is_none()
    );
    let ipcache: Vec<String> = running
        .store
        .list("cilium/state/ip/v1/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(ipcache, ["cilium/state/ip/v1/default/10.1.0.5"]);
    let metrics = http_get(running.health_addr, "/metrics").await;
    assert_eq!(metric(&metrics, "clustermesh_source_problems"), 2.0);

    // A value over the limit that reached the store anyway (another writer, an older limit):
    // never sent, and the stream goes on. First a small version that every client holds.
    let mut agent = cluster
        .client(&running, &ClientIdentity::Local(c("c1")))
        .await;
    let mut s = agent.watch(watch(0)).await.unwrap().into_inner();
    let mut first = snapshot_names(&mut s).await;
    first.sort();
    assert_eq!(first, ["Identities", "Ipcache/10.1.0.5", "Nodes/small"]);
    let mut remote = cluster
        .client(&running, &ClientIdentity::Remote(c("c2")))
        .await;
    let mut r = remote.watch(watch(0)).await.unwrap().into_inner();
    snapshot_names(&mut r).await;
    let small = running
        .store
        .get(&node_key("small"))
        .await
        .unwrap()
        .unwrap();
    let mut planted: serde_json::Value = serde_json::from_slice(&small.value).unwrap();
    planted["Name"] = "planted".into();
    running
        .store
        .put(&node_key("planted"), planted.to_string().as_bytes(), None)
        .await
        .unwrap();
    for stream in [&mut s, &mut r] {
        match next_change(stream).await.event {
            Some(Ev::Upsert(u)) => {
                assert_eq!(Object::try_from(&u).unwrap().reference().name, "planted")
            }
            other => panic!("expected the small planted node, got {other:?}"),
        }
    }
    planted["Labels"]["pad"] = "x".repeat(100_000).into();
    running
        .store
        .put(&node_key("planted"), planted.to_string().as_bytes(), None)
        .await
        .unwrap();
    cluster.write_manifest(
        "all.yaml",
        &[text.clone(), node("after", "192.0.2.3", 10)].concat(),
    );
    // The agent keeps the version it has; the remote is told to drop it.
    let name_of = |e: WatchEvent| match e.event {
        Some(Ev::Upsert(u)) => format!("upsert {}", Object::try_from(&u).unwrap().reference().name),
        Some(Ev::Delete(d)) => format!("delete {}", d.name),
        other => format!("{other:?}"),
    };
    assert_eq!(name_of(next_change(&mut s).await), "upsert after");
    assert_eq!(name_of(next_change(&mut r).await), "delete planted");
    assert_eq!(name_of(next_change(&mut r).await), "upsert after");
    // A resume through the history and a new snapshot skip it too: the history holds the
    // small version only.
    let mut replay = agent.watch(watch(1)).await.unwrap().into_inner();
    let mut replayed = Vec::new();
    while replayed.last().map(String::as_str) != Some("upsert after") {
        replayed.push(name_of(next_change(&mut replay).await));
    }
    assert_eq!(
        replayed.iter().filter(|n| *n == "upsert planted").count(),
        1,
        "{replayed:?}"
    );
    let mut fresh = agent.watch(watch(0)).await.unwrap().into_inner();
    let mut names = snapshot_names(&mut fresh).await;
    names.sort();
    assert_eq!(
        names,
        [
            "Identities",
            "Ipcache/10.1.0.5",
            "Nodes/after",
            "Nodes/small"
        ]
    );
    let metrics = http_get(running.health_addr, "/metrics").await;
    assert!(metric(&metrics, "clustermesh_export_oversized_values_total") >= 3.0);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_etcd_refuses_does_not_stop_the_writer() {
    let etcd = EtcdServer::start().await;
    // A limit above etcd's own (1.5 MiB): etcd refuses the object, the writer goes on.
    let cluster = TestCluster::with_settings(
        "c1",
        1,
        Some(StoreConfig::Etcd {
            endpoints: vec![etcd.endpoint()],
            tls: None,
            max_txn_ops: None,
            max_txn_bytes: None,
        }),
        "limits: {maxObjectBytes: 4194304}\n",
    );
    let nodes = |with_a: bool| {
        let mut text = String::new();
        if with_a {
            text.push_str(&node("a", "192.0.2.1", 10));
        }
        text.push_str(&node("m-big", "192.0.2.2", 1_800_000));
        text.push_str(&node("z", "192.0.2.3", 10));
        text
    };
    cluster.write_manifest("nodes.yaml", &nodes(true));
    let running = cluster.start().await;
    let names = || async {
        let mut n: Vec<String> = running
            .store
            .list("cilium/state/nodes/v1/c1/")
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key.rsplit('/').next().unwrap().to_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names().await, ["a", "z"]);
    let metrics = http_get(running.health_addr, "/metrics").await;
    assert_eq!(metric(&metrics, "clustermesh_source_problems"), 1.0);
    // Later deletes are written too.
    cluster.write_manifest("nodes.yaml", &nodes(false));
    for _ in 0..200 {
        if names().await == ["z"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(names().await, ["z"]);
    running.stop().await.unwrap();
}
