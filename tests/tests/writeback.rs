//! Client-side write gathering (`ArrayWriter`) on a 6-server loopback
//! cluster: unaligned writes of random sizes read back byte for byte,
//! sequential ones pay no read-modify-write past their ends, and a client
//! killed before or after a flush loses only unflushed bytes and tears no
//! stripe (also when read degraded, through parity).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use shoal_client::{Array, Container, WriteBack};
use shoal_common::mgmt::ContProps;
use shoal_tests::{byte_a, byte_b, byte_c, pattern, TestCluster};

const CLASS: &str = "EC_4P2G1";

async fn ec_cont(cluster: &TestCluster) -> (shoal_client::Client, Container) {
    let props = ContProps { oclass: Some(CLASS.into()), ..Default::default() };
    let (client, _pool, cont) = shoal_tests::tank(cluster, props).await;
    (client, cont)
}

fn apply(model: &mut Vec<u8>, off: u64, data: &[u8]) {
    let (off, end) = (off as usize, off as usize + data.len());
    if model.len() < end {
        model.resize(end, 0);
    }
    model[off..end].copy_from_slice(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gathered_writes_read_back_and_skip_read_modify_write() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 6, 1).await.unwrap();
    let (client, cont) = ec_cont(&cluster).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);

    // Sequential, unaligned, random sizes: only the ragged head and tail
    // are partial stripes.
    let a = cont.array_create(None, None).await.unwrap();
    let w = a.writer(WriteBack::default());
    assert_eq!(w.unit(), 4 * (64 << 10), "EC_4P2 with 64 KiB cells gathers 256 KiB stripes");
    let rmw0 = client.stats().rmw_stripes;
    let mut model = Vec::new();
    let mut at = 4095u64;
    let mut i = 0;
    while at < 6 << 20 {
        let n = rng.random_range(1..=200_000u64);
        let data = pattern(i, n as usize);
        apply(&mut model, at, &data);
        w.write(at, Bytes::from(data)).await.unwrap();
        at += n;
        i += 1;
        if i % 7 == 0 {
            // Reads see the writer's own bytes, sent or not.
            let off = rng.random_range(0..at);
            let len = rng.random_range(1..300_000u64);
            let got = w.read(off, len).await.unwrap();
            let want = &model[off as usize..(off + len).min(at) as usize];
            assert!(got[..] == *want, "read-your-writes at {off}+{len} (written up to {at})");
        }
    }
    assert_eq!(w.size().await.unwrap(), at);
    w.close().await.unwrap();
    let rmw = client.stats().rmw_stripes - rmw0;
    assert!(rmw <= 2, "a sequential gathered stream paid {rmw} read-modify-writes (only its head and tail may)");
    let other = cont.array_open(a.oid()).await.unwrap();
    assert_eq!(other.size().await.unwrap(), at);
    assert!(other.read(0, at).await.unwrap()[..] == model[..], "the flushed array reads back");

    // The same stream through plain writes: a read-modify-write at
    // nearly every write's ends.
    let plain = cont.array_create(None, None).await.unwrap();
    let rmw0 = client.stats().rmw_stripes;
    let (mut at, mut rng2) = (4095u64, rand::rngs::StdRng::seed_from_u64(11));
    for i in 0..40 {
        let n = rng2.random_range(1..=200_000u64);
        plain.write(at, Bytes::from(pattern(i, n as usize))).await.unwrap();
        at += n;
    }
    assert!(client.stats().rmw_stripes - rmw0 > 20, "plain unaligned writes read-modify-write");

    // Random overlapping writes with a small buffer (the size limit sends
    // partial runs), random reads and flushes.
    let b = cont.array_create(None, None).await.unwrap();
    let w = b.writer(WriteBack { max_dirty: 128 << 10, max_in_flight: 3, ..WriteBack::default() });
    let mut model = Vec::new();
    for i in 0..300u64 {
        let off = rng.random_range(0..(3u64 << 20));
        let data = pattern(1000 + i, rng.random_range(1..100_000usize));
        apply(&mut model, off, &data);
        w.write(off, Bytes::from(data)).await.unwrap();
        if rng.random_bool(0.1) {
            let off = rng.random_range(0..model.len() as u64);
            let got = w.read(off, 70_000).await.unwrap();
            let end = (off as usize + 70_000).min(model.len());
            assert!(got[..] == model[off as usize..end], "random read-your-writes at {off}");
        }
        if rng.random_bool(0.03) {
            w.flush().await.unwrap();
            assert_eq!(w.dirty_bytes(), 0);
        }
    }
    w.close().await.unwrap();
    let b2 = cont.array_open(b.oid()).await.unwrap();
    assert_eq!(b2.size().await.unwrap(), model.len() as u64);
    assert!(b2.read(0, model.len() as u64).await.unwrap()[..] == model[..], "random gathered writes read back");

    // The age limit sends what sits in the buffer without a flush.
    let c = cont.array_create(None, None).await.unwrap();
    let w = c.writer(WriteBack { max_age: Duration::from_millis(200), ..WriteBack::default() });
    w.write(100, Bytes::from_static(b"aged")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.read(100, 4).await.unwrap()[..] != b"aged"[..] {
        assert!(Instant::now() < deadline, "buffered bytes were not sent after their age limit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.close().await.unwrap();

    // A writer dropped without close still sends its bytes.
    let d = cont.array_create(None, None).await.unwrap();
    d.writer(WriteBack::default()).write(7, Bytes::from_static(b"dropped")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.read(7, 7).await.unwrap()[..] != b"dropped"[..] {
        assert!(Instant::now() < deadline, "a dropped writer's bytes were not sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d.writer(WriteBack::default()).write(0, Bytes::new()).await.is_err(), "empty writes are refused");
}

/// A write that fails in the background is reported by the next flush
/// (and once by the next write), stays buffered, and lands with the flush
/// after the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_background_write_fails_the_flush_and_is_sent_again() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(tmp.path(), 3, 1).await.unwrap();
    let props = ContProps { oclass: Some("S1".into()), ..Default::default() };
    let (client, _pool, cont) = shoal_tests::tank(&cluster, props).await;
    let members = client.system_query().await.unwrap().members;
    // An array whose first chunk is not on server 0 (the MS's).
    let (a, victim) = loop {
        let a = cont.array_create(None, None).await.unwrap();
        let rank = a.object().layout().unwrap().dkey_shards(&0u64.to_be_bytes())[0].rank;
        let addr = &members.iter().find(|m| m.rank == rank).unwrap().addr;
        let i = cluster.servers.iter().position(|s| s.addr == *addr).unwrap();
        if i != 0 {
            break (a, i);
        }
    };
    let w = a.writer(WriteBack::default());
    let data = Bytes::from(pattern(5, 1 << 20));
    cluster.servers[victim].kill9();
    // A whole chunk: sent at once, in the background, and it fails.
    w.write(0, data.clone()).await.unwrap();
    let e = w.flush().await.expect_err("a flush of bytes whose server is down");
    assert_eq!(e.kind(), shoal_common::ErrorKind::Unreachable, "{e}");
    assert!(w.dirty_bytes() >= 1 << 20, "the failed bytes stay buffered");
    // Still readable through the writer.
    assert_eq!(w.read(0, 1 << 20).await.unwrap(), data);
    // The next write hears of it once and does not take its bytes.
    assert!(w.write(5 << 20, Bytes::from_static(b"x")).await.is_err());
    cluster.servers[victim].restart().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = w.flush().await {
        assert!(Instant::now() < deadline, "the flush kept failing after the server came back: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.close().await.unwrap();
    let fresh = cont.array_open(a.oid()).await.unwrap();
    assert_eq!(fresh.size().await.unwrap(), 1 << 20, "the refused write was not taken");
    assert_eq!(fresh.read(0, 1 << 20).await.unwrap(), data);
}

/// Writes that land together share one call of the landing hook (a file
/// system raises the size there: one request to the inode per burst, not
/// one per stripe), and the last call covers the furthest byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn landings_share_the_hook() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 6, 1).await.unwrap();
    let (_client, cont) = ec_cont(&cluster).await;
    let a = cont.array_create(None, None).await.unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let ends = Arc::new(Mutex::new(Vec::new()));
    let hook: shoal_client::LandedHook = {
        let (calls, ends) = (calls.clone(), ends.clone());
        Arc::new(move |end: u64| {
            let (calls, ends) = (calls.clone(), ends.clone());
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                ends.lock().unwrap().push(end);
                // Slow, as a request to a busy server is: the writes that
                // land meanwhile wait for the next call.
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(())
            })
        })
    };
    let cfg = WriteBack { max_in_flight: 8, ..WriteBack::default() };
    let w = a.writer_with_hook(cfg, Some(hook));
    let unit = w.unit();
    // Eight whole stripes, one write each: eight flights at once.
    let data = Bytes::from(pattern(3, 8 * unit as usize));
    for i in 0..8 {
        w.write(i * unit, data.slice((i * unit) as usize..((i + 1) * unit) as usize)).await.unwrap();
    }
    w.flush().await.unwrap();
    let n = calls.load(Ordering::SeqCst);
    let seen = ends.lock().unwrap().clone();
    assert!((1..8).contains(&n), "{n} hook calls for 8 stripes landing together (ends {seen:?})");
    assert_eq!(seen.iter().max(), Some(&(8 * unit)), "no call covered the furthest byte: {seen:?}");
    // A later, lower write still gets its own call (after a truncate the
    // hook must hear of it even though a larger end was covered before).
    w.write(0, Bytes::from(pattern(4, unit as usize))).await.unwrap();
    w.flush().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), n + 1);
    assert_eq!(ends.lock().unwrap().last(), Some(&unit), "the lower write's call");
    w.close().await.unwrap();
    assert_eq!(a.read(unit, 7 * unit).await.unwrap(), data.slice(unit as usize..));
}

/// Starts the gathering writer on `a` over `[start, end)`, `passes` times.
fn spawn_writer(
    cluster: &TestCluster,
    a: &Array,
    start: u64,
    end: u64,
    flush_at: u64,
    seed: u64,
    passes: u64,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shoal-gather-writer"))
        .args([cluster.ms(), "tank".into(), "c".into(), a.oid().to_string()])
        .args([start, end, flush_at, seed, passes].map(|n| n.to_string()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start shoal-gather-writer")
}

/// Reads the writer's lines until `stop` says so; returns the last
/// `flushed` figure and the last `wrote` figure seen.
fn follow(child: &mut Child, stop: impl Fn(Option<u64>, u64) -> bool) -> (Option<u64>, u64) {
    let out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let (mut flushed, mut wrote) = (None, 0);
    for line in out.lines() {
        let line = line.expect("the writer's output");
        if let Some(n) = line.strip_prefix("wrote ") {
            wrote = n.parse().unwrap();
        } else if let Some(n) = line.strip_prefix("flushed ") {
            flushed = Some(n.parse().unwrap());
        }
        if stop(flushed, wrote) || line == "done" {
            return (flushed, wrote);
        }
    }
    panic!("the writer ended early: {:?}", child.wait());
}

/// Checks an array that held `byte_a` in `[0, old)` and was then written
/// from `start` by the killed gathering writer, whose last pass wrote
/// `last(x)`: every byte is old (A, or zero past `old`), or from a pass (B
/// or C); `[start, flushed)` is all `last`; and every whole unit past the
/// flushed point (or past `start`) is entirely one of them, never torn.
/// Returns how many whole units hold new bytes.
fn check(got: &[u8], old: u64, start: u64, flushed: Option<u64>, unit: u64, last: fn(u64) -> u8) -> usize {
    let kind = |x: u64, b: u8| -> u8 {
        match b {
            _ if x < old && b == byte_a(x) => 0,
            0 if x >= old => 0,
            _ if b == byte_b(x) => 1,
            _ if b == byte_c(x) => 2,
            _ => panic!("byte {x} is {b}: neither an old nor a new byte"),
        }
    };
    if let Some(f) = flushed {
        assert!(got.len() as u64 >= f, "the array reads {} bytes; {f} were flushed", got.len());
        for x in start..f {
            assert_eq!(got[x as usize], last(x), "byte {x} was acknowledged by a flush and lost");
        }
    }
    let from = flushed.unwrap_or(start).div_ceil(unit) * unit;
    let mut new_units = 0;
    for u in (from..got.len() as u64 / unit * unit).step_by(unit as usize) {
        let kinds: Vec<u8> = (u..u + unit).map(|x| kind(x, got[x as usize])).collect();
        assert!(kinds.iter().all(|k| *k == kinds[0]), "unit at {u} is torn: {:?}", {
            let mut c = [0usize; 3];
            kinds.iter().for_each(|k| c[*k as usize] += 1);
            c
        });
        new_units += usize::from(kinds[0] > 0);
    }
    new_units
}

/// Reads `a` until two reads a moment apart agree: writes the killed
/// client had already sent may still be landing.
async fn settled(a: &Array, len: u64) -> Bytes {
    let mut prev = a.read(0, len).await.unwrap();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = a.read(0, len).await.unwrap();
        if now == prev {
            return now;
        }
        prev = now;
    }
    panic!("the array kept changing after its writer was killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_loses_only_unflushed_bytes_and_tears_no_stripe() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(tmp.path(), 6, 1).await.unwrap();
    let (_client, cont) = ec_cont(&cluster).await;
    let len = 8u64 << 20;
    let old: Vec<u8> = (0..len).map(byte_a).collect();
    let mut arrays = Vec::new();
    for _ in 0..2 {
        let a = cont.array_create(None, None).await.unwrap();
        a.write(0, Bytes::from(old.clone())).await.unwrap();
        arrays.push(a);
    }
    let unit = arrays[0].writer(WriteBack::default()).unit();
    let start = 4095;

    // Killed before it ever flushed: whole stripes it sent are new, all
    // others old.
    let mut child = spawn_writer(&cluster, &arrays[0], start, len - 5000, u64::MAX, 1, 1);
    let (flushed, wrote) = follow(&mut child, |_, w| w >= 3 << 20);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(flushed, None);
    let got0 = settled(&arrays[0], len).await;
    let sent = check(&got0, len, start, None, unit, byte_b);
    // At most 8 writes are in flight: of the 12 whole stripes in 3 MiB,
    // the first had landed before `write` returned for the last.
    assert!(sent >= 1, "no whole stripe landed although {wrote} bytes were written");

    // Two passes (the second overwrites the first), past the old end, and
    // killed as soon as a flush in the second pass returned: every flushed
    // byte is the second pass's, and the size covers them.
    let end = len + 300_000;
    let mut child = spawn_writer(&cluster, &arrays[1], start, end, len - start + 100_000, 2, 2);
    let (flushed, _) = follow(&mut child, |f, _| f.is_some());
    child.kill().unwrap();
    child.wait().unwrap();
    let flushed = flushed.expect("the writer flushed");
    assert!(flushed > len);
    let got1 = settled(&arrays[1], end).await;
    check(&got1, len, start, Some(flushed), unit, byte_c);

    // One server down: the stripes decode from parity to the same bytes
    // (a torn stripe would decode to garbage).
    cluster.servers[5].kill9();
    for (a, got) in arrays.iter().zip([&got0, &got1]) {
        let again = cont.array_open(a.oid()).await.unwrap().read(0, got.len() as u64).await.unwrap();
        assert!(again == *got, "a degraded read differs from the healthy one");
    }
}
