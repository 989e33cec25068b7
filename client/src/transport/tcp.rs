//! TCP transport on tokio.
//!
//! Client side: a small pool of connections per peer; each connection has
//! a writer task fed by a channel and a reader task that routes replies to
//! waiting callers by request id, so many requests are in flight at once.
//! A broken connection fails its pending calls with `Unreachable` and is
//! replaced on the next call.
//!
//! Server side: [`serve`] accepts connections until its cancellation token
//! fires, runs up to [`MAX_INFLIGHT_PER_CONN`] requests per connection
//! concurrently and closes a connection that sends a malformed frame.
//! Shutdown stops accepting, lets in-flight requests finish, and returns.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> shoal_common::Result<()> {
//! use std::time::{Duration, Instant};
//!
//! use shoal_client::transport::tcp::{TcpOptions, TcpTransport};
//! use shoal_client::transport::Transport;
//! use shoal_common::msg::{decode_reply, request_frame, PingReply, PingReq};
//!
//! let t = TcpTransport::new(TcpOptions { conns_per_peer: 4, ..TcpOptions::default() });
//! let reply = t.call("127.0.0.1:10001", request_frame(&PingReq {}, vec![], 0, 0)?, Duration::from_secs(5)).await?;
//! let pong: PingReply = decode_reply(&reply)?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use shoal_common::msg::reply_frame;
use shoal_common::wire::{Frame, FrameDecoder};
use shoal_common::{Result, ShoalError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{Handler, Transport};

/// Requests one server connection runs at once; more wait for a slot.
///
/// # Examples
///
/// ```
/// use shoal_client::transport::tcp::{TcpOptions, MAX_INFLIGHT_PER_CONN};
///
/// // Requests of one client transport that one server runs at once.
/// let parallel = TcpOptions::default().conns_per_peer * MAX_INFLIGHT_PER_CONN;
/// assert_eq!(parallel, 128);
/// ```
pub const MAX_INFLIGHT_PER_CONN: usize = 64;
/// How long a server waits for the rest of a half-received frame before it
/// closes the connection.
pub const PARTIAL_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a closing connection may take to finish its requests and send
/// their replies.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Connections a server accepts at once; more wait in the backlog.
///
/// # Examples
///
/// ```
/// use shoal_client::transport::tcp::{TcpOptions, MAX_CONNECTIONS};
///
/// // Client processes with default options that one server serves at once.
/// assert_eq!(MAX_CONNECTIONS / TcpOptions::default().conns_per_peer, 512);
/// ```
pub const MAX_CONNECTIONS: usize = 1024;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Frame>>>>>;

struct Conn {
    tx: mpsc::Sender<Frame>,
    pending: Pending,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Options of the TCP transport.
///
/// # Examples
///
/// ```
/// use std::time::{Duration, Instant};
///
/// use shoal_client::transport::tcp::{TcpOptions, TcpTransport};
///
/// let opts = TcpOptions { conns_per_peer: 8, connect_timeout: Duration::from_secs(1) };
/// let transport = TcpTransport::new(opts);
/// ```
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Connections kept per peer; calls are spread over them.
    pub conns_per_peer: usize,
    /// How long a connect may take.
    pub connect_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions { conns_per_peer: 2, connect_timeout: Duration::from_secs(5) }
    }
}

/// The TCP client transport. Cheap to share; one per process is plenty.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// use std::sync::Arc;
///
/// use shoal_client::transport::TcpTransport;
/// use shoal_client::ServerClient;
/// use shoal_common::Hlc;
///
/// // One transport per process, shared by every client.
/// let transport = Arc::new(TcpTransport::default());
/// let hlc = Arc::new(Hlc::new());
/// for addr in ["10.0.0.1:10001", "10.0.0.2:10001"] {
///     let pong = ServerClient::new(transport.clone(), addr, hlc.clone()).ping().await?;
///     println!("{addr}: {} targets", pong.targets);
/// }
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct TcpTransport {
    opts: TcpOptions,
    peers: Mutex<HashMap<String, Vec<Arc<Conn>>>>,
    rr: AtomicUsize,
    /// Peers whose last connect attempt timed out, and until when calls to
    /// them fail at once instead of waiting for another connect timeout.
    silent: Mutex<HashMap<String, Instant>>,
}

/// How long a peer that let a connect time out is not tried again.
pub const SILENT_PEER_BACKOFF: Duration = Duration::from_secs(2);

impl TcpTransport {
    /// A transport with the given options.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    ///
    /// use shoal_client::transport::tcp::{TcpOptions, TcpTransport};
    ///
    /// let opts = TcpOptions { connect_timeout: Duration::from_millis(500), ..TcpOptions::default() };
    /// let transport = TcpTransport::new(opts);
    /// ```
    pub fn new(opts: TcpOptions) -> Self {
        TcpTransport { opts, peers: Mutex::new(HashMap::new()), rr: AtomicUsize::new(0), silent: Mutex::default() }
    }

    async fn conn(&self, addr: &str) -> Result<Arc<Conn>> {
        let pick = self.rr.fetch_add(1, Ordering::Relaxed);
        {
            let mut peers = self.peers.lock().expect("lock");
            let list = peers.entry(addr.to_string()).or_default();
            list.retain(|c| !c.dead.load(Ordering::Acquire));
            if list.len() >= self.opts.conns_per_peer.max(1) {
                return Ok(list[pick % list.len()].clone());
            }
        }
        if let Some(until) = self.silent.lock().expect("lock").get(addr) {
            if Instant::now() < *until {
                return Err(ShoalError::Unreachable(format!(
                    "{addr} let a connect time out moments ago; not trying again before {SILENT_PEER_BACKOFF:?} pass"
                )));
            }
        }
        let stream = match tokio::time::timeout(self.opts.connect_timeout, TcpStream::connect(addr)).await {
            Ok(r) => r.map_err(|e| ShoalError::Unreachable(format!("connect to {addr}: {e}")))?,
            Err(_) => {
                // A host that swallows connects would cost every call a full
                // timeout; fail fast for a while instead (degraded reads go
                // to other shards at once).
                self.silent.lock().expect("lock").insert(addr.to_string(), Instant::now() + SILENT_PEER_BACKOFF);
                return Err(ShoalError::Timeout(format!("connect to {addr}")));
            }
        };
        self.silent.lock().expect("lock").remove(addr);
        stream.set_nodelay(true).ok();
        let conn = Arc::new(spawn_client_conn(stream, addr.to_string()));
        let mut peers = self.peers.lock().expect("lock");
        let list = peers.entry(addr.to_string()).or_default();
        list.push(conn.clone());
        Ok(conn)
    }
}

fn spawn_client_conn(stream: TcpStream, addr: String) -> Conn {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Frame>(256);
    let pending: Pending = Arc::default();
    let dead = Arc::new(AtomicBool::new(false));
    let fail_all = {
        let pending = pending.clone();
        let dead = dead.clone();
        let addr = addr.clone();
        move |why: String| {
            dead.store(true, Ordering::Release);
            for (_, p) in pending.lock().expect("lock").drain() {
                let _ = p.send(Err(ShoalError::Unreachable(format!("{addr}: {why}"))));
            }
        }
    };
    let writer = {
        let fail_all = fail_all.clone();
        tokio::spawn(async move {
            if let Err(e) = write_frames(wr, rx).await {
                fail_all(format!("send failed: {e}"));
            }
        })
    };
    let reader = {
        let pending = pending.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 << 10);
            let mut dec = FrameDecoder;
            let mut rd = rd;
            let why = loop {
                match read_frame(&mut rd, &mut buf, &mut dec, None).await {
                    Ok(Some(f)) => {
                        let waiter = pending.lock().expect("lock").remove(&f.header.request_id);
                        match waiter {
                            Some(w) => {
                                let _ = w.send(Ok(f));
                            }
                            None => debug!(request_id = f.header.request_id, "reply to an abandoned request"),
                        }
                    }
                    Ok(None) => break "connection closed by peer".to_string(),
                    Err(e) => break e.to_string(),
                }
            };
            fail_all(why);
        })
    };
    Conn { tx, pending, next_id: AtomicU64::new(1), dead, tasks: vec![writer, reader] }
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
/// With `stall`, a frame must arrive whole within that long of its first
/// byte: a server must not hold a frame buffer for a silent or trickling
/// client.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    dec: &mut FrameDecoder,
    stall: Option<Duration>,
) -> Result<Option<Frame>> {
    let mut deadline = None;
    loop {
        if let Some(f) = dec.decode(buf)? {
            return Ok(Some(f));
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 << 10);
        }
        let held = buf.len();
        if held > 0 && deadline.is_none() {
            deadline = stall.map(|limit| tokio::time::Instant::now() + limit);
        }
        let read = rd.read_buf(buf);
        let n = match deadline {
            Some(d) => tokio::time::timeout_at(d, read).await.map_err(|_| {
                ShoalError::protocol(format!("peer took longer than {stall:?} to send a frame ({held} bytes so far)"))
            })?,
            None => read.await,
        }
        .map_err(|e| ShoalError::Unreachable(format!("read: {e}")))?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ShoalError::protocol(format!("connection closed inside a frame ({} bytes)", buf.len())));
        }
    }
}

/// Writes frames from the channel until it closes. Segments are written
/// as they are, never copied into the frame buffer.
async fn write_frames<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::Receiver<Frame>) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(64 << 10, wr);
    while let Some(f) = rx.recv().await {
        write_one(&mut w, &f).await?;
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

async fn write_one<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, f: &Frame) -> std::io::Result<()> {
    let head = f.encode_head().map_err(std::io::Error::other)?;
    w.write_all(&head).await?;
    for s in &f.segments {
        w.write_all(s).await?;
    }
    Ok(())
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    async fn call(&self, addr: &str, mut frame: Frame, timeout: Duration) -> Result<Frame> {
        frame.check_limits()?;
        let fut = async {
            let conn = self.conn(addr).await?;
            let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
            frame.header.request_id = id;
            let (tx, rx) = oneshot::channel();
            conn.pending.lock().expect("lock").insert(id, tx);
            let guard = PendingGuard { pending: &conn.pending, id };
            // The reader may have failed every waiter just before the insert.
            if conn.dead.load(Ordering::Acquire) {
                return Err(ShoalError::Unreachable(format!("{addr}: connection closed")));
            }
            if conn.tx.send(frame).await.is_err() {
                return Err(ShoalError::Unreachable(format!("{addr}: connection closed")));
            }
            let r = rx.await.map_err(|_| ShoalError::Unreachable(format!("{addr}: connection closed")))?;
            drop(guard);
            r
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ShoalError::Timeout(format!("no reply from {addr} within {timeout:?}")))?
    }

    fn close_all(&self) {
        self.peers.lock().expect("lock").clear();
    }
}

/// Removes a pending entry when its caller gives up (timeout or drop).
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().expect("lock").remove(&self.id);
    }
}

/// Binds a TCP listener; port 0 lets the OS choose.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// use shoal_client::transport::tcp::bind;
///
/// // Port 0: the OS picks a free port.
/// let listener = bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr().expect("a bound socket has an address");
/// println!("listening on {addr}");
/// # Ok(()) }
/// ```
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| ShoalError::Io(format!("listen on {addr}: {e}")))
}

/// Serves requests on `listener` with `handler` until `shutdown` fires,
/// then waits for in-flight requests to finish.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// # use std::sync::Arc;
/// #
/// # use futures::future::{BoxFuture, FutureExt};
/// # use shoal_client::transport::Handler;
/// # use shoal_common::msg::{decode_request, reply_frame, PingReply, PingReq};
/// # use shoal_common::wire::Frame;
/// #
/// # /// Answers pings.
/// # struct Pong;
/// #
/// # impl Handler for Pong {
/// #     fn handle(self: Arc<Self>, frame: Frame) -> BoxFuture<'static, Frame> {
/// #         async move {
/// #             let pong = PingReply { version: "demo".into(), targets: 0, epoch: 1 };
/// #             let reply = decode_request::<PingReq>(&frame).map(|_| pong);
/// #             reply_frame(&frame.header, 0, reply, vec![])
/// #         }
/// #         .boxed()
/// #     }
/// # }
/// use shoal_client::transport::tcp::{bind, serve};
/// use tokio_util::sync::CancellationToken;
///
/// let listener = bind("127.0.0.1:0").await?;
/// let shutdown = CancellationToken::new();
/// // `Pong` is a `Handler`, as in the `Handler` example.
/// let server = tokio::spawn(serve(listener, Arc::new(Pong), shutdown.clone()));
/// // ... until it is time to stop:
/// shutdown.cancel();
/// server.await.expect("the serve task does not panic");
/// # Ok(()) }
/// ```
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let local = listener.local_addr().ok();
    info!(addr = ?local, "serving TCP");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        stream.set_nodelay(true).ok();
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            serve_conn(stream, peer, handler, shutdown).await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
    info!(addr = ?local, "TCP service stopped");
}

async fn serve_conn<H: Handler>(stream: TcpStream, peer: SocketAddr, handler: Arc<H>, shutdown: CancellationToken) {
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Frame>(MAX_INFLIGHT_PER_CONN);
    let mut writer = tokio::spawn(async move {
        if let Err(e) = write_frames(wr, rx).await {
            debug!(%peer, "reply write failed: {e}");
        }
    });
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_PER_CONN));
    let tasks = TaskTracker::new();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut dec = FrameDecoder;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = read_frame(&mut rd, &mut buf, &mut dec, Some(PARTIAL_FRAME_TIMEOUT)) => r,
        };
        let frame = match next {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                warn!(%peer, "closing connection: {e}");
                break;
            }
        };
        if frame.header.is_reply() {
            warn!(%peer, "closing connection: client sent a reply frame");
            break;
        }
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = inflight.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let handler = handler.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let header = frame.header;
            let mut reply = handler.handle(frame).await;
            if let Err(e) = reply.check_limits() {
                // Never let one oversized reply break the connection.
                warn!(%peer, "reply over the caps replaced by an error: {e}");
                reply = reply_frame::<()>(
                    &header,
                    reply.header.map_version,
                    Err(ShoalError::Internal(e.to_string())),
                    vec![],
                );
            }
            let _ = tx.send(reply).await;
            drop(permit);
        });
    }
    tasks.close();
    drop(tx);
    // Requests in flight finish and their replies go out, unless the peer
    // stops reading: then the connection is dropped after a grace period so
    // that shutdown never hangs on it.
    let finish = async {
        tasks.wait().await;
        let _ = (&mut writer).await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, finish).await.is_err() {
        warn!(%peer, "connection still busy {SHUTDOWN_GRACE:?} after its reader stopped; dropping it");
        writer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_peer_stalling_inside_a_frame_is_cut_off() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let f = Frame::default().encode_to_vec().unwrap();
        client.write_all(&f[..10]).await.unwrap();
        let mut buf = BytesMut::new();
        let r = read_frame(&mut server, &mut buf, &mut FrameDecoder, Some(PARTIAL_FRAME_TIMEOUT)).await;
        assert!(matches!(r, Err(ShoalError::Protocol(_))), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_trickling_a_frame_is_cut_off_too() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let f = Frame::default().encode_to_vec().unwrap();
        let trickle = tokio::spawn(async move {
            for b in f {
                client.write_all(&[b]).await.unwrap();
                tokio::time::sleep(PARTIAL_FRAME_TIMEOUT / 4).await;
            }
            client
        });
        let mut buf = BytesMut::new();
        let r = read_frame(&mut server, &mut buf, &mut FrameDecoder, Some(PARTIAL_FRAME_TIMEOUT)).await;
        assert!(matches!(r, Err(ShoalError::Protocol(_))), "{r:?}");
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_peer_between_frames_is_not() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        let mut dec = FrameDecoder;
        let read = read_frame(&mut server, &mut buf, &mut dec, Some(PARTIAL_FRAME_TIMEOUT));
        let r = tokio::time::timeout(PARTIAL_FRAME_TIMEOUT * 4, read).await;
        assert!(r.is_err(), "still waiting for a first byte");
        drop(client);
    }
}
