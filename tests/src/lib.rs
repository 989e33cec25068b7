//! Harness for multi-process Shoal tests on loopback.
//!
//! Servers are real `shoal-server` processes managed by
//! [`shoal_tools::local::LocalServer`]: own directory, OS-chosen port, log
//! beside the directory, readiness by polling, never fixed sleeps.

pub use shoal_tools::local::{pattern, server_bin, LocalCluster as TestCluster, LocalServer as TestServer};
