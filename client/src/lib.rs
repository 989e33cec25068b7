//! The Shoal client: transports and the native APIs.
//!
//! Layering: the client depends on `shoal-common` and `shoal-net` and never
//! imports the server. Sockets live in `shoal-net`, re-exported here as
//! [`transport`].
//!
//! Key types:
//! - [`Client`]: a connection to the management service; pools.
//! - [`Pool`], [`Container`]: a connected pool and an open container.
//! - [`Object`] (object API), [`Kv`] (key-value API), [`Array`] (array API).
//! - [`ServerClient`]: typed requests to one server's targets (the layer
//!   below the APIs, for tools and tests).
//!
//! # Examples
//!
//! Connect to the system, create a pool and a container, then store a
//! key-value pair and some array bytes and read them back:
//!
//! ```no_run
//! # async fn demo() -> shoal_client::Result<()> {
//! use shoal_client::{Bytes, Client, ContProps};
//!
//! // $SHOAL_MS, or the cluster `shoal dev up` started.
//! let client = Client::from_env().await?;
//! client.pool_create("tank", vec![], 0).await?;
//! let pool = client.pool_connect("tank").await?;
//! // Data that survives one server failure.
//! pool.cont_create("data", ContProps { rd_fac: 1, ..ContProps::default() }).await?;
//! let cont = pool.cont_open("data").await?;
//!
//! let kv = cont.kv_create(None).await?;
//! kv.put(b"greeting", Bytes::from_static(b"hello")).await?;
//! assert_eq!(kv.get(b"greeting").await?.as_deref(), Some(&b"hello"[..]));
//!
//! let array = cont.array_create(None, None).await?;
//! array.write(0, Bytes::from(vec![7u8; 1 << 20])).await?;
//! let back = array.read(0, 1 << 20).await?;
//! assert_eq!(back.len(), 1 << 20);
//! // Find the array again later by name.
//! cont.name_put("blob", array.oid()).await?;
//! # Ok(()) }
//! ```

pub mod array;
pub mod discover;
pub mod ec_read;
pub mod ec_write;
pub mod fs;
pub mod fuse;
pub mod kv;
pub mod object;
pub mod rp;
pub mod server;
pub mod system;
pub mod writeback;

pub use shoal_common::ec;
pub use shoal_net as transport;

/// The types of `shoal-common` the API uses, so that a program needs only
/// this crate: `shoal_client::{ContProps, ObjType, Result, ...}`, the rest
/// under [`common`].
pub use bytes::Bytes;
pub use shoal_common as common;
pub use shoal_common::error::{Entity, IoCause, Limit};
pub use shoal_common::mgmt::{ContInfo, ContProps, Health, PoolInfo};
pub use shoal_common::oclass::{ObjType, ObjectClass};
pub use shoal_common::{ContId, Epoch, ErrorKind, Oid, PoolId, Result, ShoalError, EPOCH_MAX};

pub use array::Array;
pub use kv::Kv;
pub use object::Object;
pub use server::ServerClient;
pub use system::{Client, ClientBuilder, ClientStats, Container, Pool};
pub use writeback::{ArrayWriter, LandedHook, WriteBack};
