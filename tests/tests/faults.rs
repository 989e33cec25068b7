//! Faults from the outside: frozen servers, bad copies, bits flipped on the
//! wire and in a server's memory, keys too big for one list page, a flood
//! of large writes against one server's memory, destroyed containers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use shoal_client::{Client, Container};
use shoal_common::mgmt::ContProps;
use shoal_common::msg::{FetchIod, ValueKind};
use shoal_common::wire::{frame_len, FLAG_REPLY};
use shoal_common::{ShoalError, EPOCH_MAX};
use shoal_tests::{pattern, TestCluster, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn container(client: &Client, label: &str, class: &str) -> Container {
    let pool = client.pool_connect("tank").await.unwrap();
    let props = ContProps { oclass: Some(class.into()), ..ContProps::default() };
    pool.cont_create(label, props).await.unwrap();
    pool.cont_open(label).await.unwrap()
}

/// The index in `cluster.servers` of the server with `rank`.
async fn server_of(cluster: &TestCluster, client: &Client, rank: u32) -> usize {
    let members = client.system_query().await.unwrap().members;
    let addr = &members.iter().find(|m| m.rank == rank).unwrap().addr;
    cluster.servers.iter().position(|s| &s.addr == addr).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_is_found_out_within_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 3, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    // An object whose first replica is not on the MS's server (server 0).
    // Objects of one class in one container start at one ring position, so
    // the container is what varies.
    let ms_rank = client.system_query().await.unwrap().members.iter().find(|m| m.addr == cluster.ms()).unwrap().rank;
    let key = b"key".to_vec();
    let mut attempt = 0;
    let kv = loop {
        let cont = container(&client, &format!("c{attempt}"), "RP_3G1").await;
        let kv = cont.kv_create(None).await.unwrap();
        if kv.object().layout().unwrap().dkey_shards(&key)[0].rank != ms_rank {
            break kv;
        }
        attempt += 1;
        assert!(attempt < 50, "every container put the first replica on the MS's server");
    };
    let layout = kv.object().layout().unwrap();
    kv.put(&key, Bytes::from_static(b"value")).await.unwrap();
    let victim = server_of(&cluster, &client, layout.dkey_shards(&key)[0].rank).await;

    // SIGSTOP: the process keeps its sockets and its kernel acknowledges
    // bytes, but nothing answers.
    cluster.servers[victim].freeze();
    let t = Instant::now();
    let got = kv.get(&key).await;
    let read_took = t.elapsed();
    let t = Instant::now();
    let put = kv.put(&key, Bytes::from_static(b"other")).await;
    let write_took = t.elapsed();
    cluster.servers[victim].thaw();

    assert_eq!(got.unwrap().as_deref(), Some(&b"value"[..]), "the read goes on to another replica");
    assert!(read_took < Duration::from_secs(10), "the read waited {read_took:?} for a frozen server");
    // The write goes on without the frozen replica (rd_fac 2), which is
    // declared down before the write is acknowledged.
    put.unwrap();
    assert!(write_took < Duration::from_secs(10), "the write waited {write_took:?} for a frozen server");
    let q = client.system_query().await.unwrap();
    let frozen_rank = layout.dkey_shards(&key)[0].rank;
    assert_eq!(q.members.iter().find(|m| m.rank == frozen_rank).unwrap().state, shoal_common::mgmt::MemberState::Down);
    assert_eq!(kv.get(&key).await.unwrap().as_deref(), Some(&b"other"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_reads_go_on_past_a_bad_copy_and_long_keys_list() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 3, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let cont = container(&client, "c", "RP_3G1").await;
    let kv = cont.kv_create(None).await.unwrap();
    let value = pattern(5, 64 << 10);
    kv.put(b"big", Bytes::from(value.clone())).await.unwrap();

    // Flip a byte of the first replica's copy on disk (the only large value
    // in that target's data file).
    let first = kv.object().layout().unwrap().dkey_shards(b"big")[0];
    let idx = server_of(&cluster, &client, first.rank).await;
    let file = cluster.servers[idx].dir.join(format!("target-{}/data/00000000.dat", first.target));
    let mut raw = std::fs::read(&file).unwrap();
    raw[100] ^= 0xff;
    std::fs::write(&file, raw).unwrap();
    let direct = cluster.servers[idx].client();
    let kind = ValueKind::Single;
    let r = direct
        .fetch(
            first.target,
            cont.info().uuid,
            kv.oid(),
            b"big",
            EPOCH_MAX,
            vec![FetchIod { akey: b"v".to_vec(), kind }],
        )
        .await;
    assert!(matches!(r, Err(ShoalError::Checksum(_))), "the first copy is bad: {r:?}");
    assert!(kv.get(b"big").await.unwrap().unwrap() == value[..], "the read goes on to a good replica");

    // 1,500 keys of 2 KiB: more than one reply body of keys, listed in pages.
    let keys = cont.kv_create(None).await.unwrap();
    let mut want = Vec::new();
    for i in 0..1500u32 {
        let mut k = format!("{i:06}-").into_bytes();
        k.resize(2048, b'k');
        want.push(k);
    }
    futures::future::try_join_all(want.iter().map(|k| keys.put(k, Bytes::from_static(b"v")))).await.unwrap();
    let mut got = keys.list().await.unwrap();
    got.sort();
    want.sort();
    assert_eq!(got.len(), want.len());
    assert!(got == want);
}

/// A TCP proxy that flips one bit of the next update's data (towards the
/// server) or of the next fetch reply's data (towards the client) when
/// told to.
struct Flipper {
    addr: String,
    upstream: Arc<std::sync::Mutex<String>>,
    flip_update: Arc<AtomicBool>,
    flip_reply: Arc<AtomicBool>,
}

async fn pump(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    flag: Arc<AtomicBool>,
    reply: bool,
) {
    let mut buf = BytesMut::new();
    loop {
        let n = match frame_len(&buf) {
            Ok(Some(n)) if buf.len() >= n => n,
            Ok(_) => {
                if rd.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        let mut frame = buf.split_to(n);
        let opcode = u16::from_le_bytes([frame[6], frame[7]]);
        let is_reply = frame[5] & FLAG_REPLY != 0;
        let payload = u32::from_le_bytes(frame[44..48].try_into().unwrap());
        let wanted = if reply { opcode == 3 && is_reply } else { opcode == 2 && !is_reply };
        if wanted && payload > 0 && flag.swap(false, Ordering::SeqCst) {
            let last = frame.len() - 1;
            frame[last] ^= 0x10;
        }
        if wr.write_all(&frame).await.is_err() {
            return;
        }
    }
}

async fn flipper() -> Flipper {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let f = Flipper {
        addr: l.local_addr().unwrap().to_string(),
        upstream: Arc::default(),
        flip_update: Arc::default(),
        flip_reply: Arc::default(),
    };
    let (up, fu, fr) = (f.upstream.clone(), f.flip_update.clone(), f.flip_reply.clone());
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let target = up.lock().unwrap().clone();
            let Ok(s) = TcpStream::connect(target).await else { continue };
            let (cr, cw) = c.into_split();
            let (sr, sw) = s.into_split();
            tokio::spawn(pump(cr, sw, fu.clone(), false));
            tokio::spawn(pump(sr, cw, fr.clone(), true));
        }
    });
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bits_flipped_on_the_wire_or_in_server_memory_are_caught_never_stored() {
    let tmp = tempfile::tempdir().unwrap();
    // Two servers, each reached through its own bit-flipping proxy.
    let (p0, p1) = (flipper().await, flipper().await);
    let s0 =
        TestServer::start_with(&tmp.path().join("s0"), 1, vec!["--ms".into(), "--advertise".into(), p0.addr.clone()])
            .await
            .unwrap();
    *p0.upstream.lock().unwrap() = s0.addr.clone();
    let s1 = TestServer::start_with(
        &tmp.path().join("s1"),
        1,
        vec!["--ms-addr".into(), s0.addr.clone(), "--advertise".into(), p1.addr.clone()],
    )
    .await
    .unwrap();
    *p1.upstream.lock().unwrap() = s1.addr.clone();
    let client = Client::connect(vec![s0.addr.clone()]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.system_query().await.unwrap().members.len() < 2 {
        assert!(Instant::now() < deadline, "second server never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.pool_create("tank", vec![], 0).await.unwrap();
    let cont = container(&client, "c", "RP_2G1").await;
    let kv = cont.kv_create(None).await.unwrap();

    // A bit flipped on the way to a server: refused there, sent again.
    let value = pattern(9, 10_000);
    p0.flip_update.store(true, Ordering::SeqCst);
    p1.flip_update.store(true, Ordering::SeqCst);
    kv.put(b"k", Bytes::from(value.clone())).await.unwrap();
    assert!(!p0.flip_update.load(Ordering::SeqCst) && !p1.flip_update.load(Ordering::SeqCst), "both flips happened");
    let caught = client.stats().checksum_errors;
    assert!(caught >= 2, "the damaged copies were refused ({caught})");
    // What each server stored is the right value.
    for s in [&s0, &s1] {
        let r = s
            .client()
            .fetch(
                0,
                cont.info().uuid,
                kv.oid(),
                b"k",
                EPOCH_MAX,
                vec![FetchIod { akey: b"v".to_vec(), kind: ValueKind::Single }],
            )
            .await
            .unwrap();
        assert!(r[0].1 == value[..], "a server stored damaged bytes");
    }

    // A bit flipped on the way back: caught, read from the other replica.
    p0.flip_reply.store(true, Ordering::SeqCst);
    p1.flip_reply.store(true, Ordering::SeqCst);
    assert!(kv.get(b"k").await.unwrap().unwrap() == value[..]);
    assert!(client.stats().checksum_errors > caught, "the damaged reply was counted");
    drop((s0, s1));

    // A bit flipped in a server's memory after it received the value
    // (failpoint `store::flip_bit`, once): refused, sent again, never stored.
    let s2 = TestServer::start_env(
        &tmp.path().join("s2"),
        1,
        vec!["--ms".into()],
        vec![("FAILPOINTS".into(), "store::flip_bit=1*return".into())],
    )
    .await
    .unwrap();
    let client = Client::connect(vec![s2.addr.clone()]).await.unwrap();
    joined(&client).await;
    client.pool_create("tank", vec![], 0).await.unwrap();
    let cont = container(&client, "c", "S1").await;
    let kv = cont.kv_create(None).await.unwrap();
    kv.put(b"k", Bytes::from(value.clone())).await.unwrap();
    assert_eq!(client.stats().checksum_errors, 1, "the flip was caught once");
    assert!(kv.get(b"k").await.unwrap().unwrap() == value[..]);
}

/// Waits until the lone server of a system has joined its own MS.
async fn joined(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.system_query().await.unwrap().members.is_empty() {
        assert!(Instant::now() < deadline, "the server never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_writes_stays_within_the_servers_frame_budget() {
    const BUDGET: u64 = 160 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let srv = TestServer::start_with(
        &tmp.path().join("s0"),
        2,
        vec!["--ms".into(), "--frame-budget".into(), format!("{BUDGET}B")],
    )
    .await
    .unwrap();
    let pid = srv.pid().unwrap();
    let rss = |field: &str| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = s.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() << 10
    };
    let admin = Client::connect(vec![srv.addr.clone()]).await.unwrap();
    joined(&admin).await;
    admin.pool_create("tank", vec![], 0).await.unwrap();
    let cont = container(&admin, "c", "S1").await;
    let oid = cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await.unwrap();
    let base = rss("VmRSS:");

    // 32 clients, each with 64 writes of 512 KiB in flight: 1 GiB asked of
    // a server with a budget of 160 MiB. Everything succeeds (the senders
    // wait), and the server's memory stays within the budget.
    let data = Bytes::from(pattern(3, 512 << 10));
    let mut tasks = Vec::new();
    for c in 0..32u64 {
        let (addr, data) = (srv.addr.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(vec![addr]).await.unwrap();
            let cont = client.pool_connect("tank").await.unwrap().cont_open("c").await.unwrap();
            let obj = cont.object(oid).unwrap();
            let writes = (0..64u64).map(|i| {
                let (obj, data) = (obj.clone(), data.clone());
                async move { obj.write_extent(&(c * 64 + i).to_be_bytes(), b"d", 0, data).await }
            });
            futures::future::try_join_all(writes).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let peak = rss("VmHWM:");
    let overhead = 256 << 20;
    eprintln!(
        "frame budget {} MiB; server RSS before {} MiB, peak {} MiB (limit budget + {} MiB over the start)",
        BUDGET >> 20,
        base >> 20,
        peak >> 20,
        overhead >> 20
    );
    assert!(peak < base + BUDGET + overhead, "peak RSS {} MiB", peak >> 20);
    let pong = srv.client().ping().await.unwrap();
    assert_eq!(pong.frame_budget, BUDGET);
    let obj = cont.object(oid).unwrap();
    let back = obj.read_extent(&(31 * 64 + 63u64).to_be_bytes(), b"d", 0, 512 << 10, EPOCH_MAX).await.unwrap();
    assert!(back == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_versions_and_destroyed_containers_give_their_space_back() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster =
        TestCluster::start_with(tmp.path(), 1, 1, &["--aggregation-delay", "1s", "--aggregation-interval", "1s"])
            .await
            .unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let cont = container(&client, "c", "S1").await;
    let data_bytes = || async { cluster.servers[0].client().target_query(0).await.unwrap().data_bytes };
    let wait_below = |limit: u64, what: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let used = data_bytes().await;
            if used < limit {
                return used;
            }
            assert!(Instant::now() < deadline, "{what}: still {used} bytes in data files");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    // One MiB rewritten 40 times: 40 MiB in data files, until aggregation
    // keeps only the newest version.
    let a = cont.array_create(None, None).await.unwrap();
    for i in 0..40u64 {
        a.write(0, Bytes::from(pattern(i, 1 << 20))).await.unwrap();
    }
    assert!(data_bytes().await >= 40 << 20);
    let left = wait_below(4 << 20, "aggregation").await;
    eprintln!("after aggregation: {left} bytes in data files");
    assert!(a.read(0, 1 << 20).await.unwrap() == pattern(39, 1 << 20)[..], "the newest version stays");

    // A destroyed container: its space comes back, and an old handle's
    // writes are refused by the server.
    let b = cont.array_create(None, None).await.unwrap();
    b.write(0, Bytes::from(pattern(1, 16 << 20))).await.unwrap();
    client.pool_connect("tank").await.unwrap().cont_destroy("c").await.unwrap();
    wait_below(1 << 20, "container destroy").await;
    let r = b.write(0, Bytes::from_static(b"late")).await;
    assert!(matches!(r, Err(ShoalError::NotFound { .. })), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_coded_rewrites_give_their_space_back_once_confirmed() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster =
        TestCluster::start_with(tmp.path(), 3, 1, &["--aggregation-delay", "1s", "--aggregation-interval", "1s"])
            .await
            .unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let cont = container(&client, "c", "EC_2P1G1").await;
    let used = || async {
        let mut total = 0;
        for s in &cluster.servers {
            total += s.client().target_query(0).await.unwrap().data_bytes;
        }
        total
    };
    let a = cont.array_create(None, None).await.unwrap();
    for i in 0..20u64 {
        a.write(0, Bytes::from(pattern(i, 1 << 20))).await.unwrap();
    }
    let before = used().await;
    assert!(before >= 20 * (3 << 19), "{before}");
    // Every write reached all three cells and was marked stable, so all but
    // the newest stripe version go.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = used().await;
        if now < 4 << 20 {
            eprintln!("EC data files: {before} bytes before aggregation, {now} after");
            break;
        }
        assert!(Instant::now() < deadline, "still {now} bytes in data files");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(a.read(0, 1 << 20).await.unwrap() == pattern(19, 1 << 20)[..]);
}
