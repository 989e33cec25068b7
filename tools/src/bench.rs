//! `shoal bench`: benchmark programs that print numbers (never tests).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use shoal_common::msg::{FetchIod, UpdateIod, ValueKind};
use shoal_common::{ContId, Oid, EPOCH_MAX};
use shoal_tools::local::LocalServer;

use crate::bench_matrix::DiskTool;
use tokio::task::JoinSet;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// One local server: 4 KiB put/get rates and 1 MiB extent bandwidth,
    /// with the raw disk's figures (fio, or Shoal's O_DIRECT probe).
    Store(StoreArgs),
    /// The benchmark matrix: classes x APIs x I/O sizes x offsets x
    /// gathering x patterns x sharing x client processes (or the
    /// checkpoint workload)
    /// on a local cluster or a running one, with bandwidth, IOPS, latency
    /// percentiles, space and CPU per GiB, and the raw disk's figures.
    #[command(alias = "cluster")]
    Matrix(Box<crate::bench_matrix::MatrixArgs>),
    /// One client process of a matrix cell (started by `bench matrix`).
    #[command(hide = true)]
    Worker(crate::bench_matrix::WorkerArgs),
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

pub async fn run(ctx: &crate::Ctx, cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Store(a) => store(a).await,
        BenchCmd::Matrix(a) => crate::bench_matrix::run(ctx, *a).await,
        BenchCmd::Worker(a) => crate::bench_matrix::worker(a).await,
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

    // The same disk measured as `bench matrix` does: fio, or without it
    // Shoal's own O_DIRECT probe.
    let disk = crate::bench_matrix::disk_figures(&base, DiskTool::Auto, (a.mib << 20).min(1 << 30))?;
    println!("shoal bench store: 1 server, {} targets, {} in flight, dir {}", a.targets, a.concurrency, base.display());
    let raw = format!("raw disk ({})", disk.tool);
    println!("{:<34} {:>14} {:>22}", "operation", "shoal", raw);
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
        "ratios: put {:.2}x of 4 KiB write+fdatasync QD1, write {:.2}x and read {:.2}x of 1 MiB O_DIRECT QD16 bandwidth",
        (a.puts as f64 / put) / disk.sync_4k_iops,
        (a.mib as f64 / write) / disk.write_mib_s,
        (a.mib as f64 / read) / disk.read_mib_s
    );
    Ok(())
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
