//! Rebuild: shards of excluded targets are recomputed on their spares, and
//! those of reintegrated targets in place.
//!
//! There is no central list of what to rebuild. Each server in service
//! scans its own object index, target by target; for every dkey it holds
//! of an object whose group (under the current pool map) has a shard still
//! being rebuilt (a spare, or a home that came back), the group's first
//! readable shard is the *source*:
//! if that is this server's target, it sends the spare every version and
//! punch the spare needs, each at its own epoch (`Restore`):
//!
//! - replicated classes (and the single values EC objects keep on shards
//!   `0..=p`): a copy of every version this replica holds;
//! - EC extents: for every extent version, the cell of the spare's index,
//!   decoded byte for byte from `k` cells of the same epoch at the same
//!   offsets (this target's and its peers'), so it works whatever the
//!   object's cell size.
//!
//! A source never misses an acknowledged version: a server that missed a
//! write is declared down before the write is acknowledged, and a down
//! server is never a source. Writes that arrive during rebuild go to the
//! spares directly. When a server has been through all its objects for the
//! pool's current map version, it tells the MS; once every server in
//! service has, the MS drops the targets from the pool's rebuilding list
//! and the spares serve reads. A map change during rebuild (another
//! exclusion) makes every server go through its objects again for the new
//! version.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_common::ec::codec;
use shoal_common::error::Entity;
use shoal_common::mgmt::{PoolInfo, PoolQueryReq, RebuildDoneReq};
use shoal_common::mgmt::{RebuildProgress, RebuildState};
use shoal_common::msg::{FetchIod, FetchReq, Fetched, RestoreHaveReq, RestoreItem, RestoreKind, RestoreReq, ValueKind};
use shoal_common::oclass::{oid_class, Redundancy};
use shoal_common::placement::{dkey_group, Shard, TargetState};
use shoal_common::wire::TOKEN_REBUILD;
use shoal_common::{ContId, Oid, PoolId, Result, ShoalError};
use shoal_net::{call, TcpTransport};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::service::Service;
use crate::store::restore::StoredVersion;
use crate::store::TargetStore;

/// A rebuild job's source that is this server's own copy of a shard,
/// outside the shard's group (a spare given back).
const OWN_COPY: usize = usize::MAX;
/// Objects read from the object index at a time.
const OBJECTS_PER_PAGE: usize = 256;
/// Most bytes one restore request carries.
const RESTORE_BYTES: usize = 8 << 20;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What one server did for one pool's rebuild.
#[derive(Debug, Default, Clone, Copy)]
pub struct Progress {
    pub objects: u64,
    pub versions: u64,
    pub bytes: u64,
    /// Versions not sent: a home coming back held them already.
    pub skipped: u64,
    /// Shards on a draining target that have nowhere to go.
    pub stranded: u64,
}

/// Rebuilds, every second, the pools the MS says are rebuilding, until
/// `stop`.
pub async fn run(service: Arc<Service>, stop: CancellationToken) {
    let t = TcpTransport::default();
    let mut done: HashMap<PoolId, u32> = HashMap::new();
    // Per pool, the map version this server has given back strays for.
    let mut cleaned: HashMap<PoolId, u32> = HashMap::new();
    // Passes made and not reported yet (a draining server reports last).
    let mut passed: HashMap<PoolId, (u32, Progress)> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let Some(rank) = service.rank() else { continue };
        let ms = service.ms_addrs();
        for pool in service.rebuilding() {
            let info = match ask(&t, &ms, &PoolQueryReq { pool: pool.to_string() }).await {
                Ok(i) => i,
                Err(e) => {
                    warn!(%pool, "rebuild: cannot read the pool map: {e}");
                    continue;
                }
            };
            if info.rebuilding.is_empty() || done.get(&pool) == Some(&info.map.version) {
                continue;
            }
            let serving = info.map.targets.iter().any(|t| t.rank == rank && t.state.is_available());
            if !serving {
                continue;
            }
            if service.rebuild_ctl(pool).paused {
                let mut p =
                    service.rebuild_progress().into_iter().find(|p| p.pool == pool).unwrap_or(RebuildProgress {
                        pool,
                        version: info.map.version,
                        state: RebuildState::Paused,
                        objects_done: 0,
                        objects_total: 0,
                        bytes: 0,
                        stranded: 0,
                    });
                p.state = RebuildState::Paused;
                service.set_rebuild_progress(p);
                continue;
            }
            // Writes made with an older map may miss the targets being
            // rebuilt; from here on they are refused, and those already
            // running finish before the pass looks at what is stored.
            service.fence_pool_version(pool, info.map.version).await;
            let started = std::time::Instant::now();
            // A pass already made for this version only waits to report.
            let (pass, fresh) = match passed.get(&pool) {
                Some(&(v, p)) if v == info.map.version => (Ok(p), false),
                _ => (rebuild_pool(&service, &t, &ms, &info, rank, &stop).await, true),
            };
            if let Ok(p) = &pass {
                if p.stranded == 0 {
                    passed.insert(pool, (info.map.version, *p));
                }
            }
            match pass {
                Ok(p) if p.stranded > 0 => {
                    // Not done: the drain would leave these without a copy.
                    // `pool query` says so, and how to get out of it.
                    service.set_rebuild_progress(RebuildProgress {
                        pool,
                        version: info.map.version,
                        state: RebuildState::Scanning,
                        objects_done: p.objects,
                        objects_total: p.objects,
                        bytes: p.bytes,
                        stranded: p.stranded,
                    });
                    warn!(
                        %pool,
                        stranded = p.stranded,
                        "shards on a draining target have nowhere to go (the pool has too few servers for their \
                         class); the drain waits until a server is added"
                    );
                }
                Ok(p) => {
                    let m = &service.metrics;
                    if fresh {
                        m.rebuild_passes.inc();
                        m.rebuild_objects.inc_by(p.objects);
                        m.rebuild_versions.inc_by(p.versions);
                        m.rebuild_bytes.inc_by(p.bytes);
                        m.rebuild_skipped.inc_by(p.skipped);
                        info!(
                            %pool,
                            version = info.map.version,
                            objects = p.objects,
                            versions = p.versions,
                            bytes = p.bytes,
                            skipped = p.skipped,
                            secs = started.elapsed().as_secs_f64(),
                            "rebuild pass done"
                        );
                    }
                    service.set_rebuild_progress(RebuildProgress {
                        pool,
                        version: info.map.version,
                        state: RebuildState::Done,
                        objects_done: p.objects,
                        objects_total: p.objects,
                        bytes: p.bytes,
                        stranded: 0,
                    });
                    // A draining server reports last: the MS then finishes
                    // the drain on its report, and it stops serving the pool
                    // at once, so no reader with an older map gets its
                    // copies after writers have moved on.
                    let draining = info.map.targets.iter().any(|t| t.rank == rank && t.state == TargetState::Drain);
                    if draining && !others_done(&t, &ms, &info, rank).await {
                        continue;
                    }
                    let req = RebuildDoneReq { pool, rank, version: info.map.version };
                    match ask(&t, &ms, &req).await {
                        Ok(r) => {
                            done.insert(pool, info.map.version);
                            if r.drained {
                                service.left_pool(pool, r.version);
                            }
                        }
                        Err(e) => warn!(%pool, "rebuild: cannot report to the MS: {e}"),
                    }
                }
                Err(Stopped::Paused) => info!(%pool, "rebuild paused; it resumes where it stopped"),
                Err(Stopped::Failed(e)) => {
                    service.metrics.rebuild_failures.inc();
                    warn!(%pool, "rebuild pass failed, will try again: {e}");
                }
            }
        }
        // After rebuild, so that no pool at rest holds up another's rebuild.
        reclaim(&service, &t, &ms, rank, &mut cleaned, &stop).await;
    }
}

/// The containers of `pool`: the objects a pass over this server's
/// targets (which every pool shares) may look at for it.
async fn containers_of(t: &TcpTransport, ms: &[String], pool: PoolId) -> Result<std::collections::HashSet<ContId>> {
    let list = ask(t, ms, &shoal_common::mgmt::ContListReq { pool: pool.to_string() }).await?;
    Ok(list.into_iter().map(|c| c.uuid).collect())
}

/// Gives back, in each pool at rest (nothing being rebuilt) whose map
/// changed since, what this server holds of shards that live elsewhere now.
async fn reclaim(
    service: &Arc<Service>,
    t: &TcpTransport,
    ms: &[String],
    rank: u32,
    cleaned: &mut HashMap<PoolId, u32>,
    stop: &CancellationToken,
) {
    let rebuilding = service.rebuilding();
    for (pool, version) in service.pool_versions() {
        if rebuilding.contains(&pool) || cleaned.get(&pool) == Some(&version) {
            continue;
        }
        let Ok(info) = ask(t, ms, &PoolQueryReq { pool: pool.to_string() }).await else { continue };
        if !info.rebuilding.is_empty() || info.map.version != version {
            continue;
        }
        if !info.map.targets.iter().any(|t| t.rank == rank && t.state.is_available()) {
            cleaned.insert(pool, version);
            continue;
        }
        let conts = match containers_of(t, ms, pool).await {
            Ok(c) => c,
            Err(e) => {
                warn!(%pool, "reclaim: cannot list the pool's containers: {e}");
                continue;
            }
        };
        match reclaim_pool(service, &info, &conts, rank, stop).await {
            Ok(Some((objects, bytes))) => {
                cleaned.insert(pool, version);
                service.metrics.reclaimed_bytes.inc_by(bytes);
                service.metrics.reclaim_passes.inc();
                if objects > 0 {
                    info!(%pool, version, objects, bytes, "gave back shards that live elsewhere now");
                }
            }
            // A newer map came meanwhile: the next round looks at it.
            Ok(None) => {}
            // Not again for this version (a poisoned target would fail
            // every pass); the next map change tries again.
            Err(e) => {
                cleaned.insert(pool, version);
                warn!(%pool, "cannot give back shards that live elsewhere now: {e}");
            }
        }
    }
}

/// Some dkeys of an object.
type Dkeys = Vec<Vec<u8>>;

/// One pass of [`reclaim`] over this server's objects of `info`'s pool:
/// the objects it dropped shards of and the bytes freed, or `None` if a
/// newer map came meanwhile (under which the shards might belong here).
async fn reclaim_pool(
    service: &Arc<Service>,
    info: &PoolInfo,
    conts: &std::collections::HashSet<ContId>,
    rank: u32,
    stop: &CancellationToken,
) -> Result<Option<(u64, u64)>> {
    let placement = info.placement();
    let (pool, version) = (info.uuid, info.map.version);
    let (mut objects, mut bytes) = (0, 0);
    for store in service.stores() {
        let mut after = None;
        loop {
            let page = objects_page(store, after).await?;
            let Some(last) = page.last().copied() else { break };
            let mut todo: Vec<(ContId, Oid, Option<Dkeys>)> = Vec::new();
            for (cont, oid) in page {
                if stop.is_cancelled() {
                    return Ok(None);
                }
                // Another pool's object, or a destroyed container's.
                if !conts.contains(&cont) || store.is_tombstoned(cont) {
                    continue;
                }
                let Some(class) = oid_class(oid) else { continue };
                let Ok(layout) = placement.layout(cont, oid, class) else { continue };
                let mine: Vec<bool> =
                    layout.groups.iter().map(|g| g.iter().any(|s| s.rank == rank && s.target == store.id())).collect();
                if mine.iter().all(|&m| m) {
                    continue;
                }
                let whole = !mine.contains(&true);
                let stray = if whole {
                    None
                } else {
                    let store = store.clone();
                    let dkeys = tokio::task::spawn_blocking(move || store.dkeys_of(cont, oid))
                        .await
                        .map_err(|e| ShoalError::Internal(format!("reclaim task: {e}")))??;
                    let n = mine.len() as u32;
                    let stray: Vec<Vec<u8>> = dkeys.into_iter().filter(|d| !mine[dkey_group(d, n) as usize]).collect();
                    if stray.is_empty() {
                        continue;
                    }
                    Some(stray)
                };
                todo.push((cont, oid, stray));
            }
            // A page's strays go at once: one pause of this server's
            // requests per page, not per object.
            if !todo.is_empty() {
                let (st, n) = (store.clone(), todo.len() as u64);
                let drop = move || -> Result<u64> {
                    let mut freed = 0;
                    for (cont, oid, stray) in todo {
                        freed += st.drop_shards(cont, oid, stray.as_deref())?;
                    }
                    Ok(freed)
                };
                match service.drop_stray(pool, version, drop).await? {
                    Some(freed) => {
                        objects += n;
                        bytes += freed;
                    }
                    None => return Ok(None),
                }
            }
            after = Some(last);
        }
    }
    Ok(Some((objects, bytes)))
}

/// Whether every other server in service has reported its pass for
/// `info`'s map version (checked once: the caller tries again on its next
/// round, without holding up other pools).
async fn others_done(t: &TcpTransport, ms: &[String], info: &PoolInfo, rank: u32) -> bool {
    let Ok(now) = ask(t, ms, &PoolQueryReq { pool: info.uuid.to_string() }).await else { return false };
    // (Of several draining servers, the highest rank reports last.)
    now.map.version == info.map.version
        && now
            .map
            .targets
            .iter()
            .filter(|t| t.state.is_available() && t.rank != rank && !(t.state == TargetState::Drain && t.rank > rank))
            .all(|t| now.rebuilt_by.contains(&t.rank))
}

async fn ask<R: shoal_common::msg::Rpc>(t: &TcpTransport, ms: &[String], req: &R) -> Result<R::Reply> {
    crate::member::ask_ms(t, ms, req, CALL_TIMEOUT).await
}

/// Why a pass ended before it was through.
enum Stopped {
    /// An operator paused the pool's rebuild (or the server is stopping).
    Paused,
    Failed(ShoalError),
}

impl From<ShoalError> for Stopped {
    fn from(e: ShoalError) -> Self {
        Stopped::Failed(e)
    }
}

/// Where a pass got to on one target, saved so that a restarted server
/// resumes a pass for the same map version instead of starting over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    version: u32,
    after: (ContId, Oid),
    /// Objects of this target gone through up to `after`.
    done: u64,
}

impl Cursor {
    fn path(store: &TargetStore, pool: PoolId) -> std::path::PathBuf {
        store.dir().join(format!("rebuild-{pool}.cursor"))
    }

    fn load(store: &TargetStore, pool: PoolId) -> Option<Cursor> {
        let text = std::fs::read_to_string(Cursor::path(store, pool)).ok()?;
        let f: Vec<&str> = text.split_whitespace().collect();
        let [v, c, hi, lo, done] = f[..] else { return None };
        Some(Cursor {
            version: v.parse().ok()?,
            after: (ContId(c.parse().ok()?), Oid::new(hi.parse().ok()?, lo.parse().ok()?)),
            done: done.parse().ok()?,
        })
    }

    /// Best effort: a lost cursor only means going through objects again.
    fn save(&self, store: &TargetStore, pool: PoolId) {
        let (c, o) = self.after;
        let text = format!("{} {} {} {} {}\n", self.version, c.0, o.hi, o.lo, self.done);
        let path = Cursor::path(store, pool);
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            warn!(%pool, "cannot save the rebuild cursor: {e}");
        }
    }

    fn clear(store: &TargetStore, pool: PoolId) {
        let _ = std::fs::remove_file(Cursor::path(store, pool));
    }
}

/// Keeps rebuild to its pace: a fixed rate, or (automatic) at most 30%
/// of the server's time while clients are using it.
struct Pace {
    started: std::time::Instant,
    sent: u64,
    foreground: u64,
}

impl Pace {
    fn new(service: &Service) -> Pace {
        let foreground = service.foreground_bytes.load(std::sync::atomic::Ordering::Relaxed);
        Pace { started: std::time::Instant::now(), sent: 0, foreground }
    }

    /// How long to wait after sending `bytes` in `took`.
    fn wait(&mut self, service: &Service, pool: PoolId, bytes: u64, took: Duration) -> Duration {
        self.sent += bytes;
        let rate = service.rebuild_ctl(pool).rate_mib;
        if rate > 0 {
            let due = Duration::from_secs_f64(self.sent as f64 / (f64::from(rate) * (1 << 20) as f64));
            return due.saturating_sub(self.started.elapsed());
        }
        let now = service.foreground_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let busy = now != self.foreground;
        self.foreground = now;
        if busy {
            took.mul_f64(7.0 / 3.0)
        } else {
            Duration::ZERO
        }
    }
}

/// The next page of a target's object index after `after`.
async fn objects_page(store: &Arc<TargetStore>, after: Option<(ContId, Oid)>) -> Result<Vec<(ContId, Oid)>> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.objects_after(after, OBJECTS_PER_PAGE))
        .await
        .map_err(|e| ShoalError::Internal(format!("object index task: {e}")))?
}

/// Counts the objects of a target (the work of a pass).
async fn count_objects(store: &Arc<TargetStore>) -> Result<u64> {
    let mut after = None;
    let mut n = 0;
    loop {
        let page = objects_page(store, after).await?;
        let Some(last) = page.last().copied() else { return Ok(n) };
        n += page.len() as u64;
        after = Some(last);
    }
}

/// One pass over this server's objects for `info`'s map, resumed where a
/// pass for the same version stopped.
async fn rebuild_pool(
    service: &Arc<Service>,
    t: &TcpTransport,
    ms: &[String],
    info: &PoolInfo,
    rank: u32,
    stop: &CancellationToken,
) -> std::result::Result<Progress, Stopped> {
    let placement = info.placement();
    let pool = info.uuid;
    // Every pool shares the targets: only this pool's objects are looked at
    // (a container made during the pass wrote to the new layout anyway).
    let conts = containers_of(t, ms, pool).await?;
    let version = info.map.version;
    let mut p = Progress::default();
    let mut progress = RebuildProgress {
        pool,
        version,
        state: RebuildState::Scanning,
        objects_done: 0,
        objects_total: 0,
        bytes: 0,
        stranded: 0,
    };
    let mut starts = Vec::new();
    for store in service.stores() {
        progress.objects_total += count_objects(store).await?;
        let cursor = Cursor::load(store, pool).filter(|c| c.version == version);
        progress.objects_done += cursor.map_or(0, |c| c.done);
        starts.push(cursor);
    }
    if starts.iter().any(Option::is_some) {
        info!(%pool, version, done = progress.objects_done, "rebuild resumes where it stopped");
    }
    service.set_rebuild_progress(progress);
    let mut pace = Pace::new(service);
    for (store, start) in service.stores().iter().zip(starts) {
        let mut after = start.map(|c| c.after);
        let mut done_here = start.map_or(0, |c| c.done);
        loop {
            let page = objects_page(store, after).await?;
            let Some(last) = page.last().copied() else { break };
            for (cont, oid) in page.iter().copied() {
                if stop.is_cancelled() || service.rebuild_ctl(pool).paused {
                    progress.state = RebuildState::Paused;
                    service.set_rebuild_progress(progress);
                    return Err(Stopped::Paused);
                }
                progress.objects_done += 1;
                done_here += 1;
                if !conts.contains(&cont) || store.is_tombstoned(cont) {
                    continue;
                }
                let Some(class) = oid_class(oid) else { continue };
                let Ok(layout) = placement.layout(cont, oid, class) else { continue };
                p.objects += 1;
                let dkeys = {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || store.dkeys_of(cont, oid))
                        .await
                        .map_err(|e| ShoalError::Internal(format!("rebuild task: {e}")))??
                };
                for dkey in dkeys {
                    let group = &layout.groups[dkey_group(&dkey, layout.groups.len() as u32) as usize];
                    let is_me = |s: &Shard| s.rank == rank && s.target == store.id();
                    let draining = |s: &Shard| {
                        info.map
                            .targets
                            .iter()
                            .any(|t| t.rank == s.rank && t.index == s.target && t.state == TargetState::Drain)
                    };
                    p.stranded += group.iter().filter(|s| is_me(s) && s.shadow.is_none() && draining(s)).count() as u64;
                    // The source of a spare: the group's first readable
                    // shard (a home, or a spare rebuilt earlier when a home
                    // is away).
                    let first = group.iter().position(|s| s.readable);
                    // (shard index, where it goes, index of its source)
                    let mut jobs: Vec<(usize, Shard, usize)> = Vec::new();
                    for (i, s) in group.iter().enumerate() {
                        if !s.readable && s.available {
                            jobs.extend(first.map(|f| (i, *s, f)));
                        }
                        // A shard that moves once a drain is done is copied
                        // from itself (or, if it is not readable, like a spare).
                        if let Some((r, t)) = s.shadow {
                            let to = Shard {
                                rank: r,
                                target: t,
                                available: true,
                                spare: true,
                                readable: false,
                                shadow: None,
                            };
                            // (With no readable copy, nothing is sent: the MS
                            // finishes no extension while a server is down.)
                            jobs.extend(if s.readable { Some(i) } else { first }.map(|src| (i, to, src)));
                        }
                    }
                    // A home back in place whose group has no readable copy
                    // (a single-copy class) is filled from a copy this
                    // server holds outside the group: the spare it had while
                    // it was away, which took the writes meanwhile (it is
                    // given back only once the pool is at rest).
                    let outside = !group.iter().any(is_me);
                    if first.is_none() && outside && !matches!(class.redundancy, Redundancy::Ec { .. }) {
                        for (i, s) in group.iter().enumerate() {
                            if !s.readable && s.available && !s.spare && s.shadow.is_none() {
                                jobs.push((i, *s, OWN_COPY));
                            }
                        }
                    }
                    jobs.retain(|&(_, _, src)| src == OWN_COPY || is_me(&group[src]));
                    if jobs.is_empty() {
                        continue;
                    }
                    // A home coming back (not a spare) still holds what it
                    // had before it went away: it is asked which versions
                    // those are, and sent only the others.
                    let mut held: Vec<HashSet<VersionKey>> = vec![HashSet::new(); jobs.len()];
                    if jobs.iter().any(|(_, to, _)| !to.spare) {
                        let (store, d) = (store.clone(), dkey.clone());
                        let heads =
                            tokio::task::spawn_blocking(move || store.versions_where(cont, oid, &d, &|_| false))
                                .await
                                .map_err(|e| ShoalError::Internal(format!("rebuild task: {e}")))??;
                        let heads: Vec<RestoreItem> = heads.into_iter().map(|v| v.item).collect();
                        for (j, &(_, to, _)) in jobs.iter().enumerate() {
                            if !to.spare {
                                held[j] = holds(t, info, to, cont, oid, &dkey, &heads).await?;
                            }
                        }
                    }
                    let versions = {
                        let (store, dkey) = (store.clone(), dkey.clone());
                        let held = held.clone();
                        let wanted = move |i: &RestoreItem| held.iter().any(|h| !h.contains(&version_key(i)));
                        tokio::task::spawn_blocking(move || store.versions_where(cont, oid, &dkey, &wanted))
                            .await
                            .map_err(|e| ShoalError::Internal(format!("rebuild task: {e}")))??
                    };
                    for (j, &(idx, spare, me)) in jobs.iter().enumerate() {
                        let (versions, had): (Vec<StoredVersion>, Vec<StoredVersion>) =
                            versions.iter().cloned().partition(|v| !held[j].contains(&version_key(&v.item)));
                        p.skipped += had.len() as u64;
                        if versions.is_empty() {
                            continue;
                        }
                        let items = match class.redundancy {
                            // The shard itself, or this server's copy outside
                            // the group: what it holds is what goes.
                            _ if me == idx || me == OWN_COPY => versions,
                            Redundancy::None => continue,
                            Redundancy::Replicas(_) => versions,
                            Redundancy::Ec { k, p: par } => {
                                ec_items(t, info, store, cont, oid, &dkey, group, me, idx, k, par, &versions).await?
                            }
                        };
                        let bytes = items.iter().map(|v| v.data.len() as u64).sum::<u64>();
                        p.versions += items.len() as u64;
                        p.bytes += bytes;
                        progress.bytes += bytes;
                        progress.state = RebuildState::Pulling;
                        service.set_rebuild_progress(progress);
                        let sent = std::time::Instant::now();
                        send(t, info, spare, cont, oid, &dkey, items).await?;
                        let until = std::time::Instant::now() + pace.wait(service, pool, bytes, sent.elapsed());
                        while std::time::Instant::now() < until
                            && !stop.is_cancelled()
                            && !service.rebuild_ctl(pool).paused
                        {
                            progress.state = RebuildState::Throttled;
                            service.set_rebuild_progress(progress);
                            let left = until.saturating_duration_since(std::time::Instant::now());
                            tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                        }
                    }
                }
                if progress.state != RebuildState::Scanning {
                    // Something was sent for this object: remember it.
                    if p.stranded == 0 {
                        Cursor { version, after: (cont, oid), done: done_here }.save(store, pool);
                    }
                    progress.state = RebuildState::Scanning;
                }
                service.set_rebuild_progress(progress);
            }
            after = Some(last);
            // (A pass that found stranded shards is not resumed: it must
            // find them again to hold the drain.)
            if p.stranded == 0 {
                Cursor { version, after: last, done: done_here }.save(store, pool);
            }
        }
    }
    for store in service.stores() {
        Cursor::clear(store, pool);
    }
    Ok(p)
}

/// What tells two copies of a version apart: its akey, kind (with the
/// extent's start) and epoch, and for a single value its checksum (a
/// max-value update rewrites one in place). (An EC cell's bytes, and so
/// its checksum, differ from shard to shard.)
type VersionKey = (Vec<u8>, RestoreKind, shoal_common::Epoch, u32);

fn version_key(i: &RestoreItem) -> VersionKey {
    let crc = if i.kind == RestoreKind::Single { i.crc } else { 0 };
    (i.akey.clone(), i.kind, i.epoch, crc)
}

/// The address of `rank` in `info`'s pool.
fn addr_of(info: &PoolInfo, rank: u32) -> Result<String> {
    info.addrs
        .iter()
        .find(|(r, _)| *r == rank)
        .map(|(_, a)| a.clone())
        .ok_or_else(|| ShoalError::not_found(Entity::Server, format!("no address for rank {rank}")))
}

/// The versions among `heads` that the target of `to` holds already.
#[allow(clippy::too_many_arguments)]
async fn holds(
    t: &TcpTransport,
    info: &PoolInfo,
    to: Shard,
    cont: ContId,
    oid: Oid,
    dkey: &[u8],
    heads: &[RestoreItem],
) -> Result<HashSet<VersionKey>> {
    let addr = addr_of(info, to.rank)?;
    let mut out = HashSet::new();
    for batch in heads.chunks(512) {
        let req = RestoreHaveReq {
            pool: info.uuid,
            rank: to.rank,
            target: to.target,
            cont,
            oid,
            dkey: dkey.to_vec(),
            items: batch.to_vec(),
        };
        let (have, _) = call(t, &addr, &req, vec![], info.map.version, TOKEN_REBUILD, CALL_TIMEOUT).await?;
        if have.len() != batch.len() {
            return Err(ShoalError::protocol(format!(
                "rank {} answered {} flags for {} versions",
                to.rank,
                have.len(),
                batch.len()
            )));
        }
        out.extend(batch.iter().zip(have).filter(|(_, h)| *h).map(|(i, _)| version_key(i)));
    }
    Ok(out)
}

/// What an EC spare at shard index `idx` needs of one dkey: its cell of
/// every extent version (decoded), the single values if it holds copies
/// (`idx <= p`), and every punch.
#[allow(clippy::too_many_arguments)]
async fn ec_items(
    t: &TcpTransport,
    info: &PoolInfo,
    store: &TargetStore,
    cont: ContId,
    oid: Oid,
    dkey: &[u8],
    group: &[Shard],
    me: usize,
    idx: usize,
    k: u8,
    p: u8,
    versions: &[StoredVersion],
) -> Result<Vec<StoredVersion>> {
    let (k, n) = (k as usize, k as usize + p as usize);
    let rs = codec(k as u32, p as u32)?;
    let mut out = Vec::new();
    for v in versions {
        match v.item.kind {
            RestoreKind::Single if idx > p as usize => {}
            RestoreKind::Extent { start } => {
                let len = v.data.len() as u64;
                let mut cells: Vec<Option<Vec<u8>>> = vec![None; n];
                cells[me] = Some(v.data.to_vec());
                let mut have = 1;
                // Peers that could not answer: with them, the version might
                // have had k cells, so it is not skipped but tried again.
                let mut failed: Vec<String> = Vec::new();
                for (j, sh) in group.iter().enumerate() {
                    if have >= k {
                        break;
                    }
                    if j == me || j == idx || !sh.readable {
                        continue;
                    }
                    let req = FetchReq {
                        pool: info.uuid,
                        rank: sh.rank,
                        target: sh.target,
                        cont,
                        oid,
                        dkey: dkey.to_vec(),
                        epoch: v.item.epoch,
                        iods: vec![FetchIod {
                            akey: v.item.akey.clone(),
                            kind: ValueKind::Array { rec_size: 1, start, nr: len },
                        }],
                    };
                    let Some(addr) = info.addrs.iter().find(|(r, _)| *r == sh.rank).map(|(_, a)| a.as_str()) else {
                        continue;
                    };
                    let (r, segs) =
                        match call(t, addr, &req, vec![], info.map.version, TOKEN_REBUILD, CALL_TIMEOUT).await {
                            Ok(x) => x,
                            Err(e) => {
                                failed.push(format!("rank {}: {e}", sh.rank));
                                continue;
                            }
                        };
                    if let Err(e) = r.verify(&segs) {
                        failed.push(format!("rank {}: {e}", sh.rank));
                        continue;
                    }
                    // Only a cell of the same write (same epoch) decodes.
                    if let (Some(Fetched::Array { epoch, .. }), Some(b)) = (r.values.first(), segs.first()) {
                        if *epoch == v.item.epoch && b.len() as u64 == len {
                            cells[j] = Some(b.to_vec());
                            have += 1;
                        }
                    }
                }
                if have < k {
                    if !failed.is_empty() {
                        return Err(ShoalError::Unreachable(format!(
                            "object {oid}: cannot read enough cells of epoch {} to rebuild: {}",
                            v.item.epoch,
                            failed.join("; ")
                        )));
                    }
                    // Fewer than k cells of this version exist: it was never
                    // acknowledged (a failed write); nothing to rebuild.
                    continue;
                }
                let cell = if idx < k {
                    rs.reconstruct(&mut cells)?;
                    cells[idx].take().unwrap_or_default()
                } else {
                    rs.reconstruct(&mut cells)?;
                    let data: Vec<&[u8]> = cells[..k].iter().map(|c| c.as_deref().unwrap_or(&[])).collect();
                    rs.encode(&data)?.swap_remove(idx - k)
                };
                let mut item = v.item.clone();
                item.crc = crc32c::crc32c(&cell);
                out.push(StoredVersion { item, data: Bytes::from(cell) });
            }
            _ => out.push(v.clone()),
        }
    }
    let _ = store;
    Ok(out)
}

/// Sends versions to a spare, a request of at most [`RESTORE_BYTES`] at a
/// time.
async fn send(
    t: &TcpTransport,
    info: &PoolInfo,
    spare: Shard,
    cont: ContId,
    oid: Oid,
    dkey: &[u8],
    items: Vec<StoredVersion>,
) -> Result<()> {
    let addr = addr_of(info, spare.rank)?;
    let mut batch: Vec<RestoreItem> = Vec::new();
    let mut segs: Vec<Bytes> = Vec::new();
    let mut bytes = 0;
    let flush = |batch: Vec<RestoreItem>, segs: Vec<Bytes>| {
        let req = RestoreReq {
            pool: info.uuid,
            rank: spare.rank,
            target: spare.target,
            cont,
            oid,
            dkey: dkey.to_vec(),
            items: batch,
        };
        let addr = addr.clone();
        async move { call(t, &addr, &req, segs, info.map.version, TOKEN_REBUILD, CALL_TIMEOUT).await.map(|_| ()) }
    };
    for v in items {
        if !batch.is_empty() && (bytes + v.data.len() > RESTORE_BYTES || batch.len() >= 512) {
            flush(std::mem::take(&mut batch), std::mem::take(&mut segs)).await?;
            bytes = 0;
        }
        bytes += v.data.len();
        batch.push(v.item);
        segs.push(v.data);
    }
    if !batch.is_empty() {
        flush(batch, segs).await?;
    }
    Ok(())
}
