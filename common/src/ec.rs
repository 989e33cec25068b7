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

/// The same code as [`RsCodec`] (bit for bit: its parity matrix is read
/// off `RsCodec` by encoding unit vectors), encoded by ISA-L's
/// `ec_encode_data`, which picks the CPU's fastest kernels (AVX2, AVX-512,
/// GFNI) at run time. Reconstruction, rare and off the write path, is
/// `RsCodec`'s.
///
/// # Examples
///
/// ```
/// use shoal_common::ec::{Codec, IsalCodec, RsCodec};
///
/// let data = [&b"abcd"[..], &b"efgh"[..], &b"ijkl"[..], &b"mnop"[..]];
/// let isal = IsalCodec::new(4, 2)?;
/// assert_eq!(isal.encode(&data)?, RsCodec::new(4, 2)?.encode(&data)?);
/// # Ok::<(), shoal_common::ShoalError>(())
/// ```
pub struct IsalCodec {
    rs: RsCodec,
    k: usize,
    p: usize,
    /// ISA-L's expanded tables for the parity rows, 32 * k * p bytes.
    tables: Vec<u8>,
}

impl IsalCodec {
    /// A codec for `k` data and `p` parity cells.
    pub fn new(k: usize, p: usize) -> Result<IsalCodec> {
        let rs = RsCodec::new(k, p)?;
        // Column j of the parity matrix is the parity of the unit vector e_j.
        let mut matrix = vec![0u8; p * k];
        for j in 0..k {
            let unit: Vec<[u8; 1]> = (0..k).map(|i| [u8::from(i == j)]).collect();
            let cells: Vec<&[u8]> = unit.iter().map(|c| &c[..]).collect();
            for (r, cell) in rs.encode(&cells)?.iter().enumerate() {
                matrix[r * k + j] = cell[0];
            }
        }
        let mut tables = vec![0u8; 32 * k * p];
        let (ki, pi) = (c_int(k)?, c_int(p)?);
        // SAFETY: `matrix` holds p rows of k coefficients and `tables` the
        // 32 * k * p bytes ec_init_tables fills.
        unsafe { erasure_isa_l_sys::ec_init_tables(ki, pi, matrix.as_mut_ptr(), tables.as_mut_ptr()) };
        Ok(IsalCodec { rs, k, p, tables })
    }
}

fn c_int(n: usize) -> Result<std::os::raw::c_int> {
    std::os::raw::c_int::try_from(n).map_err(|_| ShoalError::invalid(format!("{n} cells are too many")))
}

impl Codec for IsalCodec {
    fn data_cells(&self) -> usize {
        self.k
    }

    fn parity_cells(&self) -> usize {
        self.p
    }

    fn encode(&self, data: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        if data.len() != self.k {
            return Err(ShoalError::invalid(format!("EC encode: {} data cells, expected {}", data.len(), self.k)));
        }
        let len = data[0].len();
        if data.iter().any(|d| d.len() != len) {
            return Err(ShoalError::invalid("EC encode: data cells of different sizes"));
        }
        let mut parity = vec![vec![0u8; len]; self.p];
        if len == 0 {
            return Ok(parity);
        }
        // ISA-L takes mutable pointers but only reads the data cells.
        let mut src: Vec<*mut u8> = data.iter().map(|d| d.as_ptr().cast_mut()).collect();
        let mut dst: Vec<*mut u8> = parity.iter_mut().map(|c| c.as_mut_ptr()).collect();
        let mut tables = self.tables.clone();
        // SAFETY: k data pointers and p parity pointers, each to `len`
        // bytes that live through the call; the tables were made for (k, p).
        unsafe {
            erasure_isa_l_sys::ec_encode_data(
                c_int(len)?,
                c_int(self.k)?,
                c_int(self.p)?,
                tables.as_mut_ptr(),
                src.as_mut_ptr(),
                dst.as_mut_ptr(),
            )
        };
        Ok(parity)
    }

    fn reconstruct(&self, cells: &mut [Option<Vec<u8>>]) -> Result<()> {
        self.rs.reconstruct(cells)
    }
}

/// Environment variable that picks the encoder: `rs` for
/// reed-solomon-erasure, anything else (or unset) for ISA-L. Both write the
/// same parity; the choice is for measuring one against the other.
pub const CODEC_VAR: &str = "SHOAL_EC_CODEC";

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
    let c: Arc<dyn Codec> = match std::env::var(CODEC_VAR).as_deref() {
        Ok("rs") => Arc::new(RsCodec::new(k as usize, p as usize)?),
        _ => Arc::new(IsalCodec::new(k as usize, p as usize)?),
    };
    map.insert((k, p), c.clone());
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ISA-L and reed-solomon-erasure write the same parity for every code,
    /// so data written by either decodes with the other.
    #[test]
    fn isal_parity_is_reed_solomon_parity_for_every_code() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (k, p) in crate::oclass::EC_CODES {
            let (k, p) = (k as usize, p as usize);
            let (isal, rs) = (IsalCodec::new(k, p).unwrap(), RsCodec::new(k, p).unwrap());
            for len in [1, 31, 4096, 65_537] {
                let data: Vec<Vec<u8>> = (0..k).map(|_| (0..len).map(|_| rng.random()).collect()).collect();
                let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
                assert_eq!(isal.encode(&refs).unwrap(), rs.encode(&refs).unwrap(), "EC {k}+{p}, {len} bytes");
            }
        }
        assert!(IsalCodec::new(4, 2).unwrap().encode(&[&[1u8][..], &[2u8][..]]).is_err());
        assert!(IsalCodec::new(2, 1).unwrap().encode(&[&[1u8, 2][..], &[2u8][..]]).is_err());
    }

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
