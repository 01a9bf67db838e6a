//! `clustermesh connectivity test`: Cilium's multi-cluster connectivity tests (the L3/L4
//! ones; `connectivity/README.md`) against a running mesh of two clusters on the eBPF
//! datapath, on real packets. It deploys the test pods, runs each test (its policies applied
//! in both clusters, then its scenarios), compares every action with cilium-cli's expected
//! verdict, prints one line per test and a summary, and removes everything it made.
//!
//! An expected drop passes only if the connection fails *and* an agent reported the denied
//! packet where cilium-cli expects it (egress of the source or ingress of the destination;
//! by a deny rule or by default deny): a timeout for another reason is no pass.

mod deploy;
mod suite;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::output::{Format, get_json};
use deploy::{Cluster, Deployment};
use suite::{Action, Expect, PODS, TESTS, Test};

pub(crate) use deploy::{Addresses, octets};

/// The command's options.
pub(crate) struct Options {
    /// The source cluster's directory, or `up`'s data directory.
    pub(crate) dir: PathBuf,
    /// The destination cluster's directory.
    pub(crate) destination_dir: Option<PathBuf>,
    /// Only tests whose name matches.
    pub(crate) test: Option<regex::Regex>,
    /// Output format.
    pub(crate) output: Format,
    /// Addresses of the test pods and Services.
    pub(crate) addresses: Addresses,
    /// How long one connection attempt or ping may take.
    pub(crate) action_timeout: Duration,
    /// How long to wait for the agents (pods, policies).
    pub(crate) wait: Duration,
}

/// The two cluster directories: as given, or the first two (by name) of `up`'s data
/// directory.
fn cluster_dirs(o: &Options) -> anyhow::Result<(PathBuf, PathBuf)> {
    let is_cluster = |p: &Path| p.join("apiserver.yaml").is_file();
    if is_cluster(&o.dir) {
        let Some(dst) = &o.destination_dir else {
            bail!(
                "{} is one cluster: name the other with --destination-dir (or give up's data directory)",
                o.dir.display()
            );
        };
        return Ok((o.dir.clone(), dst.clone()));
    }
    if o.destination_dir.is_some() {
        bail!(
            "{} is no cluster directory (no apiserver.yaml)",
            o.dir.display()
        );
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&o.dir)
        .with_context(|| format!("reading {}", o.dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_cluster(p))
        .collect();
    // c1, c2, ..., c10: by length, then by name.
    found.sort_by_key(|p| (p.as_os_str().len(), p.clone()));
    match found.as_slice() {
        [a, b, ..] => Ok((a.clone(), b.clone())),
        _ => bail!(
            "{} holds fewer than two cluster directories: start a mesh with `clustermesh up --datapath bpf`, or give --dir A --destination-dir B",
            o.dir.display()
        ),
    }
}

/// The lock that keeps a second connectivity test off the same machine (the test pods'
/// namespaces have fixed names).
fn lock() -> anyhow::Result<std::fs::File> {
    let path = Path::new("/run/clustermesh-connectivity-test.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    crate::up::try_lock(
        f,
        "another `clustermesh connectivity test` is running on this machine",
    )
}

/// Polls `check` every 10 ms until it returns `Ok(None)`, or `wait` passes: then the last
/// `Some(why)` is the error.
async fn wait_until<F, Fut>(wait: Duration, what: &str, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<String>>>,
{
    let start = Instant::now();
    loop {
        let why = match check().await {
            Ok(None) => return Ok(start.elapsed()),
            Ok(Some(why)) => why,
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() >= wait {
            bail!("{what}: not within {} s: {why}", wait.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What is still missing before an agent can run the tests: its own pods attached, every
/// pod in its ipcache map, the echo Services with backends in its services map.
async fn not_ready(c: &Cluster, remote: bool, a: &Addresses) -> anyhow::Result<Option<String>> {
    let status = get_json(&c.admin, "/status").await?;
    for pod in PODS.iter().filter(|p| p.remote == remote) {
        let ip = a.pod(pod).to_string();
        let e = &status["endpoints"][&ip];
        if e["interface"].is_null() || !e["error"].is_null() {
            return Ok(Some(format!(
                "{}: pod {} ({ip}) has no policy programs attached ({})",
                c.name,
                pod.name,
                e["error"]
                    .as_str()
                    .unwrap_or("not an endpoint of the agent yet")
            )));
        }
    }
    let ipcache = get_json(&c.admin, "/maps/ipcache").await?;
    for pod in &PODS {
        let prefix = format!("{}/32", a.pod(pod));
        if !ipcache
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r["prefix"] == prefix.as_str() && r["identity"].as_u64().unwrap_or(0) != 0)
        {
            return Ok(Some(format!(
                "{}: pod {} ({prefix}) is not in the ipcache map",
                c.name, pod.name
            )));
        }
    }
    let services = get_json(&c.admin, "/maps/services").await?;
    for echo in suite::ECHOES.iter().filter(|e| !remote || e.remote) {
        let vip = a.service(echo).to_string();
        if !services.as_array().into_iter().flatten().any(|r| {
            r["vip"] == vip.as_str()
                && r["port"] == suite::ECHO_PORT
                && r["backends"].as_array().is_some_and(|b| b.len() == 1)
        }) {
            return Ok(Some(format!(
                "{}: service {}/{} ({vip}:{}) does not have its backend in the services map",
                c.name,
                suite::NAMESPACE,
                echo.name,
                suite::ECHO_PORT
            )));
        }
    }
    Ok(None)
}

/// What the agent of `c` enforces of the test's policies, unless it is exactly `want`.
async fn policies_differ(c: &Cluster, want: &[String]) -> anyhow::Result<Option<String>> {
    let status = get_json(&c.admin, "/status").await?;
    let prefix = format!("{}/", suite::NAMESPACE);
    let have: Vec<&str> = status["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|p| p.starts_with(&prefix))
        .collect();
    if have == want {
        Ok(None)
    } else {
        Ok(Some(format!(
            "the agent of {} enforces [{}], the test wants [{}]",
            c.name,
            have.join(", "),
            want.join(", ")
        )))
    }
}

/// An agent's verdict events while a test runs.
struct Collector {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<Value>>,
}

impl Collector {
    /// Subscribed once this returns: every later event is collected.
    async fn start(admin: &str) -> anyhow::Result<Self> {
        let mut lines = crate::output::open_lines(admin, "/events").await?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    line = lines.next_line() => match line {
                        Ok(Some(l)) => {
                            if let Ok(v) = serde_json::from_str::<Value>(&l) {
                                out.push(v);
                            }
                        }
                        _ => break,
                    },
                }
            }
            out
        });
        Ok(Self { stop, task })
    }

    async fn finish(self) -> Vec<Value> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// How an action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Observed {
    /// Answered (TCP: by the named server; ICMP: an echo reply).
    Answered(String),
    /// No answer within the timeout.
    TimedOut,
    /// Anything else (refused, unreachable, the probe failed).
    Failed(String),
}

impl Observed {
    fn describe(&self) -> String {
        match self {
            Self::Answered(by) => format!("ok (answered by {by})"),
            Self::TimedOut => "no answer (timed out)".to_owned(),
            Self::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// Where an action runs and what it runs.
struct Runner<'a> {
    source: &'a Cluster,
    addresses: Addresses,
    probe: PathBuf,
    timeout: Duration,
}

impl Runner<'_> {
    /// The address the action connects to.
    fn target(&self, a: &Action) -> Ipv4Addr {
        match a {
            Action::PodToService(_, d) => self.addresses.service(d),
            _ => self.addresses.pod(&a.destination()),
        }
    }

    /// Runs the probe in the source pod (its namespace, the source cluster's socket-LB
    /// cgroup).
    async fn run(&self, a: &Action) -> Observed {
        let target = self.target(a);
        let ms = self.timeout.as_millis().to_string();
        let args: Vec<String> = match a {
            Action::ClientToClient(..) => vec!["icmp".into(), target.to_string()],
            _ => vec!["tcp".into(), format!("{target}:{}", suite::ECHO_PORT)],
        };
        let pod = crate::playground::in_pod(
            &self.source.cgroup,
            &deploy::pod_namespace(&a.source()),
            &self.probe,
        );
        let out = tokio::process::Command::from(pod)
            .args(&args)
            .args(["--timeout-ms", &ms])
            .kill_on_drop(true)
            .output()
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) => return Observed::Failed(format!("running cm-netprobe: {e}")),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().next().unwrap_or_default().trim();
        match line.split_once(' ') {
            Some(("ok", by)) => Observed::Answered(by.to_owned()),
            Some(("err", why)) if why.starts_with("TimedOut") || why.starts_with("WouldBlock") => {
                Observed::TimedOut
            }
            Some(("err", why)) => Observed::Failed(why.to_owned()),
            _ => Observed::Failed(format!(
                "cm-netprobe printed {line:?} ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }
}

/// The result of one action.
struct ActionResult {
    action: Action,
    expected: Expect,
    observed: Observed,
    /// The verdict events about the action's packets.
    events: Vec<Value>,
    /// Why it failed, if it did.
    failure: Option<String>,
}

/// Judges an action: what it observed and the events against what cilium-cli expects.
fn judge(
    a: &Action,
    expected: Expect,
    observed: &Observed,
    events: &[Value],
    addresses: &Addresses,
) -> Option<String> {
    let dst = a.destination();
    match (expected, observed) {
        (Expect::Ok, Observed::Answered(by)) => {
            let want = match a {
                Action::ClientToClient(..) => addresses.pod(&dst).to_string(),
                _ => dst.name.to_owned(),
            };
            (*by != want).then(|| format!("expected an answer from {want}, observed one from {by}"))
        }
        (Expect::Drop(d), Observed::TimedOut) => {
            let seen = events.iter().any(|e| {
                e["verdict"] == "denied"
                    && e["direction"] == d.direction()
                    && (e["rule"].as_u64().unwrap_or(0) != 0) == d.by_deny_rule()
            });
            (!seen).then(|| {
                format!(
                    "expected {}, observed no answer, but no agent reported the packets {}",
                    d.describe(),
                    d.describe()
                )
            })
        }
        (e, o) => Some(format!(
            "expected {}, observed {}",
            e.describe(),
            o.describe()
        )),
    }
}

/// The verdict events of one action: packets from its source to its destination pod (after
/// the socket load balancer, they go to the pod) of its protocol. Actions that run at once
/// never share a pair of pods and a protocol ([`rounds`]), so these are its own packets.
fn events_of(a: &Action, addresses: &Addresses, all: &[Value]) -> Vec<Value> {
    let src = addresses.pod(&a.source()).to_string();
    let dst = addresses.pod(&a.destination()).to_string();
    let icmp = matches!(a, Action::ClientToClient(..));
    all.iter()
        .filter(|e| {
            e["src"] == src.as_str() && e["dst"] == dst.as_str() && (e["proto"] == 1) == icmp
        })
        .cloned()
        .collect()
}

/// Splits a test's actions into rounds that run one after the other; within a round, no two
/// actions involve the same two pods (either way) with the same protocol, so that the packets
/// and verdict events of one cannot be taken for another's.
fn rounds(actions: &[(Action, Expect)]) -> Vec<Vec<usize>> {
    let key = |a: &Action| {
        let (s, d) = (a.source().name, a.destination().name);
        (s.min(d), s.max(d), matches!(a, Action::ClientToClient(..)))
    };
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, (a, _)) in actions.iter().enumerate() {
        let free = out
            .iter()
            .position(|r| r.iter().all(|j| key(&actions[*j].0) != key(a)));
        match free {
            Some(r) => out[r].push(i),
            None => out.push(vec![i]),
        }
    }
    out
}

/// One test's outcome.
struct TestResult {
    name: &'static str,
    /// `None`: skipped.
    actions: Option<Vec<ActionResult>>,
    /// A failure of the test itself (its policies were not enforced in time).
    error: Option<String>,
    /// From writing the policies to every agent enforcing them.
    enforced_after: Option<Duration>,
}

impl TestResult {
    fn result(&self) -> &'static str {
        match &self.actions {
            None => "skip",
            Some(a) if self.error.is_none() && a.iter().all(|r| r.failure.is_none()) => "pass",
            Some(_) => "fail",
        }
    }

    fn json(&self) -> Value {
        let actions: Vec<Value> = self
            .actions
            .iter()
            .flatten()
            .map(|r| {
                json!({
                    "scenario": r.action.scenario(),
                    "source": r.action.source().name,
                    "destination": r.action.destination().name,
                    "action": r.action.describe(),
                    "expected": r.expected.describe(),
                    "observed": r.observed.describe(),
                    "result": if r.failure.is_none() { "pass" } else { "fail" },
                    "reason": r.failure,
                    "events": r.events,
                })
            })
            .collect();
        json!({
            "name": self.name,
            "result": self.result(),
            "error": self.error,
            "policies": TESTS.iter().find(|t| t.name == self.name).map(|t| t.policies),
            "policiesEnforcedSeconds": self.enforced_after.map(|d| d.as_secs_f64()),
            "actions": actions,
        })
    }

    /// The lines a person reads: ✅/❌ and, for a failure, each failed action with its
    /// events.
    fn text(&self, index: usize, total: usize) -> String {
        let n = self.actions.as_ref().map_or(0, Vec::len);
        let mut out = match self.result() {
            "pass" => format!("✅ [{index}/{total}] {} ({n} actions)", self.name),
            _ => format!("❌ [{index}/{total}] {}", self.name),
        };
        if let Some(e) = &self.error {
            out.push_str(&format!("\n   {e}"));
        }
        for r in self.actions.iter().flatten() {
            let Some(why) = &r.failure else { continue };
            out.push_str(&format!("\n   {}: {why}", r.action.describe()));
            if r.events.is_empty() {
                out.push_str("\n     no verdict events about these packets");
            }
            // Retransmissions make the same line again (at another time): said once, at the
            // first time, with the count.
            let mut lines: Vec<(String, String, usize)> = Vec::new();
            for e in &r.events {
                let mut timeless = e.clone();
                let time = timeless
                    .as_object_mut()
                    .and_then(|o| o.remove("time"))
                    .and_then(|t| t.as_str().map(|t| format!("{t} ")))
                    .unwrap_or_default();
                let line = crate::inspect::event_line(&timeless);
                match lines.last_mut() {
                    Some((_, last, n)) if *last == line => *n += 1,
                    _ => lines.push((time, line, 1)),
                }
            }
            for (time, line, n) in lines {
                let times = if n > 1 {
                    format!(" (×{n})")
                } else {
                    String::new()
                };
                out.push_str(&format!("\n     {time}{line}{times}"));
            }
        }
        out
    }
}

/// The suite against a deployed mesh.
struct Suite<'a> {
    source: &'a Cluster,
    destination: &'a Cluster,
    runner: Runner<'a>,
    wait: Duration,
}

impl Suite<'_> {
    fn clusters(&self) -> [&Cluster; 2] {
        [self.source, self.destination]
    }

    /// Runs one test; with `Err`, its policies could not be removed, and no later test can be
    /// trusted (the result is in the error's place too).
    async fn run_test(&self, d: &mut Deployment, t: &Test) -> (TestResult, Option<String>) {
        let mut result = TestResult {
            name: t.name,
            actions: Some(Vec::new()),
            error: None,
            enforced_after: None,
        };
        match self.apply(d, t.policies).await {
            Ok(after) => {
                result.enforced_after = after;
                match self.actions(t).await {
                    Ok(r) => result.actions = Some(r),
                    Err(e) => result.error = Some(format!("{e:#}")),
                }
            }
            Err(e) => result.error = Some(format!("{e:#}")),
        }
        let stop = match self.apply(d, &[]).await {
            Ok(_) => None,
            Err(e) => {
                let why = format!("removing the policies of {}: {e:#}", t.name);
                result.error.get_or_insert(why.clone());
                Some(why)
            }
        };
        (result, stop)
    }

    /// Writes the policies into both clusters (none: removes them) and waits until both
    /// agents enforce exactly them; the time that took, when there were policies.
    async fn apply(&self, d: &mut Deployment, files: &[&str]) -> anyhow::Result<Option<Duration>> {
        let (text, names) = deploy::policies(files)?;
        for c in self.clusters() {
            let path = c.manifests.join(deploy::POLICY_FILE);
            if files.is_empty() {
                Deployment::remove_file(&path).map_err(anyhow::Error::msg)?;
            } else {
                d.write(&path, &text)?;
            }
        }
        let what = if files.is_empty() {
            "removing the test's policies"
        } else {
            "enforcing the test's policies"
        };
        let took = wait_until(self.wait, what, || async {
            for c in self.clusters() {
                if let Some(why) = policies_differ(c, &names).await? {
                    return Ok(Some(why));
                }
            }
            Ok(None)
        })
        .await?;
        Ok((!files.is_empty()).then_some(took))
    }

    /// Runs every action of the test at once and judges each.
    async fn actions(&self, t: &Test) -> anyhow::Result<Vec<ActionResult>> {
        let planned = t.actions();
        let a = &self.runner.addresses;
        let mut results: Vec<Option<ActionResult>> = planned.iter().map(|_| None).collect();
        for round in rounds(&planned) {
            let mut collectors = Vec::new();
            for c in self.clusters() {
                collectors.push(Collector::start(&c.admin).await?);
            }
            let observed =
                futures::future::join_all(round.iter().map(|i| self.runner.run(&planned[*i].0)))
                    .await;
            // Events of the last packets are a ring buffer and a stream away.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut events = Vec::new();
            for c in collectors {
                events.extend(c.finish().await);
            }
            for (i, observed) in round.into_iter().zip(observed) {
                let (action, expected) = planned[i];
                let events = events_of(&action, a, &events);
                let failure = judge(&action, expected, &observed, &events, a);
                results[i] = Some(ActionResult {
                    action,
                    expected,
                    observed,
                    events,
                    failure,
                });
            }
        }
        Ok(results.into_iter().flatten().collect())
    }
}

/// Deploys the pods and waits until both agents have them.
async fn deploy(
    d: &mut Deployment,
    source: &Cluster,
    destination: &Cluster,
    a: &Addresses,
    probe: &Path,
    wait: Duration,
) -> anyhow::Result<()> {
    for (c, remote) in [(source, false), (destination, true)] {
        for pod in PODS.iter().filter(|p| p.remote == remote) {
            d.pod(c, pod, a.pod(pod), probe)?;
        }
    }
    for (c, remote) in [(source, false), (destination, true)] {
        d.write(
            &c.manifests.join(deploy::PODS_FILE),
            &deploy::manifest(c, remote, a),
        )?;
    }
    wait_until(wait, "deploying the test pods", || async {
        for (c, remote) in [(source, false), (destination, true)] {
            if let Some(why) = not_ready(c, remote, a).await? {
                return Ok(Some(why));
            }
        }
        Ok(None)
    })
    .await?;
    Ok(())
}

/// Refuses addresses that the mesh already uses, and policies already in `cilium-test` (the
/// test needs the namespace to itself: it waits for the agents to enforce exactly each
/// test's policies there).
async fn check_unused(clusters: [&Cluster; 2], a: &Addresses) -> anyhow::Result<()> {
    let ours: Vec<String> = PODS.iter().map(|p| format!("{}/32", a.pod(p))).collect();
    let vips: Vec<String> = suite::ECHOES
        .iter()
        .map(|e| a.service(e).to_string())
        .collect();
    // A killed run's objects were removed just now: give the agents a moment to drop them.
    let check = || async {
        for c in clusters {
            if let Some(why) = policies_differ(c, &[]).await? {
                return Ok(Some(format!(
                    "{why}: namespace {} must have no policies when the test starts",
                    suite::NAMESPACE
                )));
            }
            let ipcache = get_json(&c.admin, "/maps/ipcache").await?;
            if let Some(r) = ipcache.as_array().into_iter().flatten().find(|r| {
                r["prefix"]
                    .as_str()
                    .is_some_and(|p| ours.iter().any(|o| o == p))
            }) {
                return Ok(Some(format!(
                    "{} is in use in {} (choose other addresses with --pod-prefix)",
                    r["prefix"].as_str().unwrap_or("?"),
                    c.name
                )));
            }
            let services = get_json(&c.admin, "/maps/services").await?;
            if let Some(r) = services.as_array().into_iter().flatten().find(|r| {
                r["vip"]
                    .as_str()
                    .is_some_and(|v| vips.iter().any(|o| o == v))
            }) {
                return Ok(Some(format!(
                    "the VIP {} is in use in {} (choose others with --service-prefix)",
                    r["vip"].as_str().unwrap_or("?"),
                    c.name
                )));
            }
        }
        Ok(None)
    };
    wait_until(Duration::from_secs(10), "checking the mesh", check).await?;
    Ok(())
}

/// The p-th percentile (0..=100) of sorted durations, nearest rank.
fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// `clustermesh connectivity test`; `Ok(false)` when a test failed.
pub(crate) async fn test(o: Options) -> anyhow::Result<bool> {
    let (src_dir, dst_dir) = cluster_dirs(&o)?;
    let _lock = lock()?;
    let source = Cluster::open(&src_dir).await?;
    let destination = Cluster::open(&dst_dir).await?;
    if source.name == destination.name {
        bail!("both directories are cluster {}", source.name);
    }
    let probe = std::env::current_exe()
        .context("finding the clustermesh binary")?
        .with_file_name("cm-netprobe");
    if !probe.is_file() {
        bail!(
            "{} is missing: build it beside clustermesh (cargo build -p clustermesh -p clustermesh-bpf --bins, as scripts/up does)",
            probe.display()
        );
    }
    let table = o.output == Format::Table;
    let say = |s: String| {
        if table {
            println!("{s}");
        }
    };
    // Removes what a killed run left, and, from here on, everything this run makes — also
    // when this future is dropped (Ctrl-C).
    if source.manifests == destination.manifests {
        bail!(
            "both clusters read {}: the test needs each cluster's own manifest directory",
            source.manifests.display()
        );
    }
    let mut d = Deployment::new(&[&source, &destination])?;
    check_unused([&source, &destination], &o.addresses).await?;
    let started = Instant::now();
    say(format!(
        "ℹ️  Source cluster {} (agent {}), destination cluster {} (agent {})",
        source.name, source.admin, destination.name, destination.admin
    ));
    say(format!(
        "⌛ Deploying namespace {} (pods client, client2, echo-same-node in {}; echo-other-node in {})...",
        suite::NAMESPACE,
        source.name,
        destination.name
    ));
    deploy(&mut d, &source, &destination, &o.addresses, &probe, o.wait).await?;
    let suite = Suite {
        source: &source,
        destination: &destination,
        runner: Runner {
            source: &source,
            addresses: o.addresses,
            probe,
            timeout: o.action_timeout,
        },
        wait: o.wait,
    };
    say(format!("🏃 Running {} tests...", TESTS.len()));
    let mut results = Vec::new();
    let mut stopped: Option<String> = None;
    for (i, t) in TESTS.iter().enumerate() {
        let selected = o.test.as_ref().is_none_or(|r| r.is_match(t.name));
        let r = if let Some(why) = stopped.as_ref().filter(|_| selected) {
            TestResult {
                name: t.name,
                actions: Some(Vec::new()),
                error: Some(format!("not run: {why}")),
                enforced_after: None,
            }
        } else if selected {
            let (r, stop) = suite.run_test(&mut d, t).await;
            stopped = stopped.or(stop);
            r
        } else {
            TestResult {
                name: t.name,
                actions: None,
                error: None,
                enforced_after: None,
            }
        };
        // Tests left out by --test are counted, not listed.
        if selected {
            say(r.text(i + 1, TESTS.len()));
        }
        results.push(r);
    }
    let problems = d.finish();
    let took = started.elapsed();
    let count = |what: &str| results.iter().filter(|r| r.result() == what).count();
    let (passed, failed, skipped) = (count("pass"), count("fail"), count("skip"));
    let mut enforced: Vec<Duration> = results.iter().filter_map(|r| r.enforced_after).collect();
    enforced.sort();
    let (p50, p99) = (percentile(&enforced, 50), percentile(&enforced, 99));
    if table {
        for p in &problems {
            println!("cleanup: {p}");
        }
        println!();
        let icon = if failed == 0 { "✅" } else { "❌" };
        println!(
            "{icon} {passed}/{} tests passed ({failed} failed, {skipped} skipped) in {:.1} s",
            passed + failed,
            took.as_secs_f64()
        );
        if let (Some(p50), Some(p99)) = (p50, p99) {
            println!(
                "   policies enforced by every agent after: p50 {} ms, p99 {} ms ({} tests with policies)",
                p50.as_millis(),
                p99.as_millis(),
                enforced.len()
            );
        }
        if failed > 0 {
            let names: Vec<&str> = results
                .iter()
                .filter(|r| r.result() == "fail")
                .map(|r| r.name)
                .collect();
            println!("   failed: {}", names.join(", "));
        }
    } else {
        let out = json!({
            "source": source.name,
            "destination": destination.name,
            "tests": results.iter().map(TestResult::json).collect::<Vec<_>>(),
            "passed": passed,
            "failed": failed,
            "skipped": skipped,
            "durationSeconds": took.as_secs_f64(),
            "policiesEnforced": {
                "samples": enforced.len(),
                "p50Seconds": p50.map(|d| d.as_secs_f64()),
                "p99Seconds": p99.map(|d| d.as_secs_f64()),
            },
            "cleanupProblems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(failed == 0 && problems.is_empty())
}

#[cfg(test)]
mod tests;
