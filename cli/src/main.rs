//! `clustermesh`: the command operators drive the mesh with (in the style of
//! `cilium clustermesh`, `kubectl` and `etcdctl`): `-o json` for machines, tables otherwise,
//! exit code 0 only on success, errors that say what to do.
//!
//! - `up`: a local multi-cluster mesh on the embedded store, in one command;
//! - `certs init`, `connect`, `disconnect`: cluster directories and the mesh between them;
//! - `status`: a cluster's apiserver and its remotes;
//! - `services`, `identities`, `endpoints`: the merged view of every cluster;
//! - `explain service|endpoint`, `bpf MAP`, `observe`: what a node's agent decided, holds and
//!   sees;
//! - `apiserver`, `agent`: the two long-running processes (docs/CONFIG.md).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod clusterdir;
mod connect;
mod connectivity;
mod inspect;
mod kube_connect;
mod output;
mod playground;
mod status;
mod up;

use output::Format;

/// A multi-cluster control plane for Kubernetes, in the family of Cilium ClusterMesh.
#[derive(Parser)]
#[command(name = "clustermesh", version, about)]
struct Cli {
    /// Log format on stderr: `text` (colours only when stderr is a terminal) or `json` (one
    /// object per line). The level is set with RUST_LOG (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How logs are written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `span`).
    Json,
}

/// A `tracing` layer of the whole process.
type BoxedLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// Logs go to stderr; `RUST_LOG` filters them (default `info`). Colour codes only reach a
/// terminal: a log file or `kubectl logs` gets plain text. The spans of traced changes go
/// only to `otel`, the OTLP layer, when tracing is on.
fn init_logging(format: LogFormat, otel: Option<BoxedLayer>) {
    use std::io::IsTerminal;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info".into())
        .add_directive(
            format!("{}=off", clustermesh_telemetry::TARGET)
                .parse()
                .unwrap_or_default(),
        );
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: BoxedLayer = match format {
        LogFormat::Json => fmt.json().with_ansi(false).with_filter(filter).boxed(),
        LogFormat::Text => fmt
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![fmt];
    layers.extend(otel);
    tracing_subscriber::registry().with(layers).init();
}

/// The OTLP exporter of an `apiserver` or `agent` process, from its configuration file's
/// `tracing` section and the `OTEL_*` variables; `None` when tracing is off, for other
/// commands, or when the file does not load (the command then reports why).
fn start_telemetry(
    command: &Command,
) -> anyhow::Result<Option<(clustermesh_telemetry::Telemetry, BoxedLayer)>> {
    use opentelemetry::KeyValue;
    let (section, service, resource) = match command {
        Command::Apiserver {
            config,
            check: false,
            ..
        } => match clustermesh_apiserver::Config::load(config) {
            Ok(c) => (
                c.tracing,
                "clustermesh-apiserver",
                vec![KeyValue::new(
                    "k8s.cluster.name",
                    c.cluster.name.to_string(),
                )],
            ),
            Err(_) => return Ok(None),
        },
        Command::Agent {
            config,
            check: false,
            node_name,
            ..
        } => match clustermesh_agent::Config::load(config) {
            Ok(c) => (
                c.tracing,
                "clustermesh-agent",
                vec![
                    KeyValue::new("k8s.cluster.name", c.cluster.to_string()),
                    KeyValue::new("k8s.node.name", node_name.clone().unwrap_or(c.node_name)),
                ],
            ),
            Err(_) => return Ok(None),
        },
        _ => return Ok(None),
    };
    let Some(settings) = clustermesh_telemetry::Settings::from_env(&section, service)
        .context("the tracing settings")?
    else {
        return Ok(None);
    };
    let (telemetry, layer) = clustermesh_telemetry::Telemetry::start::<tracing_subscriber::Registry>(
        &settings, resource,
    )?;
    Ok(Some((telemetry, Box::new(layer))))
}

/// Where an inspection command finds the node's agent.
#[derive(clap::Args)]
struct AgentArgs {
    /// A cluster directory (its agent.yaml names the agent's admin address).
    #[arg(long, value_name = "DIR", conflicts_with = "agent")]
    dir: Option<PathBuf>,
    /// The agent's admin address, e.g. 127.0.0.1:9891.
    #[arg(long, value_name = "ADDR")]
    agent: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

impl AgentArgs {
    fn address(&self) -> anyhow::Result<String> {
        match (&self.agent, &self.dir) {
            (Some(a), _) => Ok(a.clone()),
            (None, Some(d)) => clusterdir::ClusterDir::open(d)?.agent_admin(),
            (None, None) => bail!("say which agent: --dir CLUSTER_DIR or --agent ADDR"),
        }
    }
}

/// A cluster directory and an output format.
#[derive(clap::Args)]
struct DirArgs {
    /// The cluster directory (from `clustermesh certs init` or `clustermesh up`).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local mesh: N clusters (apiserver on the embedded store and an agent each),
    /// connected in a full mesh over mTLS on loopback, with the example scenario loaded.
    /// Shows progress, then a live view; Ctrl-C stops everything.
    Up {
        /// How many clusters.
        #[arg(long, default_value_t = 3)]
        clusters: u32,
        /// The data directory: one cluster directory per cluster, reused by the next run.
        #[arg(long, value_name = "DATA_DIR", default_value = "clustermesh-data")]
        dir: PathBuf,
        /// `userspace` (default, no privileges) or `bpf` (root: CAP_BPF, CAP_NET_ADMIN).
        #[arg(long, default_value = "userspace")]
        datapath: clustermesh_agent::DatapathKind,
        /// Loopback addresses to use: cluster i listens on <prefix>.<10+i>.
        #[arg(long, default_value = "127.0.0", value_parser = up::loopback_prefix)]
        ip_prefix: String,
        /// Stop or start one cluster of the running mesh (to watch failover).
        #[command(subcommand)]
        action: Option<UpAction>,
    },
    /// Run a program inside a pod of `up --datapath bpf` (its network namespace, and its
    /// cluster's socket load-balancing cgroup), e.g.
    /// `clustermesh exec --dir clustermesh-data/c1 shop/frontend-0 -- cm-netprobe tcp 10.96.0.12:80`.
    Exec {
        /// The pod's cluster directory.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The pod: NAMESPACE/NAME.
        pod: String,
        /// The program and its arguments (after `--`).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove what `up --datapath bpf` made for a mesh (pods, pins, cgroups).
    #[command(hide = true)]
    UpCleanup {
        /// The mesh's --ip-prefix.
        #[arg(long, default_value = "127.0.0", value_parser = up::loopback_prefix)]
        ip_prefix: String,
        /// Its number of clusters.
        #[arg(long, default_value_t = 3)]
        clusters: u32,
        /// Wait for stdin to close first (the watcher `up` starts).
        #[arg(long)]
        on_eof: bool,
    },
    /// Cluster certificates and directories.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Connect two clusters: each imports the other. Two cluster directories, or (kube mode)
    /// two kubeconfig contexts of clusters installed with the Helm chart. Running it again
    /// changes nothing; a running apiserver picks the change up without a restart.
    Connect {
        /// One cluster directory.
        #[arg(required_unless_present = "context", conflicts_with = "context")]
        a: Option<PathBuf>,
        /// The other.
        #[arg(required_unless_present_any = ["context", "cilium"])]
        b: Option<PathBuf>,
        #[command(flatten)]
        kube: KubeConnectArgs,
        #[command(flatten)]
        cilium: CiliumConnectArgs,
    },
    /// Undo `connect`: each stops importing the other (cached state is dropped after the
    /// apiserver's drain grace period).
    Disconnect {
        /// One cluster directory.
        a: PathBuf,
        /// The other.
        b: PathBuf,
    },
    /// This cluster's apiserver and each remote cluster: connected, ready, synced, counts,
    /// failures, staleness. Exit code 1 when anything is not ready.
    Status {
        /// The cluster directory.
        #[arg(long, value_name = "DIR", conflicts_with = "server")]
        dir: Option<PathBuf>,
        /// The apiserver's health address instead (plain HTTP, e.g. 127.0.0.1:9880).
        #[arg(long, value_name = "ADDR")]
        server: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
        /// Wait until the apiserver and every remote are ready (as `cilium clustermesh status
        /// --wait`), then print the status; exit 1 if they are not within --wait-duration.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits (e.g. 30s, 2m, 1h).
        #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = humantime::parse_duration, requires = "wait")]
        wait_duration: std::time::Duration,
    },
    /// Every service of every cluster, merged by namespace and name.
    Services(DirArgs),
    /// Every identity of every cluster.
    Identities(DirArgs),
    /// Every endpoint (ipcache entry) of every cluster.
    Endpoints(DirArgs),
    /// Why the node's agent programmed what it did.
    Explain {
        #[command(subcommand)]
        what: ExplainCommand,
    },
    /// The node's datapath maps, decoded: services, backends, ipcache, endpoints, policy.
    Bpf {
        /// The map.
        #[arg(value_parser = ["services", "backends", "ipcache", "endpoints", "policy"])]
        map: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Live policy verdicts and outlier detection's ejections from the node's eBPF datapath,
    /// until Ctrl-C.
    Observe {
        #[command(flatten)]
        agent: AgentArgs,
        /// Only this verdict: `forwarded` (or `allowed`), `dropped` (or `denied`), `audit`
        /// (or `audited`), `ejected`, `readmitted`.
        #[arg(long, value_parser = ["forwarded", "allowed", "dropped", "denied", "audit", "audited", "ejected", "readmitted"])]
        verdict: Option<String>,
        /// Only flows with this cluster (name or ID) on either side.
        #[arg(long, value_name = "NAME|ID")]
        cluster: Option<String>,
        /// Only flows with this identity on either side.
        #[arg(long)]
        identity: Option<u64>,
        /// First the flows the agent kept from this long ago (e.g. 5m), then new ones.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// First the last N flows the agent kept (it keeps 4096), then new ones.
        #[arg(long, value_name = "N")]
        last: Option<usize>,
        /// Print the kept flows (--since, --last; the last 20 without either) and stop instead
        /// of following new ones.
        #[arg(long)]
        no_follow: bool,
        /// Stop after this many flows.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Cilium's multi-cluster connectivity tests on a running mesh (eBPF datapath): test
    /// pods in two clusters, each test's policies, the verdict of every connection.
    Connectivity {
        #[command(subcommand)]
        command: ConnectivityCommand,
    },
    /// Run a cluster's apiserver: read its manifests, write its state into the kvstore and
    /// serve it to other clusters and to its agents over mTLS gRPC.
    Apiserver {
        /// The configuration file (YAML; see docs/CONFIG.md).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only check the configuration file, print `ok` and exit.
        #[arg(long)]
        check: bool,
        /// Stop when the parent process goes away (used by `up`).
        #[arg(long, hide = true)]
        exit_with_parent: bool,
    },
    /// Run a node's agent: watch the local apiserver, merge every cluster's state and program
    /// the datapath (eBPF maps, or the same maps in memory).
    Agent {
        /// The configuration file (YAML; see docs/CONFIG.md).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// `bpf` (needs CAP_BPF, CAP_NET_ADMIN, cgroup v2 and bpffs) or `userspace`;
        /// overrides the file's `datapath`.
        #[arg(long, value_name = "KIND")]
        datapath: Option<clustermesh_agent::DatapathKind>,
        /// This node's name, overriding the file's `nodeName` (a DaemonSet passes
        /// `spec.nodeName` here).
        #[arg(long, value_name = "NAME")]
        node_name: Option<String>,
        /// Only check the configuration file, print `ok` and exit.
        #[arg(long)]
        check: bool,
        /// Stop when the parent process goes away (used by `up`).
        #[arg(long, hide = true)]
        exit_with_parent: bool,
    },
}

/// `connect` in kube mode.
#[derive(clap::Args)]
struct KubeConnectArgs {
    /// The kubeconfig context of one cluster.
    #[arg(long, requires = "destination_context")]
    context: Option<String>,
    /// The kubeconfig context of the other.
    #[arg(long)]
    destination_context: Option<String>,
    /// The namespace of the chart's release (both clusters).
    #[arg(long, default_value = "clustermesh")]
    namespace: String,
    /// The chart's release name (both clusters).
    #[arg(long, default_value = "mesh")]
    release: String,
    /// The Secret with each cluster's ca.pem and ca-key.pem.
    #[arg(long, default_value = "clustermesh-ca")]
    ca_secret: String,
    /// The remotes Secret the apiserver mounts (the chart's remotes.secretName).
    #[arg(long, default_value = "clustermesh-remotes")]
    remotes_secret: String,
    /// The Export address the other cluster dials to reach --context's cluster (default: its
    /// Export Service's load balancer).
    #[arg(long)]
    address: Option<String>,
    /// The same for --destination-context's cluster.
    #[arg(long)]
    destination_address: Option<String>,
}

/// `connect DIR --cilium NAME ...`: DIR's cluster imports a Cilium cluster from the etcd of
/// its clustermesh-apiserver (one way: see docs/INTEROP.md for the other).
#[derive(clap::Args)]
struct CiliumConnectArgs {
    /// The Cilium cluster's name (its `cluster.name`).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["b", "context"], requires_all = ["cilium_id", "cilium_etcd", "cilium_ca", "cilium_cert", "cilium_key"])]
    cilium: Option<String>,
    /// Its cluster ID (its `cluster.id`).
    #[arg(long, value_name = "ID")]
    cilium_id: Option<u32>,
    /// Its clustermesh-apiserver's etcd client URL (`https://host:2379`).
    #[arg(long, value_name = "URL")]
    cilium_etcd: Option<String>,
    /// The CA of that etcd (`ca.crt` of its `clustermesh-apiserver-remote-cert`).
    #[arg(long, value_name = "FILE")]
    cilium_ca: Option<PathBuf>,
    /// The client certificate it hands to its remote users (`tls.crt`).
    #[arg(long, value_name = "FILE")]
    cilium_cert: Option<PathBuf>,
    /// Its key (`tls.key`).
    #[arg(long, value_name = "FILE")]
    cilium_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a cluster directory: CA, apiserver and agent certificates, and starter
    /// configurations for the apiserver and the agent.
    Init {
        /// The cluster's name (1-32 of [a-z0-9-], unique in the mesh).
        #[arg(long)]
        cluster: String,
        /// The cluster's ID (1-255, or 1-511 with --max-connected-clusters 511; unique).
        #[arg(long)]
        id: u32,
        /// The directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// 255 or 511, equal across the mesh.
        #[arg(long, default_value_t = 255)]
        max_connected_clusters: u32,
        /// The Export address other clusters dial (also a SAN of the server certificate).
        #[arg(long, default_value = "127.0.0.1:2379")]
        export: std::net::SocketAddr,
        /// The apiserver's health address (plain HTTP).
        #[arg(long, default_value = "127.0.0.1:9880")]
        health: std::net::SocketAddr,
        /// The agent's admin address (plain HTTP).
        #[arg(long, default_value = "127.0.0.1:9891")]
        agent_admin: std::net::SocketAddr,
        /// The agent's node name.
        #[arg(long, default_value = "node-1")]
        node: String,
    },
}

/// What `clustermesh up --dir D` does to a running mesh.
#[derive(Subcommand)]
enum UpAction {
    /// Stop a cluster's apiserver and agent and keep them stopped (the other clusters
    /// withdraw it), e.g. `clustermesh up --dir clustermesh-data stop c3`.
    Stop {
        /// The cluster's name.
        cluster: String,
    },
    /// Start a cluster stopped with `stop` again.
    Start {
        /// The cluster's name.
        cluster: String,
    },
}

#[derive(Subcommand)]
enum ConnectivityCommand {
    /// Deploy the test pods (namespace cilium-test) into two clusters, run every test of
    /// Cilium's table (connectivity/README.md) on real packets, print a verdict per test and
    /// remove everything it made (also on Ctrl-C). Exit code 1 when a test fails.
    Test {
        /// The source cluster's directory, or `up`'s data directory (its first two clusters
        /// are used).
        #[arg(long, value_name = "DIR", default_value = "clustermesh-data")]
        dir: PathBuf,
        /// The destination cluster's directory (echo-other-node runs there).
        #[arg(long, value_name = "DIR")]
        destination_dir: Option<PathBuf>,
        /// Only the tests whose name matches this regular expression (the others are
        /// skipped), e.g. `--test 'deny'`.
        #[arg(long, value_name = "REGEX")]
        test: Option<regex::Regex>,
        /// The first three octets of the test pods' addresses (pods get .10 to .13).
        #[arg(long, default_value = "10.254.0", value_parser = connectivity::octets)]
        pod_prefix: [u8; 3],
        /// The first three octets of the echo Services' VIPs (.10 and .11).
        #[arg(long, default_value = "10.96.254", value_parser = connectivity::octets)]
        service_prefix: [u8; 3],
        /// How long one connection attempt or ping waits for an answer: an expected drop
        /// takes this long.
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
        action_timeout: std::time::Duration,
        /// How long to wait for the agents to have the pods and to enforce a test's policies.
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        /// Output format (`-o json`: every test with its actions, expected and observed
        /// verdicts and the verdict events).
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

#[derive(Subcommand)]
enum ExplainCommand {
    /// Each backend of a service, in or out, and why.
    Service {
        /// NAMESPACE/NAME.
        name: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// An endpoint's policy entries and the rules that produced them.
    Endpoint {
        /// The endpoint's IPv4 address.
        ip: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Resolves when the parent process is gone (the process was re-parented).
async fn parent_gone() {
    let parent = std::os::unix::process::parent_id();
    while std::os::unix::process::parent_id() == parent {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// A stop signal, or the parent's exit when asked to follow it.
async fn stop_requested(exit_with_parent: bool) -> anyhow::Result<()> {
    if exit_with_parent {
        tokio::select! {
            r = shutdown_signal() => r,
            () = parent_gone() => {
                tracing::warn!("the parent process is gone; stopping");
                Ok(())
            }
        }
    } else {
        shutdown_signal().await
    }
}

/// Raises the open-file limit to the hard limit where allowed, and says what it is: a server
/// with many peers and agents needs descriptors, and running out must not be a surprise.
fn raise_fd_limit() {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft);
    match (before, rlimit::increase_nofile_limit(u64::MAX)) {
        (Ok(before), Ok(now)) if now > before => {
            tracing::info!(from = before, to = now, "raised the file-descriptor limit");
        }
        (_, Ok(now)) => tracing::info!(limit = now, "file-descriptor limit"),
        (_, Err(e)) => tracing::warn!(error = %e, "reading the file-descriptor limit failed"),
    }
}

async fn apiserver(config: PathBuf, exit_with_parent: bool) -> anyhow::Result<()> {
    let config = clustermesh_apiserver::Config::load(&config)?;
    raise_fd_limit();
    let running = clustermesh_apiserver::start(config)
        .await
        .context("starting the apiserver")?;
    println!(
        "export listening on {}, health on {}",
        running.export_addr, running.health_addr
    );
    stop_requested(exit_with_parent).await?;
    tracing::info!("shutting down");
    running.stop().await.context("stopping the apiserver")?;
    Ok(())
}

async fn agent(
    config: PathBuf,
    datapath: Option<clustermesh_agent::DatapathKind>,
    node_name: Option<String>,
    exit_with_parent: bool,
) -> anyhow::Result<()> {
    let mut config = clustermesh_agent::Config::load(&config)?;
    if let Some(n) = node_name {
        if n.is_empty() {
            anyhow::bail!("--node-name must not be empty");
        }
        config.node_name = n;
    }
    let kind = datapath.unwrap_or(config.datapath);
    raise_fd_limit();
    let running = clustermesh_agent::start(config, kind)
        .await
        .context("starting the agent")?;
    println!("agent admin on {}", running.admin_addr);
    if let Some(addr) = running.metrics_addr {
        tracing::info!(%addr, "metrics listener (/metrics, /healthz)");
    }
    stop_requested(exit_with_parent).await?;
    tracing::info!("shutting down; the datapath stays pinned");
    running.stop().await;
    Ok(())
}

/// Runs a command; `Ok(false)` for an answer that is not a success (e.g. not ready).
async fn run(command: Command, log_format: &'static str) -> anyhow::Result<bool> {
    match command {
        Command::Apiserver { config, check, .. } if check => {
            clustermesh_apiserver::Config::load(&config)?;
            println!("ok");
        }
        Command::Agent { config, check, .. } if check => {
            clustermesh_agent::Config::load(&config)?;
            println!("ok");
        }
        Command::Apiserver {
            config,
            exit_with_parent,
            ..
        } => apiserver(config, exit_with_parent).await?,
        Command::Agent {
            config,
            datapath,
            node_name,
            exit_with_parent,
            ..
        } => agent(config, datapath, node_name, exit_with_parent).await?,
        Command::Up {
            action: Some(action),
            dir,
            ..
        } => match action {
            UpAction::Stop { cluster } => up::control(&dir, &cluster, true).await?,
            UpAction::Start { cluster } => up::control(&dir, &cluster, false).await?,
        },
        Command::Up {
            clusters,
            dir,
            datapath,
            ip_prefix,
            action: None,
        } => {
            up::up(up::UpOptions {
                clusters,
                dir,
                datapath,
                ip_prefix,
                log_format,
            })
            .await?;
        }
        Command::Exec { dir, pod, command } => {
            let code = tokio::task::block_in_place(|| playground::exec(&dir, &pod, &command))?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Command::UpCleanup {
            ip_prefix,
            clusters,
            on_eof,
        } => tokio::task::block_in_place(|| up::cleanup_command(&ip_prefix, clusters, on_eof))?,
        Command::Certs {
            command:
                CertsCommand::Init {
                    cluster,
                    id,
                    dir,
                    max_connected_clusters,
                    export,
                    health,
                    agent_admin,
                    node,
                },
        } => {
            let name = clustermesh_model::ClusterName::new(cluster.as_str())
                .with_context(|| format!("--cluster {cluster:?}"))?;
            let mode = clustermesh_model::MaxConnectedClusters::try_from(max_connected_clusters)
                .context("--max-connected-clusters")?;
            let d = clusterdir::ClusterDir::init(
                &dir,
                &clusterdir::InitOptions {
                    name,
                    id,
                    mode,
                    export,
                    health,
                    agent_admin,
                    node,
                    datapath: "bpf",
                },
            )?;
            println!(
                "cluster {} (id {id}) initialised in {}
  apiserver: clustermesh apiserver --config {}
  agent:     clustermesh agent --config {}
  connect:   clustermesh connect {} OTHER_CLUSTER_DIR",
                d.name(),
                dir.display(),
                d.apiserver_config().display(),
                d.agent_config().display(),
                dir.display()
            );
        }
        Command::Connect {
            kube:
                KubeConnectArgs {
                    context: Some(ctx_a),
                    destination_context: Some(ctx_b),
                    namespace,
                    release,
                    ca_secret,
                    remotes_secret,
                    address,
                    destination_address,
                },
            ..
        } => {
            let placement = |address: Option<String>| kube_connect::Placement {
                namespace: namespace.clone(),
                release: release.clone(),
                ca_secret: ca_secret.clone(),
                remotes_secret: remotes_secret.clone(),
                address,
            };
            let (x, y) = kube_connect::connect(
                (kube_connect::client_for(&ctx_a).await?, placement(address)),
                (
                    kube_connect::client_for(&ctx_b).await?,
                    placement(destination_address),
                ),
            )
            .await?;
            let say = |o: &connect::Outcome| match o {
                connect::Outcome::Written => "added",
                connect::Outcome::Unchanged => "already there, unchanged",
            };
            println!("{ctx_a}: remote {ctx_b} {}", say(&x));
            println!("{ctx_b}: remote {ctx_a} {}", say(&y));
        }
        Command::Connect {
            a: Some(a),
            b: Some(b),
            ..
        } => {
            let (x, y) = connect::connect(&a, &b)?;
            let say = |o: &connect::Outcome| match o {
                connect::Outcome::Written => "added",
                connect::Outcome::Unchanged => "already there, unchanged",
            };
            println!("{}: remote {} {}", a.display(), b.display(), say(&x));
            println!("{}: remote {} {}", b.display(), a.display(), say(&y));
        }
        Command::Connect {
            a: Some(a),
            cilium:
                CiliumConnectArgs {
                    cilium: Some(name),
                    cilium_id: Some(id),
                    cilium_etcd: Some(etcd),
                    cilium_ca: Some(ca),
                    cilium_cert: Some(cert),
                    cilium_key: Some(key),
                },
            ..
        } => {
            let outcome = connect::connect_cilium(
                &a,
                &connect::CiliumRemote {
                    name: &name,
                    id,
                    etcd: &etcd,
                    ca: &ca,
                    cert: &cert,
                    key: &key,
                },
            )?;
            let said = match outcome {
                connect::Outcome::Written => "added",
                connect::Outcome::Unchanged => "already there, unchanged",
            };
            println!(
                "{}: remote {name} (Cilium, etcd {etcd}) {said}",
                a.display()
            );
        }
        Command::Connect { .. } => {
            bail!(
                "say which clusters: two cluster directories, a directory and --cilium, or --context and --destination-context"
            )
        }
        Command::Disconnect { a, b } => {
            let (x, y) = connect::disconnect(&a, &b)?;
            let say = |had: bool| if had { "removed" } else { "was not connected" };
            println!("{}: {}", a.display(), say(x));
            println!("{}: {}", b.display(), say(y));
        }
        Command::Status {
            dir,
            server,
            output,
            wait,
            wait_duration,
        } => {
            let health = match (server, dir) {
                (Some(s), _) => s,
                (None, Some(d)) => clusterdir::ClusterDir::open(&d)?.apiserver.listen.health,
                (None, None) => bail!("say which apiserver: --dir CLUSTER_DIR or --server ADDR"),
            };
            let (ready, text) = if wait {
                status::wait(&health, output, wait_duration).await?
            } else {
                status::status(&health, output).await?
            };
            print!("{text}");
            return Ok(ready);
        }
        Command::Services(d) => {
            print!(
                "{}",
                inspect::services(&clusterdir::ClusterDir::open(&d.dir)?, d.output).await?
            );
        }
        Command::Identities(d) => {
            print!(
                "{}",
                inspect::identities(&clusterdir::ClusterDir::open(&d.dir)?, d.output).await?
            );
        }
        Command::Endpoints(d) => {
            print!(
                "{}",
                inspect::endpoints(&clusterdir::ClusterDir::open(&d.dir)?, d.output).await?
            );
        }
        Command::Explain { what } => match what {
            ExplainCommand::Service { name, agent } => {
                print!(
                    "{}",
                    inspect::explain_service(&agent.address()?, &name, agent.output).await?
                );
            }
            ExplainCommand::Endpoint { ip, agent } => {
                print!(
                    "{}",
                    inspect::explain_endpoint(&agent.address()?, &ip, agent.output).await?
                );
            }
        },
        Command::Bpf { map, agent } => {
            print!(
                "{}",
                inspect::bpf(&agent.address()?, &map, agent.output).await?
            );
        }
        Command::Connectivity {
            command:
                ConnectivityCommand::Test {
                    dir,
                    destination_dir,
                    test,
                    pod_prefix,
                    service_prefix,
                    action_timeout,
                    wait,
                    output,
                },
        } => {
            let options = connectivity::Options {
                dir,
                destination_dir,
                test,
                output,
                addresses: connectivity::Addresses {
                    pods: pod_prefix,
                    services: service_prefix,
                },
                action_timeout,
                wait,
            };
            // Dropping the test on a signal (a closed terminal too) removes what it made.
            let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("installing the SIGHUP handler")?;
            tokio::select! {
                r = connectivity::test(options) => return r,
                r = shutdown_signal() => r?,
                _ = hangup.recv() => {}
            }
            bail!("interrupted: the test pods, services and policies were removed");
        }
        Command::Observe {
            agent,
            verdict,
            cluster,
            identity,
            since,
            last,
            no_follow,
            count,
        } => {
            let filter = inspect::EventFilter {
                verdict,
                cluster,
                identity,
            };
            let since_ms = since.map(|d| {
                std::time::SystemTime::now()
                    .checked_sub(d)
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
            });
            // Not following and no window: the last 20, as `hubble observe` prints.
            let last = last.or((no_follow && since_ms.is_none()).then_some(20));
            let window = inspect::Window {
                since_ms,
                last,
                follow: !no_follow,
            };
            let addr = agent.address()?;
            tokio::select! {
                r = inspect::observe(&addr, &filter, &window, agent.output, count) => r?,
                r = shutdown_signal() => r?,
            }
        }
    }
    Ok(true)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The one crypto provider of the process: ring (no aws-lc, no openssl).
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a rustls crypto provider was already installed");
        return std::process::ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime failed: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The exporter's gRPC channel lives on the runtime.
    let telemetry = match runtime.block_on(async { start_telemetry(&cli.command) }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let (telemetry, otel) = match telemetry {
        Some((t, layer)) => (Some(t), Some(layer)),
        None => (None, None),
    };
    init_logging(cli.log_format, otel);
    if telemetry.is_some() {
        tracing::info!("tracing changes to the OTLP collector (docs/OBSERVABILITY.md)");
    }
    let format = match cli.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let result = runtime.block_on(run(cli.command, format));
    if let Some(t) = telemetry {
        t.shutdown();
    }
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
