//! The Shoal client: transports and the native APIs.
//!
//! Layering: the client depends on `shoal-common` only and never imports
//! the server. [`transport`] is the one module that knows sockets.
//!
//! Key types: [`transport::TcpTransport`], [`ServerClient`] (typed requests
//! to one server's targets).

pub mod server;
pub mod transport;

pub use server::ServerClient;
