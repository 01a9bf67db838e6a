//! The golden-data runner, agent side (issue 16): Cilium's own scripts of its agent's
//! ClusterMesh service merge (`apiserver/tests/golden/cilium-golden/clustermesh/*.txtar`,
//! unchanged) run against this agent's view and merge.
//!
//! - `k8s/add|update|delete FILE...`: the local cluster's Services and EndpointSlices, through
//!   the apiserver's parser and desired state (what a cluster's apiserver hands its agents).
//! - `kvstore/update KEY FILE` / `kvstore/delete KEY`: a remote cluster's service in Cilium's
//!   formats, `cilium/state/services/v1/...` (a ClusterService) or
//!   `cilium/state/endpointslices/v1/...` (Cilium 1.20's exported EndpointSlices), checked as
//!   the sync worker checks an import, into the view.
//! - `db/cmp frontends|backends FILE` and `db/empty TABLE`: the merge rendered as Cilium's
//!   load-balancer tables, compared cell by cell in the columns the expected file's header
//!   names. A frontend is `VIP:port/PROTO` with the backends the merge selects; a backend row
//!   is one backend address and port the service holds (whatever the merge decides about
//!   it), with the port names it has for that port. Two columns are not ours: `NodeName` (the
//!   agent does not keep an endpoint's node) is not compared, and `Status` is `Done` (the
//!   merge's result is what the reconciler writes). Both are said in every result line.
//!
//! Each run writes one line per scenario and a summary to
//! `$CARGO_TARGET_TMPDIR/golden/agent.txt`, which `scripts/test` prints.

#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    reason = "test code: a panic is the failure report; the script engine is synchronous"
)]

#[path = "../../apiserver/tests/golden/mod.rs"]
mod golden;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use clustermesh_agent::merge::{Reason, merge};
use clustermesh_agent::view::{ServiceName, View};
use clustermesh_apiserver::desired::DesiredState;
use clustermesh_apiserver::source::manifest::{Loaded, parse_text};
use clustermesh_model::MaxConnectedClusters;
use clustermesh_model::cluster::{ClusterId, ClusterName};
use clustermesh_model::keys::Key;
use clustermesh_model::service::{ClusterEndpointSlice, ClusterService, service_from_slices};
use clustermesh_proto::{Object, ObjectRef, v1};
use golden::{Component, Outcome, archives, parse_script, parse_txtar};

/// Columns of Cilium's tables this agent has no value for: not compared.
const NOT_COMPARED: [&str; 1] = ["NodeName"];

const SLICES_PREFIX: &str = "cilium/state/endpointslices/v1/";

/// How Cilium names a remote backend in its tables: the versions in these files differ.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Addresses {
    /// `20.0.0.2@2:9090/TCP` and an `Instances` column (the newer files).
    WithClusterId,
    /// `20.0.0.2:9090/TCP` and a `PortNames` column.
    Plain,
}

struct AgentUnderTest {
    cluster: ClusterName,
    id: ClusterId,
    view: Option<View>,
    /// The local Kubernetes objects: (kind, namespace, name) -> the object as JSON.
    objects: BTreeMap<(String, String, String), String>,
    /// The local services in the view.
    local: BTreeSet<ServiceName>,
    /// Remote exported EndpointSlices by key.
    slices: BTreeMap<String, ClusterEndpointSlice>,
    addresses: Addresses,
}

fn service_ref(cluster: &ClusterName, ns: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind: v1::Kind::Services,
        cluster: cluster.clone(),
        name: format!("{ns}/{name}"),
    }
}

impl AgentUnderTest {
    fn view(&mut self) -> Result<&mut View, String> {
        self.view
            .as_mut()
            .ok_or_else(|| "the hive is not running".to_owned())
    }

    /// The local objects through the apiserver's parser into the view.
    fn sync_local(&mut self) -> Result<(), String> {
        let text: Vec<&str> = self.objects.values().map(String::as_str).collect();
        let mut loaded = Loaded::default();
        parse_text("k8s", &text.join("\n---\n"), &mut loaded);
        if let Some(p) = loaded.problems.first() {
            return Err(format!("the apiserver's parser refused {p}"));
        }
        let desired = DesiredState::compute(&self.cluster, self.id, &loaded.objects);
        if let Some(p) = desired.problems.first() {
            return Err(format!("the desired state refused {p}"));
        }
        let cluster = self.cluster.clone();
        let mut now = BTreeSet::new();
        let before = std::mem::take(&mut self.local);
        let view = self.view()?;
        for s in desired.services {
            now.insert((s.namespace.clone(), s.name.clone()));
            view.upsert(Object::Service(s));
        }
        for (ns, name) in before.difference(&now) {
            view.delete(&service_ref(&cluster, ns, name));
        }
        self.local = now;
        Ok(())
    }

    fn k8s(
        &mut self,
        verb: &str,
        names: &[String],
        files: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        for name in names {
            let text = files.get(name).ok_or_else(|| format!("no file {name}"))?;
            for doc in golden::yaml_documents(text)? {
                let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
                if !matches!(kind.as_str(), "Service" | "EndpointSlice" | "Namespace") {
                    return Err(format!("{name}: kind {kind:?} is not read"));
                }
                let key = (
                    kind,
                    doc["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_owned(),
                    doc["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
                if verb == "delete" {
                    self.objects.remove(&key);
                } else {
                    self.objects
                        .insert(key, serde_json::to_string(&doc).unwrap());
                }
            }
        }
        self.sync_local()
    }

    /// The remote service of `(cluster, ns, service)` from its exported slices, into the view.
    fn sync_slices(
        &mut self,
        cluster: &ClusterName,
        ns: &str,
        service: &str,
    ) -> Result<(), String> {
        let slices: Vec<&ClusterEndpointSlice> = self
            .slices
            .values()
            .filter(|s| &s.cluster == cluster && s.namespace == ns && s.service() == Some(service))
            .collect();
        let Some(first) = slices.first() else {
            self.view()?.delete(&service_ref(cluster, ns, service));
            return Ok(());
        };
        let (svc, problems) = service_from_slices(cluster, first.cluster_id, ns, service, &slices);
        if let Some(p) = problems.first() {
            return Err(p.clone());
        }
        self.view()?.upsert(Object::Service(svc));
        Ok(())
    }

    fn kv_update(&mut self, key: &str, value: &str) -> Result<(), String> {
        if let Some(rest) = key.strip_prefix(SLICES_PREFIX) {
            let parts: Vec<&str> = rest.split('/').collect();
            let [cluster, ns, _slice] = parts.as_slice() else {
                return Err(format!("{key}: not <cluster>/<namespace>/<slice>"));
            };
            let cluster = ClusterName::new(*cluster).map_err(|e| e.to_string())?;
            let slice: ClusterEndpointSlice =
                serde_json::from_str(value).map_err(|e| format!("{key}: {e}"))?;
            if slice.cluster != cluster || slice.namespace != *ns || cluster == self.cluster {
                return Err(format!(
                    "{key}: the slice names cluster {} namespace {}",
                    slice.cluster, slice.namespace
                ));
            }
            let service = slice
                .service()
                .ok_or_else(|| format!("{key}: no service-name label"))?
                .to_owned();
            let old = self.slices.insert(key.to_owned(), slice);
            // A slice that moved to another service leaves the old one.
            if let Some(old) = old
                .as_ref()
                .and_then(|o| o.service())
                .filter(|o| *o != service)
            {
                self.sync_slices(&cluster, ns, old)?;
            }
            return self.sync_slices(&cluster, ns, &service);
        }
        let Ok(Key::Service {
            cluster,
            namespace,
            name,
        }) = Key::parse(key)
        else {
            return Err(format!("{key}: not a service or EndpointSlice key"));
        };
        let svc: ClusterService = serde_json::from_str(value).map_err(|e| format!("{key}: {e}"))?;
        if cluster == self.cluster || svc.namespace != namespace || svc.name != name {
            return Err(format!(
                "{key}: the value is {}/{}/{}",
                svc.cluster, svc.namespace, svc.name
            ));
        }
        svc.check_from_cluster(&cluster, svc.cluster_id)
            .map_err(|e| format!("{key}: {e}"))?;
        self.view()?.upsert(Object::Service(svc));
        Ok(())
    }

    fn kv_delete(&mut self, key: &str) -> Result<(), String> {
        if key.starts_with(SLICES_PREFIX) {
            let Some(slice) = self.slices.remove(key) else {
                return Ok(());
            };
            let service = slice.service().unwrap_or_default().to_owned();
            return self.sync_slices(&slice.cluster, &slice.namespace, &service);
        }
        let Ok(Key::Service {
            cluster,
            namespace,
            name,
        }) = Key::parse(key)
        else {
            return Err(format!("{key}: not a service or EndpointSlice key"));
        };
        self.view()?
            .delete(&service_ref(&cluster, &namespace, &name));
        Ok(())
    }

    fn address(&self, cluster_id: u16, ip: IpAddr, port: u16, proto: &str) -> String {
        if self.addresses == Addresses::WithClusterId && cluster_id != self.id.get() {
            format!("{ip}@{cluster_id}:{port}/{proto}")
        } else {
            format!("{ip}:{port}/{proto}")
        }
    }

    /// Cilium's frontends table: (sort key, cells by column).
    fn frontends(&self) -> Vec<BTreeMap<&'static str, String>> {
        let Some(view) = &self.view else {
            return Vec::new();
        };
        let mut rows = Vec::new();
        for name in view.service_names() {
            let Some(plan) = merge(view, name) else {
                continue;
            };
            for f in &plan.frontends {
                let proto = f.proto.name().to_ascii_uppercase();
                let mut backends: Vec<_> = f.backends.iter().collect();
                backends.sort_by_key(|b| (b.ip, b.port));
                let backends: Vec<String> = backends
                    .iter()
                    .map(|b| self.address(b.cluster_id, IpAddr::V4(b.ip), b.port, &proto))
                    .collect();
                rows.push((
                    (f.vip, f.port),
                    BTreeMap::from([
                        ("Address", format!("{}:{}/{proto}", f.vip, f.port)),
                        ("Type", "ClusterIP".to_owned()),
                        ("ServiceName", format!("{}/{}", name.0, name.1)),
                        ("Status", "Done".to_owned()),
                        ("Backends", backends.join(", ")),
                    ]),
                ));
            }
        }
        rows.sort_by_key(|r| r.0);
        rows.into_iter().map(|(_, r)| r).collect()
    }

    /// Cilium's backends table: every backend address and port the services hold.
    fn backends(&self) -> Vec<BTreeMap<&'static str, String>> {
        let Some(view) = &self.view else {
            return Vec::new();
        };
        let mut rows: BTreeMap<(IpAddr, u16, String, String), BTreeMap<&'static str, String>> =
            BTreeMap::new();
        for name in view.service_names() {
            let Some(plan) = merge(view, name) else {
                continue;
            };
            let defs = view.service(name).unwrap();
            for f in &plan.frontends {
                let proto = f.proto.name().to_ascii_uppercase();
                for c in &f.candidates {
                    // Not part of the service as Cilium merges it.
                    if matches!(
                        c.reason,
                        Reason::NotShared
                            | Reason::RemoteNotGlobal
                            | Reason::LocalNotGlobal
                            | Reason::PortMismatch
                            | Reason::NotIpv4
                    ) {
                        continue;
                    }
                    let Some(port) = c.port else { continue };
                    let Some(def) = defs.get(&c.cluster) else {
                        continue;
                    };
                    let mut names: Vec<&str> = def
                        .backends
                        .get(&c.ip)
                        .into_iter()
                        .flatten()
                        .filter(|(_, l4)| {
                            l4.port() == port && l4.protocol.as_str().eq_ignore_ascii_case(&proto)
                        })
                        .map(|(n, _)| n.as_str())
                        .collect();
                    names.sort_unstable();
                    let instances = format!("{}/{} ({})", name.0, name.1, names.join(", "));
                    rows.insert(
                        (c.ip, port, proto.clone(), c.cluster.to_string()),
                        BTreeMap::from([
                            (
                                "Address",
                                self.address(def.cluster_id.get(), c.ip, port, &proto),
                            ),
                            ("Instances", instances),
                            ("PortNames", names.join(",")),
                        ]),
                    );
                }
            }
        }
        rows.into_values().collect()
    }

    fn table(&self, table: &str) -> Result<Vec<BTreeMap<&'static str, String>>, String> {
        match table {
            "frontends" => Ok(self.frontends()),
            "backends" => Ok(self.backends()),
            other => Err(format!("no table {other}")),
        }
    }

    fn compare(&self, table: &str, expected: &str) -> Result<(), String> {
        let rows = self.table(table)?;
        let mut lines = expected.lines().filter(|l| !l.trim().is_empty());
        let header = lines.next().ok_or("an empty table file")?;
        // Columns start where a header word starts.
        let mut columns: Vec<(usize, &str)> = Vec::new();
        let mut prev = ' ';
        for (i, c) in header.char_indices() {
            if c != ' ' && prev == ' ' {
                let end = header[i..].find(' ').map_or(header.len(), |e| i + e);
                columns.push((i, &header[i..end]));
            }
            prev = c;
        }
        let cell = |line: &str, k: usize| -> String {
            let start = columns[k].0;
            let end = columns
                .get(k + 1)
                .map_or(line.len(), |c| c.0.min(line.len()));
            line.get(start.min(line.len())..end)
                .unwrap_or("")
                .trim()
                .to_owned()
        };
        let want: Vec<Vec<String>> = lines
            .map(|l| (0..columns.len()).map(|k| cell(l, k)).collect())
            .collect();
        let got: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                columns
                    .iter()
                    .map(|(_, name)| r.get(name).cloned().unwrap_or_default())
                    .collect()
            })
            .collect();
        let compared = |row: &Vec<String>| -> Vec<String> {
            row.iter()
                .zip(&columns)
                .filter(|(_, (_, name))| !NOT_COMPARED.contains(name))
                .map(|(c, _)| c.clone())
                .collect()
        };
        for (_, name) in &columns {
            if !NOT_COMPARED.contains(name) && rows.first().is_some_and(|r| !r.contains_key(name)) {
                return Err(format!("the {table} table has no column {name}"));
            }
        }
        let (w, g): (Vec<_>, Vec<_>) = (
            want.iter().map(compared).collect(),
            got.iter().map(compared).collect(),
        );
        if w == g {
            Ok(())
        } else {
            Err(format!("{table}: expected {w:?}, the agent has {g:?}"))
        }
    }
}

impl Component for AgentUnderTest {
    fn run(
        &mut self,
        words: &[String],
        files: &mut BTreeMap<String, String>,
        _env: &BTreeMap<String, String>,
    ) -> Option<Result<(), String>> {
        let file = |name: &String| {
            files
                .get(name)
                .cloned()
                .ok_or_else(|| format!("no file {name}"))
        };
        Some(match (words[0].as_str(), &words[1..]) {
            ("hive/start", []) => {
                self.view = Some(View::new(
                    self.cluster.clone(),
                    self.id,
                    "nodeport-worker",
                    MaxConnectedClusters::C255,
                ));
                self.sync_local()
            }
            ("k8s/add" | "k8s/update", names) => self.k8s("add", names, files),
            ("k8s/delete", names) => self.k8s("delete", names, files),
            ("kvstore/update", [key, name]) => file(name).and_then(|v| self.kv_update(key, &v)),
            ("kvstore/delete", [key]) => self.kv_delete(key),
            ("db/cmp", [table, name]) => file(name).and_then(|v| self.compare(table, &v)),
            ("db/empty", [table]) => self.table(table).and_then(|rows| {
                if rows.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{table} has {} rows: {rows:?}", rows.len()))
                }
            }),
            _ => return None,
        })
    }
}

fn flags(flags: &[String]) -> Result<(ClusterName, ClusterId), String> {
    let (mut name, mut id) = (None, None);
    for f in flags {
        match f.split_once('=') {
            Some(("--cluster-name", v)) => {
                name = Some(ClusterName::new(v).map_err(|e| e.to_string())?)
            }
            Some(("--cluster-id", v)) => id = Some(v.parse::<u32>().map_err(|e| e.to_string())?),
            // Remote services are read in both forms whatever this says.
            Some(("--clustermesh-service-v2", "prefer-endpointslice")) => {}
            _ => return Err(format!("flag {f} is not known to the runner")),
        }
    }
    let id = ClusterId::new(id.ok_or("no --cluster-id")?, MaxConnectedClusters::C255)
        .map_err(|e| e.to_string())?;
    Ok((name.ok_or("no --cluster-name")?, id))
}

/// The agent for a scenario, with the address form its tables use.
fn agent_for(archive: &golden::Archive) -> (golden::Script, AgentUnderTest) {
    let script = parse_script(&archive.script).unwrap();
    let (cluster, id) = flags(&script.flags).unwrap();
    let addresses = if archive
        .files
        .values()
        .any(|f| f.starts_with("Address") && f.contains("Instances"))
    {
        Addresses::WithClusterId
    } else {
        Addresses::Plain
    };
    let agent = AgentUnderTest {
        cluster,
        id,
        view: None,
        objects: BTreeMap::new(),
        local: BTreeSet::new(),
        slices: BTreeMap::new(),
        addresses,
    };
    (script, agent)
}

#[test]
fn cilium_s_agent_side_service_merge_scenarios_pass() {
    let mut lines = Vec::new();
    let (mut passed, mut failed) = (0, Vec::new());
    let mut count = 0;
    for (name, text) in archives() {
        let Some(short) = name.strip_prefix("clustermesh/") else {
            continue;
        };
        count += 1;
        let archive = parse_txtar(&text);
        let (script, mut agent) = agent_for(&archive);
        let mut files = archive.files.clone();
        let line = match golden::run(&script, &mut files, &mut agent, Duration::from_secs(5)) {
            Outcome::Passed => {
                passed += 1;
                format!("golden agent {short}: pass (not compared: NodeName; Status is Done)")
            }
            Outcome::Unsupported(cmd) => {
                failed.push(format!("{short}: no command `{cmd}`"));
                format!("golden agent {short}: FAILED: the runner has no command `{cmd}`")
            }
            Outcome::Failed(line, why) => {
                failed.push(format!("{short}: line {line}: {why}"));
                format!("golden agent {short}: FAILED: line {line}: {why}")
            }
        };
        lines.push(line);
    }
    lines.push(format!(
        "golden agent: {passed} passed, 0 skipped, {} failed",
        failed.len()
    ));
    let report = lines.join("\n") + "\n";
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("golden");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("agent.txt"), &report).unwrap();
    print!("{report}");
    assert_eq!(count, 7, "Cilium's seven agent-side scenarios");
    assert!(
        failed.is_empty(),
        "failed scenarios:\n{}",
        failed.join("\n")
    );
    // docs/INTEROP.md's agent-side table, from these results.
    let mut table = String::from(
        "| key read | Cilium's format | what the agent does with it | verdict |\n| --- | --- | --- | --- |\n",
    );
    for (key, format, ours, scenarios) in READ_KINDS {
        table.push_str(&format!(
            "| {key} | {format} | {ours} | **passes** Cilium's script ({}) |\n",
            scenarios.join(", ")
        ));
    }
    golden::check_generated("node-agent/tests/golden_agent.rs", &table);
}

/// The remote keys the agent-side scenarios give, and the scenarios (all must pass to get
/// here).
const READ_KINDS: [(&str, &str, &str, &[&str]); 2] = [
    (
        "`cilium/state/services/v1/<cluster>/<ns>/<name>`",
        "ClusterService JSON",
        "merged into the local global service's frontends by port name; affinity, multi-port, no local endpoints",
        &[
            "clusterservice.txtar",
            "clusterservice-multiport.txtar",
            "clusterservice-without-local-eps.txtar",
            "service-affinity.txtar",
        ],
    ),
    (
        "`cilium/state/endpointslices/v1/<cluster>/<ns>/<slice>`",
        "EndpointSlice JSON with `cluster`, `clusterID` (Cilium 1.20)",
        "the slices of one Service make one remote service (global, shared, ready or serving endpoints), merged the same way",
        &[
            "service.txtar",
            "service-multiport.txtar",
            "service-without-local-eps.txtar",
        ],
    ),
];

/// The runner can fail: Cilium's scenarios with one expected backend changed, or the
/// affinity's expectation swapped, fail at the line that checks it.
#[test]
fn a_merge_that_differs_from_cilium_s_fails() {
    let find = |n: &str| {
        archives()
            .into_iter()
            .find(|(name, _)| name == n)
            .map(|(_, t)| t)
            .unwrap()
    };
    let cases = [
        (
            "clustermesh/clusterservice.txtar",
            "10.1.0.1:8080/TCP, 20.0.0.2@2:9090/TCP, 30.0.0.3@3:9090/TCP",
            "10.1.0.1:8080/TCP, 20.0.0.2@2:9090/TCP, 30.0.0.4@3:9090/TCP",
        ),
        (
            "clustermesh/service-affinity.txtar",
            "Done    20.0.0.2@2:9090/TCP\n",
            "Done    10.1.0.1:8080/TCP\n",
        ),
        (
            "clustermesh/clusterservice-multiport.txtar",
            "20.0.0.2:443/TCP     https",
            "20.0.0.2:443/TCP     http",
        ),
    ];
    for (name, from, to) in cases {
        let text = find(name);
        assert!(text.contains(from), "{name}");
        let archive = parse_txtar(&text.replacen(from, to, 1));
        let (script, mut agent) = agent_for(&archive);
        let mut files = archive.files.clone();
        let outcome = golden::run(&script, &mut files, &mut agent, Duration::from_secs(1));
        assert!(
            matches!(outcome, Outcome::Failed(_, ref why) if why.contains("db/cmp")),
            "{name}: {outcome:?}"
        );
    }
}
