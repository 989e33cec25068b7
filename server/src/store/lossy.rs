//! A file layer for tests that loses, at a simulated power cut, everything
//! not yet made durable: file bytes written since the last `sync_data`, and
//! directory entries created since the last `sync_dir` (a file whose name
//! was never synced is gone, whatever was synced into it). It can also cut
//! the power in the middle of a workload: after a chosen number of
//! operations every call fails, as a vanished device would.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::data::{DataFile, Vfs};

#[derive(Default)]
struct FileState {
    data: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Default)]
struct Power {
    /// Operations left before the power goes (`u64::MAX`: never).
    left: AtomicU64,
    off: AtomicBool,
    /// The next directory sync fails (once).
    fail_dir_sync: AtomicBool,
}

impl Power {
    fn tick(&self) -> io::Result<()> {
        if self.off.load(Ordering::SeqCst) {
            return Err(io::Error::other("power cut"));
        }
        let left = self.left.fetch_sub(1, Ordering::SeqCst);
        if left == 0 {
            self.off.store(true, Ordering::SeqCst);
            return Err(io::Error::other("power cut"));
        }
        Ok(())
    }
}

struct LossyFile {
    state: Arc<Mutex<FileState>>,
    power: Arc<Power>,
}

impl DataFile for LossyFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.power.tick()?;
        let mut s = self.state.lock().unwrap();
        let end = offset as usize + buf.len();
        if s.data.len() < end {
            s.data.resize(end, 0);
        }
        s.data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > s.data.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"));
        }
        buf.copy_from_slice(&s.data[offset as usize..end]);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.power.tick()?;
        let mut s = self.state.lock().unwrap();
        s.durable = s.data.clone();
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().data.len() as u64)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.power.tick()?;
        let mut guard = self.state.lock().unwrap();
        let s = &mut *guard;
        for v in [&mut s.data, &mut s.durable] {
            let end = ((offset + len) as usize).min(v.len());
            if (offset as usize) < end {
                v[offset as usize..end].fill(0);
            }
        }
        Ok(())
    }

    fn allocated(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().data.iter().filter(|b| **b != 0).count() as u64)
    }
}

/// Per directory: the names now, and the names made durable.
type Dirs = HashMap<PathBuf, (BTreeSet<String>, BTreeSet<String>)>;

/// The lossy file system. Cheap to clone; clones share everything.
#[derive(Clone, Default)]
pub struct LossyFs {
    files: Arc<Mutex<HashMap<PathBuf, Arc<Mutex<FileState>>>>>,
    dirs: Arc<Mutex<Dirs>>,
    power: Arc<Power>,
}

impl LossyFs {
    pub fn new() -> LossyFs {
        let fs = LossyFs::default();
        fs.power.left.store(u64::MAX, Ordering::SeqCst);
        fs
    }

    /// Cuts the power after `ops` more operations.
    pub fn cut_after(&self, ops: u64) {
        self.power.left.store(ops, Ordering::SeqCst);
    }

    /// Makes the next directory sync fail.
    pub fn fail_next_dir_sync(&self) {
        self.power.fail_dir_sync.store(true, Ordering::SeqCst);
    }

    /// Files created so far (names, durable or not).
    pub fn file_count(&self) -> usize {
        self.files.lock().unwrap().len()
    }

    /// The power goes: unsynced bytes and unsynced names are lost. Then it
    /// comes back on.
    pub fn crash(&self) {
        let mut files = self.files.lock().unwrap();
        let mut dirs = self.dirs.lock().unwrap();
        for (dir, (now, durable)) in dirs.iter_mut() {
            for name in now.difference(durable) {
                files.remove(&dir.join(name));
            }
            *now = durable.clone();
        }
        for f in files.values() {
            let mut s = f.lock().unwrap();
            s.data = s.durable.clone();
        }
        self.power.off.store(false, Ordering::SeqCst);
        self.power.left.store(u64::MAX, Ordering::SeqCst);
    }
}

fn split(path: &Path) -> (PathBuf, String) {
    (path.parent().unwrap_or(Path::new("")).to_path_buf(), path.file_name().unwrap().to_string_lossy().into_owned())
}

impl Vfs for LossyFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.dirs.lock().unwrap().entry(dir.to_path_buf()).or_default();
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(self.dirs.lock().unwrap().get(dir).map(|d| d.0.iter().cloned().collect()).unwrap_or_default())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DataFile>> {
        self.power.tick()?;
        let mut files = self.files.lock().unwrap();
        let state = match files.get(path) {
            Some(s) => s.clone(),
            None if create => {
                let (dir, name) = split(path);
                self.dirs.lock().unwrap().entry(dir).or_default().0.insert(name);
                let s: Arc<Mutex<FileState>> = Arc::default();
                files.insert(path.to_path_buf(), s.clone());
                s
            }
            None => return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display()))),
        };
        Ok(Arc::new(LossyFile { state, power: self.power.clone() }))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.power.tick()?;
        if self.power.fail_dir_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other("injected directory fsync failure"));
        }
        let mut dirs = self.dirs.lock().unwrap();
        let d = dirs.entry(dir.to_path_buf()).or_default();
        d.1 = d.0.clone();
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.power.tick()?;
        let (dir, name) = split(path);
        if let Some(d) = self.dirs.lock().unwrap().get_mut(&dir) {
            d.0.remove(&name);
            d.1.remove(&name);
        }
        self.files.lock().unwrap().remove(path);
        Ok(())
    }

    fn free_space(&self, _dir: &Path) -> io::Result<u64> {
        Ok(u64::MAX / 4)
    }
}
