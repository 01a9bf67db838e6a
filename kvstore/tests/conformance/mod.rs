//! The kvstore conformance suite: every behaviour of the contract, written once, run against
//! both backends by `conformance_sled.rs` and `conformance_etcd.rs` through
//! [`conformance_tests!`].

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses the suite through the macro"
)]
#![allow(
    clippy::unwrap_used,
    reason = "the suite is test code: a panic is the failure report"
)]

use std::collections::BTreeSet;
use std::time::Duration;

use clustermesh_kvstore::{
    CasOutcome, CreateOutcome, Error, Event, EventKind, KvStore, Revision, WatchStream, Write,
};
use futures::StreamExt;

/// A store under test that can also be restarted (process or reopen) keeping its data.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + Sized {
    /// The store type.
    type Store: KvStore + Clone + 'static;
    /// A fresh, empty store.
    async fn start() -> Self;
    /// A handle on the store.
    fn store(&self) -> Self::Store;
    /// Stops the store and opens it again on the same data.
    async fn restart(&mut self);
}

/// Generates one `#[tokio::test]` per behaviour for a backend.
#[macro_export]
macro_rules! conformance_tests {
    ($backend:ty) => {
        $crate::conformance_tests!(@each $backend;
            put_then_get_returns_value_and_revisions,
            get_of_a_missing_key_is_none,
            revisions_strictly_increase_across_every_kind_of_write,
            overwrite_bumps_version_and_keeps_create_revision,
            delete_removes_the_key_and_uses_a_revision,
            delete_of_a_missing_key_uses_no_revision,
            empty_keys_are_refused,
            apply_writes_everything_at_one_revision,
            apply_that_changes_nothing_uses_no_revision,
            apply_refuses_duplicates_and_oversize_and_writes_nothing,
            apply_detaches_a_leased_key_it_rewrites,
            list_returns_sorted_keys_under_the_prefix_only,
            list_revision_is_the_current_revision,
            list_at_an_old_revision_shows_the_past,
            list_at_a_future_revision_fails,
            create_writes_only_when_absent,
            concurrent_creates_have_exactly_one_winner,
            compare_and_swap_succeeds_on_the_expected_revision,
            compare_and_swap_conflict_writes_nothing,
            compare_and_swap_with_zero_requires_absence,
            compare_and_delete_only_on_the_expected_revision,
            watch_replays_history_after_the_revision,
            watch_follows_live_changes_in_order,
            watch_sees_only_its_prefix,
            watch_delivers_deletes,
            watch_resumed_from_last_revision_has_no_gap,
            concurrent_writers_and_watchers_see_no_gap_or_duplicate,
            slow_watcher_loses_nothing,
            expired_lease_deletes_its_keys_with_delete_events,
            keep_alive_keeps_keys,
            revoke_deletes_keys_at_once,
            put_with_an_unknown_lease_fails,
            keep_alive_of_a_revoked_lease_fails,
            rewriting_a_key_without_lease_detaches_it,
            lease_keys_still_expire_after_a_restart,
            compaction_fails_old_watches_with_compacted,
            compaction_fails_old_listings_with_compacted,
            watch_from_the_compaction_floor_still_works,
            compacting_twice_to_the_same_revision_fails,
            large_values_round_trip,
            many_keys_list_completely,
            restart_keeps_data_and_revisions_keep_increasing,
            watch_replays_across_a_restart,
        );
    };
    (@each $backend:ty; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let mut backend = <$backend as $crate::conformance::Backend>::start().await;
                $crate::conformance::$name(&mut backend).await;
            }
        )*
    };
}

const WAIT: Duration = Duration::from_secs(10);

/// The next event of a watch, failing the test after 10 s.
async fn next(w: &mut WatchStream) -> Event {
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(e))) => e,
        Ok(Some(Err(e))) => panic!("watch failed: {e:?}"),
        Ok(None) => panic!("watch ended"),
        Err(_) => panic!("no watch event within {WAIT:?}"),
    }
}

/// The next `n` events.
async fn take(w: &mut WatchStream, n: usize) -> Vec<Event> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next(w).await);
    }
    out
}

/// Asserts that nothing arrives for a short while.
async fn assert_quiet(w: &mut WatchStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        panic!("expected no event, got {item:?}");
    }
}

fn put(key: &str, value: &str, revision: Revision) -> Event {
    Event {
        kind: EventKind::Put,
        key: key.into(),
        value: value.as_bytes().to_vec(),
        revision,
    }
}

fn del(key: &str, revision: Revision) -> Event {
    Event {
        kind: EventKind::Delete,
        key: key.into(),
        value: Vec::new(),
        revision,
    }
}

fn keys(kvs: &[clustermesh_kvstore::KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

// === basic reads and writes ===

pub async fn put_then_get_returns_value_and_revisions<B: Backend>(b: &mut B) {
    let s = b.store();
    let rev = s.put("t/a", b"1", None).await.unwrap();
    let kv = s.get("t/a").await.unwrap().unwrap();
    assert_eq!(kv.key, "t/a");
    assert_eq!(kv.value, b"1");
    assert_eq!(
        (kv.create_revision, kv.mod_revision, kv.version, kv.lease),
        (rev, rev, 1, None)
    );
    assert_eq!(s.current_revision().await.unwrap(), rev);
}

pub async fn get_of_a_missing_key_is_none<B: Backend>(b: &mut B) {
    let s = b.store();
    s.put("t/a", b"1", None).await.unwrap();
    assert_eq!(s.get("t/b").await.unwrap(), None);
    assert_eq!(s.get("t/").await.unwrap(), None);
}

pub async fn revisions_strictly_increase_across_every_kind_of_write<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let CreateOutcome::Created { revision: r2 } = s.create("t/b", b"1", None).await.unwrap() else {
        panic!("t/b was absent")
    };
    let CasOutcome::Done { revision: r3 } =
        s.compare_and_swap("t/a", r1, b"2", None).await.unwrap()
    else {
        panic!("t/a was at {r1}")
    };
    let r4 = s.delete("t/b").await.unwrap().unwrap();
    let CasOutcome::Done { revision: r5 } = s.compare_and_delete("t/a", r3).await.unwrap() else {
        panic!("t/a was at {r3}")
    };
    assert!(
        r1 < r2 && r2 < r3 && r3 < r4 && r4 < r5,
        "{r1} {r2} {r3} {r4} {r5}"
    );
}

pub async fn overwrite_bumps_version_and_keeps_create_revision<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let r2 = s.put("t/a", b"2", None).await.unwrap();
    let r3 = s.put("t/a", b"3", None).await.unwrap();
    let kv = s.get("t/a").await.unwrap().unwrap();
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (&b"3"[..], r1, r3, 3)
    );
    assert!(r1 < r2 && r2 < r3);
    // Deleting and re-creating starts a new life of the key.
    s.delete("t/a").await.unwrap();
    let r5 = s.put("t/a", b"4", None).await.unwrap();
    let kv = s.get("t/a").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (r5, 1));
}

pub async fn delete_removes_the_key_and_uses_a_revision<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let r2 = s.delete("t/a").await.unwrap();
    assert_eq!(r2, Some(r1 + 1));
    assert_eq!(s.get("t/a").await.unwrap(), None);
    assert_eq!(s.current_revision().await.unwrap(), r1 + 1);
}

pub async fn delete_of_a_missing_key_uses_no_revision<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    assert_eq!(s.delete("t/missing").await.unwrap(), None);
    assert_eq!(s.current_revision().await.unwrap(), r1);
}

pub async fn empty_keys_are_refused<B: Backend>(b: &mut B) {
    let s = b.store();
    let before = s.current_revision().await.unwrap();
    assert!(matches!(s.put("", b"1", None).await, Err(Error::EmptyKey)));
    assert!(matches!(
        s.create("", b"1", None).await,
        Err(Error::EmptyKey)
    ));
    assert!(matches!(
        s.compare_and_swap("", 0, b"1", None).await,
        Err(Error::EmptyKey)
    ));
    assert_eq!(s.current_revision().await.unwrap(), before);
}

// === transactions ===

fn wput(key: &str, value: &str) -> Write {
    Write::Put {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    }
}

fn wdel(key: &str) -> Write {
    Write::Delete { key: key.into() }
}

pub async fn apply_writes_everything_at_one_revision<B: Backend>(b: &mut B) {
    let s = b.store();
    let r0 = s.put("t/old", b"0", None).await.unwrap();
    s.put("t/keep", b"k", None).await.unwrap();
    let mut w = s.watch("t/", r0 + 1).await.unwrap();
    let r = s
        .apply(&[
            wput("t/a", "1"),
            wput("t/keep", "k2"),
            wdel("t/old"),
            wdel("t/never"),
        ])
        .await
        .unwrap();
    assert_eq!(r, Some(r0 + 2));
    assert_eq!(s.current_revision().await.unwrap(), r0 + 2);
    let mut events = take(&mut w, 3).await;
    events.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(
        events,
        vec![
            put("t/a", "1", r0 + 2),
            put("t/keep", "k2", r0 + 2),
            del("t/old", r0 + 2)
        ]
    );
    assert_quiet(&mut w).await;
    let listing = s.list("t/").await.unwrap();
    assert_eq!(keys(&listing.kvs), vec!["t/a", "t/keep"]);
    assert_eq!(listing.kvs[1].version, 2);
}

pub async fn apply_that_changes_nothing_uses_no_revision<B: Backend>(b: &mut B) {
    let s = b.store();
    let r = s.put("t/a", b"1", None).await.unwrap();
    assert_eq!(s.apply(&[]).await.unwrap(), None);
    assert_eq!(s.apply(&[wdel("t/x"), wdel("t/y")]).await.unwrap(), None);
    assert_eq!(s.current_revision().await.unwrap(), r);
}

pub async fn apply_refuses_duplicates_and_oversize_and_writes_nothing<B: Backend>(b: &mut B) {
    let s = b.store();
    let r = s.put("t/a", b"1", None).await.unwrap();
    assert!(matches!(
        s.apply(&[wput("t/b", "1"), wdel("t/b")]).await,
        Err(Error::DuplicateKey(k)) if k == "t/b"
    ));
    assert!(matches!(
        s.apply(&[wput("t/b", "1"), wput("", "2")]).await,
        Err(Error::EmptyKey)
    ));
    let limits = s.txn_limits();
    if limits.max_ops < 100_000 {
        let too_many: Vec<Write> = (0..=limits.max_ops)
            .map(|i| wput(&format!("t/n{i}"), "v"))
            .collect();
        assert!(matches!(
            s.apply(&too_many).await,
            Err(Error::TxnTooLarge { writes, .. }) if writes == limits.max_ops + 1
        ));
        // What fits goes in one revision.
        let fits = &too_many[..limits.max_ops];
        assert_eq!(s.apply(fits).await.unwrap(), Some(r + 1));
        assert_eq!(s.list("t/n").await.unwrap().kvs.len(), limits.max_ops);
    } else {
        assert_eq!(s.current_revision().await.unwrap(), r);
    }
    assert_eq!(s.get("t/b").await.unwrap(), None);
}

pub async fn apply_detaches_a_leased_key_it_rewrites<B: Backend>(b: &mut B) {
    let s = b.store();
    let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    s.put("t/a", b"1", Some(lease)).await.unwrap();
    s.apply(&[wput("t/a", "2")]).await.unwrap();
    assert_eq!(s.get("t/a").await.unwrap().unwrap().lease, None);
    s.revoke_lease(lease).await.unwrap();
    assert_eq!(s.get("t/a").await.unwrap().unwrap().value, b"2");
}

// === listings ===

pub async fn list_returns_sorted_keys_under_the_prefix_only<B: Backend>(b: &mut B) {
    let s = b.store();
    for k in ["p/b", "p/a", "p/c/d", "p", "pa/x", "q/a", "o/z"] {
        s.put(k, k.as_bytes(), None).await.unwrap();
    }
    let l = s.list("p/").await.unwrap();
    assert_eq!(keys(&l.kvs), ["p/a", "p/b", "p/c/d"]);
    assert_eq!(l.kvs[0].value, b"p/a");
    assert_eq!(
        keys(&s.list("p").await.unwrap().kvs),
        ["p", "p/a", "p/b", "p/c/d", "pa/x"]
    );
    assert!(s.list("nothing/").await.unwrap().kvs.is_empty());
}

pub async fn list_revision_is_the_current_revision<B: Backend>(b: &mut B) {
    let s = b.store();
    s.put("t/a", b"1", None).await.unwrap();
    let r = s.put("u/a", b"1", None).await.unwrap();
    assert_eq!(s.list("t/").await.unwrap().revision, r);
}

pub async fn list_at_an_old_revision_shows_the_past<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let r2 = s.put("t/b", b"1", None).await.unwrap();
    let r3 = s.put("t/a", b"2", None).await.unwrap();
    let r4 = s.delete("t/b").await.unwrap().unwrap();
    s.put("t/c", b"1", None).await.unwrap();
    let at = |r| {
        let s = s.clone();
        async move {
            let l = s.list_at("t/", r).await.unwrap();
            assert_eq!(l.revision, r);
            l.kvs
                .into_iter()
                .map(|kv| (kv.key, kv.value, kv.mod_revision))
                .collect::<Vec<_>>()
        }
    };
    let kv = |k: &str, v: &[u8], r| (k.to_owned(), v.to_vec(), r);
    assert_eq!(at(r1).await, [kv("t/a", b"1", r1)]);
    assert_eq!(at(r2).await, [kv("t/a", b"1", r1), kv("t/b", b"1", r2)]);
    assert_eq!(at(r3).await, [kv("t/a", b"2", r3), kv("t/b", b"1", r2)]);
    assert_eq!(at(r4).await, [kv("t/a", b"2", r3)]);
}

pub async fn list_at_a_future_revision_fails<B: Backend>(b: &mut B) {
    let s = b.store();
    let r = s.put("t/a", b"1", None).await.unwrap();
    match s.list_at("t/", r + 10).await {
        Err(Error::FutureRevision { requested, current }) => {
            assert_eq!((requested, current), (r + 10, r))
        }
        other => panic!("expected FutureRevision, got {other:?}"),
    }
}

// === create and compare-and-swap ===

pub async fn create_writes_only_when_absent<B: Backend>(b: &mut B) {
    let s = b.store();
    let CreateOutcome::Created { revision } = s.create("t/a", b"first", None).await.unwrap() else {
        panic!("t/a was absent")
    };
    match s.create("t/a", b"second", None).await.unwrap() {
        CreateOutcome::Exists { current } => {
            assert_eq!(
                (current.value.as_slice(), current.mod_revision),
                (&b"first"[..], revision)
            );
        }
        other => panic!("expected Exists, got {other:?}"),
    }
    assert_eq!(s.current_revision().await.unwrap(), revision);
}

pub async fn concurrent_creates_have_exactly_one_winner<B: Backend>(b: &mut B) {
    let s = b.store();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            (
                i,
                s.create("t/lock", format!("{i}").as_bytes(), None)
                    .await
                    .unwrap(),
            )
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        if let (i, CreateOutcome::Created { .. }) = t.await.unwrap() {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let kv = s.get("t/lock").await.unwrap().unwrap();
    assert_eq!(kv.value, format!("{}", winners[0]).as_bytes());
    assert_eq!(kv.version, 1);
}

pub async fn compare_and_swap_succeeds_on_the_expected_revision<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let CasOutcome::Done { revision } = s.compare_and_swap("t/a", r1, b"2", None).await.unwrap()
    else {
        panic!("t/a was at {r1}")
    };
    let kv = s.get("t/a").await.unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.mod_revision, kv.version),
        (&b"2"[..], revision, 2)
    );
}

pub async fn compare_and_swap_conflict_writes_nothing<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let r2 = s.put("t/a", b"2", None).await.unwrap();
    match s.compare_and_swap("t/a", r1, b"3", None).await.unwrap() {
        CasOutcome::Conflict { current: Some(kv) } => {
            assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"2"[..], r2));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(s.current_revision().await.unwrap(), r2);
    assert_eq!(
        s.compare_and_swap("t/missing", r1, b"3", None)
            .await
            .unwrap(),
        CasOutcome::Conflict { current: None }
    );
}

pub async fn compare_and_swap_with_zero_requires_absence<B: Backend>(b: &mut B) {
    let s = b.store();
    assert!(matches!(
        s.compare_and_swap("t/a", 0, b"1", None).await.unwrap(),
        CasOutcome::Done { .. }
    ));
    assert!(matches!(
        s.compare_and_swap("t/a", 0, b"2", None).await.unwrap(),
        CasOutcome::Conflict { current: Some(_) }
    ));
    assert_eq!(s.get("t/a").await.unwrap().unwrap().value, b"1");
}

pub async fn compare_and_delete_only_on_the_expected_revision<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let r2 = s.put("t/a", b"2", None).await.unwrap();
    assert!(matches!(
        s.compare_and_delete("t/a", r1).await.unwrap(),
        CasOutcome::Conflict { current: Some(kv) } if kv.mod_revision == r2
    ));
    assert!(s.get("t/a").await.unwrap().is_some());
    assert!(matches!(
        s.compare_and_delete("t/a", r2).await.unwrap(),
        CasOutcome::Done { .. }
    ));
    assert_eq!(s.get("t/a").await.unwrap(), None);
    assert_eq!(
        s.compare_and_delete("t/a", 0).await.unwrap(),
        CasOutcome::Conflict { current: None }
    );
}

// === watches ===

pub async fn watch_replays_history_after_the_revision<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let r2 = s.put("t/b", b"1", None).await.unwrap();
    let r3 = s.put("t/a", b"2", None).await.unwrap();
    let r4 = s.delete("t/b").await.unwrap().unwrap();
    let mut w = s.watch("t/", r1).await.unwrap();
    assert_eq!(
        take(&mut w, 3).await,
        [put("t/b", "1", r2), put("t/a", "2", r3), del("t/b", r4)]
    );
    assert_quiet(&mut w).await;
    let mut all = s.watch("t/", r1 - 1).await.unwrap();
    assert_eq!(next(&mut all).await, put("t/a", "1", r1));
}

pub async fn watch_follows_live_changes_in_order<B: Backend>(b: &mut B) {
    let s = b.store();
    let start = s.current_revision().await.unwrap();
    let mut w = s.watch("t/", start).await.unwrap();
    let mut want = Vec::new();
    for i in 0..50 {
        let v = format!("{i}");
        let r = s
            .put(&format!("t/{}", i % 7), v.as_bytes(), None)
            .await
            .unwrap();
        want.push(put(&format!("t/{}", i % 7), &v, r));
    }
    assert_eq!(take(&mut w, 50).await, want);
}

pub async fn watch_sees_only_its_prefix<B: Backend>(b: &mut B) {
    let s = b.store();
    let start = s.current_revision().await.unwrap();
    let mut w = s.watch("cilium/cache/nodes/v1/c1/", start).await.unwrap();
    s.put("cilium/cache/nodes/v1/c10/n", b"x", None)
        .await
        .unwrap();
    s.put("cilium/cache/nodes/v1/c2/n", b"x", None)
        .await
        .unwrap();
    let r = s
        .put("cilium/cache/nodes/v1/c1/n", b"y", None)
        .await
        .unwrap();
    assert_eq!(
        next(&mut w).await,
        put("cilium/cache/nodes/v1/c1/n", "y", r)
    );
    assert_quiet(&mut w).await;
}

pub async fn watch_delivers_deletes<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let mut w = s.watch("t/", r1).await.unwrap();
    let r2 = s.delete("t/a").await.unwrap().unwrap();
    assert_eq!(next(&mut w).await, del("t/a", r2));
}

pub async fn watch_resumed_from_last_revision_has_no_gap<B: Backend>(b: &mut B) {
    let s = b.store();
    let start = s.current_revision().await.unwrap();
    let mut revs = Vec::new();
    for i in 0..20 {
        revs.push(s.put(&format!("t/{i}"), b"v", None).await.unwrap());
    }
    let mut w = s.watch("t/", start).await.unwrap();
    let first = take(&mut w, 8).await;
    drop(w);
    for i in 20..30 {
        revs.push(s.put(&format!("t/{i}"), b"v", None).await.unwrap());
    }
    let last = first.last().unwrap().revision;
    let mut w = s.watch("t/", last).await.unwrap();
    let rest = take(&mut w, 22).await;
    let seen: Vec<Revision> = first.iter().chain(&rest).map(|e| e.revision).collect();
    assert_eq!(seen, revs);
    assert_quiet(&mut w).await;
}

pub async fn concurrent_writers_and_watchers_see_no_gap_or_duplicate<B: Backend>(b: &mut B) {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 150;
    let s = b.store();
    let start = s.current_revision().await.unwrap();
    let mut live = Vec::new();
    for _ in 0..3 {
        live.push(s.watch("t/", start).await.unwrap());
    }
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..PER_WRITER {
                    revs.push(
                        s.put(
                            &format!("t/w{w}/{}", i % 10),
                            format!("{i}").as_bytes(),
                            None,
                        )
                        .await
                        .unwrap(),
                    );
                }
                revs
            })
        })
        .collect();
    // A watcher that joins half-way replays the past and follows the rest.
    tokio::time::sleep(Duration::from_millis(20)).await;
    live.push(s.watch("t/", start).await.unwrap());
    let mut written = BTreeSet::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    let written: Vec<Revision> = written.into_iter().collect();
    assert_eq!(written.len(), WRITERS * PER_WRITER);
    let total = written.len();
    for mut w in live {
        let seen: Vec<Revision> = take(&mut w, total)
            .await
            .iter()
            .map(|e| e.revision)
            .collect();
        assert_eq!(
            seen, written,
            "a watcher saw a gap, a duplicate or a reordering"
        );
        assert_quiet(&mut w).await;
    }
}

pub async fn slow_watcher_loses_nothing<B: Backend>(b: &mut B) {
    // Far more revisions than any buffer between store and consumer holds, written while the
    // watcher reads nothing.
    const N: usize = 3_000;
    let s = b.store();
    let start = s.current_revision().await.unwrap();
    let mut w = s.watch("t/", start).await.unwrap();
    let mut writers = Vec::new();
    for t in 0..4 {
        let s = s.clone();
        writers.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in (t..N).step_by(4) {
                revs.push(s.put(&format!("t/{}", i % 50), b"v", None).await.unwrap());
            }
            revs
        }));
    }
    let mut written = Vec::new();
    for t in writers {
        written.extend(t.await.unwrap());
    }
    written.sort_unstable();
    let seen: Vec<Revision> = take(&mut w, N).await.iter().map(|e| e.revision).collect();
    assert_eq!(seen, written);
    assert_quiet(&mut w).await;
}

// === leases ===

const TTL: Duration = Duration::from_secs(2);

pub async fn expired_lease_deletes_its_keys_with_delete_events<B: Backend>(b: &mut B) {
    let s = b.store();
    let lease = s.grant_lease(TTL).await.unwrap();
    s.put("t/a", b"1", Some(lease)).await.unwrap();
    let r = s.put("t/b", b"1", Some(lease)).await.unwrap();
    s.put("t/keep", b"1", None).await.unwrap();
    assert_eq!(s.get("t/a").await.unwrap().unwrap().lease, Some(lease));
    let mut w = s.watch("t/", r + 1).await.unwrap();
    let events = take(&mut w, 2).await;
    let deleted: BTreeSet<&str> = events.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(deleted, BTreeSet::from(["t/a", "t/b"]));
    assert!(events.iter().all(|e| e.kind == EventKind::Delete));
    assert_eq!(
        events[0].revision, events[1].revision,
        "one expiry, one revision"
    );
    assert_eq!(keys(&s.list("t/").await.unwrap().kvs), ["t/keep"]);
    assert!(matches!(s.keep_alive(lease).await, Err(Error::LeaseNotFound(l)) if l == lease));
}

pub async fn keep_alive_keeps_keys<B: Backend>(b: &mut B) {
    let s = b.store();
    let lease = s.grant_lease(TTL).await.unwrap();
    s.put("t/a", b"1", Some(lease)).await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ttl = s.keep_alive(lease).await.unwrap();
        assert!(ttl >= TTL, "renewed for {ttl:?}");
    }
    // 4 s have passed, twice the TTL: only the renewals kept the key.
    assert!(s.get("t/a").await.unwrap().is_some());
}

pub async fn revoke_deletes_keys_at_once<B: Backend>(b: &mut B) {
    let s = b.store();
    let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    let r = s.put("t/a", b"1", Some(lease)).await.unwrap();
    let mut w = s.watch("t/", r).await.unwrap();
    s.revoke_lease(lease).await.unwrap();
    assert_eq!(next(&mut w).await, del("t/a", r + 1));
    assert_eq!(s.get("t/a").await.unwrap(), None);
}

pub async fn put_with_an_unknown_lease_fails<B: Backend>(b: &mut B) {
    let s = b.store();
    let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    s.revoke_lease(lease).await.unwrap();
    let before = s.current_revision().await.unwrap();
    assert!(
        matches!(s.put("t/a", b"1", Some(lease)).await, Err(Error::LeaseNotFound(l)) if l == lease)
    );
    assert_eq!(s.get("t/a").await.unwrap(), None);
    assert_eq!(s.current_revision().await.unwrap(), before);
}

pub async fn keep_alive_of_a_revoked_lease_fails<B: Backend>(b: &mut B) {
    let s = b.store();
    let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert!(s.keep_alive(lease).await.is_ok());
    s.revoke_lease(lease).await.unwrap();
    let got = s.keep_alive(lease).await;
    assert!(matches!(got, Err(Error::LeaseNotFound(_))), "{got:?}");
    assert!(matches!(
        s.revoke_lease(lease).await,
        Err(Error::LeaseNotFound(_))
    ));
}

pub async fn rewriting_a_key_without_lease_detaches_it<B: Backend>(b: &mut B) {
    let s = b.store();
    let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    s.put("t/a", b"1", Some(lease)).await.unwrap();
    s.put("t/b", b"1", Some(lease)).await.unwrap();
    s.put("t/a", b"2", None).await.unwrap();
    assert_eq!(s.get("t/a").await.unwrap().unwrap().lease, None);
    s.revoke_lease(lease).await.unwrap();
    assert_eq!(keys(&s.list("t/").await.unwrap().kvs), ["t/a"]);
}

pub async fn lease_keys_still_expire_after_a_restart<B: Backend>(b: &mut B) {
    let s = b.store();
    let lease = s.grant_lease(TTL).await.unwrap();
    let r = s.put("t/a", b"1", Some(lease)).await.unwrap();
    drop(s);
    b.restart().await;
    let s = b.store();
    let mut w = s.watch("t/", r).await.unwrap();
    assert_eq!(next(&mut w).await, del("t/a", r + 1));
    assert_eq!(s.get("t/a").await.unwrap(), None);
}

// === compaction ===

pub async fn compaction_fails_old_watches_with_compacted<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    s.put("t/a", b"2", None).await.unwrap();
    let r3 = s.put("t/a", b"3", None).await.unwrap();
    s.compact(r3).await.unwrap();
    let mut w = s.watch("t/", r1).await.unwrap();
    match tokio::time::timeout(WAIT, w.next()).await.unwrap() {
        Some(Err(Error::Compacted { requested, floor })) => {
            assert_eq!(requested, r1 + 1);
            assert_eq!(floor, Some(r3));
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
}

pub async fn compaction_fails_old_listings_with_compacted<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let r2 = s.put("t/a", b"2", None).await.unwrap();
    s.compact(r2).await.unwrap();
    assert!(
        matches!(s.list_at("t/", r1).await, Err(Error::Compacted { requested, .. }) if requested == r1)
    );
    let l = s.list_at("t/", r2).await.unwrap();
    assert_eq!(l.kvs[0].value, b"2");
}

pub async fn watch_from_the_compaction_floor_still_works<B: Backend>(b: &mut B) {
    let s = b.store();
    s.put("t/a", b"1", None).await.unwrap();
    let r2 = s.put("t/a", b"2", None).await.unwrap();
    let r3 = s.put("t/a", b"3", None).await.unwrap();
    s.compact(r2).await.unwrap();
    // The floor revision itself is still available.
    let mut w = s.watch("t/", r2 - 1).await.unwrap();
    assert_eq!(
        take(&mut w, 2).await,
        [put("t/a", "2", r2), put("t/a", "3", r3)]
    );
}

pub async fn compacting_twice_to_the_same_revision_fails<B: Backend>(b: &mut B) {
    let s = b.store();
    let r = s.put("t/a", b"1", None).await.unwrap();
    s.compact(r).await.unwrap();
    assert!(matches!(s.compact(r).await, Err(Error::Compacted { .. })));
    assert!(matches!(
        s.compact(r + 5).await,
        Err(Error::FutureRevision { .. })
    ));
}

// === size ===

pub async fn large_values_round_trip<B: Backend>(b: &mut B) {
    let s = b.store();
    let value: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let r = s.put("t/big", &value, None).await.unwrap();
    assert_eq!(s.get("t/big").await.unwrap().unwrap().value, value);
    let mut w = s.watch("t/", r - 1).await.unwrap();
    assert_eq!(next(&mut w).await.value, value);
}

pub async fn many_keys_list_completely<B: Backend>(b: &mut B) {
    const N: usize = 12_000;
    let s = b.store();
    let mut tasks = Vec::new();
    for chunk in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in (chunk..N).step_by(8) {
                // ~600 bytes a value: the listing is larger than one gRPC message.
                s.put(&format!("many/{i:06}"), &[b'x'; 600], None)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let l = s.list("many/").await.unwrap();
    assert_eq!(l.kvs.len(), N);
    let want: Vec<String> = (0..N).map(|i| format!("many/{i:06}")).collect();
    assert_eq!(
        keys(&l.kvs),
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(l.revision, s.current_revision().await.unwrap());
}

// === restart ===

pub async fn restart_keeps_data_and_revisions_keep_increasing<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    s.put("t/b", b"2", None).await.unwrap();
    let r3 = s.put("t/a", b"3", None).await.unwrap();
    drop(s);
    b.restart().await;
    let s = b.store();
    assert_eq!(s.current_revision().await.unwrap(), r3);
    let kv = s.get("t/a").await.unwrap().unwrap();
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (&b"3"[..], r1, r3, 2)
    );
    assert_eq!(keys(&s.list("t/").await.unwrap().kvs), ["t/a", "t/b"]);
    let r4 = s.put("t/c", b"4", None).await.unwrap();
    assert_eq!(r4, r3 + 1);
}

pub async fn watch_replays_across_a_restart<B: Backend>(b: &mut B) {
    let s = b.store();
    let r1 = s.put("t/a", b"1", None).await.unwrap();
    let r2 = s.put("t/a", b"2", None).await.unwrap();
    drop(s);
    b.restart().await;
    let s = b.store();
    let r3 = s.delete("t/a").await.unwrap().unwrap();
    let mut w = s.watch("t/", r1 - 1).await.unwrap();
    assert_eq!(
        take(&mut w, 3).await,
        [put("t/a", "1", r1), put("t/a", "2", r2), del("t/a", r3)]
    );
}
