//! `clustermesh up`: a local multi-cluster mesh on the embedded store. N cluster directories
//! in a data directory (reused by a second run), connected in a full mesh over real mTLS on
//! loopback addresses, the example scenario loaded, one apiserver and one agent process per
//! cluster; progress until everything is ready, then a live view until Ctrl-C, then a clean
//! shutdown of every process.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, IsTerminal};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clustermesh_model::cluster::{ClusterName, MaxConnectedClusters};
use serde_json::Value;

use crate::clusterdir::{ClusterDir, InitOptions, write_atomic};
use crate::output::{get, get_json, table};

/// Prints a line; a closed stdout (the terminal or pipe went away) must not stop the
/// shutdown of the mesh, so write errors are ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The example scenario, built into the binary so that `up` works from anywhere.
const SCENARIO: [(&str, &str); 3] = [
    ("c1", include_str!("../../examples/mesh/c1.yaml")),
    ("c2", include_str!("../../examples/mesh/c2.yaml")),
    ("c3", include_str!("../../examples/mesh/c3.yaml")),
];

/// `up`'s options.
pub(crate) struct UpOptions {
    /// Number of clusters.
    pub(crate) clusters: u32,
    /// The data directory.
    pub(crate) dir: PathBuf,
    /// `userspace` or `bpf`.
    pub(crate) datapath: clustermesh_agent::DatapathKind,
    /// The first three octets of the loopback addresses (cluster i listens on
    /// `<prefix>.<10 + i>`).
    pub(crate) ip_prefix: String,
    /// `--log-format` of the apiservers and agents.
    pub(crate) log_format: &'static str,
}

struct Member {
    dir: ClusterDir,
    health: String,
    admin: String,
    apiserver: Option<Child>,
    agent: Option<Child>,
    /// How the apiserver and the agent are started, and their restarts.
    supervision: [Supervised; 2],
    /// Stopped on purpose (`clustermesh up --dir D stop NAME`): not restarted.
    held: bool,
}

/// The file `clustermesh up stop` leaves in a cluster's directory while the running `up`
/// must keep the cluster stopped.
pub(crate) const STOPPED_MARKER: &str = "up.stopped";

/// The first wait before restarting a process that exited; doubled each time it exits again
/// within [`RESTART_RESET`], up to [`RESTART_MAX`] (as a kubelet backs off a crashing
/// container).
const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A process that ran this long before it exited starts again after [`RESTART_FIRST`].
const RESTART_RESET: Duration = Duration::from_secs(60);

/// How one process of a member is started and restarted.
#[derive(Debug, Clone)]
struct Supervised {
    what: &'static str,
    args: Vec<String>,
    config: PathBuf,
    log: PathBuf,
    started: Instant,
    /// Exits in a row (each within RESTART_RESET of its start).
    exits: u32,
    /// When an exited process is started again.
    restart_at: Option<Instant>,
    /// How it last exited.
    last_exit: Option<String>,
}

impl Supervised {
    fn new(what: &'static str, args: &[&str], config: PathBuf, log: PathBuf) -> Self {
        Self {
            what,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            config,
            log,
            started: Instant::now(),
            exits: 0,
            restart_at: None,
            last_exit: None,
        }
    }

    /// Records an exit at `now`; returns the wait before the restart.
    fn exited(&mut self, status: String, now: Instant) -> Duration {
        if now.saturating_duration_since(self.started) >= RESTART_RESET {
            self.exits = 0;
        }
        let wait = RESTART_FIRST
            .saturating_mul(1 << self.exits.min(5))
            .min(RESTART_MAX);
        self.exits += 1;
        self.restart_at = Some(now + wait);
        self.last_exit = Some(status);
        wait
    }

    /// What the live view shows for a process that is not running.
    fn down(&self, held: bool, now: Instant) -> String {
        if held {
            return "stopped".to_owned();
        }
        match (&self.last_exit, self.restart_at) {
            (Some(exit), Some(at)) => format!(
                "down ({exit}; restart in {} s)",
                at.saturating_duration_since(now).as_secs()
            ),
            _ => "down".to_owned(),
        }
    }
}

fn spawn(exe: &Path, args: &[&str], config: &Path, log: &Path) -> anyhow::Result<Child> {
    // The previous run's log is kept as `<name>.log.1`.
    if log.exists() {
        let mut old = log.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(log, &old).with_context(|| format!("keeping {}", log.display()))?;
    }
    let mut child = Command::new(exe)
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?)
        .spawn()
        .with_context(|| format!("starting {} {args:?}", exe.display()))?;
    // The first line says it serves; after it the child prints nothing more on stdout.
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("piped stdout")?).read_line(&mut line)?;
    if line.is_empty() {
        let _ = child.wait();
        bail!(
            "clustermesh {} exited at start; its log {} says:\n{}",
            args.join(" "),
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(child)
}

/// SIGTERM to every child, then waits up to 10 s before SIGKILL.
async fn stop_all(children: Vec<&mut Child>) {
    for c in &children {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut children = children;
    while !children.is_empty() && Instant::now() < deadline {
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `--ip-prefix`: exactly three decimal octets, the first 127 (`127.0.0`). It names files,
/// namespaces and cgroups that `up` creates and removes as root, so nothing else gets through.
pub(crate) fn loopback_prefix(s: &str) -> Result<String, String> {
    let octets: Vec<&str> = s.split('.').collect();
    let valid = octets.len() == 3
        && octets.iter().all(|o| {
            !o.is_empty()
                && o.len() <= 3
                && o.bytes().all(|b| b.is_ascii_digit())
                && o.parse::<u8>().is_ok()
        })
        && octets[0] == "127";
    if valid {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not the first three octets of a 127.0.0.0/8 address (e.g. 127.0.0): up only uses loopback addresses"
        ))
    }
}

fn addr(prefix: &str, host: u32, port: u16) -> anyhow::Result<SocketAddr> {
    let ip: IpAddr = format!("{prefix}.{host}")
        .parse()
        .with_context(|| format!("--ip-prefix {prefix:?} does not make an IPv4 address"))?;
    if !ip.is_loopback() {
        bail!("--ip-prefix must be in 127.0.0.0/8: up only uses loopback addresses");
    }
    Ok(SocketAddr::new(ip, port))
}

/// Prepares the cluster directories (creating or reusing them), connects them and loads the
/// scenario.
fn prepare(o: &UpOptions) -> anyhow::Result<Vec<Member>> {
    if o.clusters < 2 || o.clusters > 50 {
        bail!("--clusters must be between 2 and 50");
    }
    std::fs::create_dir_all(&o.dir).with_context(|| format!("creating {}", o.dir.display()))?;
    let datapath = match o.datapath {
        clustermesh_agent::DatapathKind::Bpf => "bpf",
        clustermesh_agent::DatapathKind::Userspace => "userspace",
    };
    let mut members = Vec::new();
    for i in 1..=o.clusters {
        let name = format!("c{i}");
        let path = o.dir.join(&name);
        let dir = if path.join("apiserver.yaml").exists() {
            ClusterDir::open(&path)?
        } else {
            ClusterDir::init(
                &path,
                &InitOptions {
                    name: ClusterName::new(name.as_str())?,
                    id: i,
                    mode: MaxConnectedClusters::C255,
                    export: addr(&o.ip_prefix, 10 + i, 2379)?,
                    health: addr(&o.ip_prefix, 10 + i, 9880)?,
                    agent_admin: addr(&o.ip_prefix, 10 + i, 9891)?,
                    node: format!("{name}-node"),
                    datapath,
                },
            )?
        };
        let health = dir.apiserver.listen.health.clone();
        let admin = dir.agent_admin()?;
        // A stop asked of an earlier run does not carry over.
        let _ = std::fs::remove_file(dir.path.join(STOPPED_MARKER));
        members.push(Member {
            supervision: [
                Supervised::new(
                    "apiserver",
                    &[],
                    dir.apiserver_config(),
                    dir.path.join("apiserver.log"),
                ),
                Supervised::new("agent", &[], dir.agent_config(), dir.path.join("agent.log")),
            ],
            dir,
            health,
            admin,
            apiserver: None,
            agent: None,
            held: false,
        });
    }
    for i in 0..members.len() {
        for j in i + 1..members.len() {
            crate::connect::connect(&members[i].dir.path, &members[j].dir.path)?;
        }
    }
    if o.datapath == clustermesh_agent::DatapathKind::Bpf {
        for m in &members {
            bpf_section(m, &o.ip_prefix)?;
        }
    }
    for m in &members {
        if let Some((_, text)) = SCENARIO.iter().find(|(c, _)| *c == m.dir.name().as_str()) {
            let Some(manifests) = &m.dir.apiserver.source.manifest_dir else {
                bail!(
                    "{} reads no manifest directory; up needs its clusters on manifests",
                    m.dir.apiserver_config().display()
                );
            };
            let file = manifests.join("example-mesh.yaml");
            if std::fs::read_to_string(&file).ok().as_deref() != Some(*text) {
                write_atomic(&file, text)?;
            }
        }
    }
    Ok(members)
}

/// The cgroup v2 mount.
pub(crate) fn cgroup2() -> anyhow::Result<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .context("reading /proc/mounts")?
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .context("no cgroup v2 is mounted; the eBPF datapath needs one (mount -t cgroup2 none /sys/fs/cgroup)")
}

/// The socket-LB cgroup of one cluster of the mesh.
fn cgroup_of(prefix: &str, cluster: &str) -> anyhow::Result<PathBuf> {
    let prefix = loopback_prefix(prefix).map_err(anyhow::Error::msg)?;
    if !cluster
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        bail!("{cluster:?} is not a cluster name up makes");
    }
    Ok(cgroup2()?.join("clustermesh-up").join(prefix).join(cluster))
}

/// On the eBPF datapath each cluster's agent gets a cgroup of its own for socket load
/// balancing (run a client in it: `echo $$ > <cgroup>/cgroup.procs`), so that the clusters'
/// identical VIPs do not meet, and nothing else on the machine is affected. Maps and links are
/// pinned under `/sys/fs/bpf/clustermesh-up/<ip prefix, dashed>/`; the endpoints' interfaces
/// are in the playground's node namespace. `up` removes all of it when it stops.
fn bpf_section(m: &Member, prefix: &str) -> anyhow::Result<()> {
    let cgroup = cgroup_of(prefix, m.dir.name().as_str())?;
    let names = crate::playground::Names::new(prefix)?;
    // bpffs refuses dots in names.
    let root = names.bpf_root();
    std::fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let path = m.dir.agent_config();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("bpf:"))
        .map(str::to_owned)
        .collect();
    lines.push(format!(
        "bpf: {{root: {}, cgroup: {}, endpointNetns: /var/run/netns/{}}}",
        root.display(),
        cgroup.display(),
        names.node_ns()
    ));
    let new = lines.join("\n") + "\n";
    if new != text {
        write_atomic(&path, &new)?;
    }
    Ok(())
}

async fn cluster_state(m: &Member) -> (bool, usize, usize, bool, Value) {
    let status = get_json(&m.health, "/status").await.ok();
    let (api_ready, remotes_ready, remotes) = match &status {
        Some(s) => {
            let r = s["remotes"].as_array().cloned().unwrap_or_default();
            (
                s["ready"] == true,
                r.iter().filter(|x| x["ready"] == true).count(),
                r.len(),
            )
        }
        None => (false, 0, 0),
    };
    let agent_ready = matches!(get(&m.admin, "/readyz").await, Ok((200, _)));
    let agent = get_json(&m.admin, "/status").await.unwrap_or(Value::Null);
    (api_ready, remotes_ready, remotes, agent_ready, agent)
}

/// The merged global services of one agent: `ns/name` -> backends (`ip:port@cluster`).
pub(crate) async fn merged_services(admin: &str) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let plans = get_json(admin, "/services").await?;
    let mut out = BTreeMap::new();
    for p in plans.as_array().into_iter().flatten() {
        let name = format!(
            "{}/{}",
            p["namespace"].as_str().unwrap_or("?"),
            p["name"].as_str().unwrap_or("?")
        );
        let mut backends: Vec<String> = p["frontends"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|f| f["backends"].as_array().cloned().unwrap_or_default())
            .map(|b| {
                format!(
                    "{}:{}@c{}",
                    b["ip"].as_str().unwrap_or("?"),
                    b["port"],
                    b["cluster_id"]
                )
            })
            .collect();
        backends.sort();
        backends.dedup();
        out.insert(name, backends);
    }
    Ok(out)
}

/// A count from an agent's `/status`, or `-` while the agent does not answer.
fn count_or_dash(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_owned(), |n| n.to_string())
}

async fn render(members: &[Member]) -> String {
    let mut rows = Vec::new();
    let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let now = Instant::now();
    for m in members {
        let (api, rr, rn, agent_ready, agent) = cluster_state(m).await;
        let state = |running: bool, ready: bool, sup: &Supervised| match (running, ready) {
            (false, _) => sup.down(m.held, now),
            (true, true) => "ready".to_owned(),
            (true, false) => "starting".to_owned(),
        };
        rows.push(vec![
            m.dir.name().to_string(),
            state(m.apiserver.is_some(), api, &m.supervision[0]),
            format!("{rr}/{rn}"),
            state(m.agent.is_some(), agent_ready, &m.supervision[1]),
            count_or_dash(&agent["maps"]["services"]),
            count_or_dash(&agent["maps"]["ipcache"]),
            count_or_dash(&agent["maps"]["policy"]),
        ]);
        if let Ok(merged) = merged_services(&m.admin).await {
            for (svc, backends) in merged {
                services.entry(svc).or_default().push(format!(
                    "{}: {}",
                    m.dir.name(),
                    if backends.is_empty() {
                        "none".to_owned()
                    } else {
                        backends.join(" ")
                    }
                ));
            }
        }
    }
    let mut out = table(
        &[
            "CLUSTER",
            "APISERVER",
            "REMOTES READY",
            "AGENT",
            "FRONTENDS",
            "IPCACHE",
            "POLICY ENTRIES",
        ],
        &rows,
    );
    out.push('\n');
    let svc_rows: Vec<Vec<String>> = services
        .into_iter()
        .flat_map(|(svc, per)| {
            per.into_iter()
                .enumerate()
                .map(move |(i, line)| {
                    let (cluster, backends) = line.split_once(": ").unwrap_or(("?", ""));
                    vec![
                        if i == 0 { svc.clone() } else { String::new() },
                        cluster.to_owned(),
                        backends.to_owned(),
                    ]
                })
                .collect::<Vec<_>>()
        })
        .collect();
    out.push_str(&table(
        &["SERVICE", "AGENT OF", "BACKENDS (ip:port@cluster)"],
        &svc_rows,
    ));
    out
}

/// Every apiserver ready with every remote imported, and every agent holding the state of
/// every remote (it has seen each remote's ready status, which its apiserver publishes after
/// that remote's snapshot is in the cache, so the snapshot reached the agent first).
async fn all_ready(members: &[Member]) -> bool {
    for m in members {
        let (api, rr, rn, agent, status) = cluster_state(m).await;
        let remotes_seen = status["clusters"]
            .as_array()
            .is_some_and(|c| c.len() + 1 == members.len() && c.iter().all(|s| s["ready"] == true));
        if !(api && agent && rr == rn && rn + 1 == members.len() && remotes_seen) {
            return false;
        }
    }
    true
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// The kernel side of `up --datapath bpf`: the playground's pods and servers, and the watcher
/// that cleans up if `up` dies without doing so.
struct Kernel {
    names: crate::playground::Names,
    cgroups: Vec<PathBuf>,
    pods: usize,
    servers: Vec<crate::playground::Server>,
    watcher: Option<(Child, std::process::ChildStdin)>,
}

impl Kernel {
    /// Tells the watcher about a process it must see gone before it cleans up.
    fn watch_pid(&mut self, child: &Child) {
        use std::io::Write as _;
        if let Some((_, stdin)) = &mut self.watcher {
            let _ = writeln!(stdin, "pid {}", child.id());
        }
    }

    /// After every process stopped: removes the pods, pins and cgroups, then lets the watcher
    /// go.
    fn stop(mut self) {
        use std::io::Write as _;
        for s in &mut self.servers {
            s.stop();
        }
        for p in crate::playground::cleanup(&self.names, &self.cgroups) {
            say!("cleanup: {p}");
        }
        if let Some((mut child, mut stdin)) = self.watcher.take() {
            let _ = writeln!(stdin, "done");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// Prepares the eBPF playground: leftovers of an earlier run removed, bpffs mounted once for
/// every agent, the watcher started, then the pods built.
fn kernel(o: &UpOptions, members: &[Member], exe: &Path) -> anyhow::Result<Kernel> {
    let names = crate::playground::Names::new(&o.ip_prefix)?;
    let cgroups = members
        .iter()
        .map(|m| cgroup_of(&o.ip_prefix, m.dir.name().as_str()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    clustermesh_agent::mounts::ensure_bpffs(&names.bpf_root()).map_err(anyhow::Error::msg)?;
    for cg in &cgroups {
        std::fs::create_dir_all(cg).with_context(|| format!("creating {}", cg.display()))?;
    }
    // The watcher is in a process group of its own: Ctrl-C or a kill of up's group does not
    // reach it; it acts when its stdin closes without a "done" (up died).
    let mut watcher = Command::new(exe)
        .args([
            "up-cleanup",
            "--ip-prefix",
            &o.ip_prefix,
            "--clusters",
            &members.len().to_string(),
            "--on-eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the cleanup watcher")?;
    let stdin = watcher.stdin.take().context("the watcher's stdin")?;
    let mut k = Kernel {
        names,
        cgroups,
        pods: 0,
        servers: Vec::new(),
        watcher: Some((watcher, stdin)),
    };
    let probe = exe.with_file_name("cm-netprobe");
    if !probe.is_file() {
        k.stop();
        bail!(
            "{} is missing: build it beside clustermesh (cargo build -p clustermesh -p clustermesh-bpf --bins, as scripts/up does)",
            probe.display()
        );
    }
    let scenario: Vec<crate::playground::ClusterPods<'_>> = members
        .iter()
        .filter_map(|m| {
            let name = m.dir.name().as_str();
            SCENARIO.iter().find(|(c, _)| *c == name).map(|(c, text)| {
                crate::playground::ClusterPods {
                    cluster: c,
                    dir: &m.dir.path,
                    manifest: text,
                }
            })
        })
        .collect();
    match crate::playground::build(&k.names, &scenario, &probe) {
        Ok((pods, servers)) => {
            k.pods = pods;
            k.servers = servers;
            Ok(k)
        }
        Err(e) => {
            k.stop();
            Err(e.context("building the playground's pods"))
        }
    }
}

/// Removes what `up --datapath bpf` made for the mesh on `ip_prefix` (whatever is there);
/// returns what could not be removed.
fn remove_mesh(ip_prefix: &str, clusters: u32) -> anyhow::Result<Vec<String>> {
    let names = crate::playground::Names::new(ip_prefix)?;
    let cgroups = (1..=clusters.min(50))
        .map(|i| cgroup_of(ip_prefix, &format!("c{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(crate::playground::cleanup(&names, &cgroups))
}

/// The lock one `up --datapath bpf` per prefix holds for its whole life (and its watcher while
/// it cleans up), so that a second `up` cannot remove a running mesh's pods.
fn mesh_lock_file(ip_prefix: &str) -> anyhow::Result<std::fs::File> {
    let path = PathBuf::from(format!(
        "/run/clustermesh-up-{}.lock",
        loopback_prefix(ip_prefix).map_err(anyhow::Error::msg)?
    ));
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Takes the mesh's lock, or says that another `up` holds it.
fn mesh_lock(ip_prefix: &str) -> anyhow::Result<std::fs::File> {
    try_lock(
        mesh_lock_file(ip_prefix)?,
        &format!(
            "another `clustermesh up --datapath bpf --ip-prefix {ip_prefix}` is running or cleaning up; stop it, or use another --ip-prefix"
        ),
    )
}

/// Takes an exclusive lock on `f` without waiting, or fails with `busy`.
pub(crate) fn try_lock(f: std::fs::File, busy: &str) -> anyhow::Result<std::fs::File> {
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => bail!("{busy}"),
        Err(std::fs::TryLockError::Error(e)) => Err(e).context("locking"),
    }
}

/// A process's start time (field 22 of `/proc/<pid>/stat`), while it runs and is no zombie:
/// with the pid, it names the process even if the pid is reused later.
fn start_time(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18).map(str::to_owned)
}

/// `up-cleanup`: removes a mesh's pods, pins and cgroups. With `on_eof`, first waits for its
/// stdin to close: `done` as the last line means `up` cleaned up itself; otherwise `up` died,
/// and once the mesh's lock is free, the processes it named (`pid N` lines) are waited for
/// (then killed) before cleaning up.
#[allow(
    clippy::disallowed_methods,
    reason = "the watcher process does nothing else; it runs inside block_in_place"
)]
pub(crate) fn cleanup_command(ip_prefix: &str, clusters: u32, on_eof: bool) -> anyhow::Result<()> {
    let lock = mesh_lock_file(ip_prefix)?;
    if on_eof {
        // (pid, start time) of each process up started, read while it runs.
        let mut pids: Vec<(String, String)> = Vec::new();
        let mut last = String::new();
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if let Some(pid) = line.strip_prefix("pid ") {
                let pid = pid.trim().to_owned();
                if let Some(t) = start_time(&pid) {
                    pids.push((pid, t));
                }
            }
            last = line;
        }
        if last == "done" {
            return Ok(());
        }
        // up is gone; its lock with it (a new up that took it first cleans up itself).
        lock.lock().context("locking the mesh")?;
        let alive = |(pid, t): &(String, String)| start_time(pid).as_ref() == Some(t);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(alive) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for (pid, _) in pids.iter().filter(|p| alive(p)) {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        std::thread::sleep(Duration::from_millis(200));
    } else {
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                bail!("`clustermesh up --ip-prefix {ip_prefix}` is running; stop it instead")
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e).context("locking the mesh"),
        }
    }
    let problems = remove_mesh(ip_prefix, clusters)?;
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("cleanup left: {}", problems.join("; "))
    }
}

/// Runs the mesh until SIGINT or SIGTERM.
pub(crate) async fn up(o: UpOptions) -> anyhow::Result<()> {
    let bpf = o.datapath == clustermesh_agent::DatapathKind::Bpf;
    // Held until up returns: no second up of this mesh meanwhile.
    let _lock = if bpf {
        let lock = mesh_lock(&o.ip_prefix)?;
        // Whatever an earlier run of this mesh left behind (a kill -9 of up and its watcher).
        remove_mesh(&o.ip_prefix, o.clusters)?;
        Some(lock)
    } else {
        None
    };
    let exe = std::env::current_exe().context("finding the clustermesh binary")?;
    let prepared = prepare(&o).and_then(|members| {
        let kernel = if bpf {
            Some(kernel(&o, &members, &exe)?)
        } else {
            None
        };
        Ok((members, kernel))
    });
    let (mut members, mut kernel) = match prepared {
        Ok(p) => p,
        Err(e) => {
            if bpf {
                // The cgroups and the bpffs directory may exist already.
                remove_mesh(&o.ip_prefix, o.clusters)?;
            }
            return Err(e);
        }
    };
    let datapath = if bpf { "bpf" } else { "userspace" };
    say!(
        "starting {} clusters in {} ({} datapath)",
        members.len(),
        o.dir.display(),
        datapath
    );
    let started = (|| {
        for m in &mut members {
            let log = m.dir.path.join("apiserver.log");
            let args = [
                "apiserver",
                "--exit-with-parent",
                "--log-format",
                o.log_format,
            ];
            m.supervision[0] =
                Supervised::new("apiserver", &args, m.dir.apiserver_config(), log.clone());
            let child = spawn(&exe, &args, &m.dir.apiserver_config(), &log)?;
            if let Some(k) = &mut kernel {
                k.watch_pid(&child);
            }
            m.apiserver = Some(child);
            say!(
                "{}: apiserver on {} (health {}), log {}",
                m.dir.name(),
                m.dir.apiserver.listen.export,
                m.health,
                log.display()
            );
        }
        for m in &mut members {
            let log = m.dir.path.join("agent.log");
            let args = [
                "agent",
                "--exit-with-parent",
                "--datapath",
                datapath,
                "--log-format",
                o.log_format,
            ];
            m.supervision[1] = Supervised::new("agent", &args, m.dir.agent_config(), log.clone());
            let child = spawn(&exe, &args, &m.dir.agent_config(), &log)?;
            if let Some(k) = &mut kernel {
                k.watch_pid(&child);
            }
            m.agent = Some(child);
            say!(
                "{}: agent admin on {}, log {}",
                m.dir.name(),
                m.admin,
                log.display()
            );
        }
        if let Some(k) = &kernel {
            say!(
                "pods: {} network namespaces behind {} (clustermesh exec --dir {} NS/POD -- cm-netprobe tcp VIP:PORT)",
                k.pods,
                k.names.node_ns(),
                members
                    .first()
                    .map(|m| m.dir.path.display().to_string())
                    .unwrap_or_default()
            );
        }
        anyhow::Ok(())
    })();
    let result = match started {
        Ok(()) => run(&mut members, &exe, kernel.as_mut()).await,
        Err(e) => Err(e),
    };
    say!("stopping every process");
    let children: Vec<&mut Child> = members
        .iter_mut()
        .flat_map(|m| [m.agent.as_mut(), m.apiserver.as_mut()])
        .flatten()
        .collect();
    stop_all(children).await;
    if let Some(k) = kernel {
        tokio::task::block_in_place(|| k.stop());
        say!("removed the pods, pins and cgroups");
    }
    say!("stopped");
    result
}

async fn run(
    members: &mut [Member],
    exe: &Path,
    mut kernel: Option<&mut Kernel>,
) -> anyhow::Result<()> {
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let tty = std::io::stdout().is_terminal();
    let begin = Instant::now();
    let mut last = String::new();
    // Progress until every apiserver, remote and agent is ready.
    loop {
        if all_ready(members).await {
            say!(
                "mesh ready: {} clusters connected in a full mesh after {:.1} s",
                members.len(),
                begin.elapsed().as_secs_f64()
            );
            break;
        }
        let mut line = Vec::new();
        for m in members.iter() {
            let (api, rr, rn, agent, _) = cluster_state(m).await;
            line.push(format!(
                "{}: apiserver {}, remotes {rr}/{rn}, agent {}",
                m.dir.name(),
                if api { "ready" } else { "starting" },
                if agent { "ready" } else { "starting" }
            ));
        }
        let line = line.join(" | ");
        if line != last {
            say!("{line}");
            last = line;
        }
        supervise(members, exe, kernel.as_deref_mut()).await;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = &mut stop => return Ok(()),
        }
    }
    // The live view.
    let mut shown = String::new();
    loop {
        let view = render(members).await;
        if tty {
            say!("\x1b[2J\x1b[H{view}\n(Ctrl-C stops the mesh)");
        } else if view != shown {
            say!("{view}");
        }
        shown = view;
        // Checked every 500 ms, the view redrawn every 2 s.
        for _ in 0..4 {
            supervise(members, exe, kernel.as_deref_mut()).await;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = &mut stop => return Ok(()),
            }
        }
    }
}

/// Keeps the mesh running: a process that exited on its own is reported and started again
/// after a backoff, while the rest of the mesh runs on; a cluster stopped on purpose
/// ([`STOPPED_MARKER`]) has its processes stopped and not restarted until it is started again.
async fn supervise(members: &mut [Member], exe: &Path, mut kernel: Option<&mut Kernel>) {
    let now = Instant::now();
    for m in members.iter_mut() {
        let held = m.dir.path.join(STOPPED_MARKER).exists();
        if held != m.held {
            m.held = held;
            if held {
                say!(
                    "{}: stopping its apiserver and agent{} (clustermesh up stop)",
                    m.dir.name(),
                    if kernel.is_some() {
                        ", and its pods' servers"
                    } else {
                        ""
                    }
                );
                if let Some(k) = kernel.as_deref_mut() {
                    for s in k
                        .servers
                        .iter_mut()
                        .filter(|s| s.cluster == m.dir.name().as_str())
                    {
                        s.stop();
                    }
                }
                let children: Vec<&mut Child> = [m.agent.as_mut(), m.apiserver.as_mut()]
                    .into_iter()
                    .flatten()
                    .collect();
                stop_all(children).await;
                m.agent = None;
                m.apiserver = None;
            } else {
                say!("{}: starting it again (clustermesh up start)", m.dir.name());
                if let Some(k) = kernel.as_deref_mut() {
                    for s in k
                        .servers
                        .iter_mut()
                        .filter(|s| s.cluster == m.dir.name().as_str())
                    {
                        if let Err(e) = tokio::task::block_in_place(|| s.start()) {
                            say!("{}: a pod's server did not start: {e:#}", m.dir.name());
                        }
                    }
                }
                for s in &mut m.supervision {
                    s.exits = 0;
                    s.restart_at = Some(now);
                    s.last_exit = None;
                }
            }
        }
        let Member {
            dir,
            apiserver,
            agent,
            supervision,
            ..
        } = m;
        for (child, sup) in [apiserver, agent].into_iter().zip(supervision.iter_mut()) {
            if let Some(c) = child
                && let Ok(Some(status)) = c.try_wait()
            {
                *child = None;
                let wait = sup.exited(status.to_string(), now);
                say!(
                    "{}'s {} exited ({status}); restarting it in {} s (log {})",
                    dir.name(),
                    sup.what,
                    wait.as_secs(),
                    sup.log.display()
                );
            }
            if child.is_some() || held || sup.restart_at.is_none_or(|t| t > now) {
                continue;
            }
            let args: Vec<&str> = sup.args.iter().map(String::as_str).collect();
            let spawned = tokio::task::block_in_place(|| spawn(exe, &args, &sup.config, &sup.log));
            match spawned {
                Ok(c) => {
                    if let Some(k) = kernel.as_deref_mut() {
                        k.watch_pid(&c);
                    }
                    say!("{}'s {} started again", dir.name(), sup.what);
                    sup.started = Instant::now();
                    sup.restart_at = None;
                    *child = Some(c);
                }
                Err(e) => {
                    let wait = sup.exited(
                        format!("{e:#}")
                            .lines()
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                        now,
                    );
                    say!(
                        "{}'s {} did not start; trying again in {} s: {e:#}",
                        dir.name(),
                        sup.what,
                        wait.as_secs()
                    );
                }
            }
        }
    }
}

/// `clustermesh up --dir D stop|start NAME`: asks the running `up` to stop the cluster's
/// apiserver and agent and keep them stopped (`stop`), or to start them again (`start`), and
/// waits until it has. To watch failover with the main command.
pub(crate) async fn control(dir: &Path, cluster: &str, stop: bool) -> anyhow::Result<()> {
    let cd = ClusterDir::open(&dir.join(cluster))?;
    let marker = cd.path.join(STOPPED_MARKER);
    let health = cd.apiserver.listen.health.clone();
    let answers = || async { get(&health, "/healthz").await.is_ok() };
    if stop {
        if marker.exists() {
            bail!(
                "{cluster} is stopped already; `clustermesh up --dir {} start {cluster}` starts it",
                dir.display()
            );
        }
        if !answers().await {
            bail!(
                "{cluster}'s apiserver does not answer at {health}: is `clustermesh up --dir {}` running?",
                dir.display()
            );
        }
        write_atomic(&marker, "stopped by clustermesh up stop\n")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while answers().await {
            if Instant::now() >= deadline {
                let _ = std::fs::remove_file(&marker);
                bail!(
                    "{cluster} was not stopped within 30 s: is `clustermesh up --dir {}` running?",
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "{cluster} stopped (apiserver and agent; on the eBPF datapath its pods' servers too); `clustermesh up --dir {} start {cluster}` starts it again",
            dir.display()
        );
    } else {
        if !marker.exists() {
            bail!("{cluster} was not stopped by `clustermesh up stop`");
        }
        std::fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(get(&health, "/readyz").await, Ok((200, _))) {
            if Instant::now() >= deadline {
                bail!(
                    "{cluster}'s apiserver is not ready 60 s after the start: see {}",
                    cd.path.join("apiserver.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("{cluster} started: its apiserver is ready, its agent starting");
    }
    Ok(())
}
