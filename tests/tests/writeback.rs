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
use shoal_tests::{byte_a, byte_b, pattern, TestCluster};

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

/// Starts the gathering writer on `a` over `[start, end)`.
fn spawn_writer(cluster: &TestCluster, a: &Array, start: u64, end: u64, flush_at: u64, seed: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shoal-gather-writer"))
        .args([cluster.ms(), "tank".into(), "c".into(), a.oid().to_string()])
        .args([start, end, flush_at, seed].map(|n| n.to_string()))
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

/// Checks an array that held `byte_a` everywhere in `[0, len)` and was
/// then written from `start` by the killed gathering writer: every byte is
/// A or B, `[start, flushed)` is all B, and every whole unit past the
/// flushed point (or past `start`) is all A or all B.
fn check(got: &[u8], start: u64, flushed: Option<u64>, unit: u64) -> usize {
    for (x, b) in got.iter().enumerate() {
        let x = x as u64;
        assert!(*b == byte_a(x) || *b == byte_b(x), "byte {x} is {b}: neither the old nor the new bytes");
    }
    if let Some(f) = flushed {
        for x in start..f {
            assert_eq!(got[x as usize], byte_b(x), "byte {x} was acknowledged by a flush and lost");
        }
    }
    let from = flushed.unwrap_or(start).div_ceil(unit) * unit;
    let mut b_units = 0;
    for u in (from..got.len() as u64 / unit * unit).step_by(unit as usize) {
        let cells = &got[u as usize..(u + unit) as usize];
        let bs = cells.iter().enumerate().filter(|(i, b)| **b == byte_b(u + *i as u64)).count();
        assert!(bs == 0 || bs == unit as usize, "unit at {u} is torn: {bs} of {unit} bytes new");
        b_units += usize::from(bs > 0);
    }
    b_units
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
    let mut child = spawn_writer(&cluster, &arrays[0], start, len - 5000, u64::MAX, 1);
    let (flushed, wrote) = follow(&mut child, |_, w| w >= 3 << 20);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(flushed, None);
    let got0 = arrays[0].read(0, len).await.unwrap();
    let sent = check(&got0, start, None, unit);
    assert!(sent >= 1, "no whole stripe landed although {wrote} bytes were written");

    // Killed as soon as a flush returned, while it writes on: every
    // flushed byte is there.
    let mut child = spawn_writer(&cluster, &arrays[1], start, len - 5000, 2 << 20, 2);
    let (flushed, _) = follow(&mut child, |f, _| f.is_some());
    child.kill().unwrap();
    child.wait().unwrap();
    let flushed = flushed.expect("the writer flushed");
    let got1 = arrays[1].read(0, len).await.unwrap();
    check(&got1, start, Some(flushed), unit);

    // One server down: the stripes decode from parity to the same bytes
    // (a torn stripe would decode to garbage).
    cluster.servers[5].kill9();
    for (a, got) in arrays.iter().zip([&got0, &got1]) {
        let again = cont.array_open(a.oid()).await.unwrap().read(0, len).await.unwrap();
        assert!(again == *got, "a degraded read differs from the healthy one");
    }
}
