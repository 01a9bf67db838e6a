//! Local endpoints' host-side interfaces, found the way a routing CNI sets them up: the host
//! route to the endpoint's IP names the interface (`ip route get <ip>`, in the endpoints'
//! network namespace when one is configured).

use std::net::Ipv4Addr;
use std::path::Path;

/// Reads the interface from `ip -o route get` output: the word after `dev`.
pub fn parse_route_dev(output: &str) -> Option<String> {
    let mut words = output.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev" {
            return words
                .next()
                .filter(|d| !d.is_empty() && d.len() < 16 && *d != "lo")
                .map(str::to_owned);
        }
    }
    None
}

/// The interface the host routes `ip` through, in `netns` (a netns file such as
/// `/var/run/netns/NAME`; `None`: the agent's own namespace).
pub async fn route_interface(netns: Option<&Path>, ip: Ipv4Addr) -> Result<String, String> {
    let ip_s = ip.to_string();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("nsenter");
            c.arg(format!("--net={}", ns.display()))
                .args(["ip", "-o", "route", "get", &ip_s]);
            c
        }
        None => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["-o", "route", "get", &ip_s]);
            c
        }
    };
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("running ip route get {ip}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip route get {ip}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_route_dev(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| format!("no interface in the route to {ip}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_device_of_a_route() {
        assert_eq!(
            parse_route_dev("10.244.0.2 dev cmh0 src 10.0.0.1 uid 0 \\    cache"),
            Some("cmh0".into())
        );
        assert_eq!(parse_route_dev("local 10.0.0.1 dev lo table local"), None);
        assert_eq!(parse_route_dev("unreachable"), None);
        assert_eq!(parse_route_dev("x dev"), None);
    }
}
