//! The POSIX namespace: a file system inside a container, usable from Rust
//! without FUSE (like DAOS DFS). The FUSE daemon (`shoal mount`) is a thin
//! shim over it.
//!
//! # Layout
//!
//! - The **superblock** is object 2 (replicated like the name index): dkey
//!   `sb` holds the format magic; dkey `mounts` one heartbeat per mounted
//!   client (akey = mount id, value = its wall clock), so orphans of dead
//!   mounts can be found.
//! - Every **inode** is one small replicated object. Its record (type,
//!   mode, owner, link count, rdev, symlink target, parent of a directory,
//!   extended attributes, a file's data array and layout hints) is the
//!   single value `inode` under dkey `\0`; the times (`atime`, `mtime`,
//!   `ctime`, nanoseconds) and a file's `size` are values beside it, so a
//!   write stamps them without reading the record and `stat` is one
//!   request. A regular file's bytes are an array object of their own,
//!   made at the first write in the class chosen then.
//! - A **directory entry** is dkey `name` of the directory's object, akey
//!   `e`: the inode's OID and type. Names never contain `/` or NUL, so
//!   they never meet the inode dkey. Hard links are several entries that
//!   name one inode, whose record counts them.
//! - The root directory is object 3; the **orphan list** is object 4: dkey
//!   = the OID of an inode whose last name was removed, value = the mount
//!   that removed it. The inode is destroyed when its last user closes it
//!   (or by [`Fs::clean_orphans`] once its mount is gone).
//!
//! # Consistency
//!
//! Readers take no locks. Every change takes the server-kept locks of what
//! it changes (a directory's entries, an inode's record), in one global
//! order (the rename lock, then entry locks by OID, then inode locks by
//! OID), so changes from many mounts of one container serialise and never
//! deadlock. A rename writes the new name before it removes the old one:
//! a reader of the new name sees the old target or the new one, never
//! nothing. Names are added before they are removed and link counts are
//! raised before and lowered after: a client that dies mid-change may
//! leave an extra name or an unreferenced object, never a name that loses
//! data it had. Locks are leases renewed while a change runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use shoal_common::msg::ValueKind;
use shoal_common::oclass::{make_oid, oid_type, ObjType, ObjectClass};
use shoal_common::{ErrorKind, Oid, ShoalError, EPOCH_MAX};

use crate::ec_write::{StripeLock, STRIPE_LOCK_LEASE};
use crate::writeback::{ArrayWriter, LandedHook, WriteBack};
use crate::{Array, Container, Object, Pool};

mod lock;
pub use lock::{LockKind, FILE_LOCK_LEASE};

/// Longest name of a directory entry, in bytes.
pub const NAME_MAX: usize = 255;
/// Longest symlink target, in bytes.
pub const PATH_MAX: usize = 4096;
/// Largest value of one extended attribute.
pub const XATTR_SIZE_MAX: usize = 64 << 10;
/// Most bytes of names and values of one inode's extended attributes.
const XATTR_TOTAL_MAX: usize = 256 << 10;
/// A directory that names these attributes chooses the class and chunk
/// size of files created below it (and passes them on to new directories).
pub const XATTR_OCLASS: &str = "user.shoal.oclass";
pub const XATTR_CHUNK: &str = "user.shoal.chunk_size";

/// With write gathering on ([`Fs::gather_writes`]), all the files of one
/// handle together hold at most this many times one file's `max_dirty`
/// buffered; past it a write waits for its own file's buffered bytes to be
/// written.
pub const DIRTY_FILES_MAX: u64 = 16;

/// The landing hook of a gathering file writer: raises the file's size
/// (kept in inode object `inode`) past the bytes that just landed in array
/// `data`; not past the array's own size, which a truncate by another
/// mount may have cut after they landed (the truncate then came last).
fn size_raiser(inode: Object, data: Array) -> LandedHook {
    Arc::new(move |end: u64| {
        let (inode, data) = (inode.clone(), data.clone());
        Box::pin(async move {
            let end = end.min(data.size().await?);
            // The modification time of gathered writes too: stamped as
            // they land rather than once per write (a write's own request
            // to the inode cost as much as a small file's data).
            inode.update_values(OBJ_DKEY, &written_values(end, now_ns())).await.map(|_| ())
        })
    })
}

/// What a write stamps on its inode once its bytes are on the servers: the
/// size raised to `end` (never lowered), and mtime and ctime.
fn written_values(end: u64, now: i64) -> [(&'static [u8], ValueKind, Bytes); 3] {
    [
        (SIZE, ValueKind::MaxU64, Bytes::copy_from_slice(&end.to_le_bytes())),
        (MTIME, ValueKind::Single, ns(now)),
        (CTIME, ValueKind::Single, ns(now)),
    ]
}

const SB_SEQ: u128 = 2;
const ROOT_SEQ: u128 = 3;
const ORPHANS_SEQ: u128 = 4;
const MAGIC: &[u8] = b"shoal-posix-1";
const SB_DKEY: &[u8] = b"sb";
const MOUNTS_DKEY: &[u8] = b"mounts";
/// Akey of the superblock's dkey `sb`: the container's [`MountDefaults`].
const MOUNT_DEFAULTS: &[u8] = b"mount-defaults";
const OBJ_DKEY: &[u8] = b"\0";
const REC: &[u8] = b"inode";
const ATIME: &[u8] = b"atime";
const MTIME: &[u8] = b"mtime";
const CTIME: &[u8] = b"ctime";
const SIZE: &[u8] = b"size";
const ENTRY: &[u8] = b"e";
const OWNER: &[u8] = b"owner";
/// Akey prefix of an inode's open marks: `open.` and a mount's id, while
/// that mount has the inode open.
const OPEN_MARK: &[u8] = b"open.";

fn open_mark(mount: u128) -> Vec<u8> {
    [OPEN_MARK, &mount.to_le_bytes()[..]].concat()
}

/// A file's size as its inode keeps it (absent: 0).
fn size_value(v: Option<&[u8]>) -> u64 {
    v.and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
}
/// Lock numbers (stripes of the inode dkey): the order they are taken in.
const RENAME_LOCK: u64 = 0;
const ENTRIES_LOCK: u64 = 1;
const INODE_LOCK: u64 = 2;
const APPEND_LOCK: u64 = 3;
/// How often a mount refreshes its heartbeat, and how long another mount
/// must see it stand still (on its own clock: clocks of clients are never
/// compared) before it takes that mount for gone.
const HEARTBEAT: Duration = Duration::from_secs(30);
const MOUNT_GONE: Duration = Duration::from_secs(300);
/// A file whose first write (or size) reaches this is erasure-coded when
/// nothing else chooses its class; a smaller one is replicated.
pub const LARGE_FILE: u64 = 1 << 20;
/// Entries looked up at once while listing a directory.
const LIST_PARALLEL: usize = 64;

/// Container-wide defaults of FUSE mounts, kept in the superblock (like
/// DAOS's container attributes for dfuse): a mount's own options win.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountDefaults {
    /// How long the kernel trusts attributes.
    pub attr_timeout: Option<Duration>,
    /// How long the kernel trusts names it looked up.
    pub entry_timeout: Option<Duration>,
}

/// A failure of a namespace call, with the errno a POSIX program expects.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A POSIX error (`ENOENT`, `EEXIST`, ...).
    #[error("{msg}")]
    Posix { errno: i32, msg: String },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] ShoalError),
}

impl FsError {
    /// The errno for this error: POSIX errors as they are; a full pool is
    /// `ENOSPC`, a refused permission `EACCES`, data that cannot be read
    /// or servers out of reach `EIO`.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Posix { errno, .. } => *errno,
            FsError::Store(e) => match e.kind() {
                ErrorKind::NoSpace => libc::ENOSPC,
                ErrorKind::NoPermission => libc::EACCES,
                ErrorKind::InvalidArgument => libc::EINVAL,
                ErrorKind::NotFound => libc::ENOENT,
                ErrorKind::Exists => libc::EEXIST,
                ErrorKind::Busy | ErrorKind::Conflict => libc::EAGAIN,
                ErrorKind::Timeout => libc::ETIMEDOUT,
                _ => libc::EIO,
            },
        }
    }
}

/// The result of a namespace call.
pub type FsResult<T> = std::result::Result<T, FsError>;

fn posix(errno: i32, msg: impl Into<String>) -> FsError {
    FsError::Posix { errno, msg: msg.into() }
}

/// The type of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    /// The type bits of `st_mode` (`S_IFREG`, ...).
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    /// The type named by the type bits of `mode`.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// The stored inode record (the times and a file's size are kept apart).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    perm: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    rdev: u32,
    /// A directory's parent (`None` for the root).
    parent: Option<Oid>,
    /// A symlink's target.
    target: Option<Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    crtime: i64,
    /// A regular file's data: an array made at the first write, in the
    /// class chosen then (see [`Fs::data_for_write`]).
    data: Option<Oid>,
    /// The class and chunk size its directory asked for, if any.
    class: Option<String>,
    chunk: Option<u64>,
}

impl Record {
    /// What `stat` shows, given the size and the atime, mtime and ctime.
    fn attr(&self, oid: Oid, size: u64, [atime, mtime, ctime]: [i64; 3]) -> Attr {
        Attr {
            oid,
            kind: self.kind,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            nlink: self.nlink,
            size,
            rdev: self.rdev,
            atime,
            mtime,
            ctime,
            crtime: self.crtime,
        }
    }
}

/// A directory entry as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    oid: Oid,
    kind: Kind,
}

/// What `stat` shows of an inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub oid: Oid,
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub rdev: u32,
    /// Nanoseconds since the Unix epoch.
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub crtime: i64,
}

impl Attr {
    /// `st_mode`: type and permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | self.perm
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub oid: Oid,
    pub kind: Kind,
}

/// What a new inode is.
#[derive(Clone, Debug)]
pub struct NewNode {
    pub kind: Kind,
    /// Permission bits (`0o7777`), after the umask.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    /// A symlink's target.
    pub target: Option<Vec<u8>>,
}

/// A change of attributes (`None`: unchanged).
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<i64>,
    pub mtime: Option<i64>,
    pub ctime: Option<i64>,
}

/// `renameat2` flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    /// Fail with `EEXIST` if the new name exists.
    pub noreplace: bool,
    /// Swap the two names (both must exist).
    pub exchange: bool,
}

/// How `setxattr` may treat an existing attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    /// Create or replace.
    Any,
    /// Fail with `EEXIST` if it exists.
    Create,
    /// Fail with `ENODATA` if it does not.
    Replace,
}

/// `statfs` of a mount: the pool's real capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub block_size: u32,
    pub blocks: u64,
    pub blocks_free: u64,
    pub name_max: u32,
}

/// A file's layout, for `shoal fs get-attr`.
#[derive(Clone, Debug)]
pub struct FileLayout {
    /// The array object that holds the file's bytes.
    pub array: Oid,
    pub class: ObjectClass,
    pub chunk_size: u64,
    /// The servers (ranks) that hold the file's shards.
    pub ranks: Vec<u32>,
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

fn ns(v: i64) -> Bytes {
    Bytes::copy_from_slice(&v.to_le_bytes())
}

fn un_ns(v: &Option<Bytes>) -> i64 {
    v.as_deref().and_then(|b| b.try_into().ok()).map_or(0, i64::from_le_bytes)
}

fn encode<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(postcard::to_stdvec(v).expect("namespace records always encode"))
}

fn decode<'a, T: Deserialize<'a>>(b: &'a [u8], what: &str, oid: Oid) -> FsResult<T> {
    postcard::from_bytes(b).map_err(|e| FsError::Store(ShoalError::Io(format!("corrupt {what} of inode {oid}: {e}"))))
}

/// Checks a name of a directory entry.
fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(posix(libc::ENAMETOOLONG, format!("a name is at most {NAME_MAX} bytes")));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(posix(libc::EINVAL, format!("{:?} is not a valid name", String::from_utf8_lossy(name))));
    }
    Ok(())
}

/// A mounted namespace. Cheap to clone.
#[derive(Clone)]
pub struct Fs {
    inner: Arc<FsInner>,
}

struct FsInner {
    cont: Container,
    sb: Object,
    root: Oid,
    orphans: Object,
    /// The class of directories and other small inodes.
    meta_class: ObjectClass,
    mount_id: u128,
    /// Open arrays, so a write does not fetch the chunk size again.
    arrays: Mutex<std::collections::HashMap<Oid, Array>>,
    /// Write gathering, when turned on ([`Fs::gather_writes`]): its limits,
    /// and the writer of each file written since it was last closed.
    gather: std::sync::OnceLock<WriteBack>,
    writers: Mutex<std::collections::HashMap<Oid, Arc<ArrayWriter>>>,
    /// When each file with gathered writes was last written here: its
    /// modification time as this handle shows it until they land.
    written: Mutex<std::collections::HashMap<Oid, i64>>,
    /// The heartbeat task and the lock renewal task.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The heartbeat last seen of each other mount, and since when it has
    /// stood still (this process's clock).
    seen: Mutex<std::collections::HashMap<u128, (Bytes, tokio::time::Instant)>>,
    /// Owners that may hold file locks, per inode (see [`lock`]).
    file_locks: Mutex<std::collections::HashMap<Oid, lock::Owners>>,
    /// The ranges this mount's owners hold, per inode, to take them again
    /// after the keeping server restarts (see [`lock`]).
    held_locks: Mutex<std::collections::HashMap<Oid, lock::HeldLocks>>,
    /// Inodes open through this handle ([`Fs::open_file`]).
    opens: Mutex<std::collections::HashMap<Oid, Open>>,
}

/// An inode open through one handle: how many times, and whether its open
/// mark is on the servers (changed by one task at a time, under the
/// async lock).
struct Open {
    count: u32,
    marked: Arc<tokio::sync::Mutex<bool>>,
}

impl Drop for FsInner {
    fn drop(&mut self) {
        for h in self.tasks.lock().expect("tasks").drain(..) {
            h.abort();
        }
    }
}

/// Locks held by one change; released (in the background) when dropped.
struct Locks(Vec<StripeLock>);

impl Locks {
    /// Runs `work` while renewing every lease (a third of the lease
    /// apart), so a slow change (a failover, a long truncate) never runs
    /// past its locks.
    async fn hold<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        if self.0.is_empty() {
            return work.await;
        }
        let renew = async {
            loop {
                tokio::time::sleep(STRIPE_LOCK_LEASE / 3).await;
                futures::future::join_all(self.0.iter().map(StripeLock::renew)).await;
            }
        };
        tokio::select! {
            r = work => r,
            _ = renew => unreachable!("the renewal loop never ends"),
        }
    }

    /// Releases the locks in the background: the change they guarded is
    /// complete on every shard, and the next taker waits at most for the
    /// release to arrive.
    fn release(self) {
        if self.0.is_empty() {
            return;
        }
        tokio::spawn(futures::future::join_all(self.0.into_iter().map(StripeLock::release)));
    }
}

impl Fs {
    /// Opens the namespace of `cont`, formatting it if the container has
    /// none yet. Cancel safe once formatted.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_client::fs::FsResult<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let cont = client.pool_connect("tank").await?.cont_open("files").await?;
    /// use shoal_client::fs::{Fs, Kind, NewNode};
    ///
    /// let fs = Fs::mount(cont).await?;
    /// let node = NewNode { kind: Kind::File, perm: 0o644, uid: 0, gid: 0, rdev: 0, target: None };
    /// let (file, _) = fs.create(fs.root(), b"hello.txt", &node, true).await?;
    /// fs.write(file.oid, 0, bytes::Bytes::from_static(b"hello")).await?;
    /// assert_eq!(fs.lookup(fs.root(), b"hello.txt").await?.size, 5);
    /// # Ok(()) }
    /// ```
    pub async fn mount(cont: Container) -> FsResult<Fs> {
        let rd_fac = cont.info().props.rd_fac;
        let meta_class: ObjectClass =
            if rd_fac == 0 { "S1".parse()? } else { format!("RP_{}G1", rd_fac + 1).parse()? };
        let sb = cont.open_as(make_oid(SB_SEQ, meta_class, ObjType::Multi), ObjType::Multi)?;
        let root = make_oid(ROOT_SEQ, meta_class, ObjType::Multi);
        let orphans = cont.open_as(make_oid(ORPHANS_SEQ, meta_class, ObjType::Multi), ObjType::Multi)?;
        let fs = Fs {
            inner: Arc::new(FsInner {
                cont,
                sb,
                root,
                orphans,
                meta_class,
                mount_id: rand::random(),
                arrays: Mutex::default(),
                gather: std::sync::OnceLock::new(),
                writers: Mutex::default(),
                written: Mutex::default(),
                tasks: Mutex::default(),
                file_locks: Mutex::default(),
                held_locks: Mutex::default(),
                seen: Mutex::default(),
                opens: Mutex::default(),
            }),
        };
        match fs.inner.sb.fetch_single(SB_DKEY, b"magic", EPOCH_MAX).await? {
            Some(m) if m == MAGIC => {}
            Some(m) => {
                return Err(posix(
                    libc::EINVAL,
                    format!(
                        "the container holds namespace format {:?}, not {:?}",
                        String::from_utf8_lossy(&m),
                        "shoal-posix-1"
                    ),
                ))
            }
            None => fs.format().await?,
        }
        fs.beat().await?;
        let weak = Arc::downgrade(&fs.inner);
        let heartbeat = tokio::spawn(async move {
            let mut beats = 0u64;
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let Some(inner) = weak.upgrade() else { return };
                let fs = Fs { inner };
                let _ = fs.beat().await;
                beats += 1;
                // Watching other mounts' heartbeats (twice per MOUNT_GONE)
                // is how a crashed mount's unlinked files get freed.
                if beats.is_multiple_of(MOUNT_GONE.as_secs() / HEARTBEAT.as_secs() / 2) {
                    if let Err(e) = fs.clean_orphans(false).await {
                        tracing::debug!("orphan sweep: {e}");
                    }
                }
            }
        });
        // Its own task, so a slow heartbeat or sweep never lets locks lapse.
        let weak = Arc::downgrade(&fs.inner);
        let renewal = tokio::spawn(async move {
            loop {
                tokio::time::sleep(FILE_LOCK_LEASE / 3).await;
                let Some(inner) = weak.upgrade() else { return };
                (Fs { inner }).renew_file_locks().await;
            }
        });
        fs.inner.tasks.lock().expect("tasks").extend([heartbeat, renewal]);
        Ok(fs)
    }

    /// Writes the superblock and the root directory (under the superblock's
    /// lock, so two first mounts format once).
    async fn format(&self) -> FsResult<()> {
        let lock = Locks(vec![self.inner.sb.lock(OBJ_DKEY, vec![RENAME_LOCK]).await?]);
        let r: FsResult<_> = lock
            .hold(async {
                if self.inner.sb.fetch_single(SB_DKEY, b"magic", EPOCH_MAX).await?.is_some() {
                    return Ok(());
                }
                let now = now_ns();
                let rec = Record {
                    kind: Kind::Dir,
                    perm: 0o755,
                    uid: 0,
                    gid: 0,
                    nlink: 2,
                    rdev: 0,
                    parent: None,
                    target: None,
                    xattrs: BTreeMap::new(),
                    crtime: now,
                    data: None,
                    class: None,
                    chunk: None,
                };
                let root = self.inner.cont.open_as(self.inner.root, ObjType::Multi)?;
                write_record(&root, OBJ_DKEY, &rec, now).await?;
                self.inner.sb.update_single(SB_DKEY, b"magic", Bytes::from_static(MAGIC)).await?;
                Ok(())
            })
            .await;
        lock.release();
        r
    }

    /// The container's defaults for mounts (what a mount's own options do
    /// not set).
    pub async fn mount_defaults(&self) -> FsResult<MountDefaults> {
        match self.inner.sb.fetch_single(SB_DKEY, MOUNT_DEFAULTS, EPOCH_MAX).await? {
            Some(v) => decode(&v, "mount defaults", self.inner.root),
            None => Ok(MountDefaults::default()),
        }
    }

    /// Sets the container's defaults for mounts made from now on.
    pub async fn set_mount_defaults(&self, d: &MountDefaults) -> FsResult<()> {
        self.inner.sb.update_single(SB_DKEY, MOUNT_DEFAULTS, encode(d)).await?;
        Ok(())
    }

    /// Refreshes this mount's heartbeat.
    async fn beat(&self) -> FsResult<()> {
        let id = self.inner.mount_id.to_le_bytes();
        self.inner.sb.update_single(MOUNTS_DKEY, id, ns(now_ns())).await?;
        Ok(())
    }

    /// Ends this mount: its heartbeat is removed, so what it left in the
    /// orphan list is cleaned by the next mount.
    pub async fn unmount(&self) -> FsResult<()> {
        for h in self.inner.tasks.lock().expect("tasks").drain(..) {
            h.abort();
        }
        self.inner.sb.punch_akey(MOUNTS_DKEY, self.inner.mount_id.to_le_bytes()).await?;
        Ok(())
    }

    /// The root directory.
    pub fn root(&self) -> Oid {
        self.inner.root
    }

    /// The container this namespace lives in.
    pub fn container(&self) -> &Container {
        &self.inner.cont
    }

    /// The object and inode dkey of `oid`.
    fn node(&self, oid: Oid) -> FsResult<(Object, &'static [u8])> {
        match oid_type(oid) {
            Some(ObjType::Multi) => Ok((self.inner.cont.open_as(oid, ObjType::Multi)?, OBJ_DKEY)),
            _ => Err(posix(libc::ESTALE, format!("{oid} is not an inode of this namespace"))),
        }
    }

    /// The object of directory `oid`.
    fn dir(&self, oid: Oid) -> FsResult<Object> {
        match oid_type(oid) {
            Some(ObjType::Multi) => Ok(self.inner.cont.open_as(oid, ObjType::Multi)?),
            _ => Err(posix(libc::ENOTDIR, format!("{oid} is not a directory"))),
        }
    }

    /// The data array of file `oid`, if it has one yet.
    async fn data(&self, oid: Oid) -> FsResult<Option<Array>> {
        if let Some(a) = self.inner.arrays.lock().expect("arrays").get(&oid) {
            return Ok(Some(a.clone()));
        }
        let rec = self.record(oid).await?;
        self.data_of(oid, &rec).await
    }

    async fn data_of(&self, oid: Oid, rec: &Record) -> FsResult<Option<Array>> {
        if rec.kind != Kind::File {
            return Err(posix(if rec.kind == Kind::Dir { libc::EISDIR } else { libc::EINVAL }, "not a regular file"));
        }
        let Some(d) = rec.data else { return Ok(None) };
        let a = Array::open(self.inner.cont.open_as(d, ObjType::Array)?).await?;
        self.remember(oid, a.clone());
        Ok(Some(a))
    }

    /// The data array of file `oid`, made now (under the inode's lock) if
    /// it has none, in the class [`Fs::data_layout`] chooses for a file
    /// reaching `end`.
    async fn data_for_write(&self, oid: Oid, end: u64) -> FsResult<Array> {
        if let Some(a) = self.inner.arrays.lock().expect("arrays").get(&oid) {
            return Ok(a.clone());
        }
        let locks = self.lock(vec![(INODE_LOCK, oid)]).await?;
        let r: FsResult<_> = locks
            .hold(async {
                let (rec, size) = futures::join!(self.record(oid), self.size(oid));
                let mut rec = rec?;
                if let Some(a) = self.data_of(oid, &rec).await? {
                    return Ok(a);
                }
                let (class, chunk) = self.data_layout(&rec, end.max(size?))?;
                let d = self.inner.cont.alloc_oid(ObjType::Array, class).await?;
                let a = Array::create(self.inner.cont.open_as(d, ObjType::Array)?, chunk, None).await?;
                rec.data = Some(d);
                self.node(oid)?.0.update_single(OBJ_DKEY, REC, encode(&rec)).await?;
                self.remember(oid, a.clone());
                Ok(a)
            })
            .await;
        locks.release();
        r
    }

    fn remember(&self, oid: Oid, a: Array) {
        let mut m = self.inner.arrays.lock().expect("arrays");
        if m.len() >= 4096 {
            m.clear();
        }
        m.insert(oid, a);
    }

    /// The size of file `oid` as this handle sees it: the servers' size,
    /// or the end of its own buffered writes if that is further.
    async fn size(&self, oid: Oid) -> FsResult<u64> {
        // Before the inode (see `getattr`).
        let pending = self.pending_end(oid);
        let v = self.node(oid)?.0.fetch_single(OBJ_DKEY, SIZE, EPOCH_MAX).await?;
        Ok(size_value(v.as_deref()).max(pending))
    }

    /// The end of the bytes buffered (or in flight) for file `oid` on this
    /// handle: the servers' size is raised past them only as they land.
    fn pending_end(&self, oid: Oid) -> u64 {
        self.writer_of(oid).map_or(0, |w| w.pending_end())
    }

    async fn entry(&self, dir: &Object, name: &[u8]) -> FsResult<Option<Entry>> {
        match dir.fetch_single(name, ENTRY, EPOCH_MAX).await? {
            Some(v) => Ok(Some(decode(&v, "directory entry", dir.oid())?)),
            None => Ok(None),
        }
    }

    async fn record(&self, oid: Oid) -> FsResult<Record> {
        let (obj, dkey) = self.node(oid)?;
        match obj.fetch_single(dkey, REC, EPOCH_MAX).await? {
            Some(v) => decode(&v, "inode record", oid),
            None => Err(posix(libc::ENOENT, format!("inode {oid} does not exist (removed?)"))),
        }
    }

    /// Takes locks in the global order: by number, then by OID.
    ///
    /// Taking several can wait for each: if that took so long that the
    /// first leases may have lapsed, or a lock stayed busy, all are let go
    /// and taken again.
    async fn lock(&self, mut keys: Vec<(u64, Oid)>) -> FsResult<Locks> {
        keys.sort();
        keys.dedup();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = tokio::time::Instant::now();
            let mut held = Locks(Vec::with_capacity(keys.len()));
            let mut busy = None;
            for &(n, oid) in &keys {
                let (obj, dkey) = if n == RENAME_LOCK { (self.inner.sb.clone(), OBJ_DKEY) } else { self.node(oid)? };
                match obj.lock(dkey, vec![n]).await {
                    Ok(l) => held.0.push(l),
                    Err(e) if e.kind() == ErrorKind::Busy && attempt < 4 => {
                        busy = Some(e);
                        break;
                    }
                    Err(e) => {
                        held.release();
                        return Err(e.into());
                    }
                }
            }
            if busy.is_none() && (held.0.len() <= 1 || started.elapsed() < STRIPE_LOCK_LEASE / 2) {
                return Ok(held);
            }
            held.release();
            if attempt >= 4 {
                return Err(posix(libc::EIO, "the namespace stayed locked by others; try again"));
            }
            tokio::time::sleep(Duration::from_millis(rand::random_range(10..200))).await;
        }
    }

    /// Looks `name` up in directory `dir`.
    pub async fn lookup(&self, dir: Oid, name: &[u8]) -> FsResult<Attr> {
        check_name(name).map_err(|e| if e.errno() == libc::EINVAL { posix(libc::ENOENT, e.to_string()) } else { e })?;
        let d = self.dir(dir)?;
        match self.entry(&d, name).await? {
            Some(e) => self.getattr(e.oid).await,
            // A name is looked up in a directory (`resolve` checks); in
            // anything else nothing is found.
            None => Err(posix(libc::ENOENT, format!("no entry {:?}", String::from_utf8_lossy(name)))),
        }
    }

    /// Resolves `path` (absolute within the namespace; symlinks are not
    /// followed).
    pub async fn resolve(&self, path: &str) -> FsResult<Attr> {
        let mut a = self.getattr(self.root()).await?;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if a.kind != Kind::Dir {
                return Err(posix(libc::ENOTDIR, format!("{path}: a component is not a directory")));
            }
            a = self.lookup(a.oid, part.as_bytes()).await?;
        }
        Ok(a)
    }

    /// The attributes of inode `oid`: one request.
    pub async fn getattr(&self, oid: Oid) -> FsResult<Attr> {
        let (obj, dkey) = self.node(oid)?;
        // Before the inode: a write that lands in between has raised the
        // size and stamped the time there by the time it stops pending.
        let pending = self.pending_end(oid);
        let written = self.inner.written.lock().expect("written").get(&oid).copied().filter(|_| pending > 0);
        let v = obj.fetch_many(dkey, &[REC, ATIME, MTIME, CTIME, SIZE]).await?;
        let rec: Record = match &v[0] {
            Some(b) => decode(b, "inode record", oid)?,
            None => return Err(posix(libc::ENOENT, format!("inode {oid} does not exist (removed?)"))),
        };
        let (mut mtime, mut ctime) = (un_ns(&v[2]), un_ns(&v[3]));
        let size = match rec.kind {
            Kind::File => {
                // Writes still buffered or in flight: their time, until
                // they land and stamp the inode.
                if let Some(t) = written {
                    (mtime, ctime) = (mtime.max(t), ctime.max(t));
                }
                size_value(v.get(4).and_then(|b| b.as_deref())).max(pending)
            }
            Kind::Dir => 4096,
            Kind::Symlink => rec.target.as_ref().map_or(0, |t| t.len() as u64),
            _ => 0,
        };
        Ok(rec.attr(oid, size, [un_ns(&v[1]), mtime, ctime]))
    }

    /// Changes attributes; returns the new ones. A size change truncates
    /// or extends a regular file.
    pub async fn setattr(&self, oid: Oid, set: &SetAttr) -> FsResult<Attr> {
        let (obj, dkey) = self.node(oid)?;
        if set.atime.is_some() || set.mtime.is_some() {
            // Buffered writes land (and stamp their time) before the times
            // set here, which must stand (`touch -d`, `cp -p`, `tar x`).
            self.flush_file(oid).await?;
        }
        let now = now_ns();
        if let Some(size) = set.size {
            // Buffered writes land before the size changes under them.
            self.flush_file(oid).await?;
            let locks = self.lock(vec![(INODE_LOCK, oid)]).await?;
            let r: FsResult<_> = locks
                .hold(async {
                    let (rec, old) = futures::join!(self.record(oid), self.size(oid));
                    let (rec, old) = (rec?, old?);
                    if let Some(a) = self.data_of(oid, &rec).await? {
                        self.zero_past_end(&obj, &a, old, size).await?;
                        a.set_size(size).await?;
                    }
                    obj.update_single(dkey, SIZE, Bytes::copy_from_slice(&size.to_le_bytes())).await?;
                    Ok(())
                })
                .await;
            locks.release();
            r?;
        }
        if set.perm.is_some() || set.uid.is_some() || set.gid.is_some() {
            let locks = self.lock(vec![(INODE_LOCK, oid)]).await?;
            let r: FsResult<_> = locks
                .hold(async {
                    let mut rec = self.record(oid).await?;
                    if let Some(p) = set.perm {
                        rec.perm = p & 0o7777;
                    }
                    if let Some(u) = set.uid {
                        rec.uid = u;
                    }
                    if let Some(g) = set.gid {
                        rec.gid = g;
                    }
                    obj.update_single(dkey, REC, encode(&rec)).await?;
                    Ok::<_, FsError>(())
                })
                .await;
            locks.release();
            r?;
        }
        let mut times: Vec<(&[u8], Bytes)> = Vec::new();
        if let Some(t) = set.atime {
            times.push((ATIME, ns(t)));
        }
        if let Some(t) = set.mtime.or(set.size.map(|_| now)) {
            times.push((MTIME, ns(t)));
        }
        times.push((CTIME, ns(set.ctime.unwrap_or(now))));
        obj.update_many(dkey, &times).await?;
        self.getattr(oid).await
    }

    /// Creates `name` in `dir`. With `excl` an existing name fails with
    /// `EEXIST`; without it, an existing regular file is returned as it is
    /// (`false`: not created here), as `open(O_CREAT)` wants.
    pub async fn create(&self, dir: Oid, name: &[u8], node: &NewNode, excl: bool) -> FsResult<(Attr, bool)> {
        check_name(name)?;
        if let Some(t) = &node.target {
            if t.len() > PATH_MAX || t.is_empty() {
                return Err(posix(libc::ENAMETOOLONG, format!("a symlink target is 1..={PATH_MAX} bytes")));
            }
        }
        let d = self.dir(dir)?;
        // The new inode is written while the directory's lock is taken:
        // nothing names it yet, so only the entry needs the lock.
        let now = now_ns();
        let prepare = async {
            let parent = self.record(dir).await?;
            if parent.kind != Kind::Dir {
                return Err(posix(libc::ENOTDIR, "not a directory"));
            }
            let rec = new_record(&parent, dir, node, now)?;
            let oid = self.inner.cont.alloc_oid(ObjType::Multi, Some(self.inner.meta_class)).await?;
            let obj = self.inner.cont.open_as(oid, ObjType::Multi)?;
            write_record(&obj, OBJ_DKEY, &rec, now).await?;
            Ok((obj, rec))
        };
        let mut prepare = std::pin::pin!(prepare);
        // A new directory raises its parent's link count: the parent's
        // record is locked too.
        let mut keys = vec![(ENTRIES_LOCK, dir)];
        if node.kind == Kind::Dir {
            keys.push((INODE_LOCK, dir));
        }
        let mut lock = std::pin::pin!(self.lock(keys));
        // Once the lock is held, the rest of the preparation runs inside
        // `hold`, which renews the lock's lease.
        let (locks, early) = tokio::select! {
            l = &mut lock => (l, None),
            p = &mut prepare => (lock.await, Some(p)),
        };
        // An inode no name will point at is removed (in the background).
        let discard = |obj: Object| {
            tokio::spawn(async move { obj.punch().await });
        };
        let locks = match locks {
            Ok(l) => l,
            Err(e) => {
                let p = match early {
                    Some(p) => p,
                    None => prepare.await,
                };
                if let Ok((obj, _)) = p {
                    discard(obj);
                }
                return Err(e);
            }
        };
        let mut made = None;
        let mut linking = false;
        let r: FsResult<_> = locks
            .hold(async {
                let (obj, rec) = match early {
                    Some(p) => p?,
                    None => (&mut prepare).await?,
                };
                made = Some(obj.clone());
                let (existing, parent) = futures::join!(self.entry(&d, name), self.record(dir));
                let parent = parent?;
                if parent.kind != Kind::Dir {
                    return Err(posix(libc::ENOTDIR, "not a directory"));
                }
                if parent.nlink == 0 {
                    return Err(posix(libc::ENOENT, "the directory was removed"));
                }
                if let Some(e) = existing? {
                    if excl || node.kind != Kind::File || e.kind != Kind::File {
                        return Err(posix(libc::EEXIST, format!("{:?} exists", String::from_utf8_lossy(name))));
                    }
                    return Ok(Ok(e.oid));
                }
                let oid = obj.oid();
                let entry = encode(&Entry { oid, kind: node.kind });
                if node.kind == Kind::Dir {
                    // Counted before it is named: a crash between leaves the
                    // count one high, never low.
                    self.count_subdirs(dir, parent, 1).await?;
                }
                // From here the entry may exist even if the update fails.
                linking = true;
                let (a, b) = futures::join!(d.update_single(name, ENTRY, entry), touch_dir(&d, now_ns()));
                a?;
                b?;
                let size = rec.target.as_ref().map_or(if rec.kind == Kind::Dir { 4096 } else { 0 }, |t| t.len() as u64);
                Ok(Err(rec.attr(oid, size, [now; 3])))
            })
            .await;
        locks.release();
        if let Some(obj) = made.filter(|_| !linking) {
            discard(obj);
        }
        match r? {
            Ok(existing) => Ok((self.getattr(existing).await?, false)),
            Err(created) => Ok((created, true)),
        }
    }
    /// The class and chunk size of a file's data, chosen at its first
    /// write (or size change) that reaches `end`: what its directory asked
    /// for; else the container's class; else, for a file that starts at
    /// least [`LARGE_FILE`] long, the automatic array class (erasure-coded
    /// where the pool has the servers), and for a smaller one replication,
    /// which a small write costs least in.
    fn data_layout(&self, rec: &Record, end: u64) -> FsResult<(Option<ObjectClass>, u64)> {
        let props = &self.inner.cont.info().props;
        let chunk = rec.chunk.unwrap_or(props.chunk_size);
        if let Some(c) = &rec.class {
            return Ok((Some(parse_class(c.as_bytes())?), chunk));
        }
        if props.oclass.is_some() || end >= LARGE_FILE {
            return Ok((None, chunk));
        }
        let small = if props.rd_fac == 0 { "S1".to_string() } else { format!("RP_{}GX", props.rd_fac + 1) };
        Ok((Some(small.parse()?), chunk))
    }

    /// Reads a symlink's target.
    pub async fn readlink(&self, oid: Oid) -> FsResult<Vec<u8>> {
        let rec = self.record(oid).await?;
        rec.target.filter(|_| rec.kind == Kind::Symlink).ok_or_else(|| posix(libc::EINVAL, "not a symlink"))
    }

    /// Adds the name `name` in `dir` for inode `oid` (a hard link).
    pub async fn link(&self, oid: Oid, dir: Oid, name: &[u8]) -> FsResult<Attr> {
        check_name(name)?;
        let d = self.dir(dir)?;
        let (obj, dkey) = self.node(oid)?;
        let locks = self.lock(vec![(ENTRIES_LOCK, dir), (INODE_LOCK, oid)]).await?;
        let r: FsResult<_> = locks
            .hold(async {
                let (existing, rec, parent) = futures::join!(self.entry(&d, name), self.record(oid), self.record(dir));
                let (mut rec, parent) = (rec?, parent?);
                if rec.kind == Kind::Dir {
                    return Err(posix(libc::EPERM, "directories cannot have hard links"));
                }
                if parent.nlink == 0 {
                    return Err(posix(libc::ENOENT, "the directory was removed"));
                }
                if existing?.is_some() {
                    return Err(posix(libc::EEXIST, format!("{:?} exists", String::from_utf8_lossy(name))));
                }
                if rec.nlink == 0 {
                    return Err(posix(libc::ENOENT, "the file was removed"));
                }
                let now = now_ns();
                rec.nlink += 1;
                obj.update_many(dkey, &[(REC, encode(&rec)), (CTIME, ns(now))]).await?;
                let entry = encode(&Entry { oid, kind: rec.kind });
                let (a, b) = futures::join!(d.update_single(name, ENTRY, entry), touch_dir(&d, now));
                a?;
                b
            })
            .await;
        locks.release();
        r?;
        self.getattr(oid).await
    }

    /// Removes the name `name` of a non-directory from `dir`. Returns the
    /// inode if that was its last name: it is then in the orphan list, and
    /// the caller frees it with [`Fs::reclaim`] once nobody has it open.
    pub async fn unlink(&self, dir: Oid, name: &[u8]) -> FsResult<Option<Oid>> {
        check_name(name)?;
        let d = self.dir(dir)?;
        loop {
            let Some(e) = self.entry(&d, name).await? else {
                return Err(posix(libc::ENOENT, format!("no entry {:?}", String::from_utf8_lossy(name))));
            };
            if e.kind == Kind::Dir {
                return Err(posix(libc::EISDIR, format!("{:?} is a directory", String::from_utf8_lossy(name))));
            }
            let locks = self.lock(vec![(ENTRIES_LOCK, dir), (INODE_LOCK, e.oid)]).await?;
            let r: FsResult<_> = locks
                .hold(async {
                    let (again, rec) = futures::join!(self.entry(&d, name), self.record(e.oid));
                    if again? != Some(e) {
                        return Ok(None); // changed meanwhile: look again
                    }
                    let now = now_ns();
                    let mut rec = rec?;
                    rec.nlink = rec.nlink.saturating_sub(1);
                    let last = rec.nlink == 0;
                    // The name first, then the orphan entry, then the count: a
                    // crash or a failure between leaves a count too high (space
                    // leaked), never a count below the names (data lost).
                    let (a, b) = futures::join!(d.punch_dkey(name), touch_dir(&d, now));
                    a?;
                    b?;
                    if last {
                        self.add_orphan(e.oid).await?;
                    }
                    let (obj, dkey) = self.node(e.oid)?;
                    obj.update_many(dkey, &[(REC, encode(&rec)), (CTIME, ns(now))]).await?;
                    Ok(Some(last))
                })
                .await;
            locks.release();
            match r? {
                Some(last) => return Ok(last.then_some(e.oid)),
                None => continue,
            }
        }
    }

    /// Removes the empty directory `name` from `dir` (`ENOTEMPTY` if it
    /// has entries). Returns its inode, now in the orphan list.
    pub async fn rmdir(&self, dir: Oid, name: &[u8]) -> FsResult<Oid> {
        check_name(name)?;
        let d = self.dir(dir)?;
        loop {
            let Some(e) = self.entry(&d, name).await? else {
                return Err(posix(libc::ENOENT, format!("no entry {:?}", String::from_utf8_lossy(name))));
            };
            if e.kind != Kind::Dir {
                return Err(posix(libc::ENOTDIR, format!("{:?} is not a directory", String::from_utf8_lossy(name))));
            }
            let locks = self
                .lock(vec![(ENTRIES_LOCK, dir), (ENTRIES_LOCK, e.oid), (INODE_LOCK, e.oid), (INODE_LOCK, dir)])
                .await?;
            let r: FsResult<_> = locks
                .hold(async {
                    if self.entry(&d, name).await? != Some(e) {
                        return Ok(false);
                    }
                    let child = self.dir(e.oid)?;
                    if !self.is_empty(&child).await? {
                        return Err(posix(
                            libc::ENOTEMPTY,
                            format!("{:?} is not empty", String::from_utf8_lossy(name)),
                        ));
                    }
                    let now = now_ns();
                    let mut rec = self.record(e.oid).await?;
                    rec.nlink = 0;
                    // The name first (see `unlink`).
                    d.punch_dkey(name).await?;
                    touch_dir(&d, now).await?;
                    self.add_orphan(e.oid).await?;
                    child.update_many(OBJ_DKEY, &[(REC, encode(&rec)), (CTIME, ns(now))]).await?;
                    self.count_subdirs(dir, self.record(dir).await?, -1).await?;
                    Ok(true)
                })
                .await;
            locks.release();
            if r? {
                return Ok(e.oid);
            }
        }
    }

    async fn is_empty(&self, dir: &Object) -> FsResult<bool> {
        Ok(dir.list_dkeys().await?.iter().all(|k| k == OBJ_DKEY))
    }

    /// Renames `dir/name` to `newdir/newname`, replacing what the new name
    /// named (atomically for readers) unless `flags` says otherwise.
    /// Returns an inode whose last name the replacement removed (see
    /// [`Fs::unlink`]).
    pub async fn rename(
        &self,
        dir: Oid,
        name: &[u8],
        newdir: Oid,
        newname: &[u8],
        flags: RenameFlags,
    ) -> FsResult<Option<Oid>> {
        check_name(name)?;
        check_name(newname)?;
        if flags.noreplace && flags.exchange {
            return Err(posix(libc::EINVAL, "RENAME_NOREPLACE and RENAME_EXCHANGE exclude each other"));
        }
        let (d, nd) = (self.dir(dir)?, self.dir(newdir)?);
        let quote = |n: &[u8]| format!("{:?}", String::from_utf8_lossy(n));
        loop {
            let (src, dst) = futures::join!(self.entry(&d, name), self.entry(&nd, newname));
            let Some(src) = src? else { return Err(posix(libc::ENOENT, format!("no entry {}", quote(name)))) };
            let dst = dst?;
            if dir == newdir && name == newname {
                return Ok(None);
            }
            if let Some(t) = dst {
                if t.oid == src.oid {
                    // Two names of one inode: POSIX says do nothing.
                    return Ok(None);
                }
                if flags.noreplace {
                    return Err(posix(libc::EEXIST, format!("{} exists", quote(newname))));
                }
                if !flags.exchange {
                    if src.kind == Kind::Dir && t.kind != Kind::Dir {
                        return Err(posix(libc::ENOTDIR, format!("{} is not a directory", quote(newname))));
                    }
                    if src.kind != Kind::Dir && t.kind == Kind::Dir {
                        return Err(posix(libc::EISDIR, format!("{} is a directory", quote(newname))));
                    }
                }
            } else if flags.exchange {
                return Err(posix(libc::ENOENT, format!("no entry {}", quote(newname))));
            }
            // Directories that change parent: their records, and the check
            // that none moves below itself.
            let mut moved: Vec<Oid> = Vec::new();
            if dir != newdir {
                if src.kind == Kind::Dir {
                    moved.push(src.oid);
                }
                if let Some(t) = dst.filter(|t| flags.exchange && t.kind == Kind::Dir) {
                    moved.push(t.oid);
                }
            }
            let mut keys = vec![(ENTRIES_LOCK, dir), (ENTRIES_LOCK, newdir)];
            if !moved.is_empty() {
                keys.push((RENAME_LOCK, self.inner.root));
            }
            keys.extend(moved.iter().map(|o| (INODE_LOCK, *o)));
            if let Some(t) = dst.filter(|_| !flags.exchange) {
                keys.push((INODE_LOCK, t.oid));
                if t.kind == Kind::Dir {
                    keys.push((ENTRIES_LOCK, t.oid));
                }
            }
            // Subdirectories gained (+) and lost (-) by each directory: link
            // counts are raised before the names change and lowered after.
            let is_dir = |k: Kind| i64::from(k == Kind::Dir);
            let (mut d_delta, mut nd_delta) = (-is_dir(src.kind), is_dir(src.kind));
            match dst {
                Some(t) if flags.exchange => {
                    d_delta += is_dir(t.kind);
                    nd_delta -= is_dir(t.kind);
                }
                Some(t) => nd_delta -= is_dir(t.kind),
                None => {}
            }
            if dir == newdir {
                (d_delta, nd_delta) = (d_delta + nd_delta, 0);
            }
            if d_delta != 0 {
                keys.push((INODE_LOCK, dir));
            }
            if nd_delta != 0 {
                keys.push((INODE_LOCK, newdir));
            }
            // A file counts its second name while it has two (see below).
            let bump = src.kind != Kind::Dir && !flags.exchange;
            if bump {
                keys.push((INODE_LOCK, src.oid));
            }
            let locks = self.lock(keys).await?;
            let r: FsResult<_> = locks
                .hold(async {
                    let (s2, t2) = futures::join!(self.entry(&d, name), self.entry(&nd, newname));
                    if s2? != Some(src) || t2? != dst {
                        return Ok(None);
                    }
                    // Neither directory was removed meanwhile (a name written
                    // into a removed directory would be lost with it).
                    let (r1, r2) = futures::join!(self.record(dir), self.record(newdir));
                    let (r1, r2) = (r1?, r2?);
                    if r1.nlink == 0 || r2.nlink == 0 {
                        return Err(posix(libc::ENOENT, "the directory was removed"));
                    }
                    for m in &moved {
                        let to = if *m == src.oid { newdir } else { dir };
                        if self.is_below(to, *m).await? {
                            return Err(posix(libc::EINVAL, "cannot move a directory into itself or below it"));
                        }
                    }
                    if let Some(t) = dst.filter(|t| !flags.exchange && t.kind == Kind::Dir) {
                        if !self.is_empty(&self.dir(t.oid)?).await? {
                            return Err(posix(libc::ENOTEMPTY, format!("{} is not empty", quote(newname))));
                        }
                    }
                    let now = now_ns();
                    let mut orphan = None;
                    for (o, rec, delta) in [(dir, &r1, d_delta), (newdir, &r2, nd_delta)] {
                        if delta > 0 {
                            self.count_subdirs(o, rec.clone(), delta).await?;
                        }
                    }
                    match dst {
                        Some(t) if flags.exchange => {
                            nd.update_single(newname, ENTRY, encode(&src)).await?;
                            d.update_single(name, ENTRY, encode(&t)).await?;
                            for o in [src.oid, t.oid] {
                                let (obj, dkey) = self.node(o)?;
                                obj.update_single(dkey, CTIME, ns(now)).await?;
                            }
                        }
                        Some(t) => {
                            self.move_name(bump, src, &d, name, &nd, newname, now).await?;
                            let mut rec = self.record(t.oid).await?;
                            rec.nlink = if t.kind == Kind::Dir { 0 } else { rec.nlink.saturating_sub(1) };
                            if rec.nlink == 0 {
                                self.add_orphan(t.oid).await?;
                                orphan = Some(t.oid);
                            }
                            let (obj, dkey) = self.node(t.oid)?;
                            obj.update_many(dkey, &[(REC, encode(&rec)), (CTIME, ns(now))]).await?;
                        }
                        None => self.move_name(bump, src, &d, name, &nd, newname, now).await?,
                    }
                    for m in &moved {
                        let mut rec = self.record(*m).await?;
                        rec.parent = Some(if *m == src.oid { newdir } else { dir });
                        self.dir(*m)?.update_many(OBJ_DKEY, &[(REC, encode(&rec)), (CTIME, ns(now))]).await?;
                    }
                    touch_dir(&d, now).await?;
                    if dir != newdir {
                        touch_dir(&nd, now).await?;
                    }
                    for (o, delta) in [(dir, d_delta), (newdir, nd_delta)] {
                        if delta < 0 {
                            self.count_subdirs(o, self.record(o).await?, delta).await?;
                        }
                    }
                    Ok(Some(orphan))
                })
                .await;
            locks.release();
            if let Some(orphan) = r? {
                return Ok(orphan);
            }
        }
    }

    /// Moves the name `d/name` of `src` to `nd/newname` (replacing what
    /// that named). The new name is written before the old one goes, and
    /// a file (`bump`) counts both while it has two: a crash in between
    /// leaves an extra name and a count that matches, never a name lost or
    /// a count below its names. The caller holds the entry locks and, for
    /// `bump`, `src`'s inode lock.
    #[allow(clippy::too_many_arguments)]
    async fn move_name(
        &self,
        bump: bool,
        src: Entry,
        d: &Object,
        name: &[u8],
        nd: &Object,
        newname: &[u8],
        now: i64,
    ) -> FsResult<()> {
        let (obj, dkey) = self.node(src.oid)?;
        let mut rec = None;
        if bump {
            let mut r = self.record(src.oid).await?;
            r.nlink += 1;
            obj.update_single(dkey, REC, encode(&r)).await?;
            rec = Some(r);
        }
        nd.update_single(newname, ENTRY, encode(&src)).await?;
        d.punch_dkey(name).await?;
        match rec {
            Some(mut r) => {
                r.nlink -= 1;
                obj.update_many(dkey, &[(REC, encode(&r)), (CTIME, ns(now))]).await?;
            }
            None => {
                obj.update_single(dkey, CTIME, ns(now)).await?;
            }
        }
        Ok(())
    }

    /// Whether directory `dir` is `ancestor` or below it (walks the
    /// parents up to the root).
    async fn is_below(&self, mut dir: Oid, ancestor: Oid) -> FsResult<bool> {
        for _ in 0..4096 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == self.inner.root {
                return Ok(false);
            }
            match self.record(dir).await?.parent {
                Some(p) => dir = p,
                None => return Ok(false),
            }
        }
        Err(posix(libc::ELOOP, "directory parents form a loop; run `shoal fs check`"))
    }

    /// The entries of directory `dir` (without `.` and `..`).
    pub async fn readdir(&self, dir: Oid) -> FsResult<Vec<DirEntry>> {
        let d = self.dir(dir)?;
        let names: Vec<Vec<u8>> = d.list_dkeys().await?.into_iter().filter(|k| k != OBJ_DKEY).collect();
        let d = &d;
        stream::iter(names)
            .map(|name| async move {
                let e = self.entry(d, &name).await?;
                Ok::<_, FsError>(e.map(|e| DirEntry { name, oid: e.oid, kind: e.kind }))
            })
            .buffered(LIST_PARALLEL)
            .try_filter_map(|e| async move { Ok(e) })
            .try_collect()
            .await
    }

    /// Turns on write gathering for this handle (the FUSE mount does):
    /// file writes go through an [`ArrayWriter`] per file, which sends
    /// whole stripes as they fill, so unaligned and small writes pay no
    /// read-modify-write. Buffered bytes are durable once
    /// [`Fs::flush_file`] (close, fsync) returns; a size change or
    /// fallocate flushes first; reads through this handle see them at
    /// once, other clients after the flush (close-to-open consistency).
    pub fn gather_writes(&self, cfg: WriteBack) {
        let _ = self.inner.gather.set(cfg);
    }

    /// Bytes buffered by write gathering and not yet sent, over all files.
    pub fn dirty_bytes(&self) -> u64 {
        self.inner.writers.lock().expect("writers").values().map(|w| w.dirty_bytes()).sum()
    }

    fn writer_of(&self, oid: Oid) -> Option<Arc<ArrayWriter>> {
        self.inner.writers.lock().expect("writers").get(&oid).cloned()
    }

    /// Makes the buffered writes of file `oid` durable (with write
    /// gathering on; otherwise every write is durable already). A failed
    /// background write is reported here, as `close` and `fsync` report a
    /// writeback error.
    pub async fn flush_file(&self, oid: Oid) -> FsResult<()> {
        match self.writer_of(oid) {
            Some(w) => Ok(w.flush().await?),
            None => Ok(()),
        }
    }

    /// The last handle of file `oid` closed: flushes its buffered writes
    /// and, if nothing else uses its writer, lets it go.
    pub async fn close_file(&self, oid: Oid) -> FsResult<()> {
        let Some(w) = self.writer_of(oid) else { return Ok(()) };
        let r = w.flush().await;
        if r.is_err() {
            // Reported (by this close, or the FUSE flush before it): the
            // bytes are dropped, as a local file system drops pages whose
            // writeback failed, rather than retried forever.
            w.discard().await;
        }
        let mut writers = self.inner.writers.lock().expect("writers");
        // Ours and the table's: no write in progress holds it.
        if Arc::strong_count(&w) == 2 && w.is_idle() {
            writers.remove(&oid);
            self.inner.written.lock().expect("written").remove(&oid);
        }
        Ok(r?)
    }

    /// Reads up to `len` bytes of file `oid` at `offset` (short at the end
    /// of the file).
    pub async fn read(&self, oid: Oid, offset: u64, len: u64) -> FsResult<Bytes> {
        if let Some(w) = self.writer_of(oid) {
            let size = self.size(oid).await?;
            if offset >= size {
                return Ok(Bytes::new());
            }
            return Ok(w.read_at(offset, len.min(size - offset)).await?);
        }
        let Some(a) = self.data(oid).await? else {
            // No data written yet: the size alone (from truncate or
            // fallocate) reads as zeros.
            let size = self.size(oid).await?;
            return Ok(Bytes::from(vec![0u8; len.min(size.saturating_sub(offset)) as usize]));
        };
        if len > 16 << 20 {
            let size = self.size(oid).await?;
            return Ok(if offset >= size { Bytes::new() } else { a.read_at(offset, len.min(size - offset)).await? });
        }
        // The size and the bytes at once; the bytes past the end are cut.
        let (size, data) = futures::join!(self.size(oid), a.read_at(offset, len));
        let (size, mut data) = (size?, data?);
        if offset >= size {
            return Ok(Bytes::new());
        }
        data.truncate(len.min(size - offset) as usize);
        Ok(data)
    }

    /// Reads `len` bytes of file `oid` at `offset` for a caller that knows
    /// the size (the kernel, through FUSE, clamps reads to the size it was
    /// given): no size request, so one round trip. Bytes past the end read
    /// as zeros.
    pub async fn read_known_size(&self, oid: Oid, offset: u64, len: u64) -> FsResult<Bytes> {
        if let Some(w) = self.writer_of(oid) {
            return Ok(w.read_at(offset, len).await?);
        }
        match self.data(oid).await? {
            Some(a) => Ok(a.read_at(offset, len).await?),
            None => Ok(Bytes::from(vec![0u8; len as usize])),
        }
    }

    /// Writes `data` at `offset` of file `oid` and stamps its mtime and
    /// ctime. Durable when it returns, unless write gathering is on
    /// ([`Fs::gather_writes`]): then durable by the next [`Fs::flush_file`].
    pub async fn write(&self, oid: Oid, offset: u64, data: Bytes) -> FsResult<u64> {
        self.write_as(oid, offset, data, self.inner.gather.get().copied()).await
    }

    async fn write_as(&self, oid: Oid, offset: u64, data: Bytes, gather: Option<WriteBack>) -> FsResult<u64> {
        let n = data.len() as u64;
        let end = offset.checked_add(n).ok_or_else(|| posix(libc::EFBIG, "a write past 2^64"))?;
        let a = self.data_for_write(oid, end).await?;
        let now = now_ns();
        let inode = self.node(oid)?.0;
        // The size only after the bytes: a failed write does not grow the
        // file, and no other client sees a size that covers bytes not yet
        // on the servers. Gathered, the bytes are buffered here and the
        // background writes raise the size and stamp the times as they
        // land (by the next flush at the latest).
        match gather {
            Some(cfg) => {
                let w = self.inner.writers.lock().expect("writers").get(&oid).cloned();
                let w = match w {
                    Some(w) => w,
                    None => {
                        let hook = size_raiser(inode.clone(), a.clone());
                        let w = Arc::new(a.writer_with_hook(cfg, Some(hook)));
                        self.inner.writers.lock().expect("writers").entry(oid).or_insert(w).clone()
                    }
                };
                self.inner.written.lock().expect("written").insert(oid, now);
                w.write(offset, data).await?;
                self.limit_dirty(&w).await;
            }
            None => {
                a.write(offset, data).await?;
                inode.update_values(OBJ_DKEY, &written_values(end, now)).await?;
            }
        }
        Ok(n)
    }

    /// Keeps the bytes buffered by all of this handle's writers under
    /// [`DIRTY_FILES_MAX`] times one file's limit: past it, the writer just
    /// written to sends what it holds and waits until it is durable.
    async fn limit_dirty(&self, w: &ArrayWriter) {
        let max = self.inner.gather.get().map_or(0, |c| c.max_dirty.saturating_mul(DIRTY_FILES_MAX));
        if self.dirty_bytes() > max {
            // This write's bytes are taken already: a failure is kept by
            // the writer and reported by its next write, fsync or close.
            let _ = w.flush().await;
        }
    }

    /// Appends `data` to file `oid` at its size, under the file's append
    /// lock, so appends from many mounts never overwrite each other.
    /// Returns the offset written at.
    pub async fn append(&self, oid: Oid, data: Bytes) -> FsResult<u64> {
        let locks = self.lock(vec![(APPEND_LOCK, oid)]).await?;
        let r: FsResult<_> = locks
            .hold(async {
                // Not gathered: the next append, from any client, must find
                // the size past these bytes; and what this handle buffered
                // lands first, so the size never covers bytes only here.
                self.flush_file(oid).await?;
                let at = self.size(oid).await?;
                self.write_as(oid, at, data, None).await?;
                Ok::<_, FsError>(at)
            })
            .await;
        locks.release();
        r
    }

    /// `fallocate`: mode 0 extends the size (space is not reserved: the
    /// pool allocates as data arrives), `FALLOC_FL_KEEP_SIZE` alone does
    /// nothing, `FALLOC_FL_PUNCH_HOLE` and `FALLOC_FL_ZERO_RANGE` zero the
    /// range (freeing whole chunks). Others: `EOPNOTSUPP`.
    pub async fn fallocate(&self, oid: Oid, mode: i32, offset: u64, len: u64) -> FsResult<()> {
        let (inode, _) = self.node(oid)?;
        let end = offset.checked_add(len).ok_or_else(|| posix(libc::EFBIG, "range past 2^64"))?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let zero = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !(libc::FALLOC_FL_KEEP_SIZE | zero) != 0 {
            return Err(posix(libc::EOPNOTSUPP, format!("fallocate mode {mode:#x} is not supported")));
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 && !keep {
            return Err(posix(libc::EINVAL, "FALLOC_FL_PUNCH_HOLE needs FALLOC_FL_KEEP_SIZE"));
        }
        // Buffered writes land before the range is zeroed.
        self.flush_file(oid).await?;
        if mode & zero != 0 {
            let size = self.size(oid).await?;
            let stop = if keep { end.min(size) } else { end };
            if let Some(a) = self.data(oid).await?.filter(|_| stop > offset) {
                a.punch(offset, stop - offset).await?;
            }
        } else if self.record(oid).await?.kind != Kind::File {
            return Err(posix(libc::ENODEV, "fallocate works on regular files"));
        } else if !keep {
            if let Some(a) = self.data(oid).await? {
                self.zero_past_end(&inode, &a, self.size(oid).await?, end).await?;
            }
        }
        let now = ns(now_ns());
        let mut stamp = vec![(MTIME, ValueKind::Single, now.clone()), (CTIME, ValueKind::Single, now)];
        if !keep {
            stamp.push((SIZE, ValueKind::MaxU64, Bytes::copy_from_slice(&end.to_le_bytes())));
        }
        inode.update_values(OBJ_DKEY, &stamp).await?;
        Ok(())
    }

    /// Makes what was written to file `oid` durable: flushes its gathered
    /// writes (without gathering every write is durable when it returns
    /// already) and checks that the file exists.
    pub async fn fsync(&self, oid: Oid) -> FsResult<()> {
        self.flush_file(oid).await?;
        self.getattr(oid).await.map(|_| ())
    }

    /// Reads the extended attribute `name` of inode `oid` (`ENODATA` if it
    /// has none).
    pub async fn getxattr(&self, oid: Oid, name: &[u8]) -> FsResult<Vec<u8>> {
        let rec = self.record(oid).await?;
        rec.xattrs.get(name).cloned().ok_or_else(|| posix(libc::ENODATA, "no such attribute"))
    }

    /// The names of inode `oid`'s extended attributes.
    pub async fn listxattr(&self, oid: Oid) -> FsResult<Vec<Vec<u8>>> {
        Ok(self.record(oid).await?.xattrs.into_keys().collect())
    }

    /// Sets an extended attribute. Names are `user.`, `trusted.` or
    /// `security.` (the kernel checks who may set which); the
    /// `user.shoal.*` ones are checked as layout hints.
    pub async fn setxattr(&self, oid: Oid, name: &[u8], value: &[u8], mode: XattrMode) -> FsResult<()> {
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(posix(libc::E2BIG, format!("an attribute value is at most {XATTR_SIZE_MAX} bytes")));
        }
        if name == XATTR_OCLASS.as_bytes() {
            let class = parse_class(value)?;
            let c = &self.inner.cont;
            class
                .check(c.info().props.rd_fac, c.inner.pool.state().info.map.widest_group())
                .map_err(|e| posix(libc::EINVAL, e.to_string()))?;
        } else if name == XATTR_CHUNK.as_bytes() {
            parse_chunk(value)?;
        }
        self.change_record(oid, |rec| {
            let has = rec.xattrs.contains_key(name);
            match mode {
                XattrMode::Create if has => return Err(posix(libc::EEXIST, "the attribute exists")),
                XattrMode::Replace if !has => return Err(posix(libc::ENODATA, "no such attribute")),
                _ => {}
            }
            rec.xattrs.insert(name.to_vec(), value.to_vec());
            let total: usize = rec.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
            if total > XATTR_TOTAL_MAX {
                return Err(posix(libc::ENOSPC, format!("an inode's attributes take at most {XATTR_TOTAL_MAX} bytes")));
            }
            Ok(())
        })
        .await
    }

    /// Removes an extended attribute (`ENODATA` if absent).
    pub async fn removexattr(&self, oid: Oid, name: &[u8]) -> FsResult<()> {
        self.change_record(oid, |rec| {
            rec.xattrs.remove(name).map(|_| ()).ok_or_else(|| posix(libc::ENODATA, "no such attribute"))
        })
        .await
    }

    /// Changes inode `oid`'s record under its lock and stamps its ctime.
    async fn change_record(&self, oid: Oid, f: impl FnOnce(&mut Record) -> FsResult<()>) -> FsResult<()> {
        let (obj, dkey) = self.node(oid)?;
        let locks = self.lock(vec![(INODE_LOCK, oid)]).await?;
        let r: FsResult<_> = locks
            .hold(async {
                let mut rec = self.record(oid).await?;
                f(&mut rec)?;
                obj.update_many(dkey, &[(REC, encode(&rec)), (CTIME, ns(now_ns()))]).await?;
                Ok(())
            })
            .await;
        locks.release();
        r
    }

    /// The pool's capacity as `statfs` shows it: the space of every target
    /// that answers, free space shared by several targets (one disk under
    /// many targets or servers) counted once.
    pub async fn statfs(&self) -> FsResult<StatFs> {
        let pool = Pool { inner: self.inner.cont.inner.pool.clone() };
        let (mut used, mut free) = (0u64, 0u64);
        let mut spaces = std::collections::HashSet::new();
        for (_, _, u) in pool.target_usage().await {
            if let Ok(u) = u {
                used += u.data_bytes;
                if u.space_id == 0 || spaces.insert(u.space_id) {
                    free += u.free_bytes;
                }
            }
        }
        let bs = 4096u64;
        Ok(StatFs {
            block_size: bs as u32,
            blocks: (used + free) / bs,
            blocks_free: free / bs,
            name_max: NAME_MAX as u32,
        })
    }

    /// The class, chunk size and servers of file `oid` (`None`: nothing
    /// written yet, so no class chosen).
    pub async fn layout(&self, oid: Oid) -> FsResult<Option<FileLayout>> {
        let Some(a) = self.data(oid).await? else { return Ok(None) };
        let layout = a.object().layout()?;
        let mut ranks: Vec<u32> = layout.groups.iter().flatten().map(|s| s.rank).collect();
        ranks.sort_unstable();
        ranks.dedup();
        Ok(Some(FileLayout { array: a.oid(), class: a.object().class(), chunk_size: a.chunk_size(), ranks }))
    }

    /// Counts file `oid` open through this handle (a FUSE open or
    /// create). While any mount has an inode open, removing its last name
    /// does not free it ([`Fs::reclaim`] leaves it in the orphan list): the
    /// first open through a handle marks the inode on the servers, the
    /// last [`Fs::release_file`] removes the mark. If the mark cannot be
    /// written the open still succeeds (logged): only another mount's
    /// unlink could then free the file under it.
    ///
    /// The first open through this handle then checks that the inode still
    /// has a name: one removed by another mount meanwhile may have been
    /// freed before the mark landed, and the open fails with `ENOENT`.
    /// `created`: the caller just made the inode (nothing to check).
    pub async fn open_file(&self, oid: Oid, created: bool) -> FsResult<()> {
        let (marked, first) = {
            let mut opens = self.inner.opens.lock().expect("opens");
            let o = opens.entry(oid).or_insert_with(|| Open { count: 0, marked: Arc::default() });
            o.count += 1;
            (o.marked.clone(), o.count == 1)
        };
        self.sync_open_mark(oid, &marked).await;
        if created || !first {
            return Ok(());
        }
        let gone = match self.record(oid).await {
            Ok(rec) => rec.nlink == 0,
            Err(e) if e.errno() == libc::ENOENT => true,
            Err(_) => false,
        };
        if gone {
            // Not freed by the release: the remover frees it (or has).
            let marked = {
                let mut opens = self.inner.opens.lock().expect("opens");
                let Some(o) = opens.get_mut(&oid) else { return Err(posix(libc::ENOENT, "removed")) };
                o.count = o.count.saturating_sub(1);
                o.marked.clone()
            };
            self.sync_open_mark(oid, &marked).await;
            return Err(posix(libc::ENOENT, format!("inode {oid} was removed (by another mount?)")));
        }
        Ok(())
    }

    /// One open of file `oid` through this handle ended. After the last,
    /// its buffered writes are written ([`Fs::close_file`]; a failure is
    /// logged, the FUSE flush reported it), its open mark goes, and if the
    /// inode has no names left and no other mount has it open, it is freed
    /// ([`Fs::reclaim`]).
    pub async fn release_file(&self, oid: Oid) -> FsResult<()> {
        let marked = {
            let mut opens = self.inner.opens.lock().expect("opens");
            let Some(o) = opens.get_mut(&oid) else { return Ok(()) };
            o.count = o.count.saturating_sub(1);
            if o.count > 0 {
                return Ok(());
            }
            o.marked.clone()
        };
        // Also for a file with no names left: another mount may have it
        // open and read what this one wrote.
        if let Err(e) = self.close_file(oid).await {
            tracing::warn!("writing the buffered bytes of {oid} at its last close failed: {e}");
        }
        self.sync_open_mark(oid, &marked).await;
        if self.is_open(oid) {
            return Ok(());
        }
        match self.record(oid).await {
            Ok(rec) if rec.nlink == 0 => self.reclaim(oid).await.map(|_| ()),
            Ok(_) => Ok(()),
            Err(e) if e.errno() == libc::ENOENT => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn is_open(&self, oid: Oid) -> bool {
        self.inner.opens.lock().expect("opens").get(&oid).is_some_and(|o| o.count > 0)
    }

    /// Brings inode `oid`'s open mark in line with its open count here,
    /// one change at a time; forgets the inode once closed and unmarked.
    async fn sync_open_mark(&self, oid: Oid, marked: &Arc<tokio::sync::Mutex<bool>>) {
        let mut is = marked.lock().await;
        let Ok((obj, dkey)) = self.node(oid) else { return };
        let mark = open_mark(self.inner.mount_id);
        loop {
            let want = self.is_open(oid);
            if *is == want {
                break;
            }
            let r = if want {
                obj.update_single(dkey, &mark, Bytes::from_static(b"1")).await.map(|_| ())
            } else {
                obj.punch_akey(dkey, &mark).await.map(|_| ())
            };
            if let Err(e) = r {
                tracing::warn!(%oid, error = %e, open = want, "could not change this mount's open mark of an inode");
                break;
            }
            *is = want;
        }
        let mut opens = self.inner.opens.lock().expect("opens");
        // Only when no other task holds the flag (clones are made under the
        // map's lock): one flag per inode, however tasks interleave.
        if opens
            .get(&oid)
            .is_some_and(|o| o.count == 0 && !*is && Arc::ptr_eq(&o.marked, marked) && Arc::strong_count(marked) == 2)
        {
            opens.remove(&oid);
        }
    }

    /// File `oid` (inode object `obj`, data `a`) of size `old` grows to
    /// `new`: bytes its array holds past `old` (a write that landed but
    /// whose client died before raising the size, or one that raced a
    /// truncate) must not reappear, so they are zeroed; unless another live
    /// mount has the file open, whose write may have landed and be about
    /// to raise the size.
    async fn zero_past_end(&self, obj: &Object, a: &Array, old: u64, new: u64) -> FsResult<()> {
        if new > old {
            let stale = a.size().await?.min(new);
            if stale > old && !self.open_elsewhere(obj).await? {
                a.punch(old, stale - old).await?;
            }
        }
        Ok(())
    }

    /// The other mounts whose open marks are on inode object `obj`, live
    /// or not.
    async fn marks_elsewhere(&self, obj: &Object) -> FsResult<Vec<u128>> {
        let keys = obj.list_akeys(OBJ_DKEY).await?;
        let ids = keys.iter().filter_map(|k| k.strip_prefix(OPEN_MARK).and_then(|b| <[u8; 16]>::try_from(b).ok()));
        Ok(ids.map(u128::from_le_bytes).filter(|m| *m != self.inner.mount_id).collect())
    }

    /// Whether another mount that is not gone has inode object `obj` open.
    async fn open_elsewhere(&self, obj: &Object) -> FsResult<bool> {
        for m in self.marks_elsewhere(obj).await? {
            if !self.mount_gone(m).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Puts `oid` in the orphan list, owned by this mount.
    async fn add_orphan(&self, oid: Oid) -> FsResult<()> {
        let owner = Bytes::copy_from_slice(&self.inner.mount_id.to_le_bytes());
        self.inner.orphans.update_single(oid_key(oid), OWNER, owner).await?;
        Ok(())
    }

    /// Frees an orphaned inode once nobody has it open: destroys its
    /// object if it has no names left, and drops it from the orphan list.
    /// While it is open through this handle ([`Fs::open_file`]) or a live
    /// mount's open mark is on it, it stays (in the orphan list, freed by
    /// the last close or a later sweep). Returns whether it was freed.
    pub async fn reclaim(&self, oid: Oid) -> FsResult<bool> {
        let (obj, _) = self.node(oid)?;
        if self.is_open(oid) || self.open_elsewhere(&obj).await? {
            return Ok(false);
        }
        // Nothing buffered may land in the array once it is punched.
        let w = self.inner.writers.lock().expect("writers").remove(&oid);
        self.inner.written.lock().expect("written").remove(&oid);
        if let Some(w) = w {
            // The file is gone: its buffered bytes are not written, and
            // nothing in flight may land after the punch.
            w.discard().await;
        }
        let freed = match self.record(oid).await {
            Ok(rec) if rec.nlink == 0 => {
                if let Some(d) = rec.data {
                    self.inner.cont.open_as(d, ObjType::Array)?.punch().await?;
                }
                obj.punch().await?;
                true
            }
            // Linked again: nothing to free.
            Ok(_) => false,
            // Gone already (freed by another mount).
            Err(e) if e.errno() == libc::ENOENT => true,
            Err(e) => return Err(e),
        };
        self.inner.arrays.lock().expect("arrays").remove(&oid);
        self.inner.orphans.punch_dkey(oid_key(oid)).await?;
        Ok(freed)
    }

    /// Whether mount `m` is gone: unmounted (its heartbeat removed), or its
    /// heartbeat has not changed for [`MOUNT_GONE`] while this mount
    /// watched. The heartbeat's content is only compared with itself, never
    /// with this client's clock, so clients whose clocks disagree never
    /// take a live mount for dead. (A one-shot caller, like `shoal fs
    /// check`, thus frees only the orphans of unmounted mounts; a live
    /// mount's periodic sweep frees those of crashed ones.)
    async fn mount_gone(&self, m: u128) -> FsResult<bool> {
        let beat = self.inner.sb.fetch_single(MOUNTS_DKEY, m.to_le_bytes(), EPOCH_MAX).await?;
        let Some(beat) = beat else { return Ok(true) };
        let now = tokio::time::Instant::now();
        let mut seen = self.inner.seen.lock().expect("seen");
        match seen.get(&m) {
            Some((b, since)) if *b == beat => Ok(now.duration_since(*since) >= MOUNT_GONE),
            _ => {
                seen.insert(m, (beat, now));
                Ok(false)
            }
        }
    }

    /// Frees the orphans of mounts that are gone (see `mount_gone`), and
    /// this mount's own if `mine`. Returns how many were freed. Cancel
    /// safe.
    pub async fn clean_orphans(&self, mine: bool) -> FsResult<usize> {
        let keys = self.inner.orphans.list_dkeys().await?;
        let mut freed = 0;
        for k in keys {
            let Ok(b) = <[u8; 16]>::try_from(k.as_slice()) else { continue };
            let (hi, lo) = b.split_at(8);
            let oid = Oid {
                hi: u64::from_be_bytes(hi.try_into().expect("8 bytes")),
                lo: u64::from_be_bytes(lo.try_into().expect("8 bytes")),
            };
            let owner = self.inner.orphans.fetch_single(&k, OWNER, EPOCH_MAX).await?;
            let owner = owner.as_deref().and_then(|o| <[u8; 16]>::try_from(o).ok()).map(u128::from_le_bytes);
            let gone = match owner {
                // Its own: at unmount, or when another mount had it open
                // when it lost its name (that mount may be gone now).
                Some(o) if o == self.inner.mount_id => {
                    mine || !self.marks_elsewhere(&self.node(oid)?.0).await?.is_empty()
                }
                Some(o) => self.mount_gone(o).await?,
                None => true,
            };
            if gone {
                match self.reclaim(oid).await {
                    Ok(true) => freed += 1,
                    Ok(false) => {}
                    Err(e) => tracing::warn!("orphan {oid} not freed yet: {e}"),
                }
            }
        }
        // Heartbeats of crashed mounts (their orphans were freed above, or
        // are freed by the next sweep, which then finds no heartbeat).
        for m in self.inner.sb.list_akeys(MOUNTS_DKEY).await? {
            let Ok(b) = <[u8; 16]>::try_from(m.as_slice()) else { continue };
            let id = u128::from_le_bytes(b);
            if id != self.inner.mount_id && self.mount_gone(id).await? {
                self.inner.sb.punch_akey(MOUNTS_DKEY, &m).await?;
                self.inner.seen.lock().expect("seen").remove(&id);
            }
        }
        Ok(freed)
    }
}

fn oid_key(oid: Oid) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&oid.hi.to_be_bytes());
    k[8..].copy_from_slice(&oid.lo.to_be_bytes());
    k
}

fn check_xattr_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(posix(libc::ERANGE, format!("an attribute name is at most {NAME_MAX} bytes")));
    }
    let ok = [&b"user."[..], b"trusted.", b"security."].iter().any(|p| name.starts_with(p) && name.len() > p.len());
    if !ok {
        return Err(posix(libc::EOPNOTSUPP, "attribute names are user.*, trusted.* or security.*"));
    }
    Ok(())
}

/// Writes a new inode's record with all three times set to `now`.
async fn write_record(obj: &Object, dkey: &[u8], rec: &Record, now: i64) -> FsResult<()> {
    obj.update_many(dkey, &[(REC, encode(rec)), (ATIME, ns(now)), (MTIME, ns(now)), (CTIME, ns(now))]).await?;
    Ok(())
}

/// The record of a new inode named in directory `dir` (whose record is
/// `parent`).
fn new_record(parent: &Record, dir: Oid, node: &NewNode, now: i64) -> FsResult<Record> {
    let mut rec = Record {
        kind: node.kind,
        perm: node.perm & 0o7777,
        uid: node.uid,
        gid: node.gid,
        nlink: if node.kind == Kind::Dir { 2 } else { 1 },
        rdev: node.rdev,
        parent: (node.kind == Kind::Dir).then_some(dir),
        target: node.target.clone(),
        xattrs: BTreeMap::new(),
        crtime: now,
        data: None,
        class: None,
        chunk: None,
    };
    // BSD group semantics under a setgid directory.
    if parent.perm & libc::S_ISGID != 0 {
        rec.gid = parent.gid;
        if node.kind == Kind::Dir {
            rec.perm |= libc::S_ISGID;
        }
    }
    match node.kind {
        Kind::File => {
            let hint = |k: &str| parent.xattrs.get(k.as_bytes());
            rec.class = hint(XATTR_OCLASS).map(|v| String::from_utf8_lossy(v).trim().to_string());
            rec.chunk = hint(XATTR_CHUNK).map(|v| parse_chunk(v)).transpose()?;
        }
        Kind::Dir => {
            for k in [XATTR_OCLASS, XATTR_CHUNK] {
                if let Some(v) = parent.xattrs.get(k.as_bytes()) {
                    rec.xattrs.insert(k.as_bytes().to_vec(), v.clone());
                }
            }
        }
        _ => {}
    }
    Ok(rec)
}

impl Fs {
    /// Adds `delta` subdirectories to directory `dir`'s link count
    /// (2 + its subdirectories), given its record; the caller holds the
    /// directory's inode lock. A removed directory keeps its 0.
    async fn count_subdirs(&self, dir: Oid, mut rec: Record, delta: i64) -> FsResult<()> {
        if delta == 0 || rec.nlink == 0 {
            return Ok(());
        }
        rec.nlink = (i64::from(rec.nlink) + delta).clamp(2, i64::from(u32::MAX)) as u32;
        self.dir(dir)?.update_single(OBJ_DKEY, REC, encode(&rec)).await?;
        Ok(())
    }
}

/// Stamps a directory's mtime and ctime (blind: the latest stamp wins).
async fn touch_dir(d: &Object, now: i64) -> FsResult<()> {
    d.update_many(OBJ_DKEY, &[(MTIME, ns(now)), (CTIME, ns(now))]).await?;
    Ok(())
}

fn parse_class(v: &[u8]) -> FsResult<ObjectClass> {
    let s = std::str::from_utf8(v).map_err(|_| posix(libc::EINVAL, "an object class is text"))?;
    s.trim().parse::<ObjectClass>().map_err(|e| posix(libc::EINVAL, e.to_string()))
}

fn parse_chunk(v: &[u8]) -> FsResult<u64> {
    let s = std::str::from_utf8(v).map_err(|_| posix(libc::EINVAL, "a chunk size is text"))?;
    let n = s.trim().parse::<bytesize::ByteSize>().map_err(|e| posix(libc::EINVAL, e))?.as_u64();
    if n == 0 || n > 1 << 30 {
        return Err(posix(libc::EINVAL, "a chunk size is 1 byte to 1GiB"));
    }
    Ok(n)
}
