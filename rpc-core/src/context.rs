//! What a handler knows about the call it serves: [`CallContext`] (peer,
//! identity, method, metadata, deadline, cancellation), and the
//! cancellation tokens behind it, made only when a handler asks.
//!
//! Not here: running served calls (`calls/incoming.rs`).

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::calls::IdHasher;
use crate::identity::PeerIdentity;
use crate::metadata::Metadata;
use crate::streams::handles::ServedStream;

/// What a handler knows about the call it is serving: read it with the
/// methods below. Cheap to clone (a few reference counts).
#[derive(Clone)]
pub struct CallContext {
    peer: SocketAddr,
    id: u64,
    method: String,
    deadline: Option<Instant>,
    /// When the request's bytes were read.
    arrived: Instant,
    identity: Option<Arc<PeerIdentity>>,
    cancel: CancelSource,
    max_depth: usize,
    /// `None` for no metadata (most calls): cloning a context then copies
    /// nothing.
    metadata: Option<Arc<Metadata>>,
    /// A stream call's handles, until the handler takes them.
    stream: Option<Arc<Mutex<Option<ServedStream>>>>,
}

impl CallContext {
    /// A context for calling a handler directly, e.g. in a test: no
    /// deadline, no identity, and a [`cancelled`](Self::cancelled) token
    /// that never fires by itself.
    pub fn new(peer: SocketAddr, id: u64, method: &str) -> Self {
        CallContext {
            peer,
            id,
            method: method.to_owned(),
            deadline: None,
            arrived: Instant::now(),
            identity: None,
            cancel: CancelSource::Detached(CancellationToken::new()),
            max_depth: crate::codec::DEFAULT_MAX_DEPTH,
            metadata: None,
            stream: None,
        }
    }

    /// The same context with a deadline.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The context of call `seq` (the driver's count) on a connection,
    /// whose request was read at `arrived` and whose caller stops waiting
    /// at `deadline`.
    pub(crate) fn for_call(
        peer: SocketAddr,
        id: u64,
        method: String,
        (arrived, deadline): (Instant, Option<Instant>),
        identity: Option<Arc<PeerIdentity>>,
        tokens: Arc<CallTokens>,
        seq: u64,
    ) -> Self {
        CallContext {
            peer,
            id,
            method,
            deadline,
            arrived,
            identity,
            cancel: CancelSource::Call(tokens, seq),
            max_depth: crate::codec::DEFAULT_MAX_DEPTH,
            metadata: None,
            stream: None,
        }
    }

    /// The same context with `metadata` (checked already).
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = (!metadata.is_empty()).then(|| Arc::new(metadata));
        self
    }

    /// The metadata the caller sent with the call (see
    /// [`crate::metadata`]); empty when it sent none.
    pub fn metadata(&self) -> &Metadata {
        static EMPTY: Metadata = Metadata::EMPTY;
        self.metadata.as_deref().unwrap_or(&EMPTY)
    }

    /// The same context serving a stream call with these handles.
    pub fn with_stream(mut self, stream: ServedStream) -> Self {
        self.stream = Some(Arc::new(Mutex::new(Some(stream))));
        self
    }

    /// A stream call's handles: the caller's items (when it sends any) and
    /// the sender of this side's items. `Some` once, on a call opened as a
    /// stream; `None` on a unary call.
    pub fn take_stream(&self) -> Option<ServedStream> {
        let slot = self.stream.as_ref()?;
        slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The same context with another nesting limit for its arguments.
    pub fn with_max_depth(mut self, max_depth: usize) -> Self {
        self.max_depth = max_depth;
        self
    }

    /// How deeply the call's arguments may nest when decoded: the serving
    /// side's [`ConnectionConfig::max_depth`](crate::ConnectionConfig::max_depth).
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// The caller's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The request id (unique per connection).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The method called.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// When the caller stops waiting, if it said.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// When the request arrived: its bytes were read (the time a call's
    /// deadline and its measured duration count from); for a context made
    /// with [`CallContext::new`], when it was made.
    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    /// The peer's certificate names, when it presented one (mutual TLS).
    pub fn identity(&self) -> Option<&Arc<PeerIdentity>> {
        self.identity.as_ref()
    }

    /// A token that fires when the caller cancels, the deadline passes, the
    /// connection ends (including when the heartbeat declares the peer
    /// dead), or the call is over; the handler's future is dropped then
    /// too. Long handlers, and tasks they start, can watch it. Made when
    /// first asked for: most calls never need one.
    pub fn cancelled(&self) -> CancellationToken {
        match &self.cancel {
            CancelSource::Call(tokens, seq) => tokens.token(*seq),
            CancelSource::Detached(token) => token.clone(),
        }
    }
}

impl fmt::Debug for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("peer", &self.peer)
            .field("id", &self.id)
            .field("method", &self.method())
            .field("deadline", &self.deadline)
            .field("identity", &self.identity)
            .field("metadata", self.metadata())
            .finish_non_exhaustive()
    }
}

/// Where a context's token comes from.
#[derive(Clone)]
enum CancelSource {
    /// A call on a connection: its token is made when first asked for.
    Call(Arc<CallTokens>, u64),
    /// A context made for a test (`CallContext::new`).
    Detached(CancellationToken),
}

/// The call tokens of one connection's served calls, made only when someone
/// asks for one: most handlers never look at theirs, and a token made for
/// every call was a tenth of a small call's cost.
///
/// Calls are keyed by a sequence number of the driver's own (a peer may
/// reuse request ids). A call is live while it is in its first poll
/// (`polling`) or runs as a task (in `made`, put there by the driver); a
/// token asked for after that is born cancelled.
#[derive(Default)]
pub(crate) struct CallTokens {
    /// The call in its first poll, 0 for none. Set by the driver before the
    /// poll; cleared, with `made` locked, after it.
    polling: AtomicU64,
    made: Mutex<HashMap<u64, CancellationToken, BuildHasherDefault<IdHasher>>>,
}

impl CallTokens {
    fn made(
        &self,
    ) -> MutexGuard<'_, HashMap<u64, CancellationToken, BuildHasherDefault<IdHasher>>> {
        // Inserts and removes only: a poisoned map is still consistent.
        self.made.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Call `seq` is about to be polled for the first time.
    pub(crate) fn first_poll_begins(&self, seq: u64) {
        self.polling.store(seq, Ordering::Release);
    }

    /// Call `seq` finished in its first poll: fires its token, if one was
    /// made.
    pub(crate) fn finished_in_first_poll(&self, seq: u64) {
        let mut made = self.made();
        self.polling.store(0, Ordering::Release);
        if !made.is_empty() {
            if let Some(token) = made.remove(&seq) {
                token.cancel();
            }
        }
    }

    /// Call `seq` goes on after its first poll: its token, made now if
    /// nobody asked yet. The call stays live until [`Self::task_ended`].
    pub(crate) fn runs_as_task(&self, seq: u64) -> CancellationToken {
        let mut made = self.made();
        self.polling.store(0, Ordering::Release);
        made.entry(seq).or_default().clone()
    }

    /// Call `seq`, which ran as a task, is over: fires its token.
    pub(crate) fn task_ended(&self, seq: u64) {
        if let Some(token) = self.made().remove(&seq) {
            token.cancel();
        }
    }

    fn token(&self, seq: u64) -> CancellationToken {
        let mut made = self.made();
        if let Some(token) = made.get(&seq) {
            return token.clone();
        }
        let token = CancellationToken::new();
        if self.polling.load(Ordering::Acquire) == seq {
            made.insert(seq, token.clone());
        } else {
            // The call is over.
            token.cancel();
        }
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx_of(tokens: &Arc<CallTokens>, seq: u64) -> CallContext {
        let peer = "127.0.0.1:9".parse().unwrap();
        let timing = (Instant::now(), None);
        CallContext::for_call(peer, 7, "svc.m".into(), timing, None, tokens.clone(), seq)
    }

    #[test]
    fn a_token_taken_in_the_first_poll_is_the_tasks_and_fires_at_its_end() {
        let tokens = Arc::new(CallTokens::default());
        let ctx = ctx_of(&tokens, 1);
        tokens.first_poll_begins(1);
        let first = ctx.cancelled();
        let second = ctx.clone().cancelled();
        assert!(!first.is_cancelled());
        // Still running after its first poll: the driver gets the same token.
        let drivers = tokens.runs_as_task(1);
        drivers.cancel();
        assert!(first.is_cancelled() && second.is_cancelled());
        // A token asked for while the task runs is the same one.
        assert!(ctx.cancelled().is_cancelled());
        tokens.task_ended(1);
        assert!(tokens.made().is_empty());
        assert_eq!((ctx.method(), ctx.id()), ("svc.m", 7));
    }

    #[test]
    fn a_token_of_a_call_that_finished_on_its_first_poll_fires() {
        let tokens = Arc::new(CallTokens::default());
        let taken = ctx_of(&tokens, 1);
        let untaken = ctx_of(&tokens, 2);
        tokens.first_poll_begins(1);
        let token = taken.cancelled();
        tokens.finished_in_first_poll(1);
        assert!(token.is_cancelled());
        // Never asked for during the call: born cancelled afterwards, and
        // nothing is left in the table.
        tokens.first_poll_begins(2);
        tokens.finished_in_first_poll(2);
        assert!(untaken.cancelled().is_cancelled());
        assert!(taken.cancelled().is_cancelled());
        assert!(tokens.made().is_empty());
        // A task's token, asked for after the task ended, is born cancelled.
        let task = ctx_of(&tokens, 3);
        tokens.first_poll_begins(3);
        let live = tokens.runs_as_task(3);
        assert!(!task.cancelled().is_cancelled());
        tokens.task_ended(3);
        assert!(live.is_cancelled() && task.cancelled().is_cancelled());
    }

    #[test]
    fn a_test_context_token_never_fires_by_itself() {
        let ctx = CallContext::new("127.0.0.1:9".parse().unwrap(), 1, "m");
        assert!(!ctx.cancelled().is_cancelled());
        let token = ctx.cancelled();
        token.cancel();
        assert!(ctx.cancelled().is_cancelled(), "one token per context");
    }

    #[test]
    fn metadata_reaches_the_context_and_clones_cheaply_when_empty() {
        let ctx = CallContext::new("127.0.0.1:9".parse().unwrap(), 1, "m");
        assert!(ctx.metadata().is_empty());
        let mut m = Metadata::new();
        m.insert("tenant", "blue").unwrap();
        let ctx = ctx.with_metadata(m);
        assert_eq!(ctx.clone().metadata().get_str("tenant"), Some("blue"));
    }
}
