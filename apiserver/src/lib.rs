//! The clustermesh apiserver (DESIGN sections 1, 4, 5, 9, 10): reads the cluster's objects
//! from a source, allocates identities, writes the cluster's state into its kvstore under
//! Cilium's key layout, and serves it over the Export gRPC protocol with mTLS, plus health and
//! metrics on a plain HTTP port.
//!
//! - [`source`]: the manifest directory (and the types every source produces);
//! - [`desired`]: the desired state as a pure function of the source objects;
//! - [`identity`]: identity allocation through the kvstore;
//! - [`writer`]: writes only what changed;
//! - [`export`]: the Export gRPC service;
//! - [`metrics`]: Prometheus metrics and the health endpoints;
//! - [`config`], [`server`]: the configuration file and the wiring.

#![forbid(unsafe_code)]

pub mod config;
pub mod conn;
pub mod desired;
pub mod export;
pub mod identity;
pub mod metrics;
pub mod remotes;
pub mod server;
pub mod source;
pub mod writer;

pub use config::Config;
pub use server::{Running, start, start_with};
