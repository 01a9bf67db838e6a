//! Running `clustermesh` as a child process in the benchmarks: start it and read the address
//! it prints, ask its HTTP endpoints for JSON, read its memory, stop it.

#![allow(dead_code, unreachable_pub, reason = "each benchmark uses part of it")]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh");

/// Starts `clustermesh <sub> --config CONFIG`; returns it and the last word of its first
/// stdout line (the address it serves on).
pub fn spawn(sub: &str, config: &Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args([sub, "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_owned();
    (child, addr)
}

/// GET `path` on `addr`, parsed as JSON.
pub async fn get_json(addr: &str, path: &str) -> Option<serde_json::Value> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    serde_json::from_str(out.split("\r\n\r\n").nth(1)?).ok()
}

/// A `/proc/<pid>/status` field in kB (`VmRSS:`, `VmHWM:`).
pub fn proc_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// SIGTERM, then wait.
pub fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}
