//! shoal-net: transports, the only crate that knows sockets (and, later,
//! verbs).
//!
//! Layering: `shoal-common <- shoal-net <- {shoal-server, shoal-client}`.
//! This crate knows no RocksDB, no placement and no object classes; it
//! carries frames. The server and the client both build on it and never
//! import each other.
//!
//! A [`Transport`] carries request frames to a peer and brings back the
//! reply; [`serve`](tcp::serve) runs the accepting side for a server. Both
//! sides speak the frames of [`shoal_common::wire`], pipelining many
//! requests per connection, matched by request id.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> shoal_common::Result<()> {
//! use std::time::Duration;
//!
//! use shoal_net::{call, TcpTransport};
//! use shoal_common::msg::PingReq;
//!
//! let t = TcpTransport::default();
//! let (pong, _segments) = call(&t, "127.0.0.1:10001", &PingReq {}, vec![], 0, 0, Duration::from_secs(5)).await?;
//! println!("server version {}", pong.version);
//! # Ok(()) }
//! ```

pub mod http;
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
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// use std::time::Duration;
///
/// use shoal_net::{call, TcpTransport, Transport};
/// use shoal_common::msg::{PingReply, PingReq};
///
/// /// Pings `addr` over any transport.
/// async fn ping<T: Transport>(t: &T, addr: &str) -> shoal_common::Result<PingReply> {
///     let (pong, _segments) = call(t, addr, &PingReq {}, vec![], 0, 0, Duration::from_secs(5)).await?;
///     Ok(pong)
/// }
///
/// let pong = ping(&TcpTransport::default(), "127.0.0.1:10001").await?;
/// # Ok(()) }
/// ```
pub trait Transport: Send + Sync + 'static {
    /// A short name for `shoal system query` ("tcp", "rdma").
    ///
    /// # Examples
    ///
    /// ```
    /// use shoal_net::{TcpTransport, Transport};
    ///
    /// assert_eq!(TcpTransport::default().name(), "tcp");
    /// ```
    fn name(&self) -> &'static str;

    /// Sends `frame` to `addr` and waits at most `timeout` for the reply.
    /// The transport assigns the request id.
    ///
    /// Cancel safety: dropping the future abandons the request; its reply,
    /// if it comes, is discarded. The request may still have run.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// use std::time::Duration;
    ///
    /// use shoal_net::{TcpTransport, Transport};
    /// use shoal_common::msg::{decode_reply, request_frame, PingReply, PingReq};
    ///
    /// let t = TcpTransport::default();
    /// let frame = request_frame(&PingReq {}, vec![], 0, 0)?;
    /// let reply = t.call("127.0.0.1:10001", frame, Duration::from_secs(5)).await?;
    /// let pong: PingReply = decode_reply(&reply)?;
    /// # Ok(()) }
    /// ```
    fn call(&self, addr: &str, frame: Frame, timeout: Duration) -> impl Future<Output = Result<Frame>> + Send;

    /// Closes every connection; later calls reconnect.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// use std::time::Duration;
    ///
    /// use shoal_common::msg::PingReq;
    /// use shoal_net::{call, TcpTransport, Transport};
    ///
    /// let t = TcpTransport::default();
    /// let secs = Duration::from_secs(5);
    /// call(&t, "127.0.0.1:10001", &PingReq {}, vec![], 0, 0, secs).await?;
    /// // Drop the connections (say, after the server restarted); the next call reconnects.
    /// t.close_all();
    /// call(&t, "127.0.0.1:10001", &PingReq {}, vec![], 0, 0, secs).await?;
    /// # Ok(()) }
    /// ```
    fn close_all(&self);
}

/// Handles one request frame on a server and produces the reply frame.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
///
/// use futures::future::{BoxFuture, FutureExt};
/// use shoal_net::Handler;
/// use shoal_common::msg::{decode_request, reply_frame, PingReply, PingReq};
/// use shoal_common::wire::Frame;
///
/// /// Answers pings.
/// struct Pong;
///
/// impl Handler for Pong {
///     fn handle(self: Arc<Self>, frame: Frame) -> BoxFuture<'static, Frame> {
///         async move {
///             let pong = PingReply { version: "demo".into(), targets: 0, epoch: 1, rank: None, frame_budget: 0, frame_in_use: 0 };
///             let reply = decode_request::<PingReq>(&frame).map(|_| pong);
///             reply_frame(&frame.header, 0, reply, vec![])
///         }
///         .boxed()
///     }
/// }
///
/// // Feed it a request frame as the transport would.
/// let request = shoal_common::msg::request_frame(&PingReq {}, vec![], 0, 0)?;
/// let reply = futures::executor::block_on(Arc::new(Pong).handle(request));
/// let pong: PingReply = shoal_common::msg::decode_reply(&reply)?;
/// assert_eq!(pong.version, "demo");
/// # Ok::<(), shoal_common::ShoalError>(())
/// ```
pub trait Handler: Send + Sync + 'static {
    /// Handles `frame` and returns its reply frame (an error goes back as an
    /// error reply, never as a dropped connection).
    ///
    /// # Examples
    ///
    /// ```
    /// # use std::sync::Arc;
    /// #
    /// # use futures::future::{BoxFuture, FutureExt};
    /// # use shoal_net::Handler;
    /// # use shoal_common::msg::{decode_request, reply_frame, PingReply, PingReq};
    /// # use shoal_common::wire::Frame;
    /// #
    /// # /// Answers pings.
    /// # struct Pong;
    /// #
    /// # impl Handler for Pong {
    /// #     fn handle(self: Arc<Self>, frame: Frame) -> BoxFuture<'static, Frame> {
    /// #         async move {
    /// #             let pong = PingReply { version: "demo".into(), targets: 0, epoch: 1, rank: None, frame_budget: 0, frame_in_use: 0 };
    /// #             let reply = decode_request::<PingReq>(&frame).map(|_| pong);
    /// #             reply_frame(&frame.header, 0, reply, vec![])
    /// #         }
    /// #         .boxed()
    /// #     }
    /// # }
    /// use shoal_common::msg::{decode_reply, request_frame};
    ///
    /// let request = request_frame(&PingReq {}, vec![], 0, 0)?;
    /// let reply = futures::executor::block_on(Arc::new(Pong).handle(request));
    /// assert!(reply.header.is_reply());
    /// let pong: PingReply = decode_reply(&reply)?;
    /// # Ok::<(), shoal_common::ShoalError>(())
    /// ```
    fn handle(self: Arc<Self>, frame: Frame) -> BoxFuture<'static, Frame>;
}

/// Sends a typed request and decodes its typed reply and bulk segments.
///
/// Cancel safety: as [`Transport::call`].
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// use std::time::Duration;
///
/// use shoal_net::{call, TcpTransport};
/// use shoal_common::msg::TargetQueryReq;
///
/// let t = TcpTransport::default();
/// let req = TargetQueryReq { target: 0 };
/// let (usage, _segments) = call(&t, "127.0.0.1:10001", &req, vec![], 0, 0, Duration::from_secs(5)).await?;
/// println!("{} bytes free", usage.free_bytes);
/// # Ok(()) }
/// ```
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

/// Which MS address answered last (the leader, most likely): a caller's
/// management calls start there, whatever the list of addresses has
/// become since.
#[derive(Debug, Default)]
pub struct MsLeader(std::sync::Mutex<Option<String>>);

impl MsLeader {
    pub const fn new() -> MsLeader {
        MsLeader(std::sync::Mutex::new(None))
    }

    /// [`call_ms`] starting at the address that answered last, which it
    /// then remembers.
    pub async fn call<T: Transport, R: Rpc>(
        &self,
        t: &T,
        addrs: &[String],
        req: &R,
        timeout: Duration,
    ) -> Result<R::Reply> {
        let first = {
            let hint = self.0.lock().expect("lock");
            hint.as_ref().and_then(|h| addrs.iter().position(|a| a == h)).unwrap_or(0)
        };
        let (reply, leader) = call_ms(t, addrs, first, req, timeout).await?;
        *self.0.lock().expect("lock") = Some(addrs[leader].clone());
        Ok(reply)
    }
}

/// How long [`call_ms`] waits between rounds over the MS replicas when
/// none of them serves (an election is under way).
const MS_ROUND_PAUSE: Duration = Duration::from_millis(100);

/// Calls the management service, which may be replicated: tries each
/// address in turn, starting at `first`, passing over replicas that are
/// out of reach or are not the leader. While some replica answers that it
/// is not the leader (a leader is being elected), it goes round again
/// until `timeout` has passed; when none does (every address is out of
/// reach) it fails after one round. Any other error is the MS's answer
/// and is returned at once. Returns the reply and the index of
/// the address that answered (the leader: start there next time).
///
/// Every try carries one operation id (in the frame's token), so a change
/// whose answer was lost (its replica died after committing it) and that is
/// asked again of the next leader is applied once: the retry gets the first
/// try's answer, not "exists" or a second OID range.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// use std::time::Duration;
/// use shoal_common::mgmt::PoolListReq;
/// use shoal_net::{call_ms, tcp::TcpTransport};
///
/// let t = TcpTransport::default();
/// let ms = vec!["10.0.0.1:10001".to_string(), "10.0.0.2:10001".to_string()];
/// let (pools, leader) = call_ms(&t, &ms, 0, &PoolListReq {}, Duration::from_secs(10)).await?;
/// println!("{} pools; the leader is at {}", pools.len(), ms[leader]);
/// # Ok(()) }
/// ```
pub async fn call_ms<T: Transport, R: Rpc>(
    t: &T,
    addrs: &[String],
    first: usize,
    req: &R,
    timeout: Duration,
) -> Result<(R::Reply, usize)> {
    use shoal_common::error::Entity;
    use shoal_common::ShoalError;
    let deadline = tokio::time::Instant::now() + timeout;
    // Not 0: that means "no operation id".
    let op = rand::random::<u128>() | 1;
    let mut last = ShoalError::not_found(Entity::ManagementService, "no management service address given");
    if addrs.is_empty() {
        return Err(last);
    }
    let leaderless = |last: &ShoalError| {
        ShoalError::Unreachable(format!(
            "no management service replica leads after {timeout:?}; a majority of the {} replicas may be down \
             (last answer: {last})",
            addrs.len()
        ))
    };
    // With several replicas, one that does not answer (a host gone dark)
    // must not take the whole time: each try gets a share of it, but at
    // least 12 s (a destroy may wait 10 s for the servers).
    let per_try = match addrs.len() {
        1 => timeout,
        n => (timeout / n as u32).max(Duration::from_secs(12)).min(timeout),
    };
    loop {
        let mut electing = false;
        for k in 0..addrs.len() {
            let i = (first + k) % addrs.len();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(if electing { leaderless(&last) } else { last });
            }
            match call(t, &addrs[i], req, vec![], 0, op, left.min(per_try)).await {
                Ok((r, _)) => return Ok((r, i)),
                Err(e) if e.peer_failed() || e.missing() == Some(Entity::ManagementService) => last = e,
                // A replica that does not lead: another may.
                Err(e @ ShoalError::NotLeader(_)) => {
                    electing = true;
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        if !electing {
            return Err(last);
        }
        if tokio::time::Instant::now() + MS_ROUND_PAUSE >= deadline {
            return Err(leaderless(&last));
        }
        tokio::time::sleep(MS_ROUND_PAUSE).await;
    }
}
