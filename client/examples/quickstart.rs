//! Shoal from Rust, end to end: find the cluster, make (or reuse) a pool
//! and a container, store key-value pairs and an array, read them back,
//! stream the array with bounded memory, and show where the data lives.
//!
//! Against a dev cluster:
//!
//! ```sh
//! shoal dev up
//! cargo run -p shoal-client --example quickstart            # pool "quickstart"
//! SHOAL_MS=10.0.0.1:10001 cargo run -p shoal-client --example quickstart -- mypool
//! ```

use shoal_client::{Bytes, Client, ContProps, ErrorKind, ObjType, Result, ShoalError};

#[tokio::main]
async fn main() -> Result<()> {
    // $SHOAL_MS, else the cluster file `shoal dev up` wrote.
    let client = Client::from_env().await?;
    let name = std::env::args().nth(1).unwrap_or_else(|| "quickstart".into());

    // A pool over every server, and a container that survives one server
    // failure; both made on the first run, reused on the next ones.
    match client.pool_create(&name, vec![], 0).await {
        Ok(p) => println!("created pool {name} ({} targets)", p.map.targets.len()),
        Err(e) if e.kind() == ErrorKind::Exists => println!("using pool {name}"),
        Err(e) => return Err(e),
    }
    let pool = client.pool_connect(&name).await?;
    let cont = match pool.cont_open("data").await {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            pool.cont_create("data", ContProps { rd_fac: 1, ..ContProps::default() }).await?;
            pool.cont_open("data").await?
        }
        Err(e) => return Err(e),
    };
    let (class, why) = cont.class_for(ObjType::Array)?;
    println!("container data: rd_fac {}; new arrays get {class} ({why})", cont.info().props.rd_fac);

    // Key-value pairs, found again by name next time.
    let kv = match cont.name_get("settings").await? {
        Some(oid) => cont.kv_open(oid).await?,
        None => {
            let kv = cont.kv_create(None).await?;
            cont.name_put("settings", kv.oid()).await?;
            kv
        }
    };
    for (k, v) in [("colour", "teal"), ("size", "large")] {
        kv.put(k, Bytes::from(v)).await?;
    }
    let colour = kv.get("colour").await?.unwrap_or_default();
    println!("settings/colour = {}", String::from_utf8_lossy(&colour));

    // An array: 8 MiB written, read back whole, then streamed (memory
    // bounded by the chunks in flight, not by the size) as an AsyncRead.
    let array = cont.array_create(None, None).await?;
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    array.write(0, Bytes::from(data.clone())).await?;
    assert!(array.read(0, data.len() as u64).await? == data);
    let streamed = tokio::io::copy(&mut array.reader(0, u64::MAX), &mut tokio::io::sink())
        .await
        .map_err(|e| ShoalError::Io(e.to_string()))?;
    println!("array {}: wrote and read back {} bytes, streamed {streamed}", array.oid(), data.len());

    // Where it lives: one line per group of shards.
    for (g, group) in array.object().layout()?.groups.iter().enumerate() {
        let places: Vec<String> = group.iter().map(|s| format!("rank {} target {}", s.rank, s.target)).collect();
        println!("  group {g}: {}", places.join(", "));
    }
    array.destroy().await?;
    println!("quickstart OK");
    Ok(())
}
