//! Typed streams, what `#[service]` methods take and return:
//! [`Streaming<T>`] receives items, [`ServerStream<T>`] is what a handler
//! returns to send them.
//!
//! ```text
//! #[service] trait Files {
//!     async fn download(&self, name: String) -> Result<ServerStream<Chunk>, Status>;
//!     async fn upload(&self, name: String, data: Streaming<Chunk>) -> Result<u64, Status>;
//! }
//! client: files.download(name) -> Streaming<Chunk>        (a Stream of Result<Chunk, Status>)
//!         files.upload(name, any Stream<Item = Chunk>) -> u64
//! ```
//!
//! A stream's final error is its last item, after every item sent before
//! it; dropping a `Streaming` cancels (caller) or resets (callee) the
//! stream on the other side.
//!
//! Not here: credit and pieces (`streams/`).

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt;

/// The `Stream` trait streams are built from (futures' own), re-exported so
/// generated code and users name one trait.
pub use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::context::CallContext;
use crate::error::{Error, Status, StatusCode};
use crate::streams::handles::{ServedStream, StreamReceiver, StreamSender};

/// The receiving end of a stream of `T`: a [`Stream`] of
/// `Result<T, Status>`, or [`message`](Streaming::message) one at a time.
/// An `Err` is the last item.
pub struct Streaming<T> {
    receiver: StreamReceiver,
    max_depth: usize,
    done: bool,
    /// The task sending the caller's own items (a call streaming both
    /// ways), stopped with this stream.
    pump: Option<tokio::task::JoinHandle<()>>,
    _items: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Streaming<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("id", &self.receiver.id())
            .field("done", &self.done)
            .finish()
    }
}

impl<T> Streaming<T> {
    /// Items from `receiver`, decoded within `max_depth` levels of nesting.
    pub fn new(receiver: StreamReceiver, max_depth: usize) -> Self {
        Streaming {
            receiver,
            max_depth,
            done: false,
            pump: None,
            _items: PhantomData,
        }
    }

    /// The same stream, which stops `pump` (the task sending this side's
    /// items) when dropped.
    pub fn with_pump(mut self, pump: Option<tokio::task::JoinHandle<()>>) -> Self {
        self.pump = pump;
        self
    }
}

impl<T: DeserializeOwned + 'static> Streaming<T> {
    /// The next item; `Ok(None)` once the stream ended well.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        self.next().await.transpose()
    }
}

impl<T> Drop for Streaming<T> {
    fn drop(&mut self) {
        if let Some(pump) = &self.pump {
            pump.abort();
        }
    }
}

impl<T: DeserializeOwned + 'static> Stream for Streaming<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let item = match std::task::ready!(this.receiver.poll_next(cx)) {
            Some(Ok(bytes)) => codec::decode_owned::<T>(&bytes, bytes.len(), this.max_depth)
                .map_err(|e| {
                    Status::new(
                        StatusCode::InvalidArgument,
                        format!(
                            "stream item did not decode as {}: {e}",
                            std::any::type_name::<T>()
                        ),
                    )
                }),
            Some(Err(e)) => Err(status_of(e)),
            // The caller's side: the call's result ends the stream.
            None => match this.receiver.take_result() {
                Some(Err(e)) => Err(status_of(e)),
                _ => {
                    this.done = true;
                    return Poll::Ready(None);
                }
            },
        };
        if item.is_err() {
            this.done = true;
        }
        Poll::Ready(Some(item))
    }
}

/// What a handler returns to send a stream of `T`: built from any
/// [`Stream`] of `Result<T, Status>` (an `Err` ends the stream with that
/// status, after the items before it) or from an iterator.
pub struct ServerStream<T> {
    items: Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>,
}

impl<T> std::fmt::Debug for ServerStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerStream").finish_non_exhaustive()
    }
}

impl<T: Send + 'static> ServerStream<T> {
    /// Sends the items of `stream`.
    pub fn new<S>(stream: S) -> Self
    where
        S: Stream<Item = Result<T, Status>> + Send + 'static,
    {
        ServerStream {
            items: Box::pin(stream),
        }
    }

    /// Sends the items of `items`.
    pub fn iter<I>(items: I) -> Self
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
    {
        Self::new(futures_util::stream::iter(items.into_iter().map(Ok)))
    }
}

/// What failed a stream, as the status its receiver sees.
pub fn status_of(error: Error) -> Status {
    match error {
        Error::Status(status) => status,
        Error::DeadlineExceeded(t) => Status::new(
            StatusCode::DeadlineExceeded,
            format!("deadline exceeded: the stream did not end within {t:?}"),
        ),
        Error::StreamReset { .. } => Status::new(StatusCode::Cancelled, error.to_string()),
        other => Status::unavailable(other.to_string()),
    }
}

/// The stream handles of the call `ctx` serves (used by generated code):
/// `FailedPrecondition` when it was called as a plain call.
pub fn served_stream(method: &str, ctx: &CallContext) -> Result<ServedStream, Status> {
    ctx.take_stream().ok_or_else(|| {
        Status::failed_precondition(format!(
            "{method} is a stream method: open it as a stream (a generated client does)"
        ))
    })
}

/// The caller's items for a handler (used by generated code).
pub fn incoming<T>(
    method: &str,
    ctx: &CallContext,
    receiver: Option<StreamReceiver>,
) -> Result<Streaming<T>, Status> {
    match receiver {
        Some(receiver) => Ok(Streaming::new(receiver, ctx.max_depth())),
        None => Err(Status::failed_precondition(format!(
            "{method} takes a stream of items, but the caller opened it without one"
        ))),
    }
}

/// Sends every item of `items`, then the encoded `()` that ends the call
/// (used by generated code for a handler's `ServerStream`).
pub async fn send_all<T: Serialize>(
    method: &str,
    mut sender: StreamSender,
    mut items: ServerStream<T>,
) -> Result<Bytes, Status> {
    while let Some(item) = items.items.next().await {
        let bytes = encode_item(method, &item?)?;
        sender.send(bytes).await.map_err(status_of)?;
    }
    crate::service::encode_reply(method, &())
}

/// Sends every item of `items` and ends the caller's stream (`End`); an
/// error stops it (the call's result says why).
pub async fn send_items<T, S>(method: &str, mut sender: StreamSender, items: S) -> Result<(), Error>
where
    T: Serialize + Send,
    S: Stream<Item = T> + Send,
{
    let mut items = std::pin::pin!(items);
    while let Some(item) = items.next().await {
        let bytes = encode_item(method, &item).map_err(Error::Status)?;
        drop(item);
        sender.send(bytes).await?;
    }
    sender.end().await
}

/// Sends the caller's `items` while waiting for the call's reply, and
/// decodes it as `R`: a client-streaming call (used by generated code).
/// The reply wins: a callee that answers before reading everything ends
/// the sending.
pub async fn send_then_reply<T, S, R>(
    method: &str,
    sender: Option<StreamSender>,
    mut receiver: StreamReceiver,
    items: S,
    max_depth: usize,
) -> Result<R, Error>
where
    T: Serialize + Send,
    S: Stream<Item = T> + Send,
    R: DeserializeOwned + 'static,
{
    let sending = async {
        if let Some(sender) = sender {
            // A failure to send shows in the reply (a reset or a closed
            // connection ends the call too).
            let _ = send_items(method, sender, items).await;
        }
        std::future::pending::<()>().await
    };
    let reply = tokio::select! {
        reply = receiver.result() => reply,
        _ = sending => None,
    };
    let reply =
        reply.unwrap_or_else(|| Err(Error::Protocol("stream call without a result".into())))?;
    Ok(codec::decode_owned(&reply, reply.len(), max_depth)?)
}

/// Sends the caller's `items` from a task of their own, for a call that
/// streams both ways (used by generated code); the task is stopped with
/// the [`Streaming`] it is given to ([`Streaming::with_pump`]).
pub fn spawn_items<T, S>(
    method: &'static str,
    sender: Option<StreamSender>,
    items: S,
) -> Option<tokio::task::JoinHandle<()>>
where
    T: Serialize + Send,
    S: Stream<Item = T> + Send + 'static,
{
    let sender = sender?;
    Some(tokio::spawn(async move {
        // A failure shows in the call's result, which the `Streaming` gives.
        let _ = send_items(method, sender, items).await;
    }))
}

fn encode_item<T: Serialize>(method: &str, item: &T) -> Result<Bytes, Status> {
    codec::encode(item, usize::MAX)
        .map_err(|e| Status::internal(format!("a stream item of {method:?} did not encode: {e}")))
}
