//! Multi-process cluster tests on loopback: six servers, every class
//! family, failures up to and past what each class tolerates, and
//! concurrent writers.

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use shoal_client::{Array, Client, Container, Kv};
use shoal_common::mgmt::ContProps;
use shoal_common::msg::{FetchIod, Fetched, ValueKind};
use shoal_common::oclass::{Groups, ObjectClass};
use shoal_common::{ErrorKind, ShoalError, EPOCH_MAX};
use shoal_tests::{pattern, TestCluster};

const CLASSES: [&str; 7] = ["S1", "SX", "RP_2G1", "RP_3GX", "EC_2P1G1", "EC_4P2G1", "EC_4P2GX"];

/// What one class's container holds, and what it should read back.
struct Written {
    class: ObjectClass,
    kv: Kv,
    kv_model: BTreeMap<Vec<u8>, Vec<u8>>,
    arrays: Vec<(Array, Vec<u8>)>,
}

async fn open_cont(client: &Client, class: &str) -> Container {
    let pool = client.pool_connect("tank").await.unwrap();
    let label = class.to_lowercase().replace('_', "-");
    let props =
        ContProps { oclass: Some(class.into()), cell_size: 16 << 10, chunk_size: 256 << 10, ..Default::default() };
    pool.cont_create(&label, props).await.unwrap();
    pool.cont_open(&label).await.unwrap()
}

/// Applies a write to the model and the array.
async fn write(a: &Array, model: &mut Vec<u8>, off: usize, data: Vec<u8>) {
    if model.len() < off + data.len() {
        model.resize(off + data.len(), 0);
    }
    model[off..off + data.len()].copy_from_slice(&data);
    a.write(off as u64, Bytes::from(data)).await.unwrap();
}

async fn fill(cont: &Container, class: ObjectClass, seed: u64) -> Written {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let kv = cont.kv_create(Some(class)).await.unwrap();
    let mut kv_model = BTreeMap::new();
    for i in 0..40 {
        let key = format!("key-{i}-{}", rng.random::<u32>()).into_bytes();
        let val = pattern(seed + i, rng.random_range(0..3000));
        kv.put(&key, Bytes::from(val.clone())).await.unwrap();
        kv_model.insert(key, val);
    }
    // Overwrite some and remove some.
    let keys: Vec<Vec<u8>> = kv_model.keys().cloned().collect();
    for k in keys.iter().step_by(7) {
        let val = pattern(seed ^ 0xabc, 100);
        kv.put(k, Bytes::from(val.clone())).await.unwrap();
        kv_model.insert(k.clone(), val);
    }
    for k in keys.iter().skip(3).step_by(11) {
        kv.remove(k).await.unwrap();
        kv_model.remove(k);
    }

    let mut arrays = Vec::new();
    // Aligned: whole chunks.
    let a = cont.array_create(Some(class), None).await.unwrap();
    let chunk = a.chunk_size() as usize;
    let mut m = Vec::new();
    write(&a, &mut m, 0, pattern(seed + 100, 3 * chunk)).await;
    arrays.push((a, m));
    // Unaligned, crossing chunks and stripes, with its own EC cell size.
    let a = cont.array_create_with(Some(class), None, Some(8192)).await.unwrap();
    let a = cont.array_open(a.oid()).await.unwrap();
    let mut m = Vec::new();
    write(&a, &mut m, 12_345, pattern(seed + 101, 700_001)).await;
    arrays.push((a, m));
    // Sparse: a hole in front and between.
    let a = cont.array_create(Some(class), None).await.unwrap();
    let mut m = Vec::new();
    write(&a, &mut m, 3 * chunk + 77, pattern(seed + 102, 5000)).await;
    write(&a, &mut m, 9 * chunk, pattern(seed + 103, 10)).await;
    arrays.push((a, m));
    // Overwrites, small and large, aligned and not.
    let a = cont.array_create(Some(class), None).await.unwrap();
    let mut m = Vec::new();
    write(&a, &mut m, 0, pattern(seed + 104, 2 * chunk + 999)).await;
    for (i, (off, len)) in
        [(5usize, 10usize), (chunk - 3, 7), (1000, chunk), (0, 1), (2 * chunk, 999)].into_iter().enumerate()
    {
        write(&a, &mut m, off, pattern(seed + 200 + i as u64, len)).await;
    }
    arrays.push((a, m));
    Written { class, kv, kv_model, arrays }
}

/// The most shards any group of `obj` has on `dead` ranks.
fn worst_group(obj: &shoal_client::Object, dead: &[u32]) -> usize {
    let layout = obj.layout().unwrap();
    layout.groups.iter().map(|g| g.iter().filter(|s| dead.contains(&s.rank)).count()).max().unwrap_or(0)
}

/// Reads everything back. Every read that succeeds must return exactly the
/// right bytes; an object whose every group keeps enough live shards must
/// read; one that fails must have lost a group, with a clear error.
/// Returns how many objects failed.
async fn verify(w: &Written, dead: &[u32]) -> usize {
    let t = w.class.tolerated_failures() as usize;
    let mut failed = 0;
    let mut fail = |obj: &shoal_client::Object, e: &ShoalError| {
        assert_clear(e);
        let worst = worst_group(obj, dead);
        assert!(worst > t, "{}: {} failed with only {worst} dead shards in a group: {e}", w.class, obj.oid());
        failed += 1;
    };
    let mut kv_failed = false;
    for (k, v) in &w.kv_model {
        match w.kv.get(k).await {
            Ok(got) => assert_eq!(got.as_deref(), Some(&v[..]), "{}: KV {k:?}", w.class),
            Err(e) => {
                fail(w.kv.object(), &e);
                kv_failed = true;
                break;
            }
        }
    }
    match w.kv.list().await {
        Ok(mut keys) => {
            keys.sort();
            assert_eq!(keys, w.kv_model.keys().cloned().collect::<Vec<_>>(), "{}: KV list", w.class);
        }
        Err(e) if kv_failed => assert_clear(&e),
        Err(e) => fail(w.kv.object(), &e),
    }
    for (a, m) in &w.arrays {
        let r = async {
            let size = a.size().await?;
            assert_eq!(size, m.len() as u64, "{}: array size", w.class);
            a.read(0, m.len() as u64).await
        }
        .await;
        match r {
            Ok(got) => assert!(got == m[..], "{}: array {} read back wrong", w.class, a.oid()),
            Err(e) => fail(a.object(), &e),
        }
    }
    failed
}

fn assert_clear(e: &ShoalError) {
    let s = e.to_string();
    assert!(
        matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Timeout) && s.contains("rank"),
        "unclear error: {s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_class_survives_what_it_tolerates_and_fails_clearly_past_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(tmp.path(), 6, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();

    let mut written = Vec::new();
    for (i, name) in CLASSES.iter().enumerate() {
        let cont = open_cont(&client, name).await;
        written.push(fill(&cont, name.parse().unwrap(), i as u64 * 1000).await);
    }
    for w in &written {
        assert_eq!(verify(w, &[]).await, 0, "{}: all healthy", w.class);
    }
    let members = client.system_query().await.unwrap().members;
    let rank_of = |addr: &str| members.iter().find(|m| m.addr == addr).unwrap().rank;

    // Kill servers from the last one (server 0 hosts the MS).
    let mut dead = Vec::new();
    let mut lost_past_tolerance = 0;
    for n in 1..=3usize {
        dead.push(rank_of(&cluster.servers[6 - n].addr));
        cluster.servers[6 - n].kill9();
        for w in &written {
            let failed = verify(w, &dead).await;
            eprintln!("dead={n} class={} failed={failed}", w.class);
            let t = w.class.tolerated_failures() as usize;
            if t >= n {
                assert_eq!(failed, 0, "{} tolerates {n} dead servers", w.class);
            }
            if w.class.groups == Groups::Fixed(1) {
                // One group holds all of an object: it is lost exactly
                // when that group lost more shards than the class spares.
                // Arrays live on the whole group; KV values of EC objects on
                // its first p + 1 shards only (copies, not cells).
                let arrays = w.arrays.iter().filter(|(a, _)| worst_group(a.object(), &dead) > t).count();
                let group = &w.kv.object().layout().unwrap().groups[0];
                let copies = group.len() - w.class.data_cells() as usize + 1;
                let copies = if w.class.parity_cells() > 0 { copies } else { group.len() };
                let kv_lost = group[..copies].iter().all(|sh| dead.contains(&sh.rank));
                let expected = arrays + kv_lost as usize;
                assert_eq!(failed, expected, "{} with ranks {dead:?} dead", w.class);
                lost_past_tolerance += failed;
            }
        }
    }
    // Three dead servers of six always take some single-group object past
    // its tolerance: the check above did see failures.
    assert!(lost_past_tolerance > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_leave_consistent_stripes() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 6, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let cont = open_cont(&client, "EC_4P2G1").await;
    let class: ObjectClass = "EC_4P2G1".parse().unwrap();

    // Many clients writing disjoint objects.
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let ms = cluster.ms();
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(vec![ms]).await.unwrap();
            let cont = c.pool_connect("tank").await.unwrap().cont_open("ec-4p2g1").await.unwrap();
            let a = cont.array_create(None, None).await.unwrap();
            let data = pattern(w, 600_000 + w as usize * 1000);
            a.write(0, Bytes::from(data.clone())).await.unwrap();
            (a.oid(), data)
        }));
    }
    for t in tasks {
        let (oid, data) = t.await.unwrap();
        let a = cont.array_open(oid).await.unwrap();
        assert!(a.read(0, data.len() as u64).await.unwrap() == data[..]);
    }

    // Parallel writes to one array: the size ends at the largest end, even
    // though the writes' epochs reach the servers out of order.
    let a = cont.array_create(None, None).await.unwrap();
    let writes = (0..32u64).map(|i| {
        let a = a.clone();
        async move { a.write(i * 100_000, Bytes::from(pattern(i, 100_000))).await }
    });
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    assert_eq!(a.size().await.unwrap(), 3_200_000);

    // Several clients writing the same region, aligned and not.
    let shared = cont.array_create(Some(class), None).await.unwrap();
    let (k, p, cell) = shared.object().ec_geometry().unwrap();
    let stripe = k as u64 * cell;
    let region = 8 * stripe;
    let mut tasks = Vec::new();
    for w in 1..=4u8 {
        let ms = cluster.ms();
        let oid = shared.oid();
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(vec![ms]).await.unwrap();
            let cont = c.pool_connect("tank").await.unwrap().cont_open("ec-4p2g1").await.unwrap();
            let a = cont.array_open(oid).await.unwrap();
            for round in 0..4u64 {
                // Odd rounds write one partial stripe in the middle.
                let (off, len) = if round % 2 == 0 { (0, region) } else { (stripe + 100, 1000) };
                a.write(off, Bytes::from(vec![w; len as usize])).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = shared.read(0, region).await.unwrap();
    for s in 0..8 {
        let st = &got[(s * stripe) as usize..((s + 1) * stripe) as usize];
        if s == 1 {
            // The partial writes land inside stripe 1: every byte comes
            // from some writer, and the bytes outside [100, 1100) from one.
            assert!(st.iter().all(|b| (1..=4).contains(b)));
            let outside: Vec<u8> = st[..100].iter().chain(&st[1100..]).copied().collect();
            assert!(outside.iter().all(|b| *b == outside[0]), "stripe 1 mixes writers outside the partial write");
        } else {
            assert!(st.iter().all(|b| *b == st[0]) && st[0] != 0, "stripe {s} mixes writers");
        }
    }

    // Parity on disk matches the data cells of every stripe.
    let pool = client.pool_connect("tank").await.unwrap();
    let addrs = pool.info().addrs;
    let layout = shared.object().layout().unwrap();
    let codec = shoal_client::ec::codec(k, p).unwrap();
    for (chunk, dkey) in (0..region.div_ceil(shared.chunk_size())).map(|c| (c, c.to_be_bytes())) {
        let group = layout.dkey_shards(&dkey);
        let stripes_in_chunk = shared.chunk_size() / stripe;
        for s in 0..stripes_in_chunk {
            if (chunk * stripes_in_chunk + s) * stripe >= region {
                break;
            }
            let mut cells = Vec::new();
            for sh in group {
                let addr = &addrs.iter().find(|(r, _)| *r == sh.rank).unwrap().1;
                let c = shoal_client::ServerClient::tcp(addr.clone());
                let kind = ValueKind::Array { rec_size: 1, start: s * cell, nr: cell };
                let r = c
                    .fetch(
                        sh.target,
                        cont.info().uuid,
                        shared.oid(),
                        &dkey,
                        EPOCH_MAX,
                        vec![FetchIod { akey: b"data".to_vec(), kind }],
                    )
                    .await
                    .unwrap();
                assert!(matches!(r[0].0, Fetched::Array { .. }));
                cells.push(r[0].1.to_vec());
            }
            let data: Vec<&[u8]> = cells[..k as usize].iter().map(Vec::as_slice).collect();
            assert_eq!(codec.encode(&data).unwrap(), cells[k as usize..].to_vec(), "parity of stripe {s}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_client_refreshes_its_pool_map_and_retries() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 4, 1).await.unwrap();
    let admin = cluster.client().await.unwrap();
    admin.pool_create("tank", vec![0, 1, 2], 0).await.unwrap();

    let client = cluster.client().await.unwrap();
    let pool = client.pool_connect("tank").await.unwrap();
    let props = ContProps { oclass: Some("RP_2G1".into()), ..Default::default() };
    pool.cont_create("c", props).await.unwrap();
    let cont = pool.cont_open("c").await.unwrap();
    let kv = cont.kv_create(None).await.unwrap();
    kv.put(b"k", Bytes::from_static(b"v1")).await.unwrap();
    assert_eq!(pool.info().map.version, 1);

    // The map changes behind the client's back.
    let p = admin.pool_extend("tank", vec![3]).await.unwrap();
    assert_eq!(p.map.version, 2);

    // Wait until every server of the pool has heard of version 2
    // (heartbeats).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for (rank, addr) in p.addrs.iter().filter(|(r, _)| *r < 3) {
        let raw = shoal_client::ServerClient::tcp(addr.clone()).with_pool(p.uuid, 1);
        loop {
            let iods = vec![FetchIod { akey: b"v".to_vec(), kind: ValueKind::Single }];
            let f = raw.fetch(0, cont.info().uuid, kv.oid(), b"k", EPOCH_MAX, iods).await;
            if matches!(f, Err(ShoalError::StaleMap { sent: 1, current: 2 })) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "rank {rank} never learnt map version 2: {f:?}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    // The stale client is refused, refreshes and retries by itself.
    kv.put(b"k", Bytes::from_static(b"v2")).await.unwrap();
    assert_eq!(kv.get(b"k").await.unwrap().as_deref(), Some(&b"v2"[..]));
    assert_eq!(pool.info().map.version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_and_object_calls_behave_like_their_docs() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 3, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let cont = open_cont(&client, "EC_2P1G1").await;

    // set_size: shrink, then grow: the cut-off bytes come back as zeros.
    let a = cont.array_create(None, None).await.unwrap();
    let chunk = a.chunk_size();
    let data = pattern(1, (3 * chunk + 500) as usize);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    a.set_size(chunk + 10).await.unwrap();
    assert_eq!(a.size().await.unwrap(), chunk + 10);
    assert!(a.read(0, 4 * chunk).await.unwrap() == data[..(chunk + 10) as usize]);
    a.set_size(2 * chunk).await.unwrap();
    let got = a.read(0, 2 * chunk).await.unwrap();
    assert!(got[..(chunk + 10) as usize] == data[..(chunk + 10) as usize]);
    assert!(got[(chunk + 10) as usize..].iter().all(|b| *b == 0));

    // punch: zeros in the middle, the size stays.
    a.punch(100, chunk).await.unwrap();
    let got = a.read(0, 2 * chunk).await.unwrap();
    assert!(got[..100] == data[..100] && got[100..(100 + chunk) as usize].iter().all(|b| *b == 0));
    assert_eq!(a.size().await.unwrap(), 2 * chunk);
    // Reads past the end stop at the size.
    assert_eq!(a.read(2 * chunk - 5, 100).await.unwrap().len(), 5);
    assert!(a.read(5 * chunk, 100).await.unwrap().is_empty());

    // Huge sizes cost nothing: only chunks holding data are touched.
    a.set_size(1 << 50).await.unwrap();
    assert_eq!(a.size().await.unwrap(), 1 << 50);
    a.set_size(2 * chunk).await.unwrap();
    assert_eq!(a.size().await.unwrap(), 2 * chunk);
    a.punch(0, u64::MAX - 1).await.unwrap();
    assert!(a.read(0, 2 * chunk).await.unwrap().iter().all(|b| *b == 0));

    // destroy: the array is gone.
    a.destroy().await.unwrap();
    assert!(matches!(cont.array_open(a.oid()).await, Err(ShoalError::NotFound { .. })));

    // The object API: several akeys per dkey, listing, punching an akey,
    // and reads at an older epoch.
    let obj = cont.object(cont.alloc_oid(shoal_common::oclass::ObjType::Multi, None).await.unwrap()).unwrap();
    let e1 = obj.update_single(b"d1", b"a1", Bytes::from_static(b"one")).await.unwrap();
    obj.update_single(b"d1", b"a2", Bytes::from_static(b"two")).await.unwrap();
    obj.update_single(b"d2", b"a1", Bytes::from_static(b"three")).await.unwrap();
    obj.write_extent(b"d3", b"x", 10, Bytes::from_static(b"extent")).await.unwrap();
    assert_eq!(obj.list_dkeys().await.unwrap(), vec![b"d1".to_vec(), b"d2".to_vec(), b"d3".to_vec()]);
    assert_eq!(obj.list_akeys(b"d1").await.unwrap(), vec![b"a1".to_vec(), b"a2".to_vec()]);
    assert_eq!(&obj.read_extent(b"d3", b"x", 8, 10, EPOCH_MAX).await.unwrap()[..], b"\0\0extent\0\0");
    obj.update_single(b"d1", b"a1", Bytes::from_static(b"uno")).await.unwrap();
    obj.punch_akey(b"d1", b"a2").await.unwrap();
    assert_eq!(obj.list_akeys(b"d1").await.unwrap(), vec![b"a1".to_vec()]);
    assert_eq!(obj.fetch_single(b"d1", b"a1", EPOCH_MAX).await.unwrap().as_deref(), Some(&b"uno"[..]));
    assert_eq!(obj.fetch_single(b"d1", b"a1", e1).await.unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(obj.fetch_single(b"d1", b"a2", EPOCH_MAX).await.unwrap(), None);
    obj.punch_dkey(b"d2").await.unwrap();
    assert_eq!(obj.list_dkeys().await.unwrap(), vec![b"d1".to_vec(), b"d3".to_vec()]);
    obj.punch().await.unwrap();
    assert!(obj.list_dkeys().await.unwrap().is_empty());

    // Names resolve to OIDs; unknown names resolve to nothing.
    let kv = cont.kv_create(None).await.unwrap();
    cont.name_put("settings", kv.oid()).await.unwrap();
    assert_eq!(cont.resolve("settings").await.unwrap(), Some(kv.oid()));
    assert_eq!(cont.resolve(&kv.oid().to_string()).await.unwrap(), Some(kv.oid()));
    assert_eq!(cont.resolve("nothing").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_write_is_acknowledged_and_its_stale_shard_serves_nothing_after_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(tmp.path(), 4, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let cont = open_cont(&client, "EC_2P1G1").await;
    // An array whose data cell 1 of chunk 0 is not on the MS's server.
    let members = client.system_query().await.unwrap().members;
    let ms_rank = members.iter().find(|m| m.addr == cluster.ms()).unwrap().rank;
    let mut a = cont.array_create(None, None).await.unwrap();
    for _ in 0..20 {
        if a.object().layout().unwrap().dkey_shards(&0u64.to_be_bytes())[1].rank != ms_rank {
            break;
        }
        a = cont.array_create(None, None).await.unwrap();
    }
    let victim_rank = a.object().layout().unwrap().dkey_shards(&0u64.to_be_bytes())[1].rank;
    assert_ne!(victim_rank, ms_rank);
    let (k, _, cell) = a.object().ec_geometry().unwrap();
    let stripe = (k as u64 * cell) as usize;
    let old = pattern(1, stripe);
    a.write(0, Bytes::from(old.clone())).await.unwrap();

    // Kill the server holding data cell 1 of chunk 0.
    let victim_addr = members.iter().find(|m| m.rank == victim_rank).unwrap().addr.clone();
    let idx = cluster.servers.iter().position(|s| s.addr == victim_addr).unwrap();
    cluster.servers[idx].kill9();

    // The write goes on without it (rd_fac 1): degraded, and acknowledged
    // only once the MS has declared the victim down.
    let new = pattern(2, stripe);
    a.write(0, Bytes::from(new.clone())).await.unwrap();
    let q = client.system_query().await.unwrap();
    let m = q.members.iter().find(|m| m.rank == victim_rank).unwrap();
    assert_eq!(m.state, shoal_common::mgmt::MemberState::Down, "the rank that missed the write is down");

    // Back up, its cell is stale: it serves nothing of the pool, and the
    // read decodes the write from the cells that have it.
    cluster.servers[idx].restart().await.unwrap();
    let got = a.read(0, stripe as u64).await.unwrap();
    assert!(got == new[..], "the two cells of the degraded write decode to its data");
    // Asked with the current map (an older one gets StaleMap first).
    let current = client.pool_query(&cont.info().pool.to_string()).await.unwrap().map.version;
    let raw = cluster.servers[idx].client().with_pool(cont.info().pool, current);
    let kind = ValueKind::Array { rec_size: 1, start: 0, nr: cell };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = raw
            .fetch(
                0,
                cont.info().uuid,
                a.oid(),
                &0u64.to_be_bytes(),
                EPOCH_MAX,
                vec![FetchIod { akey: b"data".to_vec(), kind }],
            )
            .await;
        if matches!(&r, Err(ShoalError::Unreachable(m)) if m.contains("down in pool")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the stale server still serves: {r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // More writes go on, degraded, and read back.
    a.write(0, Bytes::from(old.clone())).await.unwrap();
    assert!(a.read(0, stripe as u64).await.unwrap() == old[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_service_survives_a_crash_of_its_server() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(tmp.path(), 3, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let pool = client.pool_connect("tank").await.unwrap();
    pool.cont_create("c", ContProps { oclass: Some("RP_2G1".into()), ..Default::default() }).await.unwrap();
    let cont = pool.cont_open("c").await.unwrap();
    let kv = cont.kv_create(None).await.unwrap();
    kv.put(b"k", Bytes::from_static(b"v")).await.unwrap();
    let ranks: Vec<u32> = client.system_query().await.unwrap().members.iter().map(|m| m.rank).collect();

    // SIGKILL the server hosting the MS, and bring it back.
    cluster.servers[0].kill9();
    assert!(client.pool_list().await.is_err(), "no MS while its server is down");
    cluster.servers[0].restart().await.unwrap();
    cluster.wait_joined(3).await.unwrap();

    // Everything the MS acknowledged is still there, ranks unchanged, and
    // OIDs are never handed out twice.
    let after = cluster.client().await.unwrap();
    let q = after.system_query().await.unwrap();
    assert_eq!(q.members.iter().map(|m| m.rank).collect::<Vec<_>>(), ranks);
    let pool = after.pool_connect("tank").await.unwrap();
    let cont2 = pool.cont_open("c").await.unwrap();
    assert_eq!(cont2.info().uuid, cont.info().uuid);
    let kv2 = cont2.kv_open(kv.oid()).await.unwrap();
    assert_eq!(kv2.get(b"k").await.unwrap().as_deref(), Some(&b"v"[..]));
    let fresh = cont2.kv_create(None).await.unwrap();
    assert!(shoal_common::oclass::oid_seq(fresh.oid()) > shoal_common::oclass::oid_seq(kv.oid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_stripe_whose_write_reached_fewer_than_k_cells_reads_as_before() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start(tmp.path(), 6, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let cont = open_cont(&client, "EC_4P2G1").await;

    // Small cells and a large chunk: many stripes per request.
    let small = cont.array_create_with(None, Some(16 << 20), Some(4096)).await.unwrap();
    let big = pattern(3, 16 << 20);
    small.write(0, Bytes::from(big.clone())).await.unwrap();
    assert!(small.read(0, 16 << 20).await.unwrap() == big[..]);

    let a = cont.array_create(None, None).await.unwrap();
    let (k, _, cell) = a.object().ec_geometry().unwrap();
    let stripe = (k as u64 * cell) as usize;
    let old = pattern(1, stripe);
    a.write(0, Bytes::from(old.clone())).await.unwrap();

    // Three of six servers die (not the MS's): a new write of the stripe
    // reaches only three cells, fewer than k = 4, and fails.
    for s in &mut cluster.servers[3..] {
        s.kill9();
    }
    assert!(a.write(0, Bytes::from(pattern(2, stripe))).await.is_err());
    for s in &mut cluster.servers[3..] {
        s.restart().await.unwrap();
    }
    // No epoch has k cells at the newest version: the read returns the
    // stripe as it was, whole, rather than failing or mixing.
    assert!(a.read(0, stripe as u64).await.unwrap() == old[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_of_different_bytes_of_one_stripe_never_lose_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 6, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let cont = open_cont(&client, "EC_4P2G1").await;
    let a = cont.array_create(None, None).await.unwrap();
    a.write(0, Bytes::from(vec![0xEEu8; 64 << 10])).await.unwrap();

    // Six clients each own 1000 bytes of the first stripe and rewrite them
    // eight times, all at once: every write is a read-modify-write of the
    // same stripe.
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let (ms, oid) = (cluster.ms(), a.oid());
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(vec![ms]).await.unwrap();
            let cont = c.pool_connect("tank").await.unwrap().cont_open("ec-4p2g1").await.unwrap();
            let a = cont.array_open(oid).await.unwrap();
            for round in 0..8u64 {
                a.write(w * 1000, Bytes::from(pattern(w * 100 + round, 1000))).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = a.read(0, 64 << 10).await.unwrap();
    for w in 0..6u64 {
        let slot = &got[(w * 1000) as usize..(w * 1000 + 1000) as usize];
        assert!(slot == pattern(w * 100 + 7, 1000), "writer {w}'s last write was lost");
    }
    assert!(got[6000..].iter().all(|b| *b == 0xEE));
}
