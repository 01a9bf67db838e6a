//! Security labels (`source:key=value`) and label sets with Cilium's kvstore string form: the
//! labels sorted by key, each followed by `;`, e.g.
//! `k8s:app=web;k8s:io.cilium.k8s.policy.cluster=c1;`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterName;

/// The label every workload identity carries naming its cluster.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";
/// The label every workload identity carries naming its namespace.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// The label a workload identity carries naming its pod's service account
/// (`spec.serviceAccountName`), as Cilium's `k8s:io.cilium.k8s.policy.serviceaccount`.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// The service account a real API server gives a pod that names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// The source of labels taken from Kubernetes objects.
pub const SOURCE_K8S: &str = "k8s";
/// The source of the labels of reserved identities.
pub const SOURCE_RESERVED: &str = "reserved";

/// The prefix Cilium gives a pod's namespace's labels among the pod's security labels
/// (`k8s:io.cilium.k8s.namespace.labels.<key>=<value>`).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

const MAX_SOURCE_LEN: usize = 32;
/// A namespace label's key with its prefix: the prefix, a 253-character DNS prefix, '/' and a
/// 63-character name.
const MAX_KEY_LEN: usize = NAMESPACE_LABELS_PREFIX.len() + 317;
/// A service account's name (a DNS subdomain), the longest value Cilium puts in a label.
const MAX_VALUE_LEN: usize = 253;

/// One rule of Cilium's default label filter: how much of a label key it matches, from the
/// key's first character (Cilium matches a regular expression and counts only a match that
/// starts there).
#[derive(Debug, Clone, Copy)]
enum KeyRule {
    /// `prefix`: the key starts with it.
    Prefix(&'static str),
    /// `.*text`: the key contains it; matched up to its last occurrence.
    Contains(&'static str),
    /// `prefix.*`: the key starts with it; matched to the end.
    PrefixToEnd(&'static str),
}

impl KeyRule {
    fn matched(self, key: &str) -> usize {
        match self {
            Self::Prefix(p) if key.starts_with(p) => p.len(),
            Self::Contains(t) => key.rfind(t).map_or(0, |i| i + t.len()),
            Self::PrefixToEnd(p) if key.starts_with(p) => key.len(),
            Self::Prefix(_) | Self::PrefixToEnd(_) => 0,
        }
    }
}

/// The labels Cilium's default filter keeps in an identity whatever the ignore rules say
/// (`pkg/labelsfilter`, `defaultLabelPrefixCfg`).
const IDENTITY_INCLUDE: [KeyRule; 4] = [
    KeyRule::Prefix(NAMESPACE_LABEL),
    KeyRule::Prefix(NAMESPACE_LABELS_PREFIX),
    KeyRule::Prefix("app.kubernetes.io"),
    KeyRule::Prefix(CLUSTER_LABEL),
];

/// The labels Cilium's default filter leaves out of an identity: they change with every
/// rollout or StatefulSet pod, or say nothing about the workload. The last two are a Job's
/// `controller-uid`, which changes when the Job is created again under its name.
const IDENTITY_IGNORE: [KeyRule; 14] = [
    KeyRule::Prefix("io.kubernetes"),
    KeyRule::Prefix("kubernetes.io"),
    KeyRule::Prefix("statefulset.kubernetes.io/pod-name"),
    KeyRule::Prefix("apps.kubernetes.io/pod-index"),
    KeyRule::Prefix("batch.kubernetes.io/job-completion-index"),
    KeyRule::Contains("beta.kubernetes.io"),
    KeyRule::Prefix("k8s.io"),
    KeyRule::Prefix("pod-template-generation"),
    KeyRule::Prefix("pod-template-hash"),
    KeyRule::Prefix("controller-revision-hash"),
    KeyRule::PrefixToEnd("annotation"),
    KeyRule::Prefix("etcd_node"),
    KeyRule::Prefix("batch.kubernetes.io/controller-uid"),
    KeyRule::Prefix("controller-uid"),
];

/// Whether a pod label with this key takes part in its security identity, by Cilium's default
/// label filter: a label is kept when no ignore rule matches it, or when an include rule
/// matches more of it than the shortest matching ignore rule.
pub fn is_identity_label(key: &str) -> bool {
    let ignored = IDENTITY_IGNORE
        .iter()
        .map(|r| r.matched(key))
        .filter(|n| *n > 0)
        .min()
        .unwrap_or(0);
    let included = IDENTITY_INCLUDE
        .iter()
        .map(|r| r.matched(key))
        .max()
        .unwrap_or(0);
    ignored == 0 || included > ignored
}

/// Why a label or label set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// A label without the `source:` part.
    #[error("label {0:?} has no source (expected source:key=value)")]
    MissingSource(String),
    /// A label without `=`.
    #[error("label {0:?} has no '=' (expected source:key=value)")]
    MissingValue(String),
    /// The source is empty, too long or has characters other than `[a-z0-9-]`.
    #[error("label source {0:?} must be 1 to 32 characters of a-z, 0-9 and '-'")]
    Source(String),
    /// The key is empty, too long, or has a character the string form cannot carry.
    #[error(
        "label key {0:?} must be 1 to 348 printable ASCII characters other than ';', '=' and space"
    )]
    Key(String),
    /// The value is too long or has a character the string form cannot carry.
    #[error(
        "label value {0:?} must be at most 253 printable ASCII characters other than ';' and space"
    )]
    Value(String),
    /// Two labels with the same key.
    #[error("label key {0:?} appears twice")]
    DuplicateKey(String),
    /// The string form must end each label with `;`.
    #[error("label string must end with ';'")]
    MissingTerminator,
    /// A workload identity without its cluster label, or with another cluster's.
    #[error("labels name cluster {found:?}, expected {expected:?}")]
    WrongCluster {
        /// The cluster the caller expected.
        expected: String,
        /// The cluster label found (empty when absent).
        found: String,
    },
    /// A workload identity without its namespace label.
    #[error("labels carry no k8s:{NAMESPACE_LABEL} label")]
    MissingNamespace,
}

// === impl Label ===

/// One security label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    source: String,
    key: String,
    value: String,
}

impl Label {
    /// Validates the three parts.
    pub fn new(
        source: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, LabelError> {
        let (source, key, value) = (source.into(), key.into(), value.into());
        let is_source = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
        if source.is_empty() || source.len() > MAX_SOURCE_LEN || !source.bytes().all(is_source) {
            return Err(LabelError::Source(source));
        }
        // What Cilium's string form (`source:key=value;`) can carry: printable ASCII
        // without the separators; Kubernetes' label rules are narrower, and Cilium's
        // labels (a namespace's labels under their prefix, a service account's full name)
        // are longer.
        let is_value = |b: u8| b.is_ascii_graphic() && b != b';';
        if key.is_empty()
            || key.len() > MAX_KEY_LEN
            || !key.bytes().all(|b| is_value(b) && b != b'=')
        {
            return Err(LabelError::Key(key));
        }
        if value.len() > MAX_VALUE_LEN || !value.bytes().all(is_value) {
            return Err(LabelError::Value(value));
        }
        Ok(Self { source, key, value })
    }

    /// A `k8s:` label.
    pub fn k8s(key: impl Into<String>, value: impl Into<String>) -> Result<Self, LabelError> {
        Self::new(SOURCE_K8S, key, value)
    }

    /// Where the label comes from (`k8s`, `reserved`, ...).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The key, without the source.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value (may be empty).
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={}", self.source, self.key, self.value)
    }
}

impl FromStr for Label {
    type Err = LabelError;
    /// Parses `source:key=value`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (source, rest) = s
            .split_once(':')
            .ok_or_else(|| LabelError::MissingSource(s.into()))?;
        let (key, value) = rest
            .split_once('=')
            .ok_or_else(|| LabelError::MissingValue(s.into()))?;
        Self::new(source, key, value)
    }
}

// === impl LabelSet ===

/// A set of labels, at most one per key, kept sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LabelSet(BTreeMap<String, Label>);

impl LabelSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set, refusing two labels with one key.
    pub fn from_labels(labels: impl IntoIterator<Item = Label>) -> Result<Self, LabelError> {
        let mut set = Self::new();
        for label in labels {
            set.insert(label)?;
        }
        Ok(set)
    }

    /// The security labels of a workload: its pod labels (source `k8s`) plus the namespace and
    /// cluster labels.
    pub fn workload<'a>(
        cluster: &ClusterName,
        namespace: &str,
        pod_labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, LabelError> {
        let mut set = Self::new();
        for (k, v) in pod_labels {
            set.insert(Label::k8s(k, v)?)?;
        }
        set.insert(Label::k8s(NAMESPACE_LABEL, namespace)?)?;
        set.insert(Label::k8s(CLUSTER_LABEL, cluster.as_str())?)?;
        Ok(set)
    }

    /// Adds a label; refuses a second label with the same key.
    pub fn insert(&mut self, label: Label) -> Result<(), LabelError> {
        if self.0.contains_key(&label.key) {
            return Err(LabelError::DuplicateKey(label.key));
        }
        self.0.insert(label.key.clone(), label);
        Ok(())
    }

    /// The label with this key, whatever its source.
    pub fn get(&self, key: &str) -> Option<&Label> {
        self.0.get(key)
    }

    /// The labels, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.values()
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set has no label.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The value of the cluster label, if any.
    pub fn cluster(&self) -> Option<&str> {
        self.get(CLUSTER_LABEL).map(Label::value)
    }

    /// The value of the namespace label, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.get(NAMESPACE_LABEL).map(Label::value)
    }

    /// Checks that a workload identity belongs to `cluster` and names its namespace.
    pub fn check_workload_of(&self, cluster: &ClusterName) -> Result<(), LabelError> {
        match self.cluster() {
            Some(found) if found == cluster.as_str() => {}
            found => {
                return Err(LabelError::WrongCluster {
                    expected: cluster.to_string(),
                    found: found.unwrap_or_default().to_owned(),
                });
            }
        }
        self.namespace()
            .map(|_| ())
            .ok_or(LabelError::MissingNamespace)
    }

    /// The kvstore string form.
    pub fn to_kvstore_string(&self) -> String {
        self.to_string()
    }

    /// Parses the kvstore string form. Labels may come in any order; they are stored sorted.
    pub fn parse_kvstore_string(s: &str) -> Result<Self, LabelError> {
        if s.is_empty() {
            return Ok(Self::new());
        }
        let body = s.strip_suffix(';').ok_or(LabelError::MissingTerminator)?;
        Self::from_labels(
            body.split(';')
                .map(str::parse)
                .collect::<Result<Vec<Label>, _>>()?,
        )
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.values().try_for_each(|l| write!(f, "{l};"))
    }
}

impl FromStr for LabelSet {
    type Err = LabelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_kvstore_string(s)
    }
}

impl TryFrom<String> for LabelSet {
    type Error = LabelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse_kvstore_string(&s)
    }
}

impl From<LabelSet> for String {
    fn from(set: LabelSet) -> Self {
        set.to_string()
    }
}

#[cfg(test)]
mod tests;
