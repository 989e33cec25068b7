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
//! All file access goes through a [`Vfs`], so tests can put a file layer
//! under the store that loses unsynced writes as a power cut would.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// One open data file.
pub trait DataFile: Send + Sync {
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// The file's length.
    fn size(&self) -> io::Result<u64>;
    /// Gives the blocks of `[offset, offset + len)` back (they read as zeros).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes the file system has allocated to the file.
    fn allocated(&self) -> io::Result<u64>;
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

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

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
        Ok(Arc::new(f))
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
}

impl Appender {
    /// The number of the file appends go to.
    pub fn file_no(&self) -> u32 {
        self.file_no
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
        let files = DataFiles { vfs, dir: dir.to_path_buf(), readers: RwLock::new(HashMap::new()), roll_bytes };
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
        Ok(Appender { file_no: no, file, len, dirty: false, retired: Vec::new(), dir_dirty: true })
    }

    /// Appends `data` and returns (file, offset). Not yet durable: call
    /// [`DataFiles::sync`] before pointing metadata at it.
    pub fn append(&self, a: &mut Appender, data: &[u8]) -> io::Result<(u32, u64)> {
        if a.len >= self.roll_bytes {
            let mut next = self.open_appender(a.file_no + 1)?;
            next.retired = std::mem::take(&mut a.retired);
            if a.dirty {
                next.retired.push(a.file.clone());
            }
            next.dir_dirty = true;
            *a = next;
        }
        let offset = a.len;
        a.file.write_at(data, offset)?;
        a.len += data.len() as u64;
        a.dirty = true;
        Ok((a.file_no, offset))
    }

    /// Makes every append so far durable (fdatasync), and the names of
    /// files created since the last sync (fsync of the directory).
    pub fn sync(&self, a: &mut Appender) -> io::Result<()> {
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

    /// Reads `len` bytes at `offset` of file `no`.
    pub fn read(&self, no: u32, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        if len > shoal_common::limits::MAX_SEGMENT as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("record claims {len} bytes")));
        }
        let file = self.reader(no)?;
        let mut buf = vec![0u8; len as usize];
        file.read_at(&mut buf, offset)?;
        Ok(buf)
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
