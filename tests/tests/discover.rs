//! A program finds the cluster by itself, by the rules of the `shoal`
//! tool: `$SHOAL_MS`, else the cluster file (`$SHOAL_CLUSTER`). (One test
//! in its own binary: it sets the process's environment.)

use shoal_client::Client;
use shoal_common::ShoalError;
use shoal_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_finds_the_cluster_from_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(tmp.path(), 2, 1).await.unwrap();
    let ms = cluster.servers[0].addr.clone();
    let file = tmp.path().join("cluster.json");
    // (This test is alone in its binary: nothing else reads the
    // environment while it changes it.)
    let set = |k: &str, v: &str| std::env::set_var(k, v);
    let unset = |k: &str| std::env::remove_var(k);

    // Nothing set, no file: a clear error that says what to do.
    unset("SHOAL_MS");
    set("SHOAL_CLUSTER", file.to_str().unwrap());
    match Client::from_env().await {
        Err(ShoalError::NotFound { message: m, .. }) => {
            assert!(m.contains("SHOAL_MS") && m.contains("shoal dev up"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // The cluster file `shoal dev up` writes.
    std::fs::write(&file, format!(r#"{{"ms":["{ms}"],"dir":"/x","servers":[]}}"#)).unwrap();
    let c = Client::from_env().await.unwrap();
    assert_eq!(c.system_query().await.unwrap().members.len(), 2);
    // $SHOAL_MS wins over the file; a bad timeout is refused clearly.
    std::fs::write(&file, r#"{"ms":["127.0.0.1:1"]}"#).unwrap();
    set("SHOAL_MS", &ms);
    let c = Client::from_env().await.unwrap();
    assert_eq!(c.system_query().await.unwrap().members.len(), 2);
    set("SHOAL_TIMEOUT", "soon");
    match Client::from_env().await {
        Err(ShoalError::InvalidArgument(m)) => assert!(m.contains("SHOAL_TIMEOUT"), "{m}"),
        other => panic!("{other:?}"),
    }
    set("SHOAL_TIMEOUT", "5s");
    Client::builder().from_env().unwrap().connect().await.unwrap();
}
