//! The manifest-directory source: a directory (searched recursively) of Kubernetes YAML or
//! JSON files, several documents per file allowed. Supported: `v1` Service, Pod, Node,
//! Namespace; `discovery.k8s.io/v1` EndpointSlice; `cilium.io/v2` CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy. A document that cannot be used is reported with its file,
//! its position and the reason; every other document is still loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

use super::k8s::{self, CiliumPolicyDoc};
use super::{SourceObjects, SourceProblem};

/// The result of reading the directory once.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Every usable object.
    pub objects: SourceObjects,
    /// Every document that could not be used.
    pub problems: Vec<SourceProblem>,
}

/// What the directory looks like: each manifest file with its modification time and size. A
/// different fingerprint means something changed.
pub type Fingerprint = BTreeMap<PathBuf, (SystemTime, u64)>;

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default();
    !hidden && matches!(ext, "yaml" | "yml" | "json")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if !path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
            {
                walk(&path, out)?;
            }
        } else if is_manifest(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The manifest files under `dir`, sorted.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// The directory's fingerprint (files that vanish meanwhile are skipped).
pub fn fingerprint(dir: &Path) -> std::io::Result<Fingerprint> {
    let mut fp = Fingerprint::new();
    for path in files(dir)? {
        if let Ok(meta) = std::fs::metadata(&path) {
            fp.insert(
                path,
                (
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                ),
            );
        }
    }
    Ok(fp)
}

/// Reads every manifest under `dir`.
pub fn load_dir(dir: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    match files(dir) {
        Ok(paths) => {
            for path in paths {
                match std::fs::read_to_string(&path) {
                    Ok(text) => parse_text(&path.display().to_string(), &text, &mut loaded),
                    Err(e) => loaded.problems.push(SourceProblem {
                        origin: path.display().to_string(),
                        reason: format!("cannot be read: {e}"),
                    }),
                }
            }
        }
        Err(e) => loaded.problems.push(SourceProblem {
            origin: dir.display().to_string(),
            reason: format!("cannot be listed: {e}"),
        }),
    }
    // Nobody else writes the EndpointSlices of Services with a selector here.
    let problems = super::endpoints::derive_missing(&mut loaded.objects);
    loaded.problems.extend(problems);
    loaded
}

/// Parses the documents of one file into `loaded`.
pub fn parse_text(file: &str, text: &str, loaded: &mut Loaded) {
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = format!("{file} (document {})", i + 1);
        let value = match serde_json::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                loaded.problems.push(SourceProblem {
                    origin,
                    reason: format!("is not valid YAML: {e}"),
                });
                // The YAML stream cannot be trusted past a syntax error.
                return;
            }
        };
        if value.is_null() {
            continue;
        }
        if let Err(reason) = add_document(value, &mut loaded.objects) {
            loaded.problems.push(SourceProblem { origin, reason });
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
    what: &str,
) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| format!("is not a valid {what}: {e}"))
}

fn insert<K: Ord + std::fmt::Debug, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
    what: &str,
) -> Result<(), String> {
    if map.contains_key(&key) {
        return Err(format!(
            "{what} {key:?} is defined twice; the first definition is kept"
        ));
    }
    map.insert(key, value);
    Ok(())
}

/// Adds one document (a Kubernetes object as JSON, with `apiVersion` and `kind`).
pub(crate) fn add_document(
    value: serde_json::Value,
    objects: &mut SourceObjects,
) -> Result<(), String> {
    let api = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let with_kind = |e: String| format!("{api} {kind}: {e}");
    match (api.as_str(), kind.as_str()) {
        ("v1", "Namespace") => {
            let ns = k8s::namespace_info(&decode(value, "Namespace")?).map_err(with_kind)?;
            insert(&mut objects.namespaces, ns.name.clone(), ns, "namespace")
        }
        ("v1", "Pod") => {
            let pod = k8s::pod_info(&decode(value, "Pod")?).map_err(with_kind)?;
            insert(
                &mut objects.pods,
                (pod.namespace.clone(), pod.name.clone()),
                pod,
                "pod",
            )
        }
        ("v1", "Service") => {
            let svc = k8s::service_info(&decode(value, "Service")?).map_err(with_kind)?;
            insert(
                &mut objects.services,
                (svc.namespace.clone(), svc.name.clone()),
                svc,
                "service",
            )
        }
        ("v1", "Node") => {
            let node = k8s::node_info(&decode(value, "Node")?).map_err(with_kind)?;
            insert(&mut objects.nodes, node.name.clone(), node, "node")
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice = k8s::slice_info(&decode(value, "EndpointSlice")?).map_err(with_kind)?;
            insert(
                &mut objects.endpoint_slices,
                (slice.namespace.clone(), slice.name.clone()),
                slice,
                "endpointslice",
            )
        }
        ("cilium.io/v2", "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy") => {
            let clusterwide = kind == "CiliumClusterwideNetworkPolicy";
            let doc: CiliumPolicyDoc = decode(value, &kind)?;
            let p = k8s::policy(doc, clusterwide).map_err(with_kind)?;
            insert(
                &mut objects.policies,
                (p.namespace.clone(), p.name.clone()),
                p,
                "policy",
            )
        }
        ("", _) | (_, "") => Err("has no apiVersion or kind".into()),
        _ => Err(format!(
            "{api} {kind} is not a supported kind (Service, Pod, Node, Namespace, EndpointSlice, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)"
        )),
    }
}

#[cfg(test)]
mod tests;
