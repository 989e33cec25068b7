//! Reads of the target store, each from one RocksDB snapshot so that a
//! fetch or a listing never sees half of a concurrent group commit.

use bytes::Bytes;
use rocksdb::{DBRawIterator, ReadOptions, Snapshot, DB};
use shoal_common::limits::MAX_SEGMENT;
use shoal_common::msg::{FetchIod, Fetched, ValueKind};
use shoal_common::{ContId, Epoch, Oid, Result, ShoalError};
use tracing::error;

use super::data::DataFiles;
use super::keys::{self, BUCKET_BYTES};
use super::record::{Location, Record};
use super::{io_err, ListPage, CF_PUNCHES, CF_VALUES};

fn too_big() -> ShoalError {
    ShoalError::invalid(format!(
        "the values fetched add up to more than the per-reply cap of {MAX_SEGMENT} bytes; fetch fewer akeys at once"
    ))
}

/// A consistent read view of one target.
pub(super) struct View<'a> {
    db: &'a DB,
    files: &'a DataFiles,
    id: u32,
    snap: Snapshot<'a>,
}

impl<'a> View<'a> {
    pub fn new(db: &'a DB, files: &'a DataFiles, id: u32) -> View<'a> {
        View { db, files, id, snap: db.snapshot() }
    }

    fn iter(&self, cf: &str) -> DBRawIterator<'a> {
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&self.snap);
        self.db.raw_iterator_cf_opt(self.db.cf_handle(cf).expect("column family created at open"), ro)
    }

    /// The newest punch at or below `epoch` among the given punch prefixes
    /// (0 when none).
    fn punch_floor(&self, prefixes: &[Vec<u8>], epoch: Epoch) -> Result<Epoch> {
        let mut it = self.iter(CF_PUNCHES);
        let mut floor = 0;
        for p in prefixes {
            it.seek(keys::with_epoch(p, epoch));
            if let Some(k) = it.key() {
                if k.len() == p.len() + 8 && k.starts_with(p) {
                    floor = floor.max(keys::epoch_suffix(k).unwrap_or(0));
                }
            }
            it.status().map_err(|e| io_err("read punches", e))?;
        }
        Ok(floor)
    }

    fn read_value(&self, rec: &Record, what: &str) -> Result<Bytes> {
        let bytes = match &rec.loc {
            Location::Inline(b) => b.clone(),
            Location::External { file, offset } => Bytes::from(
                self.files
                    .read(*file, *offset, rec.len)
                    .map_err(|e| io_err(&format!("target {} read data file {file} at {offset}", self.id), e))?,
            ),
        };
        if bytes.len() as u64 != rec.len || crc32c::crc32c(&bytes) != rec.crc {
            error!(target_id = self.id, what, "checksum mismatch");
            return Err(ShoalError::Checksum(format!("target {}: {what} does not match its crc32c", self.id)));
        }
        Ok(bytes)
    }

    pub fn fetch(
        &self,
        cont: ContId,
        oid: Oid,
        dkey: &[u8],
        epoch: Epoch,
        iods: &[FetchIod],
    ) -> Result<(Vec<Fetched>, Vec<Bytes>)> {
        let dfloor = self.punch_floor(
            &[keys::punch_prefix(cont, oid, None, None), keys::punch_prefix(cont, oid, Some(dkey), None)],
            epoch,
        )?;
        let mut out = Vec::with_capacity(iods.len());
        let mut segs = Vec::with_capacity(iods.len());
        // Bytes this reply may still carry: a fetch never reads more than
        // one reply can hold, however many akeys it names.
        let mut room = MAX_SEGMENT as u64;
        for iod in iods {
            let floor =
                dfloor.max(self.punch_floor(&[keys::punch_prefix(cont, oid, Some(dkey), Some(&iod.akey))], epoch)?);
            let akp = keys::akey_prefix(cont, oid, dkey, &iod.akey);
            let (f, b) = match iod.kind {
                ValueKind::Single | ValueKind::MaxU64 => self.fetch_single(&akp, epoch, floor, room)?,
                ValueKind::Array { rec_size, start, nr } => {
                    let s = start * rec_size as u64;
                    self.fetch_array(&akp, epoch, floor, s, s + nr * rec_size as u64, rec_size)?
                }
            };
            room = room.checked_sub(b.len() as u64).ok_or_else(too_big)?;
            out.push(f);
            segs.push(b);
        }
        Ok((out, segs))
    }

    /// The newest visible single value, if it is at most `room` bytes.
    pub fn fetch_single(&self, akp: &[u8], epoch: Epoch, floor: Epoch, room: u64) -> Result<(Fetched, Bytes)> {
        let mut it = self.iter(CF_VALUES);
        it.seek(keys::single_key(akp, epoch));
        if let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.len() == akp.len() + 9 && k.starts_with(akp) && k[akp.len()] == keys::TAG_SINGLE {
                let e = keys::epoch_suffix(k).unwrap_or(0);
                if e > floor {
                    let rec = Record::decode(v)?;
                    if rec.len > room {
                        return Err(too_big());
                    }
                    let data = self.read_value(&rec, "single value")?;
                    return Ok((Fetched::Single { epoch: e }, data));
                }
            }
        }
        it.status().map_err(|e| io_err("read values", e))?;
        Ok((Fetched::Missing, Bytes::new()))
    }

    /// Reads bytes [s, e) of an array value: newest extent wins per byte,
    /// holes are zeros.
    fn fetch_array(
        &self,
        akp: &[u8],
        epoch: Epoch,
        floor: Epoch,
        s: u64,
        e: u64,
        rec_size: u32,
    ) -> Result<(Fetched, Bytes)> {
        let mut cands: Vec<(Epoch, u64, Record)> = Vec::new();
        let mut it = self.iter(CF_VALUES);
        for bucket in s / BUCKET_BYTES..=(e - 1) / BUCKET_BYTES {
            let bp = keys::extent_bucket_prefix(akp, bucket);
            it.seek(&bp);
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !k.starts_with(&bp) {
                    break;
                }
                let (start, ep) = keys::parse_extent_tail(&k[akp.len() + 1..])
                    .ok_or_else(|| ShoalError::Io("corrupt extent key".into()))?;
                if ep <= epoch && ep > floor {
                    let rec = Record::decode(v)?;
                    if start < e && start + rec.len > s {
                        cands.push((ep, start, rec));
                    }
                }
                it.next();
            }
            it.status().map_err(|e| io_err("read extents", e))?;
        }
        cands.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut buf = vec![0u8; (e - s) as usize];
        let mut holes = vec![(s, e)];
        let mut newest = 0;
        for (ep, start, rec) in cands {
            if holes.is_empty() {
                break;
            }
            let end = start + rec.len;
            if !holes.iter().any(|&(hs, he)| hs < end && start < he) {
                continue;
            }
            let data = self.read_value(&rec, "array extent")?;
            newest = newest.max(ep);
            let mut next = Vec::with_capacity(holes.len() + 1);
            for (hs, he) in holes {
                let (os, oe) = (hs.max(start), he.min(end));
                if os >= oe {
                    next.push((hs, he));
                    continue;
                }
                buf[(os - s) as usize..(oe - s) as usize]
                    .copy_from_slice(&data[(os - start) as usize..(oe - start) as usize]);
                if hs < os {
                    next.push((hs, os));
                }
                if oe < he {
                    next.push((oe, he));
                }
            }
            holes = next;
        }
        let hole_bytes: u64 = holes.iter().map(|(a, b)| b - a).sum();
        let covered = (e - s - hole_bytes) / rec_size as u64;
        if covered == 0 && hole_bytes == e - s {
            return Ok((Fetched::Missing, Bytes::new()));
        }
        Ok((Fetched::Array { covered, epoch: newest }, Bytes::from(buf)))
    }

    fn akey_visible(&self, it: &mut DBRawIterator<'a>, akp: &[u8], epoch: Epoch, floor: Epoch) -> Result<bool> {
        it.seek(keys::single_key(akp, epoch));
        if let Some(k) = it.key() {
            if k.len() == akp.len() + 9
                && k.starts_with(akp)
                && k[akp.len()] == keys::TAG_SINGLE
                && keys::epoch_suffix(k).unwrap_or(0) > floor
            {
                return Ok(true);
            }
        }
        let mut ep = akp.to_vec();
        ep.push(keys::TAG_EXTENT);
        it.seek(&ep);
        while let Some(k) = it.key() {
            if !k.starts_with(&ep) {
                break;
            }
            if let Some((_, e)) = keys::parse_extent_tail(&k[akp.len() + 1..]) {
                if e <= epoch && e > floor {
                    return Ok(true);
                }
            }
            it.next();
        }
        it.status().map_err(|e| io_err("read values", e))?;
        Ok(false)
    }

    pub fn list(
        &self,
        cont: ContId,
        oid: Oid,
        epoch: Epoch,
        dkey: Option<&[u8]>,
        anchor: Option<&[u8]>,
        limit: usize,
    ) -> Result<ListPage> {
        let obj_floor = self.punch_floor(&[keys::punch_prefix(cont, oid, None, None)], epoch)?;
        let scope = match dkey {
            None => keys::obj_prefix(cont, oid),
            Some(d) => keys::dkey_prefix(cont, oid, d),
        };
        let mut scan = self.iter(CF_VALUES);
        let mut probe = self.iter(CF_VALUES);
        let mut cursor = match anchor {
            None => scope.clone(),
            Some(a) => {
                let mut p = scope.clone();
                keys::push_key(&mut p, a);
                match keys::prefix_successor(&p) {
                    Some(s) => s,
                    None => return Ok((Vec::new(), None)),
                }
            }
        };
        let dfloor = match dkey {
            Some(d) => obj_floor.max(self.punch_floor(&[keys::punch_prefix(cont, oid, Some(d), None)], epoch)?),
            None => obj_floor,
        };
        let mut out = Vec::new();
        loop {
            scan.seek(&cursor);
            let Some(k) = scan.key() else { break };
            if !k.starts_with(&scope) {
                break;
            }
            let (key, end) =
                keys::read_key(k, scope.len()).ok_or_else(|| ShoalError::Io("corrupt value key".into()))?;
            let key = key.to_vec();
            let item_prefix = k[..end].to_vec();
            let visible = match dkey {
                Some(d) => {
                    let f = dfloor.max(self.punch_floor(&[keys::punch_prefix(cont, oid, Some(d), Some(&key))], epoch)?);
                    self.akey_visible(&mut probe, &item_prefix, epoch, f)?
                }
                None => self.dkey_visible(&mut probe, cont, oid, &key, &item_prefix, epoch, obj_floor)?,
            };
            if visible {
                out.push(key);
                if out.len() == limit {
                    let anchor = out.last().cloned();
                    return Ok((out, anchor));
                }
            }
            match keys::prefix_successor(&item_prefix) {
                Some(s) => cursor = s,
                None => break,
            }
        }
        scan.status().map_err(|e| io_err("list keys", e))?;
        Ok((out, None))
    }

    #[allow(clippy::too_many_arguments)]
    fn dkey_visible(
        &self,
        probe: &mut DBRawIterator<'a>,
        cont: ContId,
        oid: Oid,
        dkey: &[u8],
        dkp: &[u8],
        epoch: Epoch,
        obj_floor: Epoch,
    ) -> Result<bool> {
        let dfloor = obj_floor.max(self.punch_floor(&[keys::punch_prefix(cont, oid, Some(dkey), None)], epoch)?);
        let mut scan = self.iter(CF_VALUES);
        let mut cursor = dkp.to_vec();
        loop {
            scan.seek(&cursor);
            let Some(k) = scan.key() else { break };
            if !k.starts_with(dkp) {
                break;
            }
            let (akey, end) = keys::read_key(k, dkp.len()).ok_or_else(|| ShoalError::Io("corrupt value key".into()))?;
            let akp = k[..end].to_vec();
            let f = dfloor.max(self.punch_floor(&[keys::punch_prefix(cont, oid, Some(dkey), Some(akey))], epoch)?);
            if self.akey_visible(probe, &akp, epoch, f)? {
                return Ok(true);
            }
            match keys::prefix_successor(&akp) {
                Some(s) => cursor = s,
                None => break,
            }
        }
        scan.status().map_err(|e| io_err("list keys", e))?;
        Ok(false)
    }
}
