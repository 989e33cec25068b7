//! Client-side write gathering for arrays: a bounded write-back buffer
//! that turns unaligned and sub-stripe writes into whole, aligned units.
//!
//! An [`ArrayWriter`] keeps what it is given in memory, merged by offset.
//! As soon as a run of buffered bytes covers whole *units* (a full stripe,
//! k x cell, for erasure-coded arrays; a chunk otherwise) those units are
//! sent at once, in the background, as one aligned array write each run: a
//! stripe the client holds whole never pays for a read-modify-write. What
//! is left (the ragged head and tail of a run) waits for more bytes, for
//! [`ArrayWriter::flush`], [`ArrayWriter::close`], the dirty-byte limit or
//! the age limit ([`WriteBack`]); those flushes write partial stripes with
//! the ordinary read-modify-write.
//!
//! # Guarantees
//!
//! - Every write the buffer sends is an ordinary [`Array::write`]: each
//!   stripe is written whole at one epoch, so a client killed at any
//!   moment leaves every stripe either as it was or as the client last
//!   sent it, never torn.
//! - [`ArrayWriter::flush`] returns once every byte written before it was
//!   called is durable on the servers (and the array's size covers it):
//!   nothing a flush acknowledged is lost when the client dies afterwards.
//!   Bytes not yet flushed may be lost with the client, as with a page
//!   cache.
//! - Reads through the writer see its own writes, flushed or not.
//! - Writes of one range reach the servers in the order they were made: a
//!   unit overlapping an earlier one still in flight waits for it.
//! - A background write that fails keeps its bytes buffered (under any
//!   newer bytes of the same range) and its error is returned by the next
//!   `write`, `flush` or `close`; the next flush tries the bytes again.
//!   `close` after a failed flush gives the error and drops the bytes.
//!
//! Other clients see buffered bytes once they are flushed (close-to-open
//! consistency, as NFS and DAOS dfuse with caching give).
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> shoal_common::Result<()> {
//! # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
//! # let cont = client.pool_connect("tank").await?.cont_open("data").await?;
//! use bytes::Bytes;
//! use shoal_client::writeback::WriteBack;
//!
//! let array = cont.array_create(None, None).await?;
//! let w = array.writer(WriteBack::default());
//! // Unaligned pieces: gathered into whole stripes before they are sent.
//! for i in 0..100u64 {
//!     w.write(4095 + i * 10_000, Bytes::from(vec![i as u8; 10_000])).await?;
//! }
//! assert_eq!(w.read(4095, 10_000).await?, Bytes::from(vec![0u8; 10_000]));
//! w.close().await?; // durable now
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_common::{Result, ShoalError};
use tokio::sync::Notify;

use crate::array::Array;

/// Limits of an [`ArrayWriter`]'s buffer.
#[derive(Clone, Copy, Debug)]
pub struct WriteBack {
    /// Buffered bytes not yet sent; past it everything buffered is sent.
    pub max_dirty: u64,
    /// Bytes buffered longer than this are sent (checked a few times per
    /// period by a background task).
    pub max_age: Duration,
    /// Background writes in flight at once; a write that would start more
    /// waits for one to end.
    pub max_in_flight: usize,
}

impl Default for WriteBack {
    fn default() -> WriteBack {
        WriteBack { max_dirty: 64 << 20, max_age: Duration::from_secs(5), max_in_flight: 8 }
    }
}

/// A write sent to the servers and not yet acknowledged.
struct Flight {
    offset: u64,
    data: Bytes,
}

impl Flight {
    fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.data.len() as u64
    }
}

#[derive(Default)]
struct State {
    /// Buffered bytes by offset: runs that neither overlap nor touch.
    dirty: BTreeMap<u64, Vec<u8>>,
    dirty_bytes: u64,
    /// When the oldest buffered byte was written.
    oldest: Option<Instant>,
    /// Sent writes by sequence number (the order they were made in).
    flights: BTreeMap<u64, Flight>,
    next_flight: u64,
    /// The first error of a background write, not yet reported.
    error: Option<ShoalError>,
    /// The end of the furthest byte written through this writer.
    end: u64,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl State {
    /// Buffers `data` at `offset` over whatever was there; returns the
    /// merged run's start. Appending to a run extends it in place.
    fn insert(&mut self, offset: u64, data: &[u8]) -> u64 {
        let end = offset + data.len() as u64;
        // Runs that overlap or touch [offset, end], in offset order.
        let mut touching: Vec<u64> = self
            .dirty
            .range(..=end)
            .rev()
            .take_while(|(s, v)| **s + v.len() as u64 >= offset)
            .map(|(s, _)| *s)
            .collect();
        touching.reverse();
        if self.dirty.is_empty() {
            self.oldest = Some(Instant::now());
        }
        let start = touching.first().map_or(offset, |s| (*s).min(offset));
        // The run that starts first becomes the merged one (an append then
        // copies nothing old); the others are copied into it.
        let mut run = match touching.first() {
            Some(s) if *s <= offset => self.dirty.remove(s).expect("a listed run"),
            _ => Vec::new(),
        };
        self.dirty_bytes -= run.len() as u64;
        for s in &touching {
            let Some(v) = self.dirty.remove(s) else { continue };
            self.dirty_bytes -= v.len() as u64;
            let at = (s - start) as usize;
            if run.len() < at + v.len() {
                run.resize(at + v.len(), 0);
            }
            run[at..at + v.len()].copy_from_slice(&v);
        }
        let at = (offset - start) as usize;
        if run.len() < at + data.len() {
            run.resize(at + data.len(), 0);
        }
        run[at..at + data.len()].copy_from_slice(data);
        self.dirty_bytes += run.len() as u64;
        self.dirty.insert(start, run);
        self.end = self.end.max(end);
        start
    }

    /// Takes the whole `unit`s out of the run at `start`, leaving its
    /// ragged head and tail buffered.
    fn take_whole_units(&mut self, start: u64, unit: u64) -> Option<(u64, Bytes)> {
        let len = self.dirty.get(&start)?.len() as u64;
        let (a, b) = (start.div_ceil(unit) * unit, (start + len) / unit * unit);
        if b <= a {
            return None;
        }
        let mut run = self.dirty.remove(&start).expect("the run");
        self.dirty_bytes -= len;
        let tail = run.split_off((b - start) as usize);
        if !tail.is_empty() {
            self.dirty_bytes += tail.len() as u64;
            self.dirty.insert(b, tail);
        }
        if a > start {
            let head = run[..(a - start) as usize].to_vec();
            self.dirty_bytes += head.len() as u64;
            self.dirty.insert(start, head);
        }
        if self.dirty.is_empty() {
            self.oldest = None;
        }
        Some((a, Bytes::from(run).slice((a - start) as usize..)))
    }

    /// Takes every buffered run.
    fn take_all(&mut self) -> Vec<(u64, Bytes)> {
        self.dirty_bytes = 0;
        self.oldest = None;
        std::mem::take(&mut self.dirty).into_iter().map(|(s, v)| (s, Bytes::from(v))).collect()
    }

    /// Puts back the bytes of failed flight `id` that nothing newer covers.
    fn put_back(&mut self, id: u64, f: &Flight) {
        let mut newer: Vec<Range<u64>> = self.dirty.iter().map(|(s, v)| *s..s + v.len() as u64).collect();
        newer.extend(self.flights.range(id + 1..).map(|(_, g)| g.range()));
        newer.sort_by_key(|r| r.start);
        let mut at = f.offset;
        let end = f.offset + f.data.len() as u64;
        let mut gaps = Vec::new();
        for r in newer.iter().filter(|r| overlaps(r, &(f.offset..end))) {
            if r.start > at {
                gaps.push(at..r.start);
            }
            at = at.max(r.end);
        }
        if at < end {
            gaps.push(at..end);
        }
        for g in gaps {
            let slice = &f.data[(g.start - f.offset) as usize..(g.end - f.offset) as usize];
            self.insert(g.start, slice);
        }
    }
}

struct Inner {
    array: Array,
    unit: u64,
    cfg: WriteBack,
    state: Mutex<State>,
    /// Signalled whenever a flight ends.
    landed: Notify,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `runs` in the background; returns the last sequence number.
    fn launch(self: &Arc<Self>, st: &mut State, runs: Vec<(u64, Bytes)>) -> u64 {
        for (offset, data) in runs {
            let id = st.next_flight;
            st.next_flight += 1;
            st.flights.insert(id, Flight { offset, data: data.clone() });
            let inner = self.clone();
            tokio::spawn(async move { inner.fly(id, offset, data).await });
        }
        st.next_flight
    }

    async fn fly(self: Arc<Self>, id: u64, offset: u64, data: Bytes) {
        let range = offset..offset + data.len() as u64;
        // Earlier writes of the same bytes land first.
        self.wait_until(|st| !st.flights.range(..id).any(|(_, f)| overlaps(&f.range(), &range))).await;
        let r = self.array.write(offset, data).await;
        {
            let mut st = self.state();
            let f = st.flights.remove(&id).expect("a flight in the table");
            if let Err(e) = r {
                tracing::warn!(oid = %self.array.oid(), offset, len = f.data.len(), error = %e, "a buffered array write failed; its bytes stay buffered");
                st.put_back(id, &f);
                st.error.get_or_insert(e);
            }
        }
        self.landed.notify_waiters();
    }

    /// Waits until `done` holds, re-checking whenever a flight lands.
    async fn wait_until(&self, done: impl Fn(&State) -> bool) {
        loop {
            let landed = self.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            if done(&self.state()) {
                return;
            }
            landed.await;
        }
    }

    /// Sends everything buffered and waits for every flight up to then.
    async fn flush(self: &Arc<Self>) -> Result<()> {
        let last = {
            let mut st = self.state();
            let runs = st.take_all();
            self.launch(&mut st, runs)
        };
        self.wait_until(|st| st.flights.range(..last).next().is_none()).await;
        match self.state().error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A write-back buffer over an [`Array`] (see the module docs).
pub struct ArrayWriter {
    inner: Arc<Inner>,
}

impl Array {
    /// A write-back writer over this array that gathers writes into whole
    /// stripes (see [`crate::writeback`]). Must be called within a tokio
    /// runtime (its age limit is kept by a background task).
    pub fn writer(&self, cfg: WriteBack) -> ArrayWriter {
        let unit = match self.object().ec_geometry() {
            Some((k, _, cell)) => k as u64 * cell,
            None => self.chunk_size(),
        };
        let inner = Arc::new(Inner {
            array: self.clone(),
            unit,
            cfg,
            state: Mutex::new(State::default()),
            landed: Notify::new(),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(age_keeper(weak, cfg.max_age));
        ArrayWriter { inner }
    }
}

/// Sends buffered bytes older than `max_age`; ends with the writer.
async fn age_keeper(weak: Weak<Inner>, max_age: Duration) {
    let tick = (max_age / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = weak.upgrade() else { return };
        let mut st = inner.state();
        if st.oldest.is_some_and(|t| t.elapsed() >= max_age) {
            let runs = st.take_all();
            inner.launch(&mut st, runs);
        }
    }
}

impl ArrayWriter {
    /// The array written to.
    pub fn array(&self) -> &Array {
        &self.inner.array
    }

    /// The unit writes are gathered into: a stripe for EC arrays, a chunk
    /// otherwise.
    pub fn unit(&self) -> u64 {
        self.inner.unit
    }

    /// Buffers `data` at `offset`; whole units are sent in the background.
    /// Waits only while too many writes are in flight or the buffer is
    /// full. Returns the error of an earlier background write, if one
    /// failed since it was last reported. Empty `data` is refused.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Err(ShoalError::invalid("an array write needs at least one byte"));
        }
        offset.checked_add(data.len() as u64).ok_or_else(|| ShoalError::invalid("write past 2^64"))?;
        let inner = &self.inner;
        {
            let mut st = inner.state();
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            let run = st.insert(offset, &data);
            let mut runs: Vec<(u64, Bytes)> = st.take_whole_units(run, inner.unit).into_iter().collect();
            if st.dirty_bytes > inner.cfg.max_dirty {
                runs.extend(st.take_all());
            }
            inner.launch(&mut st, runs);
        }
        let max = inner.cfg.max_in_flight.max(1);
        inner.wait_until(|st| st.flights.len() <= max).await;
        Ok(())
    }

    /// Sends everything buffered and returns once it is durable (with the
    /// array's size covering it), or with the first error of a write.
    pub async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    /// Flushes and drops the writer. On error the unflushed bytes are
    /// dropped too.
    pub async fn close(self) -> Result<()> {
        self.inner.flush().await
    }

    /// The array's size as this writer sees it: the servers' size, or the
    /// end of its own furthest write if that is further.
    pub async fn size(&self) -> Result<u64> {
        let end = self.inner.state().end;
        Ok(self.inner.array.size().await?.max(end))
    }

    /// Reads up to `len` bytes at `offset` as this writer sees them: the
    /// servers' bytes under its own unflushed and in-flight writes.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        let want = offset..offset.saturating_add(len);
        // Taken before the servers are read: a flight that lands during
        // the read is then applied either way.
        let (overlay, end) = {
            let st = self.inner.state();
            let mut overlay: Vec<(u64, Bytes)> = st
                .flights
                .values()
                .filter(|f| overlaps(&f.range(), &want))
                .map(|f| (f.offset, f.data.clone()))
                .collect();
            for (s, v) in st.dirty.range(..want.end) {
                let r = *s..s + v.len() as u64;
                if overlaps(&r, &want) {
                    let (a, b) = (r.start.max(want.start), r.end.min(want.end));
                    overlay.push((a, Bytes::copy_from_slice(&v[(a - s) as usize..(b - s) as usize])));
                }
            }
            (overlay, st.end)
        };
        let size = self.inner.array.size().await?.max(end);
        let base = self.inner.array.read_upto(offset, len, size).await?;
        if overlay.is_empty() || base.is_empty() {
            return Ok(base);
        }
        let mut buf = base.to_vec();
        let got = offset..offset + buf.len() as u64;
        for (s, data) in overlay {
            let r = s..s + data.len() as u64;
            if overlaps(&r, &got) {
                let (a, b) = (r.start.max(got.start), r.end.min(got.end));
                buf[(a - offset) as usize..(b - offset) as usize]
                    .copy_from_slice(&data[(a - s) as usize..(b - s) as usize]);
            }
        }
        Ok(Bytes::from(buf))
    }

    /// Bytes buffered and not yet sent.
    pub fn dirty_bytes(&self) -> u64 {
        self.inner.state().dirty_bytes
    }
}

impl Drop for ArrayWriter {
    fn drop(&mut self) {
        // Dropped without close: send what is buffered anyway (nobody
        // hears how it ends).
        let mut st = self.inner.state();
        if st.dirty.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        tracing::warn!(oid = %self.inner.array.oid(), bytes = st.dirty_bytes, "an array writer was dropped unflushed; sending its bytes in the background");
        let runs = st.take_all();
        self.inner.launch(&mut st, runs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(st: &State) -> Vec<(u64, Vec<u8>)> {
        st.dirty.iter().map(|(s, v)| (*s, v.clone())).collect()
    }

    #[test]
    fn insert_merges_overlapping_and_touching_runs() {
        let mut st = State::default();
        st.insert(10, &[1; 5]);
        st.insert(20, &[2; 5]);
        assert_eq!(st.dirty.len(), 2);
        // Touches the first run's end and overlaps the second.
        st.insert(15, &[3; 7]);
        assert_eq!(runs(&st), vec![(10, [vec![1; 5], vec![3; 7], vec![2; 3]].concat())]);
        assert_eq!(st.dirty_bytes, 15);
        // Covers everything and more on both sides.
        st.insert(5, &[4; 30]);
        assert_eq!(runs(&st), vec![(5, vec![4; 30])]);
        assert_eq!(st.dirty_bytes, 30);
        assert_eq!(st.end, 35);
        // Inside a run.
        st.insert(6, &[5; 2]);
        assert_eq!(runs(&st)[0].1[..4], [4, 5, 5, 4]);
        assert_eq!(st.dirty_bytes, 30);
        // Just before a run: merged, starting earlier.
        st.insert(0, &[6; 5]);
        assert_eq!(runs(&st), vec![(0, [vec![6; 5], vec![4], vec![5; 2], vec![4; 27]].concat())]);
    }

    #[test]
    fn insert_matches_a_flat_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut st = State::default();
            let mut model = vec![None::<u8>; 300];
            for i in 0..20u8 {
                let (off, len) = (rng.random_range(0..250u64), rng.random_range(1..50usize));
                st.insert(off, &vec![i; len]);
                for b in &mut model[off as usize..off as usize + len] {
                    *b = Some(i);
                }
                if rng.random_bool(0.3) {
                    let start = *st.dirty.keys().nth(rng.random_range(0..st.dirty.len())).unwrap();
                    if let Some((a, data)) = st.take_whole_units(start, 16) {
                        assert_eq!(a % 16, 0);
                        assert_eq!(data.len() % 16, 0);
                        for b in &mut model[a as usize..a as usize + data.len()] {
                            *b = None;
                        }
                    }
                }
            }
            let mut flat = vec![None::<u8>; 300];
            let mut prev_end = None;
            for (s, v) in &st.dirty {
                assert!(prev_end.is_none_or(|e| e < *s), "runs overlap or touch");
                prev_end = Some(s + v.len() as u64);
                for (i, b) in v.iter().enumerate() {
                    flat[*s as usize + i] = Some(*b);
                }
            }
            assert_eq!(flat, model);
            assert_eq!(st.dirty_bytes, st.dirty.values().map(|v| v.len() as u64).sum::<u64>());
        }
    }

    #[test]
    fn whole_units_leave_the_ragged_ends() {
        let mut st = State::default();
        st.insert(5, &[1; 40]);
        let (a, data) = st.take_whole_units(5, 16).unwrap();
        assert_eq!((a, data.len()), (16, 16));
        assert_eq!(runs(&st), vec![(5, vec![1; 11]), (32, vec![1; 13])]);
        assert_eq!(st.dirty_bytes, 24);
        assert!(st.take_whole_units(5, 16).is_none());
    }

    #[test]
    fn a_failed_flight_goes_back_under_newer_bytes() {
        let mut st = State::default();
        let f = Flight { offset: 0, data: Bytes::from(vec![1u8; 10]) };
        st.flights.insert(0, Flight { offset: 0, data: f.data.clone() });
        // A later flight covers [2, 4) and newer dirty bytes [6, 8).
        st.flights.insert(1, Flight { offset: 2, data: Bytes::from(vec![2u8; 2]) });
        st.insert(6, &[3; 2]);
        st.flights.remove(&0);
        st.put_back(0, &f);
        assert_eq!(runs(&st), vec![(0, vec![1; 2]), (4, [vec![1; 2], vec![3; 2], vec![1; 2]].concat())]);
    }
}
