//! What the sync benchmarks share: a cluster directory with its CA and certificates, an
//! in-process apiserver, and bulk state written straight into an apiserver's store. Included
//! by `apiserver/benches/sync.rs` and `cli/benches/import.rs` (`#[path]`).

#![allow(dead_code, unreachable_pub, reason = "each benchmark uses part of it")]

use std::time::Duration;

use clustermesh_apiserver::{Config, Running};
use clustermesh_certs::{CertificateAuthority, ClientIdentity};
use clustermesh_kvstore::KvStore;
use clustermesh_model::ClusterName;

/// A cluster's directory: CA, server certificate, manifests, config.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub name: ClusterName,
    pub ca: CertificateAuthority,
}

impl Cluster {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster = ClusterName::new(name).unwrap();
        let ca = CertificateAuthority::generate(&cluster).unwrap();
        ca.cert().write(dir.path(), "ca").unwrap();
        ca.server_cert(&cluster, &[])
            .unwrap()
            .write(dir.path(), "server")
            .unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        Self {
            dir,
            name: cluster,
            ca,
        }
    }

    pub fn config(&self, id: u32, remotes: &str) -> Config {
        let yaml = format!(
            "cluster: {{name: {}, id: {id}}}\nstore: {{backend: sled, path: store}}\nsource: {{manifestDir: manifests}}\n\
             listen: {{export: \"127.0.0.1:0\", health: \"127.0.0.1:0\"}}\ntls: {{ca: ca.pem, cert: server.pem, key: server-key.pem}}\nallowedRemotes: [c1, c2, hub]\n{remotes}",
            self.name
        );
        let path = self.dir.path().join("apiserver.yaml");
        std::fs::write(&path, yaml).unwrap();
        Config::load(&path).unwrap()
    }

    /// The `remotes:` entry with which `peer` imports this cluster.
    pub fn entry_for(&self, peer: &Cluster, running: &Running, id: u32) -> String {
        let dir = peer.dir.path().join(format!("remote-{}", self.name));
        std::fs::create_dir_all(&dir).unwrap();
        self.ca.cert().write(&dir, "ca").unwrap();
        self.ca
            .client_cert(&ClientIdentity::Remote(peer.name.clone()))
            .unwrap()
            .write(&dir, "client")
            .unwrap();
        let d = dir.display();
        format!(
            "- {{name: {}, id: {id}, address: \"{}\", ca: {d}/ca.pem, cert: {d}/client.pem, key: {d}/client-key.pem}}\n",
            self.name, running.export_addr
        )
    }
}

/// Starts an apiserver in this process and waits until it is ready.
pub async fn start(config: Config) -> Running {
    let r = clustermesh_apiserver::start(config).await.unwrap();
    while !r.metrics.is_ready() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    r
}

/// An ipcache entry of the exported state.
pub fn ip_entry(i: u32, identity: u32) -> (String, Vec<u8>) {
    let ip = format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256);
    let v = format!(
        r#"{{"IP":"{ip}","ID":{identity},"HostIP":null,"K8sNamespace":"ns","K8sPodName":"p{i}","NamedPorts":[]}}"#
    );
    (format!("cilium/state/ip/v1/default/{ip}"), v.into_bytes())
}

/// This process's peak resident memory.
pub fn vm_hwm() -> String {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
        .unwrap_or_default()
}

/// Writes identities, ipcache entries and global services into an exporting store.
pub async fn fill(
    store: &dyn KvStore,
    cluster: &str,
    cluster_id: u32,
    endpoints: u32,
    services: u32,
    identities: u32,
    offset: u32,
) {
    let base = cluster_id << 16;
    for i in 0..identities {
        let labels = format!(
            "k8s:app=a{i};k8s:io.cilium.k8s.policy.cluster={cluster};k8s:io.kubernetes.pod.namespace=ns;"
        );
        store
            .put(
                &format!("cilium/state/identities/v1/id/{}", base + 1 + i),
                labels.as_bytes(),
                None,
            )
            .await
            .unwrap();
    }
    for i in 0..endpoints {
        let (k, v) = ip_entry(offset + i, base + 1 + i % identities.max(1));
        store.put(&k, &v, None).await.unwrap();
    }
    for s in 0..services {
        let v = format!(
            r#"{{"cluster":"{cluster}","namespace":"ns","name":"s{s}","frontends":{{"10.96.{}.{}":{{"http":{{"Protocol":"TCP","Port":80}}}}}},"backends":{{}},"labels":{{}},"selector":{{}},"includeExternal":true,"shared":true,"clusterID":{cluster_id}}}"#,
            s / 250,
            s % 250 + 1
        );
        store
            .put(
                &format!("cilium/state/services/v1/{cluster}/ns/s{s}"),
                v.as_bytes(),
                None,
            )
            .await
            .unwrap();
    }
}
