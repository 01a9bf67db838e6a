//! The agent's admin endpoint (plain HTTP, bind it to loopback): `/healthz`, `/readyz` (the
//! first snapshot is in the datapath), `/metrics`, `/status`, and the explanations:
//! `/explain/service/{namespace}/{name}` (each backend, in or out, and why) and
//! `/explain/endpoint/{ip}` (each policy entry with the rules that produced it); `/services`
//! (every local service, merged); `/maps/{services|backends|ipcache|endpoints|policy}` (the
//! datapath's maps, decoded); `/events` (live verdict events as JSON lines, eBPF only).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use clustermesh_model::cluster::ClusterName;

use crate::agent::Shared;
use crate::merge::merge;
use crate::view::View;

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// Reconcile passes.
    pub reconciles: Counter,
    /// Passes that failed to write the datapath.
    pub reconcile_errors: Counter,
    /// Map entries written (`op="upsert"`) and deleted (`op="delete"`).
    pub map_ops: Family<[(&'static str, &'static str); 1], Counter>,
    /// Service frontends programmed.
    pub services: Gauge,
    /// ipcache entries programmed.
    pub ipcache: Gauge,
    /// Outlier detection's ejections and re-admissions.
    pub outlier: OutlierCounters,
    /// Policy verdicts of the datapath (new flows and drops) by verdict, direction and the
    /// two clusters.
    pub verdicts: Family<Vec<(&'static str, String)>, Counter>,
    /// Seconds from a change's origin until this agent's datapath holds it, by
    /// `source_cluster`.
    pub propagation: Propagation,
}

/// A histogram of propagation delays by `source_cluster`.
pub type Propagation = Family<Vec<(&'static str, String)>, Histogram, fn() -> Histogram>;

/// Outlier detection's counters (fed by the datapath's events).
#[derive(Debug, Clone, Default)]
pub struct OutlierCounters {
    /// Backends ejected for a client, by reason (`failures`, `timeout`).
    pub ejections: Family<[(&'static str, &'static str); 1], Counter>,
    /// Ejected backends re-admitted after a successful trial connection.
    pub readmissions: Counter,
}

impl OutlierCounters {
    /// Counts an event if it is an ejection or a re-admission.
    pub fn count(&self, e: &clustermesh_bpf::VerdictEvent) {
        match e.verdict {
            clustermesh_bpf::EventVerdict::Ejected => {
                let reason = if e.endpoint_id == 2 {
                    "timeout"
                } else {
                    "failures"
                };
                self.ejections.get_or_create(&[("reason", reason)]).inc();
            }
            clustermesh_bpf::EventVerdict::Readmitted => {
                self.readmissions.inc();
            }
            _ => {}
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("clustermesh");
        let reconciles = Counter::default();
        let reconcile_errors = Counter::default();
        let map_ops = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let services = Gauge::default();
        let ipcache = Gauge::default();
        registry.register(
            "agent_reconciles",
            "Reconcile passes of the datapath",
            reconciles.clone(),
        );
        registry.register(
            "agent_reconcile_errors",
            "Reconcile passes that failed to write the datapath",
            reconcile_errors.clone(),
        );
        registry.register(
            "bpf_map_ops",
            "Datapath map entries written (op=upsert) or deleted (op=delete)",
            map_ops.clone(),
        );
        registry.register(
            "agent_service_frontends",
            "Service frontends (address, port, protocol) programmed in this node's datapath",
            services.clone(),
        );
        registry.register(
            "agent_ipcache_entries",
            "ipcache entries programmed in the datapath",
            ipcache.clone(),
        );
        let outlier = OutlierCounters::default();
        registry.register(
            "backend_ejections",
            "Backends ejected from a client's selection by outlier detection (reason=failures: consecutive failed connects; reason=timeout: a connect unanswered for the window)",
            outlier.ejections.clone(),
        );
        registry.register(
            "backend_readmissions",
            "Ejected backends selected again after a successful trial connection",
            outlier.readmissions.clone(),
        );
        registry.register(
            "build",
            "This build of clustermesh (version) and the process (component)",
            prometheus_client::metrics::info::Info::new(clustermesh_telemetry::build::info_labels(
                "agent",
            )),
        );
        let verdicts = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register(
            "policy_verdicts",
            "Policy verdicts of the eBPF datapath: a new flow forwarded or audited, or a dropped packet (verdict=forwarded|dropped|audit, direction=ingress|egress, source_cluster, destination_cluster)",
            verdicts.clone(),
        );
        let propagation: Propagation = Family::new_with_constructor(|| {
            Histogram::new(clustermesh_telemetry::PROPAGATION_BUCKETS.iter().copied())
        });
        registry.register_with_unit(
            "agent_propagation",
            "Seconds from a change's origin (applied by the source of its cluster) until this agent's datapath holds it, per source cluster (the local one included): the end-to-end delay of the mesh (clocks of both clusters count)",
            prometheus_client::registry::Unit::Seconds,
            propagation.clone(),
        );
        Self {
            registry,
            verdicts,
            propagation,
            outlier,
            reconciles,
            reconcile_errors,
            map_ops,
            services,
            ipcache,
        }
    }

    /// Counts a policy verdict.
    pub fn count_verdict(
        &self,
        e: &clustermesh_bpf::VerdictEvent,
        source_cluster: String,
        destination_cluster: String,
    ) {
        let verdict = match e.verdict {
            clustermesh_bpf::EventVerdict::Allowed => "forwarded",
            clustermesh_bpf::EventVerdict::Denied => "dropped",
            clustermesh_bpf::EventVerdict::Audited => "audit",
            _ => return,
        };
        let direction = match e.direction {
            clustermesh_bpf::Direction::Ingress => "ingress",
            clustermesh_bpf::Direction::Egress => "egress",
        };
        self.verdicts
            .get_or_create(&vec![
                ("verdict", verdict.to_owned()),
                ("direction", direction.to_owned()),
                ("source_cluster", source_cluster),
                ("destination_cluster", destination_cluster),
            ])
            .inc();
    }

    /// Counts map writes.
    pub fn count_ops(&self, upserts: usize, deletes: usize) {
        for (op, n) in [("upsert", upserts), ("delete", deletes)] {
            self.map_ops
                .get_or_create(&[("op", op)])
                .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_string_pretty(v) {
        Ok(body) => ([("content-type", "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    if s.status.lock().synced {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the local apiserver's snapshot\n",
        )
            .into_response()
    }
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    let st = s.status.lock().clone();
    json(&st)
}

/// The metrics: OpenMetrics text when the scraper asks for it (as Prometheus does), else the
/// Prometheus text format (as the apiserver's).
async fn metrics(State(s): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    let mut text = s.metrics.render();
    // The registry ends with "# EOF"; the other series go before it.
    let eof = text.rfind("# EOF").unwrap_or(text.len());
    let mut extra = s
        .view
        .lock()
        .as_ref()
        .map(cluster_metrics)
        .unwrap_or_default();
    extra.push_str(&clustermesh_telemetry::process::render());
    text.insert_str(eof, &extra);
    let accept = headers.get("accept").and_then(|v| v.to_str().ok());
    let (content_type, body) = clustermesh_telemetry::exposition::negotiate(accept, text);
    ([("content-type", content_type)], body).into_response()
}

/// Cilium agent's remote-cluster metrics (names, types and labels of Cilium 1.19), from the
/// view: the remote clusters the local apiserver reports, their readiness, and what each has
/// in the view.
fn cluster_metrics(view: &View) -> String {
    let mut nodes: BTreeMap<&ClusterName, usize> = BTreeMap::new();
    let mut services: BTreeMap<&ClusterName, usize> = BTreeMap::new();
    let mut endpoints: BTreeMap<&ClusterName, usize> = BTreeMap::new();
    let remotes = view.statuses();
    for (cluster, _) in view.nodes().keys() {
        *nodes.entry(cluster).or_default() += 1;
    }
    for name in view.service_names() {
        for cluster in view.service(name).into_iter().flat_map(BTreeMap::keys) {
            *services.entry(cluster).or_default() += 1;
        }
    }
    for ip in view.ipcache_ips() {
        if let Some((cluster, _)) = view.ipcache_entry(ip) {
            *endpoints.entry(cluster).or_default() += 1;
        }
    }
    let mut out = format!(
        "# HELP cilium_clustermesh_remote_clusters The total number of remote clusters meshed with the local cluster\n\
         # TYPE cilium_clustermesh_remote_clusters gauge\ncilium_clustermesh_remote_clusters {}\n",
        remotes.len()
    );
    // Families without samples are left out, as the registry leaves out its own.
    if remotes.is_empty() {
        return out;
    }
    out.push_str("# HELP cilium_clustermesh_remote_cluster_readiness_status The readiness status of the remote cluster (1: connected and its snapshot imported by the local apiserver, 0: not)\n# TYPE cilium_clustermesh_remote_cluster_readiness_status gauge\n");
    for (name, st) in remotes {
        out.push_str(&format!(
            "cilium_clustermesh_remote_cluster_readiness_status{{target_cluster=\"{name}\"}} {}\n",
            u8::from(st.connected && st.ready)
        ));
    }
    // The local apiserver's connection to the remote is the one that fails (the agent has
    // one connection, to its apiserver): its counts, as the apiserver publishes them.
    out.push_str("# HELP cilium_clustermesh_remote_cluster_failures The total number of failures related to the remote cluster (the local apiserver's failed connections and broken or refused sessions to it)\n# TYPE cilium_clustermesh_remote_cluster_failures gauge\n");
    for (name, st) in remotes {
        out.push_str(&format!(
            "cilium_clustermesh_remote_cluster_failures{{target_cluster=\"{name}\"}} {}\n",
            st.failures
        ));
    }
    out.push_str("# HELP cilium_clustermesh_remote_cluster_last_failure_ts The timestamp of the last failure of the remote cluster (Unix seconds; 0: none yet)\n# TYPE cilium_clustermesh_remote_cluster_last_failure_ts gauge\n");
    for (name, st) in remotes {
        out.push_str(&format!(
            "cilium_clustermesh_remote_cluster_last_failure_ts{{target_cluster=\"{name}\"}} {}\n",
            st.last_failure_time
        ));
    }
    for (family, help, counts) in [
        (
            "nodes",
            "The total number of nodes in the remote cluster",
            &nodes,
        ),
        (
            "services",
            "The total number of services in the remote cluster (its global shared services this agent holds)",
            &services,
        ),
        (
            "endpoints",
            "The total number of endpoints in the remote cluster (its pod addresses in this agent's ipcache)",
            &endpoints,
        ),
    ] {
        out.push_str(&format!(
            "# HELP cilium_clustermesh_remote_cluster_{family} {help}\n# TYPE cilium_clustermesh_remote_cluster_{family} gauge\n"
        ));
        for name in remotes.keys() {
            out.push_str(&format!(
                "cilium_clustermesh_remote_cluster_{family}{{target_cluster=\"{name}\"}} {}\n",
                counts.get(name).copied().unwrap_or(0)
            ));
        }
    }
    out
}

async fn explain_service(
    State(s): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let plan = s
        .view
        .lock()
        .as_ref()
        .and_then(|v| merge(v, &(namespace.clone(), name.clone())));
    match plan {
        Some(p) => {
            // What the datapath refused of this service: its frontends are not in the maps as
            // planned.
            let errors: std::collections::BTreeMap<String, String> = {
                let st = s.status.lock();
                p.frontends
                    .iter()
                    .map(|f| format!("{}:{}/{}", f.vip, f.port, f.proto))
                    .filter_map(|k| st.datapath_errors.get(&k).map(|e| (k, e.clone())))
                    .collect()
            };
            let mut v = serde_json::to_value(&p).unwrap_or_default();
            annotate_outliers(&mut v, &outlier_summary(&s));
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "datapathErrors".to_owned(),
                    serde_json::to_value(errors).unwrap_or_default(),
                );
            }
            json(&v)
        }
        None => (
            StatusCode::NOT_FOUND,
            format!("no local service {namespace}/{name} (or not synced yet)\n"),
        )
            .into_response(),
    }
}

/// What outlier detection recorded about each TCP backend, over every client on this node.
fn outlier_summary(s: &Shared) -> BTreeMap<(Ipv4Addr, u16), serde_json::Value> {
    let Some(kernel) = &s.kernel else {
        return BTreeMap::new();
    };
    let health = match kernel.backend_health() {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "reading outlier detection's records failed");
            return BTreeMap::new();
        }
    };
    let mut by_backend: BTreeMap<(Ipv4Addr, u16), Vec<&clustermesh_bpf::BackendHealth>> =
        BTreeMap::new();
    for h in health.iter().filter(|h| h.proto == 6) {
        by_backend.entry((h.ip, h.port)).or_default().push(h);
    }
    by_backend
        .into_iter()
        .map(|(key, records)| {
            let clients = records.len();
            let ejected: Vec<_> = records
                .iter()
                .filter_map(|h| h.ejected.map(|(age, why)| (age, why, h.failures)))
                .collect();
            let latest = ejected.iter().min_by_key(|(age, _, _)| *age);
            let summary = latest.map(|(age, why, failures)| {
                let cause = match why {
                    clustermesh_bpf::EjectReason::Failures => {
                        format!("{failures} failed connects")
                    }
                    clustermesh_bpf::EjectReason::Timeout => {
                        "a connect unanswered for the window".to_owned()
                    }
                };
                let whom = if clients > 1 {
                    format!(" for {} of {clients} clients", ejected.len())
                } else {
                    String::new()
                };
                format!("ejected ({cause}, {:.1} s ago){whom}", age.as_secs_f64())
            });
            let value = serde_json::json!({
                "clients": clients,
                "ejectedClients": ejected.len(),
                "summary": summary,
                "reason": latest.map(|(_, why, _)| match why {
                    clustermesh_bpf::EjectReason::Failures => "failures",
                    clustermesh_bpf::EjectReason::Timeout => "timeout",
                }),
                "ejectedSecondsAgo": latest.map(|(age, _, _)| age.as_secs_f64()),
                "failures": records.iter().map(|h| h.failures).max(),
            });
            (key, value)
        })
        .collect()
}

/// Adds outlier detection's record to each TCP candidate of an explained service.
fn annotate_outliers(
    plan: &mut serde_json::Value,
    outliers: &BTreeMap<(Ipv4Addr, u16), serde_json::Value>,
) {
    if outliers.is_empty() {
        return;
    }
    let frontends = plan
        .get_mut("frontends")
        .and_then(serde_json::Value::as_array_mut);
    for f in frontends.into_iter().flatten() {
        if f["proto"] != "TCP" {
            continue;
        }
        let candidates = f
            .get_mut("candidates")
            .and_then(serde_json::Value::as_array_mut);
        for c in candidates.into_iter().flatten() {
            let ip = c["ip"].as_str().and_then(|ip| ip.parse::<Ipv4Addr>().ok());
            let port = c["port"].as_u64().and_then(|p| u16::try_from(p).ok());
            if let (Some(ip), Some(port)) = (ip, port)
                && let Some(o) = outliers.get(&(ip, port))
                && let Some(obj) = c.as_object_mut()
            {
                obj.insert("outlier".to_owned(), o.clone());
            }
        }
    }
}

async fn explain_endpoint(State(s): State<Arc<Shared>>, Path(ip): Path<String>) -> Response {
    let Ok(ip) = ip.parse::<Ipv4Addr>() else {
        return (
            StatusCode::BAD_REQUEST,
            format!("{ip:?} is not an IPv4 address\n"),
        )
            .into_response();
    };
    let found = s.desired.lock().policy.explain.get(&ip).cloned();
    match found.map(|e| serde_json::to_value(e).unwrap_or_default()) {
        Some(mut e) => {
            // Where the policy programs are attached, or why they are not (eBPF datapath).
            if let Some(obj) = e.as_object_mut() {
                let attachment = s.status.lock().endpoints.get(&ip).cloned();
                obj.insert(
                    "attachment".to_owned(),
                    serde_json::to_value(attachment).unwrap_or_default(),
                );
            }
            json(&e)
        }
        None => (
            StatusCode::NOT_FOUND,
            format!("{ip} is not an endpoint of this node\n"),
        )
            .into_response(),
    }
}

async fn services(State(s): State<Arc<Shared>>) -> Response {
    let plans: Vec<crate::merge::ServicePlan> = s
        .view
        .lock()
        .as_ref()
        .map(|v| v.service_names().filter_map(|n| merge(v, n)).collect())
        .unwrap_or_default();
    json(&plans)
}

async fn maps(State(s): State<Arc<Shared>>, Path(map): Path<String>) -> Response {
    let snap = match s.datapath.snapshot() {
        Ok(snap) => snap,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the maps failed: {e}\n"),
            )
                .into_response();
        }
    };
    let rows: Vec<serde_json::Value> = match map.as_str() {
        "services" => snap
            .services
            .iter()
            .map(|(k, ids)| {
                serde_json::json!({"vip": k.vip.to_string(), "port": k.port,
                    "proto": k.proto.name(), "backends": ids})
            })
            .collect(),
        "backends" => snap
            .backends
            .iter()
            .map(|(id, b)| {
                serde_json::json!({"id": id, "ip": b.ip.to_string(), "port": b.port,
                    "proto": b.proto.name(), "state": format!("{:?}", b.state).to_lowercase(),
                    "clusterId": b.cluster_id})
            })
            .collect(),
        "ipcache" => snap
            .ipcache
            .iter()
            .map(|(p, v)| {
                serde_json::json!({"prefix": format!("{}/{}", p.addr, p.len), "identity": v.identity,
                    "nodeIp": v.node_ip.map(|n| n.to_string()), "clusterId": v.cluster_id})
            })
            .collect(),
        "endpoints" => snap
            .endpoints
            .iter()
            .map(|(ip, e)| {
                serde_json::json!({"ip": ip.to_string(), "endpointId": e.endpoint_id,
                    "identity": e.identity, "clusterId": e.cluster_id,
                    "enforceIngress": e.flags.enforce_ingress, "enforceEgress": e.flags.enforce_egress,
                    "auditIngress": e.flags.audit_ingress, "auditEgress": e.flags.audit_egress,
                    "portBlocks": e.flags.port_blocks})
            })
            .collect(),
        "policy" => snap
            .policy
            .iter()
            .map(|(k, v)| {
                serde_json::json!({"endpointId": k.endpoint_id, "identity": k.identity,
                    "port": k.port.map(|(p, _)| p), "proto": k.port.map(|(_, p)| p.name()),
                    // A range's piece: the 2^portBlock ports from port.
                    "portBlock": k.port_block,
                    "direction": format!("{:?}", k.direction).to_lowercase(),
                    "verdict": format!("{:?}", v.verdict).to_lowercase(), "ruleId": v.rule_id})
            })
            .collect(),
        other => {
            return (
                StatusCode::NOT_FOUND,
                format!("no map {other:?} (services, backends, ipcache, endpoints, policy)\n"),
            )
                .into_response();
        }
    };
    json(&rows)
}

/// `/events` query: `last=N` and `since=UNIX_MS` send kept flows first (oldest first);
/// `follow=false` stops after them. Without either, only new flows are sent.
#[derive(Debug, Default, PartialEq, Eq)]
struct EventsQuery {
    last: Option<usize>,
    since: Option<u64>,
    follow: Option<bool>,
    filter: crate::flows::Filter,
}

impl EventsQuery {
    fn parse(q: Option<&str>) -> Result<Self, String> {
        let mut out = Self::default();
        for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = || format!("{k}={v:?} is not valid");
            match k {
                "last" => out.last = Some(v.parse().map_err(|_| bad())?),
                "since" => out.since = Some(v.parse().map_err(|_| bad())?),
                "follow" => out.follow = Some(v.parse().map_err(|_| bad())?),
                "verdict" => {
                    out.filter.verdict =
                        Some(crate::flows::Filter::verdict_named(v).ok_or_else(bad)?);
                }
                "cluster" if !v.is_empty() && v.len() <= 253 => {
                    out.filter.cluster = Some(v.to_owned());
                }
                "identity" => out.filter.identity = Some(v.parse().map_err(|_| bad())?),
                _ => {
                    return Err(format!(
                        "unknown or bad parameter {k:?} (last, since, follow, verdict, cluster, identity)"
                    ));
                }
            }
        }
        Ok(out)
    }
}

async fn events(
    State(s): State<Arc<Shared>>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Response {
    let q = match EventsQuery::parse(raw.as_deref()) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let Some(tx) = &s.events else {
        return (
            StatusCode::NOT_IMPLEMENTED,
            "the userspace datapath produces no verdict events\n",
        )
            .into_response();
    };
    let follow = q.follow.unwrap_or(true);
    // Subscribed before the ring is read, and the ring's newest sequence read with the
    // backlog: a flow in both is sent once.
    let rx = follow.then(|| tx.subscribe());
    let (backlog, after) = {
        let recent = s.recent.lock();
        let backlog = if q.last.is_some() || q.since.is_some() {
            recent.backlog(q.since, q.last, &q.filter)
        } else {
            Vec::new()
        };
        (backlog, recent.last_seq())
    };
    let kept = futures::stream::iter(
        backlog
            .into_iter()
            .map(|f| Ok::<_, std::convert::Infallible>(f.line.to_string())),
    );
    let filter = q.filter;
    let live = futures::stream::unfold(rx, move |rx| {
        let filter = filter.clone();
        async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(f) if after.is_some_and(|a| f.seq <= a) || !filter.keeps(&f.keys) => {}
                    Ok(f) => {
                        return Some((
                            Ok::<_, std::convert::Infallible>(f.line.to_string()),
                            Some(rx),
                        ));
                    }
                    // A subscriber that reads too slowly is told how many it missed.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        return Some((Ok(format!("{{\"lost_events\":{n}}}\n")), Some(rx)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    (
        [("content-type", "application/x-ndjson")],
        axum::body::Body::from_stream(futures::StreamExt::chain(kept, live)),
    )
        .into_response()
}

/// The routes of the metrics port: `/metrics` and `/healthz`.
pub fn metrics_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// The admin routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/explain/service/{namespace}/{name}", get(explain_service))
        .route("/explain/endpoint/{ip}", get(explain_endpoint))
        .route("/services", get(services))
        .route("/maps/{map}", get(maps))
        .route("/events", get(events))
        .with_state(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_query_is_read_strictly() {
        assert_eq!(EventsQuery::parse(None), Ok(EventsQuery::default()));
        assert_eq!(
            EventsQuery::parse(Some(
                "last=20&since=1700000000000&follow=false&verdict=dropped&cluster=c2&identity=7"
            )),
            Ok(EventsQuery {
                last: Some(20),
                since: Some(1_700_000_000_000),
                follow: Some(false),
                filter: crate::flows::Filter {
                    verdict: Some("denied"),
                    cluster: Some("c2".into()),
                    identity: Some(7),
                },
            })
        );
        for bad in [
            "last=-1",
            "last=x",
            "since=",
            "follow=maybe",
            "limit=3",
            "verdict=lost",
            "cluster=",
            "identity=-2",
        ] {
            assert!(EventsQuery::parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
