//! A target's data files: append-only files holding large extents.
//!
//! Files are named `NNNNNNNN.dat` in the target's `data/` directory. Only
//! the newest file is appended to; it rolls over at [`FILE_ROLL_BYTES`].
//! After a crash the tail of the newest file may hold bytes that no
//! committed record points to; appends continue after them, so committed
//! bytes are never overwritten.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// A data file is closed for appends once it reaches this size.
pub const FILE_ROLL_BYTES: u64 = 1 << 30;

pub struct DataFiles {
    dir: PathBuf,
    readers: RwLock<HashMap<u32, Arc<File>>>,
}

/// The append side, owned by the writer thread alone.
pub struct Appender {
    file_no: u32,
    file: Arc<File>,
    len: u64,
    dirty: bool,
    /// Files closed for appends whose last bytes are not yet synced; the
    /// next [`DataFiles::sync`] syncs them, so a failure there poisons.
    retired: Vec<Arc<File>>,
}

fn file_name(dir: &Path, no: u32) -> PathBuf {
    dir.join(format!("{no:08}.dat"))
}

impl DataFiles {
    /// Opens the data directory, creating it if needed, and returns the
    /// appender positioned at the end of the newest file.
    pub fn open(dir: &Path) -> io::Result<(DataFiles, Appender)> {
        fs::create_dir_all(dir)?;
        let mut newest = None;
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(no) = name.strip_suffix(".dat").and_then(|n| n.parse::<u32>().ok()) {
                newest = newest.max(Some(no));
            }
        }
        let files = DataFiles { dir: dir.to_path_buf(), readers: RwLock::new(HashMap::new()) };
        let appender = files.open_appender(newest.unwrap_or(0))?;
        Ok((files, appender))
    }

    fn open_appender(&self, no: u32) -> io::Result<Appender> {
        let path = file_name(&self.dir, no);
        let existed = path.exists();
        let file = Arc::new(OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path)?);
        if !existed {
            // Makes the new name durable before any record points into it.
            File::open(&self.dir)?.sync_all()?;
        }
        let len = file.metadata()?.len();
        self.readers.write().expect("lock").insert(no, file.clone());
        Ok(Appender { file_no: no, file, len, dirty: false, retired: Vec::new() })
    }

    /// Appends `data` and returns (file, offset). Not yet durable: call
    /// [`DataFiles::sync`] before pointing metadata at it.
    pub fn append(&self, a: &mut Appender, data: &[u8]) -> io::Result<(u32, u64)> {
        if a.len >= FILE_ROLL_BYTES {
            let mut next = self.open_appender(a.file_no + 1)?;
            next.retired = std::mem::take(&mut a.retired);
            if a.dirty {
                next.retired.push(a.file.clone());
            }
            *a = next;
        }
        let offset = a.len;
        a.file.write_all_at(data, offset)?;
        a.len += data.len() as u64;
        a.dirty = true;
        Ok((a.file_no, offset))
    }

    /// Makes every append so far durable (fdatasync).
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
        Ok(())
    }

    /// Reads `len` bytes at `offset` of file `no`.
    pub fn read(&self, no: u32, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        if len > shoal_common::limits::MAX_SEGMENT as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("record claims {len} bytes")));
        }
        let file = self.reader(no)?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    fn reader(&self, no: u32) -> io::Result<Arc<File>> {
        if let Some(f) = self.readers.read().expect("lock").get(&no) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(file_name(&self.dir, no))?);
        self.readers.write().expect("lock").insert(no, f.clone());
        Ok(f)
    }

    /// Bytes held by all data files.
    pub fn total_bytes(&self) -> u64 {
        fs::read_dir(&self.dir).map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
