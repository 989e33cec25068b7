//! The replicated MS under repeated SIGKILLs of its leader, at random
//! points of pool and container create/destroy, OID allocation, exclusion
//! and rebuild: 20 kills with 3 replicas and 20 with 5. Afterwards the
//! history of what callers were told is checked: every acknowledged change
//! is there, none was applied twice (no "exists" for a create, no "not
//! found" for a destroy), no OID came back twice, reads saw what was
//! acknowledged before they started and nothing that started after they
//! ended, and the rebuild the old leaders started finishes under the new
//! ones. A client that holds a pool map keeps doing I/O meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use shoal_client::{Client, ErrorKind, ShoalError};
use shoal_common::mgmt::{ContProps, PoolInfo};
use shoal_common::oclass::ObjType;
use shoal_common::placement::TargetState;
use shoal_tests::TestCluster;

/// What a caller asked of the MS.
#[derive(Debug, Clone)]
enum Op {
    PoolCreate(String),
    ContCreate(String),
    ContDestroy(String),
    /// The sequence number of the first OID of a fresh handle (always a
    /// new range from the MS).
    Alloc,
    ContList,
    Exclude,
    Reintegrate,
}

/// What the caller was told.
#[derive(Debug, Clone)]
enum Told {
    Ok,
    Seq(u64),
    Labels(BTreeSet<String>),
    /// No answer, or "try later": the change may or may not have happened.
    Unknown(String),
    /// Any other refusal.
    Refused(ErrorKind, String),
}

#[derive(Debug, Clone)]
struct Event {
    op: Op,
    start: Instant,
    end: Instant,
    told: Told,
}

fn told<T>(r: Result<T, ShoalError>, ok: impl FnOnce(T) -> Told) -> Told {
    match r {
        Ok(v) => ok(v),
        Err(e) if matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Timeout | ErrorKind::Busy) => {
            Told::Unknown(e.to_string())
        }
        Err(e) => Told::Refused(e.kind(), e.to_string()),
    }
}

async fn leader(client: &Client, cluster: &TestCluster) -> usize {
    cluster.ms_leader(client, Duration::from_secs(30)).await.unwrap()
}

/// Asks the MS for one change or read after another until `stop`,
/// recording what it was told.
async fn workload(
    client: Client,
    ranks: Vec<u32>,
    toggled: u32,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Event>>>,
) {
    let pool = client.pool_connect("tank").await.unwrap();
    let mut created: Vec<String> = Vec::new();
    let mut excluded = false;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let start = Instant::now();
        let (op, t) = match i % 7 {
            0 => {
                let label = format!("p{i}");
                (Op::PoolCreate(label.clone()), told(client.pool_create(&label, ranks.clone(), 0).await, |_| Told::Ok))
            }
            1 | 4 => {
                let label = format!("c{i}");
                let t = told(pool.cont_create(&label, ContProps::default()).await, |_| Told::Ok);
                if matches!(t, Told::Ok) {
                    created.push(label.clone());
                }
                (Op::ContCreate(label), t)
            }
            2 => {
                let r = async { pool.cont_open("base").await?.alloc_oid(ObjType::Kv, None).await }.await;
                (Op::Alloc, told(r, |oid| Told::Seq(oid.lo)))
            }
            3 if !created.is_empty() => {
                let label = created.remove(0);
                (Op::ContDestroy(label.clone()), told(pool.cont_destroy(&label).await, |_| Told::Ok))
            }
            5 => {
                let r = pool.cont_list().await;
                (Op::ContList, told(r, |l| Told::Labels(l.into_iter().map(|c| c.label).collect())))
            }
            6 if !excluded => {
                let t = told(client.exclude(toggled).await, |_| Told::Ok);
                excluded = matches!(t, Told::Ok);
                (Op::Exclude, t)
            }
            6 => {
                let t = told(client.reintegrate(Some("tank"), toggled).await, |_| Told::Ok);
                excluded = !matches!(t, Told::Ok);
                (Op::Reintegrate, t)
            }
            _ => continue,
        };
        history.lock().unwrap().push(Event { op, start, end: Instant::now(), told: t });
    }
}

/// Checks the history against the final state (see the file's comment).
fn check(history: &[Event], pools: &[PoolInfo], conts: &BTreeSet<String>) {
    let acked = |e: &Event| matches!(e.told, Told::Ok | Told::Seq(_) | Told::Labels(_));
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for e in history {
        let name = match &e.op {
            Op::PoolCreate(_) => "pool create",
            Op::ContCreate(_) => "container create",
            Op::ContDestroy(_) => "container destroy",
            Op::Alloc => "OID allocation",
            Op::ContList => "container list",
            Op::Exclude => "exclude",
            Op::Reintegrate => "reintegrate",
        };
        *counts.entry(name).or_default() += usize::from(acked(e));
        match (&e.op, &e.told) {
            // Exclusion and reintegration may be refused for cause (a
            // server not heard from since the new leader took over).
            (Op::Exclude | Op::Reintegrate, Told::Refused(ErrorKind::InvalidArgument, _)) => {}
            (op, Told::Refused(kind, msg)) => panic!("{op:?} refused ({kind:?}): {msg}"),
            _ => {}
        }
    }
    let unknown: Vec<&String> = history
        .iter()
        .filter_map(|e| match &e.told {
            Told::Unknown(m) => Some(m),
            _ => None,
        })
        .collect();
    println!(
        "acknowledged: {counts:?} of {} requests; {} without an answer {:?}",
        history.len(),
        unknown.len(),
        unknown.first()
    );
    // Every acknowledged create is there, every acknowledged destroy gone.
    let pool_labels: HashSet<&str> = pools.iter().map(|p| p.label.as_str()).collect();
    for e in history.iter().filter(|e| acked(e)) {
        match &e.op {
            Op::PoolCreate(l) => assert!(pool_labels.contains(l.as_str()), "acknowledged pool {l} lost"),
            Op::ContDestroy(l) => assert!(!conts.contains(l), "acknowledged destroy of {l} undone"),
            Op::ContCreate(l) => {
                let destroyed = history.iter().any(|d| matches!(&d.op, Op::ContDestroy(x) if x == l));
                assert!(destroyed || conts.contains(l), "acknowledged container {l} lost");
            }
            _ => {}
        }
    }
    // OIDs: never twice, and in real-time order.
    let allocs: Vec<(&Event, u64)> = history
        .iter()
        .filter_map(|e| match e.told {
            Told::Seq(s) => Some((e, s)),
            _ => None,
        })
        .collect();
    let mut seen = HashSet::new();
    for (_, s) in &allocs {
        assert!(seen.insert(*s), "OID sequence {s} handed out twice");
    }
    for (a, sa) in &allocs {
        for (b, sb) in &allocs {
            if a.end < b.start {
                assert!(sa < sb, "OID {sb} allocated after {sa} was acknowledged, yet lower");
            }
        }
    }
    // Reads: they see every create acknowledged before they started (and
    // not destroyed since), and no create that started after they ended.
    for r in history.iter().filter(|e| matches!(e.op, Op::ContList)) {
        let Told::Labels(seen) = &r.told else { continue };
        for e in history {
            let destroy_began =
                |l: &String| history.iter().any(|d| matches!(&d.op, Op::ContDestroy(x) if x == l) && d.start < r.end);
            match (&e.op, &e.told) {
                (Op::ContCreate(l), Told::Ok) if e.end < r.start && !destroy_began(l) => {
                    assert!(seen.contains(l), "a read missed container {l}, acknowledged before it began")
                }
                (Op::ContCreate(l), _) if e.start > r.end => {
                    assert!(!seen.contains(l), "a read saw container {l}, created after it ended")
                }
                (Op::ContDestroy(l), Told::Ok) if e.end < r.start => {
                    assert!(!seen.contains(l), "a read saw container {l}, destroyed before it began")
                }
                _ => {}
            }
        }
    }
}

async fn kill_the_leader_again_and_again(replicas: usize, kills: usize) {
    let tmp = tempfile::tempdir().unwrap();
    // Servers 0..replicas host the MS replicas; the data lives on the three
    // after them, so killing MS leaders costs the data nothing.
    let mut cluster = TestCluster::start_replicated(tmp.path(), replicas + 3, 1, replicas, &[]).await.unwrap();
    let client = cluster.client().await.unwrap();
    let q = client.system_query().await.unwrap();
    assert_eq!(q.ms_replicas.len(), replicas, "{q:?}");
    let data: Vec<u32> = cluster.servers[replicas..]
        .iter()
        .map(|s| q.members.iter().find(|m| m.addr == s.addr).expect("joined").rank)
        .collect();

    // "tank" spans the three data servers and has its last one excluded and
    // reintegrated again and again; "steady" spans the other two, and its
    // map never changes: I/O on it must never wait for the MS.
    client.pool_create("tank", data.clone(), 0).await.unwrap();
    let tank = client.pool_connect("tank").await.unwrap();
    tank.cont_create("base", ContProps { rd_fac: 1, ..ContProps::default() }).await.unwrap();
    let base = tank.cont_open("base").await.unwrap();
    let kv = base.kv_create(None).await.unwrap();
    for k in 0..64 {
        kv.put(format!("k{k}"), Bytes::from(vec![k as u8; 4096])).await.unwrap();
    }
    client.pool_create("steady", data[..2].to_vec(), 0).await.unwrap();
    let steady = client.pool_connect("steady").await.unwrap();
    steady.cont_create("c", ContProps { rd_fac: 1, ..ContProps::default() }).await.unwrap();
    let steady_kv = steady.cont_open("c").await.unwrap().kv_create(None).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(Vec::new()));
    let toggled = data[2];
    let w = workload(cluster.client().await.unwrap(), data[..2].to_vec(), toggled, stop.clone(), history.clone());
    let work = tokio::spawn(w);
    // When each I/O on the steady pool completed.
    let io_stop = stop.clone();
    let io = tokio::spawn(async move {
        let (mut done, mut slowest) = (Vec::new(), Duration::ZERO);
        while !io_stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let n = done.len() as u64;
            steady_kv.put(format!("io{}", n % 32), Bytes::from(n.to_le_bytes().to_vec())).await.unwrap();
            assert_eq!(steady_kv.get(format!("io{}", n % 32)).await.unwrap().as_deref(), Some(&n.to_le_bytes()[..]));
            slowest = slowest.max(t.elapsed());
            done.push(Instant::now());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (done, slowest)
    });

    let mut elections = Vec::new();
    for round in 0..kills {
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(100..1500))).await;
        let l = leader(&client, &cluster).await;
        cluster.servers[l].kill9();
        let killed = Instant::now();
        let next = leader(&client, &cluster).await;
        elections.push((killed, Instant::now()));
        assert_ne!(next, l, "round {round}");
        cluster.servers[l].restart().await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    work.await.unwrap();
    let (ios, slowest) = io.await.unwrap();
    let mut took: Vec<Duration> = elections.iter().map(|(a, b)| *b - *a).collect();
    took.sort();
    println!(
        "{replicas} replicas, {kills} leader kills: a new leader served after {:?} (median), {:?} (slowest); \
         {} I/Os on a steady pool meanwhile, slowest {slowest:?}",
        took[took.len() / 2],
        took.last().unwrap(),
        ios.len()
    );
    // The data path does not wait for the MS: I/O completed while there
    // was no leader (an election lasts at least the election timeout).
    for (killed, served) in &elections {
        if *served - *killed > Duration::from_millis(600) {
            assert!(
                ios.iter().any(|t| t > killed && t < served),
                "no I/O completed during an election of {:?}",
                *served - *killed
            );
        }
    }

    // Bring the toggled server back in; the rebuilds the killed leaders
    // started finish under the last one, and the data is whole.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = client.pool_query("tank").await.unwrap();
        let out = |s: TargetState| matches!(s, TargetState::Down | TargetState::DownOut);
        if !p.map.targets.iter().any(|t| t.rank == toggled && out(t.state)) {
            break; // the workload's last request brought it back already
        }
        match client.reintegrate(Some("tank"), toggled).await {
            Ok(()) => break,
            // Refused while the leader has not heard from it yet.
            Err(e) => assert!(Instant::now() < deadline, "reintegrate: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        let p = client.pool_query("tank").await.unwrap();
        if p.rebuilding.is_empty() && p.map.targets.iter().all(|t| t.state == TargetState::UpIn) {
            break;
        }
        assert!(Instant::now() < deadline, "the rebuild did not finish: {:?} {:?}", p.map.targets, p.rebuild);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for k in 0..64 {
        assert_eq!(kv.get(format!("k{k}")).await.unwrap().as_deref(), Some(&vec![k as u8; 4096][..]), "k{k}");
    }

    let pools = client.pool_list().await.unwrap();
    let conts: BTreeSet<String> = tank.cont_list().await.unwrap().into_iter().map(|c| c.label).collect();
    check(&history.lock().unwrap(), &pools, &conts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_lose_nothing_over_twenty_leader_kills() {
    kill_the_leader_again_and_again(3, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_replicas_lose_nothing_over_twenty_leader_kills() {
    kill_the_leader_again_and_again(5, 20).await;
}
