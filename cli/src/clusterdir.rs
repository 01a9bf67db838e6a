//! A cluster directory: everything one cluster needs, in one place, so that every subcommand
//! can work from `--dir`:
//!
//! ```text
//! DIR/apiserver.yaml   the apiserver's configuration (remotesDir: remotes)
//! DIR/agent.yaml       the node agent's configuration
//! DIR/certs/           ca.pem ca-key.pem server.pem server-key.pem local.pem local-key.pem
//! DIR/manifests/       the cluster's Kubernetes manifests (the apiserver's source)
//! DIR/remotes/         one <peer>.yaml per connected cluster, with <peer>/ holding the peer's
//!                      CA and our remote-<this> client certificate signed by it
//! DIR/store/           the embedded store
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clustermesh_certs::{CertificateAuthority, ClientIdentity, IssuedCert};
use clustermesh_model::cluster::{ClusterId, ClusterName, MaxConnectedClusters};

/// What `certs init` needs.
pub(crate) struct InitOptions {
    /// The cluster's name.
    pub(crate) name: ClusterName,
    /// Its ID.
    pub(crate) id: u32,
    /// The mesh size.
    pub(crate) mode: MaxConnectedClusters,
    /// The Export address (other clusters dial it).
    pub(crate) export: SocketAddr,
    /// The apiserver's health address.
    pub(crate) health: SocketAddr,
    /// The agent's admin address.
    pub(crate) agent_admin: SocketAddr,
    /// The agent's node name.
    pub(crate) node: String,
    /// The agent's datapath.
    pub(crate) datapath: &'static str,
}

/// An opened cluster directory.
pub(crate) struct ClusterDir {
    /// Its path.
    pub(crate) path: PathBuf,
    /// The apiserver's configuration.
    pub(crate) apiserver: clustermesh_apiserver::Config,
}

/// Writes `text` to `path` atomically (a temporary file, then a rename).
pub(crate) fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("a file name")?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // A new file, never one that is there (a stale one of a killed run is removed first): a
    // symbolic link planted under that name is not followed.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}

impl ClusterDir {
    /// Creates a cluster directory; refuses one that already holds a cluster.
    pub(crate) fn init(path: &Path, o: &InitOptions) -> anyhow::Result<Self> {
        ClusterId::new(o.id, o.mode).with_context(|| {
            format!(
                "cluster ID {} does not fit maxConnectedClusters {}",
                o.id, o.mode
            )
        })?;
        if path.join("apiserver.yaml").exists() {
            bail!(
                "{} already holds a cluster (apiserver.yaml exists); choose another --dir",
                path.display()
            );
        }
        for sub in ["certs", "manifests", "remotes"] {
            std::fs::create_dir_all(path.join(sub))
                .with_context(|| format!("creating {}", path.join(sub).display()))?;
        }
        let certs = path.join("certs");
        let ca = CertificateAuthority::generate(&o.name)?;
        ca.cert().write(&certs, "ca")?;
        let mut sans = vec![o.export.ip().to_string()];
        if !o.export.ip().is_loopback() {
            sans.push("127.0.0.1".into());
        }
        ca.server_cert(&o.name, &sans)?.write(&certs, "server")?;
        ca.client_cert(&ClientIdentity::Local(o.name.clone()))?
            .write(&certs, "local")?;
        std::fs::write(
            path.join("agent.yaml"),
            format!(
                "# clustermesh agent of node {node} (docs/CONFIG.md)\n\
                 cluster: {name}\nnodeName: {node}\n\
                 apiserver: {{address: \"{export}\", ca: certs/ca.pem, cert: certs/local.pem, key: certs/local-key.pem}}\n\
                 datapath: {datapath}\nadmin: \"{admin}\"\n",
                node = o.node,
                name = o.name,
                export = o.export,
                datapath = o.datapath,
                admin = o.agent_admin,
            ),
        )
        .context("writing agent.yaml")?;
        // The apiserver's configuration last: its presence marks a complete directory.
        write_atomic(
            &path.join("apiserver.yaml"),
            &format!(
                "# clustermesh apiserver of cluster {name} (docs/CONFIG.md)\n\
                 cluster: {{name: {name}, id: {id}, maxConnectedClusters: {mode}}}\n\
                 store: {{backend: sled, path: store}}\n\
                 source: {{manifestDir: manifests}}\n\
                 listen: {{export: \"{export}\", health: \"{health}\"}}\n\
                 tls: {{ca: certs/ca.pem, cert: certs/server.pem, key: certs/server-key.pem}}\n\
                 remotesDir: remotes\n",
                name = o.name,
                id = o.id,
                mode = o.mode,
                export = o.export,
                health = o.health,
            ),
        )?;
        Self::open(path)
    }

    /// Opens a cluster directory.
    pub(crate) fn open(path: &Path) -> anyhow::Result<Self> {
        let config = path.join("apiserver.yaml");
        if !config.exists() {
            bail!(
                "{} is not a cluster directory (no apiserver.yaml); create one with `clustermesh certs init`",
                path.display()
            );
        }
        let apiserver = clustermesh_apiserver::Config::load(&config)?;
        Ok(Self {
            path: path.to_owned(),
            apiserver,
        })
    }

    /// The cluster's name.
    pub(crate) fn name(&self) -> &ClusterName {
        &self.apiserver.cluster.name
    }

    /// The apiserver's configuration file.
    pub(crate) fn apiserver_config(&self) -> PathBuf {
        self.path.join("apiserver.yaml")
    }

    /// The agent's configuration file.
    pub(crate) fn agent_config(&self) -> PathBuf {
        self.path.join("agent.yaml")
    }

    /// The agent's admin address, from its configuration.
    pub(crate) fn agent_admin(&self) -> anyhow::Result<String> {
        let config = clustermesh_agent::Config::load(&self.agent_config())?;
        Ok(config.admin)
    }

    /// The CA with its key (to mint certificates for peers).
    pub(crate) fn ca(&self) -> anyhow::Result<CertificateAuthority> {
        let dir = self
            .apiserver
            .tls
            .ca
            .parent()
            .context("the CA file's directory")?;
        let stem = self
            .apiserver
            .tls
            .ca
            .file_stem()
            .and_then(|s| s.to_str())
            .context("the CA file's name")?;
        let cert = IssuedCert::read(dir, stem).with_context(|| {
            format!(
                "reading the CA and its key ({}/{stem}.pem, {stem}-key.pem)",
                dir.display()
            )
        })?;
        Ok(CertificateAuthority::from_pem(cert)?)
    }

    /// The remotes directory.
    pub(crate) fn remotes_dir(&self) -> anyhow::Result<&Path> {
        self.apiserver.remotes_dir.as_deref().with_context(|| {
            format!(
                "{} sets no remotesDir: add `remotesDir: remotes` to connect clusters without a restart",
                self.apiserver_config().display()
            )
        })
    }
}
