//! Management-service messages: system membership, pools, containers and
//! OID allocation.
//!
//! Names: every pool or container argument is a [`Name`]: the label or the
//! UUID string, resolved by the management service.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ShoalError};
use crate::ids::{ContId, PoolId};
use crate::limits::MAX_NAME_LEN;
use crate::msg::{Opcode, Rpc};
use crate::placement::PoolMap;

/// A pool or container named by label or UUID.
pub type Name = String;

/// Checks a label: 1..=MAX_NAME_LEN bytes of letters, digits, `-`, `_`, `.`,
/// not parseable as a UUID (so names never collide with ids).
pub fn check_label(what: &str, label: &str) -> Result<()> {
    if label.is_empty() || label.len() > MAX_NAME_LEN {
        return Err(ShoalError::invalid(format!("{what} label must be 1..={MAX_NAME_LEN} bytes")));
    }
    if !label.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(ShoalError::invalid(format!(
            "{what} label {label:?} may only hold letters, digits, '-', '_' and '.'"
        )));
    }
    if label.parse::<ContId>().is_ok() {
        return Err(ShoalError::invalid(format!("{what} label {label:?} looks like a UUID")));
    }
    Ok(())
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ShoalError::invalid(format!("{what} name must be 1..={MAX_NAME_LEN} bytes")));
    }
    Ok(())
}

fn no_segments(segments: &[Bytes]) -> Result<()> {
    if !segments.is_empty() {
        return Err(ShoalError::invalid("a management request carries no data segments"));
    }
    Ok(())
}

/// A server's standing in the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Joined and heard from recently.
    Joined,
    /// Joined, but silent for longer than the heartbeat timeout.
    Unresponsive,
}

/// One server of the system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub rank: u32,
    pub uuid: u128,
    pub addr: String,
    pub fault_domain: String,
    pub targets: u32,
    pub host: String,
    pub pid: u32,
    pub state: MemberState,
    /// Milliseconds since the last heartbeat (as seen by the MS); `None`
    /// when the MS has not heard from it since the MS started.
    pub silent_ms: Option<u64>,
}

/// A server asks to join (or rejoin, same uuid = same rank).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinReq {
    pub uuid: u128,
    pub addr: String,
    pub fault_domain: String,
    pub targets: u32,
    pub host: String,
    pub pid: u32,
}

/// The rank the server has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinReply {
    pub rank: u32,
}

impl Rpc for JoinReq {
    const OP: Opcode = Opcode::SysJoin;
    type Reply = JoinReply;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)?;
        check_name("address", &self.addr)?;
        check_name("fault domain", &self.fault_domain)?;
        if self.targets == 0 {
            return Err(ShoalError::invalid("a server needs at least one target"));
        }
        Ok(())
    }
}

/// A server's periodic sign of life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReq {
    pub rank: u32,
    pub uuid: u128,
    /// The sender's heartbeat period in milliseconds; the MS waits a few
    /// periods before it calls the sender unresponsive.
    pub period_ms: u32,
}

/// The current pool-map versions, so servers can refuse stale clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub pools: Vec<(PoolId, u32)>,
}

impl Rpc for HeartbeatReq {
    const OP: Opcode = Opcode::SysHeartbeat;
    type Reply = HeartbeatReply;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)
    }
}

/// Asks for the system membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemQueryReq {}

/// Every member, by rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemQueryReply {
    pub members: Vec<Member>,
    pub ms_rank: Option<u32>,
}

impl Rpc for SystemQueryReq {
    const OP: Opcode = Opcode::SysQuery;
    type Reply = SystemQueryReply;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)
    }
}

/// A pool: its identity, map and the servers it spans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub uuid: PoolId,
    pub label: String,
    pub map: PoolMap,
    /// Address of every rank in the map.
    pub addrs: Vec<(u32, String)>,
    pub containers: u32,
}

/// Creates a pool over the given ranks (all joined ranks when empty),
/// using `targets_per_server` targets of each (all when 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCreateReq {
    pub label: String,
    pub ranks: Vec<u32>,
    pub targets_per_server: u32,
}

impl Rpc for PoolCreateReq {
    const OP: Opcode = Opcode::PoolCreate;
    type Reply = PoolInfo;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)?;
        check_label("pool", &self.label)
    }
}

/// Destroys a pool; refused while it holds containers unless `force`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolDestroyReq {
    pub pool: Name,
    pub force: bool,
}

impl Rpc for PoolDestroyReq {
    const OP: Opcode = Opcode::PoolDestroy;
    type Reply = ();

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)?;
        check_name("pool", &self.pool)
    }
}

/// Adds servers to a pool. Their targets join the map as NEW (not yet
/// used for placement; a later rebalance brings them in) and the map
/// version goes up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolExtendReq {
    pub pool: Name,
    pub ranks: Vec<u32>,
}

impl Rpc for PoolExtendReq {
    const OP: Opcode = Opcode::PoolExtend;
    type Reply = PoolInfo;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)?;
        check_name("pool", &self.pool)?;
        if self.ranks.is_empty() {
            return Err(ShoalError::invalid("name at least one rank to add"));
        }
        Ok(())
    }
}

/// Lists pools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolListReq {}

impl Rpc for PoolListReq {
    const OP: Opcode = Opcode::PoolList;
    type Reply = Vec<PoolInfo>;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)
    }
}

/// Looks a pool up by name: its map and addresses (pool connect and query).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolQueryReq {
    pub pool: Name,
}

impl Rpc for PoolQueryReq {
    const OP: Opcode = Opcode::PoolQuery;
    type Reply = PoolInfo;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)?;
        check_name("pool", &self.pool)
    }
}

/// The layout a container is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContLayout {
    Posix,
    Kv,
    Array,
    Unknown,
}

/// Container properties.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContProps {
    /// Server failures the container's data must survive (0..=4).
    pub rd_fac: u8,
    /// Default object class name, or `None` for automatic choice.
    pub oclass: Option<String>,
    /// EC cell size in bytes.
    pub cell_size: u32,
    /// Array chunk size in bytes (for EC, a whole number of stripes).
    pub chunk_size: u64,
    pub layout: ContLayout,
}

impl Default for ContProps {
    fn default() -> Self {
        ContProps { rd_fac: 0, oclass: None, cell_size: 64 << 10, chunk_size: 1 << 20, layout: ContLayout::Unknown }
    }
}

/// Whether a container's data is intact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Healthy,
    Unclean,
}

/// A container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContInfo {
    pub uuid: ContId,
    pub label: String,
    pub pool: PoolId,
    pub props: ContProps,
    pub health: Health,
    /// OIDs handed out so far.
    pub oids_allocated: u128,
}

/// Creates a container in a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContCreateReq {
    pub pool: Name,
    pub label: String,
    pub props: ContProps,
}

impl Rpc for ContCreateReq {
    const OP: Opcode = Opcode::ContCreate;
    type Reply = ContInfo;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)?;
        check_name("pool", &self.pool)?;
        check_label("container", &self.label)
    }
}

/// Destroys a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContDestroyReq {
    pub pool: Name,
    pub cont: Name,
}

impl Rpc for ContDestroyReq {
    const OP: Opcode = Opcode::ContDestroy;
    type Reply = ContInfo;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)?;
        check_name("pool", &self.pool)?;
        check_name("container", &self.cont)
    }
}

/// Lists the containers of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContListReq {
    pub pool: Name,
}

impl Rpc for ContListReq {
    const OP: Opcode = Opcode::ContList;
    type Reply = Vec<ContInfo>;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)?;
        check_name("pool", &self.pool)
    }
}

/// Looks a container up by name (container open and query).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContQueryReq {
    pub pool: Name,
    pub cont: Name,
}

impl Rpc for ContQueryReq {
    const OP: Opcode = Opcode::ContQuery;
    type Reply = ContInfo;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)?;
        check_name("pool", &self.pool)?;
        check_name("container", &self.cont)
    }
}

/// Reserves `count` object sequence numbers in a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidAllocReq {
    pub pool: PoolId,
    pub cont: ContId,
    pub count: u64,
}

/// The first reserved sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidAllocReply {
    pub first: u128,
}

impl Rpc for OidAllocReq {
    const OP: Opcode = Opcode::OidAlloc;
    type Reply = OidAllocReply;

    fn validate(&self, segments: &[Bytes]) -> Result<()> {
        no_segments(segments)?;
        if self.count == 0 || self.count > 1 << 20 {
            return Err(ShoalError::invalid("allocate 1..=1048576 OIDs at a time"));
        }
        Ok(())
    }
}
