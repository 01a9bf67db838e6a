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
//!   modification revision;
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
