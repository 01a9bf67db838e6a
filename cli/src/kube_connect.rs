//! `clustermesh connect --context A --destination-context B`: the kube mode of `connect`, for
//! clusters installed with the Helm chart. For each side it reads the apiserver's
//! configuration (its ConfigMap), its CA with the key (the `clustermesh-ca` Secret) and its
//! Export address (the Export Service's load balancer, or `--address`); runs the same checks
//! as the directory mode before writing anything; then mints each side's `remote-<us>`
//! certificate with the other's CA and writes the remote entry into the other's remotes
//! Secret (`<peer>.yaml`, `<peer>-ca.pem`, `<peer>-client.pem`, `<peer>-client-key.pem`),
//! creating or merging it. A second run finds everything in place and writes nothing.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use clustermesh_certs::{CertificateAuthority, ClientIdentity, IssuedCert};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::connect::{Outcome, PeerInfo, check_pair, entry_text};

/// Where the chart put a cluster's objects.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    /// The namespace of the release.
    pub(crate) namespace: String,
    /// The Helm release name.
    pub(crate) release: String,
    /// The Secret holding `ca.pem` and `ca-key.pem`.
    pub(crate) ca_secret: String,
    /// The remotes Secret the apiserver mounts.
    pub(crate) remotes_secret: String,
    /// The Export address other clusters dial, when the Service does not tell.
    pub(crate) address: Option<String>,
}

/// One side, read from its cluster.
struct Side {
    client: kube::Client,
    placement: Placement,
    config: clustermesh_apiserver::Config,
    ca: CertificateAuthority,
    export: String,
}

fn secret_text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

async fn read_side(client: kube::Client, placement: Placement) -> anyhow::Result<Side> {
    let ns = placement.namespace.as_str();
    let name = format!("{}-clustermesh-apiserver", placement.release);
    let cm: ConfigMap = Api::namespaced(client.clone(), ns)
        .get(&name)
        .await
        .with_context(|| {
            format!(
                "reading ConfigMap {ns}/{name} (is the chart installed as release {:?}?)",
                placement.release
            )
        })?;
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("apiserver.yaml"))
        .with_context(|| format!("ConfigMap {ns}/{name} has no apiserver.yaml"))?;
    let config = clustermesh_apiserver::Config::parse(text, Path::new("/"))
        .with_context(|| format!("the apiserver.yaml of ConfigMap {ns}/{name}"))?;
    let ca_secret: Secret = Api::namespaced(client.clone(), ns)
        .get(&placement.ca_secret)
        .await
        .with_context(|| {
            format!(
                "reading Secret {ns}/{} (the CA with its key: kubectl create secret generic {} --from-file=ca.pem --from-file=ca-key.pem)",
                placement.ca_secret, placement.ca_secret
            )
        })?;
    let (Some(cert_pem), Some(key_pem)) = (
        secret_text(&ca_secret, "ca.pem"),
        secret_text(&ca_secret, "ca-key.pem"),
    ) else {
        bail!(
            "Secret {ns}/{} needs ca.pem and ca-key.pem",
            placement.ca_secret
        );
    };
    let ca = CertificateAuthority::from_pem(IssuedCert { cert_pem, key_pem })
        .with_context(|| format!("the CA in Secret {ns}/{}", placement.ca_secret))?;
    let export = match &placement.address {
        Some(a) => a.clone(),
        None => {
            let svc: Service = Api::namespaced(client.clone(), ns)
                .get(&name)
                .await
                .with_context(|| format!("reading Service {ns}/{name}"))?;
            let port = svc
                .spec
                .as_ref()
                .and_then(|s| s.ports.as_ref())
                .and_then(|p| p.iter().find(|p| p.name.as_deref() == Some("export")))
                .map(|p| p.port)
                .with_context(|| format!("Service {ns}/{name} has no port named export"))?;
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .and_then(|i| i.first())
                .and_then(|i| i.ip.clone().or_else(|| i.hostname.clone()));
            match ingress {
                Some(host) => format!("{host}:{port}"),
                None => bail!(
                    "Service {ns}/{name} has no load balancer address that other clusters can dial; install with apiserver.service.type=LoadBalancer, or pass the address (--address / --destination-address), e.g. a node address and the NodePort"
                ),
            }
        }
    };
    Ok(Side {
        client,
        placement,
        config,
        ca,
        export,
    })
}

fn info(s: &Side) -> PeerInfo<'_> {
    PeerInfo {
        name: &s.config.cluster.name,
        id: s.config.cluster.id,
        mode: s.config.cluster.max_connected_clusters,
        export: &s.export,
        fix_at: "the Export Service's address, or --address".to_owned(),
    }
}

/// Makes `us` import `peer` through `us`'s remotes Secret.
async fn add_remote(us: &Side, peer: &Side) -> anyhow::Result<Outcome> {
    let ns = us.placement.namespace.as_str();
    let secret_name = us.placement.remotes_secret.as_str();
    let api: Api<Secret> = Api::namespaced(us.client.clone(), ns);
    let peer_name = peer.config.cluster.name.as_str();
    let yaml = entry_text(peer_name, peer.config.cluster.id, &peer.export);
    let existing = match api.get(secret_name).await {
        Ok(s) => Some(s),
        Err(e) if not_found(&e) => None,
        Err(e) => return Err(e).with_context(|| format!("reading Secret {ns}/{secret_name}")),
    };
    let (ca_key, cert_key, key_key) = (
        format!("{peer_name}-ca.pem"),
        format!("{peer_name}-client.pem"),
        format!("{peer_name}-client-key.pem"),
    );
    if let Some(s) = &existing
        && secret_text(s, &format!("{peer_name}.yaml")).as_deref() == Some(yaml.as_str())
        && secret_text(s, &ca_key).as_deref() == Some(peer.ca.cert().cert_pem.as_str())
        && secret_text(s, &cert_key).is_some()
        && secret_text(s, &key_key).is_some()
    {
        return Ok(Outcome::Unchanged);
    }
    let client = peer
        .ca
        .client_cert(&ClientIdentity::Remote(us.config.cluster.name.clone()))?;
    let data: BTreeMap<String, ByteString> = [
        (format!("{peer_name}.yaml"), yaml),
        (ca_key, peer.ca.cert().cert_pem.clone()),
        (cert_key, client.cert_pem),
        (key_key, client.key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k, ByteString(v.into_bytes())))
    .collect();
    match existing {
        None => {
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(secret_name.to_owned()),
                    namespace: Some(ns.to_owned()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "clustermesh-connect".to_owned(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            api.create(&PostParams::default(), &secret)
                .await
                .with_context(|| format!("creating Secret {ns}/{secret_name}"))?;
        }
        Some(_) => {
            let patch = serde_json::json!({ "data": data });
            api.patch(secret_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .with_context(|| format!("updating Secret {ns}/{secret_name}"))?;
        }
    }
    Ok(Outcome::Written)
}

/// Connects two clusters through their API servers; what changed on each side.
pub(crate) async fn connect(
    a: (kube::Client, Placement),
    b: (kube::Client, Placement),
) -> anyhow::Result<(Outcome, Outcome)> {
    let a = read_side(a.0, a.1).await?;
    let b = read_side(b.0, b.1).await?;
    check_pair(&info(&a), &info(&b))?;
    Ok((add_remote(&a, &b).await?, add_remote(&b, &a).await?))
}

/// A client for a kubeconfig context.
pub(crate) async fn client_for(context: &str) -> anyhow::Result<kube::Client> {
    let options = kube::config::KubeConfigOptions {
        context: Some(context.to_owned()),
        ..Default::default()
    };
    let config = kube::Config::from_kubeconfig(&options)
        .await
        .with_context(|| format!("loading kubeconfig context {context:?}"))?;
    kube::Client::try_from(config).with_context(|| format!("a client for context {context:?}"))
}

#[cfg(test)]
mod tests;
