//! Aggregation and space reclaim: old versions no read can see are
//! removed, and the data-file space they held is given back.
//!
//! The horizon: reads at epochs at or after it see exactly what they saw
//! before aggregation; reads before it may not (the service keeps it a
//! configurable time behind the clock, so only reads of history older than
//! that are affected). A version at or below the horizon is kept when it is
//! visible at the horizon (no newer version at or below the horizon and no
//! punch covers it there), since such a version stays visible at later
//! epochs until something newer replaces it; every other version at or
//! below the horizon is removed. Versions above the horizon are never
//! touched, and the newest version of any value is never removed.
//!
//! EC cells are different: a reader that finds a stripe whose newest write
//! (or punch) reached fewer than k cells reads the stripe as it was before
//! it, so what lies beneath an unconfirmed version must stay. A client that
//! saw a write or punch reach every cell of its group marks its epoch
//! *stable* on those shards ([`TargetStore::mark_stable`]); for EC objects a
//! version goes only when, at every byte, a newer stable version at or
//! below the horizon covers it, or a stable punch hides it. A writer that
//! died before marking leaves its versions (and what they cover) in place
//! until a later stable write covers them.
//!
//! Order of a removal: the record deletions are committed with a synced
//! write, then the holes are punched in the data files. A crash between the
//! two leaves unreferenced bytes, never a record that points at a hole.
//!
//! A destroyed container is dropped whole: its keys are deleted by range
//! and the space of its extents given back.

use std::sync::atomic::Ordering;

use rocksdb::{WriteBatch, WriteOptions};
use shoal_common::oclass::{oid_class, Redundancy};
use shoal_common::{ContId, Epoch, Oid, Result, ShoalError};
use tracing::{debug, info};

use super::keys::{self, BUCKET_BYTES, TAG_EXTENT, TAG_SINGLE};
use super::pieces::Pieces;
use super::read::View;
use super::record::{Location, Record};
use super::{io_err, Mutation, TargetStore, CF_META, CF_OBJECTS, CF_PUNCHES, CF_VALUES};

/// Deletions committed per synced batch.
const DELETES_PER_BATCH: usize = 4096;

/// What one aggregation pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AggStats {
    /// Akeys looked at.
    pub akeys: u64,
    /// Versions removed.
    pub removed: u64,
    /// Data-file bytes given back.
    pub freed_bytes: u64,
}

/// Deletions waiting for their synced commit, and the data-file extents
/// to free after it.
struct Reclaim<'a> {
    store: &'a TargetStore,
    batch: WriteBatch,
    n: usize,
    holes: Vec<(u32, u64, u64)>,
    stats: AggStats,
}

impl Reclaim<'_> {
    fn delete(&mut self, key: &[u8], rec: &Record) -> Result<()> {
        self.batch.delete_cf(self.store.db.cf_handle(CF_VALUES).expect("cf"), key);
        if let Location::External { file, offset } = rec.loc {
            self.holes.push((file, offset, rec.len));
            self.stats.freed_bytes += rec.len;
        }
        self.n += 1;
        self.stats.removed += 1;
        if self.n >= DELETES_PER_BATCH {
            self.commit()?;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        if self.n == 0 && self.holes.is_empty() {
            return Ok(());
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let batch = std::mem::take(&mut self.batch);
        if let Err(e) = self.store.db.write_opt(batch, &wo) {
            return Err(self.store.poison_now("aggregation metadata write", e));
        }
        let active = self.store.shared.active_file.load(Ordering::Acquire);
        self.store.files.free(&self.holes, active).map_err(|e| io_err("give back data-file space", e))?;
        self.holes.clear();
        self.n = 0;
        Ok(())
    }
}

impl TargetStore {
    pub(super) fn poison_now(&self, what: &str, e: impl std::fmt::Display) -> ShoalError {
        tracing::error!(target_id = self.id, "{what} failed, target poisoned: {e}");
        self.poisoned.store(true, Ordering::Release);
        ShoalError::Poisoned(self.id)
    }

    /// Removes versions that no read at or after `horizon` can see (see the
    /// module docs), in the akeys changed since the last pass (or all of
    /// them after a restart), and gives their space back.
    pub fn aggregate(&self, horizon: Epoch) -> Result<AggStats> {
        self.check_poison()?;
        let _one = self.shared.reclaim.lock().expect("lock");
        let full = self.shared.dirty_overflow.swap(false, Ordering::AcqRel);
        let prefixes: Vec<Vec<u8>> = {
            let mut d = self.shared.dirty.lock().expect("lock");
            let all: Vec<Vec<u8>> = if full { vec![Vec::new()] } else { d.keys().cloned().collect() };
            // Keys whose newest change is past the horizon may have more to
            // remove later: they stay for the next pass.
            d.retain(|_, e| *e > horizon);
            all
        };
        let mut r =
            Reclaim { store: self, batch: WriteBatch::default(), n: 0, holes: Vec::new(), stats: AggStats::default() };
        for prefix in prefixes {
            self.for_each_akey(&prefix, |akp| self.aggregate_akey(akp, horizon, &mut r))?;
        }
        r.commit()?;
        debug!(
            target_id = self.id,
            full,
            horizon,
            akeys = r.stats.akeys,
            removed = r.stats.removed,
            freed = r.stats.freed_bytes,
            "aggregated"
        );
        Ok(r.stats)
    }

    /// Calls `f` with every akey prefix under `prefix` (an object, dkey or
    /// akey prefix, or empty for all), a page at a time so that memory
    /// stays small however many there are.
    fn for_each_akey(&self, prefix: &[u8], mut f: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let mut cursor = prefix.to_vec();
        loop {
            let mut page = Vec::new();
            {
                let view = View::new(&self.db, &self.files, self.id);
                let mut it = view.iter(CF_VALUES);
                it.seek(&cursor);
                while let Some(k) = it.key() {
                    if !k.starts_with(prefix) || page.len() >= 256 {
                        break;
                    }
                    match akey_prefix_of(k) {
                        Some(akp) => {
                            page.push(akp.to_vec());
                            // Skip the rest of this akey's versions.
                            match keys::prefix_successor(akp) {
                                Some(next) => it.seek(&next),
                                None => break,
                            }
                        }
                        None => it.next(),
                    }
                }
                it.status().map_err(|e| io_err("scan values", e))?;
            }
            let Some(last) = page.last() else { return Ok(()) };
            let next = keys::prefix_successor(last);
            for akp in &page {
                f(akp)?;
            }
            match next {
                Some(n) if page.len() >= 256 => cursor = n,
                _ => return Ok(()),
            }
        }
    }

    fn aggregate_akey(&self, akp: &[u8], horizon: Epoch, r: &mut Reclaim<'_>) -> Result<()> {
        r.stats.akeys += 1;
        let Some((cont, oid, dkey, akey)) = split_akey_prefix(akp) else { return Ok(()) };
        let ec = matches!(oid_class(oid).map(|c| c.redundancy), Some(Redundancy::Ec { .. }));
        let view = View::new(&self.db, &self.files, self.id);
        let punch_prefixes = [
            keys::punch_prefix(cont, oid, None, None),
            keys::punch_prefix(cont, oid, Some(&dkey), None),
            keys::punch_prefix(cont, oid, Some(&dkey), Some(&akey)),
        ];
        let floor = view.punch_floor(&punch_prefixes, horizon)?;
        // Single values (replicated for every class): newest first; the
        // newest visible at the horizon stays, older ones go.
        let mut sp = akp.to_vec();
        sp.push(TAG_SINGLE);
        let mut kept = false;
        let mut doomed = Vec::new();
        {
            let mut it = view.iter(CF_VALUES);
            it.seek(&sp);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !k.starts_with(&sp) || k.len() != sp.len() + 8 {
                    break;
                }
                let e = keys::epoch_suffix(k).unwrap_or(0);
                if e <= horizon {
                    if e > floor && !kept {
                        kept = true;
                    } else {
                        doomed.push((k.to_vec(), Record::decode(v)?));
                    }
                }
                it.next();
                if doomed.len() >= DELETES_PER_BATCH {
                    for (k, rec) in doomed.drain(..) {
                        r.delete(&k, &rec)?;
                    }
                }
            }
            it.status().map_err(|e| io_err("scan values", e))?;
        }
        for (k, rec) in doomed.drain(..) {
            r.delete(&k, &rec)?;
        }
        // EC cells: only versions covered by a newer *stable* version (one
        // the writer confirmed reached every cell) or hidden by a stable
        // punch may go; a reader whose newest version of a stripe reached
        // fewer than k cells reads beneath it, so nothing beneath an
        // unconfirmed version is removed.
        let stable = if ec { self.stable_epochs(&view, cont, oid, &dkey, horizon)? } else { Default::default() };
        let stable_floor = if ec {
            let mut f = 0;
            for p in &punch_prefixes {
                // The newest stable punch at or below the horizon.
                let mut it = view.iter(super::CF_PUNCHES);
                it.seek(keys::with_epoch(p, horizon));
                while let Some(k) = it.key() {
                    if k.len() != p.len() + 8 || !k.starts_with(p) {
                        break;
                    }
                    let e = keys::epoch_suffix(k).unwrap_or(0);
                    if stable.contains(&e) {
                        f = f.max(e);
                        break;
                    }
                    it.next();
                }
            }
            f
        } else {
            floor
        };
        // Extents: bucket by bucket.
        let mut ep = akp.to_vec();
        ep.push(TAG_EXTENT);
        let buckets = {
            let mut b = Vec::new();
            let mut it = view.iter(CF_VALUES);
            it.seek(&ep);
            while let Some(k) = it.key() {
                if !k.starts_with(&ep) || k.len() < ep.len() + 8 {
                    break;
                }
                let bucket = u64::from_be_bytes(k[ep.len()..ep.len() + 8].try_into().expect("8 bytes"));
                b.push(bucket);
                match keys::prefix_successor(&keys::extent_bucket_prefix(akp, bucket)) {
                    Some(next) => it.seek(&next),
                    None => break,
                }
            }
            it.status().map_err(|e| io_err("scan values", e))?;
            b
        };
        for bucket in buckets {
            let (s, e) = (bucket * BUCKET_BYTES, bucket.saturating_mul(BUCKET_BYTES).saturating_add(BUCKET_BYTES));
            // The versions that cover: all visible ones for replicated
            // classes, the stable ones for EC.
            let mut cover = Pieces::new(s, e);
            view.scan_extents(akp, s, e, |ep, start, raw| {
                if ep <= horizon && ep > stable_floor && (!ec || stable.contains(&ep)) {
                    cover.offer(start, Record::decode(raw)?, ep);
                }
                Ok(())
            })?;
            let winners: std::collections::HashSet<(u64, Epoch)> = cover.winners().collect();
            view.scan_extents(akp, s, e, |ep, start, raw| {
                if ep > horizon {
                    return Ok(());
                }
                let rec = Record::decode(raw)?;
                let gone = if ep <= stable_floor {
                    true
                } else if ec {
                    cover.covered_newer(start, start + rec.len, ep)
                } else {
                    !winners.contains(&(start, ep))
                };
                if gone {
                    doomed.push((keys::extent_key(akp, start, ep), rec));
                }
                Ok(())
            })?;
            for (k, rec) in doomed.drain(..) {
                r.delete(&k, &rec)?;
            }
        }
        Ok(())
    }

    /// The epochs at or below `horizon` whose writes (or punches) of the
    /// dkey, or of the whole object, their writers confirmed complete.
    fn stable_epochs(
        &self,
        view: &View<'_>,
        cont: ContId,
        oid: Oid,
        dkey: &[u8],
        horizon: Epoch,
    ) -> Result<std::collections::HashSet<Epoch>> {
        let mut out = std::collections::HashSet::new();
        for p in [keys::stable_prefix(cont, oid, Some(dkey)), keys::stable_prefix(cont, oid, None)] {
            let mut it = view.iter(CF_META);
            it.seek(&p);
            while let Some(k) = it.key() {
                if k.len() != p.len() + 8 || !k.starts_with(&p) {
                    break;
                }
                let e = u64::from_be_bytes(k[p.len()..].try_into().expect("8 bytes"));
                if e > horizon {
                    break;
                }
                out.insert(e);
                it.next();
            }
            it.status().map_err(|e| io_err("read stable marks", e))?;
        }
        Ok(out)
    }

    /// Records that the write or punch at `epoch` of `dkey` (or of the
    /// whole object) reached every shard of its group, as its writer saw:
    /// aggregation of EC cells may then remove what it covers.
    pub fn mark_stable(&self, cont: ContId, oid: Oid, dkey: Option<&[u8]>, epoch: Epoch) -> Result<()> {
        self.check_poison()?;
        let mut k = keys::stable_prefix(cont, oid, dkey);
        k.extend_from_slice(&epoch.to_be_bytes());
        // Not synced: a mark lost in a crash only delays reclaim.
        self.db.put_cf(self.db.cf_handle(CF_META).expect("cf"), k, []).map_err(|e| io_err("write a stable mark", e))?;
        let prefix = match dkey {
            Some(d) => keys::dkey_prefix(cont, oid, d),
            None => keys::obj_prefix(cont, oid),
        };
        let mut dirty = self.shared.dirty.lock().expect("lock");
        let d = dirty.entry(prefix).or_default();
        *d = (*d).max(epoch);
        Ok(())
    }

    /// Marks `cont` destroyed (later updates and punches of it are refused)
    /// once every write submitted before is durable, then deletes all it
    /// holds and gives its space back. Returns the data-file bytes freed.
    /// Idempotent. Blocks; call from a blocking thread.
    pub fn drop_container(&self, cont: ContId) -> Result<u64> {
        self.apply(Mutation::Tombstone { cont })?;
        let _one = self.shared.reclaim.lock().expect("lock");
        let prefix = cont.to_bytes().to_vec();
        let end = keys::prefix_successor(&prefix).unwrap_or_else(|| vec![0xff; 17]);
        let mut r =
            Reclaim { store: self, batch: WriteBatch::default(), n: 0, holes: Vec::new(), stats: AggStats::default() };
        self.drop_values(&mut r, &prefix)?;
        for cf in [CF_PUNCHES, CF_OBJECTS] {
            r.batch.delete_range_cf(self.db.cf_handle(cf).expect("cf"), &prefix, &end);
        }
        let mut sp = keys::stable_prefix_of_cont(cont);
        let send = keys::prefix_successor(&sp).unwrap_or_else(|| vec![0xff; 20]);
        r.batch.delete_range_cf(self.db.cf_handle(CF_META).expect("cf"), &sp, &send);
        sp.clear();
        r.n += 1;
        r.commit()?;
        if r.stats.removed > 0 {
            info!(target_id = self.id, %cont, versions = r.stats.removed, freed = r.stats.freed_bytes, "dropped a destroyed container");
        }
        Ok(r.stats.freed_bytes)
    }

    /// Drops what this target holds of some dkeys of an object (`None`:
    /// the whole object): shards that live elsewhere now, after an
    /// extension moved them or a spare was given back. Their values,
    /// punches and stable marks are deleted and their data-file space
    /// given back. Returns the data-file bytes freed. Blocks; call from a
    /// blocking thread, and only for shards no request can reach any more.
    pub fn drop_shards(&self, cont: ContId, oid: Oid, dkeys: Option<&[Vec<u8>]>) -> Result<u64> {
        self.check_poison()?;
        let _one = self.shared.reclaim.lock().expect("lock");
        let mut r =
            Reclaim { store: self, batch: WriteBatch::default(), n: 0, holes: Vec::new(), stats: AggStats::default() };
        let mut ranges: Vec<(&str, Vec<u8>)> = Vec::new();
        match dkeys {
            None => {
                let op = keys::obj_prefix(cont, oid);
                self.drop_values(&mut r, &op)?;
                ranges.push((CF_PUNCHES, op.clone()));
                let mut sp = keys::stable_prefix_of_cont(cont);
                sp.extend_from_slice(&oid.to_bytes());
                ranges.push((CF_META, sp));
                r.batch.delete_cf(self.db.cf_handle(CF_OBJECTS).expect("cf"), &op);
            }
            Some(dkeys) => {
                for d in dkeys {
                    self.drop_values(&mut r, &keys::dkey_prefix(cont, oid, d))?;
                    ranges.push((CF_PUNCHES, keys::punch_prefix(cont, oid, Some(d), None)));
                    let mut ap = keys::obj_prefix(cont, oid);
                    ap.push(b'A');
                    keys::push_key(&mut ap, d);
                    ranges.push((CF_PUNCHES, ap));
                    ranges.push((CF_META, keys::stable_prefix(cont, oid, Some(d))));
                }
            }
        }
        for (cf, from) in ranges {
            let Some(to) = keys::prefix_successor(&from) else { continue };
            r.batch.delete_range_cf(self.db.cf_handle(cf).expect("cf"), &from, &to);
            r.n += 1;
        }
        r.n += 1;
        r.commit()?;
        Ok(r.stats.freed_bytes)
    }

    /// Deletes every value under `prefix`, a page at a time: each page's
    /// keys are deleted by range and its extents given back (when `r`
    /// commits) before the next page is read.
    fn drop_values(&self, r: &mut Reclaim<'_>, prefix: &[u8]) -> Result<()> {
        let Some(end) = keys::prefix_successor(prefix) else { return Ok(()) };
        let mut from = prefix.to_vec();
        loop {
            let mut upto = None;
            let mut n = 0;
            {
                let view = View::new(&self.db, &self.files, self.id);
                let mut it = view.iter(CF_VALUES);
                it.seek(&from);
                while let (Some(k), Some(v)) = (it.key(), it.value()) {
                    if !k.starts_with(prefix) {
                        break;
                    }
                    if n >= DELETES_PER_BATCH {
                        upto = Some(k.to_vec());
                        break;
                    }
                    let rec = Record::decode(v)?;
                    if let Location::External { file, offset } = rec.loc {
                        r.holes.push((file, offset, rec.len));
                        r.stats.freed_bytes += rec.len;
                    }
                    r.stats.removed += 1;
                    n += 1;
                    it.next();
                }
                it.status().map_err(|e| io_err("scan values to drop", e))?;
            }
            let to = upto.clone().unwrap_or_else(|| end.clone());
            r.batch.delete_range_cf(self.db.cf_handle(CF_VALUES).expect("cf"), &from, &to);
            r.n += 1;
            r.commit()?;
            match upto {
                Some(k) => from = k,
                None => return Ok(()),
            }
        }
    }
}

/// The akey prefix of a values key (everything before its tag).
fn akey_prefix_of(k: &[u8]) -> Option<&[u8]> {
    let (_, d_end) = keys::read_key(k, 32)?;
    let (_, a_end) = keys::read_key(k, d_end)?;
    (k.len() > a_end).then(|| &k[..a_end])
}

/// Splits an akey prefix into container, object, dkey and akey.
fn split_akey_prefix(akp: &[u8]) -> Option<(ContId, Oid, Vec<u8>, Vec<u8>)> {
    let cont = ContId(u128::from_be_bytes(akp.get(..16)?.try_into().ok()?));
    let oid = Oid::from_bytes(akp.get(16..32)?.try_into().ok()?);
    let (d, d_end) = keys::read_key(akp, 32)?;
    let (a, a_end) = keys::read_key(akp, d_end)?;
    (a_end == akp.len()).then(|| (cont, oid, d.to_vec(), a.to_vec()))
}
