//! The agent's configuration file (YAML, unknown fields refused, paths relative to the file).

use std::path::{Path, PathBuf};

use clustermesh_model::cluster::ClusterName;
use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path} failed")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not match the schema.
    #[error("{path} is not a valid agent configuration: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Which datapath the agent programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatapathKind {
    /// eBPF maps and programs (needs CAP_BPF, CAP_NET_ADMIN, cgroup v2, bpffs).
    #[default]
    Bpf,
    /// The same maps in memory (unprivileged runs).
    Userspace,
}

impl std::str::FromStr for DatapathKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bpf" => Ok(Self::Bpf),
            "userspace" => Ok(Self::Userspace),
            other => Err(format!("unknown datapath {other:?} (bpf or userspace)")),
        }
    }
}

/// The local apiserver and the agent's client certificate (`local-<cluster>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiserverSection {
    /// Its Export address, `host:port`.
    pub address: String,
    /// The cluster's CA.
    pub ca: PathBuf,
    /// The agent's client certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// The eBPF datapath's places.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BpfSection {
    /// bpffs directory (default `/sys/fs/bpf/clustermesh`); maps are pinned under
    /// `<root>/<cluster>/<node>/`.
    #[serde(default = "default_bpf_root")]
    pub root: PathBuf,
    /// The cgroup v2 directory whose sockets get service load balancing (default: the
    /// cgroup v2 root, `/sys/fs/cgroup`).
    #[serde(default = "default_cgroup")]
    pub cgroup: PathBuf,
    /// The network namespace holding the endpoints' host-side interfaces and the host routes
    /// to them (default: the agent's own).
    #[serde(default)]
    pub endpoint_netns: Option<PathBuf>,
    /// Interface-name patterns (glob, e.g. `lxc*`) accepted as endpoints' host-side
    /// interfaces besides veths. The interface of a default route and any route through a
    /// gateway are refused whatever the patterns say.
    #[serde(default)]
    pub endpoint_interfaces: Vec<String>,
    /// When the socket load balancer ejects a failing backend (per client network
    /// namespace) and how it comes back.
    #[serde(default)]
    pub outlier_detection: OutlierSection,
}

impl Default for BpfSection {
    fn default() -> Self {
        Self {
            root: default_bpf_root(),
            cgroup: default_cgroup(),
            endpoint_netns: None,
            endpoint_interfaces: Vec::new(),
            outlier_detection: OutlierSection::default(),
        }
    }
}

/// Outlier detection in the socket load balancer (`bpf.outlierDetection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierSection {
    /// Consecutive failed connects that eject a backend (default 3; 0 turns outlier
    /// detection off).
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// A connect unanswered this long, with no success since, ejects the backend (default
    /// 1000; 0: only failures count).
    #[serde(default = "default_window_millis")]
    pub window_millis: u64,
    /// The wait before a trial connection to an ejected backend, doubled after each failed
    /// trial up to 16 times (default 2000; 1 to 3,600,000).
    #[serde(default = "default_probe_interval_millis")]
    pub probe_interval_millis: u64,
}

impl Default for OutlierSection {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            window_millis: default_window_millis(),
            probe_interval_millis: default_probe_interval_millis(),
        }
    }
}

impl OutlierSection {
    /// The datapath's settings.
    pub fn settings(&self) -> clustermesh_bpf::OutlierDetection {
        clustermesh_bpf::OutlierDetection {
            consecutive_failures: self.consecutive_failures,
            window: std::time::Duration::from_millis(self.window_millis),
            probe_interval: std::time::Duration::from_millis(self.probe_interval_millis),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    3
}

fn default_window_millis() -> u64 {
    1000
}

fn default_probe_interval_millis() -> u64 {
    2000
}

fn default_bpf_root() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/clustermesh")
}

fn default_cgroup() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
}

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The local cluster.
    pub cluster: ClusterName,
    /// This node's name, as in its Node object.
    pub node_name: String,
    /// The local apiserver.
    pub apiserver: ApiserverSection,
    /// `bpf` (default) or `userspace`; `--datapath` overrides it.
    #[serde(default)]
    pub datapath: DatapathKind,
    /// eBPF places.
    #[serde(default)]
    pub bpf: BpfSection,
    /// Plain HTTP admin listener: `/healthz`, `/readyz`, `/metrics`, `/status`, `/explain/...`
    /// (default `127.0.0.1:9891`).
    #[serde(default = "default_admin")]
    pub admin: String,
    /// A second listener serving only `/metrics` and `/healthz`, for a Prometheus on the
    /// network (e.g. `0.0.0.0:9962`, Cilium's agent metrics port); none by default.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Quiet time that ends a burst of changes before the datapath is written (default 2).
    #[serde(default = "default_debounce")]
    pub debounce_millis: u64,
    /// The longest a change waits for a burst to end (default 20).
    #[serde(default = "default_max_debounce")]
    pub max_debounce_millis: u64,
    /// OpenTelemetry tracing of changes (off unless an OTLP endpoint is set here or in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; docs/OBSERVABILITY.md).
    #[serde(default)]
    pub tracing: clustermesh_telemetry::TracingSection,
}

fn default_admin() -> String {
    "127.0.0.1:9891".to_owned()
}

fn default_debounce() -> u64 {
    2
}

fn default_max_debounce() -> u64 {
    20
}

impl Config {
    /// Reads and checks a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            ConfigError::Parse { reason, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Parses YAML, resolving relative paths against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut c: Self = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            reason: e.to_string(),
        })?;
        if c.node_name.is_empty() {
            return Err(ConfigError::Parse {
                path: String::new(),
                reason: "nodeName must not be empty".into(),
            });
        }
        // The keys alone (the environment is read when the agent starts).
        clustermesh_telemetry::Settings::resolve(&c.tracing, "clustermesh-agent", |_| None)
            .map_err(|e| ConfigError::Parse {
                path: String::new(),
                reason: e.to_string(),
            })?;
        if c.max_debounce_millis < c.debounce_millis {
            return Err(ConfigError::Parse {
                path: String::new(),
                reason: "maxDebounceMillis must not be below debounceMillis".into(),
            });
        }
        let outlier = &c.bpf.outlier_detection;
        if !(1..=3_600_000).contains(&outlier.probe_interval_millis)
            || outlier.window_millis > 3_600_000
        {
            return Err(ConfigError::Parse {
                path: String::new(),
                reason: "bpf.outlierDetection: probeIntervalMillis must be 1 to 3600000 and windowMillis at most 3600000".into(),
            });
        }
        if let Err(reason) = crate::attach::InterfacePolicy::new(&c.bpf.endpoint_interfaces) {
            return Err(ConfigError::Parse {
                path: String::new(),
                reason: format!("bpf.endpointInterfaces: {reason}"),
            });
        }
        for p in [
            &mut c.apiserver.ca,
            &mut c.apiserver.cert,
            &mut c.apiserver.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "cluster: c1\nnodeName: n1\napiserver: {address: \"127.0.0.1:2379\", ca: ca.pem, cert: local.pem, key: /k.pem}\n";

    #[test]
    fn parses_with_defaults_and_resolves_paths() {
        let c = Config::parse(GOOD, Path::new("/etc/cm")).unwrap();
        assert_eq!(c.cluster.as_str(), "c1");
        assert_eq!(c.apiserver.ca, Path::new("/etc/cm/ca.pem"));
        assert_eq!(c.apiserver.key, Path::new("/k.pem"));
        assert_eq!(c.datapath, DatapathKind::Bpf);
        assert_eq!(c.bpf.root, Path::new("/sys/fs/bpf/clustermesh"));
        assert_eq!((c.debounce_millis, c.max_debounce_millis), (2, 20));
        assert_eq!(c.admin, "127.0.0.1:9891");
    }

    #[test]
    fn refuses_bad_files_with_a_reason() {
        let cases = [
            (GOOD.replace("cluster: c1", "cluster: Bad_Name"), "cluster"),
            (GOOD.replace("nodeName: n1", "nodeName: \"\""), "nodeName"),
            (format!("{GOOD}datapath: xdp\n"), "unknown variant"),
            (format!("{GOOD}colour: red\n"), "unknown field"),
            (format!("{GOOD}debounceMillis: 50\n"), "maxDebounceMillis"),
            (
                format!("{GOOD}bpf: {{endpointInterfaces: [\"lxc[\"]}}\n"),
                "bpf.endpointInterfaces",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(&text, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
        assert!("xdp".parse::<DatapathKind>().is_err());
    }
}
