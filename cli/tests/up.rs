//! `clustermesh up`: three clusters reach all-ready, their agents' merged services are what
//! the example scenario defines (with the reasons for each affinity case), the inspection
//! commands work on the cluster directories it keeps, Ctrl-C stops every process, and a
//! second run reuses the data directory.

#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous test polling processes; no runtime to block"
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh");

/// `up`, interrupted when dropped (a failing test leaves nothing running).
struct Up(Option<Child>);

impl Drop for Up {
    fn drop(&mut self) {
        // No assertion here: a panic while unwinding would abort and leave processes behind.
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

fn start_up(dir: &Path) -> (Up, mpsc::Receiver<String>) {
    start_up_at(dir, "127.0.77")
}

fn start_up_at(dir: &Path, prefix: &str) -> (Up, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["up", "--clusters", "3", "--ip-prefix", prefix, "--dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Up(Some(child)), rx)
}

fn wait_line(rx: &mpsc::Receiver<String>, prefix: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let done = line.starts_with(prefix);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(e) => panic!("no {prefix:?} line ({e}); output so far: {seen:#?}"),
        }
    }
}

fn cm(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "clustermesh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&cm(args)).unwrap()
}

/// Every private key (`*-key.pem`) under `dir` with its permission bits.
fn key_modes(dir: &Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with("-key.pem") {
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                out.push((p.display().to_string(), mode));
            }
        }
    }
    out
}

/// Processes whose command line names `dir`.
fn processes_of(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) {
                out.push(cmd);
            }
        }
    }
    out
}

fn interrupt(mut child: Child) {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "up exited with {status}");
}

/// `explain service` of `cluster`'s agent: selected backends and every candidate's reason.
fn explain(data: &Path, cluster: &str, svc: &str) -> (Vec<String>, BTreeMap<String, String>) {
    let dir = data.join(cluster);
    let plan = json(&[
        "explain",
        "service",
        svc,
        "--dir",
        dir.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let f = &plan["frontends"][0];
    let mut backends: Vec<String> = f["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["ip"].as_str().unwrap().to_owned())
        .collect();
    backends.sort();
    let reasons = f["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["ip"].as_str().unwrap().to_owned(),
                c["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (backends, reasons)
}

#[test]
fn up_runs_the_example_mesh_and_stops_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let (mut up, rx) = start_up(data.path());
    let progress = wait_line(&rx, "mesh ready: 3 clusters");
    // Every private key up wrote is readable by its owner only.
    let keys = key_modes(data.path());
    assert_eq!(keys.len(), 3 * 3 + 3 * 2, "{keys:?}");
    assert!(keys.iter().all(|(_, m)| *m == 0o600), "{keys:?}");
    assert!(
        progress[0].starts_with("starting 3 clusters"),
        "{progress:?}"
    );

    // What each agent programs, per examples/README.md.
    let web = ["10.1.0.10", "10.1.0.11", "10.2.0.10", "10.3.0.10"];
    for c in ["c1", "c2", "c3"] {
        let (backends, reasons) = explain(data.path(), c, "shop/web");
        assert_eq!(backends, web, "{c} shop/web");
        // c3's agent sees its not-ready backend and leaves it out; c3 does not export it.
        let not_ready = (c == "c3").then_some("unhealthy");
        assert_eq!(
            reasons.get("10.3.0.11").map(String::as_str),
            not_ready,
            "{c}"
        );
    }
    let (backends, reasons) = explain(data.path(), "c1", "shop/cart");
    assert_eq!(backends, ["10.1.0.20"]);
    assert_eq!(
        (reasons["10.2.0.20"].as_str(), reasons["10.3.0.20"].as_str()),
        ("affinity-local", "affinity-local")
    );
    assert_eq!(explain(data.path(), "c2", "shop/cart").0, ["10.2.0.20"]);
    assert_eq!(
        explain(data.path(), "c3", "shop/cart").0,
        ["10.1.0.20", "10.2.0.20", "10.3.0.20"]
    );
    let (backends, reasons) = explain(data.path(), "c1", "shop/payments");
    assert_eq!(backends, ["10.2.0.30", "10.3.0.30"]);
    assert_eq!(reasons["10.1.0.30"], "affinity-remote");
    for c in ["c2", "c3"] {
        assert_eq!(
            explain(data.path(), c, "shop/payments").0,
            ["10.1.0.30", "10.2.0.30", "10.3.0.30"]
        );
    }
    let (backends, reasons) = explain(data.path(), "c1", "shop/inventory");
    assert_eq!(backends, ["10.1.0.40"]);
    assert!(
        !reasons.contains_key("10.2.0.40"),
        "c2 does not export a service that is not shared: {reasons:?}"
    );
    assert_eq!(
        explain(data.path(), "c2", "shop/inventory").0,
        ["10.1.0.40", "10.2.0.40"]
    );

    // The inspection commands on the directories up keeps.
    let c1 = data.path().join("c1");
    let c1 = c1.to_str().unwrap();
    let table = cm(&["explain", "service", "shop/cart", "--dir", c1]);
    assert!(
        table.contains("affinity-local") && table.contains("FRONTEND"),
        "{table}"
    );
    let ep = json(&[
        "explain",
        "endpoint",
        "10.1.0.30",
        "--dir",
        c1,
        "-o",
        "json",
    ]);
    let clusters: Vec<&str> = ep["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cluster"].as_str().unwrap())
        .collect();
    assert_eq!(
        clusters,
        ["c1", "c2", "c3"],
        "one frontend identity per cluster: {ep}"
    );
    let endpoints = json(&["endpoints", "--dir", c1, "-o", "json"]);
    assert_eq!(endpoints.as_array().unwrap().len(), 6 + 5 + 5);
    let services = cm(&["services", "--dir", c1]);
    // c3 exports only its ready web backend.
    assert!(
        services
            .lines()
            .any(|l| l.starts_with("shop/web ") && l.ends_with("c1:2 c2:1 c3:1")),
        "{services}"
    );
    let identities = json(&["identities", "--dir", c1, "-o", "json"]);
    assert!(
        identities
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["cluster"] == "c3")
    );
    let frontends = json(&["bpf", "services", "--dir", c1, "-o", "json"]);
    assert_eq!(frontends.as_array().unwrap().len(), 4);
    assert!(cm(&["status", "--dir", c1]).contains("apiserver ready"));

    interrupt(up.0.take().unwrap());
    assert_eq!(
        processes_of(data.path()),
        Vec::<String>::new(),
        "processes left behind"
    );

    // A second run reuses the data directory (same CA).
    let ca = std::fs::read(data.path().join("c1/certs/ca.pem")).unwrap();
    let (mut up, rx) = start_up(data.path());
    wait_line(&rx, "mesh ready: 3 clusters");
    assert_eq!(
        std::fs::read(data.path().join("c1/certs/ca.pem")).unwrap(),
        ca
    );
    interrupt(up.0.take().unwrap());
    assert_eq!(processes_of(data.path()), Vec::<String>::new());

    // Even when up itself is killed (SIGKILL: no cleanup), its processes follow it.
    let (mut up, rx) = start_up(data.path());
    wait_line(&rx, "mesh ready: 3 clusters");
    let mut child = up.0.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let t = std::time::Instant::now();
    while !processes_of(data.path()).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "orphans: {:?}",
            processes_of(data.path())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The PID of the process whose command line contains every one of `needles`.
fn pid_of(needles: &[&str]) -> u32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if needles.iter().all(|n| cmd.contains(n)) {
                return pid;
            }
        }
    }
    panic!("no process with {needles:?}");
}

/// `clustermesh status --dir DIR -o json ARGS`: its exit code and its JSON.
fn status_json(dir: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(BIN)
        .args(["status", "-o", "json", "--dir"])
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).unwrap_or_default(),
    )
}

fn remote<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["remotes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap()
}

#[test]
fn up_restarts_what_dies_and_stops_and_starts_a_cluster_on_request() {
    let data = tempfile::tempdir().unwrap();
    let (mut up, rx) = start_up_at(data.path(), "127.0.76");
    wait_line(&rx, "mesh ready: 3 clusters");
    let c1 = data.path().join("c1");

    // c3's apiserver dies: it is reported and started again; the mesh keeps running.
    let config = data.path().join("c3/apiserver.yaml");
    let pid = pid_of(&["apiserver", &config.display().to_string()]);
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let seen = wait_line(&rx, "c3's apiserver started again");
    assert!(
        seen.iter()
            .any(|l| l.starts_with("c3's apiserver exited (signal: 9")
                && l.contains("restarting it in 1 s")),
        "{seen:#?}"
    );
    assert!(
        up.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "up stopped"
    );
    let (code, status) = status_json(&c1, &["--wait", "--wait-duration", "60s"]);
    assert_eq!(code, 0, "{status}");
    assert_eq!(remote(&status, "c3")["ready"], true);

    // Stopped on purpose: not restarted; c1 sees c3 go and withdraws it.
    let d = data.path().display().to_string();
    let out = cm(&["up", "--dir", &d, "stop", "c3"]);
    assert!(out.starts_with("c3 stopped"), "{out}");
    wait_line(&rx, "c3: stopping its apiserver and agent");
    let t = std::time::Instant::now();
    loop {
        let (code, status) = status_json(&c1, &[]);
        if remote(&status, "c3")["withdrawn"] == true {
            assert_eq!(code, 1);
            assert_eq!(remote(&status, "c3")["ready"], false);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        processes_of(&data.path().join("c3")).is_empty(),
        "{:?}",
        processes_of(&data.path().join("c3"))
    );
    // Twice is refused.
    let again = Command::new(BIN)
        .args(["up", "--dir", &d, "stop", "c3"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("stopped already"));

    // Started again: c1 has it back.
    let out = cm(&["up", "--dir", &d, "start", "c3"]);
    assert!(out.starts_with("c3 started"), "{out}");
    let (code, status) = status_json(&c1, &["--wait", "--wait-duration", "60s"]);
    assert_eq!(code, 0, "{status}");
    assert_eq!(remote(&status, "c3")["withdrawn"], false);

    interrupt(up.0.take().unwrap());
    assert_eq!(processes_of(data.path()), Vec::<String>::new());
}

/// What the machine's kernel and host namespace hold that `up --datapath bpf` could change:
/// BPF link IDs, the bpffs tree, the cgroup v2 tree, network namespaces and the host's
/// interfaces.
#[derive(Debug)]
struct HostState {
    links: Vec<u64>,
    /// Not compared: the links as bpftool prints them.
    link_details: Vec<serde_json::Value>,
    bpffs: Vec<String>,
    cgroups: Vec<String>,
    netns: Vec<String>,
    host_interfaces: Vec<String>,
}

fn tree(root: &Path, dirs_only: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if is_dir {
                stack.push(p.clone());
            }
            if is_dir || !dirs_only {
                out.push(p.display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn out_of(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}");
    String::from_utf8(out.stdout).unwrap()
}

fn cgroup2_root() -> std::path::PathBuf {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .and_then(|l| l.split_whitespace().nth(1).map(std::path::PathBuf::from))
        .expect("a cgroup v2 mount")
}

fn host_state() -> HostState {
    let details: serde_json::Value =
        serde_json::from_str(&out_of("bpftool", &["-j", "link", "show"])).unwrap();
    let link_details = details.as_array().unwrap().clone();
    let mut links: Vec<u64> = link_details
        .iter()
        .map(|l| l["id"].as_u64().unwrap())
        .collect();
    links.sort_unstable();
    let ifaces: serde_json::Value =
        serde_json::from_str(&out_of("ip", &["-j", "link", "show"])).unwrap();
    let mut host_interfaces: Vec<String> = ifaces
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_owned())
        .collect();
    host_interfaces.sort();
    let mut netns: Vec<String> = out_of("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n.starts_with("cmup-127-0-78-"))
        .collect();
    netns.sort();
    HostState {
        links,
        link_details,
        bpffs: tree(Path::new("/sys/fs/bpf"), false)
            .into_iter()
            .filter(|p| p.contains("clustermesh-up"))
            .collect(),
        cgroups: tree(&cgroup2_root(), true)
            .into_iter()
            .filter(|p| p.contains("clustermesh-up"))
            .collect(),
        netns,
        host_interfaces,
    }
}

fn start_bpf_mesh(data: &Path) -> (Up, mpsc::Receiver<String>) {
    start_bpf_mesh_at(data, "127.0.78")
}

fn start_bpf_mesh_at(data: &Path, prefix: &str) -> (Up, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args([
            "up",
            "--clusters",
            "2",
            "--datapath",
            "bpf",
            "--ip-prefix",
            prefix,
            "--dir",
        ])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Up(Some(child)), rx)
}

impl PartialEq for HostState {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.links,
            &self.bpffs,
            &self.cgroups,
            &self.netns,
            &self.host_interfaces,
        ) == (&o.links, &o.bpffs, &o.cgroups, &o.netns, &o.host_interfaces)
    }
}

/// Waits until the host state is `want` again (the cleanup runs as `up` stops).
fn wait_state(want: &HostState, what: &str) {
    let t = std::time::Instant::now();
    loop {
        let now = host_state();
        if &now == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: the host is not as before:\nbefore {want:#?}\nnow {now:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The tests that change the kernel's state run one at a time: each compares the machine's
/// links before and after.
static KERNEL: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

fn kernel_lock() -> parking_lot::MutexGuard<'static, ()> {
    KERNEL.lock()
}

#[test]
fn up_on_the_ebpf_datapath_programs_kernel_maps() {
    let _kernel = kernel_lock();
    // Root and cgroup v2 are required (CI runs as root); the agents mount bpffs themselves.
    let data = tempfile::tempdir().unwrap();
    let before = host_state();
    assert!(
        before.netns.is_empty() && before.bpffs.is_empty(),
        "leftovers of another run: {before:?}"
    );
    let (up, rx) = start_bpf_mesh(data.path());
    wait_line(&rx, "mesh ready: 2 clusters");
    let c1 = data.path().join("c1");
    let c1s = c1.to_str().unwrap();
    let frontends = json(&["bpf", "services", "--dir", c1s, "-o", "json"]);
    assert_eq!(frontends.as_array().unwrap().len(), 4, "{frontends}");
    let pins = Path::new("/sys/fs/bpf/clustermesh-up/127-0-78/c1/c1-node");
    assert!(
        pins.join("cm_services").exists(),
        "maps pinned under {}",
        pins.display()
    );

    // Every pod of c1 is attached, each to its own veth in the playground's node namespace.
    let status = json(&["status", "--dir", c1s, "-o", "json"]);
    assert_eq!(status["ready"], true, "{status}");
    let agent = cm(&["bpf", "endpoints", "--dir", c1s, "-o", "json"]);
    assert!(agent.contains("10.1.0.50"), "{agent}");
    let during = host_state();
    assert_eq!(during.netns.len(), 1 + 6 + 5, "{during:?}");
    assert_eq!(
        during.host_interfaces, before.host_interfaces,
        "no interface appears in the host's namespace"
    );
    for (cluster, pods) in [("c1", 6), ("c2", 5)] {
        let dir = Path::new("/sys/fs/bpf/clustermesh-up/127-0-78")
            .join(cluster)
            .join(format!("{cluster}-node"));
        let linked: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.strip_prefix("link_tc_")
                    .map(|r| r.split('_').next().unwrap_or("").to_owned())
            })
            .collect();
        assert_eq!(
            linked.len(),
            2 * pods,
            "two links for each pod of {cluster}: {linked:?}"
        );
        let ours = format!("cmu{}p", &cluster[1..]);
        for ifname in &linked {
            assert!(ifname.starts_with(&ours), "{cluster} attached to {ifname}");
            assert!(
                !before.host_interfaces.contains(ifname),
                "{ifname} is a host interface"
            );
        }
    }
    // The kernel holds exactly those TCX links, and nothing else was attached anywhere.
    let new_tcx: Vec<&serde_json::Value> = during
        .link_details
        .iter()
        .filter(|l| !before.links.contains(&l["id"].as_u64().unwrap()))
        .filter(|l| l["type"] == 11 || l["type"] == "tcx")
        .collect();
    assert_eq!(new_tcx.len(), 2 * (6 + 5), "{new_tcx:?}");

    let explain = cm(&["explain", "endpoint", "10.1.0.50", "--dir", c1s]);
    assert!(
        explain.contains("programs: attached to cmu1p5\n"),
        "{explain}"
    );

    // Real traffic: a frontend in c1 reaches payments in c2 (affinity remote) through the
    // global VIP; web-0 is dropped by the payments policy.
    let lines = cm(&[
        "exec",
        "--dir",
        c1s,
        "shop/frontend-0",
        "--",
        "cm-netprobe",
        "tcp",
        "10.96.0.12:80",
        "--count",
        "4",
    ]);
    assert_eq!(lines, "ok c2/payments-0\n".repeat(4), "{lines}");
    let lines = cm(&[
        "exec",
        "--dir",
        c1s,
        "shop/web-0",
        "--",
        "cm-netprobe",
        "tcp",
        "10.1.0.30:8080",
        "--count",
        "1",
        "--timeout-ms",
        "300",
    ]);
    assert_eq!(lines, "err TimedOut 0\n", "{lines}");

    // c2 goes down whole (apiserver, agent and its pods' servers): c1's frontend loses three
    // connects to c2's web backend, which outlier detection then takes out of its selection
    // (long before the control plane withdraws c2), and `explain service` says so.
    let data_s = data.path().to_str().unwrap();
    let out = cm(&["up", "--dir", data_s, "stop", "c2"]);
    assert!(out.starts_with("c2 stopped"), "{out}");
    wait_line(
        &rx,
        "c2: stopping its apiserver and agent, and its pods' servers",
    );
    let lines = cm(&[
        "exec",
        "--dir",
        c1s,
        "shop/frontend-0",
        "--",
        "cm-netprobe",
        "tcp",
        "10.96.0.10:80",
        "--count",
        "60",
        "--timeout-ms",
        "300",
    ]);
    let refused = lines
        .lines()
        .filter(|l| *l == "err ConnectionRefused 111")
        .count();
    let local = lines
        .lines()
        .filter(|l| l.starts_with("ok c1/web-"))
        .count();
    assert_eq!((refused, local), (3, 57), "{lines}");
    let plan = json(&["explain", "service", "shop/web", "--dir", c1s, "-o", "json"]);
    let c2_web = plan["frontends"][0]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cluster"] == "c2")
        .cloned()
        .unwrap();
    assert_eq!(c2_web["outlier"]["ejectedClients"], 1, "{plan}");
    assert_eq!(c2_web["outlier"]["failures"], 3, "{plan}");
    // Back: its servers, apiserver and agent run again and c1 has it ready.
    let out = cm(&["up", "--dir", data_s, "start", "c2"]);
    assert!(out.starts_with("c2 started"), "{out}");
    cm(&["status", "--dir", c1s, "--wait", "--wait-duration", "1m"]);
    let lines = cm(&[
        "exec",
        "--dir",
        c1s,
        "shop/frontend-0",
        "--",
        "cm-netprobe",
        "tcp",
        "10.96.0.12:80",
        "--count",
        "2",
    ]);
    assert_eq!(lines, "ok c2/payments-0\n".repeat(2), "{lines}");

    // A second up of the same mesh, or its cleanup, is refused and touches nothing.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "up",
            "--clusters",
            "2",
            "--datapath",
            "bpf",
            "--ip-prefix",
            "127.0.78",
            "--dir",
        ])
        .arg(other.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is running or cleaning up"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["up-cleanup", "--ip-prefix", "127.0.78", "--clusters", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(host_state(), during, "the running mesh is untouched");
    // A prefix that is not three loopback octets never reaches a path.
    for bad in ["/", "/home", "127.0.0/..", "10.0.0"] {
        let out = Command::new(BIN)
            .args(["up-cleanup", "--ip-prefix", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
    }

    // Ctrl-C: every namespace, link, pin and cgroup is gone.
    drop(up);
    assert_eq!(processes_of(data.path()), Vec::<String>::new());
    wait_state(&before, "after Ctrl-C");

    // The death of up (SIGKILL: no cleanup of its own): its watcher removes everything.
    let (mut up, rx) = start_bpf_mesh(data.path());
    wait_line(&rx, "mesh ready: 2 clusters");
    assert!(
        data.path().join("c1/agent.log.1").exists(),
        "the previous log is kept"
    );
    let mut child = up.0.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    wait_state(&before, "after up was killed");
    assert_eq!(processes_of(data.path()), Vec::<String>::new());

    // SIGTERM stops it as Ctrl-C does.
    let (mut up, rx) = start_bpf_mesh(data.path());
    wait_line(&rx, "mesh ready: 2 clusters");
    let mut child = up.0.take().unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    wait_line(&rx, "removed the pods, pins and cgroups");
    wait_state(&before, "after SIGTERM");
}

/// `clustermesh connectivity test` on a fresh `up --datapath bpf` mesh: every test of Cilium's
/// table passes; a policy that breaks the mesh makes it fail with the evidence; Ctrl-C and
/// the end of a run leave no pod, namespace, link or policy behind.
#[test]
fn the_connectivity_test_passes_cilium_s_table_on_the_bpf_playground() {
    let _kernel = kernel_lock();
    let before = host_state();
    let data = tempfile::tempdir().unwrap();
    let (up, rx) = start_bpf_mesh_at(data.path(), "127.0.79");
    wait_line(&rx, "mesh ready: 2 clusters");
    let data_s = data.path().to_str().unwrap();
    let manifests = |c: &str| {
        let mut files: Vec<String> = std::fs::read_dir(data.path().join(c).join("manifests"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        files
    };
    let test_namespaces = || {
        out_of("ip", &["netns", "list"])
            .lines()
            .filter(|l| l.starts_with("cmct-"))
            .count()
    };
    let links_before = host_state().links;

    // The whole suite: 35 tests, each passed, none skipped.
    let out = Command::new(BIN)
        .args(["connectivity", "test", "--dir", data_s, "-o", "json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let failed: Vec<&serde_json::Value> = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["result"] != "pass")
        .collect();
    assert_eq!(failed, Vec::<&serde_json::Value>::new());
    assert_eq!(
        (&report["passed"], &report["failed"], &report["skipped"]),
        (&35.into(), &0.into(), &0.into())
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        (&report["source"], &report["destination"]),
        (&"c1".into(), &"c2".into())
    );
    let tests = report["tests"].as_array().unwrap();
    let actions: usize = tests
        .iter()
        .map(|t| t["actions"].as_array().unwrap().len())
        .sum();
    assert_eq!(actions, 140, "every scenario of every test ran");
    // An expected drop passed with the agent's event saying where.
    let egress_deny = tests
        .iter()
        .find(|t| t["name"] == "all-egress-deny")
        .unwrap();
    for a in egress_deny["actions"].as_array().unwrap() {
        assert_eq!(a["observed"], "no answer (timed out)");
        assert!(
            a["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["verdict"] == "denied" && e["direction"] == "egress"),
            "{a}"
        );
    }
    assert_eq!(report["policiesEnforced"]["samples"], 34);
    // Nothing of the run is left.
    assert_eq!(manifests("c1"), ["example-mesh.yaml"]);
    assert_eq!(manifests("c2"), ["example-mesh.yaml"]);
    assert_eq!(test_namespaces(), 0);

    // A clusterwide policy the suite does not know denies ingress to the echo pods: the run
    // fails (exit 1) and says which action, what was expected, what happened and what the
    // agent reported.
    std::fs::write(
        data.path().join("c1/manifests/break-echo.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: break-echo}\n\
         spec:\n  endpointSelector: {matchLabels: {kind: echo}}\n  ingressDeny: [{fromEntities: [all]}]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args([
            "connectivity",
            "test",
            "--dir",
            data_s,
            "--test",
            "^no-policies$",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("❌ [1/35] no-policies"), "{text}");
    assert!(
        text.contains(
            "pod-to-pod client -> cilium-test/echo-same-node:8080 (TCP): expected ok, observed no answer (timed out)"
        ),
        "{text}"
    );
    assert!(text.contains("DROPPED    ingress 10.254.0.10"), "{text}");
    assert!(
        text.contains("0/1 tests passed (1 failed, 34 skipped)"),
        "{text}"
    );
    std::fs::remove_file(data.path().join("c1/manifests/break-echo.yaml")).unwrap();

    // A policy of someone else in cilium-test: the run refuses to start (it could not tell
    // its own policies' effect), and leaves that policy and the mesh as they were.
    let foreign = data.path().join("c2/manifests/foreign.yaml");
    std::fs::write(
        &foreign,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: foreign, namespace: cilium-test}\n\
         spec:\n  endpointSelector: {}\n  ingress: [{}]\n",
    )
    .unwrap();
    // Once c2's agent has it (`/status` on its admin port).
    let agent_policies = || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.79.12:9891").unwrap();
        write!(s, "GET /status HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_owned();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["policies"].clone()
    };
    let t = std::time::Instant::now();
    while !agent_policies()
        .as_array()
        .unwrap()
        .contains(&"cilium-test/foreign".into())
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "c2's agent never had the policy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new(BIN)
        .args(["connectivity", "test", "--dir", data_s])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("namespace cilium-test must have no policies when the test starts"),
        "{err}"
    );
    assert_eq!(test_namespaces(), 0);
    assert!(foreign.exists());
    std::fs::remove_file(&foreign).unwrap();

    // Ctrl-C in the middle of a test (all-ingress-deny: its policies applied, its expected
    // drops being waited out): the pods, namespaces and policies go.
    let mut child = Command::new(BIN)
        .args(["connectivity", "test", "--dir", data_s])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().unwrap().unwrap();
        if line.contains("[3/35]") {
            break;
        }
    }
    let t = std::time::Instant::now();
    while !data
        .path()
        .join("c2/manifests/clustermesh-connectivity-test-policies.yaml")
        .exists()
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "all-ingress-deny never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("interrupted: the test pods, services and policies were removed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(manifests("c1"), ["example-mesh.yaml"]);
    assert_eq!(manifests("c2"), ["example-mesh.yaml"]);
    assert_eq!(test_namespaces(), 0);
    // The veth pairs go with their namespaces (the kernel removes them a moment later), and
    // so do the TC links of the test pods.
    let t = std::time::Instant::now();
    while host_state().links != links_before {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "TC links of the test pods remain"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    drop(up);
    let t = std::time::Instant::now();
    while host_state().links != before.links {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "links remain after up stopped"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
