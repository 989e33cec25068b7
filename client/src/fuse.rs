//! The FUSE shim: serves a mounted [`Fs`] to the kernel with the `fuser`
//! crate. Every request runs as a task on a tokio runtime, so one slow
//! request (a server that fails over) does not hold up the others; the
//! kernel's requests are read by several threads.
//!
//! Inode numbers are the low 64 bits of the inode's OID (unique within a
//! container; the root is 1). The kernel checks permissions
//! (`default_permissions`); writes are durable when they are answered, so
//! `fsync` only confirms. An unlinked file that is still open here stays
//! readable and writable until its last close.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags as FuseRenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use shoal_common::Oid;
use tokio::runtime::Handle;

use crate::fs::{Attr, DirEntry, Fs, FsError, FsResult, Kind, LockKind, NewNode, RenameFlags, SetAttr, XattrMode};

/// The write gathering of a mount's files ([`MountOptions::gather`]):
/// small, since a mount may have many files open, and short-lived.
pub const MOUNT_WRITEBACK: crate::WriteBack =
    crate::WriteBack { max_dirty: 16 << 20, max_age: Duration::from_secs(1), max_in_flight: 8 };

/// How a mount behaves.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// How long the kernel may trust attributes it was given.
    pub attr_timeout: Duration,
    /// How long the kernel may trust a name it looked up (and a missing one).
    pub entry_timeout: Duration,
    /// Let the kernel gather writes in its page cache (faster small writes;
    /// they reach the servers at close, fsync or writeback).
    pub writeback_cache: bool,
    /// Let every user reach the mount, not only the one who mounted it.
    pub allow_other: bool,
    /// Threads reading the kernel's requests.
    pub threads: usize,
    /// Largest write the kernel sends at once.
    pub max_write: u32,
    /// Gather file writes into whole stripes on the client
    /// ([`Fs::gather_writes`]); durable at close and fsync (see
    /// docs/posix.md). On by default.
    pub gather: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            attr_timeout: Duration::from_secs(1),
            entry_timeout: Duration::from_secs(1),
            writeback_cache: false,
            allow_other: false,
            threads: 4,
            max_write: 1 << 20,
            gather: true,
        }
    }
}

/// Sets the kernel's readahead for the mount at `mountpoint` (its
/// backing device's `read_ahead_kb`): the default 128 KiB cuts sequential
/// reads into requests too small to keep the servers busy.
///
/// The device is found in `/proc/self/mountinfo`, not by `stat`: the
/// serving process calls this before it serves, and a `stat` of its own
/// mount would wait for itself.
pub fn set_readahead(mountpoint: &Path, bytes: u64) -> std::io::Result<()> {
    let canon = mountpoint.canonicalize()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let dev = info
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(m) == canon))
        .filter_map(|l| l.split(' ').nth(2))
        .next_back()
        .ok_or_else(|| std::io::Error::other(format!("{} is not mounted", mountpoint.display())))?;
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    std::fs::write(path, format!("{}\n", (bytes / 1024).max(4)))
}

/// The `fuser` configuration for a mount with `opts`.
pub fn config(opts: &MountOptions, name: &str) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        fuser::MountOption::FSName(format!("shoal:{name}")),
        fuser::MountOption::Subtype("shoal".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Suid,
        fuser::MountOption::Dev,
    ];
    if opts.allow_other {
        c.acl = fuser::SessionACL::All;
    }
    c.n_threads = Some(opts.threads.max(1));
    c.clone_fd = true;
    c
}

struct OpenFile {
    oid: Oid,
    append: bool,
    /// Opened for writing: only its close flushes buffered writes.
    write: bool,
    /// Lock owners that took record locks through this handle and have
    /// not closed a descriptor of the file since. At the last close of the
    /// handle only open-file-description locks (`F_OFD_SETLK`, owned by
    /// the open file) can be left of them: the kernel does not release
    /// those itself, so the release does.
    lock_owners: Vec<u64>,
}

struct State {
    fs: Fs,
    rt: Handle,
    opts: MountOptions,
    inos: Mutex<HashMap<u64, Oid>>,
    files: Mutex<HashMap<u64, OpenFile>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_fh: AtomicU64,
    /// Inodes known to have no `security.capability`, until when: the
    /// kernel asks before every write (to clear file capabilities), and
    /// without this each write would wait for an extra round trip.
    no_caps: Mutex<HashMap<u64, std::time::Instant>>,
}

/// The attribute the kernel looks up before every write.
const CAPS: &[u8] = b"security.capability";
/// Most inodes `no_caps` remembers.
const NO_CAPS_MAX: usize = 1 << 16;

/// The FUSE file system of one mount.
pub struct ShoalFuse {
    st: Arc<State>,
}

impl ShoalFuse {
    /// Serves `fs`, running its calls on `rt`.
    pub fn new(fs: Fs, rt: Handle, opts: MountOptions) -> ShoalFuse {
        if opts.gather {
            fs.gather_writes(MOUNT_WRITEBACK);
        }
        ShoalFuse {
            st: Arc::new(State {
                fs,
                rt,
                opts,
                inos: Mutex::default(),
                files: Mutex::default(),
                dirs: Mutex::default(),
                next_fh: AtomicU64::new(1),
                no_caps: Mutex::default(),
            }),
        }
    }

    /// Runs `f` on the runtime; it answers the kernel itself.
    fn run<F>(&self, f: impl FnOnce(Arc<State>) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let fut = f(self.st.clone());
        self.st.rt.spawn(fut);
    }
}

/// Whether thread `tid` has a signal to take, or is gone: a blocked lock
/// request then stops waiting (this FUSE layer does not pass on the
/// kernel's interrupt requests, and without this a waiting process could
/// not be stopped with Ctrl-C). A thread that cannot be looked at (another
/// user's under `hidepid`) is taken as not interrupted.
fn signal_pending(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    let status = match std::fs::read_to_string(format!("/proc/{tid}/status")) {
        Ok(s) => s,
        Err(e) => return e.kind() == std::io::ErrorKind::NotFound,
    };
    if status.lines().any(|l| l.starts_with("State:") && l.contains("zombie")) {
        return true;
    }
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    (field("SigPnd:") | field("ShdPnd:")) & !field("SigBlk:") & !field("SigIgn:") != 0
}

/// Answers a request that returns nothing.
fn done(reply: ReplyEmpty, r: FsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn ns_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

impl State {
    fn ino(&self, oid: Oid) -> u64 {
        let root = self.fs.root();
        if oid == root {
            return 1;
        }
        // Every inode of a container has the root's class and type, so
        // its number is its OID's low half and nothing need be kept per
        // inode (the table would grow with every file the mount sees);
        // any other OID is remembered.
        if oid.hi != root.hi {
            self.inos.lock().expect("inos").insert(oid.lo, oid);
        }
        oid.lo
    }

    fn oid(&self, ino: INodeNo) -> FsResult<Oid> {
        let root = self.fs.root();
        if ino.0 == 1 {
            return Ok(root);
        }
        if let Some(oid) = self.inos.lock().expect("inos").get(&ino.0) {
            return Ok(*oid);
        }
        Ok(Oid { hi: root.hi, lo: ino.0 })
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.ino(a.oid)),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: time(a.atime),
            mtime: time(a.mtime),
            ctime: time(a.ctime),
            crtime: time(a.crtime),
            kind: file_type(a.kind),
            perm: (a.perm & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    fn entry(&self, reply: ReplyEntry, r: FsResult<Attr>) {
        match r {
            Ok(a) => {
                reply.entry_with_ttls(&self.opts.entry_timeout, &self.opts.attr_timeout, &self.attr(&a), Generation(0))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// A new handle of file `oid`; while any is open (on any mount) the
    /// file outlives its last name.
    async fn opened(&self, oid: Oid, append: bool, flags: i32, created: bool) -> FsResult<u64> {
        self.fs.open_file(oid, created).await?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        self.files.lock().expect("files").insert(fh, OpenFile { oid, append, write, lock_owners: Vec::new() });
        Ok(fh)
    }

    /// An inode lost its last name: free it now, or at its last close here
    /// or on another mount that has it open. Never fails: the name is gone
    /// already, and an inode not freed now stays in the orphan list for
    /// `shoal fs check` or the next mount.
    async fn orphaned(&self, oid: Option<Oid>) -> FsResult<()> {
        let Some(oid) = oid else { return Ok(()) };
        if let Err(e) = self.fs.reclaim(oid).await {
            tracing::warn!("freeing unlinked inode {oid} failed (the next mount or `shoal fs check` frees it): {e}");
        }
        Ok(())
    }

    async fn closed(&self, fh: u64) {
        let Some(f) = self.files.lock().expect("files").remove(&fh) else { return };
        // The last close here writes the buffered bytes (the FUSE flush
        // reported any error already), and frees the inode if this was the
        // last open anywhere and it has no names left.
        if let Err(e) = self.fs.release_file(f.oid).await {
            tracing::warn!("closing inode {} failed (`shoal fs check` frees it later if it has no name): {e}", f.oid);
        }
    }
}

/// A new inode of `kind` for the caller of `req`, its mode after the umask.
fn new_node(kind: Kind, mode: u32, umask: u32, req: &Request, rdev: u32) -> NewNode {
    NewNode { kind, perm: mode & !umask & 0o7777, uid: req.uid(), gid: req.gid(), rdev, target: None }
}

fn name_of(n: &OsStr) -> Vec<u8> {
    n.as_bytes().to_vec()
}

impl Filesystem for ShoalFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(self.st.opts.max_write);
        let _ = config.set_max_readahead(1 << 20);
        // Record locks and flock go to the servers, so they hold across
        // mounts.
        let mut want = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_FLOCK_LOCKS;
        if self.st.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        let _ = config.add_capabilities(want & config.capabilities());
        Ok(())
    }

    fn destroy(&mut self) {}

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name_of(name);
        self.run(|st| async move {
            let r = async { st.fs.lookup(st.oid(parent)?, &name).await }.await;
            st.entry(reply, r);
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.run(|st| async move {
            match async { st.fs.getattr(st.oid(ino)?).await }.await {
                Ok(a) => reply.attr(&st.opts.attr_timeout, &st.attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let t = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => ns_of(t),
            TimeOrNow::Now => crate::fs::now_ns(),
        };
        let set = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(t),
            mtime: mtime.map(t),
            ctime: ctime.map(ns_of),
        };
        self.run(|st| async move {
            match async { st.fs.setattr(st.oid(ino)?, &set).await }.await {
                Ok(a) => reply.attr(&st.opts.attr_timeout, &st.attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.run(|st| async move {
            match async { st.fs.readlink(st.oid(ino)?).await }.await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let Some(kind) = Kind::from_mode(mode) else {
            reply.error(Errno::EINVAL);
            return;
        };
        let node = NewNode { kind, perm: mode & !umask & 0o7777, uid: req.uid(), gid: req.gid(), rdev, target: None };
        let name = name_of(name);
        self.run(|st| async move {
            let r = async { Ok(st.fs.create(st.oid(parent)?, &name, &node, true).await?.0) }.await;
            st.entry(reply, r);
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let node = new_node(Kind::Dir, mode, umask, req, 0);
        let name = name_of(name);
        self.run(|st| async move {
            let r = async { Ok(st.fs.create(st.oid(parent)?, &name, &node, true).await?.0) }.await;
            st.entry(reply, r);
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_of(name);
        self.run(|st| async move {
            let r = async {
                let gone = st.fs.unlink(st.oid(parent)?, &name).await?;
                st.orphaned(gone).await
            }
            .await;
            done(reply, r)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_of(name);
        self.run(|st| async move {
            let r = async {
                let gone = st.fs.rmdir(st.oid(parent)?, &name).await?;
                st.orphaned(Some(gone)).await
            }
            .await;
            done(reply, r)
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let node = NewNode {
            kind: Kind::Symlink,
            perm: 0o777,
            uid: req.uid(),
            gid: req.gid(),
            rdev: 0,
            target: Some(target.as_os_str().as_bytes().to_vec()),
        };
        let name = name_of(link_name);
        self.run(|st| async move {
            let r = async { Ok(st.fs.create(st.oid(parent)?, &name, &node, true).await?.0) }.await;
            st.entry(reply, r);
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: FuseRenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(FuseRenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let flags = RenameFlags {
            noreplace: flags.contains(FuseRenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(FuseRenameFlags::RENAME_EXCHANGE),
        };
        let (name, newname) = (name_of(name), name_of(newname));
        self.run(|st| async move {
            let r = async {
                let gone = st.fs.rename(st.oid(parent)?, &name, st.oid(newparent)?, &newname, flags).await?;
                st.orphaned(gone).await
            }
            .await;
            done(reply, r)
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let name = name_of(newname);
        self.run(|st| async move {
            let r = async { st.fs.link(st.oid(ino)?, st.oid(newparent)?, &name).await }.await;
            st.entry(reply, r);
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.run(|st| async move {
            // With the writeback cache the kernel places appends itself, and
            // flushes pages through any handle.
            let append = flags.0 & libc::O_APPEND != 0 && !st.opts.writeback_cache;
            match async { st.opened(st.oid(ino)?, append, flags.0, false).await }.await {
                Ok(fh) => {
                    // Appends go where the servers say the end is, which
                    // the kernel's cache may not know: no caching for them.
                    let f = if append { FopenFlags::FOPEN_DIRECT_IO } else { FopenFlags::empty() };
                    reply.opened(FileHandle(fh), f);
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.run(|st| async move {
            match async { st.fs.read_known_size(st.oid(ino)?, offset, size as u64).await }.await {
                Ok(b) => reply.data(&b),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = Bytes::copy_from_slice(data);
        self.run(|st| async move {
            let append = st.files.lock().expect("files").get(&fh.0).is_some_and(|f| f.append);
            let n = data.len() as u32;
            let r = async {
                let oid = st.oid(ino)?;
                if append {
                    st.fs.append(oid, data).await.map(|_| ())
                } else {
                    st.fs.write(oid, offset, data).await.map(|_| ())
                }
            }
            .await;
            match r {
                Ok(()) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        // A close of a descriptor open for writing makes the file's
        // gathered writes durable (and reports a failed one, as close(2)
        // does); every close drops the record locks of the closing process
        // (POSIX: of any descriptor of the file).
        self.run(|st| async move {
            done(
                reply,
                async {
                    let oid = st.oid(ino)?;
                    let write = {
                        let mut files = st.files.lock().expect("files");
                        // The closing process's record locks go below,
                        // whichever handle they were taken through.
                        for f in files.values_mut().filter(|f| f.oid == oid) {
                            f.lock_owners.retain(|o| *o != lock_owner.0);
                        }
                        files.get(&fh.0).is_none_or(|f| f.write)
                    };
                    let flushed = if write { st.fs.flush_file(oid).await } else { Ok(()) };
                    st.fs.unlock_owner(oid, lock_owner.0).await?;
                    flushed
                }
                .await,
            )
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        self.run(|st| async move {
            let write = typ == libc::F_WRLCK;
            match async { st.fs.getlk(st.oid(ino)?, lock_owner.0, pid, start, end, write).await }.await {
                Ok(Some(c)) => reply.locked(c.start, c.end, if c.write { libc::F_WRLCK } else { libc::F_RDLCK }, c.pid),
                Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let kind = match typ {
            libc::F_RDLCK => LockKind::Read,
            libc::F_WRLCK => LockKind::Write,
            libc::F_UNLCK => LockKind::Unlock,
            _ => return reply.error(Errno::EINVAL),
        };
        // The waiting thread (the lock's `pid` is its process).
        let tid = req.pid();
        if kind != LockKind::Unlock {
            if let Some(f) = self.st.files.lock().expect("files").get_mut(&fh.0) {
                if !f.lock_owners.contains(&lock_owner.0) {
                    f.lock_owners.push(lock_owner.0);
                }
            }
        }
        self.run(|st| async move {
            let r = async {
                let oid = st.oid(ino)?;
                st.fs.setlk(oid, lock_owner.0, pid, start, end, kind, sleep, || signal_pending(tid)).await
            }
            .await;
            done(reply, r)
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.run(|st| async move {
            // The last close of a file that was flock()ed drops the lock,
            // and that of an open file its OFD locks.
            let mut owners =
                st.files.lock().expect("files").get(&fh.0).map(|f| f.lock_owners.clone()).unwrap_or_default();
            owners.extend(lock_owner.map(|o| o.0));
            owners.sort_unstable();
            owners.dedup();
            if let Ok(oid) = st.oid(ino) {
                for owner in owners {
                    if let Err(e) = st.fs.unlock_owner(oid, owner).await {
                        tracing::warn!(%oid, error = %e, "could not release a lock at close; it lapses with the lease");
                    }
                }
            }
            st.closed(fh.0).await;
            reply.ok();
        });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Flushes the file's buffered writes (with --no-gather every write
        // was durable on all its shards when it was answered already).
        self.run(|st| async move { done(reply, async { st.fs.fsync(st.oid(ino)?).await }.await) });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.run(|st| async move {
            match async { st.fs.readdir(st.oid(ino)?).await }.await {
                Ok(entries) => {
                    let fh = st.next_fh.fetch_add(1, Ordering::Relaxed);
                    st.dirs.lock().expect("dirs").insert(fh, Arc::new(entries));
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(entries) = self.st.dirs.lock().expect("dirs").get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        let mut i = offset;
        if i == 0 {
            if reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            i = 1;
        }
        if i == 1 {
            // The kernel fills in `..` itself; its inode here is only a hint.
            if reply.add(INodeNo(1), 2, FileType::Directory, "..") {
                return reply.ok();
            }
            i = 2;
        }
        for (n, e) in entries.iter().enumerate().skip((i - 2) as usize) {
            let ino = INodeNo(self.st.ino(e.oid));
            if reply.add(ino, n as u64 + 3, file_type(e.kind), OsStr::from_bytes(&e.name)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.st.dirs.lock().expect("dirs").remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.run(|st| async move {
            match st.fs.statfs().await {
                Ok(s) => reply.statfs(
                    s.blocks,
                    s.blocks_free,
                    s.blocks_free,
                    0,
                    u64::MAX >> 1,
                    s.block_size,
                    s.name_max,
                    s.block_size,
                ),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = if flags & libc::XATTR_CREATE != 0 {
            XattrMode::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrMode::Replace
        } else {
            XattrMode::Any
        };
        let (name, value) = (name_of(name), value.to_vec());
        self.run(|st| async move {
            let r = async { st.fs.setxattr(st.oid(ino)?, &name, &value, mode).await }.await;
            st.no_caps.lock().expect("no_caps").remove(&ino.0);
            done(reply, r)
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name_of(name);
        let caps = name == CAPS;
        if caps && self.st.no_caps.lock().expect("no_caps").get(&ino.0).is_some_and(|t| *t > std::time::Instant::now())
        {
            return reply.error(Errno::ENODATA);
        }
        self.run(|st| async move {
            match async { st.fs.getxattr(st.oid(ino)?, &name).await }.await {
                Ok(v) => xattr_reply(reply, &v, size),
                Err(e) => {
                    // Trusted as long as attributes are.
                    if caps && e.errno() == libc::ENODATA && !st.opts.attr_timeout.is_zero() {
                        let mut no = st.no_caps.lock().expect("no_caps");
                        if no.len() >= NO_CAPS_MAX {
                            no.clear();
                        }
                        no.insert(ino.0, std::time::Instant::now() + st.opts.attr_timeout);
                    }
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.run(|st| async move {
            match async { st.fs.listxattr(st.oid(ino)?).await }.await {
                Ok(names) => {
                    let mut v = Vec::new();
                    for n in names {
                        v.extend_from_slice(&n);
                        v.push(0);
                    }
                    xattr_reply(reply, &v, size)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name_of(name);
        self.st.no_caps.lock().expect("no_caps").remove(&ino.0);
        self.run(|st| async move { done(reply, async { st.fs.removexattr(st.oid(ino)?, &name).await }.await) });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // `default_permissions`: the kernel has checked already.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let node = new_node(Kind::File, mode, umask, req, 0);
        let name = name_of(name);
        self.run(|st| async move {
            let r = async {
                let (mut a, created) = st.fs.create(st.oid(parent)?, &name, &node, flags & libc::O_EXCL != 0).await?;
                if !created && flags & libc::O_TRUNC != 0 {
                    a = st.fs.setattr(a.oid, &SetAttr { size: Some(0), ..SetAttr::default() }).await?;
                }
                let append = flags & libc::O_APPEND != 0 && !st.opts.writeback_cache;
                let fh = st.opened(a.oid, append, flags, created).await?;
                Ok::<_, FsError>((a, fh, append))
            }
            .await;
            match r {
                Ok((a, fh, append)) => {
                    let f = if append { FopenFlags::FOPEN_DIRECT_IO } else { FopenFlags::empty() };
                    reply.created(&st.opts.entry_timeout, &st.attr(&a), Generation(0), FileHandle(fh), f);
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.run(
            |st| async move { done(reply, async { st.fs.fallocate(st.oid(ino)?, mode, offset, length).await }.await) },
        );
    }
}

fn xattr_reply(reply: ReplyXattr, v: &[u8], size: u32) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if v.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(v);
    }
}
