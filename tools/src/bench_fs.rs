//! `shoal bench fs`: the same file work through a FUSE mount, through the
//! native namespace API and on the local disk, in one run, so the mount's
//! overhead is a visible ratio.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use shoal_client::fs::{Fs, Kind, NewNode};
use shoal_common::mgmt::ContProps;
use shoal_tools::local::LocalCluster;

#[derive(Debug, Args)]
pub struct FsArgs {
    /// Directory on the disk to measure (default: a temporary one under /var/tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Servers in the cluster.
    #[arg(long, default_value_t = 6)]
    servers: usize,
    /// Targets per server.
    #[arg(long, default_value_t = 1)]
    targets: u32,
    /// The container's redundancy factor.
    #[arg(long, default_value_t = 1)]
    rd_fac: u8,
    /// MiB written (and read) sequentially in 1 MiB calls.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// 4 KiB files created, stat'ed and removed in one directory.
    #[arg(long, default_value_t = 2000)]
    files: u64,
    /// Extra `shoal mount` flags, e.g. "--writeback-cache".
    #[arg(long, allow_hyphen_values = true)]
    mount_flags: Vec<String>,
}

/// One way of doing the work, and what it measured.
#[derive(Default, Clone, Copy)]
struct Figures {
    write: f64,
    read: f64,
    create: f64,
    stat: f64,
    unlink: f64,
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn mounted(dir: &Path) -> bool {
    crate::mount::is_mounted(dir)
}

/// The work on a directory of a local file system (the mount or the disk).
fn on_dir(dir: &Path, mib: u64, files: u64) -> anyhow::Result<Figures> {
    let mut f = Figures::default();
    let buf: Vec<u8> = (0..1 << 20).map(|i| (i * 31 + 7) as u8).collect();
    let path = dir.join("seq");
    let t = Instant::now();
    let mut out = std::fs::File::create(&path)?;
    for _ in 0..mib {
        out.write_all(&buf)?;
    }
    out.sync_all()?;
    drop(out);
    f.write = rate(mib, t.elapsed());
    // Read from the servers (or the disk), not from the page cache.
    let input = std::fs::File::open(&path)?;
    // SAFETY: advice on an open descriptor.
    unsafe { libc::posix_fadvise(input.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    let mut input = std::io::BufReader::with_capacity(1 << 20, input);
    let t = Instant::now();
    let mut back = vec![0u8; 1 << 20];
    for _ in 0..mib {
        input.read_exact(&mut back)?;
    }
    f.read = rate(mib, t.elapsed());
    std::fs::remove_file(&path)?;

    let small = vec![7u8; 4096];
    let d = dir.join("many");
    std::fs::create_dir(&d)?;
    let t = Instant::now();
    for i in 0..files {
        std::fs::write(d.join(format!("f{i}")), &small)?;
    }
    f.create = rate(files, t.elapsed());
    let t = Instant::now();
    for i in 0..files {
        std::fs::metadata(d.join(format!("f{i}")))?;
    }
    f.stat = rate(files, t.elapsed());
    let t = Instant::now();
    for i in 0..files {
        std::fs::remove_file(d.join(format!("f{i}")))?;
    }
    f.unlink = rate(files, t.elapsed());
    std::fs::remove_dir(&d)?;
    Ok(f)
}

/// The same work through the native namespace API, one call at a time,
/// gathering writes as the mount does (unless it was told not to) and
/// flushing where the mount's caller closes or syncs.
async fn native(fs: &Fs, mib: u64, files: u64) -> anyhow::Result<Figures> {
    let mut f = Figures::default();
    let node = |kind| NewNode { kind, perm: 0o644, uid: 0, gid: 0, rdev: 0, target: None };
    let buf = Bytes::from((0..1 << 20).map(|i| (i * 31 + 7) as u8).collect::<Vec<u8>>());
    let file = fs.create(fs.root(), b"native-seq", &node(Kind::File), true).await?.0;
    let t = Instant::now();
    for i in 0..mib {
        fs.write(file.oid, i << 20, buf.clone()).await?;
    }
    fs.close_file(file.oid).await?;
    f.write = rate(mib, t.elapsed());
    let t = Instant::now();
    for i in 0..mib {
        let b = fs.read(file.oid, i << 20, 1 << 20).await?;
        anyhow::ensure!(b.len() == 1 << 20, "short read");
    }
    f.read = rate(mib, t.elapsed());
    if let Some(o) = fs.unlink(fs.root(), b"native-seq").await? {
        fs.reclaim(o).await?;
    }

    let d = fs.create(fs.root(), b"native-many", &node(Kind::Dir), true).await?.0;
    let small = Bytes::from(vec![7u8; 4096]);
    let t = Instant::now();
    for i in 0..files {
        let a = fs.create(d.oid, format!("f{i}").as_bytes(), &node(Kind::File), true).await?.0;
        fs.write(a.oid, 0, small.clone()).await?;
        fs.close_file(a.oid).await?;
    }
    f.create = rate(files, t.elapsed());
    let t = Instant::now();
    for i in 0..files {
        fs.lookup(d.oid, format!("f{i}").as_bytes()).await?;
    }
    f.stat = rate(files, t.elapsed());
    let t = Instant::now();
    for i in 0..files {
        if let Some(o) = fs.unlink(d.oid, format!("f{i}").as_bytes()).await? {
            fs.reclaim(o).await?;
        }
    }
    f.unlink = rate(files, t.elapsed());
    let d = fs.rmdir(fs.root(), b"native-many").await?;
    fs.reclaim(d).await?;
    Ok(f)
}

pub async fn run(a: FsArgs) -> anyhow::Result<()> {
    let (dir, _keep) = crate::bench::bench_dir(a.dir.clone())?;
    println!(
        "shoal bench fs: {} servers x {} targets on loopback, rd_fac {}, {} MiB sequential in 1 MiB calls, {} 4 KiB files in one directory, one process",
        a.servers, a.targets, a.rd_fac, a.mib, a.files
    );
    let cluster = LocalCluster::start(&dir.join("cluster"), a.servers, a.targets).await?;
    let client = cluster.client().await?;
    client.pool_create("bench", vec![], 0).await?;
    let pool = client.pool_connect("bench").await?;
    pool.cont_create("fs", ContProps { rd_fac: a.rd_fac, ..Default::default() }).await?;
    let fs = Fs::mount(pool.cont_open("fs").await?).await?;
    if !a.mount_flags.iter().any(|f| f == "--no-gather") {
        fs.gather_writes(shoal_client::fuse::MOUNT_WRITEBACK);
    }

    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    let log = dir.join("mount.log");
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--ms", &cluster.ms(), "mount", "bench/fs"])
        .arg(&mnt)
        .arg("--foreground")
        .args(&a.mount_flags)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("start shoal mount")?;
    let give_up = Instant::now() + Duration::from_secs(30);
    while !mounted(&mnt) {
        if child.try_wait()?.is_some() || Instant::now() > give_up {
            bail!("the mount did not come up: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (mib, files) = (a.mib, a.files);
    let m = mnt.clone();
    let mount = tokio::task::spawn_blocking(move || on_dir(&m, mib, files)).await?;
    let _ = crate::mount::umount(crate::mount::UmountArgs::lazy(&mnt));
    let _ = child.wait();
    let mount = mount.context("through the mount")?;
    let native = native(&fs, mib, files).await.context("through the native API")?;
    let local_dir = dir.join("local");
    std::fs::create_dir_all(&local_dir)?;
    let local =
        tokio::task::spawn_blocking(move || on_dir(&local_dir, mib, files)).await?.context("on the local disk")?;
    fs.unmount().await?;

    println!();
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "", "FUSE mount", "native API", "local disk", "mount/native", "mount/disk"
    );
    let row = |name: &str, f: fn(&Figures) -> f64, unit: &str| {
        let (m, n, l) = (f(&mount), f(&native), f(&local));
        println!(
            "{:<28} {:>12.0} {:>12.0} {:>12.0} {:>11.0}% {:>11.0}%",
            format!("{name} ({unit})"),
            m,
            n,
            l,
            100.0 * m / n,
            100.0 * m / l
        );
    };
    row("seq write 1 MiB", |f| f.write, "MiB/s");
    row("seq read 1 MiB", |f| f.read, "MiB/s");
    row("create+write 4 KiB", |f| f.create, "files/s");
    row("stat", |f| f.stat, "files/s");
    row("unlink", |f| f.unlink, "files/s");
    println!();
    println!("goals: the mount at 80% or more of the native API's bandwidth and 50% or more of its metadata rates");
    Ok(())
}
