//! `shoal system|pool|cont`: administration through the management service.

use clap::Subcommand;
use serde::Serialize;
use shoal_common::mgmt::{ContInfo, ContLayout, ContProps, MemberState, PoolInfo};
use shoal_common::oclass::{auto_class, ObjType, ObjectClass};

use crate::{out, Ctx};

#[derive(Debug, Subcommand)]
pub enum SystemCmd {
    /// Every server: rank, address, state, targets, and pid for local ones.
    Query,
    /// Excludes a server from every pool now (its shards get spares).
    Exclude {
        /// The server's rank.
        rank: u32,
    },
    /// Brings a down or excluded server back into every pool: it takes
    /// writes at once, is rebuilt from the others, and serves reads once
    /// rebuilt (`shoal pool query` shows the progress).
    Reintegrate {
        /// The server's rank.
        rank: u32,
    },
    /// Drains a server from every pool: it keeps serving while its shards
    /// are copied elsewhere, then it is out (`shoal pool query` shows the
    /// progress); no object has fewer copies meanwhile.
    Drain {
        /// The server's rank.
        rank: u32,
    },
    /// Adds a server to the management service's replicas (Raft joint
    /// consensus): it starts an empty replica, is brought up to date, then
    /// votes. Run it twice to go from 3 replicas to 5.
    AddMs {
        /// The server's rank.
        rank: u32,
    },
    /// Removes a server's MS replica (joint consensus); its server stops
    /// hosting it. To replace a replica: add the new one, then remove the
    /// old one.
    RemoveMs {
        /// The server's rank.
        rank: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Creates a pool over all servers (or --ranks).
    Create {
        label: String,
        /// Ranks to use, comma separated (default: all).
        #[arg(long, value_delimiter = ',')]
        ranks: Vec<u32>,
        /// Targets of each server to use (default: all).
        #[arg(long, default_value_t = 0)]
        targets_per_server: u32,
    },
    /// Adds servers to a pool: their targets join the map as NEW, the
    /// shards that move to them are copied (throttled like rebuild; see
    /// `pool query`), then they turn UPIN.
    Extend {
        pool: String,
        /// Ranks to add, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        ranks: Vec<u32>,
    },
    /// Brings a down or excluded server back into this pool (see
    /// `shoal system reintegrate`).
    Reintegrate { pool: String, rank: u32 },
    /// Drains a server from this pool (see `shoal system drain`).
    Drain { pool: String, rank: u32 },
    /// Stops or starts the pool's rebuild (a stopped rebuild resumes where
    /// it was, on every server).
    Rebuild {
        #[arg(value_enum)]
        action: RebuildAction,
        pool: String,
    },
    /// Sets a pool property: `rebuild-rate` (MiB/s each server sends to
    /// spares at most, or `auto`: rebuild takes at most 30% of a server's
    /// time while clients use it).
    SetProp { pool: String, name: String, value: String },
    /// Lists pools.
    List,
    /// A pool's map and the space used and free on every target.
    Query { pool: String },
    /// Destroys a pool.
    Destroy {
        pool: String,
        /// Destroy even if it holds containers.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RebuildAction {
    Stop,
    Start,
    /// Let a rebuild finish although the pool lost more servers than a
    /// container's rd_fac: what no server kept reads as missing from then on.
    AcceptLoss,
}

#[derive(Debug, Subcommand)]
pub enum ContCmd {
    /// Creates a container.
    Create {
        pool: String,
        label: String,
        /// Default object class (e.g. EC_4P2GX, RP_3G1, S1) or "auto".
        #[arg(long, default_value = "auto")]
        oclass: String,
        /// Server failures the data must survive (0..=4).
        #[arg(long, default_value_t = 0)]
        rd_fac: u8,
        /// Array chunk size (e.g. 1MiB); EC arrays round it up to whole stripes.
        #[arg(long, default_value = "1MiB", value_parser = out::parse_size)]
        chunk_size: u64,
        /// EC cell size (e.g. 64KiB).
        #[arg(long, default_value = "64KiB", value_parser = out::parse_size)]
        cell_size: u64,
        /// Intended layout: posix, kv, array or unknown.
        #[arg(long, default_value = "unknown")]
        layout: String,
    },
    /// Lists a pool's containers.
    List { pool: String },
    /// A container's properties, and the classes `auto` picks and why.
    Query { pool: String, cont: String },
    /// Goes through every object of a container and lists those some of
    /// whose data cannot be read now (more servers lost than the class
    /// survives, or spares still being rebuilt).
    Check {
        pool: String,
        cont: String,
        /// Copies what can still be read into a new container of this
        /// name (arrays and KV objects, with their names; lost ranges of
        /// an array are left as holes), and says what it could not copy.
        #[arg(long, value_name = "NEW_CONT")]
        salvage: Option<String>,
        /// Pool of the new container (default: the same pool; another
        /// pool's servers may be healthier).
        #[arg(long, requires = "salvage")]
        to_pool: Option<String>,
    },
    /// Destroys a container.
    Destroy { pool: String, cont: String },
}

fn pid_cell(host: &str, pid: u32) -> String {
    let me = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    if host == me {
        pid.to_string()
    } else {
        "-".into()
    }
}

pub async fn system(ctx: &Ctx, cmd: SystemCmd) -> anyhow::Result<()> {
    match cmd {
        SystemCmd::Query => {
            let q = ctx.client().await?.system_query().await?;
            if ctx.json {
                return out::json(&q);
            }
            let mut t = out::table(&["rank", "address", "state", "targets", "fault domain", "pid", "role"]);
            for m in &q.members {
                let state = match m.state {
                    MemberState::Down => "down".to_string(),
                    MemberState::Excluded => "excluded".to_string(),
                    MemberState::Joined => "joined".to_string(),
                    MemberState::Unresponsive => match m.silent_ms {
                        Some(ms) => format!("unresponsive ({}s silent)", ms / 1000),
                        None => "unresponsive (not heard from since the MS started)".to_string(),
                    },
                };
                let role = match q.ms_replicas.iter().find(|r| r.addr == m.addr) {
                    Some(r) => format!("MS {}", r.role),
                    None if q.ms_rank == Some(m.rank) => "MS".to_string(),
                    None => String::new(),
                };
                t.add_row(vec![
                    m.rank.to_string(),
                    m.addr.clone(),
                    state,
                    m.targets.to_string(),
                    m.fault_domain.clone(),
                    pid_cell(&m.host, m.pid),
                    role,
                ]);
            }
            println!("{t}");
            if !q.ms_replicas.is_empty() {
                println!("{}", replica_table(&q.ms_replicas));
            }
            println!("transport: tcp (no RDMA transport is built yet)");
            Ok(())
        }
        SystemCmd::AddMs { rank } | SystemCmd::RemoveMs { rank } => {
            let add = matches!(cmd, SystemCmd::AddMs { .. });
            let client = ctx.client().await?;
            let replicas = if add { client.ms_add(rank).await? } else { client.ms_remove(rank).await? };
            if ctx.json {
                return out::json(&replicas);
            }
            println!("{}", replica_table(&replicas));
            let what = if add { "hosts an MS replica" } else { "hosts no MS replica" };
            println!(
                "rank {rank} {what}; servers and clients learn the replicas from the MS, but list them in the \
                 servers' ms_addrs and in clients' $SHOAL_MS too, for their next start"
            );
            Ok(())
        }
        SystemCmd::Exclude { rank } => {
            ctx.client().await?.exclude(rank).await?;
            println!("rank {rank} excluded from every pool");
            Ok(())
        }
        SystemCmd::Drain { rank } => {
            ctx.client().await?.drain(None, rank).await?;
            println!("rank {rank} is draining from every pool; it is out once its shards are elsewhere");
            Ok(())
        }
        SystemCmd::Reintegrate { rank } => {
            ctx.client().await?.reintegrate(None, rank).await?;
            println!("rank {rank} reintegrated into every pool it was out of; it serves reads once rebuilt");
            Ok(())
        }
    }
}

/// The MS replicas: id, address, role, term and log index.
fn replica_table(replicas: &[shoal_common::mgmt::MsReplica]) -> out::Table {
    let mut r = out::table(&["MS replica", "address", "role", "term", "log index"]);
    for m in replicas {
        let index = m.last_log_index.map_or("-".to_string(), |i| i.to_string());
        r.add_row(vec![m.id.to_string(), m.addr.clone(), m.role.clone(), m.term.to_string(), index]);
    }
    r
}

fn rate_text(rate_mib: u32) -> String {
    match rate_mib {
        0 => "automatic: at most 30% of a server's time while clients use it".into(),
        r => format!("at most {r} MiB/s per server"),
    }
}

fn print_pool(p: &PoolInfo) {
    let ranks: std::collections::BTreeSet<u32> = p.map.targets.iter().map(|t| t.rank).collect();
    println!(
        "pool {} ({}): {} targets on {} servers, map version {}, {} containers",
        p.label,
        p.uuid,
        p.map.targets.len(),
        ranks.len(),
        p.map.version,
        p.containers
    );
}

pub async fn pool(ctx: &Ctx, cmd: PoolCmd) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    match cmd {
        PoolCmd::Create { label, ranks, targets_per_server } => {
            let p = client.pool_create(&label, ranks, targets_per_server).await?;
            if ctx.json {
                return out::json(&p);
            }
            print_pool(&p);
        }
        PoolCmd::Extend { pool, ranks } => {
            let p = client.pool_extend(&pool, ranks).await?;
            if ctx.json {
                return out::json(&p);
            }
            print_pool(&p);
        }
        PoolCmd::Rebuild { action: RebuildAction::AcceptLoss, pool } => {
            client.rebuild_accept_loss(&pool).await?;
            println!("rebuild of {pool} will finish; data no server kept now reads as missing");
        }
        PoolCmd::Rebuild { action, pool } => {
            let paused = matches!(action, RebuildAction::Stop);
            let c = client.rebuild_ctl(&pool, Some(paused), None).await?;
            if ctx.json {
                return out::json(&c);
            }
            match paused {
                true => println!("rebuild of {pool} stopped; `shoal pool rebuild start {pool}` resumes it"),
                false => println!("rebuild of {pool} running ({})", rate_text(c.rate_mib)),
            }
        }
        PoolCmd::SetProp { pool, name, value } => {
            anyhow::ensure!(name == "rebuild-rate", "unknown pool property {name:?} (known: rebuild-rate)");
            let rate = match value.as_str() {
                "auto" | "0" => 0,
                v => v.parse::<u32>().ok().filter(|r| *r > 0).ok_or_else(|| {
                    anyhow::anyhow!("rebuild-rate is MiB/s per server (a whole number above 0) or `auto`, not {v:?}")
                })?,
            };
            let c = client.rebuild_ctl(&pool, None, Some(rate)).await?;
            if ctx.json {
                return out::json(&c);
            }
            println!("rebuild-rate of {pool}: {}", rate_text(c.rate_mib));
        }
        PoolCmd::Drain { pool, rank } => {
            client.drain(Some(&pool), rank).await?;
            println!("rank {rank} is draining from {pool}; it is out once its shards are elsewhere");
        }
        PoolCmd::Reintegrate { pool, rank } => {
            client.reintegrate(Some(&pool), rank).await?;
            println!("rank {rank} reintegrated into {pool}; it serves reads once rebuilt");
        }
        PoolCmd::List => {
            let pools = client.pool_list().await?;
            if ctx.json {
                return out::json(&pools);
            }
            let mut t = out::table(&["label", "uuid", "targets", "map version", "containers"]);
            for p in &pools {
                t.add_row(vec![
                    p.label.clone(),
                    p.uuid.to_string(),
                    p.map.targets.len().to_string(),
                    p.map.version.to_string(),
                    p.containers.to_string(),
                ]);
            }
            println!("{t}");
        }
        PoolCmd::Query { pool } => {
            let handle = client.pool_connect(&pool).await?;
            let p = handle.info();
            let usage = handle.target_usage().await;
            #[derive(Serialize)]
            struct TargetRow {
                rank: u32,
                target: u32,
                state: String,
                data_bytes: Option<u64>,
                free_bytes: Option<u64>,
                error: Option<String>,
            }
            let rows: Vec<TargetRow> = p
                .map
                .targets
                .iter()
                .map(|t| {
                    let u = usage.iter().find(|(r, i, _)| *r == t.rank && *i == t.index).map(|x| &x.2);
                    let (d, f, e) = match u {
                        Some(Ok(q)) => (Some(q.data_bytes), Some(q.free_bytes), None),
                        Some(Err(e)) => (None, None, Some(e.to_string())),
                        None => (None, None, Some("not queried".into())),
                    };
                    TargetRow {
                        rank: t.rank,
                        target: t.index,
                        state: t.state.to_string(),
                        data_bytes: d,
                        free_bytes: f,
                        error: e,
                    }
                })
                .collect();
            if ctx.json {
                #[derive(Serialize)]
                struct Q<'a> {
                    pool: &'a PoolInfo,
                    targets: &'a [TargetRow],
                }
                return out::json(&Q { pool: &p, targets: &rows });
            }
            print_pool(&p);
            if let Some(r) = &p.rebuild {
                let eta = r.eta_secs.map_or("unknown".into(), |s| format!("{s} s"));
                println!(
                    "rebuild of {} targets (excluded, draining, joining, or back in): {}, {} of {} servers through their \
                     objects, objects {}/{}, {} sent at {}/s, {:.1} s so far, time left {eta}; pace: {}",
                    p.rebuilding.len(),
                    r.state,
                    r.servers_done,
                    r.servers,
                    r.objects_done,
                    r.objects_total,
                    out::size(r.bytes),
                    out::size(r.bytes_per_sec),
                    r.elapsed_ms as f64 / 1000.0,
                    if r.ctl.paused { "stopped".into() } else { rate_text(r.ctl.rate_mib) },
                );
                if let Some(why) = &r.held_back {
                    println!("rebuild cannot finish: {why}");
                }
            }
            let mut t = out::table(&["rank", "target", "state", "used", "free"]);
            for r in &rows {
                t.add_row(vec![
                    r.rank.to_string(),
                    r.target.to_string(),
                    r.state.clone(),
                    r.data_bytes.map_or_else(|| r.error.clone().unwrap_or_default(), out::size),
                    r.free_bytes.map_or("-".into(), out::size),
                ]);
            }
            println!("{t}");
        }
        PoolCmd::Destroy { pool, force } => {
            client.pool_destroy(&pool, force).await?;
            if !ctx.json {
                println!("pool {pool} destroyed");
            }
        }
    }
    Ok(())
}

/// What `auto` picks for each object type in this container, and why.
fn auto_choices(c: &ContInfo, domains: u32) -> Vec<(String, String)> {
    [ObjType::Array, ObjType::Kv, ObjType::Multi]
        .into_iter()
        .map(|ty| match &c.props.oclass {
            Some(name) => (ty.to_string(), format!("{name} (the container's default class)")),
            None => match auto_class(c.props.rd_fac, domains, ty) {
                Ok((class, why)) => (ty.to_string(), format!("{class}: {why}")),
                Err(e) => (ty.to_string(), format!("none: {e}")),
            },
        })
        .collect()
}

pub async fn cont(ctx: &Ctx, cmd: ContCmd) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    match cmd {
        ContCmd::Create { pool, label, oclass, rd_fac, chunk_size, cell_size, layout } => {
            let oclass = if oclass == "auto" {
                None
            } else {
                Some(oclass.parse::<ObjectClass>().map_err(|e| anyhow::anyhow!("--oclass: {e}"))?.to_string())
            };
            let layout = match layout.as_str() {
                "posix" => ContLayout::Posix,
                "kv" => ContLayout::Kv,
                "array" => ContLayout::Array,
                "unknown" => ContLayout::Unknown,
                other => anyhow::bail!("--layout {other:?}: expected posix, kv, array or unknown"),
            };
            let cell_size = u32::try_from(cell_size).map_err(|_| anyhow::anyhow!("--cell-size is too large"))?;
            let props = ContProps { rd_fac, oclass, cell_size, chunk_size, layout };
            let handle = client.pool_connect(&pool).await?;
            let c = handle.cont_create(&label, props).await?;
            if ctx.json {
                return out::json(&c);
            }
            println!("container {} ({}) created in pool {}", c.label, c.uuid, handle.info().label);
        }
        ContCmd::List { pool } => {
            let conts = client.pool_connect(&pool).await?.cont_list().await?;
            if ctx.json {
                return out::json(&conts);
            }
            let mut t = out::table(&["label", "uuid", "rd_fac", "oclass", "health"]);
            for c in &conts {
                t.add_row(vec![
                    c.label.clone(),
                    c.uuid.to_string(),
                    c.props.rd_fac.to_string(),
                    c.props.oclass.clone().unwrap_or_else(|| "auto".into()),
                    format!("{:?}", c.health).to_uppercase(),
                ]);
            }
            println!("{t}");
        }
        ContCmd::Query { pool, cont } => {
            let handle = client.pool_connect(&pool).await?;
            let c = handle.cont_query(&cont).await?;
            let choices = auto_choices(&c, handle.info().map.widest_group());
            if ctx.json {
                #[derive(Serialize)]
                struct Q<'a> {
                    container: &'a ContInfo,
                    classes: &'a [(String, String)],
                }
                return out::json(&Q { container: &c, classes: &choices });
            }
            let mut t = out::table(&["property", "value"]);
            t.add_row(vec!["label".to_string(), c.label.clone()]);
            t.add_row(vec!["uuid".to_string(), c.uuid.to_string()]);
            t.add_row(vec!["pool".to_string(), c.pool.to_string()]);
            t.add_row(vec!["health".to_string(), format!("{:?}", c.health).to_uppercase()]);
            t.add_row(vec!["rd_fac".to_string(), c.props.rd_fac.to_string()]);
            t.add_row(vec!["oclass".to_string(), c.props.oclass.clone().unwrap_or_else(|| "auto".into())]);
            t.add_row(vec!["cell size".to_string(), out::size(c.props.cell_size as u64)]);
            t.add_row(vec!["chunk size".to_string(), out::size(c.props.chunk_size)]);
            t.add_row(vec!["layout".to_string(), format!("{:?}", c.props.layout).to_lowercase()]);
            t.add_row(vec!["objects allocated".to_string(), c.oids_allocated.to_string()]);
            for (ty, why) in &choices {
                t.add_row(vec![format!("class for {ty} objects"), why.clone()]);
            }
            println!("{t}");
            if c.health == shoal_common::mgmt::Health::Unclean {
                println!("the pool lost more servers than rd_fac {}: `shoal cont check {pool} {cont}` lists the objects affected", c.props.rd_fac);
            }
        }
        ContCmd::Check { pool, cont, salvage, to_pool } => {
            let p = client.pool_connect(&pool).await?;
            let handle = p.cont_open(&cont).await?;
            let report = handle.check().await?;
            if let Some(new) = salvage {
                let dest_pool = match &to_pool {
                    Some(name) => client.pool_connect(name).await?,
                    None => p.clone(),
                };
                let s = crate::salvage::salvage(&dest_pool, &handle, &report, &new).await?;
                if ctx.json {
                    return out::json(&s);
                }
                println!(
                    "salvaged into {new}: {} objects whole, {} in part, {} not at all, {} names",
                    s.whole,
                    s.partial.len(),
                    s.lost.len(),
                    s.names
                );
                for (oid, why) in s.partial.iter().chain(&s.lost) {
                    println!("  {oid}: {why}");
                }
                return Ok(());
            }
            if ctx.json {
                return out::json(&report);
            }
            println!("{} objects checked; {} with data that cannot be read now", report.objects, report.affected.len());
            if !report.names_read {
                println!("the name index cannot be read: objects whose shards are all gone are not listed");
            }
            if !report.unasked.is_empty() {
                let t: Vec<String> = report.unasked.iter().map(|(r, i)| format!("rank {r} target {i}")).collect();
                println!("could not ask {} (objects only they hold are not counted)", t.join(", "));
            }
            if !report.affected.is_empty() {
                let mut t = out::table(&["object", "name", "class", "groups that cannot be read"]);
                for a in &report.affected {
                    t.add_row(vec![
                        a.oid.to_string(),
                        a.name.clone().unwrap_or_default(),
                        a.class.clone(),
                        format!("{} of {}", a.groups_lost, a.groups),
                    ]);
                }
                println!("{t}");
            }
        }
        ContCmd::Destroy { pool, cont } => {
            let c = client.pool_connect(&pool).await?.cont_destroy(&cont).await?;
            if !ctx.json {
                println!("container {} ({}) destroyed", c.label, c.uuid);
            }
        }
    }
    Ok(())
}
