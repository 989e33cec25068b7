//! The management service replicated with Raft: losing its leader stops
//! nothing for long, loses no acknowledged change and hands out no OID
//! twice; losing a majority stops changes with a clear error until the
//! replicas come back.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_client::{Client, ErrorKind};
use shoal_common::mgmt::ContProps;
use shoal_common::oclass::ObjType;
use shoal_tests::TestCluster;

async fn leader(client: &Client, cluster: &TestCluster) -> usize {
    cluster.ms_leader(client, Duration::from_secs(20)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ms_survives_the_loss_of_its_leader_and_stops_safely_without_a_majority() {
    let tmp = tempfile::tempdir().unwrap();
    // Servers 0-2 host the MS replicas; the pools live on servers 3-5, so
    // killing MS leaders costs the data nothing.
    let mut cluster = TestCluster::start_replicated(tmp.path(), 6, 1, 3, &[]).await.unwrap();
    let client = cluster.client().await.unwrap();
    let q = client.system_query().await.unwrap();
    assert_eq!(q.ms_replicas.len(), 3, "{q:?}");
    assert_eq!(q.ms_replicas.iter().filter(|r| r.role == "leader").count(), 1, "{q:?}");
    let data: Vec<u32> = cluster.servers[3..]
        .iter()
        .map(|s| q.members.iter().find(|m| m.addr == s.addr).expect("joined").rank)
        .collect();

    client.pool_create("tank", data.clone(), 0).await.unwrap();
    let pool = client.pool_connect("tank").await.unwrap();
    pool.cont_create("c", ContProps { rd_fac: 1, ..ContProps::default() }).await.unwrap();
    let cont = pool.cont_open("c").await.unwrap();
    let kv = cont.kv_create(None).await.unwrap();
    kv.put("before", Bytes::from_static(b"1")).await.unwrap();
    let mut oids = HashSet::new();
    for _ in 0..20 {
        assert!(oids.insert(cont.alloc_oid(ObjType::Kv, None).await.unwrap()));
    }

    // Kill the leader, three times over: each time a new one serves, what
    // was acknowledged is there, and no OID comes back twice.
    for round in 0..3 {
        let l = leader(&client, &cluster).await;
        cluster.servers[l].kill9();
        let killed = Instant::now();
        // The first change after the loss goes through without an error
        // reaching the caller (the client follows the new leader).
        client.pool_create(&format!("after{round}"), data.clone(), 0).await.unwrap();
        println!("round {round}: leader (server {l}) killed; a change committed {:?} later", killed.elapsed());
        for _ in 0..20 {
            assert!(oids.insert(cont.alloc_oid(ObjType::Kv, None).await.unwrap()), "an OID handed out twice");
        }
        // Data I/O of a client holding the pool map goes on.
        kv.put(format!("during{round}"), Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(kv.get("before").await.unwrap().as_deref(), Some(&b"1"[..]));
        cluster.servers[l].restart().await.unwrap();
    }
    let pools: Vec<String> = client.pool_list().await.unwrap().into_iter().map(|p| p.label).collect();
    for want in ["tank", "after0", "after1", "after2"] {
        assert!(pools.contains(&want.to_string()), "{want} lost: {pools:?}");
    }

    // Without a majority: changes are refused with a clear error, and
    // nothing diverges; once the replicas are back, the MS resumes.
    let l = leader(&client, &cluster).await;
    let others: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    for &i in &others {
        cluster.servers[i].kill9();
    }
    let short = Client::builder().ms(cluster.ms_addrs.clone()).timeout(Duration::from_secs(4)).connect().await;
    match short {
        Ok(c) => {
            let e = c.pool_create("nomajority", data.clone(), 0).await.unwrap_err();
            assert!(matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Timeout | ErrorKind::Busy), "{e:?}");
        }
        Err(e) => {
            assert!(matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Timeout | ErrorKind::NotFound), "{e:?}")
        }
    }
    for &i in &others {
        cluster.servers[i].restart().await.unwrap();
    }
    client.pool_create("resumed", data.clone(), 0).await.unwrap();
    let pools: Vec<String> = client.pool_list().await.unwrap().into_iter().map(|p| p.label).collect();
    assert!(pools.contains(&"resumed".to_string()) && pools.contains(&"tank".to_string()), "{pools:?}");
    assert!(!pools.contains(&"nomajority".to_string()) || pools.len() == 6, "{pools:?}");
    assert_eq!(kv.get("during2").await.unwrap().as_deref(), Some(&b"2"[..]));
}

/// A change whose leader dies once it has committed it, before answering,
/// is answered by the next leader as it was applied: once. The caller
/// hears neither "exists" nor of a second pool or container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_answer_died_with_the_leader_is_applied_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_replicated(tmp.path(), 3, 1, 3, &[]).await.unwrap();
    for s in &mut cluster.servers {
        s.env = vec![("FAILPOINTS".into(), "ms::committed=return(doomed)".into())];
        s.restart().await.unwrap();
    }
    cluster.wait_joined(3).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let pool = client.pool_connect("tank").await.unwrap();

    let l = leader(&client, &cluster).await;
    let made = pool.cont_create("doomed", ContProps::default()).await.unwrap();
    assert!(cluster.servers[l].exited(), "the leader (server {l}) should have died after committing");
    let conts = pool.cont_list().await.unwrap();
    let doomed: Vec<_> = conts.iter().filter(|c| c.label == "doomed").collect();
    assert_eq!(doomed.len(), 1, "{conts:?}");
    assert_eq!(doomed[0].uuid, made.uuid, "the retry answered with another container");
    cluster.servers[l].restart().await.unwrap();

    let l = leader(&client, &cluster).await;
    let made = client.pool_create("doomed", vec![], 0).await.unwrap();
    assert!(cluster.servers[l].exited(), "the leader (server {l}) should have died after committing");
    let pools = client.pool_list().await.unwrap();
    let doomed: Vec<_> = pools.iter().filter(|p| p.label == "doomed").collect();
    assert_eq!(doomed.len(), 1, "{pools:?}");
    assert_eq!(doomed[0].uuid, made.uuid);
    // A second create of the same name, by a new call, is refused.
    let e = client.pool_create("doomed", vec![], 0).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Exists, "{e:?}");
}

/// Replicas are added and removed while the system runs, by joint
/// consensus: an added one is brought up to date and votes (the MS goes on
/// with it and one original replica once another is lost), a removed one
/// (here the leader) stops hosting, also after a restart with `--ms` still
/// in its flags, and an added one is hosted again after its server
/// restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_added_and_removed_while_the_system_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_replicated(tmp.path(), 4, 1, 3, &[]).await.unwrap();
    let all: Vec<String> = cluster.servers.iter().map(|s| s.addr.clone()).collect();
    let client = Client::builder().ms(all.clone()).connect().await.unwrap();
    let q = client.system_query().await.unwrap();
    let ranks: Vec<u32> =
        cluster.servers.iter().map(|s| q.members.iter().find(|m| m.addr == s.addr).expect("joined").rank).collect();
    client.pool_create("tank", vec![], 0).await.unwrap();

    // Server 3 gets a replica; it votes once it is up to date.
    let replicas = client.ms_add(ranks[3]).await.unwrap();
    assert_eq!(replicas.len(), 4, "{replicas:?}");
    let added = replicas.iter().find(|r| r.addr == all[3]).expect("server 3 among the replicas");
    assert!(added.id > 1000, "{added:?}");
    assert_ne!(added.role, "learner", "{replicas:?}");
    assert_eq!(client.ms_add(ranks[3]).await.unwrap().len(), 4, "adding it again changes nothing");

    // The leader's own replica is removed.
    let l = leader(&client, &cluster).await;
    let replicas = client.ms_remove(ranks[l]).await.unwrap();
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    assert!(!replicas.iter().any(|r| r.addr == all[l]), "{replicas:?}");
    client.pool_create("after-remove", vec![ranks[3]], 0).await.unwrap();

    // Voters: two original replicas and the added one. Without one of the
    // originals, the other and the added one are a majority.
    let other = (0..3).find(|i| *i != l).unwrap();
    cluster.servers[other].kill9();
    client.pool_create("with-the-added-one", vec![ranks[3]], 0).await.unwrap();
    cluster.servers[other].restart().await.unwrap();

    // Restarts: the removed server hosts nothing (its flags still say
    // --ms); the added one hosts its replica again.
    cluster.servers[l].restart().await.unwrap();
    cluster.servers[3].restart().await.unwrap();
    let e = Client::builder().ms(vec![all[l].clone()]).timeout(Duration::from_secs(5)).connect().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let q = client.system_query().await.unwrap();
        let hosts: Vec<&str> = q.ms_replicas.iter().map(|r| r.addr.as_str()).collect();
        assert_eq!(hosts.len(), 3, "{q:?}");
        assert!(hosts.contains(&all[3].as_str()) && !hosts.contains(&all[l].as_str()), "{hosts:?}");
        if q.ms_replicas.iter().all(|r| r.last_log_index.is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "the replicas did not catch up: {q:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pools: Vec<String> = client.pool_list().await.unwrap().into_iter().map(|p| p.label).collect();
    for want in ["tank", "after-remove", "with-the-added-one"] {
        assert!(pools.contains(&want.to_string()), "{want} lost: {pools:?}");
    }
    // The last replicas cannot all go.
    client.ms_remove(ranks[3]).await.unwrap();
    let last = (0..3).filter(|i| *i != l).map(|i| ranks[i]).collect::<Vec<_>>();
    client.ms_remove(last[0]).await.unwrap();
    let e = client.ms_remove(last[1]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e:?}");
}

/// The replica that founded the group loses its MS directory: restarted,
/// it does not found a second group but is brought up to date by the
/// leader, and then counts in a majority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_directory_is_brought_up_to_date() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_replicated(tmp.path(), 3, 1, 3, &[]).await.unwrap();
    let client = cluster.client().await.unwrap();
    for i in 0..5 {
        client.pool_create(&format!("p{i}"), vec![], 0).await.unwrap();
    }
    cluster.servers[0].kill9();
    std::fs::remove_dir_all(cluster.servers[0].dir.join("ms")).unwrap();
    cluster.servers[0].restart().await.unwrap();
    client.pool_create("after", vec![], 0).await.unwrap();
    // Once server 0 holds the log, it and one other are a majority.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let q = client.system_query().await.unwrap();
        let lead = q.ms_replicas.iter().find(|r| r.role == "leader").and_then(|r| r.last_log_index);
        let zero = q.ms_replicas.iter().find(|r| r.addr == cluster.servers[0].addr).and_then(|r| r.last_log_index);
        if lead.is_some() && zero == lead {
            break;
        }
        assert!(Instant::now() < deadline, "server 0 did not catch up: {q:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let l = leader(&client, &cluster).await;
    let other = (1..3).find(|i| *i != l).unwrap();
    cluster.servers[other].kill9();
    if l != 0 {
        // Server 0 must now vote for the leader's changes.
        client.pool_create("with-zero", vec![], 0).await.unwrap();
    }
    cluster.servers[l].kill9();
    cluster.servers[other].restart().await.unwrap();
    // Server 0 and the restarted one elect a leader; the state is whole.
    let pools: Vec<String> = client.pool_list().await.unwrap().into_iter().map(|p| p.label).collect();
    for want in ["p0", "p4", "after"] {
        assert!(pools.contains(&want.to_string()), "{want} lost: {pools:?}");
    }
}

/// A frozen MS leader (SIGSTOP: its sockets stay open, it answers
/// nothing) is replaced: changes go through the new leader, the servers'
/// heartbeats find it, so no live server is declared down, and data I/O
/// goes on. Thawed, the old leader follows the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_replaced_and_live_servers_stay_up() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start_replicated(tmp.path(), 5, 1, 3, &[]).await.unwrap();
    let client = cluster.client().await.unwrap();
    let q = client.system_query().await.unwrap();
    let rank = |i: usize| q.members.iter().find(|m| m.addr == cluster.servers[i].addr).expect("joined").rank;
    let data = vec![rank(3), rank(4)];
    client.pool_create("tank", data.clone(), 0).await.unwrap();
    let pool = client.pool_connect("tank").await.unwrap();
    pool.cont_create("c", ContProps::default()).await.unwrap();
    let kv = pool.cont_open("c").await.unwrap().kv_create(None).await.unwrap();

    let l = leader(&client, &cluster).await;
    cluster.servers[l].freeze();
    client.pool_create("while-frozen", data.clone(), 0).await.unwrap();
    kv.put("k", Bytes::from_static(b"v")).await.unwrap();
    // Past the time after which a silent server is declared down.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let q = client.system_query().await.unwrap();
    for m in q.members.iter().filter(|m| m.addr != cluster.servers[l].addr) {
        assert_eq!(m.state, shoal_common::mgmt::MemberState::Joined, "{m:?} while the old leader is frozen");
    }
    assert_eq!(kv.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));

    cluster.servers[l].thaw();
    client.pool_create("after-thaw", data, 0).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let q = client.system_query().await.unwrap();
        let leaders: Vec<_> = q.ms_replicas.iter().filter(|r| r.role == "leader").collect();
        if leaders.len() == 1 && q.ms_replicas.iter().all(|r| r.last_log_index.is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "{q:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pools: Vec<String> = client.pool_list().await.unwrap().into_iter().map(|p| p.label).collect();
    assert_eq!(pools.len(), 3, "{pools:?}");
}

/// A client given one MS replica's address learns the others from the MS
/// and goes on when that one dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_one_replica_learns_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cluster = TestCluster::start_replicated(tmp.path(), 3, 1, 3, &[]).await.unwrap();
    let one = cluster.servers[0].addr.clone();
    let client = Client::builder().ms(vec![one.clone()]).connect().await.unwrap();
    let mut learned = client.ms_addrs();
    learned.sort();
    let mut all = cluster.ms_addrs.clone();
    all.sort();
    assert_eq!(learned, all);
    client.pool_create("tank", vec![], 0).await.unwrap();
    cluster.servers[0].kill9();
    client.pool_create("without-the-one", vec![], 0).await.unwrap();
    assert_eq!(client.pool_list().await.unwrap().len(), 2);
}
