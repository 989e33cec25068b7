//! Epochs across clients: a client whose clock is behind still writes
//! after one whose clock is ahead (the target refuses the older epoch and
//! the client retries past the target's clock).

use std::sync::Arc;

use bytes::Bytes;
use shoal_client::server::{client_clock, wall_ns};
use shoal_client::transport::TcpTransport;
use shoal_client::ServerClient;
use shoal_common::msg::{FetchIod, UpdateIod, ValueKind};
use shoal_common::{ContId, Oid, EPOCH_MAX};
use shoal_tests::TestServer;

async fn put(c: &ServerClient, v: &'static [u8]) {
    let iods = vec![UpdateIod::new(b"a", ValueKind::Single, v)];
    c.update(0, ContId(1), Oid::new(0, 1), b"x", iods, vec![Bytes::from_static(v)]).await.unwrap();
}

async fn get(c: &ServerClient) -> Bytes {
    let iods = vec![FetchIod { akey: b"a".to_vec(), kind: ValueKind::Single }];
    c.fetch(0, ContId(1), Oid::new(0, 1), b"x", EPOCH_MAX, iods).await.unwrap().remove(0).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_behind_the_others_still_writes_last() {
    let tmp = tempfile::tempdir().unwrap();
    let srv = TestServer::start(&tmp.path().join("s0"), 1).await.unwrap();
    let t = Arc::new(TcpTransport::default());

    // Client A's clock runs 3 s ahead.
    let fast = Arc::new(client_clock());
    fast.observe(wall_ns() + 3_000_000_000);
    let a = ServerClient::new(t.clone(), srv.addr.clone(), fast);
    put(&a, b"one").await;

    // Client B's clock is right, 3 s behind A's: the target refuses its
    // older epoch with its clock, and B writes again past it. The later
    // write wins.
    let b = ServerClient::new(t, srv.addr.clone(), Arc::new(client_clock()));
    put(&b, b"two").await;
    assert_eq!(&get(&b).await[..], b"two");
    put(&b, b"three").await;
    assert_eq!(&get(&b).await[..], b"three");
}
