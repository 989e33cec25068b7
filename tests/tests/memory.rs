//! Reading arrays far larger than memory: a 100 GiB sparse one and a
//! 4 GiB dense one stream with the client's memory bounded by the chunks
//! in flight, never by the range. The peak resident set is printed.

use bytes::Bytes;
use futures::TryStreamExt;
use shoal_common::mgmt::ContProps;
use shoal_tests::TestCluster;
use tokio::io::AsyncReadExt;

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resets the peak resident set (VmHWM) to the current one.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// The byte at `offset` of the dense array: one value per MiB.
fn dense_byte(offset: u64) -> u8 {
    ((offset >> 20) % 251) as u8 + 1
}

const BOUND_MIB: u64 = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_huge_arrays_keeps_memory_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 3, 1).await.unwrap();
    let props = ContProps { oclass: Some("S1".into()), ..Default::default() };
    let (_, _, cont) = shoal_tests::tank(&cluster, props).await;

    // 100 GiB, all of it a hole but the last byte.
    let sparse = cont.array_create(None, None).await.unwrap();
    sparse.write(100 << 30, Bytes::from_static(b"!")).await.unwrap();
    reset_peak();
    let base = status_kib("VmRSS:");
    let t = std::time::Instant::now();
    let mut pieces = std::pin::pin!(sparse.stream(0, u64::MAX));
    let (mut total, mut last) = (0u64, 0u8);
    while let Some(p) = pieces.try_next().await.unwrap() {
        total += p.len() as u64;
        if let Some(&b) = p.last() {
            last = b;
        }
    }
    let peak = status_kib("VmHWM:").saturating_sub(base) >> 10;
    eprintln!("streamed a 100 GiB sparse array in {:?}; peak resident set grew {peak} MiB", t.elapsed());
    assert_eq!((total, last), ((100 << 30) + 1, b'!'));
    assert!(peak < BOUND_MIB, "{peak} MiB");
    // Past the end there is nothing, and read_into says how much it read.
    let mut buf = vec![0u8; 16];
    assert_eq!(sparse.read_into((100 << 30) - 2, &mut buf).await.unwrap(), 3);
    assert_eq!(&buf[..3], b"\0\0!");
    assert_eq!(sparse.read_into(200 << 30, &mut buf).await.unwrap(), 0);

    // 4 GiB, every byte written, read back through `reader`.
    let dense = cont.array_create(None, None).await.unwrap();
    const STEP: u64 = 64 << 20;
    for at in (0..4u64 << 30).step_by(STEP as usize) {
        let piece: Vec<u8> =
            (0..STEP).step_by(1 << 20).flat_map(|o| std::iter::repeat_n(dense_byte(at + o), 1 << 20)).collect();
        dense.write(at, Bytes::from(piece)).await.unwrap();
    }
    reset_peak();
    let base = status_kib("VmRSS:");
    let t = std::time::Instant::now();
    let mut reader = std::pin::pin!(dense.reader(0, u64::MAX));
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0u64;
    loop {
        let n = reader.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        for (i, &b) in buf[..n].iter().enumerate().step_by(4096) {
            assert_eq!(b, dense_byte(at + i as u64), "byte {}", at + i as u64);
        }
        at += n as u64;
    }
    let peak = status_kib("VmHWM:").saturating_sub(base) >> 10;
    eprintln!("streamed a 4 GiB dense array in {:?}; peak resident set grew {peak} MiB", t.elapsed());
    assert_eq!(at, 4 << 30);
    assert!(peak < BOUND_MIB, "{peak} MiB");

    // 1 GiB written from a reader, as from a file, at an unaligned offset.
    let from = cont.array_create(None, None).await.unwrap();
    reset_peak();
    let base = status_kib("VmRSS:");
    let t = std::time::Instant::now();
    let n = from.write_from(5, tokio::io::repeat(7).take(1 << 30)).await.unwrap();
    let peak = status_kib("VmHWM:").saturating_sub(base) >> 10;
    eprintln!("wrote 1 GiB from a reader in {:?}; peak resident set grew {peak} MiB", t.elapsed());
    assert_eq!((n, from.size().await.unwrap()), (1 << 30, (1 << 30) + 5));
    assert!(peak < BOUND_MIB, "{peak} MiB");
    let mut head = [0u8; 8];
    assert_eq!(from.read_into(0, &mut head).await.unwrap(), 8);
    assert_eq!(head, [0, 0, 0, 0, 0, 7, 7, 7]);
    let tail = from.read((1 << 30) + 1, 10).await.unwrap();
    assert_eq!(&tail[..], &[7, 7, 7, 7]);
}
