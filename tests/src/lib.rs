//! Harness for multi-process Shoal tests on loopback.
//!
//! Servers are real `shoal-server` processes managed by
//! [`shoal_tools::local::LocalServer`]: own directory, OS-chosen port, log
//! beside the directory, readiness by polling, never fixed sleeps.

pub use shoal_tools::local::{pattern, server_bin, LocalCluster as TestCluster, LocalServer as TestServer};

/// A pool "tank" over every server of `cluster` and a container "c" in it
/// with `props`: the client, the pool and the open container.
pub async fn tank(
    cluster: &TestCluster,
    props: shoal_common::mgmt::ContProps,
) -> (shoal_client::Client, shoal_client::Pool, shoal_client::Container) {
    let client = cluster.client().await.expect("connect");
    client.pool_create("tank", vec![], 0).await.expect("pool create");
    let pool = client.pool_connect("tank").await.expect("pool connect");
    pool.cont_create("c", props).await.expect("container create");
    let cont = pool.cont_open("c").await.expect("container open");
    (client, pool, cont)
}

/// The byte an earlier, aligned writer put at array offset `x` in the
/// write-gathering tests: never zero, never [`byte_b`]`(x)`.
pub fn byte_a(x: u64) -> u8 {
    (x % 251) as u8 + 1
}

/// The byte the gathering writer (`shoal-gather-writer`) puts at `x`.
pub fn byte_b(x: u64) -> u8 {
    !byte_a(x)
}

/// The byte a second pass of the gathering writer puts at `x`: neither
/// [`byte_a`]`(x)` nor [`byte_b`]`(x)`.
pub fn byte_c(x: u64) -> u8 {
    byte_a(x) + 2
}
