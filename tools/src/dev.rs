//! `shoal dev up|down`: a local cluster of real server processes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use shoal_tools::local::{ms_flags, LocalCluster, LocalServer};

use crate::{out, Ctx};

#[derive(Debug, Subcommand)]
pub enum DevCmd {
    /// Starts N servers on loopback; the first ones host the management
    /// service's replicas. Writes the cluster file other commands use.
    Up {
        /// Number of servers.
        #[arg(long, default_value_t = 6)]
        servers: usize,
        /// MS replicas (1, 3 or 5; default 3 with at least 3 servers, else 1).
        #[arg(long)]
        ms_replicas: Option<usize>,
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
    /// Kills one server of the dev cluster with SIGKILL, as a crash would.
    Kill {
        /// The server's rank (`shoal system query`).
        rank: u32,
    },
    /// Starts a killed or stopped server of the dev cluster again, on its
    /// data directory and address.
    Restart {
        /// The server's rank.
        rank: u32,
    },
    /// Adds a server to the dev cluster (it joins the system; `shoal pool
    /// extend` adds it to a pool).
    Add {
        /// Targets of the new server.
        #[arg(long, default_value_t = 2)]
        targets: u32,
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
    if pid == 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

pub async fn run(ctx: &Ctx, cmd: DevCmd) -> anyhow::Result<()> {
    match cmd {
        DevCmd::Up { servers, ms_replicas, targets, dir } => up(ctx, servers, ms_replicas, targets, &dir).await,
        DevCmd::Down { clean } => down(ctx, clean).await,
        DevCmd::Kill { rank } => {
            let (mut f, i) = server_of(ctx, rank).await?;
            if alive(f.servers[i].pid) {
                // SAFETY: plain kill(2) on a pid this tool started.
                unsafe { libc::kill(f.servers[i].pid as i32, libc::SIGKILL) };
            }
            f.servers[i].pid = 0;
            save(ctx, &f)?;
            println!("killed rank {rank} ({}) with SIGKILL", f.servers[i].addr);
            Ok(())
        }
        DevCmd::Restart { rank } => {
            let (mut f, i) = server_of(ctx, rank).await?;
            let s = f.servers[i].clone();
            if s.pid != 0 && alive(s.pid) {
                bail!("rank {rank} ({}) is running (pid {}); `shoal dev kill {rank}` first", s.addr, s.pid);
            }
            let extra = ms_flags(&f.ms, &s.addr);
            let mut server = LocalServer::existing(&s.dir, targets_of(&s.dir)?, &s.addr, extra);
            server.restart().await?;
            f.servers[i].pid = server.detach().context("server process")?;
            save(ctx, &f)?;
            println!("restarted rank {rank} ({}, pid {})", s.addr, f.servers[i].pid);
            Ok(())
        }
        DevCmd::Add { targets } => {
            let mut f = ClusterFile::load(&ctx.cluster_file).context("no dev cluster")?;
            let dir = f.dir.join(format!("server{}", f.servers.len()));
            let server = LocalServer::start_with(&dir, targets, ms_flags(&f.ms, "")).await?;
            let addr = server.addr.clone();
            let pid = server.detach().context("server process")?;
            f.servers.push(DevServer { dir, addr: addr.clone(), pid });
            save(ctx, &f)?;
            println!(
                "added a server at {addr} (pid {pid}); it joins the system, and `shoal pool extend` adds it to a pool"
            );
            Ok(())
        }
    }
}

fn save(ctx: &Ctx, f: &ClusterFile) -> anyhow::Result<()> {
    std::fs::write(&ctx.cluster_file, serde_json::to_string_pretty(f)?)
        .with_context(|| format!("write {}", ctx.cluster_file.display()))
}

/// The cluster file and the index of the server with `rank` in it.
async fn server_of(ctx: &Ctx, rank: u32) -> anyhow::Result<(ClusterFile, usize)> {
    let f = ClusterFile::load(&ctx.cluster_file).context("no dev cluster")?;
    let q = ctx.client().await?.system_query().await?;
    let m = q.members.iter().find(|m| m.rank == rank).with_context(|| format!("no rank {rank} in the system"))?;
    let i = f
        .servers
        .iter()
        .position(|s| s.addr == m.addr)
        .with_context(|| format!("rank {rank} ({}) is not a server of this dev cluster", m.addr))?;
    Ok((f, i))
}

/// The number of targets a data directory was formatted with.
fn targets_of(dir: &Path) -> anyhow::Result<u32> {
    let text = std::fs::read_to_string(dir.join("superblock.json"))
        .with_context(|| format!("read the superblock of {}", dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["targets"].as_u64().map(|t| t as u32).context("superblock without a target count")
}

async fn up(ctx: &Ctx, n: usize, replicas: Option<usize>, targets: u32, dir: &Path) -> anyhow::Result<()> {
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
    let replicas = replicas.unwrap_or(if n >= 3 { 3 } else { 1 });
    if ![1, 3, 5].contains(&replicas) || replicas > n {
        bail!("--ms-replicas must be 1, 3 or 5, and at most --servers ({n})");
    }
    let cluster = LocalCluster::start_replicated(dir, n, targets, replicas, &[]).await?;
    let ms = cluster.ms_addrs.clone();
    let mut servers = Vec::new();
    for s in cluster.servers {
        let (d, addr) = (s.dir.clone(), s.addr.clone());
        let pid = s.detach().context("server process")?;
        servers.push(DevServer { dir: d, addr, pid });
    }
    let file = ClusterFile { ms, dir: dir.to_path_buf(), servers };
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
    println!("management service replicas at {}; cluster file {}", file.ms.join(", "), ctx.cluster_file.display());
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
