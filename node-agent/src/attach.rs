//! Local endpoints' host-side interfaces, found the way a routing CNI sets them up: the host
//! route to the endpoint's IP names the interface (`ip route get <ip>`, in the endpoints'
//! network namespace when one is configured).
//!
//! The agent attaches its policy programs to that interface only when it is, beyond doubt, the
//! endpoint's own: a direct route (no gateway), a unicast route, an interface that is a veth
//! (or matches one of the configured `bpf.endpointInterfaces` patterns), and not the interface
//! of a default route. Anything else is refused and attaches nothing: a pod address that the
//! host happens to route through its uplink must never put a cluster's policy on the host's
//! own traffic.

use std::net::Ipv4Addr;
use std::path::Path;

use serde_json::Value;

/// Why an endpoint's interface was refused, or could not be found.
pub type Refusal = String;

/// What makes an interface acceptable as an endpoint's own.
#[derive(Debug, Clone, Default)]
pub struct InterfacePolicy {
    /// Extra interface-name patterns (glob: `lxc*`, `cali?*`) accepted besides veths.
    patterns: Vec<glob::Pattern>,
}

impl InterfacePolicy {
    /// Compiles the configured patterns.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let patterns = patterns
            .iter()
            .map(|p| glob::Pattern::new(p).map_err(|e| format!("interface pattern {p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }
}

/// Runs `ip ARGS` (JSON output) in `netns`, or in the agent's own namespace.
async fn ip_json(netns: Option<&Path>, args: &[&str]) -> Result<Value, String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("ip");
            c
        }
        None => tokio::process::Command::new("ip"),
    };
    cmd.arg("-j").args(args);
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("running ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text)
        .map_err(|e| format!("ip {}: unreadable output: {e}", args.join(" ")))
}

/// The facts the decision is made from, as `ip` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFacts {
    /// The route's type when not unicast (`local`, `unreachable`, ...).
    pub kind: Option<String>,
    /// The gateway, when the route has one.
    pub gateway: Option<String>,
    /// The interface.
    pub dev: Option<String>,
    /// The interface's link kind (`veth`, `dummy`, ...; `None` for a physical device).
    pub link_kind: Option<String>,
    /// The interfaces of the namespace's default routes.
    pub default_devs: Vec<String>,
}

/// Reads the first route of `ip -j route get` output: its type, its gateway (a `gateway`, a
/// `via` of another family, or `nexthops` of a multipath route all count), its device.
pub fn parse_route(v: &Value) -> (Option<String>, Option<String>, Option<String>) {
    let r = v.get(0).unwrap_or(&Value::Null);
    let s = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_owned);
    let gateway = s("gateway")
        .or_else(|| {
            r.get("via").map(|via| {
                via.get("host")
                    .and_then(Value::as_str)
                    .map_or_else(|| via.to_string(), str::to_owned)
            })
        })
        .or_else(|| r.get("nexthops").map(|n| format!("nexthops {n}")));
    (s("type"), gateway, s("dev"))
}

/// The devices of the default routes in `ip -j route show table all default` output,
/// multipath next hops included.
pub fn parse_default_devs(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for r in v.as_array().into_iter().flatten() {
        let hops = r.get("nexthops").and_then(Value::as_array);
        for d in std::iter::once(r)
            .chain(hops.into_iter().flatten())
            .filter_map(|x| x.get("dev").and_then(Value::as_str))
        {
            if !out.iter().any(|o| o == d) {
                out.push(d.to_owned());
            }
        }
    }
    out
}

/// The interfaces of every default route of `netns` (IPv4 and IPv6, every table): no
/// endpoint's programs ever go there.
pub async fn default_devices(netns: Option<&Path>) -> Result<Vec<String>, Refusal> {
    let mut devs =
        parse_default_devs(&ip_json(netns, &["route", "show", "table", "all", "default"]).await?);
    for d in parse_default_devs(
        &ip_json(netns, &["-6", "route", "show", "table", "all", "default"]).await?,
    ) {
        if !devs.contains(&d) {
            devs.push(d);
        }
    }
    Ok(devs)
}

/// The decision: the interface to attach to, or why not.
pub fn decide(ip: Ipv4Addr, f: &RouteFacts, policy: &InterfacePolicy) -> Result<String, Refusal> {
    let Some(dev) = f.dev.as_deref().filter(|d| !d.is_empty()) else {
        return Err(format!("the route to {ip} names no interface"));
    };
    if let Some(kind) = f.kind.as_deref().filter(|k| *k != "unicast") {
        return Err(format!(
            "the route to {ip} is of type {kind} (dev {dev}), not a route to an endpoint"
        ));
    }
    if let Some(gw) = &f.gateway {
        return Err(format!(
            "{ip} is routed through the gateway {gw} on {dev}, not to an endpoint's own \
             interface; nothing attached"
        ));
    }
    if dev == "lo" {
        return Err(format!("{ip} is routed to lo; nothing attached"));
    }
    if f.default_devs.iter().any(|d| d == dev) {
        return Err(format!(
            "{ip} is routed to {dev}, the interface of a default route; nothing attached"
        ));
    }
    let veth = f.link_kind.as_deref() == Some("veth");
    if !veth && !policy.matches(dev) {
        return Err(format!(
            "{ip} is routed to {dev}, which is {} and matches no bpf.endpointInterfaces \
             pattern; nothing attached",
            match f.link_kind.as_deref() {
                Some(k) => format!("a {k} interface, not a veth,"),
                None => "not a veth".to_owned(),
            }
        ));
    }
    Ok(dev.to_owned())
}

/// Finds the endpoint's own host-side interface for `ip` in `netns` (a netns file such as
/// `/var/run/netns/NAME`; `None`: the agent's own namespace), or says why there is none.
/// `default_devs` are the namespace's default-route interfaces ([`default_devices`]).
pub async fn endpoint_interface(
    netns: Option<&Path>,
    ip: Ipv4Addr,
    policy: &InterfacePolicy,
    default_devs: &[String],
) -> Result<String, Refusal> {
    let ip_s = ip.to_string();
    let (kind, gateway, dev) = parse_route(&ip_json(netns, &["route", "get", &ip_s]).await?);
    let link_kind = match dev.as_deref() {
        Some(d) if !d.is_empty() && d != "lo" => {
            let link = ip_json(netns, &["-d", "link", "show", "dev", d]).await?;
            link.get(0)
                .and_then(|l| l.get("linkinfo"))
                .and_then(|i| i.get("info_kind"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        }
        _ => None,
    };
    decide(
        ip,
        &RouteFacts {
            kind,
            gateway,
            dev,
            link_kind,
            default_devs: default_devs.to_vec(),
        },
        policy,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(
        gateway: Option<&str>,
        dev: &str,
        kind: Option<&str>,
        defaults: &[&str],
    ) -> RouteFacts {
        RouteFacts {
            kind: None,
            gateway: gateway.map(str::to_owned),
            dev: Some(dev.to_owned()),
            link_kind: kind.map(str::to_owned),
            default_devs: defaults.iter().map(|d| (*d).to_owned()).collect(),
        }
    }

    #[test]
    fn reads_ip_route_get_json() {
        let v: Value = serde_json::from_str(
            r#"[{"dst":"10.1.0.1","gateway":"192.0.2.1","dev":"eth0","prefsrc":"192.0.2.2","flags":[],"uid":0,"cache":[]}]"#,
        )
        .unwrap();
        assert_eq!(
            parse_route(&v),
            (None, Some("192.0.2.1".into()), Some("eth0".into()))
        );
        let v: Value = serde_json::from_str(
            r#"[{"type":"local","dst":"127.0.0.1","dev":"lo","prefsrc":"127.0.0.1","flags":[],"uid":0,"cache":["local"]}]"#,
        )
        .unwrap();
        assert_eq!(
            parse_route(&v),
            (Some("local".into()), None, Some("lo".into()))
        );
        assert_eq!(parse_route(&Value::Null), (None, None, None));
        // An IPv4 route through an IPv6 next hop, and a multipath route: both have gateways.
        let v: Value = serde_json::from_str(
            r#"[{"dst":"10.1.0.1","via":{"family":"inet6","host":"fe80::1"},"dev":"eth0","flags":[]}]"#,
        )
        .unwrap();
        assert_eq!(parse_route(&v).1.as_deref(), Some("fe80::1"));
        let v: Value = serde_json::from_str(
            r#"[{"dst":"10.1.0.1","nexthops":[{"gateway":"192.0.2.1","dev":"eth0"},{"gateway":"192.0.2.9","dev":"eth1"}]}]"#,
        )
        .unwrap();
        assert!(parse_route(&v).1.unwrap().starts_with("nexthops"));
    }

    #[test]
    fn default_routes_of_every_kind_name_their_devices() {
        let v: Value = serde_json::from_str(
            r#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0","flags":[]},
                {"dst":"default","table":"100","flags":[],"nexthops":[{"gateway":"192.0.2.9","dev":"eth1","weight":1},{"gateway":"192.0.2.10","dev":"eth0","weight":1}]}]"#,
        )
        .unwrap();
        assert_eq!(parse_default_devs(&v), ["eth0", "eth1"]);
        assert!(parse_default_devs(&Value::Array(Vec::new())).is_empty());
    }

    #[test]
    fn only_a_direct_route_to_a_veth_that_is_not_the_uplink_is_accepted() {
        let ip = Ipv4Addr::new(10, 1, 0, 5);
        let none = InterfacePolicy::default();
        assert_eq!(
            decide(ip, &facts(None, "cmh0", Some("veth"), &["eth0"]), &none),
            Ok("cmh0".into())
        );
        let gw = decide(
            ip,
            &facts(Some("192.0.2.1"), "eth0", None, &["eth0"]),
            &none,
        );
        assert!(gw.unwrap_err().contains("gateway 192.0.2.1 on eth0"));
        let gw_veth = decide(
            ip,
            &facts(Some("10.0.0.1"), "cmh0", Some("veth"), &[]),
            &none,
        );
        assert!(gw_veth.unwrap_err().contains("gateway"));
        let physical = decide(ip, &facts(None, "eth1", None, &["eth0"]), &none);
        assert!(physical.unwrap_err().contains("eth1, which is not a veth"));
        let dummy = decide(ip, &facts(None, "dum0", Some("dummy"), &[]), &none);
        assert!(dummy.unwrap_err().contains("a dummy interface, not a veth"));
        let uplink = decide(ip, &facts(None, "cmh0", Some("veth"), &["cmh0"]), &none);
        assert!(uplink.unwrap_err().contains("default route"));
        let lo = decide(ip, &facts(None, "lo", None, &[]), &none);
        assert!(lo.unwrap_err().contains("lo"));
        let mut local = facts(None, "cmh0", Some("veth"), &[]);
        local.kind = Some("local".into());
        assert!(
            decide(ip, &local, &none)
                .unwrap_err()
                .contains("type local")
        );
        let mut nodev = facts(None, "", None, &[]);
        nodev.dev = None;
        assert!(decide(ip, &nodev, &none).is_err());
    }

    #[test]
    fn a_pattern_admits_other_interface_kinds_but_never_the_uplink() {
        let ip = Ipv4Addr::new(10, 1, 0, 5);
        let p = InterfacePolicy::new(&["dum*".into()]).unwrap();
        assert_eq!(
            decide(ip, &facts(None, "dum0", Some("dummy"), &["eth0"]), &p),
            Ok("dum0".into())
        );
        assert!(decide(ip, &facts(None, "dum0", Some("dummy"), &["dum0"]), &p).is_err());
        assert!(decide(ip, &facts(Some("10.0.0.1"), "dum0", None, &[]), &p).is_err());
        assert!(InterfacePolicy::new(&["[".into()]).is_err());
    }
}
