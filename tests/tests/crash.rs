//! Crash consistency: acknowledged writes survive SIGKILL, and a corrupted
//! data file yields a checksum error, never wrong bytes.

use std::sync::Arc;

use bytes::Bytes;
use shoal_common::msg::{FetchIod, Fetched, UpdateIod, ValueKind};
use shoal_common::{ContId, Oid, ShoalError, EPOCH_MAX};
use shoal_tests::{pattern, TestServer};
use tokio::sync::Mutex;

const CONT: ContId = ContId(42);

/// What one acknowledged write put where.
#[derive(Clone, Debug)]
struct Acked {
    target: u32,
    oid: Oid,
    dkey: Vec<u8>,
    kind: ValueKind,
    seed: u64,
    len: usize,
}

fn shape(i: u64) -> (ValueKind, usize) {
    match i % 4 {
        0 => (ValueKind::Single, 100),
        1 => (ValueKind::Single, 9000),
        2 => (ValueKind::Array { rec_size: 1, start: (i * 7919) % 4096, nr: 1 << 20 }, 1 << 20),
        _ => (ValueKind::Array { rec_size: 4, start: 10, nr: 3000 }, 12000),
    }
}

async fn check(srv: &TestServer, acked: &[Acked]) {
    let c = srv.client();
    for a in acked {
        let r = c
            .fetch(a.target, CONT, a.oid, &a.dkey, EPOCH_MAX, vec![FetchIod { akey: b"v".to_vec(), kind: a.kind }])
            .await
            .unwrap_or_else(|e| panic!("fetch {a:?}: {e}"));
        assert!(!matches!(r[0].0, Fetched::Missing), "acknowledged write lost: {a:?}");
        assert_eq!(r[0].1.len(), a.len);
        assert!(r[0].1 == pattern(a.seed, a.len), "wrong bytes for {a:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let mut srv = TestServer::start(&tmp.path().join("s0"), 2).await.unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let c = Arc::new(srv.client());
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            // Each writer writes until the server dies (bounded count).
            for i in 0..400u64 {
                let seed = w * 1000 + i;
                let (kind, len) = shape(seed);
                let a = Acked {
                    target: (seed % 2) as u32,
                    oid: Oid::new(0, w),
                    dkey: format!("k{i}").into_bytes(),
                    kind,
                    seed,
                    len,
                };
                let data = Bytes::from(pattern(seed, len));
                let iods = vec![UpdateIod::new(b"v", kind, &data)];
                match c.update(a.target, CONT, a.oid, &a.dkey, iods, vec![data]).await {
                    Ok(_) => acked.lock().await.push(a),
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill once a fair number of writes are acknowledged.
    loop {
        if acked.lock().await.len() >= 60 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    srv.kill9();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().await.clone();
    assert!(acked.len() >= 60);
    srv.restart().await.unwrap();
    check(&srv, &acked).await;
    // A second crash right after replay loses nothing either.
    srv.restart().await.unwrap();
    check(&srv, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_data_file_reads_as_a_checksum_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s0");
    let mut srv = TestServer::start(&dir, 1).await.unwrap();
    let c = srv.client();
    let kind = ValueKind::Array { rec_size: 1, start: 0, nr: 65536 };
    let (bad, good) = (Bytes::from(pattern(1, 65536)), Bytes::from(pattern(2, 65536)));
    c.update(0, CONT, Oid::new(0, 1), b"bad", vec![UpdateIod::new(b"v", kind, &bad)], vec![bad]).await.unwrap();
    c.update(0, CONT, Oid::new(0, 2), b"good", vec![UpdateIod::new(b"v", kind, &good)], vec![good]).await.unwrap();
    assert_eq!(srv.terminate().unwrap().code(), Some(0), "SIGTERM exits cleanly");

    // The first extent sits at the start of the first data file.
    let file = dir.join("target-0/data/00000000.dat");
    let mut raw = std::fs::read(&file).unwrap();
    raw[1000] ^= 0x5a;
    std::fs::write(&file, raw).unwrap();

    srv.restart().await.unwrap();
    let c = srv.client();
    let fetch = |oid: u64, dkey: &'static [u8]| {
        c.fetch(0, CONT, Oid::new(0, oid), dkey, EPOCH_MAX, vec![FetchIod { akey: b"v".to_vec(), kind }])
    };
    let r = fetch(1, b"bad").await;
    assert!(matches!(r, Err(ShoalError::Checksum(_))), "{r:?}");
    let good = fetch(2, b"good").await.unwrap();
    assert!(good[0].1 == pattern(2, 65536), "the intact extent still reads");
}
