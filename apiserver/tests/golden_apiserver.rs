//! The golden-data runner (issue 16): Cilium's own script tests of its clustermesh-apiserver
//! (`tests/golden/cilium-golden/*.txtar`, unchanged) run against ours, on the embedded store
//! and on a real etcd.
//!
//! - `hive/start` starts our apiserver in this process with a Kubernetes source whose API
//!   server is the fake of `support/fake_api.rs` (kube's mock service), configured from the
//!   script's `#!` flags; `hive/stop` stops it (the store stays).
//! - `k8s/add|update|delete FILE...` turn the YAML documents into `ADDED`, `MODIFIED` and
//!   `DELETED` watch events: the objects reach the apiserver through kube's watchers and the
//!   same parser as every source.
//! - `kvstore/list [-o json|plain] PREFIX FILE` dumps the store in Cilium's format. On etcd
//!   the same prefix is also read with the real `etcdctl get --prefix -w json` (Debian's
//!   `etcd-client`), and the command fails when the two differ.
//!
//! A scenario built on inputs the apiserver does not read (CiliumEndpoint, CiliumNode,
//! CiliumIdentity, CiliumEndpointSlice, ServiceExport and its CRD, the 1.20 EndpointSlice
//! export) is skipped with the reason, found by reading the script before it runs. Each
//! run writes one line per scenario and a summary line to
//! `$CARGO_TARGET_TMPDIR/golden/apiserver-<store>.txt`, which `scripts/test` prints; the test
//! fails when a scenario fails, when a runnable one meets a command the runner does not have,
//! or when the scenarios that pass are not exactly [`MUST_PASS`].

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    reason = "test code: a panic is the failure report; the script engine is synchronous and runs outside the runtime"
)]

#[path = "support/fake_api.rs"]
mod fake_api;
mod golden;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use clustermesh_apiserver::{Config, Running};
use clustermesh_certs::CertificateAuthority;
use clustermesh_kvstore::testing::EtcdServer;
use clustermesh_model::ClusterName;
use fake_api::FakeApi;
use golden::{
    Component, Outcome, Script, archives, list_args, list_output, parse_script, parse_txtar,
};
use tokio::runtime::Runtime;

/// The scenarios whose inputs are Namespaces, Services and EndpointSlices, with what they
/// check: every one must pass, on both stores.
const MUST_PASS: [&str; 4] = [
    // cluster-config
    "clusterconfig.txtar",
    // cluster-config before and after a restart with CLUSTERMESH_DEFAULT_GLOBAL_NAMESPACE
    "global-services-filtering.txtar",
    // services of global namespaces only, the synced canary, annotation toggles
    "globalnamespace-services.txtar",
    // as global-services-filtering
    "namespace-filtering.txtar",
];

/// How long a scenario's `*` retries may go on.
const DEADLINE: Duration = Duration::from_secs(30);

/// The kinds the apiserver reads from Kubernetes in these scenarios.
const READ_KINDS: [&str; 3] = ["Namespace", "Service", "EndpointSlice"];

/// Where the scenario's state is kept.
enum Store {
    Sled,
    Etcd,
}

impl Store {
    fn name(&self) -> &'static str {
        match self {
            Self::Sled => "sled",
            Self::Etcd => "etcd",
        }
    }
}

/// Why a scenario cannot run against this apiserver, read off its script before it runs:
/// a flag for a feature it does not have, an input kind it does not read, or a prefix it
/// does not write.
fn skip_reason(script: &Script, files: &BTreeMap<String, String>) -> Option<String> {
    for flag in &script.flags {
        let name = flag.split('=').next().unwrap_or_default();
        match name {
            "--cluster-id" | "--cluster-name" | "--clustermesh-default-global-namespace" => {}
            "--clustermesh-enable-mcs-api" => {
                return Some(
                    "MCS-API ServiceExports (--clustermesh-enable-mcs-api) are not exported".into(),
                );
            }
            "--clustermesh-service-v2" => {
                return Some(
                    "the 1.20 EndpointSlice export (--clustermesh-service-v2) is not written"
                        .into(),
                );
            }
            "--enable-cilium-endpoint-slice" => {
                return Some(
                    "CiliumEndpointSlice input is not read (the apiserver reads Pods)".into(),
                );
            }
            other => return Some(format!("flag {other} is not known to the runner")),
        }
    }
    for cmd in script.sections.iter().flatten() {
        let words: Vec<String> = cmd
            .words
            .iter()
            .map(|w| w.expand(&BTreeMap::new()))
            .collect();
        match words.first().map(String::as_str) {
            Some("k8s/add" | "k8s/update" | "k8s/delete") => {
                for file in &words[1..] {
                    let Some(text) = files.get(file) else {
                        continue;
                    };
                    for doc in golden::yaml_documents(text).unwrap_or_default() {
                        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
                        if !READ_KINDS.contains(&kind.as_str()) {
                            return Some(format!(
                                "{kind} input is not read (the apiserver reads {})",
                                match kind.as_str() {
                                    "CiliumEndpoint" | "CiliumEndpointSlice" => "Pods",
                                    "CiliumNode" => "Nodes",
                                    "CiliumIdentity" => "Pods and allocates identities itself",
                                    _ =>
                                        "Namespaces, Pods, Services, EndpointSlices, Nodes and policies",
                                }
                            ));
                        }
                    }
                }
            }
            Some("kvstore/list") => {
                if let Ok((_, prefix, _)) = list_args(&words[1..])
                    && prefix.starts_with("cilium/state/endpointslices")
                {
                    return Some(
                        "the 1.20 EndpointSlice export (cilium/state/endpointslices/v1) is not written"
                            .into(),
                    );
                }
            }
            _ => {}
        }
    }
    None
}

/// What the `#!` flags configure.
struct Flags {
    id: u32,
    name: ClusterName,
    default_global: Option<bool>,
}

fn parse_flags(flags: &[String]) -> Result<Flags, String> {
    let mut id = None;
    let mut name = None;
    let mut default_global = None;
    for f in flags {
        let (k, v) = f
            .split_once('=')
            .ok_or_else(|| format!("flag {f} has no value"))?;
        match k {
            "--cluster-id" => id = Some(v.parse::<u32>().map_err(|e| format!("{f}: {e}"))?),
            "--cluster-name" => name = Some(ClusterName::new(v).map_err(|e| format!("{f}: {e}"))?),
            "--clustermesh-default-global-namespace" => {
                default_global = Some(v.parse::<bool>().map_err(|e| format!("{f}: {e}"))?);
            }
            _ => return Err(format!("flag {f} is not known to the runner")),
        }
    }
    Ok(Flags {
        id: id.ok_or("no --cluster-id")?,
        name: name.ok_or("no --cluster-name")?,
        default_global,
    })
}

/// Our apiserver as the component under test.
struct Apiserver<'a> {
    rt: &'a Runtime,
    dir: &'a Path,
    store: &'a Store,
    etcd: Option<&'a EtcdServer>,
    flags: Flags,
    api: FakeApi,
    running: Option<Running>,
}

impl Apiserver<'_> {
    fn start(&mut self, env: &BTreeMap<String, String>) -> Result<(), String> {
        if self.running.is_some() {
            return Err("the hive is already running".into());
        }
        // Cilium reads its flags from the environment too.
        let default_global = match env.get("CLUSTERMESH_DEFAULT_GLOBAL_NAMESPACE") {
            Some(v) => v
                .parse::<bool>()
                .map_err(|e| format!("CLUSTERMESH_DEFAULT_GLOBAL_NAMESPACE: {e}"))?,
            None => self.flags.default_global.unwrap_or(true),
        };
        let store = match (self.store, self.etcd) {
            (Store::Etcd, Some(etcd)) => {
                format!("{{backend: etcd, endpoints: [{}]}}", etcd.endpoint())
            }
            _ => "{backend: sled, path: store}".to_owned(),
        };
        let yaml = format!(
            "cluster: {{name: {}, id: {}}}\nstore: {store}\nsource: {{kubernetes: {{}}}}\n\
             listen: {{export: \"127.0.0.1:0\", health: \"127.0.0.1:0\"}}\n\
             tls: {{ca: ca.pem, cert: server.pem, key: server-key.pem}}\n\
             globalNamespacesByDefault: {default_global}\n",
            self.flags.name, self.flags.id
        );
        let path = self.dir.join("apiserver.yaml");
        std::fs::write(&path, yaml).map_err(|e| e.to_string())?;
        let config = Config::load(&path).map_err(|e| e.to_string())?;
        self.api.reset_watches();
        let _runtime = self.rt.enter();
        let client = self.api.client();
        let running = self
            .rt
            .block_on(clustermesh_apiserver::start_with(config, Some(client)))
            .map_err(|e| e.to_string())?;
        self.running = Some(running);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), String> {
        let running = self.running.take().ok_or("the hive is not running")?;
        self.rt.block_on(running.stop()).map_err(|e| e.to_string())
    }

    fn k8s(
        &mut self,
        verb: &str,
        names: &[String],
        files: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        for name in names {
            let text = files.get(name).ok_or_else(|| format!("no file {name}"))?;
            for doc in golden::yaml_documents(text).map_err(|e| format!("{name}: {e}"))? {
                self.api
                    .apply(verb, doc, self.running.is_some())
                    .map_err(|e| format!("{name}: {e}"))?;
            }
        }
        Ok(())
    }

    fn list(
        &mut self,
        args: &[String],
        files: &mut BTreeMap<String, String>,
    ) -> Result<(), String> {
        let (format, prefix, out) = list_args(args)?;
        let running = self.running.as_ref().ok_or("the hive is not running")?;
        // As Cilium's kvstore/list: an empty prefix lists nothing.
        let mut entries: Vec<(String, Vec<u8>)> = if prefix.is_empty() {
            Vec::new()
        } else {
            self.rt
                .block_on(running.store.list(&prefix))
                .map_err(|e| e.to_string())?
                .kvs
                .into_iter()
                .map(|kv| (kv.key, kv.value))
                .collect()
        };
        entries.sort();
        if let (Some(etcd), false) = (self.etcd, prefix.is_empty()) {
            let dumped = etcdctl_get_prefix(&etcd.endpoint(), &prefix)?;
            if dumped != entries {
                return Err(format!(
                    "etcdctl get --prefix {prefix} shows {:?}, the store lists {:?}",
                    keys(&dumped),
                    keys(&entries)
                ));
            }
        }
        files.insert(out, list_output(&entries, format)?);
        Ok(())
    }
}

fn keys(entries: &[(String, Vec<u8>)]) -> Vec<&str> {
    entries.iter().map(|(k, _)| k.as_str()).collect()
}

/// `etcdctl get --prefix PREFIX -w json` against `endpoint`: the keys and values, sorted.
fn etcdctl_get_prefix(endpoint: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let out = std::process::Command::new("etcdctl")
        .args([
            "--endpoints",
            endpoint,
            "get",
            "--prefix",
            "-w",
            "json",
            prefix,
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .map_err(|e| {
            format!("running etcdctl (Debian package etcd-client, installed by scripts/deps): {e}")
        })?;
    if !out.status.success() {
        return Err(format!(
            "etcdctl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("etcdctl's JSON: {e}"))?;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| format!("etcdctl's base64: {e}"))
    };
    let mut entries = Vec::new();
    for kv in v["kvs"].as_array().into_iter().flatten() {
        let key = String::from_utf8(b64(&kv["key"])?).map_err(|e| e.to_string())?;
        entries.push((key, b64(&kv["value"])?));
    }
    entries.sort();
    Ok(entries)
}

impl Component for Apiserver<'_> {
    fn run(
        &mut self,
        words: &[String],
        files: &mut BTreeMap<String, String>,
        env: &BTreeMap<String, String>,
    ) -> Option<Result<(), String>> {
        Some(match words[0].as_str() {
            "hive/start" => self.start(env),
            "hive/stop" => self.stop(),
            "k8s/add" => self.k8s("ADDED", &words[1..], files),
            "k8s/update" => self.k8s("MODIFIED", &words[1..], files),
            "k8s/delete" => self.k8s("DELETED", &words[1..], files),
            "kvstore/list" => self.list(&words[1..], files),
            _ => return None,
        })
    }
}

/// One scenario's result.
enum Verdict {
    Pass,
    Skip(String),
    Fail(String),
}

fn run_scenario(rt: &Runtime, store: &Store, text: &str) -> Verdict {
    let archive = parse_txtar(text);
    let script = match parse_script(&archive.script) {
        Ok(s) => s,
        Err(e) => return Verdict::Fail(format!("the script does not parse: {e}")),
    };
    if let Some(reason) = skip_reason(&script, &archive.files) {
        return Verdict::Skip(reason);
    }
    let flags = match parse_flags(&script.flags) {
        Ok(f) => f,
        Err(e) => return Verdict::Fail(e),
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate(&flags.name).unwrap();
    ca.cert().write(dir.path(), "ca").unwrap();
    ca.server_cert(&flags.name, &["127.0.0.1".into()])
        .unwrap()
        .write(dir.path(), "server")
        .unwrap();
    let etcd = match store {
        Store::Etcd => Some(rt.block_on(EtcdServer::start())),
        Store::Sled => None,
    };
    let mut component = Apiserver {
        rt,
        dir: dir.path(),
        store,
        etcd: etcd.as_ref(),
        flags,
        api: FakeApi::default(),
        running: None,
    };
    let mut files = archive.files.clone();
    let outcome = golden::run(&script, &mut files, &mut component, DEADLINE);
    if let Some(running) = component.running.take() {
        rt.block_on(running.stop()).unwrap();
    }
    match outcome {
        Outcome::Passed => Verdict::Pass,
        Outcome::Unsupported(cmd) => Verdict::Fail(format!("the runner has no command `{cmd}`")),
        Outcome::Failed(line, why) => Verdict::Fail(format!("line {line}: {why}")),
    }
}

/// Runs every top-level scenario on `store`, writes the report and checks the results;
/// returns each scenario's result (`pass`, `skipped: why`).
fn run_all(store: &Store) -> BTreeMap<String, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut lines = Vec::new();
    let mut results = BTreeMap::new();
    let (mut passed, mut skipped, mut failed) = (Vec::new(), 0, Vec::new());
    for (name, text) in archives() {
        if name.contains('/') {
            // clustermesh/: the agent side, run by the node agent's runner.
            continue;
        }
        let result = match run_scenario(&rt, store, &text) {
            Verdict::Pass => {
                passed.push(name.clone());
                "pass".to_owned()
            }
            Verdict::Skip(reason) => {
                skipped += 1;
                format!("skipped: {reason}")
            }
            Verdict::Fail(why) => {
                failed.push(format!("{name}: {why}"));
                format!("FAILED: {why}")
            }
        };
        lines.push(format!(
            "golden apiserver/{} {name}: {result}",
            store.name()
        ));
        results.insert(name, result);
    }
    lines.push(format!(
        "golden apiserver/{}: {} passed, {skipped} skipped, {} failed",
        store.name(),
        passed.len(),
        failed.len()
    ));
    let report = lines.join("\n") + "\n";
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("golden");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("apiserver-{}.txt", store.name())), &report).unwrap();
    print!("{report}");
    assert!(
        failed.is_empty(),
        "failed scenarios:\n{}",
        failed.join("\n")
    );
    assert_eq!(passed, MUST_PASS, "the scenarios that pass");
    results
}

/// What each key kind is, in Cilium's clustermesh-apiserver and here, and the scenarios that
/// check it: the rows of docs/INTEROP.md's generated table.
const KEY_KINDS: [(&str, &str, &str, &[&str]); 8] = [
    (
        "`cilium/cluster-config/<cluster>`",
        "JSON `id`, `capabilities` (`syncedCanaries`, `maxConnectedClusters`, `serviceExportsEnabled`)",
        "the same; `cached` only on configs mirrored for remotes",
        &[
            "clusterconfig.txtar",
            "global-services-filtering.txtar",
            "namespace-filtering.txtar",
            "clusterconfig-serviceexport.txtar",
            "clusterconfig-endpointslices-only.txtar",
        ],
    ),
    (
        "`cilium/synced/<cluster>/cilium/state/<kind>/v1`",
        "a timestamp, once the kind's first sync is written",
        "a timestamp (Unix seconds; the scripts check the key only)",
        &["globalnamespace-services.txtar"],
    ),
    (
        "`cilium/state/services/v1/<cluster>/<ns>/<name>`",
        "ClusterService JSON of global and shared services of global namespaces; ready or serving backends",
        "the same; every service for this cluster's agents under `clustermesh/local/services/v1/`",
        &["globalnamespace-services.txtar"],
    ),
    (
        "`cilium/state/endpointslices/v1/<cluster>/<ns>/<slice>`",
        "EndpointSlice JSON with `cluster`, `clusterID` (Cilium 1.20)",
        "not written (read by the agent: see the agent-side table)",
        &[
            "endpointslices.txtar",
            "globalnamespace-endpointslices.txtar",
        ],
    ),
    (
        "`cilium/state/serviceexports/v1/<cluster>/<ns>/<name>`",
        "MCS-API ServiceExport JSON",
        "not written",
        &[
            "serviceexports.txtar",
            "serviceexports-crd-upgrade.txtar",
            "globalnamespace-serviceexports.txtar",
        ],
    ),
    (
        "`cilium/state/ip/v1/default/<ip>`",
        "IPIdentityPair JSON from CiliumEndpoints",
        "`IP`, `ID`, `HostIP`, `K8sNamespace`, `K8sPodName`, `NamedPorts`, from Pods (no `Key`, `K8sServiceAccount`, `K8sPodUID`)",
        &[
            "ciliumendpoints.txtar",
            "ciliumendpointslices.txtar",
            "globalnamespace.txtar",
        ],
    ),
    (
        "`cilium/state/identities/v1/id/<id>`",
        "the label string, from CiliumIdentities",
        "the label string, allocated from Pods' labels (Cilium's filter)",
        &["ciliumidentitites.txtar"],
    ),
    (
        "`cilium/state/nodes/v1/<cluster>/<node>`",
        "Node JSON from CiliumNodes",
        "the same fields and order, from Nodes (checked field by field on Cilium's values)",
        &["ciliumnodes.txtar"],
    ),
];

/// The verdict of a key kind from its scenarios' results on both stores.
fn verdict(
    scenarios: &[&str],
    sled: &BTreeMap<String, String>,
    etcd: &BTreeMap<String, String>,
) -> String {
    let mut passed = Vec::new();
    let mut skipped: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in scenarios {
        match (sled[*s].as_str(), etcd[*s].as_str()) {
            ("pass", "pass") => passed.push(*s),
            (a, b) if a == b => skipped
                .entry(a.strip_prefix("skipped: ").unwrap_or(a))
                .or_default()
                .push(*s),
            (a, b) => panic!("{s}: {a} on sled, {b} on etcd"),
        }
    }
    let mut parts = Vec::new();
    if !passed.is_empty() {
        parts.push(format!(
            "**passes** Cilium's script on sled and etcd ({})",
            passed.join(", ")
        ));
    }
    for (why, names) in skipped {
        parts.push(format!("not compared: {why} ({})", names.join(", ")));
    }
    parts.join("; ")
}

/// The generated table of docs/INTEROP.md.
fn interop_table(sled: &BTreeMap<String, String>, etcd: &BTreeMap<String, String>) -> String {
    let mut out = String::from(
        "| key | Cilium's clustermesh-apiserver | ours | verdict |\n| --- | --- | --- | --- |\n",
    );
    for (key, cilium, ours, scenarios) in KEY_KINDS {
        out.push_str(&format!(
            "| {key} | {cilium} | {ours} | {} |\n",
            verdict(scenarios, sled, etcd)
        ));
    }
    out
}

#[test]
fn cilium_s_apiserver_scenarios_pass_on_both_stores_and_interop_md_says_so() {
    let sled = run_all(&Store::Sled);
    // On etcd every dump is also read with etcdctl and must be the same.
    let etcd = run_all(&Store::Etcd);
    golden::check_generated(
        "apiserver/tests/golden_apiserver.rs",
        &interop_table(&sled, &etcd),
    );
}

#[test]
fn scenarios_on_inputs_the_apiserver_does_not_read_are_skipped_with_the_reason() {
    let reasons: BTreeMap<String, Option<String>> = archives()
        .into_iter()
        .filter(|(name, _)| !name.contains('/'))
        .map(|(name, text)| {
            let a = parse_txtar(&text);
            let s = parse_script(&a.script).unwrap();
            (name, skip_reason(&s, &a.files))
        })
        .collect();
    let reason = |name: &str| reasons[name].clone().unwrap_or_default();
    assert!(reason("ciliumendpoints.txtar").starts_with("CiliumEndpoint input is not read"));
    assert!(reason("ciliumnodes.txtar").starts_with("CiliumNode input is not read"));
    assert!(reason("ciliumidentitites.txtar").starts_with("CiliumIdentity input is not read"));
    assert!(reason("ciliumendpointslices.txtar").starts_with("CiliumEndpointSlice input"));
    assert!(reason("serviceexports.txtar").starts_with("MCS-API ServiceExports"));
    assert!(reason("endpointslices.txtar").starts_with("the 1.20 EndpointSlice export"));
    assert!(
        reason("clusterconfig-endpointslices-only.txtar")
            .starts_with("the 1.20 EndpointSlice export")
    );
    let runnable: Vec<&str> = reasons
        .iter()
        .filter(|(_, r)| r.is_none())
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(runnable, MUST_PASS);
}

/// The top-level fields of an indented JSON object, in order.
fn fields(indented: &str) -> Vec<String> {
    indented
        .lines()
        .filter_map(|l| l.strip_prefix("  \""))
        .filter_map(|l| l.split_once('"').map(|(k, _)| k.to_owned()))
        .collect()
}

#[test]
fn cilium_s_nodes_are_read_and_ours_have_their_fields_in_their_order() {
    use clustermesh_model::MaxConnectedClusters;
    use clustermesh_model::cluster::ClusterId;
    use clustermesh_model::node::{Node, NodeAddress};
    let (_, text) = archives()
        .into_iter()
        .find(|(n, _)| n == "ciliumnodes.txtar")
        .unwrap();
    let archive = parse_txtar(&text);
    let cluster3 = ClusterName::new("cluster3").unwrap();
    let id3 = ClusterId::new(3, MaxConnectedClusters::C255).unwrap();
    let mut cilium_fields = Vec::new();
    for (file, cidr) in [
        ("node-1.expected", "10.244.0.0/24"),
        ("node-2.expected", "10.244.1.0/24"),
    ] {
        let entries = golden::parse_list_output(&archive.files[file]);
        let [(_, value)] = entries.as_slice() else {
            panic!("{file}: {entries:?}")
        };
        // Cilium's node, as its clustermesh-apiserver writes it: read, and accepted from
        // cluster3.
        let node: Node = serde_json::from_str(value).unwrap();
        node.check_from_cluster(&cluster3, id3).unwrap();
        assert_eq!(
            node.ipv4_alloc_cidr.map(|c| c.to_string()).as_deref(),
            Some(cidr)
        );
        assert_eq!(node.addresses.len(), 4);
        assert_eq!(node.labels.len(), 1);
        cilium_fields = fields(value);
    }
    // Ours: the same fields, in the same order, and the pod CIDR in the same form.
    let ours = Node {
        name: "n1".into(),
        cluster: cluster3,
        cluster_id: id3,
        addresses: vec![NodeAddress {
            kind: "InternalIP".into(),
            ip: "172.18.0.2".parse().unwrap(),
        }],
        ipv4_alloc_cidr: Some("10.244.0.0/24".parse().unwrap()),
        labels: BTreeMap::new(),
    };
    let indented = golden::json_indent(&serde_json::to_string(&ours).unwrap()).unwrap();
    assert_eq!(fields(&indented), cilium_fields);
    assert!(
        indented.contains(
            "  \"IPv4AllocCIDR\": {\n    \"IP\": \"10.244.0.0\",\n    \"Mask\": \"////AA==\"\n  },"
        ),
        "{indented}"
    );
}
