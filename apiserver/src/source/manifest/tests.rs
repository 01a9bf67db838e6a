use super::*;

const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: prod
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: prod
  annotations:
    service.cilium.io/global: "true"
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: prod
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
endpoints:
- addresses: [10.1.0.5]
  conditions: {ready: true}
- addresses: [10.1.0.6]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: prod
  labels: {app: web}
spec:
  containers:
  - name: web
    image: web
    ports: [{name: http, containerPort: 8080}]
status:
  podIP: 10.1.0.5
  hostIP: 192.0.2.1
---
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {zone: a}}
spec: {podCIDR: 10.1.0.0/24}
status:
  addresses: [{type: InternalIP, address: 192.0.2.1}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-web, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"#;

#[test]
fn every_supported_kind_loads() {
    let mut loaded = Loaded::default();
    parse_text("good.yaml", GOOD, &mut loaded);
    assert_eq!(loaded.problems, vec![]);
    let o = &loaded.objects;
    assert_eq!(o.namespaces.keys().collect::<Vec<_>>(), ["prod"]);
    let svc = &o.services[&("prod".to_owned(), "web".to_owned())];
    assert_eq!(
        svc.cluster_ips,
        vec!["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(svc.annotations["service.cilium.io/global"], "true");
    let slice = &o.endpoint_slices[&("prod".to_owned(), "web-abc".to_owned())];
    assert_eq!(slice.service, "web");
    assert_eq!(slice.endpoints.len(), 2);
    assert!(!slice.endpoints[1].conditions.ready && slice.endpoints[1].conditions.terminating);
    let pod = &o.pods[&("prod".to_owned(), "web-0".to_owned())];
    assert_eq!(
        pod.ips,
        vec!["10.1.0.5".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(pod.named_ports[0].port, 8080);
    assert_eq!(o.nodes["node-1"].pod_cidr.as_deref(), Some("10.1.0.0/24"));
    let policy = &o.policies[&(Some("prod".to_owned()), "allow-web".to_owned())];
    assert_eq!(policy.rules.len(), 1);
}

#[test]
fn bad_documents_are_reported_and_the_rest_loads() {
    let text = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
---
apiVersion: v1
kind: Service
metadata: {name: Bad_Name, namespace: prod}
spec: {clusterIP: 10.96.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: ok-pod, namespace: prod}
status: {podIP: 10.1.0.9}
---
kind: Pod
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: bad-ip, namespace: prod}
status: {podIP: 10.1.0.999}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: typo, namespace: prod}
spec:
  endpointSelector: {}
  ingress: [{fromEndpoint: [{}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: ok-pod, namespace: prod}
"#;
    let mut loaded = Loaded::default();
    parse_text("mixed.yaml", text, &mut loaded);
    assert_eq!(loaded.objects.pods.len(), 1, "{:?}", loaded.problems);
    let origins: Vec<&str> = loaded.problems.iter().map(|p| p.origin.as_str()).collect();
    assert_eq!(
        origins,
        [
            "mixed.yaml (document 1)",
            "mixed.yaml (document 2)",
            "mixed.yaml (document 4)",
            "mixed.yaml (document 5)",
            "mixed.yaml (document 6)",
            "mixed.yaml (document 7)",
        ]
    );
    let reasons: Vec<&str> = loaded.problems.iter().map(|p| p.reason.as_str()).collect();
    assert!(
        reasons[0].contains("ConfigMap is not a supported kind"),
        "{}",
        reasons[0]
    );
    assert!(reasons[1].contains("Bad_Name"), "{}", reasons[1]);
    assert!(reasons[2].contains("no apiVersion"), "{}", reasons[2]);
    assert!(reasons[3].contains("10.1.0.999"), "{}", reasons[3]);
    assert!(
        reasons[4].contains("unknown field `fromEndpoint`"),
        "{}",
        reasons[4]
    );
    assert!(reasons[5].contains("defined twice"), "{}", reasons[5]);
}

#[test]
fn broken_yaml_stops_that_file_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        "apiVersion: v1\nkind: [unclosed\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(
        dir.path().join("sub/c.yml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n",
    )
    .unwrap();
    let loaded = load_dir(dir.path());
    assert_eq!(
        loaded.objects.namespaces.keys().collect::<Vec<_>>(),
        ["a", "c"]
    );
    assert_eq!(loaded.problems.len(), 1);
    assert!(loaded.problems[0].origin.ends_with("b.yaml (document 1)"));
    assert_eq!(files(dir.path()).unwrap().len(), 3);
}

const POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: prod}\n\
    spec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: fe}}]}]\n";
const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n---\n";

fn policies(l: &Loaded) -> Vec<String> {
    l.objects.policies.keys().map(|(_, n)| n.clone()).collect()
}

#[test]
fn a_broken_file_keeps_its_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    let good = format!("{NS}{POLICY}");
    std::fs::write(&file, &good).unwrap();
    let mut d = ManifestDir::new(dir.path());
    let l = d.poll().unwrap().unwrap();
    assert_eq!(policies(&l), ["web"]);
    assert!(l.problems.is_empty());
    assert!(d.poll().unwrap().is_none(), "nothing changed");

    let broken: [(&str, Vec<u8>, &str); 4] = [
        (
            "truncated",
            good.as_bytes()[..good.len() - 12].to_vec(),
            "not valid YAML",
        ),
        ("empty", Vec::new(), "is empty"),
        (
            "not UTF-8",
            [good.as_bytes(), b"\xff\xfe"].concat(),
            "not UTF-8",
        ),
        (
            "an unusable document",
            good.replace("kind: CiliumNetworkPolicy", "kind: CiliumNetworkPolicyy")
                .into_bytes(),
            "not a supported kind",
        ),
    ];
    for (what, bytes, why) in broken {
        std::fs::write(&file, &bytes).unwrap();
        let l = d
            .poll()
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: no change seen"));
        assert_eq!(policies(&l), ["web"], "{what}: the policy stays");
        assert_eq!(l.objects.namespaces.len(), 1, "{what}");
        assert_eq!(l.problems.len(), 1, "{what}: {:?}", l.problems);
        assert!(
            l.problems[0].reason.contains(why),
            "{what}: {:?}",
            l.problems
        );
        assert!(
            l.problems[0]
                .reason
                .contains("the file's last good objects are kept"),
            "{what}: {:?}",
            l.problems
        );
        // The same broken content again: no change to apply.
        assert!(d.poll().unwrap().is_none(), "{what}");
        std::fs::write(&file, &good).unwrap();
        let l = d.poll().unwrap().unwrap();
        assert!(l.problems.is_empty(), "{what}: fixed");
    }

    // A dangling link in place of the file: unreadable, kept.
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &file).unwrap();
    let l = d.poll().unwrap().unwrap();
    assert_eq!(policies(&l), ["web"]);
    assert!(
        l.problems[0].reason.contains("cannot be read"),
        "{:?}",
        l.problems
    );

    // A good new version replaces the objects; a deleted file removes them.
    std::fs::remove_file(&file).unwrap();
    std::fs::write(
        &file,
        format!("{NS}{}", POLICY.replace("name: web", "name: web2")),
    )
    .unwrap();
    assert_eq!(policies(&d.poll().unwrap().unwrap()), ["web2"]);
    std::fs::remove_file(&file).unwrap();
    let l = d.poll().unwrap().unwrap();
    assert!(l.objects.policies.is_empty() && l.objects.namespaces.is_empty());
}

#[test]
fn a_file_never_good_gives_its_usable_documents_and_duplicates_across_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.yaml"),
        format!("{NS}{POLICY}---\napiVersion: v1\nkind: Nonsense\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("b.yaml"), NS).unwrap();
    let mut d = ManifestDir::new(dir.path());
    let l = d.poll().unwrap().unwrap();
    assert_eq!(policies(&l), ["web"]);
    let reasons: Vec<&str> = l.problems.iter().map(|p| p.reason.as_str()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("not a supported kind") && !reasons[0].contains("kept"));
    assert!(reasons[1].contains("defined twice"), "{reasons:?}");
}

#[test]
fn hostile_directory_entries_are_reported_not_followed() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("manifests");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("ok.yaml"), NS).unwrap();
    // A FIFO named like a manifest: reported, never opened (opening would block).
    let fifo = dir.join("fifo.yaml");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // Directory symlinks (a loop, and a way out) are not entered.
    std::os::unix::fs::symlink(&dir, dir.join("loop")).unwrap();
    std::os::unix::fs::symlink(root.path(), dir.join("up")).unwrap();
    // A file symlink out of the directory is refused; one inside it (as a ConfigMap volume
    // links `name.yaml` to `..data/name.yaml`) is read.
    std::fs::write(root.path().join("outside.yaml"), POLICY).unwrap();
    std::os::unix::fs::symlink(root.path().join("outside.yaml"), dir.join("out.yaml")).unwrap();
    std::fs::create_dir(dir.join("..data")).unwrap();
    std::fs::write(dir.join("..data/cm.yaml"), POLICY).unwrap();
    std::os::unix::fs::symlink(dir.join("..data/cm.yaml"), dir.join("cm.yaml")).unwrap();
    // A file over the size limit.
    let big = std::fs::File::create(dir.join("big.yaml")).unwrap();
    big.set_len(MAX_FILE_BYTES + 1).unwrap();

    let mut d = ManifestDir::new(&dir);
    let l = d.poll().unwrap().unwrap();
    assert_eq!(
        policies(&l),
        ["web"],
        "only the ConfigMap-style link's policy"
    );
    assert_eq!(l.objects.namespaces.len(), 1);
    let mut reasons: Vec<(String, String)> = l
        .problems
        .iter()
        .map(|p| {
            let file = p.origin.rsplit('/').next().unwrap().to_owned();
            (file, p.reason.clone())
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(reasons[0].0, "big.yaml");
    assert!(
        reasons[0].1.contains("more than the 16777216 bytes"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1].0, "fifo.yaml");
    assert!(
        reasons[1].1.starts_with("is not a regular file"),
        "{reasons:?}"
    );
    assert_eq!(reasons[2].0, "out.yaml");
    assert!(
        reasons[2].1.contains("outside the manifest directory"),
        "{reasons:?}"
    );
}

#[test]
fn deeply_nested_yaml_is_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("deep.yaml"), "[".repeat(200_000)).unwrap();
    std::fs::write(dir.path().join("ok.yaml"), NS).unwrap();
    let l = ManifestDir::new(dir.path()).poll().unwrap().unwrap();
    assert_eq!(l.objects.namespaces.len(), 1);
    assert_eq!(l.problems.len(), 1, "{:?}", l.problems);
    assert!(
        l.problems[0].reason.contains("deeper than 128 levels"),
        "{:?}",
        l.problems
    );
    // Brackets in quotes and comments do not count; ordinary flow YAML passes.
    let quoted = format!(
        "# {}\napiVersion: v1\nkind: Namespace\nmetadata: {{name: q, labels: {{a: \"{}\"}}}}\n",
        "[".repeat(500),
        "{".repeat(500)
    );
    assert!(!too_deep(&quoted));
    let mut l = Loaded::default();
    parse_text("q.yaml", &quoted, &mut l);
    assert!(l.problems.is_empty(), "{:?}", l.problems);
}

#[test]
fn files_past_the_total_limit_are_broken_and_keep_their_last_good_objects() {
    let dir = tempfile::tempdir().unwrap();
    let policy = |name: &str| POLICY.replace("name: web", &format!("name: {name}"));
    let (a, b) = (policy("a"), policy("b"));
    std::fs::write(dir.path().join("a.yaml"), &a).unwrap();
    std::fs::write(dir.path().join("b.yaml"), &b).unwrap();
    let total = (a.len() + b.len()) as u64;
    let mut d = ManifestDir::with_limits(dir.path(), MAX_FILE_BYTES, total);
    let l = d.poll().unwrap().unwrap();
    assert_eq!(policies(&l), ["a", "b"]);
    assert!(l.problems.is_empty(), "{:?}", l.problems);

    // a grows past the total: b (after it in path order) is no longer read, and keeps its
    // policy; a is read.
    std::fs::write(dir.path().join("a.yaml"), format!("{a}# padding\n")).unwrap();
    let l = d.poll().unwrap().unwrap();
    assert_eq!(policies(&l), ["a", "b"], "b's policy stays");
    assert_eq!(l.problems.len(), 1, "{:?}", l.problems);
    assert!(l.problems[0].origin.ends_with("b.yaml"));
    assert!(
        l.problems[0].reason.contains("limits.manifestTotalBytes")
            && l.problems[0].reason.contains("last good objects are kept"),
        "{}",
        l.problems[0].reason
    );
    // A file over the per-file limit is broken the same way.
    let mut small = ManifestDir::with_limits(dir.path(), 10, u64::MAX);
    let l = small.poll().unwrap().unwrap();
    assert!(policies(&l).is_empty());
    assert_eq!(l.problems.len(), 2);
    assert!(l.problems[0].reason.contains("limits.manifestFileBytes"));
}

#[test]
fn a_saved_copy_keeps_a_broken_files_objects_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let file = dir.path().join("sub/p.yaml");
    let other = dir.path().join("other.yaml");
    let good = format!("{NS}{POLICY}");
    std::fs::write(&file, &good).unwrap();
    std::fs::write(&other, NS.replace("prod", "dev")).unwrap();
    let mut d = ManifestDir::new(dir.path());
    d.poll().unwrap().unwrap();
    let saves = d.take_saves();
    assert_eq!(
        saves,
        [
            ("other.yaml".to_owned(), Some(NS.replace("prod", "dev"))),
            ("sub/p.yaml".to_owned(), Some(good.clone())),
        ],
        "paths relative to the directory, the content as read"
    );
    // Read again unchanged, or named by a notification without a change: nothing to save.
    assert!(d.poll().unwrap().is_none());
    assert!(
        d.poll_named(&BTreeSet::from([file.clone()]))
            .unwrap()
            .is_none()
    );
    assert!(d.take_saves().is_empty());

    // The process stops; the file is cut while it is down.
    std::fs::write(&file, &good[..good.len() - 12]).unwrap();
    let mut restarted = ManifestDir::new(dir.path());
    for (rel, text) in &saves {
        restarted
            .restore(Path::new(rel), text.as_deref().unwrap())
            .unwrap();
    }
    let l = restarted.poll().unwrap().unwrap();
    assert_eq!(policies(&l), ["web"], "the policy stays after the restart");
    assert_eq!(l.problems.len(), 1, "{:?}", l.problems);
    assert!(
        l.problems[0]
            .reason
            .contains("the file's last good objects, saved before the restart, are kept"),
        "{:?}",
        l.problems
    );
    assert!(
        restarted.take_saves().is_empty(),
        "a broken file saves nothing"
    );

    // A file deleted while the process was down: its objects go, and its copy with them.
    std::fs::remove_file(&other).unwrap();
    let mut again = ManifestDir::new(dir.path());
    for (rel, text) in &saves {
        again
            .restore(Path::new(rel), text.as_deref().unwrap())
            .unwrap();
    }
    let l = again.poll().unwrap().unwrap();
    assert_eq!(
        l.objects.namespaces.keys().collect::<Vec<_>>(),
        ["prod"],
        "dev's file is gone"
    );
    assert_eq!(again.take_saves(), [("other.yaml".to_owned(), None)]);

    // Fixed with the saved content: nothing to save again. With new content: saved.
    std::fs::write(&file, &good).unwrap();
    let l = again.poll().unwrap().unwrap();
    assert!(l.problems.is_empty(), "{:?}", l.problems);
    assert!(again.take_saves().is_empty());
    let newer = good.replace("name: web", "name: web2");
    std::fs::write(&file, &newer).unwrap();
    assert_eq!(policies(&again.poll().unwrap().unwrap()), ["web2"]);
    assert_eq!(again.take_saves(), [("sub/p.yaml".to_owned(), Some(newer))]);
}

#[test]
fn a_saved_copy_that_is_not_good_or_points_outside_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = ManifestDir::new(dir.path());
    let good = format!("{NS}{POLICY}");
    // Deep nesting is refused before the parser sees it (the parser takes seconds on it).
    let deep = format!("x: {}{}\n", "[".repeat(200_000), "]".repeat(200_000));
    for (rel, text, why) in [
        ("deep.yaml", deep.as_str(), "deeper than 128 levels"),
        ("../x.yaml", good.as_str(), "not a path inside"),
        ("/etc/x.yaml", good.as_str(), "not a path inside"),
        ("a/./../../x.yaml", good.as_str(), "not a path inside"),
        ("p.yaml", &good[..good.len() - 12], "not valid YAML"),
        (
            "p.yaml",
            "kind: Nope\napiVersion: v1\n",
            "not a supported kind",
        ),
    ] {
        let e = d.restore(Path::new(rel), text).unwrap_err();
        assert!(e.contains(why), "{rel}: {e}");
    }
    d.restore(Path::new("p.yaml"), &good).unwrap();
    assert!(d.restore(Path::new("p.yaml"), &good).is_err(), "twice");
    // No file behind it: its objects go at the first read.
    let l = d.poll().unwrap().unwrap();
    assert!(l.objects.policies.is_empty());
    assert_eq!(d.take_saves(), [("p.yaml".to_owned(), None)]);
}

#[test]
fn a_good_file_too_large_to_save_deletes_its_older_copy() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    let good = format!("{NS}{POLICY}");
    std::fs::write(&file, &good).unwrap();
    let mut d = ManifestDir::new(dir.path()).with_max_saved_bytes(good.len() + 10);
    d.poll().unwrap().unwrap();
    assert_eq!(d.take_saves().len(), 1);
    let larger = format!("{good}# {}\n", "x".repeat(40));
    std::fs::write(&file, &larger).unwrap();
    d.poll().unwrap();
    assert_eq!(
        d.take_saves(),
        [("p.yaml".to_owned(), None)],
        "an older copy must not come back after a restart"
    );
}

#[test]
fn a_file_named_by_a_notification_is_read_again_even_with_the_same_stamp() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    let good = format!("{NS}{POLICY}");
    std::fs::write(&file, &good).unwrap();
    let mut d = ManifestDir::new(dir.path());
    d.poll().unwrap().unwrap();
    // Same size, and the modification time put back: a stamp cannot see this change.
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let changed = good.replace("name: web", "name: bew");
    assert_eq!(changed.len(), good.len());
    std::fs::write(&file, &changed).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(d.poll().unwrap().is_none(), "the stamp is the same");
    let l = d
        .poll_named(&BTreeSet::from([file.clone()]))
        .unwrap()
        .unwrap();
    assert_eq!(policies(&l), ["bew"]);
    // A directory named: everything below it.
    std::fs::write(&file, &good).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let l = d
        .poll_named(&BTreeSet::from([dir.path().to_owned()]))
        .unwrap()
        .unwrap();
    assert_eq!(policies(&l), ["web"]);
}

/// Cilium's own connectivity-test policies (`connectivity/manifests/`, unchanged): every
/// CiliumNetworkPolicy and Kubernetes NetworkPolicy loads, and what cannot be enforced as
/// written is in the policy's notes, translated so that it fails closed (see
/// `clustermesh_model::policy::cilium` and `source::knp`).
#[test]
fn ciliums_connectivity_policies_load_with_notes_on_what_is_not_enforced() {
    let left_out = "the rule is left out: it allows nothing (its direction stays default-deny)";
    let expected_notes: BTreeMap<&str, Vec<String>> = [
        (
            "allow-all-egress",
            vec![format!(
                "rule 0 egress[1]: toCIDR not enforced yet; {left_out}"
            )],
        ),
        (
            "client-ingress-from-client2-icmp",
            vec![
                "rule 0 ingress[0]: icmps IPv6 type 128 not enforced: this datapath does not \
                 enforce IPv6 at all"
                    .to_owned(),
            ],
        ),
        (
            "client-ingress-from-other-client-icmp-deny",
            vec![
                "rule 0 ingressDeny[0]: icmps IPv6 type 128 not enforced: this datapath does \
                 not enforce IPv6 at all"
                    .to_owned(),
            ],
        ),
    ]
    .into_iter()
    .collect();

    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../connectivity/manifests");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 35, "the suite's 35 manifests");
    let (mut cnps, mut knps) = (0, 0);
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        // cilium-cli applies them in its test namespace.
        let text = text.replacen("metadata:\n", "metadata:\n  namespace: cilium-test\n", 1);
        let mut loaded = Loaded::default();
        parse_text("p.yaml", &text, &mut loaded);
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if text.contains("kind: NetworkPolicy") {
            knps += 1;
        } else {
            cnps += 1;
        }
        assert!(loaded.problems.is_empty(), "{file}: {:?}", loaded.problems);
        assert_eq!(loaded.objects.policies.len(), 1, "{file}");
        let (key, policy) = loaded.objects.policies.iter().next().unwrap();
        assert_eq!(key.0.as_deref(), Some("cilium-test"));
        let knp = if text.contains("kind: NetworkPolicy") {
            "-knp"
        } else {
            ""
        };
        let want = expected_notes
            .get(format!("{}{knp}", key.1).as_str())
            .cloned()
            .unwrap_or_default();
        assert_eq!(policy.notes, want, "{file}");
        // The port-range policies keep their ranges (4096 or 4196 to 8191).
        let ends: Vec<Option<u16>> = policy
            .rules
            .iter()
            .flat_map(|r| r.egress.iter().chain(&r.egress_deny))
            .flat_map(|e| &e.to_ports)
            .flat_map(|p| &p.ports)
            .map(|p| p.end_port)
            .collect();
        assert_eq!(
            ends.contains(&Some(8191)),
            file.contains("port-range"),
            "{file}: {ends:?}"
        );
    }
    assert_eq!((cnps, knps), (28, 7));
}
