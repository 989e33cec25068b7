//! The RPC service: decodes request frames, checks them, and runs them on
//! the right target store.
//!
//! Every request runs in a tracing span with its opcode and request id;
//! data operations add a span with pool, container, OID and target.
//! Reads run on tokio's blocking pool; writes are awaited on the target's
//! group-commit writer.
//!
//! Checks before any work: the request decodes and validates, it names
//! this server's rank (a client with a stale address for a rank is
//! refused), its pool map is not stale, and an update's epoch is not
//! further ahead of this server's clock than the configured skew. The
//! server's clock observes every epoch it sees and, at start, the newest
//! epoch any of its targets committed, so it never goes back. A conflict
//! from a target (it holds something as new as the update) goes back with
//! the server's clock, which the client observes before it retries.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use shoal_common::error::Entity;
use shoal_common::hlc::epoch_to_ns;
use shoal_common::hlc::wall_ns;
use shoal_common::limits::MAX_SEGMENT;
use shoal_common::mgmt::{
    ClientHelloReq, ContCreateReq, ContDestroyReq, ContListReq, ContQueryReq, ExcludeReq, HeartbeatReq, JoinReq,
    OidAllocReq, PoolCreateReq, PoolDestroyReq, PoolExtendReq, PoolListReq, PoolQueryReq, RebuildDoneReq, ReportReq,
    SystemQueryReq,
};
use shoal_common::msg::{
    decode_request, reply_frame, FetchReply, FetchReq, ListReply, ListReq, Opcode, PingReply, PingReq, PunchReq,
    RestoreReq, Rpc, StableReq, StripeLockReq, StripeUnlockReq, TargetQueryReply, TargetQueryReq, UpdateReply,
    UpdateReq,
};
use shoal_common::wire::Frame;
use shoal_common::{ContId, Epoch, Hlc, PoolId, Result, ShoalError};
use shoal_net::tcp::Budget;
use shoal_net::Handler;
use tokio::sync::Semaphore;
use tracing::{debug, Instrument};

use crate::file_locks::FileLocks;
use crate::locks::StripeLocks;
use crate::ms::{Ms, OpId};
use crate::store::{Mutation, TargetStore};

/// Bytes of keys one list reply carries at most (well under the reply
/// body cap, whatever the key sizes).
pub const LIST_PAGE_BYTES: usize = 256 << 10;

/// How long a stripe lock request waits for other writers.
pub const STRIPE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Writes queued or in progress per target; later ones wait for a slot, so
/// a flood of writes queues in the transport rather than in memory here.
pub const MAX_QUEUED_WRITES: usize = 512;

/// The state every request handler shares.
pub struct Service {
    stores: Vec<Arc<TargetStore>>,
    admission: Vec<Arc<Semaphore>>,
    hlc: Hlc,
    max_skew: Duration,
    budget: Arc<Budget>,
    map_version: u32,
    /// The MS replica this server hosts, if any: from the start (its
    /// config), or since the MS leader asked it to (see
    /// [`Service::host_ms`]).
    ms: RwLock<Option<Arc<Ms>>>,
    /// Where this server keeps its MS replica (`<data_dir>/ms`).
    data_dir: std::path::PathBuf,
    /// Held while a replica is started or stopped.
    hosting: tokio::sync::Mutex<()>,
    /// The MS addresses this server was configured with, and the replicas
    /// the MS named in its last heartbeat reply (see [`Service::ms_addrs`]).
    ms_configured: RwLock<Vec<String>>,
    ms_learned: RwLock<Vec<String>>,
    /// Pool-map versions as last heard from the MS (or by rebuild).
    pool_versions: RwLock<HashMap<PoolId, u32>>,
    /// Held shared by every update, punch, restore, fetch and list from its
    /// map check to its end, and taken exclusively by
    /// [`Service::fence_pool_version`] and [`Service::drop_stray`]: once
    /// that has it, no request checked against an older map is running.
    map_fence: tokio::sync::RwLock<()>,
    /// Per pool, the newest map version the MS or any request has named.
    newest: RwLock<HashMap<PoolId, u32>>,
    /// Per pool, the newest map version fenced.
    fenced: RwLock<HashMap<PoolId, u32>>,
    /// What `--metrics` serves.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// How rebuild runs per pool, as last heard from the MS.
    rebuild_ctl: RwLock<HashMap<PoolId, shoal_common::mgmt::RebuildCtl>>,
    /// This server's rebuild progress per pool, for its heartbeats.
    rebuild_progress: std::sync::Mutex<HashMap<PoolId, shoal_common::mgmt::RebuildProgress>>,
    /// Bytes of client data requests (updates, fetches) served: rebuild
    /// yields while it grows.
    pub foreground_bytes: std::sync::atomic::AtomicU64,
    /// Pools in which this server is DOWN or DOWNOUT.
    down_in: RwLock<std::collections::HashSet<PoolId>>,
    /// Pools being rebuilt.
    rebuilding: RwLock<Vec<PoolId>>,
    /// Whether this server answers to an MS, and has heard from it.
    wants_ms: std::sync::atomic::AtomicBool,
    heard: std::sync::atomic::AtomicBool,
    /// This server's rank once it has joined.
    rank: RwLock<Option<u32>>,
    locks: StripeLocks,
    file_locks: FileLocks,
    /// Why this server's clock cannot be trusted (the MS said so), if it
    /// cannot: updates and punches are refused, aggregation waits.
    clock_fault: RwLock<Option<String>>,
}

/// Raises `pool`'s version in `versions` to at least `version`.
fn raise(versions: &RwLock<HashMap<PoolId, u32>>, pool: PoolId, version: u32) {
    let mut known = versions.write().expect("lock");
    let v = known.entry(pool).or_insert(0);
    *v = (*v).max(version);
}

impl Service {
    /// A service over the given target stores, hosting the MS if given.
    /// Updates more than `max_skew` ahead of this server's clock are
    /// refused; fetch replies take their size from `budget` while they are
    /// read.
    pub fn new(
        stores: Vec<Arc<TargetStore>>,
        ms: Option<Arc<Ms>>,
        data_dir: &std::path::Path,
        max_skew: Duration,
        budget: Arc<Budget>,
    ) -> Service {
        let admission = stores.iter().map(|_| Arc::new(Semaphore::new(MAX_QUEUED_WRITES))).collect();
        let hlc = Hlc::new();
        for s in &stores {
            hlc.observe(s.max_epoch());
        }
        // A store that holds data: this is a restart, and clients may
        // still believe in file locks the last run granted.
        let restarted = stores.iter().any(|s| s.max_epoch() > 0);
        let file_locks =
            if restarted { FileLocks::with_grace(crate::file_locks::FILE_LOCK_GRACE) } else { FileLocks::default() };
        Service {
            stores,
            admission,
            hlc,
            max_skew,
            budget,
            map_version: 0,
            ms: RwLock::new(ms),
            data_dir: data_dir.to_path_buf(),
            hosting: tokio::sync::Mutex::new(()),
            ms_configured: RwLock::new(Vec::new()),
            ms_learned: RwLock::new(Vec::new()),
            pool_versions: RwLock::new(HashMap::new()),
            map_fence: tokio::sync::RwLock::new(()),
            newest: RwLock::new(HashMap::new()),
            fenced: RwLock::new(HashMap::new()),
            metrics: Default::default(),
            rebuild_ctl: Default::default(),
            rebuild_progress: Default::default(),
            foreground_bytes: Default::default(),
            down_in: RwLock::new(Default::default()),
            rebuilding: RwLock::new(Vec::new()),
            wants_ms: Default::default(),
            heard: Default::default(),
            rank: RwLock::new(None),
            locks: StripeLocks::default(),
            file_locks,
            clock_fault: RwLock::new(None),
        }
    }

    /// This server's metrics in the OpenMetrics text format, gauges read
    /// now.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        m.budget_used.set(self.budget.in_use() as i64);
        m.budget_limit.set(self.budget.total() as i64);
        for s in &self.stores {
            let u = s.usage();
            m.target(s.id(), u.data_bytes, u.free_bytes, s.is_poisoned());
        }
        m.down_pools.set(self.down_in.read().expect("lock").len() as i64);
        m.rebuild_active.set(self.rebuilding.read().expect("lock").len() as i64);
        if let Some(ms) = self.ms_handle() {
            ms.fill_metrics(m);
        }
        m.render()
    }

    /// Records how rebuild runs per pool, as the MS says.
    pub fn set_rebuild_ctl(&self, ctl: &[(PoolId, shoal_common::mgmt::RebuildCtl)]) {
        *self.rebuild_ctl.write().expect("lock") = ctl.iter().copied().collect();
    }

    /// How rebuild runs in `pool`.
    pub fn rebuild_ctl(&self, pool: PoolId) -> shoal_common::mgmt::RebuildCtl {
        self.rebuild_ctl.read().expect("lock").get(&pool).copied().unwrap_or_default()
    }

    /// Records this server's rebuild progress in `pool`.
    pub fn set_rebuild_progress(&self, p: shoal_common::mgmt::RebuildProgress) {
        self.rebuild_progress.lock().expect("lock").insert(p.pool, p);
    }

    /// This server's rebuild progress in the pools still being rebuilt.
    pub fn rebuild_progress(&self) -> Vec<shoal_common::mgmt::RebuildProgress> {
        let live = self.rebuilding();
        let mut all = self.rebuild_progress.lock().expect("lock");
        all.retain(|p, _| live.contains(p));
        all.values().copied().collect()
    }

    /// Records the pool-map versions the MS reported.
    pub fn set_pool_versions(&self, pools: &[(PoolId, u32)]) {
        let mut known = self.pool_versions.write().expect("lock");
        // A heartbeat reply never lowers a version rebuild has fenced.
        *known = pools.iter().map(|&(p, v)| (p, v.max(known.get(&p).copied().unwrap_or(0)))).collect();
    }

    /// Says this server has heard from the MS (and dropped every container
    /// it said was destroyed): it may serve pool data now.
    pub fn set_heard(&self) {
        self.heard.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Refuses, from now on, requests of `pool` made with a map older than
    /// `version`, and waits until those already admitted have finished.
    /// Rebuild calls it before it goes through its objects for a map, so
    /// that every write it does not see went to the new layout.
    pub async fn fence_pool_version(&self, pool: PoolId, version: u32) {
        raise(&self.pool_versions, pool, version);
        drop(self.map_fence.write().await);
        raise(&self.fenced, pool, version);
    }

    /// Runs `drop` (which deletes shards of `pool` that live elsewhere
    /// under map `version`) with no request running, if this server knows
    /// `version` and has seen no newer map of the pool (under which the
    /// shards might belong here again); `None` when it has.
    pub async fn drop_stray<T: Send + 'static>(
        &self,
        pool: PoolId,
        version: u32,
        drop: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<Option<T>> {
        let _fence = self.map_fence.write().await;
        let get = |m: &RwLock<HashMap<PoolId, u32>>| m.read().expect("lock").get(&pool).copied();
        if get(&self.pool_versions) != Some(version) || get(&self.newest).is_some_and(|n| n > version) {
            return Ok(None);
        }
        let done = tokio::task::spawn_blocking(drop)
            .await
            .map_err(|e| ShoalError::Internal(format!("reclaim task: {e}")))??;
        Ok(Some(done))
    }

    /// The pools this server knows of, with their map versions.
    pub fn pool_versions(&self) -> Vec<(PoolId, u32)> {
        self.pool_versions.read().expect("lock").iter().map(|(p, v)| (*p, *v)).collect()
    }

    /// Records that this server's drain from `pool` finished with map
    /// `version`: from now on it refuses requests made with older maps
    /// (their senders refresh and go where the shards are) and serves the
    /// pool nothing, without waiting for its next heartbeat.
    pub fn left_pool(&self, pool: PoolId, version: u32) {
        raise(&self.pool_versions, pool, version);
        self.down_in.write().expect("lock").insert(pool);
    }

    /// Records the pools in which this server is DOWN or DOWNOUT.
    pub fn set_down_in(&self, pools: &[PoolId]) {
        *self.down_in.write().expect("lock") = pools.iter().copied().collect();
    }

    /// Records the pools being rebuilt.
    pub fn set_rebuilding(&self, pools: &[PoolId]) {
        *self.rebuilding.write().expect("lock") = pools.to_vec();
    }

    /// The pools being rebuilt, as last heard from the MS.
    pub fn rebuilding(&self) -> Vec<PoolId> {
        self.rebuilding.read().expect("lock").clone()
    }

    /// This server's rank, once it has joined.
    pub fn rank(&self) -> Option<u32> {
        *self.rank.read().expect("lock")
    }

    /// Says this server answers to an MS: until it has heard from it, it
    /// serves no pool's data (it may be down in them).
    pub fn expect_ms(&self) {
        self.wants_ms.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Refuses data requests of a pool this server may hold stale copies
    /// of: one it is DOWN in, or any before it has heard from the MS. A
    /// request made with a newer pool map than this server last heard of
    /// is served: its sender found this server in service there (it was
    /// reintegrated, and the next heartbeat will say so).
    fn check_serving(&self, pool: PoolId, sent: u32) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.wants_ms.load(Ordering::Acquire) && !self.heard.load(Ordering::Acquire) {
            return Err(ShoalError::Busy("this server is starting and has not heard from the MS yet".into()));
        }
        let known = self.pool_versions.read().expect("lock").get(&pool).copied().unwrap_or(0);
        if sent <= known && self.down_in.read().expect("lock").contains(&pool) {
            return Err(ShoalError::Unreachable(format!(
                "this server is down in pool {pool}: its copies may be stale, and it serves nothing until reintegrated"
            )));
        }
        Ok(())
    }

    /// Records this server's rank.
    pub fn set_rank(&self, rank: u32) {
        *self.rank.write().expect("lock") = Some(rank);
    }

    /// Records whether the MS found this server's clock too far off.
    pub fn set_clock_fault(&self, why: Option<String>) {
        *self.clock_fault.write().expect("lock") = why;
    }

    /// Why this server's clock cannot be trusted now, if so.
    pub fn clock_fault(&self) -> Option<String> {
        self.clock_fault.read().expect("lock").clone()
    }

    /// This server's clock now.
    pub fn now(&self) -> Epoch {
        self.hlc.now(wall_ns())
    }

    /// The target stores.
    pub fn stores(&self) -> &[Arc<TargetStore>] {
        &self.stores
    }

    /// Destroys containers on every target: refuses their writes from now
    /// on and gives back their space.
    pub async fn drop_containers(&self, conts: &[ContId]) -> Result<()> {
        // Refused everywhere at once, even if recording it fails somewhere.
        for &cont in conts {
            for store in &self.stores {
                store.refuse_container(cont);
            }
        }
        let mut first = None;
        for &cont in conts {
            for store in &self.stores {
                let store = store.clone();
                let r = tokio::task::spawn_blocking(move || store.drop_container(cont))
                    .await
                    .map_err(|e| ShoalError::Internal(format!("drop task: {e}")))
                    .and_then(|r| r);
                if let Err(e) = r {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Refuses a request addressed to another rank: the sender has a stale
    /// address for that rank.
    fn check_rank(&self, rank: Option<u32>) -> Result<()> {
        match (rank, *self.rank.read().expect("lock")) {
            (Some(want), Some(mine)) if want != mine => Err(ShoalError::Unreachable(format!(
                "this server is rank {mine}, not rank {want}: the sender's address for rank {want} is stale"
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses a request stamped with an older map of `pool` than the one
    /// this server knows.
    fn check_map(&self, pool: PoolId, sent: u32) -> Result<()> {
        match self.pool_versions.read().expect("lock").get(&pool) {
            Some(&current) if current > sent => Err(ShoalError::StaleMap { sent, current }),
            _ => Ok(()),
        }
    }

    /// The MS addresses this server's own calls go round: the replicas
    /// the MS named last, then the configured ones.
    pub fn ms_addrs(&self) -> Vec<String> {
        shoal_common::mgmt::ms_addrs(&self.ms_learned.read().expect("lock"), &self.ms_configured.read().expect("lock"))
    }

    /// Sets the configured MS addresses.
    pub fn set_ms_configured(&self, addrs: Vec<String>) {
        *self.ms_configured.write().expect("lock") = addrs;
    }

    /// Keeps the MS replicas' addresses as the MS named them.
    pub fn learn_ms(&self, replicas: &[String]) {
        if !replicas.is_empty() {
            *self.ms_learned.write().expect("lock") = replicas.to_vec();
        }
    }

    /// The MS replica this server hosts, if any.
    pub fn ms_handle(&self) -> Option<Arc<Ms>> {
        self.ms.read().expect("lock").clone()
    }

    /// Starts hosting the MS replica with Raft id `id` (`host`), as the MS
    /// leader asked: a new, empty one in `<data_dir>/ms-<id>` that the
    /// leader brings up to date. Or stops hosting it (it was removed) and
    /// moves its directory aside; a request to stop another id than the
    /// one hosted (a late one) changes nothing. What it was asked is
    /// recorded first, so a restart does the same.
    pub async fn host_ms(&self, id: u64, host: bool) -> Result<()> {
        let _one = self.hosting.lock().await;
        let current = self.ms_handle();
        if id == 0 {
            return Err(ShoalError::invalid("an MS replica's Raft id is not 0"));
        }
        match (&current, host) {
            (Some(ms), true) if ms.id() == id => return Ok(()),
            (Some(ms), false) if ms.id() != id => return Ok(()),
            (None, false) => return Ok(()),
            _ => {}
        }
        let data_dir = self.data_dir.clone();
        let h = if host { crate::ms::Hosting::Added(id) } else { crate::ms::Hosting::Removed };
        tokio::task::spawn_blocking(move || crate::ms::set_hosting(&data_dir, h))
            .await
            .map_err(|e| ShoalError::Internal(format!("MS hosting task: {e}")))??;
        // The leader asks to host only a replica that is not a member: one
        // this server still runs was removed already.
        if let Some(ms) = current {
            *self.ms.write().expect("lock") = None;
            tracing::info!(id = ms.id(), "stopping an MS replica that was removed");
            ms.shutdown().await;
            crate::ms::move_aside(ms.dir())?;
        }
        if host {
            let replicas = crate::ms::raft::Replicas { me: id, members: Default::default(), founding: false };
            let ms = Ms::open(&crate::ms::added_dir(&self.data_dir, id), replicas).await?;
            *self.ms.write().expect("lock") = Some(Arc::new(ms));
            tracing::info!(id, "hosting an MS replica; the leader brings it up to date");
        }
        Ok(())
    }

    fn ms(&self) -> Result<Arc<Ms>> {
        self.ms_handle().ok_or_else(|| {
            ShoalError::not_found(
                Entity::ManagementService,
                "this server does not host the management service; ask the MS address",
            )
        })
    }

    /// Runs a management request on a blocking thread. A change gets the
    /// operation id its caller sent in the frame's token (the same for
    /// every try: see `shoal_net::call_ms`), so that it is applied once.
    async fn run_ms<R: Rpc>(
        self: &Arc<Self>,
        frame: &Frame,
        f: impl FnOnce(&Ms, R, OpId) -> Result<R::Reply> + Send + 'static,
    ) -> Frame {
        let op = frame.header.token;
        let reply = async {
            let req = decode_request::<R>(frame)?;
            let ms = self.ms()?;
            tokio::task::spawn_blocking(move || f(&ms, req, op))
                .await
                .map_err(|e| ShoalError::Internal(format!("MS task: {e}")))?
        }
        .await;
        if let Err(e) = &reply {
            debug!(op = ?R::OP, "management request failed: {e}");
        }
        reply_frame(&frame.header, self.map_version, reply, vec![])
    }

    /// Submits a mutation to a target once it has a queue slot and waits
    /// until it is durable.
    async fn write(&self, target: u32, m: Mutation) -> Result<Epoch> {
        let store = self.store(target)?;
        let _slot = self.admission[target as usize]
            .acquire()
            .await
            .map_err(|_| ShoalError::Busy("server is shutting down".into()))?;
        store.submit(m).await.map_err(|_| ShoalError::Internal("writer dropped a job".into()))?
    }

    fn store(&self, target: u32) -> Result<Arc<TargetStore>> {
        self.stores.get(target as usize).cloned().ok_or_else(|| {
            ShoalError::not_found(Entity::Target, format!("target {target} (this server has {})", self.stores.len()))
        })
    }

    fn check_epoch(&self, epoch: Epoch) -> Result<()> {
        if let Some(why) = self.clock_fault() {
            return Err(ShoalError::invalid(why));
        }
        let now = wall_ns();
        let limit = now + self.max_skew.as_nanos() as u64;
        if epoch_to_ns(epoch) > limit {
            let ahead = Duration::from_nanos(epoch_to_ns(epoch).saturating_sub(now));
            return Err(ShoalError::invalid(format!(
                "the update is stamped {ahead:.1?} ahead of this server's clock, more than the {:?} allowed; fix the sender's clock (time sync)",
                self.max_skew
            )));
        }
        self.hlc.observe(epoch);
        Ok(())
    }

    /// Hands a target's conflict back with this server's clock, past the
    /// version it conflicts with.
    fn with_clock(&self, r: Result<Epoch>) -> Result<Epoch> {
        match r {
            Err(ShoalError::Conflict { server_now, message }) => {
                self.hlc.observe(server_now);
                Err(ShoalError::Conflict { server_now: self.hlc.now(wall_ns()), message })
            }
            r => r,
        }
    }

    async fn dispatch(self: Arc<Self>, frame: Frame) -> Frame {
        let h = frame.header;
        let mv = self.map_version;
        let Some(op) = Opcode::from_u16(h.opcode) else {
            let e = ShoalError::protocol(format!("unknown opcode {}", h.opcode));
            return reply_frame::<()>(&h, mv, Err(e), vec![]);
        };
        let span = tracing::debug_span!("rpc", ?op, request_id = h.request_id);
        let started = std::time::Instant::now();
        let size = |f: &Frame| (f.body.len() + f.segments.iter().map(Bytes::len).sum::<usize>()) as u64;
        let received = size(&frame);
        let this = self.clone();
        let reply = self.dispatch_op(op, frame).instrument(span).await;
        let sent = size(&reply);
        let client_bytes = match op {
            _ if h.token == shoal_common::wire::TOKEN_REBUILD => 0,
            Opcode::Update => received,
            Opcode::Fetch => sent,
            _ => 0,
        };
        this.foreground_bytes.fetch_add(client_bytes, std::sync::atomic::Ordering::Relaxed);
        this.metrics.request(op.name(), started.elapsed(), received, sent, Opcode::reply_failed(&reply));
        reply
    }

    async fn dispatch_op(self: Arc<Self>, op: Opcode, frame: Frame) -> Frame {
        let (h, mv) = (frame.header, self.map_version);
        match op {
            Opcode::Ping => self.run::<PingReq, _>(&frame, |s, _, _| async move { s.ping() }).await,
            Opcode::Update => self.run::<UpdateReq, _>(&frame, |s, r, segs| s.update(r, segs)).await,
            Opcode::Punch => self.run::<PunchReq, _>(&frame, |s, r, _| s.punch(r)).await,
            Opcode::Fetch => self.fetch(&frame).await,
            Opcode::List => self.run::<ListReq, _>(&frame, |s, r, _| s.list(r)).await,
            Opcode::TargetQuery => self.run::<TargetQueryReq, _>(&frame, |s, r, _| s.target_query(r)).await,
            Opcode::ObjList => {
                self.run::<shoal_common::msg::ObjListReq, _>(&frame, |s, r, _| async move {
                    let store = s.store(r.target)?;
                    if store.is_tombstoned(r.cont) {
                        return Err(ShoalError::cont_destroyed(r.cont));
                    }
                    let (oids, more) =
                        tokio::task::spawn_blocking(move || store.objects_of(r.cont, r.after, r.limit as usize))
                            .await
                            .map_err(|e| ShoalError::Internal(format!("list task: {e}")))??;
                    Ok(shoal_common::msg::ObjListReply { oids, more })
                })
                .await
            }
            Opcode::StripeLock => self.run::<StripeLockReq, _>(&frame, |s, r, _| s.stripe_lock(r)).await,
            Opcode::FileLock => {
                self.run::<shoal_common::msg::FileLockReq, _>(
                    &frame,
                    |s, r, _| async move { s.file_locks.apply(&r).await },
                )
                .await
            }
            Opcode::MarkStable => {
                self.run::<StableReq, _>(&frame, |s, r, _| async move {
                    let store = s.store(r.target)?;
                    tokio::task::spawn_blocking(move || store.mark_stable(r.cont, r.oid, r.dkey.as_deref(), r.epoch))
                        .await
                        .map_err(|e| ShoalError::Internal(format!("stable mark task: {e}")))?
                })
                .await
            }
            Opcode::StripeUnlock => {
                self.run::<StripeUnlockReq, _>(&frame, |s, r, _| async move {
                    s.locks.unlock(r.cont, r.oid, &r.dkey, &r.stripes, r.owner);
                    Ok(())
                })
                .await
            }
            Opcode::SysJoin => self.run_ms::<JoinReq>(&frame, |ms, r, op| ms.join(r, op)).await,
            Opcode::SysHeartbeat => self.run_ms::<HeartbeatReq>(&frame, |ms, r, _| ms.heartbeat(r)).await,
            Opcode::SysReport => self.run_ms::<ReportReq>(&frame, |ms, r, op| ms.report(r, op)).await,
            Opcode::SysExclude => self.run_ms::<ExcludeReq>(&frame, |ms, r, op| ms.exclude(r.rank, op)).await,
            Opcode::RebuildDone => self.run_ms::<RebuildDoneReq>(&frame, |ms, r, op| ms.rebuild_done(r, op)).await,
            Opcode::Drain => self.run_ms::<shoal_common::mgmt::DrainReq>(&frame, |ms, r, op| ms.drain(r, op)).await,
            Opcode::RebuildCtl => {
                self.run_ms::<shoal_common::mgmt::RebuildCtlReq>(&frame, |ms, r, op| ms.rebuild_ctl(r, op)).await
            }
            Opcode::Reintegrate => {
                self.run_ms::<shoal_common::mgmt::ReintegrateReq>(&frame, |ms, r, op| ms.reintegrate(r, op)).await
            }
            Opcode::Restore => {
                self.run::<RestoreReq, _>(&frame, |s, r, segs| async move {
                    let m = Mutation::Restore { cont: r.cont, oid: r.oid, dkey: r.dkey, items: r.items, data: segs };
                    s.write(r.target, m).await.map(|_| ())
                })
                .await
            }
            Opcode::RestoreHave => {
                self.run::<shoal_common::msg::RestoreHaveReq, _>(&frame, |s, r, _| async move {
                    let store = s.store(r.target)?;
                    tokio::task::spawn_blocking(move || store.holds(r.cont, r.oid, &r.dkey, &r.items))
                        .await
                        .map_err(|e| ShoalError::Internal(format!("restore-have task: {e}")))?
                })
                .await
            }
            Opcode::MsHost => {
                self.run::<shoal_common::mgmt::MsHostReq, _>(
                    &frame,
                    |s, r, _| async move { s.host_ms(r.id, r.host).await },
                )
                .await
            }
            Opcode::MsMembers => {
                let this = self.clone();
                self.run_ms::<shoal_common::mgmt::MsMembersReq>(&frame, move |ms, r, _| {
                    let (replicas, removed_me) = ms.ms_members(r)?;
                    if removed_me {
                        // The change is committed by a majority of the new
                        // voters: they elect a leader among themselves once
                        // this one stops. It stops before answering, so
                        // that the caller can count on it.
                        tokio::runtime::Handle::current().block_on(this.host_ms(ms.id(), false))?;
                    }
                    Ok(replicas)
                })
                .await
            }
            Opcode::Raft => {
                self.run::<shoal_common::msg::RaftReq, _>(
                    &frame,
                    |s, r, _| async move { s.ms()?.raft_message(r).await },
                )
                .await
            }
            Opcode::ClientHello => {
                let now = self.hlc.now(wall_ns());
                self.run_ms::<ClientHelloReq>(&frame, move |ms, r, op| ms.client_hello(r, now, op)).await
            }
            Opcode::SysQuery => {
                let rank = *self.rank.read().expect("lock");
                self.run_ms::<SystemQueryReq>(&frame, move |ms, _, _| ms.system_query(rank)).await
            }
            Opcode::PoolCreate => self.run_ms::<PoolCreateReq>(&frame, |ms, r, op| ms.pool_create(r, op)).await,
            Opcode::PoolDestroy => self.run_ms::<PoolDestroyReq>(&frame, |ms, r, op| ms.pool_destroy(r, op)).await,
            Opcode::PoolExtend => self.run_ms::<PoolExtendReq>(&frame, |ms, r, op| ms.pool_extend(r, op)).await,
            Opcode::PoolList => self.run_ms::<PoolListReq>(&frame, |ms, r, _| ms.pool_list(r)).await,
            Opcode::PoolQuery => self.run_ms::<PoolQueryReq>(&frame, |ms, r, _| ms.pool_query(r)).await,
            Opcode::ContCreate => self.run_ms::<ContCreateReq>(&frame, |ms, r, op| ms.cont_create(r, op)).await,
            Opcode::ContDestroy => self.run_ms::<ContDestroyReq>(&frame, |ms, r, op| ms.cont_destroy(r, op)).await,
            Opcode::ContList => self.run_ms::<ContListReq>(&frame, |ms, r, _| ms.cont_list(r)).await,
            Opcode::ContQuery => self.run_ms::<ContQueryReq>(&frame, |ms, r, _| ms.cont_query(r)).await,
            Opcode::OidAlloc => self.run_ms::<OidAllocReq>(&frame, |ms, r, op| ms.oid_alloc(r, op)).await,
            #[allow(unreachable_patterns)]
            _ => reply_frame::<()>(&h, mv, Err(ShoalError::protocol(format!("unsupported opcode {op:?}"))), vec![]),
        }
    }

    async fn run<R, F>(self: &Arc<Self>, frame: &Frame, f: impl FnOnce(Arc<Self>, R, Vec<Bytes>) -> F) -> Frame
    where
        R: Rpc,
        F: std::future::Future<Output = Result<R::Reply>>,
    {
        let reply = match decode_request::<R>(frame) {
            Ok(req) => {
                // Writes hold the map fence (see `fence_pool_version`);
                // nothing that may wait on another request does.
                let _fence = match R::OP {
                    Opcode::Update | Opcode::Punch | Opcode::Restore | Opcode::List => {
                        Some(self.map_fence.read().await)
                    }
                    _ => None,
                };
                // A stale map first: its sender refreshes and goes where the
                // shard is now (a server that left the pool is not "down").
                if let Some(p) = req.pool() {
                    raise(&self.newest, p, frame.header.map_version);
                }
                match self.check_rank(req.rank()).and_then(|()| {
                    req.pool().map_or(Ok(()), |p| {
                        self.check_map(p, frame.header.map_version)?;
                        self.check_serving(p, frame.header.map_version)
                    })
                }) {
                    Ok(()) => f(self.clone(), req, frame.segments.clone()).await,
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &reply {
            debug!(op = ?R::OP, "request failed: {e}");
        }
        reply_frame(&frame.header, self.map_version, reply, vec![])
    }

    fn ping(&self) -> Result<PingReply> {
        Ok(PingReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            targets: self.stores.len() as u32,
            epoch: self.hlc.now(wall_ns()),
            rank: *self.rank.read().expect("lock"),
            frame_budget: self.budget.total(),
            frame_in_use: self.budget.in_use(),
        })
    }

    async fn update(self: Arc<Self>, req: UpdateReq, data: Vec<Bytes>) -> Result<UpdateReply> {
        self.check_epoch(req.epoch)?;
        // Tests hold updates this many ms ("8000": of dkeys starting
        // "stall"; "8000:all": every one), to race them against rebuild.
        #[cfg(feature = "failpoints")]
        if let Some(Some(arg)) = fail::eval("service::stall_update", |a| a) {
            let (ms, all) = arg.split_once(':').map_or((arg.as_str(), false), |(ms, w)| (ms, w == "all"));
            if all || req.dkey.starts_with(b"stall") {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            }
        }
        let span =
            tracing::debug_span!("update", pool = %req.pool, cont = %req.cont, oid = %req.oid, target = req.target);
        let m =
            Mutation::Update { cont: req.cont, oid: req.oid, dkey: req.dkey, epoch: req.epoch, iods: req.iods, data };
        let epoch = self.with_clock(self.write(req.target, m).instrument(span).await)?;
        Ok(UpdateReply { epoch, now: self.hlc.now(wall_ns()) })
    }

    async fn punch(self: Arc<Self>, req: PunchReq) -> Result<UpdateReply> {
        self.check_epoch(req.epoch)?;
        let span =
            tracing::debug_span!("punch", pool = %req.pool, cont = %req.cont, oid = %req.oid, target = req.target);
        let m = Mutation::Punch { cont: req.cont, oid: req.oid, epoch: req.epoch, dkey: req.dkey, akey: req.akey };
        let epoch = self.with_clock(self.write(req.target, m).instrument(span).await)?;
        Ok(UpdateReply { epoch, now: self.hlc.now(wall_ns()) })
    }

    async fn fetch(self: &Arc<Self>, frame: &Frame) -> Frame {
        let result = async {
            let req = decode_request::<FetchReq>(frame)?;
            self.check_rank(req.rank())?;
            if let Some(p) = req.pool() {
                raise(&self.newest, p, frame.header.map_version);
                // A rebuild source's read made with a map this server has not
                // fenced yet (decoding from its peers' cells) sees every
                // write admitted under an older one. Only rebuild's reads
                // fence: a client's map version is not trusted to raise ours.
                let fenced = self.fenced.read().expect("lock").get(&p).copied().unwrap_or(0);
                if frame.header.token == shoal_common::wire::TOKEN_REBUILD && fenced < frame.header.map_version {
                    self.fence_pool_version(p, frame.header.map_version).await;
                }
            }
            let store = self.store(req.target)?;
            // The reply's memory comes from the frame budget before it is
            // read (single values at their stored size), and before the map
            // fence: a read holding the fence never waits for memory that
            // requests queued behind the fence hold.
            let want = {
                let (store, req) = (store.clone(), req.clone());
                tokio::task::spawn_blocking(move || {
                    store.fetch_size(req.cont, req.oid, &req.dkey, req.epoch, &req.iods)
                })
                .await
                .map_err(|e| ShoalError::Internal(format!("fetch task: {e}")))??
            };
            let held = self.budget.take(want.min(MAX_SEGMENT as u64)).await;
            // Held from the map check to the end of the read: shards that
            // live elsewhere now are not dropped under it (`drop_stray`).
            let _fence = self.map_fence.read().await;
            if let Some(p) = req.pool() {
                self.check_map(p, frame.header.map_version)?;
                self.check_serving(p, frame.header.map_version)?;
            }
            if store.is_tombstoned(req.cont) {
                return Err(ShoalError::cont_destroyed(req.cont));
            }
            let span =
                tracing::debug_span!("fetch", pool = %req.pool, cont = %req.cont, oid = %req.oid, target = req.target);
            let r = tokio::task::spawn_blocking(move || {
                let _g = span.enter();
                store.fetch(req.cont, req.oid, &req.dkey, req.epoch, &req.iods)
            })
            .await
            .map_err(|e| ShoalError::Internal(format!("fetch task: {e}")))?;
            drop(held);
            r
        }
        .await;
        let result = result.and_then(|(values, segs, crcs)| {
            let total: usize = segs.iter().map(Bytes::len).sum();
            if total > MAX_SEGMENT as usize {
                return Err(ShoalError::invalid(format!(
                    "the values fetched add up to {total} bytes, above the per-reply cap of {MAX_SEGMENT}; fetch fewer akeys at once"
                )));
            }
            Ok((values, segs, crcs))
        });
        match result {
            Ok((values, segs, crcs)) => {
                reply_frame(&frame.header, self.map_version, Ok(FetchReply { values, crcs }), segs)
            }
            Err(e) => reply_frame::<FetchReply>(&frame.header, self.map_version, Err(e), vec![]),
        }
    }

    async fn list(self: Arc<Self>, req: ListReq) -> Result<ListReply> {
        let store = self.store(req.target)?;
        tokio::task::spawn_blocking(move || {
            store
                .list(
                    req.cont,
                    req.oid,
                    req.epoch,
                    req.dkey.as_deref(),
                    req.anchor.as_deref(),
                    req.limit as usize,
                    LIST_PAGE_BYTES,
                )
                .map(|(keys, anchor)| ListReply { keys, anchor })
        })
        .await
        .map_err(|e| ShoalError::Internal(format!("list task: {e}")))?
    }

    async fn stripe_lock(self: Arc<Self>, r: StripeLockReq) -> Result<()> {
        let lease = Duration::from_millis(r.lease_ms as u64);
        self.locks.lock(r.cont, r.oid, &r.dkey, &r.stripes, r.owner, lease, STRIPE_LOCK_WAIT).await
    }

    async fn target_query(self: Arc<Self>, req: TargetQueryReq) -> Result<TargetQueryReply> {
        let store = self.store(req.target)?;
        tokio::task::spawn_blocking(move || {
            let u = store.usage();
            TargetQueryReply {
                target: store.id(),
                data_bytes: u.data_bytes,
                free_bytes: u.free_bytes,
                space_id: u.space_id,
                poisoned: store.is_poisoned(),
            }
        })
        .await
        .map_err(|e| ShoalError::Internal(format!("query task: {e}")))
    }
}

impl Handler for Service {
    fn handle(self: Arc<Self>, frame: Frame) -> BoxFuture<'static, Frame> {
        Box::pin(self.dispatch(frame))
    }
}
