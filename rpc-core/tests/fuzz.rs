//! Fuzzing with proptest (stable toolchain): the frame decoder and the
//! connection state machine get arbitrary input and must neither panic nor
//! hang nor corrupt their state.
//!
//! The default run (256 cases per target) is part of `cargo test`. For a
//! long run:
//!
//! ```sh
//! PROPTEST_CASES=100000 cargo test --release -p rpc-core --test fuzz decoder
//! PROPTEST_CASES=5000 cargo test --release -p rpc-core --test fuzz connection
//! ```

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use proptest::prelude::*;
use rpc_core::transport::{exchange_hello, hello_for};
use rpc_core::{ConnectionConfig, Frame, FrameCodec, Hello, Status, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Decoder, Encoder, FramedRead};

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(any::<char>(), 0..max).prop_map(|c| c.into_iter().collect())
}

fn body() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from)
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
            body()
        )
            .prop_map(|(id, method, deadline_ms, body)| Frame::Request {
                id,
                method,
                deadline_ms,
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
    ]
}

/// What a peer might send a server: mostly plausible frames (small ids,
/// known and unknown methods, short deadlines) so the state machine goes
/// deep, some garbage, and some frames a server must refuse.
#[derive(Debug, Clone)]
enum Step {
    Frame(Frame),
    Garbage(Vec<u8>),
}

fn step() -> impl Strategy<Value = Step> {
    let method = prop_oneof![Just("echo"), Just("hang"), Just("panic"), Just("nope")];
    prop_oneof![
        6 => (0u64..16, method, proptest::option::of(0u32..50), body()).prop_map(|(id, m, d, body)| {
            Step::Frame(Frame::Request { id, method: m.into(), deadline_ms: d, body })
        }),
        2 => (0u64..20).prop_map(|id| Step::Frame(Frame::Cancel { id })),
        1 => any::<u64>().prop_map(|nonce| Step::Frame(Frame::Ping { nonce })),
        1 => any::<u64>().prop_map(|nonce| Step::Frame(Frame::Pong { nonce })),
        1 => any_frame().prop_map(Step::Frame),
        1 => proptest::collection::vec(any::<u8>(), 0..32).prop_map(Step::Garbage),
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

    /// A server connection fed an arbitrary sequence after Hello: it ends
    /// when the peer goes, never panics, and answers only calls that were
    /// made, each no more often than it was made.
    #[test]
    fn connection_survives_arbitrary_frame_sequences(steps in proptest::collection::vec(step(), 0..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let outcome = runtime.block_on(run_sequence(steps));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

async fn run_sequence(steps: Vec<Step>) -> Result<(), String> {
    let cfg = ConnectionConfig::default();
    let (mut peer, mut server_end) = tokio::io::duplex(1 << 20);
    let (hp, hs) = tokio::join!(
        exchange_hello(&mut peer, hello_for(&cfg), cfg.max_frame),
        exchange_hello(&mut server_end, hello_for(&cfg), cfg.max_frame),
    );
    hp.unwrap();
    let service = Arc::new(common::TestService::default());
    let (conn, driver) =
        rpc_core::connection::start(server_end, &cfg, common::addr(), hs.unwrap(), Some(service));
    let driver = tokio::spawn(driver);
    let (read, mut write) = tokio::io::split(peer);
    // Ids may be reused once a call has finished: count them.
    let mut requested: HashMap<u64, usize> = HashMap::new();
    let mut encoder = FrameCodec::new(cfg.max_frame, cfg.max_frame);
    let mut wire = BytesMut::new();
    for step in steps {
        match step {
            Step::Frame(f) => {
                if let Frame::Request { id, .. } = &f {
                    *requested.entry(*id).or_default() += 1;
                }
                encoder.encode(f, &mut wire).unwrap();
            }
            Step::Garbage(g) => wire.extend_from_slice(&g),
        }
    }
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&wire).await;
        // Give the server time to answer, then leave.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = write.shutdown().await;
    });
    let reader = tokio::spawn(async move {
        let mut frames = FramedRead::new(read, FrameCodec::new(1 << 20, 1 << 20));
        let mut answered = Vec::new();
        while let Some(Ok(f)) = frames.next().await {
            if let Frame::Response { id, .. } = f {
                answered.push(id);
            }
        }
        answered
    });
    let ended = tokio::time::timeout(Duration::from_secs(120), async {
        let reason = driver.await;
        let answered = reader.await;
        let _ = writer.await;
        (reason, answered)
    })
    .await;
    let Ok((reason, answered)) = ended else {
        return Err("the connection did not end after the peer left".into());
    };
    let reason = reason.map_err(|e| format!("the driver panicked: {e}"))?;
    let answered = answered.map_err(|e| format!("reader: {e}"))?;
    if !conn.is_closed() {
        return Err(format!(
            "driver ended ({reason}) but the connection is not closed"
        ));
    }
    let mut answers: HashMap<u64, usize> = HashMap::new();
    for id in answered {
        let n = answers.entry(id).or_default();
        *n += 1;
        match requested.get(&id) {
            None => return Err(format!("answered call {id}, which was never requested")),
            Some(asked) if *n > *asked => {
                return Err(format!("answered call {id} {n} times, asked {asked}"));
            }
            Some(_) => {}
        }
    }
    Ok(())
}
