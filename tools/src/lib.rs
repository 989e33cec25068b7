//! Library side of the `shoal` tool: what the CLI and the multi-process
//! tests share.
//!
//! Layering: tools depend on the client and common crates, never on the
//! server crate; servers are separate processes.

pub mod local;
