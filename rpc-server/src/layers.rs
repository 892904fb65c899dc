//! The server's own layers of the call stack (see `stack.rs`), written as
//! tower layers like any user's: counters, the authorization hook and the
//! reserved methods, then the router as the innermost service.
//!
//! ```text
//! Stats ─► [user layers] ─► Authorize ─► ReservedMethods ─► RouterService
//! counts    tower::Layer     hook's Err    srpc.list, .stats, user methods
//! every     (limits, logs)   = the reply   .health.Check/Watch
//! call
//! ```
//!
//! Every service here is ready at once and keeps no per-call state, so
//! besides `tower::Service` each can be called through a shared reference
//! ([`SharedCall`]): without user layers, the stack is not cloned per call.
//!
//! Not here: assembling the stack and dispatching to it (`stack.rs`).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{ready, Either, Ready};
use rpc_core::health::{HealthStatus, CHECK_METHOD, WATCH_METHOD};
use rpc_core::schema::{ListRequest, Listing};
use rpc_core::service::{decode_args, encode_reply, LIST_METHOD};
use rpc_core::stats::{CallCounters, StatsSnapshot, RESERVED_PREFIX, STATS_METHOD};
use rpc_core::{codec, BoxFuture, CallContext, Status, StatusCode};
use tower::{Layer, Service};

use crate::call::Call;
use crate::health::Health;
use crate::metrics::{CallMetrics, Timed};
use crate::Router;

/// Decides per call whether the peer may make it (see
/// `ServerBuilder::authorize`).
pub(crate) type AuthorizeHook = Arc<dyn Fn(&CallContext) -> Result<(), Status> + Send + Sync>;

/// A service that is always ready and keeps no per-call state, called
/// through a shared reference (its `tower::Service::call` does the same).
pub(crate) trait SharedCall {
    type Future: Future<Output = Result<Bytes, Status>> + Unpin;

    fn call_shared(&self, call: Call) -> Self::Future;
}

/// The router as a tower service: the innermost one of every stack.
#[derive(Clone)]
pub(crate) struct RouterService(pub(crate) Arc<Router>);

impl SharedCall for RouterService {
    type Future = BoxFuture<Result<Bytes, Status>>;

    fn call_shared(&self, call: Call) -> Self::Future {
        use rpc_core::Dispatch;
        self.0.dispatch(call.ctx, call.body)
    }
}

impl Service<Call> for RouterService {
    type Response = Bytes;
    type Error = Status;
    type Future = BoxFuture<Result<Bytes, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        self.call_shared(call)
    }
}

/// Runs a hook before every call: the peer's address, certificate
/// identity, method and metadata are in the call's context, and an `Err`
/// is the call's reply (typically `PermissionDenied`). What
/// `ServerBuilder::authorize` installs; usable as a layer of its own, to
/// put it before other layers.
#[derive(Clone)]
pub struct AuthorizeLayer {
    /// `None`: every call passes (the server's stack without a hook).
    hook: Option<AuthorizeHook>,
}

impl AuthorizeLayer {
    /// A layer running `hook` before each call.
    pub fn new<F>(hook: F) -> Self
    where
        F: Fn(&CallContext) -> Result<(), Status> + Send + Sync + 'static,
    {
        AuthorizeLayer {
            hook: Some(Arc::new(hook)),
        }
    }

    pub(crate) fn from_hook(hook: Option<AuthorizeHook>) -> Self {
        AuthorizeLayer { hook }
    }
}

impl std::fmt::Debug for AuthorizeLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizeLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            hook: self.hook.clone(),
        }
    }
}

/// The service [`AuthorizeLayer`] makes.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    hook: Option<AuthorizeHook>,
}

impl<S> std::fmt::Debug for Authorize<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorize").finish_non_exhaustive()
    }
}

impl<S> Service<Call> for Authorize<S>
where
    S: Service<Call, Response = Bytes, Error = Status>,
{
    type Response = Bytes;
    type Error = Status;
    type Future = Either<Ready<Result<Bytes, Status>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let inner = &mut self.inner;
        authorize(&self.hook, call, |call| inner.call(call))
    }
}

/// A refusal is boxed (rare); a call let through is the inner future
/// itself, so the stack's future stays one box, whatever its depth.
impl<S: SharedCall<Future = BoxFuture<Result<Bytes, Status>>>> SharedCall for Authorize<S> {
    type Future = BoxFuture<Result<Bytes, Status>>;

    fn call_shared(&self, call: Call) -> Self::Future {
        match authorize(&self.hook, call, |call| self.inner.call_shared(call)) {
            Either::Right(through) => through,
            Either::Left(refused) => Box::pin(refused),
        }
    }
}

fn authorize<F>(
    hook: &Option<AuthorizeHook>,
    call: Call,
    inner: impl FnOnce(Call) -> F,
) -> Either<Ready<Result<Bytes, Status>>, F> {
    match hook.as_ref().map(|hook| hook(&call.ctx)) {
        None | Some(Ok(())) => Either::Right(inner(call)),
        Some(Err(status)) => Either::Left(ready(Err(status))),
    }
}

/// What `srpc.list` answers: the plain listing for an empty body (clients
/// before schemas), the listing with schemas for a `ListRequest` asking
/// for them.
pub(crate) struct Listings {
    /// Its `services` are the plain listing.
    pub(crate) listing: Listing,
}

impl Listings {
    pub(crate) fn new(router: &crate::Router) -> Self {
        Listings {
            listing: router.listing(),
        }
    }

    fn reply(&self, ctx: &rpc_core::CallContext, body: &Bytes) -> Result<Bytes, Status> {
        let schemas =
            !body.is_empty() && decode_args::<ListRequest>(LIST_METHOD, ctx, body)?.schemas;
        let encoded = if schemas {
            codec::encode(&self.listing, usize::MAX)
        } else {
            codec::encode(&self.listing.services, usize::MAX)
        };
        encoded.map_err(|e| Status::internal(format!("listing did not encode: {e}")))
    }
}

/// Where `srpc.stats` gets its figures.
pub(crate) type Snapshot = Arc<dyn Fn() -> StatsSnapshot + Send + Sync>;

/// Answers the framework's reserved methods (`srpc.list`, `srpc.stats`,
/// `srpc.health.Check`, `srpc.health.Watch`); passes every other call on.
#[derive(Clone)]
pub(crate) struct ReservedMethods<S> {
    pub(crate) inner: S,
    pub(crate) list: Arc<Listings>,
    pub(crate) stats: Snapshot,
    pub(crate) health: Health,
}

impl<S> Service<Call> for ReservedMethods<S>
where
    S: Service<Call, Response = Bytes, Error = Status>,
{
    type Response = Bytes;
    type Error = Status;
    type Future = Either<BoxFuture<Result<Bytes, Status>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        match self.answer(&call) {
            Some(reply) => Either::Left(reply),
            None => Either::Right(self.inner.call(call)),
        }
    }
}

/// As for `Authorize`: an answer here is boxed, a call passed on is not.
impl<S: SharedCall<Future = BoxFuture<Result<Bytes, Status>>>> SharedCall for ReservedMethods<S> {
    type Future = BoxFuture<Result<Bytes, Status>>;

    fn call_shared(&self, call: Call) -> Self::Future {
        match self.answer(&call) {
            Some(reply) => reply,
            None => self.inner.call_shared(call),
        }
    }
}

impl<S> ReservedMethods<S> {
    /// The reply to a reserved method; `None` for any other.
    fn answer(&self, call: &Call) -> Option<BoxFuture<Result<Bytes, Status>>> {
        let method = call.ctx.method();
        if !method.starts_with(RESERVED_PREFIX) {
            return None;
        }
        let reply = match method {
            LIST_METHOD => self.list.reply(&call.ctx, &call.body),
            STATS_METHOD => codec::encode(&(self.stats)(), usize::MAX)
                .map_err(|e| Status::internal(format!("stats did not encode: {e}"))),
            CHECK_METHOD => decode_args::<String>(method, &call.ctx, &call.body)
                .and_then(|service| self.health.check(&service))
                .and_then(|status| encode_reply(method, &status)),
            WATCH_METHOD => {
                let args =
                    decode_args::<(String, Option<HealthStatus>)>(method, &call.ctx, &call.body);
                let health = self.health.clone();
                return Some(Box::pin(async move {
                    let (service, seen) = args?;
                    let status = health.watch(&service, seen).await?;
                    encode_reply(WATCH_METHOD, &status)
                }));
            }
            _ => return None,
        };
        Some(Box::pin(ready(reply)))
    }
}

/// Counts every call that reaches the stack: started, and how it ended
/// (answered, failed with a code, cancelled, past its deadline, panicked).
#[derive(Clone)]
pub(crate) struct Stats<S> {
    pub(crate) inner: S,
    pub(crate) counters: Arc<CallCounters>,
    /// Call metrics, when the server records them (`metrics.rs`).
    pub(crate) metrics: Option<&'static CallMetrics>,
}

impl<S> Service<Call> for Stats<S>
where
    S: Service<Call, Response = Bytes, Error = Status>,
    S::Future: Unpin,
{
    type Response = Bytes;
    type Error = Status;
    type Future = Counted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        let ready = self.inner.poll_ready(cx);
        if let Poll::Ready(Err(status)) = &ready {
            self.counters.failed(status.code);
        }
        ready
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let inner = &mut self.inner;
        count(&self.counters, &self.metrics, call, |call| inner.call(call))
    }
}

impl<S: SharedCall> SharedCall for Stats<S> {
    type Future = Counted<S::Future>;

    fn call_shared(&self, call: Call) -> Self::Future {
        count(&self.counters, &self.metrics, call, |call| {
            self.inner.call_shared(call)
        })
    }
}

fn count<F>(
    counters: &Arc<CallCounters>,
    metrics: &Option<&'static CallMetrics>,
    call: Call,
    inner: impl FnOnce(Call) -> F,
) -> Counted<F> {
    counters.started();
    let deadline = call.ctx.deadline();
    let timed = metrics
        .as_ref()
        .map(|m| m.start(call.ctx.method(), call.ctx.arrived().into_std()));
    Counted {
        inner: inner(call),
        counters: Some(counters.clone()),
        timed,
        deadline,
    }
}

/// A call's future that reports how it ended to the counters, once:
/// when it completes, when it panics, or when it is dropped unfinished
/// (cancelled by the caller or the connection's end, or stopped at its
/// deadline).
pub(crate) struct Counted<F> {
    inner: F,
    /// Taken when the outcome is reported.
    counters: Option<Arc<CallCounters>>,
    /// The call's metrics, when recorded; taken with the counters.
    timed: Option<Timed>,
    deadline: Option<tokio::time::Instant>,
}

impl<F> Counted<F> {
    fn report(&mut self, outcome: Result<(), StatusCode>) {
        if let Some(counters) = self.counters.take() {
            counters.finished(outcome);
        }
        if let Some(timed) = self.timed.take() {
            timed.finish(outcome);
        }
    }
}

impl<F> Future for Counted<F>
where
    F: Future<Output = Result<Bytes, Status>> + Unpin,
{
    type Output = Result<Bytes, Status>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled =
            std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(&mut self.inner).poll(cx)));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => {
                self.report(result.as_ref().map(|_| ()).map_err(|s| s.code));
                Poll::Ready(result)
            }
            Err(panic) => {
                // The driver answers a panicked handler with Internal.
                self.report(Err(StatusCode::Internal));
                std::panic::resume_unwind(panic)
            }
        }
    }
}

impl<F> Drop for Counted<F> {
    fn drop(&mut self) {
        if self.counters.is_none() {
            return;
        }
        let past_deadline = self
            .deadline
            .is_some_and(|d| d <= tokio::time::Instant::now());
        self.report(Err(if past_deadline {
            StatusCode::DeadlineExceeded
        } else {
            StatusCode::Cancelled
        }));
    }
}
