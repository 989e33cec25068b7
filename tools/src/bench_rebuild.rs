//! `shoal bench rebuild`: what a server failure costs on a local cluster.
//!
//! A foreground writer runs throughout; one server is killed with SIGKILL.
//! Printed: time to detect (the MS declares it down), time to exclusion,
//! time to full redundancy (rebuild done), rebuild throughput (bytes the
//! dead server held per second of rebuild), the foreground bandwidth
//! before, during and after rebuild, its longest write, and whether every
//! byte written before and during the failure reads back.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use clap::Args;
use futures::stream::{self, StreamExt, TryStreamExt};
use shoal_common::mgmt::{ContProps, MemberState};
use shoal_common::oclass::ObjectClass;
use shoal_common::placement::TargetState;
use shoal_tools::local::{pattern, LocalCluster};

#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// Directory for the servers' data (default: a temporary one under /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Servers in the cluster.
    #[arg(long, default_value_t = 6)]
    servers: usize,
    /// Targets per server.
    #[arg(long, default_value_t = 2)]
    targets: u32,
    /// Object class of the data (its container's rd_fac is what it tolerates).
    #[arg(long, default_value = "EC_2P2G1")]
    class: String,
    /// MiB written before the failure, in 1 MiB array writes over 8 arrays.
    #[arg(long, default_value_t = 512)]
    mib: u64,
    /// Foreground 1 MiB writes in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Seconds of foreground bandwidth measured before the kill and after rebuild.
    #[arg(long, default_value_t = 5)]
    window: u64,
    /// Grace between DOWN and exclusion (the servers' --exclude-after).
    #[arg(long, default_value = "3s")]
    exclude_after: String,
}

/// Bytes the foreground writer completed, with when.
#[derive(Default)]
struct Foreground {
    done: Mutex<Vec<(Instant, u64)>>,
    longest: Mutex<Duration>,
    errors: AtomicU64,
    stop: AtomicBool,
}

impl Foreground {
    /// MiB/s completed between `from` and `to`.
    fn rate(&self, from: Instant, to: Instant) -> f64 {
        let done = self.done.lock().expect("lock");
        let bytes: u64 = done.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, b)| b).sum();
        let secs = to.saturating_duration_since(from).as_secs_f64();
        if secs == 0.0 {
            return 0.0;
        }
        bytes as f64 / secs / (1 << 20) as f64
    }
}

pub async fn run(a: RebuildArgs) -> anyhow::Result<()> {
    let class: ObjectClass = a.class.parse()?;
    let rd_fac = class.tolerated_failures();
    ensure!(rd_fac >= 1, "class {class} survives no failure; rebuild needs a redundant class");
    ensure!(a.servers as u32 > class.group_size(), "{class} needs more than {} servers to have a spare", a.servers);
    let (dir, _tmp) = crate::bench::bench_dir(a.dir)?;
    let mut cluster =
        LocalCluster::start_with(&dir, a.servers, a.targets, &["--exclude-after", &a.exclude_after]).await?;
    let client = cluster.client().await?;
    client.pool_create("bench", vec![], 0).await?;
    let pool = client.pool_connect("bench").await?;
    let props = ContProps { oclass: Some(class.to_string()), rd_fac, ..ContProps::default() };
    pool.cont_create("data", props).await?;
    let cont = pool.cont_open("data").await?;

    // The data the failure puts at risk.
    let arrays: Vec<_> = stream::iter(0..8).then(|_| cont.array_create(None, None)).try_collect::<Vec<_>>().await?;
    let per = a.mib.div_ceil(8);
    let t = Instant::now();
    stream::iter(0..per * 8)
        .map(|i| {
            let array = arrays[(i % 8) as usize].clone();
            async move { array.write((i / 8) << 20, Bytes::from(pattern(i, 1 << 20))).await }
        })
        .buffer_unordered(a.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let fill = per * 8;
    println!(
        "shoal bench rebuild: {} servers x {} targets, {class} (rd_fac {rd_fac}), dir {}",
        a.servers,
        a.targets,
        dir.display()
    );
    println!("  wrote {fill} MiB in {:.1?} ({:.0} MiB/s)", t.elapsed(), fill as f64 / t.elapsed().as_secs_f64());

    // The victim: a server holding a shard of the foreground array (so
    // the writer meets the failure), not the MS's (the first).
    let fg_array = cont.array_create(None, None).await?;
    let members = client.system_query().await?.members;
    let index_of = |rank: u32| {
        let addr = &members.iter().find(|m| m.rank == rank)?.addr;
        cluster.servers.iter().position(|s| &s.addr == addr)
    };
    let (victim, rank) = fg_array.object().layout()?.groups[0]
        .iter()
        .rev()
        .find_map(|s| index_of(s.rank).filter(|&i| i != 0).map(|i| (i, s.rank)))
        .context("no server of the foreground array's group to kill")?;
    let mut held = 0u64;
    for t in 0..a.targets {
        held += cluster.servers[victim].client().target_query(t).await?.data_bytes;
    }

    // Foreground: 1 MiB writes over a 64 MiB region of its own array,
    // throughout; each checks out at the end.
    let fg = Arc::new(Foreground::default());
    let writer = {
        let (fg, array, conc) = (fg.clone(), fg_array.clone(), a.concurrency);
        tokio::spawn(async move {
            let next = Arc::new(AtomicU64::new(0));
            let workers = (0..conc).map(|_| {
                let (fg, array, next) = (fg.clone(), array.clone(), next.clone());
                async move {
                    while !fg.stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let t = Instant::now();
                        match array.write((i % 64) << 20, Bytes::from(pattern(i % 64, 1 << 20))).await {
                            Ok(_) => {
                                let now = Instant::now();
                                fg.done.lock().expect("lock").push((now, 1 << 20));
                                let mut l = fg.longest.lock().expect("lock");
                                *l = (*l).max(now - t);
                            }
                            Err(e) => {
                                eprintln!("foreground write failed: {e}");
                                fg.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            });
            futures::future::join_all(workers).await;
        })
    };
    let window = Duration::from_secs(a.window);
    let before_start = Instant::now();
    tokio::time::sleep(window).await;
    let killed = Instant::now();
    cluster.servers[victim].kill9();
    println!("  killed server {victim} (rank {rank}), which held {:.0} MiB of extents", held as f64 / (1 << 20) as f64);

    let (mut detected, mut excluded) = (None, None);
    let done = loop {
        let now = Instant::now();
        ensure!(now - killed < Duration::from_secs(300), "rebuild did not finish within 300 s");
        if detected.is_none() {
            let q = client.system_query().await?;
            if q.members.iter().any(|m| m.rank == rank && matches!(m.state, MemberState::Down | MemberState::Excluded))
            {
                detected = Some(now);
            }
        }
        let p = client.pool_query("bench").await?;
        let out = p.map.targets.iter().any(|t| t.rank == rank && t.state == TargetState::DownOut);
        if out && excluded.is_none() {
            excluded = Some(now);
            detected.get_or_insert(now);
        }
        if out && p.rebuilding.is_empty() {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let detected = detected.unwrap_or(done);
    let excluded = excluded.unwrap_or(done);
    tokio::time::sleep(window).await;
    let after_end = Instant::now();
    fg.stop.store(true, Ordering::Relaxed);
    writer.await?;

    // Every byte, with the rebuilt shards in use: kill one more server if
    // the class survives two.
    if rd_fac >= 2 {
        let second = (1..a.servers).find(|&i| i != victim).context("no second server")?;
        cluster.servers[second].kill9();
    }
    let t = Instant::now();
    stream::iter(0..fill)
        .map(|i| {
            let array = arrays[(i % 8) as usize].clone();
            async move {
                let got = array.read((i / 8) << 20, 1 << 20).await?;
                ensure!(got == pattern(i, 1 << 20)[..], "MiB {i} read back wrong");
                Ok(())
            }
        })
        .buffer_unordered(a.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    for i in 0..64u64 {
        let got = fg_array.read(i << 20, 1 << 20).await?;
        ensure!(got == pattern(i, 1 << 20)[..], "foreground MiB {i} read back wrong");
    }
    let checked = t.elapsed();

    let secs = |d: Duration| d.as_secs_f64();
    let rebuild = done - excluded;
    println!("{:<44} {:>10.2} s", "time to detect (declared DOWN)", secs(detected - killed));
    println!("{:<44} {:>10.2} s", "time to exclusion (DOWNOUT)", secs(excluded - killed));
    println!("{:<44} {:>10.2} s", "time to full redundancy (rebuild done)", secs(done - killed));
    println!("{:<44} {:>10.2} s", "rebuild (exclusion to done)", secs(rebuild));
    println!(
        "{:<44} {:>10.0} MiB/s",
        "rebuild throughput (dead server's extents)",
        held as f64 / (1 << 20) as f64 / secs(rebuild).max(0.001)
    );
    println!("{:<44} {:>10.0} MiB/s", "foreground writes before the kill", fg.rate(before_start, killed));
    println!("{:<44} {:>10.0} MiB/s", "foreground writes, kill to exclusion", fg.rate(killed, excluded));
    println!("{:<44} {:>10.0} MiB/s", "foreground writes during rebuild", fg.rate(excluded, done));
    println!("{:<44} {:>10.0} MiB/s", "foreground writes after rebuild", fg.rate(done, after_end));
    println!("{:<44} {:>10.2} s", "longest foreground write", secs(*fg.longest.lock().expect("lock")));
    println!("{:<44} {:>10}", "foreground writes that failed", fg.errors.load(Ordering::Relaxed));
    println!(
        "every byte read back correctly{} in {checked:.1?}",
        if rd_fac >= 2 { " with a second server dead" } else { "" }
    );
    ensure!(fg.errors.load(Ordering::Relaxed) == 0, "foreground writes failed");
    for s in cluster.servers.iter_mut().filter(|s| s.pid().is_some()) {
        s.terminate()?;
    }
    Ok(())
}
