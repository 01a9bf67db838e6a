//! Tracing of changes across the mesh (docs/OBSERVABILITY.md).
//!
//! A change is traced from the source pass that applied it, through the kvstore write, the
//! Export event that carried it to another cluster, that cluster's import and its Export to its
//! agents, to the agent's view update, reconcile pass and datapath write. Every process exports
//! its spans over OTLP ([`otel`]); what links them is the W3C trace context carried with the
//! change ([`context`]): inside Export events, and inside an apiserver from its kvstore write to
//! its Export of that revision ([`provenance`]). Every change also carries the time it was
//! applied at its source, from which the apiservers and agents measure propagation.
//!
//! Off by default: with no OTLP endpoint configured no tracing layer exists and the spans of
//! [`step!`] are disabled at their call site; the origin time travels, and a trace context
//! received from a peer is handed on unchanged (as an intermediary does), so that a trace
//! stays connected through a process that does not trace.

#![forbid(unsafe_code)]

pub mod context;
pub mod exposition;
pub mod otel;
pub mod process;
pub mod provenance;

pub use context::Trace;
pub use otel::{Settings, SettingsError, Telemetry, TracingSection};
pub use provenance::{Origin, Pending, Provenance};

/// The `tracing` target of the spans of a traced change: the OTLP layer takes only these, the
/// log output never shows them.
pub const TARGET: &str = "clustermesh::trace";

/// A span for one step of a traced change, as a child of `parent` (a [`Trace`]); no span at
/// all (`Span::none()`) without a parent, so that an untraced change costs nothing and never
/// starts a trace of its own.
///
/// ```text
/// let span = clustermesh_telemetry::step!(origin.trace.as_ref(), "remote import applied", remote = %name);
/// ```
#[macro_export]
macro_rules! step {
    ($parent:expr, $name:literal $(, $($fields:tt)*)?) => {
        match $parent {
            Some(parent) => {
                let span = ::tracing::info_span!(target: "clustermesh::trace", $name $(, $($fields)*)?);
                $crate::context::set_parent(&span, parent);
                span
            }
            None => ::tracing::Span::none(),
        }
    };
}

/// A span for a step inside another of this process (`&Span`): no span when that one is
/// disabled (a disabled parent would make the child a root).
#[macro_export]
macro_rules! child {
    ($parent:expr, $name:literal $(, $($fields:tt)*)?) => {{
        let parent: &::tracing::Span = $parent;
        if parent.is_disabled() {
            ::tracing::Span::none()
        } else {
            ::tracing::info_span!(target: "clustermesh::trace", parent: parent, $name $(, $($fields)*)?)
        }
    }};
}

/// The root span of a change: the source pass that applies it (sampled by the configured
/// sampler).
#[macro_export]
macro_rules! root {
    ($name:literal $(, $($fields:tt)*)?) => {
        ::tracing::info_span!(target: "clustermesh::trace", $name $(, $($fields)*)?)
    };
}

/// This build: the crate version, the git commit (`unknown` outside a checkout) and the
/// compiler's version, for `clustermesh_build_info`.
pub mod build {
    /// The version of the crates.
    pub const VERSION: &str = env!("CARGO_PKG_VERSION");
    /// The git commit, 12 hex digits.
    pub const COMMIT: &str = env!("CLUSTERMESH_GIT_COMMIT");
    /// The rustc version, e.g. `1.95.0`.
    pub const RUSTC: &str = env!("CLUSTERMESH_RUSTC_VERSION");

    /// The labels of `clustermesh_build_info` for the process `component`.
    pub fn info_labels(component: &'static str) -> Vec<(&'static str, &'static str)> {
        vec![
            ("version", VERSION),
            ("commit", COMMIT),
            ("rustc", RUSTC),
            ("component", component),
        ]
    }
}

/// Buckets (seconds) of the `*_propagation_seconds` histograms: 1 ms to 60 s.
pub const PROPAGATION_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Unix time now, in nanoseconds.
pub fn now_unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Seconds from `origin_unix_nanos` until now; 0 for an origin in the future (clocks of two
/// clusters differ by at most their NTP error; a negative delay is that error, not a delay).
pub fn seconds_since(origin_unix_nanos: i64) -> f64 {
    let nanos = now_unix_nanos().saturating_sub(origin_unix_nanos).max(0);
    #[allow(
        clippy::cast_precision_loss,
        reason = "a delay in seconds; f64 is exact to the nanosecond for over 100 days"
    )]
    let seconds = nanos as f64 / 1e9;
    seconds
}
