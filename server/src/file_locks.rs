//! File locks: POSIX record locks (fcntl) and whole-file locks (flock) of
//! the POSIX namespace, kept by a server so that they hold across every
//! mount of a container.
//!
//! A lock belongs to an owner (the kernel's lock owner: a process for
//! fcntl, an open file for flock) within a session (one mount). Ranges are
//! inclusive and follow POSIX: an owner's locks never conflict with each
//! other, a new lock replaces what the owner held in its range (a read lock
//! becomes a write lock in place), and an unlock of the middle of a range
//! splits it. A session's locks lapse together when it stops renewing its
//! lease, so a crashed mount cannot hold a file for ever.
//!
//! The table is in memory, like the stripe locks. A server that restarts
//! (its store held data) first keeps a grace period of [`FILE_LOCK_GRACE`]:
//! new locks are refused as busy, and the sessions that held locks, which
//! find their locks gone when they renew, take them again with
//! [`FileLockOp::Reclaim`] (as NFS servers do after a reboot).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use shoal_common::msg::{FileLockInfo, FileLockOp, FileLockReply, FileLockReq};
use shoal_common::{ContId, Oid, Result, ShoalError};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Most lock ranges one server keeps; beyond it requests for new locks are
/// refused as busy, so the table's memory is bounded whatever clients do.
pub const MAX_FILE_LOCKS: usize = 1 << 16;
/// How long a restarted server takes only reclaims: the clients' lease
/// (30 s), within which each renews at least twice.
pub const FILE_LOCK_GRACE: Duration = Duration::from_secs(30);
/// Drop the leases of lapsed sessions once this many are known.
const PRUNE_SESSIONS_AT: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Range {
    session: u128,
    owner: u64,
    start: u64,
    end: u64,
    write: bool,
    pid: u32,
}

impl Range {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    fn info(&self) -> FileLockInfo {
        FileLockInfo { start: self.start, end: self.end, write: self.write, pid: self.pid }
    }
}

#[derive(Default)]
struct Table {
    /// When each session's lease lapses.
    sessions: HashMap<u128, Instant>,
    files: HashMap<(ContId, Oid), Vec<Range>>,
    ranges: usize,
    /// Prune lapsed sessions when this many are known.
    prune_sessions_at: usize,
}

impl Table {
    /// Forgets the locks of lapsed sessions, on one file or on all.
    fn prune(&mut self, key: Option<(ContId, Oid)>, now: Instant) {
        let sessions = std::mem::take(&mut self.sessions);
        let live = |r: &Range| sessions.get(&r.session).is_some_and(|u| *u > now);
        match key {
            Some(k) => {
                if let Some(v) = self.files.get_mut(&k) {
                    let before = v.len();
                    v.retain(live);
                    self.ranges -= before - v.len();
                    if v.is_empty() {
                        self.files.remove(&k);
                    }
                }
            }
            None => {
                self.files.retain(|_, v| {
                    v.retain(live);
                    !v.is_empty()
                });
                self.ranges = self.files.values().map(Vec::len).sum();
            }
        }
        self.sessions = sessions;
    }

    /// The first lock of another owner that a lock on the range would
    /// conflict with.
    fn conflict(&self, key: (ContId, Oid), r: &FileLockReq, write: bool) -> Option<Range> {
        self.files
            .get(&key)?
            .iter()
            .copied()
            .find(|x| (x.session, x.owner) != (r.session, r.owner) && x.overlaps(r.start, r.end) && (write || x.write))
    }

    /// Removes what the owner holds in the range, keeping the parts of its
    /// locks outside it.
    fn carve(&mut self, key: (ContId, Oid), r: &FileLockReq) {
        let Some(v) = self.files.get_mut(&key) else { return };
        let before = v.len();
        let mut kept = Vec::with_capacity(v.len());
        for x in v.drain(..) {
            if (x.session, x.owner) != (r.session, r.owner) || !x.overlaps(r.start, r.end) {
                kept.push(x);
                continue;
            }
            if x.start < r.start {
                kept.push(Range { end: r.start - 1, ..x });
            }
            if x.end > r.end {
                kept.push(Range { start: r.end + 1, ..x });
            }
        }
        *v = kept;
        self.ranges = self.ranges + v.len() - before;
    }

    fn held(&self, key: (ContId, Oid), session: u128) -> u32 {
        self.files.get(&key).map_or(0, |v| v.iter().filter(|x| x.session == session).count() as u32)
    }
}

/// What one attempt at a request came to.
enum Attempt {
    Done(FileLockReply),
    /// Refused for now; the conflicting lock's session lease lapses at the
    /// instant given.
    Conflict(FileLockInfo, Instant),
}

/// The file-lock table of one server.
#[derive(Default)]
pub struct FileLocks {
    table: Mutex<Table>,
    changed: Notify,
    /// Until when only reclaims are granted (after a restart).
    grace_until: Option<Instant>,
}

impl FileLocks {
    /// A table that takes only reclaims for `grace` (a restarted server's).
    pub fn with_grace(grace: Duration) -> FileLocks {
        FileLocks { grace_until: Some(Instant::now() + grace), ..FileLocks::default() }
    }

    /// Carries out `r`, waiting up to its `wait_ms` while a conflicting
    /// lock is held.
    ///
    /// Cancel safe: a dropped call takes nothing.
    pub async fn apply(&self, r: &FileLockReq) -> Result<FileLockReply> {
        let give_up = Instant::now() + Duration::from_millis(r.wait_ms as u64);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (info, lapses) = match self.attempt(r)? {
                Attempt::Done(reply) => return Ok(reply),
                Attempt::Conflict(info, lapses) => (info, lapses),
            };
            if Instant::now() >= give_up {
                let held = self.table.lock().expect("file lock table").held((r.cont, r.oid), r.session);
                return Ok(FileLockReply { conflict: Some(info), held });
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(lapses.min(give_up)) => {}
            }
        }
    }

    fn attempt(&self, r: &FileLockReq) -> Result<Attempt> {
        let key = (r.cont, r.oid);
        let now = Instant::now();
        let mut t = self.table.lock().expect("file lock table");
        if t.sessions.len() >= t.prune_sessions_at.max(PRUNE_SESSIONS_AT) {
            t.sessions.retain(|_, until| *until > now);
            t.prune_sessions_at = 2 * t.sessions.len();
        }
        // Every request renews its session: a holder that asks is alive. A
        // test or renewal of a session that holds nothing starts none.
        let lease = now + Duration::from_millis(r.lease_ms as u64);
        match r.op {
            FileLockOp::Renew | FileLockOp::Test { .. } => {
                if let Some(until) = t.sessions.get_mut(&r.session) {
                    *until = lease;
                }
            }
            _ => {
                t.sessions.insert(r.session, lease);
            }
        }
        t.prune(Some(key), now);
        let in_grace = self.grace_until.is_some_and(|g| now < g);
        let write = match r.op {
            // A test would not see the locks not reclaimed yet.
            FileLockOp::Read | FileLockOp::Write | FileLockOp::Test { .. } if in_grace => {
                let left = self.grace_until.map_or(0, |g| g.saturating_duration_since(now).as_secs() + 1);
                return Err(ShoalError::Busy(format!(
                    "this server restarted and gives its lock holders {left} s more to reclaim their locks; try again"
                )));
            }
            FileLockOp::Reclaim { .. } if !in_grace => {
                return Err(ShoalError::invalid(
                    "too late to reclaim a lock: the server's grace period after its restart is over",
                ));
            }
            FileLockOp::Reclaim { write } => write,
            op => op == FileLockOp::Write,
        };
        let conflict = match r.op {
            FileLockOp::Renew => None,
            FileLockOp::Test { write } => {
                let c = t.conflict(key, r, write).map(|x| x.info());
                let held = t.held(key, r.session);
                return Ok(Attempt::Done(FileLockReply { conflict: c, held }));
            }
            FileLockOp::Unlock => {
                // An unlock inside a lock splits it in two: that one range
                // more must fit too.
                let splits = t.files.get(&key).is_some_and(|v| {
                    v.iter().any(|x| (x.session, x.owner) == (r.session, r.owner) && x.start < r.start && x.end > r.end)
                });
                if splits && t.ranges >= MAX_FILE_LOCKS {
                    t.prune(None, now);
                    if t.ranges >= MAX_FILE_LOCKS {
                        return Err(ShoalError::Busy(format!(
                            "this server holds {MAX_FILE_LOCKS} file locks already; unlock whole locks or try again"
                        )));
                    }
                }
                t.carve(key, r);
                if t.files.get(&key).is_some_and(Vec::is_empty) {
                    t.files.remove(&key);
                }
                None
            }
            FileLockOp::Read | FileLockOp::Write | FileLockOp::Reclaim { .. } => {
                if let Some(x) = t.conflict(key, r, write) {
                    let lapses = t.sessions.get(&x.session).copied().unwrap_or(now);
                    return Ok(Attempt::Conflict(x.info(), lapses));
                }
                if t.ranges + 2 > MAX_FILE_LOCKS {
                    t.prune(None, now);
                    if t.ranges + 2 > MAX_FILE_LOCKS {
                        return Err(ShoalError::Busy(format!(
                            "this server holds {MAX_FILE_LOCKS} file locks already; try again"
                        )));
                    }
                }
                t.carve(key, r);
                let new = Range { session: r.session, owner: r.owner, start: r.start, end: r.end, write, pid: r.pid };
                t.files.entry(key).or_default().push(new);
                t.ranges += 1;
                None
            }
        };
        debug_assert!(conflict.is_none());
        let held = t.held(key, r.session);
        drop(t);
        if matches!(r.op, FileLockOp::Unlock | FileLockOp::Read) {
            // An unlock, or a write lock turned into a read lock, may let
            // a waiter in.
            self.changed.notify_waiters();
        }
        Ok(Attempt::Done(FileLockReply { conflict, held }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const LEASE: u32 = 30_000;

    fn req(session: u128, owner: u64, start: u64, end: u64, op: FileLockOp) -> FileLockReq {
        FileLockReq {
            pool: shoal_common::PoolId(1),
            rank: 0,
            cont: ContId(1),
            oid: Oid::new(0, 7),
            session,
            owner,
            pid: owner as u32,
            start,
            end,
            op,
            lease_ms: LEASE,
            wait_ms: 0,
        }
    }

    async fn granted(t: &FileLocks, r: FileLockReq) -> bool {
        t.apply(&r).await.unwrap().conflict.is_none()
    }

    #[tokio::test(start_paused = true)]
    async fn readers_share_and_writers_exclude() {
        let t = FileLocks::default();
        assert!(granted(&t, req(1, 1, 0, 99, FileLockOp::Read)).await);
        assert!(granted(&t, req(2, 1, 50, 149, FileLockOp::Read)).await, "two mounts read-lock together");
        let r = t.apply(&req(2, 2, 90, 90, FileLockOp::Write)).await.unwrap();
        let c = r.conflict.expect("a read lock of another owner blocks a write lock");
        assert!(!c.write && c.start <= 90 && 90 <= c.end);
        // Outside every lock, anyone may write-lock.
        assert!(granted(&t, req(3, 9, 150, u64::MAX, FileLockOp::Write)).await);
        assert!(!granted(&t, req(1, 1, 200, 200, FileLockOp::Read)).await);
        // The same owner turns its read lock into a write lock where no one
        // else reads.
        assert!(granted(&t, req(1, 1, 0, 49, FileLockOp::Write)).await);
        let test = t.apply(&req(2, 5, 0, 10, FileLockOp::Test { write: false })).await.unwrap();
        assert_eq!(test.conflict.map(|c| (c.start, c.end, c.write, c.pid)), Some((0, 49, true, 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn unlocking_the_middle_splits_a_lock() {
        let t = FileLocks::default();
        assert!(granted(&t, req(1, 1, 0, 99, FileLockOp::Write)).await);
        let r = t.apply(&req(1, 1, 40, 59, FileLockOp::Unlock)).await.unwrap();
        assert_eq!(r.held, 2, "0..=39 and 60..=99 are still held");
        assert!(granted(&t, req(2, 1, 40, 59, FileLockOp::Write)).await);
        assert!(!granted(&t, req(2, 1, 39, 40, FileLockOp::Write)).await);
        assert!(!granted(&t, req(2, 1, 59, 60, FileLockOp::Read)).await);
        let r = t.apply(&req(1, 1, 0, u64::MAX, FileLockOp::Unlock)).await.unwrap();
        assert_eq!(r.held, 0);
        assert!(granted(&t, req(2, 1, 0, u64::MAX, FileLockOp::Write)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_lock_when_it_is_released() {
        let t = Arc::new(FileLocks::default());
        assert!(granted(&t, req(1, 1, 0, u64::MAX, FileLockOp::Write)).await);
        let t2 = t.clone();
        let waiter = tokio::spawn(async move {
            let mut r = req(2, 1, 0, 0, FileLockOp::Write);
            r.wait_ms = 5_000;
            t2.apply(&r).await.unwrap()
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        t.apply(&req(1, 1, 0, u64::MAX, FileLockOp::Unlock)).await.unwrap();
        let r = waiter.await.unwrap();
        assert!(r.conflict.is_none());
        assert_eq!(r.held, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded_and_a_lapsed_session_frees_its_locks() {
        let t = FileLocks::default();
        assert!(granted(&t, req(1, 1, 0, u64::MAX, FileLockOp::Write)).await);
        let mut r = req(2, 1, 0, 0, FileLockOp::Write);
        r.wait_ms = 2_000;
        let started = Instant::now();
        assert!(t.apply(&r).await.unwrap().conflict.is_some());
        assert!(started.elapsed() >= Duration::from_secs(2));
        // Session 1 renews; its lock stays.
        tokio::time::sleep(Duration::from_secs(20)).await;
        t.apply(&req(1, 0, 0, 0, FileLockOp::Renew)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!granted(&t, req(2, 1, 0, 0, FileLockOp::Write)).await);
        // Then stops: after its lease the lock is gone.
        tokio::time::sleep(Duration::from_millis(LEASE as u64 + 1)).await;
        assert!(granted(&t, req(2, 1, 0, 0, FileLockOp::Write)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_server_takes_only_reclaims_during_its_grace() {
        let t = FileLocks::with_grace(Duration::from_secs(30));
        let r = t.apply(&req(2, 1, 0, 0, FileLockOp::Write)).await;
        assert!(matches!(r, Err(ShoalError::Busy(_))), "a new lock during the grace period: {r:?}");
        assert!(matches!(t.apply(&req(2, 1, 0, 0, FileLockOp::Read)).await, Err(ShoalError::Busy(_))));
        // The holder takes its lock again; another's reclaim of an
        // overlapping exclusive lock conflicts.
        assert!(granted(&t, req(1, 1, 0, 99, FileLockOp::Reclaim { write: true })).await);
        assert!(!granted(&t, req(3, 1, 50, 50, FileLockOp::Reclaim { write: false })).await);
        assert!(granted(&t, req(3, 1, 100, 100, FileLockOp::Reclaim { write: false })).await);
        // Tests wait for the grace to end; unlocks and renewals work.
        assert!(matches!(
            t.apply(&req(2, 1, 0, 10, FileLockOp::Test { write: false })).await,
            Err(ShoalError::Busy(_))
        ));
        tokio::time::sleep(Duration::from_secs(20)).await;
        t.apply(&req(1, 0, 0, 0, FileLockOp::Renew)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(11)).await;
        // After the grace: no more reclaims, and new locks meet the
        // reclaimed ones.
        let r = t.apply(&req(3, 2, 200, 200, FileLockOp::Reclaim { write: true })).await;
        assert!(matches!(r, Err(ShoalError::InvalidArgument(_))), "{r:?}");
        assert!(!granted(&t, req(2, 1, 0, 0, FileLockOp::Write)).await);
        assert!(granted(&t, req(2, 1, 150, 150, FileLockOp::Write)).await);
        let test = t.apply(&req(2, 1, 0, 10, FileLockOp::Test { write: false })).await.unwrap();
        assert_eq!(test.conflict.map(|c| c.pid), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded() {
        let t = FileLocks::default();
        // Spread over files (one file's locks are scanned in a line).
        for i in 0..MAX_FILE_LOCKS as u64 - 1 {
            let mut r = req(1, 1, 0, 0, FileLockOp::Read);
            if i > 0 {
                r.oid = Oid::new(1, i);
            }
            assert!(granted(&t, r).await);
        }
        let r = t.apply(&req(1, 1, u64::MAX, u64::MAX, FileLockOp::Read)).await;
        assert!(matches!(r, Err(ShoalError::Busy(_))), "{r:?}");
        // Unlocking is always possible and makes room.
        t.apply(&req(1, 1, 0, 10, FileLockOp::Unlock)).await.unwrap();
        assert!(granted(&t, req(1, 1, u64::MAX, u64::MAX, FileLockOp::Read)).await);
    }
}
