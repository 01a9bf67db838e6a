//! The clustermesh eBPF datapath (DESIGN section 8).
//!
//! - `c/clustermesh.bpf.c`, built by `build.rs` with clang: socket load balancing
//!   (`cgroup/connect4`, `cgroup/sendmsg4`, `cgroup/recvmsg4`) and identity-based policy (TC
//!   `classifier` programs on each local endpoint's host-side interface), with verdict events
//!   on a ring buffer.
//! - `include/clustermesh.h`: the one definition of every map layout, mirrored in
//!   [`layout`].
//! - [`Datapath`]: the typed interface the agent drives, implemented by
//!   [`KernelDatapath`] (real maps and programs, pinned) and [`UserspaceDatapath`] (the
//!   same maps in memory, for unprivileged runs).
//!
//! `unsafe` lives here only: the `Pod` impls of the map structs, raw `bpf(2)` batch calls and
//! `setns(2)` for attaching inside a network namespace, each with a `SAFETY` comment.

pub mod api;
mod batch;
pub mod events;
pub mod kernel;
pub mod layout;
pub mod netns;
pub mod outlier;
#[cfg(feature = "testing")]
pub mod testing;
pub mod userspace;

pub use api::{
    Backend, BackendId, BackendState, Datapath, Direction, Endpoint, EndpointFlags, Error,
    IpCacheValue, PolicyKey, PolicyValue, Prefix, Proto, Result, ServiceKey, Snapshot, Verdict,
};
pub use events::{EventStream, EventVerdict, VerdictEvent};
pub use kernel::{KernelConfig, KernelDatapath};
pub use outlier::{BackendHealth, EjectReason, OutlierDetection};
pub use userspace::UserspaceDatapath;
