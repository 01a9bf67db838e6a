//! The W3C trace context (<https://www.w3.org/TR/trace-context/>) a traced change carries: the
//! `traceparent` and `tracestate` header values of the span that handed it on.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The longest `traceparent` taken from a peer (version 00 has 55 characters; later versions
/// may append fields).
pub const MAX_TRACEPARENT: usize = 256;
/// The longest `tracestate` taken from a peer (the specification's limit is 512).
pub const MAX_TRACESTATE: usize = 512;

/// The trace context of a sampled span, as the W3C headers carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// `traceparent`.
    pub parent: String,
    /// `tracestate` (often empty).
    pub state: String,
}

impl Trace {
    /// The context received from a peer; `None` for an empty, oversized or malformed one, or
    /// one whose trace is not sampled (nothing downstream would be recorded).
    pub fn from_headers(parent: &str, state: &str) -> Option<Self> {
        if parent.len() > MAX_TRACEPARENT || state.len() > MAX_TRACESTATE || !well_formed(parent) {
            return None;
        }
        let trace = Self {
            parent: parent.to_owned(),
            state: state.to_owned(),
        };
        let cx = trace.extract();
        let span = cx.span();
        let sc = span.span_context();
        (sc.is_valid() && sc.is_sampled()).then_some(trace)
    }

    /// The context of `span`, if it is recorded by the OTLP layer and sampled.
    pub fn of(span: &tracing::Span) -> Option<Self> {
        if span.is_disabled() {
            return None;
        }
        let cx = span.context();
        let otel_span = cx.span();
        let sc = otel_span.span_context();
        if !sc.is_valid() || !sc.is_sampled() {
            return None;
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        Some(Self {
            parent: carrier.remove("traceparent")?,
            state: carrier.remove("tracestate").unwrap_or_default(),
        })
    }

    fn extract(&self) -> opentelemetry::Context {
        let mut carrier = HashMap::with_capacity(2);
        carrier.insert("traceparent".to_owned(), self.parent.clone());
        if !self.state.is_empty() {
            carrier.insert("tracestate".to_owned(), self.state.clone());
        }
        TraceContextPropagator::new().extract(&carrier)
    }

    /// The span context, for a link.
    pub fn span_context(&self) -> opentelemetry::trace::SpanContext {
        self.extract().span().span_context().clone()
    }
}

/// Whether `traceparent` has the specification's form: `version-traceid-parentid-flags` in
/// lowercase hex of 2, 32, 16 and 2 digits (version `ff` is invalid; version `00` has exactly
/// these four fields, later versions may append more).
fn well_formed(traceparent: &str) -> bool {
    let fields: Vec<&str> = traceparent.split('-').collect();
    let hex = |f: &str, len: usize| {
        f.len() == len
            && f.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    fields.len() >= 4
        && hex(fields[0], 2)
        && fields[0] != "ff"
        && (fields[0] != "00" || fields.len() == 4)
        && hex(fields[1], 32)
        && hex(fields[2], 16)
        && hex(fields[3], 2)
}

/// Makes `span` a child of `parent` (before it is entered). A span that is disabled (tracing
/// off) is left alone.
pub fn set_parent(span: &tracing::Span, parent: &Trace) {
    if span.is_disabled() {
        return;
    }
    // Fails only for a span already started, which the callers never pass.
    let _ = span.set_parent(parent.extract());
}

/// Adds a link from `span` to another traced change (a reconcile pass that writes several).
pub fn add_link(span: &tracing::Span, other: &Trace) {
    if !span.is_disabled() {
        span.add_link(other.span_context());
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a panic is the failure report"
    )]

    use super::*;

    const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_sampled_context_is_taken_and_anything_else_is_not() {
        let t = Trace::from_headers(SAMPLED, "vendor=x").unwrap();
        assert_eq!(t.parent, SAMPLED);
        assert_eq!(
            t.span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        // Not sampled: nothing downstream records it.
        assert_eq!(
            Trace::from_headers(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                ""
            ),
            None
        );
        // Malformed, all-zero, empty, oversized.
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(Trace::from_headers(bad, ""), None, "{bad:?}");
        }
        let long = format!("{SAMPLED}{}", "-0".repeat(200));
        assert_eq!(Trace::from_headers(&long, ""), None);
        assert_eq!(Trace::from_headers(SAMPLED, &"a=b,".repeat(200)), None);
    }

    #[test]
    fn a_span_without_the_tracing_layer_has_no_context() {
        let span = tracing::info_span!(target: "clustermesh::trace", "x");
        assert_eq!(Trace::of(&span), None);
    }
}
