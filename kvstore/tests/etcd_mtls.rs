//! The etcd backend against a real etcd: over mutual TLS (the server requires client
//! certificates), and the request deadline.

use clustermesh_kvstore::etcd::{EtcdStore, EtcdTls};
use clustermesh_kvstore::testing::{EtcdServer, TlsFiles};
use clustermesh_kvstore::{Error, KvStore};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

/// A CA, a server certificate for 127.0.0.1, a client certificate, and a second client
/// certificate from a CA the server does not trust.
fn write_certs(dir: &std::path::Path) -> anyhow::Result<(TlsFiles, EtcdTls)> {
    let ca = |name: &str| -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
    };
    let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>,
                sans: &[&str],
                name: &str|
     -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        Ok((params.signed_by(&key, issuer)?.pem(), key.serialize_pem()))
    };
    let write = |name: &str, pem: &str| -> anyhow::Result<std::path::PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, pem)?;
        Ok(path)
    };
    let trusted = ca("etcd-test-ca")?;
    let stranger = ca("someone-else")?;
    let (server_cert, server_key) = leaf(&trusted, &["127.0.0.1", "localhost"], "etcd")?;
    let (client_cert, client_key) = leaf(&trusted, &[], "clustermesh")?;
    let (bad_cert, bad_key) = leaf(&stranger, &[], "intruder")?;
    let files = TlsFiles {
        ca: write("ca.pem", &trusted.pem())?,
        server_cert: write("server.pem", &server_cert)?,
        server_key: write("server-key.pem", &server_key)?,
        client_cert: write("client.pem", &client_cert)?,
        client_key: write("client-key.pem", &client_key)?,
    };
    let untrusted = EtcdTls {
        ca: files.ca.clone(),
        cert: write("bad.pem", &bad_cert)?,
        key: write("bad-key.pem", &bad_key)?,
    };
    Ok((files, untrusted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_store_works_and_untrusted_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (files, untrusted) = write_certs(dir.path()).unwrap();
    let server = EtcdServer::start_with_tls(files).await;
    assert!(server.endpoint().starts_with("https://127.0.0.1:"));

    let store = server.store().await;
    let rev = store.put("tls/a", b"secret", None).await.unwrap();
    assert_eq!(store.get("tls/a").await.unwrap().unwrap().mod_revision, rev);

    let mut bad = server.config();
    bad.tls = Some(untrusted);
    assert!(matches!(
        EtcdStore::connect(&bad).await,
        Err(Error::EtcdConnect { .. })
    ));

    let mut plain = server.config();
    plain.tls = None;
    plain.endpoints = vec![server.endpoint().replace("https://", "http://")];
    assert!(EtcdStore::connect(&plain).await.is_err());
}

#[tokio::test]
async fn missing_tls_files_are_a_clear_error() {
    let mut config = clustermesh_kvstore::etcd::EtcdConfig::new(["https://127.0.0.1:1"]);
    config.tls = Some(EtcdTls {
        ca: "/nonexistent/ca.pem".into(),
        cert: "/nonexistent/c.pem".into(),
        key: "/nonexistent/k.pem".into(),
    });
    match EtcdStore::connect(&config).await {
        Err(Error::TlsFile { path, .. }) => assert_eq!(path, "/nonexistent/ca.pem"),
        other => panic!("expected TlsFile, got {:?}", other.err()),
    }
}

/// The request deadline bounds how long a request may wait, not how long a watch or a lease
/// keep-alive stream lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_deadline_does_not_end_watches_or_leases() {
    use futures::StreamExt;
    let etcd = EtcdServer::start().await;
    let mut config = etcd.config();
    config.request_timeout = std::time::Duration::from_secs(1);
    let store = EtcdStore::connect(&config).await.unwrap();
    let lease = store
        .grant_lease(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let mut watch = store.watch("w/", 0).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    store.keep_alive(lease).await.unwrap();
    let rev = store.put("w/a", b"v", Some(lease)).await.unwrap();
    let event = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
        .await
        .expect("the watch still delivers after the deadline")
        .unwrap()
        .unwrap();
    assert_eq!((event.key.as_str(), event.revision), ("w/a", rev));
}

/// `list_page`: a prefix read a page at a time, every page at the revision of the first, so
/// that a reader holds one page of a large (or hostile) store at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_is_read_a_page_at_a_time_at_one_revision() {
    let server = EtcdServer::start().await;
    let store = server.store().await;
    for i in 0..5 {
        store.put(&format!("p/{i}"), b"v", None).await.unwrap();
    }
    store.put("q/0", b"outside", None).await.unwrap();
    let (first, rev, more) = store.list_page("p/", None, None, 2).await.unwrap();
    assert!(more);
    // A write after the first page is not seen by the later ones.
    store.put("p/9", b"late", None).await.unwrap();
    let mut keys: Vec<String> = first.iter().map(|kv| kv.key.clone()).collect();
    let mut after = keys.last().cloned();
    loop {
        let (page, r, more) = store
            .list_page("p/", after.as_deref(), Some(rev), 2)
            .await
            .unwrap();
        assert_eq!(r, rev);
        assert!(page.len() <= 2);
        keys.extend(page.iter().map(|kv| kv.key.clone()));
        after = page.last().map(|kv| kv.key.clone());
        if !more {
            break;
        }
    }
    assert_eq!(keys, ["p/0", "p/1", "p/2", "p/3", "p/4"]);
}
