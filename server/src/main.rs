//! `shoal-server`: one storage server process.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use shoal_server::config::ServerConfig;
use shoal_server::server::Server;
use tracing_subscriber::EnvFilter;

/// Runs one Shoal storage server.
#[derive(Debug, Parser)]
#[command(name = "shoal-server", version, about)]
struct Args {
    /// TOML configuration file; flags override its fields.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on (port 0: the OS chooses; see <data-dir>/listen.addr).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory holding every target.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Number of targets.
    #[arg(long)]
    targets: Option<u32>,
    /// Log level or tracing filter (RUST_LOG overrides it).
    #[arg(long)]
    log_level: Option<String>,
    /// Host the management service on this server.
    #[arg(long)]
    ms: bool,
    /// Address of the management service (repeatable).
    #[arg(long = "ms-addr")]
    ms_addrs: Vec<String>,
    /// Fault domain of this server (default: its address).
    #[arg(long)]
    fault_domain: Option<String>,
    /// The address others use to reach this server (default: the bound one).
    #[arg(long)]
    advertise: Option<String>,
    /// Memory for request and reply frames held at once ("1GiB").
    #[arg(long)]
    frame_budget: Option<bytesize::ByteSize>,
    /// How much history aggregation leaves readable ("60s").
    #[arg(long, value_parser = humantime::parse_duration)]
    aggregation_delay: Option<std::time::Duration>,
    /// How often targets aggregate ("10s"; "0s": never).
    #[arg(long, value_parser = humantime::parse_duration)]
    aggregation_interval: Option<std::time::Duration>,
    /// (MS) Silence after which a server is declared DOWN ("5s").
    #[arg(long, value_parser = humantime::parse_duration)]
    down_after: Option<std::time::Duration>,
    /// (MS) Time a server stays DOWN before it is excluded ("30s").
    #[arg(long, value_parser = humantime::parse_duration)]
    exclude_after: Option<std::time::Duration>,
    /// Heartbeat period ("1s").
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat: Option<std::time::Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics ("127.0.0.1:9100").
    #[arg(long)]
    metrics: Option<String>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("shoal-server: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    // Test builds read failpoints from $FAILPOINTS ("store::flip_bit=1*return").
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(p) => ServerConfig::load(p)?,
        None => ServerConfig::default(),
    };
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = args.targets {
        cfg.targets = v;
    }
    if let Some(v) = args.log_level {
        cfg.log_level = v;
    }
    if args.ms {
        cfg.ms = true;
    }
    if !args.ms_addrs.is_empty() {
        cfg.ms_addrs = args.ms_addrs;
    }
    if let Some(v) = args.fault_domain {
        cfg.fault_domain = Some(v);
    }
    if let Some(v) = args.advertise {
        cfg.advertise = Some(v);
    }
    if let Some(v) = args.frame_budget {
        cfg.frame_budget = v;
    }
    if let Some(v) = args.aggregation_delay {
        cfg.aggregation_delay = v;
    }
    if let Some(v) = args.aggregation_interval {
        cfg.aggregation_interval = v;
    }
    if let Some(v) = args.heartbeat {
        cfg.heartbeat = v;
    }
    if let Some(v) = args.down_after {
        cfg.down_after = v;
    }
    if let Some(v) = args.exclude_after {
        cfg.exclude_after = v;
    }
    if let Some(v) = args.metrics {
        cfg.metrics = Some(v);
    }
    cfg.validate()?;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log_level))
        .with_context(|| format!("bad log level {:?}", cfg.log_level))?;
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("shoal-server").build()?;
    rt.block_on(async {
        let server = Server::start(cfg).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        server.shutdown().await
    })
}
