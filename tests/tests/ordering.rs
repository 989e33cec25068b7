//! The write acknowledged last in real time is the one that reads back:
//! whatever the clients' clocks say, for partial punches, stalled
//! read-modify-writers and cancelled writes.
//!
//! Clients with wrong clocks are made on purpose with
//! `ClientBuilder::clock`, since the clocks of one host always agree.

use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_client::{Array, Client, Container};
use shoal_common::hlc::wall_ns;
use shoal_common::mgmt::ContProps;
use shoal_common::msg::{FetchIod, Fetched, UpdateIod, ValueKind};
use shoal_common::{ShoalError, EPOCH_MAX};
use shoal_tests::{pattern, TestCluster};

const SEC: i64 = 1_000_000_000;

/// A client whose wall clock is `skew_ns` off the true time.
async fn skewed(ms: &str, skew_ns: i64) -> Client {
    Client::builder().ms([ms]).clock(move || (wall_ns() as i64 + skew_ns) as u64).connect().await.unwrap()
}

async fn cont(c: &Client, label: &str) -> Container {
    c.pool_connect("tank").await.unwrap().cont_open(label).await.unwrap()
}

async fn setup(n: usize) -> (tempfile::TempDir, TestCluster) {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), n, 1).await.unwrap();
    let admin = cluster.client().await.unwrap();
    admin.pool_create("tank", vec![], 0).await.unwrap();
    let pool = admin.pool_connect("tank").await.unwrap();
    for class in ["RP_3G1", "EC_4P2G1"] {
        let props = ContProps {
            oclass: Some(class.into()),
            cell_size: 16 << 10,
            chunk_size: 256 << 10,
            ..ContProps::default()
        };
        pool.cont_create(&class.to_lowercase().replace('_', "-"), props).await.unwrap();
    }
    (tmp, cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_acknowledged_last_wins_whatever_the_clocks_say() {
    let (_tmp, cluster) = setup(6).await;
    let ms = cluster.ms();
    let honest = cluster.client().await.unwrap();
    for skew in [SEC / 2, 3 * SEC] {
        let fast = skewed(&ms, skew).await;
        let slow = skewed(&ms, -skew).await;
        for label in ["rp-3g1", "ec-4p2g1"] {
            let (fc, sc, hc) = (cont(&fast, label).await, cont(&slow, label).await, cont(&honest, label).await);

            // Key-value: the slow client's later put wins.
            let kv = fc.kv_create(None).await.unwrap();
            kv.put(b"key", Bytes::from_static(b"old")).await.unwrap();
            sc.kv_open(kv.oid()).await.unwrap().put(b"key", Bytes::from_static(b"new")).await.unwrap();
            let got = hc.kv_open(kv.oid()).await.unwrap().get(b"key").await.unwrap();
            assert_eq!(got.as_deref(), Some(&b"new"[..]), "{label}, skew {skew}: KV put");

            // A whole-chunk (full-stripe) overwrite.
            let a = fc.array_create(None, None).await.unwrap();
            let chunk = a.chunk_size() as usize;
            a.write(0, Bytes::from(pattern(1, chunk))).await.unwrap();
            let b = sc.array_open(a.oid()).await.unwrap();
            b.write(0, Bytes::from(pattern(2, chunk))).await.unwrap();
            let got = hc.array_open(a.oid()).await.unwrap().read(0, chunk as u64).await.unwrap();
            assert!(got == pattern(2, chunk), "{label}, skew {skew}: full overwrite lost");

            // Twelve 4 KiB writes into one stripe, alternating clients: every
            // acknowledged write stays.
            let arrays: [&Array; 2] = [&a, &b];
            for i in 0..12usize {
                arrays[i % 2].write(i as u64 * 4096 + 100, Bytes::from(pattern(100 + i as u64, 4096))).await.unwrap();
            }
            let got = hc.array_open(a.oid()).await.unwrap().read(100, 12 * 4096).await.unwrap();
            for i in 0..12usize {
                assert!(
                    got[i * 4096..(i + 1) * 4096] == pattern(100 + i as u64, 4096)[..],
                    "{label}, skew {skew}: partial write {i} lost"
                );
            }
        }
        // The slow client's writes met newer versions and went again.
        assert!(slow.stats().conflict_retries > 0, "skew {skew}: the conflict path was not exercised");
    }
    assert!(honest.stats().checksum_errors == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_clock_is_too_far_off_refuses_to_write_and_says_why() {
    let (_tmp, cluster) = setup(6).await;
    let ms = cluster.ms();
    let kv = cont(&cluster.client().await.unwrap(), "rp-3g1").await.kv_create(None).await.unwrap();
    kv.put(b"k", Bytes::from_static(b"v")).await.unwrap();
    for skew in [-20 * SEC, 20 * SEC] {
        let c = skewed(&ms, skew).await;
        let mine = cont(&c, "rp-3g1").await.kv_open(kv.oid()).await.unwrap();
        let r = mine.put(b"k", Bytes::from_static(b"w")).await;
        match r {
            Err(ShoalError::InvalidArgument(m)) => assert!(m.contains("clock"), "{m}"),
            other => panic!("skew {skew}: {other:?}"),
        }
        // Reads still work.
        assert_eq!(mine.get(b"k").await.unwrap().as_deref(), Some(&b"v"[..]));
    }
}

/// The shards of chunk 0 of `a`, as (address, target).
async fn chunk0_shards(c: &Client, a: &Array) -> Vec<(String, u32)> {
    let addrs = c.pool_connect("tank").await.unwrap().info().addrs;
    a.object()
        .layout()
        .unwrap()
        .dkey_shards(&0u64.to_be_bytes())
        .iter()
        .map(|s| (addrs.iter().find(|(r, _)| *r == s.rank).unwrap().1.clone(), s.target))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_punch_that_reached_some_cells_never_brings_back_an_older_stripe() {
    let (_tmp, cluster) = setup(6).await;
    let c = cluster.client().await.unwrap();
    let ec = cont(&c, "ec-4p2g1").await;
    let a = ec.array_create(None, None).await.unwrap();
    let (k, _, cell) = a.object().ec_geometry().unwrap();
    let stripe = (k as u64 * cell) as usize;
    a.write(0, Bytes::from(pattern(1, stripe))).await.unwrap();
    let w2 = pattern(2, stripe);
    a.write(0, Bytes::from(w2.clone())).await.unwrap();

    // A punch of the chunk reaches 3 of the 6 cells (p = 2 < 3 < k = 4),
    // as one that failed part-way would.
    let dkey = 0u64.to_be_bytes();
    for (addr, target) in chunk0_shards(&c, &a).await.into_iter().take(3) {
        let raw = shoal_client::ServerClient::tcp(addr);
        raw.punch(target, ec.info().uuid, a.oid(), Some(&dkey), None).await.unwrap();
    }
    // Neither W2 nor the punch has k cells: the stripe reads as before the
    // punch, which is W2, never W1.
    let got = a.read(0, stripe as u64).await.unwrap();
    assert!(got == w2[..], "the read must return the last complete stripe");
    // A read-modify-write of the stripe keeps W2's other bytes.
    a.write(100, Bytes::from(pattern(3, 50))).await.unwrap();
    let mut want = w2.clone();
    want[100..150].copy_from_slice(&pattern(3, 50));
    assert!(a.read(0, stripe as u64).await.unwrap() == want[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_read_modify_writer_never_overwrites_a_newer_write() {
    let (_tmp, cluster) = setup(6).await;
    let c = cluster.client().await.unwrap();
    let ec = cont(&c, "ec-4p2g1").await;
    let a = ec.array_create(None, None).await.unwrap();
    let (k, p, cell) = a.object().ec_geometry().unwrap();
    let stripe = (k as u64 * cell) as usize;
    a.write(0, Bytes::from(pattern(1, stripe))).await.unwrap();
    let shards = chunk0_shards(&c, &a).await;
    let dkey = 0u64.to_be_bytes();
    let cont_id = ec.info().uuid;

    // Writer X reads every cell of stripe 0 for a read-modify-write...
    let mut seen = Vec::new();
    let mut data = Vec::new();
    for (j, (addr, target)) in shards.iter().enumerate() {
        let raw = shoal_client::ServerClient::tcp(addr.clone());
        let kind = ValueKind::Array { rec_size: 1, start: 0, nr: cell };
        let r = raw
            .fetch(*target, cont_id, a.oid(), &dkey, EPOCH_MAX, vec![FetchIod { akey: b"data".to_vec(), kind }])
            .await
            .unwrap();
        let Fetched::Array { epoch, .. } = r[0].0 else { panic!("{:?}", r[0].0) };
        seen.push(epoch);
        if j < k as usize {
            data.extend_from_slice(&r[0].1);
        }
    }
    data[0..10].copy_from_slice(b"XXXXXXXXXX");
    // ...and stalls, past its lock's lease, while writer Y rewrites bytes
    // 1000..2000 of the stripe and is acknowledged.
    a.write(1000, Bytes::from(pattern(7, 1000))).await.unwrap();

    // X wakes and sends its stripe, each cell on the condition that the
    // shard still holds what X read. Every shard refuses it.
    let codec = shoal_client::ec::codec(k, p).unwrap();
    let cells: Vec<&[u8]> = data.chunks(cell as usize).collect();
    let parity = codec.encode(&cells).unwrap();
    let all: Vec<Bytes> =
        cells.iter().map(|c| Bytes::copy_from_slice(c)).chain(parity.into_iter().map(Bytes::from)).collect();
    for (j, (addr, target)) in shards.iter().enumerate() {
        let raw = shoal_client::ServerClient::tcp(addr.clone());
        let kind = ValueKind::Array { rec_size: 1, start: 0, nr: cell };
        let mut iod = UpdateIod::new(b"data", kind, &all[j]);
        iod.cond = Some(seen[j]);
        let r = raw.update(*target, cont_id, a.oid(), &dkey, vec![iod], vec![all[j].clone()]).await;
        assert!(matches!(r, Err(ShoalError::Conflict { .. })), "shard {j} took a stale rewrite: {r:?}");
    }
    let mut want = pattern(1, stripe);
    want[1000..2000].copy_from_slice(&pattern(7, 1000));
    assert!(a.read(0, stripe as u64).await.unwrap() == want[..], "Y's acknowledged bytes must stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_partial_write_frees_its_stripes_at_once() {
    let (_tmp, cluster) = setup(6).await;
    let c = cluster.client().await.unwrap();
    let ec = cont(&c, "ec-4p2g1").await;
    let a = ec.array_create(None, None).await.unwrap();
    a.write(0, Bytes::from(pattern(1, 64 << 10))).await.unwrap();
    // An unaligned 32 MiB write: it locks its first and last stripes, then
    // moves data for a while; it is cancelled in the middle.
    let big = Bytes::from(pattern(2, 32 << 20));
    let r = tokio::time::timeout(Duration::from_millis(30), a.write(100, big)).await;
    assert!(r.is_err(), "the write was meant to be cut short");
    // Another client's partial write of the first stripe does not wait for
    // the cancelled writer's lease (10 s) to run out.
    let other = cluster.client().await.unwrap();
    let b = cont(&other, "ec-4p2g1").await.array_open(a.oid()).await.unwrap();
    let t = Instant::now();
    b.write(50, Bytes::from(pattern(3, 10))).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "waited {:?} for a cancelled writer's lock", t.elapsed());
    assert!(b.read(50, 10).await.unwrap() == pattern(3, 10)[..]);
}
