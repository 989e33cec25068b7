//! `shoal bench matrix`: a benchmark matrix over object classes, APIs, I/O
//! sizes, offsets, access patterns, sharing and client processes, on a
//! local cluster it starts or on a running one, with the raw disk's figures
//! of the same run.
//!
//! Each cell writes up to `--bytes` (or for up to `--duration`), then reads
//! back what it wrote. Every client process runs `--qd` writers at once;
//! writers either share one object (disjoint ranges) or have one each.
//! Further client processes are this binary run as `shoal bench worker`,
//! which open the same objects and are started together over a pipe, so
//! that their start-up is not timed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use shoal_client::{Array, ArrayWriter, Container, Kv, Object, WriteBack};
use shoal_common::mgmt::ContProps;
use shoal_common::oclass::{Groups, ObjType, ObjectClass, Redundancy, EC_CODES, MAX_REPLICAS, MIN_REPLICAS};
use shoal_common::{Oid, EPOCH_MAX};
use shoal_tools::local::LocalCluster;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::out::parse_size;
use crate::Ctx;

/// Unaligned cells shift every offset by this many bytes, so that each
/// I/O straddles page, cell and stripe boundaries.
const UNALIGNED_SHIFT: u64 = 4095;

#[derive(Debug, Args)]
pub struct MatrixArgs {
    /// Directory for the local cluster and the disk probe (default: a
    /// temporary one under /var/tmp, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Measure a running cluster (given by --ms, SHOAL_MS or the dev
    /// cluster's file) in this pool, instead of starting a local one. Only
    /// the client's CPU is counted then.
    #[arg(long)]
    pool: Option<String>,
    /// Servers of the local cluster.
    #[arg(long, default_value_t = 6)]
    servers: usize,
    /// Targets per server of the local cluster.
    #[arg(long, default_value_t = 2)]
    targets: u32,
    /// `matrix`: every combination of the axes below. `checkpoint`: every
    /// writer of every process dumps one large shard into its own array at
    /// once, then all read theirs back (a training job's checkpoint and
    /// restart); uses --classes, --sizes and --procs.
    #[arg(long, value_enum, default_value_t = Workload::Matrix)]
    workload: Workload,
    /// Object classes, comma separated, or `all` (every class that fits
    /// the pool).
    #[arg(long, value_delimiter = ',', default_value = "S1,RP_3GX,EC_4P2G1")]
    classes: Vec<String>,
    /// APIs: array (byte ranges), kv (one value per key), object (dkeys
    /// and akeys), posix (files on a FUSE mount of a container of its own,
    /// served by a `shoal mount` process whose CPU counts with the
    /// servers').
    #[arg(long, value_delimiter = ',', value_enum, default_value = "array")]
    api: Vec<Api>,
    /// I/O sizes (value sizes for kv and object).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64KiB,1MiB")]
    sizes: Vec<u64>,
    /// Offsets: aligned (multiples of the I/O size) or unaligned (shifted by
    /// 4095 bytes). Array only.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "aligned")]
    offsets: Vec<Offsets>,
    /// Array writes through the client's write-gathering buffer
    /// (`ArrayWriter`, flushed before the phase ends: on) or each straight
    /// to the servers (off). Array only.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "on")]
    gather: Vec<Gather>,
    /// Access order of each writer: seq or rand.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "seq")]
    pattern: Vec<Pattern>,
    /// private: one object per writer; shared: all writers in one object.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "private")]
    sharing: Vec<Sharing>,
    /// Client processes, comma separated (each runs --qd writers).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    procs: Vec<usize>,
    /// Writers (requests in flight) per client process.
    #[arg(long, default_value_t = 16)]
    qd: usize,
    /// Bytes written per cell, at most (then read back).
    #[arg(long, value_parser = parse_size, default_value = "256MiB")]
    bytes: u64,
    /// Time per phase of a cell, at most.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20s")]
    duration: Duration,
    /// Prints CSV instead of the table (--json prints JSON).
    #[arg(long)]
    csv: bool,
    /// Also writes matrix.txt, matrix.json, matrix.csv, matrix.svg and
    /// matrix.png into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The raw disk's figures: fio when installed (auto), fio, probe
    /// (Shoal's own O_DIRECT probe) or none.
    #[arg(long, value_enum, default_value_t = DiskTool::Auto)]
    disk: DiskTool,
    /// Bytes the disk measurement writes and reads.
    #[arg(long, value_parser = parse_size, default_value = "1GiB")]
    disk_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Matrix,
    Checkpoint,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    Array,
    Kv,
    Object,
    Posix,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offsets {
    Aligned,
    Unaligned,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gather {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    Seq,
    Rand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    Private,
    Shared,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiskTool {
    Auto,
    Fio,
    Probe,
    None,
}

/// What one cell runs, as sent to worker processes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct CellSpec {
    workload: Workload,
    class: String,
    api: Api,
    size: u64,
    offsets: Offsets,
    gather: Gather,
    pattern: Pattern,
    sharing: Sharing,
    procs: usize,
    qd: usize,
    /// I/Os per writer, at most.
    ops_per_writer: u64,
    duration_ms: u64,
    /// One object (shared) or one per writer, indexed by writer.
    objects: Vec<Oid>,
    /// Posix cells: the cell's directory on the mount.
    #[serde(default)]
    dir: Option<PathBuf>,
}

impl CellSpec {
    fn writers(&self) -> usize {
        self.procs * self.qd
    }

    fn label(&self) -> String {
        format!(
            "{} {} {} {} gather-{} {} {} {}x{}",
            self.class,
            name(self.api),
            crate::out::size(self.size),
            name(self.offsets),
            name(self.gather),
            name(self.pattern),
            name(self.sharing),
            self.procs,
            self.qd
        )
    }
}

/// A worker process's orders.
#[derive(Debug, Serialize, Deserialize)]
struct WorkerSpec {
    ms: Vec<String>,
    pool: String,
    cont: String,
    proc_index: usize,
    cell: CellSpec,
}

/// One phase of one client process.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PhaseResult {
    ops: u64,
    bytes: u64,
    /// Wall clock (ns since the epoch) at the phase's start and end.
    start_ns: u64,
    end_ns: u64,
    /// CPU seconds the process spent in the phase.
    cpu_s: f64,
    /// Latency of every I/O, microseconds.
    lat_us: Vec<u32>,
}

/// One row of the output: one phase of one cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub workload: String,
    pub class: String,
    pub api: String,
    pub io_size: u64,
    pub offsets: String,
    /// Array writes gathered by the client's buffer: "on", "off", or "-"
    /// for other APIs.
    pub gather: String,
    pub pattern: String,
    pub sharing: String,
    pub procs: usize,
    pub qd: usize,
    pub op: String,
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
    pub mib_s: f64,
    pub iops: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    /// Bytes the class stores per byte written (replicas, or (k+p)/k).
    pub space_factor: f64,
    /// Growth of the servers' data files per byte written (writes only;
    /// values of 4 KiB or less live in RocksDB and do not count).
    pub stored_per_written: Option<f64>,
    /// CPU seconds per GiB moved, client processes and (for a local
    /// cluster) servers together.
    pub cpu_s_per_gib: f64,
    /// "client+servers" or "client".
    pub cpu_scope: String,
    /// Busy CPU seconds of the whole machine per GiB moved (local clusters
    /// only): also the kernel's writeback and network work, which no
    /// process is charged for.
    pub machine_cpu_s_per_gib: Option<f64>,
    /// Server failures the class survives.
    pub failures_tolerated: u8,
}

/// The raw disk's figures of the same run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskFigures {
    pub tool: String,
    pub write_mib_s: f64,
    pub read_mib_s: f64,
    pub sync_4k_iops: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    servers: usize,
    targets: u32,
    cluster: String,
    disk: Option<DiskFigures>,
    rows: Vec<Row>,
}

/// An axis value's name as the command line spells it.
fn name<T: ValueEnum>(v: T) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}

/// Every class that fits a pool of `domains` servers (rd_fac 0).
fn all_classes(domains: u32) -> Vec<ObjectClass> {
    let mut out = vec![ObjectClass::S1, ObjectClass::SX];
    for groups in [Groups::Fixed(1), Groups::Max] {
        for n in MIN_REPLICAS..=MAX_REPLICAS {
            out.push(ObjectClass { redundancy: Redundancy::Replicas(n), groups });
        }
        for (k, p) in EC_CODES {
            out.push(ObjectClass { redundancy: Redundancy::Ec { k, p }, groups });
        }
    }
    out.retain(|c| c.check(0, domains).is_ok());
    out
}

fn space_factor(c: &ObjectClass) -> f64 {
    match c.redundancy {
        Redundancy::None => 1.0,
        Redundancy::Replicas(n) => f64::from(n),
        Redundancy::Ec { k, p } => f64::from(k + p) / f64::from(k),
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// CPU seconds this process has used (all threads).
fn self_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds of the processes `pids` (user + system, from /proc).
fn procs_cpu(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command name: state is field 3, utime 14, stime 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?) as f64 / hz)
        })
        .sum()
}

/// The objects a client process writes, one per writer.
enum Handle {
    Array(Array),
    /// An array written through the client's write-gathering buffer.
    Gathered(ArrayWriter),
    /// A file on the mount.
    File(Arc<std::fs::File>),
    Kv(Kv),
    Object(Object),
}

/// One client process's part of a cell: its writers' objects and how far
/// each got in the write phase.
struct Share {
    cell: CellSpec,
    proc_index: usize,
    handles: Vec<Arc<Handle>>,
    written: Vec<u64>,
    payload: Bytes,
}

impl Share {
    async fn open(cont: &Container, cell: CellSpec, proc_index: usize) -> anyhow::Result<Share> {
        let mut handles = Vec::with_capacity(cell.qd);
        let mut shared: Option<Arc<Handle>> = None;
        for lane in 0..cell.qd {
            let w = proc_index * cell.qd + lane;
            if let (Sharing::Shared, Some(h)) = (cell.sharing, &shared) {
                handles.push(h.clone());
                continue;
            }
            if cell.api == Api::Posix {
                let dir = cell.dir.clone().context("a posix cell without its directory")?;
                let name = if cell.sharing == Sharing::Shared { "shared".to_string() } else { format!("w{w}") };
                let path = dir.join(name);
                let f = tokio::task::spawn_blocking(move || {
                    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)
                })
                .await?
                .context("open a file on the mount")?;
                let h = Arc::new(Handle::File(Arc::new(f)));
                if cell.sharing == Sharing::Shared {
                    shared = Some(h.clone());
                }
                handles.push(h);
                continue;
            }
            let oid = match cell.sharing {
                Sharing::Shared => cell.objects[0],
                Sharing::Private => *cell.objects.get(w).context("too few objects for the writers")?,
            };
            let h = Arc::new(match cell.api {
                Api::Array if cell.gather == Gather::On => {
                    // One write in flight per writer, as without the
                    // buffer: --qd stays the number in flight.
                    let cfg = WriteBack { max_in_flight: 1, ..WriteBack::default() };
                    Handle::Gathered(cont.array_open(oid).await?.writer(cfg))
                }
                Api::Array => Handle::Array(cont.array_open(oid).await?),
                Api::Kv => Handle::Kv(cont.kv_open(oid).await?),
                Api::Object => Handle::Object(cont.object(oid)?),
                Api::Posix => unreachable!("opened above"),
            });
            if cell.sharing == Sharing::Shared {
                shared = Some(h.clone());
            }
            handles.push(h);
        }
        // Every byte differs from its neighbours, so a misplaced read shows.
        let payload: Vec<u8> = (0..cell.size).map(|i| (i % 251) as u8).collect();
        let written = vec![0; cell.qd];
        Ok(Share { cell, proc_index, handles, written, payload: Bytes::from(payload) })
    }

    /// Runs the write (or read) phase of this process's writers.
    async fn phase(&mut self, write: bool) -> anyhow::Result<PhaseResult> {
        if !write {
            // Files are read back from the servers, not from the kernel's
            // page cache that the writes filled.
            for h in &self.handles {
                if let Handle::File(f) = &**h {
                    use std::os::fd::AsRawFd;
                    // SAFETY: posix_fadvise(2) on an open descriptor.
                    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                }
            }
        }
        let cpu0 = self_cpu();
        let start_ns = now_ns();
        let deadline = Instant::now() + Duration::from_millis(self.cell.duration_ms);
        let mut set = tokio::task::JoinSet::new();
        for lane in 0..self.cell.qd {
            let w = self.proc_index * self.cell.qd + lane;
            let n = if write { self.cell.ops_per_writer } else { self.written[lane] };
            let mut order: Vec<u64> = (0..self.cell.ops_per_writer).collect();
            if self.cell.pattern == Pattern::Rand {
                order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(w as u64));
            }
            order.truncate(n as usize);
            if !write && self.cell.pattern == Pattern::Rand {
                order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(!(w as u64)));
            }
            let (h, cell, payload) = (self.handles[lane].clone(), self.cell.clone(), self.payload.clone());
            set.spawn(async move {
                let mut lat = Vec::with_capacity(order.len());
                for slot in order {
                    if Instant::now() >= deadline && !lat.is_empty() {
                        break;
                    }
                    let t = Instant::now();
                    io(&h, &cell, w, slot, write, &payload).await?;
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                // Buffered bytes count once they are durable.
                match (write, &*h) {
                    (true, Handle::Gathered(g)) => g.flush().await?,
                    (true, Handle::File(f)) => {
                        let f = f.clone();
                        tokio::task::spawn_blocking(move || f.sync_data()).await?.context("fsync on the mount")?
                    }
                    _ => {}
                }
                anyhow::Ok((lane, lat))
            });
        }
        let mut r = PhaseResult { start_ns, ..PhaseResult::default() };
        while let Some(j) = set.join_next().await {
            let (lane, lat) = j.context("writer task")??;
            if write {
                self.written[lane] = lat.len() as u64;
            }
            r.ops += lat.len() as u64;
            r.lat_us.extend(lat);
        }
        r.bytes = r.ops * self.cell.size;
        r.end_ns = now_ns();
        r.cpu_s = self_cpu() - cpu0;
        Ok(r)
    }
}

/// One I/O of writer `w` at `slot`; a read checks every byte.
async fn io(h: &Handle, cell: &CellSpec, w: usize, slot: u64, write: bool, payload: &Bytes) -> anyhow::Result<()> {
    let size = cell.size;
    let array_offset = || {
        let base = match cell.sharing {
            Sharing::Shared => w as u64 * cell.ops_per_writer * size,
            Sharing::Private => 0,
        };
        let shift = if cell.offsets == Offsets::Unaligned { UNALIGNED_SHIFT } else { 0 };
        base + slot * size + shift
    };
    match h {
        Handle::Array(a) => {
            let off = array_offset();
            if write {
                a.write(off, payload.clone()).await?;
            } else {
                let got = a.read(off, size).await?;
                ensure!(got == *payload, "array read at {off} returned other bytes than were written");
            }
        }
        Handle::File(f) => {
            use std::os::unix::fs::FileExt;
            let (off, f, payload) = (array_offset(), f.clone(), payload.clone());
            tokio::task::spawn_blocking(move || {
                if write {
                    f.write_all_at(&payload, off).with_context(|| format!("pwrite at {off} on the mount"))
                } else {
                    let mut got = vec![0u8; payload.len()];
                    f.read_exact_at(&mut got, off).with_context(|| format!("pread at {off} on the mount"))?;
                    ensure!(got == payload, "file read at {off} returned other bytes than were written");
                    Ok(())
                }
            })
            .await??;
        }
        Handle::Gathered(g) => {
            let off = array_offset();
            if write {
                g.write(off, payload.clone()).await?;
            } else {
                let got = g.read(off, size).await?;
                ensure!(got == *payload, "gathered array read at {off} returned other bytes than were written");
            }
        }
        Handle::Kv(kv) => {
            let key = format!("w{w}s{slot}");
            if write {
                kv.put(&key, payload.clone()).await?;
            } else {
                let got = kv.get(&key).await?;
                ensure!(got.as_ref() == Some(payload), "kv get {key} returned other bytes than were put");
            }
        }
        Handle::Object(o) => {
            let (dkey, akey) = (format!("w{w}d{}", slot / 16), format!("a{}", slot % 16));
            if write {
                o.update_single(&dkey, &akey, payload.clone()).await?;
            } else {
                let got = o.fetch_single(&dkey, &akey, EPOCH_MAX).await?;
                ensure!(got.as_ref() == Some(payload), "object fetch {dkey}/{akey} returned other bytes");
            }
        }
    }
    Ok(())
}

/// A cluster to measure: a local one started here, or a running one.
struct Target {
    client: shoal_client::Client,
    pool: shoal_client::Pool,
    pool_label: String,
    local: Option<LocalCluster>,
    servers: usize,
    targets: u32,
    /// The mount posix cells write through.
    mount: Option<Mount>,
}

/// A FUSE mount of the posix cells' container, served by a `shoal mount`
/// process; unmounted when dropped.
struct Mount {
    path: PathBuf,
    child: std::process::Child,
}

impl Mount {
    async fn start(ms: &[String], target: &str, path: PathBuf) -> anyhow::Result<Mount> {
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        let log = path.with_extension("log");
        let child = std::process::Command::new(std::env::current_exe().context("own executable")?)
            .args(["--ms", &ms.join(","), "mount", target])
            .arg(&path)
            .arg("--foreground")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?)
            .spawn()
            .context("start shoal mount")?;
        let mut m = Mount { path, child };
        let give_up = Instant::now() + Duration::from_secs(30);
        while !crate::mount::is_mounted(&m.path) {
            if m.child.try_wait()?.is_some() || Instant::now() > give_up {
                bail!(
                    "the mount for --api posix did not come up (is /dev/fuse there?): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(m)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = crate::mount::umount(crate::mount::UmountArgs::lazy(&self.path));
        let give_up = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Target {
    /// The local servers, and the mount's serving process.
    fn server_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> =
            self.local.as_ref().map(|c| c.servers.iter().filter_map(|s| s.pid()).collect()).unwrap_or_default();
        pids.extend(self.mount.as_ref().map(|m| m.child.id()));
        pids
    }

    fn servers_cpu(&self) -> f64 {
        procs_cpu(&self.server_pids())
    }

    fn cpu(&self) -> CpuSample {
        CpuSample { servers: self.servers_cpu(), machine: self.local.as_ref().and_then(|_| machine_cpu()) }
    }

    /// Waits (up to 10 s) until the local servers are quiet: background
    /// work left by the previous cell (reclaiming punched objects, RocksDB
    /// compactions) would otherwise count against the next one.
    async fn settle(&self) {
        if self.local.is_none() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let c0 = self.servers_cpu();
            tokio::time::sleep(Duration::from_millis(250)).await;
            // Less than 10% of one core over the interval.
            if self.servers_cpu() - c0 < 0.025 {
                break;
            }
        }
    }

    async fn data_bytes(&self) -> u64 {
        self.pool.target_usage().await.into_iter().filter_map(|(_, _, r)| r.ok()).map(|u| u.data_bytes).sum()
    }
}

pub async fn run(ctx: &Ctx, a: MatrixArgs) -> anyhow::Result<()> {
    ensure!(a.qd >= 1, "--qd must be at least 1");
    ensure!(a.procs.iter().all(|p| (1..=64).contains(p)), "--procs must be between 1 and 64");
    ensure!(a.sizes.iter().all(|s| (1..=64 << 20).contains(s)), "--sizes must be between 1 byte and 64 MiB");
    ensure!(a.bytes > 0, "--bytes must be more than 0");
    let (base, _tmp) = crate::bench::bench_dir(a.dir.clone())?;
    // A fresh local cluster each run, removed at the end, also under --dir.
    let cluster_dir = tempfile::Builder::new().prefix("cluster-").tempdir_in(&base)?;
    let target = match &a.pool {
        Some(pool) => {
            let client = ctx.client().await?;
            let p = client.pool_connect(pool).await.with_context(|| format!("pool {pool}"))?;
            let info = p.info();
            let servers = info.map.targets.iter().map(|t| t.rank).collect::<BTreeSet<_>>().len();
            let targets = (info.map.targets.len() / servers.max(1)) as u32;
            Target { client, pool: p, pool_label: pool.clone(), local: None, servers, targets, mount: None }
        }
        None => {
            let cluster = LocalCluster::start(cluster_dir.path(), a.servers, a.targets).await?;
            let client = cluster.client().await?;
            client.pool_create("bench", vec![], 0).await?;
            let pool = client.pool_connect("bench").await?;
            Target {
                client,
                pool,
                pool_label: "bench".into(),
                local: Some(cluster),
                servers: a.servers,
                targets: a.targets,
                mount: None,
            }
        }
    };
    let cont_label = format!("bench-{}-{}", std::process::id(), now_ns() % 1_000_000);
    target.pool.cont_create(&cont_label, ContProps::default()).await?;
    let mut target = target;
    // Posix cells: files in a container of their own, mounted here.
    let posix_label = format!("{cont_label}-posix");
    let posix = a.workload == Workload::Matrix && a.api.contains(&Api::Posix);
    let result = async {
        if posix {
            target.pool.cont_create(&posix_label, ContProps::default()).await?;
            let mnt = cluster_dir.path().join("mnt");
            let t = format!("{}/{posix_label}", target.pool_label);
            target.mount = Some(Mount::start(&target.client.ms_addrs(), &t, mnt).await?);
        }
        matrix(&a, &target, &cont_label).await
    }
    .await;
    // Clean up whatever happened: the mount, the containers, and a local
    // cluster.
    drop(target.mount.take());
    for label in [Some(&cont_label), posix.then_some(&posix_label)].into_iter().flatten() {
        if let Err(e) = target.pool.cont_destroy(label).await {
            eprintln!("warning: could not destroy container {label}: {e}");
        }
    }
    if let Some(c) = target.local.as_mut() {
        for s in c.servers.iter_mut() {
            s.terminate().ok();
        }
    }
    let rows = result?;
    let disk = match a.disk {
        DiskTool::None => None,
        tool => Some(disk_figures(&base, tool, a.disk_bytes)?),
    };
    let cluster = match &target.local {
        Some(_) => format!(
            "local: {} server{} x {} target{} on loopback",
            target.servers,
            if target.servers == 1 { "" } else { "s" },
            target.targets,
            if target.targets == 1 { "" } else { "s" }
        ),
        None => format!("pool {} of {}", target.pool_label, target.client.ms_addrs().join(",")),
    };
    let report = Report { servers: target.servers, targets: target.targets, cluster, disk, rows };
    if let Some(dir) = &a.out {
        write_outputs(dir, &report)?;
    }
    if ctx.json {
        crate::out::json(&report)?;
    } else if a.csv {
        print!("{}", csv_text(&report.rows)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(())
}

/// The cells the arguments ask for, without their objects.
fn cells(a: &MatrixArgs, classes: &[ObjectClass]) -> Vec<CellSpec> {
    let mut out = Vec::new();
    let cell = |class: &ObjectClass, api, size, offsets, gather, pattern, sharing, procs| CellSpec {
        workload: a.workload,
        class: class.to_string(),
        api,
        size,
        offsets,
        gather,
        pattern,
        sharing,
        procs,
        qd: a.qd,
        ops_per_writer: (a.bytes / size / (procs * a.qd) as u64).max(1),
        duration_ms: a.duration.as_millis() as u64,
        objects: Vec::new(),
        dir: None,
    };
    for class in classes {
        if a.workload == Workload::Checkpoint {
            for &size in &a.sizes {
                for &procs in &a.procs {
                    // Shards are large, aligned, whole-stripe writes.
                    let (o, g, p, s) = (Offsets::Aligned, Gather::Off, Pattern::Seq, Sharing::Private);
                    out.push(cell(class, Api::Array, size, o, g, p, s, procs));
                }
            }
            continue;
        }
        for &api in &a.api {
            for &size in &a.sizes {
                for &offsets in &a.offsets {
                    // Offsets only mean something for arrays and files.
                    if !matches!(api, Api::Array | Api::Posix) && offsets == Offsets::Unaligned {
                        continue;
                    }
                    // Gathering only means something for arrays.
                    let gathers = if api == Api::Array { a.gather.clone() } else { vec![Gather::Off] };
                    for gather in gathers {
                        for &pattern in &a.pattern {
                            for &sharing in &a.sharing {
                                for &procs in &a.procs {
                                    out.push(cell(class, api, size, offsets, gather, pattern, sharing, procs));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

async fn matrix(a: &MatrixArgs, target: &Target, cont_label: &str) -> anyhow::Result<Vec<Row>> {
    let domains = target.servers as u32;
    let classes: Vec<ObjectClass> = if a.classes.iter().any(|c| c.eq_ignore_ascii_case("all")) {
        all_classes(domains)
    } else {
        let cs: Vec<ObjectClass> = a
            .classes
            .iter()
            .map(|c| c.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--classes: {e}"))?;
        for c in &cs {
            c.check(0, domains).map_err(|e| anyhow::anyhow!("--classes: {e}"))?;
        }
        cs
    };
    ensure!(!classes.is_empty(), "no object class fits this pool");
    let cont = target.pool.cont_open(cont_label).await?;
    let cells = cells(a, &classes);
    let pb = ProgressBar::new(cells.len() as u64 * 2);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} phases, {elapsed} (eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for mut cell in cells {
        pb.set_message(cell.label());
        let class: ObjectClass = cell.class.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let n = match (cell.api, cell.sharing) {
            (Api::Posix, _) => 0,
            (_, Sharing::Shared) => 1,
            _ => cell.writers(),
        };
        if cell.api == Api::Posix {
            // A directory per cell, whose files get the cell's class.
            let dir =
                target.mount.as_ref().context("no mount for a posix cell")?.path.join(format!("cell-{}", rows.len()));
            let class_name = cell.class.clone();
            let d = dir.clone();
            tokio::task::spawn_blocking(move || make_cell_dir(&d, &class_name)).await??;
            cell.dir = Some(dir);
        }
        let mut handles = Vec::with_capacity(n);
        for _ in 0..n {
            handles.push(match cell.api {
                Api::Array => Handle::Array(cont.array_create(Some(class), None).await?),
                Api::Kv => Handle::Kv(cont.kv_create(Some(class)).await?),
                Api::Object => Handle::Object(cont.object(cont.alloc_oid(ObjType::Multi, Some(class)).await?)?),
                Api::Posix => unreachable!("no handles"),
            });
        }
        cell.objects = handles
            .iter()
            .map(|h| match h {
                Handle::Array(x) => x.oid(),
                Handle::Gathered(x) => x.array().oid(),
                Handle::Kv(x) => x.oid(),
                Handle::Object(x) => x.oid(),
                Handle::File(_) => unreachable!("no file handles here"),
            })
            .collect();
        target.settle().await;
        let stored0 = target.data_bytes().await;
        let (w, r) = run_cell(target, &cont, cont_label, &cell, &pb).await?;
        let stored = target.data_bytes().await.saturating_sub(stored0);
        rows.push(row(&cell, &class, "write", &w, target, Some(stored)));
        rows.push(row(&cell, &class, "read", &r, target, None));
        // Punching keeps the disk bounded over a long matrix.
        for h in handles {
            match h {
                Handle::Array(x) => x.destroy().await.map(|_| ())?,
                Handle::Gathered(x) => x.array().destroy().await.map(|_| ())?,
                Handle::Kv(x) => x.object().punch().await.map(|_| ())?,
                Handle::Object(x) => x.punch().await.map(|_| ())?,
                Handle::File(_) => {}
            }
        }
        if let Some(d) = cell.dir.clone() {
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&d)).await?.context("remove a cell's files")?;
        }
    }
    pb.finish_and_clear();
    Ok(rows)
}

/// Makes a posix cell's directory on the mount; files created in it get
/// object class `class` (the directory's `user.shoal.oclass`).
fn make_cell_dir(dir: &Path, class: &str) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    std::fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(shoal_client::fs::XATTR_OCLASS)?;
    // SAFETY: setxattr(2) with NUL-terminated strings and a buffer of the
    // length given.
    let r = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), class.as_ptr().cast(), class.len(), 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("set the class of {}", dir.display()));
    }
    Ok(())
}

/// A phase's figures from every process, with the servers' CPU time.
struct Merged {
    ops: u64,
    bytes: u64,
    secs: f64,
    cpu_s: f64,
    /// Busy CPU seconds of the whole machine (local clusters only).
    machine_cpu_s: Option<f64>,
    lat: hdrhistogram::Histogram<u64>,
}

/// CPU seconds at one moment: the local servers', and the whole machine's
/// busy time (which also counts the kernel's writeback and network work
/// done outside the processes).
#[derive(Clone, Copy)]
struct CpuSample {
    servers: f64,
    machine: Option<f64>,
}

impl std::ops::Sub for CpuSample {
    type Output = CpuSample;
    fn sub(self, o: CpuSample) -> CpuSample {
        CpuSample { servers: self.servers - o.servers, machine: self.machine.zip(o.machine).map(|(a, b)| a - b) }
    }
}

/// Busy CPU seconds of the machine since boot, from /proc/stat.
fn machine_cpu() -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy = f.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum::<u64>();
    Some(busy as f64 / hz)
}

fn merge(parts: &[PhaseResult], cpu: CpuSample) -> anyhow::Result<Merged> {
    let servers_cpu = cpu.servers;
    let mut lat = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    for p in parts {
        for &l in &p.lat_us {
            lat.saturating_record(u64::from(l).max(1));
        }
    }
    let start = parts.iter().map(|p| p.start_ns).min().unwrap_or(0);
    let end = parts.iter().map(|p| p.end_ns).max().unwrap_or(0);
    Ok(Merged {
        ops: parts.iter().map(|p| p.ops).sum(),
        bytes: parts.iter().map(|p| p.bytes).sum(),
        secs: (end.saturating_sub(start) as f64 / 1e9).max(1e-6),
        cpu_s: parts.iter().map(|p| p.cpu_s).sum::<f64>() + servers_cpu,
        machine_cpu_s: cpu.machine,
        lat,
    })
}

fn row(cell: &CellSpec, class: &ObjectClass, op: &str, m: &Merged, target: &Target, stored: Option<u64>) -> Row {
    let gib = m.bytes as f64 / f64::from(1u32 << 30);
    Row {
        workload: name(cell.workload),
        class: cell.class.clone(),
        api: name(cell.api),
        io_size: cell.size,
        offsets: name(cell.offsets),
        gather: if cell.api == Api::Array { name(cell.gather) } else { "-".into() },
        pattern: name(cell.pattern),
        sharing: name(cell.sharing),
        procs: cell.procs,
        qd: cell.qd,
        op: op.into(),
        ops: m.ops,
        bytes: m.bytes,
        secs: m.secs,
        mib_s: m.bytes as f64 / f64::from(1u32 << 20) / m.secs,
        iops: m.ops as f64 / m.secs,
        p50_us: m.lat.value_at_quantile(0.5),
        p99_us: m.lat.value_at_quantile(0.99),
        p999_us: m.lat.value_at_quantile(0.999),
        space_factor: space_factor(class),
        stored_per_written: stored.filter(|&s| s > 0 && m.bytes > 0).map(|s| s as f64 / m.bytes as f64),
        cpu_s_per_gib: if gib > 0.0 { m.cpu_s / gib } else { 0.0 },
        cpu_scope: if target.local.is_some() { "client+servers" } else { "client" }.into(),
        machine_cpu_s_per_gib: m.machine_cpu_s.filter(|_| gib > 0.0).map(|c| c / gib),
        failures_tolerated: class.tolerated_failures(),
    }
}

/// Runs both phases of a cell, in this process or in `procs` worker
/// processes started together.
async fn run_cell(
    target: &Target,
    cont: &Container,
    cont_label: &str,
    cell: &CellSpec,
    pb: &ProgressBar,
) -> anyhow::Result<(Merged, Merged)> {
    if cell.procs == 1 {
        let mut share = Share::open(cont, cell.clone(), 0).await?;
        let s0 = target.cpu();
        let w = share.phase(true).await?;
        let s1 = target.cpu();
        pb.inc(1);
        let r = share.phase(false).await?;
        let s2 = target.cpu();
        pb.inc(1);
        return Ok((merge(&[w], s1 - s0)?, merge(&[r], s2 - s1)?));
    }
    let exe = std::env::current_exe().context("own executable")?;
    let mut workers = Vec::new();
    for i in 0..cell.procs {
        let spec = WorkerSpec {
            ms: target.client.ms_addrs(),
            pool: target.pool_label.clone(),
            cont: cont_label.to_string(),
            proc_index: i,
            cell: cell.clone(),
        };
        let mut child = tokio::process::Command::new(&exe)
            .args(["bench", "worker", "--spec", &serde_json::to_string(&spec)?])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", exe.display()))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let lines = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
        workers.push((child, stdin, lines));
    }
    for (_, _, lines) in workers.iter_mut() {
        let l = next_line(lines).await?;
        ensure!(l.trim() == "ready", "worker: {l}");
    }
    let mut phases = Vec::new();
    for _ in 0..2 {
        let s0 = target.cpu();
        for (_, stdin, _) in workers.iter_mut() {
            stdin.write_all(b"go\n").await?;
            stdin.flush().await?;
        }
        let mut parts = Vec::new();
        for (_, _, lines) in workers.iter_mut() {
            let l = next_line(lines).await?;
            parts.push(serde_json::from_str::<PhaseResult>(&l).with_context(|| format!("worker said: {l}"))?);
        }
        phases.push(merge(&parts, target.cpu() - s0)?);
        pb.inc(1);
    }
    for (mut child, stdin, _) in workers {
        drop(stdin);
        let st = child.wait().await?;
        ensure!(st.success(), "a worker process failed: {st}");
    }
    let r = phases.pop().context("read phase")?;
    let w = phases.pop().context("write phase")?;
    Ok((w, r))
}

async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> anyhow::Result<String> {
    lines.next_line().await?.context("a worker process exited early (its error is above)")
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The cell and the cluster, as JSON (from `shoal bench matrix`).
    #[arg(long)]
    spec: String,
}

/// `shoal bench worker`: one client process of a matrix cell. Prints
/// "ready", then runs a phase per "go" line and prints its result as JSON.
pub async fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    let spec: WorkerSpec = serde_json::from_str(&a.spec).context("--spec")?;
    let client = shoal_client::Client::connect(spec.ms.clone()).await?;
    let pool = client.pool_connect(&spec.pool).await?;
    let cont = pool.cont_open(&spec.cont).await?;
    let mut share = Share::open(&cont, spec.cell, spec.proc_index).await?;
    let mut out = tokio::io::stdout();
    out.write_all(b"ready\n").await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    for write in [true, false] {
        match lines.next_line().await? {
            Some(l) if l.trim() == "go" => {}
            other => bail!("expected go, got {other:?}"),
        }
        let r = share.phase(write).await?;
        out.write_all(format!("{}\n", serde_json::to_string(&r)?).as_bytes()).await?;
        out.flush().await?;
    }
    Ok(())
}

/// Raw disk figures: fio (1 MiB O_DIRECT QD16 write and read, 4 KiB
/// write + fdatasync QD1) or, without fio, the same done here.
pub(crate) fn disk_figures(dir: &Path, tool: DiskTool, bytes: u64) -> anyhow::Result<DiskFigures> {
    let have_fio = std::process::Command::new("fio").arg("--version").output().is_ok_and(|o| o.status.success());
    match tool {
        DiskTool::Fio if !have_fio => bail!("--disk fio: fio is not installed (apt-get install fio)"),
        DiskTool::Fio => fio(dir, bytes),
        DiskTool::Auto if have_fio => fio(dir, bytes),
        _ => crate::disk_probe::probe(dir, bytes),
    }
}

fn fio(dir: &Path, bytes: u64) -> anyhow::Result<DiskFigures> {
    let file = dir.join("fio.tmp");
    let run = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = std::process::Command::new("fio")
            .arg("--name=shoal")
            .arg(format!("--filename={}", file.display()))
            .args(args)
            .arg("--output-format=json")
            .output()
            .context("run fio")?;
        ensure!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).context("fio's JSON")
    };
    let size = format!("--size={}", bytes.max(16 << 20));
    let seq = ["--bs=1M", "--direct=1", "--ioengine=libaio", "--iodepth=16", "--runtime=30"];
    let w = run(&[&[size.as_str(), "--rw=write", "--end_fsync=1"], &seq[..]].concat())?;
    let r = run(&[&[size.as_str(), "--rw=read"], &seq[..]].concat())?;
    let s =
        run(&["--size=64M", "--rw=write", "--bs=4k", "--fdatasync=1", "--iodepth=1", "--runtime=5", "--time_based=0"])?;
    std::fs::remove_file(&file).ok();
    let bw =
        |v: &serde_json::Value, op: &str| v["jobs"][0][op]["bw_bytes"].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20);
    Ok(DiskFigures {
        tool: "fio".into(),
        write_mib_s: bw(&w, "write"),
        read_mib_s: bw(&r, "read"),
        sync_4k_iops: s["jobs"][0]["write"]["iops"].as_f64().unwrap_or(0.0),
    })
}

fn text(r: &Report) -> String {
    let mut t = crate::out::table(&[
        "workload",
        "class",
        "api",
        "size",
        "offsets",
        "gather",
        "pattern",
        "sharing",
        "procs",
        "op",
        "MiB/s",
        "IOPS",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "space",
        "stored",
        "CPU-s/GiB",
        "machine",
        "survives",
    ]);
    for x in &r.rows {
        t.add_row(vec![
            x.workload.clone(),
            x.class.clone(),
            x.api.clone(),
            crate::out::size(x.io_size),
            x.offsets.clone(),
            x.gather.clone(),
            x.pattern.clone(),
            x.sharing.clone(),
            format!("{}x{}", x.procs, x.qd),
            x.op.clone(),
            format!("{:.0}", x.mib_s),
            format!("{:.0}", x.iops),
            x.p50_us.to_string(),
            x.p99_us.to_string(),
            x.p999_us.to_string(),
            format!("{:.2}x", x.space_factor),
            x.stored_per_written.map(|s| format!("{s:.2}x")).unwrap_or_else(|| "-".into()),
            format!("{:.2}", x.cpu_s_per_gib),
            x.machine_cpu_s_per_gib.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
            x.failures_tolerated.to_string(),
        ]);
    }
    let mut s = format!("shoal bench matrix: {}\n{t}\n", r.cluster);
    match &r.disk {
        Some(d) => s.push_str(&format!(
            "raw disk ({}): 1 MiB O_DIRECT QD16 write {:.0} MiB/s, read {:.0} MiB/s; 4 KiB write+fdatasync QD1 {:.0}/s\n",
            d.tool, d.write_mib_s, d.read_mib_s, d.sync_4k_iops
        )),
        None => s.push_str("raw disk: not measured (--disk none)\n"),
    }
    s.push_str(&format!(
        "CPU-s/GiB counts {}; machine = busy CPU-s/GiB of the whole machine; space = bytes the class stores per byte, stored = growth of the data files per byte written\n",
        r.rows.first().map(|x| x.cpu_scope.as_str()).unwrap_or("client")
    ));
    s
}

fn csv_text(rows: &[Row]) -> anyhow::Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r)?;
    }
    Ok(String::from_utf8(w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))?)?)
}

fn write_outputs(dir: &Path, r: &Report) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::write(dir.join("matrix.txt"), text(r))?;
    std::fs::write(dir.join("matrix.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("matrix.csv"), csv_text(&r.rows)?)?;
    crate::bench_chart::charts(dir, &r.rows, &r.cluster)?;
    Ok(())
}
