//! The versioned target store: the only module that knows RocksDB.
//!
//! Each target owns one RocksDB instance (`meta/`) for metadata and a
//! directory of append-only data files (`data/`) for large extents. See
//! [`keys`] for the key layout and `record` for the value records.
//!
//! Invariants:
//! - An update is acknowledged only after its data-file bytes are
//!   fdatasync'ed and the records that point at them are in RocksDB with a
//!   synced WAL write. Concurrent updates share one fdatasync and one WAL
//!   sync (group commit in the writer thread).
//! - A failed fdatasync or metadata write poisons the target: every later
//!   request fails with [`ShoalError::Poisoned`] until the process restarts
//!   and replays.
//! - Reads at epoch E see, per value, the newest version <= E that is newer
//!   than the newest punch <= E covering it (object, dkey or akey punch).
//! - Every value is checksummed (crc32c) and verified on every read; a
//!   mismatch returns [`ShoalError::Checksum`], never the bytes.

mod data;
pub mod keys;
pub mod meta;
mod read;
mod record;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam::channel::{self, Receiver, Sender};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use shoal_common::msg::{FetchIod, Fetched, UpdateIod, ValueKind};
use shoal_common::{ContId, Epoch, Oid, Result, ShoalError, EPOCH_MAX};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use data::{Appender, DataFiles};
use keys::BUCKET_BYTES;
use read::View;
use record::{Location, Record};

const CF_VALUES: &str = "values";
const CF_PUNCHES: &str = "punches";
const CF_OBJECTS: &str = "objects";

/// Tuning of one target store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Values up to this many bytes are stored inline in RocksDB.
    pub inline_threshold: usize,
    /// Writes are refused with `NoSpace` when they would leave less than
    /// this many bytes free on the file system.
    pub reserve_bytes: u64,
    /// Most updates committed together by one group commit.
    pub max_group: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { inline_threshold: 4096, reserve_bytes: 64 << 20, max_group: 128 }
    }
}

/// One change submitted to the writer thread.
#[derive(Debug)]
pub enum Mutation {
    Update { cont: ContId, oid: Oid, dkey: Vec<u8>, epoch: Epoch, iods: Vec<UpdateIod>, data: Vec<Bytes> },
    Punch { cont: ContId, oid: Oid, epoch: Epoch, dkey: Option<Vec<u8>>, akey: Option<Vec<u8>> },
}

struct Job {
    m: Mutation,
    reply: oneshot::Sender<Result<Epoch>>,
}

impl Mutation {
    /// The object it changes, whether it only raises max-u64 values, and
    /// whether it raises any.
    fn shape(&self) -> ((ContId, Oid), bool, bool) {
        match self {
            Mutation::Update { cont, oid, iods, .. } => {
                let max = |i: &UpdateIod| i.kind == ValueKind::MaxU64;
                ((*cont, *oid), iods.iter().all(max), iods.iter().any(max))
            }
            Mutation::Punch { cont, oid, .. } => ((*cont, *oid), false, false),
        }
    }
}

/// One page of a listing: keys, and the anchor to continue from (`None`
/// when the listing is complete).
pub type ListPage = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// A target's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub data_bytes: u64,
    pub free_bytes: u64,
}

/// One target's store. Cheap to share behind an `Arc`; reads run on the
/// caller's thread, writes go through the target's writer thread.
pub struct TargetStore {
    id: u32,
    db: Arc<DB>,
    files: Arc<DataFiles>,
    poisoned: Arc<AtomicBool>,
    tx: Option<Sender<Job>>,
    writer: Option<JoinHandle<()>>,
}

fn io_err(what: &str, e: impl std::fmt::Display) -> ShoalError {
    ShoalError::Io(format!("{what}: {e}"))
}

impl TargetStore {
    /// Opens (or creates) the target under `dir`, replaying RocksDB's WAL,
    /// and starts its writer thread.
    pub fn open(dir: &Path, id: u32, opts: StoreOptions) -> Result<TargetStore> {
        let mut o = Options::default();
        o.create_if_missing(true);
        o.create_missing_column_families(true);
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        o.set_max_background_jobs(2);
        let cfs = [CF_VALUES, CF_PUNCHES, CF_OBJECTS].into_iter().map(|n| {
            let mut co = Options::default();
            co.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(n, co)
        });
        let meta = dir.join("meta");
        let db = DB::open_cf_descriptors(&o, &meta, cfs).map_err(|e| io_err(&format!("open {}", meta.display()), e))?;
        let (files, appender) = DataFiles::open(&dir.join("data"))
            .map_err(|e| io_err(&format!("open data files in {}", dir.display()), e))?;
        let db = Arc::new(db);
        let files = Arc::new(files);
        let poisoned = Arc::new(AtomicBool::new(false));
        // Unbounded: callers bound the queue (the service admits a fixed
        // number of writes per target), so a send never blocks a runtime thread.
        let (tx, rx) = channel::unbounded();
        let w = Writer { id, db: db.clone(), files: files.clone(), poisoned: poisoned.clone(), appender, opts };
        let writer = std::thread::Builder::new()
            .name(format!("shoal-writer-{id}"))
            .spawn(move || w.run(rx))
            .map_err(|e| io_err("spawn writer thread", e))?;
        info!(target_id = id, dir = %dir.display(), "target store open");
        Ok(TargetStore { id, db, files, poisoned, tx: Some(tx), writer: Some(writer) })
    }

    /// This target's number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whether an I/O failure has poisoned this target.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    fn check_poison(&self) -> Result<()> {
        if self.is_poisoned() {
            return Err(ShoalError::Poisoned(self.id));
        }
        Ok(())
    }

    /// Submits a mutation; the receiver resolves once it is durable (or
    /// failed). Dropping the receiver does not cancel the write.
    pub fn submit(&self, m: Mutation) -> oneshot::Receiver<Result<Epoch>> {
        let (reply, rx) = oneshot::channel();
        let job = Job { m, reply };
        match &self.tx {
            Some(tx) => {
                if let Err(channel::SendError(job)) = tx.send(job) {
                    let _ = job.reply.send(Err(ShoalError::Busy("target is shutting down".into())));
                }
            }
            None => {
                let _ = job.reply.send(Err(ShoalError::Busy("target is shutting down".into())));
            }
        }
        rx
    }

    /// Submits a mutation and blocks until it is durable. Not for async
    /// contexts: await [`TargetStore::submit`]'s receiver there.
    pub fn apply(&self, m: Mutation) -> Result<Epoch> {
        self.submit(m).blocking_recv().map_err(|_| ShoalError::Internal("writer thread dropped a job".into()))?
    }

    /// Reads values under one dkey as of `epoch`, from one consistent
    /// RocksDB snapshot. Returns one [`Fetched`] and one data buffer per iod.
    pub fn fetch(
        &self,
        cont: ContId,
        oid: Oid,
        dkey: &[u8],
        epoch: Epoch,
        iods: &[FetchIod],
    ) -> Result<(Vec<Fetched>, Vec<Bytes>)> {
        self.check_poison()?;
        View::new(&self.db, &self.files, self.id).fetch(cont, oid, dkey, epoch, iods)
    }

    /// Lists visible dkeys of an object (`dkey` = None) or akeys of one
    /// dkey as of `epoch`, after `anchor`, at most `limit`, in (length,
    /// bytes) order. Returns the keys and the anchor to continue from
    /// (`None` when done).
    pub fn list(
        &self,
        cont: ContId,
        oid: Oid,
        epoch: Epoch,
        dkey: Option<&[u8]>,
        anchor: Option<&[u8]>,
        limit: usize,
    ) -> Result<ListPage> {
        self.check_poison()?;
        View::new(&self.db, &self.files, self.id).list(cont, oid, epoch, dkey, anchor, limit)
    }

    /// Space used by data files and free on the file system.
    pub fn usage(&self) -> Usage {
        Usage { data_bytes: self.files.total_bytes(), free_bytes: free_space(self.files.dir()).unwrap_or(0) }
    }

    /// Stops the writer thread after it has finished every submitted job.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Drop for TargetStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn free_space(dir: &Path) -> std::io::Result<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// A record waiting for the group's write batch: column family, key, value.
type Staged = (&'static str, Vec<u8>, Vec<u8>);

/// The writer thread's state: the only place that appends and commits.
struct Writer {
    id: u32,
    db: Arc<DB>,
    files: Arc<DataFiles>,
    poisoned: Arc<AtomicBool>,
    appender: Appender,
    opts: StoreOptions,
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < self.opts.max_group {
                match rx.try_recv() {
                    Ok(j) => group.push(j),
                    Err(_) => break,
                }
            }
            self.commit(group);
        }
    }

    fn poison(&self, what: &str, e: impl std::fmt::Display) -> ShoalError {
        error!(target_id = self.id, "{what} failed, target poisoned: {e}");
        self.poisoned.store(true, Ordering::Release);
        ShoalError::Poisoned(self.id)
    }

    fn commit(&mut self, group: Vec<Job>) {
        let mut free = free_space(self.files.dir()).unwrap_or_else(|e| {
            warn!(target_id = self.id, "statvfs failed, writing without a space check: {e}");
            u64::MAX
        });
        let mut batch = WriteBatch::default();
        let mut accepted = Vec::with_capacity(group.len());
        // Values of max-u64 akeys written earlier in this group, which the
        // database does not show yet.
        let mut maxes: HashMap<Vec<u8>, (u64, Epoch)> = HashMap::new();
        // Objects this batch writes or punches other than by max-u64 values.
        let mut touched: HashSet<(ContId, Oid)> = HashSet::new();
        for job in group {
            if self.poisoned.load(Ordering::Acquire) {
                let _ = job.reply.send(Err(ShoalError::Poisoned(self.id)));
                continue;
            }
            let (obj, max_only, has_max) = job.m.shape();
            if has_max && touched.contains(&obj) {
                // A max-u64 update reads the value it raises; commit what
                // this batch already holds for the object first, so that the
                // read sees it (a truncating write or a punch).
                self.flush(std::mem::take(&mut batch), std::mem::take(&mut accepted));
                maxes.clear();
                touched.clear();
                if self.poisoned.load(Ordering::Acquire) {
                    let _ = job.reply.send(Err(ShoalError::Poisoned(self.id)));
                    continue;
                }
            }
            let mut staged = Vec::new();
            let mut new_maxes = Vec::new();
            match self.prepare(&job.m, &mut staged, &mut free, &maxes, &mut new_maxes) {
                Ok(epoch) => {
                    for (cf, k, v) in staged {
                        batch.put_cf(self.db.cf_handle(cf).expect("cf"), k, v);
                    }
                    maxes.extend(new_maxes);
                    if !max_only {
                        touched.insert(obj);
                    }
                    accepted.push((job.reply, epoch));
                }
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        self.flush(batch, accepted);
    }

    /// Makes a batch durable (data files first, then the synced metadata
    /// write) and answers its mutations.
    fn flush(&mut self, batch: WriteBatch, accepted: Vec<(oneshot::Sender<Result<Epoch>>, Epoch)>) {
        if accepted.is_empty() {
            return;
        }
        let result = self.files.sync(&mut self.appender).map_err(|e| self.poison("data fdatasync", e)).and_then(|()| {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            #[cfg(feature = "failpoints")]
            fail::fail_point!("store::meta_write", |_| Err(self.poison("metadata write", "injected failure")));
            self.db.write_opt(batch, &wo).map_err(|e| self.poison("metadata write", e))
        });
        for (reply, epoch) in accepted {
            let _ = reply.send(result.clone().map(|()| epoch));
        }
    }

    /// Checks one mutation, appends its large values to the data file and
    /// stages its records. An error here fails only this mutation: its staged
    /// records are dropped and bytes it appended stay unreferenced.
    fn prepare(
        &mut self,
        m: &Mutation,
        staged: &mut Vec<Staged>,
        free: &mut u64,
        maxes: &HashMap<Vec<u8>, (u64, Epoch)>,
        new_maxes: &mut Vec<(Vec<u8>, (u64, Epoch))>,
    ) -> Result<Epoch> {
        match m {
            Mutation::Punch { cont, oid, epoch, dkey, akey } => {
                let p = keys::punch_prefix(*cont, *oid, dkey.as_deref(), akey.as_deref());
                staged.push((CF_PUNCHES, keys::with_epoch(&p, *epoch), Vec::new()));
                Ok(*epoch)
            }
            Mutation::Update { cont, oid, dkey, epoch, iods, data } => {
                check_update_overlap(iods)?;
                let need: u64 = data.iter().map(|d| d.len() as u64).sum::<u64>() + 4096 * iods.len() as u64;
                if need.saturating_add(self.opts.reserve_bytes) > *free {
                    return Err(ShoalError::NoSpace(format!(
                        "target {} has {} bytes free, the update needs {need} plus a reserve of {}",
                        self.id, free, self.opts.reserve_bytes
                    )));
                }
                *free -= need;
                for (iod, seg) in iods.iter().zip(data) {
                    let akp = keys::akey_prefix(*cont, *oid, dkey, &iod.akey);
                    match iod.kind {
                        ValueKind::Single => {
                            let rec = self.store_bytes(seg, 0)?;
                            staged.push((CF_VALUES, keys::single_key(&akp, *epoch), rec.encode()));
                        }
                        ValueKind::MaxU64 => {
                            let given = u64::from_le_bytes(
                                seg[..]
                                    .try_into()
                                    .map_err(|_| ShoalError::invalid("a max-u64 value is exactly 8 bytes"))?,
                            );
                            let (current, newest) = match maxes.get(&akp) {
                                Some(v) => *v,
                                None => self.stored_u64(*cont, *oid, dkey, &iod.akey)?,
                            };
                            // A version newer than this update may exist
                            // (epochs from concurrent writers arrive out of
                            // order): raise that one instead, or a read of
                            // the latest would miss this maximum.
                            let (v, at) = (current.max(given), newest.max(*epoch));
                            let rec = self.store_bytes(&Bytes::copy_from_slice(&v.to_le_bytes()), 0)?;
                            staged.push((CF_VALUES, keys::single_key(&akp, at), rec.encode()));
                            new_maxes.push((akp, (v, at)));
                        }
                        ValueKind::Array { rec_size, start, .. } => {
                            let mut s = start * rec_size as u64;
                            let mut rest = seg.clone();
                            while !rest.is_empty() {
                                let room = (BUCKET_BYTES - s % BUCKET_BYTES).min(rest.len() as u64) as usize;
                                let piece = rest.split_to(room);
                                let rec = self.store_bytes(&piece, rec_size)?;
                                staged.push((CF_VALUES, keys::extent_key(&akp, s, *epoch), rec.encode()));
                                s += room as u64;
                            }
                        }
                    }
                }
                staged.push((CF_OBJECTS, keys::obj_prefix(*cont, *oid), epoch.to_be_bytes().to_vec()));
                Ok(*epoch)
            }
        }
    }

    /// The newest visible value of a max-u64 akey and its epoch (0, 0 when
    /// none).
    fn stored_u64(&self, cont: ContId, oid: Oid, dkey: &[u8], akey: &[u8]) -> Result<(u64, Epoch)> {
        let iod = FetchIod { akey: akey.to_vec(), kind: ValueKind::Single };
        let (f, data) = View::new(&self.db, &self.files, self.id).fetch(cont, oid, dkey, EPOCH_MAX, &[iod])?;
        match (&f[0], data[0].len()) {
            (Fetched::Single { epoch }, 8) => {
                Ok((u64::from_le_bytes(data[0][..].try_into().expect("8 bytes")), *epoch))
            }
            (Fetched::Single { .. }, n) => {
                Err(ShoalError::invalid(format!("akey holds a {n}-byte value, not a max-u64")))
            }
            _ => Ok((0, 0)),
        }
    }

    fn store_bytes(&mut self, b: &Bytes, rec_size: u32) -> Result<Record> {
        let crc = crc32c::crc32c(b);
        let loc = if b.len() <= self.opts.inline_threshold {
            Location::Inline(b.clone())
        } else {
            let (file, offset) = self
                .files
                .append(&mut self.appender, b)
                .map_err(|e| ShoalError::Io(format!("append to data file: {e}")))?;
            Location::External { file, offset }
        };
        Ok(Record { rec_size, len: b.len() as u64, crc, loc })
    }
}

/// Refuses an update that names one akey twice as a single value, or gives
/// overlapping extents for one akey: the result would be ambiguous.
fn check_update_overlap(iods: &[UpdateIod]) -> Result<()> {
    // (akey, byte range of an array extent or None for a single value)
    type Seen<'a> = (&'a [u8], Option<(u64, u64)>);
    let mut seen: Vec<Seen<'_>> = Vec::new();
    for iod in iods {
        let range = match iod.kind {
            ValueKind::Single | ValueKind::MaxU64 => None,
            ValueKind::Array { rec_size, start, nr } => Some((start * rec_size as u64, (start + nr) * rec_size as u64)),
        };
        for (k, r) in &seen {
            if *k == iod.akey.as_slice() {
                let clash = match (r, range) {
                    (Some((a, b)), Some((c, d))) => *a < d && c < *b,
                    _ => true,
                };
                if clash {
                    return Err(ShoalError::invalid(format!(
                        "akey {:?} is written twice with overlapping data in one update",
                        String::from_utf8_lossy(&iod.akey)
                    )));
                }
            }
        }
        seen.push((&iod.akey, range));
    }
    Ok(())
}

/// Where a target's files live under a server's data directory.
pub fn target_dir(data_dir: &Path, id: u32) -> PathBuf {
    data_dir.join(format!("target-{id}"))
}

#[cfg(test)]
mod tests;
