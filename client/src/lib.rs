//! The Shoal client: transports and the native APIs.
//!
//! Layering: the client depends on `shoal-common` only and never imports
//! the server. [`transport`] is the one module that knows sockets.
//!
//! Key types:
//! - [`Client`]: a connection to the management service; pools.
//! - [`Pool`], [`Container`]: a connected pool and an open container.
//! - [`Object`] (object API), [`Kv`] (key-value API), [`Array`] (array API).
//! - [`ServerClient`]: typed requests to one server's targets (the layer
//!   below the APIs, for tools and tests).

pub mod array;
pub mod ec;
pub mod kv;
pub mod object;
pub mod server;
pub mod system;
pub mod transport;

pub use array::Array;
pub use kv::Kv;
pub use object::Object;
pub use server::ServerClient;
pub use system::{Client, Container, Pool};
