//! Every object a remote sends is checked before it is imported: it must belong to that
//! remote (cluster named in the object and in the key), identities must be inside the
//! remote's range, addresses and names well formed (the wire conversion already refused
//! malformed ones), services exported (global and shared), sizes within limits. A rejected
//! object is counted by kind and reason and changes nothing.

use std::net::IpAddr;

use clustermesh_model::cluster::{ClusterId, ClusterName, MaxConnectedClusters};
use clustermesh_model::identity::Identity;
use clustermesh_model::keys::{CachedObject, Key};
use clustermesh_model::service::ClusterService;
use clustermesh_proto::Object;
use clustermesh_proto::v1;

/// The largest encoded object imported by default (`limits.maxObjectBytes`): the largest the
/// source writes, below etcd's default request limit (1.5 MiB) and gRPC's default message
/// limit (4 MiB).
pub const MAX_OBJECT_BYTES: usize = 1024 * 1024;

/// Why an object was not imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} rejected ({reason}): {detail}")]
pub struct Reject {
    /// The object kind (`identities`, `ip`, `nodes`, `services`, or `other`).
    pub kind: &'static str,
    /// A short, stable reason (a metric label).
    pub reason: &'static str,
    /// What exactly was wrong.
    pub detail: String,
}

fn reject(kind: &'static str, reason: &'static str, detail: impl ToString) -> Reject {
    Reject {
        kind,
        reason,
        detail: detail.to_string(),
    }
}

/// The remote an import is for, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// Its name.
    pub name: ClusterName,
    /// Its ID.
    pub id: ClusterId,
    /// The mesh size mode.
    pub mode: MaxConnectedClusters,
    /// The largest encoded object imported.
    pub max_object_bytes: usize,
}

impl Remote {
    fn owns(&self, kind: &'static str, cluster: &ClusterName) -> Result<(), Reject> {
        if cluster == &self.name {
            Ok(())
        } else {
            Err(reject(
                kind,
                "wrong-cluster",
                format!("object of cluster {cluster} sent by {}", self.name),
            ))
        }
    }

    fn key(&self, object: CachedObject) -> String {
        Key::Cached {
            remote: self.name.clone(),
            object,
        }
        .to_string()
    }
}

fn sized(remote: &Remote, kind: &'static str, value: Vec<u8>) -> Result<Vec<u8>, Reject> {
    let max = remote.max_object_bytes;
    if value.len() > max {
        return Err(reject(
            kind,
            "oversized",
            format!("{} bytes, at most {max}", value.len()),
        ));
    }
    Ok(value)
}

fn json<T: serde::Serialize>(
    remote: &Remote,
    kind: &'static str,
    v: &T,
) -> Result<Vec<u8>, Reject> {
    sized(
        remote,
        kind,
        serde_json::to_vec(v).map_err(|e| reject(kind, "encoding", e))?,
    )
}

/// The cache key and value for an object from `remote`.
pub fn cache_entry(remote: &Remote, object: &Object) -> Result<(String, Vec<u8>), Reject> {
    match object {
        Object::Identity {
            cluster,
            id,
            labels,
        } => {
            let kind = "identities";
            remote.owns(kind, cluster)?;
            if id.is_reserved() {
                return Err(reject(kind, "reserved-identity", id));
            }
            id.check_owned_by(remote.id, remote.mode)
                .map_err(|e| reject(kind, "identity-out-of-range", e))?;
            labels
                .check_workload_of(&remote.name)
                .map_err(|e| reject(kind, "labels", e))?;
            Ok((
                remote.key(CachedObject::Identity(*id)),
                sized(remote, kind, labels.to_kvstore_string().into_bytes())?,
            ))
        }
        Object::IpCache { cluster, entry } => {
            let kind = "ip";
            remote.owns(kind, cluster)?;
            entry
                .check_from_cluster(remote.id, remote.mode)
                .map_err(|e| reject(kind, "invalid", e))?;
            Ok((
                remote.key(CachedObject::IpCache(entry.ip)),
                json(remote, kind, entry)?,
            ))
        }
        Object::Node(n) => {
            let kind = "nodes";
            n.check_from_cluster(&remote.name, remote.id)
                .map_err(|e| reject(kind, "invalid", e))?;
            Ok((
                remote.key(CachedObject::Node(n.name.clone())),
                json(remote, kind, n)?,
            ))
        }
        Object::Service(s) => {
            let kind = "services";
            s.check_from_cluster(&remote.name, remote.id)
                .map_err(|e| reject(kind, "invalid", e))?;
            if !(s.include_external && s.shared) {
                return Err(reject(
                    kind,
                    "not-exported",
                    format!("{}/{} is not global and shared", s.namespace, s.name),
                ));
            }
            let object = CachedObject::Service {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
            };
            Ok((remote.key(object), json(remote, kind, s)?))
        }
        Object::Policy { .. } | Object::ClusterStatus(_) => Err(reject(
            "other",
            "kind-not-importable",
            "policies and cluster statuses are never imported",
        )),
    }
}

/// Removes the backends of a remote's service that are not the remote's own endpoints (`own`:
/// its pod IPs and its nodes' addresses), with their conditions, and returns them: a remote
/// cannot point a global service at another cluster's pods, this cluster's pods, or an address
/// outside the mesh.
pub fn restrict_backends(
    service: &mut ClusterService,
    own: impl Fn(&IpAddr) -> bool,
) -> Vec<IpAddr> {
    let foreign: Vec<IpAddr> = service
        .backends
        .keys()
        .filter(|ip| !own(ip))
        .copied()
        .collect();
    for ip in &foreign {
        service.backends.remove(ip);
        service.backend_conditions.remove(ip);
    }
    foreign
}

/// The cache key a delete from `remote` names.
pub fn cache_key_of_delete(remote: &Remote, d: &v1::Delete) -> Result<String, Reject> {
    let kind = v1::Kind::try_from(d.kind).unwrap_or(v1::Kind::Unspecified);
    let label = match kind {
        v1::Kind::Identities => "identities",
        v1::Kind::Ipcache => "ip",
        v1::Kind::Nodes => "nodes",
        v1::Kind::Services => "services",
        _ => "other",
    };
    let cluster = ClusterName::new(d.cluster.as_str()).map_err(|e| reject(label, "invalid", e))?;
    remote.owns(label, &cluster)?;
    let object = match kind {
        v1::Kind::Identities => CachedObject::Identity(
            Identity::parse_decimal(&d.name).map_err(|e| reject(label, "invalid", e))?,
        ),
        v1::Kind::Ipcache => CachedObject::IpCache(
            d.name
                .parse()
                .map_err(|_| reject(label, "invalid", format!("{:?} is not an IP", d.name)))?,
        ),
        v1::Kind::Nodes => CachedObject::Node(d.name.clone()),
        v1::Kind::Services => {
            let (namespace, name) = d.name.split_once('/').ok_or_else(|| {
                reject(
                    label,
                    "invalid",
                    format!("{:?} is not namespace/name", d.name),
                )
            })?;
            CachedObject::Service {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }
        }
        _ => {
            return Err(reject(
                label,
                "kind-not-importable",
                format!("delete of kind {}", d.kind),
            ));
        }
    };
    let key = remote.key(object);
    // Round-trip through the parser: a name with '/' or invalid characters is refused here.
    Key::parse(&key).map_err(|e| reject(label, "invalid", e))?;
    Ok(key)
}

#[cfg(test)]
mod tests;
