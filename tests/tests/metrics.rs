//! Call metrics through the `metrics` facade into Prometheus's exporter
//! (its own binary: the recorder is process-wide): the duration
//! histograms' counts, the server's and the client's, equal the calls
//! made, per method and status, failed calls and unknown methods included;
//! both sides' sampled gauges, round trips and bytes appear.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use rpc_server::metrics::{DURATION_BUCKETS, SERVER_CALL_DURATION};
use rpc_server::{demo, devcerts, Server};
use rpc_tests::{server_tls, TestServer};

/// `{side}_call_duration_count` by (method, status), from the text.
fn counts(text: &str, side: &str) -> HashMap<(String, String), u64> {
    let prefix = format!("rpc_{side}_call_duration_count{{");
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let (labels, value) = rest.rsplit_once("} ").unwrap();
        let label = |name: &str| {
            let start = labels.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
            labels[start..].split('"').next().unwrap().to_owned()
        };
        // A series shows as soon as it is registered, at 0 until counted.
        let n: u64 = value.trim().parse().unwrap();
        if n > 0 {
            out.insert((label("rpc_method"), label("rpc_response_status_code")), n);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_duration_histogram_counts_every_call_by_method_and_status() {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(SERVER_CALL_DURATION.into()),
            &DURATION_BUCKETS,
        )
        .unwrap()
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    let certs = devcerts::generate().unwrap();
    let mut options = rpc_server::ServerOptions::default();
    // Round trips measured soon (both sides announce 100 ms), for the
    // sampled histogram.
    options.connection.heartbeat_interval = Duration::from_millis(100);
    let server = Server::builder(server_tls(&certs))
        .options(options)
        .router(demo::router())
        .metrics(true)
        .build()
        .unwrap();
    let server = TestServer::serve(certs, server).await;
    let mut config = rpc_core::ConnectionConfig::default();
    config.heartbeat_interval = Duration::from_millis(100);
    let client = rpc_client::Client::builder(rpc_tests::client_tls(&server.certs))
        .connection_config(config)
        .server_name("localhost")
        .metrics(true)
        .connect(&server.address())
        .await
        .unwrap();

    for _ in 0..5 {
        let _: String = client.call("Demo.echo", "x").await.unwrap();
    }
    for _ in 0..2 {
        let e = client
            .call::<_, i64>("Demo.add", &(i64::MAX, 1i64))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
    }
    let _: i64 = client.call("Demo.add", &(1i64, 2i64)).await.unwrap();
    // Names the peer makes up are one bucket, whatever they are.
    for name in ["Demo.nope", "x", "y.z"] {
        assert!(client.call::<_, ()>(name, &()).await.is_err());
    }
    // A call the caller gives up on: recorded as cancelled once it ends.
    let short = rpc_client::CallOptions::new().timeout(Duration::from_millis(50));
    assert!(client
        .call_with::<_, ()>("Demo.sleep", &5_000u64, &short)
        .await
        .is_err());
    let _ = client.health("").await.unwrap();

    let mut want: HashMap<(String, String), u64> = HashMap::new();
    let mut add = |m: &str, s: &str, n: u64| {
        want.insert((m.to_owned(), s.to_owned()), n);
    };
    add("Demo.echo", "OK", 5);
    add("Demo.add", "INVALID_ARGUMENT", 2);
    add("Demo.add", "OK", 1);
    add("_OTHER", "UNKNOWN_METHOD", 3);
    add("srpc.health.Check", "OK", 1);
    // The server ends the abandoned call at its deadline or at the
    // caller's Cancel, whichever it sees first.
    let mut got = HashMap::new();
    let mut sleep = 0;
    for _ in 0..200 {
        got = counts(&handle.render(), "server");
        let ended = |s: &str| {
            got.get(&("Demo.sleep".into(), s.into()))
                .copied()
                .unwrap_or(0)
        };
        sleep = ended("CANCELLED") + ended("DEADLINE_EXCEEDED");
        if sleep == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        sleep,
        1,
        "the abandoned call is recorded once\n{}",
        handle.render()
    );
    got.retain(|(m, _), _| m != "Demo.sleep");
    assert_eq!(got, want, "\n{}", handle.render());
    // The client's side: the same calls, with the client's verdicts.
    let mut client_side = counts(&handle.render(), "client");
    assert_eq!(
        client_side.remove(&("Demo.sleep".into(), "DEADLINE_EXCEEDED".into())),
        Some(1)
    );
    let mut want_client = want.clone();
    for name in ["Demo.nope", "x", "y.z"] {
        want_client.insert((name.to_owned(), "UNKNOWN_METHOD".to_owned()), 1);
    }
    want_client.remove(&("_OTHER".to_owned(), "UNKNOWN_METHOD".to_owned()));
    assert_eq!(client_side, want_client, "\n{}", handle.render());
    assert!(
        handle.render().contains("rpc_server_call_duration_bucket{"),
        "a histogram, not a summary"
    );

    // Sampled each second: connections, calls in flight, round trips, bytes.
    let value = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let mut text = String::new();
    let sampled = |text: &str| {
        let positive = |name| value(text, name).is_some_and(|n| n > 0.0);
        positive("srpc_server_connection_rtt_count")
            && positive("srpc_client_connection_rtt_count")
            && value(text, "srpc_client_sent_bytes").is_some_and(|n| n > 1000.0)
    };
    for _ in 0..300 {
        text = handle.render();
        if sampled(&text) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for side in ["server", "client"] {
        let name = |pattern: &str| pattern.replace("SIDE", side);
        let get = |pattern: &str| value(&text, &name(pattern));
        assert_eq!(get("srpc_SIDE_connections"), Some(1.0), "{side}\n{text}");
        assert_eq!(get("rpc_SIDE_active_calls"), Some(0.0), "{side}\n{text}");
        assert!(
            get("srpc_SIDE_connection_rtt_count").is_some_and(|n| n > 0.0),
            "{side}\n{text}"
        );
        // Thirteen calls and a TLS handshake at least: over a kilobyte
        // each way.
        let received = get("srpc_SIDE_received_bytes").unwrap_or(0.0);
        let sent = get("srpc_SIDE_sent_bytes").unwrap_or(0.0);
        assert!(
            received > 1000.0 && sent > 1000.0,
            "{side}: {received} {sent}\n{text}"
        );
    }
}
