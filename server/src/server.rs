//! Server start-up and shutdown.
//!
//! Start-up order: check and lock the data directory, read or write its
//! superblock, open (and so replay) every target store, bind, publish the
//! bound address in `<data_dir>/listen.addr`, then serve. Nothing is served
//! before every target has replayed.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shoal_net::tcp;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::aggregate;
use crate::config::ServerConfig;
use crate::member;
use crate::ms::Ms;
use crate::service::Service;
use crate::store::{target_dir, StoreOptions, TargetStore};

/// Format version of the data directory layout.
pub const DATA_DIR_FORMAT: u32 = 1;
/// The file in the data directory where the server publishes its address.
pub const ADDR_FILE: &str = "listen.addr";
/// Where a server with `--metrics` writes the address it serves them at
/// (useful with port 0).
pub const METRICS_ADDR_FILE: &str = "metrics.addr";
const SUPERBLOCK: &str = "superblock.json";
const LOCK: &str = "server.lock";

/// The persisted identity of a data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    pub format: u32,
    pub targets: u32,
    /// This server's identity in the system; it keeps its rank across
    /// restarts.
    #[serde(default)]
    pub uuid: u128,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    data_dir: std::path::PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    member: Option<tokio::task::JoinHandle<()>>,
    aggregator: Option<tokio::task::JoinHandle<()>>,
    monitor: tokio::task::JoinHandle<()>,
    rebuilder: Option<tokio::task::JoinHandle<()>>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    service: Arc<Service>,
    _lock: File,
}

/// Checks that `dir` is a usable data directory, locks it against a second
/// server, and returns the lock and the superblock.
fn prepare_data_dir(cfg: &ServerConfig) -> anyhow::Result<(File, Superblock)> {
    let dir = &cfg.data_dir;
    if dir.exists() && !dir.is_dir() {
        bail!("data directory {} exists but is not a directory", dir.display());
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let probe = dir.join(".write-probe");
    fs::write(&probe, b"probe").with_context(|| format!("data directory {} is not writable", dir.display()))?;
    fs::remove_file(&probe).ok();
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))
        .with_context(|| format!("open lock file in {}", dir.display()))?;
    if lock.try_lock().is_err() {
        bail!("data directory {} is in use by another shoal-server", dir.display());
    }
    let sb_path = dir.join(SUPERBLOCK);
    if sb_path.exists() {
        let text = fs::read_to_string(&sb_path).with_context(|| format!("read {}", sb_path.display()))?;
        let mut sb: Superblock =
            serde_json::from_str(&text).with_context(|| format!("{} is not a Shoal superblock", sb_path.display()))?;
        if sb.format != DATA_DIR_FORMAT {
            bail!(
                "data directory {} has format {}, this server reads format {DATA_DIR_FORMAT}",
                dir.display(),
                sb.format
            );
        }
        if sb.targets != cfg.targets {
            bail!(
                "data directory {} was formatted with {} targets but the configuration asks for {}",
                dir.display(),
                sb.targets,
                cfg.targets
            );
        }
        if sb.uuid == 0 {
            sb.uuid = rand::random();
            write_atomically(&sb_path, serde_json::to_string_pretty(&sb)?.as_bytes())?;
        }
        Ok((lock, sb))
    } else {
        // A crash while formatting leaves at most the temporary superblock.
        fs::remove_file(sb_path.with_extension("tmp")).ok();
        let non_empty = fs::read_dir(dir)?.filter_map(|e| e.ok()).any(|e| e.file_name() != LOCK);
        if non_empty {
            bail!("data directory {} is not empty and holds no Shoal superblock; refusing to format it", dir.display());
        }
        let sb = Superblock { format: DATA_DIR_FORMAT, targets: cfg.targets, uuid: rand::random() };
        write_atomically(&sb_path, serde_json::to_string_pretty(&sb)?.as_bytes())?;
        Ok((lock, sb))
    }
}

/// Writes a file so that readers see either nothing or all of it.
fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("rename {}", tmp.display()))?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

impl Server {
    /// Starts a server: opens and replays every target, binds and serves.
    pub async fn start(cfg: ServerConfig) -> anyhow::Result<Server> {
        cfg.validate()?;
        let formatted = !cfg.data_dir.join(SUPERBLOCK).exists();
        let (lock, sb) = prepare_data_dir(&cfg)?;
        fs::remove_file(cfg.data_dir.join(ADDR_FILE)).ok();
        fs::remove_file(cfg.data_dir.join(METRICS_ADDR_FILE)).ok();
        let opts = StoreOptions {
            inline_threshold: cfg.inline_threshold.as_u64() as usize,
            reserve_bytes: cfg.reserve.as_u64(),
            ..StoreOptions::default()
        };
        let mut stores = Vec::new();
        for t in 0..cfg.targets {
            let dir = target_dir(&cfg.data_dir, t);
            let opts = opts.clone();
            let store = tokio::task::spawn_blocking(move || TargetStore::open(&dir, t, opts))
                .await?
                .with_context(|| format!("open target {t}"))?;
            stores.push(Arc::new(store));
        }
        let listener = tcp::bind(&cfg.listen).await?;
        let addr = listener.local_addr()?;
        let advertise = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());
        let ms_addrs = if cfg.ms_addrs.is_empty() && cfg.ms { vec![advertise.clone()] } else { cfg.ms_addrs.clone() };
        // A replica added to a running system (or removed from it) was
        // recorded beside the MS directory; the config names the replicas
        // the system was created with.
        let replicas = match (crate::ms::hosting(&cfg.data_dir)?, cfg.ms) {
            (Some(crate::ms::Hosting::Added(id)), _) => Some((
                crate::ms::added_dir(&cfg.data_dir, id),
                crate::ms::raft::Replicas { me: id, members: Default::default(), founding: false },
            )),
            (Some(crate::ms::Hosting::Removed), ms) => {
                if ms {
                    tracing::warn!(
                        "this server's MS replica was removed (shoal system remove-ms); it hosts none whatever its \
                         config says: take `ms = true` out of it, or add it again with shoal system add-ms"
                    );
                }
                None
            }
            (None, true) => {
                let mut r = crate::ms::raft::Replicas::from_addrs(&ms_addrs, &advertise).with_context(|| {
                    format!("this server hosts an MS replica (--ms) but its address {advertise} is not among the MS addresses {ms_addrs:?}")
                })?;
                // The group is founded on the system's first start only: a
                // replica whose MS directory was lost since (even a lone
                // one, which may have been joined by added replicas) waits
                // to be brought up to date rather than found a second group.
                r.founding = formatted;
                Some((cfg.data_dir.join("ms"), r))
            }
            (None, false) => None,
        };
        let ms = match replicas {
            Some((dir, r)) => {
                let ms = Ms::open(&dir, r).await.context("open the management service")?;
                Some(Arc::new(ms))
            }
            None => None,
        };
        let budget = tcp::Budget::new(cfg.frame_budget.as_u64());
        let service = Arc::new(Service::new(stores, ms, &cfg.data_dir, cfg.max_clock_skew, budget.clone()));
        let shutdown = CancellationToken::new();
        let serve_opts = tcp::ServeOptions { budget, ..tcp::ServeOptions::default() };
        let task = tokio::spawn(tcp::serve(listener, service.clone(), shutdown.clone(), serve_opts));
        let monitor = {
            let l = crate::ms::Liveness { down_after: cfg.down_after, exclude_after: cfg.exclude_after };
            let s = service.clone();
            tokio::spawn(crate::ms::monitor(move || s.ms_handle(), l, shutdown.clone()))
        };
        let aggregator = (!cfg.aggregation_interval.is_zero()).then(|| {
            tokio::spawn(aggregate::run(
                service.clone(),
                cfg.aggregation_interval,
                cfg.aggregation_delay,
                shutdown.clone(),
            ))
        });
        service.set_ms_configured(ms_addrs.clone());
        let member = if ms_addrs.is_empty() {
            None
        } else {
            service.expect_ms();
            let id = member::Identity {
                uuid: sb.uuid,
                addr: advertise.clone(),
                fault_domain: cfg.fault_domain.clone().unwrap_or_else(|| advertise.clone()),
                targets: cfg.targets,
            };
            Some(tokio::spawn(member::run(id, cfg.heartbeat, service.clone(), shutdown.clone())))
        };
        let rebuilder =
            (!ms_addrs.is_empty()).then(|| tokio::spawn(crate::rebuild::run(service.clone(), shutdown.clone())));
        let metrics = match &cfg.metrics {
            Some(at) => {
                let s = service.clone();
                let render: shoal_net::http::Render = Arc::new(move || s.render_metrics());
                let (bound, task) = shoal_net::http::serve_metrics(at, render, shutdown.clone())
                    .await
                    .with_context(|| format!("serve metrics at {at}"))?;
                info!(%bound, "serving Prometheus metrics at /metrics");
                write_atomically(&cfg.data_dir.join(METRICS_ADDR_FILE), bound.to_string().as_bytes())?;
                Some(task)
            }
            None => None,
        };
        write_atomically(&cfg.data_dir.join(ADDR_FILE), addr.to_string().as_bytes())?;
        info!(%addr, targets = cfg.targets, data_dir = %cfg.data_dir.display(), "shoal-server ready");
        Ok(Server {
            addr,
            data_dir: cfg.data_dir.clone(),
            shutdown,
            task,
            member,
            aggregator,
            monitor,
            rebuilder,
            metrics,
            service,
            _lock: lock,
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, finishes in-flight requests, and closes every
    /// target after its pending writes are durable.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("service task")?;
        if let Some(m) = self.member {
            m.await.context("membership task")?;
        }
        if let Some(a) = self.aggregator {
            a.await.context("aggregation task")?;
        }
        self.monitor.await.context("liveness monitor")?;
        if let Some(r) = self.rebuilder {
            r.await.context("rebuild task")?;
        }
        if let Some(m) = self.metrics {
            m.await.context("metrics endpoint")?;
        }
        if let Some(ms) = self.service.ms_handle() {
            ms.shutdown().await;
        }
        fs::remove_file(self.data_dir.join(ADDR_FILE)).ok();
        let service = self.service;
        tokio::task::spawn_blocking(move || drop(service)).await?;
        info!("shoal-server stopped");
        Ok(())
    }
}
