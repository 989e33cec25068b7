//! The raw disk's figures without fio: 1 MiB O_DIRECT writes and reads with
//! 16 in flight (one thread each), and 4 KiB writes each followed by
//! fdatasync, one at a time, on the file system of `dir`.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

use crate::bench_matrix::DiskFigures;

const BLOCK: usize = 1 << 20;
const DEPTH: u64 = 16;
const ALIGN: usize = 4096;

/// A buffer of `len` bytes aligned for O_DIRECT, inside a larger Vec.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Aligned {
        let buf = vec![fill; len + ALIGN];
        let off = buf.as_ptr().align_offset(ALIGN);
        Aligned { buf, off, len }
    }

    fn get(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

pub fn probe(dir: &Path, bytes: u64) -> anyhow::Result<DiskFigures> {
    let path = dir.join("probe.tmp");
    let blocks = (bytes / BLOCK as u64).max(DEPTH);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .with_context(|| format!("open {} with O_DIRECT (does its file system support it?)", path.display()))?;
    let timed = |write: bool| -> anyhow::Result<f64> {
        let t = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..DEPTH)
                .map(|i| {
                    let file = &file;
                    s.spawn(move || -> std::io::Result<()> {
                        let mut buf = Aligned::new(BLOCK, 0x5a);
                        let mut b = i;
                        while b < blocks {
                            let off = b * BLOCK as u64;
                            if write {
                                file.write_all_at(buf.get(), off)?;
                            } else {
                                file.read_exact_at(buf.get_mut(), off)?;
                            }
                            b += DEPTH;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("probe thread panicked"))??;
            }
            anyhow::Ok(())
        })?;
        if write {
            file.sync_data()?;
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let write_s = timed(true)?;
    let read_s = timed(false)?;
    // 4 KiB durable writes, one at a time, for up to 2,000 writes or 5 s.
    let small = Aligned::new(ALIGN, 0xab);
    let t = Instant::now();
    let mut n = 0u64;
    while n < 2000 && t.elapsed() < Duration::from_secs(5) {
        file.write_all_at(small.get(), n * ALIGN as u64)?;
        file.sync_data()?;
        n += 1;
    }
    let sync_s = t.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).ok();
    ensure!(write_s > 0.0 && read_s > 0.0 && sync_s > 0.0, "probe took no time");
    let mib = (blocks * BLOCK as u64) as f64 / f64::from(1u32 << 20);
    Ok(DiskFigures {
        tool: "probe".into(),
        write_mib_s: mib / write_s,
        read_mib_s: mib / read_s,
        sync_4k_iops: n as f64 / sync_s,
    })
}
