//! Which stored extent supplies each byte of a range: the newest one that
//! covers it. Pure logic, no RocksDB.
//!
//! [`Pieces`] takes the candidate extents one by one, in any order, and
//! keeps only the current winner of each piece of the range, so its memory
//! follows the shape of the answer (one entry per piece), never the number
//! of versions offered: a 4 KiB range rewritten a million times costs one
//! entry.

use std::collections::{BTreeMap, HashMap};

use shoal_common::Epoch;

use super::record::Record;

struct Entry {
    rec: Record,
    start: u64,
    epoch: Epoch,
    refs: u32,
}

/// The winners of the range [s, e).
pub struct Pieces {
    s: u64,
    e: u64,
    /// Piece start -> (piece end, id of the winning extent).
    frags: BTreeMap<u64, (u64, usize)>,
    recs: HashMap<usize, Entry>,
    next_id: usize,
}

impl Pieces {
    pub fn new(s: u64, e: u64) -> Pieces {
        Pieces { s, e, frags: BTreeMap::new(), recs: HashMap::new(), next_id: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.frags.is_empty()
    }

    /// Offers the extent `rec` stored at byte `start` with `epoch`: it wins
    /// every byte of the range it covers where nothing newer was offered.
    pub fn offer(&mut self, start: u64, rec: Record, epoch: Epoch) {
        let (a, b) = (start.max(self.s), start.saturating_add(rec.len).min(self.e));
        if a >= b {
            return;
        }
        let mut over: Vec<(u64, u64, usize)> = Vec::new();
        for (&fs, &(fe, fid)) in self.frags.range(..b).rev() {
            if fe <= a {
                break;
            }
            over.push((fs, fe, fid));
        }
        over.reverse();
        let id = self.next_id;
        let mut next: Vec<(u64, u64, usize)> = Vec::with_capacity(over.len() * 2 + 1);
        let mut cursor = a;
        let mut won = false;
        for &(fs, fe, fid) in &over {
            if fs < a {
                next.push((fs, a, fid));
            }
            let (os, oe) = (fs.max(a), fe.min(b));
            if cursor < os {
                next.push((cursor, os, id));
                won = true;
            }
            if epoch > self.recs[&fid].epoch {
                next.push((os, oe, id));
                won = true;
            } else {
                next.push((os, oe, fid));
            }
            cursor = oe;
            if fe > b {
                next.push((b, fe, fid));
            }
        }
        if cursor < b {
            next.push((cursor, b, id));
            won = true;
        }
        if !won {
            return;
        }
        self.next_id += 1;
        self.recs.insert(id, Entry { rec, start, epoch, refs: 0 });
        for &(fs, _, _) in &over {
            self.frags.remove(&fs);
        }
        // Adjacent pieces of one extent become one.
        let mut merged: Vec<(u64, u64, usize)> = Vec::with_capacity(next.len());
        for p in next {
            match merged.last_mut() {
                Some(last) if last.2 == p.2 && last.1 == p.0 => last.1 = p.1,
                _ => merged.push(p),
            }
        }
        for (ps, pe, pid) in merged {
            self.frags.insert(ps, (pe, pid));
            self.recs.get_mut(&pid).expect("winner is kept").refs += 1;
        }
        for &(_, _, fid) in &over {
            self.unref(fid);
        }
    }

    fn unref(&mut self, id: usize) {
        let e = self.recs.get_mut(&id).expect("referenced extent is kept");
        e.refs -= 1;
        if e.refs == 0 {
            self.recs.remove(&id);
        }
    }

    /// The pieces in order: (from, to, winner id).
    pub fn pieces(&self) -> Vec<(u64, u64, usize)> {
        self.frags.iter().map(|(&s, &(e, id))| (s, e, id)).collect()
    }

    /// A winner's record, the byte where it is stored, and its id.
    pub fn record(&self, id: usize) -> (&Record, u64, usize) {
        let e = &self.recs[&id];
        (&e.rec, e.start, id)
    }

    /// A winner's epoch.
    pub fn epoch(&self, id: usize) -> Epoch {
        self.recs[&id].epoch
    }

    /// Whether every byte of [start, end) within the range has a winner
    /// newer than `epoch`.
    pub fn covered_newer(&self, start: u64, end: u64, epoch: Epoch) -> bool {
        let (a, b) = (start.max(self.s), end.min(self.e));
        if a >= b {
            return true;
        }
        let mut cursor = a;
        let first = self.frags.range(..=a).next_back().map(|(&s, _)| s).unwrap_or(a);
        for (&fs, &(fe, id)) in self.frags.range(first..b) {
            if fe <= cursor {
                continue;
            }
            if fs > cursor || self.recs[&id].epoch <= epoch {
                return false;
            }
            cursor = fe;
            if cursor >= b {
                return true;
            }
        }
        cursor >= b
    }

    /// Every winner: (byte start, epoch) — the key of its stored version.
    pub fn winners(&self) -> impl Iterator<Item = (u64, Epoch)> + '_ {
        self.recs.values().map(|e| (e.start, e.epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::super::record::Location;
    use super::*;
    use proptest::prelude::*;

    fn rec(len: u64) -> Record {
        Record { rec_size: 1, len, crc: 0, loc: Location::External { file: 0, offset: 0 } }
    }

    proptest! {
        #[test]
        fn winners_match_a_byte_by_byte_model(
            extents in prop::collection::vec((0u64..200, 1u64..80, 1u64..1000), 0..60),
            (s, len) in (0u64..200, 1u64..150),
        ) {
            let e = s + len;
            let mut p = Pieces::new(s, e);
            let mut best = vec![0u64; len as usize];
            let mut seen = std::collections::HashSet::new();
            for (start, l, epoch) in extents {
                if !seen.insert(epoch) {
                    continue;
                }
                p.offer(start, rec(l), epoch);
                for x in start.max(s)..(start + l).min(e) {
                    let b = &mut best[(x - s) as usize];
                    *b = (*b).max(epoch);
                }
            }
            let mut got = vec![0u64; len as usize];
            let mut last_end = s;
            for (from, to, id) in p.pieces() {
                prop_assert!(from >= last_end && from < to && to <= e);
                last_end = to;
                for x in from..to {
                    got[(x - s) as usize] = p.epoch(id);
                }
            }
            prop_assert_eq!(got, best);
            // Only winners are kept.
            let live: std::collections::HashSet<usize> = p.pieces().iter().map(|x| x.2).collect();
            prop_assert_eq!(live.len(), p.recs.len());
        }
    }

    #[test]
    fn coverage_by_newer_winners() {
        let mut p = Pieces::new(0, 100);
        p.offer(10, rec(20), 5);
        p.offer(30, rec(20), 7);
        assert!(p.covered_newer(10, 50, 4));
        assert!(!p.covered_newer(10, 50, 5), "bytes 10..30 are only as new as 5");
        assert!(!p.covered_newer(5, 20, 1), "bytes 5..10 have no winner");
        assert!(p.covered_newer(35, 45, 6));
        assert!(p.covered_newer(200, 300, 9), "outside the range nothing needs covering");
    }

    #[test]
    fn a_million_rewrites_of_one_range_keep_one_entry() {
        let mut p = Pieces::new(0, 4096);
        for epoch in 1..=1_000_000u64 {
            p.offer(0, rec(4096), epoch);
        }
        assert_eq!(p.pieces().len(), 1);
        assert_eq!(p.recs.len(), 1);
        assert_eq!(p.epoch(p.pieces()[0].2), 1_000_000);
    }
}
