//! Placement: which targets hold the shards of an object, computed from the
//! pool map and the OID alone, so client and server agree without asking
//! anybody.
//!
//! The algorithm:
//! 1. The **ring** lists the targets the pool was created with (`added`
//!    0), round robin over servers: round `i` takes target `i` of each rank
//!    in ascending rank order (ranks without such a target are skipped), so
//!    neighbouring positions sit on different servers. `Down` and `DownOut`
//!    targets keep their positions, so a failure never shifts the ring.
//!    Targets added by `pool extend` follow, by the order they joined in
//!    (then by index and rank), and joining ones (`New` and in the
//!    rebuilding list) last; homes are only laid out over the first part,
//!    so an extension never shifts them either.
//! 2. An object has `G` groups of `n` shards ([`ObjectClass::groups_in`] and
//!    [`ObjectClass::group_size`]) and starts at ring position
//!    `(h(container, oid type and class) + seq * G * n) mod L`. Sequential
//!    OIDs of one container therefore tile the ring exactly.
//! 3. Shard 0 of group `g` sits at `start + g * n`; each next shard of the
//!    group sits at the first position after the previous shard whose rank
//!    the group does not use yet.
//! 4. The pool's history is replayed in order (exclusions by
//!    `PoolTarget::out_seq`, extensions by `PoolTarget::added`, one counter;
//!    a joining extension, then a `Drain` target, count as the newest and
//!    only for shadows). At an extension adding `a` targets to `b`, each
//!    shard, by a hash of the object and the shard, moves with probability
//!    `a / (a + b)` to one of the new targets whose rank its group does not
//!    use (its new home; it leaves a spare it had). A shard whose home is
//!    `DownOut` takes a spare: after each exclusion, every shard on a target excluded
//!    by then (its home, or the spare it had) takes, scanning from just
//!    after the object's last home position, the first target not excluded
//!    by then, whose rank no other shard of the group uses (home or spare)
//!    and that this object does not use as a spare already. If no target
//!    qualifies, the shard stays home, unavailable. So an exclusion moves
//!    exactly the shards on the excluded target, never an earlier spare.
//!
//! Invariants:
//! - Pure and deterministic: the same map, container, OID and class give the
//!   same [`Layout`] everywhere, forever. Changing a hash or a rule here
//!   moves every object in every pool.
//! - No two shards of one group share a rank (a server is a fault domain).
//! - Excluding a target moves exactly the shards it held (as home or
//!   spare); bringing one back may move later exclusions' spares, so the
//!   MS rebuilds those again. An extension moves shards only onto its
//!   new targets, about the share of the pool they add; it does not widen
//!   objects (a group is never wider than the servers the pool was created
//!   with: [`PoolMap::widest_group`]). Shards on `Down` targets stay home
//!   and are marked unavailable; the client degrades, rebuild moves them
//!   after exclusion.
//!
//! Key types: [`PoolMap`] (versioned target states), [`Placement`] (the ring
//! of one map, built once and shared by every lookup), [`Layout`] and
//! [`Shard`], and [`dkey_group`] (which group holds a dkey).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ShoalError;
use crate::ids::{ContId, Oid};
use crate::oclass::{oid_seq, ObjectClass};

/// The state of one target in the pool map (DAOS words).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetState {
    /// Coming back (reintegration or extension in progress); serving.
    Up,
    /// Up and in the pool: the normal state of a serving target.
    UpIn,
    /// Not answering; still holds its shards, which are unavailable.
    Down,
    /// Excluded; its shards live on spares once rebuilt.
    DownOut,
    /// Added by `pool extend`, not part of the layout yet. While it is
    /// in the pool's rebuilding list, the shards that will move to it get
    /// it as their `shadow` and are copied there; then it turns `UpIn`.
    New,
    /// Being drained: serving as `UpIn`, while every shard it holds is
    /// also written to, and rebuilt on, the target it will have once the
    /// drain is done (the shard's `shadow`); then it turns `DownOut`.
    Drain,
}

impl TargetState {
    /// Whether a shard on a target in this state can serve I/O.
    pub fn is_available(self) -> bool {
        matches!(self, TargetState::Up | TargetState::UpIn | TargetState::Drain)
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TargetState::Up => "UP",
            TargetState::UpIn => "UPIN",
            TargetState::Down => "DOWN",
            TargetState::DownOut => "DOWNOUT",
            TargetState::New => "NEW",
            TargetState::Drain => "DRAIN",
        })
    }
}

/// One target of a pool: `index` is the target number on server `rank`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolTarget {
    pub rank: u32,
    pub index: u32,
    pub state: TargetState,
    /// For a `DownOut` target: when it was excluded, counted per pool (1
    /// for the first). Spares go to excluded targets' shards in this
    /// order, so an exclusion never moves an earlier one's spare.
    #[serde(default)]
    pub out_seq: u32,
    /// 0 for a target the pool was created with; for one added by `pool
    /// extend`, when it joined the layout (counted with `out_seq`). Each
    /// such extension moves a fair share of the shards onto its targets.
    #[serde(default)]
    pub added: u32,
}

impl PoolTarget {
    /// A target in `state` that was never excluded.
    pub fn new(rank: u32, index: u32, state: TargetState) -> PoolTarget {
        PoolTarget { rank, index, state, out_seq: 0, added: 0 }
    }
}

/// A pool's targets and their states. Every change bumps `version`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PoolMap {
    pub version: u32,
    pub targets: Vec<PoolTarget>,
}

impl PoolMap {
    /// Fault domains in service: distinct ranks with a target that is
    /// neither `DownOut` nor `New`.
    pub fn domains(&self) -> u32 {
        let mut ranks: Vec<u32> = self
            .targets
            .iter()
            .filter(|t| !matches!(t.state, TargetState::DownOut | TargetState::New))
            .map(|t| t.rank)
            .collect();
        count_distinct(&mut ranks)
    }

    /// The widest group an object can have: the fault domains in service,
    /// but no more than the pool was created with (homes are laid out over
    /// those; `pool extend` moves shards onto new servers without widening
    /// objects).
    pub fn widest_group(&self) -> u32 {
        let mut base: Vec<u32> =
            self.targets.iter().filter(|t| t.state != TargetState::New && t.added == 0).map(|t| t.rank).collect();
        self.domains().min(count_distinct(&mut base))
    }

    /// The next exclusion or extension order number.
    pub fn next_seq(&self) -> u32 {
        1 + self.targets.iter().map(|t| t.out_seq.max(t.added)).max().unwrap_or(0)
    }

    /// Targets homes are laid out over: those the pool was created with
    /// (every state but `New`).
    pub fn layout_targets(&self) -> u32 {
        let n = self.targets.iter().filter(|t| t.state != TargetState::New && t.added == 0).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Refuses a map that names one target twice. Placement stays
    /// deterministic on such a map, but its layouts are meaningless.
    pub fn validate(&self) -> Result<(), ShoalError> {
        let mut ids: Vec<(u32, u32)> = self.targets.iter().map(|t| (t.rank, t.index)).collect();
        ids.sort_unstable();
        match ids.windows(2).find(|w| w[0] == w[1]) {
            Some(w) => Err(ShoalError::invalid(format!(
                "pool map version {} lists target {} of rank {} twice",
                self.version, w[0].1, w[0].0
            ))),
            None => Ok(()),
        }
    }
}

/// Sorts, dedups and counts.
fn count_distinct(v: &mut Vec<u32>) -> u32 {
    v.sort_unstable();
    v.dedup();
    u32::try_from(v.len()).unwrap_or(u32::MAX)
}

/// Where one shard lives.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shard {
    /// The server.
    pub rank: u32,
    /// The target index on that server.
    pub target: u32,
    /// The target is `Up` or `UpIn`.
    pub available: bool,
    /// The shard was remapped from a `DownOut` home.
    pub spare: bool,
    /// Whether reads may use it: available, and not a spare whose shard is
    /// still being rebuilt (it takes writes meanwhile).
    pub readable: bool,
    /// While a drain or an extension is in progress: the (rank, target)
    /// this shard will live on once it is done. It gets every update and punch the
    /// shard gets, and is rebuilt from it; it serves no reads until then.
    #[serde(default)]
    pub shadow: Option<(u32, u32)>,
}

/// The shards of one object: `groups[g][i]` is shard `i` of group `g`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub groups: Vec<Vec<Shard>>,
}

impl Layout {
    /// The group that holds `dkey` (see [`dkey_group`]).
    pub fn dkey_shards(&self, dkey: &[u8]) -> &[Shard] {
        let ngroups = u32::try_from(self.groups.len()).unwrap_or(u32::MAX);
        self.groups.get(dkey_group(dkey, ngroups) as usize).map_or(&[], Vec::as_slice)
    }
}

/// One ring position.
#[derive(Clone, Copy, Debug)]
struct Slot {
    rank: u32,
    target: u32,
    state: TargetState,
    out_seq: u32,
    added: u32,
}

impl Slot {
    fn shard(self, spare: bool) -> Shard {
        let available = self.state.is_available();
        Shard { rank: self.rank, target: self.target, available, spare, readable: available, shadow: None }
    }
}

/// The placement ring of one pool map, built once and shared by every
/// layout computed against that map. A layout costs O(shards) plus the
/// short walks that skip repeated ranks and `DownOut` targets.
#[derive(Clone, Debug)]
pub struct Placement {
    version: u32,
    /// The pool's first targets (where homes are), then the targets of
    /// each extension in order, then those of an extension in progress.
    ring: Vec<Slot>,
    /// How many of `ring` the pool was created with.
    base: usize,
    /// Distinct ranks among those.
    ring_ranks: usize,
    /// Excluded targets whose shards are not rebuilt yet.
    rebuilding: Vec<(u32, u32)>,
}

impl Placement {
    /// Builds the ring of `map`.
    pub fn new(map: &PoolMap) -> Self {
        Placement::with_rebuilding(map, &[])
    }

    /// The placement of `map` where the spares of the excluded targets in
    /// `rebuilding` (rank, index) are not rebuilt yet: they take writes but
    /// are not readable. `New` targets in `rebuilding` are an extension in
    /// progress: shards that will move to them name them as their shadow.
    pub fn with_rebuilding(map: &PoolMap, rebuilding: &[(u32, u32)]) -> Self {
        let slot =
            |t: &PoolTarget| Slot { rank: t.rank, target: t.index, state: t.state, out_seq: t.out_seq, added: t.added };
        let joining = |t: &PoolTarget| t.state == TargetState::New && rebuilding.contains(&(t.rank, t.index));
        // Round `index`, then ranks in ascending order; the sorts are stable
        // so even a map with duplicate targets orders deterministically.
        let mut ring: Vec<Slot> =
            map.targets.iter().filter(|t| t.state != TargetState::New && t.added == 0).map(slot).collect();
        ring.sort_by_key(|s| (s.target, s.rank));
        let base = ring.len();
        let mut ranks: Vec<u32> = ring.iter().map(|s| s.rank).collect();
        let ring_ranks = count_distinct(&mut ranks) as usize;
        let mut extended: Vec<Slot> =
            map.targets.iter().filter(|t| t.state != TargetState::New && t.added > 0).map(slot).collect();
        extended.sort_by_key(|s| (s.added, s.target, s.rank));
        let mut pending: Vec<Slot> = map.targets.iter().filter(|t| joining(t)).map(slot).collect();
        pending.sort_by_key(|s| (s.target, s.rank));
        ring.extend(extended);
        ring.extend(pending);
        Placement { version: map.version, ring, base, ring_ranks, rebuilding: rebuilding.to_vec() }
    }

    /// The version of the map this ring was built from.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Where the shards of object `oid` of container `cont` live.
    ///
    /// While targets drain, or an extension is in progress, each shard
    /// that will move once it is done names where it goes as its `shadow`.
    ///
    /// Errors when the class is invalid, the map has no targets in its
    /// layout, or a group needs more servers than the map has.
    pub fn layout(&self, cont: ContId, oid: Oid, class: ObjectClass) -> Result<Layout, ShoalError> {
        let mut now = self.layout_as(cont, oid, class, false)?;
        if self.ring.iter().all(|s| !matches!(s.state, TargetState::Drain | TargetState::New)) {
            return Ok(now);
        }
        let then = self.layout_as(cont, oid, class, true)?;
        for (g, h) in now.groups.iter_mut().zip(&then.groups) {
            for (s, t) in g.iter_mut().zip(h) {
                if (s.rank, s.target) != (t.rank, t.target) && t.available {
                    s.shadow = Some((t.rank, t.target));
                }
            }
        }
        Ok(now)
    }

    /// The layout with draining targets in service and an extension in
    /// progress not done (`then` false), or with both done (true: where
    /// the shards go).
    fn layout_as(&self, cont: ContId, oid: Oid, class: ObjectClass, then: bool) -> Result<Layout, ShoalError> {
        let out = |s: TargetState| s == TargetState::DownOut || (then && s == TargetState::Drain);
        // A draining target is in the rebuilding list (its shadows are
        // being filled) but serves reads until the drain is done; so does
        // a joining one, which serves nothing until then.
        let pending = |s: Slot| {
            !matches!(s.state, TargetState::Drain | TargetState::New) && self.rebuilding.contains(&(s.rank, s.target))
        };
        // When a target joined the layout: 0 for the first ones; a joining
        // one just before draining ones leave, and only in `then`.
        let joined = |s: Slot| match s.state {
            TargetState::New if then => u32::MAX - 1,
            TargetState::New => u32::MAX,
            _ => s.added,
        };
        class.validate()?;
        let len = self.base;
        if len == 0 {
            return Err(ShoalError::invalid(format!("pool map version {} has no targets in its layout", self.version)));
        }
        let n = class.group_size() as usize;
        if n > self.ring_ranks {
            return Err(ShoalError::invalid(format!(
                "class {class} needs {n} fault domains (servers) but pool map version {} has {} (servers added by \
                 `pool extend` take a share of every object's shards but do not make objects wider)",
                self.version, self.ring_ranks
            )));
        }
        let ngroups = class.groups_in(u32::try_from(len).unwrap_or(u32::MAX)) as usize;
        let start = self.start(cont, oid, ngroups * n);

        // Home positions, group after group, on the pool's first targets.
        let mut homes: Vec<usize> = Vec::with_capacity(ngroups * n);
        for g in 0..ngroups {
            let mut pos = (start + (g * n) % len) % len;
            homes.push(pos);
            for _ in 1..n {
                let group = &homes[g * n..];
                pos = (1..=len)
                    .map(|k| (pos + k) % len)
                    .find(|&p| group.iter().all(|&h| self.ring[h].rank != self.ring[p].rank))
                    .ok_or_else(|| ShoalError::Internal(format!("class {class}: no free rank in the ring")))?;
                homes.push(pos);
            }
        }

        // Then the pool's history is replayed in order: extensions and
        // exclusions (a draining target counts as the newest, an extension
        // in progress just before it). At an extension, each shard moves
        // to one of its targets with the share of the targets it adds (its
        // new home, by a hash of the object and shard); at an exclusion,
        // only the shards on the newly excluded targets (homes or spares)
        // take the first free spare among the targets in the layout by
        // then, so an exclusion never moves a shard that was elsewhere.
        // The spare scan starts just after the object's last first home.
        let last_home = homes.last().map_or(0, |&last| last);
        let when = |s: Slot| if s.state == TargetState::Drain { u32::MAX } else { s.out_seq };
        let mut times: Vec<u32> = self.ring.iter().filter(|s| out(s.state)).map(|s| when(*s)).collect();
        times.extend(self.ring[len..].iter().map(|s| joined(*s)).filter(|&t| t != u32::MAX));
        times.sort_unstable();
        times.dedup();
        let mut spare_of: Vec<Option<usize>> = vec![None; homes.len()];
        // Per shard: the ranks it has held (its first home, and places an
        // extension moved it from). They stay taken for the rest of its
        // group, like a home that is excluded: no other shard of the group
        // ever lands where it was (its old copies would mix with theirs).
        let mut held: Vec<Vec<u32>> = homes.iter().map(|&h| vec![self.ring[h].rank]).collect();
        // Per shard: whether a target it left (its home, or a spare it had)
        // is still being rebuilt; then its place now is not rebuilt yet.
        let mut left_pending = vec![false; homes.len()];
        for &now in &times {
            // Targets in the layout by then (those joining now included, so
            // that shards with nowhere to go find a spare on them now, not
            // at some later exclusion, which must move nothing else).
            let present = |s: Slot| joined(s) <= now;
            let joining: Vec<usize> = (len..self.ring.len()).filter(|&p| joined(self.ring[p]) == now).collect();
            if !joining.is_empty() {
                let add = joining.len() as u64;
                let total = add + (0..self.ring.len()).filter(|&p| joined(self.ring[p]) < now).count() as u64;
                let mut new_ranks: Vec<u32> = joining.iter().map(|&p| self.ring[p].rank).collect();
                let new_ranks = count_distinct(&mut new_ranks) as u64;
                let first = self.ring[joining[0]];
                let salt = mix64((u64::from(first.rank) << 32) | u64::from(first.target));
                let object = object_hash(cont, oid) ^ mix64(oid.lo ^ mix64(oid.hi));
                for g in 0..ngroups {
                    // The group moves `n * add / total` shards on average
                    // (each to another new rank, so at most `new_ranks`),
                    // picked by hash.
                    let h = mix64(object ^ mix64(salt.wrapping_add(g as u64 + 1)));
                    let share = n as u64 * add;
                    let count = (share / total + u64::from(h % total < share % total)).min(new_ranks) as usize;
                    let mut order: Vec<usize> = (0..n).collect();
                    order.sort_by_key(|&i| mix64(h ^ (i as u64 + 1)));
                    for &i in order.iter().take(count) {
                        let s = g * n + i;
                        let c = (mix64(h ^ mix64(i as u64 + 1)) % add) as usize;
                        let to = (0..joining.len()).map(|k| joining[(c + k) % joining.len()]).find(|&p| {
                            (0..n).filter(|&j| j != i).all(|j| self.ring[homes[g * n + j]].rank != self.ring[p].rank)
                        });
                        if let Some(p) = to {
                            let at = spare_of[s].unwrap_or(homes[s]);
                            held[s].push(self.ring[at].rank);
                            homes[s] = p;
                            spare_of[s] = None;
                            // Its copy there was made while the extension
                            // ran (from a readable copy), whatever becomes
                            // of the places it left.
                            left_pending[s] = false;
                        }
                    }
                }
            }
            let gone = |s: Slot| out(s.state) && when(s) <= now;
            for s in 0..homes.len() {
                let at = spare_of[s].unwrap_or(homes[s]);
                if !gone(self.ring[at]) {
                    continue;
                }
                let (g, i) = (s / n, s % n);
                let taken = |rank: u32| {
                    (0..n).filter(|&j| j != i).any(|j| {
                        self.ring[homes[g * n + j]].rank == rank
                            || spare_of[g * n + j].is_some_and(|p| self.ring[p].rank == rank)
                            || held[g * n + j].contains(&rank)
                    })
                };
                let spare = self.next_position_index(last_home, |pos, cand| {
                    present(cand) && !gone(cand) && !taken(cand.rank) && !spare_of.contains(&Some(pos))
                });
                left_pending[s] |= pending(self.ring[at]);
                if spare.is_some() || spare_of[s].is_some_and(|p| gone(self.ring[p])) {
                    spare_of[s] = spare;
                }
            }
        }
        let mut groups = Vec::with_capacity(ngroups);
        for (g, group) in homes.chunks(n).enumerate() {
            let mut shards = Vec::with_capacity(n);
            for (i, &home) in group.iter().enumerate() {
                let slot = self.ring[home];
                if !out(slot.state) {
                    // A home being rebuilt (a server coming back) takes
                    // writes but serves no reads until it is. A joining
                    // one (only in `then`) takes the shards' copies.
                    let mut sh = slot.shard(false);
                    sh.available |= slot.state == TargetState::New;
                    sh.readable &= !pending(slot) && !left_pending[g * n + i];
                    shards.push(sh);
                    continue;
                }
                shards.push(match spare_of[g * n + i] {
                    Some(pos) => {
                        let cand = self.ring[pos];
                        let mut sh = cand.shard(true);
                        sh.available |= cand.state == TargetState::New;
                        sh.readable &= !left_pending[g * n + i] && !pending(cand);
                        sh
                    }
                    // Nowhere to drain to: it stays where it is.
                    None if then && slot.state == TargetState::Drain => slot.shard(false),
                    // Nowhere to go: the shard stays home and unavailable.
                    None => Shard { available: false, readable: false, ..slot.shard(false) },
                });
            }
            groups.push(shards);
        }
        Ok(Layout { groups })
    }

    /// The object's first ring position: `(h + seq * span) mod L`, over the
    /// pool's first targets.
    fn start(&self, cont: ContId, oid: Oid, span: usize) -> usize {
        let len = self.base as u128;
        let h = u128::from(object_hash(cont, oid)) % len;
        let step = (oid_seq(oid) % len) * (span as u128 % len) % len;
        ((h + step) % len) as usize
    }

    /// The first position after `from` (wrapping, at most one lap) whose
    /// slot satisfies `ok`, with the position passed to `ok`.
    fn next_position_index(&self, from: usize, ok: impl Fn(usize, Slot) -> bool) -> Option<usize> {
        let len = self.ring.len();
        (1..=len).map(|k| (from + k) % len).find(|&pos| ok(pos, self.ring[pos]))
    }
}

/// Where the shards of object `oid` of container `cont` live in `map`.
/// Builds the ring on every call; use [`Placement`] for many lookups.
pub fn layout(map: &PoolMap, cont: ContId, oid: Oid, class: ObjectClass) -> Result<Layout, ShoalError> {
    Placement::new(map).layout(cont, oid, class)
}

/// The group of an object with `ngroups` groups that holds `dkey`: a stable
/// hash, so all of one dkey lives in one group. `0` when there is at most
/// one group.
pub fn dkey_group(dkey: &[u8], ngroups: u32) -> u32 {
    if ngroups <= 1 {
        return 0;
    }
    (mix64(fnv1a(dkey)) % u64::from(ngroups)) as u32
}

/// The placement hash of an object: the container mixed with the OID's type
/// and class bits. Stable forever.
fn object_hash(cont: ContId, oid: Oid) -> u64 {
    let c = mix64((cont.0 as u64) ^ mix64((cont.0 >> 64) as u64));
    mix64(c ^ (oid.hi >> 24))
}

/// The splitmix64 finalizer: a cheap, well-spread 64-bit mix.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::oclass::{make_oid, Groups, ObjType, Redundancy, EC_CODES};

    /// A small deterministic generator for seeded test loops.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            mix64(self.0)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn class(name: &str) -> ObjectClass {
        name.parse().unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn uniform_map(ranks: u32, per_rank: u32) -> PoolMap {
        let targets = (0..ranks)
            .flat_map(|rank| (0..per_rank).map(move |index| PoolTarget::new(rank, index, TargetState::Up)))
            .collect();
        PoolMap { version: 1, targets }
    }

    fn set_state(map: &mut PoolMap, rank: u32, index: u32, state: TargetState) {
        for t in &mut map.targets {
            if t.rank == rank && t.index == index {
                t.state = state;
            }
        }
    }

    /// The rules of the module doc, written as plainly as possible and
    /// independently of [`Placement`].
    fn oracle(map: &PoolMap, cont: ContId, oid: Oid, class: ObjectClass) -> Option<Layout> {
        // 1. The ring, round by round.
        let mut ranks: Vec<u32> = map.targets.iter().map(|t| t.rank).collect();
        ranks.sort();
        ranks.dedup();
        let rounds = map.targets.iter().map(|t| t.index).max()?;
        let mut ring: Vec<PoolTarget> = Vec::new();
        for round in 0..=rounds {
            for &rank in &ranks {
                for t in &map.targets {
                    if t.rank == rank && t.index == round && t.state != TargetState::New {
                        ring.push(*t);
                    }
                }
            }
        }
        let ring_ranks: HashSet<u32> = ring.iter().map(|t| t.rank).collect();
        let n = class.group_size() as usize;
        if ring.is_empty() || n > ring_ranks.len() {
            return None;
        }
        let len = ring.len();

        // 2. The start, without modular shortcuts.
        let ngroups = class.groups_in(len as u32) as usize;
        let start = (u128::from(object_hash(cont, oid)) + oid_seq(oid) * (ngroups * n) as u128) % len as u128;
        let start = start as usize;

        // 3. Homes as unwrapped positions.
        let mut homes: Vec<Vec<usize>> = Vec::new();
        for g in 0..ngroups {
            let mut group: Vec<usize> = vec![start + g * n];
            while group.len() < n {
                let mut p = group[group.len() - 1] + 1;
                while group.iter().any(|&h| ring[h % len].rank == ring[p % len].rank) {
                    p += 1;
                }
                group.push(p);
            }
            homes.push(group);
        }

        // 4. Spares: replay the exclusions in order; after each, every
        // shard sitting on a target excluded by then looks for the first
        // free target after the last home.
        let last = homes[ngroups - 1][n - 1] % len;
        let mut layout = Layout { groups: Vec::new() };
        let mut times: Vec<u32> = ring.iter().filter(|t| t.state == TargetState::DownOut).map(|t| t.out_seq).collect();
        times.sort();
        times.dedup();
        let mut chosen: std::collections::HashMap<(usize, usize), usize> = std::collections::HashMap::new();
        for now in times {
            let gone = |t: &PoolTarget| t.state == TargetState::DownOut && t.out_seq <= now;
            for g in 0..ngroups {
                for i in 0..n {
                    let at = chosen.get(&(g, i)).copied().unwrap_or(homes[g][i] % len);
                    if !gone(&ring[at]) {
                        continue;
                    }
                    let mut found = None;
                    for k in 1..=len {
                        let q = (last + k) % len;
                        let t = ring[q];
                        let rank_taken = (0..n).any(|j| {
                            j != i
                                && (ring[homes[g][j] % len].rank == t.rank
                                    || chosen.get(&(g, j)).is_some_and(|&c| ring[c].rank == t.rank))
                        });
                        let used = chosen.values().any(|&c| c == q);
                        if !gone(&t) && !rank_taken && !used {
                            found = Some(q);
                            break;
                        }
                    }
                    match found {
                        Some(q) => {
                            chosen.insert((g, i), q);
                        }
                        None => {
                            chosen.remove(&(g, i));
                        }
                    }
                }
            }
        }
        for (g, group) in homes.iter().enumerate() {
            let mut shards: Vec<Shard> = Vec::new();
            for i in 0..n {
                let home = ring[group[i] % len];
                let mut shard = Shard {
                    rank: home.rank,
                    target: home.index,
                    available: home.state.is_available(),
                    spare: false,
                    readable: home.state.is_available(),
                    shadow: None,
                };
                if home.state == TargetState::DownOut {
                    if let Some(&q) = chosen.get(&(g, i)) {
                        let t = ring[q];
                        shard = Shard {
                            rank: t.rank,
                            target: t.index,
                            available: t.state.is_available(),
                            spare: true,
                            readable: t.state.is_available(),
                            shadow: None,
                        };
                    }
                }
                shards.push(shard);
            }
            layout.groups.push(shards);
        }
        Some(layout)
    }

    /// A random map: a few ranks with sparse ids, 1..4 targets each with
    /// possibly sparse indices, random states.
    fn random_map(rng: &mut Rng) -> PoolMap {
        let nranks = 1 + rng.below(10) as usize;
        let mut ranks: Vec<u32> = Vec::new();
        while ranks.len() < nranks {
            let r = rng.below(30) as u32;
            if !ranks.contains(&r) {
                ranks.push(r);
            }
        }
        let mut targets = Vec::new();
        for rank in ranks {
            let count = 1 + rng.below(4) as usize;
            let mut indices: Vec<u32> = Vec::new();
            while indices.len() < count {
                let i = if rng.below(3) == 0 { rng.below(6) as u32 } else { indices.len() as u32 };
                if !indices.contains(&i) {
                    indices.push(i);
                }
            }
            for index in indices {
                let state = match rng.below(20) {
                    0..=9 => TargetState::Up,
                    10..=12 => TargetState::UpIn,
                    13..=14 => TargetState::Down,
                    15..=17 => TargetState::DownOut,
                    _ => TargetState::New,
                };
                // Excluded targets in a random order.
                let out_seq = if state == TargetState::DownOut { 1 + rng.below(10) as u32 } else { 0 };
                targets.push(PoolTarget { out_seq, ..PoolTarget::new(rank, index, state) });
            }
        }
        PoolMap { version: rng.below(100) as u32, targets }
    }

    /// Adds 1 or 2 new ranks (1 to 3 targets each) to `map` as an
    /// extension that joined the layout; `UpIn`, or now and then excluded
    /// later.
    fn extend_randomly(map: &mut PoolMap, rng: &mut Rng) {
        let added = map.next_seq();
        let first = 1 + map.targets.iter().map(|t| t.rank).max().unwrap_or(0);
        for rank in first..first + 1 + rng.below(2) as u32 {
            for index in 0..1 + rng.below(3) as u32 {
                let mut t = PoolTarget { added, ..PoolTarget::new(rank, index, TargetState::UpIn) };
                if rng.below(6) == 0 {
                    (t.state, t.out_seq) = (TargetState::DownOut, added + 1 + rng.below(3) as u32);
                }
                map.targets.push(t);
            }
        }
    }

    /// `map` with 1 or 2 new ranks joining (an extension in progress), the
    /// targets joining, and the map once they have joined.
    fn with_joining(map: &PoolMap, rng: &mut Rng) -> (PoolMap, Vec<(u32, u32)>, PoolMap) {
        let mut joining = map.clone();
        let first = 1 + map.targets.iter().map(|t| t.rank).max().unwrap_or(0);
        for rank in first..first + 1 + rng.below(2) as u32 {
            for index in 0..1 + rng.below(3) as u32 {
                joining.targets.push(PoolTarget::new(rank, index, TargetState::New));
            }
        }
        joining.version += 1;
        let new: Vec<(u32, u32)> =
            joining.targets.iter().filter(|t| t.rank >= first).map(|t| (t.rank, t.index)).collect();
        let mut joined = joining.clone();
        let added = map.next_seq();
        for t in joined.targets.iter_mut().filter(|t| t.rank >= first) {
            (t.state, t.added) = (TargetState::UpIn, added);
        }
        joined.version += 1;
        (joining, new, joined)
    }

    fn random_class(rng: &mut Rng) -> ObjectClass {
        let groups = match rng.below(5) {
            0 => Groups::Max,
            g => Groups::Fixed(g as u32),
        };
        let redundancy = match rng.below(3) {
            0 => Redundancy::None,
            1 => Redundancy::Replicas(2 + rng.below(5) as u8),
            _ => {
                let (k, p) = EC_CODES[rng.below(EC_CODES.len() as u64) as usize];
                Redundancy::Ec { k, p }
            }
        };
        ObjectClass { redundancy, groups }
    }

    fn random_oid(rng: &mut Rng, class: ObjectClass) -> Oid {
        let seq = if rng.below(2) == 0 { u128::from(rng.below(1000)) } else { u128::from(rng.next()) << 24 };
        let ty = [ObjType::Multi, ObjType::Kv, ObjType::Array][rng.below(3) as usize];
        make_oid(seq, class, ty)
    }

    /// Checks the invariants every layout holds against its map.
    fn check_layout(map: &PoolMap, class: ObjectClass, layout: &Layout) {
        let n = class.group_size() as usize;
        assert_eq!(layout.groups.len(), class.groups_in(map.layout_targets()) as usize);
        let mut spares = HashSet::new();
        for group in &layout.groups {
            assert_eq!(group.len(), n);
            let ranks: HashSet<u32> = group.iter().map(|s| s.rank).collect();
            assert_eq!(ranks.len(), n, "a group repeats a rank: {group:?}");
            for s in group {
                let t = map
                    .targets
                    .iter()
                    .find(|t| t.rank == s.rank && t.index == s.target)
                    .expect("shard on a known target");
                assert_ne!(t.state, TargetState::New);
                assert_eq!(s.available, t.state.is_available());
                if s.spare {
                    assert_ne!(t.state, TargetState::DownOut);
                    assert!(spares.insert((s.rank, s.target)), "one spare target used twice by one object");
                }
            }
        }
    }

    /// A shard whose spare is excluded in turn moves on, and is not
    /// readable there until rebuilt, though its home is long rebuilt.
    #[test]
    fn a_shard_moved_off_an_excluded_spare_is_not_readable_until_rebuilt() {
        let c = class("RP_2G1");
        let mut tried = 0;
        for seq in 0..50u128 {
            let mut map = uniform_map(5, 1);
            let oid = make_oid(seq, c, ObjType::Kv);
            let home = layout(&map, ContId(3), oid, c).unwrap().groups[0][0];
            if home.rank == 0 {
                continue;
            }
            map.targets[home.rank as usize].state = TargetState::DownOut;
            map.targets[home.rank as usize].out_seq = 1;
            let first = layout(&map, ContId(3), oid, c).unwrap().groups[0][0];
            assert!(first.spare && first.readable);
            map.targets[first.rank as usize].state = TargetState::DownOut;
            map.targets[first.rank as usize].out_seq = 2;
            let p = Placement::with_rebuilding(&map, &[(first.rank, first.target)]);
            let second = p.layout(ContId(3), oid, c).unwrap().groups[0][0];
            assert!(second.spare && second.available && !second.readable, "{second:?}");
            tried += 1;
        }
        assert!(tried > 10);
    }

    #[test]
    fn an_exclusion_or_a_drain_never_moves_another_shard() {
        let mut rng = Rng(11);
        let mut checked = 0;
        for round in 0..300 {
            let mut map = random_map(&mut rng);
            // Half of the maps were extended before.
            if round % 2 == 1 {
                extend_randomly(&mut map, &mut rng);
            }
            let candidates: Vec<usize> =
                (0..map.targets.len()).filter(|&i| map.targets[i].state.is_available()).collect();
            if candidates.is_empty() {
                continue;
            }
            let pick = candidates[rng.below(candidates.len() as u64) as usize];
            let next_seq = map.next_seq();
            let mut excluded = map.clone();
            excluded.targets[pick].state = TargetState::DownOut;
            excluded.targets[pick].out_seq = next_seq;
            let mut draining = map.clone();
            draining.targets[pick].state = TargetState::Drain;
            let gone = (map.targets[pick].rank, map.targets[pick].index);
            let (before, after, during) = (Placement::new(&map), Placement::new(&excluded), Placement::new(&draining));
            for _ in 0..20 {
                let class = random_class(&mut rng);
                let cont = ContId(u128::from(rng.next()));
                let oid = random_oid(&mut rng, class);
                let (Ok(b), Ok(a), Ok(d)) =
                    (before.layout(cont, oid, class), after.layout(cont, oid, class), during.layout(cont, oid, class))
                else {
                    continue;
                };
                for g in 0..b.groups.len() {
                    for (i, (bs, as_)) in b.groups[g].iter().zip(&a.groups[g]).enumerate() {
                        // Only the shard that was on the excluded target moves.
                        if (bs.rank, bs.target) != gone {
                            assert_eq!(
                                (bs.rank, bs.target),
                                (as_.rank, as_.target),
                                "group {g} shard {i} moved; gone {gone:?}\nbefore {b:?}\nafter {a:?}\nmap {map:?}"
                            );
                        }
                        // While draining, nothing moves; the shadow is where it goes.
                        let ds = d.groups[g][i];
                        assert_eq!((ds.rank, ds.target), (bs.rank, bs.target));
                        if as_.available && (as_.rank, as_.target) != (bs.rank, bs.target) {
                            assert_eq!(ds.shadow, Some((as_.rank, as_.target)));
                        }
                    }
                    // No target holds two shards of a group, shadows included.
                    let mut places: Vec<(u32, u32)> = d.groups[g].iter().map(|s| (s.rank, s.target)).collect();
                    places.extend(d.groups[g].iter().filter_map(|s| s.shadow));
                    let n = places.len();
                    places.sort_unstable();
                    places.dedup();
                    assert_eq!(places.len(), n, "group {g} of {:?}", d.groups[g]);
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    /// While an extension is in progress nothing moves, and each shard that
    /// will move names its new place as its shadow; once it is done, those
    /// are exactly the places that changed, all on the new targets (but
    /// for shards that had nowhere to go), and no target ever holds two
    /// shards of a group (shadows included).
    #[test]
    fn an_extension_moves_shards_only_onto_the_new_targets() {
        let mut rng = Rng(23);
        let mut checked = 0;
        for round in 0..300 {
            let mut map = random_map(&mut rng);
            if round % 3 == 0 {
                extend_randomly(&mut map, &mut rng);
            }
            let (joining, new, joined) = with_joining(&map, &mut rng);
            let before = Placement::new(&map);
            let during = Placement::with_rebuilding(&joining, &new);
            // A joining server that went down is left out until it is back.
            let paused = Placement::new(&joining);
            let after = Placement::new(&joined);
            for _ in 0..20 {
                let class = random_class(&mut rng);
                let cont = ContId(u128::from(rng.next()));
                let oid = random_oid(&mut rng, class);
                let Ok(b) = before.layout(cont, oid, class) else { continue };
                let (d, a) = (during.layout(cont, oid, class).unwrap(), after.layout(cont, oid, class).unwrap());
                assert_eq!(paused.layout(cont, oid, class).unwrap(), b);
                check_layout(&joined, class, &a);
                for g in 0..b.groups.len() {
                    for (i, (bs, as_)) in b.groups[g].iter().zip(&a.groups[g]).enumerate() {
                        let ds = d.groups[g][i];
                        assert_eq!((ds.rank, ds.target), (bs.rank, bs.target), "nothing moves while joining");
                        if (as_.rank, as_.target) == (bs.rank, bs.target) {
                            assert_eq!(ds.shadow, None);
                        } else {
                            // Onto a new target; or a shard that had nowhere
                            // to go finds a spare (one freed by a move, too).
                            assert!(
                                new.contains(&(as_.rank, as_.target)) || (!bs.available && as_.spare),
                                "group {g} shard {i} moved to {as_:?}\nbefore {b:?}\nafter {a:?}\nmap {joined:?}"
                            );
                            let want = as_.available.then_some((as_.rank, as_.target));
                            assert_eq!(ds.shadow, want, "group {g} shard {i}\nduring {d:?}\nafter {a:?}");
                        }
                    }
                    let mut places: Vec<(u32, u32)> = d.groups[g].iter().map(|s| (s.rank, s.target)).collect();
                    places.extend(d.groups[g].iter().filter_map(|s| s.shadow));
                    let n = places.len();
                    places.sort_unstable();
                    places.dedup();
                    assert_eq!(places.len(), n, "group {g} of {:?}", d.groups[g]);
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000, "{checked}");
    }

    /// An extension moves about the share of shards its targets add to the
    /// pool, spread over them.
    #[test]
    fn an_extension_moves_a_fair_share() {
        for (ranks, per, add) in [(6u32, 1u32, 2u32), (4, 2, 1), (8, 2, 1), (5, 1, 5)] {
            let map = uniform_map(ranks, per);
            let mut joined = map.clone();
            for rank in ranks..ranks + add {
                joined.targets.extend(
                    (0..per).map(|index| PoolTarget { added: 1, ..PoolTarget::new(rank, index, TargetState::UpIn) }),
                );
            }
            let (before, after) = (Placement::new(&map), Placement::new(&joined));
            // A server shards moved away from is being rebuilt (it came
            // back): the copies on the new targets stay readable.
            let mut back = joined.clone();
            set_state(&mut back, 0, 0, TargetState::Up);
            let rebuilding = Placement::with_rebuilding(&back, &[(0, 0)]);
            let mut per_target: std::collections::HashMap<(u32, u32), u32> = Default::default();
            let (mut moved, mut total) = (0u32, 0u32);
            for name in ["RP_3G1", "EC_2P1G1", "RP_2GX", "S1"] {
                let class = class(name);
                for seq in 0..2000u128 {
                    let oid = make_oid(seq, class, ObjType::Array);
                    let b = before.layout(ContId(9), oid, class).unwrap();
                    let a = after.layout(ContId(9), oid, class).unwrap();
                    let r = rebuilding.layout(ContId(9), oid, class).unwrap();
                    let flat = b.groups.iter().flatten().zip(a.groups.iter().flatten()).zip(r.groups.iter().flatten());
                    for ((bs, as_), rs) in flat {
                        total += 1;
                        if (bs.rank, bs.target) != (as_.rank, as_.target) {
                            assert!(rs.readable, "moved from {bs:?} to {rs:?}");
                            moved += 1;
                            *per_target.entry((as_.rank, as_.target)).or_default() += 1;
                        }
                    }
                }
            }
            let share = f64::from(add) / f64::from(ranks + add);
            let got = f64::from(moved) / f64::from(total);
            assert!(got > share * 0.75 && got < share * 1.1, "{ranks}+{add} ranks: moved {got:.3}, share {share:.3}");
            assert_eq!(per_target.len() as u32, add * per, "every new target gets shards");
            let (lo, hi) = (per_target.values().min().unwrap(), per_target.values().max().unwrap());
            assert!(f64::from(*hi) < f64::from(*lo) * 1.5, "{per_target:?}");
        }
    }

    #[test]
    fn matches_the_naive_oracle_on_random_maps() {
        let mut rng = Rng(7);
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..300 {
            let map = random_map(&mut rng);
            let placement = Placement::new(&map);
            for _ in 0..30 {
                let class = random_class(&mut rng);
                let cont = ContId(u128::from(rng.next()) << 64 | u128::from(rng.next()));
                let oid = random_oid(&mut rng, class);
                let got = placement.layout(cont, oid, class);
                let want = oracle(&map, cont, oid, class);
                match (&got, want) {
                    (Ok(got), Some(want)) => {
                        assert_eq!(got, &want, "map {map:?} class {class} oid {oid}");
                        check_layout(&map, class, got);
                        ok += 1;
                    }
                    (Err(_), None) => refused += 1,
                    (got, want) => panic!("map {map:?} class {class} oid {oid}: {got:?} vs oracle {want:?}"),
                }
            }
        }
        // Both outcomes are exercised.
        assert!(ok > 3000 && refused > 300, "ok {ok} refused {refused}");
    }

    #[test]
    fn layouts_are_deterministic() {
        let mut rng = Rng(11);
        for _ in 0..100 {
            let map = random_map(&mut rng);
            let class = random_class(&mut rng);
            let oid = random_oid(&mut rng, class);
            let cont = ContId(u128::from(rng.next()));
            let a = layout(&map, cont, oid, class);
            let b = Placement::new(&map.clone()).layout(cont, oid, class);
            assert_eq!(a, b);
        }
    }

    #[test]
    fn placement_never_changes() {
        // Golden values: placement is computed, never stored, so a change
        // here moves every object of every existing pool.
        let map = uniform_map(4, 2);
        let oid = make_oid(5, class("RP_3G2"), ObjType::Kv);
        let got = layout(&map, ContId(42), oid, class("RP_3G2")).expect("fits");
        let ranks: Vec<Vec<(u32, u32)>> =
            got.groups.iter().map(|g| g.iter().map(|s| (s.rank, s.target)).collect()).collect();
        assert_eq!(ranks, [[(2, 1), (3, 1), (0, 0)], [(1, 0), (2, 0), (3, 0)]]);
        assert_eq!(dkey_group(b"hello", 1000), 544);
    }

    #[test]
    fn refuses_what_cannot_be_placed() {
        let map = uniform_map(3, 4);
        let oid = make_oid(1, class("EC_2P2G1"), ObjType::Array);
        let err = layout(&map, ContId(1), oid, class("EC_2P2G1")).expect_err("4 shards on 3 servers");
        assert!(err.to_string().contains("needs 4 fault domains"), "{err}");

        let empty = PoolMap { version: 3, targets: Vec::new() };
        assert!(layout(&empty, ContId(1), oid, class("S1")).is_err());
        let mut all_new = uniform_map(2, 2);
        all_new.targets.iter_mut().for_each(|t| t.state = TargetState::New);
        assert!(layout(&all_new, ContId(1), oid, class("S1")).is_err());

        let invalid = ObjectClass { redundancy: Redundancy::Replicas(9), groups: Groups::Max };
        assert!(layout(&uniform_map(10, 1), ContId(1), oid, invalid).is_err());
    }

    /// Draining changes no shard's place; each shard names as its shadow
    /// where it will be once the drain is done, and stays readable.
    #[test]
    fn a_drain_moves_nothing_yet_and_shadows_where_shards_go() {
        let c = class("RP_3G1");
        let e = class("EC_2P1G1");
        for (drain, out_before) in [(2u32, None), (4, Some(1u32))] {
            let mut map = uniform_map(7, 2);
            if let Some(r) = out_before {
                (0..2).for_each(|i| set_state(&mut map, r, i, TargetState::DownOut));
            }
            let before = Placement::new(&map);
            let mut draining = map.clone();
            (0..2).for_each(|i| set_state(&mut draining, drain, i, TargetState::Drain));
            let rebuilding: Vec<(u32, u32)> = (0..2).map(|i| (drain, i)).collect();
            let now = Placement::with_rebuilding(&draining, &rebuilding);
            let mut done = map.clone();
            (0..2).for_each(|i| set_state(&mut done, drain, i, TargetState::DownOut));
            let after = Placement::new(&done);
            let mut shadows = 0;
            for seq in 0..200u128 {
                for cl in [c, e] {
                    let oid = make_oid(seq, cl, ObjType::Array);
                    let b = before.layout(ContId(5), oid, cl).expect("fits");
                    let n = now.layout(ContId(5), oid, cl).expect("fits");
                    let a = after.layout(ContId(5), oid, cl).expect("fits");
                    for ((bs, ns), as_) in
                        b.groups.iter().flatten().zip(n.groups.iter().flatten()).zip(a.groups.iter().flatten())
                    {
                        assert_eq!((ns.rank, ns.target, ns.readable), (bs.rank, bs.target, bs.readable));
                        let goes = ns.shadow.unwrap_or((ns.rank, ns.target));
                        assert_eq!(goes, (as_.rank, as_.target), "object {seq} of {cl}");
                        assert_ne!(goes.0, drain);
                        shadows += ns.shadow.is_some() as u32;
                    }
                }
            }
            assert!(shadows > 0);
        }
    }

    #[test]
    fn down_shards_stay_home_and_downout_shards_move() {
        let mut map = uniform_map(8, 2);
        let c = class("EC_4P2GX");
        let oid = make_oid(3, c, ObjType::Array);
        let before = layout(&map, ContId(9), oid, c).expect("fits");
        let victim = before.groups[0][1];

        set_state(&mut map, victim.rank, victim.target, TargetState::Down);
        let down = layout(&map, ContId(9), oid, c).expect("fits");
        assert_eq!(down.groups[0][1], Shard { available: false, readable: false, ..victim });
        check_layout(&map, c, &down);

        set_state(&mut map, victim.rank, victim.target, TargetState::DownOut);
        let out = layout(&map, ContId(9), oid, c).expect("fits");
        let moved = out.groups[0][1];
        assert!(moved.spare && moved.available && moved.readable);
        // While its shard is being rebuilt, a spare takes writes, not reads.
        let rebuilding = Placement::with_rebuilding(&map, &[(victim.rank, victim.target)]);
        let r = rebuilding.layout(ContId(9), oid, c).expect("fits").groups[0][1];
        assert!(r.spare && r.available && !r.readable);
        assert_ne!((moved.rank, moved.target), (victim.rank, victim.target));
        check_layout(&map, c, &out);
        for (g, group) in before.groups.iter().enumerate() {
            for (i, s) in group.iter().enumerate() {
                if (s.rank, s.target) != (victim.rank, victim.target) {
                    assert_eq!(out.groups[g][i], *s);
                }
            }
        }
    }

    #[test]
    fn a_shard_without_any_spare_stays_home_unavailable() {
        // RP_3 on exactly three single-target servers: no spare can exist.
        let mut map = uniform_map(3, 1);
        set_state(&mut map, 1, 0, TargetState::DownOut);
        let c = class("RP_3G1");
        let got = layout(&map, ContId(5), make_oid(0, c, ObjType::Kv), c).expect("fits");
        let lost = got.groups[0].iter().find(|s| s.rank == 1).expect("rank 1 keeps its shard");
        assert!(!lost.available && !lost.spare);
    }

    #[test]
    fn pool_map_counts() {
        let mut map = uniform_map(4, 3);
        assert_eq!((map.domains(), map.layout_targets()), (4, 12));
        for i in 0..3 {
            set_state(&mut map, 0, i, TargetState::DownOut);
        }
        set_state(&mut map, 1, 0, TargetState::New);
        set_state(&mut map, 2, 0, TargetState::Down);
        assert_eq!((map.domains(), map.layout_targets()), (3, 11));
        assert!(map.validate().is_ok());
        map.targets.push(PoolTarget::new(3, 2, TargetState::Up));
        assert!(map.validate().is_err());
    }

    #[test]
    fn dkeys_spread_evenly_and_stay_put() {
        let mut counts = [0u32; 8];
        for i in 0..10_000u64 {
            counts[dkey_group(format!("key-{i}").as_bytes(), 8) as usize] += 1;
        }
        for c in counts {
            assert!(c.abs_diff(1250) <= 125, "{counts:?}");
        }
        let mut counts = [0u32; 8];
        for chunk in 0..10_000u64 {
            counts[dkey_group(&chunk.to_le_bytes(), 8) as usize] += 1;
        }
        for c in counts {
            assert!(c.abs_diff(1250) <= 125, "{counts:?}");
        }
        assert_eq!(dkey_group(b"anything", 0), 0);
        assert_eq!(dkey_group(b"anything", 1), 0);
        let l = Layout { groups: vec![Vec::new(), Vec::new()] };
        assert!(std::ptr::eq(l.dkey_shards(b"k"), l.groups[dkey_group(b"k", 2) as usize].as_slice()));
    }

    /// Lays out `objects` (container, seq) of `class` on a 100-server,
    /// 1,000-target pool, checks the balance, excludes one target, and
    /// checks that exactly the shards it held moved.
    fn simulate(objects: &[(ContId, u128)], class: ObjectClass) {
        const RANKS: u32 = 100;
        const PER_RANK: u32 = 10;
        let slot = |s: &Shard| (s.rank * PER_RANK + s.target) as usize;
        let run = |map: &PoolMap| -> Vec<Vec<usize>> {
            let placement = Placement::new(map);
            objects
                .iter()
                .map(|&(cont, seq)| {
                    let layout = placement.layout(cont, make_oid(seq, class, ObjType::Array), class).expect("fits");
                    for group in &layout.groups {
                        let mut ranks: Vec<u32> = group.iter().map(|s| s.rank).collect();
                        assert_eq!(count_distinct(&mut ranks) as usize, group.len());
                    }
                    layout.groups.iter().flatten().map(slot).collect()
                })
                .collect()
        };

        let mut map = uniform_map(RANKS, PER_RANK);
        let before = run(&map);
        let mut counts = vec![0u64; (RANKS * PER_RANK) as usize];
        before.iter().flatten().for_each(|&t| counts[t] += 1);
        let total: u64 = counts.iter().sum();
        let mean = total as f64 / counts.len() as f64;
        for (t, &c) in counts.iter().enumerate() {
            assert!((c as f64 - mean).abs() <= 0.05 * mean, "{class}: target {t} holds {c}, mean {mean}");
        }

        let (rank, index) = (37, 4);
        let victim = (rank * PER_RANK + index) as usize;
        set_state(&mut map, rank, index, TargetState::DownOut);
        let after = run(&map);
        let mut moved = 0u64;
        for (old, new) in before.iter().zip(&after) {
            for (&o, &n) in old.iter().zip(new) {
                assert_ne!(n, victim, "{class}: a shard stays on the excluded target");
                if o == victim {
                    moved += 1;
                } else {
                    assert_eq!(o, n, "{class}: a shard moved off a healthy target");
                }
            }
        }
        let share = counts[victim] as f64 / total as f64;
        assert!(moved as f64 / total as f64 <= 1.1 * share, "{class}: moved {moved} of {total}");
        assert_eq!(moved, counts[victim]);
    }

    #[test]
    fn simulated_pool_is_balanced_and_moves_little() {
        let one: Vec<(ContId, u128)> = (0..100_000).map(|seq| (ContId(0xfeed), seq)).collect();
        let many: Vec<(ContId, u128)> =
            (0..5u128).flat_map(|c| (0..20_000).map(move |seq| (ContId(mix64(c as u64).into()), seq))).collect();
        for name in ["S1", "RP_3G1", "EC_4P2G1"] {
            simulate(&one, class(name));
            simulate(&many, class(name));
        }
    }
}
