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
//! - A background write that fails (or whose task panics) keeps its bytes
//!   buffered, under any newer bytes of the same range, and the next flush
//!   sends them again. Every flush that started before they are durable
//!   fails with the cause (each write's bytes carry the number of the
//!   write, so a flush knows which bytes are older than itself, whoever
//!   sent them). The next `write` returns the error once, without taking
//!   its own bytes. `close` after a failed flush gives the error and drops
//!   the bytes not written.
//! - Memory is bounded by `max_dirty` buffered bytes (or 4096 separate
//!   runs) plus the writes in flight; at most `max_in_flight` writes are
//!   sent at once.
//! - A writer dropped without `close` still sends what it buffered, in the
//!   background; those writes are not ordered against a *new* writer of
//!   the same range, so close (or flush) a writer before another writes
//!   where it wrote.
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
use futures::future::BoxFuture;
use shoal_common::{Epoch, Result, ShoalError};
use tokio::sync::{Notify, Semaphore};

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

/// Called after background writes land, before they count as durable: a
/// file system raises the file's size there, so that the size never covers
/// bytes not yet on the servers. Writes that land while a call runs share
/// the next call: it gets the furthest end among them, so a call stands
/// for every write that landed before it began (a hook that raises a size
/// must clamp the end to what the array holds, as a truncate may have
/// come between). An error fails the write whose call it was like a failed
/// send (its bytes stay buffered and are sent again); the others that
/// waited on the call make a call of their own.
pub type LandedHook = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<()>> + Send + Sync>;

/// A write sent to the servers and not yet acknowledged.
struct Flight {
    offset: u64,
    data: Bytes,
    /// The oldest write whose bytes it carries.
    gen: u64,
}

impl Flight {
    fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.data.len() as u64
    }
}

/// Buffered bytes at one offset.
struct Run {
    data: Vec<u8>,
    /// The oldest write whose bytes it holds (a write's number is its
    /// generation): a flush waits for every byte older than itself.
    gen: u64,
}

/// Buffered runs past this many are all sent, as past `max_dirty`: each
/// costs memory and, once sent, a request of its own.
const MAX_RUNS: usize = 4096;

#[derive(Default)]
struct State {
    /// Buffered bytes by offset: runs that neither overlap nor touch.
    dirty: BTreeMap<u64, Run>,
    dirty_bytes: u64,
    /// When the oldest buffered byte was written.
    oldest: Option<Instant>,
    /// Sent writes by sequence number (the order they were made in).
    flights: BTreeMap<u64, Flight>,
    next_flight: u64,
    /// The number of the next write.
    next_gen: u64,
    /// The first error of a background write not yet reported to a
    /// `write`.
    error: Option<ShoalError>,
    /// The latest error of a background write, for flushes.
    last_error: Option<ShoalError>,
    /// The end of the furthest byte written through this writer.
    end: u64,
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Whether the pieces cover all of `want`.
fn covers(pieces: &[(u64, Bytes)], want: &Range<u64>) -> bool {
    let mut ranges: Vec<Range<u64>> = pieces.iter().map(|(s, d)| *s..s + d.len() as u64).collect();
    ranges.sort_by_key(|r| r.start);
    let mut at = want.start;
    for r in ranges {
        if r.start > at {
            break;
        }
        at = at.max(r.end);
    }
    at >= want.end
}

impl State {
    /// Buffers `data` at `offset` over whatever was there, as part of
    /// write `gen`; returns the merged run's start. Appending to a run
    /// extends it in place.
    fn insert(&mut self, offset: u64, data: &[u8], gen: u64) -> u64 {
        let end = offset + data.len() as u64;
        // Runs that overlap or touch [offset, end], in offset order.
        let mut touching: Vec<u64> = self
            .dirty
            .range(..=end)
            .rev()
            .take_while(|(s, r)| **s + r.data.len() as u64 >= offset)
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
            _ => Run { data: Vec::new(), gen },
        };
        run.gen = run.gen.min(gen);
        self.dirty_bytes -= run.data.len() as u64;
        for s in &touching {
            let Some(v) = self.dirty.remove(s) else { continue };
            self.dirty_bytes -= v.data.len() as u64;
            run.gen = run.gen.min(v.gen);
            let at = (s - start) as usize;
            if run.data.len() < at + v.data.len() {
                run.data.resize(at + v.data.len(), 0);
            }
            run.data[at..at + v.data.len()].copy_from_slice(&v.data);
        }
        let at = (offset - start) as usize;
        if run.data.len() < at + data.len() {
            run.data.resize(at + data.len(), 0);
        }
        run.data[at..at + data.len()].copy_from_slice(data);
        self.dirty_bytes += run.data.len() as u64;
        self.dirty.insert(start, run);
        self.end = self.end.max(end);
        start
    }

    /// Takes the whole `unit`s out of the run at `start`, leaving its
    /// ragged head and tail buffered.
    fn take_whole_units(&mut self, start: u64, unit: u64) -> Option<(u64, Bytes, u64)> {
        let len = self.dirty.get(&start)?.data.len() as u64;
        let a = start.checked_next_multiple_of(unit)?;
        let b = (start + len) / unit * unit;
        if b <= a {
            return None;
        }
        let Run { data: mut run, gen } = self.dirty.remove(&start).expect("the run");
        self.dirty_bytes -= len;
        let tail = run.split_off((b - start) as usize);
        if !tail.is_empty() {
            self.dirty_bytes += tail.len() as u64;
            self.dirty.insert(b, Run { data: tail, gen });
        }
        if a > start {
            let head = run[..(a - start) as usize].to_vec();
            self.dirty_bytes += head.len() as u64;
            self.dirty.insert(start, Run { data: head, gen });
        }
        if self.dirty.is_empty() {
            self.oldest = None;
        }
        Some((a, Bytes::from(run).slice((a - start) as usize..), gen))
    }

    /// Whether any buffered run overlaps `r`.
    fn overlaps_dirty(&self, r: Range<u64>) -> bool {
        self.dirty.range(..r.end).next_back().is_some_and(|(s, run)| overlaps(&(*s..*s + run.data.len() as u64), &r))
    }

    /// Takes every buffered run.
    fn take_all(&mut self) -> Vec<(u64, Bytes, u64)> {
        self.dirty_bytes = 0;
        self.oldest = None;
        std::mem::take(&mut self.dirty).into_iter().map(|(s, r)| (s, Bytes::from(r.data), r.gen)).collect()
    }

    /// Puts back the bytes of failed flight `id` that nothing newer covers.
    fn put_back(&mut self, id: u64, f: &Flight) {
        let mut newer: Vec<Range<u64>> = self.dirty.iter().map(|(s, r)| *s..s + r.data.len() as u64).collect();
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
        // Newer bytes over the failed ones stand in for them: a flush that
        // waits for the failed bytes waits for those too.
        let failed = f.offset..end;
        for (s, r) in self.dirty.iter_mut() {
            if overlaps(&(*s..*s + r.data.len() as u64), &failed) {
                r.gen = r.gen.min(f.gen);
            }
        }
        for (_, g) in self.flights.range_mut(id + 1..) {
            if overlaps(&g.range(), &failed) {
                g.gen = g.gen.min(f.gen);
            }
        }
        for g in gaps {
            let slice = &f.data[(g.start - f.offset) as usize..(g.end - f.offset) as usize];
            self.insert(g.start, slice, f.gen);
        }
    }
}

struct Inner {
    array: Array,
    unit: u64,
    on_landed: Option<LandedHook>,
    /// Landings waiting for the hook: how many so far, and the furthest
    /// end among those no call has taken yet.
    hook_queue: Mutex<(u64, u64)>,
    /// Held while the hook runs: how many landings its calls covered.
    hook_done: tokio::sync::Mutex<u64>,
    cfg: WriteBack,
    state: Mutex<State>,
    /// Signalled whenever a flight ends.
    landed: Notify,
    /// Flights sending at once.
    sends: Semaphore,
}

/// Puts a hook call's ends back in the queue unless the call succeeded.
struct Requeue<'a> {
    queue: &'a Mutex<(u64, u64)>,
    end: Option<u64>,
}

impl Drop for Requeue<'_> {
    fn drop(&mut self) {
        if let Some(end) = self.end {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.1 = q.1.max(end);
        }
    }
}

/// Ends a flight however its task ends (a panic included): removes it,
/// puts its bytes back if it did not land, and wakes the waiters.
struct Landing {
    inner: Arc<Inner>,
    id: u64,
    result: Option<Result<Epoch>>,
}

impl Drop for Landing {
    fn drop(&mut self) {
        let result =
            self.result.take().unwrap_or_else(|| Err(ShoalError::Internal("a buffered array write panicked".into())));
        {
            let mut st = self.inner.state();
            if let Some(f) = st.flights.remove(&self.id) {
                if let Err(e) = result {
                    tracing::warn!(oid = %self.inner.array.oid(), offset = f.offset, len = f.data.len(), error = %e, "a buffered array write failed; its bytes stay buffered");
                    st.put_back(self.id, &f);
                    st.error.get_or_insert(e.clone());
                    st.last_error = Some(e);
                }
            }
        }
        self.inner.landed.notify_waiters();
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `runs` in the background.
    fn launch(self: &Arc<Self>, st: &mut State, runs: Vec<(u64, Bytes, u64)>) {
        for (offset, data, gen) in runs {
            let id = st.next_flight;
            st.next_flight += 1;
            st.flights.insert(id, Flight { offset, data: data.clone(), gen });
            let landing = Landing { inner: self.clone(), id, result: None };
            tokio::spawn(landing.fly(offset, data));
        }
    }

    /// Sends everything buffered, and waits until every byte written
    /// before the call is durable, or failed.
    async fn flush(self: &Arc<Self>) -> Result<()> {
        let start = {
            let mut st = self.state();
            let runs = st.take_all();
            self.launch(&mut st, runs);
            st.next_gen
        };
        // Also flights of older bytes started by others (the age keeper, a
        // concurrent flush), and failed bytes sent again meanwhile.
        self.wait_until(|st| !st.flights.values().any(|f| f.gen < start)).await;
        let mut st = self.state();
        // Older bytes still buffered are failed writes put back.
        let failed: u64 = st.dirty.values().filter(|r| r.gen < start).map(|r| r.data.len() as u64).sum();
        if failed == 0 {
            // What failed before is durable now: nothing left to report.
            st.error = None;
            return Ok(());
        }
        // The cause as it was (ENOSPC stays ENOSPC for a file system).
        Err(st.last_error.clone().unwrap_or_else(|| {
            ShoalError::Io(format!("{failed} buffered bytes of array {} are not written", self.array.oid()))
        }))
    }

    /// Runs the landing hook for a write that landed with `end`, or waits
    /// for a call that began after it landed (group commit: a burst of
    /// landings costs one or two calls, not one each).
    async fn run_hook(&self, end: u64) -> Result<()> {
        let Some(hook) = &self.on_landed else { return Ok(()) };
        let ticket = {
            let mut q = self.hook_queue.lock().unwrap_or_else(|e| e.into_inner());
            q.0 += 1;
            q.1 = q.1.max(end);
            q.0
        };
        let mut done = self.hook_done.lock().await;
        if *done >= ticket {
            return Ok(());
        }
        let (upto, end) = {
            let mut q = self.hook_queue.lock().unwrap_or_else(|e| e.into_inner());
            (q.0, std::mem::take(&mut q.1))
        };
        // Unless the call succeeds (it fails, panics or is dropped), the
        // next landing's call takes these ends again.
        let mut requeue = Requeue { queue: &self.hook_queue, end: Some(end) };
        hook(end).await?;
        requeue.end = None;
        *done = upto;
        Ok(())
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
}

impl Landing {
    async fn fly(mut self, offset: u64, data: Bytes) {
        let inner = self.inner.clone();
        let (id, range) = (self.id, offset..offset + data.len() as u64);
        // Earlier writes of the same bytes land first.
        inner.wait_until(|st| !st.flights.range(..id).any(|(_, f)| overlaps(&f.range(), &range))).await;
        let _permit = inner.sends.acquire().await.expect("the semaphore is never closed");
        let end = range.end;
        let mut r = inner.array.write(offset, data).await;
        if r.is_ok() {
            if let Err(e) = inner.run_hook(end).await {
                r = Err(e);
            }
        }
        self.result = Some(r);
        // Dropping `self` ends the flight.
    }
}

impl Array {
    /// A write-back writer over this array that gathers writes into whole
    /// stripes (see [`crate::writeback`]). Must be called within a tokio
    /// runtime (its age limit is kept by a background task).
    pub fn writer(&self, cfg: WriteBack) -> ArrayWriter {
        self.writer_with_hook(cfg, None)
    }

    /// [`Array::writer`] with a hook run after each background write lands
    /// (see [`LandedHook`]).
    pub fn writer_with_hook(&self, cfg: WriteBack, on_landed: Option<LandedHook>) -> ArrayWriter {
        let unit = match self.object().ec_geometry() {
            Some((k, _, cell)) => k as u64 * cell,
            None => self.chunk_size(),
        };
        let inner = Arc::new(Inner {
            array: self.clone(),
            unit,
            on_landed,
            hook_queue: Mutex::new((0, 0)),
            hook_done: tokio::sync::Mutex::new(0),
            cfg,
            state: Mutex::new(State::default()),
            landed: Notify::new(),
            sends: Semaphore::new(cfg.max_in_flight.max(1)),
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

/// A write-back buffer over an [`Array`] (see the module docs).
pub struct ArrayWriter {
    inner: Arc<Inner>,
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
    /// Waits only while too many writes are in flight. If a background
    /// write failed since the last `write` heard of it, returns that error
    /// instead and does not take `data` (the failed bytes stay buffered
    /// for the next flush). Empty `data` is refused.
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
            let gen = st.next_gen;
            st.next_gen += 1;
            let end = offset + data.len() as u64;
            // Whole units over nothing buffered go out as they are, without
            // a copy into the buffer.
            if offset.is_multiple_of(inner.unit) && end.is_multiple_of(inner.unit) && !st.overlaps_dirty(offset..end) {
                st.end = st.end.max(end);
                inner.launch(&mut st, vec![(offset, data, gen)]);
            } else {
                let run = st.insert(offset, &data, gen);
                let mut runs: Vec<(u64, Bytes, u64)> = st.take_whole_units(run, inner.unit).into_iter().collect();
                if st.dirty_bytes > inner.cfg.max_dirty || st.dirty.len() > MAX_RUNS {
                    runs.extend(st.take_all());
                }
                inner.launch(&mut st, runs);
            }
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

    /// Flushes and drops the writer. On error the bytes not written are
    /// dropped too.
    pub async fn close(self) -> Result<()> {
        let r = self.inner.flush().await;
        if r.is_err() {
            self.inner.state().take_all();
        }
        r
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
        self.read_overlaid(offset, len, true).await
    }

    /// Reads exactly `len` bytes at `offset` as this writer sees them,
    /// whatever the size (bytes never written read as zeros): for callers
    /// that keep the size themselves, as a file system does.
    pub async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.read_overlaid(offset, len, false).await
    }

    /// Drops every buffered byte and waits until nothing is in flight
    /// (for a file that is gone, or whose failed bytes were reported).
    pub async fn discard(&self) {
        {
            let mut st = self.inner.state();
            st.take_all();
            st.error = None;
        }
        self.inner.wait_until(|st| st.flights.is_empty()).await;
        // Failed flights put their bytes back meanwhile: drop those too.
        self.inner.state().take_all();
    }

    /// Whether nothing is buffered or in flight.
    pub fn is_idle(&self) -> bool {
        let st = self.inner.state();
        st.dirty.is_empty() && st.flights.is_empty()
    }

    async fn read_overlaid(&self, offset: u64, len: u64, clamp: bool) -> Result<Bytes> {
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
            for (s, run) in st.dirty.range(..want.end) {
                let r = *s..s + run.data.len() as u64;
                if overlaps(&r, &want) {
                    let (a, b) = (r.start.max(want.start), r.end.min(want.end));
                    overlay.push((a, Bytes::copy_from_slice(&run.data[(a - s) as usize..(b - s) as usize])));
                }
            }
            (overlay, st.end)
        };
        // Wholly the writer's own bytes: no need to ask the servers (which
        // may be the ones down).
        let base = if (end >= want.end || !clamp) && covers(&overlay, &want) {
            Bytes::from(vec![0u8; (want.end - want.start) as usize])
        } else if clamp {
            let size = self.inner.array.size().await?.max(end);
            self.inner.array.read_upto(offset, len, size).await?
        } else {
            self.inner.array.read_at(offset, len).await?
        };
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

    /// The end of the furthest byte buffered or in flight (0 if none):
    /// once flushed, the array is at least this long.
    pub fn pending_end(&self) -> u64 {
        let st = self.inner.state();
        let dirty = st.dirty.iter().next_back().map_or(0, |(o, r)| o + r.data.len() as u64);
        let flying = st.flights.values().map(|f| f.range().end).max().unwrap_or(0);
        dirty.max(flying)
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
        st.dirty.iter().map(|(s, r)| (*s, r.data.clone())).collect()
    }

    #[test]
    fn insert_merges_overlapping_and_touching_runs() {
        let mut st = State::default();
        st.insert(10, &[1; 5], 0);
        st.insert(20, &[2; 5], 1);
        assert_eq!(st.dirty.len(), 2);
        // Touches the first run's end and overlaps the second.
        st.insert(15, &[3; 7], 2);
        assert_eq!(runs(&st), vec![(10, [vec![1; 5], vec![3; 7], vec![2; 3]].concat())]);
        assert_eq!(st.dirty_bytes, 15);
        // Covers everything and more on both sides.
        st.insert(5, &[4; 30], 3);
        assert_eq!(runs(&st), vec![(5, vec![4; 30])]);
        assert_eq!(st.dirty_bytes, 30);
        assert_eq!(st.end, 35);
        // Inside a run.
        st.insert(6, &[5; 2], 4);
        assert_eq!(runs(&st)[0].1[..4], [4, 5, 5, 4]);
        assert_eq!(st.dirty_bytes, 30);
        // Just before a run: merged, starting earlier.
        st.insert(0, &[6; 5], 5);
        assert_eq!(runs(&st), vec![(0, [vec![6; 5], vec![4], vec![5; 2], vec![4; 27]].concat())]);
        // A merged run is as old as its oldest bytes.
        assert_eq!(st.dirty[&0].gen, 0);
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
                st.insert(off, &vec![i; len], u64::from(i));
                for b in &mut model[off as usize..off as usize + len] {
                    *b = Some(i);
                }
                if rng.random_bool(0.3) {
                    let start = *st.dirty.keys().nth(rng.random_range(0..st.dirty.len())).unwrap();
                    if let Some((a, data, _)) = st.take_whole_units(start, 16) {
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
            for (s, r) in &st.dirty {
                assert!(prev_end.is_none_or(|e| e < *s), "runs overlap or touch");
                prev_end = Some(s + r.data.len() as u64);
                for (i, b) in r.data.iter().enumerate() {
                    flat[*s as usize + i] = Some(*b);
                    // Every byte is at least as new as its run says.
                    assert!(u64::from(*b) >= r.gen, "run at {s} claims generation {} for a byte of {b}", r.gen);
                }
            }
            assert_eq!(flat, model);
            assert_eq!(st.dirty_bytes, st.dirty.values().map(|r| r.data.len() as u64).sum::<u64>());
        }
    }

    #[test]
    fn overlaps_dirty_sees_any_run_in_the_range() {
        let mut st = State::default();
        st.insert(10, &[1; 10], 0);
        st.insert(40, &[1; 10], 1);
        assert!(!st.overlaps_dirty(0..10) && !st.overlaps_dirty(20..40) && !st.overlaps_dirty(50..60));
        assert!(st.overlaps_dirty(19..20) && st.overlaps_dirty(0..100) && st.overlaps_dirty(45..46));
    }

    #[test]
    fn whole_units_leave_the_ragged_ends() {
        let mut st = State::default();
        st.insert(5, &[1; 40], 0);
        let (a, data, _) = st.take_whole_units(5, 16).unwrap();
        assert_eq!((a, data.len()), (16, 16));
        assert_eq!(runs(&st), vec![(5, vec![1; 11]), (32, vec![1; 13])]);
        assert_eq!(st.dirty_bytes, 24);
        assert!(st.take_whole_units(5, 16).is_none());
        // Near the end of the address space: no unit, no overflow.
        st.insert(u64::MAX - 10, &[2; 10], 1);
        assert!(st.take_whole_units(u64::MAX - 10, 16).is_none());
    }

    #[test]
    fn a_failed_flight_goes_back_under_newer_bytes() {
        let mut st = State::default();
        let f = Flight { offset: 0, data: Bytes::from(vec![1u8; 10]), gen: 0 };
        st.flights.insert(0, Flight { offset: 0, data: f.data.clone(), gen: 0 });
        // A later flight covers [2, 4) and newer dirty bytes [6, 8).
        st.flights.insert(1, Flight { offset: 2, data: Bytes::from(vec![2u8; 2]), gen: 1 });
        st.insert(6, &[3; 2], 2);
        st.flights.remove(&0);
        st.put_back(0, &f);
        assert_eq!(runs(&st), vec![(0, vec![1; 2]), (4, [vec![1; 2], vec![3; 2], vec![1; 2]].concat())]);
        // Put back, the bytes keep their age: a flush started since sees
        // them as its own and fails rather than call them durable.
        assert!(st.dirty.values().all(|r| r.gen == 0));
        // So do newer bytes that cover failed ones (the later flight here):
        // a flush that waits for the failed bytes waits for them too.
        assert_eq!(st.flights[&1].gen, 0);

        // Failed bytes wholly covered by newer buffered ones: nothing goes
        // back, and the newer run takes their age.
        let mut st = State::default();
        let f = Flight { offset: 4, data: Bytes::from(vec![1u8; 4]), gen: 3 };
        st.insert(0, &[9; 16], 7);
        st.put_back(5, &f);
        assert_eq!(runs(&st), vec![(0, vec![9; 16])]);
        assert_eq!(st.dirty[&0].gen, 3);
    }
}
