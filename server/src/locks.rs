//! Stripe locks: they serialise read-modify-writes of one EC stripe.
//!
//! A client that writes part of a stripe must read the stripe, merge and
//! rewrite it whole; two such writers racing would each rewrite the stripe
//! from the version they read, and one would lose the other's bytes. The
//! server of the group's first shard therefore hands out locks on stripes
//! (per container, object, dkey and stripe number). Locks are all-or-none
//! per request, so two writers never deadlock, and they lapse after a lease
//! so a dead client cannot block a stripe for ever. Full-stripe writes take
//! no lock.
//!
//! The table is in memory: after a server restart every lock is free, which
//! is safe because the writers that held them see their requests fail.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use shoal_common::{ContId, Oid, Result, ShoalError};
use tokio::sync::Notify;
use tokio::time::Instant;

type Key = (ContId, Oid, Vec<u8>, u64);

/// Prune lapsed locks once the table holds this many.
const PRUNE_AT: usize = 4096;
/// Most stripes locked at once; beyond it lock requests are refused as
/// busy, so the table's memory is bounded whatever clients do.
pub const MAX_LOCKED: usize = 1 << 16;

/// The lock table of one server.
#[derive(Default)]
pub struct StripeLocks {
    held: Mutex<HashMap<Key, (u128, Instant)>>,
    released: Notify,
}

impl StripeLocks {
    /// Takes every stripe in `stripes` for `owner` for `lease`, waiting up
    /// to `wait` while others hold any of them. Re-taking a stripe one
    /// already holds renews it.
    ///
    /// Cancel safe: a dropped call takes nothing.
    #[allow(clippy::too_many_arguments)]
    pub async fn lock(
        &self,
        cont: ContId,
        oid: Oid,
        dkey: &[u8],
        stripes: &[u64],
        owner: u128,
        lease: Duration,
        wait: Duration,
    ) -> Result<()> {
        let give_up = Instant::now() + wait;
        let key = |s: u64| (cont, oid, dkey.to_vec(), s);
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let soonest = {
                let mut held = self.held.lock().expect("lock table");
                let now = Instant::now();
                if held.len() >= PRUNE_AT {
                    held.retain(|_, (_, until)| *until > now);
                }
                let busy: Vec<Instant> = stripes
                    .iter()
                    .filter_map(|s| {
                        held.get(&key(*s)).filter(|(o, until)| *o != owner && *until > now).map(|(_, u)| *u)
                    })
                    .collect();
                if busy.is_empty() {
                    if held.len() + stripes.len() > MAX_LOCKED {
                        return Err(ShoalError::Busy(format!(
                            "this server holds {MAX_LOCKED} stripe locks already; try again"
                        )));
                    }
                    for s in stripes {
                        held.insert(key(*s), (owner, now + lease));
                    }
                    return Ok(());
                }
                busy.into_iter().min().expect("not empty")
            };
            if Instant::now() >= give_up {
                return Err(ShoalError::Busy(format!(
                    "stripes of object {oid} stayed locked by another writer for {wait:?}"
                )));
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(soonest.min(give_up)) => {}
            }
        }
    }

    /// Releases the stripes `owner` holds among `stripes`.
    pub fn unlock(&self, cont: ContId, oid: Oid, dkey: &[u8], stripes: &[u64], owner: u128) {
        let mut held = self.held.lock().expect("lock table");
        for s in stripes {
            let k = (cont, oid, dkey.to_vec(), *s);
            if held.get(&k).is_some_and(|(o, _)| *o == owner) {
                held.remove(&k);
            }
        }
        drop(held);
        self.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const C: ContId = ContId(1);
    const O: Oid = Oid::new(0, 1);
    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_second_owner_waits_until_the_first_unlocks() {
        let t = Arc::new(StripeLocks::default());
        t.lock(C, O, b"d", &[1, 2], 1, LONG, LONG).await.unwrap();
        let t2 = t.clone();
        let waiter = tokio::spawn(async move { t2.lock(C, O, b"d", &[2, 3], 2, LONG, LONG).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "stripe 2 is held");
        // Other stripes and other dkeys are free.
        t.lock(C, O, b"d", &[4], 3, LONG, LONG).await.unwrap();
        t.lock(C, O, b"e", &[2], 3, LONG, LONG).await.unwrap();
        t.unlock(C, O, b"d", &[1, 2], 1);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded() {
        let t = StripeLocks::default();
        let stripes: Vec<u64> = (0..64).collect();
        for i in 0..(MAX_LOCKED / 64) as u128 {
            t.lock(C, Oid::new(0, i as u64), b"d", &stripes, i, LONG, LONG).await.unwrap();
        }
        let r = t.lock(C, O, b"x", &[1], 9, LONG, LONG).await;
        assert!(matches!(r, Err(ShoalError::Busy(_))), "{r:?}");
        // Lapsed leases make room again.
        tokio::time::sleep(LONG * 2).await;
        t.lock(C, O, b"x", &[1], 9, LONG, LONG).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapsed_lease_frees_the_stripe_and_waiting_is_bounded() {
        let t = StripeLocks::default();
        t.lock(C, O, b"d", &[1], 1, Duration::from_secs(5), LONG).await.unwrap();
        let r = t.lock(C, O, b"d", &[1], 2, LONG, Duration::from_secs(1)).await;
        assert!(matches!(r, Err(ShoalError::Busy(_))), "{r:?}");
        // After the first lease lapses the second owner gets it.
        t.lock(C, O, b"d", &[1], 2, LONG, LONG).await.unwrap();
        // Unlocking someone else's stripe does nothing.
        t.unlock(C, O, b"d", &[1], 1);
        let r = t.lock(C, O, b"d", &[1], 3, LONG, Duration::from_secs(1)).await;
        assert!(r.is_err());
    }
}
