//! `shoal demo`: the README's main job until the cluster exists.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context};
use bytes::Bytes;
use clap::Args;
use shoal_client::ServerClient;
use shoal_common::msg::{FetchIod, Fetched, UpdateIod, ValueKind};
use shoal_common::{ContId, Epoch, Oid, EPOCH_MAX};
use shoal_tools::local::LocalServer;
use tokio::task::JoinSet;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory for the server's data (default: a new temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of targets.
    #[arg(long, default_value_t = 2)]
    targets: u32,
    /// Number of key-value pairs to write.
    #[arg(long, default_value_t = 2000)]
    keys: u64,
    /// Size of the array to write, in MiB.
    #[arg(long, default_value_t = 64)]
    array_mib: u64,
}

const CONT: ContId = ContId(0xdead_beef);
const KV: Oid = Oid::new(0, 1);
const ARRAY: Oid = Oid::new(0, 2);

fn value(i: u64) -> Bytes {
    Bytes::from(format!("value-{i}-").repeat(1 + (i % 40) as usize))
}

fn chunk(i: u64) -> Bytes {
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    Bytes::from_iter((0..1 << 20).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }))
}

fn single() -> Vec<FetchIod> {
    vec![FetchIod { akey: b"v".to_vec(), kind: ValueKind::Single }]
}

fn extent() -> ValueKind {
    ValueKind::Array { rec_size: 1, start: 0, nr: 1 << 20 }
}

/// Reads every key and chunk back and compares the bytes; `punched` keys
/// must be gone.
async fn verify(c: &ServerClient, targets: u32, keys: u64, chunks: u64, punched: u64) -> anyhow::Result<()> {
    for i in 0..keys {
        let r =
            c.fetch((i % targets as u64) as u32, CONT, KV, format!("key-{i}").as_bytes(), EPOCH_MAX, single()).await?;
        if i < punched {
            ensure!(r[0].0 == Fetched::Missing, "punched key-{i} is still visible");
        } else {
            ensure!(r[0].1 == value(i), "key-{i} read back wrong");
        }
    }
    for i in 0..chunks {
        let iods = vec![FetchIod { akey: b"data".to_vec(), kind: extent() }];
        let r = c.fetch((i % targets as u64) as u32, CONT, ARRAY, &i.to_be_bytes(), EPOCH_MAX, iods).await?;
        ensure!(r[0].1 == chunk(i), "array chunk {i} read back wrong");
    }
    Ok(())
}

fn rate(n: u64, t: Instant) -> String {
    format!("{:.0}/s", n as f64 / t.elapsed().as_secs_f64())
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match a.dir {
        Some(d) => d,
        None => {
            tmp = tempfile::Builder::new().prefix("shoal-demo-").tempdir()?;
            tmp.path().join("server0")
        }
    };
    println!("== starting shoal-server on {} with {} targets", dir.display(), a.targets);
    let mut srv = LocalServer::start(&dir, a.targets).await?;
    println!("   ready at {} (pid {})", srv.addr, srv.pid().unwrap_or(0));
    let c = Arc::new(srv.client());

    let t = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..a.keys {
        let c = c.clone();
        let target = (i % a.targets as u64) as u32;
        set.spawn(async move {
            let iods = vec![UpdateIod { akey: b"v".to_vec(), kind: ValueKind::Single }];
            c.update(target, CONT, KV, format!("key-{i}").as_bytes(), iods, vec![value(i)]).await
        });
        if set.len() >= 32 {
            set.join_next().await.context("join")???;
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    println!("== wrote {} key-value pairs in {:.2?} ({})", a.keys, t.elapsed(), rate(a.keys, t));

    let t = Instant::now();
    for i in 0..a.array_mib {
        let c = c.clone();
        let target = (i % a.targets as u64) as u32;
        set.spawn(async move {
            let iods = vec![UpdateIod { akey: b"data".to_vec(), kind: extent() }];
            c.update(target, CONT, ARRAY, &i.to_be_bytes(), iods, vec![chunk(i)]).await
        });
        if set.len() >= 8 {
            set.join_next().await.context("join")???;
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "== wrote a {} MiB array as 1 MiB extents in {secs:.2}s ({:.0} MiB/s)",
        a.array_mib,
        a.array_mib as f64 / secs
    );

    let t = Instant::now();
    verify(&c, a.targets, a.keys, a.array_mib, 0).await?;
    println!("== read back and checked every byte in {:.2?}", t.elapsed());

    let mut listed = 0;
    for target in 0..a.targets {
        listed += c.list_all(target, CONT, KV, EPOCH_MAX, None).await?.len() as u64;
    }
    ensure!(listed == a.keys, "listed {listed} dkeys, wrote {}", a.keys);
    println!("== listed {listed} dkeys across {} targets", a.targets);

    let punched = a.keys.min(100);
    let mut before: Epoch = 0;
    for i in 0..punched {
        let target = (i % a.targets as u64) as u32;
        let e = c.punch(target, CONT, KV, Some(format!("key-{i}").as_bytes()), None).await?;
        if i == 0 {
            before = e - 1;
        }
    }
    let old = c.fetch(0, CONT, KV, b"key-0", before, single()).await?;
    ensure!(old[0].1 == value(0), "read at an epoch before the punch must see the old value");
    println!("== punched {punched} keys; a read at epoch {before} still sees the old value of key-0");

    println!("== SIGKILL shoal-server (pid {}) and restart it", srv.pid().unwrap_or(0));
    srv.kill9();
    let t = Instant::now();
    srv.restart().await?;
    println!("   replayed and ready again at {} in {:.2?}", srv.addr, t.elapsed());
    let c = srv.client();
    verify(&c, a.targets, a.keys, a.array_mib, punched).await?;
    println!("== after the crash every acknowledged byte reads back; punched keys stay gone");
    for target in 0..a.targets {
        let q = c.target_query(target).await?;
        println!("   target {target}: {} MiB in data files, {} GiB free", q.data_bytes >> 20, q.free_bytes >> 30);
    }
    let code = srv.terminate()?;
    println!("== shoal-server stopped on SIGTERM ({code}); demo OK");
    Ok(())
}
