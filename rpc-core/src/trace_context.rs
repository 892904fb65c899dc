//! Trace context across calls (cargo feature `otel`): the W3C
//! `traceparent` / `tracestate` of the caller's current span travel in the
//! call's metadata, and the callee's span for the call continues that
//! trace. Both through OpenTelemetry's global text-map propagator (set it
//! to `TraceContextPropagator` once, with the tracer provider) and
//! `tracing-opentelemetry`'s span extension, so `tracing` spans are what
//! an application writes.
//!
//! ```text
//! client: Span::current() ─inject─► metadata {traceparent, tracestate}
//! server: metadata ─extract─► parent of the call's span `rpc.server`
//! ```
//!
//! Not here: exporting spans (the application's tracer provider).

use std::borrow::Cow;

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metadata::Metadata;

/// The metadata keys the propagator writes.
struct Inject<'a>(&'a mut Metadata);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator's keys (`traceparent`, `tracestate`) are valid
        // metadata keys; one the metadata refuses is skipped.
        let _ = self.0.insert(&key.to_ascii_lowercase(), value);
    }
}

struct Extract<'a>(&'a Metadata);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get_str(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

/// `metadata` with the current span's trace context added; as it is, not
/// copied, outside any span.
pub fn with_current(metadata: Cow<'_, Metadata>) -> Cow<'_, Metadata> {
    let span = tracing::Span::current();
    if span.is_none() {
        return metadata;
    }
    let cx = span.context();
    let mut metadata = metadata.into_owned();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut Inject(&mut metadata))
    });
    Cow::Owned(metadata)
}

/// A span for serving a call to `method` whose caller sent `metadata`:
/// `rpc.server`, a child of the caller's span when the metadata carries
/// its trace context.
pub fn server_span(method: &str, metadata: &Metadata) -> tracing::Span {
    let span = tracing::info_span!("rpc.server", otel.kind = "server", rpc.method = %method);
    if !span.is_disabled() && metadata.get("traceparent").is_some() {
        let parent =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&Extract(metadata)));
        let _ = span.set_parent(parent);
    }
    span
}
