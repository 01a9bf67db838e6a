//! Behaviours of the embedded store alone (its retention setting and file lock).

use clustermesh_kvstore::embedded::{SledConfig, SledStore};
use clustermesh_kvstore::{Error, KvStore};
use futures::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_retention_sets_the_compaction_floor() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SledConfig::new(dir.path().join("store"));
    config.log_retention = 10;
    let s = SledStore::open(&config).unwrap();
    let mut revs = Vec::new();
    for i in 0..25 {
        revs.push(s.put(&format!("t/{i}"), b"v", None).await.unwrap());
    }
    // The last 10 revisions (16..=25) are kept.
    let floor = revs[15];
    assert!(s.list_at("t/", floor).await.is_ok());
    match s.list_at("t/", floor - 1).await {
        Err(Error::Compacted { floor: Some(f), .. }) => assert_eq!(f, floor),
        other => panic!("expected Compacted, got {other:?}"),
    }
    let mut w = s.watch("t/", floor - 1).await.unwrap();
    assert_eq!(w.next().await.unwrap().unwrap().revision, floor);
    let mut old = s.watch("t/", floor - 2).await.unwrap();
    assert!(matches!(
        old.next().await,
        Some(Err(Error::Compacted { .. }))
    ));
    // The floor survives a restart.
    drop((s, w, old));
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let s = SledStore::open(&config).unwrap();
    assert!(matches!(
        s.list_at("t/", floor - 1).await,
        Err(Error::Compacted { .. })
    ));
    assert_eq!(s.list_at("t/", floor).await.unwrap().kvs.len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_open_cannot_be_opened_twice() {
    let dir = tempfile::tempdir().unwrap();
    let config = SledConfig::new(dir.path().join("store"));
    let _s = SledStore::open(&config).unwrap();
    match SledStore::open(&config) {
        Err(Error::SledOpen { path, .. }) => assert!(path.ends_with("store")),
        other => panic!("expected SledOpen, got {:?}", other.err()),
    }
}
