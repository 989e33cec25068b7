//! Mistakes a program linking `shoal-client` can make, and that must never
//! cost data: opening an object as the wrong type, and using handles of a
//! container or pool that was destroyed meanwhile.

use bytes::Bytes;
use shoal_client::{Entity, ErrorKind, Limit};
use shoal_common::mgmt::ContProps;
use shoal_common::oclass::ObjType;
use shoal_common::ShoalError;
use shoal_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_opened_as_the_wrong_type_is_refused_and_keeps_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 2, 1).await.unwrap();
    let (_, _, cont) = shoal_tests::tank(&cluster, ContProps::default()).await;

    let array = cont.array_create(None, None).await.unwrap();
    array.write(0, Bytes::from_static(b"precious")).await.unwrap();
    let kv = cont.kv_create(None).await.unwrap();
    kv.put(b"key", Bytes::from_static(b"value")).await.unwrap();
    let multi = cont.alloc_oid(ObjType::Multi, None).await.unwrap();

    let wrong = |r: Result<_, ShoalError>, what: &str| match r {
        Err(ShoalError::InvalidArgument(m)) => assert!(m.contains(what), "{m}"),
        Err(e) => panic!("wrong error: {e:?}"),
        Ok(_) => panic!("opened as the wrong type"),
    };
    wrong(cont.kv_open(array.oid()).await.map(drop), "is an array");
    wrong(cont.kv_open(multi).await.map(drop), "is a generic object");
    wrong(cont.array_open(kv.oid()).await.map(drop), "is a key-value object");
    wrong(cont.array_open(multi).await.map(drop), "is a generic object");
    wrong(cont.object(array.oid()).map(drop), "is an array");
    wrong(cont.object(kv.oid()).map(drop), "is a key-value object");

    // Nothing was touched.
    assert_eq!(&array.read(0, 8).await.unwrap()[..], b"precious");
    assert_eq!(kv.get(b"key").await.unwrap().as_deref(), Some(&b"value"[..]));
    // The right opens still work.
    assert_eq!(&cont.array_open(array.oid()).await.unwrap().read(0, 8).await.unwrap()[..], b"precious");
    assert_eq!(cont.kv_open(kv.oid()).await.unwrap().get(b"key").await.unwrap().as_deref(), Some(&b"value"[..]));
    cont.object(multi).unwrap();
}

fn destroyed<T: std::fmt::Debug>(r: Result<T, ShoalError>, what: &str) {
    match r {
        Err(ShoalError::NotFound { message: m, .. }) => assert!(m.contains(what), "{m}"),
        other => panic!("a handle still works after destroy ({what}): {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_of_a_destroyed_container_fail_on_their_next_call() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 3, 1).await.unwrap();
    let props = ContProps { oclass: Some("RP_2G1".into()), ..Default::default() };
    let (_, pool, cont) = shoal_tests::tank(&cluster, props.clone()).await;
    let kv = cont.kv_create(None).await.unwrap();
    kv.put(b"key", Bytes::from_static(b"value")).await.unwrap();
    let array = cont.array_create(None, None).await.unwrap();
    array.write(0, Bytes::from_static(b"old")).await.unwrap();

    // Destroyed through another client; the old handles' very next calls fail.
    let other = cluster.client().await.unwrap();
    other.pool_connect("tank").await.unwrap().cont_destroy("c").await.unwrap();
    destroyed(kv.put(b"key", Bytes::from_static(b"new")).await, "destroyed");
    destroyed(kv.get(b"key").await, "destroyed");
    destroyed(array.write(0, Bytes::from_static(b"new")).await, "destroyed");
    destroyed(array.read(0, 3).await, "destroyed");
    destroyed(cont.alloc_oid(ObjType::Kv, None).await, "container");
    destroyed(cont.kv_create(None).await, "container");

    // A new container of the same name shares nothing with the old handles.
    pool.cont_create("c", props).await.unwrap();
    let fresh = pool.cont_open("c").await.unwrap();
    let kv2 = fresh.kv_create(None).await.unwrap();
    kv2.put(b"key", Bytes::from_static(b"fresh")).await.unwrap();
    destroyed(kv.get(b"key").await, "destroyed");
    assert_eq!(kv2.get(b"key").await.unwrap().as_deref(), Some(&b"fresh"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_of_a_destroyed_pool_fail_on_their_next_call() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 3, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let pool = client.pool_connect("tank").await.unwrap();
    pool.cont_create("c", ContProps::default()).await.unwrap();
    let cont = pool.cont_open("c").await.unwrap();
    let kv = cont.kv_create(None).await.unwrap();
    kv.put(b"key", Bytes::from_static(b"value")).await.unwrap();

    client.pool_destroy("tank", true).await.unwrap();
    destroyed(kv.put(b"key", Bytes::from_static(b"new")).await, "destroyed");
    destroyed(kv.get(b"key").await, "destroyed");
    destroyed(cont.alloc_oid(ObjType::Kv, None).await, "destroyed");
    destroyed(pool.cont_create("d", ContProps::default()).await, "no pool");
    destroyed(pool.cont_open("c").await, "no pool");
}

/// A request that claims a pool map version from the future (a buggy or
/// hostile client) is not trusted: the other clients' writes go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_version_from_the_future_does_not_lock_writers_out() {
    use shoal_common::msg::{FetchIod, ValueKind};
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 2, 1).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let pool = client.pool_connect("tank").await.unwrap();
    pool.cont_create("c", ContProps { oclass: Some("RP_2G1".into()), ..Default::default() }).await.unwrap();
    let cont = pool.cont_open("c").await.unwrap();
    let kv = cont.kv_create(None).await.unwrap();
    kv.put(b"k", Bytes::from_static(b"v1")).await.unwrap();
    for s in &cluster.servers {
        let raw = s.client().with_pool(pool.info().uuid, u32::MAX - 1);
        let iods = vec![FetchIod { akey: b"x".to_vec(), kind: ValueKind::Single }];
        let _ = raw.fetch(0, cont.info().uuid, kv.oid(), b"k", shoal_common::EPOCH_MAX, iods).await;
    }
    kv.put(b"k", Bytes::from_static(b"v2")).await.unwrap();
    assert_eq!(kv.get(b"k").await.unwrap().as_deref(), Some(&b"v2"[..]));
}

/// Limits are enforced with a clear error, before anything is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_values_past_their_limits_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 2, 1).await.unwrap();
    let (_, _, cont) = shoal_tests::tank(&cluster, ContProps::default()).await;
    let kv = cont.kv_create(None).await.unwrap();
    // Keys: any AsRef<[u8]>.
    kv.put("name", Bytes::from_static(b"v")).await.unwrap();
    kv.put(vec![7u8; 4096], Bytes::from_static(b"v")).await.unwrap();
    assert_eq!(kv.get(String::from("name")).await.unwrap().as_deref(), Some(&b"v"[..]));
    // Which limit, the size and the cap, and a message in the words of the
    // user guide (key, value, array), not the wire's.
    let e = kv.put(vec![7u8; 4097], Bytes::from_static(b"v")).await.unwrap_err();
    assert_eq!(e, ShoalError::TooLarge { limit: Limit::KeyLen, size: 4097, max: 4096 });
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("a key of 4097 bytes") && !e.is_retryable(), "{e}");
    match kv.put("", Bytes::from_static(b"v")).await {
        Err(ShoalError::InvalidArgument(m)) => assert!(m.contains("key must not be empty"), "{m}"),
        other => panic!("{other:?}"),
    }
    let e = kv.put("big", Bytes::from(vec![0u8; (64 << 20) + 1])).await.unwrap_err();
    assert!(matches!(e, ShoalError::TooLarge { limit: Limit::ValueLen, max, .. } if max == 64 << 20), "{e:?}");
    assert!(e.to_string().contains("value of") && e.to_string().contains("array"), "{e}");
    assert!(matches!(kv.get(vec![1u8; 5000]).await, Err(ShoalError::TooLarge { limit: Limit::KeyLen, .. })));
    // The object API's keys too, and names.
    let obj = kv.object();
    let e = obj.update_single(vec![1u8; 4097], "v", Bytes::from_static(b"x")).await.unwrap_err();
    assert!(matches!(e, ShoalError::TooLarge { limit: Limit::KeyLen, size: 4097, .. }), "{e:?}");
    let client = cluster.client().await.unwrap();
    let e = client.pool_create(&"n".repeat(300), vec![], 0).await.unwrap_err();
    assert!(matches!(e, ShoalError::TooLarge { limit: Limit::NameLen, size: 300, max: 255 }), "{e:?}");
    assert_eq!(kv.get("big").await.unwrap(), None);
    assert_eq!(kv.list().await.unwrap().len(), 2);
}

/// The example program in client/examples runs against a cluster it finds
/// through $SHOAL_MS, twice (the second run reuses the pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_example_runs_against_a_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 3, 1).await.unwrap();
    let example = shoal_tests::server_bin().with_file_name("examples").join("quickstart");
    for _ in 0..2 {
        let out = tokio::process::Command::new(&example)
            .env("SHOAL_MS", &cluster.servers[0].addr)
            .env_remove("SHOAL_CLUSTER")
            .output()
            .await
            .unwrap_or_else(|e| panic!("run {}: {e}", example.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("quickstart OK") && stdout.contains("settings/colour = teal"), "{stdout}");
    }
}

/// A malformed address is the caller's mistake: a clear error of its own
/// kind, not a retryable "unreachable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_address_is_an_invalid_argument() {
    for addr in ["nonsense", "127.0.0.1", "127.0.0.1:99999", "host:port"] {
        let e = shoal_client::Client::connect(vec![addr.into()]).await.unwrap_err();
        assert_eq!(e.kind(), shoal_client::ErrorKind::InvalidArgument, "{addr}: {e}");
        assert!(!e.is_retryable() && e.to_string().contains("HOST:PORT"), "{addr}: {e}");
    }
}

/// A client capped to one request in flight still does everything (an EC
/// write sends to every shard), one request at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_one_request_in_flight_works() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 3, 1).await.unwrap();
    let client =
        shoal_client::Client::builder().ms([cluster.servers[0].addr.clone()]).max_in_flight(1).stale_retries(1);
    let client = client.connect().await.unwrap();
    client.pool_create("tank", vec![], 0).await.unwrap();
    let pool = client.pool_connect("tank").await.unwrap();
    let props = ContProps { oclass: Some("EC_2P1G1".into()), ..ContProps::default() };
    pool.cont_create("c", props).await.unwrap();
    let cont = pool.cont_open("c").await.unwrap();
    let array = cont.array_create(None, None).await.unwrap();
    let data = shoal_tests::pattern(5, 4 << 20);
    array.write(3, Bytes::from(data.clone())).await.unwrap();
    assert!(array.read(3, data.len() as u64).await.unwrap() == data);
}

/// Errors say what is missing or exists already, and a failed connection
/// carries its cause; a peer that breaks the protocol is not "unreachable"
/// and not worth a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_and_why() {
    use std::error::Error as _;
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 2, 1).await.unwrap();
    let (client, pool, _) = shoal_tests::tank(&cluster, ContProps::default()).await;

    let e = client.pool_connect("nope").await.unwrap_err();
    assert_eq!(e.missing(), Some(Entity::Pool), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    let e = pool.cont_open("nope").await.unwrap_err();
    assert_eq!(e.missing(), Some(Entity::Container), "{e:?}");
    let e = client.pool_create("tank", vec![], 0).await.unwrap_err();
    assert!(matches!(e, ShoalError::Exists { what: Entity::Pool, .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Exists);
    let e = pool.cont_create("c", ContProps::default()).await.unwrap_err();
    assert!(matches!(e, ShoalError::Exists { what: Entity::Container, .. }), "{e:?}");

    // Nothing listens: retryable, and the cause is the refused connect.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let e = shoal_client::Client::connect(vec![addr.clone()]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e:?}");
    assert!(e.is_retryable());
    let cause = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).expect("an io::Error source");
    assert_eq!(cause.kind(), std::io::ErrorKind::ConnectionRefused);

    // A "server" that answers with garbage: a protocol error naming it.
    let liar = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let liar_addr = liar.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = liar.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&[0xff; 64]).await;
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            });
        }
    });
    let e = shoal_client::Client::connect(vec![liar_addr.clone()]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e:?}");
    assert!(!e.is_retryable() && e.to_string().contains(&liar_addr), "{e}");
}
