//! Pods in network namespaces, wired the way a routing CNI wires a node: a node namespace
//! (forwarding on, reverse-path filtering off) and, per pod, a namespace with `eth0` (the
//! pod's /32, a default route on `eth0`) whose veth peer sits in the node namespace with a /32
//! route and proxy ARP. Nothing is created in, or linked to, the caller's namespace. Used by
//! the datapath tests and by `clustermesh up --datapath bpf`; needs root and iproute2.

use std::net::Ipv4Addr;
use std::process::Command;

/// Runs `ip ARGS`; the error says which command failed and why.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn sysctl(netns: &str, setting: &str) -> Result<(), String> {
    ip(&["netns", "exec", netns, "sysctl", "-qw", setting])
}

/// Creates the node namespace `node`.
pub fn add_node(node: &str) -> Result<(), String> {
    ip(&["netns", "add", node])?;
    ip(&["-n", node, "link", "set", "lo", "up"])?;
    for setting in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ] {
        sysctl(node, setting)?;
    }
    Ok(())
}

/// Creates the pod namespace `netns` with address `ip`, its host-side interface `host_if` in
/// `node`, and the route to it.
pub fn add_pod(node: &str, netns: &str, host_if: &str, ip_addr: Ipv4Addr) -> Result<(), String> {
    let ip_s = ip_addr.to_string();
    ip(&["netns", "add", netns])?;
    ip(&[
        "-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{ip_s}/32"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n", netns, "route", "add", "default", "dev", "eth0", "scope", "link",
    ])?;
    ip(&["-n", node, "link", "set", host_if, "up"])?;
    ip(&[
        "-n",
        node,
        "route",
        "add",
        &format!("{ip_s}/32"),
        "dev",
        host_if,
    ])?;
    // Proxy ARP answers for every other pod; without proxy_delay=0 the kernel delays each
    // answer by up to 0.8 s, which a first connection feels.
    sysctl(node, &format!("net.ipv4.conf.{host_if}.proxy_arp=1"))?;
    sysctl(node, &format!("net.ipv4.neigh.{host_if}.proxy_delay=0"))
}
