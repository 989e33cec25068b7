//! `shoal`: the Shoal command-line tool.

mod admin;
mod bench;
mod bench_chart;
mod bench_failover;
mod bench_fs;
mod bench_matrix;
mod bench_rebuild;
mod data;
mod demo;
mod dev;
mod disk_probe;
mod mount;
mod out;
mod salvage;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Shoal: a distributed object store.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    /// Management service address (repeatable). Default: $SHOAL_MS, then
    /// the cluster file written by `shoal dev up`.
    #[arg(long = "ms", global = true)]
    ms: Vec<String>,
    /// The cluster file (default: $SHOAL_CLUSTER or ~/.shoal/cluster.json).
    #[arg(long, global = true)]
    cluster: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// How far this host's clock may be off the management service's
    /// before writes are refused ("5s").
    #[arg(long, global = true, env = "SHOAL_MAX_CLOCK_SKEW", value_parser = humantime::parse_duration)]
    max_clock_skew: Option<std::time::Duration>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A local development cluster of real server processes.
    #[command(subcommand)]
    Dev(dev::DevCmd),
    /// The system: its servers.
    #[command(subcommand)]
    System(admin::SystemCmd),
    /// Pools.
    #[command(subcommand)]
    Pool(admin::PoolCmd),
    /// Containers.
    #[command(subcommand)]
    Cont(admin::ContCmd),
    /// Key-value objects.
    #[command(subcommand)]
    Kv(data::KvCmd),
    /// Array objects.
    #[command(subcommand)]
    Array(data::ArrayCmd),
    /// Starts a 6-server local cluster and shows it working, through a
    /// server failure, with every byte checked.
    Demo(demo::DemoArgs),
    /// Benchmarks; each prints its numbers and the raw disk's beside them.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Mounts a container as a POSIX file system (FUSE).
    Mount(mount::MountArgs),
    /// Unmounts a mount of `shoal mount` (also after its process died).
    Umount(mount::UmountArgs),
    /// The POSIX namespace of a container: layout defaults, checks.
    #[command(subcommand)]
    Fs(mount::FsCmd),
    /// Asks one server who it is.
    Ping {
        /// Server address (host:port).
        addr: String,
    },
}

/// What every command needs to reach the system.
pub struct Ctx {
    ms: Vec<String>,
    cluster_file: PathBuf,
    pub json: bool,
    max_clock_skew: Option<std::time::Duration>,
}

impl Ctx {
    /// The management service addresses, from flags, environment or the
    /// cluster file.
    pub fn ms(&self) -> anyhow::Result<Vec<String>> {
        if !self.ms.is_empty() {
            return Ok(self.ms.clone());
        }
        use shoal_client::discover;
        if std::env::var_os(discover::MS_VAR).is_some() {
            return Ok(discover::ms_from_env(None)?);
        }
        discover::ms_from_file(&self.cluster_file).with_context(|| {
            format!(
                "no management service given: pass --ms ADDR, set SHOAL_MS, or start one with `shoal dev up` (looked for {})",
                self.cluster_file.display()
            )
        })
    }

    /// A client connected to the management service.
    pub async fn client(&self) -> anyhow::Result<shoal_client::Client> {
        let ms = self.ms()?;
        let mut b = shoal_client::Client::builder().ms(ms.clone());
        if let Some(skew) = self.max_clock_skew {
            b = b.max_clock_skew(skew);
        }
        b.connect().await.with_context(|| format!("connect to the management service at {}", ms.join(",")))
    }
}

fn default_cluster_file() -> PathBuf {
    shoal_client::discover::cluster_file()
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let ctx = Ctx {
        ms: cli.ms,
        cluster_file: cli.cluster.unwrap_or_else(default_cluster_file),
        json: cli.json,
        max_clock_skew: cli.max_clock_skew,
    };
    let r = match cli.cmd {
        Cmd::Dev(c) => dev::run(&ctx, c).await,
        Cmd::System(c) => admin::system(&ctx, c).await,
        Cmd::Pool(c) => admin::pool(&ctx, c).await,
        Cmd::Cont(c) => admin::cont(&ctx, c).await,
        Cmd::Kv(c) => data::kv(&ctx, c).await,
        Cmd::Array(c) => data::array(&ctx, c).await,
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Bench(b) => bench::run(&ctx, b).await,
        Cmd::Mount(a) => mount::mount(&ctx, a).await,
        Cmd::Umount(a) => mount::umount(a),
        Cmd::Fs(c) => mount::fs(&ctx, c).await,
        Cmd::Ping { addr } => ping(&addr).await,
    };
    if let Err(e) = r {
        eprintln!("shoal: {e:#}");
        std::process::exit(1);
    }
}

async fn ping(addr: &str) -> anyhow::Result<()> {
    let r = shoal_client::ServerClient::tcp(addr).ping().await?;
    let rank = r.rank.map_or("not joined".to_string(), |r| format!("rank {r}"));
    println!(
        "{addr}: shoal-server {} ({rank}) with {} targets, epoch {}; frame memory {} of {} in use",
        r.version,
        r.targets,
        r.epoch,
        bytesize::ByteSize::b(r.frame_in_use),
        bytesize::ByteSize::b(r.frame_budget)
    );
    Ok(())
}
