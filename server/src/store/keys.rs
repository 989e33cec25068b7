//! Key encodings of the target store. Pure functions, no RocksDB.
//!
//! Keys are length-prefixed, so every prefix below is unambiguous and keys
//! of one object, dkey or akey are contiguous. Within one level keys sort by
//! (length, bytes): that is the order in which listings return them.
//! Epochs are stored inverted (`!epoch`, big-endian) so that the newest
//! version of a value comes first.
//!
//! ```text
//! values CF:
//!   obj    = cont(16) oid(16)
//!   dkey   = obj dklen(u16 BE) dkey
//!   akey   = dkey aklen(u16 BE) akey
//!   single = akey 'S' !epoch(8)
//!   extent = akey 'E' bucket(u64 BE) byte_start(u64 BE) !epoch(8)
//! punches CF:
//!   obj    = cont oid 'O' !epoch
//!   dkey   = cont oid 'D' dklen dkey !epoch
//!   akey   = cont oid 'A' dklen dkey aklen akey !epoch
//! objects CF:
//!   cont oid -> newest epoch of any update (u64 BE), the object index
//! meta CF:
//!   "hw" -> newest epoch committed (u64 BE)
//!   "st" cont oid 'D' dklen dkey epoch(u64 BE) -> "" (a stable write of the dkey)
//!   "st" cont oid 'O' epoch(u64 BE) -> "" (a stable punch of the object)
//! ```

use shoal_common::{ContId, Epoch, Oid};

/// Array extents never cross a boundary of this many bytes, so a read of a
/// byte range only visits the buckets it overlaps.
pub const BUCKET_BYTES: u64 = 1 << 20;

pub const TAG_SINGLE: u8 = b'S';
pub const TAG_EXTENT: u8 = b'E';

pub fn obj_prefix(cont: ContId, oid: Oid) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(&cont.to_bytes());
    k.extend_from_slice(&oid.to_bytes());
    k
}

pub fn push_key(k: &mut Vec<u8>, key: &[u8]) {
    k.extend_from_slice(&(key.len() as u16).to_be_bytes());
    k.extend_from_slice(key);
}

pub fn dkey_prefix(cont: ContId, oid: Oid, dkey: &[u8]) -> Vec<u8> {
    let mut k = obj_prefix(cont, oid);
    push_key(&mut k, dkey);
    k
}

pub fn akey_prefix(cont: ContId, oid: Oid, dkey: &[u8], akey: &[u8]) -> Vec<u8> {
    let mut k = dkey_prefix(cont, oid, dkey);
    push_key(&mut k, akey);
    k
}

pub fn single_key(akey_prefix: &[u8], epoch: Epoch) -> Vec<u8> {
    let mut k = akey_prefix.to_vec();
    k.push(TAG_SINGLE);
    k.extend_from_slice(&(!epoch).to_be_bytes());
    k
}

pub fn extent_bucket_prefix(akey_prefix: &[u8], bucket: u64) -> Vec<u8> {
    let mut k = akey_prefix.to_vec();
    k.push(TAG_EXTENT);
    k.extend_from_slice(&bucket.to_be_bytes());
    k
}

pub fn extent_key(akey_prefix: &[u8], byte_start: u64, epoch: Epoch) -> Vec<u8> {
    let mut k = extent_bucket_prefix(akey_prefix, byte_start / BUCKET_BYTES);
    k.extend_from_slice(&byte_start.to_be_bytes());
    k.extend_from_slice(&(!epoch).to_be_bytes());
    k
}

/// Punch key prefixes; append `!epoch` for the key itself.
pub fn punch_prefix(cont: ContId, oid: Oid, dkey: Option<&[u8]>, akey: Option<&[u8]>) -> Vec<u8> {
    let mut k = obj_prefix(cont, oid);
    match (dkey, akey) {
        (None, _) => k.push(b'O'),
        (Some(d), None) => {
            k.push(b'D');
            push_key(&mut k, d);
        }
        (Some(d), Some(a)) => {
            k.push(b'A');
            push_key(&mut k, d);
            push_key(&mut k, a);
        }
    }
    k
}

/// The prefix of the stable marks of a dkey (or, with `None`, of the whole
/// object); the mark's key appends the epoch (u64 BE).
pub fn stable_prefix(cont: ContId, oid: Oid, dkey: Option<&[u8]>) -> Vec<u8> {
    let mut k = stable_prefix_of_cont(cont);
    k.extend_from_slice(&oid.to_bytes());
    match dkey {
        Some(d) => {
            k.push(b'D');
            push_key(&mut k, d);
        }
        None => k.push(b'O'),
    }
    k
}

/// The prefix of every stable mark of a container.
pub fn stable_prefix_of_cont(cont: ContId) -> Vec<u8> {
    let mut k = b"st".to_vec();
    k.extend_from_slice(&cont.to_bytes());
    k
}

pub fn with_epoch(prefix: &[u8], epoch: Epoch) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&(!epoch).to_be_bytes());
    k
}

/// Reads an inverted epoch from the last 8 bytes of a key.
pub fn epoch_suffix(key: &[u8]) -> Option<Epoch> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(!u64::from_be_bytes(tail))
}

/// Reads a length-prefixed key at `at`; returns it and the offset after it.
pub fn read_key(k: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let len = u16::from_be_bytes(k.get(at..at + 2)?.try_into().ok()?) as usize;
    let key = k.get(at + 2..at + 2 + len)?;
    Some((key, at + 2 + len))
}

/// The smallest key greater than every key that starts with `prefix`, or
/// `None` when no such key exists (all bytes 0xff).
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut k = prefix.to_vec();
    while let Some(last) = k.pop() {
        if last != 0xff {
            k.push(last + 1);
            return Some(k);
        }
    }
    None
}

/// Parses an extent key's tail (after the akey prefix and tag): the byte
/// start and epoch.
pub fn parse_extent_tail(tail: &[u8]) -> Option<(u64, Epoch)> {
    if tail.len() != 24 {
        return None;
    }
    let start = u64::from_be_bytes(tail[8..16].try_into().ok()?);
    let epoch = !u64::from_be_bytes(tail[16..24].try_into().ok()?);
    Some((start, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_versions_sort_first() {
        let p = akey_prefix(ContId(1), Oid::new(0, 1), b"d", b"a");
        assert!(single_key(&p, 10) < single_key(&p, 9));
        assert_eq!(epoch_suffix(&single_key(&p, 77)), Some(77));
    }

    #[test]
    fn successor_skips_exactly_the_prefix() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xff, 0xff]), None);
    }

    #[test]
    fn keys_of_one_dkey_are_contiguous_and_unambiguous() {
        let c = ContId(1);
        let o = Oid::new(0, 1);
        let a = akey_prefix(c, o, b"ab", b"c");
        let b = akey_prefix(c, o, b"a", b"bc");
        assert_ne!(a, b);
        let (d, at) = read_key(&a, 32).unwrap();
        assert_eq!(d, b"ab");
        assert_eq!(read_key(&a, at).unwrap().0, b"c");
    }
}
