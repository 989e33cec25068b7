//! [`ServerClient`]: typed requests to the targets of one server.
//!
//! This is the lowest client layer: it addresses a server and a target
//! explicitly. The cluster layer (placement, object classes, pools) builds
//! on it.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> shoal_common::Result<()> {
//! use shoal_client::ServerClient;
//!
//! let c = ServerClient::tcp("127.0.0.1:10001");
//! let pong = c.ping().await?;
//! for target in 0..pong.targets {
//!     let usage = c.target_query(target).await?;
//!     println!("target {target}: {} bytes free", usage.free_bytes);
//! }
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_common::msg::{
    FetchIod, FetchReq, Fetched, ListReq, PingReply, PingReq, PunchReq, TargetQueryReply, TargetQueryReq, UpdateIod,
    UpdateReq, ANY_RANK,
};
use shoal_common::{ContId, Epoch, Hlc, Oid, PoolId, Result, ShoalError};

use crate::transport::{call, TcpTransport, Transport};

/// A clock with a random tag, so that epochs of different clients never
/// collide.
///
/// # Examples
///
/// ```
/// let a = shoal_client::server::client_clock();
/// let b = shoal_client::server::client_clock();
/// let t = shoal_client::server::wall_ns();
/// // Different clocks (almost always) stamp different epochs at one instant.
/// let _ = (a.now(t), b.now(t));
/// ```
pub fn client_clock() -> Hlc {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(wall_ns());
    Hlc::with_tag(h.finish())
}

pub use shoal_common::hlc::wall_ns;

/// A client of one server, over any [`Transport`].
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// use bytes::Bytes;
/// use shoal_client::ServerClient;
/// use shoal_common::{msg::{UpdateIod, ValueKind}, ContId, Oid};
///
/// let c = ServerClient::tcp("127.0.0.1:10001");
/// let iods = vec![UpdateIod::new(b"a", ValueKind::Single, b"hello")];
/// c.update(0, ContId(1), Oid::new(0, 1), b"dkey", iods, vec![Bytes::from_static(b"hello")]).await?;
/// # Ok(()) }
/// ```
pub struct ServerClient<T: Transport = TcpTransport> {
    transport: Arc<T>,
    addr: String,
    pool: PoolId,
    hlc: Arc<Hlc>,
    map_version: u32,
    token: u128,
    timeout: Duration,
}

impl<T: Transport> std::fmt::Debug for ServerClient<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerClient")
            .field("addr", &self.addr)
            .field("pool", &self.pool)
            .field("map_version", &self.map_version)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ServerClient<TcpTransport> {
    /// A client of the server at `addr` over its own TCP transport.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// use shoal_client::ServerClient;
    ///
    /// let c = ServerClient::tcp("127.0.0.1:10001");
    /// let pong = c.ping().await?;
    /// println!("server {} with {} targets", pong.version, pong.targets);
    /// # Ok(()) }
    /// ```
    pub fn tcp(addr: impl Into<String>) -> Self {
        ServerClient::new(Arc::new(TcpTransport::default()), addr, Arc::new(client_clock()))
    }
}

impl<T: Transport> ServerClient<T> {
    /// A client of `addr` sharing `transport` and `hlc` with other clients.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// use std::sync::Arc;
    ///
    /// use shoal_client::server::client_clock;
    /// use shoal_client::transport::TcpTransport;
    /// use shoal_client::ServerClient;
    ///
    /// // One transport and one clock for every server of the system.
    /// let transport = Arc::new(TcpTransport::default());
    /// let hlc = Arc::new(client_clock());
    /// let a = ServerClient::new(transport.clone(), "10.0.0.1:10001", hlc.clone());
    /// let b = ServerClient::new(transport, "10.0.0.2:10001", hlc);
    /// a.ping().await?;
    /// b.ping().await?;
    /// # Ok(()) }
    /// ```
    pub fn new(transport: Arc<T>, addr: impl Into<String>, hlc: Arc<Hlc>) -> Self {
        ServerClient {
            transport,
            addr: addr.into(),
            pool: PoolId(0),
            hlc,
            map_version: 0,
            token: 0,
            timeout: Duration::from_secs(30),
        }
    }

    /// Addresses requests to `pool`, stamped with its map version.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// use shoal_client::ServerClient;
    ///
    /// let info = client.pool_query("tank").await?;
    /// let (_rank, addr) = &info.addrs[0];
    /// // Requests now name the pool and are checked against its map version.
    /// let c = ServerClient::tcp(addr.as_str()).with_pool(info.uuid, info.map.version);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_pool(mut self, pool: PoolId, map_version: u32) -> Self {
        self.pool = pool;
        self.map_version = map_version;
        self
    }

    /// Sets the per-request timeout.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// use shoal_client::ServerClient;
    ///
    /// let c = ServerClient::tcp("127.0.0.1:10001").with_timeout(Duration::from_secs(2));
    /// ```
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The server's address.
    ///
    /// # Examples
    ///
    /// ```
    /// use shoal_client::ServerClient;
    ///
    /// let c = ServerClient::tcp("127.0.0.1:10001");
    /// assert_eq!(c.addr(), "127.0.0.1:10001");
    /// ```
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Issues a fresh epoch from this client's clock.
    ///
    /// # Examples
    ///
    /// ```
    /// use shoal_client::ServerClient;
    ///
    /// let c = ServerClient::tcp("127.0.0.1:10001");
    /// let first = c.next_epoch();
    /// assert!(c.next_epoch() > first);
    /// ```
    pub fn next_epoch(&self) -> Epoch {
        self.hlc.now(wall_ns())
    }

    async fn rpc<R: shoal_common::msg::Rpc>(&self, req: &R, segs: Vec<Bytes>) -> Result<(R::Reply, Vec<Bytes>)> {
        call(&*self.transport, &self.addr, req, segs, self.map_version, self.token, self.timeout).await
    }

    /// Asks the server who it is. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let c = shoal_client::ServerClient::tcp("127.0.0.1:10001");
    /// let pong = c.ping().await?;
    /// println!("version {}, {} targets, epoch {}", pong.version, pong.targets, pong.epoch);
    /// # Ok(()) }
    /// ```
    pub async fn ping(&self) -> Result<PingReply> {
        let (r, _) = self.rpc(&PingReq {}, vec![]).await?;
        self.hlc.observe(r.epoch);
        Ok(r)
    }

    /// Writes values under one dkey at a fresh epoch and returns it once
    /// the server has made them durable. Not cancel safe: a dropped call
    /// may still have been applied.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let c = shoal_client::ServerClient::tcp("127.0.0.1:10001");
    /// use bytes::Bytes;
    /// use shoal_common::msg::{UpdateIod, ValueKind};
    /// use shoal_common::{ContId, Oid};
    ///
    /// let data = vec![Bytes::from_static(b"ada"), Bytes::from_static(&[1, 2, 3, 4])];
    /// let iods = vec![
    ///     UpdateIod::new(b"name", ValueKind::Single, &data[0]),
    ///     UpdateIod::new(b"blob", ValueKind::Array { rec_size: 1, start: 0, nr: 4 }, &data[1]),
    /// ];
    /// let epoch = c.update(0, ContId(1), Oid::new(0, 1), b"user/1", iods, data).await?;
    /// # Ok(()) }
    /// ```
    pub async fn update(
        &self,
        target: u32,
        cont: ContId,
        oid: Oid,
        dkey: &[u8],
        iods: Vec<UpdateIod>,
        data: Vec<Bytes>,
    ) -> Result<Epoch> {
        // A target holding a version as new answers with its clock; the
        // update goes again past it.
        let mut attempts = 0;
        loop {
            let epoch = self.next_epoch();
            let req = UpdateReq {
                pool: self.pool,
                rank: ANY_RANK,
                target,
                cont,
                oid,
                dkey: dkey.to_vec(),
                epoch,
                iods: iods.clone(),
            };
            match self.rpc(&req, data.clone()).await {
                Ok((r, _)) => {
                    self.hlc.observe(r.now);
                    return Ok(r.epoch);
                }
                Err(ShoalError::Conflict { server_now, .. }) if attempts < 16 => {
                    attempts += 1;
                    self.hlc.observe(server_now);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads values under one dkey as of `epoch` (`EPOCH_MAX` for the
    /// latest). Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let c = shoal_client::ServerClient::tcp("127.0.0.1:10001");
    /// use shoal_common::msg::{FetchIod, Fetched, ValueKind};
    /// use shoal_common::{ContId, Oid, EPOCH_MAX};
    ///
    /// let iods = vec![FetchIod { akey: b"name".to_vec(), kind: ValueKind::Single }];
    /// for (fetched, data) in c.fetch(0, ContId(1), Oid::new(0, 1), b"user/1", EPOCH_MAX, iods).await? {
    ///     match fetched {
    ///         Fetched::Single { epoch } => println!("{} bytes written at {epoch}", data.len()),
    ///         _ => println!("no value"),
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn fetch(
        &self,
        target: u32,
        cont: ContId,
        oid: Oid,
        dkey: &[u8],
        epoch: Epoch,
        iods: Vec<FetchIod>,
    ) -> Result<Vec<(Fetched, Bytes)>> {
        let req = FetchReq { pool: self.pool, rank: ANY_RANK, target, cont, oid, dkey: dkey.to_vec(), epoch, iods };
        let (r, segs) = self.rpc(&req, vec![]).await?;
        if r.values.len() != segs.len() || r.values.len() != req.iods.len() {
            return Err(ShoalError::protocol("fetch reply does not match the request"));
        }
        r.verify(&segs)?;
        Ok(r.values.into_iter().zip(segs).collect())
    }

    /// Punches an object, a dkey or an akey at a fresh epoch. Not cancel
    /// safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let c = shoal_client::ServerClient::tcp("127.0.0.1:10001");
    /// use shoal_common::{ContId, Oid};
    ///
    /// let oid = Oid::new(0, 1);
    /// // One akey, one dkey, then the whole object.
    /// c.punch(0, ContId(1), oid, Some(&b"user/1"[..]), Some(&b"name"[..])).await?;
    /// c.punch(0, ContId(1), oid, Some(&b"user/1"[..]), None).await?;
    /// c.punch(0, ContId(1), oid, None, None).await?;
    /// # Ok(()) }
    /// ```
    pub async fn punch(
        &self,
        target: u32,
        cont: ContId,
        oid: Oid,
        dkey: Option<&[u8]>,
        akey: Option<&[u8]>,
    ) -> Result<Epoch> {
        let epoch = self.next_epoch();
        let req = PunchReq {
            pool: self.pool,
            rank: ANY_RANK,
            target,
            cont,
            oid,
            epoch,
            dkey: dkey.map(<[u8]>::to_vec),
            akey: akey.map(<[u8]>::to_vec),
        };
        let (r, _) = self.rpc(&req, vec![]).await?;
        self.hlc.observe(r.now);
        Ok(r.epoch)
    }

    /// Lists every dkey of an object (`dkey` = None) or every akey of a
    /// dkey, following anchors. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let c = shoal_client::ServerClient::tcp("127.0.0.1:10001");
    /// use shoal_common::{ContId, Oid, EPOCH_MAX};
    ///
    /// let oid = Oid::new(0, 1);
    /// let dkeys = c.list_all(0, ContId(1), oid, EPOCH_MAX, None).await?;
    /// let akeys = c.list_all(0, ContId(1), oid, EPOCH_MAX, Some(&b"user/1"[..])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn list_all(
        &self,
        target: u32,
        cont: ContId,
        oid: Oid,
        epoch: Epoch,
        dkey: Option<&[u8]>,
    ) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let mut anchor = None;
        loop {
            let req = ListReq {
                pool: self.pool,
                rank: ANY_RANK,
                target,
                cont,
                oid,
                epoch,
                dkey: dkey.map(<[u8]>::to_vec),
                anchor,
                limit: 1024,
            };
            let (r, _) = self.rpc(&req, vec![]).await?;
            out.extend(r.keys);
            match r.anchor {
                Some(a) => anchor = Some(a),
                None => return Ok(out),
            }
        }
    }

    /// A target's usage. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let c = shoal_client::ServerClient::tcp("127.0.0.1:10001");
    /// let usage = c.target_query(0).await?;
    /// println!("target 0: {} used, {} free, poisoned: {}", usage.data_bytes, usage.free_bytes, usage.poisoned);
    /// # Ok(()) }
    /// ```
    pub async fn target_query(&self, target: u32) -> Result<TargetQueryReply> {
        Ok(self.rpc(&TargetQueryReq { target }, vec![]).await?.0)
    }
}
