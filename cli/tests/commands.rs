//! The operator commands, run as the built binary: `certs init`, `connect` (and every refusal,
//! leaving both directories unchanged), `status` against two apiserver processes, and
//! `disconnect`.

#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(
    clippy::disallowed_methods,
    reason = "a synchronous test polling child processes; no runtime to block"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_clustermesh");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `certs init` a cluster in `root/name`.
fn init(root: &Path, name: &str, id: u32, extra: &[&str]) -> PathBuf {
    let dir = root.join(name);
    let (e, h, a) = (port(), port(), port());
    let mut args = vec![
        "certs".to_owned(),
        "init".into(),
        "--cluster".into(),
        name.into(),
        "--id".into(),
        id.to_string(),
        "--dir".into(),
        dir.display().to_string(),
        "--health".into(),
        format!("127.0.0.1:{h}"),
        "--agent-admin".into(),
        format!("127.0.0.1:{a}"),
    ];
    if !extra.contains(&"--export") {
        args.extend(["--export".to_owned(), format!("127.0.0.1:{e}")]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(&refs);
    assert!(out.status.success(), "certs init: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("cluster {name} (id {id}) initialised")));
    dir
}

/// Every file under `dir` with its content.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn start_apiserver(dir: &Path) -> Child {
    let mut child = Command::new(BIN)
        .args(["apiserver", "--config"])
        .arg(dir.join("apiserver.yaml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("listening"), "{line}");
    child
}

fn stop(mut c: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    let _ = c.wait();
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn certs_connect_status_and_disconnect_between_two_apiservers() {
    let root = tempfile::tempdir().unwrap();
    let a = init(root.path(), "c1", 1, &[]);
    let b = init(root.path(), "c2", 2, &[]);
    for f in [
        "apiserver.yaml",
        "agent.yaml",
        "certs/ca.pem",
        "certs/ca-key.pem",
        "certs/server.pem",
        "certs/local.pem",
    ] {
        assert!(a.join(f).exists(), "{f}");
    }
    // A second init into the same directory is refused.
    let out = run(&[
        "certs",
        "init",
        "--cluster",
        "c1",
        "--id",
        "1",
        "--dir",
        a.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("already holds a cluster"),
        "{}",
        text(&out.stderr)
    );

    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    let out = run(&["connect", sa, sb]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).matches(" added").count(),
        2,
        "{}",
        text(&out.stdout)
    );
    assert!(a.join("remotes/c2.yaml").exists() && b.join("remotes/c1.yaml").exists());
    let remote_files: Vec<String> = std::fs::read_dir(a.join("remotes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(
        remote_files,
        ["c2-ca.pem", "c2-client-key.pem", "c2-client.pem", "c2.yaml"],
        "flat files, and never the peer's CA key"
    );
    // Twice: nothing changes.
    let (before_a, before_b) = (files(&a), files(&b));
    let out = run(&["connect", sa, sb]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).matches("unchanged").count(), 2);
    assert_eq!((files(&a), files(&b)), (before_a, before_b));

    // Both apiservers import each other: status says so, in a table and in JSON.
    let (pa, pb) = (start_apiserver(&a), start_apiserver(&b));
    wait_for("status to report everything ready", || {
        run(&["status", "--dir", sa]).status.success()
    });
    let out = run(&["status", "--dir", sa]);
    let table = text(&out.stdout);
    assert!(
        table.starts_with("cluster c1 (id 1): apiserver ready"),
        "{table}"
    );
    assert!(
        table.contains("REMOTE")
            && table
                .lines()
                .any(|l| l.starts_with("c2 ") && l.contains("yes")),
        "{table}"
    );
    let out = run(&["status", "--dir", sa, "-o", "json"]);
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["cluster"], "c1");
    assert_eq!(j["id"], 1);
    assert_eq!(j["ready"], true);
    let r = &j["remotes"][0];
    assert_eq!(r["name"], "c2");
    assert_eq!(
        (
            r["connected"].clone(),
            r["ready"].clone(),
            r["withdrawn"].clone()
        ),
        (true.into(), true.into(), false.into())
    );
    assert_eq!(
        r["synced"],
        serde_json::json!(["identities", "ip", "nodes", "services"])
    );
    for k in [
        "counts",
        "failures",
        "lastFailure",
        "secondsSinceLastMessage",
        "rejected",
    ] {
        assert!(r.get(k).is_some(), "{k} missing in {r}");
    }
    // --server works the same.
    let health = std::fs::read_to_string(a.join("apiserver.yaml")).unwrap();
    let health = health
        .split("health: \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    assert!(run(&["status", "--server", &health]).status.success());

    // B goes away: A's status turns non-zero.
    stop(pb);
    wait_for("status to fail once c2 is gone", || {
        !run(&["status", "--dir", sa]).status.success()
    });

    // Disconnect: the remote goes from A's status without a restart.
    let out = run(&["disconnect", sa, sb]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!a.join("remotes/c2.yaml").exists() && !b.join("remotes/c1.yaml").exists());
    wait_for("c2 to leave A's status", || {
        let out = run(&["status", "--dir", sa, "-o", "json"]);
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        j["remotes"].as_array().is_some_and(Vec::is_empty) && out.status.success()
    });
    stop(pa);
    // Unreachable apiserver: a clear error, exit 1.
    let out = run(&["status", "--dir", sa]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is it running?"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn connect_refuses_bad_pairs_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let c1 = init(root.path(), "c1", 1, &[]);
    let other_c1 = init(&root.path().join("elsewhere"), "c1", 2, &[]);
    let same_id = init(root.path(), "c3", 1, &[]);
    let wide = init(root.path(), "c4", 4, &["--max-connected-clusters", "511"]);
    let out_of_range = init(root.path(), "c5", 5, &[]);
    let path = out_of_range.join("apiserver.yaml");
    let yaml = std::fs::read_to_string(&path)
        .unwrap()
        .replace("id: 5,", "id: 300,");
    std::fs::write(&path, yaml).unwrap();
    let unspecified = init(root.path(), "c6", 6, &["--export", "0.0.0.0:2379"]);
    let cases: [(&Path, &str); 5] = [
        (&other_c1, "cluster names must be unique"),
        (&same_id, "both have cluster ID 1"),
        (&wide, "maxConnectedClusters 255 and c4 uses 511"),
        (&out_of_range, "out of range"),
        (&unspecified, "which peers cannot dial"),
    ];
    for (peer, why) in cases {
        let (before_1, before_2) = (files(&c1), files(peer));
        let out = run(&["connect", c1.to_str().unwrap(), peer.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{why}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains(why),
            "{why:?} not in {err:?}"
        );
        assert_eq!(files(&c1), before_1, "{why}: c1 changed");
        assert_eq!(files(peer), before_2, "{why}: the peer changed");
    }
    // Not a cluster directory at all.
    let out = run(&[
        "connect",
        c1.to_str().unwrap(),
        root.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is not a cluster directory"));
}

/// Every private key under `dir` with its permission bits.
fn key_modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    files(dir)
        .into_keys()
        .filter(|p| p.to_string_lossy().ends_with("-key.pem"))
        .map(|p| {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            (p, mode)
        })
        .collect()
}

#[test]
fn private_keys_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let a = init(root.path(), "c1", 1, &[]);
    let b = init(root.path(), "c2", 2, &[]);
    let out = run(&["connect", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let keys = key_modes(root.path());
    // ca, server, local per cluster, and one remote client key each.
    assert_eq!(keys.len(), 8, "{keys:?}");
    assert!(keys.iter().all(|(_, m)| *m == 0o600), "{keys:?}");

    // A key left world-readable (by an older version) is replaced by a private one.
    let leaked = a.join("remotes/c2-client-key.pem");
    std::fs::set_permissions(&leaked, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(&["connect", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("{}: remote {} added", a.display(), b.display())),
        "{}",
        text(&out.stdout)
    );
    let keys = key_modes(root.path());
    assert_eq!(keys.len(), 8, "{keys:?}");
    assert!(keys.iter().all(|(_, m)| *m == 0o600), "{keys:?}");
}

/// `connect DIR --cilium ...`: the cluster imports a Cilium cluster from its
/// clustermesh-apiserver's etcd: a remote file of kind `etcd` with copies of the CA, the
/// client certificate and its key (0600); a second run changes nothing; a bad name, an ID of
/// its own, a plain-HTTP URL or a file that is no PEM is refused and writes nothing.
#[test]
fn connect_adds_a_cilium_cluster_read_from_its_etcd() {
    use std::os::unix::fs::PermissionsExt as _;
    let root = tempfile::tempdir().unwrap();
    let c1 = init(root.path(), "c1", 1, &[]);
    // The files a Cilium clustermesh-apiserver hands out (any CA-signed pair will do).
    let pem = root.path().join("cilium");
    std::fs::create_dir_all(&pem).unwrap();
    let ca = clustermesh_certs::CertificateAuthority::generate(
        &clustermesh_model::ClusterName::new("cluster3").unwrap(),
    )
    .unwrap();
    ca.cert().write(&pem, "ca").unwrap();
    ca.client_cert(&clustermesh_certs::ClientIdentity::Remote(
        clustermesh_model::ClusterName::new("c1").unwrap(),
    ))
    .unwrap()
    .write(&pem, "tls")
    .unwrap();
    std::fs::write(pem.join("junk.pem"), "not a certificate").unwrap();
    let p = |f: &str| pem.join(f).display().to_string();
    let args = |name: &str, id: &str, url: &str, ca_file: &str| -> Vec<String> {
        [
            "connect",
            c1.to_str().unwrap(),
            "--cilium",
            name,
            "--cilium-id",
            id,
            "--cilium-etcd",
            url,
            "--cilium-ca",
            ca_file,
            "--cilium-cert",
            &p("tls.pem"),
            "--cilium-key",
            &p("tls-key.pem"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let go = |a: Vec<String>| run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    for (a, why) in [
        (
            args("Cluster3", "3", "https://10.0.0.3:2379", &p("ca.pem")),
            "--cilium \"Cluster3\"",
        ),
        (
            args("cluster3", "1", "https://10.0.0.3:2379", &p("ca.pem")),
            "needs another name and ID",
        ),
        (
            args("cluster3", "300", "https://10.0.0.3:2379", &p("ca.pem")),
            "--cilium-id 300",
        ),
        (
            args("cluster3", "3", "http://10.0.0.3:2379", &p("ca.pem")),
            "an https:// URL",
        ),
        (
            args("cluster3", "3", "https://10.0.0.3:2379", &p("junk.pem")),
            "not a PEM file",
        ),
    ] {
        let before = files(&c1);
        let out = go(a);
        assert_eq!(out.status.code(), Some(1), "{why}");
        assert!(
            text(&out.stderr).contains(why),
            "{why:?} not in {}",
            text(&out.stderr)
        );
        assert_eq!(files(&c1), before, "{why}: the directory changed");
    }
    let ok = args("cluster3", "3", "https://10.0.0.3:2379", &p("ca.pem"));
    let out = go(ok.clone());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("remote cluster3 (Cilium, etcd https://10.0.0.3:2379) added")
    );
    let remotes = c1.join("remotes");
    assert_eq!(
        std::fs::read_to_string(remotes.join("cluster3.yaml")).unwrap(),
        "# written by clustermesh connect --cilium\nname: cluster3\nid: 3\nkind: etcd\naddress: \"https://10.0.0.3:2379\"\nca: cluster3-ca.pem\ncert: cluster3-client.pem\nkey: cluster3-client-key.pem\n"
    );
    assert_eq!(
        std::fs::read_to_string(remotes.join("cluster3-ca.pem")).unwrap(),
        std::fs::read_to_string(pem.join("ca.pem")).unwrap()
    );
    let mode = std::fs::metadata(remotes.join("cluster3-client-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = go(ok);
    assert!(
        text(&out.stdout).contains("already there, unchanged"),
        "{}",
        text(&out.stdout)
    );
}
