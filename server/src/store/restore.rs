//! What rebuild needs of a target: its objects, the versions and punches it
//! holds under one dkey (with their bytes), and a way to put versions back
//! exactly as they were (same keys, same epochs), past the epoch-order rule
//! (a rebuilt version is history, not a new write).

use bytes::Bytes;
use shoal_common::msg::{RestoreItem, RestoreKind};
use shoal_common::{ContId, Epoch, Oid, Result, ShoalError};

use super::keys::{self, TAG_EXTENT, TAG_SINGLE};
use super::read::View;
use super::record::Record;
use super::{io_err, TargetStore, CF_OBJECTS, CF_PUNCHES, CF_VALUES};

/// One stored version (or punch) under a dkey, with its bytes.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    pub item: RestoreItem,
    pub data: Bytes,
}

impl TargetStore {
    /// Up to `limit` objects of the object index after `after`.
    pub fn objects_after(&self, after: Option<(ContId, Oid)>, limit: usize) -> Result<Vec<(ContId, Oid)>> {
        self.check_poison()?;
        let view = View::new(&self.db, &self.files, self.id);
        let mut it = view.iter(CF_OBJECTS);
        match after {
            Some((c, o)) => match keys::prefix_successor(&keys::obj_prefix(c, o)) {
                Some(k) => it.seek(k),
                None => return Ok(Vec::new()),
            },
            None => it.seek_to_first(),
        }
        let mut out = Vec::new();
        while let Some(k) = it.key() {
            if out.len() >= limit {
                break;
            }
            if k.len() == 32 {
                let cont = ContId(u128::from_be_bytes(k[..16].try_into().expect("16 bytes")));
                let oid = Oid::from_bytes(k[16..].try_into().expect("16 bytes"));
                out.push((cont, oid));
            }
            it.next();
        }
        it.status().map_err(|e| io_err("scan the object index", e))?;
        Ok(out)
    }

    /// The objects of `cont` this target holds, after `after`: at most
    /// `limit`, and whether more follow.
    pub fn objects_of(&self, cont: ContId, after: Option<Oid>, limit: usize) -> Result<(Vec<Oid>, bool)> {
        self.check_poison()?;
        let view = View::new(&self.db, &self.files, self.id);
        let mut it = view.iter(CF_OBJECTS);
        let prefix = cont.to_bytes();
        match after {
            Some(o) => match keys::prefix_successor(&keys::obj_prefix(cont, o)) {
                Some(k) => it.seek(k),
                None => return Ok((Vec::new(), false)),
            },
            None => it.seek(prefix),
        }
        let mut out = Vec::new();
        while let Some(k) = it.key() {
            if !k.starts_with(&prefix) {
                break;
            }
            if out.len() >= limit {
                return Ok((out, true));
            }
            if k.len() == 32 {
                out.push(Oid::from_bytes(k[16..].try_into().expect("16 bytes")));
            }
            it.next();
        }
        it.status().map_err(|e| io_err("scan the object index", e))?;
        Ok((out, false))
    }

    /// The dkeys this target holds values of for an object.
    pub fn dkeys_of(&self, cont: ContId, oid: Oid) -> Result<Vec<Vec<u8>>> {
        self.check_poison()?;
        let view = View::new(&self.db, &self.files, self.id);
        let op = keys::obj_prefix(cont, oid);
        let mut it = view.iter(CF_VALUES);
        it.seek(&op);
        let mut out = Vec::new();
        while let Some(k) = it.key() {
            if !k.starts_with(&op) {
                break;
            }
            let Some((d, end)) = keys::read_key(k, op.len()) else { break };
            out.push(d.to_vec());
            match keys::prefix_successor(&k[..end]) {
                Some(n) => it.seek(n),
                None => break,
            }
        }
        it.status().map_err(|e| io_err("scan values", e))?;
        Ok(out)
    }

    /// Every version (single values and extent pieces) under `dkey`, with
    /// its bytes checked against its checksum, and every punch that covers
    /// the dkey (of the object, the dkey or one of its akeys).
    pub fn versions_of(&self, cont: ContId, oid: Oid, dkey: &[u8]) -> Result<Vec<StoredVersion>> {
        self.versions_where(cont, oid, dkey, &|_| true)
    }

    /// Like [`TargetStore::versions_of`], but reads the bytes only of the
    /// versions `with_data` picks (the others come with empty data): what
    /// a resync asks its peer about before it reads anything.
    pub fn versions_where(
        &self,
        cont: ContId,
        oid: Oid,
        dkey: &[u8],
        with_data: &dyn Fn(&RestoreItem) -> bool,
    ) -> Result<Vec<StoredVersion>> {
        self.check_poison()?;
        let view = View::new(&self.db, &self.files, self.id);
        let mut out = Vec::new();
        let dp = keys::dkey_prefix(cont, oid, dkey);
        let mut it = view.iter(CF_VALUES);
        it.seek(&dp);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(&dp) {
                break;
            }
            let (akey, end) = keys::read_key(k, dp.len()).ok_or_else(|| ShoalError::Io("corrupt value key".into()))?;
            let epoch = keys::epoch_suffix(k).unwrap_or(0);
            let kind = match k.get(end) {
                Some(&TAG_SINGLE) => RestoreKind::Single,
                Some(&TAG_EXTENT) => {
                    let (start, _) = keys::parse_extent_tail(&k[end + 1..])
                        .ok_or_else(|| ShoalError::Io("corrupt extent key".into()))?;
                    RestoreKind::Extent { start }
                }
                _ => return Err(ShoalError::Io("corrupt value key tag".into())),
            };
            let rec = Record::decode(v)?;
            let item = RestoreItem { akey: akey.to_vec(), kind, epoch, crc: rec.crc, rec_size: rec.rec_size };
            let data = if with_data(&item) { view.read_value(&rec, "rebuild source", true)? } else { Bytes::new() };
            out.push(StoredVersion { item, data });
            it.next();
        }
        it.status().map_err(|e| io_err("scan values", e))?;
        // Punches: of the object, of the dkey, of its akeys.
        let mut pit = view.iter(CF_PUNCHES);
        for (prefix, kind) in [
            (keys::punch_prefix(cont, oid, None, None), RestoreKind::PunchObject),
            (keys::punch_prefix(cont, oid, Some(dkey), None), RestoreKind::PunchDkey),
        ] {
            pit.seek(&prefix);
            while let Some(k) = pit.key() {
                if k.len() != prefix.len() + 8 || !k.starts_with(&prefix) {
                    break;
                }
                let epoch = keys::epoch_suffix(k).unwrap_or(0);
                out.push(StoredVersion {
                    item: RestoreItem { akey: Vec::new(), kind, epoch, crc: 0, rec_size: 0 },
                    data: Bytes::new(),
                });
                pit.next();
            }
        }
        let mut ap = keys::obj_prefix(cont, oid);
        ap.push(b'A');
        keys::push_key(&mut ap, dkey);
        pit.seek(&ap);
        while let Some(k) = pit.key() {
            if !k.starts_with(&ap) {
                break;
            }
            let (akey, _) = keys::read_key(k, ap.len()).ok_or_else(|| ShoalError::Io("corrupt punch key".into()))?;
            out.push(StoredVersion {
                item: RestoreItem {
                    akey: akey.to_vec(),
                    kind: RestoreKind::PunchAkey,
                    epoch: keys::epoch_suffix(k).unwrap_or(0),
                    crc: 0,
                    rec_size: 0,
                },
                data: Bytes::new(),
            });
            pit.next();
        }
        pit.status().map_err(|e| io_err("scan punches", e))?;
        Ok(out)
    }

    /// Which of `items` (versions and punches under `dkey`) this target
    /// holds already: the same akey, kind (and extent start) and epoch,
    /// and for a single value the same checksum too (a max-value update
    /// rewrites a single value in place at its epoch; single values are
    /// whole copies on every shard that holds them, EC included).
    pub fn holds(&self, cont: ContId, oid: Oid, dkey: &[u8], items: &[RestoreItem]) -> Result<Vec<bool>> {
        let mine: std::collections::HashMap<(Vec<u8>, RestoreKind, Epoch), u32> = self
            .versions_where(cont, oid, dkey, &|_| false)?
            .into_iter()
            .map(|v| ((v.item.akey, v.item.kind, v.item.epoch), v.item.crc))
            .collect();
        Ok(items
            .iter()
            .map(|i| {
                mine.get(&(i.akey.clone(), i.kind, i.epoch))
                    .is_some_and(|&crc| i.kind != RestoreKind::Single || crc == i.crc)
            })
            .collect())
    }

    /// The newest epoch of the object's updates (for restoring its index).
    pub fn object_epoch(&self, cont: ContId, oid: Oid) -> Result<Epoch> {
        match self.db.get_cf(self.db.cf_handle(CF_OBJECTS).expect("cf"), keys::obj_prefix(cont, oid)) {
            Ok(Some(v)) => Ok(v[..].try_into().map(u64::from_be_bytes).unwrap_or(0)),
            Ok(None) => Ok(0),
            Err(e) => Err(io_err("read the object index", e)),
        }
    }
}
