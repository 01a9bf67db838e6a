//! The embedded store: sled underneath, with revisions, a bounded change log, leases and
//! watches implemented here so that it keeps the same contract as etcd.
//!
//! Every write takes the writer lock, builds one sled batch (the new records, the log entry of
//! the revision with the records it replaced, the meta revision, log trimming) and applies it
//! atomically, then publishes the revision's events to live watchers. `list_at` an older
//! revision rewinds the current state with the replaced records kept in the log. The log keeps
//! the last `log_retention` revisions; older ones are the compaction floor.
//!
//! Durability: sled writes its log to disk every `flush_every` (500 ms by default) and on
//! close; a crash can lose the writes of that window, never tear one. Readers may have seen
//! those writes, and a restarted store must not hand out their revisions again for other
//! changes. So a store not closed cleanly (no `mclean` marker, written on close and removed
//! on open) starts its next incarnation [`CRASH_GAP`] revisions later. Its compaction floor
//! moves there too, so every watch or `list_at` from a revision before the crash fails with
//! `Compacted`: the reader re-lists (a `Reset` and a snapshot over Export) instead of
//! resuming into a different history.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use crate::{
    CasOutcome, CreateOutcome, Error, Event, EventKind, KeyValue, KvStore, LeaseId, Listing,
    Result, Revision, TxnLimits, WatchStream, Write, check_txn,
};

mod codec;
mod watch;

use codec::{LogChange, LogEntry, Record};

/// How to open the embedded store.
#[derive(Debug, Clone)]
pub struct SledConfig {
    /// The store's directory (created if missing).
    pub path: PathBuf,
    /// How many revisions of history to keep for `list_at` and watch replay.
    pub log_retention: u64,
    /// How often sled writes to disk.
    pub flush_every: Duration,
}

impl SledConfig {
    /// Defaults: 100,000 revisions of history, flushed every 500 ms.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            log_retention: 100_000,
            flush_every: Duration::from_millis(500),
        }
    }
}

/// The embedded [`KvStore`]. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    state: RwLock<State>,
    /// One message per revision, for live watchers.
    events: broadcast::Sender<Arc<RevisionEvents>>,
    /// Wakes the lease reaper when a lease is granted or renewed.
    lease_changed: Arc<Notify>,
    log_retention: i64,
}

/// What the writer lock protects: the counters and the lease table.
struct State {
    revision: Revision,
    floor: Revision,
    next_lease: i64,
    leases: HashMap<LeaseId, LeaseState>,
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// The events of one revision.
struct RevisionEvents {
    revision: Revision,
    events: Vec<Event>,
}

/// One key's intended change within a write.
struct Change {
    key: String,
    /// New value and lease; `None` to delete.
    new: Option<(Vec<u8>, Option<LeaseId>)>,
    prev: Option<Record>,
}

/// How far the revision jumps after an unclean shutdown: more than the writes of one flush
/// interval could ever number.
pub const CRASH_GAP: Revision = 1 << 24;

/// The longest lease accepted.
const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

// === impl SledStore ===

impl SledStore {
    /// Opens (or creates) the store and starts its lease reaper on the current Tokio runtime.
    pub fn open(config: &SledConfig) -> Result<Self> {
        let db = sled::Config::new()
            .path(&config.path)
            .flush_every_ms(Some(
                u64::try_from(config.flush_every.as_millis()).unwrap_or(u64::MAX),
            ))
            .open()
            .map_err(|source| Error::SledOpen {
                path: config.path.display().to_string(),
                source,
            })?;
        let read_i64 = |name: &[u8]| -> Result<i64> {
            db.get(name)?
                .map_or(Ok(0), |v| codec::decode_i64(&v, "meta value"))
        };
        let mut revision = read_i64(codec::META_REVISION)?;
        let mut floor = read_i64(codec::META_FLOOR)?;
        let next_lease = read_i64(codec::META_NEXT_LEASE)?;
        let clean = db.get(codec::META_CLEAN)?.is_some();
        if revision > 0 && !clean {
            // A crash: revisions past the last flush may have been seen by readers. Start
            // after them, with no history before (a resume from before re-lists).
            let next = revision.saturating_add(CRASH_GAP);
            tracing::warn!(
                path = %config.path.display(),
                last_revision = revision,
                next_revision = next,
                "the embedded store was not closed cleanly (a crash): its history restarts at a new revision, so every reader re-lists"
            );
            let mut batch = sled::Batch::default();
            for item in db.range(codec::log_key(floor)..=codec::log_key(revision)) {
                let (k, _) = item?;
                batch.remove(k);
            }
            batch.insert(codec::META_REVISION, &next.to_be_bytes());
            batch.insert(codec::META_FLOOR, &next.to_be_bytes());
            db.apply_batch(batch)?;
            revision = next;
            floor = next;
        }
        // Until it is closed cleanly, a crash is detected at the next open.
        db.remove(codec::META_CLEAN)?;
        db.flush()?;

        // Leases restart with their full TTL, as etcd does after a leader change: their owners
        // get a chance to renew them.
        let now = Instant::now();
        let mut leases = HashMap::new();
        for item in db.scan_prefix([codec::LEASE]) {
            let (k, v) = item?;
            let id = LeaseId(codec::decode_i64(&k[1..], "lease id")?);
            let ttl = Duration::from_millis(codec::decode_i64(&v, "lease ttl")?.unsigned_abs());
            leases.insert(
                id,
                LeaseState {
                    ttl,
                    deadline: now + ttl,
                    keys: BTreeSet::new(),
                },
            );
        }
        for item in db.scan_prefix([codec::DATA]) {
            let (k, v) = item?;
            if let Some(lease) = Record::decode(&v)?.lease {
                let key = codec::key_of_data(&k)?;
                match leases.get_mut(&lease) {
                    Some(l) => {
                        l.keys.insert(key);
                    }
                    None => {
                        return Err(Error::Corrupt(format!(
                            "key {key:?} names unknown lease {lease}"
                        )));
                    }
                }
            }
        }

        let (events, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            db,
            state: RwLock::new(State {
                revision,
                floor,
                next_lease,
                leases,
            }),
            events,
            lease_changed: Arc::new(Notify::new()),
            log_retention: i64::try_from(config.log_retention.max(1)).unwrap_or(i64::MAX),
        });
        tokio::spawn(reap_leases(
            Arc::downgrade(&inner),
            Arc::clone(&inner.lease_changed),
        ));
        Ok(Self { inner })
    }

    /// Writes everything to disk now.
    pub async fn flush(&self) -> Result<()> {
        self.inner.db.flush_async().await?;
        Ok(())
    }
}

impl Drop for Inner {
    /// Closes cleanly: everything on disk, then the marker that says so.
    fn drop(&mut self) {
        let closed = self
            .db
            .flush()
            .and_then(|_| self.db.insert(codec::META_CLEAN, &[1]))
            .and_then(|_| self.db.flush());
        if let Err(e) = closed {
            tracing::warn!(error = %e, "closing the embedded store failed: the next start treats it as a crash");
        }
    }
}

impl Inner {
    fn record(&self, key: &str) -> Result<Option<Record>> {
        self.db
            .get(codec::data_key(key))?
            .map(|v| Record::decode(&v))
            .transpose()
    }

    /// Applies `changes` as one revision, with `extra` tree operations in the same batch.
    /// The caller holds the writer lock (`st`).
    fn commit(
        &self,
        st: &mut State,
        changes: Vec<Change>,
        extra: impl FnOnce(&mut sled::Batch),
    ) -> Result<Revision> {
        let rev = st.revision + 1;
        let mut batch = sled::Batch::default();
        let mut log = Vec::with_capacity(changes.len());
        let mut events = Vec::with_capacity(changes.len());
        for c in changes {
            let dkey = codec::data_key(&c.key);
            match &c.new {
                Some((value, lease)) => {
                    let rec = Record {
                        create_revision: c.prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: c.prev.as_ref().map_or(1, |p| p.version + 1),
                        lease: *lease,
                        value: value.clone(),
                    };
                    batch.insert(dkey, rec.encode());
                    events.push(Event {
                        kind: EventKind::Put,
                        key: c.key.clone(),
                        value: value.clone(),
                        revision: rev,
                    });
                }
                None => {
                    batch.remove(dkey);
                    events.push(Event {
                        kind: EventKind::Delete,
                        key: c.key.clone(),
                        value: Vec::new(),
                        revision: rev,
                    });
                }
            }
            log.push(LogChange {
                key: c.key,
                value: c.new.map(|(v, _)| v),
                prev: c.prev,
            });
        }
        let entry = LogEntry(log);
        batch.insert(&codec::log_key(rev), entry.encode());
        batch.insert(codec::META_REVISION, &rev.to_be_bytes());
        let floor = (rev - self.log_retention + 1).max(st.floor);
        for old in st.floor..floor {
            batch.remove(&codec::log_key(old));
        }
        if floor != st.floor {
            batch.insert(codec::META_FLOOR, &floor.to_be_bytes());
        }
        extra(&mut batch);
        self.db.apply_batch(batch)?;

        // Keep the lease index in step with what was written.
        for c in &entry.0 {
            if let Some(l) = c
                .prev
                .as_ref()
                .and_then(|p| p.lease)
                .and_then(|old| st.leases.get_mut(&old))
            {
                l.keys.remove(&c.key);
            }
        }
        st.revision = rev;
        st.floor = floor;
        // Receivers may be absent; live watchers re-read the log if they lag.
        let _ = self.events.send(Arc::new(RevisionEvents {
            revision: rev,
            events,
        }));
        Ok(rev)
    }

    fn attach(st: &mut State, key: &str, lease: Option<LeaseId>) {
        if let Some(l) = lease.and_then(|l| st.leases.get_mut(&l)) {
            l.keys.insert(key.to_owned());
        }
    }

    fn check_lease(st: &State, lease: Option<LeaseId>) -> Result<()> {
        match lease {
            Some(l) if !st.leases.contains_key(&l) => Err(Error::LeaseNotFound(l)),
            _ => Ok(()),
        }
    }

    fn write_one(
        &self,
        st: &mut State,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
        prev: Option<Record>,
    ) -> Result<Revision> {
        Self::check_lease(st, lease)?;
        let change = Change {
            key: key.to_owned(),
            new: Some((value.to_vec(), lease)),
            prev,
        };
        let rev = self.commit(st, vec![change], |_| {})?;
        Self::attach(st, key, lease);
        Ok(rev)
    }

    /// Deletes a lease and its keys in one revision (none if it had no keys).
    fn revoke(&self, st: &mut State, lease: LeaseId) -> Result<()> {
        let Some(state) = st.leases.get(&lease) else {
            return Err(Error::LeaseNotFound(lease));
        };
        let mut changes = Vec::with_capacity(state.keys.len());
        for key in &state.keys {
            if let Some(prev) = self.record(key)? {
                changes.push(Change {
                    key: key.clone(),
                    new: None,
                    prev: Some(prev),
                });
            }
        }
        let lkey = codec::lease_key(lease);
        if changes.is_empty() {
            self.db.remove(lkey)?;
        } else {
            self.commit(st, changes, |b| b.remove(&lkey))?;
        }
        st.leases.remove(&lease);
        Ok(())
    }

    /// The log entries of revisions `from..=to`, refusing what is below the floor.
    fn read_log(&self, from: Revision, to: Revision) -> Result<Vec<(Revision, LogEntry)>> {
        let st = self.state.read();
        if from < st.floor {
            return Err(Error::Compacted {
                requested: from,
                floor: Some(st.floor),
            });
        }
        let mut out = Vec::new();
        for item in self.db.range(codec::log_key(from)..=codec::log_key(to)) {
            let (k, v) = item?;
            out.push((
                codec::decode_i64(&k[1..], "log revision")?,
                LogEntry::decode(&v)?,
            ));
        }
        Ok(out)
    }
}

/// Deletes the keys of expired leases. Ends when the store is dropped.
async fn reap_leases(inner: Weak<Inner>, lease_changed: Arc<Notify>) {
    const IDLE: Duration = Duration::from_secs(1);
    loop {
        // Register for wake-ups before looking at the deadlines, so that a lease granted
        // meanwhile is not missed.
        let notified = lease_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(store) = inner.upgrade() else { return };
        let now = Instant::now();
        let next = {
            let mut st = store.state.write();
            let expired: Vec<LeaseId> = st
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                if let Err(e) = store.revoke(&mut st, id) {
                    tracing::warn!(lease = %id, error = %e, "failed to delete the keys of an expired lease; retrying in 1 s");
                    if let Some(l) = st.leases.get_mut(&id) {
                        l.deadline = now + IDLE;
                    }
                }
            }
            st.leases
                .values()
                .map(|l| l.deadline)
                .min()
                .unwrap_or(now + IDLE)
                .min(now + IDLE)
        };
        // Hold no reference while waiting, so that dropping the store ends this task.
        drop(store);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = notified => {}
        }
    }
}

#[async_trait::async_trait]
impl KvStore for SledStore {
    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.inner.state.read().revision)
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.inner.record(key)?.map(|r| r.into_kv(key.to_owned())))
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let st = self.inner.state.read();
        let mut kvs = Vec::new();
        for item in self.inner.db.scan_prefix(codec::data_key(prefix)) {
            let (k, v) = item?;
            kvs.push(Record::decode(&v)?.into_kv(codec::key_of_data(&k)?));
        }
        Ok(Listing {
            revision: st.revision,
            kvs,
        })
    }

    async fn list_at(&self, prefix: &str, revision: Revision) -> Result<Listing> {
        let st = self.inner.state.read();
        if revision > st.revision {
            return Err(Error::FutureRevision {
                requested: revision,
                current: st.revision,
            });
        }
        if revision < st.floor {
            return Err(Error::Compacted {
                requested: revision,
                floor: Some(st.floor),
            });
        }
        let mut state = BTreeMap::new();
        for item in self.inner.db.scan_prefix(codec::data_key(prefix)) {
            let (k, v) = item?;
            state.insert(codec::key_of_data(&k)?, Record::decode(&v)?);
        }
        // Undo every later revision, newest first.
        let log = self
            .inner
            .db
            .range(codec::log_key(revision + 1)..=codec::log_key(st.revision));
        for item in log.rev() {
            let (_, v) = item?;
            for change in LogEntry::decode(&v)?.0.into_iter().rev() {
                if !change.key.starts_with(prefix) {
                    continue;
                }
                match change.prev {
                    Some(prev) => state.insert(change.key, prev),
                    None => state.remove(&change.key),
                };
            }
        }
        let kvs = state.into_iter().map(|(k, r)| r.into_kv(k)).collect();
        Ok(Listing { revision, kvs })
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let mut st = self.inner.state.write();
        let prev = self.inner.record(key)?;
        self.inner.write_one(&mut st, key, value, lease, prev)
    }

    async fn delete(&self, key: &str) -> Result<Option<Revision>> {
        let mut st = self.inner.state.write();
        let Some(prev) = self.inner.record(key)? else {
            return Ok(None);
        };
        let change = Change {
            key: key.to_owned(),
            new: None,
            prev: Some(prev),
        };
        self.inner.commit(&mut st, vec![change], |_| {}).map(Some)
    }

    async fn apply(&self, writes: &[Write]) -> Result<Option<Revision>> {
        check_txn(writes, TxnLimits::UNLIMITED)?;
        let mut st = self.inner.state.write();
        let mut changes = Vec::with_capacity(writes.len());
        for w in writes {
            let prev = self.inner.record(w.key())?;
            match w {
                Write::Put { key, value } => changes.push(Change {
                    key: key.clone(),
                    new: Some((value.clone(), None)),
                    prev,
                }),
                Write::Delete { key } => {
                    if prev.is_some() {
                        changes.push(Change {
                            key: key.clone(),
                            new: None,
                            prev,
                        });
                    }
                }
            }
        }
        if changes.is_empty() {
            return Ok(None);
        }
        self.inner.commit(&mut st, changes, |_| {}).map(Some)
    }

    fn txn_limits(&self) -> TxnLimits {
        TxnLimits::UNLIMITED
    }

    async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<CreateOutcome> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let mut st = self.inner.state.write();
        if let Some(current) = self.inner.record(key)? {
            return Ok(CreateOutcome::Exists {
                current: current.into_kv(key.to_owned()),
            });
        }
        let revision = self.inner.write_one(&mut st, key, value, lease, None)?;
        Ok(CreateOutcome::Created { revision })
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        let mut st = self.inner.state.write();
        let prev = self.inner.record(key)?;
        if prev.as_ref().map_or(0, |p| p.mod_revision) != expected {
            return Ok(CasOutcome::Conflict {
                current: prev.map(|p| p.into_kv(key.to_owned())),
            });
        }
        let revision = self.inner.write_one(&mut st, key, value, lease, prev)?;
        Ok(CasOutcome::Done { revision })
    }

    async fn compare_and_delete(&self, key: &str, expected: Revision) -> Result<CasOutcome> {
        let mut st = self.inner.state.write();
        let prev = self.inner.record(key)?;
        match prev {
            Some(p) if p.mod_revision == expected => {
                let change = Change {
                    key: key.to_owned(),
                    new: None,
                    prev: Some(p),
                };
                let revision = self.inner.commit(&mut st, vec![change], |_| {})?;
                Ok(CasOutcome::Done { revision })
            }
            other => Ok(CasOutcome::Conflict {
                current: other.map(|p| p.into_kv(key.to_owned())),
            }),
        }
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl < Duration::from_millis(1) || ttl > MAX_TTL {
            return Err(Error::InvalidTtl(ttl));
        }
        let id = {
            let mut st = self.inner.state.write();
            let id = LeaseId(st.next_lease + 1);
            let ttl_ms = i64::try_from(ttl.as_millis()).expect("TTL is at most a year");
            let mut batch = sled::Batch::default();
            batch.insert(codec::META_NEXT_LEASE, &id.0.to_be_bytes());
            batch.insert(&codec::lease_key(id), &ttl_ms.to_be_bytes());
            self.inner.db.apply_batch(batch)?;
            st.next_lease = id.0;
            st.leases.insert(
                id,
                LeaseState {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            id
        };
        self.inner.lease_changed.notify_one();
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let mut st = self.inner.state.write();
        let l = st
            .leases
            .get_mut(&lease)
            .ok_or(Error::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut st = self.inner.state.write();
        self.inner.revoke(&mut st, lease)
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        Ok(watch::start(
            Arc::clone(&self.inner),
            prefix.to_owned(),
            after,
        ))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let mut st = self.inner.state.write();
        if revision > st.revision {
            return Err(Error::FutureRevision {
                requested: revision,
                current: st.revision,
            });
        }
        if revision <= st.floor {
            return Err(Error::Compacted {
                requested: revision,
                floor: Some(st.floor),
            });
        }
        let mut batch = sled::Batch::default();
        for old in st.floor..revision {
            batch.remove(&codec::log_key(old));
        }
        batch.insert(codec::META_FLOOR, &revision.to_be_bytes());
        self.inner.db.apply_batch(batch)?;
        st.floor = revision;
        Ok(())
    }
}
