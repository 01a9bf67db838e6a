//! The clustermesh node agent (`clustermesh agent`): one Export watch to the local
//! apiserver, an indexed view of every cluster ([`view`]), the global-service merge
//! ([`merge`]) and policy resolution ([`policy`]) as pure functions of that view, the desired
//! datapath state ([`desired`]), and the reconciler that writes only the difference into the
//! eBPF maps ([`reconcile`]). [`agent`] runs it all; [`admin`] serves status, metrics and the
//! explanations.

#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod attach;
pub mod config;
pub mod desired;
pub mod flows;
pub mod merge;
pub mod mounts;
pub mod policy;
pub mod reconcile;
pub mod view;

pub use agent::{Running, StartError, start};
pub use config::{Config, DatapathKind};
