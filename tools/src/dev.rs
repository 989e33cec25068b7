//! `shoal dev up|down`: a local cluster of real server processes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use shoal_tools::local::LocalCluster;

use crate::{out, Ctx};

#[derive(Debug, Subcommand)]
pub enum DevCmd {
    /// Starts N servers on loopback (ports chosen by the OS); server 0 hosts
    /// the management service. Writes the cluster file other commands use.
    Up {
        /// Number of servers.
        #[arg(long, default_value_t = 6)]
        servers: usize,
        /// Targets per server.
        #[arg(long, default_value_t = 2)]
        targets: u32,
        /// Directory for the servers' data and logs.
        #[arg(long, default_value = "/tmp/shoal-dev")]
        dir: PathBuf,
    },
    /// Stops the servers of the cluster file (SIGTERM, then SIGKILL after
    /// 30 s) and removes the file.
    Down {
        /// Also delete the cluster's data directory.
        #[arg(long)]
        clean: bool,
    },
}

/// The cluster file: where the management service is, and which local
/// processes make up the dev cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    pub ms: Vec<String>,
    pub dir: PathBuf,
    pub servers: Vec<DevServer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevServer {
    pub dir: PathBuf,
    pub addr: String,
    pub pid: u32,
}

impl ClusterFile {
    pub fn load(path: &Path) -> anyhow::Result<ClusterFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

pub async fn run(ctx: &Ctx, cmd: DevCmd) -> anyhow::Result<()> {
    match cmd {
        DevCmd::Up { servers, targets, dir } => up(ctx, servers, targets, &dir).await,
        DevCmd::Down { clean } => down(ctx, clean).await,
    }
}

async fn up(ctx: &Ctx, n: usize, targets: u32, dir: &Path) -> anyhow::Result<()> {
    if let Ok(f) = ClusterFile::load(&ctx.cluster_file) {
        if f.servers.iter().any(|s| alive(s.pid)) {
            bail!("a dev cluster is already running (see {}); `shoal dev down` first", ctx.cluster_file.display());
        }
    }
    if n == 0 || n > 64 {
        bail!("--servers must be between 1 and 64");
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} is not empty; pick another --dir or remove it (shoal dev down --clean)", dir.display());
    }
    let cluster = LocalCluster::start(dir, n, targets).await?;
    let ms = cluster.ms();
    let mut servers = Vec::new();
    for s in cluster.servers {
        let (d, addr) = (s.dir.clone(), s.addr.clone());
        let pid = s.detach().context("server process")?;
        servers.push(DevServer { dir: d, addr, pid });
    }
    let file = ClusterFile { ms: vec![ms], dir: dir.to_path_buf(), servers };
    if let Some(parent) = ctx.cluster_file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&ctx.cluster_file, serde_json::to_string_pretty(&file)?)?;
    if ctx.json {
        return out::json(&file);
    }
    let mut t = out::table(&["server", "address", "pid", "data directory"]);
    for (i, s) in file.servers.iter().enumerate() {
        t.add_row(vec![i.to_string(), s.addr.clone(), s.pid.to_string(), s.dir.display().to_string()]);
    }
    println!("{t}");
    println!("management service at {}; cluster file {}", file.ms[0], ctx.cluster_file.display());
    Ok(())
}

async fn down(ctx: &Ctx, clean: bool) -> anyhow::Result<()> {
    let f = ClusterFile::load(&ctx.cluster_file).context("no dev cluster to stop")?;
    for s in &f.servers {
        if alive(s.pid) {
            // SAFETY: plain kill(2) on a pid this tool started.
            unsafe { libc::kill(s.pid as i32, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.servers.iter().any(|s| alive(s.pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in f.servers.iter().filter(|s| alive(s.pid)) {
        eprintln!("server {} (pid {}) ignored SIGTERM; killing it", s.addr, s.pid);
        // SAFETY: as above.
        unsafe { libc::kill(s.pid as i32, libc::SIGKILL) };
    }
    std::fs::remove_file(&ctx.cluster_file)?;
    if clean {
        std::fs::remove_dir_all(&f.dir).with_context(|| format!("remove {}", f.dir.display()))?;
    }
    println!("stopped {} servers{}", f.servers.len(), if clean { " and removed their data" } else { "" });
    Ok(())
}
