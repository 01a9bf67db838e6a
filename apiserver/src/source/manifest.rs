//! The manifest-directory source: a directory (searched recursively) of Kubernetes YAML or
//! JSON files, several documents per file allowed. Supported: `v1` Service, Pod, Node,
//! Namespace; `discovery.k8s.io/v1` EndpointSlice; `cilium.io/v2` CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy. A document that cannot be used is reported with its file,
//! its position and the reason. Files fail closed ([`ManifestDir`]): a file whose content
//! cannot be read whole, is empty or holds an unusable document keeps its last good objects.

use std::collections::{BTreeMap, BTreeSet};
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

/// Lists manifest files. Directories reached through a symlink are not entered (no loops, no
/// leaving the tree); symlinked files are listed and checked when read.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if entry.file_type()?.is_dir() {
            if !hidden {
                walk(&path, out)?;
            }
        } else if is_manifest(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The largest manifest file read by default (16 MiB, `limits.manifestFileBytes`); a larger
/// one is a broken file.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// The most bytes of manifests read from one directory by default (256 MiB,
/// `limits.manifestTotalBytes`).
pub const MAX_TOTAL_BYTES: u64 = 256 << 20;

/// The manifest files under `dir`, sorted.
pub fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Reads every manifest under `dir` once (what [`ManifestDir::poll`] gives at its first call).
pub fn load_dir(dir: &Path) -> Loaded {
    let mut d = ManifestDir::new(dir);
    match d.poll() {
        Ok(Some(loaded)) => loaded,
        Ok(None) => Loaded::default(),
        Err(e) => Loaded {
            objects: SourceObjects::default(),
            problems: vec![SourceProblem {
                origin: dir.display().to_string(),
                reason: format!("cannot be listed: {e}"),
            }],
        },
    }
}

/// One file's state: what was last applied from it, and why its current content is not.
#[derive(Debug, Clone)]
struct FileState {
    /// Modification time and size when last read.
    stamp: (SystemTime, u64),
    /// The objects of its last content that was read whole and whose every document was
    /// usable; `None` before the file was ever good.
    applied: Option<SourceObjects>,
    /// The usable documents of a file that was never good (better than nothing).
    partial: Option<SourceObjects>,
    /// What is wrong with the current content, and since when (unset while it is good).
    broken: Option<(Vec<SourceProblem>, SystemTime)>,
    /// A digest of the good content last handed out to be saved ([`ManifestDir::take_saves`]).
    saved: Option<u64>,
    /// `applied` came from a saved copy ([`ManifestDir::restore`]), not from reading the file
    /// in this process.
    restored: bool,
}

impl FileState {
    /// The same objects and the same problems (the time aside).
    fn same(&self, other: &Self) -> bool {
        self.applied == other.applied
            && self.partial == other.partial
            && self.broken.as_ref().map(|b| &b.0) == other.broken.as_ref().map(|b| &b.0)
    }
}

/// The manifest directory, read incrementally and failing closed: a file is applied only when
/// it can be read whole, is not empty, and every document in it is usable. Otherwise its last
/// applied objects stay (a half-written policy file must never open a pod) and the file is
/// reported with the reason and since when. A file never applied yet contributes its usable
/// documents. A deleted file's objects go.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Whether a poll has produced a result yet.
    polled: bool,
    /// The largest file read.
    max_file_bytes: u64,
    /// The most bytes read from the whole directory: the files (in path order) past it are
    /// broken files (their last good objects stay).
    max_total_bytes: u64,
    /// The largest good content handed out to be saved; a larger good file's saved copy is
    /// deleted instead (an older copy must not come back after a restart).
    max_saved_bytes: usize,
    /// Copies to save (`Some`) or delete (`None`), by path.
    saves: BTreeMap<PathBuf, Option<String>>,
}

/// What one read of a file gave.
struct FileRead {
    objects: SourceObjects,
    problems: Vec<SourceProblem>,
    /// The content, when the read was good.
    text: Option<String>,
}

/// A digest of a file's content, to tell whether a saved copy is current.
fn digest(text: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

fn read_file(root: &Path, path: &Path, max_file_bytes: u64) -> FileRead {
    let origin = path.display().to_string();
    let fail = |reason: String| FileRead {
        objects: SourceObjects::default(),
        problems: vec![SourceProblem {
            origin: origin.clone(),
            reason,
        }],
        text: None,
    };
    // What it is, checked before it is opened: opening a FIFO would block, a device never end.
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot be read: {e}")),
    };
    if !meta.is_file() {
        return fail("is not a regular file".into());
    }
    if meta.len() > max_file_bytes {
        return fail(format!(
            "is {} bytes, more than the {max_file_bytes} bytes a manifest file may have (limits.manifestFileBytes)",
            meta.len()
        ));
    }
    // A symlink must stay inside the directory.
    match (path.canonicalize(), root.canonicalize()) {
        (Ok(real), Ok(root)) if real.starts_with(&root) => {}
        (Ok(real), Ok(_)) => {
            return fail(format!(
                "links to {}, outside the manifest directory",
                real.display()
            ));
        }
        (Err(e), _) | (_, Err(e)) => return fail(format!("cannot be read: {e}")),
    }
    let mut bytes = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| {
        use std::io::Read as _;
        f.take(max_file_bytes + 1).read_to_end(&mut bytes)
    });
    if let Err(e) = read {
        return fail(format!("cannot be read: {e}"));
    }
    if bytes.len() as u64 > max_file_bytes {
        return fail(format!(
            "grew past the {max_file_bytes} bytes a manifest file may have (limits.manifestFileBytes)"
        ));
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return fail(format!("is not UTF-8 ({e})")),
    };
    if text.is_empty() {
        // What a file being rewritten in place looks like first; an intentionally empty
        // manifest holds at least a comment or `---`.
        return fail("is empty (being written?); delete the file to remove its objects".into());
    }
    let mut loaded = Loaded::default();
    parse_text(&origin, &text, &mut loaded);
    let good = loaded.problems.is_empty();
    FileRead {
        objects: loaded.objects,
        problems: loaded.problems,
        text: good.then_some(text),
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Adds `from`'s entries to `into`; an entry already there (from an earlier file) is kept and
/// the second definition reported.
fn merge_map<K: Ord + Clone + std::fmt::Debug, V: Clone>(
    into: &mut BTreeMap<K, V>,
    from: &BTreeMap<K, V>,
    file: &Path,
    what: &str,
    problems: &mut Vec<SourceProblem>,
) {
    for (k, v) in from {
        if into.contains_key(k) {
            problems.push(SourceProblem {
                origin: file.display().to_string(),
                reason: format!("{what} {k:?} is defined twice; the first definition is kept"),
            });
        } else {
            into.insert(k.clone(), v.clone());
        }
    }
}

impl ManifestDir {
    /// A directory not read yet.
    pub fn new(dir: &Path) -> Self {
        Self::with_limits(dir, MAX_FILE_BYTES, MAX_TOTAL_BYTES)
    }

    /// [`ManifestDir::new`] with the largest file and the most bytes in all.
    pub fn with_limits(dir: &Path, max_file_bytes: u64, max_total_bytes: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
            polled: false,
            max_file_bytes,
            max_total_bytes,
            max_saved_bytes: usize::MAX,
            saves: BTreeMap::new(),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Sets the largest content handed out by [`ManifestDir::take_saves`] (the store's
    /// largest value).
    pub fn with_max_saved_bytes(mut self, bytes: usize) -> Self {
        self.max_saved_bytes = bytes;
        self
    }

    /// Takes a saved copy of a file's last good content (`relative` to the directory), from
    /// before a restart: if the file cannot be read or used now, these objects stay. Fails,
    /// changing nothing, when the copy itself is not wholly usable or the file was read
    /// already.
    pub fn restore(&mut self, relative: &Path, text: &str) -> Result<(), String> {
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!(
                "{} is not a path inside the directory",
                relative.display()
            ));
        }
        let path = self.dir.join(relative);
        if self.files.contains_key(&path) {
            return Err(format!("{} was read already", path.display()));
        }
        let mut loaded = Loaded::default();
        parse_text(&path.display().to_string(), text, &mut loaded);
        if let Some(p) = loaded.problems.first() {
            return Err(p.to_string());
        }
        self.files.insert(
            path,
            FileState {
                // Never a real stamp: the file is read at the next poll.
                stamp: (SystemTime::UNIX_EPOCH, u64::MAX),
                applied: Some(loaded.objects),
                partial: None,
                broken: None,
                saved: Some(digest(text)),
                restored: true,
            },
        );
        Ok(())
    }

    /// The copies of good content to save since the last call, by path relative to the
    /// directory: `Some(text)` to save, `None` to delete (the file was deleted, or its good
    /// content is too large to save). Paths that are not UTF-8 are not saved.
    pub fn take_saves(&mut self) -> Vec<(String, Option<String>)> {
        std::mem::take(&mut self.saves)
            .into_iter()
            .filter_map(|(path, text)| {
                let rel = path.strip_prefix(&self.dir).ok()?.to_str()?.to_owned();
                Some((rel, text))
            })
            .collect()
    }

    /// Reads what changed. `Ok(None)`: nothing changed since the last poll; `Ok(Some)`: the
    /// whole state to apply; `Err`: the directory cannot be listed (keep the current state).
    pub fn poll(&mut self) -> std::io::Result<Option<Loaded>> {
        self.poll_named(&BTreeSet::new())
    }

    /// [`ManifestDir::poll`], reading again the files named in `named` (or below a directory
    /// named there) even if their modification time and size are what they were: a change
    /// notification names them.
    pub fn poll_named(&mut self, named: &BTreeSet<PathBuf>) -> std::io::Result<Option<Loaded>> {
        let paths = files(&self.dir)?;
        let mut changed = !self.polled;
        let before = self.files.len();
        let saves = &mut self.saves;
        self.files.retain(|p, f| {
            let keep = paths.binary_search(p).is_ok();
            if !keep && f.saved.is_some() {
                saves.insert(p.clone(), None);
            }
            keep
        });
        changed |= self.files.len() != before;
        let mut total: u64 = 0;
        for path in paths {
            // A dangling link or an unreadable entry is read below, and fails there.
            let stamp = std::fs::metadata(&path).map_or((SystemTime::UNIX_EPOCH, 0), |meta| {
                (
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    meta.len(),
                )
            });
            total = total.saturating_add(stamp.1);
            let over_total = total > self.max_total_bytes;
            let prev = self.files.get(&path);
            // Unchanged good files are not read again; broken ones are (a permission or a
            // content may be fixed without a new modification time).
            let is_named = || path.ancestors().any(|a| named.contains(a));
            if !over_total
                && prev.is_some_and(|s| s.stamp == stamp && s.broken.is_none())
                && !is_named()
            {
                continue;
            }
            let read = if over_total {
                FileRead {
                    objects: SourceObjects::default(),
                    problems: vec![SourceProblem {
                        origin: path.display().to_string(),
                        reason: format!(
                            "not read: the manifest files up to it hold {total} bytes, more than limits.manifestTotalBytes ({})",
                            self.max_total_bytes
                        ),
                    }],
                    text: None,
                }
            } else {
                read_file(&self.dir, &path, self.max_file_bytes)
            };
            let next = if read.problems.is_empty() {
                let text = read.text.unwrap_or_default();
                let hash = digest(&text);
                let mut saved = prev.and_then(|p| p.saved);
                if saved != Some(hash) {
                    if text.len() <= self.max_saved_bytes {
                        self.saves.insert(path.clone(), Some(text));
                        saved = Some(hash);
                    } else if saved.is_some() {
                        self.saves.insert(path.clone(), None);
                        saved = None;
                    }
                }
                FileState {
                    stamp,
                    applied: Some(read.objects),
                    partial: None,
                    broken: None,
                    saved,
                    restored: false,
                }
            } else {
                let since = prev
                    .and_then(|p| p.broken.as_ref().map(|b| b.1))
                    .unwrap_or_else(SystemTime::now);
                let applied = prev.and_then(|p| p.applied.clone());
                let partial = applied.is_none().then_some(read.objects);
                FileState {
                    stamp,
                    applied,
                    partial,
                    broken: Some((read.problems, since)),
                    saved: prev.and_then(|p| p.saved),
                    restored: prev.is_some_and(|p| p.restored),
                }
            };
            if prev.is_none_or(|p| !p.same(&next)) {
                changed = true;
            }
            self.files.insert(path, next);
        }
        self.polled = true;
        Ok(changed.then(|| self.merged()))
    }

    /// Every file's objects together, in path order, with every broken file reported.
    fn merged(&self) -> Loaded {
        let mut out = Loaded::default();
        for (path, f) in &self.files {
            if let Some((problems, t)) = &f.broken {
                let kept = match (&f.applied, f.restored) {
                    (Some(_), false) => "; the file's last good objects are kept",
                    (Some(_), true) => {
                        "; the file's last good objects, saved before the restart, are kept"
                    }
                    (None, _) => "",
                };
                for p in problems {
                    out.problems.push(SourceProblem {
                        origin: p.origin.clone(),
                        reason: format!(
                            "{} (since unix time {}{kept})",
                            p.reason,
                            unix_seconds(*t)
                        ),
                    });
                }
            }
            let Some(o) = f.applied.as_ref().or(f.partial.as_ref()) else {
                continue;
            };
            let into = &mut out.objects;
            let problems = &mut out.problems;
            merge_map(
                &mut into.namespaces,
                &o.namespaces,
                path,
                "namespace",
                problems,
            );
            merge_map(&mut into.pods, &o.pods, path, "pod", problems);
            merge_map(&mut into.services, &o.services, path, "service", problems);
            merge_map(
                &mut into.endpoint_slices,
                &o.endpoint_slices,
                path,
                "endpointslice",
                problems,
            );
            merge_map(&mut into.nodes, &o.nodes, path, "node", problems);
            merge_map(&mut into.policies, &o.policies, path, "policy", problems);
        }
        // Nobody else writes the EndpointSlices of Services with a selector here.
        let problems = super::endpoints::derive_missing(&mut out.objects);
        out.problems.extend(problems);
        out
    }
}

/// The deepest flow nesting (`[`, `{`) allowed; the YAML parser refuses deeper documents
/// anyway, but only after seconds of work on a hostile file.
pub const MAX_FLOW_DEPTH: usize = 128;

/// Whether `text` nests flow collections deeper than [`MAX_FLOW_DEPTH`], counting brackets
/// outside quotes and comments (block scalars may count a bracket of their text: harmless,
/// the limit is far above what a manifest needs).
fn too_deep(text: &str) -> bool {
    let (mut depth, mut quote, mut comment, mut prev) = (0usize, None, false, ' ');
    for c in text.chars() {
        match (quote, comment, c) {
            (_, true, '\n') => comment = false,
            (_, true, _) => {}
            (Some(q), _, c) if c == q => quote = None,
            (Some(_), _, _) => {}
            (None, _, '#') if prev.is_whitespace() => comment = true,
            (None, _, '\'' | '"') => quote = Some(c),
            (None, _, '[' | '{') => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return true;
                }
            }
            (None, _, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    false
}

/// Parses the documents of one file into `loaded`.
pub fn parse_text(file: &str, text: &str, loaded: &mut Loaded) {
    // A byte-order mark (Windows editors write one) is not content; kubectl ignores it too.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if too_deep(text) {
        loaded.problems.push(SourceProblem {
            origin: file.to_owned(),
            reason: format!("nests brackets deeper than {MAX_FLOW_DEPTH} levels; not parsed"),
        });
        return;
    }
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = format!("{file} (document {})", i + 1);
        // Through YAML's own value first: it refuses a mapping with a key twice (which one
        // would win is a guess, and a policy must not be a guess), where JSON's keeps the last.
        let value = match serde_yaml_ng::Value::deserialize(doc)
            .and_then(|v| serde_json::to_value(v).map_err(serde::de::Error::custom))
        {
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
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let p =
                super::knp::network_policy(&decode(value, "NetworkPolicy")?).map_err(with_kind)?;
            insert(
                &mut objects.policies,
                (p.namespace.clone(), p.name.clone()),
                p,
                "policy",
            )
        }
        ("", _) | (_, "") => Err("has no apiVersion or kind".into()),
        _ => Err(format!(
            "{api} {kind} is not a supported kind (Service, Pod, Node, Namespace, EndpointSlice, NetworkPolicy, CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)"
        )),
    }
}

#[cfg(test)]
mod tests;
