//! The Shoal storage server.
//!
//! Layering: only [`store`] knows RocksDB. Sockets live in the client
//! crate's transport module, which the server uses to bind and listen (the
//! client never imports the server); [`server`] only passes the bound
//! listener from `transport::tcp::bind` to `transport::tcp::serve`. RocksDB
//! handles never leave the store.
//!
//! Key types: [`config::ServerConfig`], [`server::Server`] (start-up and
//! shutdown), [`service::Service`] (request dispatch),
//! [`store::TargetStore`] (one target's versioned store).

pub mod config;
pub mod locks;
pub mod member;
pub mod ms;
pub mod server;
pub mod service;
pub mod store;
