//! Test harness shared by every crate's tests: a real etcd server (Debian's `etcd-server`)
//! on free loopback ports with a temporary data dir, optionally with mTLS, stopped on drop.
//!
//! A test that needs etcd fails loudly when the binary is missing, naming the package.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::etcd::{EtcdConfig, EtcdStore, EtcdTls};

/// Where to look for etcd: `$CLUSTERMESH_ETCD_BIN`, else `etcd` on `PATH`.
pub fn etcd_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("CLUSTERMESH_ETCD_BIN") {
        return PathBuf::from(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "etcd is not installed: these tests run against a real etcd server. \
                 Install it with `apt-get install etcd-server` (Debian), or set \
                 CLUSTERMESH_ETCD_BIN to an etcd 3.4+ binary. `.ci/run` installs it."
            )
        })
}

/// A free TCP port on 127.0.0.1, never handed out twice by this process (the kernel would
/// happily return a just-released port again). Another process may still take it before
/// the server binds it; [`EtcdServer`] retries with new ports then.
pub fn free_port() -> u16 {
    static GIVEN: parking_lot::Mutex<BTreeSet<u16>> = parking_lot::Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding 127.0.0.1:0 must work on a machine that runs tests");
        if GIVEN.lock().insert(port) {
            return port;
        }
    }
}

/// PEM files for an etcd server and one client, all signed by one CA.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server certificate (SANs 127.0.0.1 and localhost).
    pub server_cert: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
    /// A client certificate the server trusts.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

/// A running etcd server, killed on drop.
pub struct EtcdServer {
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<TlsFiles>,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd with plain connections and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts etcd requiring client certificates signed by `tls.ca`.
    pub async fn start_with_tls(tls: TlsFiles) -> Self {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<TlsFiles>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("clustermesh-etcd-")
            .tempdir()
            .expect("creating a temp dir must work");
        let mut server = Self {
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            tls,
            child: None,
        };
        for _ in 0..5 {
            match server.launch().await {
                Launch::Ready => return server,
                Launch::PortTaken => {
                    server.client_port = free_port();
                    server.peer_port = free_port();
                }
            }
        }
        panic!(
            "etcd found its ports taken five times in a row\n{}",
            server.log()
        );
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// A store config for this server (with the client certificate when TLS is on).
    pub fn config(&self) -> EtcdConfig {
        let mut config = EtcdConfig::new([self.endpoint()]);
        config.tls = self.tls.as_ref().map(|t| EtcdTls {
            ca: t.ca.clone(),
            cert: t.client_cert.clone(),
            key: t.client_key.clone(),
        });
        config
    }

    /// A connected store.
    pub async fn store(&self) -> EtcdStore {
        EtcdStore::connect(&self.config())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connecting to the test etcd at {} failed: {e:?}\n{}",
                    self.endpoint(),
                    self.log()
                )
            })
    }

    /// Stops etcd (SIGKILL, as a crash would) and starts it again on the same data dir and
    /// ports.
    pub async fn restart(&mut self) {
        self.stop();
        if let Launch::PortTaken = self.launch().await {
            panic!(
                "etcd's port {} was taken while it restarted\n{}",
                self.client_port,
                self.log()
            );
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        format!(
            "etcd log (last lines):\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn launch(&mut self) -> Launch {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("the etcd log file must be writable");
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd_binary());
        cmd.arg("--name=default")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log);
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.server_cert.display()))
                .arg(format!("--key-file={}", t.server_key.display()))
                .arg(format!("--trusted-ca-file={}", t.ca.display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} failed: {e}", etcd_binary().display()));
        self.child = Some(child);
        for _ in 0..100 {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = self.log();
                if log.contains("address already in use") {
                    self.child = None;
                    return Launch::PortTaken;
                }
                panic!("etcd exited during start-up with {status}\n{log}");
            }
            let mut config = self.config();
            config.connect_timeout = Duration::from_millis(500);
            if EtcdStore::connect(&config).await.is_ok() {
                return Launch::Ready;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "etcd did not answer on {} within 10 s\n{}",
            self.endpoint(),
            self.log()
        );
    }
}

enum Launch {
    Ready,
    PortTaken,
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real etcd cluster of several members on loopback (plain connections), each member a
/// process that can be killed and started again: leader loss, quorum loss and return. Every
/// member is killed on drop.
pub struct EtcdCluster {
    dir: TempDir,
    members: Vec<Member>,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers (has quorum).
    pub async fn start(size: usize) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("clustermesh-etcd-cluster-")
            .tempdir()
            .expect("creating a temp dir must work");
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = Self { dir, members };
        for i in 0..size {
            cluster.launch(i);
        }
        cluster.wait_for_quorum().await;
        cluster
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Kills member `i` (SIGKILL, as a crash would).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i);
    }

    /// The index of the current leader, as a running member reports it.
    pub async fn leader(&self) -> usize {
        for _ in 0..100 {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                let url = format!("http://127.0.0.1:{}", m.client_port);
                let Ok(mut client) = etcd_client::Client::connect([url], None).await else {
                    continue;
                };
                let Ok(status) = client.status().await else {
                    continue;
                };
                let me = status.header().map(|h| h.member_id());
                if me == Some(status.leader()) {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no member reports itself the leader within 10 s\n{}",
            self.log()
        );
    }

    /// Waits until the cluster answers a linearizable read.
    pub async fn wait_for_quorum(&self) {
        for _ in 0..200 {
            let mut config = EtcdConfig::new(self.endpoints());
            config.connect_timeout = Duration::from_millis(500);
            config.request_timeout = Duration::from_secs(1);
            if EtcdStore::connect(&config).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the etcd cluster did not answer within 20 s\n{}",
            self.log()
        );
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn log(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            out.push_str(&format!(
                "--- {} (last lines)\n{}\n",
                m.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        out
    }

    fn launch(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("the etcd log file must be writable");
        let client_url = format!("http://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(etcd_binary())
            .arg(format!("--name={}", m.name))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join(&m.name).display()
            ))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=clustermesh-test")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} failed: {e}", etcd_binary().display()));
        self.members[i].child = Some(child);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
