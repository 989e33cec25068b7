//! TCP transport on tokio.
//!
//! Client side: a small pool of connections per peer; each connection has
//! a writer task fed by a channel and a reader task that routes replies to
//! waiting callers by request id, so many requests are in flight at once.
//! A broken connection fails its pending calls with `Unreachable` and is
//! replaced on the next call.
//!
//! Dead peers: every socket has TCP keepalive and a user timeout (a crashed
//! host or a cut link is noticed by the kernel within about ten seconds),
//! and a connection with calls waiting that has heard nothing for
//! [`PING_AFTER`] sends a transport ping ([`FLAG_PING`]), which the server
//! answers at once whatever it is busy with; no answer within
//! [`PING_TIMEOUT`] (a frozen or partitioned peer, whose kernel may still
//! acknowledge bytes) fails the connection's calls with `Unreachable`. A
//! client connection idle for [`IDLE_CLOSE`] is closed; a server closes
//! connections that sent nothing for [`ServeOptions::idle_timeout`].
//!
//! Server side: [`serve`] accepts connections until its cancellation token
//! fires, runs up to [`MAX_INFLIGHT_PER_CONN`] requests per connection
//! concurrently and closes a connection that sends a malformed frame.
//! Memory: before it reads a frame past its header, a connection takes the
//! frame's size from the server's [`Budget`], and keeps it until the reply
//! is written; while the budget is used up it stops reading, so senders
//! wait (TCP back-pressure) rather than get errors. Shutdown stops
//! accepting, lets in-flight requests finish, and returns.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> shoal_common::Result<()> {
//! use std::time::{Duration, Instant};
//!
//! use shoal_net::tcp::{TcpOptions, TcpTransport};
//! use shoal_net::Transport;
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

use bytes::{Bytes, BytesMut};
use shoal_common::msg::reply_frame;
use shoal_common::wire::{frame_len, Frame, FrameDecoder, Header, FLAG_PING, FLAG_REPLY};
use shoal_common::{Result, ShoalError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{Handler, Transport};

/// Requests one server connection runs at once; more wait for a slot.
///
/// # Examples
///
/// ```
/// use shoal_net::tcp::{TcpOptions, MAX_INFLIGHT_PER_CONN};
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
/// use shoal_net::tcp::{TcpOptions, MAX_CONNECTIONS};
///
/// // Client processes with default options that one server serves at once.
/// assert_eq!(MAX_CONNECTIONS / TcpOptions::default().conns_per_peer, 512);
/// ```
pub const MAX_CONNECTIONS: usize = 1024;

/// A connection with calls waiting that heard nothing for this long
/// pings its peer.
pub const PING_AFTER: Duration = Duration::from_secs(1);
/// A ping unanswered for this long fails the connection.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A client connection without calls for this long is closed.
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// Keepalive probes start after this much silence...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// ...repeat this often...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// ...and this many unanswered ones break the connection.
const KEEPALIVE_PROBES: u32 = 3;
/// Bytes sent but not acknowledged for this long break the connection.
const USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Turns on keepalive and the user timeout of a socket, so that the kernel
/// notices a crashed peer or a cut link by itself.
fn tune(stream: &TcpStream) {
    stream.set_nodelay(true).ok();
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        debug!("cannot turn on TCP keepalive: {e}");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        debug!("cannot set the TCP user timeout: {e}");
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Frame>>>>>;

/// Milliseconds since `base`, for lock-free activity stamps.
fn ms_since(base: Instant) -> u64 {
    base.elapsed().as_millis() as u64
}

struct Conn {
    tx: mpsc::Sender<Frame>,
    pending: Pending,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    base: Instant,
    last_call: Arc<AtomicU64>,
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
/// use shoal_net::tcp::{TcpOptions, TcpTransport};
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
/// use std::time::Duration;
///
/// use shoal_common::msg::PingReq;
/// use shoal_net::{call, TcpTransport};
///
/// // One transport per process, shared by every caller.
/// let transport = TcpTransport::default();
/// for addr in ["10.0.0.1:10001", "10.0.0.2:10001"] {
///     let (pong, _) = call(&transport, addr, &PingReq {}, vec![], 0, 0, Duration::from_secs(5)).await?;
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
    /// Liveness probes per peer.
    probers: Mutex<HashMap<String, Arc<Prober>>>,
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
    /// use shoal_net::tcp::{TcpOptions, TcpTransport};
    ///
    /// let opts = TcpOptions { connect_timeout: Duration::from_millis(500), ..TcpOptions::default() };
    /// let transport = TcpTransport::new(opts);
    /// ```
    pub fn new(opts: TcpOptions) -> Self {
        TcpTransport {
            opts,
            peers: Mutex::new(HashMap::new()),
            rr: AtomicUsize::new(0),
            silent: Mutex::default(),
            probers: Mutex::default(),
        }
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
        // A malformed address is the caller's mistake, not a peer that may
        // come back: not retryable.
        let port = addr.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
        if !matches!(port, Some(Ok(_))) {
            return Err(ShoalError::invalid(format!("malformed address {addr:?}: expected HOST:PORT")));
        }
        let stream = match tokio::time::timeout(self.opts.connect_timeout, TcpStream::connect(addr)).await {
            Ok(r) => r.map_err(|e| ShoalError::Connection { peer: addr.to_string(), source: e.into() })?,
            Err(_) => {
                // A host that swallows connects would cost every call a full
                // timeout; fail fast for a while instead (degraded reads go
                // to other shards at once).
                self.silent.lock().expect("lock").insert(addr.to_string(), Instant::now() + SILENT_PEER_BACKOFF);
                return Err(ShoalError::Timeout(format!("connect to {addr}")));
            }
        };
        self.silent.lock().expect("lock").remove(addr);
        tune(&stream);
        let prober = self
            .probers
            .lock()
            .expect("lock")
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(Prober::new(addr)))
            .clone();
        let conn = Arc::new(spawn_client_conn(stream, addr.to_string(), prober));
        let mut peers = self.peers.lock().expect("lock");
        let list = peers.entry(addr.to_string()).or_default();
        list.push(conn.clone());
        Ok(conn)
    }
}

/// Liveness probes of one peer, on a connection of their own.
#[derive(Default)]
struct Prober {
    addr: String,
    conn: tokio::sync::Mutex<Option<TcpStream>>,
    /// When a probe last succeeded (ms since `base`), so concurrent
    /// watchdogs of one peer share it.
    ok_at: AtomicU64,
    base: std::sync::OnceLock<Instant>,
}

impl Prober {
    fn new(addr: &str) -> Prober {
        let p = Prober { addr: addr.to_string(), ..Prober::default() };
        let _ = p.base.set(Instant::now());
        p
    }

    /// Whether the peer answers a ping within [`PING_TIMEOUT`].
    async fn probe(&self) -> bool {
        let base = *self.base.get().expect("set at creation");
        let mut conn = self.conn.lock().await;
        let fresh = ms_since(base).saturating_sub(self.ok_at.load(Ordering::Acquire));
        if self.ok_at.load(Ordering::Acquire) > 0 && fresh < (PING_AFTER / 2).as_millis() as u64 {
            return true;
        }
        let attempt = async {
            if conn.is_none() {
                let s = TcpStream::connect(&self.addr).await?;
                tune(&s);
                *conn = Some(s);
            }
            let s = conn.as_mut().expect("connected above");
            let ping = Frame {
                header: Header { flags: FLAG_PING, request_id: 1, ..Header::default() },
                body: Bytes::new(),
                segments: Vec::new(),
            };
            let head = ping.encode_head().map_err(std::io::Error::other)?;
            s.write_all(&head).await?;
            let mut reply = [0u8; shoal_common::wire::HEADER_LEN];
            s.read_exact(&mut reply).await?;
            let flags = reply[5];
            Ok::<bool, std::io::Error>(flags & FLAG_PING != 0 && flags & FLAG_REPLY != 0)
        };
        match tokio::time::timeout(PING_TIMEOUT, attempt).await {
            Ok(Ok(true)) => {
                self.ok_at.store(ms_since(base).max(1), Ordering::Release);
                true
            }
            _ => {
                *conn = None;
                false
            }
        }
    }
}

fn spawn_client_conn(stream: TcpStream, addr: String, prober: Arc<Prober>) -> Conn {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Frame>(256);
    let pending: Pending = Arc::default();
    let dead = Arc::new(AtomicBool::new(false));
    let base = Instant::now();
    // When a frame last arrived, and when a call last started (ms since base).
    let last_rx = Arc::new(AtomicU64::new(0));
    let last_call = Arc::new(AtomicU64::new(0));
    let fail_all = {
        let pending = pending.clone();
        let dead = dead.clone();
        let addr = addr.clone();
        move |why: ShoalError| {
            dead.store(true, Ordering::Release);
            // A peer that broke the protocol is named as such (not
            // retryable); anything else is a connection that failed.
            let err = match why {
                ShoalError::Protocol(message) => ShoalError::BadPeer { peer: addr.clone(), message },
                e @ ShoalError::Connection { .. } => e,
                other => ShoalError::Unreachable(format!("{addr}: {other}")),
            };
            for (_, p) in pending.lock().expect("lock").drain() {
                let _ = p.send(Err(err.clone()));
            }
        }
    };
    let writer = {
        let fail_all = fail_all.clone();
        tokio::spawn(async move {
            if let Err(e) = write_frames(wr, rx, None).await {
                fail_all(ShoalError::Unreachable(format!("send failed: {e}")));
            }
        })
    };
    let reader = {
        let pending = pending.clone();
        let fail_all = fail_all.clone();
        let last_rx = last_rx.clone();
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 << 10);
            let mut dec = FrameDecoder;
            let mut rd = rd;
            let why = loop {
                match read_frame(&mut rd, &mut buf, &mut dec, None, None, None).await {
                    Ok(Some((f, _))) => {
                        last_rx.store(ms_since(base), Ordering::Release);
                        let waiter = pending.lock().expect("lock").remove(&f.header.request_id);
                        match waiter {
                            Some(w) => {
                                let _ = w.send(Ok(f));
                            }
                            None => debug!(request_id = f.header.request_id, "reply to an abandoned request"),
                        }
                    }
                    Ok(None) => break ShoalError::Unreachable("connection closed by peer".into()),
                    Err(ShoalError::Connection { source, .. }) => {
                        break ShoalError::Connection { peer: addr.clone(), source }
                    }
                    Err(e) => break e,
                }
            };
            fail_all(why);
        })
    };
    // Liveness: probes a peer that keeps callers waiting in silence (on
    // its own connection, so a busy or back-pressured data connection is
    // never taken for a dead peer), and closes this connection once it has
    // been idle for long.
    let watchdog = {
        let (pending, dead, last_call) = (pending.clone(), dead.clone(), last_call.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_AFTER / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if dead.load(Ordering::Acquire) {
                    return;
                }
                let now = ms_since(base);
                {
                    // Checked and marked under the lock that calls register
                    // under, so a call either keeps the connection open or
                    // sees it closed before it sends anything.
                    let pending = pending.lock().expect("lock");
                    if pending.is_empty() {
                        let heard = last_rx.load(Ordering::Acquire).max(last_call.load(Ordering::Acquire));
                        if now.saturating_sub(heard) >= IDLE_CLOSE.as_millis() as u64 {
                            dead.store(true, Ordering::Release);
                            return;
                        }
                        continue;
                    }
                }
                if now.saturating_sub(last_rx.load(Ordering::Acquire)) < PING_AFTER.as_millis() as u64 {
                    continue;
                }
                if !prober.probe().await && !dead.load(Ordering::Acquire) {
                    warn!("{addr}: no answer to a ping within {PING_TIMEOUT:?}; failing its calls");
                    fail_all(ShoalError::Unreachable(format!(
                        "peer stopped answering (no reply to a ping within {PING_TIMEOUT:?})"
                    )));
                    return;
                }
            }
        })
    };
    Conn { tx, pending, next_id: AtomicU64::new(1), dead, tasks: vec![writer, reader, watchdog], base, last_call }
}

/// A server's memory budget for frames: bytes of requests being read or
/// run and of replies waiting to be written.
///
/// # Examples
///
/// ```
/// # async fn demo() {
/// use shoal_net::tcp::Budget;
///
/// let budget = Budget::new(256 << 20);
/// let held = budget.take(1 << 20).await;
/// assert_eq!(budget.in_use(), 1 << 20);
/// drop(held);
/// assert_eq!(budget.in_use(), 0);
/// # }
/// ```
#[derive(Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total: u64,
}

/// Bytes taken from a [`Budget`], given back on drop.
#[derive(Debug)]
pub struct Held {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Budget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Arc<Budget> {
        let total = total.min(Semaphore::MAX_PERMITS as u64);
        Arc::new(Budget { sem: Arc::new(Semaphore::new(total as usize)), total })
    }

    /// Takes `n` bytes (at most the whole budget), waiting until they are
    /// free. Cancel safe: a dropped call takes nothing.
    pub async fn take(&self, n: u64) -> Held {
        let n = n.min(self.total).min(u32::MAX as u64) as u32;
        if n == 0 {
            return Held { _permit: None };
        }
        let permit = self.sem.clone().acquire_many_owned(n).await.expect("budget semaphore is never closed");
        Held { _permit: Some(permit) }
    }

    /// The whole budget in bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes taken now.
    pub fn in_use(&self) -> u64 {
        self.total - self.sem.available_permits() as u64
    }
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
/// With `stall`, a frame must arrive whole within that long of its first
/// byte: a server must not hold a frame buffer for a silent or trickling
/// client. With `budget`, the frame's size is taken from it (waiting while
/// it is used up, which is not stalling) before the frame is read past its
/// header. With `idle`, waiting for the first byte of a frame ends after
/// that long with [`ShoalError::Timeout`].
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    dec: &mut FrameDecoder,
    stall: Option<Duration>,
    budget: Option<&Budget>,
    idle: Option<Duration>,
) -> Result<Option<(Frame, Option<Held>)>> {
    let mut deadline = None;
    let mut held: Option<Held> = None;
    loop {
        if held.is_none() {
            if let Some(b) = budget {
                if let Some(total) = frame_len(buf)? {
                    // A ping is tiny and answered at once: it takes nothing.
                    let ping = buf[5] & FLAG_PING != 0;
                    held = Some(if ping { b.take(0).await } else { b.take(total as u64).await });
                    if deadline.is_some() {
                        deadline = stall.map(|limit| tokio::time::Instant::now() + limit);
                    }
                }
            }
        }
        if let Some(f) = dec.decode(buf)? {
            return Ok(Some((f, held)));
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 << 10);
        }
        let so_far = buf.len();
        if so_far > 0 && deadline.is_none() {
            deadline = stall.map(|limit| tokio::time::Instant::now() + limit);
        }
        let read = rd.read_buf(buf);
        let n = match (deadline, idle) {
            (Some(d), _) => tokio::time::timeout_at(d, read).await.map_err(|_| {
                ShoalError::protocol(format!("peer took longer than {stall:?} to send a frame ({so_far} bytes so far)"))
            })?,
            (None, Some(idle)) if so_far == 0 => tokio::time::timeout(idle, read)
                .await
                .map_err(|_| ShoalError::Timeout(format!("peer sent nothing for {idle:?}")))?,
            (None, _) => read.await,
        }
        .map_err(|e| ShoalError::Connection { peer: "read".into(), source: e.into() })?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ShoalError::protocol(format!("connection closed inside a frame ({} bytes)", buf.len())));
        }
    }
}

/// A frame on its way out, and the budget it holds until it is written.
struct Outgoing {
    frame: Frame,
    _held: Option<Held>,
}

impl From<Frame> for Outgoing {
    fn from(frame: Frame) -> Self {
        Outgoing { frame, _held: None }
    }
}

/// Writes frames from the channel until it closes. Segments are written
/// as they are, never copied into the frame buffer. With `stall`, a frame
/// that takes longer than that to write (the peer stopped reading) ends the
/// connection.
async fn write_frames<W: AsyncWrite + Unpin, T: Into<Outgoing>>(
    wr: W,
    mut rx: mpsc::Receiver<T>,
    stall: Option<Duration>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(64 << 10, wr);
    while let Some(f) = rx.recv().await {
        let out: Outgoing = f.into();
        let write = async {
            write_one(&mut w, &out.frame).await?;
            if rx.is_empty() {
                w.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        };
        match stall {
            Some(limit) => tokio::time::timeout(limit, write).await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, format!("peer read nothing for {limit:?}"))
            })??,
            None => write.await?,
        }
        drop(out);
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

    async fn call(&self, addr: &str, frame: Frame, timeout: Duration) -> Result<Frame> {
        frame.check_limits()?;
        let fut = async {
            // A connection found closed before the request was handed to it
            // (it went idle, or its peer restarted) is replaced and the
            // request sent on the new one: it never left this process.
            let mut attempts = 0;
            loop {
                attempts += 1;
                let conn = self.conn(addr).await?;
                let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
                let mut frame = frame.clone();
                frame.header.request_id = id;
                let (tx, rx) = oneshot::channel();
                conn.pending.lock().expect("lock").insert(id, tx);
                conn.last_call.store(ms_since(conn.base), Ordering::Release);
                let guard = PendingGuard { pending: &conn.pending, id };
                // The reader may have failed every waiter just before the insert.
                if conn.dead.load(Ordering::Acquire) || conn.tx.send(frame).await.is_err() {
                    if attempts < 3 {
                        continue;
                    }
                    return Err(ShoalError::Unreachable(format!("{addr}: connection closed")));
                }
                let r = rx.await.map_err(|_| ShoalError::Unreachable(format!("{addr}: connection closed")))?;
                drop(guard);
                return r;
            }
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
/// use shoal_net::tcp::bind;
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
/// use shoal_net::tcp::{bind, serve, ServeOptions};
/// use tokio_util::sync::CancellationToken;
///
/// let listener = bind("127.0.0.1:0").await?;
/// let shutdown = CancellationToken::new();
/// // `Pong` is a `Handler`, as in the `Handler` example.
/// let server = tokio::spawn(serve(listener, Arc::new(Pong), shutdown.clone(), ServeOptions::default()));
/// // ... until it is time to stop:
/// shutdown.cancel();
/// server.await.expect("the serve task does not panic");
/// # Ok(()) }
/// ```
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: CancellationToken,
    opts: ServeOptions,
) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let local = listener.local_addr().ok();
    info!(addr = ?local, budget = opts.budget.total(), "serving TCP");
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
        tune(&stream);
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let opts = opts.clone();
        tracker.spawn(async move {
            serve_conn(stream, peer, handler, shutdown, opts).await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
    info!(addr = ?local, "TCP service stopped");
}

/// How a server serves its connections.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
///
/// use shoal_net::tcp::{Budget, ServeOptions};
///
/// let opts = ServeOptions { budget: Budget::new(512 << 20), idle_timeout: Duration::from_secs(300) };
/// ```
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Memory for frames held at once, shared by every connection.
    pub budget: Arc<Budget>,
    /// A connection that sends nothing for this long, with no request in
    /// flight, is closed.
    pub idle_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions { budget: Budget::new(1 << 30), idle_timeout: Duration::from_secs(300) }
    }
}

/// How long a server waits for a peer to take a reply before it drops the
/// connection.
pub const WRITE_STALL: Duration = Duration::from_secs(30);

async fn serve_conn<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    shutdown: CancellationToken,
    opts: ServeOptions,
) {
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Outgoing>(MAX_INFLIGHT_PER_CONN);
    let mut writer = tokio::spawn(async move {
        if let Err(e) = write_frames(wr, rx, Some(WRITE_STALL)).await {
            debug!(%peer, "reply write failed: {e}");
        }
    });
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_PER_CONN));
    let tasks = TaskTracker::new();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut dec = FrameDecoder;
    let budget = opts.budget.clone();
    'conn: loop {
        // A request slot first, then the frame: a frame's budget is never
        // held while waiting for a slot.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = inflight.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (frame, held) = loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break 'conn,
                r = read_frame(&mut rd, &mut buf, &mut dec, Some(PARTIAL_FRAME_TIMEOUT), Some(&budget), Some(opts.idle_timeout)) => r,
            };
            match next {
                Ok(Some((frame, held))) if frame.header.is_ping() && !frame.header.is_reply() => {
                    // Answered here, ahead of every request, so that a busy
                    // server is never taken for a dead one.
                    let pong = Frame {
                        header: Header { flags: FLAG_PING | FLAG_REPLY, ..frame.header },
                        body: Bytes::new(),
                        segments: Vec::new(),
                    };
                    drop(held);
                    if tx.send(pong.into()).await.is_err() {
                        break 'conn;
                    }
                }
                Ok(Some(f)) => break f,
                Ok(None) => break 'conn,
                // Silent at a frame boundary: closed if nothing is in flight.
                Err(ShoalError::Timeout(_)) if !tasks.is_empty() => {}
                Err(e @ ShoalError::Timeout(_)) => {
                    debug!(%peer, "closing an idle connection: {e}");
                    break 'conn;
                }
                Err(e) => {
                    warn!(%peer, "closing connection: {e}");
                    break 'conn;
                }
            }
        };
        if frame.header.is_reply() {
            warn!(%peer, "closing connection: client sent a reply frame");
            break;
        }
        let handler = handler.clone();
        let tx = tx.clone();
        let budget = budget.clone();
        tasks.spawn(async move {
            let header = frame.header;
            let mut reply = handler.handle(frame).await;
            drop(held);
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
            let held = budget.take(reply.encoded_len() as u64).await;
            let _ = tx.send(Outgoing { frame: reply, _held: Some(held) }).await;
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
        let r = read_frame(&mut server, &mut buf, &mut FrameDecoder, Some(PARTIAL_FRAME_TIMEOUT), None, None).await;
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
        let r = read_frame(&mut server, &mut buf, &mut FrameDecoder, Some(PARTIAL_FRAME_TIMEOUT), None, None).await;
        assert!(matches!(r, Err(ShoalError::Protocol(_))), "{r:?}");
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_peer_between_frames_is_not() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        let mut dec = FrameDecoder;
        let read = read_frame(&mut server, &mut buf, &mut dec, Some(PARTIAL_FRAME_TIMEOUT), None, None);
        let r = tokio::time::timeout(PARTIAL_FRAME_TIMEOUT * 4, read).await;
        assert!(r.is_err(), "still waiting for a first byte");
        drop(client);
    }
}
