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
//! EC objects keep one more layer: the versions visible just below each
//! version kept, so a reader that finds a stripe whose newest write reached
//! fewer than k cells (a failed write) can still read the stripe as it was
//! before it.
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
use super::{io_err, Mutation, TargetStore, CF_OBJECTS, CF_PUNCHES, CF_VALUES};

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
        let dirty: Vec<(Vec<u8>, Epoch)> = {
            let mut d = self.shared.dirty.lock().expect("lock");
            let all: Vec<(Vec<u8>, Epoch)> =
                if full { Vec::new() } else { d.iter().map(|(k, e)| (k.clone(), *e)).collect() };
            // Akeys whose newest write is past the horizon may have more to
            // remove later: they stay for the next pass.
            d.retain(|_, e| *e > horizon);
            all
        };
        let mut r =
            Reclaim { store: self, batch: WriteBatch::default(), n: 0, holes: Vec::new(), stats: AggStats::default() };
        if full {
            let view = View::new(&self.db, &self.files, self.id);
            let mut it = view.iter(CF_VALUES);
            it.seek_to_first();
            let mut last: Option<Vec<u8>> = None;
            let mut akps = Vec::new();
            while let Some(k) = it.key() {
                if let Some(akp) = akey_prefix_of(k) {
                    if last.as_deref() != Some(akp) {
                        last = Some(akp.to_vec());
                        akps.push(akp.to_vec());
                    }
                    // Skip the rest of this akey's versions.
                    match keys::prefix_successor(akp) {
                        Some(next) => it.seek(&next),
                        None => break,
                    }
                } else {
                    it.next();
                }
            }
            it.status().map_err(|e| io_err("scan values", e))?;
            drop(it);
            drop(view);
            for akp in akps {
                self.aggregate_akey(&akp, horizon, &mut r)?;
            }
        } else {
            for (akp, _) in dirty {
                self.aggregate_akey(&akp, horizon, &mut r)?;
            }
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

    fn aggregate_akey(&self, akp: &[u8], horizon: Epoch, r: &mut Reclaim<'_>) -> Result<()> {
        r.stats.akeys += 1;
        let Some((cont, oid, dkey, akey)) = split_akey_prefix(akp) else { return Ok(()) };
        let ec = matches!(oid_class(oid).map(|c| c.redundancy), Some(Redundancy::Ec { .. }));
        let view = View::new(&self.db, &self.files, self.id);
        let floor = view.punch_floor(
            &[
                keys::punch_prefix(cont, oid, None, None),
                keys::punch_prefix(cont, oid, Some(&dkey), None),
                keys::punch_prefix(cont, oid, Some(&dkey), Some(&akey)),
            ],
            horizon,
        )?;
        // Single values: newest first.
        let mut sp = akp.to_vec();
        sp.push(TAG_SINGLE);
        let mut kept = 0;
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
                    let visible = e > floor && kept < if ec { 2 } else { 1 };
                    if visible {
                        kept += 1;
                    } else {
                        doomed.push((k.to_vec(), Record::decode(v)?));
                    }
                }
                it.next();
            }
            it.status().map_err(|e| io_err("scan values", e))?;
        }
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
            let visible_at_horizon = |skip: &std::collections::HashSet<(u64, Epoch)>| -> Result<Pieces> {
                let mut p = Pieces::new(s, e);
                view.scan_extents(akp, s, e, |ep, start, raw| {
                    if ep <= horizon && ep > floor && !skip.contains(&(start, ep)) {
                        p.offer(start, Record::decode(raw)?, ep);
                    }
                    Ok(())
                })?;
                Ok(p)
            };
            let mut keep: std::collections::HashSet<(u64, Epoch)> =
                visible_at_horizon(&Default::default())?.winners().collect();
            if ec {
                let beneath: Vec<(u64, Epoch)> = visible_at_horizon(&keep)?.winners().collect();
                keep.extend(beneath);
            }
            view.scan_extents(akp, s, e, |ep, start, raw| {
                if ep <= horizon && !keep.contains(&(start, ep)) {
                    doomed.push((keys::extent_key(akp, start, ep), Record::decode(raw)?));
                }
                Ok(())
            })?;
        }
        drop(view);
        for (k, rec) in doomed {
            r.delete(&k, &rec)?;
        }
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
        {
            let view = View::new(&self.db, &self.files, self.id);
            let mut it = view.iter(CF_VALUES);
            it.seek(&prefix);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !k.starts_with(&prefix) {
                    break;
                }
                let rec = Record::decode(v)?;
                if let Location::External { file, offset } = rec.loc {
                    r.holes.push((file, offset, rec.len));
                    r.stats.freed_bytes += rec.len;
                }
                r.stats.removed += 1;
                it.next();
            }
            it.status().map_err(|e| io_err("scan a destroyed container", e))?;
        }
        if r.stats.removed == 0 {
            return Ok(0);
        }
        for cf in [CF_VALUES, CF_PUNCHES, CF_OBJECTS] {
            r.batch.delete_range_cf(self.db.cf_handle(cf).expect("cf"), &prefix, &end);
        }
        r.n = 1;
        r.commit()?;
        info!(target_id = self.id, %cont, versions = r.stats.removed, freed = r.stats.freed_bytes, "dropped a destroyed container");
        Ok(r.stats.freed_bytes)
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
