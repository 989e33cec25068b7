//! The object API: single values and byte extents under dkeys and akeys,
//! spread and protected by the object's class.
//!
//! Every operation computes the object's layout from the pool map (no
//! lookup), sends each shard's part in parallel, and retries on a "stale
//! map" answer after refreshing the map.
//!
//! - `S*` classes: one shard per group holds everything.
//! - `RP_n*`: every replica gets every write, with one epoch, before the
//!   write is acknowledged; a read takes the first replica that answers.
//! - `EC_kPp*`: extents are striped in cells of the object's cell size.
//!   Cell `j` of stripe `s` lives on shard `j` at bytes `[s*cell, (s+1)*cell)`
//!   of that shard's extent; parity cells on shards `k..k+p`. Full stripes
//!   are encoded and written directly; a partial stripe is read, merged and
//!   rewritten whole (read-modify-write), so every stripe on disk is always
//!   a whole encoded stripe written at one epoch. Reads check that the cells
//!   of a stripe carry one epoch (otherwise a write is in flight: retry, and
//!   fail rather than return a torn stripe) and decode from any `k` cells
//!   when a shard is unreachable. Single values of EC objects are
//!   replicated on shards `0..=p`.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> shoal_common::Result<()> {
//! # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
//! # let cont = client.pool_connect("tank").await?.cont_open("data").await?;
//! use bytes::Bytes;
//! use shoal_common::oclass::{ObjType, ObjectClass};
//! use shoal_common::EPOCH_MAX;
//!
//! // EC 4+2: extents are striped over six shards.
//! let class: ObjectClass = "EC_4P2G1".parse()?;
//! let obj = cont.object(cont.alloc_oid(ObjType::Multi, Some(class)).await?)?;
//! obj.update_single(b"photo/1", b"title", Bytes::from_static(b"harbour")).await?;
//! obj.write_extent(b"photo/1", b"pixels", 0, Bytes::from(vec![0x80; 1 << 20])).await?;
//! let title = obj.fetch_single(b"photo/1", b"title", EPOCH_MAX).await?;
//! let pixels = obj.read_extent(b"photo/1", b"pixels", 0, 1 << 20, EPOCH_MAX).await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use shoal_common::msg::{
    FetchIod, FetchReq, Fetched, ListReq, PunchReq, Rpc, StripeLockReq, StripeUnlockReq, UpdateIod, UpdateReq,
    ValueKind,
};
use shoal_common::oclass::{oid_class, ObjectClass, Redundancy};
use shoal_common::placement::{Layout, Shard};
use shoal_common::{Epoch, Oid, Result, ShoalError, EPOCH_MAX};
use std::sync::Arc;

use crate::ec::codec;
use crate::system::{ContInner, PoolState, STALE_RETRIES};
use crate::transport::call;

/// Most bytes one request sends to one shard; larger writes are split.
const MAX_SHARD_REQUEST: u64 = 16 << 20;
/// Lease of a stripe lock: long enough for a read-modify-write of a few
/// stripes, short enough that a dead writer blocks nobody for long.
const STRIPE_LOCK_LEASE_MS: u32 = 10_000;
/// Attempts to read a stripe whose cells disagree on their epoch.
const TORN_RETRIES: u32 = 20;
/// Attempts after which a stripe whose newest write reached fewer than k
/// cells is read as it was before that write.
const OLDER_AFTER: u32 = 3;

/// Stripes one request to a shard covers: one cell each, within the byte
/// and descriptor caps.
fn stripes_per_request(cell: u64) -> u64 {
    (MAX_SHARD_REQUEST / cell).clamp(1, shoal_common::limits::MAX_IODS as u64)
}

/// One shard's cells of a run of stripes: (epoch, bytes) per stripe.
type StripeCells = Vec<(Epoch, Bytes)>;

/// Keeps per-shard results whose errors mean the cell is lost (out of
/// reach, or unreadable on that shard: a decode makes up for it) and
/// returns any other error, such as a stale map, at once.
fn usable<T>(results: Vec<Result<T>>) -> Result<Vec<Result<T>>> {
    let lost = |e: &ShoalError| shard_down(e) || matches!(e, ShoalError::Checksum(_) | ShoalError::Io(_));
    if let Some(Err(e)) = results.iter().find(|r| matches!(r, Err(e) if !lost(e))) {
        return Err(e.clone());
    }
    Ok(results)
}

/// Whether an error means the shard's server is out of reach, so another
/// copy or a decode should be tried.
fn shard_down(e: &ShoalError) -> bool {
    matches!(e, ShoalError::Unreachable(_) | ShoalError::Timeout(_) | ShoalError::Poisoned(_) | ShoalError::Busy(_))
}

fn with_shard(e: ShoalError, s: &Shard) -> ShoalError {
    let at = format!("rank {} target {}", s.rank, s.target);
    match e {
        ShoalError::Unreachable(m) => ShoalError::Unreachable(format!("{at}: {m}")),
        ShoalError::Timeout(m) => ShoalError::Timeout(format!("{at}: {m}")),
        ShoalError::Io(m) => ShoalError::Io(format!("{at}: {m}")),
        ShoalError::Checksum(m) => ShoalError::Checksum(format!("{at}: {m}")),
        other => other,
    }
}

/// One object of an open container.
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
/// use shoal_common::EPOCH_MAX;
///
/// let obj = cont.object(cont.alloc_oid(ObjType::Multi, None).await?)?;
/// obj.update_single(b"user/1", b"name", Bytes::from_static(b"ada")).await?;
/// let name = obj.fetch_single(b"user/1", b"name", EPOCH_MAX).await?;
/// assert_eq!(name.as_deref(), Some(&b"ada"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Object {
    cont: Arc<ContInner>,
    oid: Oid,
    class: ObjectClass,
    /// EC cell size; the container's unless the object chose its own.
    cell: u64,
}

impl Object {
    pub(crate) fn new(cont: Arc<ContInner>, oid: Oid) -> Result<Object> {
        let class =
            oid_class(oid).ok_or_else(|| ShoalError::invalid(format!("object id {oid} names no object class")))?;
        let cell = cont.info.props.cell_size as u64;
        Ok(Object { cont, oid, class, cell })
    }

    /// The object's id.
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
    /// let oid = cont.alloc_oid(ObjType::Multi, None).await?;
    /// let obj = cont.object(oid)?;
    /// assert_eq!(obj.oid(), oid);
    /// # Ok(()) }
    /// ```
    pub fn oid(&self) -> Oid {
        self.oid
    }

    /// The object's class.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// let class = obj.class();
    /// println!("object {} has class {class} and survives {} failures", obj.oid(), class.tolerated_failures());
    /// # Ok(()) }
    /// ```
    pub fn class(&self) -> ObjectClass {
        self.class
    }

    /// The EC geometry (k, p, cell bytes), for EC classes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// match obj.ec_geometry() {
    ///     Some((k, p, cell)) => println!("EC {k}+{p}: stripes of {} data bytes", k as u64 * cell),
    ///     None => println!("replicated or unprotected"),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn ec_geometry(&self) -> Option<(u32, u32, u64)> {
        match self.class.redundancy {
            Redundancy::Ec { k, p } => Some((k as u32, p as u32, self.cell)),
            _ => None,
        }
    }

    /// Uses `cell` bytes as this object's EC cell size instead of the
    /// container's. Every handle on the object must use the same cell size
    /// (the array API keeps it in the array's metadata).
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
    /// let oid = cont.alloc_oid(ObjType::Multi, Some("EC_4P2G1".parse()?)).await?;
    /// // 128 KiB cells: stripes of 4 x 128 KiB. Every later handle must say the same.
    /// let obj = cont.object(oid)?.with_cell_size(128 << 10)?;
    /// assert_eq!(obj.ec_geometry(), Some((4, 2, 128 << 10)));
    /// # Ok(()) }
    /// ```
    pub fn with_cell_size(mut self, cell: u64) -> Result<Object> {
        if !(4096..=(16 << 20)).contains(&cell) || !cell.is_power_of_two() {
            return Err(ShoalError::invalid(format!("cell size {cell} must be a power of two between 4KiB and 16MiB")));
        }
        self.cell = cell;
        Ok(self)
    }

    /// The object's current layout (for tools and tests).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// for (g, shards) in obj.layout()?.groups.iter().enumerate() {
    ///     for s in shards {
    ///         println!("group {g}: rank {} target {} (available: {})", s.rank, s.target, s.available);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn layout(&self) -> Result<Layout> {
        self.cont.pool.state().placement.layout(self.cont.info.uuid, self.oid, self.class)
    }

    /// Runs `op` on the current layout; after a "stale map" answer it
    /// refreshes the pool map and runs it again.
    async fn with_layout<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(PoolState, Layout) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        loop {
            let st = self.cont.pool.state();
            let layout = st.placement.layout(self.cont.info.uuid, self.oid, self.class)?;
            match op(st, layout).await {
                Err(ShoalError::StaleMap { .. }) if attempt < STALE_RETRIES => {
                    attempt += 1;
                    self.cont.pool.refresh().await?;
                }
                r => return r,
            }
        }
    }

    async fn rpc<R: Rpc>(
        &self,
        st: &PoolState,
        shard: &Shard,
        req: &R,
        segs: Vec<Bytes>,
    ) -> Result<(R::Reply, Vec<Bytes>)> {
        if !shard.available {
            return Err(ShoalError::Unreachable(format!("rank {} target {} is down", shard.rank, shard.target)));
        }
        let addr = st.addr(shard)?;
        let c = &self.cont.pool.client.inner;
        call(&c.transport, addr, req, segs, st.info.map.version, 0, c.timeout).await.map_err(|e| with_shard(e, shard))
    }

    /// The shards of a group that hold single values (and, for S and RP,
    /// extents).
    fn value_shards<'a>(&self, group: &'a [Shard]) -> &'a [Shard] {
        let n = match self.class.redundancy {
            Redundancy::None => 1,
            Redundancy::Replicas(_) => group.len(),
            Redundancy::Ec { p, .. } => p as usize + 1,
        };
        &group[..n.min(group.len())]
    }

    fn update_req(&self, st: &PoolState, shard: &Shard, dkey: &[u8], epoch: Epoch, iods: Vec<UpdateIod>) -> UpdateReq {
        UpdateReq {
            pool: st.info.uuid,
            target: shard.target,
            cont: self.cont.info.uuid,
            oid: self.oid,
            dkey: dkey.to_vec(),
            epoch,
            iods,
        }
    }

    fn fetch_req(&self, st: &PoolState, shard: &Shard, dkey: &[u8], epoch: Epoch, iods: Vec<FetchIod>) -> FetchReq {
        FetchReq {
            pool: st.info.uuid,
            target: shard.target,
            cont: self.cont.info.uuid,
            oid: self.oid,
            dkey: dkey.to_vec(),
            epoch,
            iods,
        }
    }

    /// Sends one update to each of `shards` in parallel; all must succeed.
    async fn update_all(
        &self,
        st: &PoolState,
        shards: &[Shard],
        dkey: &[u8],
        epoch: Epoch,
        iods: Vec<UpdateIod>,
        data: Vec<Bytes>,
    ) -> Result<Epoch> {
        let futs = shards.iter().map(|s| {
            let req = self.update_req(st, s, dkey, epoch, iods.clone());
            let data = data.clone();
            async move { self.rpc(st, s, &req, data).await }
        });
        for r in join_all(futs).await {
            self.observe(r?.0.now);
        }
        Ok(epoch)
    }

    async fn update_value(&self, dkey: &[u8], akey: &[u8], kind: ValueKind, value: Bytes) -> Result<Epoch> {
        self.with_layout(|st, layout| {
            let value = value.clone();
            async move {
                let shards = self.value_shards(layout.dkey_shards(dkey));
                let iods = vec![UpdateIod { akey: akey.to_vec(), kind }];
                self.update_all(&st, shards, dkey, self.cont_now(), iods, vec![value]).await
            }
        })
        .await
    }

    /// Moves this client's clock past a server's.
    fn observe(&self, server_now: Epoch) {
        self.cont.pool.client.inner.hlc.observe(server_now);
    }

    fn cont_now(&self) -> Epoch {
        crate::system::Container { inner: self.cont.clone() }.now()
    }

    /// Writes a single value (replaced whole). Returns the epoch. Not
    /// cancel safe: an interrupted write may have reached some shards.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// use bytes::Bytes;
    ///
    /// let epoch = obj.update_single(b"user/1", b"name", Bytes::from_static(b"ada")).await?;
    /// println!("written at epoch {epoch}");
    /// # Ok(()) }
    /// ```
    pub async fn update_single(&self, dkey: &[u8], akey: &[u8], value: Bytes) -> Result<Epoch> {
        self.update_value(dkey, akey, ValueKind::Single, value).await
    }

    /// Raises a u64 single value to at least `v` (atomically per shard).
    /// Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// use shoal_common::EPOCH_MAX;
    ///
    /// obj.update_max(b"stats", b"high-water", 10).await?;
    /// obj.update_max(b"stats", b"high-water", 7).await?; // leaves 10
    /// let v = obj.fetch_single(b"stats", b"high-water", EPOCH_MAX).await?.expect("written above");
    /// assert_eq!(u64::from_le_bytes(v[..].try_into().expect("8 bytes")), 10);
    /// # Ok(()) }
    /// ```
    pub async fn update_max(&self, dkey: &[u8], akey: &[u8], v: u64) -> Result<Epoch> {
        self.update_value(dkey, akey, ValueKind::MaxU64, Bytes::copy_from_slice(&v.to_le_bytes())).await
    }

    /// Reads a single value as of `epoch` (`EPOCH_MAX`: latest), from the
    /// first copy that answers. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// use bytes::Bytes;
    /// use shoal_common::EPOCH_MAX;
    ///
    /// let first = obj.update_single(b"doc", b"title", Bytes::from_static(b"draft")).await?;
    /// obj.update_single(b"doc", b"title", Bytes::from_static(b"final")).await?;
    /// // The latest value...
    /// assert_eq!(obj.fetch_single(b"doc", b"title", EPOCH_MAX).await?.as_deref(), Some(&b"final"[..]));
    /// // ...and the value as of the first write.
    /// assert_eq!(obj.fetch_single(b"doc", b"title", first).await?.as_deref(), Some(&b"draft"[..]));
    /// # Ok(()) }
    /// ```
    pub async fn fetch_single(&self, dkey: &[u8], akey: &[u8], epoch: Epoch) -> Result<Option<Bytes>> {
        self.with_layout(|st, layout| async move {
            let shards = self.value_shards(layout.dkey_shards(dkey));
            let mut errors = Vec::new();
            for s in shards {
                let req = self.fetch_req(
                    &st,
                    s,
                    dkey,
                    epoch,
                    vec![FetchIod { akey: akey.to_vec(), kind: ValueKind::Single }],
                );
                match self.rpc(&st, s, &req, vec![]).await {
                    Ok((r, mut segs)) => {
                        return Ok(match r.values.first() {
                            Some(Fetched::Single { .. }) => segs.pop(),
                            _ => None,
                        })
                    }
                    Err(e) if shard_down(&e) || matches!(e, ShoalError::Checksum(_)) => errors.push(e.to_string()),
                    Err(e) => return Err(e),
                }
            }
            Err(ShoalError::Unreachable(format!(
                "object {}: no copy of dkey {:?} is readable: {}",
                self.oid,
                String::from_utf8_lossy(dkey),
                errors.join("; ")
            )))
        })
        .await
    }

    /// Punches the whole object on every shard. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// use shoal_common::EPOCH_MAX;
    ///
    /// let epoch = obj.punch().await?;
    /// assert_eq!(obj.fetch_single(b"user/1", b"name", EPOCH_MAX).await?, None);
    /// // A read as of an earlier epoch still sees the old value.
    /// let old = obj.fetch_single(b"user/1", b"name", epoch - 1).await?;
    /// # Ok(()) }
    /// ```
    pub async fn punch(&self) -> Result<Epoch> {
        self.punch_scope(None, None).await
    }

    /// Punches one dkey. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// obj.punch_dkey(b"user/1").await?;
    /// # Ok(()) }
    /// ```
    pub async fn punch_dkey(&self, dkey: &[u8]) -> Result<Epoch> {
        self.punch_scope(Some(dkey), None).await
    }

    /// Punches one akey of a dkey. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// obj.punch_akey(b"user/1", b"avatar").await?;
    /// # Ok(()) }
    /// ```
    pub async fn punch_akey(&self, dkey: &[u8], akey: &[u8]) -> Result<Epoch> {
        self.punch_scope(Some(dkey), Some(akey)).await
    }

    async fn punch_scope(&self, dkey: Option<&[u8]>, akey: Option<&[u8]>) -> Result<Epoch> {
        self.with_layout(|st, layout| async move {
            let shards: Vec<Shard> = match dkey {
                Some(d) => layout.dkey_shards(d).to_vec(),
                None => layout.groups.iter().flatten().copied().collect(),
            };
            let epoch = self.cont_now();
            let futs = shards.iter().map(|s| {
                let req = PunchReq {
                    pool: st.info.uuid,
                    target: s.target,
                    cont: self.cont.info.uuid,
                    oid: self.oid,
                    epoch,
                    dkey: dkey.map(<[u8]>::to_vec),
                    akey: akey.map(<[u8]>::to_vec),
                };
                let st = &st;
                async move { self.rpc(st, s, &req, vec![]).await }
            });
            for r in join_all(futs).await {
                self.observe(r?.0.now);
            }
            Ok(epoch)
        })
        .await
    }

    async fn list_on(&self, st: &PoolState, shards: &[Shard], dkey: Option<&[u8]>) -> Result<Vec<Vec<u8>>> {
        let mut errors = Vec::new();
        for s in shards {
            let mut out = Vec::new();
            let mut anchor = None;
            let r: Result<()> = async {
                loop {
                    let req = ListReq {
                        pool: st.info.uuid,
                        target: s.target,
                        cont: self.cont.info.uuid,
                        oid: self.oid,
                        epoch: EPOCH_MAX,
                        dkey: dkey.map(<[u8]>::to_vec),
                        anchor: anchor.take(),
                        limit: 1024,
                    };
                    let (r, _) = self.rpc(st, s, &req, vec![]).await?;
                    out.extend(r.keys);
                    match r.anchor {
                        Some(a) => anchor = Some(a),
                        None => return Ok(()),
                    }
                }
            }
            .await;
            match r {
                Ok(()) => return Ok(out),
                Err(e) if shard_down(&e) => errors.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        Err(ShoalError::Unreachable(format!("object {}: no shard could list keys: {}", self.oid, errors.join("; "))))
    }

    /// Every dkey of the object, in (length, bytes) order. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// for dkey in obj.list_dkeys().await? {
    ///     println!("{}", String::from_utf8_lossy(&dkey));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_dkeys(&self) -> Result<Vec<Vec<u8>>> {
        self.with_layout(|st, layout| async move {
            let futs = layout.groups.iter().map(|g| self.list_on(&st, self.value_shards(g), None));
            let mut all = Vec::new();
            for r in join_all(futs).await {
                all.extend(r?);
            }
            all.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
            all.dedup();
            Ok(all)
        })
        .await
    }

    /// Every akey of one dkey. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// for akey in obj.list_akeys(b"user/1").await? {
    ///     println!("user/1/{}", String::from_utf8_lossy(&akey));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_akeys(&self, dkey: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.with_layout(|st, layout| async move {
            self.list_on(&st, self.value_shards(layout.dkey_shards(dkey)), Some(dkey)).await
        })
        .await
    }

    /// Writes `data` at byte `offset` of an array value. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// use bytes::Bytes;
    ///
    /// // Bytes 4096..12288 of the value under ("chunk0", "data").
    /// let epoch = obj.write_extent(b"chunk0", b"data", 4096, Bytes::from(vec![0xab; 8192])).await?;
    /// # Ok(()) }
    /// ```
    pub async fn write_extent(&self, dkey: &[u8], akey: &[u8], offset: u64, data: Bytes) -> Result<Epoch> {
        if data.is_empty() {
            return Err(ShoalError::invalid("an extent write needs at least one byte"));
        }
        offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| ShoalError::invalid("the extent runs past the largest offset"))?;
        self.with_layout(|st, layout| {
            let data = data.clone();
            async move {
                let group = layout.dkey_shards(dkey);
                match self.ec_geometry() {
                    Some(g) => self.ec_write(&st, group, g, dkey, akey, offset, data).await,
                    None => {
                        let epoch = self.cont_now();
                        let shards = self.value_shards(group);
                        let mut at = 0;
                        while at < data.len() {
                            let piece = data.slice(at..(at + MAX_SHARD_REQUEST as usize).min(data.len()));
                            let kind =
                                ValueKind::Array { rec_size: 1, start: offset + at as u64, nr: piece.len() as u64 };
                            let iods = vec![UpdateIod { akey: akey.to_vec(), kind }];
                            at += piece.len();
                            self.update_all(&st, shards, dkey, epoch, iods, vec![piece]).await?;
                        }
                        Ok(epoch)
                    }
                }
            }
        })
        .await
    }

    /// Reads `len` bytes at `offset` of an array value as of `epoch`;
    /// holes read as zeros. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await?)?;
    /// use shoal_common::EPOCH_MAX;
    ///
    /// let data = obj.read_extent(b"chunk0", b"data", 0, 16384, EPOCH_MAX).await?;
    /// assert_eq!(data.len(), 16384);
    /// // Bytes never written read as zeros.
    /// assert_eq!(data[0], 0);
    /// # Ok(()) }
    /// ```
    pub async fn read_extent(&self, dkey: &[u8], akey: &[u8], offset: u64, len: u64, epoch: Epoch) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        offset.checked_add(len).ok_or_else(|| ShoalError::invalid("the extent runs past the largest offset"))?;
        self.with_layout(|st, layout| async move {
            let group = layout.dkey_shards(dkey);
            match self.ec_geometry() {
                Some(g) => {
                    let (k, _, cell) = g;
                    let stripe = k as u64 * cell;
                    let (s0, s1) = (offset / stripe, (offset + len - 1) / stripe + 1);
                    let mut out = BytesMut::with_capacity(((s1 - s0) * stripe) as usize);
                    let mut s = s0;
                    while s < s1 {
                        let batch = (s1 - s).min(stripes_per_request(cell));
                        for data in self.ec_read_stripes(&st, group, g, dkey, akey, s, s + batch, epoch).await? {
                            out.extend_from_slice(&data);
                        }
                        s += batch;
                    }
                    let from = (offset - s0 * stripe) as usize;
                    Ok(out.freeze().slice(from..from + len as usize))
                }
                None => self.read_replicated(&st, self.value_shards(group), dkey, akey, offset, len, epoch).await,
            }
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn read_replicated(
        &self,
        st: &PoolState,
        shards: &[Shard],
        dkey: &[u8],
        akey: &[u8],
        offset: u64,
        len: u64,
        epoch: Epoch,
    ) -> Result<Bytes> {
        let mut out = BytesMut::with_capacity(len as usize);
        while (out.len() as u64) < len {
            let at = offset + out.len() as u64;
            let n = (len - out.len() as u64).min(MAX_SHARD_REQUEST);
            let kind = ValueKind::Array { rec_size: 1, start: at, nr: n };
            let mut errors = Vec::new();
            let mut got = None;
            for s in shards {
                let req = self.fetch_req(st, s, dkey, epoch, vec![FetchIod { akey: akey.to_vec(), kind }]);
                match self.rpc(st, s, &req, vec![]).await {
                    Ok((r, mut segs)) => {
                        got = Some(match r.values.first() {
                            Some(Fetched::Array { .. }) => segs.pop().unwrap_or_default(),
                            _ => Bytes::new(),
                        });
                        break;
                    }
                    Err(e) if shard_down(&e) || matches!(e, ShoalError::Checksum(_)) => errors.push(e.to_string()),
                    Err(e) => return Err(e),
                }
            }
            let Some(data) = got else {
                return Err(ShoalError::Unreachable(format!(
                    "object {}: no copy of dkey {:?} is readable: {}",
                    self.oid,
                    String::from_utf8_lossy(dkey),
                    errors.join("; ")
                )));
            };
            if data.is_empty() {
                out.resize(out.len() + n as usize, 0);
            } else if data.len() as u64 == n {
                out.extend_from_slice(&data);
            } else {
                return Err(ShoalError::protocol(format!("a shard returned {} bytes for a {n}-byte read", data.len())));
            }
        }
        Ok(out.freeze())
    }

    /// Writes stripes covering `[offset, offset + data.len())`: full stripes
    /// directly, partial ones by read-modify-write. Every stripe is written
    /// whole, at `epoch`, to all k + p shards.
    #[allow(clippy::too_many_arguments)]
    async fn ec_write(
        &self,
        st: &PoolState,
        group: &[Shard],
        geo: (u32, u32, u64),
        dkey: &[u8],
        akey: &[u8],
        offset: u64,
        data: Bytes,
    ) -> Result<Epoch> {
        let (k, p, cell) = geo;
        let stripe = k as u64 * cell;
        let end = offset + data.len() as u64;
        let (s0, s1) = (offset / stripe, (end - 1) / stripe + 1);
        let batch = stripes_per_request(cell);
        let codec = codec(k, p)?;
        // A partial stripe is read, merged and rewritten whole, under a lock
        // on it at the group's first shard, so two such writers never
        // rewrite it from the same old version. Full stripes take no lock.
        let partial: Vec<u64> = {
            let mut v: Vec<u64> =
                [s0, s1 - 1].into_iter().filter(|n| !(offset <= n * stripe && end >= (n + 1) * stripe)).collect();
            v.dedup();
            v
        };
        let owner: u128 = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(offset);
            ((h.finish() as u128) << 64) | crate::server::wall_ns() as u128
        };
        let leader = &group[0];
        if !partial.is_empty() {
            let req = StripeLockReq {
                pool: st.info.uuid,
                cont: self.cont.info.uuid,
                oid: self.oid,
                dkey: dkey.to_vec(),
                stripes: partial.clone(),
                owner,
                lease_ms: STRIPE_LOCK_LEASE_MS,
            };
            self.rpc(st, leader, &req, vec![]).await?;
        }
        let result = async {
            // Read the partial stripes (at most the first and the last) before
            // taking the epoch, so that a concurrent writer's stripe landing in
            // between wins by epoch over this write's stale merge as rarely as
            // possible.
            let mut old = std::collections::HashMap::new();
            for st_no in [s0, s1 - 1] {
                let (a, b) = (st_no * stripe, (st_no + 1) * stripe);
                let full = offset <= a && end >= b;
                if !full && !old.contains_key(&st_no) {
                    let r = self.ec_read_stripes(st, group, geo, dkey, akey, st_no, st_no + 1, EPOCH_MAX).await?;
                    old.insert(st_no, r.into_iter().next().unwrap_or_default());
                }
            }
            let epoch = self.cont_now();
            let mut s = s0;
            while s < s1 {
                let last = (s + batch).min(s1);
                let mut per_shard: Vec<(Vec<UpdateIod>, Vec<Bytes>)> = vec![(Vec::new(), Vec::new()); (k + p) as usize];
                for st_no in s..last {
                    let (a, b) = (st_no * stripe, (st_no + 1) * stripe);
                    let full = if offset <= a && end >= b {
                        data.slice((a - offset) as usize..(b - offset) as usize)
                    } else {
                        // Read-modify-write of a partial stripe.
                        let mut buf = BytesMut::from(&old[&st_no][..]);
                        let (from, to) = (offset.max(a), end.min(b));
                        buf[(from - a) as usize..(to - a) as usize]
                            .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
                        buf.freeze()
                    };
                    let cells: Vec<Bytes> =
                        (0..k as usize).map(|j| full.slice(j * cell as usize..(j + 1) * cell as usize)).collect();
                    let refs: Vec<&[u8]> = cells.iter().map(|c| &c[..]).collect();
                    let parity = codec.encode(&refs)?;
                    let kind = ValueKind::Array { rec_size: 1, start: st_no * cell, nr: cell };
                    for (j, c) in cells.into_iter().chain(parity.into_iter().map(Bytes::from)).enumerate() {
                        per_shard[j].0.push(UpdateIod { akey: akey.to_vec(), kind });
                        per_shard[j].1.push(c);
                    }
                }
                let futs = group.iter().zip(per_shard).map(|(sh, (iods, segs))| {
                    let req = self.update_req(st, sh, dkey, epoch, iods);
                    async move { self.rpc(st, sh, &req, segs).await }
                });
                for r in join_all(futs).await {
                    self.observe(r?.0.now);
                }
                s = last;
            }
            Ok(epoch)
        }
        .await;
        if !partial.is_empty() {
            let req = StripeUnlockReq {
                pool: st.info.uuid,
                cont: self.cont.info.uuid,
                oid: self.oid,
                dkey: dkey.to_vec(),
                stripes: partial,
                owner,
            };
            // Best effort: the lease frees the stripes anyway.
            let _ = self.rpc(st, leader, &req, vec![]).await;
        }
        result
    }

    /// Reads whole stripes `[s0, s1)`: each as `k * cell` data bytes.
    /// Checks that the cells of each stripe carry one epoch and decodes from
    /// parity where a data shard is out of reach.
    #[allow(clippy::too_many_arguments)]
    async fn ec_read_stripes(
        &self,
        st: &PoolState,
        group: &[Shard],
        geo: (u32, u32, u64),
        dkey: &[u8],
        akey: &[u8],
        s0: u64,
        s1: u64,
        epoch: Epoch,
    ) -> Result<Vec<Bytes>> {
        let (k, p, cell) = geo;
        let (k, n) = (k as usize, (k + p) as usize);
        let fetch_shard = |j: usize| {
            let iods: Vec<FetchIod> = (s0..s1)
                .map(|s| FetchIod {
                    akey: akey.to_vec(),
                    kind: ValueKind::Array { rec_size: 1, start: s * cell, nr: cell },
                })
                .collect();
            let req = self.fetch_req(st, &group[j], dkey, epoch, iods);
            async move {
                let (r, segs) = self.rpc(st, &group[j], &req, vec![]).await?;
                if r.values.len() as u64 != s1 - s0 || segs.len() as u64 != s1 - s0 {
                    return Err(ShoalError::protocol("a shard's fetch reply does not match the request"));
                }
                Ok::<_, ShoalError>(
                    r.values
                        .into_iter()
                        .zip(segs)
                        .map(|(f, b)| match f {
                            Fetched::Array { epoch, .. } if b.len() as u64 == cell => (epoch, b),
                            _ => (0, Bytes::from(vec![0u8; cell as usize])),
                        })
                        .collect::<Vec<_>>(),
                )
            }
        };
        let mut attempt = 0;
        loop {
            let data_cells = usable(join_all((0..k).map(fetch_shard)).await)?;
            let mut parity_cells: Option<Vec<Result<StripeCells>>> = None;
            let mut out = Vec::with_capacity((s1 - s0) as usize);
            let mut torn = false;
            for (i, _) in (s0..s1).enumerate() {
                let present: Vec<Option<&(Epoch, Bytes)>> =
                    data_cells.iter().map(|r| r.as_ref().ok().map(|v| &v[i])).collect();
                let e0 = present[0].map(|c| c.0);
                if present.iter().all(|c| c.is_some() && c.map(|c| c.0) == e0) {
                    let mut stripe = BytesMut::with_capacity(k * cell as usize);
                    for c in present.iter().flatten() {
                        stripe.extend_from_slice(&c.1);
                    }
                    out.push(stripe.freeze());
                    continue;
                }
                // A data cell is unreachable, or the cells disagree (a write
                // in flight, or one that failed on some shard): decode from
                // the newest epoch that at least k of the k + p cells share.
                if parity_cells.is_none() {
                    parity_cells = Some(usable(join_all((k..n).map(fetch_shard)).await)?);
                }
                let parity = parity_cells.as_ref().expect("fetched above");
                let cells: Vec<Option<(Epoch, Bytes)>> =
                    data_cells.iter().chain(parity.iter()).map(|r| r.as_ref().ok().map(|v| v[i].clone())).collect();
                let mut epochs: Vec<Epoch> = cells.iter().flatten().map(|c| c.0).collect();
                epochs.sort_unstable_by(|a, b| b.cmp(a));
                let chosen = epochs.iter().copied().find(|e| epochs.iter().filter(|x| *x == e).count() >= k);
                let Some(e) = chosen else {
                    if cells.iter().flatten().count() >= k {
                        if attempt < OLDER_AFTER {
                            torn = true;
                            break;
                        }
                        // The newest write never reached k cells (it failed,
                        // or is stuck): it was never acknowledged, so read
                        // the stripe as it was before it.
                        let s = s0 + i as u64;
                        let older =
                            Box::pin(self.ec_read_stripes(st, group, geo, dkey, akey, s, s + 1, epochs[0] - 1)).await?;
                        out.extend(older);
                        continue;
                    }
                    let why: Vec<String> = data_cells
                        .iter()
                        .chain(parity.iter())
                        .filter_map(|r| r.as_ref().err().map(ToString::to_string))
                        .collect();
                    return Err(ShoalError::Unreachable(format!(
                        "object {}: stripe {} of dkey {:?} has fewer than {k} reachable cells: {}",
                        self.oid,
                        s0 + i as u64,
                        String::from_utf8_lossy(dkey),
                        why.join("; ")
                    )));
                };
                let mut shards: Vec<Option<Vec<u8>>> =
                    cells.into_iter().map(|c| c.and_then(|(ce, d)| (ce == e).then(|| d.to_vec()))).collect();
                codec(k as u32, p)?.reconstruct(&mut shards)?;
                let mut stripe = BytesMut::with_capacity(k * cell as usize);
                for c in shards.iter().take(k).flatten() {
                    stripe.extend_from_slice(c);
                }
                out.push(stripe.freeze());
            }
            if !torn {
                return Ok(out);
            }
            attempt += 1;
            if attempt >= TORN_RETRIES {
                return Err(ShoalError::Busy(format!(
                    "object {}: a stripe of dkey {:?} is being rewritten (its cells disagree); try again",
                    self.oid,
                    String::from_utf8_lossy(dkey)
                )));
            }
            tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
        }
    }
}
