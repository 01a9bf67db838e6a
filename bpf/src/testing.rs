//! Test topology shared by every datapath test: network namespaces wired the way a routing
//! CNI wires a node, with no link to the host's own namespace, plus a cgroup v2 for clients
//! and a bpffs directory for pins. Everything is torn down on drop (also when a test panics).
//!
//! ```text
//!   pod ns "client"   pod ns "be1"  ...      (eth0, one /32 address, default route on eth0)
//!        | veth            | veth
//!   node ns: cmh0 ... cmhN (host-side interfaces, proxy ARP, one /32 route per pod)
//! ```
//!
//! Packets only ever travel between these namespaces. Needs root (and iproute2).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// One endpoint (pod) of the topology.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The name given by the test.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its host-side interface in the node namespace.
    pub host_if: String,
}

/// A node with pods, a client cgroup and a bpffs root.
pub struct Topology {
    node: String,
    pods: Vec<Pod>,
    cgroup: PathBuf,
    bpf_root: PathBuf,
    probe: PathBuf,
    children: Mutex<Vec<Child>>,
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} failed: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Fails the test loudly unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "datapath tests need root (CAP_BPF, CAP_NET_ADMIN, mounts); run them as root (.ci/run does)"
    );
}

fn mount_of_type(fstype: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut parts = l.split_whitespace();
        let (_, dir, ty) = (parts.next()?, parts.next()?, parts.next()?);
        (ty == fstype).then(|| PathBuf::from(dir))
    })
}

/// The cgroup v2 mount, mounting one under /run when there is none.
pub fn cgroup2_root() -> PathBuf {
    if let Some(dir) = mount_of_type("cgroup2") {
        return dir;
    }
    let dir = PathBuf::from("/run/clustermesh-test-cgroup2");
    std::fs::create_dir_all(&dir).expect("creating the cgroup2 mount point");
    sh(
        "mount",
        &["-t", "cgroup2", "none", &dir.display().to_string()],
    );
    dir
}

/// The bpffs mount, mounting /sys/fs/bpf when it is not.
pub fn bpffs_root() -> PathBuf {
    // Tests run in parallel threads: one check-and-mount at a time, or two bpffs would stack.
    static MOUNTING: Mutex<()> = Mutex::new(());
    let _guard = MOUNTING.lock();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        sh("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
    PathBuf::from("/sys/fs/bpf")
}

impl Topology {
    /// Builds a node namespace with one pod namespace per `(name, ip)`. `probe` is the
    /// `cm-netprobe` binary the pods run.
    pub fn new(probe: &Path, pods: &[(&str, Ipv4Addr)]) -> Self {
        require_root();
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let node = format!("cmt{id}-node");
        let cgroup = cgroup2_root().join(format!("clustermesh-test-{id}"));
        let bpf_root = bpffs_root().join(format!("clustermesh-test-{id}"));
        let mut topo = Self {
            node: node.clone(),
            pods: Vec::new(),
            cgroup,
            bpf_root,
            probe: probe.to_owned(),
            children: Mutex::new(Vec::new()),
        };
        crate::netns::add_node(&node).unwrap_or_else(|e| panic!("{e}"));
        for (i, (name, ip)) in pods.iter().enumerate() {
            let netns = format!("cmt{id}-{name}");
            let host_if = format!("cmh{i}");
            topo.pods.push(Pod {
                name: (*name).to_owned(),
                netns: netns.clone(),
                ip: *ip,
                host_if: host_if.clone(),
            });
            crate::netns::add_pod(&node, &netns, &host_if, *ip).unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::create_dir_all(&topo.cgroup).expect("creating the test cgroup");
        std::fs::create_dir_all(&topo.bpf_root).expect("creating the test bpffs directory");
        topo
    }

    /// The node namespace's name (for `ip -n`).
    pub fn node_ns(&self) -> &str {
        &self.node
    }

    /// The node namespace's file, for attaching programs inside it.
    pub fn node_netns(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.node)
    }

    /// A pod by name.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The client cgroup (socket programs attach here).
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The bpffs root for this test's pins.
    pub fn bpf_root(&self) -> &Path {
        &self.bpf_root
    }

    fn command(&self, pod: &str, in_cgroup: bool, args: &[&str]) -> Command {
        let netns = &self.pod(pod).netns;
        let mut script = String::new();
        if in_cgroup {
            script.push_str(&format!(
                "echo $$ > {}/cgroup.procs && ",
                self.cgroup.display()
            ));
        }
        script.push_str(&format!(
            "exec ip netns exec {netns} {}",
            self.probe.display()
        ));
        for a in args {
            script.push(' ');
            script.push_str(a);
        }
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        cmd
    }

    /// Starts `cm-netprobe serve` in a pod: it answers TCP and UDP on `port` with `name`.
    /// Waits until it listens.
    pub fn serve(&self, pod: &str, port: u16) {
        let mut child = self
            .command(
                pod,
                false,
                &["serve", "--name", pod, "--port", &port.to_string()],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting cm-netprobe serve");
        // The server prints one line once it listens.
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("reading the server's ready line");
        assert!(
            line.starts_with("listening"),
            "cm-netprobe serve said {line:?}"
        );
        self.children.lock().push(child);
    }

    /// Kills every process in a pod's network namespace with SIGKILL (a crashed backend; the
    /// pod's namespace and address stay).
    pub fn kill_pod_processes(&self, pod: &str) {
        let out = sh("ip", &["netns", "pids", &self.pod(pod).netns]);
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        // Reap the ones this topology started.
        for child in self.children.lock().iter_mut() {
            let _ = child.try_wait();
        }
    }

    /// Runs `cm-netprobe ARGS` in a pod (inside the client cgroup if asked) and returns its
    /// output lines.
    pub fn probe(&self, pod: &str, in_cgroup: bool, args: &[&str]) -> Vec<String> {
        let out = self
            .command(pod, in_cgroup, args)
            .output()
            .expect("running cm-netprobe");
        assert!(
            out.status.success(),
            "cm-netprobe {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Starts `cm-netprobe ARGS` in a pod in the background; the caller waits for it.
    pub fn spawn_probe(&self, pod: &str, in_cgroup: bool, args: &[&str]) -> Child {
        self.command(pod, in_cgroup, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting cm-netprobe")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for mut child in self.children.lock().drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in &self.pods {
            let _ = Command::new("ip")
                .args(["netns", "del", &pod.netns])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node])
            .status();
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.bpf_root);
    }
}
