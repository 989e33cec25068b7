//! Writes of erasure-coded extents, and why no acknowledged write is lost.
//!
//! Every stripe on disk is a whole encoded stripe written at one epoch to
//! all k + p shards. Full stripes are encoded and written directly. A
//! partial stripe is read, merged and rewritten whole (read-modify-write,
//! RMW). Two rules on the targets make this safe against every concurrent
//! writer and any clock skew:
//!
//! 1. Epoch order: a target refuses an update of a range for which it
//!    already holds a version (or punch) at the same or a newer epoch, with
//!    a conflict carrying its clock. The writer observes it and sends the
//!    whole stripe write again with a newer epoch. So on every shard a
//!    stripe's versions arrive in epoch order, and a write that starts
//!    after another was acknowledged ends with a larger epoch than it.
//! 2. Conditional rewrite: an RMW reads every cell of the stripe first and
//!    notes the version each shard holds; its rewrite of shard j is
//!    conditional on shard j still holding exactly that (no newer version
//!    of the cell). If anything wrote the stripe in between (a full-stripe
//!    writer, or an RMW writer whose lock lapsed), some shard refuses and
//!    the RMW reads, merges and rewrites again. A writer is acknowledged
//!    only when every shard took its stripe, so of two writers that raced
//!    on one stripe, the one acknowledged either read the other's bytes or
//!    wrote after them with a newer epoch.
//!
//! The RMW epoch is taken after the read and after observing the newest
//! version the read saw, so the rewrite is always newer than the stripe it
//! merged (rule 1 would otherwise refuse it).
//!
//! Stripe locks (at the group's first shard) only keep RMW writers of one
//! stripe from retrying each other forever; correctness does not depend on
//! them. The lock's lease is renewed while the write runs, and a write that
//! ends or is cancelled releases it at once (on drop, if need be).

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use shoal_common::msg::{FileLockReply, FileLockReq, StripeLockReq, StripeUnlockReq, UpdateIod, ValueKind};
use shoal_common::placement::Shard;
use shoal_common::{Epoch, ErrorKind, Result, ShoalError};

use crate::ec_read::{stripes_per_request, RmwBase};
use crate::object::{conflict_clock, Object, WriteOutcome, CONFLICT_RETRIES};
use crate::system::PoolState;
use shoal_common::ec::{codec, Codec};

/// Lease of a stripe lock; the writer renews it every third of it.
pub(crate) const STRIPE_LOCK_LEASE: Duration = Duration::from_secs(10);

/// A stripe lock held at the group's first shard; released on
/// [`StripeLock::release`] or, failing that, when dropped.
pub(crate) struct StripeLock {
    obj: Object,
    st: PoolState,
    leader: Shard,
    req: StripeLockReq,
    released: bool,
}

impl StripeLock {
    async fn take(obj: &Object, st: &PoolState, leader: Shard, dkey: &[u8], stripes: Vec<u64>) -> Result<StripeLock> {
        let owner: u128 = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(shoal_common::hlc::wall_ns());
            let hi = h.finish();
            h.write_u64(hi);
            ((hi as u128) << 64) | h.finish() as u128
        };
        let req = StripeLockReq {
            pool: st.info.uuid,
            rank: leader.rank,
            cont: obj.cont.info.uuid,
            oid: obj.oid(),
            dkey: dkey.to_vec(),
            stripes,
            owner,
            lease_ms: STRIPE_LOCK_LEASE.as_millis() as u32,
        };
        obj.rpc(st, &leader, &req, vec![]).await?;
        Ok(StripeLock { obj: obj.clone(), st: st.clone(), leader, req, released: false })
    }

    /// Runs `work` while renewing the lease.
    async fn hold<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let renew = async {
            loop {
                tokio::time::sleep(STRIPE_LOCK_LEASE / 3).await;
                // A lost renewal costs at most a retry: the rewrite's
                // conditions keep the data safe without the lock.
                let _ = self.renew().await;
            }
        };
        tokio::select! {
            r = work => r,
            _ = renew => unreachable!("the renewal loop never ends"),
        }
    }

    fn unlock_req(&self) -> StripeUnlockReq {
        StripeUnlockReq {
            pool: self.req.pool,
            rank: self.req.rank,
            cont: self.req.cont,
            oid: self.req.oid,
            dkey: self.req.dkey.clone(),
            stripes: self.req.stripes.clone(),
            owner: self.req.owner,
        }
    }

    /// Sends the lock request again, which renews the lease of a lock
    /// this owner holds.
    pub(crate) async fn renew(&self) -> Result<()> {
        self.obj.rpc(&self.st, &self.leader, &self.req, vec![]).await.map(|_| ())
    }

    pub(crate) async fn release(mut self) {
        self.released = true;
        let _ = self.obj.rpc(&self.st, &self.leader, &self.unlock_req(), vec![]).await;
    }
}

impl Drop for StripeLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Cancelled mid-write: free the stripes now rather than at the end
        // of the lease.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (obj, st, leader, req) = (self.obj.clone(), self.st.clone(), self.leader, self.unlock_req());
            rt.spawn(async move {
                let _ = obj.rpc(&st, &leader, &req, vec![]).await;
            });
        }
    }
}

/// The server that keeps the locks of a dkey: the first shard in service
/// of its group (every client with this map picks the same one).
fn lock_leader(layout: &shoal_common::placement::Layout, dkey: &[u8]) -> Result<Shard> {
    let group = layout.dkey_shards(dkey);
    group
        .iter()
        .find(|s| s.available)
        .or(group.first())
        .copied()
        .ok_or_else(|| ShoalError::Internal("a layout group without shards".into()))
}

impl Object {
    /// Takes the server-kept lock on `stripes` of `dkey` (the stripe
    /// numbers name independent locks), at the first shard in service of
    /// the dkey's group, as partial-stripe writes do. Other users: the
    /// POSIX namespace, which serialises changes of a directory across
    /// mounts with it. The lease lapses after [`STRIPE_LOCK_LEASE`] unless
    /// the holder renews it ([`StripeLock::renew`]).
    pub(crate) async fn lock(&self, dkey: &[u8], stripes: Vec<u64>) -> Result<StripeLock> {
        self.with_layout(|st, layout| {
            let stripes = stripes.clone();
            async move { StripeLock::take(self, &st, lock_leader(&layout, dkey)?, dkey, stripes).await }
        })
        .await
    }

    /// Sends a POSIX file-lock request for this object to the server that
    /// keeps its locks: the same one as its stripe locks of `dkey`.
    pub(crate) async fn file_lock(&self, dkey: &[u8], req: FileLockReq) -> Result<FileLockReply> {
        self.with_layout(|st, layout| {
            let mut req = req.clone();
            async move {
                let leader = lock_leader(&layout, dkey)?;
                (req.pool, req.rank, req.cont, req.oid) = (st.info.uuid, leader.rank, self.cont.info.uuid, self.oid());
                self.rpc(&st, &leader, &req, vec![]).await.map(|(r, _)| r)
            }
        })
        .await
    }

    /// Writes stripes covering `[offset, offset + data.len())` (see the
    /// module docs). Every stripe is written whole, at one epoch, to all
    /// k + p shards.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn ec_write(
        &self,
        st: &PoolState,
        group: &[Shard],
        geo: (u32, u32, u64),
        dkey: &[u8],
        akey: &[u8],
        offset: u64,
        data: Bytes,
    ) -> Result<Epoch> {
        let (k, p, cell) = geo;
        let stripe = k as u64 * cell;
        let end = offset + data.len() as u64;
        let (s0, s1) = (offset / stripe, (end - 1) / stripe + 1);
        let codec = codec(k, p)?;
        let partial: Vec<u64> = {
            let mut v: Vec<u64> =
                [s0, s1 - 1].into_iter().filter(|n| !(offset <= n * stripe && end >= (n + 1) * stripe)).collect();
            v.dedup();
            v
        };
        let lock = if partial.is_empty() {
            None
        } else {
            // At the group's first shard in service (every client with this
            // map picks the same one; the conditions on the rewrite keep
            // the stripe safe whatever the lock does).
            let leader = group.iter().find(|s| s.available).copied().unwrap_or(group[0]);
            match StripeLock::take(self, st, leader, dkey, partial.clone()).await {
                Ok(l) => Some(l),
                // The leader died and the MS has not said so yet: the lock
                // only saves retries, so the write goes on without it
                // rather than failing within the container's rd_fac.
                Err(e) if e.kind() == ErrorKind::Unreachable => None,
                Err(e) => return Err(e),
            }
        };
        let work = async {
            for _ in 0..CONFLICT_RETRIES {
                // Read the partial stripes before taking the epoch, and
                // take it past every version they hold.
                let mut bases = HashMap::new();
                for &s in &partial {
                    let base = self.read_for_rmw(st, group, geo, dkey, akey, s).await?;
                    self.observe(base.newest);
                    bases.insert(s, base);
                }
                let epoch = self.epoch().await?;
                let w = Stripes {
                    obj: self,
                    st,
                    group,
                    geo,
                    dkey,
                    akey,
                    offset,
                    data: &data,
                    bases: &bases,
                    codec: codec.clone(),
                };
                match w.send(s0, s1, epoch).await {
                    WriteOutcome::Done(missed) => {
                        self.cont.pool.client.inner.count_rmw(partial.len());
                        if missed.is_empty() {
                            self.mark_stable(st, group, Some(dkey), epoch);
                        }
                        self.record_missed(&missed).await?;
                        return Ok(epoch);
                    }
                    WriteOutcome::Conflict => self.cont.pool.client.inner.count_conflict(),
                    WriteOutcome::Failed(e) => return Err(e),
                }
            }
            Err(ShoalError::Busy(format!(
                "object {}: stripes of dkey {:?} kept changing under this write for {CONFLICT_RETRIES} attempts; try again",
                self.oid(),
                String::from_utf8_lossy(dkey)
            )))
        };
        match lock {
            Some(lock) => {
                let r = lock.hold(work).await;
                lock.release().await;
                r
            }
            None => work.await,
        }
    }
}

/// One attempt at writing a run of stripes.
struct Stripes<'a> {
    obj: &'a Object,
    st: &'a PoolState,
    group: &'a [Shard],
    geo: (u32, u32, u64),
    dkey: &'a [u8],
    akey: &'a [u8],
    offset: u64,
    data: &'a Bytes,
    bases: &'a HashMap<u64, RmwBase>,
    codec: std::sync::Arc<dyn Codec>,
}

/// Stripes of at least this many bytes in one batch are encoded on a
/// blocking thread, not on the async worker that sends them.
const ENCODE_OFF_WORKER: usize = 256 << 10;

impl Stripes<'_> {
    async fn send(&self, s0: u64, s1: u64, epoch: Epoch) -> WriteOutcome {
        let (k, p, cell) = self.geo;
        let stripe = k as u64 * cell;
        let end = self.offset + self.data.len() as u64;
        let batch = stripes_per_request(cell, self.akey);
        let mut missed = Vec::new();
        let mut s = s0;
        while s < s1 {
            let last = (s + batch).min(s1);
            let mut per_shard: Vec<(Vec<UpdateIod>, Vec<Bytes>)> = vec![(Vec::new(), Vec::new()); (k + p) as usize];
            let fulls: Vec<Bytes> = (s..last)
                .map(|st_no| {
                    let (a, b) = (st_no * stripe, (st_no + 1) * stripe);
                    match self.bases.get(&st_no) {
                        None => self.data.slice((a - self.offset) as usize..(b - self.offset) as usize),
                        Some(base) => {
                            let mut buf = BytesMut::from(&base.data[..]);
                            let (from, to) = (self.offset.max(a), end.min(b));
                            buf[(from - a) as usize..(to - a) as usize].copy_from_slice(
                                &self.data[(from - self.offset) as usize..(to - self.offset) as usize],
                            );
                            buf.freeze()
                        }
                    }
                })
                .collect();
            let cells_of = |full: &Bytes| -> Vec<Bytes> {
                (0..k as usize).map(|j| full.slice(j * cell as usize..(j + 1) * cell as usize)).collect()
            };
            let encode = {
                let (codec, fulls) = (self.codec.clone(), fulls.clone());
                move || -> shoal_common::Result<Vec<Vec<Vec<u8>>>> {
                    fulls
                        .iter()
                        .map(|full| {
                            let cells: Vec<&[u8]> =
                                (0..k as usize).map(|j| &full[j * cell as usize..(j + 1) * cell as usize]).collect();
                            codec.encode(&cells)
                        })
                        .collect()
                }
            };
            // Large batches are encoded off the async worker threads.
            let parities = if fulls.len() * stripe as usize >= ENCODE_OFF_WORKER {
                match tokio::task::spawn_blocking(encode).await {
                    Ok(r) => r,
                    Err(e) => Err(shoal_common::ShoalError::Internal(format!("EC encode task: {e}"))),
                }
            } else {
                encode()
            };
            let parities = match parities {
                Ok(p) => p,
                Err(e) => return WriteOutcome::Failed(e),
            };
            for ((st_no, full), parity) in (s..last).zip(&fulls).zip(parities) {
                let base = self.bases.get(&st_no);
                let cells = cells_of(full);
                let kind = ValueKind::Array { rec_size: 1, start: st_no * cell, nr: cell };
                for (j, c) in cells.into_iter().chain(parity.into_iter().map(Bytes::from)).enumerate() {
                    let mut iod = UpdateIod::new(self.akey, kind, &c);
                    iod.cond = base.and_then(|b| b.expected[j]);
                    per_shard[j].0.push(iod);
                    per_shard[j].1.push(c);
                }
            }
            let futs = self.group.iter().zip(per_shard).map(|(sh, (iods, segs))| {
                let req = self.obj.update_req(self.st, sh, self.dkey, epoch, iods);
                async move { self.obj.rpc(self.st, sh, &req, segs).await }
            });
            let results = join_all(futs).await;
            conflict_clock(self.obj, &results);
            let r = WriteOutcome::of(self.group, results, self.obj.spare_shards(), |(r, _)| self.obj.observe(r.now));
            if let std::ops::ControlFlow::Break(other) = r.and_missed(&mut missed) {
                return other;
            }
            s = last;
        }
        WriteOutcome::Done(missed)
    }
}
