//! Connecting to an apiserver's Export service over mTLS.

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::v1::export_client::ExportClient;

/// The PEM material a client presents and trusts.
#[derive(Clone)]
pub struct ClientTls {
    /// The CA of the cluster whose apiserver is called.
    pub ca_pem: String,
    /// The client certificate (`remote-<us>` or `local-<cluster>`).
    pub cert_pem: String,
    /// Its key.
    pub key_pem: String,
    /// The name to verify in the server certificate, `apiserver.<cluster>.clustermesh`.
    pub server_name: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The name an apiserver's certificate always carries.
pub fn server_name(cluster: &str) -> String {
    format!("apiserver.{cluster}.clustermesh")
}

/// Connects to `address` (`host:port`).
pub async fn connect(
    address: &str,
    tls: &ClientTls,
) -> Result<ExportClient<Channel>, tonic::transport::Error> {
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca_pem))
        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
        .domain_name(tls.server_name.clone());
    let channel = Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(config)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await?;
    Ok(ExportClient::new(channel).max_decoding_message_size(16 * 1024 * 1024))
}

/// An error with its chain of causes, `outer: inner: ...` (tonic's transport errors say
/// little in their own message: the cause, e.g. "Connection refused", is in the chain).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn the_chain_is_joined_without_repeats() {
        let e = E(
            "transport error",
            Some(Box::new(E(
                "tcp connect error",
                Some(Box::new(E("Connection refused (os error 111)", None))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "transport error: tcp connect error: Connection refused (os error 111)"
        );
    }
}
