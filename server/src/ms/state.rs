//! The management service's state machine.
//!
//! Deterministic: [`MsState::apply`] depends only on the state and the
//! command (identities and clocks travel inside commands), so the same log
//! gives the same state on every replica. That is what lets a later issue
//! replicate the MS with Raft without a redesign. No I/O here.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use shoal_common::error::Entity;
use shoal_common::mgmt::{ContInfo, ContProps, Health, JoinReq, PoolInfo};
use shoal_common::oclass::ObjectClass;
use shoal_common::placement::{PoolMap, PoolTarget, TargetState};
use shoal_common::{ContId, PoolId, Result, ShoalError};

/// One command of the MS log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Join(JoinReq),
    PoolCreate {
        uuid: PoolId,
        label: String,
        ranks: Vec<u32>,
        targets_per_server: u32,
    },
    PoolDestroy {
        pool: PoolId,
        force: bool,
    },
    PoolExtend {
        pool: PoolId,
        ranks: Vec<u32>,
    },
    ContCreate {
        pool: PoolId,
        uuid: ContId,
        label: String,
        props: ContProps,
    },
    ContDestroy {
        pool: PoolId,
        cont: ContId,
    },
    OidAlloc {
        pool: PoolId,
        cont: ContId,
        count: u64,
    },
    /// A client asks for a clock tag (or renews its lease on one), at the
    /// MS's time `now_ms`.
    ClientHello {
        owner: u128,
        renew: Option<u16>,
        now_ms: u64,
    },
    /// A server is declared down (its targets turn `DOWN` in every pool),
    /// at the MS's time `now_ms`.
    MarkDown {
        rank: u32,
        now_ms: u64,
    },
    /// A down server is excluded (its `DOWN` targets turn `DOWNOUT`).
    Exclude {
        rank: u32,
    },
    /// A down or excluded server comes back into a pool (every pool when
    /// `pool` is `None`): its targets turn `UP` and are rebuilt.
    Reintegrate {
        pool: Option<PoolId>,
        rank: u32,
    },
    /// A server rebuilt what it was the source of, for pool map `version`.
    RebuildDone {
        pool: PoolId,
        rank: u32,
        version: u32,
    },
    /// Stops or starts a pool's rebuild, or sets its pace (`None`:
    /// unchanged).
    SetRebuild {
        pool: PoolId,
        paused: Option<bool>,
        rate_mib: Option<u32>,
        accept_loss: Option<bool>,
    },
    /// A server's targets in a pool (every pool when `pool` is `None`)
    /// start draining: they keep serving while their shards are copied to
    /// where they go, then turn `DOWNOUT`.
    Drain {
        pool: Option<PoolId>,
        rank: u32,
    },
    /// `cmd` under its caller's operation id: applied once, however often
    /// it is proposed (a caller that lost the answer, to a leader change,
    /// proposes it again and gets the first outcome back).
    Once {
        op: OpId,
        cmd: Box<Command>,
    },
}

/// An operation id: the same for every try of one change by its caller,
/// so that a change retried after its answer was lost is applied once.
pub type OpId = u128;

/// How many changes' outcomes the state keeps for their retries.
pub const OPS_KEPT: usize = 4096;

/// Outcomes of the latest changes made under an operation id, oldest
/// first; the oldest are forgotten past [`OPS_KEPT`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ops {
    order: VecDeque<OpId>,
    outcomes: BTreeMap<OpId, Outcome>,
}

impl Ops {
    /// What the change `op` gave, if it was applied (and not forgotten).
    pub fn get(&self, op: OpId) -> Option<&Outcome> {
        self.outcomes.get(&op)
    }

    fn remember(&mut self, op: OpId, out: Outcome) {
        self.order.push_back(op);
        self.outcomes.insert(op, out);
        while self.order.len() > OPS_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Rank(u32),
    Pool(PoolInfo),
    Cont(ContInfo),
    FirstOid(u128),
    ClientTag(u16),
    RebuildCtl(shoal_common::mgmt::RebuildCtl),
    Done,
    /// A rank's rebuild report finished its drain: its targets in the pool
    /// turned `DOWNOUT`.
    Drained(bool),
}

/// A server known to the system: its rank and what it said when it last
/// joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRec {
    pub rank: u32,
    pub join: JoinReq,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContRec {
    pub uuid: ContId,
    pub label: String,
    pub props: ContProps,
    pub health: Health,
    /// Next free object sequence number; 0..16 are reserved for
    /// well-known objects (the name index is sequence 1).
    pub next_seq: u128,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRec {
    pub uuid: PoolId,
    pub label: String,
    pub map: PoolMap,
    pub containers: BTreeMap<ContId, ContRec>,
}

/// Object sequence numbers below this are reserved for well-known objects.
pub const FIRST_USER_SEQ: u128 = 16;

/// Clock tags handed to clients cycle through 1..=MAX_CLIENT_TAG (tag 0
/// is the servers').
pub const MAX_CLIENT_TAG: u64 = (1 << shoal_common::hlc::TAG_BITS) - 1;

/// How long a client holds its clock tag without renewing it.
pub const TAG_LEASE_MS: u64 = 60_000;

/// Who holds a clock tag, and until when (MS time, ms since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagLease {
    pub owner: u128,
    pub until_ms: u64,
}

/// The whole MS state (format 5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsState {
    pub members: BTreeMap<u32, MemberRec>,
    pub pools: BTreeMap<PoolId, PoolRec>,
    /// Index of the last applied log entry.
    pub applied: u64,
    /// Clients that have been given a tag so far; the search for a free tag
    /// starts at `1 + clients % MAX_CLIENT_TAG`.
    pub clients: u64,
    /// Clock tags held by clients, with their leases: a tag is never handed
    /// to a second client while its lease runs.
    pub tags: BTreeMap<u16, TagLease>,
    /// Destroyed containers, in order of destruction: servers learn of
    /// them from heartbeats, refuse their writes and give back their space.
    pub tombstones: Vec<ContId>,
    /// Ranks declared down and not excluded yet, with when (MS time, ms).
    pub down: BTreeMap<u32, u64>,
    /// Ranks excluded.
    pub excluded: std::collections::BTreeSet<u32>,
    /// Per pool: excluded targets whose shards are not rebuilt yet.
    pub rebuilding: BTreeMap<PoolId, Vec<(u32, u32)>>,
    /// Per pool: the map version being rebuilt for and the ranks done with
    /// it.
    pub rebuild_done: BTreeMap<PoolId, (u32, std::collections::BTreeSet<u32>)>,
    /// Per pool: how rebuild runs, where an operator changed it.
    pub rebuild_ctl: BTreeMap<PoolId, shoal_common::mgmt::RebuildCtl>,
    /// Outcomes of recent changes, by operation id (see [`Command::Once`]).
    pub ops: Ops,
}

/// The MS state as format 4 stored it (no operation ids);
/// [`MsStateV4::migrate`] brings it to the current format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsStateV4 {
    pub members: BTreeMap<u32, MemberRec>,
    pub pools: BTreeMap<PoolId, PoolRec>,
    pub applied: u64,
    pub clients: u64,
    pub tags: BTreeMap<u16, TagLease>,
    pub tombstones: Vec<ContId>,
    pub down: BTreeMap<u32, u64>,
    pub excluded: std::collections::BTreeSet<u32>,
    pub rebuilding: BTreeMap<PoolId, Vec<(u32, u32)>>,
    pub rebuild_done: BTreeMap<PoolId, (u32, std::collections::BTreeSet<u32>)>,
    pub rebuild_ctl: BTreeMap<PoolId, shoal_common::mgmt::RebuildCtl>,
}

impl MsStateV4 {
    /// The same state in the current format, remembering no change's
    /// outcome yet.
    pub fn migrate(self) -> MsState {
        MsState {
            members: self.members,
            pools: self.pools,
            applied: self.applied,
            clients: self.clients,
            tags: self.tags,
            tombstones: self.tombstones,
            down: self.down,
            excluded: self.excluded,
            rebuilding: self.rebuilding,
            rebuild_done: self.rebuild_done,
            rebuild_ctl: self.rebuild_ctl,
            ops: Ops::default(),
        }
    }
}

/// The MS state as format 3 stored it (targets without the order they
/// joined in); [`MsStateV3::migrate`] brings it to the current format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsStateV3 {
    pub members: BTreeMap<u32, MemberRec>,
    pub pools: BTreeMap<PoolId, PoolRecV3>,
    pub applied: u64,
    pub clients: u64,
    pub tags: BTreeMap<u16, TagLease>,
    pub tombstones: Vec<ContId>,
    pub down: BTreeMap<u32, u64>,
    pub excluded: std::collections::BTreeSet<u32>,
    pub rebuilding: BTreeMap<PoolId, Vec<(u32, u32)>>,
    pub rebuild_done: BTreeMap<PoolId, (u32, std::collections::BTreeSet<u32>)>,
    pub rebuild_ctl: BTreeMap<PoolId, shoal_common::mgmt::RebuildCtl>,
}

/// A pool as format 3 stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecV3 {
    pub uuid: PoolId,
    pub label: String,
    pub map: PoolMapV3,
    pub containers: BTreeMap<ContId, ContRec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMapV3 {
    pub version: u32,
    /// (rank, index, state, out_seq)
    pub targets: Vec<(u32, u32, TargetState, u32)>,
}

impl MsStateV3 {
    /// The same state in the current format: every target is one the pool
    /// was created with (format 3 had no extension that joined).
    pub fn migrate(self) -> MsState {
        let pools = self
            .pools
            .into_iter()
            .map(|(id, p)| {
                let targets = p
                    .map
                    .targets
                    .into_iter()
                    .map(|(r, i, s, out_seq)| PoolTarget { out_seq, ..PoolTarget::new(r, i, s) })
                    .collect();
                let map = PoolMap { version: p.map.version, targets };
                (id, PoolRec { uuid: p.uuid, label: p.label, map, containers: p.containers })
            })
            .collect();
        MsState {
            members: self.members,
            pools,
            applied: self.applied,
            clients: self.clients,
            tags: self.tags,
            tombstones: self.tombstones,
            down: self.down,
            excluded: self.excluded,
            rebuilding: self.rebuilding,
            rebuild_done: self.rebuild_done,
            rebuild_ctl: self.rebuild_ctl,
            ops: Ops::default(),
        }
    }
}

/// The MS state as format 2 stored it (targets without an exclusion order,
/// no rebuild controls); [`MsStateV2::migrate`] brings it to the current
/// format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsStateV2 {
    pub members: BTreeMap<u32, MemberRec>,
    pub pools: BTreeMap<PoolId, PoolRecV1>,
    pub applied: u64,
    pub clients: u64,
    pub tags: BTreeMap<u16, TagLease>,
    pub tombstones: Vec<ContId>,
    pub down: BTreeMap<u32, u64>,
    pub excluded: std::collections::BTreeSet<u32>,
    pub rebuilding: BTreeMap<PoolId, Vec<(u32, u32)>>,
    pub rebuild_done: BTreeMap<PoolId, (u32, std::collections::BTreeSet<u32>)>,
}

impl MsStateV2 {
    /// The same state in the current format. Excluded targets get an
    /// exclusion order by target (format 2 did not keep theirs).
    pub fn migrate(self) -> MsState {
        let mut pools: BTreeMap<PoolId, PoolRec> = self.pools.into_iter().map(|(id, p)| (id, p.migrate())).collect();
        for p in pools.values_mut() {
            let mut seq = 0;
            for t in p.map.targets.iter_mut().filter(|t| t.state == TargetState::DownOut) {
                seq += 1;
                t.out_seq = seq;
            }
        }
        MsState {
            members: self.members,
            pools,
            applied: self.applied,
            clients: self.clients,
            tags: self.tags,
            tombstones: self.tombstones,
            down: self.down,
            excluded: self.excluded,
            rebuilding: self.rebuilding,
            rebuild_done: self.rebuild_done,
            rebuild_ctl: BTreeMap::new(),
            ops: Ops::default(),
        }
    }
}

/// The MS state as format 1 stored it; [`MsStateV1::migrate`] brings it to
/// the current format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsStateV1 {
    pub members: BTreeMap<u32, MemberRec>,
    pub pools: BTreeMap<PoolId, PoolRecV1>,
    pub applied: u64,
}

/// A pool as format 1 stored it (targets without an exclusion order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecV1 {
    pub uuid: PoolId,
    pub label: String,
    pub map: PoolMapV1,
    pub containers: BTreeMap<ContId, ContRec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMapV1 {
    pub version: u32,
    pub targets: Vec<(u32, u32, TargetState)>,
}

impl PoolRecV1 {
    fn migrate(self) -> PoolRec {
        // Format 1 had no exclusions: every target gets order 0.
        let targets = self.map.targets.into_iter().map(|(r, i, s)| PoolTarget::new(r, i, s)).collect();
        PoolRec {
            uuid: self.uuid,
            label: self.label,
            map: PoolMap { version: self.map.version, targets },
            containers: self.containers,
        }
    }
}

impl MsStateV1 {
    /// The same state in the current format: no client has a tag yet and
    /// no destroyed container is remembered.
    pub fn migrate(self) -> MsState {
        MsState {
            members: self.members,
            pools: self.pools.into_iter().map(|(id, p)| (id, p.migrate())).collect(),
            applied: self.applied,
            clients: 0,
            tags: BTreeMap::new(),
            tombstones: Vec::new(),
            down: BTreeMap::new(),
            excluded: Default::default(),
            rebuilding: BTreeMap::new(),
            rebuild_done: BTreeMap::new(),
            rebuild_ctl: BTreeMap::new(),
            ops: Ops::default(),
        }
    }
}

impl MsState {
    /// Applies one command. On error the state is unchanged.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome> {
        let mut next = self.clone();
        let out = next.apply_inner(cmd)?;
        next.applied += 1;
        *self = next;
        Ok(out)
    }

    fn apply_inner(&mut self, cmd: &Command) -> Result<Outcome> {
        match cmd {
            Command::Once { cmd: inner, .. } if matches!(**inner, Command::Once { .. }) => {
                Err(ShoalError::invalid("an operation id wraps one change, not another operation"))
            }
            Command::Once { op, cmd } => {
                if let Some(out) = self.ops.get(*op) {
                    return Ok(out.clone());
                }
                let out = self.apply_inner(cmd)?;
                self.ops.remember(*op, out.clone());
                Ok(out)
            }
            Command::Join(j) => Ok(Outcome::Rank(self.join(j)?)),
            Command::PoolCreate { uuid, label, ranks, targets_per_server } => {
                self.pool_create(*uuid, label, ranks, *targets_per_server).map(Outcome::Pool)
            }
            Command::PoolDestroy { pool, force } => {
                let p = self.pool(*pool)?;
                if !p.containers.is_empty() && !force {
                    return Err(ShoalError::invalid(format!(
                        "pool {} holds {} containers; destroy them first or force",
                        p.label,
                        p.containers.len()
                    )));
                }
                if let Some(p) = self.pools.remove(pool) {
                    self.tombstones.extend(p.containers.keys());
                }
                self.rebuild_ctl.remove(pool);
                self.rebuilding.remove(pool);
                self.rebuild_done.remove(pool);
                Ok(Outcome::Done)
            }
            Command::PoolExtend { pool, ranks } => {
                let mut ranks = ranks.clone();
                ranks.sort_unstable();
                ranks.dedup();
                let p = self.pool(*pool)?;
                if let Some(t) = p.map.targets.iter().find(|t| t.state == TargetState::Drain) {
                    return Err(ShoalError::invalid(format!(
                        "rank {} is being drained from this pool; extend it once the drain is done",
                        t.rank
                    )));
                }
                // One extension at a time: the shards each joining target
                // takes depend on the whole set that joins.
                if let Some(t) = p.map.targets.iter().find(|t| t.state == TargetState::New) {
                    return Err(ShoalError::invalid(format!(
                        "rank {} is still joining pool {} (an extension in progress, or paused while a joining \
                         server is down); extend it again once that is done",
                        t.rank, p.label
                    )));
                }
                for r in &ranks {
                    let m = self
                        .members
                        .get(r)
                        .ok_or_else(|| ShoalError::not_found(Entity::Server, format!("rank {r}")))?
                        .clone();
                    let p = self.pool_mut(*pool)?;
                    if p.map.targets.iter().any(|t| t.rank == *r) {
                        return Err(ShoalError::invalid(format!("rank {r} is in pool {} already", p.label)));
                    }
                    p.map.targets.extend((0..m.join.targets).map(|index| PoolTarget::new(*r, index, TargetState::New)));
                }
                // The new servers' targets join the layout once the shards
                // that move there are copied (a rebuild pass of the servers
                // in service); if one of them is down, once it is back.
                if !self.resume_joining(*pool) {
                    self.pool_mut(*pool)?.map.version += 1;
                }
                self.pool_info(*pool).map(Outcome::Pool)
            }
            Command::ContCreate { pool, uuid, label, props } => {
                self.cont_create(*pool, *uuid, label, props).map(Outcome::Cont)
            }
            Command::ContDestroy { pool, cont } => {
                let info = self.cont_info(*pool, *cont)?;
                self.pool_mut(*pool)?.containers.remove(cont);
                self.tombstones.push(*cont);
                Ok(Outcome::Cont(info))
            }
            Command::MarkDown { rank, now_ms } => {
                if !self.members.contains_key(rank) {
                    return Err(ShoalError::not_found(Entity::Server, format!("rank {rank}")));
                }
                // (Already down: targets reintegrated in one pool while it is
                // out of another go down again. Already excluded: they are
                // excluded again at once, as nothing would time them out.)
                if self.excluded.contains(rank) {
                    self.exclude_rank(*rank);
                    self.mark_unclean();
                    return Ok(Outcome::Done);
                }
                self.down.entry(*rank).or_insert(*now_ms);
                self.set_targets(*rank, |s| s.is_available().then_some(TargetState::Down));
                self.stop_joining(*rank);
                self.mark_unclean();
                Ok(Outcome::Done)
            }
            Command::Exclude { rank } => {
                if !self.members.contains_key(rank) {
                    return Err(ShoalError::not_found(Entity::Server, format!("rank {rank}")));
                }
                self.exclude_rank(*rank);
                Ok(Outcome::Done)
            }
            Command::Reintegrate { pool, rank } => {
                if !self.members.contains_key(rank) {
                    return Err(ShoalError::not_found(Entity::Server, format!("rank {rank}")));
                }
                let pools: Vec<PoolId> = match pool {
                    Some(p) => vec![self.pool(*p)?.uuid],
                    None => self.pools.keys().copied().collect(),
                };
                let mut any = false;
                for &pid in &pools {
                    let p = self.pools.get_mut(&pid).expect("listed above");
                    let mut back = Vec::new();
                    let mut earliest = u32::MAX;
                    for t in p.map.targets.iter_mut().filter(|t| t.rank == *rank) {
                        if matches!(t.state, TargetState::Down | TargetState::DownOut) {
                            if t.state == TargetState::DownOut {
                                earliest = earliest.min(t.out_seq);
                            }
                            t.state = TargetState::Up;
                            t.out_seq = 0;
                            back.push((t.rank, t.index));
                        }
                    }
                    // A drain under way is cancelled: the draining targets
                    // held and took everything throughout; shards stay.
                    let mut cancelled = Vec::new();
                    for t in p.map.targets.iter_mut().filter(|t| t.rank == *rank && t.state == TargetState::Drain) {
                        t.state = TargetState::UpIn;
                        cancelled.push((t.rank, t.index));
                    }
                    if !cancelled.is_empty() {
                        any = true;
                        p.map.version += 1;
                        if let Some(r) = self.rebuilding.get_mut(&pid) {
                            r.retain(|t| !cancelled.contains(t));
                            if r.is_empty() {
                                self.rebuilding.remove(&pid);
                                self.rebuild_done.remove(&pid);
                            }
                        }
                    }
                    // Targets excluded after these may find their spares
                    // elsewhere now that these give theirs back: rebuilt
                    // again wherever they land.
                    back.extend(
                        p.map
                            .targets
                            .iter()
                            .filter(|t| t.state == TargetState::DownOut && t.out_seq >= earliest)
                            .map(|t| (t.rank, t.index)),
                    );
                    if !back.is_empty() {
                        any = true;
                        p.map.version += 1;
                        let r = self.rebuilding.entry(pid).or_default();
                        r.extend(back);
                        r.sort_unstable();
                        r.dedup();
                    }
                }
                // A member again once no pool has it out.
                if !self.pools.values().any(|p| {
                    p.map
                        .targets
                        .iter()
                        .any(|t| t.rank == *rank && matches!(t.state, TargetState::Down | TargetState::DownOut))
                }) {
                    self.down.remove(rank);
                    self.excluded.remove(rank);
                }
                // An extension paused while a joining server was down goes on.
                for &pid in &pools {
                    any |= self.resume_joining(pid);
                }
                if !any {
                    return Err(ShoalError::invalid(format!(
                        "rank {rank} is neither down, excluded, draining nor joining in those pools"
                    )));
                }
                Ok(Outcome::Done)
            }
            Command::RebuildDone { pool, rank, version } => {
                let p = self.pool(*pool)?;
                if p.map.version != *version || !self.rebuilding.contains_key(pool) {
                    // Done for an older map: the rank rebuilds again.
                    return Ok(Outcome::Drained(false));
                }
                let states = |s: &MsState| -> Result<Vec<TargetState>> {
                    Ok(s.pool(*pool)?.map.targets.iter().filter(|t| t.rank == *rank).map(|t| t.state).collect())
                };
                let before = states(self)?;
                let entry = self.rebuild_done.entry(*pool).or_insert_with(|| (*version, Default::default()));
                if entry.0 != *version {
                    *entry = (*version, Default::default());
                }
                entry.1.insert(*rank);
                self.try_finish_rebuild(*pool)?;
                let after = states(self)?;
                Ok(Outcome::Drained(
                    before.contains(&TargetState::Drain)
                        && !after.is_empty()
                        && after.iter().all(|s| *s == TargetState::DownOut),
                ))
            }
            Command::SetRebuild { pool, paused, rate_mib, accept_loss } => {
                self.pool(*pool)?;
                let c = self.rebuild_ctl.entry(*pool).or_default();
                if let Some(p) = paused {
                    c.paused = *p;
                }
                if let Some(r) = rate_mib {
                    c.rate_mib = *r;
                }
                if let Some(a) = accept_loss {
                    c.accept_loss = *a;
                }
                let c = *c;
                if c == Default::default() {
                    self.rebuild_ctl.remove(pool);
                }
                // Accepting a loss may let a held-back rebuild finish now.
                if self.rebuilding.contains_key(pool) {
                    self.try_finish_rebuild(*pool)?;
                }
                Ok(Outcome::RebuildCtl(c))
            }
            Command::Drain { pool, rank } => {
                if !self.members.contains_key(rank) {
                    return Err(ShoalError::not_found(Entity::Server, format!("rank {rank}")));
                }
                let pools: Vec<PoolId> = match pool {
                    Some(p) => vec![self.pool(*p)?.uuid],
                    None => self.pools.keys().copied().collect(),
                };
                // Checked first, so that a refusal changes nothing.
                let mut draining = Vec::new();
                for pid in &pools {
                    let p = self.pool(*pid)?;
                    let mine: Vec<&PoolTarget> = p.map.targets.iter().filter(|t| t.rank == *rank).collect();
                    if mine.is_empty()
                        || mine.iter().all(|t| matches!(t.state, TargetState::DownOut | TargetState::New))
                    {
                        continue;
                    }
                    if let Some(t) = p.map.targets.iter().find(|t| t.state == TargetState::New) {
                        return Err(ShoalError::invalid(format!(
                            "pool {} is being extended (rank {} joins, or waits to); drain once that is done",
                            p.label, t.rank
                        )));
                    }
                    if let Some(t) = mine.iter().find(|t| t.state != TargetState::UpIn) {
                        return Err(ShoalError::invalid(format!(
                            "rank {rank} has target {} {} in pool {}; only a server whose targets are all UPIN can be \
                             drained (wait for rebuild, or exclude it)",
                            t.index, t.state, p.label
                        )));
                    }
                    // Ranks draining already leave too.
                    let leaving = p
                        .map
                        .targets
                        .iter()
                        .filter(|t| t.state == TargetState::Drain && t.rank != *rank)
                        .map(|t| t.rank)
                        .collect::<std::collections::BTreeSet<u32>>()
                        .len() as u32;
                    let left = p.map.domains().saturating_sub(1 + leaving);
                    let widest =
                        p.containers.values().map(|c| widest_group(&c.props, p.map.domains())).max().unwrap_or(1);
                    if widest > left {
                        return Err(ShoalError::invalid(format!(
                            "draining rank {rank} would leave pool {} {left} servers in service, and its containers \
                             use groups of {widest}: their shards would have nowhere to go; add a server first",
                            p.label
                        )));
                    }
                    draining.push(*pid);
                }
                if draining.is_empty() {
                    return Err(ShoalError::invalid(format!("rank {rank} holds nothing to drain in those pools")));
                }
                for pid in draining {
                    let p = self.pools.get_mut(&pid).expect("checked above");
                    let mut going = Vec::new();
                    for t in p.map.targets.iter_mut().filter(|t| t.rank == *rank && t.state == TargetState::UpIn) {
                        t.state = TargetState::Drain;
                        going.push((t.rank, t.index));
                    }
                    p.map.version += 1;
                    let r = self.rebuilding.entry(pid).or_default();
                    r.extend(going);
                    r.sort_unstable();
                    r.dedup();
                }
                Ok(Outcome::Done)
            }
            Command::ClientHello { owner, renew, now_ms } => {
                let until_ms = now_ms + TAG_LEASE_MS;
                if let Some(t) = renew {
                    if let Some(l) = self.tags.get_mut(t) {
                        if l.owner == *owner {
                            l.until_ms = until_ms;
                            return Ok(Outcome::ClientTag(*t));
                        }
                    }
                }
                let start = self.clients % MAX_CLIENT_TAG;
                let free = (0..MAX_CLIENT_TAG)
                    .map(|i| (1 + (start + i) % MAX_CLIENT_TAG) as u16)
                    .find(|t| self.tags.get(t).is_none_or(|l| l.until_ms <= *now_ms));
                let Some(tag) = free else {
                    return Err(ShoalError::Busy(format!(
                        "all {MAX_CLIENT_TAG} client clock tags are leased; try again when clients have gone"
                    )));
                };
                self.tags.insert(tag, TagLease { owner: *owner, until_ms });
                self.clients += 1;
                Ok(Outcome::ClientTag(tag))
            }
            Command::OidAlloc { pool, cont, count } => {
                let c = self
                    .pool_mut(*pool)?
                    .containers
                    .get_mut(cont)
                    .ok_or_else(|| ShoalError::not_found(Entity::Container, format!("container {cont}")))?;
                let first = c.next_seq;
                if first + *count as u128 >= 1 << 88 {
                    return Err(ShoalError::NoSpace(format!("container {cont} has used up its object ids")));
                }
                c.next_seq += *count as u128;
                Ok(Outcome::FirstOid(first))
            }
        }
    }

    /// Turns UNCLEAN (for good) every container whose pool has lost more
    /// servers than its rd_fac: ranks down, or excluded and not rebuilt.
    fn mark_unclean(&mut self) {
        let lost: Vec<(PoolId, usize)> = self.pools.keys().map(|p| (*p, self.lost_ranks(*p))).collect();
        for (pool, lost) in lost {
            for c in self.pools.get_mut(&pool).expect("listed").containers.values_mut() {
                if lost > c.props.rd_fac as usize {
                    c.health = Health::Unclean;
                }
            }
        }
    }

    /// Finishes a pool's rebuild once every server in service has reported
    /// its pass for the current map: the spares, and the targets that came
    /// back, serve reads; drained targets leave.
    fn try_finish_rebuild(&mut self, pool: PoolId) -> Result<()> {
        let p = self.pool(pool)?;
        let live: std::collections::BTreeSet<u32> =
            p.map.targets.iter().filter(|t| t.state.is_available()).map(|t| t.rank).collect();
        let Some((version, done)) = self.rebuild_done.get(&pool) else { return Ok(()) };
        if *version != p.map.version || !live.iter().all(|r| done.contains(r)) {
            return Ok(());
        }
        // Past a redundant container's rd_fac, some groups kept no copy:
        // their spares have nothing to be filled from, and must not serve
        // reads (lost data would read as missing). The rebuild waits until
        // lost servers come back, or an operator accepts the loss.
        let lost = self.lost_ranks(pool);
        let past = p.containers.values().any(|c| c.props.rd_fac >= 1 && lost > c.props.rd_fac as usize);
        if past && !self.rebuild_ctl.get(&pool).is_some_and(|c| c.accept_loss) {
            return Ok(());
        }
        if self.extension_waits(pool).is_some() {
            return Ok(());
        }
        let rebuilt = self.rebuilding.remove(&pool).unwrap_or_default();
        self.rebuild_done.remove(&pool);
        let p = self.pool_mut(pool)?;
        let next = next_out_seq(&p.map);
        for t in p.map.targets.iter_mut() {
            if t.state == TargetState::Up && rebuilt.contains(&(t.rank, t.index)) {
                t.state = TargetState::UpIn;
            }
            // Drained: its shards live where they went.
            if t.state == TargetState::Drain && rebuilt.contains(&(t.rank, t.index)) {
                t.state = TargetState::DownOut;
                t.out_seq = next + 1;
            }
            // Joined: the shards that move to it are there.
            if t.state == TargetState::New && rebuilt.contains(&(t.rank, t.index)) {
                t.state = TargetState::UpIn;
                t.added = next;
            }
        }
        p.map.version += 1;
        Ok(())
    }

    /// A server that is down while `pool` is being extended, if one is:
    /// the shards that move may have their only readable copy there
    /// (nothing was copied of them), so the extension does not finish
    /// until it is back or excluded.
    fn extension_waits(&self, pool: PoolId) -> Option<u32> {
        let p = self.pools.get(&pool)?;
        if !p.map.targets.iter().any(|t| self.joining(pool, t)) {
            return None;
        }
        p.map.targets.iter().find(|t| t.state == TargetState::Down).map(|t| t.rank)
    }

    /// Why `pool`'s rebuild is held back (past its containers' rd_fac, or
    /// an extension waiting for a server that is down), if it is.
    pub fn rebuild_held_back(&self, pool: PoolId) -> Option<String> {
        let p = self.pools.get(&pool)?;
        if let Some(rank) = self.extension_waits(pool) {
            return Some(format!(
                "rank {rank} is down while the pool is being extended: the extension finishes once it is back \
                 (reintegrated) or excluded"
            ));
        }
        let lost = self.lost_ranks(pool);
        let c = p.containers.values().filter(|c| c.props.rd_fac >= 1).find(|c| lost > c.props.rd_fac as usize)?;
        if self.rebuild_ctl.get(&pool).is_some_and(|c| c.accept_loss) {
            return None;
        }
        Some(format!(
            "{lost} servers lost and container {} survives {}: held until they are reintegrated, or `shoal pool \
             rebuild accept-loss {}`",
            c.label, c.props.rd_fac, p.label
        ))
    }

    /// Servers whose copies a pool has lost for now: down, or excluded and
    /// not rebuilt yet.
    fn lost_ranks(&self, pool: PoolId) -> usize {
        let Some(p) = self.pools.get(&pool) else { return 0 };
        let rebuilding = self.rebuilding.get(&pool);
        let mut lost: Vec<u32> = p
            .map
            .targets
            .iter()
            .filter(|t| {
                t.state == TargetState::Down
                    || (t.state == TargetState::DownOut && rebuilding.is_some_and(|r| r.contains(&(t.rank, t.index))))
            })
            .map(|t| t.rank)
            .collect();
        lost.sort_unstable();
        lost.dedup();
        lost.len()
    }

    /// Whether target `t` of `pool` is joining it (an extension in
    /// progress).
    fn joining(&self, pool: PoolId, t: &PoolTarget) -> bool {
        t.state == TargetState::New && self.rebuilding.get(&pool).is_some_and(|r| r.contains(&(t.rank, t.index)))
    }

    /// Excludes `rank` from every pool: its targets turn `DownOut` and are
    /// rebuilt on spares (a joining server's extension pauses).
    fn exclude_rank(&mut self, rank: u32) {
        self.down.remove(&rank);
        self.excluded.insert(rank);
        self.stop_joining(rank);
        for p in self.pools.values() {
            let out: Vec<(u32, u32)> = p
                .map
                .targets
                .iter()
                .filter(|t| t.rank == rank && !matches!(t.state, TargetState::DownOut | TargetState::New))
                .map(|t| (t.rank, t.index))
                .collect();
            if !out.is_empty() {
                let r = self.rebuilding.entry(p.uuid).or_default();
                r.extend(out);
                r.sort_unstable();
                r.dedup();
            }
        }
        self.set_targets(rank, |s| {
            (s != TargetState::DownOut && s != TargetState::New).then_some(TargetState::DownOut)
        });
    }

    /// A joining server that is down pauses its pool's extension: shards
    /// stop moving to every joining target (until it is reintegrated; the
    /// set that joins never changes, so neither does where shards go), and
    /// the pool's map changes.
    fn stop_joining(&mut self, rank: u32) {
        for (pid, p) in self.pools.iter_mut() {
            let Some(r) = self.rebuilding.get_mut(pid) else { continue };
            let new = |tr: u32, ti: u32| {
                p.map.targets.iter().any(|t| (t.rank, t.index, t.state) == (tr, ti, TargetState::New))
            };
            if !r.iter().any(|&(tr, ti)| tr == rank && new(tr, ti)) {
                continue;
            }
            r.retain(|&(tr, ti)| !new(tr, ti));
            p.map.version += 1;
            if r.is_empty() {
                self.rebuilding.remove(pid);
                self.rebuild_done.remove(pid);
            }
        }
    }

    /// Starts (or goes on with) the extension of `pool` if it has `New`
    /// targets, none joining yet, and every one's server is up: they all
    /// join together. Returns whether it did.
    fn resume_joining(&mut self, pool: PoolId) -> bool {
        let Some(p) = self.pools.get_mut(&pool) else { return false };
        let new: Vec<(u32, u32)> =
            p.map.targets.iter().filter(|t| t.state == TargetState::New).map(|t| (t.rank, t.index)).collect();
        let joining = self.rebuilding.get(&pool).is_some_and(|r| r.iter().any(|t| new.contains(t)));
        let up = new.iter().all(|(r, _)| !self.down.contains_key(r) && !self.excluded.contains(r));
        let draining = p.map.targets.iter().any(|t| t.state == TargetState::Drain);
        if new.is_empty() || joining || !up || draining {
            return false;
        }
        p.map.version += 1;
        let r = self.rebuilding.entry(pool).or_default();
        r.extend(new);
        r.sort_unstable();
        r.dedup();
        true
    }

    /// Moves the targets of `rank` in every pool to the state `to` gives
    /// (None: unchanged), bumping the version of each map that changed.
    fn set_targets(&mut self, rank: u32, to: impl Fn(TargetState) -> Option<TargetState>) {
        for p in self.pools.values_mut() {
            let mut changed = false;
            let next = next_out_seq(&p.map);
            for t in p.map.targets.iter_mut().filter(|t| t.rank == rank) {
                if let Some(s) = to(t.state) {
                    if s != t.state {
                        t.out_seq = if s == TargetState::DownOut { next } else { 0 };
                        t.state = s;
                        changed = true;
                    }
                }
            }
            if changed {
                p.map.version += 1;
            }
        }
    }

    fn join(&mut self, j: &JoinReq) -> Result<u32> {
        let rec = |rank| MemberRec { rank, join: j.clone() };
        if let Some(m) = self.members.values_mut().find(|m| m.join.uuid == j.uuid) {
            if m.join.targets != j.targets {
                return Err(ShoalError::invalid(format!(
                    "rank {} joined with {} targets before and now claims {}",
                    m.rank, m.join.targets, j.targets
                )));
            }
            let rank = m.rank;
            if let Some(other) = self.members.values().find(|o| o.join.addr == j.addr && o.join.uuid != j.uuid) {
                return Err(ShoalError::invalid(format!(
                    "rank {rank} rejoins at address {}, which belongs to rank {}; two ranks never share an address",
                    j.addr, other.rank
                )));
            }
            let m = self.members.get_mut(&rank).expect("found above");
            *m = rec(rank);
            return Ok(rank);
        }
        if let Some(m) = self.members.values().find(|m| m.join.addr == j.addr) {
            return Err(ShoalError::invalid(format!(
                "address {} already belongs to rank {}; a new server must use another address",
                j.addr, m.rank
            )));
        }
        let rank = self.members.keys().next_back().map_or(0, |r| r + 1);
        self.members.insert(rank, rec(rank));
        Ok(rank)
    }

    fn pool_create(&mut self, uuid: PoolId, label: &str, ranks: &[u32], per_server: u32) -> Result<PoolInfo> {
        if self.pools.values().any(|p| p.label == label) {
            return Err(ShoalError::exists(Entity::Pool, format!("a pool labelled {label:?} exists already")));
        }
        if self.pools.contains_key(&uuid) {
            return Err(ShoalError::exists(Entity::Pool, format!("pool {uuid} exists already")));
        }
        let mut ranks: Vec<u32> =
            if ranks.is_empty() { self.members.keys().copied().collect() } else { ranks.to_vec() };
        ranks.sort_unstable();
        ranks.dedup();
        if ranks.is_empty() {
            return Err(ShoalError::invalid("no server has joined the system yet"));
        }
        let mut targets = Vec::new();
        for r in &ranks {
            let m = self.members.get(r).ok_or_else(|| ShoalError::not_found(Entity::Server, format!("rank {r}")))?;
            let n = if per_server == 0 { m.join.targets } else { per_server };
            if n > m.join.targets {
                return Err(ShoalError::invalid(format!(
                    "rank {r} has {} targets, {n} were asked for",
                    m.join.targets
                )));
            }
            targets.extend((0..n).map(|index| PoolTarget::new(*r, index, TargetState::UpIn)));
        }
        let map = PoolMap { version: 1, targets };
        map.validate()?;
        let rec = PoolRec { uuid, label: label.to_string(), map, containers: BTreeMap::new() };
        self.pools.insert(uuid, rec);
        self.pool_info(uuid)
    }

    fn cont_create(&mut self, pool: PoolId, uuid: ContId, label: &str, props: &ContProps) -> Result<ContInfo> {
        let domains = self.pool(pool)?.map.widest_group();
        // A container is as safe as its class: its rd_fac (which also
        // protects its name index and every object chosen automatically) is
        // at least what the class tolerates, never silently 0.
        let mut props = props.clone();
        if let Some(name) = &props.oclass {
            if let Ok(class) = name.parse::<ObjectClass>() {
                props.rd_fac = props.rd_fac.max(class.tolerated_failures());
            }
        }
        let props = &props;
        check_props(props, domains)?;
        let p = self.pool_mut(pool)?;
        if p.containers.values().any(|c| c.label == label) {
            return Err(ShoalError::exists(
                Entity::Container,
                format!("pool {} already has a container labelled {label:?}", p.label),
            ));
        }
        if p.containers.contains_key(&uuid) {
            return Err(ShoalError::exists(Entity::Container, format!("container {uuid} exists already")));
        }
        p.containers.insert(
            uuid,
            ContRec {
                uuid,
                label: label.to_string(),
                props: props.clone(),
                health: Health::Healthy,
                next_seq: FIRST_USER_SEQ,
            },
        );
        self.cont_info(pool, uuid)
    }

    pub fn pool(&self, pool: PoolId) -> Result<&PoolRec> {
        self.pools.get(&pool).ok_or_else(|| ShoalError::not_found(Entity::Pool, format!("pool {pool}")))
    }

    fn pool_mut(&mut self, pool: PoolId) -> Result<&mut PoolRec> {
        self.pools.get_mut(&pool).ok_or_else(|| ShoalError::not_found(Entity::Pool, format!("pool {pool}")))
    }

    /// Resolves a pool label or UUID.
    pub fn find_pool(&self, name: &str) -> Result<PoolId> {
        if let Ok(id) = name.parse::<PoolId>() {
            if self.pools.contains_key(&id) {
                return Ok(id);
            }
        }
        self.pools
            .values()
            .find(|p| p.label == name)
            .map(|p| p.uuid)
            .ok_or_else(|| ShoalError::not_found(Entity::Pool, format!("no pool is labelled or identified {name:?}")))
    }

    /// Resolves a container label or UUID within a pool.
    pub fn find_cont(&self, pool: PoolId, name: &str) -> Result<ContId> {
        let p = self.pool(pool)?;
        if let Ok(id) = name.parse::<ContId>() {
            if p.containers.contains_key(&id) {
                return Ok(id);
            }
        }
        p.containers.values().find(|c| c.label == name).map(|c| c.uuid).ok_or_else(|| {
            ShoalError::not_found(
                Entity::Container,
                format!("pool {} has no container labelled or identified {name:?}", p.label),
            )
        })
    }

    pub fn pool_info(&self, pool: PoolId) -> Result<PoolInfo> {
        let p = self.pool(pool)?;
        let ranks: std::collections::BTreeSet<u32> = p.map.targets.iter().map(|t| t.rank).collect();
        let addrs =
            ranks.iter().filter_map(|r| self.members.get(r).map(|m| (*r, m.join.addr.clone()))).collect::<Vec<_>>();
        Ok(PoolInfo {
            uuid: p.uuid,
            label: p.label.clone(),
            map: p.map.clone(),
            addrs,
            containers: p.containers.len() as u32,
            rebuilding: self.rebuilding.get(&pool).cloned().unwrap_or_default(),
            rebuilt_by: self
                .rebuild_done
                .get(&pool)
                .filter(|(v, _)| *v == p.map.version)
                .map(|(_, r)| r.iter().copied().collect())
                .unwrap_or_default(),
            rebuild: None,
        })
    }

    pub fn cont_info(&self, pool: PoolId, cont: ContId) -> Result<ContInfo> {
        let c = self
            .pool(pool)?
            .containers
            .get(&cont)
            .ok_or_else(|| ShoalError::not_found(Entity::Container, format!("container {cont}")))?;
        Ok(ContInfo {
            uuid: c.uuid,
            label: c.label.clone(),
            pool,
            props: c.props.clone(),
            health: c.health,
            oids_allocated: c.next_seq - FIRST_USER_SEQ,
        })
    }
}

/// The order number the next excluded (or extended) target of `map` gets.
fn next_out_seq(map: &shoal_common::placement::PoolMap) -> u32 {
    map.next_seq()
}

/// The widest group a container's objects use by default: its class, or
/// the classes chosen for its arrays and KV objects on `domains` servers.
fn widest_group(props: &ContProps, domains: u32) -> u32 {
    use shoal_common::oclass::{auto_class, ObjType};
    if let Some(c) = props.oclass.as_deref().and_then(|n| n.parse::<ObjectClass>().ok()) {
        return c.group_size();
    }
    [ObjType::Array, ObjType::Kv]
        .into_iter()
        .filter_map(|ty| auto_class(props.rd_fac, domains, ty).ok())
        .map(|(c, _)| c.group_size())
        .max()
        .unwrap_or(1)
}

/// Checks container properties against the pool: rd_fac range, class name
/// and fit, cell and chunk sizes.
pub fn check_props(props: &ContProps, domains: u32) -> Result<()> {
    if props.rd_fac > 4 {
        return Err(ShoalError::invalid(format!("rd_fac {} is outside 0..=4", props.rd_fac)));
    }
    if props.rd_fac as u32 >= domains.max(1) && props.rd_fac > 0 {
        return Err(ShoalError::invalid(format!(
            "rd_fac {} needs at least {} servers; the pool has {domains}",
            props.rd_fac,
            props.rd_fac + 1
        )));
    }
    if !(4096..=(16 << 20)).contains(&props.cell_size) || !props.cell_size.is_power_of_two() {
        return Err(ShoalError::invalid(format!(
            "cell size {} must be a power of two between 4KiB and 16MiB",
            props.cell_size
        )));
    }
    if props.chunk_size == 0 || props.chunk_size > 1 << 30 {
        return Err(ShoalError::invalid(format!("chunk size {} must be between 1 byte and 1GiB", props.chunk_size)));
    }
    if let Some(name) = &props.oclass {
        let class: ObjectClass = name.parse()?;
        class.check(props.rd_fac, domains)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(s: &mut MsState, uuid: u128) -> u32 {
        let j = JoinReq {
            uuid,
            addr: format!("127.0.0.1:{}", 1000 + uuid),
            fault_domain: format!("host{uuid}"),
            targets: 2,
            host: "h".into(),
            pid: 1,
        };
        match s.apply(&Command::Join(j)).unwrap() {
            Outcome::Rank(r) => r,
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn a_change_proposed_twice_under_one_operation_id_is_applied_once() {
        let mut s = MsState::default();
        join(&mut s, 10);
        let pool = PoolId(5);
        let create = Command::PoolCreate { uuid: pool, label: "p".into(), ranks: vec![], targets_per_server: 0 };
        s.apply(&create).unwrap();
        let cont = |uuid, label: &str| Command::ContCreate {
            pool,
            uuid: ContId(uuid),
            label: label.into(),
            props: ContProps { rd_fac: 0, oclass: Some("S1".into()), ..ContProps::default() },
        };
        s.apply(&cont(6, "c")).unwrap();
        let once = |op, cmd: Command| Command::Once { op, cmd: Box::new(cmd) };
        // OIDs: the retry gets the same range, and the next caller the
        // range after it.
        let alloc = Command::OidAlloc { pool, cont: ContId(6), count: 10 };
        let first = s.apply(&once(1, alloc.clone())).unwrap();
        assert_eq!(s.apply(&once(1, alloc.clone())).unwrap(), first);
        let Outcome::FirstOid(a) = first else { panic!("{first:?}") };
        assert_eq!(s.apply(&once(2, alloc)).unwrap(), Outcome::FirstOid(a + 10));
        // A create retried answers as the first did, not "exists"; a
        // destroy retried, not "not found".
        let made = s.apply(&once(3, cont(7, "d"))).unwrap();
        assert_eq!(s.apply(&once(3, cont(7, "d"))).unwrap(), made);
        let destroy = Command::ContDestroy { pool, cont: ContId(7) };
        let gone = s.apply(&once(4, destroy.clone())).unwrap();
        assert_eq!(s.apply(&once(4, destroy.clone())).unwrap(), gone);
        assert_eq!(s.tombstones, vec![ContId(7)]);
        // Without an operation id it is a second destroy, and refused.
        assert!(s.apply(&destroy).unwrap_err().missing().is_some());
        // A refused change is not remembered: its retry runs again.
        let before = s.clone();
        assert!(s.apply(&once(5, cont(8, "c"))).is_err());
        assert_eq!(s, before);
        assert!(s.apply(&once(5, cont(8, "e"))).is_ok());
        assert!(s.apply(&once(6, once(7, Command::Exclude { rank: 0 }))).is_err());
    }

    #[test]
    fn the_oldest_operation_outcomes_are_forgotten() {
        let mut s = MsState::default();
        join(&mut s, 10);
        for op in 0..(OPS_KEPT as u128 + 10) {
            s.apply(&Command::Once { op, cmd: Box::new(Command::Exclude { rank: 0 }) }).unwrap();
        }
        assert_eq!(s.ops.len(), OPS_KEPT);
        assert!(s.ops.get(9).is_none());
        assert!(s.ops.get(10).is_some());
    }

    #[test]
    fn a_rejoin_never_lets_two_ranks_share_an_address() {
        let mut s = MsState::default();
        join(&mut s, 10);
        join(&mut s, 11);
        // Rank 1 comes back claiming rank 0's address.
        let j = JoinReq {
            uuid: 11,
            addr: "127.0.0.1:1010".into(),
            fault_domain: "host11".into(),
            targets: 2,
            host: "h".into(),
            pid: 2,
        };
        let before = s.clone();
        let e = s.apply(&Command::Join(j)).unwrap_err().to_string();
        assert!(e.contains("belongs to rank 0"), "{e}");
        assert_eq!(s, before);
    }

    #[test]
    fn clients_alive_together_never_share_a_clock_tag() {
        let mut s = MsState::default();
        let hello = |s: &mut MsState, owner: u128, renew: Option<u16>, now_ms: u64| match s
            .apply(&Command::ClientHello { owner, renew, now_ms })
        {
            Ok(Outcome::ClientTag(t)) => Ok(t),
            Ok(o) => panic!("{o:?}"),
            Err(e) => Err(e),
        };
        // A long-lived client keeps its tag by renewing it...
        let old = hello(&mut s, 1, None, 0).unwrap();
        let mut seen = std::collections::HashSet::from([old]);
        for i in 0..MAX_CLIENT_TAG - 1 {
            let t = hello(&mut s, 100 + i as u128, None, 1000).unwrap();
            assert!(t != 0, "tag 0 is the servers'");
            assert!(seen.insert(t), "tag {t} handed out twice");
        }
        assert_eq!(hello(&mut s, 1, Some(old), 2000).unwrap(), old);
        // ...and while every lease runs, nobody else gets one.
        assert!(matches!(hello(&mut s, 9999, None, 3000), Err(ShoalError::Busy(_))));
        // Leases that lapse free their tags; the renewed one stays taken.
        let t = hello(&mut s, 9999, None, 1000 + TAG_LEASE_MS).unwrap();
        assert_ne!(t, old);
        // Renewing someone else's tag gets a fresh one instead.
        let other = hello(&mut s, 5, Some(old), 1000 + TAG_LEASE_MS).unwrap();
        assert_ne!(other, old);
    }

    #[test]
    fn a_drained_server_serves_until_its_shards_are_elsewhere_then_is_out() {
        let mut s = MsState::default();
        for u in 0..5 {
            join(&mut s, u);
        }
        let cmd = Command::PoolCreate { uuid: PoolId(7), label: "tank".into(), ranks: vec![], targets_per_server: 0 };
        s.apply(&cmd).unwrap();
        let props = ContProps { oclass: Some("EC_2P1G1".into()), ..ContProps::default() };
        s.apply(&Command::ContCreate { pool: PoolId(7), uuid: ContId(1), label: "c".into(), props }).unwrap();
        let version = |s: &MsState| s.pools[&PoolId(7)].map.version;
        let states = |s: &MsState, r: u32| -> Vec<TargetState> {
            s.pools[&PoolId(7)].map.targets.iter().filter(|t| t.rank == r).map(|t| t.state).collect()
        };
        let v0 = version(&s);
        s.apply(&Command::Drain { pool: None, rank: 2 }).unwrap();
        assert!(states(&s, 2).iter().all(|&t| t == TargetState::Drain));
        assert!(states(&s, 2).iter().all(|t| t.is_available()), "a draining server still serves");
        assert!(version(&s) > v0);
        assert!(!s.rebuilding[&PoolId(7)].is_empty());
        // Twice is refused, and so is a drain that leaves groups nowhere to
        // go, counting the one under way (5 - 2 < 3 + ... : 3 left fits, 2
        // would not).
        assert!(s.apply(&Command::Drain { pool: None, rank: 2 }).is_err());
        let mut s2 = s.clone();
        s2.apply(&Command::Drain { pool: None, rank: 3 }).unwrap();
        let e = s2.apply(&Command::Drain { pool: None, rank: 4 }).unwrap_err();
        assert!(e.to_string().contains("nowhere to go"), "{e}");
        // Every server in service (the draining one too) reports its pass.
        for rank in 0..5 {
            s.apply(&Command::RebuildDone { pool: PoolId(7), rank, version: version(&s) }).unwrap();
        }
        assert!(states(&s, 2).iter().all(|&t| t == TargetState::DownOut));
        assert!(!s.rebuilding.contains_key(&PoolId(7)));
        // 4 servers left for groups of 3: one more drain fits, then none.
        s.apply(&Command::Drain { pool: Some(PoolId(7)), rank: 3 }).unwrap();
        for rank in [0, 1, 3, 4] {
            s.apply(&Command::RebuildDone { pool: PoolId(7), rank, version: version(&s) }).unwrap();
        }
        let e = s.apply(&Command::Drain { pool: None, rank: 4 }).unwrap_err();
        assert!(e.to_string().contains("nowhere to go"), "{e}");
        // A down server cannot be drained; reintegration brings a drained one back.
        s.apply(&Command::MarkDown { rank: 4, now_ms: 1 }).unwrap();
        assert!(s.apply(&Command::Drain { pool: None, rank: 4 }).is_err());
        s.apply(&Command::Reintegrate { pool: None, rank: 2 }).unwrap();
        assert!(states(&s, 2).iter().all(|&t| t == TargetState::Up));
    }

    #[test]
    fn an_extended_server_joins_once_every_server_has_copied_its_share() {
        let mut s = MsState::default();
        for u in 0..4 {
            join(&mut s, u);
        }
        let cmd =
            Command::PoolCreate { uuid: PoolId(7), label: "tank".into(), ranks: vec![0, 1, 2], targets_per_server: 0 };
        s.apply(&cmd).unwrap();
        let pool = |s: &MsState| s.pools[&PoolId(7)].clone();
        let joining = |s: &MsState| s.rebuilding.get(&PoolId(7)).cloned().unwrap_or_default();
        s.apply(&Command::PoolExtend { pool: PoolId(7), ranks: vec![3] }).unwrap();
        assert_eq!(joining(&s), vec![(3, 0), (3, 1)]);
        // One extension at a time.
        join(&mut s, 8);
        let e = s.apply(&Command::PoolExtend { pool: PoolId(7), ranks: vec![4] }).unwrap_err();
        assert!(e.to_string().contains("still joining"), "{e}");
        // No drain while the pool is being extended.
        let e = s.apply(&Command::Drain { pool: Some(PoolId(7)), rank: 1 }).unwrap_err();
        assert!(e.to_string().contains("being extended"), "{e}");
        // The new server goes down: it stops joining, the map changes, and
        // nothing is left to rebuild; reintegrated, it joins again.
        let v = pool(&s).map.version;
        s.apply(&Command::MarkDown { rank: 3, now_ms: 1 }).unwrap();
        assert!(joining(&s).is_empty() && !s.rebuilding.contains_key(&PoolId(7)));
        assert!(pool(&s).map.version > v);
        assert!(pool(&s).map.targets.iter().filter(|t| t.rank == 3).all(|t| t.state == TargetState::New));
        s.apply(&Command::Reintegrate { pool: None, rank: 3 }).unwrap();
        assert_eq!(joining(&s), vec![(3, 0), (3, 1)]);
        assert!(!s.down.contains_key(&3));
        // An exclusion meanwhile takes the next order number.
        s.apply(&Command::MarkDown { rank: 2, now_ms: 2 }).unwrap();
        // While it is down, the extension does not finish: a shard that
        // moves may have had its only readable copy there.
        let v = pool(&s).map.version;
        for rank in [0, 1] {
            s.apply(&Command::RebuildDone { pool: PoolId(7), rank, version: v }).unwrap();
        }
        assert!(pool(&s).map.targets.iter().filter(|t| t.rank == 3).all(|t| t.state == TargetState::New));
        assert!(s.rebuild_held_back(PoolId(7)).unwrap().contains("rank 2 is down"));
        s.apply(&Command::Exclude { rank: 2 }).unwrap();
        // The servers in service report; the new one is not one of them.
        let v = pool(&s).map.version;
        for rank in [0, 1] {
            s.apply(&Command::RebuildDone { pool: PoolId(7), rank, version: v }).unwrap();
        }
        let p = pool(&s);
        let excluded = p.map.targets.iter().find(|t| t.rank == 2).unwrap().out_seq;
        assert!(p
            .map
            .targets
            .iter()
            .filter(|t| t.rank == 3)
            .all(|t| t.state == TargetState::UpIn && t.added > excluded));
        assert!(!s.rebuilding.contains_key(&PoolId(7)));
        // Extending while a drain is under way is refused.
        s.apply(&Command::Drain { pool: Some(PoolId(7)), rank: 1 }).unwrap();
        let e = s.apply(&Command::PoolExtend { pool: PoolId(7), ranks: vec![4] }).unwrap_err();
        assert!(e.to_string().contains("drained"), "{e}");
        // Reintegrating the draining server cancels the drain; then the
        // pool can be extended.
        let v = pool(&s).map.version;
        s.apply(&Command::Reintegrate { pool: None, rank: 1 }).unwrap();
        assert!(pool(&s).map.targets.iter().filter(|t| t.rank == 1).all(|t| t.state == TargetState::UpIn));
        assert!(!s.rebuilding.contains_key(&PoolId(7)) && pool(&s).map.version > v);
        s.apply(&Command::PoolExtend { pool: PoolId(7), ranks: vec![4] }).unwrap();
    }

    #[test]
    fn exclusions_are_ordered_and_a_return_rebuilds_later_ones_too() {
        let mut s = MsState::default();
        for u in 0..5 {
            join(&mut s, u);
        }
        let cmd = Command::PoolCreate { uuid: PoolId(7), label: "tank".into(), ranks: vec![], targets_per_server: 0 };
        s.apply(&cmd).unwrap();
        let seq = |s: &MsState, r: u32| s.pools[&PoolId(7)].map.targets.iter().find(|t| t.rank == r).unwrap().out_seq;
        for (now, rank) in [(1, 1), (2, 2)] {
            s.apply(&Command::MarkDown { rank, now_ms: now }).unwrap();
            s.apply(&Command::Exclude { rank }).unwrap();
        }
        assert_eq!((seq(&s, 1), seq(&s, 2)), (1, 2));
        let v = s.pools[&PoolId(7)].map.version;
        for rank in [0, 3, 4] {
            s.apply(&Command::RebuildDone { pool: PoolId(7), rank, version: v }).unwrap();
        }
        assert!(!s.rebuilding.contains_key(&PoolId(7)));
        // Rank 1 comes back: its spares are freed, so rank 2's shards may
        // land elsewhere; both are rebuilt.
        s.apply(&Command::Reintegrate { pool: None, rank: 1 }).unwrap();
        assert_eq!(seq(&s, 1), 0);
        let r = &s.rebuilding[&PoolId(7)];
        assert!(r.iter().any(|t| t.0 == 1) && r.iter().any(|t| t.0 == 2), "{r:?}");
        // Rank 2 back first instead would not touch rank 1's.
        let mut s2 = s.clone();
        s2.apply(&Command::Exclude { rank: 3 }).unwrap();
        assert_eq!(seq(&s2, 3), 3);
    }

    #[test]
    fn rebuild_can_be_stopped_and_paced_per_pool() {
        use shoal_common::mgmt::RebuildCtl;
        let mut s = MsState::default();
        join(&mut s, 0);
        let cmd = Command::PoolCreate { uuid: PoolId(7), label: "tank".into(), ranks: vec![], targets_per_server: 0 };
        s.apply(&cmd).unwrap();
        let set = |s: &mut MsState, paused, rate_mib| match s.apply(&Command::SetRebuild {
            pool: PoolId(7),
            paused,
            rate_mib,
            accept_loss: None,
        }) {
            Ok(Outcome::RebuildCtl(c)) => c,
            o => panic!("{o:?}"),
        };
        let ctl = |paused, rate_mib| RebuildCtl { paused, rate_mib, accept_loss: false };
        assert_eq!(set(&mut s, Some(true), None), ctl(true, 0));
        assert_eq!(set(&mut s, None, Some(50)), ctl(true, 50));
        assert_eq!(set(&mut s, Some(false), None), ctl(false, 50));
        // Back to the defaults: nothing is kept.
        set(&mut s, None, Some(0));
        assert!(s.rebuild_ctl.is_empty());
        set(&mut s, Some(true), None);
        let cmd = Command::SetRebuild { pool: PoolId(9), paused: Some(true), rate_mib: None, accept_loss: None };
        assert!(s.apply(&cmd).is_err());
        s.apply(&Command::PoolDestroy { pool: PoolId(7), force: true }).unwrap();
        assert!(s.rebuild_ctl.is_empty(), "a destroyed pool's settings go with it");
    }

    #[test]
    fn a_container_is_at_least_as_safe_as_its_class() {
        let mut s = MsState::default();
        for u in 0..6 {
            join(&mut s, u);
        }
        let cmd = Command::PoolCreate { uuid: PoolId(7), label: "tank".into(), ranks: vec![], targets_per_server: 0 };
        s.apply(&cmd).unwrap();
        for (class, rd_fac) in [("EC_4P2G1", 2), ("RP_3GX", 2), ("RP_2G1", 1), ("S1", 0)] {
            let props = ContProps { oclass: Some(class.into()), ..ContProps::default() };
            let cmd = Command::ContCreate {
                pool: PoolId(7),
                uuid: ContId(rd_fac as u128 + 100 * class.len() as u128),
                label: class.to_lowercase(),
                props,
            };
            let Outcome::Cont(c) = s.apply(&cmd).unwrap() else { panic!() };
            assert_eq!(c.props.rd_fac, rd_fac, "{class}");
        }
    }

    #[test]
    fn a_container_that_lost_more_servers_than_its_rd_fac_turns_unclean() {
        let mut s = MsState::default();
        for u in 0..4 {
            join(&mut s, u);
        }
        let cmd = Command::PoolCreate { uuid: PoolId(7), label: "tank".into(), ranks: vec![], targets_per_server: 0 };
        s.apply(&cmd).unwrap();
        for (uuid, label, rd_fac) in [(1, "one", 1), (2, "two", 2)] {
            let props = ContProps { rd_fac, ..ContProps::default() };
            s.apply(&Command::ContCreate { pool: PoolId(7), uuid: ContId(uuid), label: label.into(), props }).unwrap();
        }
        let health = |s: &MsState, c: u128| s.cont_info(PoolId(7), ContId(c)).unwrap().health;
        s.apply(&Command::MarkDown { rank: 0, now_ms: 1 }).unwrap();
        assert_eq!(health(&s, 1), Health::Healthy);
        s.apply(&Command::MarkDown { rank: 1, now_ms: 2 }).unwrap();
        assert_eq!(health(&s, 1), Health::Unclean, "two lost servers, rd_fac 1");
        assert_eq!(health(&s, 2), Health::Healthy, "two lost servers, rd_fac 2");
        // It stays so: data may be gone.
        s.apply(&Command::Exclude { rank: 0 }).unwrap();
        s.apply(&Command::Exclude { rank: 1 }).unwrap();
        assert_eq!(health(&s, 1), Health::Unclean);
    }

    #[test]
    fn a_reintegrated_server_takes_writes_at_once_and_serves_reads_once_rebuilt() {
        let mut s = MsState::default();
        for u in 0..4 {
            join(&mut s, u);
        }
        let cmd = Command::PoolCreate { uuid: PoolId(7), label: "tank".into(), ranks: vec![], targets_per_server: 0 };
        s.apply(&cmd).unwrap();
        let states = |s: &MsState| -> Vec<TargetState> {
            s.pools[&PoolId(7)].map.targets.iter().filter(|t| t.rank == 3).map(|t| t.state).collect()
        };
        let version = |s: &MsState| s.pools[&PoolId(7)].map.version;
        // In service: nothing to reintegrate, and nothing changes.
        let before = s.clone();
        assert!(s.apply(&Command::Reintegrate { pool: None, rank: 3 }).is_err());
        assert!(matches!(s.apply(&Command::Reintegrate { pool: None, rank: 9 }), Err(ShoalError::NotFound { .. })));
        assert_eq!(s, before);
        // Rank 3 goes down, is excluded, and its spares are rebuilt.
        s.apply(&Command::MarkDown { rank: 3, now_ms: 1 }).unwrap();
        s.apply(&Command::Exclude { rank: 3 }).unwrap();
        for rank in 0..3 {
            s.apply(&Command::RebuildDone { pool: PoolId(7), rank, version: version(&s) }).unwrap();
        }
        assert!(s.rebuilding.is_empty());
        assert_eq!(states(&s), vec![TargetState::DownOut; 2]);
        // It comes back: UP (writes), being rebuilt (no reads), a member again.
        s.apply(&Command::Reintegrate { pool: Some(PoolId(7)), rank: 3 }).unwrap();
        assert_eq!(states(&s), vec![TargetState::Up; 2]);
        assert_eq!(s.rebuilding[&PoolId(7)], vec![(3, 0), (3, 1)]);
        assert!(!s.excluded.contains(&3) && !s.down.contains_key(&3));
        let placement = s.pool_info(PoolId(7)).unwrap().placement();
        let class: ObjectClass = "RP_3GX".parse().unwrap();
        let oid = shoal_common::oclass::make_oid(1 << 20, class, shoal_common::oclass::ObjType::Multi);
        let shards: Vec<shoal_common::placement::Shard> =
            placement.layout(ContId(1), oid, class).unwrap().groups.concat();
        let mine: Vec<&shoal_common::placement::Shard> = shards.iter().filter(|sh| sh.rank == 3).collect();
        assert!(mine.iter().all(|sh| sh.available && !sh.readable), "{mine:?}");
        // Every server in service, itself included, must go through its
        // objects for this map before it serves reads.
        for rank in 0..3 {
            s.apply(&Command::RebuildDone { pool: PoolId(7), rank, version: version(&s) }).unwrap();
        }
        assert_eq!(states(&s), vec![TargetState::Up; 2]);
        s.apply(&Command::RebuildDone { pool: PoolId(7), rank: 3, version: version(&s) }).unwrap();
        assert_eq!(states(&s), vec![TargetState::UpIn; 2]);
        assert!(s.rebuilding.is_empty());
    }

    #[test]
    fn ranks_are_stable_across_rejoins() {
        let mut s = MsState::default();
        assert_eq!(join(&mut s, 10), 0);
        assert_eq!(join(&mut s, 11), 1);
        assert_eq!(join(&mut s, 10), 0);
        assert_eq!(s.applied, 3);
    }

    #[test]
    fn pools_and_containers_by_label_or_uuid_and_errors_leave_state_alone() {
        let mut s = MsState::default();
        for u in 0..3 {
            join(&mut s, u);
        }
        let cmd = Command::PoolCreate { uuid: PoolId(7), label: "tank".into(), ranks: vec![], targets_per_server: 0 };
        let Outcome::Pool(p) = s.apply(&cmd).unwrap() else { panic!() };
        assert_eq!(p.map.targets.len(), 6);
        assert_eq!(s.find_pool("tank").unwrap(), PoolId(7));
        assert_eq!(s.find_pool(&PoolId(7).to_string()).unwrap(), PoolId(7));
        assert!(s.find_pool("nope").is_err());

        let before = s.clone();
        let bad = ContProps { oclass: Some("EC_4P2G1".into()), ..ContProps::default() };
        let cmd = Command::ContCreate { pool: PoolId(7), uuid: ContId(1), label: "c".into(), props: bad };
        let e = s.apply(&cmd).unwrap_err().to_string();
        assert!(e.contains("EC_4P2"), "{e}");
        assert_eq!(s, before, "a refused command changes nothing");

        let props = ContProps { rd_fac: 1, oclass: Some("RP_2G1".into()), ..ContProps::default() };
        let cmd = Command::ContCreate { pool: PoolId(7), uuid: ContId(1), label: "c".into(), props };
        s.apply(&cmd).unwrap();
        assert_eq!(s.find_cont(PoolId(7), "c").unwrap(), ContId(1));
        let Outcome::FirstOid(a) = s.apply(&Command::OidAlloc { pool: PoolId(7), cont: ContId(1), count: 10 }).unwrap()
        else {
            panic!()
        };
        let Outcome::FirstOid(b) = s.apply(&Command::OidAlloc { pool: PoolId(7), cont: ContId(1), count: 1 }).unwrap()
        else {
            panic!()
        };
        assert_eq!((a, b), (FIRST_USER_SEQ, FIRST_USER_SEQ + 10));
        assert!(s.apply(&Command::PoolDestroy { pool: PoolId(7), force: false }).is_err());
        join(&mut s, 3);
        let Outcome::Pool(p) = s.apply(&Command::PoolExtend { pool: PoolId(7), ranks: vec![3] }).unwrap() else {
            panic!()
        };
        assert_eq!((p.map.version, p.map.targets.len()), (2, 8));
        assert!(s.apply(&Command::PoolExtend { pool: PoolId(7), ranks: vec![3] }).is_err(), "already in");
        s.apply(&Command::ContDestroy { pool: PoolId(7), cont: ContId(1) }).unwrap();
        s.apply(&Command::PoolDestroy { pool: PoolId(7), force: false }).unwrap();
        assert!(s.pools.is_empty());
    }

    #[test]
    fn rd_fac_beyond_the_servers_is_refused() {
        let props = ContProps { rd_fac: 2, ..ContProps::default() };
        assert!(check_props(&props, 2).is_err());
        assert!(check_props(&props, 3).is_ok());
    }
}
