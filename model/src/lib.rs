//! Domain model of clustermesh: the facts shared with Cilium ClusterMesh, so that operators
//! recognise them, with the validation every value coming from a file, a peer or the network
//! goes through.
//!
//! - [`cluster`]: cluster names, IDs, the mesh size mode and the cluster config.
//! - [`identity`]: numeric security identities with their cluster bits.
//! - [`labels`]: label sets and their kvstore string form.
//! - [`endpoint`]: ipcache entries (pod IP -> identity).
//! - [`node`]: nodes of a cluster.
//! - [`service`]: cluster services, their backends and the global-service annotations.
//! - [`policy`]: the CiliumNetworkPolicy subset the mesh enforces.
//! - [`keys`]: the kvstore key layout, built and parsed.
//!
//! Everything here is pure: no I/O, no async.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod endpoint;
pub mod gozero;
pub mod identity;
pub mod ip;
pub mod keys;
pub mod labels;
pub mod names;
pub mod node;
pub mod policy;
pub mod service;

pub use cluster::{ClusterConfig, ClusterId, ClusterName, MaxConnectedClusters};
pub use identity::{Identity, ReservedIdentity};
pub use labels::{Label, LabelSet};
