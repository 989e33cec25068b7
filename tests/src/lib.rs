//! Harness for multi-process Shoal tests on loopback.
//!
//! Servers are real `shoal-server` processes managed by
//! [`shoal_tools::local::LocalServer`]: own directory, OS-chosen port, log
//! beside the directory, readiness by polling, never fixed sleeps.

pub use shoal_tools::local::{server_bin, LocalCluster as TestCluster, LocalServer as TestServer};

/// Deterministic pseudo-random bytes for a given seed, so a test can check
/// every byte it wrote without keeping it.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
