//! `shoal`: the Shoal command-line tool.

mod bench;
mod demo;

use clap::{Parser, Subcommand};

/// Shoal: a distributed object store.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Starts a local server and shows it working: writes, reads, versioned
    /// reads, punches, a SIGKILL and a replay, with every byte checked.
    Demo(demo::DemoArgs),
    /// Benchmarks; each prints its numbers and the raw disk's beside them.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Asks a server who it is.
    Ping {
        /// Server address (host:port).
        addr: String,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Bench(b) => bench::run(b).await,
        Cmd::Ping { addr } => ping(&addr).await,
    };
    if let Err(e) = r {
        eprintln!("shoal: {e:#}");
        std::process::exit(1);
    }
}

async fn ping(addr: &str) -> anyhow::Result<()> {
    let r = shoal_client::ServerClient::tcp(addr).ping().await?;
    println!("{addr}: shoal-server {} with {} targets, epoch {}", r.version, r.targets, r.epoch);
    Ok(())
}
