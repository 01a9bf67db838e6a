//! Certificates of a cluster (DESIGN section 9): its CA, the apiserver's server certificate
//! with its SANs, and client certificates whose common name says who the client is:
//! `remote-<peer>` for another cluster's sync worker (minted by `connect`), `local-<name>`
//! for this cluster's own agents. Generated with rcgen; read and written as PEM with
//! rustls-pki-types.

#![forbid(unsafe_code)]

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use clustermesh_model::ClusterName;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};

/// How long a CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(10 * 365);
/// How long server and client certificates are valid.
pub const LEAF_VALIDITY: Duration = Duration::days(365);

/// Why a certificate could not be made, read or understood.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused to build or sign.
    #[error("generating the {what} failed")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// A PEM file that holds no certificate or key, or a broken one.
    #[error("{path} holds no valid {what} in PEM form")]
    Pem {
        /// The file (or "<memory>").
        path: String,
        /// What was expected.
        what: &'static str,
    },
    /// Reading or writing a file failed.
    #[error("{what} {path} failed")]
    Io {
        /// The operation.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A client certificate whose common name is not `remote-<cluster>` or `local-<cluster>`.
    #[error("client certificate common name {0:?} is not remote-<cluster> or local-<cluster>")]
    UnknownClient(String),
    /// A certificate that does not parse as X.509.
    #[error("client certificate is not valid X.509: {0}")]
    X509(String),
}

/// The result of certificate operations.
pub type Result<T, E = CertError> = std::result::Result<T, E>;

// === impl ClientIdentity ===

/// Who a client certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientIdentity {
    /// The sync worker of another cluster: `remote-<its name>`; read-only, exportable kinds.
    Remote(ClusterName),
    /// An agent (or operator tool) of this cluster: `local-<this cluster>`; everything.
    Local(ClusterName),
}

impl ClientIdentity {
    /// The certificate's common name.
    pub fn common_name(&self) -> String {
        self.to_string()
    }

    /// Reads the identity from a DER certificate's subject common name.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| CertError::X509(e.to_string()))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| CertError::UnknownClient(String::new()))?;
        cn.parse()
    }
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Remote(c) => write!(f, "remote-{c}"),
            Self::Local(c) => write!(f, "local-{c}"),
        }
    }
}

impl FromStr for ClientIdentity {
    type Err = CertError;
    fn from_str(cn: &str) -> Result<Self> {
        let unknown = || CertError::UnknownClient(cn.to_owned());
        if let Some(name) = cn.strip_prefix("remote-") {
            return ClusterName::new(name)
                .map(Self::Remote)
                .map_err(|_| unknown());
        }
        if let Some(name) = cn.strip_prefix("local-") {
            return ClusterName::new(name)
                .map(Self::Local)
                .map_err(|_| unknown());
        }
        Err(unknown())
    }
}

// === impl CertificateAuthority ===

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes `<dir>/<name>.pem` and `<dir>/<name>-key.pem` (the key readable by the owner
    /// only).
    pub fn write(&self, dir: &Path, name: &str) -> Result<()> {
        write_file(&dir.join(format!("{name}.pem")), &self.cert_pem, 0o644)?;
        write_file(&dir.join(format!("{name}-key.pem")), &self.key_pem, 0o600)
    }

    /// Reads what [`IssuedCert::write`] wrote.
    pub fn read(dir: &Path, name: &str) -> Result<Self> {
        Ok(Self {
            cert_pem: read_file(&dir.join(format!("{name}.pem")))?,
            key_pem: read_file(&dir.join(format!("{name}-key.pem")))?,
        })
    }

    /// The certificate chain, for rustls.
    pub fn cert_chain(&self) -> Result<Vec<CertificateDer<'static>>> {
        parse_certs(&self.cert_pem, "<memory>")
    }

    /// The private key, for rustls.
    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|_| CertError::Pem {
            path: "<memory>".into(),
            what: "private key",
        })
    }
}

/// A cluster's certificate authority.
pub struct CertificateAuthority {
    cert: IssuedCert,
    issuer: Issuer<'static, KeyPair>,
}

fn generate_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> CertError {
    move |source| CertError::Generate { what, source }
}

fn validity(params: &mut CertificateParams, length: Duration) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that are a little behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + length;
}

impl CertificateAuthority {
    /// A new CA for `cluster` (common name `clustermesh-ca-<cluster>`).
    pub fn generate(cluster: &ClusterName) -> Result<Self> {
        let key = KeyPair::generate().map_err(generate_err("CA key"))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(generate_err("CA"))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("clustermesh-ca-{cluster}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(generate_err("CA"))?;
        let issued = IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Self {
            cert: issued,
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its PEM certificate and key.
    pub fn from_pem(cert: IssuedCert) -> Result<Self> {
        let key = KeyPair::from_pem(&cert.key_pem).map_err(|_| CertError::Pem {
            path: "<ca key>".into(),
            what: "private key",
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert.cert_pem, key).map_err(|_| CertError::Pem {
            path: "<ca cert>".into(),
            what: "CA certificate",
        })?;
        Ok(Self { cert, issuer })
    }

    /// The CA's certificate and key.
    pub fn cert(&self) -> &IssuedCert {
        &self.cert
    }

    fn leaf(
        &self,
        what: &'static str,
        cn: &str,
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<IssuedCert> {
        let key = KeyPair::generate().map_err(generate_err(what))?;
        let mut params = CertificateParams::new(sans).map_err(generate_err(what))?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, LEAF_VALIDITY);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate_err(what))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The apiserver's server certificate: common name `apiserver.<cluster>`, one SAN per
    /// address or DNS name clients use (IPs become IP SANs).
    pub fn server_cert(&self, cluster: &ClusterName, sans: &[String]) -> Result<IssuedCert> {
        let mut names = sans.to_vec();
        names.push(server_name(cluster));
        self.leaf(
            "server certificate",
            &format!("apiserver.{cluster}"),
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate for `who`.
    pub fn client_cert(&self, who: &ClientIdentity) -> Result<IssuedCert> {
        self.leaf(
            "client certificate",
            &who.common_name(),
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// The DNS name every apiserver certificate carries, which clients verify:
/// `apiserver.<cluster>.clustermesh`.
pub fn server_name(cluster: &ClusterName) -> String {
    format!("apiserver.{cluster}.clustermesh")
}

// === PEM files ===

/// Every certificate in a PEM text.
pub fn parse_certs(pem: &str, path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| CertError::Pem {
            path: path.into(),
            what: "certificate",
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            path: path.into(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Reads a UTF-8 file.
pub fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        what: "reading",
        path: path.display().to_string(),
        source,
    })
}

/// Writes a file with exactly `mode`, atomically: a temporary file created with that mode in
/// the same directory, then a rename. A key that was once world-readable is replaced by a
/// 0600 file, never truncated in place.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| CertError::Io {
        what: "writing",
        path: path.display().to_string(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    std::io::Write::write_all(&mut f, contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    #[test]
    fn client_identity_is_in_the_common_name() {
        let ca = CertificateAuthority::generate(&c("c1")).unwrap();
        for who in [
            ClientIdentity::Remote(c("c2")),
            ClientIdentity::Local(c("c1")),
        ] {
            let cert = ca.client_cert(&who).unwrap();
            let der = cert.cert_chain().unwrap();
            assert_eq!(ClientIdentity::from_der(&der[0]).unwrap(), who);
        }
        let server = ca.server_cert(&c("c1"), &["127.0.0.1".into()]).unwrap();
        let der = server.cert_chain().unwrap();
        assert!(
            matches!(ClientIdentity::from_der(&der[0]), Err(CertError::UnknownClient(cn)) if cn == "apiserver.c1")
        );
    }

    #[test]
    fn identity_names_are_validated() {
        assert_eq!(
            "remote-c2".parse::<ClientIdentity>().unwrap(),
            ClientIdentity::Remote(c("c2"))
        );
        for bad in ["remote-", "remote-Bad", "local-default", "admin", "c2"] {
            assert!(bad.parse::<ClientIdentity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_ca_survives_pem_and_still_signs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate(&c("c1")).unwrap();
        ca.cert().write(dir.path(), "ca").unwrap();
        let again =
            CertificateAuthority::from_pem(IssuedCert::read(dir.path(), "ca").unwrap()).unwrap();
        let cert = again.client_cert(&ClientIdentity::Local(c("c1"))).unwrap();
        assert!(cert.private_key().is_ok());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("ca-key.pem"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            parse_certs("garbage", "x.pem"),
            Err(CertError::Pem { .. })
        ));
        assert!(matches!(
            IssuedCert::read(dir.path(), "missing"),
            Err(CertError::Io { .. })
        ));
    }
}
