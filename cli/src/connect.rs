//! `clustermesh connect DIR_A DIR_B` and `disconnect`: each cluster gets the other as a
//! remote — its Export address, its CA, and a `remote-<us>` client certificate minted by its
//! CA — as one file in the remotes directory, which a running apiserver picks up without a
//! restart. Every check runs before anything is written, so a refusal changes nothing; a
//! second run finds everything in place and changes nothing either.

use std::path::Path;

use anyhow::{Context, bail};
use clustermesh_certs::ClientIdentity;

use crate::clusterdir::{ClusterDir, write_atomic};

/// What connecting changed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The remote was written (new or changed).
    Written,
    /// Everything was already in place.
    Unchanged,
}

/// What the checks of a pair look at, wherever a cluster is described (a directory, or a
/// Kubernetes cluster's objects).
pub(crate) struct PeerInfo<'a> {
    pub(crate) name: &'a clustermesh_model::ClusterName,
    pub(crate) id: u32,
    pub(crate) mode: clustermesh_model::MaxConnectedClusters,
    /// The Export address peers dial.
    pub(crate) export: &'a str,
    /// Where to change the address, for the message.
    pub(crate) fix_at: String,
}

/// Refuses a pair that cannot form a mesh; every check runs before anything is written.
pub(crate) fn check_pair(a: &PeerInfo<'_>, b: &PeerInfo<'_>) -> anyhow::Result<()> {
    if a.name == b.name {
        bail!(
            "refusing to connect: both are cluster {:?}; cluster names must be unique in a mesh",
            a.name.as_str()
        );
    }
    if a.id == b.id {
        bail!(
            "refusing to connect: {} and {} both have cluster ID {}; give one another ID (clustermesh certs init --id)",
            a.name,
            b.name,
            a.id
        );
    }
    if a.mode != b.mode {
        bail!(
            "refusing to connect: {} uses maxConnectedClusters {} and {} uses {}; it must be equal across the mesh",
            a.name,
            a.mode,
            b.name,
            b.mode
        );
    }
    for p in [a, b] {
        let undialable = || {
            anyhow::anyhow!(
                "refusing to connect: {}'s Export address {:?} is not an address peers can dial (HOST:PORT)",
                p.name,
                p.export
            )
        };
        let Ok(export) = p.export.parse::<std::net::SocketAddr>() else {
            // A host name (a load balancer's DNS name) and a port.
            let (host, port) = p.export.rsplit_once(':').ok_or_else(undialable)?;
            if host.is_empty()
                || host.contains(['/', ' '])
                || !port.parse::<u16>().is_ok_and(|p| p > 0)
            {
                return Err(undialable());
            }
            continue;
        };
        if export.ip().is_unspecified() || export.port() == 0 {
            bail!(
                "refusing to connect: {} listens on {export}, which peers cannot dial; set its reachable address and port ({})",
                p.name,
                p.fix_at
            );
        }
    }
    Ok(())
}

fn dir_info(d: &ClusterDir) -> PeerInfo<'_> {
    PeerInfo {
        name: &d.apiserver.cluster.name,
        id: d.apiserver.cluster.id,
        mode: d.apiserver.cluster.max_connected_clusters,
        export: &d.apiserver.listen.export,
        fix_at: format!("listen.export in {}", d.apiserver_config().display()),
    }
}

fn refuse_pair(a: &ClusterDir, b: &ClusterDir) -> anyhow::Result<()> {
    for d in [a, b] {
        d.remotes_dir()?;
    }
    check_pair(&dir_info(a), &dir_info(b))
}

/// The remote file a cluster keeps for `peer` (named `name`, with `id`, dialled at
/// `address`). Every file of a remotes directory is flat (no subdirectory), so that
/// `kubectl create secret generic --from-file=<dir>/remotes` carries it into a cluster as is.
pub(crate) fn entry_text(name: &str, id: u32, address: &str) -> String {
    format!(
        "# written by clustermesh connect\nname: {name}\nid: {id}\naddress: \"{address}\"\nca: {name}-ca.pem\ncert: {name}-client.pem\nkey: {name}-client-key.pem\n"
    )
}

fn entry(peer: &ClusterDir) -> String {
    entry_text(
        peer.name().as_str(),
        peer.apiserver.cluster.id,
        &peer.apiserver.listen.export,
    )
}

/// The certificate files of `peer` in a remotes directory.
fn files_of(remotes: &Path, peer: &str) -> [std::path::PathBuf; 3] {
    [
        remotes.join(format!("{peer}-ca.pem")),
        remotes.join(format!("{peer}-client.pem")),
        remotes.join(format!("{peer}-client-key.pem")),
    ]
}

/// The key exists and only its owner can read it (a key left world-readable by an older
/// version is rewritten).
fn key_is_private(key: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(key).is_ok_and(|m| m.permissions().mode() & 0o077 == 0)
}

/// Makes `us` import `peer`.
fn add_remote(us: &ClusterDir, peer: &ClusterDir) -> anyhow::Result<Outcome> {
    let remotes = us.remotes_dir()?;
    let file = remotes.join(format!("{}.yaml", peer.name()));
    let [ca, cert, key] = files_of(remotes, peer.name().as_str());
    let peer_ca = peer.ca()?;
    let text = entry(peer);
    let in_place = std::fs::read_to_string(&file).is_ok_and(|t| t == text)
        && std::fs::read_to_string(&ca).is_ok_and(|t| t == peer_ca.cert().cert_pem)
        && cert.exists()
        && key_is_private(&key);
    if in_place {
        return Ok(Outcome::Unchanged);
    }
    std::fs::create_dir_all(remotes).with_context(|| format!("creating {}", remotes.display()))?;
    // The peer's CA certificate only: its key never leaves the peer's directory.
    std::fs::write(&ca, &peer_ca.cert().cert_pem)
        .with_context(|| format!("writing {}", ca.display()))?;
    let client = peer_ca.client_cert(&ClientIdentity::Remote(us.name().clone()))?;
    // `<peer>-client.pem` and `<peer>-client-key.pem`, the key 0600.
    client.write(remotes, &format!("{}-client", peer.name()))?;
    // The remote file last, so that the apiserver never reads it before its certificates.
    write_atomic(&file, &text)?;
    Ok(Outcome::Written)
}

/// Removes `peer` from `us`; whether there was anything to remove.
fn remove_remote(us: &ClusterDir, peer: &str) -> anyhow::Result<bool> {
    let remotes = us.remotes_dir()?;
    let file = remotes.join(format!("{peer}.yaml"));
    let mut existed = false;
    // The remote file first: the apiserver stops the remote before its certificates go.
    for f in std::iter::once(file).chain(files_of(remotes, peer)) {
        if f.exists() {
            existed = true;
            std::fs::remove_file(&f).with_context(|| format!("removing {}", f.display()))?;
        }
    }
    Ok(existed)
}

/// Connects two cluster directories; what changed on each side.
pub(crate) fn connect(a: &Path, b: &Path) -> anyhow::Result<(Outcome, Outcome)> {
    let (a, b) = (ClusterDir::open(a)?, ClusterDir::open(b)?);
    refuse_pair(&a, &b)?;
    // Both CAs must be usable before either side is touched.
    a.ca()?;
    b.ca()?;
    Ok((add_remote(&a, &b)?, add_remote(&b, &a)?))
}

/// Disconnects two cluster directories; whether each side had the other.
pub(crate) fn disconnect(a: &Path, b: &Path) -> anyhow::Result<(bool, bool)> {
    let (a, b) = (ClusterDir::open(a)?, ClusterDir::open(b)?);
    a.remotes_dir()?;
    b.remotes_dir()?;
    Ok((
        remove_remote(&a, b.name().as_str())?,
        remove_remote(&b, a.name().as_str())?,
    ))
}

/// A Cilium cluster to import from the etcd of its clustermesh-apiserver.
pub(crate) struct CiliumRemote<'a> {
    /// Its name.
    pub(crate) name: &'a str,
    /// Its cluster ID.
    pub(crate) id: u32,
    /// Its etcd's client URL.
    pub(crate) etcd: &'a str,
    /// That etcd's CA.
    pub(crate) ca: &'a Path,
    /// The client certificate and key it hands to its remote users.
    pub(crate) cert: &'a Path,
    /// Its key.
    pub(crate) key: &'a Path,
}

/// The remote file of a Cilium cluster (kind `etcd`).
fn cilium_entry_text(name: &str, id: u32, etcd: &str) -> String {
    format!(
        "# written by clustermesh connect --cilium\nname: {name}\nid: {id}\nkind: etcd\naddress: \"{etcd}\"\nca: {name}-ca.pem\ncert: {name}-client.pem\nkey: {name}-client-key.pem\n"
    )
}

/// Makes the cluster of directory `dir` import the Cilium cluster `remote` from its etcd.
/// Every check runs before anything is written: the name and ID (valid, not this cluster's),
/// the URL (`https://`), the three files (readable PEM).
pub(crate) fn connect_cilium(dir: &Path, remote: &CiliumRemote<'_>) -> anyhow::Result<Outcome> {
    let us = ClusterDir::open(dir)?;
    let name = clustermesh_model::ClusterName::new(remote.name)
        .with_context(|| format!("--cilium {:?}", remote.name))?;
    let mode = us.apiserver.cluster.max_connected_clusters;
    clustermesh_model::cluster::ClusterId::new(remote.id, mode)
        .with_context(|| format!("--cilium-id {}", remote.id))?;
    if &name == us.name() || remote.id == us.apiserver.cluster.id {
        bail!(
            "refusing to connect: {} is cluster {} with ID {}; the Cilium cluster needs another name and ID",
            dir.display(),
            us.name(),
            us.apiserver.cluster.id
        );
    }
    let Some(authority) = remote.etcd.strip_prefix("https://") else {
        bail!(
            "--cilium-etcd {:?}: an https:// URL (a clustermesh-apiserver's etcd requires TLS)",
            remote.etcd
        );
    };
    let authority = authority.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', ' ', '"', '\n']) {
        bail!("--cilium-etcd {:?}: https://HOST:PORT", remote.etcd);
    }
    let read = |what: &str, p: &Path| -> anyhow::Result<String> {
        let text = std::fs::read_to_string(p).with_context(|| format!("{what} {}", p.display()))?;
        if !text.contains("-----BEGIN ") {
            bail!("{what} {}: not a PEM file", p.display());
        }
        Ok(text)
    };
    let (ca, cert, key) = (
        read("--cilium-ca", remote.ca)?,
        read("--cilium-cert", remote.cert)?,
        read("--cilium-key", remote.key)?,
    );
    let remotes = us.remotes_dir()?;
    let file = remotes.join(format!("{name}.yaml"));
    let [ca_file, cert_file, key_file] = files_of(remotes, name.as_str());
    let text = cilium_entry_text(name.as_str(), remote.id, remote.etcd);
    let same = |p: &Path, t: &str| std::fs::read_to_string(p).is_ok_and(|x| x == t);
    if same(&file, &text)
        && same(&ca_file, &ca)
        && same(&cert_file, &cert)
        && same(&key_file, &key)
        && key_is_private(&key_file)
    {
        return Ok(Outcome::Unchanged);
    }
    std::fs::create_dir_all(remotes).with_context(|| format!("creating {}", remotes.display()))?;
    std::fs::write(&ca_file, &ca).with_context(|| format!("writing {}", ca_file.display()))?;
    std::fs::write(&cert_file, &cert)
        .with_context(|| format!("writing {}", cert_file.display()))?;
    write_private(&key_file, &key)?;
    // The remote file last, so that the apiserver never reads it before its certificates.
    write_atomic(&file, &text)?;
    Ok(Outcome::Written)
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
