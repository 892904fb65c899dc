//! Call metadata and per-call options over real TLS on 127.0.0.1: set per
//! client and per call, from the untyped and the generated clients, read
//! by handlers; its bounds enforced on the wire.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use rpc_client::{CallOptions, Client, ClientError, Metadata, StatusCode};
use rpc_core::Frame;
use rpc_server::demo::DemoClient;
use rpc_tests::{client_tls, frame_bytes, goaway_after, hello_bytes, still_served, TestServer};

fn pairs(entries: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

#[tokio::test]
async fn metadata_from_the_client_and_the_call_reaches_the_handler() {
    let server = TestServer::demo().await;
    let mut defaults = Metadata::new();
    defaults.insert("tenant", "blue").unwrap();
    defaults.insert("region", "eu").unwrap();
    let client = Client::builder(client_tls(&server.certs))
        .metadata(defaults)
        .connect(&server.address())
        .await
        .unwrap();

    // The client's own metadata on every call.
    let got: Vec<(String, Vec<u8>)> = client.call("Demo.metadata", &()).await.unwrap();
    assert_eq!(got, pairs(&[("region", "eu"), ("tenant", "blue")]));

    // A call's entries are added, and win on the same key.
    let opts = CallOptions::new()
        .meta("tenant", "green")
        .unwrap()
        .meta("request-id", vec![0u8, 255])
        .unwrap();
    let got: Vec<(String, Vec<u8>)> = client.call_with("Demo.metadata", &(), &opts).await.unwrap();
    assert_eq!(
        got,
        vec![
            ("region".to_string(), b"eu".to_vec()),
            ("request-id".to_string(), vec![0, 255]),
            ("tenant".to_string(), b"green".to_vec()),
        ]
    );

    // The generated client, with options and without.
    let demo = DemoClient::new(client.clone());
    let tagged = demo.with_options(CallOptions::new().meta("trace", "t-1").unwrap());
    assert_eq!(
        tagged.metadata().await.unwrap(),
        pairs(&[("region", "eu"), ("tenant", "blue"), ("trace", "t-1")])
    );
    assert_eq!(
        demo.metadata().await.unwrap(),
        pairs(&[("region", "eu"), ("tenant", "blue")])
    );
    // Options belong to the client they were given to.
    assert!(demo.options().metadata.is_empty());
    assert_eq!(tagged.add(2, 3).await.unwrap(), 5);
}

#[tokio::test]
async fn a_typed_call_gets_its_own_timeout_without_a_wrapper() {
    let server = TestServer::demo().await;
    let demo = DemoClient::new(server.client().await);
    let quick = demo.with_options(CallOptions::new().timeout(Duration::from_millis(100)));
    let started = Instant::now();
    let err = quick.sleep(5_000).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Call(e) if e.code() == Some(StatusCode::DeadlineExceeded)
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The same connection and the client's default timeout otherwise.
    demo.sleep(10).await.unwrap();
    assert_eq!(quick.echo("still".into()).await.unwrap(), "still");
}

#[tokio::test]
async fn metadata_a_client_may_not_send_is_refused_before_sending() {
    assert!(CallOptions::new().meta("Upper", "x").is_err());
    assert!(CallOptions::new().meta("srpc-attempt", "1").is_err());
    let mut m = Metadata::new();
    let err = m.insert("big", vec![0u8; 9_000]).unwrap_err();
    assert!(err.to_string().contains("8192"), "{err}");
}

/// A `Request` frame written by hand (the library will not build one over
/// the bounds): bincode's varints, with `entries` as metadata.
fn raw_request(id: u8, entries: &[(&str, usize)]) -> Vec<u8> {
    fn put_len(out: &mut Vec<u8>, n: usize) {
        if n < 251 {
            out.push(n as u8);
        } else {
            out.push(251);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
    }
    let mut body = vec![1, id];
    put_len(&mut body, "Demo.echo".len());
    body.extend_from_slice(b"Demo.echo");
    body.push(0); // no deadline
    put_len(&mut body, entries.len());
    for (key, value_len) in entries {
        put_len(&mut body, key.len());
        body.extend_from_slice(key.as_bytes());
        put_len(&mut body, *value_len);
        body.extend(std::iter::repeat_n(b'v', *value_len));
    }
    // The body: a byte string holding the String "x", bincode-encoded.
    body.extend_from_slice(&[2, 1, b'x']);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(body);
    frame
}

#[tokio::test]
async fn metadata_over_its_bounds_gets_a_goaway_naming_the_bound() {
    let server = TestServer::demo().await;
    let honest = server.client().await;

    // Within the bounds, by hand: served (the encoding above is right).
    let mut tls = server.raw_tls().await;
    let mut ok = hello_bytes();
    ok.extend(raw_request(1, &[("tenant", 4)]));
    rpc_tests::send(&mut tls, &ok).await;
    let mut got = Vec::new();
    let answered = |got: &[u8]| {
        rpc_tests::decode_frames(got).iter().any(|f| {
            matches!(
                f,
                Frame::Response {
                    id: 1,
                    result: Ok(_)
                }
            )
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !answered(&got) && Instant::now() < deadline {
        let mut buf = [0u8; 4096];
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout(Duration::from_millis(200), tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            Ok(_) => break,
            Err(_) => {}
        }
    }
    assert!(answered(&got), "{:?}", rpc_tests::decode_frames(&got));

    let keys: Vec<String> = (0..33).map(|i| format!("k{i}")).collect();
    let many: Vec<(&str, usize)> = keys.iter().map(|k| (k.as_str(), 1)).collect();
    let cases: Vec<(Vec<(&str, usize)>, &str)> = vec![
        (many, "limit is 32"),
        (vec![("big", 9_000)], "limit is 8192"),
        (vec![("Upper", 1)], "lowercase ASCII"),
        (vec![("a", 1), ("a", 1)], "repeats the key"),
    ];
    for (entries, says) in cases {
        let mut bytes = hello_bytes();
        bytes.extend(raw_request(1, &entries));
        let reason = goaway_after(&server, &bytes).await;
        assert!(reason.contains(says), "{says}: {reason}");
        assert!(reason.contains("metadata"), "{reason}");
    }
    still_served(&honest).await;
    // The honest client's own metadata still goes through.
    let opts = CallOptions::new().meta("tenant", "blue").unwrap();
    let got: Vec<(String, Vec<u8>)> = honest.call_with("Demo.metadata", &(), &opts).await.unwrap();
    assert_eq!(got, pairs(&[("tenant", "blue")]));
}

#[test]
fn a_request_with_metadata_is_one_frame_the_library_reads_back() {
    // The hand encoding above matches the library's.
    let mut m = Metadata::new();
    m.insert("tenant", "vvvv").unwrap();
    let frame = Frame::Request {
        id: 1,
        method: "Demo.echo".into(),
        deadline_ms: None,
        metadata: m,
        body: bytes::Bytes::from_static(&[1, b'x']),
    };
    assert_eq!(frame_bytes(frame), raw_request(1, &[("tenant", 4)]));
}
