//! The array API: a byte array of any size, cut into chunks.
//!
//! Chunk `c` is dkey `c` (8 bytes, big-endian), so chunks spread over the
//! object's groups; its bytes are the extent under akey `data`. For EC
//! classes the chunk size is rounded up to a whole number of stripes
//! (k x cell), so a chunk-aligned write never pays for read-modify-write.
//! The array's metadata lives under dkey `meta` (4 bytes, so it never
//! collides with a chunk): akey `chunk` holds the chunk size, akey `cell`
//! the EC cell size, akey `size` the size, raised atomically by every write
//! (max), lowered only by `set_size`.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> shoal_common::Result<()> {
//! # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
//! # let cont = client.pool_connect("tank").await?.cont_open("data").await?;
//! use bytes::Bytes;
//!
//! let array = cont.array_create(None, None).await?;
//! array.write(0, Bytes::from(vec![1u8; 3 << 20])).await?;
//! assert_eq!(array.size().await?, 3 << 20);
//! let middle = array.read(1 << 20, 4096).await?;
//! array.set_size(1 << 20).await?;
//! # Ok(()) }
//! ```

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use shoal_common::error::Entity;
use shoal_common::{Epoch, Oid, Result, ShoalError, EPOCH_MAX};

use crate::object::Object;

const META: &[u8] = b"meta";
const CHUNK: &[u8] = b"chunk";
const CELL: &[u8] = b"cell";
const SIZE: &[u8] = b"size";
const DATA: &[u8] = b"data";
/// Chunks written or read at once by one call.
const PARALLEL_CHUNKS: usize = 8;
/// Zeros that holes are read from without allocating.
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// `n` zero bytes: slices of one static buffer while they fit.
fn zeros(n: u64) -> Bytes {
    match usize::try_from(n) {
        Ok(n) if n <= ZEROS.len() => Bytes::from_static(&ZEROS[..n]),
        _ => Bytes::from(vec![0; n as usize]),
    }
}

/// An array object.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> shoal_common::Result<()> {
/// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
/// # let pool = client.pool_connect("tank").await?;
/// # let cont = pool.cont_open("data").await?;
/// use bytes::Bytes;
///
/// let array = cont.array_create(None, None).await?;
/// array.write(0, Bytes::from_static(b"hello, world")).await?;
/// assert_eq!(array.size().await?, 12);
/// assert_eq!(&array.read(7, 5).await?[..], b"world");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Array {
    obj: Object,
    chunk: u64,
}

fn u64_of(v: &Bytes, what: &str) -> Result<u64> {
    let b: [u8; 8] = v[..].try_into().map_err(|_| ShoalError::Io(format!("corrupt array {what}")))?;
    Ok(u64::from_le_bytes(b))
}

impl Array {
    /// Creates the array's metadata: the chunk size, aligned to whole
    /// stripes for EC classes. Not cancel safe.
    pub(crate) async fn create(obj: Object, chunk: u64, cell: Option<u64>) -> Result<Array> {
        if chunk == 0 || chunk > 1 << 30 {
            return Err(ShoalError::invalid(format!("chunk size {chunk} must be between 1 byte and 1GiB")));
        }
        let obj = match cell {
            Some(c) => obj.with_cell_size(c)?,
            None => obj,
        };
        // The chunk size and the cell size in one request.
        let mut meta = Vec::with_capacity(2);
        let chunk = match obj.ec_geometry() {
            Some((k, _, cell)) => {
                meta.push((CELL, Bytes::copy_from_slice(&cell.to_le_bytes())));
                chunk.div_ceil(k as u64 * cell) * (k as u64 * cell)
            }
            None => chunk,
        };
        meta.push((CHUNK, Bytes::copy_from_slice(&chunk.to_le_bytes())));
        obj.update_many(META, &meta).await?;
        Ok(Array { obj, chunk })
    }

    /// Opens an existing array. Cancel safe.
    pub(crate) async fn open(obj: Object) -> Result<Array> {
        let chunk = match obj.fetch_single(META, CHUNK, EPOCH_MAX).await? {
            Some(v) => u64_of(&v, "chunk size")?,
            None => return Err(ShoalError::not_found(Entity::Object, format!("object {} is not an array", obj.oid()))),
        };
        if chunk == 0 {
            return Err(ShoalError::Io(format!("array {} has a zero chunk size", obj.oid())));
        }
        let obj = match obj.ec_geometry() {
            Some(_) => match obj.fetch_single(META, CELL, EPOCH_MAX).await? {
                Some(v) => obj.with_cell_size(u64_of(&v, "cell size")?)?,
                // Arrays made before the cell size was recorded use the
                // container's.
                None => obj,
            },
            None => obj,
        };
        Ok(Array { obj, chunk })
    }

    /// The object's id.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// let array = cont.array_create(None, None).await?;
    /// // Remember the array under a name, to open it again later.
    /// cont.name_put("logs", array.oid()).await?;
    /// # Ok(()) }
    /// ```
    pub fn oid(&self) -> Oid {
        self.obj.oid()
    }

    /// The underlying object.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// // Chunk 0 of the array is dkey 0 (8 bytes, big-endian) of the object.
    /// let akeys = array.object().list_akeys(&0u64.to_be_bytes()).await?;
    /// println!("class {}", array.object().class());
    /// # Ok(()) }
    /// ```
    pub fn object(&self) -> &Object {
        &self.obj
    }

    /// The chunk size in bytes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// use bytes::Bytes;
    ///
    /// // Chunk-aligned writes touch whole chunks (and, for EC, whole stripes).
    /// let chunk = array.chunk_size();
    /// array.write(chunk, Bytes::from(vec![1u8; chunk as usize])).await?;
    /// # Ok(()) }
    /// ```
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// The pieces of `[offset, offset + len)`: (chunk, offset in chunk,
    /// offset in the caller's buffer, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> + Send + 'static {
        let chunk = self.chunk;
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let (c, in_chunk) = (at / chunk, at % chunk);
            let n = (chunk - in_chunk).min(end - at);
            let piece = (c, in_chunk, at - offset, n);
            at += n;
            Some(piece)
        })
    }

    /// Writes `data` at `offset`. Chunks go out in parallel; the size grows
    /// to cover the write once the data is durable. Empty `data` is refused
    /// (`InvalidArgument`), as by [`Object::write_extent`]. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// use bytes::Bytes;
    ///
    /// array.write(0, Bytes::from(vec![7u8; 1 << 20])).await?;
    /// // Writing past the end grows the array; the gap reads as zeros.
    /// array.write(10 << 20, Bytes::from_static(b"tail")).await?;
    /// assert_eq!(array.size().await?, (10 << 20) + 4);
    /// # Ok(()) }
    /// ```
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<Epoch> {
        if data.is_empty() {
            // As for `Object::write_extent`: a write stores at least a byte.
            return Err(ShoalError::invalid("an array write needs at least one byte"));
        }
        let end = offset.checked_add(data.len() as u64).ok_or_else(|| ShoalError::invalid("write past 2^64"))?;
        stream::iter(self.pieces(offset, data.len() as u64))
            .map(|(c, in_chunk, at, n)| {
                let piece = data.slice(at as usize..(at + n) as usize);
                async move { self.obj.write_extent(&c.to_be_bytes(), DATA, in_chunk, piece).await }
            })
            .buffer_unordered(PARALLEL_CHUNKS)
            .try_collect::<Vec<_>>()
            .await?;
        self.obj.update_max(META, SIZE, end).await
    }

    /// Reads up to `len` bytes at `offset`, stopping at the array's size;
    /// holes read as zeros. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// let data = array.read(0, 4096).await?;
    /// // A read never goes past the array's size.
    /// let size = array.size().await?;
    /// assert!(array.read(size, 4096).await?.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.read_clamped(offset, len).await
    }

    /// Exactly `len` bytes at `offset`, whatever the array's size says
    /// (holes and bytes past the end read as zeros), without asking for
    /// the size: for callers that keep the size themselves (the POSIX
    /// namespace). Cancel safe.
    pub(crate) async fn read_at(&self, offset: u64, len: u64) -> Result<Bytes> {
        if offset.checked_add(len).is_none() {
            return Err(ShoalError::invalid("a read past 2^64"));
        }
        let parts: Vec<Bytes> = stream::iter(self.pieces(offset, len))
            .map(|(c, in_chunk, _, n)| async move {
                self.obj.read_extent(&c.to_be_bytes(), DATA, in_chunk, n, EPOCH_MAX).await
            })
            .buffered(PARALLEL_CHUNKS)
            .try_collect()
            .await?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one part"));
        }
        Ok(Bytes::from(parts.concat()))
    }

    async fn read_clamped(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.read_upto(offset, len, self.size().await?).await
    }

    /// Reads up to `len` bytes at `offset`, stopping at `size`.
    pub(crate) async fn read_upto(&self, offset: u64, len: u64, size: u64) -> Result<Bytes> {
        if offset >= size {
            return Ok(Bytes::new());
        }
        let len = len.min(size - offset);
        if (offset % self.chunk) + len <= self.chunk {
            let c = offset / self.chunk;
            return self.obj.read_extent(&c.to_be_bytes(), DATA, offset % self.chunk, len, EPOCH_MAX).await;
        }
        // The whole range in memory: refused, not an abort, when it cannot
        // be had (`stream`, `reader` and `read_into` hold far less).
        let mut buf = Vec::new();
        usize::try_from(len).ok().and_then(|n| buf.try_reserve_exact(n).ok()).ok_or_else(|| {
            ShoalError::invalid(format!(
                "reading {len} bytes at once does not fit in memory; use Array::stream, reader or read_into"
            ))
        })?;
        buf.resize(len as usize, 0);
        // Bytes past the size the stream sees (a writer's own unflushed
        // tail, or a size lowered meanwhile) stay zeros.
        self.read_into(offset, &mut buf).await?;
        Ok(Bytes::from(buf))
    }

    /// Writes everything `input` yields, from `offset` on, a chunk at a
    /// time with at most 8 chunks in flight: memory stays bounded however
    /// long the input (a file, a socket). Returns the bytes written; the
    /// size covers them once all are durable. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let cont = client.pool_connect("tank").await?.cont_open("data").await?;
    /// let array = cont.array_create(None, None).await?;
    /// let file = tokio::fs::File::open("/etc/hostname").await?;
    /// let n = array.write_from(0, file).await?;
    /// assert_eq!(array.size().await?, n);
    /// # Ok(()) }
    /// ```
    pub async fn write_from(&self, offset: u64, input: impl tokio::io::AsyncRead + Unpin) -> Result<u64> {
        use tokio::io::AsyncReadExt;
        let mut input = input;
        let mut at = offset;
        let mut in_flight = futures::stream::FuturesUnordered::new();
        loop {
            // Up to the next chunk boundary, so each piece is one chunk's.
            let want = (self.chunk - at % self.chunk) as usize;
            let mut buf = bytes::BytesMut::with_capacity(want);
            while buf.len() < want {
                let n = (&mut input).take((want - buf.len()) as u64).read_buf(&mut buf).await.map_err(|e| {
                    ShoalError::Caller {
                        what: format!("reading the array's input at byte {}", at + buf.len() as u64),
                        source: e.into(),
                    }
                })?;
                if n == 0 {
                    break;
                }
            }
            if buf.is_empty() {
                break;
            }
            let (c, in_chunk, piece) = (at / self.chunk, at % self.chunk, buf.freeze());
            at += piece.len() as u64;
            in_flight.push(async move { self.obj.write_extent(&c.to_be_bytes(), DATA, in_chunk, piece).await });
            if in_flight.len() >= PARALLEL_CHUNKS {
                in_flight.try_next().await?;
            }
        }
        while in_flight.try_next().await?.is_some() {}
        if at > offset {
            self.obj.update_max(META, SIZE, at).await?;
        }
        Ok(at - offset)
    }

    /// Streams `[offset, offset + len)` (stopping at the array's size) as
    /// pieces of at most one chunk, in order. At most 8 chunks are read
    /// ahead, so memory stays bounded however long the range; chunks never
    /// written cost no I/O (one listing of the array's chunks at the start
    /// says which exist) and come as zeros. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let cont = client.pool_connect("tank").await?.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// use futures::TryStreamExt;
    ///
    /// let mut pieces = std::pin::pin!(array.stream(0, u64::MAX));
    /// let mut total = 0;
    /// while let Some(piece) = pieces.try_next().await? {
    ///     total += piece.len() as u64;
    /// }
    /// assert_eq!(total, array.size().await?);
    /// # Ok(()) }
    /// ```
    #[must_use = "a stream reads nothing until it is polled"]
    pub fn stream(&self, offset: u64, len: u64) -> impl futures::Stream<Item = Result<Bytes>> + Send + '_ {
        stream::once(async move {
            let size = self.size().await?;
            let end = offset.saturating_add(len).min(size);
            let len = end.saturating_sub(offset);
            let written: std::collections::HashSet<u64> = if len == 0 {
                Default::default()
            } else {
                self.obj
                    .list_dkeys()
                    .await?
                    .iter()
                    .filter_map(|d| <[u8; 8]>::try_from(&d[..]).ok().map(u64::from_be_bytes))
                    .collect()
            };
            Ok::<_, ShoalError>(
                stream::iter(self.pieces(offset, len))
                    .map(move |(c, in_chunk, _, n)| {
                        let written = written.contains(&c);
                        async move {
                            if !written {
                                return Ok(zeros(n));
                            }
                            self.obj.read_extent(&c.to_be_bytes(), DATA, in_chunk, n, EPOCH_MAX).await
                        }
                    })
                    .buffered(PARALLEL_CHUNKS),
            )
        })
        .try_flatten()
    }

    /// [`Array::stream`] as a [`tokio::io::AsyncRead`]: for `tokio::io::copy`
    /// into a file or socket, with memory bounded the same way.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let cont = client.pool_connect("tank").await?.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// let mut file = tokio::fs::File::create("/tmp/array.bin").await?;
    /// tokio::io::copy(&mut array.reader(0, u64::MAX), &mut file).await?;
    /// # Ok(()) }
    /// ```
    #[must_use = "a reader reads nothing until it is read from"]
    pub fn reader(&self, offset: u64, len: u64) -> impl tokio::io::AsyncRead + Send + Unpin + '_ {
        let s = self.stream(offset, len).map_err(std::io::Error::other);
        tokio_util::io::StreamReader::new(Box::pin(s))
    }

    /// Reads into `buf` from `offset`: returns how many bytes were read,
    /// fewer than `buf.len()` only at the end of the array (0 at or past
    /// it). Holds no more than `buf` and the chunks in flight. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let cont = client.pool_connect("tank").await?.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// let mut buf = vec![0u8; 1 << 20];
    /// let n = array.read_into(0, &mut buf).await?;
    /// if n < buf.len() {
    ///     println!("the array ends {n} bytes in");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let mut pieces = std::pin::pin!(self.stream(offset, buf.len() as u64));
        let mut at = 0;
        while let Some(piece) = pieces.try_next().await? {
            buf[at..at + piece.len()].copy_from_slice(&piece);
            at += piece.len();
        }
        Ok(at)
    }

    /// The array's size in bytes. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// let size = array.size().await?;
    /// let all = array.read(0, size).await?;
    /// assert_eq!(all.len() as u64, size);
    /// # Ok(()) }
    /// ```
    pub async fn size(&self) -> Result<u64> {
        match self.obj.fetch_single(META, SIZE, EPOCH_MAX).await? {
            Some(v) => u64_of(&v, "size"),
            None => Ok(0),
        }
    }

    /// Zeroes `[offset, offset + len)`: whole chunks are punched, partial
    /// ones overwritten with zeros. The size does not change. Not cancel
    /// safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// // Zero the first MiB; the size stays as it was.
    /// let size = array.size().await?;
    /// array.punch(0, 1 << 20).await?;
    /// assert_eq!(array.size().await?, size);
    /// # Ok(()) }
    /// ```
    pub async fn punch(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| ShoalError::invalid("punch past 2^64"))?;
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (offset / self.chunk, (end - 1) / self.chunk);
        // Only chunks that hold data need work (holes already read as
        // zeros), so the cost follows the data, not the range.
        let chunks = self.obj.list_dkeys().await?.into_iter().filter_map(|d| {
            let c = u64::from_be_bytes(d.as_slice().try_into().ok()?);
            (first..=last).contains(&c).then_some(c)
        });
        for c in chunks {
            let (cs, ce) = (c * self.chunk, c.saturating_mul(self.chunk).saturating_add(self.chunk));
            let (a, b) = (offset.max(cs), end.min(ce));
            if a == cs && b == ce {
                self.obj.punch_dkey(&c.to_be_bytes()).await?;
            } else {
                self.obj.write_extent(&c.to_be_bytes(), DATA, a - cs, Bytes::from(vec![0u8; (b - a) as usize])).await?;
            }
        }
        Ok(())
    }

    /// Truncates or extends the array to `size` bytes. Bytes past a
    /// shrunken end read as zeros if the array grows again. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// array.set_size(4096).await?; // truncate
    /// assert_eq!(array.size().await?, 4096);
    /// array.set_size(1 << 20).await?; // extend with zeros
    /// assert_eq!(array.size().await?, 1 << 20);
    /// # Ok(()) }
    /// ```
    pub async fn set_size(&self, size: u64) -> Result<()> {
        let cur = self.size().await?;
        if size < cur {
            self.punch(size, cur - size).await?;
            self.obj.update_single(META, SIZE, Bytes::copy_from_slice(&size.to_le_bytes())).await?;
        } else if size > cur {
            self.obj.update_max(META, SIZE, size).await?;
        }
        Ok(())
    }

    /// Removes the whole array. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let array = cont.array_create(None, None).await?;
    /// array.destroy().await?;
    /// assert_eq!(array.size().await?, 0);
    /// # Ok(()) }
    /// ```
    pub async fn destroy(&self) -> Result<()> {
        self.obj.punch().await.map(|_| ())
    }
}
