//! `shoal bench failover`: how long the management service stops when its
//! leader dies, on a local cluster.
//!
//! The MS leader is killed with SIGKILL again and again; each time, a
//! client that was using it asks for a change (a container create) and a
//! read (a pool query) at once. Printed per kill and as median and worst:
//! the time from the kill until the change is committed and until the
//! read is answered by the new leader, with the default Raft timings. A
//! client holding a pool map writes throughout; its longest write shows
//! that data I/O does not wait for the election.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use clap::Args;
use shoal_common::mgmt::ContProps;
use shoal_tools::local::LocalCluster;

#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Directory for the servers' data (default: a temporary one under /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// MS replicas (3 or 5); two more servers hold the data.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Leader kills.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Seconds the cluster runs between kills.
    #[arg(long, default_value_t = 2)]
    pause: u64,
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn summary(what: &str, mut v: Vec<Duration>) {
    v.sort();
    println!("{what:<28} median {:>6} ms   worst {:>6} ms", ms(v[v.len() / 2]), ms(*v.last().expect("a kill")));
}

pub async fn run(a: FailoverArgs) -> anyhow::Result<()> {
    ensure!(matches!(a.replicas, 3 | 5), "--replicas is 3 or 5 (a single replica cannot fail over)");
    ensure!(a.kills >= 1, "--kills is at least 1");
    let (dir, _tmp) = crate::bench::bench_dir(a.dir)?;
    let n = a.replicas + 2;
    let mut cluster = LocalCluster::start_replicated(&dir, n, 1, a.replicas, &[]).await?;
    let client = cluster.client().await?;
    let q = client.system_query().await?;
    let data: Vec<u32> = cluster.servers[a.replicas..]
        .iter()
        .map(|s| q.members.iter().find(|m| m.addr == s.addr).map(|m| m.rank).context("a server did not join"))
        .collect::<anyhow::Result<_>>()?;
    client.pool_create("bench", data, 0).await?;
    let pool = client.pool_connect("bench").await?;
    pool.cont_create("io", ContProps { rd_fac: 1, ..ContProps::default() }).await?;
    let kv = pool.cont_open("io").await?.kv_create(None).await?;

    // Data I/O through a pool map the client holds, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let longest = Arc::new(Mutex::new(Duration::ZERO));
    let writer = {
        let (stop, longest) = (stop.clone(), longest.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                kv.put(format!("k{}", n % 64), Bytes::from(vec![n as u8; 4096])).await?;
                let took = t.elapsed();
                {
                    let mut l = longest.lock().expect("lock");
                    *l = (*l).max(took);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(n)
        })
    };

    println!(
        "shoal bench failover: {} MS replicas (+2 data servers), {} leader kills, default Raft timings",
        a.replicas, a.kills
    );
    println!("{:>4} {:>10} {:>16} {:>16}", "kill", "leader", "change (ms)", "read (ms)");
    let (mut changes, mut reads) = (Vec::new(), Vec::new());
    for k in 0..a.kills {
        tokio::time::sleep(Duration::from_secs(a.pause)).await;
        let l = cluster.ms_leader(&client, Duration::from_secs(60)).await?;
        // The client knows the leader (it just answered), as a busy one would.
        cluster.servers[l].kill9();
        let killed = Instant::now();
        let label = format!("after-kill-{k}");
        let change = async {
            pool.cont_create(&label, ContProps::default()).await?;
            anyhow::Ok(killed.elapsed())
        };
        let read = async {
            client.pool_query("bench").await?;
            anyhow::Ok(killed.elapsed())
        };
        let (change, read) = tokio::join!(change, read);
        let (change, read) = (change?, read?);
        println!("{:>4} {:>10} {:>16} {:>16}", k + 1, format!("server {l}"), ms(change), ms(read));
        changes.push(change);
        reads.push(read);
        cluster.servers[l].restart().await?;
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await??;
    println!();
    summary("kill -> change committed", changes);
    summary("kill -> read answered", reads);
    println!(
        "data I/O meanwhile: {writes} 4 KiB writes, longest {} ms (goal: a new leader serves within 2000 ms)",
        ms(*longest.lock().expect("lock"))
    );
    Ok(())
}
