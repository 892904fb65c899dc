//! Fuzzing with proptest (stable toolchain): the frame decoder and both
//! sides' connection drivers get hostile input and must neither panic nor
//! hang nor corrupt their state.
//!
//! The input is shaped to get past framing: valid length prefixes in front
//! of valid or mutated bodies, one stream split at every byte boundary,
//! time passing between frames on a paused clock (cancels crossing
//! replies, deadlines and heartbeats expiring mid-sequence), frames large
//! enough for the reader's pooled-buffer path, a hostile server facing a
//! client, and arbitrary `Hello` values. Each connection target prints how
//! many of its cases reached body decoding, and fails if too few did.
//!
//! The default run (256 cases per target) is part of `cargo test`; the
//! coverage-guided targets in `fuzz/` share the hostile peer
//! (`common/hostile.rs`). For a long run:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test --release -p rpc-core --test fuzz decoder
//! PROPTEST_CASES=5000 cargo test --release -p rpc-core --test fuzz -- --nocapture plans
//! ```

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "common/hostile.rs"]
mod hostile;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use rpc_core::{ConnectionConfig, Frame, FrameCodec, Hello, Status, StatusCode};
use tokio_util::codec::{Decoder, Encoder};

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(|c| c.into_iter().collect())
}

fn body() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
}

/// Metadata within its rules: up to 4 entries of lowercase keys.
fn metadata() -> impl Strategy<Value = rpc_core::Metadata> {
    const KEY_BYTES: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789._-";
    let key = proptest::collection::vec(0..KEY_BYTES.len(), 1..12).prop_map(|ix| {
        ix.into_iter()
            .map(|i| char::from(KEY_BYTES[i]))
            .collect::<String>()
    });
    proptest::collection::vec((key, body()), 0..4).prop_map(|entries| {
        let mut m = rpc_core::Metadata::new();
        for (key, value) in entries {
            // A reserved key is refused: that entry is left out.
            let _ = m.insert(&key, value);
        }
        m
    })
}

fn status() -> impl Strategy<Value = Status> {
    (0..StatusCode::ALL.len(), text(16)).prop_map(|(i, m)| Status::new(StatusCode::ALL[i], m))
}

/// Any frame, with any field values.
fn any_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(v, m, h, i)| {
            Frame::Hello(Hello {
                version: v,
                max_frame: m,
                heartbeat_ms: h,
                max_in_flight: i,
            })
        }),
        (
            any::<u64>(),
            text(16),
            proptest::option::of(any::<u32>()),
            metadata(),
            body()
        )
            .prop_map(|(id, method, deadline_ms, metadata, body)| Frame::Request {
                id,
                method,
                deadline_ms,
                metadata,
                body
            }),
        (
            any::<u64>(),
            prop_oneof![body().prop_map(Ok), status().prop_map(Err)]
        )
            .prop_map(|(id, result)| Frame::Response { id, result }),
        any::<u64>().prop_map(|id| Frame::Cancel { id }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        text(32).prop_map(|reason| Frame::GoAway { reason }),
        (
            any::<u64>(),
            text(16),
            proptest::option::of(any::<u32>()),
            metadata(),
            body(),
            any::<bool>()
        )
            .prop_map(|(id, method, deadline_ms, metadata, body, sends_stream)| {
                Frame::Open {
                    id,
                    method,
                    deadline_ms,
                    metadata,
                    body,
                    sends_stream,
                }
            }),
        (any::<u64>(), any::<bool>(), body()).prop_map(|(id, more, bytes)| Frame::Data {
            id,
            more,
            bytes
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(id, bytes)| Frame::Credit { id, bytes }),
        any::<u64>().prop_map(|id| Frame::End { id }),
        any::<u64>().prop_map(|id| Frame::Reset { id }),
    ]
}

proptest! {
    /// Arbitrary bytes, split at arbitrary points: the decoder returns
    /// frames or an error, never panics, and what it returns re-encodes to
    /// the same frame.
    #[test]
    fn decoder_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        cuts in proptest::collection::vec(1usize..64, 0..16),
    ) {
        let mut codec = FrameCodec::new(1024, 1024);
        let mut src = BytesMut::new();
        let mut rest = &bytes[..];
        let mut pieces = cuts.into_iter();
        'feed: loop {
            let n = pieces.next().unwrap_or(rest.len()).min(rest.len());
            src.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            loop {
                match codec.decode(&mut src) {
                    Ok(Some(frame)) => {
                        let mut again = BytesMut::new();
                        FrameCodec::new(1024, 1024).encode(frame.clone(), &mut again).unwrap();
                        let back = FrameCodec::new(1024, 1024).decode(&mut again).unwrap();
                        prop_assert_eq!(back, Some(frame));
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            if rest.is_empty() {
                break;
            }
        }
    }

    /// Arbitrary frames round-trip through encode and decode, however the
    /// bytes are split.
    #[test]
    fn decoder_round_trips_arbitrary_frames(
        frames in proptest::collection::vec(any_frame(), 1..8),
        chunk in 1usize..100,
    ) {
        let mut codec = FrameCodec::new(1 << 16, 1 << 16);
        let mut wire = BytesMut::new();
        for f in &frames {
            codec.encode(f.clone(), &mut wire).unwrap();
        }
        let mut src = BytesMut::new();
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            src.extend_from_slice(piece);
            while let Some(f) = codec.decode(&mut src).unwrap() {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
    }
}

/// Valid frames, encoded, then some bytes of their bodies changed, dropped
/// or added; the length prefix always matches the body.
fn mutated_body() -> impl Strategy<Value = Vec<u8>> {
    (
        any_frame(),
        proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..4),
    )
        .prop_map(|(frame, edits)| {
            let mut body = hostile::encode_frame(frame).split_off(4).to_vec();
            for (at, byte, kind) in edits {
                let at = at % (body.len() + 1);
                match kind {
                    0 if at < body.len() => body[at] = byte,
                    1 if at < body.len() => {
                        body.remove(at);
                    }
                    _ => body.insert(at, byte),
                }
            }
            body
        })
}

proptest! {
    /// Valid length prefixes in front of valid or mutated bodies: every
    /// case reaches body decoding, which returns the frame or a codec error
    /// and never panics; what decodes re-encodes to the same frame.
    #[test]
    fn decoder_survives_mutated_bodies(bodies in proptest::collection::vec(mutated_body(), 1..6)) {
        let mut codec = FrameCodec::new(1 << 16, 1 << 16);
        for body in bodies {
            let mut src = BytesMut::new();
            src.extend_from_slice(&(body.len() as u32).to_be_bytes());
            src.extend_from_slice(&body);
            match codec.decode(&mut src) {
                Ok(Some(frame)) => {
                    // The same frame, not always the same bytes: bincode
                    // also reads integers written in a longer form.
                    let mut again = hostile::encode_frame(frame.clone());
                    prop_assert_eq!(codec.decode(&mut again).unwrap(), Some(frame));
                }
                Ok(None) => prop_assert!(false, "a complete frame was not decoded"),
                Err(rpc_core::Error::Codec(_)) => {}
                Err(e) => prop_assert!(false, "not a body error: {e}"),
            }
        }
    }
}

/// One live stream, cut in two at every byte boundary (and a frame from
/// the reader's large-frame path at a spread of boundaries): the frames
/// that come out are those that went in.
#[test]
fn one_stream_split_at_every_byte_boundary() {
    let small = vec![
        Frame::Hello(rpc_core::transport::hello_for(&ConnectionConfig::default())),
        Frame::Request {
            id: 300,
            method: "echo".into(),
            deadline_ms: Some(70_000),
            metadata: rpc_core::Metadata::new(),
            body: Bytes::from_static(b"abc"),
        },
        Frame::Response {
            id: 1,
            result: Err(Status::internal("no")),
        },
        Frame::Cancel { id: 251 },
        Frame::Ping { nonce: u64::MAX },
        Frame::GoAway {
            reason: "bye".into(),
        },
    ];
    let large = Frame::Response {
        id: 9,
        result: Ok(Bytes::from(vec![5u8; 70_000])),
    };
    let check = |frames: &[Frame], cuts: &mut dyn Iterator<Item = usize>| {
        let mut wire = BytesMut::new();
        for f in frames {
            wire.extend_from_slice(&hostile::encode_frame(f.clone()));
        }
        for cut in cuts {
            let mut codec = FrameCodec::new(1 << 20, 1 << 20);
            let mut src = BytesMut::from(&wire[..cut]);
            let mut out = Vec::new();
            while let Some(f) = codec.decode(&mut src).unwrap() {
                out.push(f);
            }
            src.extend_from_slice(&wire[cut..]);
            while let Some(f) = codec.decode(&mut src).unwrap() {
                out.push(f);
            }
            assert_eq!(out, frames, "cut at {cut}");
            assert!(src.is_empty(), "cut at {cut}");
        }
    };
    let len: usize = small
        .iter()
        .map(|f| hostile::encode_frame(f.clone()).len())
        .sum();
    check(&small, &mut (0..=len));
    let mut with_large = small.clone();
    with_large.insert(2, large);
    let total = len + hostile::encode_frame(with_large[2].clone()).len();
    check(&with_large, &mut (0..=total).step_by(97).chain([total]));
}

fn plan_frame(client: bool) -> impl Strategy<Value = hostile::Step> {
    use hostile::Step;
    let method = || proptest::sample::select(&hostile::METHODS[..]);
    let ids = 0u64..16;
    prop_oneof![
        6 => (ids.clone(), method(), proptest::option::of(0u32..3000), body())
            .prop_map(|(id, m, d, body)| Step::Frame(Frame::Request {
                id, method: m.into(), deadline_ms: d, metadata: rpc_core::Metadata::new(), body })),
        // What a server sends a client: replies to calls made or not.
        (if client { 6 } else { 1 }) => (ids.clone(), prop_oneof![body().prop_map(Ok), status().prop_map(Err)])
            .prop_map(|(id, result)| Step::Frame(Frame::Response { id, result })),
        3 => ids.clone().prop_map(|id| Step::Frame(Frame::Cancel { id })),
        // Streams: calls opened as streams, their pieces (small, or a
        // 64 KiB one), credit, ends and resets, on the same few ids.
        3 => (ids.clone(), method(), proptest::option::of(0u32..3000), body(), any::<bool>())
            .prop_map(|(id, m, d, body, sends_stream)| Step::Frame(Frame::Open {
                id, method: m.into(), deadline_ms: d, metadata: rpc_core::Metadata::new(), body, sends_stream })),
        4 => (ids.clone(), any::<bool>(), prop_oneof![body(), Just(Bytes::from(vec![3u8; 65_536]))])
            .prop_map(|(id, more, bytes)| Step::Frame(Frame::Data { id, more, bytes })),
        2 => (0u64..16, prop_oneof![0u64..1_000_000, any::<u64>()])
            .prop_map(|(id, bytes)| Step::Frame(Frame::Credit { id, bytes })),
        1 => ids.clone().prop_map(|id| Step::Frame(Frame::End { id })),
        1 => ids.clone().prop_map(|id| Step::Frame(Frame::Reset { id })),
        1 => any::<u64>().prop_map(|nonce| Step::Frame(Frame::Ping { nonce })),
        1 => any::<u64>().prop_map(|nonce| Step::Frame(Frame::Pong { nonce })),
        1 => any_frame().prop_map(Step::Frame),
        2 => mutated_body().prop_map(Step::Body),
        1 => proptest::collection::vec(any::<u8>(), 0..32).prop_map(Step::Raw),
        // Time: within deadlines, past them, past the heartbeat timeout.
        4 => prop_oneof![0u64..50, 0u64..4000, 10_000u64..20_000]
            .prop_map(|ms| Step::Wait(Duration::from_millis(ms))),
        (if client { 5 } else { 1 }) => (method(), 1u64..4000, body()).prop_map(|(m, ms, body)| {
            Step::Call { method: m, timeout: Duration::from_millis(ms), body }
        }),
        // The reader's large-frame path (64 KiB and over), and past the limit.
        1 => (ids.clone(), 60_000usize..300_000).prop_map(|(id, len)| Step::Frame(Frame::Request {
            id, method: "echo".into(), deadline_ms: None, metadata: rpc_core::Metadata::new(), body: Bytes::from(vec![7u8; len]) })),
        1 => (ids, prop_oneof![1usize..200, 1000usize..1_000_000], any::<bool>()).prop_map(|(id, depth, request)| {
            let body = Bytes::from(hostile::deep_expr(depth));
            if request {
                Step::Frame(Frame::Request { id, method: "deep".into(), deadline_ms: None, metadata: rpc_core::Metadata::new(), body })
            } else {
                Step::Frame(Frame::Response { id, result: Ok(body) })
            }
        }),
    ]
}

fn hello_value() -> impl Strategy<Value = Hello> {
    let version = prop_oneof![Just(rpc_core::PROTOCOL_VERSION), any::<u16>()];
    let edge = |v: u32| {
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(63),
            Just(64),
            Just(u32::MAX),
            Just(v),
            any::<u32>()
        ]
    };
    (version, edge(1 << 20), edge(5000), edge(100)).prop_map(
        |(version, max_frame, heartbeat_ms, max_in_flight)| Hello {
            version,
            max_frame,
            heartbeat_ms,
            max_in_flight,
        },
    )
}

fn plan(client: bool) -> impl Strategy<Value = hostile::Plan> {
    (
        proptest::option::weighted(0.1, hello_value()),
        proptest::collection::vec(plan_frame(client), 0..40),
        prop_oneof![Just(usize::MAX), 1usize..64],
    )
        .prop_map(|(hello, steps, chunk)| hostile::Plan {
            hello,
            steps,
            chunk,
        })
}

/// Runs `plans` of one side and reports how far their input got.
fn run_plans(name: &str, client: bool) {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let (cases, past, frames, bodies) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::default());
    let result = runner.run(&plan(client), |plan| {
        let run = if client {
            hostile::run_paused(hostile::run_client(&plan))
        } else {
            hostile::run_paused(hostile::run_server(&plan))
        };
        let seen = match run {
            Ok(seen) => seen,
            Err(e) => return Err(TestCaseError::fail(e)),
        };
        cases.fetch_add(1, Relaxed);
        past.fetch_add(usize::from(seen.bodies_decoded > 0), Relaxed);
        bodies.fetch_add(seen.bodies_decoded, Relaxed);
        frames.fetch_add(seen.frames_valid, Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    let (cases, past) = (cases.into_inner(), past.into_inner());
    println!(
        "{name}: {cases} cases, {past} ({:.0} %) past framing into body decoding; {} bodies decoded, {} valid frames",
        100.0 * past as f64 / cases.max(1) as f64,
        bodies.into_inner(),
        frames.into_inner(),
    );
    // Plans are shaped to get there: most must.
    assert!(
        past * 10 >= cases * 7,
        "{name}: only {past} of {cases} cases got past framing"
    );
}

/// A server connection facing hostile plans: no panic, ends when the peer
/// leaves, answers only calls made and each at most as often as made.
#[test]
fn server_survives_hostile_plans() {
    run_plans("server plans", false);
}

/// A client connection facing a hostile server (stray and deep replies,
/// requests, floods, odd `Hello`s) while it makes calls: no panic, every
/// call ends within its timeout, the connection ends when the peer leaves.
#[test]
fn client_survives_hostile_plans() {
    run_plans("client plans", true);
}

proptest! {
    /// Plans read from raw bytes, as the coverage-guided targets read them:
    /// any bytes are some plan.
    #[test]
    fn plans_from_raw_bytes_run_on_both_sides(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let plan = hostile::Plan::from_bytes(&data);
        hostile::run_paused(hostile::run_server(&plan)).map_err(TestCaseError::fail)?;
        hostile::run_paused(hostile::run_client(&plan)).map_err(TestCaseError::fail)?;
    }
}
