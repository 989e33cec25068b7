//! The management service's durable log: a small RocksDB instance holding
//! every applied command by index and the state after the latest one.
//!
//! Each commit writes the entry and the new state in one synced batch, so
//! after a crash the state and the log agree. Bytes are opaque here; the
//! MS module owns their encoding.

use std::path::Path;

use rocksdb::{Options, WriteBatch, WriteOptions, DB};
use shoal_common::{Result, ShoalError};

const STATE_KEY: &[u8] = b"state";

fn entry_key(index: u64) -> Vec<u8> {
    let mut k = b"log/".to_vec();
    k.extend_from_slice(&index.to_be_bytes());
    k
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

    /// The latest committed state, if any.
    pub fn load_state(&self) -> Result<Option<Vec<u8>>> {
        self.db.get(STATE_KEY).map_err(|e| ShoalError::Io(format!("read MS state: {e}")))
    }

    /// The entry at `index`, if kept.
    pub fn entry(&self, index: u64) -> Result<Option<Vec<u8>>> {
        self.db.get(entry_key(index)).map_err(|e| ShoalError::Io(format!("read MS log: {e}")))
    }

    /// Durably records entry `index` and the state it produced.
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
}
