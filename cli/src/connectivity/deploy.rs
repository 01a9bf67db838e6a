//! The test deployment of `clustermesh connectivity test`: the pods of namespace
//! `cilium-test` as real network namespaces (a veth pair each, the pod's /32, a default route
//! on its `eth0`) whose host-side interfaces sit in the node namespace the cluster's agent
//! attaches to (`bpf.endpointNetns`), with their Pod, Service and EndpointSlice objects in the
//! cluster's manifest directory. Nothing links to the host's namespace.
//!
//! Everything made here is recorded in [`Deployment`] and removed by its `Drop` (also on an
//! error, a panic or Ctrl-C); a run killed with SIGKILL leaves what the next run removes first.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::suite::{ECHO_PORT, NAMESPACE, PODS, TestPod};
use crate::clusterdir::{ClusterDir, write_atomic};

/// Prefix of the pods' network namespaces and host-side interfaces.
const PREFIX: &str = "cmct";
/// The file with the test pods, Services and EndpointSlices in a manifest directory.
pub(crate) const PODS_FILE: &str = "clustermesh-connectivity-test.yaml";
/// The file with the current test's policies in a manifest directory.
pub(crate) const POLICY_FILE: &str = "clustermesh-connectivity-test-policies.yaml";
/// The first line of every file the test writes: only such a file is ever removed by it (a
/// user's file of the same name is left alone).
const MARKER: &str = "# Written by `clustermesh connectivity test`; removed when it ends.\n";

/// One of the two clusters, as the test needs it.
#[derive(Debug, Clone)]
pub(crate) struct Cluster {
    /// Its name.
    pub(crate) name: String,
    /// Its agent's admin address.
    pub(crate) admin: String,
    /// The apiserver's manifest directory.
    pub(crate) manifests: PathBuf,
    /// The socket-LB cgroup (clients run in it).
    pub(crate) cgroup: PathBuf,
    /// The named network namespace holding the endpoints' host-side interfaces.
    pub(crate) node_ns: String,
    /// The agent's node.
    pub(crate) node: String,
    /// The node's IPv4 address (the pods' `hostIP`).
    pub(crate) host_ip: Ipv4Addr,
}

impl Cluster {
    /// Reads a cluster directory and asks its agent what the test needs.
    pub(crate) async fn open(path: &Path) -> anyhow::Result<Self> {
        let dir = ClusterDir::open(path)?;
        let name = dir.name().as_str().to_owned();
        let Some(manifests) = dir.apiserver.source.manifest_dir.clone() else {
            bail!(
                "{} reads no manifest directory: connectivity test writes its pods and policies there (a cluster of `clustermesh up`)",
                dir.apiserver_config().display()
            );
        };
        let agent = clustermesh_agent::Config::load(&dir.agent_config())?;
        let admin = dir.agent_admin()?;
        let status = crate::output::get_json(&admin, "/status")
            .await
            .with_context(|| format!("asking the agent of {name} at {admin}: is the mesh running (clustermesh up --datapath bpf)?"))?;
        if status["datapath"] != "bpf" {
            bail!(
                "the agent of {name} runs the {} datapath: the connectivity test needs real packets (clustermesh up --datapath bpf)",
                status["datapath"].as_str().unwrap_or("?")
            );
        }
        if status["synced"] != true {
            bail!("the agent of {name} is not ready yet (no first snapshot of its apiserver)");
        }
        let node_ns = agent
            .bpf
            .endpoint_netns
            .as_deref()
            .and_then(|p| {
                let parent = p.parent()?;
                (parent == Path::new("/var/run/netns") || parent == Path::new("/run/netns"))
                    .then(|| p.file_name()?.to_str().map(str::to_owned))
                    .flatten()
            })
            .with_context(|| {
                format!(
                    "{}: bpf.endpointNetns must name a namespace of `ip netns` (/var/run/netns/NAME): the test pods' interfaces go there",
                    dir.agent_config().display()
                )
            })?;
        if node_ns.starts_with(PREFIX) {
            bail!(
                "{}: bpf.endpointNetns names a namespace of the connectivity test's own",
                dir.agent_config().display()
            );
        }
        if same_netns(&format!("/var/run/netns/{node_ns}"), "/proc/self/ns/net") {
            bail!(
                "{}: bpf.endpointNetns ({node_ns}) is the host's network namespace: the test pods would be linked to it",
                dir.agent_config().display()
            );
        }
        let cgroup = checked_cgroup(&agent.bpf.cgroup)
            .with_context(|| format!("{}: bpf.cgroup", dir.agent_config().display()))?;
        let host_ip = status["nodeAddresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|a| a.as_str()?.parse::<Ipv4Addr>().ok())
            .with_context(|| {
                format!(
                    "the agent of {name} knows no IPv4 address of its node {} (no Node object in the cluster's source)",
                    agent.node_name
                )
            })?;
        Ok(Self {
            name,
            admin,
            manifests,
            cgroup,
            node_ns,
            node: agent.node_name,
            host_ip,
        })
    }
}

/// Whether two paths name the same namespace (the same nsfs inode).
fn same_netns(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// The agent's socket-LB cgroup, which clients are put into (as root, by writing
/// `cgroup.procs`): it must be a directory of the cgroup v2 hierarchy, named without symbolic
/// links, with its `cgroup.procs`.
fn checked_cgroup(path: &Path) -> anyhow::Result<PathBuf> {
    let root = crate::up::cgroup2()?;
    let real = path
        .canonicalize()
        .with_context(|| format!("{} does not exist", path.display()))?;
    if real != path || !real.starts_with(&root) || !real.join("cgroup.procs").is_file() {
        bail!(
            "{} is not a cgroup of the cgroup v2 hierarchy at {}",
            path.display(),
            root.display()
        );
    }
    Ok(real)
}

/// The addresses the test uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Addresses {
    /// The first three octets of the pods' addresses: pod n gets `.10 + n`.
    pub(crate) pods: [u8; 3],
    /// The first three octets of the Services' VIPs: echo-same-node `.10`, echo-other-node
    /// `.11`.
    pub(crate) services: [u8; 3],
}

impl Addresses {
    /// The address of a test pod.
    pub(crate) fn pod(&self, pod: &TestPod) -> Ipv4Addr {
        let n = PODS.iter().position(|p| p == pod).unwrap_or(0);
        let [a, b, c] = self.pods;
        Ipv4Addr::new(a, b, c, 10 + n as u8)
    }

    /// The VIP of an echo pod's Service.
    pub(crate) fn service(&self, echo: &TestPod) -> Ipv4Addr {
        let [a, b, c] = self.services;
        Ipv4Addr::new(a, b, c, if echo.remote { 11 } else { 10 })
    }
}

/// Parses `A.B.C` (three octets).
pub(crate) fn octets(s: &str) -> Result<[u8; 3], String> {
    let parts: Vec<&str> = s.split('.').collect();
    let parsed: Option<Vec<u8>> = parts
        .iter()
        .map(|p| {
            (!p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse().ok())
                .flatten()
        })
        .collect();
    match parsed.as_deref() {
        Some([a, b, c]) if *a != 0 && *a != 127 && *a < 224 => Ok([*a, *b, *c]),
        _ => Err(format!(
            "{s:?} is not the first three octets of a unicast address outside 127.0.0.0/8 (e.g. 10.254.0)"
        )),
    }
}

/// The objects of one cluster's part of the deployment, as a multi-document manifest.
pub(crate) fn manifest(c: &Cluster, remote: bool, addr: &Addresses) -> String {
    let mut docs = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"kubernetes.io/metadata.name": NAMESPACE}},
    })];
    for pod in PODS.iter().filter(|p| p.remote == remote) {
        let ip = addr.pod(pod).to_string();
        let labels: serde_json::Map<String, Value> = pod
            .labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let ports = if pod.echo {
            json!([{"name": "http-8080", "containerPort": ECHO_PORT, "protocol": "TCP"}])
        } else {
            json!([])
        };
        docs.push(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "nodeName": c.node,
                "serviceAccountName": pod.name,
                "containers": [{"name": pod.name, "image": "cm-netprobe", "ports": ports}],
            },
            "status": {"phase": "Running", "hostIP": c.host_ip.to_string(), "podIP": ip, "podIPs": [{"ip": ip}]},
        }));
    }
    // echo-same-node's Service in the source cluster; echo-other-node's in both (in the source
    // cluster without endpoints of its own: the global service brings the destination's).
    for echo in super::suite::ECHOES {
        if remote && !echo.remote {
            continue;
        }
        docs.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": echo.name, "namespace": NAMESPACE,
                "labels": {"kind": "echo"},
                "annotations": {"service.cilium.io/global": "true"},
            },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": addr.service(&echo).to_string(),
                "selector": {"name": echo.name},
                "ports": [{"name": "http", "port": ECHO_PORT, "targetPort": ECHO_PORT, "protocol": "TCP"}],
            },
        }));
        if echo.remote == remote {
            docs.push(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {
                    "name": format!("{}-1", echo.name), "namespace": NAMESPACE,
                    "labels": {"kubernetes.io/service-name": echo.name},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": ECHO_PORT, "protocol": "TCP"}],
                "endpoints": [{
                    "addresses": [addr.pod(&echo).to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": c.node,
                    "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": echo.name},
                }],
            }));
        }
    }
    docs.iter()
        .map(|d| serde_yaml_ng::to_string(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A test's policy files as one manifest, each document put into namespace `cilium-test`
/// (as `kubectl apply -n cilium-test -f FILE` does; nothing else changes). Returns the text
/// and the policies' `namespace/name`s.
pub(crate) fn policies(files: &[&str]) -> anyhow::Result<(String, Vec<String>)> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    let mut names = Vec::new();
    for f in files {
        let text = super::suite::policy_file(f).with_context(|| format!("no policy file {f}"))?;
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let mut v = Value::deserialize(doc).with_context(|| format!("reading {f}.yaml"))?;
            let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) else {
                bail!("{f}.yaml: a document without metadata");
            };
            meta.entry("namespace").or_insert_with(|| json!(NAMESPACE));
            let name = meta
                .get("name")
                .and_then(Value::as_str)
                .with_context(|| format!("{f}.yaml: a policy without a name"))?;
            let ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or(NAMESPACE);
            names.push(format!("{ns}/{name}"));
            docs.push(serde_yaml_ng::to_string(&v)?);
        }
    }
    names.sort();
    names.dedup();
    Ok((docs.join("---\n"), names))
}

/// What the test made; removed on drop.
pub(crate) struct Deployment {
    /// Manifest files written.
    files: Vec<PathBuf>,
    /// Network namespaces made.
    namespaces: Vec<String>,
    /// The echo pods' servers.
    servers: Vec<Child>,
}

impl Deployment {
    /// Removes what an earlier run that was killed left, then starts empty; refuses when
    /// something of that name is not the test's.
    pub(crate) fn new(clusters: &[&Cluster]) -> anyhow::Result<Self> {
        let mut d = Self {
            files: clusters
                .iter()
                .flat_map(|c| [c.manifests.join(PODS_FILE), c.manifests.join(POLICY_FILE)])
                .collect(),
            namespaces: leftover_namespaces(),
            servers: Vec::new(),
        };
        let problems = d.remove();
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        Ok(d)
    }

    /// Writes a manifest file (removed at the end). A file of that name that the test did
    /// not write is not replaced.
    pub(crate) fn write(&mut self, path: &Path, text: &str) -> anyhow::Result<()> {
        if let Ok(old) = std::fs::read_to_string(path)
            && !old.starts_with(MARKER)
        {
            bail!(
                "{} exists and was not written by the connectivity test: move it away first",
                path.display()
            );
        }
        if !self.files.iter().any(|f| f == path) {
            self.files.push(path.to_owned());
        }
        write_atomic(path, &format!("{MARKER}{text}"))
    }

    /// Removes a file the test wrote (a missing one is fine; one it did not write stays).
    pub(crate) fn remove_file(path: &Path) -> Result<(), String> {
        match std::fs::read_to_string(path) {
            Ok(text) if !text.starts_with(MARKER) => Err(format!(
                "{} was not written by the connectivity test: left alone",
                path.display()
            )),
            Ok(_) => {
                std::fs::remove_file(path).map_err(|e| format!("removing {}: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    /// Builds one pod in the cluster's node namespace; an echo pod gets its server.
    pub(crate) fn pod(
        &mut self,
        c: &Cluster,
        pod: &TestPod,
        ip: Ipv4Addr,
        probe: &Path,
    ) -> anyhow::Result<()> {
        let n = PODS.iter().position(|p| p == pod).unwrap_or(0);
        let ns = pod_namespace(pod);
        let host_if = format!("{PREFIX}{n}");
        // The kernel removes a deleted namespace's veth pair a moment later: one of a run that
        // just ended may still be there.
        let _ = clustermesh_bpf::netns::ip(&["-n", &c.node_ns, "link", "del", &host_if]);
        self.namespaces.push(ns.clone());
        clustermesh_bpf::netns::add_pod(&c.node_ns, &ns, &host_if, ip)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("building pod {NAMESPACE}/{}", pod.name))?;
        if pod.echo {
            self.servers
                .push(crate::playground::serve(&ns, probe, pod.name, ECHO_PORT)?);
        }
        Ok(())
    }

    /// Removes every file, server and namespace (whatever exists).
    #[allow(
        clippy::disallowed_methods,
        reason = "synchronous teardown from Drop; a few `ip` runs"
    )]
    fn remove(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for f in &self.files {
            if let Err(e) = Self::remove_file(f) {
                problems.push(e);
            }
        }
        for mut s in self.servers.drain(..) {
            let _ = s.kill();
            let _ = s.wait();
        }
        for ns in self.namespaces.drain(..) {
            let path = format!("/var/run/netns/{ns}");
            if !Path::new(&path).exists() {
                continue;
            }
            // A name of ours bound to the host's namespace (or init's) is not a test pod:
            // nothing in it is killed, and it is not removed.
            if same_netns(&path, "/proc/self/ns/net") || same_netns(&path, "/proc/1/ns/net") {
                problems.push(format!(
                    "{path} is the host's network namespace, not a test pod: left alone"
                ));
                continue;
            }
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            // The veth pair goes with the namespace, and the node's route with the veth.
            if let Err(e) = clustermesh_bpf::netns::ip(&["netns", "del", &ns]) {
                problems.push(e);
            }
        }
        problems
    }

    /// Removes everything now; returns what could not be removed.
    pub(crate) fn finish(mut self) -> Vec<String> {
        let p = self.remove();
        self.files.clear();
        p
    }
}

impl std::ops::Drop for Deployment {
    fn drop(&mut self) {
        for p in self.remove() {
            eprintln!("cleanup: {p}");
        }
    }
}

/// The network namespace of a test pod.
pub(crate) fn pod_namespace(pod: &TestPod) -> String {
    format!("{PREFIX}-{}", pod.name)
}

/// Namespaces of the test pods that exist now (from a killed run).
fn leftover_namespaces() -> Vec<String> {
    PODS.iter()
        .map(pod_namespace)
        .filter(|ns| Path::new("/var/run/netns").join(ns).exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_the_test_wrote_are_replaced_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mine = dir.path().join(POLICY_FILE);
        let theirs = dir.path().join(PODS_FILE);
        std::fs::write(&theirs, "kind: Pod\n").unwrap();
        let mut d = Deployment {
            files: Vec::new(),
            namespaces: Vec::new(),
            servers: Vec::new(),
        };
        d.write(&mine, "kind: CiliumNetworkPolicy\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&mine).unwrap(),
            format!("{MARKER}kind: CiliumNetworkPolicy\n")
        );
        let refused = d.write(&theirs, "kind: Service\n").unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("was not written by the connectivity test")
        );
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "kind: Pod\n");
        assert!(
            Deployment::remove_file(&theirs)
                .unwrap_err()
                .ends_with("left alone")
        );
        assert_eq!(
            Deployment::remove_file(&dir.path().join("missing.yaml")),
            Ok(())
        );
        // The end of the run removes what it wrote and nothing else.
        assert_eq!(d.finish(), Vec::<String>::new());
        assert!(!mine.exists());
        assert!(theirs.exists());
    }
}
