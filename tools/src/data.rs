//! `shoal kv|array`: data commands. Objects are named by OID (`HI.LO`) or
//! by a name kept in the container's name index; writing to a new name
//! creates the object and records the name.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use shoal_client::{Array, Container, Kv};
use shoal_common::oclass::{oid_type, ObjType, ObjectClass};

use crate::{out, Ctx};

/// Bytes moved per array call by the CLI.
const PIECE: usize = 8 << 20;

#[derive(Debug, Subcommand)]
pub enum KvCmd {
    /// Stores VALUE (or stdin with "-") under KEY; creates the KV object on
    /// first use of its name.
    Put {
        pool: String,
        cont: String,
        kv: String,
        key: String,
        value: String,
        /// Object class for a new KV object (default: the container's choice).
        #[arg(long)]
        oclass: Option<String>,
    },
    /// Prints the value under KEY.
    Get { pool: String, cont: String, kv: String, key: String },
    /// Removes KEY.
    Rm { pool: String, cont: String, kv: String, key: String },
    /// Lists the keys.
    Ls { pool: String, cont: String, kv: String },
}

#[derive(Debug, Subcommand)]
pub enum ArrayCmd {
    /// Writes FILE (or stdin) into the array; creates it on first use of
    /// its name.
    Write {
        pool: String,
        cont: String,
        obj: String,
        file: Option<PathBuf>,
        /// Byte offset to write at.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Object class for a new array (default: the container's choice).
        #[arg(long)]
        oclass: Option<String>,
        /// Chunk size for a new array (default: the container's).
        #[arg(long, value_parser = out::parse_size)]
        chunk_size: Option<u64>,
        /// EC cell size for a new array (default: the container's).
        #[arg(long, value_parser = out::parse_size)]
        cell_size: Option<u64>,
    },
    /// Reads the array into FILE (or stdout).
    Read {
        pool: String,
        cont: String,
        obj: String,
        file: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to read (default: to the end).
        #[arg(long)]
        len: Option<u64>,
    },
    /// The array's id, class, chunk size, size and layout.
    Stat { pool: String, cont: String, obj: String },
}

async fn open_cont(ctx: &Ctx, pool: &str, cont: &str) -> anyhow::Result<Container> {
    let client = ctx.client().await?;
    let pool = client.pool_connect(pool).await?;
    Ok(pool.cont_open(cont).await?)
}

fn parse_class(c: &Option<String>) -> anyhow::Result<Option<ObjectClass>> {
    c.as_deref().map(|s| s.parse::<ObjectClass>().map_err(|e| anyhow::anyhow!("--oclass: {e}"))).transpose()
}

/// Finds a KV object by OID or name; with `create`, makes a new one for an
/// unknown name.
async fn find_kv(cont: &Container, name: &str, create: Option<Option<ObjectClass>>) -> anyhow::Result<Kv> {
    if let Some(oid) = cont.resolve(name).await? {
        if oid_type(oid) != Some(ObjType::Kv) {
            bail!("{name} ({oid}) is not a KV object");
        }
        return Ok(cont.kv_open(oid).await?);
    }
    match create {
        Some(class) => {
            let kv = cont.kv_create(class).await?;
            cont.name_put(name, kv.oid()).await?;
            Ok(kv)
        }
        None => bail!("no KV object is named or identified {name:?} in container {}", cont.info().label),
    }
}

async fn find_array(cont: &Container, name: &str) -> anyhow::Result<Option<Array>> {
    match cont.resolve(name).await? {
        Some(oid) => {
            if oid_type(oid) != Some(ObjType::Array) {
                bail!("{name} ({oid}) is not an array");
            }
            Ok(Some(cont.array_open(oid).await?))
        }
        None => Ok(None),
    }
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

pub async fn kv(ctx: &Ctx, cmd: KvCmd) -> anyhow::Result<()> {
    match cmd {
        KvCmd::Put { pool, cont, kv, key, value, oclass } => {
            let cont = open_cont(ctx, &pool, &cont).await?;
            let kv = find_kv(&cont, &kv, Some(parse_class(&oclass)?)).await?;
            let value = if value == "-" {
                let mut v = Vec::new();
                std::io::stdin().read_to_end(&mut v)?;
                v
            } else {
                value.into_bytes()
            };
            kv.put(key.as_bytes(), Bytes::from(value)).await?;
        }
        KvCmd::Get { pool, cont, kv, key } => {
            let cont = open_cont(ctx, &pool, &cont).await?;
            let kv = find_kv(&cont, &kv, None).await?;
            match kv.get(key.as_bytes()).await? {
                Some(v) => std::io::stdout().write_all(&v)?,
                None => bail!("no key {key:?} in {}", kv.oid()),
            }
        }
        KvCmd::Rm { pool, cont, kv, key } => {
            let cont = open_cont(ctx, &pool, &cont).await?;
            find_kv(&cont, &kv, None).await?.remove(key.as_bytes()).await?;
        }
        KvCmd::Ls { pool, cont, kv } => {
            let cont = open_cont(ctx, &pool, &cont).await?;
            let keys = find_kv(&cont, &kv, None).await?.list().await?;
            let keys: Vec<String> = keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
            if ctx.json {
                return out::json(&keys);
            }
            for k in keys {
                println!("{k}");
            }
        }
    }
    Ok(())
}

pub async fn array(ctx: &Ctx, cmd: ArrayCmd) -> anyhow::Result<()> {
    match cmd {
        ArrayCmd::Write { pool, cont, obj, file, offset, oclass, chunk_size, cell_size } => {
            let cont = open_cont(ctx, &pool, &cont).await?;
            let array = match find_array(&cont, &obj).await? {
                Some(a) => a,
                None => {
                    let a = cont.array_create_with(parse_class(&oclass)?, chunk_size, cell_size).await?;
                    cont.name_put(&obj, a.oid()).await?;
                    a
                }
            };
            let (mut input, len): (Box<dyn Read>, Option<u64>) = match &file {
                Some(p) => {
                    let f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
                    let len = f.metadata()?.len();
                    (Box::new(f), Some(len))
                }
                None => (Box::new(std::io::stdin()), None),
            };
            let pb = progress(len.unwrap_or(0), "write");
            let mut at = offset;
            loop {
                let mut buf = vec![0u8; PIECE];
                let mut n = 0;
                while n < PIECE {
                    let r = input.read(&mut buf[n..])?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                array.write(at, Bytes::from(buf)).await?;
                at += n as u64;
                pb.inc(n as u64);
            }
            pb.finish_and_clear();
            if !ctx.json {
                eprintln!("wrote {} to {} ({})", out::size(at - offset), obj, array.oid());
            }
        }
        ArrayCmd::Read { pool, cont, obj, file, offset, len } => {
            let cont = open_cont(ctx, &pool, &cont).await?;
            let array = find_array(&cont, &obj)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no array is named or identified {obj:?}"))?;
            let size = array.size().await?;
            let end = match len {
                Some(l) => offset.saturating_add(l).min(size),
                None => size,
            };
            let mut output: Box<dyn Write> = match &file {
                Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?),
                None => Box::new(std::io::stdout().lock()),
            };
            let pb = progress(end.saturating_sub(offset), "read");
            let mut at = offset;
            while at < end {
                let n = (end - at).min(PIECE as u64);
                let data = array.read(at, n).await?;
                output.write_all(&data)?;
                at += n;
                pb.inc(n);
            }
            output.flush()?;
            pb.finish_and_clear();
        }
        ArrayCmd::Stat { pool, cont, obj } => {
            let cont = open_cont(ctx, &pool, &cont).await?;
            let array = find_array(&cont, &obj)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no array is named or identified {obj:?}"))?;
            #[derive(Serialize)]
            struct Stat {
                oid: String,
                class: String,
                chunk_size: u64,
                cell_size: Option<u64>,
                size: u64,
                groups: usize,
                shards_per_group: usize,
            }
            let layout = array.object().layout()?;
            let st = Stat {
                oid: array.oid().to_string(),
                class: array.object().class().to_string(),
                chunk_size: array.chunk_size(),
                cell_size: array.object().ec_geometry().map(|g| g.2),
                size: array.size().await?,
                groups: layout.groups.len(),
                shards_per_group: layout.groups.first().map_or(0, Vec::len),
            };
            if ctx.json {
                return out::json(&st);
            }
            let mut t = out::table(&["property", "value"]);
            t.add_row(vec!["oid".to_string(), st.oid]);
            t.add_row(vec!["class".to_string(), st.class]);
            t.add_row(vec!["chunk size".to_string(), out::size(st.chunk_size)]);
            if let Some(c) = st.cell_size {
                t.add_row(vec!["EC cell size".to_string(), out::size(c)]);
            }
            t.add_row(vec!["size".to_string(), format!("{} ({} bytes)", out::size(st.size), st.size)]);
            t.add_row(vec!["layout".to_string(), format!("{} groups of {} shards", st.groups, st.shards_per_group)]);
            println!("{t}");
        }
    }
    Ok(())
}
