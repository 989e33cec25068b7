//! Erasure coding behind a small codec trait.
//!
//! A stripe is `k` data cells and `p` parity cells of equal size. The
//! client encodes full stripes before it writes them and reconstructs data
//! cells from any `k` surviving cells when a shard is unreachable; servers
//! reconstruct lost cells when they rebuild. Pure computation: the codec
//! works byte position by byte position across the cells, so any byte
//! range at the same offsets of the k + p shard extents decodes.
//!
//! # Examples
//!
//! ```
//! use shoal_common::ec::codec;
//!
//! let c = codec(2, 1)?;
//! let parity = c.encode(&[&b"abcd"[..], &b"efgh"[..]])?;
//! // The first data cell's shard is down: rebuild it from the other two.
//! let mut cells = vec![None, Some(b"efgh".to_vec()), Some(parity[0].clone())];
//! c.reconstruct(&mut cells)?;
//! assert_eq!(cells[0].as_deref(), Some(&b"abcd"[..]));
//! # Ok::<(), shoal_common::ShoalError>(())
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::{Result, ShoalError};
use reed_solomon_erasure::galois_8::ReedSolomon;

/// An erasure codec for one (k, p) geometry.
///
/// # Examples
///
/// ```
/// use shoal_common::ec::{codec, Codec};
///
/// /// Bytes stored per data byte.
/// fn overhead(c: &dyn Codec) -> f64 {
///     (c.data_cells() + c.parity_cells()) as f64 / c.data_cells() as f64
/// }
///
/// assert_eq!(overhead(&*codec(4, 2)?), 1.5);
/// assert_eq!(overhead(&*codec(8, 2)?), 1.25);
/// # Ok::<(), shoal_common::ShoalError>(())
/// ```
pub trait Codec: Send + Sync {
    /// Data cells per stripe.
    ///
    /// # Examples
    ///
    /// ```
    /// use shoal_common::ec::{Codec, RsCodec};
    ///
    /// assert_eq!(RsCodec::new(8, 3)?.data_cells(), 8);
    /// # Ok::<(), shoal_common::ShoalError>(())
    /// ```
    fn data_cells(&self) -> usize;
    /// Parity cells per stripe.
    ///
    /// # Examples
    ///
    /// ```
    /// use shoal_common::ec::{Codec, RsCodec};
    ///
    /// assert_eq!(RsCodec::new(8, 3)?.parity_cells(), 3);
    /// # Ok::<(), shoal_common::ShoalError>(())
    /// ```
    fn parity_cells(&self) -> usize;
    /// Computes the parity cells of one stripe; every cell has one length.
    ///
    /// # Examples
    ///
    /// ```
    /// use shoal_common::ec::codec;
    ///
    /// let c = codec(4, 2)?;
    /// let cells = [[1u8; 64], [2; 64], [3; 64], [4; 64]];
    /// let data: Vec<&[u8]> = cells.iter().map(|c| &c[..]).collect();
    /// let parity = c.encode(&data)?;
    /// assert_eq!(parity.len(), 2);
    /// assert!(parity.iter().all(|p| p.len() == 64));
    /// # Ok::<(), shoal_common::ShoalError>(())
    /// ```
    fn encode(&self, data: &[&[u8]]) -> Result<Vec<Vec<u8>>>;
    /// Fills in the missing data cells of `cells` (k data then p parity,
    /// `None` where missing) from any `k` present ones.
    ///
    /// # Examples
    ///
    /// ```
    /// use shoal_common::ec::codec;
    ///
    /// let c = codec(4, 2)?;
    /// let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 64]).collect();
    /// let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    /// let parity = c.encode(&refs)?;
    ///
    /// // Lose a data cell and a parity cell; any 4 of the 6 rebuild the data.
    /// let mut cells: Vec<Option<Vec<u8>>> = data.iter().chain(&parity).cloned().map(Some).collect();
    /// cells[1] = None;
    /// cells[4] = None;
    /// c.reconstruct(&mut cells)?;
    /// assert_eq!(cells[1].as_deref(), Some(&data[1][..]));
    ///
    /// // With fewer than 4 cells left there is nothing to rebuild from.
    /// let mut too_few = vec![None, None, None, Some(data[3].clone()), None, Some(parity[1].clone())];
    /// assert!(c.reconstruct(&mut too_few).is_err());
    /// # Ok::<(), shoal_common::ShoalError>(())
    /// ```
    fn reconstruct(&self, cells: &mut [Option<Vec<u8>>]) -> Result<()>;
}

/// Reed-Solomon over GF(2^8), from the `reed-solomon-erasure` crate.
///
/// # Examples
///
/// ```
/// use shoal_common::ec::{Codec, RsCodec};
///
/// let rs = RsCodec::new(2, 1)?;
/// let parity = rs.encode(&[&[1u8, 2, 3][..], &[4, 5, 6][..]])?;
/// let mut cells = vec![None, Some(vec![4, 5, 6]), Some(parity[0].clone())];
/// rs.reconstruct(&mut cells)?;
/// assert_eq!(cells[0].as_deref(), Some(&[1u8, 2, 3][..]));
/// # Ok::<(), shoal_common::ShoalError>(())
/// ```
pub struct RsCodec {
    rs: ReedSolomon,
}

impl RsCodec {
    /// A codec for `k` data and `p` parity cells.
    ///
    /// # Examples
    ///
    /// ```
    /// use shoal_common::ec::RsCodec;
    ///
    /// let rs = RsCodec::new(4, 2)?;
    /// // A stripe needs at least one data cell.
    /// assert!(RsCodec::new(0, 2).is_err());
    /// # Ok::<(), shoal_common::ShoalError>(())
    /// ```
    pub fn new(k: usize, p: usize) -> Result<RsCodec> {
        let rs = ReedSolomon::new(k, p).map_err(|e| ShoalError::invalid(format!("EC {k}+{p}: {e:?}")))?;
        Ok(RsCodec { rs })
    }
}

impl Codec for RsCodec {
    fn data_cells(&self) -> usize {
        self.rs.data_shard_count()
    }

    fn parity_cells(&self) -> usize {
        self.rs.parity_shard_count()
    }

    fn encode(&self, data: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let len = data.first().map_or(0, |d| d.len());
        let mut parity = vec![vec![0u8; len]; self.parity_cells()];
        self.rs.encode_sep(data, &mut parity).map_err(|e| ShoalError::Internal(format!("EC encode: {e:?}")))?;
        Ok(parity)
    }

    fn reconstruct(&self, cells: &mut [Option<Vec<u8>>]) -> Result<()> {
        let present = cells.iter().filter(|c| c.is_some()).count();
        if present < self.data_cells() {
            return Err(ShoalError::Unreachable(format!(
                "only {present} of the {} cells needed to rebuild the stripe are reachable",
                self.data_cells()
            )));
        }
        self.rs.reconstruct_data(cells).map_err(|e| ShoalError::Internal(format!("EC decode: {e:?}")))
    }
}

/// The shared codec for a geometry, built once per process.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
///
/// use shoal_common::ec::codec;
///
/// let a = codec(4, 2)?;
/// let b = codec(4, 2)?;
/// // One codec per geometry, shared.
/// assert!(Arc::ptr_eq(&a, &b));
/// # Ok::<(), shoal_common::ShoalError>(())
/// ```
pub fn codec(k: u32, p: u32) -> Result<Arc<dyn Codec>> {
    type Cache = Mutex<HashMap<(u32, u32), Arc<dyn Codec>>>;
    static CODECS: OnceLock<Cache> = OnceLock::new();
    let mut map = CODECS.get_or_init(Default::default).lock().expect("codec cache");
    if let Some(c) = map.get(&(k, p)) {
        return Ok(c.clone());
    }
    let c: Arc<dyn Codec> = Arc::new(RsCodec::new(k as usize, p as usize)?);
    map.insert((k, p), c.clone());
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_k_cells_rebuild_the_stripe() {
        let c = codec(4, 2).unwrap();
        let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i * 17 + 1; 64]).collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let parity = c.encode(&refs).unwrap();
        for lost in [(0, 1), (2, 5), (3, 4)] {
            let mut cells: Vec<Option<Vec<u8>>> = data.iter().chain(&parity).cloned().map(Some).collect();
            cells[lost.0] = None;
            cells[lost.1] = None;
            c.reconstruct(&mut cells).unwrap();
            for (i, d) in data.iter().enumerate() {
                assert_eq!(cells[i].as_ref().unwrap(), d);
            }
        }
        let mut cells: Vec<Option<Vec<u8>>> = vec![None, None, None, Some(data[3].clone()), None, None];
        assert!(c.reconstruct(&mut cells).is_err());
    }
}
