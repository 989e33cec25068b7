//! Shoal's shared vocabulary: identifiers, epochs, errors and the wire
//! protocol.
//!
//! Layering rule: `shoal-common` knows no sockets, no RocksDB, no tokio and
//! does no I/O. Everything here is pure logic that client and server compute
//! identically, so it is tested fast and exhaustively.
//!
//! Key types:
//! - [`ids::Oid`], [`ids::ContId`]: 128-bit object and container identities.
//! - [`hlc::Hlc`]: the hybrid logical clock that stamps every update.
//! - [`error::ShoalError`]: every error that crosses the wire, with a stable
//!   code.
//! - [`oclass::ObjectClass`]: object classes (`S1`, `RP_3GX`, `EC_4P2G1`)
//!   and the OID bits that carry them.
//! - [`placement::Placement`]: where an object's shards live, computed from
//!   the pool map.
//! - [`wire`]: framed, versioned binary frames and the typed messages in them.

pub mod ec;
pub mod error;
pub mod hlc;
pub mod ids;
pub mod limits;
pub mod mgmt;
pub mod msg;
pub mod oclass;
pub mod placement;
pub mod wire;

pub use error::{ErrorKind, Result, ShoalError};
pub use hlc::{Epoch, Hlc, EPOCH_MAX};
pub use ids::{ContId, Oid, PoolId};
