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
//!   mismatch returns [`ShoalError::Checksum`], never the bytes. The
//!   checksum is the one the client computed before it sent the value: the
//!   writer verifies it before it stores anything, and fetches carry it back.
//! - Versions of one value are accepted in epoch order: an update is
//!   refused with [`ShoalError::Conflict`] if the target already holds a
//!   version of its range (or a punch over it) at the same or a newer
//!   epoch, and a punch if the object holds anything that new. The client
//!   retries with a newer epoch, so the write acknowledged last in real time
//!   is the newest, whatever the clients' clocks say. A conditional update
//!   (`UpdateIod::cond`) is also refused if its range changed since the
//!   version it was based on.
//! - Updates and punches of a destroyed container are refused.
//! - Old versions that no read at or after the aggregation horizon can see
//!   are removed by [`TargetStore::aggregate`], and their data-file space
//!   given back (see `aggregate`).

mod aggregate;
pub mod data;
pub mod keys;
pub mod meta;
mod pieces;
mod read;
mod record;
pub mod restore;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam::channel::{self, Receiver, Sender};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use shoal_common::msg::{FetchIod, Fetched, UpdateIod, ValueKind};
use shoal_common::{ContId, Epoch, Oid, Result, ShoalError, EPOCH_MAX};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use data::{Appender, DataFiles, RealFs, Vfs};
use keys::BUCKET_BYTES;
use read::View;
use record::{Location, Record};

const CF_VALUES: &str = "values";
const CF_PUNCHES: &str = "punches";
const CF_OBJECTS: &str = "objects";
const CF_META: &str = "meta";
/// Key in the meta column family: the newest epoch the target has
/// committed (u64 BE), so its server's clock never goes back after a restart.
const HW_KEY: &[u8] = b"hw";
/// Most akeys remembered as changed since the last aggregation; beyond it
/// the next aggregation scans everything.
const MAX_DIRTY: usize = 1 << 16;

/// Tuning of one target store.
#[derive(Clone)]
pub struct StoreOptions {
    /// Values up to this many bytes are stored inline in RocksDB.
    pub inline_threshold: usize,
    /// Writes are refused with `NoSpace` when they would leave less than
    /// this many bytes free on the file system.
    pub reserve_bytes: u64,
    /// Most updates committed together by one group commit.
    pub max_group: usize,
    /// A data file is closed for appends once it reaches this size.
    pub file_roll_bytes: u64,
    /// The file layer under the data files.
    pub vfs: Arc<dyn Vfs>,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("inline_threshold", &self.inline_threshold)
            .field("reserve_bytes", &self.reserve_bytes)
            .field("max_group", &self.max_group)
            .field("file_roll_bytes", &self.file_roll_bytes)
            .finish_non_exhaustive()
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            inline_threshold: 4096,
            reserve_bytes: 64 << 20,
            max_group: 128,
            file_roll_bytes: 1 << 30,
            vfs: Arc::new(RealFs::default()),
        }
    }
}

/// One change submitted to the writer thread.
#[derive(Debug)]
pub enum Mutation {
    Update {
        cont: ContId,
        oid: Oid,
        dkey: Vec<u8>,
        epoch: Epoch,
        iods: Vec<UpdateIod>,
        data: Vec<Bytes>,
    },
    Punch {
        cont: ContId,
        oid: Oid,
        epoch: Epoch,
        dkey: Option<Vec<u8>>,
        akey: Option<Vec<u8>>,
    },
    /// Marks a container destroyed: every later update or punch of it is
    /// refused. Answered once every mutation submitted before it is durable.
    Tombstone {
        cont: ContId,
    },
    /// Puts versions and punches back exactly as they were (rebuild); the
    /// segments hold the values' bytes.
    Restore {
        cont: ContId,
        oid: Oid,
        dkey: Vec<u8>,
        items: Vec<shoal_common::msg::RestoreItem>,
        data: Vec<Bytes>,
    },
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
            Mutation::Tombstone { cont } => ((*cont, Oid::new(0, 0)), false, false),
            Mutation::Restore { cont, oid, .. } => ((*cont, *oid), false, false),
        }
    }
}

/// A conflict with a version the target holds.
fn conflict(newest: Epoch, message: String) -> ShoalError {
    ShoalError::Conflict { server_now: newest, message }
}

/// One page of a listing: keys, and the anchor to continue from (`None`
/// when the listing is complete).
pub type ListPage = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// A target's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub data_bytes: u64,
    pub free_bytes: u64,
    /// The file system the free bytes are on (see [`Vfs::space_id`]).
    pub space_id: u64,
}

/// One target's store. Cheap to share behind an `Arc`; reads run on the
/// caller's thread, writes go through the target's writer thread.
pub struct TargetStore {
    id: u32,
    dir: std::path::PathBuf,
    db: Arc<DB>,
    files: Arc<DataFiles>,
    poisoned: Arc<AtomicBool>,
    shared: Arc<Shared>,
    tx: Option<Sender<Job>>,
    writer: Option<JoinHandle<()>>,
}

/// State the writer thread shares with the rest of the store.
#[derive(Default)]
struct Shared {
    /// Destroyed containers: their updates and punches are refused.
    tombstones: RwLock<HashSet<ContId>>,
    /// The newest epoch committed.
    hw: AtomicU64,
    /// The data file appends go to (never removed by space reclaim).
    active_file: AtomicU32,
    /// Akey prefixes changed since the last aggregation, with the newest
    /// epoch written to each; `dirty_overflow` when there were too many.
    dirty: Mutex<HashMap<Vec<u8>, Epoch>>,
    dirty_overflow: AtomicBool,
    /// Serialises aggregation and container drops.
    reclaim: Mutex<()>,
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
        let cfs = [CF_VALUES, CF_PUNCHES, CF_OBJECTS, CF_META].into_iter().map(|n| {
            let mut co = Options::default();
            co.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(n, co)
        });
        let meta = dir.join("meta");
        let db = DB::open_cf_descriptors(&o, &meta, cfs).map_err(|e| io_err(&format!("open {}", meta.display()), e))?;
        let (files, appender) = DataFiles::open(opts.vfs.clone(), &dir.join("data"), opts.file_roll_bytes)
            .map_err(|e| io_err(&format!("open data files in {}", dir.display()), e))?;
        let hw = match db.get_cf(db.cf_handle(CF_META).expect("cf"), HW_KEY) {
            Ok(Some(v)) => {
                u64::from_be_bytes(v[..].try_into().map_err(|_| ShoalError::Io("corrupt hw record".into()))?)
            }
            Ok(None) => 0,
            Err(e) => return Err(io_err("read hw record", e)),
        };
        let shared = Arc::new(Shared::default());
        shared.hw.store(hw, Ordering::Release);
        shared.active_file.store(appender.file_no(), Ordering::Release);
        // Nothing is known of what changed before the restart: the first
        // aggregation looks at everything.
        shared.dirty_overflow.store(true, Ordering::Release);
        let db = Arc::new(db);
        let files = Arc::new(files);
        let poisoned = Arc::new(AtomicBool::new(false));
        // Unbounded: callers bound the queue (the service admits a fixed
        // number of writes per target), so a send never blocks a runtime thread.
        let (tx, rx) = channel::unbounded();
        let w = Writer {
            id,
            db: db.clone(),
            files: files.clone(),
            poisoned: poisoned.clone(),
            shared: shared.clone(),
            appender,
            opts,
        };
        let writer = std::thread::Builder::new()
            .name(format!("shoal-writer-{id}"))
            .spawn(move || w.run(rx))
            .map_err(|e| io_err("spawn writer thread", e))?;
        info!(target_id = id, dir = %dir.display(), "target store open");
        Ok(TargetStore { id, dir: dir.to_path_buf(), db, files, poisoned, shared, tx: Some(tx), writer: Some(writer) })
    }

    /// The target's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The newest epoch this target has committed.
    pub fn max_epoch(&self) -> Epoch {
        self.shared.hw.load(Ordering::Acquire)
    }

    /// Refuses, from now on, writes and reads of `cont` (in memory: the
    /// durable record is [`TargetStore::drop_container`]'s).
    pub fn refuse_container(&self, cont: ContId) {
        self.shared.tombstones.write().expect("lock").insert(cont);
    }

    /// Whether `cont` is known to be destroyed here.
    pub fn is_tombstoned(&self, cont: ContId) -> bool {
        self.shared.tombstones.read().expect("lock").contains(&cont)
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
    ) -> Result<(Vec<Fetched>, Vec<Bytes>, Vec<u32>)> {
        self.check_poison()?;
        View::new(&self.db, &self.files, self.id).fetch(cont, oid, dkey, epoch, iods)
    }

    /// Bytes a fetch of `iods` would return, from the records alone (a
    /// newer version may land before the fetch runs).
    pub fn fetch_size(&self, cont: ContId, oid: Oid, dkey: &[u8], epoch: Epoch, iods: &[FetchIod]) -> Result<u64> {
        self.check_poison()?;
        View::new(&self.db, &self.files, self.id).fetch_size(cont, oid, dkey, epoch, iods)
    }

    /// Lists visible dkeys of an object (`dkey` = None) or akeys of one
    /// dkey as of `epoch`, after `anchor`, at most `limit` keys and about
    /// `max_bytes` of them, in (length, bytes) order. Returns the keys and
    /// the anchor to continue from (`None` when done).
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
        self.check_poison()?;
        View::new(&self.db, &self.files, self.id).list(cont, oid, epoch, dkey, anchor, limit, max_bytes)
    }

    /// Space used by data files and free on the file system.
    pub fn usage(&self) -> Usage {
        Usage {
            data_bytes: self.files.total_bytes(),
            free_bytes: self.files.free_space().unwrap_or(0),
            space_id: self.files.space_id(),
        }
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

/// A record waiting for the group's write batch: column family, key, value.
type Staged = (&'static str, Vec<u8>, Vec<u8>);

/// The writer thread's state: the only place that appends and commits.
struct Writer {
    id: u32,
    db: Arc<DB>,
    files: Arc<DataFiles>,
    poisoned: Arc<AtomicBool>,
    shared: Arc<Shared>,
    appender: Appender,
    opts: StoreOptions,
}

/// What the mutations of one group have touched so far: a mutation that
/// reads what an earlier one of the group wrote (conflict checks, max-u64
/// values) makes the group commit first, so that it reads it.
#[derive(Default)]
struct GroupState {
    /// Values of max-u64 akeys written earlier in this group.
    maxes: HashMap<Vec<u8>, (u64, Epoch)>,
    /// Objects written or punched other than by max-u64 values.
    touched: HashSet<(ContId, Oid)>,
    /// (object, dkey) pairs written.
    dkeys: HashSet<(ContId, Oid, Vec<u8>)>,
    /// Objects punched whole or by dkey.
    punched: HashSet<(ContId, Oid)>,
    /// Newest epoch written per object in this group.
    obj_hw: HashMap<(ContId, Oid), Epoch>,
    /// Newest epoch of the group.
    hw: Epoch,
    /// Akey prefixes written, with their newest epoch.
    dirty: Vec<(Vec<u8>, Epoch)>,
}

impl GroupState {
    /// Whether `m` must not share a group commit with what this group holds.
    fn clashes(&self, m: &Mutation) -> bool {
        match m {
            Mutation::Update { cont, oid, dkey, iods, .. } => {
                let obj = (*cont, *oid);
                let has_max = iods.iter().any(|i| i.kind == ValueKind::MaxU64);
                (has_max && self.touched.contains(&obj))
                    || self.punched.contains(&obj)
                    || self.dkeys.contains(&(*cont, *oid, dkey.clone()))
            }
            Mutation::Punch { cont, oid, .. } => self.touched.contains(&(*cont, *oid)),
            Mutation::Tombstone { .. } => false,
            Mutation::Restore { cont, oid, dkey, .. } => {
                self.punched.contains(&(*cont, *oid)) || self.dkeys.contains(&(*cont, *oid, dkey.clone()))
            }
        }
    }
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
        let mut free = self.files.free_space().unwrap_or_else(|e| {
            warn!(target_id = self.id, "statvfs failed, writing without a space check: {e}");
            u64::MAX
        });
        let mut batch = WriteBatch::default();
        let mut accepted = Vec::with_capacity(group.len());
        let mut gs = GroupState::default();
        for job in group {
            if self.poisoned.load(Ordering::Acquire) {
                let _ = job.reply.send(Err(ShoalError::Poisoned(self.id)));
                continue;
            }
            if gs.clashes(&job.m) {
                self.flush(std::mem::take(&mut batch), std::mem::take(&mut accepted), std::mem::take(&mut gs));
                if self.poisoned.load(Ordering::Acquire) {
                    let _ = job.reply.send(Err(ShoalError::Poisoned(self.id)));
                    continue;
                }
            }
            let (obj, max_only, _) = job.m.shape();
            let mut staged = Vec::new();
            let mut new_maxes = Vec::new();
            let pending = self.appender.pending_len();
            let prepared = self.prepare(&job.m, &mut staged, &mut free, &gs, &mut new_maxes);
            if prepared.is_err() {
                // Its large extents are not written at all (nothing will
                // point at them).
                self.appender.truncate_pending(pending);
            }
            match prepared {
                Ok(epoch) => {
                    for (cf, k, v) in staged {
                        batch.put_cf(self.db.cf_handle(cf).expect("cf"), k, v);
                    }
                    gs.maxes.extend(new_maxes);
                    match &job.m {
                        Mutation::Update { cont, oid, dkey, iods, .. } => {
                            if !max_only {
                                gs.touched.insert(obj);
                            }
                            gs.dkeys.insert((*cont, *oid, dkey.clone()));
                            for iod in iods {
                                gs.dirty.push((keys::akey_prefix(*cont, *oid, dkey, &iod.akey), epoch));
                            }
                        }
                        Mutation::Punch { cont, oid, dkey, akey, .. } => {
                            gs.touched.insert(obj);
                            gs.punched.insert(obj);
                            // What the punch hides can be reclaimed.
                            let prefix = match (dkey, akey) {
                                (Some(d), Some(a)) => keys::akey_prefix(*cont, *oid, d, a),
                                (Some(d), None) => keys::dkey_prefix(*cont, *oid, d),
                                _ => keys::obj_prefix(*cont, *oid),
                            };
                            gs.dirty.push((prefix, epoch));
                        }
                        Mutation::Tombstone { .. } => {}
                        Mutation::Restore { cont, oid, dkey, .. } => {
                            gs.touched.insert(obj);
                            gs.dkeys.insert((*cont, *oid, dkey.clone()));
                            gs.dirty.push((keys::dkey_prefix(*cont, *oid, dkey), epoch));
                        }
                    }
                    // The object index keeps the newest update of each
                    // object (punches are ordered by the floors they set).
                    if matches!(job.m, Mutation::Update { .. } | Mutation::Restore { .. }) {
                        let stored = match gs.obj_hw.get(&obj) {
                            Some(e) => *e,
                            // Read (and checked) by prepare just now.
                            None => self.object_hw(obj.0, obj.1).unwrap_or(epoch),
                        };
                        gs.obj_hw.insert(obj, stored.max(epoch));
                    }
                    gs.hw = gs.hw.max(epoch);
                    accepted.push((job.reply, epoch));
                }
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        self.flush(batch, accepted, gs);
    }

    /// Makes a batch durable (data files first, then the synced metadata
    /// write) and answers its mutations.
    fn flush(&mut self, mut batch: WriteBatch, accepted: Vec<(oneshot::Sender<Result<Epoch>>, Epoch)>, gs: GroupState) {
        if accepted.is_empty() {
            return;
        }
        for (obj, hw) in &gs.obj_hw {
            batch.put_cf(self.db.cf_handle(CF_OBJECTS).expect("cf"), keys::obj_prefix(obj.0, obj.1), hw.to_be_bytes());
        }
        let hw = self.shared.hw.load(Ordering::Acquire).max(gs.hw);
        batch.put_cf(self.db.cf_handle(CF_META).expect("cf"), HW_KEY, hw.to_be_bytes());
        // Large extents gathered for direct writes go to disk first. If one
        // fails, the group fails like a failed append: nothing points at
        // those bytes, and the target stays usable.
        if let Err(e) = self.files.write_pending(&mut self.appender) {
            let err = if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                ShoalError::NoSpace(format!("target {}: write to data file: {e}", self.id))
            } else {
                ShoalError::Io(format!("write to data file: {e}"))
            };
            for (reply, _) in accepted {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        let result = self.files.sync(&mut self.appender).map_err(|e| self.poison("data fdatasync", e)).and_then(|()| {
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            #[cfg(feature = "failpoints")]
            fail::fail_point!("store::meta_write", |_| Err(self.poison("metadata write", "injected failure")));
            self.db.write_opt(batch, &wo).map_err(|e| self.poison("metadata write", e))
        });
        if result.is_ok() {
            self.shared.hw.store(hw, Ordering::Release);
            self.shared.active_file.store(self.appender.file_no(), Ordering::Release);
            let mut dirty = self.shared.dirty.lock().expect("lock");
            for (akp, e) in gs.dirty {
                if dirty.len() >= MAX_DIRTY && !dirty.contains_key(&akp) {
                    self.shared.dirty_overflow.store(true, Ordering::Release);
                    continue;
                }
                let d = dirty.entry(akp).or_default();
                *d = (*d).max(e);
            }
        }
        for (reply, epoch) in accepted {
            let _ = reply.send(result.clone().map(|()| epoch));
        }
    }

    /// Checks one mutation (destroyed container, epoch order, condition,
    /// checksums, space), appends its large values to the data file and
    /// stages its records. An error here fails only this mutation: its
    /// staged records are dropped and bytes it appended stay unreferenced.
    fn prepare(
        &mut self,
        m: &Mutation,
        staged: &mut Vec<Staged>,
        free: &mut u64,
        gs: &GroupState,
        new_maxes: &mut Vec<(Vec<u8>, (u64, Epoch))>,
    ) -> Result<Epoch> {
        let destroyed = |cont: &ContId| -> Result<()> {
            if self.shared.tombstones.read().expect("lock").contains(cont) {
                return Err(ShoalError::cont_destroyed(*cont));
            }
            Ok(())
        };
        match m {
            Mutation::Tombstone { cont } => {
                self.shared.tombstones.write().expect("lock").insert(*cont);
                Ok(0)
            }
            Mutation::Restore { cont, oid, dkey, items, data } => {
                use shoal_common::msg::RestoreKind;
                destroyed(cont)?;
                let mut newest = 0;
                for (it, seg) in items.iter().zip(data) {
                    newest = newest.max(it.epoch);
                    let akp = keys::akey_prefix(*cont, *oid, dkey, &it.akey);
                    match it.kind {
                        RestoreKind::Single | RestoreKind::Extent { .. } => {
                            let crc = crc32c::crc32c(seg);
                            if crc != it.crc {
                                return Err(ShoalError::Damaged(format!(
                                    "a rebuilt version of object {oid} arrived with a bad crc32c; nothing was stored"
                                )));
                            }
                            let rec = self.store_bytes(seg, it.rec_size, crc)?;
                            let key = match it.kind {
                                RestoreKind::Extent { start } => keys::extent_key(&akp, start, it.epoch),
                                _ => keys::single_key(&akp, it.epoch),
                            };
                            staged.push((CF_VALUES, key, rec.encode()));
                        }
                        RestoreKind::PunchObject => {
                            let p = keys::punch_prefix(*cont, *oid, None, None);
                            staged.push((CF_PUNCHES, keys::with_epoch(&p, it.epoch), Vec::new()));
                        }
                        RestoreKind::PunchDkey => {
                            let p = keys::punch_prefix(*cont, *oid, Some(dkey), None);
                            staged.push((CF_PUNCHES, keys::with_epoch(&p, it.epoch), Vec::new()));
                        }
                        RestoreKind::PunchAkey => {
                            let p = keys::punch_prefix(*cont, *oid, Some(dkey), Some(&it.akey));
                            staged.push((CF_PUNCHES, keys::with_epoch(&p, it.epoch), Vec::new()));
                        }
                    }
                }
                Ok(newest)
            }
            Mutation::Punch { cont, oid, epoch, dkey, akey } => {
                destroyed(cont)?;
                let newest = self.object_hw(*cont, *oid)?.max(gs.obj_hw.get(&(*cont, *oid)).copied().unwrap_or(0));
                if newest >= *epoch {
                    return Err(conflict(
                        newest,
                        format!("object {oid} holds a version at epoch {newest}, not older than the punch at {epoch}"),
                    ));
                }
                let p = keys::punch_prefix(*cont, *oid, dkey.as_deref(), akey.as_deref());
                staged.push((CF_PUNCHES, keys::with_epoch(&p, *epoch), Vec::new()));
                Ok(*epoch)
            }
            Mutation::Update { cont, oid, dkey, epoch, iods, data } => {
                destroyed(cont)?;
                check_update_overlap(iods)?;
                // The object index must be readable: the group's commit
                // raises it.
                self.object_hw(*cont, *oid)?;
                let need: u64 = data.iter().map(|d| d.len() as u64).sum::<u64>() + 4096 * iods.len() as u64;
                if need.saturating_add(self.opts.reserve_bytes) > *free {
                    return Err(ShoalError::NoSpace(format!(
                        "target {} has {} bytes free, the update needs {need} plus a reserve of {}",
                        self.id, free, self.opts.reserve_bytes
                    )));
                }
                let view = View::new(&self.db, &self.files, self.id);
                for iod in iods {
                    let range = match iod.kind {
                        ValueKind::MaxU64 => {
                            // A max-u64 value is raised at the newest
                            // version's epoch, but never under a punch.
                            let floor = view.punch_floor(
                                &[
                                    keys::punch_prefix(*cont, *oid, None, None),
                                    keys::punch_prefix(*cont, *oid, Some(dkey), None),
                                    keys::punch_prefix(*cont, *oid, Some(dkey), Some(&iod.akey)),
                                ],
                                EPOCH_MAX,
                            )?;
                            if floor >= *epoch {
                                return Err(conflict(
                                    floor,
                                    format!("object {oid} was punched at epoch {floor}, not older than the update at {epoch}"),
                                ));
                            }
                            continue;
                        }
                        ValueKind::Single => None,
                        ValueKind::Array { rec_size, start, nr } => {
                            Some((start * rec_size as u64, (start + nr) * rec_size as u64))
                        }
                    };
                    let newest = view.newest_version(*cont, *oid, dkey, &iod.akey, range)?;
                    if let Some(base) = iod.cond {
                        if newest > base {
                            return Err(conflict(
                                newest,
                                format!(
                                    "akey {:?} of object {oid} changed at epoch {newest}, after the version {base} this update is based on",
                                    String::from_utf8_lossy(&iod.akey)
                                ),
                            ));
                        }
                    }
                    if newest >= *epoch {
                        return Err(conflict(
                            newest,
                            format!(
                                "akey {:?} of object {oid} holds a version at epoch {newest}, not older than the update at {epoch}",
                                String::from_utf8_lossy(&iod.akey)
                            ),
                        ));
                    }
                }
                drop(view);
                *free -= need;
                for (iod, seg) in iods.iter().zip(data) {
                    #[cfg(feature = "failpoints")]
                    let seg = &flip_bit_failpoint(seg);
                    let akp = keys::akey_prefix(*cont, *oid, dkey, &iod.akey);
                    let bad_crc = || {
                        ShoalError::Damaged(format!(
                            "akey {:?} of object {oid} arrived with a bad crc32c; nothing was stored",
                            String::from_utf8_lossy(&iod.akey)
                        ))
                    };
                    match iod.kind {
                        ValueKind::Single => {
                            let crc = crc32c::crc32c(seg);
                            if crc != iod.crc {
                                return Err(bad_crc());
                            }
                            let rec = self.store_bytes(seg, 0, crc)?;
                            staged.push((CF_VALUES, keys::single_key(&akp, *epoch), rec.encode()));
                        }
                        ValueKind::MaxU64 => {
                            if crc32c::crc32c(seg) != iod.crc {
                                return Err(bad_crc());
                            }
                            let given = u64::from_le_bytes(
                                seg[..]
                                    .try_into()
                                    .map_err(|_| ShoalError::invalid("a max-u64 value is exactly 8 bytes"))?,
                            );
                            let (current, newest) = match gs.maxes.get(&akp) {
                                Some(v) => *v,
                                None => self.stored_u64(*cont, *oid, dkey, &iod.akey)?,
                            };
                            // A version newer than this update may exist
                            // (epochs from concurrent writers arrive out of
                            // order): raise that one instead, or a read of
                            // the latest would miss this maximum.
                            let (v, at) = (current.max(given), newest.max(*epoch));
                            let b = Bytes::copy_from_slice(&v.to_le_bytes());
                            let rec = self.store_bytes(&b, 0, crc32c::crc32c(&b))?;
                            staged.push((CF_VALUES, keys::single_key(&akp, at), rec.encode()));
                            new_maxes.push((akp, (v, at)));
                        }
                        ValueKind::Array { rec_size, start, .. } => {
                            // Pieces never cross a bucket; their checksums
                            // combine to the one the client sent.
                            let mut s = start * rec_size as u64;
                            let mut rest = seg.clone();
                            let mut whole = 0u32;
                            let mut pieces = Vec::new();
                            while !rest.is_empty() {
                                let room = (BUCKET_BYTES - s % BUCKET_BYTES).min(rest.len() as u64) as usize;
                                let piece = rest.split_to(room);
                                let crc = crc32c::crc32c(&piece);
                                whole = crc32c::crc32c_combine(whole, crc, piece.len());
                                pieces.push((s, piece, crc));
                                s += room as u64;
                            }
                            if whole != iod.crc {
                                return Err(bad_crc());
                            }
                            for (s, piece, crc) in pieces {
                                let rec = self.store_bytes(&piece, rec_size, crc)?;
                                staged.push((CF_VALUES, keys::extent_key(&akp, s, *epoch), rec.encode()));
                            }
                        }
                    }
                }
                Ok(*epoch)
            }
        }
    }

    /// The newest epoch any update of the object carried (0 when none).
    fn object_hw(&self, cont: ContId, oid: Oid) -> Result<Epoch> {
        match self.db.get_cf(self.db.cf_handle(CF_OBJECTS).expect("cf"), keys::obj_prefix(cont, oid)) {
            Ok(Some(v)) => Ok(v[..].try_into().map(u64::from_be_bytes).unwrap_or(0)),
            Ok(None) => Ok(0),
            Err(e) => Err(io_err("read the object index", e)),
        }
    }

    /// The newest visible value of a max-u64 akey and its epoch (0, 0 when
    /// none).
    fn stored_u64(&self, cont: ContId, oid: Oid, dkey: &[u8], akey: &[u8]) -> Result<(u64, Epoch)> {
        let iod = FetchIod { akey: akey.to_vec(), kind: ValueKind::Single };
        let (f, data, _) = View::new(&self.db, &self.files, self.id).fetch(cont, oid, dkey, EPOCH_MAX, &[iod])?;
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

    /// Stores one value or extent piece whose crc32c is `crc`.
    fn store_bytes(&mut self, b: &Bytes, rec_size: u32, crc: u32) -> Result<Record> {
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

/// Failpoint `store::flip_bit`: flips a bit of a received value, as a
/// fault in the server's memory would, before the checksum is verified.
#[cfg(feature = "failpoints")]
fn flip_bit_failpoint(seg: &Bytes) -> Bytes {
    fail::fail_point!("store::flip_bit", !seg.is_empty(), |_| {
        let mut v = seg.to_vec();
        v[0] ^= 1;
        Bytes::from(v)
    });
    seg.clone()
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
mod lossy;
#[cfg(test)]
mod tests;
