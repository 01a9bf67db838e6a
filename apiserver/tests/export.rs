//! The Export protocol over real mTLS on loopback: snapshot, Synced, ordered changes, resume,
//! Reset after compaction, heartbeats, and who may see what.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use std::time::Duration;

use clustermesh_certs::{CertificateAuthority, ClientIdentity};
use clustermesh_model::ClusterName;
use clustermesh_proto::Object;
use clustermesh_proto::v1::{self, Kind, WatchEvent, watch_event::Event as Ev};
use support::{TestCluster, tls_with};
use tonic::Streaming;

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod, annotations: {service.cilium.io/global: "true"}}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: private, namespace: prod}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: prod, labels: {app: web}}
status: {podIP: 10.1.0.5}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p1, namespace: prod}
spec: {endpointSelector: {}, ingress: [{}]}
"#;

fn c(n: &str) -> ClusterName {
    ClusterName::new(n).unwrap()
}

async fn next(s: &mut Streaming<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("no event within 10 s")
        .unwrap()
        .expect("stream ended")
}

/// The next event that is not a heartbeat.
async fn next_change(s: &mut Streaming<WatchEvent>) -> WatchEvent {
    loop {
        let e = next(s).await;
        if !matches!(e.event, Some(Ev::Heartbeat(_))) {
            return e;
        }
    }
}

/// Events up to and including Synced.
async fn snapshot(s: &mut Streaming<WatchEvent>) -> (Vec<Object>, i64) {
    let mut objects = Vec::new();
    loop {
        let e = next_change(s).await;
        match e.event {
            Some(Ev::Upsert(u)) => objects.push(Object::try_from(&u).unwrap()),
            Some(Ev::Synced(_)) => return (objects, e.revision),
            other => panic!("unexpected {other:?} in a snapshot"),
        }
    }
}

fn names(objects: &[Object]) -> Vec<String> {
    let mut n: Vec<String> = objects
        .iter()
        .map(|o| format!("{:?}/{}", o.reference().kind, o.reference().name))
        .collect();
    n.sort();
    n
}

/// A watch from revision 0, retried for 10 s while it is refused with `refusal` (any other
/// error fails the test); `None` if it never got through.
async fn watch_once_allowed(
    client: &mut v1::export_client::ExportClient<tonic::transport::Channel>,
    kinds: &[Kind],
    refusal: tonic::Code,
) -> Option<Streaming<WatchEvent>> {
    for _ in 0..100 {
        match client.watch(watch(kinds, 0)).await {
            Ok(s) => return Some(s.into_inner()),
            Err(e) => assert_eq!(e.code(), refusal, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn watch(kinds: &[Kind], since: i64) -> v1::WatchRequest {
    v1::WatchRequest {
        kinds: kinds.iter().map(|k| *k as i32).collect(),
        since_revision: since,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_synced_changes_resume_reset_and_heartbeats() {
    let cluster = TestCluster::new("c1", 1, None);
    cluster.write_manifest("all.yaml", SERVICES);
    let running = cluster.start().await;
    let mut client = cluster
        .client(&running, &ClientIdentity::Local(c("c1")))
        .await;

    let config = client
        .get_cluster_config(v1::GetClusterConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            config.name.as_str(),
            config.id,
            config.max_connected_clusters
        ),
        ("c1", 1, 255)
    );

    // From scratch: the snapshot, then Synced.
    let mut s = client
        .watch(watch(&[Kind::Services, Kind::Ipcache, Kind::Policies], 0))
        .await
        .unwrap()
        .into_inner();
    let (objects, synced_at) = snapshot(&mut s).await;
    assert_eq!(
        names(&objects),
        [
            "Ipcache/10.1.0.5",
            "Policies/prod/p1",
            "Services/prod/private",
            "Services/prod/web"
        ]
    );

    // Changes, in revision order.
    let store = running.store.clone();
    cluster.remove_manifest("all.yaml");
    let mut deleted = Vec::new();
    let mut last = synced_at;
    while deleted.len() < 4 {
        let e = next_change(&mut s).await;
        assert!(
            e.revision > last,
            "revisions must increase: {} after {last}",
            e.revision
        );
        last = e.revision;
        match e.event {
            Some(Ev::Delete(d)) => deleted.push(d.name),
            other => panic!("expected deletes, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, ["10.1.0.5", "prod/p1", "prod/private", "prod/web"]);

    // An idle stream carries heartbeats (every 200 ms in this config) with the last revision.
    let e = next(&mut s).await;
    assert!(matches!(e.event, Some(Ev::Heartbeat(_))), "{e:?}");
    drop(s);

    // Resuming from a recent revision replays only what was missed: no snapshot.
    cluster.write_manifest("all.yaml", SERVICES);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut s = client
        .watch(watch(&[Kind::Services], last))
        .await
        .unwrap()
        .into_inner();
    let mut upserts = Vec::new();
    while upserts.len() < 2 {
        let e = next_change(&mut s).await;
        assert!(e.revision > last);
        match e.event {
            Some(Ev::Upsert(u)) => upserts.push(Object::try_from(&u).unwrap()),
            other => panic!("expected only the missed upserts, got {other:?}"),
        }
    }
    assert_eq!(
        names(&upserts),
        ["Services/prod/private", "Services/prod/web"]
    );
    drop(s);

    // After a compaction past that revision: Reset, then a fresh snapshot and Synced.
    let head = store.current_revision().await.unwrap();
    store.compact(head).await.unwrap();
    let mut s = client
        .watch(watch(&[Kind::Services], last))
        .await
        .unwrap()
        .into_inner();
    let e = next_change(&mut s).await;
    assert!(matches!(e.event, Some(Ev::Reset(_))), "{e:?}");
    let (objects, _) = snapshot(&mut s).await;
    assert_eq!(
        names(&objects),
        ["Services/prod/private", "Services/prod/web"]
    );
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_clusters_see_only_exportable_state() {
    let cluster = TestCluster::new("c1", 1, None);
    cluster.write_manifest("all.yaml", SERVICES);
    let running = cluster.start().await;
    let mut remote = cluster
        .client(&running, &ClientIdentity::Remote(c("c2")))
        .await;

    // Only global, shared services are exported.
    let mut s = remote
        .watch(watch(
            &[Kind::Services, Kind::Identities, Kind::Ipcache, Kind::Nodes],
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    let (objects, _) = snapshot(&mut s).await;
    let n = names(&objects);
    assert!(n.contains(&"Services/prod/web".to_owned()), "{n:?}");
    assert!(!n.contains(&"Services/prod/private".to_owned()), "{n:?}");
    assert_eq!(n.iter().filter(|x| x.starts_with("Identities/")).count(), 1);

    // Policies and remote caches are not for remote clusters.
    for kind in [Kind::Policies, Kind::RemoteCache, Kind::ClusterStatus] {
        let err = remote
            .watch(watch(&[Kind::Services, kind], 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{kind:?}: {err}");
    }
    // A local certificate of another cluster, signed by this CA, is refused too.
    let mut foreign_local = cluster
        .client(&running, &ClientIdentity::Local(c("c9")))
        .await;
    let err = foreign_local
        .watch(watch(&[Kind::Services], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // Empty or unknown kinds are refused.
    let err = remote
        .watch(v1::WatchRequest {
            kinds: vec![],
            since_revision: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = remote
        .watch(v1::WatchRequest {
            kinds: vec![99],
            since_revision: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_and_plaintext_clients_are_refused() {
    let cluster = TestCluster::new("c1", 1, None);
    let running = cluster.start().await;
    let addr = running.export_addr.to_string();

    // A client certificate from another CA fails the handshake.
    let other = CertificateAuthority::generate(&c("c2")).unwrap();
    let cert = other.client_cert(&ClientIdentity::Local(c("c1"))).unwrap();
    let tls = tls_with(&cluster.ca, &cert, &c("c1"));
    let refused = match clustermesh_proto::client::connect(&addr, &tls).await {
        Err(_) => true,
        Ok(mut client) => client
            .get_cluster_config(v1::GetClusterConfigRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");

    // A server presenting a certificate of another cluster's CA is not trusted by our client.
    let wrong_ca = tls_with(
        &other,
        &cluster
            .ca
            .client_cert(&ClientIdentity::Local(c("c1")))
            .unwrap(),
        &c("c1"),
    );
    assert!(
        clustermesh_proto::client::connect(&addr, &wrong_ca)
            .await
            .is_err()
            || {
                let mut cl = clustermesh_proto::client::connect(&addr, &wrong_ca)
                    .await
                    .unwrap();
                cl.get_cluster_config(v1::GetClusterConfigRequest {})
                    .await
                    .is_err()
            }
    );

    // Plaintext gRPC is refused.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    let plaintext_refused = match channel {
        Err(_) => true,
        Ok(ch) => v1::export_client::ExportClient::new(ch)
            .get_cluster_config(v1::GetClusterConfigRequest {})
            .await
            .is_err(),
    };
    assert!(plaintext_refused);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_is_reset_without_slowing_the_others() {
    use clustermesh_model::endpoint::IpCacheEntry;
    use clustermesh_model::identity::Identity;
    // Enough data (about 20 MB of messages) to overflow every buffer between the server's
    // watcher and the client: HTTP/2 windows and send buffers, tonic's encoder, the channel.
    const N: usize = 60_000;
    let cluster = TestCluster::with_settings(
        "c1",
        1,
        None,
        "exportBufferEvents: 8\nexportLagTimeoutMillis: 300\n",
    );
    let running = cluster.start().await;
    let mut fast = cluster
        .client(&running, &ClientIdentity::Local(c("c1")))
        .await;
    let mut slow = cluster
        .client(&running, &ClientIdentity::Local(c("c1")))
        .await;
    let mut slow_stream = slow
        .watch(watch(&[Kind::Ipcache], 0))
        .await
        .unwrap()
        .into_inner();
    snapshot(&mut slow_stream).await;
    let mut fast_stream = fast
        .watch(watch(&[Kind::Ipcache], 0))
        .await
        .unwrap()
        .into_inner();
    snapshot(&mut fast_stream).await;

    let store = running.store.clone();
    let writer = tokio::spawn(async move {
        for i in 0..N {
            let ip = std::net::Ipv4Addr::from(0x0a_02_00_00u32 + u32::try_from(i).unwrap());
            let entry = IpCacheEntry {
                ip: ip.into(),
                identity: Identity::new(65_600).unwrap(),
                host_ip: None,
                namespace: "ns".into(),
                pod_name: format!("p{i}"),
                named_ports: vec![],
            };
            store
                .put(
                    &format!("cilium/state/ip/v1/default/{ip}"),
                    &serde_json::to_vec(&entry).unwrap(),
                    None,
                )
                .await
                .unwrap();
        }
    });
    // The fast watcher gets every change while the slow one reads nothing.
    let mut seen = 0;
    while seen < N {
        if let Some(Ev::Upsert(_)) = next(&mut fast_stream).await.event {
            seen += 1;
        }
    }
    writer.await.unwrap();
    // The slow one was reset: somewhere in what it buffered there is a Reset, then a full
    // snapshot of all N entries and Synced.
    // Heartbeats may sit among those events (a pause of the writer longer than the heartbeat
    // interval on a busy machine sends one), so only upserts are counted.
    let mut before = 0;
    loop {
        match next(&mut slow_stream).await.event {
            Some(Ev::Reset(_)) => break,
            Some(Ev::Upsert(_)) => before += 1,
            Some(Ev::Heartbeat(_)) => {}
            other => panic!("unexpected {other:?} after {before} upserts and no reset"),
        }
        assert!(
            before < N,
            "the slow watcher got every event: it was never behind"
        );
    }
    let (objects, _) = snapshot(&mut slow_stream).await;
    assert_eq!(objects.len(), N);
    let resets: u64 = running
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("clustermesh_export_resets_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(resets >= 1, "the reset was not counted");
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_global_namespaces_are_exported_and_a_change_resets_remote_streams() {
    let ns = |name: &str, global: &str| {
        format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, annotations: {{clustermesh.cilium.io/global: \"{global}\"}}}}\n"
        )
    };
    let dev = "---\napiVersion: v1\nkind: Service\nmetadata: {name: tool, namespace: dev, annotations: {service.cilium.io/global: \"true\"}}\nspec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: tool-0, namespace: dev, labels: {app: tool}}\nstatus: {podIP: 10.1.0.9}\n";
    // Not global by default; prod opts in, dev does not say.
    let cluster = TestCluster::with_settings("c1", 1, None, "globalNamespacesByDefault: false\n");
    cluster.write_manifest(
        "all.yaml",
        &format!("{SERVICES}{}{dev}", ns("prod", "true")),
    );
    let running = cluster.start().await;
    let kinds = [Kind::Services, Kind::Identities, Kind::Ipcache];
    let mut remote = cluster
        .client(&running, &ClientIdentity::Remote(c("c2")))
        .await;
    let mut s = remote.watch(watch(&kinds, 0)).await.unwrap().into_inner();
    let (objects, _) = snapshot(&mut s).await;
    let n = names(&objects);
    let (ids, rest): (Vec<_>, Vec<_>) = n.iter().partition(|x| x.starts_with("Identities/"));
    assert_eq!(
        rest,
        ["Ipcache/10.1.0.5", "Services/prod/web"],
        "dev stays home"
    );
    assert_eq!(ids.len(), 1, "only prod's identity: {n:?}");
    let prod_labels = objects.iter().find_map(|o| match o {
        Object::Identity { labels, .. } => labels.namespace().map(str::to_owned),
        _ => None,
    });
    assert_eq!(prod_labels.as_deref(), Some("prod"));
    // Local agents see every namespace.
    let mut local = cluster
        .client(&running, &ClientIdentity::Local(c("c1")))
        .await;
    let mut l = local.watch(watch(&kinds, 0)).await.unwrap().into_inner();
    let (objects, _) = snapshot(&mut l).await;
    assert!(names(&objects).contains(&"Services/dev/tool".to_owned()));
    assert!(names(&objects).contains(&"Ipcache/10.1.0.9".to_owned()));

    // dev opts in: the remote stream is reset and its new snapshot has dev's objects.
    cluster.write_manifest(
        "all.yaml",
        &format!("{SERVICES}{}{}{dev}", ns("prod", "true"), ns("dev", "true")),
    );
    let reset = loop {
        match next(&mut s).await.event {
            Some(Ev::Reset(r)) => break r,
            Some(Ev::Heartbeat(_)) => {}
            other => panic!("expected a Reset, got {other:?}"),
        }
    };
    assert!(reset.reason.contains("namespaces"), "{}", reset.reason);
    let (objects, _) = snapshot(&mut s).await;
    let n = names(&objects);
    assert!(n.contains(&"Services/dev/tool".to_owned()), "{n:?}");
    assert!(n.contains(&"Ipcache/10.1.0.9".to_owned()), "{n:?}");
    assert_eq!(n.iter().filter(|x| x.starts_with("Identities/")).count(), 2);

    // A value that is neither true nor false: the Namespace is reported and not used.
    cluster.write_manifest(
        "all.yaml",
        &format!(
            "{SERVICES}{}{}{dev}",
            ns("prod", "true"),
            ns("dev", "maybe")
        ),
    );
    let mut problems = String::new();
    for _ in 0..100 {
        problems = running.metrics.render();
        if problems.contains("clustermesh_source_problems 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        problems.contains("clustermesh_source_problems 1"),
        "{problems}"
    );
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_connected_remotes_may_watch_and_disconnect_revokes() {
    let cluster = TestCluster::with_settings(
        "c1",
        1,
        None,
        "allowedRemotes: []\nremotesDir: remotes\nremoteDrainGraceSeconds: 1\n",
    );
    let remotes = cluster.dir.path().join("remotes");
    std::fs::create_dir_all(&remotes).unwrap();
    cluster.write_manifest("all.yaml", SERVICES);
    let running = cluster.start().await;
    let kinds = [Kind::Services];

    // A certificate signed by the CA, of a cluster never connected: refused.
    let mut c2 = cluster
        .client(&running, &ClientIdentity::Remote(c("c2")))
        .await;
    let err = c2.watch(watch(&kinds, 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("not connected to c1"), "{err}");
    // A remote certificate with this cluster's own name: never.
    let mut own = cluster
        .client(&running, &ClientIdentity::Remote(c("c1")))
        .await;
    let err = own.watch(watch(&kinds, 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("own name"), "{err}");

    // Connected (a remotes file for c2, as `clustermesh connect` writes it): allowed.
    cluster.ca.cert().write(&remotes, "c2-ca").unwrap();
    cluster
        .ca
        .client_cert(&ClientIdentity::Remote(c("c1")))
        .unwrap()
        .write(&remotes, "c2-client")
        .unwrap();
    std::fs::write(
        remotes.join("c2.yaml"),
        "name: c2\nid: 2\naddress: \"127.0.0.1:9\"\nca: c2-ca.pem\ncert: c2-client.pem\nkey: c2-client-key.pem\n",
    )
    .unwrap();
    let mut stream = watch_once_allowed(&mut c2, &kinds, tonic::Code::PermissionDenied)
        .await
        .expect("c2 allowed once connected");
    let (objects, _) = snapshot(&mut stream).await;
    assert_eq!(names(&objects), ["Services/prod/web"]);

    // Disconnected: the open stream ends with the refusal, and new requests fail.
    std::fs::remove_file(remotes.join("c2.yaml")).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended without saying why"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream of a disconnected cluster ends");
    assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended}");
    assert!(ended.message().contains("c2 was disconnected"), "{ended}");
    let err = c2.watch(watch(&kinds, 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let metrics = support::http_get(running.health_addr, "/metrics").await;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("clustermesh_export_refused_remotes_total ")
                && l.split(' ').nth(1).and_then(|v| v.parse::<f64>().ok()) >= Some(2.0)
        ),
        "{metrics}"
    );
    running.stop().await.unwrap();
}

/// Every event a remote stream carries until `until` matches, Synced and heartbeats aside.
async fn events_until(s: &mut Streaming<WatchEvent>, until: impl Fn(&Ev) -> bool) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let e = next_change(s).await;
        let Some(ev) = e.event else { continue };
        let stop = until(&ev);
        match &ev {
            Ev::Upsert(u) => {
                let o = Object::try_from(u).unwrap();
                let what = match &o {
                    Object::Identity { labels, .. } => {
                        format!("upsert identity of {}", labels.namespace().unwrap_or("-"))
                    }
                    _ => format!("upsert {:?}/{}", o.reference().kind, o.reference().name),
                };
                seen.push(what);
            }
            Ev::Delete(d) => seen.push(format!("delete {}/{}", d.kind, d.name)),
            Ev::Reset(_) => seen.push("reset".into()),
            Ev::Synced(_) | Ev::Heartbeat(_) => {}
        }
        if stop {
            return seen;
        }
    }
}

fn is_upsert_of(ev: &Ev, name: &str) -> bool {
    matches!(ev, Ev::Upsert(u) if Object::try_from(u).unwrap().reference().name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remotes_never_hear_of_objects_they_were_never_sent() {
    let secret = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: secret, annotations: {clustermesh.cilium.io/global: \"false\"}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: vault-0, namespace: secret, labels: {app: vault}}\nstatus: {podIP: 10.1.0.66}\n";
    let marker = |n: u8| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{n}, namespace: prod, labels: {{app: web}}}}\nstatus: {{podIP: 10.1.0.{n}}}\n"
        )
    };
    let cluster = TestCluster::new("c1", 1, None);
    cluster.write_manifest("all.yaml", SERVICES);
    let running = cluster.start().await;
    let kinds = [Kind::Services, Kind::Identities, Kind::Ipcache];
    let mut remote = cluster
        .client(&running, &ClientIdentity::Remote(c("c2")))
        .await;
    let mut s = remote.watch(watch(&kinds, 0)).await.unwrap().into_inner();
    snapshot(&mut s).await;

    // A non-global namespace arrives together with its pod: the stream is reset (the
    // exported namespaces changed) and nothing of the namespace is sent, before or after.
    cluster.write_manifest("all.yaml", &format!("{SERVICES}{secret}{}", marker(20)));
    let first = next_change(&mut s).await;
    assert!(
        matches!(&first.event, Some(Ev::Reset(r)) if r.reason.contains("namespaces")),
        "{first:?}"
    );
    // The new snapshot, and the marker (in it or after it: the pod may be written later).
    let mut seen = events_until(&mut s, |ev| matches!(ev, Ev::Synced(_))).await;
    if !seen.contains(&"upsert Ipcache/10.1.0.20".to_owned()) {
        seen.extend(events_until(&mut s, |ev| is_upsert_of(ev, "10.1.0.20")).await);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "upsert Ipcache/10.1.0.20",
            "upsert Ipcache/10.1.0.5",
            "upsert Services/prod/web",
            "upsert identity of prod",
        ]
    );
    let (_, settled) = {
        // A second stream, resumed later, starts from here.
        let mut fresh = remote.watch(watch(&kinds, 0)).await.unwrap().into_inner();
        snapshot(&mut fresh).await
    };

    // The non-global service and the secret pod go: no Delete names them.
    let without = SERVICES.replace(
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: private, namespace: prod}\nspec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}\n",
        "",
    );
    assert_ne!(without, SERVICES);
    let secret_ns_only = secret
        .split("---\napiVersion: v1\nkind: Pod")
        .next()
        .unwrap();
    cluster.write_manifest(
        "all.yaml",
        &format!("{without}{secret_ns_only}{}{}", marker(20), marker(21)),
    );
    let seen = events_until(&mut s, |ev| is_upsert_of(ev, "10.1.0.21")).await;
    assert_eq!(seen, ["upsert Ipcache/10.1.0.21"]);
    // The secret identity is released after its grace (1 s): no Delete names it either.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cluster.write_manifest(
        "all.yaml",
        &format!(
            "{without}{secret_ns_only}{}{}{}",
            marker(20),
            marker(21),
            marker(22)
        ),
    );
    let seen = events_until(&mut s, |ev| is_upsert_of(ev, "10.1.0.22")).await;
    assert_eq!(seen, ["upsert Ipcache/10.1.0.22"]);
    let secret_identities = running
        .store
        .list("cilium/state/identities/v1/id/")
        .await
        .unwrap()
        .kvs
        .iter()
        .filter(|kv| String::from_utf8_lossy(&kv.value).contains("secret"))
        .count();
    assert_eq!(secret_identities, 0, "the secret identity was released");

    // A remote that resumes from before those deletes, through the history: the same.
    let mut resumed = remote
        .watch(watch(&kinds, settled))
        .await
        .unwrap()
        .into_inner();
    let seen = events_until(&mut resumed, |ev| is_upsert_of(ev, "10.1.0.22")).await;
    assert_eq!(
        seen,
        ["upsert Ipcache/10.1.0.21", "upsert Ipcache/10.1.0.22"]
    );

    // A resume from the start of the history (before the namespace filter was set) gets a new
    // snapshot instead of the history.
    let mut replay = remote.watch(watch(&kinds, 1)).await.unwrap().into_inner();
    let first = next_change(&mut replay).await;
    assert!(
        matches!(&first.event, Some(Ev::Reset(r)) if r.reason.contains("namespaces")),
        "{first:?}"
    );
    let (objects, _) = snapshot(&mut replay).await;
    let n = names(&objects);
    assert!(
        !n.iter()
            .any(|x| x.contains("10.1.0.66") || x.contains("private")),
        "{n:?}"
    );
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_holds_at_most_its_share_of_streams_and_local_agents_are_not_capped() {
    let cluster = TestCluster::with_settings("c1", 1, None, "exportMaxStreamsPerRemote: 3\n");
    cluster.write_manifest("all.yaml", SERVICES);
    let running = cluster.start().await;
    let kinds = [Kind::Services];
    let mut c2 = cluster
        .client(&running, &ClientIdentity::Remote(c("c2")))
        .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = c2.watch(watch(&kinds, 0)).await.unwrap().into_inner();
        snapshot(&mut s).await;
        open.push(s);
    }
    let err = c2.watch(watch(&kinds, 0)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("exportMaxStreamsPerRemote"), "{err}");
    // Another remote and the local agents are not affected.
    let mut c3 = cluster
        .client(&running, &ClientIdentity::Remote(c("c3")))
        .await;
    let mut s3 = c3.watch(watch(&kinds, 0)).await.unwrap().into_inner();
    snapshot(&mut s3).await;
    let mut local = cluster
        .client(&running, &ClientIdentity::Local(c("c1")))
        .await;
    for _ in 0..5 {
        let mut s = local.watch(watch(&kinds, 0)).await.unwrap().into_inner();
        snapshot(&mut s).await;
        open.push(s);
    }
    // A stream that ends frees its slot.
    drop(open.remove(0));
    let mut again = watch_once_allowed(&mut c2, &kinds, tonic::Code::ResourceExhausted)
        .await
        .expect("a slot is free again");
    snapshot(&mut again).await;
    // Counted: the refusal above, and any retry made before the slot was free.
    let metrics = running.metrics.render();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("clustermesh_export_streams_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{metrics}");
    running.stop().await.unwrap();
}
