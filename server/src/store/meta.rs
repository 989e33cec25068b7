//! The management service's durable log: a small RocksDB instance holding
//! its Raft log (entries by index under `raft/log/`) and a few named
//! records (vote, purge point, applied state, snapshot). Appends and
//! records are synced before they return. Bytes are opaque here; the MS
//! module owns their encoding.
//!
//! Before the MS used Raft, each command was kept by index under `log/`
//! with the state after it under `state`; [`MetaLog::load_state`] still
//! reads that state, so such a directory can be taken over.

use std::path::Path;

use rocksdb::{Options, WriteBatch, WriteOptions, DB};
use shoal_common::{Result, ShoalError};

const STATE_KEY: &[u8] = b"state";

#[cfg(test)]
fn entry_key(index: u64) -> Vec<u8> {
    let mut k = b"log/".to_vec();
    k.extend_from_slice(&index.to_be_bytes());
    k
}

const RAFT_LOG: &[u8] = b"raft/log/";

fn raft_key(index: u64) -> Vec<u8> {
    let mut k = RAFT_LOG.to_vec();
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn raft_index(key: &[u8]) -> Option<u64> {
    key.strip_prefix(RAFT_LOG).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
}

fn io(what: &str) -> impl Fn(rocksdb::Error) -> ShoalError + '_ {
    move |e| ShoalError::Io(format!("{what}: {e}"))
}

fn synced() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

/// A log of opaque entries plus the latest state snapshot.
pub struct MetaLog {
    db: DB,
}

impl MetaLog {
    /// Opens (or creates) the log in `dir`, replaying RocksDB's WAL.
    pub fn open(dir: &Path) -> Result<MetaLog> {
        let mut o = Options::default();
        o.create_if_missing(true);
        let db = DB::open(&o, dir).map_err(|e| ShoalError::Io(format!("open MS log {}: {e}", dir.display())))?;
        Ok(MetaLog { db })
    }

    /// The state the pre-Raft MS committed last, if any.
    pub fn load_state(&self) -> Result<Option<Vec<u8>>> {
        self.db.get(STATE_KEY).map_err(|e| ShoalError::Io(format!("read MS state: {e}")))
    }

    /// The pre-Raft entry at `index`, if kept.
    #[cfg(test)]
    pub fn entry(&self, index: u64) -> Result<Option<Vec<u8>>> {
        self.db.get(entry_key(index)).map_err(|e| ShoalError::Io(format!("read MS log: {e}")))
    }

    /// A named record (`raft/vote`, ...), if written.
    pub fn record(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.db.get(name.as_bytes()).map_err(io("read MS record"))
    }

    /// Durably writes named records, all or none.
    pub fn put_records(&self, records: &[(&str, &[u8])]) -> Result<()> {
        let mut b = WriteBatch::default();
        for (k, v) in records {
            b.put(k.as_bytes(), v);
        }
        self.db.write_opt(b, &synced()).map_err(io("write MS record"))
    }

    /// Durably appends Raft log entries (index, bytes).
    pub fn raft_append(&self, entries: &[(u64, Vec<u8>)]) -> Result<()> {
        let mut b = WriteBatch::default();
        for (i, e) in entries {
            b.put(raft_key(*i), e);
        }
        self.db.write_opt(b, &synced()).map_err(io("append to the MS Raft log"))
    }

    /// The Raft log entries with `from <= index < to`, in order.
    pub fn raft_entries(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let it = self.db.iterator(rocksdb::IteratorMode::From(&raft_key(from), rocksdb::Direction::Forward));
        for kv in it {
            let (k, v) = kv.map_err(io("read the MS Raft log"))?;
            match raft_index(&k) {
                Some(i) if i < to => out.push((i, v.to_vec())),
                _ => break,
            }
        }
        Ok(out)
    }

    /// The last Raft log entry, if any.
    pub fn raft_last(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let mut it = self.db.iterator(rocksdb::IteratorMode::From(&raft_key(u64::MAX), rocksdb::Direction::Reverse));
        match it.next() {
            Some(kv) => {
                let (k, v) = kv.map_err(io("read the MS Raft log"))?;
                Ok(raft_index(&k).map(|i| (i, v.to_vec())))
            }
            None => Ok(None),
        }
    }

    /// Durably deletes the Raft log entries with `from <= index < to`, and
    /// writes `records` in the same batch.
    pub fn raft_delete(&self, from: u64, to: u64, records: &[(&str, &[u8])]) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete_range(raft_key(from), raft_key(to));
        if to == u64::MAX {
            b.delete(raft_key(u64::MAX));
        }
        for (k, v) in records {
            b.put(k.as_bytes(), v);
        }
        self.db.write_opt(b, &synced()).map_err(io("trim the MS Raft log"))
    }

    /// Durably records entry `index` and the state it produced, as the
    /// pre-Raft MS did (tests write such directories with it).
    #[cfg(test)]
    pub fn commit(&self, index: u64, entry: &[u8], state: &[u8]) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put(entry_key(index), entry);
        b.put(STATE_KEY, state);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(b, &wo).map_err(|e| ShoalError::Io(format!("write MS log: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = MetaLog::open(dir.path()).unwrap();
            assert_eq!(l.load_state().unwrap(), None);
            l.commit(1, b"a", b"s1").unwrap();
            l.commit(2, b"b", b"s2").unwrap();
        }
        let l = MetaLog::open(dir.path()).unwrap();
        assert_eq!(l.load_state().unwrap().as_deref(), Some(&b"s2"[..]));
        assert_eq!(l.entry(1).unwrap().as_deref(), Some(&b"a"[..]));
    }

    #[test]
    fn the_raft_log_appends_reads_trims_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = MetaLog::open(dir.path()).unwrap();
            assert_eq!(l.raft_last().unwrap(), None);
            let e: Vec<(u64, Vec<u8>)> = (0..10).map(|i| (i, vec![i as u8])).collect();
            l.raft_append(&e).unwrap();
            l.put_records(&[("raft/vote", b"v1")]).unwrap();
            assert_eq!(l.raft_entries(3, 6).unwrap(), e[3..6].to_vec());
            // Truncate from 8 (a conflict), purge up to 2 with its record.
            l.raft_delete(8, u64::MAX, &[]).unwrap();
            l.raft_delete(0, 3, &[("raft/purged", b"p2")]).unwrap();
        }
        let l = MetaLog::open(dir.path()).unwrap();
        assert_eq!(l.raft_last().unwrap(), Some((7, vec![7])));
        assert_eq!(l.raft_entries(0, 100).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 4, 5, 6, 7]);
        assert_eq!(l.record("raft/vote").unwrap().as_deref(), Some(&b"v1"[..]));
        assert_eq!(l.record("raft/purged").unwrap().as_deref(), Some(&b"p2"[..]));
        // The pre-Raft state key is not mistaken for a log entry.
        l.commit(1, b"a", b"s").unwrap();
        assert_eq!(l.raft_last().unwrap(), Some((7, vec![7])));
    }
}
