//! Reads of erasure-coded extents.
//!
//! Cell `j` of stripe `s` lives on shard `j` of the dkey's group at bytes
//! `[s*cell, (s+1)*cell)` of that shard's extent; parity cells on shards
//! `k..k+p`. Every cell comes back with its version: the epoch of the write
//! that stored it, or of the punch that removed it (punched cells read as
//! zeros at the punch's epoch, never as "nothing": a punch that reached
//! only some cells must not make an older stripe look newest).
//!
//! A stripe is read whole at one version:
//! - When the k data cells carry one version, they are the stripe.
//! - Otherwise (a shard is unreachable or returned a bad checksum, or the
//!   cells disagree because a write is in flight or failed part-way) the
//!   parity cells are read too and the stripe is decoded from the newest
//!   version that at least k of the k + p cells carry.
//! - When no version has k cells, the newest write reached fewer than k
//!   cells: it is still in flight, or it failed and was never acknowledged.
//!   After a few tries the stripe is read as of just before that version,
//!   which gives the last complete stripe, never an older one: a version
//!   with k cells is never skipped, because only versions newer than the
//!   one chosen are ignored.
//! - Fewer than k cells reachable: a clear error naming the shards.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use shoal_common::limits::{MAX_BODY, MAX_IODS};
use shoal_common::msg::{FetchIod, Fetched, ValueKind};
use shoal_common::placement::Shard;
use shoal_common::{Epoch, Result, ShoalError, EPOCH_MAX};

use crate::object::{checked, shard_down, with_shard, Object, MAX_SHARD_REQUEST};
use crate::system::PoolState;
use shoal_common::ec::codec;

/// Attempts to read a stripe whose cells disagree on their version.
const TORN_RETRIES: u32 = 20;
/// Attempts after which a stripe whose newest write reached fewer than k
/// cells is read as it was before that write.
const OLDER_AFTER: u32 = 3;

/// Stripes one request to a shard covers: one cell each, within the byte,
/// descriptor and body caps (the body grows with the akey's length).
pub(crate) fn stripes_per_request(cell: u64, akey: &[u8]) -> u64 {
    let per_iod = akey.len() as u64 + 48;
    let by_body = (MAX_BODY as u64 / 2) / per_iod;
    (MAX_SHARD_REQUEST / cell).min(MAX_IODS as u64).min(by_body).max(1)
}

/// One shard's cells of a run of stripes: (version, bytes) per stripe.
pub(crate) type StripeCells = Vec<(Epoch, Bytes)>;

/// Keeps per-shard results whose errors mean the cell is lost (out of
/// reach, or unreadable on that shard: a decode makes up for it) and
/// returns any other error, such as a stale map, at once.
fn usable<T>(results: Vec<Result<T>>) -> Result<Vec<Result<T>>> {
    let lost = |e: &ShoalError| {
        shard_down(e) || matches!(e, ShoalError::Checksum(_) | ShoalError::Damaged(_) | ShoalError::Io(_))
    };
    if let Some(Err(e)) = results.iter().find(|r| matches!(r, Err(e) if !lost(e))) {
        return Err(e.clone());
    }
    Ok(results)
}

/// A partial stripe as read for a read-modify-write: its data, the version
/// each shard holds (what the rewrite's conditions expect), and the newest
/// of them (the rewrite's epoch must be past it).
pub(crate) struct RmwBase {
    pub data: Bytes,
    /// Per shard, the version it holds (`None`: it could not be read; its
    /// rewrite is unconditional, and the conditions on the others protect
    /// the stripe).
    pub expected: Vec<Option<Epoch>>,
    pub newest: Epoch,
}

impl Object {
    /// Fetches shard `j`'s cells of stripes `[s0, s1)` as of `epoch`.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_cells(
        &self,
        st: &PoolState,
        group: &[Shard],
        j: usize,
        cell: u64,
        dkey: &[u8],
        akey: &[u8],
        s0: u64,
        s1: u64,
        epoch: Epoch,
    ) -> Result<StripeCells> {
        let n = (s1 - s0) as usize;
        let iods: Vec<FetchIod> = (s0..s1)
            .map(|s| FetchIod {
                akey: akey.to_vec(),
                kind: ValueKind::Array { rec_size: 1, start: s * cell, nr: cell },
            })
            .collect();
        let req = self.fetch_req(st, &group[j], dkey, epoch, iods);
        let (r, segs) = self.rpc(st, &group[j], &req, vec![]).await?;
        let values = checked(self, r, &segs, n).map_err(|e| with_shard(e, &group[j]))?;
        let zeros = || Bytes::from(vec![0u8; cell as usize]);
        values
            .into_iter()
            .zip(segs)
            .map(|(f, b)| match f {
                Fetched::Array { epoch, .. } if b.len() as u64 == cell => Ok((epoch, b)),
                Fetched::Punched { epoch } => Ok((epoch, zeros())),
                Fetched::Missing => Ok((0, zeros())),
                other => Err(ShoalError::protocol(format!("a shard answered {other:?} for a {cell}-byte cell"))),
            })
            .collect()
    }

    /// Reads whole stripes `[s0, s1)`: each as `k * cell` data bytes (see
    /// the module docs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn ec_read_stripes(
        &self,
        st: &PoolState,
        group: &[Shard],
        geo: (u32, u32, u64),
        dkey: &[u8],
        akey: &[u8],
        s0: u64,
        s1: u64,
        epoch: Epoch,
    ) -> Result<Vec<Bytes>> {
        let (k, p, cell) = geo;
        let (k, n) = (k as usize, (k + p) as usize);
        let fetch = |j: usize| self.fetch_cells(st, group, j, cell, dkey, akey, s0, s1, epoch);
        let mut attempt = 0;
        loop {
            let data_cells = usable(join_all((0..k).map(fetch)).await)?;
            let mut parity_cells: Option<Vec<Result<StripeCells>>> = None;
            let mut out = Vec::with_capacity((s1 - s0) as usize);
            let mut torn = false;
            for (i, _) in (s0..s1).enumerate() {
                let present: Vec<Option<&(Epoch, Bytes)>> =
                    data_cells.iter().map(|r| r.as_ref().ok().map(|v| &v[i])).collect();
                let e0 = present[0].map(|c| c.0);
                if present.iter().all(|c| c.is_some() && c.map(|c| c.0) == e0) {
                    let mut stripe = BytesMut::with_capacity(k * cell as usize);
                    for c in present.iter().flatten() {
                        stripe.extend_from_slice(&c.1);
                    }
                    out.push(stripe.freeze());
                    continue;
                }
                if parity_cells.is_none() {
                    parity_cells = Some(usable(join_all((k..n).map(fetch)).await)?);
                }
                let parity = parity_cells.as_ref().expect("fetched above");
                let cells: Vec<Option<(Epoch, Bytes)>> =
                    data_cells.iter().chain(parity.iter()).map(|r| r.as_ref().ok().map(|v| v[i].clone())).collect();
                match decode_newest(cells.clone(), k, p).await? {
                    Some(stripe) => out.push(stripe),
                    None if cells.iter().flatten().count() >= k => {
                        if attempt < OLDER_AFTER {
                            torn = true;
                            break;
                        }
                        // The newest version never reached k cells (it is
                        // in flight, or it failed and was never
                        // acknowledged): read the stripe as it was before it.
                        let newest = cells.iter().flatten().map(|c| c.0).max().unwrap_or(0);
                        let s = s0 + i as u64;
                        let older =
                            Box::pin(self.ec_read_stripes(st, group, geo, dkey, akey, s, s + 1, newest - 1)).await?;
                        out.extend(older);
                    }
                    None => {
                        let why: Vec<String> = data_cells
                            .iter()
                            .chain(parity.iter())
                            .filter_map(|r| r.as_ref().err().map(ToString::to_string))
                            .collect();
                        return Err(ShoalError::Unreachable(format!(
                            "object {}: stripe {} of dkey {:?} has fewer than {k} readable cells: {}",
                            self.oid(),
                            s0 + i as u64,
                            String::from_utf8_lossy(dkey),
                            why.join("; ")
                        )));
                    }
                }
            }
            if !torn {
                return Ok(out);
            }
            attempt += 1;
            if attempt >= TORN_RETRIES {
                return Err(ShoalError::Busy(format!(
                    "object {}: a stripe of dkey {:?} is being rewritten (its cells disagree); try again",
                    self.oid(),
                    String::from_utf8_lossy(dkey)
                )));
            }
            tokio::time::sleep(Duration::from_millis(5 * attempt as u64)).await;
        }
    }

    /// Reads stripe `s` for a read-modify-write: every cell, so that the
    /// rewrite can expect what each shard holds now.
    pub(crate) async fn read_for_rmw(
        &self,
        st: &PoolState,
        group: &[Shard],
        geo: (u32, u32, u64),
        dkey: &[u8],
        akey: &[u8],
        s: u64,
    ) -> Result<RmwBase> {
        let (k, p, cell) = geo;
        let n = (k + p) as usize;
        let fetched =
            join_all((0..n).map(|j| self.fetch_cells(st, group, j, cell, dkey, akey, s, s + 1, EPOCH_MAX))).await;
        let mut cells = Vec::with_capacity(n);
        let mut out = Vec::new();
        for r in fetched {
            match r {
                Ok(mut v) => cells.push(Some(v.remove(0))),
                // A shard out of reach (down, or a spare being rebuilt):
                // the stripe decodes from the others, within rd_fac.
                Err(e) if shard_down(&e) || matches!(e, ShoalError::Checksum(_) | ShoalError::Damaged(_)) => {
                    out.push(e.to_string());
                    cells.push(None);
                }
                Err(e) => return Err(e),
            }
        }
        if out.len() > self.spare_shards() {
            return Err(ShoalError::Unreachable(format!(
                "object {}: {} shards of stripe {s} of dkey {:?} are out of reach and the container survives only {}: {}",
                self.oid(),
                out.len(),
                String::from_utf8_lossy(dkey),
                self.spare_shards(),
                out.join("; ")
            )));
        }
        let expected: Vec<Option<Epoch>> = cells.iter().map(|c| c.as_ref().map(|c| c.0)).collect();
        let newest = expected.iter().flatten().copied().max().unwrap_or(0);
        let data = match decode_newest(cells.clone(), k as usize, p).await? {
            Some(d) => d,
            // No version has k cells: the stripe as it was before the
            // newest (failed or in-flight) write. If that write completes
            // meanwhile, the rewrite's conditions catch it.
            None => self
                .ec_read_stripes(st, group, geo, dkey, akey, s, s + 1, newest - 1)
                .await?
                .pop()
                .ok_or_else(|| ShoalError::Internal("a one-stripe read returned nothing".into()))?,
        };
        Ok(RmwBase { data, expected, newest })
    }
}

/// Stripes at least this large are decoded off the async worker threads.
const DECODE_OFF_WORKER: usize = 256 << 10;

/// [`decode_stripe`], on a blocking thread when it has to reconstruct a
/// large stripe (the cells are reference counted: nothing is copied to
/// get there).
async fn decode_newest(cells: Vec<Option<(Epoch, Bytes)>>, k: usize, p: u32) -> Result<Option<Bytes>> {
    let cell = cells.iter().flatten().map(|c| c.1.len()).next().unwrap_or(0);
    // All data cells of one version: a concatenation, done here.
    let first = cells[0].as_ref().map(|c| c.0);
    let whole = first.is_some() && cells[..k].iter().all(|c| c.as_ref().map(|c| c.0) == first);
    if whole || cell * k < DECODE_OFF_WORKER {
        return decode_stripe(&cells, k, p);
    }
    tokio::task::spawn_blocking(move || decode_stripe(&cells, k, p))
        .await
        .map_err(|e| ShoalError::Internal(format!("EC decode task: {e}")))?
}

/// Decodes a stripe from the newest version that at least k of its cells
/// carry; `None` when no version has k cells.
fn decode_stripe(cells: &[Option<(Epoch, Bytes)>], k: usize, p: u32) -> Result<Option<Bytes>> {
    let mut epochs: Vec<Epoch> = cells.iter().flatten().map(|c| c.0).collect();
    epochs.sort_unstable_by(|a, b| b.cmp(a));
    let Some(e) = epochs.iter().copied().find(|e| epochs.iter().filter(|x| *x == e).count() >= k) else {
        return Ok(None);
    };
    let cell = cells.iter().flatten().map(|c| c.1.len()).next().unwrap_or(0);
    let mut stripe = BytesMut::with_capacity(k * cell);
    if cells[..k].iter().all(|c| matches!(c, Some((ce, _)) if *ce == e)) {
        for c in cells[..k].iter().flatten() {
            stripe.extend_from_slice(&c.1);
        }
        return Ok(Some(stripe.freeze()));
    }
    let mut shards: Vec<Option<Vec<u8>>> =
        cells.iter().map(|c| c.as_ref().and_then(|(ce, d)| (*ce == e).then(|| d.to_vec()))).collect();
    codec(k as u32, p)?.reconstruct(&mut shards)?;
    for c in shards.iter().take(k).flatten() {
        stripe.extend_from_slice(c);
    }
    Ok(Some(stripe.freeze()))
}
