//! Inspection: the merged view of every cluster as the local apiserver serves it to its
//! agents (`services`, `identities`, `endpoints`), the agent's explanations (`explain`), the
//! datapath's maps (`bpf`), and live verdict events (`observe`).

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use clustermesh_proto::Object;
use clustermesh_proto::client::{ClientTls, connect, server_name};
use clustermesh_proto::v1::{self, watch_event::Event as Ev};
use serde_json::{Value, json};

use crate::clusterdir::ClusterDir;
use crate::output::{Format, get_json, table, yes};

/// Every object of `kinds` the local apiserver serves its agents (a snapshot, up to
/// `Synced`), through the agents' `local-<cluster>` certificate.
pub(crate) async fn snapshot(dir: &ClusterDir, kinds: &[v1::Kind]) -> anyhow::Result<Vec<Object>> {
    let agent = clustermesh_agent::Config::load(&dir.agent_config())?;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let tls = ClientTls {
        ca_pem: read(&agent.apiserver.ca)?,
        cert_pem: read(&agent.apiserver.cert)?,
        key_pem: read(&agent.apiserver.key)?,
        server_name: server_name(dir.name().as_str()),
    };
    let mut client = connect(&agent.apiserver.address, &tls)
        .await
        .with_context(|| format!("connecting to the apiserver at {}", agent.apiserver.address))?;
    let mut stream = client
        .watch(v1::WatchRequest {
            kinds: kinds.iter().map(|k| *k as i32).collect(),
            since_revision: 0,
        })
        .await
        .context("watching the apiserver")?
        .into_inner();
    let mut out = Vec::new();
    loop {
        let event = tokio::time::timeout(std::time::Duration::from_secs(30), stream.message())
            .await
            .context("the apiserver sent nothing for 30 s")??
            .context("the apiserver ended the stream before its snapshot was complete")?;
        match event.event {
            Some(Ev::Upsert(u)) => match Object::try_from(&u) {
                Ok(o) => out.push(o),
                Err(e) => eprintln!("warning: skipping an object the apiserver sent: {e}"),
            },
            Some(Ev::Synced(_)) => return Ok(out),
            Some(Ev::Reset(_)) => out.clear(),
            _ => {}
        }
    }
}

/// `clustermesh services`: every service of every cluster, merged by namespace and name.
pub(crate) async fn services(dir: &ClusterDir, format: Format) -> anyhow::Result<String> {
    let objects = snapshot(
        dir,
        &[
            v1::Kind::Services,
            v1::Kind::RemoteCache,
            v1::Kind::ClusterStatus,
        ],
    )
    .await?;
    let mut withdrawn = BTreeMap::new();
    let mut by_name: BTreeMap<(String, String), Vec<clustermesh_model::service::ClusterService>> =
        BTreeMap::new();
    for o in objects {
        match o {
            Object::Service(s) => by_name
                .entry((s.namespace.clone(), s.name.clone()))
                .or_default()
                .push(s),
            Object::ClusterStatus(st) => {
                withdrawn.insert(st.cluster.to_string(), st.withdrawn);
            }
            _ => {}
        }
    }
    let local = dir.name().to_string();
    if format == Format::Json {
        let list: Vec<Value> = by_name
            .iter()
            .map(|((ns, name), defs)| {
                json!({"namespace": ns, "name": name, "clusters": defs.iter().map(|d| json!({
                    "cluster": d.cluster.as_str(),
                    "global": d.include_external,
                    "shared": d.shared,
                    "affinity": d.affinity.as_str(),
                    "frontends": d.frontends.keys().map(ToString::to_string).collect::<Vec<_>>(),
                    "backends": d.backends.len(),
                    "withdrawn": withdrawn.get(d.cluster.as_str()).copied().unwrap_or(false),
                })).collect::<Vec<_>>()})
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&list)? + "\n");
    }
    let rows: Vec<Vec<String>> = by_name
        .iter()
        .map(|((ns, name), defs)| {
            let local_def = defs.iter().find(|d| d.cluster.as_str() == local);
            let backends: Vec<String> = defs
                .iter()
                .map(|d| {
                    let mark = if withdrawn.get(d.cluster.as_str()) == Some(&true) {
                        " (withdrawn)"
                    } else {
                        ""
                    };
                    format!("{}:{}{mark}", d.cluster, d.backends.len())
                })
                .collect();
            vec![
                format!("{ns}/{name}"),
                local_def.map_or("-".to_owned(), |d| {
                    d.frontends
                        .keys()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                }),
                local_def.map_or("-".to_owned(), |d| yes(d.include_external)),
                local_def.map_or("-".to_owned(), |d| d.affinity.as_str().to_owned()),
                backends.join(" "),
            ]
        })
        .collect();
    Ok(table(
        &[
            "SERVICE",
            "VIPS",
            "GLOBAL",
            "AFFINITY",
            "BACKENDS PER CLUSTER",
        ],
        &rows,
    ))
}

/// `clustermesh identities`.
pub(crate) async fn identities(dir: &ClusterDir, format: Format) -> anyhow::Result<String> {
    let objects = snapshot(dir, &[v1::Kind::Identities, v1::Kind::RemoteCache]).await?;
    let mut rows = Vec::new();
    let mut list = Vec::new();
    for o in objects {
        if let Object::Identity {
            cluster,
            id,
            labels,
        } = o
        {
            let labels = labels.to_kvstore_string();
            list.push(json!({"id": id.get(), "cluster": cluster.as_str(), "labels": labels}));
            rows.push(vec![id.to_string(), cluster.to_string(), labels]);
        }
    }
    if format == Format::Json {
        return Ok(serde_json::to_string_pretty(&list)? + "\n");
    }
    Ok(table(&["IDENTITY", "CLUSTER", "LABELS"], &rows))
}

/// `clustermesh endpoints`.
pub(crate) async fn endpoints(dir: &ClusterDir, format: Format) -> anyhow::Result<String> {
    let objects = snapshot(dir, &[v1::Kind::Ipcache, v1::Kind::RemoteCache]).await?;
    let mut rows = Vec::new();
    let mut list = Vec::new();
    for o in objects {
        if let Object::IpCache { cluster, entry } = o {
            let pod = format!("{}/{}", entry.namespace, entry.pod_name);
            let host = entry.host_ip.map_or("-".to_owned(), |h| h.to_string());
            list.push(
                json!({"ip": entry.ip.to_string(), "cluster": cluster.as_str(),
                "identity": entry.identity.get(), "pod": pod, "hostIp": host}),
            );
            rows.push(vec![
                entry.ip.to_string(),
                cluster.to_string(),
                entry.identity.to_string(),
                pod,
                host,
            ]);
        }
    }
    if format == Format::Json {
        return Ok(serde_json::to_string_pretty(&list)? + "\n");
    }
    Ok(table(
        &["IP", "CLUSTER", "IDENTITY", "POD", "NODE IP"],
        &rows,
    ))
}

/// `clustermesh explain service NS/NAME`, from the agent.
pub(crate) async fn explain_service(
    agent: &str,
    name: &str,
    format: Format,
) -> anyhow::Result<String> {
    let Some((ns, svc)) = name.split_once('/') else {
        bail!("name the service as NAMESPACE/NAME, e.g. prod/web");
    };
    let plan = get_json(agent, &format!("/explain/service/{ns}/{svc}")).await?;
    if format == Format::Json {
        return Ok(serde_json::to_string_pretty(&plan)? + "\n");
    }
    let mut out = format!(
        "service {ns}/{svc}: global {}, affinity {}\n",
        yes(plan["global"] == true),
        plan["affinity"].as_str().unwrap_or("none")
    );
    let mut rows = Vec::new();
    for f in plan["frontends"].as_array().into_iter().flatten() {
        let frontend = format!(
            "{}:{}/{} ({})",
            f["vip"].as_str().unwrap_or("?"),
            f["port"],
            f["proto"].as_str().unwrap_or("?"),
            f["port_name"].as_str().unwrap_or("")
        );
        for c in f["candidates"].as_array().into_iter().flatten() {
            let reason = c["reason"].as_str().unwrap_or("?");
            let selected = matches!(reason, "selected" | "kept-last-backends");
            let reason = match c["outlier"]["summary"].as_str() {
                Some(ejected) => format!("{reason}; {ejected}"),
                None => reason.to_owned(),
            };
            rows.push(vec![
                frontend.clone(),
                c["cluster"].as_str().unwrap_or("?").to_owned(),
                match c["port"].as_u64() {
                    Some(p) => format!("{}:{p}", c["ip"].as_str().unwrap_or("?")),
                    None => c["ip"].as_str().unwrap_or("?").to_owned(),
                },
                if selected { "in" } else { "out" }.to_owned(),
                reason,
            ]);
        }
    }
    for s in plan["skipped"].as_array().into_iter().flatten() {
        out.push_str(&format!("skipped: {}\n", s.as_str().unwrap_or("")));
    }
    out.push_str(&table(
        &["FRONTEND", "CLUSTER", "BACKEND", "IN/OUT", "WHY"],
        &rows,
    ));
    Ok(out)
}

/// `clustermesh explain endpoint IP`, from the agent.
pub(crate) async fn explain_endpoint(
    agent: &str,
    ip: &str,
    format: Format,
) -> anyhow::Result<String> {
    let e = get_json(agent, &format!("/explain/endpoint/{ip}")).await?;
    if format == Format::Json {
        return Ok(serde_json::to_string_pretty(&e)? + "\n");
    }
    let flag = |enforce: &str, audit: &str| {
        if e[enforce] == true {
            "enforced"
        } else if e[audit] == true {
            "audited"
        } else {
            "open"
        }
    };
    let mut out = format!(
        "endpoint {ip} ({}), identity {}: ingress {}, egress {}\nselected by: {}\n",
        e["pod"].as_str().unwrap_or("?"),
        e["identity"],
        flag("enforce_ingress", "audit_ingress"),
        flag("enforce_egress", "audit_egress"),
        e["selected_by"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "no rule".to_owned()),
    );
    let a = &e["attachment"];
    if let Some(reason) = a["error"].as_str() {
        out.push_str(&format!("programs: NOT attached: {reason}\n"));
    } else if let Some(ifname) = a["interface"].as_str() {
        out.push_str(&format!("programs: attached to {ifname}\n"));
    }
    let rows: Vec<Vec<String>> = e["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            vec![
                x["direction"].as_str().unwrap_or("?").to_owned(),
                match x["identity"].as_u64() {
                    Some(0) => "any".to_owned(),
                    Some(id) => id.to_string(),
                    None => "?".to_owned(),
                },
                x["cluster"].as_str().unwrap_or("-").to_owned(),
                x["port"].as_str().unwrap_or("?").to_owned(),
                x["verdict"].as_str().unwrap_or("?").to_owned(),
                x["rules"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&table(
        &["DIRECTION", "PEER", "CLUSTER", "PORT", "VERDICT", "RULES"],
        &rows,
    ));
    for n in e["notes"].as_array().into_iter().flatten() {
        out.push_str(&format!("note: {}\n", n.as_str().unwrap_or("")));
    }
    Ok(out)
}

/// `clustermesh bpf MAP`: the datapath's map, decoded by the agent.
pub(crate) async fn bpf(agent: &str, map: &str, format: Format) -> anyhow::Result<String> {
    let rows = get_json(agent, &format!("/maps/{map}")).await?;
    if format == Format::Json {
        return Ok(serde_json::to_string_pretty(&rows)? + "\n");
    }
    let list = rows.as_array().cloned().unwrap_or_default();
    let Some(first) = list.first().and_then(Value::as_object) else {
        return Ok(format!("{map}: empty\n"));
    };
    // Key columns first, in the order of the map's key and value (docs/DATAPATH.md).
    let order: &[&str] = match map {
        "services" => &["vip", "port", "proto", "backends"],
        "backends" => &["id", "ip", "port", "proto", "state", "clusterId"],
        "ipcache" => &["prefix", "identity", "nodeIp", "clusterId"],
        "endpoints" => &["ip", "endpointId", "identity", "clusterId"],
        "policy" => &[
            "endpointId",
            "identity",
            "port",
            "portBlock",
            "proto",
            "direction",
            "verdict",
            "ruleId",
        ],
        _ => &[],
    };
    let mut headers: Vec<String> = order
        .iter()
        .filter(|k| first.contains_key(**k))
        .map(|k| (*k).to_owned())
        .collect();
    headers.extend(
        first
            .keys()
            .filter(|k| !order.contains(&k.as_str()))
            .cloned(),
    );
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let body: Vec<Vec<String>> = list
        .iter()
        .map(|r| headers.iter().map(|h| cell(&r[h])).collect())
        .collect();
    let upper: Vec<String> = headers.iter().map(|h| h.to_uppercase()).collect();
    let refs: Vec<&str> = upper.iter().map(String::as_str).collect();
    Ok(table(&refs, &body))
}

/// What `observe` keeps.
#[derive(Debug, Default)]
pub(crate) struct EventFilter {
    /// A verdict (`allowed`/`forwarded`, `denied`/`dropped`, `audited`/`audit`, `ejected`,
    /// `readmitted`).
    pub(crate) verdict: Option<String>,
    /// A cluster name or ID on either side.
    pub(crate) cluster: Option<String>,
    /// An identity on either side.
    pub(crate) identity: Option<u64>,
}

impl EventFilter {
    fn keeps(&self, e: &Value) -> bool {
        let verdict = self.verdict.as_deref().map(|v| match v {
            "forwarded" => "allowed",
            "dropped" => "denied",
            "audit" => "audited",
            other => other,
        });
        let cluster = |c: &str| {
            ["srcCluster", "dstCluster"]
                .iter()
                .any(|k| e[*k].as_u64().is_some_and(|id| id.to_string() == c))
                || ["srcClusterName", "dstClusterName"]
                    .iter()
                    .any(|k| e[*k] == c)
        };
        verdict.is_none_or(|v| e["verdict"] == v)
            && self.cluster.as_deref().is_none_or(cluster)
            && self
                .identity
                .is_none_or(|i| e["srcIdentity"] == i || e["dstIdentity"] == i)
    }
}

/// Which flows `observe` asks for: kept ones first (`since_ms`, `last`), then new ones unless
/// `follow` is off.
#[derive(Debug, Default)]
pub(crate) struct Window {
    pub(crate) since_ms: Option<u64>,
    pub(crate) last: Option<usize>,
    pub(crate) follow: bool,
}

impl Window {
    /// The request: the window and the filter (the agent applies it before `last`).
    fn path(&self, filter: &EventFilter) -> String {
        let mut q = Vec::new();
        if let Some(v) = &filter.verdict {
            q.push(format!("verdict={v}"));
        }
        if let Some(c) = &filter.cluster {
            q.push(format!("cluster={c}"));
        }
        if let Some(i) = filter.identity {
            q.push(format!("identity={i}"));
        }
        if let Some(s) = self.since_ms {
            q.push(format!("since={s}"));
        }
        if let Some(n) = self.last {
            q.push(format!("last={n}"));
        }
        if !self.follow {
            q.push("follow=false".to_owned());
        }
        if q.is_empty() {
            "/events".to_owned()
        } else {
            format!("/events?{}", q.join("&"))
        }
    }
}

/// An endpoint of a flow: `(shop/web-0, c2, identity 131077)`.
fn flow_endpoint(e: &Value, side: &str) -> String {
    let mut parts = Vec::new();
    if let Some(pod) = e[format!("{side}Pod")].as_str() {
        parts.push(pod.to_owned());
    }
    match e[format!("{side}ClusterName")].as_str() {
        Some(name) => parts.push(name.to_owned()),
        None => parts.push(format!("cluster {}", e[format!("{side}Cluster")])),
    }
    parts.push(format!("identity {}", e[format!("{side}Identity")]));
    format!("({})", parts.join(", "))
}

/// One verdict event of the agent's `/events` as `observe` prints it: the time the agent
/// received it, the verdict as Hubble names it, the direction, both ends (pod, cluster,
/// identity), the protocol and what decided.
pub(crate) fn event_line(e: &Value) -> String {
    let verdict = match e["verdict"].as_str().unwrap_or("?") {
        "allowed" => "FORWARDED",
        "denied" => "DROPPED",
        "audited" => "AUDIT",
        "ejected" => "EJECTED",
        "readmitted" => "READMITTED",
        other => other,
    };
    let time = e["time"]
        .as_str()
        .map(|t| format!("{t} "))
        .unwrap_or_default();
    if let Some(what) = e["outlier"].as_str() {
        return format!(
            "{time}{verdict:<10} backend {}:{} {}: {what}",
            e["dst"].as_str().unwrap_or("?"),
            e["dport"],
            flow_endpoint(e, "dst"),
        );
    }
    let protocol = e["protocol"]
        .as_str()
        .map_or_else(|| format!("proto {}", e["proto"]), str::to_owned);
    // For ICMP the datapath reports the message type in the port's place.
    let (port, icmp_type) = if e["proto"] == 1 {
        (String::new(), format!(" type {}", e["dport"]))
    } else {
        (format!(":{}", e["dport"]), String::new())
    };
    // The rule that decided: its name when the agent knows it.
    let rule = match (e["rule"].as_u64(), e["ruleName"].as_str()) {
        (_, Some(name)) => format!("by {name}"),
        (Some(0), None) if e["verdict"] == "denied" => "rule 0 (default deny)".to_owned(),
        _ => format!("rule {}", e["rule"]),
    };
    format!(
        "{time}{verdict:<10} {:<7} {} {} -> {}{port} {} {protocol}{icmp_type} {rule}",
        e["direction"].as_str().unwrap_or("?"),
        e["src"].as_str().unwrap_or("?"),
        flow_endpoint(e, "src"),
        e["dst"].as_str().unwrap_or("?"),
        flow_endpoint(e, "dst"),
    )
}

/// `clustermesh observe`: the flows asked for, until interrupted (or `limit` flows).
pub(crate) async fn observe(
    agent: &str,
    filter: &EventFilter,
    window: &Window,
    format: Format,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    if filter.cluster.as_deref().is_some_and(|c| {
        c.is_empty()
            || !c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    }) {
        anyhow::bail!("--cluster takes a cluster name or ID");
    }
    let mut lines = crate::output::open_lines(agent, &window.path(filter)).await?;
    if window.follow && std::io::stdout().is_terminal() {
        eprintln!("Listening for flows of the agent at {agent} (Ctrl-C to stop)...");
    }
    let mut seen = 0usize;
    while let Some(line) = lines.next_line().await? {
        let Ok(e) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(n) = e["lost_events"].as_u64() {
            eprintln!("{n} flows lost: this client read them too slowly");
            continue;
        }
        if !filter.keeps(&e) {
            continue;
        }
        if format == Format::Json {
            println!("{line}");
        } else {
            println!("{}", event_line(&e));
        }
        seen += 1;
        if limit.is_some_and(|l| seen >= l) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod event_tests {
    use super::*;

    fn drop_event() -> Value {
        serde_json::json!({"time": "2026-12-02T03:40:01.123Z", "verdict": "denied",
            "direction": "ingress", "src": "10.2.0.10", "dst": "10.1.0.30", "srcIdentity": 131077,
            "dstIdentity": 65540, "srcCluster": 2, "dstCluster": 1, "srcClusterName": "c2",
            "dstClusterName": "c1", "srcPod": "shop/web-0", "dstPod": "shop/payments-0",
            "dport": 8080, "proto": 6, "protocol": "TCP", "rule": 0})
    }

    #[test]
    fn a_flow_reads_like_hubble() {
        assert_eq!(
            event_line(&drop_event()),
            "2026-12-02T03:40:01.123Z DROPPED    ingress 10.2.0.10 (shop/web-0, c2, identity 131077) \
             -> 10.1.0.30:8080 (shop/payments-0, c1, identity 65540) TCP rule 0 (default deny)"
        );
        let mut icmp = drop_event();
        icmp["proto"] = 1.into();
        icmp["protocol"] = "ICMPv4".into();
        icmp["dport"] = 8.into();
        icmp["verdict"] = "allowed".into();
        icmp["rule"] = 5.into();
        icmp["ruleName"] = "shop/ping rule 0".into();
        icmp["srcPod"] = Value::Null;
        icmp["srcClusterName"] = Value::Null;
        assert_eq!(
            event_line(&icmp),
            "2026-12-02T03:40:01.123Z FORWARDED  ingress 10.2.0.10 (cluster 2, identity 131077) \
             -> 10.1.0.30 (shop/payments-0, c1, identity 65540) ICMPv4 type 8 by shop/ping rule 0"
        );
    }

    #[test]
    fn clusters_are_matched_by_name_or_id_and_verdicts_by_either_name() {
        let e = drop_event();
        let f = |verdict: Option<&str>, cluster: Option<&str>| EventFilter {
            verdict: verdict.map(str::to_owned),
            cluster: cluster.map(str::to_owned),
            identity: None,
        };
        assert!(f(None, Some("c2")).keeps(&e));
        assert!(f(None, Some("1")).keeps(&e));
        assert!(!f(None, Some("c3")).keeps(&e));
        assert!(!f(None, Some("3")).keeps(&e));
        assert!(f(Some("dropped"), None).keeps(&e));
        assert!(f(Some("denied"), None).keeps(&e));
        assert!(!f(Some("forwarded"), None).keeps(&e));
    }

    #[test]
    fn the_window_asks_for_kept_flows() {
        let none = EventFilter::default();
        assert_eq!(
            Window {
                follow: true,
                ..Window::default()
            }
            .path(&none),
            "/events"
        );
        let drops_of_c2 = EventFilter {
            verdict: Some("dropped".into()),
            cluster: Some("c2".into()),
            identity: Some(7),
        };
        assert_eq!(
            Window {
                since_ms: Some(5),
                last: Some(20),
                follow: false
            }
            .path(&drops_of_c2),
            "/events?verdict=dropped&cluster=c2&identity=7&since=5&last=20&follow=false"
        );
    }
}
