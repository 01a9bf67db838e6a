//! The kvstore contract of clustermesh, a small etcd-shaped interface, and its two backends:
//!
//! - [`etcd::EtcdStore`]: the production store (etcd 3.4+, optional mTLS);
//! - [`embedded::SledStore`]: the embedded default for one machine, which implements
//!   revisions, a bounded change log, leases and watches itself on top of sled.
//!
//! The contract, identical for both ([`KvStore`]):
//! - every write gets a store-wide, strictly increasing revision; a write that changes several
//!   keys at once (a lease expiring) gives all of them the same revision;
//! - reads: [`KvStore::get`], [`KvStore::list`] at the current revision or at an older one
//!   still above the compaction floor;
//! - writes: put, delete, create-if-absent, compare-and-swap and compare-and-delete on a key's
//!   modification revision, and transactions of puts and deletes at one revision
//!   ([`KvStore::apply`]; etcd bounds their size, see [`TxnLimits`]);
//! - leases with a TTL, kept alive by the owner; when one expires its keys are deleted and
//!   watchers see the deletions;
//! - [`KvStore::watch`] replays every change after a revision, then follows live ones, in
//!   revision order, with no gap and no duplicate. A start below the compaction floor yields
//!   [`Error::Compacted`] as the stream's first item, so that the caller re-lists.
//!
//! The conformance suite in `tests/` runs the same behaviours against both backends.

#![forbid(unsafe_code)]

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;

pub mod embedded;
mod error;
pub mod etcd;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::Error;

/// A store-wide revision. Strictly increasing with every write.
pub type Revision = i64;

/// The result of every store operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A lease: keys attached to it are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// The revision of the key's last modification.
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after the first put).
    pub version: i64,
    /// The lease the key is attached to.
    pub lease: Option<LeaseId>,
}

/// The keys under a prefix at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The revision the listing reflects; watch from here to follow on without a gap.
    pub revision: Revision,
    /// The keys, sorted.
    pub kvs: Vec<KeyValue>,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Created or modified.
    Put,
    /// Deleted (explicitly or by its lease).
    Delete,
}

/// One change seen by a watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key.
    pub key: String,
    /// The new value; empty for a delete.
    pub value: Vec<u8>,
    /// The revision of the change.
    pub revision: Revision,
}

/// What [`KvStore::create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The key was absent and now holds the value.
    Created {
        /// The revision of the write.
        revision: Revision,
    },
    /// The key existed; nothing was written.
    Exists {
        /// What the key holds.
        current: KeyValue,
    },
}

/// What a compare-and-swap or compare-and-delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The key's modification revision was the expected one; the write happened.
    Done {
        /// The revision of the write.
        revision: Revision,
    },
    /// The key had changed (or was absent, or present when expected absent); nothing was
    /// written.
    Conflict {
        /// What the key holds now (`None` when absent).
        current: Option<KeyValue>,
    },
}

/// One write of a transaction ([`KvStore::apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Writes a value (with no lease).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// Deletes a key if it exists.
    Delete {
        /// The key.
        key: String,
    },
}

impl Write {
    /// The key written.
    pub fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Delete { key } => key,
        }
    }

    /// What the write weighs against [`TxnLimits::max_bytes`]: key, value and a little
    /// framing.
    pub fn weight(&self) -> usize {
        const FRAMING: usize = 16;
        match self {
            Self::Put { key, value } => key.len() + value.len() + FRAMING,
            Self::Delete { key } => key.len() + FRAMING,
        }
    }
}

/// How large one [`KvStore::apply`] may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnLimits {
    /// Writes per transaction (etcd's `--max-txn-ops`).
    pub max_ops: usize,
    /// Summed [`Write::weight`] per transaction (below etcd's `--max-request-bytes`).
    pub max_bytes: usize,
}

impl TxnLimits {
    /// No limit (the embedded store).
    pub const UNLIMITED: Self = Self {
        max_ops: usize::MAX,
        max_bytes: usize::MAX,
    };

    /// Whether `writes` fit in one transaction.
    pub fn admits(&self, writes: &[Write]) -> bool {
        writes.len() <= self.max_ops
            && writes.iter().map(Write::weight).sum::<usize>() <= self.max_bytes
    }

    /// Splits `writes`, in order, into the fewest consecutive transactions within the limits
    /// (a single write heavier than `max_bytes` goes alone, and the store judges it).
    pub fn split<'a>(&self, writes: &'a [Write]) -> Vec<&'a [Write]> {
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0, 0usize);
        for (i, w) in writes.iter().enumerate() {
            let n = i - start;
            if n > 0 && (n >= self.max_ops || bytes.saturating_add(w.weight()) > self.max_bytes) {
                out.push(&writes[start..i]);
                (start, bytes) = (i, 0);
            }
            bytes = bytes.saturating_add(w.weight());
        }
        if start < writes.len() {
            out.push(&writes[start..]);
        }
        out
    }
}

/// The changes under a prefix, in revision order. Ends after the first error.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Event>> + Send>>;

/// The contract both backends implement. See the crate documentation.
#[async_trait::async_trait]
pub trait KvStore: Send + Sync {
    /// The store's current revision.
    async fn current_revision(&self) -> Result<Revision>;

    /// One key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// The keys under `prefix` now.
    async fn list(&self, prefix: &str) -> Result<Listing>;

    /// The keys under `prefix` as they were at `revision`. [`Error::Compacted`] below the
    /// compaction floor, [`Error::FutureRevision`] above the current revision.
    async fn list_at(&self, prefix: &str, revision: Revision) -> Result<Listing>;

    /// Writes a value, attached to `lease` if given (which must be alive).
    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision>;

    /// Deletes a key. `None` when it did not exist (no revision is used then).
    async fn delete(&self, key: &str) -> Result<Option<Revision>>;

    /// Writes a value only if the key is absent.
    async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<CreateOutcome>;

    /// Writes a value only if the key's modification revision is `expected` (0: the key must
    /// be absent).
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<CasOutcome>;

    /// Deletes a key only if its modification revision is `expected`.
    async fn compare_and_delete(&self, key: &str, expected: Revision) -> Result<CasOutcome>;

    /// Applies every write at one revision, all or nothing; `None` when nothing changed
    /// (every write a delete of an absent key, or none at all). [`Error::TxnTooLarge`] beyond
    /// [`KvStore::txn_limits`], [`Error::DuplicateKey`] when a key is written twice.
    async fn apply(&self, writes: &[Write]) -> Result<Option<Revision>>;

    /// How large one [`KvStore::apply`] may be; [`TxnLimits::split`] cuts larger batches.
    fn txn_limits(&self) -> TxnLimits;

    /// Grants a lease. etcd rounds the TTL up to whole seconds and to its minimum TTL.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews a lease for its full TTL and returns that TTL; [`Error::LeaseNotFound`] once it
    /// has expired or been revoked.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;

    /// Revokes a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Every change under `prefix` with a revision above `after`, then live changes.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;

    /// Forgets history below `revision`: later [`KvStore::list_at`] and
    /// [`KvStore::watch`] calls that need it fail with [`Error::Compacted`].
    async fn compact(&self, revision: Revision) -> Result<()>;
}

/// Checks what both backends refuse in a transaction: empty keys, a key written twice, a
/// batch beyond the limits.
pub(crate) fn check_txn(writes: &[Write], limits: TxnLimits) -> Result<()> {
    if !limits.admits(writes) {
        return Err(Error::TxnTooLarge {
            writes: writes.len(),
            bytes: writes.iter().map(Write::weight).sum(),
            limits,
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(writes.len());
    for w in writes {
        if w.key().is_empty() {
            return Err(Error::EmptyKey);
        }
        if !seen.insert(w.key()) {
            return Err(Error::DuplicateKey(w.key().to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, n: usize) -> Write {
        Write::Put {
            key: k.into(),
            value: vec![0; n],
        }
    }

    #[test]
    fn split_respects_both_limits_and_keeps_order() {
        let limits = TxnLimits {
            max_ops: 3,
            max_bytes: 100,
        };
        let writes: Vec<Write> = (0..7).map(|i| put(&format!("k{i}"), 10)).collect();
        let sizes: Vec<usize> = limits.split(&writes).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![3, 3, 1]);
        // 2 + 40 + 16 = 58 bytes each: only one fits under 100.
        let heavy: Vec<Write> = (0..3).map(|i| put(&format!("k{i}"), 40)).collect();
        let chunks = limits.split(&heavy);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2][0].key(), "k2");
        // A write heavier than the limit still goes, alone.
        let huge = [put("a", 1), put("b", 500), put("c", 1)];
        let sizes: Vec<usize> = limits.split(&huge).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![1, 1, 1]);
        assert!(limits.split(&[]).is_empty());
        assert_eq!(TxnLimits::UNLIMITED.split(&writes).len(), 1);
    }

    #[test]
    fn check_refuses_duplicates_empty_keys_and_oversize() {
        let limits = TxnLimits {
            max_ops: 2,
            max_bytes: 1000,
        };
        assert!(check_txn(&[put("a", 1), put("b", 1)], limits).is_ok());
        let dup = [put("a", 1), Write::Delete { key: "a".into() }];
        assert!(matches!(check_txn(&dup, limits), Err(Error::DuplicateKey(k)) if k == "a"));
        assert!(matches!(
            check_txn(&[put("", 1)], limits),
            Err(Error::EmptyKey)
        ));
        assert!(matches!(
            check_txn(&[put("a", 1), put("b", 1), put("c", 1)], limits),
            Err(Error::TxnTooLarge { writes: 3, .. })
        ));
    }
}
