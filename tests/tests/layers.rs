//! The server's tower stack over real TLS on 127.0.0.1: tower's own
//! layers (concurrency limit, load shedding) and a user's layer compose;
//! the authorization hook and the counters still hold.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rpc_client::{CallOptions, ClientError, StatusCode};
use rpc_core::BoxFuture;
use rpc_server::{demo, devcerts, Call, Server, Status};
use rpc_tests::{server_tls, TestServer};

/// A user's layer: refuses calls without `token: secret` in their
/// metadata, and records the methods it let through.
#[derive(Clone)]
struct RequireToken<S> {
    inner: S,
    seen: Arc<Mutex<Vec<String>>>,
}

impl<S> tower::Service<Call> for RequireToken<S>
where
    S: tower::Service<Call, Response = bytes::Bytes, Error = Status>,
    S::Future: Send + 'static,
{
    type Response = bytes::Bytes;
    type Error = Status;
    type Future = BoxFuture<Result<bytes::Bytes, Status>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        if call.ctx.metadata().get_str("token") != Some("secret") {
            let method = call.ctx.method().to_owned();
            return Box::pin(async move {
                Err(Status::new(
                    StatusCode::PermissionDenied,
                    format!("{method}: no token"),
                ))
            });
        }
        self.seen.lock().unwrap().push(call.ctx.method().to_owned());
        Box::pin(self.inner.call(call))
    }
}

fn code_of(err: &ClientError) -> Option<StatusCode> {
    match err {
        ClientError::Call(e) => e.code(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn towers_layers_and_a_users_layer_compose_on_the_server() {
    let certs = devcerts::generate().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let token_layer = {
        let seen = seen.clone();
        tower::layer::layer_fn(move |inner| RequireToken {
            inner,
            seen: seen.clone(),
        })
    };
    // Outermost first: shed what the limit cannot take at once, allow one
    // call at a time, then the user's check.
    let server = Server::builder(server_tls(&certs))
        .router(demo::router())
        .layer(tower::load_shed::LoadShedLayer::new())
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .layer(token_layer)
        .build()
        .unwrap();
    let server = TestServer::serve(certs, server).await;
    let client = server.client().await;
    let with_token = CallOptions::new().meta("token", "secret").unwrap();

    // The user's layer refuses a call without the token...
    let err = client
        .call::<_, String>("Demo.echo", "x")
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), Some(StatusCode::PermissionDenied), "{err}");
    assert!(err.to_string().contains("Demo.echo: no token"), "{err}");
    // ...and lets one with it through to the router.
    let reply: String = client
        .call_with("Demo.echo", "through", &with_token)
        .await
        .unwrap();
    assert_eq!(reply, "through");

    // One call holds the limit; a second is shed at once with Overloaded.
    let slow = tokio::spawn({
        let client = client.clone();
        let opts = with_token.clone();
        async move {
            client
                .call_with::<_, ()>("Demo.sleep", &500u64, &opts)
                .await
        }
    });
    // The token layer sits inside the limit: once it saw the call, the
    // call holds the one permit. (Stats would go through the limit too.)
    tokio::time::timeout(Duration::from_secs(5), async {
        while !seen.lock().unwrap().contains(&"Demo.sleep".to_owned()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let err = client
        .call_with::<_, String>("Demo.echo", "shed", &with_token)
        .await
        .unwrap_err();
    assert_eq!(code_of(&err), Some(StatusCode::Overloaded), "{err}");
    slow.await.unwrap().unwrap();
    // The limit is free again.
    let reply: String = client
        .call_with("Demo.echo", "again", &with_token)
        .await
        .unwrap();
    assert_eq!(reply, "again");
    assert_eq!(
        *seen.lock().unwrap(),
        ["Demo.echo", "Demo.sleep", "Demo.echo"]
    );

    // The counters are a layer too: they saw every call, refused ones
    // included.
    let stats = client.stats().await.unwrap_err();
    assert_eq!(code_of(&stats), Some(StatusCode::PermissionDenied));
    let stats: rpc_core::stats::StatsSnapshot = client
        .call_with(rpc_core::stats::STATS_METHOD, &(), &with_token)
        .await
        .unwrap();
    let errors: std::collections::HashMap<_, _> = stats.errors.into_iter().collect();
    assert_eq!(errors.get("permission_denied"), Some(&2), "{errors:?}");
    assert_eq!(errors.get("overloaded"), Some(&1), "{errors:?}");
    assert_eq!(stats.calls_served, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorize_hook_runs_inside_the_users_layers() {
    let certs = devcerts::generate().unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let outer = {
        let order = order.clone();
        tower::layer::layer_fn(move |inner| Recording {
            inner,
            order: order.clone(),
        })
    };
    let hook_order = order.clone();
    let server = Server::builder(server_tls(&certs))
        .router(demo::router())
        .layer(outer)
        .authorize(move |ctx| {
            hook_order.lock().unwrap().push("hook");
            match ctx.method() {
                "Demo.sleep" => Err(Status::new(StatusCode::PermissionDenied, "no sleeping")),
                _ => Ok(()),
            }
        })
        .build()
        .unwrap();
    let server = TestServer::serve(certs, server).await;
    let client = server.client().await;
    let err = client.call::<_, ()>("Demo.sleep", &1u64).await.unwrap_err();
    assert_eq!(code_of(&err), Some(StatusCode::PermissionDenied), "{err}");
    assert_eq!(*order.lock().unwrap(), ["layer", "hook"]);
    let sum: i64 = client.call("Demo.add", &(2i64, 3i64)).await.unwrap();
    assert_eq!(sum, 5);
    assert_eq!(*order.lock().unwrap(), ["layer", "hook", "layer", "hook"]);
}

/// Records that a call passed through it.
#[derive(Clone)]
struct Recording<S> {
    inner: S,
    order: Arc<Mutex<Vec<&'static str>>>,
}

impl<S> tower::Service<Call> for Recording<S>
where
    S: tower::Service<Call, Response = bytes::Bytes, Error = Status>,
{
    type Response = bytes::Bytes;
    type Error = Status;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        self.order.lock().unwrap().push("layer");
        self.inner.call(call)
    }
}
