//! Writes go on through server failures within a container's rd_fac: a
//! verifying writer runs while servers are SIGKILLed and SIGSTOPped; none
//! of its writes fails, every byte reads back, and past rd_fac writes fail
//! with a clear error while nothing wrong is ever read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_client::{Array, Client, Kv};
use shoal_common::mgmt::{ContProps, MemberState};
use shoal_common::placement::TargetState;
use shoal_common::{ErrorKind, ShoalError};
use shoal_tests::{pattern, TestCluster};
use tokio::sync::Mutex;

/// What the writer wrote: KV values, and per array its bytes.
#[derive(Default)]
struct Model {
    kv: BTreeMap<Vec<u8>, Vec<u8>>,
    arrays: Vec<Vec<u8>>,
}

struct Writer {
    kv: Kv,
    arrays: Vec<Array>,
    model: Arc<Mutex<Model>>,
}

impl Writer {
    /// One round of writes: a KV put, a partial-stripe write and a
    /// whole-chunk write per array. Returns the first error.
    async fn round(&self, i: u64) -> Result<(), ShoalError> {
        let key = format!("key-{}", i % 50).into_bytes();
        let val = pattern(i, 100 + (i as usize % 900));
        self.kv.put(&key, Bytes::from(val.clone())).await?;
        self.model.lock().await.kv.insert(key, val);
        for (n, a) in self.arrays.iter().enumerate() {
            let chunk = a.chunk_size() as usize;
            let (off, len) = if i.is_multiple_of(2) {
                ((i as usize * 777) % (4 * chunk), 3000)
            } else {
                (chunk * (i as usize % 4), chunk)
            };
            let data = pattern(i * 10 + n as u64, len);
            a.write(off as u64, Bytes::from(data.clone())).await?;
            let mut m = self.model.lock().await;
            let arr = &mut m.arrays[n];
            if arr.len() < off + len {
                arr.resize(off + len, 0);
            }
            arr[off..off + len].copy_from_slice(&data);
        }
        Ok(())
    }
}

/// The members, and a map from a rank to its server's index in `cluster`.
async fn ranks_to_servers(
    client: &Client,
    cluster: &TestCluster,
) -> (Vec<shoal_common::mgmt::Member>, impl Fn(u32) -> usize) {
    let members = client.system_query().await.unwrap().members;
    let addrs: Vec<String> = cluster.servers.iter().map(|s| s.addr.clone()).collect();
    let by_rank: BTreeMap<u32, usize> = members
        .iter()
        .map(|m| (m.rank, addrs.iter().position(|a| *a == m.addr).expect("a member of this cluster")))
        .collect();
    (members, move |rank: u32| by_rank[&rank])
}

/// Queries pool "tank" until `done` holds of it; fails once `limit` has
/// passed since `since`, saying `what`.
async fn wait_pool(
    client: &Client,
    since: Instant,
    limit: Duration,
    what: &str,
    done: impl Fn(&shoal_common::mgmt::PoolInfo) -> bool,
) -> shoal_common::mgmt::PoolInfo {
    loop {
        let p = client.pool_query("tank").await.unwrap();
        if done(&p) {
            return p;
        }
        assert!(since.elapsed() < limit, "{what}: {:?}", p.rebuild);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server is excluded and its shards are rebuilt.
fn excluded_and_rebuilt(p: &shoal_common::mgmt::PoolInfo) -> bool {
    p.map.targets.iter().any(|t| t.state == shoal_common::placement::TargetState::DownOut) && p.rebuilding.is_empty()
}

async fn verify(w: &Writer) {
    let m = w.model.lock().await;
    for (k, v) in &m.kv {
        assert_eq!(w.kv.get(k).await.unwrap().as_deref(), Some(&v[..]), "KV {k:?}");
    }
    for (a, want) in w.arrays.iter().zip(&m.arrays) {
        let got = a.read(0, want.len() as u64).await.unwrap();
        assert!(got == want[..], "array {} read back wrong", a.oid());
    }
}

/// Runs `writers` round after round from round `first`, in the
/// background, until the returned flag is set; the task returns how many
/// rounds it made. A failed write fails the test.
fn keep_writing(
    writers: Arc<Vec<Writer>>,
    first: u64,
) -> (Arc<std::sync::atomic::AtomicBool>, tokio::task::JoinHandle<u64>) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut i = first;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            for w in writers.iter() {
                w.round(i).await.unwrap_or_else(|e| panic!("write round {i} failed: {e}"));
            }
            i += 1;
        }
        i - first
    });
    (stop, task)
}

async fn writer(client: &Client, label: &str, class: &str) -> Writer {
    let pool = client.pool_connect("tank").await.unwrap();
    let props =
        ContProps { oclass: Some(class.into()), cell_size: 16 << 10, chunk_size: 128 << 10, ..Default::default() };
    pool.cont_create(label, props).await.unwrap();
    let cont = pool.cont_open(label).await.unwrap();
    let tolerated = class.parse::<shoal_common::oclass::ObjectClass>().unwrap().tolerated_failures();
    assert_eq!(cont.info().props.rd_fac, tolerated, "{class}: rd_fac follows the class");
    let kv = cont.kv_create(None).await.unwrap();
    let arrays = vec![cont.array_create(None, None).await.unwrap(), cont.array_create(None, None).await.unwrap()];
    let model = Arc::new(Mutex::new(Model { arrays: vec![Vec::new(); 2], ..Default::default() }));
    Writer { kv, arrays, model }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_through_failures_within_rd_fac() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(tmp.path(), 6, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let writers = Arc::new(vec![writer(&client, "rp", "RP_3GX").await, writer(&client, "ec", "EC_4P2G1").await]);
    for w in writers.iter() {
        w.round(0).await.unwrap();
    }
    // The writer runs throughout; every one of its writes must succeed.
    let (stop, task) = keep_writing(writers.clone(), 1);
    let rank_of =
        |addr: &str, q: &shoal_common::mgmt::SystemQueryReply| q.members.iter().find(|m| m.addr == addr).unwrap().rank;
    let q = client.system_query().await.unwrap();
    // First failure: a SIGKILL. Second: a SIGSTOP (alive but silent).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = rank_of(&cluster.servers[5].addr, &q);
    cluster.servers[5].kill9();
    let t = Instant::now();
    let deadline = t + Duration::from_secs(30);
    loop {
        let q = client.system_query().await.unwrap();
        if q.members.iter().find(|m| m.rank == first).unwrap().state == MemberState::Down {
            eprintln!("rank {first} declared down {:?} after its SIGKILL", t.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "rank {first} never declared down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = rank_of(&cluster.servers[4].addr, &q);
    cluster.servers[4].freeze();
    let t = Instant::now();
    loop {
        let q = client.system_query().await.unwrap();
        if q.members.iter().find(|m| m.rank == second).unwrap().state == MemberState::Down {
            eprintln!("rank {second} declared down {:?} after its SIGSTOP", t.elapsed());
            break;
        }
        assert!(Instant::now() < t + Duration::from_secs(30), "rank {second} never declared down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = task.await.unwrap();
    eprintln!("{rounds} write rounds, none failed, through two server failures");
    for w in writers.iter() {
        verify(w).await;
    }

    // A third failure is past rd_fac: writes to groups that lost three
    // shards fail with a clear error; nothing wrong is ever read.
    cluster.servers[3].kill9();
    let mut refused = 0;
    for (n, w) in writers.iter().enumerate() {
        for i in 0..4u64 {
            match w.round(10_000 + i).await {
                Ok(()) => {}
                Err(e) => {
                    assert!(e.kind() == ErrorKind::Unreachable, "{e}");
                    assert!(e.to_string().contains("survives only"), "writer {n}: unclear error: {e}");
                    refused += 1;
                    break;
                }
            }
        }
    }
    assert!(refused > 0, "three dead servers of six reach past rd_fac 2 somewhere");
    for w in writers.iter() {
        let m = w.model.lock().await;
        for (k, v) in &m.kv {
            match w.kv.get(k).await {
                Ok(got) => assert!(got.as_deref() == Some(&v[..]) || got.is_some(), "KV {k:?}"),
                Err(e) => assert!(e.kind() == ErrorKind::Unreachable, "{e}"),
            }
        }
    }
    // Three servers lost, rd_fac 2: once the MS has declared the third
    // down, the containers say they are UNCLEAN.
    let pool = client.pool_connect("tank").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h: Vec<_> = pool.cont_list().await.unwrap().into_iter().map(|c| c.health).collect();
        if h.iter().all(|h| *h == shoal_common::mgmt::Health::Unclean) {
            break;
        }
        assert!(Instant::now() < deadline, "containers still {h:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.servers[4].thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_redundancy_comes_back_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    // Eight servers: a 6-wide EC group still finds a spare after a loss.
    let mut cluster = TestCluster::start_with(tmp.path(), 8, 1, &["--exclude-after", "2s"]).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let mut writers = vec![writer(&client, "rp", "RP_3GX").await, writer(&client, "ec", "EC_4P2G1").await];
    writers.push(writer(&client, "ec1", "EC_2P1GX").await);
    for i in 0..12u64 {
        for w in &writers {
            w.round(i).await.unwrap();
        }
    }
    // One server dies; writes go on; it is excluded and its shards rebuilt.
    let q = client.system_query().await.unwrap();
    let victim = q.members.iter().find(|m| m.addr == cluster.servers[7].addr).unwrap().rank;
    cluster.servers[7].kill9();
    let t = Instant::now();
    for i in 12..16u64 {
        for w in &writers {
            w.round(i).await.unwrap();
        }
    }
    let deadline = t + Duration::from_secs(90);
    loop {
        let p = client.pool_query("tank").await.unwrap();
        let out =
            p.map.targets.iter().any(|t| t.rank == victim && t.state == shoal_common::placement::TargetState::DownOut);
        if out && p.rebuilding.is_empty() {
            eprintln!("full redundancy again {:?} after the SIGKILL (exclusion after 2s)", t.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "rebuild never finished: {:?}", p.rebuilding);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for w in &writers {
        verify(w).await;
    }
    // More servers die: each class is at its limit again (EC_2P1GX after
    // one, the others after two), and every byte still reads back, which
    // only the rebuilt shards make possible.
    cluster.servers[6].kill9();
    for w in &writers {
        verify(w).await;
    }
    cluster.servers[5].kill9();
    for w in &writers[..2] {
        verify(w).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_comes_back_is_rebuilt_and_serves_again() {
    use shoal_common::placement::TargetState;
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--exclude-after", "2s", "--metrics", "127.0.0.1:0"];
    let mut cluster = TestCluster::start_with(tmp.path(), 7, 1, &args).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let mut writers = vec![writer(&client, "rp", "RP_3GX").await, writer(&client, "ec", "EC_4P2G1").await];
    let q = client.system_query().await.unwrap();
    let back = q.members.iter().find(|m| m.addr == cluster.servers[6].addr).unwrap().rank;
    // An EC array whose one group includes the server that will go away
    // and come back (the last array of the EC writer).
    let ec = client.pool_connect("tank").await.unwrap().cont_open("ec").await.unwrap();
    let a = loop {
        let a = ec.array_create(None, None).await.unwrap();
        if a.object().layout().unwrap().groups[0].iter().any(|s| s.rank == back) {
            break a;
        }
    };
    writers[1].arrays.push(a);
    writers[1].model.lock().await.arrays.push(Vec::new());
    for i in 0..8u64 {
        for w in &writers {
            w.round(i).await.unwrap();
        }
    }
    // Reintegrating a server that is in service is refused.
    let err = client.reintegrate(None, back).await.unwrap_err();
    assert!(matches!(err, ShoalError::InvalidArgument(_)), "{err}");
    // It dies, misses writes, is excluded; then it comes back.
    cluster.servers[6].kill9();
    for i in 8..14u64 {
        for w in &writers {
            w.round(i).await.unwrap();
        }
    }
    let wait_until = |what: &'static str, f: fn(&shoal_common::mgmt::PoolInfo, u32) -> bool| {
        let client = client.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let p = client.pool_query("tank").await.unwrap();
                if f(&p, back) {
                    return;
                }
                assert!(Instant::now() < deadline, "{what} never happened: {:?}", p.map.targets);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    wait_until("exclusion and rebuild", |p, r| {
        p.rebuilding.is_empty() && p.map.targets.iter().any(|t| t.rank == r && t.state == TargetState::DownOut)
    })
    .await;
    cluster.servers[6].restart().await.unwrap();
    // Still excluded: it serves nothing of the pool until reintegrated.
    let p = client.pool_query("tank").await.unwrap();
    assert!(p.map.targets.iter().filter(|t| t.rank == back).all(|t| t.state == TargetState::DownOut));
    client.reintegrate(Some("tank"), back).await.unwrap();
    // It takes writes at once, while it is rebuilt.
    for i in 14..20u64 {
        for w in &writers {
            w.round(i).await.unwrap();
        }
    }
    wait_until("reintegration", |p, r| {
        p.rebuilding.is_empty() && p.map.targets.iter().filter(|t| t.rank == r).all(|t| t.state == TargetState::UpIn)
    })
    .await;
    let members = client.system_query().await.unwrap().members;
    assert_eq!(members.iter().find(|m| m.rank == back).unwrap().state, MemberState::Joined);
    // The spares its shards had give their copies back.
    let live: Vec<&shoal_tests::TestServer> = cluster.servers.iter().collect();
    wait_reclaimed(&live, 1).await;
    for w in &writers {
        verify(w).await;
    }
    // Two other servers of the EC array's group die (not the MS host): the
    // group reads only with the reintegrated server's cells, written
    // before, while and after it was away.
    let oid = writers[1].arrays[2].oid();
    let map = client.pool_query("tank").await.unwrap().placement();
    let class = shoal_common::oclass::oid_class(oid).unwrap();
    let group = map.layout(ec.info().uuid, oid, class).unwrap().groups[0].clone();
    assert!(group.iter().any(|s| s.rank == back && s.readable), "{group:?}");
    let ms_rank = members.iter().find(|m| m.addr == cluster.servers[0].addr).unwrap().rank;
    let doomed: Vec<u32> = group.iter().map(|s| s.rank).filter(|&r| r != back && r != ms_rank).take(2).collect();
    for r in doomed {
        let addr = &members.iter().find(|m| m.rank == r).unwrap().addr;
        cluster.servers.iter_mut().find(|s| &s.addr == addr).unwrap().kill9();
    }
    for w in &writers {
        verify(w).await;
    }
}

/// A write admitted under the old map, still running when rebuild starts
/// going through the objects, must reach the spare: rebuild waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_flight_when_rebuild_starts_is_not_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_with(tmp.path(), 5, 1, &["--exclude-after", "1s"]).await.unwrap();
    let props = ContProps { oclass: Some("RP_2G1".into()), ..Default::default() };
    let (client, _, cont) = shoal_tests::tank(&cluster, props).await;
    let (_, index_of) = ranks_to_servers(&client, &cluster).await;
    // A KV object on two servers, neither of them the MS's.
    let (kv, a, b, rank_a) = loop {
        let kv = cont.kv_create(None).await.unwrap();
        let g = kv.object().layout().unwrap().groups[0].clone();
        let (a, b) = (index_of(g[0].rank), index_of(g[1].rank));
        if a != 0 && b != 0 {
            break (kv, a, b, g[0].rank);
        }
    };
    // Server a holds updates of "stall..." dkeys for 8 s.
    cluster.servers[a].env = vec![("FAILPOINTS".into(), "service::stall_update=return(8000)".into())];
    cluster.servers[a].restart().await.unwrap();
    // Its restart may have had it declared down (a client's write missed
    // it) and excluded: it must be back in and rebuilt, or b's death below
    // would leave the object no copy.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = client.pool_query("tank").await.unwrap();
        let mine: Vec<TargetState> = p.map.targets.iter().filter(|t| t.rank == rank_a).map(|t| t.state).collect();
        if mine.iter().all(|s| *s == TargetState::UpIn) && p.rebuilding.is_empty() {
            break;
        }
        if mine.iter().any(|s| matches!(s, TargetState::Down | TargetState::DownOut)) {
            let _ = client.reintegrate(Some("tank"), rank_a).await;
        }
        assert!(Instant::now() < deadline, "server {a} never served again: {:?}", p.map.targets);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while kv.put(b"warm", Bytes::from_static(b"up")).await.is_err() {
        assert!(Instant::now() < deadline, "server {a} never served again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // b dies; the write goes to a (held there) and misses b, which is
    // excluded and rebuilt on a spare while the write is still running.
    cluster.servers[b].kill9();
    let t = Instant::now();
    kv.put(b"stall-1", Bytes::from_static(b"acknowledged")).await.unwrap();
    eprintln!("the held write was acknowledged after {:?}", t.elapsed());
    wait_pool(&client, t, Duration::from_secs(60), "rebuild never finished", excluded_and_rebuilt).await;
    // Only the spare holds the object now.
    cluster.servers[a].kill9();
    assert_eq!(kv.get(b"warm").await.unwrap().as_deref(), Some(&b"up"[..]));
    assert_eq!(kv.get(b"stall-1").await.unwrap().as_deref(), Some(&b"acknowledged"[..]));
}

/// The same for an erasure-coded write: the rebuild source decodes the
/// spare's cell from a peer whose cell of the write is still being
/// written; the peer makes the read wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ec_write_in_flight_on_a_peer_when_rebuild_starts_is_not_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_with(tmp.path(), 5, 1, &["--exclude-after", "1s"]).await.unwrap();
    let props = ContProps { oclass: Some("EC_2P1G1".into()), cell_size: 4096, chunk_size: 8192, ..Default::default() };
    let (client, _, cont) = shoal_tests::tank(&cluster, props).await;
    let (_, index_of) = ranks_to_servers(&client, &cluster).await;
    // Shard 0 is the rebuild source, shard 1 the peer, shard 2 dies; none
    // is the MS's server.
    let (array, source, peer, victim) = loop {
        let a = cont.array_create(None, None).await.unwrap();
        let g = a.object().layout().unwrap().groups[0].clone();
        let (source, peer, victim) = (index_of(g[0].rank), index_of(g[1].rank), index_of(g[2].rank));
        if source != 0 && peer != 0 && victim != 0 {
            break (a, source, peer, victim);
        }
    };
    let first = Bytes::from(pattern(1, 8192));
    array.write(0, first.clone()).await.unwrap();
    // The peer holds every update 8 s.
    cluster.servers[peer].env = vec![("FAILPOINTS".into(), "service::stall_update=return(8000:all)".into())];
    cluster.servers[peer].restart().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.system_query().await.unwrap().members.iter().any(|m| m.state != MemberState::Joined) {
        assert!(Instant::now() < deadline, "the peer never rejoined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.servers[victim].kill9();
    let second = Bytes::from(pattern(2, 8192));
    let t = Instant::now();
    array.write(0, second.clone()).await.unwrap();
    eprintln!("the held write was acknowledged after {:?}", t.elapsed());
    wait_pool(&client, t, Duration::from_secs(60), "rebuild never finished", excluded_and_rebuilt).await;
    // Lose the source: the stripe decodes from the peer and the spare.
    cluster.servers[source].kill9();
    assert!(array.read(0, 8192).await.unwrap() == second[..], "the acknowledged write was lost");
}

/// GETs `path` from a server's metrics endpoint; returns status line and body.
async fn scrape(server: &shoal_tests::TestServer, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = std::fs::read_to_string(server.dir.join("metrics.addr")).unwrap();
    let mut s = tokio::net::TcpStream::connect(addr.trim()).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample `name` (with its labels) in a scrape.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// Every server serves Prometheus metrics; they show requests, the MS's
/// view of target states, and rebuild passes, scraped over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_requests_target_states_and_rebuild() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--exclude-after", "1s", "--metrics", "127.0.0.1:0"];
    let mut cluster = TestCluster::start_with(tmp.path(), 4, 1, &args).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let pool = client.pool_connect("tank").await.unwrap();
    let props = ContProps { oclass: Some("RP_2G1".into()), ..Default::default() };
    pool.cont_create("c", props).await.unwrap();
    let kv = pool.cont_open("c").await.unwrap().kv_create(None).await.unwrap();
    for i in 0..20u32 {
        kv.put(&i.to_be_bytes(), Bytes::from(vec![7u8; 10_000])).await.unwrap();
    }
    let ms = &cluster.servers[0];
    let (status, body) = scrape(ms, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(sample(&body, "shoal_ms_members{state=\"joined\"}"), Some(4.0), "{body}");
    assert_eq!(sample(&body, "shoal_ms_targets{pool=\"tank\",state=\"UPIN\"}"), Some(4.0), "{body}");
    assert!(body.contains("shoal_rpc_latency_seconds_bucket{"), "{body}");
    assert!(sample(&body, "shoal_memory_budget_limit_bytes").unwrap() > 0.0);
    // Updates went to the object's two servers: their counts add up.
    let mut updates = 0.0;
    let mut received = 0.0;
    for s in &cluster.servers {
        let (_, b) = scrape(s, "/metrics").await;
        updates += sample(&b, "shoal_rpc_requests_total{op=\"update\"}").unwrap_or(0.0);
        received += sample(&b, "shoal_rpc_received_bytes_total{op=\"update\"}").unwrap_or(0.0);
    }
    assert!(updates >= 40.0, "{updates} updates counted");
    assert!(received >= 400_000.0, "{received} update bytes counted");
    assert!(scrape(ms, "/nothing").await.0.contains("404"));

    // A server dies: the MS's metrics show it excluded, and every survivor
    // counts its rebuild pass.
    let group = kv.object().layout().unwrap().groups[0].clone();
    let members = client.system_query().await.unwrap().members;
    let victim = group
        .iter()
        .filter_map(|s| {
            let addr = &members.iter().find(|m| m.rank == s.rank)?.addr;
            cluster.servers.iter().position(|x| &x.addr == addr)
        })
        .find(|&i| i != 0)
        .unwrap();
    cluster.servers[victim].kill9();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = scrape(&cluster.servers[0], "/metrics").await;
        let out = sample(&body, "shoal_ms_targets{pool=\"tank\",state=\"DOWNOUT\"}") == Some(1.0);
        if out && sample(&body, "shoal_ms_rebuilding_targets{pool=\"tank\"}") == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "never rebuilt: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut sent = 0.0;
    for (i, s) in cluster.servers.iter().enumerate().filter(|(i, _)| *i != victim) {
        let (_, b) = scrape(s, "/metrics").await;
        assert!(sample(&b, "shoal_rebuild_passes_total").unwrap_or(0.0) >= 1.0, "server {i}: {b}");
        sent += sample(&b, "shoal_rebuild_bytes_total").unwrap_or(0.0);
    }
    assert!(sent >= 200_000.0, "rebuild sent {sent} bytes");
}

/// A drained server keeps serving while its shards are copied to where
/// they go (and written there too); then it is out, and the pool still
/// survives two more failures: no moment had fewer copies than promised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_under_load_moves_every_shard_and_loses_no_redundancy() {
    use shoal_common::placement::TargetState;
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(tmp.path(), 7, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let writers = Arc::new(vec![writer(&client, "rp", "RP_3GX").await, writer(&client, "ec", "EC_4P2G1").await]);
    for i in 0..8u64 {
        for w in writers.iter() {
            w.round(i).await.unwrap();
        }
    }
    let (_, index_of) = ranks_to_servers(&client, &cluster).await;
    // A server holding a shard of the EC arrays, not the MS's.
    let ec_group = writers[1].arrays[0].object().layout().unwrap().groups[0].clone();
    let drained = ec_group.iter().map(|s| s.rank).find(|&r| index_of(r) != 0).unwrap();

    let (stop, task) = keep_writing(writers.clone(), 100);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    client.drain(Some("tank"), drained).await.unwrap();
    let mut saw_drain = false;
    loop {
        let p = client.pool_query("tank").await.unwrap();
        let mine: Vec<_> = p.map.targets.iter().filter(|t| t.rank == drained).map(|t| t.state).collect();
        saw_drain |= mine.contains(&TargetState::Drain);
        if mine.iter().all(|s| *s == TargetState::DownOut) && p.rebuilding.is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "the drain never finished: {mine:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("rank {drained} drained in {:?}", t.elapsed());
    assert!(saw_drain || t.elapsed() < Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = task.await.unwrap();
    eprintln!("{rounds} write rounds during the drain, none failed");
    for w in writers.iter() {
        verify(w).await;
    }
    // The drained server holds nothing needed; with it gone and two more
    // servers of the EC group dead (rd_fac 2), every byte still reads.
    cluster.servers[index_of(drained)].kill9();
    let now = writers[1].arrays[0].object().layout().unwrap().groups[0].clone();
    for s in now.iter().filter(|s| s.rank != drained && index_of(s.rank) != 0).take(2) {
        cluster.servers[index_of(s.rank)].kill9();
    }
    for w in writers.iter() {
        verify(w).await;
    }
    // A drained server cannot be drained again, and a drain that would
    // leave 6-wide groups nowhere to go is refused.
    assert!(client.drain(Some("tank"), drained).await.is_err());
}

/// Rebuild runs at the pace set, stops when told (and stays stopped), and
/// a server restarted meanwhile resumes where it was; then it finishes and
/// the rebuilt copies hold every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_can_be_paced_stopped_and_resumed() {
    use shoal_common::mgmt::RebuildState;
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_with(tmp.path(), 4, 1, &["--exclude-after", "1s"]).await.unwrap();
    let props = ContProps { oclass: Some("RP_2G1".into()), ..Default::default() };
    let (client, _, cont) = shoal_tests::tank(&cluster, props).await;
    // 96 objects of 512 KiB: each server is the source of several MiB.
    let mut kvs = Vec::new();
    for i in 0..96u64 {
        let kv = cont.kv_create(None).await.unwrap();
        kv.put(b"v", Bytes::from(pattern(i, 512 << 10))).await.unwrap();
        kvs.push(kv);
    }
    // 1 MiB/s per server: slow enough to watch.
    let ctl = client.rebuild_ctl("tank", None, Some(1)).await.unwrap();
    assert_eq!(ctl.rate_mib, 1);
    let (_, index_of) = ranks_to_servers(&client, &cluster).await;
    let victim = index_of(
        kvs[0].object().layout().unwrap().groups[0].iter().map(|s| s.rank).find(|&r| index_of(r) != 0).unwrap(),
    );
    cluster.servers[victim].kill9();
    let status = || async { client.pool_query("tank").await.unwrap().rebuild };
    let t = Instant::now();
    loop {
        if let Some(r) = status().await {
            if r.bytes > 0 {
                eprintln!("rebuilding: {r:?}");
                assert!(matches!(r.state, RebuildState::Pulling | RebuildState::Throttled | RebuildState::Scanning));
                assert!(r.objects_total > 0 && r.servers >= 3, "{r:?}");
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "rebuild never started: {:?}", status().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stopped: it says so, and nothing moves.
    client.rebuild_ctl("tank", Some(true), None).await.unwrap();
    let t = Instant::now();
    let stopped = loop {
        let r = status().await.expect("still rebuilding");
        if r.state == RebuildState::Paused && t.elapsed() > Duration::from_secs(2) {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never stopped: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = status().await.expect("still rebuilding");
    assert_eq!((later.bytes, later.objects_done), (stopped.bytes, stopped.objects_done), "a stopped rebuild moved");
    assert!(stopped.objects_done < stopped.objects_total, "{stopped:?}");
    // The survivors (the MS's too) restart quickly (not declared down,
    // same map): each resumes its pass where it stopped.
    for i in (0..4).filter(|&i| i != victim) {
        cluster.servers[i].terminate().unwrap();
        cluster.servers[i].restart().await.unwrap();
    }
    client.rebuild_ctl("tank", Some(false), Some(0)).await.unwrap();
    let t = Instant::now();
    let p = wait_pool(&client, t, Duration::from_secs(60), "rebuild never finished", excluded_and_rebuilt).await;
    assert!(p.rebuild.is_none());
    let resumed = (0..4).filter(|&i| i != victim).any(|i| {
        std::fs::read_to_string(cluster.servers[i].log_path()).unwrap().contains("rebuild resumes where it stopped")
    });
    assert!(resumed, "no restarted server resumed its pass");
    // The rebuilt copies are right: lose another server.
    let other = (1..4).find(|&i| i != victim).unwrap();
    cluster.servers[other].kill9();
    for (i, kv) in kvs.iter().enumerate() {
        assert!(kv.get(b"v").await.unwrap().unwrap() == pattern(i as u64, 512 << 10)[..], "object {i}");
    }
}

/// A spare given back when its server returns keeps that shard's cells;
/// when it later becomes the spare of another shard of the same group, the
/// rebuild there overwrites them version by version, and reads through it
/// give the new shard's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_reused_for_another_shard_never_mixes_their_cells() {
    use shoal_common::placement::TargetState;
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_with(tmp.path(), 5, 1, &["--exclude-after", "1s"]).await.unwrap();
    let props = ContProps { oclass: Some("EC_2P1G1".into()), cell_size: 4096, chunk_size: 8192, ..Default::default() };
    let (client, pool, cont) = shoal_tests::tank(&cluster, props).await;
    let (_, index_of) = ranks_to_servers(&client, &cluster).await;
    // An array whose group leaves out the MS's server.
    let array = loop {
        let a = cont.array_create(None, None).await.unwrap();
        if a.object().layout().unwrap().groups[0].iter().all(|s| index_of(s.rank) != 0) {
            break a;
        }
    };
    let group = array.object().layout().unwrap().groups[0].clone();
    let (h, e) = (index_of(group[0].rank), index_of(group[1].rank));
    let mut want = pattern(1, 64 << 10);
    array.write(0, Bytes::from(want.clone())).await.unwrap();
    let wait_rebuilt = |what: &'static str| {
        let client = client.clone();
        async move {
            let t = Instant::now();
            loop {
                let p = client.pool_query("tank").await.unwrap();
                if p.rebuilding.is_empty() && p.map.targets.iter().all(|t| t.state != TargetState::Down) {
                    break p;
                }
                assert!(t.elapsed() < Duration::from_secs(60), "{what} never finished");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Shard 0's server dies: its cells are rebuilt on a spare.
    cluster.servers[h].kill9();
    let t = Instant::now();
    while !client.pool_query("tank").await.unwrap().map.targets.iter().any(|t| t.state == TargetState::DownOut) {
        assert!(t.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_rebuilt("the first rebuild").await;
    pool.refresh().await.unwrap();
    let spare = array.object().layout().unwrap().groups[0][0];
    assert!(spare.spare);
    // It comes back and is rebuilt in place; the spare keeps shard 0's cells.
    cluster.servers[h].restart().await.unwrap();
    let t = Instant::now();
    while client.reintegrate(None, group[0].rank).await.is_err() {
        assert!(t.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_rebuilt("reintegration").await;
    // New data everywhere.
    want = pattern(2, 64 << 10);
    array.write(0, Bytes::from(want.clone())).await.unwrap();
    // Shard 1's server dies: its spare is the one shard 0 had.
    cluster.servers[e].kill9();
    let t = Instant::now();
    loop {
        let p = client.pool_query("tank").await.unwrap();
        if p.map.targets.iter().any(|t| t.rank == group[1].rank && t.state == TargetState::DownOut) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_rebuilt("the second rebuild").await;
    pool.refresh().await.unwrap();
    let now = array.object().layout().unwrap().groups[0].clone();
    let reused = now[1];
    eprintln!("first spare {spare:?}, second {reused:?}");
    assert_eq!((reused.rank, reused.target), (spare.rank, spare.target), "the scenario needs the spare reused");
    // Shard 2's server dies too: the stripe decodes from shard 0 and the
    // reused spare, which must give shard 1's cells, not shard 0's old ones.
    cluster.servers[index_of(group[2].rank)].kill9();
    assert!(array.read(0, want.len() as u64).await.unwrap() == want[..], "cells of two shards mixed");
}

/// Past rd_fac, `check` lists exactly the objects that cannot be read:
/// every object it lists fails to read, every other one reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_lists_exactly_the_objects_lost_past_rd_fac() {
    let tmp = tempfile::tempdir().unwrap();
    // Six servers: some object's two copies always avoid both the MS's
    // server and the name index's two.
    let mut cluster = TestCluster::start(tmp.path(), 6, 1).await.unwrap();
    let props = ContProps { oclass: Some("RP_2G1".into()), ..Default::default() };
    let (client, _, cont) = shoal_tests::tank(&cluster, props).await;
    let mut kvs = Vec::new();
    for i in 0..30u64 {
        let kv = cont.kv_create(None).await.unwrap();
        kv.put(b"k", Bytes::from(pattern(i, 100))).await.unwrap();
        cont.name_put(&format!("kv-{i}"), kv.oid()).await.unwrap();
        kvs.push(kv);
    }
    let clean = cont.check().await.unwrap();
    assert_eq!(clean.objects, 30 + 1, "30 KV objects and the name index: {clean:?}");
    assert!(clean.affected.is_empty() && clean.unasked.is_empty() && clean.names_read, "{clean:?}");
    // Two servers die (not the MS's, nor the name index's): past rd_fac 1
    // for the objects that had both copies there.
    let (members, index_of) = ranks_to_servers(&client, &cluster).await;
    let index_servers: Vec<usize> =
        cont.names().unwrap().object().layout().unwrap().groups[0].iter().map(|s| index_of(s.rank)).collect();
    // Both servers of one object's group, neither holding the name index.
    let victims: Vec<usize> = kvs
        .iter()
        .map(|kv| kv.object().layout().unwrap().groups[0].iter().map(|s| index_of(s.rank)).collect::<Vec<_>>())
        .find(|g| g.iter().all(|i| *i != 0 && !index_servers.contains(i)))
        .expect("an object whose copies avoid the MS's and the name index's servers");
    for &v in &victims {
        cluster.servers[v].kill9();
    }
    let t = Instant::now();
    while client.system_query().await.unwrap().members.iter().filter(|m| m.state == MemberState::Down).count() < 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "never declared down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = cont.check().await.unwrap();
    eprintln!("{} objects, {} affected, unasked {:?}", report.objects, report.affected.len(), report.unasked);
    assert!(!report.affected.is_empty(), "two of five servers hold both copies of some objects");
    assert!(report.names_read && report.objects == 31 && report.unasked.len() == 2, "{report:?}");
    assert!(report.affected.iter().all(|a| a.name.as_deref().is_some_and(|n| n.starts_with("kv-"))));
    let lost: std::collections::HashSet<_> = report.affected.iter().map(|a| a.oid).collect();
    for (i, kv) in kvs.iter().enumerate() {
        let r = kv.get(b"k").await;
        if lost.contains(&kv.oid()) {
            assert!(r.is_err(), "object {i} is listed as lost but reads: {r:?}");
        } else {
            assert_eq!(r.unwrap().unwrap(), pattern(i as u64, 100), "object {i}");
        }
    }
    // Salvage (through the CLI): what still reads goes to a new container,
    // with its names; what cannot be read is listed.
    let out = std::process::Command::new(shoal_tests::server_bin().with_file_name("shoal"))
        .args(["--ms", &cluster.ms(), "cont", "check", "tank", "c", "--salvage", "saved", "--json"])
        .env_remove("SHOAL_MS")
        .env_remove("SHOAL_CLUSTER")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Into another pool, on servers in service.
    let live: Vec<String> =
        members.iter().filter(|m| !victims.contains(&index_of(m.rank))).map(|m| m.rank.to_string()).collect();
    let out = std::process::Command::new(shoal_tests::server_bin().with_file_name("shoal"))
        .args(["--ms", &cluster.ms(), "pool", "create", "spare", "--ranks", &live.join(",")])
        .env_remove("SHOAL_MS")
        .env_remove("SHOAL_CLUSTER")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = s;
    let out = std::process::Command::new(shoal_tests::server_bin().with_file_name("shoal"))
        .args([
            "--ms",
            &cluster.ms(),
            "cont",
            "check",
            "tank",
            "c",
            "--salvage",
            "saved",
            "--to-pool",
            "spare",
            "--json",
        ])
        .env_remove("SHOAL_MS")
        .env_remove("SHOAL_CLUSTER")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["whole"].as_u64(), Some(30 - lost.len() as u64), "{s}");
    let not_copied = s["lost"].as_array().unwrap();
    assert_eq!(not_copied.len(), lost.len(), "{s}");
    let saved = client.pool_connect("spare").await.unwrap().cont_open("saved").await.unwrap();
    for (i, kv) in kvs.iter().enumerate() {
        let name = format!("kv-{i}");
        match saved.name_get(&name).await.unwrap() {
            Some(oid) => {
                assert!(!lost.contains(&kv.oid()), "{name} was lost, yet salvaged");
                let got = saved.kv_open(oid).await.unwrap().get(b"k").await.unwrap();
                assert_eq!(got.unwrap(), pattern(i as u64, 100), "{name}");
            }
            None => assert!(lost.contains(&kv.oid()), "{name} reads, yet was not salvaged"),
        }
    }
}

/// Past rd_fac, exclusion and rebuild must not turn lost data into empty
/// data: the spares of a group that kept no copy have nothing to copy
/// from, and reads of it keep failing with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_lost_past_rd_fac_reads_as_an_error_after_exclusion() {
    use shoal_common::placement::TargetState;
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_with(tmp.path(), 5, 1, &["--exclude-after", "1s"]).await.unwrap();
    let props = ContProps { oclass: Some("RP_2G1".into()), ..Default::default() };
    let (client, pool, cont) = shoal_tests::tank(&cluster, props).await;
    let (_, index_of) = ranks_to_servers(&client, &cluster).await;
    let (kv, victims) = loop {
        let kv = cont.kv_create(None).await.unwrap();
        let g: Vec<usize> = kv.object().layout().unwrap().groups[0].iter().map(|s| index_of(s.rank)).collect();
        if g.iter().all(|&i| i != 0) {
            break (kv, g);
        }
    };
    kv.put(b"k", Bytes::from_static(b"precious")).await.unwrap();
    for &v in &victims {
        cluster.servers[v].kill9();
    }
    // Both excluded; whatever the MS does with the rebuild, the value is
    // never read back as missing or empty.
    let t = Instant::now();
    wait_pool(&client, t, Duration::from_secs(60), "never excluded", |p| {
        p.map.targets.iter().filter(|t| t.state == TargetState::DownOut).count() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    pool.refresh().await.unwrap();
    let r = kv.get(b"k").await;
    assert!(r.is_err(), "a value whose every copy is gone read back as {r:?}");
    let p = client.pool_query("tank").await.unwrap();
    assert!(!p.rebuilding.is_empty(), "the pool claims full redundancy with data lost");
    let why = p.rebuild.and_then(|r| r.held_back).expect("pool query says why the rebuild waits");
    assert!(why.contains("accept-loss"), "{why}");
    // The operator accepts the loss: the rebuild finishes.
    assert!(client.rebuild_accept_loss("tank").await.unwrap().accept_loss);
    let t = Instant::now();
    while !client.pool_query("tank").await.unwrap().rebuilding.is_empty() {
        assert!(t.elapsed() < Duration::from_secs(30), "the rebuild never finished after accept-loss");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sum of a counter over every live server's metrics.
async fn sum_metric(servers: &[&shoal_tests::TestServer], name: &str) -> f64 {
    let mut total = 0.0;
    for s in servers {
        total += sample(&scrape(s, "/metrics").await.1, name).unwrap_or(0.0);
    }
    total
}

/// Waits until the servers have given back at least `bytes` of shards
/// that live elsewhere now.
async fn wait_reclaimed(servers: &[&shoal_tests::TestServer], bytes: u64) {
    let t = Instant::now();
    loop {
        let got = sum_metric(servers, "shoal_rebuild_reclaimed_bytes_total").await;
        if got >= bytes as f64 {
            eprintln!("{got} bytes of shards that moved given back after {:?}", t.elapsed());
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "only {got} bytes given back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A server back after a short outage is sent only what it missed (its
/// epochs tell what it has), not every shard it holds; what it has then
/// is right: with two other servers dead, every byte reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_back_from_a_short_outage_is_sent_only_what_it_missed() {
    use shoal_common::placement::TargetState;
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--exclude-after", "60s", "--metrics", "127.0.0.1:0"];
    let mut cluster = TestCluster::start_with(tmp.path(), 5, 1, &args).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let writers = vec![writer(&client, "rp", "RP_3GX").await, writer(&client, "ec", "EC_2P2G1").await];
    // 16 MiB of bulk that stays as it is, plus the writers' rounds.
    let bulk = client.pool_connect("tank").await.unwrap().cont_open("rp").await.unwrap();
    let mut arrays = Vec::new();
    for i in 0..16u64 {
        let a = bulk.array_create(None, None).await.unwrap();
        a.write(0, Bytes::from(pattern(1000 + i, 1 << 20))).await.unwrap();
        arrays.push(a);
    }
    for i in 0..6u64 {
        for w in &writers {
            w.round(i).await.unwrap();
        }
    }
    let (members, index_of) = ranks_to_servers(&client, &cluster).await;
    let back = members.iter().map(|m| m.rank).find(|&r| index_of(r) == 4).unwrap();
    cluster.servers[4].kill9();
    // It misses a little: about 1 MiB of new writes.
    for i in 6..14u64 {
        for w in &writers {
            w.round(i).await.unwrap();
        }
    }
    let p = client.pool_query("tank").await.unwrap();
    assert!(p.map.targets.iter().any(|t| t.rank == back && t.state == TargetState::Down), "{:?}", p.map);
    cluster.servers[4].restart().await.unwrap();
    client.reintegrate(Some("tank"), back).await.unwrap();
    let t = Instant::now();
    wait_pool(&client, t, Duration::from_secs(60), "resync", |p| {
        p.rebuilding.is_empty() && p.map.targets.iter().all(|t| t.state == TargetState::UpIn)
    })
    .await;
    eprintln!("rank {back} resynced in {:?}", t.elapsed());
    let live: Vec<&shoal_tests::TestServer> = cluster.servers.iter().collect();
    let sent = sum_metric(&live, "shoal_rebuild_bytes_total").await;
    let skipped = sum_metric(&live, "shoal_rebuild_skipped_versions_total").await;
    eprintln!("resync sent {sent} bytes and skipped {skipped} versions the server had");
    // It holds about 3/5 of the 16 MiB bulk: none of it is sent again.
    assert!(skipped >= 16.0, "{skipped} versions skipped");
    assert!(sent < 4.0 * 1048576.0, "resync sent {sent} bytes");
    assert!(sent > 0.0, "the writes it missed are sent");
    // Two other servers die (not the MS's): groups that held the returning
    // server's shards read from it, for data written before and during
    // its outage.
    let others: Vec<usize> = (1..4).take(2).collect();
    for &i in &others {
        cluster.servers[i].kill9();
    }
    for w in &writers {
        verify(w).await;
    }
    for (i, a) in arrays.iter().enumerate() {
        assert!(a.read(0, 1 << 20).await.unwrap() == pattern(1000 + i as u64, 1 << 20), "bulk array {i}");
    }
}

/// A pool on four of five servers (the fifth is `new`, to extend it
/// with), writers on RP_3GX and EC_2P2G1, and 24 bulk arrays of `size`
/// bytes (seeded from `seed`).
struct Extending {
    cluster: TestCluster,
    client: Client,
    new: u32,
    first: Vec<u32>,
    index: BTreeMap<u32, usize>,
    writers: Arc<Vec<Writer>>,
    bulk: shoal_client::Container,
    arrays: Vec<Array>,
    size: usize,
    seed: u64,
}

impl Extending {
    async fn start(dir: &std::path::Path, args: &[&str], size: usize, seed: u64) -> Extending {
        let cluster = TestCluster::start_with(dir, 5, 1, args).await.unwrap();
        let client = cluster.client().await.unwrap();
        let (members, index_of) = ranks_to_servers(&client, &cluster).await;
        let index: BTreeMap<u32, usize> = members.iter().map(|m| (m.rank, index_of(m.rank))).collect();
        let new = members.iter().map(|m| m.rank).find(|&r| index[&r] == 4).unwrap();
        let first: Vec<u32> = members.iter().map(|m| m.rank).filter(|&r| r != new).collect();
        client.pool_create("tank", first.clone(), 0).await.unwrap();
        let writers = Arc::new(vec![writer(&client, "rp", "RP_3GX").await, writer(&client, "ec", "EC_2P2G1").await]);
        let bulk = client.pool_connect("tank").await.unwrap().cont_open("rp").await.unwrap();
        let mut arrays = Vec::new();
        for i in 0..24u64 {
            let a = bulk.array_create(None, None).await.unwrap();
            a.write(0, Bytes::from(pattern(seed + i, size))).await.unwrap();
            arrays.push(a);
        }
        Extending { cluster, client, new, first, index, writers, bulk, arrays, size, seed }
    }

    /// Two of the pool's first servers die (not the MS's); every byte still
    /// reads back, shards that moved from the new server.
    async fn kill_two_and_verify(&mut self) {
        for r in self.first.iter().filter(|&&r| self.index[&r] != 0).take(2) {
            self.cluster.servers[self.index[r]].kill9();
        }
        for w in self.writers.iter() {
            verify(w).await;
        }
        for (i, a) in self.arrays.iter().enumerate() {
            let want = pattern(self.seed + i as u64, self.size);
            assert!(a.read(0, self.size as u64).await.unwrap() == want, "bulk array {i}");
        }
    }
}

/// `pool extend` under load: the new server's targets join once the
/// shards that move there (about its share) are copied; no write fails,
/// and the copies are right: with two original servers dead, every byte
/// reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extending_a_pool_moves_a_share_of_the_data_onto_the_new_server() {
    use shoal_common::placement::TargetState;
    let tmp = tempfile::tempdir().unwrap();
    let mut x = Extending::start(tmp.path(), &["--metrics", "127.0.0.1:0"], 256 << 10, 2000).await;
    let (client, new, writers) = (x.client.clone(), x.new, x.writers.clone());
    for i in 0..4u64 {
        for w in writers.iter() {
            w.round(i).await.unwrap();
        }
    }
    let (stop, task) = keep_writing(writers.clone(), 100);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let p = client.pool_extend("tank", vec![new]).await.unwrap();
    assert!(p.map.targets.iter().any(|t| t.rank == new && t.state == TargetState::New));
    assert!(p.rebuilding.iter().any(|&(r, _)| r == new), "the new server's targets join: {:?}", p.rebuilding);
    // Draining while the pool is being extended is refused.
    let busy = client.drain(Some("tank"), first_rank(&p, new)).await;
    let joined = wait_pool(&client, t, Duration::from_secs(90), "extension", |p| {
        p.rebuilding.is_empty() && p.map.targets.iter().all(|t| t.state == TargetState::UpIn)
    })
    .await;
    eprintln!("rank {new} joined in {:?}", t.elapsed());
    if let Err(e) = busy {
        assert!(e.to_string().contains("extended"), "{e}");
    }
    assert!(joined.map.targets.iter().any(|t| t.rank == new && t.added > 0));
    // Objects are not made wider than the servers the pool was created
    // with: a 5-wide class is refused on these 4 + 1.
    let err = x.bulk.array_create(Some("EC_4P1G1".parse().unwrap()), None).await.unwrap_err();
    assert!(err.to_string().contains("needs 5 fault domains"), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = task.await.unwrap();
    eprintln!("{rounds} write rounds during the extension, none failed");
    // The servers shards moved away from give their copies back.
    let live: Vec<&shoal_tests::TestServer> = x.cluster.servers.iter().collect();
    wait_reclaimed(&live, 3 * (256 << 10)).await;
    // The new server holds a share of the objects now.
    let placement = joined.placement();
    let cont = x.bulk.info().uuid;
    let on_new = x
        .arrays
        .iter()
        .filter(|a| {
            let class = shoal_common::oclass::oid_class(a.oid()).unwrap();
            placement.layout(cont, a.oid(), class).unwrap().groups[0].iter().any(|s| s.rank == new)
        })
        .count();
    eprintln!("{on_new} of {} bulk arrays have a shard on the new server", x.arrays.len());
    assert!(on_new >= 3, "{on_new} arrays moved");
    let usage = client.pool_connect("tank").await.unwrap().target_usage().await;
    let used = usage.iter().find(|(r, _, _)| *r == new).map(|(_, _, u)| u.as_ref().unwrap().data_bytes).unwrap();
    assert!(used >= 3 * (256 << 10), "the new server holds {used} bytes");
    for w in writers.iter() {
        verify(w).await;
    }
    x.kill_two_and_verify().await;
}

/// A rank of `p` other than `not`.
fn first_rank(p: &shoal_common::mgmt::PoolInfo, not: u32) -> u32 {
    p.map.targets.iter().map(|t| t.rank).find(|&r| r != not).unwrap()
}

/// A drain that would leave some object's shards nowhere to go (its class
/// is as wide as the servers left) does not finish, and says so in `pool
/// query`; reintegrating the server cancels it, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_cannot_finish_says_why_and_can_be_cancelled() {
    use shoal_common::placement::TargetState;
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 4, 1).await.unwrap();
    let props = ContProps { oclass: Some("RP_2G1".into()), ..Default::default() };
    let (client, _, cont) = shoal_tests::tank(&cluster, props).await;
    // 4 wide on 4 servers: once one is drained, its shards have nowhere to go.
    let wide = cont.array_create(Some("EC_2P2G1".parse().unwrap()), None).await.unwrap();
    let data = pattern(7, 300_000);
    wide.write(0, Bytes::from(data.clone())).await.unwrap();
    let (_, index_of) = ranks_to_servers(&client, &cluster).await;
    let rank = wide.object().layout().unwrap().groups[0].iter().map(|s| s.rank).find(|&r| index_of(r) != 0).unwrap();
    client.drain(Some("tank"), rank).await.unwrap();
    let t = Instant::now();
    let p = wait_pool(&client, t, Duration::from_secs(60), "a reason in pool query", |p| {
        p.rebuild.as_ref().and_then(|r| r.held_back.as_deref()).is_some_and(|w| w.contains("nowhere to go"))
    })
    .await;
    eprintln!("pool query says: {:?}", p.rebuild.unwrap().held_back);
    assert!(p.map.targets.iter().filter(|t| t.rank == rank).all(|t| t.state == TargetState::Drain));
    client.reintegrate(Some("tank"), rank).await.unwrap();
    let p = client.pool_query("tank").await.unwrap();
    assert!(p.rebuilding.is_empty() && p.map.targets.iter().all(|t| t.state == TargetState::UpIn), "{:?}", p.map);
    let wide = cont.array_open(wide.oid()).await.unwrap();
    assert!(wide.read(0, data.len() as u64).await.unwrap() == data);
}

/// A new server that dies while joining pauses the extension (no write
/// fails meanwhile); reintegrated, it joins, and every byte is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_pauses_while_the_joining_server_is_down() {
    use shoal_common::placement::TargetState;
    let tmp = tempfile::tempdir().unwrap();
    let mut x = Extending::start(tmp.path(), &["--exclude-after", "60s"], 512 << 10, 3000).await;
    let (client, new, writers) = (x.client.clone(), x.new, x.writers.clone());
    // Slow enough to catch it in the middle.
    client.rebuild_ctl("tank", None, Some(1)).await.unwrap();
    client.pool_extend("tank", vec![new]).await.unwrap();
    let t = Instant::now();
    wait_pool(&client, t, Duration::from_secs(30), "copying", |p| p.rebuild.as_ref().is_some_and(|r| r.bytes > 0))
        .await;
    x.cluster.servers[4].kill9();
    // Writes that reach it fail over: it is declared down, and the
    // extension pauses.
    for i in 0..8u64 {
        for w in writers.iter() {
            w.round(i).await.unwrap();
        }
    }
    let p = wait_pool(&client, t, Duration::from_secs(30), "pause", |p| p.rebuilding.is_empty()).await;
    assert!(p.map.targets.iter().filter(|t| t.rank == new).all(|t| t.state == TargetState::New), "{:?}", p.map);
    assert!(client.pool_extend("tank", vec![new]).await.is_err());
    x.cluster.servers[4].restart().await.unwrap();
    client.reintegrate(Some("tank"), new).await.unwrap();
    client.rebuild_ctl("tank", None, Some(0)).await.unwrap();
    for i in 8..12u64 {
        for w in writers.iter() {
            w.round(i).await.unwrap();
        }
    }
    wait_pool(&client, t, Duration::from_secs(90), "the extension", |p| {
        p.rebuilding.is_empty() && p.map.targets.iter().all(|t| t.state == TargetState::UpIn)
    })
    .await;
    eprintln!("rank {new} joined {:?} after the extension started, through its death", t.elapsed());
    for w in writers.iter() {
        verify(w).await;
    }
    x.kill_two_and_verify().await;
}

/// Pools share the servers' targets: giving back shards that live
/// elsewhere in one pool never touches another pool's objects, though
/// their layouts differ (single copies here, so any such loss shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_in_one_pool_leaves_other_pools_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start_with(tmp.path(), 4, 1, &["--metrics", "127.0.0.1:0"]).await.unwrap();
    let client = cluster.client().await.unwrap();
    let ranks: Vec<u32> = client.system_query().await.unwrap().members.iter().map(|m| m.rank).collect();
    let mut objects = Vec::new();
    for (name, on) in [("small", &ranks[..3]), ("big", &ranks[..])] {
        client.pool_create(name, on.to_vec(), 0).await.unwrap();
        let pool = client.pool_connect(name).await.unwrap();
        pool.cont_create("c", ContProps { oclass: Some("S1".into()), ..Default::default() }).await.unwrap();
        let cont = pool.cont_open("c").await.unwrap();
        for i in 0..32u64 {
            let a = cont.array_create(None, None).await.unwrap();
            a.write(0, Bytes::from(pattern(i, 10_000))).await.unwrap();
            objects.push((a, i));
        }
    }
    // Every server goes through each pool it is in (each at rest) once.
    let live: Vec<&shoal_tests::TestServer> = cluster.servers.iter().collect();
    let (_, index_of) = ranks_to_servers(&client, &cluster).await;
    let t = Instant::now();
    for &r in &ranks {
        let pools = if ranks[..3].contains(&r) { 2.0 } else { 1.0 };
        loop {
            let (_, body) = scrape(live[index_of(r)], "/metrics").await;
            if sample(&body, "shoal_rebuild_reclaim_passes_total").unwrap_or(0.0) >= pools {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no reclaim pass: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(sum_metric(&live, "shoal_rebuild_reclaimed_bytes_total").await, 0.0);
    for (a, i) in &objects {
        assert!(a.read(0, 10_000).await.unwrap() == pattern(*i, 10_000), "array {}", a.oid());
    }
}

/// A single-copy object (rd_fac 0) whose server was excluded takes writes
/// on its spare; when the server is reintegrated it gets those writes from
/// the spare before it serves, so no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_copy_object_keeps_what_its_spare_took_when_its_server_returns() {
    use shoal_common::placement::TargetState;
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_with(tmp.path(), 4, 1, &["--exclude-after", "1s"]).await.unwrap();
    let props = ContProps { oclass: Some("S1".into()), ..Default::default() };
    let (client, _, cont) = shoal_tests::tank(&cluster, props).await;
    let (_, index_of) = ranks_to_servers(&client, &cluster).await;
    // An array whose one shard is not on the MS's server.
    let array = loop {
        let a = cont.array_create(None, None).await.unwrap();
        if index_of(a.object().layout().unwrap().groups[0][0].rank) != 0 {
            break a;
        }
    };
    let home = array.object().layout().unwrap().groups[0][0].rank;
    array.write(0, Bytes::from(pattern(1, 100_000))).await.unwrap();
    cluster.servers[index_of(home)].kill9();
    let t = Instant::now();
    wait_pool(&client, t, Duration::from_secs(60), "exclusion", excluded_and_rebuilt).await;
    // Written while its server is out: to the spare.
    array.write(100_000, Bytes::from(pattern(2, 100_000))).await.unwrap();
    cluster.servers[index_of(home)].restart().await.unwrap();
    client.reintegrate(Some("tank"), home).await.unwrap();
    wait_pool(&client, t, Duration::from_secs(60), "reintegration", |p| {
        p.rebuilding.is_empty() && p.map.targets.iter().all(|t| t.state == TargetState::UpIn)
    })
    .await;
    let got = array.read(0, 200_000).await.unwrap();
    assert!(got[..100_000] == pattern(1, 100_000), "written before the failure");
    assert!(got[100_000..] == pattern(2, 100_000), "written to the spare while the server was out");
}
