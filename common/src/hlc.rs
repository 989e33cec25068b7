//! Hybrid logical clock: every update is stamped with an [`Epoch`] from it.
//!
//! An epoch is 64 bits: wall-clock nanoseconds since the Unix epoch with the
//! low [`LOGICAL_BITS`] bits replaced by a logical counter and, below it, a
//! [`TAG_BITS`]-bit tag naming the clock (so physical time has a resolution
//! of ~262 us and lasts until the year 2554). Epochs from one clock strictly
//! increase; a clock that observes a remote epoch never issues a smaller one
//! afterwards; two clocks with different tags never issue the same epoch,
//! so two writers never collide on one version of a value.
//!
//! The clock takes physical time as an argument, so it is pure and testable;
//! callers pass the wall clock.

use std::sync::atomic::{AtomicU64, Ordering};

/// An HLC timestamp. Larger is newer. `0` is "before everything".
pub type Epoch = u64;

/// The newest possible epoch: a read at `EPOCH_MAX` sees the latest data.
pub const EPOCH_MAX: Epoch = u64::MAX;

/// Bits of an epoch used by the logical counter.
pub const LOGICAL_BITS: u32 = 18;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// Low bits of an epoch that name the clock that issued it.
pub const TAG_BITS: u32 = 12;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;

/// A thread-safe hybrid logical clock.
#[derive(Debug, Default)]
pub struct Hlc {
    last: AtomicU64,
    tag: u64,
}

impl Hlc {
    /// A clock with tag 0 that has issued nothing yet.
    pub const fn new() -> Self {
        Hlc { last: AtomicU64::new(0), tag: 0 }
    }

    /// A clock whose epochs carry `tag` (its low [`TAG_BITS`] bits) in their
    /// low bits. Clients give every clock a random tag.
    pub const fn with_tag(tag: u64) -> Self {
        Hlc { last: AtomicU64::new(0), tag: tag & TAG_MASK }
    }

    /// Issues a new epoch, strictly greater than every epoch this clock has
    /// issued or observed, and not below the physical time `now_ns`.
    pub fn now(&self, now_ns: u64) -> Epoch {
        let physical = now_ns & !LOGICAL_MASK;
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let base = prev & !TAG_MASK;
            let next = if physical > base { physical } else { base + (1 << TAG_BITS) } | self.tag;
            match self.last.compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return next,
                Err(actual) => prev = actual,
            }
        }
    }

    /// Takes a remote epoch into account, so later [`Hlc::now`] calls issue
    /// larger epochs.
    pub fn observe(&self, remote: Epoch) {
        self.last.fetch_max(remote, Ordering::AcqRel);
    }

    /// The last epoch issued or observed.
    pub fn last(&self) -> Epoch {
        self.last.load(Ordering::Acquire)
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
    }
}
