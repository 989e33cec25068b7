//! Reads of the target store, each from one RocksDB snapshot so that a
//! fetch or a listing never sees half of a concurrent group commit.

use bytes::Bytes;
use rocksdb::{DBRawIterator, ReadOptions, Snapshot, DB};
use shoal_common::limits::MAX_SEGMENT;
use shoal_common::msg::{FetchIod, Fetched, ValueKind};
use shoal_common::{ContId, Epoch, Oid, Result, ShoalError, EPOCH_MAX};
use tracing::error;

use super::data::DataFiles;
use super::keys::{self, BUCKET_BYTES};
use super::pieces::Pieces;
use super::record::{Location, Record};
use super::{io_err, ListPage, CF_PUNCHES, CF_VALUES};

/// What a fetch answers for a value with nothing visible.
fn nothing(floor: Epoch) -> Fetched {
    if floor > 0 {
        Fetched::Punched { epoch: floor }
    } else {
        Fetched::Missing
    }
}

/// Whether the piece `[from, to)` of a record stored from `rec_start` is
/// all of the record.
fn whole(from: u64, to: u64, rec_start: u64, rec: &Record) -> bool {
    from == rec_start && to == rec_start + rec.len
}

/// Continues a crc32c over `n` zero bytes.
fn crc_zeros(mut crc: u32, mut n: u64) -> u32 {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        crc = crc32c::crc32c_append(crc, &ZEROS[..k]);
        n -= k as u64;
    }
    crc
}

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

    pub(super) fn iter(&self, cf: &str) -> DBRawIterator<'a> {
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&self.snap);
        self.db.raw_iterator_cf_opt(self.db.cf_handle(cf).expect("column family created at open"), ro)
    }

    /// The newest punch at or below `epoch` among the given punch prefixes
    /// (0 when none).
    pub(super) fn punch_floor(&self, prefixes: &[Vec<u8>], epoch: Epoch) -> Result<Epoch> {
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

    /// Reads a stored value and checks its crc32c; `whole`: the caller
    /// wants all of it (see [`super::data::DataFile::read_bytes`]).
    pub(super) fn read_value(&self, rec: &Record, what: &str, whole: bool) -> Result<Bytes> {
        let bytes = match &rec.loc {
            Location::Inline(b) => b.clone(),
            Location::External { file, offset } => self
                .files
                .read(*file, *offset, rec.len, whole)
                .map_err(|e| io_err(&format!("target {} read data file {file} at {offset}", self.id), e))?,
        };
        if bytes.len() as u64 != rec.len || crc32c::crc32c(&bytes) != rec.crc {
            error!(target_id = self.id, what, "checksum mismatch");
            return Err(ShoalError::Checksum(format!("target {}: {what} does not match its crc32c", self.id)));
        }
        Ok(bytes)
    }

    /// Reads values under one dkey as of `epoch`: per iod what was found,
    /// the bytes, and their crc32c (the stored checksum where a reply
    /// segment is one stored value, so it is checked end to end).
    pub fn fetch(
        &self,
        cont: ContId,
        oid: Oid,
        dkey: &[u8],
        epoch: Epoch,
        iods: &[FetchIod],
    ) -> Result<(Vec<Fetched>, Vec<Bytes>, Vec<u32>)> {
        let dfloor = self.punch_floor(
            &[keys::punch_prefix(cont, oid, None, None), keys::punch_prefix(cont, oid, Some(dkey), None)],
            epoch,
        )?;
        let mut out = Vec::with_capacity(iods.len());
        let mut segs = Vec::with_capacity(iods.len());
        let mut crcs = Vec::with_capacity(iods.len());
        // Bytes this reply may still carry: a fetch never reads more than
        // one reply can hold, however many akeys it names.
        let mut room = MAX_SEGMENT as u64;
        for iod in iods {
            let floor =
                dfloor.max(self.punch_floor(&[keys::punch_prefix(cont, oid, Some(dkey), Some(&iod.akey))], epoch)?);
            let akp = keys::akey_prefix(cont, oid, dkey, &iod.akey);
            let (f, b, crc) = match iod.kind {
                ValueKind::Single | ValueKind::MaxU64 => self.fetch_single(&akp, epoch, floor, room)?,
                ValueKind::Array { rec_size, start, nr } => {
                    let s = start * rec_size as u64;
                    self.fetch_array(&akp, epoch, floor, s, s + nr * rec_size as u64, rec_size)?
                }
            };
            room = room.checked_sub(b.len() as u64).ok_or_else(too_big)?;
            out.push(f);
            segs.push(b);
            crcs.push(crc);
        }
        Ok((out, segs, crcs))
    }

    /// Bytes a fetch of `iods` would return (array ranges in full, single
    /// values at their stored length), read from the records alone.
    pub fn fetch_size(&self, cont: ContId, oid: Oid, dkey: &[u8], epoch: Epoch, iods: &[FetchIod]) -> Result<u64> {
        let mut total = 0u64;
        for iod in iods {
            total += match iod.kind.array_bytes() {
                Some(n) => n,
                None => {
                    let akp = keys::akey_prefix(cont, oid, dkey, &iod.akey);
                    let mut it = self.iter(CF_VALUES);
                    it.seek(keys::single_key(&akp, epoch));
                    match (it.key(), it.value()) {
                        (Some(k), Some(v))
                            if k.len() == akp.len() + 9 && k.starts_with(&akp) && k[akp.len()] == keys::TAG_SINGLE =>
                        {
                            Record::decode(v)?.len
                        }
                        _ => 0,
                    }
                }
            };
        }
        Ok(total)
    }

    /// The newest visible single value, if it is at most `room` bytes.
    pub fn fetch_single(&self, akp: &[u8], epoch: Epoch, floor: Epoch, room: u64) -> Result<(Fetched, Bytes, u32)> {
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
                    let data = self.read_value(&rec, "single value", true)?;
                    return Ok((Fetched::Single { epoch: e }, data, rec.crc));
                }
            }
        }
        it.status().map_err(|e| io_err("read values", e))?;
        Ok((nothing(floor), Bytes::new(), 0))
    }

    /// Reads bytes [s, e) of an array value: newest extent wins per byte,
    /// holes are zeros. Memory: the bytes returned, one stored extent at a
    /// time, and one entry per piece of the answer, however many versions
    /// the range has.
    fn fetch_array(
        &self,
        akp: &[u8],
        epoch: Epoch,
        floor: Epoch,
        s: u64,
        e: u64,
        rec_size: u32,
    ) -> Result<(Fetched, Bytes, u32)> {
        let mut winners = Pieces::new(s, e);
        self.scan_extents(akp, s, e, |ep, start, raw| {
            if ep <= epoch && ep > floor {
                let rec = Record::decode(raw)?;
                winners.offer(start, rec, ep);
            }
            Ok(())
        })?;
        if winners.is_empty() {
            return Ok((nothing(floor), Bytes::new(), 0));
        }
        let pieces = winners.pieces();
        if let [(from, to, piece)] = pieces[..] {
            if from == s && to == e {
                // One extent answers the whole range (an aligned read of
                // what one write stored): its bytes as they are, no copy.
                let (rec, rec_start, _) = winners.record(piece);
                let all = whole(from, to, rec_start, rec);
                let data = self.read_value(rec, "array extent", all)?;
                let slice = data.slice((from - rec_start) as usize..(to - rec_start) as usize);
                let crc = if all { rec.crc } else { crc32c::crc32c(&slice) };
                let covered = (to - from) / rec_size as u64;
                return Ok((Fetched::Array { covered, epoch: winners.epoch(piece) }, slice, crc));
            }
        }
        let mut buf = vec![0u8; (e - s) as usize];
        let mut crc = 0u32;
        let mut at = s;
        let mut covered_bytes = 0;
        let mut newest = floor;
        let mut cached: Option<(usize, Bytes)> = None;
        for (from, to, piece) in pieces {
            crc = crc_zeros(crc, from - at);
            let (rec, rec_start, id) = winners.record(piece);
            newest = newest.max(winners.epoch(piece));
            let data = match &cached {
                Some((cid, d)) if *cid == id => d.clone(),
                _ => {
                    let d = self.read_value(rec, "array extent", whole(from, to, rec_start, rec))?;
                    cached = Some((id, d.clone()));
                    d
                }
            };
            let slice = &data[(from - rec_start) as usize..(to - rec_start) as usize];
            buf[(from - s) as usize..(to - s) as usize].copy_from_slice(slice);
            crc = if whole(from, to, rec_start, rec) {
                // The whole stored extent: its checksum as the writer sent it.
                crc32c::crc32c_combine(crc, rec.crc, slice.len())
            } else {
                crc32c::crc32c_append(crc, slice)
            };
            covered_bytes += to - from;
            at = to;
        }
        crc = crc_zeros(crc, e - at);
        let covered = covered_bytes / rec_size as u64;
        Ok((Fetched::Array { covered, epoch: newest }, Bytes::from(buf), crc))
    }

    /// Calls `f(epoch, byte_start, record)` for every stored extent of the
    /// akey in the buckets overlapping [s, e), overlapping or not.
    pub fn scan_extents(
        &self,
        akp: &[u8],
        s: u64,
        e: u64,
        mut f: impl FnMut(Epoch, u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
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
                f(ep, start, v)?;
                it.next();
            }
            it.status().map_err(|e| io_err("read extents", e))?;
        }
        Ok(())
    }

    /// The newest epoch of anything stored for the akey that overlaps
    /// [s, e) (extents) or the single value (`None` range), and of the
    /// punches covering it: the version of the range. 0 when none.
    pub fn newest_version(
        &self,
        cont: ContId,
        oid: Oid,
        dkey: &[u8],
        akey: &[u8],
        range: Option<(u64, u64)>,
    ) -> Result<Epoch> {
        let floor = self.punch_floor(
            &[
                keys::punch_prefix(cont, oid, None, None),
                keys::punch_prefix(cont, oid, Some(dkey), None),
                keys::punch_prefix(cont, oid, Some(dkey), Some(akey)),
            ],
            EPOCH_MAX,
        )?;
        let akp = keys::akey_prefix(cont, oid, dkey, akey);
        let mut newest = floor;
        match range {
            None => {
                let mut it = self.iter(CF_VALUES);
                it.seek(keys::single_key(&akp, EPOCH_MAX));
                if let Some(k) = it.key() {
                    if k.len() == akp.len() + 9 && k.starts_with(&akp) && k[akp.len()] == keys::TAG_SINGLE {
                        newest = newest.max(keys::epoch_suffix(k).unwrap_or(0));
                    }
                }
                it.status().map_err(|e| io_err("read values", e))?;
            }
            Some((s, e)) => self.scan_extents(&akp, s, e, |ep, start, raw| {
                if ep > newest {
                    let len = Record::decode(raw)?.len;
                    if start < e && start + len > s {
                        newest = ep;
                    }
                }
                Ok(())
            })?,
        }
        Ok(newest)
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

    #[allow(clippy::too_many_arguments)]
    pub fn list(
        &self,
        cont: ContId,
        oid: Oid,
        epoch: Epoch,
        dkey: Option<&[u8]>,
        anchor: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
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
        let mut bytes = 0;
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
                // A page ends at `limit` keys or `max_bytes` of them (with
                // their encoding overhead), whichever comes first, and
                // always holds at least one key.
                bytes += key.len() + 8;
                out.push(key);
                if out.len() == limit || bytes >= max_bytes {
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
