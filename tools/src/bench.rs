//! `shoal bench`: benchmark programs that print numbers (never tests).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use shoal_common::mgmt::ContProps;
use shoal_common::msg::{FetchIod, UpdateIod, ValueKind};
use shoal_common::oclass::ObjectClass;
use shoal_common::{ContId, Oid, EPOCH_MAX};
use shoal_tools::local::{LocalCluster, LocalServer};
use tokio::task::JoinSet;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// One local server: 4 KiB put/get rates and 1 MiB extent bandwidth,
    /// with dd's figures for the same disk.
    Store(StoreArgs),
    /// A local multi-server cluster: 1 MiB array write/read bandwidth and
    /// KV put/get rates per object class, with dd's figures beside them.
    Cluster(ClusterArgs),
    /// A local cluster loses a server under a foreground writer: time to
    /// detect, to exclusion and to full redundancy, rebuild throughput,
    /// and foreground bandwidth before, during and after rebuild.
    Rebuild(crate::bench_rebuild::RebuildArgs),
    /// A local cluster with a replicated MS loses its MS leader, again and
    /// again: time from the kill until a change is committed and a read is
    /// answered by the new leader.
    Failover(crate::bench_failover::FailoverArgs),
    /// A local cluster mounted with FUSE: sequential bandwidth and file
    /// create/stat/unlink rates through the mount, through the native API
    /// and on the local disk, with the ratios.
    Fs(crate::bench_fs::FsArgs),
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Directory on the disk to measure (default: a temporary one under /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Servers in the cluster.
    #[arg(long, default_value_t = 6)]
    servers: usize,
    /// Targets per server.
    #[arg(long, default_value_t = 2)]
    targets: u32,
    /// MiB written (and read) per class, as 1 MiB array writes.
    #[arg(long, default_value_t = 128)]
    mib: u64,
    /// KV puts (and gets) per class, 4 KiB values.
    #[arg(long, default_value_t = 5000)]
    kv_ops: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Classes to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "S1,SX,RP_2G1,RP_3GX,EC_2P1G1,EC_4P2G1,EC_4P2GX")]
    classes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// Directory on the disk to measure (default: a temporary one under /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Targets of the server.
    #[arg(long, default_value_t = 2)]
    targets: u32,
    /// Number of 4 KiB puts (and gets).
    #[arg(long, default_value_t = 20000)]
    puts: u64,
    /// MiB written (and read) as 1 MiB extents.
    #[arg(long, default_value_t = 512)]
    mib: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Store(a) => store(a).await,
        BenchCmd::Cluster(a) => cluster(a).await,
        BenchCmd::Rebuild(a) => crate::bench_rebuild::run(a).await,
        BenchCmd::Failover(a) => crate::bench_failover::run(a).await,
        BenchCmd::Fs(a) => crate::bench_fs::run(a).await,
    }
}

const CONT: ContId = ContId(0xbe7c);

/// Runs `n` operations with `conc` in flight and returns the seconds taken.
async fn drive<F, Fut>(n: u64, conc: usize, f: F) -> anyhow::Result<f64>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let t = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..n {
        set.spawn(f(i));
        if set.len() >= conc {
            set.join_next().await.context("join")???;
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(t.elapsed().as_secs_f64())
}

async fn store(a: StoreArgs) -> anyhow::Result<()> {
    let (base, _tmp) = bench_dir(a.dir)?;
    let mut srv = LocalServer::start(&base.join("server0"), a.targets).await?;
    let c = Arc::new(srv.client());
    let t = a.targets as u64;
    let val = Bytes::from(vec![0xabu8; 4096]);

    let put = {
        let (c, val) = (c.clone(), val.clone());
        drive(a.puts, a.concurrency, move |i| {
            let (c, val) = (c.clone(), val.clone());
            async move {
                let iods = vec![UpdateIod::new(b"v", ValueKind::Single, &val)];
                c.update((i % t) as u32, CONT, Oid::new(0, 1), &i.to_be_bytes(), iods, vec![val]).await?;
                Ok(())
            }
        })
        .await?
    };
    let get = {
        let c = c.clone();
        drive(a.puts, a.concurrency, move |i| {
            let c = c.clone();
            async move {
                let iods = vec![FetchIod { akey: b"v".to_vec(), kind: ValueKind::Single }];
                let r = c.fetch((i % t) as u32, CONT, Oid::new(0, 1), &i.to_be_bytes(), EPOCH_MAX, iods).await?;
                ensure!(r[0].1.len() == 4096, "short read");
                Ok(())
            }
        })
        .await?
    };
    let mib = Bytes::from(vec![0x5au8; 1 << 20]);
    let kind = ValueKind::Array { rec_size: 1, start: 0, nr: 1 << 20 };
    let conc = a.concurrency.min(8);
    let write = {
        let (c, mib) = (c.clone(), mib.clone());
        drive(a.mib, conc, move |i| {
            let (c, mib) = (c.clone(), mib.clone());
            async move {
                let iods = vec![UpdateIod::new(b"d", kind, &mib)];
                c.update((i % t) as u32, CONT, Oid::new(0, 2), &i.to_be_bytes(), iods, vec![mib]).await?;
                Ok(())
            }
        })
        .await?
    };
    let read = {
        let c = c.clone();
        drive(a.mib, conc, move |i| {
            let c = c.clone();
            async move {
                let iods = vec![FetchIod { akey: b"d".to_vec(), kind }];
                let r = c.fetch((i % t) as u32, CONT, Oid::new(0, 2), &i.to_be_bytes(), EPOCH_MAX, iods).await?;
                ensure!(r[0].1.len() == 1 << 20, "short read");
                Ok(())
            }
        })
        .await?
    };
    srv.terminate()?;

    let disk = dd_figures(&base, a.mib.min(1024), 2000)?;
    println!("shoal bench store: 1 server, {} targets, {} in flight, dir {}", a.targets, a.concurrency, base.display());
    println!("{:<34} {:>14} {:>22}", "operation", "shoal", "raw disk (dd)");
    println!("{:<34} {:>12.0}/s {:>20.0}/s", "4 KiB put (durable)", a.puts as f64 / put, disk.sync_4k_iops);
    println!("{:<34} {:>12.0}/s {:>22}", "4 KiB get", a.puts as f64 / get, "-");
    println!(
        "{:<34} {:>10.0} MiB/s {:>16.0} MiB/s",
        "1 MiB extent write (durable)",
        a.mib as f64 / write,
        disk.write_mib_s
    );
    println!("{:<34} {:>10.0} MiB/s {:>16.0} MiB/s", "1 MiB extent read", a.mib as f64 / read, disk.read_mib_s);
    println!(
        "ratios: put {:.2}x of dd 4k dsync writes, write {:.2}x and read {:.2}x of dd bandwidth",
        (a.puts as f64 / put) / disk.sync_4k_iops,
        (a.mib as f64 / write) / disk.write_mib_s,
        (a.mib as f64 / read) / disk.read_mib_s
    );
    Ok(())
}

struct Disk {
    sync_4k_iops: f64,
    write_mib_s: f64,
    read_mib_s: f64,
}

/// Runs dd on the same file system: synced 4 KiB writes, and 1 MiB
/// sequential write (fdatasync at the end) and direct read.
fn dd_figures(dir: &Path, mib: u64, small: u64) -> anyhow::Result<Disk> {
    let f = dir.join("dd.tmp");
    let of = format!("of={}", f.display());
    let iff = format!("if={}", f.display());
    let time = |args: &[&str]| -> anyhow::Result<f64> {
        let t = Instant::now();
        let out = Command::new("dd").args(args).output().context("run dd")?;
        ensure!(out.status.success(), "dd failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(t.elapsed().as_secs_f64())
    };
    let small_s = time(&["if=/dev/zero", &of, "bs=4k", &format!("count={small}"), "oflag=dsync"])?;
    let write_s = time(&["if=/dev/zero", &of, "bs=1M", &format!("count={mib}"), "conv=fdatasync"])?;
    let read_s = time(&[&iff, "of=/dev/null", "bs=1M", "iflag=direct"])?;
    std::fs::remove_file(&f).ok();
    Ok(Disk {
        sync_4k_iops: small as f64 / small_s,
        write_mib_s: mib as f64 / write_s,
        read_mib_s: mib as f64 / read_s,
    })
}

/// The directory a benchmark's servers keep their data in: the one given,
/// or a temporary one under /var/tmp (removed when the second value drops).
pub(crate) fn bench_dir(dir: Option<PathBuf>) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            Ok((d, None))
        }
        None => {
            let t = tempfile::Builder::new().prefix("shoal-bench-").tempdir_in("/var/tmp")?;
            Ok((t.path().to_path_buf(), Some(t)))
        }
    }
}

/// Per-class results of `bench cluster`.
struct ClassRun {
    class: ObjectClass,
    write: f64,
    read: f64,
    put: f64,
    get: f64,
}

async fn cluster(a: ClusterArgs) -> anyhow::Result<()> {
    let classes: Vec<ObjectClass> =
        a.classes.iter().map(|c| c.parse()).collect::<Result<_, _>>().map_err(|e| anyhow::anyhow!("--classes: {e}"))?;
    let (base, _tmp) = bench_dir(a.dir)?;
    let mut cluster = LocalCluster::start(&base.join("cluster"), a.servers, a.targets).await?;
    let client = cluster.client().await?;
    client.pool_create("bench", vec![], 0).await?;
    let pool = client.pool_connect("bench").await?;
    let mut runs = Vec::new();
    for (i, class) in classes.iter().enumerate() {
        let label = format!("c{i}");
        pool.cont_create(&label, ContProps { oclass: Some(class.to_string()), ..ContProps::default() }).await?;
        let cont = pool.cont_open(&label).await?;
        let array = Arc::new(cont.array_create(None, None).await?);
        let mib = Bytes::from(vec![0x5au8; 1 << 20]);
        let write = {
            let (array, mib) = (array.clone(), mib.clone());
            drive(a.mib, a.concurrency.min(8), move |i| {
                let (array, mib) = (array.clone(), mib.clone());
                async move {
                    array.write(i << 20, mib).await?;
                    Ok(())
                }
            })
            .await?
        };
        let read = {
            let array = array.clone();
            drive(a.mib, a.concurrency.min(8), move |i| {
                let array = array.clone();
                async move {
                    let r = array.read(i << 20, 1 << 20).await?;
                    ensure!(r.len() == 1 << 20, "short read");
                    Ok(())
                }
            })
            .await?
        };
        let kv = Arc::new(cont.kv_create(None).await?);
        let val = Bytes::from(vec![0xabu8; 4096]);
        let put = {
            let (kv, val) = (kv.clone(), val.clone());
            drive(a.kv_ops, a.concurrency, move |i| {
                let (kv, val) = (kv.clone(), val.clone());
                async move {
                    kv.put(&i.to_be_bytes(), val).await?;
                    Ok(())
                }
            })
            .await?
        };
        let get = {
            let kv = kv.clone();
            drive(a.kv_ops, a.concurrency, move |i| {
                let kv = kv.clone();
                async move {
                    ensure!(kv.get(&i.to_be_bytes()).await?.map(|v| v.len()) == Some(4096), "short get");
                    Ok(())
                }
            })
            .await?
        };
        runs.push(ClassRun {
            class: *class,
            write: a.mib as f64 / write,
            read: a.mib as f64 / read,
            put: a.kv_ops as f64 / put,
            get: a.kv_ops as f64 / get,
        });
        // Containers are not reclaimed yet; punching keeps the disk bounded.
        array.destroy().await?;
    }
    for s in cluster.servers.iter_mut() {
        s.terminate()?;
    }
    let disk = dd_figures(&base, a.mib.min(1024), 2000)?;
    println!(
        "shoal bench cluster: {} servers x {} targets on loopback, {} MiB and {} KV ops per class, dir {}",
        a.servers,
        a.targets,
        a.mib,
        a.kv_ops,
        base.display()
    );
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>14} {:>10}",
        "class", "write MiB/s", "read MiB/s", "KV put/s", "KV get/s", "space"
    );
    for r in &runs {
        let space = match r.class.redundancy {
            shoal_common::oclass::Redundancy::None => 1.0,
            shoal_common::oclass::Redundancy::Replicas(n) => n as f64,
            shoal_common::oclass::Redundancy::Ec { k, p } => (k + p) as f64 / k as f64,
        };
        println!(
            "{:<10} {:>14.0} {:>14.0} {:>14.0} {:>14.0} {:>9.2}x",
            r.class.to_string(),
            r.write,
            r.read,
            r.put,
            r.get,
            space
        );
    }
    println!(
        "raw disk (dd): {:.0} MiB/s write (fdatasync), {:.0} MiB/s read (O_DIRECT), {:.0} synced 4 KiB writes/s",
        disk.write_mib_s, disk.read_mib_s, disk.sync_4k_iops
    );
    Ok(())
}
