//! Hybrid logical clock: every update is stamped with an [`Epoch`] from it.
//!
//! An epoch is 64 bits: wall-clock nanoseconds since the Unix epoch with the
//! low [`LOGICAL_BITS`] bits replaced by a logical counter and, below it, a
//! [`TAG_BITS`]-bit tag naming the clock (so physical time has a resolution
//! of ~262 us and lasts until the year 2554). Invariants:
//!
//! - Epochs from one clock strictly increase.
//! - A clock that observes a remote epoch never issues a smaller one
//!   afterwards.
//! - Two clocks with different tags never issue the same epoch, so two
//!   writers never collide on one version of a value. Clients get their tag
//!   from the management service, which hands out the 4095 non-zero tags in
//!   turn, so the clients alive at one time do not share one.
//! - A busy clock never runs ahead of time: within one physical tick of
//!   its wall clock it issues at most `2^(LOGICAL_BITS - TAG_BITS)` (64)
//!   epochs, and at most one tick's worth past the newest epoch it
//!   observed; [`Hlc::try_now`] answers `None` rather than borrowing from
//!   the future, and the caller waits (only beyond 244,000 epochs a
//!   second).
//!
//! The clock takes physical time as an argument (or a function that reads
//! it), so it is pure and testable; callers pass the wall clock.

use std::sync::atomic::{AtomicU64, Ordering};

/// An HLC timestamp. Larger is newer. `0` is "before everything".
pub type Epoch = u64;

/// The newest possible epoch: a read at `EPOCH_MAX` sees the latest data.
pub const EPOCH_MAX: Epoch = u64::MAX;

/// Bits of an epoch used by the logical counter and the tag.
pub const LOGICAL_BITS: u32 = 18;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// Low bits of an epoch that name the clock that issued it.
pub const TAG_BITS: u32 = 12;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
/// One logical step.
const STEP: u64 = 1 << TAG_BITS;

/// A thread-safe hybrid logical clock.
#[derive(Debug, Default)]
pub struct Hlc {
    /// The last epoch issued or observed.
    last: AtomicU64,
    /// The newest remote epoch observed (tag bits cleared).
    observed: AtomicU64,
    tag: AtomicU64,
}

impl Hlc {
    /// A clock with tag 0 that has issued nothing yet (servers use tag 0).
    pub const fn new() -> Self {
        Hlc { last: AtomicU64::new(0), observed: AtomicU64::new(0), tag: AtomicU64::new(0) }
    }

    /// A clock whose epochs carry `tag` (its low [`TAG_BITS`] bits) in their
    /// low bits.
    pub const fn with_tag(tag: u64) -> Self {
        Hlc { last: AtomicU64::new(0), observed: AtomicU64::new(0), tag: AtomicU64::new(tag & TAG_MASK) }
    }

    /// Changes the tag of later epochs (a client learns its tag from the
    /// management service after the clock exists).
    pub fn set_tag(&self, tag: u64) {
        self.tag.store(tag & TAG_MASK, Ordering::Release);
    }

    /// The clock's tag.
    pub fn tag(&self) -> u64 {
        self.tag.load(Ordering::Acquire)
    }

    /// Issues a new epoch if one is available without running ahead of
    /// time: strictly greater than every epoch this clock has issued or
    /// observed, not below the physical time `now_ns`, within the physical
    /// tick of `now_ns` or at most one tick past the newest observed epoch.
    /// `None` means: wait for the next tick or a newer observation.
    pub fn try_now(&self, now_ns: u64) -> Option<Epoch> {
        let physical = now_ns & !LOGICAL_MASK;
        let tag = self.tag();
        let observed = self.observed.load(Ordering::Acquire) & !LOGICAL_MASK;
        let horizon = if observed >= physical { observed + (2 << LOGICAL_BITS) - 1 } else { physical + LOGICAL_MASK };
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let base = prev & !TAG_MASK;
            let next = if physical > base { physical } else { base + STEP } | tag;
            if next > horizon {
                return None;
            }
            match self.last.compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(next),
                Err(actual) => prev = actual,
            }
        }
    }

    /// Issues a new epoch at physical time `now_ns`. Never blocks: if the
    /// tick's logical counter is used up it issues the next epoch anyway
    /// (servers, whose epochs only order their replies, use this).
    pub fn now(&self, now_ns: u64) -> Epoch {
        if let Some(e) = self.try_now(now_ns) {
            return e;
        }
        let tag = self.tag();
        let prev = self.last.fetch_add(STEP, Ordering::AcqRel);
        ((prev & !TAG_MASK) + STEP) | tag
    }

    /// Takes a remote epoch into account, so later [`Hlc::now`] calls issue
    /// larger epochs.
    pub fn observe(&self, remote: Epoch) {
        if remote == EPOCH_MAX {
            return;
        }
        self.observed.fetch_max(remote & !TAG_MASK, Ordering::AcqRel);
        self.last.fetch_max(remote, Ordering::AcqRel);
    }

    /// The last epoch issued or observed.
    pub fn last(&self) -> Epoch {
        self.last.load(Ordering::Acquire)
    }
}

/// The wall clock: nanoseconds since the Unix epoch (0 if the clock is
/// set before 1970).
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// How far this host's clock is off a remote one, judged from one round
/// trip: the remote read its clock (`remote_ns`) somewhere between this
/// host's `sent_ns` and `got_ns`, so only what lies outside that window
/// counts. `None` when the remote reading falls inside it; else the least
/// offset and whether this clock is "behind" or "ahead of" the remote's.
pub fn clock_off(sent_ns: u64, got_ns: u64, remote_ns: u64) -> Option<(std::time::Duration, &'static str)> {
    let (lo, hi) = (sent_ns.min(got_ns), sent_ns.max(got_ns));
    if remote_ns > hi {
        Some((std::time::Duration::from_nanos(remote_ns - hi), "behind"))
    } else if remote_ns < lo {
        Some((std::time::Duration::from_nanos(lo - remote_ns), "ahead of"))
    } else {
        None
    }
}

/// Converts an epoch to nanoseconds of wall-clock time (logical bits cleared).
pub fn epoch_to_ns(e: Epoch) -> u64 {
    e & !LOGICAL_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_strictly_increase_even_when_time_stands_still() {
        let c = Hlc::new();
        let a = c.now(1 << 30);
        let b = c.now(1 << 30);
        let d = c.now(5);
        assert!(a < b && b < d);
    }

    #[test]
    fn clocks_with_different_tags_never_issue_the_same_epoch() {
        let a = Hlc::with_tag(1);
        let b = Hlc::with_tag(2);
        let mut seen = std::collections::HashSet::new();
        for t in [1u64 << 30, 1 << 30, 5, (1 << 30) + 7] {
            assert!(seen.insert(a.now(t)));
            assert!(seen.insert(b.now(t)));
        }
        b.observe(a.last());
        assert!(b.now(0) > a.last());
        assert_eq!(a.now(0) & TAG_MASK, 1);
    }

    #[test]
    fn observing_a_future_epoch_moves_the_clock() {
        let c = Hlc::new();
        c.observe(1 << 40);
        assert!(c.now(1 << 20) > 1 << 40);
        assert!(c.try_now(1 << 20).is_some(), "an observed epoch is not running ahead");
    }

    #[test]
    fn a_busy_clock_never_runs_ahead_of_time() {
        let c = Hlc::with_tag(9);
        let t = 7u64 << 30;
        let mut n = 0;
        while let Some(e) = c.try_now(t) {
            assert!(epoch_to_ns(e) <= epoch_to_ns(t), "epoch {e} runs ahead of {t}");
            n += 1;
        }
        assert_eq!(n, 1 << (LOGICAL_BITS - TAG_BITS));
        // The next tick frees the counter again.
        let e = c.try_now(t + (1 << LOGICAL_BITS)).unwrap();
        assert_eq!(epoch_to_ns(e), epoch_to_ns(t + (1 << LOGICAL_BITS)));
        // Past an observed epoch a clock may use one tick's worth, no more.
        let c = Hlc::with_tag(3);
        c.observe(t + (5 << LOGICAL_BITS) + LOGICAL_MASK);
        let mut last = 0;
        while let Some(e) = c.try_now(t) {
            last = e;
        }
        assert!(epoch_to_ns(last) == epoch_to_ns(t + (6 << LOGICAL_BITS)), "{last}");
    }
}
