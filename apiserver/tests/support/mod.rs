//! A test cluster: certificates, a manifest directory, a config, a running apiserver on
//! loopback ports, and Export clients with chosen certificates.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses part of the harness"
)]
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a panic is the failure report"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use clustermesh_apiserver::config::StoreConfig;
use clustermesh_apiserver::{Config, Running};
use clustermesh_certs::{CertificateAuthority, ClientIdentity, IssuedCert};
use clustermesh_model::ClusterName;
use clustermesh_proto::client::{ClientTls, connect, server_name};
use clustermesh_proto::v1::export_client::ExportClient;
use tempfile::TempDir;
use tonic::transport::Channel;

pub struct TestCluster {
    pub dir: TempDir,
    pub name: ClusterName,
    pub ca: CertificateAuthority,
    pub config: Config,
}

impl TestCluster {
    /// A cluster whose store is the embedded one (or `store` when given).
    pub fn new(name: &str, id: u32, store: Option<StoreConfig>) -> Self {
        Self::with_settings(name, id, store, "")
    }

    /// Like [`TestCluster::new`], with extra top-level configuration lines.
    pub fn with_settings(name: &str, id: u32, store: Option<StoreConfig>, extra: &str) -> Self {
        Self::full(name, id, store, extra, 0)
    }

    /// Everything: extra configuration lines and a fixed Export port (0: any).
    pub fn full(
        name: &str,
        id: u32,
        store: Option<StoreConfig>,
        extra: &str,
        export_port: u16,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster = ClusterName::new(name).unwrap();
        let ca = CertificateAuthority::generate(&cluster).unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        ca.cert().write(&certs, "ca").unwrap();
        ca.server_cert(&cluster, &["127.0.0.1".into()])
            .unwrap()
            .write(&certs, "server")
            .unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        let store_yaml = match &store {
            None => "{backend: sled, path: store}".to_owned(),
            Some(StoreConfig::Etcd {
                endpoints,
                max_txn_ops,
                ..
            }) => {
                let limit = max_txn_ops.map(|n| format!(", maxTxnOps: {n}"));
                format!(
                    "{{backend: etcd, endpoints: [{}]{}}}",
                    endpoints.join(","),
                    limit.unwrap_or_default()
                )
            }
            Some(StoreConfig::Sled { path }) => {
                format!("{{backend: sled, path: {}}}", path.display())
            }
        };
        // The tests' remote clients (`remote-c2`, ...) may import unless a test says otherwise.
        let allowed = if extra.contains("allowedRemotes") {
            ""
        } else {
            "allowedRemotes: [c1, c2, c3, c4]\n"
        };
        let yaml = format!(
            "cluster: {{name: {name}, id: {id}}}\nstore: {store_yaml}\nsource: {{manifestDir: manifests}}\n\
             listen: {{export: \"127.0.0.1:{export_port}\", health: \"127.0.0.1:0\"}}\n\
             tls: {{ca: certs/ca.pem, cert: certs/server.pem, key: certs/server-key.pem}}\nheartbeatMillis: 200\nidentityGraceSeconds: 1\n{allowed}{extra}"
        );
        let path = dir.path().join("apiserver.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = Config::load(&path).unwrap();
        Self {
            dir,
            name: cluster,
            ca,
            config,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("apiserver.yaml")
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn write_manifest(&self, file: &str, text: &str) {
        // Write then rename, as a deploy tool would, so the poller never sees half a file.
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.manifests().join(file)).unwrap();
    }

    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifests().join(file)).unwrap();
    }

    pub async fn start(&self) -> Running {
        let running = clustermesh_apiserver::start(self.config.clone())
            .await
            .unwrap();
        wait_for(|| running.metrics.is_ready(), "the apiserver to be ready").await;
        running
    }

    /// Rewrites the config with `extra` lines (e.g. remotes) and reloads it.
    pub fn reconfigure(&mut self, extra: &str) {
        let path = self.config_path();
        let base = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{base}{extra}")).unwrap();
        self.config = Config::load(&path).unwrap();
    }

    /// Mints, with this cluster's CA, the `remote-<peer>` certificate `peer` uses to import
    /// this cluster, and writes it with this CA into `peer`'s directory; returns the
    /// `remotes:` entry for `peer`'s config.
    pub fn remote_entry_for(&self, peer: &TestCluster, address: &str, id: u32) -> String {
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
            "- {{name: {}, id: {id}, address: \"{address}\", ca: {d}/ca.pem, cert: {d}/client.pem, key: {d}/client-key.pem}}\n",
            self.name
        )
    }

    pub fn client_tls(&self, who: &ClientIdentity) -> ClientTls {
        let cert = self.ca.client_cert(who).unwrap();
        tls_with(&self.ca, &cert, &self.name)
    }

    pub async fn client(&self, running: &Running, who: &ClientIdentity) -> ExportClient<Channel> {
        connect(&running.export_addr.to_string(), &self.client_tls(who))
            .await
            .unwrap()
    }
}

pub fn tls_with(
    server_ca: &CertificateAuthority,
    cert: &IssuedCert,
    cluster: &ClusterName,
) -> ClientTls {
    ClientTls {
        ca_pem: server_ca.cert().cert_pem.clone(),
        cert_pem: cert.cert_pem.clone(),
        key_pem: cert.key_pem.clone(),
        server_name: server_name(cluster.as_str()),
    }
}

pub async fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after 10 s waiting for {what}");
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A plain HTTP/1.0 GET against the health server; the whole response.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
