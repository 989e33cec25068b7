//! `shoal mount`, `shoal umount` and `shoal fs`: a container as a POSIX
//! file system.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use shoal_client::fs::{Fs, MountDefaults, XattrMode, XATTR_CHUNK, XATTR_OCLASS};
use shoal_client::fuse::{MountOptions, ShoalFuse};

use crate::{out, Ctx};

#[derive(Debug, Args)]
pub struct MountArgs {
    /// The container, as POOL/CONT.
    target: String,
    /// An existing empty directory.
    mountpoint: PathBuf,
    /// Stay in the foreground (default: serve from a background process
    /// and return once the mount is up).
    #[arg(short, long)]
    foreground: bool,
    /// Write the serving process's pid here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Where a background mount logs (default: /tmp/shoal-mount-<pid>.log).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// How long the kernel trusts attributes ("1s"; "0s": ask every time).
    /// Default: the container's (`shoal fs set-prop`), else 1s.
    #[arg(long, value_parser = humantime::parse_duration)]
    attr_timeout: Option<Duration>,
    /// How long the kernel trusts names it looked up. Default: the
    /// container's, else 1s.
    #[arg(long, value_parser = humantime::parse_duration)]
    entry_timeout: Option<Duration>,
    /// Gather small writes in the kernel's page cache (they reach the
    /// servers at close, fsync or writeback).
    #[arg(long)]
    writeback_cache: bool,
    /// Let every user reach the mount, not only the one who mounted it.
    #[arg(long)]
    allow_other: bool,
    /// Threads reading the kernel's requests.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// How far the kernel reads ahead of a sequential reader.
    #[arg(long, default_value = "4MiB", value_parser = out::parse_size)]
    readahead: u64,
    /// Do not gather each file's writes on the client into whole stripes
    /// (durable at close or fsync; see docs/posix.md): every write is then
    /// durable when it returns, and small or unaligned writes are slower.
    #[arg(long)]
    no_gather: bool,
    /// Gather writes (the default; kept for scripts that ask for it).
    #[arg(long, hide = true, conflicts_with = "no_gather")]
    gather: bool,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    mountpoint: PathBuf,
    /// Detach now even if files are open (they keep working until closed).
    #[arg(short, long)]
    lazy: bool,
}

impl UmountArgs {
    /// A lazy unmount of `mountpoint`.
    pub fn lazy(mountpoint: &Path) -> UmountArgs {
        UmountArgs { mountpoint: mountpoint.to_path_buf(), lazy: true }
    }
}

#[derive(Debug, Subcommand)]
pub enum FsCmd {
    /// Shows a file's class, chunk size and servers, or a directory's
    /// layout defaults.
    GetAttr {
        /// The container, as POOL/CONT.
        target: String,
        /// A path inside the container ("/data/file").
        path: String,
    },
    /// Sets a directory's defaults for what is created below it (also the
    /// xattrs user.shoal.oclass and user.shoal.chunk_size on a mount).
    SetAttr {
        target: String,
        path: String,
        #[arg(long)]
        oclass: Option<String>,
        #[arg(long, value_parser = out::parse_size)]
        chunk_size: Option<u64>,
    },
    /// Removes a directory's layout defaults: the container's apply again.
    ResetAttr { target: String, path: String },
    /// Frees what unmounted or dead clients left in the orphan list.
    Check { target: String },
    /// Shows the container's defaults for mounts.
    GetProp { target: String },
    /// Sets the container's defaults for mounts made from now on (a
    /// mount's own options win).
    SetProp {
        target: String,
        /// How long the kernel trusts attributes ("5s"; "0s": ask every time).
        #[arg(long, value_parser = humantime::parse_duration)]
        attr_timeout: Option<Duration>,
        /// How long the kernel trusts names it looked up.
        #[arg(long, value_parser = humantime::parse_duration)]
        entry_timeout: Option<Duration>,
        /// Forget the defaults set before (what is given is set after).
        #[arg(long)]
        reset: bool,
    },
}

fn split(target: &str) -> anyhow::Result<(&str, &str)> {
    match target.split_once('/') {
        Some((p, c)) if !p.is_empty() && !c.is_empty() => Ok((p, c)),
        _ => bail!("name the container as POOL/CONT, not {target:?}"),
    }
}

async fn open(ctx: &Ctx, target: &str) -> anyhow::Result<Fs> {
    let (pool, cont) = split(target)?;
    let client = ctx.client().await?;
    let cont = client
        .pool_connect(pool)
        .await
        .with_context(|| format!("pool {pool}"))?
        .cont_open(cont)
        .await
        .with_context(|| format!("container {cont}"))?;
    Fs::mount(cont).await.context("open the container's namespace")
}

/// Whether `path` is a mount point now.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = path.canonicalize() else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(&unescape(m)) == canon))
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

pub async fn mount(ctx: &Ctx, a: MountArgs) -> anyhow::Result<()> {
    split(&a.target)?;
    let md = std::fs::metadata(&a.mountpoint).with_context(|| format!("mount point {}", a.mountpoint.display()))?;
    if !md.is_dir() {
        bail!("mount point {} is not a directory", a.mountpoint.display());
    }
    if is_mounted(&a.mountpoint) {
        bail!("{} is mounted already (`shoal umount` it first)", a.mountpoint.display());
    }
    if !a.foreground {
        return background(a);
    }
    let fs = open(ctx, &a.target).await?;
    match fs.clean_orphans(false).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("freed {n} files that earlier mounts left unlinked"),
        Err(e) => tracing::warn!("could not clean the orphan list: {e}"),
    }
    let defaults = fs.mount_defaults().await.unwrap_or_else(|e| {
        tracing::warn!("the container's mount defaults are unreadable ({e}); using the built-in ones");
        Default::default()
    });
    let opts = MountOptions {
        attr_timeout: a.attr_timeout.or(defaults.attr_timeout).unwrap_or(MountOptions::default().attr_timeout),
        entry_timeout: a.entry_timeout.or(defaults.entry_timeout).unwrap_or(MountOptions::default().entry_timeout),
        writeback_cache: a.writeback_cache,
        allow_other: a.allow_other,
        threads: a.threads,
        gather: !a.no_gather,
        ..MountOptions::default()
    };
    let config = shoal_client::fuse::config(&opts, &a.target);
    let fuse = ShoalFuse::new(fs.clone(), tokio::runtime::Handle::current(), opts);
    let mut session = fuser::Session::new(fuse, &a.mountpoint, &config)
        .with_context(|| format!("mount {} (is /dev/fuse there?)", a.mountpoint.display()))?;
    if let Err(e) = shoal_client::fuse::set_readahead(&a.mountpoint, a.readahead) {
        tracing::warn!("could not set the mount's readahead (sequential reads will be slower): {e}");
    }
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id())).with_context(|| format!("write {}", p.display()))?;
    }
    eprintln!("shoal: {} mounted on {}", a.target, a.mountpoint.display());
    let mut unmounter = session.unmount_callable();
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => (t, i),
            _ => return,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if let Err(e) = unmounter.unmount() {
            eprintln!("shoal: unmount: {e} (files still open? `shoal umount --lazy` detaches)");
        }
    });
    let r = tokio::task::spawn_blocking(move || session.run()).await.context("the FUSE session panicked")?;
    signals.abort();
    // What was unlinked while open here is closed now.
    if let Err(e) = fs.clean_orphans(true).await {
        tracing::warn!("could not free unlinked files: {e}");
    }
    let _ = fs.unmount().await;
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(p);
    }
    r.context("serving the mount")?;
    eprintln!("shoal: {} unmounted", a.mountpoint.display());
    Ok(())
}

/// Serves the mount from a new session in the background; returns once it
/// is mounted (or the server failed, with its log).
fn background(a: MountArgs) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("find the shoal binary")?;
    let log = a
        .log_file
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("shoal-mount-{}.log", std::process::id())));
    let file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args).stdin(std::process::Stdio::null()).stdout(file.try_clone()?).stderr(file);
    // SAFETY: setsid is async-signal-safe; the child only detaches from
    // the terminal's session before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("start the mount process")?;
    let give_up = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if is_mounted(&a.mountpoint) {
            println!("{} mounted on {} (pid {}, log {})", a.target, a.mountpoint.display(), child.id(), log.display());
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("the mount process exited ({status}):\n{}", text.trim_end());
        }
        if std::time::Instant::now() > give_up {
            let _ = child.kill();
            bail!("the mount did not come up within 60s; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn umount(a: UmountArgs) -> anyhow::Result<()> {
    let c = CString::new(a.mountpoint.as_os_str().as_bytes()).context("a mount point without NUL bytes")?;
    let flags = if a.lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EBUSY) => bail!(
            "{} is busy: files are open or a process works in it (`--lazy` detaches it now)",
            a.mountpoint.display()
        ),
        Some(libc::EINVAL) => bail!("{} is not mounted", a.mountpoint.display()),
        _ => Err(e).with_context(|| format!("unmount {}", a.mountpoint.display())),
    }
}

pub async fn fs(ctx: &Ctx, c: FsCmd) -> anyhow::Result<()> {
    let target = match &c {
        FsCmd::GetAttr { target, .. }
        | FsCmd::SetAttr { target, .. }
        | FsCmd::ResetAttr { target, .. }
        | FsCmd::Check { target }
        | FsCmd::GetProp { target }
        | FsCmd::SetProp { target, .. } => target.clone(),
    };
    let fs = open(ctx, &target).await?;
    let r = fs_cmd(ctx, &fs, c).await;
    let _ = fs.unmount().await;
    r
}

async fn fs_cmd(ctx: &Ctx, fs: &Fs, c: FsCmd) -> anyhow::Result<()> {
    match c {
        FsCmd::GetAttr { path, .. } => {
            let a = fs.resolve(&path).await?;
            match a.kind {
                shoal_client::fs::Kind::File => {
                    let Some(l) = fs.layout(a.oid).await? else {
                        println!(
                            "{path}: size {}, no data written yet (its class is chosen at the first write)",
                            a.size
                        );
                        return Ok(());
                    };
                    let ranks: Vec<String> = l.ranks.iter().map(u32::to_string).collect();
                    if ctx.json {
                        let v = serde_json::json!({"path": path, "oid": a.oid.to_string(), "oclass": l.class.to_string(), "chunk_size": l.chunk_size, "size": a.size, "ranks": l.ranks});
                        println!("{v}");
                    } else {
                        println!(
                            "{path}: oid {} class {} chunk size {} size {} servers {}",
                            a.oid,
                            l.class,
                            bytesize::ByteSize::b(l.chunk_size),
                            a.size,
                            ranks.join(",")
                        );
                    }
                }
                shoal_client::fs::Kind::Dir => {
                    let get = |k: &str| {
                        let fs = fs.clone();
                        let k = k.to_string();
                        async move {
                            fs.getxattr(a.oid, k.as_bytes())
                                .await
                                .ok()
                                .map(|v| String::from_utf8_lossy(&v).into_owned())
                        }
                    };
                    let (oc, ch) = (get(XATTR_OCLASS).await, get(XATTR_CHUNK).await);
                    let info = fs.container().info();
                    let cont_class = info.props.oclass.clone().unwrap_or_else(|| "automatic".into());
                    println!(
                        "{path}: directory; files below get class {} and chunk size {}",
                        oc.unwrap_or(format!("{cont_class} (the container's)")),
                        ch.unwrap_or(format!("{} (the container's)", bytesize::ByteSize::b(info.props.chunk_size)))
                    );
                }
                k => println!("{path}: {k:?}"),
            }
            Ok(())
        }
        FsCmd::SetAttr { path, oclass, chunk_size, .. } => {
            if oclass.is_none() && chunk_size.is_none() {
                bail!("give --oclass, --chunk-size or both");
            }
            let a = fs.resolve(&path).await?;
            if a.kind != shoal_client::fs::Kind::Dir {
                bail!("{path} is not a directory: a file's layout is fixed when it is created");
            }
            if let Some(c) = oclass {
                fs.setxattr(a.oid, XATTR_OCLASS.as_bytes(), c.as_bytes(), XattrMode::Any).await?;
            }
            if let Some(c) = chunk_size {
                fs.setxattr(a.oid, XATTR_CHUNK.as_bytes(), c.to_string().as_bytes(), XattrMode::Any).await?;
            }
            Ok(())
        }
        FsCmd::ResetAttr { path, .. } => {
            let a = fs.resolve(&path).await?;
            for k in [XATTR_OCLASS, XATTR_CHUNK] {
                match fs.removexattr(a.oid, k.as_bytes()).await {
                    Ok(()) => {}
                    Err(e) if e.errno() == libc::ENODATA => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        }
        FsCmd::GetProp { .. } => {
            let d = fs.mount_defaults().await?;
            let show = |v: Option<Duration>| {
                v.map_or("(not set: 1s)".to_string(), |d| humantime::format_duration(d).to_string())
            };
            println!("attr-timeout:  {}", show(d.attr_timeout));
            println!("entry-timeout: {}", show(d.entry_timeout));
            Ok(())
        }
        FsCmd::SetProp { attr_timeout, entry_timeout, reset, .. } => {
            if attr_timeout.is_none() && entry_timeout.is_none() && !reset {
                bail!("give --attr-timeout, --entry-timeout or --reset");
            }
            let mut d = if reset { MountDefaults::default() } else { fs.mount_defaults().await? };
            d.attr_timeout = attr_timeout.or(d.attr_timeout);
            d.entry_timeout = entry_timeout.or(d.entry_timeout);
            fs.set_mount_defaults(&d).await?;
            Ok(())
        }
        FsCmd::Check { .. } => {
            let n = fs.clean_orphans(false).await?;
            println!("freed {n} unlinked files that no live mount holds open");
            Ok(())
        }
    }
}
