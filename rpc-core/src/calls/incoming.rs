//! The calls this side serves for the peer: dispatch, the inline fast
//! path, tasks for the rest, cancellation, and the reply.
//!
//! ```text
//! Request (rules said Serve) ─► CallContext ─► Dispatch::dispatch ─► poll once
//!     ready ─► Response queued at once (no task, no timer, no token)
//!     pending ─► task: handler | peer's Cancel | deadline | connection ends
//!                   └─► Response (not for a cancelled call)
//! ```
//!
//! Every reply is sized against the peer's frame limit before it is
//! queued ([`fitting_reply`]): one too large fails its own call with
//! `ResourceExhausted`, never the connection.
//!
//! Not here: which requests are served at all (`rules.rs`), the context
//! handlers read (`context.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::context::{CallContext, CallTokens};
use crate::error::{Status, StatusCode};
use crate::frame::{frame_len, Frame};
use crate::lifecycle::Stage;
use crate::metadata::Metadata;
#[cfg(not(feature = "otel"))]
use crate::shared::debug_spans_wanted;
use crate::shared::Shared;
use crate::streams::handles::ServedStream;

/// A boxed, sendable future, as returned by [`Dispatch::dispatch`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Serves the calls a peer makes (implemented by the server's call stack).
pub trait Dispatch: Send + Sync + 'static {
    /// Runs one call; the reply is the encoded result or a [`Status`]. The
    /// future is dropped unfinished when the call is cancelled, its
    /// deadline passes or the connection ends.
    fn dispatch(&self, ctx: CallContext, body: Bytes) -> BoxFuture<Result<Bytes, Status>>;

    /// The connection refused a call without dispatching it (`Overloaded`,
    /// `ShuttingDown`): for counters.
    fn refused(&self, code: StatusCode) {
        let _ = code;
    }
}

/// Cancellation tokens of the calls running as tasks, by request id.
type Running = Arc<Mutex<HashMap<u64, CancellationToken>>>;

fn lock(
    m: &Mutex<HashMap<u64, CancellationToken>>,
) -> MutexGuard<'_, HashMap<u64, CancellationToken>> {
    // Plain map operations only; a poisoned map is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The served calls of one connection.
pub(crate) struct ServedCalls {
    dispatch: Arc<dyn Dispatch>,
    running: Running,
    /// Served calls' tokens, made when asked for.
    tokens: Arc<CallTokens>,
    /// Served calls so far: the key of each call's token.
    count: u64,
    pub(crate) handlers: TaskTracker,
    max_depth: usize,
}

/// One request the rules let through.
pub(crate) struct Incoming {
    pub(crate) id: u64,
    pub(crate) method: String,
    /// When the caller stops waiting, counted from when the request's
    /// bytes were read.
    pub(crate) deadline: Option<Instant>,
    /// When the request's bytes were read.
    pub(crate) arrived: Instant,
    pub(crate) metadata: Metadata,
    pub(crate) body: Bytes,
    /// A stream call's handles (`Open`); boxed, so a plain `Request`
    /// moves one pointer for them, not the handles.
    pub(crate) stream: Option<Box<ServedStream>>,
}

impl ServedCalls {
    pub(crate) fn new(dispatch: Arc<dyn Dispatch>, max_depth: usize) -> Self {
        ServedCalls {
            dispatch,
            running: Arc::default(),
            tokens: Arc::default(),
            count: 0,
            handlers: TaskTracker::new(),
            max_depth,
        }
    }

    /// Calls running as tasks now, and whether `id` is one of them, under
    /// one lock. Handlers that finish when first polled never become
    /// tasks, so the map is mostly empty: the id is not hashed then.
    pub(crate) fn running(&self, id: u64) -> (usize, bool) {
        let running = lock(&self.running);
        let n = running.len();
        (n, n > 0 && running.contains_key(&id))
    }

    /// Stops call `id` if it runs (the peer's `Cancel`); false if not.
    pub(crate) fn cancel(&self, id: u64) -> bool {
        match lock(&self.running).get(&id) {
            Some(token) => {
                debug!(id, "cancelled by peer");
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Answers a request the connection refused, without dispatching it.
    pub(crate) fn refuse(&self, shared: &Shared, id: u64, status: Status) {
        self.dispatch.refused(status.code);
        let result = fitting_reply(id, Err(status), shared.max_send);
        shared.outbound.send_now(Frame::Response { id, result });
    }

    /// Serves `call`: polled once here, on the connection's task, and
    /// answered at once if it finished; otherwise run as a tracked task.
    pub(crate) fn serve(&mut self, shared: &Arc<Shared>, call: Incoming) {
        let Incoming {
            id,
            method,
            deadline,
            arrived,
            metadata,
            body,
            stream,
        } = call;
        // The token is made only if the handler asks for one, or if the
        // call outlives its first poll (see `CallTokens`).
        self.count += 1;
        let seq = self.count;
        let ctx = CallContext::for_call(
            shared.peer,
            id,
            method,
            (arrived, deadline),
            shared.identity.get().cloned(),
            self.tokens.clone(),
            seq,
        )
        .with_max_depth(self.max_depth)
        .with_metadata(metadata);
        let ctx = match stream {
            Some(stream) => ctx.with_stream(*stream),
            None => ctx,
        };
        #[cfg(not(feature = "otel"))]
        let span = if debug_spans_wanted() {
            tracing::debug_span!("call", method = %ctx.method(), id, peer = %ctx.peer())
        } else {
            tracing::Span::none()
        };
        // The caller's trace continues in the call's span.
        #[cfg(feature = "otel")]
        let span = crate::trace_context::server_span(ctx.method(), ctx.metadata());
        self.tokens.first_poll_begins(seq);
        let mut handler = AssertUnwindSafe(self.dispatch.dispatch(ctx, body)).catch_unwind();
        // Most handlers finish when first polled: answer those right here,
        // with no task, no timer and no cancellation bookkeeping.
        let ready = if span.is_disabled() {
            (&mut handler).now_or_never()
        } else {
            span.in_scope(|| (&mut handler).now_or_never())
        };
        if let Some(outcome) = ready {
            self.tokens.finished_in_first_poll(seq);
            let result = outcome.unwrap_or_else(|_| panicked());
            shared.outbound.send_now(reply(shared, id, result));
            return;
        }
        // The rest run as tasks, which end when the handler does, the
        // deadline passes, the caller cancels, or the connection ends.
        let token = self.tokens.runs_as_task(seq);
        lock(&self.running).insert(id, token.clone());
        let tokens = self.tokens.clone();
        let shared = shared.clone();
        let running = self.running.clone();
        self.handlers.spawn(
            async move {
                let until_deadline = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                // Cancellation first: a handler that returns because it saw
                // the caller cancel is not answered (nobody waits for it).
                let result = tokio::select! {
                    biased;
                    _ = token.cancelled() => None,
                    _ = shared.wait_for(Stage::ending) => None,
                    r = handler => Some(r.unwrap_or_else(|_| panicked())),
                    _ = until_deadline => Some(Err(Status::new(
                        StatusCode::DeadlineExceeded, "the call's deadline passed on the server"))),
                };
                tokens.task_ended(seq);
                lock(&running).remove(&id);
                match result {
                    Some(result) => {
                        let _ = shared.outbound.send(reply(&shared, id, result)).await;
                    }
                    None => debug!("handler stopped: cancelled"),
                }
            }
            .instrument(span),
        );
    }
}

fn panicked() -> Result<Bytes, Status> {
    warn!("handler panicked");
    Err(Status::internal("the handler panicked"))
}

/// The `Response` to call `id`, made to fit the peer's frame limit.
fn reply(shared: &Shared, id: u64, result: Result<Bytes, Status>) -> Frame {
    let result = fitting_reply(id, result, shared.max_send);
    if let Err(status) = &result {
        debug!(%status, "call failed");
    }
    Frame::Response { id, result }
}

/// `result` as it can be sent to a peer whose frames are limited to
/// `max_send` bytes: a reply too large for that fails this call alone with
/// `ResourceExhausted`, and a status's message is cut to
/// [`Status::MAX_MESSAGE`], or shorter when the limit needs it.
pub(crate) fn fitting_reply(
    id: u64,
    result: Result<Bytes, Status>,
    max_send: usize,
) -> Result<Bytes, Status> {
    let status = match result {
        // Exact sizing walks the frame; only replies near the limit need it.
        Ok(reply) if reply.len() + RESPONSE_OVERHEAD <= max_send => return Ok(reply),
        Ok(reply) => {
            let probe = Frame::Response {
                id,
                result: Ok(reply.clone()),
            };
            if frame_len(&probe, max_send).is_ok() {
                return Ok(reply);
            }
            Status::resource_exhausted(format!(
                "reply of {} bytes does not fit the caller's frame limit of {max_send} bytes \
                 (its max_frame)",
                reply.len()
            ))
        }
        Err(status) => status,
    };
    // Room for the message: the frame less its other fields, which
    // RESPONSE_OVERHEAD bounds (a test below checks it).
    let room = max_send.saturating_sub(RESPONSE_OVERHEAD);
    Err(status.cut_to(room.min(Status::MAX_MESSAGE)))
}

/// More than a `Response` frame adds to its reply's bytes: variant tags and
/// varint id and length (bincode `DefaultOptions`).
const RESPONSE_OVERHEAD: usize = 32;

/// A request's deadline: `deadline_ms` after its bytes `arrived`.
pub(crate) fn deadline_of(arrived: Instant, deadline_ms: Option<u32>) -> Option<Instant> {
    deadline_ms.map(|ms| arrived + Duration::from_millis(ms.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reply_fits_the_peers_frame_limit_or_fails_alone() {
        let id = u64::MAX;
        for max_send in [64usize, 100, 1000, 5000, 1 << 20] {
            let long = Err(Status::internal("x".repeat(5 << 20)));
            let sent = fitting_reply(id, long, max_send);
            let frame = Frame::Response {
                id,
                result: sent.clone(),
            };
            assert!(frame_len(&frame, max_send).is_ok(), "{max_send}");
            let message = sent.unwrap_err().message;
            assert!(message.len() <= Status::MAX_MESSAGE, "{max_send}");
            if max_send >= 1000 {
                assert!(message.ends_with("bytes, cut]"), "{message}");
            }
            // A reply one byte over the limit fails with ResourceExhausted.
            let body = Bytes::from(vec![7u8; max_send]);
            let status = fitting_reply(id, Ok(body), max_send).unwrap_err();
            assert_eq!(status.code, StatusCode::ResourceExhausted, "{max_send}");
            if max_send >= 1000 {
                assert!(status
                    .message
                    .contains(&format!("frame limit of {max_send} bytes")));
            }
            // The largest reply that fits is sent as it is.
            let fits = (0..max_send)
                .rev()
                .find(|&n| {
                    let probe = Frame::Response {
                        id,
                        result: Ok(Bytes::from(vec![1u8; n])),
                    };
                    frame_len(&probe, max_send).is_ok()
                })
                .unwrap();
            let body = Bytes::from(vec![1u8; fits]);
            assert_eq!(fitting_reply(id, Ok(body.clone()), max_send), Ok(body));
        }
    }
}
