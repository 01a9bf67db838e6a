//! The datapath's verdict events as flows, as `clustermesh observe` and the admin endpoint's
//! `/events` give them: the event's own fields, plus the time the agent received it, the
//! clusters' names, the pods' names and the deciding rule's name, and a `flow` object with
//! Hubble's field names. The agent keeps the last [`RECENT`] in a ring for `--since` and
//! `--last`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use clustermesh_bpf::{Direction, EventVerdict, VerdictEvent};

/// How many recent flows the agent keeps.
pub const RECENT: usize = 4096;

/// One flow as sent to `/events` subscribers.
#[derive(Debug)]
pub struct Flow {
    /// Its place in the agent's sequence (for a subscriber joining the ring and the live
    /// stream without duplicates).
    pub seq: u64,
    /// When the agent received it (Unix milliseconds).
    pub unix_ms: u64,
    /// What a subscriber may filter on.
    pub keys: Keys,
    /// The JSON line (with its newline).
    pub line: Arc<str>,
}

/// The parts of a flow `/events` filters on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    /// `allowed`, `denied`, `audited`, `ejected` or `readmitted`.
    pub verdict: &'static str,
    /// Source and destination cluster IDs.
    pub clusters: [u16; 2],
    /// Their names, when known.
    pub cluster_names: [Option<String>; 2],
    /// Source and destination identities.
    pub identities: [u32; 2],
}

/// Which flows a subscriber wants (every given part must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// A verdict: `allowed`/`forwarded`, `denied`/`dropped`, `audited`/`audit`, `ejected`,
    /// `readmitted`.
    pub verdict: Option<&'static str>,
    /// A cluster name or ID on either side.
    pub cluster: Option<String>,
    /// An identity on either side.
    pub identity: Option<u32>,
}

impl Filter {
    /// The verdict a name given by a user means, or `None` for an unknown name.
    pub fn verdict_named(name: &str) -> Option<&'static str> {
        Some(match name {
            "allowed" | "forwarded" | "FORWARDED" => "allowed",
            "denied" | "dropped" | "DROPPED" => "denied",
            "audited" | "audit" | "AUDIT" => "audited",
            "ejected" | "EJECTED" => "ejected",
            "readmitted" | "READMITTED" => "readmitted",
            _ => return None,
        })
    }

    /// Whether a flow with these keys is wanted.
    pub fn keeps(&self, k: &Keys) -> bool {
        self.verdict.is_none_or(|v| k.verdict == v)
            && self.identity.is_none_or(|i| k.identities.contains(&i))
            && self.cluster.as_deref().is_none_or(|c| {
                k.clusters.iter().any(|id| id.to_string() == c)
                    || k.cluster_names.iter().flatten().any(|n| n == c)
            })
    }
}

/// The ring of recent flows.
#[derive(Debug, Default)]
pub struct Recent {
    next_seq: u64,
    ring: VecDeque<Arc<Flow>>,
}

impl Recent {
    /// Keeps a flow (dropping the oldest past [`RECENT`]) and returns it.
    pub fn push(&mut self, unix_ms: u64, keys: Keys, line: Arc<str>) -> Arc<Flow> {
        let flow = Arc::new(Flow {
            seq: self.next_seq,
            unix_ms,
            keys,
            line,
        });
        self.next_seq += 1;
        if self.ring.len() == RECENT {
            self.ring.pop_front();
        }
        self.ring.push_back(Arc::clone(&flow));
        flow
    }

    /// The sequence number of the newest flow so far.
    pub fn last_seq(&self) -> Option<u64> {
        self.next_seq.checked_sub(1)
    }

    /// The kept flows that `filter` keeps and that were received at or after `since_ms`, at
    /// most the `last` newest of them, oldest first.
    pub fn backlog(
        &self,
        since_ms: Option<u64>,
        last: Option<usize>,
        filter: &Filter,
    ) -> Vec<Arc<Flow>> {
        let mut out: Vec<Arc<Flow>> = self
            .ring
            .iter()
            .filter(|f| since_ms.is_none_or(|s| f.unix_ms >= s) && filter.keeps(&f.keys))
            .cloned()
            .collect();
        if let Some(n) = last {
            let skip = out.len().saturating_sub(n);
            out.drain(..skip);
        }
        out
    }
}

/// What the agent knows to name an event's parts.
#[derive(Debug, Default, Clone)]
pub struct Names {
    /// This node.
    pub node: String,
    /// Cluster names by ID.
    pub clusters: BTreeMap<u16, String>,
    /// The deciding rule's name, if a rule decided.
    pub rule: Option<String>,
    /// The source's namespace and pod, when the ipcache names them.
    pub src_pod: Option<(String, String)>,
    /// The destination's, likewise.
    pub dst_pod: Option<(String, String)>,
}

/// A protocol number's name.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        1 => "ICMPv4".to_owned(),
        6 => "TCP".to_owned(),
        17 => "UDP".to_owned(),
        58 => "ICMPv6".to_owned(),
        132 => "SCTP".to_owned(),
        n => n.to_string(),
    }
}

/// Hubble's name of a verdict.
pub fn verdict_name(v: EventVerdict) -> &'static str {
    match v {
        EventVerdict::Allowed => "FORWARDED",
        EventVerdict::Denied => "DROPPED",
        EventVerdict::Audited => "AUDIT",
        EventVerdict::Ejected => "EJECTED",
        EventVerdict::Readmitted => "READMITTED",
    }
}

fn endpoint(
    identity: u32,
    cluster: u16,
    names: &Names,
    pod: Option<&(String, String)>,
) -> serde_json::Value {
    let mut v = serde_json::json!({"identity": identity});
    if let Some(o) = v.as_object_mut() {
        if let Some(c) = names.clusters.get(&cluster) {
            o.insert("cluster_name".to_owned(), c.clone().into());
        }
        if let Some((ns, name)) = pod {
            o.insert("namespace".to_owned(), ns.clone().into());
            o.insert("pod_name".to_owned(), name.clone().into());
        }
    }
    v
}

/// What `/events` filters on, of one event.
pub fn keys(e: &VerdictEvent, names: &Names) -> Keys {
    Keys {
        verdict: match e.verdict {
            EventVerdict::Allowed => "allowed",
            EventVerdict::Denied => "denied",
            EventVerdict::Audited => "audited",
            EventVerdict::Ejected => "ejected",
            EventVerdict::Readmitted => "readmitted",
        },
        clusters: [e.src_cluster, e.dst_cluster],
        cluster_names: [
            names.clusters.get(&e.src_cluster).cloned(),
            names.clusters.get(&e.dst_cluster).cloned(),
        ],
        identities: [e.src_identity, e.dst_identity],
    }
}

/// The JSON of one event: the flat fields `observe` has always had, the names, and (for a
/// policy verdict) `flow`.
pub fn to_json(e: &VerdictEvent, time: &str, names: &Names) -> serde_json::Value {
    let direction = match e.direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    let mut line = serde_json::json!({
        "time": time,
        "timeNs": e.time_ns,
        "direction": direction,
        "verdict": match e.verdict {
            EventVerdict::Allowed => "allowed",
            EventVerdict::Denied => "denied",
            EventVerdict::Audited => "audited",
            EventVerdict::Ejected => "ejected",
            EventVerdict::Readmitted => "readmitted",
        },
        "src": e.src_ip.to_string(),
        "dst": e.dst_ip.to_string(),
        "srcIdentity": e.src_identity,
        "dstIdentity": e.dst_identity,
        "srcCluster": e.src_cluster,
        "dstCluster": e.dst_cluster,
        "dport": e.dport,
        "proto": e.proto,
        "protocol": protocol_name(e.proto),
        "endpoint": e.endpoint_id,
        "rule": e.rule_id,
    });
    let Some(o) = line.as_object_mut() else {
        return line;
    };
    for (key, id) in [
        ("srcClusterName", e.src_cluster),
        ("dstClusterName", e.dst_cluster),
    ] {
        if let Some(c) = names.clusters.get(&id) {
            o.insert(key.to_owned(), c.clone().into());
        }
    }
    for (key, pod) in [("srcPod", &names.src_pod), ("dstPod", &names.dst_pod)] {
        if let Some((ns, name)) = pod {
            o.insert(key.to_owned(), format!("{ns}/{name}").into());
        }
    }
    if let Some(rule) = &names.rule {
        o.insert("ruleName".to_owned(), rule.clone().into());
    }
    // Outlier detection's events are no flows Hubble knows.
    if matches!(e.verdict, EventVerdict::Ejected | EventVerdict::Readmitted) {
        return line;
    }
    let l4 = match e.proto {
        1 => serde_json::json!({"ICMPv4": {"type": e.dport}}),
        6 => serde_json::json!({"TCP": {"destination_port": e.dport}}),
        17 => serde_json::json!({"UDP": {"destination_port": e.dport}}),
        _ => serde_json::json!({}),
    };
    let mut flow = serde_json::json!({
        "time": time,
        "verdict": verdict_name(e.verdict),
        "IP": {"source": e.src_ip.to_string(), "destination": e.dst_ip.to_string(), "ipVersion": "IPv4"},
        "l4": l4,
        "source": endpoint(e.src_identity, e.src_cluster, names, names.src_pod.as_ref()),
        "destination": endpoint(e.dst_identity, e.dst_cluster, names, names.dst_pod.as_ref()),
        "traffic_direction": direction.to_uppercase(),
        "node_name": names.node,
    });
    if let Some(f) = flow.as_object_mut() {
        if e.verdict == EventVerdict::Denied {
            let reason = if e.rule_id == 0 {
                "POLICY_DENIED"
            } else {
                "POLICY_DENY"
            };
            f.insert("drop_reason_desc".to_owned(), reason.into());
        }
        if let Some(rule) = &names.rule {
            let by = match e.verdict {
                EventVerdict::Denied => format!("{direction}_denied_by"),
                _ => format!("{direction}_allowed_by"),
            };
            f.insert(by, serde_json::json!([{"name": rule}]));
        }
    }
    o.insert("flow".to_owned(), flow);
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn the_ring_keeps_the_newest_and_answers_since_and_last() {
        let mut r = Recent::default();
        for i in 0..(RECENT as u64 + 10) {
            let keys = Keys {
                verdict: if i % 2 == 0 { "denied" } else { "allowed" },
                ..Keys::default()
            };
            r.push(1000 + i, keys, Arc::from(format!("{i}\n")));
        }
        let any = Filter::default();
        let all = r.backlog(None, None, &any);
        assert_eq!(all.len(), RECENT);
        assert_eq!(all[0].seq, 10, "the oldest ten are gone");
        let last = r.backlog(None, Some(3), &any);
        assert_eq!(
            last.iter().map(|f| f.seq).collect::<Vec<_>>(),
            [RECENT as u64 + 7, RECENT as u64 + 8, RECENT as u64 + 9]
        );
        let since = r.backlog(Some(1000 + RECENT as u64 + 8), None, &any);
        assert_eq!(since.len(), 2);
        assert_eq!(
            r.backlog(Some(1000 + RECENT as u64 + 8), Some(1), &any)
                .len(),
            1
        );
        assert!(r.backlog(Some(u64::MAX), None, &any).is_empty());
        assert_eq!(r.last_seq(), Some(RECENT as u64 + 9));
        // The filter applies before `last`: the last three drops, not the drops among the
        // last three.
        let drops = Filter {
            verdict: Filter::verdict_named("dropped"),
            ..Filter::default()
        };
        let last_drops = r.backlog(None, Some(3), &drops);
        assert_eq!(
            last_drops.iter().map(|f| f.seq).collect::<Vec<_>>(),
            [RECENT as u64 + 4, RECENT as u64 + 6, RECENT as u64 + 8]
        );
    }

    #[test]
    fn a_drop_is_a_hubble_flow_with_names() {
        let e = VerdictEvent {
            time_ns: 5,
            src_ip: Ipv4Addr::new(10, 2, 0, 10),
            dst_ip: Ipv4Addr::new(10, 1, 0, 30),
            src_identity: 131077,
            dst_identity: 65540,
            src_cluster: 2,
            dst_cluster: 1,
            dport: 8080,
            proto: 6,
            direction: Direction::Ingress,
            verdict: EventVerdict::Denied,
            endpoint_id: 7,
            rule_id: 0,
        };
        let names = Names {
            node: "c1-node".into(),
            clusters: [(1, "c1".to_owned()), (2, "c2".to_owned())].into(),
            rule: None,
            src_pod: Some(("shop".into(), "web-0".into())),
            dst_pod: None,
        };
        let j = to_json(&e, "2026-12-02T03:40:01.123Z", &names);
        assert_eq!(j["verdict"], "denied");
        assert_eq!(j["protocol"], "TCP");
        assert_eq!(j["srcClusterName"], "c2");
        assert_eq!(j["srcPod"], "shop/web-0");
        assert!(j.get("dstPod").is_none());
        let f = &j["flow"];
        assert_eq!(f["verdict"], "DROPPED");
        assert_eq!(f["drop_reason_desc"], "POLICY_DENIED");
        assert_eq!(f["traffic_direction"], "INGRESS");
        assert_eq!(f["l4"]["TCP"]["destination_port"], 8080);
        assert_eq!(
            f["source"],
            serde_json::json!({"identity": 131077, "cluster_name": "c2",
                "namespace": "shop", "pod_name": "web-0"})
        );
        let k = keys(&e, &names);
        let c = |c: &str| Filter {
            cluster: Some(c.into()),
            ..Filter::default()
        };
        assert!(c("c2").keeps(&k) && c("1").keeps(&k) && !c("c3").keeps(&k));
        let ejected = VerdictEvent {
            verdict: EventVerdict::Ejected,
            ..e
        };
        assert!(to_json(&ejected, "t", &names).get("flow").is_none());
        assert_eq!(f["node_name"], "c1-node");

        let allowed = VerdictEvent {
            verdict: EventVerdict::Allowed,
            proto: 1,
            dport: 8,
            rule_id: 9,
            direction: Direction::Egress,
            ..e
        };
        let names = Names {
            rule: Some("shop/ping rule 0".into()),
            ..names
        };
        let j = to_json(&allowed, "t", &names);
        assert_eq!(j["flow"]["verdict"], "FORWARDED");
        assert_eq!(j["flow"]["l4"]["ICMPv4"]["type"], 8);
        assert_eq!(
            j["flow"]["egress_allowed_by"],
            serde_json::json!([{"name": "shop/ping rule 0"}])
        );
        assert!(j["flow"].get("drop_reason_desc").is_none());
        assert_eq!(j["ruleName"], "shop/ping rule 0");
    }
}
