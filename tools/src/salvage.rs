//! `shoal cont check --salvage`: copies what can still be read of a
//! container into a new one.

use bytes::Bytes;
use serde::Serialize;
use shoal_client::system::ContCheck;
use shoal_client::{Container, Pool};
use shoal_common::oclass::{oid_class, oid_type, ObjType};
use shoal_common::Oid;

/// What a salvage copied.
#[derive(Debug, Default, Serialize)]
pub struct Salvaged {
    /// Objects copied whole.
    pub whole: u64,
    /// Objects copied in part, and what was missing.
    pub partial: Vec<(String, String)>,
    /// Objects not copied, and why.
    pub lost: Vec<(String, String)>,
    /// Names recreated for copied objects.
    pub names: u64,
}

/// Copies the arrays and KV objects `report` found in `from` into a new
/// container `to` (same properties), keeping the names of those copied.
pub async fn salvage(pool: &Pool, from: &Container, report: &ContCheck, to: &str) -> anyhow::Result<Salvaged> {
    let props = from.info().props.clone();
    pool.cont_create(to, props).await?;
    let dest = pool.cont_open(to).await?;
    let index = from.names()?.oid();
    let mut out = Salvaged::default();
    let mut moved: Vec<(Oid, Oid)> = Vec::new();
    for &oid in &report.found {
        if oid == index {
            continue;
        }
        let r = match oid_type(oid) {
            Some(ObjType::Array) => copy_array(from, &dest, oid).await,
            Some(ObjType::Kv) => copy_kv(from, &dest, oid).await,
            _ => Err(anyhow::anyhow!("not an array or a KV object; salvage copies only those")),
        };
        match r {
            Ok((new, None)) => {
                out.whole += 1;
                moved.push((oid, new));
            }
            Ok((new, Some(missing))) => {
                out.partial.push((oid.to_string(), missing));
                moved.push((oid, new));
            }
            Err(e) => out.lost.push((oid.to_string(), format!("{e:#}"))),
        }
    }
    for (name, oid) in &report.names {
        if let Some((_, new)) = moved.iter().find(|(o, _)| o == oid) {
            match dest.name_put(name, *new).await {
                Ok(()) => out.names += 1,
                Err(e) => out.lost.push((format!("name {name}"), format!("cannot be recorded: {e}"))),
            }
        }
    }
    Ok(out)
}

/// Copies an array chunk by chunk; chunks that cannot be read stay holes.
async fn copy_array(from: &Container, to: &Container, oid: Oid) -> anyhow::Result<(Oid, Option<String>)> {
    let a = from.array_open(oid).await?;
    let size = a.size().await?;
    let cell = a.object().ec_geometry().map(|g| g.2);
    let b = to.array_create_with(oid_class(oid), Some(a.chunk_size()), cell).await?;
    let mut lost = 0u64;
    let mut at = 0;
    while at < size {
        let n = a.chunk_size().min(size - at);
        match a.read(at, n).await {
            Ok(data) if data.is_empty() => break,
            Ok(data) => {
                b.write(at, data).await?;
            }
            Err(_) => lost += n,
        }
        at += n;
    }
    if size > 0 {
        // The size, even if the last chunk was lost.
        b.set_size(size).await?;
    }
    Ok((b.oid(), (lost > 0).then(|| format!("{lost} of {size} bytes could not be read (left as holes)"))))
}

/// Copies a KV object key by key.
async fn copy_kv(from: &Container, to: &Container, oid: Oid) -> anyhow::Result<(Oid, Option<String>)> {
    let a = from.kv_open(oid).await?;
    let keys = a.list().await?;
    let b = to.kv_create(oid_class(oid)).await?;
    let mut lost = 0;
    for k in &keys {
        match a.get(k).await {
            Ok(Some(v)) => {
                b.put(k, Bytes::from(v.to_vec())).await?;
            }
            Ok(None) => {}
            Err(_) => lost += 1,
        }
    }
    Ok((b.oid(), (lost > 0).then(|| format!("{lost} of {} keys could not be read", keys.len()))))
}
