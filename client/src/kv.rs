//! The key-value API: string or byte keys to byte values.
//!
//! A key is a dkey of the object (so keys spread over the object's
//! groups) with the value as a single value under akey `v`.

use bytes::Bytes;
use shoal_common::{Epoch, Oid, Result, EPOCH_MAX};

use crate::object::Object;

const VALUE: &[u8] = b"v";

/// A key-value object.
#[derive(Clone)]
pub struct Kv {
    obj: Object,
}

impl Kv {
    pub(crate) fn new(obj: Object) -> Kv {
        Kv { obj }
    }

    /// The object's id.
    pub fn oid(&self) -> Oid {
        self.obj.oid()
    }

    /// The underlying object.
    pub fn object(&self) -> &Object {
        &self.obj
    }

    /// Stores `value` under `key`. Not cancel safe.
    pub async fn put(&self, key: &[u8], value: Bytes) -> Result<Epoch> {
        self.obj.update_single(key, VALUE, value).await
    }

    /// The value under `key`, if any. Cancel safe.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.obj.fetch_single(key, VALUE, EPOCH_MAX).await
    }

    /// Removes `key`. Not cancel safe.
    pub async fn remove(&self, key: &[u8]) -> Result<Epoch> {
        self.obj.punch_dkey(key).await
    }

    /// Every key, in (length, bytes) order. Cancel safe.
    pub async fn list(&self) -> Result<Vec<Vec<u8>>> {
        self.obj.list_dkeys().await
    }
}
