//! The object API: single values and byte extents under dkeys and akeys,
//! spread and protected by the object's class.
//!
//! Every operation computes the object's layout from the pool map (no
//! lookup), sends each shard's part in parallel, and retries on a "stale
//! map" answer after refreshing the map.
//!
//! - `S*` classes: one shard per group holds everything.
//! - `RP_n*`: every replica gets every write, with one epoch, before the
//!   write is acknowledged; a read takes the first replica that answers and
//!   moves on to the next on any error of that replica ([`crate::rp`]).
//! - `EC_kPp*`: extents are striped in cells of the object's cell size; see
//!   [`crate::ec_write`] for how writes are ordered and [`crate::ec_read`]
//!   for how stripes are read. Single values of EC objects are replicated
//!   on shards `0..=p`.
//!
//! Ordering: every write takes an epoch from the client's hybrid clock; a
//! target that already holds a version of the same range at that epoch or
//! newer refuses the write with a conflict that carries its clock, and the
//! client observes it and sends the write again with a newer epoch
//! ([`Object::blind_write`]). So the write acknowledged last in real time is
//! the one that reads back, whatever the clients' clocks say.
//!
//! End-to-end checksums: every value and EC cell is sent with the crc32c
//! the client computed; the target verifies it before it stores anything,
//! and every fetch reply carries the stored checksums back, which the
//! client verifies before it uses a byte.
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

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use shoal_common::msg::{
    check_key, FetchIod, FetchReq, Fetched, ListReq, PunchReq, Rpc, UpdateIod, UpdateReq, ValueKind,
};
use shoal_common::oclass::{oid_class, ObjectClass, Redundancy};
use shoal_common::placement::{Layout, Shard};
use shoal_common::{Epoch, ErrorKind, Oid, Result, ShoalError, EPOCH_MAX};

use crate::system::{ContInner, PoolState};
use crate::transport::call;

/// Most bytes one request sends to one shard; larger writes are split.
pub(crate) const MAX_SHARD_REQUEST: u64 = 16 << 20;
/// How many times a write is sent again after targets answer that they
/// hold a version as new as its epoch.
pub(crate) const CONFLICT_RETRIES: u32 = 32;

/// A key and an attribute key as the API takes them, checked against
/// their limits before anything is sent.
fn keys<'a>(dkey: &'a [u8], akey: &'a [u8]) -> Result<(&'a [u8], &'a [u8])> {
    check_key("a key", dkey)?;
    check_key("an attribute key", akey)?;
    Ok((dkey, akey))
}

/// Whether an error means the shard's server is out of reach, so another
/// copy or a decode should be tried.
pub(crate) fn shard_down(e: &ShoalError) -> bool {
    e.peer_failed() || matches!(e, ShoalError::Poisoned(_) | ShoalError::Busy(_))
}

pub(crate) fn with_shard(e: ShoalError, s: &Shard) -> ShoalError {
    let at = format!("rank {} target {}", s.rank, s.target);
    match e {
        ShoalError::Unreachable(m) => ShoalError::Unreachable(format!("{at}: {m}")),
        ShoalError::Connection { peer, source } => ShoalError::Connection { peer: format!("{at} at {peer}"), source },
        ShoalError::BadPeer { peer, message } => ShoalError::BadPeer { peer: format!("{at} at {peer}"), message },
        ShoalError::Timeout(m) => ShoalError::Timeout(format!("{at}: {m}")),
        ShoalError::Io(m) => ShoalError::Io(format!("{at}: {m}")),
        ShoalError::Checksum(m) => ShoalError::Checksum(format!("{at}: {m}")),
        ShoalError::Damaged(m) => ShoalError::Damaged(format!("{at}: {m}")),
        other => other,
    }
}

/// What a group of per-shard results says about a write: done, sent again
/// with a newer epoch (a shard held a version as new), or failed.
pub(crate) enum WriteOutcome {
    /// Every shard took it, but for the ranks listed (within rd_fac).
    Done(Vec<u32>),
    Conflict,
    Failed(ShoalError),
}

impl WriteOutcome {
    /// Folds per-shard write results. A conflict anywhere means the whole
    /// write goes again (shards that took it get the newer version too), and
    /// so does a value a target refused as damaged on the way (nothing of it
    /// was stored). Up to `spare` shards may be out of reach (down, or
    /// failing as the write runs): the write is degraded but acknowledged,
    /// its durable copies still meeting the container's rd_fac. Any other
    /// error, or more shards out of reach, ends the write.
    pub(crate) fn of<T>(
        shards: &[Shard],
        results: Vec<Result<T>>,
        spare: usize,
        mut ok: impl FnMut(T),
    ) -> WriteOutcome {
        let mut conflict = false;
        let mut failed = None;
        let mut out: Vec<ShoalError> = Vec::new();
        let mut missed = Vec::new();
        for (s, r) in shards.iter().zip(results) {
            match r {
                Ok(v) => ok(v),
                Err(ShoalError::Conflict { .. } | ShoalError::Damaged(_)) => conflict = true,
                Err(e) if shard_down(&e) => {
                    out.push(e);
                    missed.push(s.rank);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if failed.is_none() && out.len() > spare {
            let why: Vec<String> = out.iter().map(ToString::to_string).collect();
            failed = Some(ShoalError::Unreachable(format!(
                "{} shards of the group are out of reach and the container survives only {spare}: {}",
                out.len(),
                why.join("; ")
            )));
        }
        match (failed, conflict) {
            (Some(e), _) => WriteOutcome::Failed(e),
            (None, true) => WriteOutcome::Conflict,
            (None, false) => WriteOutcome::Done(missed),
        }
    }

    /// Adds what an earlier part of the same write missed.
    pub(crate) fn and_missed(self, earlier: &mut Vec<u32>) -> std::ops::ControlFlow<WriteOutcome> {
        match self {
            WriteOutcome::Done(m) => {
                earlier.extend(m);
                std::ops::ControlFlow::Continue(())
            }
            other => std::ops::ControlFlow::Break(other),
        }
    }
}

/// Keeps the server clocks that conflicts carry, so the writer observes
/// them before it takes its next epoch.
pub(crate) fn conflict_clock<T>(obj: &Object, results: &[Result<T>]) {
    for r in results {
        if let Err(ShoalError::Damaged(_)) = r {
            obj.cont.pool.client.inner.count_checksum_error();
        }
        if let Err(ShoalError::Conflict { server_now, .. }) = r {
            obj.observe(*server_now);
        }
    }
}

/// Decodes one fetch reply after checking its segments' checksums.
pub(crate) fn checked(
    obj: &Object,
    r: shoal_common::msg::FetchReply,
    segs: &[Bytes],
    want: usize,
) -> Result<Vec<Fetched>> {
    if r.values.len() != want || segs.len() != want {
        return Err(ShoalError::protocol("a shard's fetch reply does not match the request"));
    }
    if let Err(e) = r.verify(segs) {
        obj.cont.pool.client.inner.count_checksum_error();
        return Err(e);
    }
    Ok(r.values)
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
    pub(crate) cont: Arc<ContInner>,
    oid: Oid,
    class: ObjectClass,
    /// EC cell size; the container's unless the object chose its own.
    cell: u64,
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("oid", &self.oid)
            .field("class", &self.class)
            .field("container", &self.cont.info.uuid)
            .finish()
    }
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
    pub(crate) async fn with_layout<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(PoolState, Layout) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        let mut refreshed_on_failure = false;
        loop {
            let st = self.cont.pool.state();
            let version = st.info.map.version;
            let layout = st.placement.layout(self.cont.info.uuid, self.oid, self.class)?;
            match op(st, layout).await {
                Err(ShoalError::StaleMap { .. }) if attempt < self.cont.pool.client.inner.stale_retries => {
                    attempt += 1;
                    self.cont.pool.refresh().await?;
                }
                // Too many shards out of reach may only mean this map is
                // old (servers excluded and rebuilt elsewhere, which the
                // servers asked may not have heard yet): once, fetch the map
                // and try again if it changed.
                Err(e) if e.kind() == ErrorKind::Unreachable && !refreshed_on_failure => {
                    refreshed_on_failure = true;
                    if self.cont.pool.refresh().await.is_err() || self.cont.pool.state().info.map.version == version {
                        return Err(e);
                    }
                }
                r => return r,
            }
        }
    }

    pub(crate) async fn rpc<R: Rpc>(
        &self,
        st: &PoolState,
        shard: &Shard,
        req: &R,
        segs: Vec<Bytes>,
    ) -> Result<(R::Reply, Vec<Bytes>)> {
        // While a drain copies the shard to its shadow, writes go to both.
        let Some((to, shadow_req)) = shard.shadow.and_then(|(r, t)| Some(((r, t), req.retarget(r, t)?))) else {
            return self.rpc_one(st, shard, req, segs).await;
        };
        let shadow = Shard { rank: to.0, target: to.1, available: true, spare: true, readable: false, shadow: None };
        let (home, copy) =
            futures::join!(self.rpc_one(st, shard, req, segs.clone()), self.rpc_one(st, &shadow, &shadow_req, segs));
        let reply = home?;
        match copy {
            Ok(_) => Ok(reply),
            // The shard's own target has it; the shadow's server is
            // declared down before the write is acknowledged, so the
            // drain never finishes with a copy that missed it.
            Err(e) if shard_down(&e) => {
                self.record_missed(&[shadow.rank]).await?;
                Ok(reply)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends `req` to one shard's target.
    async fn rpc_one<R: Rpc>(
        &self,
        st: &PoolState,
        shard: &Shard,
        req: &R,
        segs: Vec<Bytes>,
    ) -> Result<(R::Reply, Vec<Bytes>)> {
        if !shard.available {
            return Err(ShoalError::Unreachable(format!("rank {} target {} is down", shard.rank, shard.target)));
        }
        if !shard.readable && matches!(R::OP, shoal_common::msg::Opcode::Fetch | shoal_common::msg::Opcode::List) {
            return Err(ShoalError::Unreachable(format!(
                "rank {} target {} is a spare still being rebuilt",
                shard.rank, shard.target
            )));
        }
        self.cont.check_live()?;
        let addr = st.addr(shard)?;
        let c = &self.cont.pool.client.inner;
        let _slot = match &c.in_flight {
            Some(s) => Some(s.acquire().await.map_err(|_| ShoalError::Internal("in-flight cap closed".into()))?),
            None => None,
        };
        let r = call(&c.transport, addr, req, segs, st.info.map.version, 0, c.timeout).await;
        if r.as_ref().is_err_and(|e| e.is_cont_destroyed()) {
            self.cont.destroyed.store(true, std::sync::atomic::Ordering::Release);
        }
        if r.as_ref().is_err_and(|e| e.peer_failed()) {
            // The MS hears of it: reports from several clients declare a
            // server down even while it heartbeats.
            c.report(shard.rank);
        }
        r.map_err(|e| with_shard(e, shard))
    }

    /// The shards of a group that hold single values (and, for S and RP,
    /// extents).
    pub(crate) fn value_shards<'a>(&self, group: &'a [Shard]) -> &'a [Shard] {
        let n = match self.class.redundancy {
            Redundancy::None => 1,
            Redundancy::Replicas(_) => group.len(),
            Redundancy::Ec { p, .. } => p as usize + 1,
        };
        &group[..n.min(group.len())]
    }

    pub(crate) fn update_req(
        &self,
        st: &PoolState,
        shard: &Shard,
        dkey: &[u8],
        epoch: Epoch,
        iods: Vec<UpdateIod>,
    ) -> UpdateReq {
        UpdateReq {
            pool: st.info.uuid,
            rank: shard.rank,
            target: shard.target,
            cont: self.cont.info.uuid,
            oid: self.oid,
            dkey: dkey.to_vec(),
            epoch,
            iods,
        }
    }

    pub(crate) fn fetch_req(
        &self,
        st: &PoolState,
        shard: &Shard,
        dkey: &[u8],
        epoch: Epoch,
        iods: Vec<FetchIod>,
    ) -> FetchReq {
        FetchReq {
            pool: st.info.uuid,
            rank: shard.rank,
            target: shard.target,
            cont: self.cont.info.uuid,
            oid: self.oid,
            dkey: dkey.to_vec(),
            epoch,
            iods,
        }
    }

    /// Before a write that some shards missed is acknowledged, the MS
    /// declares their ranks down (so that they serve nothing stale), and
    /// this client learns the new pool map. A write whose misses cannot be
    /// recorded is not acknowledged.
    pub(crate) async fn record_missed(&self, missed: &[u32]) -> Result<()> {
        if missed.is_empty() {
            return Ok(());
        }
        let mut ranks = missed.to_vec();
        ranks.sort_unstable();
        ranks.dedup();
        let inner = &self.cont.pool.client.inner;
        for rank in ranks {
            inner.report_missed_write(rank).await.map_err(|e| {
                ShoalError::Unreachable(format!(
                    "object {}: the write reached enough shards, but the management service could not be told that rank {rank} missed it ({e}); it is not acknowledged",
                    self.oid
                ))
            })?;
        }
        self.cont.pool.refresh().await
    }

    /// How many shards of a group a write may miss and still be
    /// acknowledged: the container's rd_fac (never more than the class
    /// tolerates).
    pub(crate) fn spare_shards(&self) -> usize {
        self.cont.info.props.rd_fac.min(self.class.tolerated_failures()) as usize
    }

    /// Moves this client's clock past a server's.
    pub(crate) fn observe(&self, server_now: Epoch) {
        self.cont.pool.client.inner.observe(server_now);
    }

    /// A new epoch for a write.
    pub(crate) async fn epoch(&self) -> Result<Epoch> {
        self.cont.pool.client.inner.epoch().await
    }

    /// Tells `shards` that the write or punch at `epoch` of `dkey` (`None`:
    /// the whole object) reached all of them, so that aggregation of EC
    /// cells may remove what it covers. In the background: a mark that is
    /// lost only delays reclaim.
    pub(crate) fn mark_stable(&self, st: &PoolState, shards: &[Shard], dkey: Option<&[u8]>, epoch: Epoch) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (obj, st, shards, dkey) = (self.clone(), st.clone(), shards.to_vec(), dkey.map(<[u8]>::to_vec));
        rt.spawn(async move {
            let futs = shards.iter().map(|s| {
                let req = shoal_common::msg::StableReq {
                    pool: st.info.uuid,
                    rank: s.rank,
                    target: s.target,
                    cont: obj.cont.info.uuid,
                    oid: obj.oid,
                    dkey: dkey.clone(),
                    epoch,
                };
                let (obj, st) = (&obj, &st);
                async move {
                    let _ = obj.rpc(st, s, &req, vec![]).await;
                }
            });
            join_all(futs).await;
        });
    }

    /// Runs `send(epoch)` with a fresh epoch until no target answers with
    /// a conflict: a target that holds a version as new as the epoch
    /// refuses, the client observes the target's clock (in `send`'s
    /// results) and sends everything again with a newer epoch. For writes
    /// whose bytes do not depend on what is stored (blind writes).
    pub(crate) async fn blind_write<F, Fut>(&self, send: F) -> Result<Epoch>
    where
        F: Fn(Epoch) -> Fut,
        Fut: std::future::Future<Output = WriteOutcome>,
    {
        for _ in 0..CONFLICT_RETRIES {
            let epoch = self.epoch().await?;
            match send(epoch).await {
                WriteOutcome::Done(missed) => {
                    self.record_missed(&missed).await?;
                    return Ok(epoch);
                }
                WriteOutcome::Conflict => self.cont.pool.client.inner.count_conflict(),
                WriteOutcome::Failed(e) => return Err(e),
            }
        }
        Err(ShoalError::Busy(format!(
            "object {}: targets kept holding newer versions through {CONFLICT_RETRIES} attempts (many concurrent writers?); try again",
            self.oid
        )))
    }

    /// Sends one update to each of `shards` in parallel at `epoch`.
    pub(crate) async fn update_all(
        &self,
        st: &PoolState,
        shards: &[Shard],
        dkey: &[u8],
        epoch: Epoch,
        iods: &[UpdateIod],
        data: &[Bytes],
    ) -> WriteOutcome {
        let futs = shards.iter().map(|s| {
            let req = self.update_req(st, s, dkey, epoch, iods.to_vec());
            let data = data.to_vec();
            async move { self.rpc(st, s, &req, data).await }
        });
        let results = join_all(futs).await;
        conflict_clock(self, &results);
        WriteOutcome::of(shards, results, self.spare_shards(), |(r, _)| self.observe(r.now))
    }

    async fn update_value(&self, dkey: &[u8], akey: &[u8], kind: ValueKind, value: Bytes) -> Result<Epoch> {
        self.update_values(dkey, &[(akey, kind, value)]).await
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
    pub async fn update_single(&self, dkey: impl AsRef<[u8]>, akey: impl AsRef<[u8]>, value: Bytes) -> Result<Epoch> {
        let (dkey, akey) = keys(dkey.as_ref(), akey.as_ref())?;
        self.update_value(dkey, akey, ValueKind::Single, value).await
    }

    /// Writes several single values of one dkey at one epoch, in one
    /// request per shard. Not cancel safe.
    pub async fn update_many(&self, dkey: impl AsRef<[u8]>, values: &[(&[u8], Bytes)]) -> Result<Epoch> {
        let values: Vec<(&[u8], ValueKind, Bytes)> =
            values.iter().map(|(a, v)| (*a, ValueKind::Single, v.clone())).collect();
        self.update_values(dkey, &values).await
    }

    /// Writes several values of one dkey, each of its own kind (single
    /// values, or u64 maxima), at one epoch in one request per shard. Not
    /// cancel safe.
    pub async fn update_values(&self, dkey: impl AsRef<[u8]>, values: &[(&[u8], ValueKind, Bytes)]) -> Result<Epoch> {
        let dkey = dkey.as_ref();
        check_key("a key", dkey)?;
        let mut iods = Vec::with_capacity(values.len());
        for (akey, kind, v) in values {
            check_key("an attribute key", akey)?;
            if matches!(kind, ValueKind::Array { .. }) {
                return Err(ShoalError::invalid("update_values writes single values and maxima, not array extents"));
            }
            if matches!(kind, ValueKind::MaxU64) && v.len() != 8 {
                return Err(ShoalError::invalid("a u64 maximum is 8 bytes"));
            }
            iods.push(UpdateIod::new(akey, *kind, v));
        }
        let data: Vec<Bytes> = values.iter().map(|(_, _, v)| v.clone()).collect();
        self.with_layout(|st, layout| {
            let (iods, data) = (&iods, &data);
            async move {
                let shards = self.value_shards(layout.dkey_shards(dkey));
                self.blind_write(|epoch| self.update_all(&st, shards, dkey, epoch, iods, data)).await
            }
        })
        .await
    }

    /// Reads several single values of one dkey (latest versions) in one
    /// request; `None` where a value is missing. Cancel safe.
    pub async fn fetch_many(&self, dkey: impl AsRef<[u8]>, akeys: &[&[u8]]) -> Result<Vec<Option<Bytes>>> {
        let dkey = dkey.as_ref();
        check_key("a key", dkey)?;
        for a in akeys {
            check_key("an attribute key", a)?;
        }
        self.with_layout(|st, layout| async move {
            let shards = self.value_shards(layout.dkey_shards(dkey));
            let iods = akeys.iter().map(|a| FetchIod { akey: a.to_vec(), kind: ValueKind::Single }).collect();
            let (values, segs) = self.fetch_any(&st, shards, dkey, EPOCH_MAX, iods).await?;
            Ok(values.iter().zip(segs).map(|(v, s)| matches!(v, Fetched::Single { .. }).then_some(s)).collect())
        })
        .await
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
    pub async fn update_max(&self, dkey: impl AsRef<[u8]>, akey: impl AsRef<[u8]>, v: u64) -> Result<Epoch> {
        let (dkey, akey) = keys(dkey.as_ref(), akey.as_ref())?;
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
    pub async fn fetch_single(
        &self,
        dkey: impl AsRef<[u8]>,
        akey: impl AsRef<[u8]>,
        epoch: Epoch,
    ) -> Result<Option<Bytes>> {
        let (dkey, akey) = keys(dkey.as_ref(), akey.as_ref())?;
        self.with_layout(|st, layout| async move {
            let shards = self.value_shards(layout.dkey_shards(dkey));
            let iods = vec![FetchIod { akey: akey.to_vec(), kind: ValueKind::Single }];
            let (values, mut segs) = self.fetch_any(&st, shards, dkey, epoch, iods).await?;
            Ok(match values.first() {
                Some(Fetched::Single { .. }) => segs.pop(),
                _ => None,
            })
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
    pub async fn punch_dkey(&self, dkey: impl AsRef<[u8]>) -> Result<Epoch> {
        let dkey = dkey.as_ref();
        check_key("a key", dkey)?;
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
    pub async fn punch_akey(&self, dkey: impl AsRef<[u8]>, akey: impl AsRef<[u8]>) -> Result<Epoch> {
        let (dkey, akey) = keys(dkey.as_ref(), akey.as_ref())?;
        self.punch_scope(Some(dkey), Some(akey)).await
    }

    async fn punch_scope(&self, dkey: Option<&[u8]>, akey: Option<&[u8]>) -> Result<Epoch> {
        self.with_layout(|st, layout| async move {
            let shards: Vec<Shard> = match dkey {
                Some(d) => layout.dkey_shards(d).to_vec(),
                None => layout.groups.iter().flatten().copied().collect(),
            };
            let st = &st;
            let shards = &shards;
            let epoch = self
                .blind_write(|epoch| async move {
                    let futs = shards.iter().map(|s| {
                        let req = PunchReq {
                            pool: st.info.uuid,
                            rank: s.rank,
                            target: s.target,
                            cont: self.cont.info.uuid,
                            oid: self.oid,
                            epoch,
                            dkey: dkey.map(<[u8]>::to_vec),
                            akey: akey.map(<[u8]>::to_vec),
                        };
                        async move { self.rpc(st, s, &req, vec![]).await }
                    });
                    let results = join_all(futs).await;
                    conflict_clock(self, &results);
                    WriteOutcome::of(shards, results, self.spare_shards(), |(r, _)| self.observe(r.now))
                })
                .await?;
            if self.ec_geometry().is_some() {
                self.mark_stable(st, shards, dkey, epoch);
            }
            Ok(epoch)
        })
        .await
    }

    /// Lists keys from the first of `shards` that can list them all.
    async fn list_on(&self, st: &PoolState, shards: &[Shard], dkey: Option<&[u8]>) -> Result<Vec<Vec<u8>>> {
        let mut errors = Vec::new();
        for s in shards {
            let mut out = Vec::new();
            let mut anchor = None;
            let r: Result<()> = async {
                loop {
                    let req = ListReq {
                        pool: st.info.uuid,
                        rank: s.rank,
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
                Err(e) if !crate::rp::try_next(&e) => return Err(e),
                Err(e) => errors.push(e),
            }
        }
        Err(crate::rp::no_copy(self.oid, "list keys", errors))
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
    pub async fn list_akeys(&self, dkey: impl AsRef<[u8]>) -> Result<Vec<Vec<u8>>> {
        let dkey = dkey.as_ref();
        check_key("a key", dkey)?;
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
    pub async fn write_extent(
        &self,
        dkey: impl AsRef<[u8]>,
        akey: impl AsRef<[u8]>,
        offset: u64,
        data: Bytes,
    ) -> Result<Epoch> {
        let (dkey, akey) = keys(dkey.as_ref(), akey.as_ref())?;
        if data.is_empty() {
            return Err(ShoalError::invalid("an extent write needs at least one byte"));
        }
        offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| ShoalError::invalid("the extent runs past the largest offset"))?;
        // Pieces of at most one request each, with their checksums, made
        // once whatever the retries.
        let pieces: Vec<(UpdateIod, Bytes)> = (0..data.len())
            .step_by(MAX_SHARD_REQUEST as usize)
            .map(|at| {
                let piece = data.slice(at..(at + MAX_SHARD_REQUEST as usize).min(data.len()));
                let kind = ValueKind::Array { rec_size: 1, start: offset + at as u64, nr: piece.len() as u64 };
                (UpdateIod::new(akey, kind, &piece), piece)
            })
            .collect();
        self.with_layout(|st, layout| {
            let (data, pieces) = (data.clone(), &pieces);
            async move {
                let group = layout.dkey_shards(dkey);
                match self.ec_geometry() {
                    Some(g) => self.ec_write(&st, group, g, dkey, akey, offset, data).await,
                    None => {
                        let shards = self.value_shards(group);
                        let st = &st;
                        self.blind_write(|epoch| async move {
                            let mut missed = Vec::new();
                            for (iod, piece) in pieces {
                                let r = self
                                    .update_all(
                                        st,
                                        shards,
                                        dkey,
                                        epoch,
                                        std::slice::from_ref(iod),
                                        std::slice::from_ref(piece),
                                    )
                                    .await;
                                if let std::ops::ControlFlow::Break(other) = r.and_missed(&mut missed) {
                                    return other;
                                }
                            }
                            WriteOutcome::Done(missed)
                        })
                        .await
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
    pub async fn read_extent(
        &self,
        dkey: impl AsRef<[u8]>,
        akey: impl AsRef<[u8]>,
        offset: u64,
        len: u64,
        epoch: Epoch,
    ) -> Result<Bytes> {
        let (dkey, akey) = keys(dkey.as_ref(), akey.as_ref())?;
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
                        let batch = (s1 - s).min(crate::ec_read::stripes_per_request(cell, akey));
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
}
