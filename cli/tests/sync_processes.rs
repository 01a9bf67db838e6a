//! Two `clustermesh apiserver` processes, B importing A. A is killed with SIGKILL: B withdraws
//! it within `unreachableAfter + withdrawAfter` (plus scheduling slack), keeps its state, and
//! restores it after A is back and synced for `restoreAfter`.

#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous test driving child processes"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clustermesh_certs::{CertificateAuthority, ClientIdentity};
use clustermesh_model::ClusterName;

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: &str, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = write!(s, "GET {path} HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The status of remote `c1` as B's `/status` reports it.
fn remote_status(health: &str) -> Option<serde_json::Value> {
    let resp = http_get(health, "/status");
    let body = resp.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["remotes"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == "c1")
        .cloned()
}

fn wait(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn cluster(
    dir: &Path,
    name: &str,
    id: u32,
    export_port: u16,
    extra: &str,
) -> (CertificateAuthority, std::path::PathBuf) {
    let n = ClusterName::new(name).unwrap();
    let ca = CertificateAuthority::generate(&n).unwrap();
    ca.cert().write(dir, "ca").unwrap();
    ca.server_cert(&n, &[])
        .unwrap()
        .write(dir, "server")
        .unwrap();
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let config = dir.join("apiserver.yaml");
    std::fs::write(
        &config,
        format!(
            "cluster: {{name: {name}, id: {id}}}\nstore: {{backend: sled, path: store}}\nsource: {{manifestDir: manifests}}\n\
             listen: {{export: \"127.0.0.1:{export_port}\", health: \"127.0.0.1:0\"}}\ntls: {{ca: ca.pem, cert: server.pem, key: server-key.pem}}\n{extra}"
        ),
    )
    .unwrap();
    (ca, config)
}

struct Proc {
    child: Child,
    health: String,
}

fn spawn(config: &Path) -> Proc {
    let mut child = Command::new(BIN)
        .args(["apiserver", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let health = line.trim().rsplit(' ').next().unwrap().to_owned();
    Proc { child, health }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `clustermesh status --server HEALTH ARGS`: its exit code and output.
fn status_text(health: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["status", "--server", health])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
    )
}

/// [`status_text`] with JSON output, parsed.
fn status_of(health: &str, args: &[&str]) -> (i32, serde_json::Value) {
    let (code, text) = status_text(health, args);
    (code, serde_json::from_str(&text).unwrap())
}

#[test]
fn a_killed_remote_is_withdrawn_within_the_bound_and_restored_after_it_returns() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a_port = free_port();
    // Heartbeats well inside B's unreachableAfter, as docs/CONFIG.md asks.
    let (a_ca, a_config) = cluster(
        a_dir.path(),
        "c1",
        1,
        a_port,
        "heartbeatMillis: 250\nallowedRemotes: [c2]\n",
    );
    std::fs::write(
        a_dir.path().join("manifests/pod.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: prod, labels: {app: web}}\nstatus: {podIP: 10.1.0.5}\n",
    )
    .unwrap();
    a_ca.client_cert(&ClientIdentity::Remote(ClusterName::new("c2").unwrap()))
        .unwrap()
        .write(b_dir.path(), "to-c1")
        .unwrap();
    a_ca.cert().write(b_dir.path(), "c1-ca").unwrap();
    let remotes = format!(
        "remotes:\n- {{name: c1, id: 1, address: \"127.0.0.1:{a_port}\", ca: c1-ca.pem, cert: to-c1.pem, key: to-c1-key.pem}}\n\
         staleness: {{unreachableAfterMillis: 1000, withdrawAfterMillis: 1000, restoreAfterMillis: 2000}}\n"
    );
    let (_, b_config) = cluster(b_dir.path(), "c2", 2, 0, &remotes);

    let mut a = spawn(&a_config);
    let b = spawn(&b_config);
    wait("B syncing A", Duration::from_secs(20), || {
        remote_status(&b.health)
            .is_some_and(|r| r["ready"] == true && r["connected"] == true && r["counts"]["ip"] == 1)
    });

    a.child.kill().unwrap(); // SIGKILL
    let took = wait("B withdrawing A", Duration::from_secs(10), || {
        remote_status(&b.health).is_some_and(|r| r["withdrawn"] == true)
    });
    // The broken stream makes A unreachable at once (not after unreachableAfter of silence),
    // then withdrawAfter = 1 s; the status is checked every 100 ms.
    assert!(
        took < Duration::from_millis(1900),
        "withdrawn after {took:?}"
    );
    let r = remote_status(&b.health).unwrap();
    assert_eq!(r["connected"], false);
    assert_eq!(r["counts"]["ip"], 1, "a withdrawn cluster's state stays");
    // `status` says so, in the table, the JSON and the exit code alike.
    let (code, json) = status_of(&b.health, &["-o", "json"]);
    assert_eq!(code, 1);
    assert_eq!(json["remotes"][0]["ready"], false, "{json}");
    assert_eq!(json["remotes"][0]["imported"], true, "{json}");
    let (code, table) = status_text(&b.health, &[]);
    assert_eq!(code, 1);
    let row = table.lines().find(|l| l.starts_with("c1 ")).unwrap();
    assert_eq!(
        row.split_whitespace().take(3).collect::<Vec<_>>(),
        ["c1", "no", "no"],
        "{table}"
    );
    // --wait gives up after its duration.
    let (code, _) = status_text(&b.health, &["--wait", "--wait-duration", "1s"]);
    assert_eq!(code, 1);
    let metrics = http_get(&b.health, "/metrics");
    assert!(
        metrics.contains(
            "cilium_kvstoremesh_remote_cluster_readiness_status{target_cluster=\"c1\"} 0"
        ),
        "{metrics}"
    );

    drop(a);
    let a = spawn(&a_config);
    assert!(
        !a.health.is_empty(),
        "A did not restart: {}",
        std::fs::read_to_string(a_config.with_extension("log")).unwrap_or_default()
    );
    // Connected and synced again, but still withdrawn until restoreAfter: not ready yet.
    wait("B reconnecting A", Duration::from_secs(20), || {
        remote_status(&b.health).is_some_and(|r| r["connected"] == true)
    });
    let reconnected = Instant::now();
    let r = remote_status(&b.health).unwrap();
    assert_eq!(
        (&r["withdrawn"], &r["ready"]),
        (&serde_json::json!(true), &serde_json::json!(false)),
        "{r}"
    );
    assert_eq!(status_of(&b.health, &["-o", "json"]).0, 1);
    // `status --wait` returns once A is ready again, that is restored.
    let (code, json) = status_of(
        &b.health,
        &["-o", "json", "--wait", "--wait-duration", "30s"],
    );
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["remotes"][0]["ready"], true);
    assert_eq!(json["remotes"][0]["withdrawn"], false);
    // Not before it has been back and synced for restoreAfter (2 s; connected is seen up to
    // 50 ms late).
    let back = reconnected.elapsed();
    assert!(
        back >= Duration::from_millis(1900),
        "restored after only {back:?}"
    );
}
