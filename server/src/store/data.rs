//! A target's data files: append-only files holding large extents.
//!
//! Files are named `NNNNNNNN.dat` in the target's `data/` directory. Only
//! the newest file is appended to; it rolls over at
//! [`StoreOptions::file_roll_bytes`](super::StoreOptions). After a crash the
//! tail of the newest file may hold bytes that no committed record points
//! to; appends continue after them, so committed bytes are never
//! overwritten.
//!
//! Durability: [`DataFiles::sync`] makes every append durable, and the
//! directory entry of every file created since the last sync too, before
//! the writer commits records that point into them. The directory is also
//! synced at open, so a file created just before a crash is durable before
//! anything points into it. A failed sync of either kind is a failed fsync:
//! the caller poisons the target.
//!
//! Space: bytes no record points to any more are given back to the file
//! system by punching holes ([`DataFiles::free`]); a file that is no longer
//! appended to and has no allocated blocks left is removed.
//!
//! Direct I/O: extents of [`RealFs::direct_min`] bytes or more (default
//! [`DIRECT_MIN`]), and extents of whole 4 KiB blocks of
//! [`RealFs::pack_min`] bytes or more (default [`DIRECT_PACK_MIN`]: EC
//! cells), start at a 4 KiB boundary of the file, and the real file system
//! writes them with O_DIRECT (through an aligned buffer, padded with zeros
//! to the next boundary), so they do not pass through the page cache:
//! copying every replica into freshly allocated page-cache pages was half
//! of all the CPU a replicated write cost (docs/performance.md). Direct
//! extents of one group that follow each other in the file go out as one
//! write, so a group of 64 KiB cells is one large write, not many small
//! synchronous ones. Other extents are written through the page cache; the
//! two never share a page. The
//! fdatasync before records point at the data is the same either way (it
//! makes the file's allocation durable). On by default;
//! `SHOAL_DIRECT_IO=0` turns it off.
//!
//! All file access goes through a [`Vfs`], so tests can put a file layer
//! under the store that loses unsynced writes as a power cut would.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

/// One open data file.
pub trait DataFile: Send + Sync {
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads exactly `len` bytes at `offset`. With `whole` (the caller
    /// wants all of an extent, not part of it), a direct file reads an
    /// extent it wrote direct around the page cache; a part is read
    /// through the cache, so the next part of the same extent is there.
    fn read_bytes(&self, offset: u64, len: usize, _whole: bool) -> io::Result<Bytes> {
        read_vec(self, offset, len)
    }
    /// Makes the file's data durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// The file's length.
    fn size(&self) -> io::Result<u64>;
    /// Gives the blocks of `[offset, offset + len)` back (they read as zeros).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes the file system has allocated to the file.
    fn allocated(&self) -> io::Result<u64>;
    /// Whether an extent of `len` bytes goes around the page cache
    /// (O_DIRECT): the appender then starts it on a boundary, gathers it
    /// and writes it with the others of its group through
    /// [`DataFile::write_parts_at`] before the sync.
    fn goes_direct(&self, _len: usize) -> bool {
        false
    }
    /// Writes `parts` one after another from `offset` (a direct file: one
    /// write, padded to the alignment).
    fn write_parts_at(&self, parts: &[Bytes], offset: u64) -> io::Result<()> {
        write_parts_from(self, parts, 0, offset)
    }
}

/// The file operations the data files need.
pub trait Vfs: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Names of the entries of `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens a file for reading and writing, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DataFile>>;
    /// Makes the entries of `dir` durable (fsync on the directory).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Free bytes of the file system holding `dir`.
    fn free_space(&self, dir: &Path) -> io::Result<u64>;
    /// A number naming the file system that holds `dir`, the same for
    /// every target on it, also across servers on one machine (0: not
    /// known), so that free space shared by several targets is counted
    /// once.
    fn space_id(&self, _dir: &Path) -> u64 {
        0
    }
}

/// Extents of at least this many bytes are written with O_DIRECT.
pub const DIRECT_MIN: usize = 1 << 20;
/// Extents of whole [`DIRECT_ALIGN`] blocks of at least this many bytes
/// are written with O_DIRECT too, packed one after another.
pub const DIRECT_PACK_MIN: usize = 16 << 10;
/// The alignment O_DIRECT needs (offsets, lengths and memory).
pub const DIRECT_ALIGN: u64 = 4096;

/// The real file system.
#[derive(Debug, Clone, Copy)]
pub struct RealFs {
    /// Extents of at least this many bytes are written with O_DIRECT where
    /// the file system allows (0: never).
    pub direct_min: usize,
    /// Extents of whole 4 KiB blocks of at least this many bytes go direct
    /// too (0: none).
    pub pack_min: usize,
}

impl Default for RealFs {
    /// Extents of [`DIRECT_MIN`] bytes or more go direct, or of
    /// `SHOAL_DIRECT_MIN=BYTES` (at least 4096); `SHOAL_DIRECT_IO=0` turns
    /// direct I/O off; extents of whole blocks of [`DIRECT_PACK_MIN`]
    /// bytes or more go direct too, or of `SHOAL_DIRECT_PACK=BYTES` (0:
    /// none) (measured in docs/performance.md: it cuts the CPU of
    /// replicated writes to a third and doubles their bandwidth).
    fn default() -> Self {
        let min = std::env::var("SHOAL_DIRECT_MIN").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(DIRECT_MIN);
        let on = std::env::var("SHOAL_DIRECT_IO").as_deref() != Ok("0");
        let pack =
            std::env::var("SHOAL_DIRECT_PACK").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(DIRECT_PACK_MIN);
        RealFs {
            direct_min: if on { min.max(DIRECT_ALIGN as usize) } else { 0 },
            pack_min: if on && pack > 0 { pack.max(DIRECT_ALIGN as usize) } else { 0 },
        }
    }
}

/// A data file of the real file system: one descriptor through the page
/// cache, and one with O_DIRECT for large aligned writes (none where the
/// file system refuses O_DIRECT, as tmpfs does).
pub struct RealFile {
    file: std::fs::File,
    direct: Option<std::fs::File>,
    direct_min: usize,
    pack_min: usize,
    /// The file system refused a direct write: none are tried again.
    direct_refused: std::sync::atomic::AtomicBool,
}

/// The largest piece a direct write copies into its aligned buffer at
/// once (so a thread's buffer stays this small whatever the extent).
const BOUNCE_MAX: usize = 4 << 20;

thread_local! {
    /// The writer thread's aligned buffer for O_DIRECT writes, kept between
    /// writes so its pages are touched once.
    static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl DataFile for RealFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        DataFile::write_at(&self.file, buf, offset)
    }

    fn write_parts_at(&self, parts: &[Bytes], offset: u64) -> io::Result<()> {
        let Some(direct) = self.direct.as_ref().filter(|_| offset.is_multiple_of(DIRECT_ALIGN)) else {
            return write_parts_from(&self.file, parts, 0, offset);
        };
        if self.direct_refused.load(std::sync::atomic::Ordering::Relaxed) {
            return write_parts_from(&self.file, parts, 0, offset);
        }
        let align = DIRECT_ALIGN as usize;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        BOUNCE.with(|b| {
            let mut b = b.borrow_mut();
            let cap = total.next_multiple_of(align).min(BOUNCE_MAX);
            if b.len() < cap + align {
                *b = vec![0u8; cap + align];
            }
            let start = b.as_ptr().align_offset(align);
            // Through the bounce buffer a piece of at most BOUNCE_MAX at a
            // time, filled from the parts in order; the last piece is
            // padded with zeros to the alignment.
            let (mut done, mut part, mut in_part) = (0, 0, 0);
            while done < total {
                let n = (total - done).min(BOUNCE_MAX);
                let out = &mut b[start..start + n.next_multiple_of(align)];
                let mut filled = 0;
                while filled < n {
                    let p = &parts[part];
                    let k = (p.len() - in_part).min(n - filled);
                    out[filled..filled + k].copy_from_slice(&p[in_part..in_part + k]);
                    (filled, in_part) = (filled + k, in_part + k);
                    if in_part == p.len() {
                        (part, in_part) = (part + 1, 0);
                    }
                }
                out[n..].fill(0);
                match std::os::unix::fs::FileExt::write_all_at(direct, out, offset + done as u64) {
                    Ok(()) => done += n,
                    // The file system opened the file for direct I/O but
                    // refuses these writes (a larger logical block size,
                    // a short write left unaligned): through the page
                    // cache from here on, same offsets.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        if !self.direct_refused.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            tracing::warn!("O_DIRECT writes refused ({e}); writing through the page cache");
                        }
                        return write_parts_from(&self.file, parts, done, offset);
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        DataFile::read_at(&self.file, buf, offset)
    }

    fn read_bytes(&self, offset: u64, len: usize, whole: bool) -> io::Result<Bytes> {
        let buffered = || read_vec(&self.file, offset, len);
        // Only what was written direct (its start is aligned): the rest
        // may be in the page cache, where a read costs no disk I/O.
        let Some(direct) =
            self.direct.as_ref().filter(|_| whole && self.goes_direct(len) && offset.is_multiple_of(DIRECT_ALIGN))
        else {
            return buffered();
        };
        if self.direct_refused.load(std::sync::atomic::Ordering::Relaxed) {
            return buffered();
        }
        let align = DIRECT_ALIGN as usize;
        let want = len.next_multiple_of(align);
        let mut v: Vec<u8> = Vec::with_capacity(want + align);
        let start = v.as_ptr().align_offset(align);
        let mut got = 0;
        while got < len {
            let spare = &mut v.spare_capacity_mut()[start + got..start + want];
            // SAFETY: `spare` is writable memory of `spare.len()` bytes
            // owned by `v`; pread writes at most that many and reports how
            // many it wrote.
            let n = unsafe {
                libc::pread(
                    std::os::fd::AsRawFd::as_raw_fd(direct),
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                    (offset + got as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Opened for direct I/O but refused: the page cache,
                    // from here on.
                    Some(libc::EINVAL) => {
                        if got == 0 {
                            self.direct_refused.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        return buffered();
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "data file ends inside an extent"));
            }
            got += n as usize;
        }
        // SAFETY: pread initialised the first `start + got` bytes past the
        // (never read) alignment gap, which is within the capacity; the
        // gap is initialised now too.
        unsafe {
            std::ptr::write_bytes(v.as_mut_ptr(), 0, start);
            v.set_len(start + got);
        }
        Ok(Bytes::from(v).slice(start..start + len))
    }

    fn sync_data(&self) -> io::Result<()> {
        DataFile::sync_data(&self.file)
    }

    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.punch_hole(offset, len)
    }

    fn allocated(&self) -> io::Result<u64> {
        self.file.allocated()
    }

    fn goes_direct(&self, len: usize) -> bool {
        self.direct.is_some()
            && (len >= self.direct_min
                || (self.pack_min > 0 && len >= self.pack_min && len.is_multiple_of(DIRECT_ALIGN as usize)))
    }
}

impl DataFile for std::fs::File {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        std::fs::File::sync_data(self)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate(2) on an open descriptor with plain integers.
        let r = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn allocated(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.metadata()?.blocks() * 512)
    }
}

impl Vfs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        std::fs::read_dir(dir)?.map(|e| Ok(e?.file_name().to_string_lossy().into_owned())).collect()
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DataFile>> {
        let f = std::fs::OpenOptions::new().create(create).truncate(false).read(true).write(true).open(path)?;
        let direct = if self.direct_min > 0 {
            use std::os::unix::fs::OpenOptionsExt;
            // EINVAL: the file system does not do O_DIRECT; write through the cache.
            std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).ok()
        } else {
            None
        };
        Ok(Arc::new(RealFile {
            file: f,
            direct,
            direct_min: self.direct_min,
            pack_min: self.pack_min,
            direct_refused: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("store::dir_sync", |_| Err(io::Error::other("injected directory fsync failure")));
        std::fs::File::open(dir)?.sync_all()
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn free_space(&self, dir: &Path) -> io::Result<u64> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: all-zero bytes are a valid statvfs.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.f_bavail as u64 * st.f_frsize as u64)
    }

    fn space_id(&self, dir: &Path) -> u64 {
        use std::hash::{Hash, Hasher};
        use std::os::unix::fs::MetadataExt;
        let Ok(md) = std::fs::metadata(dir) else { return 0 };
        let machine = std::fs::read_to_string("/etc/machine-id")
            .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/random/boot_id"))
            .unwrap_or_default();
        // Fixed keys: every server process computes the same number.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (machine.trim(), md.dev()).hash(&mut h);
        h.finish().max(1)
    }
}

pub struct DataFiles {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    readers: RwLock<HashMap<u32, Arc<dyn DataFile>>>,
    roll_bytes: u64,
    /// Threads that write gathered direct extents, several at once;
    /// started by the first direct write (none while direct I/O is off).
    pool: std::sync::OnceLock<WritePool>,
}

/// A direct extent appended but not yet written: (file, offset, bytes).
type PendingWrite = (Arc<dyn DataFile>, u64, Bytes);

/// Direct extents that follow each other in one file, written as one:
/// (file, offset, the extents in order).
type PendingRun = (Arc<dyn DataFile>, u64, Vec<Bytes>);

/// Reads exactly `len` bytes at `offset` into a new buffer.
fn read_vec(file: &(impl DataFile + ?Sized), offset: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; len];
    file.read_at(&mut buf, offset)?;
    Ok(Bytes::from(buf))
}

/// Writes `parts`, one after another from `offset`, from byte `skip` of
/// their concatenation on (at `offset + skip`), one `write_at` per part.
fn write_parts_from(file: &(impl DataFile + ?Sized), parts: &[Bytes], skip: usize, offset: u64) -> io::Result<()> {
    let mut at = 0;
    for p in parts {
        let end = at + p.len();
        if end > skip {
            let from = skip.saturating_sub(at);
            file.write_at(&p[from..], offset + (at + from) as u64)?;
        }
        at = end;
    }
    Ok(())
}

/// Joins pending direct extents that follow each other in the same file
/// (each starts where the previous one's padding ends; packed extents
/// have none) into runs, in order.
fn runs_of(writes: Vec<PendingWrite>) -> Vec<PendingRun> {
    let mut runs: Vec<PendingRun> = Vec::new();
    for (file, offset, data) in writes {
        if let Some((f, o, parts)) = runs.last_mut() {
            let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
            // Only a run of whole blocks can take more (else the next
            // extent would land on its padding); runs of a MiB or more are
            // left as they are, so the disk still sees several at once.
            if Arc::ptr_eq(f, &file) && len.is_multiple_of(DIRECT_ALIGN) && *o + len == offset && len < RUN_MAX {
                parts.push(data);
                continue;
            }
        }
        runs.push((file, offset, vec![data]));
    }
    runs
}

/// A few threads, each with its own aligned buffer, that write gathered
/// direct extents in parallel so the disk sees several at once.
struct WritePool {
    jobs: crossbeam::channel::Sender<(PendingRun, crossbeam::channel::Sender<io::Result<()>>)>,
}

/// A run of adjacent direct extents grows up to this size.
const RUN_MAX: u64 = 1 << 20;

/// Direct writes in flight at once per target.
const DIRECT_DEPTH: usize = 4;

impl WritePool {
    fn new() -> WritePool {
        let (jobs, rx) = crossbeam::channel::unbounded::<(PendingRun, crossbeam::channel::Sender<io::Result<()>>)>();
        for i in 0..DIRECT_DEPTH {
            let rx = rx.clone();
            // The threads end when the pool (the only sender) is dropped.
            let spawned = std::thread::Builder::new().name(format!("shoal-dio-{i}")).spawn(move || {
                for ((file, offset, parts), done) in rx {
                    let _ = done.send(file.write_parts_at(&parts, offset));
                }
            });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a direct-write thread: {e}");
            }
        }
        WritePool { jobs }
    }

    /// Writes every extent, runs of adjacent ones as one write, several
    /// at once; the first error if any failed.
    fn write_all(&self, writes: Vec<PendingWrite>) -> io::Result<()> {
        let writes = runs_of(writes);
        if writes.len() == 1 {
            let (file, offset, parts) = &writes[0];
            return file.write_parts_at(parts, *offset);
        }
        let (done, results) = crossbeam::channel::unbounded();
        let n = writes.len();
        for w in writes {
            self.jobs.send((w, done.clone())).map_err(|_| io::Error::other("the direct-write threads are gone"))?;
        }
        drop(done);
        let mut first = Ok(());
        for _ in 0..n {
            let r = results.recv().map_err(|_| io::Error::other("a direct-write thread died"))?;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// The append side, owned by the writer thread alone.
pub struct Appender {
    file_no: u32,
    file: Arc<dyn DataFile>,
    len: u64,
    dirty: bool,
    /// Files closed for appends whose last bytes are not yet synced; the
    /// next [`DataFiles::sync`] syncs them, so a failure there poisons.
    retired: Vec<Arc<dyn DataFile>>,
    /// A file was created since the directory was last synced.
    dir_dirty: bool,
    /// Large extents appended to direct files, written at the next
    /// [`DataFiles::write_pending`] or sync.
    pending: Vec<PendingWrite>,
}

impl Appender {
    /// The number of the file appends go to.
    pub fn file_no(&self) -> u32 {
        self.file_no
    }

    /// Direct writes gathered and not yet written.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Forgets the direct writes gathered after the first `n` (those of a
    /// mutation that failed before it was accepted).
    pub fn truncate_pending(&mut self, n: usize) {
        self.pending.truncate(n);
    }
}

fn file_name(dir: &Path, no: u32) -> PathBuf {
    dir.join(format!("{no:08}.dat"))
}

impl DataFiles {
    /// Opens the data directory, creating it if needed, syncs its entries,
    /// and returns the appender positioned at the end of the newest file.
    pub fn open(vfs: Arc<dyn Vfs>, dir: &Path, roll_bytes: u64) -> io::Result<(DataFiles, Appender)> {
        vfs.create_dir_all(dir)?;
        // A file created just before a crash may have a name that never
        // became durable; make it durable before anything points into it.
        vfs.sync_dir(dir)?;
        let newest = vfs
            .list(dir)?
            .iter()
            .filter_map(|name| name.strip_suffix(".dat").and_then(|n| n.parse::<u32>().ok()))
            .max();
        let files = DataFiles {
            vfs,
            dir: dir.to_path_buf(),
            readers: RwLock::new(HashMap::new()),
            roll_bytes,
            pool: std::sync::OnceLock::new(),
        };
        let appender = files.open_appender(newest.unwrap_or(0))?;
        Ok((files, appender))
    }

    fn open_appender(&self, no: u32) -> io::Result<Appender> {
        let path = file_name(&self.dir, no);
        let file = self.vfs.open(&path, true)?;
        let len = file.size()?;
        self.readers.write().expect("lock").insert(no, file.clone());
        // Whether or not the file existed, its name is synced before any
        // record points into it (a retry after a failed sync must not skip it).
        Ok(Appender { file_no: no, file, len, dirty: false, retired: Vec::new(), dir_dirty: true, pending: Vec::new() })
    }

    /// Appends `data` and returns (file, offset). Not yet durable: call
    /// [`DataFiles::sync`] before pointing metadata at it. Large extents of
    /// direct files are only gathered here and written by the sync (or
    /// [`DataFiles::write_pending`]), several at once.
    pub fn append(&self, a: &mut Appender, data: &Bytes) -> io::Result<(u32, u64)> {
        if a.len >= self.roll_bytes {
            let mut next = self.open_appender(a.file_no + 1)?;
            next.pending = std::mem::take(&mut a.pending);
            next.retired = std::mem::take(&mut a.retired);
            if a.dirty {
                next.retired.push(a.file.clone());
            }
            next.dir_dirty = true;
            *a = next;
        }
        // Large extents start on a boundary O_DIRECT can write at.
        let direct = a.file.goes_direct(data.len());
        let offset = if direct { a.len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN } else { a.len };
        if direct {
            a.pending.push((a.file.clone(), offset, data.clone()));
            // The direct write pads to the next boundary; what follows
            // starts after the padding, so a later small extent (written
            // at once, before this one) is never overwritten by it.
            a.len = (offset + data.len() as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        } else {
            a.file.write_at(data, offset)?;
            a.len = offset + data.len() as u64;
        }
        a.dirty = true;
        Ok((a.file_no, offset))
    }

    /// Makes every append so far durable (fdatasync), and the names of
    /// files created since the last sync (fsync of the directory).
    pub fn sync(&self, a: &mut Appender) -> io::Result<()> {
        self.write_pending(a)?;
        if a.dirty || !a.retired.is_empty() {
            #[cfg(feature = "failpoints")]
            fail::fail_point!("store::data_sync", |_| Err(io::Error::other("injected fdatasync failure")));
            for f in a.retired.drain(..) {
                f.sync_data()?;
            }
            a.file.sync_data()?;
            a.dirty = false;
        }
        if a.dir_dirty {
            self.vfs.sync_dir(&self.dir)?;
            a.dir_dirty = false;
        }
        Ok(())
    }

    /// Writes the gathered large extents, several at once. A failure is a
    /// failed write of those extents (nothing points at them yet), not a
    /// failed sync.
    pub fn write_pending(&self, a: &mut Appender) -> io::Result<()> {
        if a.pending.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut a.pending);
        let spans: Vec<(Arc<dyn DataFile>, u64, u64)> =
            writes.iter().map(|(f, o, d)| (f.clone(), *o, (d.len() as u64).next_multiple_of(DIRECT_ALIGN))).collect();
        let r = self.pool.get_or_init(WritePool::new).write_all(writes);
        if r.is_err() {
            // The group fails and nothing will point at these extents:
            // give back what the writes that did go through allocated
            // (every write has ended by now; offsets are never reused).
            for (f, offset, len) in spans {
                let _ = f.punch_hole(offset, len);
            }
        }
        r
    }

    /// Reads `len` bytes at `offset` of file `no`.
    /// Reads `len` bytes at `offset` of file `no`; `whole`: see
    /// [`DataFile::read_bytes`].
    pub fn read(&self, no: u32, offset: u64, len: u64, whole: bool) -> io::Result<Bytes> {
        if len > shoal_common::limits::MAX_SEGMENT as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("record claims {len} bytes")));
        }
        self.reader(no)?.read_bytes(offset, len as usize, whole)
    }

    fn reader(&self, no: u32) -> io::Result<Arc<dyn DataFile>> {
        if let Some(f) = self.readers.read().expect("lock").get(&no) {
            return Ok(f.clone());
        }
        let f = self.vfs.open(&file_name(&self.dir, no), false)?;
        self.readers.write().expect("lock").insert(no, f.clone());
        Ok(f)
    }

    /// Gives back the space of extents no record points to any more, then
    /// removes files (other than `active`) that hold nothing. Call only
    /// after the deletion of those records is durable.
    pub fn free(&self, extents: &[(u32, u64, u64)], active: u32) -> io::Result<()> {
        let mut files = std::collections::BTreeSet::new();
        for &(no, offset, len) in extents {
            match self.reader(no) {
                Ok(f) => f.punch_hole(offset, len)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            files.insert(no);
        }
        for no in files {
            if no == active {
                continue;
            }
            let f = self.reader(no)?;
            if f.allocated()? == 0 {
                self.readers.write().expect("lock").remove(&no);
                self.vfs.remove(&file_name(&self.dir, no))?;
            }
        }
        Ok(())
    }

    /// Bytes the data files occupy on the file system.
    pub fn total_bytes(&self) -> u64 {
        let Ok(names) = self.vfs.list(&self.dir) else { return 0 };
        names
            .iter()
            .filter_map(|n| n.strip_suffix(".dat").and_then(|n| n.parse::<u32>().ok()))
            .filter_map(|no| self.reader(no).ok()?.allocated().ok())
            .sum()
    }

    /// Free bytes of the file system that holds the data files.
    pub fn free_space(&self) -> io::Result<u64> {
        self.vfs.free_space(&self.dir)
    }

    /// See [`Vfs::space_id`].
    pub fn space_id(&self) -> u64 {
        self.vfs.space_id(&self.dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `[offset, offset + len)` of `path` that are in the page cache.
    fn cached_pages(path: &Path, offset: u64, len: u64) -> usize {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        let size = f.metadata().unwrap().len() as usize;
        // SAFETY: a read-only shared mapping of a file we keep open, and a
        // vector of one byte per page for mincore to fill.
        unsafe {
            let map = libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
            assert_ne!(map, libc::MAP_FAILED);
            let pages = size.div_ceil(4096);
            let mut vec = vec![0u8; pages];
            assert_eq!(libc::mincore(map, size, vec.as_mut_ptr()), 0);
            libc::munmap(map, size);
            let (first, last) = ((offset / 4096) as usize, ((offset + len).div_ceil(4096)) as usize);
            vec[first..last].iter().filter(|b| *b & 1 == 1).count()
        }
    }

    #[test]
    fn large_extents_are_aligned_written_around_the_page_cache_and_read_back() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let dir = tmp.path().join("data");
        let pattern = |seed: u8, len: usize| -> Vec<u8> { (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect() };
        let extents =
            [pattern(3, 100), pattern(5, (1 << 20) + 7), pattern(7, 200), pattern(11, DIRECT_MIN)].map(Bytes::from);
        let (files, mut a) =
            DataFiles::open(Arc::new(RealFs { direct_min: DIRECT_MIN, pack_min: DIRECT_PACK_MIN }), &dir, 1 << 30)
                .unwrap();
        let mut at = Vec::new();
        for e in &extents {
            at.push(files.append(&mut a, e).unwrap());
        }
        files.sync(&mut a).unwrap();
        // Large extents start on 4 KiB boundaries; small ones follow on.
        assert_eq!(at[0].1, 0);
        assert_eq!(at[1].1, 4096);
        // The small extent after a direct one starts after its padding.
        assert_eq!(at[2].1, 4096 + (1 << 20) + 4096);
        assert_eq!(at[3].1 % DIRECT_ALIGN, 0);
        let path = file_name(&dir, 0);
        // The direct writes left nothing in the page cache; the small
        // extents went through it.
        assert_eq!(cached_pages(&path, at[1].1, extents[1].len() as u64 - 7), 0, "a direct write was cached");
        assert!(cached_pages(&path, 0, 100) > 0, "a small write went around the cache");
        for ((no, off), e) in at.iter().zip(&extents) {
            assert_eq!(&files.read(*no, *off, e.len() as u64, true).unwrap(), e);
        }
        // Reopened, appends go on after the last extent, aligned again.
        drop((files, a));
        let (files, mut a) =
            DataFiles::open(Arc::new(RealFs { direct_min: DIRECT_MIN, pack_min: DIRECT_PACK_MIN }), &dir, 1 << 30)
                .unwrap();
        let more = Bytes::from(pattern(13, 3 << 20));
        let (no, off) = files.append(&mut a, &more).unwrap();
        files.sync(&mut a).unwrap();
        assert!(off >= at[3].1 + DIRECT_MIN as u64 && off % DIRECT_ALIGN == 0);
        assert_eq!(files.read(no, off, more.len() as u64, true).unwrap(), more);
        // Larger than the bounce buffer: written a piece at a time.
        let huge = Bytes::from(pattern(17, (2 * BOUNCE_MAX) + (1 << 20) + 5));
        let (hno, hoff) = files.append(&mut a, &huge).unwrap();
        files.sync(&mut a).unwrap();
        assert_eq!(cached_pages(&file_name(&dir, hno), hoff, huge.len() as u64 - 5), 0, "a direct write was cached");
        assert_eq!(files.read(hno, hoff, huge.len() as u64, true).unwrap(), huge);
        for ((no, off), e) in at.iter().zip(&extents) {
            assert_eq!(&files.read(*no, *off, e.len() as u64, true).unwrap(), e);
        }
    }

    #[test]
    fn cells_of_whole_blocks_are_packed_and_written_direct_as_one_run() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let dir = tmp.path().join("data");
        let fs = Arc::new(RealFs { direct_min: DIRECT_MIN, pack_min: DIRECT_PACK_MIN });
        let (files, mut a) = DataFiles::open(fs, &dir, 1 << 30).unwrap();
        let cell = |seed: u8, len: usize| {
            Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(seed) ^ seed).collect::<Vec<u8>>())
        };
        // A small extent first (page cache), then 64 KiB cells, a 3 KiB
        // one among them (page cache, after the cells' last block), and
        // 20 KiB cells (whole blocks above the pack size).
        let mut extents = vec![cell(1, 100)];
        extents.extend((0..6).map(|i| cell(2 + i, 64 << 10)));
        extents.push(cell(9, 3 << 10));
        extents.extend((0..3).map(|i| cell(10 + i, 20 << 10)));
        let mut at = Vec::new();
        for e in &extents {
            at.push(files.append(&mut a, e).unwrap().1);
        }
        assert_eq!(a.pending_len(), 9, "the cells wait for the group's write");
        files.sync(&mut a).unwrap();
        // Packed: each cell right after the previous one, from a boundary.
        assert_eq!(at[1], 4096);
        for i in 2..7 {
            assert_eq!(at[i], at[i - 1] + (64 << 10), "cell {i} is not packed");
        }
        assert_eq!(at[9], at[8] + (20 << 10));
        assert!(at[8] % DIRECT_ALIGN == 0 && at[8] >= at[7] + (3 << 10));
        let path = file_name(&dir, 0);
        assert_eq!(cached_pages(&path, at[1], 6 * (64 << 10)), 0, "a packed cell went through the page cache");
        assert_eq!(cached_pages(&path, at[8], 3 * (20 << 10)), 0, "a packed cell went through the page cache");
        for (off, e) in at.iter().zip(&extents) {
            assert_eq!(&files.read(0, *off, e.len() as u64, true).unwrap(), e);
        }
        // Read whole, around the page cache too (the small ones through
        // it); read for a part of it, through the cache.
        assert_eq!(cached_pages(&path, at[1], 6 * (64 << 10)), 0, "a packed cell was read through the page cache");
        assert!(cached_pages(&path, at[7], 3 << 10) > 0);
        assert_eq!(files.read(0, at[2], 64 << 10, false).unwrap(), extents[2]);
        assert!(cached_pages(&path, at[2], 64 << 10) > 0, "a part's read skipped the page cache");
        // Off: cells go through the page cache.
        let fs = Arc::new(RealFs { direct_min: DIRECT_MIN, pack_min: 0 });
        let (files, mut a) = DataFiles::open(fs, &dir, 1 << 30).unwrap();
        let off = files.append(&mut a, &extents[1]).unwrap().1;
        assert_eq!(a.pending_len(), 0);
        files.sync(&mut a).unwrap();
        assert!(cached_pages(&path, off, 64 << 10) > 0);
    }

    #[test]
    fn adjacent_direct_extents_join_into_runs_of_up_to_a_mib() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let fs = RealFs { direct_min: DIRECT_MIN, pack_min: DIRECT_PACK_MIN };
        let (f, g) = (fs.open(&tmp.path().join("f"), true).unwrap(), fs.open(&tmp.path().join("g"), true).unwrap());
        let b = |n: usize| Bytes::from(vec![1u8; n]);
        let k64 = 64 << 10;
        let mut writes: Vec<PendingWrite> = (0..20).map(|i| (f.clone(), i * k64 as u64, b(k64))).collect();
        // A gap, another file, and a run after an extent that is not
        // whole blocks (padded: the next one starts after the padding).
        writes.push((f.clone(), 40 * k64 as u64, b(k64)));
        writes.push((g.clone(), 41 * k64 as u64, b(k64)));
        writes.push((g.clone(), 42 * k64 as u64, b(5000)));
        writes.push((g.clone(), 42 * k64 as u64 + 5000, b(k64)));
        let runs: Vec<(u64, usize)> = runs_of(writes).iter().map(|(_, o, p)| (*o, p.len())).collect();
        assert_eq!(
            runs,
            vec![
                (0, 16),
                (16 * k64 as u64, 4),
                (40 * k64 as u64, 1),
                (41 * k64 as u64, 2),
                (42 * k64 as u64 + 5000, 1)
            ]
        );
    }

    #[test]
    fn without_direct_io_every_extent_goes_through_the_page_cache() {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let dir = tmp.path().join("data");
        let (files, mut a) = DataFiles::open(Arc::new(RealFs { direct_min: 0, pack_min: 0 }), &dir, 1 << 30).unwrap();
        let big = Bytes::from(vec![0x5au8; 1 << 20]);
        let (no, off) = files.append(&mut a, &big).unwrap();
        files.sync(&mut a).unwrap();
        assert!(cached_pages(&file_name(&dir, 0), off, big.len() as u64) > 0);
        assert_eq!(files.read(no, off, big.len() as u64, true).unwrap(), big);
    }
}
