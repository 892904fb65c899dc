//! Deeply nested values from a hostile peer, each way: a server refuses the
//! call (`InvalidArgument`, "nesting deeper than 128 levels") and a client
//! fails only the call whose reply it was; both connections and processes
//! carry on. Without the depth limit, bincode recursed once per level and a
//! million levels (1 MB on the wire) overflowed the stack, which aborts the
//! whole process: these tests would then end the test binary.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use rpc_client::{Client, ClientError};
use rpc_core::service::{MethodDescription, Service, ServiceDescription};
use rpc_core::{BoxFuture, CallContext, Frame, Status, StatusCode};
use rpc_server::{Router, ServerOptions};
use rpc_tests::{decode_frames, frame_bytes, hello_bytes, send, TestServer};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

/// A recursive argument type, as any AST or tree is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Expr {
    Lit(i64),
    Neg(Box<Expr>),
}

impl Expr {
    fn eval(&self) -> i64 {
        // Iterative: a test value may be deep.
        let (mut e, mut sign) = (self, 1);
        while let Expr::Neg(inner) = e {
            e = inner;
            sign = -sign;
        }
        match e {
            Expr::Lit(v) => sign * v,
            Expr::Neg(_) => unreachable!(),
        }
    }

    fn nested(depth: usize) -> Expr {
        let mut e = Expr::Lit(7);
        for _ in 0..depth {
            e = Expr::Neg(Box::new(e));
        }
        e
    }
}

/// `Neg` nested `depth` times around `Lit(7)`, as bincode writes it
/// (variant 1, then the inner value), made without recursion.
fn nested_wire(depth: usize) -> Bytes {
    let mut wire = vec![1u8; depth];
    wire.extend_from_slice(&[0, 14]); // Lit(7): variant 0, zigzag 7
    Bytes::from(wire)
}

#[rpc_macros::service(crate = rpc_core)]
trait Calc {
    async fn eval(&self, e: Expr) -> i64;
}

struct Evaluator;

impl Calc for Evaluator {
    async fn eval(&self, e: Expr) -> i64 {
        let v = e.eval();
        // Dropping a deep Box chain recurses too; take it apart in a loop.
        let mut next = Some(e);
        while let Some(Expr::Neg(inner)) = next {
            next = Some(*inner);
        }
        v
    }
}

async fn calc_server(options: ServerOptions) -> TestServer {
    let router = rpc_server::demo::router().service(CalcServer::new(Evaluator));
    TestServer::start(router, options).await
}

/// Sends one `Request` with `body` to `Calc.eval` and then a plain echo on
/// the same raw connection; returns both answers.
async fn eval_raw(
    server: &TestServer,
    body: Bytes,
) -> (Result<Bytes, Status>, Result<Bytes, Status>) {
    let mut tls = server.raw_tls().await;
    let mut out = hello_bytes();
    out.extend(frame_bytes(Frame::Request {
        id: 1,
        method: "Calc.eval".into(),
        deadline_ms: None,
        metadata: rpc_core::Metadata::new(),
        body,
    }));
    out.extend(frame_bytes(Frame::Request {
        id: 2,
        method: "Demo.echo".into(),
        deadline_ms: None,
        metadata: rpc_core::Metadata::new(),
        body: rpc_core::codec::encode(&("after",), 64).unwrap(),
    }));
    send(&mut tls, &out).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let answers = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let n = tls.read(&mut buf).await.expect("connection failed");
            assert!(
                n > 0,
                "server closed the connection: {:?}",
                decode_frames(&got)
            );
            got.extend_from_slice(&buf[..n]);
            let answers: Vec<_> = decode_frames(&got)
                .into_iter()
                .filter_map(|f| match f {
                    Frame::Response { id, result } => Some((id, result)),
                    _ => None,
                })
                .collect();
            if answers.len() == 2 {
                return answers;
            }
        }
    })
    .await
    .expect("no answers in time");
    let pick = |id| answers.iter().find(|a| a.0 == id).unwrap().1.clone();
    (pick(1), pick(2))
}

#[tokio::test]
async fn a_million_levels_fail_that_call_alone_with_invalid_argument() {
    let server = calc_server(ServerOptions::default()).await;
    let honest = server.client().await;
    let (deep, after) = eval_raw(&server, nested_wire(1_000_000)).await;
    let status = deep.unwrap_err();
    assert_eq!(status.code, StatusCode::InvalidArgument, "{status}");
    assert!(
        status.message.contains("nesting deeper than 128 levels"),
        "{status}"
    );
    let echoed: String = rpc_core::codec::decode(&after.unwrap(), 64, 8).unwrap();
    assert_eq!(echoed, "after");
    // Other connections were never touched; the process is alive.
    let client = CalcClient::new(honest);
    assert_eq!(client.eval(Expr::nested(3)).await.unwrap(), -7);
}

#[tokio::test]
async fn nesting_within_the_limit_is_served_on_a_worker_stack() {
    // The argument tuple is one level, so 127 Negs plus the Lit reach 128.
    let server = calc_server(ServerOptions::default()).await;
    let client = CalcClient::new(server.client().await);
    assert_eq!(client.eval(Expr::nested(126)).await.unwrap(), 7);
    let err = client.eval(Expr::nested(127)).await.unwrap_err();
    assert_eq!(err.code(), Some(StatusCode::InvalidArgument), "{err}");
    assert_eq!(client.eval(Expr::nested(125)).await.unwrap(), -7);
}

#[tokio::test]
async fn the_server_limit_is_configurable() {
    let mut options = ServerOptions::default();
    options.connection.max_depth = 10;
    let server = calc_server(options).await;
    let client = CalcClient::new(server.client().await);
    assert_eq!(client.eval(Expr::nested(8)).await.unwrap(), 7);
    let err = client.eval(Expr::nested(9)).await.unwrap_err();
    assert!(
        err.to_string().contains("nesting deeper than 10 levels"),
        "{err}"
    );
}

/// A hostile server: `Deep.reply` answers with `Neg` nested a million
/// times, `Deep.small` with a plain value.
struct DeepReplies;

impl Service for DeepReplies {
    fn describe(&self) -> ServiceDescription {
        ServiceDescription {
            name: "Deep".into(),
            methods: ["reply", "small"]
                .map(|name| MethodDescription {
                    name: name.into(),
                    args: vec![],
                    returns: "Expr".into(),
                })
                .to_vec(),
        }
    }

    fn call(&self, ctx: CallContext, _body: Bytes) -> Option<BoxFuture<Result<Bytes, Status>>> {
        let reply = match ctx.method() {
            "Deep.reply" => nested_wire(1_000_000),
            "Deep.small" => nested_wire(2),
            _ => return None,
        };
        Some(Box::pin(async move { Ok(reply) }))
    }
}

#[tokio::test]
async fn a_client_fails_a_deep_reply_and_keeps_its_connection() {
    let server =
        TestServer::start(Router::new().service(DeepReplies), ServerOptions::default()).await;
    let client = server.client().await;
    let err = client.call::<_, Expr>("Deep.reply", &()).await.unwrap_err();
    assert!(matches!(err, ClientError::Decode { .. }), "{err:?}");
    assert!(
        err.to_string().contains("nesting deeper than 128 levels"),
        "{err}"
    );
    let small: Expr = client.call("Deep.small", &()).await.unwrap();
    assert_eq!(small, Expr::nested(2));
    assert!(!client.is_closed());
    // Configurable on the client too.
    let strict = Client::builder(rpc_tests::client_tls(&server.certs))
        .max_depth(2)
        .connect(&server.address())
        .await
        .unwrap();
    let err = strict.call::<_, Expr>("Deep.small", &()).await.unwrap_err();
    assert!(
        err.to_string().contains("nesting deeper than 2 levels"),
        "{err}"
    );
}
