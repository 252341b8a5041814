//! The W3C trace context a request carries (`traceparent`, `tracestate`, as HTTP
//! headers or gRPC metadata), and the span a front door opens for the request under
//! it. Herald's spans have the target [`TARGET`]: no layer listens to it unless
//! OpenTelemetry export is on, so with tracing off a span costs one disabled-callsite
//! check.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every span Herald exports.
pub const TARGET: &str = herald_core::TRACE_TARGET;

/// The two W3C fields of one request.
struct Carrier {
    traceparent: String,
    tracestate: Option<String>,
}

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(&self.traceparent),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = vec!["traceparent"];
        if self.tracestate.is_some() {
            keys.push("tracestate");
        }
        keys
    }
}

/// The trace context in `traceparent` / `tracestate` (as `get` returns them), if
/// valid: the parent of the request's span.
fn remote_parent(get: impl Fn(&str) -> Option<String>) -> Option<opentelemetry::Context> {
    let carrier = Carrier { traceparent: get("traceparent")?, tracestate: get("tracestate") };
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Whether Herald's spans are being recorded (OpenTelemetry export is on).
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// Opens the span of one request (`name`: its route or gRPC method) through `door`,
/// under the caller's trace context when `get` finds a valid `traceparent` (a missing
/// or malformed one starts a new trace).
pub fn request_span(name: &str, door: &'static str, get: impl Fn(&str) -> Option<String>) -> tracing::Span {
    let span = tracing::info_span!(target: TARGET, "request", otel.name = name, otel.kind = "server", door);
    if !span.is_disabled() {
        if let Some(parent) = remote_parent(get) {
            let _ = span.set_parent(parent);
        }
    }
    span
}
