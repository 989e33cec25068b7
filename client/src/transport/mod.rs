//! Transports: the only module that knows sockets (and, later, verbs).
//!
//! A [`Transport`] carries request frames to a peer and brings back the
//! reply; [`serve`](tcp::serve) runs the accepting side for a server. Both
//! sides speak the frames of [`shoal_common::wire`], pipelining many
//! requests per connection, matched by request id.
//!
//! The server crate uses this module to listen; the client never imports
//! the server.

pub mod tcp;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use shoal_common::msg::{decode_reply, request_frame, Rpc};
use shoal_common::wire::Frame;
use shoal_common::Result;

pub use tcp::TcpTransport;

/// Carries request frames to peers and returns their replies.
pub trait Transport: Send + Sync + 'static {
    /// A short name for `shoal system query` ("tcp", "rdma").
    fn name(&self) -> &'static str;

    /// Sends `frame` to `addr` and waits at most `timeout` for the reply.
    /// The transport assigns the request id.
    ///
    /// Cancel safety: dropping the future abandons the request; its reply,
    /// if it comes, is discarded. The request may still have run.
    fn call(&self, addr: &str, frame: Frame, timeout: Duration) -> impl Future<Output = Result<Frame>> + Send;

    /// Closes every connection; later calls reconnect.
    fn close_all(&self);
}

/// Handles one request frame on a server and produces the reply frame.
pub trait Handler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, frame: Frame) -> BoxFuture<'static, Frame>;
}

/// Sends a typed request and decodes its typed reply and bulk segments.
///
/// Cancel safety: as [`Transport::call`].
pub async fn call<T: Transport, R: Rpc>(
    t: &T,
    addr: &str,
    req: &R,
    segments: Vec<Bytes>,
    map_version: u32,
    token: u128,
    timeout: Duration,
) -> Result<(R::Reply, Vec<Bytes>)> {
    let frame = request_frame(req, segments, map_version, token)?;
    let reply = t.call(addr, frame, timeout).await?;
    let body = decode_reply::<R::Reply>(&reply)?;
    Ok((body, reply.segments))
}
