//! The Shoal storage server.
//!
//! Layering: only [`store`] knows RocksDB. Sockets live in `shoal-net`,
//! which the server uses to bind and listen; [`server`] only passes the
//! bound listener from `shoal_net::tcp::bind` to `shoal_net::tcp::serve`.
//! The server never imports the client crate, nor the client the server.
//! RocksDB handles never leave the store.
//!
//! Key types: [`config::ServerConfig`], [`server::Server`] (start-up and
//! shutdown), [`service::Service`] (request dispatch),
//! [`store::TargetStore`] (one target's versioned store).

pub mod aggregate;
pub mod config;
pub mod file_locks;
pub mod locks;
pub mod member;
pub mod metrics;
pub mod ms;
pub mod rebuild;
pub mod server;
pub mod service;
pub mod store;
