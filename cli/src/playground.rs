//! The pods of `up --datapath bpf`: every pod of the example scenario as a real network
//! namespace with a veth pair and a /32 route, all host-side interfaces in one node namespace
//! of the mesh's own (routing, proxy ARP), so that each cluster's agent attaches to real pod
//! interfaces and real traffic flows between clusters. None of these namespaces has a link to
//! the host's namespace: nothing the playground does touches a host interface or route.
//!
//! ```text
//!   pod ns cmup-<prefix>-c1-shop-web-0 ...   (eth0, the pod's /32, default route on eth0)
//!        | veth
//!   node ns cmup-<prefix>-node: cmu1p0 ... (host-side interfaces, one /32 route per pod)
//! ```
//!
//! Each pod runs `cm-netprobe serve` on the ports of its EndpointSlices (it answers with the
//! pod's name). `clustermesh exec` runs a program inside a pod, in its cluster's socket-LB
//! cgroup. Everything is removed by [`cleanup`]: by `up` when it stops, by a watcher process
//! when `up` dies without stopping, and by the next `up` for anything left over.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};
use clustermesh_bpf::netns::{add_node, add_pod, ip};
use serde_json::Value;

/// One pod of the scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodSpec {
    /// `ns/name`.
    pub(crate) key: String,
    /// Its IPv4 address.
    pub(crate) ip: Ipv4Addr,
}

/// The pods of a manifest file with an IPv4 `status.podIP`, and the ports of its
/// EndpointSlices (what the pods serve).
pub(crate) fn scenario(text: &str) -> anyhow::Result<(Vec<PodSpec>, Vec<u16>)> {
    use serde::Deserialize as _;
    let mut pods = Vec::new();
    let mut ports = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).context("reading the scenario")?;
        match v["kind"].as_str() {
            Some("Pod") => {
                let (Some(ns), Some(name), Some(ip)) = (
                    v["metadata"]["namespace"].as_str(),
                    v["metadata"]["name"].as_str(),
                    v["status"]["podIP"].as_str().and_then(|i| i.parse().ok()),
                ) else {
                    continue;
                };
                pods.push(PodSpec {
                    key: format!("{ns}/{name}"),
                    ip,
                });
            }
            Some("EndpointSlice") => {
                for p in v["ports"].as_array().into_iter().flatten() {
                    if let Some(port) = p["port"].as_u64().and_then(|p| u16::try_from(p).ok())
                        && !ports.contains(&port)
                    {
                        ports.push(port);
                    }
                }
            }
            _ => {}
        }
    }
    Ok((pods, ports))
}

/// The names of one mesh's kernel objects, from its loopback prefix.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    dashed: String,
}

impl Names {
    /// The names of the mesh on `ip_prefix`, which must be a valid `--ip-prefix`: they become
    /// paths and namespace names that are removed as root.
    pub(crate) fn new(ip_prefix: &str) -> anyhow::Result<Self> {
        let p = crate::up::loopback_prefix(ip_prefix).map_err(anyhow::Error::msg)?;
        Ok(Self {
            dashed: p.replace('.', "-"),
        })
    }

    fn ns_prefix(&self) -> String {
        format!("cmup-{}-", self.dashed)
    }

    /// The node namespace holding every host-side interface.
    pub(crate) fn node_ns(&self) -> String {
        format!("{}node", self.ns_prefix())
    }

    fn pod_ns(&self, cluster: &str, key: &str) -> String {
        format!("{}{cluster}-{}", self.ns_prefix(), key.replace('/', "-"))
    }

    /// The bpffs directory of the mesh's pins.
    pub(crate) fn bpf_root(&self) -> PathBuf {
        Path::new("/sys/fs/bpf/clustermesh-up").join(&self.dashed)
    }
}

/// What `exec` needs to find a pod: `pods.json` in the cluster directory.
pub(crate) const PODS_FILE: &str = "pods.json";

/// The pods of one cluster.
pub(crate) struct ClusterPods<'a> {
    /// The cluster's name.
    pub(crate) cluster: &'a str,
    /// Its directory (gets `pods.json`).
    pub(crate) dir: &'a Path,
    /// The scenario's manifest text.
    pub(crate) manifest: &'a str,
}

/// A pod's `cm-netprobe serve` process, and how to start it again.
pub(crate) struct Server {
    /// The pod's cluster.
    pub(crate) cluster: String,
    ns: String,
    name: String,
    port: u16,
    probe: std::path::PathBuf,
    /// The running process (none while stopped).
    pub(crate) child: Option<Child>,
}

impl Server {
    /// Kills the process (a crashed backend: its pod and address stay).
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again if it is not running.
    pub(crate) fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_none() {
            self.child = Some(serve(&self.ns, &self.probe, &self.name, self.port)?);
        }
        Ok(())
    }
}

/// Builds the node namespace and every pod; starts the pods' servers. Returns the number of
/// pods and the servers. On failure, what was built is left for [`cleanup`] (the caller runs
/// it).
pub(crate) fn build(
    names: &Names,
    clusters: &[ClusterPods<'_>],
    probe: &Path,
) -> anyhow::Result<(usize, Vec<Server>)> {
    let node = names.node_ns();
    add_node(&node).map_err(anyhow::Error::msg)?;
    let mut servers = Vec::new();
    let mut count = 0;
    for (ci, c) in clusters.iter().enumerate() {
        let (pods, ports) = scenario(c.manifest)?;
        let mut index = BTreeMap::new();
        for (pi, pod) in pods.iter().enumerate() {
            let ns = names.pod_ns(c.cluster, &pod.key);
            let host_if = format!("cmu{}p{pi}", ci + 1);
            add_pod(&node, &ns, &host_if, pod.ip).map_err(anyhow::Error::msg)?;
            count += 1;
            let ip_s = pod.ip.to_string();
            let name = pod.key.rsplit('/').next().unwrap_or(&pod.key);
            for port in &ports {
                let mut server = Server {
                    cluster: c.cluster.to_owned(),
                    ns: ns.clone(),
                    name: format!("{}/{name}", c.cluster),
                    port: *port,
                    probe: probe.to_owned(),
                    child: None,
                };
                server.start()?;
                servers.push(server);
            }
            index.insert(
                pod.key.clone(),
                serde_json::json!({"netns": ns, "ip": ip_s, "hostInterface": host_if}),
            );
        }
        crate::clusterdir::write_atomic(
            &c.dir.join(PODS_FILE),
            &serde_json::to_string_pretty(&index)?,
        )?;
    }
    Ok((count, servers))
}

/// `cm-netprobe serve` in a pod, once it listens; it dies with `up` (parent-death signal).
pub(crate) fn serve(ns: &str, probe: &Path, name: &str, port: u16) -> anyhow::Result<Child> {
    use std::io::BufRead as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "setpriv", "--pdeathsig", "KILL"])
        .arg(probe)
        .args(["serve", "--name", name, "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting cm-netprobe in {ns}"))?;
    // It prints one line once it listens, and nothing after.
    let mut line = String::new();
    let stdout = child.stdout.take().context("piped stdout")?;
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("listening") {
        let _ = child.kill();
        let _ = child.wait();
        bail!("cm-netprobe in {ns} did not start listening on {port}");
    }
    Ok(child)
}

/// Removes every namespace, pin and cgroup of the mesh `names` (whatever is there; missing
/// ones are fine). `cgroups` are the clusters' socket-LB cgroups. Synchronous: it runs when
/// every process of the mesh has stopped, from `up`'s teardown (inside `block_in_place`) or
/// from the watcher process.
#[allow(
    clippy::disallowed_methods,
    reason = "synchronous teardown, run outside the async work (block_in_place or the watcher)"
)]
pub(crate) fn cleanup(names: &Names, cgroups: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    let listed = Command::new("ip").args(["netns", "list"]).output();
    let prefix = names.ns_prefix();
    if let Ok(out) = listed {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(ns) = line.split_whitespace().next() else {
                continue;
            };
            if ns.starts_with(&prefix) {
                // Processes still in the namespace (a server) go first.
                if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-KILL", pid]).status();
                    }
                }
                if let Err(e) = ip(&["netns", "del", ns]) {
                    problems.push(e);
                }
            }
        }
    }
    let root = names.bpf_root();
    if root.exists()
        && let Err(e) = std::fs::remove_dir_all(&root)
    {
        problems.push(format!("removing {}: {e}", root.display()));
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/bpf/clustermesh-up"));
    for cg in cgroups {
        if !cg.exists() {
            continue;
        }
        // A client started by `exec` may still be inside.
        if let Ok(procs) = std::fs::read_to_string(cg.join("cgroup.procs")) {
            for pid in procs.split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let mut removed = false;
        for _ in 0..50 {
            if std::fs::remove_dir(cg).is_ok() {
                removed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !removed {
            problems.push(format!("removing the cgroup {}", cg.display()));
        }
        // The parents, unless another mesh uses them.
        for parent in cg.ancestors().skip(1).take(2) {
            if parent.file_name().is_some_and(|n| {
                n == "clustermesh-up"
                    || parent
                        .parent()
                        .is_some_and(|p| p.ends_with("clustermesh-up"))
            }) {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
    problems
}

/// Resolves a program for `exec`: a path as it is, a bare name on PATH, else beside the
/// clustermesh binary (where `cm-netprobe` is built).
fn program(name: &str) -> PathBuf {
    if name.contains('/') {
        return PathBuf::from(name);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if on_path {
        return PathBuf::from(name);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `clustermesh exec --dir CLUSTER_DIR NS/POD -- PROGRAM ARGS`: runs the program in the pod's
/// network namespace and in the cluster's socket-LB cgroup; returns its exit code.
pub(crate) fn exec(dir: &Path, pod: &str, command: &[String]) -> anyhow::Result<i32> {
    let Some((first, rest)) = command.split_first() else {
        bail!("say what to run: clustermesh exec --dir DIR NS/POD -- PROGRAM [ARGS]");
    };
    let file = dir.join(PODS_FILE);
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "reading {} (pods exist while `clustermesh up --datapath bpf` runs)",
            file.display()
        )
    })?;
    let pods: BTreeMap<String, Value> =
        serde_json::from_str(&text).with_context(|| format!("reading {}", file.display()))?;
    let Some(entry) = pods.get(pod) else {
        bail!(
            "no pod {pod} in {}; pods: {}",
            dir.display(),
            pods.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    };
    let netns = entry["netns"]
        .as_str()
        .filter(|n| n.starts_with("cmup-") && !n.contains('/') && !n.contains(".."))
        .context("pods.json: no namespace of up's playground for this pod")?;
    if !Path::new("/var/run/netns").join(netns).exists() {
        bail!(
            "the namespace of {pod} ({netns}) is gone: is `clustermesh up --datapath bpf` running?"
        );
    }
    let agent = clustermesh_agent::Config::load(&dir.join("agent.yaml"))?;
    let status = in_pod(&agent.bpf.cgroup, netns, &program(first))
        .args(rest)
        .status()
        .context("running the program")?;
    Ok(status.code().unwrap_or(1))
}

/// A command that runs `program` in the network namespace `netns` and the socket-LB cgroup
/// `cgroup`: the shell puts itself into the cgroup, then becomes the program inside the
/// namespace, so that the program's first connect() already meets the socket load balancer.
/// Arguments go after it.
pub(crate) fn in_pod(cgroup: &Path, netns: &str, program: &Path) -> Command {
    let mut c = Command::new("sh");
    c.args([
        "-c",
        "echo $$ > \"$0\" && exec ip netns exec \"$@\"",
        &cgroup.join("cgroup.procs").display().to_string(),
        netns,
    ])
    .arg(program);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_pods_and_served_ports_of_the_scenario() {
        let (pods, ports) = scenario(include_str!("../../examples/mesh/c1.yaml")).unwrap();
        assert_eq!(pods.len(), 6);
        assert_eq!(
            pods[0],
            PodSpec {
                key: "shop/web-0".into(),
                ip: Ipv4Addr::new(10, 1, 0, 10)
            }
        );
        assert_eq!(ports, vec![8080]);
        let names = Names::new("127.0.0").unwrap();
        assert_eq!(names.node_ns(), "cmup-127-0-0-node");
        assert_eq!(
            names.pod_ns("c1", "shop/web-0"),
            "cmup-127-0-0-c1-shop-web-0"
        );
    }
}
