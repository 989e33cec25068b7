//! A client process for the write-gathering crash tests: writes an array
//! sequentially, in pieces of random sizes at unaligned offsets, through
//! an [`shoal_client::ArrayWriter`], and says on stdout how far it got.
//!
//! `shoal-gather-writer MS POOL CONT OID START END FLUSH_AT SEED PASSES`
//!
//! Writes `[START, END)` with [`byte_b`], and with `PASSES` 2 then once
//! more with [`byte_c`] (an overwrite, so writes of one range reach the
//! servers in order or the test sees old bytes). Once FLUSH_AT bytes of
//! the last pass are written it flushes and prints `flushed E` (every byte
//! below `E` is then durable as the last pass wrote it). After each write
//! of the last pass it prints `wrote E`. At the end it prints `done` and
//! waits to be killed: the test kills it at some point.

use std::io::Write;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use shoal_client::{Client, WriteBack};
use shoal_tests::{byte_b, byte_c};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(a.len() == 9, "usage: shoal-gather-writer MS POOL CONT OID START END FLUSH_AT SEED PASSES");
    let num = |i: usize| a[i].parse::<u64>();
    let (start, end, flush_at, seed, passes) = (num(4)?, num(5)?, num(6)?, num(7)?, num(8)?);
    let client = Client::connect(vec![a[0].clone()]).await?;
    let cont = client.pool_connect(&a[1]).await?.cont_open(&a[2]).await?;
    let array = cont.array_open(a[3].parse()?).await?;
    // No age limit: only whole units and the explicit flush are sent.
    let cfg = WriteBack { max_age: std::time::Duration::from_secs(3600), ..WriteBack::default() };
    let w = array.writer(cfg);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = std::io::stdout();
    for pass in 1..=passes {
        let last = pass == passes;
        let byte = if pass == 1 { byte_b } else { byte_c };
        let mut at = start;
        let mut flushed = false;
        while at < end {
            let n = rng.random_range(1..=300_000u64).min(end - at);
            let data: Vec<u8> = (at..at + n).map(byte).collect();
            w.write(at, Bytes::from(data)).await?;
            at += n;
            if !last {
                continue;
            }
            writeln!(out, "wrote {at}")?;
            if !flushed && at - start >= flush_at {
                w.flush().await?;
                flushed = true;
                writeln!(out, "flushed {at}")?;
            }
            out.flush()?;
        }
    }
    writeln!(out, "done")?;
    out.flush()?;
    // Keeps its buffer (and the process) until killed.
    std::future::pending::<()>().await;
    drop(w);
    Ok(())
}
