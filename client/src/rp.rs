//! Reads of replicated values (and of the copies that S and EC classes
//! keep of single values): the first replica that answers well wins.
//!
//! Any error of one replica other than a stale pool map (which needs a
//! refresh, not another replica) sends the read on to the next replica: an
//! unreachable server, a poisoned target, a bad sector (`Io`), a value that
//! fails its checksum on the server or on the way (`Checksum`, counted in
//! [`crate::system::ClientStats`]). Only when every replica failed does the
//! read fail, naming what each one said.

use bytes::{Bytes, BytesMut};
use shoal_common::msg::{FetchIod, Fetched, ValueKind};
use shoal_common::placement::Shard;
use shoal_common::{Epoch, Oid, Result, ShoalError};

use crate::object::{checked, Object, MAX_SHARD_REQUEST};
use crate::system::PoolState;

/// Whether a read that failed on one replica should try the next.
pub(crate) fn try_next(e: &ShoalError) -> bool {
    !matches!(e, ShoalError::StaleMap { .. })
}

/// The error of a read that failed on every replica.
pub(crate) fn no_copy(oid: Oid, what: &str, errors: Vec<ShoalError>) -> ShoalError {
    let why: Vec<String> = errors.iter().map(ToString::to_string).collect();
    // Unreachable replicas make the whole read "unreachable" (retryable);
    // otherwise the replicas' own error kind is kept.
    match errors.iter().find(|e| !crate::object::shard_down(e)) {
        Some(ShoalError::Checksum(_)) if errors.iter().all(|e| matches!(e, ShoalError::Checksum(_))) => {
            ShoalError::Checksum(format!("object {oid}: no replica could {what}: {}", why.join("; ")))
        }
        Some(ShoalError::Damaged(_)) => {
            ShoalError::Damaged(format!("object {oid}: no replica could {what}: {}", why.join("; ")))
        }
        Some(ShoalError::NotFound { what, message })
            if errors.iter().all(|e| matches!(e, ShoalError::NotFound { .. })) =>
        {
            ShoalError::not_found(*what, message.clone())
        }
        Some(ShoalError::InvalidArgument(m)) => ShoalError::InvalidArgument(m.clone()),
        Some(ShoalError::Io(_)) if errors.iter().all(|e| matches!(e, ShoalError::Io(_))) => {
            ShoalError::Io(format!("object {oid}: no replica could {what}: {}", why.join("; ")))
        }
        _ => ShoalError::Unreachable(format!("object {oid}: no replica could {what}: {}", why.join("; "))),
    }
}

impl Object {
    /// Fetches `iods` under `dkey` from the first of `shards` that answers
    /// with good checksums.
    pub(crate) async fn fetch_any(
        &self,
        st: &PoolState,
        shards: &[Shard],
        dkey: &[u8],
        epoch: Epoch,
        iods: Vec<FetchIod>,
    ) -> Result<(Vec<Fetched>, Vec<Bytes>)> {
        let mut errors = Vec::new();
        // A reply damaged on the way (its checksum fails here, not on the
        // server) is worth one more round over the replicas.
        for round in 0..2 {
            let mut damaged = false;
            for s in shards {
                let req = self.fetch_req(st, s, dkey, epoch, iods.clone());
                let r = async {
                    let (r, segs) = self.rpc(st, s, &req, vec![]).await?;
                    checked(self, r, &segs, iods.len()).map(|values| (values, segs)).map_err(|e| {
                        damaged |= matches!(e, ShoalError::Damaged(_));
                        crate::object::with_shard(e, s)
                    })
                }
                .await;
                match r {
                    Ok(v) => return Ok(v),
                    Err(e) if !try_next(&e) => return Err(e),
                    Err(e) => errors.push(e),
                }
            }
            if !damaged || round == 1 {
                break;
            }
        }
        Err(no_copy(self.oid(), &format!("read dkey {:?}", String::from_utf8_lossy(dkey)), errors))
    }

    /// Reads `len` bytes at `offset` of a replicated array value.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn read_replicated(
        &self,
        st: &PoolState,
        shards: &[Shard],
        dkey: &[u8],
        akey: &[u8],
        offset: u64,
        len: u64,
        epoch: Epoch,
    ) -> Result<Bytes> {
        let mut out = BytesMut::with_capacity(len as usize);
        while (out.len() as u64) < len {
            let at = offset + out.len() as u64;
            let n = (len - out.len() as u64).min(MAX_SHARD_REQUEST);
            let kind = ValueKind::Array { rec_size: 1, start: at, nr: n };
            let (values, mut segs) =
                self.fetch_any(st, shards, dkey, epoch, vec![FetchIod { akey: akey.to_vec(), kind }]).await?;
            let data = match values.first() {
                Some(Fetched::Array { .. }) => segs.pop().unwrap_or_default(),
                _ => Bytes::new(),
            };
            if data.is_empty() {
                out.resize(out.len() + n as usize, 0);
            } else if data.len() as u64 == n {
                out.extend_from_slice(&data);
            } else {
                return Err(ShoalError::protocol(format!("a shard returned {} bytes for a {n}-byte read", data.len())));
            }
        }
        Ok(out.freeze())
    }
}
