//! [`Call`]: one call as the layers of the server's stack see it, and
//! [`CallService`], the stack below a user's layer.
//!
//! Not here: the stack (`stack.rs`) and the server's own layers
//! (`layers.rs`).

use bytes::Bytes;
use rpc_core::{CallContext, Status};
use tower::util::BoxCloneSyncService;

/// One call, as the layers of the stack see it: the context (peer,
/// identity, method, metadata, deadline, cancellation) and the encoded
/// arguments.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Call {
    /// What the call is: method, metadata, peer, deadline.
    pub ctx: CallContext,
    /// The encoded arguments.
    pub body: Bytes,
}

impl Call {
    /// A call of `ctx.method()` with encoded arguments.
    pub fn new(ctx: CallContext, body: Bytes) -> Self {
        Call { ctx, body }
    }
}

/// The stack below a user layer, as the layer sees it.
pub type CallService = BoxCloneSyncService<Call, Bytes, Status>;
