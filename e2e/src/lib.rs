//! The end-to-end harness: clusters of real `clustermesh` processes on loopback, each with
//! its CA, certificates, embedded store and manifest directory; agents on the eBPF datapath
//! in network namespaces built by [`clustermesh_bpf::testing::Topology`].
//!
//! The binaries (`clustermesh`, `cm-netprobe`) are the ones `cargo test --workspace` builds
//! next to this test's executable; the harness fails loudly when they are missing.
//!
//! Network safety: apiservers and agents listen on 127.0.0.1; pods live in namespaces the
//! test creates, linked only to the test's node namespace.

#![allow(
    clippy::unwrap_used,
    reason = "a test harness: a failed step is the failure report"
)]
#![allow(clippy::disallowed_methods, reason = "no async runtime here")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clustermesh_certs::{CertificateAuthority, ClientIdentity};
use clustermesh_model::ClusterName;

pub use clustermesh_bpf::testing::Topology;

pub mod otlp;

/// A binary built by the workspace, next to the running test's `deps/` directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo test --workspace` or `cargo build -p clustermesh -p clustermesh-bpf`)",
        path.display()
    );
    path
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET; status code and body.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a `clustermesh` subcommand and returns it with the last word of its first stdout
/// line (the address it prints once serving).
fn spawn(args: &[&str], config: &Path, log: &Path, env: &[(String, String)]) -> (Child, String) {
    let mut child = Command::new(binary("clustermesh"))
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        !line.is_empty(),
        "clustermesh {args:?} exited before serving: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    let addr = line.trim().rsplit(' ').next().unwrap().to_owned();
    (child, addr)
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// One cluster: its directory, CA and certificates, and its apiserver process.
pub struct Cluster {
    /// The cluster's directory.
    pub dir: tempfile::TempDir,
    /// Its name.
    pub name: ClusterName,
    /// Its ID.
    pub id: u32,
    ca: CertificateAuthority,
    /// The Export address, fixed so that restarts keep it.
    pub export_addr: String,
    extra: String,
    /// Environment variables of the apiserver process.
    env: Vec<(String, String)>,
    /// The apiserver's heartbeat interval (200 ms unless set before it starts).
    pub heartbeat_millis: u64,
    apiserver: Option<(Child, String)>,
}

impl Cluster {
    /// A new cluster with its CA, server certificate and an empty manifest directory.
    pub fn new(name: &str, id: u32) -> Self {
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
        ca.client_cert(&ClientIdentity::Local(cluster.clone()))
            .unwrap()
            .write(&certs, "local")
            .unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        Self {
            dir,
            name: cluster,
            id,
            ca,
            export_addr: format!("127.0.0.1:{}", free_port()),
            extra: String::new(),
            env: Vec::new(),
            heartbeat_millis: 200,
            apiserver: None,
        }
    }

    /// Adds lines to the apiserver's configuration (before it starts).
    pub fn configure(&mut self, yaml: &str) {
        self.extra.push_str(yaml);
    }

    /// Sets an environment variable of the apiserver process (before it starts).
    pub fn env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Makes this cluster import `other`: mints the `remote-<this>` certificate with
    /// `other`'s CA and adds the `remotes:` entry.
    pub fn import(&mut self, other: &Cluster) {
        let dir = self.dir.path().join(format!("remote-{}", other.name));
        std::fs::create_dir_all(&dir).unwrap();
        other.ca.cert().write(&dir, "ca").unwrap();
        other
            .ca
            .client_cert(&ClientIdentity::Remote(self.name.clone()))
            .unwrap()
            .write(&dir, "client")
            .unwrap();
        let d = dir.display();
        if !self.extra.contains("remotes:\n") {
            self.extra.push_str("remotes:\n");
        }
        self.extra.push_str(&format!(
            "- {{name: {}, id: {}, address: \"{}\", ca: {d}/ca.pem, cert: {d}/client.pem, key: {d}/client-key.pem}}\n",
            other.name, other.id, other.export_addr
        ));
    }

    /// Writes a manifest file atomically (write, then rename).
    pub fn write_manifest(&self, file: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("manifests").join(file)).unwrap();
    }

    /// Starts the apiserver process and waits until it is ready.
    pub fn start(&mut self) {
        let config = self.dir.path().join("apiserver.yaml");
        std::fs::write(
            &config,
            format!(
                "cluster: {{name: {}, id: {}}}\nstore: {{backend: sled, path: store}}\nsource: {{manifestDir: manifests}}\n\
                 listen: {{export: \"{}\", health: \"127.0.0.1:0\"}}\n\
                 tls: {{ca: certs/ca.pem, cert: certs/server.pem, key: certs/server-key.pem}}\nheartbeatMillis: {}\n{}",
                self.name, self.id, self.export_addr, self.heartbeat_millis, self.extra
            ),
        )
        .unwrap();
        let log = self.dir.path().join("apiserver.log");
        let (child, health) = spawn(&["apiserver"], &config, &log, &self.env);
        wait_until(Duration::from_secs(30), "the apiserver to be ready", || {
            http_get(&health, "/readyz").is_some_and(|(code, _)| code == 200)
        });
        self.apiserver = Some((child, health));
    }

    /// The apiserver's process ID.
    pub fn pid(&self) -> u32 {
        self.apiserver.as_ref().expect("started").0.id()
    }

    /// The apiserver's health address.
    pub fn health_addr(&self) -> &str {
        &self.apiserver.as_ref().expect("started").1
    }

    /// Freezes the apiserver (SIGSTOP): a hung peer, whose connections stay open.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen apiserver run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some((child, _)) = &self.apiserver {
            let status = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "kill {sig} failed");
        }
    }

    /// Kills the apiserver with SIGKILL.
    pub fn kill(&mut self) {
        if let Some((mut child, _)) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The agent configuration for `node` of this cluster on the eBPF datapath of `topo`
    /// (the node namespace holds the endpoints' interfaces; the topology's cgroup gets
    /// socket load balancing).
    pub fn agent_config(&self, node: &str, topo: &Topology) -> PathBuf {
        let certs = self.dir.path().join("certs");
        let path = self.dir.path().join(format!("agent-{node}.yaml"));
        std::fs::write(
            &path,
            format!(
                "cluster: {}\nnodeName: {node}\napiserver: {{address: \"{}\", ca: {c}/ca.pem, cert: {c}/local.pem, key: {c}/local-key.pem}}\n\
                 datapath: bpf\nbpf: {{root: {}, cgroup: {}, endpointNetns: {}}}\nadmin: \"127.0.0.1:0\"\n",
                self.name,
                self.export_addr,
                topo.bpf_root().display(),
                topo.cgroup().display(),
                topo.node_netns().display(),
                c = certs.display(),
            ),
        )
        .unwrap();
        path
    }
}

impl Cluster {
    /// The agent configuration for `node` of this cluster on the userspace datapath (maps in
    /// the agent's memory; no privileges needed).
    pub fn agent_config_userspace(&self, node: &str) -> PathBuf {
        let certs = self.dir.path().join("certs");
        let path = self.dir.path().join(format!("agent-{node}.yaml"));
        std::fs::write(
            &path,
            format!(
                "cluster: {}\nnodeName: {node}\napiserver: {{address: \"{}\", ca: {c}/ca.pem, cert: {c}/local.pem, key: {c}/local-key.pem}}\n\
                 datapath: userspace\nadmin: \"127.0.0.1:0\"\n",
                self.name,
                self.export_addr,
                c = certs.display(),
            ),
        )
        .unwrap();
        path
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((mut child, _)) = self.apiserver.take() {
            terminate(&mut child);
        }
    }
}

/// A node agent process.
pub struct Agent {
    config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Its admin address.
    pub admin: String,
}

impl Agent {
    /// Starts `clustermesh agent --config CONFIG` and waits until it is ready (its first
    /// snapshot is in the datapath).
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    /// [`Agent::start`] with environment variables.
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let log = config.with_extension("log");
        let mut agent = Self {
            config: config.to_owned(),
            log,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
            admin: String::new(),
        };
        agent.restart();
        agent
    }

    /// Starts the process again (after [`Agent::kill`]).
    pub fn restart(&mut self) {
        let (child, admin) = spawn(&["agent"], &self.config, &self.log, &self.env);
        self.child = Some(child);
        self.admin = admin;
        wait_until(Duration::from_secs(30), "the agent to be ready", || {
            http_get(&self.admin, "/readyz").is_some_and(|(code, _)| code == 200)
        });
    }

    /// Kills the agent with SIGKILL (its maps and links stay pinned).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the agent (SIGSTOP): it keeps its state and answers nothing until
    /// [`Agent::thaw`].
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen agent run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([sig, &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "kill {sig} failed");
        }
    }

    /// A JSON document from the admin endpoint.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let (code, body) = http_get(&self.admin, path)
            .unwrap_or_else(|| panic!("GET {path} from the agent failed"));
        assert_eq!(code, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A metric's value from `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(&self.admin, "/metrics").unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in {body}"))
    }

    /// The agent's process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A frozen agent must run to handle SIGTERM.
        if self.child.is_some() {
            self.signal("-CONT");
        }
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }
}

/// The global service `prod/web` (ClusterIP 10.96.0.10, port 80) of a cluster with a node
/// `a-node` (192.0.2.1) and one pod `web-<i>` on it per address of `ips`, each a backend (port
/// 8080) of the service's EndpointSlice. The manifests of the trace and metrics tests and the
/// tracing benchmark.
pub fn global_web_manifest<S: AsRef<str>>(ips: &[S]) -> String {
    let endpoints: Vec<String> = ips
        .iter()
        .map(|ip| format!("{{addresses: [{}]}}", ip.as_ref()))
        .collect();
    let mut out = format!(
        "{WEB_SERVICE}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: prod, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n",
        endpoints.join(", ")
    );
    for (i, ip) in ips.iter().enumerate() {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, namespace: prod, labels: {{app: web}}}}\nstatus: {{podIP: {}, hostIP: 192.0.2.1}}\n",
            ip.as_ref()
        ));
    }
    out.push_str("---\napiVersion: v1\nkind: Node\nmetadata: {name: a-node}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.1}]}\n");
    out
}

/// The global service `prod/web` alone, without endpoints: an importing cluster's own service
/// of the same name, which takes the remote's backends.
pub const WEB_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: prod, annotations: {service.cilium.io/global: \"true\"}}\n\
    spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n";

/// A Node `name` with the address `ip`, as a manifest document.
pub fn node_manifest(name: &str, ip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
    )
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // In clock ticks (USER_HZ), which `getconf CLK_TCK` gives.
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    let hz: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// The `name` answers in `cm-netprobe` output lines (`ok NAME`), and the failures.
pub fn tally(lines: &[String]) -> (std::collections::BTreeMap<String, usize>, usize) {
    let mut names = std::collections::BTreeMap::new();
    let mut failed = 0;
    for l in lines {
        match l.strip_prefix("ok ") {
            Some(rest) => {
                let name = rest.split_whitespace().next().unwrap_or("").to_owned();
                *names.entry(name).or_insert(0) += 1;
            }
            None => failed += 1,
        }
    }
    (names, failed)
}
