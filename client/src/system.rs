//! Connecting to a Shoal system: the management service, pools and
//! containers.
//!
//! [`Client`] talks to the management service (MS) by any of its
//! addresses. [`Pool`] is a connected pool: its map and placement, which it
//! refreshes when a server answers "stale map". [`Container`] is an open
//! container: its properties, object-class choice and OID allocation.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> shoal_common::Result<()> {
//! use shoal_client::Client;
//! use shoal_common::mgmt::ContProps;
//!
//! let client = Client::connect(vec!["127.0.0.1:10001".into()]).await?;
//! client.pool_create("tank", vec![], 0).await?;
//! let pool = client.pool_connect("tank").await?;
//! pool.cont_create("data", ContProps { rd_fac: 1, ..ContProps::default() }).await?;
//! let cont = pool.cont_open("data").await?;
//! let kv = cont.kv_create(None).await?;
//! kv.put(b"hello", bytes::Bytes::from_static(b"world")).await?;
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use shoal_common::error::Entity;
use shoal_common::mgmt::{
    ClientHelloReq, ContCreateReq, ContDestroyReq, ContInfo, ContListReq, ContProps, ContQueryReq, OidAllocReq,
    PoolCreateReq, PoolDestroyReq, PoolExtendReq, PoolInfo, PoolListReq, PoolQueryReq, SystemQueryReply,
    SystemQueryReq,
};
use shoal_common::msg::{Rpc, TargetQueryReply, TargetQueryReq};
use shoal_common::oclass::{auto_class, make_oid, oid_class, oid_type, ObjType, ObjectClass};
use shoal_common::placement::{Placement, Shard};
use shoal_common::{Epoch, Hlc, Oid, PoolId, Result, ShoalError};

use crate::array::Array;
use crate::kv::Kv;
use crate::object::Object;
use crate::server::wall_ns;
use crate::transport::{call, TcpTransport};

/// How many times an operation is retried after a "stale map" answer.
///
/// # Examples
///
/// ```
/// use shoal_client::system::STALE_RETRIES;
///
/// // A request is sent at most this many times plus once before the
/// // "stale map" error reaches the caller.
/// let attempts = STALE_RETRIES + 1;
/// assert!(attempts > 1);
/// ```
pub const STALE_RETRIES: usize = 3;

/// A source of wall-clock time in nanoseconds since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub(crate) struct Inner {
    pub transport: TcpTransport,
    pub hlc: Hlc,
    /// The MS addresses the client was given.
    ms: Vec<String>,
    /// The MS replicas as the MS named them at the last hello (see
    /// [`shoal_common::mgmt::ms_addrs`]).
    ms_learned: std::sync::RwLock<Vec<String>>,
    /// The address that answered last: the MS leader, most likely.
    ms_leader: shoal_net::MsLeader,
    pub timeout: Duration,
    /// Times an operation is sent again after a "stale map" answer.
    pub stale_retries: usize,
    /// Caps the requests to servers this client has in flight at once.
    pub in_flight: Option<Arc<tokio::sync::Semaphore>>,
    clock: Clock,
    /// Why writes are refused: this client's clock is further off the
    /// service's than the bound (checked at connect).
    skew_refusal: Option<String>,
    checksum_errors: AtomicU64,
    conflict_retries: AtomicU64,
    rmw_stripes: AtomicU64,
    /// This client's id for its clock-tag lease.
    owner: u128,
    /// Until when (on this host's monotonic clock) the tag is this client's.
    lease_until: Mutex<std::time::Instant>,
    /// Renews the tag lease in the background while the client lives.
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.renewer.lock().expect("lock").take() {
            t.abort();
        }
    }
}

impl Inner {
    /// A new epoch for a write, from this client's hybrid clock: past
    /// everything it has observed, never running ahead of time (it waits a
    /// moment instead). Refused when the client's clock is too far off.
    pub async fn epoch(&self) -> Result<Epoch> {
        if let Some(why) = &self.skew_refusal {
            return Err(ShoalError::invalid(why.clone()));
        }
        if std::time::Instant::now() >= *self.lease_until.lock().expect("lock") {
            // The tag may be someone else's by now: get a lease (maybe on a
            // new tag) before stamping anything with it.
            self.hello().await.map_err(|e| {
                ShoalError::Unreachable(format!(
                    "this client's clock tag lease lapsed and the management service cannot renew it: {e}"
                ))
            })?;
        }
        loop {
            if let Some(e) = self.hlc.try_now((self.clock)()) {
                return Ok(e);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Says hello to the MS: takes (or renews) the clock tag lease and
    /// observes the MS's clock. Returns the MS's wall clock and this host's
    /// before and after.
    async fn hello(&self) -> Result<(u64, u64, u64)> {
        let started = std::time::Instant::now();
        let renew = (self.hlc.tag() != 0).then_some(self.hlc.tag() as u16);
        let sent = (self.clock)();
        let hello = ms_call(self, &ClientHelloReq { owner: self.owner, renew }).await?;
        let back = (self.clock)();
        self.hlc.set_tag(hello.tag as u64);
        self.hlc.observe(hello.now);
        if !hello.ms_replicas.is_empty() {
            *self.ms_learned.write().expect("lock") = hello.ms_replicas.clone();
        }
        // The lease runs from when the request left, less a margin.
        *self.lease_until.lock().expect("lock") = started + Duration::from_millis(hello.lease_ms * 2 / 3);
        Ok((hello.wall_ns, sent, back))
    }

    /// The MS addresses calls go round: the replicas the MS named last,
    /// then those the client was given.
    pub fn ms_addrs(&self) -> Vec<String> {
        shoal_common::mgmt::ms_addrs(&self.ms_learned.read().expect("lock"), &self.ms)
    }

    /// Tells the MS that `rank` missed a write this client is about to
    /// acknowledge; returns once the MS has declared it down.
    pub async fn report_missed_write(&self, rank: u32) -> Result<()> {
        let req =
            shoal_common::mgmt::ReportReq { rank, reporter: format!("client-{:032x}", self.owner), missed_write: true };
        ms_call(self, &req).await
    }

    /// Tells the MS, in the background, that calls to `rank` failed.
    pub fn report(&self, rank: u32) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (ms, transport_timeout) = (self.ms_addrs(), self.timeout.min(Duration::from_secs(5)));
        let req = shoal_common::mgmt::ReportReq {
            rank,
            reporter: format!("client-{:032x}", self.owner),
            missed_write: false,
        };
        // A transport of its own: the report must not wait behind the
        // calls that failed.
        rt.spawn(async move {
            let t = TcpTransport::default();
            for addr in &ms {
                if call(&t, addr, &req, vec![], 0, 0, transport_timeout).await.is_ok() {
                    return;
                }
            }
        });
    }

    /// Moves this client's clock past a server's.
    pub fn observe(&self, server_now: Epoch) {
        self.hlc.observe(server_now);
    }

    /// Counts a value that arrived with a bad checksum (it was read
    /// elsewhere or decoded around).
    pub fn count_checksum_error(&self) {
        self.checksum_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a write retried because a target held a newer version.
    pub fn count_conflict(&self) {
        self.conflict_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts partial stripes written by read-modify-write.
    pub fn count_rmw(&self, stripes: usize) {
        self.rmw_stripes.fetch_add(stripes as u64, Ordering::Relaxed);
    }
}

/// What a client has counted since it connected.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
/// let stats = client.stats();
/// println!("{} bad checksums caught, {} writes retried", stats.checksum_errors, stats.conflict_retries);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Values or cells that arrived with a bad crc32c (and were read from
    /// another replica or decoded around).
    pub checksum_errors: u64,
    /// Writes sent again with a newer epoch because a target already held
    /// a version as new (clocks that disagree, or concurrent writers).
    pub conflict_retries: u64,
    /// Partial stripes of erasure-coded objects written by
    /// read-modify-write (read, merged and rewritten whole).
    pub rmw_stripes: u64,
}

/// Builds a [`Client`].
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// use std::time::Duration;
///
/// use shoal_client::Client;
///
/// let client = Client::builder()
///     .ms(["10.0.0.1:10001", "10.0.0.2:10001"])
///     .timeout(Duration::from_secs(10))
///     .max_clock_skew(Duration::from_secs(2))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[must_use]
pub struct ClientBuilder {
    ms: Vec<String>,
    timeout: Duration,
    stale_retries: usize,
    max_in_flight: Option<usize>,
    max_clock_skew: Duration,
    clock: Clock,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("ms", &self.ms)
            .field("timeout", &self.timeout)
            .field("stale_retries", &self.stale_retries)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_clock_skew", &self.max_clock_skew)
            .finish_non_exhaustive()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            ms: Vec::new(),
            timeout: Duration::from_secs(30),
            stale_retries: STALE_RETRIES,
            max_in_flight: None,
            max_clock_skew: Duration::from_secs(5),
            clock: Arc::new(wall_ns),
        }
    }
}

impl ClientBuilder {
    /// Addresses of the management service (any replica will do).
    pub fn ms<S: Into<String>>(mut self, addrs: impl IntoIterator<Item = S>) -> Self {
        self.ms = addrs.into_iter().map(Into::into).collect();
        self
    }

    /// How long one request may wait for its reply (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many times an operation is sent again, with a fresh pool map,
    /// after a server said the client's map is stale (default
    /// [`STALE_RETRIES`]); 0 returns the first "stale map" error.
    pub fn stale_retries(mut self, n: usize) -> Self {
        self.stale_retries = n;
        self
    }

    /// At most `n` requests to servers in flight at once across the whole
    /// client (default: no cap; each call keeps its own few in flight).
    /// Requests past the cap wait for a slot.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// let gentle = shoal_client::Client::builder().from_env()?.max_in_flight(16).connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = Some(n.max(1));
        self
    }

    /// How far this client's clock may be off the management service's
    /// before the client refuses to write (default 5 s). Within it, writes
    /// are ordered correctly whatever the clocks say.
    pub fn max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = skew;
        self
    }

    /// The wall clock the client stamps writes with (nanoseconds since the
    /// Unix epoch; default: the system clock). Tests move it on purpose to
    /// act like a host whose time sync is off.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// use shoal_client::Client;
    /// use shoal_common::hlc::wall_ns;
    ///
    /// // A client whose clock runs half a second slow.
    /// let slow = Client::builder().ms(["127.0.0.1:10001"]).clock(|| wall_ns() - 500_000_000).connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Fills in what the environment says, by the rules of the `shoal`
    /// tool: the management service addresses (unless given already) from
    /// `$SHOAL_MS` or the cluster file (see [`crate::discover`]), the
    /// request timeout from `$SHOAL_TIMEOUT` and the clock-skew bound from
    /// `$SHOAL_MAX_CLOCK_SKEW` ("30s", "500ms").
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// use std::time::Duration;
    ///
    /// // The environment's cluster, with a timeout of our own.
    /// let client = shoal_client::Client::builder().from_env()?.timeout(Duration::from_secs(5)).connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn from_env(mut self) -> Result<Self> {
        if self.ms.is_empty() {
            self.ms = crate::discover::ms_from_env(None)?;
        }
        let duration = |var: &str| -> Result<Option<Duration>> {
            match std::env::var(var) {
                Ok(v) => humantime::parse_duration(&v).map(Some).map_err(|e| {
                    ShoalError::invalid(format!("{var}={v:?} is not a duration (\"30s\", \"500ms\"): {e}"))
                }),
                Err(_) => Ok(None),
            }
        };
        if let Some(t) = duration("SHOAL_TIMEOUT")? {
            self.timeout = t;
        }
        if let Some(s) = duration("SHOAL_MAX_CLOCK_SKEW")? {
            self.max_clock_skew = s;
        }
        Ok(self)
    }

    /// Connects: says hello to the management service (which hands out the
    /// client's clock tag and its clock, so the first write's epoch is
    /// already past the service's clock) and checks this client's clock.
    pub async fn connect(self) -> Result<Client> {
        if self.ms.is_empty() {
            return Err(ShoalError::invalid("no management service address given"));
        }
        let mut inner = Inner {
            transport: TcpTransport::default(),
            hlc: Hlc::new(),
            ms: self.ms,
            ms_learned: Default::default(),
            ms_leader: shoal_net::MsLeader::new(),
            timeout: self.timeout,
            stale_retries: self.stale_retries,
            in_flight: self.max_in_flight.map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            clock: self.clock,
            skew_refusal: None,
            checksum_errors: AtomicU64::new(0),
            conflict_retries: AtomicU64::new(0),
            rmw_stripes: AtomicU64::new(0),
            owner: {
                use std::hash::{BuildHasher, Hasher};
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(wall_ns());
                let a = h.finish();
                h.write_u64(a);
                ((a as u128) << 64) | h.finish() as u128
            },
            lease_until: Mutex::new(std::time::Instant::now()),
            renewer: Mutex::new(None),
        };
        let (ms_wall, sent, back) = inner.hello().await?;
        if let Some((d, how)) = shoal_common::hlc::clock_off(sent, back, ms_wall) {
            if d > self.max_clock_skew {
                let why = format!(
                    "this client's clock is {d:.1?} {how} the management service's, more than the {:?} allowed; \
                     writes are refused until time sync (NTP, chrony) fixes it",
                    self.max_clock_skew
                );
                tracing::warn!("{why}");
                inner.skew_refusal = Some(why);
            }
        }
        let inner = Arc::new(inner);
        // Renews the tag lease while the client lives (a third of the lease
        // apart); a client that cannot renew in time refuses to write.
        let weak = Arc::downgrade(&inner);
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let Some(inner) = weak.upgrade() else { return };
                if let Err(e) = inner.hello().await {
                    tracing::warn!("cannot renew this client's clock tag lease: {e}");
                }
            }
        });
        *inner.renewer.lock().expect("lock") = Some(renewer);
        Ok(Client { inner })
    }
}

async fn ms_call<R: Rpc>(inner: &Inner, req: &R) -> Result<R::Reply> {
    // Checked here as the MS would: a refusal keeps its structure (which
    // limit, by how much) instead of arriving as text.
    req.validate(&[])?;
    // The replica that answered last (the leader) is asked first.
    inner.ms_leader.call(&inner.transport, &inner.ms_addrs(), req, inner.timeout).await
}

/// A connection to a Shoal system. Cheap to clone.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// use shoal_client::Client;
///
/// // Any management service replica will do; the others are tried in turn.
/// let client = Client::connect(vec!["10.0.0.1:10001".into(), "10.0.0.2:10001".into()]).await?;
/// // Clones share the connections.
/// let for_task = client.clone();
/// let pools = tokio::spawn(async move { for_task.pool_list().await });
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("ms", &self.inner.ms).field("timeout", &self.inner.timeout).finish()
    }
}

impl Client {
    /// Connects to the management service at any of `ms_addrs` and checks
    /// that it answers.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// use shoal_client::Client;
    ///
    /// let client = Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// let pool = client.pool_connect("tank").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(ms_addrs: Vec<String>) -> Result<Client> {
        Client::builder().ms(ms_addrs).connect().await
    }

    /// A builder for a client with settings other than the defaults.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// use std::time::Duration;
    ///
    /// let client = shoal_client::Client::builder().ms(["127.0.0.1:10001"]).timeout(Duration::from_secs(5)).connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects to the cluster the environment names, by the rules of the
    /// `shoal` tool (see [`ClientBuilder::from_env`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// // After `shoal dev up`, or with SHOAL_MS=host:port set:
    /// let client = shoal_client::Client::from_env().await?;
    /// println!("{} servers", client.system_query().await?.members.len());
    /// # Ok(()) }
    /// ```
    pub async fn from_env() -> Result<Client> {
        Client::builder().from_env()?.connect().await
    }

    /// What this client has counted since it connected.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            checksum_errors: self.inner.checksum_errors.load(Ordering::Relaxed),
            conflict_retries: self.inner.conflict_retries.load(Ordering::Relaxed),
            rmw_stripes: self.inner.rmw_stripes.load(Ordering::Relaxed),
        }
    }

    async fn ms_call<R: Rpc>(&self, req: &R) -> Result<R::Reply> {
        ms_call(&self.inner, req).await
    }

    /// The MS addresses this client goes round: the replicas the MS named
    /// when the client last said hello (at connect, and with each lease
    /// renewal), then the addresses it was given. A client given one
    /// replica's address reaches the others when that one is down, and
    /// finds replicas added later.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// let client = shoal_client::Client::connect(vec!["10.0.0.1:10001".into()]).await?;
    /// println!("MS replicas: {:?}", client.ms_addrs());
    /// # Ok(()) }
    /// ```
    pub fn ms_addrs(&self) -> Vec<String> {
        self.inner.ms_addrs()
    }

    /// Excludes a server from every pool now: its targets turn `DOWNOUT`
    /// and its shards get spares. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// client.exclude(5).await?;
    /// # Ok(()) }
    /// ```
    pub async fn exclude(&self, rank: u32) -> Result<()> {
        self.ms_call(&shoal_common::mgmt::ExcludeReq { rank }).await
    }

    /// Adds the server `rank` to the management service's replicas: it
    /// starts an empty replica, the leader brings it up to date, then it
    /// votes (Raft joint consensus). Returns the replicas afterwards; a
    /// server that hosts one already changes nothing. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// // From 3 replicas to 5.
    /// client.ms_add(3).await?;
    /// let replicas = client.ms_add(4).await?;
    /// assert_eq!(replicas.len(), 5);
    /// # Ok(()) }
    /// ```
    pub async fn ms_add(&self, rank: u32) -> Result<Vec<shoal_common::mgmt::MsReplica>> {
        self.ms_call(&shoal_common::mgmt::MsMembersReq { rank, add: true }).await
    }

    /// Removes the server `rank`'s MS replica (joint consensus); its server
    /// stops hosting it. Returns the replicas afterwards; a server that
    /// hosts none changes nothing. The last replica cannot be removed. Not
    /// cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// // Replace the replica on rank 0 by one on rank 6.
    /// client.ms_add(6).await?;
    /// client.ms_remove(0).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ms_remove(&self, rank: u32) -> Result<Vec<shoal_common::mgmt::MsReplica>> {
        self.ms_call(&shoal_common::mgmt::MsMembersReq { rank, add: false }).await
    }

    /// Brings a down or excluded server back into `pool` (every pool when
    /// `None`): its targets take writes at once, are rebuilt from the
    /// others, and serve reads once rebuilt. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// client.reintegrate(Some("tank"), 5).await?;
    /// # Ok(()) }
    /// ```
    pub async fn reintegrate(&self, pool: Option<&str>, rank: u32) -> Result<()> {
        self.ms_call(&shoal_common::mgmt::ReintegrateReq { pool: pool.map(str::to_string), rank }).await
    }

    /// Drains a server from `pool` (every pool when `None`): it keeps
    /// serving while its shards are copied to where they go, then its
    /// targets turn `DOWNOUT` (`pool_query` shows them `DRAIN` meanwhile,
    /// and the pool as rebuilding). Refused when the pool would be left
    /// too few servers for its containers' classes. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// client.drain(Some("tank"), 5).await?;
    /// # Ok(()) }
    /// ```
    pub async fn drain(&self, pool: Option<&str>, rank: u32) -> Result<()> {
        self.ms_call(&shoal_common::mgmt::DrainReq { pool: pool.map(str::to_string), rank }).await
    }

    /// Stops (`paused: Some(true)`) or starts a pool's rebuild, or sets
    /// its pace in MiB/s per server (`rate_mib`, 0: automatic); `None`
    /// leaves a setting as it is. Returns the settings now. A stopped
    /// rebuild resumes where it was. `pool_query` shows the progress.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// client.rebuild_ctl("tank", None, Some(200)).await?; // at most 200 MiB/s per server
    /// client.rebuild_ctl("tank", Some(true), None).await?; // stop
    /// # Ok(()) }
    /// ```
    pub async fn rebuild_ctl(
        &self,
        pool: &str,
        paused: Option<bool>,
        rate_mib: Option<u32>,
    ) -> Result<shoal_common::mgmt::RebuildCtl> {
        let req = shoal_common::mgmt::RebuildCtlReq { pool: pool.into(), paused, rate_mib, accept_loss: None };
        self.ms_call(&req).await
    }

    /// Lets a rebuild finish although the pool lost more servers than a
    /// container's rd_fac (the MS holds it until the lost servers come
    /// back, so that data no server kept reads as an error, not as
    /// missing). From then on that data reads as missing. Not cancel safe.
    pub async fn rebuild_accept_loss(&self, pool: &str) -> Result<shoal_common::mgmt::RebuildCtl> {
        let req = shoal_common::mgmt::RebuildCtlReq {
            pool: pool.into(),
            paused: None,
            rate_mib: None,
            accept_loss: Some(true),
        };
        self.ms_call(&req).await
    }

    /// Every member of the system. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// let system = client.system_query().await?;
    /// for m in &system.members {
    ///     println!("rank {} at {}: {} targets, {:?}", m.rank, m.addr, m.targets, m.state);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn system_query(&self) -> Result<SystemQueryReply> {
        self.ms_call(&SystemQueryReq {}).await
    }

    /// Creates a pool over `ranks` (all when empty) with `targets_per_server`
    /// targets of each (all when 0). Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// // A pool over every joined server, using all of their targets.
    /// let info = client.pool_create("tank", vec![], 0).await?;
    /// println!("pool {} ({}) has {} targets", info.label, info.uuid, info.map.targets.len());
    /// // A pool over ranks 0 to 2, two targets each.
    /// client.pool_create("small", vec![0, 1, 2], 2).await?;
    /// # Ok(()) }
    /// ```
    pub async fn pool_create(&self, label: &str, ranks: Vec<u32>, targets_per_server: u32) -> Result<PoolInfo> {
        self.ms_call(&PoolCreateReq { label: label.into(), ranks, targets_per_server }).await
    }

    /// Destroys a pool by label or UUID. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// client.pool_destroy("tank", false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn pool_destroy(&self, name: &str, force: bool) -> Result<()> {
        self.ms_call(&PoolDestroyReq { pool: name.into(), force }).await
    }

    /// Adds servers to a pool (their targets join as NEW). Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// let info = client.pool_extend("tank", vec![3, 4]).await?;
    /// println!("pool map is now version {}", info.map.version);
    /// # Ok(()) }
    /// ```
    pub async fn pool_extend(&self, name: &str, ranks: Vec<u32>) -> Result<PoolInfo> {
        self.ms_call(&PoolExtendReq { pool: name.into(), ranks }).await
    }

    /// Every pool. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// for pool in client.pool_list().await? {
    ///     println!("{} {}: {} containers", pool.uuid, pool.label, pool.containers);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn pool_list(&self) -> Result<Vec<PoolInfo>> {
        self.ms_call(&PoolListReq {}).await
    }

    /// One pool by label or UUID. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// let info = client.pool_query("tank").await?;
    /// println!("{}: map version {}, {} containers", info.label, info.map.version, info.containers);
    /// # Ok(()) }
    /// ```
    pub async fn pool_query(&self, name: &str) -> Result<PoolInfo> {
        self.ms_call(&PoolQueryReq { pool: name.into() }).await
    }

    /// Connects to a pool: fetches its map and builds its placement.
    /// Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// let pool = client.pool_connect("tank").await?;
    /// let cont = pool.cont_open("data").await?;
    /// # Ok(()) }
    /// ```
    pub async fn pool_connect(&self, name: &str) -> Result<Pool> {
        let info = self.pool_query(name).await?;
        let placement = Arc::new(info.placement());
        Ok(Pool {
            inner: Arc::new(PoolInner { client: self.clone(), state: RwLock::new(PoolState { info, placement }) }),
        })
    }
}

/// A pool's map as last fetched, and the placement computed from it.
#[derive(Clone)]
pub(crate) struct PoolState {
    pub info: PoolInfo,
    pub placement: Arc<Placement>,
}

impl PoolState {
    /// The address of the server holding `shard`.
    pub fn addr(&self, shard: &Shard) -> Result<&str> {
        self.info
            .addrs
            .iter()
            .find(|(r, _)| *r == shard.rank)
            .map(|(_, a)| a.as_str())
            .ok_or_else(|| ShoalError::not_found(Entity::Server, format!("no address for rank {}", shard.rank)))
    }
}

pub(crate) struct PoolInner {
    pub client: Client,
    state: RwLock<PoolState>,
}

impl PoolInner {
    pub fn state(&self) -> PoolState {
        self.state.read().expect("pool lock").clone()
    }

    pub fn id(&self) -> PoolId {
        self.state.read().expect("pool lock").info.uuid
    }

    /// Fetches the pool map again from the MS.
    pub async fn refresh(&self) -> Result<()> {
        let id = self.id();
        let info = self.client.pool_query(&id.to_string()).await?;
        let placement = Arc::new(info.placement());
        *self.state.write().expect("pool lock") = PoolState { info, placement };
        Ok(())
    }
}

/// A connected pool. Cheap to clone.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
/// use shoal_common::mgmt::ContProps;
///
/// let pool = client.pool_connect("tank").await?;
/// pool.cont_create("data", ContProps::default()).await?;
/// let cont = pool.cont_open("data").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.inner.state();
        f.debug_struct("Pool")
            .field("label", &s.info.label)
            .field("uuid", &s.info.uuid)
            .field("map_version", &s.info.map.version)
            .finish()
    }
}

impl Pool {
    /// The pool's information as last fetched.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// let info = pool.info();
    /// println!("{} ({}), map version {}", info.label, info.uuid, info.map.version);
    /// # Ok(()) }
    /// ```
    pub fn info(&self) -> PoolInfo {
        self.inner.state().info
    }

    /// Fetches the pool map again. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// // Pick up a grown map now rather than at the next "stale map" answer.
    /// client.pool_extend("tank", vec![3]).await?;
    /// pool.refresh().await?;
    /// println!("map version {}", pool.info().map.version);
    /// # Ok(()) }
    /// ```
    pub async fn refresh(&self) -> Result<()> {
        self.inner.refresh().await
    }

    fn name(&self) -> String {
        self.inner.id().to_string()
    }

    /// Creates a container. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// use shoal_common::mgmt::ContProps;
    ///
    /// // Data that survives two server failures, in 3-way replicated objects.
    /// let props = ContProps { rd_fac: 2, oclass: Some("RP_3GX".into()), ..ContProps::default() };
    /// let info = pool.cont_create("data", props).await?;
    /// println!("container {} ({})", info.label, info.uuid);
    /// # Ok(()) }
    /// ```
    pub async fn cont_create(&self, label: &str, props: ContProps) -> Result<ContInfo> {
        self.inner.client.ms_call(&ContCreateReq { pool: self.name(), label: label.into(), props }).await
    }

    /// Destroys a container by label or UUID. Its objects' space is not yet
    /// reclaimed on the targets. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// pool.cont_destroy("data").await?;
    /// # Ok(()) }
    /// ```
    pub async fn cont_destroy(&self, name: &str) -> Result<ContInfo> {
        self.inner.client.ms_call(&ContDestroyReq { pool: self.name(), cont: name.into() }).await
    }

    /// Every container of the pool. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// for cont in pool.cont_list().await? {
    ///     println!("{} {}: rd_fac {}", cont.uuid, cont.label, cont.props.rd_fac);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn cont_list(&self) -> Result<Vec<ContInfo>> {
        self.inner.client.ms_call(&ContListReq { pool: self.name() }).await
    }

    /// One container by label or UUID. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// let info = pool.cont_query("data").await?;
    /// println!("{:?}, {} OIDs allocated", info.health, info.oids_allocated);
    /// # Ok(()) }
    /// ```
    pub async fn cont_query(&self, name: &str) -> Result<ContInfo> {
        self.inner.client.ms_call(&ContQueryReq { pool: self.name(), cont: name.into() }).await
    }

    /// Opens a container by label or UUID. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// let cont = pool.cont_open("data").await?;
    /// let kv = cont.kv_create(None).await?;
    /// # Ok(()) }
    /// ```
    pub async fn cont_open(&self, name: &str) -> Result<Container> {
        let info = self.cont_query(name).await?;
        Ok(Container {
            inner: Arc::new(ContInner {
                pool: self.inner.clone(),
                info,
                oids: Mutex::new((0, 0)),
                destroyed: Default::default(),
            }),
        })
    }

    /// Usage of every target of the pool: `(rank, target, usage or error)`.
    /// Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// for (rank, target, usage) in pool.target_usage().await {
    ///     match usage {
    ///         Ok(u) => println!("rank {rank} target {target}: {} used, {} free", u.data_bytes, u.free_bytes),
    ///         Err(e) => println!("rank {rank} target {target}: {e}"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn target_usage(&self) -> Vec<(u32, u32, Result<TargetQueryReply>)> {
        let st = self.inner.state();
        let client = &self.inner.client;
        let futs = st.info.map.targets.iter().map(|t| {
            let addr = st.info.addrs.iter().find(|(r, _)| *r == t.rank).map(|(_, a)| a.clone());
            async move {
                let r = match addr {
                    Some(a) => call(
                        &client.inner.transport,
                        &a,
                        &TargetQueryReq { target: t.index },
                        vec![],
                        st.info.map.version,
                        0,
                        Duration::from_secs(5),
                    )
                    .await
                    .map(|(r, _)| r),
                    None => Err(ShoalError::not_found(Entity::Server, format!("no address for rank {}", t.rank))),
                };
                (t.rank, t.index, r)
            }
        });
        futures::future::join_all(futs).await
    }
}

pub(crate) struct ContInner {
    pub pool: Arc<PoolInner>,
    pub info: ContInfo,
    /// Reserved object sequence numbers: next, end (exclusive).
    oids: Mutex<(u128, u128)>,
    /// Set once a server said the container was destroyed: every later
    /// call of its handles fails at once.
    pub destroyed: std::sync::atomic::AtomicBool,
}

impl ContInner {
    /// Fails once the container is known to be destroyed.
    pub fn check_live(&self) -> Result<()> {
        if self.destroyed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ShoalError::cont_destroyed(self.info.uuid));
        }
        Ok(())
    }
}

/// What [`Container::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ContCheck {
    /// Objects found on the targets that could be asked.
    pub objects: u64,
    /// Objects with a group that has fewer readable shards than its class
    /// needs: some of their data cannot be read now (lost, if the servers
    /// holding it do not come back).
    pub affected: Vec<AffectedObject>,
    /// Targets (rank, index) that could not be asked: objects only they
    /// hold are missing from the count, unless they have a name.
    pub unasked: Vec<(u32, u32)>,
    /// Whether the name index could be read (named objects are checked
    /// even when every shard of theirs is gone).
    pub names_read: bool,
    /// Every object found, and every name read, for tools that go on
    /// (`shoal cont check --salvage`).
    #[serde(skip)]
    pub found: Vec<Oid>,
    #[serde(skip)]
    pub names: Vec<(String, Oid)>,
}

fn oid_text<S: serde::Serializer>(oid: &Oid, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(oid)
}

/// An object some of whose data cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AffectedObject {
    #[serde(serialize_with = "oid_text")]
    pub oid: Oid,
    pub class: String,
    /// Its name in the container's name index, if it has one.
    pub name: Option<String>,
    /// Groups that lost too many shards, of how many.
    pub groups_lost: u32,
    pub groups: u32,
}

/// The name index of a container is the KV object with this sequence
/// number; the MS never hands it out.
///
/// # Examples
///
/// ```
/// use shoal_client::system::NAME_INDEX_SEQ;
/// use shoal_common::oclass::{make_oid, oid_seq, ObjType, ObjectClass};
///
/// let index = make_oid(NAME_INDEX_SEQ, ObjectClass::S1, ObjType::Kv);
/// assert_eq!(oid_seq(index), NAME_INDEX_SEQ);
/// ```
pub const NAME_INDEX_SEQ: u128 = 1;
const OID_BATCH: u64 = 64;

/// An open container. Cheap to clone.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
/// # let pool = client.pool_connect("tank").await?;
/// use bytes::Bytes;
///
/// let cont = pool.cont_open("data").await?;
/// let kv = cont.kv_create(None).await?;
/// kv.put(b"key", Bytes::from_static(b"value")).await?;
/// let array = cont.array_create(None, None).await?;
/// array.write(0, Bytes::from_static(b"bytes")).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Container {
    pub(crate) inner: Arc<ContInner>,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container")
            .field("pool", &self.inner.pool.id())
            .field("label", &self.inner.info.label)
            .field("uuid", &self.inner.info.uuid)
            .finish()
    }
}

impl Container {
    /// The container's information as opened.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// let info = cont.info();
    /// println!("{} ({}): rd_fac {}, chunk {} bytes", info.label, info.uuid, info.props.rd_fac, info.props.chunk_size);
    /// # Ok(()) }
    /// ```
    pub fn info(&self) -> &ContInfo {
        &self.inner.info
    }

    /// The class new objects of type `ty` get, and why: the container's
    /// default class, or the automatic choice.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// use shoal_common::oclass::ObjType;
    ///
    /// let (class, why) = cont.class_for(ObjType::Array)?;
    /// println!("new arrays get {class}: {why}");
    /// # Ok(()) }
    /// ```
    pub fn class_for(&self, ty: ObjType) -> Result<(ObjectClass, String)> {
        let props = &self.inner.info.props;
        let domains = self.inner.pool.state().info.map.widest_group();
        match &props.oclass {
            Some(name) => {
                let class: ObjectClass = name.parse()?;
                class.check(props.rd_fac, domains)?;
                Ok((class, format!("the container's default class {class}")))
            }
            None => auto_class(props.rd_fac, domains, ty),
        }
    }

    /// Allocates a new OID of type `ty` and class `class` (or the
    /// container's choice). Not cancel safe: an interrupted call may waste
    /// sequence numbers.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// use shoal_common::oclass::{ObjType, ObjectClass};
    ///
    /// // The container's choice of class...
    /// let oid = cont.alloc_oid(ObjType::Multi, None).await?;
    /// // ...or an explicit one.
    /// let class: ObjectClass = "RP_3G1".parse()?;
    /// let replicated = cont.alloc_oid(ObjType::Multi, Some(class)).await?;
    /// let obj = cont.object(replicated)?;
    /// # Ok(()) }
    /// ```
    pub async fn alloc_oid(&self, ty: ObjType, class: Option<ObjectClass>) -> Result<Oid> {
        let class = match class {
            Some(c) => {
                c.check(self.inner.info.props.rd_fac, self.inner.pool.state().info.map.widest_group())?;
                c
            }
            None => self.class_for(ty)?.0,
        };
        // Numbers come from a batch reserved earlier, without asking the
        // MS; a handle that has seen its container destroyed hands out none.
        self.inner.check_live()?;
        let seq = {
            let mut o = self.inner.oids.lock().expect("oid lock");
            if o.0 < o.1 {
                o.0 += 1;
                Some(o.0 - 1)
            } else {
                None
            }
        };
        let seq = match seq {
            Some(s) => s,
            None => {
                let req = OidAllocReq { pool: self.inner.pool.id(), cont: self.inner.info.uuid, count: OID_BATCH };
                let first = self.inner.pool.client.ms_call(&req).await?.first;
                let mut o = self.inner.oids.lock().expect("oid lock");
                *o = (first + 1, first + OID_BATCH as u128);
                first
            }
        };
        Ok(make_oid(seq, class, ty))
    }

    /// Goes through every object of the container that the targets in
    /// service hold, and lists those with a group that has fewer readable
    /// shards than its class needs (after more failures than the
    /// container's rd_fac, or while their spares are being rebuilt).
    /// Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// let report = cont.check().await?;
    /// for a in &report.affected {
    ///     println!("{} ({}): {} of {} groups cannot be read", a.oid, a.class, a.groups_lost, a.groups);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn check(&self) -> Result<ContCheck> {
        self.inner.pool.refresh().await?;
        let st = self.inner.pool.state();
        let c = &self.inner.pool.client.inner;
        let mut oids = std::collections::BTreeSet::new();
        // Down targets cannot be asked (excluded ones hold nothing needed).
        let mut unasked: Vec<(u32, u32)> = st
            .info
            .map
            .targets
            .iter()
            .filter(|t| t.state == shoal_common::placement::TargetState::Down)
            .map(|t| (t.rank, t.index))
            .collect();
        for t in st.info.map.targets.iter().filter(|t| t.state.is_available()) {
            let shard =
                Shard { rank: t.rank, target: t.index, available: true, spare: false, readable: true, shadow: None };
            let mut after = None;
            let asked: Result<()> = async {
                let addr = st.addr(&shard)?;
                loop {
                    let req = shoal_common::msg::ObjListReq {
                        pool: st.info.uuid,
                        rank: t.rank,
                        target: t.index,
                        cont: self.inner.info.uuid,
                        after,
                        limit: 1024,
                    };
                    let (r, _) = call(&c.transport, addr, &req, vec![], st.info.map.version, 0, c.timeout).await?;
                    after = r.oids.last().copied();
                    oids.extend(r.oids);
                    if !r.more {
                        return Ok(());
                    }
                }
            }
            .await;
            if let Err(e) = asked {
                if e.is_cont_destroyed() {
                    return Err(e);
                }
                unasked.push((t.rank, t.index));
            }
        }
        // Named objects are found even when no server in service holds any
        // of their shards.
        let mut names: std::collections::HashMap<Oid, String> = std::collections::HashMap::new();
        let index = self.names()?;
        let names_read = match index.list().await {
            Ok(keys) => {
                for k in keys {
                    let Ok(Some(v)) = index.get(&k).await else { continue };
                    if let Some(oid) = std::str::from_utf8(&v).ok().and_then(|s| s.parse::<Oid>().ok()) {
                        names.insert(oid, String::from_utf8_lossy(&k).into_owned());
                        oids.insert(oid);
                    }
                }
                true
            }
            Err(_) => false,
        };
        let mut report = ContCheck {
            objects: oids.len() as u64,
            unasked,
            names_read,
            found: oids.iter().copied().collect(),
            names: names.iter().map(|(o, n)| (n.clone(), *o)).collect(),
            ..Default::default()
        };
        report.names.sort();
        for oid in oids {
            let Some(class) = oid_class(oid) else { continue };
            let Ok(layout) = st.placement.layout(self.inner.info.uuid, oid, class) else { continue };
            let need = class.group_size().saturating_sub(u32::from(class.tolerated_failures())) as usize;
            let lost = layout.groups.iter().filter(|g| g.iter().filter(|s| s.readable).count() < need).count();
            if lost > 0 {
                report.affected.push(AffectedObject {
                    oid,
                    class: class.to_string(),
                    name: names.get(&oid).cloned(),
                    groups_lost: lost as u32,
                    groups: layout.groups.len() as u32,
                });
            }
        }
        Ok(report)
    }

    /// A handle on an existing object.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// use bytes::Bytes;
    /// use shoal_common::oclass::ObjType;
    ///
    /// let oid = cont.alloc_oid(ObjType::Multi, None).await?;
    /// let obj = cont.object(oid)?;
    /// obj.update_single(b"dkey", b"akey", Bytes::from_static(b"value")).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Refuses the OID of a key-value object or an array (open those with
    /// [`Container::kv_open`] and [`Container::array_open`]): their keys
    /// are theirs to manage.
    pub fn object(&self, oid: Oid) -> Result<Object> {
        self.open_as(oid, ObjType::Multi)
    }

    /// Opens `oid` as an object of type `want`, refusing any other type.
    pub(crate) fn open_as(&self, oid: Oid, want: ObjType) -> Result<Object> {
        let name = |t: Option<ObjType>| match t {
            Some(ObjType::Multi) => "a generic object",
            Some(ObjType::Kv) => "a key-value object",
            Some(ObjType::Array) => "an array",
            None => "of no known type",
        };
        let is = oid_type(oid);
        if is != Some(want) {
            return Err(ShoalError::invalid(format!(
                "object {oid} is {}, not {}; nothing was changed",
                name(is),
                name(Some(want))
            )));
        }
        Object::new(self.inner.clone(), oid)
    }

    /// Creates a key-value object. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// use bytes::Bytes;
    ///
    /// // The container's default class...
    /// let kv = cont.kv_create(None).await?;
    /// // ...or one chosen here: replicated over three servers, spread over every target.
    /// let wide = cont.kv_create(Some("RP_3GX".parse()?)).await?;
    /// wide.put(b"key", Bytes::from_static(b"value")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn kv_create(&self, class: Option<ObjectClass>) -> Result<Kv> {
        Ok(Kv::new(self.open_as(self.alloc_oid(ObjType::Kv, class).await?, ObjType::Kv)?))
    }

    /// Opens a key-value object.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// let oid = cont.kv_create(None).await?.oid();
    /// // Later, or in another process that learned the OID:
    /// let kv = cont.kv_open(oid).await?;
    /// let value = kv.get(b"key").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Refuses an OID that is not a key-value object's.
    pub async fn kv_open(&self, oid: Oid) -> Result<Kv> {
        self.kv_handle(oid)
    }

    /// A handle on the key-value object `oid` (no I/O).
    fn kv_handle(&self, oid: Oid) -> Result<Kv> {
        Ok(Kv::new(self.open_as(oid, ObjType::Kv)?))
    }

    /// Creates an array object with the given class and chunk size,
    /// defaulting to the container's. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// use bytes::Bytes;
    ///
    /// // The container's class and chunk size...
    /// let array = cont.array_create(None, None).await?;
    /// // ...or 4 MiB chunks.
    /// let big = cont.array_create(None, Some(4 << 20)).await?;
    /// big.write(0, Bytes::from(vec![0u8; 8 << 20])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn array_create(&self, class: Option<ObjectClass>, chunk_size: Option<u64>) -> Result<Array> {
        self.array_create_with(class, chunk_size, None).await
    }

    /// Creates an array object choosing class, chunk size and EC cell size
    /// (each defaulting to the container's). Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// // EC 4+2 with 128 KiB cells; the chunk size is rounded up to whole stripes.
    /// let array = cont.array_create_with(Some("EC_4P2G1".parse()?), None, Some(128 << 10)).await?;
    /// println!("chunk size {}", array.chunk_size());
    /// # Ok(()) }
    /// ```
    pub async fn array_create_with(
        &self,
        class: Option<ObjectClass>,
        chunk_size: Option<u64>,
        cell_size: Option<u64>,
    ) -> Result<Array> {
        let oid = self.alloc_oid(ObjType::Array, class).await?;
        Array::create(
            self.open_as(oid, ObjType::Array)?,
            chunk_size.unwrap_or(self.inner.info.props.chunk_size),
            cell_size,
        )
        .await
    }

    /// Opens an array object. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// let oid = cont.array_create(None, None).await?.oid();
    /// // Later, or in another process that learned the OID:
    /// let array = cont.array_open(oid).await?;
    /// println!("{} bytes", array.size().await?);
    /// # Ok(()) }
    /// ```
    ///
    /// Refuses an OID that is not an array's.
    pub async fn array_open(&self, oid: Oid) -> Result<Array> {
        Array::open(self.open_as(oid, ObjType::Array)?).await
    }

    /// The container's name index: a KV object mapping names to OIDs.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// for name in cont.names()?.list().await? {
    ///     println!("{}", String::from_utf8_lossy(&name));
    /// }
    /// # Ok(()) }
    /// ```
    pub fn names(&self) -> Result<Kv> {
        let rd_fac = self.inner.info.props.rd_fac;
        let class = if rd_fac == 0 { "S1".to_string() } else { format!("RP_{}G1", rd_fac + 1) };
        let class: ObjectClass = class.parse()?;
        self.kv_handle(make_oid(NAME_INDEX_SEQ, class, ObjType::Kv))
    }

    /// Records `name` -> `oid` in the name index. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// let array = cont.array_create(None, None).await?;
    /// cont.name_put("logs", array.oid()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn name_put(&self, name: &str, oid: Oid) -> Result<()> {
        self.names()?.put(name.as_bytes(), Bytes::from(oid.to_string())).await.map(|_| ())
    }

    /// Looks a name up in the name index. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// if let Some(oid) = cont.name_get("logs").await? {
    ///     let array = cont.array_open(oid).await?;
    ///     println!("logs: {} bytes", array.size().await?);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn name_get(&self, name: &str) -> Result<Option<Oid>> {
        match self.names()?.get(name.as_bytes()).await? {
            Some(v) => {
                let s = std::str::from_utf8(&v).map_err(|_| ShoalError::Io("corrupt name index entry".into()))?;
                Ok(Some(s.parse()?))
            }
            None => Ok(None),
        }
    }

    /// Resolves an object argument: an OID (`HI.LO`) or a name from the
    /// name index. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// // Either a name from the name index or an OID printed as `HI.LO`.
    /// for arg in ["logs", "0200000000000000.0000000000000040"] {
    ///     match cont.resolve(arg).await? {
    ///         Some(oid) => println!("{arg} is object {oid}"),
    ///         None => println!("no object {arg}"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn resolve(&self, obj: &str) -> Result<Option<Oid>> {
        if let Ok(oid) = obj.parse::<Oid>() {
            if oid_class(oid).is_some() {
                return Ok(Some(oid));
            }
        }
        self.name_get(obj).await
    }
}
