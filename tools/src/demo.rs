//! `shoal demo`: the README's main job. A 6-server local cluster takes KV
//! pairs and a large EC array, loses a server, and reads everything back.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use clap::Args;
use futures::stream::{self, StreamExt, TryStreamExt};
use shoal_common::mgmt::ContProps;
use shoal_common::oclass::ObjType;
use shoal_tools::local::{ms_flags, pattern, LocalCluster, LocalServer};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory for the servers' data (default: a new temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of servers.
    #[arg(long, default_value_t = 6)]
    servers: usize,
    /// Targets per server.
    #[arg(long, default_value_t = 2)]
    targets: u32,
    /// Number of key-value pairs to write.
    #[arg(long, default_value_t = 2000)]
    keys: u64,
    /// Size of the array to write, in MiB.
    #[arg(long, default_value_t = 256)]
    array_mib: u64,
}

fn value(i: u64) -> Bytes {
    Bytes::from(format!("value-{i}-").repeat(1 + (i % 40) as usize))
}

/// Deterministic bytes for MiB `i` of the array.
fn mib(i: u64) -> Bytes {
    Bytes::from(pattern(i, 1 << 20))
}

/// Reads back every KV pair and array MiB; after the degraded rewrite,
/// every key and the first `rewritten` MiB hold their second values.
async fn verify(
    kv: &shoal_client::Kv,
    array: &shoal_client::Array,
    keys: u64,
    mibs: u64,
    rewritten: Option<u64>,
) -> anyhow::Result<()> {
    stream::iter(0..keys)
        .map(|i| async move {
            let got = kv.get(format!("key-{i}").as_bytes()).await?;
            let want = if rewritten.is_some() { value(i ^ 0x5a5a) } else { value(i) };
            ensure!(got.as_deref() == Some(&want[..]), "key-{i} read back wrong");
            Ok(())
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    ensure!(array.size().await? == mibs << 20, "array size is wrong");
    stream::iter(0..mibs)
        .map(|i| async move {
            let got = array.read(i << 20, 1 << 20).await?;
            let want = if rewritten.is_some_and(|r| i < r) { mib(i ^ 0x5a5a) } else { mib(i) };
            ensure!(got == want, "array MiB {i} read back wrong");
            Ok(())
        })
        .buffer_unordered(8)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    ensure!(a.servers >= 4, "the demo needs at least 4 servers");
    let tmp;
    let dir = match a.dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new().prefix("shoal-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!("== starting {} shoal-server processes ({} targets each) under {}", a.servers, a.targets, dir.display());
    let t = Instant::now();
    // A dead server is excluded 3 s after it is declared down (30 s by
    // default), so the demo shows rebuild without a long wait.
    let replicas = if a.servers >= 3 { 3 } else { 1 };
    let mut cluster =
        LocalCluster::start_replicated(&dir, a.servers, a.targets, replicas, &["--exclude-after", "3s"]).await?;
    println!(
        "   all joined the management service ({replicas} Raft replicas at {}) in {:.2?}",
        cluster.ms_addrs.join(", "),
        t.elapsed()
    );
    let client = cluster.client().await?;
    let pool = client.pool_create("demo", vec![], 0).await?;
    println!(
        "== created pool demo ({}): {} targets, map version {}",
        pool.uuid,
        pool.map.targets.len(),
        pool.map.version
    );
    let pool = client.pool_connect("demo").await?;
    let props = ContProps { rd_fac: 1, ..ContProps::default() };
    pool.cont_create("data", props).await?;
    let cont = pool.cont_open("data").await?;
    let (kv_class, kv_why) = cont.class_for(ObjType::Kv)?;
    let (arr_class, arr_why) = cont.class_for(ObjType::Array)?;
    println!("== created container data with rd_fac 1 and automatic classes:");
    println!("   KV objects: {kv_class} ({kv_why})");
    println!("   arrays:     {arr_class} ({arr_why})");

    let kv = cont.kv_create(None).await?;
    cont.name_put("settings", kv.oid()).await?;
    let t = Instant::now();
    stream::iter(0..a.keys)
        .map(|i| {
            let kv = kv.clone();
            async move { kv.put(format!("key-{i}").as_bytes(), value(i)).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let secs = t.elapsed().as_secs_f64();
    println!("== put {} KV pairs into {} in {secs:.2}s ({:.0}/s)", a.keys, kv.oid(), a.keys as f64 / secs);

    let array = cont.array_create(None, None).await?;
    cont.name_put("big", array.oid()).await?;
    let t = Instant::now();
    stream::iter(0..a.array_mib)
        .map(|i| {
            let array = array.clone();
            async move { array.write(i << 20, mib(i)).await }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<_>>()
        .await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "== wrote a {} MiB array {} ({}, chunk {} KiB) in {secs:.2}s ({:.0} MiB/s)",
        a.array_mib,
        array.oid(),
        array.object().class(),
        array.chunk_size() >> 10,
        a.array_mib as f64 / secs
    );

    let t = Instant::now();
    verify(&kv, &array, a.keys, a.array_mib, None).await?;
    println!("== read back every KV pair and every array byte: correct ({:.2?})", t.elapsed());

    let victim = a.servers - 1;
    let pid = cluster.servers[victim].pid().unwrap_or(0);
    cluster.servers[victim].kill9();
    println!("== killed server {victim} ({}, pid {pid}) with SIGKILL", cluster.servers[victim].addr);
    let t = Instant::now();
    verify(&kv, &array, a.keys, a.array_mib, None).await.context("read back after the failure")?;
    println!(
        "== read back everything again with one server dead: correct ({:.2?}); replicas served the KV pairs, EC decoded the array",
        t.elapsed()
    );

    let listed = kv.list().await?.len() as u64;
    ensure!(listed == a.keys, "listed {listed} keys, wrote {}", a.keys);
    println!("== listed {listed} keys with one server dead");

    // Writes go on without the dead server (rd_fac 1): overwrite every key
    // and the first 32 MiB of the array.
    let t = Instant::now();
    stream::iter(0..a.keys)
        .map(|i| {
            let kv = kv.clone();
            async move { kv.put(format!("key-{i}").as_bytes(), value(i ^ 0x5a5a)).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .context("KV writes with one server dead")?;
    let rewrite = a.array_mib.min(32);
    stream::iter(0..rewrite)
        .map(|i| {
            let array = array.clone();
            async move { array.write(i << 20, mib(i ^ 0x5a5a)).await }
        })
        .buffer_unordered(4)
        .try_collect::<Vec<_>>()
        .await
        .context("array writes with one server dead")?;
    println!(
        "== rewrote {} KV pairs and {rewrite} MiB of the array with one server dead (degraded writes) in {:.2?}",
        a.keys,
        t.elapsed()
    );
    // The MS excludes the dead server, and the others rebuild its shards.
    let t = Instant::now();
    loop {
        let p = client.pool_query("demo").await?;
        let out = p.map.targets.iter().any(|t| t.state == shoal_common::placement::TargetState::DownOut);
        if out && p.rebuilding.is_empty() {
            break;
        }
        ensure!(t.elapsed() < Duration::from_secs(120), "rebuild did not finish within 120s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("== the dead server was excluded and its shards rebuilt on the others ({:.2?} more)", t.elapsed());
    let t = Instant::now();
    verify(&kv, &array, a.keys, a.array_mib, Some(rewrite)).await.context("read back after rebuild")?;
    println!("== read back every byte after rebuild: correct ({:.2?})", t.elapsed());

    // The dead server comes back and is reintegrated: it is rebuilt in
    // place (it missed the rewrite) and serves reads again.
    cluster.servers[victim].restart().await?;
    let rank = client
        .system_query()
        .await?
        .members
        .iter()
        .find(|m| m.addr == cluster.servers[victim].addr)
        .map(|m| m.rank)
        .context("the restarted server is not a member")?;
    let t = Instant::now();
    while let Err(e) = client.reintegrate(None, rank).await {
        // The MS refuses a rank it has not heard from yet.
        ensure!(t.elapsed() < Duration::from_secs(30), "reintegrating rank {rank}: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        let p = client.pool_query("demo").await?;
        let mine = p.map.targets.iter().filter(|t| t.rank == rank);
        if p.rebuilding.is_empty() && mine.clone().all(|t| t.state == shoal_common::placement::TargetState::UpIn) {
            break;
        }
        ensure!(t.elapsed() < Duration::from_secs(120), "reintegration did not finish within 120s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("== restarted server {victim} and reintegrated it (rank {rank}): rebuilt in place in {:.2?}", t.elapsed());

    // A healthy server is retired: drained first, so that no object ever
    // has fewer copies than promised, then out.
    let retired = victim - 2;
    let retired_rank = client
        .system_query()
        .await?
        .members
        .iter()
        .find(|m| m.addr == cluster.servers[retired].addr)
        .map(|m| m.rank)
        .context("the server to drain is not a member")?;
    let t = Instant::now();
    client.drain(Some("demo"), retired_rank).await?;
    loop {
        let p = client.pool_query("demo").await?;
        let mine = p.map.targets.iter().filter(|t| t.rank == retired_rank);
        if p.rebuilding.is_empty() && mine.clone().all(|t| t.state == shoal_common::placement::TargetState::DownOut) {
            break;
        }
        ensure!(t.elapsed() < Duration::from_secs(120), "the drain did not finish within 120s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained = t.elapsed();
    cluster.servers[retired].terminate()?;
    let t = Instant::now();
    verify(&kv, &array, a.keys, a.array_mib, Some(rewrite)).await.context("read back after the drain")?;
    println!(
        "== drained server {retired} (rank {retired_rank}): its shards were copied to the others while it served, then it left ({drained:.2?}); stopped it and read back every byte: correct ({:.2?})",
        t.elapsed()
    );

    // A new server joins: the pool is extended onto it, a fair share of
    // the shards move there (copied while the others serve), and the
    // copies left behind are given back.
    let mut extra = ms_flags(&cluster.ms_addrs, "");
    extra.extend(["--exclude-after".to_string(), "3s".to_string()]);
    let added = LocalServer::start_with(&dir.join(format!("server{}", a.servers)), a.targets, extra).await?;
    let t = Instant::now();
    let new_rank = loop {
        let q = client.system_query().await?;
        let m = q.members.iter().find(|m| m.addr == added.addr && m.state == shoal_common::mgmt::MemberState::Joined);
        if let Some(m) = m {
            break m.rank;
        }
        ensure!(t.elapsed() < Duration::from_secs(60), "the new server did not join within 60s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cluster.servers.push(added);
    let t = Instant::now();
    client.pool_extend("demo", vec![new_rank]).await?;
    let joined = loop {
        let p = client.pool_query("demo").await?;
        let mine = p.map.targets.iter().filter(|t| t.rank == new_rank);
        if p.rebuilding.is_empty() && mine.clone().all(|t| t.state == shoal_common::placement::TargetState::UpIn) {
            break p;
        }
        ensure!(t.elapsed() < Duration::from_secs(120), "the extension did not finish within 120s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took = t.elapsed();
    let placement = joined.placement();
    let info = cont.info();
    let moved = [kv.oid(), array.oid()]
        .iter()
        .map(|&oid| {
            let class = shoal_common::oclass::oid_class(oid).unwrap_or(kv_class);
            let layout = placement.layout(info.uuid, oid, class)?;
            Ok(layout.groups.iter().flatten().filter(|s| s.rank == new_rank).count())
        })
        .sum::<shoal_common::Result<usize>>()?;
    let t = Instant::now();
    verify(&kv, &array, a.keys, a.array_mib, Some(rewrite)).await.context("read back after the extension")?;
    println!(
        "== started server {} and extended the pool onto it (rank {new_rank}): {moved} shards of the KV object and the array moved there in {took:.2?}; read back every byte: correct ({:.2?})",
        a.servers,
        t.elapsed()
    );
    let other = victim - 1;
    cluster.servers[other].kill9();
    let t = Instant::now();
    verify(&kv, &array, a.keys, a.array_mib, Some(rewrite)).await.context("read back after reintegration")?;
    println!(
        "== killed server {other} instead; read back every byte with the reintegrated one serving: correct ({:.2?})",
        t.elapsed()
    );

    if replicas > 1 {
        // The management service's leader dies: another replica takes
        // over, and the next management call finds it by itself.
        let q = client.system_query().await?;
        let leader = q.ms_replicas.iter().find(|r| r.role == "leader").context("no MS leader")?;
        let l = cluster.servers.iter().position(|s| s.addr == leader.addr).context("the leader is a server")?;
        cluster.servers[l].kill9();
        let t = Instant::now();
        let p = client.pool_query("demo").await.context("pool query after the MS leader died")?;
        let q = client.system_query().await?;
        let now = q.ms_replicas.iter().find(|r| r.role == "leader").map_or("?".to_string(), |r| r.addr.clone());
        println!(
            "== killed the management service's leader (server {l}): the new leader at {now} answered a pool query (map version {}) {:.2?} later",
            p.map.version,
            t.elapsed()
        );
    }

    for s in cluster.servers.iter_mut().filter(|s| s.pid().is_some()) {
        s.terminate()?;
    }
    println!("== stopped the remaining servers; demo OK");
    Ok(())
}
