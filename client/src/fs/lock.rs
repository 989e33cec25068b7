//! POSIX record locks (fcntl) and whole-file locks (flock), kept by the
//! servers so that they hold across every mount of a container.
//!
//! Each inode's locks live at the server that keeps its stripe locks (see
//! [`Object::file_lock`]). The mount is the lock session: it renews its
//! lease at every server it holds locks at, a third of [`FILE_LOCK_LEASE`]
//! apart, so the locks of a crashed mount lapse after the lease. A blocking
//! lock is a series of bounded waits at the server, so a caller that is
//! interrupted stops waiting.

use futures::stream::{self, StreamExt};
use shoal_common::msg::{FileLockInfo, FileLockOp, FileLockReq, ANY_RANK};
use shoal_common::{ContId, Oid, PoolId};

use super::{posix, Fs, FsResult};

/// Lease of a mount's file locks at the servers.
pub const FILE_LOCK_LEASE: std::time::Duration = std::time::Duration::from_secs(30);
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
    /// with `wait`, waits until it goes, or fails with EINTR once
    /// `interrupted()` says the caller gave up; without, fails with EAGAIN.
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
        if op == FileLockOp::Unlock && !self.may_hold(ino, owner) {
            return Ok(());
        }
        if op != FileLockOp::Unlock {
            // Before the request, so a lock granted while this call is
            // cancelled is still renewed (and released at close).
            self.inner.file_locks.lock().expect("file locks").entry(ino).or_default().insert(owner);
        }
        loop {
            let req = self.lock_req(owner, pid, start, end, op, if wait { WAIT_MS } else { 0 });
            let reply = obj.file_lock(dkey, req).await?;
            // The kernel's whole file ends at i64::MAX.
            if op == FileLockOp::Unlock && start == 0 && end >= i64::MAX as u64 {
                self.forget_owner(ino, owner);
            }
            match reply.conflict {
                None => return Ok(()),
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
        let reply = obj.file_lock(dkey, self.lock_req(owner, pid, start, end, FileLockOp::Test { write }, 0)).await?;
        Ok(reply.conflict)
    }

    /// Releases every lock `owner` holds on `ino` (the kernel asks at each
    /// close for record locks, at the last close for flock). Costs nothing
    /// if this mount never locked `ino` for `owner`.
    pub async fn unlock_owner(&self, ino: Oid, owner: u64) -> FsResult<()> {
        self.setlk(ino, owner, 0, 0, u64::MAX, LockKind::Unlock, false, || false).await
    }

    fn may_hold(&self, ino: Oid, owner: u64) -> bool {
        self.inner.file_locks.lock().expect("file locks").get(&ino).is_some_and(|o| o.contains(&owner))
    }

    fn forget_owner(&self, ino: Oid, owner: u64) {
        let mut held = self.inner.file_locks.lock().expect("file locks");
        if let Some(owners) = held.get_mut(&ino) {
            owners.remove(&owner);
            if owners.is_empty() {
                held.remove(&ino);
            }
        }
    }

    /// Renews this mount's lease at every server that keeps a lock of it.
    pub(super) async fn renew_file_locks(&self) {
        let inodes: Vec<Oid> = self.inner.file_locks.lock().expect("file locks").keys().copied().collect();
        stream::iter(inodes)
            .for_each_concurrent(16, |ino| async move {
                let Ok((obj, dkey)) = self.node(ino) else { return };
                let req = self.lock_req(0, 0, 0, 0, FileLockOp::Renew, 0);
                match obj.file_lock(dkey, req).await {
                    Ok(r) if r.held == 0 => {
                        tracing::debug!(%ino, "no lock of this mount is left on the file (released, lapsed, or lost with a server restart)")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(%ino, error = %e, "could not renew the file locks of this mount"),
                }
            })
            .await;
    }
}
