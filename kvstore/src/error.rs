//! The one error type of the store contract: what the caller must react to (compaction, a
//! lost lease) is a variant of its own; backend failures keep their cause.

use crate::{LeaseId, Revision, TxnLimits};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The requested history is gone: re-list, then watch from the listing's revision.
    #[error(
        "revision {requested} is compacted{}; re-list and watch from the listing",
        floor.map(|f| format!(" (history starts at {f})")).unwrap_or_default()
    )]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still available, when the store says (etcd reports it on
        /// watches, not on reads).
        floor: Option<Revision>,
    },
    /// A revision the store has not reached.
    #[error("revision {requested} is in the future (current revision {current})")]
    FutureRevision {
        /// The revision asked for.
        requested: Revision,
        /// The store's current revision.
        current: Revision,
    },
    /// The lease expired, was revoked, or never existed.
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A TTL of zero, or beyond what the store can keep.
    #[error("lease TTL {0:?} is not between 1 ms and 1 year")]
    InvalidTtl(std::time::Duration),
    /// Keys must not be empty.
    #[error("key must not be empty")]
    EmptyKey,
    /// A transaction beyond what the store accepts in one request.
    #[error(
        "a transaction of {writes} writes and {bytes} bytes exceeds the store's limits \
         ({} writes, {} bytes)", limits.max_ops, limits.max_bytes
    )]
    TxnTooLarge {
        /// Writes in the transaction.
        writes: usize,
        /// Their summed weight.
        bytes: usize,
        /// The store's limits.
        limits: TxnLimits,
    },
    /// The store refused one request as too large (etcd's `--max-request-bytes`, 1.5 MiB by
    /// default): retrying it cannot succeed.
    #[error("the store refused the request as too large: {0}")]
    TooLarge(String),
    /// A transaction that writes one key twice.
    #[error("key {0:?} is written twice in one transaction")]
    DuplicateKey(String),
    /// An etcd request failed.
    #[error("etcd request failed")]
    Etcd(#[source] etcd_client::Error),
    /// Connecting to etcd failed.
    #[error("failed to connect to etcd at {endpoints}")]
    EtcdConnect {
        /// The endpoints tried.
        endpoints: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// A TLS file for etcd could not be read.
    #[error("failed to read etcd TLS file {path}")]
    TlsFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The embedded store failed.
    #[error("embedded store operation failed")]
    Sled(#[from] sled::Error),
    /// Opening the embedded store failed.
    #[error("failed to open the embedded store at {path}")]
    SledOpen {
        /// The store's directory.
        path: String,
        /// Why.
        #[source]
        source: sled::Error,
    },
    /// Bytes in the embedded store that do not decode: the files were damaged.
    #[error("embedded store data is corrupt: {0}")]
    Corrupt(String),
    /// The store answered in a way the contract rules out.
    #[error("unexpected store response: {0}")]
    UnexpectedResponse(String),
    /// A watch could not be kept going (the store went away for longer than the retries).
    #[error("watch on {prefix:?} lost: {reason}")]
    WatchLost {
        /// The watched prefix.
        prefix: String,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Whether the failure is about this request (its key, size or shape) rather than the
    /// store: retrying the same request cannot succeed, other requests can.
    pub fn is_about_the_request(&self) -> bool {
        matches!(
            self,
            Self::TooLarge(_)
                | Self::EmptyKey
                | Self::TxnTooLarge { .. }
                | Self::DuplicateKey(_)
                | Self::InvalidTtl(_)
        )
    }
}
