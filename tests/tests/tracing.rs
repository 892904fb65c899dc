//! Trace context across a call and a stream (feature `otel`, on in this
//! test crate): the server's span for each is a child of the client's
//! span, in the same trace, recorded by an in-memory exporter.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use rpc_tests::TestServer;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test]
async fn the_servers_call_span_is_a_child_of_the_callers_span() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    // On this (current-thread) runtime every task, the server's included,
    // records into it.
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let store = rpc_server::files::FileStore::open(dir.path()).unwrap();
    let router = rpc_server::demo::router().service(rpc_core::files::FilesServer::new(store));
    let server = TestServer::start(router, rpc_server::ServerOptions::default()).await;
    let client = server.client().await;
    let sum: i64 = client
        .call("Demo.add", &(2i64, 3i64))
        .instrument(tracing::info_span!("checkout"))
        .await
        .unwrap();
    assert_eq!(sum, 5);
    // A stream call carries it too (a download of a file that is not
    // there: the stream ends with NotFound, served all the same).
    let files = rpc_core::files::FilesClient::new(client.clone());
    async {
        let mut pieces = files.download("absent".into(), 0).await.unwrap();
        assert!(pieces.message().await.is_err());
    }
    .instrument(tracing::info_span!("fetch"))
    .await;
    // A call outside any traced span starts no trace on the server's side
    // of this one (it gets a root span of its own).
    let _: String = client.call("Demo.echo", "untraced").await.unwrap();
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let client_span = spans
        .iter()
        .find(|s| s.name == "checkout")
        .expect("the client's span");
    let fetch = spans
        .iter()
        .find(|s| s.name == "fetch")
        .expect("the stream's span");
    let served: Vec<_> = spans.iter().filter(|s| s.name == "rpc.server").collect();
    assert_eq!(served.len(), 3, "{spans:#?}");
    let streamed = *served
        .iter()
        .find(|s| s.parent_span_id == fetch.span_context.span_id())
        .expect("the stream's server span is a child of the caller's");
    assert_eq!(
        streamed.span_context.trace_id(),
        fetch.span_context.trace_id()
    );
    let served: Vec<_> = served
        .into_iter()
        .filter(|s| s.span_context.span_id() != streamed.span_context.span_id())
        .collect();
    let child = served
        .iter()
        .find(|s| s.parent_span_id == client_span.span_context.span_id())
        .expect("a server span whose parent is the client's span");
    assert_eq!(
        child.span_context.trace_id(),
        client_span.span_context.trace_id()
    );
    let other = served
        .iter()
        .find(|s| s.span_context.span_id() != child.span_context.span_id())
        .unwrap();
    assert_ne!(
        other.span_context.trace_id(),
        client_span.span_context.trace_id()
    );
}
