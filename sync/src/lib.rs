//! Sync workers (DESIGN section 6): one per remote cluster, inside the apiserver. Each
//! connects to the remote's Export service with mTLS, checks its cluster config, imports its
//! snapshot and changes into the local kvstore under `cilium/cache/<kind>/v1/<remote>/`,
//! validating every object, resumes after failures, and keeps the bounded-staleness contract.
//!
//! - [`validate`]: what a remote may write, and where;
//! - [`ownership`]: which remote owns each imported pod IP;
//! - [`staleness`]: unreachable / withdrawn / restored as a pure state machine;
//! - [`worker`]: the I/O loop of one remote;
//! - `etcd_source`: a remote of kind `etcd` (a Cilium cluster's clustermesh-apiserver or
//!   KVStoreMesh), read as Cilium's agents read it and turned into the same events.

#![forbid(unsafe_code)]

mod etcd_source;
pub mod ownership;
pub mod staleness;
pub mod validate;
pub mod worker;
