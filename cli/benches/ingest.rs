//! Apiserver ingestion: a manifest directory with 10,000 services, 10,000 EndpointSlices
//! (100,000 endpoints) and the 100,000 pods behind them, loaded from scratch by the real
//! `clustermesh apiserver` process on the embedded store. Reports the seconds until `/readyz`
//! and the process's peak resident memory (VmHWM).
//!
//! `cargo bench -p clustermesh --bench ingest`.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark: a failed step ends the run"
)]
#![allow(clippy::disallowed_methods, reason = "no async runtime here")]

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clustermesh_certs::CertificateAuthority;
use clustermesh_model::ClusterName;

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh");
const SERVICES: usize = 10_000;
const PER_SERVICE: usize = 10;

fn ready(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = write!(s, "GET /readyz HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains(" 200 ")
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = ClusterName::new("c1").unwrap();
    let ca = CertificateAuthority::generate(&name).unwrap();
    ca.cert().write(dir.path(), "ca").unwrap();
    ca.server_cert(&name, &[])
        .unwrap()
        .write(dir.path(), "server")
        .unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    for chunk in 0..10 {
        let mut text = String::new();
        for s in chunk * SERVICES / 10..(chunk + 1) * SERVICES / 10 {
            let (a, b) = (s / 250, s % 250 + 1);
            writeln!(text, "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: bench, annotations: {{service.cilium.io/global: \"true\"}}}}\nspec: {{clusterIP: 10.96.{a}.{b}, ports: [{{name: http, port: 80}}]}}").unwrap();
            write!(text, "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{s}-1, namespace: bench, labels: {{kubernetes.io/service-name: svc-{s}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n").unwrap();
            for e in 0..PER_SERVICE {
                let n = s * PER_SERVICE + e;
                writeln!(
                    text,
                    "- addresses: [10.{}.{}.{}]",
                    100 + n / 65_536,
                    (n / 256) % 256,
                    n % 256
                )
                .unwrap();
            }
            for e in 0..PER_SERVICE {
                let n = s * PER_SERVICE + e;
                writeln!(text, "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: svc-{s}-{e}, namespace: bench, labels: {{app: svc-{s}}}}}\nstatus: {{podIP: 10.{}.{}.{}, hostIP: 192.0.2.1}}", 100 + n / 65_536, (n / 256) % 256, n % 256).unwrap();
            }
        }
        std::fs::write(manifests.join(format!("part-{chunk}.yaml")), text).unwrap();
    }
    let config = dir.path().join("apiserver.yaml");
    std::fs::write(
        &config,
        "cluster: {name: c1, id: 1}\nstore: {backend: sled, path: store}\nsource: {manifestDir: manifests}\n\
         listen: {export: \"127.0.0.1:0\", health: \"127.0.0.1:0\"}\ntls: {ca: ca.pem, cert: server.pem, key: server-key.pem}\n",
    )
    .unwrap();

    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(["apiserver", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let health = line.trim().rsplit(' ').next().unwrap().to_owned();
    while !ready(&health) {
        assert!(
            start.elapsed() < Duration::from_secs(900),
            "not ready after 15 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = start.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?")
        .to_owned();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    println!("| input | ready after | peak memory |");
    println!("|---|---|---|");
    println!(
        "| {SERVICES} services, {} endpoints, {} pods | {secs:.1} s | {} |",
        SERVICES * PER_SERVICE,
        SERVICES * PER_SERVICE,
        hwm.trim_start_matches("VmHWM:").trim()
    );
}
