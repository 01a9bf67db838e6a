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

const CRASH_CHILD_ENV: &str = "CLUSTERMESH_SLED_CRASH_CHILD";

/// The child of `a_crash_restarts_the_history_so_no_revision_is_reused`: opens the store
/// named by its environment, writes, says how far it got, and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of a_crash_restarts_the_history_so_no_revision_is_reused"]
async fn crash_child_writes_and_waits() {
    let path = std::env::var(CRASH_CHILD_ENV).expect("run by the crash test as its child");
    let mut config = SledConfig::new(path);
    // Nothing is flushed on its own: what the kill takes is every write after the open.
    config.flush_every = std::time::Duration::from_secs(3600);
    let s = SledStore::open(&config).unwrap();
    let mut last = 0;
    for i in 0..200 {
        last = s.put(&format!("t/{i:03}"), b"after", None).await.unwrap();
    }
    println!("written up to {last}");
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_restarts_the_history_so_no_revision_is_reused() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    // A first life, closed cleanly: 10 revisions.
    let config = SledConfig::new(&path);
    {
        let s = SledStore::open(&config).unwrap();
        for i in 0..10 {
            s.put(&format!("t/{i:03}"), b"before", None).await.unwrap();
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let clean = SledStore::open(&config).unwrap();
    assert_eq!(
        clean.current_revision().await.unwrap(),
        10,
        "a clean close keeps the history"
    );
    assert!(clean.list_at("t/", 5).await.is_ok());
    drop(clean);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;

    // A second life, killed with SIGKILL after 200 writes it acknowledged.
    /// Kills the child however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_writes_and_waits",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = Killed(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let acknowledged: i64 = loop {
        let line = lines.next().expect("the child ended early").unwrap();
        // The harness prints the test's name on the same line.
        if let Some((_, rev)) = line.split_once("written up to ") {
            break rev.trim().parse().unwrap();
        }
    };
    assert_eq!(acknowledged, 210);
    child.0.kill().unwrap();
    child.0.wait().unwrap();

    let s = SledStore::open(&config).unwrap();
    let current = s.current_revision().await.unwrap();
    assert!(
        current > acknowledged && current >= 10 + clustermesh_kvstore::embedded::CRASH_GAP,
        "revision {current} after a crash"
    );
    // No reader can resume from any revision it may have seen before the crash.
    for seen in [5, 10, 100, acknowledged] {
        match s.list_at("t/", seen).await {
            Err(Error::Compacted { floor: Some(f), .. }) => assert_eq!(f, current),
            other => panic!("list_at({seen}): expected Compacted, got {other:?}"),
        }
        let mut w = s.watch("t/", seen).await.unwrap();
        assert!(
            matches!(w.next().await, Some(Err(Error::Compacted { .. }))),
            "watch from {seen}"
        );
    }
    // What survived is whole: the first life's 10 keys, then some prefix of the second's
    // writes, each complete.
    let kvs = s.list("t/").await.unwrap().kvs;
    let overwritten = kvs.iter().filter(|kv| kv.value == b"after").count();
    assert_eq!(kvs.len(), overwritten.max(10));
    for (i, kv) in kvs.iter().enumerate() {
        let expected: &[u8] = if i < overwritten { b"after" } else { b"before" };
        assert_eq!(kv.value, expected, "{}", kv.key);
    }
    // A snapshot at the new revision works, and the next write follows it.
    assert!(s.list_at("t/", current).await.is_ok());
    assert_eq!(s.put("t/new", b"v", None).await.unwrap(), current + 1);
    let mut w = s.watch("t/", current).await.unwrap();
    assert_eq!(w.next().await.unwrap().unwrap().revision, current + 1);
}
