//! `clustermesh apiserver --config FILE` as a process: it starts, serves `/readyz` once the
//! manifest directory is synced, and exits cleanly on SIGTERM. Bad configs fail with a clear
//! message and a non-zero exit.

#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous test polling a child process; no runtime to block"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clustermesh_certs::CertificateAuthority;
use clustermesh_model::ClusterName;

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh");

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn write_cluster(dir: &std::path::Path) -> std::path::PathBuf {
    let name = ClusterName::new("c1").unwrap();
    let ca = CertificateAuthority::generate(&name).unwrap();
    ca.cert().write(dir, "ca").unwrap();
    ca.server_cert(&name, &["127.0.0.1".into()])
        .unwrap()
        .write(dir, "server")
        .unwrap();
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    std::fs::write(
        dir.join("manifests/ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n",
    )
    .unwrap();
    let config = dir.join("apiserver.yaml");
    std::fs::write(
        &config,
        "cluster: {name: c1, id: 1}\nstore: {backend: sled, path: store}\nsource: {manifestDir: manifests}\n\
         listen: {export: \"127.0.0.1:0\", health: \"127.0.0.1:0\"}\ntls: {ca: ca.pem, cert: server.pem, key: server-key.pem}\n",
    )
    .unwrap();
    config
}

#[test]
fn apiserver_serves_readyz_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_cluster(dir.path());
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
    // "export listening on 127.0.0.1:P, health on 127.0.0.1:Q"
    let health = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(line.starts_with("export listening on 127.0.0.1:"), "{line}");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = http_get(&health, "/readyz").unwrap_or_default();
        if resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never became ready: {resp}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(http_get(&health, "/healthz").unwrap().contains("ok"));
    let metrics = http_get(&health, "/metrics").unwrap();
    assert!(metrics.contains("clustermesh_export_watchers"), "{metrics}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the apiserver did not exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit.code(), Some(0));
}

#[test]
fn a_bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(&config, "cluster: {name: default, id: 1}\n").unwrap();
    let out = Command::new(BIN)
        .args(["apiserver", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml") && err.contains("default"), "{err}");
    let out = Command::new(BIN).args(["apiserver"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
}

/// Runs the apiserver until it is ready, stops it with SIGTERM and returns what it logged.
fn logs_of_a_run(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    logs_of_a_run_in(dir.path(), extra)
}

fn logs_of_a_run_in(dir: &std::path::Path, extra: &[&str]) -> String {
    let config = write_cluster(dir);
    let mut child = Command::new(BIN)
        .args(["apiserver", "--config"])
        .arg(&config)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let health = line.trim().rsplit(' ').next().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http_get(&health, "/readyz").is_some_and(|r| r.contains(" 200 ")) {
        assert!(Instant::now() < deadline, "/readyz never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    reader.join().unwrap()
}

#[test]
fn logs_are_plain_text_off_a_terminal_or_json_lines() {
    // stderr is a pipe here, as in a log file or `kubectl logs`: no colour codes.
    let text = logs_of_a_run(&[]);
    assert!(text.contains("INFO"), "{text}");
    assert!(text.contains("shutting down"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "colour codes off a terminal: {text:?}"
    );

    let json = logs_of_a_run(&["--log-format", "json"]);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["fields"]["message"] == "shutting down"),
        "{json}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["timestamp"].is_string() && l["target"].is_string())
    );

    // An unknown format is a usage error.
    let out = Command::new(BIN)
        .args(["--log-format", "xml", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn hostile_manifest_entries_neither_block_nor_stop_the_apiserver() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(manifests.join("fifo.yaml"))
            .status()
            .unwrap()
            .success()
    );
    std::os::unix::fs::symlink(&manifests, manifests.join("loop")).unwrap();
    std::os::unix::fs::symlink("/", manifests.join("root")).unwrap();
    std::fs::write(manifests.join("deep.yaml"), "[".repeat(200_000)).unwrap();
    // Ready (the first sync is written) and stopped cleanly; each entry reported.
    let log = logs_of_a_run_in(dir.path(), &[]);
    assert!(
        log.contains("fifo.yaml") && log.contains("is not a regular file"),
        "{log}"
    );
    assert!(
        log.contains("deep.yaml") && log.contains("deeper than 128 levels"),
        "{log}"
    );
    assert!(
        !log.contains("loop/"),
        "the symlinked directory is not entered: {log}"
    );
}

/// Starts a process and returns it with the first line it printed.
fn start_with_line(cmd: &mut Command) -> (std::process::Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().to_owned())
}

fn stop_child(mut child: std::process::Child) -> String {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}

#[test]
fn idle_connections_neither_exhaust_descriptors_nor_lock_out_clients() {
    use clustermesh_certs::{ClientIdentity, IssuedCert};
    let dir = tempfile::tempdir().unwrap();
    let config = write_cluster(dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("exportMaxConnections: 32\nexportHandshakeTimeoutMillis: 500\n");
    std::fs::write(&config, text).unwrap();
    let ca = CertificateAuthority::from_pem(IssuedCert::read(dir.path(), "ca").unwrap()).unwrap();
    ca.client_cert(&ClientIdentity::Local(ClusterName::new("c1").unwrap()))
        .unwrap()
        .write(dir.path(), "local")
        .unwrap();

    // 96 descriptors, hard: the apiserver cannot raise the limit.
    let (apiserver, line) = start_with_line(
        Command::new("prlimit")
            .args(["--nofile=96:96", "--"])
            .arg(BIN)
            .args(["apiserver", "--config"])
            .arg(&config),
    );
    // "export listening on 127.0.0.1:P, health on 127.0.0.1:Q"
    let export = line
        .strip_prefix("export listening on ")
        .and_then(|r| r.split(',').next())
        .unwrap()
        .to_owned();
    let health = line.rsplit(' ').next().unwrap().to_owned();

    // Three times the descriptors, idle: no TLS handshake ever starts.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&export).unwrap())
        .collect();
    let ready = |addr: &str| http_get(addr, "/readyz").is_some_and(|r| r.contains(" 200 "));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready(&health) {
        assert!(Instant::now() < deadline, "health stopped answering");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A real client (an agent with the local certificate) gets its snapshot meanwhile.
    let agent_config = dir.path().join("agent.yaml");
    std::fs::write(
        &agent_config,
        format!(
            "cluster: c1\nnodeName: n1\napiserver: {{address: \"{export}\", ca: ca.pem, cert: local.pem, key: local-key.pem}}\n\
             datapath: userspace\nadmin: \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
    let (agent, line) = start_with_line(
        Command::new(BIN)
            .args(["agent", "--config"])
            .arg(&agent_config),
    );
    let admin = line.rsplit(' ').next().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready(&admin) {
        assert!(
            Instant::now() < deadline,
            "the agent never got its snapshot while idle connections were open"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ready(&health));
    drop(idle);
    let _ = stop_child(agent);
    let log = stop_child(apiserver);
    assert!(log.contains("file-descriptor limit limit=96"), "{log}");
}
