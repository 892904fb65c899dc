//! Stream calls from the client: pick a server as a call does, open the
//! stream on its connection, and hand back its two ends. Generated clients
//! reach this through [`StreamCaller`].
//!
//! A stream is not retried or sent again: its items are not kept. One that
//! never reached the server (`NotSent`, `GoAway`) fails like any call that
//! did not run, and the caller may open it again. The pool's latency
//! estimate is not fed a stream's duration (it would read a 10-minute
//! download as a slow server).
//!
//! Not here: the streams themselves (rpc-core's `streams/`, `streaming.rs`).

use std::future::Future;

use serde::Serialize;
use tokio::time::Instant;

use rpc_core::service::StreamCaller;
use rpc_core::{CallOptions, StreamReceiver, StreamSender};

use crate::client::Client;
use crate::error::ClientError;

impl Client {
    /// Opens `method` as a stream call with `args`: the sender of this
    /// side's items (when `sends_stream`) and the receiver of the server's,
    /// then its reply. `options.timeout` (or the client's) covers the whole
    /// stream.
    pub async fn open_stream<A: Serialize + ?Sized>(
        &self,
        method: &str,
        args: &A,
        options: &CallOptions,
        sends_stream: bool,
    ) -> Result<(Option<StreamSender>, StreamReceiver), ClientError> {
        let options = options.or(&self.defaults);
        let timeout = options.timeout.unwrap_or(crate::DEFAULT_TIMEOUT);
        let wait_for_ready = options.wait_for_ready.unwrap_or(false);
        let body = self.encode(method, args)?;
        let deadline = Instant::now() + timeout;
        let picked = self
            .ready_connection(None, deadline, timeout, wait_for_ready)
            .await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let metadata = options.metadata;
        // The caller's trace goes with the stream, as with a call.
        #[cfg(feature = "otel")]
        let metadata =
            rpc_core::trace_context::with_current(std::borrow::Cow::Owned(metadata)).into_owned();
        let opened = picked
            .conn
            .open_stream(method, body, left, metadata, sends_stream)
            .await;
        // Uncounted from the server's calls in flight (see the module docs).
        drop(picked);
        opened.map_err(ClientError::Call)
    }
}

impl StreamCaller for Client {
    fn open_stream<'a, A>(
        &'a self,
        method: &'static str,
        args: &'a A,
        options: &'a CallOptions,
        sends_stream: bool,
    ) -> impl Future<Output = Result<(Option<StreamSender>, StreamReceiver), ClientError>> + Send + 'a
    where
        A: Serialize + Sync,
    {
        Client::open_stream(self, method, args, options, sends_stream)
    }

    fn max_depth(&self) -> usize {
        self.pool().settings.config.max_depth
    }

    fn stream_error(&self, _method: &'static str, error: rpc_core::Error) -> ClientError {
        ClientError::Call(error)
    }
}
