//! POSIX record locks (fcntl) and whole-file locks (flock), kept by the
//! servers so that they hold across every mount of a container.
//!
//! Each inode's locks live at the server that keeps its stripe locks (see
//! [`Object::file_lock`]). The mount is the lock session: its own task
//! renews the lease at every server it holds locks at, a third of
//! [`FILE_LOCK_LEASE`] apart, so the locks of a crashed mount lapse after
//! the lease. A blocking lock is a series of bounded waits at the server,
//! so a caller that is interrupted stops waiting.
//!
//! The mount also keeps the ranges its owners hold. A server that restarts
//! has lost its table and takes only reclaims for a grace period; a
//! renewal that finds the server holding none of this mount's locks on an
//! inode (while no lock request of it is under way) takes them again
//! with reclaims. A lock that cannot be reclaimed is reported as lost.
//!
//! [`Object::file_lock`]: crate::Object

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use shoal_common::msg::{FileLockInfo, FileLockOp, FileLockReq, ANY_RANK};
use shoal_common::{ContId, ErrorKind, Oid, PoolId};

use super::{posix, Fs, FsError, FsResult};

/// Lease of a mount's file locks at the servers.
pub const FILE_LOCK_LEASE: Duration = Duration::from_secs(30);
/// How long one request waits at the server for a blocking lock.
const WAIT_MS: u32 = 500;

/// What a lock request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// A shared lock (F_RDLCK, LOCK_SH).
    Read,
    /// An exclusive lock (F_WRLCK, LOCK_EX).
    Write,
    /// Release (F_UNLCK, LOCK_UN).
    Unlock,
}

/// The lock owners of one inode that may hold locks, with the number of
/// lock requests each has in flight.
pub(super) type Owners = std::collections::HashMap<u64, u32>;

/// One range an owner holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    start: u64,
    end: u64,
    write: bool,
    pid: u32,
}

/// What this mount holds on one inode, as the servers granted it.
#[derive(Default)]
pub(super) struct HeldLocks {
    /// Each lock request holds it shared for one attempt (a bounded wait
    /// at the server); a renewal holds it exclusively, so it never sees a
    /// request's effect at the server before `owners` has it.
    gate: Arc<tokio::sync::RwLock<()>>,
    /// When the server last confirmed this mount's lease there.
    renewed: Option<tokio::time::Instant>,
    owners: std::collections::HashMap<u64, Vec<Held>>,
}

impl HeldLocks {
    /// Applies a granted request of `owner` as the server does: its ranges
    /// in `start..=end` go, and a lock takes their place.
    fn apply(&mut self, owner: u64, start: u64, end: u64, lock: Option<(bool, u32)>) {
        let v = self.owners.entry(owner).or_default();
        let mut kept = Vec::with_capacity(v.len() + 2);
        for x in v.drain(..) {
            if x.end < start || end < x.start {
                kept.push(x);
                continue;
            }
            if x.start < start {
                kept.push(Held { end: start - 1, ..x });
            }
            if x.end > end {
                kept.push(Held { start: end + 1, ..x });
            }
        }
        if let Some((write, pid)) = lock {
            kept.push(Held { start, end, write, pid });
        }
        *v = kept;
        if v.is_empty() {
            self.owners.remove(&owner);
        }
    }

    fn ranges(&self) -> u32 {
        self.owners.values().map(|v| v.len() as u32).sum()
    }
}

/// The gate of inode `ino`'s [`HeldLocks`] until dropped; then the entry
/// goes if it holds nothing and nobody else uses it (only the map and
/// this guard hold the gate: clones are made under the map's lock).
struct Gate<'a> {
    fs: &'a Fs,
    ino: Oid,
    gate: Arc<tokio::sync::RwLock<()>>,
}

impl<'a> Gate<'a> {
    fn of(fs: &'a Fs, ino: Oid) -> Gate<'a> {
        let gate = fs.inner.held_locks.lock().expect("held locks").entry(ino).or_default().gate.clone();
        Gate { fs, ino, gate }
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let mut held = self.fs.inner.held_locks.lock().expect("held locks");
        if held.get(&self.ino).is_some_and(|h| h.owners.is_empty() && Arc::strong_count(&h.gate) == 2) {
            held.remove(&self.ino);
        }
    }
}

/// Counts a lock request in flight for its owner until dropped.
struct InFlight<'a> {
    fs: &'a Fs,
    ino: Oid,
    owner: u64,
}

impl<'a> InFlight<'a> {
    fn start(fs: &'a Fs, ino: Oid, owner: u64) -> InFlight<'a> {
        *fs.inner.file_locks.lock().expect("file locks").entry(ino).or_default().entry(owner).or_default() += 1;
        InFlight { fs, ino, owner }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut held = self.fs.inner.file_locks.lock().expect("file locks");
        // The owner stays listed: it may hold what it asked for.
        if let Some(n) = held.entry(self.ino).or_default().get_mut(&self.owner) {
            *n = n.saturating_sub(1);
        } else {
            held.entry(self.ino).or_default().insert(self.owner, 0);
        }
    }
}

impl Fs {
    fn lock_req(&self, owner: u64, pid: u32, start: u64, end: u64, op: FileLockOp, wait_ms: u32) -> FileLockReq {
        FileLockReq {
            // Filled in by Object::file_lock.
            pool: PoolId(0),
            rank: ANY_RANK,
            cont: ContId(0),
            oid: Oid::new(0, 0),
            session: self.inner.mount_id,
            owner,
            pid,
            start,
            end,
            op,
            lease_ms: FILE_LOCK_LEASE.as_millis() as u32,
            wait_ms,
        }
    }

    /// Takes or releases a lock of `owner` on bytes `start..=end` of file
    /// `ino`. If another owner (on any mount) holds a conflicting lock:
    /// with `wait`, waits until it goes (also through failovers of the
    /// server that keeps it), or fails with EINTR once `interrupted()` says
    /// the caller gave up; without, fails with EAGAIN.
    #[allow(clippy::too_many_arguments)]
    pub async fn setlk(
        &self,
        ino: Oid,
        owner: u64,
        pid: u32,
        start: u64,
        end: u64,
        kind: LockKind,
        wait: bool,
        interrupted: impl Fn() -> bool,
    ) -> FsResult<()> {
        let (obj, dkey) = self.node(ino)?;
        let op = match kind {
            LockKind::Read => FileLockOp::Read,
            LockKind::Write => FileLockOp::Write,
            LockKind::Unlock => FileLockOp::Unlock,
        };
        if op == FileLockOp::Unlock {
            if !self.may_hold(ino, owner) {
                return Ok(());
            }
            // What was written under the lock reaches the servers before
            // another mount can take it (as NFS flushes before an unlock).
            // A failure stays with the file, for its fsync or close.
            if let Err(e) = self.flush_file(ino).await {
                tracing::warn!(%ino, error = %e, "buffered writes failed before an unlock");
            }
        }
        // Listed (and renewed) before the request, so a lock granted while
        // this call is cancelled is still renewed and released at close.
        let in_flight = (op != FileLockOp::Unlock).then(|| InFlight::start(self, ino, owner));
        let gate = Gate::of(self, ino);
        let mut backoff = Duration::from_millis(50);
        loop {
            let req = self.lock_req(owner, pid, start, end, op, if wait { WAIT_MS } else { 0 });
            let attempt = async {
                let _shared = gate.gate.read().await;
                let r = obj.file_lock(dkey, req).await;
                if let Ok(reply) = &r {
                    if reply.conflict.is_none() {
                        let lock = match op {
                            FileLockOp::Read => Some((false, pid)),
                            FileLockOp::Write => Some((true, pid)),
                            _ => None,
                        };
                        let mut held = self.inner.held_locks.lock().expect("held locks");
                        let h = held.entry(ino).or_default();
                        h.apply(owner, start, end, lock);
                        h.renewed = Some(tokio::time::Instant::now());
                    }
                }
                r
            };
            let reply = match attempt.await {
                Ok(r) => r,
                // A failover, or a full lock table: a blocking lock keeps
                // trying while its caller waits.
                Err(e) if wait && matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Busy | ErrorKind::Timeout) => {
                    if interrupted() {
                        return Err(posix(libc::EINTR, "interrupted while waiting for a lock"));
                    }
                    tracing::debug!(%ino, error = %e, "lock request failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
                // A restarted server's grace period, or a full table.
                Err(e) if e.kind() == ErrorKind::Busy => return Err(posix(libc::EAGAIN, e.to_string())),
                Err(e) => return Err(e.into()),
            };
            // The kernel's whole file ends at i64::MAX.
            if op == FileLockOp::Unlock && start == 0 && end >= i64::MAX as u64 {
                self.forget_owner(ino, owner);
            }
            match reply.conflict {
                None => {
                    drop(in_flight);
                    return Ok(());
                }
                Some(c) if !wait => {
                    return Err(posix(
                        libc::EAGAIN,
                        format!(
                            "bytes {}..={} of inode {ino} are locked by process {} (maybe on another mount)",
                            c.start, c.end, c.pid
                        ),
                    ))
                }
                Some(_) if interrupted() => return Err(posix(libc::EINTR, "interrupted while waiting for a lock")),
                Some(_) => {}
            }
        }
    }

    /// The lock of another owner that would keep `owner` from locking bytes
    /// `start..=end` (`write`: exclusively), if any.
    pub async fn getlk(
        &self,
        ino: Oid,
        owner: u64,
        pid: u32,
        start: u64,
        end: u64,
        write: bool,
    ) -> FsResult<Option<FileLockInfo>> {
        let (obj, dkey) = self.node(ino)?;
        let req = self.lock_req(owner, pid, start, end, FileLockOp::Test { write }, 0);
        match obj.file_lock(dkey, req).await {
            Ok(reply) => Ok(reply.conflict),
            // A restarted server, before its holders reclaimed their locks.
            Err(e) if e.kind() == ErrorKind::Busy => Err(posix(libc::EAGAIN, e.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Releases every lock `owner` holds on `ino` (the kernel asks at each
    /// close for record locks, at the last close for flock). Costs nothing
    /// if this mount never locked `ino` for `owner`. If the server cannot
    /// be reached, the unlock is retried in the background for a lease's
    /// time: the close does not wait, and the lock does not outlive it
    /// by more than that.
    pub async fn unlock_owner(&self, ino: Oid, owner: u64) -> FsResult<()> {
        let r = self.setlk(ino, owner, 0, 0, u64::MAX, LockKind::Unlock, false, || false).await;
        if let Err(FsError::Store(e)) = &r {
            tracing::warn!(%ino, error = %e, "could not release file locks at close; trying again in the background");
            let fs = self.clone();
            tokio::spawn(async move {
                let give_up = tokio::time::Instant::now() + FILE_LOCK_LEASE;
                while tokio::time::Instant::now() < give_up {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if fs.setlk(ino, owner, 0, 0, u64::MAX, LockKind::Unlock, false, || false).await.is_ok() {
                        return;
                    }
                }
                // Stop renewing for it; the server lets it lapse (unless
                // this mount keeps other locks there), and a restart of the
                // server does not bring it back.
                if let Some(h) = fs.inner.held_locks.lock().expect("held locks").get_mut(&ino) {
                    h.apply(owner, 0, u64::MAX, None);
                }
                fs.forget_owner(ino, owner);
            });
            return Ok(());
        }
        r
    }

    fn may_hold(&self, ino: Oid, owner: u64) -> bool {
        self.inner.file_locks.lock().expect("file locks").get(&ino).is_some_and(|o| o.contains_key(&owner))
    }

    /// Forgets `owner` on `ino` after it released everything, unless a
    /// lock request of it is still in flight (the server may grant it
    /// after the unlock).
    fn forget_owner(&self, ino: Oid, owner: u64) {
        let mut held = self.inner.file_locks.lock().expect("file locks");
        if let Some(owners) = held.get_mut(&ino) {
            if owners.get(&owner).is_some_and(|n| *n == 0) {
                owners.remove(&owner);
            }
            if owners.is_empty() {
                held.remove(&ino);
            }
        }
    }

    /// Takes again, with reclaims, every range this mount's owners hold on
    /// `ino` (the caller holds the gate exclusively). A range the server
    /// refuses (another holds it, or its grace period is over) is reported
    /// lost and forgotten; one that fails otherwise stays, for the next
    /// renewal to try again.
    async fn reclaim_locks(&self, ino: Oid, obj: &crate::Object, dkey: &[u8]) {
        let ranges: Vec<(u64, Held)> = {
            let held = self.inner.held_locks.lock().expect("held locks");
            held.get(&ino)
                .map(|h| h.owners.iter().flat_map(|(o, v)| v.iter().map(|x| (*o, *x))).collect())
                .unwrap_or_default()
        };
        tracing::warn!(%ino, ranges = ranges.len(), "the server keeping this mount's file locks lost them (restarted?); reclaiming");
        let outcomes: Vec<_> = stream::iter(ranges)
            .map(|(owner, h)| async move {
                let req = self.lock_req(owner, h.pid, h.start, h.end, FileLockOp::Reclaim { write: h.write }, 0);
                (owner, h, obj.file_lock(dkey, req).await)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut held = self.inner.held_locks.lock().expect("held locks");
        let Some(entry) = held.get_mut(&ino) else { return };
        for (owner, h, r) in outcomes {
            let lost = match r {
                Ok(r) => r.conflict.map(|c| format!("process {} holds bytes {}..={}", c.pid, c.start, c.end)),
                Err(e) if e.kind() == ErrorKind::InvalidArgument => Some(e.to_string()),
                Err(e) => {
                    tracing::warn!(%ino, error = %e, "reclaiming a file lock failed; trying again at the next renewal");
                    None
                }
            };
            if let Some(why) = lost {
                tracing::error!(%ino, owner, pid = h.pid, start = h.start, end = h.end, "a file lock was lost: {why}");
                entry.apply(owner, h.start, h.end, None);
            } else {
                entry.renewed = Some(tokio::time::Instant::now());
            }
        }
    }

    /// Renews the lease of inode `ino`'s locks at its server; if the server
    /// holds fewer of them than this mount was granted (it restarted), takes
    /// them again, unless the lease ran out meanwhile (then another mount
    /// may have had them: they are lost).
    async fn renew_one(&self, ino: Oid) {
        let Ok((obj, dkey)) = self.node(ino) else { return };
        let gate = Gate::of(self, ino);
        let _only = gate.gate.write().await;
        let req = self.lock_req(0, 0, 0, 0, FileLockOp::Renew, 0);
        let reply = match obj.file_lock(dkey, req).await {
            Ok(r) => r,
            Err(e) => return tracing::warn!(%ino, error = %e, "could not renew the file locks of this mount"),
        };
        let now = tokio::time::Instant::now();
        let (ranges, renewed) = {
            let mut held = self.inner.held_locks.lock().expect("held locks");
            let h = held.entry(ino).or_default();
            let r = (h.ranges(), h.renewed);
            if reply.held >= r.0 {
                h.renewed = Some(now);
            }
            r
        };
        if reply.held >= ranges {
            return;
        }
        if renewed.is_none_or(|t| now.duration_since(t) >= FILE_LOCK_LEASE) {
            tracing::error!(%ino, "file locks of this mount were lost: its lease ran out before the server was reached again");
            if let Some(h) = self.inner.held_locks.lock().expect("held locks").get_mut(&ino) {
                h.owners.clear();
            }
            return;
        }
        self.reclaim_locks(ino, &obj, dkey).await;
    }

    /// Renews this mount's lease at every server that keeps a lock of it.
    /// Each renewal is bounded, so one slow server never holds up the
    /// renewals at the others.
    pub(super) async fn renew_file_locks(&self) {
        let inodes: Vec<Oid> = self.inner.file_locks.lock().expect("file locks").keys().copied().collect();
        stream::iter(inodes)
            .for_each_concurrent(64, |ino| async move {
                if tokio::time::timeout(FILE_LOCK_LEASE / 3, self.renew_one(ino)).await.is_err() {
                    tracing::warn!(%ino, "renewing the file locks of this mount timed out");
                }
            })
            .await;
    }
}
