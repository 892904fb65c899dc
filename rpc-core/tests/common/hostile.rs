//! A hostile peer for fuzzing a connection driver, on either side.
//!
//! A [`Plan`] is what the peer does after (or instead of) a proper `Hello`:
//! frames with valid length prefixes, mutated bodies behind valid
//! prefixes, raw bytes, time passing, and (against a client) calls the
//! local side makes meanwhile. Its bytes go out in pieces of `chunk` bytes,
//! so frames arrive split at arbitrary points, with the plan's waits
//! between them. Everything runs on a paused clock: a plan of minutes takes
//! milliseconds.
//!
//! [`run_server`] and [`run_client`] drive one plan against a server or a
//! client connection and check what must hold whatever the peer does: no
//! panic, the connection ends once the peer has gone, a server answers only
//! calls that were made and each at most as often as it was made, and a
//! client's calls all end within their timeout.
//!
//! Used by the proptest targets (`tests/fuzz.rs`, stable) and by the
//! coverage-guided targets under `fuzz/` (libFuzzer, nightly), which build a
//! plan from raw bytes with [`Plan::from_bytes`].

// Test code: a panic is how a fuzz target reports failure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    dead_code,
    unreachable_pub,
    missing_docs
)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use rpc_core::connection::start;
use rpc_core::transport::{exchange_hello, hello_for};
use rpc_core::BoxFuture;
use rpc_core::{CallContext, ConnectionConfig, Dispatch, Error, Frame, FrameCodec, Hello, Status};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio_util::codec::{Decoder, Encoder, FramedRead};

/// Methods the server side serves: `echo`, `hang` (never answers), `deep`
/// (decodes its argument as [`Expr`]), `relay` (sends each item of a
/// stream call back, then answers); anything else is unknown. (No
/// handler panics here: libFuzzer counts any panic as a crash, even one
/// the driver catches. `driver.rs` tests a panicking handler.)
pub const METHODS: [&str; 5] = ["echo", "hang", "deep", "nope", "relay"];

/// The largest frame either side accepts here: small enough that a plan
/// can cross it, large enough for the reader's pooled-buffer path (64 KiB
/// and over).
pub const MAX_FRAME: usize = 256 * 1024;

/// A recursive type, for bodies that nest deeply.
#[derive(Debug, Serialize, Deserialize)]
pub enum Expr {
    Lit(i64),
    Neg(Box<Expr>),
    List(Vec<Expr>),
}

/// One thing the hostile peer does.
#[derive(Debug, Clone)]
pub enum Step {
    /// A frame, with a correct length prefix.
    Frame(Frame),
    /// A frame body (valid, mutated or made up) behind a correct length
    /// prefix.
    Body(Vec<u8>),
    /// Bytes as they are: a wrong length prefix, garbage.
    Raw(Vec<u8>),
    /// Time passes before the next step.
    Wait(Duration),
    /// The local side (a client) starts a call; a server plan skips it.
    Call {
        method: &'static str,
        timeout: Duration,
        body: Bytes,
    },
}

/// What a hostile peer does on one connection.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Sent instead of a proper `Hello`, if set.
    pub hello: Option<Hello>,
    pub steps: Vec<Step>,
    /// Bytes per write: 1 sends every byte on its own.
    pub chunk: usize,
}

/// What a run saw, for the report of how far input got.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// Frames whose length prefix was within the limit and whose body was
    /// complete: they reached body decoding.
    pub bodies_decoded: usize,
    /// The same frames that also decoded as a frame.
    pub frames_valid: usize,
}

impl Outcome {
    pub fn add(&mut self, other: Outcome) {
        self.bodies_decoded += other.bodies_decoded;
        self.frames_valid += other.frames_valid;
    }
}

fn config() -> ConnectionConfig {
    let mut cfg = ConnectionConfig::default();
    cfg.max_frame = MAX_FRAME;
    cfg
}

fn addr() -> SocketAddr {
    "127.0.0.1:1".parse().unwrap()
}

/// A frame with its length prefix.
pub fn encode_frame(frame: Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    // The peer may send what our encoder would refuse to: encode the body
    // without the limit, prefix it by hand.
    FrameCodec::new(usize::MAX >> 1, u32::MAX as usize)
        .encode(frame, &mut buf)
        .unwrap();
    buf
}

/// A `Neg` chain `depth` deep around `Lit(1)`, as bincode writes it.
pub fn deep_expr(depth: usize) -> Vec<u8> {
    let mut wire = vec![1u8; depth];
    wire.extend_from_slice(&[0, 2]);
    wire
}

/// The plan's bytes, in order, with the time to wait before each piece.
fn wire(plan: &Plan, cfg: &ConnectionConfig) -> Vec<(Duration, Bytes)> {
    let mut out = Vec::new();
    let mut pending = BytesMut::new();
    let mut wait = Duration::ZERO;
    let hello = plan.hello.unwrap_or_else(|| hello_for(cfg));
    pending.extend_from_slice(&encode_frame(Frame::Hello(hello)));
    let flush = |pending: &mut BytesMut, wait: &mut Duration, out: &mut Vec<_>| {
        let bytes = pending.split().freeze();
        for (i, piece) in bytes.chunks(plan.chunk.max(1)).enumerate() {
            let before = if i == 0 { *wait } else { Duration::ZERO };
            out.push((before, bytes.slice_ref(piece)));
        }
        *wait = Duration::ZERO;
    };
    for step in &plan.steps {
        match step {
            Step::Frame(f) => pending.extend_from_slice(&encode_frame(f.clone())),
            Step::Body(b) => {
                pending.put_u32(b.len() as u32);
                pending.extend_from_slice(b);
            }
            Step::Raw(r) => pending.extend_from_slice(r),
            Step::Wait(d) => {
                flush(&mut pending, &mut wait, &mut out);
                wait += *d;
            }
            Step::Call { .. } => {}
        }
    }
    flush(&mut pending, &mut wait, &mut out);
    out
}

/// How far the plan's bytes get through framing (after the `Hello`): a
/// length within the limit with all its bytes there reaches body decoding.
pub fn classify(plan: &Plan) -> Outcome {
    decoded(plan).0
}

/// [`classify`], and the requests among the frames that decode, by id: what
/// a server reads of the plan (mutated bodies can be requests too).
fn decoded(plan: &Plan) -> (Outcome, HashMap<u64, usize>) {
    let cfg = config();
    let mut all = BytesMut::new();
    for (_, piece) in wire(plan, &cfg) {
        all.extend_from_slice(&piece);
    }
    let mut outcome = Outcome::default();
    let mut requested: HashMap<u64, usize> = HashMap::new();
    let mut codec = FrameCodec::new(cfg.max_frame, cfg.max_frame);
    let mut first = true;
    loop {
        let complete = all.len() >= 4 && {
            let len = u32::from_be_bytes([all[0], all[1], all[2], all[3]]) as usize;
            len <= cfg.max_frame && all.len() >= 4 + len
        };
        match codec.decode(&mut all) {
            Ok(Some(frame)) => {
                if !first {
                    outcome.bodies_decoded += 1;
                    outcome.frames_valid += 1;
                }
                if let Frame::Request { id, .. } | Frame::Open { id, .. } = frame {
                    *requested.entry(id).or_default() += 1;
                }
            }
            Ok(None) => break,
            Err(Error::Codec(_)) if complete => {
                if !first {
                    outcome.bodies_decoded += 1;
                }
                break;
            }
            Err(_) => break,
        }
        first = false;
    }
    (outcome, requested)
}

/// The server side's service.
#[derive(Default)]
struct Service;

impl Dispatch for Service {
    fn dispatch(&self, ctx: CallContext, body: Bytes) -> BoxFuture<Result<Bytes, Status>> {
        Box::pin(async move {
            match ctx.method() {
                "echo" => Ok(body),
                "hang" => std::future::pending().await,
                "deep" => {
                    rpc_core::service::decode_args::<Expr>("deep", &ctx, &body)?;
                    Ok(Bytes::new())
                }
                "relay" => {
                    let Some(mut stream) = ctx.take_stream() else {
                        return Err(Status::failed_precondition("open relay as a stream"));
                    };
                    if let Some(receiver) = stream.receiver.as_mut() {
                        while let Some(item) = receiver.next().await {
                            let item = item.map_err(|e| Status::unavailable(e.to_string()))?;
                            stream
                                .sender
                                .send(item)
                                .await
                                .map_err(|e| Status::unavailable(e.to_string()))?;
                        }
                    }
                    Ok(body)
                }
                m => Err(Status::unknown_method(m)),
            }
        })
    }
}

/// Sends the plan's bytes, then waits and leaves.
async fn send_plan(mut write: tokio::io::WriteHalf<DuplexStream>, pieces: Vec<(Duration, Bytes)>) {
    for (wait, piece) in pieces {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if write.write_all(&piece).await.is_err() {
            break;
        }
    }
    // Time for the other side to answer, then leave.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = write.shutdown().await;
}

/// Reads what the driver's side sends until it closes.
async fn read_all(read: tokio::io::ReadHalf<DuplexStream>) -> Vec<Frame> {
    let mut frames = FramedRead::new(read, FrameCodec::new(1 << 30, 1 << 30));
    let mut got = Vec::new();
    while let Some(Ok(f)) = frames.next().await {
        got.push(f);
    }
    got
}

/// Exchanges `Hello` as the driver's side, as `transport` does; `None`
/// when it refused the peer's.
async fn accept_hello(end: &mut DuplexStream, cfg: &ConnectionConfig) -> Option<Hello> {
    exchange_hello(end, hello_for(cfg), cfg.max_frame)
        .await
        .ok()
}

/// The hostile peer at work: it sends the plan's bytes (`writer`) and
/// reads what the driver's side answers (`reader`); `end` is the pipe end
/// for the driver.
struct Peer {
    cfg: ConnectionConfig,
    end: DuplexStream,
    writer: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<Vec<Frame>>,
}

fn peer(plan: &Plan) -> Peer {
    let cfg = config();
    let (peer, end) = tokio::io::duplex(1 << 20);
    let (read, write) = tokio::io::split(peer);
    let pieces = wire(plan, &cfg);
    Peer {
        writer: tokio::spawn(send_plan(write, pieces)),
        reader: tokio::spawn(read_all(read)),
        cfg,
        end,
    }
}

/// Runs `plan` against a server connection.
pub async fn run_server(plan: &Plan) -> Result<Outcome, String> {
    let Peer {
        cfg,
        mut end,
        writer,
        reader,
    } = peer(plan);
    let (outcome, requested) = decoded(plan);
    let run = async {
        if let Some(hello) = accept_hello(&mut end, &cfg).await {
            let (conn, driver) = start(end, &cfg, addr(), hello, Some(Arc::new(Service)));
            let reason = tokio::spawn(driver)
                .await
                .map_err(|e| format!("the driver panicked: {e}"))?;
            if !conn.is_closed() {
                return Err(format!(
                    "driver ended ({reason}) but the connection is open"
                ));
            }
        } else {
            drop(end);
        }
        let sent = reader.await.map_err(|e| format!("reader: {e}"))?;
        let _ = writer.await;
        Ok(sent)
    };
    let sent = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .map_err(|_| "the connection did not end after the peer left".to_string())??;
    let mut answers: HashMap<u64, usize> = HashMap::new();
    for frame in sent {
        if let Frame::Response { id, result } = frame {
            let n = answers.entry(id).or_default();
            *n += 1;
            match requested.get(&id) {
                None => return Err(format!("answered call {id}, which was never requested")),
                Some(asked) if *n > *asked => {
                    return Err(format!("answered call {id} {n} times, asked {asked}"));
                }
                Some(_) => {}
            }
            if let Err(status) = result {
                if status.message.len() > Status::MAX_MESSAGE {
                    return Err(format!("status of {} bytes", status.message.len()));
                }
            }
        }
    }
    Ok(outcome)
}

/// Runs `plan` against a client connection whose calls are the plan's
/// `Call` steps.
pub async fn run_client(plan: &Plan) -> Result<Outcome, String> {
    let Peer {
        cfg,
        mut end,
        writer,
        reader,
    } = peer(plan);
    let run = async {
        let Some(hello) = accept_hello(&mut end, &cfg).await else {
            drop(end);
            let _ = reader.await;
            let _ = writer.await;
            return Ok(());
        };
        let (conn, driver) = start(end, &cfg, addr(), hello, None);
        let driver = tokio::spawn(driver);
        let mut calls = Vec::new();
        for step in &plan.steps {
            if let Step::Call {
                method,
                timeout,
                body,
            } = step
            {
                let (conn, method, timeout, body) = (conn.clone(), *method, *timeout, body.clone());
                calls.push(tokio::spawn(async move {
                    let result = tokio::time::timeout(
                        timeout + Duration::from_secs(5),
                        conn.call(method, body, timeout),
                    )
                    .await;
                    match result {
                        Err(_) => Err(format!("call to {method} outlived its timeout")),
                        // What a typed client does with the reply.
                        Ok(Ok(reply)) => {
                            let _ = rpc_core::codec::decode::<Expr>(
                                &reply,
                                reply.len(),
                                rpc_core::codec::DEFAULT_MAX_DEPTH,
                            );
                            Ok(())
                        }
                        Ok(Err(_)) => Ok(()),
                    }
                }));
            }
        }
        for call in calls {
            call.await.map_err(|e| format!("a call panicked: {e}"))??;
        }
        let reason = driver
            .await
            .map_err(|e| format!("the driver panicked: {e}"))?;
        if !conn.is_closed() {
            return Err(format!(
                "driver ended ({reason}) but the connection is open"
            ));
        }
        let _ = reader.await;
        let _ = writer.await;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .map_err(|_| "the connection did not end after the peer left".to_string())??;
    Ok(classify(plan))
}

/// Runs `plan` on a fresh paused-clock runtime.
pub fn run_paused<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(f)
}

/// Reads a plan from raw fuzzer bytes: a compact format in which every
/// byte string is some plan, so the fuzzer spends its time past framing.
impl Plan {
    pub fn from_bytes(data: &[u8]) -> Plan {
        let mut r = ByteReader { data };
        let chunk = match r.u8() {
            0 => usize::MAX,
            n => usize::from(n % 64) + 1,
        };
        let hello = (r.u8() % 8 == 0).then(|| Hello {
            version: if r.u8() % 2 == 0 {
                rpc_core::PROTOCOL_VERSION
            } else {
                r.u16()
            },
            max_frame: r.u32(),
            heartbeat_ms: r.u32(),
            max_in_flight: r.u32(),
        });
        let mut steps = Vec::new();
        while !r.data.is_empty() && steps.len() < 64 {
            let op = r.u8();
            let id = u64::from(r.u8() % 16);
            let step = match op % 19 {
                0 | 1 => Step::Frame(Frame::Request {
                    id,
                    method: METHODS[usize::from(r.u8()) % METHODS.len()].into(),
                    deadline_ms: (r.u8() % 2 == 0).then(|| u32::from(r.u8()) * 10),
                    // A Request with metadata one time in two.
                    metadata: if op % 2 == 1 {
                        let mut m = rpc_core::Metadata::new();
                        for _ in 0..r.u8() % 4 {
                            let key =
                                ["tenant", "authorization", "x-trace.id"][usize::from(r.u8()) % 3];
                            let _ = m.insert(key, r.bytes());
                        }
                        m
                    } else {
                        rpc_core::Metadata::new()
                    },
                    body: Bytes::from(r.bytes()),
                }),
                2 => Step::Frame(Frame::Response {
                    id,
                    result: if r.u8() % 2 == 0 {
                        Ok(Bytes::from(r.bytes()))
                    } else {
                        Err(Status::internal(
                            String::from_utf8_lossy(&r.bytes()).into_owned(),
                        ))
                    },
                }),
                3 => Step::Frame(Frame::Cancel { id }),
                4 => Step::Frame(Frame::Ping { nonce: id }),
                5 => Step::Frame(Frame::Pong { nonce: id }),
                6 => Step::Frame(Frame::GoAway {
                    reason: String::from_utf8_lossy(&r.bytes()).into_owned(),
                }),
                7 => Step::Frame(Frame::Hello(Hello {
                    version: r.u16(),
                    max_frame: r.u32(),
                    heartbeat_ms: r.u32(),
                    max_in_flight: r.u32(),
                })),
                8 => Step::Body(r.bytes()),
                9 => Step::Raw(r.bytes()),
                10 => Step::Wait(Duration::from_millis(u64::from(r.u16()) * 4)),
                11 => Step::Call {
                    method: METHODS[usize::from(r.u8()) % METHODS.len()],
                    timeout: Duration::from_millis(u64::from(r.u16()) * 4 + 1),
                    body: Bytes::from(r.bytes()),
                },
                12 => {
                    // A body for the reader's large-frame path, or one over
                    // the limit.
                    let len = 60 * 1024 + usize::from(r.u16()) * 4;
                    Step::Frame(Frame::Request {
                        id,
                        method: "echo".into(),
                        deadline_ms: None,
                        metadata: rpc_core::Metadata::new(),
                        body: Bytes::from(vec![r.u8(); len]),
                    })
                }
                14 => Step::Frame(Frame::Open {
                    id,
                    method: METHODS[usize::from(r.u8()) % METHODS.len()].into(),
                    deadline_ms: (r.u8() % 2 == 0).then(|| u32::from(r.u8()) * 10),
                    metadata: rpc_core::Metadata::new(),
                    body: Bytes::from(r.bytes()),
                    sends_stream: r.u8() % 2 == 0,
                }),
                15 => Step::Frame(Frame::Data {
                    id,
                    more: r.u8() % 2 == 0,
                    bytes: if r.u8() % 8 == 0 {
                        Bytes::from(vec![r.u8(); 65_536])
                    } else {
                        Bytes::from(r.bytes())
                    },
                }),
                16 => Step::Frame(Frame::Credit {
                    id: u64::from(r.u8() % 4),
                    bytes: u64::from(r.u32()),
                }),
                17 => Step::Frame(Frame::End { id }),
                18 => Step::Frame(Frame::Reset { id }),
                _ => {
                    let depth = usize::from(r.u16()) * 4;
                    let body = Bytes::from(deep_expr(depth));
                    if r.u8() % 2 == 0 {
                        Step::Frame(Frame::Request {
                            id,
                            method: "deep".into(),
                            deadline_ms: None,
                            metadata: rpc_core::Metadata::new(),
                            body,
                        })
                    } else {
                        Step::Frame(Frame::Response {
                            id,
                            result: Ok(body),
                        })
                    }
                }
            };
            steps.push(step);
        }
        Plan {
            hello,
            steps,
            chunk,
        }
    }
}

/// Reads fields from fuzzer bytes; zeros once they run out.
struct ByteReader<'a> {
    data: &'a [u8],
}

impl ByteReader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }

    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    /// A length byte, then that many bytes.
    fn bytes(&mut self) -> Vec<u8> {
        let n = usize::from(self.u8());
        self.take(n).to_vec()
    }
}
