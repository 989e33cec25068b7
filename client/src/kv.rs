//! The key-value API: string or byte keys to byte values.
//!
//! A key is a dkey of the object (so keys spread over the object's
//! groups) with the value as a single value under akey `v`.
//!
//! # Examples
//!
//! ```no_run
//! # async fn demo() -> shoal_common::Result<()> {
//! # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
//! # let cont = client.pool_connect("tank").await?.cont_open("data").await?;
//! use bytes::Bytes;
//!
//! let kv = cont.kv_create(None).await?;
//! kv.put(b"alice", Bytes::from_static(b"admin")).await?;
//! assert_eq!(kv.get(b"alice").await?.as_deref(), Some(&b"admin"[..]));
//! for key in kv.list().await? {
//!     println!("{}", String::from_utf8_lossy(&key));
//! }
//! kv.remove(b"alice").await?;
//! # Ok(()) }
//! ```

use bytes::Bytes;
use shoal_common::error::Limit;
use shoal_common::limits::{MAX_KEY_LEN, MAX_SEGMENT};
use shoal_common::{Epoch, Oid, Result, ShoalError, EPOCH_MAX};

use crate::object::Object;

const VALUE: &[u8] = b"v";

/// A key-value object.
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
/// let kv = cont.kv_create(None).await?;
/// kv.put(b"alice", Bytes::from_static(b"admin")).await?;
/// kv.put(b"bob", Bytes::from_static(b"reader")).await?;
/// assert_eq!(kv.get(b"bob").await?.as_deref(), Some(&b"reader"[..]));
/// kv.remove(b"bob").await?;
/// assert_eq!(kv.list().await?, vec![b"alice".to_vec()]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Kv {
    obj: Object,
}

impl Kv {
    pub(crate) fn new(obj: Object) -> Kv {
        Kv { obj }
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
    /// let kv = cont.kv_create(None).await?;
    /// // Remember the KV under a name, to open it again later.
    /// cont.name_put("users", kv.oid()).await?;
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
    /// # let kv = cont.kv_create(None).await?;
    /// // The KV's key "alice" is dkey "alice" of the object.
    /// let akeys = kv.object().list_akeys(b"alice").await?;
    /// println!("class {}, {} akeys", kv.object().class(), akeys.len());
    /// # Ok(()) }
    /// ```
    pub fn object(&self) -> &Object {
        &self.obj
    }

    /// Stores `value` under `key`. Not cancel safe.
    ///
    /// A key is 1 to 4096 bytes ([`shoal_common::limits::MAX_KEY_LEN`]),
    /// a value at most 64 MiB ([`shoal_common::limits::MAX_SEGMENT`]; more
    /// belongs in an array); longer ones are refused with
    /// [`ShoalError::TooLarge`] (kind `InvalidArgument`) and nothing is
    /// stored.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let kv = cont.kv_create(None).await?;
    /// use bytes::Bytes;
    ///
    /// let epoch = kv.put(b"alice", Bytes::from_static(b"admin")).await?;
    /// println!("stored at epoch {epoch}");
    /// # Ok(()) }
    /// ```
    pub async fn put(&self, key: impl AsRef<[u8]>, value: Bytes) -> Result<Epoch> {
        let key = check_key(key.as_ref())?;
        if value.len() > MAX_SEGMENT as usize {
            return Err(ShoalError::TooLarge {
                limit: Limit::ValueLen,
                size: value.len() as u64,
                max: MAX_SEGMENT as u64,
            });
        }
        self.obj.update_single(key, VALUE, value).await
    }

    /// The value under `key`, if any. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let kv = cont.kv_create(None).await?;
    /// match kv.get(b"alice").await? {
    ///     Some(v) => println!("alice: {}", String::from_utf8_lossy(&v)),
    ///     None => println!("no alice"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        self.obj.fetch_single(check_key(key.as_ref())?, VALUE, EPOCH_MAX).await
    }

    /// Removes `key`. Not cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let kv = cont.kv_create(None).await?;
    /// kv.remove(b"alice").await?;
    /// assert_eq!(kv.get(b"alice").await?, None);
    /// # Ok(()) }
    /// ```
    pub async fn remove(&self, key: impl AsRef<[u8]>) -> Result<Epoch> {
        self.obj.punch_dkey(check_key(key.as_ref())?).await
    }

    /// Every key, in (length, bytes) order. Cancel safe.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> shoal_common::Result<()> {
    /// # let client = shoal_client::Client::connect(vec!["127.0.0.1:10001".into()]).await?;
    /// # let pool = client.pool_connect("tank").await?;
    /// # let cont = pool.cont_open("data").await?;
    /// # let kv = cont.kv_create(None).await?;
    /// for key in kv.list().await? {
    ///     println!("{}", String::from_utf8_lossy(&key));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list(&self) -> Result<Vec<Vec<u8>>> {
        self.obj.list_dkeys().await
    }
}

/// A key as the user guide says: 1 to 4096 bytes.
fn check_key(key: &[u8]) -> Result<&[u8]> {
    if key.is_empty() {
        return Err(ShoalError::invalid("a key must not be empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(ShoalError::TooLarge { limit: Limit::KeyLen, size: key.len() as u64, max: MAX_KEY_LEN as u64 });
    }
    Ok(key)
}
